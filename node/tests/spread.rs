//! Placement spreads work on real peers: the tasks of a killed owner go to the survivors by
//! free capacity, not all to the one that ranked best (issue #18: before, all 8 tasks of a
//! killed peer went to one survivor).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{dump, running_with, wait_until, Node, Submitter};

/// Flags of every peer here: the same fake CPU figure on each, so host load (which every
/// peer on this host reads alike, at different instants) does not decide the spread.
fn flags(sub: &Submitter) -> Vec<String> {
    let mut f = sub.flags();
    f.extend(["--fake-cpu-percent".into(), "10".into()]);
    f
}

/// (state, epoch, owner) of each task as `node` sees it.
async fn views(node: &Node, ids: &[String]) -> Vec<Option<(String, u64, Option<String>)>> {
    let mut out = Vec::new();
    for id in ids {
        out.push(node.task(id).await.map(|t| (t.state, t.epoch, t.owner)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owners_nine_tasks_spread_over_three_survivors() {
    const TASKS: usize = 9;
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let mut f = flags(&sub);
    f.extend(["--alone".into(), "true".into()]);
    let refs: Vec<&str> = f.iter().map(String::as_str).collect();
    // The owner-to-be runs alone at first, so that every task lands on it.
    let mut owner = Node::start(root.path(), "owner", &[], &refs);
    let mut owner_id = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while owner_id.is_empty() && Instant::now() < deadline {
        owner_id = owner.node_id().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!owner_id.is_empty(), "the owner's API did not answer");
    let marker = format!("omesh-spread-{}", rand::random::<u32>());
    let mut ids = Vec::new();
    for i in 0..TASKS {
        let spec = sub.spec(
            &["sh", "-c", &format!("sleep 300; echo {marker}-{i}")],
            |_| {},
        );
        ids.push(sub.submit(&owner, &spec).await);
    }
    let all_on_owner = wait_until(Duration::from_secs(60), || async {
        views(&owner, &ids).await.iter().all(|v| {
            v.as_ref()
                .is_some_and(|(s, e, o)| s == "running" && *e == 1 && o.as_ref() == Some(&owner_id))
        })
    })
    .await;
    assert!(all_on_owner, "the lone owner did not run all {TASKS} tasks");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            running_with(&marker) == TASKS
        })
        .await
    );

    // Three survivors-to-be join it and learn its tasks.
    let refs: Vec<String> = flags(&sub);
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
            let seen = views(n, &ids).await;
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
        views(&survivors[0], &ids).await.iter().all(|v| {
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
        let first = views(&survivors[0], &ids).await;
        for n in &survivors[1..] {
            if views(n, &ids).await != first {
                return false;
            }
        }
        true
    })
    .await;
    assert!(agreed, "the survivors disagree on the tasks");
    let after = views(&survivors[0], &ids).await;
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
