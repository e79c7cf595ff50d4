//! The guard process (`omesh guard`): reads its [`Plan`], runs or watches the instance, and
//! kills it on end-of-file, at the deadline, on a signal or on order. See the module above.
//!
//! It runs on a current-thread runtime plus one reaper thread (it is the child subreaper of
//! what it starts, so it reaps every orphan too), and writes nothing but its reports.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use rustix::process::{Pid, Signal, WaitOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    Attached, AttachedTarget, CgroupPlan, FromGuard, Plan, ProcessPlan, Survival, Target, ToGuard,
};
use crate::exec::cgroup::{Hierarchy, Limits, TaskCgroup};

/// How long killing an instance may take before the guard gives up on it and says so.
const KILL_WITHIN: Duration = Duration::from_secs(10);

/// Runs a guard; returns when its instance is gone.
pub fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("omesh guard: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(guard()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("omesh guard: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How long a peer that connected to a surviving guard's socket may take to say `Attach`.
const ATTACH_WITHIN: Duration = Duration::from_secs(1);

/// What ends a guard's watch.
enum Cause {
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
enum Link {
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
struct Survivor {
    listener: UnixListener,
    path: std::path::PathBuf,
    info: Attached,
    since: Instant,
}

impl Survivor {
    /// Listens on `s.socket` (a stale file there is replaced), made 0600.
    fn bind(s: &Survival, target: AttachedTarget) -> Result<Self, String> {
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
struct Watch {
    link: Link,
    deadline: Instant,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    survivor: Option<Survivor>,
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
    async fn report(&mut self, msg: &FromGuard) {
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
    async fn report_end(&mut self, end: &FromGuard) {
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
    async fn until<T>(&mut self, ended: &mut mpsc::UnboundedReceiver<T>) -> Result<Cause, T> {
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

async fn guard() -> Result<(), String> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines
        .next_line()
        .await
        .map_err(|e| format!("cannot read the plan: {e}"))?
        .ok_or("no plan on stdin (the guard is started by the peer, not by hand)")?;
    let plan: Plan = serde_json::from_str(&first).map_err(|e| format!("bad plan: {e}"))?;
    let sig = |kind| signal(kind).map_err(|e| format!("cannot watch signals: {e}"));
    let survivor = plan.survive.as_ref().and_then(|s| {
        let target = match &plan.target {
            Target::Process(p) => AttachedTarget::Process {
                pid: None,
                cgroup: p.cgroup.as_ref().map(|c| c.name.clone()),
                cwd: p.cwd.clone(),
            },
            Target::Container { name } => AttachedTarget::Container { name: name.clone() },
        };
        Survivor::bind(s, target)
            .map_err(|e| {
                eprintln!(
                    "omesh guard: {}: {e}; the instance ends with its peer",
                    plan.label
                );
            })
            .ok()
    });
    let mut watch = Watch {
        link: Link::Pipe(lines),
        deadline: Instant::now() + Duration::from_millis(plan.window_ms),
        term: sig(SignalKind::terminate())?,
        int: sig(SignalKind::interrupt())?,
        hup: sig(SignalKind::hangup())?,
        survivor,
    };
    match plan.target {
        Target::Process(p) => guard_process(&plan.label, p, &mut watch).await,
        Target::Container { name } => guard_container(&plan.label, &name, &mut watch).await,
    }
}

/// How the main child ended, from the reaper.
#[derive(Debug, Clone, Copy)]
enum ChildEnd {
    Exited(i32),
    Signaled(i32),
}

async fn guard_process(label: &str, p: ProcessPlan, watch: &mut Watch) -> Result<(), String> {
    // Orphans of the instance (a grandchild whose parent exited) come to the guard, not to
    // init, so none escapes the kill.
    if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        eprintln!("omesh guard: {label}: cannot become child subreaper ({e}); orphans may escape");
    }
    let cgroup = match p.cgroup.as_ref().map(make_cgroup).transpose() {
        Ok(c) => c,
        Err(reason) => {
            watch.report(&FromGuard::Failed { reason }).await;
            return Ok(());
        }
    };
    let pid = match spawn(&p, cgroup.as_ref()) {
        Ok(pid) => pid,
        Err(reason) => {
            if let Some(c) = cgroup {
                let _ = c.remove();
            }
            watch.report(&FromGuard::Failed { reason }).await;
            return Ok(());
        }
    };
    let raw_pid = pid.as_raw_nonzero().get().unsigned_abs();
    if let Some(Survivor {
        info:
            Attached {
                target: AttachedTarget::Process { pid, .. },
                ..
            },
        ..
    }) = &mut watch.survivor
    {
        *pid = Some(raw_pid);
    }
    watch.report(&FromGuard::Started { pid: raw_pid }).await;
    let mut ended = reaper(pid);
    let cause = watch.until(&mut ended).await;
    let by_itself = cause.is_err();
    let end = match cause {
        Err(end) => {
            // Ended by itself: whatever it left behind goes too.
            kill_instance(pid, cgroup.as_ref());
            let oom = cgroup.as_ref().is_some_and(TaskCgroup::oom_killed);
            Some(match end {
                ChildEnd::Exited(code) => FromGuard::Exited { code },
                ChildEnd::Signaled(signal) => FromGuard::Signaled {
                    signal,
                    oom,
                    memory_limit: oom
                        .then(|| p.cgroup.as_ref().map(|c| c.memory_bytes))
                        .flatten(),
                },
            })
        }
        Ok(cause) => {
            kill_instance(pid, cgroup.as_ref());
            // Wait for the main child's status (reaped once killed).
            let _ = tokio::time::timeout(KILL_WITHIN, ended.recv()).await;
            match cause {
                Cause::Expired => Some(FromGuard::Expired),
                Cause::Stopped | Cause::Released => Some(FromGuard::Stopped),
                Cause::PeerGone => None,
            }
        }
    };
    if let Some(c) = cgroup {
        if let Err(e) = c.remove() {
            eprintln!("omesh guard: {label}: {e}");
        }
    }
    match end {
        // Worth waiting for a peer to attach: how the task ended is its outcome.
        Some(end) if by_itself => watch.report_end(&end).await,
        Some(end) => watch.report(&end).await,
        None => {}
    }
    Ok(())
}

fn make_cgroup(c: &CgroupPlan) -> Result<TaskCgroup, String> {
    let h = Hierarchy::detect(&c.parent).map_err(|e| format!("cannot set limits: {e}"))?;
    let limits = Limits {
        cpu_millis: c.cpu_millis,
        memory_bytes: c.memory_bytes,
        pids: c.pids,
    };
    TaskCgroup::create(&h, &c.parent, &c.name, &limits)
        .map_err(|e| format!("cannot set limits: {e}"))
}

/// Starts the task: in its own process group, through `omesh guard-exec` (a fresh
/// single-threaded process) which joins the cgroup while still privileged, drops to the task
/// user, asks to be killed when the guard dies, and then executes the task's program.
fn spawn(p: &ProcessPlan, cgroup: Option<&TaskCgroup>) -> Result<Pid, String> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&p.log)
        .map_err(|e| format!("cannot open log {}: {e}", p.log.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("cannot open log {}: {e}", p.log.display()))?;
    let mut cmd = std::process::Command::new(super::handle::guard_program());
    cmd.arg0(TASK_EXEC_ARG0).arg("guard-exec");
    for path in cgroup.map(TaskCgroup::join_paths).unwrap_or_default() {
        cmd.arg("--join")
            .arg(std::ffi::OsStr::from_bytes(path.as_bytes()));
    }
    if let Some((uid, gid)) = p.user {
        cmd.arg("--uid").arg(uid.to_string());
        cmd.arg("--gid").arg(gid.to_string());
    }
    cmd.arg("--")
        .arg(&p.program)
        .args(&p.args)
        .env_clear()
        .envs(p.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&p.cwd)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", p.program))?;
    let raw = i32::try_from(child.id()).map_err(|_| "pid out of range".to_owned())?;
    // The reaper waits for it; dropping the handle neither waits nor kills.
    drop(child);
    Pid::from_raw(raw).ok_or_else(|| "spawn returned pid 0".to_owned())
}

/// argv[0] of a task between the guard's fork and the task's own program.
const TASK_EXEC_ARG0: &str = "omesh-task-exec";

/// `omesh guard-exec`: the first moments of a process task, in the task's own process.
/// Joins the cgroup (`join`: cgroup.procs files), takes the task user (`user`), asks for
/// SIGKILL when the guard dies, then executes `command` with the environment it was given.
/// Returns only on failure (127, with the reason on stderr, which is the task's log).
pub fn exec_task(
    join: &[std::path::PathBuf],
    user: Option<(u32, u32)>,
    command: &[String],
) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let fail = |what: String| {
        eprintln!("[omesh] cannot start the task: {what}");
        ExitCode::from(127)
    };
    let Some((program, args)) = command.split_first() else {
        return fail("empty command".into());
    };
    let guard = rustix::process::getppid();
    for path in join {
        if let Err(e) = std::fs::write(path, b"0") {
            return fail(format!("cannot join cgroup {}: {e}", path.display()));
        }
    }
    if let Some((uid, gid)) = user {
        let gid = rustix::process::Gid::from_raw(gid);
        let uid = rustix::process::Uid::from_raw(uid);
        if let Err(e) = rustix::thread::set_thread_groups(&[])
            .and_then(|()| rustix::thread::set_thread_res_gid(gid, gid, gid))
            .and_then(|()| rustix::thread::set_thread_res_uid(uid, uid, uid))
        {
            return fail(format!("cannot switch to the task user: {e}"));
        }
    }
    // After the user change, which would clear it.
    if let Err(e) = rustix::process::set_parent_process_death_signal(Some(Signal::KILL)) {
        return fail(format!("cannot ask to die with the guard: {e}"));
    }
    if rustix::process::getppid() != guard {
        return fail("the guard is gone".into());
    }
    let e = std::process::Command::new(program).args(args).exec();
    fail(format!("{program:?}: {e}"))
}

/// Reaps every child of the guard (the task and the orphans it hands over) on a thread of
/// its own; the task's own end is sent on the channel.
fn reaper(main: Pid) -> mpsc::UnboundedReceiver<ChildEnd> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || loop {
        match rustix::process::wait(WaitOptions::empty()) {
            Ok(Some((pid, status))) => {
                if pid == main {
                    let end = match (status.exit_status(), status.terminating_signal()) {
                        (Some(code), _) => ChildEnd::Exited(code),
                        (None, Some(sig)) => ChildEnd::Signaled(sig),
                        (None, None) => ChildEnd::Signaled(0),
                    };
                    let _ = tx.send(end);
                }
            }
            Ok(None) => {}
            Err(rustix::io::Errno::INTR) => {}
            // No child left: wait a little for orphans the kill may still hand over.
            Err(rustix::io::Errno::CHILD) => {
                if tx.is_closed() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => return,
        }
    });
    rx
}

/// Kills every process of the instance: its cgroup (race-free), else its process group and
/// every process the guard became the parent of, until none is left.
fn kill_instance(main: Pid, cgroup: Option<&TaskCgroup>) {
    if let Some(c) = cgroup {
        c.kill_all();
    }
    let _ = rustix::process::kill_process_group(main, Signal::KILL);
    let me = rustix::process::getpid();
    let deadline = std::time::Instant::now() + KILL_WITHIN;
    loop {
        let children = children_of(me);
        if children.is_empty() || std::time::Instant::now() >= deadline {
            if !children.is_empty() {
                eprintln!(
                    "omesh guard: {} process(es) survived SIGKILL for {}s",
                    children.len(),
                    KILL_WITHIN.as_secs()
                );
            }
            return;
        }
        for pid in children {
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Living (not zombie) children of `parent`, from /proc.
fn children_of(parent: Pid) -> Vec<Pid> {
    let parent = parent.as_raw_nonzero().get();
    crate::procfs::processes()
        .filter(|pid| {
            crate::procfs::stat(pid.as_raw_nonzero().get().unsigned_abs())
                .is_some_and(|s| s.ppid == parent && !s.is_dead())
        })
        .collect()
}

async fn guard_container(label: &str, name: &str, watch: &mut Watch) -> Result<(), String> {
    let (_never_tx, mut never) = mpsc::unbounded_channel::<()>();
    let cause = match watch.until(&mut never).await {
        Ok(c) => c,
        Err(()) => Cause::PeerGone,
    };
    if matches!(cause, Cause::Released) {
        return Ok(());
    }
    if let Err(e) = kill_container(name).await {
        eprintln!("omesh guard: {label}: cannot remove container {name}: {e}");
    }
    match cause {
        Cause::Expired => watch.report(&FromGuard::Expired).await,
        Cause::Stopped => watch.report(&FromGuard::Stopped).await,
        Cause::PeerGone | Cause::Released => {}
    }
    Ok(())
}

/// Kills and removes a container, retrying while the engine does not answer.
async fn kill_container(name: &str) -> Result<(), String> {
    use bollard::query_parameters::RemoveContainerOptionsBuilder;
    let docker = bollard::Docker::connect_with_defaults().map_err(|e| e.to_string())?;
    let options = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    let deadline = Instant::now() + KILL_WITHIN;
    loop {
        match docker.remove_container(name, Some(options.clone())).await {
            Ok(()) => return Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
