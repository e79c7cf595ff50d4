//! Local judgement of peers: whether each is alive, suspected or gone, and how far away it is.
//!
//! What a peer's health rests on is replicated: its record (which says whether it is
//! leaving) and the suspicions gossiped by the nodes that probed it (`probe.rs`). The
//! judgement is not: each replica counts a suspicion from when it reached it, on its own
//! clock (`suspicion.rs`), and calls the peer Gone once the suspicion has held for the lease
//! ttl plus a grace (the configured `lease_grace_ms` or the RTT-adaptive timeout to that
//! peer, whichever is longer) with nothing heard from the peer since. No clock sync is needed.

use std::collections::BTreeMap;

use omesh_protocol::{Millis, NodeId, NodeRecord};

use crate::config::ReplicaConfig;
use crate::merge::State;
use crate::suspicion::Suspicions;

/// How a peer looks from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Health {
    /// Not suspected (or heard from directly since the suspicion reached this node).
    Alive,
    /// Suspected for less than `lease_ttl_ms` + grace: its leases still hold.
    Suspect,
    /// Suspected for longer than `lease_ttl_ms` + grace, or it announced leaving, or it is not
    /// known here: its leases are lost.
    Gone,
}

impl Health {
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Alive => "alive",
            Self::Suspect => "suspect",
            Self::Gone => "gone",
        }
    }
}

/// Smoothed RTT and its variation (RFC 6298), in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RttEstimate {
    /// Smoothed RTT.
    pub srtt_us: u64,
    /// RTT variation.
    pub rttvar_us: u64,
    /// Samples taken.
    pub samples: u64,
}

impl RttEstimate {
    /// Folds in one sample.
    pub fn observe(&mut self, rtt_us: u64) {
        if self.samples == 0 {
            self.srtt_us = rtt_us;
            self.rttvar_us = rtt_us / 2;
        } else {
            let diff = self.srtt_us.abs_diff(rtt_us);
            self.rttvar_us = (3 * self.rttvar_us + diff) / 4;
            self.srtt_us = (7 * self.srtt_us + rtt_us) / 8;
        }
        self.samples = self.samples.saturating_add(1);
    }

    /// SRTT + 4·RTTVAR, in milliseconds, rounded up.
    pub fn timeout_ms(&self) -> Millis {
        (self.srtt_us + 4 * self.rttvar_us).div_ceil(1000)
    }

    /// SRTT in milliseconds, rounded up.
    pub fn srtt_ms(&self) -> u32 {
        u32::try_from(self.srtt_us.div_ceil(1000)).unwrap_or(u32::MAX)
    }
}

/// The parts of a replica that judge a peer's health, borrowed together so the judgement can
/// be made while other parts (the prober, the random source) are borrowed mutably.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Judge<'a> {
    pub(crate) cfg: &'a ReplicaConfig,
    pub(crate) state: &'a State,
    pub(crate) me: &'a NodeRecord,
    pub(crate) suspicions: &'a Suspicions,
    pub(crate) rtt: &'a BTreeMap<NodeId, RttEstimate>,
}

impl Judge<'_> {
    /// How a node looks from here, now.
    pub(crate) fn health(&self, now: Millis, id: &NodeId) -> Health {
        if *id == self.me.id {
            return self.own_health();
        }
        match self.state.node(id) {
            None => Health::Gone,
            Some(r) => self.health_of(now, r),
        }
    }

    /// This node's own health: alive until it leaves.
    fn own_health(&self) -> Health {
        if self.me.leaving {
            Health::Gone
        } else {
            Health::Alive
        }
    }

    /// [`Judge::health`] of a held record, without looking it up.
    pub(crate) fn health_of(&self, now: Millis, rec: &NodeRecord) -> Health {
        let id = &rec.id;
        if *id == self.me.id {
            return self.own_health();
        }
        if rec.leaving || self.state.is_revoked(id) {
            // A revoked node is out for good, as if it had left; its leases lapse ttl + grace
            // after the revocation reached this replica (`Suspicions::since`), by
            // when its guards have ended its instances.
            return Health::Gone;
        }
        match self.suspected_since(id) {
            None => Health::Alive,
            Some(at) if now <= at.saturating_add(self.cfg.lease_ttl_ms + self.grace_ms(id)) => {
                Health::Suspect
            }
            Some(_) => Health::Gone,
        }
    }

    /// When the suspicion of `id` that still holds reached this replica (see
    /// [`Suspicions::since`]).
    pub(crate) fn suspected_since(&self, id: &NodeId) -> Option<Millis> {
        self.suspicions.since(self.state, id)
    }

    /// The grace past a lease's ttl before it counts as lost: the configured floor or the
    /// RTT-adaptive SRTT + 4·RTTVAR, whichever is longer.
    pub(crate) fn grace_ms(&self, id: &NodeId) -> Millis {
        let adaptive = self.rtt.get(id).map_or(0, RttEstimate::timeout_ms);
        self.cfg.lease_grace_ms.max(adaptive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtt_estimate_follows_rfc6298() {
        let mut r = RttEstimate::default();
        r.observe(10_000);
        assert_eq!((r.srtt_us, r.rttvar_us), (10_000, 5_000));
        assert_eq!(r.timeout_ms(), 30);
        r.observe(18_000);
        assert_eq!(r.rttvar_us, (3 * 5_000 + 8_000) / 4);
        assert_eq!(r.srtt_us, (7 * 10_000 + 18_000) / 8);
    }
}
