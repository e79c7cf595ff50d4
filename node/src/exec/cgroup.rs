//! Task cgroups: a directory per task instance in each cgroup hierarchy, holding its CPU,
//! memory and pid limits, so a task cannot starve the peer or the host, and so every process
//! it forks can be found and killed.
//!
//! # v1 and v2
//! cgroup **v2** is one tree (usually at `/sys/fs/cgroup`) in which each controller must be
//! switched on for a cgroup's children by writing `+cpu +memory +pids` to the parent's
//! `cgroup.subtree_control`, from the root down. A cgroup whose children use controllers may
//! hold no processes itself ("no internal processes"), so the parent dir (`omesh` by default)
//! only holds task dirs and only task dirs hold processes. Limits are `cpu.max`, `memory.max`,
//! `memory.swap.max`, `pids.max`; `cgroup.kill` (5.14+) kills a whole group at once.
//!
//! cgroup **v1** has one tree per controller (`/sys/fs/cgroup/cpu`, `…/memory`, `…/pids`,
//! `…/freezer`, sometimes joint like `cpu,cpuacct`); a task gets a dir of the same name in
//! each and joins all of them. Limits are `cpu.cfs_quota_us` over `cpu.cfs_period_us`,
//! `memory.limit_in_bytes` (plus `memory.memsw.limit_in_bytes`, so swap is no way around
//! it), `pids.max`.
//!
//! A host may have both: in systemd's hybrid mode a `cgroup2` mount (`…/unified`) exists
//! with every controller bound to v1, so its `cgroup.controllers` is empty.
//! [`Hierarchy::detect`] uses v2 only when it offers cpu, memory and pids, and v1 otherwise.
//!
//! # Joining
//! A child joins between `fork` and `exec` ([`TaskCgroup::join_on_spawn`]), before it runs a
//! line of the task, so nothing the task forks is outside it. Joining late (writing the
//! child's pid after spawn) would let a fast child fork out of reach first.
//!
//! # Why freeze, then kill
//! `cgroup.procs` is a snapshot: between reading it and sending SIGKILL to each pid, a
//! process may fork (the child is not in the snapshot) or exit having forked (its pid is stale,
//! the child unseen). A fork bomb, or a chain of processes that each start the next and exit,
//! can stay ahead of such a loop. A frozen group cannot fork, so the pids read while it is
//! frozen are all there are; each gets SIGKILL, and the thaw lets them die. v2 `cgroup.kill`
//! does the same inside the kernel. Where no freezer is mounted the loop repeats until the
//! group is empty, which `pids.max` keeps finite.
//!
//! Killed processes become zombies until their parent reaps them (the task's own children:
//! the caller; orphans: init or the nearest subreaper). They count against `pids.max` until
//! then, and on some kernels keep a cgroup dir busy, hence the rmdir retry in
//! [`TaskCgroup::remove`]. A guard that is a child subreaper (`PR_SET_CHILD_SUBREAPER`) and
//! reaps everything does not depend on init for that.
//!
//! # What this module never does
//! It never moves the calling process into a cgroup and never freezes or kills it; it
//! creates and removes only `<parent>/<name>` dirs under the parent it is given.

mod error;
mod files;
mod hierarchy;
mod kill;
pub(crate) mod mountinfo;

pub use error::CgroupError;
pub use hierarchy::Hierarchy;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// The CFS period, µs: quotas are given per 100 ms.
const CPU_PERIOD_US: u64 = 100_000;
/// The smallest CFS quota we write, µs (1% of a core; the kernel's minimum is 1 ms).
const MIN_CPU_QUOTA_US: u64 = 1_000;
/// How long [`TaskCgroup::kill_all`] tries before giving up.
const KILL_DEADLINE: Duration = Duration::from_secs(5);
/// How long [`TaskCgroup::remove`] retries an rmdir that fails with EBUSY.
const RMDIR_DEADLINE: Duration = Duration::from_secs(2);

/// The limits of one task instance. Each is enforced as given (no value means "unlimited").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per wall-clock second, in thousandths of a core (1000 = one full core).
    pub cpu_millis: u32,
    /// Memory (with swap, where the kernel accounts it), bytes.
    pub memory_bytes: u64,
    /// Processes and threads at once.
    pub pids: u32,
}

impl Limits {
    /// The CFS quota per [`CPU_PERIOD_US`], µs.
    fn cpu_quota_us(&self) -> u64 {
        (u64::from(self.cpu_millis) * 100).max(MIN_CPU_QUOTA_US)
    }
}

