//! The seed sweep: one scenario over many seeds, reporting every invariant break with the
//! seed that reproduces it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::disconnect::DisconnectFigures;
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
    /// Events processed over the sweep.
    pub events: u64,
    /// The disconnect-policy figures of every run, merged.
    pub disconnect: DisconnectFigures,
    /// Ticks after which a replica asked for a wake already past, over every run.
    pub stale_wakes: u64,
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
                r.disconnect.merge(&o.disconnect);
                r.stale_wakes += o.stale_wakes;
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
    // Merged in the order runs finished: sorted, the figures do not depend on the threads.
    r.disconnect.minority_downtime_ms.sort_by(f64::total_cmp);
    r.disconnect.long_drop_failover_ms.sort_by(f64::total_cmp);
    r
}

/// The disconnect-policy table of a sweep over several scenarios: per scenario and policy,
/// the worst duplicate-run window, the `stop_after` tasks' minority-side downtime and the
/// `lost_after` tasks' failovers by drop length.
pub fn policy_table(rows: &[(String, u64, &SweepResult)]) -> String {
    use std::fmt::Write as _;

    use crate::disconnect::Policy;
    use crate::report::ms_str;
    let mut out = String::from(
        "| scenario | seeds | policy | tasks | ran twice | worst duplicate window | stopped on a minority side (elsewhere) | minority downtime p50 / p99 / max (not restarted) | lost_after drops < window: failed over | drops >= window: failed over (after p50 / min) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, seeds, r) in rows {
        let d = &r.disconnect;
        for p in Policy::ALL {
            let runs = d.of(p);
            if runs.tasks == 0 {
                continue;
            }
            let dash = || "–".to_owned();
            let (stops, down) = if p == Policy::StopAfter {
                (
                    format!("{} ({})", d.minority_downtime_ms.len(), d.majority_stops),
                    format!(
                        "{} / {} / {} ({})",
                        ms_str(pct(&d.minority_downtime_ms, 50.0)),
                        ms_str(pct(&d.minority_downtime_ms, 99.0)),
                        ms_str(pct(&d.minority_downtime_ms, 100.0)),
                        d.minority_not_restarted
                    ),
                )
            } else {
                (dash(), dash())
            };
            let (short, long) = if p == Policy::LostAfter {
                (
                    format!("{} of {}", d.short_drop_failovers, d.short_drops),
                    format!(
                        "{} of {} ({} / {})",
                        d.long_drop_failover_ms.len(),
                        d.long_drops,
                        ms_str(pct(&d.long_drop_failover_ms, 50.0)),
                        ms_str(pct(&d.long_drop_failover_ms, 0.0))
                    ),
                )
            } else {
                (dash(), dash())
            };
            let _ = writeln!(
                out,
                "| {name} | {seeds} | {} | {} | {} | {} | {stops} | {down} | {short} | {long} |",
                p.name(),
                runs.tasks,
                runs.ran_twice,
                ms_str(Some(runs.max_duplicate_ms)),
            );
        }
    }
    out
}
