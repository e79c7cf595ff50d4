//! Admission with real processes: an admitted mesh converges; peers without a valid
//! certificate (none, a foreign key's, expired, another peer's) and a peer outside
//! `allowed_peers` are refused when they connect, get no state, and each refusal is counted by
//! reason; a node configured with admission keys but no valid certificate does not start.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{dump, metric, operator, wait_until, Node, Submitter};
use omesh::devtools::localmesh::Admission;
use omesh::images::dataplane::contact::Answer;
use omesh_protocol::{AdmissionCert, NodeId, Wire};

const LONG: Duration = Duration::from_secs(90);

/// Creates the identity in `root/name/data` (where `Node::start` puts the data dir) and
/// writes `cert(node)` as its certificate.
fn preset_cert(root: &Path, name: &str, cert: impl FnOnce(NodeId) -> AdmissionCert) {
    let dir = root.join(name).join("data");
    let data = omesh::datadir::DataDir::open(&dir).unwrap();
    let key = data.identity().unwrap();
    let node = omesh::peer::net::node_id_of_key(&key).unwrap();
    std::fs::write(dir.join("admission.cert"), cert(node).to_wire().unwrap()).unwrap();
}

fn now_ms() -> u64 {
    omesh::peer::Clock::new().now()
}

async fn refused(node: &Node, reason: &str) -> f64 {
    let text = node.text("/metrics").await.unwrap_or_default();
    metric(
        &text,
        "omesh_connections_refused_total",
        Some(&format!("reason=\"{reason}\"")),
    )
}

