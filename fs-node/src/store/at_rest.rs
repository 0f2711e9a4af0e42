//! Contents at rest over *similar* contents: a whole blob that no file of the tree has
//! any more and that the manager asked this node to keep (an old version, a deleted
//! file), or the content of a file left alone for a while (`Tree::keep_at_rest`), becomes
//! a patch (`patched.rs`, role `AtRest`) over the whole blob that shares most of its
//! chunks: the version after an insertion (its bytes moved), or another file holding the
//! same bytes (a near-copy). Only the 64 KiB blocks not found there are kept; the others
//! are read from the base where its chunk list says they are (moves). A base is always a
//! whole blob, so of two near-copies one stays whole.
//!
//! The in-place case (a new version patched over the one before, the blocks at the same
//! offsets) is `ContentStore::keep_base_as_patch`; this pass covers what it cannot see.
//! It runs after the node's GC, outside the tree's lock, one content at a time, and
//! checks the patch it made against the content's hash before the blob goes.

use super::*;
use crate::chunks::ChunkList;
use crate::leaves::{block_len, blocks, BLOCK};
use std::collections::{HashMap, HashSet};

/// Contents smaller than this stay whole (a patch would save little: at most a MiB, for
/// a chunk list and index rows per content). Below the size pulls go by chunks (4 MiB):
/// older versions of a document of a few MiB saved again and again, or copies of one,
/// are what users keep most of.
pub const AT_REST_MIN_BYTES: u64 = 1 << 20;

/// A content that stayed whole is looked at again once the chunk index has more blobs,
/// and at most this often (each look reads its chunk list and queries the index; the
/// GC's period, a minute by default, spaces the passes anyway). Short, so that an older
/// version looked at just before its new version's chunks were indexed does not stay
/// whole long when the GC runs often.
const LOOK_AGAIN_AFTER_GROWTH: std::time::Duration = std::time::Duration::from_secs(5);

/// A base that could not be replaced is tried again after this long.
const TRY_REPLACING_AGAIN_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Bytes of contents one pass looks at, at most (each conversion reads its content
/// and hashes it): the first pass after an upgrade spreads over several GCs.
const BYTES_PER_PASS: u64 = 4 << 30;

/// What the tree says of the contents of its files, for the at-rest pass: which may be
/// the base of which.
#[derive(Default)]
pub struct AtRestBases {
    /// Contents of files kept local for good: a base for any content.
    pub for_good: HashSet<ContentHash>,
    /// Every content a file with a name has, on-demand (evictable) files' included: a
    /// base for the contents of on-demand files only. The cache evicts such a base only
    /// with the contents over it (`Tree::eviction_candidates`); a content kept local
    /// for good, or kept for the manager, is not made a patch over one, and one that
    /// becomes such while patched over one is written out and made the base instead
    /// (`ContentStore::replace_unneeded_bases`).
    pub current: HashSet<ContentHash>,
    /// Contents kept for the manager (older versions).
    pub kept: HashSet<ContentHash>,
}

impl AtRestBases {
    fn evictable(&self, h: &ContentHash) -> bool {
        self.current.contains(h) && !self.for_good.contains(h) && !self.kept.contains(h)
    }

    /// Whether `h` must stay here, so that a content it is patched over must too.
    fn stays(&self, h: &ContentHash) -> bool {
        self.for_good.contains(h) || self.kept.contains(h)
    }

    /// The contents `h` may be patched over, `over_it` the contents patched over `h`
    /// (they move onto its base with it): an evictable base only if they are all
    /// evictable too.
    fn for_content<'a>(&self, h: &ContentHash, mut over_it: impl Iterator<Item = &'a ContentHash>) -> &HashSet<ContentHash> {
        if self.evictable(h) && over_it.all(|c| self.evictable(c)) {
            &self.current
        } else {
            &self.for_good
        }
    }
}

