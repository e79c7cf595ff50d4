//! The seed sweep: one scenario over many seeds, reporting every invariant break with the
//! seed that reproduces it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::invariants::Violation;
use crate::report::{pct, Outcome};
use crate::scenario::Scenario;

/// What a sweep found.
#[derive(Debug, Default)]
pub struct SweepResult {
    /// Seeds run.
    pub runs: u64,
    /// Per failing seed, what broke.
    pub breaks: Vec<(u64, Vec<Violation>)>,
    /// Worst p99 spread over all seeds, ms.
    pub worst_spread_p99_ms: f64,
    /// Worst failover over all seeds, ms.
    pub worst_failover_ms: f64,
    /// Worst duplicate-run window over all seeds, ms.
    pub worst_duplicate_ms: f64,
    /// Simulated seconds per wall second, over the sweep.
    pub events: u64,
}

/// Runs `scenario` for seeds `first..first + count` on `jobs` threads; `progress` is called
/// after each run (from any thread).
pub fn sweep(
    scenario: &Scenario,
    first: u64,
    count: u64,
    jobs: usize,
    progress: &(dyn Fn(&Outcome) + Sync),
) -> SweepResult {
    let next = AtomicU64::new(first);
    let result = Mutex::new(SweepResult::default());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= first + count {
                    return;
                }
                let o = crate::run(scenario.clone(), seed);
                progress(&o);
                let Ok(mut r) = result.lock() else {
                    return;
                };
                r.runs += 1;
                r.events += o.events;
                r.worst_spread_p99_ms = r
                    .worst_spread_p99_ms
                    .max(pct(&o.spread_ms(), 99.0).unwrap_or(0.0));
                r.worst_failover_ms = r
                    .worst_failover_ms
                    .max(pct(&o.failover_ms, 100.0).unwrap_or(0.0));
                r.worst_duplicate_ms = r
                    .worst_duplicate_ms
                    .max(pct(&o.duplicate_ms, 100.0).unwrap_or(0.0));
                if !o.violations.is_empty() {
                    r.breaks.push((seed, o.violations));
                }
            });
        }
    });
    let mut r = result.into_inner().unwrap_or_default();
    r.breaks.sort_by_key(|(seed, _)| *seed);
    r
}
