//! SWIM-style membership: probing finds a crashed peer, a falsely suspected peer refutes and
//! keeps its leases, an idle mesh sends no node records, and a partition heals by probing.
#![allow(clippy::unwrap_used)]

use omesh_harness as harness;

use harness::{node, owner_of, spec, Mesh};

fn joined(n: u8) -> Mesh {
    harness::joined(n, |_| {})
}
use omesh_state::Health;

#[test]
fn a_crashed_peer_is_suspected_by_probing_then_judged_gone_everywhere() {
    let mut m = joined(5);
    let dead = node(3);
    m.crash(dead);
    let crashed_at = m.now;
    let others: Vec<_> = m.ids().into_iter().filter(|id| *id != dead).collect();
    assert!(m.run_until(20_000, |m| others
        .iter()
        .all(|id| m.replica(*id).health(m.now, &dead) == Health::Gone)));
    // Gone only after a suspicion was held for ttl + grace, never sooner.
    let r = m.replica(others[0]);
    let floor = r.config().lease_ttl_ms + r.config().lease_grace_ms;
    assert!(
        m.now - crashed_at > floor,
        "gone {} ms after the crash, before ttl + grace ({floor} ms)",
        m.now - crashed_at
    );
    let suspicions: u64 = others
        .iter()
        .map(|id| m.replica(*id).stats().suspicions)
        .sum();
    assert!(suspicions >= 1, "nobody suspected the crashed node");
    for id in &others {
        assert!(m.replica(*id).state().suspicion(&dead).is_some());
    }
}

#[test]
fn a_falsely_suspected_owner_refutes_and_keeps_its_lease() {
    let mut m = joined(3);
    // Guards off: this is about the lease, which refutations keep. With guards on, an owner
    // that completes no round trip (every ack to it is lost too) cannot tell that it is
    // still heard, and its guard ends its instance (crdt-state/tests/guard.rs).
    m.guard_margin = None;
    let task = m.submit(node(1), spec(40));
    assert!(m.run_until(5_000, |m| owner_of(m, task).is_some()));
    let (owner, epoch) = owner_of(&m, task).unwrap();
    // Its probes are lost, but gossip still reaches it: every probe of it fails, it hears
    // each suspicion and answers with a newer record before its lease runs out.
    m.deaf_to_probes.insert(owner);
    let before = m.replica(owner).stats().refutations;
    m.run_until(20_000, |_| false);
    assert_eq!(owner_of(&m, task), Some((owner, epoch)), "the lease moved");
    assert!(
        m.replica(owner).stats().refutations > before,
        "the owner never refuted a suspicion"
    );
    for id in m.ids() {
        let v = m.replica(id).task_view(m.now, &task).unwrap();
        assert_eq!((v.owner, v.epoch), (Some(owner), epoch));
    }
}

#[test]
fn an_idle_mesh_probes_but_publishes_no_records() {
    let mut m = joined(6);
    let start: Vec<_> = m.ids().iter().map(|id| m.replica(*id).stats()).collect();
    let secs = 30;
    let periods = secs * 1000 / m.replica(node(1)).config().heartbeat_ms;
    m.run_until(secs * 1000, |_| false);
    for (id, s0) in m.ids().into_iter().zip(start) {
        let s = m.replica(id).stats();
        let records = s.records_published - s0.records_published;
        let probes = s.probes_sent - s0.probes_sent;
        assert_eq!(records, 0, "{id}: {records} records in {secs} s of idle");
        assert!(
            probes >= periods - 2 && probes <= periods + 2,
            "{id}: {probes} probes in {periods} periods (one per period expected)"
        );
        assert_eq!(s.suspicions, 0, "{id} suspected a live peer");
    }
    assert!(m.converged());
}

