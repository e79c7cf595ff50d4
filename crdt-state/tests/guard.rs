//! The guard's deadline (`Replica::leases_hold_until`) and what an expired instance does,
//! on the harness mesh, whose guards kill an instance once its node's deadline less the
//! margin has passed, as the peer's do.
#![allow(clippy::unwrap_used)]

use omesh_harness as harness;

use harness::{node, owner_of, spec, Mesh};
use omesh_protocol::{Epoch, Millis, NodeId, TaskId};

/// When the instance of `task` at `epoch` on `id` started and stopped.
fn span(m: &Mesh, id: NodeId, task: TaskId, epoch: Epoch) -> (Millis, Option<Millis>) {
    let i = m
        .instances
        .iter()
        .find(|i| i.node == id && i.task == task && i.epoch == epoch)
        .unwrap();
    (i.started_at, i.stopped_at)
}

/// A 3-node mesh running one task; its owner is cut off from everyone. Returns the mesh,
/// the task, its owner and epoch, and whether a successor started within 20 s.
fn isolate_owner(guards: bool) -> (Mesh, TaskId, NodeId, Epoch, bool) {
    let mut m = harness::joined(3, |_| {});
    if !guards {
        m.guard_margin = None;
    }
    let task = m.submit(node(1), spec(7));
    assert!(m.run_until(5_000, |m| owner_of(m, task).is_some()));
    let (owner, epoch) = owner_of(&m, task).unwrap();
    assert!(m.run_until(5_000, |m| m.running_on(owner, task) == Some(epoch)));
    m.isolate(owner);
    let moved = m.run_until(20_000, |m| {
        m.runners(task)
            .iter()
            .any(|(n, e)| *n != owner && *e > epoch)
    });
    (m, task, owner, epoch, moved)
}

#[test]
fn an_owner_cut_off_from_everyone_is_stopped_by_its_guard_before_a_successor_starts() {
    let (m, task, owner, epoch, moved) = isolate_owner(true);
    assert!(moved, "the task did not move away from the cut-off owner");
    let (_, stopped) = span(&m, owner, task, epoch);
    let stopped = stopped.expect("the cut-off owner's instance still runs");
    assert!(
        m.guard_kills.contains(&(owner, task, epoch, stopped)),
        "it was not its guard that stopped it: {:?}",
        m.guard_kills
    );
    let (next, next_epoch) = m
        .runners(task)
        .into_iter()
        .find(|(n, e)| *n != owner && *e > epoch)
        .unwrap();
    let (started, _) = span(&m, next, task, next_epoch);
    assert!(
        stopped < started,
        "epoch {epoch} stopped at {stopped} ms, epoch {next_epoch} started at {started} ms"
    );
}

#[test]
fn without_guards_the_cut_off_owner_runs_beside_its_successor() {
    // The same fault and seed with the guard model off: the overlap the guard removes.
    let (m, task, owner, epoch, moved) = isolate_owner(false);
    assert!(moved);
    assert_eq!(
        m.running_on(owner, task),
        Some(epoch),
        "two instances at once"
    );
    assert!(m.guard_kills.is_empty());
}

#[test]
fn an_expired_instance_hands_its_lease_back_and_counts_no_failed_attempt() {
    let (mut m, task, owner, epoch, moved) = isolate_owner(true);
    assert!(moved);
    assert_eq!(m.replica(owner).stats().guard_expiries, 1);
    m.heal();
    assert!(m.run_until(20_000, |m| m.converged()));
    for id in m.ids() {
        let v = m.replica(id).task_view(m.now, &task).unwrap();
        assert_eq!(
            v.failed_attempts, 0,
            "{id}: the expiry counted as a failure"
        );
        assert!(v.epoch > epoch);
    }
    // One instance runs, of the current epoch.
    let runners = m.runners(task);
    assert_eq!(runners.len(), 1, "{runners:?}");
}

#[test]
fn the_deadline_moves_with_round_trips_and_stops_when_cut_off() {
    let mut m = harness::joined(3, |_| {});
    let a = node(1);
    let window = {
        let c = m.replica(a).config();
        c.heartbeat_ms + c.lease_ttl_ms + c.lease_grace_ms
    };
    let period = m.replica(a).config().heartbeat_ms;
    m.run_for(5_000);
    // Healthy: at most a couple of probe periods behind a full window from now.
    for _ in 0..20 {
        m.run_for(period / 2);
        let ahead = m.replica(a).leases_hold_until(m.now) - m.now;
        assert!(
            ahead + 2 * period + 50 >= window && ahead <= window,
            "{ahead} ms ahead (window {window} ms)"
        );
    }
    m.isolate(a);
    let frozen = m.replica(a).leases_hold_until(m.now);
    m.run_for(3 * window);
    // Cut off (no answer can come): the deadline stays where the last round trip put it.
    let later = m.replica(a).leases_hold_until(m.now);
    assert!(
        later <= frozen + period,
        "moved from {frozen} to {later} while cut off"
    );
    m.heal();
    assert!(m.run_until(10_000, |m| {
        m.replica(a).leases_hold_until(m.now) > m.now + window / 2
    }));
}

#[test]
fn dead_peers_in_the_probe_rotation_cost_no_live_owner_its_instance() {
    let mut m = harness::joined(5, |_| {});
    let task = m.submit(node(1), spec(11));
    assert!(m.run_until(5_000, |m| owner_of(m, task).is_some()));
    let (owner, epoch) = owner_of(&m, task).unwrap();
    assert!(m.run_until(5_000, |m| m.running_on(owner, task) == Some(epoch)));
    // Two of the other four die: the owner's pings to them go unanswered, period after
    // period, suspected and then gone. Its answered pings to the others, and the extra ping
    // it sends when a target does not answer, keep its deadline ahead.
    let dead: Vec<NodeId> = m
        .ids()
        .into_iter()
        .filter(|id| *id != owner)
        .take(2)
        .collect();
    for d in &dead {
        m.crash(*d);
    }
    m.run_for(60_000);
    assert!(m.guard_kills.is_empty(), "guard kills: {:?}", m.guard_kills);
    assert_eq!(m.running_on(owner, task), Some(epoch));
}
