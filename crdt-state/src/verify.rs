//! Checking the signature on a delta. The replica stays sans-IO and takes a [`Verify`]: the
//! peer uses [`Ed25519`]; a simulator running thousands of replicas in one process can
//! share one that remembers what it already checked, since every replica checks the same
//! deltas.

use omesh_protocol::Delta;

/// Decides whether a delta's signature is its origin's.
pub trait Verify: Send + Sync + std::fmt::Debug {
    /// Whether `delta.sig` is the origin's signature over the delta.
    fn holds(&self, delta: &Delta) -> bool;
}

/// Checks every signature (ed25519, strict).
#[derive(Debug, Clone, Copy, Default)]
pub struct Ed25519;

impl Verify for Ed25519 {
    fn holds(&self, delta: &Delta) -> bool {
        delta.signature_holds()
    }
}
