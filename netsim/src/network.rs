//! Links: per-link latency, jitter, loss, duplication, reordering, uplink bandwidth and
//! partitions (one-way too). Everything random comes from the simulation's seeded generator.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::queue::{SimTime, US_PER_MS};
use crate::scenario::NetworkSpec;

/// A cut between one side and the rest.
#[derive(Debug, Clone)]
pub struct Partition {
    /// Fault index that made it, to lift it again.
    pub fault: usize,
    /// Nodes on the minority side, by index.
    pub side: Vec<bool>,
    /// Only messages from the side to the rest are dropped.
    pub one_way: bool,
}

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Dropped (loss or partition).
    Lost,
    /// Arrives at this time.
    Arrives(SimTime),
    /// Arrives twice.
    Twice(SimTime, SimTime),
}

/// The network.
#[derive(Debug)]
pub struct Network {
    spec: NetworkSpec,
    seed: u64,
    /// Loss raised by faults, in thousandths, by fault index.
    extra_loss: Vec<(usize, u32)>,
    partitions: Vec<Partition>,
    uplink_free: Vec<SimTime>,
}

impl Network {
    /// A network for `nodes` nodes.
    pub fn new(spec: NetworkSpec, seed: u64, nodes: usize) -> Self {
        Self {
            spec,
            seed,
            extra_loss: Vec::new(),
            partitions: Vec::new(),
            uplink_free: vec![0; nodes],
        }
    }

    /// Makes room for a node index added later (a new identity).
    pub fn add_node(&mut self) {
        self.uplink_free.push(0);
    }

    /// The base one-way latency of the link between `a` and `b` (same both ways), in µs.
    pub fn base_latency_us(&self, a: u32, b: u32) -> SimTime {
        let (lo, hi) = (a.min(b), a.max(b));
        let h = mix(self.seed ^ (u64::from(lo) << 32 | u64::from(hi)));
        let [min, max] = self.spec.latency_ms;
        let unit = (h >> 11) as f64 / (1u64 << 53) as f64;
        to_us(min + (max - min) * unit)
    }

    /// Whether `from` can send to `to` through every partition.
    pub fn reachable(&self, from: u32, to: u32) -> bool {
        let side = |p: &Partition, n: u32| {
            p.side
                .get(usize::try_from(n).unwrap_or(usize::MAX))
                .copied()
                .unwrap_or(false)
        };
        self.partitions.iter().all(|p| {
            let (a, b) = (side(p, from), side(p, to));
            a == b || (p.one_way && !a)
        })
    }

    /// Whether `node` is on the cut-off side of a partition in force (the minority, the side
    /// not heard in a one-way cut, or an isolated node).
    pub fn cut_off(&self, node: u32) -> bool {
        let i = usize::try_from(node).unwrap_or(usize::MAX);
        self.partitions
            .iter()
            .any(|p| p.side.get(i).copied().unwrap_or(false))
    }

    /// Starts a partition.
    pub fn cut(&mut self, p: Partition) {
        self.partitions.push(p);
    }

    /// Heals the partition made by fault `fault`.
    pub fn heal(&mut self, fault: usize) {
        self.partitions.retain(|p| p.fault != fault);
    }

    /// Raises loss everywhere while fault `fault` lasts.
    pub fn add_loss(&mut self, fault: usize, permille: u32) {
        self.extra_loss.push((fault, permille));
    }

    /// Ends the loss of fault `fault`.
    pub fn end_loss(&mut self, fault: usize) {
        self.extra_loss.retain(|(f, _)| *f != fault);
    }

    /// The loss in force, in thousandths.
    pub fn loss_permille(&self) -> u32 {
        self.extra_loss
            .iter()
            .map(|(_, p)| *p)
            .fold(self.spec.loss_permille, u32::max)
    }

    /// Forgets a crashed node's queued uplink.
    pub fn reset_uplink(&mut self, node: u32, now: SimTime) {
        if let Some(f) = self
            .uplink_free
            .get_mut(usize::try_from(node).unwrap_or(usize::MAX))
        {
            *f = now;
        }
    }

