//! The clap arguments of the client and peer subcommands (`main.rs` holds the subcommand
//! table and dispatches).

use std::path::PathBuf;

use clap::Args;

use crate::cli::client;
use crate::cli::keys::DEFAULT_KEY_FILE;
use crate::config::LogFormat;

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Image, pinned by digest: NAME@sha256:<64 hex>. Not needed with `--executor process`.
    #[arg(long)]
    pub image: Option<String>,
    /// CPU to reserve: 500m, 0.5, 2.
    #[arg(long, default_value = "100m", value_parser = client::parse_cpu)]
    pub cpu: u32,
    /// Memory to reserve: 256Mi, 1Gi.
    #[arg(long, default_value = "64Mi", value_parser = client::parse_memory)]
    pub memory: u64,
    /// A tag the owner must carry (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Limit of one attempt: 60s, 5m (0: none).
    #[arg(long, default_value = "10m", value_parser = client::parse_duration_ms)]
    pub timeout: u64,
    /// Attempts before the task fails for good.
    #[arg(long, default_value_t = 3)]
    pub attempts: u32,
    /// Executor: any, docker or process.
    #[arg(long, default_value = "any")]
    pub executor: String,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Priority (higher first).
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    /// At most once: the owner stops the task after this long out of contact with a
    /// majority of the mesh, and no other node starts it before then (10s, 5m). Default:
    /// replace at once (at least once).
    #[arg(long, value_parser = client::parse_duration_ms)]
    pub stop_after: Option<u64>,
    /// Keep the task on its owner through drops shorter than this (30s, 5m): it is not
    /// replaced until the owner has been unreachable this long, and a restarted owner
    /// re-attaches to it.
    #[arg(long, value_parser = client::parse_duration_ms)]
    pub lost_after: Option<u64>,
    /// Submitter secret key file (from `omesh keygen`).
    #[arg(long, env = "OMESH_KEY", default_value = DEFAULT_KEY_FILE)]
    pub key: PathBuf,
    /// API bearer token.
    #[arg(long, env = "OMESH_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The local peer's API address.
    #[arg(long, env = "OMESH_API", default_value = "127.0.0.1:7878")]
    pub api: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty name"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

#[derive(Debug, Args)]
pub struct TaskArgs {
    /// Task id, or a unique prefix of one.
    pub id: String,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// Task id, or a unique prefix of one.
    pub id: String,
    /// Submitter secret key file (from `omesh keygen`): the cancel is signed with it, and
    /// only a key in the mesh's `authorized_submitters` may cancel.
    #[arg(long, env = "OMESH_KEY", default_value = DEFAULT_KEY_FILE)]
    pub key: PathBuf,
    /// API bearer token.
    #[arg(long, env = "OMESH_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The local peer's API address.
    #[arg(long, env = "OMESH_API", default_value = "127.0.0.1:7878")]
    pub api: String,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Task id, or a unique prefix of one.
    pub id: String,
    /// Keep printing as the log grows, until the task ends.
    #[arg(long, short)]
    pub follow: bool,
    /// API bearer token (task logs need it: a task's output may hold its secrets).
    #[arg(long, env = "OMESH_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The local peer's API address.
    #[arg(long, env = "OMESH_API", default_value = "127.0.0.1:7878")]
    pub api: String,
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The local peer's API address.
    #[arg(long, env = "OMESH_API", default_value = "127.0.0.1:7878")]
    pub api: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Every `OMESH_*` variable omesh reads: one per key of `omesh up`, and
/// [`crate::config::env::OTHER_KNOWN`].
pub fn known_env_vars() -> Vec<String> {
    let cmd = <UpArgs as Args>::augment_args(clap::Command::new("up"));
    let mut known: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env()?.to_str().map(str::to_owned))
        .collect();
    known.extend(
        crate::config::env::OTHER_KNOWN
            .iter()
            .map(|s| (*s).to_owned()),
    );
    known
}

