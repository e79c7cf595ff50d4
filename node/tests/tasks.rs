//! Tasks end to end with the process executor, on real peers over loopback: offload,
//! one view everywhere, failover after `kill -9`, cancel, retries, partitions (the cut-off
//! owner's guard ends its instance first), bad input.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{dump, mesh, running_with, wait_until, Node, Submitter};

fn flags(sub: &Submitter, extra: &[&str]) -> Vec<String> {
    let mut f = sub.flags();
    f.extend(extra.iter().map(|s| (*s).to_owned()));
    f.push("--fake-cpu-percent".into());
    f.push("10".into());
    f
}

async fn state_on(node: &Node, id: &str) -> Option<(String, u64, Option<String>)> {
    node.task(id).await.map(|t| (t.state, t.epoch, t.owner))
}

async fn wait_state(nodes: &[&Node], id: &str, state: &str, limit: Duration) -> bool {
    wait_until(limit, || async {
        for n in nodes {
            match n.task(id).await {
                Some(t) if t.state == state => {}
                _ => return false,
            }
        }
        true
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_submitted_to_an_overloaded_peer_runs_on_a_target_tagged_peer() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let nodes = mesh(root.path(), 3, |i| {
        let mut f = sub.flags();
        f.extend(["--target-node-tag".into(), "edge".into()]);
        // Peer 0 is loaded; peer 1 carries the target tag; peer 2 does not.
        f.extend([
            "--fake-cpu-percent".into(),
            if i == 0 { "95" } else { "10" }.into(),
        ]);
        if i == 1 {
            f.extend(["--tag".into(), "edge".into()]);
        }
        f
    })
    .await;
    let edge_id = nodes[1].node_id().await;
    let spec = sub.spec(&["sh", "-c", "echo offloaded"], |_| {});
    let id = sub.submit(&nodes[0], &spec).await;
    let all: Vec<&Node> = nodes.iter().collect();
    assert!(
        wait_state(&all, &id, "succeeded", Duration::from_secs(60)).await,
        "task did not succeed everywhere"
    );
    assert!(nodes[0].status().await.unwrap().overloaded);
    // The same state, epoch and owner on every peer, once the leases have reached every
    // peer: a claim made as the mesh forms (this test submits within its first second) may
    // miss a peer's gossip and come through anti-entropy a period later, and a peer that
    // missed the edge peer's lease may have claimed the same epoch meanwhile; the merge then
    // settles on one owner everywhere.
    let views =
        || async { futures::future::join_all(nodes.iter().map(|n| state_on(n, &id))).await };
    let agreed = wait_until(Duration::from_secs(15), || async {
        let v = views().await;
        v.windows(2).all(|w| w[0] == w[1])
    })
    .await;
    let ids: Vec<String> = futures::future::join_all(nodes.iter().map(Node::node_id)).await;
    assert!(agreed, "views {:?} of peers {ids:?}", views().await);
    let t = nodes[0].task(&id).await.unwrap();
    assert_eq!(
        t.owner.as_deref(),
        Some(edge_id.as_str()),
        "ran on {:?}, not the edge peer",
        t.owner
    );
    let log = nodes[2].logs(&sub.token, &id).await;
    assert_eq!(log.as_deref(), Some("offloaded\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_owner_moves_the_task_to_another_peer_with_a_higher_epoch() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let mut nodes = mesh(root.path(), 3, |_| flags(&sub, &[])).await;
    let marker = format!("omesh-failover-{}", rand::random::<u32>());
    let spec = sub.spec(&["sh", "-c", &format!("sleep 4; echo {marker}")], |_| {});
    let id = sub.submit(&nodes[0], &spec).await;
    assert!(wait_state(&[&nodes[0]], &id, "running", Duration::from_secs(30)).await);
    let t = nodes[0].task(&id).await.unwrap();
    let owner = t.owner.clone().unwrap();
    let mut owner_idx = 0;
    for (i, n) in nodes.iter().enumerate() {
        if n.node_id().await == owner {
            owner_idx = i;
        }
    }
    assert!(
        wait_until(Duration::from_secs(10), || async {
            running_with(&marker) == 1
        })
        .await
    );
    nodes[owner_idx].kill9();
    let killed = Instant::now();
    // The killed owner's instance dies with it (no duplicate beside its successor's).
    assert!(
        wait_until(Duration::from_secs(2), || async {
            running_with(&marker) == 0
        })
        .await,
        "the killed owner's instance kept running"
    );
    let survivor = if owner_idx == 0 { 1 } else { 0 };
    let moved = wait_until(Duration::from_secs(30), || async {
        nodes[survivor]
            .task(&id)
            .await
            .is_some_and(|t| t.state == "running" && t.epoch > 1)
    })
    .await;
    if !moved {
        dump(&nodes.iter().collect::<Vec<_>>());
    }
    assert!(moved, "no failover");
    println!("failover: Running again after {:?}", killed.elapsed());
    let t = nodes[survivor].task(&id).await.unwrap();
    assert_ne!(t.owner.as_deref(), Some(owner.as_str()));
    assert_eq!(t.epoch, 2);
    let others: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != owner_idx)
        .map(|(_, n)| n)
        .collect();
    assert!(wait_state(&others, &id, "succeeded", Duration::from_secs(60)).await);
    let t = nodes[survivor].task(&id).await.unwrap();
    assert_eq!((t.code, t.epoch, t.exit_code), (300, 2, Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_task_stops_and_never_restarts() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let nodes = mesh(root.path(), 2, |_| flags(&sub, &[])).await;
    let marker = format!("omesh-cancel-{}", rand::random::<u32>());
    let spec = sub.spec(&["sh", "-c", &format!("sleep 120; echo {marker}")], |_| {});
    let id = sub.submit(&nodes[0], &spec).await;
    assert!(wait_state(&[&nodes[0]], &id, "running", Duration::from_secs(30)).await);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            running_with(&marker) == 1
        })
        .await
    );
    let epoch = nodes[0].task(&id).await.unwrap().epoch;
    assert_eq!(sub.cancel(&nodes[1], &id).await, 200);
    let all: Vec<&Node> = nodes.iter().collect();
    assert!(wait_state(&all, &id, "cancelled", Duration::from_secs(30)).await);
    assert!(
        wait_until(Duration::from_secs(15), || async {
            running_with(&marker) == 0
        })
        .await,
        "process still running"
    );
    // Absence over time: nothing restarts it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(running_with(&marker), 0);
    let t = nodes[1].task(&id).await.unwrap();
    assert_eq!(
        (t.state.as_str(), t.code, t.epoch),
        ("cancelled", 499, epoch)
    );
    // Cancelling again is harmless; cancelling an unknown task is a JSON 404.
    assert_eq!(sub.cancel(&nodes[0], &id).await, 200);
    assert_eq!(sub.cancel(&nodes[0], &"cd".repeat(32)).await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_is_retried_then_fails_with_its_exit_code() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let nodes = mesh(root.path(), 2, |_| flags(&sub, &[])).await;
    let spec = sub.spec(&["sh", "-c", "echo trying; exit 7"], |s| s.max_attempts = 3);
    let id = sub.submit(&nodes[1], &spec).await;
    let all: Vec<&Node> = nodes.iter().collect();
    assert!(
        wait_state(&all, &id, "failed", Duration::from_secs(90)).await,
        "task did not fail for good"
    );
    let t = nodes[0].task(&id).await.unwrap();
    assert_eq!((t.code, t.exit_code, t.failed_attempts), (400, Some(7), 3));
    let failed: Vec<_> = t.history.iter().filter(|h| h.state == "failed").collect();
    assert_eq!(failed.len(), 3, "{:?}", t.history);
    // Backoff: each retry waited longer than the one before (base 1 s, doubling, ±20%).
    let at: Vec<u64> = failed.iter().map(|h| h.at_ms).collect();
    assert!(at[2] - at[1] > at[1] - at[0], "no growing backoff: {at:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        nodes[0].task(&id).await.unwrap().failed_attempts,
        3,
        "a 4th attempt ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_owner_stops_its_instance_before_the_majority_takes_over() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let nodes = mesh(root.path(), 3, |_| flags(&sub, &[])).await;
    let marker = format!("omesh-partition-{}", rand::random::<u32>());
    let spec = sub.spec(&["sh", "-c", &format!("sleep 12; echo {marker}")], |_| {});
    let id = sub.submit(&nodes[0], &spec).await;
    assert!(wait_state(&[&nodes[0]], &id, "running", Duration::from_secs(30)).await);
    let owner = nodes[0].task(&id).await.unwrap().owner.unwrap();
    let mut owner_idx = 0;
    let mut peer_ids = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        if n.node_id().await == owner {
            owner_idx = i;
        }
        peer_ids.push(n.peer_id().await);
    }
    // Cut the owner off both ways.
    let others: Vec<usize> = (0..3).filter(|i| *i != owner_idx).collect();
    nodes[owner_idx]
        .block(
            &sub.token,
            &others
                .iter()
                .map(|i| peer_ids[*i].clone())
                .collect::<Vec<_>>(),
        )
        .await;
    for i in &others {
        nodes[*i]
            .block(&sub.token, &[peer_ids[owner_idx].clone()])
            .await;
    }
    let cut = Instant::now();
    let survivor = &nodes[others[0]];
    // The cut-off owner cannot show that its lease holds: its guard kills the instance at
    // the deadline, before the majority can count the lease lost and run epoch 2. At no
    // look do two instances run.
    let most = std::cell::Cell::new(0);
    let gone_after = std::cell::Cell::new(None);
    let failed_over = wait_until(Duration::from_secs(30), || async {
        let n = running_with(&marker);
        most.set(most.get().max(n));
        if n == 0 && gone_after.get().is_none() {
            gone_after.set(Some(cut.elapsed()));
        }
        survivor
            .task(&id)
            .await
            .is_some_and(|t| t.state == "running" && t.epoch == 2)
    })
    .await;
    assert!(failed_over, "the majority did not take over");
    let failover_after = cut.elapsed();
    assert!(
        gone_after.get().is_some_and(|g| g < failover_after),
        "epoch 1 was not seen gone before epoch 2 ran (gone {:?}, failover {failover_after:?})",
        gone_after.get()
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let n = running_with(&marker);
            most.set(most.get().max(n));
            n == 1
        })
        .await,
        "epoch 2 does not run"
    );
    assert_eq!(
        nodes[owner_idx].task(&id).await.unwrap().epoch,
        1,
        "the cut-off owner saw epoch 2"
    );
    // Heal: the owner learns of epoch 2; still one instance.
    for n in &nodes {
        n.block(&sub.token, &[]).await;
    }
    let learned = wait_until(Duration::from_secs(30), || async {
        most.set(most.get().max(running_with(&marker)));
        nodes[owner_idx]
            .task(&id)
            .await
            .is_some_and(|t| t.epoch == 2)
    })
    .await;
    assert!(learned, "the healed owner did not learn of epoch 2");
    assert_eq!(most.get(), 1, "two instances ran at once");
    println!(
        "partition: epoch 1 seen gone {:?} after the cut, epoch 2 running {failover_after:?} \
         after it",
        gone_after.get().unwrap()
    );
    let all: Vec<&Node> = nodes.iter().collect();
    assert!(wait_state(&all, &id, "succeeded", Duration::from_secs(60)).await);
    let new_owner = survivor.task(&id).await.unwrap().owner;
    assert_ne!(new_owner.as_deref(), Some(owner.as_str()));
    for n in &nodes {
        let t = n.task(&id).await.unwrap();
        assert_eq!(t.epoch, 2, "the surviving epoch's result is reported");
        assert_eq!(t.owner, new_owner);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submissions_get_clear_errors_and_change_nothing() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let nodes = mesh(root.path(), 1, |_| flags(&sub, &[])).await;
    let n = &nodes[0];
    let body = |s: &omesh_protocol::SignedTaskSpec| {
        serde_json::to_value(omesh::api::SubmitBody::from_signed(s)).unwrap()
    };
    let good = sub.spec(&["true"], |_| {});

    let mut unsigned = body(&good);
    unsigned["signature"] = "".into();
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[1u8; 32]);
    let unknown = good.spec.clone().sign(&stranger);
    let undigested = sub.spec(&["true"], |s| s.image = "busybox:latest".into());
    let absurd = sub.spec(&["true"], |s| s.memory_bytes = u64::MAX);
    let mut bad_executor = body(&good);
    bad_executor["spec"]["executor"] = "Kubernetes".into();
    let cases: Vec<(&str, serde_json::Value, Option<&str>, u16, &str)> = vec![
        (
            "no signature",
            unsigned,
            Some(&sub.token),
            400,
            "not signed",
        ),
        (
            "unknown key",
            body(&unknown),
            Some(&sub.token),
            400,
            "authorized_submitters",
        ),
        ("missing token", body(&good), None, 401, "bearer token"),
        (
            "wrong token",
            body(&good),
            Some("nope"),
            401,
            "wrong bearer token",
        ),
        (
            "image without digest",
            body(&undigested),
            Some(&sub.token),
            400,
            "not pinned by digest",
        ),
        (
            "absurd resources",
            body(&absurd),
            Some(&sub.token),
            400,
            "absurd",
        ),
        (
            "unknown executor",
            bad_executor,
            Some(&sub.token),
            400,
            "Kubernetes",
        ),
        (
            "not json",
            serde_json::json!("hello"),
            Some(&sub.token),
            400,
            "invalid task body",
        ),
    ];
    for (what, b, token, status, needle) in cases {
        let (got, json) = sub.post(n, &b, token).await;
        let reason = json["error"].as_str().unwrap_or_default().to_owned();
        assert_eq!(got, status, "{what}: {json}");
        assert!(
            reason.contains(needle),
            "{what}: reason {reason:?} lacks {needle:?}"
        );
    }
    assert_eq!(
        n.status().await.unwrap().tasks,
        0,
        "a bad submission changed the state"
    );

    // The CLI refuses negative resources and unknown executors before sending anything.
    let out = std::process::Command::new(common::bin())
        .args([
            "submit",
            "--api",
            &n.api(),
            "--cpu",
            "-1",
            "--image",
            &good.spec.image,
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("-1"));
    let out = std::process::Command::new(common::bin())
        .args([
            "submit",
            "--api",
            &n.api(),
            "--executor",
            "vm",
            "--image",
            &good.spec.image,
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown executor"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A task no peer can ever satisfy stays pending, with the reason in `omesh task`.
    let gpu = sub.spec(&["true"], |s| {
        s.required_tags.insert("gpu".into());
    });
    let id = sub.submit(n, &gpu).await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            n.task(&id).await.is_some_and(|t| {
                t.pending_reason
                    .as_deref()
                    .is_some_and(|r| r.contains("gpu"))
            })
        })
        .await
    );
    let out = std::process::Command::new(common::bin())
        .args(["task", "--api", &n.api(), &id[..10]])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("pending (100)") && text.contains("gpu"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_logs_need_the_bearer_token() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let nodes = mesh(root.path(), 1, |_| flags(&sub, &[])).await;
    let n = &nodes[0];
    let spec = sub.spec(&["sh", "-c", "echo the-output"], |_| {});
    let id = sub.submit(n, &spec).await;
    assert!(
        wait_state(&[n], &id, "succeeded", Duration::from_secs(60)).await,
        "task did not succeed"
    );
    let url = format!("{}/api/v1/tasks/{id}/logs", n.api());
    let get = |token: Option<String>| {
        let url = url.clone();
        async move {
            let mut req = reqwest::Client::new().get(url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let json: serde_json::Value = resp.json().await.unwrap();
            (status, json)
        }
    };
    // Without the token, or with a wrong one: 401 with a JSON reason, and none of the log.
    for (token, needle) in [
        (None, "missing bearer token"),
        (Some("nope"), "wrong bearer token"),
    ] {
        let (status, json) = get(token.map(str::to_owned)).await;
        assert_eq!(status, 401, "{token:?}: {json}");
        let reason = json["error"].as_str().unwrap_or_default();
        assert!(reason.contains(needle), "{token:?}: {json}");
        assert!(!json.to_string().contains("the-output"), "{json}");
    }
    // With it: the log.
    let (status, json) = get(Some(sub.token.clone())).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["data"], "the-output\n", "{json}");

    // `omesh logs` sends the token from OMESH_API_TOKEN; without one it fails with the reason.
    let out = std::process::Command::new(common::bin())
        .args(["logs", "--api", &n.api(), &id])
        .env("OMESH_API_TOKEN", &sub.token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "the-output\n");
    let out = std::process::Command::new(common::bin())
        .args(["logs", "--api", &n.api(), &id])
        .env_remove("OMESH_API_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("bearer token"),
        "{stderr}"
    );

    // A peer without any token refuses logs, saying why.
    let mut bare = sub.flags_without_token();
    bare.extend(["--alone".into(), "true".into()]);
    let refs: Vec<&str> = bare.iter().map(String::as_str).collect();
    let lone = Node::start(root.path(), "tokenless", &[], &refs);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            lone.status().await.is_some_and(|s| s.ready)
        })
        .await,
        "the tokenless peer did not start:\n{}",
        lone.log()
    );
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/tasks/{id}/logs", lone.api()))
        .bearer_auth(&sub.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let json: serde_json::Value = resp.json().await.unwrap();
    let reason = json["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("logs") && reason.contains("no api_token"),
        "{json}"
    );
}