/// Where the blocks of a content of `size` bytes described by `mine` are found in a base
/// described by `base`: per block, whether it must be kept in the patch (no run of
/// chunks found in the base covers it whole), and the moves of the others.
pub fn layout_over(mine: &ChunkList, size: u64, base: &ChunkList) -> (Vec<bool>, Vec<Move>) {
    let mut at: HashMap<(&ContentHash, u32), Vec<u64>> = HashMap::new();
    for c in &base.chunks {
        at.entry((&c.hash, c.len)).or_default().push(c.offset);
    }
    // Runs of `mine` found in the base at one distance: (start, end, delta), in order. A
    // chunk found in several places is taken where it continues the run before it.
    let mut runs: Vec<(u64, u64, i64)> = Vec::new();
    for c in &mine.chunks {
        let Some(offsets) = at.get(&(&c.hash, c.len)) else {
            continue;
        };
        let end = c.offset + c.len as u64;
        let continues = runs.last().filter(|r| r.1 == c.offset).map(|r| r.2).filter(|d| offsets.binary_search(&c.offset.wrapping_add_signed(*d)).is_ok());
        let delta = continues.unwrap_or(offsets[0] as i64 - c.offset as i64);
        match runs.last_mut() {
            Some(r) if r.1 == c.offset && r.2 == delta => r.1 = end,
            _ => runs.push((c.offset, end, delta)),
        }
    }
    let n = blocks(size);
    let mut from_patch = vec![true; n];
    let mut moves: Vec<Move> = Vec::new();
    for (b, in_patch) in from_patch.iter_mut().enumerate() {
        let (from, to) = (b as u64 * BLOCK, b as u64 * BLOCK + block_len(size, b));
        let i = runs.partition_point(|r| r.0 <= from);
        let Some(&(_, end, delta)) = i.checked_sub(1).map(|i| &runs[i]) else {
            continue;
        };
        if to > end {
            continue;
        }
        *in_patch = false;
        if delta == 0 {
            continue;
        }
        match moves.last_mut() {
            Some(m) if m.first + m.count == b && m.delta == delta => m.count += 1,
            _ => moves.push(Move { first: b, count: 1, delta }),
        }
    }
    (from_patch, moves)
}

impl ContentStore {
    /// One pass over `candidates` (kept contents no file uses, contents of files left
    /// alone): each whole one not looked at since the chunk index grew (or for
    /// [`LOOK_AGAIN_AFTER_GROWTH`]) goes through [`Self::keep_at_rest_over_similar`], up to
    /// [`BYTES_PER_PASS`]. Returns those that became patches.
    pub fn keep_at_rest(&self, candidates: &[ContentHash], bases: &AtRestBases) -> Vec<ContentHash> {
        let Some(index) = self.chunk_index() else {
            return Vec::new();
        };
        let (indexed, now) = (index.added(), std::time::Instant::now());
        let mut waiting: Option<HashSet<ContentHash>> = None;
        let (mut budget, mut made) = (BYTES_PER_PASS, Vec::new());
        let mut over: Option<HashMap<ContentHash, Vec<ContentHash>>> = None;
        // Those never looked at first (in their order), then the others: a content
        // nothing resembles does not take every pass's budget from new ones.
        let ordered: Vec<&ContentHash> = {
            let looked = self.at_rest_looked_at.lock().unwrap_or_else(|p| p.into_inner());
            let (old, new): (Vec<&ContentHash>, Vec<&ContentHash>) = candidates.iter().partition(|h| looked.contains_key(*h));
            new.into_iter().chain(old).collect()
        };
        for h in ordered {
            let size = match std::fs::metadata(self.blob_path(h)) {
                Ok(m) if m.len() >= AT_REST_MIN_BYTES => m.len(),
                _ => continue,
            };
            {
                let mut looked = self.at_rest_looked_at.lock().unwrap_or_else(|p| p.into_inner());
                if looked.get(h).is_some_and(|(at, when)| *at == indexed || now.duration_since(*when) < LOOK_AGAIN_AFTER_GROWTH) {
                    continue;
                }
                // (One larger than the whole budget goes alone, in a pass of its own.)
                if size > budget && budget < BYTES_PER_PASS {
                    continue;
                }
                looked.insert(h.clone(), (indexed, now));
            }
            // A new version patched over it is written out first, and makes it a patch
            // itself (`keep_base_as_patch`): one listing of the patches per pass.
            if waiting.get_or_insert_with(|| self.waiting_bases()).contains(h) {
                continue;
            }
            budget = budget.saturating_sub(size);
            let over = over.get_or_insert_with(|| self.patched_over());
            match self.keep_at_rest_over_similar(h, bases.for_content(h, over.get(h).into_iter().flatten())) {
                Ok(Some(_)) => made.push(h.clone()),
                Ok(None) => {}
                Err(e) => tracing::warn!("keeping content {h} as a patch over a similar one: {e} (it stays whole)"),
            }
        }
        made
    }

