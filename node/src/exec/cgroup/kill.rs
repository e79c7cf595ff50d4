//! Killing every process of a cgroup while those processes may be forking.
//!
//! Reading `cgroup.procs` and sending SIGKILL to each pid races with `fork`: a child forked
//! after the read is missed, and a fork bomb can outpace the loop for a long time. So the
//! group is first stopped: cgroup v2 (5.14+) has `cgroup.kill`, which the kernel applies to
//! every process atomically; otherwise the freezer (v1 `freezer.state`, v2 `cgroup.freeze`)
//! stops every process, the pids read while frozen are all that exist, each gets SIGKILL, and
//! the thaw lets them die (a frozen process dies of SIGKILL only once thawed on v1). Without
//! any freezer this falls back to kill-until-empty, which wins only as long as `pids.max`
//! bounds the forking. Every loop is bounded by a deadline.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

use super::files;

/// How a cgroup's processes are kept from forking while they are killed.
#[derive(Debug, Clone)]
pub(super) enum Stopper {
    /// cgroup v2 `cgroup.kill` (this file): the kernel kills the whole group at once.
    KillFile(PathBuf),
    /// cgroup v1 freezer: this cgroup's `freezer.state`.
    FreezerV1(PathBuf),
    /// cgroup v2 freezer (5.2+): the cgroup dir, with `cgroup.freeze` and `cgroup.events`.
    FreezerV2(PathBuf),
    /// No way to stop forking: kill until empty.
    None,
}

/// Polling interval while waiting for the kernel (freezing, processes exiting).
const POLL: Duration = Duration::from_millis(2);

/// Kills every process listed in any of `procs` (the `cgroup.procs` of each hierarchy) by
/// `deadline`, never this process itself. Returns how many live processes it sent SIGKILL
/// (with `cgroup.kill`: how many were listed just before); zombies are not counted.
pub(super) fn kill_all(procs: &[PathBuf], stopper: &Stopper, deadline: Instant) -> usize {
    let me = std::process::id();
    let listed: Vec<u32> = list(procs).into_iter().filter(|p| !is_dead(*p)).collect();
    if listed.is_empty() {
        return 0;
    }
    // Freezing or killing a group we are in would stop or kill us too.
    let stopper = if listed.contains(&me) {
        tracing::warn!("this process is in the cgroup it is emptying; killing one pid at a time");
        &Stopper::None
    } else {
        stopper
    };
    if let Stopper::KillFile(kill) = stopper {
        match files::write(kill, "1") {
            Ok(()) => {
                if !wait_empty(procs, deadline) {
                    tracing::warn!(file = %kill.display(), "cgroup not empty after cgroup.kill");
                }
                return listed.len();
            }
            Err(e) => tracing::warn!(error = %e, "cgroup.kill failed; killing one pid at a time"),
        }
    }
    let mut killed = HashSet::new();
    loop {
        let frozen = freeze(stopper, deadline);
        for pid in list(procs) {
            if pid != me && !is_dead(pid) && sigkill(pid) {
                killed.insert(pid);
            }
        }
        if frozen {
            thaw(stopper);
        }
        let round = (Instant::now() + Duration::from_millis(100)).min(deadline);
        if wait_empty(procs, round) {
            break;
        }
        if Instant::now() >= deadline {
            let left = list(procs).into_iter().filter(|p| !is_dead(*p)).count();
            tracing::warn!(left, "cgroup not empty by the kill deadline");
            break;
        }
    }
    killed.len()
}

/// The pids in any of `procs`, sorted, each once.
pub(super) fn list(procs: &[PathBuf]) -> Vec<u32> {
    let mut pids: Vec<u32> = procs.iter().flat_map(|p| files::read_pids(p)).collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Waits until no live process is left: a zombie is dead but, on some kernels, listed until
/// its parent reaps it, which is the caller's job, not something to wait for here.
fn wait_empty(procs: &[PathBuf], until: Instant) -> bool {
    loop {
        if list(procs).into_iter().all(is_dead) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Whether `pid` is a zombie or gone: the state in `/proc/<pid>/stat`, after the command name
/// in parentheses (which may itself hold spaces and parentheses).
fn is_dead(pid: u32) -> bool {
    crate::procfs::stat(pid).is_none_or(|s| s.is_dead())
}

fn sigkill(pid: u32) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .is_some_and(|pid| kill_process(pid, Signal::KILL).is_ok())
}

/// Freezes the group and waits until the kernel says it is frozen (a freeze can sit in
/// FREEZING while a process is in an uninterruptible sleep). Whether it got frozen; a group
/// that did not is still killed, and the loop tries again.
fn freeze(stopper: &Stopper, deadline: Instant) -> bool {
    let until = (Instant::now() + Duration::from_secs(1)).min(deadline);
    let (control, value) = match stopper {
        Stopper::FreezerV1(state) => (state.clone(), "FROZEN"),
        Stopper::FreezerV2(dir) => (dir.join("cgroup.freeze"), "1"),
        Stopper::KillFile(_) | Stopper::None => return false,
    };
    for attempt in 0u32.. {
        // Asking again now and then un-sticks a v1 freeze that raced with a fork.
        if attempt % 50 == 0 {
            if let Err(e) = files::write(&control, value) {
                tracing::warn!(error = %e, "cannot freeze cgroup");
                return false;
            }
        }
        if is_frozen(stopper) {
            return true;
        }
        if Instant::now() >= until {
            break;
        }
        std::thread::sleep(POLL);
    }
    // Thaw what did freeze so that the kill and the next round start clean.
    thaw(stopper);
    false
}

fn is_frozen(stopper: &Stopper) -> bool {
    match stopper {
        Stopper::FreezerV1(state) => files::read(state).is_some_and(|s| s.trim() == "FROZEN"),
        Stopper::FreezerV2(dir) => {
            files::read_keyed(&dir.join("cgroup.events"), "frozen") == Some(1)
        }
        Stopper::KillFile(_) | Stopper::None => false,
    }
}

fn thaw(stopper: &Stopper) {
    let result = match stopper {
        Stopper::FreezerV1(state) => files::write(state, "THAWED"),
        Stopper::FreezerV2(dir) => files::write(&dir.join("cgroup.freeze"), "0"),
        Stopper::KillFile(_) | Stopper::None => Ok(()),
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot thaw cgroup");
    }
}
