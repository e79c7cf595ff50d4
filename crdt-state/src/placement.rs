//! Placement: which live nodes may run a task, and how well. Ranks use replicated data only
//! (records, leases, the submitting node's RTT table), so replicas with the same state agree
//! on the best node and only it claims.

use std::collections::{BTreeMap, BTreeSet};

use omesh_protocol::{Digest, ExecutorKind, NodeId, NodeRecord, TaskSpec};

/// Resources already promised to live leases on one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// CPU in thousandths of a core.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Live leases (tasks claimed, starting or running there).
    pub tasks: u32,
    /// The CPU asked by those of them that the node's published load does not show yet
    /// (claimed, starting, or running for less than [`LOAD_LAG_MS`] before the load sample),
    /// in thousandths of a core.
    pub unreported_cpu_millis: u64,
}

impl Committed {
    /// The sum of two bookings.
    pub fn plus(self, other: Self) -> Self {
        Self {
            cpu_millis: self.cpu_millis + other.cpu_millis,
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            tasks: self.tasks.saturating_add(other.tasks),
            unreported_cpu_millis: self.unreported_cpu_millis + other.unreported_cpu_millis,
        }
    }

    /// What is left of `self` once `other` is taken out (never below nothing).
    pub fn minus(self, other: Self) -> Self {
        Self {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            tasks: self.tasks.saturating_sub(other.tasks),
            unreported_cpu_millis: self
                .unreported_cpu_millis
                .saturating_sub(other.unreported_cpu_millis),
        }
    }

    /// Books one more task with `spec`'s asks, not yet in the node's load: a claim this
    /// evaluation pass expects the node to make.
    pub fn book(&mut self, spec: &TaskSpec) {
        self.cpu_millis += u64::from(spec.cpu_millis);
        self.unreported_cpu_millis += u64::from(spec.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_add(spec.memory_bytes);
        self.tasks = self.tasks.saturating_add(1);
    }
}

/// How long after a task starts its CPU is taken to show in its node's published (smoothed)
/// load; until then placement adds the task's ask to that load.
pub const LOAD_LAG_MS: u64 = 5_000;

/// Score taken off a node per live lease it holds, so that equal nodes share a burst (or a
/// failed node's tasks) rather than the best one taking all of it: about what 6% more CPU
/// costs, a quarter of the nearness bonus of the submitting node.
pub const TASK_WEIGHT: i64 = 250;

/// Score given the submitting node for a task never claimed yet: more than the load, task,
/// image, locality and tag terms together can take off it or give another node, so a
/// submitted task runs where it was submitted whenever that node may take it (under its
/// thresholds with the task on top, and it fits; DESIGN.md, Offload).
pub const SUBMITTER_FIRST: i64 = 20_000;

/// Score given the submitting node for a task placed again (its owner failed or handed it
/// back): a preference for nearness among others, not a rule, so that a failed node's tasks
/// spread over the survivors rather than all returning to the node they came through.
pub const SUBMITTER_NEAR: i64 = 1_500;

/// A node that can take the task, with its score (higher is better).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The node.
    pub node: NodeId,
    /// Its score.
    pub score: u32,
}

/// The thresholds and preferences placement applies.
#[derive(Debug, Clone, Default)]
pub struct PlacementPolicy {
    /// CPU utilisation, in thousandths, above which this node takes nothing new (it judges
    /// itself; others read its verdict, [`overloaded`]).
    pub cpu_limit_permille: u16,
    /// Memory utilisation, in thousandths, above which this node takes nothing new.
    pub mem_limit_permille: u16,
    /// Offload targets: nodes carrying one of these rank higher.
    pub target_tags: BTreeSet<String>,
}

/// Why no node can take a task right now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unplaceable {
    /// No live node carries every required tag.
    #[error("no live node carries the required tags {0:?}")]
    NoTaggedNode(Vec<String>),
    /// Nodes carry the tags but none has the free CPU and memory.
    #[error("no node with the required tags has {cpu_millis}m CPU and {memory_bytes} bytes free")]
    NoCapacity {
        /// CPU asked for.
        cpu_millis: u32,
        /// Memory asked for.
        memory_bytes: u64,
    },
    /// Every node that could run it is above its thresholds.
    #[error("every node that fits is above its cpu/memory thresholds")]
    AllOverloaded,
}

/// Whether `node` takes no new work: its own verdict, carried in its record. The node judges
/// its load against its own thresholds, with hysteresis (see `overload.rs`), so every replica
/// agrees on it whatever samples of that load it saw; a node with `enable_offload` off never
/// says so.
pub fn overloaded(node: &NodeRecord) -> bool {
    node.overloaded
}

