//! Disconnect policies (a task spec's `disconnect`), as the simulator measures them:
//!
//! - per policy (default, `stop_after`, `lost_after`): the duplicate-run window, the time two
//!   or more instances of one task ran at once, any epochs (`stop_after` promises none);
//! - `stop_after`: instances stopped (by their guard or the replica) while their node was on
//!   a minority side, and how long their task then ran nowhere (until its next instance
//!   started anywhere): the price of running at most once;
//! - `lost_after = L`: *dropouts*, an instance running when a cut set its node apart from part
//!   of the mesh that could take its task over (live nodes in contact with some other node:
//!   an owner cut off from everyone is dropped, the rest are not dropped from it), from that
//!   moment until no such node is cut from it any more. A dropout
//!   shorter than `L` must see no failover (a later epoch of the task started on another
//!   node); one of at least `L` may, and is reported with when it did.
//!
//! A node is on a minority side while the live nodes it can reach both ways (itself
//! included) are no more than half of the members (every node identity not replaced, up or
//! down): the replica's own notion of a majority, seen from outside.

use omesh_protocol::Disconnect;

use crate::queue::{SimTime, US_PER_MS};
use crate::report::pct;
use crate::sim::{ix, Sim, Slot};

/// A failover that starts this long after a dropout healed still counts as the dropout's:
/// a claim made just before the heal starts after `settle_ms` and the executor's delay.
pub const FAILOVER_SLACK_US: SimTime = 5_000 * US_PER_MS;

/// A task's disconnect policy, as the figures are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Policy {
    /// Neither window: replaced as soon as the owner's lease counts as lost.
    Default,
    /// `stop_after` (with or without `lost_after`): at most once.
    StopAfter,
    /// `lost_after` alone: kept through drops shorter than the window.
    LostAfter,
}

impl Policy {
    /// Every policy, in table order.
    pub const ALL: [Self; 3] = [Self::Default, Self::StopAfter, Self::LostAfter];

    /// The policy a spec's `disconnect` asks for.
    pub fn of(d: &Disconnect) -> Self {
        if d.stop_after_ms.is_some() {
            Self::StopAfter
        } else if d.lost_after_ms.is_some() {
            Self::LostAfter
        } else {
            Self::Default
        }
    }

    /// Its name in reports and `[expect]` keys.
    pub fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::StopAfter => "stop_after",
            Self::LostAfter => "lost_after",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Default => 0,
            Self::StopAfter => 1,
            Self::LostAfter => 2,
        }
    }
}

/// A `lost_after` instance whose node a cut set apart from part of the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropout {
    /// The instance (index into `Runs::instances`).
    pub inst: usize,
    /// When the cut set its node apart.
    pub from: SimTime,
    /// When its node was no longer set apart (`None`: not before the run ended).
    pub until: Option<SimTime>,
}

/// A `stop_after` instance stopped before it exited: by its guard or by the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EarlyStop {
    /// The instance (index into `Runs::instances`).
    pub inst: usize,
    /// Its node was on a minority side then.
    pub minority: bool,
    /// Its guard killed it (else the replica stopped it).
    pub by_guard: bool,
}

/// What the simulation records for the figures while it runs.
#[derive(Debug, Default)]
pub struct DisconnectLog {
    /// Every dropout of a `lost_after` instance.
    pub dropouts: Vec<Dropout>,
    /// Every `stop_after` instance stopped before it exited.
    pub early_stops: Vec<EarlyStop>,
}

