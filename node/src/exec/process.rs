//! The process backend: native processes with the same lifecycle as containers. The spec's
//! image is not used (hosts without Docker); its command runs as given, under a guard
//! (`crate::guard`): in its own cgroup with the spec's limits where one can be made, as the
//! unprivileged `task_user` when the peer runs as root, with a clean environment and a
//! private working directory, and killed with everything it started when its guard's
//! deadline passes or the peer dies.

use std::time::Duration;

use omesh_protocol::{Epoch, ExecutorKind, NodeId, TaskId};
use tokio::sync::watch;
use tracing::warn;

use super::{Adopted, Backend, Ended, ExecError, Instance, Keep};
use crate::guard::{
    CgroupPlan, FromGuard, Guard, GuardEnd, GuardProgram, Plan, ProcessPlan, Survival, Target,
    ToGuard,
};

/// The PATH a task gets when its spec sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a guard may take to report the end of an instance it was told to stop.
const STOP_WITHIN: Duration = Duration::from_secs(20);

/// How process tasks are confined on this node.
#[derive(Debug, Clone)]
pub struct Confinement {
    /// The cgroup parent (`<cgroup_parent>/<node>`) when cgroups with cpu, memory and pids
    /// controllers are writable here; `None` otherwise.
    pub cgroup_parent: Option<String>,
    /// Limits of a task that asks for 0, and the pids limit of every task.
    pub limits: super::TaskLimits,
    /// Run tasks whose limits cannot be enforced anyway (the operator's opt-out).
    pub best_effort: bool,
    /// The user and group tasks run as (`None`: the peer's own).
    pub user: Option<(u32, u32)>,
}

impl Confinement {
    /// Whether this node enforces the limits of process tasks (or was told not to care):
    /// what the `limits:process` tag says to placement.
    pub fn enforces_limits(&self) -> bool {
        self.cgroup_parent.is_some() || self.best_effort
    }
}

/// Runs tasks as guarded processes.
#[derive(Debug, Clone)]
pub struct ProcessBackend {
    confinement: Confinement,
}

impl ProcessBackend {
    /// A backend confining tasks as `confinement` says.
    pub fn new(confinement: Confinement) -> Self {
        Self { confinement }
    }

