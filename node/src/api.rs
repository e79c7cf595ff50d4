//! The local status API (axum). Any peer answers for the whole mesh from its replica.
//!
//! Handlers never touch the replica: they send an [`ApiCall`] to the driver over a bounded
//! channel and await the answer. A full channel answers 503 rather than queueing forever.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use omesh_protocol::{NodeId, SignedTaskSpec, TaskId, TaskSpec};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

/// Status of the answering node and its view of the mesh.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    /// Node id (hex ed25519 public key).
    pub node_id: String,
    /// libp2p peer id.
    pub peer_id: String,
    /// Restart counter.
    pub incarnation: u64,
    /// omesh version.
    pub version: String,
    /// Joined a mesh (or told it is alone) and synced.
    pub ready: bool,
    /// Nodes with a record, this one included.
    pub peers_known: usize,
    /// Nodes judged alive, this one included.
    pub peers_alive: usize,
    /// Open connections.
    pub peers_connected: usize,
    /// State digest (hex).
    pub digest: String,
    /// Tasks known.
    pub tasks: usize,
    /// Listen addresses.
    pub listen_addrs: Vec<String>,
    /// Milliseconds since start.
    pub uptime_ms: u64,
    /// Whether this node is over its thresholds.
    pub overloaded: bool,
    /// `open` (no admission keys: any peer that reaches the mesh joins) or `admitted`.
    #[serde(default)]
    pub admission: String,
    /// How many admission keys this node trusts.
    #[serde(default)]
    pub admission_keys: usize,
    /// Peers admitted by a certificate this node verified.
    #[serde(default)]
    pub admitted_peers: usize,
    /// When this node's own certificate lapses (Unix ms), if it holds one.
    #[serde(default)]
    pub admission_cert_expires_ms: Option<u64>,
}

/// One peer as seen from the answering node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerView {
    /// Node id (hex).
    pub id: String,
    /// libp2p peer id.
    pub peer_id: String,
    /// Whether this is the answering node.
    pub is_self: bool,
    /// Listen addresses it advertises.
    pub addresses: Vec<String>,
    /// Its tags.
    pub tags: Vec<String>,
    /// CPU utilisation, percent.
    pub cpu_percent: f64,
    /// Memory utilisation, percent.
    pub mem_percent: f64,
    /// Its own overload verdict (above a threshold, with hysteresis): it takes no new work.
    #[serde(default)]
    pub overloaded: bool,
    /// The CPU it offers, in thousandths of a core (its cgroup quota when it runs under one).
    #[serde(default)]
    pub cpu_millis: u32,
    /// Smoothed RTT from here, milliseconds.
    pub rtt_ms: Option<f64>,
    /// alive, suspect or gone.
    pub health: String,
    /// Milliseconds since this peer last heard from it (a message, or a newer record).
    pub last_heard_ms_ago: Option<u64>,
    /// Milliseconds since a suspicion of it (it stopped answering probes) reached this peer;
    /// none while it is not suspected. Its leases are lost at ttl + grace past this.
    #[serde(default)]
    pub suspected_ms_ago: Option<u64>,
    /// Its incarnation.
    pub incarnation: u64,
    /// Digests of the image blobs it holds (`sha256:<hex>`), as its record says.
    #[serde(default)]
    pub images: Vec<String>,
    /// Whether its state digest equalled this node's at their last sync exchange (a request
    /// from it, or its reply merged here); none before any exchange, and for this node.
    #[serde(default)]
    pub digest_agrees: Option<bool>,
    /// Milliseconds since that exchange.
    #[serde(default)]
    pub digest_compared_ms_ago: Option<u64>,
}

