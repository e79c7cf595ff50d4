//! The wire codec: one version byte, then postcard, with a size limit checked before any parsing.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The version byte that opens every encoded message. A peer speaking another version is
/// refused with [`DecodeError::UnsupportedVersion`], never misparsed.
/// Version 2: liveness probes and suspicions (SWIM-style membership), digest-only syncs.
/// Version 3: a disconnect policy per task spec. Version 4: a node record carries its own
/// overload verdict (`NodeRecord::overloaded`, with hysteresis).
pub const WIRE_VERSION: u8 = 4;

/// A message type that travels on its own (a gossip message, a sync request, a blob frame).
pub trait Wire: Serialize + DeserializeOwned {
    /// The largest encoded size accepted for this message, version byte included.
    const MAX_BYTES: usize;
    /// A short name for errors and metrics.
    const KIND: &'static str;

    /// Encodes `self` behind the version byte; fails if the result exceeds [`Wire::MAX_BYTES`].
    fn to_wire(&self) -> Result<Vec<u8>, EncodeError> {
        let bytes = encode(self)?;
        Self::within_limit(bytes.len())?;
        Ok(bytes)
    }

    /// The length [`Wire::to_wire`] would produce (with the same errors), without encoding.
    fn wire_len(&self) -> Result<usize, EncodeError> {
        let len = serialized_size(self).map_err(|e| EncodeError::Serialize(e.to_string()))? + 1;
        Self::within_limit(len)?;
        Ok(len)
    }

    /// Refuses an encoding of `len` bytes over [`Wire::MAX_BYTES`].
    fn within_limit(len: usize) -> Result<(), EncodeError> {
        if len > Self::MAX_BYTES {
            return Err(EncodeError::TooLarge {
                kind: Self::KIND,
                len,
                limit: Self::MAX_BYTES,
            });
        }
        Ok(())
    }

    /// Decodes bytes produced by [`Wire::to_wire`], enforcing the size limit first.
    fn from_wire(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode(bytes, Self::MAX_BYTES)
    }
}

/// Why bytes could not be decoded. Nothing was changed by a failed decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No bytes at all.
    #[error("empty message")]
    Empty,
    /// More bytes than the limit for this message kind; not parsed.
    #[error("message of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Bytes received.
        len: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The version byte names a protocol this build does not speak.
    #[error("unsupported wire version {0} (this build speaks {WIRE_VERSION})")]
    UnsupportedVersion(u8),
    /// The message ended before the value was complete.
    #[error("truncated message")]
    Truncated,
    /// Bytes left over after a complete value.
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
    /// The bytes do not form a valid value.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Why a value could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded value is larger than its message kind allows.
    #[error("{kind} of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// The message kind.
        kind: &'static str,
        /// The encoded size.
        len: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The serializer refused the value.
    #[error("cannot encode: {0}")]
    Serialize(String),
}

/// Encodes `value` as the version byte followed by its postcard encoding.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    postcard::to_extend(value, vec![WIRE_VERSION])
        .map_err(|e| EncodeError::Serialize(e.to_string()))
}

/// Decodes a value encoded by [`encode`]. Checks the size limit before parsing, refuses other
/// versions and trailing bytes, and never panics on arbitrary input.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != WIRE_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    match postcard::take_from_bytes::<T>(body) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(DecodeError::Trailing(rest.len())),
        Err(postcard::Error::DeserializeUnexpectedEnd) => Err(DecodeError::Truncated),
        Err(e) => Err(DecodeError::Malformed(e.to_string())),
    }
}

/// The canonical bytes of a value: postcard without the version byte. Used for content
/// hashes and signatures, where the encoding must be a function of the value alone.
pub fn canonical<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // Serializing plain data into a Vec cannot fail: every omesh type is a tree of
    // integers, strings, vectors and ordered maps.
    postcard::to_allocvec(value).unwrap_or_default()
}

/// `canonical(value).len()`, without building the bytes.
pub fn canonical_len<T: Serialize + ?Sized>(value: &T) -> usize {
    serialized_size(value).unwrap_or_default()
}

/// The postcard length of a value, counted by a flavor that stores nothing.
fn serialized_size<T: Serialize + ?Sized>(value: &T) -> postcard::Result<usize> {
    postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default())
}
