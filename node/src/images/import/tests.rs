//! Import tests: both layouts, and bad archives that must change nothing.
#![allow(clippy::unwrap_used)]
use super::*;

/// A tar archive of `files`.
pub(crate) fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

pub(crate) fn config(layers: &[&[u8]]) -> Vec<u8> {
    let ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", Digest::of(l)))
        .collect();
    serde_json::json!({ "architecture": "amd64", "rootfs": { "type": "layers", "diff_ids": ids } })
        .to_string()
        .into_bytes()
}

/// A legacy `docker save` archive of one image.
pub(crate) fn legacy(layers: &[&[u8]]) -> Vec<u8> {
    let cfg = config(layers);
    let cfg_name = format!("{}.json", Digest::of(&cfg));
    let names: Vec<String> = (0..layers.len())
        .map(|i| format!("l{i}/layer.tar"))
        .collect();
    let manifest =
        serde_json::json!([{ "Config": cfg_name, "RepoTags": ["app:1"], "Layers": names }])
            .to_string();
    let mut files: Vec<(&str, &[u8])> = vec![(&cfg_name, &cfg)];
    for (n, l) in names.iter().zip(layers) {
        files.push((n, l));
    }
    files.push(("manifest.json", manifest.as_bytes()));
    archive(&files)
}

fn setup() -> (tempfile::TempDir, BlobStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(&dir.path().join("data"), 1 << 30).unwrap();
    (dir, store)
}

fn write(dir: &tempfile::TempDir, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join("image.tar");
    std::fs::write(&p, bytes).unwrap();
    p
}

fn assert_unchanged(store: &BlobStore) {
    let scan = store.scan().unwrap();
    assert!(
        scan.blobs.is_empty() && scan.images.is_empty(),
        "store changed: {scan:?}"
    );
    assert_eq!(
        std::fs::read_dir(store.tmp_dir()).unwrap().count(),
        0,
        "temp files left"
    );
}

#[test]
fn a_legacy_archive_is_imported_by_image_id() {
    let (dir, store) = setup();
    let layers: [&[u8]; 2] = [b"base layer", b"top layer"];
    let path = write(&dir, &legacy(&layers));
    let out = import_archive(&store, &path).unwrap();
    let rec = &out[0].record;
    assert_eq!(rec.id, Digest::of(&config(&layers)));
    assert_eq!(
        rec.layers,
        vec![Digest::of(layers[0]), Digest::of(layers[1])]
    );
    assert_eq!(out[0].reference(), format!("app@sha256:{}", rec.id));
    assert!(store.scan().unwrap().complete(rec));
    let again = import_archive(&store, &path).unwrap();
    assert_eq!(again[0].new_bytes, 0);
    assert_eq!(store.records().unwrap().len(), 1);
}

#[test]
fn an_oci_archive_is_imported() {
    let (dir, store) = setup();
    let layer: &[u8] = b"oci layer";
    let cfg = config(&[layer]);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", Digest::of(&cfg)), "size": cfg.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{}", Digest::of(layer)), "size": layer.len() }],
    })
    .to_string();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{ "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", Digest::of(manifest.as_bytes())), "annotations": { "io.containerd.image.name": "docker.io/library/app:2" } }],
    })
    .to_string();
    let names = [
        format!("blobs/sha256/{}", Digest::of(&cfg)),
        format!("blobs/sha256/{}", Digest::of(layer)),
        format!("blobs/sha256/{}", Digest::of(manifest.as_bytes())),
    ];
    let bytes = archive(&[
        ("oci-layout", b"{\"imageLayoutVersion\":\"1.0.0\"}"),
        (&names[0], &cfg),
        (&names[1], layer),
        (&names[2], manifest.as_bytes()),
        ("index.json", index.as_bytes()),
    ]);
    let out = import_archive(&store, &write(&dir, &bytes)).unwrap();
    assert_eq!(out[0].record.id, Digest::of(&cfg));
    assert_eq!(
        out[0].record.names,
        vec!["docker.io/library/app:2".to_owned()]
    );
    assert!(store.scan().unwrap().complete(&out[0].record));
}

#[test]
fn a_manifest_naming_a_missing_layer_changes_nothing() {
    let (dir, store) = setup();
    let layer: &[u8] = b"layer";
    let cfg = config(&[layer]);
    let cfg_name = format!("{}.json", Digest::of(&cfg));
    let manifest =
        serde_json::json!([{ "Config": cfg_name, "Layers": ["gone/layer.tar"] }]).to_string();
    let bytes = archive(&[(&cfg_name, &cfg), ("manifest.json", manifest.as_bytes())]);
    let err = import_archive(&store, &write(&dir, &bytes)).unwrap_err();
    assert!(
        matches!(err, ImportError::Missing { what: "layer", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("gone/layer.tar"), "{err}");
    assert_unchanged(&store);
}

#[test]
fn a_layer_that_does_not_match_its_diff_id_changes_nothing() {
    let (dir, store) = setup();
    let cfg = config(&[b"what the config says"]);
    let cfg_name = format!("{}.json", Digest::of(&cfg));
    let manifest =
        serde_json::json!([{ "Config": cfg_name, "Layers": ["l/layer.tar"] }]).to_string();
    let bytes = archive(&[
        (&cfg_name, &cfg),
        ("l/layer.tar", b"other bytes"),
        ("manifest.json", manifest.as_bytes()),
    ]);
    let err = import_archive(&store, &write(&dir, &bytes))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("digest mismatch") && err.contains("l/layer.tar") && err.contains("diff_ids"),
        "{err}"
    );
    assert_unchanged(&store);
    // A config whose name claims another digest is refused too.
    let bytes = archive(&[
        (&format!("{}.json", Digest::of(b"x")), &cfg),
        ("l/layer.tar", b"what the config says"),
        (
            "manifest.json",
            manifest
                .replace(&cfg_name, &format!("{}.json", Digest::of(b"x")))
                .as_bytes(),
        ),
    ]);
    let err = import_archive(&store, &write(&dir, &bytes))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("digest mismatch") && err.contains("file name"),
        "{err}"
    );
    assert_unchanged(&store);
}

#[test]
fn a_truncated_archive_changes_nothing() {
    let (dir, store) = setup();
    let big = vec![7u8; 100_000];
    let full = legacy(&[&big]);
    for cut in [full.len() / 2, full.len() - 1024, 700] {
        let err = import_archive(&store, &write(&dir, &full[..cut])).unwrap_err();
        assert!(
            matches!(err, ImportError::Truncated { .. }),
            "cut at {cut}: {err}"
        );
        assert!(err.to_string().contains("truncated"), "{err}");
        assert_unchanged(&store);
    }
    let err = import_archive(&store, &write(&dir, b""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated or not a tar"), "{err}");
}

#[test]
fn repo_of_keeps_registry_ports() {
    assert_eq!(repo_of("app:1"), "app");
    assert_eq!(repo_of("localhost:5000/app:1"), "localhost:5000/app");
    assert_eq!(repo_of("localhost:5000/app"), "localhost:5000/app");
}
