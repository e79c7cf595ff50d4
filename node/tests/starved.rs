//! An owner starved of CPU keeps its leases: moved into a cgroup with 1% of a core for 30 s,
//! a peer that owns a few tasks must still answer its probes in time, so no other peer takes
//! a task over (same owner, same epoch afterwards, and one instance per task throughout).
//!
//! What this rests on is the peer's idle cost: probes, acks, anti-entropy and QUIC upkeep
//! must fit in well under 1% of a core (`omesh bench mesh` measures it).
//!
//! Needs a writable cgroup hierarchy (root, or a delegated v2 subtree; v1's `cpu` controller
//! does as well: quota 1,000 µs per 100,000 µs period, like v2 `cpu.max "1000 100000"`).
//! Without one the test prints why and passes, unless `OMESH_REQUIRE_CGROUPS=1`.
//!
//! Only an optimised build is held to 1%: under `cargo test` without `--release` the test
//! prints that and passes (an unoptimised peer's idle cost is several times higher).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{
    cgroup_hierarchy, dump, fake_cpu_flags, lone_owner, running_with, task_views, wait_until, Node,
    Submitter,
};
use omesh::exec::cgroup::{Hierarchy, Limits, TaskCgroup};

const PARENT: &str = "omesh-test";
const TASKS: usize = 3;
const STARVED_FOR: Duration = Duration::from_secs(30);

/// utime + stime of a process, in clock ticks (100 a second on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// The cumulative bucket counts of `omesh_lease_headroom_seconds` in a metrics text:
/// (upper bound, renewals with at most that much time left).
fn headroom_buckets(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("omesh_lease_headroom_seconds_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"} ")?;
            Some((le.to_string(), count.trim().parse().ok()?))
        })
        .collect()
}

/// The owner's cgroup, with its CPU quota lifted and the cgroup removed however the test
/// ends (the owner is moved out first, into the cgroups it was in).
struct Starvation {
    cgroup: Option<TaskCgroup>,
    pid: u32,
    /// The `cgroup.procs` files of the cgroups the owner was in before.
    home: Vec<PathBuf>,
}

impl Starvation {
    /// Moves `pid` (every thread of it) into a new cgroup with 1% of a core.
    fn start(h: &Hierarchy, pid: u32) -> Self {
        let limits = Limits {
            cpu_millis: 10,
            memory_bytes: 1 << 30,
            pids: 4096,
        };
        let name = format!("starved-{}", std::process::id());
        let cgroup = TaskCgroup::create(h, PARENT, &name, &limits).unwrap();
        let home = cgroup_procs_of(pid);
        for path in cgroup.join_paths() {
            let path = PathBuf::from(path.into_string().unwrap());
            std::fs::write(&path, pid.to_string()).unwrap();
        }
        Self {
            cgroup: Some(cgroup),
            pid,
            home,
        }
    }

    /// The CPU the cgroup's processes used so far, ns.
    fn cpu_ns(&self) -> Option<u64> {
        self.cgroup.as_ref()?.cpu_usage_ns()
    }

    /// Moves the owner back where it was and removes the cgroup.
    fn end(&mut self) {
        for procs in &self.home {
            let _ = std::fs::write(procs, self.pid.to_string());
        }
        if let Some(cg) = self.cgroup.take() {
            let _ = cg.remove();
        }
    }
}

impl Drop for Starvation {
    fn drop(&mut self) {
        self.end();
    }
}

