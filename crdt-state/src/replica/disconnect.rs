//! Disconnect policies, wired to the replica: per-task guard deadlines, when another node's
//! lease of a `stop_after` or `lost_after` task counts as lost, the at-most-once probes
//! (`quorum.rs`), and re-attaching to instances an earlier incarnation left running.

use std::collections::BTreeMap;

use omesh_protocol::{
    DeltaBody, Disconnect, Epoch, Lease, Millis, NodeId, Probe, TaskId, TaskState,
};

use super::Replica;
use crate::io::Action;
use crate::merge::TaskRecord;
use crate::quorum::{drifted, Wanted, ANSWER_PERIODS, PROMISE_QUIET_MS};

/// The disconnect policy of a task record (the default while its spec is unknown).
pub(crate) fn policy_of(rec: &TaskRecord) -> Disconnect {
    rec.spec
        .as_ref()
        .map(|s| s.value.spec.disconnect)
        .unwrap_or_default()
}

/// Whether the instances of a task with this policy outlive their node's restart (and are
/// kept through a graceful leave): `lost_after` without `stop_after`.
pub fn survives_restart(policy: &Disconnect) -> bool {
    policy.lost_after_ms.is_some() && policy.stop_after_ms.is_none()
}

impl Replica {
    /// The members a majority is counted over: every node record held here that has not
    /// announced leaving and is not revoked (this node included while it is not leaving).
    /// Silence never removes a member; only its own leave or a revocation does.
    pub fn members(&self) -> Vec<NodeId> {
        self.state
            .nodes()
            .filter(|n| !n.leaving && !self.state.is_revoked(&n.id))
            .map(|n| n.id)
            .collect()
    }

    /// The latest time (this node's clock) by which a majority of the members granted this
    /// node contact; `None` if no majority ever did since it started.
    pub fn majority_contact(&self, now: Millis) -> Option<Millis> {
        self.quorum
            .majority_contact(now, &self.me.id, &self.members())
    }

    /// The shortest `stop_after` this mesh can hold: majority contact lags by up to half the
    /// window plus a period (every member is pinged within half of it), and a claim needs it
    /// more than `lease_ttl_ms` from running out.
    pub fn min_stop_after(&self) -> Millis {
        2 * (self.cfg.lease_ttl_ms + self.cfg.heartbeat_ms) + self.cfg.heartbeat_ms
    }

    /// How long a poll or a confirmation waits for answers.
    pub(crate) fn answer_ms(&self) -> Millis {
        ANSWER_PERIODS * self.cfg.heartbeat_ms
    }

    /// How long after a poll's bound a `stop_after = d` lease counts as lost: `d` stretched by
    /// the drift of the owner's clock and of this one, plus the grace.
    pub(crate) fn stop_wait(&self, d: Millis) -> Millis {
        drifted(drifted(d)).saturating_add(self.cfg.lease_grace_ms)
    }

    /// Until when, on this node's clock, the instance of `task` this node runs may go on
    /// without another node being able to count its lease lost: the deadline its guard
    /// enforces (less the driver's margin).
    /// - default: [`Replica::leases_hold_until`];
    /// - `stop_after = D`: the majority contact + D (no majority: now);
    /// - `lost_after = L`: the last round trip + heartbeat + max(ttl, L) + grace, as the
    ///   default with ttl stretched to L; an instance left by an earlier incarnation and not
    ///   yet taken over: this incarnation's start + L (others count L from when they see it).
    pub fn instance_deadline(&self, now: Millis, task: &TaskId) -> Millis {
        let Some(rec) = self.state.task(task) else {
            return self.leases_hold_until(now);
        };
        let policy = policy_of(rec);
        if let Some(d) = policy.stop_after_ms {
            if self.me.leaving {
                return now;
            }
            return self
                .majority_contact(now)
                .map_or(now, |t| t.saturating_add(Millis::from(d)));
        }
        let Some(l) = policy.lost_after_ms.map(Millis::from) else {
            return self.leases_hold_until(now);
        };
        let adopted = self
            .tasks
            .get(task)
            .is_some_and(|r| r.phase == crate::runs::Phase::Adopted);
        if adopted {
            return self.started_at.saturating_add(l);
        }
        let window = self.cfg.heartbeat_ms + self.cfg.lease_ttl_ms.max(l) + self.cfg.lease_grace_ms;
        if self.members().len() <= 1 {
            return now.saturating_add(window);
        }
        self.round_trip
            .unwrap_or(self.started_at)
            .max(self.started_at)
            .saturating_add(window)
    }

