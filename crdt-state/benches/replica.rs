//! Benches of the replicated state: full-state merge, delta apply rate and encoded delta sizes.
//!
//! Fixture: a mesh of 1,000 nodes and 10,000 tasks (signed spec, lease, one or two statuses),
//! built by applying deltas with contiguous stamps per origin, as a real replica would get them.
//!
//! Goals: merge of two full states ≤ 10 ms; ≥ 200,000 deltas/s through `Replica::handle`;
//! ≤ 1 KB on the wire per change.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput};
use ed25519_dalek::SigningKey;
use omesh_protocol::{
    encode, Capacity, Delta, DeltaBody, Digest, Epoch, ExecutorKind, GossipMessage, Lease,
    LoadSample, Millis, NodeId, NodeRecord, SignedTaskSpec, StatusEntry, SyncReply, TaskId,
    TaskSpec, TaskState,
};
use omesh_state::{Crdt, Input, NodeKey, Replica, ReplicaConfig, State};

const NODES: usize = 1_000;
const TASKS: usize = 10_000;
const INCARNATION: u64 = 1;
/// Deltas per gossip message, as the replica batches them.
const PER_MESSAGE: usize = 64;
/// Deltas per timed round of the apply benches.
const ROUND: usize = 1_000;
/// Distinct images (and layer digests) in the mesh.
const IMAGES: usize = 50;

fn node_key(i: usize) -> NodeKey {
    NodeKey::from_bytes(&Digest::of(format!("node-{i}").as_bytes()).0)
}

fn node_id(i: usize) -> NodeId {
    node_key(i).id()
}

fn layer(k: usize) -> Digest {
    Digest::of(format!("layer-{}", k % IMAGES).as_bytes())
}

/// A node record as a real heartbeat carries it: 3 addrs, 3 tags, 8 RTT entries, 10 images.
fn node_record(ids: &[NodeId], i: usize) -> NodeRecord {
    let mut rec = NodeRecord::new(
        ids[i],
        INCARNATION,
        Capacity {
            cpu_millis: 4_000,
            memory_bytes: 8 << 30,
        },
    );
    rec.addrs = vec![
        format!("/ip4/10.{}.{}.1/udp/4001/quic-v1", i / 256, i % 256),
        format!("/ip4/192.168.{}.{}/udp/4001/quic-v1", i / 256, i % 256),
        format!("/ip6/fd00::{i:x}/udp/4001/quic-v1"),
    ];
    rec.tags = BTreeSet::from([
        format!("zone=eu-west-{}", i % 3),
        "arch=amd64".to_owned(),
        format!("rack=r{}", i % 40),
    ]);
    rec.images = (0..10).map(|k| layer(i + k * 5)).collect();
    rec.rtt_ms = (1..=8)
        .map(|k| (ids[(i + k * 13) % ids.len()], (3 * k + i % 7) as u32))
        .collect();
    rec.load = LoadSample {
        cpu_permille: (i * 37 % 900) as u16,
        mem_permille: (i * 53 % 900) as u16,
    };
    rec
}

fn spec(key: &SigningKey, j: usize) -> SignedTaskSpec {
    TaskSpec {
        image: format!("app@sha256:{}", layer(j)),
        command: vec![
            "/usr/local/bin/app".to_owned(),
            "--job".to_owned(),
            j.to_string(),
        ],
        env: BTreeMap::from([
            ("RUST_LOG".to_owned(), "info".to_owned()),
            ("JOB_ID".to_owned(), j.to_string()),
        ]),
        cpu_millis: 500,
        memory_bytes: 256 << 20,
        required_tags: if j.is_multiple_of(4) {
            BTreeSet::from(["arch=amd64".to_owned()])
        } else {
            BTreeSet::new()
        },
        priority: (j % 3) as i32,
        max_attempts: 3,
        timeout_ms: 600_000,
        executor: ExecutorKind::Docker,
        nonce: j as u64,
        submitter: [0; 32],
        disconnect: Default::default(),
    }
    .sign(key)
}

