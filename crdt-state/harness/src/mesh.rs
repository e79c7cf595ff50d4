//! A small deterministic mesh of replicas for scenario and property tests, in the style of
//! raft-rs's harness: explicit time, a network that really drops, duplicates and reorders
//! (`drop_permille`, `dup_permille`, `jitter_ms`), manual faults (`cut`, `isolate`,
//! `crash`), and a fake executor that records which epochs run where.

use std::collections::{BTreeMap, BTreeSet};

use omesh_protocol::{Epoch, LoadSample, Millis, NodeId, SignedTaskSpec, TaskId};
use omesh_state::{Action, ExecEvent, Input, Replica, ReplicaConfig, StopReason};
use rand::Rng;

use crate::conformance::{Driver, Journal};
use crate::fixtures::config;

/// One started instance, as the fake executor saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instance {
    pub node: NodeId,
    pub task: TaskId,
    pub epoch: Epoch,
    pub started_at: Millis,
    pub stopped_at: Option<Millis>,
}

/// What the network did to the messages sent so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Messages handed to the network (cut links excluded).
    pub sent: u64,
    /// Dropped at random.
    pub dropped: u64,
    /// Delivered twice.
    pub duplicated: u64,
    /// Delivered after a message that the same sender sent to the same receiver later.
    pub reordered: u64,
    /// Deliveries made.
    pub delivered: u64,
    /// Every (sender, receiver) pair a probe or a sync went between: the peers a node would
    /// hold a connection to (gossip travels over its own mesh, and is not counted here).
    pub links: BTreeSet<(NodeId, NodeId)>,
}

/// A message on its way: to whom, and its place in its sender's stream to that receiver.
struct Delivery {
    from: NodeId,
    to: NodeId,
    sent_seq: u64,
    input: Input,
}

/// A mesh of replicas on simulated time.
pub struct Mesh {
    pub now: Millis,
    pub replicas: BTreeMap<NodeId, Replica>,
    /// Directed links that drop everything.
    pub cut: BTreeSet<(NodeId, NodeId)>,
    /// Crashed nodes: no ticks, no delivery.
    pub down: BTreeSet<NodeId>,
    /// One-way delivery delay.
    pub latency: Millis,
    /// In flight, in delivery order: (due time, order of sending).
    queue: BTreeMap<(Millis, u64), Delivery>,
    next_seq: u64,
    /// Per directed link, the highest sending order delivered (to see reordering).
    delivered_seq: BTreeMap<(NodeId, NodeId), u64>,
    /// What the network did.
    pub net: NetStats,
    /// Everything fed and polled, checked against the replica's contract.
    pub journal: Journal,
    pub instances: Vec<Instance>,
    pub stops: Vec<(NodeId, TaskId, Epoch, StopReason)>,
    /// Report `Started` as soon as a StartTask is seen.
    pub auto_start: bool,
    /// Chance, in thousandths, that a message (gossip, sync, probe) is dropped.
    pub drop_permille: u32,
    /// Chance, in thousandths, that a message is delivered twice.
    pub dup_permille: u32,
    /// Extra random delay per message, uniform in `0..=jitter_ms` (reorders deliveries).
    pub jitter_ms: Millis,
    /// Nodes whose incoming liveness probes are dropped (everything else reaches them).
    pub deaf_to_probes: BTreeSet<NodeId>,
    /// The guards of the instances, as the peer runs them: an instance is killed (and its
    /// node fed `ExecEvent::Expired`) once its node's `instance_deadline`, less this margin,
    /// has passed. `None`: no guards (instances live until stopped or crashed).
    pub guard_margin: Option<Millis>,
    /// Instances killed by their guard: (node, task, epoch, when).
    pub guard_kills: Vec<(NodeId, TaskId, Epoch, Millis)>,
    rng: rand_chacha::ChaCha8Rng,
}

impl Mesh {
    /// `n` replicas numbered 1..=n, with `tweak` applied to each config.
    pub fn new(n: u8, tweak: impl Fn(&mut ReplicaConfig)) -> Self {
        let configs = (1..=n)
            .map(|i| {
                let mut cfg = config(i);
                tweak(&mut cfg);
                cfg
            })
            .collect();
        Self::from_configs(configs, u64::from(n))
    }

