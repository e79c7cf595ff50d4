//! The control plane: one libp2p `NetworkBehaviour` composed of gossipsub (state deltas),
//! identify (listen addresses), ping (RTT) and three
//! request-response protocols: anti-entropy sync, task logs, and the SWIM-style liveness
//! probes (direct and indirect pings and their acks; see omesh-state's `probe` module), over
//! QUIC. Liveness does not ride on gossip; a node record is gossiped only when it changes.
//!
//! No kademlia: the replica's node records already carry every live peer's addresses (a
//! joiner has them all from its seed's first sync), and every request carries its target's
//! (`Peer::addr_book`), which is all request-response needs to dial a peer by id.
//! kad's bootstrap walks (automatic whenever its table held under 20 peers) connected every
//! joining peer to every other one: at 40 peers each held 39 connections while the mesh
//! formed, and the memory that took stayed with it after the idle ones closed.

use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, gossipsub, identify, ping, request_response, PeerId, StreamProtocol, Swarm,
};
use omesh_protocol::delta::{MAX_GOSSIP_BYTES, MAX_SYNC_REPLY_BYTES, MAX_SYNC_REQUEST_BYTES};
use omesh_protocol::NodeId;

/// Idle cost per connection. A peer stays connected to the neighbours it probes and its
/// gossipsub mesh (gossipsub's streams keep a connection open: rust-libp2p issue #5190), so
/// whatever a connection does while idle is paid a dozen times over. libp2p ping: RTT comes
/// from the replica's own probes (each direct ack is a round trip), so a ping is only a late
/// sample and a keep-alive.
pub const PING_EVERY: Duration = Duration::from_secs(60);
/// identify's periodic re-send: its answer (listen addresses, protocols) only changes when a
/// peer's listen addresses do, and a new connection identifies at once.
pub const IDENTIFY_EVERY: Duration = Duration::from_secs(10 * 60);
/// How long a connection no behaviour keeps alive stays open after its last use.
pub const IDLE_CONNECTION: Duration = Duration::from_secs(15);

/// Messages a gossipsub connection handler may queue. gossipsub allocates half of it up
/// front, per connection, as a bounded channel of ~250-byte slots: the default 5,000 cost
/// 0.6 MiB per connected peer. Publishes and control messages go to the other (unbounded)
/// half; a forward that finds the queue full is dropped, and anti-entropy brings it.
pub const GOSSIP_QUEUE_LEN: usize = 256;

/// The gossip topic for state deltas (node records when they change, leases, statuses).
pub const STATE_TOPIC: &str = "omesh/state/1";
/// The anti-entropy protocol.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/omesh/sync/1");
/// The task log protocol.
pub const LOGS_PROTOCOL: StreamProtocol = StreamProtocol::new("/omesh/logs/1");
/// SWIM-style liveness probes, version 2: the answer the replica gives the requester while
/// handling a request (a ping's `Ack`, a poll's `Vote`) rides back in that request's
/// response, so a direct probe costs one stream instead of two. An empty response means the
/// replica had nothing to say to the requester then (a helper's relayed ack comes later, as
/// a request of its own).
pub const PROBE_PROTOCOL: StreamProtocol = StreamProtocol::new("/omesh/probe/2");
/// Version 1, still spoken to and answered for peers that predate version 2 (a mesh mid
/// upgrade): every probe is a request answered with an empty frame, the replica's answer a
/// request of its own.
pub const PROBE_PROTOCOL_V1: StreamProtocol = StreamProtocol::new("/omesh/probe/1");
/// Sent in identify.
pub const AGENT: &str = concat!("omesh/", env!("CARGO_PKG_VERSION"));

/// Gossip frames up to this size reach our decoder, so that oversized messages are counted
/// as malformed rather than vanishing inside gossipsub.
pub const GOSSIP_TRANSMIT_LIMIT: usize = 2 * MAX_GOSSIP_BYTES;

