//! The state digest: an order-independent sum of per-component hashes, kept up to date as
//! components change, so comparing two replicas costs one 32-byte compare.

use omesh_protocol::codec::canonical;
use omesh_protocol::{
    Epoch, Lease, NodeId, NodeRecord, StateDigest, StatusEntry, TaskId, TaskState,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// The hash of one component of the state, in four lanes that add up into a [`StateDigest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ComponentHash([u64; 4]);

impl ComponentHash {
    fn of(tag: u8, key: &[u8], value: &impl Serialize) -> Self {
        let mut h = Sha256::new();
        h.update([tag]);
        h.update(key);
        h.update(canonical(value));
        let out: [u8; 32] = h.finalize().into();
        let mut lanes = [0u64; 4];
        for (lane, chunk) in lanes.iter_mut().zip(out.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *lane = u64::from_le_bytes(b);
        }
        Self(lanes)
    }

    /// A node record: only its durable part (see [`NodeRecord::durable`]).
    pub fn node(rec: &NodeRecord) -> Self {
        Self::of(b'n', &[], &rec.durable())
    }
    /// The version of a node record, which the digest covers too (beside
    /// [`ComponentHash::node`]): two replicas holding different versions of a record with the
    /// same durable part (a load move, a refutation) must not look equal, or a digest-only
    /// sync would adopt the other's version vector and never fetch the newer record. Cheap
    /// (no SHA-256), so a record that only moved is still never rehashed.
    pub fn node_version(id: &NodeId, version: (u64, u64)) -> Self {
        let x = u64::from_le_bytes(first8(&id.0)) ^ version.0.rotate_left(32) ^ version.1;
        let mut lanes = [0u64; 4];
        for (i, lane) in lanes.iter_mut().enumerate() {
            let seed = x ^ (i as u64).wrapping_mul(GOLDEN);
            *lane = mix64(seed.wrapping_add(GOLDEN));
        }
        Self(lanes)
    }
    /// A task's spec: the id is its content hash, so the id stands for it.
    pub fn spec(task: &TaskId) -> Self {
        Self::of(b's', &task.0, &())
    }
    /// A task's lease.
    pub fn lease(task: &TaskId, lease: &Lease) -> Self {
        Self::of(b'l', &task.0, lease)
    }
    /// One epoch's status.
    pub fn status(task: &TaskId, epoch: Epoch, entry: &StatusEntry) -> Self {
        Self::of(b't', &task.0, &(epoch, entry))
    }
    /// A task's cancel flag.
    pub fn cancel(task: &TaskId) -> Self {
        Self::of(b'c', &task.0, &())
    }
    /// A suspicion of a node at one version of its record.
    pub fn suspect(node: &NodeId, version: (u64, u64)) -> Self {
        Self::of(b'p', &node.0, &version)
    }
    /// A node's revocation.
    pub fn revoke(node: &NodeId) -> Self {
        Self::of(b'r', &node.0, &())
    }
    /// A compacted task's tombstone.
    pub fn tombstone(task: &TaskId, outcome: TaskState) -> Self {
        Self::of(b'x', &task.0, &outcome)
    }
}

/// A running digest: add and remove component hashes in any order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Digest4([u64; 4]);

impl Digest4 {
    /// Adds a component.
    pub fn add(&mut self, c: ComponentHash) {
        for (a, b) in self.0.iter_mut().zip(c.0) {
            *a = a.wrapping_add(b);
        }
    }
    /// Removes a component added before.
    pub fn remove(&mut self, c: ComponentHash) {
        for (a, b) in self.0.iter_mut().zip(c.0) {
            *a = a.wrapping_sub(b);
        }
    }
    /// Replaces `old` by `new`.
    pub fn replace(&mut self, old: ComponentHash, new: ComponentHash) {
        self.remove(old);
        self.add(new);
    }
    /// The wire form.
    pub fn to_wire(self) -> StateDigest {
        StateDigest(self.0)
    }
}

/// splitmix64's increment (2^64 / φ).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's finaliser: spreads one word over all bits. The one mixer of the workspace
/// (netsim hashes its keys with [`splitmix64`]).
pub fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// One step of splitmix64: the golden increment, then [`mix64`].
pub fn splitmix64(x: u64) -> u64 {
    mix64(x.wrapping_add(GOLDEN))
}

/// The first eight bytes of a 32-byte id or digest.
pub(crate) fn first8(b: &[u8; 32]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(&b[..8]);
    out
}
