//! Deltas in and out: this node's own changes, stamped, merged and batched for gossip; and
//! the deltas peers send, checked and merged one by one, with what each merge tells the
//! replica (a node heard from, a suspicion refuted, a lease changed, a gap in an origin's
//! stamps).

use omesh_protocol::codec::canonical_len;
use omesh_protocol::{Delta, DeltaBody, GossipMessage, Millis, NodeId, NodeRecord, Wire};

use super::Replica;
use crate::io::{Action, InputError, PropagationSample};
use crate::merge::{DeltaError, Merged, State};

/// Deltas per gossip message; a larger batch is split.
const MAX_DELTAS_PER_MESSAGE: usize = 64;

impl Replica {
    /// Makes a local change: stamps it, merges it, queues it for gossip.
    pub(crate) fn write(&mut self, now: Millis, body: DeltaBody) {
        self.next_counter += 1;
        let stamp = (self.cfg.incarnation << 32) | self.next_counter;
        let delta = Delta::signed(self.key.signing(), stamp, body);
        // Our own deltas satisfy every rule, so merging cannot fail; count it if it ever does.
        if let Err(e) = self.state.apply(&delta) {
            self.stats.rejections.count(e.reason());
        }
        self.vector.raise(self.me.id, stamp);
        if let DeltaBody::Node(rec) = &delta.body {
            self.state.hear(&rec.id, now);
        }
        self.pending.push(delta);
    }

