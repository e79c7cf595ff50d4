//! The process backend: native child processes with the same lifecycle as containers.
//! The spec's image is not used (hosts without Docker); its command runs as given.

use std::process::Stdio;
use std::time::Duration;

use omesh_protocol::NodeId;
use omesh_state::ExecEvent;
use tokio::process::Command;
use tokio::sync::watch;

use super::{timeout_error, Backend, Instance};

/// Runs tasks as child processes.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessBackend;

#[async_trait::async_trait]
impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn run(
        &self,
        inst: &Instance,
        started: &(dyn Fn() + Send + Sync),
        mut cancel: watch::Receiver<bool>,
    ) -> ExecEvent {
        let spec = &inst.spec.spec;
        let Some((program, args)) = spec.command.split_first() else {
            return ExecEvent::Failed {
                error: "empty command".into(),
            };
        };
        let log = match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&inst.log_path)
        {
            Ok(f) => f,
            Err(e) => {
                return ExecEvent::Failed {
                    error: format!("cannot open log {}: {e}", inst.log_path.display()),
                }
            }
        };
        let stderr = match log.try_clone() {
            Ok(f) => f,
            Err(e) => {
                return ExecEvent::Failed {
                    error: format!("cannot open log: {e}"),
                }
            }
        };
        let mut cmd = Command::new(program);
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
            Err(e) => {
                return ExecEvent::Failed {
                    error: format!("cannot start {program:?}: {e}"),
                }
            }
        };
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
                    Some(code) => ExecEvent::Exited { code },
                    None => ExecEvent::Failed { error: format!("killed by signal ({st})") },
                },
                Err(e) => ExecEvent::Failed { error: format!("wait failed: {e}") },
            },
            () = &mut deadline => {
                kill_group(&mut child).await;
                ExecEvent::Failed { error: timeout_error(spec.timeout_ms) }
            }
            () = super::cancelled(&mut cancel) => {
                kill_group(&mut child).await;
                ExecEvent::Stopped
            }
        };
        outcome
    }

    async fn cleanup_orphans(&self, _node: &NodeId) -> Result<usize, String> {
        // Children die with the peer (kill_on_drop, and a restart has no children).
        Ok(0)
    }
}

/// Kills the child's whole process group, then reaps it.
async fn kill_group(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        // The child leads its own process group: `kill -KILL -PGID` takes its children too.
        let _ = Command::new("kill")
            .args(["-KILL", &format!("-{pid}")])
            .status()
            .await;
    }
    let _ = child.kill().await;
    let _ = child.wait().await;
}
