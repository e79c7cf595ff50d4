//! The peer: one tokio task that feeds the sans-IO replica from the network, timers, load
//! samples and API calls, and carries out the actions it returns.
//!
//! `driver` is the transport-independent part (feed the replica, dispatch its actions through
//! an `Outputs`); `transport` is that `Outputs` over the swarm and the executor; `swarm`,
//! `dial`, `calls` and `logs` turn the loop's events into inputs.

mod admit;
mod calls;
mod dial;
pub mod driver;
mod logs;
pub mod net;
mod swarm;
mod transport;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::gossipsub::IdentTopic;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};
use omesh_protocol::{Millis, NodeId, TaskState};
use omesh_state::{ExecEvent, Input, Replica};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use self::dial::Seed;
pub use self::driver::{Clock, Outputs, ReplicaDriver, TimeSource};
use self::net::{Behaviour, BehaviourEvent};
use self::transport::PeerOutputs;
use crate::api::ApiCall;
use crate::config::{ExecutorChoice, NetPlan, NodeConfig};
use crate::datadir::DataDir;
use crate::exec::process::ProcessBackend;
use crate::exec::{self, Backend, Executor, Report};
use crate::load::LoadSampler;
use crate::metrics::Metrics;

/// Propagation samples kept for `/api/v1/debug/propagation`.
const RECENT_PROPAGATION: usize = 4096;

/// Everything a running peer holds.
pub struct Peer {
    pub(crate) cfg: NodeConfig,
    pub(crate) plan: NetPlan,
    pub(crate) swarm: Swarm<Behaviour>,
    /// The replica and its clock; the one place actions are dispatched.
    pub(crate) driver: ReplicaDriver,
    pub(crate) metrics: Arc<Mutex<Metrics>>,
    pub(crate) topic: IdentTopic,
    pub(crate) local_peer: PeerId,
    pub(crate) incarnation: u64,
    pub(crate) pending_replies: HashMap<NodeId, VecDeque<ResponseChannel<Vec<u8>>>>,
    pub(crate) outbound: HashMap<OutboundRequestId, NodeId>,
    /// See `PeerOutputs::probe_answer`.
    pub(crate) probe_answer: Option<(NodeId, ResponseChannel<Vec<u8>>)>,
    pub(crate) connections: HashMap<PeerId, Vec<libp2p::swarm::ConnectionId>>,
    /// Per connected peer, when a request or answer last went either way (or it connected):
    /// what `trim_connections` leaves open for a while.
    pub(crate) last_used: HashMap<PeerId, Instant>,
    pub(crate) recent_propagation: VecDeque<omesh_state::PropagationSample>,
    /// Per peer: whether its state digest equalled ours at the last sync exchange, and when
    /// (this node's clock). Shown by the API so an operator sees agreement at a glance.
    pub(crate) digest_agreement: HashMap<NodeId, (bool, Millis)>,
    pub(crate) seeds: Vec<Seed>,
    pub(crate) load: LoadSampler,
    pub(crate) listen_addrs: Vec<Multiaddr>,
    pub(crate) ready: bool,
    pub(crate) node_id: NodeId,
    pub(crate) executor: Executor,
    pub(crate) reports: mpsc::Receiver<Report>,
    pub(crate) blocked: BTreeSet<PeerId>,
    /// When each peer caught forging may next be named in a warning (`admit::warn_due`).
    forgers_warned: HashMap<PeerId, Instant>,
    pub(crate) pending_logs: HashMap<OutboundRequestId, logs::PendingLog>,
    pub(crate) images: Arc<crate::images::ImageService>,
    /// This node's identity (first contacts authenticate with it).
    pub(crate) key: libp2p::identity::Keypair,
    /// Who may connect.
    pub(crate) gate: crate::admission::Gate,
    /// First contacts received on the data plane, to judge.
    pub(crate) contact_requests: mpsc::Receiver<crate::images::dataplane::contact::Request>,
    /// First contacts this node made, ended.
    pub(crate) contact_results: mpsc::Receiver<admit::ContactResult>,
    pub(crate) contact_results_tx: mpsc::Sender<admit::ContactResult>,
    /// First contacts under way.
    pub(crate) contacting: HashSet<admit::ContactTarget>,
    /// When a known peer may be contacted again.
    pub(crate) next_known_contact: HashMap<PeerId, Instant>,
    /// Until when a refused peer is not named in another warning.
    pub(crate) refusal_warned: HashMap<PeerId, Instant>,
    /// The replica's applied-delta count and the time at the last `refresh_admitted`.
    pub(crate) admission_refreshed: (u64, Instant),
    /// The replica's applied-delta count and the time when libp2p was last given the
    /// records' addresses (`dial::feed_peer_addresses`).
    pub(crate) addrs_fed: (u64, Instant),
    /// The libp2p addresses each live peer's record carries (`dial::feed_peer_addresses`),
    /// given with every request to it: libp2p's own address cache (request-response's)
    /// keeps only 100 peers, and a mesh can hold many more.
    pub(crate) addr_book: HashMap<PeerId, Vec<Multiaddr>>,
    /// When the guards' deadline may next be warned about.
    deadline_warned: Instant,
    /// The last round trip seen and the guards' shared deadline it gave (for
    /// `omesh_lease_headroom_seconds`).
    renewed: (Option<Millis>, Millis),
    /// The data directory's lock, held while the peer lives.
    _lock: crate::datadir::DataDirLock,
    /// The data directory.
    dir: DataDir,
    /// The peer addresses last kept in it (`dial::remember_peers`).
    remembered: Vec<String>,
}

