//! Scenarios as data: a TOML file names the mesh, its network, load, task arrivals, faults on
//! a timeline and the bounds the run is expected to stay within.

use std::path::Path;

use omesh_state::ReplicaConfig;
use serde::Deserialize;

pub use crate::faults::{DataDir, Fault, Target};

/// Why a scenario cannot run, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML did not parse into a scenario.
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    /// A value that cannot work.
    #[error("invalid scenario key `{key}`: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// Above zero (and not NaN).
fn positive(x: f64) -> bool {
    x > 0.0
}

fn bad(key: impl Into<String>, reason: impl Into<String>) -> ScenarioError {
    ScenarioError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// A whole scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, shown in reports.
    pub name: String,
    /// What the scenario shows.
    #[serde(default)]
    pub description: String,
    /// Nodes at start.
    pub nodes: u32,
    /// Simulated time, in seconds.
    pub duration_s: f64,
    /// Nodes boot at random times within this many seconds (a cold start of every node at
    /// the same instant makes each one fetch the full state from all its mesh peers at once).
    #[serde(default = "default_boot_spread")]
    pub boot_spread_s: f64,
    /// Start from a formed mesh: every node boots at time 0 already holding every node's
    /// record, as after a completed boot, so a large run measures the steady state rather
    /// than every node cold-starting at once (an N² burst). `boot_spread_s` is then unused.
    #[serde(default)]
    pub formed: bool,
    /// Replica timing preset: `lan` (the documented defaults) or `wan` (scaled to the mesh).
    #[serde(default)]
    pub preset: Preset,
    /// Replica settings that override the preset.
    #[serde(default)]
    pub replica: ReplicaOverrides,
    /// Links.
    #[serde(default)]
    pub network: NetworkSpec,
    /// The gossip overlay.
    #[serde(default)]
    pub gossip: GossipSpec,
    /// Clocks.
    #[serde(default)]
    pub clock: ClockSpec,
    /// Node groups (tags, capacity, base load); nodes not in a group are `default`.
    #[serde(default)]
    pub groups: Vec<GroupSpec>,
    /// Load changes on the timeline.
    #[serde(default)]
    pub load: Vec<LoadSpec>,
    /// Task arrival streams.
    #[serde(default)]
    pub tasks: Vec<TaskStream>,
    /// Faults on the timeline.
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// What is measured and how.
    #[serde(default)]
    pub measure: MeasureSpec,
    /// The per-instance guards (the peer's `omesh guard`).
    #[serde(default)]
    pub guard: GuardSpec,
    /// Bounds the run must stay within, besides the invariants.
    #[serde(default)]
    pub expect: Expect,
}

fn default_boot_spread() -> f64 {
    2.0
}

/// Replica timing presets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// `ReplicaConfig::default()`.
    #[default]
    Lan,
    /// `ReplicaConfig::wan(nodes)`: periods scaled to the mesh size.
    Wan,
}

/// Replica settings a scenario may change (milliseconds).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaOverrides {
    /// `heartbeat_ms`.
    pub heartbeat_ms: Option<u64>,
    /// `lease_ttl_ms`.
    pub lease_ttl_ms: Option<u64>,
    /// `lease_grace_ms`.
    pub lease_grace_ms: Option<u64>,
    /// `probe_timeout_ms`.
    pub probe_timeout_ms: Option<u64>,
    /// `settle_ms`.
    pub settle_ms: Option<u64>,
    /// `claim_stagger_ms`.
    pub claim_stagger_ms: Option<u64>,
    /// `anti_entropy_ms`.
    pub anti_entropy_ms: Option<u64>,
    /// `gap_sync_ms`.
    pub gap_sync_ms: Option<u64>,
    /// `retention_ms`.
    pub retention_ms: Option<u64>,
    /// `enable_offload`.
    pub enable_offload: Option<bool>,
    /// `threshold_cpu`.
    pub threshold_cpu: Option<u8>,
    /// `target_node_tags`.
    pub target_node_tags: Option<Vec<String>>,
}

