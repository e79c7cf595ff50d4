//! The Docker backend: one container per epoch, driven through the engine's API (bollard).
//!
//! A task names its image by digest (`name@sha256:<hex>`). There is no registry: the image
//! must already be in the local engine, either with that image ID or with that repo digest.
//! Each epoch runs as container `omesh-<task short>-<epoch>`, labelled with the task, the epoch
//! and this node, so that a restarted node can find and remove what it left behind.

use std::collections::HashMap;
use std::time::Duration;

use bollard::errors::Error as EngineError;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;
use omesh_protocol::{ExecutorKind, ImageRef, NodeId};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{Adopted, Backend, Ended, ExecError, Instance, Keep, TaskLimits};
use crate::guard::{FromGuard, Guard, GuardEnd, GuardProgram, Plan, Survival, Target, ToGuard};

/// Label carrying the full task id (hex).
pub const LABEL_TASK: &str = "omesh.task";
/// Label carrying the epoch.
pub const LABEL_EPOCH: &str = "omesh.epoch";
/// Label carrying the id (hex) of the node that runs the container.
pub const LABEL_NODE: &str = "omesh.node";

/// How long `connect` waits for the engine to answer.
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a killed container may take to be reported stopped.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// How long the log stream may take to deliver the rest once the container stopped.
const LOG_DRAIN: Duration = Duration::from_secs(10);

/// Runs tasks as containers of the local Docker engine, each confined: no capabilities, no
/// privilege gain through setuid binaries, no network, and CPU, memory (no swap beyond it)
/// and process-count limits that are never unlimited.
#[derive(Debug, Clone)]
pub struct DockerBackend {
    docker: Docker,
    limits: TaskLimits,
    guard: GuardProgram,
}

/// Connects to the local engine (`DOCKER_HOST` if set, else the default unix socket) and
/// checks that it answers. For callers that need the engine only (image imports and loads);
/// tasks run through [`DockerBackend`].
pub async fn connect_engine() -> Result<Docker, ExecError> {
    let docker = Docker::connect_with_defaults().map_err(|e| {
        ExecError::EngineUnreachable(format!("cannot connect to the Docker engine: {e}"))
    })?;
    match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Err(ExecError::EngineUnreachable(format!(
                "Docker engine ping failed: {e}"
            )))
        }
        Err(_) => {
            return Err(ExecError::EngineUnreachable(format!(
                "Docker engine did not answer within {}s",
                PING_TIMEOUT.as_secs()
            )))
        }
    }
    // Talk to older engines in their own API version. If the engine does not say, keep
    // the client as it is: the ping answered.
    let docker = match tokio::time::timeout(PING_TIMEOUT, docker.clone().negotiate_version()).await
    {
        Ok(Ok(negotiated)) => negotiated,
        Ok(Err(e)) => {
            debug!(error = %e, "Docker API version negotiation failed; using the default");
            docker
        }
        Err(_) => docker,
    };
    Ok(docker)
}

impl DockerBackend {
    /// Connects to the local engine (see [`connect_engine`]); containers run under `limits`.
    pub async fn connect(limits: TaskLimits) -> Result<Self, ExecError> {
        Ok(Self {
            docker: connect_engine().await?,
            limits,
            guard: GuardProgram::this_binary(),
        })
    }

    /// Guards run as `program` (a test that runs the backend in its own process names the
    /// `omesh` binary).
    pub fn with_guard(mut self, program: GuardProgram) -> Self {
        self.guard = program;
        self
    }

    /// The container name of an instance.
    pub fn container_name(inst: &Instance) -> String {
        format!("omesh-{}-{}", inst.task.short(), inst.epoch)
    }

