//! The few `/proc` readings the guard, its clean-up, the cgroup kill and the benches need,
//! in one place: which processes exist, and a process's state, parent and group from
//! `/proc/<pid>/stat`.

use rustix::process::Pid;

/// Every process on the host.
pub fn processes() -> impl Iterator<Item = Pid> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter_map(Pid::from_raw)
}

/// The fields of `/proc/<pid>/stat` after the command name, which sits in parentheses and
/// may itself hold spaces and parentheses: `[state, ppid, pgrp, …]` (field 3 onwards of
/// proc(5)). `None` if the process is gone.
pub fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// A process's state letter, parent and process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `D`, `Z` (zombie), `X` (dead), …
    pub state: char,
    /// Its parent.
    pub ppid: i32,
    /// Its process group.
    pub pgrp: i32,
}

/// State, parent and group of `pid`; `None` if it is gone.
pub fn stat(pid: u32) -> Option<Stat> {
    let f = stat_fields(pid)?;
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
    })
}

impl Stat {
    /// A zombie or dead process runs nothing.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let s = stat(me).unwrap();
        assert!(!s.is_dead());
        assert_eq!(
            s.ppid,
            rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get())
        );
        assert_eq!(s.pgrp, rustix::process::getpgrp().as_raw_nonzero().get());
        assert!(processes().any(|p| p.as_raw_nonzero().get().unsigned_abs() == me));
    }
}
