//! The peer's own CPU and memory limit, from its cgroup, and the usage that counts against it.
//!
//! A peer in a container started with `--cpus`, in a systemd slice with `CPUQuota=`, or in any
//! cgroup with a quota can use only that much, whatever the host has idle: its load is its
//! usage over its limit, not the host's `/proc/stat`. Without this, every peer on one host
//! reports the same host-wide figure.
//!
//! # Whose usage counts
//! The peer's cgroup is read from `/proc/self/cgroup` (per controller on v1). Of it and its
//! ancestors up to the mount's root, the one with the tightest limit is the **bound**; ties go
//! to the outermost, whose subtree holds more of what shares the limit. Usage is that bound's
//! whole subtree: the peer, its task cgroups when they are under it (a container's or a
//! slice's children), and anything else the operator put in it, since all of it competes for
//! the same quota. Task cgroups that live outside the bound (`cgroup_parent` elsewhere) are
//! added on top: they are this peer's work, so they count against what it was given. Docker
//! task containers live in Docker's own cgroups and are not counted here.
//!
//! A limit at or above what the host has is no limit: the host figure is then the right one.
//!
//! # Files
//! v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us` and `cpuacct.usage` (ns; the cpuacct tree may
//! be mounted apart from cpu, at the same relative path), `memory.limit_in_bytes` and
//! `memory.usage_in_bytes` less `total_inactive_file` of `memory.stat`. v2: `cpu.max`,
//! `usage_usec` of `cpu.stat`, `memory.max`, `memory.current` less `inactive_file`. Page
//! cache the kernel can drop at once is not load (Docker's `docker stats` does the same).

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::exec::cgroup::mountinfo::{CgroupMount, MountKind};

/// A cumulative CPU-time counter of one cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CpuCounter {
    /// v1 `cpuacct.usage`, nanoseconds.
    V1(PathBuf),
    /// v2 `cpu.stat`, whose `usage_usec` line is microseconds.
    V2(PathBuf),
}

impl CpuCounter {
    fn read_ns(&self) -> Option<u64> {
        match self {
            Self::V1(file) => read_u64(file),
            Self::V2(file) => stat_value(file, "usage_usec")?.checked_mul(1_000),
        }
    }
}

/// The memory in use by one cgroup, less the page cache it could drop at once.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MemCounter {
    /// `memory.usage_in_bytes` (v1) or `memory.current` (v2).
    usage: PathBuf,
    /// `memory.stat`.
    stat: PathBuf,
    /// `total_inactive_file` (v1) or `inactive_file` (v2).
    inactive_key: &'static str,
}

impl MemCounter {
    fn read_bytes(&self) -> Option<u64> {
        let usage = read_u64(&self.usage)?;
        let inactive = stat_value(&self.stat, self.inactive_key).unwrap_or(0);
        Some(usage.saturating_sub(inactive))
    }
}

/// The CPU limit that binds this peer, and the counters of what uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuBound {
    /// The cgroup dir holding the tightest quota.
    pub dir: PathBuf,
    /// The quota, in thousandths of a core.
    pub millis: u32,
    counters: Vec<CpuCounter>,
}

/// The memory limit that binds this peer, and the counters of what uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemBound {
    /// The cgroup dir holding the tightest limit.
    pub dir: PathBuf,
    /// The limit, bytes.
    pub bytes: u64,
    counters: Vec<MemCounter>,
}

/// What binds this peer, per resource (`None`: the host does).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupBounds {
    /// The CPU bound.
    pub cpu: Option<CpuBound>,
    /// The memory bound.
    pub memory: Option<MemBound>,
}

/// What discovery reads: the texts of `/proc/self/cgroup` and the cgroup mounts (from
/// `/proc/self/mountinfo`), where task cgroups go, and what the host has.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Discovery<'a> {
    /// `/proc/self/cgroup`.
    pub(crate) proc_self_cgroup: &'a str,
    /// The cgroup mounts.
    pub(crate) mounts: &'a [CgroupMount],
    /// `cgroup_parent`: task cgroups' parent, relative to each hierarchy's mount point.
    pub(crate) task_parent: &'a str,
    /// The host's cores, in thousandths.
    pub(crate) host_cpu_millis: u32,
    /// The host's memory, bytes.
    pub(crate) host_memory_bytes: u64,
}

