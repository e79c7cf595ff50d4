//! A guard per task instance: a small process outside the peer (`omesh guard`, started by
//! the peer for each instance) that kills the whole instance when the peer dies or stops
//! renewing its deadline, so that an instance never outlives its lease.
//!
//! The peer talks to its guard over the guard's stdin and stdout, one JSON object per line:
//! the first line is the [`Plan`] (what to run or watch, and the first deadline), then
//! [`ToGuard`] renewals and orders; the guard answers with [`FromGuard`] reports.
//!
//! - **Peer dies** (crash, `kill -9`, OOM): the kernel closes the peer's end of the pipe, the
//!   guard reads end-of-file and kills the instance at once (unless it outlives its peer,
//!   below).
//! - **Peer stops renewing** (hung, stopped, starved, or it renews with a deadline that no
//!   longer moves because it is cut off): the guard kills the instance when the deadline
//!   passes and reports [`FromGuard::Expired`]. The deadline is the peer's own view of when
//!   another node could first count the instance's lease lost (`Replica::instance_deadline`,
//!   which follows the task's disconnect policy), less `guard_margin_ms`; the guard holds it
//!   as a duration on its own monotonic clock.
//! - **Process tasks** run as the guard's child, in their own cgroup (limits; kill is
//!   race-free against forking) where one can be made, else in their own process group with
//!   the guard as child subreaper, so grandchildren that leave the group come back to it.
//! - **Container tasks** are created and waited for by the peer; the guard only knows the
//!   container's name and kills and removes it through the engine.
//! - **Instances that outlive their peer** (tasks with `lost_after` and no `stop_after`: an
//!   upgrade restarts the peer, not the work): the plan carries a [`Survival`], and the guard
//!   listens on a unix socket in the peer's private data dir (`<data>/guards/<task>-<epoch>.sock`,
//!   0600, attaches only from its own uid). End-of-file from the peer does not end such an
//!   instance: the guard keeps it until the deadline last set (which still kills it, and the
//!   guard exits) and waits for the peer's next incarnation, which says [`ToGuard::Attach`],
//!   is told what runs ([`FromGuard::Attached`]; if the instance ended meanwhile, how follows at
//!   once) and then speaks the same protocol over the socket, [`ToGuard::Rekey`] included once
//!   its replica adopted the instance under a new epoch. A restarted peer spares these guards
//!   and their cgroups, process groups and containers when it ends what its earlier run left.
//!
//! The guard itself dies only after its instance: SIGTERM, SIGINT and SIGHUP make it kill
//! the instance first. A guard killed with SIGKILL takes its direct child along (parent-death
//! signal); what is left (a cgroup, grandchildren, a container) is removed by the peer's
//! clean-up when it starts again.

pub mod cleanup;
mod handle;
pub mod run;
mod watch;

pub use handle::{AttachError, Attaching, Guard, GuardEnd, GuardProgram, MAX_SOCKET_PATH};

use std::path::PathBuf;

use omesh_protocol::{Epoch, TaskId};
use serde::{Deserialize, Serialize};

/// argv[0] of every guard process, so `ps` and the restart clean-up can tell them.
pub const GUARD_ARG0: &str = "omesh-guard";

/// What a guard is to do: its first line on stdin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The instance, for the guard's own messages (`task 1a2b3c4d epoch 3`).
    pub label: String,
    /// The first deadline, in ms from when the guard reads the plan.
    pub window_ms: u64,
    /// What it guards.
    pub target: Target,
    /// Set for an instance that outlives its peer (a task with `lost_after` and no
    /// `stop_after`): the guard keeps it through the peer's end and waits for the peer's next
    /// incarnation to re-attach. `None`: the guard ends the instance with its peer.
    #[serde(default)]
    pub survive: Option<Survival>,
}

/// How a guard whose instance outlives its peer is found again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Survival {
    /// The unix socket the guard listens on (in the peer's private data dir, made 0600).
    pub socket: PathBuf,
    /// The task.
    pub task: TaskId,
    /// The epoch the instance was started for.
    pub epoch: Epoch,
    /// The task's run-time limit in ms (0: none), counted from the instance's start, so the
    /// incarnation that re-attaches still enforces it.
    pub timeout_ms: u64,
}

