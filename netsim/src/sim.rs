//! The discrete-event simulation: many `omesh_state::Replica`s on simulated time, driven by one
//! queue of `Scheduled { at, seq, ev }`. Every random choice comes from one seeded generator
//! and every event is folded into a trace hash, so a seed reproduces a run exactly.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use omesh_protocol::{
    Delta, Digest, Epoch, GossipMessage, LoadSample, NodeId, Probe, SyncReply, SyncRequest, TaskId,
    Wire,
};
use omesh_state::{Action, Input, NodeKey, Replica, ReplicaConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::clock::Clock;
use crate::disconnect::DisconnectLog;
use crate::executor::Runs;
use crate::gossip::{Floods, Overlay};
use crate::guard::{GuardKills, Guards};
use crate::network::{mix, Network, Partition};
use crate::propagation::Tracker;
use crate::queue::{EventQueue, SimTime};
use crate::scenario::{DataDir, GroupSpec, Scenario};
use crate::workload::TaskInfo;

/// What the executor reports, as an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecStep {
    /// The instance came up.
    Started,
    /// It exited with this code.
    Exit(i32),
    /// It was stopped.
    Stopped,
    /// Its guard killed it at the deadline.
    Expired,
}

/// A point-to-point anti-entropy message.
#[derive(Debug)]
pub enum SyncMsg {
    /// A request.
    Request(SyncRequest),
    /// A reply.
    Reply(SyncReply),
}

/// Everything that happens.
#[derive(Debug)]
pub enum Event {
    /// A replica asked to be ticked; stale tokens are ignored.
    Tick {
        /// Node index.
        node: u32,
        /// Timer token.
        token: u32,
    },
    /// One copy of a flooded gossip message arrives.
    Gossip {
        /// Receiver.
        to: u32,
        /// The mesh peer that forwarded it.
        from: u32,
        /// Flood slot.
        flood: u32,
    },
    /// A sync request or reply arrives.
    Sync {
        /// Receiver.
        to: u32,
        /// Sender.
        from: u32,
        /// The message.
        msg: Box<SyncMsg>,
    },
    /// A liveness probe arrives.
    Swim {
        /// Receiver.
        to: u32,
        /// Sender.
        from: u32,
        /// The probe.
        probe: Probe,
    },
    /// A sync request went unanswered.
    SyncFailed {
        /// The requester.
        node: u32,
        /// Its generation when it asked.
        gen: u32,
        /// The peer it asked.
        peer: NodeId,
    },
    /// The fake executor reports.
    Exec {
        /// Node index.
        node: u32,
        /// Its generation when the instance was started.
        gen: u32,
        /// Task index.
        task: u32,
        /// Epoch.
        epoch: Epoch,
        /// What happened.
        step: ExecStep,
    },
    /// The next task of a stream arrives.
    Arrival {
        /// Stream index.
        stream: u32,
    },
    /// A fault starts.
    FaultStart {
        /// Fault index.
        fault: u32,
    },
    /// A fault heals.
    FaultEnd {
        /// Fault index.
        fault: u32,
    },
    /// A flapping cut is lifted or restored.
    Flap {
        /// Fault index.
        fault: u32,
        /// Restored (`true`) or lifted.
        on: bool,
    },
    /// The `step`-th restart of a rolling restart.
    Rolling {
        /// Fault index.
        fault: u32,
        /// Step.
        step: u32,
    },
    /// A crashed node comes back.
    Restart {
        /// Node index.
        node: u32,
        /// What it kept.
        data: DataDir,
    },
    /// A node's guard deadline may have passed; stale tokens are ignored.
    Guard {
        /// Node index.
        node: u32,
        /// Check token.
        token: u32,
    },
    /// Mesh maintenance and pings.
    Maintain,
    /// Load samples for every node.
    LoadRound,
    /// Catch-up check after the last heal.
    Probe,
    /// The idle window opens or closes.
    Idle,
}

/// What one executor slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Starting,
    Running(usize),
}

