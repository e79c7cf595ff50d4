//! `omesh-netsim`: run a scenario and print its report, or sweep it over many seeds.
//!
//! ```text
//! omesh-netsim --scenario netsim/scenarios/steady.toml --seed 1 [--nodes 1000] [--plot out.svg]
//! omesh-netsim sweep --scenario netsim/scenarios/partition.toml --seeds 1000 --nodes 50
//! omesh-netsim sweep --seeds 1000 --jobs 2 --scenario netsim/scenarios/disc_*.toml
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use omesh_netsim::{plot, run, sweep, Scenario};

#[derive(Parser)]
#[command(
    name = "omesh-netsim",
    version,
    about = "Deterministic simulation of an omesh mesh"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run one scenario with one seed and print the report table (the default).
    Run(RunArgs),
    /// Run one or more scenarios over many seeds, report every invariant break with its
    /// seed and, per scenario and disconnect policy, the duplicate-run and downtime figures.
    Sweep(SweepArgs),
}

#[derive(Args)]
struct Common {
    /// The scenario file (TOML); a sweep takes several (`--scenario a.toml b.toml`).
    #[arg(long = "scenario", required = true, num_args = 1..)]
    scenarios: Vec<PathBuf>,
    /// Override the scenario's node count.
    #[arg(long)]
    nodes: Option<u32>,
    /// Override the scenario's simulated duration, in seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Start from a formed mesh, every record already everywhere (as if `formed = true`):
    /// the steady state of a large mesh without its N² cold start.
    #[arg(long)]
    formed: bool,
    /// Do not model the per-instance guards (as if `[guard] enabled = false`): instances
    /// outlive their leases, as before the guards, for before/after comparisons.
    #[arg(long)]
    no_guard: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: Option<Common>,
    /// The seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the SVG plot (default: netsim-<scenario>-<nodes>-seed<N>.svg).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Write no plot.
    #[arg(long)]
    no_plot: bool,
}

#[derive(Args)]
struct SweepArgs {
    #[command(flatten)]
    common: Common,
    /// How many seeds.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Threads (the machine is shared: 1 by default).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
}

fn load(c: &Common, path: &Path) -> anyhow::Result<Scenario> {
    let mut s = Scenario::load(path)?;
    if let Some(d) = c.duration {
        s.duration_s = d;
    }
    if let Some(n) = c.nodes {
        s = s.with_nodes(n)?;
    }
    s.formed |= c.formed;
    if c.no_guard {
        s.guard.enabled = false;
    }
    s.validate()?;
    Ok(s)
}

/// The command line that reruns `s` (as loaded from `path` with `c`) with `seed`.
fn reproduce(c: &Common, path: &Path, s: &Scenario, seed: u64) -> String {
    let mut line = format!(
        "cargo run --release -p omesh-netsim -- --scenario {} --nodes {} --seed {seed}",
        path.display(),
        s.nodes
    );
    if let Some(d) = c.duration {
        line.push_str(&format!(" --duration {d}"));
    }
    if c.formed {
        line.push_str(" --formed");
    }
    if c.no_guard {
        line.push_str(" --no-guard");
    }
    line
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("omesh-netsim: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<bool> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Sweep(a)) => run_sweep(&a),
        Some(Command::Run(a)) => run_one(&a),
        None => run_one(&cli.run),
    }
}

fn run_one(a: &RunArgs) -> anyhow::Result<bool> {
    let common = a
        .common
        .as_ref()
        .context("--scenario FILE is required (see --help)")?;
    let [path] = common.scenarios.as_slice() else {
        anyhow::bail!("a run takes one --scenario (a sweep takes several)");
    };
    let s = load(common, path)?;
    let name = s.name.clone();
    let nodes = s.nodes;
    eprintln!(
        "running {name} with {nodes} nodes for {} s simulated, seed {}",
        s.duration_s, a.seed
    );
    let again = reproduce(common, path, &s, a.seed);
    let o = run(s, a.seed);
    println!("{}", o.table());
    if !a.no_plot {
        let path = a
            .plot
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("netsim-{name}-{nodes}-seed{}.svg", a.seed)));
        plot::write_svg(&path, &o)?;
        println!("plot: {}", path.display());
    }
    if !o.violations.is_empty() {
        println!("reproduce: {again}");
    }
    Ok(o.violations.is_empty())
}

fn run_sweep(a: &SweepArgs) -> anyhow::Result<bool> {
    let loaded = a
        .common
        .scenarios
        .iter()
        .map(|path| Ok((path.as_path(), load(&a.common, path)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let all_started = std::time::Instant::now();
    let mut results = Vec::with_capacity(loaded.len());
    for (path, s) in &loaded {
        let started = std::time::Instant::now();
        eprintln!(
            "sweeping {} with {} nodes over seeds {}..{} on {} thread(s)",
            s.name,
            s.nodes,
            a.first,
            a.first + a.seeds,
            a.jobs
        );
        let progress = |o: &omesh_netsim::Outcome| {
            if o.violations.is_empty() {
                eprint!(".");
            } else {
                eprintln!("\nseed {}: {} broken", o.seed, o.violations.len());
                for v in &o.violations {
                    eprintln!("  {v}");
                }
            }
        };
        let r = sweep::sweep(s, a.first, a.seeds, a.jobs, &progress);
        let wall = started.elapsed().as_secs_f64();
        eprintln!();
        println!(
            "{} seeds of {} ({} nodes) in {wall:.1} s: {} with broken invariants",
            r.runs,
            s.name,
            s.nodes,
            r.breaks.len()
        );
        println!(
            "worst over all seeds: convergence p99 {:.0} ms, failover {:.0} ms, duplicate-run window {:.0} ms",
            r.worst_spread_p99_ms, r.worst_failover_ms, r.worst_duplicate_ms
        );
        if r.stale_wakes > 0 {
            println!(
                "{} ticks after which a replica still asked to be woken no later than the tick",
                r.stale_wakes
            );
        }
        for (seed, vs) in &r.breaks {
            println!(
                "seed {seed}: reproduce with `{}`",
                reproduce(&a.common, path, s, *seed)
            );
            for v in vs {
                println!("  {v}");
            }
        }
        results.push((s.name.clone(), r));
    }
    let rows: Vec<(String, u64, &sweep::SweepResult)> = results
        .iter()
        .map(|(name, r)| (name.clone(), r.runs, r))
        .collect();
    if rows.iter().any(|(_, _, r)| r.disconnect.any_policy()) {
        println!();
        println!("{}", sweep::policy_table(&rows));
    }
    println!(
        "{} scenario(s) x {} seeds in {:.1} s on {} thread(s)",
        loaded.len(),
        a.seeds,
        all_started.elapsed().as_secs_f64(),
        a.jobs
    );
    Ok(results.iter().all(|(_, r)| r.breaks.is_empty()))
}