    /// A mesh of one replica per config.
    pub fn from_configs(configs: Vec<ReplicaConfig>, seed: u64) -> Self {
        let mut replicas = BTreeMap::new();
        for cfg in configs {
            let id = cfg.node_id;
            let key = crate::fixtures::key_of(&id).expect("a test node id (fixtures::node)");
            replicas.insert(id, Replica::new(cfg, key).expect("valid test config"));
        }
        // Time moves in 1 ms steps: a tick asked for `now` comes at the next one.
        let journal = Journal::new(replicas.keys().copied(), 1);
        Self {
            now: 0,
            replicas,
            cut: BTreeSet::new(),
            down: BTreeSet::new(),
            latency: 5,
            queue: BTreeMap::new(),
            next_seq: 0,
            delivered_seq: BTreeMap::new(),
            net: NetStats::default(),
            journal,
            instances: Vec::new(),
            stops: Vec::new(),
            auto_start: true,
            drop_permille: 0,
            dup_permille: 0,
            jitter_ms: 0,
            deaf_to_probes: BTreeSet::new(),
            guard_margin: Some(500),
            guard_kills: Vec::new(),
            rng: rand::SeedableRng::seed_from_u64(seed),
        }
    }

    /// Seeds the fault injection.
    pub fn seed(&mut self, seed: u64) {
        self.rng = rand::SeedableRng::seed_from_u64(seed);
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.replicas.keys().copied().collect()
    }

    pub fn replica(&self, id: NodeId) -> &Replica {
        &self.replicas[&id]
    }

