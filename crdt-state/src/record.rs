//! When this node publishes its own record: at once when it must (start, refutation, leaving,
//! a change of images), otherwise at most once a period, when something a peer ranks or
//! reaches it by moved (load past `load_delta_permille` or across a threshold, addresses), or
//! when a task it started long enough ago shows in its load (placement stops adding the
//! task's ask on top, see `placement::LOAD_LAG_MS`).
//! Liveness does not ride on the record (see `probe.rs`), so an unchanged node publishes nothing.
//!
//! A load that only drifts (no threshold crossed) is paced by the mesh's size: every record
//! is verified and merged by every node, so N nodes each publishing a drift once a period
//! would cost each node N verifications a period, an idle cost that grows with the mesh (a
//! host whose load wanders by 5 points every few seconds did that to a 20-node mesh).
//! [`LOAD_DRIFT_SPACING_MS`] per known node keeps the whole mesh at about one drift record a
//! second. A large drift (by [`LARGE_DRIFT`] times `load_delta_permille` or more) waits at
//! most [`MAX_DRIFT_PERIOD_MS`], so that what placement ranks by is never that far off for
//! longer, whatever the mesh's size (1,000 nodes all moving a lot: about 67 records a second
//! in all); a small one waits its full spacing, so the noise of an idle host costs a mesh of
//! any size one record a second; a crossing of the overload threshold, which placement turns
//! on, is not held back.

use std::collections::BTreeMap;

use omesh_protocol::{LoadSample, Millis, NodeId, NodeRecord};

use crate::config::ReplicaConfig;
use crate::liveness::RttEstimate;

/// A load drift waits this long per known node since the last publication (at least one
/// `heartbeat_ms`): a mesh of any size publishes about one drift record a second in all.
pub(crate) const LOAD_DRIFT_SPACING_MS: Millis = 1_000;

/// The longest a large load drift waits, whatever the mesh's size: the staleness placement
/// accepts in the load it ranks by (reservations cover what was placed meanwhile).
pub(crate) const MAX_DRIFT_PERIOD_MS: Millis = 15_000;

/// A drift of this many times `load_delta_permille` or more is large: it waits at most
/// [`MAX_DRIFT_PERIOD_MS`]. A smaller one (the wandering of an idle host's load) is paced by
/// the mesh's size alone.
pub(crate) const LARGE_DRIFT: u16 = 3;

/// How far a load sample moved from the one last published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoadMove {
    /// Less than `load_delta_permille` either way, and the same overload verdict.
    None,
    /// By `load_delta_permille` or more, with the same overload verdict: paced by mesh size
    /// (`large`: by [`LARGE_DRIFT`] times that or more, so at most [`MAX_DRIFT_PERIOD_MS`]).
    Drift {
        /// By [`LARGE_DRIFT`] times `load_delta_permille` or more.
        large: bool,
    },
    /// The overload verdict (which placement turns on) changed: published within a period.
    Verdict,
}

/// The publication schedule of this node's record and what the last one said.
#[derive(Debug, Default)]
pub(crate) struct RecordPublisher {
    /// When a changed record is next published (rate-limited to one per `heartbeat_ms`).
    due: Option<Millis>,
    /// When the record was last published.
    last: Millis,
    /// The load the last published record carried.
    published_load: LoadSample,
    /// The overload verdict the last published record carried.
    published_overloaded: bool,
}

impl RecordPublisher {
    /// When the next publication is due, if one is.
    pub(crate) fn due(&self) -> Option<Millis> {
        self.due
    }

    /// Whether a publication is due at `now`.
    pub(crate) fn is_due(&self, now: Millis) -> bool {
        self.due.is_some_and(|d| now >= d)
    }

    /// Schedules a publication at `at` at the latest.
    pub(crate) fn at(&mut self, at: Millis) {
        self.due = Some(self.due.map_or(at, |d| d.min(at)));
    }

    /// Schedules a publication now, or when `period_ms` has passed since the last one.
    pub(crate) fn soon(&mut self, now: Millis, period_ms: Millis) {
        let at = now.max(self.last + period_ms);
        self.due = Some(self.due.map_or(at, |d| d.min(at)));
    }

    /// How far a load sample moved from the one last published (see [`LoadMove`]).
    pub(crate) fn load_move(
        &self,
        cfg: &ReplicaConfig,
        s: LoadSample,
        overloaded: bool,
    ) -> LoadMove {
        let d = cfg.load_delta_permille;
        let p = self.published_load;
        if overloaded != self.published_overloaded {
            return LoadMove::Verdict;
        }
        let moved = s
            .cpu_permille
            .abs_diff(p.cpu_permille)
            .max(s.mem_permille.abs_diff(p.mem_permille));
        if moved < d {
            return LoadMove::None;
        }
        LoadMove::Drift {
            large: moved >= d.saturating_mul(LARGE_DRIFT),
        }
    }

    /// The least time between publications of a load drift in a mesh of `nodes` known
    /// nodes: [`LOAD_DRIFT_SPACING_MS`] each, at least one `heartbeat_ms`, and for a `large`
    /// drift at most [`MAX_DRIFT_PERIOD_MS`].
    pub(crate) fn drift_period_ms(heartbeat_ms: Millis, nodes: usize, large: bool) -> Millis {
        let nodes = u64::try_from(nodes).unwrap_or(u64::MAX);
        let spaced = LOAD_DRIFT_SPACING_MS.saturating_mul(nodes);
        let capped = if large {
            spaced.min(MAX_DRIFT_PERIOD_MS)
        } else {
            spaced
        };
        capped.max(heartbeat_ms)
    }

    /// Publishes `me` at `now`: gives it a new version and the nearest peers by round trip,
    /// and returns the record to write. Clears any scheduled publication.
    pub(crate) fn publish(
        &mut self,
        now: Millis,
        me: &mut NodeRecord,
        rtt: &BTreeMap<NodeId, RttEstimate>,
    ) -> NodeRecord {
        self.due = None;
        self.last = now;
        self.published_load = me.load;
        self.published_overloaded = me.overloaded;
        me.seq += 1;
        me.written_at_ms = now;
        let mut nearest: Vec<(NodeId, u32)> = rtt
            .iter()
            .filter(|(id, _)| **id != me.id)
            .map(|(id, r)| (*id, r.srtt_ms()))
            .collect();
        nearest.sort_by_key(|(id, ms)| (*ms, *id));
        nearest.truncate(omesh_protocol::node::MAX_RTT_ENTRIES);
        me.rtt_ms = nearest;
        me.clone()
    }
}
