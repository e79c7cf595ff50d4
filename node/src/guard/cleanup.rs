//! What a restarted peer ends of its previous incarnation: guards still running (they kill
//! their instances when told to end) and task cgroups with processes left in them; but not
//! what it re-attached to (instances that outlive their peer).

use std::time::Duration;

use omesh_protocol::NodeId;
use rustix::process::{Pid, Signal};
use tracing::info;

use super::GUARD_ARG0;
use crate::exec::cgroup::{self, Hierarchy, TaskCgroup};
use crate::procfs::{self, processes};

/// How long leftover guards get to kill their instances after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// Pids of running guards started for `node` (by any incarnation).
pub fn guards_of(node: &NodeId) -> Vec<Pid> {
    let want = ["guard", "--node", &node.to_hex()];
    processes()
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", pid.as_raw_nonzero()))
            else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| *a == GUARD_ARG0.as_bytes())
                && args.len() >= 4
                && args[1..4].iter().zip(want).all(|(a, w)| *a == w.as_bytes())
        })
        .collect()
}

/// Ends the guards an earlier run of `node` left, but those in `keep` (re-attached): SIGTERM
/// (each kills its instance first), then SIGKILL for any still there after a grace. Returns
/// how many there were.
pub async fn end_leftover_guards(node: &NodeId, keep: &[u32]) -> usize {
    let leftover = || {
        guards_of(node)
            .into_iter()
            .filter(|p| !keep.contains(&p.as_raw_nonzero().get().unsigned_abs()))
            .collect::<Vec<_>>()
    };
    let found = leftover();
    if found.is_empty() {
        return 0;
    }
    info!(
        guards = found.len(),
        "ending guards left by an earlier run of this node"
    );
    for pid in &found {
        let _ = rustix::process::kill_process(*pid, Signal::TERM);
    }
    let deadline = tokio::time::Instant::now() + TERM_GRACE;
    while tokio::time::Instant::now() < deadline && !leftover().is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for pid in leftover() {
        let _ = rustix::process::kill_process(pid, Signal::KILL);
    }
    found.len()
}

/// Kills and removes the task cgroups under `parent` (this node's), but those named in
/// `keep` (re-attached instances). Returns how many held processes.
pub fn remove_leftover_cgroups(parent: &str, keep: &[String]) -> usize {
    let Ok(h) = Hierarchy::detect(parent) else {
        return 0;
    };
    let mut n = 0;
    for name in cgroup::list(&h, parent) {
        if keep.contains(&name) {
            continue;
        }
        if let Some(c) = TaskCgroup::open(&h, parent, &name) {
            if !c.is_empty() {
                n += 1;
            }
            if let Err(e) = c.remove() {
                tracing::warn!(cgroup = %name, error = %e, "cannot remove a leftover task cgroup");
            }
        }
    }
    n
}

/// Processes whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    processes()
        .map(|p| p.as_raw_nonzero().get())
        .filter(|pid| procfs::stat(pid.unsigned_abs()).is_some_and(|s| s.pgrp == pgid))
        .collect()
}

/// Whether process `pid`'s environment holds `entry` (`KEY=value`).
pub fn environ_has(pid: i32, entry: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .any(|kv| kv == entry.as_bytes())
}
