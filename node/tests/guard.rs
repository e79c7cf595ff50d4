//! A task instance never outlives its lease: real peers, real process tasks that fork, real
//! faults (`kill -9`, `kill -STOP`, a restart after the guards were killed too), and the
//! confinement of process tasks (memory, cpu and pids limits; the peer's secrets).
//!
//! Instances write a start marker (`<epoch> <ns since the Unix epoch>`) into a shared
//! directory; the test watches every process of an instance through /proc (each carries
//! `OMESH_TASK_ID` and `OMESH_EPOCH` in its environment) on the same host clock. "No
//! overlap" means: the last process of the lost epoch was gone before the successor epoch's
//! marker was written.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::instances::{instance_pids, live_epochs, marker_dir, markers, now_ns};
use common::{dump, mesh, wait_until, Node, Submitter};
use omesh::exec::cgroup::{Hierarchy, TaskCgroup};

/// Whether this host can run the guard tests' limits (cgroups writable). CI requires it.
fn cgroups_or_skip(test: &str) -> bool {
    match Hierarchy::detect("omesh-guard-probe") {
        Ok(_) => true,
        Err(e) if std::env::var_os("OMESH_REQUIRE_CGROUPS").is_some() => {
            panic!("{test}: cgroups required (OMESH_REQUIRE_CGROUPS) but unusable: {e}")
        }
        Err(e) => {
            eprintln!("SKIP {test}: no writable cgroups here: {e}");
            false
        }
    }
}

/// The command of a forking instance that marks its start. `shape` 0: `sh` with a
/// background child it waits for; 1: `bash` with a foreground child then more work.
fn forking(dir: &Path, shape: usize) -> Vec<String> {
    let mark = format!(
        "echo \"$OMESH_EPOCH $(date +%s%N)\" >> {}/$OMESH_TASK_ID",
        dir.display()
    );
    if shape.is_multiple_of(2) {
        vec![
            "sh".into(),
            "-c".into(),
            format!("{mark}; sleep 600 & wait"),
        ]
    } else {
        vec!["bash".into(), "-c".into(), format!("{mark}; sleep 600; :")]
    }
}

fn flags(sub: &Submitter, cgroup_parent: &str, extra: &[&str]) -> Vec<String> {
    let mut f = sub.flags();
    f.extend(
        ["--fake-cpu-percent", "10", "--cgroup-parent", cgroup_parent]
            .iter()
            .map(|s| (*s).to_owned()),
    );
    f.extend(extra.iter().map(|s| (*s).to_owned()));
    f
}

/// A cgroup parent of this test's own, so parallel tests never see each other's.
fn cgroup_parent() -> String {
    format!("omesh-test-{:08x}", rand::random::<u32>())
}

/// Submits one forking task per shape; waits until each runs with at least two processes
/// (the shell and its child). Returns the task ids.
async fn submit_forking(nodes: &[Node], sub: &Submitter, dir: &Path, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for shape in 0..n {
        let cmd = forking(dir, shape);
        let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let spec = sub.spec(&refs, |_| {});
        ids.push(sub.submit(&nodes[shape % nodes.len()], &spec).await);
    }
    let all_running = wait_until(Duration::from_secs(60), || async {
        for id in &ids {
            let running = nodes[0]
                .task(id)
                .await
                .is_some_and(|t| t.state == "running");
            if !running || instance_pids(id, None).len() < 2 {
                return false;
            }
        }
        true
    })
    .await;
    if !all_running {
        dump(&nodes.iter().collect::<Vec<_>>());
    }
    assert!(all_running, "the forking tasks did not all run");
    ids
}

/// The index of the node owning the most of `ids`, and the (task, epoch) pairs it owns.
async fn busiest_owner(nodes: &[Node], ids: &[String]) -> (usize, Vec<(String, u64)>) {
    let mut by_owner: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for id in ids {
        let t = nodes[0].task(id).await.unwrap();
        by_owner
            .entry(t.owner.clone().unwrap())
            .or_default()
            .push((id.clone(), t.epoch));
    }
    let (owner, owned) = by_owner.into_iter().max_by_key(|(_, v)| v.len()).unwrap();
    for (i, n) in nodes.iter().enumerate() {
        if n.node_id().await == owner {
            return (i, owned);
        }
    }
    panic!("owner {owner} is none of the nodes");
}