    /// Keeps whole blob `h` (a kept version no file uses, or a file's content left alone)
    /// as a patch over the whole blob of `bases` (contents of files of the tree) sharing
    /// most of its chunks, if that saves at least half of it. Older versions kept as patches
    /// over `h` move onto that content too (their blocks found there are read from there,
    /// the others copied into their patches). Returns the base it now has, or `None`
    /// when it stays as it is (small, patched already, a new version waiting to be
    /// written out over it, nothing similar indexed, too different).
    fn keep_at_rest_over_similar(&self, h: &ContentHash, bases: &HashSet<ContentHash>) -> std::io::Result<Option<ContentHash>> {
        let size = match std::fs::metadata(self.blob_path(h)) {
            Ok(m) if m.len() >= AT_REST_MIN_BYTES => m.len(),
            _ => return Ok(None),
        };
        let mine = self.chunk_list(h)?;
        let Some(base) = self.most_similar_whole_blob(h, &mine, bases) else {
            return Ok(None);
        };
        self.keep_at_rest_over(h, size, &mine, &base)
    }

    /// Where whole blob `h` (of `size` bytes, chunk list `mine`) would be kept over
    /// `base`: `None` when that would not save at least half of it.
    fn layout_saving_half(&self, mine: &ChunkList, size: u64, base: &ContentHash) -> std::io::Result<Option<(Vec<bool>, Vec<Move>)>> {
        let theirs = self.chunk_list(base)?;
        let (from_patch, moves) = layout_over(mine, size, &theirs);
        let kept = from_patch.iter().filter(|p| **p).count();
        Ok((kept * 2 <= from_patch.len()).then_some((from_patch, moves)))
    }

    /// [`Self::keep_at_rest_over_similar`] over `base`, chosen.
    fn keep_at_rest_over(&self, h: &ContentHash, size: u64, mine: &ChunkList, base: &ContentHash) -> std::io::Result<Option<ContentHash>> {
        let Some((from_patch, moves)) = self.layout_saving_half(mine, size, base)? else {
            return Ok(None);
        };
        let kept = from_patch.iter().filter(|p| **p).count();
        let base = base.clone();
        // Its leaves, while it is whole: what a peer pulling it over another version, or
        // a writer opening it, asks for first (a patch would be written out to make them).
        self.leaves(h)?;
        let header = Patched { base: base.clone(), size, from_patch, role: Role::AtRest, moves };
        let (tmp_patch, patch) = self.tmp_file()?;
        let (tmp_header, f) = self.tmp_file()?;
        drop(f);
        let made = self.write_at_rest_patch(h, &header, &tmp_patch, &patch).and_then(|()| {
            let _held = self.patching.lock().unwrap_or_else(|p| p.into_inner());
            // Still as it was looked at: `h` whole, its base whole.
            let still = self.blob_path(h).exists()
                && !self.patched.has(h)
                && !self.waiting_bases().contains(h)
                && self.blob_path(&base).exists()
                && !self.patched.has(&base);
            if !still {
                return Ok(false);
            }
            let whole = File::open(self.blob_path(h))?;
            for (c, p, _) in self.patched.all().into_iter().filter(|(_, p, _)| p.base == *h) {
                let patch = std::fs::OpenOptions::new().write(true).open(self.patched.patch_path(&c))?;
                self.replace_header(&c, &p.rebased(&base, p.role, &whole, &patch, |at, len| header.found_in_base(at, len))?)?;
            }
            self.patched.put(h, &tmp_patch, &header, &tmp_header, true)?;
            std::fs::remove_file(self.blob_path(h))?;
            File::open(&self.blobs)?.sync_all()?;
            Ok(true)
        });
        let _ = std::fs::remove_file(&tmp_patch);
        let _ = std::fs::remove_file(&tmp_header);
        if !made? {
            return Ok(None);
        }
        // Its chunks are no longer in a file of their own; its leaves and chunk list still
        // describe its bytes and stay.
        self.drop_from_chunk_index(h);
        tracing::debug!(%h, over = %base, kept, "a content at rest over a similar one");
        Ok(Some(base))
    }