/// One simulated host.
#[derive(Debug)]
pub struct Node {
    /// Its identity.
    pub id: NodeId,
    /// Its identity key, which signs what its replica writes.
    pub key: NodeKey,
    /// The replica, while the node is up.
    pub replica: Option<Replica>,
    /// Bumped by every crash and restart; events of an older generation are void.
    pub gen: u32,
    /// Its clock.
    pub clock: Clock,
    /// Its group index (`groups.len()` is the default group).
    pub group: usize,
    /// Its incarnation.
    pub incarnation: u64,
    /// Set when it came back under a new identity.
    pub replaced_by: Option<u32>,
    tick: Option<SimTime>,
    tick_token: u32,
    /// Set while a tick is being fed.
    in_tick: bool,
    pub(crate) exec: BTreeMap<(u32, Epoch), Slot>,
    pub(crate) guards: Guards,
    pub(crate) last_load: Option<LoadSample>,
}

impl Node {
    /// Whether it runs.
    pub fn up(&self) -> bool {
        self.replica.is_some()
    }
}

/// Message and byte counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    /// Gossip transmissions (every copy on every mesh link).
    pub gossip_msgs: u64,
    /// Their bytes.
    pub gossip_bytes: u64,
    /// Gossip copies that arrived at a node that already had the message.
    pub gossip_dups: u64,
    /// Sync requests sent.
    pub sync_requests: u64,
    /// Sync replies sent.
    pub sync_replies: u64,
    /// Sync bytes, both ways.
    pub sync_bytes: u64,
    /// Liveness probes sent (pings, acks, ping requests).
    pub probe_msgs: u64,
    /// Their bytes.
    pub probe_bytes: u64,
    /// Messages dropped by loss or partition.
    pub lost: u64,
    /// Messages published.
    pub published: u64,
}

impl Traffic {
    /// Every message: gossip copies, sync requests and replies, probes.
    pub fn messages(&self) -> u64 {
        self.gossip_msgs + self.sync_requests + self.sync_replies + self.probe_msgs
    }

    /// Every byte: gossip, sync and probes.
    pub fn bytes(&self) -> u64 {
        self.gossip_bytes + self.sync_bytes + self.probe_bytes
    }

    /// What was counted since `earlier` (a snapshot of the same counters).
    pub fn since(&self, earlier: &Self) -> Self {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        Self {
            gossip_msgs: d(self.gossip_msgs, earlier.gossip_msgs),
            gossip_bytes: d(self.gossip_bytes, earlier.gossip_bytes),
            gossip_dups: d(self.gossip_dups, earlier.gossip_dups),
            sync_requests: d(self.sync_requests, earlier.sync_requests),
            sync_replies: d(self.sync_replies, earlier.sync_replies),
            sync_bytes: d(self.sync_bytes, earlier.sync_bytes),
            probe_msgs: d(self.probe_msgs, earlier.probe_msgs),
            probe_bytes: d(self.probe_bytes, earlier.probe_bytes),
            lost: d(self.lost, earlier.lost),
            published: d(self.published, earlier.published),
        }
    }
}