    /// The local image ID to run for `image`: the image whose ID is the digest, or one whose
    /// repo digests name it.
    async fn resolve_image(&self, image: &ImageRef) -> Result<String, ExecError> {
        let id = format!("sha256:{}", image.digest);
        match self.docker.inspect_image(&id).await {
            Ok(found) => return Ok(found.id.unwrap_or(id)),
            Err(e) if is_not_found(&e) => {}
            Err(source) => {
                return Err(ExecError::Engine {
                    what: format!("inspect image {id}"),
                    source,
                })
            }
        }
        let reference = image.to_string();
        let suffix = format!("@{id}");
        match self.docker.inspect_image(&reference).await {
            Ok(found)
                if found
                    .repo_digests
                    .as_ref()
                    .is_some_and(|d| d.iter().any(|r| r == &reference || r.ends_with(&suffix))) =>
            {
                Ok(found.id.unwrap_or(reference))
            }
            Ok(_) => Err(ExecError::ImageMissing { id }),
            Err(e) if is_not_found(&e) => Err(ExecError::ImageMissing { id }),
            Err(source) => Err(ExecError::Engine {
                what: format!("inspect image {reference}"),
                source,
            }),
        }
    }

    /// Creates the container; a stale container of the same name that this node left behind
    /// is removed first.
    async fn create(
        &self,
        name: &str,
        body: ContainerCreateBody,
        node: &NodeId,
    ) -> Result<(), ExecError> {
        let options = CreateContainerOptionsBuilder::new().name(name).build();
        match self
            .docker
            .create_container(Some(options.clone()), body.clone())
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if status_of(&e) == Some(409) && self.owned_by(name, node).await => {
                warn!(
                    container = name,
                    "removing a stale container of the same name"
                );
                remove(&self.docker, name)
                    .await
                    .map_err(|source| ExecError::Engine {
                        what: format!("create container {name}: remove stale one"),
                        source,
                    })?;
            }
            Err(source) => {
                return Err(ExecError::Engine {
                    what: format!("create container {name}"),
                    source,
                })
            }
        }
        self.docker
            .create_container(Some(options), body)
            .await
            .map(|_| ())
            .map_err(|source| ExecError::Engine {
                what: format!("create container {name}"),
                source,
            })
    }

    /// Whether container `name` carries this node's label.
    async fn owned_by(&self, name: &str, node: &NodeId) -> bool {
        let node = node.to_hex();
        self.docker
            .inspect_container(name, None)
            .await
            .ok()
            .and_then(|c| c.config)
            .and_then(|c| c.labels)
            .is_some_and(|l| l.get(LABEL_NODE) == Some(&node))
    }

    /// The confinement of a task container whose spec asks for `cpu_millis` and
    /// `memory_bytes` (0: this node's default).
    fn host_config(&self, cpu_millis: u32, memory_bytes: u64) -> HostConfig {
        let (cpu_millis, memory_bytes) = self.limits.resolve(cpu_millis, memory_bytes);
        let memory = i64::try_from(memory_bytes).unwrap_or(i64::MAX);
        HostConfig {
            nano_cpus: Some(i64::from(cpu_millis) * 1_000_000),
            memory: Some(memory),
            // Memory plus swap: equal to the memory limit, so no swap beyond it.
            memory_swap: Some(memory),
            pids_limit: Some(i64::from(self.limits.pids)),
            cap_drop: Some(vec!["ALL".into()]),
            // The form every engine since 1.13 accepts (`:true` came later).
            security_opt: Some(vec!["no-new-privileges".into()]),
            network_mode: Some("none".into()),
            ..Default::default()
        }
    }

    /// Runs an instance whose image and log file are ready; returns how it ended.
    async fn run_container(
        &self,
        inst: &Instance,
        image_id: String,
        log: tokio::fs::File,
        started: &(dyn Fn() + Send + Sync),
        cancel: watch::Receiver<bool>,
    ) -> Result<Ended, ExecError> {
        let spec = &inst.spec.spec;
        let name = Self::container_name(inst);
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.push(format!("OMESH_TASK_ID={}", inst.task.to_hex()));
        env.push(format!("OMESH_EPOCH={}", inst.epoch));
        let labels = HashMap::from([
            (LABEL_TASK.to_owned(), inst.task.to_hex()),
            (LABEL_EPOCH.to_owned(), inst.epoch.to_string()),
            (LABEL_NODE.to_owned(), inst.node.to_hex()),
        ]);
        let host_config = self.host_config(spec.cpu_millis, spec.memory_bytes);
        let body = ContainerCreateBody {
            image: Some(image_id),
            cmd: Some(spec.command.clone()),
            env: Some(env),
            labels: Some(labels),
            attach_stdout: Some(false),
            attach_stderr: Some(false),
            tty: Some(false),
            host_config: Some(host_config),
            ..Default::default()
        };
        self.create(&name, body, &inst.node).await?;
        // From here on the container exists: remove it whatever happens, also if this future
        // is dropped half-way; unless it outlives this peer (then a dropped future means the
        // peer ends, and the container's guard keeps it for the next incarnation).
        let mut removal = Removal::new(self.docker.clone(), name.clone(), inst.survive.is_none());
        if let Err(source) = self.docker.start_container(&name, None).await {
            removal.remove().await;
            return Err(ExecError::Engine {
                what: format!("start container {name}"),
                source,
            });
        }
        // From here on a guard outside this process kills and removes the container if this
        // peer dies or stops renewing its deadline.
        let plan = Plan {
            label: format!("task {} epoch {}", inst.task.short(), inst.epoch),
            window_ms: 0,
            target: Target::Container { name: name.clone() },
            survive: inst.survive.as_ref().map(|socket| Survival {
                socket: socket.clone(),
                task: inst.task,
                epoch: inst.epoch,
                timeout_ms: spec.timeout_ms,
            }),
        };
        let guard = match Guard::spawn(&self.guard, plan, &inst.node, inst.lease.clone()) {
            Ok(g) => g,
            Err(e) => {
                removal.remove().await;
                return Err(e);
            }
        };
        started();
        let logs = tokio::spawn(pump_logs(self.docker.clone(), name.clone(), log, 0));
        let timeout = (spec.timeout_ms > 0).then(|| Duration::from_millis(spec.timeout_ms));
        self.follow(
            &name,
            guard,
            logs,
            &inst.log_path,
            (timeout, spec.timeout_ms),
            cancel,
            removal,
        )
        .await
    }

    /// Follows a running container to its end: kills it on `cancel` or when `timeout` (`.0`,
    /// with `.1` the limit as specified, for the error) passes, waits for `logs` to deliver
    /// the rest, lets its guard go and removes it.
    #[allow(clippy::too_many_arguments)]
    async fn follow(
        &self,
        name: &str,
        mut guard: Guard,
        logs: tokio::task::JoinHandle<()>,
        log_path: &std::path::Path,
        timeout: (Option<Duration>, u64),
        mut cancel: watch::Receiver<bool>,
        mut removal: Removal,
    ) -> Result<Ended, ExecError> {
        let (timeout, timeout_ms) = timeout;
        let wait = wait_exit(&self.docker, name);
        tokio::pin!(wait);
        let deadline = tokio::time::sleep(
            timeout
                .unwrap_or(Duration::MAX)
                .min(Duration::from_secs(10 * 365 * 24 * 3600)),
        );
        tokio::pin!(deadline);
        let mut expired = false;
        let mut guard_done = false;
        let (mut outcome, killed) = loop {
            tokio::select! {
                exit = &mut wait => break (exit.map(|code| Ended::Exited { code: i32::try_from(code).unwrap_or(-1) }), false),
                () = &mut deadline => break (Err(ExecError::Timeout { ms: timeout_ms }), true),
                () = super::cancelled(&mut cancel) => break (Ok(Ended::Stopped), true),
                end = guard.next(), if !guard_done => {
                    // The guard expired (it removes the container: `wait` ends next) or is gone.
                    guard_done = true;
                    expired = end == GuardEnd::Report(FromGuard::Expired);
                    if !expired {
                        warn!(container = %name, ?end, "the container's guard ended early");
                    }
                }
            }
        };
        if killed {
            let kill = KillContainerOptionsBuilder::new().signal("SIGKILL").build();
            match self.docker.kill_container(name, Some(kill)).await {
                // 409: it is not running any more.
                Err(e) if status_of(&e) != Some(409) => {
                    warn!(container = %name, error = %e, "kill failed");
                }
                _ => {}
            }
            if tokio::time::timeout(STOP_GRACE, &mut wait).await.is_err() {
                warn!(container = %name, "container not reported stopped after kill");
            }
        }
        // The container has stopped, so the followed log stream ends once it has delivered
        // everything: wait for that before the container (and its log) goes away.
        let mut logs = logs;
        match tokio::time::timeout(LOG_DRAIN, &mut logs).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(container = %name, error = %e, "log task failed"),
            Err(_) => {
                logs.abort();
                append_note(
                    log_path,
                    &format!("log stream did not end within {}s", LOG_DRAIN.as_secs()),
                )
                .await;
            }
        }
        if !guard_done {
            // Ended here: the guard may go. If it expired meanwhile, its report is on the way.
            guard.order(ToGuard::Release);
            loop {
                match tokio::time::timeout(STOP_GRACE, guard.next()).await {
                    Ok(GuardEnd::Report(FromGuard::Expired)) => {
                        expired = true;
                        break;
                    }
                    // What a re-attached guard answered first.
                    Ok(GuardEnd::Report(FromGuard::Attached(_))) => {}
                    _ => break,
                }
            }
        }
        if expired {
            outcome = Err(ExecError::Expired);
        }
        if matches!(outcome, Ok(Ended::Exited { .. })) && self.oom_killed(name).await {
            append_note(log_path, "the container was killed: out of memory").await;
        }
        removal.remove().await;
        outcome
    }

    /// Whether the kernel killed the container for exceeding its memory limit.
    async fn oom_killed(&self, name: &str) -> bool {
        self.docker
            .inspect_container(name, None)
            .await
            .ok()
            .and_then(|c| c.state)
            .and_then(|s| s.oom_killed)
            .unwrap_or(false)
    }
}

