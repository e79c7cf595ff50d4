//! The peer's configuration: one TOML file, every key also a flag of `omesh up` and an
//! `OMESH_*` environment variable. Precedence: flag or env, then file, then default.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use libp2p::{Multiaddr, PeerId};
use omesh_protocol::Capacity;
use omesh_state::ReplicaConfig;
use serde::{Deserialize, Serialize};

pub mod env;

/// The file name of a node's admission certificate in its data dir.
pub const ADMISSION_CERT_FILE: &str = "admission.cert";

/// Most bytes read from `api_token_file` (its first line is the token).
const TOKEN_FILE_MAX_BYTES: u64 = 64 * 1024;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Which executor runs tasks that accept any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorChoice {
    /// Docker when the engine answers, else processes.
    #[default]
    Auto,
    /// Docker; start-up fails if the engine does not answer.
    Docker,
    /// Native processes only.
    Process,
}

/// Everything `omesh up` can be told. Keys keep these names in the TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Where the identity key, incarnation counter and blobs live.
    pub data_dir: PathBuf,
    /// The QUIC multiaddr to listen on.
    pub listen: String,
    /// Multiaddrs of peers to join through.
    pub seeds: Vec<String>,
    /// Address of the status API.
    pub api_listen: SocketAddr,
    /// Bearer token for API mutations (none: mutations refused).
    pub api_token: Option<String>,
    /// Tags of this node.
    pub tags: BTreeSet<String>,
    /// CPU offered, in thousandths of a core (default: all cores).
    pub cpu_millis: Option<u32>,
    /// Memory offered, in bytes (default: all memory).
    pub memory_bytes: Option<u64>,
    /// Hex ed25519 public keys allowed to submit tasks.
    pub authorized_submitters: Vec<String>,
    /// Peer ids allowed to connect (empty: any peer).
    pub allowed_peers: Vec<String>,
    /// Hex ed25519 public keys whose admission certificates admit a node to this mesh
    /// (empty: the mesh is open, any peer that can reach it joins).
    pub admission_keys: Vec<String>,
    /// This node's admission certificate (from `omesh admit`; default `<data_dir>/admission.cert`).
    pub admission_cert: Option<PathBuf>,
    /// Whether a loaded node hands work to others.
    pub enable_offload: bool,
    /// CPU percent above which this node takes no new work.
    pub threshold_cpu: u8,
    /// Memory percent above which this node takes no new work.
    pub threshold_memory: u8,
    /// Hysteresis, percentage points: once over a threshold, this node takes no new work
    /// until its CPU and memory are both this far below their thresholds.
    pub threshold_margin: u8,
    /// Peers with one of these tags receive offloaded work first.
    pub target_node_tags: BTreeSet<String>,
    /// Probe period (SWIM: one ping per period); a changed record is published at most this often.
    pub heartbeat_ms: u64,
    /// How long a suspected owner's leases hold (its time to refute the suspicion).
    pub lease_ttl_ms: u64,
    /// Extra wait before a lease counts as lost.
    pub lease_grace_ms: u64,
    /// Anti-entropy period.
    pub anti_entropy_ms: u64,
    /// Terminal tasks are compacted after this long.
    pub retention_ms: u64,
    /// Log format.
    pub log_format: LogFormat,
    /// Report ready without any peer (a mesh of one).
    pub alone: bool,
    /// Test-only: a fixed CPU load in percent instead of the measured one.
    pub fake_cpu_percent: Option<u8>,
    /// How many peers to keep connections to.
    pub target_peers: usize,
    /// Executor: auto, docker or process.
    pub executor: ExecutorChoice,
    /// UDP address of the blob data plane (default: the `listen` IP, QUIC port + 1). Joining
    /// peers make their first contact (admission) at a seed's QUIC port + 1, so a seed keeps
    /// the default port.
    pub blob_listen: Option<SocketAddr>,
    /// Most bytes the blob store holds; least-recently-used blobs no live task needs go first.
    pub blob_cap_bytes: u64,
    /// Most bytes per second this node serves to other peers, all together (0: no cap).
    pub blob_serve_bytes_per_sec: u64,
    /// Test-only: flip a byte of every blob chunk served.
    pub debug_corrupt_blobs: bool,
    /// Test-only: cut each blob connection once it has carried this many bytes.
    pub debug_drop_after_bytes: Option<u64>,
    /// A file holding the API bearer token (first line), so the token never has to be in
    /// argv, where every local process can read it through /proc.
    pub api_token_file: Option<PathBuf>,
    /// CPU limit, in thousandths of a core, of a task whose spec asks for 0.
    pub task_default_cpu_millis: u32,
    /// Memory limit, in bytes, of a task whose spec asks for 0.
    pub task_default_memory_bytes: u64,
    /// Most processes (and threads) one task instance may have at once.
    pub task_pids_limit: u32,
    /// The unprivileged user process tasks run as when the peer runs as root.
    pub task_user: String,
    /// Where task cgroups are made, under each controller's root (cgroup v1) or the unified
    /// root (v2).
    pub cgroup_parent: String,
    /// Whether the process executor may run a task whose limits it cannot enforce (no
    /// writable cgroup controller): `enforce` (refuse such tasks) or `best-effort`.
    pub process_limits: ProcessLimits,
    /// How long before the lease could lapse elsewhere each instance's guard kills it, ms
    /// (see README, "A task instance never outlives its lease").
    pub guard_margin_ms: u64,
    /// How long a node waits between claiming a task and starting it, ms (about one gossip
    /// round trip, so that a concurrent claim of the same epoch is seen before anything runs).
    pub settle_ms: u64,
}

