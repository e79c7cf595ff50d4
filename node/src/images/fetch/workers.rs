//! The workers of one blob fetch: a few requests in flight per holder, all taking chunks
//! from one queue of missing ones; holders are added as they appear and left out when they
//! fail again and again or answer what does not fit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use omesh_protocol::blob::{BlobRequest, BlobResponse};
use omesh_protocol::Digest;
use tracing::{debug, warn};

use super::{write_chunk, FetchError, Fetcher, Holder, Progress};
use crate::images::blobs::{chunk_count, chunk_range, Partial, StoreError};
use crate::images::dataplane::DataPlaneError;

/// Requests in flight per holder.
const PER_HOLDER: usize = 8;
/// While other nodes fetch the same blob (a swarm), each member takes only its share of the
/// chunks from holders of the whole image and the rest from the members. A member that has
/// served this node nothing for this long (from when it joined) is taken to be stuck, and its
/// share comes from the holders of the whole image too. Per member: one slow member must not
/// send every node back to the origin for everything.
const SWARM_STALL: Duration = Duration::from_secs(10);
/// Failures in a row after which a holder that has served nothing for [`GIVE_UP_AFTER`] is
/// left out of this fetch. A cut connection fails every request in flight at once, so the
/// count alone would drop a holder that serves well between cuts.
const MAX_FAILURES: u32 = 6;
/// See [`MAX_FAILURES`].
const GIVE_UP_AFTER: Duration = Duration::from_secs(5);
/// How long a node that fetches too is taken to lack a chunk it said it lacks.
const LACK_FOR: Duration = Duration::from_millis(300);
/// A fetch that gets no chunk from anyone for this long gives up (the partial file stays).
const STALL: Duration = Duration::from_secs(30);

impl Fetcher {
    /// Fetches the chunks in `queue` into `partial` from every holder not banned or excluded,
    /// adding holders that appear while it runs. Records who served each chunk.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run(
        &self,
        partial: &Arc<Partial>,
        image: &Digest,
        queue: VecDeque<u64>,
        served_by: &mut HashMap<u64, PeerId>,
        banned: &mut HashSet<PeerId>,
        exclude: &HashSet<PeerId>,
        progress: &Arc<Progress>,
    ) -> Result<(), FetchError> {
        let digest = partial.digest();
        let plan = Arc::new(Mutex::new(Plan {
            left: queue.len(),
            queue,
            chunks: chunk_count(partial.total()),
            lacks: HashMap::new(),
            frontier: HashMap::new(),
            served_by: HashMap::new(),
            me: self.inner.key.public().to_peer_id(),
            owners: Vec::new(),
            share_len: 0,
            member_ok: HashMap::new(),
        }));
        let mut workers = tokio::task::JoinSet::new();
        let mut active: HashMap<PeerId, usize> = HashMap::new();
        let mut gone: HashSet<PeerId> = HashSet::new();
        let mut last_error = String::from("no holder left");
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let received = Arc::new(AtomicU64::new(0));
        let mut last_progress = (0, Instant::now());
        let mut swarm: HashSet<PeerId> = HashSet::new();
        let outcome = loop {
            if lock(&plan).left == 0 {
                break Ok(());
            }
            for h in self.inner.holders.holders(&digest, image) {
                if !h.complete && !banned.contains(&h.peer) {
                    swarm.insert(h.peer);
                }
                if banned.contains(&h.peer)
                    || exclude.contains(&h.peer)
                    || gone.contains(&h.peer)
                    || active.contains_key(&h.peer)
                {
                    continue;
                }
                active.insert(h.peer, PER_HOLDER);
                let health = Arc::new(HolderHealth {
                    failures: AtomicU32::new(0),
                    last_ok: Mutex::new(Instant::now()),
                });
                for _ in 0..PER_HOLDER {
                    let w = Worker {
                        fetcher: self.clone(),
                        holder: h.clone(),
                        partial: Arc::clone(partial),
                        plan: Arc::clone(&plan),
                        received: Arc::clone(&received),
                        progress: Arc::clone(progress),
                        health: Arc::clone(&health),
                    };
                    workers.spawn(w.run());
                }
            }
            let members: Vec<PeerId> = swarm
                .iter()
                .filter(|p| active.contains_key(p) && !banned.contains(p))
                .copied()
                .collect();
            lock(&plan).share_out(members);
            if workers.is_empty() {
                break Err(FetchError::Stopped {
                    digest,
                    reason: last_error,
                });
            }
            let now_received = received.load(Ordering::Relaxed);
            if now_received != last_progress.0 {
                last_progress = (now_received, Instant::now());
            } else if last_progress.1.elapsed() > STALL {
                break Err(FetchError::Stopped {
                    digest,
                    reason: format!(
                        "no chunk arrived for {} s; last problem: {last_error}",
                        STALL.as_secs()
                    ),
                });
            }
            tokio::select! {
                ended = workers.join_next() => {
                    let Some(ended) = ended else { continue };
                    let (peer, end) = match ended {
                        Ok(x) => x,
                        Err(e) => break Err(FetchError::Stopped { digest, reason: format!("worker failed: {e}") }),
                    };
                    if let Some(n) = active.get_mut(&peer) {
                        *n = n.saturating_sub(1);
                    }
                    match end {
                        End::Finished => {}
                        End::Gone(e) => {
                            debug!(%peer, error = %e, "holder left out of this fetch");
                            last_error = format!("{peer}: {e}");
                            gone.insert(peer);
                        }
                        End::Bad(e) => {
                            warn!(%peer, error = %e, "holder dropped");
                            last_error = format!("{peer}: {e}");
                            banned.insert(peer);
                            self.mark_bad(peer);
                            self.inner.metrics.bad_holders.inc();
                        }
                        End::Store(e) => break Err(FetchError::Store(e)),
                    }
                    if active.get(&peer) == Some(&0) {
                        active.remove(&peer);
                    }
                }
                _ = tick.tick() => {}
            }
        };
        workers.shutdown().await;
        served_by.extend(lock(&plan).served_by.drain());
        outcome
    }
}

