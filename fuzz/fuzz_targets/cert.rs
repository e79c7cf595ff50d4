//! Admission certificates and revocations from hostile bytes: decoding, then verifying
//! against a key set that holds the claimed issuer (so the signature check itself runs) and
//! one that does not, at any time. Nothing may panic; a certificate that verifies must be
//! one a key in the set signed, which random bytes never are.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use omesh_protocol::{AdmissionCert, Revocation, Wire};

fuzz_target!(|data: &[u8]| {
    if let Ok(cert) = AdmissionCert::from_wire(data) {
        let keys = BTreeSet::from([cert.issuer]);
        let now = u64::from_le_bytes(data.get(..8).and_then(|b| b.try_into().ok()).unwrap_or([0; 8]));
        let verdict = cert.verify(&cert.node, &keys, now);
        let _ = cert.verify(&cert.node, &BTreeSet::new(), now);
        let _ = cert.verify_at_any_time(&omesh_protocol::NodeId([0; 32]), &keys);
        // Random bytes do not carry a valid ed25519 signature of the issuer.
        assert!(verdict.is_err() || cert.sig.0 != [0; 64]);
    }
    if let Ok(r) = Revocation::from_wire(data) {
        let _ = r.holds(&BTreeSet::from([r.issuer]));
    }
});
