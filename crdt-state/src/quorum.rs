//! At-most-once tasks (`stop_after`): majority contact, votes and confirmations, with no
//! master and no synchronised clocks. The argument is written out in the README ("Disconnect
//! policies"); in short:
//!
//! - **Members** are the node records held here that have not announced leaving and are not
//!   revoked. Records are never dropped for silence, so a suspicion (or a long death) never
//!   shrinks the membership; only an explicit leave or revocation does. A majority is more
//!   than half of the members.
//! - **Grants.** A node answers a ping with an ack that *grants* contact, unless it has voted
//!   the pinger out (below). An owner keeps, per peer, the send time of its latest ping that
//!   peer granted; the latest time by which a majority (itself included) granted it is its
//!   *majority contact*. Its guard stops each `stop_after = D` instance at majority contact + D
//!   (on its own clock). An owner of such tasks pings enough peers each period that every
//!   member is asked within D / 2.
//! - **Votes.** A node that would take over an at-most-once task of an owner it cannot reach
//!   polls every member. A member that has neither heard nor granted the owner for the poll's
//!   `quiet_ms` votes yes, saying how long since it last granted it, and from then withholds
//!   grants from the owner for the poll's `hold_ms`. With a majority of yes votes (its own
//!   included) the poller knows a bound on the owner's majority contact: any majority the owner
//!   could count overlaps the voters, and none of them granted it after its vote. It claims only
//!   once that bound + D (+ drift, + grace) has passed on its own clock.
//! - **Confirmations.** Before it writes the lease of an at-most-once epoch, a claimant asks
//!   every member to promise it that epoch; a member promises at most one claimant per task and
//!   epoch (and none for an epoch below one it promised). It writes the lease and starts only
//!   with a majority of promises, so two claimants of one epoch never both start, and a refused
//!   claim writes nothing that could fence a running instance.
//!
//! Every duration crosses between clocks only as a duration measured on one clock and bounded
//! with [`DRIFT_PPM`]; nothing compares two clocks' readings.

use std::collections::{BTreeMap, BTreeSet};

use omesh_protocol::{Epoch, Millis, NodeId, TaskId};

/// The clock rate difference assumed between any two nodes: 200 parts per million (a common
/// crystal's tolerance is 20–100 ppm).
pub const DRIFT_PPM: u64 = 200;

/// How long a poll or a confirmation waits for answers, in probe periods.
pub(crate) const ANSWER_PERIODS: u64 = 2;

/// A node promises nothing for this long after it starts: it does not remember what it
/// promised before it restarted, and a claim of the same epoch by two nodes is settled well
/// within it (the longest settle delay plus an answer wait).
pub(crate) const PROMISE_QUIET_MS: Millis = 8_000;

/// The longest a vote binds a voter to withhold grants (a poll asking for more gets this).
pub(crate) const MAX_HOLD_MS: Millis = 8 * 24 * 3_600_000;

/// The most extra contact pings sent per probe period.
const MAX_CONTACT_PINGS: usize = 16;

/// `d` stretched by the assumed drift (rounded up).
pub(crate) fn drifted(d: Millis) -> Millis {
    d.saturating_add((d.saturating_mul(DRIFT_PPM)).div_ceil(1_000_000))
}

/// More than half of `n`.
pub(crate) fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// At-most-once leases, by task and epoch.
pub(crate) type Leases = BTreeSet<(TaskId, Epoch)>;

/// The leases of one owner a poll is wanted for, with the shortest and longest window.
#[derive(Debug, Clone, Default)]
pub(crate) struct Wanted {
    pub(crate) leases: Leases,
    pub(crate) shortest: Millis,
    pub(crate) longest: Millis,
}

/// A poll about one owner.
#[derive(Debug, Clone)]
struct Poll {
    nonce: u64,
    sent_at: Millis,
    /// The at-most-once leases of the owner it covers.
    leases: BTreeSet<(TaskId, Epoch)>,
    /// Per yes voter, the latest time (this node's clock) it may have granted the owner.
    votes: BTreeMap<NodeId, Millis>,
    /// Members when it was sent.
    members: usize,
    /// Once a majority voted yes: the bound on the owner's majority contact.
    concluded: Option<Millis>,
}

