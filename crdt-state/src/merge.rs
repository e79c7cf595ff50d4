//! The replicated state as a join-semilattice: node records, task records and tombstones.
//!
//! Every component carries the `(origin, stamp)` of the delta that wrote it, so anti-entropy
//! can send exactly what a peer's version vector lacks. Merging is commutative, associative
//! and idempotent; the digest covers values only, never stamps, so equal states hash equal
//! however they were reached.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use omesh_protocol::codec::canonical;
use omesh_protocol::{
    Delta, DeltaBody, Digest, Epoch, Lease, Millis, NodeId, NodeRecord, Revocation, Sig,
    SignedCancel, SignedTaskSpec, StateDigest, StatusEntry, TaskId, TaskState,
};

use crate::digest::{ComponentHash, Digest4};

/// A join: `a.merge(&b)` leaves `a` as the least upper bound of both.
///
/// Laws: commutative (`a ⊔ b = b ⊔ a`), associative, idempotent (`a ⊔ a = a`).
pub trait Crdt {
    /// Joins `other` into `self`.
    fn merge(&mut self, other: &Self);
}

/// Who wrote a component, and with which of its stamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp {
    /// The writing replica.
    pub origin: NodeId,
    /// Its counter.
    pub stamp: u64,
}

/// A value with the stamp and signature of the delta that wrote it, and its digest
/// contribution. The signature is kept so a sync can serve the delta again as its origin
/// signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamped<T> {
    /// Who wrote it.
    pub at: Stamp,
    /// The value.
    pub value: T,
    sig: Sig,
    hash: ComponentHash,
}

/// One task as this replica knows it. Parts may arrive in any order; a record without a spec
/// is kept (and merged) but never acted on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskRecord {
    /// The signed spec, write-once.
    pub spec: Option<Stamped<Arc<SignedTaskSpec>>>,
    /// The lease of each epoch claimed (the best-ranked one where two claimed the same
    /// epoch). Every epoch's is kept, so any replica can tell who owned the epoch a status
    /// reports on, however late it joined.
    pub leases: BTreeMap<Epoch, Stamped<Lease>>,
    /// What each epoch reached, reported by that epoch's owner.
    pub statuses: BTreeMap<Epoch, Stamped<StatusEntry>>,
    /// The grow-only cancel flag, with the submitter's signed order.
    pub cancel: Option<Stamped<SignedCancel>>,
}

impl TaskRecord {
    /// The current lease: that of the highest epoch.
    pub fn lease(&self) -> Option<&Stamped<Lease>> {
        self.leases.values().next_back()
    }

    /// The highest epoch named by a lease or a status.
    pub fn max_epoch(&self) -> Epoch {
        let lease = self.leases.keys().next_back().copied().unwrap_or(0);
        let status = self.statuses.keys().next_back().copied().unwrap_or(0);
        lease.max(status)
    }

    /// Whether `end` (its signature already checked) is evidence that `task` ended as
    /// `outcome`, though this record does not show it yet: a submitter's cancel (whose
    /// authority the replica checks), or a final status from the owner of an epoch at least
    /// as high as any held here.
    pub fn ended_by(&self, task: &TaskId, outcome: TaskState, end: &Delta) -> bool {
        match &end.body {
            DeltaBody::Cancel(c) => c.task == *task && outcome == TaskState::Cancelled,
            DeltaBody::Status {
                task: t,
                epoch,
                entry,
            } => {
                *t == *task
                    && entry.state == outcome
                    && matches!(outcome, TaskState::Succeeded | TaskState::Failed)
                    && entry.reporter == end.origin
                    && *epoch >= self.max_epoch()
                    && self
                        .leases
                        .get(epoch)
                        .is_none_or(|l| l.value.owner == entry.reporter)
            }
            _ => false,
        }
    }

    /// The state the task ended in, if its parts say it ended: cancelled, succeeded, or
    /// failed with every attempt used. Depends only on the replicated parts, never on a
    /// clock, so every replica holding the same parts agrees.
    pub fn ended(&self) -> Option<TaskState> {
        if self.is_cancelled() {
            return Some(TaskState::Cancelled);
        }
        let spec = self.spec.as_ref()?;
        let (_, top) = self.statuses.iter().next_back()?;
        match top.value.state {
            TaskState::Succeeded => Some(TaskState::Succeeded),
            TaskState::Cancelled => Some(TaskState::Cancelled),
            TaskState::Failed if self.failed_attempts() >= spec.value.spec.max_attempts => {
                Some(TaskState::Failed)
            }
            _ => None,
        }
    }

    /// Whether the task was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_some()
    }

    /// The status reported for `epoch`.
    pub fn status(&self, epoch: Epoch) -> Option<&StatusEntry> {
        self.statuses.get(&epoch).map(|s| &s.value)
    }

    /// Epochs that ended Failed: the attempts used up.
    pub fn failed_attempts(&self) -> u32 {
        let n = self
            .statuses
            .values()
            .filter(|s| s.value.state == TaskState::Failed)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn components_hash(&self) -> impl Iterator<Item = ComponentHash> + '_ {
        self.spec
            .iter()
            .map(|s| s.hash)
            .chain(self.leases.values().map(|s| s.hash))
            .chain(self.statuses.values().map(|s| s.hash))
            .chain(self.cancel.iter().map(|s| s.hash))
    }
}

