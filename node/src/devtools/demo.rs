//! `omesh demo`: a local mesh of three peers that shows offload and failover with no set-up.
//!
//! peer0 reports itself over its CPU threshold; peer1 and peer2 carry the `edge` tag that the
//! mesh offloads to. A batch of CPU-heavy tasks is submitted to peer0, they run on the edge
//! peers, the owner of a running task is killed with SIGKILL, and the task fails over; the
//! killed peer then restarts from its data directory and rejoins.
//!
//! With a Docker engine (and Debian's busybox-static to build an image from, as no registry
//! is assumed) the tasks are containers: the demo builds a small image, imports it into
//! peer0's blob store only and removes it from the engine, so each edge peer must fetch it
//! from peer0 (or from each other) over the QUIC data plane before it can run a task.
//! Without Docker the tasks run with the process executor.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use omesh_protocol::{ExecutorKind, TaskSpec};

use crate::api::{SubmitBody, TaskJson};
use crate::cli::client::table;
use crate::devtools::bench_blobs::blob_bytes;
use crate::devtools::bench_tasks::run_cmd;
use crate::devtools::localmesh::LocalMesh;

const TOKEN: &str = "omesh-demo";
/// The repository of the demo image (its tag is unique to each run).
const IMAGE_REPO: &str = "omesh-demo/burn";

/// Which executor the demo's tasks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoExecutor {
    /// Docker when an engine answers and the image can be built, else processes.
    Auto,
    /// Docker, or fail.
    Docker,
    /// The process executor.
    Process,
}

impl std::str::FromStr for DemoExecutor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "docker" => Ok(Self::Docker),
            "process" => Ok(Self::Process),
            other => Err(format!(
                "unknown executor {other:?} (expected auto, docker or process)"
            )),
        }
    }
}

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Tasks to submit.
    pub tasks: usize,
    /// Seconds of CPU each task burns.
    pub burn_secs: u64,
    /// Keep the mesh running after the summary, until Ctrl-C.
    pub keep: bool,
    /// Which executor runs the tasks.
    pub executor: DemoExecutor,
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

/// The demo's own image: built here, held by peer0's store only.
struct DemoImage {
    tag: String,
    /// `sha256:<hex>`.
    id: String,
}

impl DemoImage {
    /// `omesh-demo/burn@sha256:<hex>`, what the tasks pin.
    fn reference(&self) -> String {
        format!("{IMAGE_REPO}@{}", self.id)
    }

    /// Builds the image in the engine (a static busybox, `docker import`ed).
    fn build() -> Result<Self, String> {
        let tag = format!("{IMAGE_REPO}:{:08x}", rand::random::<u32>());
        crate::devtools::bench_tasks::import_busybox_image(&tag)?;
        let id = crate::devtools::bench_tasks::image_id(&tag)
            .ok_or_else(|| format!("{tag} not in the engine after docker import"))?;
        Ok(Self { tag, id })
    }

    /// Imports it into the store of the peer whose data directory is `data`, with the CLI an
    /// operator would use, then removes it from the engine.
    fn hand_to(&self, bin: &Path, data: &Path) -> Result<(), String> {
        run_cmd(
            Command::new(bin)
                .args(["image", "import", "--from-docker", &self.tag, "--data-dir"])
                .arg(data),
        )?;
        docker(&["rmi", &self.tag])?;
        if crate::devtools::bench_tasks::image_id(&self.id).is_some() {
            return Err(format!(
                "{} is still in the engine after docker rmi",
                self.id
            ));
        }
        Ok(())
    }

    /// Removes what the demo left in the engine: containers of its peers, and the image.
    fn clean(&self, nodes: &[String]) {
        for node in nodes {
            if let Ok(ids) = docker(&[
                "ps",
                "-aq",
                "--filter",
                &format!("label={}={node}", crate::exec::docker::LABEL_NODE),
            ]) {
                for id in ids.split_whitespace() {
                    let _ = docker(&["rm", "-f", id]);
                }
            }
        }
        let _ = docker(&["rmi", "-f", &self.tag]);
        let _ = docker(&["rmi", "-f", &self.id]);
    }
}

/// Runs the docker CLI; its stdout.
fn docker(args: &[&str]) -> Result<String, String> {
    run_cmd(Command::new("docker").args(args))
}

