//! Frames of the blob (data plane) protocol: content-addressed ranged reads.

use serde::{Deserialize, Serialize};

use crate::codec::Wire;
use crate::ids::Digest;

/// The largest chunk a holder serves in one frame.
pub const MAX_CHUNK_BYTES: u32 = 1024 * 1024;

/// Ask a holder for bytes `[offset, offset + len)` of the blob with `digest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRequest {
    /// The blob.
    pub digest: Digest,
    /// First byte wanted.
    pub offset: u64,
    /// How many bytes (at most [`MAX_CHUNK_BYTES`]).
    pub len: u32,
}

impl Wire for BlobRequest {
    const MAX_BYTES: usize = 128;
    const KIND: &'static str = "blob request";
}

/// A holder's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobResponse {
    /// The bytes, with the blob's total size so the fetcher can plan the rest.
    Chunk {
        /// Offset of `data` in the blob.
        offset: u64,
        /// Total size of the blob.
        total: u64,
        /// The bytes.
        #[serde(with = "bulk")]
        data: Vec<u8>,
    },
    /// The holder does not have the blob.
    NotFound,
    /// The request was refused, with a reason.
    Refused(String),
}

impl Wire for BlobResponse {
    const MAX_BYTES: usize = MAX_CHUNK_BYTES as usize + 1024;
    const KIND: &'static str = "blob response";
}

/// Ask the owner of a task for its log, from `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRequest {
    /// The task.
    pub task: crate::TaskId,
    /// The epoch whose log is wanted.
    pub epoch: crate::Epoch,
    /// First byte wanted.
    pub offset: u64,
    /// At most this many bytes (capped at [`MAX_LOG_CHUNK`]).
    pub max: u32,
}

/// The most log bytes one answer carries.
pub const MAX_LOG_CHUNK: u32 = 256 * 1024;

impl Wire for LogRequest {
    const MAX_BYTES: usize = 128;
    const KIND: &'static str = "log request";
}

/// The owner's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogResponse {
    /// Bytes of the log starting at `offset`; `running` says whether more may come.
    Chunk {
        /// Offset of `data`.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
        /// The instance still runs.
        running: bool,
    },
    /// This node holds no log for that epoch.
    NotFound,
}

impl Wire for LogResponse {
    const MAX_BYTES: usize = MAX_LOG_CHUNK as usize + 1024;
    const KIND: &'static str = "log response";
}

/// Byte buffers as one length-prefixed run of bytes. In postcard this is the very encoding
/// of a sequence of `u8` (length varint, then the bytes), so the wire does not change; it is
/// written and read with one copy instead of one call per byte, which matters for 1 MiB chunks.
mod bulk {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(data)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = Vec<u8>;

            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str("bytes")
            }

            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }

            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(Bytes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The same frame as a plain `Vec<u8>` field would give (the wire did not change).
    #[derive(Serialize)]
    enum PlainResponse {
        Chunk {
            offset: u64,
            total: u64,
            data: Vec<u8>,
        },
    }

    #[test]
    fn chunks_keep_the_sequence_encoding_and_round_trip() {
        let data: Vec<u8> = (0..=255).cycle().take(300_000).collect();
        let fast = BlobResponse::Chunk {
            offset: 7,
            total: 1 << 40,
            data: data.clone(),
        };
        let plain = PlainResponse::Chunk {
            offset: 7,
            total: 1 << 40,
            data,
        };
        let wire = fast.to_wire().unwrap();
        assert_eq!(wire, crate::codec::encode(&plain).unwrap());
        assert_eq!(BlobResponse::from_wire(&wire).unwrap(), fast);
    }
}
