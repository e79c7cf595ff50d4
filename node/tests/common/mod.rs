//! Start real `omesh` processes on loopback and talk to them only through the API, as an
//! operator would.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::time::{Duration, Instant};

use omesh::api::{PeerView, StatusView};
use omesh::devtools::localmesh::{self, Admission, LocalPeer};

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_omesh")
}

/// A port nobody listens on right now (UDP and TCP), on 127.0.0.1.
pub fn free_port() -> u16 {
    localmesh::free_port().unwrap()
}

/// One running (or stopped) peer: a [`LocalPeer`] the tests talk to over its API.
pub struct Node(LocalPeer);

impl Deref for Node {
    type Target = LocalPeer;
    fn deref(&self) -> &LocalPeer {
        &self.0
    }
}

impl DerefMut for Node {
    fn deref_mut(&mut self) -> &mut LocalPeer {
        &mut self.0
    }
}

/// The operator of the tests' meshes: every [`Node::start`] is admitted by this key.
pub fn operator() -> Admission {
    Admission {
        operator: ed25519_dalek::SigningKey::from_bytes(&[77u8; 32]),
    }
}

impl Node {
    /// Starts a peer with its own data dir under `root`, admitted by [`operator`].
    pub fn start(root: &Path, name: &str, seeds: &[String], extra: &[&str]) -> Self {
        Self::start_with(root, name, seeds, extra, Some(&operator()))
    }

    /// Starts a peer admitted by `admission` (none: no certificate, no admission keys).
    pub fn start_with(
        root: &Path,
        name: &str,
        seeds: &[String],
        extra: &[&str],
        admission: Option<&Admission>,
    ) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        Self(LocalPeer::start(Path::new(bin()), root, name, seeds, &extra, admission).unwrap())
    }

    /// The API base URL.
    pub fn api(&self) -> String {
        self.0.api_url()
    }

    /// SIGTERM, then the exit status (waits up to 20 s).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.0.terminate(Duration::from_secs(20))
    }

    /// Starts it again with the same data dir (and fresh ports where the old ones were taken).
    pub fn restart(&mut self) {
        self.0.restart().unwrap();
    }

    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Option<T> {
        self.get_with(path, None).await
    }

    /// GET `path` with the bearer `token` if given; the decoded body of a success.
    pub async fn get_with<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> Option<T> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .ok()?;
        let mut req = client.get(format!("{}{path}", self.api()));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.ok()?;
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

/// Processes whose command line contains `marker`.
pub fn running_with(marker: &str) -> usize {
    std::process::Command::new("pgrep")
        .args(["-f", marker])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(0)
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
pub mod instances;

/// A submitter key and the flags every test peer needs to accept its tasks.
pub struct Submitter {
    pub key: ed25519_dalek::SigningKey,
    pub token: String,
    /// `--api-token-file FILE`: peers read the token from a file, never from their argv.
    token_flags: Vec<String>,
}

impl Submitter {
    pub fn new() -> Self {
        let token = "test-token".to_owned();
        // In the target dir, not in a temp dir of this Submitter's: a peer restarted after
        // its test dropped the Submitter still finds it (written atomically, so tests that
        // write it at once do not see each other's half).
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("omesh-api-token-{}", hex::encode(&token)));
        let token_flags = localmesh::token_flags(&dir, &token).unwrap();
        Self {
            key: ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]),
            token,
            token_flags,
        }
    }

    /// Flags for `omesh up`: authorize the key, read the token from a file, and ignore host
    /// memory pressure (the CI host's memory is not what these tests are about).
    pub fn flags(&self) -> Vec<String> {
        let mut f = self.flags_without_token();
        f.extend(self.token_flags.iter().cloned());
        f
    }

    /// [`Self::flags`] without the token, for a peer given it another way (its environment).
    pub fn flags_without_token(&self) -> Vec<String> {
        vec![
            "--authorized-submitter".into(),
            hex::encode(self.key.verifying_key().to_bytes()),
            "--threshold-memory".into(),
            "100".into(),
        ]
    }

    /// A signed spec running `command` with the process executor.
    pub fn spec(
        &self,
        command: &[&str],
        f: impl FnOnce(&mut omesh_protocol::TaskSpec),
    ) -> omesh_protocol::SignedTaskSpec {
        let mut spec = omesh_protocol::TaskSpec {
            image: format!("busybox@sha256:{}", "ab".repeat(32)),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            env: Default::default(),
            cpu_millis: 100,
            memory_bytes: 32 << 20,
            required_tags: Default::default(),
            priority: 0,
            max_attempts: 3,
            timeout_ms: 120_000,
            executor: omesh_protocol::ExecutorKind::Process,
            nonce: rand::random(),
            submitter: [0; 32],
            disconnect: Default::default(),
        };
        f(&mut spec);
        spec.sign(&self.key)
    }

    /// POSTs a spec; returns (HTTP status, JSON body).
    pub async fn post(
        &self,
        node: &Node,
        body: &serde_json::Value,
        token: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut req = reqwest::Client::new()
            .post(format!("{}/api/v1/tasks", node.api()))
            .json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or_default())
    }

    /// Submits a signed spec through `node`; returns the task id.
    pub async fn submit(&self, node: &Node, spec: &omesh_protocol::SignedTaskSpec) -> String {
        let body = serde_json::to_value(omesh::api::SubmitBody::from_signed(spec)).unwrap();
        let (status, json) = self.post(node, &body, Some(&self.token)).await;
        assert_eq!(status, 201, "submit refused: {json}");
        json["id"].as_str().unwrap().to_owned()
    }

    /// DELETE a task, with the cancel signed by this submitter.
    pub async fn cancel(&self, node: &Node, id: &str) -> u16 {
        let mut req = reqwest::Client::new()
            .delete(format!("{}/api/v1/tasks/{id}", node.api()))
            .bearer_auth(&self.token);
        if let Ok(task) = id.parse() {
            req = req.json(&omesh::api::CancelBody::sign(&self.key, task));
        }
        req.send().await.unwrap().status().as_u16()
    }
}

