//! A blob being fetched: a file of the blob's full size in `blobs/partial/<hex>`, and a log
//! `<hex>.chunks` of which chunks it holds ("total N" first, then one chunk index a line), so a
//! fetch that broke off, or a peer that restarted, asks only for what is missing. Chunks are
//! [`CHUNK_BYTES`] long (the last one shorter). Nothing here is trusted until [`Partial::verify`]
//! has hashed the whole file. The hash is kept up as chunks arrive in order (most of it is done
//! by the time the last chunk lands); a chunk fetched again invalidates it and the whole file
//! is hashed once more.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use omesh_protocol::Digest;
use sha2::Digest as _;

use crate::images::blobs::{io_err, read_at, StoreError, CHUNK_BYTES};

/// A partially fetched blob.
#[derive(Debug)]
pub struct Partial {
    digest: Digest,
    total: u64,
    data_path: PathBuf,
    log_path: PathBuf,
    file: File,
    state: Mutex<State>,
    hashing: Mutex<Hashing>,
}

#[derive(Debug)]
struct State {
    have: Vec<bool>,
    log: File,
}

/// The sha256 of the chunks before `next`, all held and not rewritten since.
#[derive(Debug)]
struct Hashing {
    next: u64,
    hasher: sha2::Sha256,
    valid: bool,
}

/// Number of chunks of a blob of `total` bytes.
pub fn chunk_count(total: u64) -> u64 {
    total.div_ceil(CHUNK_BYTES)
}

/// Offset and length of chunk `idx` of a blob of `total` bytes.
pub fn chunk_range(total: u64, idx: u64) -> (u64, u32) {
    let offset = idx * CHUNK_BYTES;
    let len = CHUNK_BYTES.min(total.saturating_sub(offset));
    (offset, u32::try_from(len).unwrap_or(0))
}

