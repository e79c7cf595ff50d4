//! A node's load record is paced by the mesh's size: a load that only drifts goes out about
//! once a second per known node (at most 15 s apart), so a mesh publishes a bounded number
//! of drift records whatever its size (each is verified and merged by every node: the idle cost of a mesh on
//! busy hosts). A crossing of the overload threshold, which placement turns on, goes out
//! within a probe period.
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
