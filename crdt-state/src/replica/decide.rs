//! The decisions a replica takes on a tick: fence, start, claim, retry, hand back, compact.
//!
//! Everything here is level-triggered: each tick looks at the state as it is and does what is
//! due, so a missed or early tick is harmless and there are no per-task timers to go stale.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use omesh_protocol::{
    DeltaBody, Epoch, ImageRef, Lease, Millis, NodeId, NodeRecord, StatusEntry, TaskId, TaskState,
};

use super::disconnect;
use super::Replica;
use crate::decide::TaskView;
use crate::io::{Action, ExecEvent, StopReason};
use crate::merge::TaskRecord;
use crate::placement::{self, Committed, PlacementPolicy};
use crate::quorum::{Wanted, PROMISE_QUIET_MS};
use crate::replica::survives_restart;
use crate::runs::{Pass, Phase};

/// The longest settle delay, however slow the links look.
const MAX_SETTLE_MS: Millis = 5_000;

enum Step {
    Start(TaskId, Epoch),
    Adopt(TaskId, Epoch),
    Refused(TaskId, Epoch),
    /// At most once: promises refused or not all in; nothing was written.
    Unpromised(TaskId),
    /// At most once: a majority promised; write the lease.
    Promised {
        task: TaskId,
        epoch: Epoch,
        score: u32,
        failover: bool,
    },
    Stop(TaskId, Epoch, StopReason),
    Forget(TaskId),
    Release(TaskId, Epoch),
    CancelEpoch(TaskId, Epoch),
    Claim {
        task: TaskId,
        epoch: Epoch,
        score: u32,
        failover: bool,
    },
    Compact(TaskId, TaskState),
}

impl Replica {
    pub(crate) fn policy(&self) -> PlacementPolicy {
        PlacementPolicy {
            cpu_limit_permille: u16::from(self.cfg.threshold_cpu) * 10,
            mem_limit_permille: u16::from(self.cfg.threshold_memory) * 10,
            target_tags: self.cfg.target_node_tags.clone(),
        }
    }

    /// Whether this node is over a threshold and offload is on: it then claims nothing new.
    pub fn is_overloaded(&self) -> bool {
        self.cfg.enable_offload && placement::overloaded(&self.me)
    }

    /// Whether `lease` still holds, as judged from here at `now`.
    pub fn lease_live(&self, now: Millis, lease: &Lease) -> bool {
        if lease.released {
            return false;
        }
        if lease.owner == self.me.id {
            return lease.incarnation == self.cfg.incarnation && !self.me.leaving;
        }
        let Some(rec) = self.state.node(&lease.owner) else {
            return false;
        };
        // A leave ends the leases of the incarnation that announced it; a lease of a later one
        // (the owner came back, and its new record has not arrived yet) is not touched by it.
        if (rec.leaving && rec.incarnation >= lease.incarnation)
            || rec.incarnation > lease.incarnation
        {
            return false;
        }
        // Leases ride on membership: they hold until a suspicion of the owner has been held
        // here for the lease's ttl + grace without the owner refuting it.
        self.lease_expiry(lease).is_none_or(|expiry| now < expiry)
    }

    fn lease_expiry(&self, lease: &Lease) -> Option<Millis> {
        let at = self.suspected_since(&lease.owner)?;
        Some(at.saturating_add(u64::from(lease.ttl_ms) + self.grace_ms(&lease.owner) + 1))
    }

    fn derive_state(&self, now: Millis, id: &TaskId, rec: &TaskRecord) -> TaskState {
        if let Some(ended) = rec.ended() {
            return ended;
        }
        match rec.lease() {
            Some(l)
                if self.lease_holds(now, id, rec, &l.value)
                    && rec.status(l.value.epoch).map(|s| s.state) == Some(TaskState::Running) =>
            {
                TaskState::Running
            }
            _ => TaskState::Pending,
        }
    }

    /// The derived state of a task, or `None` if unknown here.
    pub fn task_state(&self, now: Millis, id: &TaskId) -> Option<TaskState> {
        if let Some(s) = self.state.tombstone(id) {
            return Some(s);
        }
        let rec = self.state.task(id)?;
        rec.spec.as_ref()?;
        Some(self.derive_state(now, id, rec))
    }