/// gossipsub peer scoring with one term only: invalid messages (P4). A message the replica
/// finds forged is reported `Reject`, and each one costs its sender 100 points, squared with
/// the count and decaying by 1% a second: one forgery takes a peer past the graylist
/// threshold (-80), where gossipsub ignores everything it sends, for about 10 s; ten, for
/// about four minutes. Every other term is off: on a quiet edge mesh honest peers deliver
/// few messages (P3 would punish them), share a NAT address (IP colocation), or are slow on
/// a bad link (slow-peer and behaviour penalties).
pub fn score_params() -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let topic = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.0,
        first_message_deliveries_weight: 0.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -100.0,
        invalid_message_deliveries_decay: 0.99,
        ..gossipsub::TopicScoreParams::default()
    };
    let params = gossipsub::PeerScoreParams {
        topics: [(gossipsub::IdentTopic::new(STATE_TOPIC).hash(), topic)]
            .into_iter()
            .collect(),
        ip_colocation_factor_weight: 0.0,
        behaviour_penalty_weight: 0.0,
        slow_peer_weight: 0.0,
        ..gossipsub::PeerScoreParams::default()
    };
    (params, gossipsub::PeerScoreThresholds::default())
}

/// The composed behaviour.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// The peers allowed to connect, enforced when a connection is established (before any
    /// other behaviour sees it). Off in an open mesh without `allowed_peers`.
    pub allow: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    /// State deltas.
    pub gossipsub: gossipsub::Behaviour,
    /// Listen addresses and keys of peers.
    pub identify: identify::Behaviour,
    /// RTT.
    pub ping: ping::Behaviour,
    /// Anti-entropy.
    pub sync: request_response::Behaviour<BytesCodec>,
    /// Task logs, fetched from the owner.
    pub logs: request_response::Behaviour<BytesCodec>,
    /// Liveness probes.
    pub probe: request_response::Behaviour<ProbeCodec>,
}

/// Request-response frames as raw bytes with a u32 length prefix; decoding (and counting
/// what is malformed) happens in the driver, where the replica's counters live.
#[derive(Debug, Clone, Copy, Default)]
pub struct BytesCodec;

async fn read_frame<T: futures::AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: usize,
) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes over the limit of {limit}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: futures::AsyncWrite + Unpin + Send>(
    io: &mut T,
    bytes: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

#[async_trait::async_trait]
impl request_response::Codec for BytesCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        // Twice the decode limit: a larger frame is cut off here, a smaller oversized one
        // reaches the decoder and is counted.
        read_frame(io, 2 * MAX_SYNC_REQUEST_BYTES).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io, MAX_SYNC_REPLY_BYTES + 1024).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res).await
    }
}

/// A probe request as read off the wire, with whether the requester reads the answer from
/// the response (it negotiated [`PROBE_PROTOCOL`], not [`PROBE_PROTOCOL_V1`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFrame {
    /// The encoded `Probe`.
    pub bytes: Vec<u8>,
    /// The requester reads the replica's answer from this request's response. Set when a
    /// request is read (from the protocol negotiated); ignored when one is written.
    pub answer_inline: bool,
}

/// Probe frames: a few dozen bytes each way, so anything over twice the decode limit is cut
/// off before it is buffered (a larger one that fits reaches the decoder and is counted).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProbeCodec;

const PROBE_FRAME_LIMIT: usize = 2 * omesh_protocol::delta::MAX_PROBE_BYTES;

#[async_trait::async_trait]
impl request_response::Codec for ProbeCodec {
    type Protocol = StreamProtocol;
    type Request = ProbeFrame;
    type Response = Vec<u8>;

    async fn read_request<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<ProbeFrame>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let bytes = read_frame(io, PROBE_FRAME_LIMIT).await?;
        Ok(ProbeFrame {
            bytes,
            answer_inline: *protocol == PROBE_PROTOCOL,
        })
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io, PROBE_FRAME_LIMIT).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: ProbeFrame,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req.bytes).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res).await
    }
}

