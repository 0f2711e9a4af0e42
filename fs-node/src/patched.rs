//! Contents kept as a patch over another content: a new version of a large file that
//! shares most of its 64 KiB blocks ([`BLOCK`]) with an older one at the same offsets
//! (one page of a database or a disk image written in place, a log appended to). The
//! new version is kept as the blocks that differ, in a sparse file at their own offsets,
//! and the hash of its *base*, a whole blob of the store holding the others: making it
//! costs the changed blocks, not a copy of the file, on the writer and on every node
//! that pulls it over its old version. A background pass later writes each one out as a
//! whole blob (`materialize`), after which it is an ordinary blob again (passthrough
//! reads, chunk lists); until then its bytes are read through [`ContentFile`].
//!
//! An older version kept at rest may also be a patch over a content whose bytes moved
//! (an insertion earlier in the file) or over another file sharing its chunks: its
//! header then says, for runs of blocks, how far from their own offset the base holds
//! them ([`Move`], found from the two chunk lists by `store.rs`).
//!
//! On the disk, in `patched/` of the data directory: `<hash>.patch` (the sparse file of
//! the content's size) and `<hash>` (the header: [`MAGIC`] or [`MAGIC_MOVED`], the base's
//! hash, the size, one bit per block taken from the patch, and with [`MAGIC_MOVED`] the
//! moves). The header is renamed in last: a content is there when its header is. This module owns that format and reading it; the store
//! decides when to make, write out and remove one (`store.rs`).

use crate::leaves::{blocks, BLOCK};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use wire::ContentHash;

/// The first bytes of a header (its format's version), one for each [`Role`]; a
/// header of version 1 (before roles) is a new version's.
const MAGIC: [(&[u8; 8], Role); 3] = [(b"SYNCPAT1", Role::NewVersion), (b"SYNCPATW", Role::Rebased), (b"SYNCPATR", Role::AtRest)];
/// The first bytes of a header with moves (format version 2): the moves follow the bits.
const MAGIC_MOVED: [(&[u8; 8], Role); 3] = [(b"SYNCPM2N", Role::NewVersion), (b"SYNCPM2W", Role::Rebased), (b"SYNCPM2R", Role::AtRest)];

/// Blocks `first..first + count` taken from the base are at `delta` bytes from their
/// own offset there (block `b` is the base's bytes from `b * BLOCK + delta`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    pub first: usize,
    pub count: usize,
    pub delta: i64,
}

/// What the store's background pass does with a patched content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A new version over the one before it: written out whole, then that older one is
    /// kept as a patch over it.
    NewVersion,
    /// Moved onto another content while it waited to be written out (that content may be
    /// newer than it): written out whole, its base left as it is.
    Rebased,
    /// An older version kept as a patch over a newer one: it stays so (written out only
    /// when something needs it whole).
    AtRest,
}

/// Which blocks of a content of `size` bytes come from the patch file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patched {
    pub base: ContentHash,
    pub size: u64,
    /// One per block: true when the block is in the patch file.
    pub from_patch: Vec<bool>,
    pub role: Role,
    /// Runs of blocks the base holds elsewhere than at their own offset (sorted, apart);
    /// every other block taken from the base is at its own offset there.
    pub moves: Vec<Move>,
}

impl Patched {
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.from_patch.len();
        let mut out = Vec::with_capacity(8 + 32 + 16 + n.div_ceil(8) + 8 + self.moves.len() * 24);
        let magics = if self.moves.is_empty() { &MAGIC } else { &MAGIC_MOVED };
        out.extend_from_slice(magics.iter().find(|(_, r)| *r == self.role).expect("every role has a magic").0);
        out.extend_from_slice(self.base.as_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
        let mut bits = vec![0u8; n.div_ceil(8)];
        for (b, &p) in self.from_patch.iter().enumerate() {
            if p {
                bits[b / 8] |= 1 << (b % 8);
            }
        }
        out.extend_from_slice(&bits);
        if !self.moves.is_empty() {
            out.extend_from_slice(&(self.moves.len() as u64).to_le_bytes());
            for m in &self.moves {
                out.extend_from_slice(&(m.first as u64).to_le_bytes());
                out.extend_from_slice(&(m.count as u64).to_le_bytes());
                out.extend_from_slice(&m.delta.to_le_bytes());
            }
        }
        out
    }

