//! `omesh bench blobs`: figures of the blob data plane on local peers (child processes).
//!
//! 1. Single transfer: one blob of `--mib` MiB (default 1 GiB) from peer A's store to peer B
//!    through `POST /api/v1/images/pull`, timed by B (request to verified blob in place).
//!    The same bytes then go over one plain quinn stream (same TLS, same loopback, server and
//!    client on runtimes of their own, received bytes written to a file), and through `cp`.
//! 2. Fan-out: an image of `--fanout-mib` MiB from one origin to `--fanout-peers` peers at
//!    once: the time until the last one holds it, relative to one peer alone, and the bytes
//!    the origin served relative to the image size.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use omesh_protocol::Digest;

use crate::cli::client::Client;
use crate::devtools::localmesh::LocalMesh;
use crate::images::blobs::{BlobStore, ImageRecord};
use crate::images::PullJson;

/// What to run.
#[derive(Debug, Clone)]
pub struct BlobBench {
    /// Size of the single-transfer blob, MiB.
    pub mib: u64,
    /// Peers pulling at once in the fan-out.
    pub fanout_peers: usize,
    /// Size of the fan-out image, MiB (0: skip the fan-out).
    pub fanout_mib: u64,
    /// Rounds of the single transfer (best of each kind counts; 0: skip it).
    pub rounds: usize,
    /// Each fan-out peer's uplink cap, MB/s (0: none).
    pub link_mbps: f64,
}

/// The figures.
#[derive(Debug, Clone, Default)]
pub struct BlobFigures {
    /// Bytes of the single-transfer blob.
    pub bytes: u64,
    /// omesh fetch, seconds.
    pub omesh_s: f64,
    /// Plain quinn stream, seconds.
    pub quinn_s: f64,
    /// `cp`, seconds.
    pub cp_s: f64,
    /// Rounds run (best of each).
    pub rounds: usize,
    /// Fan-out image bytes.
    pub fanout_bytes: u64,
    /// Peers in the fan-out.
    pub fanout_peers: usize,
    /// One peer alone, seconds.
    pub one_s: f64,
    /// All peers at once, until the last, seconds.
    pub all_s: f64,
    /// Bytes the origin served during the fan-out.
    pub origin_served: u64,
    /// Bytes each fetching peer served to the others.
    pub fetchers_served: Vec<u64>,
    /// Each fan-out peer's uplink cap, MB/s (0: none).
    pub link_mbps: f64,
}

const TOKEN: &str = "bench-token";

fn mbps(bytes: u64, s: f64) -> f64 {
    bytes as f64 / s.max(1e-9) / 1e6
}

/// Writes a synthetic image (config + one layer of `mib` MiB of pseudo-random bytes) into the
/// store at `data_dir`; its reference.
pub fn synthetic_image(
    data_dir: &Path,
    mib: u64,
    seed: u64,
) -> Result<(String, Digest, PathBuf), String> {
    let store = BlobStore::open(data_dir, u64::MAX).map_err(|e| e.to_string())?;
    let mut layer = store.stage().map_err(|e| e.to_string())?;
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for word in buf.chunks_exact_mut(8) {
            // xorshift64: incompressible enough, and fast.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        layer.write_all(&buf).map_err(|e| e.to_string())?;
    }
    let layer = layer.finish(None).map_err(|e| e.to_string())?;
    let layer_digest = layer.digest;
    let layer_size = layer.size;
    store.commit(layer).map_err(|e| e.to_string())?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "comment": format!("omesh bench {seed}"),
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
    })
    .to_string();
    let mut c = store.stage().map_err(|e| e.to_string())?;
    c.write_all(config.as_bytes()).map_err(|e| e.to_string())?;
    let c = c.finish(None).map_err(|e| e.to_string())?;
    let id = c.digest;
    store.commit(c).map_err(|e| e.to_string())?;
    store
        .put_record(&ImageRecord {
            id,
            names: vec!["bench:latest".into()],
            layers: vec![layer_digest],
            size: layer_size + config.len() as u64,
        })
        .map_err(|e| e.to_string())?;
    Ok((
        format!("bench@sha256:{id}"),
        layer_digest,
        store.blob_path(&layer_digest),
    ))
}