/// Polls until no process of any `(task, epoch)` is left; the time that was first seen.
async fn gone_at(owned: &[(String, u64)], limit: Duration) -> Option<u128> {
    let end = std::time::Instant::now() + limit;
    loop {
        let left: usize = owned
            .iter()
            .map(|(t, e)| instance_pids(t, Some(*e)).len())
            .sum();
        if left == 0 {
            return Some(now_ns());
        }
        if std::time::Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until each task runs at a higher epoch than the one lost, and returns each
/// successor's start marker.
async fn successors(
    nodes: &[&Node],
    dir: &Path,
    owned: &[(String, u64)],
) -> Vec<(String, u64, u128)> {
    let moved = wait_until(Duration::from_secs(60), || async {
        for (id, lost) in owned {
            let Some(t) = nodes[0].task(id).await else {
                return false;
            };
            if t.state != "running" || t.epoch <= *lost || !markers(dir, id).contains_key(&t.epoch)
            {
                return false;
            }
        }
        true
    })
    .await;
    if !moved {
        dump(nodes);
    }
    assert!(moved, "the lost tasks did not run again elsewhere");
    let mut out = Vec::new();
    for (id, lost) in owned {
        let m = markers(dir, id);
        let (epoch, at) = m.range(lost + 1..).next().map(|(e, t)| (*e, *t)).unwrap();
        out.push((id.clone(), epoch, at));
    }
    out
}

/// Every node but `victim`.
fn others(nodes: &[Node], victim: usize) -> Vec<&Node> {
    nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, n)| n)
        .collect()
}

