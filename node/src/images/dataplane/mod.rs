//! The data plane: a quinn endpoint of its own that serves blobs by digest, chunk by chunk.
//!
//! TLS is libp2p's (libp2p-tls): the certificate is signed by the node's identity key, so the
//! peer at the other end of a connection is the peer id the mesh knows. The server serves
//! only peers that are nodes of its replica state and admitted (see [`Allowed`]); anyone else
//! may only make a first contact (see [`contact`]), and its connection is closed at its first
//! other request. One request per
//! bidirectional stream: the client writes a [`BlobRequest`] and finishes, the server answers
//! one [`BlobResponse`] and finishes. Streams are cheap, so a fetcher keeps several in flight.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use omesh_protocol::blob::{BlobRequest, BlobResponse, MAX_CHUNK_BYTES};
use omesh_protocol::Wire;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint};
use tracing::{debug, info, warn};

use crate::images::blobs::BlobStore;

pub mod contact;
mod frame;
mod pace;

use crate::metrics::BlobMetrics;
pub use pace::Pacer;

/// The TLS server name (libp2p's certificates do not carry one; the peer id is checked).
pub const SERVER_NAME: &str = "l";
/// How a node's blob endpoint appears in its advertised address list:
/// `/ip4/<ip>/udp/<port>/quic-v1/omesh-blob`. libp2p cannot parse it, so it never dials it.
pub const BLOB_ADDR_SUFFIX: &str = "/omesh-blob";

/// Connection error code: the peer is not a node of this mesh.
const CLOSE_NOT_MEMBER: u32 = 1;
/// Connection error code: test-only cut after `debug_drop_after_bytes`.
const CLOSE_DEBUG_DROP: u32 = 2;

/// Why the data plane could not do something.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    /// TLS set-up from the identity key failed.
    #[error("data plane TLS: {0}")]
    Tls(String),
    /// The endpoint cannot be bound.
    #[error("cannot listen for blobs on {addr} (config key `blob_listen`): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A connection could not be made or broke.
    #[error("{0}")]
    Connection(String),
    /// The other side answered something that does not decode.
    #[error("malformed blob response: {0}")]
    Malformed(String),
}

/// The peer ids allowed to fetch from this node (the nodes of its replica state).
#[derive(Debug, Clone, Default)]
pub struct Allowed(Arc<RwLock<HashSet<PeerId>>>);

impl Allowed {
    /// Replaces the set.
    pub fn set(&self, peers: HashSet<PeerId>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = peers;
    }

    /// Whether `peer` may fetch.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(peer)
    }
}

/// Test-only faults of the server.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Flip a byte of every chunk served.
    pub corrupt: bool,
    /// Close each connection once the peer acknowledged this many chunk bytes on it.
    pub drop_after_bytes: Option<u64>,
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        15_000,
    ))));
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_concurrent_uni_streams(0u32.into());
    t.max_concurrent_bidi_streams(256u32.into());
    // A few chunks in flight per stream and many streams per connection.
    t.stream_receive_window(quinn::VarInt::from_u32(4 * MAX_CHUNK_BYTES));
    t.receive_window(quinn::VarInt::from_u32(64 * MAX_CHUNK_BYTES));
    t.send_window(64 * u64::from(MAX_CHUNK_BYTES));
    Arc::new(t)
}

