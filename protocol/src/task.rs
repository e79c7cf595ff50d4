//! Task specs, their signatures and ids, leases and the per-epoch status lattice.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::codec::canonical;
use crate::ids::{Digest, NodeId, TaskId};
use crate::{Epoch, WIRE_VERSION};

/// The largest canonical encoding of a signed spec that a replica accepts.
pub const MAX_SPEC_BYTES: usize = 16 * 1024;
/// The most CPU a spec may ask for: 1,000 cores.
pub const MAX_CPU_MILLIS: u32 = 1_000_000;
/// The most memory a spec may ask for: 64 TiB.
pub const MAX_MEMORY_BYTES: u64 = 64 << 40;
/// The longest error text kept in a status entry; longer text is cut.
pub const MAX_ERROR_CHARS: usize = 256;

/// Which executor a task asks for.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub enum ExecutorKind {
    /// Whatever the owner has: Docker when its engine answers, else a process.
    #[default]
    Any,
    /// A Docker container from the pinned image.
    Docker,
    /// A native process (the image names what the command expects to find).
    Process,
}

impl std::str::FromStr for ExecutorKind {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "any" | "auto" => Ok(Self::Any),
            "docker" => Ok(Self::Docker),
            "process" => Ok(Self::Process),
            other => Err(SpecError::UnknownExecutor(other.to_owned())),
        }
    }
}

/// What a task is: immutable once submitted. Maps and sets are ordered so that the
/// encoding, and so the id, is a function of the value. Its JSON form (the API's) refuses
/// fields it does not know; postcard, the wire form, has no field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Image reference, pinned: `name@sha256:<64 hex>`. Empty for a process task that names
    /// none (a process runs what the owner's host has; see [`TaskSpec::check_shape`]).
    #[serde(default)]
    pub image: String,
    /// Command and arguments.
    pub command: Vec<String>,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// CPU reserved, in thousandths of a core.
    pub cpu_millis: u32,
    /// Memory reserved, in bytes.
    pub memory_bytes: u64,
    /// The owner must carry every one of these tags.
    pub required_tags: BTreeSet<String>,
    /// Higher runs first when capacity is short.
    pub priority: i32,
    /// Runs before the task is Failed for good (at least 1).
    pub max_attempts: u32,
    /// Wall-clock limit of one attempt, in milliseconds (0: none).
    pub timeout_ms: u64,
    /// Which executor it needs.
    pub executor: ExecutorKind,
    /// Distinguishes otherwise identical submissions.
    pub nonce: u64,
    /// The submitter's ed25519 public key.
    pub submitter: [u8; 32],
    /// What happens when the owner drops out of contact (default: at least once, fastest
    /// failover).
    #[serde(default)]
    pub disconnect: Disconnect,
}

/// The longest `stop_after` or `lost_after` a spec may set: 7 days.
pub const MAX_DISCONNECT_MS: u32 = 7 * 24 * 3_600_000;
/// The shortest: 1 s (a window shorter than a probe round trip could never be held).
pub const MIN_DISCONNECT_MS: u32 = 1_000;

/// A task's disconnect policy: what its owner does, and what the rest of the mesh waits for,
/// when the owner drops out of contact. Both unset is the default: the owner's guard stops
/// the instance once the mesh could count its lease lost, and another node takes the task
/// over as soon as it does (at least once; a cut-off owner runs on until its guard's
/// deadline, see the README's "Disconnect policies").
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct Disconnect {
    /// At most once: the owner's guard stops the instance once the owner has not been in
    /// contact with a majority of the mesh for this long, and another node claims the task
    /// only on a majority side, after a majority confirmed the owner unreachable and this
    /// long (plus grace and drift) has passed since any of them last heard it.
    pub stop_after_ms: Option<u32>,
    /// The task is not replaced until its owner has been unreachable for this long; an owner
    /// back within it keeps its instance (same epoch, no restart), and a restarted owner
    /// re-attaches to the instance it left running.
    pub lost_after_ms: Option<u32>,
}

impl Disconnect {
    /// Whether this is the default policy.
    pub fn is_default(&self) -> bool {
        self.stop_after_ms.is_none() && self.lost_after_ms.is_none()
    }

    /// Whether the task must run at most once.
    pub fn at_most_once(&self) -> bool {
        self.stop_after_ms.is_some()
    }

