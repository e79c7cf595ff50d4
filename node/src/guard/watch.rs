//! A guard's watch: its line to the peer (the pipe it was started with; for an instance that
//! outlives its peer, then the socket a later incarnation attaches through), its deadline and
//! the signals, until one of them ends the instance. See the module above.

use std::io::Write;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Attached, AttachedTarget, FromGuard, Survival, ToGuard};

/// How long a peer that connected to a surviving guard's socket may take to say `Attach`.
const ATTACH_WITHIN: Duration = Duration::from_secs(1);

/// What ends a guard's watch.
pub(super) enum Cause {
    /// The peer closed the pipe (it died) or sent garbage, and the instance does not survive
    /// its peer.
    PeerGone,
    /// The deadline passed.
    Expired,
    /// The peer ordered a stop, or a signal asked the guard to end.
    Stopped,
    /// The peer released the instance (containers: it ended by itself).
    Released,
}

/// The guard's line to its peer: the pipe it was started with, then (for an instance that
/// survives its peer) the socket a later incarnation attached through.
pub(super) enum Link {
    /// The guard's stdin; reports go to its stdout.
    Pipe(tokio::io::Lines<BufReader<tokio::io::Stdin>>),
    /// A re-attached peer.
    Socket {
        lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
        out: OwnedWriteHalf,
    },
    /// No peer: waiting on the socket for the next incarnation.
    Detached,
}

/// What happened on the link.
enum LinkEvent {
    /// An order.
    Order(ToGuard),
    /// The peer went away (end-of-file, an error, or a line that is no order).
    Closed,
    /// A peer connected to the socket while the guard was detached.
    Connected(UnixStream),
}

/// A guard whose instance outlives its peer: its socket and what it tells whoever attaches.
pub(super) struct Survivor {
    listener: UnixListener,
    path: std::path::PathBuf,
    pub(super) info: Attached,
    since: Instant,
}

impl Survivor {
    /// Listens on `s.socket` (a stale file there is replaced), made 0600.
    pub(super) fn bind(s: &Survival, target: AttachedTarget) -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::remove_file(&s.socket);
        let listener = std::os::unix::net::UnixListener::bind(&s.socket)
            .map_err(|e| format!("cannot listen on {}: {e}", s.socket.display()))?;
        std::fs::set_permissions(&s.socket, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| listener.set_nonblocking(true))
            .map_err(|e| format!("cannot set up {}: {e}", s.socket.display()))?;
        let listener = UnixListener::from_std(listener)
            .map_err(|e| format!("cannot listen on {}: {e}", s.socket.display()))?;
        Ok(Self {
            listener,
            path: s.socket.clone(),
            info: Attached {
                task: s.task,
                epoch: s.epoch,
                started_epoch: s.epoch,
                running_ms: 0,
                deadline_ms: 0,
                timeout_ms: s.timeout_ms,
                target,
            },
            since: Instant::now(),
        })
    }

    /// The answer to an attach, now, with the guard's `deadline`.
    fn answer(&self, deadline: Instant) -> FromGuard {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mut info = self.info.clone();
        info.running_ms = ms(self.since.elapsed());
        info.deadline_ms = ms(deadline.saturating_duration_since(Instant::now()));
        FromGuard::Attached(info)
    }
}

impl Drop for Survivor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The peer's orders, the deadline and the signals, until one of them ends the watch, or
/// `ended` resolves (the instance ended by itself).
pub(super) struct Watch {
    pub(super) link: Link,
    pub(super) deadline: Instant,
    pub(super) term: tokio::signal::unix::Signal,
    pub(super) int: tokio::signal::unix::Signal,
    pub(super) hup: tokio::signal::unix::Signal,
    pub(super) survivor: Option<Survivor>,
}

/// One line from the peer, as an order.
async fn read_order<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
) -> LinkEvent {
    match lines.next_line().await {
        Ok(Some(l)) => match serde_json::from_str::<ToGuard>(&l) {
            Ok(order) => LinkEvent::Order(order),
            Err(e) => {
                eprintln!("omesh guard: unreadable order from the peer ({e})");
                LinkEvent::Closed
            }
        },
        Ok(None) | Err(_) => LinkEvent::Closed,
    }
}

