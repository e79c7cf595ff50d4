//! The replica's driver contract as one suite that every driver runs: this harness's
//! [`Mesh`](crate::Mesh), netsim's simulator and the peer's in-process driver.
//!
//! A driver implements [`Driver`] and records what it feeds and polls in a [`Journal`],
//! which checks the duties written on `omesh_state::Replica` as they happen:
//! - `now` never goes back for one replica;
//! - after every input the driver polls actions until `None` before it feeds the next one
//!   (its own answers, executor reports and `SyncFailed`, may be fed in between: they only
//!   append);
//! - a gossip delivery names the relay it came through (`Input::Gossip::via`): never the
//!   receiver itself, always a node of the mesh;
//! - every `StartTask` is answered by an executor report for the same epoch (`Started`,
//!   `Exited` or `Failed`), and every `StopTask` by `Stopped` (or `Exited`/`Failed`), unless
//!   the node crashed; no report names an epoch that was not started there;
//! - a tick comes no later than `slack_ms` after the time `poll_timeout` asked for.
//!
//! [`run_all`] then runs the scenarios (join, run once, cancel and compaction, crash and
//! failover) through the driver's own I/O and checks what they must show.

use std::collections::{BTreeMap, BTreeSet};

use omesh_protocol::{Epoch, Millis, NodeId, SignedTaskSpec, TaskId, TaskState};
use omesh_state::{Action, ExecEvent, Health, Input, Replica, ReplicaConfig};

use crate::fixtures;

/// A driver of several replicas, as the conformance suite sees it.
pub trait Driver {
    /// The driven nodes, in a fixed order.
    fn nodes(&self) -> Vec<NodeId>;
    /// Lets `ms` of the driver's time pass: deliveries, ticks and executor reports happen.
    fn advance(&mut self, ms: Millis);
    /// Reads one replica, with the driver's current time for it.
    fn inspect(&self, id: NodeId, f: &mut dyn FnMut(&Replica, Millis));
    /// Submits a signed spec through `at`.
    fn submit(&mut self, at: NodeId, spec: SignedTaskSpec);
    /// Cancels `task` through `at`.
    fn cancel(&mut self, at: NodeId, task: TaskId);
    /// The executor on `at` reports that its instance of `task` exited with `code`; false
    /// if no instance of `task` runs there.
    fn exit(&mut self, at: NodeId, task: TaskId, code: i32) -> bool;
    /// The instances the driver's executor runs now: (node, task, epoch).
    fn running(&self) -> Vec<(NodeId, TaskId, Epoch)>;
    /// Crashes `id`: it gets no more input and its instances die with it.
    fn crash(&mut self, id: NodeId);
    /// What the driver recorded of its calls.
    fn journal(&self) -> &Journal;
}

/// The configs of a conformance mesh of `n` nodes: authorized submitter, short retention so
/// that compaction shows within a scenario.
pub fn configs(n: u8) -> Vec<ReplicaConfig> {
    (1..=n)
        .map(|i| {
            let mut cfg = fixtures::config(i);
            cfg.retention_ms = 3_000;
            cfg
        })
        .collect()
}

/// Runs every scenario, each on a fresh driver built from the configs it is given.
pub fn run_all<D: Driver>(mut make: impl FnMut(Vec<ReplicaConfig>) -> D) {
    join_and_converge(&mut make(configs(3)));
    run_once_and_report(&mut make(configs(3)));
    cancel_is_answered_and_compacted(&mut make(configs(3)));
    crash_fails_over(&mut make(configs(3)));
}

/// Advances in steps of 50 ms until `cond` holds, for at most `limit_ms`.
pub fn wait_for<D: Driver + ?Sized>(
    d: &mut D,
    limit_ms: Millis,
    mut cond: impl FnMut(&D) -> bool,
) -> bool {
    let mut waited = 0;
    loop {
        if cond(d) {
            return true;
        }
        if waited >= limit_ms {
            return false;
        }
        d.advance(50);
        waited += 50;
    }
}

