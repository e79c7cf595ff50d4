//! `omesh image import`: a `docker save` archive into the blob store.
//!
//! Two layouts are read: the legacy one (`manifest.json`, `<id>.json`, `<layer>/layer.tar`;
//! Docker up to 24) and the OCI one (`index.json`, `blobs/sha256/...`; Docker 25 writes both).
//! An image is its config blob (whose sha256 is the image ID a task pins) and its layers, stored
//! uncompressed: each layer's sha256 must be the config's `rootfs.diff_ids` entry. Everything is
//! staged and checked first; only a fully valid archive changes the store.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use omesh_protocol::Digest;

use crate::images::blobs::{BlobStore, ImageRecord, Staged, StoreError};

mod layouts;

use layouts::{check, digest_of, legacy_images, normalize, oci_images, Config, Files, Found};

/// Why an archive could not be imported. The store is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The archive file cannot be read.
    #[error("cannot read archive {path}: {source}")]
    Open {
        /// The archive.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The tar stream ends early or is not a tar stream.
    #[error("archive {path} is truncated or not a tar archive: {reason}; nothing was imported")]
    Truncated {
        /// The archive.
        path: PathBuf,
        /// What was found.
        reason: String,
    },
    /// Neither layout's index file is there.
    #[error("archive has neither manifest.json nor index.json: not a `docker save` archive; nothing was imported")]
    NoManifest,
    /// A metadata file does not parse.
    #[error("{file} in the archive is not valid: {reason}; nothing was imported")]
    BadJson {
        /// The file in the archive.
        file: String,
        /// What the parser said.
        reason: String,
    },
    /// The manifest names a file the archive lacks.
    #[error(
        "the manifest names {what} {file:?}, which is not in the archive; nothing was imported"
    )]
    Missing {
        /// `config`, `layer` or `manifest`.
        what: &'static str,
        /// Its path in the archive.
        file: String,
    },
    /// A file's bytes hash to another digest than the one it is known by.
    #[error("digest mismatch: {what} {file:?} hashes to sha256:{actual}, but {source_of_truth} says sha256:{expected}; nothing was imported")]
    Mismatch {
        /// `config`, `layer` or `blob`.
        what: &'static str,
        /// Its path in the archive.
        file: String,
        /// The digest it should have.
        expected: Digest,
        /// What its bytes hash to.
        actual: Digest,
        /// Where `expected` comes from.
        source_of_truth: &'static str,
    },
    /// The config and the manifest disagree on the number of layers.
    #[error("config {file:?} lists {in_config} layers (rootfs.diff_ids) but the manifest gives {in_manifest}; nothing was imported")]
    LayerCount {
        /// The config's path.
        file: String,
        /// Layers in `rootfs.diff_ids`.
        in_config: usize,
        /// Layers in the manifest.
        in_manifest: usize,
    },
    /// A layer is compressed.
    #[error("layer {file:?} is {media_type}: only uncompressed layers can be imported (use `docker save` from Docker, which writes them uncompressed); nothing was imported")]
    Compressed {
        /// Its path.
        file: String,
        /// Its media type.
        media_type: String,
    },
    /// The archive holds no image.
    #[error("the archive holds no image; nothing was imported")]
    Empty,
    /// The Docker engine could not export the image.
    #[error("Docker engine: {0}; nothing was imported")]
    Engine(String),
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One image the import added or refreshed.
#[derive(Debug, Clone)]
pub struct Imported {
    /// Its record.
    pub record: ImageRecord,
    /// Bytes that were not in the store before.
    pub new_bytes: u64,
}

impl Imported {
    /// The reference a task pins: `name@sha256:<id>` (`image` when it has no name).
    pub fn reference(&self) -> String {
        let name = self
            .record
            .names
            .first()
            .map(|n| repo_of(n).to_owned())
            .unwrap_or_else(|| "image".to_owned());
        format!("{name}@sha256:{}", self.record.id)
    }
}

/// The repository part of `repo:tag` (a `:` in a registry's host:port is kept).
pub fn repo_of(name: &str) -> &str {
    let name = name.split('@').next().unwrap_or(name);
    match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => name,
    }
}

/// Imports every image of the archive at `path`.
pub fn import_archive(store: &BlobStore, path: &Path) -> Result<Vec<Imported>, ImportError> {
    let files = read_archive(store, path)?;
    let found = if files.get("manifest.json").is_some() {
        legacy_images(&files)?
    } else if files.get("index.json").is_some() {
        oci_images(&files)?
    } else {
        return Err(ImportError::NoManifest);
    };
    if found.is_empty() {
        return Err(ImportError::Empty);
    }
    commit(store, files, found)
}

/// Exports `name` from the local Docker engine (what `docker save NAME` writes) into a temp
/// file of the store, and imports that.
pub async fn import_from_docker(
    store: &BlobStore,
    docker: &bollard::Docker,
    name: &str,
) -> Result<Vec<Imported>, ImportError> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let dir = store.tmp_dir();
    let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|source| ImportError::Open {
        path: dir.clone(),
        source,
    })?;
    let path = tmp.path().to_owned();
    let io = |source| ImportError::Open {
        path: path.clone(),
        source,
    };
    let mut file = tokio::fs::File::from_std(tmp.reopen().map_err(io)?);
    let mut export = docker.export_image(name);
    while let Some(chunk) = export.next().await {
        let chunk = chunk.map_err(|e| ImportError::Engine(format!("export of {name:?}: {e}")))?;
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    drop(file);
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let result = import_archive(&store, tmp.path());
        drop(tmp);
        result
    })
    .await
    .map_err(|e| ImportError::Engine(format!("import task failed: {e}")))?
}

