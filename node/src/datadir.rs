//! The data directory: the node's identity key and its incarnation counter.
//!
//! A restart with the same directory is the same peer with incarnation + 1; a new directory
//! is a new peer.

use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

/// Why the data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
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
    /// A file holds something else than expected.
    #[error("{path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// An opened data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DataDirError + 'a {
    move |source| DataDirError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Writes `bytes` to `path` atomically with mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(io("cannot create a file in", dir))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o600))
            .map_err(io("cannot set permissions of", path))?;
    }
    tmp.write_all(bytes).map_err(io("cannot write", path))?;
    tmp.as_file().sync_all().map_err(io("cannot sync", path))?;
    tmp.persist(path).map_err(|e| DataDirError::Io {
        what: "cannot replace",
        path: path.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

impl DataDir {
    /// Opens (creating if needed) the directory.
    pub fn open(root: &Path) -> Result<Self, DataDirError> {
        std::fs::create_dir_all(root).map_err(io("cannot create data directory", root))?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The node's identity, created on first use.
    pub fn identity(&self) -> Result<Keypair, DataDirError> {
        let path = self.root.join("identity.key");
        match std::fs::read(&path) {
            Ok(bytes) => {
                Keypair::from_protobuf_encoding(&bytes).map_err(|e| DataDirError::Corrupt {
                    path: path.clone(),
                    reason: format!(
                        "not an identity key ({e}); move it away to create a new identity"
                    ),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Keypair::generate_ed25519();
                let bytes = key
                    .to_protobuf_encoding()
                    .map_err(|e| DataDirError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                write_private(&path, &bytes)?;
                Ok(key)
            }
            Err(e) => Err(io("cannot read", &path)(e)),
        }
    }

    /// Increments and returns the incarnation counter (1 on first start).
    pub fn next_incarnation(&self) -> Result<u64, DataDirError> {
        let path = self.root.join("incarnation");
        let current = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .map_err(|_| DataDirError::Corrupt {
                    path: path.clone(),
                    reason: format!(
                        "expected a number, found {:?}",
                        text.chars().take(40).collect::<String>()
                    ),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io("cannot read", &path)(e)),
        };
        let next = current + 1;
        write_private(&path, format!("{next}\n").as_bytes())?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn identity_is_stable_and_incarnation_grows() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::open(dir.path()).unwrap();
        let a = d.identity().unwrap().public();
        let b = d.identity().unwrap().public();
        assert_eq!(a, b);
        assert_eq!(d.next_incarnation().unwrap(), 1);
        assert_eq!(d.next_incarnation().unwrap(), 2);
    }

    #[test]
    fn corrupt_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("incarnation"), "banana").unwrap();
        std::fs::write(dir.path().join("identity.key"), "xx").unwrap();
        let d = DataDir::open(dir.path()).unwrap();
        let e = d.next_incarnation().unwrap_err().to_string();
        assert!(e.contains("incarnation") && e.contains("banana"), "{e}");
        let e = d.identity().unwrap_err().to_string();
        assert!(e.contains("identity.key"), "{e}");
    }
}
