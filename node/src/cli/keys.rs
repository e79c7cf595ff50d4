//! Submitter key files: an ed25519 secret key stored as 64 hex characters, mode 0600.
//!
//! A submitter signs task specs with this key; the mesh runs a task only if the public half
//! is in `authorized_submitters`. The file holds the 32-byte secret as lowercase hex and a
//! newline, nothing else, so it can be inspected and backed up with ordinary tools.
//!
//! Writes are atomic: the key goes to a temporary file in the same directory (created with
//! mode 0600) and is renamed into place, so a crash never leaves a half-written key and an
//! existing file is replaced, or refused, whole. Errors name the file but never echo its
//! contents, which are secret; the I/O cause, if any, is the error's `source()`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, SECRET_KEY_LENGTH};
use rand::rngs::OsRng;
use zeroize::Zeroizing;

/// The file name `omesh keygen` writes to when no `--out` is given.
pub const DEFAULT_KEY_FILE: &str = "omesh-submitter.key";

/// Key files are a line of hex; anything much longer is not a key file, so reads stop here
/// instead of loading whatever the path points at.
const MAX_KEY_FILE_BYTES: u64 = 1024;

/// Why a key file could not be written or read. A failed write leaves any existing file as it was.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The target exists and replacing it was not asked for; nothing was written.
    #[error("key file {} already exists", .path.display())]
    Exists {
        /// The file that exists.
        path: PathBuf,
    },
    /// Writing failed; any existing file at the path is unchanged.
    #[error("cannot write key file {}", .path.display())]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file could not be opened or read.
    #[error("cannot read key file {}", .path.display())]
    Read {
        /// The file being read.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file was read but does not hold a key.
    #[error("key file {} is malformed: {reason}", .path.display())]
    Malformed {
        /// The file being read.
        path: PathBuf,
        /// What was wrong (never the contents themselves).
        reason: &'static str,
    },
}

/// Whether writing a key may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// Refuse with [`KeyFileError::Exists`] if the file exists.
    Refuse,
    /// Atomically replace an existing file.
    Replace,
}

/// A new submitter key from the operating system's random source.
pub fn generate() -> SigningKey {
    SigningKey::generate(&mut OsRng)
}

/// The public half of `key` as 64 lowercase hex characters: the form that goes into
/// `authorized_submitters`.
pub fn public_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().as_bytes())
}

/// Writes `key` to `path` as hex with mode 0600, atomically (temporary file, then rename).
pub fn write_key_file(
    path: &Path,
    key: &SigningKey,
    overwrite: Overwrite,
) -> Result<(), KeyFileError> {
    let write_err = |source| KeyFileError::Write {
        path: path.to_owned(),
        source,
    };
    // Checked up front for a clear error before any file is created; the no-clobber rename
    // below still refuses if the file appears in between.
    if overwrite == Overwrite::Refuse && path.symlink_metadata().is_ok() {
        return Err(KeyFileError::Exists {
            path: path.to_owned(),
        });
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let secret = Zeroizing::new(key.to_bytes());
    let mut text = Zeroizing::new([b'\n'; 2 * SECRET_KEY_LENGTH + 1]);
    hex::encode_to_slice(secret.as_slice(), &mut text[..2 * SECRET_KEY_LENGTH])
        .map_err(|e| write_err(io::Error::other(e)))?;

    // tempfile creates the file with mode 0600 on Unix; it is removed if we fail before persisting.
    let mut tmp = tempfile::Builder::new()
        .prefix(".omesh-key-")
        .tempfile_in(dir)
        .map_err(write_err)?;
    restrict_permissions(tmp.as_file()).map_err(write_err)?;
    tmp.write_all(text.as_slice()).map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;

    let persisted = match overwrite {
        Overwrite::Replace => tmp.persist(path),
        Overwrite::Refuse => tmp.persist_noclobber(path),
    };
    match persisted {
        Ok(_) => Ok(()),
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => Err(KeyFileError::Exists {
            path: path.to_owned(),
        }),
        Err(e) => Err(write_err(e.error)),
    }
}

/// Reads a key file written by [`write_key_file`]. Surrounding whitespace is ignored.
pub fn read_key_file(path: &Path) -> Result<SigningKey, KeyFileError> {
    let read_err = |source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    };
    let malformed = |reason| KeyFileError::Malformed {
        path: path.to_owned(),
        reason,
    };
    let file = File::open(path).map_err(read_err)?;
    let mut raw = Zeroizing::new(Vec::new());
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(read_err)?;
    if raw.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(malformed("too large to be a key file"));
    }
    let text = raw.trim_ascii();
    if text.is_empty() {
        return Err(malformed("empty file"));
    }
    if text.len() != 2 * SECRET_KEY_LENGTH {
        return Err(malformed(
            "expected 64 hex characters (a 32-byte ed25519 secret key)",
        ));
    }
    let mut secret = Zeroizing::new([0u8; SECRET_KEY_LENGTH]);
    hex::decode_to_slice(text, secret.as_mut_slice())
        .map_err(|_| malformed("expected only hex characters 0-9 and a-f"))?;
    Ok(SigningKey::from_bytes(&secret))
}