fn lock(plan: &Mutex<Plan>) -> std::sync::MutexGuard<'_, Plan> {
    plan.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The chunks still to fetch, shared by the workers of one blob.
struct Plan {
    queue: VecDeque<u64>,
    left: usize,
    /// Chunks of the blob.
    chunks: u64,
    /// Chunks a holder said it lacks, and since when (partial holders gain chunks).
    lacks: HashMap<PeerId, (Instant, HashSet<u64>)>,
    /// How far past the start of its share a member of the swarm has been seen to hold chunks.
    frontier: HashMap<PeerId, u64>,
    served_by: HashMap<u64, PeerId>,
    /// This node.
    me: PeerId,
    /// The swarm's members in share order, this node included (share `k` is chunks
    /// `k * share_len ..`); empty: no swarm.
    owners: Vec<PeerId>,
    /// Chunks per share.
    share_len: u64,
    /// When each member last served this node a chunk (or joined).
    member_ok: HashMap<PeerId, Instant>,
}

enum Take {
    Chunk(u64),
    Wait,
    Finished,
}

impl Plan {
    /// Splits the chunks into contiguous shares, one per member of the swarm (sorted by
    /// peer id, so every member computes the same split once views agree).
    fn share_out(&mut self, mut members: Vec<PeerId>) {
        if members.is_empty() {
            self.owners.clear();
            return;
        }
        members.push(self.me);
        members.sort();
        members.dedup();
        let n = members.len() as u64;
        self.share_len = self.chunks.div_ceil(n).max(1);
        let now = Instant::now();
        for p in &members {
            self.member_ok.entry(*p).or_insert(now);
        }
        self.owners = members;
    }

    /// The first chunk of `peer`'s share (0 for a peer outside the swarm).
    fn share_start(&self, peer: &PeerId) -> u64 {
        self.owners
            .iter()
            .position(|p| p == peer)
            .map_or(0, |k| k as u64 * self.share_len)
    }

    /// How far chunk `i` lies past `start` (a share's first chunk), wrapping around the blob.
    fn dist(&self, start: u64, i: u64) -> u64 {
        let n = self.chunks.max(1);
        (i + n - start % n) % n
    }

    /// Whether chunk `i` is this node's to take from holders of the whole blob: it is in this
    /// node's share, or in the share of a member that has stopped serving.
    fn origin_serves(&self, i: u64) -> bool {
        let Some(owner) = usize::try_from(i / self.share_len.max(1))
            .ok()
            .and_then(|k| self.owners.get(k))
        else {
            return true;
        };
        *owner == self.me
            || self
                .member_ok
                .get(owner)
                .is_none_or(|t| t.elapsed() >= SWARM_STALL)
    }

    /// The next chunk to ask `peer` for. A swarm member is asked for its share, in order and
    /// only a little past what it has been seen to hold; a holder of the whole blob, while
    /// there is a swarm that serves, only for this node's share.
    fn take(&mut self, peer: &PeerId, complete: bool) -> Take {
        if self.left == 0 {
            return Take::Finished;
        }
        if self
            .lacks
            .get(peer)
            .is_some_and(|(since, _)| since.elapsed() > LACK_FOR)
        {
            self.lacks.remove(peer);
        }
        let lacking = self.lacks.get(peer).map(|(_, l)| l);
        let wanted = |i: &u64| !lacking.is_some_and(|l| l.contains(i));
        let pos = if complete {
            if self.owners.is_empty() {
                self.queue.iter().position(wanted)
            } else {
                // This node's share, from its start (the order the others ask for it in), then
                // the shares of members that stopped serving.
                let mine = self.share_start(&self.me);
                let len = self.share_len;
                self.queue
                    .iter()
                    .enumerate()
                    .filter(|(_, i)| wanted(i) && self.origin_serves(**i))
                    .min_by_key(|(_, i)| (!(mine..mine + len).contains(*i), **i))
                    .map(|(p, _)| p)
            }
        } else {
            // Distances from the start of the member's share. The window of what to ask runs
            // to a little past the member's known frontier, or past the first chunk this node
            // still lacks, whichever is further: chunks this node got elsewhere (before the
            // swarm formed, say) must not leave it waiting below the window for good.
            let start = self.share_start(peer);
            let first_needed = self
                .queue
                .iter()
                .map(|i| self.dist(start, *i))
                .min()
                .unwrap_or(0);
            let reach = self
                .frontier
                .get(peer)
                .copied()
                .unwrap_or(0)
                .max(first_needed)
                + PER_HOLDER as u64;
            self.queue
                .iter()
                .enumerate()
                .filter(|(_, i)| wanted(i))
                .map(|(p, i)| (p, self.dist(start, *i)))
                .filter(|(_, d)| *d <= reach)
                .min_by_key(|(_, d)| *d)
                .map(|(p, _)| p)
        };
        match pos.and_then(|p| self.queue.remove(p)) {
            Some(i) => Take::Chunk(i),
            None => Take::Wait,
        }
    }

