//! Executors: run one epoch of a task, as a Docker container or a native process, behind one
//! interface. The driver starts an instance per `StartTask` and stops it on `StopTask`;
//! every report carries the epoch it was started with, or the epoch the replica adopted it
//! under (`AdoptTask`, for an instance an earlier incarnation of this peer left running; see
//! [`Executor::reattach`]). [`cgroup`] holds the task cgroups that limit and contain an
//! instance's processes.

pub mod cgroup;
pub mod docker;
mod error;
pub mod process;
mod reattach;

pub use error::ExecError;
pub use reattach::{Adopted, Keep, Reattached};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use omesh_protocol::{Epoch, ExecutorKind, NodeId, SignedTaskSpec, TaskId};
use omesh_state::ExecEvent;
use tokio::sync::{mpsc, watch};

/// One epoch of a task to run.
#[derive(Debug, Clone)]
pub struct Instance {
    /// The task.
    pub task: TaskId,
    /// The fencing token.
    pub epoch: Epoch,
    /// What to run.
    pub spec: Arc<SignedTaskSpec>,
    /// Where stdout and stderr go.
    pub log_path: PathBuf,
    /// This node (labels, orphan clean-up).
    pub node: NodeId,
    /// Until when this instance's lease holds, less the guard margin: the deadline the
    /// instance's guard enforces, renewed as it moves.
    pub lease: watch::Receiver<tokio::time::Instant>,
    /// The socket its guard listens on for this peer's next incarnation when the instance
    /// outlives the peer (a task with `lost_after` and no `stop_after`); `None`: the
    /// instance ends with the peer.
    pub survive: Option<PathBuf>,
}

/// The limits every task instance runs under, from the node's config: a spec that asks for
/// 0 CPU or 0 memory gets the node's default, never "unlimited". Shared by the executors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLimits {
    /// CPU limit, thousandths of a core, of a task whose spec asks for 0
    /// (`task_default_cpu_millis`).
    pub default_cpu_millis: u32,
    /// Memory limit, bytes, of a task whose spec asks for 0 (`task_default_memory_bytes`).
    pub default_memory_bytes: u64,
    /// Most processes and threads one instance may have at once (`task_pids_limit`).
    pub pids: u32,
}

impl TaskLimits {
    /// The limits the config asks for.
    pub fn from_config(cfg: &crate::config::NodeConfig) -> Self {
        Self {
            default_cpu_millis: cfg.task_default_cpu_millis,
            default_memory_bytes: cfg.task_default_memory_bytes,
            pids: cfg.task_pids_limit,
        }
    }

    /// The CPU (thousandths of a core) and memory (bytes) limits of an instance whose spec
    /// asks for `spec_cpu_millis` and `spec_memory_bytes`: the spec's values, with 0 meaning
    /// this node's default.
    pub fn resolve(&self, spec_cpu_millis: u32, spec_memory_bytes: u64) -> (u32, u64) {
        let cpu = if spec_cpu_millis == 0 {
            self.default_cpu_millis
        } else {
            spec_cpu_millis
        };
        let memory = if spec_memory_bytes == 0 {
            self.default_memory_bytes
        } else {
            spec_memory_bytes
        };
        (cpu, memory)
    }
}

impl Default for TaskLimits {
    /// The documented defaults of `task_default_cpu_millis`, `task_default_memory_bytes` and
    /// `task_pids_limit`.
    fn default() -> Self {
        Self::from_config(&crate::config::NodeConfig::default())
    }
}

/// A way of running instances.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Which executor this is: `Docker` or `Process` (never `Any`).
    fn kind(&self) -> ExecutorKind;

    /// A short name: `docker` or `process`.
    fn name(&self) -> &'static str {
        match self.kind() {
            ExecutorKind::Docker => "docker",
            ExecutorKind::Process | ExecutorKind::Any => "process",
        }
    }

    /// Whether an instance needs its image in the engine before it starts.
    fn needs_image(&self) -> bool {
        self.kind() == ExecutorKind::Docker
    }

    /// Runs `inst` to its end. Calls `started` once it runs. Returns how it ended:
    /// `Exited { code }` or `Stopped` (once `cancel` turned true and the instance is gone), or
    /// why it failed (could not start, or timed out after `spec.timeout_ms`).
    /// Leaves nothing behind (containers removed, processes reaped).
    async fn run(
        &self,
        inst: &Instance,
        started: &(dyn Fn() + Send + Sync),
        cancel: watch::Receiver<bool>,
    ) -> Result<Ended, ExecError>;

    /// Follows an instance an earlier incarnation started (re-attached through its guard) to
    /// its end, as [`Self::run`] does for one it starts. Does not call a `started`: the
    /// instance runs already.
    async fn resume(
        &self,
        adopted: Adopted,
        cancel: watch::Receiver<bool>,
    ) -> Result<Ended, ExecError>;

    /// Removes what earlier runs of this node left (containers of epochs it no longer owns),
    /// sparing what `keep` names. Returns how many were removed.
    async fn cleanup_orphans(&self, node: &NodeId, keep: &Keep) -> Result<usize, ExecError>;
}

