//! SWIM-style liveness: each node pings one peer per period, in turn over its neighbours
//! (the [`NEIGHBOURS`] nearest live nodes before it in id order, plus one peer judged gone,
//! if any), the turns in step across the mesh (`Prober::next_target`); an unanswered ping
//! is retried through `indirect_probes` other neighbours; a peer that answers neither way
//! by the end of the period is suspected, and the suspicion is gossiped to all as a
//! [`DeltaBody::Suspect`]. The suspect refutes by publishing a newer record of itself.
//!
//! This replaces "every node hears every heartbeat" (N² deliveries per period): probing costs
//! each node a few messages per period whatever the mesh size, and records travel only when
//! they change. A replica judges a peer Gone when a suspicion of it has been held for
//! `lease_ttl + grace` on its own clock, which is also when the peer's leases are lost.

//!
//! [`Prober`] is the probing state machine alone: it is handed `now`, the probes that arrive
//! and what it needs to read (the state, a [`Judge`], a random source), and returns what to
//! send or whom to suspect; the replica does the sending, suspecting and counting.

use std::collections::BTreeMap;

use omesh_protocol::{Millis, NodeId, Probe};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::liveness::{Health, Judge};

/// How long a relayed ping is remembered, in probe periods.
pub(crate) const RELAY_PERIODS: u64 = 2;
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
    /// The peers asked to ping the target for this node: the only ones besides the target
    /// whose ack of this nonce counts.
    helpers: [Option<NodeId>; MAX_HELPERS],
}

/// The most helpers remembered per probe (`indirect_probes` is at most this in practice;
/// more are asked but their acks do not count).
const MAX_HELPERS: usize = 8;

/// A ping this node sends on behalf of another's `PingReq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Relay {
    requester: NodeId,
    their_nonce: u64,
    target: NodeId,
    until: Millis,
}

/// What a probe from a peer calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Send this probe (an ack, a forwarded ack, or a ping on another's behalf).
    Send {
        /// The peer.
        to: NodeId,
        /// The probe.
        probe: Probe,
    },
    /// The assurance ping of this period was answered: only a round trip, sent at `sent_at`.
    RoundTrip {
        /// When the ping was sent.
        sent_at: Millis,
        /// Whether the peer granted contact (see `Probe::Ack::grant`).
        grant: bool,
    },
    /// This period's target answered; `rtt_us` is a round trip measured by it, if direct.
    Acked {
        /// The target.
        peer: NodeId,
        /// The round trip, for a direct answer to the first ping.
        rtt_us: Option<u64>,
        /// When the ping that got this answer was sent: the mesh heard this node then.
        sent_at: Millis,
        /// Whether the target itself answered and granted contact.
        grant: bool,
    },
    /// A ping request dropped: too many relays at once.
    Dropped,
    /// A late ack, or one for a relay already passed on: nothing to do.
    Nothing,
    /// An ack with a nonce this node never sent, or from a node that was neither the
    /// target nor a helper asked: dropped and counted.
    Refused,
}

/// The probing state of one replica.
#[derive(Debug, Default)]
pub(crate) struct Prober {
    next_probe: Millis,
    nonce: u64,
    /// Mixed into every nonce (derived from the replica's seed), so a peer cannot guess the
    /// nonce of a ping it did not see.
    nonce_key: u64,
    current: Option<Outstanding>,
    relays: BTreeMap<u64, Relay>,
    /// A ping to another peer sent when this period's target did not answer in time: its
    /// answer shows this node is still heard (the guard's deadline rests on such round
    /// trips, and a dead or gone target answers none). (peer, nonce, sent at).
    assure: Option<(NodeId, u64, Millis)>,
}

impl Prober {
    /// A prober whose nonces are keyed by the secret `nonce_key`.
    pub(crate) fn keyed(nonce_key: u64) -> Self {
        Self {
            nonce_key,
            ..Self::default()
        }
    }

    /// Sets the first probe time.
    pub(crate) fn start(&mut self, at: Millis) {
        self.next_probe = at;
    }

    /// Notes the helpers asked to ping this period's target.
    pub(crate) fn asked(&mut self, helpers: &[NodeId]) {
        if let Some(cur) = self.current.as_mut() {
            for (slot, h) in cur.helpers.iter_mut().zip(helpers) {
                *slot = Some(*h);
            }
        }
    }

    /// When the prober next wants a tick.
    pub(crate) fn next_timeout(&self) -> Millis {
        match self.current {
            Some(o) if !o.acked && !o.indirect_sent => o.indirect_at.min(self.next_probe),
            _ => self.next_probe,
        }
    }