#[test]
fn a_healed_partition_finds_itself_again_by_probing() {
    let mut m = joined(4);
    let cut = node(4);
    m.isolate(cut);
    assert!(
        m.run_until(30_000, |m| m.replica(node(1)).health(m.now, &cut)
            == Health::Gone
            && m.replica(cut).health(m.now, &node(1)) == Health::Gone)
    );
    m.heal();
    // Nothing is published in an idle mesh: only the probes of peers judged gone bring the
    // two sides back together, each refuting the other's suspicion of it.
    assert!(m.run_until(30_000, |m| m.ids().iter().all(|a| m
        .ids()
        .iter()
        .all(|b| m.replica(*a).health(m.now, b) == Health::Alive))
        && m.converged()));
}

#[test]
fn periodic_anti_entropy_compares_digests_before_sending_a_vector() {
    use omesh_protocol::{StateDigest, SyncRequest};
    use omesh_state::{Action, Input, Replica};

    let mut r = omesh_harness::fixtures::replica(harness::config(1)).unwrap();
    r.handle(0, Input::Tick).unwrap();
    while r.poll_action().is_some() {}
    let ask = |r: &mut Replica, digest, vclock_hash| {
        let request = SyncRequest {
            vclock: Vec::new(),
            digest,
            full: false,
            digest_only: true,
            vclock_hash,
        };
        r.handle(
            10,
            Input::SyncRequest {
                from: node(2),
                request,
            },
        )
        .unwrap();
        let mut replies = Vec::new();
        while let Some(a) = r.poll_action() {
            if let Action::ReplySync { reply, .. } = a {
                replies.push(reply);
            }
        }
        assert_eq!(replies.len(), 1);
        replies.remove(0)
    };
    let (mine, hash) = (r.digest(), r.vclock_hash());
    let same = ask(&mut r, mine, hash);
    assert!(same.deltas.is_empty() && same.vclock.is_empty() && !same.truncated);
    // Equal values, different vectors (one lags): the vector alone, so it can be adopted.
    let lagging = ask(&mut r, mine, hash ^ 1);
    assert!(lagging.deltas.is_empty() && !lagging.truncated);
    assert_eq!(lagging.vclock, r.version_vector());
    let other = ask(&mut r, StateDigest([1, 2, 3, 4]), hash);
    assert!(other.deltas.is_empty() && other.vclock.is_empty());
    assert!(
        other.truncated,
        "a different digest must ask for the vector"
    );
}

#[test]
fn a_new_connection_is_how_peers_that_missed_each_others_records_meet() {
    use omesh_state::Input;
    let mut m = Mesh::new(2, |_| {});
    let (a, b) = (node(1), node(2));
    m.cut.insert((a, b));
    m.cut.insert((b, a));
    // Both publish their records at start, into a cut: lost. Records are not republished
    // while nothing changes, and neither knows the other to probe or sync with.
    m.run_until(2_000, |_| false);
    m.heal();
    m.run_until(5_000, |_| false);
    assert!(m.replica(a).state().node(&b).is_none());
    assert!(m.replica(b).state().node(&a).is_none());
    // The transport connects them (the node feeds this on a first connection).
    m.input(a, Input::Connected(b)).unwrap();
    assert!(
        m.run_until(5_000, |m| m.replica(a).health(m.now, &b) == Health::Alive
            && m.replica(b).health(m.now, &a) == Health::Alive
            && m.converged())
    );
}