    /// Cuts both directions between `a` and every node in `others`.
    pub fn isolate(&mut self, a: NodeId) {
        for b in self.ids() {
            if b != a {
                self.cut.insert((a, b));
                self.cut.insert((b, a));
            }
        }
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// Feeds an input to one replica now and routes what it emits.
    pub fn input(&mut self, to: NodeId, input: Input) -> Result<(), omesh_state::InputError> {
        let r = self.feed(to, input);
        self.drain(to);
        r
    }

    /// The one place a replica is handed an input, recorded in the journal.
    fn feed(&mut self, to: NodeId, input: Input) -> Result<(), omesh_state::InputError> {
        let now = self.now;
        self.journal.fed(to, now, &input);
        self.replicas
            .get_mut(&to)
            .expect("a node of this mesh")
            .handle(now, input)
    }

    pub fn submit(&mut self, to: NodeId, s: SignedTaskSpec) -> TaskId {
        let id = s.id();
        self.input(to, Input::Submit(s))
            .expect("the harness submitter is authorized");
        id
    }

    pub fn load(&mut self, to: NodeId, cpu_permille: u16) {
        let sample = LoadSample {
            cpu_permille,
            mem_permille: 100,
        };
        self.input(to, Input::Load(sample))
            .expect("a load sample is always taken");
    }

    /// Hands a message to the network: a cut link drops it; otherwise it is dropped with
    /// `drop_permille`, delayed by `latency` plus up to `jitter_ms` (so later messages can
    /// overtake it), and delivered a second time with `dup_permille`.
    fn send(&mut self, from: NodeId, to: NodeId, input: Input) {
        if from == to || self.cut.contains(&(from, to)) {
            return;
        }
        self.net.sent += 1;
        if matches!(
            input,
            Input::Probe { .. } | Input::SyncRequest { .. } | Input::SyncReply { .. }
        ) {
            self.net.links.insert((from, to));
        }
        if self.drop_permille > 0 && self.rng.gen_range(0..1000) < self.drop_permille {
            self.net.dropped += 1;
            return;
        }
        let copies = if self.dup_permille > 0 && self.rng.gen_range(0..1000) < self.dup_permille {
            self.net.duplicated += 1;
            2
        } else {
            1
        };
        self.next_seq += 1;
        let sent_seq = self.next_seq;
        for _ in 0..copies {
            let jitter = if self.jitter_ms > 0 {
                self.rng.gen_range(0..=self.jitter_ms)
            } else {
                0
            };
            let delivery = Delivery {
                from,
                to,
                sent_seq,
                input: input.clone(),
            };
            // The key's second part keeps equal due times in sending order.
            self.next_seq += 1;
            self.queue
                .insert((self.now + self.latency + jitter, self.next_seq), delivery);
        }
    }

    fn drain(&mut self, id: NodeId) {
        loop {
            let Some(action) = self
                .replicas
                .get_mut(&id)
                .expect("a node of this mesh")
                .poll_action()
            else {
                self.journal.drained(id);
                let due = self.replicas[&id].poll_timeout();
                self.journal.timeout(id, due);
                return;
            };
            self.journal.polled(id, &action);
            match action {
                Action::Publish(msg) => {
                    for to in self.ids() {
                        self.send(
                            id,
                            to,
                            Input::Gossip {
                                via: id,
                                msg: msg.clone(),
                            },
                        );
                    }
                }
                Action::SendSync { to, request } => {
                    self.send(id, to, Input::SyncRequest { from: id, request })
                }
                Action::ReplySync { to, reply } => {
                    self.send(id, to, Input::SyncReply { from: id, reply })
                }
                Action::SendProbe { to, probe } => {
                    if !self.deaf_to_probes.contains(&to) {
                        self.send(id, to, Input::Probe { from: id, probe })
                    }
                }
                Action::StartTask { task, epoch, .. } => {
                    self.instances.push(Instance {
                        node: id,
                        task,
                        epoch,
                        started_at: self.now,
                        stopped_at: None,
                    });
                    if self.auto_start {
                        let started = Input::Executor {
                            task,
                            epoch,
                            event: ExecEvent::Started,
                        };
                        self.feed(id, started)
                            .expect("a report of an epoch just started");
                    }
                }
                Action::AdoptTask { task, from, epoch } => {
                    // The instance keeps running; it is now known by its new epoch.
                    if let Some(i) = self.instances.iter_mut().find(|i| {
                        i.node == id && i.task == task && i.epoch == from && i.stopped_at.is_none()
                    }) {
                        i.epoch = epoch;
                    }
                }
                Action::StopTask {
                    task,
                    epoch,
                    reason,
                } => {
                    self.stops.push((id, task, epoch, reason));
                    self.mark_stopped(id, task, epoch);
                    let stopped = Input::Executor {
                        task,
                        epoch,
                        event: ExecEvent::Stopped,
                    };
                    self.feed(id, stopped)
                        .expect("a report of an epoch told to stop");
                }
            }
        }
    }

    /// The executor on `id` reports that the instance of `task` exited with `code`.
    pub fn exit(&mut self, id: NodeId, task: TaskId, code: i32) {
        let epoch = self
            .running_on(id, task)
            .unwrap_or_else(|| panic!("{id:?} runs no instance of {task:?}"));
        self.mark_stopped(id, task, epoch);
        let exited = Input::Executor {
            task,
            epoch,
            event: ExecEvent::Exited { code },
        };
        // A stale report is counted, not refused; the result is not the harness's concern.
        let _ = self.input(id, exited);
    }

    /// Notes that the instance of `task` at `epoch` on `id` stopped now (if not already).
    fn mark_stopped(&mut self, id: NodeId, task: TaskId, epoch: Epoch) {
        let now = self.now;
        for inst in &mut self.instances {
            if inst.node == id && inst.task == task && inst.epoch == epoch {
                inst.stopped_at.get_or_insert(now);
            }
        }
    }

    /// The epoch of the instance of `task` still running on `id`.
    pub fn running_on(&self, id: NodeId, task: TaskId) -> Option<Epoch> {
        self.instances
            .iter()
            .rev()
            .find(|i| i.node == id && i.task == task && i.stopped_at.is_none())
            .map(|i| i.epoch)
    }

    /// Every node with a running instance of `task`.
    pub fn runners(&self, task: TaskId) -> Vec<(NodeId, Epoch)> {
        self.instances
            .iter()
            .filter(|i| i.task == task && i.stopped_at.is_none())
            .map(|i| (i.node, i.epoch))
            .collect()
    }

    /// Crashes a node: it stops ticking and receiving; running instances die with it.
    pub fn crash(&mut self, id: NodeId) {
        self.down.insert(id);
        self.journal.crashed(id);
        let now = self.now;
        for inst in &mut self.instances {
            if inst.node == id {
                inst.stopped_at.get_or_insert(now);
            }
        }
    }

    /// Restarts a crashed node with a fresh replica at `incarnation`.
    pub fn restart(&mut self, id: NodeId, incarnation: u64, tweak: impl Fn(&mut ReplicaConfig)) {
        let mut cfg = self.replicas[&id].config().clone();
        cfg.incarnation = incarnation;
        tweak(&mut cfg);
        let key = crate::fixtures::key_of(&id).expect("a test node id (fixtures::node)");
        let replica = Replica::new(cfg, key).expect("a valid config, restarted");
        self.replicas.insert(id, replica);
        self.down.remove(&id);
    }

    /// Advances time by `ms` in 1 ms steps, delivering and ticking as due.
    pub fn run_for(&mut self, ms: Millis) {
        self.run_until(ms, |_| false);
    }

    /// Runs until `cond` holds or `limit_ms` passes; returns whether it held.
    pub fn run_until(&mut self, limit_ms: Millis, mut cond: impl FnMut(&Self) -> bool) -> bool {
        let end = self.now + limit_ms;
        while self.now < end {
            if cond(self) {
                return true;
            }
            self.now += 1;
            self.step();
        }
        cond(self)
    }

    /// One millisecond: every delivery due, in due order, then every tick due.
    fn step(&mut self) {
        let now = self.now;
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let d = entry.remove();
            if self.down.contains(&d.to) {
                continue;
            }
            let link = (d.from, d.to);
            let last = self.delivered_seq.entry(link).or_insert(0);
            if d.sent_seq < *last {
                self.net.reordered += 1;
            }
            *last = (*last).max(d.sent_seq);
            self.net.delivered += 1;
            // Peers may send what a replica rejects; tests look at the counters.
            let _ = self.feed(d.to, d.input);
            self.drain(d.to);
        }
        for id in self.ids() {
            if self.down.contains(&id) {
                continue;
            }
            let due = self.replicas[&id].poll_timeout().is_some_and(|t| t <= now);
            if due {
                self.feed(id, Input::Tick).expect("a tick is never refused");
                self.drain(id);
            }
        }
        self.guards();
    }