#[cfg(unix)]
fn restrict_permissions(file: &File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
}

#[cfg(not(unix))]
fn restrict_permissions(_file: &File) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn temp_dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn write_then_read_gives_the_same_key() {
        let dir = temp_dir();
        let path = dir.path().join("submitter.key");
        let key = generate();
        write_key_file(&path, &key, Overwrite::Refuse).unwrap();

        let back = read_key_file(&path).unwrap();
        assert_eq!(back.to_bytes(), key.to_bytes());
        assert_eq!(public_hex(&back), public_hex(&key));

        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65, "64 hex characters and a newline");
        assert!(text.trim_end().bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[cfg(unix)]
    #[test]
    fn key_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir();
        let path = dir.path().join("submitter.key");
        write_key_file(&path, &generate(), Overwrite::Refuse).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn refuses_to_overwrite_unless_asked() {
        let dir = temp_dir();
        let path = dir.path().join("submitter.key");
        let first = generate();
        write_key_file(&path, &first, Overwrite::Refuse).unwrap();

        let err = write_key_file(&path, &generate(), Overwrite::Refuse).unwrap_err();
        assert!(matches!(err, KeyFileError::Exists { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));
        assert_eq!(read_key_file(&path).unwrap().to_bytes(), first.to_bytes());

        let second = generate();
        write_key_file(&path, &second, Overwrite::Replace).unwrap();
        assert_eq!(read_key_file(&path).unwrap().to_bytes(), second.to_bytes());
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn replacing_a_readable_file_makes_it_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir();
        let path = dir.path().join("submitter.key");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_key_file(&path, &generate(), Overwrite::Replace).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn malformed_files_give_an_error_naming_the_file() {
        let dir = temp_dir();
        let path = dir.path().join("bad.key");
        let cases: [&[u8]; 6] = [
            b"",
            b"   \n",
            b"not a key at all",
            b"abcd",
            &[b'g'; 64],
            &[0xff; 64],
        ];
        for contents in cases {
            std::fs::write(&path, contents).unwrap();
            let err = read_key_file(&path).unwrap_err();
            assert!(matches!(err, KeyFileError::Malformed { .. }), "{err:?}");
            let shown = err.to_string();
            assert!(shown.contains(&path.display().to_string()), "{shown}");
            assert!(
                !shown.contains("not a key at all"),
                "must not echo contents: {shown}"
            );
        }
    }

    #[test]
    fn oversized_file_is_refused_without_reading_it_all() {
        let dir = temp_dir();
        let path = dir.path().join("big.key");
        std::fs::write(&path, vec![b'a'; 1 << 20]).unwrap();
        let err = read_key_file(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::Malformed { .. }), "{err:?}");
    }

    #[test]
    fn surrounding_whitespace_is_accepted() {
        let dir = temp_dir();
        let path = dir.path().join("spaced.key");
        let key = generate();
        std::fs::write(&path, format!("  {}\r\n\n", hex::encode(key.to_bytes()))).unwrap();
        assert_eq!(read_key_file(&path).unwrap().to_bytes(), key.to_bytes());
    }

    #[test]
    fn missing_file_gives_a_read_error_naming_it() {
        let dir = temp_dir();
        let path = dir.path().join("absent.key");
        let err = read_key_file(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn missing_directory_gives_a_write_error_naming_the_file() {
        let dir = temp_dir();
        let path = dir.path().join("no-such-dir").join("submitter.key");
        let err = write_key_file(&path, &generate(), Overwrite::Refuse).unwrap_err();
        assert!(matches!(err, KeyFileError::Write { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }
}