    /// A header read back; `None` if it is not one (cut short, another format, a block
    /// count that does not fit the size).
    pub fn from_bytes(b: &[u8]) -> Option<Patched> {
        let find = |magics: &[(&[u8; 8], Role)]| magics.iter().find_map(|(m, role)| Some((b.strip_prefix(m.as_slice())?, *role)));
        let (rest, role, moved) = match find(&MAGIC) {
            Some((rest, role)) => (rest, role, false),
            None => find(&MAGIC_MOVED).map(|(rest, role)| (rest, role, true))?,
        };
        let (base, rest) = rest.split_first_chunk::<32>()?;
        let (size, rest) = rest.split_first_chunk::<8>()?;
        let (n, rest) = rest.split_first_chunk::<8>()?;
        let (size, n) = (u64::from_le_bytes(*size), u64::from_le_bytes(*n) as usize);
        if n != blocks(size) || rest.len() < n.div_ceil(8) {
            return None;
        }
        let (bits, rest) = rest.split_at(n.div_ceil(8));
        let from_patch = (0..n).map(|b| bits[b / 8] & (1 << (b % 8)) != 0).collect();
        let moves = if moved { Self::moves_from_bytes(rest, n)? } else { Vec::new() };
        if !moved && !rest.is_empty() {
            return None;
        }
        Some(Patched { base: ContentHash::from_bytes(*base), size, from_patch, role, moves })
    }

    /// The moves after the bits: sorted, apart, inside the `n` blocks, none before the
    /// base's start, and nothing after them.
    fn moves_from_bytes(b: &[u8], n: usize) -> Option<Vec<Move>> {
        let (count, mut rest) = b.split_first_chunk::<8>()?;
        let count = u64::from_le_bytes(*count) as usize;
        if count == 0 || rest.len() != count.checked_mul(24)? {
            return None;
        }
        let mut moves = Vec::with_capacity(count);
        let mut next_free = 0usize;
        for _ in 0..count {
            let (first, r) = rest.split_first_chunk::<8>()?;
            let (len, r) = r.split_first_chunk::<8>()?;
            let (delta, r) = r.split_first_chunk::<8>()?;
            rest = r;
            let m = Move { first: u64::from_le_bytes(*first) as usize, count: u64::from_le_bytes(*len) as usize, delta: i64::from_le_bytes(*delta) };
            let in_order = m.count > 0 && m.first >= next_free && m.first.checked_add(m.count)? <= n;
            // (A delta beyond any file's size is not one: it bounds every sum made of it.)
            if !in_order || m.delta.unsigned_abs() >= 1 << 62 || (m.first as i64).checked_mul(BLOCK as i64)?.checked_add(m.delta)? < 0 {
                return None;
            }
            next_free = m.first + m.count;
            moves.push(m);
        }
        Some(moves)
    }

    /// How far from its own offset the base holds block `b` (0 unless a move says).
    pub fn delta(&self, b: usize) -> i64 {
        let i = self.moves.partition_point(|m| m.first + m.count <= b);
        self.moves.get(i).filter(|m| m.first <= b).map_or(0, |m| m.delta)
    }

    /// Where the content's bytes `at..at + len` are in the base, when every block they
    /// fall in is read from the base at one distance (and none lies past the content).
    pub fn found_in_base(&self, at: u64, len: u64) -> Option<u64> {
        if len == 0 || at + len > self.size {
            return None;
        }
        let (first, last) = ((at / BLOCK) as usize, ((at + len - 1) / BLOCK) as usize);
        let delta = self.delta(first);
        let all = (first..=last).all(|b| !self.from_patch[b] && self.delta(b) == delta);
        all.then(|| at.wrapping_add_signed(delta))
    }

