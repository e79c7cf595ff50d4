//! The outcome of one run and its report table.

use std::fmt::Write as _;
use std::time::Duration;

use crate::disconnect::DisconnectFigures;
use crate::guard::GuardKills;
use crate::invariants::{TaskOutcome, Violation};
use crate::propagation::Kind;
use crate::sim::{Sim, Traffic};
use omesh_state::Replica;

/// Everything measured in one run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Scenario name.
    pub scenario: String,
    /// The seed.
    pub seed: u64,
    /// Nodes at start.
    pub nodes: u32,
    /// Nodes up at the end.
    pub nodes_up: usize,
    /// Simulated seconds.
    pub sim_s: f64,
    /// Wall-clock time of the run.
    pub wall: Duration,
    /// Of which forming the mesh before time 0 (`formed = true`).
    pub formed_in: Option<Duration>,
    /// Events processed.
    pub events: u64,
    /// Trace hash.
    pub trace: u64,
    /// Spread of sampled heartbeat deltas to every live node, in ms.
    pub spread_heartbeat_ms: Vec<f64>,
    /// Spread of sampled task deltas, in ms.
    pub spread_task_ms: Vec<f64>,
    /// Samples abandoned (origin crashed) and still outstanding at the end.
    pub spread_abandoned: usize,
    /// Samples outstanding at the end.
    pub spread_unfinished: usize,
    /// Catch-up time after the last heal, in ms.
    pub heal_converged_ms: Option<f64>,
    /// Owner crash to running elsewhere, in ms.
    pub failover_ms: Vec<f64>,
    /// Per crash whose tasks moved: how many moved, and the most one node took.
    pub herds: Vec<(usize, usize)>,
    /// The most instances that ran on one node at once.
    pub peak_per_node: usize,
    /// Instance starts that left their node over its CPU threshold, and of those, the ones
    /// that found it under before.
    pub over_threshold: (u64, u64),
    /// Distinct (task, epoch) instances that started: claims beyond these were handed back
    /// or lost a same-epoch race.
    pub epochs_started: usize,
    /// Per task that ran twice at once, the time it did, in ms.
    pub duplicate_ms: Vec<f64>,
    /// Per instance that outlived its lease (still running when a later epoch of its task
    /// started on another node), by how long, in ms.
    pub outlived_ms: Vec<f64>,
    /// Per disconnect policy: duplicate runs, minority-side downtime, dropouts.
    pub disconnect: DisconnectFigures,
    /// Task outcomes.
    pub tasks: TaskOutcome,
    /// Traffic.
    pub traffic: Traffic,
    /// Traffic over the scenario's idle window and its node-seconds, if it has one.
    pub idle: Option<(Traffic, f64)>,
    /// Node-seconds of uptime.
    pub node_seconds: f64,
    /// Crashes applied.
    pub crashes: u64,
    /// Whether the per-instance guards were modelled (`[guard] enabled`).
    pub guard: bool,
    /// Instances killed by their guard at the deadline.
    pub guard_expiries: GuardKills,
    /// Ticks after which a replica still asked to be woken no later than the tick (a peer
    /// would spin on each until its clock moved on).
    pub stale_wakes: u64,
    /// Summed over the replicas up at the end: node records published, suspicions raised,
    /// suspicions refuted, task claims made.
    pub membership: (u64, u64, u64, u64),
    /// Peak resident memory of the process, in MiB (Linux only).
    pub peak_rss_mib: Option<f64>,
    /// Broken invariants and expectations.
    pub violations: Vec<Violation>,
}

