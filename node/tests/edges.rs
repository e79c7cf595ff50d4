//! The rough edges a new user met (issue #17), each as an operator meets it: real `omesh`
//! processes, their API, their CLI and what they print.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, free_port, mesh, wait_until, Node, Submitter};

/// Runs `omesh ARGS` to its end (it must end within 60 s).
fn omesh(args: &[&str]) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            panic!("omesh {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn lone(root: &std::path::Path, sub: &Submitter, extra: &[&str]) -> Node {
    let mut flags = sub.flags();
    flags.extend(["--alone".into(), "true".into()]);
    flags.extend(extra.iter().map(|s| (*s).to_owned()));
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    Node::start(root, "lone", &[], &refs)
}

async fn ready(node: &Node) {
    let ok = wait_until(Duration::from_secs(60), || async {
        node.status().await.is_some_and(|s| s.ready)
    })
    .await;
    if !ok {
        common::dump(&[node]);
    }
    assert!(ok, "{} did not get ready", node.name);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_up_on_the_same_data_dir_is_refused_and_names_the_running_peer() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let first = lone(root.path(), &sub, &[]);
    ready(&first).await;
    let before = first.status().await.unwrap();
    let data = first.dir.join("data");
    let out = omesh(&[
        "up",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        &format!("/ip4/127.0.0.1/udp/{}/quic-v1", free_port()),
        "--api-listen",
        &format!("127.0.0.1:{}", free_port()),
        "--alone",
        "true",
    ]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a second peer started: {err}");
    let pid = first.pid().unwrap();
    assert!(
        err.contains(&format!("pid {pid}")),
        "must name the running peer: {err}"
    );
    assert!(err.contains("in use"), "{err}");
    // The first one is untouched: same incarnation, on disk too.
    let after = first.status().await.unwrap();
    assert_eq!(after.incarnation, before.incarnation);
    let on_disk = std::fs::read_to_string(data.join("incarnation")).unwrap();
    assert_eq!(on_disk.trim(), before.incarnation.to_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_task_needs_no_image_and_its_timeline_shows_local_times_and_offsets() {
    let root = tempfile::tempdir().unwrap();
    let key = root.path().join("submitter.key");
    let out = omesh(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let public = text(&out.stdout).trim().to_owned();
    let sub = Submitter::new();
    // Its load pinned low: a busy test host must not make it refuse the work.
    let node = lone(
        root.path(),
        &sub,
        &["--authorized-submitter", &public, "--fake-cpu-percent", "1"],
    );
    ready(&node).await;
    let out = omesh(&[
        "submit",
        "--api",
        &node.api(),
        "--token",
        &sub.token,
        "--key",
        key.to_str().unwrap(),
        "--executor",
        "process",
        "--",
        "/bin/sh",
        "-c",
        "echo hello",
    ]);
    assert!(
        out.status.success(),
        "a process task without --image was refused: {}",
        text(&out.stderr)
    );
    let id = text(&out.stdout).trim().to_owned();
    let done = wait_until(Duration::from_secs(60), || async {
        node.task(&id).await.is_some_and(|t| t.state == "succeeded")
    })
    .await;
    if !done {
        common::dump(&[&node]);
    }
    assert!(done, "the task did not succeed: {:?}", node.task(&id).await);
    let t = node.task(&id).await.unwrap();
    assert_eq!(t.image, None, "no image is shown as none");

    // A container task still needs one, and is told so.
    let out = omesh(&[
        "submit",
        "--api",
        &node.api(),
        "--token",
        &sub.token,
        "--key",
        key.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--image"),
        "{}",
        text(&out.stderr)
    );

    let out = omesh(&["task", &id, "--api", &node.api()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    let timeline: Vec<&str> = shown
        .lines()
        .skip_while(|l| !l.starts_with("timeline"))
        .skip(2)
        .collect();
    assert!(!timeline.is_empty(), "{shown}");
    for line in &timeline {
        // No raw Unix milliseconds (13 digits) anywhere.
        let raw = line
            .split_whitespace()
            .any(|w| w.len() >= 13 && w.bytes().all(|b| b.is_ascii_digit()));
        assert!(!raw, "raw epoch milliseconds in {line:?}\n{shown}");
        // A date and a time of day, and an offset in seconds.
        let words: Vec<&str> = line.split_whitespace().collect();
        let date = words
            .iter()
            .any(|w| w.len() == 10 && w.as_bytes()[4] == b'-' && w.as_bytes()[7] == b'-');
        let clock = words
            .iter()
            .any(|w| w.len() == 12 && w.as_bytes()[2] == b':');
        assert!(date && clock, "no local date and time in {line:?}\n{shown}");
        assert!(line.contains(" s"), "no offset in {line:?}\n{shown}");
    }
    assert!(timeline[0].contains("+0.0 s"), "{shown}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_takes_bearer_in_any_case_and_answers_every_error_as_json() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let node = lone(root.path(), &sub, &[]);
    ready(&node).await;
    let http = reqwest::Client::new();
    let spec = sub.spec(&["true"], |_| {});
    let body = serde_json::to_value(omesh::api::SubmitBody::from_signed(&spec)).unwrap();

    // RFC 7235: the scheme is case-insensitive.
    for scheme in ["bearer", "BEARER"] {
        let spec = sub.spec(&["true"], |_| {});
        let body = serde_json::to_value(omesh::api::SubmitBody::from_signed(&spec)).unwrap();
        let resp = http
            .post(format!("{}/api/v1/tasks", node.api()))
            .header("Authorization", format!("{scheme} {}", sub.token))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            201,
            "{scheme}: {:?}",
            resp.text().await
        );
    }

    // Unknown fields are refused, naming them: at the top and inside the spec.
    for path in [&["privileged"][..], &["spec", "privileged"][..]] {
        let mut b = body.clone();
        let mut at = &mut b;
        for p in &path[..path.len() - 1] {
            at = &mut at[*p];
        }
        at[path[path.len() - 1]] = serde_json::json!(true);
        let (status, json) = sub.post(&node, &b, Some(&sub.token)).await;
        assert_eq!(status, 400, "{path:?}: {json}");
        let why = json["error"].as_str().unwrap_or_default();
        assert!(why.contains("privileged"), "{path:?}: {json}");
    }

    // A body over the limit: 413, as JSON with a reason. The peer answers before it has read
    // the body and closes the connection, so the client may see its write cut off instead:
    // each try on a connection of its own.
    let mut resp = None;
    for _ in 0..5 {
        let sent = reqwest::Client::new()
            .post(format!("{}/api/v1/tasks", node.api()))
            .bearer_auth(&sub.token)
            .header("Content-Type", "application/json")
            .body(vec![b' '; 3 << 20])
            .send()
            .await;
        if let Ok(r) = sent {
            resp = Some(r);
            break;
        }
    }
    let resp = resp.expect("no answer to an oversized body");
    assert_eq!(resp.status().as_u16(), 413);
    let json: serde_json::Value = resp.json().await.expect("413 must be JSON");
    assert!(
        json["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{json}"
    );

    // A query string that does not parse: 400, as JSON.
    let http = reqwest::Client::new();
    let resp = http
        .get(format!(
            "{}/api/v1/tasks/{}/logs?offset=minus-one",
            node.api(),
            "ab".repeat(32)
        ))
        .bearer_auth(&sub.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let json: serde_json::Value = resp.json().await.expect("a query error must be JSON");
    assert!(
        json["error"].as_str().is_some_and(|e| e.contains("offset")),
        "{json}"
    );

    // A wrong method: 405, as JSON.
    let resp = http
        .put(format!("{}/api/v1/status", node.api()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    let json: serde_json::Value = resp.json().await.expect("405 must be JSON");
    assert!(json["error"].is_string(), "{json}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claimed_task_that_does_not_run_yet_says_it_is_starting_and_where() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    // n0 is over its thresholds, n1 settles for ten minutes between a claim and its start.
    let nodes = mesh(root.path(), 2, |i| {
        let mut f = sub.flags();
        match i {
            0 => f.extend(["--fake-cpu-percent".into(), "99".into()]),
            _ => f.extend([
                "--fake-cpu-percent".into(),
                "1".into(),
                "--settle-ms".into(),
                "600000".into(),
            ]),
        }
        f
    })
    .await;
    let owner = nodes[1].node_id().await;
    let spec = sub.spec(&["sleep", "30"], |_| {});
    let id = sub.submit(&nodes[0], &spec).await;
    let claimed = wait_until(Duration::from_secs(60), || async {
        nodes[0]
            .task(&id)
            .await
            .is_some_and(|t| t.owner.as_deref() == Some(owner.as_str()))
    })
    .await;
    assert!(claimed, "n1 did not claim: {:?}", nodes[0].task(&id).await);
    // Its view catches up within a pass; the reason must then be the start, not placement.
    let said = wait_until(Duration::from_secs(30), || async {
        nodes[0]
            .task(&id)
            .await
            .and_then(|t| t.pending_reason)
            .is_some_and(|r| r.contains("claimed by") && r.contains(&owner[..12]))
    })
    .await;
    let t = nodes[0].task(&id).await.unwrap();
    assert_eq!(t.state, "pending");
    assert!(said, "the seer's reason: {:?}", t.pending_reason);
    let reason = t.pending_reason.unwrap_or_default();
    assert!(reason.contains("starting"), "{reason}");
    assert!(!reason.contains("over its thresholds"), "{reason}");
    let own = nodes[1].task(&id).await.unwrap();
    let own_reason = own.pending_reason.unwrap_or_default();
    assert!(
        own_reason.contains("settle"),
        "the owner's reason: {own_reason}"
    );
    // And `omesh task` says it.
    let out = omesh(&["task", &id, "--api", &nodes[0].api()]);
    assert!(
        text(&out.stdout).contains("claimed by"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_seed_redials_the_peers_it_knew() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let mut nodes = mesh(root.path(), 3, |_| sub.flags()).await;
    let others = [nodes[1].peer_id().await, nodes[2].peer_id().await];
    let seed_id = nodes[0].node_id().await;
    // The seed keeps what it learned in its data dir.
    let peers_file = nodes[0].dir.join("data").join("peers");
    let kept = wait_until(Duration::from_secs(60), || async {
        let text = std::fs::read_to_string(&peers_file).unwrap_or_default();
        others.iter().all(|p| text.contains(p.as_str()))
    })
    .await;
    assert!(
        kept,
        "{}",
        std::fs::read_to_string(&peers_file).unwrap_or_default()
    );
    // It comes back on another port: nobody can reach it at the address they knew, so it
    // rejoins only if it dials them itself (it has no --seed).
    nodes[0].kill9();
    let hold = std::net::UdpSocket::bind(("127.0.0.1", nodes[0].quic_port)).unwrap();
    let old_port = nodes[0].quic_port;
    nodes[0].restart();
    assert_ne!(nodes[0].quic_port, old_port);
    let rejoined = wait_until(Duration::from_secs(90), || async {
        for n in &nodes {
            let Some(peers) = n.peers().await else {
                return false;
            };
            let alive = peers.iter().filter(|p| p.health == "alive").count();
            let seed_back = peers
                .iter()
                .any(|p| p.id == seed_id && p.health == "alive" && p.incarnation >= 2);
            if alive != 3 || !seed_back {
                return false;
            }
        }
        true
    })
    .await;
    if !rejoined {
        common::dump(&nodes.iter().collect::<Vec<_>>());
        for n in &nodes {
            let views: Vec<String> = n
                .peers()
                .await
                .unwrap_or_default()
                .iter()
                .map(|p| format!("{} {} inc {}", &p.id[..12], p.health, p.incarnation))
                .collect();
            eprintln!("{}: {views:?}", n.name);
        }
    }
    drop(hold);
    assert!(rejoined, "the restarted seed did not rejoin");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_summarises_the_mesh_on_one_screen() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let mut nodes = mesh(root.path(), 3, |_| {
        let mut f = sub.flags();
        f.extend(["--fake-cpu-percent".into(), "1".into()]);
        f
    })
    .await;
    let spec = sub.spec(&["true"], |_| {});
    let id = sub.submit(&nodes[0], &spec).await;
    let done = wait_until(Duration::from_secs(60), || async {
        nodes[0]
            .task(&id)
            .await
            .is_some_and(|t| t.state == "succeeded")
    })
    .await;
    assert!(done);
    let out = omesh(&["status", "--api", &nodes[0].api()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.lines().count() <= 24, "more than a screen:\n{shown}");
    let line = |key: &str| {
        shown
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} line:\n{shown}"))
            .to_owned()
    };
    assert!(line("nodes").contains("3 alive"), "{shown}");
    assert!(line("tasks").contains("1 succeeded"), "{shown}");
    let digest = wait_until(Duration::from_secs(60), || async {
        let out = omesh(&["status", "--api", &nodes[0].api()]);
        text(&out.stdout)
            .lines()
            .any(|l| l.starts_with("digest") && l.contains("3 of 3 agree"))
    })
    .await;
    assert!(digest, "{shown}");
    // A dead peer is counted as such.
    nodes[2].kill9();
    let counted = wait_until(Duration::from_secs(60), || async {
        let out = omesh(&["status", "--api", &nodes[0].api()]);
        text(&out.stdout).lines().any(|l| {
            l.starts_with("nodes") && l.contains("2 alive") && !l.contains("0 suspect, 0 gone")
        })
    })
    .await;
    assert!(
        counted,
        "{}",
        text(&omesh(&["status", "--api", &nodes[0].api()]).stdout)
    );
}
