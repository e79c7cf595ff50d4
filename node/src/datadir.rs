//! The data directory: the node's identity key, its incarnation counter and task logs. The
//! directory is 0700 and its secret files 0600; what is found more open is tightened, with a
//! warning.
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
    /// Another process holds the directory's lock: a second peer on it would take the same
    /// node id and fight the first over its incarnation, leases and guards.
    #[error("{path} is in use by another omesh peer ({holder}); stop it first, or give this one another --data-dir")]
    InUse {
        /// The lock file.
        path: PathBuf,
        /// Who holds it, as the lock file says (`pid N`), or that it does not say.
        holder: String,
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

/// Writes `bytes` to `path` atomically (a temporary file in the same directory, then a
/// rename) with mode 0600, whatever mode an earlier file at `path` had.
pub(crate) fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // tempfile creates the file with mode 0600 on Unix; set it anyway, the umask aside.
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(PRIVATE_FILE))?;
    }
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Mode of the data directory and the task log directory: owner only.
const PRIVATE_DIR: u32 = 0o700;
/// Mode of secret files (identity key, incarnation, task logs, admission certificate).
const PRIVATE_FILE: u32 = 0o600;

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
    write_private_file(path, bytes).map_err(io("cannot write", path))
}

/// Makes `path` no more open than `mode` (clears group and other bits); warns when it was,
/// since until now other local users could read what it holds. Unix only.
fn tighten(path: &Path, mode: u32, what: &str) -> Result<(), DataDirError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let found = std::fs::metadata(path)
            .map_err(io("cannot read the permissions of", path))?
            .permissions()
            .mode()
            & 0o777;
        if found & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                found = format!("{found:03o}"),
                now = format!("{mode:03o}"),
                "the {what} was readable by other users; tightened its permissions"
            );
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(io("cannot set the permissions of", path))?;
        }
    }
    #[cfg(not(unix))]
    let _ = (path, mode, what);
    Ok(())
}

/// Creates directory `path` (and missing parents) with mode 0700; an existing one that is
/// more open is tightened to 0700, with a warning.
fn create_private_dir(path: &Path, what: &str) -> Result<(), DataDirError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        // Applies to the leaf and to parents created on the way.
        builder.mode(PRIVATE_DIR);
    }
    let existed = path.is_dir();
    builder
        .create(path)
        .map_err(io("cannot create directory", path))?;
    if existed {
        tighten(path, PRIVATE_DIR, what)
    } else {
        // The umask may have left it more open than asked; nobody has used it yet.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(PRIVATE_DIR))
                .map_err(io("cannot set the permissions of", path))?;
        }
        Ok(())
    }
}

/// The data directory's exclusive lock, held for as long as this value lives (the peer's
/// lifetime). The lock file holds the holder's pid, for the next one to name. The lock is an
/// advisory `flock`, released by the kernel when the process ends however it ends, so a
/// peer killed with SIGKILL leaves nothing stale behind; guards do not inherit it (the file
/// is opened close-on-exec), so instances left running do not block a restart.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

/// The file of peer addresses kept for the next start.
pub const PEERS_FILE: &str = "peers";
/// The most peer addresses kept.
pub const MAX_REMEMBERED_PEERS: usize = 32;

/// The name of the lock file in the data directory.
pub const LOCK_FILE: &str = "lock";