/// What the process executor does with limits it cannot enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ProcessLimits {
    /// Refuse a task with limits when no cgroup controller is writable.
    #[default]
    Enforce,
    /// Run it without limits (the operator opted out).
    BestEffort,
}

impl Default for NodeConfig {
    fn default() -> Self {
        let r = ReplicaConfig::default();
        Self {
            data_dir: PathBuf::from("omesh-data"),
            listen: "/ip4/0.0.0.0/udp/7001/quic-v1".into(),
            seeds: Vec::new(),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            api_token: None,
            tags: BTreeSet::new(),
            cpu_millis: None,
            memory_bytes: None,
            authorized_submitters: Vec::new(),
            allowed_peers: Vec::new(),
            admission_keys: Vec::new(),
            admission_cert: None,
            enable_offload: r.enable_offload,
            threshold_cpu: r.threshold_cpu,
            threshold_memory: r.threshold_memory,
            threshold_margin: r.threshold_margin,
            target_node_tags: BTreeSet::new(),
            heartbeat_ms: r.heartbeat_ms,
            lease_ttl_ms: r.lease_ttl_ms,
            lease_grace_ms: r.lease_grace_ms,
            anti_entropy_ms: r.anti_entropy_ms,
            retention_ms: r.retention_ms,
            log_format: LogFormat::Pretty,
            alone: false,
            fake_cpu_percent: None,
            target_peers: 6,
            executor: ExecutorChoice::Auto,
            blob_listen: None,
            blob_cap_bytes: crate::images::blobs::DEFAULT_CAP_BYTES,
            blob_serve_bytes_per_sec: 0,
            debug_corrupt_blobs: false,
            debug_drop_after_bytes: None,
            api_token_file: None,
            task_default_cpu_millis: 1_000,
            task_default_memory_bytes: 512 << 20,
            task_pids_limit: 512,
            task_user: "nobody".into(),
            cgroup_parent: "omesh".into(),
            process_limits: ProcessLimits::Enforce,
            guard_margin_ms: 500,
            settle_ms: 150,
        }
    }
}