impl Sim {
    /// The members a majority is counted over: node identities not replaced, up or down.
    fn members(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.replaced_by.is_none())
            .count()
    }

    /// Whether node `i` and node `j` (up) exchange messages both ways through every cut.
    fn in_contact(&self, i: u32, j: u32) -> bool {
        i == j
            || (self.nodes[ix(j)].up()
                && self.network.reachable(i, j)
                && self.network.reachable(j, i))
    }

    /// Whether node `i` is on a minority side now: the live nodes it reaches both ways, itself
    /// included, are no more than half of the members.
    pub fn on_minority(&self, i: u32) -> bool {
        let all = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        let contact = (0..all).filter(|j| self.in_contact(i, *j)).count();
        2 * contact <= self.members()
    }

    /// Per node, whether it is up and in contact with some other node: one that could
    /// count an unreachable owner lost and take its task over (a node that hears no one
    /// claims nothing).
    fn in_company(&self) -> Vec<bool> {
        let all = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        (0..all)
            .map(|j| self.nodes[ix(j)].up() && (0..all).any(|k| k != j && self.in_contact(j, k)))
            .collect()
    }

    /// Whether a cut sets node `i` apart from some live node that is in company (see
    /// [`Sim::in_company`]): an owner isolated from everyone is set apart from the rest, but
    /// the rest are not set apart from it.
    fn set_apart(&self, i: u32, company: &[bool]) -> bool {
        let all = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        (0..all).any(|j| company[ix(j)] && !self.in_contact(i, j))
    }

    /// The cuts in force changed (a partition, split or isolation started or healed, or a
    /// flapping one toggled): opens a dropout for every running `lost_after` instance whose
    /// node is now set apart, closes those whose node is no longer.
    pub(crate) fn cuts_changed(&mut self) {
        let now = self.queue.now();
        let lost_after = |t: u32| {
            self.tasks
                .get(ix(t))
                .is_some_and(|t| Policy::of(&t.disconnect) == Policy::LostAfter)
        };
        let running: Vec<(u32, usize)> = self
            .up_nodes()
            .flat_map(|(i, n)| {
                n.exec.iter().filter_map(move |((t, _), slot)| match slot {
                    Slot::Running(inst) => Some((i, *t, *inst)),
                    Slot::Starting => None,
                })
            })
            .filter(|(_, t, _)| lost_after(*t))
            .map(|(i, _, inst)| (i, inst))
            .collect();
        let open: Vec<usize> = (0..self.disconnect.dropouts.len())
            .filter(|k| self.disconnect.dropouts[*k].until.is_none())
            .collect();
        if running.is_empty() && open.is_empty() {
            return;
        }
        let company = self.in_company();
        for k in open {
            let inst = self.disconnect.dropouts[k].inst;
            let Some(node) = self.runs.instances.get(inst).map(|i| i.node) else {
                continue;
            };
            if !self.nodes[ix(node)].up() || !self.set_apart(node, &company) {
                self.disconnect.dropouts[k].until = Some(now);
            }
        }
        for (node, inst) in running {
            let open = self
                .disconnect
                .dropouts
                .iter()
                .any(|d| d.inst == inst && d.until.is_none());
            if !open && self.set_apart(node, &company) {
                self.disconnect.dropouts.push(Dropout {
                    inst,
                    from: now,
                    until: None,
                });
            }
        }
    }

    /// Instance `inst` of task `task` on node `i` was stopped before it exited (by its guard
    /// when `by_guard`, else by the replica): recorded if its task is `stop_after`.
    pub(crate) fn stopped_early(&mut self, i: u32, task: u32, inst: usize, by_guard: bool) {
        let at_most_once = self
            .tasks
            .get(ix(task))
            .is_some_and(|t| Policy::of(&t.disconnect) == Policy::StopAfter);
        if at_most_once {
            let minority = self.on_minority(i);
            self.disconnect.early_stops.push(EarlyStop {
                inst,
                minority,
                by_guard,
            });
        }
    }
}

/// The duplicate-run figures of one policy.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PolicyRuns {
    /// Tasks of this policy the replicas accepted.
    pub tasks: usize,
    /// Of those, tasks two or more of whose instances ran at once.
    pub ran_twice: usize,
    /// The longest time two or more instances of one task ran at once, in ms.
    pub max_duplicate_ms: f64,
}

/// The disconnect-policy figures of one run, or of a sweep's runs merged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DisconnectFigures {
    /// Per policy, in [`Policy::ALL`] order.
    pub policies: [PolicyRuns; 3],
    /// `stop_after` instances stopped on a minority side: per instance, the time from its
    /// end until its task's next instance started anywhere (or until the run ended), in ms.
    pub minority_downtime_ms: Vec<f64>,
    /// Of those, instances whose task had not started again when the run ended.
    pub minority_not_restarted: usize,
    /// `stop_after` instances stopped early on a node that was not on a minority side.
    pub majority_stops: usize,
    /// `lost_after` dropouts shorter than the task's window.
    pub short_drops: usize,
    /// Of those, dropouts during which the task failed over.
    pub short_drop_failovers: usize,
    /// `lost_after` dropouts of at least the task's window (healed, or still cut at the end).
    pub long_drops: usize,
    /// Per long dropout that failed over, the time from the dropout to the failover, in ms.
    pub long_drop_failover_ms: Vec<f64>,
}

