//! Images on a running peer: the blob store, the data-plane server and fetcher, what the node
//! advertises (`Input::Images`), and getting a Docker task's image into the engine before its
//! container starts: fetched from the peers that hold it, verified, then loaded with bollard.
//!
//! The driver owns an `Arc<ImageService>` and calls [`ImageService::refresh`] once a second
//! with its replica; everything slow (scans, fetches, loads) runs on tasks of its own.

pub mod blobs;
pub mod dataplane;
pub mod fetch;
pub mod import;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use omesh_protocol::{Digest, ImageRef, TaskId};
use omesh_state::Replica;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tracing::{info, warn};

use crate::config::{NetPlan, NodeConfig};
use crate::exec::{ExecError, ImageProvider, Instance};
use crate::metrics::{BlobMetrics, Metrics};
use crate::peer::net;
use blobs::{BlobStore, ImageRecord, StoreError};
use dataplane::{Allowed, DataPlaneError, Faults};
use fetch::{Fetcher, Holder, Holders, Progress};

/// How often the store is rescanned (imports and removals by the CLI show up this fast).
const RESCAN: Duration = Duration::from_secs(1);

/// Why images could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The data plane cannot start.
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
}

/// A pull asked for through the API, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullJson {
    /// The image reference.
    pub image: String,
    /// `fetching`, `done` or `failed`.
    pub state: String,
    /// Bytes received so far.
    pub done_bytes: u64,
    /// Bytes known to be needed so far.
    pub total_bytes: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// Time taken so far (or in all), ms.
    pub elapsed_ms: u64,
}

struct Pull {
    image: String,
    progress: Arc<Progress>,
    started: Instant,
    ended: Option<(Duration, Option<String>)>,
}

/// One other node as the fetcher sees it.
#[derive(Debug, Clone)]
struct DirNode {
    peer: PeerId,
    addr: SocketAddr,
    images: BTreeSet<Digest>,
}

/// Who holds what, from the node records (refreshed by the driver).
#[derive(Debug, Default)]
struct Directory(RwLock<Vec<DirNode>>);

impl Holders for Directory {
    fn holders(&self, digest: &Digest, image: &Digest) -> Vec<Holder> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|n| n.images.contains(digest))
            .map(|n| Holder {
                peer: n.peer,
                addr: n.addr,
                complete: n.images.contains(image),
            })
            .collect()
    }
}

/// What the store holds, as last fed to the replica and as last scanned.
#[derive(Debug, Default)]
struct Advertised {
    fed: Option<BTreeSet<Digest>>,
    scanned: Option<BTreeSet<Digest>>,
}

