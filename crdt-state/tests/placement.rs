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
        let task = Placing { committed: &committed, booked: None, spec: &spec, image: None, via: None, policy: &policy };
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
