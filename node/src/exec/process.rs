//! The process backend: native child processes with the same lifecycle as containers.
//! The spec's image is not used (hosts without Docker); its command runs as given.

use std::os::unix::fs::OpenOptionsExt;
use std::process::Stdio;
use std::time::Duration;

use omesh_protocol::{ExecutorKind, NodeId};
use tokio::process::Command;
use tokio::sync::watch;

use super::{Backend, Ended, ExecError, Instance};

/// Runs tasks as child processes.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessBackend;

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
        let Some((program, args)) = spec.command.split_first() else {
            return Err(ExecError::EmptyCommand);
        };
        // Logs may hold whatever a task prints (secrets from its env among them): owner only.
        let log = match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&inst.log_path)
        {
            Ok(f) => f,
            Err(source) => {
                return Err(ExecError::Log {
                    path: inst.log_path.clone(),
                    source,
                })
            }
        };
        let stderr = match log.try_clone() {
            Ok(f) => f,
            Err(source) => {
                return Err(ExecError::Log {
                    path: inst.log_path.clone(),
                    source,
                })
            }
        };
        // With util-linux's setpriv the child gets SIGKILL when this peer dies (even by
        // SIGKILL), so a killed owner leaves no instance running beside its successor's.
        let mut cmd = match setpriv() {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
            )
            .envs(&spec.env)
            .env("OMESH_TASK_ID", inst.task.to_hex())
            .env("OMESH_EPOCH", inst.epoch.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .kill_on_drop(true);
        #[cfg(unix)]
        cmd.process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                return Err(ExecError::Spawn {
                    program: program.clone(),
                    source,
                })
            }
        };
        // Remember the process group, so a restarted peer can kill what a crash left behind.
        let group_file = inst.log_path.with_extension("pgid");
        if let Some(pid) = child.id() {
            let _ = std::fs::write(&group_file, format!("{pid} {}\n", inst.task.to_hex()));
        }
        started();
        let timeout = if spec.timeout_ms == 0 {
            Duration::MAX
        } else {
            Duration::from_millis(spec.timeout_ms)
        };
        let deadline = tokio::time::sleep(timeout.min(Duration::from_secs(10 * 365 * 24 * 3600)));
        tokio::pin!(deadline);
        let outcome = tokio::select! {
            status = child.wait() => match status {
                Ok(st) => match st.code() {
                    Some(code) => Ok(Ended::Exited { code }),
                    None => Err(ExecError::Killed(st)),
                },
                Err(e) => Err(ExecError::Wait(e)),
            },
            () = &mut deadline => {
                kill_group(&mut child).await;
                Err(ExecError::Timeout { ms: spec.timeout_ms })
            }
            () = super::cancelled(&mut cancel) => {
                kill_group(&mut child).await;
                Ok(Ended::Stopped)
            }
        };
        // The group leader is gone; kill whatever it left in its group too.
        kill_group(&mut child).await;
        let _ = std::fs::remove_file(&group_file);
        outcome
    }

    async fn cleanup_orphans(&self, _node: &NodeId) -> Result<usize, ExecError> {
        Ok(0)
    }
}

/// Kills the process groups that instances of an earlier run of this peer left behind, as
/// recorded in `<log dir>/*.pgid`. A group is killed only if its leader still carries the
/// task id in its environment, so a reused pid is never hit.
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
        let mut parts = text.split_whitespace();
        let (Some(pid), Some(task)) = (parts.next(), parts.next()) else {
            let _ = std::fs::remove_file(&path);
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            let _ = std::fs::remove_file(&path);
            continue;
        };
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let marker = format!("OMESH_TASK_ID={task}");
        if environ.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()) {
            kill_group_id(pid);
            killed += 1;
        }
        let _ = std::fs::remove_file(&path);
    }
    killed
}

/// Sends SIGKILL to the process group `pgid` through the kill(2) call itself: shelling out
/// to `kill -PGID` is parsed as `kill(-1, ...)` by some procps versions, which as root kills
/// every process on the host.
fn kill_group_id(pgid: u32) {
    let Some(pid) = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
}

fn setpriv() -> Option<&'static str> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

/// Kills the child's whole process group, then reaps it.
async fn kill_group(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        // The child leads its own process group: killing the group takes its children too.
        kill_group_id(pid);
    }
    let _ = child.kill().await;
    let _ = child.wait().await;
}
