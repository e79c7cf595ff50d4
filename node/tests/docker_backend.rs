//! The Docker backend against a real engine, called as a library: exit codes and logs,
//! resource limits and labels, cancel, timeout, a missing image, and orphan clean-up.
//! Skips without an engine, unless `OMESH_REQUIRE_DOCKER=1`.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::docker::{containers_with_label, docker_or_skip, skip, test_image, RemoveOnDrop};
use common::wait_until;
use omesh::exec::docker::DockerBackend;
use omesh::exec::{Backend, Ended, ExecError, Instance, TaskLimits};
use omesh_protocol::{ExecutorKind, NodeId, SignedTaskSpec, TaskSpec};
use tokio::sync::watch;

/// A generous bound on anything the engine does.
const LONG: Duration = Duration::from_secs(120);

/// The backend and the test image, or `None` if the test is to be skipped.
async fn setup(test: &str) -> Option<(DockerBackend, String)> {
    if !docker_or_skip(test) {
        return None;
    }
    let Some(image) = test_image() else {
        skip(test, "the test image could not be built");
        return None;
    };
    match DockerBackend::connect(TaskLimits::default()).await {
        Ok(b) => Some((
            b.with_guard(omesh::guard::GuardProgram(
                env!("CARGO_BIN_EXE_omesh").into(),
            )),
            image,
        )),
        Err(e) => {
            skip(test, &format!("DockerBackend::connect failed: {e}"));
            None
        }
    }
}

/// One epoch (7) of a fresh task on a fresh node, logging under `dir`.
fn instance(
    dir: &Path,
    image: &str,
    command: &[&str],
    edit: impl FnOnce(&mut TaskSpec),
) -> Instance {
    let mut spec = TaskSpec {
        image: image.into(),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        env: BTreeMap::new(),
        cpu_millis: 0,
        memory_bytes: 0,
        required_tags: BTreeSet::new(),
        priority: 0,
        max_attempts: 1,
        timeout_ms: 0,
        executor: ExecutorKind::Docker,
        nonce: rand::random(),
        submitter: [0; 32],
        disconnect: Default::default(),
    };
    edit(&mut spec);
    // The backend does not check signatures; the driver does.
    let signed = SignedTaskSpec {
        spec,
        signature: Vec::new(),
    };
    let task = signed.id();
    Instance {
        task,
        epoch: 7,
        spec: Arc::new(signed),
        log_path: dir.join(format!("{}-7.log", task.to_hex())),
        node: NodeId(rand::random()),
        lease: watch::channel(tokio::time::Instant::now() + Duration::from_secs(3600)).1,
        survive: None,
    }
}

fn task_label(inst: &Instance) -> String {
    format!("omesh.task={}", inst.task.to_hex())
}

