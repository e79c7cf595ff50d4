//! Chunk answers without per-byte work. The wire form of `BlobResponse::Chunk` is postcard's:
//! version byte, variant 0, then `offset`, `total` and the data length as varints, then the
//! data. The server reads a chunk straight behind [`HEADROOM`] spare bytes, writes the header
//! into them and hands the buffer to quinn; the client parses the header from the first bytes
//! and gathers the data into one buffer. Other answers go through [`Wire`] as usual. The tests
//! hold both directions to the [`Wire`] encoding, so peers that decode with it still agree.

use bytes::Bytes;
use omesh_protocol::blob::{BlobResponse, MAX_CHUNK_BYTES};
use omesh_protocol::{Wire, WIRE_VERSION};

use super::DataPlaneError;

/// Spare bytes in front of a chunk's data: a header is at most 1 + 1 + 10 + 10 + 10.
pub(super) const HEADROOM: usize = 32;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The wire form of a chunk answer from `buf` = [`HEADROOM`] spare bytes, then the data.
pub(super) fn chunk_frame(mut buf: Vec<u8>, offset: u64, total: u64) -> Bytes {
    let len = buf.len().saturating_sub(HEADROOM) as u64;
    let mut head = Vec::with_capacity(HEADROOM);
    head.push(WIRE_VERSION);
    head.push(0); // variant 0: Chunk
    varint(&mut head, offset);
    varint(&mut head, total);
    varint(&mut head, len);
    let start = HEADROOM - head.len();
    if let Some(room) = buf.get_mut(start..HEADROOM) {
        room.copy_from_slice(&head);
    }
    Bytes::from(buf).slice(start..)
}

/// What the first bytes of an answer say.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// More bytes are needed to tell.
    Need,
    /// Not a chunk answer: decode it whole.
    Other,
    /// A chunk: its fields and where the data starts.
    Chunk {
        offset: u64,
        total: u64,
        len: usize,
        at: usize,
    },
}

fn read_varint(b: &[u8], pos: &mut usize) -> Result<Option<u64>, DataPlaneError> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let Some(byte) = b.get(*pos + i) else {
            return Ok(None);
        };
        let bits = u64::from(byte & 0x7f);
        if i == 9 && *byte > 1 {
            return Err(DataPlaneError::Malformed("varint overflows u64".into()));
        }
        v |= bits << (7 * i);
        if byte & 0x80 == 0 {
            *pos += i + 1;
            return Ok(Some(v));
        }
    }
    Err(DataPlaneError::Malformed(
        "varint longer than 10 bytes".into(),
    ))
}

fn head(b: &[u8]) -> Result<Head, DataPlaneError> {
    match (b.first(), b.get(1)) {
        (None, _) | (Some(_), None) => return Ok(Head::Need),
        (Some(v), Some(0)) if *v == WIRE_VERSION => {}
        _ => return Ok(Head::Other),
    }
    let mut pos = 2;
    let mut fields = [0u64; 3];
    for f in &mut fields {
        match read_varint(b, &mut pos)? {
            Some(v) => *f = v,
            None => return Ok(Head::Need),
        }
    }
    let [offset, total, len] = fields;
    if len > u64::from(MAX_CHUNK_BYTES) {
        return Err(DataPlaneError::Malformed(format!(
            "chunk of {len} bytes over the limit"
        )));
    }
    Ok(Head::Chunk {
        offset,
        total,
        len: usize::try_from(len).unwrap_or(usize::MAX),
        at: pos,
    })
}

/// Gathers an answer from the pieces a stream delivers.
#[derive(Debug, Default)]
pub(super) struct Assembler {
    head: Vec<u8>,
    chunk: Option<(u64, u64, usize, Vec<u8>)>,
    other: bool,
}

