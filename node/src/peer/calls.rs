//! Calls from the status API: status, peers, tasks, submit, cancel, logs, block lists,
//! image pulls.

use axum::http::StatusCode;
use libp2p::PeerId;
use omesh_protocol::{SignedTaskSpec, TaskId, TaskState};
use omesh_state::{Input, InputError};
use tracing::info;

use super::net;
use super::Peer;
use crate::api::{ApiCall, ApiError, EpochJson, PeerView, StatusView, TaskJson};

impl Peer {
    pub(super) fn on_call(&mut self, call: ApiCall) {
        let now = self.driver.now();
        match call {
            ApiCall::Status(tx) => {
                let (peers_known, peers_alive) = self.driver.replica().node_counts(now);
                let _ = tx.send(StatusView {
                    node_id: self.driver.replica().id().to_hex(),
                    peer_id: self.local_peer.to_string(),
                    incarnation: self.incarnation,
                    version: env!("CARGO_PKG_VERSION").into(),
                    ready: self.ready,
                    peers_known,
                    peers_alive,
                    peers_connected: self.swarm.connected_peers().count(),
                    digest: self.driver.replica().digest().to_string(),
                    tasks: self.driver.replica().state().task_count(),
                    listen_addrs: self.listen_addrs.iter().map(ToString::to_string).collect(),
                    uptime_ms: self.driver.clock().uptime_ms(),
                    overloaded: self.driver.replica().is_overloaded(),
                    admission: if self.gate.is_open() {
                        "open".into()
                    } else {
                        "admitted".into()
                    },
                    admission_keys: self.gate.keys().len(),
                    admitted_peers: self.gate.admitted_count(),
                    admission_cert_expires_ms: self.gate.own_cert().map(|c| c.not_after_ms),
                });
            }
            ApiCall::Peers(tx) => {
                let me = self.driver.replica().id();
                let views = self
                    .driver
                    .replica()
                    .state()
                    .nodes()
                    .map(|n| PeerView {
                        id: n.id.to_hex(),
                        peer_id: net::peer_id_of(&n.id)
                            .map(|p| p.to_string())
                            .unwrap_or_default(),
                        is_self: n.id == me,
                        addresses: n.addrs.clone(),
                        tags: n.tags.iter().cloned().collect(),
                        cpu_percent: f64::from(n.load.cpu_permille) / 10.0,
                        mem_percent: f64::from(n.load.mem_permille) / 10.0,
                        overloaded: n.overloaded,
                        cpu_millis: n.capacity.cpu_millis,
                        rtt_ms: self
                            .driver
                            .replica()
                            .rtt(&n.id)
                            .map(|r| r.srtt_us as f64 / 1000.0),
                        health: self.driver.replica().health(now, &n.id).name().into(),
                        last_heard_ms_ago: self
                            .driver
                            .replica()
                            .last_heard(&n.id)
                            .map(|t| now.saturating_sub(t)),
                        suspected_ms_ago: self
                            .driver
                            .replica()
                            .suspected_since(&n.id)
                            .map(|t| now.saturating_sub(t)),
                        incarnation: n.incarnation,
                        images: n
                            .images
                            .iter()
                            .map(|d| format!("sha256:{}", d.to_hex()))
                            .collect(),
                        digest_agrees: self.digest_agreement.get(&n.id).map(|(a, _)| *a),
                        digest_compared_ms_ago: self
                            .digest_agreement
                            .get(&n.id)
                            .map(|(_, at)| now.saturating_sub(*at)),
                    })
                    .collect();
                let _ = tx.send(views);
            }
            ApiCall::Tasks(tx) => {
                let views = self
                    .driver
                    .replica()
                    .task_views(now)
                    .iter()
                    .map(|v| self.with_progress(task_json(v)))
                    .collect();
                let _ = tx.send(views);
            }
            ApiCall::Submit(spec, tx) => {
                let _ = tx.send(self.submit(*spec));
            }
            ApiCall::Cancel(task, tx) => {
                let _ = tx.send(self.cancel(task));
            }
            ApiCall::Revoke(r, tx) => {
                let result = self.driver.feed(Input::Revoke(r));
                self.drain();
                let _ = tx.send(result.map_err(|e| match e {
                    InputError::BadRevocation(_) => {
                        ApiError::new(StatusCode::FORBIDDEN, e.to_string())
                    }
                    other => ApiError::new(StatusCode::BAD_REQUEST, other.to_string()),
                }));
            }
            ApiCall::Logs { task, offset, tx } => self.logs(task, offset, tx),
            ApiCall::Block(peers, tx) => {
                self.blocked = peers.into_iter().collect();
                let blocked: Vec<PeerId> = self.blocked.iter().copied().collect();
                for p in blocked {
                    let _ = self.swarm.disconnect_peer_id(p);
                }
                info!(blocked = self.blocked.len(), "peer block list set");
                let _ = tx.send(());
            }
            ApiCall::Propagation(tx) => {
                let samples = self
                    .recent_propagation
                    .iter()
                    .map(|s| crate::api::PropagationJson {
                        origin: s.origin.to_hex(),
                        seq: s.seq,
                        written_at_ms: s.written_at_ms,
                        merged_at_ms: s.merged_at_ms,
                    })
                    .collect();
                let _ = tx.send(samples);
            }
            ApiCall::Task(id, tx) => {
                let view = self.driver.replica().task_view(now, &id);
                let _ = tx.send(view.as_ref().map(|v| self.with_progress(task_json(v))));
            }
            ApiCall::PullImage(image, tx) => {
                let _ = tx.send(self.images.pull(image));
            }
            ApiCall::Pulls(tx) => {
                let _ = tx.send(self.images.pulls());
            }
        }
    }

