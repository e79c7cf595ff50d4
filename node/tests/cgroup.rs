//! Task cgroups on this host's real cgroup hierarchy: limits hold against a memory hog, a
//! busy loop and a fork bomb, and kill_all empties a group that keeps forking.
//!
//! Needs a writable hierarchy (root, or a delegated v2 subtree). Without one each test prints
//! why and passes, unless `OMESH_REQUIRE_CGROUPS=1` (CI), which makes that a failure. The
//! measured numbers are printed: run with `--nocapture` to see them.
#![allow(clippy::unwrap_used)]

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

mod common;

use omesh::exec::cgroup::{self, Hierarchy, Limits, TaskCgroup};

const PARENT: &str = "omesh-test";

/// A cgroup name no other test (or test run) uses at the same time.
fn unique(what: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A task cgroup with a child in it, emptied and removed however the test ends.
struct Running {
    cgroup: Option<TaskCgroup>,
    child: Child,
}

impl Running {
    /// Creates `name` with `limits` and starts `program args` in it.
    fn start(h: &Hierarchy, name: &str, limits: &Limits, program: &str, args: &[&str]) -> Self {
        let cgroup = TaskCgroup::create(h, PARENT, name, limits).unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cgroup.join_on_spawn(&mut cmd);
        let child = cmd.spawn().unwrap();
        Self {
            cgroup: Some(cgroup),
            child,
        }
    }

    fn cgroup(&self) -> &TaskCgroup {
        self.cgroup.as_ref().unwrap()
    }

    /// Kills everything, reaps the child, removes the cgroup.
    fn finish(mut self) -> std::process::ExitStatus {
        let cgroup = self.cgroup.take().unwrap();
        cgroup.kill_all();
        let status = self.child.wait().unwrap();
        cgroup.remove().unwrap();
        status
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.kill_all();
            let _ = self.child.wait();
            let _ = cgroup.remove();
        }
    }
}

