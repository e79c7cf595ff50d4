//! A mesh of local `omesh up` child processes on 127.0.0.1, for `omesh demo`, the bench
//! commands and the black-box tests in node/tests. Each peer gets its own data directory,
//! QUIC port and API port. A local mesh is admitted: one operator key (see [`Admission`])
//! signs a certificate for each peer before it starts.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::api::{PeerView, StatusView};
use crate::cli::client::{Client, ClientError};

/// One local peer process.
#[derive(Debug)]
pub struct LocalPeer {
    /// A short name.
    pub name: String,
    /// Its directory (data dir and log).
    pub dir: PathBuf,
    /// QUIC port.
    pub quic_port: u16,
    /// API port.
    pub api_port: u16,
    bin: PathBuf,
    args: Vec<String>,
    /// `cgroup.procs` files the process joins before it runs (empty: it stays in ours).
    cgroup: Vec<std::ffi::CString>,
    child: Option<Child>,
}

/// The operator of a local mesh: an admission key that admits each peer it starts.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The operator's admission secret key.
    pub operator: ed25519_dalek::SigningKey,
}

impl Admission {
    /// A fresh operator key.
    pub fn generate() -> Self {
        Self {
            operator: crate::cli::keys::generate(),
        }
    }

    /// The public key, as `admission_keys` takes it.
    pub fn public_hex(&self) -> String {
        crate::cli::keys::public_hex(&self.operator)
    }

    /// Creates the identity in `data_dir` (if missing) and writes its certificate there
    /// (valid for a year); returns the flags that make `omesh up` require admission.
    pub fn admit(&self, data_dir: &Path) -> std::io::Result<Vec<String>> {
        let now = crate::peer::Clock::new().now();
        crate::admission::admit_data_dir(
            &self.operator,
            data_dir,
            Default::default(),
            now,
            now.saturating_add(365 * 86_400_000),
            None,
        )
        .map_err(std::io::Error::other)?;
        Ok(vec!["--admission-key".into(), self.public_hex()])
    }
}

/// Writes `token` to `dir/api-token` (mode 0600) and returns the flags that make `omesh up`
/// read it from there: a token given as `--api-token` would be in the peer's argv, which every
/// local process can read.
pub fn token_flags(dir: &Path, token: &str) -> std::io::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("api-token");
    crate::datadir::write_private_file(&path, format!("{token}\n").as_bytes())?;
    Ok(vec!["--api-token-file".into(), path.display().to_string()])
}

/// The address of a QUIC port on 127.0.0.1.
fn quic_addr(port: u16) -> String {
    format!("/ip4/127.0.0.1/udp/{port}/quic-v1")
}

/// The `host:port` of an API port on 127.0.0.1.
fn api_addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

impl LocalPeer {
    /// Starts `bin up` with its own data directory `root/name`, fresh ports, `--seed` for
    /// each of `seeds`, and `extra` flags; admitted by `admission` if given (else it runs an
    /// open mesh, unless `extra` says otherwise). Its log goes to `root/name/omesh.log`.
    pub fn start(
        bin: &Path,
        root: &Path,
        name: &str,
        seeds: &[String],
        extra: &[String],
        admission: Option<&Admission>,
    ) -> std::io::Result<Self> {
        Self::start_in(bin, root, name, seeds, extra, admission, Vec::new())
    }