#[derive(Debug, Clone, Copy)]
struct TaskFix {
    id: TaskId,
    epoch: Epoch,
    owner: usize,
}

/// Writes the deltas of a simulated mesh, keeping every origin's stamps contiguous.
#[derive(Debug, Clone)]
struct Mesh {
    key: SigningKey,
    keys: Vec<NodeKey>,
    ids: Vec<NodeId>,
    records: Vec<NodeRecord>,
    counters: Vec<u64>,
    tasks: Vec<TaskFix>,
    clock: u64,
}

impl Mesh {
    fn new() -> Self {
        let keys: Vec<NodeKey> = (0..NODES).map(node_key).collect();
        let ids: Vec<NodeId> = keys.iter().map(NodeKey::id).collect();
        let records = (0..NODES).map(|i| node_record(&ids, i)).collect();
        Self {
            key: SigningKey::from_bytes(&[7; 32]),
            keys,
            ids,
            records,
            counters: vec![0; NODES],
            tasks: Vec::new(),
            clock: 1_000,
        }
    }

    fn submitter(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    fn delta(&mut self, origin: usize, body: DeltaBody) -> Delta {
        self.counters[origin] += 1;
        let stamp = (INCARNATION << 32) | self.counters[origin];
        Delta::signed(self.keys[origin].signing(), stamp, body)
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The next heartbeat of node `i`: seq advances, the load moves.
    fn heartbeat(&mut self, i: usize) -> Delta {
        let rec = &mut self.records[i];
        rec.seq += 1;
        rec.load.cpu_permille = ((u64::from(rec.load.cpu_permille) + 7) % 900) as u16;
        let body = DeltaBody::Node(std::sync::Arc::new(rec.clone()));
        self.delta(i, body)
    }

    fn lease(&mut self, j: usize) -> Delta {
        let t = self.tasks[j];
        let lease = Lease {
            epoch: t.epoch,
            owner: self.ids[t.owner],
            incarnation: INCARNATION,
            score: 500 + (t.owner % 400) as u32,
            ttl_ms: 2_000,
            released: false,
        };
        self.delta(t.owner, DeltaBody::Lease { task: t.id, lease })
    }

    fn status(&mut self, j: usize, state: TaskState, exit_code: Option<i32>) -> Delta {
        let t = self.tasks[j];
        let at_ms = self.tick();
        let entry = StatusEntry::new(state, exit_code, "", at_ms, self.ids[t.owner]);
        self.delta(
            t.owner,
            DeltaBody::Status {
                task: t.id,
                epoch: t.epoch,
                entry,
            },
        )
    }

    /// Moves task `j` to the next epoch on another node: a failover.
    fn fail_over(&mut self, j: usize) {
        let t = &mut self.tasks[j];
        t.epoch += 1;
        t.owner = (t.owner + 1 + j % 97) % NODES;
    }

    /// Everything the mesh said up to now: one heartbeat per node, then every task with its
    /// spec, lease and statuses. Every fifth task failed once and runs in epoch 2 elsewhere.
    fn base(&mut self) -> Vec<Delta> {
        let mut out: Vec<Delta> = (0..NODES).map(|i| self.heartbeat(i)).collect();
        for j in 0..TASKS {
            let signed = spec(&self.key, j);
            self.tasks.push(TaskFix {
                id: signed.id(),
                epoch: 1,
                owner: j * 31 % NODES,
            });
            out.push(self.delta(j * 7 % NODES, DeltaBody::Spec(signed)));
            if j.is_multiple_of(5) {
                out.push(self.lease(j));
                out.push(self.status(j, TaskState::Failed, Some(1)));
                self.fail_over(j);
            }
            out.push(self.lease(j));
            out.push(self.status(j, TaskState::Running, None));
        }
        out
    }

    /// What a better-informed peer has on top of [`Mesh::base`]: a newer heartbeat from every
    /// node, and for half the tasks a newer status (a quarter succeeded, a quarter failed over
    /// to a new lease epoch and runs there).
    fn newer(&mut self) -> Vec<Delta> {
        let mut out = self.heartbeat_round();
        for j in (0..TASKS).step_by(2) {
            if j.is_multiple_of(4) {
                self.fail_over(j);
                out.push(self.lease(j));
                out.push(self.status(j, TaskState::Running, None));
            } else {
                out.push(self.status(j, TaskState::Succeeded, Some(0)));
            }
        }
        out
    }

    /// One heartbeat from every node.
    fn heartbeat_round(&mut self) -> Vec<Delta> {
        (0..NODES).map(|i| self.heartbeat(i)).collect()
    }

    /// `ROUND` status reports (a newer Running report of the current epoch), from task `first`.
    fn status_round(&mut self, first: usize) -> Vec<Delta> {
        (first..first + ROUND)
            .map(|j| self.status(j % TASKS, TaskState::Running, None))
            .collect()
    }
}

fn messages(deltas: Vec<Delta>) -> Vec<GossipMessage> {
    let mut out = Vec::with_capacity(deltas.len().div_ceil(PER_MESSAGE));
    let mut it = deltas.into_iter().peekable();
    while it.peek().is_some() {
        out.push(GossipMessage {
            deltas: it.by_ref().take(PER_MESSAGE).collect(),
        });
    }
    out
}

fn apply_all(state: &mut State, deltas: &[Delta]) {
    for d in deltas {
        state.apply(d).unwrap();
    }
}

struct MergeFixture {
    a: State,
    b: State,
}

/// Two overlapping full states: B = A plus newer heartbeats and newer task parts.
fn merge_fixture() -> &'static MergeFixture {
    static FIXTURE: OnceLock<MergeFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut mesh = Mesh::new();
        let mut a = State::default();
        apply_all(&mut a, &mesh.base());
        let mut b = a.clone();
        apply_all(&mut b, &mesh.newer());
        assert_eq!((a.node_count(), a.task_count()), (NODES, TASKS));
        assert_ne!(a.digest(), b.digest());
        // B holds everything A does and more, so A ⊔ B = B and B ⊔ A = B.
        let mut ab = a.clone();
        ab.merge(&b);
        assert_eq!(ab.digest(), b.digest());
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ba.digest(), b.digest());
        MergeFixture { a, b }
    })
}

