//! What every test mesh shares: node ids, the submitter key, signed specs and configs.

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::SigningKey;
use omesh_protocol::{ExecutorKind, NodeId, SignedTaskSpec, TaskSpec};
use omesh_state::ReplicaConfig;

/// The submitter key every test mesh authorizes.
pub fn submitter() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

/// A node id from a small number.
pub fn node(i: u8) -> NodeId {
    let mut b = [0u8; 32];
    b[0] = i;
    b[31] = 0xAA;
    NodeId(b)
}

/// A signed spec with sane defaults.
pub fn spec(nonce: u64) -> SignedTaskSpec {
    spec_with(nonce, |_| {})
}

/// A signed spec, adjusted by `f` before signing.
pub fn spec_with(nonce: u64, f: impl FnOnce(&mut TaskSpec)) -> SignedTaskSpec {
    let mut s = TaskSpec {
        image: format!("busybox@sha256:{}", "ab".repeat(32)),
        command: vec!["sh".into(), "-c".into(), "true".into()],
        env: BTreeMap::new(),
        cpu_millis: 100,
        memory_bytes: 64 << 20,
        required_tags: BTreeSet::new(),
        priority: 0,
        max_attempts: 3,
        timeout_ms: 60_000,
        executor: ExecutorKind::Process,
        nonce,
        submitter: [0; 32],
    };
    f(&mut s);
    s.sign(&submitter())
}

/// The config of test node `i`.
pub fn config(i: u8) -> ReplicaConfig {
    let mut cfg = ReplicaConfig::for_node(node(i));
    cfg.authorized_submitters
        .insert(submitter().verifying_key().to_bytes());
    cfg.tags.insert("executor:process".into());
    cfg.seed = u64::from(i);
    cfg
}
