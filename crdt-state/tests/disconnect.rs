//! Disconnect policies on the harness mesh (whose guards kill an instance once its node's
//! `instance_deadline` less the margin has passed, as the peer's do): `stop_after` tasks never
//! run twice at once and run nowhere without a majority; `lost_after` tasks stay through
//! drops shorter than their window and move after it; a restarted owner re-attaches.
#![allow(clippy::unwrap_used)]

use omesh_harness as harness;

use harness::{spec_with, Mesh};
use omesh_protocol::{Disconnect, Millis, NodeId, TaskId};
use omesh_state::Input;

fn at_most_once(nonce: u64, stop_after_ms: u32) -> omesh_protocol::SignedTaskSpec {
    spec_with(nonce, |s| {
        s.timeout_ms = 0;
        s.disconnect = Disconnect {
            stop_after_ms: Some(stop_after_ms),
            lost_after_ms: None,
        };
    })
}

fn kept_through_drops(nonce: u64, lost_after_ms: u32) -> omesh_protocol::SignedTaskSpec {
    spec_with(nonce, |s| {
        s.timeout_ms = 0;
        s.disconnect = Disconnect {
            stop_after_ms: None,
            lost_after_ms: Some(lost_after_ms),
        };
    })
}

/// Cuts every link between the groups (each group stays whole).
fn split(m: &mut Mesh, groups: &[&[NodeId]]) {
    for (i, a) in groups.iter().enumerate() {
        for (j, b) in groups.iter().enumerate() {
            if i != j {
                for x in a.iter() {
                    for y in b.iter() {
                        m.cut.insert((*x, *y));
                    }
                }
            }
        }
    }
}

/// The longest time two instances of `task` ran at once (0: never), up to now.
fn overlap(m: &Mesh, task: TaskId) -> Millis {
    let spans: Vec<(Millis, Millis)> = m
        .instances
        .iter()
        .filter(|i| i.task == task)
        .map(|i| (i.started_at, i.stopped_at.unwrap_or(m.now)))
        .collect();
    let mut worst = 0;
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            let lo = a.0.max(b.0);
            let hi = a.1.min(b.1);
            worst = worst.max(hi.saturating_sub(lo));
        }
    }
    worst
}

fn running_one(m: &Mesh, task: TaskId) -> Option<(NodeId, u64)> {
    let r = m.runners(task);
    (r.len() == 1).then(|| r[0])
}

fn five() -> (Mesh, Vec<NodeId>) {
    let m = harness::joined(5, |_| {});
    let ids = m.ids();
    (m, ids)
}

#[test]
fn an_at_most_once_task_cut_off_in_a_minority_stops_before_the_majority_starts_it() {
    let (mut m, ids) = five();
    let task = m.submit(ids[0], at_most_once(1, 4_000));
    assert!(m.run_until(30_000, |m| running_one(m, task).is_some()));
    let (owner, epoch) = running_one(&m, task).unwrap();
    let mate = *ids.iter().find(|n| **n != owner).unwrap();
    let rest: Vec<NodeId> = ids
        .iter()
        .copied()
        .filter(|n| *n != owner && *n != mate)
        .collect();
    split(&mut m, &[&[owner, mate], &rest]);
    let moved = m.run_until(60_000, |m| {
        m.runners(task)
            .iter()
            .any(|(n, e)| rest.contains(n) && *e > epoch)
    });
    assert!(moved, "the majority side never took the task over");
    assert_eq!(overlap(&m, task), 0, "two instances ran at once");
    assert!(
        m.guard_kills
            .iter()
            .any(|(n, t, e, _)| (*n, *t, *e) == (owner, task, epoch)),
        "the minority owner's guard did not stop it: {:?}",
        m.guard_kills
    );
    // The minority side runs none of it while the cut lasts.
    m.run_for(20_000);
    assert!(m.runners(task).iter().all(|(n, _)| rest.contains(n)));
    m.heal();
    m.run_for(20_000);
    assert_eq!(overlap(&m, task), 0);
    assert_eq!(m.runners(task).len(), 1);
}

