//! `omesh demo`: a local mesh of three peers that shows offload and failover with no set-up.
//!
//! peer0 reports itself over its CPU threshold; peer1 and peer2 carry the `edge` tag that the
//! mesh offloads to. A batch of CPU-heavy tasks is submitted to peer0, they run on the edge
//! peers, the owner of a running task is killed with SIGKILL, and the task fails over.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use omesh_protocol::{ExecutorKind, TaskSpec};

use crate::api::{SubmitBody, TaskJson};
use crate::client::table;
use crate::localmesh::LocalMesh;

const TOKEN: &str = "omesh-demo";

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Tasks to submit.
    pub tasks: usize,
    /// Seconds of CPU each task burns.
    pub burn_secs: u64,
    /// Keep the mesh running after the summary, until Ctrl-C.
    pub keep: bool,
}

fn say(msg: impl AsRef<str>) {
    println!("==> {}", msg.as_ref());
}

fn name_of(ids: &BTreeMap<String, String>, id: Option<&str>) -> String {
    id.and_then(|i| ids.get(i).cloned())
        .unwrap_or_else(|| "-".into())
}

/// A deterministic-enough busy loop in POSIX sh that burns one core for `secs` seconds.
fn burn_command(secs: u64, n: usize) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "end=$(( $(date +%s) + {secs} )); i=0; while [ $(date +%s) -lt $end ]; do i=$((i+1)); done; echo task {n} burned {secs}s on epoch $OMESH_EPOCH"
        ),
    ]
}