async fn pull(api: &Client, image: &str) -> Result<(), String> {
    let body = serde_json::json!({ "image": image });
    let _: PullJson = api
        .send(
            reqwest::Method::POST,
            "/api/v1/images/pull",
            Some(TOKEN),
            Some(&body),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Waits for the pull of `image` on `api` to end; its time as the peer measured it.
async fn pulled(api: &Client, image: &str, limit: Duration) -> Result<Duration, String> {
    let end = Instant::now() + limit;
    loop {
        let pulls: Vec<PullJson> = api
            .get("/api/v1/images/pulls")
            .await
            .map_err(|e| e.to_string())?;
        if let Some(p) = pulls.iter().find(|p| p.image == image) {
            match p.state.as_str() {
                "done" => return Ok(Duration::from_millis(p.elapsed_ms)),
                "failed" => {
                    return Err(format!(
                        "pull failed: {}",
                        p.error.clone().unwrap_or_default()
                    ))
                }
                _ => {}
            }
        }
        if Instant::now() > end {
            return Err(format!("pull of {image} did not end in {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `omesh_blob_bytes_served_total` of the peer whose API is at `api` (`host:port`).
async fn served(api: &str) -> u64 {
    blob_bytes(api, "served").await
}

/// `omesh_blob_bytes_<what>_total` (`served`, `fetched`) of the peer whose API is at `api`
/// (`host:port`); 0 when it does not answer.
pub async fn blob_bytes(api: &str, what: &str) -> u64 {
    let text = match reqwest::get(format!("http://{api}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return 0,
    };
    let key = format!("omesh_blob_bytes_{what}_total ");
    text.lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The flags of every bench peer; the token goes into a file under `root`.
fn flags(root: &Path) -> Result<Vec<String>, String> {
    let mut f = crate::devtools::localmesh::token_flags(root, TOKEN)
        .map_err(|e| format!("API token file: {e}"))?;
    f.extend(["--executor".into(), "process".into()]);
    Ok(f)
}

/// Runs the benchmark; progress lines go to `log`.
pub async fn run(bin: &Path, cfg: &BlobBench, log: impl Fn(&str)) -> Result<BlobFigures, String> {
    let mut root = tempfile::Builder::new()
        .prefix("omesh-bench-blobs-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    // OMESH_BENCH_KEEP=1 keeps the peers' directories (logs) for a look afterwards.
    if std::env::var("OMESH_BENCH_KEEP").as_deref() == Ok("1") {
        root.disable_cleanup(true);
        eprintln!("bench: keeping {}", root.path().display());
    }
    let mut fig = BlobFigures::default();
    if cfg.rounds > 0 {
        single(bin, root.path(), cfg, &mut fig, &log).await?;
    }
    if cfg.fanout_mib > 0 && cfg.fanout_peers > 0 {
        fanout(bin, root.path(), cfg, &mut fig, &log).await?;
    }
    Ok(fig)
}

/// One blob A -> B, against plain quinn and cp.
async fn single(
    bin: &Path,
    root: &Path,
    cfg: &BlobBench,
    fig: &mut BlobFigures,
    log: &impl Fn(&str),
) -> Result<(), String> {
    log(&format!(
        "writing a {} MiB blob into peer A's store",
        cfg.mib
    ));
    let a_data = root.join("single/peer0/data");
    let (image, _, blob_path) = synthetic_image(&a_data, cfg.mib, 1)?;
    fig.bytes = std::fs::metadata(&blob_path)
        .map_err(|e| e.to_string())?
        .len();
    let flags = flags(root)?;
    let mut mesh = LocalMesh::start(bin, &root.join("single"), 2, |_| flags.clone())
        .map_err(|e| e.to_string())?;
    mesh.wait_converged(Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await; // A's record, republished, carries the image
    let b = mesh.peers.get(1).map(|p| p.client()).ok_or("no peer B")?;
    let b_store =
        BlobStore::open(&root.join("single/peer1/data"), u64::MAX).map_err(|e| e.to_string())?;
    // Rounds alternate the three transfers; the best of each counts, so that load from
    // elsewhere on the host weighs on all of them alike.
    let (mut omesh, mut quinn, mut cp) = (f64::MAX, f64::MAX, f64::MAX);
    for round in 1..=cfg.rounds {
        log(&format!("round {round}: omesh A -> B"));
        pull(&b, &image).await?;
        let t = pulled(&b, &image, Duration::from_secs(1800)).await?;
        omesh = omesh.min(t.as_secs_f64());
        b_store
            .remove_image(&image.replace("bench@", ""), true)
            .map_err(|e| e.to_string())?;
        log(&format!(
            "round {round}: plain quinn stream of the same bytes"
        ));
        let (src, dst) = (blob_path.clone(), root.join("quinn.out"));
        // Its runtimes need a thread outside this one's.
        let plain = std::thread::spawn(move || plain_quinn(&src, &dst));
        let plain = tokio::task::spawn_blocking(move || plain.join())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|_| "the plain quinn transfer panicked".to_owned())?;
        quinn = quinn.min(plain?.as_secs_f64());
        let _ = std::fs::remove_file(root.join("quinn.out"));
        log(&format!("round {round}: cp of the same file"));
        let start = Instant::now();
        let status = std::process::Command::new("cp")
            .arg(&blob_path)
            .arg(root.join("cp.out"))
            .status()
            .map_err(|e| format!("cp: {e}"))?;
        if !status.success() {
            return Err("cp failed".into());
        }
        cp = cp.min(start.elapsed().as_secs_f64());
        let _ = std::fs::remove_file(root.join("cp.out"));
    }
    (fig.omesh_s, fig.quinn_s, fig.cp_s) = (omesh, quinn, cp);
    fig.rounds = cfg.rounds;
    mesh.stop_all();
    let _ = std::fs::remove_dir_all(root.join("single"));
    let _ = std::fs::remove_file(root.join("cp.out"));
    Ok(())
}

async fn fanout(
    bin: &Path,
    root: &Path,
    cfg: &BlobBench,
    fig: &mut BlobFigures,
    log: &impl Fn(&str),
) -> Result<(), String> {
    let dir = root.join("fanout");
    log(&format!(
        "fan-out: a {} MiB image, origin + {} peers",
        cfg.fanout_mib, cfg.fanout_peers
    ));
    let (image, _, blob) = synthetic_image(&dir.join("peer0/data"), cfg.fanout_mib, 2)?;
    fig.fanout_bytes = std::fs::metadata(&blob).map_err(|e| e.to_string())?.len();
    fig.fanout_peers = cfg.fanout_peers;
    fig.link_mbps = cfg.link_mbps;
    let rate = (cfg.link_mbps * 1e6) as u64;
    let flags = flags(root)?;
    let mut mesh = LocalMesh::start(bin, &dir, cfg.fanout_peers + 1, |_| {
        let mut f = flags.clone();
        if rate > 0 {
            f.extend(["--blob-serve-bytes-per-sec".into(), rate.to_string()]);
        }
        f
    })
    .map_err(|e| e.to_string())?;
    mesh.wait_converged(Duration::from_secs(120)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let clients: Vec<Client> = mesh.peers.iter().map(|p| p.client()).collect();
    let first = clients.get(1).ok_or("no peer 1")?;
    log("fan-out: one peer alone");
    pull(first, &image).await?;
    fig.one_s = pulled(first, &image, Duration::from_secs(1800))
        .await?
        .as_secs_f64();
    // Take it away again, and let the mesh see that before everyone pulls.
    let store = BlobStore::open(&dir.join("peer1/data"), u64::MAX).map_err(|e| e.to_string())?;
    store
        .remove_image(&image.replace("bench@", ""), true)
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let apis: Vec<String> = mesh.peers.iter().map(|p| p.api()).collect();
    let mut before = Vec::new();
    for a in &apis {
        before.push(served(a).await);
    }
    log("fan-out: every peer at once");
    let pullers = clients.get(1..).ok_or("no peers")?;
    for c in pullers {
        pull(c, &image).await?;
    }
    let mut slowest = Duration::ZERO;
    for c in pullers {
        slowest = slowest.max(pulled(c, &image, Duration::from_secs(3600)).await?);
    }
    fig.all_s = slowest.as_secs_f64();
    let mut each = Vec::new();
    for (a, b) in apis.iter().zip(&before) {
        each.push(served(a).await.saturating_sub(*b));
    }
    fig.origin_served = each.first().copied().unwrap_or(0);
    fig.fetchers_served = each.get(1..).map(<[u64]>::to_vec).unwrap_or_default();
    mesh.stop_all();
    Ok(())
}

/// The blob over one quinn stream between two endpoints with the data plane's TLS, each on
/// its own runtime (like two peers); the receiver writes what arrives to `out`.
fn plain_quinn(src: &Path, out: &Path) -> Result<Duration, String> {
    use libp2p::identity::Keypair;
    let server_key = Keypair::generate_ed25519();
    let client_key = Keypair::generate_ed25519();
    let server_peer = server_key.public().to_peer_id();
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    };
    let server_rt = rt()?;
    let endpoint = server_rt.block_on(async {
        crate::images::dataplane::endpoint(&server_key, "127.0.0.1:0".parse().map_err(|_| "addr")?)
            .map_err(|e| e.to_string())
    })?;
    let addr = endpoint.local_addr().map_err(|e| e.to_string())?;
    let src = src.to_owned();
    let server = server_rt.spawn(async move {
        use tokio::io::AsyncReadExt;
        let conn = endpoint
            .accept()
            .await
            .ok_or("no connection")?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, _recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let mut f = tokio::fs::File::open(&src)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            send.write_all(buf.get(..n).unwrap_or_default())
                .await
                .map_err(|e| e.to_string())?;
        }
        send.finish().map_err(|e| e.to_string())?;
        let _ = send.stopped().await;
        Ok::<_, String>(())
    });
    let client_rt = rt()?;
    let out = out.to_owned();
    let elapsed = client_rt.block_on(async move {
        use tokio::io::AsyncWriteExt;
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().map_err(|_| "addr")?)
            .map_err(|e| e.to_string())?;
        let start = Instant::now();
        let conn = crate::images::dataplane::connect(&client, &client_key, server_peer, addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"go").await.map_err(|e| e.to_string())?;
        let mut f = tokio::fs::File::create(&out)
            .await
            .map_err(|e| e.to_string())?;
        while let Some(chunk) = recv
            .read_chunk(usize::MAX, true)
            .await
            .map_err(|e| e.to_string())?
        {
            f.write_all(&chunk.bytes).await.map_err(|e| e.to_string())?;
        }
        f.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(start.elapsed())
    })?;
    server_rt.block_on(server).map_err(|e| e.to_string())??;
    Ok(elapsed)
}

/// The report.
pub fn table(f: &BlobFigures) -> String {
    let mut out = String::new();
    if f.rounds > 0 {
        single_table(f, &mut out);
    }
    if f.fanout_peers > 0 {
        fanout_table(f, &mut out);
    }
    out
}

fn single_table(f: &BlobFigures, out: &mut String) {
    let mb = f.bytes as f64 / 1e6;
    out.push_str(&format!(
        "single transfer of {:.0} MB between two local peers (best of {} rounds)\n",
        mb, f.rounds
    ));
    out.push_str(&format!(
        "  omesh fetch (A -> B)     {:>8.1} MB/s  ({:.2} s)\n",
        mbps(f.bytes, f.omesh_s),
        f.omesh_s
    ));
    out.push_str(&format!(
        "  plain quinn stream       {:>8.1} MB/s  ({:.2} s)\n",
        mbps(f.bytes, f.quinn_s),
        f.quinn_s
    ));
    out.push_str(&format!(
        "  cp                       {:>8.1} MB/s  ({:.2} s)\n",
        mbps(f.bytes, f.cp_s),
        f.cp_s
    ));
    out.push_str(&format!(
        "  omesh / plain quinn      {:>8.2}   (goal >= 0.8)\n",
        f.quinn_s / f.omesh_s.max(1e-9)
    ));
    out.push_str(&format!(
        "  omesh / cp               {:>8.2}\n",
        f.cp_s / f.omesh_s.max(1e-9)
    ));
}

fn fanout_table(f: &BlobFigures, out: &mut String) {
    let link = if f.link_mbps > 0.0 {
        format!("each peer's uplink capped at {:.0} MB/s", f.link_mbps)
    } else {
        "no uplink cap: the host's CPU is the limit".to_owned()
    };
    out.push_str(&format!(
        "one image ({:.0} MB) to {} local peers at once ({link})\n",
        f.fanout_bytes as f64 / 1e6,
        f.fanout_peers
    ));
    out.push_str(&format!("  one peer alone           {:>8.2} s\n", f.one_s));
    out.push_str(&format!("  all at once (last done)  {:>8.2} s\n", f.all_s));
    out.push_str(&format!(
        "  time, all / one          {:>8.2}   (goal <= 2)\n",
        f.all_s / f.one_s.max(1e-9)
    ));
    out.push_str(&format!(
        "  origin served / image    {:>8.2}   (goal <= 2)\n",
        f.origin_served as f64 / (f.fanout_bytes.max(1)) as f64
    ));
    let peers: Vec<String> = f
        .fetchers_served
        .iter()
        .map(|b| format!("{:.2}", *b as f64 / f.fanout_bytes.max(1) as f64))
        .collect();
    out.push_str(&format!(
        "  served by each fetcher / image: {}\n",
        peers.join(" ")
    ));
}
