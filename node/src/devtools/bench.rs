//! `omesh bench mesh`: local meshes of N peers; prints the time a state change takes to reach
//! every peer, and each peer's idle memory, CPU, connections, threads and context switches
//! (what idle cost is made of: work per connection, and wake-ups across threads).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::api::PropagationJson;
use crate::devtools::localmesh::LocalMesh;

/// Figures for one mesh size.
#[derive(Debug, Clone)]
pub struct MeshFigures {
    /// Peers.
    pub peers: usize,
    /// Time to converge after start.
    pub converge: Duration,
    /// State changes that reached every other peer.
    pub changes: usize,
    /// p50 of the time until the last peer merged a change, ms.
    pub p50_ms: f64,
    /// p99 of the same, ms.
    pub p99_ms: f64,
    /// Mean and max idle RSS per peer, MiB.
    pub rss_mib: (f64, f64),
    /// Mean and max idle CPU per peer, percent of one core.
    pub cpu_pct: (f64, f64),
    /// Mean and max anonymous (private) RSS per peer, MiB: the part that is the peer's own;
    /// the rest of its RSS is the binary's pages, shared by every peer on a host.
    pub anon_mib: (f64, f64),
    /// Mean and max open connections per peer, at the end of the window.
    pub conns: (f64, f64),
    /// Mean and max over peers of the most connections each held while the mesh formed.
    pub join_conns: (f64, f64),
    /// Mean and max threads per peer.
    pub threads: (f64, f64),
    /// Mean and max context switches per second per peer, over all its threads (each is a
    /// wake-up: a timer, a packet, or a hand-over between threads).
    pub csw_per_s: (f64, f64),
}

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let fields = crate::procfs::stat_fields(pid)?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `/proc/<pid>/status` field (`VmRSS`, `RssAnon`: KiB; `Threads`: a count).
fn status_field(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.split(':').next() == Some(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Context switches (voluntary and not) of all the threads of a process.
fn context_switches(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Some(total)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Runs one mesh of `n` peers and measures it for `window`.
pub async fn measure(bin: &Path, n: usize, window: Duration) -> Result<MeshFigures, String> {
    let root = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let mut mesh =
        LocalMesh::start(bin, root.path(), n, |_| Vec::new()).map_err(|e| format!("start: {e}"))?;
    let converge = mesh.wait_converged(Duration::from_secs(120)).await?;
    let join_conns: Vec<f64> = mesh.join_connections.iter().map(|c| *c as f64).collect();
    // Let start-up work (dials, first syncs) finish before calling it idle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pids: Vec<u32> = mesh.peers.iter().filter_map(|p| p.pid()).collect();
    let t0: Vec<Option<u64>> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let csw0: Vec<Option<u64>> = pids.iter().map(|p| context_switches(*p)).collect();
    let started = std::time::Instant::now();
    let window_start_ms = crate::peer::Clock::new().now();
    tokio::time::sleep(window).await;
    let secs = started.elapsed().as_secs_f64();
    let tck = clk_tck();
    let mut cpu = Vec::new();
    let mut csw = Vec::new();
    let (mut rss, mut anon, mut threads) = (Vec::new(), Vec::new(), Vec::new());
    for ((pid, before), csw_before) in pids.iter().zip(t0).zip(csw0) {
        if let (Some(b), Some(a)) = (before, cpu_ticks(*pid)) {
            cpu.push((a.saturating_sub(b)) as f64 / tck / secs * 100.0);
        }
        if let (Some(b), Some(a)) = (csw_before, context_switches(*pid)) {
            csw.push(a.saturating_sub(b) as f64 / secs);
        }
        let mib = |kib: u64| kib as f64 / 1024.0;
        rss.extend(status_field(*pid, "VmRSS").map(mib));
        anon.extend(status_field(*pid, "RssAnon").map(mib));
        threads.extend(status_field(*pid, "Threads").map(|t| t as f64));
    }
    let mut conns = Vec::new();
    for s in mesh.statuses().await.into_iter().flatten() {
        conns.push(s.peers_connected as f64);
    }
    // Every peer's merges of every other peer's node records in the window.
    let mut merges: BTreeMap<(String, u64), (u64, Vec<u64>)> = BTreeMap::new();
    for p in &mesh.peers {
        let samples: Vec<PropagationJson> = p
            .client()
            .get("/api/v1/debug/propagation")
            .await
            .map_err(|e| e.to_string())?;
        for s in samples {
            if s.written_at_ms < window_start_ms {
                continue;
            }
            let e = merges
                .entry((s.origin, s.seq))
                .or_insert((s.written_at_ms, Vec::new()));
            e.1.push(s.merged_at_ms);
        }
    }
    let mut delays: Vec<f64> = merges
        .values()
        .filter(|(_, m)| m.len() == n - 1)
        .filter_map(|(w, m)| m.iter().max().map(|last| last.saturating_sub(*w) as f64))
        .collect();
    delays.sort_by(f64::total_cmp);
    mesh.stop_all();
    let mean = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    Ok(MeshFigures {
        peers: n,
        converge,
        changes: delays.len(),
        p50_ms: percentile(&delays, 50.0),
        p99_ms: percentile(&delays, 99.0),
        rss_mib: (mean(&rss), max(&rss)),
        cpu_pct: (mean(&cpu), max(&cpu)),
        anon_mib: (mean(&anon), max(&anon)),
        conns: (mean(&conns), max(&conns)),
        join_conns: (mean(&join_conns), max(&join_conns)),
        threads: (mean(&threads), max(&threads)),
        csw_per_s: (mean(&csw), max(&csw)),
    })
}

/// The figures as a table.
pub fn table(rows: &[MeshFigures]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.peers.to_string(),
                format!("{:.1}s", r.converge.as_secs_f64()),
                r.changes.to_string(),
                format!("{:.0}", r.p50_ms),
                format!("{:.0}", r.p99_ms),
                format!("{:.1} / {:.1}", r.rss_mib.0, r.rss_mib.1),
                format!("{:.2} / {:.2}", r.cpu_pct.0, r.cpu_pct.1),
                format!("{:.1} / {:.1}", r.anon_mib.0, r.anon_mib.1),
                format!("{:.1} / {:.0}", r.conns.0, r.conns.1),
                format!("{:.1} / {:.0}", r.join_conns.0, r.join_conns.1),
                format!("{:.0} / {:.0}", r.threads.0, r.threads.1),
                format!("{:.0} / {:.0}", r.csw_per_s.0, r.csw_per_s.1),
            ]
        })
        .collect();
    crate::cli::client::table(
        &[
            "PEERS",
            "CONVERGE",
            "CHANGES",
            "P50 MS",
            "P99 MS",
            "IDLE RSS MIB mean/max",
            "IDLE CPU % mean/max",
            "ANON MIB",
            "CONNS",
            "JOIN CONNS",
            "THREADS",
            "CSW/S",
        ],
        &body,
    )
}
