//! The peer's side of a guard: start it, feed it renewals and orders, read its reports.

use std::process::Stdio;

use omesh_protocol::{Epoch, NodeId};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::warn;

use super::{Attached, FromGuard, Plan, ToGuard, GUARD_ARG0};
use crate::exec::ExecError;

/// A running guard. Dropping it closes the guard's stdin (or socket), which makes the guard
/// kill its instance: an instance whose run was abandoned does not live on, unless its plan
/// says it survives its peer (then the guard keeps it until its deadline and waits for the
/// peer's next incarnation).
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

/// The longest path a unix socket can be bound at (`sun_path` less its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// How long a surviving guard may take to answer an attach.
const ATTACH_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a surviving guard could not be attached to.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Nothing listens on the socket: its guard is gone (the file is stale).
    #[error("no guard listens on {0}")]
    Stale(std::path::PathBuf),
    /// It did not answer as a guard of this node's user should.
    #[error("{0}")]
    Failed(String),
}

impl Guard {
    /// Starts a guard for `plan` on behalf of `node`; its deadline follows `lease` (the
    /// instant until which the instance's lease holds, less the margin). The plan's
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
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(ExecError::Guard("the guard has no pipes".into()));
        };
        plan.window_ms = remaining_ms(*lease.borrow_and_update());
        let mut first = serde_json::to_vec(&plan)
            .map_err(|e| ExecError::Guard(format!("cannot encode the plan: {e}")))?;
        first.push(b'\n');
        Ok(Self::over(
            stdin,
            BufReader::new(stdout).lines(),
            first,
            lease,
            None,
            pid,
            // Reap it.
            async move {
                let _ = child.wait().await;
            },
        ))
    }

    /// Attaches to the surviving guard listening on `socket` (started by an earlier
    /// incarnation of this peer): checks it runs as this peer's user, says `Attach`, and
    /// reads what it watches. [`Attaching::follow`] then makes it a [`Guard`].
    pub async fn attach(socket: &std::path::Path) -> Result<Attaching, AttachError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            AttachError::Failed(format!("{what} {}: {e}", socket.display()))
        };
        let stream = match tokio::net::UnixStream::connect(socket).await {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                return Err(AttachError::Stale(socket.to_owned()))
            }
            Err(e) => return Err(failed("cannot connect to", &e)),
        };
        let cred = stream
            .peer_cred()
            .map_err(|e| failed("cannot tell who listens on", &e))?;
        let me = rustix::process::geteuid().as_raw();
        if cred.uid() != me {
            return Err(AttachError::Failed(format!(
                "{} is held by uid {}, not this peer's {me}",
                socket.display(),
                cred.uid()
            )));
        }
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut hello = serde_json::to_vec(&ToGuard::Attach)
            .map_err(|e| failed("cannot encode an attach for", &e))?;
        hello.push(b'\n');
        write
            .write_all(&hello)
            .await
            .map_err(|e| failed("cannot write to", &e))?;
        let answer = tokio::time::timeout(ATTACH_WITHIN, lines.next_line())
            .await
            .map_err(|_| {
                AttachError::Failed(format!(
                    "the guard on {} did not answer within {}s",
                    socket.display(),
                    ATTACH_WITHIN.as_secs()
                ))
            })?
            .map_err(|e| failed("cannot read from", &e))?
            .ok_or_else(|| {
                AttachError::Failed(format!("the guard on {} hung up", socket.display()))
            })?;
        let info = match serde_json::from_str::<FromGuard>(&answer) {
            Ok(FromGuard::Attached(a)) => a,
            Ok(other) => {
                return Err(AttachError::Failed(format!(
                    "the guard on {} answered {other:?}",
                    socket.display()
                )))
            }
            Err(e) => return Err(failed("unreadable answer on", &e)),
        };
        Ok(Attaching {
            info,
            write,
            lines,
            pid: cred.pid().and_then(|p| u32::try_from(p).ok()),
        })
    }

    /// A guard reached through `to` and `from`: `first` is written at once, then renewals
    /// from `lease` (when it changes), new epochs from `epoch` and orders; `ended` runs once
    /// the guard's reports end.
    fn over<W, R>(
        mut to: W,
        from: tokio::io::Lines<BufReader<R>>,
        first: Vec<u8>,
        mut lease: watch::Receiver<Instant>,
        mut epoch: Option<watch::Receiver<Epoch>>,
        pid: Option<u32>,
        ended: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Self
    where
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
    {
        let (orders, mut order_rx) = mpsc::unbounded_channel::<ToGuard>();
        tokio::spawn(async move {
            if !first.is_empty() && to.write_all(&first).await.is_err() {
                return;
            }
            let mut renewing = true;
            loop {
                let order = tokio::select! {
                    o = order_rx.recv() => match o {
                        Some(o) => o,
                        // Dropped: close the link, so the guard ends the instance (or, for
                        // one that survives its peer, waits for the next incarnation).
                        None => return,
                    },
                    changed = lease.changed(), if renewing => match changed {
                        Ok(()) => ToGuard::Renew { ms: remaining_ms(*lease.borrow_and_update()) },
                        // The executor let go of it: no more renewals; orders may still come.
                        Err(_) => {
                            renewing = false;
                            continue;
                        }
                    },
                    changed = changed_epoch(&mut epoch) => match changed {
                        Some(epoch) => ToGuard::Rekey { epoch },
                        None => continue,
                    },
                };
                let Ok(mut line) = serde_json::to_vec(&order) else {
                    continue;
                };
                line.push(b'\n');
                if to.write_all(&line).await.is_err() || to.flush().await.is_err() {
                    return;
                }
            }
        });
        let (report_tx, reports) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = from;
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
            ended.await;
        });
        Self {
            orders,
            reports,
            pid,
        }
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

/// A surviving guard that answered an attach, not yet followed.
#[derive(Debug)]
pub struct Attaching {
    /// What it watches.
    pub info: Attached,
    write: tokio::net::unix::OwnedWriteHalf,
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pid: Option<u32>,
}

impl Attaching {
    /// The guard's pid.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Takes the guard over: renews its deadline from `lease` (only when that changes: until
    /// then the deadline the earlier incarnation set holds) and tells it each new epoch
    /// `epoch` moves to. Dropping the guard without an order detaches it again.
    pub fn follow(self, lease: watch::Receiver<Instant>, epoch: watch::Receiver<Epoch>) -> Guard {
        Guard::over(
            self.write,
            self.lines,
            Vec::new(),
            lease,
            Some(epoch),
            self.pid,
            async {},
        )
    }
}

/// The next epoch `epoch` moves to; pends forever without one (or once its sender is gone,
/// after which it is set to `None`).
async fn changed_epoch(epoch: &mut Option<watch::Receiver<Epoch>>) -> Option<Epoch> {
    let Some(rx) = epoch else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_ok() {
        return Some(*rx.borrow_and_update());
    }
    *epoch = None;
    None
}

/// Milliseconds from now until `until` (0 if past).
fn remaining_ms(until: Instant) -> u64 {
    u64::try_from(until.saturating_duration_since(Instant::now()).as_millis()).unwrap_or(u64::MAX)
}
