//! Small versions of every scenario in `netsim/scenarios/`, with every invariant asserted, and
//! the determinism check: the same seed gives the same event trace.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use omesh_netsim::sim::secs;
use omesh_netsim::{run, run_sim, Outcome, Scenario, Sim};

fn small(name: &str, nodes: u32) -> Scenario {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(format!("{name}.toml"));
    Scenario::load(&path).unwrap().with_nodes(nodes).unwrap()
}

fn assert_holds(o: &Outcome) {
    assert!(o.violations.is_empty(), "invariants broken:\n{}", o.table());
    assert_eq!(o.tasks.lost, 0, "{}", o.table());
}

/// Each `(task, epoch)` started at most once over the whole run: a restarted or fenced owner
/// never resumes an old epoch.
fn epochs_start_once(sim: &Sim) {
    let mut starts: BTreeMap<(u32, u64), Vec<u32>> = BTreeMap::new();
    for i in &sim.runs.instances {
        starts.entry((i.task, i.epoch)).or_default().push(i.node);
    }
    for ((task, epoch), nodes) in starts {
        assert_eq!(
            nodes.len(),
            1,
            "task #{task} epoch {epoch} started on {nodes:?}"
        );
    }
}

#[test]
fn steady_state_spreads_every_change_and_runs_every_task_once() {
    let o = run(small("steady", 30), 1);
    assert_holds(&o);
    assert!(o.tasks.accepted > 20, "{}", o.table());
    assert_eq!(o.tasks.succeeded, o.tasks.accepted, "{}", o.table());
    assert!(o.spread_ms().len() > 50, "too few spread samples");
    assert!(o.duplicate_ms.is_empty());
}

#[test]
fn overloaded_nodes_hand_work_to_the_mesh_and_unplaceable_tasks_wait_with_a_reason() {
    let (sim, o) = run_sim(small("overload", 30), 2);
    assert_holds(&o);
    assert!(
        o.tasks.pending_with_reason > 0,
        "the gpu tasks must wait with a reason: {}",
        o.table()
    );
    // Hot nodes are over the threshold from 20 s to 80 s: allow a load period and a
    // heartbeat for the mesh to learn it, then nothing may start there.
    let hot_starts: Vec<_> = sim
        .runs
        .instances
        .iter()
        .filter(|i| i.started_at > secs(22.0) && i.started_at < secs(80.0))
        .filter(|i| sim.group_name(i.node) == "hot")
        .collect();
    assert!(
        hot_starts.is_empty(),
        "tasks started on overloaded nodes: {hot_starts:?}"
    );
    // The light stream (stream 0): the burst's heavy tasks fill the edge targets to their
    // threshold and rightly go on to the others.
    let light: Vec<_> = sim
        .runs
        .instances
        .iter()
        .filter(|i| {
            sim.tasks
                .get(i.task as usize)
                .is_some_and(|t| t.stream == 0)
        })
        .collect();
    let edge = light
        .iter()
        .filter(|i| sim.group_name(i.node) == "edge")
        .count();
    assert!(
        edge * 2 > light.len(),
        "offload should prefer the edge-tagged targets: {edge} of {}",
        light.len()
    );
    // The burst of heavy tasks at 45 s spreads: placement counts what each target already
    // claimed on top of its published load, so no start pushes a target over its threshold.
    assert_eq!(
        o.over_threshold.1,
        0,
        "starts pushed a node over its CPU threshold: {}",
        o.table()
    );
    epochs_start_once(&sim);
}

#[test]
fn a_crashed_nodes_tasks_spread_over_the_survivors_with_one_claim_each() {
    let (sim, o) = run_sim(small("failover_spread", 24), 1);
    assert_holds(&o);
    let (moved, most) = o.herds.iter().copied().max().unwrap_or_default();
    assert!(moved >= 5, "the crash moved {moved} tasks: {}", o.table());
    // Before booking, every replica ranked the same survivor first for every task: all of
    // them went to it.
    assert!(
        most <= moved.div_ceil(23) + 1,
        "one survivor took {most} of {moved}: {}",
        o.table()
    );
    // One claim per move: no task needed a second epoch to land.
    assert!(
        sim.runs.instances.iter().all(|i| i.epoch <= 2),
        "{}",
        o.table()
    );
    epochs_start_once(&sim);
}

