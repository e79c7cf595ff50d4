//! Replica configuration: one struct, public fields, documented defaults, `validate()` once.

use std::collections::BTreeSet;

use omesh_protocol::{Capacity, Millis, NodeId};
use serde::{Deserialize, Serialize};

/// Everything a replica needs to decide, with the defaults documented on each field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaConfig {
    /// This node's id (its ed25519 public key).
    pub node_id: NodeId,
    /// Restart counter from the data directory; a restart is the same node with a higher one.
    pub incarnation: u64,
    /// What this node offers to tasks.
    pub capacity: Capacity,
    /// Operator tags of this node.
    pub tags: BTreeSet<String>,
    /// Keys allowed to submit tasks (ed25519 public keys). Empty: nobody may.
    pub authorized_submitters: BTreeSet<[u8; 32]>,
    /// The mesh's admission keys (ed25519 public keys). When set, a write is taken only from
    /// a node whose record carries a certificate signed by one of them, and that is not
    /// revoked. Empty: an open mesh, where any node that can connect is a member.
    pub admission_keys: BTreeSet<[u8; 32]>,
    /// This node's admission certificate, carried in its record.
    pub cert: Option<omesh_protocol::AdmissionCert>,
    /// Probe period: each node pings one peer per period (SWIM), and publishes a changed node
    /// record at most this often. A crashed node is first probed within a few periods (each
    /// period it escapes every prober with chance ~1/e), so this sets detection time; a
    /// period costs each node about four probe messages of ~20 bytes. Default 500 ms.
    pub heartbeat_ms: Millis,
    /// A suspected owner's leases hold this long past the suspicion reaching a replica, so a
    /// falsely suspected node has time to refute it (one gossip round trip). At least one
    /// probe period. Default 1,000 ms.
    pub lease_ttl_ms: Millis,
    /// Extra wait before a lease counts as lost, floor of the RTT-adaptive grace. Default 1,000 ms.
    pub lease_grace_ms: Millis,
    /// How long a ping waits for its ack before asking other peers to ping the target
    /// (floor of the RTT-adaptive timeout; below `heartbeat_ms`). Default 200 ms.
    pub probe_timeout_ms: Millis,
    /// How many peers are asked to ping an unanswering target. Default 3.
    pub indirect_probes: u8,
    /// A load sample moving this far (thousandths) from the one last published republishes
    /// the node record, paced to one such drift per second per known node, at most 15 s
    /// apart (`record.rs`); crossing a threshold republishes it within a period. Default 50
    /// (5 points).
    pub load_delta_permille: u16,
    /// Floor of the delay between claiming and starting (about one gossip round trip). Default 150 ms.
    pub settle_ms: Millis,
    /// Delay per rank position before a lower-ranked node claims a task the best one left alone. Default 400 ms.
    pub claim_stagger_ms: Millis,
    /// Period of digest-driven anti-entropy with one random peer. Default 2,000 ms.
    pub anti_entropy_ms: Millis,
    /// How long a gap in a peer's stamps may stay open before a sync is asked for. Default 200 ms.
    pub gap_sync_ms: Millis,
    /// First retry backoff; doubles per failed attempt, with ±20% jitter. Default 1,000 ms.
    pub retry_base_ms: Millis,
    /// Longest retry backoff. Default 60,000 ms.
    pub retry_max_ms: Millis,
    /// Terminal tasks are compacted to tombstones after this long. Default 10 minutes.
    pub retention_ms: Millis,
    /// Whether a loaded node stops claiming and hands back queued tasks. Off, the node never
    /// declares itself overloaded: it keeps claiming, and peers keep placing work on it, by
    /// score alone. Default true.
    pub enable_offload: bool,
    /// CPU utilisation (percent) above which a node takes no new work. Default 75.
    pub threshold_cpu: u8,
    /// Memory utilisation (percent) above which a node takes no new work. Default 80.
    pub threshold_memory: u8,
    /// Hysteresis, in percentage points: a node over a threshold counts as overloaded until
    /// its CPU and memory are both at or below their thresholds less this. Default 10.
    pub threshold_margin: u8,
    /// When offloading, prefer peers carrying one of these tags. Default empty (any peer).
    pub target_node_tags: BTreeSet<String>,
    /// Seed of the replica's random choices (anti-entropy peer, jitter).
    pub seed: u64,
    /// The most propagation samples kept between two `take_propagation_samples` calls (the
    /// node's metrics take them; 0 keeps none, for a driver that measures spread itself).
    pub propagation_samples: usize,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            node_id: NodeId::default(),
            incarnation: 1,
            capacity: Capacity {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
            },
            tags: BTreeSet::new(),
            authorized_submitters: BTreeSet::new(),
            admission_keys: BTreeSet::new(),
            cert: None,
            heartbeat_ms: 500,
            lease_ttl_ms: 1_000,
            lease_grace_ms: 1_000,
            probe_timeout_ms: 200,
            indirect_probes: 3,
            load_delta_permille: 50,
            settle_ms: 150,
            claim_stagger_ms: 400,
            anti_entropy_ms: 2_000,
            gap_sync_ms: 200,
            retry_base_ms: 1_000,
            retry_max_ms: 60_000,
            retention_ms: 10 * 60 * 1_000,
            enable_offload: true,
            threshold_cpu: 75,
            threshold_memory: 80,
            threshold_margin: 10,
            target_node_tags: BTreeSet::new(),
            seed: 0,
            propagation_samples: 4096,
        }
    }
}

