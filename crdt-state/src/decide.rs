//! What the replica's decisions look like from outside: a task as an operator sees it.
//!
//! The decisions themselves (fence, start, claim, retry, hand back, compact) are taken by the
//! replica on each tick, in `replica/decide.rs`.

use std::sync::Arc;

use omesh_protocol::{Epoch, NodeId, SignedTaskSpec, StatusEntry, TaskId, TaskState};

/// A task as an operator sees it from this replica.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskView {
    /// The task.
    pub id: TaskId,
    /// Its spec (absent once compacted, or before the spec arrived).
    pub spec: Option<Arc<SignedTaskSpec>>,
    /// Its state as derived here.
    pub state: TaskState,
    /// The current lease epoch (0: never claimed).
    pub epoch: Epoch,
    /// The current lease owner.
    pub owner: Option<NodeId>,
    /// Whether that lease holds, as judged here.
    pub lease_live: bool,
    /// Attempts that ended Failed.
    pub failed_attempts: u32,
    /// Exit code of the latest ended epoch.
    pub exit_code: Option<i32>,
    /// Error text of the latest ended epoch.
    pub error: String,
    /// Why it is still pending, when placement found no node.
    pub pending_reason: Option<String>,
    /// What a claimed task that does not run yet waits for: its start, on the owner this
    /// node names (none unless a live lease's epoch has not reported running). Kept apart
    /// from `pending_reason`, which says why placement left the task unclaimed: a start that
    /// never comes must still show as a task pending with no reason (netsim's no-task-lost).
    pub starting: Option<String>,
    /// Whether it was cancelled.
    pub cancelled: bool,
    /// What each epoch reached, oldest first.
    pub history: Vec<(Epoch, StatusEntry)>,
    /// Whether only a tombstone remains.
    pub compacted: bool,
}
