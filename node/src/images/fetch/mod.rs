//! Multi-source fetch of blobs and images from the peers that hold them.
//!
//! A blob is fetched in chunks of [`CHUNK_BYTES`] from every holder at once (a few requests in
//! flight per holder, faster holders take more chunks), into a partial file that survives
//! broken connections and restarts: only missing chunks are asked for. Holders that joined the
//! swarm (nodes fetching the same layer serve the chunks they have) are picked up while the
//! fetch runs. The whole blob is hashed at the end; on a mismatch, the chunks of each holder in
//! turn are fetched again from the others, and the holder whose chunks were wrong is dropped.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use omesh_protocol::blob::{BlobRequest, BlobResponse};
use omesh_protocol::{Digest, ImageRef};
use quinn::{Connection, Endpoint};
use tracing::{debug, info, warn};

use crate::images::blobs::{
    chunk_count, chunk_range, read_limited, BlobStore, ImageRecord, Partial, StoreError,
    CHUNK_BYTES, MAX_JSON_BYTES,
};
use crate::images::dataplane::{self, DataPlaneError};
use crate::metrics::BlobMetrics;

mod workers;

/// Layers fetched at once.
const LAYERS_AT_ONCE: usize = 3;
/// How long to wait for a first holder to appear (an image imported elsewhere a moment ago
/// reaches this node's view with the holder's record, republished when its images change).
const HOLDER_WAIT: Duration = Duration::from_secs(15);
/// A holder that served bad bytes is left out of fetches for this long.
const BAD_FOR: Duration = Duration::from_secs(600);

/// A node that can serve a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its peer id (the TLS handshake proves it).
    pub peer: PeerId,
    /// Its blob endpoint.
    pub addr: SocketAddr,
    /// It holds the whole image (not just chunks it is fetching itself).
    pub complete: bool,
}

/// Who holds what: the peer's view of the node records, refreshed while fetches run.
pub trait Holders: Send + Sync + 'static {
    /// The nodes (other than this one) that advertise `digest`, a blob of image `image`.
    fn holders(&self, digest: &Digest, image: &Digest) -> Vec<Holder>;
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No node advertises the blob.
    #[error("no peer holds sha256:{0}")]
    NoHolder(Digest),
    /// Every holder failed or went quiet; what was received is kept for a retry.
    #[error(
        "fetch of sha256:{digest} stopped: {reason} (received chunks are kept; a retry resumes)"
    )]
    Stopped {
        /// The blob.
        digest: Digest,
        /// The last problem seen.
        reason: String,
    },
    /// No holder's bytes match the digest.
    #[error("sha256:{0}: no holder served bytes that match the digest")]
    Mismatch(Digest),
    /// A holder claims a size the store cannot take.
    #[error("sha256:{digest} is {total} bytes, more than blob_cap_bytes = {cap}")]
    TooLarge {
        /// The blob.
        digest: Digest,
        /// Its size, as the holder says.
        total: u64,
        /// The cap.
        cap: u64,
    },
    /// The config blob is not an image config.
    #[error("config sha256:{digest} is not an image config: {reason}")]
    BadConfig {
        /// The config.
        digest: Digest,
        /// What is wrong.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How far a fetch got (shared with the API and the CLI).
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes received.
    pub done: AtomicU64,
    /// Bytes known to be needed so far (grows as blob sizes are learned).
    pub total: AtomicU64,
    /// Fetched; now being loaded into the engine.
    pub loading: std::sync::atomic::AtomicBool,
}

impl Progress {
    /// `done/total` as a short text.
    pub fn text(&self) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed).max(done);
        if self.loading.load(Ordering::Relaxed) {
            return format!("loading image into the engine ({} MiB fetched)", mib(total));
        }
        let pct = (done * 100).checked_div(total).unwrap_or(0);
        format!(
            "fetching image: {pct}% ({} of {} MiB)",
            mib(done),
            mib(total)
        )
    }
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / f64::from(1u32 << 20))
}

/// Fetches blobs and images for this node.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

struct Inner {
    store: BlobStore,
    endpoint: Endpoint,
    key: Keypair,
    holders: Arc<dyn Holders>,
    metrics: BlobMetrics,
    conns: Mutex<HashMap<PeerId, Arc<tokio::sync::Mutex<Option<Connection>>>>>,
    locks: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    bad: Mutex<HashMap<PeerId, Instant>>,
}

