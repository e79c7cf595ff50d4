//! The peer's side of a guard: start it, feed it renewals and orders, read its reports.

use std::process::Stdio;

use omesh_protocol::NodeId;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::warn;

use super::{FromGuard, Plan, ToGuard, GUARD_ARG0};
use crate::exec::ExecError;

/// A running guard. Dropping it closes the guard's stdin, which makes the guard kill its
/// instance: an instance whose run was abandoned does not live on.
#[derive(Debug)]
pub struct Guard {
    orders: mpsc::UnboundedSender<ToGuard>,
    reports: mpsc::UnboundedReceiver<FromGuard>,
    pid: Option<u32>,
}

/// How a guard's watch ended, as the peer reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardEnd {
    /// The guard reported this.
    Report(FromGuard),
    /// The guard went away without a final report.
    Lost,
}

/// The `omesh` binary guards run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardProgram(pub std::path::PathBuf);

impl GuardProgram {
    /// This very binary (`/proc/self/exe` still works after the file was replaced by an
    /// upgrade). A test running a backend in its own process names the `omesh` binary instead.
    pub fn this_binary() -> Self {
        let proc_exe = std::path::Path::new("/proc/self/exe");
        if proc_exe.exists() {
            return Self(proc_exe.to_owned());
        }
        Self(std::env::current_exe().unwrap_or_else(|_| "omesh".into()))
    }
}

impl Default for GuardProgram {
    fn default() -> Self {
        Self::this_binary()
    }
}

/// The program a guard's task starts through (the guard's own binary).
pub(super) fn guard_program() -> std::path::PathBuf {
    GuardProgram::this_binary().0
}

impl Guard {
    /// Starts a guard for `plan` on behalf of `node`; its deadline follows `lease` (the
    /// instant until which this node's leases hold, less the margin). The plan's
    /// `window_ms` is set from `lease` here.
    pub fn spawn(
        program: &GuardProgram,
        mut plan: Plan,
        node: &NodeId,
        mut lease: watch::Receiver<Instant>,
    ) -> Result<Self, ExecError> {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(&program.0);
        cmd.arg0(GUARD_ARG0)
            .args(["guard", "--node", &node.to_hex()])
            // The guard is dumpable (a fresh exec) and, for a peer that is not root, runs as
            // the tasks' own user: it must not carry the API token.
            .env_remove("OMESH_API_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own process group: a Ctrl-C meant for the peer does not reach it; the peer
            // stops it in order instead.
            .process_group(0);
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| ExecError::Guard(format!("cannot start the guard: {e}")))?;
        let pid = child.id();
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(ExecError::Guard("the guard has no pipes".into()));
        };
        plan.window_ms = remaining_ms(*lease.borrow_and_update());
        let mut first = serde_json::to_vec(&plan)
            .map_err(|e| ExecError::Guard(format!("cannot encode the plan: {e}")))?;
        first.push(b'\n');
        let (orders, mut order_rx) = mpsc::unbounded_channel::<ToGuard>();
        tokio::spawn(async move {
            if stdin.write_all(&first).await.is_err() {
                return;
            }
            loop {
                let order = tokio::select! {
                    o = order_rx.recv() => match o {
                        Some(o) => o,
                        // Dropped: close stdin, so the guard ends the instance.
                        None => return,
                    },
                    changed = lease.changed() => match changed {
                        Ok(()) => ToGuard::Renew { ms: remaining_ms(*lease.borrow_and_update()) },
                        // The executor is gone: no more renewals; orders may still come.
                        Err(_) => match order_rx.recv().await {
                            Some(o) => o,
                            None => return,
                        },
                    },
                };
                let Ok(mut line) = serde_json::to_vec(&order) else {
                    continue;
                };
                line.push(b'\n');
                if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
                    return;
                }
            }
        });
        let (report_tx, reports) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<FromGuard>(&line) {
                    Ok(r) => {
                        if report_tx.send(r).is_err() {
                            break;
                        }
                    }
                    Err(e) => warn!(error = %e, "unreadable report from a guard"),
                }
            }
            // Reap it.
            let _ = child.wait().await;
        });
        Ok(Self {
            orders,
            reports,
            pid,
        })
    }

    /// The guard's pid.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Sends an order (a guard that is gone ignores it).
    pub fn order(&self, order: ToGuard) {
        let _ = self.orders.send(order);
    }

    /// The next report; `GuardEnd::Lost` once the guard is gone.
    pub async fn next(&mut self) -> GuardEnd {
        match self.reports.recv().await {
            Some(r) => GuardEnd::Report(r),
            None => GuardEnd::Lost,
        }
    }
}

/// Milliseconds from now until `until` (0 if past).
fn remaining_ms(until: Instant) -> u64 {
    u64::try_from(until.saturating_duration_since(Instant::now()).as_millis()).unwrap_or(u64::MAX)
}