/// One task as seen from the answering node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskJson {
    /// Task id (hex).
    pub id: String,
    /// State name.
    pub state: String,
    /// State code (100, 200, 300, 400, 499).
    pub code: u16,
    /// Current lease epoch.
    pub epoch: u64,
    /// Current owner (hex node id).
    pub owner: Option<String>,
    /// Attempts that failed.
    pub failed_attempts: u32,
    /// Exit code of the last ended attempt.
    pub exit_code: Option<i32>,
    /// Error of the last ended attempt.
    pub error: String,
    /// Why it is still pending.
    pub pending_reason: Option<String>,
    /// Image reference.
    pub image: Option<String>,
    /// Command.
    pub command: Vec<String>,
    /// Per epoch: state and reporter.
    pub history: Vec<EpochJson>,
    /// Only a tombstone remains.
    pub compacted: bool,
    /// While the owner fetches the task's image from peers: how far it got (only the
    /// owner's API knows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// The task's disconnect policy.
    #[serde(default)]
    pub disconnect: DisconnectJson,
}

/// A task's disconnect policy as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisconnectJson {
    /// `replace` (default, at least once), `stop_after` (at most once) or `lost_after`, or
    /// both of the last two.
    pub policy: String,
    /// At most once: the owner stops its instance after this long out of contact with a
    /// majority.
    pub stop_after_ms: Option<u32>,
    /// Not replaced until the owner has been unreachable this long.
    pub lost_after_ms: Option<u32>,
}

impl From<omesh_protocol::Disconnect> for DisconnectJson {
    fn from(d: omesh_protocol::Disconnect) -> Self {
        let policy = match (d.stop_after_ms, d.lost_after_ms) {
            (None, None) => "replace",
            (Some(_), None) => "stop_after",
            (None, Some(_)) => "lost_after",
            (Some(_), Some(_)) => "stop_after+lost_after",
        };
        Self {
            policy: policy.into(),
            stop_after_ms: d.stop_after_ms,
            lost_after_ms: d.lost_after_ms,
        }
    }
}

/// What one epoch of a task reached.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochJson {
    /// The epoch.
    pub epoch: u64,
    /// State name.
    pub state: String,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Error text.
    pub error: String,
    /// Reporter node (hex).
    pub reporter: String,
    /// Reporter's clock, ms.
    pub at_ms: u64,
}

/// A question for the driver.
#[derive(Debug)]
pub enum ApiCall {
    /// Node status.
    Status(oneshot::Sender<StatusView>),
    /// Peers.
    Peers(oneshot::Sender<Vec<PeerView>>),
    /// All tasks.
    Tasks(oneshot::Sender<Vec<TaskJson>>),
    /// One task.
    Task(TaskId, oneshot::Sender<Option<TaskJson>>),
    /// Recent propagation samples.
    Propagation(oneshot::Sender<Vec<PropagationJson>>),
    /// Submit a signed spec.
    Submit(
        Box<SignedTaskSpec>,
        oneshot::Sender<Result<TaskId, ApiError>>,
    ),
    /// Spread an operator's revocation of a node through the mesh.
    Revoke(
        omesh_protocol::Revocation,
        oneshot::Sender<Result<(), ApiError>>,
    ),
    /// Cancel a task everywhere, on the submitter's signed order.
    Cancel(
        omesh_protocol::SignedCancel,
        oneshot::Sender<Result<(), ApiError>>,
    ),
    /// A chunk of a task's log, from its owner.
    Logs {
        /// The task.
        task: TaskId,
        /// First byte wanted.
        offset: u64,
        /// Where the answer goes.
        tx: oneshot::Sender<Result<LogChunk, ApiError>>,
    },
    /// Test-only fault injection: refuse these peers entirely.
    Block(Vec<libp2p::PeerId>, oneshot::Sender<()>),
    /// Pull an image from peers into the local blob store.
    PullImage(
        omesh_protocol::ImageRef,
        oneshot::Sender<crate::images::PullJson>,
    ),
    /// Pulls asked for, with their progress.
    Pulls(oneshot::Sender<Vec<crate::images::PullJson>>),
}

/// The body of `POST /api/v1/images/pull`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullBody {
    /// The image, pinned by digest: `name@sha256:<hex>`.
    pub image: String,
}

