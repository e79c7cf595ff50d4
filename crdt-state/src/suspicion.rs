//! Suspicions as this replica saw them arrive: per suspected node, the version of its record
//! suspected, when, on this node's clock, that suspicion reached it, and which nodes suspected
//! that same version (each in a [`DeltaBody::Suspect`] of its own, signed by it). The
//! suspicion itself is replicated ([`State::suspicion`]); when it arrived and who confirmed it
//! are local, and are what the wait before a lease counts lost is worked out from.
//!
//! The wait is Lifeguard's ("Lifeguard: Local Health Awareness for More Accurate Failure
//! Detection", as in HashiCorp memberlist): `max(min, max - (max - min)·log(C + 1)/log(K + 1))`
//! for `C` confirmations by nodes other than the first suspecter, out of `K` expected. A lone
//! suspicion (maybe this node's own trouble, or one flaky link) waits the full
//! `lease_ttl + grace`; one that `K` independent nodes confirmed waits only the floor.
//!
//! [`DeltaBody::Suspect`]: omesh_protocol::DeltaBody::Suspect

use std::collections::BTreeMap;

use omesh_protocol::{Millis, NodeId};

use crate::merge::State;

/// The most distinct suspecters remembered per suspicion (more add nothing to the wait).
const MAX_SUSPECTERS: usize = 16;

/// One suspicion as it reached this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Arrival {
    /// The version of the suspect's record suspected.
    version: (u64, u64),
    /// When the first suspicion of that version reached this replica.
    at: Millis,
    /// The distinct nodes that suspected that version (the signed origins of its `Suspect`
    /// deltas seen here, this node included if it suspected it).
    by: Vec<NodeId>,
}

/// When each suspicion held in the state reached this replica, and who confirmed it.
#[derive(Debug, Default)]
pub(crate) struct Suspicions {
    at: BTreeMap<NodeId, Arrival>,
}

impl Suspicions {
    /// Records when the suspicion of `node` now held (`held`, from the state) reached this
    /// replica: kept per suspected version, forgotten once none is held. Returns whether a
    /// suspicion (of a version) was new here.
    pub(crate) fn note(&mut self, now: Millis, node: NodeId, held: Option<(u64, u64)>) -> bool {
        match held {
            Some(v) => {
                let fresh = Arrival {
                    version: v,
                    at: now,
                    by: Vec::new(),
                };
                match self.at.get_mut(&node) {
                    Some(e) if e.version == v => false,
                    Some(e) => {
                        *e = fresh;
                        true
                    }
                    None => {
                        self.at.insert(node, fresh);
                        true
                    }
                }
            }
            None => {
                self.at.remove(&node);
                false
            }
        }
    }

    /// Notes that `by` suspected `version` of `node` (its own signed `Suspect`). Counts only
    /// for the version whose arrival is noted. Returns whether `by` is a new suspecter of it.
    pub(crate) fn confirm(&mut self, node: &NodeId, version: (u64, u64), by: NodeId) -> bool {
        if *node == by {
            return false;
        }
        match self.at.get_mut(node) {
            Some(e) if e.version == version && !e.by.contains(&by) => {
                if e.by.len() < MAX_SUSPECTERS {
                    e.by.push(by);
                }
                true
            }
            _ => false,
        }
    }

    /// Whether `by` suspected the version of `node` held here.
    pub(crate) fn suspected_by(&self, node: &NodeId, by: &NodeId) -> bool {
        self.at.get(node).is_some_and(|e| e.by.contains(by))
    }

    /// How many nodes confirmed the suspicion of `node` held here: the distinct suspecters
    /// beyond the first.
    pub(crate) fn confirmations(&self, node: &NodeId) -> usize {
        self.at
            .get(node)
            .map_or(0, |e| e.by.len().saturating_sub(1))
    }

    /// Whether a suspicion of `node` was noted.
    pub(crate) fn holds(&self, node: &NodeId) -> bool {
        self.at.contains_key(node)
    }

    /// When the suspicion of `id` that still holds in `state` reached this replica; `None`
    /// while `id` is not suspected, or once `id` was heard from directly since: a message
    /// from it is better evidence than another node's failed probe, and its own refutation
    /// may still be on the way.
    pub(crate) fn since(&self, state: &State, id: &NodeId) -> Option<Millis> {
        let v = state.suspicion(id)?;
        let at = match self.at.get(id) {
            Some(e) if e.version == v => e.at,
            // Merged without passing through `note` (cannot happen through the replica's
            // inputs): count it from the start, the cautious side.
            _ => Millis::MAX / 4,
        };
        if state.heard(id).is_some_and(|h| h > at) {
            return None;
        }
        Some(at)
    }