/// A claimant's confirmation round for one epoch.
#[derive(Debug, Clone)]
struct Confirming {
    epoch: Epoch,
    nonce: u64,
    sent_at: Millis,
    promised: BTreeSet<NodeId>,
    members: usize,
}

/// This node's part in at-most-once tasks, as owner, witness, poller and claimant.
#[derive(Debug, Default)]
pub(crate) struct Quorum {
    /// Owner: per peer, when the latest ping it granted was sent.
    grants: BTreeMap<NodeId, Millis>,
    /// Owner: contact pings in flight, by nonce: (peer, sent at).
    contact: BTreeMap<u64, (NodeId, Millis)>,
    /// Owner: per peer, when a contact ping was last sent to it.
    asked: BTreeMap<NodeId, Millis>,
    /// Witness: when this node last granted each peer.
    granted: BTreeMap<NodeId, Millis>,
    /// Witness: peers voted out, and until when grants are withheld from them.
    withhold: BTreeMap<NodeId, Millis>,
    /// Witness: per task, the epoch and claimant promised, and when.
    promised: BTreeMap<TaskId, (Epoch, NodeId, Millis)>,
    /// Poller: the poll in flight (or the last one) per owner.
    polls: BTreeMap<NodeId, Poll>,
    /// Poller: concluded polls per owner: (bound, leases covered).
    results: BTreeMap<NodeId, Vec<(Millis, Leases)>>,
    /// Claimant: confirmation rounds per task.
    confirms: BTreeMap<TaskId, Confirming>,
    /// Per node, when each (incarnation, leaving) of its record was first seen here.
    reborn: BTreeMap<NodeId, BTreeMap<(u64, bool), Millis>>,
}

/// What a witness answers a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VoteAnswer {
    pub(crate) silent_ms: Option<u32>,
}

impl Quorum {
    // ---- owner ----

    /// `peer` granted the ping this node sent at `sent_at`.
    pub(crate) fn granted_by(&mut self, peer: NodeId, sent_at: Millis) {
        let e = self.grants.entry(peer).or_insert(sent_at);
        *e = (*e).max(sent_at);
    }

    /// The latest time by which a majority of `members` (this node, `me`, included) granted
    /// this node contact; `now` when it is the only member, `None` when no majority ever did.
    pub(crate) fn majority_contact(
        &self,
        now: Millis,
        me: &NodeId,
        members: &[NodeId],
    ) -> Option<Millis> {
        let need = majority(members.len().max(1)) - 1;
        if need == 0 {
            return Some(now);
        }
        let mut times: Vec<Millis> = members
            .iter()
            .filter(|m| *m != me)
            .filter_map(|m| self.grants.get(m).copied())
            .collect();
        if times.len() < need {
            return None;
        }
        times.sort_unstable_by(|a, b| b.cmp(a));
        Some(times[need - 1])
    }

    /// The peers to ping for contact this period: enough, among those neither granted nor
    /// asked for longest, that every member is asked within `window / 2`. Ordering by the
    /// later of the two (not by the grant alone) makes it a round: members that never answer
    /// (cut off, dead) take their turn and go to the back, rather than taking every slot
    /// while the reachable majority goes unasked.
    pub(crate) fn contact_targets(
        &self,
        me: &NodeId,
        members: &[NodeId],
        period: Millis,
        window: Millis,
    ) -> Vec<NodeId> {
        let others: Vec<&NodeId> = members.iter().filter(|m| *m != me).collect();
        if others.is_empty() {
            return Vec::new();
        }
        let periods = (window / 2 / period.max(1)).max(1);
        let per = usize::try_from(
            u64::try_from(others.len())
                .unwrap_or(u64::MAX)
                .div_ceil(periods),
        )
        .unwrap_or(MAX_CONTACT_PINGS)
        .min(MAX_CONTACT_PINGS);
        let in_flight: BTreeSet<NodeId> = self.contact.values().map(|(p, _)| *p).collect();
        let mut by_age: Vec<(Millis, NodeId)> = others
            .into_iter()
            .filter(|m| !in_flight.contains(*m))
            .map(|m| {
                let granted = self.grants.get(m).copied().unwrap_or(0);
                let asked = self.asked.get(m).copied().unwrap_or(0);
                (granted.max(asked), *m)
            })
            .collect();
        by_age.sort_unstable();
        by_age.into_iter().take(per).map(|(_, m)| m).collect()
    }

