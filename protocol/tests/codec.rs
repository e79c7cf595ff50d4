//! The wire codec: roundtrips, robustness against arbitrary bytes, and each decode error.
#![allow(clippy::unwrap_used)]

mod strategies;

use std::fmt::Debug;

use omesh_protocol::blob::{BlobRequest, BlobResponse, MAX_CHUNK_BYTES};
use omesh_protocol::{
    decode, encode, DecodeError, Delta, DeltaBody, EncodeError, GossipMessage, NodeId, Probe,
    StateDigest, SyncReply, SyncRequest, TaskId, Wire, WIRE_VERSION,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use strategies::*;

/// Decodes `bytes` as `T`; a value that comes out must encode again and decode to itself.
/// Bytes are not compared: postcard accepts non-minimal varints and unsorted sets, which
/// re-encode shorter but to the same value.
fn decode_is_total<T: Wire + PartialEq + Debug>(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(value) = T::from_wire(bytes) {
        let again = value.to_wire().map_err(|e| {
            TestCaseError::fail(format!("{} decoded but does not encode: {e}", T::KIND))
        })?;
        prop_assert!(again.len() <= bytes.len(), "re-encoding grew");
        let back = T::from_wire(&again);
        prop_assert_eq!(back.as_ref(), Ok(&value));
    }
    Ok(())
}

fn decode_as_every_kind(bytes: &[u8]) -> Result<(), TestCaseError> {
    decode_is_total::<GossipMessage>(bytes)?;
    decode_is_total::<SyncRequest>(bytes)?;
    decode_is_total::<SyncReply>(bytes)?;
    decode_is_total::<BlobRequest>(bytes)?;
    decode_is_total::<BlobResponse>(bytes)?;
    Ok(())
}

fn wire_roundtrip<T: Wire + PartialEq + Debug>(value: &T) -> Result<(), TestCaseError> {
    let bytes = value
        .to_wire()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(bytes[0], WIRE_VERSION);
    let back = T::from_wire(&bytes);
    prop_assert_eq!(back.as_ref(), Ok(value));
    // The encoding is a function of the value.
    let again = value.to_wire();
    prop_assert_eq!(again.as_ref(), Ok(&bytes));
    // Lengths computed without encoding agree with the encodings.
    prop_assert_eq!(value.wire_len(), Ok(bytes.len()));
    prop_assert_eq!(
        omesh_protocol::codec::canonical_len(value),
        omesh_protocol::codec::canonical(value).len()
    );
    Ok(())
}

/// One change applied to a valid encoding: overwrite, insert or remove a byte, or cut the tail.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Cut(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => any::<usize>().prop_map(Mutation::Remove),
        1 => any::<usize>().prop_map(Mutation::Cut),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match *m {
            Mutation::Set(i, b) if len > 0 => bytes[i % len] = b,
            Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
            Mutation::Remove(i) if len > 0 => {
                bytes.remove(i % len);
            }
            Mutation::Cut(i) => bytes.truncate(i % (len + 1)),
            _ => {}
        }
    }
    bytes
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        decode_as_every_kind(&bytes)?;
    }

    #[test]
    fn random_bytes_behind_the_version_byte_never_panic(body in vec(any::<u8>(), 0..512)) {
        let mut bytes = vec![WIRE_VERSION];
        bytes.extend_from_slice(&body);
        decode_as_every_kind(&bytes)?;
    }

    #[test]
    fn mutated_gossip_never_panics(
        msg in gossip_message(),
        mutations in vec(mutation(), 1..6),
    ) {
        let bytes = mutate(msg.to_wire().unwrap(), &mutations);
        decode_as_every_kind(&bytes)?;
    }

    #[test]
    fn mutated_sync_reply_never_panics(
        msg in sync_reply(),
        mutations in vec(mutation(), 1..6),
    ) {
        let bytes = mutate(msg.to_wire().unwrap(), &mutations);
        decode_as_every_kind(&bytes)?;
    }

    #[test]
    fn mutated_blob_frames_never_panic(
        req in blob_request(),
        resp in blob_response(),
        mutations in vec(mutation(), 1..4),
    ) {
        decode_as_every_kind(&mutate(req.to_wire().unwrap(), &mutations))?;
        decode_as_every_kind(&mutate(resp.to_wire().unwrap(), &mutations))?;
    }

    #[test]
    fn delta_roundtrips(delta in delta()) {
        let bytes = encode(&delta).unwrap();
        prop_assert_eq!(bytes[0], WIRE_VERSION);
        prop_assert_eq!(decode::<Delta>(&bytes, usize::MAX), Ok(delta.clone()));
        prop_assert_eq!(encode(&delta).unwrap(), bytes);
    }

    #[test]
    fn delta_body_kind_survives_roundtrip(body in delta_body()) {
        let back: DeltaBody = decode(&encode(&body).unwrap(), usize::MAX).unwrap();
        prop_assert_eq!(back.kind(), body.kind());
    }

    #[test]
    fn signed_spec_roundtrip_keeps_its_id(spec in signed_task_spec()) {
        let back = decode::<omesh_protocol::SignedTaskSpec>(&encode(&spec).unwrap(), usize::MAX)
            .unwrap();
        prop_assert_eq!(back.id(), spec.id());
        prop_assert_eq!(back, spec);
    }

    #[test]
    fn gossip_message_roundtrips(msg in gossip_message()) {
        wire_roundtrip(&msg)?;
    }

    #[test]
    fn probe_roundtrips(msg in probe()) {
        wire_roundtrip(&msg)?;
        prop_assert!(msg.to_wire().map_err(|e| TestCaseError::fail(e.to_string()))?.len() <= Probe::MAX_BYTES);
    }

    #[test]
    fn sync_request_roundtrips(msg in sync_request()) {
        wire_roundtrip(&msg)?;
    }

    #[test]
    fn sync_reply_roundtrips(msg in sync_reply()) {
        wire_roundtrip(&msg)?;
    }

    #[test]
    fn blob_frames_roundtrip(req in blob_request(), resp in blob_response()) {
        wire_roundtrip(&req)?;
        wire_roundtrip(&resp)?;
    }

    #[test]
    fn every_strict_prefix_is_truncated(delta in delta()) {
        let bytes = GossipMessage { deltas: vec![delta] }.to_wire().unwrap();
        prop_assert_eq!(GossipMessage::from_wire(&[]), Err(DecodeError::Empty));
        for cut in 1..bytes.len() {
            prop_assert_eq!(
                GossipMessage::from_wire(&bytes[..cut]),
                Err(DecodeError::Truncated),
                "cut at {} of {}", cut, bytes.len()
            );
        }
    }

    #[test]
    fn trailing_bytes_are_refused(msg in sync_request(), extra in vec(any::<u8>(), 1..16)) {
        let mut bytes = msg.to_wire().unwrap();
        bytes.extend_from_slice(&extra);
        prop_assert_eq!(SyncRequest::from_wire(&bytes), Err(DecodeError::Trailing(extra.len())));
    }

    #[test]
    fn other_versions_are_refused(msg in sync_request(), version in any::<u8>()) {
        prop_assume!(version != WIRE_VERSION);
        let mut bytes = msg.to_wire().unwrap();
        bytes[0] = version;
        prop_assert_eq!(
            SyncRequest::from_wire(&bytes),
            Err(DecodeError::UnsupportedVersion(version))
        );
    }
}