/// The image side of a peer.
pub struct ImageService {
    store: BlobStore,
    fetcher: Fetcher,
    directory: Arc<Directory>,
    allowed: Allowed,
    blob_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    use_docker: bool,
    docker: tokio::sync::OnceCell<Option<bollard::Docker>>,
    fetching: Mutex<HashMap<TaskId, Arc<Progress>>>,
    pulls: Mutex<BTreeMap<Digest, Pull>>,
    advertised: Mutex<Advertised>,
    loads: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    store_changed: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ImageService {
    /// Opens the store, binds the blob endpoint and starts serving and rescanning. Must run
    /// inside a tokio runtime. `use_docker`: this node runs Docker tasks.
    pub fn start(
        cfg: &NodeConfig,
        plan: &NetPlan,
        key: &Keypair,
        metrics: &Arc<Mutex<Metrics>>,
        use_docker: bool,
        contacts: Option<dataplane::contact::Requests>,
    ) -> Result<Arc<Self>, ImagesError> {
        let store = BlobStore::open(&cfg.data_dir, cfg.blob_cap_bytes)?;
        let endpoint = match dataplane::endpoint(key, plan.blob_listen) {
            Ok(e) => e,
            // The default (QUIC port + 1) may be taken; peers learn the port from the record.
            Err(e) if cfg.blob_listen.is_none() => {
                let any = SocketAddr::new(plan.blob_listen.ip(), 0);
                warn!(
                    error = %e,
                    port = plan.blob_listen.port(),
                    "the blob data plane's default port (QUIC port + 1, config key `blob_listen`) \
                     is in use; using a free one, which other peers learn from this node's record \
                     (a seed must keep the default: joining peers make their first contact there; \
                     set `blob_listen` or free the port)"
                );
                dataplane::endpoint(key, any)?
            }
            Err(e) => return Err(e.into()),
        };
        let blob_addr = endpoint
            .local_addr()
            .map_err(|source| DataPlaneError::Bind {
                addr: plan.blob_listen,
                source,
            })?;
        let blob_metrics = BlobMetrics::default();
        if let Ok(mut m) = metrics.lock() {
            blob_metrics.register(&mut m.registry);
        }
        let directory = Arc::new(Directory::default());
        let holders: Arc<dyn Holders> = directory.clone();
        let fetcher = Fetcher::new(
            store.clone(),
            endpoint.clone(),
            key.clone(),
            holders,
            blob_metrics.clone(),
        );
        let allowed = Allowed::default();
        let faults = Faults {
            corrupt: cfg.debug_corrupt_blobs,
            drop_after_bytes: cfg.debug_drop_after_bytes,
        };
        tokio::spawn(dataplane::serve(
            endpoint.clone(),
            store.clone(),
            allowed.clone(),
            faults,
            blob_metrics.clone(),
            dataplane::Pacer::new(cfg.blob_serve_bytes_per_sec),
            contacts,
        ));
        info!(addr = %blob_addr, cap_bytes = cfg.blob_cap_bytes, "blob data plane listening");
        let service = Arc::new(Self {
            store,
            fetcher,
            directory,
            allowed,
            blob_addr,
            endpoint,
            use_docker,
            docker: tokio::sync::OnceCell::new(),
            fetching: Mutex::default(),
            pulls: Mutex::default(),
            advertised: Mutex::default(),
            loads: Mutex::default(),
            store_changed: tokio::sync::Notify::new(),
        });
        tokio::spawn(rescan(Arc::downgrade(&service), blob_metrics));
        Ok(service)
    }

    /// The store.
    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// The bound blob endpoint.
    pub fn blob_addr(&self) -> SocketAddr {
        self.blob_addr
    }

    /// The data plane endpoint (first contacts dial from it).
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Addresses of the blob endpoint to advertise: the bound one, or, when it listens on
    /// every interface, one per IP of the (dialable) libp2p listen addresses.
    pub fn advertised_addrs(&self, listen: &[Multiaddr]) -> Vec<String> {
        if !self.blob_addr.ip().is_unspecified() {
            return vec![dataplane::blob_addr_string(self.blob_addr)];
        }
        let mut out: Vec<String> = Vec::new();
        for a in listen {
            for p in a.iter() {
                let ip = match p {
                    Protocol::Ip4(ip) => std::net::IpAddr::V4(ip),
                    Protocol::Ip6(ip) => std::net::IpAddr::V6(ip),
                    _ => continue,
                };
                let s = dataplane::blob_addr_string(SocketAddr::new(ip, self.blob_addr.port()));
                if !ip.is_unspecified() && !out.contains(&s) {
                    out.push(s);
                }
            }
        }
        out
    }

    /// Brings the directory of holders, the set of peers allowed to fetch, and the pinned
    /// images up to date with the replica. Returns a new set of digests to advertise when
    /// the store changed.
    /// `permitted`: whether a peer may fetch and be fetched from (not blocked, admitted).
    pub fn refresh(
        &self,
        replica: &Replica,
        now: u64,
        permitted: impl Fn(&PeerId) -> bool,
    ) -> Option<BTreeSet<Digest>> {
        let me = replica.id();
        // Every known node may fetch from us; only live ones are asked.
        let allowed: HashSet<PeerId> = replica
            .state()
            .nodes()
            .filter(|n| n.id != me)
            .filter_map(|n| net::peer_id_of(&n.id))
            .filter(|p| permitted(p))
            .collect();
        let dir: Vec<DirNode> = replica
            .live_peers(now)
            .filter_map(|n| {
                let peer = net::peer_id_of(&n.id).filter(|p| permitted(p))?;
                let addr = n.addrs.iter().find_map(|a| dataplane::parse_blob_addr(a))?;
                Some(DirNode {
                    peer,
                    addr,
                    images: n.images.clone(),
                })
            })
            .collect();
        self.allowed.set(allowed);
        *self
            .directory
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner) = dir;
        let pinned = replica.images_in_use(now);
        let store = self.store.clone();
        // A small file write, and only on change.
        if let Err(e) = store.set_pinned(&pinned) {
            warn!(error = %e, "cannot record the images live tasks need");
        }
        let mut adv = lock(&self.advertised);
        let latest = adv
            .scanned
            .clone()
            .filter(|l| adv.fed.as_ref() != Some(l))?;
        adv.fed = Some(latest.clone());
        Some(latest)
    }

