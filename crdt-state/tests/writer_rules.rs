//! The writer rules, through the harness with loss, duplication and reordering on: an
//! admitted node that turned hostile (node 4, whose key signs everything below) forges what
//! it can; the honest replicas refuse each forgery, count it by reason, and keep their task
//! states, owners and epochs, converging as before.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use omesh_harness as harness;

use harness::{node, owner_of, spec, Mesh};
use omesh_protocol::{
    Delta, DeltaBody, Epoch, GossipMessage, Lease, NodeId, NodeRecord, Probe, SignedCancel,
    StatusEntry, SyncReply, TaskId, TaskState,
};
use omesh_state::{Input, TaskView};

const HOSTILE: u8 = 4;

/// A joined 4-node mesh running one task on an honest node, with faults on.
fn mesh_with_task(seed: u64) -> (Mesh, TaskId, NodeId, Epoch) {
    let mut m = harness::joined(4, |c| {
        // The hostile node runs nothing itself.
        if c.node_id == node(HOSTILE) {
            c.tags.clear();
        }
    });
    m.seed(seed);
    m.drop_permille = 50;
    m.dup_permille = 100;
    m.jitter_ms = 20;
    let task = m.submit(node(1), spec(7_000 + seed));
    assert!(m.run_until(20_000, |m| owner_of(m, task).is_some()));
    assert!(m.run_until(20_000, |m| views(m, task)
        .values()
        .all(|v| v.0 == TaskState::Running)));
    let (owner, epoch) = owner_of(&m, task).unwrap();
    assert_ne!(owner, node(HOSTILE));
    (m, task, owner, epoch)
}

fn honest() -> [NodeId; 3] {
    [node(1), node(2), node(3)]
}

/// What every honest replica says of the task: state, owner, epoch.
fn views(m: &Mesh, task: TaskId) -> BTreeMap<NodeId, (TaskState, Option<NodeId>, Epoch)> {
    honest()
        .into_iter()
        .map(|id| {
            let v: Option<TaskView> = m.replica(id).task_view(m.now, &task);
            (
                id,
                v.map_or((TaskState::Pending, None, 0), |v| {
                    (v.state, v.owner, v.epoch)
                }),
            )
        })
        .collect()
}

/// A stamp of the hostile node's above any it used.
fn next_stamp(m: &Mesh) -> u64 {
    m.replica(node(1)).version_of(&node(HOSTILE)) + 1_000
}

/// Gossips `deltas` straight into every honest replica, as if relayed by the hostile node.
fn forge(m: &mut Mesh, deltas: Vec<Delta>) {
    for id in honest() {
        let _ = m.input(
            id,
            Input::Gossip {
                via: node(HOSTILE),
                msg: GossipMessage {
                    deltas: deltas.clone(),
                },
            },
        );
    }
}

fn rejected(m: &Mesh, reason: &str) -> u64 {
    honest()
        .iter()
        .map(|id| m.replica(*id).stats().rejections.get(reason))
        .sum()
}

/// After the forgery: the task runs on, as before, on one honest node; the mesh converges;
/// each honest replica counted the attempt under `reason`.
fn unchanged(mut m: Mesh, task: TaskId, owner: NodeId, epoch: Epoch, reason: &str) {
    let before = views(&m, task);
    m.run_until(5_000, |_| false);
    m.drop_permille = 0;
    m.dup_permille = 0;
    let ok = m.run_until(30_000, |m| m.converged());
    if !ok {
        for id in m.ids() {
            let r = m.replica(id);
            eprintln!(
                "{} {} nodes={} tasks={} tombs={} early={} {:?}",
                id.short(),
                r.digest(),
                r.state().node_count(),
                r.state().task_count(),
                r.state().tombstone_count(),
                r.early_held(),
                r.state()
                    .nodes()
                    .map(|n| (n.id.short(), n.version()))
                    .collect::<Vec<_>>()
            );
        }
    }
    assert!(ok, "no convergence");
    assert_eq!(views(&m, task), before);
    assert_eq!(owner_of(&m, task), Some((owner, epoch)));
    assert_eq!(before[&node(1)], (TaskState::Running, Some(owner), epoch));
    assert!(
        rejected(&m, reason) >= 3,
        "{reason}: {}",
        rejected(&m, reason)
    );
}