/// Makes a task's image available to the Docker engine before its container starts (the
/// peer fetches it from other peers and loads it). Runs inside the instance's task, so a
/// long fetch holds up nothing else; a stop while it runs ends the instance as stopped.
#[async_trait::async_trait]
pub trait ImageProvider: Send + Sync + 'static {
    /// Ensures the engine holds `inst`'s image; the error ends up in the task's status.
    async fn prepare(&self, inst: &Instance) -> Result<(), ExecError>;
}

/// How an instance that ran ended by itself or by a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The instance exited with this code (0 is success).
    Exited {
        /// The exit code.
        code: i32,
    },
    /// The instance was stopped after `cancel` turned true.
    Stopped,
}

/// What happened to an instance, typed.
#[derive(Debug)]
pub enum Event {
    /// It runs.
    Started,
    /// It ended.
    Ended(Ended),
    /// It could not run, or did not end by itself.
    Failed(ExecError),
}

impl From<Result<Ended, ExecError>> for Event {
    fn from(end: Result<Ended, ExecError>) -> Self {
        match end {
            Ok(ended) => Self::Ended(ended),
            Err(e) => Self::Failed(e),
        }
    }
}

impl From<Event> for ExecEvent {
    /// The replica's view: the one place an executor error becomes text.
    fn from(event: Event) -> Self {
        match event {
            Event::Started => Self::Started,
            Event::Ended(Ended::Exited { code }) => Self::Exited { code },
            Event::Ended(Ended::Stopped) => Self::Stopped,
            Event::Failed(ExecError::Expired) => Self::Expired,
            Event::Failed(e) => Self::Failed {
                error: e.to_string(),
            },
        }
    }
}

/// A report for the driver.
#[derive(Debug)]
pub struct Report {
    /// The task.
    pub task: TaskId,
    /// The epoch the instance was started with.
    pub epoch: Epoch,
    /// What happened.
    pub event: Event,
}

/// An instance this executor runs, as the executor holds it.
struct Running {
    /// Turns true to stop it.
    cancel: watch::Sender<bool>,
    /// Its guard's deadline.
    lease: watch::Sender<tokio::time::Instant>,
    /// The epoch its reports carry (moved once, by an adoption).
    epoch: watch::Sender<Epoch>,
    /// Whether it outlives this peer (left running on shutdown).
    survives: bool,
    /// Re-attached and not yet adopted by the replica: the deadline the earlier incarnation
    /// set its guard, which renewals never move past (see [`Executor::renew`]).
    adopting: Option<tokio::time::Instant>,
}

impl Running {
    fn new(epoch: Epoch, until: tokio::time::Instant, survives: bool) -> Self {
        Self {
            cancel: watch::Sender::new(false),
            lease: watch::Sender::new(until),
            epoch: watch::Sender::new(epoch),
            survives,
            adopting: None,
        }
    }
}

/// Runs instances on the backends of this node and routes their reports.
pub struct Executor {
    process: Arc<dyn Backend>,
    docker: Option<Arc<dyn Backend>>,
    /// Which backend runs tasks that accept any.
    prefer_docker: bool,
    reports: mpsc::Sender<Report>,
    running: HashMap<(TaskId, Epoch), Running>,
    log_dir: PathBuf,
    images: Option<Arc<dyn ImageProvider>>,
    /// The deadline a new instance's guard starts with, until the next renewal sets its own:
    /// this node's leases hold until then, less the guard margin.
    lease: tokio::time::Instant,
    /// Where guards of instances that outlive this peer listen (`None`: none outlives it).
    guard_dir: Option<PathBuf>,
}

impl Executor {
    /// An executor whose reports go to `reports`. Logs are kept under `log_dir`. Tasks that
    /// accept any executor run in Docker when `docker` is given and `prefer_docker`.
    pub fn new(
        process: Arc<dyn Backend>,
        docker: Option<Arc<dyn Backend>>,
        prefer_docker: bool,
        reports: mpsc::Sender<Report>,
        log_dir: PathBuf,
    ) -> Self {
        Self {
            process,
            prefer_docker: prefer_docker && docker.is_some(),
            docker,
            reports,
            running: HashMap::new(),
            log_dir,
            images: None,
            lease: tokio::time::Instant::now(),
            guard_dir: None,
        }
    }