/// Runs the demo with peers started from `bin` under `root`.
pub async fn run(bin: &Path, root: &Path, opts: &DemoOptions) -> Result<(), String> {
    let started = Instant::now();
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let submitter = hex::encode(key.verifying_key().to_bytes());
    say("starting 3 peers on 127.0.0.1 (child processes)");
    let mut mesh = LocalMesh::start(bin, root, 3, |i| {
        let mut f: Vec<String> = vec![
            "--authorized-submitter".into(),
            submitter.clone(),
            "--api-token".into(),
            TOKEN.into(),
            "--target-node-tag".into(),
            "edge".into(),
            // The demo shows CPU-driven offload; the host's memory is not its subject.
            "--threshold-memory".into(),
            "100".into(),
            // The process executor, so the demo needs no image (Docker runs the same lifecycle
            // when tasks ask for it; see the tests).
            "--executor".into(),
            "process".into(),
            "--fake-cpu-percent".into(),
            if i == 0 { "95".into() } else { "20".into() },
        ];
        if i > 0 {
            f.extend(["--tag".into(), "edge".into()]);
        }
        f
    })
    .map_err(|e| format!("cannot start peers: {e}"))?;
    let took = mesh.wait_converged(Duration::from_secs(60)).await?;
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for (i, p) in mesh.peers.iter().enumerate() {
        if let Ok(s) = p.client().status().await {
            names.insert(s.node_id, format!("peer{i}"));
        }
    }
    say(format!(
        "mesh converged in {:.1}s: every peer sees 3 alive and the same state digest",
        took.as_secs_f64()
    ));
    for (i, p) in mesh.peers.iter().enumerate() {
        let role = if i == 0 {
            "over its CPU threshold (reports 95%)"
        } else {
            "tag edge, reports 20% CPU"
        };
        println!("    peer{i}  API http://{}  {role}", p.api());
    }

    let seed = mesh.peers[0].client();
    say(format!(
        "submitting {} CPU-heavy tasks ({}s each) to peer0",
        opts.tasks, opts.burn_secs
    ));
    let mut ids = Vec::new();
    let mut submitted_at = BTreeMap::new();
    for n in 0..opts.tasks {
        let spec = TaskSpec {
            image: format!("demo/burn@sha256:{}", "0".repeat(64)),
            command: burn_command(opts.burn_secs, n),
            env: BTreeMap::new(),
            cpu_millis: 250,
            memory_bytes: 16 << 20,
            required_tags: Default::default(),
            priority: 0,
            max_attempts: 3,
            timeout_ms: 120_000,
            executor: ExecutorKind::Process,
            nonce: rand::random(),
            submitter: [0; 32],
        }
        .sign(&key);
        let body =
            serde_json::to_value(SubmitBody::from_signed(&spec)).map_err(|e| e.to_string())?;
        let resp: serde_json::Value = seed
            .send(
                reqwest::Method::POST,
                "/api/v1/tasks",
                Some(TOKEN),
                Some(&body),
            )
            .await
            .map_err(|e| e.to_string())?;
        let id = resp["id"].as_str().unwrap_or_default().to_owned();
        submitted_at.insert(id.clone(), Instant::now());
        ids.push(id);
    }

    // Wait until they all run somewhere, and show where.
    let deadline = Instant::now() + Duration::from_secs(60);
    let victim = loop {
        let tasks = seed.tasks().await.map_err(|e| e.to_string())?;
        let running: Vec<&TaskJson> = tasks.iter().filter(|t| t.state == "running").collect();
        if running.len() >= opts.tasks.min(2) {
            say("offload: peer0 is over its threshold, so the edge peers claimed the tasks");
            let rows: Vec<Vec<String>> = tasks
                .iter()
                .map(|t| {
                    vec![
                        t.id[..12].to_owned(),
                        t.state.clone(),
                        name_of(&names, t.owner.as_deref()),
                        t.epoch.to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                indent(&table(&["TASK", "STATE", "OWNER", "EPOCH"], &rows))
            );
            break running[0].clone();
        }
        if Instant::now() > deadline {
            return Err("tasks did not start within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Kill the owner of a running task.
    let owner = victim.owner.clone().unwrap_or_default();
    let owner_name = name_of(&names, Some(&owner));
    let idx = owner_name
        .trim_start_matches("peer")
        .parse::<usize>()
        .unwrap_or(1);
    say(format!(
        "failover: kill -9 {owner_name}, owner of task {} (epoch {})",
        &victim.id[..12],
        victim.epoch
    ));
    if let Some(p) = mesh.peers.get_mut(idx) {
        p.kill9();
    }
    let killed = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t: TaskJson = seed
            .get(&format!("/api/v1/tasks/{}", victim.id))
            .await
            .map_err(|e| e.to_string())?;
        if t.epoch > victim.epoch
            && t.owner.as_deref() != Some(owner.as_str())
            && t.state != "pending"
        {
            say(format!(
                "task {} is {} again on {} with epoch {} after {:.1}s (lease ttl + grace, then a new claim)",
                &t.id[..12],
                t.state,
                name_of(&names, t.owner.as_deref()),
                t.epoch,
                killed.elapsed().as_secs_f64()
            ));
            break;
        }
        if Instant::now() > deadline {
            return Err("no failover within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Wait for every task to end, then summarise.
    say("waiting for every task to finish");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut done_at: BTreeMap<String, Duration> = BTreeMap::new();
    let tasks = loop {
        let tasks = seed.tasks().await.map_err(|e| e.to_string())?;
        for t in &tasks {
            if matches!(t.state.as_str(), "succeeded" | "failed" | "cancelled")
                && !done_at.contains_key(&t.id)
            {
                let since = submitted_at
                    .get(&t.id)
                    .map_or(Duration::ZERO, Instant::elapsed);
                done_at.insert(t.id.clone(), since);
            }
        }
        if done_at.len() >= ids.len() {
            break tasks;
        }
        if Instant::now() > deadline {
            return Err("tasks did not finish within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    say("summary");
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            let epochs: Vec<String> = t
                .history
                .iter()
                .map(|h| {
                    format!(
                        "{}:{}@{}",
                        h.epoch,
                        h.state,
                        name_of(&names, Some(&h.reporter))
                    )
                })
                .collect();
            vec![
                t.id[..12].to_owned(),
                format!("{}({})", t.state, t.code),
                name_of(&names, t.owner.as_deref()),
                t.epoch.to_string(),
                epochs.join(" "),
                done_at
                    .get(&t.id)
                    .map_or("-".into(), |d| format!("{:.1}s", d.as_secs_f64())),
            ]
        })
        .collect();
    print!(
        "{}",
        indent(&table(
            &[
                "TASK",
                "RESULT",
                "RAN ON",
                "EPOCH",
                "EPOCH HISTORY",
                "SUBMIT->DONE"
            ],
            &rows
        ))
    );
    let ok = tasks.iter().filter(|t| t.state == "succeeded").count();
    say(format!(
        "{ok}/{} tasks succeeded, none ran on the overloaded peer0, {} failed over; demo took {:.1}s",
        ids.len(),
        tasks.iter().filter(|t| t.epoch > 1).count(),
        started.elapsed().as_secs_f64()
    ));
    if opts.keep {
        say("mesh kept running; Ctrl-C to stop it");
        let api = mesh.peers[0].api();
        println!("    try: omesh peers --api {api}   omesh tasks --api {api}   curl http://{api}/metrics");
        let _ = tokio::signal::ctrl_c().await;
    }
    say("stopping the mesh");
    mesh.stop_all();
    if ok == ids.len() {
        Ok(())
    } else {
        Err(format!(
            "{} of {} tasks did not succeed",
            ids.len() - ok,
            ids.len()
        ))
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
