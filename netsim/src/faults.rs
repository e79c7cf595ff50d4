//! Faults on the timeline: crashes and restarts (data directory kept or lost), partitions
//! (one-way too), splits into several parts, cuts that flap on and off, isolated nodes,
//! raised loss and rolling restarts.

use omesh_state::Input;
use rand::seq::SliceRandom;
use serde::Deserialize;

use crate::network::Partition;
use crate::sim::{fold, ix, secs, Event, Sim, Slot};

/// What a restarted node keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataDir {
    /// Same identity, incarnation + 1, empty replicated state.
    #[default]
    Kept,
    /// A new identity: the old node never comes back.
    Lost,
}

/// A fault on the timeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// Crash nodes; restart them later if `restart_after_s` is set.
    Crash {
        /// When, in seconds.
        at_s: f64,
        /// Which nodes: `owner`, `owners:N`, `random:N`, `node:I`, `group:NAME:N`.
        target: String,
        /// Restart after this long (never if absent).
        restart_after_s: Option<f64>,
        /// What the restart keeps.
        #[serde(default)]
        data: DataDir,
    },
    /// Cut a share of the nodes from the rest.
    Partition {
        /// Start, in seconds.
        at_s: f64,
        /// Heal, in seconds.
        until_s: f64,
        /// Share of the nodes on the minority side.
        fraction: f64,
        /// Only messages from the minority to the rest are dropped.
        #[serde(default)]
        one_way: bool,
        /// Flap: the cut is in force for this many seconds, then lifted for as many, and so
        /// on until `until_s` (the same nodes each time).
        flap_s: Option<f64>,
    },
    /// Split the mesh into `parts` parts of (nearly) equal size, each cut off from every
    /// other: with three or more, no part holds a majority.
    Split {
        /// Start, in seconds.
        at_s: f64,
        /// Heal, in seconds.
        until_s: f64,
        /// How many parts (at least 2).
        parts: u32,
        /// Flap, as for a partition.
        flap_s: Option<f64>,
    },
    /// Cut each target node off from every other node (from each other too), while its
    /// process keeps running: an owner unplugged, not crashed.
    Isolate {
        /// Start, in seconds.
        at_s: f64,
        /// Heal, in seconds.
        until_s: f64,
        /// Which nodes, as for a crash: `owner`, `owners:N`, `random:N`, `node:I`,
        /// `group:NAME:N`.
        target: String,
        /// Only messages from the isolated nodes are dropped: they hear the mesh, the mesh
        /// does not hear them.
        #[serde(default)]
        one_way: bool,
    },
    /// Raise message loss everywhere.
    Loss {
        /// Start, in seconds.
        at_s: f64,
        /// End, in seconds.
        until_s: f64,
        /// Chance of loss, in thousandths.
        permille: u32,
    },
    /// Restart nodes one after another.
    RollingRestart {
        /// First restart, in seconds.
        at_s: f64,
        /// Between two restarts, in seconds.
        interval_s: f64,
        /// How long each node stays down, in seconds.
        downtime_s: f64,
        /// Share of the nodes restarted.
        #[serde(default = "all_nodes")]
        fraction: f64,
        /// What each restart keeps.
        #[serde(default)]
        data: DataDir,
    },
}

fn all_nodes() -> f64 {
    1.0
}

impl Fault {
    /// When the fault starts, in seconds.
    pub fn start_s(&self) -> f64 {
        match self {
            Self::Crash { at_s, .. }
            | Self::Partition { at_s, .. }
            | Self::Split { at_s, .. }
            | Self::Isolate { at_s, .. }
            | Self::Loss { at_s, .. }
            | Self::RollingRestart { at_s, .. } => *at_s,
        }
    }

    /// When everything the fault did is healed, in seconds, for `nodes` nodes.
    pub fn healed_s(&self, nodes: u32) -> f64 {
        match self {
            Self::Crash {
                at_s,
                restart_after_s,
                ..
            } => at_s + restart_after_s.unwrap_or(0.0),
            Self::Partition { until_s, .. }
            | Self::Split { until_s, .. }
            | Self::Isolate { until_s, .. }
            | Self::Loss { until_s, .. } => *until_s,
            Self::RollingRestart {
                at_s,
                interval_s,
                downtime_s,
                fraction,
                ..
            } => {
                let count = (f64::from(nodes) * fraction).round().max(1.0);
                at_s + (count - 1.0) * interval_s + downtime_s
            }
        }
    }
}

/// Which nodes a crash hits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The `n` nodes running the most task instances (ties: lower index).
    Owners(usize),
    /// `n` random live nodes.
    Random(usize),
    /// The node with this index.
    Node(u32),
    /// `n` random live nodes of a group.
    Group(String, usize),
}