/// Containers of `task` at `epoch` (their states), as the engine lists them.
fn containers_of(task: &str, epoch: u64) -> Vec<String> {
    use crate::exec::docker::{LABEL_EPOCH, LABEL_TASK};
    docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label={LABEL_TASK}={task}"),
        "--filter",
        &format!("label={LABEL_EPOCH}={epoch}"),
        "--format",
        "{{.State}}",
    ])
    .map(|s| s.lines().map(str::to_owned).collect())
    .unwrap_or_default()
}

/// Decides the executor: the demo image when Docker is used.
async fn choose(executor: DemoExecutor) -> Result<Option<DemoImage>, String> {
    if executor == DemoExecutor::Process {
        return Ok(None);
    }
    let why = match crate::exec::docker::connect_engine().await {
        Ok(_) => match DemoImage::build() {
            Ok(image) => return Ok(Some(image)),
            Err(e) => format!("cannot build the demo image: {e}"),
        },
        Err(e) => e.to_string(),
    };
    if executor == DemoExecutor::Docker {
        return Err(why);
    }
    say(format!(
        "no Docker ({why}); the tasks run with the process executor"
    ));
    Ok(None)
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Runs the demo with peers started from `bin` under `root`. Ctrl-C stops the peers
/// gracefully and removes what the demo put in the engine.
pub async fn run(bin: &Path, root: &Path, opts: &DemoOptions) -> Result<(), String> {
    let started = Instant::now();
    let image = choose(opts.executor).await?;
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let submitter = hex::encode(key.verifying_key().to_bytes());
    say("starting 3 peers on 127.0.0.1 (child processes)");
    let docker = image.is_some();
    let token = crate::devtools::localmesh::token_flags(root, TOKEN).map_err(|e| {
        format!(
            "cannot write the API token file under {}: {e}",
            root.display()
        )
    })?;
    let started_mesh = LocalMesh::start(bin, root, 3, |i| {
        let mut f: Vec<String> = vec![
            "--authorized-submitter".into(),
            submitter.clone(),
            "--target-node-tag".into(),
            "edge".into(),
            // The demo shows CPU-driven offload; the host's memory is not its subject.
            "--threshold-memory".into(),
            "100".into(),
            "--executor".into(),
            if docker { "docker" } else { "process" }.into(),
            "--fake-cpu-percent".into(),
            if i == 0 { "95".into() } else { "20".into() },
        ];
        if i > 0 {
            f.extend(["--tag".into(), "edge".into()]);
        }
        f.extend(token.iter().cloned());
        f
    });
    let mut mesh = match started_mesh {
        Ok(m) => m,
        Err(e) => {
            if let Some(img) = &image {
                img.clean(&[]);
            }
            return Err(format!("cannot start peers: {e}"));
        }
    };
    let mut nodes = Vec::new();
    let result = tokio::select! {
        r = show(bin, &mut mesh, image.as_ref(), &key, opts, started, &mut nodes) => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
    };
    if result.is_ok() && opts.keep {
        say("mesh kept running; Ctrl-C to stop it");
        let api = mesh.peers[0].api();
        println!("    try: omesh peers --api {api}   omesh tasks --api {api}   curl http://{api}/metrics");
        let _ = tokio::signal::ctrl_c().await;
    }
    if result.is_err() {
        // What the peers said last, for whoever has to find out why.
        for p in &mut mesh.peers {
            if let Some(why) = p.exited() {
                eprintln!("{why}");
            }
            let log = std::fs::read_to_string(p.dir.join("omesh.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- last lines of {}'s log ---", p.name);
            for l in &lines[lines.len().saturating_sub(15)..] {
                eprintln!("{l}");
            }
        }
    }
    say("stopping the mesh");
    mesh.stop_all();
    if let Some(img) = &image {
        img.clean(&nodes);
    }
    result
}

/// Everything between the start of the peers and their stop.
#[allow(clippy::too_many_lines)]
async fn show(
    bin: &Path,
    mesh: &mut LocalMesh,
    image: Option<&DemoImage>,
    key: &SigningKey,
    opts: &DemoOptions,
    started: Instant,
    nodes: &mut Vec<String>,
) -> Result<(), String> {
    let took = mesh.wait_converged(Duration::from_secs(60)).await?;
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for (i, p) in mesh.peers.iter().enumerate() {
        if let Ok(s) = p.client().status().await {
            nodes.push(s.node_id.clone());
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
    let (reference, executor) = match image {
        Some(img) => {
            img.hand_to(bin, &mesh.peers[0].dir.join("data"))?;
            say(format!(
                "docker: image {} imported into peer0's blob store only and removed from the engine; \
                 the edge peers fetch it over QUIC before they run a task",
                img.reference()
            ));
            (img.reference(), ExecutorKind::Docker)
        }
        None => (
            format!("demo/burn@sha256:{}", "0".repeat(64)),
            ExecutorKind::Process,
        ),
    };

    let seed = mesh.peers[0].client();
    say(format!(
        "submitting {} CPU-heavy tasks ({}s each, {}) to peer0",
        opts.tasks,
        opts.burn_secs,
        if image.is_some() {
            "Docker containers"
        } else {
            "processes"
        }
    ));
    let mut ids = Vec::new();
    let mut submitted_at = BTreeMap::new();
    for n in 0..opts.tasks {
        let spec = TaskSpec {
            image: reference.clone(),
            command: burn_command(opts.burn_secs, n),
            env: BTreeMap::new(),
            cpu_millis: 250,
            memory_bytes: 16 << 20,
            required_tags: Default::default(),
            priority: 0,
            max_attempts: 3,
            timeout_ms: 120_000,
            executor,
            nonce: rand::random(),
            submitter: [0; 32],
            disconnect: Default::default(),
        }
        .sign(key);
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
    let deadline = Instant::now() + Duration::from_secs(90);
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
                        match (&t.pending_reason, t.state.as_str()) {
                            (Some(why), "pending") => format!("pending ({why})"),
                            _ => t.state.clone(),
                        },
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
            return Err("tasks did not start within 90 s".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if image.is_some() {
        image_moves(mesh).await;
    }

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
    rejoin(mesh, idx, &owner_name, &victim, image.is_some()).await?;

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
                match t.exit_code {
                    Some(c) => format!("{} (exit {c})", t.state),
                    None => t.state.clone(),
                },
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

/// Shows the bytes of the image each peer served and fetched over the data plane.
async fn image_moves(mesh: &LocalMesh) {
    let mut parts = Vec::new();
    for p in &mesh.peers {
        let api = p.api();
        let (served, fetched) = (
            blob_bytes(&api, "served").await,
            blob_bytes(&api, "fetched").await,
        );
        parts.push(format!(
            "{} served {} fetched {}",
            p.name,
            mb(served),
            mb(fetched)
        ));
    }
    say(format!(
        "image moved peer to peer over QUIC (digests verified): {}",
        parts.join("; ")
    ));
}

/// Restarts the killed peer from its data directory and waits until it has rejoined; with
/// Docker, shows that the container of the stale epoch its dead process left is gone.
async fn rejoin(
    mesh: &mut LocalMesh,
    idx: usize,
    name: &str,
    victim: &TaskJson,
    docker: bool,
) -> Result<(), String> {
    let stale = if docker {
        containers_of(&victim.id, victim.epoch)
    } else {
        Vec::new()
    };
    mesh.restart(idx)
        .map_err(|e| format!("cannot restart {name}: {e}"))?;
    let took = mesh.wait_converged(Duration::from_secs(60)).await?;
    if !docker {
        say(format!(
            "{name} restarted from its data directory and rejoined in {:.1}s (its task process died with it)",
            took.as_secs_f64()
        ));
        return Ok(());
    }
    // The restarted peer removes what its killed process left before it joins; wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !containers_of(&victim.id, victim.epoch).is_empty() {
        if Instant::now() > deadline {
            return Err(format!(
                "the container of stale epoch {} is still there after {name} restarted",
                victim.epoch
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    say(format!(
        "{name} restarted and rejoined in {:.1}s; the container of stale epoch {} that its killed \
         process left ({}) is removed",
        took.as_secs_f64(),
        victim.epoch,
        if stale.is_empty() {
            "already gone".to_owned()
        } else {
            stale.join(", ")
        }
    ));
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