/// The body of `POST /api/v1/tasks`: a spec and its submitter's signature. A field the peer
/// does not know (here or in the spec) is refused, not ignored: a submitter who asked for
/// `"privileged": true` must learn that nothing grants it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    /// The spec, as signed.
    pub spec: TaskSpec,
    /// ed25519 signature over the spec's canonical encoding, hex.
    pub signature: String,
}

impl SubmitBody {
    /// The body for a signed spec.
    pub fn from_signed(s: &SignedTaskSpec) -> Self {
        Self {
            spec: s.spec.clone(),
            signature: hex::encode(&s.signature),
        }
    }
}

/// The body of `DELETE /api/v1/tasks/{id}`: the submitter's signed order to cancel (made by
/// `omesh cancel --key`), since no peer may cancel what it was not told to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    /// The submitter's ed25519 public key, hex.
    pub submitter: String,
    /// Its signature over the cancel of this task, hex.
    pub signature: String,
}

impl CancelBody {
    /// The body for a cancel of `task` signed by `key`.
    pub fn sign(key: &ed25519_dalek::SigningKey, task: TaskId) -> Self {
        let c = omesh_protocol::SignedCancel::sign(key, task);
        Self {
            submitter: hex::encode(c.submitter),
            signature: hex::encode(c.sig.0),
        }
    }

    fn order(&self, task: TaskId) -> Result<omesh_protocol::SignedCancel, ApiError> {
        let bad = |what: &str| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("cancel body: {what} is not hex of the right length"),
            )
        };
        let submitter: [u8; 32] = hex::decode(self.submitter.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("submitter (32 bytes)"))?;
        let sig: [u8; 64] = hex::decode(self.signature.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("signature (64 bytes)"))?;
        Ok(omesh_protocol::SignedCancel {
            task,
            submitter,
            sig: omesh_protocol::Sig(sig),
        })
    }
}

/// A piece of a task's log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogChunk {
    /// Task (hex).
    pub task: String,
    /// Epoch whose log this is.
    pub epoch: u64,
    /// The owner that served it (hex).
    pub owner: String,
    /// Offset of `data`.
    pub offset: u64,
    /// Offset to ask for next.
    pub next_offset: u64,
    /// The bytes, as UTF-8 (invalid sequences replaced).
    pub data: String,
    /// The instance still runs: more may come.
    pub running: bool,
    /// The task's state.
    pub state: String,
}

impl LogChunk {
    /// A chunk of `data` at `offset`.
    pub fn new(
        task: TaskId,
        epoch: u64,
        owner: NodeId,
        offset: u64,
        data: &[u8],
        running: bool,
        state: String,
    ) -> Self {
        Self {
            task: task.to_hex(),
            epoch,
            owner: owner.to_hex(),
            offset,
            next_offset: offset + data.len() as u64,
            data: String::from_utf8_lossy(data).into_owned(),
            running,
            state,
        }
    }
}

/// The body of `POST /api/v1/debug/block`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockBody {
    /// Peer ids to refuse (empty: heal).
    pub peers: Vec<String>,
}

/// A node record merged here, with the writer's and this node's clocks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PropagationJson {
    /// Writer (hex node id).
    pub origin: String,
    /// The delta's sequence number at its writer.
    pub seq: u64,
    /// Writer's clock when written, ms.
    pub written_at_ms: u64,
    /// This node's clock when merged, ms.
    pub merged_at_ms: u64,
}

/// What handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// To the driver.
    pub calls: mpsc::Sender<ApiCall>,
    /// The metrics registry.
    pub metrics: Arc<Mutex<Metrics>>,
    /// Bearer token for mutations and task logs (none: both refused).
    pub token: Option<String>,
}

/// What a bearer token guards: `mutations`, and reads of what tasks print.
#[derive(Debug, Clone, Copy)]
enum Guarded {
    /// Submit, cancel, revoke, pull, block.
    Mutations,
    /// Task logs: a task's output may hold its secrets.
    Logs,
}

