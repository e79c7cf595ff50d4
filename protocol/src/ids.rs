//! Fixed-size identifiers: node ids (ed25519 public keys), task ids and sha256 digests.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a textual id could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdParseError {
    /// The text was not 64 hexadecimal characters.
    #[error("expected 64 hex characters, got {0:?}")]
    BadHex(String),
}

fn parse_hex32(s: &str) -> Result<[u8; 32], IdParseError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| IdParseError::BadHex(s.to_owned()))?;
    Ok(out)
}

/// The 32 bytes as four big-endian words: comparing them compares the bytes in order.
#[inline]
fn be_words(b: &[u8; 32]) -> [u64; 4] {
    let mut out = [0u64; 4];
    for (w, chunk) in out.iter_mut().zip(b.chunks_exact(8)) {
        let mut x = [0u8; 8];
        x.copy_from_slice(chunk);
        *w = u64::from_be_bytes(x);
    }
    out
}

macro_rules! id32 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
        pub struct $name(pub [u8; 32]);

        // The byte order of the array, compared eight bytes at a time: ids key the B-trees
        // every replica looks up per delta, and a derived `Ord` calls `memcmp` for each step.
        impl Ord for $name {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                be_words(&self.0).cmp(&be_words(&other.0))
            }
        }

        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl $name {
            /// The first 12 hex characters, for logs and tables.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..6])
            }
            /// The full lowercase hex form.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex32(s).map(Self)
            }
        }
    };
}

id32!(
    /// A node's identity: its ed25519 public key, the same key its libp2p peer id derives from.
    NodeId
);
id32!(
    /// A task's identity: sha256 of the canonical encoding of its signed spec.
    TaskId
);
id32!(
    /// A sha256 content digest (image manifests and layers, blobs).
    Digest
);

impl Digest {
    /// sha256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self(sha2::Sha256::digest(bytes).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn id_order_is_byte_order(a in any::<[u8; 32]>(), b in any::<[u8; 32]>(), i in 0usize..32) {
            prop_assert_eq!(NodeId(a).cmp(&NodeId(b)), a.cmp(&b));
            // Ids sharing a prefix, the case random pairs rarely hit.
            let mut c = a;
            c[i] = c[i].wrapping_add(1);
            prop_assert_eq!(TaskId(a).cmp(&TaskId(c)), a.cmp(&c));
            prop_assert_eq!(Digest(c).cmp(&Digest(a)), c.cmp(&a));
        }
    }
}

/// An ed25519 signature (64 bytes), encoded as a byte string.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sig(pub [u8; 64]);

impl Default for Sig {
    fn default() -> Self {
        Self([0; 64])
    }
}

impl fmt::Debug for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sig({}…)", hex::encode(&self.0[..6]))
    }
}

impl Serialize for Sig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Sig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Sig, E> {
                <[u8; 64]>::try_from(v)
                    .map(Sig)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Sig, A::Error> {
                let mut out = [0u8; 64];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                Ok(Sig(out))
            }
        }
        d.deserialize_bytes(V)
    }
}

impl Sig {
    /// Signs `msg` with `key`.
    pub fn sign(key: &ed25519_dalek::SigningKey, msg: &[u8]) -> Self {
        use ed25519_dalek::Signer;
        Self(key.sign(msg).to_bytes())
    }

    /// Whether this is `key`'s signature over `msg` (strict verification: no malleable
    /// or small-order forms). A key that is not a valid curve point fails.
    pub fn verifies(&self, key: &[u8; 32], msg: &[u8]) -> bool {
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(key) else {
            return false;
        };
        key.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&self.0))
            .is_ok()
    }
}