/// `node`'s CPU utilisation in thousandths as placement sees it: its published load plus the
/// asks of the tasks it claimed that the load does not show yet.
pub fn expected_cpu_permille(node: &NodeRecord, committed: Committed) -> u64 {
    let cap = u64::from(node.capacity.cpu_millis).max(1);
    u64::from(node.load.cpu_permille) + committed.unreported_cpu_millis * 1000 / cap
}

/// Whether `node` is over the policy's thresholds once the work it claimed but does not yet
/// show in its load is counted, or would be with `spec` on top: a burst stops going to a node
/// its reservations fill. A task that asks more than the threshold itself may still go to a
/// node under it (it could go nowhere else).
pub fn overloaded_with(
    node: &NodeRecord,
    committed: Committed,
    spec: &TaskSpec,
    policy: &PlacementPolicy,
) -> bool {
    let limit = u64::from(policy.cpu_limit_permille);
    let expected = expected_cpu_permille(node, committed);
    let ask = u64::from(spec.cpu_millis) * 1000 / u64::from(node.capacity.cpu_millis).max(1);
    overloaded(node) || expected > limit || (ask <= limit && expected + ask > limit)
}

/// Scores one node for a task, or says why it cannot take it.
fn score(
    node: &NodeRecord,
    committed: Committed,
    spec: &TaskSpec,
    image: Option<&Digest>,
    (via, fresh): (Option<&NodeRecord>, bool),
    policy: &PlacementPolicy,
) -> Option<u32> {
    let free_cpu = u64::from(node.capacity.cpu_millis).saturating_sub(committed.cpu_millis);
    let free_mem = node
        .capacity
        .memory_bytes
        .saturating_sub(committed.memory_bytes);
    if free_cpu < u64::from(spec.cpu_millis) || free_mem < spec.memory_bytes {
        return None;
    }
    let mut s: i64 = 10_000;
    let cpu = expected_cpu_permille(node, committed).min(1000);
    s -= 4 * i64::try_from(cpu).unwrap_or(1000);
    s -= 2 * i64::from(node.load.mem_permille.min(1000));
    s -= TASK_WEIGHT * i64::from(committed.tasks.min(32));
    // Headroom left after placing the task, 0..=1000.
    let cap = u64::from(node.capacity.cpu_millis).max(1);
    let left = (free_cpu - u64::from(spec.cpu_millis)) * 1000 / cap;
    s += i64::try_from(left.min(1000)).unwrap_or(0);
    if image.is_some_and(|d| node.images.contains(d)) {
        s += 2_000;
    }
    if let Some(via) = via {
        if via.id == node.id {
            s += if fresh {
                SUBMITTER_FIRST
            } else {
                SUBMITTER_NEAR
            };
        } else if let Some((_, rtt)) = via.rtt_ms.iter().find(|(id, _)| *id == node.id) {
            s += 1_000 - i64::from((*rtt).min(100)) * 10;
        }
    }
    if node.tags.iter().any(|t| policy.target_tags.contains(t)) {
        s += 1_000;
    }
    Some(u32::try_from(s.max(1)).unwrap_or(1))
}

/// The tag of a node that enforces the cpu and memory limits of process tasks (a cgroup per
/// instance), or whose operator opted out of enforcing them.
pub const PROCESS_LIMITS_TAG: &str = "limits:process";

/// Whether a node must carry [`PROCESS_LIMITS_TAG`] to run `spec`: a process task that asks
/// for cpu or memory.
pub fn needs_process_limits(spec: &TaskSpec) -> bool {
    spec.executor == ExecutorKind::Process && (spec.cpu_millis > 0 || spec.memory_bytes > 0)
}

/// The tag a node carries when it can run tasks with `kind` (`None`: any node can).
pub fn executor_tag(kind: ExecutorKind) -> Option<&'static str> {
    match kind {
        ExecutorKind::Any => None,
        ExecutorKind::Docker => Some("executor:docker"),
        ExecutorKind::Process => Some("executor:process"),
    }
}

/// One task to place and what weighs on it: the same for every node ranked.
#[derive(Debug, Clone, Copy)]
pub struct Placing<'a> {
    /// Resources each node's live leases already hold.
    pub committed: &'a BTreeMap<NodeId, Committed>,
    /// Tasks booked on nodes by this evaluation pass, on top of `committed`.
    pub booked: Option<&'a BTreeMap<NodeId, Committed>>,
    /// Rank on published load and fit alone, as before reservations counted (at-most-once
    /// tasks: the node that polls for one must be the node that then claims it, and the
    /// reservations of the tasks claimed in between would move it).
    pub plain: bool,
    /// The task.
    pub spec: &'a TaskSpec,
    /// The image digest it pins, if any (holders rank higher).
    pub image: Option<&'a Digest>,
    /// The node it was submitted through (near ones rank higher).
    pub via: Option<&'a NodeRecord>,
    /// Never claimed yet: the node it was submitted through takes it whenever it may
    /// ([`SUBMITTER_FIRST`]); once placed again, it is only preferred ([`SUBMITTER_NEAR`]).
    pub fresh: bool,
    /// Thresholds and preferred tags.
    pub policy: &'a PlacementPolicy,
}