/// Why binding the libp2p listen address failed, in words: libp2p's `TransportError::Other`
/// displays as nothing and keeps the cause (the socket's error) in its source chain.
fn listen_failure(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut in_use = false;
    let mut next = Some(e);
    while let Some(err) = next {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
        {
            in_use = true;
        }
        let text = err.to_string();
        in_use |= text.to_lowercase().contains("address already in use");
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    if parts.is_empty() {
        parts.push("the transport refused it without a reason".to_owned());
    }
    let mut reason = parts.join(": ");
    if in_use {
        // Peers take two UDP ports each: a peer on port P - 1 holds P for its data plane.
        reason.push_str(
            " (address in use: another process holds this UDP port; note that every omesh peer \
             also holds its QUIC port + 1 for its blob data plane, config key `blob_listen`, so \
             a peer listening one port below holds this one)",
        );
    }
    reason
}

/// Why the peer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The data directory cannot be used.
    #[error(transparent)]
    DataDir(#[from] crate::datadir::DataDirError),
    /// The network stack failed.
    #[error(transparent)]
    Net(#[from] net::BuildError),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr} (config key `listen`): {reason}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The replica refused its config.
    #[error(transparent)]
    Replica(#[from] omesh_state::ConfigError),
    /// The blob store or data plane cannot start.
    #[error(transparent)]
    Images(#[from] crate::images::ImagesError),
    /// The admission certificate cannot be read.
    #[error("{0} (config key `admission_cert`)")]
    Cert(#[from] crate::admission::CertFileError),
}

impl Peer {
    /// Opens the data directory (whose `lock` the caller took), builds the swarm and starts
    /// listening.
    pub fn start(
        cfg: NodeConfig,
        lock: crate::datadir::DataDirLock,
        metrics: Arc<Mutex<Metrics>>,
        docker: Option<Arc<dyn Backend>>,
    ) -> Result<Self, StartError> {
        let plan = cfg.check()?;
        let dir = DataDir::open(&cfg.data_dir)?;
        let key = dir.identity()?;
        let incarnation = dir.next_incarnation()?;
        let node_id = net::node_id_of_key(&key)
            .ok_or_else(|| net::BuildError("identity is not ed25519".into()))?;
        let node_key = net::node_key_of(&key)
            .ok_or_else(|| net::BuildError("identity is not ed25519".into()))?;
        let local_peer = key.public().to_peer_id();
        let gate = admission_gate(&cfg, &plan, node_id)?;
        // Bounded: a hello that finds it full is refused as busy (the joiner retries).
        let (contacts_tx, contact_requests) = mpsc::channel(64);
        let (contact_results_tx, contact_results) = mpsc::channel(64);
        let images = crate::images::ImageService::start(
            &cfg,
            &plan,
            &key,
            &metrics,
            docker.is_some(),
            Some(contacts_tx),
        )?;
        let mut swarm =
            net::build_swarm(key.clone(), net::GOSSIP_TRANSMIT_LIMIT, gate.restricts())?;
        swarm
            .listen_on(plan.listen.clone())
            .map_err(|e| StartError::Listen {
                addr: cfg.listen.clone(),
                reason: listen_failure(&e),
            })?;
        let topic = IdentTopic::new(net::STATE_TOPIC);
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic)
            .map_err(|e| net::BuildError(format!("subscribe: {e}")))?;
        let load = LoadSampler::for_this_process(cfg.fake_cpu_percent, &cfg.cgroup_parent);
        info!(capacity = ?load.capacity(), "load measured: {}", load.describe());
        let (reports_tx, reports) = mpsc::channel(1024);
        let log_dir = dir.log_dir()?;
        let prefer_docker = cfg.executor != ExecutorChoice::Process;
        let confinement = confinement(&cfg, node_id)?;
        let limits_tag = confinement.enforces_limits();
        let mut executor = Executor::new(
            Arc::new(ProcessBackend::new(confinement)),
            docker,
            prefer_docker,
            reports_tx,
            log_dir,
        );
        executor.set_image_provider(images.clone());
        executor.set_guard_dir(dir.guard_dir()?);
        let mut rcfg = cfg.replica_config(node_id, incarnation, load.capacity(), gate.own_cert());
        rcfg.tags.extend(executor.tags());
        if limits_tag {
            rcfg.tags
                .insert(omesh_state::placement::PROCESS_LIMITS_TAG.to_owned());
        }
        let replica = Replica::new(rcfg, node_key)?;
        let mut seeds: Vec<Seed> = plan
            .seeds
            .iter()
            .map(|addr| Seed::new(addr.clone(), None, false))
            .collect();
        // Peers an earlier run knew, so that a seed (which has no seed of its own) rejoins
        // at once instead of waiting for the others to redial it.
        for text in dir.remembered_peers() {
            let Ok(addr) = text.parse::<Multiaddr>() else {
                continue;
            };
            let peer = addr.iter().find_map(|p| match p {
                libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                _ => None,
            });
            let known = seeds
                .iter()
                .any(|s| dial::strip_p2p(&s.addr) == dial::strip_p2p(&addr));
            if peer.is_some_and(|p| p != local_peer) && !known {
                seeds.push(Seed::new(addr, peer, true));
            }
        }
        if let Ok(m) = metrics.lock() {
            m.incarnation
                .set(i64::try_from(incarnation).unwrap_or(i64::MAX));
        }
        info!(node = %node_id.short(), peer = %local_peer, incarnation, executor = executor.name(), "omesh peer starting");
        let mut peer = Self {
            cfg,
            plan,
            swarm,
            driver: ReplicaDriver::new(replica, Clock::new()),
            metrics,
            topic,
            local_peer,
            incarnation,
            pending_replies: HashMap::new(),
            outbound: HashMap::new(),
            probe_answer: None,
            connections: HashMap::new(),
            last_used: HashMap::new(),
            recent_propagation: VecDeque::new(),
            digest_agreement: HashMap::new(),
            seeds,
            load,
            listen_addrs: Vec::new(),
            ready: false,
            node_id,
            executor,
            reports,
            blocked: BTreeSet::new(),
            forgers_warned: HashMap::new(),
            pending_logs: HashMap::new(),
            images,
            key,
            gate,
            contact_requests,
            contact_results,
            contact_results_tx,
            contacting: HashSet::new(),
            next_known_contact: HashMap::new(),
            refusal_warned: HashMap::new(),
            admission_refreshed: (0, Instant::now()),
            addrs_fed: (u64::MAX, Instant::now()),
            addr_book: HashMap::new(),
            deadline_warned: Instant::now(),
            renewed: (None, 0),
            _lock: lock,
            dir,
            remembered: Vec::new(),
        };
        peer.sync_allow_list();
        Ok(peer)
    }

    /// Runs until `shutdown` resolves, then leaves the mesh gracefully.
    pub async fn run(
        mut self,
        mut calls: mpsc::Receiver<ApiCall>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut load_tick = tokio::time::interval(Duration::from_secs(1));
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        // Instances an earlier incarnation left to outlive it are followed again (and offered
        // to the replica); everything else it left is ended.
        let reattached = self.executor.reattach(&self.node_id).await;
        match self
            .executor
            .cleanup_orphans(&self.node_id, &reattached.keep)
            .await
        {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "removed instances left by an earlier run"),
            Err(e) => warn!(error = %e, "cannot clean up instances of an earlier run"),
        }
        if !reattached.adopted.is_empty() {
            info!(
                instances = reattached.adopted.len(),
                "re-attached to instances an earlier run left running"
            );
        }
        for (task, epoch) in reattached.adopted {
            self.feed(Input::Adopt { task, epoch });
        }
        loop {
            let wake = self.driver.replica().poll_timeout().map_or_else(
                || tokio::time::Instant::now() + Duration::from_secs(1),
                |t| self.driver.clock().instant_at(t),
            );
            let images = Arc::clone(&self.images);
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(call) = calls.recv() => self.on_call(call),
                Some(req) = self.contact_requests.recv() => self.on_contact_request(req),
                Some(res) = self.contact_results.recv() => self.on_contact_result(res),
                Some(report) = self.reports.recv() => self.on_report(report),
                () = tokio::time::sleep_until(wake) => self.feed(Input::Tick),
                _ = load_tick.tick() => {
                    let sample = self.load.sample();
                    self.feed(Input::Load(sample));
                }
                _ = housekeeping.tick() => self.housekeeping(),
                () = images.store_changed() => self.refresh_images(),
            }
        }
        self.leave().await;
    }

    async fn leave(&mut self) {
        info!("leaving the mesh");
        // Before the leave, which ends every lease: instances that outlive this peer are
        // neither stopped nor renewed any more; their guards keep them until the deadline
        // last set, for the next incarnation to re-attach to.
        let detached = self.executor.detach_survivors();
        if detached > 0 {
            info!(
                instances = detached,
                "leaving instances of lost_after tasks running for the next start of this node"
            );
        }
        self.feed(Input::Leave);
        self.executor.stop_all();
        // Give the leave announcement a moment to go out.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(event) = tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await
        {
            if let SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::Message {
                message: request_response::Message::Request { channel, .. },
                ..
            })) = event
            {
                drop(channel);
            }
        }
    }

    /// Hands `input` to the replica and carries out what it asks.
    pub(crate) fn feed(&mut self, input: Input) {
        if let Err(e) = self.driver.feed(input) {
            debug!(error = %e, "input refused");
        }
        self.drain();
    }

    /// Carries out the replica's queued actions, then updates metrics and propagation samples.
    pub(crate) fn drain(&mut self) {
        let mut out = PeerOutputs {
            swarm: &mut self.swarm,
            topic: &self.topic,
            pending_replies: &mut self.pending_replies,
            outbound: &mut self.outbound,
            probe_answer: &mut self.probe_answer,
            blocked: &self.blocked,
            addr_book: &self.addr_book,
            executor: &mut self.executor,
            node_id: self.node_id,
        };
        self.driver.drain(&mut out);
        // Each guard's deadline: until when no other node can count its instance's lease
        // lost (the task's disconnect policy decides), less the margin (README, "A task
        // instance never outlives its lease").
        let now = self.driver.now();
        let margin = self.cfg.guard_margin_ms;
        let replica = self.driver.replica();
        let clock = *self.driver.clock();
        let shared = replica.leases_hold_until(now).saturating_sub(margin);
        let round_trip = replica.last_round_trip();
        let mut headroom = None;
        if round_trip != self.renewed.0 {
            // Renewed: what the deadline of the previous round trip had left.
            if self.renewed.0.is_some() {
                headroom = Some(self.renewed.1.saturating_sub(now));
            }
            self.renewed = (round_trip, shared);
        }
        let mut earliest: Option<u64> = None;
        self.executor.renew(clock.instant_at(shared), |task| {
            replica.state().task(task)?;
            let until = replica.instance_deadline(now, task).saturating_sub(margin);
            earliest = Some(earliest.map_or(until, |e| e.min(until)));
            Some(clock.instant_at(until))
        });
        if let Some(until) = earliest.filter(|u| *u < now + self.cfg.heartbeat_ms) {
            if self.deadline_warned.elapsed() >= Duration::from_secs(5) {
                self.deadline_warned = Instant::now();
                let last = self.driver.replica().last_round_trip();
                warn!(
                    in_ms = until.saturating_sub(now),
                    last_round_trip_ms_ago = ?last.map(|t| now.saturating_sub(t)),
                    "no peer has answered this node lately: its guards end its instances when their deadlines pass"
                );
            }
        }
        let samples = self.driver.replica_mut().take_propagation_samples();
        if let Ok(mut m) = self.metrics.lock() {
            if let Some(ms) = headroom {
                m.lease_headroom.observe(ms as f64 / 1000.0);
            }
            for s in &samples {
                m.delta_propagation.observe(s.delay_ms() as f64 / 1000.0);
            }
            m.update(self.driver.replica().stats());
        }
        for s in samples {
            if self.recent_propagation.len() >= RECENT_PROPAGATION {
                self.recent_propagation.pop_front();
            }
            self.recent_propagation.push_back(s);
        }
        // Records (with certificates) and revocations arrive as deltas: take them in soon,
        // at most every 250 ms (housekeeping does it every second regardless).
        let applied = self.driver.replica().stats().deltas_applied;
        if applied != self.admission_refreshed.0
            && self.admission_refreshed.1.elapsed() >= Duration::from_millis(250)
        {
            self.admission_refreshed = (applied, Instant::now());
            self.refresh_admitted();
        }
    }

    fn on_report(&mut self, report: Report) {
        let Report { task, epoch, event } = report;
        if !matches!(event, exec::Event::Started) {
            self.executor.finished(task, epoch);
        }
        info!(task = %task.short(), epoch, ?event, "executor report");
        // The edge where an executor error becomes the replica's text.
        let event = ExecEvent::from(event);
        self.feed(Input::Executor { task, epoch, event });
    }

    /// Counts a malformed message on `channel` (see `Metrics::malformed`).
    pub(crate) fn count_malformed(&self, channel: &str) {
        if let Ok(m) = self.metrics.lock() {
            m.malformed(channel);
        }
    }

    /// Seeds with backoff, connections to known peers, readiness, gauges.
    fn housekeeping(&mut self) {
        self.refresh_admitted();
        self.dial_seeds();
        self.connect_known_peers();
        self.trim_connections();
        self.feed_peer_addresses();
        self.remember_peers();
        self.refresh_images();
        let connected = self.swarm.connected_peers().count();
        let alone = self.cfg.alone || self.seeds.iter().all(|s| s.remembered);
        if !self.ready && (alone || connected > 0) && self.driver.replica().is_ready(!alone) {
            info!(connected, "ready");
            self.ready = true;
        }
        let now_ms = self.driver.now();
        let (known, alive) = self.driver.replica().node_counts(now_ms);
        let mut by_state: BTreeMap<&'static str, i64> = BTreeMap::new();
        for v in self.driver.replica().task_views(now_ms) {
            *by_state.entry(v.state.name()).or_default() += 1;
        }
        if let Ok(m) = self.metrics.lock() {
            m.peers_known.set(i64::try_from(known).unwrap_or(0));
            m.peers_alive.set(i64::try_from(alive).unwrap_or(0));
            m.peers_connected.set(i64::try_from(connected).unwrap_or(0));
            for s in [
                TaskState::Pending,
                TaskState::Running,
                TaskState::Succeeded,
                TaskState::Failed,
                TaskState::Cancelled,
            ] {
                let n = by_state.get(s.name()).copied().unwrap_or(0);
                m.tasks
                    .get_or_create(&crate::metrics::StateLabel {
                        state: s.name().into(),
                    })
                    .set(n);
            }
        }
    }

    /// Brings the image service up to date with the replica, and the replica with what the
    /// blob store holds (at once when a fetch starts, so others can fetch from this node).
    fn refresh_images(&mut self) {
        let now = self.driver.now();
        let held = self
            .images
            .refresh(self.driver.replica(), now, |p| self.permits(p));
        if let Some(held) = held {
            self.feed(Input::Images(held));
        }
    }
}