    /// Whether `lease` of task `id` (record `rec`) still holds, as judged from here, under
    /// the task's disconnect policy (see [`Replica::lease_live`] for the default).
    pub(crate) fn lease_holds(
        &self,
        now: Millis,
        id: &TaskId,
        rec: &TaskRecord,
        lease: &Lease,
    ) -> bool {
        let policy = policy_of(rec);
        if policy.is_default() || lease.released || lease.owner == self.me.id {
            return self.lease_live(now, lease);
        }
        let Some(node) = self.state.node(&lease.owner) else {
            return false;
        };
        if self.state.is_revoked(&lease.owner) {
            return false;
        }
        if let Some(d) = policy.stop_after_ms {
            if node.incarnation > lease.incarnation {
                // Its guards ended its at-most-once instances when the old process died.
                return false;
            }
            let gone = self
                .quorum
                .gone_bound(&lease.owner, id, lease.epoch)
                .is_some_and(|b| now >= b.saturating_add(self.stop_wait(Millis::from(d))));
            return !gone
                || policy
                    .lost_after_ms
                    .is_some_and(|l| self.within_lost_after(now, lease, Millis::from(l)));
        }
        match policy.lost_after_ms {
            Some(l) => self.within_lost_after(now, lease, Millis::from(l)),
            None => self.lease_live(now, lease),
        }
    }

    /// Whether the owner of `lease` has been unreachable from here for less than `l`: not
    /// suspected, or suspected for less than max(ttl, l) + grace; restarted or leaving, seen
    /// so less than `l` ago.
    fn within_lost_after(&self, now: Millis, lease: &Lease, l: Millis) -> bool {
        let Some(node) = self.state.node(&lease.owner) else {
            return false;
        };
        // A leave counts for the incarnation that announced it, not for a lease the owner
        // wrote after it came back (its new record may not have arrived yet).
        if node.incarnation > lease.incarnation
            || (node.leaving && node.incarnation >= lease.incarnation)
        {
            return self
                .quorum
                .lapsed_since(&lease.owner, lease.incarnation)
                .is_some_and(|at| now < at.saturating_add(l));
        }
        match self.suspected_since(&lease.owner) {
            None => true,
            Some(at) => {
                let ttl = Millis::from(lease.ttl_ms).max(l);
                now < at.saturating_add(ttl + self.grace_ms(&lease.owner) + 1)
            }
        }
    }

    /// When a `lost_after` or `stop_after` lease of another node next needs a look.
    pub(crate) fn policy_wake(
        &self,
        id: &TaskId,
        rec: &TaskRecord,
        lease: &Lease,
    ) -> Option<Millis> {
        let policy = policy_of(rec);
        if let Some(d) = policy.stop_after_ms {
            if let Some(b) = self.quorum.gone_bound(&lease.owner, id, lease.epoch) {
                return Some(b.saturating_add(self.stop_wait(Millis::from(d))));
            }
            return self.quorum.poll_deadline(&lease.owner, self.answer_ms());
        }
        let l = Millis::from(policy.lost_after_ms?);
        if let Some(at) = self.quorum.lapsed_since(&lease.owner, lease.incarnation) {
            return Some(at.saturating_add(l));
        }
        let at = self.suspected_since(&lease.owner)?;
        let ttl = Millis::from(lease.ttl_ms).max(l);
        Some(at.saturating_add(ttl + self.grace_ms(&lease.owner) + 1))
    }

    /// Whether another node's at-most-once lease is lost by the default rule (the owner
    /// suspected past ttl + grace, or gone): time to poll the members about it.
    pub(crate) fn wants_poll(&self, now: Millis, rec: &TaskRecord, lease: &Lease) -> bool {
        policy_of(rec).stop_after_ms.is_some()
            && !lease.released
            && lease.owner != self.me.id
            && !self.lease_live(now, lease)
    }

    /// Polls the members about each owner in `wanted` (its at-most-once leases, and the
    /// shortest and longest window among them) that no poll covers yet.
    pub(crate) fn send_polls(&mut self, now: Millis, wanted: BTreeMap<NodeId, Wanted>) {
        if wanted.is_empty() {
            return;
        }
        let members = self.members();
        let answer = self.answer_ms();
        for (
            owner,
            Wanted {
                leases,
                shortest,
                longest,
            },
        ) in wanted
        {
            if !self.quorum.needs_poll(now, &owner, &leases, answer) {
                continue;
            }
            // A member says yes only if it has not heard the owner for half the shortest
            // window (an owner pings every member that often) plus two periods and the grace.
            let quiet = shortest / 2 + 2 * self.cfg.heartbeat_ms + self.cfg.lease_grace_ms;
            let hold = drifted(drifted(answer + self.stop_wait(longest))) + 1_000;
            let own = self.quorum.vote(
                now,
                owner,
                quiet,
                hold,
                self.started_at,
                self.state.heard(&owner),
            );
            let nonce = self.prober.next_nonce();
            let probe = Probe::Poll {
                nonce,
                about: owner,
                hold_ms: u32::try_from(hold).unwrap_or(u32::MAX),
                quiet_ms: u32::try_from(quiet).unwrap_or(u32::MAX),
            };
            for to in members.iter().filter(|m| **m != self.me.id && **m != owner) {
                self.stats.probes_sent += 1;
                self.outbox.push_back(Action::SendProbe { to: *to, probe });
            }
            self.stats.polls += 1;
            let n = members.len();
            self.quorum
                .poll_sent(now, owner, nonce, leases, (self.me.id, own), n);
            self.wake_at(now + answer);
        }
    }

