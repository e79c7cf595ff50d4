//! Bounds and usage read from fake cgroup trees in a temporary dir.
#![allow(clippy::unwrap_used)]

use super::*;

const GIB: u64 = 1 << 30;

struct Tree {
    tmp: tempfile::TempDir,
}

impl Tree {
    fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Writes `text` to `rel` (relative to the tree), making dirs.
    fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn v1(&self, dir: &str, controllers: &[&str]) -> CgroupMount {
        CgroupMount {
            mount_point: self.path(dir),
            root: "/".into(),
            kind: MountKind::V1 {
                controllers: controllers.iter().map(|c| (*c).to_owned()).collect(),
            },
        }
    }

    fn v2(&self) -> CgroupMount {
        CgroupMount {
            mount_point: self.path("unified"),
            root: "/".into(),
            kind: MountKind::V2,
        }
    }
}

fn discover(mounts: &[CgroupMount], proc_self_cgroup: &str, task_parent: &str) -> CgroupBounds {
    CgroupBounds::discover(&Discovery {
        proc_self_cgroup,
        mounts,
        task_parent,
        host_cpu_millis: 2_000,
        host_memory_bytes: 8 * GIB,
    })
}

/// This build host's layout: cpu and cpuacct mounted apart (cgroup v1). The peer sits in
/// `bench/p0/peer`; the 0.5-core quota is on `bench/p0`, which also holds the task cgroups.
fn v1_split() -> (Tree, Vec<CgroupMount>) {
    let t = Tree::new();
    for (dir, quota) in [
        ("", "-1"),
        ("bench", "-1"),
        ("bench/p0", "50000"),
        ("bench/p0/peer", "-1"),
    ] {
        t.write(&format!("cpu/{dir}/cpu.cfs_quota_us"), quota);
        t.write(&format!("cpu/{dir}/cpu.cfs_period_us"), "100000");
        t.write(&format!("cpuacct/{dir}/cpuacct.usage"), "0");
    }
    // The host root reports an unlimited memory cgroup as a huge number.
    t.write("memory/memory.limit_in_bytes", "9223372036854771712");
    t.write("memory/bench/p0/memory.limit_in_bytes", &GIB.to_string());
    t.write(
        "memory/bench/p0/peer/memory.limit_in_bytes",
        &(2 * GIB).to_string(),
    );
    t.write(
        "memory/bench/p0/memory.usage_in_bytes",
        &(400 << 20).to_string(),
    );
    t.write(
        "memory/bench/p0/memory.stat",
        &format!("cache 1000\ntotal_inactive_file {}\nrss 5\n", 100 << 20),
    );
    let mounts = vec![
        t.v1("cpu", &["cpu"]),
        t.v1("cpuacct", &["cpuacct"]),
        t.v1("memory", &["memory"]),
    ];
    (t, mounts)
}

const V1_PROC: &str = "9:name=systemd:/\n4:memory:/bench/p0/peer\n2:cpuacct:/bench/p0/peer\n1:cpu:/bench/p0/peer\n0::/\n";

#[test]
fn v1_the_tightest_ancestor_binds_and_its_subtree_counts() {
    let (t, mounts) = v1_split();
    let bounds = discover(&mounts, V1_PROC, "bench/p0/tasks");
    let cpu = bounds.cpu.as_ref().unwrap();
    assert_eq!(cpu.dir, t.path("cpu/bench/p0"));
    assert_eq!(cpu.millis, 500);
    // Tasks are under the bound: its own counter covers them.
    assert_eq!(
        cpu.counters,
        [CpuCounter::V1(t.path("cpuacct/bench/p0/cpuacct.usage"))]
    );
    let mem = bounds.memory.as_ref().unwrap();
    assert_eq!(
        (mem.dir.clone(), mem.bytes),
        (t.path("memory/bench/p0"), GIB)
    );

    let mut s = CgroupSampler::new(bounds);
    // 0.4 core-seconds over one second against half a core: 800 ‰.
    t.write("cpuacct/bench/p0/cpuacct.usage", "400000000");
    assert_eq!(s.cpu_permille(Duration::from_secs(1)), Some(800));
    // The next sample counts from the last one, not from zero.
    t.write("cpuacct/bench/p0/cpuacct.usage", "450000000");
    assert_eq!(s.cpu_permille(Duration::from_millis(500)), Some(200));
    // 400 MiB in use, 100 MiB of it droppable cache, against 1 GiB.
    assert_eq!(s.mem_permille(), Some(292));
}

#[test]
fn task_cgroups_outside_the_bound_are_added() {
    let (t, mounts) = v1_split();
    t.write("cpuacct/omesh/cpuacct.usage", "1000");
    t.write(
        "memory/omesh/memory.usage_in_bytes",
        &(100 << 20).to_string(),
    );
    let bounds = discover(&mounts, V1_PROC, "omesh");
    let cpu = bounds.cpu.as_ref().unwrap();
    assert_eq!(cpu.counters.len(), 2, "{:?}", cpu.counters);
    let mut s = CgroupSampler::new(bounds);
    t.write("cpuacct/bench/p0/cpuacct.usage", "100000000");
    t.write("cpuacct/omesh/cpuacct.usage", "150001000");
    // 0.1 + 0.15 core-seconds against 0.5 core over a second.
    assert_eq!(s.cpu_permille(Duration::from_secs(1)), Some(500));
    // (300 + 100) MiB against 1 GiB.
    assert_eq!(s.mem_permille(), Some(390));
}

