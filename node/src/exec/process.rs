//! The process backend: native processes with the same lifecycle as containers. The spec's
//! image is not used (hosts without Docker); its command runs as given, under a guard
//! (`crate::guard`): in its own cgroup with the spec's limits where one can be made, as the
//! unprivileged `task_user` when the peer runs as root, with a clean environment and a
//! private working directory, and killed with everything it started when its guard's
//! deadline passes or the peer dies.

use std::time::Duration;

use omesh_protocol::{ExecutorKind, NodeId};
use tokio::sync::watch;
use tracing::warn;

use super::{Backend, Ended, ExecError, Instance};
use crate::guard::{
    CgroupPlan, FromGuard, Guard, GuardEnd, GuardProgram, Plan, ProcessPlan, Target, ToGuard,
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
        mut cancel: watch::Receiver<bool>,
    ) -> Result<Ended, ExecError> {
        let spec = &inst.spec.spec;
        let (plan, _work) = self.plan(inst)?;
        let mut guard = Guard::spawn(
            &GuardProgram::this_binary(),
            plan,
            &inst.node,
            inst.lease.clone(),
        )?;
        let group_file = inst.log_path.with_extension("pgid");
        let timeout = if spec.timeout_ms == 0 {
            Duration::MAX
        } else {
            Duration::from_millis(spec.timeout_ms)
        };
        let deadline = tokio::time::sleep(timeout.min(Duration::from_secs(10 * 365 * 24 * 3600)));
        tokio::pin!(deadline);
        // What ends the run when the guard reports `Stopped`.
        let mut stop_means: Option<Result<Ended, ExecError>> = None;
        let outcome = loop {
            let end = tokio::select! {
                end = guard.next() => end,
                () = &mut deadline, if stop_means.is_none() => {
                    guard.order(ToGuard::Stop);
                    stop_means = Some(Err(ExecError::Timeout { ms: spec.timeout_ms }));
                    continue;
                }
                () = super::cancelled(&mut cancel), if stop_means.is_none() => {
                    guard.order(ToGuard::Stop);
                    stop_means = Some(Ok(Ended::Stopped));
                    continue;
                }
                () = tokio::time::sleep(STOP_WITHIN), if stop_means.is_some() => {
                    break Err(ExecError::Guard(format!(
                        "did not report the instance stopped within {}s",
                        STOP_WITHIN.as_secs()
                    )));
                }
            };
            match end {
                GuardEnd::Report(FromGuard::Started { pid }) => {
                    // Remember the process group, so a restarted peer can kill what a guard
                    // killed along with the peer left behind.
                    let _ = std::fs::write(&group_file, format!("{pid} {}\n", inst.task.to_hex()));
                    started();
                }
                GuardEnd::Report(FromGuard::Exited { code }) => break Ok(Ended::Exited { code }),
                GuardEnd::Report(FromGuard::Signaled {
                    oom: true,
                    memory_limit,
                    ..
                }) => {
                    break Err(ExecError::OutOfMemory {
                        limit_bytes: memory_limit.unwrap_or(0),
                    })
                }
                GuardEnd::Report(FromGuard::Signaled { signal, .. }) => {
                    break Err(ExecError::Signal(signal))
                }
                GuardEnd::Report(FromGuard::Expired) => break Err(ExecError::Expired),
                GuardEnd::Report(FromGuard::Stopped) => {
                    break stop_means.take().unwrap_or(Ok(Ended::Stopped))
                }
                GuardEnd::Report(FromGuard::Failed { reason }) => {
                    break Err(ExecError::Guard(reason))
                }
                GuardEnd::Lost => {
                    warn!(task = %inst.task.short(), epoch = inst.epoch, "guard went away without a report");
                    break Err(ExecError::Guard("went away without a report".into()));
                }
            }
        };
        let _ = std::fs::remove_file(&group_file);
        outcome
    }

    async fn cleanup_orphans(&self, node: &NodeId) -> Result<usize, ExecError> {
        let mut n = crate::guard::cleanup::end_leftover_guards(node).await;
        if let Some(parent) = &self.confinement.cgroup_parent {
            n += crate::guard::cleanup::remove_leftover_cgroups(parent);
        }
        Ok(n)
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
/// so a reused pid is never hit.
pub fn kill_leftover_groups(log_dir: &std::path::Path) -> usize {
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
        let _ = std::fs::remove_file(&path);
        let mut parts = text.split_whitespace();
        let (Some(pgid), Some(task)) = (
            parts.next().and_then(|p| p.parse::<i32>().ok()),
            parts.next(),
        ) else {
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
