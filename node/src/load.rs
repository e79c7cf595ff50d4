//! Host load: sysinfo samples of CPU and memory, smoothed with an EWMA.

use omesh_protocol::{Capacity, LoadSample};
use sysinfo::{MemoryRefreshKind, RefreshKind, System};

/// Weight of a new sample in the moving average.
const ALPHA: f64 = 0.3;

/// Samples and smooths host load.
#[derive(Debug)]
pub struct LoadSampler {
    sys: System,
    cpu: Option<f64>,
    mem: Option<f64>,
    fake_cpu_percent: Option<u8>,
}

impl LoadSampler {
    /// A sampler; `fake_cpu_percent` pins the CPU reading (for tests and demos).
    pub fn new(fake_cpu_percent: Option<u8>) -> Self {
        let sys = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(sysinfo::CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        Self {
            sys,
            cpu: None,
            mem: None,
            fake_cpu_percent,
        }
    }

    /// What the host offers: all cores and all memory.
    pub fn capacity(&self) -> Capacity {
        let cores = u32::try_from(self.sys.cpus().len().max(1)).unwrap_or(1);
        Capacity {
            cpu_millis: cores * 1000,
            memory_bytes: self.sys.total_memory(),
        }
    }

    /// Takes a sample and returns the smoothed load.
    pub fn sample(&mut self) -> LoadSample {
        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory();
        let cpu = match self.fake_cpu_percent {
            Some(p) => f64::from(p),
            None => f64::from(self.sys.global_cpu_usage()),
        };
        let total = self.sys.total_memory().max(1) as f64;
        let mem = 100.0 * self.sys.used_memory() as f64 / total;
        let ewma = |old: Option<f64>, new: f64| old.map_or(new, |o| o + ALPHA * (new - o));
        self.cpu = Some(if self.fake_cpu_percent.is_some() {
            cpu
        } else {
            ewma(self.cpu, cpu)
        });
        self.mem = Some(ewma(self.mem, mem));
        let permille = |p: Option<f64>| (p.unwrap_or(0.0) * 10.0).clamp(0.0, 1000.0) as u16;
        LoadSample {
            cpu_permille: permille(self.cpu),
            mem_permille: permille(self.mem),
        }
    }
}