#[test]
fn an_owner_back_from_a_partition_does_not_take_over_what_failed_over_while_it_was_away() {
    for seed in 0..8u64 {
        let mut m = joined(3);
        m.seed(seed);
        m.jitter_ms = 20;
        let task = m.submit(node(1), spec(50 + seed));
        assert!(m.run_until(5_000, |m| owner_of(m, task).is_some()));
        let (owner, _) = owner_of(&m, task).unwrap();
        m.isolate(owner);
        // The others fail over to epoch 2; the cut-off owner suspects both of them.
        let ok = m.run_until(20_000, |m| m.runners(task).iter().any(|(_, e)| *e == 2));
        if !ok {
            for id in m.ids() {
                let r = m.replica(id);
                eprintln!(
                    "{} {:?} {:?} {:?}",
                    id.short(),
                    r.stats().rejections,
                    r.task_view(m.now, &task),
                    m.runners(task)
                );
            }
        }
        assert!(ok);
        m.run_until(3_000, |_| false);
        let claims_before = m.replica(owner).stats().claims;
        m.heal();
        // Its suspicions of the others are stale: it must stand down, not claim epoch 3.
        m.run_until(15_000, |_| false);
        let runners = m.runners(task);
        assert_eq!(runners.len(), 1, "seed {seed}: {runners:?}");
        assert_eq!(runners[0].1, 2, "seed {seed}: a third epoch was claimed");
        assert_ne!(runners[0].0, owner, "seed {seed}");
        assert_eq!(
            m.replica(owner).stats().claims,
            claims_before,
            "seed {seed}: the returning owner claimed"
        );
        assert!(m.converged());
        assert!(m.net.reordered > 0, "seed {seed}: jitter reordered nothing");
    }
}

/// Publications of node records a replica queued, drained.
fn records(r: &mut omesh_state::Replica) -> Vec<std::sync::Arc<omesh_protocol::NodeRecord>> {
    let mut out = Vec::new();
    while let Some(a) = r.poll_action() {
        if let omesh_state::Action::Publish(msg) = a {
            for d in msg.deltas {
                if let omesh_protocol::DeltaBody::Node(rec) = d.body {
                    out.push(rec);
                }
            }
        }
    }
    out
}

#[test]
fn what_a_node_learns_before_it_starts_goes_into_its_one_first_record() {
    use omesh_protocol::LoadSample;
    use omesh_state::Input;
    let mut r = omesh_harness::fixtures::replica(harness::config(1)).unwrap();
    let addr = "/ip4/127.0.0.1/udp/4001/quic-v1".to_string();
    let load = LoadSample {
        cpu_permille: 300,
        mem_permille: 100,
    };
    r.handle(0, Input::Addresses(vec![addr.clone()])).unwrap();
    r.handle(0, Input::Load(load)).unwrap();
    assert!(records(&mut r).is_empty(), "published before it started");
    let mut published = Vec::new();
    for now in (0..5_000).step_by(100) {
        r.handle(now, Input::Tick).unwrap();
        published.extend(records(&mut r));
    }
    assert_eq!(published.len(), 1, "{published:?}");
    assert_eq!(published[0].addrs, vec![addr]);
    assert_eq!(published[0].load, load);

    // A peer that hears that first record by gossip holds it in order: no gap to close.
    let mut peer = omesh_harness::fixtures::replica(harness::config(2)).unwrap();
    peer.handle(0, Input::Tick).unwrap();
    let msg = omesh_protocol::GossipMessage {
        deltas: vec![omesh_harness::fixtures::sign(
            node(1),
            r.version_of(&node(1)),
            omesh_protocol::DeltaBody::Node(published[0].clone()),
        )],
    };
    peer.handle_gossip(10, node(1), &msg).unwrap();
    assert!(peer.state().node(&node(1)).is_some());
    assert_eq!(peer.stats().gaps, 0, "a first record opened a gap");
    assert_eq!(peer.version_of(&node(1)), r.version_of(&node(1)));
}