/// How process tasks are confined on this node: a cgroup per instance where cgroups are
/// writable, the unprivileged `task_user` when the peer runs as root.
fn confinement(
    cfg: &NodeConfig,
    node_id: NodeId,
) -> Result<exec::process::Confinement, StartError> {
    use crate::config::ProcessLimits;
    let parent = format!("{}/{}", cfg.cgroup_parent, node_id.short());
    let cgroup_parent = match exec::cgroup::Hierarchy::detect(&parent) {
        Ok(h) => {
            info!(
                version = h.version(),
                parent = %parent,
                "process tasks run in cgroups with their limits"
            );
            Some(parent)
        }
        Err(e) if cfg.process_limits == ProcessLimits::BestEffort => {
            warn!(reason = %e, "process tasks run WITHOUT cpu, memory or pids limits (process_limits = \"best-effort\")");
            None
        }
        Err(e) => {
            warn!(reason = %e, "this node cannot enforce process limits: process tasks that ask for cpu or memory are refused here (placement sends them to nodes tagged limits:process)");
            None
        }
    };
    let user = if rustix::process::geteuid().is_root() {
        let (uid, gid) = exec::process::lookup_user(&cfg.task_user).map_err(|reason| {
            StartError::Config(crate::config::ConfigError::Value {
                key: "task_user".into(),
                reason,
            })
        })?;
        if uid == 0 {
            return Err(StartError::Config(crate::config::ConfigError::Value {
                key: "task_user".into(),
                reason: format!("{:?} is root; tasks must run unprivileged", cfg.task_user),
            }));
        }
        Some((uid, gid))
    } else {
        warn!("the peer does not run as root: process tasks run as the peer's own user and can read what it can (its data directory included)");
        None
    };
    Ok(exec::process::Confinement {
        cgroup_parent,
        limits: exec::TaskLimits::from_config(cfg),
        best_effort: cfg.process_limits == ProcessLimits::BestEffort,
        user,
    })
}

