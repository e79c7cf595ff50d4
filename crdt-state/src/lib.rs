//! omesh-state: the replicated state of the mesh and every decision taken on it.
//!
//! This crate owns the CRDT merge of node records and task records, version vectors and
//! anti-entropy, lease claims, fencing, retries, offload and compaction, all as one
//! deterministic state machine (`Replica`) driven by `handle(now, input)`, `poll_action()` and
//! `poll_timeout()`. It must never do I/O, read a clock, or draw randomness it was not given:
//! the node crate and the simulator drive the same code.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod config;
pub mod decide;
pub mod digest;
mod early;
mod io;
pub mod liveness;
pub mod merge;
pub mod overload;
pub mod placement;
mod probe;
pub mod quorum;
mod record;
pub mod replica;
mod runs;
mod suspicion;
mod sync;
mod vector;
pub mod verify;

pub use config::{ConfigError, ReplicaConfig};
pub use decide::TaskView;
pub use io::{
    Action, ExecEvent, Input, InputError, PropagationSample, Rejections, Stats, StopReason,
    REJECTION_REASONS,
};
pub use liveness::{Health, RttEstimate};
pub use merge::{Crdt, DeltaError, Merged, Stamp, State, TaskRecord};
pub use probe::NEIGHBOURS;
pub use replica::{survives_restart, NodeKey, Replica};
pub use verify::{Ed25519, Verify};
