//! The content-addressed blob store in a peer's data directory, OCI-style:
//! `blobs/sha256/<hex>` holds verified blobs (image configs and uncompressed layers),
//! `images/<hex>.json` records which blobs make up an image, `blobs/partial/` keeps the chunks
//! of blobs being fetched so that a fetch resumes where it broke off.
//!
//! Every write is a temp file renamed into place, so the CLI (`omesh image import|rm`) may work
//! on the directory while the peer runs; the peer rescans it every second. The store has a cap
//! (`blob_cap_bytes`); room is made by evicting least-recently-used blobs (file mtime) that no
//! live task's image needs (the peer writes those image ids to `blobs/pinned`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use omesh_protocol::blob::MAX_CHUNK_BYTES;
use omesh_protocol::Digest;
use sha2::Digest as _;

mod partial;
mod records;

pub use partial::{chunk_count, chunk_range, Partial};
pub use records::ImageRecord;

/// The size of a fetch chunk; partial blobs are tracked in chunks of this size.
pub const CHUNK_BYTES: u64 = MAX_CHUNK_BYTES as u64;
/// The default of `blob_cap_bytes`: 10 GiB.
pub const DEFAULT_CAP_BYTES: u64 = 10 << 30;
/// Image records and configs are small; anything larger is refused rather than read.
pub const MAX_JSON_BYTES: u64 = 16 << 20;

/// Why the store could not do something. Unless a variant says otherwise, nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not enough room under the cap, even after evicting every blob no live task needs.
    #[error(
        "blob store full: {need} more bytes needed but only {free} can be freed under \
         blob_cap_bytes = {cap} (the rest belongs to images that live tasks need); nothing was changed"
    )]
    Full {
        /// Bytes to be added.
        need: u64,
        /// Bytes that eviction could free plus what is free already.
        free: u64,
        /// The cap.
        cap: u64,
    },
    /// A file holds something else than expected.
    #[error("{path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No image matches.
    #[error("no image {0:?} in the blob store")]
    NoImage(String),
    /// Several images match.
    #[error("{0:?} names more than one image; give more of the id")]
    Ambiguous(String),
    /// The image is needed by a live task.
    #[error("image sha256:{0} is needed by a live task; pass --force to remove it anyway")]
    Pinned(Digest),
    /// Bytes written under a digest hash to another one; the bytes were dropped.
    #[error("digest mismatch: expected sha256:{expected}, the bytes hash to sha256:{actual}")]
    Mismatch {
        /// The digest the bytes were to have.
        expected: Digest,
        /// What they hash to.
        actual: Digest,
    },
}

pub(crate) fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

pub(crate) fn parse_digest(s: &str) -> Option<Digest> {
    s.strip_prefix("sha256:").unwrap_or(s).parse().ok()
}

/// One blob on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    /// Its size.
    pub size: u64,
    /// Last use (the file's mtime).
    pub used: SystemTime,
}

/// What the store holds right now.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Complete, verified blobs.
    pub blobs: BTreeMap<Digest, BlobInfo>,
    /// Image records.
    pub images: Vec<ImageRecord>,
    /// Partial blobs no fetch has touched for [`ABANDONED_AFTER`]: bytes on disk (both files)
    /// and last write. A retry would resume them; they go first when room is needed.
    pub abandoned: BTreeMap<Digest, BlobInfo>,
}

/// A partial blob whose files have not been written for this long, and that no fetch of this
/// process has open, counts against the cap and may be evicted. (A fetch appends to the chunk
/// log with every chunk; the CLI, a process of its own, sees the peer's fetches only so.)
pub const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

impl Scan {
    /// Bytes of all blobs, and of abandoned partial ones.
    pub fn total_bytes(&self) -> u64 {
        self.blobs
            .values()
            .chain(self.abandoned.values())
            .map(|b| b.size)
            .sum()
    }

    /// Whether every blob of `rec` is present.
    pub fn complete(&self, rec: &ImageRecord) -> bool {
        rec.blobs().all(|d| self.blobs.contains_key(d))
    }

    /// What this node tells the mesh it can serve: config and layers of every complete image,
    /// and `partial` (layers being fetched, served chunk by chunk). Configs of incomplete
    /// images are left out, so placement's image bonus only goes to nodes that hold it all.
    pub fn advertised(&self, partial: &[Digest], limit: usize) -> BTreeSet<Digest> {
        let mut out = BTreeSet::new();
        for rec in self.images.iter().filter(|r| self.complete(r)) {
            out.insert(rec.id);
        }
        for rec in self.images.iter().filter(|r| self.complete(r)) {
            out.extend(rec.layers.iter().copied());
        }
        out.extend(partial.iter().copied());
        // Configs first: the record has a limit, and configs are what placement looks at.
        while out.len() > limit {
            let Some(last) = out.iter().rev().find(|d| !self.is_config(d)).copied() else {
                break;
            };
            out.remove(&last);
        }
        out
    }

