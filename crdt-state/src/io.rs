//! The replica's public inputs and outputs: what a driver feeds it ([`Input`], [`ExecEvent`]),
//! what it hands back ([`Action`], [`StopReason`]), why an input was refused ([`InputError`]),
//! and what it counts ([`Stats`], [`PropagationSample`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use omesh_protocol::{
    DecodeError, Digest, Epoch, GossipMessage, LoadSample, Millis, NodeId, Probe, SignedTaskSpec,
    SpecError, SyncReply, SyncRequest, TaskId,
};

use crate::merge::DeltaError;

/// One node record merged here: when its writer wrote it and when it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PropagationSample {
    /// The writer.
    pub origin: NodeId,
    /// Its record counter.
    pub seq: u64,
    /// The writer's clock when written.
    pub written_at_ms: Millis,
    /// This node's clock when merged.
    pub merged_at_ms: Millis,
}

impl PropagationSample {
    /// Merge time minus write time (0 if the clocks disagree the other way).
    pub fn delay_ms(&self) -> Millis {
        self.merged_at_ms.saturating_sub(self.written_at_ms)
    }
}

/// What the local executor reports about one epoch of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// The instance is running.
    Started,
    /// The instance exited with this code.
    Exited {
        /// Exit code (0 is success).
        code: i32,
    },
    /// The instance could not run (image missing, executor error, timeout).
    Failed {
        /// Why.
        error: String,
    },
    /// The instance was stopped after a StopTask.
    Stopped,
    /// The instance's guard killed it because its deadline passed
    /// ([`crate::Replica::leases_hold_until`] less a margin, not renewed in time): this node
    /// was cut off or stalled, and the task may be taken over elsewhere. The replica hands
    /// the lease back (no failed attempt is counted: the task did nothing wrong).
    Expired,
}

/// Everything that can happen to a replica.
#[derive(Debug, Clone)]
pub enum Input {
    /// Time passed; do what is due.
    Tick,
    /// A gossip message, as delivered by a peer.
    Gossip {
        /// The peer that delivered it to this node: the relay (gossipsub's
        /// `propagation_source`), which is not always the publisher. A gap that a delivery
        /// shows is closed by syncing with this peer when the origin is not alive, so it must
        /// be a peer this node can reach now, never the publisher read off the message. Each
        /// delta names its own origin.
        via: NodeId,
        /// The message.
        msg: GossipMessage,
    },
    /// A peer asks for what it lacks.
    SyncRequest {
        /// The asking peer.
        from: NodeId,
        /// Its request.
        request: SyncRequest,
    },
    /// A peer answered our sync request.
    SyncReply {
        /// The answering peer.
        from: NodeId,
        /// Its reply.
        reply: SyncReply,
    },
    /// A liveness probe from a peer.
    Probe {
        /// The peer that sent it.
        from: NodeId,
        /// The probe.
        probe: Probe,
    },
    /// A transport connection to a peer came up. A replica that is not synced, or does not
    /// know the peer as alive, asks it for its state (and the peer, hearing from a node it
    /// does not know, asks back): records are published only when they change, so a peer
    /// that joined after a record's publication learns it this way or by anti-entropy.
    Connected(NodeId),
    /// A sync request to `peer` failed (unreachable, timeout).
    SyncFailed {
        /// The peer.
        peer: NodeId,
    },
    /// A fresh smoothed load sample of this host.
    Load(LoadSample),
    /// A measured round trip to a peer.
    Rtt {
        /// The peer.
        peer: NodeId,
        /// Round-trip time in microseconds.
        rtt_us: u64,
    },
    /// The addresses this node listens on changed.
    Addresses(Vec<String>),
    /// The image blobs this node holds changed.
    Images(BTreeSet<Digest>),
    /// A task submitted through this node.
    Submit(SignedTaskSpec),
    /// Cancel a task everywhere, on a submitter's signed order.
    Cancel(omesh_protocol::SignedCancel),
    /// An operator's revocation of a node's admission, to spread through the mesh.
    Revoke(omesh_protocol::Revocation),
    /// The local executor reports on an epoch it was told to run.
    Executor {
        /// The task.
        task: TaskId,
        /// The epoch the instance was started for.
        epoch: Epoch,
        /// What happened.
        event: ExecEvent,
    },
    /// This node is shutting down gracefully.
    Leave,
    /// An instance this node's earlier incarnation started still runs here (found through
    /// its guard after a restart). Once synced, the replica takes the task over at a new
    /// epoch and answers [`Action::AdoptTask`], so the instance keeps running under a
    /// fencing token that moved forward; or [`Action::StopTask`] for `epoch` when the task
    /// moved on meanwhile (taken over, cancelled, ended).
    Adopt {
        /// The task.
        task: TaskId,
        /// The epoch the instance was started for.
        epoch: Epoch,
    },
}