/// A configuration that cannot work. The message names the key and the bad value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file or an override is not valid for the schema (unknown key, wrong type).
    #[error("invalid config{}: {message}", path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    Parse {
        /// The file, if the error is in it.
        path: Option<PathBuf>,
        /// What the parser said (it names the key).
        message: String,
    },
    /// A key holds a value that does not work.
    #[error("invalid config key `{key}`: {reason}")]
    Value {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
}

fn value(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Value {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// The checked, parsed form of the network keys.
#[derive(Debug, Clone)]
pub struct NetPlan {
    /// Listen address.
    pub listen: Multiaddr,
    /// Seed addresses.
    pub seeds: Vec<Multiaddr>,
    /// Allowed peers (empty: any).
    pub allowed_peers: BTreeSet<PeerId>,
    /// Where the blob data plane listens.
    pub blob_listen: SocketAddr,
    /// Admission public keys (empty: the mesh is open).
    pub admission_keys: BTreeSet<[u8; 32]>,
}

impl NodeConfig {
    /// Loads `file` (if any) and lays `overrides` (a TOML table of flags and env values) over it.
    pub fn load(
        file: Option<&std::path::Path>,
        overrides: toml::Table,
    ) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                // Parse the file alone first so that its errors name the file.
                let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: Some(path.to_owned()),
                    message: e.to_string(),
                })?;
                Self::deserialize(table.clone()).map_err(|e| ConfigError::Parse {
                    path: Some(path.to_owned()),
                    message: e.to_string(),
                })?;
                table
            }
            None => toml::Table::new(),
        };
        for (k, v) in overrides {
            table.insert(k, v);
        }
        let cfg = Self::deserialize(table).map_err(|e| ConfigError::Parse {
            path: None,
            message: e.to_string(),
        })?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks values serde cannot: addresses, keys, ranges.
    pub fn check(&self) -> Result<NetPlan, ConfigError> {
        let listen: Multiaddr = self.listen.parse().map_err(|e| {
            value(
                "listen",
                format!("{:?} is not a multiaddr: {e}", self.listen),
            )
        })?;
        if !self.listen.contains("/quic-v1") {
            return Err(value(
                "listen",
                format!(
                    "{:?} must be a QUIC address like /ip4/0.0.0.0/udp/7001/quic-v1",
                    self.listen
                ),
            ));
        }
        let mut seeds = Vec::new();
        for s in &self.seeds {
            let addr: Multiaddr = s
                .parse()
                .map_err(|e| value("seeds", format!("{s:?} is not a multiaddr: {e}")))?;
            seeds.push(addr);
        }
        for k in &self.authorized_submitters {
            parse_key(k).map_err(|reason| value("authorized_submitters", reason))?;
        }
        let mut allowed_peers = BTreeSet::new();
        for p in &self.allowed_peers {
            let id: PeerId = p
                .parse()
                .map_err(|e| value("allowed_peers", format!("{p:?} is not a peer id: {e}")))?;
            allowed_peers.insert(id);
        }
        let mut admission_keys = BTreeSet::new();
        for k in &self.admission_keys {
            admission_keys.insert(parse_key(k).map_err(|reason| value("admission_keys", reason))?);
        }
        if self
            .admission_cert
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(value("admission_cert", "must not be an empty path"));
        }
        if self.api_token.as_deref().is_some_and(str::is_empty) {
            return Err(value("api_token", "must not be empty"));
        }
        if self
            .api_token_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(value("api_token_file", "must not be an empty path"));
        }
        if self.api_token.is_some() && self.api_token_file.is_some() {
            return Err(value(
                "api_token_file",
                "set either api_token or api_token_file, not both",
            ));
        }
        if self.task_default_cpu_millis == 0 {
            return Err(value(
                "task_default_cpu_millis",
                "must be more than 0 (a task is never unlimited)",
            ));
        }
        if self.task_default_memory_bytes < (4 << 20) {
            return Err(value(
                "task_default_memory_bytes",
                "must be at least 4 MiB (a task is never unlimited)",
            ));
        }
        if self.task_pids_limit < 8 {
            return Err(value("task_pids_limit", "must be at least 8"));
        }
        if self.task_user.is_empty() {
            return Err(value("task_user", "must name a user"));
        }
        if self.cgroup_parent.is_empty() || self.cgroup_parent.split('/').any(|c| c == "..") {
            return Err(value(
                "cgroup_parent",
                format!(
                    "{:?} must be a relative path without ..",
                    self.cgroup_parent
                ),
            ));
        }
        if self.guard_margin_ms >= self.lease_ttl_ms + self.lease_grace_ms {
            return Err(value(
                "guard_margin_ms",
                format!(
                    "must be less than lease_ttl_ms + lease_grace_ms ({} ms)",
                    self.lease_ttl_ms + self.lease_grace_ms
                ),
            ));
        }
        if self.settle_ms > 600_000 {
            return Err(value("settle_ms", "must be at most 600000 (10 minutes)"));
        }
        if self.target_peers == 0 {
            return Err(value("target_peers", "must be at least 1"));
        }
        if self.fake_cpu_percent.is_some_and(|p| p > 100) {
            return Err(value("fake_cpu_percent", "must be 0..=100"));
        }
        // Admission is checked at start, against the node's identity and certificate file;
        // here only the rest of the replica's keys.
        let mut r = self.replica_config(
            Default::default(),
            1,
            Capacity {
                cpu_millis: 1,
                memory_bytes: 1,
            },
            None,
        );
        r.admission_keys.clear();
        r.validate().map_err(|e| value(e.key, e.reason))?;
        if self.blob_cap_bytes == 0 {
            return Err(value("blob_cap_bytes", "must be more than 0"));
        }
        if self.debug_drop_after_bytes == Some(0) {
            return Err(value("debug_drop_after_bytes", "must be more than 0"));
        }
        let blob_listen = match self.blob_listen {
            Some(a) => a,
            None => default_blob_listen(&listen).ok_or_else(|| {
                value(
                    "blob_listen",
                    format!(
                        "cannot derive it from listen = {:?}; set it (e.g. 0.0.0.0:7002)",
                        self.listen
                    ),
                )
            })?,
        };
        Ok(NetPlan {
            listen,
            seeds,
            allowed_peers,
            blob_listen,
            admission_keys,
        })
    }

    /// The API bearer token, resolved in one place: `api_token` (from the file, the flag or
    /// `OMESH_API_TOKEN`), or the first line of `api_token_file`, trimmed. `None`: the node
    /// has no token, and refuses mutations and logs. A token file that other users may read
    /// is used, with a warning.
    pub fn resolve_api_token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.api_token_file else {
            return Ok(self.api_token.clone());
        };
        let key = "api_token_file";
        let file = std::fs::File::open(path)
            .map_err(|e| value(key, format!("cannot read {}: {e}", path.display())))?;
        #[cfg(unix)]
        if let Ok(meta) = file.metadata() {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:03o}"),
                    "the API token file is readable by other users; chmod 600 it"
                );
            }
        }
        // A token is a line; a file far longer is not a token file (or is /dev/zero).
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(file, TOKEN_FILE_MAX_BYTES),
            &mut text,
        )
        .map_err(|e| value(key, format!("cannot read {}: {e}", path.display())))?;
        let token = text.lines().next().unwrap_or_default().trim();
        if token.is_empty() {
            return Err(value(
                key,
                format!("{} has no token: its first line is empty", path.display()),
            ));
        }
        Ok(Some(token.to_owned()))
    }

    /// Where this node's admission certificate is read from.
    pub fn admission_cert_path(&self) -> PathBuf {
        self.admission_cert
            .clone()
            .unwrap_or_else(|| self.data_dir.join(ADMISSION_CERT_FILE))
    }

    /// The replica's part of the configuration; `cert` is this node's admission certificate
    /// (read from `admission_cert_path`).
    pub fn replica_config(
        &self,
        node_id: omesh_protocol::NodeId,
        incarnation: u64,
        detected: Capacity,
        cert: Option<&omesh_protocol::AdmissionCert>,
    ) -> ReplicaConfig {
        let mut r = ReplicaConfig::for_node(node_id);
        r.incarnation = incarnation;
        r.capacity = Capacity {
            cpu_millis: self.cpu_millis.unwrap_or(detected.cpu_millis),
            memory_bytes: self.memory_bytes.unwrap_or(detected.memory_bytes),
        };
        r.tags = self.tags.clone();
        r.authorized_submitters = self
            .authorized_submitters
            .iter()
            .filter_map(|k| parse_key(k).ok())
            .collect();
        r.admission_keys = self
            .admission_keys
            .iter()
            .filter_map(|k| parse_key(k).ok())
            .collect();
        r.cert = cert.cloned();
        r.enable_offload = self.enable_offload;
        r.threshold_cpu = self.threshold_cpu;
        r.threshold_memory = self.threshold_memory;
        r.threshold_margin = self.threshold_margin;
        r.target_node_tags = self.target_node_tags.clone();
        r.heartbeat_ms = self.heartbeat_ms;
        r.lease_ttl_ms = self.lease_ttl_ms;
        r.lease_grace_ms = self.lease_grace_ms;
        r.probe_timeout_ms = r.probe_timeout_ms.min(self.heartbeat_ms / 2).max(1);
        r.anti_entropy_ms = self.anti_entropy_ms;
        r.retention_ms = self.retention_ms;
        r.settle_ms = self.settle_ms;
        // Fresh at every start: the replica's claim staggers and probe order are its only
        // randomness, and two peers (or two incarnations of one) must not draw alike.
        r.seed = rand::random();
        r
    }
}

