//! The version vector of one replica: per origin, the stamp up to which everything is held,
//! with the stamps held beyond a gap and the gaps still to close by sync.
//!
//! Invariants kept here and nowhere else: the running hash always equals the sum of
//! [`dot_hash`] over the entries (checked in debug builds by [`VersionVector::hash`]); an
//! origin has stamps held ahead only beyond its entry; an origin's gap is open only while a
//! stamp beyond its entry was seen and not yet filled.

use std::collections::{BTreeMap, BTreeSet};

use crdts::{CmRDT, Dot, VClock};
use omesh_protocol::{Millis, NodeId};

use crate::digest::{first8, mix64};

/// The stamp of a node's first write: incarnation 1, counter 1.
const FIRST_STAMP: u64 = (1 << 32) | 1;
/// Stamps remembered beyond a gap, per origin, before we rely on sync alone.
const MAX_AHEAD: usize = 1024;

/// A gap in an origin's stamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gap {
    /// Since when it is open (a sync is due `gap_sync_ms` later); moved on re-arming.
    since: Millis,
    /// The peer to ask if the origin is not alive.
    via: NodeId,
    /// Quick retries spent on it.
    tries: u8,
}

/// A version vector with its running hash, its stamps held beyond gaps and its open gaps.
#[derive(Debug, Default)]
pub(crate) struct VersionVector {
    clock: VClock<NodeId>,
    /// [`VersionVector::hash`], kept up to date at each change of the vector: a digest-only
    /// sync sends it and its answer compares it, and summing 10,000 entries each time would
    /// cost more than the sync saves.
    sum: u64,
    ahead: BTreeMap<NodeId, BTreeSet<u64>>,
    gaps: BTreeMap<NodeId, Gap>,
}

impl VersionVector {
    /// The stamp of `origin` up to which everything is held (0: nothing).
    pub(crate) fn get(&self, origin: &NodeId) -> u64 {
        self.clock.get(origin)
    }

    /// The entries, in origin order.
    pub(crate) fn entries(&self) -> Vec<(NodeId, u64)> {
        self.clock.dots.iter().map(|(a, c)| (*a, *c)).collect()
    }

    /// How many origins have an entry.
    pub(crate) fn len(&self) -> usize {
        self.clock.dots.len()
    }

    /// An order-free hash of the vector (zero entries left out).
    pub(crate) fn hash(&self) -> u64 {
        debug_assert_eq!(
            self.sum,
            self.clock
                .dots
                .iter()
                .fold(0u64, |acc, (o, c)| acc.wrapping_add(dot_hash(o, *c))),
            "the kept vector hash drifted"
        );
        self.sum
    }

    /// Moves the kept hash for `origin`'s entry going from `old` to `new`.
    fn moved(&mut self, origin: &NodeId, old: u64, new: u64) {
        self.sum = self
            .sum
            .wrapping_sub(dot_hash(origin, old))
            .wrapping_add(dot_hash(origin, new));
    }

    /// Raises `origin`'s entry to `stamp` if it is below (a write of this node's own).
    pub(crate) fn raise(&mut self, origin: NodeId, stamp: u64) {
        let old = self.clock.get(&origin);
        self.clock.apply(Dot::new(origin, stamp));
        let new = self.clock.get(&origin);
        self.moved(&origin, old, new);
    }

    /// Advances the vector for a merged delta of `origin`, or notes a gap to close by sync
    /// (asking `via` if the origin is not alive). Returns whether a gap opened.
    pub(crate) fn track(&mut self, now: Millis, via: NodeId, origin: NodeId, stamp: u64) -> bool {
        // One lookup for the in-order case, which every gossip delivery takes.
        let slot = self.clock.dots.get_mut(&origin);
        let have = slot.as_deref().copied().unwrap_or(0);
        if stamp <= have {
            return false;
        }
        // A node's very first write (incarnation 1, counter 1) follows nothing: no gap, though
        // its stamp is not `0 + 1` (every new node's record would otherwise open one).
        if stamp == have + 1 || (have == 0 && stamp == FIRST_STAMP) {
            match slot {
                Some(c) => *c = stamp,
                None => {
                    self.clock.dots.insert(origin, stamp);
                }
            }
            self.moved(&origin, have, stamp);
            self.drain_ahead(origin);
            false
        } else {
            let ahead = self.ahead.entry(origin).or_default();
            if ahead.len() < MAX_AHEAD {
                ahead.insert(stamp);
            }
            if self.gaps.contains_key(&origin) {
                return false;
            }
            self.gaps.insert(
                origin,
                Gap {
                    since: now,
                    via,
                    tries: 0,
                },
            );
            true
        }
    }

