//! The multi-host suite's mesh: peers in containers on a private Docker network, built from
//! the binary under test (`docker import` of a rootfs holding it, its shared libraries and a
//! static busybox: no registry), and what the tests read from them (API views, and the task
//! instances running in each container).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::common::docker::skip;
use super::common::{self, wait_until, Submitter};
use omesh::api::{StatusView, SubmitBody, TaskJson};

/// A generous bound on anything that has to happen.
pub(crate) const LONG: Duration = Duration::from_secs(90);
/// Busybox applets linked into the image (`ts` and `hostname` for the instances' markers).
const APPLETS: &[&str] = &[
    "sh", "sleep", "echo", "kill", "ps", "cat", "tr", "true", "false", "ts", "hostname", "touch",
    "rm",
];

/// Runs `docker args...`; stdout, or the error text.
pub(crate) fn docker(args: &[&str]) -> Result<String, String> {
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
pub(crate) struct Mesh {
    run: String,
    image: Option<String>,
    pub(crate) network: Option<String>,
    pub(crate) containers: Vec<String>,
    pub(crate) ips: Vec<String>,
    pub(crate) node_ids: Vec<String>,
    /// The operator's admission key file on the host (mounted to admit each peer).
    operator_key: PathBuf,
    /// A directory of the host's, bind-mounted at `/markers` in every peer (writable by the
    /// tasks' user): what instances write there is stamped by one clock, the host's.
    pub(crate) markers: PathBuf,
    /// Whether each peer's `omesh up` runs under a shell that starts it again when it exits
    /// after [`Self::restart_in_place`] asked for it (the container keeps running).
    restartable: bool,
    /// A peer its fault makes unreachable right now.
    pub(crate) down: Option<usize>,
    http: reqwest::Client,
    /// The host directory holding the rootfs, the key and the markers.
    _dir: tempfile::TempDir,
}

/// The shell that runs `omesh "$@"` as a restartable peer: it records the peer's pid, and
/// starts it again after it exits only when `/tmp/omesh.restart` asks for that (a peer that
/// dies on its own still ends the container, as without this shell).
const RESTART_LOOP: &str = r#"while :; do
    /omesh "$@" &
    echo $! > /tmp/omesh.pid
    wait $!
    status=$?
    [ -e /tmp/omesh.restart ] || exit $status
    rm -f /tmp/omesh.restart
    echo "omesh exited with $status, started again"
done"#;

/// A signal [`Mesh::restart_in_place`] ends a peer's `omesh` process with.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stop {
    Term,
    Kill,
}

