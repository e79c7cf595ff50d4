//! proptest strategies for every wire type, shared by the protocol test binaries.
//!
//! Sizes are kept small so that a few hundred cases run in well under a second; the shapes,
//! not the sizes, are what the codec has to get right. Strings use proptest's `any::<String>()`
//! so that non-ASCII text goes through the codec too.
#![allow(dead_code)] // each test binary uses its own subset

use omesh_protocol::blob::{BlobRequest, BlobResponse};
use omesh_protocol::node::MAX_RTT_ENTRIES;
use omesh_protocol::{
    Capacity, Delta, DeltaBody, Digest, ExecutorKind, GossipMessage, Lease, LoadSample, NodeId,
    NodeRecord, Probe, SignedTaskSpec, StateDigest, StatusEntry, SyncReply, SyncRequest, TaskId,
    TaskSpec, TaskState,
};
use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;

pub(crate) fn node_id() -> impl Strategy<Value = NodeId> {
    any::<[u8; 32]>().prop_map(NodeId)
}

pub(crate) fn task_id() -> impl Strategy<Value = TaskId> {
    any::<[u8; 32]>().prop_map(TaskId)
}

pub(crate) fn digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest)
}

fn short_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9_./:-]{0,24}",
        1 => any::<String>().prop_map(|s| s.chars().take(24).collect()),
    ]
}

fn tag() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9=-]{0,11}"
}

pub(crate) fn capacity() -> impl Strategy<Value = Capacity> {
    (any::<u32>(), any::<u64>()).prop_map(|(cpu_millis, memory_bytes)| Capacity {
        cpu_millis,
        memory_bytes,
    })
}

pub(crate) fn load_sample() -> impl Strategy<Value = LoadSample> {
    (0..=1000u16, any::<u16>()).prop_map(|(cpu_permille, mem_permille)| LoadSample {
        cpu_permille,
        mem_permille,
    })
}