/// Reads `f` of one replica.
pub fn read<D: Driver + ?Sized, R>(d: &D, id: NodeId, f: impl FnOnce(&Replica, Millis) -> R) -> R {
    let mut f = Some(f);
    let mut out = None;
    d.inspect(id, &mut |r, now| {
        if let Some(f) = f.take() {
            out = Some(f(r, now));
        }
    });
    match out {
        Some(out) => out,
        None => panic!("driver did not show replica {id}"),
    }
}

fn all_alive_and_converged<D: Driver + ?Sized>(d: &D, live: &[NodeId]) -> bool {
    let digests: Vec<_> = live
        .iter()
        .map(|id| read(d, *id, |r, _| r.digest()))
        .collect();
    digests.windows(2).all(|w| w[0] == w[1])
        && live.iter().all(|a| {
            read(d, *a, |r, now| {
                r.may_claim(now) && live.iter().all(|b| r.health(now, b) == Health::Alive)
            })
        })
}

fn state_everywhere<D: Driver + ?Sized>(d: &D, task: TaskId, want: TaskState) -> bool {
    d.nodes()
        .iter()
        .all(|id| read(d, *id, |r, now| r.task_state(now, &task)) == Some(want))
}

fn check_journal<D: Driver + ?Sized>(d: &D, scenario: &str) {
    let j = d.journal();
    let problems = j.problems();
    assert!(
        problems.is_empty(),
        "{scenario}: the driver broke the replica contract:\n  {}",
        problems.join("\n  ")
    );
    assert!(
        j.inputs > 0,
        "{scenario}: the driver recorded nothing in its journal"
    );
}

/// Waits until the mesh has joined, submits `spec` through the first node, and waits until
/// an instance of it runs: the task, and the node and epoch of that instance.
fn start_on_joined<D: Driver + ?Sized>(
    d: &mut D,
    spec: SignedTaskSpec,
    scenario: &str,
) -> (TaskId, NodeId, Epoch) {
    let nodes = d.nodes();
    assert!(
        wait_for(d, 30_000, |d| all_alive_and_converged(d, &nodes)),
        "{scenario}: the mesh did not converge"
    );
    let task = spec.id();
    d.submit(nodes[0], spec);
    assert!(
        wait_for(d, 30_000, |d| d.running().iter().any(|r| r.1 == task)),
        "{scenario}: the task never ran"
    );
    let run = d.running().into_iter().find(|r| r.1 == task);
    match run {
        Some((node, _, epoch)) => (task, node, epoch),
        None => unreachable!("{scenario}: waited for it to run"),
    }
}

/// Three nodes started together know each other as alive and agree on the state.
pub fn join_and_converge<D: Driver + ?Sized>(d: &mut D) {
    let nodes = d.nodes();
    assert!(
        wait_for(d, 30_000, |d| all_alive_and_converged(d, &nodes)),
        "join: the mesh did not converge"
    );
    check_journal(d, "join");
}

/// A task submitted through one node runs on exactly one node, and its exit is the task's
/// result everywhere.
pub fn run_once_and_report<D: Driver + ?Sized>(d: &mut D) {
    let (task, _, _) = start_on_joined(d, fixtures::spec(9_001), "run once");
    // Settle: one instance, and it stays one.
    d.advance(2_000);
    let runs: Vec<_> = d.running().into_iter().filter(|r| r.1 == task).collect();
    assert_eq!(runs.len(), 1, "run once: {runs:?}");
    let (owner, _, epoch) = runs[0];
    assert!(
        wait_for(d, 10_000, |d| state_everywhere(d, task, TaskState::Running)),
        "run once: not Running everywhere"
    );
    assert!(d.exit(owner, task, 0));
    assert!(
        wait_for(d, 30_000, |d| state_everywhere(
            d,
            task,
            TaskState::Succeeded
        )),
        "run once: not Succeeded everywhere"
    );
    let epochs = d.journal().started(task);
    assert_eq!(epochs, vec![(owner, epoch)], "run once: starts {epochs:?}");
    check_journal(d, "run once");
}

