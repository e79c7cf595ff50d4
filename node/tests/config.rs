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

#[test]
fn a_quic_port_clash_says_the_address_is_in_use_and_names_the_blob_port() {
    let dir = tempfile::tempdir().unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let quic = udp.local_addr().unwrap().port();
    let listen = format!("/ip4/127.0.0.1/udp/{quic}/quic-v1");
    let api = format!("127.0.0.1:{}", free_port());
    let out = up(&["--listen", &listen, "--api-listen", &api], dir.path());
    // The cause, not an empty string after the colon; and the port every peer also holds.
    assert_fails_naming(
        &out,
        &["listen", &listen, "in use", "QUIC port + 1", "blob_listen"],
    );
}

#[test]
fn the_default_blob_port_taken_is_named_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    // A QUIC port whose next one (the blob data plane's default) somebody holds.
    let (quic, _held) = loop {
        let quic = free_port();
        if let Ok(s) = std::net::UdpSocket::bind(("127.0.0.1", quic + 1)) {
            break (quic, s);
        }
    };
    let log = dir.path().join("omesh.log");
    let mut child = Command::new(bin())
        .args(["up", "--alone", "true", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen", &format!("/ip4/127.0.0.1/udp/{quic}/quic-v1")])
        .args(["--api-listen", &format!("127.0.0.1:{}", free_port())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let mut text = String::new();
    while Instant::now() < end && !text.contains("status API listening") {
        assert!(child.try_wait().unwrap().is_none(), "exited: {text}");
        std::thread::sleep(Duration::from_millis(100));
        text = std::fs::read_to_string(&log).unwrap_or_default();
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = text
        .lines()
        .find(|l| l.contains("blob"))
        .unwrap_or_else(|| panic!("no word of the blob port: {text}"));
    for needle in [
        "QUIC port + 1",
        "blob_listen",
        "in use",
        &(quic + 1).to_string(),
    ] {
        assert!(line.contains(needle), "{needle:?} not in {line}");
    }
}

#[test]
fn a_misspelled_environment_variable_is_refused_naming_the_known_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .args(["up", "--alone", "true", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen",
            &format!("/ip4/127.0.0.1/udp/{}/quic-v1", free_port()),
        ])
        .args(["--api-listen", &format!("127.0.0.1:{}", free_port())])
        .env("OMESH_THRESHHOLD_CPU", "50")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            panic!("started with a misspelled variable");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert_fails_naming(&out, &["OMESH_THRESHHOLD_CPU", "OMESH_THRESHOLD_CPU"]);
}