    /// Restarts every suspicion's countdown: called when this node hears the mesh again
    /// after a spell of isolation. What it suspected while cut off says more about the cut
    /// than about the peers, who get the full wait from now to refute it before their
    /// leases count as lost here.
    pub(crate) fn restart(&mut self, now: Millis) {
        for e in self.at.values_mut() {
            e.at = e.at.max(now);
        }
    }
}

/// Lifeguard's suspicion timeout: how long a suspicion that `confirmations` other nodes
/// confirmed, out of `expected`, waits before its suspect counts as gone: `max_ms` for none,
/// down to `min_ms` (or `max_ms`, if smaller) once `expected` confirmed, on a log scale.
pub(crate) fn suspicion_wait(
    max_ms: Millis,
    min_ms: Millis,
    expected: u8,
    confirmations: usize,
) -> Millis {
    let min_ms = min_ms.min(max_ms);
    if expected == 0 || confirmations == 0 {
        return max_ms;
    }
    let k = usize::from(expected);
    if confirmations >= k {
        return min_ms;
    }
    // Exact enough: `frac` is in (0, 1), and rounding up keeps the wait on the long side.
    let frac = ((confirmations + 1) as f64).ln() / ((k + 1) as f64).ln();
    let cut = ((max_ms - min_ms) as f64 * frac).floor() as Millis;
    max_ms.saturating_sub(cut).max(min_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId([b; 32])
    }

    #[test]
    fn a_lone_suspicion_waits_the_full_time() {
        assert_eq!(suspicion_wait(2_000, 800, 3, 0), 2_000);
        // No confirmations expected: always the full time.
        assert_eq!(suspicion_wait(2_000, 800, 0, 5), 2_000);
    }

    #[test]
    fn the_wait_shrinks_with_confirmations_down_to_the_floor() {
        let waits: Vec<Millis> = (0..=5).map(|c| suspicion_wait(2_000, 800, 3, c)).collect();
        // max - (max - min)·log(C + 1)/log(K + 1): 2,000, 1,400, ~1,049, 800, 800, 800.
        assert_eq!(waits[0], 2_000);
        assert_eq!(waits[1], 1_400);
        assert!((1_049..=1_050).contains(&waits[2]), "{waits:?}");
        assert_eq!(&waits[3..], &[800, 800, 800]);
        assert!(waits.windows(2).all(|w| w[0] >= w[1]), "{waits:?}");
    }

    #[test]
    fn the_floor_never_exceeds_the_full_wait() {
        assert_eq!(suspicion_wait(500, 800, 3, 3), 500);
        assert_eq!(suspicion_wait(500, 800, 3, 1), 500);
    }

    #[test]
    fn confirmations_count_distinct_suspecters_of_one_version() {
        let mut s = Suspicions::default();
        let x = id(9);
        assert!(s.note(10, x, Some((1, 4))));
        assert!(s.confirm(&x, (1, 4), id(1)));
        assert_eq!(
            s.confirmations(&x),
            0,
            "the first suspecter is no confirmation"
        );
        assert!(
            !s.confirm(&x, (1, 4), id(1)),
            "the same node twice counts once"
        );
        assert!(
            !s.confirm(&x, (1, 4), x),
            "the suspect cannot confirm itself"
        );
        assert!(
            !s.confirm(&x, (1, 3), id(2)),
            "an older version confirms nothing"
        );
        assert!(s.confirm(&x, (1, 4), id(2)));
        assert!(s.confirm(&x, (1, 4), id(3)));
        assert_eq!(s.confirmations(&x), 2);
        assert!(s.suspected_by(&x, &id(3)));
        // The same version noted again keeps its arrival and suspecters.
        assert!(!s.note(50, x, Some((1, 4))));
        assert_eq!(s.confirmations(&x), 2);
        // A newer version (the suspect refuted, then was suspected again) starts over.
        assert!(s.note(60, x, Some((1, 5))));
        assert_eq!(s.confirmations(&x), 0);
        assert!(!s.suspected_by(&x, &id(3)));
        s.note(70, x, None);
        assert!(!s.holds(&x));
    }
}