/// After the heal, the minority's stopped owner (whose view still shows the task unowned)
/// must not displace the instance the majority started: its claim needs promises first, and
/// the majority promised that epoch already. Before promises came first, its claim of the
/// same epoch won the tie-break and fenced the running instance (netsim `disc_partition`).
#[test]
fn a_healed_minority_owner_does_not_displace_the_majoritys_instance() {
    for nonce in 20..26 {
        let (mut m, ids) = five();
        let task = m.submit(ids[0], at_most_once(nonce, 4_000));
        assert!(m.run_until(30_000, |m| running_one(m, task).is_some()));
        let (owner, epoch) = running_one(&m, task).unwrap();
        let mate = *ids.iter().find(|n| **n != owner).unwrap();
        let rest: Vec<NodeId> = ids
            .iter()
            .copied()
            .filter(|n| *n != owner && *n != mate)
            .collect();
        split(&mut m, &[&[owner, mate], &rest]);
        assert!(m.run_until(60_000, |m| {
            m.runners(task)
                .iter()
                .any(|(n, e)| rest.contains(n) && *e > epoch)
        }));
        m.run_for(5_000);
        let successor = running_one(&m, task).unwrap();
        let started = m.instances.len();
        m.heal();
        m.run_for(20_000);
        assert_eq!(
            m.runners(task),
            vec![successor],
            "nonce {nonce}: the heal moved the task"
        );
        assert_eq!(m.instances.len(), started, "nonce {nonce}: started again");
    }
}

#[test]
fn an_at_most_once_task_runs_nowhere_in_a_three_way_split_and_once_after_it_heals() {
    let (mut m, ids) = five();
    let task = m.submit(ids[0], at_most_once(2, 4_000));
    assert!(m.run_until(30_000, |m| running_one(m, task).is_some()));
    split(&mut m, &[&ids[0..2], &ids[2..4], &ids[4..5]]);
    let none = m.run_until(30_000, |m| m.runners(task).is_empty());
    assert!(none, "a side without a majority still runs it");
    // And none starts it while the split lasts.
    let started = m.instances.len();
    m.run_for(30_000);
    assert!(m.runners(task).is_empty());
    assert_eq!(m.instances.len(), started, "a minority side started it");
    m.heal();
    assert!(m.run_until(60_000, |m| running_one(m, task).is_some()));
    assert_eq!(overlap(&m, task), 0);
}

#[test]
fn an_at_most_once_task_of_a_crashed_owner_moves_only_after_its_window() {
    let (mut m, ids) = five();
    let task = m.submit(ids[0], at_most_once(3, 5_000));
    assert!(m.run_until(30_000, |m| running_one(m, task).is_some()));
    let (owner, epoch) = running_one(&m, task).unwrap();
    let crashed_at = m.now;
    m.crash(owner);
    assert!(m.run_until(60_000, |m| m
        .runners(task)
        .iter()
        .any(|(n, e)| *n != owner && *e > epoch)));
    let next = m
        .instances
        .iter()
        .find(|i| i.task == task && i.epoch > epoch)
        .unwrap();
    assert!(
        next.started_at >= crashed_at + 5_000,
        "the successor started {} ms after the crash, within the 5 s window",
        next.started_at - crashed_at
    );
    assert_eq!(overlap(&m, task), 0);
    // Only the node that would take it over polls (each poll reaches every member).
    let pollers = ids
        .iter()
        .filter(|n| **n != owner && m.replica(**n).stats().polls > 0)
        .count();
    assert!((1..=2).contains(&pollers), "{pollers} nodes polled");
}

#[test]
fn a_lost_after_task_stays_through_a_shorter_drop_and_moves_after_a_longer_one() {
    let (mut m, ids) = five();
    let task = m.submit(ids[0], kept_through_drops(4, 10_000));
    assert!(m.run_until(30_000, |m| running_one(m, task).is_some()));
    let (owner, epoch) = running_one(&m, task).unwrap();
    let instance = m.instances.len();
    // A 6 s drop (three times the default's 2 s): nothing moves, nothing restarts.
    m.isolate(owner);
    m.run_for(6_000);
    m.heal();
    m.run_for(10_000);
    assert_eq!(running_one(&m, task), Some((owner, epoch)));
    assert_eq!(m.instances.len(), instance, "the task was restarted");
    // A 30 s drop: it moves once 10 s have passed, and the owner's guard stops it first.
    let cut_at = m.now;
    m.isolate(owner);
    assert!(m.run_until(40_000, |m| m
        .runners(task)
        .iter()
        .any(|(n, e)| *n != owner && *e > epoch)));
    let next = m
        .instances
        .iter()
        .find(|i| i.task == task && i.epoch > epoch)
        .unwrap();
    assert!(
        next.started_at >= cut_at + 10_000,
        "moved {} ms into the drop",
        next.started_at - cut_at
    );
    assert_eq!(overlap(&m, task), 0);
    m.heal();
}

