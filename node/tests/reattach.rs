//! A peer restarted in place (same data dir, same binary) re-attaches to the running
//! instances of its `lost_after` tasks through their guards and keeps them (same process,
//! a new epoch owned by the restarted node), while the instances of default tasks end with
//! the old process as before (`kill -9`) or are stopped by its leave (SIGTERM).
//!
//! The same with a container (skipped without a Docker engine, unless
//! `OMESH_REQUIRE_DOCKER=1`), and the surviving guard on its own: it still ends its instance
//! at the deadline with no peer attached, and tells the next attach how an instance that
//! ended meanwhile ended.
//!
//! Each instance writes a start marker (`<epoch> <ns>`, see `common::instances`) and then
//! `exec`s a long `sleep`, so its one process is its main pid; the test reads every process
//! of a task from /proc (`OMESH_TASK_ID`, `OMESH_EPOCH` in its environment). "No second
//! instance" means: no start marker of the task written after its placement settled, and no
//! process of it but the original one.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::instances::{instance_pids, live_epochs, marker_dir, markers};
use common::{dump, mesh, wait_until, Node, Submitter};
use omesh_protocol::SignedTaskSpec;

/// How a test restarts the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// `kill -9`: the guards see their peer's pipes close.
    Kill9,
    /// SIGTERM: the peer leaves the mesh and detaches what survives it.
    Term,
}

/// A task whose instance marks its start in `dir`, says hello on stdout, then sleeps long as
/// the same process. `tag`: the node tag it requires; `lost_after`: its policy.
fn sleeper(sub: &Submitter, dir: &Path, tag: &str, lost_after_ms: Option<u32>) -> SignedTaskSpec {
    let script = format!(
        "echo \"$OMESH_EPOCH $(date +%s%N)\" >> {}/$OMESH_TASK_ID; echo hello-$OMESH_EPOCH; exec sleep 600",
        dir.display()
    );
    sub.spec(&["sh", "-c", &script], |s| {
        // The node's default limits: no cgroup needed to enforce what the spec asks.
        s.cpu_millis = 0;
        s.memory_bytes = 0;
        s.required_tags = [tag.to_owned()].into();
        s.disconnect.lost_after_ms = lost_after_ms;
    })
}

/// How long a new task's placement must look the same before the test takes it as settled.
const SETTLED_FOR: Duration = Duration::from_secs(2);

/// Start markers `task` wrote so far (one line per instance started).
fn starts(dir: &Path, task: &str) -> usize {
    std::fs::read_to_string(dir.join(task))
        .unwrap_or_default()
        .lines()
        .count()
}

/// What the mesh and the host say of `task` now, if it runs as one process that every node
/// agrees on: (epoch, owner, pid).
async fn placement(nodes: &[Node], dir: &Path, task: &str) -> Option<(u64, String, u32)> {
    let mut seen: Option<(u64, String)> = None;
    for n in nodes {
        let t = n.task(task).await.filter(|t| t.state == "running")?;
        let view = (t.epoch, t.owner?);
        if seen.as_ref().is_some_and(|s| *s != view) {
            return None;
        }
        seen = Some(view);
    }
    let (epoch, owner) = seen?;
    let pids = instance_pids(task, None);
    let marked = markers(dir, task).contains_key(&epoch);
    match pids[..] {
        [pid] if marked && live_epochs(task) == vec![epoch] => Some((epoch, owner, pid)),
        _ => None,
    }
}