    /// `self` over `new_base` instead of its base, which is going: each block read from
    /// the old base at some offset is read from the new base where `locate` (offset and
    /// length in the old base) finds those bytes, or else copied from `old_base` into
    /// `patch` (this content's patch file) and read from there.
    pub fn rebased(
        &self,
        new_base: &ContentHash,
        role: Role,
        old_base: &File,
        patch: &File,
        locate: impl Fn(u64, u64) -> Option<u64>,
    ) -> std::io::Result<Patched> {
        let mut from_patch = self.from_patch.clone();
        let mut moves: Vec<Move> = Vec::new();
        for (b, in_patch) in from_patch.iter_mut().enumerate() {
            if *in_patch {
                continue;
            }
            let (_, at) = self.source_of(b);
            let (own, len) = (b as u64 * BLOCK, crate::leaves::block_len(self.size, b));
            match locate(at, len) {
                Some(there) if there as i64 != own as i64 => {
                    let delta = there as i64 - own as i64;
                    match moves.last_mut() {
                        Some(m) if m.first + m.count == b && m.delta == delta => m.count += 1,
                        _ => moves.push(Move { first: b, count: 1, delta }),
                    }
                }
                Some(_) => {}
                None => {
                    copy_range_at(old_base, at, patch, own, len)?;
                    *in_patch = true;
                }
            }
        }
        Ok(Patched { base: new_base.clone(), size: self.size, from_patch, role, moves })
    }

    /// Where block `b` is read: in the patch file (at its own offset) or in the base (at
    /// its own offset moved by [`Patched::delta`]).
    pub fn source_of(&self, b: usize) -> (bool, u64) {
        let own = b as u64 * BLOCK;
        if self.from_patch.get(b).copied().unwrap_or(false) {
            (true, own)
        } else {
            (false, own.wrapping_add_signed(self.delta(b)))
        }
    }

    pub fn patched_blocks(&self) -> usize {
        self.from_patch.iter().filter(|p| **p).count()
    }
}

/// Now, or a nanosecond after the last time this gave if that is not earlier.
fn next_made() -> std::time::SystemTime {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let prev = LAST.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| Some(now.max(last + 1))).unwrap_or_else(|last| last);
    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(now.max(prev + 1))
}

/// Where the patched contents of a store are.
#[derive(Clone, Debug)]
pub struct PatchedDir {
    dir: PathBuf,
}

impl PatchedDir {
    pub fn open(dir: PathBuf) -> std::io::Result<PatchedDir> {
        std::fs::create_dir_all(&dir)?;
        Ok(PatchedDir { dir })
    }

    pub fn header_path(&self, h: &ContentHash) -> PathBuf {
        self.dir.join(h.to_hex().as_str())
    }

    pub fn patch_path(&self, h: &ContentHash) -> PathBuf {
        self.dir.join(format!("{}.patch", h.to_hex().as_str()))
    }

    /// The header of patched content `h`, if the store has it as one.
    pub fn header(&self, h: &ContentHash) -> Option<Patched> {
        Patched::from_bytes(&std::fs::read(self.header_path(h)).ok()?)
    }

    /// When patched content `h` was made: its header's mtime, set from `next_made` (a
    /// clock that never gives one time twice, so two contents made within the file
    /// system's timestamp granularity still have an order) and kept when the header is
    /// replaced.
    pub fn made(&self, h: &ContentHash) -> Option<std::time::SystemTime> {
        std::fs::metadata(self.header_path(h)).and_then(|m| m.modified()).ok()
    }

    pub fn has(&self, h: &ContentHash) -> bool {
        self.header_path(h).exists()
    }