impl CgroupBounds {
    /// Finds the bounds of this process from `/proc/self`.
    pub fn of_this_process(
        task_parent: &str,
        host_cpu_millis: u32,
        host_memory_bytes: u64,
    ) -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let mounts = crate::exec::cgroup::mountinfo::parse(&read("/proc/self/mountinfo"));
        Self::discover(&Discovery {
            proc_self_cgroup: &read("/proc/self/cgroup"),
            mounts: &mounts,
            task_parent,
            host_cpu_millis,
            host_memory_bytes,
        })
    }

    /// Finds the bounds from what `d` holds; a file that cannot be read is no limit.
    pub(crate) fn discover(d: &Discovery<'_>) -> Self {
        Self {
            cpu: cpu_bound(d),
            memory: mem_bound(d),
        }
    }

    /// One line for the log: what load is measured against.
    pub fn describe(&self) -> String {
        let cpu = self.cpu.as_ref().map_or_else(
            || "CPU host-wide".to_owned(),
            |b| format!("CPU against {}m in {}", b.millis, b.dir.display()),
        );
        let mem = self.memory.as_ref().map_or_else(
            || "memory host-wide".to_owned(),
            |b| format!("memory against {} B in {}", b.bytes, b.dir.display()),
        );
        format!("{cpu}; {mem}")
    }
}

/// Samples usage against the bounds. CPU is a rate: each sample covers the time since the
/// one before.
#[derive(Debug)]
pub struct CgroupSampler {
    bounds: CgroupBounds,
    last_cpu_ns: Vec<Option<u64>>,
}

impl CgroupSampler {
    /// A sampler that takes its first CPU reading now.
    pub fn new(bounds: CgroupBounds) -> Self {
        let last_cpu_ns = bounds
            .cpu
            .iter()
            .flat_map(|b| b.counters.iter().map(CpuCounter::read_ns))
            .collect();
        Self {
            bounds,
            last_cpu_ns,
        }
    }

    /// The bounds sampled.
    pub fn bounds(&self) -> &CgroupBounds {
        &self.bounds
    }

    /// CPU used over the last `elapsed` against the quota, in thousandths (may exceed 1000
    /// when task cgroups outside the bound add to it); `None` without a CPU bound, a
    /// readable counter, or time passed. A counter that appears (a task cgroup made since)
    /// counts from its next sample; one that went away or went back counts nothing.
    pub fn cpu_permille(&mut self, elapsed: Duration) -> Option<u32> {
        let bound = self.bounds.cpu.as_ref()?;
        let mut used_ns: u64 = 0;
        let mut any = false;
        for (counter, last) in bound.counters.iter().zip(self.last_cpu_ns.iter_mut()) {
            let now = counter.read_ns();
            if let (Some(new), Some(old)) = (now, *last) {
                used_ns = used_ns.saturating_add(new.saturating_sub(old));
                any = true;
            }
            *last = now;
        }
        let capacity_ns = u128::from(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX))
            * u128::from(bound.millis)
            / 1000;
        if !any || capacity_ns == 0 {
            return None;
        }
        let permille = u128::from(used_ns) * 1000 / capacity_ns;
        Some(u32::try_from(permille).unwrap_or(u32::MAX))
    }

    /// Memory in use against the limit, in thousandths; `None` without a memory bound or a
    /// readable counter.
    pub fn mem_permille(&self) -> Option<u32> {
        let bound = self.bounds.memory.as_ref()?;
        let readings: Vec<u64> = bound
            .counters
            .iter()
            .filter_map(MemCounter::read_bytes)
            .collect();
        if readings.is_empty() || bound.bytes == 0 {
            return None;
        }
        let used: u128 = readings.iter().map(|&b| u128::from(b)).sum();
        Some(u32::try_from(used * 1000 / u128::from(bound.bytes)).unwrap_or(u32::MAX))
    }
}

/// Which hierarchy serves `controller`: a v1 mount with it bound, else the v2 mount.
fn mount_for<'a>(mounts: &'a [CgroupMount], controller: &str) -> Option<&'a CgroupMount> {
    mounts
        .iter()
        .find(|m| m.has_v1(controller))
        .or_else(|| mounts.iter().find(|m| m.kind == MountKind::V2))
}

/// This process's cgroup path in `mount`'s hierarchy, from `/proc/self/cgroup`
/// (`id:controllers:path` lines; v2's is `0::path`).
fn own_path<'a>(proc_self_cgroup: &'a str, mount: &CgroupMount) -> Option<&'a str> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match &mount.kind {
            MountKind::V2 => id == "0" && controllers.is_empty(),
            MountKind::V1 { controllers: ours } => {
                let listed: Vec<&str> = controllers.split(',').collect();
                !ours.is_empty() && ours.iter().all(|c| listed.contains(&c.as_str()))
            }
        };
        matches.then_some(path)
    })
}

/// The dir of cgroup `path` under `mount` (a path outside the mount's root, as a container
/// may see its parent's, is taken as the root).
fn dir_of(mount: &CgroupMount, path: &str) -> PathBuf {
    let root = mount.root.trim_end_matches('/');
    let rel = path.strip_prefix(root).unwrap_or("");
    let mut dir = mount.mount_point.clone();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(name) => dir.push(name),
            // `..` (a cgroup namespace's view of a cgroup above it): stop at the root.
            Component::ParentDir => return mount.mount_point.clone(),
            _ => {}
        }
    }
    dir
}

