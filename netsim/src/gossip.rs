//! The gossip model, shaped like gossipsub: each node keeps a mesh of about D peers; a
//! published message is forwarded along mesh links once per node, deduplicated by message
//! id. Lazy repair is not modelled here: it is the replica's own anti-entropy
//! (`SendSync`/`ReplySync`), sent point to point.

use std::sync::Arc;

use omesh_protocol::GossipMessage;
use omesh_state::Input;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::queue::US_PER_MS;
use crate::scenario::GossipSpec;
use crate::sim::{fold, ix, Event, Node, Sim};

/// The mesh overlay: symmetric links between node indices.
#[derive(Debug, Clone)]
pub struct Overlay {
    spec: GossipSpec,
    peers: Vec<Vec<u32>>,
}

impl Overlay {
    /// An empty overlay for `nodes` nodes.
    pub fn new(spec: GossipSpec, nodes: usize) -> Self {
        Self {
            spec,
            peers: vec![Vec::new(); nodes],
        }
    }

    /// Makes room for a node index added later.
    pub fn add_node(&mut self) {
        self.peers.push(Vec::new());
    }

    /// A node's mesh peers.
    pub fn peers(&self, node: u32) -> &[u32] {
        self.peers
            .get(usize::try_from(node).unwrap_or(usize::MAX))
            .map_or(&[], Vec::as_slice)
    }

    fn link(&mut self, a: u32, b: u32) {
        let (ai, bi) = (idx(a), idx(b));
        if a == b || self.peers[ai].contains(&b) {
            return;
        }
        self.peers[ai].push(b);
        self.peers[bi].push(a);
    }

    fn unlink(&mut self, a: u32, b: u32) {
        self.peers[idx(a)].retain(|p| *p != b);
        self.peers[idx(b)].retain(|p| *p != a);
    }

    /// Drops every link of a node (it crashed).
    pub fn isolate(&mut self, node: u32) {
        for p in std::mem::take(&mut self.peers[idx(node)]) {
            self.peers[idx(p)].retain(|q| *q != node);
        }
    }

    /// Grafts `node` to random eligible peers until it has D of them.
    pub fn graft(&mut self, rng: &mut ChaCha8Rng, node: u32, eligible: &dyn Fn(u32) -> bool) {
        self.graft_to(rng, node, self.spec.mesh_degree, eligible);
    }

    fn graft_to(
        &mut self,
        rng: &mut ChaCha8Rng,
        node: u32,
        want: usize,
        eligible: &dyn Fn(u32) -> bool,
    ) {
        let total = u32::try_from(self.peers.len()).unwrap_or(u32::MAX);
        let mut tries = 0;
        while self.peers[idx(node)].len() < want.min(self.spec.mesh_degree)
            && tries < 20 * self.spec.mesh_degree
        {
            tries += 1;
            let p = rng.gen_range(0..total);
            // Prefer peers with room below D, as gossipsub's grafts do; late in the search
            // take any peer below D_high, so no node is left short of links.
            let cap = if tries <= 10 * self.spec.mesh_degree {
                self.spec.mesh_degree
            } else {
                self.spec.mesh_high
            };
            if p != node
                && eligible(p)
                && self.peers[idx(p)].len() < cap
                && !self.peers[idx(node)].contains(&p)
            {
                self.link(node, p);
            }
        }
    }

    /// One maintenance round (gossipsub's heartbeat): drop links to peers that are down or
    /// unreachable, graft below D_low, prune above D_high. `up` says whether a node runs;
    /// `linked` whether two nodes can talk both ways.
    pub fn maintain(
        &mut self,
        rng: &mut ChaCha8Rng,
        up: &dyn Fn(u32) -> bool,
        linked: &dyn Fn(u32, u32) -> bool,
    ) {
        for n in 0..self.peers.len() {
            let node = u32::try_from(n).unwrap_or(u32::MAX);
            if !up(node) {
                continue;
            }
            let dead: Vec<u32> = self.peers[n]
                .iter()
                .copied()
                .filter(|p| !up(*p) || !linked(node, *p))
                .collect();
            for p in dead {
                self.unlink(node, p);
            }
            if self.peers[n].len() < self.spec.mesh_low {
                self.graft(rng, node, &|p| up(p) && linked(node, p));
            } else if self.peers[n].len() < self.spec.mesh_degree {
                // Between D_low and D, one more link per round. A group cut off together
                // re-forms its mesh among itself, and at D_low it would stay an island after
                // the heal, reached only by anti-entropy; real gossipsub bridges that with its
                // lazy IHAVE gossip and outbound quota, which this model does not carry.
                let want = self.peers[n].len() + 1;
                self.graft_to(rng, node, want, &|p| up(p) && linked(node, p));
            }
            while self.peers[n].len() > self.spec.mesh_high {
                let i = rng.gen_range(0..self.peers[n].len());
                let p = self.peers[n][i];
                self.unlink(node, p);
            }
        }
    }
}