    /// [`Self::start`] in a cgroup: the process joins the cgroup whose `cgroup.procs` files
    /// are `cgroup` (`TaskCgroup::join_paths`) before it runs, at every (re)start.
    pub fn start_in(
        bin: &Path,
        root: &Path,
        name: &str,
        seeds: &[String],
        extra: &[String],
        admission: Option<&Admission>,
        cgroup: Vec<std::ffi::CString>,
    ) -> std::io::Result<Self> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        let admitted = match admission {
            Some(a) => a.admit(&dir.join("data"))?,
            None => Vec::new(),
        };
        let quic_port = free_quic_port()?;
        let api_port = free_port()?;
        let mut args: Vec<String> = vec![
            "up".into(),
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--listen".into(),
            quic_addr(quic_port),
            "--api-listen".into(),
            api_addr(api_port),
        ];
        for s in seeds {
            args.push("--seed".into());
            args.push(s.clone());
        }
        args.extend(admitted);
        args.extend(extra.iter().cloned());
        let mut peer = Self {
            name: name.into(),
            dir,
            quic_port,
            api_port,
            bin: bin.to_owned(),
            args,
            cgroup,
            child: None,
        };
        peer.spawn()?;
        Ok(peer)
    }

    /// The multiaddr peers dial.
    pub fn addr(&self) -> String {
        quic_addr(self.quic_port)
    }

    /// `host:port` of its API.
    pub fn api(&self) -> String {
        api_addr(self.api_port)
    }

    /// The base URL of its API.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api())
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("omesh.log")).unwrap_or_default()
    }

    /// A client of its API.
    pub fn client(&self) -> Client {
        Client::new(&self.api())
    }

    /// Its process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// If the process has exited on its own: its status and the end of its log.
    pub fn exited(&mut self) -> Option<String> {
        let c = self.child.as_mut()?;
        let status = c.try_wait().ok()??;
        self.child = None;
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        Some(format!(
            "{} exited ({status}): {}",
            self.name,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ))
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        // The peer's own log: owner only, like its data directory.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.dir.join("omesh.log"))?;
        let mut cmd = Command::new(&self.bin);
        if !self.cgroup.is_empty() {
            crate::exec::cgroup::join_paths_on_spawn(self.cgroup.clone(), &mut cmd);
        }
        let child = cmd
            .args(&self.args)
            .env_remove("OMESH_CONFIG")
            .env_remove("OMESH_API")
            // The token comes from the flags given (a token file), not from the caller's shell.
            .env_remove("OMESH_API_TOKEN")
            .env_remove("OMESH_API_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait up to 10 s, then SIGKILL.
    pub fn stop(&mut self) {
        let _ = self.terminate(Duration::from_secs(10));
    }

    /// SIGTERM and wait up to `limit` for its exit status; past that SIGKILL, and `None`.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// `kill -9`, then starts it again from its data directory.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill9();
        self.reclaim_ports()?;
        self.spawn()
    }

    /// A restarted peer keeps its ports: they come from outside the ephemeral range (see
    /// [`free_port`]), so no outbound connection takes them while it is down. Only if another
    /// process bound one explicitly meanwhile does it take a fresh one; the peer's identity is
    /// in its data dir, and others learn a new address from its record.
    fn reclaim_ports(&mut self) -> std::io::Result<()> {
        if std::net::TcpListener::bind(("127.0.0.1", self.api_port)).is_err() {
            let old = api_addr(self.api_port);
            self.api_port = free_port()?;
            self.replace_arg(&old, &api_addr(self.api_port));
        }
        if std::net::UdpSocket::bind(("127.0.0.1", self.quic_port)).is_err() {
            let old = quic_addr(self.quic_port);
            self.quic_port = free_quic_port()?;
            self.replace_arg(&old, &quic_addr(self.quic_port));
        }
        Ok(())
    }

    fn replace_arg(&mut self, old: &str, new: &str) {
        for a in self.args.iter_mut().filter(|a| *a == old) {
            new.clone_into(a);
        }
    }
}

impl Drop for LocalPeer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The kernel's ephemeral port range (`/proc/sys/net/ipv4/ip_local_port_range`), from which
/// it picks the local port of every outbound connection and of every bind to port 0.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        // Linux's default.
        .unwrap_or((32_768, 60_999))
}

/// The ports this module hands out: the larger stretch of 10000..=65535 outside the ephemeral
/// range. A port from the ephemeral range can be taken by any outbound connection on the
/// host while its peer is down, and the restarted peer then cannot bind it (a bench run died
/// so at kill 11 of 20); outside it, only another explicit bind can take it.
fn port_pool() -> std::ops::RangeInclusive<u16> {
    const LOW: u16 = 10_000;
    let (lo, hi) = ephemeral_range();
    let below = LOW..=lo.saturating_sub(1);
    let above = hi.saturating_add(1).max(LOW)..=u16::MAX;
    let len = |r: &std::ops::RangeInclusive<u16>| {
        usize::from(*r.end()).saturating_sub(usize::from(*r.start()))
    };
    if len(&below) >= len(&above) {
        below
    } else {
        above
    }
}

/// The next port to try: a cursor over [`port_pool`] shared by every caller in this process
/// (tests start meshes in parallel threads), starting at a random place so that two processes
/// (test binaries run side by side) rarely try the same ports.
fn next_candidate() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CURSOR: AtomicU32 = AtomicU32::new(u32::MAX);
    let pool = port_pool();
    let (start, len) = (
        u32::from(*pool.start()),
        u32::from(*pool.end()) - u32::from(*pool.start()) + 1,
    );
    let _ = CURSOR.compare_exchange(
        u32::MAX,
        rand::random::<u32>() % len,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    // Two ports per step: a QUIC port and the data plane's next to it.
    let step = CURSOR.fetch_add(2, Ordering::Relaxed);
    u16::try_from(start + step % len).unwrap_or(*pool.start())
}

