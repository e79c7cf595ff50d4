//! Dialing: seeds with backoff, connections to live peers the replica knows, and the
//! listen addresses this node advertises.

use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use omesh_state::Input;
use tracing::{debug, warn};

use super::{admit, net, Peer};

/// A seed address, dialed with backoff until connected.
#[derive(Debug)]
pub(crate) struct Seed {
    pub(super) addr: Multiaddr,
    pub(super) peer: Option<PeerId>,
    pub(super) connected: bool,
    /// A first contact with it succeeded since it was last connected (see `admit`).
    pub(super) contacted: bool,
    pub(super) next_try: Instant,
    pub(super) backoff: Duration,
    /// Not a configured seed but a peer an earlier run knew (`<data_dir>/peers`): dialed
    /// only while this node is connected to nobody, and not counted as a seed for readiness.
    pub(super) remembered: bool,
    /// Connected at least once in this run.
    pub(super) reached: bool,
}

impl Seed {
    /// A seed to dial from now on.
    pub(super) fn new(addr: Multiaddr, peer: Option<PeerId>, remembered: bool) -> Self {
        Self {
            addr,
            peer,
            connected: false,
            contacted: false,
            next_try: Instant::now(),
            backoff: Duration::from_millis(500),
            remembered,
            reached: false,
        }
    }
}

impl Peer {
    /// Tells the replica the addresses others can dial: libp2p and the data plane.
    pub(super) fn advertise_addrs(&mut self) {
        let dialable = advertisable(&self.listen_addrs);
        let mut addrs: Vec<String> = dialable
            .iter()
            .map(|a| a.clone().with(Protocol::P2p(self.local_peer)).to_string())
            .collect();
        addrs.extend(self.images.advertised_addrs(&dialable));
        self.feed(Input::Addresses(addrs));
    }

    /// Dials every seed not connected whose backoff has passed.
    pub(super) fn dial_seeds(&mut self) {
        let now = Instant::now();
        // A peer connected to nobody has nothing better to do than find the mesh: its seeds
        // are retried every few seconds, not at the 30 s ceiling that early failures (a seed
        // still starting, a host under load) would otherwise reach within a minute.
        let lonely = self.swarm.connected_peers().next().is_none();
        let ceiling = if lonely {
            Duration::from_secs(4)
        } else {
            Duration::from_secs(30)
        };
        for i in 0..self.seeds.len() {
            let Some(seed) = self.seeds.get_mut(i) else {
                continue;
            };
            // A wait taken while connected does not hold once every connection is gone.
            seed.next_try = seed.next_try.min(now + ceiling);
            seed.backoff = seed.backoff.min(ceiling);
            // Once connected to anyone, the mesh's records say where everyone is: a seed
            // this node reached once is dialed again only when it is connected to nobody
            // (`trim_connections` closes an idle seed connection like any other).
            if seed.connected
                || ((seed.remembered || seed.reached) && !lonely)
                || now < seed.next_try
                || seed.peer.is_some_and(|p| self.blocked.contains(&p))
            {
                continue;
            }
            seed.next_try = now + seed.backoff;
            seed.backoff = (seed.backoff * 2).min(ceiling);
            let addr = seed.addr.clone();
            if self.gate.wants_first_contact() && !seed.contacted {
                // Show our certificate on its data plane first; the dial follows the answer.
                match admit::dataplane_addr_of(&addr) {
                    Some(dp) => self.start_contact(admit::ContactTarget::Seed(i), dp),
                    None => {
                        warn!(seed = %addr, "cannot derive the seed's data plane address (IP, UDP port + 1) for a first contact")
                    }
                }
                continue;
            }
            if let Err(e) = self.swarm.dial(addr.clone()) {
                warn!(seed = %addr, error = %e, "cannot dial seed; will retry");
            } else {
                debug!(seed = %addr, "dialing seed");
            }
        }
    }