/// The outcome of merging one component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merged {
    /// The state changed.
    Changed,
    /// The state already held this or something newer.
    Unchanged,
    /// The task was compacted; the component is ignored so it cannot be revived.
    Tombstoned,
}

/// A delta that breaks a protocol rule. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// A single-writer component written by someone else.
    #[error("{kind} for {subject} written by {origin}, but only its owner may write it")]
    NotOwner {
        /// Which component.
        kind: &'static str,
        /// Whose it is.
        subject: String,
        /// Who sent it.
        origin: String,
    },
    /// The spec failed verification.
    #[error(transparent)]
    Spec(#[from] omesh_protocol::SpecError),
    /// The origin's signature over the delta does not hold.
    #[error("the signature of {origin}'s delta does not verify")]
    BadSignature {
        /// Who it claims to come from.
        origin: String,
    },
    /// The origin is not admitted to this mesh (no record with a valid certificate held).
    #[error("{origin} is not admitted: {why}")]
    NotAdmitted {
        /// Who sent it.
        origin: String,
        /// Why not.
        why: String,
    },
    /// A lease, status or cancel for a task whose spec is not held.
    #[error("{kind} for task {task}, whose spec is not held here")]
    UnknownTask {
        /// Which component.
        kind: &'static str,
        /// The task.
        task: String,
    },
    /// A lease whose epoch jumps too far past the highest known for its task.
    #[error("lease for task {task} at epoch {epoch}, more than {EPOCH_WINDOW} above the highest known ({known})")]
    EpochJump {
        /// The task.
        task: String,
        /// The epoch claimed.
        epoch: Epoch,
        /// The highest epoch known here.
        known: Epoch,
    },
    /// A status for an epoch the reporter does not hold the lease of.
    #[error("status for task {task} epoch {epoch} from {reporter}, who does not hold that epoch's lease")]
    NotEpochOwner {
        /// The task.
        task: String,
        /// The epoch.
        epoch: Epoch,
        /// Who reported.
        reporter: String,
    },
    /// A cancel not signed by an authorized submitter.
    #[error("cancel of task {task} is not signed by an authorized submitter")]
    CancelNotAuthorized {
        /// The task.
        task: String,
    },
    /// A compaction of a task that has not ended here (or ended otherwise).
    #[error("compaction of task {task} as {outcome:?}, which has not ended so here")]
    NotEnded {
        /// The task.
        task: String,
        /// The outcome claimed.
        outcome: TaskState,
    },
    /// An origin wrote more of something than any honest node does.
    #[error("{origin} is over its quota of {limit} {what}")]
    Quota {
        /// What.
        what: &'static str,
        /// Who.
        origin: String,
        /// The quota.
        limit: usize,
    },
    /// A node record whose admission certificate is missing or does not admit it.
    #[error("{origin}'s record is not admitted: {why}")]
    BadCertificate {
        /// Whose record.
        origin: String,
        /// Why not.
        why: String,
    },
    /// The origin's admission was revoked.
    #[error("{origin} was revoked")]
    Revoked {
        /// Who sent it.
        origin: String,
    },
    /// A revocation not signed by an admission key.
    #[error("revocation of {node} is not signed by one of this mesh's admission keys")]
    BadRevocation {
        /// The node named.
        node: String,
    },
    /// A field is longer than the protocol allows (the message itself was within its limit).
    #[error("{field} has {len} entries or characters, over the limit of {limit}")]
    OverLimit {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
}

impl DeltaError {
    /// Whether no honest node could have sent this, whatever else it had or lacked: a bad
    /// signature, a write in another node's name, a cancel or revocation without the key for
    /// it, a field over its limit. The rest (an unknown task, an epoch or status ahead of
    /// what is held here, an origin whose record has not arrived) can be an honest write
    /// that overtook others, and is only dropped for now.
    pub fn is_forgery(&self) -> bool {
        matches!(
            self,
            Self::NotOwner { .. }
                | Self::Spec(_)
                | Self::BadSignature { .. }
                | Self::CancelNotAuthorized { .. }
                | Self::BadRevocation { .. }
                | Self::OverLimit { .. }
        )
    }

    /// Whether an honest write that overtook what it builds on (its task's spec, its epoch's
    /// lease, its origin's record, the end of the task it compacts) fails like this: the
    /// replica holds such a delta back and tries it again as the rest arrives.
    pub fn is_early(&self) -> bool {
        matches!(
            self,
            Self::UnknownTask { .. }
                | Self::EpochJump { .. }
                | Self::NotEpochOwner { .. }
                | Self::NotEnded { .. }
                | Self::NotAdmitted { .. }
        )
    }

    /// A short, stable name of the rule broken, for the `reason` label of
    /// `omesh_deltas_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotOwner { kind, .. } => match *kind {
                "node record" => "node_not_own",
                "lease" => "lease_not_owner",
                _ => "status_not_reporter",
            },
            Self::Spec(_) => "spec_invalid",
            Self::BadSignature { .. } => "bad_signature",
            Self::NotAdmitted { .. } => "not_admitted",
            Self::UnknownTask { .. } => "unknown_task",
            Self::EpochJump { .. } => "epoch_jump",
            Self::NotEpochOwner { .. } => "status_not_epoch_owner",
            Self::CancelNotAuthorized { .. } => "cancel_not_authorized",
            Self::NotEnded { .. } => "compact_not_ended",
            Self::Quota { .. } => "quota",
            Self::BadRevocation { .. } => "bad_revocation",
            Self::Revoked { .. } => "revoked",
            Self::BadCertificate { .. } => "bad_certificate",
            Self::OverLimit { .. } => "over_limit",
        }
    }
}