fn sample_gossip() -> GossipMessage {
    let origin = NodeId([3; 32]);
    GossipMessage {
        deltas: vec![
            Delta {
                origin,
                stamp: 1,
                body: DeltaBody::Node(std::sync::Arc::new(omesh_protocol::NodeRecord::new(
                    origin,
                    7,
                    omesh_protocol::Capacity {
                        cpu_millis: 2000,
                        memory_bytes: 1 << 30,
                    },
                ))),
                sig: omesh_protocol::Sig([5; 64]),
            },
            Delta {
                origin,
                stamp: 2,
                body: DeltaBody::Cancel(omesh_protocol::SignedCancel {
                    task: TaskId([9; 32]),
                    submitter: [4; 32],
                    sig: omesh_protocol::Sig([6; 64]),
                }),
                sig: omesh_protocol::Sig([7; 64]),
            },
        ],
    }
}

#[test]
fn truncated_encoding_gives_truncated() {
    let bytes = sample_gossip().to_wire().unwrap();
    for cut in 1..bytes.len() {
        assert_eq!(
            GossipMessage::from_wire(&bytes[..cut]),
            Err(DecodeError::Truncated),
            "cut at {cut} of {}",
            bytes.len()
        );
    }
    assert_eq!(GossipMessage::from_wire(&[]), Err(DecodeError::Empty));
}

