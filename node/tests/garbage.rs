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

    let target_peer: libp2p::PeerId = before.peer_id.parse().unwrap();
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
    // Each payload from an admitted peer gone bad of its own: the first invalid message
    // graylists its sender in gossipsub (peer scoring), so a second from the same peer would
    // never reach the decoder. The first one also sends the two bad sync requests, and then
    // a second garbage message, which must not be counted.
    let mut handles = Vec::new();
    for (k, (_, bytes)) in gossip_payloads().into_iter().enumerate() {
        let key = Keypair::generate_ed25519();
        common::first_contact(&key, &node).await;
        let addr: libp2p::Multiaddr = node.addr().parse().unwrap();
        let sync = (k == 0).then(|| truncated_sync.clone());
        handles.push(tokio::spawn(async move {
            let mut swarm = net::build_swarm(key, 4 * MAX_GOSSIP_BYTES, false).unwrap();
            let topic = IdentTopic::new(net::STATE_TOPIC);
            swarm.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
            swarm.dial(addr).unwrap();
            let mut queue = vec![bytes];
            if k == 0 {
                queue.push(b"\xde\xad\xbe\xef more garbage, from a graylisted peer".to_vec());
            }
            let mut sync = sync;
            let mut sent = 0usize;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                tokio::select! {
                    _ = swarm.select_next_some() => {}
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        if !swarm.is_connected(&target_peer) {
                            continue;
                        }
                        if sent < queue.len() {
                            // The second of peer 0's messages goes once the first was taken.
                            if sent == 1 && tokio::time::Instant::now() < deadline - Duration::from_secs(27) {
                                continue;
                            }
                            if swarm.behaviour_mut().gossipsub.publish(topic.clone(), queue[sent].clone()).is_ok() {
                                sent += 1;
                            }
                        }
                        if let Some(req) = sync.take() {
                            swarm.behaviour_mut().sync.send_request(&target_peer, b"\x01garbage".to_vec());
                            swarm.behaviour_mut().sync.send_request(&target_peer, req);
                        }
                    }
                }
            }
        }));
    }
    let gossip = |m: &str| {
        metric(
            m,
            "omesh_messages_malformed_total",
            Some("channel=\"gossip\""),
        )
    };
    let counted = wait_until(Duration::from_secs(40), || async {
        let Some(m) = node.text("/metrics").await else {
            return false;
        };
        gossip(&m) >= 4.0
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
    })
    .await;
    // Peer 0's second garbage message went out 3 s after its first; give it time to arrive,
    // then it must not have been counted: gossipsub dropped it unseen.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let graylisted = gossip(&node.text("/metrics").await.unwrap_or_default()) == 4.0;
    for h in handles {
        h.abort();
    }
    let m = node.text("/metrics").await.unwrap_or_default();
    assert!(
        counted,
        "malformed messages not counted:\n{}",
        m.lines()
            .filter(|l| l.contains("malformed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        graylisted,
        "a second garbage message from a graylisted peer was counted"
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

/// What a probe client speaking only `protocol` got back for a ping with `nonce`: the answer
/// in the response (empty if none), and the probes the node sent it as requests of their own
/// within a few seconds.
async fn ping_as(
    node: &Node,
    protocol: libp2p::StreamProtocol,
    nonce: u64,
    garbage: bool,
) -> (Vec<u8>, Vec<omesh_protocol::Probe>) {
    use libp2p::request_response::{self, ProtocolSupport};
    use libp2p::swarm::SwarmEvent;
    let key = Keypair::generate_ed25519();
    common::first_contact(&key, node).await;
    let target: libp2p::PeerId = node.status().await.unwrap().peer_id.parse().unwrap();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                net::ProbeCodec,
                [(protocol, ProtocolSupport::Full)],
                request_response::Config::default(),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build();
    swarm
        .dial(node.addr().parse::<libp2p::Multiaddr>().unwrap())
        .unwrap();
    let mut response = None;
    let mut requests = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut quiet_until = None;
    loop {
        let until = quiet_until.unwrap_or(deadline).min(deadline);
        let Ok(ev) = tokio::time::timeout_at(until, swarm.select_next_some()).await else {
            break;
        };
        match ev {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == target => {
                let bytes = if garbage {
                    b"\x01not a probe".to_vec()
                } else {
                    omesh_protocol::Probe::Ping { nonce }.to_wire().unwrap()
                };
                let frame = net::ProbeFrame {
                    bytes,
                    answer_inline: false,
                };
                swarm.behaviour_mut().send_request(&target, frame);
            }
            SwarmEvent::Behaviour(request_response::Event::Message { message, .. }) => {
                match message {
                    request_response::Message::Response { response: r, .. } => {
                        response = Some(r);
                        // Whatever else the node says comes within a moment.
                        quiet_until = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                    }
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let _ = swarm.behaviour_mut().send_response(channel, Vec::new());
                        if let Ok(p) = omesh_protocol::Probe::from_wire(&request.bytes) {
                            requests.push(p);
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                panic!("probe not delivered: {error}");
            }
            _ => {}
        }
    }
    (response.expect("no response to the probe"), requests)
}

/// Probe version 2 answers a ping in its response (one stream per probe); a peer that speaks
/// only version 1 (a mesh mid upgrade) still gets an empty response and the ack as a request
/// of its own; a garbage probe is counted and answered with nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_answered_in_the_response_and_v1_peers_the_old_way() {
    use omesh_protocol::Probe;
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(root.path(), "target", &[], &["--alone", "true"]);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            node.status().await.is_some_and(|s| s.ready)
        })
        .await
    );
    let peer: libp2p::PeerId = node.status().await.unwrap().peer_id.parse().unwrap();
    let about = net::node_id_of(&peer).unwrap();

    let (inline, requests) = ping_as(&node, net::PROBE_PROTOCOL, 41, false).await;
    let inline = Probe::from_wire(&inline).expect("version 2: the ack is in the response");
    assert!(
        matches!(inline, Probe::Ack { nonce: 41, about: a, .. } if a == about),
        "{inline:?}"
    );
    assert!(
        !requests.iter().any(|p| matches!(p, Probe::Ack { .. })),
        "version 2 got its ack twice: {requests:?}"
    );

    let (inline, requests) = ping_as(&node, net::PROBE_PROTOCOL_V1, 42, false).await;
    assert!(
        inline.is_empty(),
        "version 1 reads no answer in the response"
    );
    assert!(
        requests
            .iter()
            .any(|p| matches!(p, Probe::Ack { nonce: 42, about: a, .. } if *a == about)),
        "version 1 got no ack: {requests:?}"
    );

    let (inline, _) = ping_as(&node, net::PROBE_PROTOCOL, 43, true).await;
    assert!(inline.is_empty(), "garbage was answered");
    let counted = wait_until(Duration::from_secs(10), || async {
        node.text("/metrics").await.is_some_and(|m| {
            metric(
                &m,
                "omesh_messages_malformed_total",
                Some("channel=\"probe\""),
            ) >= 1.0
        })
    })
    .await;
    assert!(counted, "a garbage probe was not counted");
    assert!(node.status().await.is_some_and(|s| s.ready));
}