impl Target {
    /// Parses `owner`, `owners:N`, `random:N`, `node:I`, `group:NAME:N`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let num = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{v:?} is not a count in target {s:?}"))
        };
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["owner"] => Ok(Self::Owners(1)),
            ["owners", n] => Ok(Self::Owners(num(n)?)),
            ["random", n] => Ok(Self::Random(num(n)?)),
            ["node", i] => Ok(Self::Node(
                u32::try_from(num(i)?).map_err(|_| format!("node index too large in {s:?}"))?,
            )),
            ["group", name, n] => Ok(Self::Group((*name).to_owned(), num(n)?)),
            _ => Err(format!(
                "unknown target {s:?} (expected owner, owners:N, random:N, node:I or group:NAME:N)"
            )),
        }
    }
}

impl Sim {
    pub(crate) fn fault_start(&mut self, f: u32) {
        let now = self.queue.now();
        self.trace = fold(self.trace, 9 << 32 | u64::from(f));
        if self.frozen {
            return;
        }
        let fault = self.scenario.faults[ix(f)].clone();
        match fault {
            Fault::Crash {
                target,
                restart_after_s,
                data,
                ..
            } => {
                // Validated when the scenario was loaded.
                let Ok(target) = Target::parse(&target) else {
                    return;
                };
                for node in self.select(&target) {
                    self.crash(node);
                    if let Some(after) = restart_after_s {
                        self.queue
                            .push(now + secs(after), Event::Restart { node, data });
                    }
                }
            }
            Fault::Partition {
                until_s,
                fraction,
                one_way,
                flap_s,
                ..
            } => {
                let mut all: Vec<u32> = (0..u32::try_from(self.nodes.len()).unwrap_or(0)).collect();
                all.shuffle(&mut self.rng);
                let count = ((all.len() as f64) * fraction).round() as usize;
                let mut side = vec![false; self.nodes.len()];
                for n in all.into_iter().take(count.max(1)) {
                    side[ix(n)] = true;
                }
                let cut = Partition {
                    fault: ix(f),
                    side,
                    one_way,
                };
                self.cut_for(f, vec![cut], until_s, flap_s);
            }
            Fault::Split {
                until_s,
                parts,
                flap_s,
                ..
            } => {
                let mut all: Vec<u32> = (0..u32::try_from(self.nodes.len()).unwrap_or(0)).collect();
                all.shuffle(&mut self.rng);
                let parts = usize::try_from(parts.max(1)).unwrap_or(1);
                let mut sides = vec![vec![false; self.nodes.len()]; parts];
                for (k, n) in all.into_iter().enumerate() {
                    sides[k % parts][ix(n)] = true;
                }
                let cuts = sides
                    .into_iter()
                    .map(|side| Partition {
                        fault: ix(f),
                        side,
                        one_way: false,
                    })
                    .collect();
                self.cut_for(f, cuts, until_s, flap_s);
            }
            Fault::Isolate {
                until_s,
                target,
                one_way,
                ..
            } => {
                let Ok(target) = Target::parse(&target) else {
                    return;
                };
                // One cut per node: isolated nodes do not hear each other either.
                let cuts = self
                    .select(&target)
                    .into_iter()
                    .map(|node| {
                        let mut side = vec![false; self.nodes.len()];
                        side[ix(node)] = true;
                        Partition {
                            fault: ix(f),
                            side,
                            one_way,
                        }
                    })
                    .collect();
                self.cut_for(f, cuts, until_s, None);
            }
            Fault::Loss {
                until_s, permille, ..
            } => {
                self.network.add_loss(ix(f), permille);
                self.queue.push(secs(until_s), Event::FaultEnd { fault: f });
            }
            Fault::RollingRestart { .. } => {
                self.queue.push(now, Event::Rolling { fault: f, step: 0 });
            }
        }
    }

    /// Puts fault `f`'s cuts in force until `until_s`; a flapping fault keeps them to lift
    /// and restore them every `flap_s`.
    fn cut_for(&mut self, f: u32, cuts: Vec<Partition>, until_s: f64, flap_s: Option<f64>) {
        let now = self.queue.now();
        if let Some(flap) = flap_s {
            self.flapping.insert(f, cuts.clone());
            self.queue.push(
                now + secs(flap),
                Event::Flap {
                    fault: f,
                    on: false,
                },
            );
        }
        for cut in cuts {
            self.network.cut(cut);
        }
        self.queue.push(secs(until_s), Event::FaultEnd { fault: f });
        self.cuts_changed();
    }

    /// A flapping fault's cuts are lifted (`on = false`) or restored, until the fault ends.
    pub(crate) fn flap(&mut self, f: u32, on: bool) {
        let now = self.queue.now();
        self.trace = fold(self.trace, 15 << 32 | u64::from(f) << 1 | u64::from(on));
        let Some(cuts) = self.flapping.get(&f) else {
            return;
        };
        let (until_s, flap_s) = match &self.scenario.faults[ix(f)] {
            Fault::Partition {
                until_s, flap_s, ..
            }
            | Fault::Split {
                until_s, flap_s, ..
            } => (*until_s, flap_s.unwrap_or(0.0)),
            _ => return,
        };
        if self.frozen || now >= secs(until_s) {
            return;
        }
        if on {
            for cut in cuts.clone() {
                self.network.cut(cut);
            }
        } else {
            self.network.heal(ix(f));
        }
        let next = now + secs(flap_s);
        if next < secs(until_s) {
            self.queue.push(next, Event::Flap { fault: f, on: !on });
        }
        self.cuts_changed();
    }

