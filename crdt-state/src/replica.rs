//! The sans-IO replica: events in with an explicit `now`, actions out.
//!
//! `handle(now, input)` merges what peers say and what the local executor reports;
//! `poll_action()` hands back what to send or run; `poll_timeout()` says when to tick next.
//! The decisions taken on a tick (claims, fencing, retries, compaction) live in `decide.rs`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use omesh_protocol::codec::canonical_len;
use omesh_protocol::{
    Delta, DeltaBody, Digest, GossipMessage, Millis, NodeId, NodeRecord, SignedTaskSpec,
    StateDigest, SyncReply, SyncRequest, TaskId, Wire,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::{ConfigError, ReplicaConfig};
use crate::digest::{first8, mix64, splitmix64};
use crate::liveness::{Health, RttEstimate};
use crate::merge::{DeltaError, Merged, State};
use crate::probe::Prober;
use crate::record::RecordPublisher;
use crate::runs::{LocalRun, Phase, TaskBook};
use crate::suspicion::Suspicions;
use crate::sync::{self, SyncState, SYNC_TIMEOUT_MS};
use crate::vector::{entry_of, VersionVector};

mod decide;
mod membership;

pub use crate::io::{Action, ExecEvent, Input, InputError, PropagationSample, Stats, StopReason};

/// Deltas per gossip message; a larger batch is split.
const MAX_DELTAS_PER_MESSAGE: usize = 64;
/// A sync reply that applied at least this many deltas has the per-node maps rebuilt.
const COMPACT_AFTER: u64 = 256;

/// The replica: the whole protocol of one omesh node, with no I/O.
///
/// Its methods come in four kinds, as quinn-proto's `Connection`:
/// - **queries** (`&self`): [`Replica::id`], [`Replica::health`], [`Replica::task_views`],
///   [`Replica::live_peers`], [`Replica::alive_nodes`], [`Replica::images_in_use`],
///   [`Replica::is_ready`], [`Replica::digest`], [`Replica::stats`], ... They never change
///   anything and may be called at any time.
/// - **`handle*`**: [`Replica::handle`] takes one [`Input`] with the driver's `now`;
///   [`Replica::handle_gossip`] and [`Replica::handle_gossip_bytes`] are the same for a
///   gossip message by reference or as raw bytes; [`Replica::submit`] is `Input::Submit`
///   that returns the task id.
/// - **`poll_*`**: [`Replica::poll_action`] hands back, in order, what the inputs caused;
///   [`Replica::poll_timeout`] says when the replica next wants an [`Input::Tick`].
/// - **draining helpers** such as [`Replica::take_propagation_samples`].
///
/// # The order a driver follows
/// 1. Feed one input with `handle*(now, …)`. `now` is the driver's monotonic clock in
///    milliseconds; it never goes back for one replica.
/// 2. Call `poll_action` until it returns `None`, carrying out each action. Executor
///    reports (`Input::Executor`) and `Input::SyncFailed` may be fed while draining (they only append); any other
///    input waits until the queue is empty.
/// 3. Read `poll_timeout` and feed `Input::Tick` no later than the time it names (a time
///    already past means at once). Ticking early is harmless.
///
/// # The duties of a driver
/// - Every `Action::StartTask` is answered by `Input::Executor` reports for the same task
///   and epoch: `Started` when the instance runs, then `Exited` or `Failed`; or `Failed`
///   at once when it cannot start.
/// - Every `Action::StopTask` is answered with `ExecEvent::Stopped` (or the `Exited`/`Failed`
///   of an instance that ended meanwhile), also when nothing runs for that epoch: until
///   then the run stays Stopping, the node keeps the task, and the task is never compacted.
/// - `Input::Gossip::via` names the peer the message was delivered by (gossipsub's
///   `propagation_source`), not its publisher: a gap the delivery shows is closed by
///   syncing with that relay when the origin is not alive.
/// - `Action::SendSync` gets either the peer's `Input::SyncReply` or `Input::SyncFailed`;
///   `Action::ReplySync` is sent back on the request's channel; `Action::SendProbe` is best
///   effort (a lost probe is a missed answer, which is what probing measures).
/// - `Input::Connected` when a transport connection to a peer comes up; `Input::Load`,
///   `Input::Rtt`, `Input::Addresses` and `Input::Images` when those facts change;
///   `Input::Leave` before a graceful shutdown.
/// - The replica's random stream comes from `ReplicaConfig::seed`: a driver gives each node
///   (and each incarnation) a fresh one.
///
/// The conformance suite in `omesh-harness` (`conformance::run_all`) checks these duties;
/// the harness, netsim and the peer's in-process driver each run it.
#[derive(Debug)]
pub struct Replica {
    cfg: ReplicaConfig,
    state: State,
    me: NodeRecord,
    /// The version vector, its hash and its gaps.
    vector: VersionVector,
    /// Sync requests in flight, anti-entropy, and whether the view is synced.
    sync: SyncState,
    next_counter: u64,
    /// When each suspicion held reached this node.
    suspicions: Suspicions,
    prober: Prober,
    rtt: BTreeMap<NodeId, RttEstimate>,
    /// Local runs and what this node noted of the other tasks between passes.
    tasks: TaskBook,
    outbox: VecDeque<Action>,
    pending: Vec<Delta>,
    /// When this node's record is next published, and what the last one said.
    record: RecordPublisher,
    next_eval: Option<Millis>,
    rng: ChaCha8Rng,
    stats: Stats,
    started: bool,
    propagation: Vec<PropagationSample>,
}

impl Replica {
    /// A replica for the configured node. The config is validated here.
    pub fn new(cfg: ReplicaConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let mut me = NodeRecord::new(cfg.node_id, cfg.incarnation, cfg.capacity);
        me.tags = cfg.tags.clone();
        // The configured seed, the id and the incarnation each mixed on their own: the id alone
        // would cancel a seed derived from it, and a restart must not replay the random
        // stream (probe order, claim staggers) of the incarnation before.
        let rng = ChaCha8Rng::seed_from_u64(
            splitmix64(cfg.seed)
                ^ mix64(u64::from_le_bytes(first8(&cfg.node_id.0)))
                ^ splitmix64(cfg.incarnation.rotate_left(32)),
        );
        Ok(Self {
            me,
            state: State::default(),
            vector: VersionVector::default(),
            sync: SyncState::default(),
            next_counter: 0,
            suspicions: Suspicions::default(),
            prober: Prober::default(),
            rtt: BTreeMap::new(),
            tasks: TaskBook::default(),
            outbox: VecDeque::new(),
            pending: Vec::new(),
            record: RecordPublisher::default(),
            next_eval: None,
            rng,
            stats: Stats::default(),
            started: false,
            propagation: Vec::new(),
            cfg,
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.cfg.node_id
    }

    /// The configuration in force.
    pub fn config(&self) -> &ReplicaConfig {
        &self.cfg
    }

    /// The replicated state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The state digest.
    pub fn digest(&self) -> StateDigest {
        self.state.digest()
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Takes the newer node records merged since the last call, with the writer's and this
    /// node's clocks: the delta propagation latency (includes any clock offset).
    pub fn take_propagation_samples(&mut self) -> Vec<PropagationSample> {
        std::mem::take(&mut self.propagation)
    }

    /// An order-free hash of the version vector (zero entries left out), for a digest-only
    /// sync to tell equal vectors apart from different ones without sending either.
    pub fn vclock_hash(&self) -> u64 {
        self.vector.hash()
    }

    /// The version vector: per origin, the stamp up to which everything is held.
    pub fn version_vector(&self) -> Vec<(NodeId, u64)> {
        self.vector.entries()
    }

    /// The stamp of `origin` up to which this replica holds everything (0: nothing).
    pub fn version_of(&self, origin: &NodeId) -> u64 {
        self.vector.get(origin)
    }

    /// Feeds one input. Everything it causes is queued for [`Replica::poll_action`].
    pub fn handle(&mut self, now: Millis, input: Input) -> Result<(), InputError> {
        if !self.started {
            // What the node learns of itself before it starts goes into its first record,
            // rather than into a second one a period later (at boot every node would publish
            // twice, and every record reaches every node).
            match input {
                Input::Addresses(addrs) => {
                    self.me.addrs = addrs;
                    return Ok(());
                }
                Input::Load(sample) => {
                    self.me.load = sample;
                    return Ok(());
                }
                Input::Images(images) => {
                    self.me.images = images;
                    return Ok(());
                }
                _ => {}
            }
        }
        self.start(now);
        let result = match input {
            Input::Tick => {
                self.on_tick(now);
                Ok(())
            }
            Input::Gossip { via, msg } => self.on_gossip(now, via, &msg),
            Input::SyncRequest { from, request } => {
                self.contact(now, from);
                self.serve_sync(now, from, &request);
                Ok(())
            }
            Input::Probe { from, probe } => {
                self.on_probe(now, from, probe);
                Ok(())
            }
            Input::Connected(peer) => {
                if peer != self.me.id
                    && (!self.sync.is_synced() || self.health(now, &peer) != Health::Alive)
                {
                    self.sync_request(now, peer);
                }
                Ok(())
            }
            Input::SyncReply { from, reply } => self.on_sync_reply(now, from, reply),
            Input::SyncFailed { peer } => {
                self.sync.ended(&peer);
                self.stats.syncs_failed += 1;
                Ok(())
            }
            Input::Load(sample) => {
                self.me.load = sample;
                if self.record.load_moved(&self.cfg, sample) {
                    self.publish_soon(now);
                }
                self.mark_dirty(now);
                Ok(())
            }
            Input::Rtt { peer, rtt_us } => {
                self.rtt.entry(peer).or_default().observe(rtt_us);
                Ok(())
            }
            Input::Addresses(addrs) => {
                if addrs != self.me.addrs {
                    self.me.addrs = addrs;
                    self.publish_soon(now);
                }
                Ok(())
            }
            Input::Images(images) => {
                // Holders are found through node records: announce a change at once rather
                // than at the next period, so fetchers spread over holders sooner.
                if images != self.me.images {
                    self.me.images = images;
                    if self.started {
                        self.publish_record(now);
                    }
                }
                Ok(())
            }
            Input::Submit(spec) => self.submit(now, spec).map(|_| ()),
            Input::Cancel(task) => self.cancel(now, task),
            Input::Executor { task, epoch, event } => {
                self.on_executor(now, task, epoch, event);
                Ok(())
            }
            Input::Leave => {
                self.leave(now);
                Ok(())
            }
        };
        self.flush();
        result
    }

    /// Feeds a gossip message by reference: the same as [`Input::Gossip`], for a driver that
    /// hands one message to many replicas (the simulator) and need not clone it for each.
    pub fn handle_gossip(
        &mut self,
        now: Millis,
        via: NodeId,
        msg: &GossipMessage,
    ) -> Result<(), InputError> {
        self.start(now);
        let result = self.on_gossip(now, via, msg);
        self.flush();
        result
    }

    /// A gossip delivery: `via` was heard from directly, and is the peer to ask for what
    /// the delivery shows missing.
    fn on_gossip(
        &mut self,
        now: Millis,
        via: NodeId,
        msg: &GossipMessage,
    ) -> Result<(), InputError> {
        self.contact(now, via);
        let r = self.ingest(now, via, &msg.deltas);
        if !self.sync.is_synced() {
            self.sync_request(now, via);
        }
        r
    }

    /// Decodes a gossip message from raw bytes and feeds it; malformed bytes are counted and
    /// dropped without touching the state.
    pub fn handle_gossip_bytes(
        &mut self,
        now: Millis,
        via: NodeId,
        bytes: &[u8],
    ) -> Result<(), InputError> {
        match GossipMessage::from_wire(bytes) {
            Ok(msg) => self.handle(now, Input::Gossip { via, msg }),
            Err(e) => {
                self.stats.malformed += 1;
                Err(InputError::Malformed(e))
            }
        }
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.outbox.pop_front()
    }

    /// When the replica next wants an [`Input::Tick`].
    pub fn poll_timeout(&self) -> Option<Millis> {
        if !self.started {
            return Some(0);
        }
        let mut t = self
            .prober
            .next_timeout()
            .min(self.sync.next_anti_entropy());
        for due in [self.next_eval, self.record.due()].into_iter().flatten() {
            t = t.min(due);
        }
        Some(t)
    }

    /// Submits a task through this node. Returns its id; submitting the same signed spec
    /// twice is harmless.
    pub fn submit(&mut self, now: Millis, spec: SignedTaskSpec) -> Result<TaskId, InputError> {
        self.start(now);
        let id = spec.id();
        if self.state.task(&id).is_some_and(|t| t.spec.is_some())
            || self.state.tombstone(&id).is_some()
        {
            return Ok(id);
        }
        spec.verify(&self.cfg.authorized_submitters)?;
        self.write(now, DeltaBody::Spec(spec));
        self.mark_dirty(now);
        self.flush();
        Ok(id)
    }

    fn cancel(&mut self, now: Millis, task: TaskId) -> Result<(), InputError> {
        if let Some(state) = self.state.tombstone(&task) {
            return Err(InputError::AlreadyEnded { task, state });
        }
        let Some(rec) = self.state.task(&task) else {
            return Err(InputError::UnknownTask(task));
        };
        if rec.is_cancelled() {
            return Ok(());
        }
        let view = self.task_state(now, &task);
        if let Some(state) = view.filter(|s| s.is_terminal()) {
            return Err(InputError::AlreadyEnded { task, state });
        }
        self.write(now, DeltaBody::Cancel { task });
        self.mark_dirty(now);
        Ok(())
    }

    fn start(&mut self, now: Millis) {
        if self.started {
            return;
        }
        self.started = true;
        self.publish_record(now);
        self.sync.start(now + self.cfg.anti_entropy_ms / 2);
        // Spread the nodes' probe periods (a mesh booted at once would probe in lockstep).
        let offset = {
            use rand::Rng;
            self.rng.gen_range(0..self.cfg.heartbeat_ms)
        };
        self.prober.start(now + offset);
    }

    /// Publishes the record now, or when one period has passed since the last publication.
    fn publish_soon(&mut self, now: Millis) {
        if !self.started {
            return;
        }
        self.record.soon(now, self.cfg.heartbeat_ms);
    }

    /// A gap-closing sync came back from `from` and left gaps open: `from` lacked them too
    /// (it was asked as the forwarder of a later write, its origin not being alive here).
    /// Ask again soon, a few times, each time another peer, rather than after the 5 s sync
    /// timeout; a gap no peer can fill (its write died with its origin) then falls back to
    /// the slow pace.
    fn retry_open_gaps(&mut self, now: Millis, from: NodeId) {
        const QUICK_RETRIES: u8 = 3;
        let others = self.random_peers(now, 1, from);
        let other = others.first().copied();
        if self.vector.retry_gaps(now, from, other, QUICK_RETRIES) {
            self.wake_at(now + self.cfg.gap_sync_ms);
        }
    }

    pub(crate) fn mark_dirty(&mut self, now: Millis) {
        self.wake_at(now);
    }

    /// Asks for an evaluation tick at `at` (or earlier, if one is already due sooner).
    pub(crate) fn wake_at(&mut self, at: Millis) {
        self.next_eval = Some(self.next_eval.map_or(at, |e| e.min(at)));
    }

    /// Publishes this node's record with a new version: at start, when it changed, to refute a
    /// suspicion, and when leaving. Liveness does not ride on it (see `probe.rs`).
    fn publish_record(&mut self, now: Millis) {
        self.stats.records_published += 1;
        let rec = self.record.publish(now, &mut self.me, &self.rtt);
        self.write(now, DeltaBody::Node(Arc::new(rec)));
    }

    /// Makes a local change: stamps it, merges it, queues it for gossip.
    pub(crate) fn write(&mut self, now: Millis, body: DeltaBody) {
        self.next_counter += 1;
        let stamp = (self.cfg.incarnation << 32) | self.next_counter;
        let delta = Delta {
            origin: self.me.id,
            stamp,
            body,
        };
        // Our own deltas satisfy every rule, so merging cannot fail; count it if it ever does.
        match self.state.apply(&delta) {
            Ok(_) => {}
            Err(_) => self.stats.deltas_rejected += 1,
        }
        self.vector.raise(self.me.id, stamp);
        if let DeltaBody::Node(rec) = &delta.body {
            self.state.hear(&rec.id, now);
        }
        self.pending.push(delta);
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let deltas = std::mem::take(&mut self.pending);
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        for d in deltas {
            let len = canonical_len(&d);
            if !batch.is_empty()
                && (batch.len() >= MAX_DELTAS_PER_MESSAGE
                    || bytes + len > GossipMessage::MAX_BYTES / 2)
            {
                self.outbox.push_back(Action::Publish(GossipMessage {
                    deltas: std::mem::take(&mut batch),
                }));
                bytes = 0;
            }
            bytes += len;
            batch.push(d);
        }
        self.outbox
            .push_back(Action::Publish(GossipMessage { deltas: batch }));
    }

    /// Merges deltas from a peer, one by one; a bad delta is counted and dropped.
    fn ingest(&mut self, now: Millis, via: NodeId, deltas: &[Delta]) -> Result<(), InputError> {
        let total = deltas.len();
        let mut rejected = 0usize;
        let mut first = None;
        for d in deltas {
            match self.ingest_one(now, d) {
                Ok(()) => self.track_stamp(now, via, d.origin, d.stamp),
                Err(e) => {
                    rejected += 1;
                    self.stats.deltas_rejected += 1;
                    first.get_or_insert(e);
                }
            }
        }
        match first {
            None => Ok(()),
            Some(first) => Err(InputError::Rejected {
                rejected,
                applied: total - rejected,
                total,
                first,
            }),
        }
    }

    fn ingest_one(&mut self, now: Millis, d: &Delta) -> Result<(), DeltaError> {
        if d.origin == self.me.id && d.stamp >> 32 >= self.cfg.incarnation {
            // Our own delta echoed back; we are its only writer.
            self.stats.deltas_unchanged += 1;
            return Ok(());
        }
        State::check(d)?;
        if let DeltaBody::Spec(spec) = &d.body {
            let id = spec.id();
            let known = self.state.task(&id).is_some_and(|t| t.spec.is_some())
                || self.state.tombstone(&id).is_some();
            if !known {
                spec.verify(&self.cfg.authorized_submitters)?;
            }
        }
        let held = match &d.body {
            DeltaBody::Node(rec) => self.state.node(&rec.id).map(NodeRecord::version),
            _ => None,
        };
        match self.state.apply(d)? {
            Merged::Changed => {
                self.stats.deltas_applied += 1;
                match &d.body {
                    DeltaBody::Node(rec) => {
                        if held.is_none() && rec.id != self.me.id {
                            self.prober.learned(&rec.id, &mut self.rng);
                        }
                        let newer = held.is_none_or(|v| rec.version() > v);
                        if newer {
                            self.state.hear(&rec.id, now);
                            self.sync.heard(now);
                            if self.suspicions.holds(&rec.id) {
                                // Refuted (or restarted): its leases hold again.
                                self.note_suspicion(now, rec.id);
                                self.mark_dirty(now);
                            }
                        }
                        if newer && self.propagation.len() < self.cfg.propagation_samples {
                            self.propagation.push(PropagationSample {
                                origin: rec.id,
                                seq: rec.seq,
                                written_at_ms: rec.written_at_ms,
                                merged_at_ms: now,
                            });
                        }
                    }
                    DeltaBody::Lease { .. } => {
                        self.stats.lease_changes += 1;
                        self.mark_dirty(now);
                    }
                    DeltaBody::Suspect { node, .. } => {
                        if *node == self.me.id {
                            // Someone could not reach us: answer with a newer record, which
                            // supersedes the suspicion everywhere it spreads.
                            if !self.me.leaving {
                                self.stats.refutations += 1;
                                self.publish_record(now);
                            }
                        } else {
                            self.note_suspicion(now, *node);
                        }
                        self.mark_dirty(now);
                    }
                    _ => self.mark_dirty(now),
                }
            }
            Merged::Unchanged => self.stats.deltas_unchanged += 1,
            Merged::Tombstoned => self.stats.deltas_tombstoned += 1,
        }
        Ok(())
    }

    /// Advances the version vector, or notes a gap to close by sync.
    fn track_stamp(&mut self, now: Millis, via: NodeId, origin: NodeId, stamp: u64) {
        if self.vector.track(now, via, origin, stamp) {
            self.stats.gaps += 1;
            self.wake_at(now + self.cfg.gap_sync_ms);
        }
    }

    /// A requester that holds some of this node's own writes but not the latest missed them
    /// on gossip (it was cut off, or the mesh lost them). Others may have too, and a
    /// replica only asks for what it knows it lacks: republish the record (at most once a
    /// period), so every node that missed a write sees a gap in this node's stamps and
    /// closes it. An idle mesh publishes nothing else that would show them the gap.
    fn note_lag(&mut self, now: Millis, req: &SyncRequest, sorted: bool) {
        let me = self.me.id;
        let Some(theirs) = entry_of(&req.vclock, sorted, &me) else {
            return;
        };
        if theirs > 0 && theirs < self.vector.get(&me) {
            self.publish_soon(now);
        }
    }

    fn sync_request(&mut self, now: Millis, to: NodeId) {
        self.send_sync_request(now, to, false);
    }

    /// A sync request; `digest_only` compares digests first (periodic anti-entropy of a
    /// synced replica), sending the version vector only if they differ.
    fn send_sync_request(&mut self, now: Millis, to: NodeId, digest_only: bool) {
        if to == self.me.id || !self.sync.try_send(now, to) {
            return;
        }
        self.stats.syncs_sent += 1;
        let digest_only = self.sync.digest_only(&to, digest_only);
        let mut vclock = if digest_only {
            Vec::new()
        } else {
            self.version_vector()
        };
        if !self.sync.is_synced() && self.cfg.incarnation > 1 {
            // A restarted node starts empty, yet its own new stamps (`incarnation << 32 | n`)
            // claim to cover everything it wrote in earlier incarnations: until a sync
            // completes, ask for its own history too, or it never gets it back.
            for (origin, c) in &mut vclock {
                if *origin == self.me.id {
                    *c = 0;
                }
            }
        }
        let request = SyncRequest {
            vclock,
            digest: self.digest(),
            full: self.sync.take_want_full(&to),
            digest_only,
            vclock_hash: if digest_only { self.vclock_hash() } else { 0 },
        };
        self.outbox.push_back(Action::SendSync { to, request });
    }

    /// Answers a peer's sync request (see [`sync::reply`]).
    fn serve_sync(&mut self, now: Millis, from: NodeId, req: &SyncRequest) {
        self.stats.syncs_served += 1;
        let sorted = req.vclock.is_sorted_by(|a, b| a.0 < b.0);
        self.note_lag(now, req, sorted);
        let reply = sync::reply(&self.state, &self.vector, req, sorted);
        self.outbox.push_back(Action::ReplySync { to: from, reply });
    }

    fn on_sync_reply(
        &mut self,
        now: Millis,
        from: NodeId,
        reply: SyncReply,
    ) -> Result<(), InputError> {
        self.sync.ended(&from);
        self.touch(now, from);
        let SyncReply {
            deltas,
            vclock,
            digest,
            truncated,
        } = reply;
        let applied = self.stats.deltas_applied;
        let result = self.ingest(now, from, &deltas);
        self.vector.adopt(&vclock);
        if self.stats.deltas_applied - applied >= COMPACT_AFTER {
            // A bulk join (see `State::compact`): the two per-node maps it grew, rebuilt full.
            self.state.compact();
            self.vector.compact();
        }
        if !self.sync.is_synced() && !truncated && !vclock.is_empty() {
            // The first sync since start (or since isolation) shows the responder lacks this
            // node's latest write: what it published went nowhere (before any mesh link), so
            // publish again now that there is a peer.
            let me = self.me.id;
            let theirs = entry_of(&vclock, true, &me).unwrap_or(0);
            if theirs < self.vector.get(&me) {
                self.publish_soon(now);
            }
        }
        self.stats.syncs_completed += 1;
        if !truncated && self.sync.gap_sync_answered(from) {
            self.retry_open_gaps(now, from);
        }
        if !truncated {
            self.sync.completed();
        }
        if truncated {
            self.sync_request(now, from);
        } else if digest != self.digest() {
            let theirs: BTreeMap<NodeId, u64> = vclock.into_iter().collect();
            let mine: BTreeMap<NodeId, u64> = self.version_vector().into_iter().collect();
            if theirs == mine {
                // Same versions, different states: something was lost outside the vectors.
                self.stats.digest_mismatches += 1;
                self.sync.want_full(from);
            }
        }
        result
    }

    fn on_tick(&mut self, now: Millis) {
        if self.record.is_due(now) {
            self.publish_record(now);
        }
        self.probe_tick(now);
        if self.sync.anti_entropy_due(now, self.cfg.anti_entropy_ms) {
            if let Some(peer) = self.random_alive_peer(now) {
                self.send_sync_request(now, peer, true);
            }
        }
        let due = self.vector.due_gap(now, self.cfg.gap_sync_ms);
        // One gap sync in flight at a time: a reply carries all that this node's vector
        // lacks, so it closes every gap its sender can fill. A sync per gap instead (a booting
        // node has a gap for every origin) brings N replies of up to N records each, N³ across
        // a mesh. Gaps the reply leaves open get the next sync, to another peer.
        let busy = self.sync.gap_sync_busy(now);
        if let Some((origin, via)) = due.filter(|_| !busy) {
            let to = if self.health(now, &origin) == Health::Alive {
                origin
            } else {
                via
            };
            self.sync_request(now, to);
            self.sync.gap_sync_sent(to);
            // Re-arm: ask again later if the gap is still open.
            self.vector.rearm_gap(&origin, now + SYNC_TIMEOUT_MS);
        }
        let isolated = self.is_isolated(now);
        if self.sync.note_isolation(isolated) {
            self.suspicions.restart(now);
        }
        self.next_eval = None;
        self.evaluate(now);
    }

    /// Whether a sync completed since start (or since this node last heard nobody).
    pub fn is_synced(&self) -> bool {
        self.sync.is_synced()
    }

    fn random_alive_peer(&mut self, now: Millis) -> Option<NodeId> {
        let me = self.me.id;
        self.random_peers(now, 1, me).first().copied()
    }

    /// The image digests named by tasks that have not ended: a blob store must keep them.
    pub fn images_in_use(&self, now: Millis) -> BTreeSet<Digest> {
        self.task_views(now)
            .iter()
            .filter(|v| !v.state.is_terminal())
            .filter_map(|v| v.spec.as_ref())
            .filter_map(|s| omesh_protocol::ImageRef::parse(&s.spec.image).ok())
            .map(|r| r.digest)
            .collect()
    }

    /// Whether the node may tell a load balancer it is ready: it expects no peers (a lone
    /// node, or one with no seeds), or a sync with a peer has completed since start, so its
    /// view of the mesh is not the empty one it booted with.
    pub fn is_ready(&self, expects_peers: bool) -> bool {
        !expects_peers || self.sync.is_synced()
    }

    fn leave(&mut self, now: Millis) {
        self.me.leaving = true;
        self.publish_record(now);
        let runs: Vec<(TaskId, LocalRun)> = self.tasks.runs().map(|(t, r)| (*t, *r)).collect();
        for (task, run) in runs {
            match run.phase {
                Phase::Settling { .. } => {
                    self.release(now, task, run.epoch);
                    self.tasks.forget(&task);
                }
                Phase::Started => {
                    self.outbox.push_back(Action::StopTask {
                        task,
                        epoch: run.epoch,
                        reason: StopReason::Leaving,
                    });
                    self.tasks.set_phase(&task, Phase::Stopping);
                }
                Phase::Stopping => {}
            }
        }
    }
}
