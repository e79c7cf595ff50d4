//! The replica's random stream (probe order, the start offset of its probe period, claim
//! staggers) depends on its seed, its id and its incarnation, each on its own.
#![allow(clippy::unwrap_used)]

use omesh_protocol::NodeId;
use omesh_state::{Input, ReplicaConfig};

/// When a fresh replica first wants to probe: drawn from its random stream at start.
fn first_probe_at(id: NodeId, seed: u64, incarnation: u64) -> u64 {
    let mut cfg = ReplicaConfig::for_node(id);
    cfg.seed = seed;
    cfg.incarnation = incarnation;
    let mut r = omesh_harness::fixtures::replica(cfg).unwrap();
    r.handle(0, Input::Tick).unwrap();
    while r.poll_action().is_some() {}
    r.poll_timeout().unwrap()
}

fn id(i: u8) -> NodeId {
    omesh_harness::node(i)
}

#[test]
fn a_restart_does_not_replay_the_random_stream_of_the_incarnation_before() {
    let draws: std::collections::BTreeSet<u64> =
        (1..=8).map(|inc| first_probe_at(id(1), 42, inc)).collect();
    assert!(draws.len() > 1, "eight incarnations drew alike: {draws:?}");
}

#[test]
fn a_seed_derived_from_the_id_does_not_cancel_out() {
    // A driver that seeds each replica from its own id bytes (as the peer once did) must
    // still give different nodes different streams.
    let draws: std::collections::BTreeSet<u64> = (1..=8u8)
        .map(|i| {
            let node = id(i);
            let seed = u64::from_le_bytes(node.0[..8].try_into().unwrap());
            first_probe_at(node, seed, 1)
        })
        .collect();
    assert!(draws.len() > 1, "eight nodes drew alike: {draws:?}");
}
