//! The `omesh` command line.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::{Parser, Subcommand};
use omesh::cli::args::{
    AdmitArgs, ApiArgs, CancelArgs, KeygenArgs, LogsArgs, RevokeArgs, SubmitArgs, TaskArgs, UpArgs,
};
use omesh::cli::commands::{
    admit, api_command, cancel, keygen, logs, revoke, runtime, show_task, submit, Show,
};
use omesh::config::{LogFormat, NodeConfig};
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
    /// Admit a node to the mesh: sign an admission certificate for its peer id with the
    /// operator's admission key (a key file from `omesh keygen`).
    ///
    /// Nodes of a mesh with `admission_keys` connect only to peers holding a valid, unexpired
    /// certificate from one of those keys. The node keeps it at <data_dir>/admission.cert.
    Admit(AdmitArgs),
    /// Revoke a node's admission: sign a revocation with the operator's admission key.
    Revoke(RevokeArgs),
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
        executor: omesh::devtools::demo::DemoExecutor,
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
    Image(omesh::cli::image::ImageCommand),
    /// The guard of one task instance (started by the peer; reads its plan on stdin).
    #[command(hide = true)]
    Guard {
        /// The node it guards for (lets a restarted peer find its guards).
        #[arg(long)]
        node: String,
    },
    /// The start of a process task (run by its guard): join the cgroup, drop to the task
    /// user, then execute the command.
    #[command(hide = true)]
    GuardExec {
        /// A cgroup.procs file to join (repeatable).
        #[arg(long)]
        join: Vec<std::path::PathBuf>,
        /// The user id to run as.
        #[arg(long, requires = "gid")]
        uid: Option<u32>,
        /// The group id to run as.
        #[arg(long, requires = "uid")]
        gid: Option<u32>,
        /// The command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
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
    /// A burst of CPU-bound tasks submitted to a saturated peer, offload off vs on: each peer
    /// in a cgroup with a CPU quota (needs root); makespan, p50/p99, where tasks ran, and
    /// whether the burst pushed other peers over their threshold.
    Offload {
        /// Peers in the mesh (peer 0 is saturated).
        #[arg(long, default_value_t = 4)]
        peers: usize,
        /// Tasks in the burst.
        #[arg(long, default_value_t = 9)]
        tasks: usize,
        /// CPU quota of each peer's cgroup, thousandths of a core.
        #[arg(long, default_value_t = 500)]
        quota_millis: u32,
        /// CPU each task asks for and is limited to, thousandths of a core.
        #[arg(long, default_value_t = 100)]
        task_cpu_millis: u32,
        /// CPU time of each task's work, ms.
        #[arg(long, default_value_t = 300)]
        task_work_ms: u64,
        /// Rounds (each one burst with offload off, one with it on).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Guard { .. } => return omesh::guard::run::main(),
        Command::GuardExec {
            join,
            uid,
            gid,
            command,
        } => return omesh::guard::run::exec_task(join, uid.zip(*gid), command),
        _ => {}
    }
    let result = match cli.command {
        Command::Guard { .. } | Command::GuardExec { .. } => Ok(()),
        Command::Keygen(args) => keygen(&args),
        Command::Admit(args) => admit(&args),
        Command::Revoke(args) => revoke(&args),
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
        }) => bench_tasks(&omesh::devtools::bench_tasks::TaskBench {
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
        }) => bench_blobs(&omesh::devtools::bench_blobs::BlobBench {
            mib,
            fanout_peers,
            fanout_mib,
            rounds,
            link_mbps,
        }),
        Command::Bench(BenchCommand::Offload {
            peers,
            tasks,
            quota_millis,
            task_cpu_millis,
            task_work_ms,
            rounds,
        }) => bench_offload(&omesh::devtools::bench_offload::OffloadBench {
            peers,
            tasks,
            quota_millis,
            task_cpu_millis,
            task_work_ms,
            rounds,
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
        Command::Image(cmd) => omesh::cli::image::run(cmd),
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

fn up(args: &UpArgs) -> anyhow::Result<()> {
    // First, while nothing secret has been read yet beyond the environment: other processes
    // of the same user may no longer read this one's memory or /proc/PID/environ (the
    // token), nor attach to it; no core dumps either.
    let undumpable = forbid_dumps();
    // A misspelled variable would leave its setting silently unapplied.
    let unknown_env = omesh::config::env::unknown(
        std::env::vars_os().map(|(k, _)| k),
        &omesh::cli::args::known_env_vars(),
    );
    if let Some(typo) = unknown_env.iter().find(|u| u.misspelled) {
        anyhow::bail!("{typo}; unset or rename it (every key of `omesh up` is OMESH_ and its name in capitals)");
    }
    let overrides =
        toml::Table::try_from(args).map_err(|e| anyhow::anyhow!("cannot read flags: {e}"))?;
    let cfg = NodeConfig::load(args.config.as_deref(), overrides)?;
    init_logging(cfg.log_format);
    for u in &unknown_env {
        tracing::warn!("{u}; it is ignored");
    }
    if let Err(e) = undumpable {
        tracing::warn!(error = %e, "cannot make the process undumpable (PR_SET_DUMPABLE); same-user processes can read its memory and environment");
    }
    let token = cfg.resolve_api_token()?;
    if std::env::args_os().any(|a| {
        a.to_str()
            .is_some_and(|a| a == "--api-token" || a.starts_with("--api-token="))
    }) {
        tracing::warn!("the API token is on the command line, where every local user can read it (ps, /proc); give it in OMESH_API_TOKEN or --api-token-file instead");
    }
    if token.is_none() {
        tracing::info!("no api_token: the API refuses mutations and logs");
    }
    // Before any port is bound: a second `omesh up` on this directory is told who runs it,
    // not that some port is taken.
    let lock = omesh::datadir::DataDir::open(&cfg.data_dir)?.lock()?;
    let rt = peer_runtime()?;
    rt.block_on(async move {
        let metrics = Arc::new(Mutex::new(Metrics::new()));
        let api_addr = cfg.api_listen;
        let listener = tokio::net::TcpListener::bind(api_addr).await.map_err(|e| {
            anyhow::anyhow!("cannot serve the API on {api_addr} (config key `api_listen`): {e}")
        })?;
        let limits = omesh::exec::TaskLimits::from_config(&cfg);
        let docker = omesh::exec::select_docker(cfg.executor, limits)
            .await
            .map_err(|e| anyhow::anyhow!("{e} (config key `executor`)"))?;
        let peer = Peer::start(cfg, lock, Arc::clone(&metrics), docker)?;
        let (calls_tx, calls_rx) = tokio::sync::mpsc::channel(64);
        let router = omesh::api::router(omesh::api::ApiState {
            calls: calls_tx,
            metrics,
            token,
        });
        tracing::info!(api = %api_addr, dashboard = %format!("http://{api_addr}/"), "status API and dashboard listening");
        let api = tokio::spawn(async move { axum::serve(listener, router).await });
        // On the worker, not this thread: the swarm's connection tasks and the peer's loop
        // then hand events over on one thread, without a cross-thread wake-up each.
        let run = tokio::spawn(peer.run(calls_rx, shutdown_signal()));
        if let Err(e) = run.await {
            tracing::error!(error = %e, "the peer's loop ended abnormally");
        }
        api.abort();
        tracing::info!("stopped");
        Ok(())
    })
}

/// The runtime of `omesh up`: one worker thread (plus tokio's blocking pool, for file and
/// engine calls). The peer's work is one event loop over the swarm's connections; a second
/// worker only moved each event between threads, and those hand-overs were the largest
/// share of an idle peer's CPU.
fn peer_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// Makes this process not dumpable (prctl `PR_SET_DUMPABLE` 0).
#[cfg(target_os = "linux")]
fn forbid_dumps() -> std::io::Result<()> {
    use rustix::process::{set_dumpable_behavior, DumpableBehavior};
    set_dumpable_behavior(DumpableBehavior::NotDumpable).map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn forbid_dumps() -> std::io::Result<()> {
    Ok(())
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
    executor: omesh::devtools::demo::DemoExecutor,
) -> anyhow::Result<()> {
    anyhow::ensure!(tasks >= 1, "--tasks must be at least 1");
    let bin = std::env::current_exe()?;
    let root = tempfile::Builder::new().prefix("omesh-demo-").tempdir()?;
    let opts = omesh::devtools::demo::DemoOptions {
        tasks,
        burn_secs,
        keep,
        executor,
    };
    let rt = runtime()?;
    // The demo handles Ctrl-C itself: it stops the peers gracefully and cleans the engine.
    let result = rt.block_on(omesh::devtools::demo::run(&bin, root.path(), &opts));
    drop(rt);
    result.map_err(anyhow::Error::msg)
}

fn bench_mesh(sizes: &[usize], seconds: u64) -> anyhow::Result<()> {
    let bin = std::env::current_exe()?;
    let rt = runtime()?;
    rt.block_on(async move {
        let mut rows = Vec::new();
        for &n in sizes {
            anyhow::ensure!(n >= 2, "a mesh needs at least 2 peers, got {n}");
            eprintln!("bench: {n} peers, {seconds} s idle window ...");
            let r = omesh::devtools::bench::measure(&bin, n, std::time::Duration::from_secs(seconds))
                .await
                .map_err(|e| anyhow::anyhow!("{n} peers: {e}"))?;
            rows.push(r);
        }
        println!("{}", omesh::devtools::bench::table(&rows).trim_end());
        println!("(a change = a node record published: start, a load move of 5 points, an image change; a quiet host may publish none; time = until the last other peer merged it, same host clock)");
        Ok(())
    })
}

fn bench_tasks(cfg: &omesh::devtools::bench_tasks::TaskBench) -> anyhow::Result<()> {
    let bin = std::env::current_exe()?;
    let command: Vec<String> = std::env::args().collect();
    let rt = runtime()?;
    rt.block_on(async move {
        eprintln!(
            "bench: {} peers, {} kills, {} submits per executor ...",
            cfg.peers, cfg.kills, cfg.submits
        );
        let report =
            omesh::devtools::bench_tasks::run(&bin, cfg, |line| eprintln!("bench: {line}"))
                .await
                .map_err(anyhow::Error::msg)?;
        println!("$ {}", command.join(" "));
        print!("{}", omesh::devtools::bench_tasks::table(&report));
        Ok(())
    })
}

fn bench_offload(cfg: &omesh::devtools::bench_offload::OffloadBench) -> anyhow::Result<()> {
    let bin = std::env::current_exe()?;
    let command: Vec<String> = std::env::args().collect();
    let rt = runtime()?;
    rt.block_on(async move {
        let report =
            omesh::devtools::bench_offload::run(&bin, cfg, |line| eprintln!("bench: {line}"))
                .await
                .map_err(anyhow::Error::msg)?;
        println!("$ {}", command.join(" "));
        print!("{}", omesh::devtools::bench_offload::table(&report));
        Ok(())
    })
}

fn bench_blobs(cfg: &omesh::devtools::bench_blobs::BlobBench) -> anyhow::Result<()> {
    let bin = std::env::current_exe()?;
    let command: Vec<String> = std::env::args().collect();
    let rt = runtime()?;
    rt.block_on(async move {
        let figures =
            omesh::devtools::bench_blobs::run(&bin, cfg, |line| eprintln!("bench: {line}"))
                .await
                .map_err(anyhow::Error::msg)?;
        println!("$ {}", command.join(" "));
        print!("{}", omesh::devtools::bench_blobs::table(&figures));
        Ok(())
    })
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
