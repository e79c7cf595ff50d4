//! Task instances as the host sees them: their processes (each carries `OMESH_TASK_ID` and
//! `OMESH_EPOCH` in its environment) and the start markers they write.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A directory every task user can write its markers into.
pub fn marker_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("omesh-guard-markers-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    dir
}

/// Pids of every process of `task`'s instance at `epoch` (any epoch if `None`), from their
/// environment.
pub fn instance_pids(task: &str, epoch: Option<u64>) -> Vec<u32> {
    let id = format!("OMESH_TASK_ID={task}");
    let ep = epoch.map(|e| format!("OMESH_EPOCH={e}"));
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        // A zombie (killed, not yet reaped) runs nothing.
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if zombie {
            continue;
        }
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        if vars.contains(&id.as_bytes()) && ep.as_ref().is_none_or(|e| vars.contains(&e.as_bytes()))
        {
            out.push(pid);
        }
    }
    out
}

/// The epochs with a live process of `task`.
pub fn live_epochs(task: &str) -> Vec<u64> {
    let mut epochs: Vec<u64> = instance_pids(task, None)
        .into_iter()
        .filter_map(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            env.split(|b| *b == 0).find_map(|kv| {
                std::str::from_utf8(kv)
                    .ok()?
                    .strip_prefix("OMESH_EPOCH=")?
                    .parse()
                    .ok()
            })
        })
        .collect();
    epochs.sort_unstable();
    epochs.dedup();
    epochs
}

/// Start markers of `task`: epoch → ns.
pub fn markers(dir: &Path, task: &str) -> BTreeMap<u64, u128> {
    let text = std::fs::read_to_string(dir.join(task)).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        if let (Some(e), Some(t)) = (f.next(), f.next()) {
            if let (Ok(e), Ok(t)) = (e.parse::<u64>(), t.parse::<u128>()) {
                out.entry(e).or_insert(t);
            }
        }
    }
    out
}