    /// Every patched content here, with its header and the header's age.
    pub fn all(&self) -> Vec<(ContentHash, Patched, std::time::Duration)> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in dir.flatten() {
            let Some(h) = e.file_name().to_str().and_then(|s| s.parse::<ContentHash>().ok()) else {
                continue;
            };
            let age = e.metadata().and_then(|m| m.modified()).map(|t| t.elapsed().unwrap_or_default()).unwrap_or_default();
            if let Some(p) = self.header(&h) {
                out.push((h, p, age));
            }
        }
        out
    }

    /// Patch files without a header (a crash between the two renames), older than
    /// `min_age`: removed.
    pub fn remove_orphans(&self, min_age: std::time::Duration) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(h) = name.to_str().and_then(|s| s.strip_suffix(".patch")).and_then(|s| s.parse::<ContentHash>().ok()) else {
                continue;
            };
            let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().unwrap_or_default() >= min_age);
            if old && !self.has(&h) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Makes `h` a patched content: `patch` (a file of `header.size` bytes holding at
    /// least the blocks `header` takes from it, at their offsets) is renamed in, then the
    /// header, written through `tmp_header`. With `durable`, both are flushed first.
    pub fn put(&self, h: &ContentHash, patch: &Path, header: &Patched, tmp_header: &Path, durable: bool) -> std::io::Result<()> {
        let mut f = File::create(tmp_header)?;
        std::io::Write::write_all(&mut f, &header.to_bytes())?;
        f.set_modified(next_made())?;
        if durable {
            f.sync_data()?;
            File::open(patch)?.sync_data()?;
        }
        std::fs::rename(patch, self.patch_path(h))?;
        std::fs::rename(tmp_header, self.header_path(h))?;
        if durable {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Gives patched content `h` a new header (another base), durably: its patch file
    /// already holds every block the new header takes from it (blocks written into holes
    /// the old header did not read), so a reader of either header reads the same bytes.
    pub fn replace_header(&self, h: &ContentHash, header: &Patched, tmp_header: &Path) -> std::io::Result<()> {
        File::open(self.patch_path(h))?.sync_data()?;
        let made = self.made(h).unwrap_or_else(next_made);
        let mut f = File::create(tmp_header)?;
        std::io::Write::write_all(&mut f, &header.to_bytes())?;
        f.set_modified(made)?;
        f.sync_data()?;
        std::fs::rename(tmp_header, self.header_path(h))?;
        File::open(&self.dir)?.sync_all()
    }

    /// Removes patched content `h` (header first: it is gone from then on).
    pub fn remove(&self, h: &ContentHash) -> bool {
        let gone = std::fs::remove_file(self.header_path(h)).is_ok();
        let _ = std::fs::remove_file(self.patch_path(h));
        gone
    }

    /// Flushes patched content `h` to the disk.
    pub fn sync(&self, h: &ContentHash) -> std::io::Result<()> {
        File::open(self.patch_path(h))?.sync_data()?;
        File::open(self.header_path(h))?.sync_data()?;
        File::open(&self.dir)?.sync_all()
    }
}

/// A content open for reading at offsets, whichever way the store keeps it. Open
/// descriptors keep reading the same bytes after the store writes a patched content
/// out or removes its base.
#[derive(Debug)]
pub enum ContentFile {
    Whole(File),
    Patched { base: File, patch: File, header: Patched },
}

impl ContentFile {
    pub fn size(&self) -> std::io::Result<u64> {
        match self {
            ContentFile::Whole(f) => Ok(f.metadata()?.len()),
            ContentFile::Patched { header, .. } => Ok(header.size),
        }
    }

    /// Whether this reads the file whose (st_dev, st_ino) is `key`.
    pub fn uses_file(&self, key: (u64, u64)) -> bool {
        use std::os::unix::fs::MetadataExt;
        let is = |f: &File| f.metadata().is_ok_and(|m| (m.dev(), m.ino()) == key);
        match self {
            ContentFile::Whole(f) => is(f),
            ContentFile::Patched { base, patch, .. } => is(base) || is(patch),
        }
    }

    /// The file itself, when the content is one whole file (it can be passed through).
    pub fn whole(&self) -> Option<&File> {
        match self {
            ContentFile::Whole(f) => Some(f),
            ContentFile::Patched { .. } => None,
        }
    }

    /// Reads at `offset`, at most to the end of the block it falls in; 0 at the end.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let (base, patch, header) = match self {
            ContentFile::Whole(f) => return f.read_at(buf, offset),
            ContentFile::Patched { base, patch, header } => (base, patch, header),
        };
        if offset >= header.size {
            return Ok(0);
        }
        let b = (offset / BLOCK) as usize;
        let end = ((b as u64 + 1) * BLOCK).min(header.size);
        let n = buf.len().min((end - offset) as usize);
        let (in_patch, at) = header.source_of(b);
        let (from, at) = (if in_patch { patch } else { base }, at + offset % BLOCK);
        let mut done = 0;
        while done < n {
            let got = from.read_at(&mut buf[done..n], at + done as u64)?;
            if got == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "a patched content's file ends early"));
            }
            done += got;
        }
        Ok(n)
    }

    /// Fills `buf` from `offset` (shorter only at the end of the content).
    pub fn read_full_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    /// Copies block `b` (of a content of `size` bytes) into `dst` at the same offset.
    pub fn copy_block_to(&self, b: usize, size: u64, dst: &File) -> std::io::Result<()> {
        let offset = b as u64 * BLOCK;
        let len = crate::leaves::block_len(size, b);
        match self {
            ContentFile::Whole(f) => copy_range(f, dst, offset, len),
            ContentFile::Patched { base, patch, header } => {
                let (in_patch, at) = header.source_of(b);
                copy_range_at(if in_patch { patch } else { base }, at, dst, offset, len)
            }
        }
    }

    /// Writes the whole content into `dst` (runs of blocks from one file copied in the
    /// kernel).
    pub fn copy_all_to(&self, dst: &File) -> std::io::Result<()> {
        match self {
            ContentFile::Whole(f) => copy_range(f, dst, 0, f.metadata()?.len()),
            ContentFile::Patched { base, patch, header } => {
                // Runs of blocks read from one file, each at the same distance from its
                // own offset.
                let n = header.from_patch.len();
                let source = |b: usize| (header.from_patch[b], header.delta(b));
                let mut b = 0;
                while b < n {
                    let run = source(b);
                    let first = b;
                    while b < n && (source(b) == run || (run.0 && header.from_patch[b])) {
                        b += 1;
                    }
                    let (from, to) = (first as u64 * BLOCK, (b as u64 * BLOCK).min(header.size));
                    let (in_patch, at) = header.source_of(first);
                    copy_range_at(if in_patch { patch } else { base }, at, dst, from, to - from)?;
                }
                dst.set_len(header.size)
            }
        }
    }
}