    /// Closes the probe period if it is over at `now`, starting the next `period_ms` long.
    /// `None`: the period is still running. `Some(target)`: it closed; `target` is the peer
    /// that answered no ping in it (to suspect), if any. Ping the next target after this.
    pub(crate) fn end_period(&mut self, now: Millis, period_ms: Millis) -> Option<Option<NodeId>> {
        if now < self.next_probe {
            return None;
        }
        let unanswered = self.current.take().filter(|o| !o.acked).map(|o| o.target);
        self.next_probe = now + period_ms;
        self.relays.retain(|_, r| now < r.until);
        Some(unanswered)
    }

    /// Pings `target` now: it is this period's target, and others are asked to ping it after
    /// `wait_ms` without an answer. Returns the ping to send it.
    pub(crate) fn ping(&mut self, now: Millis, target: NodeId, wait_ms: Millis) -> Probe {
        let nonce = self.next_nonce();
        self.current = Some(Outstanding {
            target,
            nonce,
            sent_at: now,
            indirect_at: now + wait_ms,
            indirect_sent: false,
            acked: false,
            helpers: [None; MAX_HELPERS],
        });
        Probe::Ping { nonce }
    }

    /// Pings `peer` now only to learn that this node is still heard (see `assure`).
    pub(crate) fn assurance(&mut self, now: Millis, peer: NodeId) -> Probe {
        let nonce = self.next_nonce();
        self.assure = Some((peer, nonce, now));
        Probe::Ping { nonce }
    }

    /// This period's target and ping nonce, if it is time to ask others to ping it (once per
    /// period).
    pub(crate) fn indirect_due(&mut self, now: Millis) -> Option<(NodeId, u64)> {
        let cur = self
            .current
            .as_mut()
            .filter(|o| !o.acked && !o.indirect_sent && now >= o.indirect_at)?;
        cur.indirect_sent = true;
        Some((cur.target, cur.nonce))
    }

    /// A probe from `from` (not this node, `me`): what to do about it. A relayed ping is
    /// remembered for `relay_ms`.
    pub(crate) fn handle(
        &mut self,
        now: Millis,
        me: NodeId,
        from: NodeId,
        probe: Probe,
        relay_ms: Millis,
    ) -> Answer {
        match probe {
            Probe::Ping { nonce } => Answer::Send {
                to: from,
                probe: Probe::Ack {
                    nonce,
                    about: me,
                    grant: true,
                },
            },
            Probe::Ack {
                nonce,
                about,
                grant,
            } => {
                // Only the pinged node's own ack grants (a helper's relay never does).
                let grant = grant && from == about;
                if let Some((_, _, sent_at)) = self
                    .assure
                    .filter(|(peer, n, _)| *n == nonce && from == *peer && about == *peer)
                {
                    self.assure = None;
                    return Answer::RoundTrip { sent_at, grant };
                }
                if let Some(cur) = self.current.as_mut().filter(|o| {
                    o.nonce == nonce
                        && o.target == about
                        && (from == about || o.helpers.contains(&Some(from)))
                }) {
                    let rtt_us = (!cur.acked && from == about && !cur.indirect_sent)
                        .then(|| now.saturating_sub(cur.sent_at).saturating_mul(1000));
                    cur.acked = true;
                    Answer::Acked {
                        peer: about,
                        rtt_us,
                        sent_at: cur.sent_at,
                        grant,
                    }
                } else if self
                    .relays
                    .get(&nonce)
                    .is_some_and(|r| r.target == about && from == about)
                {
                    match self.relays.remove(&nonce) {
                        Some(r) => Answer::Send {
                            to: r.requester,
                            probe: Probe::Ack {
                                nonce: r.their_nonce,
                                about,
                                grant: false,
                            },
                        },
                        None => Answer::Nothing,
                    }
                } else if self.current.is_some_and(|o| o.nonce == nonce && o.acked) {
                    Answer::Nothing
                } else {
                    Answer::Refused
                }
            }
            // At-most-once traffic: the replica answers these itself (see `quorum.rs`).
            Probe::Poll { .. }
            | Probe::Vote { .. }
            | Probe::Confirm { .. }
            | Probe::Confirmed { .. } => Answer::Nothing,
            Probe::PingReq { nonce, target } => {
                if target == me {
                    return Answer::Send {
                        to: from,
                        probe: Probe::Ack {
                            nonce,
                            about: me,
                            grant: false,
                        },
                    };
                }
                if self.relays.len() >= MAX_RELAYS {
                    return Answer::Dropped;
                }
                let mine = self.next_nonce();
                self.relays.insert(
                    mine,
                    Relay {
                        requester: from,
                        their_nonce: nonce,
                        target,
                        until: now + relay_ms,
                    },
                );
                Answer::Send {
                    to: target,
                    probe: Probe::Ping { nonce: mine },
                }
            }
        }
    }

