//! The sans-IO replica: events in with an explicit `now`, actions out.
//!
//! `handle(now, input)` merges what peers say and what the local executor reports;
//! `poll_action()` hands back what to send or run; `poll_timeout()` says when to tick next.
//! Its parts are types of their own (`vector.rs`, `sync.rs`, `probe.rs`, `suspicion.rs`,
//! `runs.rs`, `record.rs`); the child modules wire them to the replica: `membership.rs`
//! (probing and health), `anti_entropy.rs` (syncs), `deltas.rs` (writes and merges) and
//! `decide.rs` (the decisions taken on a tick: claims, fencing, retries, compaction).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use omesh_protocol::{
    AdmissionCert, Delta, DeltaBody, Digest, GossipMessage, LoadSample, Millis, NodeId, NodeRecord,
    SignedCancel, SignedTaskSpec, StateDigest, TaskId, Wire,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::{ConfigError, ReplicaConfig};
use crate::digest::{first8, mix64, splitmix64};
use crate::early::Early;
use crate::liveness::{Health, RttEstimate};
use crate::merge::State;
use crate::overload::OverloadGate;
use crate::probe::Prober;
use crate::quorum::Quorum;
use crate::record::{LoadMove, RecordPublisher};
use crate::runs::{LocalRun, Phase, TaskBook};
use crate::suspicion::Suspicions;
use crate::sync::{SyncState, SYNC_TIMEOUT_MS};
use crate::vector::VersionVector;
use crate::verify::{Ed25519, Verify};

mod anti_entropy;
mod decide;
mod deltas;
mod disconnect;
mod membership;

pub use disconnect::survives_restart;

pub use crate::io::{Action, ExecEvent, Input, InputError, PropagationSample, Stats, StopReason};

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
    /// When the replica started (its first input).
    started_at: Millis,
    /// When the latest ping of this node that was answered (directly or through a helper)
    /// was sent: the last time this node knows the mesh heard it.
    round_trip: Option<Millis>,
    propagation: Vec<PropagationSample>,
    /// This node's identity key: it signs every delta this node writes.
    key: NodeKey,
    /// Checks the signature of every delta that comes in.
    verify: Arc<dyn Verify>,
    /// Nodes whose record's admission certificate verified here, with the certificate
    /// that did (a record republished with the same one is not checked again).
    admitted: BTreeMap<NodeId, AdmissionCert>,
    /// Deltas that came before what they build on, tried again as the rest arrives.
    early: Early,
    /// At-most-once tasks: grants, votes, promises; and when restarts and leaves were seen.
    quorum: Quorum,
    /// The shortest `stop_after` window among the tasks this node runs or may claim, while
    /// there are any: it then pings members for majority contact (see `quorum.rs`).
    contact_window: Option<Millis>,
}

/// Mixed into the replica's seed to key its probe nonces ("nonce").
const NONCE_DOMAIN: u64 = 0x006e_6f6e_6365;

/// A node's ed25519 identity key; its public half is the NodeId. Debug never shows it.
#[derive(Clone)]
pub struct NodeKey(ed25519_dalek::SigningKey);

impl NodeKey {
    /// The key with these 32 secret bytes.
    pub fn from_bytes(secret: &[u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(secret))
    }

    /// The node id this key signs as.
    pub fn id(&self) -> NodeId {
        NodeId(self.0.verifying_key().to_bytes())
    }

    /// The signing key.
    pub fn signing(&self) -> &ed25519_dalek::SigningKey {
        &self.0
    }
}

impl From<ed25519_dalek::SigningKey> for NodeKey {
    fn from(k: ed25519_dalek::SigningKey) -> Self {
        Self(k)
    }
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({})", self.id().short())
    }
}

impl Replica {
    /// Checks incoming signatures with `verify` instead of [`Ed25519`] (a simulator shares
    /// one that remembers what it checked).
    pub fn set_verifier(&mut self, verify: Arc<dyn Verify>) {
        self.verify = verify;
    }

    /// Deltas held back until what they build on arrives.
    pub fn early_held(&self) -> usize {
        self.early.len()
    }

    /// Whether `id` may write here: always in an open mesh (unless revoked); with admission
    /// keys, once a record of it with a valid certificate was merged.
    pub fn is_admitted(&self, id: &NodeId) -> bool {
        !self.state.is_revoked(id)
            && (self.cfg.admission_keys.is_empty() || self.admitted.contains_key(id))
    }