#[test]
fn a_status_for_an_epoch_it_does_not_own_is_refused() {
    for seed in 0..3 {
        let (mut m, task, owner, epoch) = mesh_with_task(seed);
        let stamp = next_stamp(&m);
        let done = |e| {
            harness::fixtures::signed(
                HOSTILE,
                stamp + e,
                DeltaBody::Status {
                    task,
                    epoch: e,
                    entry: StatusEntry::new(TaskState::Succeeded, Some(0), "", 1, node(HOSTILE)),
                },
            )
        };
        // The running epoch, and one a million epochs on.
        forge(&mut m, vec![done(epoch), done(1_000_000)]);
        unchanged(m, task, owner, epoch, "status_not_epoch_owner");
    }
}

#[test]
fn a_cancel_without_a_submitters_signature_is_refused() {
    let (mut m, task, owner, epoch) = mesh_with_task(11);
    let stamp = next_stamp(&m);
    // Signed by the hostile node's own key (not an authorized submitter), and a real
    // submitter's key with a signature that is not its.
    let own = SignedCancel::sign(harness::fixtures::key(HOSTILE).signing(), task);
    let mut stolen = harness::fixtures::cancel(task);
    stolen.sig = own.sig;
    forge(
        &mut m,
        vec![
            harness::fixtures::signed(HOSTILE, stamp, DeltaBody::Cancel(own)),
            harness::fixtures::signed(HOSTILE, stamp + 1, DeltaBody::Cancel(stolen)),
        ],
    );
    unchanged(m, task, owner, epoch, "cancel_not_authorized");
}

#[test]
fn a_compaction_of_a_running_task_is_refused() {
    let (mut m, task, owner, epoch) = mesh_with_task(12);
    let stamp = next_stamp(&m);
    // Bare, and with a forged "final status" of its own as evidence.
    let forged_end = harness::fixtures::signed(
        HOSTILE,
        stamp,
        DeltaBody::Status {
            task,
            epoch,
            entry: StatusEntry::new(TaskState::Succeeded, Some(0), "", 1, node(HOSTILE)),
        },
    );
    let compact = |s, end: Option<Delta>| {
        harness::fixtures::signed(
            HOSTILE,
            s,
            DeltaBody::Compact {
                task,
                outcome: TaskState::Succeeded,
                end: end.map(Box::new),
            },
        )
    };
    forge(
        &mut m,
        vec![
            compact(stamp + 1, None),
            compact(stamp + 2, Some(forged_end)),
        ],
    );
    unchanged(m, task, owner, epoch, "compact_not_ended");
}

#[test]
fn another_nodes_record_and_a_bad_signature_are_refused() {
    let (mut m, task, owner, epoch) = mesh_with_task(13);
    let stamp = next_stamp(&m);
    // The owner's record, "leaving", in the hostile node's name: would void its lease.
    let mut rec: NodeRecord = m.replica(node(1)).state().node(&owner).unwrap().clone();
    rec.seq += 100;
    rec.leaving = true;
    let in_own_name =
        harness::fixtures::signed(HOSTILE, stamp, DeltaBody::Node(Arc::new(rec.clone())));
    // The same record under the owner's origin, signed with the hostile key.
    let mut impostor = in_own_name.clone();
    impostor.origin = owner;
    impostor.stamp = m.replica(node(1)).version_of(&owner) + 1;
    forge(&mut m, vec![in_own_name]);
    forge(&mut m, vec![impostor]);
    // (The owner itself takes a delta in its own name as an echo of its own, and ignores it.)
    assert!(rejected(&m, "bad_signature") >= 2);
    unchanged(m, task, owner, epoch, "node_not_own");
}

