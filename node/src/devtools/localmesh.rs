//! A mesh of local `omesh up` child processes on 127.0.0.1, for `omesh demo` and the bench
//! commands. Each peer gets its own data directory, QUIC port and API port.

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
    args: Vec<String>,
    child: Option<Child>,
}

impl LocalPeer {
    /// The multiaddr peers dial.
    pub fn addr(&self) -> String {
        format!("/ip4/127.0.0.1/udp/{}/quic-v1", self.quic_port)
    }

    /// `host:port` of its API.
    pub fn api(&self) -> String {
        format!("127.0.0.1:{}", self.api_port)
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
        let log = std::fs::read_to_string(self.dir.join("omesh.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        Some(format!(
            "{} exited ({status}): {}",
            self.name,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ))
    }

    fn spawn(&mut self, bin: &Path) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("omesh.log"))?;
        let child = Command::new(bin)
            .args(&self.args)
            .env_remove("OMESH_CONFIG")
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
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if matches!(c.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for LocalPeer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A port free on 127.0.0.1 for both UDP and TCP right now.
pub fn free_port() -> std::io::Result<u16> {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
}

/// Local peers started from one binary.
#[derive(Debug)]
pub struct LocalMesh {
    bin: PathBuf,
    /// The peers; the first is the seed of the others.
    pub peers: Vec<LocalPeer>,
}

impl LocalMesh {
    /// Starts `n` peers under `root`. `extra(i)` adds flags for peer `i`.
    pub fn start(
        bin: &Path,
        root: &Path,
        n: usize,
        extra: impl Fn(usize) -> Vec<String>,
    ) -> std::io::Result<Self> {
        let mut mesh = Self {
            bin: bin.to_owned(),
            peers: Vec::new(),
        };
        let mut seed: Option<String> = None;
        for i in 0..n {
            let dir = root.join(format!("peer{i}"));
            std::fs::create_dir_all(&dir)?;
            let quic_port = free_port()?;
            let api_port = free_port()?;
            let mut args: Vec<String> = vec![
                "up".into(),
                "--data-dir".into(),
                dir.join("data").display().to_string(),
                "--listen".into(),
                format!("/ip4/127.0.0.1/udp/{quic_port}/quic-v1"),
                "--api-listen".into(),
                format!("127.0.0.1:{api_port}"),
            ];
            match &seed {
                Some(s) => {
                    args.push("--seed".into());
                    args.push(s.clone());
                }
                None => {
                    args.push("--alone".into());
                    args.push("true".into());
                }
            }
            args.extend(extra(i));
            let mut peer = LocalPeer {
                name: format!("peer{i}"),
                dir,
                quic_port,
                api_port,
                args,
                child: None,
            };
            peer.spawn(bin)?;
            seed.get_or_insert_with(|| peer.addr());
            mesh.peers.push(peer);
        }
        Ok(mesh)
    }

    /// Starts peer `i` again from its data directory.
    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        let bin = self.bin.clone();
        if let Some(p) = self.peers.get_mut(i) {
            p.kill9();
            p.spawn(&bin)?;
        }
        Ok(())
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
        loop {
            for p in &mut self.peers {
                if let Some(why) = p.exited() {
                    return Err(why);
                }
            }
            let statuses = self.statuses().await;
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
