//! The replica contract suite, run by the harness's own driver, and the harness's network
//! shown to really drop, duplicate and reorder what it is told to.
#![allow(clippy::unwrap_used)]

use omesh_harness::conformance::{self, Driver};
use omesh_harness::{joined, node, spec, Mesh};

#[test]
fn the_harness_driver_keeps_the_replica_contract() {
    conformance::run_all(|configs| Mesh::from_configs(configs, 1));
}

#[test]
fn the_harness_driver_keeps_the_contract_on_a_lossy_network() {
    conformance::run_all(|configs| {
        let mut m = Mesh::from_configs(configs, 2);
        m.drop_permille = 50;
        m.dup_permille = 50;
        m.jitter_ms = 20;
        m
    });
}

#[test]
fn the_harness_network_drops_duplicates_and_reorders() {
    let mut m = joined(4, |_| {});
    m.seed(11);
    m.drop_permille = 200;
    m.dup_permille = 200;
    m.jitter_ms = 30;
    for i in 0..20u64 {
        m.submit(node(1 + (i % 4) as u8), spec(500 + i));
        m.run_for(50);
    }
    m.run_for(3_000);
    let n = m.net.clone();
    assert!(n.sent > 300, "{n:?}");
    // Each is drawn at 200 per mille (duplicates among the messages kept): far from zero.
    assert!(n.dropped * 1000 > n.sent * 100, "too few drops: {n:?}");
    let kept = n.sent - n.dropped;
    assert!(n.duplicated * 1000 > kept * 50, "too few duplicates: {n:?}");
    assert!(n.reordered > 0, "nothing reordered: {n:?}");
    assert!(
        n.delivered < n.sent + n.duplicated,
        "dropped messages were delivered: {n:?}"
    );
    assert!(
        m.journal().problems().is_empty(),
        "{:?}",
        m.journal().problems()
    );
}

#[test]
fn a_journal_catches_a_driver_that_never_answers_a_stop() {
    // The suite is only worth something if it fails a driver that breaks the contract: here a
    // StopTask is polled and never answered.
    use omesh_harness::conformance::Journal;
    use omesh_state::{Action, StopReason};
    let mut j = Journal::new([node(1), node(2)], 0);
    let task = spec(1).id();
    j.polled(
        node(1),
        &Action::StopTask {
            task,
            epoch: 3,
            reason: StopReason::Cancelled,
        },
    );
    j.drained(node(1));
    let problems = j.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("never answered"), "{problems:?}");
    // Feeding before draining, and a gossip naming the receiver, are caught too.
    j.fed(node(2), 5, &omesh_state::Input::Tick);
    j.fed(node(2), 4, &omesh_state::Input::Tick);
    assert!(j.problems().iter().any(|p| p.contains("time went back")));
    assert!(j.problems().iter().any(|p| p.contains("before polling")));
}