#[test]
fn a_flood_of_unknown_task_ids_is_bounded_and_leaves_tasks_alone() {
    let (mut m, task, owner, epoch) = mesh_with_task(14);
    let stamp = next_stamp(&m);
    let flood: Vec<Delta> = (0..6_000u64)
        .map(|i| {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&i.to_le_bytes());
            let lease = Lease {
                epoch: 1,
                owner: node(HOSTILE),
                incarnation: 1,
                score: 1,
                ttl_ms: 1_000,
                released: false,
            };
            harness::fixtures::signed(
                HOSTILE,
                stamp + i,
                DeltaBody::Lease {
                    task: TaskId(id),
                    lease,
                },
            )
        })
        .collect();
    for chunk in flood.chunks(64) {
        forge(&mut m, chunk.to_vec());
    }
    for id in honest() {
        let r = m.replica(id);
        assert!(r.early_held() <= 4096, "{}", r.early_held());
        assert!(r.stats().early_dropped > 0);
        assert_eq!(
            r.state().task_count(),
            1,
            "records were made for made-up tasks"
        );
    }
    unchanged(m, task, owner, epoch, "unknown_task");
}

#[test]
fn a_sync_reply_with_made_up_origins_does_not_grow_the_vector() {
    let (mut m, task, owner, epoch) = mesh_with_task(15);
    let made_up: Vec<(NodeId, u64)> = (0..20_000u32)
        .map(|i| {
            let mut b = [0xEEu8; 32];
            b[..4].copy_from_slice(&i.to_be_bytes());
            (NodeId(b), u64::MAX)
        })
        .collect();
    let honest_len = m.replica(node(1)).version_vector().len();
    let mut vclock = made_up;
    // And an inflated stamp of a real node.
    vclock.push((owner, u64::MAX));
    vclock.sort();
    let reply = SyncReply {
        deltas: Vec::new(),
        vclock,
        digest: m.replica(node(1)).digest(),
        truncated: false,
    };
    let _ = m.input(
        node(1),
        Input::SyncReply {
            from: node(HOSTILE),
            reply,
        },
    );
    let r = m.replica(node(1));
    assert!(r.version_vector().len() <= honest_len + 1);
    assert!(
        r.version_of(&owner) >> 32 <= 1,
        "{:x}",
        r.version_of(&owner)
    );
    assert!(r.stats().vector_entries_refused >= 20_001);
    m.run_until(5_000, |_| false);
    m.drop_permille = 0;
    m.dup_permille = 0;
    assert!(m.run_until(30_000, |m| m.converged()));
    assert_eq!(owner_of(&m, task), Some((owner, epoch)));
}

#[test]
fn a_probe_ack_from_neither_target_nor_helper_is_refused() {
    let (mut m, ..) = mesh_with_task(16);
    // Acks for every node with guessed nonces, from the hostile node.
    for about in honest() {
        for nonce in 0..64u64 {
            for to in honest() {
                let _ = m.input(
                    to,
                    Input::Probe {
                        from: node(HOSTILE),
                        probe: Probe::Ack {
                            nonce,
                            about,
                            grant: true,
                        },
                    },
                );
            }
        }
    }
    let refused: u64 = honest()
        .iter()
        .map(|id| m.replica(*id).stats().probe_acks_refused)
        .sum();
    assert_eq!(refused, 3 * 3 * 64);
}

#[test]
fn with_admission_keys_only_certified_nodes_are_heard() {
    use omesh_protocol::AdmissionCert;
    let operator = ed25519_dalek::SigningKey::from_bytes(&[99u8; 32]);
    let keys = std::iter::once(operator.verifying_key().to_bytes()).collect();
    let cert = |i: u8| AdmissionCert::sign(&operator, node(i), Default::default(), 0, u64::MAX);
    let mut m = Mesh::new(3, |c| {
        c.admission_keys.clone_from(&keys);
        c.cert = Some(cert(c.node_id.0[0]));
    });
    assert!(m.run_until(10_000, |m| m.converged()
        && m.replica(node(1)).state().node_count() == 3));
    // A node with no certificate, and one with a certificate for another node.
    for (i, cert) in [(8u8, None), (9u8, Some(cert(1)))] {
        let mut rec = NodeRecord::new(node(i), 1, Default::default());
        rec.cert = cert;
        let d = harness::fixtures::signed(i, 1 << 32 | 1, DeltaBody::Node(Arc::new(rec)));
        let status = harness::fixtures::signed(
            i,
            1 << 32 | 2,
            DeltaBody::Suspect {
                node: node(2),
                version: (1, 1),
            },
        );
        let _ = m.input(
            node(1),
            Input::Gossip {
                via: node(2),
                msg: GossipMessage {
                    deltas: vec![d, status],
                },
            },
        );
    }
    let r = m.replica(node(1));
    assert_eq!(r.state().node_count(), 3);
    assert!(r.state().node(&node(8)).is_none() && r.state().node(&node(9)).is_none());
    // Their records are refused for good (the certificate does not admit them); their other
    // writes are held back until a record that does comes, which it never will.
    assert!(r.stats().rejections.get("bad_certificate") >= 2);
    assert!(r.stats().rejections.get("not_admitted") >= 2);
    assert!(r.is_admitted(&node(2)) && !r.is_admitted(&node(8)));
    assert!(r.state().suspicion(&node(2)).is_none());
}