#[test]
fn a_restarted_owner_adopts_its_lost_after_instance_at_a_new_epoch() {
    let (mut m, ids) = five();
    let task = m.submit(ids[0], kept_through_drops(5, 30_000));
    assert!(m.run_until(30_000, |m| running_one(m, task).is_some()));
    let (owner, epoch) = running_one(&m, task).unwrap();
    let instances = m.instances.len();
    // The peer process dies; its guard keeps the instance (the harness instance stays up).
    m.down.insert(owner);
    m.run_for(3_000);
    m.restart(owner, 2, |_| {});
    m.input(owner, Input::Adopt { task, epoch }).unwrap();
    let adopted = m.run_until(30_000, |m| {
        m.replica(owner).stats().adopted == 1
            && running_one(m, task).is_some_and(|(_, e)| e > epoch)
    });
    assert!(
        adopted,
        "the restarted owner did not take its instance over"
    );
    assert_eq!(running_one(&m, task).map(|(n, _)| n), Some(owner));
    assert_eq!(
        m.instances.len(),
        instances,
        "a second instance was started"
    );
    m.run_for(10_000);
    assert_eq!(m.instances.len(), instances);
    assert!(m.converged());
    let view = m.replica(ids[1]).task_view(m.now, &task).unwrap();
    assert_eq!(view.owner, Some(owner));
    assert!(view.lease_live);
    assert_eq!(view.state, omesh_protocol::TaskState::Running);
}

#[test]
fn an_owner_that_left_and_came_back_at_once_adopts_its_lost_after_instance_alone() {
    let (mut m, ids) = five();
    let task = m.submit(ids[0], kept_through_drops(7, 30_000));
    assert!(m.run_until(30_000, |m| running_one(m, task).is_some()));
    let (owner, epoch) = running_one(&m, task).unwrap();
    let instances = m.instances.len();
    // SIGTERM: the peer leaves (the instance is left to its guard) and an upgraded binary
    // starts at once, its lease at the new epoch racing its new record to the others, who
    // still hold the record that announced the leave.
    m.input(owner, Input::Leave).unwrap();
    m.run_for(300);
    m.down.insert(owner);
    m.restart(owner, 2, |_| {});
    m.input(owner, Input::Adopt { task, epoch }).unwrap();
    assert!(
        m.run_until(30_000, |m| m.replica(owner).stats().adopted == 1),
        "the restarted owner did not take its instance over"
    );
    m.run_for(10_000);
    assert_eq!(
        running_one(&m, task).map(|(n, _)| n),
        Some(owner),
        "another node took the adopted task over"
    );
    assert_eq!(
        m.instances.len(),
        instances,
        "a second instance was started"
    );
    assert!(m.converged());
}

/// The owner of a task leaves (a default task is handed over, a lost_after one stays) and its
/// next incarnation's lease at a new epoch reaches the others before its new record does:
/// each must count the lease held (the leave was the earlier incarnation's), and nobody
/// claims the task from it.
fn lease_of_the_next_incarnation_after_a_leave(spec: omesh_protocol::SignedTaskSpec) {
    use omesh_protocol::{DeltaBody, GossipMessage, Lease};
    let (mut m, ids) = five();
    let task = m.submit(ids[0], spec);
    assert!(m.run_until(30_000, |m| running_one(m, task).is_some()));
    let (owner, epoch) = running_one(&m, task).unwrap();
    m.input(owner, Input::Leave).unwrap();
    let witnesses: Vec<NodeId> = ids.iter().copied().filter(|n| *n != owner).collect();
    assert!(m.run_until(5_000, |m| witnesses.iter().all(|w| m
        .replica(*w)
        .state()
        .node(&owner)
        .is_some_and(|r| r.leaving))));
    m.crash(owner);
    let epoch = m
        .replica(witnesses[0])
        .task_view(m.now, &task)
        .unwrap()
        .epoch
        .max(epoch);
    let i = (1..=5).find(|i| harness::node(*i) == owner).unwrap();
    let lease = Lease {
        epoch: epoch + 1,
        owner,
        incarnation: 2,
        score: 0,
        ttl_ms: 3_000,
        released: false,
    };
    let delta = harness::fixtures::signed(i, 2 << 32 | 1, DeltaBody::Lease { task, lease });
    for w in &witnesses {
        m.input(
            *w,
            Input::Gossip {
                via: owner,
                msg: GossipMessage {
                    deltas: vec![delta.clone()],
                },
            },
        )
        .unwrap();
    }
    for w in &witnesses {
        let view = m.replica(*w).task_view(m.now, &task).unwrap();
        assert_eq!((view.owner, view.epoch), (Some(owner), epoch + 1));
        assert!(view.lease_live, "{w:?} counts the new lease lost");
    }
    // Well within the owner's ttl: nobody claims the task from it.
    m.run_for(300);
    let runners = m.runners(task);
    assert!(runners.iter().all(|(_, e)| *e <= epoch), "{runners:?}");
}