#[test]
fn an_owner_crash_fails_over_and_a_restarted_owner_never_resumes_its_epoch() {
    let (sim, o) = run_sim(small("owner_crash", 30), 3);
    assert_holds(&o);
    assert!(o.failover_ms.len() >= 3, "{}", o.table());
    epochs_start_once(&sim);
    assert!(
        sim.nodes.len() == 31,
        "the data-lost restart joins as a new identity"
    );
}

#[test]
fn a_healed_partition_converges_and_bounds_the_duplicate_window() {
    let o = run(small("partition", 30), 4);
    assert_holds(&o);
    // Owners cut off with the minority kept running while the majority failed over.
    assert!(
        !o.duplicate_ms.is_empty(),
        "the partition must cause duplicates: {}",
        o.table()
    );
    assert!(o.heal_converged_ms.is_some());
}

#[test]
fn an_owner_isolated_from_everyone_is_killed_by_its_guard_before_any_successor_starts() {
    // The two-way cut only (30 s to 45 s); arrivals stop at 40 s so every task has settled
    // when the run ends, soon after the heal.
    let mut s = small("isolated_owner", 20);
    s.faults.truncate(1);
    s.tasks[0].until_s = 40.0;
    s.duration_s = 60.0;
    let (sim, o) = run_sim(s.clone(), 8);
    assert_holds(&o);
    assert!(o.outlived_ms.is_empty(), "{}", o.table());
    // The cut-off owners' instances were killed by their guards and run again elsewhere.
    let taken_over = sim
        .runs
        .instances
        .iter()
        .filter(|i| i.expired)
        .filter(|k| {
            sim.runs
                .instances
                .iter()
                .any(|n| n.task == k.task && n.epoch > k.epoch && n.node != k.node)
        })
        .count();
    assert!(
        taken_over > 0,
        "no guard kill was taken over: {}",
        o.table()
    );
    assert!(o.guard_expiries.cut_off > 0, "{}", o.table());
    // The same seed without the guards: the cut-off owners run on past their leases, so the
    // check above can fail.
    let mut unguarded = s;
    unguarded.guard.enabled = false;
    let o = run(unguarded, 8);
    assert_eq!(o.guard_expiries.total, 0);
    assert!(
        !o.outlived_ms.is_empty(),
        "without guards the cut-off owners should run on: {}",
        o.table()
    );
}

#[test]
fn twenty_percent_loss_loses_no_task_and_runs_none_twice() {
    let o = run(small("loss", 30), 5);
    assert_holds(&o);
    assert!(o.traffic.lost > 1_000, "{}", o.table());
}

#[test]
fn a_rolling_restart_of_every_node_keeps_every_task() {
    let (sim, o) = run_sim(small("rolling_restart", 20), 6);
    assert_holds(&o);
    epochs_start_once(&sim);
    assert!(sim.crashes >= 20);
    assert!(!o.failover_ms.is_empty(), "{}", o.table());
}

#[test]
fn clock_drift_of_half_a_second_changes_nothing() {
    let o = run(small("drift", 30), 7);
    assert_holds(&o);
    assert!(!o.failover_ms.is_empty(), "{}", o.table());
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let mut s = small("loss", 20);
    s.duration_s = 40.0;
    let a = run(s.clone(), 11);
    let b = run(s.clone(), 11);
    let c = run(s, 12);
    assert_eq!(a.trace, b.trace, "same seed, different traces");
    assert_eq!(a.events, b.events);
    assert_eq!(a.spread_ms(), b.spread_ms());
    assert_eq!(a.traffic.gossip_bytes, b.traffic.gossip_bytes);
    assert_ne!(a.trace, c.trace, "another seed should give another trace");
}

#[test]
fn a_formed_mesh_starts_with_every_record_everywhere_and_fails_over_the_same() {
    let mut s = small("owner_crash", 40);
    s.formed = true;
    let sim = Sim::new(s.clone(), 4);
    assert_eq!(sim.traffic.published, 0, "forming sent gossip");
    for n in &sim.nodes {
        let r = n.replica.as_ref().unwrap();
        assert_eq!(
            r.state().node_count(),
            40,
            "node {} is missing records",
            n.id.short()
        );
        assert_eq!(r.digest(), sim.nodes[0].replica.as_ref().unwrap().digest());
    }
    let (sim, o) = run_sim(s, 4);
    assert_holds(&o);
    assert!(!o.failover_ms.is_empty(), "{}", o.table());
    epochs_start_once(&sim);
}

#[test]
fn the_simulator_keeps_the_replica_contract() {
    omesh_harness::conformance::run_all(|configs| {
        omesh_netsim::conformance::SimDriver::new(&configs, 7)
    });
}