/// Reads and hashes every regular file of the archive into the store's temp directory.
fn read_archive(store: &BlobStore, path: &Path) -> Result<Files, ImportError> {
    let open_err = |source| ImportError::Open {
        path: path.to_owned(),
        source,
    };
    let truncated = |reason: String| ImportError::Truncated {
        path: path.to_owned(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(open_err)?;
    check_end_marker(&mut file)
        .map_err(open_err)?
        .map_or(Ok(()), |r| Err(truncated(r)))?;
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, file));
    let mut files = Files {
        staged: HashMap::new(),
        links: HashMap::new(),
    };
    let entries = archive.entries().map_err(|e| truncated(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| truncated(e.to_string()))?;
        let name = normalize(&String::from_utf8_lossy(&entry.path_bytes()));
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            if let Some(target) = entry.link_name_bytes() {
                let target = String::from_utf8_lossy(&target).into_owned();
                // Symlinks are relative to their directory, hard links to the archive root.
                let resolved = match (kind.is_symlink(), name.rsplit_once('/')) {
                    (true, Some((dir, _))) => normalize(&format!("{dir}/{target}")),
                    _ => normalize(&target),
                };
                files.links.insert(name, resolved);
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let size = entry.size();
        let mut staging = store.stage()?;
        let copied = std::io::copy(&mut entry, &mut staging)
            .map_err(|e| truncated(format!("{name}: {e}")))?;
        if copied != size {
            return Err(truncated(format!(
                "{name} ends after {copied} of its {size} bytes"
            )));
        }
        files.staged.insert(name, staging.finish(None)?);
    }
    Ok(files)
}

/// A tar archive ends with zero blocks; a file cut short does not. `Some(reason)` if missing.
fn check_end_marker(file: &mut std::fs::File) -> std::io::Result<Option<String>> {
    let len = file.metadata()?.len();
    if len < 1024 || len % 512 != 0 {
        return Ok(Some(format!(
            "{len} bytes is not a whole number of 512-byte tar blocks"
        )));
    }
    file.seek(SeekFrom::Start(len - 512))?;
    let mut tail = [0u8; 512];
    file.read_exact(&mut tail)?;
    file.seek(SeekFrom::Start(0))?;
    Ok((!tail.iter().all(|b| *b == 0))
        .then(|| "it does not end with the end-of-archive blocks".to_owned()))
}

/// The digest a file's own name claims (`<hex>.json`, `blobs/sha256/<hex>`), if it claims one.
fn named_digest(path: &str) -> Option<Digest> {
    let base = path.rsplit('/').next()?;
    base.strip_suffix(".json").unwrap_or(base).parse().ok()
}

/// Checks every found image and moves its blobs and record into the store.
fn commit(
    store: &BlobStore,
    files: Files,
    found: Vec<Found>,
) -> Result<Vec<Imported>, ImportError> {
    let mut records = Vec::new();
    for f in found {
        let (config, staged): (Config, _) = files.json("config", &f.config)?;
        if let Some(named) = named_digest(&f.config) {
            check(staged, "config", &f.config, named, "its file name")?;
        }
        if let Some(expected) = f.ids.first() {
            check(staged, "config", &f.config, *expected, "the manifest")?;
        }
        if config.rootfs.diff_ids.len() != f.layers.len() {
            return Err(ImportError::LayerCount {
                file: f.config.clone(),
                in_config: config.rootfs.diff_ids.len(),
                in_manifest: f.layers.len(),
            });
        }
        let mut layers = Vec::new();
        let mut size = staged.size;
        for (i, (path, diff)) in f.layers.iter().zip(&config.rootfs.diff_ids).enumerate() {
            let layer = files.get(path).ok_or_else(|| ImportError::Missing {
                what: "layer",
                file: path.clone(),
            })?;
            if let Some(expected) = f.ids.get(i + 1) {
                check(layer, "layer", path, *expected, "the manifest")?;
            }
            check(
                layer,
                "layer",
                path,
                digest_of(diff, &f.config)?,
                "the config's rootfs.diff_ids",
            )?;
            layers.push(layer.digest);
            size += layer.size;
        }
        records.push(ImageRecord {
            id: staged.digest,
            names: f.names,
            layers,
            size,
        });
    }
    // Everything checked: make room, then move blobs into place, then write the records.
    let wanted: BTreeSet<Digest> = records.iter().flat_map(|r| r.blobs().copied()).collect();
    let new_bytes: u64 = files
        .staged
        .values()
        .filter(|s| wanted.contains(&s.digest) && !store.contains(&s.digest))
        .map(|s| (s.digest, s.size))
        .collect::<HashMap<_, _>>()
        .into_values()
        .sum();
    store.make_room(new_bytes, &wanted)?;
    let mut by_digest: HashMap<Digest, Staged> = HashMap::new();
    for s in files.staged.into_values() {
        if wanted.contains(&s.digest) {
            by_digest.entry(s.digest).or_insert(s);
        }
    }
    let mut out = Vec::new();
    for mut rec in records {
        let mut fresh = 0;
        for d in rec.blobs() {
            if let Some(s) = by_digest.remove(d) {
                if !store.contains(d) {
                    fresh += s.size;
                }
                store.commit(s)?;
            } else {
                store.touch(d);
            }
        }
        if let Some(old) = store.record(&rec.id)? {
            for n in old.names {
                if !rec.names.contains(&n) {
                    rec.names.push(n);
                }
            }
        }
        store.put_record(&rec)?;
        out.push(Imported {
            record: rec,
            new_bytes: fresh,
        });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests;