/// Why the swarm could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the network stack: {0}")]
pub struct BuildError(pub String);

/// Builds the swarm for `key`. `gossip_limit` is the largest gossip frame accepted
/// (tests raise it to send oversized frames). `restrict`: connections only from peers on the
/// allow list (`Behaviour::allow`), which starts empty.
pub fn build_swarm(
    key: Keypair,
    gossip_limit: usize,
    restrict: bool,
) -> Result<Swarm<Behaviour>, BuildError> {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        // QUIC keeps its defaults (keep-alive 5 s, idle timeout 10 s): the idle timeout is how
        // soon a connection to a peer killed outright is dropped, so that a probe dials it
        // afresh; a longer one would hold its restart back from some peers.
        .with_quic()
        .with_behaviour(|key| {
            let gossip_config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_secs(1))
                // IHAVE gossip each heartbeat to `gossip_lazy` peers outside the mesh, not to
                // a quarter of them: a fixed number of peers whatever the mesh size.
                .gossip_factor(0.0)
                .connection_handler_queue_len(GOSSIP_QUEUE_LEN)
                // Every copy gossipsub adds is paid once per change per node: a smaller mesh
                // (4, not 6) and publishing to the mesh only (not flooding every peer) cut
                // the duplicate deliveries.
                .mesh_n(4)
                .mesh_n_low(3)
                .mesh_n_high(8)
                .mesh_outbound_min(1)
                .gossip_lazy(3)
                .flood_publish(false)
                .validation_mode(gossipsub::ValidationMode::Strict)
                .validate_messages()
                .max_transmit_size(gossip_limit)
                .message_id_fn(|m: &gossipsub::Message| {
                    gossipsub::MessageId::from(omesh_protocol::Digest::of(&m.data).0.to_vec())
                })
                .build()
                .map_err(|e| format!("gossipsub config: {e}"))?;
            let mut gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )
            .map_err(|e| format!("gossipsub: {e}"))?;
            let (params, thresholds) = score_params();
            gossipsub
                .with_peer_score(params, thresholds)
                .map_err(|e| format!("gossipsub peer score: {e}"))?;
            let identify = identify::Behaviour::new(
                identify::Config::new("/omesh/1".into(), key.public())
                    .with_agent_version(AGENT.into())
                    .with_interval(IDENTIFY_EVERY),
            );
            let ping = ping::Behaviour::new(ping::Config::new().with_interval(PING_EVERY));
            let sync = request_response::Behaviour::new(
                [(SYNC_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
            );
            let logs = request_response::Behaviour::new(
                [(LOGS_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
            );
            // A probe unanswered within a period is a missed answer, nothing to retry.
            let probe = request_response::Behaviour::with_codec(
                ProbeCodec,
                [
                    (PROBE_PROTOCOL, request_response::ProtocolSupport::Full),
                    (PROBE_PROTOCOL_V1, request_response::ProtocolSupport::Full),
                ],
                request_response::Config::default().with_request_timeout(Duration::from_secs(5)),
            );
            Ok(Behaviour {
                allow: Toggle::from(restrict.then(allow_block_list::Behaviour::default)),
                gossipsub,
                identify,
                ping,
                sync,
                logs,
                probe,
            })
        })
        .map_err(|e| BuildError(e.to_string()))?
        // A connection nothing used for this long closes. A node probes and syncs with its
        // few neighbours every couple of seconds (`omesh_state::NEIGHBOURS`), and gossipsub
        // keeps its mesh's connections alive itself, so what closes is the rest: the seed
        // everyone dialed at start, a helper asked once. Idle cost then stays flat in the
        // mesh size instead of a connection (and its keep-alives) per peer.
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION))
        .build();
    Ok(swarm)
}

/// The protobuf encoding libp2p gives an ed25519 public key (`KeyType::Ed25519` = 1, then the
/// 32 key bytes), which an ed25519 peer id inlines as an identity multihash.
const ED25519_PROTOBUF_PREFIX: [u8; 4] = [0x08, 0x01, 0x12, 0x20];