    /// What the guard is to run for `inst`, and its private working directory (removed
    /// when dropped).
    fn plan(&self, inst: &Instance) -> Result<(Plan, tempfile::TempDir), ExecError> {
        let spec = &inst.spec.spec;
        let Some((program, args)) = spec.command.split_first() else {
            return Err(ExecError::EmptyCommand);
        };
        let explicit = spec.cpu_millis > 0 || spec.memory_bytes > 0;
        let (cpu_millis, memory_bytes) = self
            .confinement
            .limits
            .resolve(spec.cpu_millis, spec.memory_bytes);
        let cgroup = match &self.confinement.cgroup_parent {
            Some(parent) => Some(CgroupPlan {
                parent: parent.clone(),
                name: format!("{}-{}", inst.task.to_hex(), inst.epoch),
                cpu_millis,
                memory_bytes,
                pids: self.confinement.limits.pids,
            }),
            None if explicit && !self.confinement.best_effort => {
                return Err(ExecError::NoLimits(
                    "this node cannot enforce process limits (no writable cgroup with cpu, memory and pids controllers); set process_limits = \"best-effort\" to run such tasks unlimited".into(),
                ))
            }
            None => None,
        };
        let mut env: Vec<(String, String)> = spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !spec.env.contains_key("PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        env.push(("OMESH_TASK_ID".into(), inst.task.to_hex()));
        env.push(("OMESH_EPOCH".into(), inst.epoch.to_string()));
        let work = tempfile::Builder::new()
            .prefix(&format!("omesh-task-{}-{}-", inst.task.short(), inst.epoch))
            .tempdir()
            .map_err(|e| ExecError::Guard(format!("cannot create a working directory: {e}")))?;
        if let Some((uid, gid)) = self.confinement.user {
            rustix::fs::chown(
                work.path(),
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(|e| {
                ExecError::Guard(format!(
                    "cannot hand {} to the task user: {e}",
                    work.path().display()
                ))
            })?;
        }
        env.push(("HOME".into(), work.path().display().to_string()));
        let plan = Plan {
            label: format!("task {} epoch {}", inst.task.short(), inst.epoch),
            window_ms: 0,
            target: Target::Process(ProcessPlan {
                program: program.clone(),
                args: args.to_vec(),
                env,
                log: inst.log_path.clone(),
                cwd: work.path().to_owned(),
                user: self.confinement.user,
                cgroup,
            }),
            survive: inst.survive.as_ref().map(|socket| Survival {
                socket: socket.clone(),
                task: inst.task,
                epoch: inst.epoch,
                timeout_ms: spec.timeout_ms,
            }),
        };
        Ok((plan, work))
    }
}

#[async_trait::async_trait]
impl Backend for ProcessBackend {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Process
    }

    async fn run(
        &self,
        inst: &Instance,
        started: &(dyn Fn() + Send + Sync),
        cancel: watch::Receiver<bool>,
    ) -> Result<Ended, ExecError> {
        let spec = &inst.spec.spec;
        let (plan, work) = self.plan(inst)?;
        // An instance that outlives this peer keeps its working directory when this run is
        // abandoned (the peer ends); the run that follows it to its end removes it.
        let work = if inst.survive.is_some() {
            WorkDir::Kept(work.keep())
        } else {
            WorkDir::Temp(work)
        };
        let mut guard = match Guard::spawn(
            &GuardProgram::this_binary(),
            plan,
            &inst.node,
            inst.lease.clone(),
        ) {
            Ok(g) => g,
            Err(e) => {
                work.remove();
                return Err(e);
            }
        };
        let group_file = inst.log_path.with_extension("pgid");
        let timeout = (spec.timeout_ms > 0).then(|| Duration::from_millis(spec.timeout_ms));
        let on_started = |pid: u32| {
            // Remember the process group, so a restarted peer can kill what a guard killed
            // along with the peer left behind.
            let _ = std::fs::write(&group_file, format!("{pid} {}\n", inst.task.to_hex()));
            started();
        };
        let outcome = follow(
            &mut guard,
            &inst.task,
            inst.epoch,
            (timeout, spec.timeout_ms),
            &on_started,
            cancel,
        )
        .await;
        let _ = std::fs::remove_file(&group_file);
        work.remove();
        outcome
    }

    async fn resume(
        &self,
        mut adopted: Adopted,
        cancel: watch::Receiver<bool>,
    ) -> Result<Ended, ExecError> {
        let crate::guard::AttachedTarget::Process { cwd, .. } = &adopted.info.target else {
            return Err(ExecError::Guard("not a process task's guard".into()));
        };
        let work = WorkDir::Kept(cwd.clone());
        let timeout = adopted.timeout_left();
        let outcome = follow(
            &mut adopted.guard,
            &adopted.task,
            adopted.epoch,
            (timeout, adopted.info.timeout_ms),
            &|_| {},
            cancel,
        )
        .await;
        let _ = std::fs::remove_file(&adopted.group_file);
        work.remove();
        outcome
    }

    async fn cleanup_orphans(&self, node: &NodeId, keep: &Keep) -> Result<usize, ExecError> {
        let mut n = crate::guard::cleanup::end_leftover_guards(node, &keep.guards).await;
        if let Some(parent) = &self.confinement.cgroup_parent {
            n += crate::guard::cleanup::remove_leftover_cgroups(parent, &keep.cgroups);
        }
        Ok(n)
    }
}

/// An instance's private working directory.
enum WorkDir {
    /// Removed when dropped.
    Temp(tempfile::TempDir),
    /// Removed only by [`WorkDir::remove`] (the instance may outlive this peer).
    Kept(std::path::PathBuf),
}

impl WorkDir {
    /// Removes it (the instance ended).
    fn remove(self) {
        match self {
            Self::Temp(t) => drop(t),
            Self::Kept(path) => {
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        warn!(dir = %path.display(), error = %e, "cannot remove a task's working directory");
                    }
                }
            }
        }
    }
}

