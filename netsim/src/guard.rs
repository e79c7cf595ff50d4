//! The peer's per-instance guards (`node/src/guard`), modelled so that the simulator feeds
//! the replica the same facts the peer does.
//!
//! The peer renews every guard's deadline after every drain to
//! `Replica::leases_hold_until(now)` less `guard_margin_ms`; a guard whose deadline passes
//! without a renewal moving it kills its instance, and the peer reports
//! `ExecEvent::Expired`. Here: after every drain of a node that has instances, the deadline
//! is renewed on the node's own clock (the one its replica is fed) and a check is scheduled
//! for when it falls due (one pending check per node, like its tick); a check that finds the
//! deadline still passed kills every instance of the node (`ended_at` = now, as a crash
//! does) and reports `Expired` for each after the executor's usual report delay. A node
//! without instances has no guards, so nothing is computed for it; a node that is down has
//! none either (its instances died with it, see `Sim::crash`).

use omesh_protocol::Millis;

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

/// One node's guards: they share one deadline, as the peer renews them all at once.
#[derive(Debug, Default)]
pub(crate) struct Guards {
    /// The deadline last renewed, on the node's clock.
    deadline: Millis,
    /// When the pending check is due.
    check: Option<SimTime>,
    /// The pending check's token; a check with another one is stale.
    token: u32,
}

impl Guards {
    /// A node (re)started: no check is pending (a stale one is recognised by its token).
    pub(crate) fn reset(&mut self) {
        self.deadline = 0;
        self.check = None;
    }
}

impl Sim {
    /// After a drain of node `i`: renews its guards' deadline and makes sure a check is due
    /// no later than it.
    pub(crate) fn renew_guards(&mut self, i: u32) {
        if !self.scenario.guard.enabled || self.frozen {
            return;
        }
        let now = self.queue.now();
        let margin = self.scenario.guard.margin_ms;
        let node = &mut self.nodes[ix(i)];
        if node.exec.is_empty() {
            return;
        }
        let Some(r) = node.replica.as_ref() else {
            return;
        };
        let local = node.clock.local_ms(now);
        let deadline = r.leases_hold_until(local).saturating_sub(margin);
        node.guards.deadline = deadline;
        let at = node.clock.sim_at(deadline, now);
        if node.guards.check.is_some_and(|t| t <= at) {
            return;
        }
        node.guards.check = Some(at);
        node.guards.token = node.guards.token.wrapping_add(1);
        let token = node.guards.token;
        self.queue.push(at, Event::Guard { node: i, token });
    }

    /// A guard check of node `i` falls due: if the deadline was not renewed past now, every
    /// instance of the node is killed and reported `Expired`.
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
        let deadline = node.guards.deadline;
        if node.clock.local_ms(now) < deadline {
            // Renewed since this check was set: wait for the new deadline.
            let at = node.clock.sim_at(deadline, now);
            node.guards.check = Some(at);
            node.guards.token = node.guards.token.wrapping_add(1);
            let token = node.guards.token;
            self.queue.push(at, Event::Guard { node: i, token });
            return;
        }
        let gen = node.gen;
        let killed = std::mem::take(&mut node.exec);
        let cut_off = self.network.cut_off(i);
        for ((task, epoch), slot) in killed {
            // An instance still starting has its guard too: it never comes up.
            if let Slot::Running(inst) = slot {
                self.runs.expire(inst, now);
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
