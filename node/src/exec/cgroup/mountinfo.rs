//! The cgroup mounts listed in `/proc/self/mountinfo` (format: proc(5)). Pure parsing: the
//! caller reads the file and decides which mount to use.

use std::path::PathBuf;

/// The v1 controllers this module knows; other super options of a v1 mount (`rw`, `xattr`,
/// `name=systemd`, `clone_children`, …) are not controllers we use.
const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];

/// One mounted cgroup file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupMount {
    /// Where it is mounted (octal escapes undone).
    pub(crate) mount_point: PathBuf,
    /// Which cgroup of the hierarchy is mounted there (`/` for the whole tree; in a
    /// container without a cgroup namespace, its own cgroup, e.g. `/docker/<id>`).
    pub(crate) root: String,
    /// Which kind of hierarchy it is.
    pub(crate) kind: MountKind,
}

/// A cgroup v1 hierarchy (named by its controllers) or the v2 unified one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MountKind {
    /// `cgroup`: the controllers bound to this hierarchy, of those in [`V1_CONTROLLERS`].
    V1 {
        /// E.g. `["cpu", "cpuacct"]` for a joint `cpu,cpuacct` mount.
        controllers: Vec<String>,
    },
    /// `cgroup2`: which controllers it offers is read from its `cgroup.controllers`.
    V2,
}

impl CgroupMount {
    /// Whether this is a v1 hierarchy with `controller` bound to it.
    pub(crate) fn has_v1(&self, controller: &str) -> bool {
        matches!(&self.kind, MountKind::V1 { controllers } if controllers.iter().any(|c| c == controller))
    }
}

/// The cgroup mounts of a mountinfo text, in its order. Lines that do not parse are skipped.
///
/// A line reads `id parent major:minor root mount_point options [optional…] - fstype source
/// super_options`; the optional fields end at the lone `-`.
pub(crate) fn parse(text: &str) -> Vec<CgroupMount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<CgroupMount> {
    let fields: Vec<&str> = line.split(' ').collect();
    let root = fields.get(3)?;
    let mount_point = fields.get(4)?;
    let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
    let (fstype, super_options) = (fields.get(sep + 1)?, fields.get(sep + 3)?);
    let kind = match *fstype {
        "cgroup2" => MountKind::V2,
        "cgroup" => MountKind::V1 {
            controllers: super_options
                .split(',')
                .filter(|o| V1_CONTROLLERS.contains(o))
                .map(str::to_owned)
                .collect(),
        },
        _ => return None,
    };
    Some(CgroupMount {
        mount_point: PathBuf::from(unescape(mount_point)),
        root: unescape(root),
        kind,
    })
}

/// Undoes the kernel's octal escapes of space, tab, newline and backslash (`\040` …).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                let v = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mountinfo texts of real hosts, shared with the hierarchy tests.
#[cfg(test)]
pub(super) mod fixtures {
    /// This build machine: cgroup v1 hierarchies plus a `cgroup2` mount at
    /// /sys/fs/cgroup/unified whose `cgroup.controllers` is empty (hybrid mode).
    pub(in crate::exec::cgroup) const HYBRID: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
23 1 0:22 / /sys rw,nosuid,nodev,noexec,relatime - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// A systemd host on cgroup v2 only (Debian 12, Ubuntu 22.04+).
    pub(in crate::exec::cgroup) const UNIFIED: &str = "\
21 26 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
30 21 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::fixtures::{HYBRID, UNIFIED};
    use super::*;

    /// An older systemd host (CentOS 7 style): joint `cpu,cpuacct` and `net_cls,net_prio`
    /// hierarchies, optional fields before the separator, a mount point with a space.
    const JOINT: &str = "\
25 18 0:21 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
26 25 0:22 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup rw,xattr,release_agent=/usr/lib/systemd/systemd-cgroups-agent,name=systemd
29 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:12 master:3 - cgroup cgroup rw,cpuacct,cpu
30 25 0:26 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,net_prio,net_cls
31 25 0:27 / /sys/fs/cgroup/my\\040memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
32 25 0:28 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,pids
";

    fn v1(controllers: &[&str]) -> MountKind {
        MountKind::V1 {
            controllers: controllers.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    #[test]
    fn hybrid_lists_v1_hierarchies_and_the_unified_mount() {
        let mounts = parse(HYBRID);
        assert_eq!(mounts.len(), 10, "tmpfs, proc and sysfs are not cgroups");
        let cpu = mounts.iter().find(|m| m.has_v1("cpu")).unwrap();
        assert_eq!(cpu.mount_point, PathBuf::from("/sys/fs/cgroup/cpu"));
        assert!(!cpu.has_v1("cpuacct"));
        let unified: Vec<_> = mounts.iter().filter(|m| m.kind == MountKind::V2).collect();
        assert_eq!(unified.len(), 1);
        assert_eq!(
            unified[0].mount_point,
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        let systemd = mounts
            .iter()
            .find(|m| m.mount_point.ends_with("systemd"))
            .unwrap();
        assert_eq!(systemd.kind, v1(&[]), "name=systemd is no controller");
    }

    #[test]
    fn unified_host_has_one_v2_mount() {
        let mounts = parse(UNIFIED);
        assert_eq!(
            mounts,
            vec![CgroupMount {
                mount_point: "/sys/fs/cgroup".into(),
                root: "/".into(),
                kind: MountKind::V2
            }]
        );
    }

    #[test]
    fn joint_hierarchies_optional_fields_and_escapes() {
        let mounts = parse(JOINT);
        let cpu = mounts.iter().find(|m| m.has_v1("cpu")).unwrap();
        assert_eq!(cpu.mount_point, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(cpu.kind, v1(&["cpuacct", "cpu"]));
        let memory = mounts.iter().find(|m| m.has_v1("memory")).unwrap();
        assert_eq!(
            memory.mount_point,
            PathBuf::from("/sys/fs/cgroup/my memory")
        );
        assert!(mounts.iter().all(|m| !m.has_v1("freezer")));
        assert!(mounts.iter().all(|m| m.kind != MountKind::V2));
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(parse("").is_empty());
        assert!(parse("1 2 3\nnot a mountinfo line at all\n- - -\n").is_empty());
        assert!(
            parse("41 31 0:38 / /x rw - cgroup2").is_empty(),
            "no source field"
        );
    }

    #[test]
    fn unescape_handles_every_kernel_escape_and_leaves_the_rest() {
        assert_eq!(unescape(r"a\040b\011c\012d\134e"), "a b\tc\nd\\e");
        assert_eq!(unescape(r"\04"), r"\04");
        assert_eq!(unescape(r"x\9999"), r"x\9999");
        assert_eq!(unescape(r"\777"), "?", "above a byte");
    }
}