fn bench_merge(c: &mut Criterion) {
    let f = merge_fixture();
    let mut g = c.benchmark_group("merge_1k_nodes_10k_tasks");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sampling_mode(SamplingMode::Flat);
    // A ⊔ B: `a.clone().merge(&b)`, the clone in setup. Nodes and half the tasks change.
    g.bench_function("older_join_newer", |bch| {
        bch.iter_batched(
            || f.a.clone(),
            |mut s| {
                s.merge(black_box(&f.b));
                s
            },
            BatchSize::LargeInput,
        );
    });
    // B ⊔ A: nothing changes, every component is compared.
    g.bench_function("newer_join_older", |bch| {
        bch.iter_batched(
            || f.b.clone(),
            |mut s| {
                s.merge(black_box(&f.a));
                s
            },
            BatchSize::LargeInput,
        );
    });
    // ∅ ⊔ B: a joining node adopting a peer's whole state.
    g.bench_function("cold_join", |bch| {
        bch.iter_batched(
            State::default,
            |mut s| {
                s.merge(black_box(&f.b));
                s
            },
            BatchSize::LargeInput,
        );
    });
    // What the untimed setup costs: a clone of A.
    g.bench_function("clone_for_reference", |bch| {
        bch.iter(|| black_box(&f.a).clone());
    });
    g.finish();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A newer heartbeat from every node.
    Heartbeat,
    /// A newer status report for 1,000 tasks.
    Status,
    /// Heartbeats already merged, delivered again: gossip fan-out makes this the common case.
    HeartbeatDuplicate,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Heartbeat => "heartbeat",
            Self::Status => "status",
            Self::HeartbeatDuplicate => "heartbeat_duplicate",
        }
    }

    fn duplicate(self) -> bool {
        self == Self::HeartbeatDuplicate
    }
}

