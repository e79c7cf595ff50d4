//! The transport-independent half of driving the replica: feed it inputs at the time a clock
//! gives, and carry out every action it returns through an [`Outputs`].
//!
//! The peer runs this with an `Outputs` over its libp2p swarm and its executor; a test can run
//! several drivers with an in-memory `Outputs` and a manual clock, and so exercise exactly the
//! dispatch code production runs (including the driver's duties, such as answering a
//! `StopTask` for an instance that is not running with `ExecEvent::Stopped`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use omesh_protocol::{
    Epoch, GossipMessage, Millis, NodeId, Probe, SignedTaskSpec, SyncReply, SyncRequest, TaskId,
};
use omesh_state::{Action, ExecEvent, Input, InputError, Replica};
use tracing::info;

/// What a driver needs to know the time: milliseconds, never going back.
pub trait TimeSource {
    /// Now, in ms.
    fn now(&self) -> Millis;
}

/// Milliseconds on a monotonic clock that starts at the wall-clock time of start-up, so
/// timelines read like wall time but never jump.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
    start_wall_ms: Millis,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        Self {
            start: Instant::now(),
            start_wall_ms: u64::try_from(wall).unwrap_or(0),
        }
    }

    /// Now, in ms.
    pub fn now(&self) -> Millis {
        self.start_wall_ms + u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The instant at which the clock reads `t`.
    pub fn instant_at(&self, t: Millis) -> tokio::time::Instant {
        let offset = t.saturating_sub(self.start_wall_ms);
        tokio::time::Instant::from_std(self.start + Duration::from_millis(offset))
    }

    /// Milliseconds since start.
    pub fn uptime_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl TimeSource for Clock {
    fn now(&self) -> Millis {
        Self::now(self)
    }
}

/// Where a driver's actions go: the network and the executor of one node.
pub trait Outputs {
    /// Gossips `msg` to the mesh (best effort; anti-entropy repairs a loss).
    fn publish(&mut self, msg: &GossipMessage);
    /// Sends an anti-entropy request. `false`: it could not be sent, and the driver feeds
    /// `Input::SyncFailed` at once.
    fn send_sync(&mut self, to: NodeId, request: &SyncRequest) -> bool;
    /// Answers the oldest sync request still open from `to` (nothing if none is open).
    fn reply_sync(&mut self, to: NodeId, reply: &SyncReply);
    /// Sends a liveness probe (or ack); an unanswered one is what the replica watches for.
    fn send_probe(&mut self, to: NodeId, probe: Probe);
    /// Starts an instance of `(task, epoch)`; its reports come back as `Input::Executor`.
    fn start_task(&mut self, task: TaskId, epoch: Epoch, spec: Arc<SignedTaskSpec>);
    /// Stops the instance of `(task, epoch)`. `false`: nothing was running, and the driver
    /// answers `ExecEvent::Stopped` at once.
    fn stop_task(&mut self, task: TaskId, epoch: Epoch) -> bool;
    /// Re-keys the adopted instance of `(task, from)` to `epoch`. `false`: it is gone, and
    /// the driver reports the new epoch `Failed` at once.
    fn adopt_task(&mut self, _task: TaskId, _from: Epoch, _epoch: Epoch) -> bool {
        false
    }
    /// The driver answered the replica itself with `input` while draining (a `SyncFailed`
    /// or a `Stopped`): nothing to do in production; a test records it.
    fn answered(&mut self, _input: &Input) {}
}

/// A replica with the clock it is fed by, and the one dispatch of its actions.
pub struct ReplicaDriver<C = Clock> {
    replica: Replica,
    clock: C,
}

impl<C: TimeSource> ReplicaDriver<C> {
    /// Drives `replica` with time from `clock`.
    pub fn new(replica: Replica, clock: C) -> Self {
        Self { replica, clock }
    }

    /// The replica, for queries.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The replica, for calls that are not inputs (submit); call [`Self::drain`] after.
    pub fn replica_mut(&mut self) -> &mut Replica {
        &mut self.replica
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Now, on the driver's clock.
    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    /// Hands `input` to the replica at the clock's now. Call [`Self::drain`] after.
    pub fn feed(&mut self, input: Input) -> Result<(), InputError> {
        let now = self.clock.now();
        self.replica.handle(now, input)
    }

    /// Carries out every action the replica has queued, through `out`.
    pub fn drain(&mut self, out: &mut impl Outputs) {
        while let Some(action) = self.replica.poll_action() {
            match action {
                Action::Publish(msg) => out.publish(&msg),
                Action::SendSync { to, request } => {
                    if !out.send_sync(to, &request) {
                        self.answer(out, Input::SyncFailed { peer: to });
                    }
                }
                Action::ReplySync { to, reply } => out.reply_sync(to, &reply),
                Action::SendProbe { to, probe } => out.send_probe(to, probe),
                Action::StartTask { task, epoch, spec } => {
                    info!(task = %task.short(), epoch, "starting task");
                    out.start_task(task, epoch, spec);
                }
                Action::AdoptTask { task, from, epoch } => {
                    info!(task = %task.short(), from, epoch, "adopting task instance");
                    if !out.adopt_task(task, from, epoch) {
                        let gone = Input::Executor {
                            task,
                            epoch,
                            event: ExecEvent::Failed {
                                error: "the instance left by the previous incarnation is gone"
                                    .into(),
                            },
                        };
                        self.answer(out, gone);
                    }
                }
                Action::StopTask {
                    task,
                    epoch,
                    reason,
                } => {
                    info!(task = %task.short(), epoch, ?reason, "stopping task");
                    if !out.stop_task(task, epoch) {
                        // Nothing runs (never started, or already ended): say so at once.
                        let stopped = Input::Executor {
                            task,
                            epoch,
                            event: ExecEvent::Stopped,
                        };
                        self.answer(out, stopped);
                    }
                }
            }
        }
    }

    /// An input the driver itself owes the replica while draining; what it queues is
    /// carried out by the same drain.
    fn answer(&mut self, out: &mut impl Outputs, input: Input) {
        out.answered(&input);
        let now = self.clock.now();
        // The replica accepts both answers in every state; a refusal is nothing to act on.
        let _ = self.replica.handle(now, input);
    }
}