impl Partial {
    /// Opens the partial files of `digest`, resuming what they hold if they were started for
    /// the same size, else starting afresh.
    pub(crate) fn open(dir: &Path, digest: Digest, total: u64) -> Result<Self, StoreError> {
        let data_path = dir.join(digest.to_hex());
        let log_path = dir.join(format!("{}.chunks", digest.to_hex()));
        let n = usize::try_from(chunk_count(total)).map_err(|_| StoreError::Corrupt {
            path: data_path.clone(),
            reason: format!("a blob of {total} bytes is too large"),
        })?;
        let mut have = vec![false; n];
        let previous = fs::read_to_string(&log_path).unwrap_or_default();
        let mut lines = previous.lines();
        let same_size = lines.next() == Some(format!("total {total}").as_str());
        if same_size {
            for idx in lines.filter_map(|l| l.trim().parse::<usize>().ok()) {
                if let Some(h) = have.get_mut(idx) {
                    *h = true;
                }
            }
        }
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!same_size)
            .open(&data_path)
            .map_err(io_err("cannot open", &data_path))?;
        let len = file
            .metadata()
            .map_err(io_err("cannot stat", &data_path))?
            .len();
        if len != total {
            file.set_len(total)
                .map_err(io_err("cannot size", &data_path))?;
        }
        let log = if same_size {
            File::options().append(true).open(&log_path)
        } else {
            have.fill(false);
            File::create(&log_path).and_then(|mut f| {
                writeln!(f, "total {total}")?;
                Ok(f)
            })
        }
        .map_err(io_err("cannot write", &log_path))?;
        Ok(Self {
            digest,
            total,
            data_path,
            log_path,
            file,
            state: Mutex::new(State { have, log }),
            hashing: Mutex::new(Hashing {
                next: 0,
                hasher: sha2::Sha256::new(),
                valid: true,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The blob's digest.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// The blob's size.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Chunks not held yet, in order.
    pub fn missing(&self) -> Vec<u64> {
        let st = self.state();
        (0u64..)
            .zip(st.have.iter())
            .filter(|(_, h)| !**h)
            .map(|(i, _)| i)
            .collect()
    }

    /// Bytes held.
    pub fn held_bytes(&self) -> u64 {
        let st = self.state();
        (0u64..)
            .zip(st.have.iter())
            .filter(|(_, h)| **h)
            .map(|(i, _)| u64::from(chunk_range(self.total, i).1))
            .sum()
    }

    /// Stores chunk `idx` (its length must be the chunk's) and logs it as held.
    pub fn write_chunk(&self, idx: u64, data: &[u8]) -> Result<(), StoreError> {
        let (offset, len) = chunk_range(self.total, idx);
        if data.len() as u64 != u64::from(len) || len == 0 {
            return Err(StoreError::Corrupt {
                path: self.data_path.clone(),
                reason: format!("chunk {idx} of {} bytes, expected {len}", data.len()),
            });
        }
        self.file
            .write_all_at(data, offset)
            .map_err(io_err("cannot write", &self.data_path))?;
        let mut st = self.state();
        let i = usize::try_from(idx).unwrap_or(usize::MAX);
        if let Some(h) = st.have.get_mut(i) {
            *h = true;
        }
        writeln!(st.log, "{idx}").map_err(io_err("cannot write", &self.log_path))?;
        drop(st);
        // Best effort: if another writer is hashing, it or a later one gets this chunk.
        if let Ok(mut h) = self.hashing.try_lock() {
            self.advance(&mut h, Some((idx, data)))?;
        }
        Ok(())
    }

    fn has(&self, idx: u64) -> bool {
        let st = self.state();
        st.have
            .get(usize::try_from(idx).unwrap_or(usize::MAX))
            .copied()
            .unwrap_or(false)
    }

    /// Hashes held chunks from `h.next` on, while they follow each other; `just` is a chunk
    /// at hand (saves reading it back).
    fn advance(&self, h: &mut Hashing, just: Option<(u64, &[u8])>) -> Result<(), StoreError> {
        while h.valid && h.next < chunk_count(self.total) && self.has(h.next) {
            match just {
                Some((idx, data)) if idx == h.next => h.hasher.update(data),
                _ => {
                    let (offset, len) = chunk_range(self.total, h.next);
                    let buf = read_at(&self.file, offset, u64::from(len))
                        .map_err(io_err("cannot read", &self.data_path))?;
                    h.hasher.update(&buf);
                }
            }
            h.next += 1;
        }
        Ok(())
    }

    /// Forgets chunk `idx` (to fetch it again from someone else).
    pub fn unmark(&self, idx: u64) {
        let mut st = self.state();
        if let Some(h) = st.have.get_mut(usize::try_from(idx).unwrap_or(usize::MAX)) {
            *h = false;
        }
        drop(st);
        let mut h = self.hashing.lock().unwrap_or_else(PoisonError::into_inner);
        if idx < h.next {
            h.valid = false;
        }
    }

    /// Bytes `[offset, offset + len)`, after `headroom` zero bytes, if every chunk they
    /// touch is held.
    pub fn read_present(
        &self,
        offset: u64,
        len: u32,
        headroom: usize,
    ) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        if offset >= self.total {
            return Ok(None);
        }
        let len = u64::from(len).min(self.total - offset);
        let first = offset / CHUNK_BYTES;
        let last = (offset + len).saturating_sub(1) / CHUNK_BYTES;
        let held = {
            let st = self.state();
            (first..=last).all(|i| {
                st.have
                    .get(usize::try_from(i).unwrap_or(usize::MAX))
                    .copied()
                    .unwrap_or(false)
            })
        };
        if !held {
            return Ok(None);
        }
        let mut buf = vec![0u8; headroom + usize::try_from(len).unwrap_or(0)];
        if let Some(tail) = buf.get_mut(headroom..) {
            self.file
                .read_exact_at(tail, offset)
                .map_err(io_err("cannot read", &self.data_path))?;
        }
        Ok(Some((buf, self.total)))
    }

    /// Hashes the file; [`StoreError::Mismatch`] if it is not the blob.
    pub fn verify(&self) -> Result<(), StoreError> {
        let mut h = self.hashing.lock().unwrap_or_else(PoisonError::into_inner);
        if !h.valid {
            *h = Hashing {
                next: 0,
                hasher: sha2::Sha256::new(),
                valid: true,
            };
        }
        self.advance(&mut h, None)?;
        let hasher = std::mem::take(&mut h.hasher);
        // Whatever the outcome, the next verify starts over.
        *h = Hashing {
            next: 0,
            hasher: sha2::Sha256::new(),
            valid: true,
        };
        let actual = Digest(hasher.finalize().into());
        if actual == self.digest {
            Ok(())
        } else {
            Err(StoreError::Mismatch {
                expected: self.digest,
                actual,
            })
        }
    }

    /// Moves the (verified) data into place and removes the log. Not synced here: the
    /// fetcher syncs it in the background, off the path of the task waiting for it.
    pub(crate) fn move_to(&self, dest: &Path) -> Result<(), StoreError> {
        fs::rename(&self.data_path, dest).map_err(io_err("cannot move a blob to", dest))?;
        let _ = fs::remove_file(&self.log_path);
        Ok(())
    }

    /// Removes both files (a fetch that cannot be repaired starts over next time).
    pub fn discard(&self) {
        let _ = fs::remove_file(&self.log_path);
        let _ = fs::remove_file(&self.data_path);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn chunks_survive_a_reopen_and_only_the_rest_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let blob: Vec<u8> = (0..(2 * CHUNK_BYTES + 10))
            .map(|i| (i % 251) as u8)
            .collect();
        let d = Digest::of(&blob);
        let total = blob.len() as u64;
        let p = Partial::open(dir.path(), d, total).unwrap();
        assert_eq!(p.missing(), vec![0, 1, 2]);
        let (o, l) = chunk_range(total, 2);
        p.write_chunk(2, &blob[o as usize..o as usize + l as usize])
            .unwrap();
        assert!(p.write_chunk(0, b"short").is_err());
        assert!(p.read_present(0, 10, 0).unwrap().is_none());
        assert_eq!(
            p.read_present(o, 10, 2).unwrap().unwrap().0[2..],
            blob[o as usize..o as usize + 10]
        );
        drop(p);
        let p = Partial::open(dir.path(), d, total).unwrap();
        assert_eq!(p.missing(), vec![0, 1]);
        for i in [0, 1] {
            let (o, l) = chunk_range(total, i);
            p.write_chunk(i, &blob[o as usize..o as usize + l as usize])
                .unwrap();
        }
        p.verify().unwrap();
        // Another size means another blob: start over.
        drop(p);
        let p = Partial::open(dir.path(), d, total + 1).unwrap();
        assert_eq!(p.missing().len(), 3);
    }

    #[test]
    fn the_running_hash_survives_out_of_order_chunks_and_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let blob: Vec<u8> = (0..(3 * CHUNK_BYTES - 5))
            .map(|i| (i % 241) as u8)
            .collect();
        let total = blob.len() as u64;
        let chunk = |i: u64| {
            let (o, l) = chunk_range(total, i);
            blob[o as usize..o as usize + l as usize].to_vec()
        };
        let p = Partial::open(dir.path(), Digest::of(&blob), total).unwrap();
        for i in [1, 0, 2] {
            p.write_chunk(i, &chunk(i)).unwrap();
        }
        p.verify().unwrap();
        p.unmark(1);
        let mut bad = chunk(1);
        bad[3] ^= 1;
        p.write_chunk(1, &bad).unwrap();
        assert!(matches!(p.verify(), Err(StoreError::Mismatch { .. })));
        p.unmark(1);
        p.write_chunk(1, &chunk(1)).unwrap();
        p.verify().unwrap();
    }

    #[test]
    fn a_wrong_byte_fails_verification() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::of(b"abc");
        let p = Partial::open(dir.path(), d, 3).unwrap();
        p.write_chunk(0, b"abd").unwrap();
        assert!(matches!(p.verify(), Err(StoreError::Mismatch { .. })));
    }
}