#[test]
fn oversized_input_gives_too_large_before_parsing() {
    // Valid version byte, then garbage: the size check must come first.
    let mut bytes = vec![0u8; BlobRequest::MAX_BYTES + 1];
    bytes[0] = WIRE_VERSION;
    assert_eq!(
        BlobRequest::from_wire(&bytes),
        Err(DecodeError::TooLarge {
            len: BlobRequest::MAX_BYTES + 1,
            limit: BlobRequest::MAX_BYTES,
        })
    );
    let gossip = vec![WIRE_VERSION; GossipMessage::MAX_BYTES + 1];
    assert!(matches!(
        GossipMessage::from_wire(&gossip),
        Err(DecodeError::TooLarge { .. })
    ));
    // Exactly at the limit is parsed (and here fails for another reason).
    assert!(!matches!(
        GossipMessage::from_wire(&gossip[..GossipMessage::MAX_BYTES]),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn oversized_value_is_refused_on_encode() {
    let chunk = BlobResponse::Chunk {
        offset: 0,
        total: 0,
        data: vec![0; BlobResponse::MAX_BYTES],
    };
    assert!(matches!(
        chunk.to_wire(),
        Err(EncodeError::TooLarge {
            kind: "blob response",
            ..
        })
    ));
    // A full-size chunk fits.
    let full = BlobResponse::Chunk {
        offset: u64::MAX,
        total: u64::MAX,
        data: vec![0; MAX_CHUNK_BYTES as usize],
    };
    assert_eq!(BlobResponse::from_wire(&full.to_wire().unwrap()), Ok(full));
}

#[test]
fn wrong_version_gives_unsupported_version() {
    let mut bytes = sample_gossip().to_wire().unwrap();
    bytes[0] = WIRE_VERSION + 1;
    assert_eq!(
        GossipMessage::from_wire(&bytes),
        Err(DecodeError::UnsupportedVersion(WIRE_VERSION + 1))
    );
    assert_eq!(
        GossipMessage::from_wire(&[0]),
        Err(DecodeError::UnsupportedVersion(0))
    );
}

#[test]
fn trailing_bytes_give_trailing() {
    let mut bytes = sample_gossip().to_wire().unwrap();
    bytes.extend_from_slice(&[0, 0, 0]);
    assert_eq!(
        GossipMessage::from_wire(&bytes),
        Err(DecodeError::Trailing(3))
    );
}

#[test]
fn malformed_body_gives_malformed() {
    // A bool that is neither 0 nor 1.
    let mut bytes = SyncRequest {
        vclock: Vec::new(),
        digest: StateDigest::default(),
        full: false,
        digest_only: false,
        vclock_hash: 0,
    }
    .to_wire()
    .unwrap();
    // The last byte is `vclock_hash` (a varint 0); the one before it, `digest_only`.
    let n = bytes.len();
    bytes[n - 2] = 2;
    assert!(matches!(
        SyncRequest::from_wire(&bytes),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn hostile_length_prefix_does_not_allocate_or_panic() {
    // Claims u64::MAX deltas in a 12-byte message: must fail fast, not reserve memory for them.
    let mut bytes = vec![WIRE_VERSION];
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    bytes.push(0);
    assert!(GossipMessage::from_wire(&bytes).is_err());
    assert!(SyncReply::from_wire(&bytes).is_err());
    // A data length of 1 GiB in a short blob frame.
    let mut chunk = vec![WIRE_VERSION, 0, 0, 0];
    chunk.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x04]);
    assert_eq!(BlobResponse::from_wire(&chunk), Err(DecodeError::Truncated));
}

#[test]
fn version_byte_leads_every_encoding() {
    assert_eq!(encode(&()).unwrap(), vec![WIRE_VERSION]);
    assert_eq!(
        BlobResponse::NotFound.to_wire().unwrap(),
        vec![WIRE_VERSION, 1]
    );
}
