//! Bad configuration exits non-zero with a message naming the key or address.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, free_port};

/// Runs `omesh up ARGS` and returns its output; fails if it is still running after 20 s.
fn up(args: &[&str], dir: &std::path::Path) -> Output {
    let mut child = Command::new(bin())
        .arg("up")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("omesh up {args:?} kept running with a bad config");
}

fn assert_fails_naming(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exited 0; stderr: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr does not name {n:?}: {stderr}");
    }
}

#[test]
fn unknown_key_in_the_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("omesh.toml");
    std::fs::write(&file, "threshold_cpu = 70\nthreshhold_memory = 80\n").unwrap();
    let out = up(&["--config", file.to_str().unwrap()], dir.path());
    assert_fails_naming(&out, &["threshhold_memory", "omesh.toml"]);
}

#[test]
fn bad_multiaddr_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = up(&["--seed", "127.0.0.1:7001"], dir.path());
    assert_fails_naming(&out, &["seeds", "127.0.0.1:7001"]);
    let out = up(&["--listen", "/ip4/127.0.0.1/tcp/7001"], dir.path());
    assert_fails_naming(&out, &["listen", "/ip4/127.0.0.1/tcp/7001"]);
}

#[test]
fn bad_value_from_the_environment_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .args(["up", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("OMESH_THRESHOLD_CPU", "250")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "kept running");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert_fails_naming(&out, &["threshold"]);
}

#[test]
fn ports_in_use_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let quic = udp.local_addr().unwrap().port();
    let listen = format!("/ip4/127.0.0.1/udp/{quic}/quic-v1");
    let api = format!("127.0.0.1:{}", free_port());
    let out = up(&["--listen", &listen, "--api-listen", &api], dir.path());
    assert_fails_naming(&out, &["listen", &listen]);

    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api = tcp.local_addr().unwrap().to_string();
    let listen = format!("/ip4/127.0.0.1/udp/{}/quic-v1", free_port());
    let out = up(&["--listen", &listen, "--api-listen", &api], dir.path());
    assert_fails_naming(&out, &["api_listen", &api]);
}

#[test]
fn an_unusable_api_token_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-token");
    let out = up(&["--api-token-file", missing.to_str().unwrap()], dir.path());
    assert_fails_naming(&out, &["api_token_file", missing.to_str().unwrap()]);
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let out = up(&["--api-token-file", empty.to_str().unwrap()], dir.path());
    assert_fails_naming(&out, &["api_token_file", empty.to_str().unwrap(), "empty"]);
}