#[async_trait::async_trait]
impl Backend for DockerBackend {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Docker
    }

    async fn run(
        &self,
        inst: &Instance,
        started: &(dyn Fn() + Send + Sync),
        cancel: watch::Receiver<bool>,
    ) -> Result<Ended, ExecError> {
        let spec = &inst.spec.spec;
        if spec.command.is_empty() {
            return Err(ExecError::EmptyCommand);
        }
        let image = ImageRef::parse(&spec.image).map_err(|e| ExecError::BadImage(e.to_string()))?;
        let image_id = self.resolve_image(&image).await?;
        // Logs may hold whatever a task prints (secrets from its env among them): owner only.
        let log = match tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&inst.log_path)
            .await
        {
            Ok(f) => f,
            Err(source) => {
                return Err(ExecError::Log {
                    path: inst.log_path.clone(),
                    source,
                })
            }
        };
        self.run_container(inst, image_id, log, started, cancel)
            .await
    }

    async fn resume(
        &self,
        adopted: Adopted,
        cancel: watch::Receiver<bool>,
    ) -> Result<Ended, ExecError> {
        let crate::guard::AttachedTarget::Container { name } = &adopted.info.target else {
            return Err(ExecError::Guard("not a container task's guard".into()));
        };
        let log = match tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&adopted.log_path)
            .await
        {
            Ok(f) => f,
            Err(source) => {
                return Err(ExecError::Log {
                    path: adopted.log_path.clone(),
                    source,
                })
            }
        };
        // What it printed while no peer followed it: the engine kept it; from the second the
        // log was last written (a line or so may come twice).
        let since = std::fs::metadata(&adopted.log_path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i32::try_from(d.as_secs()).ok())
            .unwrap_or(0);
        let logs = tokio::spawn(pump_logs(self.docker.clone(), name.clone(), log, since));
        let removal = Removal::new(self.docker.clone(), name.clone(), false);
        let timeout = adopted.timeout_left();
        self.follow(
            name,
            adopted.guard,
            logs,
            &adopted.log_path,
            (timeout, adopted.info.timeout_ms),
            cancel,
            removal,
        )
        .await
    }

    async fn cleanup_orphans(&self, node: &NodeId, keep: &Keep) -> Result<usize, ExecError> {
        let filters = HashMap::from([("label", vec![format!("{LABEL_NODE}={}", node.to_hex())])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let found = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|source| ExecError::Engine {
                what: "list containers".into(),
                source,
            })?;
        let mut removed = 0;
        let mut failed = Vec::new();
        for c in found {
            let Some(id) = c.id else { continue };
            let kept = c.names.iter().flatten().any(|n| {
                keep.containers
                    .iter()
                    .any(|k| n.trim_start_matches('/') == k)
            });
            if kept {
                continue;
            }
            match remove(&self.docker, &id).await {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => failed.push(format!("{id}: {e}")),
            }
        }
        if failed.is_empty() {
            Ok(removed)
        } else {
            Err(ExecError::Cleanup(format!(
                "removed {removed} orphan container(s), {} failed: {}",
                failed.len(),
                failed.join("; ")
            )))
        }
    }
}

