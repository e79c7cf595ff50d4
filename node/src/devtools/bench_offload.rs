//! `omesh bench offload`: a burst of CPU-bound process tasks submitted to a saturated peer,
//! with offload on and off.
//!
//! Each peer runs in a cgroup of its own with a CPU quota (`--quota-millis`, half a core by
//! default; four peers then fill a 2-core host), and its task cgroups are made under it, so
//! its tasks share its quota and its load is measured against that quota (`load/cgroup.rs`).
//! Peer 0 is saturated by a CPU burner in its cgroup. The bench then submits `--tasks`
//! tasks to peer 0, each a shell loop of a fixed number of iterations (calibrated here to
//! `--task-work-ms` of CPU) limited to `--task-cpu-millis`, and times them:
//!
//! - **off**: `enable_offload=false` on every peer and the tasks pinned to peer 0 by a tag:
//!   everything runs where it was submitted. (Offload off alone does not keep work local: it
//!   only makes a loaded peer keep claiming; placement's score still prefers idle peers.)
//! - **on**: the defaults: peer 0, over its CPU threshold, claims nothing; the others do.
//!
//! Figures per mode: makespan (first submit to the last task's Succeeded, on the owners'
//! clocks, which are this host's), each task's submit-to-Succeeded p50/p99, where the tasks
//! ran, and the overshoot: how many load samples of the other peers (their own published,
//! smoothed figure, read every 250 ms from their API) were over the CPU threshold during the
//! burst, and on how many peers. Needs root: it makes cgroups.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use omesh_protocol::{ExecutorKind, TaskSpec};

use crate::api::{PeerView, SubmitBody, TaskJson};
use crate::devtools::bench_tasks::Summary;
use crate::devtools::localmesh::LocalMesh;
use crate::exec::cgroup::{self, Hierarchy, Limits, TaskCgroup};

/// The API token of the bench mesh.
const TOKEN: &str = "bench-token";
/// Where the bench's cgroups go, under each hierarchy's root.
const CGROUP_ROOT: &str = "omesh-bench-offload";
/// The longest wait for anything.
const LONG: Duration = Duration::from_secs(180);
/// How often the targets' load is sampled during a burst.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// The CPU threshold the peers run with (the default), percent.
const THRESHOLD_CPU: f64 = 75.0;
/// The shell every task and the burner run (Debian's dash, or any POSIX sh).
const SH: &str = "/bin/sh";
/// Memory limit of each peer's cgroup: far above what a peer and its tasks use, so memory
/// never decides.
const PEER_MEMORY_BYTES: u64 = 2 << 30;

/// What to run.
#[derive(Debug, Clone)]
pub struct OffloadBench {
    /// Peers in the mesh (peer 0 is the saturated one).
    pub peers: usize,
    /// Tasks in the burst.
    pub tasks: usize,
    /// CPU quota of each peer's cgroup, thousandths of a core.
    pub quota_millis: u32,
    /// CPU each task asks for (and is limited to), thousandths of a core.
    pub task_cpu_millis: u32,
    /// CPU time each task's work takes, ms (calibrated into a loop count).
    pub task_work_ms: u64,
    /// Rounds, each one burst with offload off and one with it on.
    pub rounds: usize,
}

/// One burst.
#[derive(Debug, Clone)]
pub struct Row {
    /// `off` or `on`.
    pub mode: &'static str,
    /// First submit to the last Succeeded, ms.
    pub makespan_ms: f64,
    /// Submit to Succeeded of each task, ms.
    pub completions: Vec<f64>,
    /// Tasks per peer index.
    pub ran_on: BTreeMap<usize, usize>,
    /// Load samples of the other peers taken during the burst.
    pub samples: usize,
    /// Of those, how many were over the CPU threshold.
    pub samples_over: usize,
    /// Peers (other than peer 0) with a sample over the threshold.
    pub targets_over: usize,
    /// The highest load a target published during the burst, percent.
    pub max_target_cpu: f64,
}

