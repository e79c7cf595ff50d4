//! Node records: what each node says about itself, written only by that node.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::admission::AdmissionCert;
use crate::ids::{Digest, NodeId};

/// The most RTT entries a node record carries.
pub const MAX_RTT_ENTRIES: usize = 8;

/// What a node offers to run tasks with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capacity {
    /// CPU in thousandths of a core (2 cores = 2000).
    pub cpu_millis: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// A smoothed load sample of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoadSample {
    /// CPU utilisation in thousandths (750 = 75%).
    pub cpu_permille: u16,
    /// Memory utilisation in thousandths.
    pub mem_permille: u16,
}

/// A node's own record. Merged last-writer-wins on `(incarnation, seq)`; liveness is not in
/// here: every replica judges it from when it last saw `seq` advance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node.
    pub id: NodeId,
    /// Restart counter, kept in the node's data directory.
    pub incarnation: u64,
    /// Record counter within the incarnation: raised at each publication (a change, or a
    /// refutation of a suspicion).
    pub seq: u64,
    /// Addresses the node listens on (multiaddrs as text).
    pub addrs: Vec<String>,
    /// Operator tags, matched against a task's required tags.
    pub tags: BTreeSet<String>,
    /// What the node offers.
    pub capacity: Capacity,
    /// Its latest load sample.
    pub load: LoadSample,
    /// The node's own verdict that it is over a threshold, with hysteresis: set when a sample
    /// goes above `threshold_cpu` or `threshold_memory`, cleared only once both are below
    /// the threshold less `threshold_margin`. Carried here so that every replica agrees on
    /// it, whatever the samples it saw.
    pub overloaded: bool,
    /// Digests of the image blobs it holds.
    pub images: BTreeSet<Digest>,
    /// Smoothed RTT in milliseconds to its nearest peers (at most [`MAX_RTT_ENTRIES`]), so
    /// that every replica can weigh distance from a task's submitting node the same way.
    pub rtt_ms: Vec<(NodeId, u32)>,
    /// Set when the node announces a graceful leave: its leases lapse at once.
    pub leaving: bool,
    /// The writer's clock when it wrote this version, in ms (for propagation metrics only;
    /// nothing decides on it).
    pub written_at_ms: u64,
    /// The node's admission certificate, in a mesh with admission keys: every replica checks
    /// it before taking any write of this node.
    pub cert: Option<AdmissionCert>,
}

impl NodeRecord {
    /// A fresh record with no load, tags or images.
    pub fn new(id: NodeId, incarnation: u64, capacity: Capacity) -> Self {
        Self {
            id,
            incarnation,
            seq: 0,
            addrs: Vec::new(),
            tags: BTreeSet::new(),
            capacity,
            load: LoadSample::default(),
            overloaded: false,
            images: BTreeSet::new(),
            rtt_ms: Vec::new(),
            leaving: false,
            written_at_ms: 0,
            cert: None,
        }
    }

    /// The durable part of the record: what the state digest covers. Record counters,
    /// load, RTTs and write times change with every publication, so two
    /// replicas that agree on everything else count as converged.
    pub fn durable(
        &self,
    ) -> (
        NodeId,
        u64,
        &[String],
        &BTreeSet<String>,
        Capacity,
        &BTreeSet<Digest>,
        bool,
    ) {
        (
            self.id,
            self.incarnation,
            &self.addrs,
            &self.tags,
            self.capacity,
            &self.images,
            self.leaving,
        )
    }

    /// The last-writer-wins version of the record.
    pub fn version(&self) -> (u64, u64) {
        (self.incarnation, self.seq)
    }
}
