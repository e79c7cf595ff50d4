//! omesh-protocol: every type that crosses the wire between omesh peers, and its codec.
//!
//! This crate owns the shapes of node records, task specs, leases, state deltas, sync
//! messages and blob frames, plus the versioned, size-limited postcard codec. It must never
//! do I/O, read a clock or spawn anything: decoding arbitrary bytes returns an error and
//! never panics.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod admission;
pub mod blob;
pub mod codec;
pub mod delta;
pub mod ids;
pub mod node;
pub mod task;

pub use admission::{AdmissionCert, CertError, Revocation};
pub use blob::{LogRequest, LogResponse};
pub use codec::{decode, encode, DecodeError, EncodeError, Wire, WIRE_VERSION};
pub use delta::{
    Delta, DeltaBody, GossipMessage, Probe, SignedCancel, StateDigest, SyncReply, SyncRequest,
};
pub use ids::{Digest, IdParseError, NodeId, Sig, TaskId};
pub use node::{Capacity, LoadSample, NodeRecord};
pub use task::{
    Disconnect, ExecutorKind, ImageRef, Lease, SignedTaskSpec, SpecError, StatusEntry, TaskSpec,
    TaskState, MAX_DISCONNECT_MS, MIN_DISCONNECT_MS,
};

/// Milliseconds on some clock. The replica never reads a clock: callers pass `now`.
pub type Millis = u64;

/// The lease epoch of a task: the fencing token carried by every executor action.
pub type Epoch = u64;