    /// Fills `patch` (at `tmp_patch`) with the blocks of blob `h` that `header` keeps,
    /// and checks that the patch over its base reads as `h`.
    fn write_at_rest_patch(&self, h: &ContentHash, header: &Patched, tmp_patch: &Path, patch: &File) -> std::io::Result<()> {
        let whole = File::open(self.blob_path(h))?;
        patch.set_len(header.size)?;
        for (b, _) in header.from_patch.iter().enumerate().filter(|(_, p)| **p) {
            copy_range(&whole, patch, b as u64 * BLOCK, block_len(header.size, b))?;
        }
        patch.sync_data()?;
        let check = ContentFile::Patched { base: File::open(self.blob_path(&header.base))?, patch: File::open(tmp_patch)?, header: header.clone() };
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < header.size {
            let n = check.read_full_at(&mut buf, at)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        if at != header.size || ContentHash::from_bytes(*hasher.finalize().as_bytes()) != *h {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("content {h} over {} does not read back as itself", header.base)));
        }
        Ok(())
    }

    /// Bases no longer needed as such: one that no file kept local for good has and
    /// that is not kept, under a content at rest that must stay (of a file kept local
    /// for good, or kept for the manager: the last file kept local with the base deleted
    /// or made evictable, its retention over, or the content over it pinned or kept since
    /// it was made a patch); or one no file has at all, under the content of an on-demand
    /// file. Such a content is written
    /// out whole and becomes the base instead (the old base a patch over it, which the GC
    /// or the cache then takes, and every other patch over the old base moved onto it),
    /// so the old base does not stay whole for as long as a file is patched over it.
    /// Bases only kept versions are patched over stay until the GC takes them (writing
    /// those out would take more room than it frees). Only with room to spare (twice the
    /// content's size free). Returns the old bases replaced (patches now).
    pub fn replace_unneeded_bases(&self, bases: &AtRestBases) -> Vec<ContentHash> {
        let all = self.patched.all();
        let unneeded: HashSet<&ContentHash> = all.iter().map(|(_, p, _)| &p.base).filter(|b| !bases.stays(b) && self.blob_path(b).exists()).collect();
        // The content that takes its place: one that must stay here (kept local for good,
        // kept for the manager), or any current one for a base no file has.
        let takes_place_of = |c: &ContentHash, b: &ContentHash| bases.stays(c) || (!bases.current.contains(b) && bases.current.contains(c));
        let (mut budget, now) = (BYTES_PER_PASS, std::time::Instant::now());
        let mut replaced = Vec::new();
        for b in unneeded {
            let Some((c, p, _)) = all.iter().find(|(c, p, _)| p.base == *b && p.role == Role::AtRest && takes_place_of(c, b) && self.is_patched(c)) else {
                continue;
            };
            {
                // One that could not be replaced is tried again a while later.
                let mut looked = self.at_rest_looked_at.lock().unwrap_or_else(|p| p.into_inner());
                if looked.get(b).is_some_and(|(_, when)| now.duration_since(*when) < TRY_REPLACING_AGAIN_AFTER) || (p.size > budget && budget < BYTES_PER_PASS)
                {
                    continue;
                }
                looked.insert((*b).clone(), (0, now));
            }
            if self.free_bytes().unwrap_or(0) < p.size.saturating_mul(2) {
                tracing::debug!("content {c} stays a patch over {b}, which nothing needs: not enough free space to write it out");
                continue;
            }
            budget = budget.saturating_sub(p.size);
            // Written out only if the old base can then be kept over it.
            let done = (|| -> std::io::Result<bool> {
                let size = std::fs::metadata(self.blob_path(b))?.len();
                let mine = self.chunk_list(b)?;
                if self.waiting_bases().contains(b) || self.layout_saving_half(&mine, size, c)?.is_none() {
                    return Ok(false);
                }
                self.materialize(c)?;
                Ok(self.keep_at_rest_over(b, size, &mine, c)?.is_some())
            })();
            match done {
                Ok(true) => replaced.push((*b).clone()),
                Ok(false) => tracing::debug!("content {c} is not made the base instead of {b}: it would not save half of {b}, or {b} is waited on"),
                Err(e) => tracing::warn!("making content {c} the base instead of {b}, which nothing needs: {e}"),
            }
        }
        replaced
    }

    /// The contents kept as patches (at rest, or waiting to be written out), listed
    /// under the base each is patched over.
    pub fn patched_over(&self) -> HashMap<ContentHash, Vec<ContentHash>> {
        let mut over: HashMap<ContentHash, Vec<ContentHash>> = HashMap::new();
        for (c, p, _) in self.patched.all().into_iter().filter(|(c, _, _)| !self.blob_path(c).exists()) {
            over.entry(p.base).or_default().push(c);
        }
        over
    }

    /// Looks at every candidate again in the next pass (tests).
    #[cfg(test)]
    pub fn forget_at_rest_looks(&self) {
        self.at_rest_looked_at.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The blobs a patched content waiting to be written out whole is patched over.
    fn waiting_bases(&self) -> HashSet<ContentHash> {
        self.patched.all().into_iter().filter(|(_, p, _)| p.role != Role::AtRest).map(|(_, p, _)| p.base).collect()
    }

    /// The whole blob of `bases` (other than `h`) holding the most bytes of `mine`'s
    /// chunks, by the chunk index (asked once per distinct chunk).
    fn most_similar_whole_blob(&self, h: &ContentHash, mine: &ChunkList, bases: &HashSet<ContentHash>) -> Option<ContentHash> {
        let index = self.chunk_index()?;
        let mut per_chunk: HashMap<(&ContentHash, u32), u64> = HashMap::new();
        for c in &mine.chunks {
            *per_chunk.entry((&c.hash, c.len)).or_default() += c.len as u64;
        }
        let mut shared: HashMap<ContentHash, u64> = HashMap::new();
        for ((hash, len), bytes) in per_chunk {
            let Ok(found) = index.find(hash, len) else {
                continue;
            };
            let blobs: HashSet<ContentHash> = found.into_iter().map(|f| f.blob).filter(|b| b != h && bases.contains(b)).collect();
            for b in blobs {
                *shared.entry(b).or_default() += bytes;
            }
        }
        let mut by_shared: Vec<(u64, ContentHash)> = shared.into_iter().map(|(b, n)| (n, b)).collect();
        by_shared.sort_unstable_by_key(|(n, _)| std::cmp::Reverse(*n));
        by_shared.into_iter().map(|(_, b)| b).find(|b| self.blob_path(b).exists() && !self.patched.has(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::noise;

    /// Reads `size` bytes of a content laid out by `layout_over` over `base`, taking the
    /// patch's blocks from `want`.
    fn read_back(want: &[u8], base: &[u8], from_patch: &[bool], moves: &[Move]) -> Vec<u8> {
        let header = Patched { base: hash_of(base), size: want.len() as u64, from_patch: from_patch.to_vec(), role: Role::AtRest, moves: moves.to_vec() };
        let header = Patched::from_bytes(&header.to_bytes()).expect("the header reads back");
        let mut out = vec![0u8; want.len()];
        for b in 0..from_patch.len() {
            let (in_patch, at) = header.source_of(b);
            let (from, len) = (b * BLOCK as usize, block_len(want.len() as u64, b) as usize);
            let src = if in_patch { &want[at as usize..at as usize + len] } else { &base[at as usize..at as usize + len] };
            out[from..from + len].copy_from_slice(src);
        }
        out
    }

    #[test]
    fn an_older_version_whose_bytes_moved_is_found_in_the_newer_one_but_for_the_blocks_around_the_change() {
        let old = noise(8 << 20, 1);
        // The newer version: 1,000 bytes inserted at 3 MiB, and 300 bytes cut at 6 MiB.
        let mut new = old[..3 << 20].to_vec();
        new.extend_from_slice(&noise(1000, 2));
        new.extend_from_slice(&old[3 << 20..6 << 20]);
        new.extend_from_slice(&old[(6 << 20) + 300..]);
        let (mine, theirs) = (ChunkList::of_reader(&old[..]).unwrap(), ChunkList::of_reader(&new[..]).unwrap());
        let (from_patch, moves) = layout_over(&mine, old.len() as u64, &theirs);
        let kept = from_patch.iter().filter(|p| **p).count();
        assert!(kept <= 12, "only the blocks around the two changes are kept: {kept} of {}", from_patch.len());
        assert!(!moves.is_empty() && moves.iter().any(|m| m.delta == 1000), "the blocks after the insertion are moved: {moves:?}");
        assert!(read_back(&old, &new, &from_patch, &moves) == old, "every block reads as the older version's");
    }

    #[test]
    fn a_content_found_nowhere_in_the_base_is_kept_whole_and_repeated_chunks_keep_their_run() {
        let old = noise(4 << 20, 3);
        let (mine, theirs) = (ChunkList::of_reader(&old[..]).unwrap(), ChunkList::of_reader(&noise(4 << 20, 4)[..]).unwrap());
        let (from_patch, moves) = layout_over(&mine, old.len() as u64, &theirs);
        assert!(from_patch.iter().all(|p| *p) && moves.is_empty(), "nothing in common: all kept");
        // A file of one repeated pattern, shifted: each chunk has several places in the
        // base; the one continuing the run is taken.
        let unit = noise(300 << 10, 5);
        let old: Vec<u8> = unit.iter().cycle().take(6 << 20).copied().collect();
        let mut new = noise(5000, 6);
        new.extend_from_slice(&old);
        let (mine, theirs) = (ChunkList::of_reader(&old[..]).unwrap(), ChunkList::of_reader(&new[..]).unwrap());
        let (from_patch, moves) = layout_over(&mine, old.len() as u64, &theirs);
        assert!(read_back(&old, &new, &from_patch, &moves) == old, "reads back");
        assert!(from_patch.iter().filter(|p| **p).count() <= 8, "the runs hold: {} kept", from_patch.iter().filter(|p| **p).count());
    }
}