    pub(super) fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let deltas = std::mem::take(&mut self.pending);
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        for d in deltas {
            let len = canonical_len(&d);
            if !batch.is_empty()
                && (batch.len() >= MAX_DELTAS_PER_MESSAGE
                    || bytes + len > GossipMessage::MAX_BYTES / 2)
            {
                self.outbox.push_back(Action::Publish(GossipMessage {
                    deltas: std::mem::take(&mut batch),
                }));
                bytes = 0;
            }
            bytes += len;
            batch.push(d);
        }
        self.outbox
            .push_back(Action::Publish(GossipMessage { deltas: batch }));
    }

    /// Merges deltas from a peer, one by one; a bad delta is counted and dropped.
    pub(super) fn ingest(
        &mut self,
        now: Millis,
        via: NodeId,
        deltas: &[Delta],
    ) -> Result<(), InputError> {
        let total = deltas.len();
        let mut rejected = 0usize;
        let mut forged = 0usize;
        let mut first: Option<DeltaError> = None;
        let mut progressed = false;
        for d in deltas {
            match self.ingest_one(now, d) {
                Ok(()) => {
                    progressed = true;
                    self.track_stamp(now, via, d.origin, d.stamp);
                }
                Err(e) => {
                    rejected += 1;
                    self.stats.rejections.count(e.reason());
                    if e.is_early() {
                        // Held back: the record, spec, lease or end it builds on may be in
                        // this very batch or the next. Its stamp is not taken into the
                        // version vector until it merges: a hostile node's held junk must
                        // not make this replica skip that node's real writes.
                        if self.early.hold(via, d.clone()) {
                            self.stats.early_dropped += 1;
                        }
                    } else if e.is_forgery() {
                        forged += 1;
                        // Report a forgery first: it is what the driver acts on.
                        if !first.as_ref().is_some_and(DeltaError::is_forgery) {
                            first = None;
                        }
                    }
                    first.get_or_insert(e);
                }
            }
        }
        if progressed {
            self.retry_early(now);
        }
        match first {
            None => Ok(()),
            Some(first) => Err(InputError::Rejected {
                rejected,
                forged,
                applied: total - rejected,
                total,
                first,
            }),
        }
    }

    fn ingest_one(&mut self, now: Millis, d: &Delta) -> Result<(), DeltaError> {
        if d.origin == self.me.id && d.stamp >> 32 >= self.cfg.incarnation {
            // Our own delta echoed back; we are its only writer.
            self.stats.deltas_unchanged += 1;
            return Ok(());
        }
        State::check(d)?;
        self.check_origin(d)?;
        if !self.verify.holds(d) {
            return Err(DeltaError::BadSignature {
                origin: d.origin.short(),
            });
        }
        match &d.body {
            DeltaBody::Spec(spec) => {
                let id = spec.id();
                let known = self.state.task(&id).is_some_and(|t| t.spec.is_some())
                    || self.state.tombstone(&id).is_some();
                if !known {
                    spec.verify(&self.cfg.authorized_submitters)?;
                }
            }
            DeltaBody::Cancel(c) if !self.may_cancel(c) => {
                return Err(DeltaError::CancelNotAuthorized {
                    task: c.task.short(),
                });
            }
            DeltaBody::Compact { end: Some(end), .. } => {
                // The evidence must hold on its own: its writer's signature, and for a
                // cancel the submitter's authority.
                let authorized = match &end.body {
                    DeltaBody::Cancel(c) => self.may_cancel(c),
                    _ => true,
                };
                if !authorized || !self.verify.holds(end) {
                    return Err(DeltaError::BadSignature {
                        origin: end.origin.short(),
                    });
                }
            }
            DeltaBody::Revoke(r) if !r.holds(&self.cfg.admission_keys) => {
                return Err(DeltaError::BadRevocation {
                    node: r.node.short(),
                });
            }
            _ => {}
        }
        let held = match &d.body {
            DeltaBody::Node(rec) => self.state.node(&rec.id).map(NodeRecord::version),
            _ => None,
        };
        match self.state.apply(d)? {
            Merged::Changed => {
                self.stats.deltas_applied += 1;
                match &d.body {
                    DeltaBody::Node(rec) => {
                        let newer = held.is_none_or(|v| rec.version() > v);
                        if newer {
                            self.quorum
                                .incarnation_seen(now, rec.id, rec.incarnation, rec.leaving);
                            self.state.hear(&rec.id, now);
                            self.sync.heard(now);
                            if self.suspicions.holds(&rec.id) {
                                // Refuted (or restarted): its leases hold again.
                                self.note_suspicion(now, rec.id);
                                self.mark_dirty(now);
                            }
                        }
                        if newer && self.propagation.len() < self.cfg.propagation_samples {
                            self.propagation.push(PropagationSample {
                                origin: rec.id,
                                seq: rec.seq,
                                written_at_ms: rec.written_at_ms,
                                merged_at_ms: now,
                            });
                        }
                    }
                    DeltaBody::Lease { .. } => {
                        self.stats.lease_changes += 1;
                        self.mark_dirty(now);
                    }
                    DeltaBody::Revoke(r) => {
                        self.suspicions.revoked(now, r.node);
                        self.mark_dirty(now);
                    }
                    DeltaBody::Suspect { node, .. } => {
                        if *node == self.me.id {
                            // Someone could not reach us: answer with a newer record, which
                            // supersedes the suspicion everywhere it spreads.
                            if !self.me.leaving {
                                self.stats.refutations += 1;
                                self.publish_record(now);
                            }
                        } else {
                            self.note_suspicion(now, *node);
                        }
                        self.mark_dirty(now);
                    }
                    _ => self.mark_dirty(now),
                }
            }
            Merged::Unchanged => self.stats.deltas_unchanged += 1,
            Merged::Tombstoned => self.stats.deltas_tombstoned += 1,
        }
        Ok(())
    }

    /// Tries the held-back deltas again, until a pass takes none.
    fn retry_early(&mut self, now: Millis) {
        while !self.early.is_empty() {
            let mut took = false;
            for (via, d) in self.early.take() {
                // What held it back, checked again first: map lookups, no signature check,
                // so a hold full of a hostile node's junk costs little per batch.
                let still = self
                    .check_origin(&d)
                    .and_then(|()| self.state.check_against(&d))
                    .is_err_and(|e| e.is_early());
                if still {
                    self.early.hold(via, d);
                    continue;
                }
                match self.ingest_one(now, &d) {
                    Ok(()) => {
                        took = true;
                        self.stats.early_applied += 1;
                        self.track_stamp(now, via, d.origin, d.stamp);
                    }
                    Err(e) if e.is_early() => {
                        self.early.hold(via, d);
                    }
                    Err(_) => {}
                }
            }
            if !took {
                return;
            }
        }
    }

    /// Who may write here at all: in a mesh with admission keys, a node whose record carries
    /// a certificate from one of them (a record brings its own), and never a revoked one.
    /// Cheap checks only; the signature is checked after.
    fn check_origin(&mut self, d: &Delta) -> Result<(), DeltaError> {
        if self.state.is_revoked(&d.origin) {
            return Err(DeltaError::Revoked {
                origin: d.origin.short(),
            });
        }
        if self.cfg.admission_keys.is_empty() {
            return Ok(());
        }
        let not_admitted = |why: String| DeltaError::NotAdmitted {
            origin: d.origin.short(),
            why,
        };
        if let DeltaBody::Node(rec) = &d.body {
            // A record brings its own certificate: one that does not admit it never will,
            // so it is refused for good (not held back to be tried again).
            let bad = |why: String| DeltaError::BadCertificate {
                origin: d.origin.short(),
                why,
            };
            let Some(cert) = &rec.cert else {
                return Err(bad("its record carries no admission certificate".into()));
            };
            if self.admitted.get(&rec.id) != Some(cert) {
                cert.verify_at_any_time(&rec.id, &self.cfg.admission_keys)
                    .map_err(|e| bad(e.to_string()))?;
                self.admitted.insert(rec.id, cert.clone());
            }
            return Ok(());
        }
        if !self.admitted.contains_key(&d.origin) {
            return Err(not_admitted(
                "no record of it with an admission certificate is held here".into(),
            ));
        }
        Ok(())
    }

    /// Advances the version vector, or notes a gap to close by sync.
    fn track_stamp(&mut self, now: Millis, via: NodeId, origin: NodeId, stamp: u64) {
        if self.vector.track(now, via, origin, stamp) {
            self.stats.gaps += 1;
            self.wake_at(now + self.cfg.gap_sync_ms);
        }
    }
}
