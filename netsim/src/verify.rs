//! One signature check per delta for the whole simulation. Every replica checks every delta
//! it merges, so 10,000 replicas would check each one 10,000 times; the check's outcome
//! depends only on the delta, so it is remembered by the delta's signature and a hash of its
//! encoding (a body that differs from the one signed hashes differently and is checked).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use omesh_protocol::codec::canonical;
use omesh_protocol::Delta;
use omesh_state::Verify;

/// Remembers the outcome of each signature check.
#[derive(Debug, Default)]
pub struct MemoVerify {
    seen: Mutex<HashMap<[u8; 64], (u64, bool)>>,
    /// Checks actually made (for the report).
    checks: std::sync::atomic::AtomicU64,
}

impl MemoVerify {
    /// Signature checks actually run (the rest were remembered).
    pub fn checks(&self) -> u64 {
        self.checks.load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn hash_of(delta: &Delta) -> u64 {
    let mut h = DefaultHasher::new();
    canonical(delta).hash(&mut h);
    h.finish()
}

impl Verify for MemoVerify {
    fn holds(&self, delta: &Delta) -> bool {
        let hash = hash_of(delta);
        if let Ok(seen) = self.seen.lock() {
            if let Some((h, ok)) = seen.get(&delta.sig.0) {
                if *h == hash {
                    return *ok;
                }
            }
        }
        let ok = delta.signature_holds();
        self.checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(delta.sig.0, (hash, ok));
        }
        ok
    }
}