/// The server side of TLS for `key`.
pub fn server_config(key: &Keypair) -> Result<quinn::ServerConfig, DataPlaneError> {
    let tls =
        libp2p_tls::make_server_config(key).map_err(|e| DataPlaneError::Tls(e.to_string()))?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| DataPlaneError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// The client side of TLS for `key`, accepting only the server `remote`.
pub fn client_config(key: &Keypair, remote: PeerId) -> Result<quinn::ClientConfig, DataPlaneError> {
    let tls = libp2p_tls::make_client_config(key, Some(remote))
        .map_err(|e| DataPlaneError::Tls(e.to_string()))?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| DataPlaneError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// An endpoint on `addr` that serves (once [`serve`] runs) and dials.
pub fn endpoint(key: &Keypair, addr: SocketAddr) -> Result<Endpoint, DataPlaneError> {
    Endpoint::server(server_config(key)?, addr)
        .map_err(|source| DataPlaneError::Bind { addr, source })
}

/// The peer id proven by the TLS handshake of `conn`.
pub fn peer_of(conn: &Connection) -> Option<PeerId> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<quinn::rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let cert = libp2p_tls::certificate::parse(certs.first()?).ok()?;
    Some(cert.peer_id())
}

/// Connects to the blob endpoint of `peer` at `addr`; the handshake fails unless the server
/// proves it is `peer`.
pub async fn connect(
    endpoint: &Endpoint,
    key: &Keypair,
    peer: PeerId,
    addr: SocketAddr,
) -> Result<Connection, DataPlaneError> {
    let cfg = client_config(key, peer)?;
    let connecting = endpoint
        .connect_with(cfg, addr, SERVER_NAME)
        .map_err(|e| DataPlaneError::Connection(format!("connect to {peer} at {addr}: {e}")))?;
    match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(DataPlaneError::Connection(format!(
            "connect to {peer} at {addr}: {e}"
        ))),
        Err(_) => Err(DataPlaneError::Connection(format!(
            "connect to {peer} at {addr}: timed out"
        ))),
    }
}

/// Sends one request on a new stream of `conn` and reads the answer.
pub async fn request(conn: &Connection, req: &BlobRequest) -> Result<BlobResponse, DataPlaneError> {
    let lost = |e: &dyn std::fmt::Display| DataPlaneError::Connection(e.to_string());
    let bytes = req
        .to_wire()
        .map_err(|e| DataPlaneError::Malformed(e.to_string()))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    send.write_all(&bytes).await.map_err(|e| lost(&e))?;
    send.finish().map_err(|e| lost(&e))?;
    let read = async {
        let mut answer = frame::Assembler::default();
        while let Some(piece) = recv
            .read_chunk(usize::MAX, true)
            .await
            .map_err(|e| lost(&e))?
        {
            answer.push(&piece.bytes)?;
        }
        answer.finish()
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .map_err(|_| DataPlaneError::Connection("no answer within 30 s".into()))?
}

/// Serves blobs of `store` to allowed peers, and first contacts (handed to `contacts`) to
/// anyone, until the endpoint closes.
pub async fn serve(
    endpoint: Endpoint,
    store: BlobStore,
    allowed: Allowed,
    faults: Faults,
    metrics: BlobMetrics,
    pacer: Option<Arc<Pacer>>,
    contacts: Option<contact::Requests>,
) {
    if faults.corrupt || faults.drop_after_bytes.is_some() {
        warn!(?faults, "test-only blob faults are on");
    }
    while let Some(incoming) = endpoint.accept().await {
        let store = store.clone();
        let allowed = allowed.clone();
        let metrics = metrics.clone();
        let pacer = pacer.clone();
        let contacts = contacts.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "blob handshake failed");
                    return;
                }
            };
            let Some(peer) = peer_of(&conn) else {
                metrics.refused.inc();
                conn.close(CLOSE_NOT_MEMBER.into(), b"no peer id");
                return;
            };
            let ctx = Serving {
                store,
                allowed,
                faults,
                metrics,
                pacer,
                contacts,
            };
            serve_connection(conn, peer, ctx).await;
        });
    }
}

/// What a server connection needs.
#[derive(Clone)]
struct Serving {
    store: BlobStore,
    allowed: Allowed,
    faults: Faults,
    metrics: BlobMetrics,
    pacer: Option<Arc<Pacer>>,
    contacts: Option<contact::Requests>,
}

