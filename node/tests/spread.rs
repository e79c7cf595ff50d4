//! Placement spreads work on real peers: the tasks of a killed owner go to the survivors by
//! free capacity, not all to the one that ranked best (issue #18: before, all 8 tasks of a
//! killed peer went to one survivor).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    dump, fake_cpu_flags, lone_owner, running_with, task_views, wait_until, LoneOwner, Node,
    Submitter,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owners_nine_tasks_spread_over_three_survivors() {
    const TASKS: usize = 9;
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    // The owner-to-be runs alone at first, so that every task lands on it.
    let LoneOwner {
        node: mut owner,
        id: owner_id,
        tasks: ids,
        marker,
    } = lone_owner(root.path(), &sub, "owner", "spread", TASKS, 300).await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            running_with(&marker) == TASKS
        })
        .await
    );

    // Three survivors-to-be join it and learn its tasks.
    let refs: Vec<String> = fake_cpu_flags(&sub);
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    let survivors: Vec<Node> = (0..3)
        .map(|i| Node::start(root.path(), &format!("s{i}"), &[owner.addr()], &refs))
        .collect();
    let joined = wait_until(Duration::from_secs(60), || async {
        for n in survivors.iter().chain(std::iter::once(&owner)) {
            match n.status().await {
                Some(s) if s.ready && s.peers_alive == 4 => {}
                _ => return false,
            }
        }
        for n in &survivors {
            let seen = task_views(n, &ids).await;
            if !seen
                .iter()
                .all(|v| v.as_ref().is_some_and(|(s, _, _)| s == "running"))
            {
                return false;
            }
        }
        true
    })
    .await;
    if !joined {
        let mut all: Vec<&Node> = survivors.iter().collect();
        all.push(&owner);
        dump(&all);
    }
    assert!(joined, "the survivors did not join and learn the tasks");

    owner.kill9();
    let moved = wait_until(Duration::from_secs(60), || async {
        task_views(&survivors[0], &ids).await.iter().all(|v| {
            v.as_ref().is_some_and(|(s, e, o)| {
                s == "running" && *e >= 2 && o.as_ref().is_some_and(|o| *o != owner_id)
            })
        })
    })
    .await;
    if !moved {
        dump(&survivors.iter().collect::<Vec<_>>());
    }
    assert!(moved, "the killed owner's tasks did not all move");
    // Every survivor agrees on the new owners.
    let agreed = wait_until(Duration::from_secs(20), || async {
        let first = task_views(&survivors[0], &ids).await;
        for n in &survivors[1..] {
            if task_views(n, &ids).await != first {
                return false;
            }
        }
        true
    })
    .await;
    assert!(agreed, "the survivors disagree on the tasks");
    let after = task_views(&survivors[0], &ids).await;
    let mut per_owner: BTreeMap<String, usize> = BTreeMap::new();
    for (_, epoch, o) in after.iter().flatten() {
        // One claim per task: no extra epochs spent on a claim storm.
        assert_eq!(
            *epoch, 2,
            "a task took more than one claim to move: {after:?}"
        );
        *per_owner.entry(o.clone().unwrap_or_default()).or_default() += 1;
    }
    println!("tasks per survivor after the kill: {per_owner:?}");
    assert!(
        per_owner.values().all(|n| *n <= 4),
        "a survivor took more than 4 of the {TASKS} tasks: {per_owner:?}"
    );
    assert_eq!(per_owner.values().sum::<usize>(), TASKS);
    // One instance per task: the killed owner's died with it, each moved task runs once.
    assert!(
        wait_until(Duration::from_secs(20), || async {
            running_with(&marker) == TASKS
        })
        .await,
        "{} instances run for {TASKS} tasks",
        running_with(&marker)
    );
    for mut n in survivors {
        n.terminate();
    }
}