/// Checks the bearer token of a mutation or a logs read.
fn authorize(
    state: &ApiState,
    headers: &axum::http::HeaderMap,
    what: Guarded,
) -> Result<(), ApiError> {
    let Some(expected) = &state.token else {
        let what = match what {
            Guarded::Mutations => "mutations are",
            Guarded::Logs => "task logs are",
        };
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{what} disabled on this node: it has no api_token (or api_token_file)"),
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_credentials)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing bearer token (Authorization: Bearer ...)",
            )
        })?;
    // Compare without an early exit, so timing does not tell how much matched.
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong bearer token",
        ))
    }
}

/// The credentials of an `Authorization: Bearer <token>` value. The scheme is matched without
/// regard to case (RFC 7235 §2.1: `bearer` and `BEARER` are `Bearer`).
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_start_matches(' '))
}

fn parse_task_id(id: &str) -> Result<TaskId, ApiError> {
    id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a task id (64 hex characters)"),
        )
    })
}

async fn submit(
    State(s): State<ApiState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, Guarded::Mutations)?;
    let body: SubmitBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid task body: {e}")))?;
    let signature = hex::decode(body.signature.trim())
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "signature is not hex"))?;
    let spec = SignedTaskSpec {
        spec: body.spec,
        signature,
    };
    let id = ask(&s, |tx| ApiCall::Submit(Box::new(spec), tx)).await??;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "id": id.to_hex() })),
    )
        .into_response())
}

async fn cancel(
    State(s): State<ApiState>,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&s, &headers, Guarded::Mutations)?;
    let id = parse_task_id(&id)?;
    if body.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "a cancel must be signed by a submitter key: send {\"submitter\", \"signature\"} (omesh cancel --key FILE does)",
        ));
    }
    let body: CancelBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid cancel body: {e}")))?;
    let order = body.order(id)?;
    ask(&s, |tx| ApiCall::Cancel(order, tx)).await??;
    Ok(Json(
        serde_json::json!({ "id": id.to_hex(), "cancelled": true }),
    ))
}

/// The body of `POST /api/v1/revocations`: a revocation as `omesh revoke` prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    /// The revocation's wire encoding, hex.
    pub revocation: String,
}

async fn revoke(
    State(s): State<ApiState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    use omesh_protocol::Wire;
    authorize(&s, &headers, Guarded::Mutations)?;
    let body: RevokeBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid revocation body: {e}"),
        )
    })?;
    let bytes = hex::decode(body.revocation.trim())
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "revocation is not hex"))?;
    let revocation = omesh_protocol::Revocation::from_wire(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("revocation does not decode: {e}"),
        )
    })?;
    ask(&s, |tx| ApiCall::Revoke(revocation, tx)).await??;
    Ok(Json(serde_json::json!({
        "node": revocation.node.to_hex(),
        "revoked": true,
    })))
}

/// Query of the logs endpoint.
#[derive(Debug, Deserialize)]
pub struct LogQuery {
    /// First byte wanted.
    #[serde(default)]
    pub offset: u64,
}

async fn logs(
    State(s): State<ApiState>,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<LogQuery>,
) -> Result<Json<LogChunk>, ApiError> {
    authorize(&s, &headers, Guarded::Logs)?;
    let task = parse_task_id(&id)?;
    let chunk = ask(&s, |tx| ApiCall::Logs {
        task,
        offset: q.offset,
        tx,
    })
    .await??;
    Ok(Json(chunk))
}

async fn pull_image(
    State(s): State<ApiState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, Guarded::Mutations)?;
    let body: PullBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid pull body: {e}")))?;
    let image = omesh_protocol::ImageRef::parse(&body.image)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let pull = ask(&s, |tx| ApiCall::PullImage(image, tx)).await?;
    Ok((StatusCode::ACCEPTED, Json(pull)).into_response())
}

async fn pulls(State(s): State<ApiState>) -> Result<Json<Vec<crate::images::PullJson>>, ApiError> {
    Ok(Json(ask(&s, ApiCall::Pulls).await?))
}