/// `dir` and its ancestors up to the mount point, innermost first.
fn up_to_mount(dir: &Path, mount: &CgroupMount) -> Vec<PathBuf> {
    dir.ancestors()
        .take_while(|d| d.starts_with(&mount.mount_point))
        .map(Path::to_path_buf)
        .collect()
}

/// Of `dirs` (innermost first), the one with the smallest limit, the outermost on a tie.
fn tightest(dirs: &[PathBuf], limit: impl Fn(&Path) -> Option<u64>) -> Option<(PathBuf, u64)> {
    let mut best: Option<(PathBuf, u64)> = None;
    for d in dirs {
        if let Some(v) = limit(d) {
            if best.as_ref().is_none_or(|(_, b)| v <= *b) {
                best = Some((d.clone(), v));
            }
        }
    }
    best
}

/// Whether the task cgroups (`task_parent`, relative to the mount point) are under `bound`.
fn tasks_under(mount: &CgroupMount, bound: &Path, task_parent: &str) -> bool {
    mount.mount_point.join(task_parent).starts_with(bound)
}

fn cpu_bound(d: &Discovery<'_>) -> Option<CpuBound> {
    let mount = mount_for(d.mounts, "cpu")?;
    let own = dir_of(mount, own_path(d.proc_self_cgroup, mount)?);
    let dirs = up_to_mount(&own, mount);
    let v1 = matches!(mount.kind, MountKind::V1 { .. });
    let (dir, millis) = tightest(&dirs, |dir| {
        if v1 {
            let quota = read_i64(&dir.join("cpu.cfs_quota_us"))?;
            let period = read_u64(&dir.join("cpu.cfs_period_us"))?;
            let quota = u64::try_from(quota).ok().filter(|q| *q > 0)?;
            (period > 0).then(|| quota.saturating_mul(1000) / period)
        } else {
            let text = std::fs::read_to_string(dir.join("cpu.max")).ok()?;
            let mut f = text.split_whitespace();
            let quota: u64 = f.next()?.parse().ok()?; // "max" does not parse: no limit
            let period: u64 = f.next().map_or(Some(100_000), |p| p.parse().ok())?;
            (period > 0).then(|| quota.saturating_mul(1000) / period)
        }
    })?;
    if millis >= u64::from(d.host_cpu_millis) {
        return None;
    }
    let millis = u32::try_from(millis).ok()?.max(1);
    // Where the CPU time of the bound and of task cgroups is counted.
    let counter_at = |rel: &Path| -> Option<CpuCounter> {
        if !v1 {
            return Some(CpuCounter::V2(mount.mount_point.join(rel).join("cpu.stat")));
        }
        let acct = if mount.has_v1("cpuacct") {
            mount
        } else {
            d.mounts.iter().find(|m| m.has_v1("cpuacct"))?
        };
        Some(CpuCounter::V1(
            acct.mount_point.join(rel).join("cpuacct.usage"),
        ))
    };
    let rel = dir.strip_prefix(&mount.mount_point).ok()?.to_path_buf();
    let mut counters = vec![counter_at(&rel)?];
    if !tasks_under(mount, &dir, d.task_parent) {
        counters.extend(counter_at(Path::new(d.task_parent)));
    }
    Some(CpuBound {
        dir,
        millis,
        counters,
    })
}

fn mem_bound(d: &Discovery<'_>) -> Option<MemBound> {
    let mount = mount_for(d.mounts, "memory")?;
    let own = dir_of(mount, own_path(d.proc_self_cgroup, mount)?);
    let dirs = up_to_mount(&own, mount);
    let v1 = matches!(mount.kind, MountKind::V1 { .. });
    let limit_file = if v1 {
        "memory.limit_in_bytes"
    } else {
        "memory.max"
    };
    let (dir, bytes) = tightest(&dirs, |dir| read_u64(&dir.join(limit_file)))?;
    if bytes >= d.host_memory_bytes {
        return None;
    }
    let counter_at = |dir: PathBuf| {
        if v1 {
            MemCounter {
                usage: dir.join("memory.usage_in_bytes"),
                stat: dir.join("memory.stat"),
                inactive_key: "total_inactive_file",
            }
        } else {
            MemCounter {
                usage: dir.join("memory.current"),
                stat: dir.join("memory.stat"),
                inactive_key: "inactive_file",
            }
        }
    };
    let mut counters = vec![counter_at(dir.clone())];
    if !tasks_under(mount, &dir, d.task_parent) {
        counters.push(counter_at(mount.mount_point.join(d.task_parent)));
    }
    Some(MemBound {
        dir,
        bytes,
        counters,
    })
}

fn read_u64(file: &Path) -> Option<u64> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn read_i64(file: &Path) -> Option<i64> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file such as `memory.stat` or `cpu.stat`.
fn stat_value(file: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests;
