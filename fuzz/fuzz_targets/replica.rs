//! A replica fed hostile input: the bytes are a sequence of gossip messages, sync requests
//! and replies, probes and ticks, from a few peers, decoded with the wire codec. Signatures
//! are taken as valid (as from an admitted node that signs whatever it sends), so what runs is
//! every writer rule, the hold-back of early deltas, merging, the version vector and the
//! decisions. A panic anywhere, or a replica that stops answering, is a bug.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use omesh_protocol::{GossipMessage, NodeId, Probe, SyncReply, SyncRequest, Wire};
use omesh_state::{Input, NodeKey, Replica, ReplicaConfig, Verify};

/// Takes every signature as valid.
#[derive(Debug)]
struct Trusting;

impl Verify for Trusting {
    fn holds(&self, _: &omesh_protocol::Delta) -> bool {
        true
    }
}

fuzz_target!(|data: &[u8]| {
    let key = NodeKey::from_bytes(&[1; 32]);
    let mut cfg = ReplicaConfig::for_node(key.id());
    cfg.authorized_submitters.insert([2; 32]);
    let Ok(mut r) = Replica::new(cfg, key) else {
        return;
    };
    r.set_verifier(Arc::new(Trusting));
    let mut now = 0u64;
    let _ = r.handle(now, Input::Tick);
    let mut rest = data;
    while rest.len() > 3 {
        let kind = rest[0];
        let from = NodeId([rest[1] % 4 + 10; 32]);
        let len = usize::from(rest[2]) * 8 + 1;
        let (chunk, tail) = rest[3..].split_at(len.min(rest.len() - 3));
        rest = tail;
        now += u64::from(kind & 0x0f) * 100;
        let input = match kind % 5 {
            0 => GossipMessage::from_wire(chunk)
                .ok()
                .map(|msg| Input::Gossip { via: from, msg }),
            1 => SyncReply::from_wire(chunk)
                .ok()
                .map(|reply| Input::SyncReply { from, reply }),
            2 => SyncRequest::from_wire(chunk)
                .ok()
                .map(|request| Input::SyncRequest { from, request }),
            3 => Probe::from_wire(chunk)
                .ok()
                .map(|probe| Input::Probe { from, probe }),
            _ => Some(Input::Tick),
        };
        if let Some(input) = input {
            let _ = r.handle(now, input);
        }
        while r.poll_action().is_some() {}
    }
    let _ = r.digest();
    assert!(r.poll_timeout().is_some(), "a started replica always wants a tick");
});