impl Fetcher {
    /// A fetcher dialing from `endpoint` as `key`.
    pub fn new(
        store: BlobStore,
        endpoint: Endpoint,
        key: Keypair,
        holders: Arc<dyn Holders>,
        metrics: BlobMetrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                endpoint,
                key,
                holders,
                metrics,
                conns: Mutex::default(),
                locks: Mutex::default(),
                bad: Mutex::default(),
            }),
        }
    }

    /// Fetches an image (config, then layers) unless the store holds it all; records it.
    pub async fn fetch_image(
        &self,
        image: &ImageRef,
        progress: &Arc<Progress>,
    ) -> Result<ImageRecord, FetchError> {
        let store = &self.inner.store;
        let id = image.digest;
        if let Some(rec) = store.record(&id)? {
            if rec.blobs().all(|d| store.contains(d)) {
                for d in rec.blobs() {
                    store.touch(d);
                }
                return Ok(rec);
            }
        }
        let mut keep = BTreeSet::from([id]);
        let mut size = self.fetch_blob(id, &id, &keep, progress).await?;
        let layers = config_layers(store, &id)?;
        keep.extend(layers.iter().copied());
        {
            // Built first, so the stream holds futures rather than a closure over references.
            let fetches: Vec<_> = layers
                .iter()
                .map(|d| self.fetch_blob(*d, &id, &keep, progress))
                .collect();
            let mut sizes = futures::stream::iter(fetches).buffered(LAYERS_AT_ONCE);
            while let Some(r) = sizes.next().await {
                size += r?;
            }
        }
        let mut names = store.record(&id)?.map(|r| r.names).unwrap_or_default();
        if !names.contains(&image.name) {
            names.push(image.name.clone());
        }
        let rec = ImageRecord {
            id,
            names,
            layers,
            size,
        };
        store.put_record(&rec)?;
        info!(image = %image, bytes = size, "image fetched");
        Ok(rec)
    }

    /// Fetches one blob of image `image` unless it is here; its size. `keep`: blobs eviction
    /// must not touch to make room (the rest of the same image).
    pub async fn fetch_blob(
        &self,
        digest: Digest,
        image: &Digest,
        keep: &BTreeSet<Digest>,
        progress: &Arc<Progress>,
    ) -> Result<u64, FetchError> {
        let lock = {
            let mut locks = self
                .inner
                .locks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            Arc::clone(locks.entry(digest).or_default())
        };
        let _one_at_a_time = lock.lock().await;
        let result = self.fetch_blob_locked(digest, image, keep, progress).await;
        match &result {
            Ok(_) => {
                self.inner.metrics.blobs_fetched.inc();
            }
            Err(e) => {
                self.inner.metrics.fetch_failures.inc();
                warn!(blob = %digest.short(), error = %e, "blob fetch failed");
            }
        }
        result
    }

    async fn fetch_blob_locked(
        &self,
        digest: Digest,
        image: &Digest,
        keep: &BTreeSet<Digest>,
        progress: &Arc<Progress>,
    ) -> Result<u64, FetchError> {
        let store = &self.inner.store;
        if let Ok(meta) = std::fs::metadata(store.blob_path(&digest)) {
            store.touch(&digest);
            return Ok(meta.len());
        }
        let mut banned: HashSet<PeerId> = {
            let mut bad = self
                .inner
                .bad
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            bad.retain(|_, since| since.elapsed() < BAD_FOR);
            bad.keys().copied().collect()
        };
        let (total, first, first_from) = self.probe(digest, image, &mut banned).await?;
        if total > store.cap_bytes() {
            return Err(FetchError::TooLarge {
                digest,
                total,
                cap: store.cap_bytes(),
            });
        }
        let evicted = store.make_room(total, keep)?;
        self.inner.metrics.evicted.inc_by(evicted.len() as u64);
        let partial = store.partial(&digest, total)?;
        progress.total.fetch_add(total, Ordering::Relaxed);
        progress
            .done
            .fetch_add(partial.held_bytes(), Ordering::Relaxed);
        let mut served_by: HashMap<u64, PeerId> = HashMap::new();
        if partial.missing().first() == Some(&0) {
            write_chunk(&partial, 0, first).await?;
            served_by.insert(0, first_from);
            progress
                .done
                .fetch_add(u64::from(chunk_range(total, 0).1), Ordering::Relaxed);
        }
        let result = self
            .complete(&partial, image, &mut served_by, &mut banned, progress)
            .await;
        store.forget_partial(&digest);
        result.map(|()| total)
    }

    /// Runs workers until the partial holds every chunk and verifies; repairs a mismatch.
    async fn complete(
        &self,
        partial: &Arc<Partial>,
        image: &Digest,
        served_by: &mut HashMap<u64, PeerId>,
        banned: &mut HashSet<PeerId>,
        progress: &Arc<Progress>,
    ) -> Result<(), FetchError> {
        let digest = partial.digest();
        let missing = partial.missing();
        let started = Instant::now();
        self.run(
            partial,
            image,
            in_my_order(
                missing,
                &self.inner.key.public().to_peer_id(),
                partial.total(),
            ),
            served_by,
            banned,
            &HashSet::new(),
            progress,
        )
        .await?;
        let mut sources: HashMap<String, usize> = HashMap::new();
        for p in served_by.values() {
            let id = p.to_string();
            let short = id
                .get(id.len().saturating_sub(6)..)
                .unwrap_or(&id)
                .to_owned();
            *sources.entry(short).or_default() += 1;
        }
        info!(blob = %digest, secs = started.elapsed().as_secs_f64(), chunks_by_source = ?sources, "blob received");
        match self.finish(partial).await {
            Err(FetchError::Store(StoreError::Mismatch { .. })) => {}
            other => return other,
        }
        // Some holder served wrong bytes. Fetch each contributor's chunks from the others;
        // the one whose chunks, replaced, make the digest match is the culprit. Chunks of
        // unknown origin (an earlier run's) are tried last.
        let chunks = chunk_count(partial.total());
        let mut counts: HashMap<Option<PeerId>, usize> = HashMap::new();
        for idx in 0..chunks {
            *counts.entry(served_by.get(&idx).copied()).or_default() += 1;
        }
        let mut suspects: Vec<(Option<PeerId>, usize)> = counts.into_iter().collect();
        suspects.sort_by_key(|(p, n)| (p.is_none(), std::cmp::Reverse(*n)));
        for (suspect, _) in suspects {
            let theirs: Vec<u64> = (0..chunks)
                .filter(|i| served_by.get(i).copied() == suspect)
                .collect();
            let exclude: HashSet<PeerId> = suspect.into_iter().collect();
            for i in &theirs {
                partial.unmark(*i);
            }
            warn!(blob = %digest.short(), suspect = ?suspect, chunks = theirs.len(), "digest mismatch; fetching a holder's chunks from the others");
            if let Err(e) = self
                .run(
                    partial,
                    image,
                    theirs.into(),
                    served_by,
                    banned,
                    &exclude,
                    progress,
                )
                .await
            {
                debug!(error = %e, "repair round failed");
                continue;
            }
            match self.finish(partial).await {
                Ok(()) => {
                    if let Some(bad) = suspect {
                        warn!(peer = %bad, blob = %digest.short(), "holder served bytes that do not match the digest; dropped");
                        banned.insert(bad);
                        self.mark_bad(bad);
                        self.inner.metrics.bad_holders.inc();
                    }
                    return Ok(());
                }
                Err(FetchError::Store(StoreError::Mismatch { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        partial.discard();
        Err(FetchError::Mismatch(digest))
    }

    /// Verifies and moves the blob into place, then syncs it to disk in the background.
    async fn finish(&self, partial: &Arc<Partial>) -> Result<(), FetchError> {
        let store = self.inner.store.clone();
        let p = Arc::clone(partial);
        tokio::task::spawn_blocking(move || {
            store.finish_partial(&p)?;
            let path = store.blob_path(&p.digest());
            tokio::task::spawn_blocking(move || {
                if let Err(e) = std::fs::File::open(&path).and_then(|f| f.sync_all()) {
                    warn!(blob = %path.display(), error = %e, "cannot sync a fetched blob");
                }
            });
            Ok(())
        })
        .await
        .map_err(|e| {
            FetchError::Store(StoreError::Corrupt {
                path: "blob".into(),
                reason: e.to_string(),
            })
        })?
        .map_err(FetchError::Store)
    }

    /// Asks holders for the first chunk until one answers: the blob's size and chunk 0.
    /// Waits a while for a first holder to appear.
    async fn probe(
        &self,
        digest: Digest,
        image: &Digest,
        banned: &mut HashSet<PeerId>,
    ) -> Result<(u64, Vec<u8>, PeerId), FetchError> {
        let since = Instant::now();
        let holders = loop {
            let holders: Vec<Holder> = self
                .inner
                .holders
                .holders(&digest, image)
                .into_iter()
                .filter(|h| !banned.contains(&h.peer))
                .collect();
            if !holders.is_empty() {
                break holders;
            }
            if since.elapsed() > HOLDER_WAIT {
                return Err(FetchError::NoHolder(digest));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let mut last = String::from("no holder answered");
        for h in shuffled(holders) {
            let req = BlobRequest {
                digest,
                offset: 0,
                len: u32::try_from(CHUNK_BYTES).unwrap_or(u32::MAX),
            };
            match self.ask(&h, &req).await {
                Ok(BlobResponse::Chunk {
                    offset: 0,
                    total,
                    data,
                }) if data.len() as u64 == CHUNK_BYTES.min(total) => {
                    return Ok((total, data, h.peer));
                }
                Ok(BlobResponse::Chunk { .. }) => {
                    banned.insert(h.peer);
                    self.mark_bad(h.peer);
                    last = format!("{} answered a chunk of the wrong shape", h.peer);
                }
                Ok(BlobResponse::NotFound) => last = format!("{} does not hold it", h.peer),
                Ok(BlobResponse::Refused(r)) => last = format!("{} refused: {r}", h.peer),
                Err(e) => last = format!("{}: {e}", h.peer),
            }
        }
        Err(FetchError::Stopped {
            digest,
            reason: last,
        })
    }

    fn mark_bad(&self, peer: PeerId) {
        let mut bad = self
            .inner
            .bad
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        bad.insert(peer, Instant::now());
    }

    /// One request to a holder over its (reused) connection.
    async fn ask(&self, h: &Holder, req: &BlobRequest) -> Result<BlobResponse, DataPlaneError> {
        let conn = self.connection(h).await?;
        let result = dataplane::request(&conn, req).await;
        if let Ok(BlobResponse::Chunk { data, .. }) = &result {
            // Every chunk byte that arrived, good or bad, used or wasted.
            self.inner.metrics.bytes_fetched.inc_by(data.len() as u64);
        }
        if matches!(result, Err(DataPlaneError::Connection(_))) {
            self.forget(h.peer, &conn);
        }
        result
    }

    async fn connection(&self, h: &Holder) -> Result<Connection, DataPlaneError> {
        let slot = {
            let mut conns = self
                .inner
                .conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            Arc::clone(conns.entry(h.peer).or_default())
        };
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let conn =
            dataplane::connect(&self.inner.endpoint, &self.inner.key, h.peer, h.addr).await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    fn forget(&self, peer: PeerId, conn: &Connection) {
        conn.close(0u32.into(), b"broken");
        let conns = self
            .inner
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = conns.get(&peer) {
            if let Ok(mut s) = slot.try_lock() {
                if s.as_ref()
                    .is_some_and(|c| c.stable_id() == conn.stable_id())
                {
                    *s = None;
                }
            }
        }
    }
}

async fn write_chunk(partial: &Arc<Partial>, idx: u64, data: Vec<u8>) -> Result<(), StoreError> {
    let p = Arc::clone(partial);
    tokio::task::spawn_blocking(move || p.write_chunk(idx, &data))
        .await
        .map_err(|e| StoreError::Corrupt {
            path: "partial blob".into(),
            reason: e.to_string(),
        })?
}

/// The layers an image config names (`rootfs.diff_ids`).
pub fn config_layers(store: &BlobStore, id: &Digest) -> Result<Vec<Digest>, FetchError> {
    let bad = |reason: String| FetchError::BadConfig {
        digest: *id,
        reason,
    };
    let bytes = read_limited(&store.blob_path(id), MAX_JSON_BYTES)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let ids = v
        .pointer("/rootfs/diff_ids")
        .and_then(|d| d.as_array())
        .ok_or_else(|| bad("no rootfs.diff_ids".into()))?;
    ids.iter()
        .map(|d| {
            d.as_str()
                .and_then(|s| s.strip_prefix("sha256:"))
                .and_then(|h| h.parse().ok())
                .ok_or_else(|| bad(format!("{d} is not a sha256 digest")))
        })
        .collect()
}

/// Where `peer` starts fetching a blob of `total` bytes on its own: a chunk derived from its
/// id, so that nodes fetching the same blob hold different chunks early on. (The running hash
/// waits for the wrap-around, so part of it is done at the end.)
fn region_start(peer: &PeerId, total: u64) -> u64 {
    let h = Digest::of(&peer.to_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.0[..8]);
    u64::from_le_bytes(first) % chunk_count(total).max(1)
}

/// The missing chunks in this node's order: from its region start on, wrapping around.
fn in_my_order(missing: Vec<u64>, me: &PeerId, total: u64) -> VecDeque<u64> {
    let start = region_start(me, total);
    let mut q: VecDeque<u64> = missing.into();
    let at = q.iter().position(|i| *i >= start).unwrap_or(0);
    q.rotate_left(at);
    q
}

fn shuffled(mut v: Vec<Holder>) -> Vec<Holder> {
    use rand::seq::SliceRandom;
    v.shuffle(&mut rand::thread_rng());
    v
}
