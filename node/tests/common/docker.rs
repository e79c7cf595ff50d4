//! A Docker engine for tests: whether one answers, and a tiny image built here (no registry):
//! a static busybox with a few applet links, imported as `omesh-test/busybox:latest`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The tag of the test image.
pub const TEST_IMAGE_TAG: &str = "omesh-test/busybox:latest";
/// The applets linked into the image's `/bin`.
const APPLETS: &[&str] = &["sh", "echo", "sleep", "true", "false", "cat"];

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
    let id = match image_id(TEST_IMAGE_TAG) {
        Some(id) => id,
        None => {
            import_image()?;
            image_id(TEST_IMAGE_TAG)
                .ok_or_else(|| format!("{TEST_IMAGE_TAG} not found after docker import"))?
        }
    };
    let hex = id
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("unexpected image id {id:?}"))?;
    let name = TEST_IMAGE_TAG.split(':').next().unwrap_or(TEST_IMAGE_TAG);
    Ok(format!("{name}@sha256:{hex}"))
}

/// The local image ID (`sha256:<hex>`) of `reference`, if the engine has it.
pub fn image_id(reference: &str) -> Option<String> {
    let out = Command::new("docker")
        .args(["image", "inspect", "-f", "{{.Id}}", reference])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !id.is_empty()).then_some(id)
}

/// Builds the rootfs, tars it and `docker import`s it under [`TEST_IMAGE_TAG`].
fn import_image() -> Result<(), String> {
    let busybox = static_busybox()?;
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let root = dir.path().join("rootfs");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| format!("mkdir {}: {e}", bin.display()))?;
    std::fs::create_dir_all(root.join("tmp")).map_err(|e| format!("mkdir tmp: {e}"))?;
    std::fs::copy(&busybox, bin.join("busybox"))
        .map_err(|e| format!("copy {}: {e}", busybox.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(bin.join("busybox"), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod busybox: {e}"))?;
    }
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", bin.join(applet))
            .map_err(|e| format!("symlink {applet}: {e}"))?;
    }
    let tar = dir.path().join("rootfs.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg("."))?;
    run(Command::new("docker")
        .arg("import")
        .arg(&tar)
        .arg(TEST_IMAGE_TAG))
}

/// A statically linked busybox on this host, installing Debian's `busybox-static` if there is
/// none and we may (root with apt-get).
fn static_busybox() -> Result<PathBuf, String> {
    let found = || {
        ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    };
    let path = match found() {
        Some(p) => p,
        None => {
            install_busybox_static()?;
            found().ok_or("busybox-static installed but no /bin/busybox")?
        }
    };
    if is_dynamic_elf(&path)? {
        return Err(format!(
            "{} is dynamically linked; install Debian's busybox-static",
            path.display()
        ));
    }
    Ok(path)
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

/// Whether the ELF file at `path` asks for a dynamic loader (has a PT_INTERP header).
fn is_dynamic_elf(path: &Path) -> Result<bool, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let bad = || format!("{} is not an ELF file", path.display());
    if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(bad());
    }
    let little = bytes.get(5) == Some(&1);
    let uint = |at: usize, len: usize| -> Result<u64, String> {
        let b = bytes.get(at..at + len).ok_or_else(bad)?;
        let mut v = 0u64;
        for (i, byte) in b.iter().enumerate() {
            let shift = (if little { i } else { len - 1 - i }) * 8;
            v |= u64::from(*byte) << shift;
        }
        Ok(v)
    };
    let (phoff, phentsize, phnum) = if bytes.get(4) == Some(&2) {
        (uint(0x20, 8)?, uint(0x36, 2)?, uint(0x38, 2)?)
    } else {
        (uint(0x1c, 4)?, uint(0x2a, 2)?, uint(0x2c, 2)?)
    };
    for i in 0..phnum {
        let at = usize::try_from(phoff + i * phentsize).map_err(|_| bad())?;
        if uint(at, 4)? == 3 {
            return Ok(true);
        }
    }
    Ok(false)
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
        let ids = Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label={}", self.0))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
