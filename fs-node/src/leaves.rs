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
    root(leaves, size).is_some_and(|r| r == *hash)
}

/// The hash of a content of `size` bytes (more than one block) whose leaves are `leaves`.
pub fn root(leaves: &[ChainingValue], size: u64) -> Option<ContentHash> {
    if size <= BLOCK || leaves.len() != blocks(size) {
        return None;
    }
    let l = left_subtree_len(size);
    let (left, right) = (subtree(leaves, 0, l), subtree(leaves, l, size - l));
    Some(ContentHash::from_bytes(*merge_subtrees_root(&left, &right, Mode::Hash).as_bytes()))
}

/// The leaves of the file `f` (of `size` bytes, more than one block), on all cores: each
/// thread reads and hashes its own share of the blocks.
pub fn leaves_in_parallel(f: &std::fs::File, size: u64) -> std::io::Result<Vec<ChainingValue>> {
    use std::os::unix::fs::FileExt;
    let n = blocks(size);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).clamp(1, 8).min(n);
    let per = n.div_ceil(threads);
    let parts: Vec<std::io::Result<Vec<ChainingValue>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    // Read 16 blocks at a time, hash them one by one.
                    let (first, end) = (t * per, ((t + 1) * per).min(n));
                    let mut out = Vec::with_capacity(end.saturating_sub(first));
                    let mut buf = vec![0u8; 16 * BLOCK as usize];
                    let mut b = first;
                    while b < end {
                        let at = b as u64 * BLOCK;
                        let len = (size - at).min(16 * BLOCK).min((end - b) as u64 * BLOCK) as usize;
                        f.read_exact_at(&mut buf[..len], at)?;
                        for (i, block) in buf[..len].chunks(BLOCK as usize).enumerate() {
                            out.push(leaf(block, at + i as u64 * BLOCK));
                        }
                        b += len.div_ceil(BLOCK as usize);
                    }
                    Ok(out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(std::io::Error::other("a hashing thread panicked")))).collect()
    });
    let mut leaves = Vec::with_capacity(n);
    for p in parts {
        leaves.extend(p?);
    }
    Ok(leaves)
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

/// The leaves of a file being assembled from pieces written in any order (a pull by
/// chunks): each block's leaf is taken as soon as the last piece covering it is written,
/// so that checking the whole file against its hash at the end is a merge of leaves
/// instead of another pass over every byte. A block whose bytes all came from the basis
/// at the same offsets (an edit elsewhere in the file) has the basis's leaf, when the
/// basis's leaves are known; any other block is read back and hashed. Each piece must be
/// reported once.
pub struct AssembledLeaves {
    size: u64,
    /// The leaves of the basis and its size, if known.
    basis: Option<(Vec<ChainingValue>, u64)>,
    state: std::sync::Mutex<Assembly>,
}

struct Assembly {
    /// Bytes written so far in each block, and how many of them came from the basis at
    /// the same offset.
    written: Vec<(u32, u32)>,
    leaves: Vec<Option<ChainingValue>>,
}

/// Bytes of block `b` of a content of `size` bytes (the last one may be short).
pub fn block_len(size: u64, b: usize) -> u64 {
    size.saturating_sub(b as u64 * BLOCK).min(BLOCK)
}

impl AssembledLeaves {
    /// For a content of `size` bytes (more than one block); `basis`: the leaves and
    /// size of the content the same-offset pieces are copied from.
    pub fn new(size: u64, basis: Option<(Vec<ChainingValue>, u64)>) -> AssembledLeaves {
        let n = blocks(size);
        let basis = basis.filter(|(l, s)| l.len() == blocks(*s));
        AssembledLeaves { size, basis, state: std::sync::Mutex::new(Assembly { written: vec![(0, 0); n], leaves: vec![None; n] }) }
    }

