//! SWIM-style liveness: each node pings one peer per period, in a shuffled round robin; an
//! unanswered ping is retried through `indirect_probes` other peers; a peer that answers
//! neither way by the end of the period is suspected, and the suspicion is gossiped to all
//! as a [`DeltaBody::Suspect`]. The suspect refutes by publishing a newer record of itself.
//!
//! This replaces "every node hears every heartbeat" (N² deliveries per period): probing costs
//! each node a few messages per period whatever the mesh size, and records travel only when
//! they change. A replica judges a peer Gone when a suspicion of it has been held for
//! `lease_ttl + grace` on its own clock, which is also when the peer's leases are lost.

use std::collections::BTreeMap;

use omesh_protocol::{DeltaBody, Millis, NodeId, Probe};
use rand::seq::SliceRandom;
use rand::Rng;

use crate::liveness::Health;
use crate::replica::{Action, Replica};

/// How long a relayed ping is remembered, in probe periods.
const RELAY_PERIODS: u64 = 2;
/// The most relayed pings remembered at once; more requests are dropped (and counted).
const MAX_RELAYS: usize = 256;

/// The ping of the current period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outstanding {
    target: NodeId,
    nonce: u64,
    sent_at: Millis,
    /// When to ask others to ping the target, if it has not answered.
    indirect_at: Millis,
    indirect_sent: bool,
    acked: bool,
}

/// A ping this node sends on behalf of another's `PingReq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Relay {
    requester: NodeId,
    their_nonce: u64,
    target: NodeId,
    until: Millis,
}

/// The probing state of one replica.
#[derive(Debug, Default)]
pub(crate) struct Prober {
    /// This round's peers to ping, shuffled, as id prefixes (see `State::node_by_prefix`):
    /// every replica holds one entry per known node.
    order: Vec<u64>,
    pos: usize,
    next_probe: Millis,
    nonce: u64,
    current: Option<Outstanding>,
    relays: BTreeMap<u64, Relay>,
}

impl Prober {
    /// When the prober next wants a tick.
    pub(crate) fn next_timeout(&self) -> Millis {
        match self.current {
            Some(o) if !o.acked && !o.indirect_sent => o.indirect_at.min(self.next_probe),
            _ => self.next_probe,
        }
    }
}

impl Replica {
    /// Sets the first probe time.
    pub(crate) fn prober_start(&mut self, at: Millis) {
        self.prober.next_probe = at;
    }

