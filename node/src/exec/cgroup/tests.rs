//! Hierarchy choice and control-file formats, on fake cgroup trees in temp dirs: the mount
//! table of a real host with its paths moved under a temp dir, and control files made by
//! hand (a temp dir does not conjure them up as cgroupfs does). Real cgroups are tested in
//! `node/tests/cgroup.rs`.
#![allow(clippy::unwrap_used)]

use std::fs;

use super::mountinfo::fixtures::{HYBRID, UNIFIED};
use super::mountinfo::{CgroupMount, MountKind};
use super::*;

/// `fixture` with `/sys/fs/cgroup` moved to `root`, and every cgroup mount point made.
fn fake_mounts(fixture: &str, root: &Path) -> Vec<CgroupMount> {
    let text = fixture.replace("/sys/fs/cgroup", &root.display().to_string());
    let mounts = mountinfo::parse(&text);
    for m in &mounts {
        fs::create_dir_all(&m.mount_point).unwrap();
    }
    mounts
}

fn limits() -> Limits {
    Limits {
        cpu_millis: 250,
        memory_bytes: 64 << 20,
        pids: 16,
    }
}

#[test]
fn hybrid_host_uses_v1_not_the_unified_mount_without_controllers() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mounts = fake_mounts(HYBRID, root);
    fs::write(root.join("unified/cgroup.controllers"), "\n").unwrap();
    let h = Hierarchy::detect_in(&mounts, "omesh/tasks").unwrap();
    assert_eq!(h.version(), 1);
    assert_eq!(
        h,
        Hierarchy::V1 {
            cpu: root.join("cpu"),
            cpuacct: Some(root.join("cpuacct")),
            memory: root.join("memory"),
            pids: root.join("pids"),
            freezer: Some(root.join("freezer")),
        }
    );
    for c in ["cpu", "cpuacct", "memory", "pids", "freezer"] {
        let parent = root.join(c).join("omesh/tasks");
        assert!(parent.is_dir(), "{c}: parent made");
        assert_eq!(
            fs::read_dir(&parent).unwrap().count(),
            0,
            "{c}: probe removed"
        );
    }
    assert!(
        !root.join("unified/omesh").exists(),
        "nothing made in the unified mount"
    );
    assert!(
        !root.join("blkio/omesh").exists(),
        "nor in hierarchies not used"
    );
}

#[test]
fn unavailable_names_the_missing_controller_and_why_not_v2() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let without_pids: String = HYBRID
        .lines()
        .filter(|l| !l.contains("pids"))
        .map(|l| format!("{l}\n"))
        .collect();
    let mounts = fake_mounts(&without_pids, root);
    fs::write(root.join("unified/cgroup.controllers"), "").unwrap();
    let err = Hierarchy::detect_in(&mounts, "omesh")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no cgroup v1 mount of pids"), "{err}");
    assert!(
        err.contains("unified/cgroup.controllers lacks the cpu, memory, pids controllers"),
        "{err}"
    );

    let err = Hierarchy::detect_in(&[], "omesh").unwrap_err().to_string();
    assert!(
        err.contains("v2: no cgroup2 mount") && err.contains("cpu, memory, pids"),
        "{err}"
    );
}

#[test]
fn unwritable_v1_controller_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mounts = fake_mounts(HYBRID, root);
    fs::write(root.join("unified/cgroup.controllers"), "").unwrap();
    // A file where the parent dir should be: create_dir_all fails even for root.
    fs::write(root.join("memory/omesh"), "").unwrap();
    let err = Hierarchy::detect_in(&mounts, "omesh")
        .unwrap_err()
        .to_string();
    assert!(err.contains("memory controller: cannot create"), "{err}");
    assert!(err.contains("memory/omesh"), "{err}");
}

#[test]
fn optional_v1_controllers_that_fail_are_left_out() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mounts = fake_mounts(HYBRID, root);
    fs::write(root.join("freezer/omesh"), "").unwrap();
    let Hierarchy::V1 {
        freezer, cpuacct, ..
    } = Hierarchy::detect_in(&mounts, "omesh").unwrap()
    else {
        panic!("v1 expected");
    };
    assert_eq!(freezer, None);
    assert!(cpuacct.is_some());
}

/// A v2 tree: root offering the controllers, `omesh` made beforehand with its control file.
fn fake_v2(root: &Path, enabled_at_root: &str) -> Vec<CgroupMount> {
    let mounts = fake_mounts(UNIFIED, root);
    fs::write(
        root.join("cgroup.controllers"),
        "cpuset cpu io memory hugetlb pids rdma misc\n",
    )
    .unwrap();
    fs::write(root.join("cgroup.subtree_control"), enabled_at_root).unwrap();
    fs::create_dir(root.join("omesh")).unwrap();
    fs::write(root.join("omesh/cgroup.subtree_control"), "").unwrap();
    mounts
}