/// A mesh and its history, shared by the apply benches; each bench continues from a clone.
fn apply_fixture() -> &'static (Mesh, Vec<Delta>) {
    static FIXTURE: OnceLock<(Mesh, Vec<Delta>)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut mesh = Mesh::new();
        let base = mesh.base();
        (mesh, base)
    })
}

fn observer() -> NodeId {
    node_id(NODES + 1)
}

/// A replica that joined the mesh and synced the whole history from a peer.
fn loaded_replica(mesh: &Mesh, base: &[Delta]) -> Replica {
    let mut cfg = ReplicaConfig::for_node(observer());
    cfg.authorized_submitters.insert(mesh.submitter());
    let mut r = Replica::new(cfg, node_key(NODES + 1)).unwrap();
    let mut peer = State::default();
    apply_all(&mut peer, base);
    let vclock = mesh
        .ids
        .iter()
        .zip(&mesh.counters)
        .map(|(id, c)| (*id, (INCARNATION << 32) | c))
        .collect();
    let reply = SyncReply {
        deltas: base.to_vec(),
        vclock,
        digest: peer.digest(),
        truncated: false,
    };
    r.handle(
        0,
        Input::SyncReply {
            from: mesh.ids[0],
            reply,
        },
    )
    .unwrap();
    while r.poll_action().is_some() {}
    let st = r.stats();
    assert_eq!((st.rejections.total(), st.digest_mismatches), (0, 0));
    // `track_stamp` takes an unseen origin's first stamp, `(incarnation << 32) | 1`, for a gap
    // (it expects `0 + 1`); the sync reply's vector closes them. At most one per origin.
    assert!(st.gaps <= NODES as u64, "{st:?}");
    assert_eq!(r.version_vector().len(), NODES + 1);
    assert_eq!(st.deltas_applied, base.len() as u64);
    r
}

fn round(mesh: &mut Mesh, kind: Kind, n: usize) -> Vec<Delta> {
    match kind {
        Kind::Heartbeat | Kind::HeartbeatDuplicate => mesh.heartbeat_round(),
        Kind::Status => mesh.status_round(n * ROUND),
    }
}

fn bench_apply(c: &mut Criterion) {
    let (mesh0, base) = apply_fixture();
    let mut g = c.benchmark_group("apply");
    g.sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(ROUND as u64));

    for kind in [Kind::Heartbeat, Kind::Status, Kind::HeartbeatDuplicate] {
        // Through the replica: gossip messages of 64 deltas, as peers publish them.
        let mut mesh = mesh0.clone();
        let mut replica = loaded_replica(&mesh, base);
        let mut n = 0usize;
        let mut now: Millis = 0;
        let before = replica.stats();
        g.bench_function(BenchmarkId::new("replica_gossip", kind.name()), |bch| {
            bch.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let deltas = round(&mut mesh, kind, n);
                    n += 1;
                    now += 500;
                    let from = mesh.ids[n % NODES];
                    if kind.duplicate() {
                        for msg in messages(deltas.clone()) {
                            replica
                                .handle(now, Input::Gossip { via: from, msg })
                                .unwrap();
                        }
                    }
                    let msgs = messages(deltas);
                    let t = Instant::now();
                    for msg in msgs {
                        replica
                            .handle(now, Input::Gossip { via: from, msg })
                            .unwrap();
                        while replica.poll_action().is_some() {}
                    }
                    spent += t.elapsed();
                    // The driver exports these as metrics, about once per tick.
                    black_box(replica.take_propagation_samples());
                }
                spent
            });
        });
        let st = replica.stats();
        // (Nothing ran when a filter left this bench out.)
        if st.deltas_applied > before.deltas_applied {
            assert_eq!(st.rejections.total(), 0);
            assert_eq!(st.gaps, before.gaps, "contiguous stamps opened a gap");
            let dups = st.deltas_unchanged - before.deltas_unchanged;
            assert_eq!(dups == 0, !kind.duplicate(), "{dups} unchanged");
            assert_eq!(replica.state().node_count(), NODES + 1);
        }

        // The CRDT alone.
        let mut mesh = mesh0.clone();
        let mut state = State::default();
        apply_all(&mut state, base);
        let mut n = 0usize;
        g.bench_function(BenchmarkId::new("state_apply", kind.name()), |bch| {
            bch.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let deltas = round(&mut mesh, kind, n);
                    n += 1;
                    if kind.duplicate() {
                        apply_all(&mut state, &deltas);
                    }
                    let t = Instant::now();
                    for d in &deltas {
                        black_box(state.apply(d).unwrap());
                    }
                    spent += t.elapsed();
                }
                spent
            });
        });
    }
    g.finish();
}