/// Flags of `omesh up`. Each one is also an `OMESH_*` variable and a key of the config file
/// (same name, underscores); a flag or variable wins over the file.
#[derive(Debug, Args, serde::Serialize)]
pub struct UpArgs {
    /// TOML config file.
    #[arg(long, short, env = "OMESH_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Data directory (identity key, incarnation counter).
    #[arg(long, env = "OMESH_DATA_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// QUIC listen multiaddr, e.g. /ip4/0.0.0.0/udp/7001/quic-v1.
    #[arg(long, env = "OMESH_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// A seed peer's multiaddr (repeatable).
    #[arg(long = "seed", env = "OMESH_SEEDS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<String>,
    /// Status API address.
    #[arg(long, env = "OMESH_API_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_listen: Option<String>,
    /// Bearer token for API mutations.
    #[arg(long, env = "OMESH_API_TOKEN", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token: Option<String>,
    /// A tag of this node (repeatable).
    #[arg(long = "tag", env = "OMESH_TAGS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// CPU offered, thousandths of a core.
    #[arg(long, env = "OMESH_CPU_MILLIS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u32>,
    /// Memory offered, bytes.
    #[arg(long, env = "OMESH_MEMORY_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// A submitter public key (hex) allowed to submit tasks (repeatable).
    #[arg(
        long = "authorized-submitter",
        env = "OMESH_AUTHORIZED_SUBMITTERS",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub authorized_submitters: Vec<String>,
    /// A peer id allowed to connect (repeatable; none: any).
    #[arg(
        long = "allowed-peer",
        env = "OMESH_ALLOWED_PEERS",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_peers: Vec<String>,
    /// An admission public key (hex) of this mesh (repeatable; none: the mesh is open).
    #[arg(
        long = "admission-key",
        env = "OMESH_ADMISSION_KEYS",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub admission_keys: Vec<String>,
    /// This node's admission certificate (from `omesh admit`; default <data-dir>/admission.cert).
    #[arg(long, env = "OMESH_ADMISSION_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admission_cert: Option<PathBuf>,
    /// Hand work to others when loaded.
    #[arg(long, env = "OMESH_ENABLE_OFFLOAD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_offload: Option<bool>,
    /// CPU percent above which no new work is taken.
    #[arg(long, env = "OMESH_THRESHOLD_CPU")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold_cpu: Option<u8>,
    /// Memory percent above which no new work is taken.
    #[arg(long, env = "OMESH_THRESHOLD_MEMORY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold_memory: Option<u8>,
    /// Hysteresis, percentage points: an overloaded peer takes work again only once its CPU
    /// and memory are this far below their thresholds.
    #[arg(long, env = "OMESH_THRESHOLD_MARGIN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold_margin: Option<u8>,
    /// Offload targets: peers with one of these tags (repeatable).
    #[arg(
        long = "target-node-tag",
        env = "OMESH_TARGET_NODE_TAGS",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub target_node_tags: Vec<String>,
    /// Probe period (each peer pings one other per period); a changed node record is
    /// published at most this often, ms.
    #[arg(long, env = "OMESH_HEARTBEAT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
    /// How long a suspected owner's leases hold (its time to refute), ms.
    #[arg(long, env = "OMESH_LEASE_TTL_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ttl_ms: Option<u64>,
    /// Grace before a lease counts as lost, ms.
    #[arg(long, env = "OMESH_LEASE_GRACE_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_grace_ms: Option<u64>,
    /// Anti-entropy period, ms.
    #[arg(long, env = "OMESH_ANTI_ENTROPY_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anti_entropy_ms: Option<u64>,
    /// Retention of finished tasks before compaction, ms.
    #[arg(long, env = "OMESH_RETENTION_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_ms: Option<u64>,
    /// Log format.
    #[arg(long, env = "OMESH_LOG_FORMAT", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Ready without peers (a mesh of one).
    #[arg(long, env = "OMESH_ALONE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alone: Option<bool>,
    /// Test/demo only: pin the CPU load reading to this percent.
    #[arg(long, env = "OMESH_FAKE_CPU_PERCENT", hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fake_cpu_percent: Option<u8>,
    /// Executor for tasks that accept any: auto (Docker when the engine answers), docker, process.
    #[arg(long, env = "OMESH_EXECUTOR", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executor: Option<crate::config::ExecutorChoice>,
    /// Peers to keep connections to.
    #[arg(long, env = "OMESH_TARGET_PEERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_peers: Option<usize>,
    /// UDP address of the blob data plane (default: the listen IP, QUIC port + 1).
    #[arg(long, env = "OMESH_BLOB_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob_listen: Option<String>,
    /// Most bytes the blob store keeps (least-recently-used unneeded blobs are evicted).
    #[arg(long, env = "OMESH_BLOB_CAP_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob_cap_bytes: Option<u64>,
    /// Most bytes per second this peer serves to others, all together (0: no cap).
    #[arg(long, env = "OMESH_BLOB_SERVE_BYTES_PER_SEC")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob_serve_bytes_per_sec: Option<u64>,
    /// Test only: flip a byte of every blob chunk served.
    #[arg(long, env = "OMESH_DEBUG_CORRUPT_BLOBS", hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debug_corrupt_blobs: Option<bool>,
    /// Test only: cut each blob connection after it carried this many bytes.
    #[arg(long, env = "OMESH_DEBUG_DROP_AFTER_BYTES", hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debug_drop_after_bytes: Option<u64>,
    /// A file holding the API bearer token (keeps the token out of argv).
    #[arg(long, env = "OMESH_API_TOKEN_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token_file: Option<PathBuf>,
    /// CPU limit of a task that asks for 0, thousandths of a core.
    #[arg(long, env = "OMESH_TASK_DEFAULT_CPU_MILLIS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_default_cpu_millis: Option<u32>,
    /// Memory limit of a task that asks for 0, bytes.
    #[arg(long, env = "OMESH_TASK_DEFAULT_MEMORY_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_default_memory_bytes: Option<u64>,
    /// Most processes one task instance may have.
    #[arg(long, env = "OMESH_TASK_PIDS_LIMIT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_pids_limit: Option<u32>,
    /// The unprivileged user process tasks run as when the peer runs as root.
    #[arg(long, env = "OMESH_TASK_USER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_user: Option<String>,
    /// Where task cgroups are made under each controller's root.
    #[arg(long, env = "OMESH_CGROUP_PARENT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_parent: Option<String>,
    /// Process tasks whose limits cannot be enforced: enforce (refuse them) or best-effort.
    #[arg(long, env = "OMESH_PROCESS_LIMITS", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_limits: Option<crate::config::ProcessLimits>,
    /// How long before a lease could lapse elsewhere a guard kills its instance, ms.
    #[arg(long, env = "OMESH_GUARD_MARGIN_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard_margin_ms: Option<u64>,
    /// Delay between claiming a task and starting it, ms (default 150).
    #[arg(long, env = "OMESH_SETTLE_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settle_ms: Option<u64>,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the new secret key.
    #[arg(long, short, value_name = "FILE", default_value = DEFAULT_KEY_FILE)]
    pub out: PathBuf,
    /// Replace FILE if it already exists (the old key is lost).
    #[arg(long)]
    pub force: bool,
    /// Print the public key of an existing key file; creates nothing.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["out", "force"])]
    pub show: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AdmitArgs {
    /// The operator's admission secret key (from `omesh keygen --out operator.key`; its
    /// public key goes into every node's `admission_keys`).
    #[arg(long)]
    pub key: PathBuf,
    /// The node to admit: its node id (hex) or peer id (12D3KooW…), as `omesh status` shows.
    #[arg(required_unless_present = "data_dir", conflicts_with = "data_dir")]
    pub peer_id: Option<String>,
    /// Admit the node whose data directory this is (its identity is created if missing);
    /// the certificate goes to DIR/admission.cert unless --out says otherwise.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A tag the certificate grants (repeatable; informational).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// How long the certificate holds: 90d, 12h (0: never expires).
    #[arg(long, default_value = "365d", value_parser = client::parse_duration_ms)]
    pub expires: u64,
    /// Where to write the certificate (default: admission.cert, or DIR/admission.cert).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The operator's admission secret key.
    #[arg(long)]
    pub key: PathBuf,
    /// The node to revoke: node id (hex) or peer id.
    pub peer_id: String,
    /// Where to write the revocation (also printed as hex on stdout).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Send it to this peer's API too (`HOST:PORT`), which spreads it through the mesh.
    #[arg(long)]
    pub api: Option<String>,
    /// API bearer token, with `--api`.
    #[arg(long, env = "OMESH_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}
