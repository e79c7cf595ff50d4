//! The replica's task bookkeeping: what this node does about the tasks it owns (its local
//! runs), and what it remembers between evaluation passes about the others: since when a task
//! is claimable (the claim stagger counts from it), since when it ended or its latest attempt
//! failed (retention and backoff count from those), and why placement left it pending.
//!
//! None of it is replicated: it is this node's memory of when it saw things, on its own clock.
//! A pass over the tasks reads it and notes what it saw in a [`Pass`]; [`TaskBook::end_pass`]
//! then folds that in and forgets tasks no longer held.

use std::collections::{BTreeMap, BTreeSet};

use omesh_protocol::{Epoch, Millis, NodeId, TaskId};

/// What this node does about a task it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// At most once: promises of `epoch` asked, no lease written yet. The lease is written
    /// only once a majority promised, so a claim the mesh refuses (say, from a node that was
    /// cut off and has not yet heard of a later owner) never fences a running instance.
    Promising {
        /// The placement score the lease will carry.
        score: u32,
        /// Whether the claim takes the task over from a live lease's owner.
        failover: bool,
    },
    /// Claimed; starts at `until` if the lease still holds.
    Settling { until: Millis },
    /// StartTask emitted.
    Started,
    /// StopTask emitted; waiting for the executor.
    Stopping,
    /// Started by an earlier incarnation of this node and still running (`Input::Adopt`):
    /// taken over at a new epoch once this node is synced, or stopped.
    Adopted,
}

/// A task this node owns: the epoch it claimed and how far it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LocalRun {
    pub(crate) epoch: Epoch,
    pub(crate) phase: Phase,
}

/// A task this node may claim: since when (the claim stagger counts from it), when to rank
/// the nodes for it again, and the node that ranked best then (the pass books the task on it
/// until then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claimable {
    pub(crate) since: Millis,
    pub(crate) recheck: Millis,
    pub(crate) best: NodeId,
}

/// The local runs and the per-task times this node noted.
#[derive(Debug, Default)]
pub(crate) struct TaskBook {
    /// The tasks this node owns.
    local: BTreeMap<TaskId, LocalRun>,
    /// Tasks claimable here since an earlier pass.
    claimable: BTreeMap<TaskId, Claimable>,
    /// When each failed attempt was first seen here (its retry backoff counts from it).
    failed_seen: BTreeMap<(TaskId, Epoch), Millis>,
    /// When each ended task was first seen ended here (its retention counts from it).
    terminal_seen: BTreeMap<TaskId, Millis>,
    /// Why placement left a task pending, as of the last pass that placed it.
    reasons: BTreeMap<TaskId, String>,
}

/// What one evaluation pass saw, folded into the book by [`TaskBook::end_pass`].
#[derive(Debug, Default)]
pub(crate) struct Pass {
    terminal: Vec<TaskId>,
    claimable: Vec<(TaskId, Millis, NodeId)>,
    failed: Vec<(TaskId, Epoch)>,
    reasons: Vec<(TaskId, String)>,
}

impl Pass {
    /// `task` has ended; returns since when it is known ended here (`now` if first seen).
    pub(crate) fn terminal(&mut self, book: &TaskBook, now: Millis, task: TaskId) -> Millis {
        self.terminal.push(task);
        book.terminal_seen.get(&task).copied().unwrap_or(now)
    }

    /// The attempt `epoch` of `task` failed; returns since when that is known here.
    pub(crate) fn failed(
        &mut self,
        book: &TaskBook,
        now: Millis,
        task: TaskId,
        epoch: Epoch,
    ) -> Millis {
        self.failed.push((task, epoch));
        book.failed_seen.get(&(task, epoch)).copied().unwrap_or(now)
    }

    /// `task` is claimable here, to be ranked again at `recheck`; `best` ranked first.
    pub(crate) fn claimable(&mut self, task: TaskId, recheck: Millis, best: NodeId) {
        self.claimable.push((task, recheck, best));
    }

    /// Placement left `task` pending, for `why`.
    pub(crate) fn pending(&mut self, task: TaskId, why: String) {
        self.reasons.push((task, why));
    }
}