    /// Bytes `offset..offset+len` are in `file` now; `same_as_basis`: they are the
    /// basis's bytes at the same offsets. Takes the leaf of every block this completes.
    pub fn wrote(&self, file: &std::fs::File, offset: u64, len: u64, same_as_basis: bool) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = (offset + len).min(self.size);
        if offset >= end {
            return Ok(());
        }
        let mut to_hash = Vec::new();
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            for b in (offset / BLOCK) as usize..=((end - 1) / BLOCK) as usize {
                let start = b as u64 * BLOCK;
                let want = block_len(self.size, b);
                let overlap = (end.min(start + want) - offset.max(start)) as u32;
                let w = &mut st.written[b];
                w.0 += overlap;
                if same_as_basis {
                    w.1 += overlap;
                }
                if w.0 as u64 != want {
                    continue;
                }
                let from_basis = w.1 as u64 == want;
                match &self.basis {
                    Some((leaves, size)) if from_basis && block_len(*size, b) == want => st.leaves[b] = Some(leaves[b]),
                    _ => to_hash.push(b),
                }
            }
        }
        let mut buf = vec![0u8; BLOCK as usize];
        for b in to_hash {
            let n = block_len(self.size, b) as usize;
            file.read_exact_at(&mut buf[..n], b as u64 * BLOCK)?;
            let l = leaf(&buf[..n], b as u64 * BLOCK);
            self.state.lock().unwrap_or_else(|p| p.into_inner()).leaves[b] = Some(l);
        }
        Ok(())
    }

    /// The leaves, if every block was written and they merge into `hash`.
    pub fn verified(&self, hash: &ContentHash) -> Option<Vec<ChainingValue>> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let leaves: Vec<ChainingValue> = st.leaves.iter().copied().collect::<Option<_>>()?;
        verify(&leaves, self.size, hash).then_some(leaves)
    }
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

    /// Leaves taken on several threads merge into the file's BLAKE3 hash.
    #[test]
    fn leaves_in_parallel_give_the_hash() {
        use std::io::Write;
        for size in [BLOCK + 1, 33 * BLOCK, 40 * BLOCK + 5] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 + i / 777) as u8).collect();
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(&data).unwrap();
            let leaves = leaves_in_parallel(&f, size).unwrap();
            assert_eq!(leaves, leaves_of(&data[..], size).unwrap());
            assert_eq!(root(&leaves, size), Some(crate::store::hash_of(&data)));
        }
    }

    /// A file written in pieces of every size, in a scrambled order, has the leaves of
    /// the whole once the last piece is in, and only then; a wrong byte fails the check.
    #[test]
    fn leaves_of_a_file_assembled_in_any_order_are_those_of_the_whole() {
        use std::os::unix::fs::FileExt;
        let size = 9 * BLOCK + 777;
        let data: Vec<u8> = (0..size).map(|i| (i * 13 + i / 4099) as u8).collect();
        let hash = crate::store::hash_of(&data);
        // Pieces that straddle blocks, lie inside one, and cover several.
        let cuts = [0, 1000, BLOCK, BLOCK + 1, 3 * BLOCK - 5, 3 * BLOCK + 70_000, 7 * BLOCK, size];
        let mut pieces: Vec<(u64, u64)> = cuts.windows(2).map(|w| (w[0], w[1] - w[0])).collect();
        pieces.reverse();
        pieces.swap(1, 4);
        // The basis: the same content but for one byte in the piece that is not from it
        // (pieces[2]), and one byte longer.
        let mut old = data.clone();
        old[pieces[2].0 as usize] ^= 0xff;
        old.push(9);
        let old_leaves = leaves_of(&old[..], size + 1).unwrap();
        for (corrupt, basis) in [(false, None), (true, None), (false, Some((old_leaves.clone(), size + 1))), (true, Some((old_leaves, size + 1)))] {
            let dir = tempfile::tempdir().unwrap();
            let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path().join("f")).unwrap();
            file.set_len(size).unwrap();
            let with_basis = basis.is_some();
            let a = AssembledLeaves::new(size, basis);
            for (i, &(at, len)) in pieces.iter().enumerate() {
                assert_eq!(a.verified(&hash), None, "not before the last piece");
                let mut piece = data[at as usize..(at + len) as usize].to_vec();
                // A wrong byte in a fetched piece is caught whether a basis is known or not.
                if corrupt && i == 2 {
                    piece[0] ^= 1;
                }
                file.write_all_at(&piece, at).unwrap();
                a.wrote(&file, at, len, with_basis && i != 2).unwrap();
            }
            match a.verified(&hash) {
                Some(l) => {
                    assert!(!corrupt, "a wrong byte passed (basis known: {with_basis})");
                    assert_eq!(l, leaves_of(&data[..], size).unwrap());
                }
                None => assert!(corrupt, "the right pieces did not verify (basis known: {with_basis})"),
            }
        }
        // A basis's leaf is taken only for blocks wholly from it: had the piece with the
        // changed byte been reported as the basis's, its block would carry the old leaf.
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path().join("f")).unwrap();
        file.write_all_at(&data, 0).unwrap();
        let a = AssembledLeaves::new(size, Some((leaves_of(&old[..], size + 1).unwrap(), size + 1)));
        a.wrote(&file, 0, size, true).unwrap();
        assert_eq!(a.verified(&hash), None, "a basis leaf that is not this content's does not merge into its hash");
    }
}