    /// A task as an operator sees it from here.
    pub fn task_view(&self, now: Millis, id: &TaskId) -> Option<TaskView> {
        if let Some(state) = self.state.tombstone(id) {
            return Some(TaskView {
                id: *id,
                spec: None,
                state,
                epoch: 0,
                owner: None,
                lease_live: false,
                failed_attempts: 0,
                exit_code: None,
                error: String::new(),
                pending_reason: None,
                starting: None,
                cancelled: state == TaskState::Cancelled,
                history: Vec::new(),
                compacted: true,
            });
        }
        let rec = self.state.task(id)?;
        let spec = rec.spec.as_ref().map(|s| Arc::clone(&s.value));
        let state = spec
            .as_ref()
            .map_or(TaskState::Pending, |_| self.derive_state(now, id, rec));
        let lease = rec.lease().map(|l| l.value);
        let last_ended = rec
            .statuses
            .values()
            .rev()
            .find(|s| s.value.state.is_terminal());
        let lease_live = lease.is_some_and(|l| self.lease_holds(now, id, rec, &l));
        // A live lease whose epoch has not reported Running (nor ended) is a start under way:
        // that is what the task waits for, whatever placement said before it was claimed.
        let starting = lease.filter(|l| {
            lease_live
                && state == TaskState::Pending
                && rec
                    .status(l.epoch)
                    .is_none_or(|s| s.state == TaskState::Pending)
        });
        let starting = starting.map(|l| self.start_under_way(id, &l));
        Some(TaskView {
            id: *id,
            spec,
            state,
            epoch: rec.max_epoch(),
            owner: lease.map(|l| l.owner),
            lease_live,
            failed_attempts: rec.failed_attempts(),
            exit_code: last_ended.and_then(|s| s.value.exit_code),
            error: last_ended
                .map(|s| s.value.error.clone())
                .unwrap_or_default(),
            pending_reason: self.tasks.reason(id).cloned(),
            starting,
            cancelled: rec.is_cancelled(),
            history: rec
                .statuses
                .iter()
                .map(|(e, s)| (*e, s.value.clone()))
                .collect(),
            compacted: false,
        })
    }

    /// What a claimed task that does not run yet waits for, as far as this node knows: its
    /// own start phase when it is the owner, else that the owner is starting it.
    fn start_under_way(&self, id: &TaskId, lease: &Lease) -> String {
        let epoch = lease.epoch;
        if lease.owner != self.me.id {
            return format!(
                "claimed by {} at epoch {epoch}, starting",
                lease.owner.short()
            );
        }
        match self.tasks.get(id).map(|r| r.phase) {
            Some(Phase::Settling { .. }) => format!(
                "claimed by this node ({}) at epoch {epoch}; starts after the settle delay if the lease still holds",
                self.me.id.short()
            ),
            _ => format!(
                "starting on this node ({}) at epoch {epoch}",
                self.me.id.short()
            ),
        }
    }

    /// Every task known here, live ones then tombstones.
    pub fn task_views(&self, now: Millis) -> Vec<TaskView> {
        let ids: Vec<TaskId> = self.state.tasks().map(|(id, _)| *id).collect();
        ids.iter()
            .filter_map(|id| self.task_view(now, id))
            .collect()
    }

    /// Epochs of tasks this node currently runs or is about to run.
    pub fn local_runs(&self) -> Vec<(TaskId, Epoch, bool)> {
        self.tasks
            .runs()
            .map(|(t, r)| {
                (
                    *t,
                    r.epoch,
                    matches!(r.phase, Phase::Started | Phase::Adopted),
                )
            })
            .collect()
    }

    fn settle_ms(&self) -> Millis {
        let slowest = self
            .rtt
            .values()
            .map(|r| 2 * u64::from(r.srtt_ms()))
            .max()
            .unwrap_or(0);
        self.cfg.settle_ms.max(slowest).min(MAX_SETTLE_MS)
    }