    /// Sends `bytes` from `from` to `to` at `now`: takes uplink time, then decides the fate.
    pub fn send(
        &mut self,
        rng: &mut ChaCha8Rng,
        now: SimTime,
        from: u32,
        to: u32,
        bytes: usize,
    ) -> Fate {
        let depart = self.take_uplink(now, from, bytes);
        if !self.reachable(from, to) {
            return Fate::Lost;
        }
        let loss = self.loss_permille();
        if loss > 0 && rng.gen_range(0..1000) < loss {
            return Fate::Lost;
        }
        let first = depart + self.one_way_us(rng, from, to);
        if self.spec.dup_permille > 0 && rng.gen_range(0..1000) < self.spec.dup_permille {
            let second = depart + self.one_way_us(rng, from, to);
            return Fate::Twice(first, second);
        }
        Fate::Arrives(first)
    }

    /// A copy whose fate does not matter (its receiver has the message already): it only
    /// takes uplink time.
    pub fn occupy(&mut self, now: SimTime, from: u32, bytes: usize) {
        self.take_uplink(now, from, bytes);
    }

    /// From now on nothing is lost: loss faults and base loss are lifted (the end of a run).
    pub fn lossless(&mut self) {
        self.extra_loss.clear();
        self.spec.loss_permille = 0;
        self.partitions.clear();
    }

    /// Occupies `from`'s uplink for `bytes`; returns when the last byte leaves.
    fn take_uplink(&mut self, now: SimTime, from: u32, bytes: usize) -> SimTime {
        let mbps = self.spec.bandwidth_mbps;
        let Some(free) = self
            .uplink_free
            .get_mut(usize::try_from(from).unwrap_or(usize::MAX))
        else {
            return now;
        };
        if mbps <= 0.0 {
            return now;
        }
        // bits / (Mbit/s) = µs.
        let wire_us = (bytes as f64 * 8.0 / mbps).ceil() as SimTime;
        let start = (*free).max(now);
        *free = start + wire_us;
        *free
    }

    fn one_way_us(&self, rng: &mut ChaCha8Rng, from: u32, to: u32) -> SimTime {
        let mut us = self.base_latency_us(from, to);
        if self.spec.jitter_ms > 0.0 {
            let u: f64 = rng.gen_range(f64::EPSILON..1.0);
            // Exponential tail, capped at ten means.
            us += to_us((-u.ln() * self.spec.jitter_ms).min(10.0 * self.spec.jitter_ms));
        }
        if self.spec.reorder_permille > 0 && rng.gen_range(0..1000) < self.spec.reorder_permille {
            us += to_us(self.spec.reorder_ms);
        }
        us
    }
}

fn to_us(ms: f64) -> SimTime {
    (ms.max(0.0) * US_PER_MS as f64).round() as SimTime
}

/// A 64-bit mixer for stable hashing of small keys: the workspace's one splitmix64.
pub fn mix(x: u64) -> u64 {
    omesh_state::digest::splitmix64(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn one_way_partition_drops_only_from_the_side() {
        let mut n = Network::new(NetworkSpec::default(), 1, 4);
        n.cut(Partition {
            fault: 0,
            side: vec![true, false, false, false],
            one_way: true,
        });
        assert!(!n.reachable(0, 1));
        assert!(n.reachable(1, 0));
        assert!(n.reachable(2, 3));
        n.heal(0);
        assert!(n.reachable(0, 1));
    }

    #[test]
    fn latency_is_symmetric_and_in_range() {
        let n = Network::new(NetworkSpec::default(), 9, 100);
        for a in 0..50 {
            let l = n.base_latency_us(a, a + 7);
            assert_eq!(l, n.base_latency_us(a + 7, a));
            assert!((5_000..=50_000).contains(&l));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut n = Network::new(NetworkSpec::default(), 9, 2);
        assert!(matches!(n.send(&mut rng, 0, 0, 1, 1_000), Fate::Arrives(t) if t >= 5_000));
    }
}