/// Waits for each lost task's successor epoch and asserts it started after `gone` (when the
/// last process of the lost epochs was seen gone).
async fn successors_start_after(nodes: &[&Node], dir: &Path, owned: &[(String, u64)], gone: u128) {
    for (id, epoch, started) in successors(nodes, dir, owned).await {
        eprintln!(
            "task {}: epoch {epoch} started {} ms after the lost epoch's last process was gone",
            &id[..12],
            (started.saturating_sub(gone)) / 1_000_000
        );
        assert!(
            started > gone,
            "task {id}: epoch {epoch} started before the lost epoch's processes were gone"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_owner_ends_every_process_of_its_instances_before_anyone_claims_them() {
    if !cgroups_or_skip("kill_9_of_an_owner_ends_every_process") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = marker_dir();
    let sub = Submitter::new();
    let parent = cgroup_parent();
    let mut nodes = mesh(root.path(), 3, |_| flags(&sub, &parent, &[])).await;
    let ids = submit_forking(&nodes, &sub, dir.path(), 4).await;
    let (victim, owned) = busiest_owner(&nodes, &ids).await;
    let pids_before: usize = owned
        .iter()
        .map(|(t, e)| instance_pids(t, Some(*e)).len())
        .sum();
    assert!(pids_before >= 2 * owned.len(), "{pids_before} processes");
    let killed = now_ns();
    nodes[victim].kill9();
    let gone = gone_at(&owned, Duration::from_secs(10))
        .await
        .expect("processes of the killed owner's instances are still running after 10 s");
    let took_ms = (gone - killed) / 1_000_000;
    eprintln!(
        "kill -9 of the owner of {} instances ({pids_before} processes): all gone {took_ms} ms after",
        owned.len()
    );
    assert!(took_ms <= 1_000, "took {took_ms} ms (more than 1 s)");
    let survivors = others(&nodes, victim);
    successors_start_after(&survivors, dir.path(), &owned, gone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_owner_s_instances_are_killed_at_the_deadline_before_the_successor_starts() {
    if !cgroups_or_skip("a_stopped_owner") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = marker_dir();
    let sub = Submitter::new();
    let parent = cgroup_parent();
    let nodes = mesh(root.path(), 3, |_| flags(&sub, &parent, &[])).await;
    let ids = submit_forking(&nodes, &sub, dir.path(), 2).await;
    let (victim, owned) = busiest_owner(&nodes, &ids).await;
    let pid = nodes[victim].pid().unwrap();
    let stopped = now_ns();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    let gone = gone_at(&owned, Duration::from_secs(5)).await;
    let survivors = others(&nodes, victim);
    // Let the stop last its 5 s, whatever happened.
    let resume_at = stopped + 5_000_000_000;
    let wait = resume_at.saturating_sub(now_ns());
    tokio::time::sleep(Duration::from_nanos(u64::try_from(wait).unwrap_or(0))).await;
    signal("-CONT");
    let gone = gone.expect("the stopped owner's instances were still running after 5 s");
    let took_ms = (gone - stopped) / 1_000_000;
    eprintln!("kill -STOP of the owner: its instances were killed {took_ms} ms after");
    successors_start_after(&survivors, dir.path(), &owned, gone).await;
    // The resumed owner counts what its guards did.
    let expiries = wait_until(Duration::from_secs(20), || async {
        nodes[victim].text("/metrics").await.is_some_and(|m| {
            common::metric(&m, "omesh_guard_expiries_total", None) >= owned.len() as f64
        })
    })
    .await;
    assert!(
        expiries,
        "omesh_guard_expiries_total does not count the expiries"
    );
    // Resumed, the old owner runs none of its lost epochs again, and each task runs once.
    let settled = wait_until(Duration::from_secs(20), || async {
        let mut ok = true;
        for (id, _) in &owned {
            let t = survivors[0].task(id).await.unwrap();
            ok &= live_epochs(id) == vec![t.epoch];
        }
        ok
    })
    .await;
    assert!(settled, "a lost epoch runs again, or a task runs twice");
    for (id, lost) in &owned {
        assert!(
            instance_pids(id, Some(*lost)).is_empty(),
            "epoch {lost} of {id} is back"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_restarted_after_it_and_its_guards_were_killed_ends_what_they_left() {
    if !cgroups_or_skip("a_peer_restarted_after_it_and_its_guards_were_killed") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = marker_dir();
    let sub = Submitter::new();
    let parent = cgroup_parent();
    // One peer: its tasks cannot move, so what runs after the restart is its own doing.
    let mut nodes = mesh(root.path(), 1, |_| flags(&sub, &parent, &[])).await;
    let ids = submit_forking(&nodes, &sub, dir.path(), 2).await;
    let node_id = nodes[0].node_id().await;
    let owned: Vec<(String, u64)> = {
        let mut v = Vec::new();
        for id in &ids {
            v.push((id.clone(), nodes[0].task(id).await.unwrap().epoch));
        }
        v
    };
    // The whole tree of the peer dies at once (as `systemctl kill -s KILL` would): the guards
    // cannot act, the shells die with their guards, their children live on.
    let guards = omesh::guard::cleanup::guards_of(&node_id.parse().unwrap());
    assert_eq!(guards.len(), ids.len(), "one guard per instance");
    // Stopped first, so that it sees nothing of its guards' deaths before its own.
    let peer =
        rustix::process::Pid::from_raw(i32::try_from(nodes[0].pid().unwrap()).unwrap()).unwrap();
    rustix::process::kill_process(peer, rustix::process::Signal::STOP).unwrap();
    for g in guards {
        let _ = rustix::process::kill_process(g, rustix::process::Signal::KILL);
    }
    nodes[0].kill9();
    assert!(
        wait_until(Duration::from_secs(5), || async {
            owned
                .iter()
                .all(|(t, e)| instance_pids(t, Some(*e)).len() == 1)
        })
        .await,
        "expected exactly the orphaned `sleep` of each instance to survive its guard: {:?}",
        owned
            .iter()
            .map(|(t, e)| instance_pids(t, Some(*e)))
            .collect::<Vec<_>>()
    );
    nodes[0].restart();
    let gone = gone_at(&owned, Duration::from_secs(30)).await;
    if gone.is_none() {
        dump(&[&nodes[0]]);
    }
    assert!(
        gone.is_some(),
        "the restarted peer left its old instances running"
    );
}

/// The node's cgroup of an instance.
fn task_cgroup(parent: &str, node_short: &str, task: &str, epoch: u64) -> Option<TaskCgroup> {
    let parent = format!("{parent}/{node_short}");
    let h = Hierarchy::detect(&parent).ok()?;
    TaskCgroup::open(&h, &parent, &format!("{task}-{epoch}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_tasks_are_held_to_their_memory_cpu_and_pids_limits() {
    if !cgroups_or_skip("process_tasks_are_held_to_their_limits") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let parent = cgroup_parent();
    let nodes = mesh(root.path(), 1, |_| {
        flags(&sub, &parent, &["--task-pids-limit", "64"])
    })
    .await;
    let node = &nodes[0];
    let short = node.node_id().await[..12].to_owned();

    // Memory: 64 MiB, and a shell that tries to hold 400 MB.
    let hog = sub.spec(
        &[
            "sh",
            "-c",
            "a=$(head -c 400000000 /dev/zero | tr '\\000' x); echo held ${#a}",
        ],
        |s| {
            s.memory_bytes = 64 << 20;
            s.max_attempts = 1;
        },
    );
    let hog = sub.submit(node, &hog).await;
    // CPU: 200m, busy.
    let busy = sub.spec(&["sh", "-c", "while :; do :; done"], |s| s.cpu_millis = 200);
    let busy = sub.submit(node, &busy).await;
    // Pids: a fork bomb.
    let bomb = sub.spec(&["sh", "-c", "f() { f | f & }; f; sleep 600"], |_| {});
    let bomb = sub.submit(node, &bomb).await;

    let failed = wait_until(Duration::from_secs(60), || async {
        node.task(&hog).await.is_some_and(|t| t.state == "failed")
    })
    .await;
    assert!(failed, "the memory hog was not stopped");
    let t = node.task(&hog).await.unwrap();
    assert!(
        t.error.contains("out of memory") && t.error.contains("64 MiB"),
        "reported: {:?}",
        t.error
    );

    let running = wait_until(Duration::from_secs(30), || async {
        node.task(&busy).await.is_some_and(|t| t.state == "running")
            && node.task(&bomb).await.is_some_and(|t| t.state == "running")
    })
    .await;
    assert!(running);
    let cg = task_cgroup(&parent, &short, &busy, 1).expect("the busy task has its cgroup");
    let (u0, t0) = (cg.cpu_usage_ns().unwrap(), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (u1, t1) = (cg.cpu_usage_ns().unwrap(), std::time::Instant::now());
    let share = (u1 - u0) as f64 / (t1 - t0).as_nanos() as f64;
    eprintln!("cpu 200m busy loop used {:.1}% of a core", share * 100.0);
    assert!(share <= 0.25, "used {:.1}% of a core", share * 100.0);
    assert!(share >= 0.05, "barely ran ({:.1}%)", share * 100.0);

    let bomb_cg = task_cgroup(&parent, &short, &bomb, 1).expect("the bomb has its cgroup");
    let peak = bomb_cg.pids_peak().unwrap_or(bomb_cg.pids().len() as u64);
    eprintln!(
        "fork bomb: {} processes now, peak {peak} (limit 64)",
        bomb_cg.pids().len()
    );
    assert!(peak <= 64, "peak {peak}");
    assert!(bomb_cg.pids().len() <= 64);
    // The peer still answers, and a cancel ends the bomb for good.
    let status = sub.cancel(node, &bomb).await;
    assert!((200..300).contains(&status), "cancel answered {status}");
    let ended = wait_until(Duration::from_secs(30), || async {
        instance_pids(&bomb, None).is_empty()
            && node
                .task(&bomb)
                .await
                .is_some_and(|t| t.state == "cancelled")
    })
    .await;
    assert!(ended, "the fork bomb outlived its cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_task_cannot_read_the_peer_s_key_token_or_data_dir() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIP a_process_task_cannot_read: needs root (tasks then run as task_user)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let nodes = mesh(root.path(), 1, |_| {
        let mut f = flags(&sub, &cgroup_parent(), &[]);
        f.extend(["--process-limits".into(), "best-effort".into()]);
        f
    })
    .await;
    let node = &nodes[0];
    let data: PathBuf = root.path().join("n0").join("data");
    let pid = node.pid().unwrap();
    let probe = format!(
        "cat {d}/identity.key >/dev/null 2>&1 && echo LEAK-key; \
         ls {d} >/dev/null 2>&1 && echo LEAK-datadir; \
         ls {d}/logs >/dev/null 2>&1 && echo LEAK-logs; \
         grep -a -q {tok} /proc/{pid}/environ 2>/dev/null && echo LEAK-environ; \
         grep -a -q {tok} /proc/{pid}/cmdline 2>/dev/null && echo LEAK-argv; \
         env | grep -q {tok} && echo LEAK-env; \
         id -u; echo done",
        d = data.display(),
        tok = sub.token,
    );
    let spec = sub.spec(&["sh", "-c", &probe], |_| {});
    let id = sub.submit(node, &spec).await;
    let done = wait_until(Duration::from_secs(30), || async {
        node.task(&id).await.is_some_and(|t| t.state == "succeeded")
    })
    .await;
    assert!(done, "the probe task did not succeed");
    let log: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/api/v1/tasks/{id}/logs", node.api()))
        .bearer_auth(&sub.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let log = log["data"].as_str().unwrap_or_default().to_owned();
    assert!(
        !log.contains("LEAK"),
        "a task read the peer's secrets: {log}"
    );
    assert!(log.ends_with("done\n"), "{log}");
    assert_ne!(log.lines().next(), Some("0"), "the task ran as root");
}