fn running(label: &str) -> bool {
    let out = Command::new("docker")
        .args(["ps", "-q", "--filter", "status=running", "--filter"])
        .arg(format!("label={label}"))
        .output()
        .unwrap();
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_code_and_both_streams_are_reported() {
    let Some((backend, image)) = setup("exit_code_and_both_streams_are_reported").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let inst = instance(
        dir.path(),
        &image,
        &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"],
        |s| {
            s.env.insert("GREETING".into(), "hello".into());
        },
    );
    let _cleanup = RemoveOnDrop(task_label(&inst));
    let started = AtomicBool::new(false);
    let (_cancel, cancel_rx) = watch::channel(false);
    let end = tokio::time::timeout(
        LONG,
        backend.run(&inst, &|| started.store(true, Ordering::SeqCst), cancel_rx),
    )
    .await
    .unwrap();
    assert_eq!(end.unwrap(), Ended::Exited { code: 3 });
    assert!(started.load(Ordering::SeqCst), "started() was not called");
    let log = std::fs::read_to_string(&inst.log_path).unwrap();
    assert!(
        log.contains("to-stdout\n"),
        "stdout missing from log: {log:?}"
    );
    assert!(
        log.contains("to-stderr\n"),
        "stderr missing from log: {log:?}"
    );
    assert!(
        containers_with_label(&task_label(&inst)).is_empty(),
        "the container was left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_reaches_the_container_and_a_zero_exit_is_exited() {
    let test = "env_reaches_the_container_and_a_zero_exit_is_exited";
    let Some((backend, image)) = setup(test).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let inst = instance(
        dir.path(),
        &image,
        &["sh", "-c", "echo \"greeting=$GREETING epoch=$OMESH_EPOCH\""],
        |s| {
            s.env.insert("GREETING".into(), "hello".into());
        },
    );
    let _cleanup = RemoveOnDrop(task_label(&inst));
    let (_cancel, cancel_rx) = watch::channel(false);
    let end = tokio::time::timeout(LONG, backend.run(&inst, &|| {}, cancel_rx))
        .await
        .unwrap();
    assert_eq!(end.unwrap(), Ended::Exited { code: 0 });
    let log = std::fs::read_to_string(&inst.log_path).unwrap();
    assert!(log.contains("greeting=hello epoch=7\n"), "{log:?}");
    assert!(containers_with_label(&task_label(&inst)).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_labels_are_set_and_cancel_stops() {
    let Some((backend, image)) = setup("limits_and_labels_are_set_and_cancel_stops").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let inst = instance(dir.path(), &image, &["sleep", "30"], |s| {
        s.cpu_millis = 500;
        s.memory_bytes = 64 << 20;
    });
    let label = task_label(&inst);
    let _cleanup = RemoveOnDrop(label.clone());
    let (cancel, cancel_rx) = watch::channel(false);
    let run = {
        let (backend, inst) = (backend.clone(), inst.clone());
        tokio::spawn(async move { backend.run(&inst, &|| {}, cancel_rx).await })
    };
    assert!(
        wait_until(LONG, || async { running(&label) }).await,
        "the container never ran"
    );
    let ids = containers_with_label(&label);
    assert_eq!(ids.len(), 1, "{ids:?}");
    let info = inspect(&ids[0]);
    assert_eq!(info["HostConfig"]["NanoCpus"], 500_000_000);
    assert_eq!(info["HostConfig"]["Memory"], 67_108_864);
    let labels = &info["Config"]["Labels"];
    assert_eq!(labels["omesh.task"], inst.task.to_hex());
    assert_eq!(labels["omesh.epoch"], "7");
    assert_eq!(labels["omesh.node"], inst.node.to_hex());
    assert_eq!(
        info["Name"],
        format!("/omesh-{}-7", inst.task.short()),
        "container name"
    );

    let asked = Instant::now();
    cancel.send(true).unwrap();
    let end = tokio::time::timeout(LONG, run).await.unwrap().unwrap();
    assert_eq!(end.unwrap(), Ended::Stopped);
    // `sleep 30` was killed, not waited for.
    assert!(
        asked.elapsed() < Duration::from_secs(25),
        "stopping took {:?}",
        asked.elapsed()
    );
    assert!(
        containers_with_label(&label).is_empty(),
        "the container was left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_kills_the_container_and_fails() {
    let Some((backend, image)) = setup("a_timeout_kills_the_container_and_fails").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let inst = instance(dir.path(), &image, &["sleep", "30"], |s| {
        s.timeout_ms = 1000
    });
    let _cleanup = RemoveOnDrop(task_label(&inst));
    let started = AtomicBool::new(false);
    let (_cancel, cancel_rx) = watch::channel(false);
    let t0 = Instant::now();
    let end = tokio::time::timeout(
        LONG,
        backend.run(&inst, &|| started.store(true, Ordering::SeqCst), cancel_rx),
    )
    .await
    .unwrap();
    match &end {
        Err(error @ ExecError::Timeout { .. }) => {
            assert!(error.to_string().contains("timed out"), "{error}");
        }
        other => panic!("expected Failed(timed out), got {other:?}"),
    }
    assert!(started.load(Ordering::SeqCst));
    assert!(
        t0.elapsed() < Duration::from_secs(28),
        "took {:?}: the timeout did not cut `sleep 30` short",
        t0.elapsed()
    );
    assert!(containers_with_label(&task_label(&inst)).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_fails_naming_it() {
    let Some((backend, _image)) = setup("a_missing_image_fails_naming_it").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let missing = hex::encode(rand::random::<[u8; 32]>());
    let image = format!("omesh-test/nothing@sha256:{missing}");
    let inst = instance(dir.path(), &image, &["true"], |_| {});
    let _cleanup = RemoveOnDrop(task_label(&inst));
    let started = AtomicBool::new(false);
    let (_cancel, cancel_rx) = watch::channel(false);
    let end = tokio::time::timeout(
        LONG,
        backend.run(&inst, &|| started.store(true, Ordering::SeqCst), cancel_rx),
    )
    .await
    .unwrap();
    match &end {
        Err(error @ ExecError::ImageMissing { id }) => {
            assert_eq!(id, &format!("sha256:{missing}"));
            assert!(error.to_string().contains("not present"), "{error}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert!(!started.load(Ordering::SeqCst));
    assert!(containers_with_label(&task_label(&inst)).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_orphans_removes_only_this_nodes_containers() {
    let Some((backend, image)) = setup("cleanup_orphans_removes_only_this_nodes_containers").await
    else {
        return;
    };
    let ours = NodeId(rand::random());
    let theirs = NodeId(rand::random());
    let our_label = format!("omesh.node={}", ours.to_hex());
    let their_label = format!("omesh.node={}", theirs.to_hex());
    let _cleanup = (
        RemoveOnDrop(our_label.clone()),
        RemoveOnDrop(their_label.clone()),
    );
    // What a killed node leaves: one container still running, one never started; and one of
    // another node sharing the engine.
    let image_id = image_id_of(&image);
    for (label, run) in [
        (&our_label, true),
        (&our_label, false),
        (&their_label, true),
    ] {
        let mut cmd = Command::new("docker");
        cmd.arg(if run { "run" } else { "create" });
        if run {
            cmd.arg("-d");
        }
        let out = cmd
            .args(["--network", "none", "--label"])
            .arg(label)
            .args(["--label", "omesh.task=orphan", "--label", "omesh.epoch=1"])
            .arg(&image_id)
            .args(["sleep", "60"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker {}: {}",
            if run { "run" } else { "create" },
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(containers_with_label(&our_label).len(), 2);

    let removed = tokio::time::timeout(LONG, backend.cleanup_orphans(&ours, &Default::default()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(removed, 2);
    assert!(containers_with_label(&our_label).is_empty());
    assert_eq!(
        containers_with_label(&their_label).len(),
        1,
        "another node's container was touched"
    );
    // Nothing left: a second pass finds nothing.
    let again = tokio::time::timeout(LONG, backend.cleanup_orphans(&ours, &Default::default()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again, 0);
}

/// The image ID part of a pinned reference, which the docker CLI runs directly.
fn image_id_of(reference: &str) -> String {
    let (_, digest) = reference.rsplit_once('@').unwrap();
    digest.to_owned()
}
