//! A hostile peer against real `omesh` processes. The hostile peer is built from the crate's
//! own swarm builder (`omesh::peer::net::build_swarm`), is admitted (a valid certificate from
//! the mesh's operator), joins a 3-peer mesh as a member with a record of its own, then forges what a compromised member can: statuses for epochs it
//! does not own (the running one and one a million on), a compaction with forged evidence, a
//! lease at u64::MAX, a flood of made-up task ids, probe acks with guessed nonces, a sync
//! reply with another node's record and a vector of 20,000 made-up origins, and in one last
//! gossip message a cancel it may not sign, another node's record and a bad signature.
//!
//! Nothing may change on the honest peers: task states, owners and epochs, node health and
//! digests stay as they were, and every attempt is counted by reason.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{dump, mesh, metric, wait_until, Node, Submitter};
use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic};
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use libp2p::Multiaddr;
use omesh::peer::net::{self, BehaviourEvent, STATE_TOPIC};
use omesh_protocol::{
    Capacity, Delta, DeltaBody, GossipMessage, Lease, NodeId, NodeRecord, Probe, Sig, SignedCancel,
    StatusEntry, SyncReply, TaskId, TaskState, Wire,
};
use tokio::sync::mpsc;

/// What the test tells the hostile peer to do.
enum Cmd {
    /// Publish on the state topic (retried until gossipsub has a mesh peer to send to).
    Publish(GossipMessage),
    /// Send a probe to a peer.
    Probe(libp2p::PeerId, Probe),
    /// Answer every sync request from now on with this.
    AnswerSyncWith(SyncReply),
}

struct Hostile {
    id: NodeId,
    key: ed25519_dalek::SigningKey,
    cmd: mpsc::UnboundedSender<Cmd>,
    /// Sync requests it answered (with the forged reply, once set).
    answered: Arc<std::sync::atomic::AtomicUsize>,
    stamp: u64,
}

impl Hostile {
    /// A member gone bad: admitted (it shows a valid certificate in a first contact with
    /// each of `nodes`, as `omesh up` does before it dials one), then it dials the first.
    async fn start(nodes: &[Node]) -> Self {
        let seed = nodes[0].addr();
        let key = libp2p::identity::Keypair::generate_ed25519();
        for n in nodes {
            common::first_contact(&key, n).await;
        }
        let node_key = net::node_key_of(&key).unwrap();
        let id = node_key.id();
        let signing = node_key.signing().clone();
        let mut swarm = net::build_swarm(key, net::GOSSIP_TRANSMIT_LIMIT, false).unwrap();
        swarm
            .listen_on("/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap())
            .unwrap();
        let topic = IdentTopic::new(STATE_TOPIC);
        swarm.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
        let seed: Multiaddr = seed.parse().unwrap();
        swarm.dial(seed.clone()).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
        let me = id;
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = answered.clone();
        tokio::spawn(async move {
            let mut pending: Vec<GossipMessage> = Vec::new();
            let mut reply: Option<SyncReply> = None;
            let mut retry = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        None => return,
                        Some(Cmd::Publish(m)) => pending.push(m),
                        Some(Cmd::Probe(to, p)) => {
                            swarm.behaviour_mut().probe.send_request(&to, net::ProbeFrame { bytes: p.to_wire().unwrap(), answer_inline: false });
                        }
                        Some(Cmd::AnswerSyncWith(r)) => reply = Some(r),
                    },
                    _ = retry.tick() => {
                        // In order, each once gossipsub takes it.
                        while let Some(m) = pending.first() {
                            let bytes = m.to_wire().unwrap();
                            match swarm.behaviour_mut().gossipsub.publish(topic.clone(), bytes) {
                                Ok(_) | Err(gossipsub::PublishError::Duplicate) => {
                                    pending.remove(0);
                                }
                                Err(_) => break,
                            }
                        }
                        if swarm.connected_peers().next().is_none() {
                            let _ = swarm.dial(seed.clone());
                        }
                    }
                    ev = swarm.select_next_some() => match ev {
                        SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::Message {
                            message: request_response::Message::Request { channel, .. }, ..
                        })) => {
                            let r = reply.clone().unwrap_or(SyncReply {
                                deltas: Vec::new(),
                                vclock: Vec::new(),
                                digest: Default::default(),
                                truncated: false,
                            });
                            if swarm.behaviour_mut().sync.send_response(channel, r.to_wire().unwrap()).is_ok() {
                                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                        }
                        SwarmEvent::Behaviour(BehaviourEvent::Probe(request_response::Event::Message {
                            peer,
                            message: request_response::Message::Request { request, channel, .. }, ..
                        })) => {
                            // Answer pings as a member does, so it stays alive (and is synced
                            // with) rather than suspected: in the response, as version 2 does.
                            let mut answer = Vec::new();
                            if let Ok(Probe::Ping { nonce }) = Probe::from_wire(&request.bytes) {
                                answer = Probe::Ack { nonce, about: me, grant: true }.to_wire().unwrap();
                            }
                            let _ = (peer, swarm.behaviour_mut().probe.send_response(channel, answer));
                        }
                        SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                            propagation_source, message_id, ..
                        })) => {
                            let _ = swarm.behaviour_mut().gossipsub.report_message_validation_result(
                                &message_id, &propagation_source, gossipsub::MessageAcceptance::Accept);
                        }
                        _ => {}
                    },
                }
            }
        });
        Self {
            id,
            key: signing,
            cmd: tx,
            answered,
            stamp: 1 << 32,
        }
    }

    fn sign(&mut self, body: DeltaBody) -> Delta {
        self.stamp += 1;
        Delta::signed(&self.key, self.stamp, body)
    }

    fn publish(&self, deltas: Vec<Delta>) {
        let _ = self.cmd.send(Cmd::Publish(GossipMessage { deltas }));
    }
}

