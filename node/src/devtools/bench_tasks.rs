//! `omesh bench tasks`: on a local mesh of peers, how long a running task takes to run again
//! after `kill -9` of its owner, and how long a submitted task takes to run, per executor.
//!
//! Everything goes through the peers' APIs, as an operator would see it. Times are taken on
//! this host's clock; the breakdown of a failover uses the peers' timelines, which read the same
//! wall clock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use omesh_protocol::{ExecutorKind, TaskSpec};

use crate::api::{SubmitBody, TaskJson};
use crate::cli::client::Client;
use crate::devtools::localmesh::LocalMesh;

/// The API token of the bench mesh.
const TOKEN: &str = "bench-token";
/// How often the API is polled while timing.
const POLL: Duration = Duration::from_millis(20);
/// The longest wait for anything (a task to run, a mesh to converge).
const LONG: Duration = Duration::from_secs(120);
/// The tag of the image the docker rows run.
pub const TEST_IMAGE_TAG: &str = "omesh-test/busybox:latest";
/// The busybox applets linked into the image.
const APPLETS: &[&str] = &["sh", "echo", "sleep", "true", "false", "cat", "date"];

/// What to run.
#[derive(Debug, Clone)]
pub struct TaskBench {
    /// Peers in the mesh.
    pub peers: usize,
    /// Owners killed (one failover each).
    pub kills: usize,
    /// Tasks submitted per executor.
    pub submits: usize,
    /// Also time the docker executor (when an engine answers).
    pub docker: bool,
}

