//! Deltas held back because they overtook what they build on (see `DeltaError::is_early`):
//! a status before its epoch's lease, a lease before its spec, a write before its origin's
//! record. Bounded: a hostile node cannot grow it past [`MAX_EARLY`]; the oldest go first.

use std::collections::{BTreeSet, VecDeque};

use omesh_protocol::{Delta, NodeId};

/// The most deltas held back at once.
pub(crate) const MAX_EARLY: usize = 4096;

/// The held-back deltas, oldest first, and the `(origin, stamp)` of each (no duplicates).
#[derive(Debug, Default)]
pub(crate) struct Early {
    queue: VecDeque<(NodeId, Delta)>,
    held: BTreeSet<(NodeId, u64)>,
}

impl Early {
    /// Holds `d`, delivered by `via`, back; `true` if the oldest held delta was dropped to
    /// make room.
    pub(crate) fn hold(&mut self, via: NodeId, d: Delta) -> bool {
        if !self.held.insert((d.origin, d.stamp)) {
            return false;
        }
        self.queue.push_back((via, d));
        if self.queue.len() > MAX_EARLY {
            if let Some((_, old)) = self.queue.pop_front() {
                self.held.remove(&(old.origin, old.stamp));
            }
            return true;
        }
        false
    }

    /// Every held delta, oldest first, emptying the hold.
    pub(crate) fn take(&mut self) -> Vec<(NodeId, Delta)> {
        self.held.clear();
        self.queue.drain(..).collect()
    }

    /// Whether nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// How many are held.
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }
}
