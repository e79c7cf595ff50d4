//! The event queue: one queue of `Scheduled { at, seq, ev }`, popped in `(at, seq)` order.
//!
//! A calendar of one-millisecond buckets over a ring of a few seconds, with a heap for the
//! current bucket and one for the far future. Pushing is O(1) for the near future, where
//! almost every network delivery lands; the order is exactly that of one binary heap keyed by
//! `(at, seq)`, so the simulation stays deterministic.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Simulated time in microseconds since the start of the run.
pub type SimTime = u64;

/// Microseconds per millisecond.
pub const US_PER_MS: u64 = 1_000;

/// Buckets in the ring: events due within this many milliseconds skip the heaps.
const RING_MS: u64 = 8_192;

/// One event due at `at`; `seq` breaks ties in the order events were scheduled.
#[derive(Debug)]
pub struct Scheduled<E> {
    /// When it is due.
    pub at: SimTime,
    /// Scheduling order, unique per queue.
    pub seq: u64,
    /// The event.
    pub ev: E,
}

impl<E> PartialEq for Scheduled<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<E> Eq for Scheduled<E> {}
impl<E> PartialOrd for Scheduled<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Scheduled<E> {
    /// Reversed, so that `BinaryHeap` pops the earliest event first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The queue.
#[derive(Debug)]
pub struct EventQueue<E> {
    now: SimTime,
    seq: u64,
    /// The millisecond bucket being drained.
    cur_ms: u64,
    current: BinaryHeap<Scheduled<E>>,
    ring: Vec<Vec<Scheduled<E>>>,
    in_ring: usize,
    far: BinaryHeap<Scheduled<E>>,
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E> EventQueue<E> {
    /// An empty queue at time 0.
    pub fn new() -> Self {
        Self {
            now: 0,
            seq: 0,
            cur_ms: 0,
            current: BinaryHeap::new(),
            ring: (0..RING_MS).map(|_| Vec::new()).collect(),
            in_ring: 0,
            far: BinaryHeap::new(),
        }
    }

    /// The time of the last popped event.
    pub fn now(&self) -> SimTime {
        self.now
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.current.len() + self.in_ring + self.far.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Schedules `ev` at `at`; a time in the past is moved to now.
    pub fn push(&mut self, at: SimTime, ev: E) {
        let at = at.max(self.now);
        self.seq += 1;
        let item = Scheduled {
            at,
            seq: self.seq,
            ev,
        };
        let ms = at / US_PER_MS;
        if ms <= self.cur_ms {
            self.current.push(item);
        } else if ms < self.cur_ms + RING_MS {
            self.ring[ring_slot(ms)].push(item);
            self.in_ring += 1;
        } else {
            self.far.push(item);
        }
    }

    /// The earliest event, in `(at, seq)` order.
    pub fn pop(&mut self) -> Option<Scheduled<E>> {
        loop {
            if let Some(item) = self.current.pop() {
                self.now = item.at;
                return Some(item);
            }
            if self.in_ring == 0 {
                // Nothing near: jump straight to the far future.
                let next = self.far.peek()?.at / US_PER_MS;
                self.cur_ms = next.max(self.cur_ms + 1);
            } else {
                self.cur_ms += 1;
            }
            let bucket = std::mem::take(&mut self.ring[ring_slot(self.cur_ms)]);
            self.in_ring -= bucket.len();
            self.current = BinaryHeap::from(bucket);
            while self
                .far
                .peek()
                .is_some_and(|f| f.at / US_PER_MS <= self.cur_ms)
            {
                if let Some(f) = self.far.pop() {
                    self.current.push(f);
                }
            }
        }
    }

    /// Moves the clock to `t` when nothing is due before it (after [`Self::pop_until`] of
    /// `t` returned `None`), so a driver stepping through quiet time sees it pass.
    pub fn advance_to(&mut self, t: SimTime) {
        self.now = self.now.max(t);
    }

    /// The earliest event if it is due at or before `limit`.
    pub fn pop_until(&mut self, limit: SimTime) -> Option<Scheduled<E>> {
        let before = self.now;
        let item = self.pop()?;
        if item.at <= limit {
            return Some(item);
        }
        // Put it back: same `(at, seq)`, so the order is unchanged.
        self.current.push(item);
        self.now = before;
        None
    }
}

fn ring_slot(ms: u64) -> usize {
    usize::try_from(ms % RING_MS).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn pops_in_the_order_of_one_heap() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut q = EventQueue::new();
        let mut reference = BinaryHeap::new();
        let mut seq = 0u64;
        let mut out = Vec::new();
        let mut expect = Vec::new();
        for round in 0..2_000u64 {
            for _ in 0..rng.gen_range(0..5) {
                let far = rng.gen_bool(0.05);
                let dt = if far {
                    rng.gen_range(0..30_000_000)
                } else {
                    rng.gen_range(0..50_000)
                };
                let at = q.now() + dt;
                seq += 1;
                q.push(at, round);
                reference.push(Scheduled { at, seq, ev: round });
            }
            if let Some(a) = q.pop() {
                out.push((a.at, a.ev));
                let b = reference.pop().map(|b| (b.at, b.ev));
                expect.push(b.unwrap_or_default());
            }
        }
        while let Some(a) = q.pop() {
            out.push((a.at, a.ev));
        }
        while let Some(b) = reference.pop() {
            expect.push((b.at, b.ev));
        }
        assert_eq!(out, expect);
    }
}