fn task_id(hex: &str) -> TaskId {
    hex.parse().unwrap()
}

fn peer_of(node_hex: &str) -> libp2p::PeerId {
    net::peer_id_of(&node_hex.parse::<NodeId>().unwrap()).unwrap()
}

/// Every honest peer's view of each task: (state, epoch, owner).
async fn views(
    nodes: &[Node],
    ids: &[String],
) -> BTreeMap<(usize, String), (String, u64, Option<String>)> {
    let mut out = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for id in ids {
            // A task just submitted may not have reached every peer yet.
            let v = n.task(id).await.map_or_else(
                || ("unknown".to_owned(), 0, None),
                |t| (t.state, t.epoch, t.owner),
            );
            out.insert((i, id.clone()), v);
        }
    }
    out
}

async fn rejected(nodes: &[Node], reason: &str) -> f64 {
    let mut sum = 0.0;
    for n in nodes {
        let text = n.text("/metrics").await.unwrap_or_default();
        sum += metric(
            &text,
            "omesh_deltas_rejected_total",
            Some(&format!("reason=\"{reason}\"")),
        );
    }
    sum
}

async fn counter(nodes: &[Node], name: &str) -> f64 {
    let mut sum = 0.0;
    for n in nodes {
        sum += metric(&n.text("/metrics").await.unwrap_or_default(), name, None);
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_member_changes_nothing_and_every_attempt_is_counted() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let nodes = mesh(root.path(), 3, |_| {
        let mut f = sub.flags();
        f.extend(["--fake-cpu-percent".into(), "10".into()]);
        f
    })
    .await;
    let mut ids = Vec::new();
    for k in 0..3 {
        let spec = sub.spec(&["sh", "-c", "sleep 600"], |s| s.nonce = 900 + k);
        ids.push(sub.submit(&nodes[k as usize], &spec).await);
    }
    let all_running = wait_until(Duration::from_secs(60), || async {
        views(&nodes, &ids).await.values().all(|v| v.0 == "running")
    })
    .await;
    assert!(all_running, "tasks did not start");
    let before = views(&nodes, &ids).await;

    // The hostile peer joins as a member: its own record, signed by its own key.
    let mut h = Hostile::start(&nodes).await;
    let now = omesh::peer::Clock::new().now();
    let mut rec = NodeRecord::new(
        h.id,
        1,
        Capacity {
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
        },
    );
    rec.cert = Some(omesh_protocol::AdmissionCert::sign(
        &common::operator().operator,
        h.id,
        Default::default(),
        now,
        now + 3_600_000,
    ));
    let d = h.sign(DeltaBody::Node(Arc::new(rec)));
    h.publish(vec![d]);
    let known = wait_until(Duration::from_secs(30), || async {
        for n in &nodes {
            match n.status().await {
                Some(s) if s.peers_known == 4 => {}
                _ => return false,
            }
        }
        true
    })
    .await;
    if !known {
        dump(&nodes.iter().collect::<Vec<_>>());
    }
    assert!(known, "the hostile peer's record did not spread");

    let (t0, t1, t2) = (task_id(&ids[0]), task_id(&ids[1]), task_id(&ids[2]));
    let epoch0 = before[&(0, ids[0].clone())].1;
    let succeeded = |h: &mut Hostile, task, epoch| {
        h.sign(DeltaBody::Status {
            task,
            epoch,
            entry: StatusEntry::new(TaskState::Succeeded, Some(0), "", 1, h.id),
        })
    };
    // Writes that could be early (held back, not held against the sender).
    let mut early = vec![
        succeeded(&mut h, t0, epoch0),
        succeeded(&mut h, t1, 1_000_000),
    ];
    let end = succeeded(&mut h, t0, epoch0);
    early.push(h.sign(DeltaBody::Compact {
        task: t0,
        outcome: TaskState::Succeeded,
        end: Some(Box::new(end)),
    }));
    early.push(h.sign(DeltaBody::Lease {
        task: t1,
        lease: Lease {
            epoch: u64::MAX,
            owner: h.id,
            incarnation: 1,
            score: u32::MAX,
            ttl_ms: 1_000,
            released: false,
        },
    }));
    h.publish(early);
    // A flood of made-up task ids.
    for chunk in 0..20u64 {
        let flood = (0..100u64)
            .map(|i| {
                let mut t = [0u8; 32];
                t[..8].copy_from_slice(&(chunk * 100 + i).to_le_bytes());
                h.sign(DeltaBody::Lease {
                    task: TaskId(t),
                    lease: Lease {
                        epoch: 1,
                        owner: h.id,
                        incarnation: 1,
                        score: 1,
                        ttl_ms: 1_000,
                        released: false,
                    },
                })
            })
            .collect();
        h.publish(flood);
    }
    // Probe acks with guessed nonces, about each honest peer, to each honest peer.
    for n in &nodes {
        let to = peer_of(&n.node_id().await);
        for m in &nodes {
            let about: NodeId = m.node_id().await.parse().unwrap();
            for nonce in 0..20 {
                let _ = h.cmd.send(Cmd::Probe(
                    to,
                    Probe::Ack {
                        nonce,
                        about,
                        grant: true,
                    },
                ));
            }
        }
    }
    // A sync reply with each honest peer's record (leaving) under that peer's name but the
    // hostile key's signature (a peer takes its own as an echo and ignores it, so every peer
    // that asks gets another's), and a vector of 20,000 made-up origins.
    let victim: NodeId = nodes[1].node_id().await.parse().unwrap();
    let mut forged_recs = Vec::new();
    for n in &nodes {
        let id: NodeId = n.node_id().await.parse().unwrap();
        let mut leaving = NodeRecord::new(id, 99, Capacity::default());
        leaving.leaving = true;
        // With the peer's own (valid) certificate, so that only the signature gives it away.
        leaving.cert = Some(omesh_protocol::AdmissionCert::sign(
            &common::operator().operator,
            id,
            Default::default(),
            now,
            now + 3_600_000,
        ));
        let mut forged = Delta::signed(&h.key, 99 << 32 | 1, DeltaBody::Node(Arc::new(leaving)));
        forged.origin = id;
        forged_recs.push(forged);
    }
    let mut vclock: Vec<(NodeId, u64)> = (0..20_000u32)
        .map(|i| {
            let mut b = [0xEEu8; 32];
            b[..4].copy_from_slice(&i.to_be_bytes());
            (NodeId(b), u64::MAX)
        })
        .collect();
    vclock.sort();
    let _ = h.cmd.send(Cmd::AnswerSyncWith(SyncReply {
        deltas: forged_recs,
        vclock,
        digest: Default::default(),
        truncated: false,
    }));
    // Counted by every peer the hostile one reaches directly (it may not reach all: an honest
    // peer does not relay what it refused, early or forged). Each such peer counts all of it.
    let counted = wait_until(Duration::from_secs(60), || async {
        rejected(&nodes, "status_not_epoch_owner").await >= 2.0
            && rejected(&nodes, "compact_not_ended").await >= 1.0
            && rejected(&nodes, "epoch_jump").await >= 1.0
            && rejected(&nodes, "unknown_task").await >= 2000.0
            && counter(&nodes, "omesh_probe_acks_refused_total").await >= 3.0 * 20.0
            && counter(&nodes, "omesh_vector_entries_refused_total").await >= 20_000.0
            && rejected(&nodes, "bad_signature").await >= 1.0
    })
    .await;
    if !counted {
        dump(&nodes.iter().collect::<Vec<_>>());
        for n in &nodes {
            let text = n.text("/metrics").await.unwrap_or_default();
            for l in text
                .lines()
                .filter(|l| l.contains("refused") || l.contains("rejected"))
            {
                eprintln!("{l}");
            }
        }
    }
    assert!(counted, "not every forgery was counted");
    assert!(h.answered.load(std::sync::atomic::Ordering::SeqCst) > 0);

    // Last, in one message: a cancel it may not sign, another node's record in its own name,
    // and a delta with a bad signature. The peers cut it off.
    let own_cancel = SignedCancel::sign(&h.key, t2);
    let mut honest_rec = NodeRecord::new(victim, 99, Capacity::default());
    honest_rec.leaving = true;
    let mut bad_sig = h.sign(DeltaBody::Cancel(own_cancel));
    bad_sig.sig = Sig([1; 64]);
    let forged = vec![
        h.sign(DeltaBody::Cancel(own_cancel)),
        h.sign(DeltaBody::Node(Arc::new(honest_rec))),
        bad_sig,
    ];
    h.publish(forged);
    let counted = wait_until(Duration::from_secs(30), || async {
        rejected(&nodes, "cancel_not_authorized").await >= 1.0
            && rejected(&nodes, "node_not_own").await >= 1.0
    })
    .await;
    assert!(counted, "the last forgeries were not counted");

    // Nothing changed: every task as it was everywhere, every honest peer alive everywhere,
    // the honest digests equal.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(views(&nodes, &ids).await, before);
    let agreed = wait_until(Duration::from_secs(30), || async {
        let mut digests = Vec::new();
        for n in &nodes {
            let Some(s) = n.status().await else {
                return false;
            };
            if s.peers_alive < 3 {
                return false;
            }
            digests.push(s.digest);
        }
        digests.windows(2).all(|w| w[0] == w[1])
    })
    .await;
    assert!(agreed, "honest peers disagree or lost one another");
    for n in &nodes {
        for p in n.peers().await.unwrap() {
            if p.id != h.id.to_hex() {
                assert_eq!(p.health, "alive", "{p:?}");
            }
        }
    }
    assert_eq!(views(&nodes, &ids).await, before);
}