/// Ranks the live nodes for a task, best first (score, then lower node id).
pub fn rank<'a>(
    live: impl Iterator<Item = &'a NodeRecord>,
    task: &Placing<'_>,
) -> Result<Vec<Candidate>, Unplaceable> {
    let mut out = candidates(live, task)?;
    out.sort_by(rank_order);
    Ok(out)
}

/// [`rank`]'s order: higher score first, then lower node id.
fn rank_order(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.score.cmp(&a.score).then(a.node.cmp(&b.node))
}

/// The nodes of `live` that may run the task, with their scores, in `live`'s order.
fn candidates<'a>(
    live: impl Iterator<Item = &'a NodeRecord>,
    task: &Placing<'_>,
) -> Result<Vec<Candidate>, Unplaceable> {
    let Placing {
        committed,
        booked,
        plain,
        spec,
        image,
        via,
        fresh,
        policy,
    } = *task;
    let mut tagged = 0usize;
    let mut fitting_but_loaded = 0usize;
    let mut out = Vec::new();
    let executor_tag = executor_tag(spec.executor);
    let limits_tag = needs_process_limits(spec).then_some(PROCESS_LIMITS_TAG);
    for node in live {
        if node.leaving
            || !spec.required_tags.iter().all(|t| node.tags.contains(t))
            || executor_tag.is_some_and(|t| !node.tags.contains(t))
            || limits_tag.is_some_and(|t| !node.tags.contains(t))
        {
            continue;
        }
        tagged += 1;
        let c = committed.get(&node.id).copied().unwrap_or_default();
        let c = booked
            .and_then(|b| b.get(&node.id))
            .map_or(c, |b| c.plus(*b));
        let c = if plain {
            Committed {
                tasks: 0,
                unreported_cpu_millis: 0,
                ..c
            }
        } else {
            c
        };
        let Some(score) = score(node, c, spec, image, (via, fresh), policy) else {
            continue;
        };
        if (plain && overloaded(node)) || (!plain && overloaded_with(node, c, spec, policy)) {
            fitting_but_loaded += 1;
            continue;
        }
        out.push(Candidate {
            node: node.id,
            score,
        });
    }
    if out.is_empty() {
        return Err(if tagged == 0 {
            let mut tags: Vec<String> = spec.required_tags.iter().cloned().collect();
            tags.extend(executor_tag.map(str::to_owned));
            tags.extend(limits_tag.map(str::to_owned));
            Unplaceable::NoTaggedNode(tags)
        } else if fitting_but_loaded > 0 {
            Unplaceable::AllOverloaded
        } else {
            Unplaceable::NoCapacity {
                cpu_millis: spec.cpu_millis,
                memory_bytes: spec.memory_bytes,
            }
        });
    }
    Ok(out)
}

/// Where `me` stands in [`rank`]'s order (0 = best) and its score, or `None` if it may not
/// run the task. Counts the better candidates rather than sorting them all: every replica
/// asks this of every unowned task at each evaluation, and a mesh may hold 10,000 nodes.
pub fn place<'a>(
    me: &NodeId,
    live: impl Iterator<Item = &'a NodeRecord>,
    task: &Placing<'_>,
) -> Result<Option<(usize, u32)>, Unplaceable> {
    Ok(placed(me, live, task)?.mine)
}

/// Where `me` stands for a task, and which node is best for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// `me`'s position in [`rank`]'s order (0 = best) and score, if it may run the task.
    pub mine: Option<(usize, u32)>,
    /// The best node: the one every replica with this view expects to claim it.
    pub best: NodeId,
}

/// [`place`], and the best node too (a pass books each task it places on its best node, so
/// that the next task of the same pass sees that node a task fuller).
pub fn placed<'a>(
    me: &NodeId,
    live: impl Iterator<Item = &'a NodeRecord>,
    task: &Placing<'_>,
) -> Result<Placed, Unplaceable> {
    let cands = candidates(live, task)?;
    // `candidates` errs rather than return none.
    let best = cands
        .iter()
        .min_by(|a, b| rank_order(a, b))
        .map(|c| c.node)
        .ok_or(Unplaceable::AllOverloaded)?;
    let mine = cands.iter().find(|c| c.node == *me).map(|mine| {
        let ahead = cands.iter().filter(|c| rank_order(c, mine).is_lt()).count();
        (ahead, mine.score)
    });
    Ok(Placed { mine, best })
}
