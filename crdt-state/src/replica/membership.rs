//! The replica's view of the other nodes: who is alive, suspected or gone, who it hears, and
//! the probing that finds out. The probing state machine is [`Prober`] (`probe.rs`), the
//! suspicions' arrival times are [`Suspicions`] (`suspicion.rs`), the judgement is
//! [`Judge`] (`liveness.rs`); this file wires them to the replica's state, outbox and counters.
//!
//! [`Prober`]: crate::probe::Prober
//! [`Suspicions`]: crate::suspicion::Suspicions

use omesh_protocol::{DeltaBody, Millis, NodeId, NodeRecord, Probe};
use rand::seq::SliceRandom;

use super::Replica;
use crate::io::Action;
use crate::liveness::{Health, Judge, RttEstimate};
use crate::probe::{Answer, RELAY_PERIODS};

impl Replica {
    /// The parts that judge a peer's health.
    pub(crate) fn judge(&self) -> Judge<'_> {
        Judge {
            cfg: &self.cfg,
            state: &self.state,
            me: &self.me,
            suspicions: &self.suspicions,
            rtt: &self.rtt,
        }
    }

    /// How a node looks from here, now.
    pub fn health(&self, now: Millis, id: &NodeId) -> Health {
        self.judge().health(now, id)
    }

    /// [`Replica::health`] of a held record, without looking it up.
    pub(crate) fn health_of(&self, now: Millis, rec: &NodeRecord) -> Health {
        self.judge().health_of(now, rec)
    }

    /// When the suspicion of `id` that still holds reached this replica (its local clock);
    /// `None` while `id` is not suspected, or once `id` was heard from directly since: a
    /// message from it is better evidence than another node's failed probe, and its own
    /// refutation may still be on the way.
    pub fn suspected_since(&self, id: &NodeId) -> Option<Millis> {
        self.suspicions.since(&self.state, id)
    }

    /// The grace past a lease's ttl before it counts as lost: the configured floor or the
    /// RTT-adaptive SRTT + 4·RTTVAR, whichever is longer.
    pub fn grace_ms(&self, id: &NodeId) -> Millis {
        self.judge().grace_ms(id)
    }

    /// When this node last heard from `id`, on its own clock.
    pub fn last_heard(&self, id: &NodeId) -> Option<Millis> {
        self.state.heard(id)
    }

    /// The RTT estimate to `id`, if measured.
    pub fn rtt(&self, id: &NodeId) -> Option<RttEstimate> {
        self.rtt.get(id).copied()
    }

    /// Other nodes that are not gone (alive or suspected, and not leaving): the peers worth
    /// keeping a connection to, fetching blobs from and dialing.
    pub fn live_peers(&self, now: Millis) -> impl Iterator<Item = &NodeRecord> + '_ {
        let me = self.me.id;
        self.state
            .nodes()
            .filter(move |n| n.id != me && self.health_of(now, n) != Health::Gone)
    }

    /// Nodes alive now, this one included (unless it is leaving): the candidates placement
    /// ranks.
    pub fn alive_nodes(&self, now: Millis) -> impl Iterator<Item = &NodeRecord> + '_ {
        self.state
            .nodes()
            .filter(move |n| self.health_of(now, n) == Health::Alive)
    }

    /// How many nodes this replica knows (itself included) and how many of them are alive.
    pub fn node_counts(&self, now: Millis) -> (usize, usize) {
        let (mut known, mut alive) = (0, 0);
        for n in self.state.nodes() {
            known += 1;
            if self.health_of(now, n) == Health::Alive {
                alive += 1;
            }
        }
        (known, alive)
    }

    /// Whether this node knows peers but hears none of them.
    pub fn is_isolated(&self, now: Millis) -> bool {
        // Isolation must be noticed before any lease it could take over expires: two probe
        // periods of silence from everyone (a node pings one peer and is pinged by about one
        // per period), while a lease needs a suspicion plus ttl + grace. Silence much longer
        // than a lease means the rest of the mesh is gone, so a lone survivor of a dead mesh
        // takes over eventually instead of waiting forever.
        let quiet_after = 2 * self.cfg.heartbeat_ms;
        self.sync.is_isolated(now, quiet_after, self.forget_after())
    }

    /// Until when, on this node's clock, no other node can count this node's leases lost:
    /// the deadline a guard enforces on this node's instances (less a margin, see the
    /// README's "A task instance never outlives its lease").
    ///
    /// Another node counts a lease lost only once a suspicion of this node has stood there
    /// for `lease_ttl + grace` (grace at least `lease_grace_ms`), unrefuted and without a
    /// word from this node since. A suspicion is raised at the end of a probe period whose
    /// ping this node did not answer, one period (`heartbeat_ms`) after that ping was sent;
    /// the last ping (or sync request) of this node that was answered, sent at `s`, shows the
    /// mesh heard it then, so a node that dies, hangs or is cut off after `s` fails only
    /// pings sent after about `s` (less one round trip, which the caller's margin covers).
    /// So its leases hold until `s + heartbeat + lease_ttl + lease_grace`: a node that stops
    /// answering reaches it that long after its last round trip, while a healthy one moves
    /// it forward every period.
    /// Before the first round trip it counts from start; a node that heard nobody (or nobody
    /// for longer than the mesh takes to forget it) has no one to lose its leases to, and
    /// gets a full window from now. A leaving node's leases are gone at once.
    pub fn leases_hold_until(&self, now: Millis) -> Millis {
        let window = self.cfg.heartbeat_ms + self.cfg.lease_ttl_ms + self.cfg.lease_grace_ms;
        if self.me.leaving {
            return now;
        }
        if self.sync.alone(now, self.forget_after()) {
            return now.saturating_add(window);
        }
        self.round_trip
            .unwrap_or(self.started_at)
            .max(self.started_at)
            .saturating_add(window)
    }

    /// When the latest answered ping (or sync request) of this node was sent.
    pub fn last_round_trip(&self) -> Option<Millis> {
        self.round_trip
    }

    /// A round trip completed: a peer heard this node at `sent` (a ping answered, directly
    /// or through a helper, or a sync request answered).
    pub(crate) fn round_trip_at(&mut self, sent: Millis) {
        self.round_trip = Some(self.round_trip.map_or(sent, |t| t.max(sent)));
    }

    /// Whether this node may claim tasks: alone in the mesh (or the only one left for long),
    /// or hearing peers and synced.
    pub fn may_claim(&self, now: Millis) -> bool {
        let synced_or_alone = self.sync.alone(now, self.forget_after()) || self.sync.is_synced();
        // A node that has not been heard for long (its guards' deadline is near) would only
        // start instances its guards end at once.
        let heard = self.leases_hold_until(now) > now + self.cfg.lease_ttl_ms;
        synced_or_alone && !self.is_isolated(now) && heard
    }

    /// Silence from every peer for this long means the rest of the mesh is gone.
    pub(crate) fn forget_after(&self) -> Millis {
        10 * (self.cfg.lease_ttl_ms + self.cfg.lease_grace_ms)
    }

    /// A peer was heard from directly. A peer this node suspects (or does not know) is
    /// asked for its state: after a partition heals, that is how each side learns the other's
    /// suspicions of it and refutes them.
    pub(crate) fn contact(&mut self, now: Millis, from: NodeId) {
        self.touch(now, from);
        if self.health(now, &from) != Health::Alive {
            self.sync_request(now, from);
        }
    }

    /// Notes that `from` was heard from directly (no sync asked).
    pub(crate) fn touch(&mut self, now: Millis, from: NodeId) {
        if from == self.me.id {
            return;
        }
        self.sync.heard(now);
        self.state.hear(&from, now);
    }

    /// This node's neighbours in id order (see `NEIGHBOURS`): the few peers it probes,
    /// is probed by and syncs with, whatever the mesh size. A driver keeps its connections to
    /// them (and to its gossip mesh) and may close the rest when idle.
    pub fn neighbours(&self, now: Millis) -> Vec<NodeId> {
        crate::probe::neighbours(now, &self.judge())
    }

    /// Up to `k` distinct peers not judged Gone, other than `except`, chosen at random.
    /// Drawn from this node's neighbours, the peers it is in touch with anyway (and a helper
    /// is likely one of the target's own watchers).
    pub(crate) fn random_peers(&mut self, now: Millis, k: usize, except: NodeId) -> Vec<NodeId> {
        let mut pool = self.neighbours(now);
        pool.retain(|id| *id != except);
        pool.shuffle(&mut self.rng);
        pool.truncate(k);
        pool
    }

    /// Probing work due at `now`: close the period (suspect an unanswered target), ping the
    /// next one, or ask others to.
    pub(crate) fn probe_tick(&mut self, now: Millis) {
        if self.me.leaving {
            return;
        }
        if let Some(unanswered) = self.prober.end_period(now, self.cfg.heartbeat_ms) {
            if let Some(target) = unanswered {
                self.suspect(now, target);
            }
            let judge = Judge {
                cfg: &self.cfg,
                state: &self.state,
                me: &self.me,
                suspicions: &self.suspicions,
                rtt: &self.rtt,
            };
            let next = self
                .prober
                .next_target(now, self.cfg.heartbeat_ms, &judge, &mut self.rng);
            self.contact_tick(now);
            if let Some(target) = next {
                let wait = self
                    .rtt
                    .get(&target)
                    .map_or(0, |r| r.timeout_ms())
                    .max(self.cfg.probe_timeout_ms)
                    .min(self.cfg.heartbeat_ms / 2);
                let probe = self.prober.ping(now, target, wait);
                self.stats.probes_sent += 1;
                self.outbox
                    .push_back(Action::SendProbe { to: target, probe });
            }
        }
        if let Some((target, nonce)) = self.prober.indirect_due(now) {
            let gone = self.health(now, &target) == Health::Gone;
            let helpers = if gone {
                Vec::new()
            } else {
                self.random_peers(now, usize::from(self.cfg.indirect_probes), target)
            };
            // The target did not answer: ping one other peer too, so this node still learns
            // that it is heard (the guard's deadline, `leases_hold_until`, rests on answered
            // pings; a dead target answers none, period after period).
            let assured = helpers
                .first()
                .copied()
                .or_else(|| self.random_peers(now, 1, target).first().copied());
            if let Some(peer) = assured {
                let probe = self.prober.assurance(now, peer);
                self.stats.probes_sent += 1;
                self.outbox.push_back(Action::SendProbe { to: peer, probe });
            }
            if gone {
                // Already judged gone: the direct ping is only to notice it coming back.
                return;
            }
            self.prober.asked(&helpers);
            for h in helpers {
                self.stats.probes_sent += 1;
                self.outbox.push_back(Action::SendProbe {
                    to: h,
                    probe: Probe::PingReq { nonce, target },
                });
            }
        }
    }

    /// A probe from a peer.
    pub(crate) fn on_probe(&mut self, now: Millis, from: NodeId, probe: Probe) {
        if from == self.me.id {
            return;
        }
        self.contact(now, from);
        if self.on_quorum_probe(now, from, probe) {
            return;
        }
        let relay_ms = RELAY_PERIODS * self.cfg.heartbeat_ms;
        match self.prober.handle(now, self.me.id, from, probe, relay_ms) {
            Answer::Send { to, probe } => {
                let probe = self.grant_ack(now, to, probe);
                self.outbox.push_back(Action::SendProbe { to, probe });
            }
            Answer::Acked {
                peer,
                rtt_us,
                sent_at,
                grant,
            } => {
                if let Some(rtt_us) = rtt_us {
                    self.rtt.entry(peer).or_default().observe(rtt_us);
                }
                self.round_trip_at(sent_at);
                if grant {
                    self.quorum.granted_by(peer, sent_at);
                }
                self.stats.probes_acked += 1;
            }
            Answer::RoundTrip { sent_at, grant } => {
                self.round_trip_at(sent_at);
                if grant {
                    self.quorum.granted_by(from, sent_at);
                }
            }
            Answer::Dropped => self.stats.probes_dropped += 1,
            Answer::Refused => self.stats.probe_acks_refused += 1,
            Answer::Nothing => {}
        }
    }

    /// Suspects `target` at the version of its record held here.
    fn suspect(&mut self, now: Millis, target: NodeId) {
        let Some(version) = self.state.node(&target).map(|r| r.version()) else {
            return;
        };
        if self.state.suspicion(&target).is_some_and(|v| v >= version) {
            return;
        }
        self.stats.suspicions += 1;
        self.write(
            now,
            DeltaBody::Suspect {
                node: target,
                version,
            },
        );
        self.note_suspicion(now, target);
        self.mark_dirty(now);
    }

    /// Records when a suspicion of `node` reached this replica (kept per suspected version).
    pub(crate) fn note_suspicion(&mut self, now: Millis, node: NodeId) {
        let held = self.state.suspicion(&node);
        self.suspicions.note(now, node, held);
    }
}