/// The `cgroup.procs` file of each cgroup `pid` is in (from `/proc/<pid>/cgroup`), where it
/// exists under /sys/fs/cgroup.
fn cgroup_procs_of(pid: u32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        let mounts: Vec<PathBuf> = if controllers.is_empty() {
            vec![
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/sys/fs/cgroup"),
            ]
        } else {
            let name = controllers.trim_start_matches("name=");
            vec![PathBuf::from("/sys/fs/cgroup").join(name)]
        };
        for m in mounts {
            let procs = m.join(rel).join("cgroup.procs");
            if procs.is_file() {
                out.push(procs);
                break;
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_starved_to_one_percent_of_a_core_for_30_s_keeps_every_lease() {
    if cfg!(debug_assertions) {
        // Measured here: the release peer used 0.62% of a core under the 1% quota and kept
        // every lease; the debug build used all of its 1% (and more was asked), missed probe
        // answers, and lost its tasks within 3 s.
        eprintln!(
            "skipped: needs an optimised omesh, whose idle cost fits in 1% of a core (cargo test --release -p omesh --test starved)"
        );
        return;
    }
    let Some(h) = cgroup_hierarchy(PARENT) else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    // The owner-to-be runs alone at first, so that every task lands on it.
    let mut lone = lone_owner(root.path(), &sub, "owner", "starved", TASKS, 600).await;

    // Three peers join it and learn its tasks.
    let refs: Vec<String> = fake_cpu_flags(&sub);
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    let others: Vec<Node> = (0..3)
        .map(|i| Node::start(root.path(), &format!("p{i}"), &[lone.node.addr()], &refs))
        .collect();
    let joined = wait_until(Duration::from_secs(60), || async {
        for n in others.iter().chain(std::iter::once(&lone.node)) {
            match n.status().await {
                Some(s) if s.ready && s.peers_alive == 4 => {}
                _ => return false,
            }
        }
        for n in &others {
            if !lone.owns_all(&task_views(n, &lone.tasks).await) {
                return false;
            }
        }
        true
    })
    .await;
    if !joined {
        let mut all: Vec<&Node> = others.iter().collect();
        all.push(&lone.node);
        dump(&all);
    }
    assert!(joined, "the peers did not join and learn the tasks");
    // Past the joining's own work (first syncs, records), as in `omesh bench mesh`.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(running_with(&lone.marker), TASKS);

    let pid = lone.node.pid().unwrap();
    let headroom_before = headroom_buckets(&lone.node.text("/metrics").await.unwrap_or_default());
    let ticks_before = cpu_ticks(pid);
    let mut starved = Starvation::start(&h, pid);
    let started = Instant::now();
    let cg_before = starved.cpu_ns();
    // Watch from the others, which are not starved: any change of owner or epoch, and the
    // number of instances, every second.
    let mut seen_moves = Vec::new();
    let mut instances_seen = Vec::new();
    while started.elapsed() < STARVED_FOR {
        for n in &others {
            let v = task_views(n, &lone.tasks).await;
            if !lone.owns_all(&v) {
                seen_moves.push((started.elapsed().as_secs_f64(), n.name.clone(), v));
            }
        }
        instances_seen.push(running_with(&lone.marker));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let used_ticks = cpu_ticks(pid).saturating_sub(ticks_before);
    let cg_used_ms = starved
        .cpu_ns()
        .zip(cg_before)
        .map(|(a, b)| a.saturating_sub(b) / 1_000_000);
    starved.end();
    println!(
        "owner under 1% of a core for {secs:.0} s: used {} ms of CPU by /proc ({:.2}% of a core), {cg_used_ms:?} ms by the cgroup",
        used_ticks * 10,
        used_ticks as f64 / secs
    );
    // How close the owner came to its guards' deadline: renewals while starved, by the time
    // the guards still had (what a shorter lease window would have to fit in).
    let headroom_after = headroom_buckets(&lone.node.text("/metrics").await.unwrap_or_default());
    let during: Vec<String> = headroom_after
        .iter()
        .map(|(le, n)| {
            let before = headroom_before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, b)| *b);
            format!("<={le}s: {}", n - before)
        })
        .collect();
    println!("owner's lease renewals while starved, cumulative by headroom left: {during:?}");
    // Let the owner catch up, then look again, on every peer, the owner included.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut after = Vec::new();
    for n in others.iter().chain(std::iter::once(&lone.node)) {
        after.push((n.name.clone(), task_views(n, &lone.tasks).await));
    }
    if !seen_moves.is_empty() || !after.iter().all(|(_, v)| lone.owns_all(v)) {
        let mut all: Vec<&Node> = others.iter().collect();
        all.push(&lone.node);
        dump(&all);
    }
    assert!(
        seen_moves.is_empty(),
        "a starved owner's task changed hands or epoch while starved: {seen_moves:?}"
    );
    for (name, v) in &after {
        assert!(lone.owns_all(v), "{name} sees the tasks moved: {v:?}");
    }
    assert!(
        instances_seen.iter().all(|n| *n == TASKS),
        "instances of {TASKS} tasks while starved: {instances_seen:?}"
    );
    assert_eq!(
        running_with(&lone.marker),
        TASKS,
        "another instance was started"
    );
    for mut n in others {
        n.terminate();
    }
    lone.node.terminate();
}