    pub(crate) fn fault_end(&mut self, f: u32) {
        self.trace = fold(self.trace, 10 << 32 | u64::from(f));
        self.network.heal(ix(f));
        self.network.end_loss(ix(f));
        self.flapping.remove(&f);
        self.cuts_changed();
    }

    pub(crate) fn rolling_step(&mut self, f: u32, step: u32) {
        let now = self.queue.now();
        self.trace = fold(self.trace, 11 << 32 | u64::from(f) << 16 | u64::from(step));
        if self.frozen {
            return;
        }
        let Fault::RollingRestart {
            interval_s,
            downtime_s,
            fraction,
            data,
            ..
        } = self.scenario.faults[ix(f)].clone()
        else {
            return;
        };
        let count = (f64::from(self.scenario.nodes) * fraction).round().max(1.0) as u32;
        if step >= count {
            return;
        }
        let node = self.current(step);
        self.crash(node);
        self.queue
            .push(now + secs(downtime_s), Event::Restart { node, data });
        self.queue.push(
            now + secs(interval_s),
            Event::Rolling {
                fault: f,
                step: step + 1,
            },
        );
    }

    /// The node index that now stands for initial node `i` (following new identities).
    fn current(&self, mut i: u32) -> u32 {
        while let Some(next) = self.nodes[ix(i)].replaced_by {
            i = next;
        }
        i
    }

    fn select(&mut self, target: &Target) -> Vec<u32> {
        let up: Vec<u32> = self.up_nodes().map(|(i, _)| i).collect();
        match target {
            Target::Owners(n) => {
                let mut by_load: Vec<(usize, u32)> = up
                    .iter()
                    .map(|i| {
                        let running = self.nodes[ix(*i)]
                            .exec
                            .values()
                            .filter(|s| matches!(s, Slot::Running(_)))
                            .count();
                        (running, *i)
                    })
                    .collect();
                by_load.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                by_load.into_iter().take(*n).map(|(_, i)| i).collect()
            }
            Target::Random(n) => {
                let mut up = up;
                up.shuffle(&mut self.rng);
                up.truncate(*n);
                up
            }
            Target::Node(i) => {
                let i = self.current(*i);
                if up.contains(&i) {
                    vec![i]
                } else {
                    Vec::new()
                }
            }
            Target::Group(name, n) => {
                let mut members: Vec<u32> = up
                    .into_iter()
                    .filter(|i| self.groups[self.nodes[ix(*i)].group].name == *name)
                    .collect();
                members.shuffle(&mut self.rng);
                members.truncate(*n);
                members
            }
        }
    }

    /// Crashes node `i`: its replica and running instances are gone, its links drop.
    pub(crate) fn crash(&mut self, i: u32) {
        let now = self.queue.now();
        if !self.nodes[ix(i)].up() {
            return;
        }
        self.trace = fold(self.trace, 12 << 32 | u64::from(i));
        let node = &mut self.nodes[ix(i)];
        if let Some(j) = self.journal.as_mut() {
            j.crashed(node.id);
        }
        node.replica = None;
        node.gen += 1;
        let running: Vec<usize> = node
            .exec
            .values()
            .filter_map(|s| match s {
                Slot::Running(inst) => Some(*inst),
                Slot::Starting => None,
            })
            .collect();
        node.exec.clear();
        for inst in running {
            self.runs.crashed(inst, now);
        }
        self.overlay.isolate(i);
        self.network.reset_uplink(i, now);
        self.tracker.node_down(now, i);
        self.node_up_changed(now, -1);
        self.crashes += 1;
    }

    /// Brings node `i` back: same identity and incarnation + 1, or a new identity.
    pub(crate) fn restart(&mut self, i: u32, data: DataDir) {
        self.trace = fold(self.trace, 13 << 32 | u64::from(i));
        if self.frozen || self.nodes[ix(i)].up() {
            return;
        }
        let node = match data {
            DataDir::Kept => i,
            DataDir::Lost => {
                let (group, clock) = (self.nodes[ix(i)].group, self.nodes[ix(i)].clock);
                let j = self.add_node(group, clock);
                self.nodes[ix(i)].replaced_by = Some(j);
                j
            }
        };
        self.boot(node);
        let nodes = &self.nodes;
        let network = &self.network;
        self.overlay.graft(&mut self.rng, node, &|p| {
            nodes[ix(p)].up() && network.reachable(node, p) && network.reachable(p, node)
        });
        if self.forming() {
            return;
        }
        // The driver tells both ends of each new connection (see `Input::Connected`).
        let id = self.nodes[ix(node)].id;
        for p in self.overlay.peers(node).to_vec() {
            let peer = self.nodes[ix(p)].id;
            self.feed(node, Input::Connected(peer));
            self.feed(p, Input::Connected(id));
        }
    }
}