impl Outcome {
    /// Collects the measurements of a finished simulation.
    pub fn collect(
        sim: &Sim,
        wall: Duration,
        violations: Vec<Violation>,
        tasks: TaskOutcome,
    ) -> Self {
        let ms = |us: u64| us as f64 / 1_000.0;
        let spread = |k: Kind| {
            sim.tracker
                .done
                .iter()
                .filter(|(kind, _)| *kind == k)
                .map(|(_, us)| ms(*us))
                .collect::<Vec<f64>>()
        };
        let end = sim.end_time();
        let duplicate_ms = sim
            .runs
            .tasks()
            .map(|t| sim.runs.duplicate_window(t, end))
            .filter(|w| *w > 0)
            .map(ms)
            .collect();
        let outlived_ms = sim
            .runs
            .tasks()
            .flat_map(|t| sim.runs.outlived_leases(t, end))
            .map(ms)
            .collect();
        Self {
            scenario: sim.scenario.name.clone(),
            seed: sim.seed,
            nodes: sim.scenario.nodes,
            nodes_up: sim.up_nodes().count(),
            sim_s: sim.scenario.duration_s,
            wall,
            formed_in: sim.formed_in,
            events: sim.events,
            trace: sim.trace,
            spread_heartbeat_ms: spread(Kind::Heartbeat),
            spread_task_ms: spread(Kind::Task),
            spread_abandoned: sim.tracker.abandoned,
            spread_unfinished: sim.tracker.outstanding(),
            heal_converged_ms: sim.heal_converged_us.map(ms),
            failover_ms: sim.runs.failovers.iter().map(|us| ms(*us)).collect(),
            herds: sim.runs.herds(),
            peak_per_node: sim.runs.peak_per_node(),
            over_threshold: sim.runs.over_threshold,
            epochs_started: sim
                .runs
                .instances
                .iter()
                .map(|i| (i.task, i.epoch))
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            duplicate_ms,
            outlived_ms,
            disconnect: DisconnectFigures::collect(sim),
            tasks,
            traffic: sim.traffic,
            idle: sim.idle.map(|(t, us)| (t, us as f64 / 1e6)),
            node_seconds: sim.node_us as f64 / 1e6,
            crashes: sim.crashes,
            guard: sim.scenario.guard.enabled,
            guard_expiries: sim.guard_expiries,
            stale_wakes: sim.stale_wakes,
            membership: sim
                .nodes
                .iter()
                .filter_map(|n| n.replica.as_ref())
                .map(Replica::stats)
                .fold((0, 0, 0, 0), |(p, s, r, c), st| {
                    (
                        p + st.records_published,
                        s + st.suspicions,
                        r + st.refutations,
                        c + st.claims,
                    )
                }),
            peak_rss_mib: peak_rss_mib(),
            violations,
        }
    }

    /// Every spread sample, heartbeats and task deltas together.
    pub fn spread_ms(&self) -> Vec<f64> {
        let mut all = self.spread_heartbeat_ms.clone();
        all.extend_from_slice(&self.spread_task_ms);
        all
    }