/// How far above the highest epoch known for a task a lease may claim. An honest claim is
/// one above its claimant's highest known, so this only needs to cover claims that overtook
/// others on the way; a lease further out waits (it is not taken, so a later sync brings it
/// again once the epochs between have arrived). It keeps a hostile node from spending a
/// task's epochs: at 64 a step, u64 lasts 2^58 claims.
pub const EPOCH_WINDOW: Epoch = 64;
/// The most tombstones one origin may hold here for tasks this replica never knew. A replica
/// writes one for each task it compacts; tasks a replica never saw are few (it joined after
/// they ended), so this bounds what a hostile node can create without slowing an honest one.
pub const MAX_BLIND_TOMBSTONES: usize = 4096;

/// A tombstone: how the task ended, and the delta that ended it (kept to be served again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tomb {
    /// The final state.
    pub outcome: TaskState,
    /// The owner's final status or the submitter's cancel, as signed.
    pub end: Option<Box<Delta>>,
}

/// The most addresses a node record may list.
pub const MAX_ADDRS: usize = 32;
/// The most tags a node record may carry.
pub const MAX_TAGS: usize = 64;
/// The most image digests a node record may advertise.
pub const MAX_IMAGES: usize = 4096;

fn limit(field: &'static str, len: usize, limit: usize) -> Result<(), DeltaError> {
    if len > limit {
        return Err(DeltaError::OverLimit { field, len, limit });
    }
    Ok(())
}

/// A node's record as held: the record and the stamp of the delta that wrote it, and when
/// this replica last heard of the node. That time is local (never replicated, outside the
/// digest); it lives here so a replica keeps one table per known node, not two.
#[derive(Debug, Clone)]
struct NodeSlot {
    rec: Arc<NodeRecord>,
    stamp: u64,
    sig: Sig,
    heard: Millis,
}

impl NodeSlot {
    fn at(&self) -> Stamp {
        Stamp {
            origin: self.rec.id,
            stamp: self.stamp,
        }
    }
}

/// The whole replicated state.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Per node its record, shared with every replica that holds the same version. The slot
    /// keeps neither the stamp's origin (always the node itself) nor the digest hash (it
    /// covers only the durable fields, rehashed on the rare change of those): at 10,000
    /// nodes every replica holds 10,000 of these.
    nodes: BTreeMap<NodeId, NodeSlot>,
    tasks: BTreeMap<TaskId, TaskRecord>,
    tombstones: BTreeMap<TaskId, Stamped<Tomb>>,
    /// Per node, the highest version of its record some replica suspected, kept only while
    /// no newer record of that node is held (a newer record refutes it).
    suspects: BTreeMap<NodeId, Stamped<(u64, u64)>>,
    /// Revoked nodes, grow-only.
    revoked: BTreeMap<NodeId, Stamped<Revocation>>,
    /// Per origin, the tombstones it wrote that this replica took for tasks it never knew.
    blind_tombstones: BTreeMap<NodeId, usize>,
    digest: Digest4,
}

