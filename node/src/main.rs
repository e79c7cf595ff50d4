//! The `omesh` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::{Arc, Mutex};

use clap::{Args, Parser, Subcommand};
use omesh::client::{self, Client};
use omesh::config::{LogFormat, NodeConfig};
use omesh::keys::{self, KeyFileError, Overwrite, DEFAULT_KEY_FILE};
use omesh::metrics::Metrics;
use omesh::peer::Peer;

/// omesh: a masterless, gossip-based offload mesh for edge hosts.
#[derive(Debug, Parser)]
#[command(name = "omesh", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a submitter key (ed25519) and print its public key, or show an existing one.
    ///
    /// The secret key is written as 64 hex characters to FILE with mode 0600. The public key
    /// printed on stdout is what goes into the mesh's `authorized_submitters`.
    Keygen(KeygenArgs),
    /// Run a peer: join the mesh from seeds, gossip state, serve the status API.
    Up(Box<UpArgs>),
    /// Show the local peer's status.
    Status(ApiArgs),
    /// List the peers the local peer knows, with health, load and RTT.
    Peers(ApiArgs),
    /// List the tasks the mesh knows.
    Tasks(ApiArgs),
    /// Start a local 3-peer mesh and show offload and failover (no set-up needed).
    Demo {
        /// Tasks to submit.
        #[arg(long, default_value_t = 6)]
        tasks: usize,
        /// Seconds of CPU each task burns.
        #[arg(long, default_value_t = 4)]
        burn_secs: u64,
        /// Keep the mesh running after the summary, until Ctrl-C.
        #[arg(long)]
        keep: bool,
        /// What runs the tasks: `auto` (Docker when an engine answers and the demo image can
        /// be built, else processes), `docker` or `process`.
        #[arg(long, default_value = "auto")]
        executor: omesh::demo::DemoExecutor,
    },
    /// Submit a task, signed with your submitter key, through the local peer.
    Submit(Box<SubmitArgs>),
    /// Show one task: spec, owner, epoch, state, attempts, timeline, exit code.
    Task(TaskArgs),
    /// Cancel a task everywhere.
    Cancel(CancelArgs),
    /// Print a task's log, fetched from its owner.
    Logs(LogsArgs),
    /// Benchmarks on local meshes of child processes.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Container images: the local blob store, and pulls from peers.
    #[command(subcommand)]
    Image(omesh::image_cli::ImageCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Time for a state change to reach every peer, idle RSS and CPU, per mesh size.
    Mesh {
        /// Mesh sizes to run, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "5,20")]
        peers: Vec<usize>,
        /// Idle measurement window per size, seconds.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Failover time after `kill -9` of a task's owner, and submit-to-running latency per
    /// executor (docker when an engine answers), on a local mesh.
    Tasks {
        /// Peers in the mesh.
        #[arg(long, default_value_t = 5)]
        peers: usize,
        /// Owners to kill, one failover each.
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// Tasks to submit per executor.
        #[arg(long, default_value_t = 20)]
        submits: usize,
        /// Do not time the docker executor.
        #[arg(long)]
        no_docker: bool,
    },
    /// Blob data plane: one blob between two peers (vs plain quinn and cp), and one image to
    /// many peers at once (time and bytes the origin serves).
    Blobs {
        /// Size of the single-transfer blob, MiB.
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Peers pulling one image at once.
        #[arg(long, default_value_t = 8)]
        fanout_peers: usize,
        /// Size of that image, MiB (0: skip the fan-out).
        #[arg(long, default_value_t = 1024)]
        fanout_mib: u64,
        /// Rounds of the single transfer, alternating omesh, plain quinn and cp (best counts;
        /// 0: skip the single transfer).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Uplink of each fan-out peer, MB/s (`blob_serve_bytes_per_sec`; 0: no cap, so the
        /// host's CPU is the limit).
        #[arg(long, default_value_t = 0.0)]
        link_mbps: f64,
    },
}

#[derive(Debug, Args)]
struct SubmitArgs {
    /// Image, pinned by digest: NAME@sha256:<64 hex>.
    #[arg(long)]
    image: String,
    /// CPU to reserve: 500m, 0.5, 2.
    #[arg(long, default_value = "100m", value_parser = client::parse_cpu)]
    cpu: u32,
    /// Memory to reserve: 256Mi, 1Gi.
    #[arg(long, default_value = "64Mi", value_parser = client::parse_memory)]
    memory: u64,
    /// A tag the owner must carry (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Limit of one attempt: 60s, 5m (0: none).
    #[arg(long, default_value = "10m", value_parser = client::parse_duration_ms)]
    timeout: u64,
    /// Attempts before the task fails for good.
    #[arg(long, default_value_t = 3)]
    attempts: u32,
    /// Executor: any, docker or process.
    #[arg(long, default_value = "any")]
    executor: String,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Priority (higher first).
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// Submitter secret key file (from `omesh keygen`).
    #[arg(long, env = "OMESH_KEY", default_value = DEFAULT_KEY_FILE)]
    key: PathBuf,
    /// API bearer token.
    #[arg(long, env = "OMESH_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The local peer's API address.
    #[arg(long, env = "OMESH_API", default_value = "127.0.0.1:7878")]
    api: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
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
struct TaskArgs {
    /// Task id, or a unique prefix of one.
    id: String,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
struct CancelArgs {
    /// Task id, or a unique prefix of one.
    id: String,
    /// API bearer token.
    #[arg(long, env = "OMESH_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The local peer's API address.
    #[arg(long, env = "OMESH_API", default_value = "127.0.0.1:7878")]
    api: String,
}

#[derive(Debug, Args)]
struct LogsArgs {
    /// Task id, or a unique prefix of one.
    id: String,
    /// Keep printing as the log grows, until the task ends.
    #[arg(long, short)]
    follow: bool,
    /// The local peer's API address.
    #[arg(long, env = "OMESH_API", default_value = "127.0.0.1:7878")]
    api: String,
}

#[derive(Debug, Args)]
struct ApiArgs {
    /// The local peer's API address.
    #[arg(long, env = "OMESH_API", default_value = "127.0.0.1:7878")]
    api: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Flags of `omesh up`. Each one is also an `OMESH_*` variable and a key of the config file
/// (same name, underscores); a flag or variable wins over the file.
#[derive(Debug, Args, serde::Serialize)]
struct UpArgs {
    /// TOML config file.
    #[arg(long, short, env = "OMESH_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Data directory (identity key, incarnation counter).
    #[arg(long, env = "OMESH_DATA_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// QUIC listen multiaddr, e.g. /ip4/0.0.0.0/udp/7001/quic-v1.
    #[arg(long, env = "OMESH_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    /// A seed peer's multiaddr (repeatable).
    #[arg(long = "seed", env = "OMESH_SEEDS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    seeds: Vec<String>,
    /// Status API address.
    #[arg(long, env = "OMESH_API_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    api_listen: Option<String>,
    /// Bearer token for API mutations.
    #[arg(long, env = "OMESH_API_TOKEN", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    api_token: Option<String>,
    /// A tag of this node (repeatable).
    #[arg(long = "tag", env = "OMESH_TAGS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tags: Vec<String>,
    /// CPU offered, thousandths of a core.
    #[arg(long, env = "OMESH_CPU_MILLIS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_millis: Option<u32>,
    /// Memory offered, bytes.
    #[arg(long, env = "OMESH_MEMORY_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_bytes: Option<u64>,
    /// A submitter public key (hex) allowed to submit tasks (repeatable).
    #[arg(
        long = "authorized-submitter",
        env = "OMESH_AUTHORIZED_SUBMITTERS",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    authorized_submitters: Vec<String>,
    /// A peer id allowed to connect (repeatable; none: any).
    #[arg(
        long = "allowed-peer",
        env = "OMESH_ALLOWED_PEERS",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allowed_peers: Vec<String>,
    /// Hand work to others when loaded.
    #[arg(long, env = "OMESH_ENABLE_OFFLOAD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    enable_offload: Option<bool>,
    /// CPU percent above which no new work is taken.
    #[arg(long, env = "OMESH_THRESHOLD_CPU")]
    #[serde(skip_serializing_if = "Option::is_none")]
    threshold_cpu: Option<u8>,
    /// Memory percent above which no new work is taken.
    #[arg(long, env = "OMESH_THRESHOLD_MEMORY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    threshold_memory: Option<u8>,
    /// Offload targets: peers with one of these tags (repeatable).
    #[arg(
        long = "target-node-tag",
        env = "OMESH_TARGET_NODE_TAGS",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    target_node_tags: Vec<String>,
    /// Probe period (each peer pings one other per period); a changed node record is
    /// published at most this often, ms.
    #[arg(long, env = "OMESH_HEARTBEAT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_ms: Option<u64>,
    /// How long a suspected owner's leases hold (its time to refute), ms.
    #[arg(long, env = "OMESH_LEASE_TTL_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_ttl_ms: Option<u64>,
    /// Grace before a lease counts as lost, ms.
    #[arg(long, env = "OMESH_LEASE_GRACE_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_grace_ms: Option<u64>,
    /// Anti-entropy period, ms.
    #[arg(long, env = "OMESH_ANTI_ENTROPY_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    anti_entropy_ms: Option<u64>,
    /// Retention of finished tasks before compaction, ms.
    #[arg(long, env = "OMESH_RETENTION_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    retention_ms: Option<u64>,
    /// Log format.
    #[arg(long, env = "OMESH_LOG_FORMAT", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
    /// Ready without peers (a mesh of one).
    #[arg(long, env = "OMESH_ALONE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    alone: Option<bool>,
    /// Test/demo only: pin the CPU load reading to this percent.
    #[arg(long, env = "OMESH_FAKE_CPU_PERCENT", hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    fake_cpu_percent: Option<u8>,
    /// Executor for tasks that accept any: auto (Docker when the engine answers), docker, process.
    #[arg(long, env = "OMESH_EXECUTOR", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    executor: Option<omesh::config::ExecutorChoice>,
    /// Peers to keep connections to.
    #[arg(long, env = "OMESH_TARGET_PEERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    target_peers: Option<usize>,
    /// UDP address of the blob data plane (default: the listen IP, QUIC port + 1).
    #[arg(long, env = "OMESH_BLOB_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    blob_listen: Option<String>,
    /// Most bytes the blob store keeps (least-recently-used unneeded blobs are evicted).
    #[arg(long, env = "OMESH_BLOB_CAP_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    blob_cap_bytes: Option<u64>,
    /// Most bytes per second this peer serves to others, all together (0: no cap).
    #[arg(long, env = "OMESH_BLOB_SERVE_BYTES_PER_SEC")]
    #[serde(skip_serializing_if = "Option::is_none")]
    blob_serve_bytes_per_sec: Option<u64>,
    /// Test only: flip a byte of every blob chunk served.
    #[arg(long, env = "OMESH_DEBUG_CORRUPT_BLOBS", hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    debug_corrupt_blobs: Option<bool>,
    /// Test only: cut each blob connection after it carried this many bytes.
    #[arg(long, env = "OMESH_DEBUG_DROP_AFTER_BYTES", hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    debug_drop_after_bytes: Option<u64>,
}

#[derive(Debug, Args)]
struct KeygenArgs {
    /// Where to write the new secret key.
    #[arg(long, short, value_name = "FILE", default_value = DEFAULT_KEY_FILE)]
    out: PathBuf,
    /// Replace FILE if it already exists (the old key is lost).
    #[arg(long)]
    force: bool,
    /// Print the public key of an existing key file; creates nothing.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["out", "force"])]
    show: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen(args) => keygen(&args),
        Command::Up(args) => up(&args),
        Command::Status(args) => api_command(&args, Show::Status),
        Command::Peers(args) => api_command(&args, Show::Peers),
        Command::Tasks(args) => api_command(&args, Show::Tasks),
        Command::Bench(BenchCommand::Mesh { peers, seconds }) => bench_mesh(&peers, seconds),
        Command::Bench(BenchCommand::Tasks {
            peers,
            kills,
            submits,
            no_docker,
        }) => bench_tasks(&omesh::bench_tasks::TaskBench {
            peers,
            kills,
            submits,
            docker: !no_docker,
        }),
        Command::Bench(BenchCommand::Blobs {
            mib,
            fanout_peers,
            fanout_mib,
            rounds,
            link_mbps,
        }) => bench_blobs(&omesh::bench_blobs::BlobBench {
            mib,
            fanout_peers,
            fanout_mib,
            rounds,
            link_mbps,
        }),
        Command::Submit(args) => submit(&args),
        Command::Demo {
            tasks,
            burn_secs,
            keep,
            executor,
        } => demo(tasks, burn_secs, keep, executor),
        Command::Task(args) => show_task(&args),
        Command::Cancel(args) => cancel(&args),
        Command::Logs(args) => logs(&args),
        Command::Image(cmd) => omesh::image_cli::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line, without a backtrace.
            eprintln!("omesh: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn up(args: &UpArgs) -> anyhow::Result<()> {
    let overrides =
        toml::Table::try_from(args).map_err(|e| anyhow::anyhow!("cannot read flags: {e}"))?;
    let cfg = NodeConfig::load(args.config.as_deref(), overrides)?;
    init_logging(cfg.log_format);
    let rt = runtime()?;
    rt.block_on(async move {
        let metrics = Arc::new(Mutex::new(Metrics::new()));
        let api_addr = cfg.api_listen;
        let listener = tokio::net::TcpListener::bind(api_addr).await.map_err(|e| {
            anyhow::anyhow!("cannot serve the API on {api_addr} (config key `api_listen`): {e}")
        })?;
        let docker = omesh::executor::select_docker(cfg.executor)
            .await
            .map_err(|e| anyhow::anyhow!("{e} (config key `executor`)"))?;
        let token = cfg.api_token.clone();
        let peer = Peer::start(cfg, Arc::clone(&metrics), docker)?;
        let (calls_tx, calls_rx) = tokio::sync::mpsc::channel(64);
        let router = omesh::api::router(omesh::api::ApiState {
            calls: calls_tx,
            metrics,
            token,
        });
        tracing::info!(api = %api_addr, "status API listening");
        let api = tokio::spawn(async move { axum::serve(listener, router).await });
        peer.run(calls_rx, shutdown_signal()).await;
        api.abort();
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("OMESH_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,libp2p=warn,libp2p_gossipsub=error"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

fn demo(
    tasks: usize,
    burn_secs: u64,
    keep: bool,
    executor: omesh::demo::DemoExecutor,
) -> anyhow::Result<()> {
    anyhow::ensure!(tasks >= 1, "--tasks must be at least 1");
    let bin = std::env::current_exe()?;
    let root = tempfile::Builder::new().prefix("omesh-demo-").tempdir()?;
    let opts = omesh::demo::DemoOptions {
        tasks,
        burn_secs,
        keep,
        executor,
    };
    let rt = runtime()?;
    // The demo handles Ctrl-C itself: it stops the peers gracefully and cleans the engine.
    let result = rt.block_on(omesh::demo::run(&bin, root.path(), &opts));
    drop(rt);
    result.map_err(anyhow::Error::msg)
}

fn submit(args: &SubmitArgs) -> anyhow::Result<()> {
    let executor: omesh_protocol::ExecutorKind = args.executor.parse()?;
    omesh_protocol::ImageRef::parse(&args.image)?;
    let key = keys::read_key_file(&args.key)?;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let spec = omesh_protocol::TaskSpec {
        image: args.image.clone(),
        command: args.command.clone(),
        env: args.env.iter().cloned().collect(),
        cpu_millis: args.cpu,
        memory_bytes: args.memory,
        required_tags: args.tags.iter().cloned().collect(),
        priority: args.priority,
        max_attempts: args.attempts,
        timeout_ms: args.timeout,
        executor,
        nonce,
        submitter: [0; 32],
    };
    spec.check_shape()?;
    let signed = spec.sign(&key);
    let body = serde_json::to_value(omesh::api::SubmitBody::from_signed(&signed))?;
    let client = Client::new(&args.api);
    let rt = runtime()?;
    let resp: serde_json::Value = rt.block_on(client.send(
        reqwest::Method::POST,
        "/api/v1/tasks",
        args.token.as_deref(),
        Some(&body),
    ))?;
    let id = resp.get("id").and_then(|v| v.as_str()).unwrap_or_default();
    if args.json {
        println!("{resp}");
    } else {
        println!("{id}");
    }
    Ok(())
}

fn show_task(args: &TaskArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.api.api);
    let rt = runtime()?;
    rt.block_on(async {
        let id = client
            .resolve_task(&args.id)
            .await
            .map_err(anyhow::Error::msg)?;
        let t: omesh::api::TaskJson = client.get(&format!("/api/v1/tasks/{id}")).await?;
        if args.api.json {
            println!("{}", serde_json::to_string_pretty(&t)?);
        } else {
            print!("{}", client::task_text(&t));
        }
        Ok(())
    })
}

fn cancel(args: &CancelArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.api);
    let rt = runtime()?;
    rt.block_on(async {
        let id = client
            .resolve_task(&args.id)
            .await
            .map_err(anyhow::Error::msg)?;
        let _: serde_json::Value = client
            .send(
                reqwest::Method::DELETE,
                &format!("/api/v1/tasks/{id}"),
                args.token.as_deref(),
                None,
            )
            .await?;
        println!("cancelled {id}");
        Ok(())
    })
}

fn logs(args: &LogsArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let client = Client::new(&args.api);
    let rt = runtime()?;
    rt.block_on(async {
        let id = client
            .resolve_task(&args.id)
            .await
            .map_err(anyhow::Error::msg)?;
        let mut offset = 0u64;
        let mut epoch = None;
        loop {
            let chunk: omesh::api::LogChunk = client
                .get(&format!("/api/v1/tasks/{id}/logs?offset={offset}"))
                .await?;
            if epoch.is_some_and(|e| e != chunk.epoch) {
                // The task moved to a new epoch (failover or retry): start its log from the top.
                eprintln!(
                    "--- epoch {} on {} ---",
                    chunk.epoch,
                    &chunk.owner[..12.min(chunk.owner.len())]
                );
                offset = 0;
                epoch = Some(chunk.epoch);
                continue;
            }
            epoch = Some(chunk.epoch);
            let mut out = std::io::stdout().lock();
            out.write_all(chunk.data.as_bytes())?;
            out.flush()?;
            offset = chunk.next_offset;
            let more_now = chunk.next_offset > chunk.offset;
            let ended = !chunk.running
                && matches!(chunk.state.as_str(), "succeeded" | "failed" | "cancelled");
            if !args.follow || (ended && !more_now) {
                return Ok(());
            }
            if !more_now {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    })
}

fn bench_mesh(sizes: &[usize], seconds: u64) -> anyhow::Result<()> {
    let bin = std::env::current_exe()?;
    let rt = runtime()?;
    rt.block_on(async move {
        let mut rows = Vec::new();
        for &n in sizes {
            anyhow::ensure!(n >= 2, "a mesh needs at least 2 peers, got {n}");
            eprintln!("bench: {n} peers, {seconds} s idle window ...");
            let r = omesh::bench::measure(&bin, n, std::time::Duration::from_secs(seconds))
                .await
                .map_err(|e| anyhow::anyhow!("{n} peers: {e}"))?;
            rows.push(r);
        }
        println!("{}", omesh::bench::table(&rows).trim_end());
        println!("(a change = a node record published: start, a load move of 5 points, an image change; a quiet host may publish none; time = until the last other peer merged it, same host clock)");
        Ok(())
    })
}

fn bench_tasks(cfg: &omesh::bench_tasks::TaskBench) -> anyhow::Result<()> {
    let bin = std::env::current_exe()?;
    let command: Vec<String> = std::env::args().collect();
    let rt = runtime()?;
    rt.block_on(async move {
        eprintln!(
            "bench: {} peers, {} kills, {} submits per executor ...",
            cfg.peers, cfg.kills, cfg.submits
        );
        let report = omesh::bench_tasks::run(&bin, cfg, |line| eprintln!("bench: {line}"))
            .await
            .map_err(anyhow::Error::msg)?;
        println!("$ {}", command.join(" "));
        print!("{}", omesh::bench_tasks::table(&report));
        Ok(())
    })
}

fn bench_blobs(cfg: &omesh::bench_blobs::BlobBench) -> anyhow::Result<()> {
    let bin = std::env::current_exe()?;
    let command: Vec<String> = std::env::args().collect();
    let rt = runtime()?;
    rt.block_on(async move {
        let figures = omesh::bench_blobs::run(&bin, cfg, |line| eprintln!("bench: {line}"))
            .await
            .map_err(anyhow::Error::msg)?;
        println!("$ {}", command.join(" "));
        print!("{}", omesh::bench_blobs::table(&figures));
        Ok(())
    })
}

enum Show {
    Status,
    Peers,
    Tasks,
}

fn api_command(args: &ApiArgs, what: Show) -> anyhow::Result<()> {
    let client = Client::new(&args.api);
    let rt = runtime()?;
    rt.block_on(async move {
        let text = match what {
            Show::Status => {
                let s = client.status().await?;
                if args.json {
                    serde_json::to_string_pretty(&s)?
                } else {
                    client::status_text(&s)
                }
            }
            Show::Peers => {
                let p = client.peers().await?;
                if args.json {
                    serde_json::to_string_pretty(&p)?
                } else {
                    client::peers_text(&p)
                }
            }
            Show::Tasks => {
                let t = client.tasks().await?;
                if args.json {
                    serde_json::to_string_pretty(&t)?
                } else {
                    client::tasks_text(&t)
                }
            }
        };
        println!("{}", text.trim_end());
        Ok(())
    })
}

fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.show {
        let key = keys::read_key_file(path)?;
        println!("{}", keys::public_hex(&key));
        return Ok(());
    }
    let overwrite = if args.force {
        Overwrite::Replace
    } else {
        Overwrite::Refuse
    };
    let key = keys::generate();
    keys::write_key_file(&args.out, &key, overwrite).map_err(|e| match e {
        KeyFileError::Exists { .. } => anyhow::anyhow!("{e}; pass --force to replace it"),
        other => other.into(),
    })?;
    eprintln!("wrote secret key to {} (mode 0600)", args.out.display());
    println!("{}", keys::public_hex(&key));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