    /// Kills the instances whose guard's deadline passed, as the peer's guards do.
    fn guards(&mut self) {
        let Some(margin) = self.guard_margin else {
            return;
        };
        let now = self.now;
        let expired: Vec<(NodeId, TaskId, Epoch)> = self
            .instances
            .iter()
            .filter(|i| i.stopped_at.is_none() && !self.down.contains(&i.node))
            .filter(|i| {
                self.replicas[&i.node]
                    .instance_deadline(now, &i.task)
                    .saturating_sub(margin)
                    <= now
            })
            .map(|i| (i.node, i.task, i.epoch))
            .collect();
        for (id, task, epoch) in expired {
            self.mark_stopped(id, task, epoch);
            self.guard_kills.push((id, task, epoch, now));
            let event = Input::Executor {
                task,
                epoch,
                event: ExecEvent::Expired,
            };
            let _ = self.input(id, event);
        }
    }

    /// Whether every live replica has the same digest.
    pub fn converged(&self) -> bool {
        let mut digests = self
            .replicas
            .iter()
            .filter(|(id, _)| !self.down.contains(id))
            .map(|(_, r)| r.digest());
        let Some(first) = digests.next() else {
            return true;
        };
        digests.all(|d| d == first)
    }
}

/// A mesh whose replicas all know each other, as alive, and may claim.
pub fn joined(n: u8, tweak: impl Fn(&mut ReplicaConfig)) -> Mesh {
    let mut m = Mesh::new(n, tweak);
    let ok = m.run_until(10_000, |m| {
        m.ids().iter().all(|a| {
            let r = m.replica(*a);
            r.may_claim(m.now)
                && m.ids()
                    .iter()
                    .all(|b| r.health(m.now, b) == omesh_state::Health::Alive)
        })
    });
    assert!(ok, "mesh did not join");
    m
}

/// The one node running `task`, with its epoch (panics if two run it).
pub fn owner_of(m: &Mesh, task: TaskId) -> Option<(NodeId, Epoch)> {
    let runners = m.runners(task);
    assert!(runners.len() <= 1, "more than one instance: {runners:?}");
    runners.first().copied()
}

/// The harness as a conformance driver: simulated time, the lossless network of
/// [`Mesh::from_configs`] (faults can still be set on `self`), and the fake executor.
impl Driver for Mesh {
    fn nodes(&self) -> Vec<NodeId> {
        self.ids()
    }

    fn advance(&mut self, ms: Millis) {
        self.run_for(ms);
    }

    fn inspect(&self, id: NodeId, f: &mut dyn FnMut(&Replica, Millis)) {
        f(&self.replicas[&id], self.now);
    }

    fn submit(&mut self, at: NodeId, spec: SignedTaskSpec) {
        Self::submit(self, at, spec);
    }

    fn cancel(&mut self, at: NodeId, task: TaskId) {
        // Already ended or unknown: the replica says so, and nothing changes.
        let _ = self.input(at, Input::Cancel(crate::fixtures::cancel(task)));
    }

    fn exit(&mut self, at: NodeId, task: TaskId, code: i32) -> bool {
        if self.running_on(at, task).is_none() {
            return false;
        }
        Self::exit(self, at, task, code);
        true
    }

    fn running(&self) -> Vec<(NodeId, TaskId, Epoch)> {
        self.instances
            .iter()
            .filter(|i| i.stopped_at.is_none())
            .map(|i| (i.node, i.task, i.epoch))
            .collect()
    }

    fn crash(&mut self, id: NodeId) {
        Self::crash(self, id);
    }

    fn journal(&self) -> &Journal {
        &self.journal
    }
}
