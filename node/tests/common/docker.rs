//! A Docker engine for tests: whether one answers, and a tiny image built here (no registry):
//! a static busybox with a few applet links, imported as `omesh-test/busybox:latest`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

// The image itself is built by the same code `omesh bench tasks` uses.
pub use omesh::devtools::bench_tasks::{image_id, TEST_IMAGE_TAG};

/// Whether tests must not skip for want of Docker (CI sets it).
pub fn docker_required() -> bool {
    std::env::var("OMESH_REQUIRE_DOCKER").as_deref() == Ok("1")
}

/// True when a Docker engine answers. Otherwise prints `SKIP <test>: <reason>` and returns
/// false, or panics when `OMESH_REQUIRE_DOCKER=1`.
pub fn docker_or_skip(test: &str) -> bool {
    static ENGINE: OnceLock<Result<(), String>> = OnceLock::new();
    match ENGINE.get_or_init(engine_answers) {
        Ok(()) => true,
        Err(reason) => skip(test, reason),
    }
}

/// Prints `SKIP <test>: <reason>` and returns false, or panics when `OMESH_REQUIRE_DOCKER=1`.
pub fn skip(test: &str, reason: &str) -> bool {
    assert!(
        !docker_required(),
        "{test}: OMESH_REQUIRE_DOCKER=1 but {reason}"
    );
    eprintln!("SKIP {test}: {reason}");
    false
}

fn engine_answers() -> Result<(), String> {
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("no docker CLI ({e})"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "no Docker engine answers: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The test image as a pinned reference, `omesh-test/busybox@sha256:<image id hex>`, built
/// on first use. `None` (with the reason printed) if it cannot be built.
pub fn test_image() -> Option<String> {
    static IMAGE: OnceLock<Result<String, String>> = OnceLock::new();
    match IMAGE.get_or_init(build_test_image) {
        Ok(reference) => Some(reference.clone()),
        Err(reason) => {
            eprintln!("test image {TEST_IMAGE_TAG} unavailable: {reason}");
            None
        }
    }
}

fn build_test_image() -> Result<String, String> {
    if image_id(TEST_IMAGE_TAG).is_none() {
        static_busybox()?;
    }
    omesh::devtools::bench_tasks::ensure_test_image()
}

/// A busybox on this host, installing Debian's `busybox-static` if there is
/// none and we may (root with apt-get).
fn static_busybox() -> Result<PathBuf, String> {
    let found = || {
        ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    };
    match found() {
        Some(p) => Ok(p),
        None => {
            install_busybox_static()?;
            found().ok_or_else(|| "busybox-static installed but no /bin/busybox".to_owned())
        }
    }
}

fn install_busybox_static() -> Result<(), String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let apt = Command::new("apt-get")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !(root && apt) {
        return Err("no /bin/busybox (install Debian's busybox-static)".into());
    }
    let install = || {
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "busybox-static",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install().is_ok() {
        return Ok(());
    }
    // The package lists may be missing or stale.
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    install()
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// IDs of all containers (running or not) carrying `label` (`key=value`).
pub fn containers_with_label(label: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--no-trunc", "--filter"])
        .arg(format!("label={label}"))
        .stdin(Stdio::null())
        .output()
        .expect("docker ps");
    assert!(
        out.status.success(),
        "docker ps failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Force-removes every container carrying `label` when dropped (a failed test leaves nothing).
pub struct RemoveOnDrop(pub String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        omesh::devtools::bench_tasks::remove_containers(&self.0);
    }
}
