//! Black-box tests of the `omesh` binary: run it as an operator would and read what it prints.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

fn omesh(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_omesh"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn assert_public_key_line(text: &str) {
    let line = text.trim_end();
    assert_eq!(
        line.len(),
        64,
        "expected one 64-hex public key, got {text:?}"
    );
    assert!(line.bytes().all(|b| b.is_ascii_hexdigit()), "{text:?}");
}

#[test]
fn version_prints_name_and_crate_version() {
    let dir = tempfile::tempdir().unwrap();
    let out = omesh(dir.path(), &["--version"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!("omesh {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn keygen_writes_a_private_key_and_shows_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("submitter.key");
    let key_arg = key.to_str().unwrap();

    let out = omesh(dir.path(), &["keygen", "--out", key_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let public = stdout(&out);
    assert_public_key_line(&public);

    let contents = std::fs::read_to_string(&key).unwrap();
    assert_eq!(contents.trim_end().len(), 64);
    assert_ne!(
        contents.trim_end(),
        public.trim_end(),
        "file holds the secret"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let shown = omesh(dir.path(), &["keygen", "--show", key_arg]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert_eq!(stdout(&shown), public);
}

#[test]
fn keygen_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("submitter.key");
    let key_arg = key.to_str().unwrap();

    let first = omesh(dir.path(), &["keygen", "--out", key_arg]);
    assert!(first.status.success(), "{}", stderr(&first));
    let before = std::fs::read(&key).unwrap();

    let again = omesh(dir.path(), &["keygen", "--out", key_arg]);
    assert!(!again.status.success());
    let err = stderr(&again);
    assert!(err.contains(key_arg), "error must name the file: {err}");
    assert!(
        err.contains("--force"),
        "error must say how to proceed: {err}"
    );
    assert!(stdout(&again).is_empty());
    assert_eq!(
        std::fs::read(&key).unwrap(),
        before,
        "file must be unchanged"
    );

    let forced = omesh(dir.path(), &["keygen", "--out", key_arg, "--force"]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    assert_public_key_line(&stdout(&forced));
    assert_ne!(stdout(&forced), stdout(&first), "a new key was made");
    assert_ne!(std::fs::read(&key).unwrap(), before);
}

#[test]
fn keygen_without_out_writes_the_default_file_in_the_current_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = omesh(dir.path(), &["keygen"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = omesh(dir.path(), &["keygen", "--show", "omesh-submitter.key"]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert_eq!(stdout(&shown), stdout(&out));
}

#[test]
fn keygen_show_of_a_malformed_file_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("broken.key");
    std::fs::write(&key, "this is not a key\n").unwrap();
    let out = omesh(dir.path(), &["keygen", "--show", key.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(key.to_str().unwrap()), "{err}");
    assert!(err.contains("malformed"), "{err}");
    assert!(
        !err.contains("this is not a key"),
        "must not echo the secret file: {err}"
    );
}

#[test]
fn keygen_show_conflicts_with_out() {
    let dir = tempfile::tempdir().unwrap();
    let out = omesh(dir.path(), &["keygen", "--show", "a.key", "--out", "b.key"]);
    assert!(!out.status.success());
    assert!(!dir.path().join("b.key").exists());
}

#[test]
fn admit_signs_a_certificate_for_a_peer_id_a_node_id_or_a_data_dir() {
    use omesh_protocol::{AdmissionCert, Revocation, Wire};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = omesh(d, &["keygen", "--out", "operator.key"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut op = [0u8; 32];
    hex::decode_to_slice(stdout(&out).trim(), &mut op).unwrap();
    let keys = std::collections::BTreeSet::from([op]);
    let now = omesh::peer::Clock::new().now();

    let peer_key = libp2p::identity::Keypair::generate_ed25519();
    let peer = peer_key.public().to_peer_id();
    let node = omesh::peer::net::node_id_of(&peer).unwrap();
    for (name, id) in [
        ("by-peer.cert", peer.to_string()),
        ("by-node.cert", node.to_hex()),
    ] {
        let out = omesh(
            d,
            &[
                "admit",
                "--key",
                "operator.key",
                &id,
                "--tag",
                "edge",
                "--expires",
                "90d",
                "--out",
                name,
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let cert = AdmissionCert::from_wire(&std::fs::read(d.join(name)).unwrap()).unwrap();
        cert.verify(&node, &keys, now).unwrap();
        assert!(cert.tags.contains("edge"));
        let days = (cert.not_after_ms - cert.issued_ms) / 86_400_000;
        assert_eq!(days, 90);
    }

    // A data dir: its identity is created, the certificate goes next to it.
    let out = omesh(
        d,
        &["admit", "--key", "operator.key", "--data-dir", "node1"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let cert =
        AdmissionCert::from_wire(&std::fs::read(d.join("node1/admission.cert")).unwrap()).unwrap();
    let key = omesh::datadir::DataDir::open(&d.join("node1"))
        .unwrap()
        .identity()
        .unwrap();
    let node1 = omesh::peer::net::node_id_of_key(&key).unwrap();
    cert.verify(&node1, &keys, now).unwrap();

    // A bad id is named.
    let out = omesh(d, &["admit", "--key", "operator.key", "banana"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("banana"), "{}", stderr(&out));

    let out = omesh(
        d,
        &[
            "revoke",
            "--key",
            "operator.key",
            &peer.to_string(),
            "--out",
            "r.bin",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let r = Revocation::from_wire(&std::fs::read(d.join("r.bin")).unwrap()).unwrap();
    assert_eq!(r.node, node);
    assert!(r.holds(&keys));
    assert_eq!(stdout(&out).trim(), hex::encode(r.to_wire().unwrap()));
}
