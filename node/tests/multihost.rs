//! The multi-host suite: four peers, each in its own container on a private Docker network,
//! built from the binary under test (`docker import` of a rootfs holding it, its shared
//! libraries and a static busybox: no registry). Tasks are submitted in waves; under each
//! wave one fault hits the owner of its long task: `docker network disconnect`, `docker
//! pause`, `docker kill` then `docker start`. Every task must end exactly once, the views and
//! state digests of all peers must converge, and no instance may outlive its lease (issue
//! #15): from the failover until the fault ends, every second or so, no peer that can be read
//! (the cut-off one included) runs an instance of a lost epoch, nor two of one task; a
//! paused peer still holds its lost instances, frozen, and runs none of them moments after it
//! thaws; and none runs anywhere after any fault. The peers run tasks with the process
//! executor, each instance under its guard, as `nobody`, without cgroup limits (read-only in
//! the peer's container); the test reads instances from the OMESH_TASK_ID and OMESH_EPOCH of
//! the processes in each peer's container.
//! Skips without Docker, unless `OMESH_REQUIRE_DOCKER=1`.
#![allow(clippy::unwrap_used)]

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::docker::{docker_or_skip, skip};
use common::{wait_until, Submitter};
use omesh::api::{StatusView, SubmitBody, TaskJson};

const PEERS: usize = 4;
/// A generous bound on anything that has to happen.
const LONG: Duration = Duration::from_secs(90);
/// How long a fault lasts at least (well past lease ttl + grace = 3 s).
const HOLD: Duration = Duration::from_secs(8);
const APPLETS: &[&str] = &[
    "sh", "sleep", "echo", "kill", "ps", "cat", "tr", "true", "false",
];

/// Runs `docker args...`; stdout, or the error text.
fn docker(args: &[&str]) -> Result<String, String> {
    docker_with_env(args, &[])
}

/// `docker ARGS` with `env` set for the docker CLI (for `-e NAME`, which passes the CLI's
/// value on: a secret then shows in no command line).
fn docker_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Copies `file` and every shared library `ldd` lists for it (the loader too) into `root`.
fn copy_with_libs(file: &Path, root: &Path, dest: &str) -> Result<(), String> {
    let target = root.join(dest);
    std::fs::create_dir_all(target.parent().unwrap()).map_err(|e| e.to_string())?;
    // Without debug info the image is a tenth of the size; a plain copy if strip is missing.
    let stripped = Command::new("strip")
        .args(["--strip-debug", "-o"])
        .arg(&target)
        .arg(file)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(file, &target).map_err(|e| format!("copy {}: {e}", file.display()))?;
    }
    let ldd = Command::new("ldd")
        .arg(file)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    // A static binary makes ldd fail ("not a dynamic executable"): nothing to copy.
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            let to = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().unwrap()).map_err(|e| e.to_string())?;
            std::fs::copy(path, &to).map_err(|e| format!("copy {path}: {e}"))?;
        }
    }
    Ok(())
}

/// Builds the rootfs in `dir` and imports it as `tag`.
fn build_image(dir: &Path, tag: &str) -> Result<(), String> {
    let root = dir.join("rootfs");
    for d in ["bin", "tmp", "data", "etc"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    // The peers run as root, so process tasks run as `task_user` (nobody), which the peer
    // looks up in /etc/passwd.
    let files = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ];
    for (path, text) in files {
        std::fs::write(root.join(path), text).map_err(|e| format!("{path}: {e}"))?;
    }
    copy_with_libs(Path::new(common::bin()), &root, "omesh")?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .ok_or("no busybox (install Debian's busybox-static)")?;
    copy_with_libs(Path::new(busybox), &root, "bin/busybox")?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
            .map_err(|e| format!("symlink {applet}: {e}"))?;
    }
    let tar = dir.join("rootfs.tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err("tar of the rootfs failed".into());
    }
    docker(&[
        "import",
        "--change",
        r#"ENTRYPOINT ["/omesh"]"#,
        "--change",
        "ENV PATH=/bin",
        tar.to_str().unwrap(),
        tag,
    ])
    .map(drop)
}

