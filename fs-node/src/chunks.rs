//! Content-defined chunks of a blob (FastCDC, crate `fastcdc`): the unit a large pull
//! moves. A holder serves a blob's chunk list (`GET /chunks/<hash>`); a puller takes the
//! chunks it already has from the blob the path had before (an edit of a large file
//! moves only the chunks around the edit) and fetches the others by byte range from every
//! holder at once, each verified by its BLAKE3 hash, the whole file verified again before
//! it is installed (`puller.rs`).
//!
//! Sizes: 16 KiB minimum, 64 KiB average, 256 KiB maximum. A one-byte edit changes the
//! chunk it falls in and at most its neighbour: about 128 KiB move for any file size;
//! a chunk list costs 36 bytes per 64 KiB of content (0.05 %); and 64 KiB requests keep
//! several holders busy at once without paying a request per few KiB. Chunk lists are
//! cached beside the blobs (`chunks/<hash>`: per chunk, its length as 4 bytes and its
//! hash), computed once per blob.

use std::io::{Read, Write};
use std::path::Path;
use wire::ContentHash;

/// Contents at least this large are pulled by chunks (`puller.rs`) and chunked as soon
/// as they are committed or pulled whole; smaller ones come whole in one request (a chunk
/// list would cost more than it saves).
pub const CHUNKED_MIN_BYTES: u64 = 4 << 20;
pub const MIN_CHUNK: u32 = 16 << 10;
pub const AVG_CHUNK: u32 = 64 << 10;
pub const MAX_CHUNK: u32 = 256 << 10;
/// Most chunks a list may have: a holder's list for a larger file is refused.
pub const MAX_CHUNKS: usize = 1 << 24;

/// The most bytes an honest chunk list of a `size`-byte content takes as JSON: every
/// chunk but the last has at least `MIN_CHUNK` bytes, and one takes at most 80 bytes
/// (`[262144,"<64 hex digits>"],`). A holder's answer beyond it is not read.
/// Never more than [`MAX_LIST_BYTES`]: a larger content (tens of GiB) is pulled whole.
pub fn max_list_bytes(size: u64) -> u64 {
    ((size / MIN_CHUNK as u64 + 1) * 80 + 64).min(MAX_LIST_BYTES)
}

/// Most bytes of a chunk list a puller reads (about 800,000 chunks of 64 KiB: 50 GiB).
pub const MAX_LIST_BYTES: u64 = 64 << 20;

/// One chunk: where it is in the file, its length and its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub len: u32,
    pub hash: ContentHash,
}

/// A blob as its chunks, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkList {
    pub chunks: Vec<Chunk>,
}

/// The JSON form `GET /chunks/<hash>` answers: `{"size": N, "chunks": [[len, "hex"], …]}`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ChunkListJson {
    pub size: u64,
    pub chunks: Vec<(u32, ContentHash)>,
}

impl ChunkList {
    pub fn size(&self) -> u64 {
        self.chunks.last().map(|c| c.offset + c.len as u64).unwrap_or(0)
    }

    /// Chunks `r`'s bytes, hashing each.
    pub fn of_reader(r: impl Read) -> std::io::Result<ChunkList> {
        let mut chunks = Vec::new();
        for c in fastcdc::v2020::StreamCDC::new(r, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
            let c = c.map_err(|e| std::io::Error::other(format!("chunking: {e}")))?;
            chunks.push(Chunk { offset: c.offset, len: c.length as u32, hash: crate::store::hash_of(&c.data) });
        }
        Ok(ChunkList { chunks })
    }

    /// The chunk list of the blob at `p` (stops early if it is removed meanwhile).
    pub fn of_file(p: &Path) -> std::io::Result<ChunkList> {
        Self::of_reader(std::io::BufReader::with_capacity(1 << 20, crate::store::BlobReader::open(p)?))
    }

    pub fn to_json(&self) -> ChunkListJson {
        ChunkListJson { size: self.size(), chunks: self.chunks.iter().map(|c| (c.len, c.hash.clone())).collect() }
    }

    /// A holder's list, checked: every chunk within the chunker's sizes (the last may be
    /// shorter), together exactly `size` bytes.
    pub fn from_json(j: ChunkListJson, size: u64) -> Result<ChunkList, String> {
        if j.size != size || j.chunks.len() > MAX_CHUNKS {
            return Err(format!("a chunk list of {} bytes in {} chunks for content of {size}", j.size, j.chunks.len()));
        }
        let mut chunks = Vec::with_capacity(j.chunks.len());
        let mut offset = 0u64;
        let last = j.chunks.len().saturating_sub(1);
        for (i, (len, hash)) in j.chunks.into_iter().enumerate() {
            if len == 0 || len > MAX_CHUNK || (i < last && len < MIN_CHUNK) {
                return Err(format!("chunk {i} has {len} bytes"));
            }
            chunks.push(Chunk { offset, len, hash });
            offset += len as u64;
        }
        if offset != size {
            return Err(format!("the chunks add up to {offset} bytes, not {size}"));
        }
        Ok(ChunkList { chunks })
    }

    /// The cache file's form: per chunk, its length (4 bytes, little endian) and hash.
    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        for c in &self.chunks {
            w.write_all(&c.len.to_le_bytes())?;
            w.write_all(c.hash.as_bytes())?;
        }
        Ok(())
    }

    pub fn read_from(bytes: &[u8]) -> Option<ChunkList> {
        if !bytes.len().is_multiple_of(36) {
            return None;
        }
        let mut offset = 0;
        let chunks = bytes
            .chunks_exact(36)
            .map(|b| {
                let len = u32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
                let c = Chunk { offset, len, hash: ContentHash::from_bytes(b[4..].try_into().expect("32 bytes")) };
                offset += len as u64;
                c
            })
            .collect();
        Some(ChunkList { chunks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2654435761) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_one_byte_edit_changes_at_most_two_chunks_and_lists_round_trip() {
        let a = data(8 << 20, 7);
        let mut b = a.clone();
        b[3 << 20] ^= 1;
        let (la, lb) = (ChunkList::of_reader(&a[..]).unwrap(), ChunkList::of_reader(&b[..]).unwrap());
        assert_eq!((la.size(), lb.size()), (a.len() as u64, b.len() as u64));
        let have: std::collections::HashSet<&ContentHash> = la.chunks.iter().map(|c| &c.hash).collect();
        let new: Vec<&Chunk> = lb.chunks.iter().filter(|c| !have.contains(&c.hash)).collect();
        let moved: u64 = new.iter().map(|c| c.len as u64).sum();
        assert!(!new.is_empty() && new.len() <= 2 && moved <= 2 * MAX_CHUNK as u64, "{} new chunks, {moved} bytes", new.len());
        assert!(la.chunks.len() > 64, "about 128 chunks of 64 KiB: {}", la.chunks.len());
        let mut buf = Vec::new();
        la.write_to(&mut buf).unwrap();
        assert_eq!(ChunkList::read_from(&buf), Some(la.clone()));
        assert_eq!(ChunkList::from_json(la.to_json(), a.len() as u64), Ok(la.clone()));
        let mut short = la.to_json();
        short.chunks.pop();
        assert!(ChunkList::from_json(short, a.len() as u64).is_err(), "a list that does not add up is refused");
        let mut tiny = la.to_json();
        tiny.chunks[0].0 = 1;
        assert!(ChunkList::from_json(tiny, a.len() as u64).is_err());
    }
}
