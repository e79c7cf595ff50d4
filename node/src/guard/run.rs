//! The guard process (`omesh guard`): reads its [`Plan`], runs or watches the instance, and
//! kills it on end-of-file (unless it outlives its peer), at the deadline, on a signal or on
//! order. See the module above; the watch itself is in `watch.rs`.
//!
//! It runs on a current-thread runtime plus one reaper thread (it is the child subreaper of
//! what it starts, so it reaps every orphan too), and writes nothing but its reports.

use std::process::ExitCode;
use std::time::Duration;

use rustix::process::{Pid, Signal, WaitOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::watch::{Cause, Link, Survivor, Watch};
use super::{Attached, AttachedTarget, CgroupPlan, FromGuard, Plan, ProcessPlan, Target};
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