/// The admission gate of a starting node: its keys and certificate. Says loudly when the mesh
/// is open, and when this node's certificate will not get it in.
fn admission_gate(
    cfg: &NodeConfig,
    plan: &NetPlan,
    node_id: NodeId,
) -> Result<crate::admission::Gate, StartError> {
    let path = cfg.admission_cert_path();
    let cert = crate::admission::read_cert(&path)?;
    let now = Clock::new().now();
    let refuse = |reason: String| {
        StartError::Config(crate::config::ConfigError::Value {
            key: "admission_cert".into(),
            reason,
        })
    };
    if plan.admission_keys.is_empty() {
        warn!("admission is OPEN: no admission_keys are set, so any peer that can reach this node joins the mesh and is believed; set admission_keys and give each node a certificate from `omesh admit`");
    } else {
        let Some(c) = &cert else {
            return Err(refuse(format!(
                "admission_keys are set but there is no certificate at {} (create it with `omesh admit --key OPERATOR_KEY --data-dir {}`)",
                path.display(),
                cfg.data_dir.display()
            )));
        };
        match c.verify(&node_id, &plan.admission_keys, now) {
            Ok(()) => info!(
                keys = plan.admission_keys.len(),
                expires_ms = c.not_after_ms,
                "admission on; this node holds a valid certificate"
            ),
            // Runs anyway, so that a renewed certificate can be dropped in; others refuse it.
            Err(e @ omesh_protocol::CertError::Expired(_)) => {
                warn!(path = %path.display(), error = %e, "this node's admission certificate expired: admitted peers will refuse it until it is renewed (omesh admit)")
            }
            Err(e) => return Err(refuse(format!("{}: {e}", path.display()))),
        }
    }
    Ok(crate::admission::Gate::new(
        plan.admission_keys.clone(),
        cert,
        plan.allowed_peers.clone(),
    ))
}