/// Link behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSpec {
    /// Each link's base one-way latency is drawn uniformly from this range, in ms.
    pub latency_ms: [f64; 2],
    /// Mean of the exponential extra delay of each message, in ms.
    pub jitter_ms: f64,
    /// Chance, in thousandths, that a message is lost.
    pub loss_permille: u32,
    /// Chance, in thousandths, that a message is delivered twice.
    pub dup_permille: u32,
    /// Chance, in thousandths, that a message is held back by `reorder_ms`.
    pub reorder_permille: u32,
    /// How long a reordered message is held back, in ms.
    pub reorder_ms: f64,
    /// Uplink bandwidth per node in Mbit/s (0: unlimited).
    pub bandwidth_mbps: f64,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        Self {
            latency_ms: [5.0, 50.0],
            jitter_ms: 1.0,
            loss_permille: 0,
            dup_permille: 0,
            reorder_permille: 0,
            reorder_ms: 20.0,
            bandwidth_mbps: 100.0,
        }
    }
}

/// The gossipsub-shaped overlay.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GossipSpec {
    /// Target mesh degree D.
    pub mesh_degree: usize,
    /// Below this many mesh peers a node grafts more (D_low).
    pub mesh_low: usize,
    /// Above this many it prunes back to D (D_high).
    pub mesh_high: usize,
    /// Mesh maintenance period, in ms (gossipsub's heartbeat).
    pub maintenance_ms: u64,
    /// Ping period per mesh link, in ms (feeds `Input::Rtt`; 0: never).
    pub ping_ms: u64,
}

impl Default for GossipSpec {
    fn default() -> Self {
        Self {
            mesh_degree: 6,
            mesh_low: 4,
            mesh_high: 12,
            maintenance_ms: 1_000,
            ping_ms: 15_000,
        }
    }
}

/// Per-node clocks: each node's `now` is `sim + offset + sim * drift`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockSpec {
    /// Each node's offset is drawn uniformly from ±this, in ms.
    pub offset_ms: f64,
    /// Each node's rate error is drawn uniformly from ±this, in parts per million.
    pub drift_ppm: f64,
}

/// A group of nodes sharing tags, capacity and base load.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Name, used by load changes, task streams and fault targets.
    pub name: String,
    /// Share of the nodes, taken in index order after the groups before it.
    pub fraction: f64,
    /// Tags of its nodes.
    #[serde(default)]
    pub tags: Vec<String>,
    /// CPU capacity in thousandths of a core.
    #[serde(default = "default_cpu_millis")]
    pub cpu_millis: u32,
    /// Memory capacity in MiB.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Base CPU load, in thousandths.
    #[serde(default = "default_cpu_load")]
    pub cpu_permille: u16,
    /// Base memory load, in thousandths.
    #[serde(default = "default_mem_load")]
    pub mem_permille: u16,
}

fn default_cpu_millis() -> u32 {
    4_000
}
fn default_memory_mb() -> u64 {
    8_192
}
fn default_cpu_load() -> u16 {
    200
}
fn default_mem_load() -> u16 {
    300
}

impl GroupSpec {
    /// The group of nodes no other group claims.
    pub fn default_group() -> Self {
        Self {
            name: "default".to_owned(),
            fraction: 1.0,
            tags: Vec::new(),
            cpu_millis: default_cpu_millis(),
            memory_mb: default_memory_mb(),
            cpu_permille: default_cpu_load(),
            mem_permille: default_mem_load(),
        }
    }
}

/// A base-load change for a group over an interval.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSpec {
    /// The group (`*`: every node).
    pub group: String,
    /// Start, in seconds.
    pub from_s: f64,
    /// End, in seconds.
    pub until_s: f64,
    /// CPU load in thousandths.
    pub cpu_permille: u16,
    /// Memory load in thousandths.
    #[serde(default = "default_mem_load")]
    pub mem_permille: u16,
}

