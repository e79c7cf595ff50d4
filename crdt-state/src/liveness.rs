//! Local judgement of peers: when each was last heard, and how far away it is.
//!
//! Liveness is never replicated: each replica decides from when it saw a node's
//! `(incarnation, seq)` advance, on its own clock, so no clock sync is needed.

use omesh_protocol::Millis;

/// How a peer looks from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Health {
    /// Heard within `suspect_after_ms`.
    Alive,
    /// Not heard for a while; its leases still hold.
    Suspect,
    /// Not heard for `ttl + grace`, or it announced leaving: its leases are lost.
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