/// A cancel stops the running instance through a StopTask the driver answers with
/// `Stopped`, and the task is then compacted everywhere (a run left Stopping never is).
pub fn cancel_is_answered_and_compacted<D: Driver + ?Sized>(d: &mut D) {
    let spec = fixtures::spec_with(9_002, |s| s.command = vec!["sleep".into(), "600".into()]);
    let (task, owner, _) = start_on_joined(d, spec, "cancel");
    let nodes = d.nodes();
    let other = nodes.iter().copied().find(|n| *n != owner).unwrap_or(owner);
    d.cancel(other, task);
    assert!(
        wait_for(d, 30_000, |d| !d.running().iter().any(|r| r.1 == task)),
        "cancel: the instance kept running"
    );
    assert!(
        wait_for(d, 30_000, |d| state_everywhere(
            d,
            task,
            TaskState::Cancelled
        )),
        "cancel: not Cancelled everywhere"
    );
    assert!(
        d.journal().stopped(task) > 0,
        "cancel: no StopTask was answered"
    );
    assert!(
        wait_for(d, 60_000, |d| d.nodes().iter().all(|id| read(
            d,
            *id,
            |r, _| r.state().tombstone(&task).is_some()
        ))),
        "cancel: the task was never compacted (a StopTask left unanswered keeps it)"
    );
    check_journal(d, "cancel");
}

/// The owner of a running task crashes; another node runs it at a higher epoch.
pub fn crash_fails_over<D: Driver + ?Sized>(d: &mut D) {
    let spec = fixtures::spec_with(9_003, |s| s.command = vec!["sleep".into(), "600".into()]);
    let (task, owner, epoch) = start_on_joined(d, spec, "failover");
    d.crash(owner);
    assert!(
        wait_for(d, 60_000, |d| d
            .running()
            .iter()
            .any(|r| r.1 == task && r.0 != owner && r.2 > epoch)),
        "failover: no other node took the task over"
    );
    check_journal(d, "failover");
}

/// What a driver fed its replicas and polled from them, checked against the contract as it
/// is recorded. Drivers call [`Journal::fed`] before `handle`, [`Journal::polled`] for each
/// action, [`Journal::drained`] when `poll_action` returned `None`, [`Journal::timeout`]
/// with `poll_timeout` after draining, and [`Journal::crashed`] when a node dies.
#[derive(Debug, Default, Clone)]
pub struct Journal {
    slack_ms: Millis,
    mesh: BTreeSet<NodeId>,
    last_now: BTreeMap<NodeId, Millis>,
    undrained: BTreeSet<NodeId>,
    due: BTreeMap<NodeId, Millis>,
    starts: BTreeMap<(NodeId, TaskId, Epoch), bool>,
    stops: BTreeSet<(NodeId, TaskId, Epoch)>,
    stops_answered: BTreeMap<TaskId, u32>,
    problems: Vec<String>,
    /// Inputs recorded.
    pub inputs: u64,
}

impl Journal {
    /// A journal for a mesh of `nodes`, allowing ticks up to `slack_ms` late.
    pub fn new(nodes: impl IntoIterator<Item = NodeId>, slack_ms: Millis) -> Self {
        Self {
            slack_ms,
            mesh: nodes.into_iter().collect(),
            ..Self::default()
        }
    }

    fn problem(&mut self, p: String) {
        // One of each is enough to read; a broken driver would repeat it thousands of times.
        if self.problems.len() < 20 && !self.problems.contains(&p) {
            self.problems.push(p);
        }
    }