#[test]
fn a_first_sync_that_lacks_the_nodes_record_publishes_it_again_and_only_then() {
    use omesh_protocol::SyncReply;
    use omesh_state::{Input, Replica};
    let answer = |r: &Replica, with_mine: bool| SyncReply {
        deltas: Vec::new(),
        vclock: if with_mine {
            vec![(node(1), r.version_of(&node(1)))]
        } else {
            vec![(node(2), 1 << 32 | 1)]
        },
        digest: r.digest(),
        truncated: false,
    };
    for with_mine in [false, true] {
        let mut r = omesh_harness::fixtures::replica(harness::config(1)).unwrap();
        r.handle(0, Input::Tick).unwrap();
        assert_eq!(records(&mut r).len(), 1);
        let reply = answer(&r, with_mine);
        r.handle(
            100,
            Input::SyncReply {
                from: node(2),
                reply,
            },
        )
        .unwrap();
        let mut again = Vec::new();
        for now in (100..600).step_by(50) {
            r.handle(now, Input::Tick).unwrap();
            again.extend(records(&mut r));
        }
        // A second reply lacking it (before the node falls silent long enough to count as
        // isolated) changes nothing: only the first sync tells.
        let reply = answer(&r, false);
        r.handle(
            600,
            Input::SyncReply {
                from: node(2),
                reply,
            },
        )
        .unwrap();
        for now in (600..1_100).step_by(50) {
            r.handle(now, Input::Tick).unwrap();
            again.extend(records(&mut r));
        }
        let want = usize::from(!with_mine);
        assert_eq!(
            again.len(),
            want,
            "responder held it: {with_mine}: {again:?}"
        );
    }
}

#[test]
fn a_bulk_join_holds_every_record_in_order_and_keeps_merging_after() {
    use omesh_protocol::{Delta, DeltaBody, SyncReply};
    use omesh_state::Input;
    // More than the bulk-join threshold, so the replica rebuilds its per-node tables.
    let keys: Vec<omesh_state::NodeKey> = (0..300u32)
        .map(|i| {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&i.to_be_bytes());
            b[31] = 0x55;
            omesh_state::NodeKey::from_bytes(&b)
        })
        .collect();
    let ids: Vec<_> = keys.iter().map(omesh_state::NodeKey::id).collect();
    let record = |id, seq| record(id, seq, 0);
    let first = 1u64 << 32 | 1;
    let deltas: Vec<Delta> = keys
        .iter()
        .map(|k| Delta::signed(k.signing(), first, DeltaBody::Node(record(k.id(), 1))))
        .collect();
    let mut donor = omesh_state::State::default();
    for d in &deltas {
        donor.apply(d).unwrap();
    }
    let mut r = omesh_harness::fixtures::replica(harness::config(200)).unwrap();
    r.handle(0, Input::Tick).unwrap();
    let reply = SyncReply {
        deltas,
        vclock: ids.iter().map(|id| (*id, first)).collect(),
        digest: donor.digest(),
        truncated: false,
    };
    r.handle(
        10,
        Input::SyncReply {
            from: ids[0],
            reply,
        },
    )
    .unwrap();
    assert_eq!(r.state().node_count(), 301);
    for id in &ids {
        assert_eq!(r.version_of(id), first);
        assert_eq!(r.last_heard(id), Some(10));
        assert_eq!(
            r.state()
                .node_by_prefix(u64::from_be_bytes(id.0[..8].try_into().unwrap()))
                .map(|n| n.id),
            Some(*id)
        );
    }
    assert!(r.state().node_by_prefix(u64::MAX).is_none());
    // And it goes on merging: a newer record of one node, in order.
    let newer = omesh_protocol::GossipMessage {
        deltas: vec![Delta::signed(
            keys[7].signing(),
            first + 1,
            DeltaBody::Node(record(ids[7], 2)),
        )],
    };
    r.handle_gossip(20, ids[7], &newer).unwrap();
    assert_eq!(r.state().node(&ids[7]).map(|n| n.seq), Some(2));
    assert_eq!(r.version_of(&ids[7]), first + 1);
    assert_eq!(r.last_heard(&ids[7]), Some(20));
    assert_eq!(r.stats().gaps, 0);
    // The kept vector hash matches the vector (debug builds check it on every call).
    let _ = r.vclock_hash();
}

