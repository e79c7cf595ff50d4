//! Task specs: pinned image references, signatures, the authorized-submitter check and ids.
#![allow(clippy::unwrap_used)]

mod strategies;

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::{SigningKey, VerifyingKey};
use omesh_protocol::task::MAX_SPEC_BYTES;
use omesh_protocol::{Digest, ExecutorKind, ImageRef, SignedTaskSpec, SpecError, TaskSpec};
use proptest::prelude::*;

const DIGEST_HEX: &str = "4b1c6a1f0a8a4d5e2f3c9b7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f";

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn authorized(keys: &[&SigningKey]) -> BTreeSet<[u8; 32]> {
    keys.iter().map(|k| k.verifying_key().to_bytes()).collect()
}

fn spec() -> TaskSpec {
    TaskSpec {
        image: format!("busybox@sha256:{DIGEST_HEX}"),
        command: vec!["echo".into(), "hello".into()],
        env: BTreeMap::from([("GREETING".into(), "hi".into())]),
        cpu_millis: 250,
        memory_bytes: 64 << 20,
        required_tags: BTreeSet::from(["edge".into()]),
        priority: 0,
        max_attempts: 3,
        timeout_ms: 60_000,
        executor: ExecutorKind::Any,
        nonce: 1,
        submitter: [0; 32],
        disconnect: Default::default(),
    }
}

#[test]
fn image_ref_accepts_a_digest_pinned_reference() {
    let text = format!("busybox@sha256:{DIGEST_HEX}");
    let image = ImageRef::parse(&text).unwrap();
    assert_eq!(image.name, "busybox");
    assert_eq!(image.digest, DIGEST_HEX.parse::<Digest>().unwrap());
    assert_eq!(image.to_string(), text);

    let nested = format!("registry.local:5000/team/app@sha256:{DIGEST_HEX}");
    assert_eq!(
        ImageRef::parse(&nested).unwrap().name,
        "registry.local:5000/team/app"
    );
}

#[test]
fn image_ref_refuses_anything_not_pinned() {
    let short = "busybox@sha256:abc".to_owned();
    let no_algo = format!("busybox@{DIGEST_HEX}");
    let other_algo = format!("busybox@sha512:{DIGEST_HEX}");
    let no_name = format!("@sha256:{DIGEST_HEX}");
    let too_long = format!("busybox@sha256:{DIGEST_HEX}00");
    let not_hex = format!("busybox@sha256:{}", "z".repeat(64));
    for text in [
        "busybox",
        "busybox:latest",
        short.as_str(),
        "",
        no_algo.as_str(),
        other_algo.as_str(),
        no_name.as_str(),
        too_long.as_str(),
        not_hex.as_str(),
    ] {
        assert_eq!(
            ImageRef::parse(text),
            Err(SpecError::ImageNotPinned(text.to_owned())),
            "{text:?}"
        );
    }
}

#[test]
fn sign_then_verify() {
    let alice = key(1);
    let signed = spec().sign(&alice);
    assert_eq!(signed.spec.submitter, alice.verifying_key().to_bytes());
    assert_eq!(signed.signature.len(), 64);
    let image = signed.verify(&authorized(&[&alice])).unwrap();
    assert_eq!(image.map(|i| i.name).as_deref(), Some("busybox"));
}

#[test]
fn a_process_task_may_name_no_image_and_a_container_task_must() {
    let alice = key(1);
    let ok = authorized(&[&alice]);
    let mut process = spec();
    process.image.clear();
    process.executor = ExecutorKind::Process;
    assert_eq!(process.clone().sign(&alice).verify(&ok), Ok(None));
    for executor in [ExecutorKind::Any, ExecutorKind::Docker] {
        let mut container = process.clone();
        container.executor = executor;
        assert_eq!(
            container.sign(&alice).verify(&ok),
            Err(SpecError::NoImage),
            "{executor:?}"
        );
    }
}

#[test]
fn json_of_a_spec_refuses_unknown_fields_and_may_leave_out_the_image() {
    let mut json = serde_json::to_value(spec()).unwrap();
    json["privileged"] = serde_json::json!(true);
    let e = serde_json::from_value::<TaskSpec>(json)
        .unwrap_err()
        .to_string();
    assert!(e.contains("privileged"), "{e}");
    let mut json = serde_json::to_value(spec()).unwrap();
    json["disconnect"]["stop_after"] = serde_json::json!(1000);
    let e = serde_json::from_value::<TaskSpec>(json)
        .unwrap_err()
        .to_string();
    assert!(e.contains("stop_after"), "{e}");
    let mut json = serde_json::to_value(spec()).unwrap();
    json.as_object_mut().unwrap().remove("image");
    assert_eq!(serde_json::from_value::<TaskSpec>(json).unwrap().image, "");
}

