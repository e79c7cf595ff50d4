//! The peer's replica driver (`omesh::peer::ReplicaDriver`, the dispatch code every peer
//! runs) keeps the replica contract: several drivers in one process, over an in-memory
//! network and executor on a manual clock, run the conformance suite of `omesh-harness`.
#![allow(clippy::unwrap_used)]

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;

use omesh::peer::{Outputs, ReplicaDriver, TimeSource};
use omesh_harness::conformance::{self, Driver, Journal};
use omesh_protocol::{
    Epoch, GossipMessage, Millis, NodeId, Probe, SignedTaskSpec, SyncReply, SyncRequest, TaskId,
};
use omesh_state::{Action, ExecEvent, Input, Replica, ReplicaConfig, StopReason};

/// One clock for the whole in-process mesh, moved by the test.
#[derive(Clone)]
struct ManualClock(Rc<Cell<Millis>>);

impl TimeSource for ManualClock {
    fn now(&self) -> Millis {
        self.0.get()
    }
}

/// What one node's outputs did, for the mesh to carry out after its drain.
#[derive(Default)]
struct Outbox {
    me: NodeId,
    sends: Vec<(NodeId, Input)>,
    published: Vec<GossipMessage>,
    started: Vec<(TaskId, Epoch)>,
    stopped: Vec<(TaskId, Epoch)>,
    running: BTreeSet<(TaskId, Epoch)>,
    /// The journal entries of what the driver polled and answered itself.
    polled: Vec<Action>,
    answered: Vec<Input>,
}

impl Outputs for Outbox {
    fn publish(&mut self, msg: &GossipMessage) {
        self.published.push(msg.clone());
    }

    fn send_sync(&mut self, to: NodeId, request: &SyncRequest) -> bool {
        let from = self.me;
        self.sends.push((
            to,
            Input::SyncRequest {
                from,
                request: request.clone(),
            },
        ));
        true
    }

    fn reply_sync(&mut self, to: NodeId, reply: &SyncReply) {
        let from = self.me;
        self.sends.push((
            to,
            Input::SyncReply {
                from,
                reply: reply.clone(),
            },
        ));
    }

    fn send_probe(&mut self, to: NodeId, probe: Probe) {
        let from = self.me;
        self.sends.push((to, Input::Probe { from, probe }));
    }

    fn start_task(&mut self, task: TaskId, epoch: Epoch, spec: Arc<SignedTaskSpec>) {
        self.polled.push(Action::StartTask { task, epoch, spec });
        self.started.push((task, epoch));
    }

    fn stop_task(&mut self, task: TaskId, epoch: Epoch) -> bool {
        self.polled.push(Action::StopTask {
            task,
            epoch,
            reason: StopReason::Cancelled,
        });
        if self.running.remove(&(task, epoch)) {
            self.stopped.push((task, epoch));
            true
        } else {
            false
        }
    }

    fn answered(&mut self, input: &Input) {
        self.answered.push(input.clone());
    }
}

struct InProcess {
    clock: ManualClock,
    nodes: BTreeMap<NodeId, (ReplicaDriver<ManualClock>, Outbox)>,
    down: BTreeSet<NodeId>,
    /// Messages in flight: (due, order) -> (to, input); 3 ms one way.
    wire: BTreeMap<(Millis, u64), (NodeId, Input)>,
    seq: u64,
    journal: Journal,
}

impl InProcess {
    fn new(configs: Vec<ReplicaConfig>) -> Self {
        let clock = ManualClock(Rc::new(Cell::new(1_000_000)));
        let ids: Vec<NodeId> = configs.iter().map(|c| c.node_id).collect();
        let mut nodes = BTreeMap::new();
        for cfg in configs {
            let id = cfg.node_id;
            let driver = ReplicaDriver::new(
                omesh_harness::fixtures::replica(cfg).unwrap(),
                clock.clone(),
            );
            let out = Outbox {
                me: id,
                ..Outbox::default()
            };
            nodes.insert(id, (driver, out));
        }
        let mut m = Self {
            clock,
            nodes,
            down: BTreeSet::new(),
            wire: BTreeMap::new(),
            seq: 0,
            // The mesh steps in 1 ms.
            journal: Journal::new(ids.iter().copied(), 1),
        };
        for id in ids {
            m.feed(id, Input::Tick);
        }
        m
    }

    /// Feeds one input through the production driver and carries out what it caused.
    fn feed(&mut self, id: NodeId, input: Input) {
        if self.down.contains(&id) {
            return;
        }
        let now = self.clock.now();
        self.journal.fed(id, now, &input);
        let Some((driver, out)) = self.nodes.get_mut(&id) else {
            return;
        };
        let _ = driver.feed(input);
        driver.drain(out);
        let timeout = driver.replica().poll_timeout();
        // The journal sees the actions and answers the drain went through, in order.
        for a in std::mem::take(&mut out.polled) {
            self.journal.polled(id, &a);
        }
        for a in std::mem::take(&mut out.answered) {
            self.journal.fed(id, now, &a);
        }
        self.journal.drained(id);
        self.journal.timeout(id, timeout);
        self.route(id);
    }

