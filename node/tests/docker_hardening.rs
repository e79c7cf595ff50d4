//! Task containers are confined: a real `omesh up` with the docker executor runs a task, and
//! the running container is checked with `docker inspect` (capabilities dropped,
//! no-new-privileges, pids, CPU and memory limits, no swap) and from inside (what the task
//! itself sees). A spec asking for 0 CPU and 0 memory gets the node's configured defaults,
//! set to non-default values here to prove they are read. Skips without an engine, unless
//! `OMESH_REQUIRE_DOCKER=1`.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::docker::{containers_with_label, docker_or_skip, skip, test_image, RemoveOnDrop};
use common::{mesh, wait_until, Node, Submitter};
use omesh_protocol::ExecutorKind;

/// A generous bound on anything that has to happen.
const LONG: Duration = Duration::from_secs(90);

const DEFAULT_CPU_MILLIS: u32 = 300;
const DEFAULT_MEMORY_BYTES: u64 = 80 << 20;
const PIDS_LIMIT: u32 = 77;

fn inspect(container: &str) -> serde_json::Value {
    let out = Command::new("docker")
        .args(["inspect", container])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker inspect {container} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    all[0].clone()
}

/// Waits until exactly one container carries `label`; its `docker inspect`.
async fn the_container(label: &str) -> serde_json::Value {
    assert!(
        wait_until(LONG, || async { containers_with_label(label).len() == 1 }).await,
        "no container labelled {label}: {:?}",
        containers_with_label(label)
    );
    inspect(&containers_with_label(label)[0])
}

/// Waits until the task's log (fetched with the token) contains `needle`; the log.
async fn log_containing(node: &Node, sub: &Submitter, id: &str, needle: &str) -> String {
    let end = Instant::now() + LONG;
    loop {
        let log = node.logs(&sub.token, id).await;
        match log {
            Some(text) if text.contains(needle) => return text,
            _ if Instant::now() >= end => {
                panic!("the log of {id} never showed {needle:?}: {log:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Asserts the confinement every task container gets, whatever its spec.
fn assert_confined(info: &serde_json::Value) {
    let host = &info["HostConfig"];
    let cap_drop: Vec<&str> = host["CapDrop"]
        .as_array()
        .unwrap_or_else(|| panic!("no CapDrop: {host:#}"))
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(cap_drop.contains(&"ALL"), "CapDrop {cap_drop:?}");
    let security: Vec<&str> = host["SecurityOpt"]
        .as_array()
        .unwrap_or_else(|| panic!("no SecurityOpt: {host:#}"))
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        security
            .iter()
            .any(|o| *o == "no-new-privileges" || *o == "no-new-privileges:true"),
        "SecurityOpt {security:?}"
    );
    assert_eq!(host["PidsLimit"], PIDS_LIMIT, "{host:#}");
    assert_eq!(host["NetworkMode"], "none", "{host:#}");
    assert_eq!(
        host["MemorySwap"], host["Memory"],
        "swap beyond the memory limit: {host:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_containers_are_confined_and_zero_means_the_nodes_defaults() {
    let test = "task_containers_are_confined_and_zero_means_the_nodes_defaults";
    if !docker_or_skip(test) {
        return;
    }
    let Some(image) = test_image() else {
        skip(test, "the test image could not be built");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    // What the task sees from inside: its capabilities, no_new_privs, its pids limit
    // (cgroup v1 or v2, whichever is mounted).
    let script = "cat /proc/self/status; \
                  echo pids.max=$(cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/pids.max 2>/dev/null); \
                  echo probed; sleep 60";
    let spec = |cpu: u32, memory: u64| {
        sub.spec(&["sh", "-c", script], |s| {
            s.executor = ExecutorKind::Docker;
            s.image = image.clone();
            s.cpu_millis = cpu;
            s.memory_bytes = memory;
            s.max_attempts = 1;
        })
    };
    let defaulted = spec(0, 0);
    let explicit = spec(250, 48 << 20);
    let labels =
        [defaulted.id().to_hex(), explicit.id().to_hex()].map(|id| format!("omesh.task={id}"));
    let mut guards: Vec<RemoveOnDrop> = labels.iter().cloned().map(RemoveOnDrop).collect();
    let mut flags = sub.flags();
    flags.extend([
        "--executor".into(),
        "docker".into(),
        "--threshold-cpu".into(),
        "100".into(),
        "--task-default-cpu-millis".into(),
        DEFAULT_CPU_MILLIS.to_string(),
        "--task-default-memory-bytes".into(),
        DEFAULT_MEMORY_BYTES.to_string(),
        "--task-pids-limit".into(),
        PIDS_LIMIT.to_string(),
    ]);
    let nodes = mesh(root.path(), 1, |_| flags.clone()).await;
    let node = &nodes[0];
    guards.push(RemoveOnDrop(format!("omesh.node={}", node.node_id().await)));

    // A spec that asks for nothing gets the node's defaults, never unlimited.
    let id = sub.submit(node, &defaulted).await;
    let info = the_container(&labels[0]).await;
    assert_confined(&info);
    let host = &info["HostConfig"];
    assert_eq!(
        host["NanoCpus"],
        u64::from(DEFAULT_CPU_MILLIS) * 1_000_000,
        "{host:#}"
    );
    assert_eq!(host["Memory"], DEFAULT_MEMORY_BYTES, "{host:#}");

    // Inside, the task holds no capabilities, cannot gain privileges, and has the pids limit.
    let log = log_containing(node, &sub, &id, "probed").await;
    let field = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in the task's log:\n{log}"))
    };
    assert_eq!(field("CapEff:"), "0000000000000000", "{log}");
    assert_eq!(field("CapPrm:"), "0000000000000000", "{log}");
    assert_eq!(field("NoNewPrivs:"), "1", "{log}");
    assert_eq!(field("pids.max="), PIDS_LIMIT.to_string(), "{log}");

    // A spec's own values win over the defaults; the confinement is the same.
    sub.submit(node, &explicit).await;
    let info = the_container(&labels[1]).await;
    assert_confined(&info);
    let host = &info["HostConfig"];
    assert_eq!(host["NanoCpus"], 250_000_000, "{host:#}");
    assert_eq!(host["Memory"], 48 << 20, "{host:#}");

    for label in &labels {
        let task = label.trim_start_matches("omesh.task=");
        assert_eq!(sub.cancel(node, task).await, 200);
    }
    assert!(
        wait_until(LONG, || async {
            labels.iter().all(|l| containers_with_label(l).is_empty())
        })
        .await,
        "containers outlived the cancel"
    );
    drop(nodes);
    drop(guards);
}
