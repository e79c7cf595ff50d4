//! Admission at the edge: which peers this node lets connect, and the certificate files.
//!
//! A mesh names admission public keys (`admission_keys`). A peer is admitted when this node
//! has verified a certificate for its peer id: issued by one of those keys, unexpired, and
//! not revoked. [`Gate`] holds what this node verified (from first contacts on the data plane
//! and from replicated node records) and turns it, with the static `allowed_peers`, into the
//! allow list libp2p enforces when a connection is established. Without admission keys the
//! mesh is open: any peer that reaches it joins.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use libp2p::PeerId;
use omesh_protocol::{AdmissionCert, CertError, Millis, NodeId, Wire};

use crate::peer::net;

/// Why a certificate file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CertFileError {
    /// The file could not be read or written.
    #[error("cannot {what} admission file {path}: {source}")]
    Io {
        /// `read` or `write`.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not hold a certificate.
    #[error("{path} is not an admission certificate (from `omesh admit`): {reason}")]
    Malformed {
        /// The file.
        path: std::path::PathBuf,
        /// What the decoder said.
        reason: String,
    },
}

/// Reads the certificate at `path`; `None` when there is no file.
pub fn read_cert(path: &Path) -> Result<Option<AdmissionCert>, CertFileError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CertFileError::Io {
                what: "read",
                path: path.to_owned(),
                source,
            })
        }
    };
    AdmissionCert::from_wire(&bytes)
        .map(Some)
        .map_err(|e| CertFileError::Malformed {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// Writes an encoded message (a certificate or a revocation) to `path`, with mode 0600.
pub fn write_file<T: Wire>(path: &Path, value: &T) -> Result<(), CertFileError> {
    let io = |source| CertFileError::Io {
        what: "write",
        path: path.to_owned(),
        source,
    };
    let bytes = value.to_wire().map_err(|e| io(std::io::Error::other(e)))?;
    crate::datadir::write_private_file(path, &bytes).map_err(io)
}

/// Admits the node whose data directory is `dir` (creating its identity if missing): signs
/// a certificate with `operator` and writes it to `out`, or `dir/admission.cert`.
pub fn admit_data_dir(
    operator: &ed25519_dalek::SigningKey,
    dir: &Path,
    tags: BTreeSet<String>,
    issued_ms: Millis,
    not_after_ms: Millis,
    out: Option<&Path>,
) -> Result<AdmissionCert, AdmitDirError> {
    let data = crate::datadir::DataDir::open(dir)?;
    let key = data.identity()?;
    let node = net::node_id_of_key(&key).ok_or(AdmitDirError::NotEd25519)?;
    let cert = AdmissionCert::sign(operator, node, tags, issued_ms, not_after_ms);
    let default = dir.join(crate::config::ADMISSION_CERT_FILE);
    write_file(out.unwrap_or(&default), &cert)?;
    Ok(cert)
}

/// Why a data directory could not be admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitDirError {
    /// The data directory or its identity cannot be used.
    #[error(transparent)]
    DataDir(#[from] crate::datadir::DataDirError),
    /// The certificate cannot be written.
    #[error(transparent)]
    Cert(#[from] CertFileError),
    /// The identity is not an ed25519 key.
    #[error("the identity key is not ed25519")]
    NotEd25519,
}

/// Parses a node named on the command line: its node id (64 hex characters) or its libp2p
/// peer id (`12D3KooW…`).
pub fn parse_node(s: &str) -> Result<NodeId, String> {
    let s = s.trim();
    if let Ok(id) = s.parse::<NodeId>() {
        return Ok(id);
    }
    let peer: PeerId = s.parse().map_err(|_| {
        format!("{s:?} is neither a node id (64 hex characters) nor a peer id (12D3KooW…)")
    })?;
    net::node_id_of(&peer).ok_or_else(|| format!("peer id {s} does not hold an ed25519 key"))
}

/// A refusal: a metric label and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The `reason` label of `omesh_connections_refused_total`.
    pub reason: &'static str,
    /// For logs and the refused peer.
    pub detail: String,
}

impl Refusal {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// Every `reason` label of `omesh_connections_refused_total`.
pub const REFUSAL_REASONS: [&str; 9] = [
    "not_admitted",
    "not_allowed_peer",
    "no_certificate",
    "wrong_node",
    "unknown_issuer",
    "bad_signature",
    "expired",
    "revoked",
    "malformed",
];

fn refusal_of(e: &CertError) -> Refusal {
    let reason = match e {
        CertError::WrongNode { .. } => "wrong_node",
        CertError::UnknownIssuer(_) => "unknown_issuer",
        CertError::BadSignature => "bad_signature",
        CertError::Expired(_) => "expired",
        CertError::TooManyTags(_) => "malformed",
        CertError::Revoked(_) => "revoked",
    };
    Refusal::new(reason, e.to_string())
}

/// Who may connect: admission keys, this node's certificate, the certificates verified so
/// far, and the static `allowed_peers`.
#[derive(Debug, Clone)]
pub struct Gate {
    keys: BTreeSet<[u8; 32]>,
    own: Option<AdmissionCert>,
    allowed_peers: BTreeSet<PeerId>,
    admitted: HashMap<PeerId, AdmissionCert>,
}

impl Gate {
    /// A gate for these admission keys (empty: open), this node's certificate and the static
    /// `allowed_peers` (empty: any).
    pub fn new(
        keys: BTreeSet<[u8; 32]>,
        own: Option<AdmissionCert>,
        allowed_peers: BTreeSet<PeerId>,
    ) -> Self {
        Self {
            keys,
            own,
            allowed_peers,
            admitted: HashMap::new(),
        }
    }

    /// Whether the mesh is open (no admission keys).
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// The admission keys.
    pub fn keys(&self) -> &BTreeSet<[u8; 32]> {
        &self.keys
    }

    /// This node's certificate.
    pub fn own_cert(&self) -> Option<&AdmissionCert> {
        self.own.as_ref()
    }

    /// Whether connections are restricted at all (admission keys or `allowed_peers`).
    pub fn restricts(&self) -> bool {
        !self.is_open() || !self.allowed_peers.is_empty()
    }

    /// Whether this node shows its certificate before dialing (a first contact): when the
    /// mesh is admitted, or when it holds a certificate that an admitted peer may ask for.
    pub fn wants_first_contact(&self) -> bool {
        !self.is_open() || self.own.is_some()
    }

    fn statically_allowed(&self, peer: &PeerId) -> bool {
        self.allowed_peers.is_empty() || self.allowed_peers.contains(peer)
    }

    /// Checks the certificate `peer` showed at `now_ms`; `revoked` tells revoked nodes.
    pub fn judge(
        &self,
        peer: &PeerId,
        cert: Option<&AdmissionCert>,
        now_ms: Millis,
        revoked: impl Fn(&NodeId) -> bool,
    ) -> Result<(), Refusal> {
        if !self.statically_allowed(peer) {
            return Err(Refusal::new(
                "not_allowed_peer",
                format!("peer {peer} is not in allowed_peers"),
            ));
        }
        if self.is_open() {
            return Ok(());
        }
        let node = net::node_id_of(peer)
            .ok_or_else(|| Refusal::new("wrong_node", format!("peer {peer} is not ed25519")))?;
        let cert = cert.ok_or_else(|| {
            Refusal::new(
                "no_certificate",
                format!("peer {peer} showed no admission certificate"),
            )
        })?;
        cert.verify(&node, &self.keys, now_ms)
            .map_err(|e| refusal_of(&e))?;
        if revoked(&node) {
            return Err(refusal_of(&CertError::Revoked(node.short())));
        }
        Ok(())
    }

    /// Records a certificate [`Gate::judge`] accepted.
    pub fn admit(&mut self, peer: PeerId, cert: AdmissionCert) {
        self.admitted.insert(peer, cert);
    }

    /// Takes in the certificates of replicated node records: verifies those not seen yet,
    /// and drops admissions that expired or were revoked. Returns whether the set changed.
    pub fn refresh<'a>(
        &mut self,
        records: impl Iterator<Item = (NodeId, &'a AdmissionCert)>,
        now_ms: Millis,
        revoked: impl Fn(&NodeId) -> bool,
    ) -> bool {
        let before: HashSet<PeerId> = self.admitted.keys().copied().collect();
        for (node, cert) in records {
            let Some(peer) = net::peer_id_of(&node) else {
                continue;
            };
            if self.admitted.get(&peer) == Some(cert) {
                continue;
            }
            if self.judge(&peer, Some(cert), now_ms, &revoked).is_ok() {
                self.admitted.insert(peer, cert.clone());
            }
        }
        self.admitted.retain(|peer, cert| {
            cert.not_after_ms >= now_ms && net::node_id_of(peer).is_some_and(|n| !revoked(&n))
        });
        before != self.admitted.keys().copied().collect::<HashSet<_>>()
    }

    /// Whether `peer` may connect and be heard now.
    pub fn permits(&self, peer: &PeerId) -> bool {
        self.statically_allowed(peer) && (self.is_open() || self.admitted.contains_key(peer))
    }

    /// The peers libp2p lets connect; `None` when connections are not restricted.
    pub fn allow_list(&self) -> Option<HashSet<PeerId>> {
        if !self.restricts() {
            return None;
        }
        if self.is_open() {
            return Some(self.allowed_peers.iter().copied().collect());
        }
        Some(
            self.admitted
                .keys()
                .filter(|p| self.statically_allowed(p))
                .copied()
                .collect(),
        )
    }

    /// How many peers are admitted by certificate.
    pub fn admitted_count(&self) -> usize {
        self.admitted.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ed25519_dalek::SigningKey;
    use libp2p::identity::Keypair;

    fn peer() -> (PeerId, NodeId) {
        let p = Keypair::generate_ed25519().public().to_peer_id();
        (p, net::node_id_of(&p).unwrap())
    }

    #[test]
    fn judge_names_each_reason() {
        let op = SigningKey::from_bytes(&[1; 32]);
        let foreign = SigningKey::from_bytes(&[2; 32]);
        let keys = BTreeSet::from([op.verifying_key().to_bytes()]);
        let gate = Gate::new(keys, None, BTreeSet::new());
        let (p, n) = peer();
        let (_, other) = peer();
        let no = |_: &NodeId| false;
        let ok = AdmissionCert::sign(&op, n, BTreeSet::new(), 0, 1000);
        assert_eq!(gate.judge(&p, Some(&ok), 10, no), Ok(()));
        let reason =
            |c: Option<&AdmissionCert>, now| gate.judge(&p, c, now, no).unwrap_err().reason;
        assert_eq!(reason(None, 10), "no_certificate");
        assert_eq!(reason(Some(&ok), 1001), "expired");
        let c = AdmissionCert::sign(&foreign, n, BTreeSet::new(), 0, 1000);
        assert_eq!(reason(Some(&c), 10), "unknown_issuer");
        let c = AdmissionCert::sign(&op, other, BTreeSet::new(), 0, 1000);
        assert_eq!(reason(Some(&c), 10), "wrong_node");
        assert_eq!(
            gate.judge(&p, Some(&ok), 10, |_| true).unwrap_err().reason,
            "revoked"
        );
    }

    #[test]
    fn allow_list_follows_admissions_and_expiry() {
        let op = SigningKey::from_bytes(&[1; 32]);
        let keys = BTreeSet::from([op.verifying_key().to_bytes()]);
        let mut gate = Gate::new(keys, None, BTreeSet::new());
        assert_eq!(gate.allow_list(), Some(HashSet::new()));
        let (p, n) = peer();
        let c = AdmissionCert::sign(&op, n, BTreeSet::new(), 0, 1000);
        assert!(gate.refresh([(n, &c)].into_iter(), 10, |_| false));
        assert!(gate.permits(&p));
        assert!(gate.refresh(std::iter::empty(), 2000, |_| false));
        assert!(!gate.permits(&p));
        let open = Gate::new(BTreeSet::new(), None, BTreeSet::new());
        assert!(open.permits(&p) && open.allow_list().is_none());
        let only = Gate::new(BTreeSet::new(), None, BTreeSet::from([p]));
        assert_eq!(only.allow_list(), Some(HashSet::from([p])));
        assert!(!only.permits(&peer().0));
    }

    #[test]
    fn nodes_are_named_by_node_id_or_peer_id() {
        let (p, n) = peer();
        assert_eq!(parse_node(&n.to_hex()), Ok(n));
        assert_eq!(parse_node(&p.to_string()), Ok(n));
        let err = parse_node("banana").unwrap_err();
        assert!(err.contains("banana"), "{err}");
    }
}
