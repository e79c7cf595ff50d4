//! Anti-entropy: the sync requests in flight, the gap-closing sync, the peers owed a full
//! reply, the anti-entropy period, and whether this replica's view can be trusted (synced
//! since start or since it last heard nobody). Also the answer to a peer's request, built
//! from the state and the version vector alone.

use std::collections::{BTreeMap, BTreeSet};

use omesh_protocol::codec::canonical_len;
use omesh_protocol::delta::MAX_SYNC_REPLY_BYTES;
use omesh_protocol::{Delta, Millis, NodeId, SyncReply, SyncRequest};

use crate::merge::State;
use crate::vector::{entry_of, VersionVector};

/// How long an unanswered sync request blocks another to the same peer.
pub(crate) const SYNC_TIMEOUT_MS: Millis = 5_000;

/// The sync state of one replica.
#[derive(Debug, Default)]
pub(crate) struct SyncState {
    /// Per peer, when the unanswered request to it was sent.
    inflight: BTreeMap<NodeId, Millis>,
    /// The peer of the gap-closing sync last sent (in flight while `inflight` says so).
    gap_sync: Option<NodeId>,
    /// Peers whose last reply showed equal vectors but different digests: the next request
    /// to them asks for everything.
    want_full: BTreeSet<NodeId>,
    next_anti_entropy: Millis,
    /// Whether a sync completed since start or since this node last heard nobody. Until then
    /// it knows it may hold a stale view, and claims nothing (see `decide.rs`).
    synced: bool,
    /// The last time any peer was heard from (a message from it, or news of the mesh).
    last_contact: Option<Millis>,
    was_isolated: bool,
}

impl SyncState {
    /// Sets the first anti-entropy round.
    pub(crate) fn start(&mut self, at: Millis) {
        self.next_anti_entropy = at;
    }

    /// When the next anti-entropy round is due.
    pub(crate) fn next_anti_entropy(&self) -> Millis {
        self.next_anti_entropy
    }

    /// Whether an anti-entropy round is due at `now`; if so the next is set `period_ms` on.
    pub(crate) fn anti_entropy_due(&mut self, now: Millis, period_ms: Millis) -> bool {
        if now < self.next_anti_entropy {
            return false;
        }
        self.next_anti_entropy = now + period_ms;
        true
    }

    /// Notes a request sent to `to` at `now`, unless one to it is still unanswered (then
    /// returns false and nothing is to be sent).
    pub(crate) fn try_send(&mut self, now: Millis, to: NodeId) -> bool {
        if self
            .inflight
            .get(&to)
            .is_some_and(|t| now < t + SYNC_TIMEOUT_MS)
        {
            return false;
        }
        self.inflight.insert(to, now);
        true
    }

    /// The request to `from` was answered or failed; when it was sent.
    pub(crate) fn ended(&mut self, from: &NodeId) -> Option<Millis> {
        self.inflight.remove(from)
    }

    /// Whether the last gap-closing sync is still unanswered at `now`.
    pub(crate) fn gap_sync_busy(&self, now: Millis) -> bool {
        self.gap_sync.is_some_and(|p| {
            self.inflight
                .get(&p)
                .is_some_and(|t| now < t + SYNC_TIMEOUT_MS)
        })
    }

    /// A gap-closing sync was sent to `to`.
    pub(crate) fn gap_sync_sent(&mut self, to: NodeId) {
        self.gap_sync = Some(to);
    }

    /// Whether `from` was asked the last gap-closing sync; if so that sync is over.
    pub(crate) fn gap_sync_answered(&mut self, from: NodeId) -> bool {
        if self.gap_sync != Some(from) {
            return false;
        }
        self.gap_sync = None;
        true
    }

    /// Whether a request to `to` may compare digests only: asked for, synced, and `to` is not
    /// owed a full reply.
    pub(crate) fn digest_only(&self, to: &NodeId, asked: bool) -> bool {
        asked && self.synced && !self.want_full.contains(to)
    }

    /// Whether the request to `to` asks for everything; asked once.
    pub(crate) fn take_want_full(&mut self, to: &NodeId) -> bool {
        self.want_full.remove(to)
    }

    /// The next request to `from` asks for everything.
    pub(crate) fn want_full(&mut self, from: NodeId) {
        self.want_full.insert(from);
    }

    /// Whether a sync completed since start (or since this node last heard nobody).
    pub(crate) fn is_synced(&self) -> bool {
        self.synced
    }