    /// Lets instances of tasks with `lost_after` (and no `stop_after`) outlive this peer:
    /// their guards listen in `dir` (private to the peer's user) for its next incarnation.
    pub fn set_guard_dir(&mut self, dir: PathBuf) {
        self.guard_dir = Some(dir);
    }

    /// Renews every guard's deadline: a new instance's guard starts with `shared` (this
    /// node's leases hold until then, less the margin); each running instance's guard moves
    /// to `deadline(task)` (its task's lease, less the margin; `None` while the replica does
    /// not know the task: then `shared`). An instance re-attached but not yet adopted is held
    /// to the earlier of the deadline the earlier incarnation set and its task's, and keeps
    /// the former while the replica does not know the task (its deadline would only be the
    /// shared one, not the task's). Guards are told only when theirs changes.
    pub fn renew(
        &mut self,
        shared: tokio::time::Instant,
        mut deadline: impl FnMut(&TaskId) -> Option<tokio::time::Instant>,
    ) {
        self.lease = shared;
        for ((task, _), r) in &self.running {
            let until = match (r.adopting, deadline(task)) {
                (Some(earlier), Some(d)) => d.min(earlier),
                (Some(earlier), None) => earlier,
                (None, Some(d)) => d,
                (None, None) => shared,
            };
            r.lease.send_if_modified(|cur| {
                let changed = *cur != until;
                *cur = until;
                changed
            });
        }
    }

    /// Has Docker instances wait for `images` to provide their image before they start.
    pub fn set_image_provider(&mut self, images: Arc<dyn ImageProvider>) {
        self.images = Some(images);
    }

    /// The capability tags of this node: `executor:process`, and `executor:docker` with an engine.
    pub fn tags(&self) -> Vec<String> {
        let mut t = vec!["executor:process".to_owned()];
        if self.docker.is_some() {
            t.push("executor:docker".to_owned());
        }
        t
    }