    /// The report table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mut row = |k: &str, val: String| {
            let _ = writeln!(s, "| {k:<24} | {val} |");
        };
        let spread = self.spread_ms();
        let wall = self.wall.as_secs_f64();
        let per = |x: u64| x as f64 / self.node_seconds.max(1e-9);
        let t = &self.traffic;
        row(
            "scenario",
            format!(
                "{} (seed {}, {} nodes, {} up at the end, {:.0} s simulated)",
                self.scenario, self.seed, self.nodes, self.nodes_up, self.sim_s
            ),
        );
        row("convergence p50 / p99", format!("{} / {} (max {}; n = {}: {} heartbeats, {} task deltas; {} abandoned, {} unfinished)",
            ms_str(pct(&spread, 50.0)), ms_str(pct(&spread, 99.0)), ms_str(pct(&spread, 100.0)), spread.len(),
            self.spread_heartbeat_ms.len(), self.spread_task_ms.len(), self.spread_abandoned, self.spread_unfinished));
        row(
            "  task deltas p50 / p99",
            format!(
                "{} / {}",
                ms_str(pct(&self.spread_task_ms, 50.0)),
                ms_str(pct(&self.spread_task_ms, 99.0))
            ),
        );
        row(
            "catch-up after last heal",
            self.heal_converged_ms
                .map_or_else(|| "not reached".to_owned(), |m| ms_str(Some(m))),
        );
        row(
            "failover p50 / p99",
            format!(
                "{} / {} (max {}; n = {})",
                ms_str(pct(&self.failover_ms, 50.0)),
                ms_str(pct(&self.failover_ms, 99.0)),
                ms_str(pct(&self.failover_ms, 100.0)),
                self.failover_ms.len()
            ),
        );
        let herd = self
            .herds
            .iter()
            .filter(|(n, _)| *n > 1)
            .max_by_key(|(n, most)| (most * 1000 / n, *n));
        row(
            "failover spread",
            herd.map_or_else(
                || "no crash moved more than one task".to_owned(),
                |(n, most)| {
                    format!(
                        "worst crash: {most} of its {n} moved tasks went to one node ({} crashes moved tasks)",
                        self.herds.len()
                    )
                },
            ),
        );
        row(
            "placement",
            format!(
                "at most {} instances on one node at once; {} starts left a node over its CPU threshold ({} pushed it over)",
                self.peak_per_node, self.over_threshold.0, self.over_threshold.1
            ),
        );
        row(
            "duplicate-run window",
            format!(
                "max {} (p99 {}; {} tasks ran twice at once)",
                ms_str(pct(&self.duplicate_ms, 100.0).or(Some(0.0))),
                ms_str(pct(&self.duplicate_ms, 99.0).or(Some(0.0))),
                self.duplicate_ms.len()
            ),
        );
        row(
            "outlived their lease",
            format!(
                "{} instances (max {}): still running when a later epoch started elsewhere",
                self.outlived_ms.len(),
                ms_str(pct(&self.outlived_ms, 100.0).or(Some(0.0)))
            ),
        );
        row(
            "guard kills",
            if self.guard {
                let k = &self.guard_expiries;
                format!(
                    "{} instances killed at their deadline ({} running, {} still starting; {} on a node a cut set apart, {} elsewhere)",
                    k.total,
                    k.running,
                    k.total - k.running,
                    k.cut_off,
                    k.total - k.cut_off
                )
            } else {
                "guards not modelled ([guard] enabled = false)".to_owned()
            },
        );
        if self.disconnect.any_policy() {
            for (p, line) in self.disconnect.lines() {
                row(&format!("policy {}", p.name()), line);
            }
        }
        let o = &self.tasks;
        row("tasks", format!("{} submitted, {} accepted: {} succeeded, {} failed, {} cancelled, {} running, {} pending with a reason, {} in progress, {} lost",
            o.submitted, o.accepted, o.succeeded, o.failed, o.cancelled, o.running, o.pending_with_reason, o.pending_in_progress, o.lost));
        row(
            "messages / node / s",
            format!(
                "{:.1} (gossip {:.1}, of which duplicates {:.1}; sync {:.2}; probes {:.2})",
                per(t.messages()),
                per(t.gossip_msgs),
                per(t.gossip_dups),
                per(t.sync_requests + t.sync_replies),
                per(t.probe_msgs)
            ),
        );
        row(
            "bytes / node / s",
            format!(
                "{} (gossip {}, sync {}, probes {})",
                bytes_str(per(t.bytes())),
                bytes_str(per(t.gossip_bytes)),
                bytes_str(per(t.sync_bytes)),
                bytes_str(per(t.probe_bytes))
            ),
        );
        if let Some((t, node_s)) = &self.idle {
            let per = |x: u64| x as f64 / node_s.max(1e-9);
            row(
                "idle window / node / s",
                format!(
                    "{:.1} messages, {} (gossip {}, sync {}, probes {})",
                    per(t.messages()),
                    bytes_str(per(t.bytes())),
                    bytes_str(per(t.gossip_bytes)),
                    bytes_str(per(t.sync_bytes)),
                    bytes_str(per(t.probe_bytes))
                ),
            );
        }
        if self.stale_wakes > 0 {
            row(
                "wakes already past",
                format!(
                    "{} ticks after which the replica still asked to be woken no later than the tick (a peer spins on each until its clock moves on)",
                    self.stale_wakes
                ),
            );
        }
        let (published, suspected, refuted, claims) = self.membership;
        row(
            "membership (live nodes)",
            format!(
                "{published} records published, {suspected} suspicions raised, {refuted} refuted; {claims} task claims ({} epochs started)",
                self.epochs_started
            ),
        );
        row(
            "lost messages",
            format!("{} ({} crashes/restarts applied)", t.lost, self.crashes),
        );
        row(
            "simulation",
            format!(
                "{:.2} s wall{}, {:.2}x real time, {:.2} M events ({:.2} M/s){}",
                wall,
                self.formed_in.map_or_else(String::new, |f| format!(
                    " (of which {:.2} s forming the mesh)",
                    f.as_secs_f64()
                )),
                self.sim_s / wall.max(1e-9),
                self.events as f64 / 1e6,
                self.events as f64 / 1e6 / wall.max(1e-9),
                self.peak_rss_mib
                    .map_or_else(String::new, |m| format!(", peak RSS {m:.0} MiB"))
            ),
        );
        row("trace hash", format!("{:016x}", self.trace));
        if self.violations.is_empty() {
            row("invariants", "all hold".to_owned());
        } else {
            row("invariants", format!("{} BROKEN", self.violations.len()));
            for v in &self.violations {
                row("  broken", v.to_string());
            }
        }
        let header = "| measure                  | value |\n|--------------------------|-------|\n";
        format!("{header}{s}")
    }
}

/// The `p`-th percentile (nearest rank) of `xs`, or `None` when empty.
pub fn pct(xs: &[f64], p: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len()) - 1).copied()
}

/// Milliseconds, readable.
pub fn ms_str(ms: Option<f64>) -> String {
    match ms {
        None => "–".to_owned(),
        Some(m) if m >= 10_000.0 => format!("{:.1} s", m / 1_000.0),
        Some(m) if m >= 1_000.0 => format!("{:.2} s", m / 1_000.0),
        Some(m) => format!("{m:.0} ms"),
    }
}

fn bytes_str(b: f64) -> String {
    if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} KB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
