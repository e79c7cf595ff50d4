//! Admission: which nodes belong to a mesh.
//!
//! A mesh names one or more admission public keys. The holder of one (the operator) signs an
//! [`AdmissionCert`] for each node's id; the node keeps it in its data dir, shows it when it
//! connects, and carries it in its node record, so every replica can check that a write came
//! from an admitted node. A [`Revocation`], signed by an admission key, withdraws a node for
//! good; revocations are a grow-only set in the replicated state.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::codec::{canonical, Wire};
use crate::ids::{NodeId, Sig};
use crate::Millis;

/// The most bytes a certificate may take on the wire.
pub const MAX_CERT_BYTES: usize = 4096;
/// The most tags a certificate may carry.
pub const MAX_CERT_TAGS: usize = 32;

/// "The holder of admission key `issuer` admits node `node` until `not_after_ms`."
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AdmissionCert {
    /// The admitted node (its ed25519 public key).
    pub node: NodeId,
    /// Operator tags the certificate grants (informational; shown by `omesh status`).
    pub tags: BTreeSet<String>,
    /// When it was issued, in Unix milliseconds.
    pub issued_ms: Millis,
    /// When it lapses, in Unix milliseconds; `u64::MAX` never.
    pub not_after_ms: Millis,
    /// The admission public key that signed it.
    pub issuer: [u8; 32],
    /// The issuer's signature over [`AdmissionCert::signed_bytes`].
    pub sig: Sig,
}

/// Why a certificate does not admit a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// It names another node.
    #[error("the certificate is for node {cert_for}, not {node}")]
    WrongNode {
        /// Whom it names.
        cert_for: String,
        /// Who showed it.
        node: String,
    },
    /// Its issuer is not one of this mesh's admission keys.
    #[error("the certificate's issuer {0} is not one of this mesh's admission_keys")]
    UnknownIssuer(String),
    /// The signature does not hold.
    #[error("the certificate's signature does not verify")]
    BadSignature,
    /// It lapsed.
    #[error("the certificate expired at {0} ms (Unix)")]
    Expired(Millis),
    /// Too many tags.
    #[error("the certificate has {0} tags, over the limit of {MAX_CERT_TAGS}")]
    TooManyTags(usize),
    /// The node was revoked.
    #[error("node {0} was revoked")]
    Revoked(String),
}

impl AdmissionCert {
    /// What the issuer signs.
    pub fn signed_bytes(
        node: &NodeId,
        tags: &BTreeSet<String>,
        issued_ms: Millis,
        not_after_ms: Millis,
        issuer: &[u8; 32],
    ) -> Vec<u8> {
        let mut bytes = b"omesh/admit/v1".to_vec();
        bytes.extend_from_slice(&canonical(&(node, tags, issued_ms, not_after_ms, issuer)));
        bytes
    }

    /// A certificate for `node` signed by the admission key `key`.
    pub fn sign(
        key: &ed25519_dalek::SigningKey,
        node: NodeId,
        tags: BTreeSet<String>,
        issued_ms: Millis,
        not_after_ms: Millis,
    ) -> Self {
        let issuer = key.verifying_key().to_bytes();
        let sig = Sig::sign(
            key,
            &Self::signed_bytes(&node, &tags, issued_ms, not_after_ms, &issuer),
        );
        Self {
            node,
            tags,
            issued_ms,
            not_after_ms,
            issuer,
            sig,
        }
    }

    /// Checks that this admits `node` at `now_ms` under the admission keys `keys`. Cheap
    /// checks first, the signature last.
    pub fn verify(
        &self,
        node: &NodeId,
        keys: &BTreeSet<[u8; 32]>,
        now_ms: Millis,
    ) -> Result<(), CertError> {
        self.verify_at_any_time(node, keys)?;
        if now_ms > self.not_after_ms {
            return Err(CertError::Expired(self.not_after_ms));
        }
        Ok(())
    }

    /// [`AdmissionCert::verify`] without the expiry: what a replica checks when it merges a
    /// record (merging must not depend on the clock; expiry is the connection's to enforce).
    pub fn verify_at_any_time(
        &self,
        node: &NodeId,
        keys: &BTreeSet<[u8; 32]>,
    ) -> Result<(), CertError> {
        if self.node != *node {
            return Err(CertError::WrongNode {
                cert_for: self.node.short(),
                node: node.short(),
            });
        }
        if self.tags.len() > MAX_CERT_TAGS {
            return Err(CertError::TooManyTags(self.tags.len()));
        }
        if !keys.contains(&self.issuer) {
            return Err(CertError::UnknownIssuer(hex::encode(&self.issuer[..8])));
        }
        let msg = Self::signed_bytes(
            &self.node,
            &self.tags,
            self.issued_ms,
            self.not_after_ms,
            &self.issuer,
        );
        if !self.sig.verifies(&self.issuer, &msg) {
            return Err(CertError::BadSignature);
        }
        Ok(())
    }
}

impl Wire for AdmissionCert {
    const MAX_BYTES: usize = MAX_CERT_BYTES;
    const KIND: &'static str = "admission certificate";
}

/// "The holder of admission key `issuer` withdraws node `node`'s admission."
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Revocation {
    /// The node withdrawn.
    pub node: NodeId,
    /// The admission key that signed it.
    pub issuer: [u8; 32],
    /// Its signature over [`Revocation::signed_bytes`].
    pub sig: Sig,
}

impl Revocation {
    /// What the issuer signs.
    pub fn signed_bytes(node: &NodeId) -> Vec<u8> {
        let mut bytes = b"omesh/revoke/v1".to_vec();
        bytes.extend_from_slice(&node.0);
        bytes
    }

    /// A revocation of `node` signed by the admission key `key`.
    pub fn sign(key: &ed25519_dalek::SigningKey, node: NodeId) -> Self {
        Self {
            node,
            issuer: key.verifying_key().to_bytes(),
            sig: Sig::sign(key, &Self::signed_bytes(&node)),
        }
    }

    /// Whether one of `keys` signed it.
    pub fn holds(&self, keys: &BTreeSet<[u8; 32]>) -> bool {
        keys.contains(&self.issuer)
            && self
                .sig
                .verifies(&self.issuer, &Self::signed_bytes(&self.node))
    }
}

impl Wire for Revocation {
    const MAX_BYTES: usize = 256;
    const KIND: &'static str = "revocation";
}
