//! This peer's load: CPU and memory in use against what it may use, smoothed with an EWMA.
//!
//! Under a cgroup limit (a container's `--cpus`, a slice's quota, a memory limit) the figures
//! are the bound cgroup's usage against that limit, and the capacity the peer offers is the
//! limit (see [`cgroup`] for whose usage counts). Otherwise they are the host's (sysinfo).

pub mod cgroup;

use std::time::Instant;

use omesh_protocol::{Capacity, LoadSample};
use sysinfo::{MemoryRefreshKind, RefreshKind, System};

use self::cgroup::{CgroupBounds, CgroupSampler};

/// Weight of a new sample in the moving average.
const ALPHA: f64 = 0.3;

/// Samples and smooths this peer's load.
#[derive(Debug)]
pub struct LoadSampler {
    sys: System,
    cgroup: CgroupSampler,
    last_at: Instant,
    cpu: Option<f64>,
    mem: Option<f64>,
    fake_cpu_percent: Option<u8>,
}

impl LoadSampler {
    /// A sampler of the host alone; `fake_cpu_percent` pins the CPU reading (for tests and
    /// demos).
    pub fn new(fake_cpu_percent: Option<u8>) -> Self {
        Self::with_bounds(fake_cpu_percent, |_| CgroupBounds::default())
    }

    /// A sampler that measures against this process's cgroup limits, where it has any;
    /// `task_parent` is where its task cgroups go (`cgroup_parent`).
    pub fn for_this_process(fake_cpu_percent: Option<u8>, task_parent: &str) -> Self {
        Self::with_bounds(fake_cpu_percent, |sys| {
            CgroupBounds::of_this_process(task_parent, host_cpu_millis(sys), sys.total_memory())
        })
    }

    fn with_bounds(
        fake_cpu_percent: Option<u8>,
        bounds: impl FnOnce(&System) -> CgroupBounds,
    ) -> Self {
        let sys = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(sysinfo::CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        let cgroup = CgroupSampler::new(bounds(&sys));
        Self {
            sys,
            cgroup,
            last_at: Instant::now(),
            cpu: None,
            mem: None,
            fake_cpu_percent,
        }
    }

    /// What load is measured against, for the log.
    pub fn describe(&self) -> String {
        self.cgroup.bounds().describe()
    }

    /// What this peer offers: its cgroup limits where it has them, else all cores and all
    /// memory.
    pub fn capacity(&self) -> Capacity {
        let bounds = self.cgroup.bounds();
        Capacity {
            cpu_millis: bounds
                .cpu
                .as_ref()
                .map_or_else(|| host_cpu_millis(&self.sys), |b| b.millis),
            memory_bytes: bounds
                .memory
                .as_ref()
                .map_or_else(|| self.sys.total_memory(), |b| b.bytes),
        }
    }

    /// Takes a sample and returns the smoothed load.
    pub fn sample(&mut self) -> LoadSample {
        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory();
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_at);
        self.last_at = now;
        let measured_cpu = self.cgroup.cpu_permille(elapsed).map_or_else(
            || f64::from(self.sys.global_cpu_usage()),
            |p| f64::from(p) / 10.0,
        );
        let mem = self.cgroup.mem_permille().map_or_else(
            || {
                let total = self.sys.total_memory().max(1) as f64;
                100.0 * self.sys.used_memory() as f64 / total
            },
            |p| f64::from(p) / 10.0,
        );
        let ewma = |old: Option<f64>, new: f64| old.map_or(new, |o| o + ALPHA * (new - o));
        self.cpu = Some(match self.fake_cpu_percent {
            Some(p) => f64::from(p),
            None => ewma(self.cpu, measured_cpu.min(100.0)),
        });
        self.mem = Some(ewma(self.mem, mem.min(100.0)));
        let permille = |p: Option<f64>| (p.unwrap_or(0.0) * 10.0).clamp(0.0, 1000.0) as u16;
        LoadSample {
            cpu_permille: permille(self.cpu),
            mem_permille: permille(self.mem),
        }
    }
}

fn host_cpu_millis(sys: &System) -> u32 {
    u32::try_from(sys.cpus().len().max(1))
        .unwrap_or(1)
        .saturating_mul(1000)
}