pub(crate) fn node_record() -> impl Strategy<Value = NodeRecord> {
    (
        node_id(),
        any::<u64>(),
        any::<u64>(),
        vec("/ip4/127\\.0\\.0\\.1/udp/[0-9]{1,5}/quic-v1", 0..3),
        btree_set(tag(), 0..4),
        capacity(),
        load_sample(),
        btree_set(digest(), 0..3),
        vec((node_id(), any::<u32>()), 0..=MAX_RTT_ENTRIES),
        (any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(
                id,
                incarnation,
                seq,
                addrs,
                tags,
                capacity,
                load,
                images,
                rtt_ms,
                (leaving, overloaded),
            )| {
                NodeRecord {
                    id,
                    incarnation,
                    seq,
                    addrs,
                    tags,
                    capacity,
                    load,
                    overloaded,
                    images,
                    rtt_ms,
                    leaving,
                    cert: None,
                    written_at_ms: seq.wrapping_mul(500),
                }
            },
        )
}

pub(crate) fn executor_kind() -> impl Strategy<Value = ExecutorKind> {
    prop_oneof![
        Just(ExecutorKind::Any),
        Just(ExecutorKind::Docker),
        Just(ExecutorKind::Process),
    ]
}

/// A digest-pinned image reference, as `check_shape` wants it.
pub(crate) fn pinned_image() -> impl Strategy<Value = String> {
    ("[a-z][a-z0-9/-]{0,15}", digest()).prop_map(|(name, d)| format!("{name}@sha256:{d}"))
}

/// Any image text: mostly pinned, sometimes not (the codec must not care).
fn image_text() -> impl Strategy<Value = String> {
    prop_oneof![3 => pinned_image(), 1 => short_text()]
}

fn task_spec_with(
    image: impl Strategy<Value = String>,
    command: impl Strategy<Value = Vec<String>>,
    max_attempts: impl Strategy<Value = u32>,
) -> impl Strategy<Value = TaskSpec> {
    (
        (
            image,
            command,
            btree_map("[A-Z][A-Z0-9_]{0,7}", short_text(), 0..3),
            // Within the limits a valid spec may ask for.
            0..=omesh_protocol::task::MAX_CPU_MILLIS,
            0..=omesh_protocol::task::MAX_MEMORY_BYTES,
            btree_set(tag(), 0..3),
        ),
        (
            any::<i32>(),
            max_attempts,
            any::<u64>(),
            executor_kind(),
            any::<u64>(),
            any::<[u8; 32]>(),
        ),
    )
        .prop_map(
            |(
                (image, command, env, cpu_millis, memory_bytes, required_tags),
                (priority, max_attempts, timeout_ms, executor, nonce, submitter),
            )| TaskSpec {
                image,
                command,
                env,
                cpu_millis,
                memory_bytes,
                required_tags,
                priority,
                max_attempts,
                timeout_ms,
                executor,
                nonce,
                submitter,
                disconnect: Default::default(),
            },
        )
}

/// Any spec, valid or not.
pub(crate) fn task_spec() -> impl Strategy<Value = TaskSpec> {
    task_spec_with(image_text(), vec(short_text(), 0..4), any::<u32>())
}

/// A spec that passes `check_shape`: pinned image, a command, at least one attempt.
pub(crate) fn valid_task_spec() -> impl Strategy<Value = TaskSpec> {
    task_spec_with(pinned_image(), vec(short_text(), 1..4), 1..10u32)
}

/// A spec with an arbitrary signature (empty, 64 bytes, or another length).
pub(crate) fn signed_task_spec() -> impl Strategy<Value = SignedTaskSpec> {
    let signature = prop_oneof![
        Just(Vec::new()),
        vec(any::<u8>(), 64..=64),
        vec(any::<u8>(), 0..80),
    ];
    (task_spec(), signature).prop_map(|(spec, signature)| SignedTaskSpec { spec, signature })
}

pub(crate) fn lease() -> impl Strategy<Value = Lease> {
    (
        any::<u64>(),
        node_id(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(
            |(epoch, owner, incarnation, score, ttl_ms, released)| Lease {
                epoch,
                owner,
                incarnation,
                score,
                ttl_ms,
                released,
            },
        )
}

pub(crate) fn task_state() -> impl Strategy<Value = TaskState> {
    prop_oneof![
        Just(TaskState::Pending),
        Just(TaskState::Running),
        Just(TaskState::Succeeded),
        Just(TaskState::Failed),
        Just(TaskState::Cancelled),
    ]
}

pub(crate) fn status_entry() -> impl Strategy<Value = StatusEntry> {
    (
        task_state(),
        any::<Option<i32>>(),
        short_text(),
        any::<u64>(),
        node_id(),
    )
        .prop_map(|(state, exit_code, error, at_ms, reporter)| {
            StatusEntry::new(state, exit_code, &error, at_ms, reporter)
        })
}

pub(crate) fn delta_body() -> impl Strategy<Value = DeltaBody> {
    prop_oneof![
        node_record().prop_map(|r| DeltaBody::Node(std::sync::Arc::new(r))),
        signed_task_spec().prop_map(DeltaBody::Spec),
        (task_id(), lease()).prop_map(|(task, lease)| DeltaBody::Lease { task, lease }),
        (task_id(), any::<u64>(), status_entry())
            .prop_map(|(task, epoch, entry)| DeltaBody::Status { task, epoch, entry }),
        (task_id(), any::<[u8; 32]>(), sig()).prop_map(|(task, submitter, sig)| {
            DeltaBody::Cancel(omesh_protocol::SignedCancel {
                task,
                submitter,
                sig,
            })
        }),
        (node_id(), any::<[u8; 32]>(), sig()).prop_map(|(node, issuer, sig)| {
            DeltaBody::Revoke(omesh_protocol::Revocation { node, issuer, sig })
        }),
        (task_id(), task_state()).prop_map(|(task, outcome)| DeltaBody::Compact {
            task,
            outcome,
            end: None
        }),
        (node_id(), any::<(u64, u64)>())
            .prop_map(|(node, version)| DeltaBody::Suspect { node, version }),
    ]
}

pub(crate) fn probe() -> impl Strategy<Value = Probe> {
    prop_oneof![
        any::<u64>().prop_map(|nonce| Probe::Ping { nonce }),
        (any::<u64>(), node_id(), any::<bool>()).prop_map(|(nonce, about, grant)| Probe::Ack {
            nonce,
            about,
            grant
        }),
        (any::<u64>(), node_id()).prop_map(|(nonce, target)| Probe::PingReq { nonce, target }),
        (any::<u64>(), node_id(), any::<u32>(), any::<u32>()).prop_map(
            |(nonce, about, hold_ms, quiet_ms)| Probe::Poll {
                nonce,
                about,
                hold_ms,
                quiet_ms
            }
        ),
        (any::<u64>(), node_id(), any::<Option<u32>>()).prop_map(|(nonce, about, silent_ms)| {
            Probe::Vote {
                nonce,
                about,
                silent_ms,
            }
        }),
        (any::<u64>(), task_id(), any::<u64>()).prop_map(|(nonce, task, epoch)| Probe::Confirm {
            nonce,
            task,
            epoch
        }),
        (any::<u64>(), task_id(), any::<u64>(), any::<bool>()).prop_map(
            |(nonce, task, epoch, ok)| Probe::Confirmed {
                nonce,
                task,
                epoch,
                ok
            }
        ),
    ]
}

pub(crate) fn delta() -> impl Strategy<Value = Delta> {
    (node_id(), any::<u64>(), delta_body(), sig()).prop_map(|(origin, stamp, body, sig)| Delta {
        origin,
        stamp,
        body,
        sig,
    })
}

/// Any 64 bytes, as a signature (the codec does not check signatures).
pub(crate) fn sig() -> impl Strategy<Value = omesh_protocol::Sig> {
    (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(a, b)| {
        let mut s = [0u8; 64];
        s[..32].copy_from_slice(&a);
        s[32..].copy_from_slice(&b);
        omesh_protocol::Sig(s)
    })
}

pub(crate) fn state_digest() -> impl Strategy<Value = StateDigest> {
    any::<[u64; 4]>().prop_map(StateDigest)
}

fn vclock() -> impl Strategy<Value = Vec<(NodeId, u64)>> {
    vec((node_id(), any::<u64>()), 0..5)
}

pub(crate) fn gossip_message() -> impl Strategy<Value = GossipMessage> {
    vec(delta(), 0..5).prop_map(|deltas| GossipMessage { deltas })
}

pub(crate) fn sync_request() -> impl Strategy<Value = SyncRequest> {
    (
        vclock(),
        state_digest(),
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(vclock, digest, full, digest_only, vclock_hash)| SyncRequest {
                digest_only,
                vclock_hash,
                vclock,
                digest,
                full,
            },
        )
}

pub(crate) fn sync_reply() -> impl Strategy<Value = SyncReply> {
    (vec(delta(), 0..4), vclock(), state_digest(), any::<bool>()).prop_map(
        |(deltas, vclock, digest, truncated)| SyncReply {
            deltas,
            vclock,
            digest,
            truncated,
        },
    )
}

pub(crate) fn blob_request() -> impl Strategy<Value = BlobRequest> {
    (digest(), any::<u64>(), any::<u32>()).prop_map(|(digest, offset, len)| BlobRequest {
        digest,
        offset,
        len,
    })
}

pub(crate) fn blob_response() -> impl Strategy<Value = BlobResponse> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), vec(any::<u8>(), 0..256)).prop_map(|(offset, total, data)| {
            BlobResponse::Chunk {
                offset,
                total,
                data,
            }
        }),
        Just(BlobResponse::NotFound),
        short_text().prop_map(BlobResponse::Refused),
    ]
}