impl DataDir {
    /// Takes the directory's exclusive lock and writes this process's pid into it; refuses
    /// (naming the holder) when another process holds it.
    pub fn lock(&self) -> Result<DataDirLock, DataDirError> {
        let path = self.root.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("cannot open", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut file, &mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    Err(_) => "its pid not yet written".to_owned(),
                };
                return Err(DataDirError::InUse { path, holder });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io("cannot lock", &path)(e)),
        }
        file.set_len(0).map_err(io("cannot write", &path))?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(io("cannot write", &path))?;
        Ok(DataDirLock { _file: file })
    }

    /// Opens (creating if needed) the directory, with mode 0700: it holds the node's identity
    /// key and task logs. A directory that exists more open is tightened, with a warning.
    pub fn open(root: &Path) -> Result<Self, DataDirError> {
        create_private_dir(root, "data directory")?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The directory of task logs (`<data_dir>/logs`), created with mode 0700 (tightened if it
    /// is more open): a task's output may hold its secrets.
    pub fn log_dir(&self) -> Result<PathBuf, DataDirError> {
        let dir = self.root.join("logs");
        create_private_dir(&dir, "task log directory")?;
        Ok(dir)
    }

    /// The directory where guards of instances that outlive the peer listen for its next
    /// incarnation (`<data_dir>/guards`), created with mode 0700 (tightened if it is more
    /// open): whoever connects to a guard's socket can renew, stop or re-attach its instance.
    pub fn guard_dir(&self) -> Result<PathBuf, DataDirError> {
        let dir = self.root.join("guards");
        create_private_dir(&dir, "guard directory")?;
        Ok(dir)
    }

    /// The node's identity, created on first use with mode 0600 (an existing key file that is
    /// more open is tightened, with a warning).
    pub fn identity(&self) -> Result<Keypair, DataDirError> {
        let path = self.root.join("identity.key");
        match std::fs::read(&path) {
            Ok(bytes) => {
                let key =
                    Keypair::from_protobuf_encoding(&bytes).map_err(|e| DataDirError::Corrupt {
                        path: path.clone(),
                        reason: format!(
                            "not an identity key ({e}); move it away to create a new identity"
                        ),
                    })?;
                tighten(&path, PRIVATE_FILE, "identity key")?;
                Ok(key)
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

    /// The peer addresses an earlier run kept (`<data_dir>/peers`, one multiaddr with its
    /// `/p2p/` id a line), to dial at start. Missing or unreadable: none.
    pub fn remembered_peers(&self) -> Vec<String> {
        std::fs::read_to_string(self.root.join(PEERS_FILE))
            .map(|t| {
                t.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .take(MAX_REMEMBERED_PEERS)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Keeps `addrs` (at most [`MAX_REMEMBERED_PEERS`]) for the next start.
    pub fn remember_peers(&self, addrs: &[String]) -> Result<(), DataDirError> {
        let path = self.root.join(PEERS_FILE);
        let mut text = String::from(
            "# peers this node knew, redialed at its next start (rewritten while it runs)\n",
        );
        for a in addrs.iter().take(MAX_REMEMBERED_PEERS) {
            text.push_str(a);
            text.push('\n');
        }
        write_private(&path, text.as_bytes())
    }

    /// Increments and returns the incarnation counter (1 on first start). The file is
    /// rewritten with mode 0600 each time.
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

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[cfg(unix)]
    #[test]
    fn secrets_are_private_and_open_ones_are_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("data");
        let d = DataDir::open(&root).unwrap();
        assert_eq!(mode(&root), 0o700);
        d.identity().unwrap();
        d.next_incarnation().unwrap();
        let logs = d.log_dir().unwrap();
        assert_eq!(mode(&root.join("identity.key")), 0o600);
        assert_eq!(mode(&root.join("incarnation")), 0o600);
        assert_eq!(mode(&logs), 0o700);

        // Found open (an older version, a careless copy): tightened at the next start.
        let open = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        };
        open(&root, 0o755);
        open(&logs, 0o777);
        open(&root.join("identity.key"), 0o644);
        open(&root.join("incarnation"), 0o666);
        let d = DataDir::open(&root).unwrap();
        let key = d.identity().unwrap();
        d.next_incarnation().unwrap();
        d.log_dir().unwrap();
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&logs), 0o700);
        assert_eq!(mode(&root.join("identity.key")), 0o600);
        assert_eq!(mode(&root.join("incarnation")), 0o600);
        // Tightening is all it does: the same identity.
        assert_eq!(
            key.public(),
            DataDir::open(&root).unwrap().identity().unwrap().public()
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_private_file_replaces_an_open_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admission.cert");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private_file(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_taken_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::open(dir.path()).unwrap();
        let held = d.lock().unwrap();
        let e = d.lock().unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(e.contains("in use"), "{e}");
        drop(held);
        d.lock().unwrap();
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