    /// Keeps the addresses of the live peers in the data dir, for the next start to redial
    /// (a restarted seed has no seed of its own); rewritten only when they changed.
    pub(super) fn remember_peers(&mut self) {
        let now = self.driver.now();
        let mut addrs: Vec<String> = self
            .driver
            .replica()
            .live_peers(now)
            .filter(|n| n.id != self.node_id)
            .flat_map(|n| n.addrs.iter())
            .filter(|a| {
                a.parse::<Multiaddr>()
                    .is_ok_and(|m| m.iter().any(|p| matches!(p, Protocol::P2p(_))))
            })
            .cloned()
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() || addrs == self.remembered {
            return;
        }
        match self.dir.remember_peers(&addrs) {
            Ok(()) => self.remembered = addrs,
            Err(e) => debug!(error = %e, "cannot keep the peers' addresses"),
        }
    }

    /// Keeps `addr_book`, the addresses the live peers' records carry (the last ones known of
    /// peers since gone), so that a probe, sync or log request to a peer this node is not
    /// connected to dials it at once (each request carries them; libp2p's own cache would
    /// keep only 100 peers). Only after the records changed, at most every 2 s.
    pub(super) fn feed_peer_addresses(&mut self) {
        let applied = self.driver.replica().stats().deltas_applied;
        if applied == self.addrs_fed.0 || self.addrs_fed.1.elapsed() < Duration::from_secs(2) {
            return;
        }
        self.addrs_fed = (applied, Instant::now());
        let now = self.driver.now();
        let known: Vec<(PeerId, Vec<Multiaddr>)> = self
            .driver
            .replica()
            .live_peers(now)
            .filter(|n| n.id != self.node_id)
            .filter_map(|n| {
                let peer = net::peer_id_of(&n.id)?;
                let addrs = n
                    .addrs
                    .iter()
                    .filter_map(|a| a.parse::<Multiaddr>().ok())
                    // Its libp2p addresses carry its peer id (the data plane's do not).
                    .filter(|a| a.iter().any(|p| p == Protocol::P2p(peer)))
                    .map(|a| strip_p2p(&a))
                    .collect();
                Some((peer, addrs))
            })
            .collect();
        // Merged, not replaced: a peer judged gone keeps its last addresses, so that the
        // probes it still gets can reach it when it comes back.
        self.addr_book.extend(known);
        self.addr_book
            .retain(|peer, _| !self.blocked.contains(peer));
    }

    /// Keeps connections to up to `target_peers` live peers whose records give addresses,
    /// so that gossip does not hinge on the seed.
    pub(super) fn connect_known_peers(&mut self) {
        let connected = self.swarm.connected_peers().count();
        if connected >= self.cfg.target_peers {
            return;
        }
        let now = self.driver.now();
        let mut want = self.cfg.target_peers - connected;
        let candidates: Vec<(PeerId, Vec<Multiaddr>, Option<std::net::SocketAddr>)> = self
            .driver
            .replica()
            .live_peers(now)
            .filter_map(|n| {
                let peer = net::peer_id_of(&n.id)?;
                let addrs: Vec<Multiaddr> = n
                    .addrs
                    .iter()
                    .filter_map(|a| a.parse::<Multiaddr>().ok())
                    .collect();
                let dataplane = n
                    .addrs
                    .iter()
                    .find_map(|a| crate::images::dataplane::parse_blob_addr(a))
                    .or_else(|| addrs.iter().find_map(admit::dataplane_addr_of));
                Some((peer, addrs, dataplane))
            })
            .collect();
        for (peer, addrs, dataplane) in candidates {
            if want == 0 {
                break;
            }
            if self.swarm.is_connected(&peer) || addrs.is_empty() || self.blocked.contains(&peer) {
                continue;
            }
            if self.gate.wants_first_contact() {
                // It must know our certificate before it lets us in, and we its: contact
                // first, dial on the answer.
                if let Some(dp) = dataplane {
                    if self.may_contact_known(peer) {
                        self.start_contact(admit::ContactTarget::Known(peer, addrs), dp);
                        want -= 1;
                    }
                }
                continue;
            }
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(addrs)
                .build();
            if self.swarm.dial(opts).is_ok() {
                want -= 1;
            }
        }
    }

