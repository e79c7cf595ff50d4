//! `omesh image import|ls|rm|pull`. Import, ls and rm work on the data directory directly
//! (also while the peer runs: writes are atomic renames and the peer rescans every second);
//! pull asks the local peer to fetch an image from the mesh and draws its progress.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use crate::cli::client::{self, Client};
use crate::config::NodeConfig;
use crate::images::blobs::BlobStore;
use crate::images::import::{self, Imported};
use crate::images::PullJson;

/// The image commands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import a `docker save` archive (legacy or OCI layout), or an image of the local Docker
    /// engine, into the blob store. Prints the reference tasks pin: NAME@sha256:<image id>.
    Import(ImportArgs),
    /// List the images in the blob store.
    Ls(LsArgs),
    /// Remove an image from the blob store (layers other images use stay).
    Rm(RmArgs),
    /// Have the local peer pull an image from the mesh into its store, with a progress bar.
    Pull(PullArgs),
}

/// Which store: the data directory of a peer.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The peer's config file (its `data_dir` and `blob_cap_bytes` apply).
    #[arg(long, short, env = "OMESH_CONFIG")]
    config: Option<PathBuf>,
    /// The peer's data directory (overrides the config's).
    #[arg(long, env = "OMESH_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl StoreArgs {
    fn open(&self) -> anyhow::Result<BlobStore> {
        let mut overrides = toml::Table::new();
        if let Some(d) = &self.data_dir {
            overrides.insert(
                "data_dir".into(),
                toml::Value::String(d.display().to_string()),
            );
        }
        let cfg = NodeConfig::load(self.config.as_deref(), overrides)?;
        Ok(BlobStore::open(&cfg.data_dir, cfg.blob_cap_bytes)?)
    }
}

/// `omesh image import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A `docker save` archive.
    #[arg(required_unless_present = "from_docker")]
    file: Option<PathBuf>,
    /// Export this image (name, name:tag or id) from the local Docker engine instead.
    #[arg(long, value_name = "NAME", conflicts_with = "file")]
    from_docker: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `omesh image ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `omesh image rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Image id (or a prefix of at least 4 hex characters) or name.
    image: String,
    /// Remove it even if a live task needs it.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// `omesh image pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// The image, pinned by digest: NAME@sha256:<image id>.
    image: String,
    /// API bearer token.
    #[arg(long, env = "OMESH_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The local peer's API address.
    #[arg(long, env = "OMESH_API", default_value = "127.0.0.1:7878")]
    api: String,
    /// Print the final state as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs an image command.
pub fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Import(a) => import(&a),
        ImageCommand::Ls(a) => ls(&a),
        ImageCommand::Rm(a) => {
            let store = a.store.open()?;
            let rec = store.remove_image(&a.image, a.force)?;
            println!("removed sha256:{}", rec.id);
            Ok(())
        }
        ImageCommand::Pull(a) => pull(&a),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn import(a: &ImportArgs) -> anyhow::Result<()> {
    let store = a.store.open()?;
    let imported: Vec<Imported> = match (&a.file, &a.from_docker) {
        (Some(file), _) => import::import_archive(&store, file)?,
        (None, Some(name)) => runtime()?.block_on(async {
            let docker = crate::exec::docker::connect_engine()
                .await
                .map_err(anyhow::Error::msg)?;
            Ok::<_, anyhow::Error>(import::import_from_docker(&store, &docker, name).await?)
        })?,
        (None, None) => anyhow::bail!("give an archive file or --from-docker NAME"),
    };
    for i in &imported {
        if a.json {
            let v = serde_json::json!({
                "id": format!("sha256:{}", i.record.id),
                "reference": i.reference(),
                "names": i.record.names,
                "layers": i.record.layers.iter().map(|l| format!("sha256:{l}")).collect::<Vec<_>>(),
                "size": i.record.size,
                "new_bytes": i.new_bytes,
            });
            println!("{v}");
        } else {
            eprintln!(
                "imported sha256:{} ({} layers, {}, {} new)",
                i.record.id,
                i.record.layers.len(),
                human(i.record.size),
                human(i.new_bytes)
            );
            println!("{}", i.reference());
        }
    }
    Ok(())
}

fn ls(a: &LsArgs) -> anyhow::Result<()> {
    let store = a.store.open()?;
    let scan = store.scan()?;
    let pinned = store.pinned();
    if a.json {
        let v: Vec<serde_json::Value> = scan
            .images
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": format!("sha256:{}", r.id),
                    "names": r.names,
                    "size": r.size,
                    "layers": r.layers.len(),
                    "complete": scan.complete(r),
                    "in_use": pinned.contains(&r.id),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = scan
        .images
        .iter()
        .map(|r| {
            let missing = r.blobs().filter(|d| !scan.blobs.contains_key(d)).count();
            vec![
                r.id.to_hex()[..12].to_owned(),
                if r.names.is_empty() {
                    "-".into()
                } else {
                    r.names.join(",")
                },
                human(r.size),
                r.layers.len().to_string(),
                if missing == 0 {
                    "complete".into()
                } else {
                    format!("{missing} blobs missing")
                },
                if pinned.contains(&r.id) {
                    "yes".into()
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    let table = client::table(
        &["IMAGE ID", "NAMES", "SIZE", "LAYERS", "STATE", "IN USE"],
        &rows,
    );
    println!("{}", table.trim_end());
    println!(
        "store: {} of {} (blob_cap_bytes)",
        human(scan.total_bytes()),
        human(store.cap_bytes())
    );
    Ok(())
}

fn pull(a: &PullArgs) -> anyhow::Result<()> {
    let image = omesh_protocol::ImageRef::parse(&a.image)?;
    let client = Client::new(&a.api);
    let body = serde_json::to_value(crate::api::PullBody {
        image: image.to_string(),
    })?;
    let tty = std::io::stderr().is_terminal();
    let last = runtime()?.block_on(async {
        let _: PullJson = client
            .send(
                reqwest::Method::POST,
                "/api/v1/images/pull",
                a.token.as_deref(),
                Some(&body),
            )
            .await?;
        let start = Instant::now();
        loop {
            let pulls: Vec<PullJson> = client.get("/api/v1/images/pulls").await?;
            let Some(p) = pulls.into_iter().find(|p| p.image == image.to_string()) else {
                anyhow::bail!("the peer does not list the pull of {image}");
            };
            if tty {
                eprint!("\r{}", bar(&p, start.elapsed()));
            }
            if p.state != "fetching" {
                if tty {
                    eprintln!();
                }
                return Ok(p);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&last)?);
    }
    match last.error {
        Some(e) => anyhow::bail!("pull of {image} failed: {e}"),
        None => {
            if !a.json {
                println!(
                    "pulled {image} ({} in {:.1}s)",
                    human(last.total_bytes),
                    last.elapsed_ms as f64 / 1000.0
                );
            }
            Ok(())
        }
    }
}

/// `[#########-----------]  45%  12.0/26.5 MiB  85.1 MB/s`
fn bar(p: &PullJson, elapsed: Duration) -> String {
    let total = p.total_bytes.max(p.done_bytes).max(1);
    let width = 30u64;
    let filled = (p.done_bytes.min(total) * width / total) as usize;
    let rate = p.done_bytes as f64 / elapsed.as_secs_f64().max(0.001) / 1e6;
    format!(
        "[{}{}] {:>3}%  {}/{}  {rate:.1} MB/s ",
        "#".repeat(filled),
        "-".repeat(width as usize - filled),
        p.done_bytes.min(total) * 100 / total,
        human(p.done_bytes),
        human(p.total_bytes)
    )
}

/// Bytes in binary units.
pub fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
