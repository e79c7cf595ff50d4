//! Feeds arbitrary bytes to every wire decoder. A decoder must return an error or a value;
//! a value must encode again and decode to itself. Any panic is a bug (DESIGN.md §4: every
//! decoder has a size limit and never panics on bad bytes).
#![no_main]

use std::collections::BTreeSet;
use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use omesh_protocol::blob::{BlobRequest, BlobResponse};
use omesh_protocol::task::MAX_SPEC_BYTES;
use omesh_protocol::{
    decode, AdmissionCert, GossipMessage, ImageRef, LogRequest, LogResponse, Probe, Revocation,
    SignedTaskSpec, SyncReply, SyncRequest, Wire,
};

fn check<T: Wire + PartialEq + Debug>(data: &[u8]) {
    if let Ok(value) = T::from_wire(data) {
        let again = value
            .to_wire()
            .unwrap_or_else(|e| panic!("{} decoded but does not encode: {e}", T::KIND));
        assert!(again.len() <= data.len(), "{}: re-encoding grew", T::KIND);
        assert_eq!(T::from_wire(&again).as_ref(), Ok(&value), "{}", T::KIND);
    }
}

fuzz_target!(|data: &[u8]| {
    check::<GossipMessage>(data);
    check::<SyncRequest>(data);
    check::<SyncReply>(data);
    check::<BlobRequest>(data);
    check::<BlobResponse>(data);
    check::<Probe>(data);
    check::<LogRequest>(data);
    check::<LogResponse>(data);
    check::<AdmissionCert>(data);
    check::<Revocation>(data);

    // Specs arrive inside deltas; verifying one from hostile bytes must not panic either.
    if let Ok(spec) = decode::<SignedTaskSpec>(data, MAX_SPEC_BYTES + 1) {
        let _ = spec.id();
        let _ = spec.verify(&BTreeSet::from([spec.spec.submitter]));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(image) = ImageRef::parse(text) {
            assert_eq!(ImageRef::parse(&image.to_string()), Ok(image));
        }
    }
});
