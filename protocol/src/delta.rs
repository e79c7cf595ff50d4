//! State deltas and the anti-entropy sync messages.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::admission::Revocation;
use crate::codec::canonical;
use crate::codec::Wire;
use crate::ids::{NodeId, Sig, TaskId};
use crate::node::NodeRecord;
use crate::task::{Lease, SignedTaskSpec, StatusEntry, TaskState};
use crate::Epoch;

/// The most bytes a gossip message may carry.
pub const MAX_GOSSIP_BYTES: usize = 256 * 1024;
/// The most bytes a sync request may carry (a version vector and a digest).
pub const MAX_SYNC_REQUEST_BYTES: usize = 1024 * 1024;
/// The most bytes a sync reply may carry; a larger state is sent over several replies.
pub const MAX_SYNC_REPLY_BYTES: usize = 8 * 1024 * 1024;

/// One change to the replicated state, stamped `(origin, stamp)` by the replica that made it
/// and signed by it. Stamps of one origin grow by one per change within an incarnation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The replica that made the change.
    pub origin: NodeId,
    /// Its counter for the change.
    pub stamp: u64,
    /// The change.
    pub body: DeltaBody,
    /// The origin's ed25519 signature over [`Delta::signed_bytes`]; the origin's NodeId is
    /// its public key. Kept with the state it wrote, so a sync serves it again.
    pub sig: Sig,
}

/// The domain every delta signature is made in: no other omesh signature (specs, cancels,
/// certificates) can be replayed as a delta.
const DELTA_DOMAIN: &[u8] = b"omesh/delta/v1";

impl Delta {
    /// What the origin signs: the domain, then `(origin, stamp, body)` canonically encoded.
    pub fn signed_bytes(origin: &NodeId, stamp: u64, body: &DeltaBody) -> Vec<u8> {
        let mut bytes = DELTA_DOMAIN.to_vec();
        bytes.extend_from_slice(&canonical(&(origin, stamp, body)));
        bytes
    }

    /// A delta made and signed by the holder of `key` (whose public key is the origin).
    pub fn signed(key: &ed25519_dalek::SigningKey, stamp: u64, body: DeltaBody) -> Self {
        let origin = NodeId(key.verifying_key().to_bytes());
        let sig = Sig::sign(key, &Self::signed_bytes(&origin, stamp, &body));
        Self {
            origin,
            stamp,
            body,
            sig,
        }
    }

    /// Whether `sig` is the origin's signature over this delta.
    pub fn signature_holds(&self) -> bool {
        self.sig.verifies(
            &self.origin.0,
            &Self::signed_bytes(&self.origin, self.stamp, &self.body),
        )
    }
}

/// A submitter's order to cancel a task: signed with a key in `authorized_submitters`, as the
/// spec was, so no node can cancel what it was not told to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SignedCancel {
    /// The task.
    pub task: TaskId,
    /// The submitter's ed25519 public key.
    pub submitter: [u8; 32],
    /// Its signature over [`SignedCancel::signed_bytes`].
    pub sig: Sig,
}

impl SignedCancel {
    /// What the submitter signs.
    pub fn signed_bytes(task: &TaskId) -> Vec<u8> {
        let mut bytes = b"omesh/cancel/v1".to_vec();
        bytes.extend_from_slice(&task.0);
        bytes
    }

    /// A cancel of `task` signed by `key`.
    pub fn sign(key: &ed25519_dalek::SigningKey, task: TaskId) -> Self {
        Self {
            task,
            submitter: key.verifying_key().to_bytes(),
            sig: Sig::sign(key, &Self::signed_bytes(&task)),
        }
    }

    /// Whether the signature holds (who may cancel is the replica's to check).
    pub fn signature_holds(&self) -> bool {
        self.sig
            .verifies(&self.submitter, &Self::signed_bytes(&self.task))
    }
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeltaBody {
    /// The origin's own node record (start, a load, image or address change, a refutation,
    /// leaving). Shared: every replica that merges it (10,000 in one simulator) holds the
    /// same allocation, not a copy.
    Node(Arc<NodeRecord>),
    /// A submitted task.
    Spec(SignedTaskSpec),
    /// A claim, or a release, of a task's lease.
    Lease {
        /// The task.
        task: TaskId,
        /// The lease.
        lease: Lease,
    },
    /// The state one epoch of a task reached.
    Status {
        /// The task.
        task: TaskId,
        /// The epoch reported on.
        epoch: Epoch,
        /// What happened.
        entry: StatusEntry,
    },
    /// The task is cancelled (grow-only), on a submitter's signed order.
    Cancel(SignedCancel),
    /// A terminal task's record is dropped; this tombstone keeps late peers from reviving it.
    Compact {
        /// The task.
        task: TaskId,
        /// Its final state.
        outcome: TaskState,
        /// The delta that ended it, as its writer signed it (the epoch owner's final status,
        /// or the submitter's cancel): a replica that still sees the task running takes the
        /// tombstone on this evidence, and on nothing less.
        end: Option<Box<Delta>>,
    },
    /// The origin probed `node` and got no answer, directly or through others: `node` is
    /// suspect at this version of its record. Any replica may write it; a newer record of
    /// `node` (its refutation, or a restart) supersedes it.
    Suspect {
        /// The node that did not answer.
        node: NodeId,
        /// The version `(incarnation, seq)` of its record the origin held.
        version: (u64, u64),
    },
    /// An admission key's holder revoked a node's admission (grow-only): its connections are
    /// refused and its writes dropped from then on.
    Revoke(Revocation),
}

impl DeltaBody {
    /// A short name, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Node(_) => "node",
            Self::Spec(_) => "spec",
            Self::Lease { .. } => "lease",
            Self::Status { .. } => "status",
            Self::Cancel { .. } => "cancel",
            Self::Compact { .. } => "compact",
            Self::Suspect { .. } => "suspect",
            Self::Revoke(_) => "revoke",
        }
    }
}

