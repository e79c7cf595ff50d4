//! Lifeguard-style suspicion: the wait from a suspicion to its suspect counting gone shrinks
//! from `lease_ttl + grace` to `suspicion_floor_ms` as distinct nodes confirm the same
//! suspected record, each with a `Suspect` of its own, signed by it. The tests run with the
//! opt-in settings (`harness::lifeguard`); at the defaults the floor is `ttl + grace`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use omesh_harness as harness;

use harness::{node, owner_of, spec};
use omesh_protocol::{Delta, DeltaBody, GossipMessage, Millis, NodeId, NodeRecord};
use omesh_state::{Health, Input, Replica};

/// The suspect of the replica-level tests.
const SUSPECT: u8 = 3;

fn record(i: u8) -> Delta {
    let rec = NodeRecord::new(node(i), 1, Default::default());
    harness::fixtures::signed(i, 1 << 32 | 1, DeltaBody::Node(Arc::new(rec)))
}

/// A `Suspect` of the suspect's first record, written by node `by` with stamp `seq`.
fn suspect_by(by: u8, seq: u64) -> Delta {
    let version = (1, 0);
    harness::fixtures::signed(
        by,
        1 << 32 | seq,
        DeltaBody::Suspect {
            node: node(SUSPECT),
            version,
        },
    )
}

fn gossip(r: &mut Replica, now: Millis, via: u8, deltas: Vec<Delta>) {
    let _ = r.handle(
        now,
        Input::Gossip {
            via: node(via),
            msg: GossipMessage { deltas },
        },
    );
}

/// Node 1's replica, knowing nodes 2..=7 by their records (merged at 0), at version (1, 0).
fn observer() -> Replica {
    let mut cfg = harness::fixtures::config(1);
    harness::lifeguard(&mut cfg);
    let mut r = harness::fixtures::replica(cfg).unwrap();
    r.handle(0, Input::Tick).unwrap();
    let records = (2..=7).map(record).collect();
    gossip(&mut r, 0, 2, records);
    assert_eq!(r.state().node(&node(SUSPECT)).unwrap().version(), (1, 0));
    r
}

/// When `r` first judges the suspect gone, looking from `from` on (no input in between).
fn gone_at(r: &Replica, from: Millis) -> Millis {
    (from..from + 10_000)
        .find(|t| r.health(*t, &node(SUSPECT)) == Health::Gone)
        .unwrap()
}

#[test]
fn a_lone_suspicion_waits_the_full_ttl_and_grace() {
    let mut r = observer();
    let full = r.config().lease_ttl_ms + r.config().lease_grace_ms;
    gossip(&mut r, 1_000, 2, vec![suspect_by(2, 2)]);
    assert_eq!(r.suspected_since(&node(SUSPECT)), Some(1_000));
    assert_eq!(r.suspicion_confirmations(&node(SUSPECT)), 0);
    assert_eq!(r.suspicion_wait_ms(&node(SUSPECT)), full);
    assert_eq!(gone_at(&r, 1_000), 1_000 + full + 1);
}

#[test]
fn each_distinct_confirmation_shortens_the_wait_down_to_the_floor() {
    let mut r = observer();
    let full = r.config().lease_ttl_ms + r.config().lease_grace_ms;
    let floor = r.config().suspicion_floor();
    let k = usize::from(r.config().suspicion_confirmations);
    gossip(&mut r, 1_000, 2, vec![suspect_by(2, 2)]);
    let mut waits = vec![r.suspicion_wait_ms(&node(SUSPECT))];
    // Nodes 4, 5, 6 and 7 confirm, one by one (through different relays).
    for (n, by) in (4..=7).enumerate() {
        gossip(&mut r, 1_100 + n as u64, by, vec![suspect_by(by, 2)]);
        assert_eq!(
            r.suspicion_confirmations(&node(SUSPECT)),
            n + 1,
            "confirmation by node {by}"
        );
        waits.push(r.suspicion_wait_ms(&node(SUSPECT)));
    }
    assert_eq!(waits[0], full);
    assert!(
        waits.windows(2).all(|w| w[0] > w[1] || w[1] == floor),
        "{waits:?}"
    );
    assert_eq!(waits[k], floor, "{waits:?}");
    assert_eq!(waits[4], floor, "below the floor: {waits:?}");
    // The countdown still runs from the first arrival.
    assert_eq!(r.suspected_since(&node(SUSPECT)), Some(1_000));
    assert_eq!(gone_at(&r, 1_000), 1_000 + floor + 1);
}

#[test]
fn no_node_can_confirm_twice_or_for_another() {
    let mut r = observer();
    let full = r.config().lease_ttl_ms + r.config().lease_grace_ms;
    gossip(&mut r, 1_000, 2, vec![suspect_by(2, 2)]);
    // The same suspecter again, with fresh stamps, through several relays.
    for (seq, via) in [(3, 4), (4, 5), (5, 6)] {
        gossip(&mut r, 1_010, via, vec![suspect_by(2, seq)]);
    }
    // A node passing off its suspicion as others': deltas say their origin, and the
    // signature must be the origin's (node 2's key signing as nodes 4 and 5).
    for forged_as in [4, 5] {
        let mut d = suspect_by(2, 9);
        d.origin = node(forged_as);
        gossip(&mut r, 1_020, 2, vec![d]);
    }
    // The suspect cannot confirm a suspicion of itself.
    gossip(&mut r, 1_030, 3, vec![suspect_by(SUSPECT, 2)]);
    assert_eq!(r.suspicion_confirmations(&node(SUSPECT)), 0);
    assert_eq!(r.suspicion_wait_ms(&node(SUSPECT)), full);
    assert!(
        r.stats().rejections.total() >= 2,
        "the forgeries were taken"
    );
}