#[test]
fn a_restarted_node_is_admitted_by_its_own_certificate_and_takes_back_its_earlier_writes() {
    use omesh_protocol::AdmissionCert;
    let operator = ed25519_dalek::SigningKey::from_bytes(&[99u8; 32]);
    let keys = std::iter::once(operator.verifying_key().to_bytes()).collect();
    let mut m = Mesh::new(3, |c| {
        c.admission_keys.clone_from(&keys);
        c.cert = Some(AdmissionCert::sign(
            &operator,
            c.node_id,
            Default::default(),
            0,
            u64::MAX,
        ));
    });
    assert!(m.run_until(10_000, |m| m.converged()
        && m.replica(node(1)).state().node_count() == 3));
    m.crash(node(1));
    m.restart(node(1), 2, |_| {});
    assert!(m.replica(node(1)).is_admitted(&node(1)));
    // A write of its earlier incarnation comes back before any record of it (the others
    // hold its newer record, which it takes for its own echo).
    let old = harness::fixtures::signed(
        1,
        1 << 32 | 1_000,
        DeltaBody::Suspect {
            node: node(2),
            version: (1, 1),
        },
    );
    let _ = m.input(
        node(1),
        Input::Gossip {
            via: node(2),
            msg: GossipMessage { deltas: vec![old] },
        },
    );
    assert_eq!(m.replica(node(1)).stats().rejections.get("not_admitted"), 0);
}

/// Counts the signature checks a replica asks for.
#[derive(Debug, Default)]
struct Counting(std::sync::atomic::AtomicU64);

impl omesh_state::Verify for Counting {
    fn holds(&self, d: &Delta) -> bool {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        d.signature_holds()
    }
}

#[test]
fn a_hold_full_of_junk_is_not_checked_again_on_every_batch() {
    // A hostile member fills the hold with writes for tasks that do not exist; each honest
    // batch after that retries the hold, which must cost map lookups, not 4,096 signature
    // checks.
    let counting = Arc::new(Counting::default());
    let mut r = harness::fixtures::replica(harness::config(1)).unwrap();
    r.set_verifier(counting.clone());
    r.handle(0, Input::Tick).unwrap();
    let junk: Vec<Delta> = (0..4_096u64)
        .map(|i| {
            let mut t = [0u8; 32];
            t[..8].copy_from_slice(&i.to_le_bytes());
            harness::fixtures::signed(
                HOSTILE,
                (1 << 32) + i + 1,
                DeltaBody::Cancel(harness::fixtures::cancel(TaskId(t))),
            )
        })
        .collect();
    for chunk in junk.chunks(64) {
        let _ = r.handle(
            1,
            Input::Gossip {
                via: node(HOSTILE),
                msg: GossipMessage {
                    deltas: chunk.to_vec(),
                },
            },
        );
    }
    assert_eq!(r.early_held(), 4_096);
    let before = counting.0.load(std::sync::atomic::Ordering::Relaxed);
    // Twenty honest batches, each a new record of node 2 (each merges, so each retries).
    for seq in 1..=20u64 {
        let mut rec = NodeRecord::new(node(2), 1, Default::default());
        rec.seq = seq;
        let d = harness::fixtures::signed(2, (1 << 32) + seq, DeltaBody::Node(Arc::new(rec)));
        r.handle(
            1 + seq,
            Input::Gossip {
                via: node(2),
                msg: GossipMessage { deltas: vec![d] },
            },
        )
        .unwrap();
    }
    let checks = counting.0.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert_eq!(checks, 20, "the hold was checked again");
    assert_eq!(r.early_held(), 4_096);
}
