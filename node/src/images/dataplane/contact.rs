//! First contact: how two peers show each other their admission certificates before either
//! dials the other over libp2p (whose allow list would refuse a peer it knows nothing of).
//!
//! The joining node opens the data plane of the peer it wants (libp2p QUIC port + 1, or the
//! blob address of its record), with TLS bound to both identity keys, and sends on one
//! bidirectional stream [`CONTACT_MAGIC`] followed by a [`Hello`] with its certificate. The
//! server hands it to the peer loop, which checks it against the TLS-proven peer id, admits
//! the peer (its libp2p allow list now holds it) and only then answers with its own
//! certificate in an [`Answer`], or a refusal with the reason. The joining node checks that
//! certificate the same way, allows the server, and dials it. A connection from a peer that
//! is not admitted gets nothing else on the data plane.

use std::net::SocketAddr;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::PeerId;
use omesh_protocol::admission::MAX_CERT_BYTES;
use omesh_protocol::AdmissionCert;
use quinn::Endpoint;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{peer_of, transport, DataPlaneError, SERVER_NAME};

/// What opens a first-contact stream; no blob request starts with it (those start with the
/// wire version byte).
pub const CONTACT_MAGIC: &[u8] = b"omesh-contact/1\n";
/// The largest hello or answer accepted.
pub const MAX_CONTACT_BYTES: usize = MAX_CERT_BYTES + 1024;
/// How long a first contact may take, end to end.
pub const CONTACT_TIMEOUT: Duration = Duration::from_secs(10);

/// "Here is my certificate."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The certificate of the node that sends it, if it has one.
    pub cert: Option<AdmissionCert>,
}

/// The answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// Admitted; the answering node's certificate, if it has one.
    Admitted {
        /// The answering node's certificate.
        cert: Option<AdmissionCert>,
    },
    /// Refused.
    Refused {
        /// The `omesh_connections_refused_total` reason label.
        reason: String,
        /// What was wrong.
        detail: String,
    },
}

/// A hello the server received, for the peer loop to judge; it answers on `answer`.
#[derive(Debug)]
pub struct Request {
    /// The TLS-proven peer.
    pub peer: PeerId,
    /// What it showed.
    pub hello: Hello,
    /// Where the verdict goes (after the peer loop updated its allow list).
    pub answer: oneshot::Sender<Answer>,
}

/// Where the server sends hellos. Bounded: when the peer loop is behind, a hello is refused
/// as `busy` rather than queued without end.
pub type Requests = mpsc::Sender<Request>;

fn encode_stream<T: Serialize>(value: &T) -> Result<Vec<u8>, DataPlaneError> {
    let body =
        omesh_protocol::encode(value).map_err(|e| DataPlaneError::Malformed(e.to_string()))?;
    let mut out = CONTACT_MAGIC.to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// The server side: `bytes` is a whole stream that began with [`CONTACT_MAGIC`]. Returns
/// what to write back.
pub async fn answer(peer: PeerId, bytes: &[u8], requests: Option<&Requests>) -> Vec<u8> {
    let refused = |reason: &str, detail: String| Answer::Refused {
        reason: reason.into(),
        detail,
    };
    let body = bytes.get(CONTACT_MAGIC.len()..).unwrap_or_default();
    let answer = match omesh_protocol::decode::<Hello>(body, MAX_CONTACT_BYTES) {
        Err(e) => refused("malformed", format!("malformed hello: {e}")),
        Ok(hello) => match requests {
            None => refused("busy", "this node does not take first contacts".into()),
            Some(requests) => {
                let (tx, rx) = oneshot::channel();
                let req = Request {
                    peer,
                    hello,
                    answer: tx,
                };
                match requests.try_send(req) {
                    Err(_) => refused("busy", "the node is busy; try again".into()),
                    Ok(()) => match tokio::time::timeout(CONTACT_TIMEOUT, rx).await {
                        Ok(Ok(a)) => a,
                        _ => refused("busy", "no verdict in time".into()),
                    },
                }
            }
        },
    };
    encode_stream(&answer).unwrap_or_default()
}

/// The client side: shows `cert` to the data plane at `addr`, whoever answers there (TLS
/// proves which peer it is), and returns that peer and its answer.
pub async fn first_contact(
    endpoint: &Endpoint,
    key: &Keypair,
    addr: SocketAddr,
    cert: Option<AdmissionCert>,
) -> Result<(PeerId, Answer), DataPlaneError> {
    let lost = |e: &dyn std::fmt::Display| {
        DataPlaneError::Connection(format!("first contact with {addr}: {e}"))
    };
    let run = async {
        let tls = libp2p_tls::make_client_config(key, None)
            .map_err(|e| DataPlaneError::Tls(e.to_string()))?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| DataPlaneError::Tls(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(std::sync::Arc::new(quic));
        cfg.transport_config(transport());
        let conn = endpoint
            .connect_with(cfg, addr, SERVER_NAME)
            .map_err(|e| lost(&e))?
            .await
            .map_err(|e| lost(&e))?;
        let peer = peer_of(&conn).ok_or_else(|| lost(&"no peer id in the TLS certificate"))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
        send.write_all(&encode_stream(&Hello { cert })?)
            .await
            .map_err(|e| lost(&e))?;
        send.finish().map_err(|e| lost(&e))?;
        let bytes = recv
            .read_to_end(CONTACT_MAGIC.len() + MAX_CONTACT_BYTES)
            .await
            .map_err(|e| lost(&e))?;
        conn.close(0u32.into(), b"done");
        let body = bytes
            .strip_prefix(CONTACT_MAGIC)
            .ok_or_else(|| DataPlaneError::Malformed("answer without the contact prefix".into()))?;
        let answer = omesh_protocol::decode::<Answer>(body, MAX_CONTACT_BYTES)
            .map_err(|e| DataPlaneError::Malformed(e.to_string()))?;
        Ok((peer, answer))
    };
    tokio::time::timeout(CONTACT_TIMEOUT, run)
        .await
        .map_err(|_| lost(&"timed out"))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn malformed_hellos_are_refused_not_panicked_on() {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let mut cases: Vec<Vec<u8>> = vec![
            CONTACT_MAGIC.to_vec(),
            [CONTACT_MAGIC, b"\x02"].concat(),
            [CONTACT_MAGIC, b"\x02\x01\xff\xff\xff\xff"].concat(),
            [CONTACT_MAGIC, &[0xAB; 64][..]].concat(),
        ];
        cases.push([CONTACT_MAGIC, &vec![2u8; MAX_CONTACT_BYTES + 10][..]].concat());
        for bytes in cases {
            let out = answer(peer, &bytes, None).await;
            let body = out.strip_prefix(CONTACT_MAGIC).unwrap();
            let a: Answer = omesh_protocol::decode(body, MAX_CONTACT_BYTES).unwrap();
            assert!(matches!(a, Answer::Refused { .. }), "{a:?}");
        }
        // A well-formed hello with nobody to judge it is refused as busy.
        let hello = encode_stream(&Hello { cert: None }).unwrap();
        let a = answer(peer, &hello, None).await;
        let a: Answer =
            omesh_protocol::decode(a.strip_prefix(CONTACT_MAGIC).unwrap(), MAX_CONTACT_BYTES)
                .unwrap();
        assert!(matches!(a, Answer::Refused { ref reason, .. } if reason == "busy"));
    }
}