/// The simulation.
pub struct Sim {
    /// The scenario.
    pub scenario: Scenario,
    /// The seed.
    pub seed: u64,
    pub(crate) queue: EventQueue<Event>,
    pub(crate) rng: ChaCha8Rng,
    /// Every node index ever used.
    pub nodes: Vec<Node>,
    pub(crate) by_id: BTreeMap<NodeId, u32>,
    pub(crate) groups: Vec<GroupSpec>,
    pub(crate) base_config: ReplicaConfig,
    pub(crate) network: Network,
    pub(crate) overlay: Overlay,
    pub(crate) floods: Floods,
    /// Spread of sampled deltas.
    pub tracker: Tracker,
    /// Every instance that ran.
    pub runs: Runs,
    /// Every submitted task.
    pub tasks: Vec<TaskInfo>,
    pub(crate) task_index: BTreeMap<TaskId, u32>,
    pub(crate) submitter: SigningKey,
    /// Traffic counters.
    pub traffic: Traffic,
    /// Sum over time of nodes up, in node-µs.
    pub node_us: u128,
    /// Traffic and node-µs over the idle window, once it has closed.
    pub idle: Option<(Traffic, u128)>,
    /// Traffic and node-µs when the idle window opened.
    idle_start: Option<(Traffic, u128)>,
    up_count: u64,
    up_since: SimTime,
    /// Running hash of every processed event.
    pub trace: u64,
    /// Events processed.
    pub events: u64,
    /// Crashes and restarts applied.
    pub crashes: u64,
    /// Instances killed by their guard at the deadline.
    pub guard_expiries: GuardKills,
    /// Ticks after which the replica still asked for a wake no later than the tick's own
    /// millisecond (each one a peer would spin on; see `arm_tick`).
    pub stale_wakes: u64,
    /// The cuts of each flapping fault in force, to restore when it flaps back on.
    pub(crate) flapping: BTreeMap<u32, Vec<Partition>>,
    /// What the disconnect-policy figures are read from.
    pub disconnect: DisconnectLog,
    pub(crate) maintain_round: u64,
    /// When the last fault healed, and the stamps every live node had written then.
    pub(crate) heal_cut: Option<crate::propagation::HealCut>,
    /// Time from the last heal until every live node held everything written before it.
    pub heal_converged_us: Option<SimTime>,
    /// Set at the end: network messages are delivered, nothing else runs.
    pub(crate) frozen: bool,
    /// While a formed mesh is being set up: the deltas nodes published, kept from the wire.
    forming: Option<Vec<Delta>>,
    /// Wall-clock time spent forming the mesh (`formed = true`), before time 0 ran.
    pub formed_in: Option<std::time::Duration>,
    ended_at: SimTime,
    /// When set (by the conformance driver), every input fed and action polled is recorded
    /// and checked against the replica's contract.
    pub(crate) journal: Option<omesh_harness::conformance::Journal>,
    /// The signature checker every replica shares.
    pub verify: std::sync::Arc<crate::verify::MemoVerify>,
}

/// The identity key of node index `i`: stable across seeds.
pub fn node_key(i: u32) -> NodeKey {
    NodeKey::from_bytes(&Digest::of(format!("omesh-netsim/node/{i}").as_bytes()).0)
}

/// The id of node index `i`: the public half of [`node_key`].
pub fn node_id(i: u32) -> NodeId {
    node_key(i).id()
}

impl Sim {
    /// A simulation of `scenario` with `seed`, every node started at time 0.
    pub fn new(scenario: Scenario, seed: u64) -> Self {
        let n = scenario.nodes;
        let mut groups = scenario.groups.clone();
        groups.push(GroupSpec::default_group());
        let submitter = SigningKey::from_bytes(&[42u8; 32]);
        let mut base_config = scenario.replica_config(n);
        base_config
            .authorized_submitters
            .insert(submitter.verifying_key().to_bytes());
        let nodes_usize = usize::try_from(n).unwrap_or(0);
        let mut sim = Self {
            network: Network::new(scenario.network.clone(), mix(seed ^ 0x11), 0),
            overlay: Overlay::new(scenario.gossip.clone(), 0),
            tracker: Tracker::new(
                scenario.measure.max_tracked,
                scenario.measure.heartbeat_sample_permille,
            ),
            queue: EventQueue::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            nodes: Vec::with_capacity(nodes_usize),
            by_id: BTreeMap::new(),
            groups,
            base_config,
            floods: Floods::default(),
            runs: Runs::default(),
            tasks: Vec::new(),
            task_index: BTreeMap::new(),
            submitter,
            traffic: Traffic::default(),
            node_us: 0,
            idle: None,
            idle_start: None,
            up_count: 0,
            up_since: 0,
            trace: 0xcbf2_9ce4_8422_2325,
            events: 0,
            crashes: 0,
            guard_expiries: GuardKills::default(),
            stale_wakes: 0,
            flapping: BTreeMap::new(),
            disconnect: DisconnectLog::default(),
            maintain_round: 0,
            heal_cut: None,
            heal_converged_us: None,
            frozen: false,
            forming: None,
            formed_in: None,
            ended_at: 0,
            journal: None,
            verify: std::sync::Arc::default(),
            scenario,
            seed,
        };
        for i in 0..n {
            let group = sim.group_of(i, n);
            let clock = sim.draw_clock();
            sim.add_node(group, clock);
        }
        if sim.scenario.formed {
            sim.form_mesh();
        } else {
            sim.schedule_boots();
        }
        sim.schedule_timeline();
        sim
    }

