//! Reading and writing cgroup control files, and the few formats they use: a single number
//! (`memory.peak`, `cpuacct.usage`), flat keyed lines (`memory.events`, `cpu.stat`,
//! `memory.oom_control`: `key value` per line) and pid lists (`cgroup.procs`).

use std::io::Write;
use std::path::Path;

use super::CgroupError;

/// Writes `value` to a control file that must exist, in one write(2): cgroupfs takes each
/// write as one command. The file is never created (a missing control file means the
/// controller is absent, which is an error here, not something to paper over).
pub(super) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| CgroupError::Write {
            path: path.to_owned(),
            value: value.to_owned(),
            source,
        })
}

/// Writes `value` if the control file exists (optional knobs: `memory.swap.max`, …).
pub(super) fn write_if_present(path: &Path, value: &str) -> Result<(), CgroupError> {
    if path.exists() {
        write(path, value)
    } else {
        Ok(())
    }
}

/// A control file's text, `None` if it cannot be read.
pub(super) fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// A file holding one number. `max` (no limit) reads as `None`.
pub(super) fn read_u64(path: &Path) -> Option<u64> {
    number(&read(path)?)
}

/// The number of the line `key N` in a flat keyed file.
pub(super) fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    keyed(&read(path)?, key)
}

/// The pids in a `cgroup.procs` file; empty if it cannot be read (a removed cgroup).
pub(super) fn read_pids(path: &Path) -> Vec<u32> {
    read(path).map(|t| pids(&t)).unwrap_or_default()
}

pub(super) fn number(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

pub(super) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.trim().split_once(' ')?;
        (k == key).then(|| number(v)).flatten()
    })
}

pub(super) fn pids(text: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The controllers named in a `cgroup.controllers` or `cgroup.subtree_control` text.
pub(super) fn controllers(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn numbers_and_max() {
        assert_eq!(number("67108864\n"), Some(67_108_864));
        assert_eq!(number("max\n"), None);
        assert_eq!(number(""), None);
    }

    #[test]
    fn keyed_v1_oom_control_and_v2_events_and_cpu_stat() {
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n";
        assert_eq!(keyed(oom_control, "oom_kill"), Some(1));
        assert_eq!(keyed(oom_control, "oom_kill_disable"), Some(0));
        let old_kernel = "oom_kill_disable 0\nunder_oom 0\n";
        assert_eq!(keyed(old_kernel, "oom_kill"), None);
        let events = "low 0\nhigh 0\nmax 52\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(keyed(events, "oom_kill"), Some(2));
        assert_eq!(keyed(events, "oom"), Some(3), "a key is matched whole");
        let cpu_stat = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n\
                        nr_periods 20\nnr_throttled 16\nthrottled_usec 1600000\n";
        assert_eq!(keyed(cpu_stat, "usage_usec"), Some(1_234_567));
        assert_eq!(keyed(cpu_stat, "usage"), None);
    }

    #[test]
    fn pid_lists_and_controller_lists() {
        assert_eq!(pids("11249\n11251\n"), vec![11249, 11251]);
        assert_eq!(pids(""), Vec::<u32>::new());
        assert_eq!(
            controllers("cpuset cpu io memory hugetlb pids rdma misc\n").len(),
            8
        );
        assert!(
            controllers("\n").is_empty(),
            "hybrid unified mount: no controllers"
        );
    }

    #[test]
    fn write_never_creates_a_control_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("pids.max");
        let err = write(&missing, "16").unwrap_err().to_string();
        assert!(err.contains("pids.max") && err.contains("\"16\""), "{err}");
        assert!(!missing.exists());
        write_if_present(&missing, "16").unwrap();
        assert!(!missing.exists());
        std::fs::write(&missing, "max\n").unwrap();
        write(&missing, "16").unwrap();
        assert_eq!(read_u64(&missing), Some(16));
    }
}
