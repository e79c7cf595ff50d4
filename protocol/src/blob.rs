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