    /// A contact ping to `peer` went out.
    pub(crate) fn contact_sent(&mut self, nonce: u64, peer: NodeId, now: Millis) {
        self.contact.insert(nonce, (peer, now));
        self.asked.insert(peer, now);
    }

    /// An ack of a contact ping: `Some(sent_at)` when `nonce` was one sent to `from`.
    pub(crate) fn contact_acked(&mut self, nonce: u64, from: NodeId) -> Option<Millis> {
        match self.contact.get(&nonce) {
            Some((peer, sent)) if *peer == from => {
                let sent = *sent;
                self.contact.remove(&nonce);
                Some(sent)
            }
            _ => None,
        }
    }

    /// Forgets contact pings older than `before`.
    pub(crate) fn expire_contacts(&mut self, before: Millis) {
        self.contact.retain(|_, (_, sent)| *sent >= before);
    }

    // ---- witness ----

    /// Whether this node grants `peer` contact now (it has not voted it out).
    pub(crate) fn grants_to(&self, peer: &NodeId, now: Millis) -> bool {
        self.withhold.get(peer).is_none_or(|until| now >= *until)
    }

    /// This node granted `peer` contact now.
    pub(crate) fn gave(&mut self, peer: NodeId, now: Millis) {
        self.granted.insert(peer, now);
    }

    /// Answers a poll about `about`: yes (with how long since this node last granted it)
    /// when this node has neither heard nor granted it for `quiet_ms`, and then withholds
    /// grants from it for `hold_ms`. `started` is when this replica started (it knows nothing
    /// of grants before), `heard` when it last heard `about` directly.
    pub(crate) fn vote(
        &mut self,
        now: Millis,
        about: NodeId,
        quiet_ms: Millis,
        hold_ms: Millis,
        started: Millis,
        heard: Option<Millis>,
    ) -> VoteAnswer {
        let granted = self
            .granted
            .get(&about)
            .copied()
            .unwrap_or(started)
            .max(started);
        let last = heard.map_or(granted, |h| h.max(granted));
        if now.saturating_sub(last) < quiet_ms {
            return VoteAnswer { silent_ms: None };
        }
        let until = now.saturating_add(hold_ms.min(MAX_HOLD_MS));
        let e = self.withhold.entry(about).or_insert(until);
        *e = (*e).max(until);
        let silent = u32::try_from(now.saturating_sub(granted)).unwrap_or(u32::MAX);
        VoteAnswer {
            silent_ms: Some(silent),
        }
    }

    /// The epoch, claimant and time of this node's promise about `task`, if any.
    pub(crate) fn promised_to(&self, task: &TaskId) -> Option<(Epoch, NodeId, Millis)> {
        self.promised.get(task).copied()
    }

    /// Answers a claimant's request to promise it `epoch` of `task`: yes unless this node
    /// promised that epoch to another claimant (and that promise has not `lapsed`: see
    /// `Replica::promise_lapsed`), or a later one, or started less than
    /// [`PROMISE_QUIET_MS`] ago. A refused claim writes nothing, so a claimant asks the same
    /// epoch again; without lapsing, two claimants whose promises split would be refused
    /// forever.
    pub(crate) fn promise(
        &mut self,
        now: Millis,
        started: Millis,
        (task, epoch, claimant): (TaskId, Epoch, NodeId),
        lapsed: bool,
    ) -> bool {
        if now < started.saturating_add(PROMISE_QUIET_MS) {
            return false;
        }
        match self.promised.get(&task) {
            Some((e, _, _)) if *e > epoch => false,
            Some((e, c, _)) if *e == epoch && *c != claimant && !lapsed => false,
            Some((e, c, at)) if *e == epoch && *c == claimant => {
                let at = *at;
                self.promised.insert(task, (epoch, claimant, at));
                true
            }
            _ => {
                self.promised.insert(task, (epoch, claimant, now));
                true
            }
        }
    }

    // ---- poller ----

