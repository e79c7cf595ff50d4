//! A small deterministic mesh of replicas for scenario and property tests, in the style of
//! raft-rs's harness: explicit time, manual faults (`cut`, `isolate`, `crash`), and a fake
//! executor that records which epochs run where.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ed25519_dalek::SigningKey;
use omesh_protocol::{
    Epoch, ExecutorKind, LoadSample, Millis, NodeId, SignedTaskSpec, TaskId, TaskSpec,
};
use omesh_state::{Action, ExecEvent, Input, Replica, ReplicaConfig, StopReason};

/// The submitter key every test mesh authorizes.
pub fn submitter() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

/// A node id from a small number.
pub fn node(i: u8) -> NodeId {
    let mut b = [0u8; 32];
    b[0] = i;
    b[31] = 0xAA;
    NodeId(b)
}

/// A signed spec with sane defaults.
pub fn spec(nonce: u64) -> SignedTaskSpec {
    spec_with(nonce, |_| {})
}

/// A signed spec, adjusted by `f` before signing.
pub fn spec_with(nonce: u64, f: impl FnOnce(&mut TaskSpec)) -> SignedTaskSpec {
    let mut s = TaskSpec {
        image: format!("busybox@sha256:{}", "ab".repeat(32)),
        command: vec!["sh".into(), "-c".into(), "true".into()],
        env: BTreeMap::new(),
        cpu_millis: 100,
        memory_bytes: 64 << 20,
        required_tags: BTreeSet::new(),
        priority: 0,
        max_attempts: 3,
        timeout_ms: 60_000,
        executor: ExecutorKind::Process,
        nonce,
        submitter: [0; 32],
    };
    f(&mut s);
    s.sign(&submitter())
}

/// The config of test node `i`.
pub fn config(i: u8) -> ReplicaConfig {
    let mut cfg = ReplicaConfig::for_node(node(i));
    cfg.authorized_submitters
        .insert(submitter().verifying_key().to_bytes());
    cfg.tags.insert("executor:process".into());
    cfg.seed = u64::from(i);
    cfg
}

/// One started instance, as the fake executor saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instance {
    pub node: NodeId,
    pub task: TaskId,
    pub epoch: Epoch,
    pub started_at: Millis,
    pub stopped_at: Option<Millis>,
}

enum Msg {
    Input(Input),
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
    queue: VecDeque<(Millis, NodeId, Msg)>,
    pub instances: Vec<Instance>,
    pub stops: Vec<(NodeId, TaskId, Epoch, StopReason)>,
    /// Report `Started` as soon as a StartTask is seen.
    pub auto_start: bool,
    /// Chance, in thousandths, that a message is dropped.
    pub drop_permille: u32,
    /// Chance, in thousandths, that a message is delivered twice.
    pub dup_permille: u32,
    /// Extra random delay per message (reorders deliveries).
    pub jitter_ms: Millis,
    /// Nodes whose incoming liveness probes are dropped (everything else reaches them).
    pub deaf_to_probes: BTreeSet<NodeId>,
    rng: rand_chacha::ChaCha8Rng,
}