impl PartialEq for State {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

fn stamped<T>(at: Stamp, sig: Sig, value: T, hash: ComponentHash) -> Stamped<T> {
    Stamped {
        at,
        value,
        sig,
        hash,
    }
}

/// A held component as the delta that wrote it, with its writer's signature.
fn written(at: Stamp, sig: Sig, body: DeltaBody) -> Delta {
    Delta {
        origin: at.origin,
        stamp: at.stamp,
        body,
        sig,
    }
}

fn node_order(a: &Arc<NodeRecord>, b: &Arc<NodeRecord>) -> Ordering {
    a.version()
        .cmp(&b.version())
        .then_with(|| canonical(a).cmp(&canonical(b)))
}

fn status_order(a: &StatusEntry, b: &StatusEntry) -> Ordering {
    a.rank()
        .cmp(&b.rank())
        .then_with(|| a.error.cmp(&b.error))
        .then_with(|| a.reporter.cmp(&b.reporter))
}

/// Last-writer-wins by `order`; equal values keep the lower stamp so the choice is deterministic.
fn merge_slot<T: Clone>(
    digest: &mut Digest4,
    slot: &mut Option<Stamped<T>>,
    incoming: &Stamped<T>,
    order: impl Fn(&T, &T) -> Ordering,
) -> Merged {
    match slot {
        None => {
            digest.add(incoming.hash);
            *slot = Some(incoming.clone());
            Merged::Changed
        }
        Some(cur) => match order(&incoming.value, &cur.value) {
            Ordering::Greater => {
                digest.replace(cur.hash, incoming.hash);
                *cur = incoming.clone();
                Merged::Changed
            }
            Ordering::Equal if incoming.at < cur.at && incoming.hash == cur.hash => {
                // The same value (as the digest sees it) by a lower stamp: take that write
                // whole, value and signature with its stamp, so it is served as signed.
                cur.clone_from(incoming);
                Merged::Unchanged
            }
            _ => Merged::Unchanged,
        },
    }
}

/// `merge_slot` on the entry of `key` in `map`.
fn merge_entry<K: Ord, T: Clone>(
    digest: &mut Digest4,
    map: &mut BTreeMap<K, Stamped<T>>,
    key: K,
    incoming: &Stamped<T>,
    order: impl Fn(&T, &T) -> Ordering,
) -> Merged {
    let mut slot = map.remove(&key);
    let merged = merge_slot(digest, &mut slot, incoming, order);
    if let Some(s) = slot {
        map.insert(key, s);
    }
    merged
}

/// `merge_slot` on a present value, in place.
fn merge_into<T: Clone>(
    digest: &mut Digest4,
    cur: &mut Stamped<T>,
    incoming: &Stamped<T>,
    order: impl Fn(&T, &T) -> Ordering,
) -> Merged {
    match order(&incoming.value, &cur.value) {
        Ordering::Greater => {
            digest.replace(cur.hash, incoming.hash);
            cur.clone_from(incoming);
            Merged::Changed
        }
        Ordering::Equal if incoming.at < cur.at && incoming.hash == cur.hash => {
            cur.clone_from(incoming);
            Merged::Unchanged
        }
        _ => Merged::Unchanged,
    }
}

fn lease_order(a: &Lease, b: &Lease) -> Ordering {
    a.rank().cmp(&b.rank())
}

fn same(_: &impl Sized, _: &impl Sized) -> Ordering {
    Ordering::Equal
}

/// Joins one task record into another, component by component, in place.
fn merge_record(digest: &mut Digest4, rec: &mut TaskRecord, theirs: &TaskRecord) {
    if let Some(s) = &theirs.spec {
        merge_slot(digest, &mut rec.spec, s, same);
    }
    for (epoch, s) in &theirs.leases {
        merge_lease_at(digest, rec, *epoch, s);
    }
    for (epoch, s) in &theirs.statuses {
        if rec.leases.get(epoch).map(|l| l.value.owner) != Some(s.value.reporter) {
            // Only the epoch's owner reports on it (as `State::check_against` holds for a
            // single delta): a status whose lease lost to another owner's goes.
            continue;
        }
        match rec.statuses.get_mut(epoch) {
            Some(cur) => {
                merge_into(digest, cur, s, status_order);
            }
            None => {
                digest.add(s.hash);
                rec.statuses.insert(*epoch, s.clone());
            }
        }
    }
    if let Some(s) = &theirs.cancel {
        merge_slot(digest, &mut rec.cancel, s, same);
    }
}

/// Merges the lease of `epoch`. Where another owner's lease of the same epoch loses to it,
/// that owner's statuses of the epoch go too: a status stands only for the epoch's owner.
fn merge_lease_at(
    digest: &mut Digest4,
    rec: &mut TaskRecord,
    epoch: Epoch,
    incoming: &Stamped<Lease>,
) -> Merged {
    let merged = merge_entry(digest, &mut rec.leases, epoch, incoming, lease_order);
    if merged == Merged::Changed {
        let owner = incoming.value.owner;
        if let Some(s) = rec
            .statuses
            .get(&epoch)
            .filter(|s| s.value.reporter != owner)
        {
            digest.remove(s.hash);
            rec.statuses.remove(&epoch);
        }
    }
    merged
}

/// The live record of `id`, created empty if new; `None` once the task is compacted.
fn live<'a>(
    tasks: &'a mut BTreeMap<TaskId, TaskRecord>,
    tombstones: &BTreeMap<TaskId, Stamped<Tomb>>,
    id: TaskId,
) -> Option<&'a mut TaskRecord> {
    if tombstones.contains_key(&id) {
        return None;
    }
    Some(tasks.entry(id).or_default())
}

impl State {
    /// The held node whose id begins with the eight bytes of `prefix` (big-endian), the
    /// first in id order if several do: lets a list of peers keep 8 bytes an entry, not 32.
    pub fn node_by_prefix(&self, prefix: u64) -> Option<&NodeRecord> {
        let mut low = [0u8; 32];
        low[..8].copy_from_slice(&prefix.to_be_bytes());
        self.nodes
            .range(NodeId(low)..)
            .next()
            .filter(|(id, _)| id.0[..8] == low[..8])
            .map(|(_, s)| &*s.rec)
    }

    /// When this replica last heard of `id` (its record advanced, or it answered), on the
    /// local clock; `None` if no record of it is held.
    pub fn heard(&self, id: &NodeId) -> Option<Millis> {
        self.nodes.get(id).map(|s| s.heard)
    }

    /// Notes that `id` was heard of at `at`; nothing if no record of it is held (one will
    /// come by sync, and it is heard of then).
    pub(crate) fn hear(&mut self, id: &NodeId, at: Millis) {
        if let Some(s) = self.nodes.get_mut(id) {
            s.heard = s.heard.max(at);
        }
    }