/// A stream of task submissions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskStream {
    /// First arrival, in seconds.
    pub from_s: f64,
    /// No arrivals after this, in seconds.
    pub until_s: f64,
    /// Poisson arrivals per second.
    pub rate_per_s: f64,
    /// Each run lasts a time drawn uniformly from this range, in seconds.
    pub duration_s: [f64; 2],
    /// CPU each task reserves, in thousandths of a core.
    #[serde(default = "default_task_cpu")]
    pub cpu_millis: u32,
    /// Memory each task reserves, in MiB.
    #[serde(default = "default_task_mem")]
    pub memory_mb: u64,
    /// Tags the owner must carry.
    #[serde(default)]
    pub required_tags: Vec<String>,
    /// Which group's nodes the tasks are submitted through (`*`: any live node).
    #[serde(default = "any_group")]
    pub submit_to: String,
    /// Chance, in thousandths, that one run exits non-zero.
    #[serde(default)]
    pub fail_permille: u32,
    /// Runs before a task fails for good.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// The spec's `disconnect.stop_after_ms` (at most once: the owner stops once it has not
    /// been in contact with a majority for this long; only a majority side claims).
    pub stop_after_ms: Option<u32>,
    /// The spec's `disconnect.lost_after_ms` (not replaced until the owner has been
    /// unreachable for this long).
    pub lost_after_ms: Option<u32>,
}

impl TaskStream {
    /// The disconnect policy its tasks' specs carry.
    pub fn disconnect(&self) -> omesh_protocol::Disconnect {
        omesh_protocol::Disconnect {
            stop_after_ms: self.stop_after_ms,
            lost_after_ms: self.lost_after_ms,
        }
    }
}

fn default_task_cpu() -> u32 {
    250
}
fn default_task_mem() -> u64 {
    128
}
fn any_group() -> String {
    "*".to_owned()
}
fn default_attempts() -> u32 {
    3
}

/// What is sampled.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeasureSpec {
    /// Share of heartbeat deltas whose spread is tracked, in thousandths (task deltas are
    /// always tracked while fewer than `max_tracked` are outstanding).
    pub heartbeat_sample_permille: u32,
    /// Most deltas tracked at once.
    pub max_tracked: usize,
    /// Warm-up before anything is sampled, in seconds.
    pub warmup_s: f64,
    /// A quiet stretch `[from, until]` in seconds whose traffic is reported on its own row
    /// ("idle"): no arrivals, faults or load changes should fall in it.
    pub idle_s: Option<[f64; 2]>,
}

impl Default for MeasureSpec {
    fn default() -> Self {
        Self {
            heartbeat_sample_permille: 20,
            max_tracked: 256,
            warmup_s: 10.0,
            idle_s: None,
        }
    }
}

/// The guard every task instance has in the peer (`node/src/guard`): it kills the instance
/// once the node's `Replica::leases_hold_until`, less `margin_ms`, passes on the node's own
/// clock without being renewed past it, and the peer reports `ExecEvent::Expired`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardSpec {
    /// Model the guards (`false`: instances outlive their leases, as before the guards, for
    /// before/after comparisons).
    pub enabled: bool,
    /// The peer's `guard_margin_ms`: how long before the leases could be counted lost
    /// elsewhere the guard kills, in ms.
    pub margin_ms: u64,
}

impl Default for GuardSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            margin_ms: 500,
        }
    }
}