    /// Resolves when what the store holds changed (the driver then calls [`Self::refresh`]).
    pub async fn store_changed(&self) {
        self.store_changed.notified().await;
    }

    /// The progress of the image fetch a task waits for, if any.
    pub fn progress(&self, task: &TaskId) -> Option<String> {
        lock(&self.fetching).get(task).map(|p| p.text())
    }

    /// Starts pulling `image` into the store (no-op if a pull of it runs); its state.
    pub fn pull(self: &Arc<Self>, image: ImageRef) -> PullJson {
        let digest = image.digest;
        let mut pulls = lock(&self.pulls);
        let running = pulls.get(&image.digest).is_some_and(|p| p.ended.is_none());
        if !running {
            let progress = Arc::new(Progress::default());
            pulls.insert(
                image.digest,
                Pull {
                    image: image.to_string(),
                    progress: Arc::clone(&progress),
                    started: Instant::now(),
                    ended: None,
                },
            );
            let me = Arc::clone(self);
            tokio::spawn(async move {
                let result = me.fetcher.fetch_image(&image, &progress).await;
                let mut pulls = lock(&me.pulls);
                if let Some(p) = pulls.get_mut(&image.digest) {
                    p.ended = Some((p.started.elapsed(), result.err().map(|e| e.to_string())));
                }
            });
        }
        pulls
            .get(&digest)
            .map(pull_json)
            .unwrap_or_else(|| PullJson {
                image: String::new(),
                state: "failed".into(),
                done_bytes: 0,
                total_bytes: 0,
                error: Some("pull vanished".into()),
                elapsed_ms: 0,
            })
    }

    /// Every pull asked for since start.
    pub fn pulls(&self) -> Vec<PullJson> {
        lock(&self.pulls).values().map(pull_json).collect()
    }

    async fn docker(&self) -> Option<bollard::Docker> {
        if !self.use_docker {
            return None;
        }
        self.docker
            .get_or_init(|| async {
                match crate::exec::docker::connect_engine().await {
                    Ok(engine) => Some(engine),
                    Err(e) => {
                        warn!(error = %e, "no Docker engine to load images into");
                        None
                    }
                }
            })
            .await
            .clone()
    }

    /// Loads a stored image into the engine as a legacy `docker save` archive.
    async fn load(&self, docker: &bollard::Docker, rec: &ImageRecord) -> Result<(), String> {
        let gate = {
            let mut loads = lock(&self.loads);
            Arc::clone(loads.entry(rec.id).or_default())
        };
        let _one_at_a_time = gate.lock().await;
        let id = format!("sha256:{}", rec.id);
        if docker.inspect_image(&id).await.is_ok() {
            return Ok(());
        }
        let parts = docker_archive(&self.store, rec).map_err(|e| e.to_string())?;
        let options = bollard::query_parameters::ImportImageOptionsBuilder::default()
            .quiet(true)
            .build();
        let mut answers = docker.import_image_stream(options, part_stream(parts), None);
        while let Some(answer) = answers.next().await {
            answer.map_err(|e| format!("docker load of {id}: {e}"))?;
        }
        docker
            .inspect_image(&id)
            .await
            .map(|_| ())
            .map_err(|e| format!("docker load of {id} ended but the engine does not show it: {e}"))
    }
}