    /// Moves `origin`'s entry over the stamps held beyond it that now follow on, and closes
    /// its gap if none is left.
    fn drain_ahead(&mut self, origin: NodeId) {
        if !self.ahead.contains_key(&origin) {
            // Nothing held beyond a gap (the usual case: a sync reply calls this per origin).
            if !self.gaps.is_empty() {
                self.gaps.remove(&origin);
            }
            return;
        }
        let mut have = self.clock.get(&origin);
        if let Some(ahead) = self.ahead.get_mut(&origin) {
            while ahead.remove(&(have + 1)) {
                have += 1;
            }
            ahead.retain(|s| *s > have);
            if ahead.is_empty() {
                self.ahead.remove(&origin);
            }
        }
        let old = self.clock.get(&origin);
        if have > old {
            self.clock.apply(Dot::new(origin, have));
            self.moved(&origin, old, have);
        }
        if !self.ahead.contains_key(&origin) {
            self.gaps.remove(&origin);
        }
    }

    /// Raises the vector to a sync reply's (what it carried, we now hold) and closes the
    /// gaps that filled. Each origin is handled on its own, so the order is free: a sorted
    /// vector (as replicas send it) is merged in one ordered pass instead of one B-tree
    /// search per origin, which a mesh's boot, N² syncs of N entries, would pay.
    pub(crate) fn adopt(&mut self, vclock: &[(NodeId, u64)]) {
        if !vclock.is_sorted_by(|a, b| a.0 < b.0) {
            for (origin, c) in vclock {
                let old = self.clock.get(origin);
                if *c > old {
                    self.clock.apply(Dot::new(*origin, *c));
                    self.moved(origin, old, *c);
                }
                self.drain_ahead(*origin);
            }
            return;
        }
        let mut missing = Vec::new();
        let mut sum = self.sum;
        let mut mine = self.clock.dots.iter_mut().peekable();
        for (origin, c) in vclock {
            while mine.next_if(|(k, _)| *k < origin).is_some() {}
            match mine.next_if(|(k, _)| *k == origin) {
                Some((_, have)) if *c > *have => {
                    sum = sum
                        .wrapping_sub(dot_hash(origin, *have))
                        .wrapping_add(dot_hash(origin, *c));
                    *have = *c;
                }
                Some(_) => {}
                None if *c > 0 => {
                    sum = sum.wrapping_add(dot_hash(origin, *c));
                    missing.push((*origin, *c));
                }
                None => {}
            }
        }
        self.sum = sum;
        self.clock.dots.extend(missing);
        // Only origins with a gap or stamps held beyond one have anything to drain.
        let open: Vec<NodeId> = self
            .ahead
            .keys()
            .chain(self.gaps.keys())
            .filter(|o| vclock.binary_search_by(|(k, _)| k.cmp(o)).is_ok())
            .copied()
            .collect();
        for origin in open {
            self.drain_ahead(origin);
        }
    }

    /// Rebuilds the entry map after a bulk join grew it (see `State::compact`).
    pub(crate) fn compact(&mut self) {
        self.clock.dots = std::mem::take(&mut self.clock.dots).into_iter().collect();
    }

    /// The first gap due for a sync at `now` (open for `gap_sync_ms`): its origin and the
    /// peer to ask if the origin is not alive.
    pub(crate) fn due_gap(&self, now: Millis, gap_sync_ms: Millis) -> Option<(NodeId, NodeId)> {
        self.gaps
            .iter()
            .find(|(_, g)| now >= g.since + gap_sync_ms)
            .map(|(o, g)| (*o, g.via))
    }

    /// Makes `origin`'s gap due again as if opened at `since`.
    pub(crate) fn rearm_gap(&mut self, origin: &NodeId, since: Millis) {
        if let Some(gap) = self.gaps.get_mut(origin) {
            gap.since = since;
        }
    }

    /// The gaps a sync with `from` left open get a quick retry (up to `max_tries` each), made
    /// due `now` and, if `other` is given, asked of that peer instead. Returns whether any did.
    pub(crate) fn retry_gaps(
        &mut self,
        now: Millis,
        from: NodeId,
        other: Option<NodeId>,
        max_tries: u8,
    ) -> bool {
        let mut any = false;
        for g in self.gaps.values_mut() {
            if g.via == from && g.tries < max_tries {
                g.tries += 1;
                g.since = now;
                if let Some(p) = other {
                    g.via = p;
                }
                any = true;
            }
        }
        any
    }
}

/// `id`'s entry in a peer's version vector: found by binary search if the vector is sorted
/// (as replicas send it), else the first one.
pub(crate) fn entry_of(vclock: &[(NodeId, u64)], sorted: bool, id: &NodeId) -> Option<u64> {
    if sorted {
        vclock
            .binary_search_by(|(k, _)| k.cmp(id))
            .ok()
            .and_then(|i| vclock.get(i))
            .map(|e| e.1)
    } else {
        vclock.iter().find(|(k, _)| k == id).map(|e| e.1)
    }
}

/// One entry's share of [`VersionVector::hash`]; zero for a zero entry, which the vector
/// leaves out.
fn dot_hash(origin: &NodeId, c: u64) -> u64 {
    if c == 0 {
        return 0;
    }
    mix64(u64::from_le_bytes(first8(&origin.0)) ^ c.rotate_left(29))
}
