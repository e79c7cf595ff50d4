//! Per-node clocks: a node's `now` is simulated time shifted by an offset and scaled by a rate
//! error, so replicas that compare their own readings see drift exactly as real hosts would.

use omesh_protocol::Millis;

use crate::queue::{SimTime, US_PER_MS};

/// Every local clock starts this far from zero, so negative offsets stay positive.
const BASE_MS: i64 = 1_000_000;

/// One node's clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clock {
    /// Offset from simulated time, in microseconds.
    pub offset_us: i64,
    /// Rate error in parts per million (100 = runs 0.01% fast).
    pub drift_ppm: i64,
}

impl Clock {
    /// The node's reading at simulated time `t`, in milliseconds.
    pub fn local_ms(&self, t: SimTime) -> Millis {
        let t = i128::from(t);
        let us = t + i128::from(self.offset_us) + t * i128::from(self.drift_ppm) / 1_000_000;
        let ms = i128::from(BASE_MS) + us.div_euclid(i128::from(US_PER_MS));
        u64::try_from(ms.max(0)).unwrap_or(u64::MAX)
    }

    /// The earliest simulated time, not before `now`, at which the reading reaches `local`.
    pub fn sim_at(&self, local: Millis, now: SimTime) -> SimTime {
        if self.local_ms(now) >= local {
            return now;
        }
        let target_us = (i128::from(local) - i128::from(BASE_MS)) * i128::from(US_PER_MS)
            - i128::from(self.offset_us);
        let scale = 1_000_000 + i128::from(self.drift_ppm);
        let guess = (target_us * 1_000_000).div_euclid(scale.max(1)) - 2;
        let mut t = u64::try_from(guess.max(0))
            .unwrap_or(SimTime::MAX / 2)
            .max(now);
        // The guess is within a few microseconds; walk up to the first exact one.
        while self.local_ms(t) < local {
            t += 1;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_at_inverts_local_ms() {
        for (offset_us, drift_ppm) in [
            (0, 0),
            (-500_000, 0),
            (499_000, 0),
            (-1_234, -800),
            (77, 900),
        ] {
            let c = Clock {
                offset_us,
                drift_ppm,
            };
            for now in [0u64, 5_000, 1_000_000, 600_000_000] {
                let local = c.local_ms(now) + 1_234;
                let t = c.sim_at(local, now);
                assert!(c.local_ms(t) >= local);
                assert!(t == now || c.local_ms(t - 1) < local);
            }
        }
    }
}