#[async_trait::async_trait]
impl ImageProvider for ImageService {
    async fn prepare(&self, inst: &Instance) -> Result<(), ExecError> {
        self.ensure_in_engine(inst)
            .await
            .map_err(ExecError::ImageUnavailable)
    }
}

impl ImageService {
    /// Gets `inst`'s image into the engine: at once if it is there, else fetched from the
    /// peers that hold it, verified and loaded.
    async fn ensure_in_engine(&self, inst: &Instance) -> Result<(), String> {
        let image = ImageRef::parse(&inst.spec.spec.image).map_err(|e| e.to_string())?;
        let Some(docker) = self.docker().await else {
            return Ok(()); // The backend reports the missing engine itself.
        };
        let id = format!("sha256:{}", image.digest);
        let reference = image.to_string();
        if docker.inspect_image(&id).await.is_ok()
            || docker.inspect_image(&reference).await.is_ok_and(|i| {
                i.repo_digests
                    .is_some_and(|d| d.iter().any(|r| r.ends_with(&format!("@{id}"))))
            })
        {
            self.store.touch(&image.digest);
            return Ok(());
        }
        info!(task = %inst.task.short(), image = %image, "image not in the engine; fetching it from peers");
        let progress = Arc::new(Progress::default());
        lock(&self.fetching).insert(inst.task, Arc::clone(&progress));
        let result = async {
            let rec = self
                .fetcher
                .fetch_image(&image, &progress)
                .await
                .map_err(|e| e.to_string())?;
            progress
                .loading
                .store(true, std::sync::atomic::Ordering::Relaxed);
            self.load(&docker, &rec).await
        }
        .await;
        lock(&self.fetching).remove(&inst.task);
        result.map_err(|e| format!("cannot get image {image}: {e}"))
    }
}

fn pull_json(p: &Pull) -> PullJson {
    let (state, error, elapsed) = match &p.ended {
        None => ("fetching", None, p.started.elapsed()),
        Some((d, None)) => ("done", None, *d),
        Some((d, Some(e))) => ("failed", Some(e.clone()), *d),
    };
    PullJson {
        image: p.image.clone(),
        state: state.into(),
        done_bytes: p.progress.done.load(std::sync::atomic::Ordering::Relaxed),
        total_bytes: p.progress.total.load(std::sync::atomic::Ordering::Relaxed),
        error,
        elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
    }
}

/// Rescans the store every second: what to advertise, the store size gauge, and eviction
/// when it went over the cap (e.g. after a CLI import with a larger cap).
async fn rescan(service: Weak<ImageService>, metrics: BlobMetrics) {
    let mut tick = tokio::time::interval(RESCAN);
    loop {
        let Some(s) = service.upgrade() else { return };
        let store = s.store.clone();
        drop(s);
        tokio::select! {
            _ = tick.tick() => {}
            () = store.fetch_started() => {}
        }
        let Some(s) = service.upgrade() else { return };
        let store = s.store.clone();
        drop(s);
        let scanned = tokio::task::spawn_blocking(move || {
            let evicted = store.make_room(0, &BTreeSet::new());
            let scan = store.scan()?;
            let partials = store.partial_digests();
            Ok::<_, StoreError>((
                scan.advertised(&partials, omesh_state::merge::MAX_IMAGES),
                scan.total_bytes(),
                evicted,
            ))
        })
        .await;
        let Some(s) = service.upgrade() else { return };
        match scanned {
            Ok(Ok((adv, bytes, evicted))) => {
                metrics
                    .store_bytes
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
                match evicted {
                    Ok(e) => {
                        metrics.evicted.inc_by(e.len() as u64);
                    }
                    Err(e) => warn!(error = %e, "blob store over its cap"),
                }
                let mut a = lock(&s.advertised);
                if a.scanned.as_ref() != Some(&adv) {
                    a.scanned = Some(adv);
                    s.store_changed.notify_one();
                }
            }
            Ok(Err(e)) => warn!(error = %e, "cannot scan the blob store"),
            Err(e) => warn!(error = %e, "blob store scan failed"),
        }
    }
}