/// The blob data plane's default address: the QUIC listen IP, UDP port + 1 (0 stays 0).
fn default_blob_listen(listen: &Multiaddr) -> Option<SocketAddr> {
    use libp2p::multiaddr::Protocol;
    let mut ip = None;
    let mut port = None;
    for p in listen.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Udp(p) => port = Some(p),
            _ => {}
        }
    }
    let port = match port? {
        0 => 0,
        p => p.checked_add(1)?,
    };
    Some(SocketAddr::new(ip?, port))
}

/// Parses a hex ed25519 public key.
pub fn parse_key(s: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out)
        .map_err(|_| format!("{s:?} is not a 64-character hex ed25519 public key"))?;
    ed25519_dalek::VerifyingKey::from_bytes(&out)
        .map_err(|_| format!("{s:?} is not a valid ed25519 public key"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let mut t = toml::Table::new();
        t.insert("threshhold_cpu".into(), toml::Value::Integer(50));
        let err = NodeConfig::load(None, t).unwrap_err().to_string();
        assert!(err.contains("threshhold_cpu"), "{err}");
    }

    #[test]
    fn bad_seed_is_named() {
        let mut t = toml::Table::new();
        t.insert(
            "seeds".into(),
            toml::Value::Array(vec!["not-an-addr".into()]),
        );
        let err = NodeConfig::load(None, t).unwrap_err().to_string();
        assert!(
            err.contains("seeds") && err.contains("not-an-addr"),
            "{err}"
        );
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("omesh.toml");
        std::fs::write(&path, "threshold_cpu = 60\ntags = [\"edge\"]\n").unwrap();
        let mut t = toml::Table::new();
        t.insert("threshold_cpu".into(), toml::Value::Integer(90));
        let cfg = NodeConfig::load(Some(&path), t).unwrap();
        assert_eq!(cfg.threshold_cpu, 90);
        assert!(cfg.tags.contains("edge"));
    }

    #[test]
    fn blob_listen_defaults_to_the_next_port() {
        let cfg = NodeConfig {
            listen: "/ip4/10.0.0.5/udp/7001/quic-v1".into(),
            ..NodeConfig::default()
        };
        assert_eq!(
            cfg.check().unwrap().blob_listen,
            "10.0.0.5:7002".parse().unwrap()
        );
        let mut t = toml::Table::new();
        t.insert("blob_cap_bytes".into(), toml::Value::Integer(0));
        let err = NodeConfig::load(None, t).unwrap_err().to_string();
        assert!(err.contains("blob_cap_bytes"), "{err}");
    }

    #[test]
    fn bad_admission_key_names_the_key_and_the_value() {
        for bad in ["zz", "abcd", &"g".repeat(64)] {
            let mut t = toml::Table::new();
            t.insert(
                "admission_keys".into(),
                toml::Value::Array(vec![bad.into()]),
            );
            let err = NodeConfig::load(None, t).unwrap_err().to_string();
            assert!(err.contains("admission_keys") && err.contains(bad), "{err}");
        }
        let mut t = toml::Table::new();
        t.insert("admission_keys".into(), toml::Value::String("ab".into()));
        let err = NodeConfig::load(None, t).unwrap_err().to_string();
        assert!(err.contains("admission_keys"), "{err}");
    }

    #[test]
    fn admission_keys_parse_and_the_cert_defaults_to_the_data_dir() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let hexkey = hex::encode(key.verifying_key().to_bytes());
        let mut t = toml::Table::new();
        t.insert(
            "admission_keys".into(),
            toml::Value::Array(vec![hexkey.into()]),
        );
        t.insert("data_dir".into(), toml::Value::String("/srv/omesh".into()));
        let cfg = NodeConfig::load(None, t).unwrap();
        let plan = cfg.check().unwrap();
        assert!(plan
            .admission_keys
            .contains(&key.verifying_key().to_bytes()));
        assert_eq!(
            cfg.admission_cert_path(),
            PathBuf::from("/srv/omesh/admission.cert")
        );
        let mut t = toml::Table::new();
        t.insert("admission_cert".into(), toml::Value::String(String::new()));
        let err = NodeConfig::load(None, t).unwrap_err().to_string();
        assert!(err.contains("admission_cert"), "{err}");
    }

    #[test]
    fn the_api_token_comes_from_the_key_or_the_first_line_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = |token: Option<&str>, file: Option<&std::path::Path>| NodeConfig {
            api_token: token.map(str::to_owned),
            api_token_file: file.map(std::path::Path::to_owned),
            ..NodeConfig::default()
        };
        assert_eq!(cfg(None, None).resolve_api_token().unwrap(), None);
        assert_eq!(
            cfg(Some("s3cret"), None).resolve_api_token().unwrap(),
            Some("s3cret".into())
        );
        let file = dir.path().join("token");
        std::fs::write(&file, "  s3cret \nsecond line\n").unwrap();
        assert_eq!(
            cfg(None, Some(&file)).resolve_api_token().unwrap(),
            Some("s3cret".into())
        );

        // Errors name the key and the file.
        std::fs::write(&file, "\n\n").unwrap();
        let err = cfg(None, Some(&file))
            .resolve_api_token()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("api_token_file")
                && err.contains(&file.display().to_string())
                && err.contains("empty"),
            "{err}"
        );
        let missing = dir.path().join("nope");
        let err = cfg(None, Some(&missing))
            .resolve_api_token()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("api_token_file") && err.contains(&missing.display().to_string()),
            "{err}"
        );

        // Both at once is refused at load, naming the key.
        let mut t = toml::Table::new();
        t.insert("api_token".into(), toml::Value::String("a".into()));
        t.insert(
            "api_token_file".into(),
            toml::Value::String(file.display().to_string()),
        );
        let err = NodeConfig::load(None, t).unwrap_err().to_string();
        assert!(err.contains("api_token_file"), "{err}");
    }

    #[test]
    fn out_of_range_threshold_is_named() {
        let mut t = toml::Table::new();
        t.insert("threshold_cpu".into(), toml::Value::Integer(0));
        let err = NodeConfig::load(None, t).unwrap_err().to_string();
        assert!(err.contains("threshold_cpu"), "{err}");
    }
}