    /// Closes the connections nothing needs, down to `target_peers`: not to a neighbour of
    /// this node (`Replica::neighbours`: the peers it probes and syncs with), not in its
    /// gossip mesh, and unused for [`net::IDLE_CONNECTION`]. gossipsub keeps a stream open on
    /// every connection, so libp2p's own idle timeout never closes one: without this a node
    /// ends up connected to every peer it ever probed or was dialed by (the seed, to all),
    /// and its memory and keep-alive traffic grow with the mesh.
    pub(super) fn trim_connections(&mut self) {
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        let Some(mut spare) = connected.len().checked_sub(self.cfg.target_peers) else {
            return;
        };
        if spare == 0 {
            return;
        }
        let now = Instant::now();
        let mut keep: std::collections::HashSet<PeerId> = self
            .driver
            .replica()
            .neighbours(self.driver.now())
            .iter()
            .filter_map(net::peer_id_of)
            .collect();
        keep.extend(
            self.swarm
                .behaviour()
                .gossipsub
                .mesh_peers(&self.topic.hash())
                .copied(),
        );
        for peer in connected {
            if spare == 0 {
                break;
            }
            let recent = self
                .last_used
                .get(&peer)
                .is_some_and(|t| now.duration_since(*t) < net::IDLE_CONNECTION);
            if keep.contains(&peer) || recent {
                continue;
            }
            debug!(%peer, "closing an idle connection to a peer that is no neighbour");
            if self.swarm.disconnect_peer_id(peer).is_ok() {
                spare -= 1;
            }
        }
    }
}

/// The address without its `/p2p/…` part.
pub(super) fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

/// The listen addresses worth giving to others: dialable, each once, and loopback ones only
/// when there is nothing else (a mesh on one host); another host cannot reach 127.0.0.1.
fn advertisable(listen: &[Multiaddr]) -> Vec<Multiaddr> {
    let mut out: Vec<Multiaddr> = Vec::new();
    for a in listen.iter().filter(|a| is_dialable(a)) {
        if !out.contains(a) {
            out.push(a.clone());
        }
    }
    if out.iter().any(|a| !is_loopback(a)) {
        out.retain(|a| !is_loopback(a));
    }
    out
}

fn is_loopback(addr: &Multiaddr) -> bool {
    ips(addr).any(|ip| ip.is_loopback())
}

/// Whether an address is worth giving to others (not unspecified).
pub(super) fn is_dialable(addr: &Multiaddr) -> bool {
    !ips(addr).any(|ip| ip.is_unspecified())
}

/// The IP parts of a multiaddr.
fn ips(addr: &Multiaddr) -> impl Iterator<Item = std::net::IpAddr> + '_ {
    addr.iter().filter_map(|p| match p {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addrs(list: &[&str]) -> Vec<Multiaddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn advertised_addresses_are_deduplicated_and_leave_loopback_out_when_there_is_more() {
        let lan = "/ip4/10.0.0.7/udp/7001/quic-v1";
        let lo = "/ip4/127.0.0.1/udp/7001/quic-v1";
        let any = "/ip4/0.0.0.0/udp/7001/quic-v1";
        assert_eq!(advertisable(&addrs(&[lo, lan, lan, any])), addrs(&[lan]));
        // A mesh on one host has only loopback: it is kept, once.
        assert_eq!(advertisable(&addrs(&[lo, lo])), addrs(&[lo]));
        assert_eq!(
            advertisable(&addrs(&["/ip6/::1/udp/7001/quic-v1", any])),
            addrs(&["/ip6/::1/udp/7001/quic-v1"])
        );
        assert!(advertisable(&addrs(&[any])).is_empty());
    }
}
