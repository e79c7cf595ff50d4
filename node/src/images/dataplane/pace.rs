//! A cap on the bytes per second a node serves to all peers together, so that handing out
//! images does not fill an edge host's uplink. Generic cell rate: each chunk moves a
//! theoretical finish time on by `len / rate`; a chunk waits while that time is more than
//! [`BURST`] ahead of now.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How far ahead of the rate the sender may run (absorbs timer and scheduling jitter).
const BURST: Duration = Duration::from_millis(50);

/// Paces served bytes to a rate, shared by every connection of the endpoint.
#[derive(Debug)]
pub struct Pacer {
    bytes_per_sec: u64,
    /// When the bytes let through so far would have finished at the rate.
    finish: Mutex<Instant>,
}

impl Pacer {
    /// A pacer for `bytes_per_sec`, or none for 0 (no cap).
    pub fn new(bytes_per_sec: u64) -> Option<Arc<Self>> {
        (bytes_per_sec > 0).then(|| {
            Arc::new(Self {
                bytes_per_sec,
                finish: Mutex::new(Instant::now()),
            })
        })
    }

    /// The cap, bytes per second.
    pub fn rate(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Waits until `n` more bytes may go out.
    pub async fn take(&self, n: u64) {
        let wait = {
            let mut finish = self.finish.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let start = (*finish).max(now);
            let cost = Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
            *finish = start + cost;
            finish.saturating_duration_since(now + BURST)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn no_cap_is_no_pacer() {
        assert!(Pacer::new(0).is_none());
        assert_eq!(Pacer::new(5).map(|p| p.rate()), Some(5));
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_go_out_at_the_rate_shared_by_all_senders() {
        let pacer = Pacer::new(10 << 20).unwrap();
        let start = Instant::now();
        let mut senders = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let p = Arc::clone(&pacer);
            senders.spawn(async move {
                for _ in 0..10 {
                    p.take(1 << 20).await;
                }
            });
        }
        while senders.join_next().await.is_some() {}
        // 40 MiB at 10 MiB/s: 4 s of (paused, so exact) time, less the burst allowance.
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(4) - BURST, "{took:?}");
        assert!(took <= Duration::from_secs(4), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_pacer_does_not_bank_credit() {
        let pacer = Pacer::new(1 << 20).unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        for _ in 0..3 {
            pacer.take(1 << 20).await;
        }
        // A minute idle buys no burst: the 3rd MiB waits for ~2 s.
        assert!(start.elapsed() >= Duration::from_secs(2) - BURST);
    }
}