    /// Checks both windows are within [`MIN_DISCONNECT_MS`]..=[`MAX_DISCONNECT_MS`].
    pub fn check(&self) -> Result<(), SpecError> {
        for (key, v) in [
            ("stop_after", self.stop_after_ms),
            ("lost_after", self.lost_after_ms),
        ] {
            if let Some(ms) = v {
                if !(MIN_DISCONNECT_MS..=MAX_DISCONNECT_MS).contains(&ms) {
                    return Err(SpecError::BadDisconnect(format!(
                        "{key} of {ms} ms is outside {MIN_DISCONNECT_MS} ms..={MAX_DISCONNECT_MS} ms"
                    )));
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for Disconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.stop_after_ms, self.lost_after_ms) {
            (None, None) => write!(f, "replace (at least once)"),
            (Some(s), None) => write!(f, "stop_after {s} ms (at most once)"),
            (None, Some(l)) => write!(f, "lost_after {l} ms"),
            (Some(s), Some(l)) => write!(f, "stop_after {s} ms (at most once), lost_after {l} ms"),
        }
    }
}

/// A parsed, digest-pinned image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The name part (`busybox`, `registry/app`), informational.
    pub name: String,
    /// The sha256 digest the image is pinned to.
    pub digest: Digest,
}

impl ImageRef {
    /// Parses `name@sha256:<64 hex>`; anything not pinned by digest is refused.
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let Some((name, digest)) = s.rsplit_once('@') else {
            return Err(SpecError::ImageNotPinned(s.to_owned()));
        };
        let Some(hex) = digest.strip_prefix("sha256:") else {
            return Err(SpecError::ImageNotPinned(s.to_owned()));
        };
        // OCI digests are lowercase hex; accepting uppercase would give one image two names.
        if hex.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(SpecError::ImageNotPinned(s.to_owned()));
        }
        let digest = hex
            .parse::<Digest>()
            .map_err(|_| SpecError::ImageNotPinned(s.to_owned()))?;
        if name.is_empty() {
            return Err(SpecError::ImageNotPinned(s.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
            digest,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@sha256:{}", self.name, self.digest)
    }
}

/// Why a spec is not acceptable. Distinct variants so that an operator knows which rule broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The spec carries no signature.
    #[error("task spec is not signed")]
    Unsigned,
    /// The signature does not verify against the submitter key.
    #[error("task spec signature does not verify")]
    BadSignature,
    /// The submitter key is not a valid ed25519 key.
    #[error("submitter key is not a valid ed25519 public key")]
    BadSubmitterKey,
    /// The submitter is not in `authorized_submitters`.
    #[error("submitter {0} is not in authorized_submitters")]
    UnknownSubmitter(String),
    /// A task that may run in a container names no image.
    #[error("task spec names no image (only a process task may run without one)")]
    NoImage,
    /// The image is not pinned by a sha256 digest.
    #[error("image {0:?} is not pinned by digest (expected name@sha256:<64 hex>)")]
    ImageNotPinned(String),
    /// The encoded spec is over [`MAX_SPEC_BYTES`].
    #[error("task spec of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Encoded size.
        len: usize,
        /// Limit in force.
        limit: usize,
    },
    /// No command to run.
    #[error("task spec has an empty command")]
    EmptyCommand,
    /// `max_attempts` is zero.
    #[error("max_attempts must be at least 1")]
    ZeroAttempts,
    /// CPU or memory beyond any host (over 1,000 cores or 64 TiB).
    #[error("absurd resources: {0}")]
    AbsurdResources(String),
    /// An executor name this build does not know.
    #[error("unknown executor {0:?} (expected any, docker or process)")]
    UnknownExecutor(String),
    /// A disconnect window out of range.
    #[error("bad disconnect policy: {0}")]
    BadDisconnect(String),
}

impl TaskSpec {
    /// Checks the rules that do not need a key: a pinned image (a process task may name
    /// none), a command, at least one attempt. The image, if the spec names one.
    pub fn check_shape(&self) -> Result<Option<ImageRef>, SpecError> {
        let image = if self.image.is_empty() && self.executor == ExecutorKind::Process {
            None
        } else if self.image.is_empty() {
            return Err(SpecError::NoImage);
        } else {
            Some(ImageRef::parse(&self.image)?)
        };
        if self.command.is_empty() {
            return Err(SpecError::EmptyCommand);
        }
        if self.max_attempts == 0 {
            return Err(SpecError::ZeroAttempts);
        }
        if self.cpu_millis > MAX_CPU_MILLIS {
            return Err(SpecError::AbsurdResources(format!(
                "cpu {}m is over {}m",
                self.cpu_millis, MAX_CPU_MILLIS
            )));
        }
        if self.memory_bytes > MAX_MEMORY_BYTES {
            return Err(SpecError::AbsurdResources(format!(
                "memory {} bytes is over {} bytes",
                self.memory_bytes, MAX_MEMORY_BYTES
            )));
        }
        self.disconnect.check()?;
        Ok(image)
    }

    /// Signs the spec with `key`, setting `submitter` to its public half.
    pub fn sign(mut self, key: &SigningKey) -> SignedTaskSpec {
        self.submitter = key.verifying_key().to_bytes();
        let signature = key.sign(&canonical(&self)).to_bytes().to_vec();
        SignedTaskSpec {
            spec: self,
            signature,
        }
    }
}

/// A spec with the submitter's signature over its canonical encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTaskSpec {
    /// The spec.
    pub spec: TaskSpec,
    /// ed25519 signature over `canonical(spec)`; empty when unsigned.
    pub signature: Vec<u8>,
}