    /// The backend that runs tasks accepting any executor.
    pub fn name(&self) -> &'static str {
        if self.prefer_docker {
            "docker"
        } else {
            "process"
        }
    }

    /// Whether `(task, epoch)` runs here.
    pub fn is_running(&self, task: &TaskId, epoch: Epoch) -> bool {
        self.running.contains_key(&(*task, epoch))
    }

    fn backend_for(&self, kind: ExecutorKind) -> Option<Arc<dyn Backend>> {
        match kind {
            ExecutorKind::Process => Some(Arc::clone(&self.process)),
            ExecutorKind::Docker => self.docker.clone(),
            ExecutorKind::Any if self.prefer_docker => self.docker.clone(),
            ExecutorKind::Any => Some(Arc::clone(&self.process)),
        }
    }

    /// Where the log of an epoch is kept.
    pub fn log_path(&self, task: &TaskId, epoch: Epoch) -> PathBuf {
        self.log_dir.join(format!("{}-{epoch}.log", task.to_hex()))
    }

    /// Where the guard of `(task, epoch)` listens when the instance is to outlive this peer:
    /// a task with `lost_after` and no `stop_after`, on a peer with a guard directory whose
    /// path leaves room for the socket's name.
    fn survival_socket(
        &self,
        task: &TaskId,
        epoch: Epoch,
        spec: &SignedTaskSpec,
    ) -> Option<PathBuf> {
        let policy = &spec.spec.disconnect;
        if policy.lost_after_ms.is_none() || policy.stop_after_ms.is_some() {
            return None;
        }
        let dir = self.guard_dir.as_ref()?;
        let socket = dir.join(format!("{}-{epoch}.sock", task.short()));
        if socket.as_os_str().len() > crate::guard::MAX_SOCKET_PATH {
            tracing::warn!(
                socket = %socket.display(),
                "the data directory's path is too long for a guard's socket: this instance ends with the peer"
            );
            return None;
        }
        Some(socket)
    }

    /// Starts an instance; reports arrive on the channel given to `new`.
    pub fn start(&mut self, task: TaskId, epoch: Epoch, spec: Arc<SignedTaskSpec>, node: NodeId) {
        let survive = self.survival_socket(&task, epoch, &spec);
        let running = Running::new(epoch, self.lease, survive.is_some());
        let cancel_rx = running.cancel.subscribe();
        let inst = Instance {
            task,
            epoch,
            spec,
            log_path: self.log_path(&task, epoch),
            node,
            lease: running.lease.subscribe(),
            survive,
        };
        self.running.insert((task, epoch), running);
        let backend = self.backend_for(inst.spec.spec.executor);
        let images = self.images.clone();
        let reports = self.reports.clone();
        tokio::spawn(async move {
            let Some(backend) = backend else {
                let _ = reports
                    .send(Report {
                        task,
                        epoch,
                        event: Event::Failed(ExecError::NoEngine),
                    })
                    .await;
                return;
            };
            if let Some(images) = images.filter(|_| backend.needs_image()) {
                let mut cancel = cancel_rx.clone();
                let end = tokio::select! {
                    ready = images.prepare(&inst) => ready.err().map(Event::Failed),
                    () = cancelled(&mut cancel) => Some(Event::Ended(Ended::Stopped)),
                };
                if let Some(event) = end {
                    let _ = reports.send(Report { task, epoch, event }).await;
                    return;
                }
            }
            let started_tx = reports.clone();
            let started = move || {
                // The report channel is bounded; a full channel means the driver is far
                // behind, and a dropped Started is repaired by the final report.
                let _ = started_tx.try_send(Report {
                    task,
                    epoch,
                    event: Event::Started,
                });
            };
            let end = backend.run(&inst, &started, cancel_rx).await;
            let _ = reports
                .send(Report {
                    task,
                    epoch,
                    event: end.into(),
                })
                .await;
        });
    }

    /// Stops the instance of `(task, epoch)` if it runs.
    pub fn stop(&mut self, task: TaskId, epoch: Epoch) {
        if let Some(r) = self.running.get(&(task, epoch)) {
            let _ = r.cancel.send(true);
        }
    }

    /// Forgets an instance that reported its end.
    pub fn finished(&mut self, task: TaskId, epoch: Epoch) {
        self.running.remove(&(task, epoch));
    }

    /// Instances running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Stops every instance (shutdown).
    pub fn stop_all(&mut self) {
        for r in self.running.values() {
            let _ = r.cancel.send(true);
        }
    }

    /// Removes leftovers of earlier runs, sparing what `keep` names (re-attached instances).
    pub async fn cleanup_orphans(&self, node: &NodeId, keep: &Keep) -> Result<usize, ExecError> {
        let mut n = process::kill_leftover_groups(&self.log_dir, keep);
        n += self.process.cleanup_orphans(node, keep).await?;
        if let Some(d) = &self.docker {
            n += d.cleanup_orphans(node, keep).await?;
        }
        Ok(n)
    }
}

/// The Docker backend for an executor choice: `auto` uses it when the engine answers,
/// `docker` requires it, `process` never uses it. Its containers run under `limits`.
pub async fn select_docker(
    choice: crate::config::ExecutorChoice,
    limits: TaskLimits,
) -> Result<Option<Arc<dyn Backend>>, String> {
    use crate::config::ExecutorChoice;
    match choice {
        ExecutorChoice::Process => Ok(None),
        ExecutorChoice::Auto | ExecutorChoice::Docker => {
            match docker::DockerBackend::connect(limits).await {
                Ok(d) => Ok(Some(Arc::new(d))),
                Err(e) if choice == ExecutorChoice::Docker => Err(format!(
                    "executor = \"docker\" but the Docker engine does not answer: {e}"
                )),
                Err(e) => {
                    tracing::info!(reason = %e, "no Docker engine; running tasks as processes");
                    Ok(None)
                }
            }
        }
    }
}

/// Resolves once `cancel` turns true; never if its sender is dropped without it.
pub async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    loop {
        if *cancel.borrow_and_update() {
            return;
        }
        if cancel.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_in_the_spec_means_the_nodes_default_never_unlimited() {
        let limits = TaskLimits {
            default_cpu_millis: 750,
            default_memory_bytes: 96 << 20,
            pids: 64,
        };
        assert_eq!(limits.resolve(0, 0), (750, 96 << 20));
        assert_eq!(limits.resolve(250, 0), (250, 96 << 20));
        assert_eq!(limits.resolve(0, 48 << 20), (750, 48 << 20));
        assert_eq!(limits.resolve(2_000, 1 << 30), (2_000, 1 << 30));
        let d = TaskLimits::default();
        assert_eq!(
            (d.default_cpu_millis, d.default_memory_bytes, d.pids),
            (1_000, 512 << 20, 512)
        );
    }
}