#[test]
fn a_replica_behind_on_a_record_that_only_moved_does_not_look_in_sync() {
    use std::sync::Arc;

    use omesh_protocol::{DeltaBody, GossipMessage};
    use omesh_protocol::{SyncReply, SyncRequest};
    use omesh_state::{Action, Input, Replica};
    // Node 9 published seq 1, then seq 2 (a load move, or a refutation: the durable part is
    // unchanged). Replica a holds only seq 1, replica b both.
    let x = node(9);
    let rec = |seq, cpu| record(x, seq, cpu);
    let first = 1u64 << 32 | 1;
    let msg = |stamp, r| GossipMessage {
        deltas: vec![omesh_harness::fixtures::sign(x, stamp, DeltaBody::Node(r))],
    };
    let mut a = omesh_harness::fixtures::replica(harness::config(1)).unwrap();
    let mut b = omesh_harness::fixtures::replica(harness::config(2)).unwrap();
    for r in [&mut a, &mut b] {
        r.handle(0, Input::Tick).unwrap();
        r.handle_gossip(1, x, &msg(first, rec(1, 100))).unwrap();
    }
    b.handle_gossip(2, x, &msg(first + 1, rec(2, 900))).unwrap();
    // Trade own records, so the two states differ only in node 9's version.
    let record_of = |r: &Replica, id| {
        omesh_harness::fixtures::sign(
            id,
            r.version_of(&id),
            DeltaBody::Node(Arc::new(r.state().node(&id).unwrap().clone())),
        )
    };
    let (da, db) = (record_of(&a, node(1)), record_of(&b, node(2)));
    a.handle_gossip(3, node(2), &GossipMessage { deltas: vec![db] })
        .unwrap();
    b.handle_gossip(3, node(1), &GossipMessage { deltas: vec![da] })
        .unwrap();
    assert_eq!(a.state().node(&x).unwrap().seq, 1);
    assert_eq!(b.state().node(&x).unwrap().seq, 2);
    assert_ne!(
        a.digest(),
        b.digest(),
        "a record's version is part of the digest"
    );

    // So a digest-only sync from a is told to send its vector (not handed b's vector alone,
    // which a would adopt and then never ask for seq 2)...
    let request = SyncRequest {
        vclock: Vec::new(),
        digest: a.digest(),
        full: false,
        digest_only: true,
        vclock_hash: a.vclock_hash(),
    };
    b.handle(
        4,
        Input::SyncRequest {
            from: node(1),
            request,
        },
    )
    .unwrap();
    let reply: SyncReply = std::iter::from_fn(|| b.poll_action())
        .find_map(|act| match act {
            Action::ReplySync { reply, .. } => Some(reply),
            _ => None,
        })
        .unwrap();
    assert!(reply.truncated && reply.vclock.is_empty(), "{reply:?}");
    // ... and with its vector it gets seq 2.
    let request = SyncRequest {
        vclock: a.version_vector(),
        digest: a.digest(),
        full: false,
        digest_only: false,
        vclock_hash: 0,
    };
    b.handle(
        5,
        Input::SyncRequest {
            from: node(1),
            request,
        },
    )
    .unwrap();
    let reply = std::iter::from_fn(|| b.poll_action())
        .find_map(|act| match act {
            Action::ReplySync { reply, .. } => Some(reply),
            _ => None,
        })
        .unwrap();
    a.handle(
        6,
        Input::SyncReply {
            from: node(2),
            reply,
        },
    )
    .unwrap();
    assert_eq!(a.state().node(&x).unwrap().seq, 2);
    assert_eq!(a.digest(), b.digest());
}

#[test]
fn when_a_long_running_owner_dies_the_next_in_rank_claims_not_every_node() {
    let mut m = joined(12);
    let task = m.submit(node(1), spec(77));
    assert!(m.run_until(5_000, |m| owner_of(m, task).is_some()));
    let (owner, epoch) = owner_of(&m, task).unwrap();
    // Owned for long: a stagger counted from the task's first claimable moment would have
    // run out on every node by now.
    m.run_until(60_000, |_| false);
    let claims = |m: &Mesh| -> u64 {
        m.ids()
            .into_iter()
            .filter(|id| *id != owner)
            .map(|id| m.replica(id).stats().claims)
            .sum()
    };
    let before = claims(&m);
    m.crash(owner);
    assert!(m.run_until(30_000, |m| owner_of(m, task)
        .is_some_and(|(o, e)| o != owner && e > epoch)));
    m.run_until(5_000, |_| false);
    let made = claims(&m) - before;
    assert!(
        (1..=2).contains(&made),
        "{made} claims for one failover among 11 nodes"
    );
}