/// Whether `port` on 127.0.0.1 is free for both UDP and TCP right now.
fn is_free(port: u16) -> bool {
    std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A port free on 127.0.0.1 for both UDP and TCP right now, from outside the ephemeral range
/// (see [`port_pool`]), so it stays free while its peer is down and restarts.
pub fn free_port() -> std::io::Result<u16> {
    for _ in 0..10_000 {
        let port = next_candidate();
        if is_free(port) {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port in {:?}", port_pool()),
    ))
}

/// A QUIC port whose next port (the data plane's default, where first contacts go) is free
/// for UDP too.
pub fn free_quic_port() -> std::io::Result<u16> {
    for _ in 0..10_000 {
        let port = free_port()?;
        if port < u16::MAX && std::net::UdpSocket::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free pair of ports in {:?}", port_pool()),
    ))
}

/// Local peers started from one binary.
#[derive(Debug)]
pub struct LocalMesh {
    /// The peers; the first is the seed of the others.
    pub peers: Vec<LocalPeer>,
    /// The operator that admitted them.
    pub admission: Admission,
    /// Per peer, the most connections it reported open while [`Self::wait_converged`]
    /// last waited: what a join costs before idle connections are trimmed.
    pub join_connections: Vec<usize>,
}

impl LocalMesh {
    /// Starts `n` peers under `root`, admitted by a fresh operator key. `extra(i)` adds
    /// flags for peer `i`.
    pub fn start(
        bin: &Path,
        root: &Path,
        n: usize,
        extra: impl Fn(usize) -> Vec<String>,
    ) -> std::io::Result<Self> {
        Self::start_in(bin, root, n, extra, |_| Vec::new())
    }

    /// [`Self::start`], with peer `i` in the cgroup whose `cgroup.procs` files are
    /// `cgroup(i)` (empty: in ours).
    pub fn start_in(
        bin: &Path,
        root: &Path,
        n: usize,
        extra: impl Fn(usize) -> Vec<String>,
        cgroup: impl Fn(usize) -> Vec<std::ffi::CString>,
    ) -> std::io::Result<Self> {
        let mut mesh = Self {
            peers: Vec::new(),
            admission: Admission::generate(),
            join_connections: Vec::new(),
        };
        let mut seed: Option<String> = None;
        for i in 0..n {
            let mut flags = Vec::new();
            if seed.is_none() {
                flags.extend(["--alone".to_owned(), "true".to_owned()]);
            }
            flags.extend(extra(i));
            let seeds: Vec<String> = seed.iter().cloned().collect();
            let peer = LocalPeer::start_in(
                bin,
                root,
                &format!("peer{i}"),
                &seeds,
                &flags,
                Some(&mesh.admission),
                cgroup(i),
            )?;
            seed.get_or_insert_with(|| peer.addr());
            mesh.peers.push(peer);
        }
        Ok(mesh)
    }

    /// Starts peer `i` again from its data directory.
    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        match self.peers.get_mut(i) {
            Some(p) => p.restart(),
            None => Ok(()),
        }
    }

    /// Statuses of running peers (None where the API did not answer).
    pub async fn statuses(&self) -> Vec<Option<StatusView>> {
        let mut out = Vec::new();
        for p in &self.peers {
            out.push(if p.is_running() {
                p.client().status().await.ok()
            } else {
                None
            });
        }
        out
    }

    /// Waits until every running peer is ready, sees all running peers alive, and all
    /// digests are equal.
    pub async fn wait_converged(&mut self, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        let running = self.peers.iter().filter(|p| p.is_running()).count();
        self.join_connections = vec![0; self.peers.len()];
        loop {
            for p in &mut self.peers {
                if let Some(why) = p.exited() {
                    return Err(why);
                }
            }
            let statuses = self.statuses().await;
            for (most, s) in self.join_connections.iter_mut().zip(&statuses) {
                if let Some(s) = s {
                    *most = (*most).max(s.peers_connected);
                }
            }
            let live: Vec<&StatusView> = statuses.iter().flatten().collect();
            let ok = live.len() == running
                && live.iter().all(|s| s.ready && s.peers_alive == running)
                && live.windows(2).all(|w| w[0].digest == w[1].digest);
            if ok {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "{running} peers did not converge in {limit:?}: {}",
                    live.iter()
                        .map(|s| format!("{} alive, digest {}", s.peers_alive, &s.digest[..8]))
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Peers as seen by peer `i`.
    pub async fn peers_seen_by(&self, i: usize) -> Result<Vec<PeerView>, ClientError> {
        match self.peers.get(i) {
            Some(p) => p.client().peers().await,
            None => Ok(Vec::new()),
        }
    }

    /// Stops every peer gracefully.
    pub fn stop_all(&mut self) {
        for p in &mut self.peers {
            p.stop();
        }
    }
}