#[test]
fn unified_host_enables_controllers_from_the_root_down_to_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mounts = fake_v2(root, "cpu memory\n");
    let h = Hierarchy::detect_in(&mounts, "omesh").unwrap();
    assert_eq!(
        h,
        Hierarchy::V2 {
            root: root.to_owned()
        }
    );
    assert_eq!(h.version(), 2);
    let control =
        |d: &str| fs::read_to_string(root.join(d).join("cgroup.subtree_control")).unwrap();
    assert_eq!(control(""), "+pids", "only what is not enabled yet");
    assert_eq!(control("omesh"), "+cpu +memory +pids");
    assert_eq!(
        fs::read_dir(root.join("omesh")).unwrap().count(),
        1,
        "probe removed"
    );
}

#[test]
fn unified_mount_whose_subtree_control_cannot_be_written_falls_back_to_v1() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut mounts = fake_v2(&root.join("v2"), "");
    mounts.extend(fake_mounts(HYBRID, &root.join("v1")));
    fs::write(root.join("v1/unified/cgroup.controllers"), "").unwrap();
    fs::remove_file(root.join("v2/omesh/cgroup.subtree_control")).unwrap();
    let h = Hierarchy::detect_in(&mounts, "omesh").unwrap();
    assert_eq!(h.version(), 1);

    let v1_less: Vec<_> = mounts
        .into_iter()
        .filter(|m| m.kind == MountKind::V2)
        .collect();
    let err = Hierarchy::detect_in(&v1_less, "omesh")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("omesh/cgroup.subtree_control") && err.contains("+cpu +memory +pids"),
        "{err}"
    );
}

/// A task dir with the control files a kernel would make, holding `contents`.
fn fake_task_dir(dir: &Path, contents: &[(&str, &str)]) {
    fs::create_dir_all(dir).unwrap();
    for (file, text) in contents {
        fs::write(dir.join(file), text).unwrap();
    }
}

#[test]
fn v2_limits_and_readings() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("omesh/t1");
    fake_task_dir(
        &dir,
        &[
            ("cpu.max", "max 100000\n"),
            ("memory.max", "max\n"),
            ("memory.swap.max", "max\n"),
            ("pids.max", "max\n"),
            ("cgroup.procs", ""),
            ("cgroup.kill", ""),
            (
                "memory.events",
                "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\noom_group_kill 0\n",
            ),
            (
                "cpu.stat",
                "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n",
            ),
            ("pids.peak", "16\n"),
            ("memory.peak", "67108864\n"),
        ],
    );
    let cg = TaskCgroup {
        layout: Layout::V2 { dir: dir.clone() },
        dirs: vec![dir.clone()],
    };
    cg.write_limits(&limits()).unwrap();
    let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
    assert_eq!(read("cpu.max"), "25000 100000");
    assert_eq!(read("memory.max"), "67108864");
    assert_eq!(read("memory.swap.max"), "0");
    assert_eq!(read("pids.max"), "16");
    assert!(cg.oom_killed());
    assert_eq!(cg.cpu_usage_ns(), Some(2_500_000));
    assert_eq!(cg.pids_peak(), Some(16));
    assert_eq!(cg.memory_peak_bytes(), Some(64 << 20));
    assert!(cg.is_empty());
    assert_eq!(cg.kill_all(), 0);
    assert_eq!(read("cgroup.kill"), "", "an empty group is not killed");
    assert_eq!(
        cg.join_paths(),
        vec![CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).unwrap()]
    );

    fs::write(dir.join("memory.events"), "oom 0\noom_kill 0\n").unwrap();
    assert!(!cg.oom_killed());
    fs::remove_file(dir.join("memory.swap.max")).unwrap();
    cg.write_limits(&Limits {
        cpu_millis: 0,
        ..limits()
    })
    .unwrap();
    assert_eq!(read("cpu.max"), "1000 100000", "the smallest quota");
    assert!(
        !dir.join("memory.swap.max").exists(),
        "no swap file made where the kernel has none"
    );
}

