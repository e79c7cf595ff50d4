//! The workload: task arrivals from the scenario's streams and the load each host reports.

use std::collections::{BTreeMap, BTreeSet};

use omesh_protocol::{Digest, Disconnect, Epoch, ExecutorKind, LoadSample, TaskId, TaskSpec};
use omesh_state::Input;
use rand::Rng;

use crate::network::mix;
use crate::queue::{SimTime, US_PER_MS};
use crate::sim::{ix, secs, Event, Sim, Slot};

/// How often every node samples its load.
const LOAD_PERIOD_US: SimTime = 1_000 * US_PER_MS;

/// One submitted task, as the simulation knows it.
#[derive(Debug, Clone)]
pub struct TaskInfo {
    /// Its id.
    pub id: TaskId,
    /// The stream it came from.
    pub stream: u32,
    /// When it was submitted.
    pub submitted_at: SimTime,
    /// The node it was submitted through.
    pub via: u32,
    /// How long one run lasts.
    pub duration_us: SimTime,
    /// CPU it reserves.
    pub cpu_millis: u32,
    /// Chance a run fails, in thousandths.
    pub fail_permille: u32,
    /// Whether the replica accepted it.
    pub accepted: bool,
    /// The disconnect policy its spec carries.
    pub disconnect: Disconnect,
}

impl TaskInfo {
    /// Whether the run of `epoch` exits non-zero (fixed per task and epoch).
    pub fn fails(&self, epoch: Epoch) -> bool {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.id.0[..8]);
        mix(u64::from_le_bytes(b) ^ epoch) % 1000 < u64::from(self.fail_permille)
    }
}

impl Sim {
    pub(crate) fn on_arrival(&mut self, stream: u32) {
        let now = self.queue.now();
        let st = self.scenario.tasks[ix(stream)].clone();
        self.trace = crate::sim::fold(self.trace, 7 << 32 | u64::from(stream));
        if self.frozen || now > secs(st.until_s) {
            return;
        }
        let gap = -self.rng.gen_range(f64::EPSILON..1.0).ln() / st.rate_per_s;
        let next = now + secs(gap);
        if next <= secs(st.until_s) {
            self.queue.push(next, Event::Arrival { stream });
        }
        let candidates: Vec<u32> = self
            .up_nodes()
            .filter(|(_, n)| st.submit_to == "*" || self.groups[n.group].name == st.submit_to)
            .map(|(i, _)| i)
            .collect();
        if candidates.is_empty() {
            return;
        }
        let via = candidates[self.rng.gen_range(0..candidates.len())];
        let nonce = self.tasks.len() as u64;
        let image = Digest::of(format!("netsim-image-{stream}").as_bytes());
        let spec = TaskSpec {
            image: format!("app@sha256:{image}"),
            command: vec!["/usr/bin/work".to_owned(), format!("--job={nonce}")],
            env: BTreeMap::new(),
            cpu_millis: st.cpu_millis,
            memory_bytes: st.memory_mb << 20,
            required_tags: st.required_tags.iter().cloned().collect::<BTreeSet<_>>(),
            priority: 0,
            max_attempts: st.max_attempts,
            timeout_ms: 0,
            executor: ExecutorKind::Any,
            nonce,
            submitter: [0; 32],
            disconnect: st.disconnect(),
        }
        .sign(&self.submitter);
        let id = spec.id();
        let [lo, hi] = st.duration_s;
        let duration = if hi > lo {
            self.rng.gen_range(lo..hi)
        } else {
            lo
        };
        let t = u32::try_from(self.tasks.len()).unwrap_or(u32::MAX);
        self.tasks.push(TaskInfo {
            id,
            stream,
            submitted_at: now,
            via,
            duration_us: secs(duration),
            cpu_millis: st.cpu_millis,
            fail_permille: st.fail_permille,
            accepted: false,
            disconnect: st.disconnect(),
        });
        self.task_index.insert(id, t);
        let accepted = self.feed(via, Input::Submit(spec));
        self.tasks[ix(t)].accepted = accepted;
    }

    pub(crate) fn load_round(&mut self) {
        let now = self.queue.now();
        self.trace = crate::sim::fold(self.trace, 8 << 32);
        if self.frozen {
            return;
        }
        let total = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        for i in 0..total {
            self.load_one(i);
        }
        self.queue.push(now + LOAD_PERIOD_US, Event::LoadRound);
    }

    /// Node `i`'s CPU and memory utilisation in thousandths right now: the group's base (or
    /// a load change in force) plus what its running instances reserve.
    pub(crate) fn true_load(&self, i: u32) -> (u64, u32) {
        let now = self.queue.now();
        let node = &self.nodes[ix(i)];
        let g = &self.groups[node.group];
        let (mut cpu, mut mem) = (u32::from(g.cpu_permille), u32::from(g.mem_permille));
        for l in &self.scenario.load {
            if (l.group == "*" || l.group == g.name)
                && now >= secs(l.from_s)
                && now < secs(l.until_s)
            {
                cpu = u32::from(l.cpu_permille);
                mem = u32::from(l.mem_permille);
            }
        }
        let reserved: u64 = node
            .exec
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Running(_)))
            .filter_map(|((t, _), _)| self.tasks.get(ix(*t)))
            .map(|t| u64::from(t.cpu_millis))
            .sum();
        let busy = reserved * 1000 / u64::from(g.cpu_millis.max(1));
        ((u64::from(cpu) + busy).min(1000), mem)
    }

    /// Node `i`'s CPU utilisation in thousandths right now (see [`Self::true_load`]).
    pub(crate) fn cpu_permille(&self, i: u32) -> u64 {
        self.true_load(i).0
    }

    /// Feeds node `i` its load if it changed: the group's base (or a load change in force)
    /// plus what its running instances reserve.
    pub(crate) fn load_one(&mut self, i: u32) {
        if !self.nodes[ix(i)].up() {
            return;
        }
        let (cpu, mem) = self.true_load(i);
        let sample = LoadSample {
            cpu_permille: u16::try_from(cpu).unwrap_or(1000),
            mem_permille: u16::try_from(mem.min(1000)).unwrap_or(1000),
        };
        if self.nodes[ix(i)].last_load != Some(sample) {
            self.nodes[ix(i)].last_load = Some(sample);
            self.feed(i, Input::Load(sample));
        }
    }
}