/// A task instance's cgroup: its dir in each hierarchy.
#[derive(Debug)]
pub struct TaskCgroup {
    layout: Layout,
    /// The dirs that exist, one per hierarchy, each once (joint mounts share one).
    dirs: Vec<PathBuf>,
}

/// Where each controller's files of one task cgroup are.
#[derive(Debug, Clone)]
enum Layout {
    V2 {
        dir: PathBuf,
    },
    V1 {
        cpu: PathBuf,
        cpuacct: Option<PathBuf>,
        memory: PathBuf,
        pids: PathBuf,
        freezer: Option<PathBuf>,
    },
}

impl Layout {
    fn of(h: &Hierarchy, parent: &Path, name: &str) -> Self {
        let at = |root: &Path| root.join(parent).join(name);
        match h {
            Hierarchy::V2 { root } => Self::V2 { dir: at(root) },
            Hierarchy::V1 {
                cpu,
                cpuacct,
                memory,
                pids,
                freezer,
            } => Self::V1 {
                cpu: at(cpu),
                cpuacct: cpuacct.as_deref().map(at),
                memory: at(memory),
                pids: at(pids),
                freezer: freezer.as_deref().map(at),
            },
        }
    }

    /// Every dir, each once: the freezer and cpuacct ones too, since a process must be in
    /// them to be frozen and counted.
    fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = match self {
            Self::V2 { dir } => vec![dir.clone()],
            Self::V1 {
                cpu,
                cpuacct,
                memory,
                pids,
                freezer,
            } => v1_in_order(cpu, cpuacct.as_ref(), memory, pids, freezer.as_ref())
                .cloned()
                .collect(),
        };
        dedup_keep_order(&mut dirs);
        dirs
    }
}