    /// Asks every member to promise this node `epoch` of `task` (before it starts an
    /// at-most-once instance).
    pub(crate) fn send_confirm(&mut self, now: Millis, task: TaskId, epoch: Epoch) {
        let members = self.members();
        let lapsed = self.promise_lapsed(now, &task, epoch, &self.me.id);
        let own = self
            .quorum
            .promise(now, self.started_at, (task, epoch, self.me.id), lapsed);
        let nonce = self.prober.next_nonce();
        for to in members.iter().filter(|m| **m != self.me.id) {
            self.stats.probes_sent += 1;
            self.outbox.push_back(Action::SendProbe {
                to: *to,
                probe: Probe::Confirm { nonce, task, epoch },
            });
        }
        self.quorum
            .confirm_sent(now, task, epoch, nonce, (self.me.id, own), members.len());
        self.wake_at(now + self.answer_ms());
    }

    /// Whether the lease `claimant` would displace with `epoch` belongs to an owner this node
    /// does not suspect (or to this node, running it): then it promises nothing. A claimant
    /// that lost the owner for good got a majority of yes votes from members that suspect it,
    /// and those promise; one that merely has not heard of the lease yet (a node back from a
    /// minority side, asking above the epoch it was refused) is refused by the members that
    /// still hear the owner, instead of fencing a running instance.
    fn owner_still_here(
        &self,
        now: Millis,
        task: &TaskId,
        epoch: Epoch,
        claimant: &NodeId,
    ) -> bool {
        let Some(lease) = self
            .state
            .task(task)
            .and_then(|r| r.lease())
            .map(|l| l.value)
        else {
            return false;
        };
        if lease.released || lease.epoch >= epoch || lease.owner == *claimant {
            return false;
        }
        if lease.owner == self.me.id {
            return lease.incarnation == self.cfg.incarnation && self.tasks.owns(task);
        }
        self.health(now, &lease.owner) == crate::Health::Alive
    }

    /// Whether this node's promise of `epoch` of `task` to another claimant than `asker` may
    /// be given to `asker` instead: it was made [`PROMISE_QUIET_MS`] ago or more, no lease of
    /// that claimant at that epoch has arrived since, and this node hears the claimant (so its
    /// lease would have arrived had it written one: it gave the claim up, refused). A claimant
    /// this node does not hear may have started unseen, so its promise stands; and the epoch
    /// never moves past a promise without a lease, so a claimant refused one epoch cannot
    /// escape to the next while the first may be running.
    fn promise_lapsed(&self, now: Millis, task: &TaskId, epoch: Epoch, asker: &NodeId) -> bool {
        let Some((e, claimant, at)) = self.quorum.promised_to(task) else {
            return false;
        };
        e == epoch
            && claimant != *asker
            && now >= at.saturating_add(PROMISE_QUIET_MS)
            && self.health(now, &claimant) == crate::Health::Alive
            && self
                .state
                .task(task)
                .and_then(|r| r.leases.get(&epoch))
                .is_none_or(|l| l.value.owner != claimant)
    }

