//! Why an instance could not run, typed. The text reaches the replica (and operators) only
//! where the peer builds `ExecEvent::Failed { error }`.

use std::path::PathBuf;

/// Why an instance failed (it never ran, or did not end by itself).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The task needs Docker and this node has no engine.
    #[error("no Docker engine on this node")]
    NoEngine,
    /// The Docker engine cannot be reached (connect, ping).
    #[error("{0}")]
    EngineUnreachable(String),
    /// The spec's command is empty.
    #[error("empty command")]
    EmptyCommand,
    /// The spec's image reference does not parse.
    #[error("{0}")]
    BadImage(String),
    /// The image is not in the engine.
    #[error("image {id} not present on this node")]
    ImageMissing {
        /// The image id (`sha256:…`).
        id: String,
    },
    /// The image could not be got into the engine (fetch from peers, verify, load).
    #[error("{0}")]
    ImageUnavailable(String),
    /// An engine call failed; `what` names the call and its object.
    #[error("{what}: {source}")]
    Engine {
        /// The call, e.g. `create container omesh-…`.
        what: String,
        /// The engine's error.
        source: bollard::errors::Error,
    },
    /// The engine reported a failure without an error value of its own.
    #[error("{what}: {message}")]
    EngineReport {
        /// The call.
        what: String,
        /// The engine's message.
        message: String,
    },
    /// The instance's log file cannot be opened.
    #[error("cannot open log {}: {source}", path.display())]
    Log {
        /// The log file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The process could not be spawned.
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Waiting for the process failed.
    #[error("wait failed: {0}")]
    Wait(std::io::Error),
    /// The process died of this signal, not sent by omesh.
    #[error("killed by signal {0}")]
    Signal(i32),
    /// The instance ran past the spec's `timeout_ms` and was killed.
    #[error("timed out after {:.1}s", secs(*.ms))]
    Timeout {
        /// The spec's timeout.
        ms: u64,
    },
    /// Leftovers of an earlier run could not all be removed.
    #[error("{0}")]
    Cleanup(String),
    /// The instance's guard killed it at its deadline: this node was cut off or stalled.
    #[error("killed by its guard: this node's leases could lapse elsewhere (cut off or stalled)")]
    Expired,
    /// The instance's guard could not be started, failed, or went away.
    #[error("guard: {0}")]
    Guard(String),
    /// The kernel killed the instance for going over its memory limit.
    #[error("killed: out of memory (limit {} MiB)", limit_bytes / (1 << 20))]
    OutOfMemory {
        /// The limit, bytes.
        limit_bytes: u64,
    },
    /// The task asks for limits this node cannot enforce.
    #[error("{0}")]
    NoLimits(String),
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}