impl TaskBook {
    /// The run of `task`, if this node owns it.
    pub(crate) fn get(&self, task: &TaskId) -> Option<LocalRun> {
        self.local.get(task).copied()
    }

    /// Whether this node owns `task`.
    pub(crate) fn owns(&self, task: &TaskId) -> bool {
        self.local.contains_key(task)
    }

    /// The local runs, by task.
    pub(crate) fn runs(&self) -> impl Iterator<Item = (&TaskId, &LocalRun)> {
        self.local.iter()
    }

    /// Moves the run of `task` (if any) to `phase`.
    pub(crate) fn set_phase(&mut self, task: &TaskId, phase: Phase) {
        if let Some(r) = self.local.get_mut(task) {
            r.phase = phase;
        }
    }

    /// Drops the run of `task`.
    pub(crate) fn forget(&mut self, task: &TaskId) {
        self.local.remove(task);
    }

    /// This node claimed `task` at `epoch`; it starts at `until`. It is no longer claimable.
    pub(crate) fn claimed(&mut self, task: TaskId, epoch: Epoch, until: Millis) {
        self.local.insert(
            task,
            LocalRun {
                epoch,
                phase: Phase::Settling { until },
            },
        );
        self.claimable.remove(&task);
    }

    /// `task` is to be claimed at `epoch` once a majority promises it (at most once).
    pub(crate) fn promising(&mut self, task: TaskId, epoch: Epoch, score: u32, failover: bool) {
        self.local.insert(
            task,
            LocalRun {
                epoch,
                phase: Phase::Promising { score, failover },
            },
        );
        self.claimable.remove(&task);
    }

    /// An earlier incarnation's instance of `task` at `epoch` runs here.
    pub(crate) fn adopted(&mut self, task: TaskId, epoch: Epoch) {
        self.local.insert(
            task,
            LocalRun {
                epoch,
                phase: Phase::Adopted,
            },
        );
        self.claimable.remove(&task);
    }

    /// Moves the run of `task` to `epoch`, started.
    pub(crate) fn restarted_as(&mut self, task: &TaskId, epoch: Epoch) {
        if let Some(r) = self.local.get_mut(task) {
            r.epoch = epoch;
            r.phase = Phase::Started;
        }
    }

    /// The claimable entry of `task` from an earlier pass.
    pub(crate) fn claimable(&self, task: &TaskId) -> Option<Claimable> {
        self.claimable.get(task).copied()
    }

    /// Why placement left `task` pending, if it did.
    pub(crate) fn reason(&self, task: &TaskId) -> Option<&String> {
        self.reasons.get(task)
    }

    /// Folds in what a pass saw at `now`, then forgets every task not in `held`.
    pub(crate) fn end_pass(&mut self, now: Millis, pass: Pass, held: &BTreeSet<TaskId>) {
        let Pass {
            terminal,
            claimable,
            failed,
            reasons,
        } = pass;
        for id in terminal {
            self.terminal_seen.entry(id).or_insert(now);
            self.claimable.remove(&id);
            self.reasons.remove(&id);
        }
        // A task claimable since an earlier pass keeps its start (the stagger counts from
        // it); one that was not claimable in this pass (owned, backing off) starts again the
        // next time it is, or every node would claim at once when its owner fails.
        let seen: BTreeMap<TaskId, (Millis, NodeId)> = claimable
            .into_iter()
            .map(|(id, recheck, best)| (id, (recheck, best)))
            .collect();
        self.claimable.retain(|id, _| seen.contains_key(id));
        for (id, (recheck, best)) in seen {
            self.claimable
                .entry(id)
                .and_modify(|c| {
                    c.recheck = recheck;
                    c.best = best;
                })
                .or_insert(Claimable {
                    since: now,
                    recheck,
                    best,
                });
            self.reasons.remove(&id);
        }
        for key in failed {
            self.failed_seen.entry(key).or_insert(now);
        }
        for (id, why) in reasons {
            self.reasons.insert(id, why);
        }
        self.terminal_seen.retain(|id, _| held.contains(id));
        self.claimable.retain(|id, _| held.contains(id));
        self.failed_seen.retain(|(id, _), _| held.contains(id));
        self.reasons.retain(|id, _| held.contains(id));
    }
}