    /// The at-most-once probes and grants, before the prober sees the rest. Returns whether
    /// the probe was handled here.
    pub(crate) fn on_quorum_probe(&mut self, now: Millis, from: NodeId, probe: Probe) -> bool {
        let member = |r: &Self, id: &NodeId| {
            r.state
                .node(id)
                .is_some_and(|n| !n.leaving && !r.state.is_revoked(id))
        };
        match probe {
            Probe::Ack {
                nonce,
                about,
                grant,
            } => {
                let Some(sent) = self.quorum.contact_acked(nonce, from) else {
                    return false;
                };
                if about == from {
                    self.round_trip_at(sent);
                    if grant {
                        self.quorum.granted_by(from, sent);
                    }
                }
                true
            }
            Probe::Poll {
                nonce,
                about,
                hold_ms,
                quiet_ms,
            } => {
                if about != self.me.id && member(self, &from) {
                    // Only an owner this node itself suspects can be voted out here: a poll
                    // (say, a hostile member's) cannot make it withhold grants from an owner it
                    // hears.
                    let suspected = self.health(now, &about) != crate::Health::Alive;
                    let v = if suspected {
                        self.quorum.vote(
                            now,
                            about,
                            Millis::from(quiet_ms),
                            Millis::from(hold_ms),
                            self.started_at,
                            self.state.heard(&about),
                        )
                    } else {
                        crate::quorum::VoteAnswer { silent_ms: None }
                    };
                    self.outbox.push_back(Action::SendProbe {
                        to: from,
                        probe: Probe::Vote {
                            nonce,
                            about,
                            silent_ms: v.silent_ms,
                        },
                    });
                }
                true
            }
            Probe::Vote {
                nonce,
                about,
                silent_ms,
            } => {
                if member(self, &from)
                    && from != about
                    && self
                        .quorum
                        .voted(now, from, nonce, about, silent_ms, self.answer_ms())
                {
                    self.mark_dirty(now);
                }
                true
            }
            Probe::Confirm { nonce, task, epoch } => {
                if member(self, &from) {
                    let later = self
                        .state
                        .task(&task)
                        .is_some_and(|r| r.max_epoch() > epoch);
                    let ok = !later
                        && !self.owner_still_here(now, &task, epoch, &from)
                        && self.quorum.promise(
                            now,
                            self.started_at,
                            (task, epoch, from),
                            self.promise_lapsed(now, &task, epoch, &from),
                        );
                    self.outbox.push_back(Action::SendProbe {
                        to: from,
                        probe: Probe::Confirmed {
                            nonce,
                            task,
                            epoch,
                            ok,
                        },
                    });
                }
                true
            }
            Probe::Confirmed {
                nonce,
                task,
                epoch,
                ok,
            } => {
                if member(self, &from) {
                    self.quorum.confirmed(from, nonce, task, epoch, ok);
                    self.mark_dirty(now);
                }
                true
            }
            Probe::Ping { .. } | Probe::PingReq { .. } => false,
        }
    }

    /// The ack this node sends: it grants contact unless it voted the pinger out.
    pub(crate) fn grant_ack(&mut self, now: Millis, to: NodeId, probe: Probe) -> Probe {
        match probe {
            Probe::Ack {
                nonce,
                about,
                grant: true,
            } => {
                let grant = self.quorum.grants_to(&to, now);
                if grant {
                    self.quorum.gave(to, now);
                }
                Probe::Ack {
                    nonce,
                    about,
                    grant,
                }
            }
            other => other,
        }
    }

    /// Once per probe period, while this node runs or may claim at-most-once tasks: pings
    /// the members granted longest ago, so that every one is asked within half the
    /// shortest window.
    pub(crate) fn contact_tick(&mut self, now: Millis) {
        self.quorum
            .expire_contacts(now.saturating_sub(2 * self.cfg.heartbeat_ms));
        let Some(window) = self.contact_window else {
            return;
        };
        let members = self.members();
        let targets =
            self.quorum
                .contact_targets(&self.me.id, &members, self.cfg.heartbeat_ms, window);
        for to in targets {
            let nonce = self.prober.next_nonce();
            self.quorum.contact_sent(nonce, to, now);
            self.stats.probes_sent += 1;
            self.outbox.push_back(Action::SendProbe {
                to,
                probe: Probe::Ping { nonce },
            });
        }
    }

    /// An instance of an earlier incarnation runs here (see [`crate::Input::Adopt`]).
    pub(crate) fn adopt(&mut self, now: Millis, task: TaskId, epoch: Epoch) {
        if self.tasks.owns(&task) {
            return;
        }
        self.tasks.adopted(task, epoch);
        self.mark_dirty(now);
    }

    /// Takes an adopted instance over at a new epoch (synced; its lease, at `from`, is this
    /// node's of an earlier incarnation and still the current one).
    pub(crate) fn take_over_adopted(&mut self, now: Millis, task: TaskId, from: Epoch) {
        let Some(rec) = self.state.task(&task) else {
            return;
        };
        let Some(epoch) = rec.max_epoch().checked_add(1) else {
            return;
        };
        let score = rec.lease().map_or(0, |l| l.value.score);
        let lease = self.own_lease(epoch, score);
        self.write(now, DeltaBody::Lease { task, lease });
        self.tasks.restarted_as(&task, epoch);
        self.outbox
            .push_back(Action::AdoptTask { task, from, epoch });
        self.stats.adopted += 1;
        self.stats.claims += 1;
        self.report_running(now, task, epoch);
    }

    fn report_running(&mut self, now: Millis, task: TaskId, epoch: Epoch) {
        let entry = omesh_protocol::StatusEntry::new(TaskState::Running, None, "", now, self.me.id);
        self.write(now, DeltaBody::Status { task, epoch, entry });
    }
}
