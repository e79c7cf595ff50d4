//! How long a change takes to reach every live node: deltas are sampled by `(origin, stamp)`
//! when published, and a sample completes once every node that was up at publication (and
//! still is) holds it in its version vector.

use omesh_protocol::{DeltaBody, GossipMessage, NodeId};
use omesh_state::Replica;

use crate::network::mix;
use crate::queue::SimTime;
use crate::sim::{ix, Event, Sim};

/// How often the simulation checks whether the mesh caught up after the last heal.
const PROBE_US: SimTime = 100_000;

/// What every live node had written when the last fault healed, and who has not caught up.
#[derive(Debug)]
pub(crate) struct HealCut {
    /// When the last fault healed.
    pub(crate) at: SimTime,
    /// Per live node: index, id and its own stamp then.
    pub(crate) cut: Vec<(u32, NodeId, u64)>,
    /// Nodes that do not hold all of it yet.
    pub(crate) waiting: Vec<u32>,
}

impl Sim {
    /// Catch-up check: once the last fault healed, every live node must come to hold what
    /// every live node had written at that moment.
    pub(crate) fn probe(&mut self) {
        let now = self.queue.now();
        if self.heal_converged_us.is_some() || self.frozen {
            return;
        }
        if self.heal_cut.is_none() {
            let cut: Vec<(u32, NodeId, u64)> = self
                .up_nodes()
                .filter_map(|(i, n)| {
                    let r = n.replica.as_ref()?;
                    Some((i, n.id, r.version_of(&n.id)))
                })
                .collect();
            let waiting = cut.iter().map(|(i, _, _)| *i).collect();
            self.heal_cut = Some(HealCut {
                at: now,
                cut,
                waiting,
            });
        }
        let nodes = &self.nodes;
        if let Some(HealCut { at, cut, waiting }) = self.heal_cut.as_mut() {
            waiting.retain(|w| {
                let Some(r) = nodes[ix(*w)].replica.as_ref() else {
                    return false;
                };
                !cut.iter()
                    .all(|(o, id, s)| !nodes[ix(*o)].up() || r.version_of(id) >= *s)
            });
            if waiting.is_empty() {
                self.heal_converged_us = Some(now - *at);
                return;
            }
        }
        self.queue.push(now + PROBE_US, Event::Probe);
    }
}

/// What kind of delta a sample is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A node record (heartbeat).
    Heartbeat,
    /// A spec, lease, status, cancel or tombstone.
    Task,
}

#[derive(Debug)]
struct Sample {
    origin: u32,
    origin_id: NodeId,
    stamp: u64,
    at: SimTime,
    kind: Kind,
    pending: Vec<u64>,
    remaining: u32,
}

impl Sample {
    fn clear(&mut self, node: u32) -> bool {
        let n = usize::try_from(node).unwrap_or(usize::MAX);
        let Some(w) = self.pending.get_mut(n / 64) else {
            return false;
        };
        let bit = 1u64 << (n % 64);
        if *w & bit == 0 {
            return false;
        }
        *w &= !bit;
        self.remaining -= 1;
        true
    }

    fn waits_on(&self, node: u32) -> bool {
        let n = usize::try_from(node).unwrap_or(usize::MAX);
        self.pending
            .get(n / 64)
            .is_some_and(|w| w & (1u64 << (n % 64)) != 0)
    }
}

/// The tracker.
#[derive(Debug, Default)]
pub struct Tracker {
    slots: Vec<Option<Sample>>,
    free: Vec<usize>,
    by_origin: Vec<Vec<usize>>,
    outstanding: usize,
    max: usize,
    heartbeat_permille: u32,
    /// Completed samples: `(kind, latency in µs)`.
    pub done: Vec<(Kind, SimTime)>,
    /// Samples dropped because their origin crashed before they completed.
    pub abandoned: usize,
}

impl Tracker {
    /// A tracker keeping at most `max` samples outstanding.
    pub fn new(max: usize, heartbeat_permille: u32) -> Self {
        Self {
            max,
            heartbeat_permille,
            ..Self::default()
        }
    }