    /// Whether a poll about `owner` is wanted for `leases`: none in flight that covers them,
    /// none concluded that covers them, and the last one sent at least `retry_ms` ago.
    pub(crate) fn needs_poll(
        &self,
        now: Millis,
        owner: &NodeId,
        leases: &BTreeSet<(TaskId, Epoch)>,
        retry_ms: Millis,
    ) -> bool {
        let covered = |l: &(TaskId, Epoch)| {
            self.results
                .get(owner)
                .is_some_and(|r| r.iter().any(|(_, ls)| ls.contains(l)))
        };
        if leases.iter().all(covered) {
            return false;
        }
        match self.polls.get(owner) {
            Some(p) if p.concluded.is_none() => now >= p.sent_at.saturating_add(retry_ms),
            Some(p) => now >= p.sent_at.saturating_add(retry_ms) || !leases.iter().all(covered),
            None => true,
        }
    }

    /// A poll about `owner` was sent to every other member; `own` is this node's own vote
    /// (already cast), `members` the number of members.
    pub(crate) fn poll_sent(
        &mut self,
        now: Millis,
        owner: NodeId,
        nonce: u64,
        leases: Leases,
        (me, own): (NodeId, VoteAnswer),
        members: usize,
    ) {
        let mut poll = Poll {
            nonce,
            sent_at: now,
            leases,
            votes: BTreeMap::new(),
            members,
            concluded: None,
        };
        if let Some(silent) = own.silent_ms {
            poll.votes
                .insert(me, now.saturating_sub(Millis::from(silent)));
        }
        self.polls.insert(owner, poll);
        self.conclude(&owner);
    }

    /// A vote from `voter` (a member) about `about`, received now: counted when it answers
    /// the poll in flight within `answer_ms`. Returns whether the poll concluded with it.
    pub(crate) fn voted(
        &mut self,
        now: Millis,
        voter: NodeId,
        nonce: u64,
        about: NodeId,
        silent_ms: Option<u32>,
        answer_ms: Millis,
    ) -> bool {
        let Some(poll) = self.polls.get_mut(&about) else {
            return false;
        };
        if poll.nonce != nonce || poll.concluded.is_some() || now > poll.sent_at + answer_ms {
            return false;
        }
        let Some(silent) = silent_ms else {
            return false;
        };
        // The voter measured `silent` on its clock, which may run fast: the real time since its
        // last grant is at least silent less the drift; that grant was no later than this.
        let silent = Millis::from(silent);
        let real = silent.saturating_sub(silent.saturating_mul(DRIFT_PPM).div_ceil(1_000_000));
        poll.votes.insert(voter, now.saturating_sub(real));
        self.conclude(&about)
    }

    fn conclude(&mut self, owner: &NodeId) -> bool {
        let Some(poll) = self.polls.get_mut(owner) else {
            return false;
        };
        let need = majority(poll.members.max(1));
        if poll.concluded.is_some() || poll.votes.len() < need {
            return false;
        }
        let mut bounds: Vec<Millis> = poll.votes.values().copied().collect();
        bounds.sort_unstable();
        // Any `need` yes voters make a majority the owner's must overlap: the earliest such
        // set gives the earliest safe bound.
        let bound = bounds[need - 1];
        poll.concluded = Some(bound);
        self.results
            .entry(*owner)
            .or_default()
            .push((bound, poll.leases.clone()));
        true
    }

    /// When, on this node's clock, `owner`'s instance of `(task, epoch)` is known gone: the
    /// earliest concluded poll covering it, `Some(bound)` (the caller adds the task's window).
    pub(crate) fn gone_bound(&self, owner: &NodeId, task: &TaskId, epoch: Epoch) -> Option<Millis> {
        self.results.get(owner).and_then(|r| {
            r.iter()
                .filter(|(_, ls)| ls.contains(&(*task, epoch)))
                .map(|(b, _)| *b)
                .min()
        })
    }

    /// When the poll in flight about `owner` times out, if one is in flight.
    pub(crate) fn poll_deadline(&self, owner: &NodeId, answer_ms: Millis) -> Option<Millis> {
        self.polls
            .get(owner)
            .filter(|p| p.concluded.is_none())
            .map(|p| p.sent_at + answer_ms)
    }

    // ---- claimant ----