/// The node id (ed25519 public key) a peer id stands for, when it inlines an ed25519 key.
///
/// Read from the peer id's bytes, without decompressing the curve point: the peer keeps
/// these ids for the connections, records and certificates it handles, some of them every
/// second, and a decompression (~20 µs) per node per second is a cost that grows with the
/// mesh. A peer id whose key is not a valid point names no peer that can connect (the TLS
/// handshake checks the key), so nothing is let through that could not be before.
pub fn node_id_of(peer: &PeerId) -> Option<NodeId> {
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    let digest = mh.digest();
    if let Some(key) = digest.strip_prefix(&ED25519_PROTOBUF_PREFIX) {
        return key.try_into().ok().map(NodeId);
    }
    // Another (non-canonical) encoding of a key: decode it in full.
    let key = libp2p::identity::PublicKey::try_decode_protobuf(digest).ok()?;
    let ed = key.try_into_ed25519().ok()?;
    Some(NodeId(ed.to_bytes()))
}

/// The peer id of a node id: the identity multihash of its key's protobuf encoding, built
/// without decompressing the point (see [`node_id_of`]).
pub fn peer_id_of(node: &NodeId) -> Option<PeerId> {
    let mut encoded = [0u8; 36];
    encoded[..4].copy_from_slice(&ED25519_PROTOBUF_PREFIX);
    encoded[4..].copy_from_slice(&node.0);
    let mh = libp2p::multihash::Multihash::<64>::wrap(0, &encoded).ok()?;
    PeerId::from_multihash(mh).ok()
}

/// The node id of a keypair.
/// The replica's signing key for this identity (the same ed25519 key).
pub fn node_key_of(key: &Keypair) -> Option<omesh_state::NodeKey> {
    let ed = key.clone().try_into_ed25519().ok()?;
    let secret: [u8; 32] = ed.secret().as_ref().try_into().ok()?;
    Some(omesh_state::NodeKey::from_bytes(&secret))
}

pub fn node_id_of_key(key: &Keypair) -> Option<NodeId> {
    node_id_of(&key.public().to_peer_id())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn node_and_peer_ids_map_both_ways() {
        for _ in 0..32 {
            let key = Keypair::generate_ed25519();
            let peer = key.public().to_peer_id();
            let node = node_id_of(&peer).unwrap();
            assert_eq!(peer_id_of(&node), Some(peer));
            // The same as libp2p's own decoding and encoding.
            let ed = key.public().try_into_ed25519().unwrap();
            assert_eq!(node.0, ed.to_bytes());
            let from_key = libp2p::identity::PublicKey::from(
                libp2p::identity::ed25519::PublicKey::try_from_bytes(&node.0).unwrap(),
            )
            .to_peer_id();
            assert_eq!(peer_id_of(&node), Some(from_key));
        }
        // A peer id that is not an inlined ed25519 key names no node.
        assert_eq!(node_id_of(&PeerId::random()), None);
    }

    #[tokio::test]
    async fn gossip_scoring_is_on_and_only_invalid_messages_cost() {
        let (params, thresholds) = score_params();
        params.validate().unwrap();
        let topic = &params.topics[&gossipsub::IdentTopic::new(STATE_TOPIC).hash()];
        // One forgery is enough to be graylisted.
        assert!(
            topic.topic_weight * topic.invalid_message_deliveries_weight
                < thresholds.graylist_threshold
        );
        assert_eq!(topic.mesh_message_deliveries_weight, 0.0);
        assert_eq!(params.ip_colocation_factor_weight, 0.0);
        let swarm = build_swarm(Keypair::generate_ed25519(), GOSSIP_TRANSMIT_LIMIT, false).unwrap();
        let stranger = Keypair::generate_ed25519().public().to_peer_id();
        assert!(swarm.behaviour().gossipsub.peer_score(&stranger).is_some());
    }
}