/// The next thing on `link`; a detached link waits for a connection on `listener`.
async fn link_event(link: &mut Link, listener: Option<&UnixListener>) -> LinkEvent {
    match link {
        Link::Pipe(lines) => read_order(lines).await,
        Link::Socket { lines, .. } => read_order(lines).await,
        Link::Detached => loop {
            let Some(l) = listener else {
                return std::future::pending().await;
            };
            match l.accept().await {
                Ok((stream, _)) => return LinkEvent::Connected(stream),
                // Out of descriptors and the like: try again a little later.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        },
    }
}

impl Watch {
    /// Reports to the peer; a peer that is gone is not an error (the guard still does its
    /// job). A surviving guard whose re-attached peer went away is detached again.
    pub(super) async fn report(&mut self, msg: &FromGuard) {
        let Ok(mut line) = serde_json::to_vec(msg) else {
            return;
        };
        line.push(b'\n');
        match &mut self.link {
            Link::Pipe(_) => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&line);
                let _ = out.flush();
            }
            Link::Socket { out, .. } => {
                if out.write_all(&line).await.is_err() || out.flush().await.is_err() {
                    self.link = Link::Detached;
                }
            }
            Link::Detached => {}
        }
    }

    /// Reports how the instance ended. A surviving guard with no peer attached waits for the
    /// next incarnation to attach (until the deadline or a signal) to tell it.
    pub(super) async fn report_end(&mut self, end: &FromGuard) {
        while matches!(self.link, Link::Detached) && self.survivor.is_some() {
            tokio::select! {
                ev = link_event(&mut self.link, self.survivor.as_ref().map(|s| &s.listener)) => {
                    if let LinkEvent::Connected(stream) = ev {
                        self.attach(stream).await;
                    }
                }
                () = tokio::time::sleep_until(self.deadline) => return,
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => return,
            }
        }
        self.report(end).await;
    }

    /// A peer connected to the socket: if it runs as this guard's user and says `Attach` in
    /// time, answer what the guard watches and take orders from it from now on.
    async fn attach(&mut self, stream: UnixStream) {
        let Some(survivor) = &self.survivor else {
            return;
        };
        let me = rustix::process::geteuid().as_raw();
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == me => {}
            Ok(cred) => {
                eprintln!(
                    "omesh guard: {}: refused an attach from uid {}",
                    survivor.info.task.short(),
                    cred.uid()
                );
                return;
            }
            Err(_) => return,
        }
        let (read, out) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let by = (Instant::now() + ATTACH_WITHIN).min(self.deadline);
        match tokio::time::timeout_at(by, read_order(&mut lines)).await {
            Ok(LinkEvent::Order(ToGuard::Attach)) => {}
            _ => return,
        }
        self.link = Link::Socket { lines, out };
        let answer = survivor.answer(self.deadline);
        self.report(&answer).await;
    }

    /// Waits for the next thing that ends the watch; `Err` if `ended` came first.
    pub(super) async fn until<T>(
        &mut self,
        ended: &mut mpsc::UnboundedReceiver<T>,
    ) -> Result<Cause, T> {
        loop {
            tokio::select! {
                biased;
                end = ended.recv() => match end {
                    Some(v) => return Err(v),
                    // The reaper is gone without the status: treat it as the peer's loss.
                    None => return Ok(Cause::PeerGone),
                },
                ev = link_event(&mut self.link, self.survivor.as_ref().map(|s| &s.listener)) => match ev {
                    LinkEvent::Order(ToGuard::Renew { ms }) => {
                        self.deadline = Instant::now() + Duration::from_millis(ms);
                    }
                    LinkEvent::Order(ToGuard::Stop) => return Ok(Cause::Stopped),
                    LinkEvent::Order(ToGuard::Release) => return Ok(Cause::Released),
                    LinkEvent::Order(ToGuard::Rekey { epoch }) => {
                        if let Some(s) = &mut self.survivor {
                            s.info.epoch = epoch;
                        }
                    }
                    LinkEvent::Order(ToGuard::Attach) => {
                        let deadline = self.deadline;
                        if let Some(answer) = self.survivor.as_ref().map(|s| s.answer(deadline)) {
                            self.report(&answer).await;
                        }
                    }
                    LinkEvent::Closed if self.survivor.is_some() => {
                        // The instance outlives its peer: keep it until the deadline the
                        // peer last set, and wait for its next incarnation.
                        self.link = Link::Detached;
                    }
                    LinkEvent::Closed => return Ok(Cause::PeerGone),
                    LinkEvent::Connected(stream) => self.attach(stream).await,
                },
                () = tokio::time::sleep_until(self.deadline) => return Ok(Cause::Expired),
                _ = self.term.recv() => return Ok(Cause::Stopped),
                _ = self.int.recv() => return Ok(Cause::Stopped),
                _ = self.hup.recv() => return Ok(Cause::Stopped),
            }
        }
    }
}
