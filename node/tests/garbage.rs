//! A hostile peer publishes garbage, truncated and oversized messages on the gossip topic and
//! the sync protocol: the node keeps working, counts them, and its state is unchanged.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{metric, wait_until, Node};
use futures::StreamExt;
use libp2p::gossipsub::IdentTopic;
use libp2p::identity::Keypair;
use omesh::peer::net;
use omesh_protocol::delta::MAX_GOSSIP_BYTES;
use omesh_protocol::{Capacity, DeltaBody, GossipMessage, NodeId, NodeRecord, SyncRequest, Wire};

fn gossip_payloads() -> Vec<(&'static str, Vec<u8>)> {
    let rec = NodeRecord::new(NodeId([3; 32]), 1, Capacity::default());
    let valid = GossipMessage {
        deltas: vec![omesh_harness::fixtures::sign(
            NodeId([3; 32]),
            1,
            DeltaBody::Node(std::sync::Arc::new(rec)),
        )],
    }
    .to_wire()
    .unwrap();
    let mut oversized = vec![1u8];
    oversized.resize(MAX_GOSSIP_BYTES + 4096, 0xAB);
    vec![
        ("garbage", b"\xde\xad\xbe\xef not postcard at all".to_vec()),
        ("truncated", valid[..valid.len() / 2].to_vec()),
        ("wrong version", {
            let mut v = valid.clone();
            v[0] = 42;
            v
        }),
        ("oversized", oversized),
        // Well formed, but carrying a delta of a node other than the signer.
        ("forged origin", valid),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_gossip_and_sync_is_counted_and_dropped() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(root.path(), "target", &[], &["--alone", "true"]);
    // Ready, and its own record carries its address (the last durable change it makes alone).
    assert!(
        wait_until(Duration::from_secs(30), || async {
            node.status().await.is_some_and(|s| s.ready)
                && node
                    .peers()
                    .await
                    .is_some_and(|p| p.iter().any(|p| p.is_self && !p.addresses.is_empty()))
        })
        .await
    );
    let before = node.status().await.unwrap();

    let key = Keypair::generate_ed25519();
    // An admitted peer gone bad: it shows a valid certificate first.
    common::first_contact(&key, &node).await;
    let mut swarm = net::build_swarm(key, 4 * MAX_GOSSIP_BYTES, false).unwrap();
    let topic = IdentTopic::new(net::STATE_TOPIC);
    swarm.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
    let target_peer: libp2p::PeerId = before.peer_id.parse().unwrap();
    swarm
        .dial(node.addr().parse::<libp2p::Multiaddr>().unwrap())
        .unwrap();

    // Drive the hostile swarm until every payload was published and both sync frames sent.
    let payloads = gossip_payloads();
    let truncated_sync = {
        let req = SyncRequest {
            vclock: vec![(NodeId([1; 32]), 5)],
            digest: Default::default(),
            full: false,
            digest_only: false,
            vclock_hash: 0,
        }
        .to_wire()
        .unwrap();
        req[..req.len() - 3].to_vec()
    };
    let mut published = 0usize;
    let mut synced = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while published < payloads.len() || !synced {
        assert!(
            tokio::time::Instant::now() < deadline,
            "hostile peer could not deliver its payloads"
        );
        tokio::select! {
            _ = swarm.select_next_some() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if swarm.is_connected(&target_peer) {
                    while published < payloads.len() {
                        let (_, bytes) = &payloads[published];
                        match swarm.behaviour_mut().gossipsub.publish(topic.clone(), bytes.clone()) {
                            Ok(_) => published += 1,
                            Err(_) => break, // not subscribed yet on the other side; retry
                        }
                    }
                    if !synced {
                        swarm.behaviour_mut().sync.send_request(&target_peer, b"\x01garbage".to_vec());
                        swarm.behaviour_mut().sync.send_request(&target_peer, truncated_sync.clone());
                        synced = true;
                    }
                }
            }
        }
    }
    // Keep the connection serviced while the node counts.
    let counted = {
        let node = &node;
        let pump = async {
            loop {
                swarm.select_next_some().await;
            }
        };
        let check = wait_until(Duration::from_secs(30), || async {
            let Some(m) = node.text("/metrics").await else {
                return false;
            };
            metric(
                &m,
                "omesh_messages_malformed_total",
                Some("channel=\"gossip\""),
            ) >= 4.0
                && metric(
                    &m,
                    "omesh_messages_malformed_total",
                    Some("channel=\"sync_request\""),
                ) >= 2.0
                && metric(
                    &m,
                    "omesh_messages_malformed_total",
                    Some("channel=\"gossip_forged_origin\""),
                ) >= 1.0
        });
        tokio::select! {
            ok = check => ok,
            () = pump => false,
        }
    };
    let m = node.text("/metrics").await.unwrap_or_default();
    assert!(
        counted,
        "malformed messages not counted:\n{}",
        m.lines()
            .filter(|l| l.contains("malformed"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Still serving, same state.
    let after = node.status().await.expect("node stopped answering");
    assert!(after.ready);
    // The digest covers each record's version, so the node's own republications (a load
    // move) move it: compare what garbage could have added instead, nodes and tasks.
    assert_eq!(
        after.peers_known, before.peers_known,
        "garbage added a node"
    );
    assert!(
        node.peers()
            .await
            .is_some_and(|p| p.len() == 1 && p.iter().all(|p| p.is_self)),
        "garbage added a node"
    );
    assert_eq!(after.tasks, 0);
    assert_eq!(
        node.text("/health")
            .await
            .as_deref()
            .map(|s| s.contains("ok")),
        Some(true)
    );
}