/// Why a StopTask was emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A higher epoch (or a better claim of the same epoch) owns the task now.
    Fenced {
        /// The epoch that won.
        by: Epoch,
    },
    /// The task was cancelled.
    Cancelled,
    /// This node is leaving the mesh.
    Leaving,
    /// The task was compacted away while this instance still ran.
    Compacted,
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish on the gossip topic.
    Publish(GossipMessage),
    /// Send a sync request to a peer.
    SendSync {
        /// The peer.
        to: NodeId,
        /// The request.
        request: SyncRequest,
    },
    /// Answer a peer's sync request.
    ReplySync {
        /// The peer.
        to: NodeId,
        /// The reply.
        reply: SyncReply,
    },
    /// Send a liveness probe to a peer (point to point, best effort: a lost probe is a
    /// missed answer, which is what probing measures).
    SendProbe {
        /// The peer.
        to: NodeId,
        /// The probe.
        probe: Probe,
    },
    /// Run an epoch of a task; every report about it must carry the same epoch.
    StartTask {
        /// The task.
        task: TaskId,
        /// The fencing token.
        epoch: Epoch,
        /// What to run.
        spec: Arc<SignedTaskSpec>,
    },
    /// The instance of epoch `from` (announced by [`Input::Adopt`]) keeps running as epoch
    /// `epoch`: every later report about it carries `epoch`.
    AdoptTask {
        /// The task.
        task: TaskId,
        /// The epoch it was started for.
        from: Epoch,
        /// The epoch it runs under from now on.
        epoch: Epoch,
    },
    /// Stop the instance of this epoch at once.
    StopTask {
        /// The task.
        task: TaskId,
        /// The epoch of the instance to stop.
        epoch: Epoch,
        /// Why.
        reason: StopReason,
    },
}

/// Why an input was refused, and whether anything changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// Some deltas of a message broke a rule and were dropped; the others were merged.
    #[error(
        "{rejected} of {total} deltas rejected ({applied} merged, {forged} forged); first: {first}"
    )]
    Rejected {
        /// Dropped.
        rejected: usize,
        /// Of those, the ones no honest node could have sent (`DeltaError::is_forgery`):
        /// the sender is hostile or faulty.
        forged: usize,
        /// Merged.
        applied: usize,
        /// In the message.
        total: usize,
        /// The first reason.
        first: DeltaError,
    },
    /// A submitted spec failed verification; nothing changed.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Bytes from a peer did not decode; nothing changed.
    #[error("malformed message: {0}")]
    Malformed(#[from] DecodeError),
    /// The task is not known here; nothing changed.
    #[error("unknown task {0}")]
    UnknownTask(TaskId),
    /// A revocation not signed by one of this mesh's admission keys; nothing changed.
    #[error("revocation of node {0} refused: not signed by one of this mesh's admission_keys")]
    BadRevocation(String),
    /// A cancel whose signature does not hold or whose key may not submit; nothing changed.
    #[error("cancel of task {0} refused: not signed by a key in authorized_submitters")]
    CancelNotAuthorized(TaskId),
    /// The task already ended; nothing changed.
    #[error("task {task} already ended as {state}")]
    AlreadyEnded {
        /// The task.
        task: TaskId,
        /// How it ended.
        state: omesh_protocol::TaskState,
    },
}