    /// A confirmation round for `epoch` of `task` was sent; `own` is this node's own promise.
    pub(crate) fn confirm_sent(
        &mut self,
        now: Millis,
        task: TaskId,
        epoch: Epoch,
        nonce: u64,
        (me, own): (NodeId, bool),
        members: usize,
    ) {
        let mut promised = BTreeSet::new();
        if own {
            promised.insert(me);
        }
        self.confirms.insert(
            task,
            Confirming {
                epoch,
                nonce,
                sent_at: now,
                promised,
                members,
            },
        );
    }

    /// A member's answer to a confirmation request.
    pub(crate) fn confirmed(
        &mut self,
        from: NodeId,
        nonce: u64,
        task: TaskId,
        epoch: Epoch,
        ok: bool,
    ) {
        if let Some(c) = self
            .confirms
            .get_mut(&task)
            .filter(|c| c.nonce == nonce && c.epoch == epoch)
        {
            if ok {
                c.promised.insert(from);
            }
        }
    }

    /// Where the confirmation of `epoch` of `task` stands: `None` if none was sent,
    /// `Some(Ok(()))` once a majority promised, `Some(Err(sent_at))` while it waits.
    pub(crate) fn confirmation(&self, task: &TaskId, epoch: Epoch) -> Option<Result<(), Millis>> {
        let c = self.confirms.get(task).filter(|c| c.epoch == epoch)?;
        if c.promised.len() >= majority(c.members.max(1)) {
            Some(Ok(()))
        } else {
            Some(Err(c.sent_at))
        }
    }

    /// Forgets the confirmation round of `task`.
    pub(crate) fn forget_confirm(&mut self, task: &TaskId) {
        self.confirms.remove(task);
    }

    // ---- lost_after ----

    /// A record of `node` at `incarnation` (announcing a leave or not) merged now: notes
    /// when each such version was first seen.
    pub(crate) fn incarnation_seen(
        &mut self,
        now: Millis,
        node: NodeId,
        incarnation: u64,
        leaving: bool,
    ) {
        let seen = self.reborn.entry(node).or_default();
        seen.entry((incarnation, leaving)).or_insert(now);
        while seen.len() > 8 {
            seen.pop_first();
        }
    }

    /// When this replica first saw `node` restarted past `incarnation`, or leaving at it.
    pub(crate) fn lapsed_since(&self, node: &NodeId, incarnation: u64) -> Option<Millis> {
        self.reborn
            .get(node)?
            .range((incarnation, true)..)
            .map(|(_, at)| *at)
            .min()
    }

