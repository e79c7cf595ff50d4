//! Which cgroup hierarchy to use: found in the mount table, checked writable, and for v2
//! the controllers switched on from the root down to the parent dir.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::mountinfo::{CgroupMount, MountKind};
use super::{check_parent, dedup_keep_order, files, mountinfo, v1_in_order, CgroupError};

/// The controllers a task cgroup needs.
const REQUIRED: [&str; 3] = ["cpu", "memory", "pids"];

/// The cgroup hierarchies usable here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified hierarchy, with cpu, memory and pids enabled down to the parent.
    V2 {
        /// Its mount point, e.g. `/sys/fs/cgroup`.
        root: PathBuf,
    },
    /// One mount point per controller (the same path twice for joint mounts).
    V1 {
        /// The cpu controller's mount point.
        cpu: PathBuf,
        /// The cpuacct controller's (CPU time used), if mounted and writable.
        cpuacct: Option<PathBuf>,
        /// The memory controller's.
        memory: PathBuf,
        /// The pids controller's.
        pids: PathBuf,
        /// The freezer's (race-free kills), if mounted and writable.
        freezer: Option<PathBuf>,
    },
}

impl Hierarchy {
    /// Finds the hierarchy to use from `/proc/self/mountinfo`: a v2 mount whose
    /// `cgroup.controllers` lists cpu, memory and pids and that lets them be enabled from its
    /// root down to `parent` (a relative path like `omesh`, created as needed), else v1
    /// mounts of cpu, memory and pids. Checks each is writable by creating and removing a
    /// probe dir under `parent`. The error says, for v2 and for v1, what is missing or not
    /// writable.
    pub fn detect(parent: &str) -> Result<Self, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::detect_in(&mountinfo::parse(&text), parent)
    }

    /// [`Self::detect`] over parsed mounts.
    pub(super) fn detect_in(mounts: &[CgroupMount], parent: &str) -> Result<Self, CgroupError> {
        let parent = check_parent(parent)?;
        let mut v2 = Vec::new();
        for mount in mounts.iter().filter(|m| m.kind == MountKind::V2) {
            match prepare_v2(&mount.mount_point, parent) {
                Ok(()) => {
                    return Ok(Self::V2 {
                        root: mount.mount_point.clone(),
                    })
                }
                Err(why) => v2.push(why),
            }
        }
        let v1 = match prepare_v1(mounts, parent) {
            Ok(h) => return Ok(h),
            Err(why) => why,
        };
        Err(CgroupError::Unavailable {
            v2: if v2.is_empty() {
                "no cgroup2 mount".into()
            } else {
                v2.join("; ")
            },
            v1,
        })
    }

    /// 2 or 1.
    pub fn version(&self) -> u8 {
        match self {
            Self::V2 { .. } => 2,
            Self::V1 { .. } => 1,
        }
    }

    /// The mount points in use, each once.
    pub(super) fn roots(&self) -> Vec<&Path> {
        let mut roots: Vec<&Path> = match self {
            Self::V2 { root } => vec![root],
            Self::V1 {
                cpu,
                cpuacct,
                memory,
                pids,
                freezer,
            } => v1_in_order(cpu, cpuacct.as_ref(), memory, pids, freezer.as_ref())
                .map(PathBuf::as_path)
                .collect(),
        };
        dedup_keep_order(&mut roots);
        roots
    }
}

/// Whether v2 at `root` offers cpu, memory and pids and lets them be enabled down to
/// `parent`; why not otherwise.
fn prepare_v2(root: &Path, parent: &Path) -> Result<(), String> {
    let offered_file = root.join("cgroup.controllers");
    let offered = std::fs::read_to_string(&offered_file)
        .map_err(|e| format!("cannot read {}: {e}", offered_file.display()))?;
    let missing: Vec<&str> = REQUIRED
        .into_iter()
        .filter(|c| !files::controllers(&offered).contains(c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} lacks the {} controller{} (it offers {:?}; on a hybrid host they are bound \
             to v1)",
            offered_file.display(),
            missing.join(", "),
            if missing.len() > 1 { "s" } else { "" },
            offered.trim(),
        ));
    }
    let top = enable_v2(root, parent).map_err(|e| match &e {
        CgroupError::Write { source, .. }
            if source.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) =>
        {
            format!(
                "{e} (that cgroup holds processes, and v2 lets no cgroup with processes \
                 enable controllers for its children)"
            )
        }
        _ => e.to_string(),
    })?;
    probe(&top).map_err(|e| format!("{e}"))
}

