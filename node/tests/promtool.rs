//! `promtool check metrics` accepts what /metrics serves.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{wait_until, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics() {
    if Command::new("promtool").arg("--version").output().is_err() {
        // .ci/run installs Debian's `prometheus` package, which carries promtool.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "promtool is missing in CI; .ci/run should have installed the prometheus package"
        );
        eprintln!("SKIP promtool_accepts_the_metrics: promtool not installed (apt-get install prometheus)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let a = Node::start(root.path(), "a", &[], &["--alone", "true"]);
    let b = Node::start(root.path(), "b", &[a.addr()], &[]);
    // Wait until the histograms and counters have samples worth checking.
    assert!(
        wait_until(Duration::from_secs(30), || async {
            b.text("/metrics").await.is_some_and(|m| {
                common::metric(&m, "omesh_sync_success_total", None) >= 1.0
                    && common::metric(&m, "omesh_delta_propagation_seconds_count", None) >= 1.0
            })
        })
        .await
    );
    let metrics = b.text("/metrics").await.unwrap();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool refused /metrics:\n{}{}\n---\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(a);
}