    /// Boots every node at a random time within `boot_spread_s`.
    fn schedule_boots(&mut self) {
        let n = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        let spread = secs(self.scenario.boot_spread_s);
        for node in 0..n {
            let at = if spread > 0 {
                self.rng.gen_range(0..spread)
            } else {
                0
            };
            self.queue.push(
                at,
                Event::Restart {
                    node,
                    data: DataDir::Kept,
                },
            );
        }
    }

    /// Boots every node at time 0 and hands each one the record of every other as one sync
    /// reply from a mesh peer, so the run starts where a finished boot would have left it:
    /// the records are the ones the nodes wrote (kept from the wire), shared, not copied.
    fn form_mesh(&mut self) {
        let started = std::time::Instant::now();
        let n = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        self.forming = Some(Vec::new());
        for node in 0..n {
            self.restart(node, DataDir::Kept);
        }
        let mut deltas = self.forming.take().unwrap_or_default();
        deltas.sort_by_key(|d| (d.origin, d.stamp));
        let mut state = omesh_state::State::default();
        let mut vclock: BTreeMap<NodeId, u64> = BTreeMap::new();
        for d in &deltas {
            // The nodes' own records: each applies.
            let _ = state.apply(d);
            let c = vclock.entry(d.origin).or_default();
            *c = (*c).max(d.stamp);
        }
        let reply = SyncReply {
            deltas,
            vclock: vclock.into_iter().collect(),
            digest: state.digest(),
            truncated: false,
        };
        drop(state);
        for node in 0..n {
            let from = self
                .overlay
                .peers(node)
                .first()
                .copied()
                .unwrap_or(if node == 0 { 1 } else { 0 });
            let Some(from) = self.nodes.get(ix(from)).map(|f| f.id) else {
                continue;
            };
            self.feed(
                node,
                Input::SyncReply {
                    from,
                    reply: reply.clone(),
                },
            );
        }
        self.formed_in = Some(started.elapsed());
    }

    /// Whether a formed mesh is being set up (see [`Sim::form_mesh`]).
    pub(crate) fn forming(&self) -> bool {
        self.forming.is_some()
    }

    fn group_of(&self, i: u32, n: u32) -> usize {
        let mut upto = 0.0;
        for (g, spec) in self.scenario.groups.iter().enumerate() {
            upto += spec.fraction * f64::from(n);
            if f64::from(i) < upto.round() {
                return g;
            }
        }
        self.groups.len() - 1
    }

    fn draw_clock(&mut self) -> Clock {
        let c = &self.scenario.clock;
        let offset_us = if c.offset_ms > 0.0 {
            (self.rng.gen_range(-c.offset_ms..=c.offset_ms) * 1_000.0) as i64
        } else {
            0
        };
        let drift_ppm = if c.drift_ppm > 0.0 {
            self.rng.gen_range(-c.drift_ppm..=c.drift_ppm) as i64
        } else {
            0
        };
        Clock {
            offset_us,
            drift_ppm,
        }
    }

    pub(crate) fn add_node(&mut self, group: usize, clock: Clock) -> u32 {
        let i = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        let key = node_key(i);
        let id = key.id();
        self.nodes.push(Node {
            id,
            key,
            replica: None,
            gen: 0,
            clock,
            group,
            incarnation: 0,
            replaced_by: None,
            tick: None,
            tick_token: 0,
            in_tick: false,
            exec: BTreeMap::new(),
            guards: Guards::default(),
            last_load: None,
        });
        self.by_id.insert(id, i);
        self.overlay.add_node();
        self.network.add_node();
        i
    }

