//! Prometheus metrics (prometheus-client), named `omesh_*`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use omesh_state::Stats;

/// Which channel a malformed message came on.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabel {
    /// `gossip`, `sync_request`, `sync_reply` or `probe`.
    pub channel: String,
}

/// Why a delta (`omesh_state::REJECTION_REASONS`) or a connection
/// (`admission::REFUSAL_REASONS`) was refused.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The rule broken, e.g. `bad_signature`, `status_not_epoch_owner`, `not_admitted`.
    pub reason: String,
}

/// How an at-most-once claim's confirmation ended: `confirmed` or `refused`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `confirmed` or `refused`.
    pub result: &'static str,
}

/// Which way this node's overload verdict went: `enter` or `leave`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `enter` (clear to overloaded) or `leave`.
    pub direction: &'static str,
}

/// A task state label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// Lowercase state name.
    pub state: String,
}

/// Every metric of a peer.
#[derive(Debug)]
pub struct Metrics {
    /// The registry to encode.
    pub registry: Registry,
    /// Peers with a record.
    pub peers_known: Gauge,
    /// Peers judged alive.
    pub peers_alive: Gauge,
    /// Peers with an open connection.
    pub peers_connected: Gauge,
    /// Time from a node record's write to its merge here (includes clock offset between hosts).
    pub delta_propagation: Histogram,
    /// When this node's leases were renewed (a round trip completed), how long its guards
    /// still had until their deadline (margin taken off): how close the node came to having
    /// its instances ended for want of an answer. A starved or cut-off node shows low values.
    pub lease_headroom: Histogram,
    /// Sync exchanges completed.
    pub sync_success: Counter,
    /// Sync exchanges failed.
    pub sync_failure: Counter,
    /// Syncs after which digests still differed with equal version vectors.
    pub digest_mismatches: Counter,
    /// Messages dropped because they did not decode.
    pub malformed: Family<ChannelLabel, Counter>,
    /// Deltas merged.
    pub deltas_applied: Counter,
    /// Deltas refused, by the rule they broke.
    pub deltas_rejected: Family<ReasonLabel, Counter>,
    /// Probe acks refused: an unknown nonce, or from neither the probed node nor a helper.
    pub probe_acks_refused: Counter,
    /// Sync-reply version vector entries not adopted (unknown origin or stamp too high).
    pub vector_entries_refused: Counter,
    /// Suspicions this node raised (a probe answered neither directly nor through helpers).
    pub suspicions: Counter,
    /// Suspicions of this node it refuted (a new record version).
    pub refutations: Counter,
    /// Times this node published its own record (start, load moves, refutations, images).
    pub records_published: Counter,
    /// Leases changed by merge.
    pub lease_changes: Counter,
    /// Claims by this node.
    pub claims: Counter,
    /// Claims that took a task over from a lost owner.
    pub failovers: Counter,
    /// Local instances fenced by a higher epoch.
    pub fenced: Counter,
    /// Local instances killed by their guard at the deadline (this node cut off or stalled).
    pub guard_expiries: Counter,
    /// Instances left by an earlier incarnation that this one took over.
    pub adopted: Counter,
    /// Polls sent about an unreachable owner of at-most-once tasks.
    pub quorum_polls: Counter,
    /// At-most-once claims a majority confirmed, and ones handed back unconfirmed.
    pub quorum_confirms: Family<ResultLabel, Counter>,
    /// Tasks known, by state.
    pub tasks: Family<StateLabel, Gauge>,
    /// This node's incarnation.
    pub incarnation: Gauge,
    /// Connections and first contacts refused, by reason.
    pub connections_refused: Family<ReasonLabel, Counter>,
    /// Changes of this node's overload verdict (hysteresis: `threshold_margin`), by direction.
    pub overload_transitions: Family<DirectionLabel, Counter>,
    last: Stats,
}