    fn route(&mut self, id: NodeId) {
        let now = self.clock.now();
        let Some((_, out)) = self.nodes.get_mut(&id) else {
            return;
        };
        let sends = std::mem::take(&mut out.sends);
        let published = std::mem::take(&mut out.published);
        let started = std::mem::take(&mut out.started);
        let stopped = std::mem::take(&mut out.stopped);
        for (task, epoch) in &started {
            out.running.insert((*task, *epoch));
        }
        let peers: Vec<NodeId> = self.nodes.keys().copied().filter(|p| *p != id).collect();
        for msg in published {
            for p in &peers {
                self.post(
                    now + 3,
                    *p,
                    Input::Gossip {
                        via: id,
                        msg: msg.clone(),
                    },
                );
            }
        }
        for (to, input) in sends {
            self.post(now + 3, to, input);
        }
        for (task, epoch) in started {
            let event = ExecEvent::Started;
            self.post(now + 1, id, Input::Executor { task, epoch, event });
        }
        for (task, epoch) in stopped {
            let event = ExecEvent::Stopped;
            self.post(now + 1, id, Input::Executor { task, epoch, event });
        }
    }

    fn post(&mut self, at: Millis, to: NodeId, input: Input) {
        self.seq += 1;
        self.wire.insert((at, self.seq), (to, input));
    }

    fn step(&mut self) {
        let now = self.clock.now() + 1;
        self.clock.0.set(now);
        while let Some(e) = self.wire.first_entry() {
            if e.key().0 > now {
                break;
            }
            let (to, input) = e.remove();
            self.feed(to, input);
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let due = self.nodes[&id].0.replica().poll_timeout();
            if due.is_some_and(|t| t <= now) {
                self.feed(id, Input::Tick);
            }
        }
    }
}

impl Driver for InProcess {
    fn nodes(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    fn advance(&mut self, ms: Millis) {
        for _ in 0..ms {
            self.step();
        }
    }

    fn inspect(&self, id: NodeId, f: &mut dyn FnMut(&Replica, Millis)) {
        if let Some((d, _)) = self.nodes.get(&id) {
            f(d.replica(), d.now());
        }
    }

    fn submit(&mut self, at: NodeId, spec: SignedTaskSpec) {
        self.feed(at, Input::Submit(spec));
    }

    fn cancel(&mut self, at: NodeId, task: TaskId) {
        self.feed(at, Input::Cancel(omesh_harness::fixtures::cancel(task)));
    }

    fn exit(&mut self, at: NodeId, task: TaskId, code: i32) -> bool {
        let Some((_, out)) = self.nodes.get_mut(&at) else {
            return false;
        };
        let Some(run) = out.running.iter().copied().find(|r| r.0 == task) else {
            return false;
        };
        out.running.remove(&run);
        let event = ExecEvent::Exited { code };
        self.feed(
            at,
            Input::Executor {
                task,
                epoch: run.1,
                event,
            },
        );
        true
    }

    fn running(&self) -> Vec<(NodeId, TaskId, Epoch)> {
        self.nodes
            .iter()
            .filter(|(id, _)| !self.down.contains(id))
            .flat_map(|(id, (_, out))| out.running.iter().map(|(t, e)| (*id, *t, *e)))
            .collect()
    }

    fn crash(&mut self, id: NodeId) {
        self.down.insert(id);
        self.journal.crashed(id);
        if let Some((_, out)) = self.nodes.get_mut(&id) {
            out.running.clear();
        }
    }

    fn journal(&self) -> &Journal {
        &self.journal
    }
}

#[test]
fn the_peers_replica_driver_keeps_the_replica_contract() {
    conformance::run_all(InProcess::new);
}

#[test]
fn a_stop_for_an_instance_not_running_is_answered_by_the_driver_itself() {
    // The duty the peer's driver carries for its executor: a StopTask whose instance is not
    // running (never started, or already ended) is answered at once with Stopped.
    let mut m = InProcess::new(conformance::configs(3));
    let nodes = Driver::nodes(&m);
    assert!(conformance::wait_for(&mut m, 30_000, |m| nodes.iter().all(
        |n| { conformance::read(m, *n, |r, now| r.may_claim(now)) }
    )));
    let spec = omesh_harness::spec_with(77, |s| s.command = vec!["sleep".into(), "600".into()]);
    let task = spec.id();
    m.submit(nodes[0], spec);
    assert!(conformance::wait_for(&mut m, 30_000, |m| !m
        .running()
        .is_empty()));
    let (owner, _, _) = m.running()[0];
    // The instance ends on its own without its report arriving yet: the executor no
    // longer runs it when the cancel's StopTask comes.
    if let Some((_, out)) = m.nodes.get_mut(&owner) {
        out.running.clear();
    }
    Driver::cancel(&mut m, nodes[1], task);
    assert!(
        conformance::wait_for(&mut m, 60_000, |m| {
            m.nodes()
                .iter()
                .all(|n| conformance::read(m, *n, |r, _| r.state().tombstone(&task).is_some()))
        }),
        "the task was never compacted: the StopTask stayed unanswered"
    );
    assert!(m.journal().stopped(task) > 0);
    assert!(
        m.journal().problems().is_empty(),
        "{:?}",
        m.journal().problems()
    );
}