async fn serve_connection(conn: Connection, peer: PeerId, ctx: Serving) {
    let carried = Arc::new(AtomicU64::new(0));
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(%peer, error = %e, "blob connection ended");
                return;
            }
        };
        let (ctx, carried, conn) = (ctx.clone(), Arc::clone(&carried), conn.clone());
        tokio::spawn(async move {
            let limit = BlobRequest::MAX_BYTES
                .max(contact::CONTACT_MAGIC.len() + contact::MAX_CONTACT_BYTES);
            let Ok(bytes) = recv.read_to_end(limit).await else {
                ctx.metrics.malformed_requests.inc();
                return;
            };
            if bytes.starts_with(contact::CONTACT_MAGIC) {
                let answer = contact::answer(peer, &bytes, ctx.contacts.as_ref()).await;
                if send.write_all(&answer).await.is_ok() {
                    let _ = send.finish();
                }
                return;
            }
            // Checked per request: a peer admitted by a first contact on this very connection
            // is served once the peer loop lists it.
            if !ctx.allowed.contains(&peer) {
                ctx.metrics.refused.inc();
                info!(remote = %conn.remote_address(), %peer, "refused a blob request: not an admitted node of this mesh");
                conn.close(CLOSE_NOT_MEMBER.into(), b"not a node of this mesh");
                return;
            }
            let served = serve_stream(
                send,
                &bytes,
                &ctx.store,
                ctx.faults,
                &ctx.metrics,
                ctx.pacer.as_deref(),
            )
            .await;
            let total = carried.fetch_add(served, Ordering::Relaxed) + served;
            if ctx.faults.drop_after_bytes.is_some_and(|n| total >= n) {
                info!(%peer, carried = total, "test fault: cutting the blob connection");
                conn.close(CLOSE_DEBUG_DROP.into(), b"debug_drop_after_bytes");
            }
        });
    }
}

/// Answers one request (`bytes`, the whole stream); returns the chunk bytes sent.
async fn serve_stream(
    mut send: quinn::SendStream,
    bytes: &[u8],
    store: &BlobStore,
    faults: Faults,
    metrics: &BlobMetrics,
    pacer: Option<&Pacer>,
) -> u64 {
    let response = match BlobRequest::from_wire(bytes) {
        Err(e) => {
            metrics.malformed_requests.inc();
            BlobResponse::Refused(format!("malformed request: {e}"))
        }
        Ok(req) if req.len > MAX_CHUNK_BYTES => BlobResponse::Refused(format!(
            "{} bytes asked, at most {MAX_CHUNK_BYTES} per request",
            req.len
        )),
        Ok(req) => {
            let store = store.clone();
            let read = tokio::task::spawn_blocking(move || {
                store
                    .read_range(&req.digest, req.offset, req.len, frame::HEADROOM)
                    .map(|r| (req.offset, r))
            });
            match read.await {
                Ok(Ok((offset, Some((mut buf, total))))) => {
                    if faults.corrupt {
                        if let Some(b) = buf.get_mut(frame::HEADROOM) {
                            *b ^= 0xff;
                        }
                    }
                    let served = buf.len().saturating_sub(frame::HEADROOM) as u64;
                    if let Some(p) = pacer {
                        p.take(served).await;
                    }
                    // The data goes out in the buffer it was read into.
                    let wire = frame::chunk_frame(buf, offset, total);
                    if send.write_chunk(wire).await.is_err() || send.finish().is_err() {
                        return 0;
                    }
                    metrics.bytes_served.inc_by(served);
                    if faults.drop_after_bytes.is_some() {
                        // The cut is to come after this many bytes *arrived*; count a chunk
                        // once the peer acknowledged all of it.
                        if !matches!(send.stopped().await, Ok(None)) {
                            return 0;
                        }
                    }
                    return served;
                }
                Ok(Ok((_, None))) => BlobResponse::NotFound,
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot read a blob to serve");
                    BlobResponse::Refused("cannot read the blob".into())
                }
                Err(e) => BlobResponse::Refused(format!("read task failed: {e}")),
            }
        }
    };
    if let Ok(wire) = response.to_wire() {
        if send.write_all(&wire).await.is_ok() {
            let _ = send.finish();
        }
    }
    0
}