/// Everything this run created in Docker; removed on drop, even after a failed assertion.
struct Mesh {
    run: String,
    image: Option<String>,
    network: Option<String>,
    containers: Vec<String>,
    ips: Vec<String>,
    node_ids: Vec<String>,
    /// The operator's admission key file on the host (mounted to admit each peer).
    operator_key: std::path::PathBuf,
    /// A peer its fault makes unreachable right now.
    down: Option<usize>,
    http: reqwest::Client,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // OMESH_MULTIHOST_LOGS=1 prints the peers' whole logs even when the suite passes.
        let all = std::env::var_os("OMESH_MULTIHOST_LOGS").is_some();
        if std::thread::panicking() || all {
            self.dump(if all { "all" } else { "40" });
        }
        for c in &self.containers {
            let _ = docker(&["unpause", c]);
            let _ = docker(&["rm", "-f", "-v", c]);
            let _ = docker(&["volume", "rm", "-f", c]);
        }
        if let Some(n) = &self.network {
            let _ = docker(&["network", "rm", n]);
        }
        if let Some(i) = &self.image {
            let _ = docker(&["rmi", "-f", i]);
        }
    }
}

impl Mesh {
    fn dump(&self, tail: &str) {
        for c in &self.containers {
            let logs = Command::new("docker")
                .args(["logs", "--tail", tail, c])
                .output()
                .map(|o| {
                    let out = String::from_utf8_lossy(&o.stdout);
                    format!("{out}{}", String::from_utf8_lossy(&o.stderr))
                })
                .unwrap_or_default();
            eprintln!("---- {c} ----\n{logs}");
        }
    }

    /// Starts peer `i` (peer 0 is the seed) with a data volume named like its container.
    fn start(&mut self, i: usize, sub: &Submitter) {
        let name = format!("omesh-mh-{}-p{i}", self.run);
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            &format!("p{i}"),
            "--network",
        ]
        .map(String::from)
        .to_vec();
        // Admitted first: the peer's identity and certificate go into its data volume, as an
        // operator does with `omesh admit --data-dir` (docker/compose deployments the same).
        let key_mount = format!("{}:/operator.key:ro", self.operator_key.display());
        let volume = format!("{name}:/data");
        docker(&[
            "run",
            "--rm",
            "-v",
            &volume,
            "-v",
            &key_mount,
            self.image.as_deref().unwrap(),
            "admit",
            "--key",
            "/operator.key",
            "--data-dir",
            "/data",
        ])
        .unwrap();
        args.push(self.network.clone().unwrap());
        args.extend(["-v".into(), volume]);
        // The token goes in through the environment (`-e NAME` takes the value from the
        // docker CLI's), never in a command line.
        args.extend(["-e".into(), "OMESH_API_TOKEN".into()]);
        args.push(self.image.clone().unwrap());
        args.extend(
            [
                "up",
                "--data-dir",
                "/data",
                "--listen",
                "/ip4/0.0.0.0/udp/7001/quic-v1",
                "--api-listen",
                "0.0.0.0:7878",
                "--executor",
                "process",
                // /sys/fs/cgroup is read-only in the peer's container: no task cgroups.
                "--process-limits",
                "best-effort",
                "--fake-cpu-percent",
                "10",
            ]
            .map(String::from),
        );
        args.extend(sub.flags_without_token());
        args.extend(["--admission-key".into(), common::operator().public_hex()]);
        match self.ips.first() {
            Some(seed) => args.extend(["--seed".into(), format!("/ip4/{seed}/udp/7001/quic-v1")]),
            None => args.extend(["--alone".into(), "true".into()]),
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        // Recorded first: a `docker run` that fails half-way still leaves a container to remove.
        self.containers.push(name);
        self.ips.push(String::new());
        docker_with_env(&refs, &[("OMESH_API_TOKEN", &sub.token)]).unwrap();
        self.refresh_ip(i);
    }

