//! When this node publishes its own record: at once when it must (start, refutation, leaving,
//! a change of images), otherwise at most once a period, when something a peer ranks or
//! reaches it by moved (load past `load_delta_permille` or across a threshold, addresses), or
//! when a task it started long enough ago shows in its load (placement stops adding the
//! task's ask on top, see `placement::LOAD_LAG_MS`).
//! Liveness does not ride on the record (see `probe.rs`), so an unchanged node publishes nothing.

use std::collections::BTreeMap;

use omesh_protocol::{LoadSample, Millis, NodeId, NodeRecord};

use crate::config::ReplicaConfig;
use crate::liveness::RttEstimate;

/// The publication schedule of this node's record and what the last one said.
#[derive(Debug, Default)]
pub(crate) struct RecordPublisher {
    /// When a changed record is next published (rate-limited to one per `heartbeat_ms`).
    due: Option<Millis>,
    /// When the record was last published.
    last: Millis,
    /// The load the last published record carried.
    published_load: LoadSample,
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

    /// Schedules a publication now, or when one period has passed since the last one.
    pub(crate) fn soon(&mut self, now: Millis, heartbeat_ms: Millis) {
        let at = now.max(self.last + heartbeat_ms);
        self.due = Some(self.due.map_or(at, |d| d.min(at)));
    }

    /// Whether a load sample moved far enough from the one last published to publish again:
    /// by `load_delta_permille`, or across a threshold (which placement turns on).
    pub(crate) fn load_moved(&self, cfg: &ReplicaConfig, s: LoadSample) -> bool {
        let d = cfg.load_delta_permille;
        let over = |l: LoadSample| {
            l.cpu_permille >= u16::from(cfg.threshold_cpu) * 10
                || l.mem_permille >= u16::from(cfg.threshold_memory) * 10
        };
        let p = self.published_load;
        s.cpu_permille.abs_diff(p.cpu_permille) >= d
            || s.mem_permille.abs_diff(p.mem_permille) >= d
            || over(s) != over(p)
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