    /// Probing work due at `now`: close the period (suspect an unanswered target), ping the
    /// next one, or ask others to.
    pub(crate) fn probe_tick(&mut self, now: Millis) {
        if self.me.leaving {
            return;
        }
        if now >= self.prober.next_probe {
            if let Some(o) = self.prober.current.take().filter(|o| !o.acked) {
                self.suspect(now, o.target);
            }
            self.prober.next_probe = now + self.cfg.heartbeat_ms;
            self.prober.relays.retain(|_, r| now < r.until);
            if let Some(target) = self.next_target() {
                let nonce = self.next_nonce();
                let wait = self
                    .rtt
                    .get(&target)
                    .map_or(0, |r| r.timeout_ms())
                    .max(self.cfg.probe_timeout_ms)
                    .min(self.cfg.heartbeat_ms / 2);
                self.prober.current = Some(Outstanding {
                    target,
                    nonce,
                    sent_at: now,
                    indirect_at: now + wait,
                    indirect_sent: false,
                    acked: false,
                });
                self.stats.probes_sent += 1;
                self.outbox.push_back(Action::SendProbe {
                    to: target,
                    probe: Probe::Ping { nonce },
                });
            }
        }
        let due = self
            .prober
            .current
            .filter(|o| !o.acked && !o.indirect_sent && now >= o.indirect_at);
        if let Some(o) = due {
            if let Some(cur) = self.prober.current.as_mut() {
                cur.indirect_sent = true;
            }
            if self.health(now, &o.target) == Health::Gone {
                // Already judged gone: the direct ping is only to notice it coming back.
                return;
            }
            let helpers = self.random_peers(now, usize::from(self.cfg.indirect_probes), o.target);
            for h in helpers {
                self.stats.probes_sent += 1;
                self.outbox.push_back(Action::SendProbe {
                    to: h,
                    probe: Probe::PingReq {
                        nonce: o.nonce,
                        target: o.target,
                    },
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
        match probe {
            Probe::Ping { nonce } => {
                self.outbox.push_back(Action::SendProbe {
                    to: from,
                    probe: Probe::Ack {
                        nonce,
                        about: self.me.id,
                    },
                });
            }
            Probe::Ack { nonce, about } => {
                if let Some(cur) = self
                    .prober
                    .current
                    .as_mut()
                    .filter(|o| o.nonce == nonce && o.target == about)
                {
                    if !cur.acked && from == about && !cur.indirect_sent {
                        let rtt_us = now.saturating_sub(cur.sent_at).saturating_mul(1000);
                        self.rtt.entry(about).or_default().observe(rtt_us);
                    }
                    cur.acked = true;
                    self.stats.probes_acked += 1;
                } else if let Some(r) = self
                    .prober
                    .relays
                    .remove(&nonce)
                    .filter(|r| r.target == about && from == about)
                {
                    self.outbox.push_back(Action::SendProbe {
                        to: r.requester,
                        probe: Probe::Ack {
                            nonce: r.their_nonce,
                            about,
                        },
                    });
                }
                // Anything else is a late or unknown ack: nothing to do.
            }
            Probe::PingReq { nonce, target } => {
                if target == self.me.id {
                    self.outbox.push_back(Action::SendProbe {
                        to: from,
                        probe: Probe::Ack {
                            nonce,
                            about: self.me.id,
                        },
                    });
                    return;
                }
                if self.prober.relays.len() >= MAX_RELAYS {
                    self.stats.probes_dropped += 1;
                    return;
                }
                let mine = self.next_nonce();
                self.prober.relays.insert(
                    mine,
                    Relay {
                        requester: from,
                        their_nonce: nonce,
                        target,
                        until: now + RELAY_PERIODS * self.cfg.heartbeat_ms,
                    },
                );
                self.outbox.push_back(Action::SendProbe {
                    to: target,
                    probe: Probe::Ping { nonce: mine },
                });
            }
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
        match self.state.suspicion(&node) {
            Some(v) => {
                let e = self.suspected_at.entry(node).or_insert((v, now));
                if e.0 != v {
                    *e = (v, now);
                }
            }
            None => {
                self.suspected_at.remove(&node);
            }
        }
    }

    /// When the suspicion of `id` that still holds reached this replica (its local clock);
    /// `None` while `id` is not suspected, or once `id` was heard from directly since: a
    /// message from it is better evidence than another node's failed probe, and its own
    /// refutation may still be on the way.
    pub fn suspected_since(&self, id: &NodeId) -> Option<Millis> {
        let v = self.state.suspicion(id)?;
        let at = match self.suspected_at.get(id) {
            Some((sv, at)) if *sv == v => *at,
            // Merged without passing through `note_suspicion` (cannot happen through the
            // replica's inputs): count it from the start, the cautious side.
            _ => Millis::MAX / 4,
        };
        if self.state.heard(id).is_some_and(|h| h > at) {
            return None;
        }
        Some(at)
    }

    /// Restarts every suspicion's countdown: called when this node hears the mesh again
    /// after a spell of isolation. What it suspected while cut off says more about the cut
    /// than about the peers, who get `ttl + grace` from now to refute it before their
    /// leases count as lost here.
    pub(crate) fn restart_suspicions(&mut self, now: Millis) {
        for (_, at) in self.suspected_at.values_mut() {
            *at = (*at).max(now);
        }
    }

    /// The next node to ping: round robin over a shuffled list of the known peers, reshuffled
    /// each round. Peers judged Gone stay in it (without indirect probes): after a partition
    /// heals, an idle mesh publishes nothing, and a direct ping is how the two sides find
    /// each other again (see `Replica::contact`). Peers that left are skipped.
    fn next_target(&mut self) -> Option<NodeId> {
        for _ in 0..2 {
            while self.prober.pos < self.prober.order.len() {
                let p = self.prober.order[self.prober.pos];
                self.prober.pos += 1;
                match self.state.node_by_prefix(p) {
                    Some(r) if r.id != self.me.id && !r.leaving => return Some(r.id),
                    _ => {}
                }
            }
            let mut order: Vec<u64> = self
                .state
                .nodes()
                .filter(|n| n.id != self.me.id && !n.leaving)
                .map(|n| id_prefix(&n.id))
                .collect();
            order.shuffle(&mut self.rng);
            self.prober.order = order;
            self.prober.pos = 0;
        }
        None
    }

    /// A node just became known: put it at a random place among the peers still to ping
    /// this round, as SWIM does, rather than wait for the next round. At boot a node's first
    /// round holds only the few peers it knew then, and every node knew the same early
    /// booters: a node that booted late went unprobed by everyone for a whole round.
    pub(crate) fn prober_learned(&mut self, id: &NodeId) {
        if self.prober.order.is_empty() {
            // Not built yet: the first round is built from every node known then.
            return;
        }
        self.prober.order.push(id_prefix(id));
        let last = self.prober.order.len() - 1;
        let at = self.rng.gen_range(self.prober.pos.min(last)..=last);
        self.prober.order.swap(at, last);
    }

    /// Up to `k` distinct peers not judged Gone, other than `except`, chosen at random.
    pub(crate) fn random_peers(&mut self, now: Millis, k: usize, except: NodeId) -> Vec<NodeId> {
        let n = self.prober.order.len();
        let mut out = Vec::with_capacity(k);
        if n == 0 || k == 0 {
            return out;
        }
        // A few random draws from the round-robin list: O(k), not O(N).
        for _ in 0..(4 * k) {
            let i = self.rng.gen_range(0..n);
            let Some(id) = self
                .state
                .node_by_prefix(self.prober.order[i])
                .map(|r| r.id)
            else {
                continue;
            };
            if id != except
                && id != self.me.id
                && !out.contains(&id)
                && self.health(now, &id) != Health::Gone
            {
                out.push(id);
                if out.len() == k {
                    break;
                }
            }
        }
        out
    }

    fn next_nonce(&mut self) -> u64 {
        self.prober.nonce = self.prober.nonce.wrapping_add(1);
        self.prober.nonce
    }
}

/// The first eight bytes of an id, big-endian: its place in id order.
fn id_prefix(id: &NodeId) -> u64 {
    u64::from_be_bytes(crate::digest::first8(&id.0))
}