#[test]
fn tampered_spec_gives_bad_signature() {
    let alice = key(1);
    let ok = authorized(&[&alice]);
    let signed = spec().sign(&alice);

    let mut command = signed.clone();
    command.spec.command.push("--evil".into());
    assert_eq!(command.verify(&ok), Err(SpecError::BadSignature));

    let mut nonce = signed.clone();
    nonce.spec.nonce += 1;
    assert_eq!(nonce.verify(&ok), Err(SpecError::BadSignature));

    let mut flipped = signed.clone();
    flipped.signature[10] ^= 1;
    assert_eq!(flipped.verify(&ok), Err(SpecError::BadSignature));

    let mut short = signed.clone();
    short.signature.truncate(63);
    assert_eq!(short.verify(&ok), Err(SpecError::BadSignature));

    // Claiming another (authorized) submitter does not make the signature theirs.
    let bob = key(2);
    let mut stolen = signed;
    stolen.spec.submitter = bob.verifying_key().to_bytes();
    assert_eq!(
        stolen.verify(&authorized(&[&alice, &bob])),
        Err(SpecError::BadSignature)
    );
}

#[test]
fn empty_signature_gives_unsigned() {
    let alice = key(1);
    let mut signed = spec().sign(&alice);
    signed.signature.clear();
    assert_eq!(
        signed.verify(&authorized(&[&alice])),
        Err(SpecError::Unsigned)
    );
}

#[test]
fn unauthorized_submitter_gives_unknown_submitter() {
    let alice = key(1);
    let bob = key(2);
    let signed = spec().sign(&alice);
    let expected = Err(SpecError::UnknownSubmitter(hex::encode(
        alice.verifying_key().to_bytes(),
    )));
    assert_eq!(signed.verify(&authorized(&[&bob])), expected);
    assert_eq!(signed.verify(&BTreeSet::new()), expected);
}

#[test]
fn invalid_submitter_key_gives_bad_submitter_key() {
    // Not every 32-byte string is a curve point; find one that is not.
    let bad = (0u8..=255)
        .map(|b| [b; 32])
        .find(|bytes| VerifyingKey::from_bytes(bytes).is_err())
        .unwrap();
    let mut signed = spec().sign(&key(1));
    signed.spec.submitter = bad;
    assert_eq!(
        signed.verify(&BTreeSet::from([bad])),
        Err(SpecError::BadSubmitterKey)
    );
}

#[test]
fn shape_is_checked_before_the_signature() {
    let alice = key(1);
    let ok = authorized(&[&alice]);
    let mut unpinned = spec();
    unpinned.image = "busybox:latest".into();
    assert_eq!(
        unpinned.sign(&alice).verify(&ok),
        Err(SpecError::ImageNotPinned("busybox:latest".into()))
    );
    let mut no_command = spec();
    no_command.command.clear();
    assert_eq!(
        no_command.sign(&alice).verify(&ok),
        Err(SpecError::EmptyCommand)
    );
    let mut no_attempts = spec();
    no_attempts.max_attempts = 0;
    assert_eq!(
        no_attempts.sign(&alice).verify(&ok),
        Err(SpecError::ZeroAttempts)
    );
}

#[test]
fn oversized_spec_gives_too_large() {
    let alice = key(1);
    let mut big = spec();
    big.env.insert("BLOB".into(), "x".repeat(MAX_SPEC_BYTES));
    let signed = big.sign(&alice);
    assert!(matches!(
        signed.verify(&authorized(&[&alice])),
        Err(SpecError::TooLarge {
            limit: MAX_SPEC_BYTES,
            ..
        })
    ));
}

#[test]
fn task_id_is_stable_for_equal_specs_and_differs_by_nonce() {
    let alice = key(1);
    let a = spec().sign(&alice);
    let b = spec().sign(&alice);
    assert_eq!(a, b, "ed25519 signing is deterministic");
    assert_eq!(a.id(), b.id());
    assert_eq!(a.id(), a.clone().id());

    let mut other = spec();
    other.nonce += 1;
    assert_ne!(other.sign(&alice).id(), a.id());

    // The same spec from another submitter is another task.
    assert_ne!(spec().sign(&key(2)).id(), a.id());
}

#[test]
fn executor_names_parse() {
    assert_eq!("docker".parse::<ExecutorKind>(), Ok(ExecutorKind::Docker));
    assert_eq!("process".parse::<ExecutorKind>(), Ok(ExecutorKind::Process));
    assert_eq!("auto".parse::<ExecutorKind>(), Ok(ExecutorKind::Any));
    assert_eq!(
        "podman".parse::<ExecutorKind>(),
        Err(SpecError::UnknownExecutor("podman".into()))
    );
}

proptest! {
    #[test]
    fn any_valid_spec_signs_and_verifies(spec in strategies::valid_task_spec(), seed in any::<u8>()) {
        let k = key(seed);
        let signed = spec.sign(&k);
        prop_assert!(signed.verify(&authorized(&[&k])).is_ok());
    }

    #[test]
    fn task_id_depends_only_on_the_signed_spec(spec in strategies::valid_task_spec()) {
        let k = key(7);
        let a: SignedTaskSpec = spec.clone().sign(&k);
        let b = spec.clone().sign(&k);
        prop_assert_eq!(a.id(), b.id());
        let mut other = spec;
        other.nonce = other.nonce.wrapping_add(1);
        prop_assert_ne!(other.sign(&k).id(), a.id());
    }
}