#[test]
fn v1_limits_and_readings() {
    let tmp = tempfile::tempdir().unwrap();
    let at = |c: &str| tmp.path().join(c).join("omesh/t1");
    let layout = Layout::V1 {
        cpu: at("cpu,cpuacct"),
        cpuacct: Some(at("cpu,cpuacct")),
        memory: at("memory"),
        pids: at("pids"),
        freezer: None,
    };
    fake_task_dir(
        &at("cpu,cpuacct"),
        &[
            ("cpu.cfs_period_us", "100000\n"),
            ("cpu.cfs_quota_us", "-1\n"),
            ("cpuacct.usage", "123456789\n"),
        ],
    );
    fake_task_dir(
        &at("memory"),
        &[
            ("memory.limit_in_bytes", "9223372036854771712\n"),
            ("memory.memsw.limit_in_bytes", "9223372036854771712\n"),
            ("memory.swappiness", "60\n"),
            (
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
            ),
            ("memory.max_usage_in_bytes", "1000\n"),
            ("memory.failcnt", "3\n"),
        ],
    );
    fake_task_dir(&at("pids"), &[("pids.max", "max\n")]);
    assert_eq!(layout.dirs().len(), 3, "the joint cpu,cpuacct dir once");
    let cg = TaskCgroup {
        dirs: layout.dirs(),
        layout,
    };
    cg.write_limits(&limits()).unwrap();
    let read = |c: &str, f: &str| fs::read_to_string(at(c).join(f)).unwrap();
    assert_eq!(read("cpu,cpuacct", "cpu.cfs_period_us"), "100000");
    assert_eq!(read("cpu,cpuacct", "cpu.cfs_quota_us"), "25000");
    assert_eq!(read("memory", "memory.limit_in_bytes"), "67108864");
    assert_eq!(read("memory", "memory.memsw.limit_in_bytes"), "67108864");
    assert_eq!(read("memory", "memory.swappiness"), "0");
    assert_eq!(read("pids", "pids.max"), "16");
    assert_eq!(cg.cpu_usage_ns(), Some(123_456_789));
    assert_eq!(cg.pids_peak(), None, "kernels before pids.peak in v1");
    assert_eq!(cg.memory_peak_bytes(), Some(1000));
    assert!(
        !cg.oom_killed(),
        "oom_kill 0 wins over the failcnt fallback"
    );

    // A kernel without the oom_kill line: failcnt > 0 and the peak at the limit.
    fs::write(
        at("memory").join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\n",
    )
    .unwrap();
    assert!(!cg.oom_killed(), "peak below the limit");
    fs::write(at("memory").join("memory.max_usage_in_bytes"), "67108864\n").unwrap();
    assert!(cg.oom_killed());
    fs::write(at("memory").join("memory.failcnt"), "0\n").unwrap();
    assert!(!cg.oom_killed());
}

#[test]
fn open_and_list_see_half_made_cgroups() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mounts = fake_mounts(HYBRID, root);
    fs::write(root.join("unified/cgroup.controllers"), "").unwrap();
    let h = Hierarchy::detect_in(&mounts, "omesh").unwrap();
    fs::create_dir(root.join("memory/omesh/a")).unwrap();
    fs::create_dir(root.join("cpu/omesh/a")).unwrap();
    fs::create_dir(root.join("pids/omesh/b")).unwrap();
    fs::write(root.join("cpu/omesh/not-a-cgroup"), "").unwrap();
    assert_eq!(list(&h, "omesh"), vec!["a", "b"]);
    assert_eq!(list(&h, "elsewhere"), Vec::<String>::new());
    let a = TaskCgroup::open(&h, "omesh", "a").unwrap();
    assert_eq!(
        a.dirs,
        vec![root.join("memory/omesh/a"), root.join("cpu/omesh/a")]
    );
    assert_eq!(a.join_paths().len(), 2);
    assert!(a.is_empty());
    a.remove().unwrap();
    assert!(!root.join("memory/omesh/a").exists() && !root.join("cpu/omesh/a").exists());
    assert!(TaskCgroup::open(&h, "omesh", "a").is_none());
    assert!(TaskCgroup::open(&h, "omesh", "../omesh").is_none());
}

#[test]
fn parents_and_names_must_be_plain() {
    for good in ["omesh", "omesh/tasks", "a.b-c_d"] {
        assert!(check_parent(good).is_ok(), "{good}");
    }
    for bad in ["", "/omesh", "../x", "omesh/..", "./omesh", "om\0esh"] {
        assert!(check_parent(bad).is_err(), "{bad:?}");
    }
    assert!(check_name("task-1f2e.7").is_ok());
    for bad in ["", ".", "..", "a/b", "a\0"] {
        let err = check_name(bad).unwrap_err().to_string();
        assert!(err.contains("bad cgroup name"), "{err}");
    }
    let h = Hierarchy::V2 {
        root: "/nonexistent".into(),
    };
    assert!(matches!(
        TaskCgroup::create(&h, "omesh", "a/b", &limits()),
        Err(CgroupError::BadName { what: "name", .. })
    ));
}

#[test]
fn quota_is_a_tenth_of_a_millicore_per_period_with_a_floor() {
    let q = |cpu_millis| {
        Limits {
            cpu_millis,
            ..limits()
        }
        .cpu_quota_us()
    };
    assert_eq!(q(1000), 100_000, "one core");
    assert_eq!(q(200), 20_000);
    assert_eq!(q(2500), 250_000, "more than a core");
    assert_eq!(q(5), 1_000);
    assert_eq!(q(u32::MAX), u64::from(u32::MAX) * 100, "no overflow");
}