/// A piece of the archive stream: bytes, or a file's contents.
enum Part {
    Bytes(Bytes),
    File(PathBuf, u64),
}

fn tar_header(name: &str, size: u64) -> Result<Bytes, StoreError> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).map_err(|e| StoreError::Corrupt {
        path: name.into(),
        reason: e.to_string(),
    })?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(Bytes::copy_from_slice(h.as_bytes()))
}

fn padding(size: u64) -> Option<Part> {
    let rem = size % 512;
    (rem != 0).then(|| {
        Part::Bytes(Bytes::from(vec![
            0u8;
            usize::try_from(512 - rem).unwrap_or(0)
        ]))
    })
}

/// The legacy `docker save` layout of a stored image: `manifest.json`, `<id>.json` and
/// `<diff id>/layer.tar`, with no tags (the engine knows it by ID).
fn docker_archive(store: &BlobStore, rec: &ImageRecord) -> Result<Vec<Part>, StoreError> {
    let config_name = format!("{}.json", rec.id.to_hex());
    let layer_names: Vec<String> = rec
        .layers
        .iter()
        .map(|l| format!("{}/layer.tar", l.to_hex()))
        .collect();
    let manifest =
        serde_json::json!([{ "Config": config_name, "RepoTags": null, "Layers": layer_names }]);
    let manifest = Bytes::from(manifest.to_string());
    let mut parts = Vec::new();
    let file = |name: &str, d: &Digest, parts: &mut Vec<Part>| -> Result<(), StoreError> {
        let path = store.blob_path(d);
        let size = std::fs::metadata(&path)
            .map_err(blobs::io_err("cannot stat", &path))?
            .len();
        parts.push(Part::Bytes(tar_header(name, size)?));
        parts.push(Part::File(path, size));
        parts.extend(padding(size));
        Ok(())
    };
    file(&config_name, &rec.id, &mut parts)?;
    let mut seen = HashSet::new();
    for (name, d) in layer_names.iter().zip(&rec.layers) {
        if seen.insert(*d) {
            file(name, d, &mut parts)?;
        }
    }
    let manifest_len = manifest.len() as u64;
    parts.push(Part::Bytes(tar_header("manifest.json", manifest_len)?));
    parts.push(Part::Bytes(manifest));
    parts.extend(padding(manifest_len));
    parts.push(Part::Bytes(Bytes::from(vec![0u8; 1024])));
    Ok(parts)
}

/// The parts as a byte stream, files read 1 MiB at a time.
fn part_stream(
    parts: Vec<Part>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    type Open = Option<(tokio::fs::File, u64)>;
    futures::stream::unfold(
        (parts.into_iter(), None::<(tokio::fs::File, u64)>),
        |(mut parts, mut open): (std::vec::IntoIter<Part>, Open)| async move {
            loop {
                if let Some((file, left)) = open.as_mut().filter(|(_, left)| *left > 0) {
                    let n = usize::try_from((*left).min(1 << 20)).unwrap_or(1 << 20);
                    let mut buf = vec![0u8; n];
                    return match file.read_exact(&mut buf).await {
                        Ok(_) => {
                            *left -= n as u64;
                            Some((Ok(Bytes::from(buf)), (parts, open)))
                        }
                        Err(e) => Some((Err(e), (Vec::new().into_iter(), None))),
                    };
                }
                match parts.next()? {
                    Part::Bytes(b) => return Some((Ok(b), (parts, None))),
                    Part::File(path, size) => match tokio::fs::File::open(&path).await {
                        Ok(f) => open = Some((f, size)),
                        Err(e) => return Some((Err(e), (Vec::new().into_iter(), None))),
                    },
                }
            }
        },
    )
}