impl Assembler {
    /// Takes the next piece.
    pub(super) fn push(&mut self, piece: &[u8]) -> Result<(), DataPlaneError> {
        if let Some((_, _, len, data)) = self.chunk.as_mut() {
            if data.len() + piece.len() > *len {
                return Err(DataPlaneError::Malformed(
                    "chunk longer than it says".into(),
                ));
            }
            data.extend_from_slice(piece);
            return Ok(());
        }
        self.head.extend_from_slice(piece);
        if self.head.len() > BlobResponse::MAX_BYTES {
            return Err(DataPlaneError::Malformed(
                "answer over the size limit".into(),
            ));
        }
        if self.other {
            return Ok(());
        }
        match head(&self.head)? {
            Head::Need => {}
            Head::Other => self.other = true,
            Head::Chunk {
                offset,
                total,
                len,
                at,
            } => {
                let mut data = Vec::with_capacity(len);
                let rest = self.head.get(at..).unwrap_or_default();
                if rest.len() > len {
                    return Err(DataPlaneError::Malformed(
                        "chunk longer than it says".into(),
                    ));
                }
                data.extend_from_slice(rest);
                self.chunk = Some((offset, total, len, data));
            }
        }
        Ok(())
    }

    /// The answer, once the stream ended.
    pub(super) fn finish(self) -> Result<BlobResponse, DataPlaneError> {
        match self.chunk {
            Some((offset, total, len, data)) if data.len() == len => Ok(BlobResponse::Chunk {
                offset,
                total,
                data,
            }),
            Some((_, _, len, data)) => Err(DataPlaneError::Malformed(format!(
                "chunk ends after {} of its {len} bytes",
                data.len()
            ))),
            None => BlobResponse::from_wire(&self.head)
                .map_err(|e| DataPlaneError::Malformed(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frame(data: &[u8], offset: u64, total: u64) -> Bytes {
        let mut buf = vec![0u8; HEADROOM];
        buf.extend_from_slice(data);
        chunk_frame(buf, offset, total)
    }

    fn assemble(bytes: &[u8], piece: usize) -> Result<BlobResponse, DataPlaneError> {
        let mut a = Assembler::default();
        for p in bytes.chunks(piece.max(1)) {
            a.push(p)?;
        }
        a.finish()
    }

    #[test]
    fn chunk_frames_are_the_wire_encoding_both_ways() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        for (len, offset, total) in [
            (0, 0, 0),
            (1, 127, 128),
            (128, 1 << 20, 1 << 40),
            (300_000, u64::MAX, u64::MAX),
        ] {
            let fast = frame(&data[..len], offset, total);
            let answer = BlobResponse::Chunk {
                offset,
                total,
                data: data[..len].to_vec(),
            };
            assert_eq!(fast.as_ref(), answer.to_wire().unwrap().as_slice());
            for piece in [1, 7, 1200, 1 << 20] {
                assert_eq!(assemble(&fast, piece).unwrap(), answer);
            }
        }
        for other in [BlobResponse::NotFound, BlobResponse::Refused("no".into())] {
            assert_eq!(assemble(&other.to_wire().unwrap(), 1).unwrap(), other);
        }
    }

    #[test]
    fn cut_or_garbled_answers_are_errors_not_panics() {
        let good = frame(&[9u8; 5000], 3, 9000);
        for cut in [0, 1, 2, 5, 100, good.len() - 1] {
            assert!(assemble(&good[..cut], 3).is_err(), "cut at {cut}");
        }
        let mut long = good.to_vec();
        long.push(0);
        assert!(assemble(&long, 4096).is_err());
        let mut overflow = vec![WIRE_VERSION, 0];
        overflow.extend([0xff; 11]);
        assert!(assemble(&overflow, 64).is_err());
        let mut huge = vec![WIRE_VERSION, 0, 0, 0];
        varint(&mut huge, u64::from(MAX_CHUNK_BYTES) + 1);
        assert!(assemble(&huge, 64).is_err());
        assert!(assemble(&[7, 7, 7], 1).is_err());
    }
}