#[test]
fn a_counter_that_appears_or_restarts_counts_nothing_that_sample() {
    let (t, mounts) = v1_split();
    let mut s = CgroupSampler::new(discover(&mounts, V1_PROC, "omesh"));
    t.write("cpuacct/omesh/cpuacct.usage", "900000000");
    t.write("cpuacct/bench/p0/cpuacct.usage", "50000000");
    assert_eq!(s.cpu_permille(Duration::from_secs(1)), Some(100));
    t.write("cpuacct/omesh/cpuacct.usage", "1000");
    t.write("cpuacct/bench/p0/cpuacct.usage", "100000000");
    assert_eq!(s.cpu_permille(Duration::from_secs(1)), Some(100));
}

#[test]
fn no_quota_or_one_above_the_host_is_no_bound() {
    let (t, mounts) = v1_split();
    t.write("cpu/bench/p0/cpu.cfs_quota_us", "-1");
    t.write(
        "memory/bench/p0/memory.limit_in_bytes",
        &(16 * GIB).to_string(),
    );
    t.write(
        "memory/bench/p0/peer/memory.limit_in_bytes",
        &(8 * GIB).to_string(),
    );
    let bounds = discover(&mounts, V1_PROC, "omesh");
    assert_eq!(bounds, CgroupBounds::default());
    // Four cores' quota on a two-core host binds nothing either.
    t.write("cpu/bench/cpu.cfs_quota_us", "400000");
    assert!(discover(&mounts, V1_PROC, "omesh").cpu.is_none());
    let mut s = CgroupSampler::new(bounds);
    assert_eq!(s.cpu_permille(Duration::from_secs(1)), None);
    assert_eq!(s.mem_permille(), None);
}

#[test]
fn ties_go_to_the_outermost_cgroup() {
    let (t, mounts) = v1_split();
    t.write("cpu/bench/p0/peer/cpu.cfs_quota_us", "50000");
    let cpu = discover(&mounts, V1_PROC, "omesh").cpu.unwrap();
    assert_eq!(cpu.dir, t.path("cpu/bench/p0"));
    t.write("cpu/bench/p0/peer/cpu.cfs_quota_us", "25000");
    let cpu = discover(&mounts, V1_PROC, "omesh").cpu.unwrap();
    assert_eq!((cpu.dir, cpu.millis), (t.path("cpu/bench/p0/peer"), 250));
}

#[test]
fn joint_cpu_cpuacct_mount_counts_in_the_same_dir() {
    let t = Tree::new();
    t.write("cpu,cpuacct/svc.slice/cpu.cfs_quota_us", "150000");
    t.write("cpu,cpuacct/svc.slice/cpu.cfs_period_us", "100000");
    t.write("cpu,cpuacct/svc.slice/cpuacct.usage", "0");
    let mounts = vec![t.v1("cpu,cpuacct", &["cpuacct", "cpu"])];
    let bounds = discover(&mounts, "3:cpu,cpuacct:/svc.slice\n", "svc.slice/omesh");
    let cpu = bounds.cpu.unwrap();
    assert_eq!(cpu.millis, 1_500);
    assert_eq!(
        cpu.counters,
        [CpuCounter::V1(
            t.path("cpu,cpuacct/svc.slice/cpuacct.usage")
        )]
    );
}

#[test]
fn v2_cpu_max_cpu_stat_memory_max_and_current() {
    let t = Tree::new();
    t.write("unified/cpu.stat", "usage_usec 999999999\n");
    t.write("unified/bench/p0/cpu.max", "25000 50000\n");
    t.write("unified/bench/p0/cpu.stat", "usage_usec 0\nuser_usec 0\n");
    t.write("unified/bench/p0/peer/cpu.max", "max 100000\n");
    t.write("unified/bench/p0/memory.max", &format!("{}\n", 2 * GIB));
    t.write("unified/bench/p0/peer/memory.max", "max\n");
    t.write("unified/bench/p0/memory.current", &GIB.to_string());
    t.write(
        "unified/bench/p0/memory.stat",
        &format!("anon 1\ninactive_file {}\n", GIB / 2),
    );
    let mounts = vec![t.v2()];
    let bounds = discover(&mounts, "0::/bench/p0/peer\n", "bench/p0/tasks");
    let cpu = bounds.cpu.as_ref().unwrap();
    assert_eq!(
        (cpu.dir.clone(), cpu.millis),
        (t.path("unified/bench/p0"), 500)
    );
    let mut s = CgroupSampler::new(bounds);
    t.write(
        "unified/bench/p0/cpu.stat",
        "usage_usec 125000\nuser_usec 0\n",
    );
    assert_eq!(s.cpu_permille(Duration::from_millis(500)), Some(500));
    assert_eq!(s.mem_permille(), Some(250));
}

#[test]
fn a_container_sees_its_own_cgroup_as_the_mount_root() {
    // Docker without a cgroup namespace: /proc/self/cgroup names the host path, the mount
    // shows only the container's cgroup.
    let t = Tree::new();
    t.write("cpu/cpu.cfs_quota_us", "50000");
    t.write("cpu/cpu.cfs_period_us", "100000");
    t.write("cpu/cpuacct.usage", "0");
    let mut mount = t.v1("cpu", &["cpu", "cpuacct"]);
    mount.root = "/docker/abc".into();
    let cpu = discover(&[mount], "5:cpu,cpuacct:/docker/abc\n", "omesh")
        .cpu
        .unwrap();
    assert_eq!((cpu.dir, cpu.millis), (t.path("cpu"), 500));
    // `cgroup_parent` is relative to the mount point, so the task cgroups are made inside
    // the container's own cgroup: counted once, with it.
    assert_eq!(cpu.counters, [CpuCounter::V1(t.path("cpu/cpuacct.usage"))]);
}
