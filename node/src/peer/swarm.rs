//! Swarm events into the replica: gossip, sync requests and replies, probes, identify, ping,
//! listen addresses and connections.

use std::time::{Duration, Instant};

use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::request_response::{self, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{allow_block_list, identify, ping, PeerId};
use omesh_protocol::{GossipMessage, NodeId, Probe, SyncReply, SyncRequest, Wire};
use omesh_state::{Input, InputError};
use tracing::{debug, info, warn};

use super::dial::{is_dialable, strip_p2p};
use super::net::{self, BehaviourEvent};
use super::Peer;

impl Peer {
    pub(super) fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => self.on_gossip(propagation_source, &message_id, &message),
            SwarmEvent::Behaviour(BehaviourEvent::Sync(ev)) => {
                self.used(&ev);
                self.on_sync_event(ev);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Logs(ev)) => {
                self.used(&ev);
                self.on_logs_event(ev);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Probe(ev)) => {
                self.used(&ev);
                self.on_probe_event(ev);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for addr in info.listen_addrs {
                    if is_dialable(&addr) {
                        self.swarm.add_peer_address(peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                if let Some(node) = net::node_id_of(&peer) {
                    let rtt_us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
                    self.feed(Input::Rtt { peer: node, rtt_us });
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                    self.advertise_addrs();
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                info!(%address, "no longer listening");
                self.listen_addrs.retain(|a| a != &address);
                self.advertise_addrs();
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                num_established,
                ..
            } => {
                self.last_used.insert(peer_id, Instant::now());
                let conns = self.connections.entry(peer_id).or_default();
                let older: Vec<_> = std::mem::take(conns);
                conns.push(connection_id);
                if num_established.get() > 1 {
                    // A peer that restarts reconnects while our old connection to it still
                    // looks open. gossipsub only announces our subscriptions on a peer's first
                    // connection, so the restarted peer would never learn we listen: close the
                    // old connections and announce the topic again.
                    for old in older {
                        self.swarm.close_connection(old);
                    }
                    let gs = &mut self.swarm.behaviour_mut().gossipsub;
                    gs.unsubscribe(&self.topic);
                    if let Err(e) = gs.subscribe(&self.topic) {
                        warn!(error = %e, "cannot resubscribe");
                    }
                }
                // libp2p's allow list refuses unadmitted peers before this; what is left are
                // peers blocked through the API after they connected.
                if !self.permits(&peer_id) {
                    let _ = self.swarm.close_connection(connection_id);
                    return;
                }
                let remote = endpoint.get_remote_address().clone();
                for seed in &mut self.seeds {
                    if strip_p2p(&seed.addr) == strip_p2p(&remote) {
                        seed.connected = true;
                        seed.reached = true;
                        seed.peer = Some(peer_id);
                        seed.backoff = Duration::from_millis(500);
                    }
                }
                self.swarm.add_peer_address(peer_id, strip_p2p(&remote));
                debug!(%peer_id, %remote, "connected");
                if num_established.get() == 1 {
                    if let Some(node) = net::node_id_of(&peer_id) {
                        self.feed(Input::Connected(node));
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                connection_id,
                ..
            } => {
                if let Some(conns) = self.connections.get_mut(&peer_id) {
                    conns.retain(|c| *c != connection_id);
                }
                if num_established == 0 {
                    self.connections.remove(&peer_id);
                    self.last_used.remove(&peer_id);
                    for seed in &mut self.seeds {
                        if seed.peer == Some(peer_id) {
                            seed.connected = false;
                            // It may have restarted and forgotten us: show the certificate again.
                            seed.contacted = false;
                        }
                    }
                    debug!(%peer_id, "disconnected");
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(?peer_id, %error, "dial failed");
            }
            SwarmEvent::IncomingConnectionError {
                error: libp2p::swarm::ListenError::Denied { cause },
                send_back_addr,
                peer_id,
                ..
            } => {
                if let Some(denied) = cause.downcast_ref::<allow_block_list::NotAllowed>() {
                    let reason = if self.gate.is_open() {
                        "not_allowed_peer"
                    } else {
                        "not_admitted"
                    };
                    if self.count_refused(reason, peer_id) {
                        warn!(peer = ?peer_id, remote = %send_back_addr, %reason, "refused a connection: {denied}");
                    } else {
                        debug!(peer = ?peer_id, %reason, "refused a connection");
                    }
                }
            }
            _ => {}
        }
    }

    fn on_gossip(
        &mut self,
        source: PeerId,
        id: &gossipsub::MessageId,
        message: &gossipsub::Message,
    ) {
        // The relay must be admitted; the publisher allowed and not blocked (an admitted
        // publisher this node has not met yet is checked by the replica, delta by delta).
        if !self.permits(&source) || message.source.is_some_and(|s| !self.may_originate(&s)) {
            self.swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(id, &source, MessageAcceptance::Ignore);
            return;
        }
        let acceptance = match GossipMessage::from_wire(&message.data) {
            Err(e) => {
                self.count_malformed("gossip");
                debug!(%source, error = %e, "malformed gossip dropped");
                MessageAcceptance::Reject
            }
            Ok(msg) => {
                // Strict validation means gossipsub checked the signer's signature; a node
                // only ever publishes its own deltas, so any other origin is a forgery.
                let Some(from) = message.source.as_ref().and_then(net::node_id_of) else {
                    return;
                };
                // The relay, not the publisher: a gap this delivery shows is closed by
                // syncing with a peer that is connected now (the publisher may be gone).
                let Some(via) = net::node_id_of(&source) else {
                    return;
                };
                if msg.deltas.iter().any(|d| d.origin != from) {
                    self.count_malformed("gossip_forged_origin");
                    warn!(%source, "gossip carrying another node's deltas dropped");
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(id, &source, MessageAcceptance::Reject);
                    return;
                }
                let result = self.driver.feed(Input::Gossip { via, msg });
                self.drain();
                match result {
                    Ok(()) => MessageAcceptance::Accept,
                    Err(InputError::Rejected { forged, first, .. }) if forged > 0 => {
                        // Its publisher signed it (strict validation), and no honest node
                        // writes this: score it down and cut it off.
                        if let Some(publisher) = message.source {
                            self.cut_off_forger(publisher, "gossip", &first.to_string());
                        }
                        MessageAcceptance::Reject
                    }
                    Err(InputError::Rejected { applied, first, .. }) => {
                        // Writes that overtook what they build on: dropped for now, brought
                        // again by a sync. Not the sender's fault, so not scored down.
                        debug!(%source, error = %first, "gossip deltas dropped for now");
                        if applied > 0 {
                            MessageAcceptance::Accept
                        } else {
                            MessageAcceptance::Ignore
                        }
                    }
                    Err(_) => MessageAcceptance::Reject,
                }
            }
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(id, &source, acceptance);
    }

    /// Notes that a request or answer went to or came from a peer (see `trim_connections`).
    fn used<Req>(&mut self, event: &request_response::Event<Req, Vec<u8>>) {
        if let request_response::Event::Message { peer, .. } = event {
            if let Some(t) = self.last_used.get_mut(peer) {
                *t = Instant::now();
            }
        }
    }

    fn on_sync_event(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let Some(from) = self.unblocked_node(&peer) else {
                        return;
                    };
                    match SyncRequest::from_wire(&request) {
                        Ok(request) => {
                            self.note_digest(from, request.digest);
                            self.pending_replies
                                .entry(from)
                                .or_default()
                                .push_back(channel);
                            self.feed(Input::SyncRequest { from, request });
                        }
                        Err(e) => {
                            self.count_malformed("sync_request");
                            debug!(%peer, error = %e, "malformed sync request dropped");
                        }
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    let to = self.outbound.remove(&request_id);
                    let from = to.or_else(|| net::node_id_of(&peer));
                    let Some(from) = from else {
                        return;
                    };
                    if !net::peer_id_of(&from).is_some_and(|p| self.permits(&p)) {
                        return;
                    }
                    match SyncReply::from_wire(&response) {
                        Ok(mut reply) => {
                            self.drop_unallowed_origins(&mut reply);
                            let theirs = reply.digest;
                            let result = self.driver.feed(Input::SyncReply { from, reply });
                            self.drain();
                            // After the merge: equal now means nothing was missing either way.
                            self.note_digest(from, theirs);
                            if let Err(InputError::Rejected { forged, first, .. }) = &result {
                                if *forged > 0 {
                                    self.cut_off_forger(peer, "sync reply", &first.to_string());
                                } else {
                                    debug!(%peer, error = %first, "sync reply deltas dropped for now");
                                }
                            }
                        }
                        Err(e) => {
                            self.count_malformed("sync_reply");
                            debug!(%peer, error = %e, "malformed sync reply dropped");
                            self.feed(Input::SyncFailed { peer: from });
                        }
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            } => {
                debug!(%peer, %error, "sync request failed");
                if let Some(to) = self.outbound.remove(&request_id) {
                    self.feed(Input::SyncFailed { peer: to });
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                if matches!(error, request_response::InboundFailure::Io(_)) {
                    self.count_malformed("sync_request");
                }
                debug!(%peer, %error, "inbound sync failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_probe_event(&mut self, event: request_response::Event<net::ProbeFrame, Vec<u8>>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let probe = self
                    .unblocked_node(&peer)
                    .map(|from| (from, Probe::from_wire(&request.bytes)));
                match probe {
                    Some((from, Ok(probe))) => {
                        // Whatever the replica says to `from` while handling this (an ack, a
                        // vote) rides back in the response (`send_probe`); a version 1
                        // requester gets the empty frame that only closes the stream, and
                        // the answer as a request of its own.
                        if request.answer_inline {
                            self.probe_answer = Some((from, channel));
                        } else {
                            self.answer_probe(channel, Vec::new());
                        }
                        self.feed(Input::Probe { from, probe });
                        if let Some((_, channel)) = self.probe_answer.take() {
                            self.answer_probe(channel, Vec::new());
                        }
                    }
                    Some((_, Err(e))) => {
                        self.answer_probe(channel, Vec::new());
                        self.count_malformed("probe");
                        debug!(%peer, error = %e, "malformed probe dropped");
                    }
                    None => self.answer_probe(channel, Vec::new()),
                }
            }
            request_response::Event::Message {
                peer,
                message: request_response::Message::Response { response, .. },
                ..
            } => {
                // Empty: the peer had nothing to say then (or speaks version 1).
                if response.is_empty() {
                    return;
                }
                let Some(from) = self.unblocked_node(&peer) else {
                    return;
                };
                match Probe::from_wire(&response) {
                    Ok(probe) => self.feed(Input::Probe { from, probe }),
                    Err(e) => {
                        self.count_malformed("probe");
                        debug!(%peer, error = %e, "malformed probe answer dropped");
                    }
                }
            }
            request_response::Event::OutboundFailure { peer, error, .. } => {
                // Unreachable or slow: the replica sees a missing ack, which is the point.
                debug!(%peer, %error, "probe not delivered");
            }
            request_response::Event::InboundFailure { .. }
            | request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// Answers a probe request (the requester went away if this fails: nothing to do).
    fn answer_probe(&mut self, channel: ResponseChannel<Vec<u8>>, bytes: Vec<u8>) {
        let _ = self
            .swarm
            .behaviour_mut()
            .probe
            .send_response(channel, bytes);
    }

    /// A peer sent what no honest node sends (see `DeltaError::is_forgery`): disconnect it
    /// and say so, at most once a minute per peer (each rejection is counted by reason in
    /// `omesh_deltas_rejected_total` either way).
    pub(super) fn cut_off_forger(&mut self, peer: PeerId, channel: &str, first: &str) {
        if super::admit::warn_due(&mut self.forgers_warned, peer) {
            warn!(%peer, channel, error = first, "peer sent forged or badly signed state; disconnecting it");
        }
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    /// The node id of `peer`, if it may be heard (admitted, allowed, not blocked).
    fn unblocked_node(&self, peer: &PeerId) -> Option<NodeId> {
        net::node_id_of(peer).filter(|_| self.permits(peer))
    }

    /// Whether what `peer` wrote may be taken in: not blocked, and in `allowed_peers` if set.
    fn may_originate(&self, peer: &PeerId) -> bool {
        !self.blocked.contains(peer)
            && (self.plan.allowed_peers.is_empty() || self.plan.allowed_peers.contains(peer))
    }

    /// With a static `allowed_peers`, a sync reply carries only what allowed nodes wrote.
    /// Notes whether `from`'s state digest, as it just told us, equals ours.
    fn note_digest(&mut self, from: NodeId, theirs: omesh_protocol::StateDigest) {
        let agrees = self.driver.replica().digest() == theirs;
        let now = self.driver.now();
        self.digest_agreement.insert(from, (agrees, now));
    }

    fn drop_unallowed_origins(&self, reply: &mut SyncReply) {
        if self.plan.allowed_peers.is_empty() {
            return;
        }
        let allowed = |n: &NodeId| {
            n == &self.node_id
                || net::peer_id_of(n).is_some_and(|p| self.plan.allowed_peers.contains(&p))
        };
        reply.deltas.retain(|d| allowed(&d.origin));
        reply.vclock.retain(|(n, _)| allowed(n));
    }
}