impl Mesh {
    /// `n` replicas numbered 1..=n, with `tweak` applied to each config.
    pub fn new(n: u8, tweak: impl Fn(&mut ReplicaConfig)) -> Self {
        let mut replicas = BTreeMap::new();
        for i in 1..=n {
            let mut cfg = config(i);
            tweak(&mut cfg);
            replicas.insert(node(i), Replica::new(cfg).unwrap());
        }
        Self {
            now: 0,
            replicas,
            cut: BTreeSet::new(),
            down: BTreeSet::new(),
            latency: 5,
            queue: VecDeque::new(),
            instances: Vec::new(),
            stops: Vec::new(),
            auto_start: true,
            drop_permille: 0,
            dup_permille: 0,
            jitter_ms: 0,
            deaf_to_probes: BTreeSet::new(),
            rng: rand::SeedableRng::seed_from_u64(u64::from(n)),
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
        let now = self.now;
        let r = self.replicas.get_mut(&to).unwrap().handle(now, input);
        self.drain(to);
        r
    }

    pub fn submit(&mut self, to: NodeId, s: SignedTaskSpec) -> TaskId {
        let id = s.id();
        self.input(to, Input::Submit(s)).unwrap();
        id
    }

    pub fn load(&mut self, to: NodeId, cpu_permille: u16) {
        self.input(
            to,
            Input::Load(LoadSample {
                cpu_permille,
                mem_permille: 100,
            }),
        )
        .unwrap();
    }

    fn send(&mut self, from: NodeId, to: NodeId, input: Input) {
        if from == to || self.cut.contains(&(from, to)) {
            return;
        }
        self.queue
            .push_back((self.now + self.latency, to, Msg::Input(input)));
    }

    fn drain(&mut self, id: NodeId) {
        loop {
            let Some(action) = self.replicas.get_mut(&id).unwrap().poll_action() else {
                return;
            };
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
                        let now = self.now;
                        self.replicas
                            .get_mut(&id)
                            .unwrap()
                            .handle(
                                now,
                                Input::Executor {
                                    task,
                                    epoch,
                                    event: ExecEvent::Started,
                                },
                            )
                            .unwrap();
                    }
                }
                Action::StopTask {
                    task,
                    epoch,
                    reason,
                } => {
                    self.stops.push((id, task, epoch, reason));
                    let now = self.now;
                    for inst in &mut self.instances {
                        if inst.node == id && inst.task == task && inst.epoch == epoch {
                            inst.stopped_at.get_or_insert(now);
                        }
                    }
                    self.replicas
                        .get_mut(&id)
                        .unwrap()
                        .handle(
                            now,
                            Input::Executor {
                                task,
                                epoch,
                                event: ExecEvent::Stopped,
                            },
                        )
                        .unwrap();
                }
            }
        }
    }

    /// The executor on `id` reports that the instance of `task` exited with `code`.
    pub fn exit(&mut self, id: NodeId, task: TaskId, code: i32) {
        let epoch = self
            .running_on(id, task)
            .unwrap_or_else(|| panic!("{id:?} runs no instance of {task:?}"));
        let now = self.now;
        for inst in &mut self.instances {
            if inst.node == id && inst.task == task && inst.epoch == epoch {
                inst.stopped_at.get_or_insert(now);
            }
        }
        self.input(
            id,
            Input::Executor {
                task,
                epoch,
                event: ExecEvent::Exited { code },
            },
        )
        .unwrap();
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
        let now = self.now;
        for inst in &mut self.instances {
            if inst.node == id {
                inst.stopped_at.get_or_insert(now);
            }
        }
    }

    /// Restarts a crashed node with a fresh replica at `incarnation`.
    pub fn restart(&mut self, id: NodeId, incarnation: u64, tweak: impl Fn(&mut ReplicaConfig)) {
        let old = self.replicas[&id].config().clone();
        let mut cfg = old;
        cfg.incarnation = incarnation;
        tweak(&mut cfg);
        self.replicas.insert(id, Replica::new(cfg).unwrap());
        self.down.remove(&id);
    }

    /// Advances time by `ms` in 1 ms steps, delivering and ticking as due.
    pub fn run_for(&mut self, ms: Millis) {
        let end = self.now + ms;
        while self.now < end {
            self.now += 1;
            self.step();
        }
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

    fn step(&mut self) {
        let now = self.now;
        let mut later = VecDeque::new();
        while let Some((at, to, msg)) = self.queue.pop_front() {
            if at > now {
                later.push_back((at, to, msg));
                continue;
            }
            if self.down.contains(&to) {
                continue;
            }
            let Msg::Input(input) = msg;
            // Peers may send what a replica rejects; tests look at the counters.
            let _ = self.replicas.get_mut(&to).unwrap().handle(now, input);
            self.drain(to);
        }
        self.queue = later;
        for id in self.ids() {
            if self.down.contains(&id) {
                continue;
            }
            let due = self.replicas[&id].poll_timeout().is_some_and(|t| t <= now);
            if due {
                self.replicas
                    .get_mut(&id)
                    .unwrap()
                    .handle(now, Input::Tick)
                    .unwrap();
                self.drain(id);
            }
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