    /// Starts (or restarts) node `i` with the next incarnation.
    pub(crate) fn boot(&mut self, i: u32) {
        let now = self.queue.now();
        let node = &mut self.nodes[ix(i)];
        node.incarnation += 1;
        node.gen += 1;
        let g = &self.groups[node.group];
        let mut cfg = self.base_config.clone();
        cfg.node_id = node.id;
        cfg.incarnation = node.incarnation;
        cfg.seed = mix(self.seed ^ u64::from(i) << 20 ^ node.incarnation);
        cfg.tags = g.tags.iter().cloned().collect();
        cfg.capacity = omesh_protocol::Capacity {
            cpu_millis: g.cpu_millis,
            memory_bytes: g.memory_mb << 20,
        };
        // The scenario was validated with the same values, so this cannot fail.
        let Ok(mut replica) = Replica::new(cfg, node.key.clone()) else {
            return;
        };
        replica.set_verifier(self.verify.clone());
        node.replica = Some(replica);
        node.exec.clear();
        node.guards.reset();
        node.last_load = None;
        node.tick = None;
        self.node_up_changed(now, 1);
        let addr = format!(
            "/ip4/10.{}.{}.{}/udp/4001/quic-v1",
            i >> 16 & 255,
            i >> 8 & 255,
            i & 255
        );
        self.feed(i, Input::Addresses(vec![addr]));
        self.load_one(i);
        self.feed(i, Input::Tick);
    }

    pub(crate) fn node_up_changed(&mut self, now: SimTime, delta: i64) {
        self.node_us += u128::from(self.up_count) * u128::from(now - self.up_since);
        self.up_since = now;
        self.up_count = self.up_count.saturating_add_signed(delta);
    }