    fn is_config(&self, d: &Digest) -> bool {
        self.images.iter().any(|r| &r.id == d)
    }
}

/// The blob store of one data directory. Cheap to clone; clones share the registry of blobs
/// being fetched.
#[derive(Debug, Clone)]
pub struct BlobStore {
    data: PathBuf,
    cap_bytes: u64,
    partials: Arc<Mutex<HashMap<Digest, Arc<Partial>>>>,
    changed: Arc<tokio::sync::Notify>,
}

impl BlobStore {
    /// Opens (creating if needed) the store under the data directory `data_dir`.
    pub fn open(data_dir: &Path, cap_bytes: u64) -> Result<Self, StoreError> {
        let store = Self {
            data: data_dir.to_owned(),
            cap_bytes,
            partials: Arc::default(),
            changed: Arc::default(),
        };
        for dir in [
            store.blob_dir(),
            store.partial_dir(),
            store.tmp_dir(),
            store.image_dir(),
        ] {
            fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        }
        Ok(store)
    }

    /// The cap in bytes.
    pub fn cap_bytes(&self) -> u64 {
        self.cap_bytes
    }

    fn blob_dir(&self) -> PathBuf {
        self.data.join("blobs").join("sha256")
    }

    pub(crate) fn partial_dir(&self) -> PathBuf {
        self.data.join("blobs").join("partial")
    }

    /// Where temp files live (same file system as the blobs, so renames are atomic).
    pub fn tmp_dir(&self) -> PathBuf {
        self.data.join("blobs").join("tmp")
    }

    pub(crate) fn image_dir(&self) -> PathBuf {
        self.data.join("images")
    }

    fn pinned_path(&self) -> PathBuf {
        self.data.join("blobs").join("pinned")
    }

