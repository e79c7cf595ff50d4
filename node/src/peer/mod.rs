//! The peer's driver: one tokio task that feeds the sans-IO replica from the network, timers,
//! load samples and API calls, and carries out the actions it returns.

mod logs;
pub mod net;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::gossipsub::{IdentTopic, MessageAcceptance};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, identify, kad, ping, Multiaddr, PeerId, Swarm};
use omesh_protocol::{
    GossipMessage, Millis, NodeId, Probe, SyncReply, SyncRequest, TaskState, Wire,
};
use omesh_state::{Action, Input, InputError, Replica};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use self::net::{Behaviour, BehaviourEvent};
use crate::api::{ApiCall, EpochJson, PeerView, StatusView, TaskJson};
use crate::config::ExecutorChoice;
use crate::config::{NetPlan, NodeConfig};
use crate::datadir::DataDir;
use crate::exec::process::ProcessBackend;
use crate::exec::{Backend, Executor, Report};
use crate::load::LoadSampler;
use crate::metrics::Metrics;

/// Milliseconds on a monotonic clock that starts at the wall-clock time of start-up, so
/// timelines read like wall time but never jump.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
    start_wall_ms: Millis,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        Self {
            start: Instant::now(),
            start_wall_ms: u64::try_from(wall).unwrap_or(0),
        }
    }

    /// Now, in ms.
    pub fn now(&self) -> Millis {
        self.start_wall_ms + u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The instant at which the clock reads `t`.
    pub fn instant_at(&self, t: Millis) -> tokio::time::Instant {
        let offset = t.saturating_sub(self.start_wall_ms);
        tokio::time::Instant::from_std(self.start + Duration::from_millis(offset))
    }

    /// Milliseconds since start.
    pub fn uptime_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Propagation samples kept for `/api/v1/debug/propagation`.
const RECENT_PROPAGATION: usize = 4096;

#[derive(Debug)]
pub(crate) struct Seed {
    addr: Multiaddr,
    peer: Option<PeerId>,
    connected: bool,
    next_try: Instant,
    backoff: Duration,
}

/// Everything a running peer holds.
pub struct Peer {
    pub(crate) cfg: NodeConfig,
    pub(crate) plan: NetPlan,
    pub(crate) swarm: Swarm<Behaviour>,
    pub(crate) replica: Replica,
    pub(crate) clock: Clock,
    pub(crate) metrics: Arc<Mutex<Metrics>>,
    pub(crate) topic: IdentTopic,
    pub(crate) local_peer: PeerId,
    pub(crate) incarnation: u64,
    pub(crate) pending_replies: HashMap<NodeId, VecDeque<ResponseChannel<Vec<u8>>>>,
    pub(crate) outbound: HashMap<OutboundRequestId, NodeId>,
    pub(crate) connections: HashMap<PeerId, Vec<libp2p::swarm::ConnectionId>>,
    pub(crate) recent_propagation: VecDeque<omesh_state::PropagationSample>,
    pub(crate) seeds: Vec<Seed>,
    pub(crate) load: LoadSampler,
    pub(crate) listen_addrs: Vec<Multiaddr>,
    pub(crate) ready: bool,
    pub(crate) node_id: NodeId,
    pub(crate) executor: Executor,
    pub(crate) reports: mpsc::Receiver<Report>,
    pub(crate) blocked: BTreeSet<PeerId>,
    pub(crate) pending_logs: HashMap<OutboundRequestId, logs::PendingLog>,
    pub(crate) images: Arc<crate::images::ImageService>,
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
}

impl Peer {
    /// Opens the data directory, builds the swarm and starts listening.
    pub fn start(
        cfg: NodeConfig,
        metrics: Arc<Mutex<Metrics>>,
        docker: Option<Arc<dyn Backend>>,
    ) -> Result<Self, StartError> {
        let plan = cfg.check()?;
        let dir = DataDir::open(&cfg.data_dir)?;
        let key = dir.identity()?;
        let incarnation = dir.next_incarnation()?;
        let node_id = net::node_id_of_key(&key)
            .ok_or_else(|| net::BuildError("identity is not ed25519".into()))?;
        let local_peer = key.public().to_peer_id();
        let images =
            crate::images::ImageService::start(&cfg, &plan, &key, &metrics, docker.is_some())?;
        let mut swarm = net::build_swarm(key, net::GOSSIP_TRANSMIT_LIMIT)?;
        swarm
            .listen_on(plan.listen.clone())
            .map_err(|e| StartError::Listen {
                addr: cfg.listen.clone(),
                reason: e.to_string(),
            })?;
        let topic = IdentTopic::new(net::STATE_TOPIC);
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic)
            .map_err(|e| net::BuildError(format!("subscribe: {e}")))?;
        let load = LoadSampler::new(cfg.fake_cpu_percent);
        let (reports_tx, reports) = mpsc::channel(1024);
        let log_dir = dir.path().join("logs");
        std::fs::create_dir_all(&log_dir).map_err(|source| crate::datadir::DataDirError::Io {
            what: "cannot create",
            path: log_dir.clone(),
            source,
        })?;
        let prefer_docker = cfg.executor != ExecutorChoice::Process;
        let mut executor = Executor::new(
            Arc::new(ProcessBackend),
            docker,
            prefer_docker,
            reports_tx,
            log_dir,
        );
        executor.set_image_provider(images.clone());
        let mut rcfg = cfg.replica_config(node_id, incarnation, load.capacity());
        rcfg.tags.extend(executor.tags());
        let replica = Replica::new(rcfg)?;
        let now = Instant::now();
        let seeds = plan
            .seeds
            .iter()
            .map(|addr| Seed {
                addr: addr.clone(),
                peer: None,
                connected: false,
                next_try: now,
                backoff: Duration::from_millis(500),
            })
            .collect();
        if let Ok(m) = metrics.lock() {
            m.incarnation
                .set(i64::try_from(incarnation).unwrap_or(i64::MAX));
        }
        info!(node = %node_id.short(), peer = %local_peer, incarnation, executor = executor.name(), "omesh peer starting");
        Ok(Self {
            cfg,
            plan,
            swarm,
            replica,
            clock: Clock::new(),
            metrics,
            topic,
            local_peer,
            incarnation,
            pending_replies: HashMap::new(),
            outbound: HashMap::new(),
            connections: HashMap::new(),
            recent_propagation: VecDeque::new(),
            seeds,
            load,
            listen_addrs: Vec::new(),
            ready: false,
            node_id,
            executor,
            reports,
            blocked: BTreeSet::new(),
            pending_logs: HashMap::new(),
            images,
        })
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
        match self.executor.cleanup_orphans(&self.node_id).await {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "removed instances left by an earlier run"),
            Err(e) => warn!(error = %e, "cannot clean up instances of an earlier run"),
        }
        loop {
            let wake = self.replica.poll_timeout().map_or_else(
                || tokio::time::Instant::now() + Duration::from_secs(1),
                |t| self.clock.instant_at(t),
            );
            let images = Arc::clone(&self.images);
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(call) = calls.recv() => self.on_call(call),
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

    pub(crate) fn feed(&mut self, input: Input) {
        let now = self.clock.now();
        if let Err(e) = self.replica.handle(now, input) {
            debug!(error = %e, "input refused");
        }
        self.drain();
    }

    pub(crate) fn drain(&mut self) {
        while let Some(action) = self.replica.poll_action() {
            match action {
                Action::Publish(msg) => self.publish(&msg),
                Action::SendSync { to, request } => self.send_sync(to, &request),
                Action::ReplySync { to, reply } => self.reply_sync(to, &reply),
                Action::SendProbe { to, probe } => self.send_probe(to, probe),
                Action::StartTask { task, epoch, spec } => {
                    info!(task = %task.short(), epoch, "starting task");
                    self.executor.start(task, epoch, spec, self.node_id);
                }
                Action::StopTask {
                    task,
                    epoch,
                    reason,
                } => {
                    info!(task = %task.short(), epoch, ?reason, "stopping task");
                    if self.executor.is_running(&task, epoch) {
                        self.executor.stop(task, epoch);
                    } else {
                        // Nothing runs (never started, or already ended): say so at once.
                        let now = self.clock.now();
                        let _ = self.replica.handle(
                            now,
                            Input::Executor {
                                task,
                                epoch,
                                event: omesh_state::ExecEvent::Stopped,
                            },
                        );
                    }
                }
            }
        }
        let samples = self.replica.take_propagation_samples();
        if let Ok(mut m) = self.metrics.lock() {
            for s in &samples {
                m.delta_propagation.observe(s.delay_ms() as f64 / 1000.0);
            }
            m.update(self.replica.stats());
        }
        for s in samples {
            if self.recent_propagation.len() >= RECENT_PROPAGATION {
                self.recent_propagation.pop_front();
            }
            self.recent_propagation.push_back(s);
        }
    }

    fn publish(&mut self, msg: &GossipMessage) {
        let bytes = match msg.to_wire() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot encode gossip");
                return;
            }
        };
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), bytes)
        {
            Ok(_) | Err(gossipsub::PublishError::Duplicate) => {}
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                debug!("no peer subscribed yet; anti-entropy will carry it");
            }
            Err(e) => debug!(error = %e, "publish failed; anti-entropy will carry it"),
        }
    }

    /// Counts a malformed message on `channel` (see `Metrics::malformed`).
    pub(crate) fn count_malformed(&self, channel: &str) {
        if let Ok(m) = self.metrics.lock() {
            m.malformed(channel);
        }
    }

    /// The peer id of `node`, unless an operator blocked it.
    fn unblocked_peer(&self, node: &NodeId) -> Option<PeerId> {
        net::peer_id_of(node).filter(|p| !self.blocked.contains(p))
    }

    /// The node id of `peer`, unless an operator blocked it.
    fn unblocked_node(&self, peer: &PeerId) -> Option<NodeId> {
        net::node_id_of(peer).filter(|_| !self.blocked.contains(peer))
    }

    fn send_probe(&mut self, to: NodeId, probe: Probe) {
        let Some(peer) = self.unblocked_peer(&to) else {
            return;
        };
        match probe.to_wire() {
            Ok(bytes) => {
                self.swarm.behaviour_mut().probe.send_request(&peer, bytes);
            }
            Err(e) => warn!(error = %e, "cannot encode probe"),
        }
    }

    fn on_probe_event(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                // The empty answer only closes the stream; the replica answers with a probe.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .probe
                    .send_response(channel, Vec::new());
                let Some(from) = self.unblocked_node(&peer) else {
                    return;
                };
                match Probe::from_wire(&request) {
                    Ok(probe) => self.feed(Input::Probe { from, probe }),
                    Err(e) => {
                        self.count_malformed("probe");
                        debug!(%peer, error = %e, "malformed probe dropped");
                    }
                }
            }
            request_response::Event::OutboundFailure { peer, error, .. } => {
                // Unreachable or slow: the replica sees a missing ack, which is the point.
                debug!(%peer, %error, "probe not delivered");
            }
            request_response::Event::Message { .. }
            | request_response::Event::InboundFailure { .. }
            | request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn send_sync(&mut self, to: NodeId, request: &SyncRequest) {
        let Some(peer) = self.unblocked_peer(&to) else {
            self.feed_later_failure(to);
            return;
        };
        match request.to_wire() {
            Ok(bytes) => {
                let id = self.swarm.behaviour_mut().sync.send_request(&peer, bytes);
                self.outbound.insert(id, to);
            }
            Err(e) => {
                warn!(error = %e, "cannot encode sync request");
                self.feed_later_failure(to);
            }
        }
    }

    fn feed_later_failure(&mut self, peer: NodeId) {
        let now = self.clock.now();
        let _ = self.replica.handle(now, Input::SyncFailed { peer });
    }

    fn reply_sync(&mut self, to: NodeId, reply: &SyncReply) {
        let Some(channel) = self
            .pending_replies
            .get_mut(&to)
            .and_then(VecDeque::pop_front)
        else {
            return;
        };
        match reply.to_wire() {
            Ok(bytes) => {
                if self
                    .swarm
                    .behaviour_mut()
                    .sync
                    .send_response(channel, bytes)
                    .is_err()
                {
                    debug!(peer = %to.short(), "sync requester went away");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode sync reply"),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => self.on_gossip(propagation_source, &message_id, &message),
            SwarmEvent::Behaviour(BehaviourEvent::Sync(ev)) => self.on_sync_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Logs(ev)) => self.on_logs_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Probe(ev)) => self.on_probe_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for addr in info.listen_addrs {
                    if is_dialable(&addr) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                if let Some(node) = net::node_id_of(&peer) {
                    let rtt_us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
                    self.feed(Input::Rtt { peer: node, rtt_us });
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, ..
            })) => {
                debug!(%peer, "kademlia routing updated");
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                    self.advertise_addrs();
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                info!(%address, "no longer listening");
                self.listen_addrs.retain(|a| a != &address);
                self.advertise_addrs();
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                num_established,
                ..
            } => {
                let conns = self.connections.entry(peer_id).or_default();
                let older: Vec<_> = std::mem::take(conns);
                conns.push(connection_id);
                if num_established.get() > 1 {
                    // A peer that restarts reconnects while our old connection to it still
                    // looks open. gossipsub only announces our subscriptions on a peer's first
                    // connection, so the restarted peer would never learn we listen: close the
                    // old connections and announce the topic again.
                    for old in older {
                        self.swarm.close_connection(old);
                    }
                    let gs = &mut self.swarm.behaviour_mut().gossipsub;
                    gs.unsubscribe(&self.topic);
                    if let Err(e) = gs.subscribe(&self.topic) {
                        warn!(error = %e, "cannot resubscribe");
                    }
                }
                if self.blocked.contains(&peer_id) {
                    let _ = self.swarm.close_connection(connection_id);
                    return;
                }
                if !self.plan.allowed_peers.is_empty()
                    && !self.plan.allowed_peers.contains(&peer_id)
                {
                    warn!(%peer_id, "peer not in allowed_peers; disconnecting");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                let remote = endpoint.get_remote_address().clone();
                for seed in &mut self.seeds {
                    if strip_p2p(&seed.addr) == strip_p2p(&remote) {
                        seed.connected = true;
                        seed.peer = Some(peer_id);
                        seed.backoff = Duration::from_millis(500);
                    }
                }
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer_id, strip_p2p(&remote));
                debug!(%peer_id, %remote, "connected");
                if num_established.get() == 1 {
                    if let Some(node) = net::node_id_of(&peer_id) {
                        self.feed(Input::Connected(node));
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                connection_id,
                ..
            } => {
                if let Some(conns) = self.connections.get_mut(&peer_id) {
                    conns.retain(|c| *c != connection_id);
                }
                if num_established == 0 {
                    self.connections.remove(&peer_id);
                    for seed in &mut self.seeds {
                        if seed.peer == Some(peer_id) {
                            seed.connected = false;
                        }
                    }
                    debug!(%peer_id, "disconnected");
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(?peer_id, %error, "dial failed");
            }
            _ => {}
        }
    }

    fn on_gossip(
        &mut self,
        source: PeerId,
        id: &gossipsub::MessageId,
        message: &gossipsub::Message,
    ) {
        if self.blocked.contains(&source)
            || message.source.is_some_and(|s| self.blocked.contains(&s))
        {
            self.swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(id, &source, MessageAcceptance::Ignore);
            return;
        }
        let acceptance = match GossipMessage::from_wire(&message.data) {
            Err(e) => {
                self.count_malformed("gossip");
                debug!(%source, error = %e, "malformed gossip dropped");
                MessageAcceptance::Reject
            }
            Ok(msg) => {
                // Strict validation means gossipsub checked the signer's signature; a node
                // only ever publishes its own deltas, so any other origin is a forgery.
                let Some(from) = message.source.as_ref().and_then(net::node_id_of) else {
                    return;
                };
                // The relay, not the publisher: a gap this delivery shows is closed by
                // syncing with a peer that is connected now (the publisher may be gone).
                let Some(via) = net::node_id_of(&source) else {
                    return;
                };
                if msg.deltas.iter().any(|d| d.origin != from) {
                    self.count_malformed("gossip_forged_origin");
                    warn!(%source, "gossip carrying another node's deltas dropped");
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(id, &source, MessageAcceptance::Reject);
                    return;
                }
                let now = self.clock.now();
                let result = self.replica.handle(now, Input::Gossip { via, msg });
                self.drain();
                match result {
                    Ok(()) => MessageAcceptance::Accept,
                    Err(InputError::Rejected { applied, first, .. }) => {
                        debug!(%source, error = %first, "gossip deltas rejected");
                        if applied > 0 {
                            MessageAcceptance::Accept
                        } else {
                            MessageAcceptance::Reject
                        }
                    }
                    Err(_) => MessageAcceptance::Reject,
                }
            }
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(id, &source, acceptance);
    }

    fn on_sync_event(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let Some(from) = self.unblocked_node(&peer) else {
                        return;
                    };
                    match SyncRequest::from_wire(&request) {
                        Ok(request) => {
                            self.pending_replies
                                .entry(from)
                                .or_default()
                                .push_back(channel);
                            self.feed(Input::SyncRequest { from, request });
                        }
                        Err(e) => {
                            self.count_malformed("sync_request");
                            debug!(%peer, error = %e, "malformed sync request dropped");
                        }
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    let to = self.outbound.remove(&request_id);
                    let from = to.or_else(|| net::node_id_of(&peer));
                    let Some(from) = from else {
                        return;
                    };
                    match SyncReply::from_wire(&response) {
                        Ok(reply) => self.feed(Input::SyncReply { from, reply }),
                        Err(e) => {
                            self.count_malformed("sync_reply");
                            debug!(%peer, error = %e, "malformed sync reply dropped");
                            self.feed(Input::SyncFailed { peer: from });
                        }
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            } => {
                debug!(%peer, %error, "sync request failed");
                if let Some(to) = self.outbound.remove(&request_id) {
                    self.feed(Input::SyncFailed { peer: to });
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                if matches!(error, request_response::InboundFailure::Io(_)) {
                    self.count_malformed("sync_request");
                }
                debug!(%peer, %error, "inbound sync failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn advertise_addrs(&mut self) {
        let dialable = advertisable(&self.listen_addrs);
        let mut addrs: Vec<String> = dialable
            .iter()
            .map(|a| a.clone().with(Protocol::P2p(self.local_peer)).to_string())
            .collect();
        addrs.extend(self.images.advertised_addrs(&dialable));
        self.feed(Input::Addresses(addrs));
    }

    /// Seeds with backoff, connections to known peers, readiness, gauges.
    fn housekeeping(&mut self) {
        let now = Instant::now();
        for i in 0..self.seeds.len() {
            let Some(seed) = self.seeds.get_mut(i) else {
                continue;
            };
            if seed.connected
                || now < seed.next_try
                || seed.peer.is_some_and(|p| self.blocked.contains(&p))
            {
                continue;
            }
            seed.next_try = now + seed.backoff;
            seed.backoff = (seed.backoff * 2).min(Duration::from_secs(30));
            let addr = seed.addr.clone();
            if let Err(e) = self.swarm.dial(addr.clone()) {
                warn!(seed = %addr, error = %e, "cannot dial seed; will retry");
            } else {
                debug!(seed = %addr, "dialing seed");
            }
        }
        self.connect_known_peers();
        self.refresh_images();
        let connected = self.swarm.connected_peers().count();
        let alone = self.cfg.alone || self.seeds.is_empty();
        if !self.ready && (alone || connected > 0) && self.replica.is_ready(!alone) {
            info!(connected, "ready");
            self.ready = true;
        }
        let now_ms = self.clock.now();
        let (known, alive) = self.replica.node_counts(now_ms);
        let mut by_state: BTreeMap<&'static str, i64> = BTreeMap::new();
        for v in self.replica.task_views(now_ms) {
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

    /// Keeps connections to up to `target_peers` live peers whose records give addresses,
    /// so that gossip does not hinge on the seed.
    fn connect_known_peers(&mut self) {
        let connected = self.swarm.connected_peers().count();
        if connected >= self.cfg.target_peers {
            return;
        }
        let now = self.clock.now();
        let mut want = self.cfg.target_peers - connected;
        let candidates: Vec<(PeerId, Vec<Multiaddr>)> = self
            .replica
            .live_peers(now)
            .filter_map(|n| {
                let peer = net::peer_id_of(&n.id)?;
                let addrs = n
                    .addrs
                    .iter()
                    .filter_map(|a| a.parse::<Multiaddr>().ok())
                    .collect();
                Some((peer, addrs))
            })
            .collect();
        for (peer, addrs) in candidates {
            if want == 0 {
                break;
            }
            if self.swarm.is_connected(&peer) || addrs.is_empty() || self.blocked.contains(&peer) {
                continue;
            }
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(addrs)
                .build();
            if self.swarm.dial(opts).is_ok() {
                want -= 1;
            }
        }
    }

    fn on_call(&mut self, call: ApiCall) {
        let now = self.clock.now();
        match call {
            ApiCall::Status(tx) => {
                let (peers_known, peers_alive) = self.replica.node_counts(now);
                let _ = tx.send(StatusView {
                    node_id: self.replica.id().to_hex(),
                    peer_id: self.local_peer.to_string(),
                    incarnation: self.incarnation,
                    version: env!("CARGO_PKG_VERSION").into(),
                    ready: self.ready,
                    peers_known,
                    peers_alive,
                    peers_connected: self.swarm.connected_peers().count(),
                    digest: self.replica.digest().to_string(),
                    tasks: self.replica.state().task_count(),
                    listen_addrs: self.listen_addrs.iter().map(ToString::to_string).collect(),
                    uptime_ms: self.clock.uptime_ms(),
                    overloaded: self.replica.is_overloaded(),
                });
            }
            ApiCall::Peers(tx) => {
                let me = self.replica.id();
                let views = self
                    .replica
                    .state()
                    .nodes()
                    .map(|n| PeerView {
                        id: n.id.to_hex(),
                        peer_id: net::peer_id_of(&n.id)
                            .map(|p| p.to_string())
                            .unwrap_or_default(),
                        is_self: n.id == me,
                        addresses: n.addrs.clone(),
                        tags: n.tags.iter().cloned().collect(),
                        cpu_percent: f64::from(n.load.cpu_permille) / 10.0,
                        mem_percent: f64::from(n.load.mem_permille) / 10.0,
                        rtt_ms: self.replica.rtt(&n.id).map(|r| r.srtt_us as f64 / 1000.0),
                        health: self.replica.health(now, &n.id).name().into(),
                        last_heard_ms_ago: self
                            .replica
                            .last_heard(&n.id)
                            .map(|t| now.saturating_sub(t)),
                        suspected_ms_ago: self
                            .replica
                            .suspected_since(&n.id)
                            .map(|t| now.saturating_sub(t)),
                        incarnation: n.incarnation,
                    })
                    .collect();
                let _ = tx.send(views);
            }
            ApiCall::Tasks(tx) => {
                let views = self
                    .replica
                    .task_views(now)
                    .iter()
                    .map(|v| self.with_progress(task_json(v)))
                    .collect();
                let _ = tx.send(views);
            }
            ApiCall::Submit(spec, tx) => {
                let _ = tx.send(self.submit(*spec));
            }
            ApiCall::Cancel(task, tx) => {
                let _ = tx.send(self.cancel(task));
            }
            ApiCall::Logs { task, offset, tx } => self.logs(task, offset, tx),
            ApiCall::Block(peers, tx) => {
                self.blocked = peers.into_iter().collect();
                let blocked: Vec<PeerId> = self.blocked.iter().copied().collect();
                for p in blocked {
                    let _ = self.swarm.disconnect_peer_id(p);
                }
                info!(blocked = self.blocked.len(), "peer block list set");
                let _ = tx.send(());
            }
            ApiCall::Propagation(tx) => {
                let samples = self
                    .recent_propagation
                    .iter()
                    .map(|s| crate::api::PropagationJson {
                        origin: s.origin.to_hex(),
                        seq: s.seq,
                        written_at_ms: s.written_at_ms,
                        merged_at_ms: s.merged_at_ms,
                    })
                    .collect();
                let _ = tx.send(samples);
            }
            ApiCall::Task(id, tx) => {
                let view = self.replica.task_view(now, &id);
                let _ = tx.send(view.as_ref().map(|v| self.with_progress(task_json(v))));
            }
            ApiCall::PullImage(image, tx) => {
                let _ = tx.send(self.images.pull(image));
            }
            ApiCall::Pulls(tx) => {
                let _ = tx.send(self.images.pulls());
            }
        }
    }
}

impl Peer {
    /// Brings the image service up to date with the replica, and the replica with what the
    /// blob store holds (at once when a fetch starts, so others can fetch from this node).
    fn refresh_images(&mut self) {
        let now = self.clock.now();
        let held = self
            .images
            .refresh(&self.replica, now, &self.blocked, &self.plan.allowed_peers);
        if let Some(held) = held {
            self.feed(Input::Images(held));
        }
    }

    /// Adds the progress of the image fetch this node runs for the task, if any.
    fn with_progress(&self, mut t: TaskJson) -> TaskJson {
        t.progress = t.id.parse().ok().and_then(|id| self.images.progress(&id));
        t
    }
}

fn task_json(v: &omesh_state::TaskView) -> TaskJson {
    TaskJson {
        id: v.id.to_hex(),
        state: v.state.name().into(),
        code: v.state.code(),
        epoch: v.epoch,
        owner: v.owner.map(|o| o.to_hex()),
        failed_attempts: v.failed_attempts,
        exit_code: v.exit_code,
        error: v.error.clone(),
        pending_reason: v.pending_reason.clone(),
        image: v.spec.as_ref().map(|s| s.spec.image.clone()),
        command: v
            .spec
            .as_ref()
            .map(|s| s.spec.command.clone())
            .unwrap_or_default(),
        history: v
            .history
            .iter()
            .map(|(epoch, e)| EpochJson {
                epoch: *epoch,
                state: e.state.name().into(),
                exit_code: e.exit_code,
                error: e.error.clone(),
                reporter: e.reporter.to_hex(),
                at_ms: e.at_ms,
            })
            .collect(),
        compacted: v.compacted,
        progress: None,
    }
}

fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

/// The listen addresses worth giving to others: dialable, each once, and loopback ones only
/// when there is nothing else (a mesh on one host); another host cannot reach 127.0.0.1.
fn advertisable(listen: &[Multiaddr]) -> Vec<Multiaddr> {
    let mut out: Vec<Multiaddr> = Vec::new();
    for a in listen.iter().filter(|a| is_dialable(a)) {
        if !out.contains(a) {
            out.push(a.clone());
        }
    }
    if out.iter().any(|a| !is_loopback(a)) {
        out.retain(|a| !is_loopback(a));
    }
    out
}

fn is_loopback(addr: &Multiaddr) -> bool {
    ips(addr).any(|ip| ip.is_loopback())
}

/// Whether an address is worth giving to others (not unspecified).
fn is_dialable(addr: &Multiaddr) -> bool {
    !ips(addr).any(|ip| ip.is_unspecified())
}

/// The IP parts of a multiaddr.
fn ips(addr: &Multiaddr) -> impl Iterator<Item = std::net::IpAddr> + '_ {
    addr.iter().filter_map(|p| match p {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addrs(list: &[&str]) -> Vec<Multiaddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn advertised_addresses_are_deduplicated_and_leave_loopback_out_when_there_is_more() {
        let lan = "/ip4/10.0.0.7/udp/7001/quic-v1";
        let lo = "/ip4/127.0.0.1/udp/7001/quic-v1";
        let any = "/ip4/0.0.0.0/udp/7001/quic-v1";
        assert_eq!(advertisable(&addrs(&[lo, lan, lan, any])), addrs(&[lan]));
        // A mesh on one host has only loopback: it is kept, once.
        assert_eq!(advertisable(&addrs(&[lo, lo])), addrs(&[lo]));
        assert_eq!(
            advertisable(&addrs(&["/ip6/::1/udp/7001/quic-v1", any])),
            addrs(&["/ip6/::1/udp/7001/quic-v1"])
        );
        assert!(advertisable(&addrs(&[any])).is_empty());
    }
}