/// Waits until `task` runs as one process every node agrees on, unchanged for
/// [`SETTLED_FOR`]: two nodes that claimed a new task at once (the same epoch) have sorted it
/// out, and the loser's instance is gone.
async fn settled(nodes: &[Node], dir: &Path, task: &str) -> (u64, String, u32) {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    let mut since: Option<(std::time::Instant, (u64, String, u32))> = None;
    loop {
        let now = placement(nodes, dir, task).await;
        since = match (since, now) {
            (Some((at, was)), Some(now)) if was == now => {
                if at.elapsed() >= SETTLED_FOR {
                    return now;
                }
                Some((at, was))
            }
            (_, now) => now.map(|p| (std::time::Instant::now(), p)),
        };
        if std::time::Instant::now() >= end {
            dump(&nodes.iter().collect::<Vec<_>>());
            panic!("task {task} does not settle on one process every node agrees on");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Kills what the test leaves of its tasks whatever happens: instances that survive their
/// peer would otherwise outlive the test by their deadline.
struct KillOnDrop(Vec<String>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            for pid in instance_pids(task, None) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

async fn restart_keeps_lost_after_instances(how: Restart) {
    let root = tempfile::tempdir().unwrap();
    let dir = marker_dir();
    let sub = Submitter::new();
    // n0 is the seed; n1 and n2 may run the lost_after task, and the default one goes to
    // the same owner (its tag): the other could take the lost_after task over if it (wrongly)
    // counted it lost while its owner restarts.
    let mut nodes = mesh(root.path(), 3, |i| {
        let mut f = sub.flags();
        f.extend(["--fake-cpu-percent".into(), "10".into()]);
        f.extend(["--process-limits".into(), "best-effort".into()]);
        match i {
            0 => {}
            i => f.extend(["--tag".into(), format!("work,n{i}")]),
        }
        f
    })
    .await;
    let kept = sleeper(&sub, dir.path(), "work", Some(60_000));
    let kept = sub.submit(&nodes[1], &kept).await;
    let mut cleanup = KillOnDrop(vec![kept.clone()]);
    // The lost_after task may have gone to n1 or n2: its owner is the one restarted.
    let (kept_epoch, kept_owner, kept_pid) = settled(&nodes, dir.path(), &kept).await;
    let victim = if kept_owner == nodes[1].node_id().await {
        1
    } else {
        2
    };
    let plain = sleeper(&sub, dir.path(), &format!("n{victim}"), None);
    let plain = sub.submit(&nodes[1], &plain).await;
    cleanup.0.push(plain.clone());
    let (plain_epoch, plain_owner, plain_pid) = settled(&nodes, dir.path(), &plain).await;
    assert_eq!(
        plain_owner, kept_owner,
        "the default task runs where its tag is"
    );
    let kept_starts = starts(dir.path(), &kept);
    eprintln!(
        "lost_after task epoch {kept_epoch} on n{victim} (pid {kept_pid}), default task epoch {plain_epoch} (pid {plain_pid}); {how:?} of n{victim}"
    );

    match how {
        Restart::Kill9 => nodes[victim].kill9(),
        Restart::Term => {
            let status = nodes[victim].terminate();
            assert!(
                status.is_some_and(|s| s.success()),
                "the peer did not exit cleanly on SIGTERM: {status:?}"
            );
        }
    }
    // The default task's instance ended with the old process (kill -9: its guard saw the
    // pipe close) or was stopped by the leave (SIGTERM), as before: within seconds, while
    // the peer is still down.
    let ended = wait_until(Duration::from_secs(10), || async {
        instance_pids(&plain, Some(plain_epoch)).is_empty()
    })
    .await;
    assert!(
        ended,
        "the default task's instance outlived its peer ({how:?})"
    );
    assert_eq!(
        instance_pids(&kept, Some(kept_epoch)),
        vec![kept_pid],
        "the lost_after instance did not outlive its peer ({how:?})"
    );
    nodes[victim].restart();

    // The restarted owner takes the instance over at a new epoch, without restarting it.
    let adopted = wait_until(Duration::from_secs(60), || async {
        nodes[0]
            .task(&kept)
            .await
            .is_some_and(|t| t.state == "running" && t.epoch > kept_epoch)
    })
    .await;
    if !adopted {
        dump(&nodes.iter().collect::<Vec<_>>());
    }
    assert!(adopted, "the lost_after task did not move to a new epoch");
    let t = nodes[0].task(&kept).await.unwrap();
    if t.owner.as_deref() != Some(kept_owner.as_str()) {
        dump(&nodes.iter().collect::<Vec<_>>());
    }
    assert_eq!(
        t.owner.as_deref(),
        Some(kept_owner.as_str()),
        "the lost_after task was taken over by another node"
    );
    // Every node agrees, and the restarted owner's own view says it runs there.
    for n in &nodes {
        let seen = wait_until(Duration::from_secs(20), || async {
            n.task(&kept)
                .await
                .is_some_and(|v| v.state == "running" && v.epoch == t.epoch)
        })
        .await;
        if !seen {
            dump(&nodes.iter().collect::<Vec<_>>());
            eprintln!("{} sees {:?}", n.name, n.task(&kept).await);
        }
        assert!(seen, "{} does not see epoch {} running", n.name, t.epoch);
    }
    assert_eq!(
        instance_pids(&kept, None),
        vec![kept_pid],
        "the lost_after task runs as another process than before the restart"
    );
    assert_eq!(live_epochs(&kept), vec![kept_epoch]);
    assert_eq!(
        starts(dir.path(), &kept),
        kept_starts,
        "the lost_after task started again somewhere"
    );
    // Its log followed it to the new epoch.
    let log = nodes[victim]
        .logs(&sub.token, &kept)
        .await
        .unwrap_or_default();
    assert!(
        log.contains(&format!("hello-{kept_epoch}")),
        "the adopted epoch's log: {log:?}"
    );

    // The default task runs again on the restarted owner (its tag), at a later epoch, as a
    // new process.
    let again = wait_until(Duration::from_secs(60), || async {
        nodes[0]
            .task(&plain)
            .await
            .is_some_and(|t| t.state == "running" && t.epoch > plain_epoch)
    })
    .await;
    assert!(again, "the default task does not run again");
    assert!(instance_pids(&plain, Some(plain_epoch)).is_empty());

    // Stopping it through the adopted epoch works: a cancel ends the very process.
    let status = sub.cancel(&nodes[0], &kept).await;
    assert!((200..300).contains(&status), "cancel answered {status}");
    let gone = wait_until(Duration::from_secs(30), || async {
        instance_pids(&kept, None).is_empty()
            && nodes[0]
                .task(&kept)
                .await
                .is_some_and(|t| t.state == "cancelled")
    })
    .await;
    if !gone {
        dump(&nodes.iter().collect::<Vec<_>>());
    }
    assert!(gone, "the adopted instance outlived its cancel");
    let _ = sub.cancel(&nodes[0], &plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_of_an_owner_keeps_its_lost_after_instance_and_ends_the_others() {
    restart_keeps_lost_after_instances(Restart::Kill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_restart_of_an_owner_keeps_its_lost_after_instance_and_stops_the_others() {
    restart_keeps_lost_after_instances(Restart::Term).await;
}

/// A guard of the `omesh` binary under test running `command` for a made-up task whose
/// instance outlives its peer, listening in `dir`; its deadline is `window` from now.
fn surviving_guard(
    dir: &Path,
    command: &[&str],
    window: Duration,
) -> (omesh::guard::Guard, String, std::path::PathBuf) {
    use omesh::guard::{Guard, GuardProgram, Plan, ProcessPlan, Survival, Target};
    let task = omesh_protocol::TaskId(rand::random());
    let socket = dir.join(format!("{}-1.sock", task.short()));
    let plan = Plan {
        label: format!("task {} epoch 1", task.short()),
        window_ms: 0,
        target: Target::Process(ProcessPlan {
            program: command[0].into(),
            args: command[1..].iter().map(|s| (*s).to_owned()).collect(),
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("OMESH_TASK_ID".into(), task.to_hex()),
                ("OMESH_EPOCH".into(), "1".into()),
            ],
            log: dir.join("task.log"),
            cwd: dir.to_owned(),
            user: None,
            cgroup: None,
        }),
        survive: Some(Survival {
            socket: socket.clone(),
            task,
            epoch: 1,
            timeout_ms: 0,
        }),
    };
    let lease = tokio::sync::watch::channel(tokio::time::Instant::now() + window).1;
    let guard = Guard::spawn(
        &GuardProgram(common::bin().into()),
        plan,
        &omesh_protocol::NodeId(rand::random()),
        lease,
    )
    .unwrap();
    (guard, task.to_hex(), socket)
}

/// Waits for the guard's `Started`; the pid.
async fn started(guard: &mut omesh::guard::Guard) -> u32 {
    use omesh::guard::{FromGuard, GuardEnd};
    match tokio::time::timeout(Duration::from_secs(20), guard.next()).await {
        Ok(GuardEnd::Report(FromGuard::Started { pid })) => pid,
        other => panic!("the guard did not start its instance: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_guard_keeps_its_instance_until_the_deadline_and_no_longer() {
    let dir = tempfile::tempdir().unwrap();
    let window = Duration::from_secs(6);
    let (mut guard, task, socket) = surviving_guard(dir.path(), &["sleep", "600"], window);
    let deadline = std::time::Instant::now() + window;
    let _cleanup = KillOnDrop(vec![task.clone()]);
    let pid = started(&mut guard).await;
    let seen = wait_until(Duration::from_secs(5), || async {
        instance_pids(&task, None) == vec![pid]
    })
    .await;
    assert!(seen, "the instance does not run");
    // The peer goes away: the instance stays, and a later peer can attach.
    drop(guard);
    let attaching = omesh::guard::Guard::attach(&socket).await.unwrap();
    assert!(
        std::time::Instant::now() < deadline,
        "the test was too slow to see the instance before its deadline"
    );
    assert_eq!(instance_pids(&task, None), vec![pid]);
    assert!(matches!(
        attaching.info.target,
        omesh::guard::AttachedTarget::Process { pid: Some(p), .. } if p == pid
    ));
    assert!(attaching.info.deadline_ms <= window.as_millis() as u64);
    // That peer goes away too without renewing: the deadline still ends the instance.
    drop(attaching);
    let gone = wait_until(Duration::from_secs(20), || async {
        instance_pids(&task, None).is_empty() && !socket.exists()
    })
    .await;
    assert!(
        gone,
        "the instance or the guard's socket outlived the deadline"
    );
    assert!(
        std::time::Instant::now() >= deadline,
        "the instance ended before its deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_ended_while_detached_is_reported_to_the_next_attach() {
    use omesh::guard::{FromGuard, GuardEnd};
    let dir = tempfile::tempdir().unwrap();
    let (mut guard, task, socket) = surviving_guard(
        dir.path(),
        &["sh", "-c", "sleep 1; exit 3"],
        Duration::from_secs(60),
    );
    let _cleanup = KillOnDrop(vec![task.clone()]);
    started(&mut guard).await;
    drop(guard);
    let ended = wait_until(Duration::from_secs(20), || async {
        instance_pids(&task, None).is_empty()
    })
    .await;
    assert!(ended, "the instance did not end by itself");
    assert!(socket.exists(), "the guard did not wait to report the end");
    let attaching = omesh::guard::Guard::attach(&socket).await.unwrap();
    let (lease, epoch) = (
        tokio::sync::watch::channel(tokio::time::Instant::now()).1,
        tokio::sync::watch::channel(1).1,
    );
    let mut guard = attaching.follow(lease, epoch);
    let end = tokio::time::timeout(Duration::from_secs(20), guard.next()).await;
    assert!(
        matches!(end, Ok(GuardEnd::Report(FromGuard::Exited { code: 3 }))),
        "{end:?}"
    );
    let gone = wait_until(Duration::from_secs(20), || async { !socket.exists() }).await;
    assert!(gone, "the guard stayed after it reported the end");
}

/// The containers of `task` the engine holds: (id, running).
async fn containers_of(docker: &bollard::Docker, task: &str) -> Vec<(String, bool)> {
    use bollard::query_parameters::ListContainersOptionsBuilder;
    let filters = std::collections::HashMap::from([("label", vec![format!("omesh.task={task}")])]);
    let options = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    docker
        .list_containers(Some(options))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|c| {
            let running = matches!(
                c.state,
                Some(bollard::models::ContainerSummaryStateEnum::RUNNING)
            );
            Some((c.id?, running))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_of_an_owner_keeps_its_lost_after_container() {
    let test = "kill_9_and_restart_of_an_owner_keeps_its_lost_after_container";
    if !common::docker::docker_or_skip(test) {
        return;
    }
    let Some(image) = common::docker::test_image() else {
        common::docker::skip(test, "the test image could not be built");
        return;
    };
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let spec = sub.spec(&["sleep", "600"], |s| {
        s.executor = omesh_protocol::ExecutorKind::Docker;
        s.image = image.clone();
        s.timeout_ms = 0;
        s.disconnect.lost_after_ms = Some(60_000);
    });
    let task = spec.id().to_hex();
    let _remove = common::docker::RemoveOnDrop(format!("omesh.task={task}"));
    let mut nodes = mesh(root.path(), 2, |_| {
        let mut f = sub.flags();
        f.extend(["--executor", "docker", "--threshold-cpu", "100"].map(String::from));
        f
    })
    .await;
    sub.submit(&nodes[1], &spec).await;
    let placed = wait_until(Duration::from_secs(60), || async {
        let found = containers_of(&docker, &task).await;
        nodes[0]
            .task(&task)
            .await
            .is_some_and(|t| t.state == "running")
            && found.len() == 1
            && found[0].1
    })
    .await;
    let before = containers_of(&docker, &task).await;
    assert!(placed, "the task does not run as one container: {before:?}");
    let t = nodes[0].task(&task).await.unwrap();
    let (epoch, owner) = (t.epoch, t.owner.unwrap());
    let victim = if nodes[1].node_id().await == owner {
        1
    } else {
        0
    };
    let container = before[0].0.clone();

    nodes[victim].kill9();
    assert_eq!(
        containers_of(&docker, &task).await,
        vec![(container.clone(), true)],
        "the container did not outlive its peer"
    );
    nodes[victim].restart();
    let adopted = wait_until(Duration::from_secs(60), || async {
        nodes[1 - victim]
            .task(&task)
            .await
            .is_some_and(|t| t.state == "running" && t.epoch > epoch)
    })
    .await;
    if !adopted {
        dump(&nodes.iter().collect::<Vec<_>>());
    }
    assert!(adopted, "the task did not move to a new epoch");
    let t = nodes[1 - victim].task(&task).await.unwrap();
    assert_eq!(t.owner.as_deref(), Some(owner.as_str()));
    assert_eq!(
        containers_of(&docker, &task).await,
        vec![(container.clone(), true)],
        "the task does not run as the same, one container"
    );
    // Followed again: a cancel through the new epoch removes it.
    let status = sub.cancel(&nodes[1 - victim], &task).await;
    assert!((200..300).contains(&status), "cancel answered {status}");
    let gone = wait_until(Duration::from_secs(60), || async {
        containers_of(&docker, &task).await.is_empty()
    })
    .await;
    assert!(gone, "the adopted container outlived its cancel");
}