/// Enables cpu, memory and pids for the children of every dir from `root` down to
/// `root/parent` (creating dirs): writes those not yet enabled, e.g. `+cpu +memory +pids`, to
/// each `cgroup.subtree_control` (the kernel takes all or none). Returns `root/parent`.
pub(super) fn enable_v2(root: &Path, parent: &Path) -> Result<PathBuf, CgroupError> {
    let mut dir = root.to_owned();
    let mut chain = vec![dir.clone()];
    for component in parent.components() {
        dir.push(component);
        chain.push(dir.clone());
    }
    for dir in &chain {
        if !dir.exists() {
            std::fs::create_dir(dir).map_err(|source| CgroupError::Create {
                path: dir.clone(),
                source,
            })?;
        }
        let control = dir.join("cgroup.subtree_control");
        let enabled = files::read(&control).unwrap_or_default();
        let missing: Vec<String> = REQUIRED
            .into_iter()
            .filter(|c| !files::controllers(&enabled).contains(c))
            .map(|c| format!("+{c}"))
            .collect();
        if !missing.is_empty() {
            files::write(&control, &missing.join(" "))?;
        }
    }
    Ok(dir)
}

/// Finds the v1 mounts of cpu, memory and pids (cpuacct and freezer if there), creates
/// `parent` in each and probes it; why not otherwise.
fn prepare_v1(mounts: &[CgroupMount], parent: &Path) -> Result<Hierarchy, String> {
    let find = |c: &str| {
        mounts
            .iter()
            .find(|m| m.has_v1(c))
            .map(|m| m.mount_point.clone())
    };
    let (Some(cpu), Some(memory), Some(pids)) = (find("cpu"), find("memory"), find("pids")) else {
        let missing: Vec<&str> = REQUIRED.into_iter().filter(|c| find(c).is_none()).collect();
        return Err(format!("no cgroup v1 mount of {}", missing.join(", ")));
    };
    for (controller, root) in [("cpu", &cpu), ("memory", &memory), ("pids", &pids)] {
        prepare_v1_dir(root, parent).map_err(|e| format!("{controller} controller: {e}"))?;
    }
    let optional = |controller: &str| {
        let root = find(controller)?;
        match prepare_v1_dir(&root, parent) {
            Ok(()) => Some(root),
            Err(error) => {
                tracing::warn!(controller, %error, "cgroup controller not usable; going without it");
                None
            }
        }
    };
    Ok(Hierarchy::V1 {
        cpuacct: optional("cpuacct"),
        freezer: optional("freezer"),
        cpu,
        memory,
        pids,
    })
}

fn prepare_v1_dir(root: &Path, parent: &Path) -> Result<(), CgroupError> {
    let dir = root.join(parent);
    std::fs::create_dir_all(&dir).map_err(|source| CgroupError::Create {
        path: dir.clone(),
        source,
    })?;
    probe(&dir)
}

/// Creates and removes a child cgroup of `dir`: proves we may make task cgroups there.
///
/// The name is unique per call, not only per process: threads that detect at the same time
/// would otherwise remove each other's probe.
fn probe(dir: &Path) -> Result<(), CgroupError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let probe = dir.join(format!(
        "omesh-probe-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    match std::fs::create_dir(&probe) {
        Ok(()) => {}
        // Left by a process that died between the two calls and had our pid.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(CgroupError::Create {
                path: probe,
                source,
            })
        }
    }
    std::fs::remove_dir(&probe).map_err(|source| CgroupError::Remove {
        path: probe,
        source,
    })
}
