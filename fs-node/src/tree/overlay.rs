//! Writing in place into a large file without copying it first. A file of
//! [`OVERLAY_MIN_BYTES`] or more opened for writing (and not truncated) gets a *sparse*
//! work file and an [`Overlay`]: the 64 KiB blocks (`leaves::BLOCK`) a write touches
//! are copied from the committed content into the work file first (*present*), and every
//! other block is read from that content. The close hashes only the present blocks (the
//! others keep their cached leaves) and keeps the new version as a patch over the old one
//! (`patched.rs`): an edit of one byte costs a block, not the file, twice.
//!
//! The overlay belongs to one work file (`work`): an entry whose work file is no longer
//! the inode's is stale and dropped when found. A truncation keeps it (`set_len`): the
//! block the new size cuts short (and the base's short last block, when the file grows
//! past it) is copied in first, and the blocks past the new end stop being the base's
//! (should the file grow again, they are the zeros of the work file). Invariant: every
//! block still read from the base lies whole in the file, with the extent it has in the
//! base, so its cached leaf is its leaf in the file.

use super::*;
use crate::leaves::{block_len, blocks, BLOCK};
use crate::patched::ContentFile;
use blake3::hazmat::ChainingValue;

/// Files at least this large are written through an overlay (when their leaves are at
/// hand); a smaller one is copied whole, which costs less than the bookkeeping.
pub const OVERLAY_MIN_BYTES: u64 = crate::chunks::CHUNKED_MIN_BYTES;

pub(super) struct Overlay {
    /// The work file this describes.
    work: Arc<File>,
    base_hash: ContentHash,
    base: Arc<ContentFile>,
    base_size: u64,
    base_leaves: Arc<Vec<ChainingValue>>,
    /// One per block of the base: its bytes are in the work file.
    present: Vec<bool>,
}

/// What hashing a work file with an overlay needs, taken under the lock.
pub(super) struct OverlayView {
    base_size: u64,
    base_leaves: Arc<Vec<ChainingValue>>,
    present: Vec<bool>,
}

impl Overlay {
    /// Whether this is the overlay of work file `work`.
    pub(super) fn describes(&self, work: &Arc<File>) -> bool {
        Arc::ptr_eq(&self.work, work)
    }

    /// Whether block `b` of the file is read from the base (not in the work file).
    fn read_from_base(&self, b: usize) -> bool {
        b < self.present.len() && !self.present[b]
    }

    /// Copies the base's blocks a write of `len` bytes at `offset` covers only in part
    /// into the work file and marks them present; returns the blocks it covers whole,
    /// which are present once the write landed ([`Overlay::wrote`]: a write that fails
    /// leaves them read from the base). A write past the end of a base whose last block
    /// is short takes that block first (the bytes between are zeros in the work file, as
    /// in the new file).
    fn before_write(&mut self, offset: u64, len: u64) -> std::io::Result<Vec<usize>> {
        let mut covered_whole = Vec::new();
        if len == 0 {
            return Ok(covered_whole);
        }
        let end = offset + len;
        let last_base = self.present.len().saturating_sub(1);
        let mut touched: Vec<usize> = ((offset / BLOCK) as usize..=((end - 1) / BLOCK) as usize).filter(|b| *b < self.present.len()).collect();
        if end > self.base_size && !self.base_size.is_multiple_of(BLOCK) && !touched.contains(&last_base) {
            touched.push(last_base);
        }
        for b in touched {
            if !self.read_from_base(b) {
                continue;
            }
            let (first, block_end) = (b as u64 * BLOCK, b as u64 * BLOCK + block_len(self.base_size, b));
            if offset <= first && end >= block_end {
                covered_whole.push(b);
                continue;
            }
            self.base.copy_block_to(b, self.base_size, &self.work)?;
            self.present[b] = true;
        }
        Ok(covered_whole)
    }

    /// A write covering `blocks` whole landed: they are in the work file.
    fn wrote(&mut self, blocks: &[usize]) {
        for b in blocks {
            self.present[*b] = true;
        }
    }

