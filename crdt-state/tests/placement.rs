//! `place` (what every replica asks of every unowned task) agrees with the full ranking.
#![allow(clippy::unwrap_used)]

use omesh_harness as harness;

use std::collections::BTreeMap;

use omesh_protocol::{Capacity, LoadSample, NodeRecord};
use omesh_state::placement::{place, rank, PlacementPolicy, Placing};
use proptest::prelude::*;

proptest! {
    #[test]
    fn place_is_the_position_and_score_in_rank(
        // Coarse loads, so that many nodes tie on score and the id breaks the tie.
        loads in prop::collection::vec((0u16..6, 0u16..6, any::<bool>()), 1..40),
        me in 0usize..40,
    ) {
        let nodes: Vec<NodeRecord> = loads
            .iter()
            .enumerate()
            .map(|(i, (cpu, mem, tagged))| {
                let mut r = NodeRecord::new(
                    harness::node(u8::try_from(i).unwrap()),
                    1,
                    Capacity { cpu_millis: 1000, memory_bytes: 1 << 30 },
                );
                r.load = LoadSample { cpu_permille: cpu * 200, mem_permille: mem * 200 };
                if *tagged {
                    r.tags.insert("executor:process".into());
                    r.tags.insert(omesh_state::placement::PROCESS_LIMITS_TAG.into());
                }
                r
            })
            .collect();
        let spec = harness::spec(1).spec;
        let policy = PlacementPolicy {
            cpu_limit_permille: 750,
            mem_limit_permille: 800,
            target_tags: Default::default(),
        };
        let me = nodes[me % nodes.len()].id;
        let committed = BTreeMap::new();
        let task = Placing { committed: &committed, booked: None, plain: false, spec: &spec, image: None, via: None, fresh: false, policy: &policy };
        let ranked = rank(nodes.iter(), &task);
        let placed = place(&me, nodes.iter(), &task);
        match (ranked, placed) {
            (Ok(r), Ok(p)) => {
                let want = r.iter().position(|c| c.node == me).map(|i| (i, r[i].score));
                prop_assert_eq!(p, want);
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            other => prop_assert!(false, "rank and place disagree: {:?}", other),
        }
    }
}

fn node(i: u8, cpu_permille: u16) -> NodeRecord {
    let mut r = NodeRecord::new(
        harness::node(i),
        1,
        Capacity {
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
        },
    );
    r.load = LoadSample {
        cpu_permille,
        mem_permille: 100,
    };
    r.tags.insert("executor:process".into());
    r.tags
        .insert(omesh_state::placement::PROCESS_LIMITS_TAG.into());
    r
}

/// DESIGN.md, Offload: a submitted task runs where it was submitted while that node is under
/// its thresholds with the task on top, however busy it is with other leases; placed again
/// (its owner failed), the same task goes to the freest node instead.
#[test]
fn a_fresh_task_stays_with_its_submitter_while_it_may_take_it_and_a_replaced_one_spreads() {
    let mut via = node(1, 550);
    let idle = [node(2, 0), node(3, 0)];
    via.rtt_ms = vec![(idle[0].id, 1), (idle[1].id, 1)];
    let mut spec = harness::spec(1).spec;
    spec.cpu_millis = 100;
    let policy = PlacementPolicy {
        cpu_limit_permille: 750,
        mem_limit_permille: 800,
        target_tags: Default::default(),
    };
    // The submitter holds four leases, one of them not yet in its load.
    let mut committed = BTreeMap::new();
    committed.insert(
        via.id,
        omesh_state::placement::Committed {
            cpu_millis: 400,
            memory_bytes: 0,
            tasks: 4,
            unreported_cpu_millis: 100,
        },
    );
    // The submitter as `via_rec` says, beside the idle ones.
    let placing = |via_rec: &NodeRecord, fresh: bool| {
        let task = Placing {
            committed: &committed,
            booked: None,
            plain: false,
            spec: &spec,
            image: None,
            via: Some(via_rec),
            fresh,
            policy: &policy,
        };
        rank(std::iter::once(via_rec).chain(idle.iter()), &task).unwrap()[0].node
    };
    assert_eq!(
        placing(&via, true),
        via.id,
        "a fresh task left its submitter"
    );
    assert_ne!(
        placing(&via, false),
        via.id,
        "a task placed again went back to its busy submitter"
    );
    // Over the threshold once the reservation and the task are counted (550 + 100 + 100 >
    // 750): offloaded even when fresh.
    let mut fuller = via.clone();
    fuller.load.cpu_permille = 600;
    assert_ne!(
        placing(&fuller, true),
        via.id,
        "a full submitter kept the task"
    );
    // Its own verdict (overloaded) counts too.
    let mut over = via.clone();
    over.overloaded = true;
    assert_ne!(
        placing(&over, true),
        via.id,
        "an overloaded submitter kept the task"
    );
}