/// A configuration value that cannot work, naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config key `{key}`: {reason}")]
pub struct ConfigError {
    /// The key.
    pub key: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn bad(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key,
        reason: reason.into(),
    }
}

impl ReplicaConfig {
    /// A config for `node_id` with every other value at its default.
    pub fn for_node(node_id: NodeId) -> Self {
        Self {
            node_id,
            ..Self::default()
        }
    }

    /// A preset for a mesh of `nodes` across a WAN, foca-style (`new_wan(n)`).
    ///
    /// Probing costs each node the same whatever the mesh size; what grows is the time for
    /// a suspicion to spread (log N gossip hops of up to a WAN RTT) and the size of a sync
    /// request (the version vector, one entry per node), so leases get longer and
    /// anti-entropy rarer as the mesh grows (N / 10 ms, 2 s at least).
    pub fn wan(nodes: usize) -> Self {
        let n = u64::try_from(nodes).unwrap_or(u64::MAX);
        Self {
            heartbeat_ms: 1_000,
            lease_ttl_ms: 3_000,
            lease_grace_ms: 2_000,
            probe_timeout_ms: 500,
            settle_ms: 300,
            claim_stagger_ms: 800,
            anti_entropy_ms: (n / 10).clamp(2_000, 60_000),
            gap_sync_ms: 500,
            ..Self::default()
        }
    }

    /// Checks every value once, at start-up.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.admission_keys.is_empty() {
            let Some(cert) = &self.cert else {
                return Err(bad(
                    "admission_cert",
                    "admission_keys are set but this node has no admission certificate (omesh admit)",
                ));
            };
            cert.verify_at_any_time(&self.node_id, &self.admission_keys)
                .map_err(|e| bad("admission_cert", e.to_string()))?;
        }
        if self.heartbeat_ms == 0 {
            return Err(bad("heartbeat_ms", "must be above 0"));
        }
        if self.lease_ttl_ms < self.heartbeat_ms {
            return Err(bad(
                "lease_ttl_ms",
                format!(
                    "must be at least one probe period (heartbeat_ms, {} ms), got {}",
                    self.heartbeat_ms, self.lease_ttl_ms
                ),
            ));
        }
        if self.lease_ttl_ms > u64::from(u32::MAX) {
            return Err(bad("lease_ttl_ms", "must fit in 32 bits of milliseconds"));
        }
        if self.probe_timeout_ms == 0 || self.probe_timeout_ms >= self.heartbeat_ms {
            return Err(bad(
                "probe_timeout_ms",
                format!(
                    "must be above 0 and below heartbeat_ms ({}), got {}",
                    self.heartbeat_ms, self.probe_timeout_ms
                ),
            ));
        }
        if self.anti_entropy_ms == 0 {
            return Err(bad("anti_entropy_ms", "must be above 0"));
        }
        if self.retry_base_ms == 0 || self.retry_base_ms > self.retry_max_ms {
            return Err(bad(
                "retry_base_ms",
                "must be above 0 and at most retry_max_ms",
            ));
        }
        if self.threshold_cpu == 0 || self.threshold_cpu > 100 {
            return Err(bad(
                "threshold_cpu",
                format!("must be 1..=100, got {}", self.threshold_cpu),
            ));
        }
        if self.threshold_memory == 0 || self.threshold_memory > 100 {
            return Err(bad(
                "threshold_memory",
                format!("must be 1..=100, got {}", self.threshold_memory),
            ));
        }
        if self.threshold_margin > 100 {
            return Err(bad(
                "threshold_margin",
                format!("must be 0..=100, got {}", self.threshold_margin),
            ));
        }
        if self.capacity.cpu_millis == 0 {
            return Err(bad("capacity.cpu_millis", "must be above 0"));
        }
        Ok(())
    }
}