    /// A replica for the configured node. The config is validated here.
    pub fn new(cfg: ReplicaConfig, key: impl Into<NodeKey>) -> Result<Self, ConfigError> {
        let key = key.into();
        cfg.validate()?;
        if key.id() != cfg.node_id {
            return Err(ConfigError {
                key: "node_id",
                reason: format!(
                    "is {} but the identity key given is {}'s",
                    cfg.node_id.short(),
                    key.id().short()
                ),
            });
        }
        let mut me = NodeRecord::new(cfg.node_id, cfg.incarnation, cfg.capacity);
        me.tags = cfg.tags.clone();
        me.cert = cfg.cert.clone();
        // The configured seed, the id and the incarnation each mixed on their own: the id alone
        // would cancel a seed derived from it, and a restart must not replay the random
        // stream (probe order, claim staggers) of the incarnation before.
        let seed = splitmix64(cfg.seed)
            ^ mix64(u64::from_le_bytes(first8(&cfg.node_id.0)))
            ^ splitmix64(cfg.incarnation.rotate_left(32));
        let rng = ChaCha8Rng::seed_from_u64(seed);
        // Probe nonces are keyed from the same seed, not drawn from the random stream (whose
        // draws decide probe order and claim staggers: those stay as they were for a seed).
        let prober = Prober::keyed(splitmix64(seed ^ NONCE_DOMAIN));
        Ok(Self {
            me,
            state: State::default(),
            vector: VersionVector::default(),
            sync: SyncState::default(),
            next_counter: 0,
            suspicions: Suspicions::default(),
            prober,
            rtt: BTreeMap::new(),
            tasks: TaskBook::default(),
            outbox: VecDeque::new(),
            pending: Vec::new(),
            record: RecordPublisher::default(),
            next_eval: None,
            rng,
            stats: Stats::default(),
            started: false,
            started_at: 0,
            round_trip: None,
            propagation: Vec::new(),
            key,
            verify: Arc::new(Ed25519),
            // This node's own certificate admits it: what its earlier incarnations wrote comes
            // back in syncs, possibly before any record of it (a leave's record is its last).
            admitted: cfg
                .cert
                .clone()
                .map(|c| (cfg.node_id, c))
                .into_iter()
                .collect(),
            early: Early::default(),
            quorum: Quorum::default(),
            contact_window: None,
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
                    self.take_load(sample);
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
                self.take_load(sample);
                match self.record.load_move(&self.cfg, sample, self.me.overloaded) {
                    LoadMove::None => {}
                    LoadMove::Verdict => self.publish_soon(now),
                    LoadMove::Drift { large } if self.started => {
                        let nodes = self.state.nodes().count();
                        let period =
                            RecordPublisher::drift_period_ms(self.cfg.heartbeat_ms, nodes, large);
                        self.record.soon(now, period);
                    }
                    LoadMove::Drift { .. } => {}
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
            Input::Cancel(order) => self.cancel(now, order),
            Input::Adopt { task, epoch } => {
                self.adopt(now, task, epoch);
                Ok(())
            }
            Input::Revoke(r) => {
                if !r.holds(&self.cfg.admission_keys) {
                    return Err(InputError::BadRevocation(r.node.short()));
                }
                if !self.state.is_revoked(&r.node) {
                    self.suspicions.revoked(now, r.node);
                    self.write(now, DeltaBody::Revoke(r));
                    self.mark_dirty(now);
                    self.flush();
                }
                Ok(())
            }
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

    /// Whether `order` is a cancel this mesh takes: signed, by a key in
    /// `authorized_submitters`.
    pub(crate) fn may_cancel(&self, order: &SignedCancel) -> bool {
        self.cfg.authorized_submitters.contains(&order.submitter) && order.signature_holds()
    }

    fn cancel(&mut self, now: Millis, order: SignedCancel) -> Result<(), InputError> {
        let task = order.task;
        if !self.may_cancel(&order) {
            return Err(InputError::CancelNotAuthorized(task));
        }
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
        self.write(now, DeltaBody::Cancel(order));
        self.mark_dirty(now);
        Ok(())
    }

    fn start(&mut self, now: Millis) {
        if self.started {
            return;
        }
        self.started = true;
        self.started_at = now;
        self.publish_record(now);
        self.sync.start(now + self.cfg.anti_entropy_ms / 2);
        // Spread the nodes' probe periods (a mesh booted at once would probe in lockstep).
        let offset = {
            use rand::Rng;
            self.rng.gen_range(0..self.cfg.heartbeat_ms)
        };
        self.prober.start(now + offset);
    }

    /// Takes a load sample into this node's record, with the overload verdict it leads to
    /// (see `overload.rs`), and counts a change of verdict. A node with offload off is never
    /// overloaded: it keeps taking work however loaded it is.
    fn take_load(&mut self, sample: LoadSample) {
        let gate = OverloadGate {
            cpu_enter_permille: u16::from(self.cfg.threshold_cpu) * 10,
            mem_enter_permille: u16::from(self.cfg.threshold_memory) * 10,
            margin_permille: u16::from(self.cfg.threshold_margin) * 10,
        };
        let was = self.me.overloaded;
        let now_over = self.cfg.enable_offload && gate.next(was, sample);
        match (was, now_over) {
            (false, true) => self.stats.overload_entered += 1,
            (true, false) => self.stats.overload_left += 1,
            _ => {}
        }
        self.me.load = sample;
        self.me.overloaded = now_over;
    }

    /// Publishes the record now, or when one period has passed since the last publication.
    fn publish_soon(&mut self, now: Millis) {
        if !self.started {
            return;
        }
        self.record.soon(now, self.cfg.heartbeat_ms);
    }

    fn mark_dirty(&mut self, now: Millis) {
        self.wake_at(now);
    }

    /// Asks for an evaluation tick at `at` (or earlier, if one is already due sooner).
    fn wake_at(&mut self, at: Millis) {
        self.next_eval = Some(self.next_eval.map_or(at, |e| e.min(at)));
    }

    /// Publishes this node's record with a new version: at start, when it changed, to refute a
    /// suspicion, and when leaving. Liveness does not ride on it (see `probe.rs`).
    fn publish_record(&mut self, now: Millis) {
        self.stats.records_published += 1;
        let rec = self.record.publish(now, &mut self.me, &self.rtt);
        self.write(now, DeltaBody::Node(Arc::new(rec)));
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
                Phase::Promising { .. } => {
                    self.quorum.forget_confirm(&task);
                    self.tasks.forget(&task);
                }
                Phase::Settling { .. } => {
                    self.release(now, task, run.epoch);
                    self.tasks.forget(&task);
                }
                Phase::Started | Phase::Adopted => {
                    let survives = self
                        .state
                        .task(&task)
                        .and_then(|r| r.spec.as_ref())
                        .is_some_and(|s| survives_restart(&s.value.spec.disconnect));
                    if survives && run.phase == Phase::Started {
                        // `lost_after`: kept through a restart; the guard holds it until the
                        // node is back (or its window passes).
                        continue;
                    }
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