/// p50, p99 and max of a set of durations, in ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Summary {
    /// The summary of `samples` (ms).
    pub fn of(samples: &[f64]) -> Self {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            if s.is_empty() {
                return f64::NAN;
            }
            // Nearest rank: the smallest sample with at least p% of samples at or below it.
            let k = ((p / 100.0) * s.len() as f64).ceil() as usize;
            s[k.clamp(1, s.len()) - 1]
        };
        Self {
            n: s.len(),
            p50: rank(50.0),
            p99: rank(99.0),
            max: s.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// One failover, in ms.
#[derive(Debug, Clone, Copy)]
pub struct Failover {
    /// `kill -9` of the owner until a surviving peer's API shows the task running at epoch + 1.
    pub total: f64,
    /// Kill until the observer judged the lease lost: when the suspicion of the owner (it
    /// stopped answering probes) reached it, plus the lease ttl and grace.
    pub detect: f64,
    /// Lease lost (as judged by the observer) until the new owner reported Running: claim
    /// stagger, settle delay and process start.
    pub claim_to_running: f64,
    /// The new owner's Running report until the observer's API showed it (gossip, polling).
    pub visible: f64,
    /// Whether the epoch seen was more than one above the killed one.
    pub skipped_epochs: bool,
    /// Processes of the killed owner's epoch still running once the new epoch ran: a duplicate
    /// run the lease cannot fence (the bench then ends them by pid).
    pub orphans: usize,
}

/// Submit to Running, for one executor.
#[derive(Debug, Clone)]
pub struct Latency {
    /// `process` or `docker`.
    pub executor: &'static str,
    /// POST answered until the submitting peer's API showed Running, ms.
    pub samples: Vec<f64>,
    /// How many ran on the peer they were submitted to.
    pub local: usize,
}

/// What the bench found.
#[derive(Debug, Clone)]
pub struct Report {
    /// Peers.
    pub peers: usize,
    /// Lease ttl and grace the peers ran with, ms.
    pub ttl_grace_ms: (u64, u64),
    /// The failovers.
    pub failovers: Vec<Failover>,
    /// Submit latencies, per executor.
    pub latencies: Vec<Latency>,
    /// Why docker was not timed, if it was not.
    pub docker_skipped: Option<String>,
}

/// The lease ttl and grace floor the peers run with, ms: the defaults, or what
/// `OMESH_LEASE_TTL_MS` / `OMESH_LEASE_GRACE_MS` set (the peers inherit the bench's
/// environment), so the breakdown stays right when they are tried at other values.
fn ttl_grace() -> (u64, u64) {
    let d = crate::config::NodeConfig::default();
    let env = |key: &str, default: u64| {
        std::env::var(key)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(default)
    };
    (
        env("OMESH_LEASE_TTL_MS", d.lease_ttl_ms),
        env("OMESH_LEASE_GRACE_MS", d.lease_grace_ms),
    )
}

fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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

struct Bench {
    mesh: LocalMesh,
    key: ed25519_dalek::SigningKey,
    /// Node id (hex) of each peer, by index.
    ids: Vec<String>,
    /// Every task submitted, for the final sweep.
    submitted: Vec<String>,
}

impl Bench {
    fn client(&self, i: usize) -> Client {
        self.mesh.peers[i].client()
    }

    fn index_of(&self, node: &str) -> Option<usize> {
        self.ids.iter().position(|id| id == node)
    }

    fn spec(&self, executor: ExecutorKind, image: &str, command: &[&str]) -> SubmitBody {
        let spec = TaskSpec {
            image: image.to_owned(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            env: BTreeMap::new(),
            cpu_millis: 100,
            memory_bytes: 32 << 20,
            required_tags: Default::default(),
            priority: 0,
            max_attempts: 3,
            timeout_ms: 0,
            executor,
            nonce: rand::random(),
            submitter: [0; 32],
            disconnect: Default::default(),
        };
        SubmitBody::from_signed(&spec.sign(&self.key))
    }

    /// POSTs a task to peer `via`; its id.
    async fn submit(&mut self, via: usize, body: &SubmitBody) -> Result<String, String> {
        let body = serde_json::to_value(body).map_err(|e| e.to_string())?;
        let resp: serde_json::Value = bounded(self.client(via).send(
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
        self.submitted.push(id.clone());
        Ok(id)
    }

    async fn task(&self, i: usize, id: &str) -> Result<TaskJson, String> {
        bounded(self.client(i).get(&format!("/api/v1/tasks/{id}"))).await
    }

    /// Polls peer `i` every [`POLL`] until `cond` holds; the task then, and when it was seen.
    async fn poll(
        &self,
        i: usize,
        id: &str,
        cond: impl Fn(&TaskJson) -> bool,
    ) -> Result<(TaskJson, Instant), String> {
        let end = Instant::now() + LONG;
        let mut last = None;
        loop {
            if let Ok(t) = self.task(i, id).await {
                if cond(&t) {
                    return Ok((t, Instant::now()));
                }
                last = Some(t);
            }
            if Instant::now() >= end {
                return Err(format!(
                    "task {id} on peer{i}: not there within {LONG:?}; last seen {last:?}"
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The signed cancel of task `id`, as `omesh cancel` sends it.
    fn cancel_body(&self, id: &str) -> Result<serde_json::Value, String> {
        let task = id.parse().map_err(|_| format!("{id:?} is not a task id"))?;
        serde_json::to_value(crate::api::CancelBody::sign(&self.key, task))
            .map_err(|e| e.to_string())
    }

    async fn cancel(&self, via: usize, id: &str) -> Result<(), String> {
        let body = self.cancel_body(id)?;
        let _: serde_json::Value = bounded(self.client(via).send(
            reqwest::Method::DELETE,
            &format!("/api/v1/tasks/{id}"),
            Some(TOKEN),
            Some(&body),
        ))
        .await?;
        self.poll(via, id, |t| t.state == "cancelled").await?;
        Ok(())
    }

    /// One failover: a task running on some owner, the owner killed, a survivor watched.
    async fn failover(&mut self, k: usize) -> Result<Failover, String> {
        let n = self.mesh.peers.len();
        let via = k % n;
        let body = self.spec(
            ExecutorKind::Process,
            &format!("bench/sleep@sha256:{}", "00".repeat(32)),
            &["sleep", "600"],
        );
        let id = self.submit(via, &body).await?;
        let (t, _) = self.poll(via, &id, |t| t.state == "running").await?;
        let owner_id = t.owner.clone().unwrap_or_default();
        let owner = self
            .index_of(&owner_id)
            .ok_or_else(|| format!("owner {owner_id} is not a bench peer"))?;
        let observer = (owner + 1) % n;
        let epoch = t.epoch;

        self.mesh.peers[owner].kill9();
        let killed = Instant::now();
        let killed_wall = wall_ms();
        let (t, seen) = self
            .poll(observer, &id, |t| t.state == "running" && t.epoch > epoch)
            .await?;
        // When the suspicion of the dead owner reached the observer: its leases count from
        // there (it stays suspected, so asking after the failover finds it).
        let suspected_wall = match bounded(self.mesh.peers_seen_by(observer)).await {
            Ok(peers) => peers
                .iter()
                .find(|p| p.id == owner_id)
                .and_then(|p| p.suspected_ms_ago)
                .map(|ago| wall_ms() - ago as f64),
            Err(_) => None,
        };
        let total = ms(seen - killed);
        let seen_wall = killed_wall + total;
        let running_at = t
            .history
            .iter()
            .find(|e| e.epoch == t.epoch && e.state == "running")
            .map_or(f64::NAN, |e| e.at_ms as f64);
        let (ttl, grace) = ttl_grace();
        let expiry = suspected_wall.map_or(f64::NAN, |h| h + ttl as f64 + grace as f64);
        let failover = Failover {
            total,
            detect: expiry - killed_wall,
            claim_to_running: running_at - expiry,
            visible: seen_wall - running_at,
            skipped_epochs: t.epoch != epoch + 1,
            // Did the killed owner's instance die with it?
            orphans: kill_task_processes(&id, Some(epoch)),
        };

        self.cancel(observer, &id).await?;
        self.mesh
            .restart(owner)
            .map_err(|e| format!("restart peer{owner}: {e}"))?;
        self.mesh.wait_converged(LONG).await?;
        Ok(failover)
    }

    /// Submit to Running, through peer `k % n`.
    async fn latency(
        &mut self,
        k: usize,
        executor: ExecutorKind,
        image: &str,
    ) -> Result<(f64, bool), String> {
        let via = k % self.mesh.peers.len();
        let body = self.spec(executor, image, &["sleep", "600"]);
        let id = self.submit(via, &body).await?;
        let accepted = Instant::now();
        let (t, seen) = self.poll(via, &id, |t| t.state == "running").await?;
        let local = t.owner.as_deref() == self.ids.get(via).map(String::as_str);
        self.cancel(via, &id).await?;
        if executor == ExecutorKind::Docker {
            wait_no_container(&id).await;
        }
        Ok((ms(seen - accepted), local))
    }
}

/// Runs the bench with the `omesh` binary `bin`. `progress` gets a line per step.
pub async fn run(bin: &Path, cfg: &TaskBench, progress: impl Fn(&str)) -> Result<Report, String> {
    if cfg.peers < 3 {
        return Err(format!(
            "a failover bench needs at least 3 peers, got {}",
            cfg.peers
        ));
    }
    let docker_image = if cfg.docker {
        match crate::exec::docker::connect_engine().await {
            Ok(_) => ensure_test_image().map_err(|e| format!("test image: {e}")),
            Err(e) => Err(e.to_string()),
        }
    } else {
        Err("--no-docker".into())
    };
    let key = crate::cli::keys::generate();
    let root = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let mut flags = crate::devtools::localmesh::token_flags(root.path(), TOKEN)
        .map_err(|e| format!("API token file: {e}"))?;
    flags.extend([
        "--authorized-submitter".to_owned(),
        crate::cli::keys::public_hex(&key),
        "--threshold-memory".into(),
        "100".into(),
        // Time the mesh, not this host's load: a busy 2-core host crosses the default 75%
        // and its peers would then claim nothing.
        "--threshold-cpu".into(),
        "100".into(),
    ]);
    let mesh = LocalMesh::start(bin, root.path(), cfg.peers, |_| flags.clone())
        .map_err(|e| format!("start: {e}"))?;
    let mut bench = Bench {
        mesh,
        key,
        ids: Vec::new(),
        submitted: Vec::new(),
    };
    let result = measure(&mut bench, cfg, docker_image.as_deref(), &progress).await;
    // Leave nothing running: tasks cancelled, peers stopped, orphans ended.
    for id in bench.submitted.clone() {
        let Ok(body) = bench.cancel_body(&id) else {
            continue;
        };
        let _ = bounded(bench.client(0).send::<serde_json::Value>(
            reqwest::Method::DELETE,
            &format!("/api/v1/tasks/{id}"),
            Some(TOKEN),
            Some(&body),
        ))
        .await;
    }
    bench.mesh.stop_all();
    for id in &bench.submitted {
        kill_task_processes(id, None);
    }
    if docker_image.is_ok() {
        for node in &bench.ids {
            remove_containers(&format!("omesh.node={node}"));
        }
    }
    let (failovers, latencies) = result?;
    Ok(Report {
        peers: cfg.peers,
        ttl_grace_ms: ttl_grace(),
        failovers,
        latencies,
        docker_skipped: docker_image.err(),
    })
}

async fn measure(
    bench: &mut Bench,
    cfg: &TaskBench,
    docker_image: Result<&str, &String>,
    progress: &impl Fn(&str),
) -> Result<(Vec<Failover>, Vec<Latency>), String> {
    let took = bench.mesh.wait_converged(LONG).await?;
    progress(&format!(
        "{} peers converged in {:.1}s",
        cfg.peers,
        took.as_secs_f64()
    ));
    for s in bench.mesh.statuses().await {
        bench
            .ids
            .push(s.ok_or("a peer did not answer its status")?.node_id);
    }
    let mut latencies = Vec::new();
    let mut runs: Vec<(&'static str, ExecutorKind, String)> = vec![(
        "process",
        ExecutorKind::Process,
        format!("bench/sleep@sha256:{}", "00".repeat(32)),
    )];
    if let Ok(image) = docker_image {
        runs.push(("docker", ExecutorKind::Docker, image.to_owned()));
    }
    for (name, kind, image) in runs {
        let mut l = Latency {
            executor: name,
            samples: Vec::new(),
            local: 0,
        };
        for k in 0..cfg.submits {
            let (t, local) = bench.latency(k, kind, &image).await?;
            l.samples.push(t);
            l.local += usize::from(local);
        }
        let s = Summary::of(&l.samples);
        progress(&format!(
            "submit -> running ({name}): {} tasks, p50 {:.0} ms, p99 {:.0} ms",
            s.n, s.p50, s.p99
        ));
        latencies.push(l);
    }
    let mut failovers = Vec::new();
    for k in 0..cfg.kills {
        let f = bench.failover(k).await?;
        progress(&format!(
            "kill {}/{}: running again after {:.0} ms (detect {:.0}, claim..running {:.0}, visible {:.0})",
            k + 1,
            cfg.kills,
            f.total,
            f.detect,
            f.claim_to_running,
            f.visible
        ));
        failovers.push(f);
    }
    Ok((failovers, latencies))
}

/// The report as tables.
pub fn table(r: &Report) -> String {
    let row = |what: String, s: Summary| {
        vec![
            what,
            s.n.to_string(),
            format!("{:.0}", s.p50),
            format!("{:.0}", s.p99),
            format!("{:.0}", s.max),
        ]
    };
    let pick = |f: fn(&Failover) -> f64| -> Summary {
        Summary::of(&r.failovers.iter().map(f).collect::<Vec<_>>())
    };
    let mut rows = vec![row(
        "failover: kill -9 owner -> running on new owner".into(),
        pick(|f| f.total),
    )];
    rows.push(row(
        format!(
            "  detect: kill -> lease lost (suspicion + ttl {} + grace {})",
            r.ttl_grace_ms.0, r.ttl_grace_ms.1
        ),
        pick(|f| f.detect),
    ));
    rows.push(row(
        "  claim stagger + settle + start -> running reported".into(),
        pick(|f| f.claim_to_running),
    ));
    rows.push(row(
        "  running reported -> seen on a survivor's API".into(),
        pick(|f| f.visible),
    ));
    for l in &r.latencies {
        rows.push(row(
            format!(
                "submit -> running ({}, {}/{} ran where submitted)",
                l.executor,
                l.local,
                l.samples.len()
            ),
            Summary::of(&l.samples),
        ));
    }
    let mut out = crate::cli::client::table(&["MEASURE", "N", "P50 MS", "P99 MS", "MAX MS"], &rows);
    let skipped = r.failovers.iter().filter(|f| f.skipped_epochs).count();
    let orphans: usize = r.failovers.iter().map(|f| f.orphans).sum();
    out.push_str(&format!(
        "({} peers; p99 is nearest-rank; {skipped} failover(s) landed beyond epoch + 1; {orphans} killed owner's instance(s) still running after the failover)\n",
        r.peers
    ));
    if let Some(why) = &r.docker_skipped {
        out.push_str(&format!("(docker not timed: {why})\n"));
    }
    out
}

/// Kills, by pid, every process whose environment names task `id` (`OMESH_TASK_ID`, set by the
/// process executor) and, if given, `epoch` (`OMESH_EPOCH`). Returns how many it found.
pub fn kill_task_processes(id: &str, epoch: Option<u64>) -> usize {
    let task = format!("OMESH_TASK_ID={id}");
    let epoch = epoch.map(|e| format!("OMESH_EPOCH={e}"));
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut found = 0;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let has = |want: &str| env.split(|b| *b == 0).any(|v| v == want.as_bytes());
        if has(&task) && epoch.as_deref().is_none_or(has) {
            found += 1;
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", pid])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    found
}

/// Waits (up to 30 s) until no container carries task `id`'s label.
async fn wait_no_container(id: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end && !containers(&format!("omesh.task={id}")).is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn containers(label: &str) -> Vec<String> {
    Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label={label}"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Force-removes every container (running or not) carrying `label` (`key=value`).
pub fn remove_containers(label: &str) {
    let ids = containers(label);
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .args(["rm", "-f"])
            .args(&ids)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The bench image as a pinned reference, `omesh-test/busybox@sha256:<image id>`: a static
/// busybox with a few applet links, `docker import`ed as [`TEST_IMAGE_TAG`] unless the engine
/// has it already. Needs the docker CLI and a static `/bin/busybox` (Debian: busybox-static).
pub fn ensure_test_image() -> Result<String, String> {
    let id = match image_id(TEST_IMAGE_TAG) {
        Some(id) => id,
        None => {
            import_busybox_image(TEST_IMAGE_TAG)?;
            image_id(TEST_IMAGE_TAG)
                .ok_or_else(|| format!("{TEST_IMAGE_TAG} not found after docker import"))?
        }
    };
    let hex = id
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("unexpected image id {id:?}"))?;
    let name = TEST_IMAGE_TAG.split(':').next().unwrap_or(TEST_IMAGE_TAG);
    Ok(format!("{name}@sha256:{hex}"))
}

/// The local image ID (`sha256:<hex>`) of `reference`, if the engine has it.
pub fn image_id(reference: &str) -> Option<String> {
    let out = Command::new("docker")
        .args(["image", "inspect", "-f", "{{.Id}}", reference])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !id.is_empty()).then_some(id)
}

/// `docker import`s a rootfs of a static busybox with a few applet links as `tag`.
pub fn import_busybox_image(tag: &str) -> Result<(), String> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or("no /bin/busybox (install Debian's busybox-static)")?;
    if is_dynamic_elf(&busybox)? {
        return Err(format!(
            "{} is dynamically linked; install Debian's busybox-static",
            busybox.display()
        ));
    }
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let root = dir.path().join("rootfs");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| format!("mkdir {}: {e}", bin.display()))?;
    std::fs::create_dir_all(root.join("tmp")).map_err(|e| format!("mkdir tmp: {e}"))?;
    std::fs::copy(&busybox, bin.join("busybox"))
        .map_err(|e| format!("copy {}: {e}", busybox.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(bin.join("busybox"), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod busybox: {e}"))?;
    }
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", bin.join(applet))
            .map_err(|e| format!("symlink {applet}: {e}"))?;
    }
    let tar = dir.path().join("rootfs.tar");
    run_cmd(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    )?;
    run_cmd(Command::new("docker").arg("import").arg(&tar).arg(tag)).map(drop)
}

/// Whether the ELF file at `path` asks for a dynamic loader (has a PT_INTERP header).
fn is_dynamic_elf(path: &Path) -> Result<bool, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let bad = || format!("{} is not an ELF file", path.display());
    if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(bad());
    }
    let little = bytes.get(5) == Some(&1);
    let uint = |at: usize, len: usize| -> Result<u64, String> {
        let b = bytes.get(at..at + len).ok_or_else(bad)?;
        let mut v = 0u64;
        for (i, byte) in b.iter().enumerate() {
            let shift = (if little { i } else { len - 1 - i }) * 8;
            v |= u64::from(*byte) << shift;
        }
        Ok(v)
    };
    let (phoff, phentsize, phnum) = if bytes.get(4) == Some(&2) {
        (uint(0x20, 8)?, uint(0x36, 2)?, uint(0x38, 2)?)
    } else {
        (uint(0x1c, 4)?, uint(0x2a, 2)?, uint(0x2c, 2)?)
    };
    for i in 0..phnum {
        let at = usize::try_from(phoff + i * phentsize).map_err(|_| bad())?;
        if uint(at, 4)? == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Runs `cmd` to its end; its stdout, or an error naming the command, its status and stderr.
pub fn run_cmd(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::Summary;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Summary::of(&[5.0, 1.0, 4.0, 2.0, 3.0]);
        assert_eq!((s.n, s.p50, s.p99, s.max), (5, 3.0, 5.0, 5.0));
        let s = Summary::of(&(1..=100).map(f64::from).collect::<Vec<_>>());
        assert_eq!((s.p50, s.p99, s.max), (50.0, 99.0, 100.0));
        assert!(Summary::of(&[]).p50.is_nan());
    }
}
