//! A node's load record is paced by the mesh's size: a load that only drifts goes out about
//! once a second per known node, so a mesh publishes about one drift record a second
//! whatever its size (each is verified and merged by every node: the idle cost of a mesh on
//! busy hosts). A large drift (3 times `load_delta_permille`) waits at most 15 s; a
//! crossing of the overload threshold, which placement turns on, goes out within a probe
//! period.
#![allow(clippy::unwrap_used)]

use omesh_harness as harness;

use harness::node;

#[test]
fn a_drifting_load_is_published_once_a_second_per_node_a_crossing_at_once() {
    const NODES: u8 = 20;
    let mut m = harness::joined(NODES, |_| {});
    let me = node(1);
    let heartbeat_ms = m.replica(me).config().heartbeat_ms;
    // Let the joining's own publications pass.
    m.run_for(5_000);
    let before = m.replica(me).stats().records_published;
    // 45 s of a load wandering between 10% and 40% (under the threshold), a sample every
    // 200 ms: every sample is a drift of 30 points.
    let window_ms = 45_000;
    for i in 0..window_ms / 200 {
        m.load(me, if i % 2 == 0 { 100 } else { 400 });
        m.run_for(200);
    }
    let drifts = m.replica(me).stats().records_published - before;
    // 20 nodes: one drift record per 20 s, capped at one per 15 s (a record per heartbeat
    // before: 90).
    let period = (1_000 * u64::from(NODES)).min(15_000);
    assert!(
        drifts <= window_ms / period + 1,
        "{drifts} drift records in {window_ms} ms"
    );
    assert!(drifts >= 1, "a drift was never published");

    // A crossing of the overload threshold reaches the others within a period or two.
    m.load(me, 990);
    let seen = m.run_until(4 * heartbeat_ms, |m| {
        m.ids().iter().all(|n| {
            m.replica(*n)
                .state()
                .node(&me)
                .is_some_and(|r| r.overloaded)
        })
    });
    assert!(seen, "the overload crossing was held back like a drift");
}

#[test]
fn a_small_drift_in_a_large_mesh_waits_its_full_spacing_a_large_one_at_most_15_s() {
    const NODES: u8 = 40;
    let mut m = harness::joined(NODES, |_| {});
    let me = node(1);
    m.run_for(5_000);
    let published = |m: &harness::Mesh| m.replica(me).stats().records_published;
    // 120 s of an idle host's load wandering between 10% and 18% (a drift of 8 points, over
    // the 5-point delta, under 3 times it): one record per 40 s at most (one per 15 s, 8 in
    // all, before the cap applied to large drifts only).
    let before = published(&m);
    let window_ms = 120_000;
    for i in 0..window_ms / 200 {
        m.load(me, if i % 2 == 0 { 100 } else { 180 });
        m.run_for(200);
    }
    let small = published(&m) - before;
    assert!(
        small <= window_ms / (1_000 * u64::from(NODES)) + 1,
        "{small} small drift records in {window_ms} ms"
    );
    assert!(small >= 1, "a small drift was never published");

    // A large drift (to 60%, 42 points and more from anything published) reaches every node
    // within 15 s and a few periods, not 40 s.
    let before = published(&m);
    m.load(me, 600);
    let seen = m.run_until(15_000 + 4 * m.replica(me).config().heartbeat_ms, |m| {
        m.ids().iter().all(|n| {
            m.replica(*n)
                .state()
                .node(&me)
                .is_some_and(|r| r.load.cpu_permille >= 500)
        })
    });
    assert!(seen, "a large drift was held back like a small one");
    assert!(published(&m) > before);
}
