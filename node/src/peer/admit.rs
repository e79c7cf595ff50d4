//! Admission in the peer loop: first contacts (both sides), the libp2p allow list, and the
//! refusal counter. The rules themselves are `crate::admission::Gate`'s.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use omesh_protocol::NodeId;
use tracing::{debug, info, warn};

use super::Peer;
use crate::images::dataplane::contact::{self, Answer};
use crate::images::dataplane::DataPlaneError;

/// Whom a first contact is for, and what to dial once it succeeds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum ContactTarget {
    /// Seed number `i` (its libp2p address is dialed).
    Seed(usize),
    /// A peer known from its record, dialed at these addresses.
    Known(PeerId, Vec<Multiaddr>),
}

/// How a first contact ended.
#[derive(Debug)]
pub(crate) struct ContactResult {
    pub(crate) target: ContactTarget,
    pub(crate) outcome: Result<(PeerId, Answer), DataPlaneError>,
}

/// How long before a peer known from its record is contacted again after a try.
const KNOWN_RETRY: Duration = Duration::from_secs(10);
/// A refused peer is named in a warning at most this often (it retries every few seconds).
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(60);

/// Whether a warning naming `key` is due: at most once per `REFUSAL_WARN_EVERY` for each
/// key, remembered in `warned` (kept bounded: past entries go once it holds 4,096).
pub(crate) fn warn_due(warned: &mut HashMap<PeerId, Instant>, key: PeerId) -> bool {
    let now = Instant::now();
    if warned.len() > 4096 {
        warned.retain(|_, t| *t > now);
    }
    match warned.get(&key) {
        Some(t) if *t > now => false,
        _ => {
            warned.insert(key, now + REFUSAL_WARN_EVERY);
            true
        }
    }
}

/// The data plane address of a libp2p QUIC address: same IP, UDP port + 1.
pub(crate) fn dataplane_addr_of(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut ip = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Udp(p) => port = Some(p),
            _ => {}
        }
    }
    Some(SocketAddr::new(ip?, port?.checked_add(1)?))
}

impl Peer {
    /// Whether `peer` may connect and be heard: not blocked by the operator, admitted (or
    /// the mesh is open) and in `allowed_peers` (if set).
    pub(crate) fn permits(&self, peer: &PeerId) -> bool {
        !self.blocked.contains(peer) && self.gate.permits(peer)
    }

    /// Whether the replicated state revoked `node`.
    pub(crate) fn is_revoked(&self, node: &NodeId) -> bool {
        self.driver.replica().state().is_revoked(node)
    }

    /// Counts a refused connection or first contact; whether to warn about `peer` now (at
    /// most once per `REFUSAL_WARN_EVERY` for each peer; the count is exact).
    pub(crate) fn count_refused(&mut self, reason: &str, peer: Option<PeerId>) -> bool {
        if let Ok(m) = self.metrics.lock() {
            m.refused(reason);
        }
        self.may_warn_about(peer.unwrap_or(self.local_peer))
    }

    /// Whether a refusal warning may name `peer` now: at most once per `REFUSAL_WARN_EVERY`.
    fn may_warn_about(&mut self, key: PeerId) -> bool {
        warn_due(&mut self.refusal_warned, key)
    }

    /// Re-derives the admitted set (expiry, revocations, certificates in node records) and
    /// brings the libp2p allow list and the data plane in line. Called after the replica
    /// changes and from housekeeping.
    pub(crate) fn refresh_admitted(&mut self) {
        if self.gate.is_open() {
            return;
        }
        let now = self.driver.now();
        let state = self.driver.replica().state();
        let records = state
            .nodes()
            .filter_map(|n| n.cert.as_ref().map(|c| (n.id, c)));
        let changed = self.gate.refresh(records, now, |n| state.is_revoked(n));
        if changed {
            self.sync_allow_list();
        }
    }

    /// Makes libp2p's allow list what the gate says; a peer taken off it is disconnected.
    pub(crate) fn sync_allow_list(&mut self) {
        let Some(want) = self.gate.allow_list() else {
            return;
        };
        let want: HashSet<PeerId> = want
            .into_iter()
            .filter(|p| !self.blocked.contains(p))
            .collect();
        let Some(allow) = self.swarm.behaviour_mut().allow.as_mut() else {
            return;
        };
        let have: Vec<PeerId> = allow.allowed_peers().iter().copied().collect();
        for p in have {
            if !want.contains(&p) {
                info!(peer = %p, "peer no longer admitted; disconnecting");
                allow.disallow_peer(p);
            }
        }
        for p in want {
            allow.allow_peer(p);
        }
    }

