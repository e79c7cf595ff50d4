//! Store tests: staging, eviction, removal, advertisement.
#![allow(clippy::unwrap_used)]
use super::*;

fn put(store: &BlobStore, bytes: &[u8]) -> Digest {
    let mut s = store.stage().unwrap();
    s.write_all(bytes).unwrap();
    let staged = s.finish(None).unwrap();
    let d = staged.digest;
    store.commit(staged).unwrap();
    d
}

fn image(store: &BlobStore, config: &[u8], layers: &[&[u8]]) -> ImageRecord {
    let id = put(store, config);
    let layers: Vec<Digest> = layers.iter().map(|l| put(store, l)).collect();
    let rec = ImageRecord {
        id,
        names: vec![format!("{}:latest", String::from_utf8_lossy(config))],
        layers,
        size: 0,
    };
    store.put_record(&rec).unwrap();
    rec
}

fn age(store: &BlobStore, d: &Digest, secs_ago: u64) {
    let f = File::options()
        .write(true)
        .open(store.blob_path(d))
        .unwrap();
    f.set_modified(SystemTime::now() - std::time::Duration::from_secs(secs_ago))
        .unwrap();
}

#[test]
fn staged_blobs_are_verified_and_content_addressed() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), 1 << 20).unwrap();
    let d = put(&store, b"hello");
    assert_eq!(d, Digest::of(b"hello"));
    assert_eq!(fs::read(store.blob_path(&d)).unwrap(), b"hello");
    let mut s = store.stage().unwrap();
    s.write_all(b"other").unwrap();
    let err = s.finish(Some(&d)).unwrap_err().to_string();
    assert!(err.contains("digest mismatch"), "{err}");
    assert_eq!(store.scan().unwrap().blobs.len(), 1);
    assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
}

#[test]
fn eviction_takes_least_recently_used_unpinned_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), 100).unwrap();
    let old = image(&store, b"c1", &[&[1u8; 30]]);
    let pinned = image(&store, b"c22", &[&[2u8; 30]]);
    let recent = image(&store, b"c333", &[&[3u8; 30]]);
    for d in old.blobs().chain(pinned.blobs()) {
        age(&store, d, 3600);
    }
    store.set_pinned(&BTreeSet::from([pinned.id])).unwrap();
    // 99 bytes held; 30 more need 29 freed: the old image goes, the pinned one stays.
    let evicted = store.make_room(30, &BTreeSet::new()).unwrap();
    assert!(evicted.contains(&old.layers[0]), "{evicted:?}");
    let scan = store.scan().unwrap();
    assert!(scan.complete(&pinned) && scan.complete(&recent));
    assert!(!scan.complete(&old));
    assert!(scan.total_bytes() + 30 <= 100);
}

#[test]
fn a_full_store_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), 100).unwrap();
    let a = image(&store, b"c1", &[&[1u8; 60]]);
    store.set_pinned(&BTreeSet::from([a.id])).unwrap();
    let before = store.scan().unwrap().blobs;
    let err = store
        .make_room(50, &BTreeSet::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("blob store full"), "{err}");
    assert_eq!(store.scan().unwrap().blobs, before);
}

#[test]
fn removing_an_image_keeps_shared_layers_and_pinned_images() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), 1 << 20).unwrap();
    let a = image(&store, b"config-a", &[b"base", b"top-a"]);
    let b = image(&store, b"config-b", &[b"base", b"top-b"]);
    store.set_pinned(&BTreeSet::from([b.id])).unwrap();
    let err = store.remove_image(&b.id.to_hex()[..12], false).unwrap_err();
    assert!(matches!(err, StoreError::Pinned(_)), "{err}");
    store.remove_image(&a.names[0], false).unwrap();
    let scan = store.scan().unwrap();
    assert!(scan.complete(&b));
    assert!(!scan.blobs.contains_key(&a.id) && !scan.blobs.contains_key(&a.layers[1]));
    assert_eq!(store.records().unwrap(), vec![b]);
}

#[test]
fn advertised_lists_complete_images_and_partials() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), 1 << 20).unwrap();
    let a = image(&store, b"config-a", &[b"layer-a"]);
    let b = image(&store, b"config-b", &[b"layer-b"]);
    fs::remove_file(store.blob_path(&b.layers[0])).unwrap();
    let partial = Digest::of(b"coming");
    let adv = store.scan().unwrap().advertised(&[partial], 100);
    assert_eq!(adv, BTreeSet::from([a.id, a.layers[0], partial]));
    let adv = store.scan().unwrap().advertised(&[partial], 1);
    assert_eq!(adv, BTreeSet::from([a.id]));
}

/// Sets the mtime of a partial blob's two files.
fn age_partial(store: &BlobStore, d: &Digest, secs_ago: u64) {
    let dir = store.partial_dir();
    for name in [d.to_hex(), format!("{}.chunks", d.to_hex())] {
        let f = File::options().append(true).open(dir.join(name)).unwrap();
        f.set_modified(SystemTime::now() - std::time::Duration::from_secs(secs_ago))
            .unwrap();
    }
}

#[test]
fn abandoned_partial_blobs_count_against_the_cap_and_go_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), 64 * CHUNK_BYTES).unwrap();
    let (old, fresh, active) = (
        Digest::of(b"old partial"),
        Digest::of(b"fresh partial"),
        Digest::of(b"partial being fetched"),
    );
    let chunk = vec![7u8; usize::try_from(CHUNK_BYTES).unwrap()];
    for d in [old, fresh, active] {
        let p = store.partial(&d, 2 * CHUNK_BYTES).unwrap();
        p.write_chunk(0, &chunk).unwrap();
        if d != active {
            store.forget_partial(&d);
        }
    }
    let long_ago = ABANDONED_AFTER.as_secs() * 2;
    age_partial(&store, &old, long_ago);
    age_partial(&store, &active, long_ago);
    let blob = put(&store, b"a complete blob, used long ago");
    age(&store, &blob, long_ago * 10);

    let scan = store.scan().unwrap();
    // Only the old one that no fetch holds counts as abandoned; it holds a chunk on disk.
    assert_eq!(scan.abandoned.keys().collect::<Vec<_>>(), vec![&old]);
    let old_bytes = scan.abandoned[&old].size;
    assert!(old_bytes >= CHUNK_BYTES, "{old_bytes}");
    assert_eq!(scan.total_bytes(), scan.blobs[&blob].size + old_bytes);

    // Room that the abandoned partial alone makes: it goes, though the blob is older.
    let need = store.cap_bytes() - scan.total_bytes() + 1;
    assert_eq!(store.make_room(need, &BTreeSet::new()).unwrap(), vec![old]);
    let partials = store.partial_dir();
    assert!(!partials.join(old.to_hex()).exists());
    assert!(!partials.join(format!("{}.chunks", old.to_hex())).exists());
    for kept in [fresh, active] {
        assert!(partials.join(kept.to_hex()).exists(), "{kept} removed");
    }
    assert!(store.blob_path(&blob).exists());
    assert!(store.scan().unwrap().abandoned.is_empty());
}
