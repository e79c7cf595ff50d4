//! Property tests: the state is a join-semilattice, and replicas that exchanged every delta
//! (however delivered: reordered, duplicated, dropped then resynced) have equal digests.
#![allow(clippy::unwrap_used)]

use omesh_harness as harness;

use std::collections::BTreeSet;

use harness::{node, spec, Mesh};
use omesh_protocol::codec::canonical;
use omesh_protocol::{
    Capacity, Delta, DeltaBody, Lease, LoadSample, NodeRecord, SignedTaskSpec, StatusEntry, TaskId,
    TaskState,
};
use omesh_state::{Crdt, Input, State};
use proptest::prelude::*;

fn specs() -> Vec<SignedTaskSpec> {
    (0..4).map(spec).collect()
}

fn state_strategy() -> impl Strategy<Value = TaskState> {
    prop_oneof![
        Just(TaskState::Pending),
        Just(TaskState::Running),
        Just(TaskState::Succeeded),
        Just(TaskState::Failed),
        Just(TaskState::Cancelled),
    ]
}

/// Deltas over a small universe (4 origins, 4 tasks) so that they collide often.
fn delta_strategy() -> impl Strategy<Value = Delta> {
    let specs = specs();
    let ids: Vec<TaskId> = specs.iter().map(SignedTaskSpec::id).collect();
    let origin = (1u8..=4).prop_map(node);
    // Few tasks, epochs and timestamps, so that equal-rank writes from different writers
    // (the cases where tie-breaks decide) come up often.
    let task = prop::sample::select(ids[..2].to_vec());
    let body = prop_oneof![
        (1u8..=4, 1u64..3, 0u64..5, 0u16..1000).prop_map(|(i, inc, seq, cpu)| {
            let mut r = NodeRecord::new(
                node(i),
                inc,
                Capacity {
                    cpu_millis: 1000,
                    memory_bytes: 1 << 30,
                },
            );
            r.seq = seq;
            r.load = LoadSample {
                cpu_permille: cpu,
                mem_permille: 0,
            };
            (Some(i), DeltaBody::Node(std::sync::Arc::new(r)))
        }),
        prop::sample::select(specs).prop_map(|s| (None, DeltaBody::Spec(s))),
        (
            task.clone(),
            1u8..=4,
            1u64..3,
            0u32..2,
            1u64..3,
            any::<bool>()
        )
            .prop_map(|(task, i, epoch, score, incarnation, released)| {
                let lease = Lease {
                    epoch,
                    owner: node(i),
                    incarnation,
                    score,
                    ttl_ms: 2000,
                    released,
                };
                (Some(i), DeltaBody::Lease { task, lease })
            }),
        (
            task.clone(),
            1u8..=4,
            1u64..3,
            state_strategy(),
            prop::option::of(0i32..2),
            0u64..2
        )
            .prop_map(|(task, i, epoch, state, code, at)| {
                let entry = StatusEntry::new(state, code, "", at, node(i));
                (Some(i), DeltaBody::Status { task, epoch, entry })
            }),
        task.clone()
            .prop_map(|task| (None, DeltaBody::Cancel(harness::fixtures::cancel(task)))),
        // Compactions are written only of tasks that ended; `a_compaction_wins_in_any_order`
        // and the mesh test below cover them. (A random one of a task still running is
        // refused where the task is known and taken where it is not, by design.)
        task.prop_map(|task| (None, DeltaBody::Cancel(harness::fixtures::cancel(task)))),
        // Suspicions by anyone, of the same few nodes and versions the records use, so a
        // record refuting a suspicion and a late suspicion of an old version both occur.
        (1u8..=4, 1u64..3, 1u64..4).prop_map(|(i, inc, seq)| {
            (
                None,
                DeltaBody::Suspect {
                    node: node(i),
                    version: (inc, seq),
                },
            )
        }),
    ];
    // Single-writer components come from their writer.
    (origin, 1u64..50, body).prop_map(|(origin, stamp, (writer, body))| {
        harness::fixtures::sign(writer.map_or(origin, node), stamp, body)
    })
}

/// The state's values without stamps, for a comparison stronger than the digest.
fn values(s: &State) -> BTreeSet<Vec<u8>> {
    s.components().map(|d| canonical(&d.body)).collect()
}

/// Applies `deltas` in order, then offers the refused ones again until nothing more is
/// taken: a delta that overtook what it builds on (a status before its epoch's lease, a
/// lease before its spec) is refused, and a later sync brings it again.
fn build(deltas: &[Delta]) -> State {
    let mut s = State::default();
    let mut left: Vec<&Delta> = deltas.iter().collect();
    loop {
        let before = left.len();
        left.retain(|d| s.apply(d).is_err());
        if left.len() == before {
            return s;
        }
    }
}