/// Copies `len` bytes at `offset` of `src` to the same offset of `dst`, in the kernel
/// where it can (`copy_file_range`).
pub fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> std::io::Result<()> {
    copy_range_at(src, offset, dst, offset, len)
}

/// Copies `len` bytes at `src_offset` of `src` to `dst_offset` of `dst` (in the kernel
/// where it can).
pub fn copy_range_at(src: &File, src_offset: u64, dst: &File, dst_offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let (mut off_in, mut off_out) = (src_offset as libc::loff_t, dst_offset as libc::loff_t);
    let end = dst_offset + len;
    while (off_out as u64) < end {
        let want = (end - off_out as u64).min(1 << 30) as usize;
        // SAFETY: valid descriptors and offsets owned by this frame.
        let n = unsafe { libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, want, 0) };
        if n > 0 {
            continue;
        }
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the source ended early"));
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP)) {
            return Err(e);
        }
        // No copy_file_range between these two: through a buffer.
        let mut buf = vec![0u8; 1 << 20];
        while (off_out as u64) < end {
            let n = (end - off_out as u64).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], off_in as u64)?;
            dst.write_all_at(&buf[..n], off_out as u64)?;
            off_in += n as libc::loff_t;
            off_out += n as libc::loff_t;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_reads_back_and_a_damaged_one_does_not() {
        let p = Patched {
            base: ContentHash::from_bytes(*blake3::hash(b"base").as_bytes()),
            size: 9 * BLOCK + 5,
            from_patch: (0..10).map(|b| b % 3 == 0).collect(),
            role: Role::NewVersion,
            moves: Vec::new(),
        };
        let bytes = p.to_bytes();
        assert_eq!(Patched::from_bytes(&bytes), Some(p.clone()));
        assert_eq!(&bytes[..8], b"SYNCPAT1", "a new version's header is what version 1 wrote");
        for role in [Role::Rebased, Role::AtRest] {
            let q = Patched { role, ..p.clone() };
            assert_eq!(Patched::from_bytes(&q.to_bytes()), Some(q), "{role:?} reads back");
        }
        assert_eq!(Patched::from_bytes(&bytes[..bytes.len() - 1]), None, "cut short");
        let mut other = bytes.clone();
        other[7] = b'2';
        assert_eq!(Patched::from_bytes(&other), None, "another format");
        let wrong_count = Patched { from_patch: vec![true; 3], ..p };
        assert_eq!(Patched::from_bytes(&wrong_count.to_bytes()), None, "block count not the size's");
    }

    #[test]
    fn a_header_with_moves_reads_back_and_impossible_moves_do_not() {
        let p = Patched {
            base: ContentHash::from_bytes(*blake3::hash(b"base").as_bytes()),
            size: 20 * BLOCK,
            from_patch: (0..20).map(|b| b == 4).collect(),
            role: Role::AtRest,
            moves: vec![Move { first: 5, count: 10, delta: 1000 }, Move { first: 15, count: 2, delta: -700 }],
        };
        let bytes = p.to_bytes();
        assert_eq!(&bytes[..8], b"SYNCPM2R");
        let back = Patched::from_bytes(&bytes).expect("reads back");
        assert_eq!(back, p);
        assert_eq!((back.delta(4), back.delta(5), back.delta(14), back.delta(15), back.delta(17)), (0, 1000, 1000, -700, 0));
        assert_eq!(back.source_of(4), (true, 4 * BLOCK), "a patch block at its own offset");
        assert_eq!(back.source_of(6), (false, 6 * BLOCK + 1000));
        for (what, moves) in [
            ("overlapping", vec![Move { first: 5, count: 10, delta: 1 }, Move { first: 14, count: 1, delta: 2 }]),
            ("past the end", vec![Move { first: 19, count: 2, delta: 1 }]),
            ("before the base's start", vec![Move { first: 0, count: 1, delta: -1 }]),
            ("empty", vec![Move { first: 3, count: 0, delta: 1 }]),
        ] {
            assert_eq!(Patched::from_bytes(&Patched { moves, ..p.clone() }.to_bytes()), None, "{what}");
        }
        assert_eq!(Patched::from_bytes(&bytes[..bytes.len() - 1]), None, "cut short");
    }

    #[test]
    fn a_patched_content_reads_its_blocks_from_the_patch_and_the_rest_from_the_base() {
        let d = tempfile::tempdir().unwrap();
        let size = 3 * BLOCK + 100;
        let base: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut want = base.clone();
        want[(BLOCK + 7) as usize] ^= 0xff;
        want[(3 * BLOCK + 99) as usize] ^= 0xff;
        std::fs::write(d.path().join("base"), &base).unwrap();
        let patch = File::options().read(true).write(true).create(true).truncate(true).open(d.path().join("patch")).unwrap();
        patch.set_len(size).unwrap();
        for b in [1usize, 3] {
            let (from, to) = (b as u64 * BLOCK, ((b as u64 + 1) * BLOCK).min(size));
            patch.write_all_at(&want[from as usize..to as usize], from).unwrap();
        }
        let header = Patched {
            base: ContentHash::from_bytes(*blake3::hash(&base).as_bytes()),
            size,
            from_patch: vec![false, true, false, true],
            role: Role::NewVersion,
            moves: Vec::new(),
        };
        let c = ContentFile::Patched { base: File::open(d.path().join("base")).unwrap(), patch, header };
        assert_eq!(c.size().unwrap(), size);
        let mut got = vec![0u8; size as usize + 10];
        assert_eq!(c.read_full_at(&mut got, 0).unwrap(), size as usize);
        assert!(got[..size as usize] == want[..], "every block from the right file");
        let mut mid = vec![0u8; 20];
        assert_eq!(c.read_at(&mut mid, BLOCK - 10).unwrap(), 10, "a read stops at its block's end");
        let out = File::options().read(true).write(true).create(true).truncate(true).open(d.path().join("out")).unwrap();
        c.copy_all_to(&out).unwrap();
        assert!(std::fs::read(d.path().join("out")).unwrap() == want, "written out whole");
    }
}
