//! Suspicions as this replica saw them arrive: per suspected node, the version of its record
//! suspected and when, on this node's clock, that suspicion reached it. The suspicion itself
//! is replicated ([`State::suspicion`]); when it arrived is local, and is what a lease's
//! `ttl + grace` counts from.

use std::collections::BTreeMap;

use omesh_protocol::{Millis, NodeId};

use crate::merge::State;

/// When each suspicion held in the state reached this replica.
#[derive(Debug, Default)]
pub(crate) struct Suspicions {
    /// Per suspected node, the version suspected and when that suspicion reached us.
    at: BTreeMap<NodeId, ((u64, u64), Millis)>,
    /// Per revoked node, when its revocation reached this replica.
    revoked: BTreeMap<NodeId, Millis>,
}

impl Suspicions {
    /// Records when the suspicion of `node` now held (`held`, from the state) reached this
    /// replica: kept per suspected version, forgotten once none is held.
    pub(crate) fn note(&mut self, now: Millis, node: NodeId, held: Option<(u64, u64)>) {
        match held {
            Some(v) => {
                let e = self.at.entry(node).or_insert((v, now));
                if e.0 != v {
                    *e = (v, now);
                }
            }
            None => {
                self.at.remove(&node);
            }
        }
    }

    /// Whether a suspicion of `node` was noted.
    pub(crate) fn holds(&self, node: &NodeId) -> bool {
        self.at.contains_key(node)
    }

    /// When the suspicion of `id` that still holds in `state` reached this replica; `None`
    /// while `id` is not suspected, or once `id` was heard from directly since: a message
    /// from it is better evidence than another node's failed probe, and its own refutation
    /// may still be on the way.
    ///
    /// A revocation counts as a suspicion from when it reached this replica, one that nothing
    /// refutes: a revoked node is refused by every peer from then on, so it completes no
    /// round trip and its guards end its instances within its own window, and its leases
    /// count as lost `ttl + grace` later without a probe of it failing first (nobody probes
    /// a revoked node).
    pub(crate) fn since(&self, state: &State, id: &NodeId) -> Option<Millis> {
        let revoked = self.revoked.get(id).copied();
        match (self.suspected(state, id), revoked) {
            (Some(s), Some(r)) => Some(s.min(r)),
            (s, r) => s.or(r),
        }
    }

    /// [`Suspicions::since`] for a suspicion gossiped by a prober.
    fn suspected(&self, state: &State, id: &NodeId) -> Option<Millis> {
        let v = state.suspicion(id)?;
        let at = match self.at.get(id) {
            Some((sv, at)) if *sv == v => *at,
            // Merged without passing through `note` (cannot happen through the replica's
            // inputs): count it from the start, the cautious side.
            _ => Millis::MAX / 4,
        };
        if state.heard(id).is_some_and(|h| h > at) {
            return None;
        }
        Some(at)
    }

    /// Notes that the revocation of `node` reached this replica (the first arrival counts;
    /// see [`Suspicions::since`]).
    pub(crate) fn revoked(&mut self, now: Millis, node: NodeId) {
        self.revoked.entry(node).or_insert(now);
    }

    /// Restarts every suspicion's countdown: called when this node hears the mesh again
    /// after a spell of isolation. What it suspected while cut off says more about the cut
    /// than about the peers, who get `ttl + grace` from now to refute it before their
    /// leases count as lost here.
    pub(crate) fn restart(&mut self, now: Millis) {
        for (_, at) in self.at.values_mut() {
            *at = (*at).max(now);
        }
        for at in self.revoked.values_mut() {
            *at = (*at).max(now);
        }
    }
}