/// Follows a process task's guard until the instance ends: stops it on `cancel` or when
/// `timeout` (`.0`, with `.1` the limit as specified, for the error) passes, and turns the
/// guard's report into how it ended. `on_started` gets the pid once it runs.
async fn follow(
    guard: &mut Guard,
    task: &TaskId,
    epoch: Epoch,
    timeout: (Option<Duration>, u64),
    on_started: &(dyn Fn(u32) + Send + Sync),
    mut cancel: watch::Receiver<bool>,
) -> Result<Ended, ExecError> {
    let (timeout, timeout_ms) = timeout;
    let deadline = tokio::time::sleep(
        timeout
            .unwrap_or(Duration::MAX)
            .min(Duration::from_secs(10 * 365 * 24 * 3600)),
    );
    tokio::pin!(deadline);
    // What ends the run when the guard reports `Stopped`.
    let mut stop_means: Option<Result<Ended, ExecError>> = None;
    loop {
        let end = tokio::select! {
            end = guard.next() => end,
            () = &mut deadline, if stop_means.is_none() => {
                guard.order(ToGuard::Stop);
                stop_means = Some(Err(ExecError::Timeout { ms: timeout_ms }));
                continue;
            }
            () = super::cancelled(&mut cancel), if stop_means.is_none() => {
                guard.order(ToGuard::Stop);
                stop_means = Some(Ok(Ended::Stopped));
                continue;
            }
            () = tokio::time::sleep(STOP_WITHIN), if stop_means.is_some() => {
                return Err(ExecError::Guard(format!(
                    "did not report the instance stopped within {}s",
                    STOP_WITHIN.as_secs()
                )));
            }
        };
        match end {
            GuardEnd::Report(FromGuard::Started { pid }) => on_started(pid),
            GuardEnd::Report(FromGuard::Attached(_)) => {}
            GuardEnd::Report(FromGuard::Exited { code }) => return Ok(Ended::Exited { code }),
            GuardEnd::Report(FromGuard::Signaled {
                oom: true,
                memory_limit,
                ..
            }) => {
                return Err(ExecError::OutOfMemory {
                    limit_bytes: memory_limit.unwrap_or(0),
                })
            }
            GuardEnd::Report(FromGuard::Signaled { signal, .. }) => {
                return Err(ExecError::Signal(signal))
            }
            GuardEnd::Report(FromGuard::Expired) => return Err(ExecError::Expired),
            GuardEnd::Report(FromGuard::Stopped) => {
                return stop_means.take().unwrap_or(Ok(Ended::Stopped))
            }
            GuardEnd::Report(FromGuard::Failed { reason }) => return Err(ExecError::Guard(reason)),
            GuardEnd::Lost => {
                warn!(task = %task.short(), epoch, "guard went away without a report");
                return Err(ExecError::Guard("went away without a report".into()));
            }
        }
    }
}

/// The uid and gid of `user` from /etc/passwd (a name or a numeric uid).
pub fn lookup_user(user: &str) -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| format!("cannot read /etc/passwd: {e}"))?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 {
            continue;
        }
        if f[0] == user || f[2] == user {
            let uid = f[2].parse::<u32>();
            let gid = f[3].parse::<u32>();
            if let (Ok(uid), Ok(gid)) = (uid, gid) {
                return Ok((uid, gid));
            }
        }
    }
    Err(format!("no user {user:?} in /etc/passwd"))
}

/// Kills the process groups that instances of an earlier run of this peer left behind, as
/// recorded in `<log dir>/*.pgid` (what remains when a guard was killed with its peer). A
/// group is killed only if a process in it still carries the task id in its environment,
/// so a reused pid is never hit. Groups of re-attached instances (`keep.groups`) are spared,
/// and their files kept.
pub fn kill_leftover_groups(log_dir: &std::path::Path, keep: &Keep) -> usize {
    let Ok(entries) = std::fs::read_dir(log_dir) else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pgid") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut parts = text.split_whitespace();
        let pgid = parts.next().and_then(|p| p.parse::<i32>().ok());
        if pgid.is_some_and(|g| keep.groups.contains(&g)) {
            continue;
        }
        let _ = std::fs::remove_file(&path);
        let (Some(pgid), Some(task)) = (pgid, parts.next()) else {
            continue;
        };
        let marker = format!("OMESH_TASK_ID={task}");
        if crate::guard::cleanup::group_members(pgid)
            .into_iter()
            .any(|pid| crate::guard::cleanup::environ_has(pid, &marker))
        {
            if let Some(pid) = rustix::process::Pid::from_raw(pgid) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                killed += 1;
            }
        }
    }
    killed
}