/// Removes a container on drop (if `on_drop`) unless [`Removal::remove`] did already.
struct Removal {
    docker: Docker,
    name: Option<String>,
    on_drop: bool,
}

impl Removal {
    fn new(docker: Docker, name: String, on_drop: bool) -> Self {
        Self {
            docker,
            name: Some(name),
            on_drop,
        }
    }

    async fn remove(&mut self) {
        if let Some(name) = self.name.take() {
            if let Err(e) = remove(&self.docker, &name).await {
                warn!(container = %name, error = %e, "cannot remove container");
            }
        }
    }
}

impl Drop for Removal {
    fn drop(&mut self) {
        if !self.on_drop {
            return;
        }
        let Some(name) = self.name.take() else { return };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let docker = self.docker.clone();
            runtime.spawn(async move {
                if let Err(e) = remove(&docker, &name).await {
                    warn!(container = %name, error = %e, "cannot remove container");
                }
            });
        }
    }
}

/// Force-removes a container with its anonymous volumes. `Ok(false)` if it was gone already.
async fn remove(docker: &Docker, name: &str) -> Result<bool, EngineError> {
    let options = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(name, Some(options)).await {
        Ok(()) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until the container stops; its exit code.
async fn wait_exit(docker: &Docker, name: &str) -> Result<i64, ExecError> {
    let what = || format!("wait for container {name}");
    match docker.wait_container(name, None).next().await {
        Some(Ok(status)) => match status.error.and_then(|e| e.message) {
            Some(message) if !message.is_empty() => Err(ExecError::EngineReport {
                what: what(),
                message,
            }),
            _ => Ok(status.status_code),
        },
        // bollard reports a non-zero exit status as an error.
        Some(Err(EngineError::DockerContainerWaitError { error, code })) => {
            if error.is_empty() {
                Ok(code)
            } else {
                Err(ExecError::EngineReport {
                    what: what(),
                    message: format!("{error} (exit code {code})"),
                })
            }
        }
        Some(Err(source)) => Err(ExecError::Engine {
            what: what(),
            source,
        }),
        None => Err(ExecError::EngineReport {
            what: what(),
            message: "the engine closed the stream without a status".into(),
        }),
    }
}

/// Appends the container's stdout and stderr (from `since`, seconds since the Unix epoch; 0:
/// from its start) to `file` until the stream ends (the container stopped).
async fn pump_logs(docker: Docker, name: String, mut file: tokio::fs::File, since: i32) {
    let options = LogsOptionsBuilder::new()
        .follow(true)
        .stdout(true)
        .stderr(true)
        .since(since)
        .build();
    let mut stream = docker.logs(&name, Some(options));
    while let Some(item) = stream.next().await {
        let written = match item {
            Ok(out) => file.write_all(out.as_ref()).await,
            Err(e) => {
                let note = format!("\n[omesh] log stream of {name} failed: {e}\n");
                let _ = file.write_all(note.as_bytes()).await;
                break;
            }
        };
        if let Err(e) = written {
            warn!(container = %name, error = %e, "cannot write the log");
            break;
        }
    }
    if let Err(e) = file.flush().await {
        warn!(container = %name, error = %e, "cannot write the log");
    }
}

/// Appends a line from omesh itself to a log file.
async fn append_note(path: &std::path::Path, note: &str) {
    let line = format!("[omesh] {note}\n");
    let written = async {
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .await?;
        f.write_all(line.as_bytes()).await?;
        f.flush().await
    };
    if let Err(e) = written.await {
        warn!(log = %path.display(), error = %e, "cannot write the log");
    }
}

/// The HTTP status of an engine error, if it is one.
fn status_of(e: &EngineError) -> Option<u16> {
    match e {
        EngineError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn is_not_found(e: &EngineError) -> bool {
    status_of(e) == Some(404)
}
