//! Moving messages: gossip floods over the mesh (one forward per node, deduplicated by
//! message id) and point-to-point anti-entropy, both through the network model, with every
//! copy counted in messages and bytes with the real codec.

use std::sync::Arc;

use omesh_protocol::{GossipMessage, NodeId, Probe, Wire};
use omesh_state::Input;

use crate::network::Fate;
use crate::queue::SimTime;
use crate::sim::{fold, ix, secs, Event, Sim, SyncMsg};

/// How long a requester waits for a lost sync before it is told the sync failed.
pub(crate) const SYNC_TIMEOUT_US: SimTime = 5_000_000;

impl Sim {
    pub(crate) fn publish(&mut self, i: u32, msg: GossipMessage) {
        let now = self.queue.now();
        let bytes = msg.wire_len().unwrap_or(GossipMessage::MAX_BYTES);
        let mut stamps: Vec<(u32, u64)> = Vec::new();
        for d in &msg.deltas {
            let Some(o) = self.by_id.get(&d.origin).copied() else {
                continue;
            };
            match stamps.iter_mut().find(|(x, _)| *x == o) {
                Some((_, s)) => *s = (*s).max(d.stamp),
                None => stamps.push((o, d.stamp)),
            }
        }
        let total = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        if now >= secs(self.scenario.measure.warmup_s) && !self.frozen {
            let nodes = &self.nodes;
            self.tracker
                .on_publish(now, i, &msg, &|n| nodes[ix(n)].up(), total);
        }
        self.traffic.published += 1;
        let slot = self.floods.publish(i, msg, bytes, stamps, self.nodes.len());
        let peers = self.overlay.peers(i).to_vec();
        for p in peers {
            self.forward(slot, i, p);
        }
        self.floods.release_if_done(slot);
    }

    fn forward(&mut self, slot: u32, from: u32, to: u32) {
        let now = self.queue.now();
        if !self.nodes[ix(to)].up() {
            return;
        }
        let Some(f) = self.floods.get(slot) else {
            return;
        };
        let (bytes, seen) = (f.bytes, f.seen(to));
        self.traffic.gossip_msgs += 1;
        self.traffic.gossip_bytes += bytes as u64;
        if seen {
            // The copy still crosses the link; it only needs no event of its own.
            self.traffic.gossip_dups += 1;
            self.network.occupy(now, from, bytes);
            return;
        }
        let fate = self.network.send(&mut self.rng, now, from, to, bytes);
        for at in arrivals(fate) {
            if let Some(f) = self.floods.get_mut(slot) {
                f.inflight += 1;
            }
            self.queue.push(
                at,
                Event::Gossip {
                    to,
                    from,
                    flood: slot,
                },
            );
        }
        if fate == Fate::Lost {
            self.traffic.lost += 1;
        }
    }

    pub(crate) fn send_sync(&mut self, i: u32, to: NodeId, bytes: usize, msg: SyncMsg) {
        let now = self.queue.now();
        self.traffic.sync_bytes += bytes as u64;
        let Some(t) = self.by_id.get(&to).copied() else {
            return;
        };
        let fate = self.network.send(&mut self.rng, now, i, t, bytes);
        let is_request = matches!(msg, SyncMsg::Request(_));
        match fate {
            Fate::Lost => {
                self.traffic.lost += 1;
                // The requester times out: on its own request, or on the reply it never got.
                let (node, peer) = if is_request {
                    (i, to)
                } else {
                    (t, self.nodes[ix(i)].id)
                };
                let gen = self.nodes[ix(node)].gen;
                self.queue
                    .push(now + SYNC_TIMEOUT_US, Event::SyncFailed { node, gen, peer });
            }
            Fate::Arrives(at) | Fate::Twice(at, _) => {
                self.queue.push(
                    at,
                    Event::Sync {
                        to: t,
                        from: i,
                        msg: Box::new(msg),
                    },
                );
            }
        }
    }

    /// A liveness probe: point to point, best effort (a lost probe is a missed answer).
    pub(crate) fn send_probe(&mut self, i: u32, to: NodeId, probe: Probe) {
        let now = self.queue.now();
        let bytes = probe.wire_len().unwrap_or(Probe::MAX_BYTES);
        self.traffic.probe_msgs += 1;
        self.traffic.probe_bytes += bytes as u64;
        let Some(t) = self.by_id.get(&to).copied() else {
            return;
        };
        let fate = self.network.send(&mut self.rng, now, i, t, bytes);
        if fate == Fate::Lost {
            self.traffic.lost += 1;
        }
        for at in arrivals(fate) {
            self.queue.push(
                at,
                Event::Swim {
                    to: t,
                    from: i,
                    probe,
                },
            );
        }
    }

    pub(crate) fn on_gossip(&mut self, to: u32, from: u32, slot: u32) {
        let now = self.queue.now();
        self.trace = fold(self.trace, 2 << 32 | u64::from(to) << 16 ^ u64::from(slot));
        let fresh = match self.floods.get_mut(slot) {
            Some(f) => {
                f.inflight -= 1;
                self.nodes[ix(to)].up() && f.mark(to)
            }
            None => false,
        };
        if fresh {
            if let Some(f) = self.floods.get(slot) {
                let msg = Arc::clone(&f.msg);
                let stamps = f.stamps.clone();
                self.trace = fold(self.trace, f.id);
                let from_id = self.nodes[ix(from)].id;
                self.feed_gossip(to, from_id, &msg);
                if let Some(r) = self.nodes[ix(to)].replica.as_ref() {
                    for (o, s) in stamps {
                        self.tracker.on_gossip(now, to, r, o, s);
                    }
                }
                let peers = self.overlay.peers(to).to_vec();
                for p in peers.into_iter().filter(|p| *p != from) {
                    self.forward(slot, to, p);
                }
            }
        } else if self.nodes[ix(to)].up() {
            self.traffic.gossip_dups += 1;
        }
        self.floods.release_if_done(slot);
    }

    pub(crate) fn on_sync(&mut self, to: u32, from: u32, msg: SyncMsg) {
        let now = self.queue.now();
        self.trace = fold(self.trace, 3 << 32 | u64::from(to) << 16 ^ u64::from(from));
        let from_id = self.nodes[ix(from)].id;
        if !self.nodes[ix(to)].up() {
            if let SyncMsg::Request(_) = msg {
                let gen = self.nodes[ix(from)].gen;
                let peer = self.nodes[ix(to)].id;
                self.queue.push(
                    now + SYNC_TIMEOUT_US,
                    Event::SyncFailed {
                        node: from,
                        gen,
                        peer,
                    },
                );
            }
            return;
        }
        match msg {
            SyncMsg::Request(request) => {
                self.feed(
                    to,
                    Input::SyncRequest {
                        from: from_id,
                        request,
                    },
                );
            }
            SyncMsg::Reply(reply) => {
                self.feed(
                    to,
                    Input::SyncReply {
                        from: from_id,
                        reply,
                    },
                );
                if let Some(r) = self.nodes[ix(to)].replica.as_ref() {
                    self.tracker.on_sync(now, to, r);
                }
            }
        }
    }
}

fn arrivals(fate: Fate) -> Vec<SimTime> {
    match fate {
        Fate::Lost => Vec::new(),
        Fate::Arrives(a) => vec![a],
        Fate::Twice(a, b) => vec![a, b],
    }
}