    fn put_back(&mut self, idx: u64) {
        self.queue.push_front(idx);
    }

    fn lacks(&mut self, peer: PeerId, idx: u64) {
        self.lacks
            .entry(peer)
            .or_insert_with(|| (Instant::now(), HashSet::new()))
            .1
            .insert(idx);
        self.queue.push_back(idx);
    }

    fn done(&mut self, idx: u64, peer: PeerId, complete: bool) {
        self.left = self.left.saturating_sub(1);
        self.served_by.insert(idx, peer);
        if !complete {
            self.member_ok.insert(peer, Instant::now());
            let d = self.dist(self.share_start(&peer), idx);
            let f = self.frontier.entry(peer).or_default();
            *f = (*f).max(d);
        }
    }
}

/// How a worker ended.
enum End {
    /// Nothing left to fetch.
    Finished,
    /// Its holder failed too often in a row.
    Gone(String),
    /// Its holder answered something that cannot be right.
    Bad(String),
    /// The local store failed: the fetch cannot go on.
    Store(StoreError),
}

/// How one holder has been doing in this fetch, shared by its workers.
struct HolderHealth {
    /// Requests failed since the last success.
    failures: AtomicU32,
    last_ok: Mutex<Instant>,
}

impl HolderHealth {
    fn ok(&self) {
        self.failures.store(0, Ordering::Relaxed);
        *self.last_ok.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// Counts a failure; whether to give the holder up.
    fn failed(&self) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let quiet = self
            .last_ok
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed();
        n >= MAX_FAILURES && quiet > GIVE_UP_AFTER
    }
}

struct Worker {
    fetcher: Fetcher,
    holder: Holder,
    partial: Arc<Partial>,
    plan: Arc<Mutex<Plan>>,
    received: Arc<AtomicU64>,
    progress: Arc<Progress>,
    health: Arc<HolderHealth>,
}

impl Worker {
    async fn run(self) -> (PeerId, End) {
        let peer = self.holder.peer;
        (peer, self.work().await)
    }

    async fn work(&self) -> End {
        let digest = self.partial.digest();
        let total = self.partial.total();
        let peer = self.holder.peer;
        let complete = self.holder.complete;
        let mut failures = 0u32;
        loop {
            let take = lock(&self.plan).take(&peer, complete);
            let idx = match take {
                Take::Chunk(i) => i,
                Take::Finished => return End::Finished,
                Take::Wait => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (offset, len) = chunk_range(total, idx);
            let req = BlobRequest {
                digest,
                offset,
                len,
            };
            let problem = match self.fetcher.ask(&self.holder, &req).await {
                Ok(BlobResponse::Chunk {
                    offset: o,
                    total: t,
                    data,
                }) if o == offset && t == total && data.len() == len as usize => {
                    if let Err(e) = write_chunk(&self.partial, idx, data).await {
                        lock(&self.plan).put_back(idx);
                        return End::Store(e);
                    }
                    self.received.fetch_add(u64::from(len), Ordering::Relaxed);
                    self.progress
                        .done
                        .fetch_add(u64::from(len), Ordering::Relaxed);
                    lock(&self.plan).done(idx, peer, complete);
                    self.health.ok();
                    failures = 0;
                    continue;
                }
                Ok(BlobResponse::Chunk { total: t, .. }) => {
                    lock(&self.plan).put_back(idx);
                    return End::Bad(format!(
                        "served chunk {idx} of the wrong shape (blob size {t}, expected {total})"
                    ));
                }
                Ok(BlobResponse::NotFound) => {
                    lock(&self.plan).lacks(peer, idx);
                    continue;
                }
                Ok(BlobResponse::Refused(r)) => format!("refused: {r}"),
                Err(DataPlaneError::Malformed(e)) => {
                    lock(&self.plan).put_back(idx);
                    return End::Bad(e);
                }
                Err(e) => e.to_string(),
            };
            lock(&self.plan).put_back(idx);
            failures += 1;
            if self.health.failed() {
                return End::Gone(problem);
            }
            debug!(%peer, failures, %problem, "chunk request failed; retrying");
            tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(10)))).await;
        }
    }
}