    /// Samples still outstanding.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// `origin` published `msg` at `now`; `up` lists the nodes that must receive it.
    pub fn on_publish(
        &mut self,
        now: SimTime,
        origin: u32,
        msg: &GossipMessage,
        up: &dyn Fn(u32) -> bool,
        nodes: u32,
    ) {
        for d in &msg.deltas {
            if self.outstanding >= self.max {
                return;
            }
            let kind = match d.body {
                DeltaBody::Node(_) => Kind::Heartbeat,
                _ => Kind::Task,
            };
            if kind == Kind::Heartbeat
                && mix(u64::from(origin) << 40 ^ d.stamp) % 1000
                    >= u64::from(self.heartbeat_permille)
            {
                continue;
            }
            let mut pending = vec![0u64; usize::try_from(nodes).unwrap_or(0).div_ceil(64)];
            let mut remaining = 0;
            for n in (0..nodes).filter(|n| *n != origin && up(*n)) {
                let i = usize::try_from(n).unwrap_or(0);
                pending[i / 64] |= 1 << (i % 64);
                remaining += 1;
            }
            if remaining == 0 {
                continue;
            }
            let sample = Sample {
                origin,
                origin_id: d.origin,
                stamp: d.stamp,
                at: now,
                kind,
                pending,
                remaining,
            };
            let slot = if let Some(s) = self.free.pop() {
                self.slots[s] = Some(sample);
                s
            } else {
                self.slots.push(Some(sample));
                self.slots.len() - 1
            };
            let o = usize::try_from(origin).unwrap_or(0);
            if self.by_origin.len() <= o {
                self.by_origin.resize(o + 1, Vec::new());
            }
            self.by_origin[o].push(slot);
            self.outstanding += 1;
        }
    }

    /// `node` merged a message carrying stamps up to `max_stamp` of `origin`.
    pub fn on_gossip(
        &mut self,
        now: SimTime,
        node: u32,
        replica: &Replica,
        origin: u32,
        max_stamp: u64,
    ) {
        let o = usize::try_from(origin).unwrap_or(usize::MAX);
        let Some(list) = self.by_origin.get(o) else {
            return;
        };
        let due: Vec<usize> = list
            .iter()
            .copied()
            .filter(|s| {
                self.slots[*s]
                    .as_ref()
                    .is_some_and(|x| x.stamp <= max_stamp && x.waits_on(node))
            })
            .collect();
        for s in due {
            self.check(now, s, node, replica);
        }
    }

    /// `node` merged a sync reply: anything may have arrived.
    pub fn on_sync(&mut self, now: SimTime, node: u32, replica: &Replica) {
        let due: Vec<usize> = (0..self.slots.len())
            .filter(|s| self.slots[*s].as_ref().is_some_and(|x| x.waits_on(node)))
            .collect();
        for s in due {
            self.check(now, s, node, replica);
        }
    }

    fn check(&mut self, now: SimTime, slot: usize, node: u32, replica: &Replica) {
        let Some(sample) = self.slots[slot].as_mut() else {
            return;
        };
        if replica.version_of(&sample.origin_id) >= sample.stamp && sample.clear(node) {
            self.maybe_done(now, slot);
        }
    }

    /// `node` went down: nothing waits on it any more; samples it originated are abandoned.
    pub fn node_down(&mut self, now: SimTime, node: u32) {
        for slot in 0..self.slots.len() {
            let Some(sample) = self.slots[slot].as_mut() else {
                continue;
            };
            if sample.origin == node {
                self.abandoned += 1;
                self.remove(slot);
                continue;
            }
            if sample.clear(node) {
                self.maybe_done(now, slot);
            }
        }
    }

    fn maybe_done(&mut self, now: SimTime, slot: usize) {
        let Some(sample) = self.slots[slot].as_ref() else {
            return;
        };
        if sample.remaining == 0 {
            self.done.push((sample.kind, now - sample.at));
            self.remove(slot);
        }
    }

    fn remove(&mut self, slot: usize) {
        if let Some(sample) = self.slots[slot].take() {
            let o = usize::try_from(sample.origin).unwrap_or(0);
            if let Some(list) = self.by_origin.get_mut(o) {
                list.retain(|s| *s != slot);
            }
            self.free.push(slot);
            self.outstanding -= 1;
        }
    }
}
