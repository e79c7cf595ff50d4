//! The task lifecycle with the `docker` executor, through real `omesh up` processes and the
//! local Docker engine: limits and labels on the container, logs fetched from the owner,
//! cancel, retries that fail, and success. Skips without an engine, unless
//! `OMESH_REQUIRE_DOCKER=1`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::docker::{containers_with_label, docker_or_skip, skip, test_image, RemoveOnDrop};
use common::{mesh, wait_until, Node, Submitter};
use omesh::api::{LogChunk, TaskJson};
use omesh_protocol::{ExecutorKind, SignedTaskSpec};

/// A generous bound on anything that has to happen.
const LONG: Duration = Duration::from_secs(60);

/// The flags of a peer that runs tasks in Docker. Host CPU is ignored like host memory: a
/// busy 2-core CI host crosses the default 75% and its peers would then claim nothing.
fn docker_flags(sub: &Submitter) -> Vec<String> {
    let mut flags = sub.flags();
    flags.extend(["--executor", "docker", "--threshold-cpu", "100"].map(String::from));
    flags
}

/// The test image, or `None` when the test is to be skipped.
fn setup(test: &str) -> Option<String> {
    if !docker_or_skip(test) {
        return None;
    }
    let image = test_image();
    if image.is_none() {
        skip(test, "the test image could not be built");
    }
    image
}

/// A spec running `sh -c script` in the test image with the Docker executor.
fn docker_spec(
    sub: &Submitter,
    image: &str,
    script: &str,
    edit: impl FnOnce(&mut omesh_protocol::TaskSpec),
) -> SignedTaskSpec {
    sub.spec(&["sh", "-c", script], |s| {
        s.executor = ExecutorKind::Docker;
        s.image = image.to_owned();
        edit(s);
    })
}

/// Two docker peers under `root`. Every container they label as theirs is removed when the
/// returned guards drop, which is after the peers (declare the guards first).
async fn docker_mesh(root: &Path, sub: &Submitter, guards: &mut Vec<RemoveOnDrop>) -> Vec<Node> {
    let flags = docker_flags(sub);
    let nodes = mesh(root, 2, |_| flags.clone()).await;
    for n in &nodes {
        guards.push(RemoveOnDrop(format!("omesh.node={}", n.node_id().await)));
    }
    nodes
}

fn task_label(id: &str) -> String {
    format!("omesh.task={id}")
}