/// Counters a driver exports as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Deltas that changed the state.
    pub deltas_applied: u64,
    /// Deltas already known.
    pub deltas_unchanged: u64,
    /// Deltas about compacted tasks, ignored.
    pub deltas_tombstoned: u64,
    /// Messages that did not decode.
    pub malformed: u64,
    /// Gaps seen in a peer's stamps.
    pub gaps: u64,
    /// Sync requests sent.
    pub syncs_sent: u64,
    /// Sync requests answered.
    pub syncs_served: u64,
    /// Sync replies merged.
    pub syncs_completed: u64,
    /// Sync requests that failed.
    pub syncs_failed: u64,
    /// Sync replies after which the digests still differed with equal version vectors.
    pub digest_mismatches: u64,
    /// Executor reports for an epoch this node no longer owns, ignored.
    pub stale_reports: u64,
    /// Claims made by this node.
    pub claims: u64,
    /// Claims that took over from a lost owner.
    pub failovers: u64,
    /// Instances stopped because a higher epoch won.
    pub fenced: u64,
    /// Instances of this node its guards killed at their deadline (`ExecEvent::Expired`).
    pub guard_expiries: u64,
    /// Instances left running by an earlier incarnation that this one took over.
    pub adopted: u64,
    /// Polls sent about an unreachable owner of an at-most-once task.
    pub polls: u64,
    /// Claims of at-most-once tasks a majority confirmed.
    pub confirms: u64,
    /// Claims of at-most-once tasks handed back because no majority confirmed them.
    pub confirms_refused: u64,
    /// Leases that changed by merge.
    pub lease_changes: u64,
    /// Probes sent (pings and ping requests).
    pub probes_sent: u64,
    /// Pings answered (directly or through others).
    pub probes_acked: u64,
    /// Ping requests dropped because too many were being relayed.
    pub probes_dropped: u64,
    /// Peers this node suspected.
    pub suspicions: u64,
    /// Suspicions of this node it refuted with a newer record.
    pub refutations: u64,
    /// Node records this node published.
    pub records_published: u64,
    /// Times this node's overload verdict went from clear to overloaded.
    pub overload_entered: u64,
    /// Times this node's overload verdict went from overloaded to clear.
    pub overload_left: u64,
    /// Entries of sync replies' version vectors not adopted: an origin with no record held
    /// here, or a stamp past the incarnation its record names.
    pub vector_entries_refused: u64,
    /// Held-back deltas (see `DeltaError::is_early`) that merged once what they build on came.
    pub early_applied: u64,
    /// Held-back deltas dropped to make room (the hold is bounded); a later full sync brings
    /// back any that were honest.
    pub early_dropped: u64,
    /// Deltas refused on arrival, by the rule they broke (see [`Rejections`]); those that
    /// may only be early are held back and counted again in `early_applied` if they merge.
    pub rejections: Rejections,
    /// Probe acks dropped: an unknown nonce, or from a node that was neither probed nor
    /// asked to help.
    pub probe_acks_refused: u64,
}

/// Deltas rejected, per reason (`DeltaError::reason`), in a fixed table so `Stats` stays a
/// plain copyable value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rejections([u64; REJECTION_REASONS.len()]);

/// Every reason a delta is rejected for, as `DeltaError::reason` names it.
pub const REJECTION_REASONS: [&str; 16] = [
    "node_not_own",
    "lease_not_owner",
    "status_not_reporter",
    "spec_invalid",
    "bad_signature",
    "not_admitted",
    "unknown_task",
    "epoch_jump",
    "status_not_epoch_owner",
    "cancel_not_authorized",
    "compact_not_ended",
    "quota",
    "bad_revocation",
    "over_limit",
    "revoked",
    "bad_certificate",
];

impl Rejections {
    /// Counts one rejection for `reason` (one of [`REJECTION_REASONS`]).
    pub fn count(&mut self, reason: &str) {
        let i = REJECTION_REASONS.iter().position(|r| *r == reason);
        debug_assert!(i.is_some(), "{reason} is missing from REJECTION_REASONS");
        if let Some(i) = i {
            self.0[i] += 1;
        }
    }

    /// Deltas rejected for any reason.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The count for `reason`.
    pub fn get(&self, reason: &str) -> u64 {
        REJECTION_REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.0[i])
    }

    /// Every reason with its count.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        REJECTION_REASONS
            .iter()
            .copied()
            .zip(self.0.iter().copied())
    }
}