#[test]
fn a_new_neighbour_learned_mid_round_is_probed_within_a_few_periods() {
    use omesh_protocol::{DeltaBody, GossipMessage, NodeId, Probe};
    use omesh_state::{Action, Input, Replica};
    let rec = |i: u8| record(node(i), 0, 0);
    let learn = |r: &mut Replica, now, ids: &[u8]| {
        let deltas = ids
            .iter()
            .map(|&i| omesh_harness::fixtures::sign(node(i), 1 << 32 | 1, DeltaBody::Node(rec(i))))
            .collect();
        r.handle_gossip(now, node(2), &GossipMessage { deltas })
            .unwrap();
    };
    let me = node(1);
    // The ids just before this node's in id order, nearest first: its neighbours-to-be.
    let mut before: Vec<(NodeId, u8)> = (2..80).map(|i| (node(i), i)).collect();
    before.sort_by_key(|(id, _)| std::cmp::Reverse(if *id < me { (1, *id) } else { (0, *id) }));
    // The first peers known are all farther away than the nearest two.
    let near: Vec<u8> = before[..2].iter().map(|(_, i)| *i).collect();
    let first: Vec<u8> = before[2..].iter().map(|(_, i)| *i).collect();
    let mut r = omesh_harness::fixtures::replica(harness::config(1)).unwrap();
    learn(&mut r, 0, &first);
    let mut now = 0;
    let mut pinged = Vec::new();
    let tick = |r: &mut Replica, now: u64, pinged: &mut Vec<NodeId>| {
        r.handle(now, Input::Tick).unwrap();
        while let Some(a) = r.poll_action() {
            if let Action::SendProbe {
                to,
                probe: Probe::Ping { .. },
            } = a
            {
                pinged.push(to);
            }
        }
    };
    while pinged.is_empty() {
        tick(&mut r, now, &mut pinged);
        now += 50;
    }
    // Two nearer nodes join mid-round: both are pinged within the next ten periods.
    learn(&mut r, now, &near);
    pinged.clear();
    let until = now + 10 * r.config().heartbeat_ms;
    while now < until {
        tick(&mut r, now, &mut pinged);
        now += 50;
    }
    for i in &near {
        assert!(
            pinged.contains(&node(*i)),
            "new neighbour {i} not pinged: {pinged:?}"
        );
    }
}

#[test]
fn in_a_large_mesh_each_node_talks_to_a_few_peers_and_a_crash_is_still_taken_over() {
    let n = 30;
    let mut m = joined(n);
    let task = m.submit(node(1), spec(78));
    assert!(m.run_until(5_000, |m| owner_of(m, task).is_some()));
    let (owner, epoch) = owner_of(&m, task).unwrap();
    // Steady state: who probes or syncs with whom over a minute.
    m.run_until(5_000, |_| false);
    m.net.links.clear();
    m.run_until(60_000, |_| false);
    let bound = 2 * omesh_state::NEIGHBOURS;
    for id in m.ids() {
        let mut peers: Vec<_> = m
            .net
            .links
            .iter()
            .filter_map(|(a, b)| {
                if *a == id {
                    Some(*b)
                } else if *b == id {
                    Some(*a)
                } else {
                    None
                }
            })
            .collect();
        peers.sort();
        peers.dedup();
        assert!(
            peers.len() <= bound,
            "{} talked to {} of {} peers in a minute (at most {bound} expected)",
            id.short(),
            peers.len(),
            n - 1
        );
        assert!(!peers.is_empty(), "{} talked to nobody", id.short());
    }
    // Every node is still watched: the owner's crash is found and its task runs elsewhere.
    m.crash(owner);
    assert!(m.run_until(30_000, |m| owner_of(m, task)
        .is_some_and(|(o, e)| o != owner && e > epoch)));
    let others: Vec<_> = m.ids().into_iter().filter(|id| *id != owner).collect();
    assert!(m.run_until(20_000, |m| others
        .iter()
        .all(|id| m.replica(*id).health(m.now, &owner) == Health::Gone)));
}

