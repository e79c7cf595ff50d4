//! The fake executor and the log of every task instance that ran, from which the duplicate-run
//! windows and failover times are read.
//!
//! StartTask → `Started` after a short delay → `Exited` after the task's duration;
//! StopTask → the instance ends at once and `Stopped` is reported shortly after; a crash ends
//! every instance of the node; a guard whose deadline passed ends every instance of its node
//! and `Expired` is reported shortly after (see `guard.rs`).

use std::collections::BTreeMap;

use omesh_protocol::Epoch;
use omesh_state::{ExecEvent, Input};

use crate::queue::SimTime;
use crate::sim::{fold, ix, Event, ExecStep, Sim, Slot};

/// How long after an instance ended (stopped, killed by its guard) the executor reports it.
pub(crate) const REPORT_US: SimTime = 5_000;

/// One instance of a task, as it ran on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instance {
    /// Node index.
    pub node: u32,
    /// Task index.
    pub task: u32,
    /// The epoch it ran for.
    pub epoch: Epoch,
    /// When it reported `Started`.
    pub started_at: SimTime,
    /// When it exited, was stopped, died with its node or was killed by its guard.
    pub ended_at: Option<SimTime>,
    /// Killed by its guard at the deadline (its node was cut off).
    pub expired: bool,
}

/// An owner crash waiting for its task to run elsewhere.
#[derive(Debug, Clone, Copy)]
struct PendingFailover {
    task: u32,
    epoch: Epoch,
    crashed_at: SimTime,
    /// The crashed node.
    from: u32,
}

/// Every instance, indexed by task, plus failover bookkeeping.
#[derive(Debug, Default)]
pub struct Runs {
    /// All instances, in start order.
    pub instances: Vec<Instance>,
    by_task: BTreeMap<u32, Vec<usize>>,
    pending: Vec<PendingFailover>,
    /// Measured failovers: crash of the owner to `Started` of a later epoch, in µs.
    pub failovers: Vec<SimTime>,
    /// Per measured failover: the crashed node, when, and the node the task moved to.
    pub moved: Vec<(u32, SimTime, u32)>,
    /// Instance starts that left their node over its CPU threshold, and how many of those
    /// found it under the threshold before (pushed over by the start itself).
    pub over_threshold: (u64, u64),
}

impl Runs {
    /// An instance reported `Started`; returns its index.
    pub fn start(&mut self, node: u32, task: u32, epoch: Epoch, now: SimTime) -> usize {
        let i = self.instances.len();
        self.instances.push(Instance {
            node,
            task,
            epoch,
            started_at: now,
            ended_at: None,
            expired: false,
        });
        self.by_task.entry(task).or_default().push(i);
        let mut k = 0;
        while k < self.pending.len() {
            let p = self.pending[k];
            if p.task == task && epoch > p.epoch {
                self.failovers.push(now - p.crashed_at);
                self.moved.push((p.from, p.crashed_at, node));
                self.pending.swap_remove(k);
            } else {
                k += 1;
            }
        }
        i
    }

    /// An instance ended.
    pub fn end(&mut self, i: usize, now: SimTime) {
        if let Some(inst) = self.instances.get_mut(i) {
            inst.ended_at.get_or_insert(now);
        }
    }

    /// Instance `i`'s guard killed it at its deadline.
    pub fn expire(&mut self, i: usize, now: SimTime) {
        if let Some(inst) = self.instances.get_mut(i) {
            if inst.ended_at.is_none() {
                inst.ended_at = Some(now);
                inst.expired = true;
            }
        }
    }

    /// The node of instance `i` crashed while it ran: end it and wait for a failover.
    pub fn crashed(&mut self, i: usize, now: SimTime) {
        let Some(inst) = self.instances.get(i).copied() else {
            return;
        };
        if inst.ended_at.is_some() {
            return;
        }
        self.end(i, now);
        if !self.pending.iter().any(|p| p.task == inst.task) {
            self.pending.push(PendingFailover {
                task: inst.task,
                epoch: inst.epoch,
                crashed_at: now,
                from: inst.node,
            });
        }
    }