    /// Rebuilds the node table with full B-tree nodes. Entries inserted one by one in key
    /// order (a sync reply is sorted) leave every node half full; a joining replica takes
    /// thousands that way.
    pub(crate) fn compact(&mut self) {
        self.nodes = std::mem::take(&mut self.nodes).into_iter().collect();
    }

    /// The digest of everything held.
    pub fn digest(&self) -> StateDigest {
        self.digest.to_wire()
    }

    /// A node's record.
    pub fn node(&self, id: &NodeId) -> Option<&NodeRecord> {
        self.nodes.get(id).map(|s| &*s.rec)
    }

    /// Every node record.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values().map(|s| &*s.rec)
    }

    /// The held nodes before `id` in id order, nearest first, wrapping round past the
    /// first to the last; `id` itself is left out. Each is visited once.
    pub fn nodes_before(&self, id: &NodeId) -> impl Iterator<Item = &NodeRecord> + '_ {
        let id = *id;
        self.nodes
            .range(..id)
            .rev()
            .chain(self.nodes.range(id..).rev())
            .filter(move |(k, _)| **k != id)
            .map(|(_, s)| &*s.rec)
    }

    /// The held nodes after `id` in id order, nearest first, wrapping round past the last to
    /// the first; `id` itself is left out. Each is visited once.
    pub fn nodes_after(&self, id: &NodeId) -> impl Iterator<Item = &NodeRecord> + '_ {
        let id = *id;
        self.nodes
            .range(id..)
            .chain(self.nodes.range(..id))
            .filter(move |(k, _)| **k != id)
            .map(|(_, s)| &*s.rec)
    }

    /// Number of node records.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// A task's record.
    pub fn task(&self, id: &TaskId) -> Option<&TaskRecord> {
        self.tasks.get(id)
    }

    /// Every live task record.
    pub fn tasks(&self) -> impl Iterator<Item = (&TaskId, &TaskRecord)> {
        self.tasks.iter()
    }

    /// Number of live task records.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// A compacted task's final state.
    pub fn tombstone(&self, id: &TaskId) -> Option<TaskState> {
        self.tombstones.get(id).map(|s| s.value.outcome)
    }

    /// Number of tombstones.
    pub fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }

    /// Checks the single-writer rules of a delta without changing anything.
    pub fn check(delta: &Delta) -> Result<(), DeltaError> {
        let not_owner = |kind, subject: NodeId| DeltaError::NotOwner {
            kind,
            subject: subject.short(),
            origin: delta.origin.short(),
        };
        match &delta.body {
            DeltaBody::Node(rec) if rec.id != delta.origin => Err(not_owner("node record", rec.id)),
            DeltaBody::Node(rec) => {
                limit("node.addrs", rec.addrs.len(), MAX_ADDRS)?;
                limit("node.tags", rec.tags.len(), MAX_TAGS)?;
                limit("node.images", rec.images.len(), MAX_IMAGES)?;
                limit(
                    "node.rtt_ms",
                    rec.rtt_ms.len(),
                    omesh_protocol::node::MAX_RTT_ENTRIES,
                )
            }
            DeltaBody::Lease { lease, .. } if lease.owner != delta.origin => {
                Err(not_owner("lease", lease.owner))
            }
            DeltaBody::Status { entry, .. } if entry.reporter != delta.origin => {
                Err(not_owner("status", entry.reporter))
            }
            DeltaBody::Status { entry, .. } => limit(
                "status.error",
                entry.error.chars().count(),
                omesh_protocol::task::MAX_ERROR_CHARS,
            ),
            _ => Ok(()),
        }
    }

    /// Checks the rules that hold against what this state already has: a lease, status or
    /// cancel only for a task whose spec is held; a lease's epoch within [`EPOCH_WINDOW`] of
    /// the highest known; a status only from the owner of its epoch's lease; a compaction
    /// only of a task that ended here as the tombstone says, or one never known here (within
    /// a quota per origin). A delta that fails may be honest and early: it is not taken, so
    /// a later sync offers it again.
    pub fn check_against(&self, delta: &Delta) -> Result<(), DeltaError> {
        let task_of = |task: &TaskId, kind| match self.tasks.get(task) {
            Some(rec) if rec.spec.is_some() => Ok(Some(rec)),
            _ if self.tombstones.contains_key(task) => Ok(None),
            _ => Err(DeltaError::UnknownTask {
                kind,
                task: task.short(),
            }),
        };
        match &delta.body {
            DeltaBody::Lease { task, lease } => {
                let Some(rec) = task_of(task, "lease")? else {
                    return Ok(());
                };
                let known = rec.max_epoch();
                if lease.epoch > known.saturating_add(EPOCH_WINDOW) {
                    return Err(DeltaError::EpochJump {
                        task: task.short(),
                        epoch: lease.epoch,
                        known,
                    });
                }
            }
            DeltaBody::Status { task, epoch, entry } => {
                let Some(rec) = task_of(task, "status")? else {
                    return Ok(());
                };
                if rec.leases.get(epoch).map(|l| l.value.owner) != Some(entry.reporter) {
                    return Err(DeltaError::NotEpochOwner {
                        task: task.short(),
                        epoch: *epoch,
                        reporter: entry.reporter.short(),
                    });
                }
            }
            DeltaBody::Cancel(c) => {
                task_of(&c.task, "cancel")?;
            }
            DeltaBody::Compact { task, outcome, end } => {
                if self.tombstones.contains_key(task) {
                    return Ok(());
                }
                match self.tasks.get(task) {
                    Some(rec)
                        if rec.ended() != Some(*outcome)
                            && !end
                                .as_deref()
                                .is_some_and(|e| rec.ended_by(task, *outcome, e)) =>
                    {
                        return Err(DeltaError::NotEnded {
                            task: task.short(),
                            outcome: *outcome,
                        })
                    }
                    Some(_) => {}
                    None => {
                        let held = self.blind_tombstones.get(&delta.origin).copied();
                        if held.unwrap_or(0) >= MAX_BLIND_TOMBSTONES {
                            return Err(DeltaError::Quota {
                                what: "tombstones of tasks unknown here",
                                origin: delta.origin.short(),
                                limit: MAX_BLIND_TOMBSTONES,
                            });
                        }
                    }
                }
            }
            DeltaBody::Node(_) | DeltaBody::Spec(_) | DeltaBody::Suspect { .. } => {}
            DeltaBody::Revoke(_) => {}
        }
        Ok(())
    }

    /// Merges one delta, after checking the writer rules ([`State::check`],
    /// [`State::check_against`]). Signatures, admission and who may submit or cancel are the
    /// replica's to check first (see `Replica`).
    pub fn apply(&mut self, delta: &Delta) -> Result<Merged, DeltaError> {
        Self::check(delta)?;
        self.check_against(delta)?;
        let at = Stamp {
            origin: delta.origin,
            stamp: delta.stamp,
        };
        let sig = delta.sig;
        Ok(match &delta.body {
            DeltaBody::Node(rec) => self.merge_node(rec, delta.stamp, sig),
            DeltaBody::Spec(spec) => {
                let id = spec.id();
                self.merge_spec(
                    id,
                    &stamped(at, sig, Arc::new(spec.clone()), ComponentHash::spec(&id)),
                )
            }
            DeltaBody::Lease { task, lease } => self.merge_lease(
                *task,
                &stamped(at, sig, *lease, ComponentHash::lease(task, lease)),
            ),
            DeltaBody::Status { task, epoch, entry } => self.merge_status(
                *task,
                *epoch,
                &stamped(
                    at,
                    sig,
                    entry.clone(),
                    ComponentHash::status(task, *epoch, entry),
                ),
            ),
            DeltaBody::Cancel(c) => self.merge_cancel(
                c.task,
                &stamped(at, sig, *c, ComponentHash::cancel(&c.task)),
            ),
            DeltaBody::Compact { task, outcome, end } => {
                let blind = !self.tasks.contains_key(task);
                let tomb = Tomb {
                    outcome: *outcome,
                    end: end.clone(),
                };
                let merged = self.merge_tombstone(
                    *task,
                    &stamped(at, sig, tomb, ComponentHash::tombstone(task, *outcome)),
                );
                if blind && merged == Merged::Changed {
                    *self.blind_tombstones.entry(delta.origin).or_default() += 1;
                }
                merged
            }
            DeltaBody::Suspect { node, version } => self.merge_suspect(
                *node,
                &stamped(at, sig, *version, ComponentHash::suspect(node, *version)),
            ),
            DeltaBody::Revoke(r) => {
                let hash = ComponentHash::revoke(&r.node);
                merge_entry(
                    &mut self.digest,
                    &mut self.revoked,
                    r.node,
                    &stamped(at, sig, *r, hash),
                    same,
                )
            }
        })
    }

    /// Whether an admission key's holder revoked `id`.
    pub fn is_revoked(&self, id: &NodeId) -> bool {
        self.revoked.contains_key(id)
    }

    /// Revoked nodes.
    pub fn revoked(&self) -> impl Iterator<Item = &NodeId> {
        self.revoked.keys()
    }

    /// The version of `id`'s record suspected, if no newer record of it is held.
    pub fn suspicion(&self, id: &NodeId) -> Option<(u64, u64)> {
        self.suspects.get(id).map(|s| s.value)
    }

    /// Nodes under suspicion, with the version suspected.
    pub fn suspects(&self) -> impl Iterator<Item = (&NodeId, (u64, u64))> {
        self.suspects.iter().map(|(id, s)| (id, s.value))
    }

    /// A suspicion holds only while no record of its node at least as new is held: the record
    /// is the node's answer (or its restart), so the older suspicion is dropped for good.
    fn merge_suspect(&mut self, node: NodeId, incoming: &Stamped<(u64, u64)>) -> Merged {
        if self
            .nodes
            .get(&node)
            .is_some_and(|r| r.rec.version() > incoming.value)
        {
            return Merged::Unchanged;
        }
        merge_entry(
            &mut self.digest,
            &mut self.suspects,
            node,
            incoming,
            Ord::cmp,
        )
    }

    /// Drops a suspicion of `node` that its record at `version` answers.
    fn refute(&mut self, node: &NodeId, version: (u64, u64)) {
        if self.suspects.is_empty() {
            return;
        }
        if let Some(s) = self.suspects.get(node).filter(|s| s.value < version) {
            self.digest.remove(s.hash);
            self.suspects.remove(node);
        }
    }

    /// Last-writer-wins by version (then by content, for two records of one version);
    /// old or duplicate records (gossip fan-out delivers each several times) are settled
    /// without hashing or cloning. A newer record is shared, and rehashed only if its durable
    /// part (all the digest covers) changed, which a load move never does.
    fn merge_node(&mut self, rec: &Arc<NodeRecord>, stamp: u64, sig: Sig) -> Merged {
        match self.nodes.get_mut(&rec.id) {
            None => {
                self.digest.add(ComponentHash::node(rec));
                self.digest
                    .add(ComponentHash::node_version(&rec.id, rec.version()));
                self.nodes.insert(
                    rec.id,
                    NodeSlot {
                        rec: Arc::clone(rec),
                        stamp,
                        sig,
                        heard: 0,
                    },
                );
            }
            Some(cur) => {
                match rec.version().cmp(&cur.rec.version()) {
                    Ordering::Less => return Merged::Unchanged,
                    Ordering::Equal if Arc::ptr_eq(rec, &cur.rec) || **rec == *cur.rec => {
                        // Equal values keep the lower stamp (and its signature) so the
                        // choice is deterministic.
                        if stamp < cur.stamp {
                            cur.stamp = stamp;
                            cur.sig = sig;
                        }
                        return Merged::Unchanged;
                    }
                    Ordering::Equal if node_order(rec, &cur.rec) != Ordering::Greater => {
                        return Merged::Unchanged
                    }
                    _ => {}
                }
                if rec.durable() != cur.rec.durable() {
                    self.digest
                        .replace(ComponentHash::node(&cur.rec), ComponentHash::node(rec));
                }
                self.digest.replace(
                    ComponentHash::node_version(&rec.id, cur.rec.version()),
                    ComponentHash::node_version(&rec.id, rec.version()),
                );
                cur.rec = Arc::clone(rec);
                cur.stamp = stamp;
                cur.sig = sig;
            }
        }
        self.refute(&rec.id, rec.version());
        Merged::Changed
    }

    fn merge_spec(&mut self, id: TaskId, incoming: &Stamped<Arc<SignedTaskSpec>>) -> Merged {
        let Some(rec) = live(&mut self.tasks, &self.tombstones, id) else {
            return Merged::Tombstoned;
        };
        // Specs are content-addressed: the same id is the same spec, so only presence matters.
        merge_slot(&mut self.digest, &mut rec.spec, incoming, |_, _| {
            Ordering::Equal
        })
    }

    fn merge_lease(&mut self, id: TaskId, incoming: &Stamped<Lease>) -> Merged {
        let Some(rec) = live(&mut self.tasks, &self.tombstones, id) else {
            return Merged::Tombstoned;
        };
        merge_lease_at(&mut self.digest, rec, incoming.value.epoch, incoming)
    }

    fn merge_status(
        &mut self,
        id: TaskId,
        epoch: Epoch,
        incoming: &Stamped<StatusEntry>,
    ) -> Merged {
        let Some(rec) = live(&mut self.tasks, &self.tombstones, id) else {
            return Merged::Tombstoned;
        };
        match rec.statuses.get_mut(&epoch) {
            Some(cur) => merge_into(&mut self.digest, cur, incoming, status_order),
            None => {
                self.digest.add(incoming.hash);
                rec.statuses.insert(epoch, incoming.clone());
                Merged::Changed
            }
        }
    }

    fn merge_cancel(&mut self, id: TaskId, incoming: &Stamped<SignedCancel>) -> Merged {
        let Some(rec) = live(&mut self.tasks, &self.tombstones, id) else {
            return Merged::Tombstoned;
        };
        merge_slot(&mut self.digest, &mut rec.cancel, incoming, |_, _| {
            Ordering::Equal
        })
    }

    fn merge_tombstone(&mut self, id: TaskId, incoming: &Stamped<Tomb>) -> Merged {
        if let Some(rec) = self.tasks.remove(&id) {
            for h in rec.components_hash() {
                self.digest.remove(h);
            }
        }
        merge_entry(
            &mut self.digest,
            &mut self.tombstones,
            id,
            incoming,
            |a, b| a.outcome.code().cmp(&b.outcome.code()),
        )
    }

    /// The delta that ended `task` here, as its writer signed it: the submitter's cancel,
    /// or the final status of the top epoch. What a compaction carries as its evidence.
    pub fn ending(&self, task: &TaskId) -> Option<Delta> {
        let rec = self.tasks.get(task)?;
        if let Some(c) = &rec.cancel {
            return Some(written(c.at, c.sig, DeltaBody::Cancel(c.value)));
        }
        let (epoch, s) = rec.statuses.iter().next_back()?;
        Some(written(
            s.at,
            s.sig,
            DeltaBody::Status {
                task: *task,
                epoch: *epoch,
                entry: s.value.clone(),
            },
        ))
    }

    /// Every component as the delta that would recreate it, for anti-entropy. A task's
    /// spec comes before its other parts.
    pub fn components(&self) -> impl Iterator<Item = Delta> + '_ {
        self.components_where(|_| true)
    }

    /// The components whose stamp `keep` accepts, in the order of [`State::components`].
    /// Values are cloned only for the components kept: a sync reply usually needs a few
    /// records out of thousands.
    pub fn components_where<'a>(
        &'a self,
        keep: impl Fn(Stamp) -> bool + Copy + 'a,
    ) -> impl Iterator<Item = Delta> + 'a {
        let nodes = self
            .nodes
            .values()
            .filter(move |s| keep(s.at()))
            .map(move |s| written(s.at(), s.sig, DeltaBody::Node(Arc::clone(&s.rec))));
        let tasks = self.tasks.iter().flat_map(move |(id, rec)| {
            let id = *id;
            let spec = rec
                .spec
                .iter()
                .filter(move |s| keep(s.at))
                .map(move |s| written(s.at, s.sig, DeltaBody::Spec((*s.value).clone())));
            let lease = rec
                .leases
                .values()
                .filter(move |s| keep(s.at))
                .map(move |s| {
                    written(
                        s.at,
                        s.sig,
                        DeltaBody::Lease {
                            task: id,
                            lease: s.value,
                        },
                    )
                });
            let statuses =
                rec.statuses
                    .iter()
                    .filter(move |(_, s)| keep(s.at))
                    .map(move |(epoch, s)| {
                        written(
                            s.at,
                            s.sig,
                            DeltaBody::Status {
                                task: id,
                                epoch: *epoch,
                                entry: s.value.clone(),
                            },
                        )
                    });
            let cancel = rec
                .cancel
                .iter()
                .filter(move |s| keep(s.at))
                .map(move |s| written(s.at, s.sig, DeltaBody::Cancel(s.value)));
            spec.chain(lease).chain(statuses).chain(cancel)
        });
        let tombs = self
            .tombstones
            .iter()
            .filter(move |(_, s)| keep(s.at))
            .map(move |(id, s)| {
                written(
                    s.at,
                    s.sig,
                    DeltaBody::Compact {
                        task: *id,
                        outcome: s.value.outcome,
                        end: s.value.end.clone(),
                    },
                )
            });
        let suspects =
            self.suspects
                .iter()
                .filter(move |(_, s)| keep(s.at))
                .map(move |(node, s)| {
                    written(
                        s.at,
                        s.sig,
                        DeltaBody::Suspect {
                            node: *node,
                            version: s.value,
                        },
                    )
                });
        let revoked = self
            .revoked
            .values()
            .filter(move |s| keep(s.at))
            .map(move |s| written(s.at, s.sig, DeltaBody::Revoke(s.value)));
        nodes
            .chain(tasks)
            .chain(tombs)
            .chain(suspects)
            .chain(revoked)
    }

    /// Stamps of every component, without cloning values: what a version vector covers.
    pub fn stamps(&self) -> impl Iterator<Item = Stamp> + '_ {
        let nodes = self.nodes.values().map(NodeSlot::at);
        let tasks = self.tasks.values().flat_map(|rec| {
            rec.spec
                .iter()
                .map(|s| s.at)
                .chain(rec.leases.values().map(|s| s.at))
                .chain(rec.statuses.values().map(|s| s.at))
                .chain(rec.cancel.iter().map(|s| s.at))
        });
        nodes
            .chain(tasks)
            .chain(self.tombstones.values().map(|s| s.at))
            .chain(self.suspects.values().map(|s| s.at))
            .chain(self.revoked.values().map(|s| s.at))
    }

    /// The image digest a task's spec pins, if its spec is known and well formed.
    pub fn image_of(&self, id: &TaskId) -> Option<Digest> {
        let spec = self.tasks.get(id)?.spec.as_ref()?;
        omesh_protocol::ImageRef::parse(&spec.value.spec.image)
            .ok()
            .map(|r| r.digest)
    }
}