/// Bytes on the wire: `encode` of a gossip message carrying one delta.
fn print_sizes() {
    let mut mesh = Mesh::new();
    mesh.tasks.push(TaskFix {
        id: spec(&mesh.key, 0).id(),
        epoch: 1,
        owner: 3,
    });
    let one = |d: Delta| encode(&GossipMessage { deltas: vec![d] }).unwrap().len();
    let heartbeat = mesh.heartbeat(0);
    // The worst status: a failure with the longest error text kept.
    let error = "x".repeat(omesh_protocol::task::MAX_ERROR_CHARS);
    let entry = StatusEntry::new(TaskState::Failed, Some(137), &error, 1_000, mesh.ids[3]);
    let task = mesh.tasks[0].id;
    let failed = mesh.delta(
        3,
        DeltaBody::Status {
            task,
            epoch: 1,
            entry,
        },
    );
    let sizes = [
        ("heartbeat (node record)", one(heartbeat)),
        (
            "task status (running)",
            one(mesh.status(0, TaskState::Running, None)),
        ),
        ("task status (max error)", one(failed)),
        ("lease", one(mesh.lease(0))),
        (
            "spec (signed)",
            one(mesh.delta(0, DeltaBody::Spec(spec(&mesh.key, 0)))),
        ),
    ];
    println!("encoded size of a GossipMessage with one delta (goal <= 1024 bytes):");
    for (what, len) in sizes {
        let verdict = if len <= 1024 { "ok" } else { "OVER GOAL" };
        println!("  {what:<26} {len:>5} bytes  {verdict}");
    }
    let full = encode(&GossipMessage {
        deltas: mesh.heartbeat_round()[..PER_MESSAGE].to_vec(),
    })
    .unwrap()
    .len();
    println!(
        "  {PER_MESSAGE} heartbeats in one message: {full} bytes ({} per delta)",
        full / PER_MESSAGE
    );
}

/// The cost of signing every delta a node writes, and of checking every delta that comes in:
/// a heartbeat (the commonest delta) and a running status.
fn bench_signature(c: &mut Criterion) {
    let mut mesh = apply_fixture().0.clone();
    let mut g = c.benchmark_group("signature");
    g.sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    let heartbeat = mesh.heartbeat(0);
    let status = mesh.status(0, TaskState::Running, None);
    for (what, d) in [("heartbeat", heartbeat), ("status", status)] {
        let Some(key) = mesh.keys.iter().find(|k| k.id() == d.origin).cloned() else {
            continue;
        };
        g.bench_function(BenchmarkId::new("sign", what), |b| {
            b.iter(|| Delta::signed(key.signing(), d.stamp, d.body.clone()));
        });
        g.bench_function(BenchmarkId::new("verify", what), |b| {
            b.iter(|| assert!(d.signature_holds()));
        });
    }
    g.finish();
}

criterion::criterion_group!(benches, bench_merge, bench_apply, bench_signature);

fn main() {
    print_sizes();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