    /// Reads peer `i`'s address on the network again (it may change on restart or reconnect).
    fn refresh_ip(&mut self, i: usize) {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network.as_ref().unwrap()
        );
        self.ips[i] = docker(&["inspect", "-f", &format, &self.containers[i]]).unwrap();
    }

    fn live(&self) -> Vec<usize> {
        (0..self.containers.len())
            .filter(|i| Some(*i) != self.down)
            .collect()
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, i: usize, path: &str) -> Option<T> {
        let url = format!("http://{}:7878{path}", self.ips[i]);
        let resp = self.http.get(url).send().await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json().await.ok()
    }

    async fn status(&self, i: usize) -> Option<StatusView> {
        self.get(i, "/api/v1/status").await
    }

    async fn tasks(&self, i: usize) -> Option<BTreeMap<String, TaskJson>> {
        let list: Vec<TaskJson> = self.get(i, "/api/v1/tasks").await?;
        Some(list.into_iter().map(|t| (t.id.clone(), t)).collect())
    }

    /// Every live peer is ready and judges all peers alive.
    async fn healed(&self) -> bool {
        for i in self.live() {
            match self.status(i).await {
                Some(s) if s.ready && s.peers_alive == self.containers.len() => {}
                _ => return false,
            }
        }
        true
    }

    async fn wait_healed(&self, what: &str) {
        let ok = wait_until(LONG, || self.healed()).await;
        assert!(ok, "{what}: the mesh did not heal");
    }

    async fn submit(&self, i: usize, sub: &Submitter, script: &str) -> String {
        let spec = sub.spec(&["sh", "-c", script], |s| {
            s.max_attempts = 2;
            s.timeout_ms = 120_000;
        });
        let resp = self
            .http
            .post(format!("http://{}:7878/api/v1/tasks", self.ips[i]))
            .bearer_auth(&sub.token)
            .json(&SubmitBody::from_signed(&spec))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201, "submit to peer {i} refused");
        let body: serde_json::Value = resp.json().await.unwrap();
        body["id"].as_str().unwrap().to_owned()
    }

    fn peer_of(&self, node: &str) -> Option<usize> {
        self.node_ids.iter().position(|n| n == node)
    }

    /// (task, epoch) of every task instance running in peer `i`'s container, read from the
    /// OMESH_TASK_ID and OMESH_EPOCH its executor gives each process; `None` when the
    /// container cannot be read (paused, or not running). Read as `nobody`, the tasks' user:
    /// the container's root lacks CAP_SYS_PTRACE, without which another user's
    /// /proc/PID/environ cannot be read (read as root, it saw no instance at all).
    fn instances(&self, i: usize) -> Option<Vec<(String, u64)>> {
        let script = r#"cd /proc; for p in [0-9]*; do cat $p/environ 2>/dev/null | tr '\000' ' '; echo; done"#;
        let c = &self.containers[i];
        let out = docker(&["exec", "-u", "65534:65534", c, "sh", "-c", script]).ok()?;
        let mut found: Vec<(String, u64)> = out
            .lines()
            .filter_map(|l| {
                let var = |k: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(k).map(str::to_owned))
                };
                Some((var("OMESH_TASK_ID=")?, var("OMESH_EPOCH=")?.parse().ok()?))
            })
            .collect();
        found.sort();
        found.dedup();
        Some(found)
    }

    /// (task, epoch) of the task instances in peer `i`'s paused container, seen from the
    /// host: its pids from `docker top`, their environments from /proc. `None` if that
    /// cannot be read (the test does not run as root, or the engine is on another host).
    fn frozen_instances(&self, i: usize) -> Option<Vec<(String, u64)>> {
        let out = docker(&["top", &self.containers[i], "-o", "pid"]).ok()?;
        let mut found = Vec::new();
        for pid in out.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            let env = match std::fs::read(format!("/proc/{pid}/environ")) {
                Ok(env) => env,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(_) => return None,
            };
            let var = |k: &str| {
                env.split(|b| *b == 0)
                    .find_map(|kv| kv.strip_prefix(k.as_bytes()))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            if let (Some(task), Some(epoch)) = (var("OMESH_TASK_ID="), var("OMESH_EPOCH=")) {
                if let Ok(epoch) = epoch.parse() {
                    found.push((task, epoch));
                }
            }
        }
        found.sort();
        found.dedup();
        Some(found)
    }

    /// Instances of lost epochs, as (peer, task, epoch): those running in any of `peers`
    /// that can be read although peer `view`'s table, read before the scan, gave their task
    /// a higher epoch or gave this epoch to another peer, and a (task, epoch) running on two
    /// peers. Instances newer than the table are not judged. So, for each task, at most one
    /// instance runs and it is of the task's current epoch. Also which of `peers` could be
    /// read. `Err` if `view` does not answer.
    async fn lost_instances(
        &self,
        view: usize,
        peers: &[usize],
    ) -> Result<(Vec<(usize, String, u64)>, Vec<usize>), String> {
        let table = self
            .tasks(view)
            .await
            .ok_or_else(|| format!("peer {view} does not answer"))?;
        let found: Vec<(usize, Vec<(String, u64)>)> = peers
            .iter()
            .filter_map(|&i| Some((i, self.instances(i)?)))
            .collect();
        let read = found.iter().map(|(i, _)| *i).collect();
        Ok((self.lost_among(&table, &found), read))
    }

    /// Which of `found` (per peer, its (task, epoch) instances) are of lost epochs by
    /// `table` (see [`Self::lost_instances`]).
    fn lost_among(
        &self,
        table: &BTreeMap<String, TaskJson>,
        found: &[(usize, Vec<(String, u64)>)],
    ) -> Vec<(usize, String, u64)> {
        let mut lost = Vec::new();
        let mut seen: BTreeMap<(&str, u64), usize> = BTreeMap::new();
        for (i, instances) in found {
            for (task, epoch) in instances {
                if let Some(other) = seen.insert((task, *epoch), *i) {
                    lost.push((other, task.clone(), *epoch));
                    lost.push((*i, task.clone(), *epoch));
                    continue;
                }
                let Some(t) = table.get(task) else { continue };
                let superseded = t.epoch > *epoch
                    || (t.epoch == *epoch
                        && t.owner.as_deref() != Some(self.node_ids[*i].as_str()));
                if superseded {
                    lost.push((*i, task.clone(), *epoch));
                }
            }
        }
        lost
    }

    /// Waits until no instance of a lost epoch runs on any peer; how long that took.
    async fn wait_no_lost(&self, view: usize, limit: Duration, what: &str) -> Duration {
        let start = Instant::now();
        let all: Vec<usize> = (0..self.containers.len()).collect();
        let last = RefCell::new(Ok(Vec::new()));
        let clean = wait_until(limit, || async {
            let found = self.lost_instances(view, &all).await.map(|(lost, _)| lost);
            let ok = found.as_ref().is_ok_and(Vec::is_empty);
            *last.borrow_mut() = found;
            ok
        })
        .await;
        assert!(
            clean,
            "{what}: instances of lost epochs still run after {limit:?}: {:?}",
            last.borrow()
        );
        start.elapsed()
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Disconnect,
    Pause,
    KillRestart,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_survive_partition_pause_and_kill_of_peers_in_containers() {
    let test = "multihost";
    if !docker_or_skip(test) {
        return;
    }
    for tool in ["tar", "ldd"] {
        if Command::new(tool).arg("--version").output().is_err() {
            skip(test, &format!("{tool} is not installed"));
            return;
        }
    }
    let started = Instant::now();
    let sub = Submitter::new();
    let run = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
    let mut mesh = Mesh {
        image: None,
        network: None,
        containers: Vec::new(),
        ips: Vec::new(),
        node_ids: Vec::new(),
        operator_key: std::path::PathBuf::new(),
        down: None,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(4))
            .build()
            .unwrap(),
        run,
    };
    let dir = tempfile::tempdir().unwrap();
    mesh.operator_key = dir.path().join("operator.key");
    omesh::cli::keys::write_key_file(
        &mesh.operator_key,
        &common::operator().operator,
        omesh::cli::keys::Overwrite::Refuse,
    )
    .unwrap();
    let tag = format!("omesh-multihost:{}", mesh.run);
    if let Err(e) = build_image(dir.path(), &tag) {
        let _ = docker(&["rmi", "-f", &tag]);
        skip(test, &format!("cannot build the peer image: {e}"));
        return;
    }
    mesh.image = Some(tag);
    println!("image built in {:?}", started.elapsed());
    let network = format!("omesh-mh-{}", mesh.run);
    docker(&["network", "create", &network]).unwrap();
    mesh.network = Some(network);
    for i in 0..PEERS {
        mesh.start(i, &sub);
    }
    mesh.wait_healed("start").await;
    for i in 0..PEERS {
        let id = mesh.status(i).await.unwrap().node_id;
        mesh.node_ids.push(id);
    }
    println!(
        "{PEERS} peers up at {:?} after {:?}",
        mesh.ips,
        started.elapsed()
    );

    // Waves of tasks, each with one fault on the owner of its long task.
    let mut expect: BTreeMap<String, &str> = BTreeMap::new();
    let mut faults = Vec::new();
    // The peer each wave's fault hit, and the wave of each task (they end within it).
    let mut faulted = Vec::new();
    let mut wave_of = BTreeMap::new();
    let plan = [Fault::Disconnect, Fault::Pause, Fault::KillRestart];
    for (w, fault) in plan.into_iter().enumerate() {
        let wanted = 1 + w % (PEERS - 1);
        // A task runs where it is submitted when that peer has room: the long one goes to
        // the peer the fault is meant for.
        let long = mesh.submit(wanted, &sub, "sleep 15; echo ok").await;
        expect.insert(long.clone(), "succeeded");
        wave_of.insert(long.clone(), w);
        for k in 0..4 {
            let id = mesh.submit((w + k) % PEERS, &sub, "sleep 3; echo ok").await;
            wave_of.insert(id.clone(), w);
            expect.insert(id, "succeeded");
        }
        let id = mesh.submit((w + 2) % PEERS, &sub, "sleep 1; exit 3").await;
        wave_of.insert(id.clone(), w);
        expect.insert(id, "failed");

        let running = wait_until(LONG, || async {
            let t: Option<TaskJson> = mesh.get(0, &format!("/api/v1/tasks/{long}")).await;
            t.is_some_and(|t| t.state == "running" && t.owner.is_some())
        })
        .await;
        assert!(running, "wave {w}: the long task never ran");
        let t: TaskJson = mesh.get(0, &format!("/api/v1/tasks/{long}")).await.unwrap();
        let target = t.owner.as_deref().and_then(|o| mesh.peer_of(o)).unwrap();
        let (epoch0, c) = (t.epoch, mesh.containers[target].clone());
        // The instance reader sees what runs (else every check of it below would pass
        // vacuously).
        let seen = mesh.instances(target).unwrap_or_default();
        assert!(
            seen.contains(&(long.clone(), epoch0)),
            "wave {w}: the instances running on peer {target} were not read: {seen:?}"
        );
        let net = mesh.network.clone().unwrap();
        let incarnation0 = mesh.status(target).await.unwrap().incarnation;
        mesh.down = Some(target);
        let fault_at = Instant::now();
        match fault {
            Fault::Disconnect => docker(&["network", "disconnect", &net, &c]).unwrap(),
            Fault::Pause => docker(&["pause", &c]).unwrap(),
            Fault::KillRestart => docker(&["kill", &c]).unwrap(),
        };
        // The others take the long task over with a higher epoch.
        let observer = (target + 1) % PEERS;
        let failover = wait_until(LONG, || async {
            let t: Option<TaskJson> = mesh.get(observer, &format!("/api/v1/tasks/{long}")).await;
            t.is_some_and(|t| {
                t.epoch > epoch0 && t.owner.as_deref() != Some(mesh.node_ids[target].as_str())
            })
        })
        .await;
        let failover_after = fault_at.elapsed();
        assert!(
            failover,
            "wave {w}: no failover of {long} away from peer {target}"
        );
        // While the fault holds, no instance of a lost epoch runs anywhere, the faulted peer
        // included: its guards killed its instances when it could no longer show that its
        // leases held, before the others took over. A paused peer cannot be read (nothing in
        // it runs), a killed one has nothing left; a cut-off one is read.
        let all: Vec<usize> = (0..PEERS).collect();
        let (mut checks, mut target_read) = (0, 0);
        loop {
            let (lost, read) = mesh.lost_instances(observer, &all).await.unwrap();
            assert!(
                lost.is_empty(),
                "wave {w}: during {fault:?} of peer {target}, {:?} after the fault, instances \
                 of lost epochs run (peer, task, epoch): {lost:?}",
                fault_at.elapsed()
            );
            checks += 1;
            target_read += usize::from(read.contains(&target));
            if fault_at.elapsed() >= HOLD {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if matches!(fault, Fault::Disconnect) {
            assert!(target_read > 0, "wave {w}: the cut-off peer was never read");
        }
        // A paused peer's instances are frozen with its guards: those of lost epochs are
        // still there, to be killed the moment it thaws (seen from the host, where it can).
        let frozen_lost = match fault {
            Fault::Pause => {
                let table = mesh.tasks(observer).await.unwrap();
                mesh.frozen_instances(target)
                    .map(|found| mesh.lost_among(&table, &[(target, found)]).len())
            }
            _ => None,
        };
        assert_ne!(
            frozen_lost,
            Some(0),
            "wave {w}: the paused peer held no lost instance (its long task's epoch {epoch0} \
             should be there, frozen)"
        );
        match fault {
            Fault::Disconnect => docker(&["network", "connect", &net, &c]).unwrap(),
            Fault::Pause => docker(&["unpause", &c]).unwrap(),
            Fault::KillRestart => docker(&["start", &c]).unwrap(),
        };
        let held = fault_at.elapsed();
        let healed_at = Instant::now();
        mesh.refresh_ip(target);
        mesh.down = None;
        // The faulted peer runs no lost epoch within moments of the heal (each look is a
        // `docker exec`, 50-100 ms).
        let mut looks = 0;
        let target_clean = loop {
            let (lost, read) = mesh.lost_instances(observer, &[target]).await.unwrap();
            looks += 1;
            if lost.is_empty() && read == [target] {
                break healed_at.elapsed();
            }
            assert!(
                healed_at.elapsed() < Duration::from_secs(10),
                "wave {w}: peer {target} still runs lost epochs {:?} after {fault:?} ended: \
                 {lost:?}",
                healed_at.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Once the fault is over, still none: a paused peer's guards wake past their
        // deadline and kill at once; a restarted peer starts with nothing of its old run.
        let clean_after = mesh
            .wait_no_lost(
                observer,
                Duration::from_secs(10),
                &format!("wave {w}: after {fault:?} of peer {target}"),
            )
            .await;
        mesh.wait_healed(&format!("after {fault:?} of peer {target}"))
            .await;
        let healed_after = fault_at.elapsed();
        if matches!(fault, Fault::KillRestart) {
            let inc = mesh.status(target).await.unwrap().incarnation;
            assert_eq!(
                inc,
                incarnation0 + 1,
                "peer {target} restarted without incarnation+1"
            );
        }
        println!(
            "wave {w}: {fault:?} of peer {target} (owner of the long task, epoch {epoch0}): \
             failover after {failover_after:?}, fault held {held:?}; no instance of a lost \
             epoch in {checks} checks during the fault (the faulted peer read in \
             {target_read}); lost instances frozen in the paused peer: {frozen_lost:?}; the \
             faulted peer ran none {target_clean:?} after the heal ({looks} look(s)), and a scan of every peer \
             ({clean_after:?}) found none; all peers alive again {healed_after:?} after the fault"
        );
        faults.push(format!("{fault:?} p{target}"));
        faulted.push(target);
    }

    // Every task ends exactly once: terminal everywhere, one (state, epoch, owner) on every
    // peer, equal digests, and nothing left running in any container.
    let last = RefCell::new(String::new());
    let converged = wait_until(Duration::from_secs(150), || async {
        let mut views = Vec::new();
        for i in 0..PEERS {
            let (Some(tasks), Some(st)) = (mesh.tasks(i).await, mesh.status(i).await) else {
                *last.borrow_mut() = format!("peer {i} unreachable");
                return false;
            };
            views.push((tasks, st.digest));
        }
        for (id, want) in &expect {
            let states: Vec<_> = views
                .iter()
                .map(|(t, _)| {
                    t.get(id)
                        .map(|t| (t.state.clone(), t.epoch, t.owner.clone()))
                })
                .collect();
            if states
                .iter()
                .any(|s| s.as_ref().is_none_or(|s| s.0 != *want))
                || states.windows(2).any(|w| w[0] != w[1])
            {
                *last.borrow_mut() = format!("task {id}: want {want} everywhere, views {states:?}");
                return false;
            }
        }
        if views.windows(2).any(|w| w[0].1 != w[1].1) {
            *last.borrow_mut() = format!(
                "digests differ: {:?}",
                views.iter().map(|v| &v.1).collect::<Vec<_>>()
            );
            return false;
        }
        true
    })
    .await;
    assert!(
        converged,
        "no convergence after the faults: {}",
        last.borrow()
    );
    let tasks = mesh.tasks(0).await.unwrap();
    let mut lost = 0;
    let mut failed_over = 0;
    let mut twice = 0;
    // A task whose first owner had no fault in the task's wave has no reason to run again.
    let mut healthy_reruns = 0;
    for (id, want) in &expect {
        let t = &tasks[id];
        lost += usize::from(t.state != *want);
        failed_over += usize::from(t.epoch > 1 && *want == "succeeded");
        let ended = t.history.iter().filter(|h| h.state == "succeeded").count();
        if ended > 1 {
            twice += 1;
            let runs: Vec<_> = t
                .history
                .iter()
                .map(|h| (h.epoch, h.state.as_str(), mesh.peer_of(&h.reporter)))
                .collect();
            let first = t.history.iter().find(|h| h.state == "succeeded");
            let first = first.and_then(|h| mesh.peer_of(&h.reporter));
            let healthy = first.is_some_and(|p| p != faulted[wave_of[id]]);
            healthy_reruns += usize::from(healthy);
            let why = if healthy {
                ", a re-run: its first owner had no fault"
            } else {
                ""
            };
            println!("{}: (epoch, state, reporter) {runs:?}{why}", &id[..12]);
        }
        if *want == "failed" {
            assert_eq!(t.exit_code, Some(3), "{id}: {t:?}");
        }
    }
    let mut duplicates = 0;
    for i in 0..PEERS {
        let left = mesh
            .instances(i)
            .unwrap_or_else(|| panic!("peer {i} cannot be read"));
        duplicates += left.len();
        assert!(
            left.is_empty(),
            "peer {i} still runs {left:?} after convergence"
        );
        let running = mesh.tasks(i).await.unwrap();
        assert!(
            running.values().all(|t| t.state != "running"),
            "peer {i} lists a running task"
        );
    }
    let summary = format!(
        "multihost summary: tasks submitted: {} ({} ok, {} failing), faults injected: {} ({}), \
         tasks failed over: {failed_over}, tasks that succeeded in two epochs during a fault: \
         {twice} (of them re-runs of a task whose owner had no fault: {healthy_reruns}), \
         tasks lost: {lost}, duplicates after heal: {duplicates}, suite time: {:?}",
        expect.len(),
        expect.values().filter(|s| **s == "succeeded").count(),
        expect.values().filter(|s| **s == "failed").count(),
        faults.len(),
        faults.join(", "),
        started.elapsed()
    );
    println!("{summary}");
    // cargo test hides a passing test's output; .ci/run prints this file at its end.
    let _ = std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("multihost-summary.txt"),
        format!("{summary}\n"),
    );
    assert_eq!(lost, 0);
}