    fn backoff_ms(&self, task: &TaskId, attempts: u32) -> Millis {
        let exp = attempts.saturating_sub(1).min(20);
        let base = self
            .cfg
            .retry_base_ms
            .saturating_mul(1 << exp)
            .min(self.cfg.retry_max_ms);
        // Jitter of ±20%, derived from the task and attempt so every replica agrees.
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&task.0[..8]);
        let h = u64::from_le_bytes(seed) ^ u64::from(attempts).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let permille = 800 + (h % 401);
        base * permille / 1000
    }

    fn committed(&self, now: Millis) -> BTreeMap<NodeId, Committed> {
        let mut out: BTreeMap<NodeId, Committed> = BTreeMap::new();
        for (id, rec) in self.state.tasks() {
            let (Some(spec), Some(lease)) = (&rec.spec, rec.lease()) else {
                continue;
            };
            if !self.lease_holds(now, id, rec, &lease.value)
                || rec
                    .status(lease.value.epoch)
                    .is_some_and(|s| s.state.is_terminal())
                || rec.is_cancelled()
            {
                continue;
            }
            let owner = lease.value.owner;
            let ask = &spec.value.spec;
            // Whether the owner's published load can show this task yet: it started at least
            // LOAD_LAG_MS before the owner's record was written, both on the owner's clock.
            let shown = rec.status(lease.value.epoch).is_some_and(|s| {
                s.state == TaskState::Running
                    && self.state.node(&owner).is_some_and(|n| {
                        s.at_ms.saturating_add(placement::LOAD_LAG_MS) <= n.written_at_ms
                    })
            });
            let c = out.entry(owner).or_default();
            c.cpu_millis += u64::from(ask.cpu_millis);
            c.memory_bytes = c.memory_bytes.saturating_add(ask.memory_bytes);
            c.tasks = c.tasks.saturating_add(1);
            if !shown {
                c.unreported_cpu_millis += u64::from(ask.cpu_millis);
            }
        }
        out
    }

    /// One pass over local runs and known tasks. Called on every tick.
    pub(crate) fn evaluate(&mut self, now: Millis) {
        let mut steps = Vec::new();
        let mut wake: Option<Millis> = None;
        // A wake at or before `now` would only run this pass again at once (a peer's timer
        // would spin until its clock moved on): this pass already saw the state at `now`.
        // Say, the ttl expiry of a lease that a disconnect policy keeps holding past it.
        let mut at = |t: Millis| {
            if t > now {
                wake = Some(wake.map_or(t, |w: Millis| w.min(t)));
            }
        };
        let overloaded = self.is_overloaded();
        let may_claim = self.may_claim(now);

        // Majority contact, worked out once per pass and only if an at-most-once task asks.
        let majority = std::cell::OnceCell::new();
        let has_majority = |d: Millis| {
            majority
                .get_or_init(|| self.majority_contact(now))
                .is_some_and(|t| t.saturating_add(d) > now.saturating_add(self.cfg.lease_ttl_ms))
        };
        // A restarted node decides about the instances it adopted only once its view is the
        // mesh's (or it has been alone for long).
        let synced = self.sync.is_synced()
            || (now >= self.started_at.saturating_add(self.forget_after())
                && self.sync.alone(now, self.forget_after()));
        for (task, run) in self.tasks.runs() {
            let Some(rec) = self.state.task(task) else {
                if run.phase == Phase::Started || (run.phase == Phase::Adopted && synced) {
                    steps.push(Step::Stop(*task, run.epoch, StopReason::Compacted));
                } else if matches!(run.phase, Phase::Settling { .. }) {
                    steps.push(Step::Forget(*task));
                }
                continue;
            };
            let lease = rec.lease().map(|l| l.value);
            let mine =
                lease.is_some_and(|l| l.epoch == run.epoch && l.owner == self.me.id && !l.released);
            let by = lease.map_or(run.epoch, |l| l.epoch);
            let disc = disconnect::policy_of(rec);
            match run.phase {
                Phase::Stopping => {}
                Phase::Adopted if !synced => {}
                Phase::Adopted => {
                    let ended = rec.is_cancelled()
                        || rec.status(run.epoch).is_some_and(|s| s.state.is_terminal());
                    if mine && !ended && survives_restart(&disc) {
                        steps.push(Step::Adopt(*task, run.epoch));
                    } else {
                        steps.push(Step::Stop(*task, run.epoch, StopReason::Fenced { by }));
                    }
                }
                Phase::Promising { score, failover } => {
                    // Someone else's lease at this epoch or later, or a cancel: give up.
                    let moot = rec.is_cancelled() || rec.max_epoch() >= run.epoch;
                    match (moot, disc.stop_after_ms) {
                        (false, Some(d)) => match self.quorum.confirmation(task, run.epoch) {
                            Some(Ok(())) if has_majority(Millis::from(d)) => {
                                steps.push(Step::Promised {
                                    task: *task,
                                    epoch: run.epoch,
                                    score,
                                    failover,
                                });
                            }
                            Some(Err(sent)) if now < sent + self.answer_ms() => {
                                at(sent + self.answer_ms());
                            }
                            _ => steps.push(Step::Unpromised(*task)),
                        },
                        _ => steps.push(Step::Unpromised(*task)),
                    }
                }
                Phase::Settling { .. } if !mine => steps.push(Step::Forget(*task)),
                Phase::Started if !mine => {
                    steps.push(Step::Stop(*task, run.epoch, StopReason::Fenced { by }));
                }
                Phase::Settling { .. } if rec.is_cancelled() => {
                    steps.push(Step::CancelEpoch(*task, run.epoch));
                }
                Phase::Started if rec.is_cancelled() => {
                    steps.push(Step::Stop(*task, run.epoch, StopReason::Cancelled));
                }
                Phase::Settling { .. } if overloaded => steps.push(Step::Release(*task, run.epoch)),
                Phase::Settling { until } if now >= until => match disc.stop_after_ms {
                    None => steps.push(Step::Start(*task, run.epoch)),
                    // Promised before its lease was written (`Phase::Promising`); it starts
                    // only while its own majority contact still holds.
                    Some(d)
                        if self.quorum.confirmation(task, run.epoch) == Some(Ok(()))
                            && has_majority(Millis::from(d)) =>
                    {
                        steps.push(Step::Start(*task, run.epoch))
                    }
                    Some(_) => steps.push(Step::Refused(*task, run.epoch)),
                },
                Phase::Settling { until } => at(until),
                Phase::Started => {
                    if rec.status(run.epoch).is_some_and(|s| s.state.is_terminal()) {
                        steps.push(Step::Forget(*task));
                    }
                }
            }
        }

        // What each node's live leases hold, and what this node claims in this pass (a node
        // never claims more than it has room for, whichever groups the tasks are in).
        let leased = self.committed(now);
        let mut committed = leased.clone();
        // Each task this pass places is booked on its best node as it goes (in task id
        // order, as on every replica), so that the tasks of a failed node or a burst spread
        // over the nodes instead of all ranking one node first. Bookings are kept per group:
        // the tasks of one lost owner, or (never owned) of one submitting node. Replicas
        // that count different owners lost at a moment (their suspicions time out apart)
        // still book each owner's tasks alike, and so agree who claims each.
        // At-most-once tasks are ranked on the leases alone, as before booking: their claim
        // must come from the node that polled for it (see `wanted` below), which ranks them
        // before their lease lapses.
        let mut booked: BTreeMap<NodeId, BTreeMap<NodeId, Committed>> = BTreeMap::new();
        // This node's claims in this pass, per group: each is in `committed` (room across
        // groups) and in its group's bookings, so while that group is ranked it is taken out
        // of `committed`, or the claimer would count twice and rank itself lower for the
        // rest of the group than the other replicas rank it (they disagree who claims next).
        let mut claimed_in: BTreeMap<NodeId, Committed> = BTreeMap::new();
        // Built only if some task needs placing: most passes place nothing, and this is one
        // health check per known node.
        let live_nodes = std::cell::OnceCell::new();
        let live =
            || -> &Vec<&NodeRecord> { live_nodes.get_or_init(|| self.alive_nodes(now).collect()) };
        let policy = self.policy();
        let mut pass = Pass::default();
        let mut window: Option<Millis> = None;
        let mut wanted: BTreeMap<NodeId, Wanted> = BTreeMap::new();
        for (id, rec) in self.state.tasks() {
            let Some(spec) = rec.spec.as_ref().map(|s| &s.value) else {
                continue;
            };
            let state = self.derive_state(now, id, rec);
            let lease = rec.lease().map(|l| l.value);
            let disc = disconnect::policy_of(rec);
            if state.is_terminal() {
                let since = pass.terminal(&self.tasks, now, *id);
                let last_owner = lease.is_some_and(|l| l.owner == self.me.id);
                let after = if last_owner {
                    self.cfg.retention_ms
                } else {
                    2 * self.cfg.retention_ms
                };
                if self.tasks.owns(id) {
                    // Wait for our instance to stop first.
                } else if now >= since + after {
                    steps.push(Step::Compact(*id, state));
                } else {
                    at(since + after);
                }
                continue;
            }
            if self.tasks.owns(id) {
                continue;
            }
            let top_failed = rec
                .statuses
                .iter()
                .next_back()
                .filter(|(_, s)| s.value.state == TaskState::Failed)
                .map(|(e, _)| *e);
            let holds = lease.filter(|l| self.lease_holds(now, id, rec, l));
            if let (Some(d), Some(l)) = (disc.stop_after_ms, lease) {
                if holds.is_none() || !self.lease_live(now, &l) {
                    // Wanted by whoever may claim it: keep majority contact.
                    let d = Millis::from(d);
                    window = Some(window.map_or(d, |w: Millis| w.min(d)));
                }
                // Only the node that would take the task over polls (one poll reaches every
                // member: a poll from every node would cost N² messages per lost owner).
                let first = holds.is_some()
                    && self.wants_poll(now, rec, &l)
                    && !overloaded
                    && may_claim
                    && matches!(
                        self.rank_here(rec, &spec.spec, &leased, &policy, live()),
                        Ok(Some((0, _)))
                    );
                if first {
                    let e = wanted.entry(l.owner).or_insert_with(|| Wanted {
                        leases: BTreeSet::new(),
                        shortest: d.into(),
                        longest: d.into(),
                    });
                    e.leases.insert((*id, l.epoch));
                    e.shortest = e.shortest.min(d.into());
                    e.longest = e.longest.max(d.into());
                }
            } else if let (Some(d), None) = (disc.stop_after_ms, lease) {
                let d = Millis::from(d);
                window = Some(window.map_or(d, |w: Millis| w.min(d)));
            }
            if let Some(l) = holds {
                if top_failed != Some(l.epoch) {
                    if l.owner != self.me.id {
                        if let Some(t) = self.lease_expiry(&l) {
                            at(t);
                        }
                        if let Some(t) = self.policy_wake(id, rec, &l) {
                            at(t);
                        }
                    }
                    continue;
                }
            }
            if let Some(epoch) = top_failed {
                let since = pass.failed(&self.tasks, now, *id, epoch);
                let due = since + self.backoff_ms(id, rec.failed_attempts());
                if now < due {
                    at(due);
                    continue;
                }
            }
            if overloaded {
                pass.pending(
                    *id,
                    "the node that sees it is over its thresholds".to_owned(),
                );
                continue;
            }
            if !may_claim {
                // A node that hears nobody, or has not synced since it did, may hold a stale
                // view (a task compacted or finished elsewhere): it claims nothing until synced.
                continue;
            }
            // Placed (and booked on its best node) before anything this node alone decides
            // about it, so every replica books the same tasks and agrees who claims the next.
            let group = match (lease, &rec.spec) {
                (Some(l), _) => l.owner,
                (None, Some(s)) => s.at.origin,
                (None, None) => NodeId::default(),
            };
            let cached = self.tasks.claimable(id).filter(|c| now < c.recheck);
            let placed = if disc.stop_after_ms.is_some() {
                match cached {
                    Some(_) => Ok(None),
                    None => self
                        .placed_here(rec, &spec.spec, (&leased, None, true), &policy, live())
                        .map(Some),
                }
            } else if let Some(c) = cached {
                let group = booked.entry(group).or_default();
                group.entry(c.best).or_default().book(&spec.spec);
                Ok(None)
            } else {
                let mine_here = claimed_in.get(&group).copied();
                if let Some(m) = mine_here {
                    let c = committed.entry(self.me.id).or_default();
                    *c = c.minus(m);
                }
                let placed = self.placed_here(
                    rec,
                    &spec.spec,
                    (&committed, booked.get(&group), false),
                    &policy,
                    live(),
                );
                if let Some(m) = mine_here {
                    let c = committed.entry(self.me.id).or_default();
                    *c = c.plus(m);
                }
                if let Ok(p) = &placed {
                    let group = booked.entry(group).or_default();
                    group.entry(p.best).or_default().book(&spec.spec);
                }
                placed.map(Some)
            };
            if let Some(d) = disc.stop_after_ms {
                let quiet_until = self.started_at.saturating_add(PROMISE_QUIET_MS);
                if now < quiet_until {
                    // Its own promise would be refused: a claim now would be handed back and
                    // spend an epoch for nothing.
                    pass.pending(
                        *id,
                        "at most once: this node promises nothing in its first 8 s (it does not remember promises made before a restart)"
                            .to_owned(),
                    );
                    at(quiet_until);
                    continue;
                }
                let least = self.min_stop_after();
                if Millis::from(d) < least {
                    pass.pending(
                        *id,
                        format!(
                            "stop_after of {d} ms is shorter than this mesh can hold (at least {least} ms: twice lease_ttl_ms + heartbeat_ms, plus heartbeat_ms)"
                        ),
                    );
                    continue;
                }
                if !has_majority(Millis::from(d)) {
                    pass.pending(
                        *id,
                        "at most once: this node is not in contact with a majority of the mesh"
                            .to_owned(),
                    );
                    at(now + self.cfg.heartbeat_ms);
                    continue;
                }
            }
            if let Some(c) = cached {
                // Placed in an earlier pass and not yet due: no need to rank every live
                // node again on each delta that arrives meanwhile.
                pass.claimable(*id, c.recheck, c.best);
                at(c.recheck);
                continue;
            }
            match placed {
                Err(why) => pass.pending(*id, why.to_string()),
                Ok(None) | Ok(Some(placement::Placed { mine: None, .. })) => {}
                Ok(Some(placement::Placed {
                    mine: Some((pos, score)),
                    best,
                })) => {
                    let since = self.tasks.claimable(id).map_or(now, |c| c.since);
                    let pos = u64::try_from(pos).unwrap_or(u64::MAX);
                    let due = since.saturating_add(pos.saturating_mul(self.cfg.claim_stagger_ms));
                    // Ranked again at its turn, or after a probe period if that is sooner
                    // (the nodes ahead of it may have claimed, or died, by then).
                    let recheck = due.min(now + self.cfg.heartbeat_ms);
                    pass.claimable(*id, recheck, best);
                    if now >= due {
                        // A lease at the last epoch (only a forged one gets there) leaves no
                        // fencing token to claim with: the task waits; it never wraps to 0.
                        match rec.max_epoch().checked_add(1) {
                            None => pass.pending(*id, "no epoch left to claim it with".into()),
                            Some(epoch) => {
                                let failover = lease.is_some_and(|l| {
                                    !l.released
                                        && l.owner != self.me.id
                                        && top_failed != Some(l.epoch)
                                });
                                if disc.stop_after_ms.is_none() {
                                    committed.entry(self.me.id).or_default().book(&spec.spec);
                                    claimed_in.entry(group).or_default().book(&spec.spec);
                                }
                                steps.push(Step::Claim {
                                    task: *id,
                                    epoch,
                                    score,
                                    failover,
                                });
                            }
                        }
                    } else {
                        at(recheck);
                    }
                }
            }
        }

        let held: BTreeSet<TaskId> = self.state.tasks().map(|(id, _)| *id).collect();
        self.tasks.end_pass(now, pass, &held);
        self.quorum.retain_tasks(|t| held.contains(t));
        // Owning a task at most once needs majority contact too.
        for (task, _) in self.tasks.runs() {
            if let Some(d) = self
                .state
                .task(task)
                .and_then(|r| disconnect::policy_of(r).stop_after_ms)
            {
                let d = Millis::from(d);
                window = Some(window.map_or(d, |w: Millis| w.min(d)));
            }
        }
        self.contact_window = window;
        self.send_polls(now, wanted);

        for step in steps {
            self.apply_step(now, step);
        }
        if let Some(w) = wake {
            self.wake_at(w);
        }
    }

    fn apply_step(&mut self, now: Millis, step: Step) {
        match step {
            Step::Start(task, epoch) => {
                if self.quorum.confirmation(&task, epoch).is_some() {
                    self.stats.confirms += 1;
                    self.quorum.forget_confirm(&task);
                }
                let spec = self
                    .state
                    .task(&task)
                    .and_then(|r| r.spec.as_ref())
                    .map(|s| Arc::clone(&s.value));
                if let Some(spec) = spec {
                    self.outbox
                        .push_back(Action::StartTask { task, epoch, spec });
                    self.tasks.set_phase(&task, Phase::Started);
                }
            }
            Step::Adopt(task, from) => self.take_over_adopted(now, task, from),
            Step::Refused(task, epoch) => {
                self.stats.confirms_refused += 1;
                self.quorum.forget_confirm(&task);
                self.release(now, task, epoch);
                self.tasks.forget(&task);
            }
            Step::Stop(task, epoch, reason) => {
                if matches!(reason, StopReason::Fenced { .. }) {
                    self.stats.fenced += 1;
                }
                self.outbox.push_back(Action::StopTask {
                    task,
                    epoch,
                    reason,
                });
                self.tasks.set_phase(&task, Phase::Stopping);
            }
            Step::Forget(task) => {
                self.tasks.forget(&task);
            }
            Step::Release(task, epoch) => {
                self.release(now, task, epoch);
                self.tasks.forget(&task);
            }
            Step::CancelEpoch(task, epoch) => {
                self.report(
                    now,
                    task,
                    epoch,
                    TaskState::Cancelled,
                    None,
                    "cancelled before start",
                );
                self.tasks.forget(&task);
            }
            Step::Claim {
                task,
                epoch,
                score,
                failover,
            } => {
                let at_most_once = self
                    .state
                    .task(&task)
                    .is_some_and(|r| disconnect::policy_of(r).at_most_once());
                if at_most_once {
                    // Promises first, the lease after: see `Phase::Promising`.
                    self.tasks.promising(task, epoch, score, failover);
                    self.send_confirm(now, task, epoch);
                } else {
                    self.claim(now, task, epoch, score, failover);
                }
            }
            Step::Promised {
                task,
                epoch,
                score,
                failover,
            } => self.claim(now, task, epoch, score, failover),
            Step::Unpromised(task) => {
                self.stats.confirms_refused += 1;
                self.quorum.forget_confirm(&task);
                self.tasks.forget(&task);
            }
            Step::Compact(task, outcome) => {
                let end = self.state.ending(&task).map(Box::new);
                self.write(now, DeltaBody::Compact { task, outcome, end });
            }
        }
    }

    /// Writes this node's lease of `task` at `epoch` and settles before starting it.
    fn claim(&mut self, now: Millis, task: TaskId, epoch: Epoch, score: u32, failover: bool) {
        let lease = self.own_lease(epoch, score);
        self.write(now, DeltaBody::Lease { task, lease });
        let until = now + self.settle_ms();
        self.tasks.claimed(task, epoch, until);
        self.wake_at(until);
        self.stats.claims += 1;
        if failover {
            self.stats.failovers += 1;
        }
    }

    /// Where this node ranks among the live nodes to run the task of `rec` (see
    /// [`placement::place`]).
    fn rank_here(
        &self,
        rec: &TaskRecord,
        spec: &omesh_protocol::TaskSpec,
        committed: &BTreeMap<NodeId, Committed>,
        policy: &PlacementPolicy,
        live: &[&NodeRecord],
    ) -> Result<Option<(usize, u32)>, placement::Unplaceable> {
        Ok(self
            .placed_here(rec, spec, (committed, None, true), policy, live)?
            .mine)
    }

    /// [`Self::rank_here`] with what this pass booked on top of `committed`, and the node
    /// that ranks best (see [`placement::placed`]).
    fn placed_here(
        &self,
        rec: &TaskRecord,
        spec: &omesh_protocol::TaskSpec,
        (committed, booked, plain): (
            &BTreeMap<NodeId, Committed>,
            Option<&BTreeMap<NodeId, Committed>>,
            bool,
        ),
        policy: &PlacementPolicy,
        live: &[&NodeRecord],
    ) -> Result<placement::Placed, placement::Unplaceable> {
        let image = ImageRef::parse(&spec.image).ok().map(|r| r.digest);
        // Nearness to the submitting node counts while it lives: the tasks of a failed node
        // that it submitted itself would otherwise all rank its nearest survivors first.
        let via = rec
            .spec
            .as_ref()
            .map(|s| s.at.origin)
            .filter(|origin| live.iter().any(|n| n.id == *origin))
            .and_then(|origin| self.state.node(&origin));
        let placing = placement::Placing {
            committed,
            booked,
            plain,
            spec,
            image: image.as_ref(),
            via,
            fresh: rec.max_epoch() == 0,
            policy,
        };
        placement::placed(&self.me.id, live.iter().copied(), &placing)
    }

    /// A lease of this node's incarnation at `epoch`.
    pub(crate) fn own_lease(&self, epoch: Epoch, score: u32) -> Lease {
        Lease {
            epoch,
            owner: self.me.id,
            incarnation: self.cfg.incarnation,
            score,
            ttl_ms: u32::try_from(self.cfg.lease_ttl_ms).unwrap_or(u32::MAX),
            released: false,
        }
    }

    /// Hands a claimed but unstarted task back to the mesh.
    pub(crate) fn release(&mut self, now: Millis, task: TaskId, epoch: Epoch) {
        let current = self
            .state
            .task(&task)
            .and_then(|r| r.lease())
            .map(|l| l.value);
        if let Some(mut lease) = current.filter(|l| l.epoch == epoch && l.owner == self.me.id) {
            lease.released = true;
            self.write(now, DeltaBody::Lease { task, lease });
        }
    }

    fn report(
        &mut self,
        now: Millis,
        task: TaskId,
        epoch: Epoch,
        state: TaskState,
        code: Option<i32>,
        error: &str,
    ) {
        let entry = StatusEntry::new(state, code, error, now, self.me.id);
        self.write(now, DeltaBody::Status { task, epoch, entry });
    }

    pub(crate) fn on_executor(
        &mut self,
        now: Millis,
        task: TaskId,
        epoch: Epoch,
        event: ExecEvent,
    ) {
        let run = self.tasks.get(&task);
        let rec = self.state.task(&task);
        let current = rec.and_then(|r| r.lease()).is_some_and(|l| {
            l.value.epoch == epoch && l.value.owner == self.me.id && !l.value.released
        });
        let cancelled = rec.is_some_and(TaskRecord::is_cancelled);
        let ours = run.is_some_and(|r| r.epoch == epoch);
        if !matches!(event, ExecEvent::Started) && ours {
            self.tasks.forget(&task);
        }
        if matches!(event, ExecEvent::Expired) && ours {
            // Counted whether or not the lease is still this node's (a successor may have
            // been merged before the report came).
            self.stats.guard_expiries += 1;
        }
        if !ours || !current {
            self.stats.stale_reports += 1;
            self.mark_dirty(now);
            return;
        }
        match event {
            ExecEvent::Started if !cancelled => {
                self.report(now, task, epoch, TaskState::Running, None, "");
                // Placement counts the task's CPU ask on top of this node's load until a
                // record written LOAD_LAG_MS after this start shows it: publish one then,
                // even if the load moved too little to publish for.
                let asks_cpu = self
                    .state
                    .task(&task)
                    .and_then(|r| r.spec.as_ref())
                    .is_some_and(|s| s.value.spec.cpu_millis > 0);
                if asks_cpu {
                    self.record.at(now.saturating_add(placement::LOAD_LAG_MS));
                }
            }
            ExecEvent::Started => {}
            _ if cancelled => {
                self.report(now, task, epoch, TaskState::Cancelled, None, "cancelled")
            }
            ExecEvent::Exited { code: 0 } => {
                self.report(now, task, epoch, TaskState::Succeeded, Some(0), "")
            }
            ExecEvent::Exited { code } => {
                let why = format!("exited with code {code}");
                self.report(now, task, epoch, TaskState::Failed, Some(code), &why);
            }
            ExecEvent::Failed { error } => {
                self.report(now, task, epoch, TaskState::Failed, None, &error)
            }
            // Stopped because this node leaves: hand the task back at once (an at-most-once
            // task waits for this rather than for the leave itself).
            ExecEvent::Stopped if self.me.leaving => self.release(now, task, epoch),
            ExecEvent::Stopped => {}
            ExecEvent::Expired => self.release(now, task, epoch),
        }
        self.mark_dirty(now);
    }
}