/// A record of `id` (incarnation 1) at `seq` with `cpu_permille` load.
fn record(
    id: omesh_protocol::NodeId,
    seq: u64,
    cpu_permille: u16,
) -> std::sync::Arc<omesh_protocol::NodeRecord> {
    let mut r = omesh_protocol::NodeRecord::new(id, 1, omesh_protocol::Capacity::default());
    r.seq = seq;
    r.load.cpu_permille = cpu_permille;
    std::sync::Arc::new(r)
}

#[test]
fn a_load_hovering_at_the_threshold_flips_the_verdict_once_and_every_replica_agrees() {
    let mut m = joined(3);
    let hot = node(1);
    let agree = |m: &Mesh, want: bool| {
        m.ids().iter().all(|id| {
            m.replica(*id)
                .state()
                .node(&hot)
                .is_some_and(|r| r.overloaded == want)
        })
    };
    // Around the 75 % threshold, as the smoothed load of a saturated node reads.
    for cpu in [
        700, 740, 760, 745, 752, 748, 770, 731, 755, 749, 762, 738, 751, 746,
    ] {
        m.load(hot, cpu);
        m.run_for(1_000);
        if cpu >= 760 || m.replica(hot).stats().overload_entered > 0 {
            assert!(m.replica(hot).is_overloaded(), "clear again at {cpu}");
        }
    }
    let stats = m.replica(hot).stats();
    assert_eq!((stats.overload_entered, stats.overload_left), (1, 0));
    assert!(m.run_until(10_000, |m| agree(m, true)));

    // Out only below the threshold less the 10-point margin.
    m.load(hot, 660);
    m.run_for(1_000);
    assert!(m.replica(hot).is_overloaded());
    m.load(hot, 640);
    assert!(!m.replica(hot).is_overloaded());
    assert_eq!(m.replica(hot).stats().overload_left, 1);
    assert!(m.run_until(10_000, |m| agree(m, false)));
}

/// The nodes probe their neighbours in step (in period `k`, counted as `now / period` on each
/// node's clock, each pings its `(k mod n + 1)`-th nearest predecessor), so each node is
/// pinged by one of its watchers in every period: a crash is pinged within two periods and
/// suspected within three, whenever it comes and whatever the phases of the nodes' periods.
/// With each node reshuffling a round of its own, a crashed node went unpinged for a period
/// one time in three, and crashes like these were suspected up to 2.05 s (four periods) after.
#[test]
fn a_crash_is_suspected_within_three_periods_whenever_it_comes() {
    let mut worst = 0;
    for seed in 1..=200u64 {
        let mut m = joined(5);
        m.seed(seed);
        let period = m.replica(node(1)).config().heartbeat_ms;
        // Crashes at every phase of the nodes' periods.
        m.run_for(2_000 + seed * 37);
        let dead = node(1 + u8::try_from(seed % 5).unwrap());
        m.crash(dead);
        let crashed_at = m.now;
        let others: Vec<_> = m.ids().into_iter().filter(|id| *id != dead).collect();
        assert!(m.run_until(10_000, |m| others.iter().any(|id| m
            .replica(*id)
            .state()
            .suspicion(&dead)
            .is_some())));
        let after = m.now - crashed_at;
        worst = worst.max(after);
        assert!(
            after <= 3 * period,
            "seed {seed}: {} suspected {after} ms after its crash",
            dead.short()
        );
    }
    println!("worst: suspected {worst} ms after the crash");
}
