//! Invariant checks run through every scenario: nothing accepted is lost, every live replica
//! converges to one digest once faults heal, one owner per epoch after convergence, and the
//! bounds the scenario expects (duplicate-run window, failover and spread times).

use std::collections::BTreeMap;
use std::fmt;

use omesh_protocol::TaskState;

use crate::queue::{SimTime, US_PER_MS};
use crate::sim::{ix, Sim};

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant.
    pub invariant: &'static str,
    /// What was seen.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.invariant, self.detail)
    }
}

fn v(invariant: &'static str, detail: String) -> Violation {
    Violation { invariant, detail }
}

/// How accepted tasks ended up, judged on one replica after the final drain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskOutcome {
    /// Submitted.
    pub submitted: usize,
    /// Accepted by the replica they were submitted to.
    pub accepted: usize,
    /// Succeeded.
    pub succeeded: usize,
    /// Failed for good.
    pub failed: usize,
    /// Cancelled.
    pub cancelled: usize,
    /// Running with a live instance.
    pub running: usize,
    /// Pending, with a placement reason.
    pub pending_with_reason: usize,
    /// Pending, claimed or waiting for a retry or a lease to lapse.
    pub pending_in_progress: usize,
    /// Lost: unknown, or pending with nobody on it and no reason.
    pub lost: usize,
}

/// Checks made while the mesh still runs, at the end of the scenario: at most one instance
/// of each task, and no two instances of one epoch after the mesh caught up.
pub fn check_running(sim: &Sim) -> Vec<Violation> {
    let mut out = Vec::new();
    let converged_at = sim
        .heal_cut
        .as_ref()
        .zip(sim.heal_converged_us)
        .map(|(cut, d)| cut.at + d);
    for task in sim.runs.tasks() {
        let running: Vec<_> = sim.runs.running(task).collect();
        if running.len() > 1 {
            out.push(v(
                "one-instance-at-end",
                format!(
                    "task #{task} still runs {} instances at the end: {:?}",
                    running.len(),
                    running
                        .iter()
                        .map(|i| (i.node, i.epoch))
                        .collect::<Vec<_>>()
                ),
            ));
        }
        let Some(after) = converged_at else {
            continue;
        };
        let mut by_epoch: BTreeMap<u64, Vec<(u32, SimTime, SimTime)>> = BTreeMap::new();
        for inst in sim.runs.instances.iter().filter(|i| i.task == task) {
            let end = inst.ended_at.unwrap_or(SimTime::MAX);
            if end > after {
                by_epoch.entry(inst.epoch).or_default().push((
                    inst.node,
                    inst.started_at.max(after),
                    end,
                ));
            }
        }
        for (epoch, runs) in by_epoch {
            for (k, a) in runs.iter().enumerate() {
                for b in &runs[k + 1..] {
                    if a.0 != b.0 && a.1 < b.2 && b.1 < a.2 {
                        out.push(v(
                            "one-owner-per-epoch",
                            format!(
                                "task #{task} epoch {epoch} ran on nodes {} and {} at once after convergence",
                                a.0, b.0
                            ),
                        ));
                    }
                }
            }
        }
    }
    out
}

