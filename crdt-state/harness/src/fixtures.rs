//! What every test mesh shares: node ids, the submitter key, signed specs and configs.

use std::collections::{BTreeMap, BTreeSet};

use std::sync::OnceLock;

use ed25519_dalek::SigningKey;
use omesh_protocol::{
    Delta, DeltaBody, ExecutorKind, NodeId, SignedCancel, SignedTaskSpec, TaskId, TaskSpec,
};
use omesh_state::{NodeKey, ReplicaConfig};

/// The submitter key every test mesh authorizes.
pub fn submitter() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

/// The secret keys of test nodes 0..=255: node `i`'s public key begins with the byte `i`,
/// so test ids sort by their number as they did when ids were made up (ties between claims
/// are broken by id order).
fn secrets() -> &'static [[u8; 32]; 256] {
    static TABLE: OnceLock<[[u8; 32]; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = [[0u8; 32]; 256];
        let mut filled = [false; 256];
        let mut left = 256;
        let mut n: u64 = 0;
        while left > 0 {
            n += 1;
            let mut secret = [0u8; 32];
            for (i, chunk) in secret.chunks_mut(8).enumerate() {
                let x = omesh_state::digest::splitmix64(n.wrapping_mul(4) + i as u64);
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            let first = SigningKey::from_bytes(&secret).verifying_key().to_bytes()[0];
            let slot = usize::from(first);
            if !filled[slot] {
                filled[slot] = true;
                table[slot] = secret;
                left -= 1;
            }
        }
        table
    })
}

/// The identity key of test node `i`.
pub fn key(i: u8) -> NodeKey {
    NodeKey::from_bytes(&secrets()[usize::from(i)])
}

/// The identity key of a test node, by its id.
pub fn key_of(id: &NodeId) -> Option<NodeKey> {
    let k = key(id.0[0]);
    (k.id() == *id).then_some(k)
}

/// A node id from a small number: the public key of [`key`]`(i)`.
pub fn node(i: u8) -> NodeId {
    key(i).id()
}

/// A replica for a test config (its node id one of [`node`]'s), with that node's key.
pub fn replica(cfg: ReplicaConfig) -> Result<omesh_state::Replica, omesh_state::ConfigError> {
    let key = key_of(&cfg.node_id).unwrap_or_else(|| key(0));
    omesh_state::Replica::new(cfg, key)
}

/// A delta signed by the key of its `origin`, a test node (a hostile node's forgery, say).
pub fn sign(origin: NodeId, stamp: u64, body: DeltaBody) -> Delta {
    match key_of(&origin) {
        Some(k) => Delta::signed(k.signing(), stamp, body),
        None => Delta {
            origin,
            stamp,
            body,
            sig: omesh_protocol::Sig::default(),
        },
    }
}

/// A delta written and signed by test node `i` (a hostile node's forgery, say).
pub fn signed(i: u8, stamp: u64, body: DeltaBody) -> Delta {
    Delta::signed(key(i).signing(), stamp, body)
}

/// The submitter's signed order to cancel `task`.
pub fn cancel(task: TaskId) -> SignedCancel {
    SignedCancel::sign(&submitter(), task)
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
        disconnect: Default::default(),
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
    cfg.tags
        .insert(omesh_state::placement::PROCESS_LIMITS_TAG.into());
    cfg.seed = u64::from(i);
    cfg
}