impl SignedTaskSpec {
    /// The task id: sha256 over the version byte and the canonical encoding of the signed spec.
    pub fn id(&self) -> TaskId {
        let mut bytes = vec![WIRE_VERSION];
        bytes.extend_from_slice(&canonical(self));
        TaskId(Digest::of(&bytes).0)
    }

    /// The size of the canonical encoding.
    pub fn encoded_len(&self) -> usize {
        canonical(self).len()
    }

    /// Verifies size, shape and signature, then that the submitter is authorized.
    /// Checks run in that order, so each bad input gets its own error. The image, if the
    /// spec names one.
    pub fn verify(&self, authorized: &BTreeSet<[u8; 32]>) -> Result<Option<ImageRef>, SpecError> {
        let len = self.encoded_len();
        if len > MAX_SPEC_BYTES {
            return Err(SpecError::TooLarge {
                len,
                limit: MAX_SPEC_BYTES,
            });
        }
        let image = self.spec.check_shape()?;
        if self.signature.is_empty() {
            return Err(SpecError::Unsigned);
        }
        let key = VerifyingKey::from_bytes(&self.spec.submitter)
            .map_err(|_| SpecError::BadSubmitterKey)?;
        let sig = ed25519_dalek::Signature::from_slice(&self.signature)
            .map_err(|_| SpecError::BadSignature)?;
        key.verify(&canonical(&self.spec), &sig)
            .map_err(|_| SpecError::BadSignature)?;
        if !authorized.contains(&self.spec.submitter) {
            return Err(SpecError::UnknownSubmitter(hex::encode(
                self.spec.submitter,
            )));
        }
        Ok(image)
    }
}

/// The lease of one epoch: who owns the task. Merged by highest epoch; equal epochs with
/// different owners resolve by `rank()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The fencing token.
    pub epoch: Epoch,
    /// The owner.
    pub owner: NodeId,
    /// The owner's incarnation when it claimed: a restarted owner's old leases are void.
    pub incarnation: u64,
    /// The owner's placement score for itself at claim time (higher is better).
    pub score: u32,
    /// How long the lease holds past a suspicion of the owner reaching a replica, in
    /// milliseconds.
    pub ttl_ms: u32,
    /// Set by the owner when it hands the task back (offload, leaving) before it ran.
    pub released: bool,
}

impl Lease {
    /// Deterministic total order used to merge: higher epoch; at equal epoch the better score,
    /// then the lower node id, then the newer owner incarnation; at equal owner a released
    /// lease supersedes a held one; `ttl_ms` last, so that no two different leases tie.
    #[allow(clippy::type_complexity)]
    pub fn rank(&self) -> (Epoch, u32, std::cmp::Reverse<NodeId>, u64, bool, u32) {
        (
            self.epoch,
            self.score,
            std::cmp::Reverse(self.owner),
            self.incarnation,
            self.released,
            self.ttl_ms,
        )
    }
}

/// The state of one epoch of a task. Codes follow the design: 100, 200, 300, 400; cancelled 499.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskState {
    /// Accepted, waiting to run.
    Pending,
    /// Started by its owner.
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited non-zero, could not start, or timed out.
    Failed,
    /// Stopped because the task was cancelled.
    Cancelled,
}

impl TaskState {
    /// The numeric code shown to operators.
    pub fn code(self) -> u16 {
        match self {
            Self::Pending => 100,
            Self::Running => 200,
            Self::Succeeded => 300,
            Self::Failed => 400,
            Self::Cancelled => 499,
        }
    }

    /// A terminal state is final: nothing merges over it.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// Position in the lattice: Pending < Running < terminal; terminal ties break by code.
    pub fn lattice_rank(self) -> (u8, u16) {
        let level = match self {
            Self::Pending => 0,
            Self::Running => 1,
            _ => 2,
        };
        (level, self.code())
    }

    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.code())
    }
}

/// What the owner of an epoch reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEntry {
    /// The state reached.
    pub state: TaskState,
    /// Exit code, when the run ended.
    pub exit_code: Option<i32>,
    /// Short error text (at most [`MAX_ERROR_CHARS`]).
    pub error: String,
    /// The reporter's clock when it happened (informational, for timelines).
    pub at_ms: u64,
    /// The node that reported it.
    pub reporter: NodeId,
}

impl StatusEntry {
    /// A new entry, with the error text cut to [`MAX_ERROR_CHARS`].
    pub fn new(
        state: TaskState,
        exit_code: Option<i32>,
        error: &str,
        at_ms: u64,
        reporter: NodeId,
    ) -> Self {
        Self {
            state,
            exit_code,
            error: error.chars().take(MAX_ERROR_CHARS).collect(),
            at_ms,
            reporter,
        }
    }

    /// Lattice order: the entry that survives a merge is the higher one.
    pub fn rank(&self) -> ((u8, u16), u64, Option<i32>) {
        (self.state.lattice_rank(), self.at_ms, self.exit_code)
    }
}
