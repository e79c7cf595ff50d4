//! Task logs: served from this node's files to the API and to other peers, and fetched from
//! a task's owner over `/omesh/logs/1`.

use std::io::{Read, Seek, SeekFrom};

use axum::http::StatusCode;
use libp2p::request_response;
use omesh_protocol::blob::MAX_LOG_CHUNK;
use omesh_protocol::{Epoch, LogRequest, LogResponse, TaskId, Wire};
use tokio::sync::oneshot;
use tracing::debug;

use super::net;
use super::Peer;
use crate::api::{ApiError, LogChunk};

/// A log fetch waiting for the owner's answer.
pub(crate) struct PendingLog {
    tx: oneshot::Sender<Result<LogChunk, ApiError>>,
    task: TaskId,
    epoch: Epoch,
    state: String,
}

impl Peer {
    /// Reads a chunk of the local log of `(task, epoch)`.
    fn local_log(
        &self,
        task: &TaskId,
        epoch: Epoch,
        offset: u64,
        max: u32,
    ) -> Option<(Vec<u8>, bool)> {
        let path = self.executor.log_path(task, epoch);
        let mut file = std::fs::File::open(&path).ok()?;
        let mut data = Vec::new();
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = file
                .take(u64::from(max.min(MAX_LOG_CHUNK)))
                .read_to_end(&mut data);
        }
        Some((data, self.executor.is_running(task, epoch)))
    }

    /// Answers a logs call: from the local file when this node owns the task's current epoch,
    /// else from the owner over the logs protocol.
    pub(super) fn logs(
        &mut self,
        task: TaskId,
        offset: u64,
        tx: oneshot::Sender<Result<LogChunk, ApiError>>,
    ) {
        let now = self.driver.now();
        let Some(view) = self.driver.replica().task_view(now, &task) else {
            let _ = tx.send(Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no task {task}"),
            )));
            return;
        };
        let (Some(owner), epoch) = (view.owner, view.epoch) else {
            let reason = view.pending_reason.map_or_else(
                || "task has not been claimed yet".to_owned(),
                |r| format!("task has no owner: {r}"),
            );
            let _ = tx.send(Err(ApiError::new(StatusCode::CONFLICT, reason)));
            return;
        };
        let state = view.state.name().to_owned();
        if owner == self.node_id {
            let reply = match self.local_log(&task, epoch, offset, MAX_LOG_CHUNK) {
                Some((data, running)) => Ok(LogChunk::new(
                    task, epoch, owner, offset, &data, running, state,
                )),
                None => Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no log for epoch {epoch} yet"),
                )),
            };
            let _ = tx.send(reply);
            return;
        }
        let Some(peer) = net::peer_id_of(&owner) else {
            let _ = tx.send(Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "owner has no peer id",
            )));
            return;
        };
        let req = LogRequest {
            task,
            epoch,
            offset,
            max: MAX_LOG_CHUNK,
        };
        match req.to_wire() {
            Ok(bytes) => {
                let addrs = self.addr_book.get(&peer).cloned().unwrap_or_default();
                let id = self
                    .swarm
                    .behaviour_mut()
                    .logs
                    .send_request_with_addresses(&peer, bytes, addrs);
                self.pending_logs.insert(
                    id,
                    PendingLog {
                        tx,
                        task,
                        epoch,
                        state,
                    },
                );
            }
            Err(e) => {
                let _ = tx.send(Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    e.to_string(),
                )));
            }
        }
    }

    pub(super) fn on_logs_event(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    // Logs go to admitted members only: with admission keys (or
                    // allowed_peers) no other peer gets a connection past the allow list,
                    // and this re-checks one whose admission lapsed or was revoked since.
                    // (The API's own logs endpoint needs the bearer token.)
                    if !self.permits(&peer) {
                        return;
                    }
                    let response = match LogRequest::from_wire(&request) {
                        Ok(req) => {
                            match self.local_log(&req.task, req.epoch, req.offset, req.max) {
                                Some((data, running)) => LogResponse::Chunk {
                                    offset: req.offset,
                                    data,
                                    running,
                                },
                                None => LogResponse::NotFound,
                            }
                        }
                        Err(e) => {
                            self.count_malformed("logs_request");
                            debug!(%peer, error = %e, "malformed log request dropped");
                            return;
                        }
                    };
                    if let Ok(bytes) = response.to_wire() {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .logs
                            .send_response(channel, bytes);
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    let Some(PendingLog {
                        tx,
                        task,
                        epoch,
                        state,
                    }) = self.pending_logs.remove(&request_id)
                    else {
                        return;
                    };
                    let owner = net::node_id_of(&peer).unwrap_or_default();
                    let reply = match LogResponse::from_wire(&response) {
                        Ok(LogResponse::Chunk {
                            offset,
                            data,
                            running,
                        }) => Ok(LogChunk::new(
                            task, epoch, owner, offset, &data, running, state,
                        )),
                        Ok(LogResponse::NotFound) => Err(ApiError::new(
                            StatusCode::NOT_FOUND,
                            "the owner holds no log for this epoch yet",
                        )),
                        Err(e) => {
                            self.count_malformed("logs_response");
                            Err(ApiError::new(
                                StatusCode::BAD_GATEWAY,
                                format!("bad answer from owner: {e}"),
                            ))
                        }
                    };
                    let _ = tx.send(reply);
                }
            },
            request_response::Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            } => {
                if let Some(PendingLog { tx, .. }) = self.pending_logs.remove(&request_id) {
                    let _ = tx.send(Err(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        format!("owner {peer} unreachable: {error}"),
                    )));
                }
            }
            _ => {}
        }
    }
}