    /// Sets the work file to `len` bytes (more than a block), keeping the invariant of the
    /// module: of the blocks read from the base, only the new last one and the base's
    /// last one can change extent; those are copied in first.
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        let n = blocks(len);
        for b in [n - 1, self.present.len().saturating_sub(1)] {
            if b < n && block_len(len, b) != block_len(self.base_size, b) {
                self.fill_block(b)?;
            }
        }
        self.work.set_len(len)?;
        // (once the work file is cut: should that fail, the blocks stay the base's)
        self.present.truncate(n);
        Ok(())
    }

    /// Fills every block still read from the base into the work file.
    fn fill(&mut self) -> std::io::Result<()> {
        (0..self.present.len()).try_for_each(|b| self.fill_block(b))
    }

    /// Copies block `b` into the work file if it is still read from the base.
    fn fill_block(&mut self, b: usize) -> std::io::Result<()> {
        if self.read_from_base(b) {
            self.base.copy_block_to(b, self.base_size, &self.work)?;
            self.present[b] = true;
        }
        Ok(())
    }

    /// `size` bytes of the file at `offset` (less at its end, `file_size`).
    fn read(&self, offset: u64, size: u32, file_size: u64) -> std::io::Result<Vec<u8>> {
        let end = (offset + size as u64).min(file_size);
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        let mut at = offset;
        while at < end {
            let b = (at / BLOCK) as usize;
            let to = ((b as u64 + 1) * BLOCK).min(end);
            let piece = &mut buf[(at - offset) as usize..(to - offset) as usize];
            if self.read_from_base(b) {
                let n = self.base.read_full_at(piece, at)?;
                piece[n..].fill(0);
            } else {
                read_full(&self.work, piece, at)?;
            }
            at = to;
        }
        Ok(buf)
    }

    fn view(&self) -> OverlayView {
        OverlayView { base_size: self.base_size, base_leaves: self.base_leaves.clone(), present: self.present.clone() }
    }
}

fn read_full(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            // Past the end of the work file: zeros, as in the file.
            buf[done..].fill(0);
            return Ok(());
        }
        done += n;
    }
    Ok(())
}

impl OverlayView {
    /// The hash, size and leaves of the file whose work file is `work`, `size` bytes:
    /// the base's leaves for the blocks read from it, the others hashed from the work
    /// file. Also which blocks are in the work file (the patch).
    pub(super) fn hash(&self, work: &File, size: u64) -> std::io::Result<(crate::store::Hashed, Vec<bool>)> {
        let n = blocks(size);
        let mut leaves = Vec::with_capacity(n);
        let mut from_patch = Vec::with_capacity(n);
        let mut buf = vec![0u8; BLOCK as usize];
        for b in 0..n {
            let len = block_len(size, b);
            let from_base = b < self.present.len() && !self.present[b] && len == block_len(self.base_size, b);
            if from_base {
                leaves.push(self.base_leaves[b]);
            } else {
                read_full(work, &mut buf[..len as usize], b as u64 * BLOCK)?;
                leaves.push(crate::leaves::leaf(&buf[..len as usize], b as u64 * BLOCK));
            }
            from_patch.push(!from_base);
        }
        let hash = crate::leaves::root(&leaves, size).ok_or_else(|| std::io::Error::other("merging the leaves of a work file"))?;
        Ok((crate::store::Hashed { hash, size, leaves: Some(leaves) }, from_patch))
    }
}

impl State {
    /// The overlay of `ino`'s current work file, if it has one (a stale entry goes).
    pub(super) fn overlay_mut(&mut self, ino: u64) -> Option<&mut Overlay> {
        // Every read and write asks: most nodes have no overlay at all.
        if self.overlays.is_empty() {
            return None;
        }
        let work = self.inodes.get(&ino).and_then(|i| i.work.as_ref());
        let current = match (work, self.overlays.get(&ino)) {
            (Some(w), Some(o)) => o.describes(w),
            (_, None) => return None,
            (None, Some(_)) => false,
        };
        if !current {
            self.overlays.remove(&ino);
            return None;
        }
        self.overlays.get_mut(&ino).map(|o| &mut **o)
    }

    /// The committed content of `ino` that its next change would write through an
    /// overlay (`ensure_work`) were its leaves cached, if they are not.
    pub(super) fn overlay_base_without_leaves(&self, ino: u64, store: &ContentStore) -> Option<ContentHash> {
        let i = self.inode(ino).ok()?;
        let hash = i.hash.as_ref().filter(|_| i.kind == Kind::File && i.work.is_none() && i.passthrough.is_none())?;
        let large = i.size >= OVERLAY_MIN_BYTES && i.size > store.small_max();
        (large && !store.has_cached_leaves(hash, i.size)).then(|| hash.clone())
    }