    /// Drops what concerns tasks no longer held (`held` says which are).
    pub(crate) fn retain_tasks(&mut self, held: impl Fn(&TaskId) -> bool) {
        self.promised.retain(|t, _| held(t));
        self.confirms.retain(|t, _| held(t));
        for r in self.results.values_mut() {
            for (_, ls) in r.iter_mut() {
                ls.retain(|(t, _)| held(t));
            }
            r.retain(|(_, ls)| !ls.is_empty());
        }
        self.results.retain(|_, r| !r.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u8) -> NodeId {
        NodeId([i; 32])
    }

    #[test]
    fn majority_contact_is_the_grant_a_majority_reached() {
        let mut q = Quorum::default();
        let members = [n(1), n(2), n(3), n(4), n(5)];
        // Alone among five: no majority yet.
        assert_eq!(q.majority_contact(100, &n(1), &members), None);
        q.granted_by(n(2), 10);
        assert_eq!(q.majority_contact(100, &n(1), &members), None);
        q.granted_by(n(3), 30);
        q.granted_by(n(4), 20);
        // Me + the two latest (30, 20) make three of five: contact as of 20.
        assert_eq!(q.majority_contact(100, &n(1), &members), Some(20));
        assert_eq!(q.majority_contact(100, &n(1), &[n(1)]), Some(100));
    }

    /// 18 members, 6 of them cut off (they never answer): with a 10 s window and 500 ms
    /// periods, the contact pings still reach each of the 11 reachable peers within 5 s, so
    /// the owner's majority contact stays fresh. Ordered by grant age alone, the six silent
    /// peers took every slot and the reachable ones went unasked (netsim `disc_partition`
    /// stopped majority-side owners' instances).
    #[test]
    fn silent_members_do_not_starve_the_reachable_ones_of_contact_pings() {
        let mut q = Quorum::default();
        let members: Vec<NodeId> = (0..18).map(n).collect();
        let me = n(0);
        let silent = |p: &NodeId| p.0[0] >= 12;
        let (period, window) = (500, 10_000);
        let mut nonce = 0;
        let mut last_grant: BTreeMap<NodeId, Millis> = BTreeMap::new();
        for k in 0..200u64 {
            let now = 1_000 + k * period;
            q.expire_contacts(now.saturating_sub(2 * period));
            for to in q.contact_targets(&me, &members, period, window) {
                nonce += 1;
                q.contact_sent(nonce, to, now);
                if !silent(&to) {
                    // Answered within the period, granted.
                    let sent = q.contact_acked(nonce, to).expect("a ping in flight");
                    q.granted_by(to, sent);
                    last_grant.insert(to, now);
                }
            }
            if now >= 1_000 + window {
                for m in members.iter().filter(|m| **m != me && !silent(m)) {
                    let at = last_grant.get(m).copied().unwrap_or(0);
                    assert!(now - at <= window / 2, "{m:?} unasked since {at} at {now}");
                }
                let contact = q
                    .majority_contact(now, &me, &members)
                    .expect("a majority granted");
                assert!(now - contact <= window / 2, "contact {contact} at {now}");
            }
        }
    }

    #[test]
    fn a_vote_withholds_grants_and_counts_from_the_last_grant() {
        let mut q = Quorum::default();
        q.gave(n(9), 1_000);
        // Heard 500 ms ago: no vote.
        assert_eq!(
            q.vote(3_000, n(9), 1_000, 5_000, 0, Some(2_500)).silent_ms,
            None
        );
        assert!(q.grants_to(&n(9), 3_000));
        let v = q.vote(3_000, n(9), 1_000, 5_000, 0, Some(1_000));
        assert_eq!(v.silent_ms, Some(2_000));
        assert!(!q.grants_to(&n(9), 7_999));
        assert!(q.grants_to(&n(9), 8_000));
    }

    #[test]
    fn one_promise_per_task_and_epoch() {
        let mut q = Quorum::default();
        let t = TaskId([7; 32]);
        assert!(!q.promise(100, 0, (t, 1, n(1)), false), "quiet after start");
        let now = PROMISE_QUIET_MS;
        assert!(q.promise(now, 0, (t, 1, n(1)), false));
        assert!(
            q.promise(now, 0, (t, 1, n(1)), false),
            "the same claimant again"
        );
        assert!(!q.promise(now, 0, (t, 1, n(2)), false));
        assert!(q.promise(now, 0, (t, 1, n(2)), true), "a lapsed promise");
        assert!(q.promise(now, 0, (t, 2, n(2)), false));
        assert!(
            !q.promise(now, 0, (t, 1, n(1)), true),
            "an epoch below one promised"
        );
    }

    #[test]
    fn a_poll_concludes_on_a_majority_with_the_earliest_safe_bound() {
        let mut q = Quorum::default();
        let owner = n(9);
        let leases: BTreeSet<(TaskId, Epoch)> = [(TaskId([1; 32]), 3)].into();
        q.poll_sent(
            10_000,
            owner,
            42,
            leases,
            (
                n(1),
                VoteAnswer {
                    silent_ms: Some(4_000),
                },
            ),
            5,
        );
        assert_eq!(q.gone_bound(&owner, &TaskId([1; 32]), 3), None);
        assert!(
            !q.voted(10_100, n(2), 41, owner, Some(1_000), 1_000),
            "wrong nonce"
        );
        assert!(!q.voted(10_100, n(2), 42, owner, None, 1_000), "no vote");
        assert!(!q.voted(10_100, n(2), 42, owner, Some(5_000), 1_000));
        assert!(q.voted(10_200, n(3), 42, owner, Some(2_000), 1_000));
        // Bounds: me 6,000; n2 ≈ 5,101; n3 ≈ 8,201: the third smallest is n3's.
        let b = q.gone_bound(&owner, &TaskId([1; 32]), 3).unwrap_or(0);
        assert!((8_200..=8_201).contains(&b), "{b}");
    }
}