async fn block(
    State(s): State<ApiState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&s, &headers, Guarded::Mutations)?;
    let body: BlockBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid block body: {e}")))?;
    let mut peers = Vec::new();
    for p in &body.peers {
        peers.push(p.parse::<libp2p::PeerId>().map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{p:?} is not a peer id: {e}"),
            )
        })?);
    }
    let n = peers.len();
    ask(&s, |tx| ApiCall::Block(peers, tx)).await?;
    Ok(Json(serde_json::json!({ "blocked": n })))
}

/// An API error: JSON with a reason.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    reason: String,
}

impl ApiError {
    /// An error with `status` and `reason`.
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.reason })),
        )
            .into_response()
    }
}

async fn ask<T>(
    state: &ApiState,
    make: impl FnOnce(oneshot::Sender<T>) -> ApiCall,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    state.calls.try_send(make(tx)).map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node is busy or shutting down",
        )
    })?;
    tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "node did not answer in 5 s",
            )
        })?
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "node is shutting down"))
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn ready(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let st = ask(&s, ApiCall::Status).await?;
    let code = if st.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((
        code,
        Json(serde_json::json!({ "ready": st.ready, "peers_alive": st.peers_alive })),
    )
        .into_response())
}

async fn metrics(State(s): State<ApiState>, headers: axum::http::HeaderMap) -> Response {
    let openmetrics = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let text = match s.metrics.lock() {
        Ok(m) => m.encode(),
        Err(poisoned) => poisoned.into_inner().encode(),
    };
    if openmetrics {
        let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8";
        ([(axum::http::header::CONTENT_TYPE, ct)], text).into_response()
    } else {
        let ct = "text/plain; version=0.0.4; charset=utf-8";
        (
            [(axum::http::header::CONTENT_TYPE, ct)],
            crate::metrics::to_classic(&text),
        )
            .into_response()
    }
}

async fn status(State(s): State<ApiState>) -> Result<Json<StatusView>, ApiError> {
    Ok(Json(ask(&s, ApiCall::Status).await?))
}

async fn peers(State(s): State<ApiState>) -> Result<Json<Vec<PeerView>>, ApiError> {
    Ok(Json(ask(&s, ApiCall::Peers).await?))
}

async fn tasks(State(s): State<ApiState>) -> Result<Json<Vec<TaskJson>>, ApiError> {
    Ok(Json(ask(&s, ApiCall::Tasks).await?))
}

async fn task(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<TaskJson>, ApiError> {
    let id = parse_task_id(&id)?;
    ask(&s, |tx| ApiCall::Task(id, tx))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no task {id}")))
}

async fn propagation(State(s): State<ApiState>) -> Result<Json<Vec<PropagationJson>>, ApiError> {
    Ok(Json(ask(&s, ApiCall::Propagation).await?))
}

/// Turns every error answer that is not JSON yet (axum's own rejections: a body over the
/// limit (413), a query string that does not parse (400), a wrong method (405)) into
/// `{"error": reason}` with the same status, so clients parse one shape.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    // Rejection texts are short; a long one is cut, not buffered whole.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let reason = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_lowercase()
    } else {
        text
    };
    let mut out = ApiError::new(status, reason).into_response();
    for (name, value) in &parts.headers {
        // Keep what tells the client how to go on (Allow on a 405, and the like).
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

/// The router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/peers", get(peers))
        .route("/api/v1/tasks", get(tasks).post(submit))
        .route("/api/v1/tasks/{id}", get(task).delete(cancel))
        .route("/api/v1/tasks/{id}/logs", get(logs))
        .route("/api/v1/revocations", axum::routing::post(revoke))
        .route("/api/v1/images/pull", axum::routing::post(pull_image))
        .route("/api/v1/images/pulls", get(pulls))
        .route("/api/v1/debug/block", axum::routing::post(block))
        .route("/api/v1/debug/propagation", get(propagation))
        .merge(crate::dashboard::routes())
        .fallback(not_found)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}
