//! Bad input is refused with a distinct error and leaves the replica unchanged.
#![allow(clippy::unwrap_used)]

use omesh_harness as harness;

use ed25519_dalek::SigningKey;
use harness::{config, node, spec, spec_with};
use omesh_protocol::{
    Capacity, DecodeError, DeltaBody, GossipMessage, NodeRecord, SpecError, Wire,
};
use omesh_state::{DeltaError, Input, InputError, Replica};

fn replica() -> Replica {
    let mut r = omesh_harness::fixtures::replica(config(1)).unwrap();
    r.handle(0, Input::Tick).unwrap();
    while r.poll_action().is_some() {}
    r
}

fn submit_err(spec: omesh_protocol::SignedTaskSpec) -> SpecError {
    let mut r = replica();
    let before = (r.digest(), r.state().task_count());
    let err = r.submit(10, spec).unwrap_err();
    assert_eq!(
        (r.digest(), r.state().task_count()),
        before,
        "state changed"
    );
    assert!(r.poll_action().is_none(), "something was published");
    match err {
        InputError::Spec(e) => e,
        other => panic!("expected a spec error, got {other}"),
    }
}

#[test]
fn unsigned_spec_is_refused() {
    let mut s = spec(1);
    s.signature.clear();
    assert_eq!(submit_err(s), SpecError::Unsigned);
}

#[test]
fn spec_signed_by_an_unknown_key_is_refused() {
    let stranger = SigningKey::from_bytes(&[9u8; 32]);
    let s = spec(2).spec.sign(&stranger);
    let err = submit_err(s);
    assert!(matches!(err, SpecError::UnknownSubmitter(_)), "{err}");
}

#[test]
fn tampered_spec_is_refused() {
    let mut s = spec(3);
    s.spec.command = vec!["rm".into(), "-rf".into(), "/".into()];
    assert_eq!(submit_err(s), SpecError::BadSignature);
}

#[test]
fn image_without_a_digest_is_refused() {
    let s = spec_with(4, |s| s.image = "busybox:latest".into());
    assert_eq!(
        submit_err(s),
        SpecError::ImageNotPinned("busybox:latest".into())
    );
}

#[test]
fn spec_over_the_size_limit_is_refused() {
    let s = spec_with(5, |s| {
        s.env.insert("BLOB".into(), "x".repeat(20 * 1024));
    });
    let err = submit_err(s);
    assert!(matches!(err, SpecError::TooLarge { .. }), "{err}");
}