    /// Owner crashes whose task has not run elsewhere yet: `(task, crashed_at)`.
    pub fn unresolved_failovers(&self) -> Vec<(u32, SimTime)> {
        self.pending
            .iter()
            .map(|p| (p.task, p.crashed_at))
            .collect()
    }

    /// Per crash whose tasks moved: how many moved, and the most that one node took.
    pub fn herds(&self) -> Vec<(usize, usize)> {
        let mut by_crash: BTreeMap<(u32, SimTime), BTreeMap<u32, usize>> = BTreeMap::new();
        for (from, at, to) in &self.moved {
            *by_crash
                .entry((*from, *at))
                .or_default()
                .entry(*to)
                .or_default() += 1;
        }
        by_crash
            .values()
            .map(|to| (to.values().sum(), to.values().copied().max().unwrap_or(0)))
            .collect()
    }

    /// The most instances that ran on one node at once.
    pub fn peak_per_node(&self) -> usize {
        let mut edges: BTreeMap<u32, Vec<(SimTime, i32)>> = BTreeMap::new();
        for inst in &self.instances {
            let e = edges.entry(inst.node).or_default();
            e.push((inst.started_at, 1));
            if let Some(end) = inst.ended_at {
                e.push((end, -1));
            }
        }
        let mut peak = 0;
        for mut e in edges.into_values() {
            e.sort_unstable();
            let mut depth = 0i32;
            for (_, d) in e {
                depth += d;
                peak = peak.max(usize::try_from(depth).unwrap_or(0));
            }
        }
        peak
    }

    /// Instances of `task` still running.
    pub fn running(&self, task: u32) -> impl Iterator<Item = &Instance> + '_ {
        self.by_task
            .get(&task)
            .into_iter()
            .flatten()
            .filter_map(|i| self.instances.get(*i))
            .filter(|i| i.ended_at.is_none())
    }

    /// Tasks that ever ran.
    pub fn tasks(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_task.keys().copied()
    }

    /// Per instance of `task` that outlived its lease, by how long, in µs, up to `end`: an
    /// instance still running when a later epoch of the task started on another node (which
    /// could only do so once it counted this one's lease lost). A same-epoch claim race is
    /// not counted here, only in [`Runs::duplicate_window`].
    pub fn outlived_leases(&self, task: u32, end: SimTime) -> Vec<SimTime> {
        let Some(ids) = self.by_task.get(&task) else {
            return Vec::new();
        };
        let all: Vec<&Instance> = ids.iter().filter_map(|i| self.instances.get(*i)).collect();
        let mut out = Vec::new();
        for old in &all {
            let ended = old.ended_at.unwrap_or(end);
            let overrun = all
                .iter()
                .filter(|n| n.epoch > old.epoch && n.node != old.node)
                .filter(|n| n.started_at >= old.started_at && n.started_at < ended)
                .map(|n| ended - n.started_at)
                .max();
            if let Some(o) = overrun {
                out.push(o);
            }
        }
        out
    }

    /// How long two or more instances of `task` ran at once, in µs, up to `end`.
    pub fn duplicate_window(&self, task: u32, end: SimTime) -> SimTime {
        let Some(ids) = self.by_task.get(&task) else {
            return 0;
        };
        if ids.len() < 2 {
            return 0;
        }
        let mut edges: Vec<(SimTime, i32)> = Vec::with_capacity(ids.len() * 2);
        for inst in ids.iter().filter_map(|i| self.instances.get(*i)) {
            edges.push((inst.started_at, 1));
            edges.push((inst.ended_at.unwrap_or(end), -1));
        }
        // Ends before starts at the same instant: touching intervals do not overlap.
        edges.sort_unstable();
        let (mut depth, mut since, mut total) = (0i32, 0, 0);
        for (t, d) in edges {
            if depth >= 2 {
                total += t - since;
            }
            depth += d;
            since = t;
        }
        total
    }
}

