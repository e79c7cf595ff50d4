//! The peer's [`Outputs`]: the replica's actions carried out over the libp2p swarm and the
//! executor. A view of the peer's own fields, borrowed for one drain.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use libp2p::gossipsub::{self, IdentTopic};
use libp2p::request_response::{OutboundRequestId, ResponseChannel};
use libp2p::{Multiaddr, PeerId, Swarm};
use omesh_protocol::{
    Epoch, GossipMessage, NodeId, Probe, SignedTaskSpec, SyncReply, SyncRequest, TaskId, Wire,
};
use tracing::{debug, warn};

use super::driver::Outputs;
use super::net::{self, Behaviour};
use crate::exec::Executor;

/// The parts of a [`super::Peer`] that carry out actions.
pub(super) struct PeerOutputs<'a> {
    pub(super) swarm: &'a mut Swarm<Behaviour>,
    pub(super) topic: &'a IdentTopic,
    pub(super) pending_replies: &'a mut HashMap<NodeId, VecDeque<ResponseChannel<Vec<u8>>>>,
    pub(super) outbound: &'a mut HashMap<OutboundRequestId, NodeId>,
    /// The open probe request the replica is handling, whose response carries the first
    /// probe it sends back to the requester.
    pub(super) probe_answer: &'a mut Option<(NodeId, ResponseChannel<Vec<u8>>)>,
    pub(super) blocked: &'a BTreeSet<PeerId>,
    /// See `Peer::addr_book`.
    pub(super) addr_book: &'a HashMap<PeerId, Vec<Multiaddr>>,
    pub(super) executor: &'a mut Executor,
    pub(super) node_id: NodeId,
}

impl PeerOutputs<'_> {
    /// The peer id of `node`, unless an operator blocked it.
    fn unblocked_peer(&self, node: &NodeId) -> Option<PeerId> {
        net::peer_id_of(node).filter(|p| !self.blocked.contains(p))
    }

    /// The addresses `peer`'s record carries, for a request that may have to dial it.
    fn addresses(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.addr_book.get(peer).cloned().unwrap_or_default()
    }
}

impl Outputs for PeerOutputs<'_> {
    fn publish(&mut self, msg: &GossipMessage) {
        let bytes = match msg.to_wire() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot encode gossip");
                return;
            }
        };
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), bytes)
        {
            Ok(_) | Err(gossipsub::PublishError::Duplicate) => {}
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                debug!("no peer subscribed yet; anti-entropy will carry it");
            }
            Err(e) => debug!(error = %e, "publish failed; anti-entropy will carry it"),
        }
    }

    fn send_sync(&mut self, to: NodeId, request: &SyncRequest) -> bool {
        let Some(peer) = self.unblocked_peer(&to) else {
            return false;
        };
        match request.to_wire() {
            Ok(bytes) => {
                let addrs = self.addresses(&peer);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .sync
                    .send_request_with_addresses(&peer, bytes, addrs);
                self.outbound.insert(id, to);
                true
            }
            Err(e) => {
                warn!(error = %e, "cannot encode sync request");
                false
            }
        }
    }

    fn reply_sync(&mut self, to: NodeId, reply: &SyncReply) {
        let Some(channel) = self
            .pending_replies
            .get_mut(&to)
            .and_then(VecDeque::pop_front)
        else {
            return;
        };
        match reply.to_wire() {
            Ok(bytes) => {
                if self
                    .swarm
                    .behaviour_mut()
                    .sync
                    .send_response(channel, bytes)
                    .is_err()
                {
                    debug!(peer = %to.short(), "sync requester went away");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode sync reply"),
        }
    }

    fn send_probe(&mut self, to: NodeId, probe: Probe) {
        let Some(peer) = self.unblocked_peer(&to) else {
            return;
        };
        match probe.to_wire() {
            Ok(bytes) => {
                let bytes = match self.probe_answer.take_if(|(from, _)| *from == to) {
                    Some((_, channel)) => {
                        match self
                            .swarm
                            .behaviour_mut()
                            .probe
                            .send_response(channel, bytes)
                        {
                            Ok(()) => return,
                            // The requester's stream closed: send it the usual way.
                            Err(bytes) => bytes,
                        }
                    }
                    None => bytes,
                };
                let frame = net::ProbeFrame {
                    bytes,
                    answer_inline: false,
                };
                let addrs = self.addresses(&peer);
                self.swarm
                    .behaviour_mut()
                    .probe
                    .send_request_with_addresses(&peer, frame, addrs);
            }
            Err(e) => warn!(error = %e, "cannot encode probe"),
        }
    }

    fn start_task(&mut self, task: TaskId, epoch: Epoch, spec: Arc<SignedTaskSpec>) {
        self.executor.start(task, epoch, spec, self.node_id);
    }

    fn adopt_task(&mut self, task: TaskId, from: Epoch, epoch: Epoch) -> bool {
        self.executor.adopt(task, from, epoch)
    }

    fn stop_task(&mut self, task: TaskId, epoch: Epoch) -> bool {
        if !self.executor.is_running(&task, epoch) {
            return false;
        }
        self.executor.stop(task, epoch);
        true
    }
}