/// Bounds a run must stay within (absent: not checked).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// p99 time for a delta to reach every live node, in ms.
    pub convergence_p99_ms: Option<f64>,
    /// p99 time from an owner's crash to the task running elsewhere, in ms.
    pub failover_p99_ms: Option<f64>,
    /// Longest time two instances of one task ran at once, in ms.
    pub max_duplicate_ms: Option<f64>,
    /// Longest time an instance ran on after a later epoch of its task started on another
    /// node (it outlived its lease), in ms.
    pub max_outlived_lease_ms: Option<f64>,
    /// Time from the last heal until every live node holds everything written before it, in ms.
    pub heal_converge_ms: Option<f64>,
    /// At least this many failovers must be measured.
    pub min_failovers: Option<usize>,
    /// At least this share of the accepted tasks must succeed, in thousandths; tasks still
    /// running at the end count neither way.
    pub min_succeeded_permille: Option<u32>,
    /// Longest time two instances of one default-policy task ran at once, in ms.
    pub max_duplicate_default_ms: Option<f64>,
    /// Longest time two instances of one `stop_after` task ran at once, in ms (at most
    /// once: 0).
    pub max_duplicate_stop_after_ms: Option<f64>,
    /// Longest time two instances of one `lost_after` task ran at once, in ms.
    pub max_duplicate_lost_after_ms: Option<f64>,
    /// p99 of how long a `stop_after` task stopped on a minority side ran nowhere, in ms.
    pub minority_downtime_p99_ms: Option<f64>,
    /// At most this many `stop_after` instances may be stopped early on a node that was
    /// not on a minority side.
    pub max_majority_stops: Option<usize>,
    /// At most this many `lost_after` tasks may fail over during a drop of their owner
    /// shorter than their window (none: 0).
    pub max_short_drop_failovers: Option<usize>,
    /// At most this many `lost_after` drops at least as long as the window may end without
    /// the task failing over (none: 0).
    pub max_long_drops_kept: Option<usize>,
    /// No `lost_after` task may fail over sooner than this after its owner's drop began, in
    /// ms (the window).
    pub min_long_drop_failover_ms: Option<f64>,
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates scenario text.
    pub fn parse(text: &str) -> Result<Self, ScenarioError> {
        let s: Self = toml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    /// The same scenario with another node count (fractions and rates stay).
    pub fn with_nodes(mut self, nodes: u32) -> Result<Self, ScenarioError> {
        self.nodes = nodes;
        self.validate()?;
        Ok(self)
    }

    /// The last time a fault is healed, in seconds (0 without faults).
    pub fn last_heal_s(&self) -> f64 {
        self.faults
            .iter()
            .map(|f| f.healed_s(self.nodes))
            .fold(0.0, f64::max)
    }

    /// Checks every value once.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        if self.nodes < 2 {
            return Err(bad("nodes", "need at least 2"));
        }
        if !positive(self.duration_s) {
            return Err(bad("duration_s", "must be above 0"));
        }
        let [lo, hi] = self.network.latency_ms;
        if !(lo >= 0.0 && hi >= lo) {
            return Err(bad(
                "network.latency_ms",
                "need [min, max] with 0 <= min <= max",
            ));
        }
        if self.network.loss_permille > 1000 || self.network.dup_permille > 1000 {
            return Err(bad("network", "permille values must be at most 1000"));
        }
        let g = &self.gossip;
        if g.mesh_degree == 0 || g.mesh_low > g.mesh_degree || g.mesh_high < g.mesh_degree {
            return Err(bad(
                "gossip",
                "need 0 < mesh_low <= mesh_degree <= mesh_high",
            ));
        }
        if g.maintenance_ms == 0 {
            return Err(bad("gossip.maintenance_ms", "must be above 0"));
        }
        if self.clock.drift_ppm.abs() >= 100_000.0 {
            return Err(bad("clock.drift_ppm", "must be below 100,000"));
        }
        let mut share = 0.0;
        for (i, g) in self.groups.iter().enumerate() {
            share += g.fraction;
            if !positive(g.fraction) || share > 1.0 + 1e-9 {
                return Err(bad(
                    format!("groups[{i}].fraction"),
                    "fractions must be above 0 and add up to at most 1",
                ));
            }
            if g.name == "*" || g.name == "default" {
                return Err(bad(
                    format!("groups[{i}].name"),
                    "`*` and `default` are reserved",
                ));
            }
        }
        let known = |name: &str| {
            name == "*" || name == "default" || self.groups.iter().any(|g| g.name == name)
        };
        for (i, l) in self.load.iter().enumerate() {
            if !known(&l.group) {
                return Err(bad(
                    format!("load[{i}].group"),
                    format!("no group {:?}", l.group),
                ));
            }
        }
        for (i, t) in self.tasks.iter().enumerate() {
            if !known(&t.submit_to) {
                return Err(bad(
                    format!("tasks[{i}].submit_to"),
                    format!("no group {:?}", t.submit_to),
                ));
            }
            if !positive(t.rate_per_s) || t.duration_s[0] < 0.0 || t.duration_s[1] < t.duration_s[0]
            {
                return Err(bad(
                    format!("tasks[{i}]"),
                    "need rate_per_s > 0 and duration_s = [min, max]",
                ));
            }
            use omesh_protocol::{MAX_DISCONNECT_MS, MIN_DISCONNECT_MS};
            for (key, window) in [
                ("stop_after_ms", t.stop_after_ms),
                ("lost_after_ms", t.lost_after_ms),
            ] {
                if window.is_some_and(|ms| !(MIN_DISCONNECT_MS..=MAX_DISCONNECT_MS).contains(&ms)) {
                    return Err(bad(
                        format!("tasks[{i}].{key}"),
                        format!("must be within {MIN_DISCONNECT_MS}..={MAX_DISCONNECT_MS} ms"),
                    ));
                }
            }
            if t.max_attempts == 0 {
                return Err(bad(
                    format!("tasks[{i}].max_attempts"),
                    "must be at least 1",
                ));
            }
        }
        for (i, f) in self.faults.iter().enumerate() {
            if let Fault::Crash { target, .. } | Fault::Isolate { target, .. } = f {
                Target::parse(target).map_err(|why| bad(format!("faults[{i}].target"), why))?;
            }
            if let Fault::Partition { fraction, .. } | Fault::RollingRestart { fraction, .. } = f {
                if !(*fraction > 0.0 && *fraction <= 1.0) {
                    return Err(bad(format!("faults[{i}].fraction"), "must be in (0, 1]"));
                }
            }
            if let Fault::Split { parts, .. } = f {
                if *parts < 2 || *parts > self.nodes {
                    return Err(bad(
                        format!("faults[{i}].parts"),
                        "need 2 <= parts <= nodes",
                    ));
                }
            }
            if let Fault::Partition {
                flap_s: Some(flap), ..
            }
            | Fault::Split {
                flap_s: Some(flap), ..
            } = f
            {
                if !positive(*flap) {
                    return Err(bad(format!("faults[{i}].flap_s"), "must be above 0"));
                }
            }
            if f.healed_s(self.nodes) < f.start_s() {
                return Err(bad(format!("faults[{i}]"), "ends before it starts"));
            }
        }
        let replica = self.replica_config(self.nodes);
        replica
            .validate()
            .map_err(|e| bad(format!("replica.{}", e.key), e.reason))?;
        // As the peer's config checks `guard_margin_ms`: a margin of the whole window would
        // kill every instance the moment it starts.
        if self.guard.enabled
            && self.guard.margin_ms >= replica.lease_ttl_ms + replica.lease_grace_ms
        {
            return Err(bad(
                "guard.margin_ms",
                "must be below replica.lease_ttl_ms + replica.lease_grace_ms",
            ));
        }
        Ok(())
    }

    /// The replica config every node starts from (identity and seed are set per node).
    pub fn replica_config(&self, nodes: u32) -> ReplicaConfig {
        let mut c = match self.preset {
            Preset::Lan => ReplicaConfig::default(),
            Preset::Wan => ReplicaConfig::wan(usize::try_from(nodes).unwrap_or(usize::MAX)),
        };
        // The simulator measures spread itself (see `propagation.rs`); each replica keeping
        // a sample of every record it merges would hold N of them.
        c.propagation_samples = 0;
        let o = &self.replica;
        let set = |slot: &mut u64, v: Option<u64>| {
            if let Some(v) = v {
                *slot = v;
            }
        };
        set(&mut c.heartbeat_ms, o.heartbeat_ms);
        set(&mut c.lease_ttl_ms, o.lease_ttl_ms);
        set(&mut c.lease_grace_ms, o.lease_grace_ms);
        set(&mut c.probe_timeout_ms, o.probe_timeout_ms);
        set(&mut c.settle_ms, o.settle_ms);
        set(&mut c.claim_stagger_ms, o.claim_stagger_ms);
        set(&mut c.anti_entropy_ms, o.anti_entropy_ms);
        set(&mut c.gap_sync_ms, o.gap_sync_ms);
        set(&mut c.retention_ms, o.retention_ms);
        if let Some(v) = o.enable_offload {
            c.enable_offload = v;
        }
        if let Some(v) = o.threshold_cpu {
            c.threshold_cpu = v;
        }
        if let Some(tags) = &o.target_node_tags {
            c.target_node_tags = tags.iter().cloned().collect();
        }
        c
    }
}