    /// The next node to ping: this node's neighbours in turn, nearest first, the turn set by
    /// the number of the period that holds `now` (`now / period_ms`, the same on every node
    /// whose clock agrees with its peers' to within a period). Its neighbours are the
    /// [`NEIGHBOURS`] nearest nodes before it in id order that are not gone (suspects stay
    /// in, so that a crash is confirmed by those watching it), so every node is watched by
    /// the `NEIGHBOURS` nodes after it, and in step: in period `k` each node pings its
    /// `(k mod n + 1)`-th nearest predecessor, so each node is pinged by one of its watchers
    /// in every period, and a crash is pinged within two periods and suspected within three.
    /// With each node reshuffling a round of its own, a node went unpinged for a period one
    /// time in three, and a crash waited up to four periods and more for its suspicion.
    /// Where the clocks do not agree, each watcher still pings each neighbour once every `n`
    /// periods.
    ///
    /// Only the choice of target is in step: each period still runs its full length from
    /// the tick that opened it (`end_period`), so a node whose ticks come late (starved of
    /// CPU) still gives every ping a whole period to be answered.
    ///
    /// Probing keeps each node in touch with a fixed number of peers whatever the mesh size,
    /// where a round over every peer kept a connection open to each of them (memory and
    /// keep-alives per peer, idle cost growing with the mesh). One turn in `n + 1` goes to a
    /// peer judged gone, drawn at random, if there is one: after a partition heals, an idle
    /// mesh publishes nothing, and a direct ping is how the two sides find each other again
    /// (see `Replica::contact`). Peers that left are skipped.
    pub(crate) fn next_target(
        &mut self,
        now: Millis,
        period_ms: Millis,
        judge: &Judge<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Option<NodeId> {
        let me = judge.me.id;
        let mut order = nearest(judge.state.nodes_before(&me), judge, now, NEIGHBOURS);
        if let Some(gone) = gone_peer(now, judge, rng) {
            order.push(gone);
        }
        let len = u64::try_from(order.len()).ok().filter(|n| *n > 0)?;
        let turn = (now / period_ms.max(1)) % len;
        order.get(usize::try_from(turn).ok()?).copied()
    }

    /// A fresh nonce: a bijection of a counter keyed by a secret, so nonces never repeat
    /// within a run and cannot be predicted from the ones seen.
    pub(crate) fn next_nonce(&mut self) -> u64 {
        self.nonce = self.nonce.wrapping_add(1);
        crate::digest::splitmix64(self.nonce ^ self.nonce_key)
    }
}

/// How many peers each node probes in turn (its nearest live predecessors in id order), and
/// so how many watch it. A crash is first probed about as soon as with every node probing
/// every other (each period a node escapes its watchers with chance ~(1 - 1/K)^K, 0.32),
/// and each node keeps in touch with about 2K peers whatever the mesh size.
pub const NEIGHBOURS: usize = 4;

/// The most records passed over (gone or leaving ones) looking for neighbours on one side.
const NEIGHBOUR_SCAN: usize = 256;

/// Up to `k` of `nodes` (nearest first, this node left out: `State::nodes_before` or
/// `nodes_after` of it) that are not leaving and not judged gone, looking at no more than
/// [`NEIGHBOUR_SCAN`] of them.
fn nearest<'a>(
    nodes: impl Iterator<Item = &'a omesh_protocol::NodeRecord>,
    judge: &Judge<'_>,
    now: Millis,
    k: usize,
) -> Vec<NodeId> {
    nodes
        .take(NEIGHBOUR_SCAN)
        .filter(|r| !r.leaving && judge.health_of(now, r) != Health::Gone)
        .take(k)
        .map(|r| r.id)
        .collect()
}

/// This node's neighbours: the [`NEIGHBOURS`] nearest nodes on either side of it in id order
/// that are not gone (each once, in id order): those it probes and those that probe it.
pub(crate) fn neighbours(now: Millis, judge: &Judge<'_>) -> Vec<NodeId> {
    let me = judge.me.id;
    let mut out = nearest(judge.state.nodes_before(&me), judge, now, NEIGHBOURS);
    out.extend(nearest(
        judge.state.nodes_after(&me),
        judge,
        now,
        NEIGHBOURS,
    ));
    out.sort_unstable();
    out.dedup();
    out
}

/// A peer judged gone (not one that left, nor a revoked one), if one of two random draws
/// finds one.
fn gone_peer(now: Millis, judge: &Judge<'_>, rng: &mut ChaCha8Rng) -> Option<NodeId> {
    for _ in 0..2 {
        let mut at = [0u8; 32];
        rng.fill(&mut at);
        let r = judge.state.nodes_after(&NodeId(at)).next()?;
        if r.id != judge.me.id
            && !r.leaving
            && !judge.state.is_revoked(&r.id)
            && judge.health_of(now, r) == Health::Gone
        {
            return Some(r.id);
        }
    }
    None
}
