//! omesh-netsim: a deterministic discrete-event simulator that drives the real
//! `omesh_state::Replica` for 10 to 10,000 nodes in one process, on simulated time.
//!
//! It owns the network model (latency, loss, duplication, reordering, bandwidth, partitions),
//! a gossipsub-shaped flood over a mesh of D peers, per-node clocks with drift, crashes and
//! restarts, a fake executor with the peer's per-instance guards, scenarios as TOML, invariant
//! checks and reports. It never reads the wall clock or an unseeded random source inside a
//! run: the same seed gives the same event trace hash. Wall-clock time is read only around a
//! run, to report its speed.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod clock;
pub mod conformance;
pub mod disconnect;
pub mod executor;
pub mod faults;
pub mod gossip;
pub mod guard;
pub mod invariants;
pub mod network;
pub mod plot;
pub mod propagation;
pub mod queue;
pub mod report;
pub mod scenario;
pub mod sim;
pub mod sweep;
mod transport;
pub mod verify;
pub mod workload;

use std::time::Instant;

pub use report::Outcome;
pub use scenario::{Scenario, ScenarioError};
pub use sim::Sim;

/// Runs `scenario` with `seed` to its end, checks every invariant and expectation, and
/// returns what was measured.
pub fn run(scenario: Scenario, seed: u64) -> Outcome {
    run_sim(scenario, seed).1
}

/// Like [`run`], and hands back the finished simulation too (instance log, nodes, replicas).
pub fn run_sim(scenario: Scenario, seed: u64) -> (Sim, Outcome) {
    let started = Instant::now();
    let end = sim::secs(scenario.duration_s);
    let mut sim = Sim::new(scenario, seed);
    sim.run_until(end);
    let mut violations = invariants::check_running(&sim);
    sim.freeze_and_drain();
    let (final_violations, tasks) = invariants::check_final(&sim);
    violations.extend(final_violations);
    let mut outcome = Outcome::collect(&sim, started.elapsed(), violations, tasks);
    outcome
        .violations
        .extend(expectations(&sim.scenario, &outcome));
    (sim, outcome)
}

/// The scenario's `[expect]` bounds that the outcome breaks.
pub fn expectations(s: &Scenario, o: &Outcome) -> Vec<invariants::Violation> {
    use report::pct;
    let mut out = Vec::new();
    let mut over = |name: &'static str, got: Option<f64>, limit: Option<f64>| {
        if let (Some(got), Some(limit)) = (got, limit) {
            if got > limit {
                out.push(invariants::Violation {
                    invariant: name,
                    detail: format!("{got:.0} ms is over the expected {limit:.0} ms"),
                });
            }
        }
    };
    let e = &s.expect;
    over(
        "expect.convergence_p99_ms",
        pct(&o.spread_ms(), 99.0),
        e.convergence_p99_ms,
    );
    over(
        "expect.failover_p99_ms",
        pct(&o.failover_ms, 99.0),
        e.failover_p99_ms,
    );
    over(
        "expect.max_duplicate_ms",
        pct(&o.duplicate_ms, 100.0),
        e.max_duplicate_ms,
    );
    over(
        "expect.max_outlived_lease_ms",
        pct(&o.outlived_ms, 100.0).or(Some(0.0)),
        e.max_outlived_lease_ms,
    );
    over(
        "expect.heal_converge_ms",
        Some(o.heal_converged_ms.unwrap_or(f64::INFINITY)),
        e.heal_converge_ms,
    );
    let d = &o.disconnect;
    for (p, key, limit) in [
        (
            disconnect::Policy::Default,
            "expect.max_duplicate_default_ms",
            e.max_duplicate_default_ms,
        ),
        (
            disconnect::Policy::StopAfter,
            "expect.max_duplicate_stop_after_ms",
            e.max_duplicate_stop_after_ms,
        ),
        (
            disconnect::Policy::LostAfter,
            "expect.max_duplicate_lost_after_ms",
            e.max_duplicate_lost_after_ms,
        ),
    ] {
        over(key, Some(d.of(p).max_duplicate_ms), limit);
    }
    over(
        "expect.minority_downtime_p99_ms",
        pct(&d.minority_downtime_ms, 99.0),
        e.minority_downtime_p99_ms,
    );
    if let Some(min) = e.min_long_drop_failover_ms {
        if let Some(first) = pct(&d.long_drop_failover_ms, 0.0).filter(|f| *f < min) {
            out.push(invariants::Violation {
                invariant: "expect.min_long_drop_failover_ms",
                detail: format!(
                    "a lost_after task failed over {first:.0} ms after its owner dropped, sooner than the expected {min:.0} ms"
                ),
            });
        }
    }
    let counts = [
        (
            "expect.max_majority_stops",
            "stop_after instances stopped off any minority side",
            d.majority_stops,
            e.max_majority_stops,
        ),
        (
            "expect.max_short_drop_failovers",
            "lost_after failovers during drops shorter than the window",
            d.short_drop_failovers,
            e.max_short_drop_failovers,
        ),
        (
            "expect.max_long_drops_kept",
            "lost_after drops at least as long as the window without a failover",
            d.long_drops - d.long_drop_failover_ms.len(),
            e.max_long_drops_kept,
        ),
    ];
    for (key, what, got, limit) in counts {
        if let Some(limit) = limit.filter(|l| got > *l) {
            out.push(invariants::Violation {
                invariant: key,
                detail: format!("{got} {what}, expected at most {limit}"),
            });
        }
    }
    if let Some(min) = e.min_failovers {
        if o.failover_ms.len() < min {
            out.push(invariants::Violation {
                invariant: "expect.min_failovers",
                detail: format!(
                    "{} failovers measured, expected at least {min}",
                    o.failover_ms.len()
                ),
            });
        }
    }
    if let Some(min) = e.min_succeeded_permille {
        // A task still running with a live instance at the end has not failed (the no-lost
        // invariant checks it): the share is of the tasks that are no longer running.
        let done = o.tasks.accepted.saturating_sub(o.tasks.running);
        let got = (o.tasks.succeeded * 1000).checked_div(done).unwrap_or(1000);
        if got < min as usize {
            out.push(invariants::Violation {
                invariant: "expect.min_succeeded_permille",
                detail: format!(
                    "{got}‰ of the accepted tasks not still running succeeded, expected at least {min}‰"
                ),
            });
        }
    }
    out
}