/// Waits until `node` shows the task in a state that `cond` accepts; that view.
async fn wait_task(node: &Node, id: &str, cond: impl Fn(&TaskJson) -> bool) -> TaskJson {
    let end = Instant::now() + LONG;
    loop {
        let t = node.task(id).await;
        match t {
            Some(t) if cond(&t) => return t,
            _ if Instant::now() >= end => {
                panic!("task {id} on {}: condition not met; last {t:#?}", node.name)
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The index of the node whose id is `owner`.
async fn index_of(nodes: &[Node], owner: &str) -> usize {
    for (i, n) in nodes.iter().enumerate() {
        if n.node_id().await == owner {
            return i;
        }
    }
    panic!("owner {owner} is none of the peers");
}

/// The whole log of the task's current epoch, as served by `node` (with the token).
async fn log_text(node: &Node, sub: &Submitter, id: &str) -> Option<LogChunk> {
    node.log_chunk(&sub.token, id, 0).await
}

fn inspect(container: &str) -> serde_json::Value {
    let out = Command::new("docker")
        .args(["inspect", container])
        .output()
        .unwrap();
    assert!(out.status.success(), "docker inspect {container} failed");
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    all[0].clone()
}

fn running_with_label(label: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            "status=running",
            "--filter",
        ])
        .arg(format!("label={label}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_container_has_limits_and_labels_serves_logs_and_cancels() {
    let test = "a_running_container_has_limits_and_labels_serves_logs_and_cancels";
    let Some(image) = setup(test) else { return };
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let spec = docker_spec(&sub, &image, "echo out; echo err >&2; sleep 20", |s| {
        s.cpu_millis = 250;
        s.memory_bytes = 48 << 20;
        s.max_attempts = 1;
    });
    let id = spec.id().to_hex();
    let label = task_label(&id);
    let mut guards = vec![RemoveOnDrop(label.clone())];
    let nodes = docker_mesh(root.path(), &sub, &mut guards).await;

    assert_eq!(sub.submit(&nodes[0], &spec).await, id);
    let t = wait_task(&nodes[0], &id, |t| t.state == "running").await;
    assert_eq!(t.code, 200);
    let owner = index_of(&nodes, t.owner.as_deref().unwrap()).await;
    let other = &nodes[1 - owner];

    // The container of this epoch runs with the spec's limits and the task's labels.
    assert!(
        wait_until(LONG, || async { running_with_label(&label).len() == 1 }).await,
        "no running container labelled {label}: {:?}",
        containers_with_label(&label)
    );
    let ids = containers_with_label(&label);
    assert_eq!(ids.len(), 1, "{ids:?}");
    let info = inspect(&ids[0]);
    assert_eq!(info["HostConfig"]["NanoCpus"], 250_000_000, "{info:#}");
    assert_eq!(info["HostConfig"]["Memory"], 50_331_648, "{info:#}");
    let labels = &info["Config"]["Labels"];
    assert_eq!(labels["omesh.task"], id);
    assert_eq!(labels["omesh.epoch"], t.epoch.to_string());
    assert_eq!(labels["omesh.node"], t.owner.clone().unwrap());

    // The peer that does not run it fetches both streams from the owner.
    let end = Instant::now() + LONG;
    let chunk = loop {
        let c = log_text(other, &sub, &id).await;
        match c {
            Some(c) if c.data.contains("out\n") && c.data.contains("err\n") => break c,
            _ if Instant::now() >= end => panic!("logs on the non-owner: {c:#?}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(chunk.owner, t.owner.clone().unwrap());
    assert_eq!(chunk.epoch, t.epoch);
    assert!(chunk.running, "{chunk:?}");

    // Cancel: the task ends cancelled everywhere, its container goes, nothing restarts it.
    assert_eq!(sub.cancel(other, &id).await, 200);
    for n in &nodes {
        let t = wait_task(n, &id, |t| t.state == "cancelled").await;
        assert_eq!(t.code, 499);
    }
    assert!(
        wait_until(LONG, || async { containers_with_label(&label).is_empty() }).await,
        "the container outlived the cancel: {:?}",
        containers_with_label(&label)
    );
    let epoch = nodes[0].task(&id).await.unwrap().epoch;
    // Absence takes a wait to show: give a wrongful restart time to happen.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for n in &nodes {
        let t = n.task(&id).await.unwrap();
        assert_eq!(t.state, "cancelled", "{t:#?}");
        assert_eq!(t.epoch, epoch, "the task was claimed again: {t:#?}");
    }
    assert!(
        containers_with_label(&label).is_empty(),
        "a container came back: {:?}",
        containers_with_label(&label)
    );
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_container_is_retried_then_fails_with_its_exit_code() {
    let test = "a_failing_container_is_retried_then_fails_with_its_exit_code";
    let Some(image) = setup(test) else { return };
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let spec = docker_spec(&sub, &image, "exit 5", |s| s.max_attempts = 2);
    let id = spec.id().to_hex();
    let label = task_label(&id);
    let mut guards = vec![RemoveOnDrop(label.clone())];
    let nodes = docker_mesh(root.path(), &sub, &mut guards).await;

    assert_eq!(sub.submit(&nodes[1], &spec).await, id);
    for n in &nodes {
        let t = wait_task(n, &id, |t| t.state == "failed").await;
        assert_eq!(t.code, 400, "{t:#?}");
        assert_eq!(t.exit_code, Some(5), "{t:#?}");
        assert_eq!(t.failed_attempts, 2, "{t:#?}");
        let failed: Vec<_> = t.history.iter().filter(|e| e.state == "failed").collect();
        assert_eq!(failed.len(), 2, "{t:#?}");
        assert!(failed.iter().all(|e| e.exit_code == Some(5)), "{t:#?}");
    }
    // An executor removes its container before it reports the end.
    assert!(
        containers_with_label(&label).is_empty(),
        "a container was left behind: {:?}",
        containers_with_label(&label)
    );
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_exits_zero_succeeds_and_keeps_its_log() {
    let test = "a_container_that_exits_zero_succeeds_and_keeps_its_log";
    let Some(image) = setup(test) else { return };
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let spec = docker_spec(&sub, &image, "echo done", |_| {});
    let id = spec.id().to_hex();
    let label = task_label(&id);
    let mut guards = vec![RemoveOnDrop(label.clone())];
    let nodes = docker_mesh(root.path(), &sub, &mut guards).await;

    assert_eq!(sub.submit(&nodes[0], &spec).await, id);
    for n in &nodes {
        let t = wait_task(n, &id, |t| t.state == "succeeded").await;
        assert_eq!(t.code, 300, "{t:#?}");
        assert_eq!(t.exit_code, Some(0), "{t:#?}");
        assert_eq!(t.failed_attempts, 0, "{t:#?}");
    }
    for n in &nodes {
        let chunk = log_text(n, &sub, &id).await;
        let chunk = chunk.unwrap_or_else(|| panic!("no log from {}", n.name));
        assert_eq!(chunk.data, "done\n", "{chunk:?}");
        assert!(!chunk.running, "{chunk:?}");
        assert_eq!(chunk.state, "succeeded");
    }
    assert!(
        containers_with_label(&label).is_empty(),
        "a container was left behind: {:?}",
        containers_with_label(&label)
    );
    drop(nodes);
}