#[test]
fn a_lease_of_the_incarnation_after_a_leave_holds_before_its_record_arrives() {
    lease_of_the_next_incarnation_after_a_leave(kept_through_drops(8, 30_000));
    lease_of_the_next_incarnation_after_a_leave(spec_with(9, |s| s.timeout_ms = 0));
}

#[test]
fn an_adopted_instance_of_a_task_that_moved_on_is_stopped() {
    let (mut m, ids) = five();
    let task = m.submit(ids[0], kept_through_drops(6, 2_000));
    assert!(m.run_until(30_000, |m| running_one(m, task).is_some()));
    let (owner, epoch) = running_one(&m, task).unwrap();
    m.crash(owner);
    assert!(m.run_until(60_000, |m| m
        .runners(task)
        .iter()
        .any(|(n, e)| *n != owner && *e > epoch)));
    m.restart(owner, 2, |_| {});
    m.input(owner, Input::Adopt { task, epoch }).unwrap();
    // It answers with a stop of the old epoch (the harness answers Stopped).
    assert!(m.run_until(30_000, |m| m
        .stops
        .iter()
        .any(|(n, t, e, _)| (*n, *t, *e) == (owner, task, epoch))));
    assert_eq!(m.replica(owner).stats().adopted, 0);
}

#[test]
fn a_stop_after_shorter_than_the_mesh_can_hold_stays_pending_with_the_reason() {
    let (mut m, ids) = five();
    let task = m.submit(ids[0], at_most_once(8, 2_000));
    m.run_for(15_000);
    assert!(m.runners(task).is_empty());
    let view = m.replica(ids[0]).task_view(m.now, &task).unwrap();
    let why = view.pending_reason.unwrap_or_default();
    assert!(why.contains("stop_after of 2000 ms"), "{why}");
}

#[test]
fn polls_about_an_owner_the_members_hear_cut_nothing_off() {
    let (mut m, ids) = five();
    let task = m.submit(ids[0], at_most_once(7, 4_000));
    assert!(m.run_until(30_000, |m| running_one(m, task).is_some()));
    let (owner, epoch) = running_one(&m, task).unwrap();
    let hostile = *ids.iter().find(|n| **n != owner).unwrap();
    // A member (say, a hostile one) polls everyone about the healthy owner, asking for no
    // quiet at all and the longest hold, again and again.
    for round in 0..20u64 {
        for to in ids.iter().filter(|n| **n != owner && **n != hostile) {
            let probe = omesh_protocol::Probe::Poll {
                nonce: round,
                about: owner,
                hold_ms: u32::MAX,
                quiet_ms: 0,
            };
            let _ = m.input(
                *to,
                Input::Probe {
                    from: hostile,
                    probe,
                },
            );
        }
        m.run_for(1_000);
    }
    assert_eq!(running_one(&m, task), Some((owner, epoch)));
    assert!(m.guard_kills.is_empty(), "{:?}", m.guard_kills);
}

#[test]
fn a_fresh_mesh_claims_its_first_at_most_once_task_once_its_nodes_may_promise() {
    let (mut m, ids) = five();
    // Submitted while every node is in its first 8 s, when it promises nothing.
    let task = m.submit(ids[0], at_most_once(9, 4_000));
    assert!(m.run_until(30_000, |m| running_one(m, task).is_some()));
    let refused: u64 = ids
        .iter()
        .map(|n| m.replica(*n).stats().confirms_refused)
        .sum();
    assert_eq!(refused, 0, "claims were handed back unconfirmed");
    assert_eq!(running_one(&m, task).map(|(_, e)| e), Some(1));
}