    /// Nodes up now.
    pub fn up_nodes(&self) -> impl Iterator<Item = (u32, &Node)> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.up())
            .map(|(i, n)| (u32::try_from(i).unwrap_or(u32::MAX), n))
    }

    /// The name of node `i`'s group.
    pub fn group_name(&self, i: u32) -> &str {
        self.nodes
            .get(ix(i))
            .and_then(|n| self.groups.get(n.group))
            .map_or("default", |g| g.name.as_str())
    }

    /// The current simulated time.
    pub fn now(&self) -> SimTime {
        self.queue.now()
    }

    /// Gives one input to node `i` now and carries out everything it causes.
    pub(crate) fn feed(&mut self, i: u32, input: Input) -> bool {
        let now = self.queue.now();
        let node = &mut self.nodes[ix(i)];
        let local = node.clock.local_ms(now);
        let Some(r) = node.replica.as_mut() else {
            return false;
        };
        if let Some(j) = self.journal.as_mut() {
            j.fed(node.id, local, &input);
        }
        let ok = r.handle(local, input).is_ok();
        self.drain(i);
        ok
    }

    /// [`Sim::feed`] for a gossip message, which the replica reads without taking a copy.
    pub(crate) fn feed_gossip(&mut self, i: u32, via: NodeId, msg: &GossipMessage) -> bool {
        let now = self.queue.now();
        let node = &mut self.nodes[ix(i)];
        let local = node.clock.local_ms(now);
        let Some(r) = node.replica.as_mut() else {
            return false;
        };
        if let Some(j) = self.journal.as_mut() {
            let input = Input::Gossip {
                via,
                msg: msg.clone(),
            };
            j.fed(node.id, local, &input);
        }
        let ok = r.handle_gossip(local, via, msg).is_ok();
        self.drain(i);
        ok
    }

    /// Carries out the actions node `i` queued, then re-arms its tick.
    pub(crate) fn drain(&mut self, i: u32) {
        while let Some(action) = self.nodes[ix(i)]
            .replica
            .as_mut()
            .and_then(Replica::poll_action)
        {
            if let Some(j) = self.journal.as_mut() {
                j.polled(self.nodes[ix(i)].id, &action);
            }
            self.act(i, action);
        }
        if let Some(j) = self.journal.as_mut() {
            let node = &self.nodes[ix(i)];
            j.drained(node.id);
            j.timeout(
                node.id,
                node.replica.as_ref().and_then(Replica::poll_timeout),
            );
        }
        self.arm_tick(i);
        // The peer renews its guards after every drain.
        self.renew_guards(i);
    }

    fn arm_tick(&mut self, i: u32) {
        let now = self.queue.now();
        let node = &mut self.nodes[ix(i)];
        let Some(want) = node.replica.as_ref().and_then(Replica::poll_timeout) else {
            return;
        };
        let mut at = node.clock.sim_at(want, now);
        if at <= now && node.in_tick {
            // Ticked at this instant, the replica still asks for a wake no later than it: a
            // peer's timer fires again at once and keeps firing until its clock reaches the
            // next millisecond, so the next tick is then (simulated time would never move).
            let local = node.clock.local_ms(now);
            at = node.clock.sim_at(local + 1, now);
            self.stale_wakes += 1;
        }
        if node.tick.is_some_and(|t| t <= at) {
            return;
        }
        node.tick = Some(at);
        node.tick_token = node.tick_token.wrapping_add(1);
        let token = node.tick_token;
        self.queue.push(at, Event::Tick { node: i, token });
    }

    fn act(&mut self, i: u32, action: Action) {
        let now = self.queue.now();
        match action {
            Action::Publish(msg) => match self.forming.as_mut() {
                Some(kept) => kept.extend(msg.deltas),
                None => self.publish(i, msg),
            },
            Action::SendSync { to, request } => {
                let bytes = request.wire_len().unwrap_or(SyncRequest::MAX_BYTES);
                self.traffic.sync_requests += 1;
                self.send_sync(i, to, bytes, SyncMsg::Request(request));
            }
            Action::ReplySync { to, reply } => {
                let bytes = reply.wire_len().unwrap_or(SyncReply::MAX_BYTES);
                self.traffic.sync_replies += 1;
                self.send_sync(i, to, bytes, SyncMsg::Reply(reply));
            }
            Action::SendProbe { to, probe } => self.send_probe(i, to, probe),
            // The simulator never feeds `Input::Adopt`: a crash ends every instance of the
            // node (see `Sim::crash`), so there is nothing to take over.
            Action::AdoptTask { .. } => {}
            Action::StartTask { task, epoch, .. } => {
                let Some(t) = self.task_index.get(&task).copied() else {
                    return;
                };
                let delay = self.rng.gen_range(10_000..50_000);
                let node = &mut self.nodes[ix(i)];
                node.exec.insert((t, epoch), Slot::Starting);
                let gen = node.gen;
                self.queue.push(
                    now + delay,
                    Event::Exec {
                        node: i,
                        gen,
                        task: t,
                        epoch,
                        step: ExecStep::Started,
                    },
                );
            }
            Action::StopTask { task, epoch, .. } => {
                let Some(t) = self.task_index.get(&task).copied() else {
                    return;
                };
                let node = &mut self.nodes[ix(i)];
                let gen = node.gen;
                if let Some(Slot::Running(inst)) = node.exec.remove(&(t, epoch)) {
                    self.runs.end(inst, now);
                    self.stopped_early(i, t, inst, false);
                }
                self.queue.push(
                    now + crate::executor::REPORT_US,
                    Event::Exec {
                        node: i,
                        gen,
                        task: t,
                        epoch,
                        step: ExecStep::Stopped,
                    },
                );
            }
        }
    }

    /// Runs until `until` (simulated µs) or until the queue is empty.
    pub fn run_until(&mut self, until: SimTime) {
        while let Some(s) = self.queue.pop_until(until) {
            self.events += 1;
            self.trace = fold(self.trace, s.at);
            self.dispatch(s.ev);
        }
    }

    /// Runs until `until` and leaves the clock there, even where no event fell on it.
    pub fn run_to(&mut self, until: SimTime) {
        self.run_until(until);
        self.queue.advance_to(until);
    }

    /// Ends the run: network messages still on the wire are delivered without loss, nothing
    /// else runs (no ticks, executors, arrivals or faults), so the states can be compared.
    pub fn freeze_and_drain(&mut self) {
        self.frozen = true;
        self.network.lossless();
        let end = self.queue.now();
        self.node_up_changed(end, 0);
        self.ended_at = end;
        while let Some(s) = self.queue.pop() {
            if matches!(s.ev, Event::Gossip { .. } | Event::Sync { .. }) {
                self.events += 1;
                self.trace = fold(self.trace, s.at);
                self.ended_at = s.at;
                self.dispatch(s.ev);
            }
        }
    }

    /// The end of the run: the last delivery of the final drain (before it, the current time).
    pub fn end_time(&self) -> SimTime {
        if self.frozen {
            self.ended_at
        } else {
            self.queue.now()
        }
    }

    fn dispatch(&mut self, ev: Event) {
        match ev {
            Event::Tick { node, token } => {
                self.trace = fold(self.trace, 1 << 32 | u64::from(node));
                let n = &mut self.nodes[ix(node)];
                if self.frozen || n.tick_token != token || !n.up() {
                    return;
                }
                n.tick = None;
                n.in_tick = true;
                self.feed(node, Input::Tick);
                self.nodes[ix(node)].in_tick = false;
            }
            Event::Gossip { to, from, flood } => self.on_gossip(to, from, flood),
            Event::Sync { to, from, msg } => self.on_sync(to, from, *msg),
            Event::Swim { to, from, probe } => {
                self.trace = fold(self.trace, 8 << 32 | u64::from(to) << 16 ^ u64::from(from));
                if !self.frozen && self.nodes[ix(to)].up() {
                    let from = self.nodes[ix(from)].id;
                    self.feed(to, Input::Probe { from, probe });
                }
            }
            Event::SyncFailed { node, gen, peer } => {
                self.trace = fold(self.trace, 4 << 32 | u64::from(node));
                if self.nodes[ix(node)].gen == gen {
                    self.feed(node, Input::SyncFailed { peer });
                }
            }
            Event::Exec {
                node,
                gen,
                task,
                epoch,
                step,
            } => self.on_exec(node, gen, task, epoch, step),
            Event::Arrival { stream } => self.on_arrival(stream),
            Event::FaultStart { fault } => self.fault_start(fault),
            Event::FaultEnd { fault } => self.fault_end(fault),
            Event::Flap { fault, on } => self.flap(fault, on),
            Event::Rolling { fault, step } => self.rolling_step(fault, step),
            Event::Restart { node, data } => self.restart(node, data),
            Event::Guard { node, token } => self.on_guard(node, token),
            Event::Maintain => self.maintain(),
            Event::LoadRound => self.load_round(),
            Event::Probe => self.probe(),
            Event::Idle => self.idle_mark(),
        }
    }

    /// Schedules the first arrivals, the faults and the periodic rounds.
    fn schedule_timeline(&mut self) {
        self.queue.push(0, Event::Maintain);
        self.queue.push(0, Event::LoadRound);
        for s in 0..self.scenario.tasks.len() {
            let from = secs(self.scenario.tasks[s].from_s);
            self.queue.push(
                from,
                Event::Arrival {
                    stream: u32::try_from(s).unwrap_or(0),
                },
            );
        }
        for (f, fault) in self.scenario.faults.iter().enumerate() {
            let f = u32::try_from(f).unwrap_or(0);
            self.queue
                .push(secs(fault.start_s()), Event::FaultStart { fault: f });
        }
        let heal = secs(self.scenario.last_heal_s()).max(secs(self.scenario.measure.warmup_s));
        self.queue.push(heal, Event::Probe);
        if let Some([from, until]) = self.scenario.measure.idle_s {
            self.queue.push(secs(from), Event::Idle);
            self.queue.push(secs(until.max(from)), Event::Idle);
        }
    }

    /// Opens the idle window (snapshot) or closes it (keeps the increase).
    fn idle_mark(&mut self) {
        let now = self.queue.now();
        self.node_up_changed(now, 0);
        let (t, us) = (self.traffic, self.node_us);
        match self.idle_start {
            None => self.idle_start = Some((t, us)),
            Some((t0, us0)) if self.idle.is_none() => {
                self.idle = Some((t.since(&t0), us.saturating_sub(us0)));
            }
            Some(_) => {}
        }
    }
}

/// Seconds to simulated µs.
pub fn secs(s: f64) -> SimTime {
    (s.max(0.0) * 1e6).round() as SimTime
}

/// A vector index from a node or task index.
pub(crate) fn ix(i: u32) -> usize {
    usize::try_from(i).unwrap_or(usize::MAX)
}

/// Folds one value into the trace hash.
pub(crate) fn fold(h: u64, x: u64) -> u64 {
    mix(h ^ x)
}
