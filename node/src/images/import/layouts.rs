//! The two archive layouts: the legacy one (`manifest.json`) and the OCI one (`index.json`),
//! each turned into the list of images it holds with the archive paths of their blobs.

use std::collections::HashMap;

use omesh_protocol::Digest;
use serde::Deserialize;

use super::ImportError;
use crate::images::blobs::Staged;

/// The files of an archive, staged and hashed.
pub(super) struct Files {
    pub(super) staged: HashMap<String, Staged>,
    pub(super) links: HashMap<String, String>,
}

impl Files {
    pub(super) fn get(&self, path: &str) -> Option<&Staged> {
        let mut p = normalize(path);
        for _ in 0..8 {
            if let Some(s) = self.staged.get(&p) {
                return Some(s);
            }
            p = self.links.get(&p)?.clone();
        }
        None
    }

    pub(super) fn json<T: for<'de> Deserialize<'de>>(
        &self,
        what: &'static str,
        path: &str,
    ) -> Result<(T, &Staged), ImportError> {
        let staged = self.get(path).ok_or_else(|| ImportError::Missing {
            what,
            file: path.to_owned(),
        })?;
        let bytes = staged.read_small()?;
        let value = serde_json::from_slice(&bytes).map_err(|e| ImportError::BadJson {
            file: path.to_owned(),
            reason: e.to_string(),
        })?;
        Ok((value, staged))
    }
}

pub(super) fn normalize(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            p => out.push(p),
        }
    }
    out.join("/")
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct LegacyEntry {
    pub(super) config: String,
    #[serde(default)]
    pub(super) repo_tags: Option<Vec<String>>,
    pub(super) layers: Vec<String>,
}

#[derive(Deserialize)]
pub(super) struct Config {
    pub(super) rootfs: RootFs,
}

#[derive(Deserialize)]
pub(super) struct RootFs {
    pub(super) diff_ids: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Descriptor {
    #[serde(default)]
    pub(super) media_type: String,
    pub(super) digest: String,
    #[serde(default)]
    pub(super) annotations: HashMap<String, String>,
}

#[derive(Deserialize)]
pub(super) struct OciIndex {
    pub(super) manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
pub(super) struct OciManifest {
    pub(super) config: Descriptor,
    pub(super) layers: Vec<Descriptor>,
}

/// An image found in the archive, with the archive paths of its blobs.
pub(super) struct Found {
    pub(super) names: Vec<String>,
    pub(super) config: String,
    pub(super) layers: Vec<String>,
    pub(super) ids: Vec<Digest>,
}

pub(super) fn legacy_images(files: &Files) -> Result<Vec<Found>, ImportError> {
    let (entries, _): (Vec<LegacyEntry>, _) = files.json("manifest", "manifest.json")?;
    Ok(entries
        .into_iter()
        .map(|e| Found {
            names: e.repo_tags.unwrap_or_default(),
            config: e.config,
            layers: e.layers,
            ids: Vec::new(),
        })
        .collect())
}

pub(super) fn oci_images(files: &Files) -> Result<Vec<Found>, ImportError> {
    let (index, _): (OciIndex, _) = files.json("manifest", "index.json")?;
    let mut out = Vec::new();
    let mut queue: Vec<(Descriptor, Vec<String>, u8)> = index
        .manifests
        .into_iter()
        .map(|d| (d, Vec::new(), 0))
        .collect();
    while let Some((desc, mut names, depth)) = queue.pop() {
        for key in [
            "io.containerd.image.name",
            "org.opencontainers.image.ref.name",
        ] {
            if let Some(n) = desc
                .annotations
                .get(key)
                .filter(|n| n.contains(':') || n.contains('/'))
            {
                names.push(n.clone());
            }
        }
        let path = blob_path(&desc.digest);
        let expected = digest_of(&desc.digest, &path)?;
        if desc.media_type.contains("index") || desc.media_type.contains("manifest.list") {
            let (nested, staged): (OciIndex, _) = files.json("manifest", &path)?;
            check(staged, "manifest", &path, expected, "index.json")?;
            if depth < 2 {
                queue.extend(
                    nested
                        .manifests
                        .into_iter()
                        .map(|d| (d, names.clone(), depth + 1)),
                );
            }
            continue;
        }
        let (manifest, staged): (OciManifest, _) = files.json("manifest", &path)?;
        check(staged, "manifest", &path, expected, "index.json")?;
        let mut ids = vec![digest_of(&manifest.config.digest, &path)?];
        let mut layers = Vec::new();
        for l in &manifest.layers {
            let lp = blob_path(&l.digest);
            if l.media_type.contains("gzip") || l.media_type.contains("zstd") {
                return Err(ImportError::Compressed {
                    file: lp,
                    media_type: l.media_type.clone(),
                });
            }
            ids.push(digest_of(&l.digest, &lp)?);
            layers.push(lp);
        }
        names.sort();
        names.dedup();
        out.push(Found {
            names,
            config: blob_path(&manifest.config.digest),
            layers,
            ids,
        });
    }
    Ok(out)
}

pub(super) fn blob_path(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

pub(super) fn digest_of(text: &str, file: &str) -> Result<Digest, ImportError> {
    text.strip_prefix("sha256:")
        .and_then(|h| h.parse().ok())
        .ok_or_else(|| ImportError::BadJson {
            file: file.to_owned(),
            reason: format!("{text:?} is not a sha256 digest"),
        })
}

pub(super) fn check(
    staged: &Staged,
    what: &'static str,
    file: &str,
    expected: Digest,
    source_of_truth: &'static str,
) -> Result<(), ImportError> {
    if staged.digest == expected {
        Ok(())
    } else {
        Err(ImportError::Mismatch {
            what,
            file: file.to_owned(),
            expected,
            actual: staged.digest,
            source_of_truth,
        })
    }
}
