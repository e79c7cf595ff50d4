//! Start real `omesh` processes on loopback and talk to them only through the API, as an
//! operator would.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use omesh::api::{PeerView, StatusView};

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_omesh")
}

/// A port nobody listens on right now (UDP and TCP), on 127.0.0.1.
pub fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// One running (or stopped) peer.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub quic_port: u16,
    pub api_port: u16,
    pub args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    /// Starts a peer with its own data dir under `root`.
    pub fn start(root: &Path, name: &str, seeds: &[String], extra: &[&str]) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let quic_port = free_port();
        let api_port = free_port();
        let mut args: Vec<String> = vec![
            "up".into(),
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--listen".into(),
            format!("/ip4/127.0.0.1/udp/{quic_port}/quic-v1"),
            "--api-listen".into(),
            format!("127.0.0.1:{api_port}"),
        ];
        for s in seeds {
            args.push("--seed".into());
            args.push(s.clone());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut n = Self {
            name: name.into(),
            dir,
            quic_port,
            api_port,
            args,
            child: None,
        };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log.txt"))
            .unwrap();
        let child = Command::new(bin())
            .args(&self.args)
            .env_remove("OMESH_API")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// The multiaddr others use to reach it.
    pub fn addr(&self) -> String {
        format!("/ip4/127.0.0.1/udp/{}/quic-v1", self.quic_port)
    }

    /// The API base URL.
    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then the exit status (waits up to 20 s).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        None
    }

    /// Starts it again with the same data dir and ports.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// The peer id of this node, as others list it.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log.txt")).unwrap_or_default()
    }

    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Option<T> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .ok()?;
        let resp = client
            .get(format!("{}{path}", self.api()))
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json().await.ok()
    }

    pub async fn text(&self, path: &str) -> Option<String> {
        let resp = reqwest::get(format!("{}{path}", self.api())).await.ok()?;
        resp.text().await.ok()
    }

    pub async fn status(&self) -> Option<StatusView> {
        self.get("/api/v1/status").await
    }

    pub async fn peers(&self) -> Option<Vec<PeerView>> {
        self.get("/api/v1/peers").await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `cond` every 200 ms until it holds or `limit` passes.
pub async fn wait_until<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints every node's log tail (for failing tests).
pub fn dump(nodes: &[&Node]) {
    for n in nodes {
        let log = n.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!("---- {} ----", n.name);
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
}

/// Reads one sample of a metric from the text exposition (sum over matching label sets).
pub fn metric(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let key = l.split_whitespace().next().unwrap_or("");
            let base = key.split('{').next().unwrap_or("");
            base == name && label.is_none_or(|lab| key.contains(lab))
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

pub mod docker;