    /// The server side of a first contact: judge the certificate, allow the peer, answer.
    pub(crate) fn on_contact_request(&mut self, req: contact::Request) {
        let now = self.driver.now();
        let peer = req.peer;
        let verdict = if self.blocked.contains(&peer) {
            Err(crate::admission::Refusal {
                reason: "not_allowed_peer",
                detail: format!("peer {peer} is blocked"),
            })
        } else {
            self.gate
                .judge(&peer, req.hello.cert.as_ref(), now, |n| self.is_revoked(n))
        };
        let answer = match verdict {
            Ok(()) => {
                if let Some(cert) = req.hello.cert.filter(|_| !self.gate.is_open()) {
                    self.gate.admit(peer, cert);
                }
                self.sync_allow_list();
                info!(%peer, "admitted a peer at first contact");
                Answer::Admitted {
                    cert: self.gate.own_cert().cloned(),
                }
            }
            Err(r) => {
                if self.count_refused(r.reason, Some(peer)) {
                    warn!(%peer, reason = r.reason, detail = %r.detail, "refused a peer at first contact");
                } else {
                    debug!(%peer, reason = r.reason, "refused a peer at first contact");
                }
                Answer::Refused {
                    reason: r.reason.into(),
                    detail: r.detail,
                }
            }
        };
        // The allow list holds the peer before it learns it may dial.
        let _ = req.answer.send(answer);
    }

    /// Starts a first contact with `target` at the data plane address `addr`.
    pub(crate) fn start_contact(&mut self, target: ContactTarget, addr: SocketAddr) {
        if !self.contacting.insert(target.clone()) {
            return;
        }
        let endpoint = self.images.endpoint().clone();
        let key = self.key.clone();
        let cert = self.gate.own_cert().cloned();
        let results = self.contact_results_tx.clone();
        tokio::spawn(async move {
            let outcome = contact::first_contact(&endpoint, &key, addr, cert).await;
            // The loop owns the receiver for as long as it runs.
            let _ = results.send(ContactResult { target, outcome }).await;
        });
    }

    /// The client side of a first contact ended: on success allow and dial the peer.
    pub(crate) fn on_contact_result(&mut self, res: ContactResult) {
        self.contacting.remove(&res.target);
        let (peer, answer) = match res.outcome {
            Ok(x) => x,
            Err(e) => {
                debug!(target = ?res.target, error = %e, "first contact failed; will retry");
                return;
            }
        };
        let cert = match answer {
            Answer::Refused { reason, detail } => {
                if self.may_warn_about(peer) {
                    warn!(%peer, %reason, %detail, "the peer refused this node's admission; not dialing it");
                } else {
                    debug!(%peer, %reason, "the peer refused this node's admission");
                }
                return;
            }
            Answer::Admitted { cert } => cert,
        };
        let now = self.driver.now();
        if let ContactTarget::Known(expected, _) = &res.target {
            if *expected != peer {
                warn!(%peer, %expected, "another peer answered at a known peer's data plane address");
                return;
            }
        }
        if let Err(r) = self
            .gate
            .judge(&peer, cert.as_ref(), now, |n| self.is_revoked(n))
        {
            if self.count_refused(r.reason, Some(peer)) {
                warn!(%peer, reason = r.reason, detail = %r.detail, "a peer admitted this node but is not admitted itself; not dialing it");
            }
            return;
        }
        if let Some(cert) = cert.filter(|_| !self.gate.is_open()) {
            self.gate.admit(peer, cert);
        }
        self.sync_allow_list();
        match res.target {
            ContactTarget::Seed(i) => {
                let Some(seed) = self.seeds.get_mut(i) else {
                    return;
                };
                seed.contacted = true;
                seed.peer = Some(peer);
                let addr = seed.addr.clone();
                let addr = if addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
                    addr
                } else {
                    addr.with(Protocol::P2p(peer))
                };
                debug!(%peer, seed = %addr, "first contact done; dialing the seed");
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    warn!(seed = %addr, error = %e, "cannot dial seed; will retry");
                }
            }
            ContactTarget::Known(peer, addrs) => {
                let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    debug!(%peer, error = %e, "cannot dial a known peer");
                }
            }
        }
    }

    /// Whether a first contact with the known `peer` may start now (one per `KNOWN_RETRY`).
    pub(crate) fn may_contact_known(&mut self, peer: PeerId) -> bool {
        let now = Instant::now();
        match self.next_known_contact.get(&peer) {
            Some(t) if *t > now => false,
            _ => {
                self.next_known_contact.insert(peer, now + KNOWN_RETRY);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_data_plane_of_a_seed_is_the_next_port() {
        let a: Multiaddr = "/ip4/10.0.0.1/udp/7001/quic-v1".parse().unwrap();
        assert_eq!(
            dataplane_addr_of(&a),
            Some("10.0.0.1:7002".parse().unwrap())
        );
        let a: Multiaddr = "/ip4/10.0.0.1/udp/65535/quic-v1".parse().unwrap();
        assert_eq!(dataplane_addr_of(&a), None);
    }
}