/// A stranger's own view: itself only, no connection, no task.
async fn isolated(n: &Node) -> bool {
    n.status()
        .await
        .is_some_and(|s| s.peers_known == 1 && s.peers_connected == 0 && s.tasks == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitted_mesh_converges_and_refuses_every_peer_without_a_valid_certificate() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let sub = Submitter::new();
    let flags = sub.flags();
    let member_flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let seed = {
        let mut f = member_flags.clone();
        f.extend(["--alone", "true"]);
        Node::start(r, "seed", &[], &f)
    };
    let seeds = vec![seed.addr()];
    let a = Node::start(r, "a", &seeds, &member_flags);
    let b = Node::start(r, "b", &seeds, &member_flags);
    let members = [&seed, &a, &b];
    let converged = wait_until(LONG, || async {
        let mut digests = BTreeSet::new();
        for n in members {
            match n.status().await {
                Some(s) if s.ready && s.peers_alive == 3 && s.admission == "admitted" => {
                    digests.insert(s.digest);
                }
                _ => return false,
            }
        }
        digests.len() == 1
    })
    .await;
    if !converged {
        dump(&members);
    }
    assert!(converged, "the admitted mesh did not converge");
    // Some state a stranger must not see.
    let spec = sub.spec(&["true"], |_| {});
    let task = sub.submit(&seed, &spec).await;
    assert!(
        wait_until(LONG, || async { b.task(&task).await.is_some() }).await,
        "the task did not spread"
    );

    // The expired one trusts this mesh's admission key (a node with admission keys and no
    // valid certificate does not start; see the last test).
    let op_pub = operator().public_hex();
    let op = operator().operator;
    let trusting = ["--admission-key", op_pub.as_str()];
    let now = now_ms();
    preset_cert(r, "expired", |node| {
        AdmissionCert::sign(&op, node, BTreeSet::new(), now - 20_000, now - 10_000)
    });
    preset_cert(r, "wrongid", |_| {
        AdmissionCert::sign(&op, NodeId([9; 32]), BTreeSet::new(), now, now + 3_600_000)
    });
    let foreign = Admission::generate();
    let strangers = [
        // An open node with no certificate dials libp2p directly: refused at establishment.
        (
            "open",
            Node::start_with(r, "open", &seeds, &[], None),
            "not_admitted",
        ),
        // An open node holding another node's certificate shows it in a first contact.
        (
            "wrongid",
            Node::start_with(r, "wrongid", &seeds, &[], None),
            "wrong_node",
        ),
        (
            "foreign",
            Node::start_with(r, "foreign", &seeds, &[], Some(&foreign)),
            "unknown_issuer",
        ),
        (
            "expired",
            Node::start_with(r, "expired", &seeds, &trusting, None),
            "expired",
        ),
    ];
    // A peer that shows no certificate at all.
    let bare = libp2p::identity::Keypair::generate_ed25519();
    let answer = common::show_cert(&bare, &seed, None).await;
    assert!(
        matches!(&answer, Answer::Refused { reason, .. } if reason == "no_certificate"),
        "{answer:?}"
    );
    assert!(refused(&seed, "no_certificate").await >= 1.0);
    for (name, node, reason) in &strangers {
        let counted = wait_until(LONG, || async { refused(&seed, reason).await >= 1.0 }).await;
        if !counted {
            dump(&[&seed, node]);
        }
        assert!(counted, "{name}: no refusal counted as {reason}");
    }
    for (name, node, _) in &strangers {
        let id = node.node_id().await;
        assert!(!id.is_empty(), "{name} does not answer");
        for m in members {
            let peers = m.peers().await.unwrap();
            assert_eq!(peers.len(), 3, "{name}: {} lists {peers:?}", m.name);
            assert!(peers.iter().all(|p| p.id != id), "{name} was listed");
        }
        assert!(isolated(node).await, "{name} got state or a connection");
        let s = node.status().await.unwrap();
        assert!(node.task(&task).await.is_none(), "{name} knows the task");
        if *name == "open" {
            assert_eq!(s.admission, "open");
        }
    }
    if std::env::var_os("OMESH_TEST_VERBOSE").is_some() {
        dump(&[&seed, &a, &strangers[0].1, &strangers[2].1]);
    }
    // The members still form one mesh.
    for m in members {
        let s = m.status().await.unwrap();
        assert_eq!((s.peers_known, s.peers_alive), (3, 3), "{}", m.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_peers_is_enforced_when_a_connection_is_established() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // An open mesh whose seed lets only `a` in.
    let dir = r.join("a").join("data");
    let key = omesh::datadir::DataDir::open(&dir)
        .unwrap()
        .identity()
        .unwrap();
    let a_peer = key.public().to_peer_id().to_string();
    let seed = Node::start_with(
        r,
        "seed",
        &[],
        &["--alone", "true", "--allowed-peer", &a_peer],
        None,
    );
    let seeds = vec![seed.addr()];
    let a = Node::start_with(r, "a", &seeds, &[], None);
    let c = Node::start_with(r, "c", &seeds, &[], None);
    let joined = wait_until(LONG, || async {
        a.status().await.is_some_and(|s| s.peers_alive == 2)
    })
    .await;
    if !joined {
        dump(&[&seed, &a]);
    }
    assert!(joined, "the allowed peer did not join");
    let counted = wait_until(LONG, || async {
        refused(&seed, "not_allowed_peer").await >= 1.0
    })
    .await;
    if !counted {
        dump(&[&seed, &c]);
    }
    assert!(counted, "no refusal counted");
    assert!(isolated(&c).await, "the peer outside allowed_peers got in");
    let c_id = c.node_id().await;
    let peers = seed.peers().await.unwrap();
    assert!(peers.iter().all(|p| p.id != c_id));
    let s = seed.status().await.unwrap();
    assert_eq!(s.admission, "open");
    assert_eq!(s.admission_keys, 0);
}

#[test]
fn a_node_with_admission_keys_and_no_valid_certificate_does_not_start() {
    let root = tempfile::tempdir().unwrap();
    let op_pub = operator().public_hex();
    let run = |dir: &Path| {
        let out = std::process::Command::new(common::bin())
            .args(["up", "--data-dir"])
            .arg(dir)
            .args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"])
            .args(["--api-listen", "127.0.0.1:0", "--admission-key", &op_pub])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let none = root.path().join("none");
    let err = run(&none);
    assert!(
        err.contains("admission_cert") && err.contains("omesh admit"),
        "{err}"
    );
    // A certificate for another node.
    let now = now_ms();
    preset_cert(root.path(), "other", |_| {
        AdmissionCert::sign(
            &operator().operator,
            NodeId([9; 32]),
            BTreeSet::new(),
            now,
            now + 60_000,
        )
    });
    let err = run(&root.path().join("other").join("data"));
    assert!(
        err.contains("admission_cert") && err.contains("not"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_peer_is_cut_off_everywhere_and_its_task_fails_over() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let nodes = common::mesh(root.path(), 3, |_| {
        let mut f = sub.flags();
        f.extend(["--fake-cpu-percent".into(), "10".into()]);
        f
    })
    .await;
    let spec = sub.spec(&["sh", "-c", "sleep 600"], |_| {});
    let id = sub.submit(&nodes[0], &spec).await;
    let owner = wait_until(LONG, || async {
        nodes[0]
            .task(&id)
            .await
            .is_some_and(|t| t.state == "running" && t.owner.is_some())
    })
    .await;
    assert!(owner, "the task did not start");
    let owner = nodes[0].task(&id).await.unwrap().owner.unwrap();
    let mut victim = None;
    for (i, n) in nodes.iter().enumerate() {
        if n.node_id().await == owner {
            victim = Some(i);
        }
    }
    let victim = victim.unwrap();
    let witness = (victim + 1) % 3;
    let others: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    let epoch = nodes[witness].task(&id).await.unwrap().epoch;

    // The operator revokes the owner, through another peer's API; a revocation signed by a
    // key that is not an admission key is refused first.
    let node: NodeId = owner.parse().unwrap();
    let forged = omesh_protocol::Revocation::sign(&sub.key, node);
    let post = |r: &omesh_protocol::Revocation| {
        let body = serde_json::json!({ "revocation": hex::encode(r.to_wire().unwrap()) });
        reqwest::Client::new()
            .post(format!("{}/api/v1/revocations", nodes[witness].api()))
            .bearer_auth(&sub.token)
            .json(&body)
            .send()
    };
    assert_eq!(post(&forged).await.unwrap().status().as_u16(), 403);
    let real = omesh_protocol::Revocation::sign(&operator().operator, node);
    assert_eq!(post(&real).await.unwrap().status().as_u16(), 200);

    // Every other peer drops it, refuses its connections, and runs the task at a higher epoch.
    let cut = wait_until(LONG, || async {
        for i in &others {
            let Some(s) = nodes[*i].status().await else {
                return false;
            };
            if s.peers_alive != 2 {
                return false;
            }
            match nodes[*i].task(&id).await {
                Some(t)
                    if t.state == "running"
                        && t.epoch > epoch
                        && t.owner != Some(owner.clone()) => {}
                _ => return false,
            }
        }
        true
    })
    .await;
    if !cut {
        dump(&nodes.iter().collect::<Vec<_>>());
    }
    assert!(
        cut,
        "the revoked owner was not cut off, or its task did not fail over"
    );
    let counted = wait_until(LONG, || async {
        let mut sum = 0.0;
        for i in &others {
            sum += refused(&nodes[*i], "revoked").await;
        }
        sum > 0.0
    })
    .await;
    assert!(counted, "no refusal of the revoked peer was counted");
}