fn wait_for(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn generous() -> Limits {
    Limits {
        cpu_millis: 1000,
        memory_bytes: 256 << 20,
        pids: 64,
    }
}

#[test]
fn kill_all_empties_the_group_and_remove_deletes_it() {
    let Some(h) = common::cgroup_hierarchy(PARENT) else {
        return;
    };
    let name = unique("kill");
    let run = Running::start(
        &h,
        &name,
        &generous(),
        "sh",
        &["-c", "sleep 600 & sleep 600 & wait"],
    );
    let cg = run.cgroup();
    wait_for(
        "sh and two sleeps in the cgroup",
        Duration::from_secs(5),
        || cg.pids().len() >= 3,
    );
    assert!(cg.pids().contains(&run.child.id()));
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", run.child.id())).unwrap();
    let joined = own
        .lines()
        .filter(|l| l.ends_with(&format!("/{PARENT}/{name}")))
        .count();
    let expected = if h.version() == 2 { 1 } else { 3 };
    assert!(joined >= expected, "child joined every hierarchy:\n{own}");
    assert!(cgroup::list(&h, PARENT).contains(&name));

    let killed = cg.kill_all();
    assert!(killed >= 3, "killed {killed}");
    assert!(cg.is_empty(), "left: {:?}", cg.pids());
    assert_eq!(run.finish().signal(), Some(9));
    assert!(TaskCgroup::open(&h, PARENT, &name).is_none(), "removed");
    assert!(!cgroup::list(&h, PARENT).contains(&name));
    eprintln!("kill: killed {killed} processes (v{})", h.version());
}

#[test]
fn memory_hog_is_oom_killed_at_the_limit() {
    let Some(h) = common::cgroup_hierarchy(PARENT) else {
        return;
    };
    let limit = 64 << 20;
    let limits = Limits {
        memory_bytes: limit,
        ..generous()
    };
    let cg = TaskCgroup::create(&h, PARENT, &unique("memory"), &limits).unwrap();
    // tail keeps a "line" with no newline in memory whole: 400 MB of zeros from a head that
    // runs outside the cgroup, so the hog is the direct child and its status tells.
    let mut head = Command::new("head")
        .args(["-c", "400000000", "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut tail = Command::new("tail");
    tail.stdin(head.stdout.take().unwrap())
        .stdout(Stdio::null());
    cg.join_on_spawn(&mut tail);
    let status = tail.spawn().unwrap().wait().unwrap();
    let _ = head.kill();
    head.wait().unwrap();

    let peak = cg.memory_peak_bytes();
    assert_eq!(status.signal(), Some(9), "tail: {status}");
    assert!(cg.oom_killed());
    if let Some(peak) = peak {
        assert!(peak <= limit + (1 << 20), "peak {peak}");
    }
    cg.remove().unwrap();
    eprintln!(
        "memory: limit {} MiB, peak {:?} MiB, OOM-killed (v{})",
        limit >> 20,
        peak.map(|p| p as f64 / f64::from(1 << 20)),
        h.version()
    );
}

#[test]
fn busy_loop_gets_its_cpu_quota() {
    let Some(h) = common::cgroup_hierarchy(PARENT) else {
        return;
    };
    let limits = Limits {
        cpu_millis: 200,
        ..generous()
    };
    let run = Running::start(
        &h,
        &unique("cpu"),
        &limits,
        "sh",
        &["-c", "while :; do :; done"],
    );
    let cg = run.cgroup();
    let Some(before) = cg.cpu_usage_ns() else {
        eprintln!("skipped: no CPU accounting (no cpuacct hierarchy)");
        return;
    };
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = cg.cpu_usage_ns().unwrap() - before;
    let wall = start.elapsed();
    let share = used as f64 / wall.as_nanos() as f64;
    run.finish();
    eprintln!(
        "cpu: quota 20% of a core, used {:.1}% over {:.2} s (v{})",
        share * 100.0,
        wall.as_secs_f64(),
        h.version()
    );
    assert!(share > 0.0, "the loop ran");
    assert!(share <= 0.30, "used {:.1}% of a core", share * 100.0);
}

#[test]
fn fork_bomb_stays_under_pids_max_and_kill_all_wins() {
    let Some(h) = common::cgroup_hierarchy(PARENT) else {
        return;
    };
    let limits = Limits {
        pids: 16,
        ..generous()
    };
    // bash retries a failed fork and goes on; dash gives up, so its bomb burns out by itself.
    let shell = if std::path::Path::new("/bin/bash").exists() {
        "bash"
    } else {
        "sh"
    };
    let run = Running::start(
        &h,
        &unique("pids"),
        &limits,
        shell,
        &["-c", "f() { while :; do f & done; }; f"],
    );
    let cg = run.cgroup();
    let mut sampled = 0;
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        sampled = sampled.max(cg.pids().len());
        std::thread::sleep(Duration::from_millis(5));
    }
    let peak = cg.pids_peak();
    let started = Instant::now();
    let killed = cg.kill_all();
    let took = started.elapsed();
    assert!(cg.is_empty(), "left: {:?}", cg.pids());
    eprintln!(
        "pids: max 16, sampled up to {sampled}, pids.peak {peak:?}; kill_all killed {killed} \
         in {took:?} (v{}, {shell})",
        h.version()
    );
    run.finish();
    assert!(sampled <= 16, "sampled {sampled}");
    assert!(peak.is_none_or(|p| p <= 16), "peak {peak:?}");
    if shell == "bash" {
        assert!(sampled >= 8, "the bomb forked: {sampled}");
    }
}

#[test]
fn create_over_a_leftover_kills_it_and_starts_fresh() {
    let Some(h) = common::cgroup_hierarchy(PARENT) else {
        return;
    };
    let name = unique("leftover");
    let mut old = Running::start(&h, &name, &generous(), "sleep", &["600"]);
    wait_for("sleep in the cgroup", Duration::from_secs(5), || {
        !old.cgroup().is_empty()
    });
    // A restarted peer: opens what the last run left and makes it anew.
    let fresh = TaskCgroup::create(&h, PARENT, &name, &generous()).unwrap();
    assert!(fresh.is_empty());
    assert_eq!(old.child.wait().unwrap().signal(), Some(9));
    old.cgroup.take(); // already removed by create
    assert_eq!(
        fresh.cpu_usage_ns().unwrap_or(0),
        0,
        "counters start at zero"
    );
    fresh.remove().unwrap();
}

#[test]
fn a_child_that_cannot_join_does_not_start() {
    let Some(h) = common::cgroup_hierarchy(PARENT) else {
        return;
    };
    let cg = TaskCgroup::create(&h, PARENT, &unique("gone"), &generous()).unwrap();
    let mut cmd = Command::new("true");
    cg.join_on_spawn(&mut cmd);
    cg.remove().unwrap();
    let err = cmd.spawn().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
}

#[test]
fn kill_all_catches_a_chain_that_changes_pid_as_it_goes() {
    let Some(h) = common::cgroup_hierarchy(PARENT) else {
        return;
    };
    // Each link starts the next in the background and exits: a pid read from cgroup.procs
    // may be gone by the time a plain kill loop sends to it (pkill loses this race; here
    // the kernel's abort of a fork with SIGKILL pending lets a loop win too, so this checks
    // that kill_all wins, not that only the freezer could). Frozen, the chain cannot move. (A shell function calling itself would stop at dash's
    // recursion limit; a new sh per link does not.)
    let link = r#"sh -c "$0" "$0" &"#;
    // Dead links are orphans that init reaps; until it does they count against pids.max, and
    // an init that reaps lazily would let a low limit end the chain before the kill.
    let limits = Limits {
        pids: 4096,
        ..generous()
    };
    let run = Running::start(&h, &unique("hop"), &limits, "sh", &["-c", link, link]);
    let cg = run.cgroup();
    let mut seen = std::collections::HashSet::new();
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        seen.extend(cg.pids());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        seen.len() >= 10,
        "the chain moved: {} pids seen",
        seen.len()
    );
    let started = Instant::now();
    let killed = cg.kill_all();
    let took = started.elapsed();
    assert!(killed >= 1, "the chain was still going");
    assert!(cg.is_empty(), "left: {:?}", cg.pids());
    std::thread::sleep(Duration::from_millis(200));
    assert!(cg.is_empty(), "came back: {:?}", cg.pids());
    eprintln!(
        "hop: {} pids seen in 0.5 s; kill_all killed {killed} in {took:?} (v{})",
        seen.len(),
        h.version()
    );
    run.finish();
}