    /// A sparse work file for `ino` over its committed content `hash` (`size` bytes)
    /// and its overlay, if the content is large enough and its leaves are at hand.
    pub(super) fn start_overlay(&mut self, ino: u64, hash: &ContentHash, store: &ContentStore) -> FsResult<Option<Arc<File>>> {
        let Some(size) = store.size_of(hash).filter(|s| *s >= OVERLAY_MIN_BYTES && *s > store.small_max()) else {
            return Ok(None);
        };
        let Some(leaves) = store.cached_leaves(hash) else {
            return Ok(None);
        };
        let base = match store.open_content(hash) {
            Ok(c) => c,
            Err(e) => return Err(FsError::Io(anyhow::Error::new(e).context(format!("opening content {hash}")))),
        };
        let work = Arc::new(store.new_sparse_work_file(ino, size)?);
        let overlay = Overlay {
            work: work.clone(),
            base_hash: hash.clone(),
            base: Arc::new(base),
            base_size: size,
            base_leaves: Arc::new(leaves),
            present: vec![false; blocks(size)],
        };
        self.overlays.insert(ino, Box::new(overlay));
        Ok(Some(work))
    }

    /// Readies the work file of `ino` for a write of `len` bytes at `offset`; returns
    /// what to give `overlay_wrote` once the write landed.
    pub(super) fn overlay_before_write(&mut self, ino: u64, offset: u64, len: u64) -> FsResult<Vec<usize>> {
        match self.overlay_mut(ino) {
            Some(o) => Ok(o.before_write(offset, len)?),
            None => Ok(Vec::new()),
        }
    }

    /// A write into `ino`'s work file landed (see `overlay_before_write`).
    pub(super) fn overlay_wrote(&mut self, ino: u64, covered_whole: &[usize]) {
        if let Some(o) = self.overlay_mut(ino) {
            o.wrote(covered_whole);
        }
    }

    /// The file `key` (st_dev, st_ino) stopped being a blob of the store (a passthrough
    /// writer took it): overlays reading from it reopen their base from the store.
    pub(super) fn reopen_overlay_bases(&mut self, key: (u64, u64), store: &ContentStore) -> FsResult<()> {
        for o in self.overlays.values_mut() {
            if o.base.uses_file(key) {
                let base =
                    store.open_content(&o.base_hash).map_err(|e| FsError::Io(anyhow::Error::new(e).context(format!("reopening content {}", o.base_hash))))?;
                o.base = Arc::new(base);
            }
        }
        Ok(())
    }

    /// Sets `ino`'s work file `work` to `len` bytes: through its overlay, which stays
    /// (`Overlay::set_len`), or, to one block or none (whose hash merges no leaves),
    /// without it: the block kept is copied in, and the overlay goes.
    pub(super) fn set_work_len(&mut self, ino: u64, work: &File, len: u64) -> FsResult<()> {
        match self.overlay_mut(ino) {
            Some(o) if len > BLOCK => Ok(o.set_len(len)?),
            Some(o) => {
                if len > 0 {
                    o.fill_block(0)?;
                }
                // (cut first: should that fail, the overlay still reads the other blocks)
                work.set_len(len)?;
                self.overlays.remove(&ino);
                Ok(())
            }
            None => Ok(work.set_len(len)?),
        }
    }

    /// Reads `ino`'s file through its overlay, if its work file has one.
    pub(super) fn read_overlay(&mut self, ino: u64, offset: u64, size: u32) -> Option<FsResult<Vec<u8>>> {
        let file_size = self.inodes.get(&ino)?.size;
        let o = self.overlay_mut(ino)?;
        Some(o.read(offset, size, file_size).map_err(FsError::from))
    }

    /// What hashing `ino`'s work file needs, if it has an overlay.
    pub(super) fn overlay_view(&mut self, ino: u64) -> Option<OverlayView> {
        self.overlay_mut(ino).map(|o| o.view())
    }

    /// Commits the work file `work` of `ino`, which has an overlay: hashed (or
    /// `prehashed`, taken with the same view), and kept as a patch over the base. The
    /// overlay goes (back if the transaction fails).
    pub(super) fn commit_overlay(
        &mut self,
        ino: u64,
        work: &Arc<File>,
        store: &ContentStore,
        prehashed: Option<(crate::store::Hashed, Vec<bool>)>,
    ) -> FsResult<crate::store::CommittedWork> {
        let o = self.overlays.get_mut(&ino).expect("the caller found the overlay");
        let size = work.metadata()?.len();
        let (hashed, from_patch) = match prehashed {
            Some(p) => p,
            None => o.view().hash(work, size)?,
        };
        let base = o.base_hash.clone();
        let committed = match store.install_work_patched(ino, work, hashed.clone(), &base, from_patch) {
            Ok(c) => c,
            Err(e) => {
                // (the base went, the disk is full...): kept whole instead, the blocks
                // still read from the base copied in from the descriptors open.
                tracing::info!(ino, "keeping a file written in place as a patch did not work ({e:#}); keeping it whole");
                o.fill()?;
                store.install_work_file(ino, work, hashed)?
            }
        };
        let o = self.overlays.remove(&ino).expect("found above");
        self.record(|| Undo::Overlay(ino, o));
        Ok(committed)
    }
}