#[test]
fn each_bad_spec_gets_its_own_error() {
    let mut unsigned = spec(6);
    unsigned.signature.clear();
    let errors = [
        submit_err(unsigned),
        submit_err(spec(7).spec.sign(&SigningKey::from_bytes(&[9u8; 32]))),
        submit_err(spec_with(8, |s| s.image = "busybox".into())),
        submit_err(spec_with(9, |s| {
            s.env.insert("BLOB".into(), "x".repeat(20 * 1024));
        })),
    ];
    let names: std::collections::BTreeSet<String> = errors
        .iter()
        .map(|e| {
            format!("{e:?}")
                .split(['(', ' ', '{'])
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(names.len(), errors.len(), "{errors:?}");
}

#[test]
fn truncated_gossip_is_counted_and_dropped() {
    let mut r = replica();
    let before = r.digest();
    let mut peer = NodeRecord::new(node(2), 1, Capacity::default());
    peer.seq = 1;
    let msg = GossipMessage {
        deltas: vec![omesh_harness::fixtures::sign(
            node(2),
            (1 << 32) | 1,
            DeltaBody::Node(std::sync::Arc::new(peer)),
        )],
    };
    let bytes = msg.to_wire().unwrap();
    for cut in [1, bytes.len() / 2, bytes.len() - 1] {
        let err = r
            .handle_gossip_bytes(5, node(2), &bytes[..cut])
            .unwrap_err();
        assert_eq!(
            err,
            InputError::Malformed(DecodeError::Truncated),
            "cut at {cut}"
        );
    }
    let err = r.handle_gossip_bytes(5, node(2), &[]).unwrap_err();
    assert_eq!(err, InputError::Malformed(DecodeError::Empty));
    let err = r.handle_gossip_bytes(5, node(2), &[99, 1, 2]).unwrap_err();
    assert_eq!(
        err,
        InputError::Malformed(DecodeError::UnsupportedVersion(99))
    );
    assert_eq!(r.stats().malformed, 5);
    assert_eq!(r.digest(), before);
    // The intact message still merges afterwards.
    r.handle_gossip_bytes(6, node(2), &bytes).unwrap();
    assert!(r.state().node(&node(2)).is_some());
}

#[test]
fn a_peer_gossiping_an_unsigned_spec_or_anothers_record_is_refused() {
    let mut r = replica();
    let before = r.digest();
    let mut unsigned = spec(10);
    unsigned.signature.clear();
    let forged = NodeRecord::new(node(3), 1, Capacity::default());
    let msg = GossipMessage {
        deltas: vec![
            omesh_harness::fixtures::sign(node(2), (1 << 32) | 1, DeltaBody::Spec(unsigned)),
            omesh_harness::fixtures::sign(
                node(2),
                (1 << 32) | 2,
                DeltaBody::Node(std::sync::Arc::new(forged)),
            ),
        ],
    };
    let err = r
        .handle(7, Input::Gossip { via: node(2), msg })
        .unwrap_err();
    match err {
        InputError::Rejected {
            rejected,
            applied,
            total,
            first,
            forged,
        } => {
            assert_eq!((rejected, applied, total, forged), (2, 0, 2, 2));
            assert_eq!(first, DeltaError::Spec(SpecError::Unsigned));
        }
        other => panic!("{other}"),
    }
    assert_eq!(r.stats().rejections.total(), 2);
    assert_eq!(r.digest(), before);
}

#[test]
fn cancel_of_an_unknown_task_is_an_error() {
    let mut r = replica();
    let id = spec(11).id();
    assert_eq!(
        r.handle(1, Input::Cancel(omesh_harness::fixtures::cancel(id)))
            .unwrap_err(),
        InputError::UnknownTask(id)
    );
}

#[test]
fn config_errors_name_the_key() {
    let mut cfg = config(1);
    cfg.threshold_cpu = 0;
    let err = omesh_harness::fixtures::replica(cfg).unwrap_err();
    assert_eq!(err.key, "threshold_cpu");
    let mut cfg = config(1);
    cfg.lease_ttl_ms = 10;
    assert_eq!(
        omesh_harness::fixtures::replica(cfg).unwrap_err().key,
        "lease_ttl_ms"
    );
}

#[test]
fn over_long_fields_inside_a_valid_message_are_refused() {
    let mut r = replica();
    let before = r.digest();
    let task = spec(12).id();
    let mut entry =
        omesh_protocol::StatusEntry::new(omesh_protocol::TaskState::Failed, None, "", 1, node(2));
    entry.error = "e".repeat(10_000);
    let mut rec = NodeRecord::new(node(2), 1, Capacity::default());
    rec.rtt_ms = (0..100).map(|i| (node(i), 1)).collect();
    let msg = GossipMessage {
        deltas: vec![
            omesh_harness::fixtures::sign(
                node(2),
                (1 << 32) | 1,
                DeltaBody::Status {
                    task,
                    epoch: 1,
                    entry,
                },
            ),
            omesh_harness::fixtures::sign(
                node(2),
                (1 << 32) | 2,
                DeltaBody::Node(std::sync::Arc::new(rec)),
            ),
        ],
    };
    match r
        .handle(3, Input::Gossip { via: node(2), msg })
        .unwrap_err()
    {
        InputError::Rejected {
            rejected: 2,
            first: DeltaError::OverLimit { field, .. },
            ..
        } => {
            assert_eq!(field, "status.error");
        }
        other => panic!("{other}"),
    }
    assert_eq!(r.digest(), before);
}

#[test]
fn a_lease_at_the_last_epoch_is_refused_and_the_task_runs_on() {
    // An admitted peer that turned hostile claims a running task at epoch u64::MAX in its own
    // name, then vanishes. The honest replicas refuse the claim (it jumps past the epoch
    // window), count it, and the task runs on at the epoch it had: no frozen task, no
    // overflow (a debug panic) and no wrap to epoch 0.
    use omesh_protocol::Lease;
    let mut m = harness::joined(3, |_| {});
    let task = m.submit(node(1), spec(4242));
    assert!(m.run_until(10_000, |m| harness::owner_of(m, task).is_some()));
    let hostile = node(3);
    let stamp = m.replica(node(1)).version_of(&hostile) + 1;
    let lease = Lease {
        epoch: u64::MAX,
        owner: hostile,
        incarnation: 1,
        score: u32::MAX,
        ttl_ms: 1_000,
        released: false,
    };
    let msg = GossipMessage {
        deltas: vec![harness::fixtures::sign(
            hostile,
            stamp,
            DeltaBody::Lease { task, lease },
        )],
    };
    m.crash(hostile);
    for honest in [node(1), node(2)] {
        let err = m
            .input(
                honest,
                Input::Gossip {
                    via: hostile,
                    msg: msg.clone(),
                },
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                InputError::Rejected {
                    first: DeltaError::EpochJump { .. },
                    forged: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(m.replica(honest).stats().rejections.get("epoch_jump"), 1);
    }
    // Whoever owned it (the hostile node too, if so: then it fails over), the task runs on
    // one honest node at a small epoch.
    assert!(m.run_until(20_000, |m| {
        m.runners(task)
            .iter()
            .filter(|(n, _)| *n != hostile)
            .count()
            == 1
    }));
    for honest in [node(1), node(2)] {
        let v = m.replica(honest).task_view(m.now, &task).unwrap();
        assert!(v.epoch < 10, "{v:?}");
    }
}