fn assert_same(a: &State, b: &State) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.digest(), b.digest());
    prop_assert_eq!(values(a), values(b));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_delivery_order_with_duplicates_gives_the_same_state(
        deltas in prop::collection::vec(delta_strategy(), 0..40),
        perm in any::<prop::sample::Index>(),
        dups in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        seed in any::<u64>(),
    ) {
        let a = build(&deltas);
        let mut shuffled = deltas.clone();
        for d in &dups {
            if !deltas.is_empty() {
                shuffled.push(deltas[d.index(deltas.len())].clone());
            }
        }
        // A seeded Fisher-Yates over the duplicated list.
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            let j = usize::try_from(x % (i as u64 + 1)).unwrap();
            shuffled.swap(i, j);
        }
        if !shuffled.is_empty() {
            let k = perm.index(shuffled.len());
            shuffled.rotate_left(k);
        }
        let b = build(&shuffled);
        assert_same(&a, &b)?;
    }

    #[test]
    fn merge_is_commutative_associative_and_idempotent(
        xs in prop::collection::vec(delta_strategy(), 0..25),
        ys in prop::collection::vec(delta_strategy(), 0..25),
        zs in prop::collection::vec(delta_strategy(), 0..25),
    ) {
        let (a, b, c) = (build(&xs), build(&ys), build(&zs));
        let mut ab = a.clone(); ab.merge(&b);
        let mut ba = b.clone(); ba.merge(&a);
        assert_same(&ab, &ba)?;

        let mut ab_c = ab.clone(); ab_c.merge(&c);
        let mut bc = b.clone(); bc.merge(&c);
        let mut a_bc = a.clone(); a_bc.merge(&bc);
        assert_same(&ab_c, &a_bc)?;

        let mut aa = a.clone(); aa.merge(&a);
        assert_same(&aa, &a)?;

        // Merging states equals applying all that each holds to one state.
        let all: Vec<Delta> = a.components().chain(b.components()).collect();
        assert_same(&ab, &build(&all))?;
    }

    #[test]
    fn a_compaction_wins_in_any_order(
        mut deltas in prop::collection::vec(delta_strategy(), 0..30),
        at in any::<prop::sample::Index>(),
    ) {
        // A cancelled task, compacted as such by node 3, its compaction delivered anywhere
        // among the rest: the task ends as a tombstone, whatever came before or after.
        let s0 = &specs()[0];
        let task = s0.id();
        deltas.push(harness::fixtures::sign(node(1), 90, DeltaBody::Spec(s0.clone())));
        deltas.push(harness::fixtures::sign(
            node(2),
            91,
            DeltaBody::Cancel(harness::fixtures::cancel(task)),
        ));
        let compact = harness::fixtures::sign(
            node(3),
            92,
            DeltaBody::Compact { task, outcome: TaskState::Cancelled, end: None },
        );
        let k = at.index(deltas.len() + 1);
        deltas.insert(k, compact);
        let s = build(&deltas);
        prop_assert!(s.task(&task).is_none());
        prop_assert_eq!(s.tombstone(&task), Some(TaskState::Cancelled));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Replicas exchange real deltas over a lossy, duplicating, reordering network; after
    /// the faults stop, anti-entropy alone brings every digest to the same value and no
    /// submitted task is missing anywhere.
    #[test]
    fn replicas_converge_after_drops_duplicates_and_reordering(
        seed in any::<u64>(),
        drop_permille in 0u32..400,
        ops in prop::collection::vec((0u8..3, 1u8..=4, 1u64..400), 1..25),
    ) {
        let mut m = Mesh::new(4, |_| {});
        m.seed(seed);
        m.drop_permille = drop_permille;
        m.dup_permille = 100;
        m.jitter_ms = 30;
        let mut submitted = Vec::new();
        for (n, (kind, at, dt)) in ops.into_iter().enumerate() {
            match kind {
                0 => submitted.push(m.submit(node(at), spec(1000 + n as u64))),
                1 => {
                    if let Some(t) = submitted.last() {
                        let _ = m.input(node(at), Input::Cancel(omesh_harness::fixtures::cancel(*t)));
                    }
                }
                _ => {
                    if let Some(t) = submitted.first() {
                        if let Some(e) = m.running_on(node(at), *t) {
                            let _ = m.input(node(at), Input::Executor {
                                task: *t, epoch: e, event: omesh_state::ExecEvent::Exited { code: 0 } });
                        }
                    }
                }
            }
            m.run_for(dt);
        }
        // The faults were real: with a few hundred messages sent, some were duplicated and
        // overtaken (and dropped, when asked for).
        let n = m.net.clone();
        if n.sent >= 200 {
            prop_assert!(n.duplicated > 0 && n.reordered > 0, "{:?}", n);
            prop_assert!(drop_permille < 20 || n.dropped > 0, "{:?}", n);
        }
        m.drop_permille = 0;
        m.dup_permille = 0;
        m.jitter_ms = 0;
        // Anti-entropy runs every 2 s per node; 30 s is generous.
        let ok = m.run_until(30_000, |m| m.converged());
        prop_assert!(ok, "no convergence; digests: {:?}",
            m.ids().iter().map(|id| m.replica(*id).digest()).collect::<Vec<_>>());
        for id in m.ids() {
            for t in &submitted {
                prop_assert!(m.replica(id).task_state(m.now, t).is_some(), "{:?} lost {:?}", id, t);
            }
        }
        // One owner per epoch after convergence: every replica names the same lease.
        for t in &submitted {
            let views: BTreeSet<_> = m.ids().iter()
                .filter_map(|id| m.replica(*id).task_view(m.now, t))
                .map(|v| (v.owner, v.epoch))
                .collect();
            prop_assert_eq!(views.len(), 1);
        }
    }
}