fn idx(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// A message being flooded through the mesh.
#[derive(Debug)]
pub struct Flood {
    /// Global message id (publication order).
    pub id: u64,
    /// The message, shared by every receiver (none needs its own copy).
    pub msg: Arc<GossipMessage>,
    /// Its size with the real codec, in bytes.
    pub bytes: usize,
    /// Per origin node index, the highest stamp it carries.
    pub stamps: Vec<(u32, u64)>,
    seen: Vec<u64>,
    /// Copies on the wire.
    pub inflight: u32,
}

impl Flood {
    /// Whether `node` has received it (or published it).
    pub fn seen(&self, node: u32) -> bool {
        let n = idx(node);
        self.seen
            .get(n / 64)
            .is_some_and(|w| w & (1u64 << (n % 64)) != 0)
    }

    /// Marks `node` as having received it; false if it had already.
    pub fn mark(&mut self, node: u32) -> bool {
        let n = idx(node);
        if self.seen.len() <= n / 64 {
            self.seen.resize(n / 64 + 1, 0);
        }
        let bit = 1u64 << (n % 64);
        let fresh = self.seen[n / 64] & bit == 0;
        self.seen[n / 64] |= bit;
        fresh
    }
}

/// The messages in flight, in a slab; a flood is dropped once no copy is on the wire.
#[derive(Debug, Default)]
pub struct Floods {
    slab: Vec<Option<Flood>>,
    free: Vec<u32>,
    next_id: u64,
}

impl Floods {
    /// Starts a flood of `msg` from `origin`; returns its slot.
    pub fn publish(
        &mut self,
        origin: u32,
        msg: GossipMessage,
        bytes: usize,
        stamps: Vec<(u32, u64)>,
        nodes: usize,
    ) -> u32 {
        self.next_id += 1;
        let mut f = Flood {
            id: self.next_id,
            msg: Arc::new(msg),
            bytes,
            stamps,
            seen: vec![0; nodes.div_ceil(64)],
            inflight: 0,
        };
        f.mark(origin);
        if let Some(slot) = self.free.pop() {
            self.slab[idx(slot)] = Some(f);
            slot
        } else {
            self.slab.push(Some(f));
            u32::try_from(self.slab.len() - 1).unwrap_or(u32::MAX)
        }
    }

    /// The flood in `slot`.
    pub fn get(&self, slot: u32) -> Option<&Flood> {
        self.slab.get(idx(slot)).and_then(Option::as_ref)
    }

    /// The flood in `slot`, mutably.
    pub fn get_mut(&mut self, slot: u32) -> Option<&mut Flood> {
        self.slab.get_mut(idx(slot)).and_then(Option::as_mut)
    }

    /// Drops the flood in `slot` if no copy is on the wire any more.
    pub fn release_if_done(&mut self, slot: u32) {
        let done = self.get(slot).is_some_and(|f| f.inflight == 0);
        if done {
            self.slab[idx(slot)] = None;
            self.free.push(slot);
        }
    }

    /// Floods alive.
    pub fn live(&self) -> usize {
        self.slab.len() - self.free.len()
    }
}

impl Sim {
    /// Mesh maintenance, and pings along mesh links (they feed `Input::Rtt`).
    pub(crate) fn maintain(&mut self) {
        let now = self.queue.now();
        self.trace = fold(self.trace, 6 << 32);
        let nodes = &self.nodes;
        let network = &self.network;
        self.overlay.maintain(
            &mut self.rng,
            &|n| nodes.get(ix(n)).is_some_and(Node::up),
            &|a, b| network.reachable(a, b) && network.reachable(b, a),
        );
        let (ping_ms, period_ms) = (
            self.scenario.gossip.ping_ms,
            self.scenario.gossip.maintenance_ms,
        );
        let every = (ping_ms / period_ms).max(1);
        if ping_ms > 0 && self.maintain_round.is_multiple_of(every) {
            let total = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
            for i in 0..total {
                if !self.nodes[ix(i)].up() {
                    continue;
                }
                for p in self.overlay.peers(i).to_vec() {
                    let rtt_us =
                        2 * self.network.base_latency_us(i, p) + self.rng.gen_range(0..2_000);
                    let peer = self.nodes[ix(p)].id;
                    self.feed(i, Input::Rtt { peer, rtt_us });
                }
            }
        }
        self.maintain_round += 1;
        self.queue
            .push(now + period_ms * US_PER_MS, Event::Maintain);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mesh_is_symmetric_with_degree_near_d() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut o = Overlay::new(GossipSpec::default(), 200);
        for n in 0..200 {
            o.graft(&mut rng, n, &|_| true);
        }
        o.maintain(&mut rng, &|n| n != 3, &|_, _| true);
        for n in 0..200u32 {
            for p in o.peers(n) {
                assert!(o.peers(*p).contains(&n));
                assert_ne!(*p, 3, "a down node stays in the mesh");
            }
            if n != 3 {
                assert!((4..=12).contains(&o.peers(n).len()), "{}", o.peers(n).len());
            }
        }
    }

    #[test]
    fn a_flood_marks_each_node_once() {
        let mut floods = Floods::default();
        let slot = floods.publish(2, GossipMessage { deltas: vec![] }, 10, vec![], 10);
        let f = floods
            .get_mut(slot)
            .map(|f| (f.mark(2), f.mark(70), f.mark(70)));
        assert_eq!(f, Some((false, true, false)));
        floods.release_if_done(slot);
        assert_eq!(floods.live(), 0);
    }
}
