//! The simulator as a driver of the replica conformance suite (`omesh_harness::conformance`):
//! a small mesh on the simulated network, tasks submitted through it registered with the
//! fake executor (which then runs them until told to exit or stop), and every input fed and
//! action polled recorded in the suite's journal.

use omesh_harness::conformance::{Driver, Journal};
use omesh_protocol::{Epoch, Millis, NodeId, SignedTaskSpec, TaskId};
use omesh_state::{Input, Replica, ReplicaConfig};

use crate::sim::{ix, ExecStep, Slot};
use crate::workload::TaskInfo;
use crate::{Scenario, Sim};

/// Microseconds of simulated time per millisecond.
const US_PER_MS: u64 = 1_000;

/// A simulation driven by the conformance suite.
pub struct SimDriver {
    /// The simulation.
    pub sim: Sim,
}

impl SimDriver {
    /// A mesh of `configs.len()` nodes booted within 100 ms, whose replicas take their
    /// settings (timings, retention, submitters, tags) from the first config; node ids are
    /// netsim's own.
    pub fn new(configs: &[ReplicaConfig], seed: u64) -> Self {
        let n = u32::try_from(configs.len()).unwrap_or(u32::MAX);
        let text = format!(
            "name = \"conformance\"\nnodes = {n}\nduration_s = 3600\nboot_spread_s = 0.1\n"
        );
        let scenario = match Scenario::parse(&text) {
            Ok(s) => s,
            Err(e) => panic!("the conformance scenario does not parse: {e}"),
        };
        let mut sim = Sim::new(scenario, seed);
        if let Some(first) = configs.first() {
            let mut base = first.clone();
            base.propagation_samples = 0;
            base.authorized_submitters
                .extend(sim.base_config.authorized_submitters.iter().copied());
            sim.base_config = base;
            for g in &mut sim.groups {
                g.tags.extend(first.tags.iter().cloned());
            }
        }
        let ids = sim.nodes.iter().map(|n| n.id).collect::<Vec<_>>();
        // Ticks are scheduled at the microsecond the replica's millisecond maps to.
        sim.journal = Some(Journal::new(ids, 1));
        // Every node boots within 100 ms: the suite reads replicas from its first step.
        sim.run_to(200 * US_PER_MS);
        Self { sim }
    }

    fn index(&self, id: NodeId) -> Option<u32> {
        self.sim.by_id.get(&id).copied()
    }
}

impl Driver for SimDriver {
    fn nodes(&self) -> Vec<NodeId> {
        self.sim.nodes.iter().map(|n| n.id).collect()
    }

    fn advance(&mut self, ms: Millis) {
        let until = self.sim.now() + ms * US_PER_MS;
        self.sim.run_to(until);
    }

    fn inspect(&self, id: NodeId, f: &mut dyn FnMut(&Replica, Millis)) {
        let now = self.sim.now();
        if let Some(node) = self.index(id).map(|i| &self.sim.nodes[ix(i)]) {
            if let Some(r) = node.replica.as_ref() {
                f(r, node.clock.local_ms(now));
            }
        }
    }

    fn submit(&mut self, at: NodeId, spec: SignedTaskSpec) {
        let Some(via) = self.index(at) else {
            return;
        };
        let id = spec.id();
        let t = u32::try_from(self.sim.tasks.len()).unwrap_or(u32::MAX);
        self.sim.tasks.push(TaskInfo {
            id,
            stream: u32::MAX,
            submitted_at: self.sim.now(),
            via,
            // Runs until the suite makes it exit.
            duration_us: u64::MAX / 4,
            cpu_millis: spec.spec.cpu_millis,
            fail_permille: 0,
            accepted: false,
            disconnect: spec.spec.disconnect,
        });
        self.sim.task_index.insert(id, t);
        let accepted = self.sim.feed(via, Input::Submit(spec));
        self.sim.tasks[ix(t)].accepted = accepted;
    }

    fn cancel(&mut self, at: NodeId, task: TaskId) {
        if let Some(i) = self.index(at) {
            self.sim
                .feed(i, Input::Cancel(omesh_harness::fixtures::cancel(task)));
        }
    }

    fn exit(&mut self, at: NodeId, task: TaskId, code: i32) -> bool {
        let (Some(i), Some(t)) = (self.index(at), self.sim.task_index.get(&task).copied()) else {
            return false;
        };
        let node = &self.sim.nodes[ix(i)];
        let Some(epoch) = node
            .exec
            .iter()
            .find_map(|((tt, e), s)| (*tt == t && matches!(s, Slot::Running(_))).then_some(*e))
        else {
            return false;
        };
        // The fake executor's own exit, as if the run's duration had passed now.
        let gen = node.gen;
        self.sim.on_exec(i, gen, t, epoch, ExecStep::Exit(code));
        true
    }

    fn running(&self) -> Vec<(NodeId, TaskId, Epoch)> {
        let mut out = Vec::new();
        for node in self.sim.nodes.iter().filter(|n| n.up()) {
            for ((t, epoch), slot) in &node.exec {
                if let (Slot::Running(_), Some(info)) = (slot, self.sim.tasks.get(ix(*t))) {
                    out.push((node.id, info.id, *epoch));
                }
            }
        }
        out
    }

    fn crash(&mut self, id: NodeId) {
        if let Some(i) = self.index(id) {
            self.sim.crash(i);
        }
    }

    fn journal(&self) -> &Journal {
        match self.sim.journal.as_ref() {
            Some(j) => j,
            None => unreachable!("a SimDriver always records"),
        }
    }
}