impl Default for Submitter {
    fn default() -> Self {
        Self::new()
    }
}

impl Node {
    pub async fn task(&self, id: &str) -> Option<omesh::api::TaskJson> {
        self.get(&format!("/api/v1/tasks/{id}")).await
    }

    /// The log chunk of task `id`'s current epoch from `offset`, fetched with `token` (the
    /// logs endpoint requires it); `None` unless the peer answered 200.
    pub async fn log_chunk(
        &self,
        token: &str,
        id: &str,
        offset: u64,
    ) -> Option<omesh::api::LogChunk> {
        self.get_with(
            &format!("/api/v1/tasks/{id}/logs?offset={offset}"),
            Some(token),
        )
        .await
    }

    /// The text of task `id`'s current log from its start, fetched with `token`.
    pub async fn logs(&self, token: &str, id: &str) -> Option<String> {
        self.log_chunk(token, id, 0).await.map(|c| c.data)
    }

    pub async fn node_id(&self) -> String {
        self.status().await.map(|s| s.node_id).unwrap_or_default()
    }

    pub async fn peer_id(&self) -> String {
        self.status().await.map(|s| s.peer_id).unwrap_or_default()
    }

    /// Sets this node's test-only block list.
    pub async fn block(&self, token: &str, peers: &[String]) {
        let resp = reqwest::Client::new()
            .post(format!("{}/api/v1/debug/block", self.api()))
            .bearer_auth(token)
            .json(&serde_json::json!({ "peers": peers }))
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_success(),
            "block refused: {}",
            resp.status()
        );
    }
}

/// Starts `n` peers (the first is the seed) with `extra(i)` flags, and waits until all see
/// each other alive.
pub async fn mesh(root: &Path, n: usize, extra: impl Fn(usize) -> Vec<String>) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..n {
        let mut flags = extra(i);
        let seeds = match nodes.first() {
            Some(seed) => vec![seed.addr()],
            None => {
                flags.push("--alone".into());
                flags.push("true".into());
                Vec::new()
            }
        };
        let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
        nodes.push(Node::start(root, &format!("n{i}"), &seeds, &refs));
    }
    let ok = wait_until(Duration::from_secs(60), || async {
        for node in &nodes {
            match node.status().await {
                Some(s) if s.ready && s.peers_alive == n => {}
                _ => return false,
            }
        }
        true
    })
    .await;
    if !ok {
        dump(&nodes.iter().collect::<Vec<_>>());
    }
    assert!(ok, "{n} peers did not join");
    nodes
}

/// Makes an in-process peer with `key` (a test's own swarm) an admitted peer of `node`: shows
/// `node` a certificate from [`operator`] in a first contact on its data plane, as `omesh up`
/// does before it dials.
pub async fn first_contact(key: &libp2p::identity::Keypair, node: &Node) {
    let me = omesh::peer::net::node_id_of_key(key).unwrap();
    let now = omesh::peer::Clock::new().now();
    let cert = omesh_protocol::AdmissionCert::sign(
        &operator().operator,
        me,
        Default::default(),
        now,
        now + 3_600_000,
    );
    let answer = show_cert(key, node, Some(cert)).await;
    assert!(
        matches!(
            answer,
            omesh::images::dataplane::contact::Answer::Admitted { .. }
        ),
        "{answer:?}"
    );
}