    /// A complete (untruncated) sync reply was merged.
    pub(crate) fn completed(&mut self) {
        self.synced = true;
    }

    /// A peer was heard from, or news of the mesh arrived, at `now`.
    pub(crate) fn heard(&mut self, now: Millis) {
        self.last_contact = Some(now);
    }

    /// Whether peers were heard from once but none for between `quiet_after` and
    /// `forget_after`.
    pub(crate) fn is_isolated(
        &self,
        now: Millis,
        quiet_after: Millis,
        forget_after: Millis,
    ) -> bool {
        self.last_contact.is_some_and(|t| {
            let silent = now.saturating_sub(t);
            silent >= quiet_after && silent <= forget_after
        })
    }

    /// Whether no peer was ever heard, or none for longer than `forget_after`.
    pub(crate) fn alone(&self, now: Millis, forget_after: Millis) -> bool {
        self.last_contact
            .is_none_or(|t| now.saturating_sub(t) > forget_after)
    }

    /// Takes this tick's isolation: becoming isolated makes the view untrusted until the
    /// next sync. Returns whether the node just heard the mesh again after isolation.
    pub(crate) fn note_isolation(&mut self, isolated: bool) -> bool {
        if isolated && !self.was_isolated {
            // Heard nobody for a while: whatever we believe may be stale until we sync again.
            self.synced = false;
        }
        let rejoined = !isolated && self.was_isolated;
        self.was_isolated = isolated;
        rejoined
    }
}

/// Answers a peer's request with every component its vector lacks, cut at the size limit on
/// an origin boundary so the requester can adopt what it fully got. `sorted`: whether the
/// request's vector is sorted by origin.
pub(crate) fn reply(
    state: &State,
    vector: &VersionVector,
    req: &SyncRequest,
    sorted: bool,
) -> SyncReply {
    if req.digest_only && !req.full {
        // Different digests: "truncated", so the requester asks again with its vector.
        // Equal digests: nothing, or this vector alone if the vectors differ (see
        // `SyncRequest::digest_only`).
        let same = req.digest == state.digest();
        let vclock = if same && req.vclock_hash != vector.hash() {
            vector.entries()
        } else {
            Vec::new()
        };
        return SyncReply {
            deltas: Vec::new(),
            vclock,
            digest: state.digest(),
            truncated: !same,
        };
    }
    let mut deltas: Vec<Delta> = if req.digest == state.digest() && !req.full {
        Vec::new()
    } else {
        // A sorted vector (as replicas send it) is searched in place; anything else is read
        // into a map first, a repeated origin counting with its last entry.
        let map: BTreeMap<NodeId, u64> = if sorted {
            BTreeMap::new()
        } else {
            req.vclock.iter().copied().collect()
        };
        let (vclock, map, full) = (&req.vclock, &map, req.full);
        let theirs = move |origin: &NodeId| {
            if sorted {
                entry_of(vclock, true, origin).unwrap_or(0)
            } else {
                map.get(origin).copied().unwrap_or(0)
            }
        };
        state
            .components_where(move |at| full || at.stamp > theirs(&at.origin))
            .collect()
    };
    deltas.sort_by_key(|d| (d.origin, d.stamp));
    let budget = MAX_SYNC_REPLY_BYTES - 64 * 1024 - 48 * (vector.len() + 1);
    let mut used = 0usize;
    let mut cut: Option<(usize, NodeId)> = None;
    for (i, d) in deltas.iter().enumerate() {
        used += canonical_len(d) + 8;
        if used > budget && i > 0 {
            cut = Some((i, d.origin));
            break;
        }
    }
    let mine = vector.entries();
    let (deltas, vclock, truncated) = match cut {
        None => (deltas, mine, false),
        Some((i, partial)) => {
            deltas.truncate(i);
            let last_partial = deltas
                .iter()
                .rev()
                .find(|d| d.origin == partial)
                .map(|d| d.stamp);
            let vclock = mine
                .into_iter()
                .filter_map(|(o, c)| match o.cmp(&partial) {
                    std::cmp::Ordering::Less => Some((o, c)),
                    std::cmp::Ordering::Equal => last_partial.map(|s| (o, s.min(c))),
                    std::cmp::Ordering::Greater => None,
                })
                .collect();
            (deltas, vclock, true)
        }
    };
    SyncReply {
        deltas,
        vclock,
        digest: state.digest(),
        truncated,
    }
}