    /// `node` is about to `handle(now, input)`.
    pub fn fed(&mut self, node: NodeId, now: Millis, input: &Input) {
        self.inputs += 1;
        if let Some(last) = self.last_now.insert(node, now) {
            if now < last {
                self.problem(format!("{node}: time went back from {last} to {now}"));
            }
        }
        let report = matches!(input, Input::Executor { .. } | Input::SyncFailed { .. });
        if !report && self.undrained.contains(&node) {
            self.problem(format!(
                "{node}: fed {} before polling every action of the input before",
                kind(input)
            ));
        }
        match input {
            Input::Tick => {
                if let Some(due) = self.due.remove(&node) {
                    if now > due + self.slack_ms {
                        self.problem(format!(
                            "{node}: tick at {now}, {} ms after poll_timeout asked ({due})",
                            now - due
                        ));
                    }
                }
            }
            Input::Gossip { via, .. } => {
                if *via == node {
                    self.problem(format!("{node}: gossip names the receiver as its relay"));
                } else if !self.mesh.contains(via) {
                    self.problem(format!("{node}: gossip names {via}, no node of the mesh"));
                }
            }
            Input::Executor { task, epoch, event } => {
                let key = (node, *task, *epoch);
                if !self.starts.contains_key(&key) && !self.stops.contains(&key) {
                    self.problem(format!(
                        "{node}: executor report {event:?} for {task} epoch {epoch}, never started there"
                    ));
                }
                // Any report answers the start: an instance stopped before it ran too.
                if let Some(answered) = self.starts.get_mut(&key) {
                    *answered = true;
                }
                if !matches!(event, ExecEvent::Started) && self.stops.remove(&key) {
                    *self.stops_answered.entry(*task).or_default() += 1;
                }
            }
            _ => {}
        }
        self.undrained.insert(node);
    }

    /// `node`'s `poll_action` returned `action`.
    pub fn polled(&mut self, node: NodeId, action: &Action) {
        match action {
            Action::StartTask { task, epoch, .. } => {
                self.starts.insert((node, *task, *epoch), false);
            }
            Action::StopTask { task, epoch, .. } => {
                self.stops.insert((node, *task, *epoch));
            }
            _ => {}
        }
    }

    /// `node`'s `poll_action` returned `None`.
    pub fn drained(&mut self, node: NodeId) {
        self.undrained.remove(&node);
    }

    /// After draining, `node`'s `poll_timeout` asked for a tick at `at`.
    pub fn timeout(&mut self, node: NodeId, at: Option<Millis>) {
        match at {
            Some(at) => {
                // A time already past (a replica not started asks for 0) means at once.
                let fed = self.last_now.get(&node).copied().unwrap_or(0);
                self.due.insert(node, at.max(fed));
            }
            None => {
                self.due.remove(&node);
            }
        }
    }

    /// `node` crashed: what it owed dies with it (a restart owes nothing of it).
    pub fn crashed(&mut self, node: NodeId) {
        self.due.remove(&node);
        self.undrained.remove(&node);
        self.last_now.remove(&node);
        self.stops.retain(|k| k.0 != node);
        for (k, answered) in &mut self.starts {
            if k.0 == node {
                *answered = true;
            }
        }
    }

    /// The epochs of `task` started, by node, in order of (node, epoch).
    pub fn started(&self, task: TaskId) -> Vec<(NodeId, Epoch)> {
        self.starts
            .keys()
            .filter(|k| k.1 == task)
            .map(|k| (k.0, k.2))
            .collect()
    }

    /// StopTasks of `task` answered so far.
    pub fn stopped(&self, task: TaskId) -> u32 {
        self.stops_answered.get(&task).copied().unwrap_or(0)
    }

    /// Every breach of the contract seen, plus the duties still owed by live nodes.
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.problems.clone();
        for (node, task, epoch) in &self.stops {
            out.push(format!(
                "{node}: StopTask of {task} epoch {epoch} never answered"
            ));
        }
        for ((node, task, epoch), answered) in &self.starts {
            if !answered {
                out.push(format!(
                    "{node}: StartTask of {task} epoch {epoch} never answered"
                ));
            }
        }
        out
    }
}

fn kind(input: &Input) -> &'static str {
    match input {
        Input::Tick => "Tick",
        Input::Gossip { .. } => "Gossip",
        Input::SyncRequest { .. } => "SyncRequest",
        Input::SyncReply { .. } => "SyncReply",
        Input::Probe { .. } => "Probe",
        Input::Connected(_) => "Connected",
        Input::SyncFailed { .. } => "SyncFailed",
        Input::Load(_) => "Load",
        Input::Rtt { .. } => "Rtt",
        Input::Addresses(_) => "Addresses",
        Input::Images(_) => "Images",
        Input::Submit(_) => "Submit",
        Input::Cancel(_) => "Cancel",
        Input::Revoke(_) => "Revoke",
        Input::Executor { .. } => "Executor",
        Input::Leave => "Leave",
        Input::Adopt { .. } => "Adopt",
    }
}