    /// The file of a complete blob.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blob_dir().join(d.to_hex())
    }

    /// Whether the complete blob is here.
    pub fn contains(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Starts writing a blob; see [`Staging`].
    pub fn stage(&self) -> Result<Staging, StoreError> {
        let dir = self.tmp_dir();
        let file = tempfile::NamedTempFile::new_in(&dir)
            .map_err(io_err("cannot create a file in", &dir))?;
        Ok(Staging {
            file,
            hasher: sha2::Sha256::new(),
            size: 0,
        })
    }

    /// Moves a staged blob into place (a no-op if it is there already) and marks it used.
    pub fn commit(&self, staged: Staged) -> Result<(), StoreError> {
        let path = self.blob_path(&staged.digest);
        if path.is_file() {
            self.touch(&staged.digest);
            return Ok(());
        }
        staged.file.persist(&path).map_err(|e| StoreError::Io {
            what: "cannot move a blob to",
            path: path.clone(),
            source: e.error,
        })?;
        Ok(())
    }

    /// Marks a blob used now (LRU order). Best effort.
    pub fn touch(&self, d: &Digest) {
        let path = self.blob_path(d);
        if let Ok(f) = File::options().write(true).open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Lists blobs and records.
    pub fn scan(&self) -> Result<Scan, StoreError> {
        let dir = self.blob_dir();
        let mut blobs = BTreeMap::new();
        for entry in fs::read_dir(&dir).map_err(io_err("cannot list", &dir))? {
            let entry = entry.map_err(io_err("cannot list", &dir))?;
            let Some(d) = entry.file_name().to_str().and_then(parse_digest) else {
                continue;
            };
            // A blob removed between listing and stat is simply gone.
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_file() {
                blobs.insert(
                    d,
                    BlobInfo {
                        size: meta.len(),
                        used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    },
                );
            }
        }
        Ok(Scan {
            blobs,
            images: self.records()?,
            abandoned: self.abandoned_partials(),
        })
    }

    /// Partial blobs left by fetches that stopped (see [`ABANDONED_AFTER`]).
    fn abandoned_partials(&self) -> BTreeMap<Digest, BlobInfo> {
        use std::os::unix::fs::MetadataExt;
        let dir = self.partial_dir();
        let active: HashSet<Digest> = self.partial_digests().into_iter().collect();
        let mut out = BTreeMap::new();
        let Ok(entries) = fs::read_dir(&dir) else {
            return out;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let Some(d) = entry.file_name().to_str().and_then(parse_digest) else {
                continue;
            };
            if active.contains(&d) {
                continue;
            }
            let log = dir.join(format!("{}.chunks", d.to_hex()));
            let metas = [entry.metadata().ok(), fs::metadata(&log).ok()];
            let metas: Vec<&fs::Metadata> = metas.iter().flatten().collect();
            // Bytes really on disk: the data file is sparse until filled.
            let size = metas.iter().map(|m| m.blocks().saturating_mul(512)).sum();
            let used = metas
                .iter()
                .filter_map(|m| m.modified().ok())
                .max()
                .unwrap_or(SystemTime::UNIX_EPOCH);
            if now.duration_since(used).unwrap_or_default() >= ABANDONED_AFTER {
                out.insert(d, BlobInfo { size, used });
            }
        }
        out
    }

    /// Removes an abandoned partial blob's files, unless a fetch opened it meanwhile.
    fn remove_abandoned(&self, d: &Digest) -> Result<(), StoreError> {
        let reg = self
            .partials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if reg.contains_key(d) {
            return Ok(());
        }
        let dir = self.partial_dir();
        remove_if_present(&dir.join(d.to_hex()))?;
        remove_if_present(&dir.join(format!("{}.chunks", d.to_hex())))?;
        Ok(())
    }

    /// Records which images live tasks need, so that neither eviction here nor `image rm`
    /// from the CLI removes them. Writes only on change.
    pub fn set_pinned(&self, ids: &BTreeSet<Digest>) -> Result<(), StoreError> {
        if self.pinned() == *ids {
            return Ok(());
        }
        let text: String = ids.iter().map(|d| format!("{}\n", d.to_hex())).collect();
        write_atomic(&self.tmp_dir(), &self.pinned_path(), text.as_bytes())
    }

    /// The images live tasks need, as last written by the peer.
    pub fn pinned(&self) -> BTreeSet<Digest> {
        fs::read_to_string(self.pinned_path())
            .unwrap_or_default()
            .lines()
            .filter_map(parse_digest)
            .collect()
    }

    /// Makes room for `need` more bytes under the cap by evicting least-recently-used blobs
    /// that no pinned image (and none of `keep`) needs. Either enough room is made, or
    /// nothing is removed and [`StoreError::Full`] says why. Returns the evicted digests.
    pub fn make_room(&self, need: u64, keep: &BTreeSet<Digest>) -> Result<Vec<Digest>, StoreError> {
        let scan = self.scan()?;
        let total = scan.total_bytes();
        if total.saturating_add(need) <= self.cap_bytes {
            return Ok(Vec::new());
        }
        let pinned = self.pinned();
        let protected: BTreeSet<&Digest> = scan
            .images
            .iter()
            .filter(|r| pinned.contains(&r.id))
            .flat_map(ImageRecord::blobs)
            .chain(keep.iter())
            .collect();
        // Abandoned partial blobs first (oldest first), then complete blobs least recently
        // used first.
        let mut abandoned: Vec<(&Digest, &BlobInfo)> = scan.abandoned.iter().collect();
        abandoned.sort_by_key(|(d, b)| (b.used, **d));
        let mut candidates: Vec<(&Digest, &BlobInfo)> = scan
            .blobs
            .iter()
            .filter(|(d, _)| !protected.contains(d))
            .collect();
        candidates.sort_by_key(|(d, b)| (b.used, **d));
        let mut plan = Vec::new();
        let mut partial_plan = Vec::new();
        let mut after = total;
        for (is_partial, (d, b)) in abandoned
            .into_iter()
            .map(|c| (true, c))
            .chain(candidates.into_iter().map(|c| (false, c)))
        {
            if after.saturating_add(need) <= self.cap_bytes {
                break;
            }
            if is_partial {
                partial_plan.push(*d);
            } else {
                plan.push(*d);
            }
            after = after.saturating_sub(b.size);
        }
        if after.saturating_add(need) > self.cap_bytes {
            return Err(StoreError::Full {
                need,
                free: self.cap_bytes.saturating_sub(after),
                cap: self.cap_bytes,
            });
        }
        for d in &partial_plan {
            self.remove_abandoned(d)?;
        }
        for d in &plan {
            remove_if_present(&self.blob_path(d))?;
        }
        partial_plan.extend(plan);
        Ok(partial_plan)
    }

    /// Opens (or resumes) the partial file of a blob of `total` bytes being fetched, and
    /// registers it so that the server can serve the chunks it has.
    pub fn partial(&self, d: &Digest, total: u64) -> Result<Arc<Partial>, StoreError> {
        let mut reg = self
            .partials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = reg.get(d).filter(|p| p.total() == total) {
            return Ok(Arc::clone(p));
        }
        let p = Arc::new(Partial::open(&self.partial_dir(), *d, total)?);
        reg.insert(*d, Arc::clone(&p));
        // Others fetching the same blob should learn soon that this node serves chunks of it.
        self.changed.notify_one();
        Ok(p)
    }

    /// Verifies a complete partial blob and moves it into place; on a mismatch the partial
    /// stays (the caller repairs it).
    pub fn finish_partial(&self, p: &Partial) -> Result<(), StoreError> {
        p.verify()?;
        let dest = self.blob_path(&p.digest());
        p.move_to(&dest)?;
        self.forget_partial(&p.digest());
        Ok(())
    }

    /// Resolves when a fetch started here (rescan early rather than at the next tick).
    pub async fn fetch_started(&self) {
        self.changed.notified().await;
    }

    /// Drops a partial from the registry (its files stay for a later resume).
    pub fn forget_partial(&self, d: &Digest) {
        let mut reg = self
            .partials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        reg.remove(d);
    }

    /// Blobs being fetched right now that are worth serving in part (more than one chunk;
    /// configs never are, so a node is not taken for an image holder while it fetches one).
    pub fn partial_digests(&self) -> Vec<Digest> {
        let reg = self
            .partials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        reg.iter()
            .filter(|(_, p)| p.total() > CHUNK_BYTES)
            .map(|(d, _)| *d)
            .collect()
    }

    /// Bytes `[offset, offset + len)` of a blob and its total size, from the complete blob
    /// or from the chunks of a partial one. `None` if this store cannot serve them.
    /// The bytes come after `headroom` zero bytes (room for a frame header, so that the
    /// answer goes out without another copy).
    pub fn read_range(
        &self,
        d: &Digest,
        offset: u64,
        len: u32,
        headroom: usize,
    ) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let path = self.blob_path(d);
        match File::open(&path) {
            Ok(mut f) => {
                let total = f.metadata().map_err(io_err("cannot stat", &path))?.len();
                if offset > total {
                    return Ok(None);
                }
                let len = u64::from(len).min(total - offset);
                let mut buf = Vec::with_capacity(headroom + usize::try_from(len).unwrap_or(0));
                buf.resize(headroom, 0);
                f.seek(SeekFrom::Start(offset))
                    .map_err(io_err("cannot read", &path))?;
                // Read into spare capacity: no zeroing of a buffer about to be overwritten.
                let n = (&mut f)
                    .take(len)
                    .read_to_end(&mut buf)
                    .map_err(io_err("cannot read", &path))?;
                if n as u64 != len {
                    return Err(StoreError::Corrupt {
                        path,
                        reason: format!("shorter than its {total} bytes"),
                    });
                }
                Ok(Some((buf, total)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let partial = {
                    let reg = self
                        .partials
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    reg.get(d).cloned()
                };
                match partial {
                    Some(p) => p.read_present(offset, len, headroom),
                    None => Ok(None),
                }
            }
            Err(e) => Err(io_err("cannot open", &path)(e)),
        }
    }
}

/// A blob being written: bytes go to a temp file and through sha256.
pub struct Staging {
    file: tempfile::NamedTempFile,
    hasher: sha2::Sha256,
    size: u64,
}

impl Write for Staging {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        if let Some(written) = buf.get(..n) {
            self.hasher.update(written);
        }
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Staging {
    /// Bytes so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Ends the blob: its digest, checked against `expected` if given.
    pub fn finish(mut self, expected: Option<&Digest>) -> Result<Staged, StoreError> {
        let path = self.file.path().to_owned();
        self.file.flush().map_err(io_err("cannot write", &path))?;
        let digest = Digest(self.hasher.finalize().into());
        if let Some(e) = expected.filter(|e| **e != digest) {
            return Err(StoreError::Mismatch {
                expected: *e,
                actual: digest,
            });
        }
        Ok(Staged {
            file: self.file,
            digest,
            size: self.size,
        })
    }
}

/// A verified blob waiting in a temp file for [`BlobStore::commit`]; dropped, it is deleted.
#[derive(Debug)]
pub struct Staged {
    file: tempfile::NamedTempFile,
    /// Its digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
}

impl Staged {
    /// The bytes, read back (for small blobs such as configs).
    pub fn read_small(&self) -> Result<Vec<u8>, StoreError> {
        read_limited(self.file.path(), MAX_JSON_BYTES)
    }
}

pub(crate) fn read_at(f: &File, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let len = usize::try_from(len).map_err(|_| std::io::Error::other("range too large"))?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Reads a whole file of at most `limit` bytes.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, StoreError> {
    let f = File::open(path).map_err(io_err("cannot open", path))?;
    let mut out = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(io_err("cannot read", path))?;
    if out.len() as u64 > limit {
        return Err(StoreError::Corrupt {
            path: path.to_owned(),
            reason: format!("larger than {limit} bytes"),
        });
    }
    Ok(out)
}

pub(crate) fn write_atomic(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut tmp = tempfile::NamedTempFile::new_in(tmp_dir)
        .map_err(io_err("cannot create a file in", tmp_dir))?;
    tmp.write_all(bytes).map_err(io_err("cannot write", path))?;
    tmp.persist(path).map_err(|e| StoreError::Io {
        what: "cannot replace",
        path: path.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

pub(crate) fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("cannot remove", path)(e)),
    }
}

#[cfg(test)]
mod tests;