/// What a guard guards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    /// A process the guard starts itself.
    Process(ProcessPlan),
    /// A container the peer started, by name.
    Container {
        /// The container's name.
        name: String,
    },
}

/// A process task: what to run, where its output goes, as whom and within what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessPlan {
    /// The program.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its whole environment (nothing of the peer's is added).
    pub env: Vec<(String, String)>,
    /// The log file stdout and stderr are appended to (created 0600).
    pub log: PathBuf,
    /// The working directory.
    pub cwd: PathBuf,
    /// The user and group to run as (`None`: the guard's own).
    pub user: Option<(u32, u32)>,
    /// The cgroup to run in (`None`: no limits could be set up).
    pub cgroup: Option<CgroupPlan>,
}

/// A cgroup of one instance, with its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupPlan {
    /// The parent path under each controller's root (`omesh/<node>`).
    pub parent: String,
    /// This instance's directory name (`<task>-<epoch>`).
    pub name: String,
    /// CPU, thousandths of a core.
    pub cpu_millis: u32,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Most processes.
    pub pids: u32,
}

/// What the peer tells a running guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToGuard {
    /// The deadline is now this many ms from when the guard reads this.
    Renew {
        /// Milliseconds.
        ms: u64,
    },
    /// Kill the instance now (a stop, a cancel, a timeout) and report `Stopped`.
    Stop,
    /// The instance ended by itself and the peer cleans up: exit without killing.
    Release,
    /// The first line a restarted peer writes on a surviving guard's socket; the guard
    /// answers [`FromGuard::Attached`].
    Attach,
    /// The peer's replica adopted the instance under this epoch: later attaches report it.
    Rekey {
        /// The epoch the instance runs under now.
        epoch: Epoch,
    },
}

/// What a guard reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FromGuard {
    /// The process task runs, with this pid.
    Started {
        /// Its pid.
        pid: u32,
    },
    /// The process task exited by itself with this code.
    Exited {
        /// The exit code.
        code: i32,
    },
    /// The process task died of a signal it was not sent by the guard.
    Signaled {
        /// The signal.
        signal: i32,
        /// Whether its cgroup had an OOM kill: the memory limit killed it.
        oom: bool,
        /// The memory limit, bytes, when `oom`.
        memory_limit: Option<u64>,
    },
    /// The deadline passed: the instance was killed.
    Expired,
    /// Killed on the peer's order.
    Stopped,
    /// The guard could not do its job (could not start the process, set up its cgroup...).
    Failed {
        /// Why, naming what failed.
        reason: String,
    },
    /// The answer to [`ToGuard::Attach`]: what the guard watches. If the instance ended while
    /// no peer was attached, the report of that end follows at once.
    Attached(Attached),
}

/// What a surviving guard tells the peer that re-attaches to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attached {
    /// The task.
    pub task: TaskId,
    /// The epoch the instance runs under (its start epoch, or the last [`ToGuard::Rekey`]).
    pub epoch: Epoch,
    /// The epoch it was started for (its cgroup, log and container names carry it).
    pub started_epoch: Epoch,
    /// How long ago the guard started the instance (or began to watch it), ms.
    pub running_ms: u64,
    /// How long from the answer until the guard's deadline (the last one set), ms.
    pub deadline_ms: u64,
    /// The task's run-time limit, ms (0: none).
    pub timeout_ms: u64,
    /// What it guards.
    pub target: AttachedTarget,
}

/// What a surviving guard watches, as far as a re-attaching peer needs to know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AttachedTarget {
    /// A process task.
    Process {
        /// The pid of its main process, which is also its process group (`None`: it never
        /// started).
        pid: Option<u32>,
        /// Its cgroup's directory name under the node's parent, if it has one.
        cgroup: Option<String>,
        /// Its private working directory (the peer removes it once the instance ended).
        cwd: PathBuf,
    },
    /// A container, by name.
    Container {
        /// The container's name.
        name: String,
    },
}