/// Buckets of `omesh_lease_headroom_seconds`, in seconds: fine where a node comes close to
/// its guards' deadline (at the defaults a healthy node renews with about 1.5 to 2 s left).
const HEADROOM_BUCKETS: [f64; 12] = [
    0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0,
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("omesh");
        let m = Self {
            registry: Registry::default(),
            peers_known: Gauge::default(),
            peers_alive: Gauge::default(),
            peers_connected: Gauge::default(),
            delta_propagation: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            lease_headroom: Histogram::new(HEADROOM_BUCKETS.iter().copied()),
            sync_success: Counter::default(),
            sync_failure: Counter::default(),
            digest_mismatches: Counter::default(),
            malformed: Family::default(),
            deltas_applied: Counter::default(),
            deltas_rejected: Family::default(),
            probe_acks_refused: Counter::default(),
            vector_entries_refused: Counter::default(),
            suspicions: Counter::default(),
            refutations: Counter::default(),
            records_published: Counter::default(),
            lease_changes: Counter::default(),
            claims: Counter::default(),
            failovers: Counter::default(),
            fenced: Counter::default(),
            guard_expiries: Counter::default(),
            adopted: Counter::default(),
            quorum_polls: Counter::default(),
            quorum_confirms: Family::default(),
            tasks: Family::default(),
            incarnation: Gauge::default(),
            connections_refused: Family::default(),
            overload_transitions: Family::default(),
            last: Stats::default(),
        };
        registry.register(
            "peers_known",
            "Peers with a node record",
            m.peers_known.clone(),
        );
        registry.register("peers_alive", "Peers judged alive", m.peers_alive.clone());
        registry.register(
            "peers_connected",
            "Peers with an open connection",
            m.peers_connected.clone(),
        );
        registry.register(
            "delta_propagation_seconds",
            "Time from a node record's write to its merge here (includes clock offset)",
            m.delta_propagation.clone(),
        );
        registry.register(
            "lease_headroom_seconds",
            "Time the guards had left before their deadline when this node's leases were renewed",
            m.lease_headroom.clone(),
        );
        registry.register(
            "sync_success",
            "Anti-entropy exchanges completed",
            m.sync_success.clone(),
        );
        registry.register(
            "sync_failure",
            "Anti-entropy exchanges failed",
            m.sync_failure.clone(),
        );
        registry.register(
            "state_digest_mismatches",
            "Syncs after which digests differed with equal version vectors",
            m.digest_mismatches.clone(),
        );
        registry.register(
            "messages_malformed",
            "Messages dropped because they did not decode",
            m.malformed.clone(),
        );
        registry.register("deltas_applied", "Deltas merged", m.deltas_applied.clone());
        registry.register(
            "deltas_rejected",
            "Deltas refused, by the rule they broke",
            m.deltas_rejected.clone(),
        );
        registry.register(
            "probe_acks_refused",
            "Probe acks refused: unknown nonce, or from neither the probed node nor a helper asked",
            m.probe_acks_refused.clone(),
        );
        registry.register(
            "vector_entries_refused",
            "Entries of sync replies' version vectors not adopted (origin unknown, or stamp past its incarnation)",
            m.vector_entries_refused.clone(),
        );
        registry.register(
            "suspicions",
            "Suspicions this node raised: a peer answered a probe neither directly nor through helpers",
            m.suspicions.clone(),
        );
        registry.register(
            "refutations",
            "Suspicions of this node that it refuted with a new record version",
            m.refutations.clone(),
        );
        registry.register(
            "records_published",
            "Times this node published its own record (start, load moves, refutations, images)",
            m.records_published.clone(),
        );
        registry.register(
            "lease_changes",
            "Leases changed by merge",
            m.lease_changes.clone(),
        );
        registry.register("claims", "Task claims by this node", m.claims.clone());
        registry.register(
            "failovers",
            "Claims that took over from a lost owner",
            m.failovers.clone(),
        );
        registry.register(
            "fenced",
            "Local instances stopped by a higher epoch",
            m.fenced.clone(),
        );
        registry.register(
            "guard_expiries",
            "Local instances killed by their guard at the deadline (this node cut off or stalled)",
            m.guard_expiries.clone(),
        );
        registry.register(
            "instances_adopted",
            "Instances left running by an earlier incarnation that this one took over",
            m.adopted.clone(),
        );
        registry.register(
            "quorum_polls",
            "Polls of the members about an unreachable owner of at-most-once tasks",
            m.quorum_polls.clone(),
        );
        registry.register(
            "quorum_confirms",
            "At-most-once claims confirmed by a majority (result=confirmed) or handed back (result=refused)",
            m.quorum_confirms.clone(),
        );
        registry.register("tasks", "Tasks known here, by state", m.tasks.clone());
        registry.register(
            "incarnation",
            "This node's incarnation",
            m.incarnation.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections and first contacts refused: peer not admitted or not allowed, by reason",
            m.connections_refused.clone(),
        );
        registry.register(
            "overload_transitions",
            "Changes of this node's overload verdict (above a threshold, left only below it less threshold_margin), by direction",
            m.overload_transitions.clone(),
        );
        for direction in ["enter", "leave"] {
            let _ = m
                .overload_transitions
                .get_or_create(&DirectionLabel { direction });
        }
        for reason in crate::admission::REFUSAL_REASONS {
            let _ = m.connections_refused.get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            });
        }
        // Likewise every rejection reason: the dashboard's "deltas rejected" panel shows 0 on a
        // healthy mesh instead of "no data", and rate() sees a reason's first rejection.
        for reason in omesh_state::REJECTION_REASONS {
            let _ = m.deltas_rejected.get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            });
        }
        // Every channel has a series from the start, so dashboards and alerts see 0, not nothing.
        for channel in [
            "gossip",
            "gossip_forged_origin",
            "sync_request",
            "sync_reply",
        ] {
            let _ = m.malformed.get_or_create(&ChannelLabel {
                channel: channel.to_owned(),
            });
        }
        Self { registry, ..m }
    }

    /// Counts a malformed message on `channel`.
    pub fn malformed(&self, channel: &str) {
        self.malformed
            .get_or_create(&ChannelLabel {
                channel: channel.to_owned(),
            })
            .inc();
    }

    /// Counts a refused connection or first contact.
    pub fn refused(&self, reason: &str) {
        self.connections_refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Mirrors the replica's counters.
    pub fn update(&mut self, s: Stats) {
        let d = |new: u64, old: u64| new.saturating_sub(old);
        let l = self.last;
        self.sync_success
            .inc_by(d(s.syncs_completed, l.syncs_completed));
        self.sync_failure.inc_by(d(s.syncs_failed, l.syncs_failed));
        self.digest_mismatches
            .inc_by(d(s.digest_mismatches, l.digest_mismatches));
        self.deltas_applied
            .inc_by(d(s.deltas_applied, l.deltas_applied));
        for ((reason, new), (_, old)) in s.rejections.iter().zip(l.rejections.iter()) {
            if new > old {
                self.deltas_rejected
                    .get_or_create(&ReasonLabel {
                        reason: reason.to_owned(),
                    })
                    .inc_by(new - old);
            }
        }
        self.probe_acks_refused
            .inc_by(d(s.probe_acks_refused, l.probe_acks_refused));
        self.vector_entries_refused
            .inc_by(d(s.vector_entries_refused, l.vector_entries_refused));
        self.suspicions.inc_by(d(s.suspicions, l.suspicions));
        self.refutations.inc_by(d(s.refutations, l.refutations));
        self.records_published
            .inc_by(d(s.records_published, l.records_published));
        self.lease_changes
            .inc_by(d(s.lease_changes, l.lease_changes));
        self.claims.inc_by(d(s.claims, l.claims));
        self.failovers.inc_by(d(s.failovers, l.failovers));
        self.fenced.inc_by(d(s.fenced, l.fenced));
        self.guard_expiries
            .inc_by(d(s.guard_expiries, l.guard_expiries));
        self.adopted.inc_by(d(s.adopted, l.adopted));
        self.quorum_polls.inc_by(d(s.polls, l.polls));
        self.quorum_confirms
            .get_or_create(&ResultLabel {
                result: "confirmed",
            })
            .inc_by(d(s.confirms, l.confirms));
        self.quorum_confirms
            .get_or_create(&ResultLabel { result: "refused" })
            .inc_by(d(s.confirms_refused, l.confirms_refused));
        self.overload_transitions
            .get_or_create(&DirectionLabel { direction: "enter" })
            .inc_by(d(s.overload_entered, l.overload_entered));
        self.overload_transitions
            .get_or_create(&DirectionLabel { direction: "leave" })
            .inc_by(d(s.overload_left, l.overload_left));
        self.last = s;
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The classic Prometheus text format (0.0.4), for scrapers and tools such as
    /// `promtool check metrics` that do not speak OpenMetrics: counters' HELP and TYPE lines
    /// carry the `_total` name of their samples, and there is no `# EOF`.
    pub fn encode_classic(&self) -> String {
        to_classic(&self.encode())
    }
}

/// Rewrites an OpenMetrics exposition into the classic text format.
pub fn to_classic(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Metrics of the blob data plane and store. Counters are shared handles: clones count
/// into the same series, so the server, fetcher and store hold their own clones.
#[derive(Debug, Clone, Default)]
pub struct BlobMetrics {
    /// Chunk bytes this node served to peers.
    pub bytes_served: Counter,
    /// Chunk bytes this node received from peers (verified or not, wasted or not).
    pub bytes_fetched: Counter,
    /// Blob connections refused: the peer is not a node of this mesh.
    pub refused: Counter,
    /// Blob requests that did not decode.
    pub malformed_requests: Counter,
    /// Holders dropped from a fetch for serving bytes that do not match the digest.
    pub bad_holders: Counter,
    /// Blobs fetched and verified.
    pub blobs_fetched: Counter,
    /// Fetches of a blob that failed.
    pub fetch_failures: Counter,
    /// Blobs evicted to stay under `blob_cap_bytes`.
    pub evicted: Counter,
    /// Bytes in the blob store.
    pub store_bytes: Gauge,
}

impl BlobMetrics {
    /// Registers every series in `registry` (prefixed `omesh_blob_`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("blob");
        r.register(
            "bytes_served",
            "Chunk bytes served to peers",
            self.bytes_served.clone(),
        );
        r.register(
            "bytes_fetched",
            "Chunk bytes received from peers",
            self.bytes_fetched.clone(),
        );
        r.register(
            "connections_refused",
            "Blob connections refused because the peer is not a node of this mesh",
            self.refused.clone(),
        );
        r.register(
            "requests_malformed",
            "Blob requests that did not decode",
            self.malformed_requests.clone(),
        );
        r.register(
            "bad_holders",
            "Holders dropped from a fetch for serving bytes that do not match the digest",
            self.bad_holders.clone(),
        );
        r.register(
            "fetched",
            "Blobs fetched from peers and verified",
            self.blobs_fetched.clone(),
        );
        r.register(
            "fetch_failures",
            "Blob fetches that failed",
            self.fetch_failures.clone(),
        );
        r.register(
            "evicted",
            "Blobs evicted to stay under blob_cap_bytes",
            self.evicted.clone(),
        );
        r.register(
            "store_bytes",
            "Bytes held in the blob store",
            self.store_bytes.clone(),
        );
    }
}

#[cfg(test)]
mod overload_tests {
    use super::*;

    #[test]
    fn overload_transitions_mirror_the_replica_counters() {
        let mut m = Metrics::new();
        let text = m.encode();
        assert!(text.contains("omesh_overload_transitions_total{direction=\"enter\"} 0"));
        m.update(Stats {
            overload_entered: 2,
            overload_left: 1,
            ..Stats::default()
        });
        m.update(Stats {
            overload_entered: 3,
            overload_left: 1,
            ..Stats::default()
        });
        let text = m.encode();
        assert!(
            text.contains("omesh_overload_transitions_total{direction=\"enter\"} 3"),
            "{text}"
        );
        assert!(text.contains("omesh_overload_transitions_total{direction=\"leave\"} 1"));
    }
}