/// What the bench found.
#[derive(Debug, Clone)]
pub struct Report {
    /// The parameters.
    pub cfg: OffloadBench,
    /// Loop iterations per task.
    pub iterations: u64,
    /// cgroup version used.
    pub cgroup_version: u8,
    /// Every burst, in the order run.
    pub rows: Vec<Row>,
}

fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// A client call with a bound, so a hung peer cannot stall the bench.
async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, crate::cli::client::ClientError>>,
) -> Result<T, String> {
    match tokio::time::timeout(Duration::from_secs(10), f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the API did not answer in 10 s".into()),
    }
}

fn limits(cpu_millis: u32) -> Limits {
    Limits {
        cpu_millis,
        memory_bytes: PEER_MEMORY_BYTES,
        pids: 4096,
    }
}

/// The shell loop of one task: `n` iterations of arithmetic and a test.
fn spin_script(n: u64) -> String {
    format!("i=0; while [ $i -lt {n} ]; do i=$((i+1)); done")
}

/// Checks what the bench needs before it changes anything.
fn preflight(cfg: &OffloadBench) -> Result<Hierarchy, String> {
    if !rustix::process::geteuid().is_root() {
        return Err(
            "omesh bench offload needs root: it puts each peer in a cgroup of its own with a \
             CPU quota (run it with sudo)"
                .into(),
        );
    }
    if cfg.peers < 2 {
        return Err(format!(
            "--peers must be at least 2 (one saturated, one to offload to), got {}",
            cfg.peers
        ));
    }
    if cfg.tasks == 0 || cfg.task_cpu_millis == 0 || cfg.quota_millis == 0 {
        return Err("--tasks, --task-cpu-millis and --quota-millis must be above 0".into());
    }
    if !Path::new(SH).exists() {
        return Err(format!(
            "{SH} is missing: the tasks and the burner are shell loops"
        ));
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let total = u64::from(cfg.quota_millis) * cfg.peers as u64;
    if total > cores as u64 * 1000 {
        return Err(format!(
            "{} peers × {}m is more CPU than this host's {cores} cores: lower --quota-millis \
             or --peers, or the quotas bind nothing",
            cfg.peers, cfg.quota_millis
        ));
    }
    Hierarchy::detect(CGROUP_ROOT).map_err(|e| {
        format!("no usable cgroup hierarchy for the bench's peers (cpu, memory, pids): {e}")
    })
}

/// Removes every cgroup the bench may have left (a run killed half-way), killing what is in
/// them.
fn clean_cgroups(h: &Hierarchy) {
    for peer in cgroup::list(h, CGROUP_ROOT) {
        let at = format!("{CGROUP_ROOT}/{peer}");
        let tasks = format!("{at}/work");
        for task in cgroup::list(h, &tasks) {
            if let Some(c) = TaskCgroup::open(h, &tasks, &task) {
                let _ = c.remove();
            }
        }
        for leaf in cgroup::list(h, &at) {
            if let Some(c) = TaskCgroup::open(h, &at, &leaf) {
                let _ = c.remove();
            }
        }
        if let Some(c) = TaskCgroup::open(h, CGROUP_ROOT, &peer) {
            let _ = c.remove();
        }
    }
    let roots: Vec<&Path> = match h {
        Hierarchy::V2 { root } => vec![root],
        Hierarchy::V1 {
            cpu,
            cpuacct,
            memory,
            pids,
            freezer,
        } => [
            Some(cpu),
            cpuacct.as_ref(),
            Some(memory),
            Some(pids),
            freezer.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(std::path::PathBuf::as_path)
        .collect(),
    };
    for root in roots {
        let _ = std::fs::remove_dir(root.join(CGROUP_ROOT));
    }
}

/// Runs `sh -c script` in a fresh cgroup under the bench root; the CPU time it took, ns
/// (wall time where no cpuacct is mounted).
fn cpu_time_of(h: &Hierarchy, script: &str) -> Result<u64, String> {
    let cg = TaskCgroup::create(h, CGROUP_ROOT, "calibrate", &limits(1000))
        .map_err(|e| format!("calibration cgroup: {e}"))?;
    let mut cmd = Command::new(SH);
    cmd.args(["-c", script]).stdin(Stdio::null());
    cg.join_on_spawn(&mut cmd);
    let start = Instant::now();
    let status = cmd.status().map_err(|e| format!("run {SH}: {e}"))?;
    let wall = start.elapsed();
    if !status.success() {
        return Err(format!("the calibration loop exited with {status}"));
    }
    let ns = cg
        .cpu_usage_ns()
        .unwrap_or_else(|| u64::try_from(wall.as_nanos()).unwrap_or(u64::MAX));
    let _ = cg.remove();
    Ok(ns)
}

/// Loop iterations that take `work_ms` of CPU.
fn calibrate(h: &Hierarchy, work_ms: u64) -> Result<u64, String> {
    let probe = 200_000u64;
    let ns = cpu_time_of(h, &spin_script(probe))?.max(1);
    Ok(
        (u128::from(work_ms) * 1_000_000 * u128::from(probe) / u128::from(ns))
            .try_into()
            .unwrap_or(u64::MAX)
            .max(1),
    )
}

/// The cgroups of one burst's peers.
struct PeerCgroups {
    /// `peer<i>`: holds the quota; parent of the peer's, the burner's and the task cgroups.
    bounds: Vec<TaskCgroup>,
    /// `peer<i>/peer`: the peer process.
    peers: Vec<TaskCgroup>,
}

impl PeerCgroups {
    fn create(h: &Hierarchy, cfg: &OffloadBench) -> Result<Self, String> {
        let mut out = Self {
            bounds: Vec::new(),
            peers: Vec::new(),
        };
        for i in 0..cfg.peers {
            let name = format!("peer{i}");
            out.bounds.push(
                TaskCgroup::create(h, CGROUP_ROOT, &name, &limits(cfg.quota_millis))
                    .map_err(|e| format!("cgroup of {name}: {e}"))?,
            );
            out.peers.push(
                TaskCgroup::create(
                    h,
                    &format!("{CGROUP_ROOT}/{name}"),
                    "peer",
                    &limits(cfg.quota_millis),
                )
                .map_err(|e| format!("cgroup of {name}'s process: {e}"))?,
            );
        }
        Ok(out)
    }

    fn join_paths(&self, i: usize) -> Vec<CString> {
        self.peers
            .get(i)
            .map(TaskCgroup::join_paths)
            .unwrap_or_default()
    }
}

/// A CPU burner in peer 0's cgroup; killed on drop.
struct Burner {
    child: Child,
}

impl Burner {
    fn start(h: &Hierarchy, quota_millis: u32) -> Result<Self, String> {
        let cg = TaskCgroup::create(
            h,
            &format!("{CGROUP_ROOT}/peer0"),
            "burner",
            &limits(quota_millis),
        )
        .map_err(|e| format!("burner cgroup: {e}"))?;
        let mut cmd = Command::new(SH);
        cmd.args(["-c", "while :; do :; done"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cg.join_on_spawn(&mut cmd);
        let child = cmd.spawn().map_err(|e| format!("burner: {e}"))?;
        Ok(Self { child })
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the bench with the `omesh` binary `bin`. `progress` gets a line per step.
pub async fn run(
    bin: &Path,
    cfg: &OffloadBench,
    progress: impl Fn(&str),
) -> Result<Report, String> {
    let h = preflight(cfg)?;
    clean_cgroups(&h);
    let iterations = calibrate(&h, cfg.task_work_ms)?;
    progress(&format!(
        "cgroup v{}; {iterations} loop iterations take {} ms of CPU",
        h.version(),
        cfg.task_work_ms
    ));
    let mut rows = Vec::new();
    for round in 0..cfg.rounds {
        for offload in [false, true] {
            // Ctrl-C ends the burst through its drops (peers killed, burner killed), then the
            // cgroups are removed as after any burst.
            let row = tokio::select! {
                row = burst(bin, &h, cfg, iterations, offload, &progress) => row,
                _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
            };
            clean_cgroups(&h);
            let row = row?;
            progress(&format!(
                "round {}: offload {}: makespan {:.0} ms, ran on {:?}",
                round + 1,
                row.mode,
                row.makespan_ms,
                row.ran_on
            ));
            rows.push(row);
        }
    }
    Ok(Report {
        cfg: cfg.clone(),
        iterations,
        cgroup_version: h.version(),
        rows,
    })
}

/// One mesh, one burst.
async fn burst(
    bin: &Path,
    h: &Hierarchy,
    cfg: &OffloadBench,
    iterations: u64,
    offload: bool,
    progress: &impl Fn(&str),
) -> Result<Row, String> {
    let cgroups = PeerCgroups::create(h, cfg)?;
    let key = crate::cli::keys::generate();
    let root = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let common = crate::devtools::localmesh::token_flags(root.path(), TOKEN)
        .map_err(|e| format!("API token file: {e}"))?;
    let flags = |i: usize| {
        let mut f = common.clone();
        f.extend([
            "--authorized-submitter".to_owned(),
            crate::cli::keys::public_hex(&key),
            "--executor".into(),
            "process".into(),
            "--cgroup-parent".into(),
            format!("{CGROUP_ROOT}/peer{i}/work"),
            "--enable-offload".into(),
            offload.to_string(),
            "--tag".into(),
            format!("bench:peer{i}"),
        ]);
        f
    };
    let mut mesh = LocalMesh::start_in(bin, root.path(), cfg.peers, flags, |i| {
        cgroups.join_paths(i)
    })
    .map_err(|e| format!("start: {e}"))?;
    let result = async {
        mesh.wait_converged(LONG).await?;
        check_capacity(&mesh, cfg).await?;
        let _burner = Burner::start(h, cfg.quota_millis)?;
        wait_loads(&mesh, offload).await?;
        progress(&format!(
            "offload {}: peer0 saturated, {} tasks to submit",
            if offload { "on" } else { "off" },
            cfg.tasks
        ));
        submit_and_time(&mesh, &key, cfg, iterations, offload).await
    }
    .await;
    mesh.stop_all();
    drop(cgroups);
    result
}

/// Each peer must offer its quota: the load signal found its cgroup.
async fn check_capacity(mesh: &LocalMesh, cfg: &OffloadBench) -> Result<(), String> {
    let peers = bounded(mesh.peers_seen_by(0)).await?;
    for p in &peers {
        if p.cpu_millis != cfg.quota_millis {
            return Err(format!(
                "peer {} offers {}m CPU, not its cgroup's quota of {}m: the load signal did not \
                 find the peer's cgroup",
                &p.id[..8.min(p.id.len())],
                p.cpu_millis,
                cfg.quota_millis
            ));
        }
    }
    Ok(())
}

/// Each peer's view of itself.
async fn self_views(mesh: &LocalMesh) -> Vec<Option<PeerView>> {
    let mut out = Vec::new();
    for i in 0..mesh.peers.len() {
        let me = bounded(mesh.peers_seen_by(i))
            .await
            .ok()
            .and_then(|v| v.into_iter().find(|p| p.is_self));
        out.push(me);
    }
    out
}

/// Waits until peer 0 is over its threshold (and says so, with offload on) in every peer's
/// view, and the others are clear of theirs.
async fn wait_loads(mesh: &LocalMesh, offload: bool) -> Result<(), String> {
    let end = Instant::now() + LONG;
    loop {
        let views = self_views(mesh).await;
        let hot = views
            .first()
            .and_then(Option::as_ref)
            .is_some_and(|p| p.cpu_percent > THRESHOLD_CPU && (p.overloaded || !offload));
        let seen_hot = !offload
            || bounded(mesh.peers_seen_by(mesh.peers.len() - 1))
                .await
                .is_ok_and(|v| v.iter().any(|p| !p.is_self && p.overloaded));
        let cool = views.iter().skip(1).all(|v| {
            v.as_ref()
                .is_some_and(|p| !p.overloaded && p.cpu_percent < THRESHOLD_CPU - 10.0)
        });
        if hot && seen_hot && cool {
            return Ok(());
        }
        if Instant::now() > end {
            let loads: Vec<String> = views
                .iter()
                .map(|v| {
                    v.as_ref().map_or("?".into(), |p| {
                        format!(
                            "{:.0}%{}",
                            p.cpu_percent,
                            if p.overloaded { "!" } else { "" }
                        )
                    })
                })
                .collect();
            return Err(format!(
                "peer loads did not settle in {LONG:?} (peer0 over {THRESHOLD_CPU}%, the others \
                 under {}%): {loads:?}",
                THRESHOLD_CPU - 10.0
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn submit_and_time(
    mesh: &LocalMesh,
    key: &ed25519_dalek::SigningKey,
    cfg: &OffloadBench,
    iterations: u64,
    offload: bool,
) -> Result<Row, String> {
    let client = mesh.peers[0].client();
    let mut ids = Vec::new();
    let mut submitted_at = BTreeMap::new();
    let first = wall_ms();
    for _ in 0..cfg.tasks {
        let spec = TaskSpec {
            image: format!("bench/spin@sha256:{}", "00".repeat(32)),
            command: vec![SH.into(), "-c".into(), spin_script(iterations)],
            env: BTreeMap::new(),
            cpu_millis: cfg.task_cpu_millis,
            memory_bytes: 32 << 20,
            required_tags: if offload {
                BTreeSet::new()
            } else {
                BTreeSet::from(["bench:peer0".to_owned()])
            },
            priority: 0,
            max_attempts: 1,
            timeout_ms: 0,
            executor: ExecutorKind::Process,
            nonce: rand::random(),
            submitter: [0; 32],
            disconnect: Default::default(),
        };
        let body = serde_json::to_value(SubmitBody::from_signed(&spec.sign(key)))
            .map_err(|e| e.to_string())?;
        let at = wall_ms();
        let resp: serde_json::Value = bounded(client.send(
            reqwest::Method::POST,
            "/api/v1/tasks",
            Some(TOKEN),
            Some(&body),
        ))
        .await?;
        let id = resp
            .get("id")
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("submit answered {resp}"))?
            .to_owned();
        submitted_at.insert(id.clone(), at);
        ids.push(id);
    }

    let order = peer_order(mesh).await?;

    let mut samples = 0usize;
    let mut samples_over = 0usize;
    let mut over: BTreeSet<usize> = BTreeSet::new();
    let mut max_target_cpu = 0.0f64;
    let end = Instant::now() + LONG;
    let done: Vec<TaskJson> = loop {
        let views = self_views(mesh).await;
        for (i, v) in views.iter().enumerate().skip(1) {
            if let Some(p) = v {
                samples += 1;
                max_target_cpu = max_target_cpu.max(p.cpu_percent);
                if p.cpu_percent > THRESHOLD_CPU {
                    samples_over += 1;
                    over.insert(i);
                }
            }
        }
        let tasks: Vec<TaskJson> = bounded(client.tasks()).await?;
        let mine: Vec<TaskJson> = tasks
            .into_iter()
            .filter(|t| submitted_at.contains_key(&t.id))
            .collect();
        if let Some(bad) = mine
            .iter()
            .find(|t| matches!(t.state.as_str(), "failed" | "cancelled"))
        {
            return Err(format!(
                "task {} ended {}: {}",
                bad.id, bad.state, bad.error
            ));
        }
        if mine.len() == ids.len() && mine.iter().all(|t| t.state == "succeeded") {
            break mine;
        }
        if Instant::now() > end {
            let states: BTreeSet<String> = mine
                .iter()
                .map(|t| {
                    format!(
                        "{} ({})",
                        t.state,
                        t.pending_reason.as_deref().unwrap_or(&t.error)
                    )
                })
                .collect();
            return Err(format!(
                "{} of {} tasks succeeded within {LONG:?}; states: {states:?}",
                mine.iter().filter(|t| t.state == "succeeded").count(),
                ids.len()
            ));
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    };

    let mut completions = Vec::new();
    let mut ran_on = BTreeMap::new();
    let mut last = first;
    for t in &done {
        let ok = t
            .history
            .iter()
            .rev()
            .find(|e| e.state == "succeeded")
            .ok_or_else(|| format!("task {} succeeded with no Succeeded entry", t.id))?;
        let at = ok.at_ms as f64;
        last = last.max(at);
        completions.push(at - submitted_at.get(&t.id).copied().unwrap_or(first));
        let owner = t.owner.as_deref().unwrap_or_default();
        let idx = order
            .iter()
            .position(|id| id == owner)
            .unwrap_or(usize::MAX);
        *ran_on.entry(idx).or_insert(0) += 1;
    }
    Ok(Row {
        mode: if offload { "on" } else { "off" },
        makespan_ms: last - first,
        completions,
        ran_on,
        samples,
        samples_over,
        targets_over: over.len(),
        max_target_cpu,
    })
}

/// Node ids (hex) by peer index.
async fn peer_order(mesh: &LocalMesh) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for i in 0..mesh.peers.len() {
        let me = bounded(mesh.peers_seen_by(i))
            .await?
            .into_iter()
            .find(|p| p.is_self)
            .ok_or_else(|| format!("peer{i} does not list itself"))?;
        out.push(me.id);
    }
    Ok(out)
}

/// The table: one line per burst, then the medians over rounds when there are several.
pub fn table(r: &Report) -> String {
    let off: Vec<&Row> = r.rows.iter().filter(|x| x.mode == "off").collect();
    let off_median = Summary::of(&off.iter().map(|x| x.makespan_ms).collect::<Vec<_>>()).p50;
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .enumerate()
        .map(|(k, row)| {
            let s = Summary::of(&row.completions);
            let ratio = if row.mode == "on" {
                // The off burst of the same round.
                r.rows
                    .get(k.wrapping_sub(1))
                    .filter(|o| o.mode == "off")
                    .map_or_else(
                        || "-".into(),
                        |o| format!("{:.2}", row.makespan_ms / o.makespan_ms),
                    )
            } else {
                "1.00".into()
            };
            let ran: Vec<String> = row
                .ran_on
                .iter()
                .map(|(i, n)| {
                    if *i == usize::MAX {
                        format!("?:{n}")
                    } else {
                        format!("peer{i}:{n}")
                    }
                })
                .collect();
            vec![
                row.mode.to_owned(),
                format!("{:.0}", row.makespan_ms),
                ratio,
                format!("{:.0}", s.p50),
                format!("{:.0}", s.p99),
                ran.join(" "),
                format!(
                    "{}/{} samples, {} peer(s), max {:.0}%",
                    row.samples_over, row.samples, row.targets_over, row.max_target_cpu
                ),
            ]
        })
        .collect();
    let mut out = crate::cli::client::table(
        &[
            "OFFLOAD",
            "MAKESPAN MS",
            "ON/OFF",
            "P50 MS",
            "P99 MS",
            "RAN ON",
            "OVERSHOOT (targets over 75% CPU)",
        ],
        &rows,
    );
    let on: Vec<f64> = r
        .rows
        .iter()
        .filter(|x| x.mode == "on")
        .map(|x| x.makespan_ms)
        .collect();
    if r.rows.len() > 2 {
        out.push_str(&format!(
            "median makespan: off {:.0} ms, on {:.0} ms, on/off {:.2}\n",
            off_median,
            Summary::of(&on).p50,
            Summary::of(&on).p50 / off_median
        ));
    }
    out.push_str(&format!(
        "({} peers in cgroup v{} quotas of {}m each, peer0 saturated by a burner; {} tasks of {} ms CPU ({} sh loop iterations) at {}m each, submitted to peer0; off = enable_offload=false with the tasks pinned to peer0; p99 is nearest-rank)\n",
        r.cfg.peers,
        r.cgroup_version,
        r.cfg.quota_millis,
        r.cfg.tasks,
        r.cfg.task_work_ms,
        r.iterations,
        r.cfg.task_cpu_millis,
    ));
    out
}
