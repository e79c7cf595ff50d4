//! The README's first command: `omesh demo` runs to its summary and cleans up after itself,
//! with the process executor and (where an engine answers) with Docker, where the image
//! moves from peer0's store to the edge peers over the data plane.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::docker::docker_or_skip;

/// One demo at a time: each runs three peers on a small host.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the demo with `executor`; its stdout, after checking what every run must show.
fn demo(executor: &str) -> String {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = Command::new(env!("CARGO_BIN_EXE_omesh"))
        .args([
            "demo",
            "--tasks",
            "4",
            "--burn-secs",
            "2",
            "--executor",
            executor,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("==> summary"), "{stdout}");
    assert!(
        stdout.contains("4/4 tasks succeeded, none ran on the overloaded peer0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("again on peer"),
        "no failover shown:\n{stdout}"
    );
    assert!(
        stdout.contains("restarted") && stdout.contains("rejoined"),
        "the killed peer did not come back:\n{stdout}"
    );
    // Every peer the demo started is gone.
    let left = Command::new("pgrep")
        .args(["-f", "omesh-demo-"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "peers left running"
    );
    stdout
}

/// The number after `<peer> <what> ` in the demo's line on image bytes, in MB.
fn image_mb(stdout: &str, peer: &str, what: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.contains("image moved peer to peer"))
        .unwrap_or_else(|| panic!("no image line:\n{stdout}"));
    let part = line
        .split(';')
        .find(|p| p.contains(&format!("{peer} served")))
        .unwrap_or_else(|| panic!("no {peer} in {line}"));
    let after = part.split(&format!("{what} ")).nth(1).unwrap();
    after.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn the_demo_runs_to_its_summary_with_processes_and_leaves_no_peer_behind() {
    let stdout = demo("process");
    assert!(stdout.contains("(child processes)"), "{stdout}");
    assert!(!stdout.contains("image moved"), "{stdout}");
}

#[test]
fn the_demo_with_docker_moves_its_image_between_peers_and_cleans_the_engine() {
    if !docker_or_skip("the_demo_with_docker_moves_its_image_between_peers_and_cleans_the_engine") {
        return;
    }
    let stdout = demo("docker");
    assert!(stdout.contains("Docker containers"), "{stdout}");
    assert!(image_mb(&stdout, "peer0", "served") > 0.0, "{stdout}");
    let fetched = image_mb(&stdout, "peer1", "fetched") + image_mb(&stdout, "peer2", "fetched");
    assert!(fetched > 0.0, "the edge peers fetched nothing:\n{stdout}");
    assert!(
        stdout.contains("container of stale epoch") && stdout.contains("is removed"),
        "{stdout}"
    );
    // Nothing of the demo is left in the engine: no image, no container.
    let images = Command::new("docker")
        .args(["images", "-q", "omesh-demo/burn"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&images.stdout).trim().is_empty(),
        "demo image left in the engine"
    );
    let containers = Command::new("docker")
        .args(["ps", "-aq", "--filter", "label=omesh.task"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&containers.stdout)
            .trim()
            .is_empty(),
        "demo containers left in the engine"
    );
}