/// Checks made after the final drain: equal digests, and every accepted task terminal,
/// running, or pending for a reason.
pub fn check_final(sim: &Sim) -> (Vec<Violation>, TaskOutcome) {
    let mut out = Vec::new();
    let now = sim.end_time();
    let mut digests: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (i, n) in sim.up_nodes() {
        if let Some(r) = n.replica.as_ref() {
            digests.entry(r.digest().to_string()).or_default().push(i);
        }
    }
    if digests.len() > 1 {
        let sizes: Vec<String> = digests
            .iter()
            .map(|(d, nodes)| format!("{}…×{} (e.g. node {})", &d[..12], nodes.len(), nodes[0]))
            .collect();
        let mut groups: Vec<&Vec<u32>> = digests.values().collect();
        groups.sort_by_key(|g| std::cmp::Reverse(g.len()));
        let diff = difference(sim, groups[0][0], groups[groups.len() - 1][0]);
        out.push(v(
            "convergence",
            format!(
                "{} distinct digests among live replicas: {}; {diff}",
                digests.len(),
                sizes.join(", ")
            ),
        ));
    }

    let mut o = TaskOutcome {
        submitted: sim.tasks.len(),
        ..TaskOutcome::default()
    };
    let Some((_, reference)) = sim.up_nodes().next() else {
        return (out, o);
    };
    let Some(r) = reference.replica.as_ref() else {
        return (out, o);
    };
    let local = reference.clock.local_ms(now);
    let cfg = r.config();
    let patience = 4 * (cfg.lease_ttl_ms + cfg.lease_grace_ms) * US_PER_MS + 10_000_000;
    for (t, info) in sim.tasks.iter().enumerate() {
        if !info.accepted {
            continue;
        }
        o.accepted += 1;
        let t = u32::try_from(t).unwrap_or(u32::MAX);
        // An instance runs or starts, or some live owner holds the claim (settling).
        let instance = sim.runs.running(t).next().is_some()
            || sim.up_nodes().any(|(_, n)| {
                n.exec.keys().any(|(task, _)| *task == t)
                    || n.replica
                        .as_ref()
                        .is_some_and(|r| r.local_runs().iter().any(|(task, _, _)| *task == info.id))
            });
        let Some(view) = r.task_view(local, &info.id) else {
            o.lost += 1;
            out.push(v(
                "no-task-lost",
                format!(
                    "task #{t} (submitted at {:.1} s via node {}) is unknown to the live replicas",
                    secs(info.submitted_at),
                    info.via
                ),
            ));
            continue;
        };
        match view.state {
            TaskState::Succeeded => o.succeeded += 1,
            TaskState::Failed => o.failed += 1,
            TaskState::Cancelled => o.cancelled += 1,
            TaskState::Running if instance => o.running += 1,
            TaskState::Pending if view.pending_reason.is_some() => o.pending_with_reason += 1,
            state => {
                let retrying = view
                    .history
                    .last()
                    .is_some_and(|(_, s)| s.state == TaskState::Failed);
                let recent_crash = sim
                    .runs
                    .unresolved_failovers()
                    .iter()
                    .any(|(task, at)| *task == t && now.saturating_sub(*at) < patience);
                let young = now.saturating_sub(info.submitted_at) < patience;
                if instance || retrying || recent_crash || (young && view.epoch == 0) {
                    o.pending_in_progress += 1;
                } else {
                    o.lost += 1;
                    out.push(v(
                        "no-task-lost",
                        format!(
                            "task #{t} is {state} at epoch {} (owner {:?}, lease live {}) with no instance and no reason",
                            view.epoch,
                            view.owner.and_then(|id| sim.by_id.get(&id)).copied(),
                            view.lease_live
                        ),
                    ));
                }
            }
        }
    }
    for (task, at) in sim.runs.unresolved_failovers() {
        let terminal = sim
            .tasks
            .get(ix(task))
            .and_then(|i| r.task_state(local, &i.id))
            .is_some_and(TaskState::is_terminal);
        if !terminal && now.saturating_sub(at) >= patience {
            out.push(v(
                "failover",
                format!(
                    "task #{task} never ran again after its owner crashed at {:.1} s",
                    secs(at)
                ),
            ));
        }
    }
    (out, o)
}

fn secs(t: SimTime) -> f64 {
    t as f64 / 1e6
}

/// What two replicas hold that the other does not, as `kind(origin#stamp)`, a few of each.
fn difference(sim: &Sim, a: u32, b: u32) -> String {
    use std::collections::BTreeSet;
    let describe = |i: u32| -> BTreeSet<(String, Vec<u8>)> {
        let Some(r) = sim.nodes[ix(i)].replica.as_ref() else {
            return BTreeSet::new();
        };
        r.state()
            .components()
            .map(|d| {
                let origin = sim.by_id.get(&d.origin).copied().unwrap_or(u32::MAX);
                let (key, body) = match &d.body {
                    omesh_protocol::DeltaBody::Node(n) => (
                        format!("node({origin} inc {} leaving {})", n.incarnation, n.leaving),
                        omesh_protocol::codec::canonical(&n.durable()),
                    ),
                    body => (
                        format!("{}({origin}#{:x})", body.kind(), d.stamp),
                        omesh_protocol::codec::canonical(body),
                    ),
                };
                (key, body)
            })
            .collect()
    };
    let (sa, sb) = (describe(a), describe(b));
    let only = |x: &BTreeSet<(String, Vec<u8>)>, y: &BTreeSet<(String, Vec<u8>)>| {
        let v: Vec<&str> = x.difference(y).map(|(k, _)| k.as_str()).take(6).collect();
        format!("{} [{}]", x.difference(y).count(), v.join(", "))
    };
    format!(
        "node {a} alone holds {}; node {b} alone holds {}",
        only(&sa, &sb),
        only(&sb, &sa)
    )
}
