//! Five real peers on loopback: join, agree, notice a `kill -9`, take the peer back.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{dump, wait_until, Node};

async fn all_agree(nodes: &[&Node], alive: usize) -> bool {
    let mut digests = Vec::new();
    for n in nodes {
        let Some(s) = n.status().await else {
            return false;
        };
        if !s.ready || s.peers_alive != alive {
            return false;
        }
        digests.push(s.digest);
    }
    digests.windows(2).all(|w| w[0] == w[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_peers_converge_detect_a_kill_and_take_the_peer_back() {
    let root = tempfile::tempdir().unwrap();
    let seed = Node::start(root.path(), "seed", &[], &["--alone", "true"]);
    let seeds = vec![seed.addr()];
    let mut others: Vec<Node> = (1..=4)
        .map(|i| Node::start(root.path(), &format!("n{i}"), &seeds, &[]))
        .collect();

    let ok = {
        let all: Vec<&Node> = std::iter::once(&seed).chain(others.iter()).collect();
        wait_until(Duration::from_secs(60), || all_agree(&all, 5)).await
    };
    if !ok {
        dump(
            &std::iter::once(&seed)
                .chain(others.iter())
                .collect::<Vec<_>>(),
        );
    }
    assert!(
        ok,
        "5 peers did not all report 5 alive peers with equal digests"
    );

    // kill -9 one peer: the others report it gone.
    let victim_id = others[3].status().await.unwrap().node_id;
    others[3].kill9();
    let killed = Instant::now();
    let survivors: Vec<&Node> = std::iter::once(&seed).chain(others[..3].iter()).collect();
    let gone = wait_until(Duration::from_secs(30), || async {
        for n in &survivors {
            let Some(peers) = n.peers().await else {
                return false;
            };
            if !peers
                .iter()
                .any(|p| p.id == victim_id && p.health == "gone")
            {
                return false;
            }
        }
        true
    })
    .await;
    assert!(gone, "survivors did not report the killed peer gone");
    println!(
        "killed peer reported gone by all survivors after {:?}",
        killed.elapsed()
    );
    assert!(wait_until(Duration::from_secs(30), || all_agree(&survivors, 4)).await);

    // Restart it from the same data dir: same id, higher incarnation, digests equal again.
    others[3].restart();
    let back = {
        let all: Vec<&Node> = std::iter::once(&seed).chain(others.iter()).collect();
        wait_until(Duration::from_secs(60), || async {
            if !all_agree(&all, 5).await {
                return false;
            }
            for n in &all {
                let Some(peers) = n.peers().await else {
                    return false;
                };
                if !peers
                    .iter()
                    .any(|p| p.id == victim_id && p.incarnation == 2 && p.health == "alive")
                {
                    return false;
                }
            }
            true
        })
        .await
    };
    if !back {
        dump(
            &std::iter::once(&seed)
                .chain(others.iter())
                .collect::<Vec<_>>(),
        );
    }
    assert!(back, "the restarted peer did not rejoin with incarnation 2");
    assert_eq!(others[3].status().await.unwrap().node_id, victim_id);

    // A graceful stop exits 0 and the others see it leave at once (no ttl wait).
    let leaver_id = others[0].status().await.unwrap().node_id;
    let st = others[0]
        .terminate()
        .expect("omesh did not exit after SIGTERM");
    assert!(st.success(), "exit status after SIGTERM: {st:?}");
    let left = wait_until(Duration::from_secs(10), || async {
        seed.peers()
            .await
            .is_some_and(|p| p.iter().any(|p| p.id == leaver_id && p.health == "gone"))
    })
    .await;
    assert!(left, "the seed did not see the graceful leave");
}