/// The advertised form of a blob endpoint address.
pub fn blob_addr_string(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) => Protocol::Ip4(ip),
        IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    let m = Multiaddr::empty()
        .with(ip)
        .with(Protocol::Udp(addr.port()))
        .with(Protocol::QuicV1);
    format!("{m}{BLOB_ADDR_SUFFIX}")
}

/// Parses an advertised blob endpoint address (see [`blob_addr_string`]).
pub fn parse_blob_addr(s: &str) -> Option<SocketAddr> {
    let m: Multiaddr = s.strip_suffix(BLOB_ADDR_SUFFIX)?.parse().ok()?;
    let mut ip = None;
    let mut port = None;
    for p in m.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(IpAddr::V6(a)),
            Protocol::Udp(p) => port = Some(p),
            _ => {}
        }
    }
    Some(SocketAddr::new(ip?, port?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn blob_addresses_round_trip_and_libp2p_ignores_them() {
        let a: SocketAddr = "127.0.0.1:7002".parse().unwrap();
        let s = blob_addr_string(a);
        assert_eq!(s, "/ip4/127.0.0.1/udp/7002/quic-v1/omesh-blob");
        assert_eq!(parse_blob_addr(&s), Some(a));
        assert!(s.parse::<Multiaddr>().is_err());
        assert_eq!(parse_blob_addr("/ip4/127.0.0.1/udp/7001/quic-v1"), None);
    }

    #[tokio::test]
    async fn only_allowed_peers_fetch_and_the_server_proves_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 1 << 30).unwrap();
        let mut s = store.stage().unwrap();
        std::io::Write::write_all(&mut s, b"blob bytes").unwrap();
        let staged = s.finish(None).unwrap();
        let digest = staged.digest;
        store.commit(staged).unwrap();
        let server_key = Keypair::generate_ed25519();
        let server = endpoint(&server_key, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let member = Keypair::generate_ed25519();
        let allowed = Allowed::default();
        allowed.set(HashSet::from([member.public().to_peer_id()]));
        let metrics = BlobMetrics::default();
        tokio::spawn(serve(
            server,
            store,
            allowed,
            Faults::default(),
            metrics.clone(),
            None,
            None,
        ));
        let server_peer = server_key.public().to_peer_id();
        let client = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let req = BlobRequest {
            digest,
            offset: 5,
            len: 100,
        };

        let conn = connect(&client, &member, server_peer, addr).await.unwrap();
        let answer = request(&conn, &req).await.unwrap();
        assert_eq!(
            answer,
            BlobResponse::Chunk {
                offset: 5,
                total: 10,
                data: b"bytes".to_vec()
            }
        );
        assert_eq!(metrics.bytes_served.get(), 5);

        let stranger = Keypair::generate_ed25519();
        let conn = connect(&client, &stranger, server_peer, addr)
            .await
            .unwrap();
        assert!(request(&conn, &req).await.is_err());
        assert_eq!(metrics.refused.get(), 1);

        // A stranger may make a first contact (here refused: no peer loop takes it); it
        // proves who answers.
        let (peer, answer) = contact::first_contact(&client, &stranger, addr, None)
            .await
            .unwrap();
        assert_eq!(peer, server_peer);
        assert!(
            matches!(answer, contact::Answer::Refused { .. }),
            "{answer:?}"
        );
        assert_eq!(metrics.refused.get(), 1);

        // A server that is not who we expect fails the handshake.
        let other = Keypair::generate_ed25519().public().to_peer_id();
        assert!(connect(&client, &member, other, addr).await.is_err());
    }
}
