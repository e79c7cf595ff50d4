//! The peer's per-instance guards (`node/src/guard`), modelled so that the simulator feeds
//! the replica the same facts the peer does.
//!
//! Every instance has its own guard with its own deadline: after every drain the peer renews
//! each one to `Replica::instance_deadline(now, task)` less `guard_margin_ms` (a `stop_after`
//! task's deadline follows the node's majority contact, a `lost_after` task's its window, a
//! default task's the node's `leases_hold_until`); a guard whose deadline passes without a
//! renewal moving it kills its instance, and the peer reports `ExecEvent::Expired`. Here:
//! after every drain of a node that has instances, every deadline is renewed on the node's
//! own clock (the one its replica is fed) and one check is scheduled for when the earliest
//! falls due (one pending check per node, like its tick); a check kills the instances whose
//! deadline is still passed (`ended_at` = now, as a crash does), reports `Expired` for each
//! after the executor's usual report delay, and waits for the next deadline of those left. A
//! node without instances has no guards, so nothing is computed for it; a node that is down
//! has none either (its instances died with it, see `Sim::crash`).

use std::collections::BTreeMap;

use omesh_protocol::{Epoch, Millis};

use crate::executor::REPORT_US;
use crate::queue::SimTime;
use crate::sim::{fold, ix, Event, ExecStep, Sim, Slot};

/// Guard kills counted over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardKills {
    /// Instances killed at their deadline, running or still starting.
    pub total: u64,
    /// Of those, instances that had come up.
    pub running: u64,
    /// Of those, kills on a node on the cut-off side of a partition or isolation in force;
    /// the rest were on nodes no cut had set apart (lossy links, peers gone from the
    /// probe round).
    pub cut_off: u64,
}

/// One node's guards: a deadline per instance, as the peer renews each with its own task's.
#[derive(Debug, Default)]
pub(crate) struct Guards {
    /// Per instance (task index, epoch), the deadline last renewed, on the node's clock.
    deadlines: BTreeMap<(u32, Epoch), Millis>,
    /// When the pending check is due.
    check: Option<SimTime>,
    /// The pending check's token; a check with another one is stale.
    token: u32,
}

impl Guards {
    /// A node (re)started: no guard, no check pending (a stale one is recognised by its
    /// token).
    pub(crate) fn reset(&mut self) {
        self.deadlines.clear();
        self.check = None;
    }

    /// The earliest deadline of the instances in `exec`.
    fn earliest<'a>(&self, live: impl Iterator<Item = &'a (u32, Epoch)>) -> Option<Millis> {
        live.filter_map(|k| self.deadlines.get(k)).copied().min()
    }
}

impl Sim {
    /// After a drain of node `i`: renews each of its guards to its instance's deadline and
    /// makes sure a check is due no later than the earliest.
    pub(crate) fn renew_guards(&mut self, i: u32) {
        if !self.scenario.guard.enabled || self.frozen {
            return;
        }
        let now = self.queue.now();
        let margin = self.scenario.guard.margin_ms;
        let tasks = &self.tasks;
        let node = &mut self.nodes[ix(i)];
        if node.exec.is_empty() {
            node.guards.deadlines.clear();
            return;
        }
        let Some(r) = node.replica.as_ref() else {
            return;
        };
        let local = node.clock.local_ms(now);
        let exec = &node.exec;
        let guards = &mut node.guards;
        guards.deadlines.retain(|k, _| exec.contains_key(k));
        for &(task, epoch) in exec.keys() {
            let Some(info) = tasks.get(ix(task)) else {
                continue;
            };
            let deadline = r.instance_deadline(local, &info.id).saturating_sub(margin);
            guards.deadlines.insert((task, epoch), deadline);
        }
        let Some(earliest) = guards.earliest(exec.keys()) else {
            return;
        };
        let at = node.clock.sim_at(earliest, now);
        if guards.check.is_some_and(|t| t <= at) {
            return;
        }
        guards.check = Some(at);
        guards.token = guards.token.wrapping_add(1);
        let token = guards.token;
        self.queue.push(at, Event::Guard { node: i, token });
    }

    /// A guard check of node `i` falls due: every instance whose deadline was not renewed
    /// past now is killed and reported `Expired`; the check waits for the next deadline of
    /// the rest.
    pub(crate) fn on_guard(&mut self, i: u32, token: u32) {
        let now = self.queue.now();
        self.trace = fold(self.trace, 14 << 32 | u64::from(i));
        let node = &mut self.nodes[ix(i)];
        if self.frozen || node.guards.token != token || !node.up() {
            return;
        }
        node.guards.check = None;
        if node.exec.is_empty() {
            return;
        }
        let local = node.clock.local_ms(now);
        let due: Vec<(u32, Epoch)> = node
            .exec
            .keys()
            .filter(|k| node.guards.deadlines.get(k).is_some_and(|d| local >= *d))
            .copied()
            .collect();
        let mut killed = Vec::with_capacity(due.len());
        for k in due {
            node.guards.deadlines.remove(&k);
            if let Some(slot) = node.exec.remove(&k) {
                killed.push((k, slot));
            }
        }
        if let Some(next) = node.guards.earliest(node.exec.keys()) {
            // Renewed since this check was set, or other instances with later deadlines:
            // wait for the next one.
            let at = node.clock.sim_at(next, now);
            node.guards.check = Some(at);
            node.guards.token = node.guards.token.wrapping_add(1);
            let token = node.guards.token;
            self.queue.push(at, Event::Guard { node: i, token });
        }
        let gen = node.gen;
        let cut_off = self.network.cut_off(i);
        for ((task, epoch), slot) in killed {
            // An instance still starting has its guard too: it never comes up.
            if let Slot::Running(inst) = slot {
                self.runs.expire(inst, now);
                self.stopped_early(i, task, inst, true);
            }
            self.guard_expiries.total += 1;
            if matches!(slot, Slot::Running(_)) {
                self.guard_expiries.running += 1;
            }
            if cut_off {
                self.guard_expiries.cut_off += 1;
            }
            self.queue.push(
                now + REPORT_US,
                Event::Exec {
                    node: i,
                    gen,
                    task,
                    epoch,
                    step: ExecStep::Expired,
                },
            );
        }
    }
}