/// A first contact with `node` from an in-process peer with `key`, showing `cert`; `node`'s
/// answer.
pub async fn show_cert(
    key: &libp2p::identity::Keypair,
    node: &Node,
    cert: Option<omesh_protocol::AdmissionCert>,
) -> omesh::images::dataplane::contact::Answer {
    use omesh::images::dataplane::{self, contact};
    let endpoint = dataplane::endpoint(key, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], node.quic_port + 1));
    let (_, answer) = contact::first_contact(&endpoint, key, addr, cert)
        .await
        .unwrap();
    answer
}

/// The host's cgroup hierarchy under `parent`, or `None` (after saying why) when this host has
/// none a test may use; a failure instead under `OMESH_REQUIRE_CGROUPS=1` (CI).
pub fn cgroup_hierarchy(parent: &str) -> Option<omesh::exec::cgroup::Hierarchy> {
    match omesh::exec::cgroup::Hierarchy::detect(parent) {
        Ok(h) => Some(h),
        Err(e) if std::env::var("OMESH_REQUIRE_CGROUPS").as_deref() == Ok("1") => {
            panic!("OMESH_REQUIRE_CGROUPS=1 but {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// A submitter's flags with the same fake CPU figure on every peer, so host load (which
/// every peer on this host reads alike, at different instants) decides nothing.
pub fn fake_cpu_flags(sub: &Submitter) -> Vec<String> {
    let mut f = sub.flags();
    f.extend(["--fake-cpu-percent".into(), "10".into()]);
    f
}

/// (state, epoch, owner) of a task as one node sees it.
pub type TaskState = Option<(String, u64, Option<String>)>;

/// [`TaskState`] of each task as `node` sees it.
pub async fn task_views(node: &Node, ids: &[String]) -> Vec<TaskState> {
    let mut out = Vec::new();
    for id in ids {
        out.push(node.task(id).await.map(|t| (t.state, t.epoch, t.owner)));
    }
    out
}

/// A peer that ran alone while it was given `tasks` long tasks, and runs them all.
pub struct LoneOwner {
    /// The peer.
    pub node: Node,
    /// Its node id.
    pub id: String,
    /// The tasks' ids.
    pub tasks: Vec<String>,
    /// A string on every task's command line (see [`running_with`]).
    pub marker: String,
}

impl LoneOwner {
    /// Whether every view says the task runs on this owner at epoch 1.
    pub fn owns_all(&self, views: &[TaskState]) -> bool {
        views.iter().all(|v| {
            v.as_ref().is_some_and(|(s, e, o)| {
                s == "running" && *e == 1 && o.as_deref() == Some(self.id.as_str())
            })
        })
    }
}

/// Starts peer `name` alone (`--alone true`, with [`fake_cpu_flags`]) and submits to it
/// `tasks` tasks that sleep `sleep_s` s, whose command lines carry a marker made of `what`;
/// returns once it runs them all at epoch 1 (panics if it does not within a minute).
pub async fn lone_owner(
    root: &Path,
    sub: &Submitter,
    name: &str,
    what: &str,
    tasks: usize,
    sleep_s: u32,
) -> LoneOwner {
    let mut f = fake_cpu_flags(sub);
    f.extend(["--alone".into(), "true".into()]);
    let refs: Vec<&str> = f.iter().map(String::as_str).collect();
    let node = Node::start(root, name, &[], &refs);
    let mut id = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while id.is_empty() && Instant::now() < deadline {
        id = node.node_id().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!id.is_empty(), "the owner's API did not answer");
    let marker = format!("omesh-{what}-{}", rand::random::<u32>());
    let mut ids = Vec::new();
    for i in 0..tasks {
        let spec = sub.spec(
            &["sh", "-c", &format!("sleep {sleep_s}; echo {marker}-{i}")],
            |_| {},
        );
        ids.push(sub.submit(&node, &spec).await);
    }
    let owner = LoneOwner {
        node,
        id,
        tasks: ids,
        marker,
    };
    let all_on_owner = wait_until(Duration::from_secs(60), || async {
        owner.owns_all(&task_views(&owner.node, &owner.tasks).await)
    })
    .await;
    assert!(all_on_owner, "the lone owner did not run all {tasks} tasks");
    owner
}
