//! Verified ranges of a content (files on demand): a content hash is the BLAKE3 hash of
//! the whole file, and BLAKE3 is a tree. Cut the file into aligned [`BLOCK`]s; the
//! chaining value of each block (its *leaf*) is a subtree of that tree, and the leaves
//! of a file merge, by BLAKE3's own rules, into its hash. A node that streams a file
//! fetches the leaves first from any holder and checks that they merge into the hash the
//! manager gave; then every block that arrives is checked against its leaf before a
//! reader sees a byte of it. A lying holder cannot make a block pass: that would need a
//! BLAKE3 collision. (The same idea as Bao, built on `blake3::hazmat`.)

use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode};
use std::io::Read;
use std::path::Path;
use wire::ContentHash;

/// Bytes per block: 64 BLAKE3 chunks. Leaves cost 32 bytes per block (512 KiB for a
/// GiB); a block is the smallest unit a reader waits for.
pub const BLOCK: u64 = 64 << 10;

/// Blocks of a content of `size` bytes.
pub fn blocks(size: u64) -> usize {
    size.div_ceil(BLOCK) as usize
}

/// The leaf of the block at `offset` (a multiple of [`BLOCK`]) holding `data`, of a
/// content larger than one block.
pub fn leaf(data: &[u8], offset: u64) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(data);
    h.finalize_non_root()
}

/// The leaves of a file read from `r` (of `size` bytes, more than one block).
pub fn leaves_of(mut r: impl Read, size: u64) -> std::io::Result<Vec<ChainingValue>> {
    let mut out = Vec::with_capacity(blocks(size));
    let mut buf = vec![0u8; BLOCK as usize];
    let mut offset = 0u64;
    while offset < size {
        let n = (size - offset).min(BLOCK) as usize;
        r.read_exact(&mut buf[..n])?;
        out.push(leaf(&buf[..n], offset));
        offset += n as u64;
    }
    let mut extra = [0u8; 1];
    if r.read(&mut extra)? != 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is longer than its size"));
    }
    Ok(out)
}

/// The leaves of the blob at `p` (stops early if it is removed meanwhile).
pub fn leaves_of_file(p: &Path) -> std::io::Result<Vec<ChainingValue>> {
    let f = crate::store::BlobReader::open(p)?;
    let size = f.size()?;
    leaves_of(std::io::BufReader::with_capacity(1 << 20, f), size)
}

/// Whether `leaves` are those of a content of `size` bytes (more than one block) with
/// hash `hash`.
pub fn verify(leaves: &[ChainingValue], size: u64, hash: &ContentHash) -> bool {
    if size <= BLOCK || leaves.len() != blocks(size) {
        return false;
    }
    let l = left_subtree_len(size);
    let (left, right) = (subtree(leaves, 0, l), subtree(leaves, l, size - l));
    merge_subtrees_root(&left, &right, Mode::Hash).as_bytes() == hash.as_bytes()
}

/// The chaining value of the subtree covering `len` bytes from `offset` (aligned on a
/// block; BLAKE3 splits a subtree where `left_subtree_len` says, always a power of two
/// of at least a block here).
fn subtree(leaves: &[ChainingValue], offset: u64, len: u64) -> ChainingValue {
    if len <= BLOCK {
        return leaves[(offset / BLOCK) as usize];
    }
    let l = left_subtree_len(len);
    merge_subtrees_non_root(&subtree(leaves, offset, l), &subtree(leaves, offset + l, len - l), Mode::Hash)
}

/// Leaves as bytes (32 per block), for a peer or a cache file.
pub fn to_bytes(leaves: &[ChainingValue]) -> Vec<u8> {
    leaves.concat()
}

pub fn from_bytes(b: &[u8]) -> Option<Vec<ChainingValue>> {
    if !b.len().is_multiple_of(32) {
        return None;
    }
    Some(b.chunks_exact(32).map(|c| c.try_into().expect("32 bytes")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_merge_into_the_blake3_hash_and_catch_any_changed_block() {
        for size in [BLOCK + 1, 2 * BLOCK, 3 * BLOCK - 7, 5 * BLOCK, 17 * BLOCK + 12345, (1 << 22) + 3] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 1000) as u8).collect();
            let hash = crate::store::hash_of(&data);
            let leaves = leaves_of(&data[..], size).unwrap();
            assert!(verify(&leaves, size, &hash), "size {size}");
            // Each block checks against its own leaf; a block with one byte changed does not.
            for (i, l) in leaves.iter().enumerate() {
                let at = i as u64 * BLOCK;
                let block = &data[at as usize..(at + BLOCK).min(size) as usize];
                assert_eq!(leaf(block, at), *l);
                let mut bad = block.to_vec();
                bad[0] ^= 1;
                assert_ne!(leaf(&bad, at), *l);
            }
            let mut wrong = leaves.clone();
            wrong[leaves.len() / 2][3] ^= 1;
            assert!(!verify(&wrong, size, &hash), "a changed leaf does not merge into the hash");
            assert!(!verify(&leaves[1..], size, &hash), "too few leaves");
            assert_eq!(from_bytes(&to_bytes(&leaves)).unwrap(), leaves);
        }
    }
}
