//! Image records: `images/<id hex>.json` names the config and layers of an image in the
//! store, and the names it was known by. Lookups by id prefix or name for the CLI.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use omesh_protocol::Digest;
use serde::{Deserialize, Serialize};

use super::{
    io_err, parse_digest, read_limited, remove_if_present, write_atomic, BlobStore, StoreError,
    MAX_JSON_BYTES,
};

/// Which blobs make up an image, and the names it was known by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// The image ID: the digest of its config blob.
    pub id: Digest,
    /// `repo:tag` names from the archive, or the name a task used.
    pub names: Vec<String>,
    /// The layers (uncompressed, = the config's `rootfs.diff_ids`), bottom first.
    pub layers: Vec<Digest>,
    /// Config plus layer bytes.
    pub size: u64,
}

impl ImageRecord {
    /// The config blob, then the layers.
    pub fn blobs(&self) -> impl Iterator<Item = &Digest> {
        std::iter::once(&self.id).chain(self.layers.iter())
    }
}

/// The on-disk form of a record (hex digests, readable by people).
#[derive(Serialize, Deserialize)]
struct RecordFile {
    id: String,
    names: Vec<String>,
    layers: Vec<String>,
    size: u64,
}

impl BlobStore {
    fn record_path(&self, id: &Digest) -> PathBuf {
        self.image_dir().join(format!("{}.json", id.to_hex()))
    }

    /// Writes an image record (atomically).
    pub fn put_record(&self, rec: &ImageRecord) -> Result<(), StoreError> {
        let file = RecordFile {
            id: rec.id.to_hex(),
            names: rec.names.clone(),
            layers: rec.layers.iter().map(Digest::to_hex).collect(),
            size: rec.size,
        };
        let path = self.record_path(&rec.id);
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&self.tmp_dir(), &path, &bytes)
    }

    /// The record of image `id`, if any.
    pub fn record(&self, id: &Digest) -> Result<Option<ImageRecord>, StoreError> {
        let path = self.record_path(id);
        match read_limited(&path, MAX_JSON_BYTES) {
            Ok(bytes) => parse_record(&path, &bytes).map(Some),
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Every image record; unreadable ones are skipped with a warning.
    pub fn records(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let dir = self.image_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("cannot list", &dir))? {
            let entry = entry.map_err(io_err("cannot list", &dir))?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match read_limited(&path, MAX_JSON_BYTES).and_then(|b| parse_record(&path, &b)) {
                Ok(rec) => out.push(rec),
                Err(e) => tracing::warn!(error = %e, "skipping an image record"),
            }
        }
        out.sort_by(|a, b| a.names.cmp(&b.names).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Finds one image by full or abbreviated id (`sha256:` optional, at least 4 hex
    /// characters) or by one of its names.
    pub fn resolve(&self, query: &str) -> Result<ImageRecord, StoreError> {
        let records = self.records()?;
        let q = query.strip_prefix("sha256:").unwrap_or(query);
        let by_name: Vec<&ImageRecord> = records
            .iter()
            .filter(|r| {
                r.names.iter().any(|n| {
                    n == query
                        || n.strip_suffix(":latest") == Some(query)
                        || n.ends_with(&format!("@sha256:{q}"))
                })
            })
            .collect();
        let hits: Vec<&ImageRecord> = if by_name.is_empty() && q.len() >= 4 {
            records
                .iter()
                .filter(|r| r.id.to_hex().starts_with(q))
                .collect()
        } else {
            by_name
        };
        match hits.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(StoreError::NoImage(query.to_owned())),
            _ => Err(StoreError::Ambiguous(query.to_owned())),
        }
    }

    /// Removes an image's record and its blobs that no other image uses. Refuses an image a
    /// live task needs unless `force`.
    pub fn remove_image(&self, query: &str, force: bool) -> Result<ImageRecord, StoreError> {
        let rec = self.resolve(query)?;
        if !force && self.pinned().contains(&rec.id) {
            return Err(StoreError::Pinned(rec.id));
        }
        let path = self.record_path(&rec.id);
        // The record goes first: from then on the image is not advertised as complete.
        fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
        let others = self.records()?;
        let shared: BTreeSet<&Digest> = others.iter().flat_map(ImageRecord::blobs).collect();
        for d in rec.blobs().filter(|d| !shared.contains(d)) {
            remove_if_present(&self.blob_path(d))?;
        }
        Ok(rec)
    }
}

fn parse_record(path: &Path, bytes: &[u8]) -> Result<ImageRecord, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let f: RecordFile = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    let id = parse_digest(&f.id).ok_or_else(|| corrupt(format!("bad id {:?}", f.id)))?;
    let layers = f
        .layers
        .iter()
        .map(|l| parse_digest(l).ok_or_else(|| corrupt(format!("bad layer digest {l:?}"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ImageRecord {
        id,
        names: f.names,
        layers,
        size: f.size,
    })
}