impl DisconnectFigures {
    /// Reads the figures of a finished simulation.
    pub fn collect(sim: &Sim) -> Self {
        let end = sim.end_time();
        let ms = |us: SimTime| us as f64 / 1_000.0;
        let mut f = Self::default();
        for info in sim.tasks.iter().filter(|t| t.accepted) {
            f.policies[Policy::of(&info.disconnect).index()].tasks += 1;
        }
        for t in sim.runs.tasks() {
            let Some(info) = sim.tasks.get(ix(t)) else {
                continue;
            };
            let w = sim.runs.duplicate_window(t, end);
            let p = &mut f.policies[Policy::of(&info.disconnect).index()];
            if w > 0 {
                p.ran_twice += 1;
                p.max_duplicate_ms = p.max_duplicate_ms.max(ms(w));
            }
        }
        let instances = &sim.runs.instances;
        for stop in &sim.disconnect.early_stops {
            let Some(old) = instances.get(stop.inst) else {
                continue;
            };
            if !stop.minority {
                f.majority_stops += 1;
                continue;
            }
            let ended = old.ended_at.unwrap_or(end);
            let next = instances
                .iter()
                .filter(|n| n.task == old.task && n.started_at >= ended)
                .map(|n| n.started_at)
                .min();
            if next.is_none() {
                f.minority_not_restarted += 1;
            }
            f.minority_downtime_ms
                .push(ms(next.unwrap_or(end).saturating_sub(ended)));
        }
        for d in &sim.disconnect.dropouts {
            let Some(old) = instances.get(d.inst) else {
                continue;
            };
            let Some(window) = sim
                .tasks
                .get(ix(old.task))
                .and_then(|t| t.disconnect.lost_after_ms)
            else {
                continue;
            };
            let window = SimTime::from(window) * US_PER_MS;
            let until = d.until.unwrap_or(end);
            let failover = instances
                .iter()
                .filter(|n| n.task == old.task && n.epoch > old.epoch && n.node != old.node)
                .filter(|n| n.started_at >= d.from && n.started_at <= until + FAILOVER_SLACK_US)
                .map(|n| n.started_at)
                .min();
            if until - d.from >= window {
                f.long_drops += 1;
                if let Some(at) = failover {
                    f.long_drop_failover_ms.push(ms(at - d.from));
                }
            } else if d.until.is_some() {
                // A dropout still open at the end and shorter than the window is undecided.
                f.short_drops += 1;
                if failover.is_some() {
                    f.short_drop_failovers += 1;
                }
            }
        }
        f
    }

    /// Adds another run's figures (a sweep over seeds).
    pub fn merge(&mut self, o: &Self) {
        for (a, b) in self.policies.iter_mut().zip(&o.policies) {
            a.tasks += b.tasks;
            a.ran_twice += b.ran_twice;
            a.max_duplicate_ms = a.max_duplicate_ms.max(b.max_duplicate_ms);
        }
        self.minority_downtime_ms
            .extend_from_slice(&o.minority_downtime_ms);
        self.minority_not_restarted += o.minority_not_restarted;
        self.majority_stops += o.majority_stops;
        self.short_drops += o.short_drops;
        self.short_drop_failovers += o.short_drop_failovers;
        self.long_drops += o.long_drops;
        self.long_drop_failover_ms
            .extend_from_slice(&o.long_drop_failover_ms);
    }

    /// The figures of one policy.
    pub fn of(&self, p: Policy) -> &PolicyRuns {
        &self.policies[p.index()]
    }

    /// Whether any task asked for a policy other than the default.
    pub fn any_policy(&self) -> bool {
        self.of(Policy::StopAfter).tasks + self.of(Policy::LostAfter).tasks > 0
    }

    /// One line per policy with tasks, for the report table: `(policy, text)`.
    pub fn lines(&self) -> Vec<(Policy, String)> {
        let s = crate::report::ms_str;
        Policy::ALL
            .into_iter()
            .filter(|p| self.of(*p).tasks > 0)
            .map(|p| {
                let r = self.of(p);
                let mut line = format!(
                    "{} tasks: duplicate window max {} ({} ran twice at once)",
                    r.tasks,
                    s(Some(r.max_duplicate_ms)),
                    r.ran_twice
                );
                match p {
                    Policy::Default => {}
                    Policy::StopAfter => line.push_str(&format!(
                        "; stopped on a minority side {} (down p50 {} / p99 {} / max {}, {} not restarted), elsewhere {}",
                        self.minority_downtime_ms.len(),
                        s(pct(&self.minority_downtime_ms, 50.0)),
                        s(pct(&self.minority_downtime_ms, 99.0)),
                        s(pct(&self.minority_downtime_ms, 100.0)),
                        self.minority_not_restarted,
                        self.majority_stops
                    )),
                    Policy::LostAfter => line.push_str(&format!(
                        "; drops shorter than the window {} ({} failed over), longer {} ({} failed over, after p50 {} / min {})",
                        self.short_drops,
                        self.short_drop_failovers,
                        self.long_drops,
                        self.long_drop_failover_ms.len(),
                        s(pct(&self.long_drop_failover_ms, 50.0)),
                        s(pct(&self.long_drop_failover_ms, 0.0)),
                    )),
                }
                (p, line)
            })
            .collect()
    }
}