#[test]
fn a_confirmation_counts_only_for_the_record_suspected() {
    let mut r = observer();
    let full = r.config().lease_ttl_ms + r.config().lease_grace_ms;
    gossip(&mut r, 1_000, 2, vec![suspect_by(2, 2)]);
    gossip(&mut r, 1_010, 4, vec![suspect_by(4, 2)]);
    assert_eq!(r.suspicion_confirmations(&node(SUSPECT)), 1);
    // The suspect refutes with a newer record: the suspicion and its confirmations are gone.
    let mut rec = NodeRecord::new(node(SUSPECT), 1, Default::default());
    rec.seq = 5;
    let newer = harness::fixtures::signed(SUSPECT, 1 << 32 | 5, DeltaBody::Node(Arc::new(rec)));
    gossip(&mut r, 1_100, SUSPECT, vec![newer]);
    assert_eq!(r.suspected_since(&node(SUSPECT)), None);
    // Late confirmations of the refuted record count for nothing.
    gossip(&mut r, 1_200, 5, vec![suspect_by(5, 2)]);
    assert_eq!(r.suspected_since(&node(SUSPECT)), None);
    assert_eq!(r.suspicion_confirmations(&node(SUSPECT)), 0);
    // A new suspicion of the new record starts from none.
    let again = harness::fixtures::signed(
        6,
        1 << 32 | 2,
        DeltaBody::Suspect {
            node: node(SUSPECT),
            version: (1, 5),
        },
    );
    gossip(&mut r, 1_300, 6, vec![again]);
    assert_eq!(r.suspected_since(&node(SUSPECT)), Some(1_300));
    assert_eq!(r.suspicion_confirmations(&node(SUSPECT)), 0);
    assert_eq!(r.suspicion_wait_ms(&node(SUSPECT)), full);
}

#[test]
fn with_no_confirmations_expected_every_suspicion_waits_the_full_time() {
    let mut cfg = harness::fixtures::config(1);
    harness::lifeguard(&mut cfg);
    cfg.suspicion_confirmations = 0;
    let mut r = harness::fixtures::replica(cfg).unwrap();
    r.handle(0, Input::Tick).unwrap();
    gossip(&mut r, 0, 2, (2..=7).map(record).collect());
    let full = r.config().lease_ttl_ms + r.config().lease_grace_ms;
    for by in [2, 4, 5, 6, 7] {
        gossip(&mut r, 1_000, by, vec![suspect_by(by, 2)]);
    }
    assert_eq!(r.suspicion_wait_ms(&node(SUSPECT)), full);
}

/// A crashed node in a mesh of 6: the survivors that learn of the suspicion check it
/// themselves, so every survivor holds enough confirmations for the floor, and counts the
/// crashed node gone the floor after the suspicion reached it.
#[test]
fn survivors_confirm_a_crash_and_wait_only_the_floor() {
    for seed in 1..=4u64 {
        let mut m = harness::joined(6, harness::lifeguard);
        m.seed(seed);
        let task = m.submit(node(1), spec(40 + seed));
        assert!(m.run_until(5_000, |m| owner_of(m, task).is_some()));
        let (owner, _) = owner_of(&m, task).unwrap();
        m.run_for(seed * 61 % 250);
        m.crash(owner);
        let survivors: Vec<NodeId> = m.ids().into_iter().filter(|i| *i != owner).collect();
        let mut gone: Vec<Option<(Millis, Millis)>> = vec![None; survivors.len()];
        let end = m.now + 10_000;
        while m.now < end && gone.iter().any(Option::is_none) {
            m.run_for(1);
            for (i, s) in survivors.iter().enumerate() {
                let r = m.replica(*s);
                if gone[i].is_none() && r.health(m.now, &owner) == Health::Gone {
                    gone[i] = Some((r.suspected_since(&owner).unwrap(), m.now));
                }
            }
        }
        let floor = m.replica(survivors[0]).config().suspicion_floor();
        for (s, g) in survivors.iter().zip(&gone) {
            let (since, at) = g.unwrap_or_else(|| panic!("seed {seed}: {s} never judged it gone"));
            let r = m.replica(*s);
            assert!(
                r.suspicion_confirmations(&owner) >= 3,
                "seed {seed}: {s} holds {} confirmations",
                r.suspicion_confirmations(&owner)
            );
            // Gone the floor after the suspicion arrived (ticks may land a few ms late).
            assert!(
                at >= since + floor && at <= since + floor + 20,
                "seed {seed}: {s} suspected at {since}, gone at {at}"
            );
        }
    }
}

/// At the default settings the floor is `ttl + grace`: confirmations are counted, and the
/// wait does not shrink (Lifeguard is opt-in).
#[test]
fn at_the_defaults_confirmations_do_not_shorten_the_wait() {
    let mut r = harness::fixtures::replica(harness::fixtures::config(1)).unwrap();
    r.handle(0, Input::Tick).unwrap();
    gossip(&mut r, 0, 2, (2..=7).map(record).collect());
    let full = r.config().lease_ttl_ms + r.config().lease_grace_ms;
    for by in [2, 4, 5, 6, 7] {
        gossip(&mut r, 1_000, by, vec![suspect_by(by, 2)]);
    }
    assert!(r.suspicion_confirmations(&node(SUSPECT)) >= 3);
    assert_eq!(r.suspicion_wait_ms(&node(SUSPECT)), full);
    assert_eq!(gone_at(&r, 1_000), 1_000 + full + 1);
}