impl TaskCgroup {
    /// Creates `<root>/<parent>/<name>` in every hierarchy and writes the limits: v1
    /// `cpu.cfs_period_us` 100000 and `cpu.cfs_quota_us` `cpu_millis × 100` (at least 1000),
    /// `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes`, `memory.swappiness` 0
    /// where present), `pids.max`; v2 `cpu.max`, `memory.max`, `memory.swap.max` 0 (where
    /// present), `pids.max`.
    ///
    /// A cgroup of the same name left by an earlier run is emptied (its processes killed)
    /// and made anew, so the OOM count, peaks and CPU time start from zero; if it cannot be
    /// removed (`Remove`: a process in it not yet reaped), that is the error. On any other
    /// error nothing of the new cgroup is left.
    pub fn create(
        h: &Hierarchy,
        parent: &str,
        name: &str,
        limits: &Limits,
    ) -> Result<Self, CgroupError> {
        let parent = check_parent(parent)?;
        check_name(name)?;
        if let Hierarchy::V2 { root } = h {
            // Cheap when detect already did it; needed if someone turned them off since.
            hierarchy::enable_v2(root, parent)?;
        }
        let layout = Layout::of(h, parent, name);
        if let Some(old) = Self::with_existing(layout.clone()) {
            old.remove()?;
        }
        let mut cgroup = Self {
            layout: layout.clone(),
            dirs: Vec::new(),
        };
        for dir in layout.dirs() {
            let made = dir
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::create_dir(&dir));
            if let Err(source) = made {
                cgroup.rmdir_all();
                return Err(CgroupError::Create { path: dir, source });
            }
            cgroup.dirs.push(dir);
        }
        if let Err(e) = cgroup.write_limits(limits) {
            cgroup.rmdir_all();
            return Err(e);
        }
        Ok(cgroup)
    }

    /// Opens the cgroup `name` a run before this one left (for clean-up), with the dirs of it
    /// that exist; `None` if none does or the name is not a plain name.
    pub fn open(h: &Hierarchy, parent: &str, name: &str) -> Option<Self> {
        let parent = check_parent(parent).ok()?;
        check_name(name).ok()?;
        Self::with_existing(Layout::of(h, parent, name))
    }

    fn with_existing(layout: Layout) -> Option<Self> {
        let dirs: Vec<PathBuf> = layout.dirs().into_iter().filter(|d| d.is_dir()).collect();
        (!dirs.is_empty()).then_some(Self { layout, dirs })
    }

    fn write_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        let quota = limits.cpu_quota_us();
        let memory_bytes = limits.memory_bytes.to_string();
        let pids_max = limits.pids.to_string();
        match &self.layout {
            Layout::V2 { dir } => {
                files::write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                files::write(&dir.join("memory.max"), &memory_bytes)?;
                files::write_if_present(&dir.join("memory.swap.max"), "0")?;
                files::write(&dir.join("pids.max"), &pids_max)?;
            }
            Layout::V1 {
                cpu, memory, pids, ..
            } => {
                files::write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                files::write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                // memsw may never be below the memory limit; in a fresh dir both are
                // unlimited, so the memory limit goes first.
                files::write(&memory.join("memory.limit_in_bytes"), &memory_bytes)?;
                files::write_if_present(
                    &memory.join("memory.memsw.limit_in_bytes"),
                    &memory_bytes,
                )?;
                files::write_if_present(&memory.join("memory.swappiness"), "0")?;
                files::write(&pids.join("pids.max"), &pids_max)?;
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a child writes `0` into to join (one per hierarchy), built
    /// here so that the child, between fork and exec, allocates nothing. See
    /// [`join_in_child`] and [`Self::join_on_spawn`].
    pub fn join_paths(&self) -> Vec<CString> {
        self.procs_files()
            .into_iter()
            // A path from the kernel's mount table holds no NUL byte.
            .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
            .collect()
    }

    /// Makes the child of `cmd` join this cgroup between fork and exec, so that it and all it
    /// forks are limited from its first instruction. A failure to join fails the spawn. For
    /// a tokio `Command`, pass `cmd.as_std_mut()`.
    pub fn join_on_spawn(&self, cmd: &mut std::process::Command) {
        join_paths_on_spawn(self.join_paths(), cmd);
    }

    /// Kills every process in the cgroup, race-free against forking: v2 `cgroup.kill` where
    /// present; else freeze (v1 freezer, v2 `cgroup.freeze`), SIGKILL every pid, thaw, until
    /// it is empty or 5 s have passed; without a freezer, kill until empty. Returns how many
    /// processes it killed. Reaping those that are its children stays the caller's job.
    pub fn kill_all(&self) -> usize {
        let stopper = match &self.layout {
            Layout::V2 { dir } if dir.join("cgroup.kill").exists() => {
                kill::Stopper::KillFile(dir.join("cgroup.kill"))
            }
            Layout::V2 { dir } if dir.join("cgroup.freeze").exists() => {
                kill::Stopper::FreezerV2(dir.clone())
            }
            Layout::V1 {
                freezer: Some(freezer),
                ..
            } if freezer.is_dir() => kill::Stopper::FreezerV1(freezer.join("freezer.state")),
            Layout::V1 { .. } | Layout::V2 { .. } => kill::Stopper::None,
        };
        kill::kill_all(
            &self.procs_files(),
            &stopper,
            Instant::now() + KILL_DEADLINE,
        )
    }

    /// Whether no process is in the cgroup (in any hierarchy).
    pub fn is_empty(&self) -> bool {
        self.pids().is_empty()
    }

    /// The processes in the cgroup (in any hierarchy), sorted.
    pub fn pids(&self) -> Vec<u32> {
        kill::list(&self.procs_files())
    }

    /// Whether the kernel's OOM killer killed a process in it: `oom_kill N` > 0 in v2
    /// `memory.events` or v1 `memory.oom_control`; on v1 kernels before 4.13, which lack that
    /// line, whether the limit was hit (`memory.failcnt` > 0) with usage at the limit.
    pub fn oom_killed(&self) -> bool {
        match &self.layout {
            Layout::V2 { dir } => {
                files::read_keyed(&dir.join("memory.events"), "oom_kill").is_some_and(|n| n > 0)
            }
            Layout::V1 { memory, .. } => {
                match files::read_keyed(&memory.join("memory.oom_control"), "oom_kill") {
                    Some(n) => n > 0,
                    None => {
                        let read = |f: &str| files::read_u64(&memory.join(f));
                        read("memory.failcnt").is_some_and(|n| n > 0)
                            && matches!(
                                (read("memory.max_usage_in_bytes"), read("memory.limit_in_bytes")),
                                (Some(peak), Some(limit)) if peak >= limit
                            )
                    }
                }
            }
        }
    }

    /// CPU time its processes used, ns: v2 `cpu.stat` `usage_usec`, v1 `cpuacct.usage`
    /// (`None` without a cpuacct hierarchy).
    pub fn cpu_usage_ns(&self) -> Option<u64> {
        match &self.layout {
            Layout::V2 { dir } => files::read_keyed(&dir.join("cpu.stat"), "usage_usec")
                .and_then(|us| us.checked_mul(1_000)),
            Layout::V1 { cpuacct, .. } => files::read_u64(&cpuacct.as_ref()?.join("cpuacct.usage")),
        }
    }

    /// The most processes it held at once: `pids.peak` (v2, and v1 on recent kernels).
    pub fn pids_peak(&self) -> Option<u64> {
        match &self.layout {
            Layout::V2 { dir: pids } | Layout::V1 { pids, .. } => {
                files::read_u64(&pids.join("pids.peak"))
            }
        }
    }

    /// The most memory it used at once, bytes: v2 `memory.peak` (5.19+), v1
    /// `memory.max_usage_in_bytes`.
    pub fn memory_peak_bytes(&self) -> Option<u64> {
        match &self.layout {
            Layout::V2 { dir } => files::read_u64(&dir.join("memory.peak")),
            Layout::V1 { memory, .. } => files::read_u64(&memory.join("memory.max_usage_in_bytes")),
        }
    }

    /// Kills what is in it, then removes its dirs. An rmdir fails with EBUSY until the
    /// kernel has let go of the last process, so each is retried for up to 2 s; the error
    /// names the first dir left behind (the others are still removed).
    pub fn remove(mut self) -> Result<(), CgroupError> {
        self.kill_all();
        let deadline = Instant::now() + RMDIR_DEADLINE;
        let mut first = None;
        for dir in std::mem::take(&mut self.dirs) {
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(source) => {
                        first.get_or_insert(CgroupError::Remove { path: dir, source });
                        break;
                    }
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Removes the dirs made so far by a [`Self::create`] that failed (no process joined).
    fn rmdir_all(&mut self) {
        for dir in self.dirs.drain(..) {
            if let Err(error) = std::fs::remove_dir(&dir) {
                tracing::warn!(dir = %dir.display(), %error, "cannot remove half-made cgroup");
            }
        }
    }

    fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }
}

/// The task cgroups under `parent`, for clean-up after a restart: the names of the dirs
/// there in any hierarchy (a run that died half-way through [`TaskCgroup::create`] may have
/// left a name in some hierarchies only), sorted.
pub fn list(h: &Hierarchy, parent: &str) -> Vec<String> {
    let Ok(parent) = check_parent(parent) else {
        return Vec::new();
    };
    let mut names: Vec<String> = h
        .roots()
        .into_iter()
        .filter_map(|root| std::fs::read_dir(root.join(parent)).ok())
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Makes the child of `cmd` join the cgroup whose `cgroup.procs` files are `paths`
/// ([`TaskCgroup::join_paths`]) between fork and exec. A failure to join fails the spawn.
#[allow(unsafe_code)]
pub fn join_paths_on_spawn(paths: Vec<CString>, cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child of a possibly multi-threaded parent,
    // where only async-signal-safe calls are sound. `join_in_child` makes only
    // open(2), write(2) and close(2) system calls through rustix, on strings built before
    // the fork; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || join_in_child(&paths));
    }
}

/// Joins the cgroup whose `cgroup.procs` files are `paths` ([`TaskCgroup::join_paths`]):
/// writes `0` (this process) into each. Meant for a forked child before exec, so it makes
/// system calls only (rustix open, write, close) and allocates nothing: the parent may be
/// multi-threaded, and another thread may have held the allocator's lock at the fork.
pub fn join_in_child(paths: &[CString]) -> std::io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    for path in paths {
        let fd = rustix::fs::open(
            path.as_c_str(),
            OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        rustix::io::write(&fd, b"0")?;
    }
    Ok(())
}

/// `parent` as a relative path of plain names (no `..`, `.`, root or empty parts).
fn check_parent(parent: &str) -> Result<&Path, CgroupError> {
    let path = Path::new(parent);
    let plain = !parent.is_empty()
        && !parent.contains('\0')
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    if plain {
        Ok(path)
    } else {
        Err(CgroupError::BadName {
            what: "parent",
            value: parent.to_owned(),
        })
    }
}

/// `name` as one plain path component.
fn check_name(name: &str) -> Result<(), CgroupError> {
    let plain = !name.is_empty() && !name.contains(['/', '\0']) && name != "." && name != "..";
    if plain {
        Ok(())
    } else {
        Err(CgroupError::BadName {
            what: "name",
            value: name.to_owned(),
        })
    }
}

/// The v1 controllers' paths in the order they are joined and removed: memory first (a
/// process is charged from the moment it joins), then cpu, cpuacct, pids, freezer.
fn v1_in_order<'a, T>(
    cpu: &'a T,
    cpuacct: Option<&'a T>,
    memory: &'a T,
    pids: &'a T,
    freezer: Option<&'a T>,
) -> impl Iterator<Item = &'a T> {
    [Some(memory), Some(cpu), cpuacct, Some(pids), freezer]
        .into_iter()
        .flatten()
}

fn dedup_keep_order<T: PartialEq>(items: &mut Vec<T>) {
    let mut i = 0;
    while i < items.len() {
        if items[..i].contains(&items[i]) {
            items.remove(i);
        } else {
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests;