impl Stop {
    /// The signal's name, as `kill -s` takes it.
    pub(crate) fn signal(self) -> &'static str {
        match self {
            Self::Term => "TERM",
            Self::Kill => "KILL",
        }
    }
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
    /// Builds the image, starts `peers` peers on a network of their own and waits until all
    /// see each other alive; `None` (with `SKIP <test>: <reason>` printed) when the image
    /// cannot be built here.
    pub(crate) async fn up(
        test: &str,
        peers: usize,
        restartable: bool,
        sub: &Submitter,
    ) -> Option<Self> {
        let started = Instant::now();
        for tool in ["tar", "ldd"] {
            if Command::new(tool).arg("--version").output().is_err() {
                skip(test, &format!("{tool} is not installed"));
                return None;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let markers = dir.path().join("markers");
        std::fs::create_dir(&markers).unwrap();
        // The instances run as `nobody`.
        std::fs::set_permissions(&markers, std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut mesh = Self {
            run: format!("{}-{:08x}", std::process::id(), rand::random::<u32>()),
            image: None,
            network: None,
            containers: Vec::new(),
            ips: Vec::new(),
            node_ids: Vec::new(),
            operator_key: dir.path().join("operator.key"),
            markers,
            restartable,
            down: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(4))
                .build()
                .unwrap(),
            _dir: dir,
        };
        omesh::cli::keys::write_key_file(
            &mesh.operator_key,
            &common::operator().operator,
            omesh::cli::keys::Overwrite::Refuse,
        )
        .unwrap();
        let tag = format!("omesh-multihost:{}", mesh.run);
        if let Err(e) = build_image(mesh._dir.path(), &tag) {
            let _ = docker(&["rmi", "-f", &tag]);
            skip(test, &format!("cannot build the peer image: {e}"));
            return None;
        }
        mesh.image = Some(tag);
        println!("{test}: image built in {:?}", started.elapsed());
        let network = format!("omesh-mh-{}", mesh.run);
        docker(&["network", "create", &network]).unwrap();
        mesh.network = Some(network);
        for i in 0..peers {
            mesh.start(i, sub);
        }
        mesh.wait_healed("start").await;
        for i in 0..peers {
            let id = mesh.status(i).await.unwrap().node_id;
            mesh.node_ids.push(id);
        }
        println!(
            "{test}: {peers} peers up at {:?} after {:?}",
            mesh.ips,
            started.elapsed()
        );
        Some(mesh)
    }

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
        args.extend(["-v".into(), format!("{}:/markers", self.markers.display())]);
        // The token goes in through the environment (`-e NAME` takes the value from the
        // docker CLI's), never in a command line.
        args.extend(["-e".into(), "OMESH_API_TOKEN".into()]);
        if self.restartable {
            args.extend(["--entrypoint".into(), "/bin/sh".into()]);
            args.push(self.image.clone().unwrap());
            args.extend(["-c".into(), RESTART_LOOP.into(), "sh".into()]);
        } else {
            args.push(self.image.clone().unwrap());
        }
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

    /// Ends the `omesh` process of restartable peer `i` with `stop` and has its shell start
    /// it again in the same container (whatever else runs there keeps running); waits until
    /// the old process is gone and a new one runs. The new process's pid.
    pub(crate) fn restart_in_place(&self, i: usize, stop: Stop) -> u32 {
        assert!(self.restartable, "peer {i} is not restartable in place");
        let c = &self.containers[i];
        let pid = || -> Option<u32> {
            docker(&["exec", c, "cat", "/tmp/omesh.pid"])
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let old = pid().unwrap_or_else(|| panic!("peer {i}: no /tmp/omesh.pid"));
        let signal = stop.signal();
        docker(&["exec", c, "touch", "/tmp/omesh.restart"]).unwrap();
        docker(&["exec", c, "kill", "-s", signal, &old.to_string()]).unwrap();
        let end = Instant::now() + LONG;
        loop {
            let alive = docker(&["exec", c, "kill", "-0", &old.to_string()]).is_ok();
            match pid() {
                Some(new) if new != old && !alive => return new,
                _ => {}
            }
            assert!(
                Instant::now() < end,
                "peer {i}: omesh {old} did not end and start again after SIG{signal}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Reads peer `i`'s address on the network again (it may change on restart or reconnect).
    pub(crate) fn refresh_ip(&mut self, i: usize) {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network.as_ref().unwrap()
        );
        self.ips[i] = docker(&["inspect", "-f", &format, &self.containers[i]]).unwrap();
    }

    pub(crate) fn live(&self) -> Vec<usize> {
        (0..self.containers.len())
            .filter(|i| Some(*i) != self.down)
            .collect()
    }

    pub(crate) async fn get<T: serde::de::DeserializeOwned>(
        &self,
        i: usize,
        path: &str,
    ) -> Option<T> {
        let url = format!("http://{}:7878{path}", self.ips[i]);
        let resp = self.http.get(url).send().await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json().await.ok()
    }

    pub(crate) async fn status(&self, i: usize) -> Option<StatusView> {
        self.get(i, "/api/v1/status").await
    }

    pub(crate) async fn tasks(&self, i: usize) -> Option<BTreeMap<String, TaskJson>> {
        let list: Vec<TaskJson> = self.get(i, "/api/v1/tasks").await?;
        Some(list.into_iter().map(|t| (t.id.clone(), t)).collect())
    }

    /// Every live peer is ready and judges all peers alive.
    pub(crate) async fn healed(&self) -> bool {
        for i in self.live() {
            match self.status(i).await {
                Some(s) if s.ready && s.peers_alive == self.containers.len() => {}
                _ => return false,
            }
        }
        true
    }

    pub(crate) async fn wait_healed(&self, what: &str) {
        let ok = wait_until(LONG, || self.healed()).await;
        assert!(ok, "{what}: the mesh did not heal");
    }

    /// Submits `sh -c script` through peer `i` (2 attempts, 120 s timeout); its id.
    pub(crate) async fn submit(&self, i: usize, sub: &Submitter, script: &str) -> String {
        self.submit_with(i, sub, script, |_| {}).await
    }

    /// [`Self::submit`] with the spec changed by `f` first.
    pub(crate) async fn submit_with(
        &self,
        i: usize,
        sub: &Submitter,
        script: &str,
        f: impl FnOnce(&mut omesh_protocol::TaskSpec),
    ) -> String {
        let spec = sub.spec(&["sh", "-c", script], |s| {
            s.max_attempts = 2;
            s.timeout_ms = 120_000;
            f(s);
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

    /// Task `id` as peer `i` sees it.
    pub(crate) async fn task(&self, i: usize, id: &str) -> Option<TaskJson> {
        self.get(i, &format!("/api/v1/tasks/{id}")).await
    }

    pub(crate) fn peer_of(&self, node: &str) -> Option<usize> {
        self.node_ids.iter().position(|n| n == node)
    }

    /// (task, epoch) of every task instance running in peer `i`'s container, read from the
    /// OMESH_TASK_ID and OMESH_EPOCH its executor gives each process; `None` when the
    /// container cannot be read (paused, or not running).
    pub(crate) fn instances(&self, i: usize) -> Option<Vec<(String, u64)>> {
        let mut found: Vec<(String, u64)> = self
            .task_processes(i)?
            .into_iter()
            .map(|(_, task, epoch)| (task, epoch))
            .collect();
        found.sort();
        found.dedup();
        Some(found)
    }

    /// (pid, task, epoch) of every process of a task instance in peer `i`'s container, by
    /// pid; `None` when the container cannot be read. Read as `nobody`, the tasks' user: the
    /// container's root lacks CAP_SYS_PTRACE, without which another user's
    /// /proc/PID/environ cannot be read (root saw none of the instances).
    pub(crate) fn task_processes(&self, i: usize) -> Option<Vec<(u32, String, u64)>> {
        let script = r#"cd /proc; for p in [0-9]*; do echo -n "$p "; cat $p/environ 2>/dev/null | tr '\000' ' '; echo; done"#;
        let c = &self.containers[i];
        let out = docker(&["exec", "-u", "65534:65534", c, "sh", "-c", script]).ok()?;
        let mut found: Vec<(u32, String, u64)> = out
            .lines()
            .filter_map(|l| {
                let var = |k: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(k).map(str::to_owned))
                };
                let pid = l.split_whitespace().next()?.parse().ok()?;
                Some((
                    pid,
                    var("OMESH_TASK_ID=")?,
                    var("OMESH_EPOCH=")?.parse().ok()?,
                ))
            })
            .collect();
        found.sort();
        Some(found)
    }

    /// (task, epoch) of the task instances in peer `i`'s paused container, seen from the
    /// host: its pids from `docker top`, their environments from /proc. `None` if that
    /// cannot be read (the test does not run as root, or the engine is on another host).
    pub(crate) fn frozen_instances(&self, i: usize) -> Option<Vec<(String, u64)>> {
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
    pub(crate) async fn lost_instances(
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
    pub(crate) fn lost_among(
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
    pub(crate) async fn wait_no_lost(&self, view: usize, limit: Duration, what: &str) -> Duration {
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
