//! Syncing with peers: the requests this node sends (to join, to close a gap, periodic
//! anti-entropy), the replies it serves, and what a reply it gets back changes. Which
//! requests are in flight and whether the view is synced is [`SyncState`] (`sync.rs`); the
//! version vector and its gaps are [`VersionVector`] (`vector.rs`).
//!
//! [`SyncState`]: crate::sync::SyncState
//! [`VersionVector`]: crate::vector::VersionVector

use std::collections::BTreeMap;

use omesh_protocol::{Millis, NodeId, SyncReply, SyncRequest};

use super::Replica;
use crate::io::{Action, InputError};
use crate::sync;
use crate::vector::entry_of;

/// A sync reply that applied at least this many deltas has the per-node maps rebuilt.
const COMPACT_AFTER: u64 = 256;

impl Replica {
    /// A gap-closing sync came back from `from` and left gaps open: `from` lacked them too
    /// (it was asked as the forwarder of a later write, its origin not being alive here).
    /// Ask again soon, a few times, each time another peer, rather than after the 5 s sync
    /// timeout; a gap no peer can fill (its write died with its origin) then falls back to
    /// the slow pace.
    pub(super) fn retry_open_gaps(&mut self, now: Millis, from: NodeId) {
        const QUICK_RETRIES: u8 = 3;
        let others = self.random_peers(now, 1, from);
        let other = others.first().copied();
        if self.vector.retry_gaps(now, from, other, QUICK_RETRIES) {
            self.wake_at(now + self.cfg.gap_sync_ms);
        }
    }

    /// A requester that holds some of this node's own writes but not the latest missed them
    /// on gossip (it was cut off, or the mesh lost them). Others may have too, and a
    /// replica only asks for what it knows it lacks: republish the record (at most once a
    /// period), so every node that missed a write sees a gap in this node's stamps and
    /// closes it. An idle mesh publishes nothing else that would show them the gap.
    pub(super) fn note_lag(&mut self, now: Millis, req: &SyncRequest, sorted: bool) {
        let me = self.me.id;
        let Some(theirs) = entry_of(&req.vclock, sorted, &me) else {
            return;
        };
        if theirs > 0 && theirs < self.vector.get(&me) {
            self.publish_soon(now);
        }
    }

    pub(super) fn sync_request(&mut self, now: Millis, to: NodeId) {
        self.send_sync_request(now, to, false);
    }

    /// A sync request; `digest_only` compares digests first (periodic anti-entropy of a
    /// synced replica), sending the version vector only if they differ.
    pub(super) fn send_sync_request(&mut self, now: Millis, to: NodeId, digest_only: bool) {
        if to == self.me.id || !self.sync.try_send(now, to) {
            return;
        }
        self.stats.syncs_sent += 1;
        let digest_only = self.sync.digest_only(&to, digest_only);
        let mut vclock = if digest_only {
            Vec::new()
        } else {
            self.version_vector()
        };
        if !self.sync.is_synced() && self.cfg.incarnation > 1 {
            // A restarted node starts empty, yet its own new stamps (`incarnation << 32 | n`)
            // claim to cover everything it wrote in earlier incarnations: until a sync
            // completes, ask for its own history too, or it never gets it back.
            for (origin, c) in &mut vclock {
                if *origin == self.me.id {
                    *c = 0;
                }
            }
        }
        let request = SyncRequest {
            vclock,
            digest: self.digest(),
            full: self.sync.take_want_full(&to),
            digest_only,
            vclock_hash: if digest_only { self.vclock_hash() } else { 0 },
        };
        self.outbox.push_back(Action::SendSync { to, request });
    }

    /// The part of a responder's version vector this replica may adopt: entries only for
    /// nodes whose (signed) record it holds, and no stamp beyond the incarnation that record
    /// names. A vector is the responder's say-so; adopting made-up origins or stamps would
    /// grow the vector without bound and make this replica skip real writes as if held.
    fn vouched(&mut self, vclock: Vec<(NodeId, u64)>) -> Vec<(NodeId, u64)> {
        let total = vclock.len();
        let kept: Vec<(NodeId, u64)> = vclock
            .into_iter()
            .filter(|(origin, c)| {
                self.state
                    .node(origin)
                    .is_some_and(|rec| c >> 32 <= rec.incarnation)
            })
            .collect();
        self.stats.vector_entries_refused += u64::try_from(total - kept.len()).unwrap_or(u64::MAX);
        kept
    }

    /// Answers a peer's sync request (see [`sync::reply`]).
    pub(super) fn serve_sync(&mut self, now: Millis, from: NodeId, req: &SyncRequest) {
        self.stats.syncs_served += 1;
        let sorted = req.vclock.is_sorted_by(|a, b| a.0 < b.0);
        self.note_lag(now, req, sorted);
        let reply = sync::reply(&self.state, &self.vector, req, sorted);
        self.outbox.push_back(Action::ReplySync { to: from, reply });
    }

    pub(super) fn on_sync_reply(
        &mut self,
        now: Millis,
        from: NodeId,
        reply: SyncReply,
    ) -> Result<(), InputError> {
        if let Some(sent) = self.sync.ended(&from) {
            // An answer proves `from` heard this node when the request was sent.
            self.round_trip_at(sent);
        }
        self.touch(now, from);
        let SyncReply {
            deltas,
            vclock,
            digest,
            truncated,
        } = reply;
        let applied = self.stats.deltas_applied;
        let result = self.ingest(now, from, &deltas);
        let had_vector = !vclock.is_empty();
        let mine = entry_of(&vclock, vclock.is_sorted_by(|a, b| a.0 < b.0), &self.me.id);
        let vclock = self.vouched(vclock);
        self.vector.adopt(&vclock);
        if self.stats.deltas_applied - applied >= COMPACT_AFTER {
            // A bulk join (see `State::compact`): the two per-node maps it grew, rebuilt full.
            self.state.compact();
            self.vector.compact();
        }
        if !self.sync.is_synced() && !truncated && had_vector {
            // The first sync since start (or since isolation) shows the responder lacks this
            // node's latest write: what it published went nowhere (before any mesh link), so
            // publish again now that there is a peer.
            let me = self.me.id;
            let theirs = mine.unwrap_or(0);
            if theirs < self.vector.get(&me) {
                self.publish_soon(now);
            }
        }
        self.stats.syncs_completed += 1;
        if !truncated && self.sync.gap_sync_answered(from) {
            self.retry_open_gaps(now, from);
        }
        if !truncated {
            self.sync.completed();
        }
        if truncated {
            self.sync_request(now, from);
        } else if digest != self.digest() {
            let theirs: BTreeMap<NodeId, u64> = vclock.into_iter().collect();
            let mine: BTreeMap<NodeId, u64> = self.version_vector().into_iter().collect();
            if theirs == mine {
                // Same versions, different states: something was lost outside the vectors.
                self.stats.digest_mismatches += 1;
                self.sync.want_full(from);
            }
        }
        result
    }

    /// Whether a sync completed since start (or since this node last heard nobody).
    pub fn is_synced(&self) -> bool {
        self.sync.is_synced()
    }

    pub(super) fn random_alive_peer(&mut self, now: Millis) -> Option<NodeId> {
        let me = self.me.id;
        self.random_peers(now, 1, me).first().copied()
    }
}