impl Sim {
    pub(crate) fn on_exec(&mut self, i: u32, gen: u32, task: u32, epoch: Epoch, step: ExecStep) {
        let now = self.queue.now();
        self.trace = fold(
            self.trace,
            5 << 32 | u64::from(i) << 16 ^ u64::from(task) ^ epoch << 48,
        );
        let node = &mut self.nodes[ix(i)];
        if self.frozen || node.gen != gen || !node.up() {
            return;
        }
        let Some(info) = self.tasks.get(ix(task)) else {
            return;
        };
        let id = info.id;
        let event = match step {
            ExecStep::Started => {
                if node.exec.get(&(task, epoch)) != Some(&Slot::Starting) {
                    return;
                }
                let inst = self.runs.start(i, task, epoch, now);
                node.exec.insert((task, epoch), Slot::Running(inst));
                let after = self.cpu_permille(i);
                let limit = u64::from(self.base_config.threshold_cpu) * 10;
                if after > limit {
                    self.runs.over_threshold.0 += 1;
                    let ask = u64::from(info.cpu_millis) * 1000
                        / u64::from(self.groups[self.nodes[ix(i)].group].cpu_millis.max(1));
                    if after.saturating_sub(ask) <= limit {
                        self.runs.over_threshold.1 += 1;
                    }
                }
                let code = if info.fails(epoch) { 1 } else { 0 };
                self.queue.push(
                    now + info.duration_us,
                    Event::Exec {
                        node: i,
                        gen,
                        task,
                        epoch,
                        step: ExecStep::Exit(code),
                    },
                );
                ExecEvent::Started
            }
            ExecStep::Exit(code) => {
                let Some(Slot::Running(inst)) = node.exec.remove(&(task, epoch)) else {
                    return;
                };
                self.runs.end(inst, now);
                ExecEvent::Exited { code }
            }
            ExecStep::Stopped => ExecEvent::Stopped,
            // The guard already ended the instance and freed its slot.
            ExecStep::Expired => ExecEvent::Expired,
        };
        self.feed(
            i,
            Input::Executor {
                task: id,
                epoch,
                event,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_window_counts_overlap_only() {
        let mut r = Runs::default();
        let a = r.start(0, 7, 1, 100);
        let b = r.start(1, 7, 2, 150);
        r.end(a, 400);
        r.end(b, 500);
        let c = r.start(2, 7, 3, 500);
        r.end(c, 600);
        assert_eq!(r.duplicate_window(7, 1_000), 250);
        assert_eq!(r.duplicate_window(8, 1_000), 0);
    }

    #[test]
    fn an_instance_outlives_its_lease_only_past_a_later_epoch_elsewhere() {
        let mut r = Runs::default();
        let a = r.start(0, 7, 1, 100);
        let _same_epoch = r.start(1, 7, 1, 150);
        let _later_same_node = r.start(0, 7, 2, 200);
        let _later = r.start(2, 7, 3, 300);
        r.end(a, 450);
        assert_eq!(r.outlived_leases(7, 1_000).len(), 3);
        assert_eq!(r.outlived_leases(7, 1_000)[0], 150);
        let mut r = Runs::default();
        let a = r.start(0, 8, 1, 100);
        r.expire(a, 250);
        let _next = r.start(2, 8, 2, 300);
        assert!(r.outlived_leases(8, 1_000).is_empty());
    }

    #[test]
    fn failover_is_crash_to_a_later_epoch_starting() {
        let mut r = Runs::default();
        let a = r.start(0, 1, 1, 0);
        r.crashed(a, 1_000);
        let _ = r.start(3, 1, 1, 1_500); // same epoch elsewhere: not a failover
        assert!(r.failovers.is_empty());
        let _ = r.start(2, 1, 2, 4_000);
        assert_eq!(r.failovers, vec![3_000]);
        assert!(r.unresolved_failovers().is_empty());
    }
}