/// An order-independent digest of a replica's state; equal states have equal digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct StateDigest(pub [u64; 4]);

impl std::fmt::Display for StateDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for lane in self.0 {
            write!(f, "{lane:016x}")?;
        }
        Ok(())
    }
}

/// What travels on the gossip topic: deltas, in the order they were made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipMessage {
    /// The deltas.
    pub deltas: Vec<Delta>,
}

impl Wire for GossipMessage {
    const MAX_BYTES: usize = MAX_GOSSIP_BYTES;
    const KIND: &'static str = "gossip message";
}

/// The most bytes a liveness probe may carry.
pub const MAX_PROBE_BYTES: usize = 128;

/// A SWIM-style liveness probe, sent point to point (not gossiped). Each node pings one peer
/// per period; an unanswered ping is retried through a few other peers (`PingReq`); a peer
/// that answers neither way is suspected (a [`DeltaBody::Suspect`] gossiped to all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Probe {
    /// "Are you there?" Answered by an `Ack` with the same nonce.
    Ping {
        /// The pinger's nonce.
        nonce: u64,
    },
    /// "`about` is there": the answer to a ping, or passed on by a node that pinged `about`
    /// for the requester of a `PingReq` (then `nonce` is the requester's).
    Ack {
        /// The nonce of the ping or ping request answered.
        nonce: u64,
        /// The node whose liveness this confirms.
        about: NodeId,
        /// Set by the pinged node itself when it counts towards the pinger's majority
        /// contact (the `stop_after` tasks' deadline): not after it voted the pinger out
        /// (see `Vote`), and never on an ack passed on by a helper.
        grant: bool,
    },
    /// "Please ping `target` for me, and pass its ack on with my nonce."
    PingReq {
        /// The requester's nonce.
        nonce: u64,
        /// The node to ping.
        target: NodeId,
    },
    /// "Do you still hear `about`? If not, stop granting it contact for `hold_ms`": asked of
    /// every member by a node that would take over an at-most-once task of `about`.
    Poll {
        /// The poller's nonce.
        nonce: u64,
        /// The owner asked about.
        about: NodeId,
        /// How long a yes binds the voter to withhold grants from `about`.
        hold_ms: u32,
        /// A voter says yes only when it has neither heard nor granted `about` for this long.
        quiet_ms: u32,
    },
    /// The answer to a `Poll`. `silent_ms` is `Some(d)` when the voter has granted `about`
    /// nothing for `d` ms (and now withholds grants for the poll's `hold_ms`), `None` when it
    /// still hears `about` (no vote).
    Vote {
        /// The poll's nonce.
        nonce: u64,
        /// The owner asked about.
        about: NodeId,
        /// How long since the voter last granted `about` contact.
        silent_ms: Option<u32>,
    },
    /// "I claimed `task` at `epoch`: promise no other claimant of that epoch." Asked of every
    /// member before an at-most-once task starts.
    Confirm {
        /// The claimant's nonce.
        nonce: u64,
        /// The task.
        task: TaskId,
        /// The claimed epoch.
        epoch: Epoch,
    },
    /// The answer to a `Confirm`: `ok` when the member promised this claimant that epoch (or
    /// had already), false when it promised another claimant that epoch or a later one.
    Confirmed {
        /// The claimant's nonce.
        nonce: u64,
        /// The task.
        task: TaskId,
        /// The epoch.
        epoch: Epoch,
        /// Whether the promise was given.
        ok: bool,
    },
}

impl Wire for Probe {
    const MAX_BYTES: usize = MAX_PROBE_BYTES;
    const KIND: &'static str = "probe";
}

/// Anti-entropy: "here is what I have; send me what I lack".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// Per origin, the highest stamp up to which the requester holds everything.
    pub vclock: Vec<(NodeId, u64)>,
    /// The requester's state digest.
    pub digest: StateDigest,
    /// Ask for the whole state, not just what the version vector lacks.
    pub full: bool,
    /// Periodic anti-entropy: compare digests only (`vclock` is empty). Different digests
    /// get a `truncated` empty reply, upon which the requester asks again with its version
    /// vector. Equal digests and equal `vclock_hash` get an empty reply; equal digests and
    /// different vector hashes get the responder's vector alone (a vector can lag behind
    /// equal values). A vector is one entry per node (400 KB at 10,000 nodes), too much to
    /// send every period when states are nearly always equal.
    pub digest_only: bool,
    /// With `digest_only`: an order-free hash of the requester's version vector.
    pub vclock_hash: u64,
}

impl Wire for SyncRequest {
    const MAX_BYTES: usize = MAX_SYNC_REQUEST_BYTES;
    const KIND: &'static str = "sync request";
}

/// The answer to a [`SyncRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReply {
    /// Every piece of state the requester lacked, as deltas.
    pub deltas: Vec<Delta>,
    /// The responder's version vector; the requester may adopt it once the deltas are merged,
    /// unless `truncated`.
    pub vclock: Vec<(NodeId, u64)>,
    /// The responder's digest.
    pub digest: StateDigest,
    /// The reply was cut at the size limit; ask again for the rest.
    pub truncated: bool,
}

impl Wire for SyncReply {
    const MAX_BYTES: usize = MAX_SYNC_REPLY_BYTES;
    const KIND: &'static str = "sync reply";
}