impl Crdt for State {
    /// Joins two already-verified states: one ordered pass over each map, merging each record
    /// in place, reusing cached hashes.
    fn merge(&mut self, other: &Self) {
        for s in other.nodes.values() {
            self.merge_node(&s.rec, s.stamp, s.sig);
        }
        for (id, s) in &other.revoked {
            merge_entry(&mut self.digest, &mut self.revoked, *id, s, same);
        }
        for (id, s) in &other.tombstones {
            self.merge_tombstone(*id, s);
        }
        for (id, s) in &other.suspects {
            self.merge_suspect(*id, s);
        }
        if self.tasks.is_empty() && self.tombstones.is_empty() {
            // Cold join: take the other's records wholesale.
            self.tasks.clone_from(&other.tasks);
            for rec in self.tasks.values() {
                for h in rec.components_hash() {
                    self.digest.add(h);
                }
            }
            return;
        }
        let mut missing = Vec::new();
        let mut mine = self.tasks.iter_mut().peekable();
        for (id, theirs) in &other.tasks {
            if !self.tombstones.is_empty() && self.tombstones.contains_key(id) {
                continue;
            }
            while mine.next_if(|(k, _)| *k < id).is_some() {}
            match mine.next_if(|(k, _)| *k == id) {
                Some((_, rec)) => merge_record(&mut self.digest, rec, theirs),
                None => missing.push((*id, theirs)),
            }
        }
        for (id, theirs) in missing {
            let rec = self.tasks.entry(id).or_default();
            merge_record(&mut self.digest, rec, theirs);
        }
    }
}
