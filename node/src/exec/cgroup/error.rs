//! Why a task cgroup could not be set up, used or removed.

use std::path::PathBuf;

/// Why a cgroup could not be set up, used or removed. Messages name the file or controller
/// and carry the OS error.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The parent or name is not a plain relative path (nothing was touched).
    #[error("bad cgroup {what} {value:?}: must be a relative path of plain names")]
    BadName {
        /// `parent` or `name`.
        what: &'static str,
        /// What was given.
        value: String,
    },
    /// A file needed to find the hierarchies could not be read (nothing was touched).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file, e.g. `/proc/self/mountinfo`.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Neither hierarchy can hold task cgroups here. Probe dirs were removed; parent dirs
    /// and v2 `subtree_control` settings made on the way stay.
    #[error("no usable cgroup hierarchy: v2: {v2}; v1: {v1}")]
    Unavailable {
        /// Why not cgroup v2.
        v2: String,
        /// Why not cgroup v1.
        v1: String,
    },
    /// A cgroup dir could not be made (the task cgroup's dirs made before it were removed).
    #[error("cannot create cgroup {}: {source}", path.display())]
    Create {
        /// The dir.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A control file could not be written: a limit (the task cgroup was removed again), or
    /// a v2 `cgroup.subtree_control` (EBUSY: that cgroup holds processes).
    #[error("cannot write {value:?} to {}: {source}", path.display())]
    Write {
        /// The control file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A cgroup dir could not be removed, e.g. a process in it not yet reaped (its
    /// processes were sent SIGKILL; the dir stays).
    #[error("cannot remove cgroup {}: {source}", path.display())]
    Remove {
        /// The dir.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}
