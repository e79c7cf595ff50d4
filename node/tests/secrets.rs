//! A peer's secrets stay its own: the API token given in the environment is used and is not in
//! the peer's command line, the peer is not dumpable (so other processes of its user cannot
//! read its /proc/PID/environ or memory), and its data directory, identity key, certificate
//! and task logs are readable by their owner only.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{mesh, wait_until, Submitter};

const TOKEN: &str = "env-token-7f3a9c";

/// Kills the peer (by its pid, which this test started) when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// The command line of process `pid`, arguments separated by spaces.
fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        String::from_utf8_lossy(&raw)
            .replace('\0', " ")
            .trim_end()
            .to_owned(),
    )
}

/// Every live process below `ancestor` (children, their children, ...).
fn descendants(ancestor: u32) -> Vec<u32> {
    let mut parent_of = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.insert(pid, ppid);
        }
    }
    let below = |mut pid: u32| {
        while let Some(&parent) = parent_of.get(&pid) {
            if parent == ancestor {
                return true;
            }
            pid = parent;
        }
        false
    };
    parent_of.keys().copied().filter(|p| below(*p)).collect()
}

/// GET `url` with an optional bearer token; the status.
async fn status_of(url: &str, token: Option<&str>) -> Option<u16> {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    Some(req.send().await.ok()?.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_from_the_environment_stays_out_of_argv_and_the_peer_is_not_dumpable() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let data = root.path().join("data");
    // A non-dumpable process's /proc/PID files belong to root. That only tells something when
    // the peer runs as another user than root: as root, this test runs the peer as nobody.
    let setpriv = Path::new("/usr/bin/setpriv");
    let as_nobody = uid() == 0 && setpriv.is_file();
    if as_nobody {
        std::fs::create_dir(&data).unwrap();
        std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
        // Let nobody reach it (the temp dir is 0700 root).
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let api_port = common::free_port();
    let quic_port = omesh::devtools::localmesh::free_quic_port().unwrap();
    let mut cmd = if as_nobody {
        let mut c = Command::new(setpriv);
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            common::bin(),
        ]);
        c
    } else {
        Command::new(common::bin())
    };
    let log = std::fs::File::create(root.path().join("peer.log")).unwrap();
    cmd.args(["up", "--data-dir"])
        .arg(&data)
        .args([
            "--listen",
            &format!("/ip4/127.0.0.1/udp/{quic_port}/quic-v1"),
            "--api-listen",
            &format!("127.0.0.1:{api_port}"),
            "--alone",
            "true",
            "--executor",
            "process",
            // Tasks here ask for no limits; nobody has no cgroups to set them with anyway.
            "--process-limits",
            "best-effort",
            "--fake-cpu-percent",
            "10",
        ])
        .args(sub.flags_without_token())
        .env_remove("OMESH_CONFIG")
        .env_remove("OMESH_API_TOKEN_FILE")
        .env("OMESH_API_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let peer = Running(cmd.spawn().unwrap());
    let pid = peer.0.id();
    let status_url = format!("http://127.0.0.1:{api_port}/api/v1/status");
    let up = wait_until(Duration::from_secs(30), || async {
        status_of(&status_url, None).await == Some(200)
    })
    .await;
    assert!(
        up,
        "the peer did not start:\n{}",
        std::fs::read_to_string(root.path().join("peer.log")).unwrap_or_default()
    );

    // The token came from the environment: the guarded logs endpoint takes it (404: no such
    // task) and refuses a request without it (401).
    let logs_url = format!(
        "http://127.0.0.1:{api_port}/api/v1/tasks/{}/logs",
        "0".repeat(64)
    );
    assert_eq!(status_of(&logs_url, Some(TOKEN)).await, Some(404));
    assert_eq!(status_of(&logs_url, None).await, Some(401));

    // It is not in the command line, which every local user can read.
    let argv = cmdline(pid).unwrap();
    assert!(argv.contains(" up "), "not the peer's cmdline: {argv}");
    assert!(!argv.contains(TOKEN), "the token is in argv: {argv}");

    // Nothing the peer starts for a task (its guard, the task) carries the token.
    let spec = sub.spec(&["sleep", "30"], |s| {
        s.cpu_millis = 0;
        s.memory_bytes = 0;
    });
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{api_port}/api/v1/tasks"))
        .bearer_auth(TOKEN)
        .json(&omesh::api::SubmitBody::from_signed(&spec))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201, "{:?}", resp.text().await);
    let mut started = Vec::new();
    let sleeping = wait_until(Duration::from_secs(60), || {
        started = descendants(pid);
        let found = started
            .iter()
            .any(|p| cmdline(*p).is_some_and(|c| c.starts_with("sleep 30")));
        async move { found }
    })
    .await;
    assert!(
        sleeping,
        "the task never ran under the peer: {:?}\n{}",
        started.iter().map(|p| (p, cmdline(*p))).collect::<Vec<_>>(),
        std::fs::read_to_string(root.path().join("peer.log")).unwrap_or_default()
    );
    for child in &started {
        // Read as root (this test) or as the same user; a process gone meanwhile is skipped.
        let Ok(environ) = std::fs::read(format!("/proc/{child}/environ")) else {
            continue;
        };
        assert!(
            !String::from_utf8_lossy(&environ).contains(TOKEN),
            "process {child} ({:?}) started by the peer has the token in its environment",
            cmdline(*child)
        );
    }

    // The peer made itself non-dumpable at start: its /proc files now belong to root, so
    // other processes of its own user cannot read its environ (the token) or memory.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peer_uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no Uid in /proc/{pid}/status:\n{status}"));
    if peer_uid == 0 {
        eprintln!(
            "NOTE: the peer runs as root (no setpriv to run it as nobody): its /proc \
             ownership cannot show whether it is dumpable; that check is not made"
        );
        return;
    }
    for file in ["environ", "mem"] {
        let owner = std::fs::metadata(format!("/proc/{pid}/{file}"))
            .unwrap()
            .uid();
        assert_eq!(
            owner, 0,
            "/proc/{pid}/{file} belongs to uid {owner}: the peer (uid {peer_uid}) is dumpable"
        );
    }
    drop(peer);
}

/// The mode bits of `path`.
fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_and_task_logs_are_private() {
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    // The host's real load is not this test's subject: a busy CI host over the default
    // threshold would take no work.
    let mut flags = sub.flags();
    flags.extend(["--fake-cpu-percent".into(), "10".into()]);
    let nodes = mesh(root.path(), 1, |_| flags.clone()).await;
    let n = &nodes[0];
    let spec = sub.spec(&["sh", "-c", "echo secret-output"], |_| {});
    let id = sub.submit(n, &spec).await;
    let done = wait_until(Duration::from_secs(60), || async {
        n.task(&id).await.is_some_and(|t| t.state == "succeeded")
    })
    .await;
    assert!(done, "task did not succeed: {:#?}", n.task(&id).await);
    let data = n.dir.join("data");
    assert_eq!(mode(&data), 0o700, "data dir");
    assert_eq!(mode(&data.join("identity.key")), 0o600, "identity key");
    assert_eq!(mode(&data.join("incarnation")), 0o600, "incarnation");
    assert_eq!(mode(&data.join("admission.cert")), 0o600, "admission cert");
    let logs = data.join("logs");
    assert_eq!(mode(&logs), 0o700, "log dir");
    let log = logs.join(format!("{id}-1.log"));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "secret-output\n");
    assert_eq!(mode(&log), 0o600, "task log");
    assert_eq!(mode(&n.dir.join("omesh.log")), 0o600, "the peer's own log");
}