    fn submit(&mut self, spec: SignedTaskSpec) -> Result<TaskId, ApiError> {
        let now = self.driver.now();
        let result = self.driver.replica_mut().submit(now, spec);
        self.drain();
        result.map_err(|e| match e {
            InputError::Spec(e) => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
            other => ApiError::new(StatusCode::BAD_REQUEST, other.to_string()),
        })
    }

    fn cancel(&mut self, order: omesh_protocol::SignedCancel) -> Result<(), ApiError> {
        let result = self.driver.feed(Input::Cancel(order));
        self.drain();
        result.map_err(|e| match e {
            InputError::UnknownTask(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            InputError::AlreadyEnded { .. } => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            InputError::CancelNotAuthorized(_) => {
                ApiError::new(StatusCode::FORBIDDEN, e.to_string())
            }
            other => ApiError::new(StatusCode::BAD_REQUEST, other.to_string()),
        })
    }

    /// Adds the progress of the image fetch this node runs for the task, if any.
    fn with_progress(&self, mut t: TaskJson) -> TaskJson {
        t.progress = t.id.parse().ok().and_then(|id| self.images.progress(&id));
        if let Some(p) = t
            .progress
            .as_ref()
            .filter(|_| t.code == TaskState::Pending.code())
        {
            // What the start waits for, in the words of the one node that knows.
            t.pending_reason = Some(format!("starting on {}: {p}", self.node_id.short()));
        }
        t
    }
}

use crate::api::DisconnectJson;

fn task_json(v: &omesh_state::TaskView) -> TaskJson {
    TaskJson {
        id: v.id.to_hex(),
        state: v.state.name().into(),
        code: v.state.code(),
        epoch: v.epoch,
        owner: v.owner.map(|o| o.to_hex()),
        failed_attempts: v.failed_attempts,
        exit_code: v.exit_code,
        error: v.error.clone(),
        // What an operator asks of a pending task is what it waits for: once claimed, its
        // start, whatever placement said before.
        pending_reason: v.starting.clone().or_else(|| v.pending_reason.clone()),
        image: v
            .spec
            .as_ref()
            .map(|s| s.spec.image.clone())
            .filter(|i| !i.is_empty()),
        command: v
            .spec
            .as_ref()
            .map(|s| s.spec.command.clone())
            .unwrap_or_default(),
        history: v
            .history
            .iter()
            .map(|(epoch, e)| EpochJson {
                epoch: *epoch,
                state: e.state.name().into(),
                exit_code: e.exit_code,
                error: e.error.clone(),
                reporter: e.reporter.to_hex(),
                at_ms: e.at_ms,
            })
            .collect(),
        compacted: v.compacted,
        progress: None,
        disconnect: v
            .spec
            .as_ref()
            .map(|s| DisconnectJson::from(s.spec.disconnect))
            .unwrap_or_default(),
    }
}
