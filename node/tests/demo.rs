//! The README's first command: `omesh demo` runs to its summary and cleans up after itself.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn the_demo_runs_to_its_summary_and_leaves_no_peer_behind() {
    let out = Command::new(env!("CARGO_BIN_EXE_omesh"))
        .args(["demo", "--tasks", "4", "--burn-secs", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
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
    // Every peer the demo started is gone.
    let left = Command::new("pgrep")
        .args(["-f", "omesh-demo-"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "peers left running"
    );
}
