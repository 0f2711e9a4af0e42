//! Content store: immutable contents named by their BLAKE3 hash (a small one as a row of
//! `small.db`, `small.rs`; a larger one as a blob file), work files for files being
//! written (in memory while small, `new_work_file`), and a tmp area for downloads. Local
//! only: no network I/O, and it never decides anything about sync.

pub use crate::patched::copy_range;
use crate::patched::{ContentFile, Move, Patched, PatchedDir, Role};
use crate::small::{SmallContents, SMALL_MAX};
use anyhow::Context;
use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use wire::ContentHash;

mod at_rest;
pub use at_rest::{AtRestBases, AT_REST_MIN_BYTES};

/// Space kept free for the node database on the disk it shares with the store: room
/// for a few hundred pages of its log, so that on a full disk deletes can still be
/// recorded, and free space.
pub const DB_RESERVE_BYTES: u64 = 1 << 20;

/// The file that holds `DB_RESERVE_BYTES` of the data directory `data`.
fn reserve_path(data: &Path) -> PathBuf {
    data.join("reserve")
}

/// The store's three directories under the node's data directory, and the file holding
/// the node database's reserve.
#[derive(Clone, Debug)]
pub struct ContentStore {
    blobs: PathBuf,
    /// Contents of at most `SMALL_MAX` bytes: every one kept from now on goes there.
    small: std::sync::Arc<SmallContents>,
    /// The largest content kept there (`SMALL_MAX`; 0 in tests of blob files).
    small_max: u64,
    /// The device of the data directory: a work file elsewhere is in memory.
    dev: u64,
    work: PathBuf,
    /// Inodes whose files were being written when the previous run ended (their work
    /// files were found at start-up, and removed).
    abandoned_work: Vec<u64>,
    tmp: PathBuf,
    reserve: PathBuf,
    /// Chunk lists of blobs (`chunks.rs`), by the blob's hash.
    chunk_lists: PathBuf,
    /// Blobs whose chunk list is being computed: another asker waits for it.
    chunking: std::sync::Arc<(std::sync::Mutex<std::collections::HashSet<ContentHash>>, std::sync::Condvar)>,
    /// Which blob has which chunk (`chunk_index.rs`), opened on first use; `None` if it
    /// cannot be opened (pulls then copy chunks only from the path's old version).
    chunk_index: std::sync::Arc<std::sync::OnceLock<Option<crate::chunk_index::ChunkIndex>>>,
    /// Contents kept as a patch over a base blob (`patched.rs`).
    patched: PatchedDir,
    /// Held while a patched content is made, written out or removed, and while the GC or
    /// a removal decides which blobs are bases: a base never goes while a patched content
    /// names it.
    patching: std::sync::Arc<std::sync::Mutex<()>>,
    /// How long a new patched content rests before it is written out whole (`None`:
    /// only when something needs it whole; tests).
    write_out_after: Option<std::time::Duration>,
    /// Contents `keep_at_rest` looked at already (in this run), with how
    /// many blobs the chunk index had indexed then, and when.
    at_rest_looked_at: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<ContentHash, (u64, std::time::Instant)>>>,
}

/// How long a patched content rests before it is written out whole.
pub const MATERIALIZE_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// What `ContentStore::commit_work_file` did.
#[derive(Debug)]
pub struct CommittedWork {
    pub hash: ContentHash,
    pub size: u64,
    /// The work file became the blob; otherwise the store had the content already and
    /// the work file is still there.
    pub moved: bool,
}

/// Reads a blob for work done in the background (its chunk list, its leaves) and stops
/// with `NotFound` once the blob is removed: the space of a removed blob comes back only
/// when the last descriptor on it closes, and a full disk must not wait for a background
/// pass over a large file that is no longer wanted. Every open reader is known
/// ([`BlobReader::wait_for_removed`]), so a full disk that removed blobs can wait the
/// moment it takes such passes to let go, instead of failing a write the space would fit.
pub struct BlobReader {
    file: std::fs::File,
    path: PathBuf,
    unchecked: usize,
}

/// The blobs background passes have open (a path once per reader), and a signal when
/// one closes.
static OPEN_READERS: (std::sync::Mutex<Vec<PathBuf>>, std::sync::Condvar) = (std::sync::Mutex::new(Vec::new()), std::sync::Condvar::new());

impl BlobReader {
    /// Bytes read between two looks at whether the blob is still there.
    const CHECK_EVERY: usize = 1 << 20;

    pub fn open(path: &Path) -> std::io::Result<BlobReader> {
        let file = std::fs::File::open(path)?;
        OPEN_READERS.0.lock().unwrap_or_else(|p| p.into_inner()).push(path.to_path_buf());
        Ok(BlobReader { file, path: path.to_path_buf(), unchecked: 0 })
    }

    pub fn size(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Waits, at most `within`, until no background pass holds a blob that was removed
    /// (each notices within a MiB of reading and closes it); returns whether none does.
    pub fn wait_for_removed(within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        let mut open = OPEN_READERS.0.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if open.iter().all(|p| p.exists()) {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            open = OPEN_READERS.1.wait_timeout(open, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// A file in the store's tmp area, removed when dropped (unless installed by then: its
/// name is gone).
pub struct TmpCopy(PathBuf);

impl Drop for TmpCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Drop for BlobReader {
    fn drop(&mut self) {
        let mut open = OPEN_READERS.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = open.iter().position(|p| *p == self.path) {
            open.swap_remove(i);
        }
        OPEN_READERS.1.notify_all();
    }
}

impl std::io::Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.unchecked >= Self::CHECK_EVERY {
            self.unchecked = 0;
            if !self.path.exists() {
                return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("{} was removed", self.path.display())));
            }
        }
        let n = self.file.read(buf)?;
        self.unchecked += n;
        Ok(n)
    }
}

pub fn hash_of(bytes: &[u8]) -> ContentHash {
    ContentHash::from_bytes(*blake3::hash(bytes).as_bytes())
}

impl ContentStore {
    pub fn open(data: &Path) -> anyhow::Result<ContentStore> {
        Self::open_with_small_max(data, SMALL_MAX)
    }

    /// [`Self::open`], keeping contents of at most `small_max` bytes as rows (0: every
    /// content a blob file, for tests of what only blob files do).
    pub fn open_with_small_max(data: &Path, small_max: u64) -> anyhow::Result<ContentStore> {
        use std::os::unix::fs::MetadataExt;
        std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
        let mut s = ContentStore {
            blobs: data.join("blobs"),
            small: std::sync::Arc::new(SmallContents::open(&data.join("small.db"))?),
            small_max: small_max.min(SMALL_MAX),
            dev: std::fs::metadata(data).with_context(|| format!("reading {}", data.display()))?.dev(),
            work: data.join("work"),
            tmp: data.join("tmp"),
            reserve: reserve_path(data),
            chunk_lists: data.join("chunks"),
            chunking: Default::default(),
            chunk_index: Default::default(),
            abandoned_work: Vec::new(),
            patched: PatchedDir::open(data.join("patched")).with_context(|| format!("creating {}", data.join("patched").display()))?,
            patching: Default::default(),
            write_out_after: Some(MATERIALIZE_AFTER),
            at_rest_looked_at: Default::default(),
        };
        for d in [&s.blobs, &s.work, &s.tmp, &s.chunk_lists] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        // Work and tmp files of a previous run belong to nobody any more; the inodes
        // whose work files were left are remembered (`abandoned_work`).
        let mut abandoned = Vec::new();
        for d in [&s.work, &s.tmp] {
            for e in std::fs::read_dir(d)?.flatten() {
                if *d == s.work {
                    abandoned.extend(e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()));
                }
                let _ = std::fs::remove_file(e.path());
            }
        }
        abandoned.sort_unstable();
        s.abandoned_work = abandoned;
        s.ensure_empty_blob()?;
        s.ensure_reserve();
        // Patched contents a previous run had not written out yet; one that lost its
        // patch or its base is gone (its files are pulled again).
        for (h, p, _) in s.patched.all() {
            if s.blob_path(&h).exists() {
                s.patched.remove(&h);
            } else if s.blob_path(&p.base).exists() && s.patched.patch_path(&h).exists() {
                if p.role != Role::AtRest {
                    s.materialize_later(&h);
                }
            } else {
                tracing::warn!("patched content {h} lacks its patch or its base {}: dropped", p.base);
                s.patched.remove(&h);
            }
        }
        Ok(s)
    }

    /// Sets aside `DB_RESERVE_BYTES` for the node database if that space is not held
    /// yet (at start and at every GC; on a disk too full for it, later).
    pub fn ensure_reserve(&self) {
        use std::os::fd::AsRawFd;
        if std::fs::metadata(&self.reserve).is_ok_and(|m| m.len() == DB_RESERVE_BYTES) {
            return;
        }
        let Ok(f) = File::create(&self.reserve) else {
            return;
        };
        // Allocated, not sparse: the blocks must be there to give back.
        // SAFETY: a valid descriptor; posix_fallocate only reads its arguments.
        if unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, DB_RESERVE_BYTES as libc::off_t) } != 0 {
            let _ = std::fs::remove_file(&self.reserve);
        }
    }

    /// Frees the space set aside for the node database (`ensure_reserve`); true if it
    /// was held.
    pub fn release_reserve(&self) -> bool {
        std::fs::remove_file(&self.reserve).is_ok()
    }

    /// [`ContentStore::release_reserve`] of the data directory `data`, before the store
    /// is opened (the node database is opened first: its lock refuses a second node on
    /// the directory, which would otherwise clear the first one's work files).
    pub fn release_reserve_of(data: &Path) -> bool {
        std::fs::remove_file(reserve_path(data)).is_ok()
    }

    fn ensure_empty_blob(&self) -> anyhow::Result<()> {
        let p = self.blob_path(&hash_of(b""));
        if !p.exists() {
            File::create(&p).with_context(|| format!("creating {}", p.display()))?;
        }
        Ok(())
    }

    pub fn empty_hash() -> ContentHash {
        hash_of(b"")
    }

    pub fn blob_path(&self, h: &ContentHash) -> PathBuf {
        self.blobs.join(h.to_hex())
    }

    pub fn has(&self, h: &ContentHash) -> bool {
        self.small.has(h) || self.blob_path(h).exists() || self.patched.has(h)
    }

    /// Folds the small contents' redo log into their database (a clean stop).
    pub fn fold_small(&self) -> std::io::Result<()> {
        self.small.fold().map_err(std::io::Error::other)
    }

    /// Lets go of the small contents' database as a dead process would.
    #[cfg(test)]
    pub fn let_go_for_test(&self) {
        self.small.let_go_for_test();
    }

    /// The largest content kept as a row: a larger one is a blob file.
    pub fn small_max(&self) -> u64 {
        self.small_max
    }

    /// Whether content `h` is kept as a row of the small contents.
    #[cfg(test)]
    pub fn is_small(&self, h: &ContentHash) -> bool {
        self.small.has(h)
    }

    /// The bytes of small content `h`, if it is one of them.
    pub fn small_bytes(&self, h: &ContentHash) -> std::io::Result<Option<Vec<u8>>> {
        self.small.get(h).map_err(std::io::Error::other)
    }

    /// The whole of content `h` (a row or a blob file), read into memory.
    pub fn read_whole(&self, h: &ContentHash) -> std::io::Result<Vec<u8>> {
        match self.small_bytes(h)? {
            Some(bytes) => Ok(bytes),
            None => {
                let c = self.open_content(h)?;
                let mut bytes = vec![0; c.size()? as usize];
                let n = c.read_full_at(&mut bytes, 0)?;
                bytes.truncate(n);
                Ok(bytes)
            }
        }
    }

    /// Keeps `bytes`, which hash to `h`, as a small content (`bytes` at most
    /// `small_max`).
    pub fn put_small(&self, h: &ContentHash, bytes: &[u8]) -> anyhow::Result<()> {
        self.small.put(h, bytes)
    }

    /// [`ContentStore::put_small`] of several contents, in one transaction.
    pub fn put_small_many(&self, items: &[(&ContentHash, &[u8])]) -> anyhow::Result<()> {
        self.small.put_many(items)
    }

    /// The bytes of each of `hashes` kept as a small content, in order, until `budget`
    /// bytes are taken (`None` for the others; a small content kept as a blob file by an
    /// older store is `None` too: it is served alone).
    pub fn small_many(&self, hashes: &[ContentHash], budget: usize) -> std::io::Result<Vec<Option<Vec<u8>>>> {
        self.small.get_many(hashes, budget).map_err(std::io::Error::other)
    }

    /// Content `h` opened for reading as one file: its blob file (a patched content is
    /// written out first), or a small content's bytes in a file in memory.
    pub fn open_blob(&self, h: &ContentHash) -> std::io::Result<File> {
        match self.small_bytes(h)? {
            Some(bytes) => memory_file_with("content", &bytes),
            None => {
                self.write_out_if_patched(h)?;
                File::open(self.blob_path(h))
            }
        }
    }

    /// Writes `h` out whole first if it is a patched content: for what reads one file.
    fn write_out_if_patched(&self, h: &ContentHash) -> std::io::Result<()> {
        if self.is_patched(h) {
            self.materialize(h)?;
        }
        Ok(())
    }

    /// Content `h` opened for reading at offsets, as the store keeps it: a blob file (a
    /// small content's bytes in a file in memory) or a patched content, read as it is.
    pub fn open_content(&self, h: &ContentHash) -> std::io::Result<ContentFile> {
        if let Some(bytes) = self.small_bytes(h)? {
            return Ok(ContentFile::Whole(memory_file_with("content", &bytes)?));
        }
        loop {
            match File::open(self.blob_path(h)) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                opened => return opened.map(ContentFile::Whole),
            }
            let Some(header) = self.patched.header(h) else {
                return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("content {h} is not in the store")));
            };
            // Written out meanwhile (its files gone): the blob is there now. Or given
            // another base meanwhile (`keep_base_as_patch`): read the new header.
            let (Ok(patch), Ok(base)) = (File::open(self.patched.patch_path(h)), File::open(self.blob_path(&header.base))) else {
                if self.blob_path(h).exists() || self.patched.header(h).is_some_and(|now| now != header) {
                    continue;
                }
                return Err(std::io::Error::other(format!("patched content {h} lacks its patch or its base {}", header.base)));
            };
            return Ok(ContentFile::Patched { base, patch, header });
        }
    }

    /// Whether content `h` is kept as a patch over another (`patched.rs`).
    pub fn is_patched(&self, h: &ContentHash) -> bool {
        self.patched.has(h) && !self.blob_path(h).exists()
    }

    /// What patched content `h` is waiting for, if it is one (`Role`; tests).
    #[cfg(test)]
    pub fn patched_role(&self, h: &ContentHash) -> Option<Role> {
        self.patched.header(h).map(|p| p.role)
    }

    /// Keeps content `h` of `size` bytes as the blocks `from_patch` names, taken from
    /// `patch` (a file of the store's work or tmp area, at `patch_path`), and the others
    /// from `basis`, a content of the store; `leaves` are its leaves. A patched basis is
    /// patched over its own base (its blocks the new content takes are copied into
    /// `patch`). Returns false, doing nothing, if the store has `h` already (whole or
    /// patched: a patch never replaces another under its readers); fails, leaving
    /// `patch` where it is, if the basis is not here.
    #[allow(clippy::too_many_arguments)]
    pub fn install_patched(
        &self,
        h: &ContentHash,
        size: u64,
        patch_path: &Path,
        patch: &File,
        basis: &ContentHash,
        mut from_patch: Vec<bool>,
        leaves: &[blake3::hazmat::ChainingValue],
        durable: bool,
    ) -> std::io::Result<bool> {
        let _held = self.patching.lock().unwrap_or_else(|p| p.into_inner());
        if self.blob_path(h).exists() || self.patched.has(h) || self.small.has(h) {
            return Ok(false);
        }
        // Over a patched basis, the blocks taken from the basis are where it has them:
        // its patch's are copied in, its base's are read where the basis reads them (its
        // moves). Over an older version at rest (or one moved onto another base), the
        // base is not the version before this one (it is a newer content, maybe another
        // file's): this one is only written out. (So a new version has no moves.)
        let (base, role, moves) = match self.patched.header(basis).filter(|_| !self.blob_path(basis).exists()) {
            Some(b) => {
                let (their_patch, n) = (File::open(self.patched.patch_path(basis))?, b.from_patch.len());
                for (i, mine) in from_patch.iter_mut().enumerate() {
                    if !*mine && i < n && b.from_patch[i] {
                        copy_range(&their_patch, patch, i as u64 * crate::leaves::BLOCK, crate::leaves::block_len(size, i))?;
                        *mine = true;
                    }
                }
                // Blocks past the basis's end are all in the patch (they differ from it).
                let moves =
                    b.moves.iter().filter(|m| m.first < from_patch.len()).map(|m| Move { count: m.count.min(from_patch.len() - m.first), ..*m }).collect();
                (b.base, if b.role == Role::NewVersion { Role::NewVersion } else { Role::Rebased }, moves)
            }
            None => (basis.clone(), Role::NewVersion, Vec::new()),
        };
        if !self.blob_path(&base).exists() {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("the base {base} of a patched content is not here")));
        }
        let (tmp, f) = self.tmp_file()?;
        drop(f);
        let header = Patched { base, size, from_patch, role, moves };
        if let Err(e) = self.patched.put(h, patch_path, &header, &tmp, durable) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.save_leaves(h, leaves);
        drop(_held);
        self.materialize_later(h);
        Ok(true)
    }

    /// Writes patched content `h` out as a whole blob (copied outside the lock, renamed
    /// in under it) and removes its patch; true if `h` is a whole blob now.
    /// The blob is checked against `h` before it is renamed in: a base file changed
    /// under its descriptor (which the store never does to a blob it names) fails the
    /// write-out instead of naming other bytes by `h`.
    pub fn materialize(&self, h: &ContentHash) -> std::io::Result<bool> {
        if self.blob_path(h).exists() {
            // Kept both ways (a crash between the rename and the removal, or a base being
            // made a patch over its successor right now): the patch goes, if the blob is
            // still there once the lock is held.
            if self.patched.has(h) {
                let _held = self.patching.lock().unwrap_or_else(|p| p.into_inner());
                if self.blob_path(h).exists() {
                    self.patched.remove(h);
                    return Ok(true);
                }
            } else {
                return Ok(true);
            }
        }
        let c = match self.open_content(h) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let (tmp, out) = self.tmp_file()?;
        let written = c.copy_all_to(&out).and_then(|()| out.sync_data());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        match hash_for_commit(&tmp) {
            Ok(Hashed { hash, .. }) if hash == *h => {}
            Ok(Hashed { hash, .. }) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("patched content {h} wrote out as {hash}: not installed")));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(std::io::Error::other(format!("hashing the write-out of {h}: {e:#}")));
            }
        }
        let _held = self.patching.lock().unwrap_or_else(|p| p.into_inner());
        if !self.patched.has(h) {
            // Removed meanwhile (GC), or written out by another pass.
            let _ = std::fs::remove_file(&tmp);
            return Ok(self.blob_path(h).exists());
        }
        std::fs::rename(&tmp, self.blob_path(h))?;
        File::open(&self.blobs)?.sync_all()?;
        self.patched.remove(h);
        drop(_held);
        // Its chunks are in a file of their own again: indexed (from the list it kept
        // while patched, or made now).
        match self.cached_chunk_list(h) {
            Some(list) => {
                if let Some(Err(e)) = self.chunk_index().map(|index| index.add(h, &list)) {
                    tracing::debug!("indexing the chunks of {h}: {e}");
                }
            }
            None => {
                if let Ok(len) = c.size() {
                    self.chunk_in_background(h, len);
                }
            }
        }
        Ok(true)
    }

    /// Writes patched content `h` out whole (`materialize`), then keeps its base, the
    /// version before it, as a patch over it (`keep_base_as_patch`): at rest, the
    /// version a file has now is one whole blob (passthrough, chunk lists) and an older
    /// one kept for its versions costs only the blocks where it differs. What the
    /// background pass does; a write-out because something needs `h` whole now leaves
    /// the base as it is.
    /// A content's role (`Role`) says which of that it gets: an older version kept as
    /// a patch stays one.
    pub fn write_out_at_rest(&self, h: &ContentHash) -> std::io::Result<()> {
        let Some(header) = self.patched.header(h) else {
            return self.materialize(h).map(drop);
        };
        match header.role {
            Role::AtRest => Ok(()),
            Role::Rebased => self.materialize(h).map(drop),
            // A newer version over the same base (edits one after another) is written
            // out instead, and this one then becomes a patch over it.
            // Looked at again later: by then it is a patch over that newer one (and
            // nothing is left to do), or the newer one is gone.
            Role::NewVersion if self.newer_over_same_base(h, &header) => {
                self.materialize_later(h);
                Ok(())
            }
            Role::NewVersion => {
                let made = self.patched.made(h);
                if self.materialize(h)? {
                    self.keep_base_as_patch(h, &header, made)?;
                }
                Ok(())
            }
        }
    }

    /// A content waiting to be written out, patched over the same base as `h` and made
    /// after it.
    fn newer_over_same_base(&self, h: &ContentHash, header: &Patched) -> bool {
        let Some(made) = self.patched.made(h) else {
            return false;
        };
        self.patched.all().iter().any(|(c, p, _)| c != h && p.base == header.base && p.role != Role::AtRest && self.patched.made(c).is_some_and(|t| t > made))
    }

    /// Gives patched content `h` a new header (`PatchedDir::replace_header`, through a
    /// tmp file of the store's that does not outlive a failure).
    fn replace_header(&self, h: &ContentHash, header: &Patched) -> std::io::Result<()> {
        let (tmp, f) = self.tmp_file()?;
        drop(f);
        let replaced = self.patched.replace_header(h, header, &tmp);
        if replaced.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        replaced
    }

    /// A program opens a file whose content is kept as an older version at rest (a
    /// copy of a file edited since): the background pass writes it out whole (without
    /// touching its base), so the opens after that pass through. Reads meanwhile go
    /// through the patch.
    pub fn write_out_for_reads(&self, h: &ContentHash) {
        if self.patched.header(h).is_none_or(|p| p.role != Role::AtRest) {
            return;
        }
        // Not on the caller's thread (an open, under the tree's lock): the patching lock
        // may be held by a background pass for a while, and the new header is flushed.
        let (store, h) = (self.clone(), h.clone());
        std::thread::spawn(move || store.mark_for_write_out(&h));
    }

    /// Makes an older version at rest one the background pass writes out (`Rebased`),
    /// and queues it.
    fn mark_for_write_out(&self, h: &ContentHash) {
        {
            let _held = self.patching.lock().unwrap_or_else(|p| p.into_inner());
            let Some(header) = self.patched.header(h).filter(|p| p.role == Role::AtRest) else {
                return;
            };
            if let Err(e) = self.replace_header(h, &Patched { role: Role::Rebased, ..header }) {
                tracing::warn!("marking patched content {h} to be written out: {e}");
                return;
            }
        }
        self.materialize_later(h);
    }

    /// Once patched content `h` (`header`: its blocks over `header.base`) is a whole
    /// blob: its base becomes a patch over `h` (the base's bytes of the blocks `h`
    /// changed), and so does every content patched over that base (the blocks they took
    /// from it and `h` does not have are added to their patch files); then the base's
    /// blob goes. Nothing is done when the base shares less than half of its blocks
    /// with `h` (a patch would save little and cost a patched read), is not a whole
    /// blob, or is gone. Every new patch and header is flushed before the blob is
    /// removed, under the store's patching lock (which every removal of a patch and of a
    /// blob under a patch takes too), so a crash or a concurrent write-out leaves the base
    /// readable one way or the other.
    fn keep_base_as_patch(&self, h: &ContentHash, header: &Patched, made: Option<std::time::SystemTime>) -> std::io::Result<()> {
        use crate::leaves::{block_len, blocks, BLOCK};
        let _held = self.patching.lock().unwrap_or_else(|p| p.into_inner());
        let base = &header.base;
        if base == h || !self.blob_path(h).exists() || self.patched.has(base) {
            return Ok(());
        }
        let base_file = match File::open(self.blob_path(base)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let base_size = base_file.metadata()?.len();
        // The base's bytes `at..at + len` are in `h` at the same offsets where `h` took
        // every block they fall in from the base, unmoved.
        let in_h = |at: u64, len: u64| header.found_in_base(at, len).filter(|there| *there == at);
        let differing = (0..blocks(base_size)).filter(|&b| in_h(b as u64 * BLOCK, block_len(base_size, b)).is_none()).count();
        if differing * 2 > blocks(base_size) {
            return Ok(());
        }
        // `over`'s new header, over `h`: the blocks it reads from the base that are not in
        // `h` are copied from the base into `patch`.
        let rebase = |over: &Patched, role: Role, patch: &File| over.rebased(h, role, &base_file, patch, in_h);
        for (c, p, _) in self.patched.all().into_iter().filter(|(c, p, _)| p.base == *base && c != h) {
            // A new version made before `h` (an earlier edit) is an older version now;
            // one made after it (or not known to be before) still waits to be written
            // out, and must not make `h` a patch; the others keep their role (one a
            // program opened stays to be written out).
            let role = match p.role {
                Role::NewVersion if made.is_some_and(|h_made| self.patched.made(&c).is_some_and(|t| t < h_made)) => Role::AtRest,
                Role::NewVersion => Role::Rebased,
                other => other,
            };
            let patch = std::fs::OpenOptions::new().write(true).open(self.patched.patch_path(&c))?;
            self.replace_header(&c, &rebase(&p, role, &patch)?)?;
        }
        let (tmp_patch, patch) = self.tmp_file()?;
        let (tmp_header, f) = self.tmp_file()?;
        drop(f);
        let made = patch
            .set_len(base_size)
            .and_then(|()| {
                rebase(
                    &Patched { base: base.clone(), size: base_size, from_patch: vec![false; blocks(base_size)], role: Role::AtRest, moves: Vec::new() },
                    Role::AtRest,
                    &patch,
                )
            })
            .and_then(|new_header| self.patched.put(base, &tmp_patch, &new_header, &tmp_header, true));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp_patch);
            let _ = std::fs::remove_file(&tmp_header);
            return Err(e);
        }
        std::fs::remove_file(self.blob_path(base))?;
        File::open(&self.blobs)?.sync_all()?;
        // Its chunks are no longer in a file of their own; its leaves and chunk list
        // still describe its bytes and stay.
        self.drop_from_chunk_index(base);
        tracing::debug!(%base, over = %h, blocks = differing, "an older version kept as a patch over the newer one");
        Ok(())
    }

    /// The store, with new patched contents written out `after` they are made (`None`:
    /// only when something needs them whole).
    pub fn with_write_out_after(mut self, after: Option<std::time::Duration>) -> ContentStore {
        self.write_out_after = after;
        self
    }

    /// Queues patched content `h` to be written out by one background thread, a few
    /// seconds from now (a file edited again and again is written out once it rests).
    pub fn materialize_later(&self, h: &ContentHash) {
        let Some(after) = self.write_out_after else {
            return;
        };
        type Job = (ContentStore, ContentHash, std::time::Instant);
        static QUEUE: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> = std::sync::OnceLock::new();
        let q = QUEUE.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            std::thread::spawn(move || {
                for (store, h, due) in rx {
                    std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
                    if let Err(e) = store.write_out_at_rest(&h) {
                        tracing::warn!("writing out patched content {h}: {e} (it stays patched, and is read as such)");
                    }
                }
            });
            std::sync::Mutex::new(tx)
        });
        let due = std::time::Instant::now() + after;
        let _ = q.lock().unwrap_or_else(|p| p.into_inner()).send((self.clone(), h.clone(), due));
    }

    /// Whether `f` (a work file) is in memory rather than under the data directory.
    pub fn in_memory(&self, f: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        f.metadata().is_ok_and(|m| m.dev() != self.dev)
    }

    /// Inodes whose files were being written when the previous run ended.
    pub fn abandoned_work(&self) -> &[u64] {
        &self.abandoned_work
    }

    pub fn work_path(&self, ino: u64) -> PathBuf {
        self.work.join(ino.to_string())
    }

    /// A fresh work file for `ino`, empty or a copy of content `from`. An empty one, or
    /// a copy of a small content, is in memory (no inode on the disk: most files written
    /// are small) until it grows past `SMALL_MAX` (`spill_work`); a copy of a larger one
    /// is under `work/`.
    pub fn new_work_file(&self, ino: u64, from: Option<&ContentHash>) -> std::io::Result<File> {
        if let Some(h) = from.filter(|h| **h != Self::empty_hash()) {
            if let Some(bytes) = self.small_bytes(h)? {
                return memory_file_with("work", &bytes);
            }
            // (A patched content, an older version at rest restored, is read as it is.)
            let content = self.open_content(h)?;
            let work = File::options().read(true).write(true).create(true).truncate(true).open(self.work_path(ino))?;
            content.copy_all_to(&work)?;
            return Ok(work);
        }
        if self.small_max == 0 {
            return File::options().read(true).write(true).create(true).truncate(true).open(self.work_path(ino));
        }
        memory_file_with("work", &[])
    }

    /// A fresh work file for `ino` under `work/` of `size` bytes, all of them a hole: the
    /// tree fills in the blocks written (`tree/overlay.rs`).
    pub fn new_sparse_work_file(&self, ino: u64, size: u64) -> std::io::Result<File> {
        let f = File::options().read(true).write(true).create(true).truncate(true).open(self.work_path(ino))?;
        f.set_len(size)?;
        Ok(f)
    }

    /// Keeps the content of work file `work` of `ino` (with an overlay over content
    /// `basis`: the blocks `from_patch` names are in it, the others are the basis's), as
    /// a patch over the basis; one that is all patch becomes a blob. As
    /// [`ContentStore::install_work_file`] otherwise.
    pub fn install_work_patched(&self, ino: u64, work: &File, hashed: Hashed, basis: &ContentHash, from_patch: Vec<bool>) -> anyhow::Result<CommittedWork> {
        let Hashed { hash, size, leaves } = hashed;
        if self.has(&hash) {
            return Ok(CommittedWork { hash, size, moved: false });
        }
        let leaves = leaves.context("a work file with an overlay is hashed through its leaves")?;
        if from_patch.iter().all(|p| *p) {
            return self.install_work_file(ino, work, Hashed { hash, size, leaves: Some(leaves) });
        }
        let made = self
            .install_patched(&hash, size, &self.work_path(ino), work, basis, from_patch, &leaves, false)
            .with_context(|| format!("keeping {hash} as a patch over {basis}"))?;
        Ok(CommittedWork { hash, size, moved: made })
    }

    /// Moves the in-memory work file `work` of `ino`, about to grow past `SMALL_MAX`, to
    /// the disk (`work/`); returns the file on the disk, with the same bytes and mtime.
    pub fn spill_work(&self, ino: u64, work: &File) -> std::io::Result<File> {
        let p = self.work_path(ino);
        let mut disk = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p)?;
        std::io::copy(&mut File::open(fd_path(work))?, &mut disk)?;
        disk.set_modified(work.metadata()?.modified()?)?;
        Ok(disk)
    }

    /// Hashes work file `work` of `ino` and keeps its content (`install_work_file`).
    pub fn commit_work_file(&self, ino: u64, work: &File) -> anyhow::Result<CommittedWork> {
        let hashed = hash_for_commit(&fd_path(work))?;
        self.install_work_file(ino, work, hashed)
    }

    /// Keeps the content of work file `work` of `ino`, whose hash and size are known
    /// (taken while nothing could write it): a small one as a row, a larger one in
    /// memory as a copy, and one on the disk by moving the work file into the blobs.
    /// Unless moved, the work file stays, for the caller to remove once the change is
    /// recorded (`discard_work_file`).
    pub fn install_work_file(&self, ino: u64, work: &File, hashed: Hashed) -> anyhow::Result<CommittedWork> {
        let Hashed { hash, size, leaves } = hashed;
        if self.has(&hash) {
            return Ok(CommittedWork { hash, size, moved: false });
        }
        if size <= self.small_max {
            let mut bytes = vec![0; size as usize];
            std::os::unix::fs::FileExt::read_exact_at(work, &mut bytes, 0).context("reading a work file")?;
            self.put_small(&hash, &bytes)?;
            return Ok(CommittedWork { hash, size, moved: false });
        }
        let moved = !self.in_memory(work);
        if moved {
            let p = self.work_path(ino);
            std::fs::rename(&p, self.blob_path(&hash)).with_context(|| format!("moving {} into the store", p.display()))?;
        } else {
            let tmp = self.copy_to_tmp(&fd_path(work)).context("copying a work file out of memory")?;
            self.install(&tmp, &hash).with_context(|| format!("installing blob {hash}"))?;
        }
        if let Some(l) = leaves {
            self.save_leaves(&hash, &l);
        }
        self.chunk_in_background(&hash, size);
        Ok(CommittedWork { hash, size, moved })
    }

    /// Takes back a `commit_work_file` that moved the work file (the change could not be
    /// recorded): the blob is the work file of `ino` again.
    pub fn uncommit_work_file(&self, ino: u64, hash: &ContentHash) -> std::io::Result<()> {
        let _held = self.patching.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_patched(hash) {
            std::fs::rename(self.patched.patch_path(hash), self.work_path(ino))?;
            self.patched.remove(hash);
            return Ok(());
        }
        // A blob something was patched over meanwhile stays (the work file is a copy).
        if self.patched.all().iter().any(|(_, p, _)| p.base == *hash) {
            return std::fs::copy(self.blob_path(hash), self.work_path(ino)).map(drop);
        }
        std::fs::rename(self.blob_path(hash), self.work_path(ino))
    }

    /// Makes `backing` (a file the kernel reads an inode from by passthrough, opened
    /// from this store) the inode's own work file, so that writes can go to it: if the
    /// store still names that very file as blob `hash`, the store gets a copy of its
    /// own first. Returns the file opened for writing, its mtime set to `mtime`.
    pub fn detach_for_work(&self, backing: &File, hash: Option<&ContentHash>, mtime: std::time::SystemTime, ahead: Option<TmpCopy>) -> anyhow::Result<File> {
        use std::os::unix::fs::MetadataExt;
        let mine = backing.metadata().context("reading the backing file's metadata")?;
        if let Some(h) = hash {
            // Under the patching lock: `keep_base_as_patch` copies blocks out of a blob,
            // and must never read the file a writer is about to change.
            let _held = self.patching.lock().unwrap_or_else(|p| p.into_inner());
            let bp = self.blob_path(h);
            if let Ok(named) = std::fs::metadata(&bp) {
                if (named.dev(), named.ino()) == (mine.dev(), mine.ino()) {
                    let copy = match ahead {
                        Some(c) => c,
                        None => TmpCopy(self.copy_to_tmp(&bp).with_context(|| format!("copying blob {h}"))?),
                    };
                    self.install_blob_locked(&copy.0, h).with_context(|| format!("replacing blob {h} with its copy"))?;
                }
            }
        }
        let w = std::fs::OpenOptions::new().read(true).write(true).open(fd_path(backing)).context("reopening the backing file for writing")?;
        w.set_modified(mtime).context("setting the work file's mtime")?;
        Ok(w)
    }

    /// Commits a work file that passthrough writers may still be writing: a snapshot
    /// is copied out, hashed, and installed as a blob (unless the store has it).
    /// Returns the snapshot's hash and size.
    pub fn commit_snapshot(&self, work: &File) -> anyhow::Result<(ContentHash, u64)> {
        let (copy, hashed) = self.snapshot(work)?;
        self.install_snapshot(&copy, &hashed)
    }

    /// The first half of `commit_snapshot`, which takes long and needs no lock: the
    /// copy of `work` in the tmp area, and its hash.
    pub fn snapshot(&self, work: &File) -> anyhow::Result<(TmpCopy, Hashed)> {
        let copy = TmpCopy(self.copy_to_tmp(&fd_path(work)).context("copying the work file")?);
        let hashed = hash_for_commit(&copy.0)?;
        Ok((copy, hashed))
    }

    /// The second half: the copy installed as a blob, unless the store has its content.
    pub fn install_snapshot(&self, copy: &TmpCopy, hashed: &Hashed) -> anyhow::Result<(ContentHash, u64)> {
        let Hashed { hash, size, leaves } = hashed;
        if !self.has(hash) {
            self.install(&copy.0, hash).with_context(|| format!("installing blob {hash}"))?;
            if let Some(l) = leaves {
                self.save_leaves(hash, l);
            }
        }
        Ok((hash.clone(), *size))
    }

    /// A copy of blob `h` in the tmp area, made without any lock for a detach about to
    /// come (`detach_for_work` takes it instead of copying then). None if `h` is no
    /// plain blob, or if the blob was detached while it was copied: a writer may have
    /// written into the file the copy read (a detach renames the copy it made over the
    /// blob's name before anything writes the old file, so a blob still named by its
    /// path after the copy was never written).
    pub fn copy_blob_ahead(&self, h: &ContentHash) -> Option<TmpCopy> {
        use std::os::unix::fs::MetadataExt;
        let bp = self.blob_path(h);
        let mut from = File::open(&bp).ok()?;
        let id = |m: std::fs::Metadata| (m.dev(), m.ino());
        let read = id(from.metadata().ok()?);
        let (tmp, mut to) = self.tmp_file().ok()?;
        let copy = TmpCopy(tmp);
        std::io::copy(&mut from, &mut to).ok()?;
        std::fs::metadata(&bp).is_ok_and(|m| id(m) == read).then_some(copy)
    }

    /// A copy of the file at `src` in the tmp area (copy_file_range where the kernel can).
    fn copy_to_tmp(&self, src: &Path) -> anyhow::Result<PathBuf> {
        let (tmp, mut copy) = self.tmp_file()?;
        let mut from = File::open(src).with_context(|| format!("opening {}", src.display()))?;
        std::io::copy(&mut from, &mut copy)?;
        Ok(tmp)
    }

    /// Removes the work file of `ino` on the disk, if it has one there.
    pub fn discard_work_file(&self, ino: u64) {
        let _ = std::fs::remove_file(self.work_path(ino));
    }

    /// A new temporary file for a download.
    pub fn tmp_file(&self) -> std::io::Result<(PathBuf, File)> {
        let p = self.tmp.join(uuid::Uuid::new_v4().to_string());
        // Readable too: a download assembled in pieces is read back to check its blocks.
        let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&p)?;
        Ok((p, f))
    }

    /// Flushes blob `h` and the blobs directory (its name) to disk.
    pub fn sync_blob(&self, h: &ContentHash) -> std::io::Result<()> {
        if self.small.has(h) {
            return self.small.sync().map_err(std::io::Error::other);
        }
        if self.is_patched(h) {
            if let Some(base) = self.patched.header(h).map(|p| p.base) {
                self.sync_blob(&base)?;
            }
            match self.patched.sync(h) {
                // Written out meanwhile: the blob is flushed below.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                synced => return synced,
            }
        }
        match File::open(self.blob_path(h)) {
            Ok(f) => f.sync_data()?,
            // The empty file has no blob; nothing to flush.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        File::open(&self.blobs)?.sync_all()
    }

    /// Bytes free for an unprivileged user on the disk that holds the blobs.
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        let s = nix::sys::statvfs::statvfs(&self.blobs).map_err(std::io::Error::from)?;
        Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
    }

    /// Waits, at most `within`, until the store's disk has `bytes` free (looking every
    /// 10 ms); returns whether it has.
    pub fn wait_for_free(&self, bytes: u64, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        loop {
            if self.free_bytes().is_ok_and(|free| free >= bytes) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// The chunk list of blob `h` if it is cached already (`None` also when the blob is
    /// not there). A cache file that does not cover the blob exactly (cut short by a
    /// crash) does not count.
    pub fn cached_chunk_list(&self, h: &ContentHash) -> Option<crate::chunks::ChunkList> {
        self.cached_list_of_size(h, std::fs::metadata(self.blob_path(h)).ok()?.len())
    }

    /// The cached chunk list of `h`, if it covers `size` bytes.
    fn cached_list_of_size(&self, h: &ContentHash, size: u64) -> Option<crate::chunks::ChunkList> {
        let bytes = std::fs::read(self.chunk_lists.join(h.to_hex().as_str())).ok()?;
        crate::chunks::ChunkList::read_from(&bytes).filter(|l| l.size() == size)
    }

    /// The chunk list of blob `h`: from its cache file, or computed (and cached).
    pub fn chunk_list(&self, h: &ContentHash) -> std::io::Result<crate::chunks::ChunkList> {
        // A small content is one chunk or a few, listed at once (nothing cached for it).
        if let Some(bytes) = self.small_bytes(h)? {
            return crate::chunks::ChunkList::of_reader(&bytes[..]);
        }
        // A patched content keeps the list it had as a blob (an older version at rest: a
        // peer pulling it by chunks does not make it whole again here); one without a
        // list is listed once written out. A blob that is not there fails below with
        // `NotFound` (no list is cached for it).
        if let Some(list) = self.patched.header(h).filter(|_| !self.blob_path(h).exists()).and_then(|p| self.cached_list_of_size(h, p.size)) {
            return Ok(list);
        }
        self.write_out_if_patched(h)?;
        let read_cached = || self.cached_chunk_list(h);
        let (busy, done) = &*self.chunking;
        {
            let mut busy = busy.lock().unwrap_or_else(|p| p.into_inner());
            while busy.contains(h) {
                busy = done.wait(busy).unwrap_or_else(|p| p.into_inner());
            }
            if let Some(list) = read_cached() {
                return Ok(list);
            }
            busy.insert(h.clone());
        }
        let list = crate::chunks::ChunkList::of_file(&self.blob_path(h));
        if let Ok(list) = &list {
            self.save_chunk_list(h, list);
        }
        busy.lock().unwrap_or_else(|p| p.into_inner()).remove(h);
        done.notify_all();
        list
    }

    /// Starts computing the chunk list of a new blob of [`AT_REST_MIN_BYTES`] or more in
    /// the background, so that the first peer to pull it by chunks (or this node's next
    /// pull of its path) finds it ready, and the at-rest pass finds it in the chunk index;
    /// a large one's leaves too.
    pub fn chunk_in_background(&self, h: &ContentHash, size: u64) {
        if size < AT_REST_MIN_BYTES {
            return;
        }
        if size >= crate::chunks::CHUNKED_MIN_BYTES {
            self.leaves_in_background(h);
        }
        // At most two at once: a tree of many large files is chunked when asked instead.
        static RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        if RUNNING.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 2 {
            RUNNING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let (store, h) = (self.clone(), h.clone());
        std::thread::spawn(move || {
            if let Err(e) = store.chunk_list(&h) {
                tracing::debug!("chunking {h}: {e}");
            }
            RUNNING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }

    /// Caches `list` as blob `h`'s chunk list (a puller that assembled `h` knows it),
    /// and indexes its chunks. Best effort: a list that cannot be written is computed
    /// again when asked for; chunks not indexed are fetched instead of copied.
    pub fn save_chunk_list(&self, h: &ContentHash, list: &crate::chunks::ChunkList) {
        let mut bytes = Vec::with_capacity(list.chunks.len() * 36);
        if list.write_to(&mut bytes).is_ok() {
            self.save_beside(&self.chunk_lists.join(h.to_hex().as_str()), &bytes);
        }
        if let Some(index) = self.chunk_index() {
            if let Err(e) = index.add(h, list) {
                tracing::debug!("indexing the chunks of {h}: {e}");
            }
        }
    }

    /// The index of which blob has which chunk, opened (made, and filled from the chunk
    /// lists cached so far, in the background) on first use.
    pub fn chunk_index(&self) -> Option<&crate::chunk_index::ChunkIndex> {
        self.chunk_index
            .get_or_init(|| {
                let path = self.chunk_lists.join("index.db");
                match crate::chunk_index::ChunkIndex::open(&path) {
                    Ok((index, fresh)) => {
                        if fresh {
                            let store = self.clone();
                            std::thread::spawn(move || store.index_cached_chunk_lists());
                        }
                        Some(index)
                    }
                    Err(e) => {
                        tracing::warn!("no chunk index ({e:#}): pulls copy chunks only from a path's old version");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// Indexes the chunks of every blob whose chunk list is cached (a store from before
    /// the index, or one whose index was lost).
    fn index_cached_chunk_lists(&self) {
        let Some(index) = self.chunk_index() else {
            return;
        };
        let Ok(dir) = std::fs::read_dir(&self.chunk_lists) else {
            return;
        };
        let mut n = 0;
        for e in dir.flatten() {
            let Some(h) = e.file_name().to_str().and_then(|s| s.parse::<ContentHash>().ok()) else {
                continue;
            };
            if let Some(list) = self.cached_chunk_list(&h) {
                n += usize::from(index.add(&h, &list).is_ok());
            }
        }
        tracing::info!("indexed the chunks of {n} blob(s) kept from before");
    }

    /// Writes a cache file that goes with a blob (through a tmp file, renamed in; best
    /// effort: one that cannot be written is computed again when asked for).
    fn save_beside(&self, path: &Path, bytes: &[u8]) {
        if let Ok((tmp, mut f)) = self.tmp_file() {
            if f.write_all(bytes).is_err() || std::fs::rename(&tmp, path).is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }

    fn leaves_path(&self, h: &ContentHash) -> PathBuf {
        self.chunk_lists.join(format!("{}.leaves", h.to_hex().as_str()))
    }

    /// The leaves of blob `h` (`leaves.rs`), from the cache beside the chunk lists or
    /// computed now (one read of the blob) and cached. Only for blobs of more than one
    /// block.
    pub fn leaves(&self, h: &ContentHash) -> std::io::Result<Vec<blake3::hazmat::ChainingValue>> {
        if let Some(l) = self.cached_leaves(h) {
            return Ok(l);
        }
        // A small content has a leaf or two, taken at once (nothing cached for it).
        if let Some(bytes) = self.small_bytes(h)? {
            return crate::leaves::leaves_of(&bytes[..], bytes.len() as u64);
        }
        self.write_out_if_patched(h)?;
        let leaves = crate::leaves::leaves_of_file(&self.blob_path(h))?;
        // A blob a writer took meanwhile (`detach_for_work`) was read in part as other
        // bytes: leaves cached wrong would name every version written over them wrongly.
        if !self.size_of(h).is_some_and(|size| crate::leaves::verify(&leaves, size, h)) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("the leaves read from blob {h} do not make its hash")));
        }
        self.save_leaves(h, &leaves);
        Ok(leaves)
    }

    /// The leaves of blob `h` if they are cached (and fit the blob's size).
    pub fn cached_leaves(&self, h: &ContentHash) -> Option<Vec<blake3::hazmat::ChainingValue>> {
        let size = self.size_of(h)?;
        std::fs::read(self.leaves_path(h)).ok().and_then(|b| crate::leaves::from_bytes(&b)).filter(|l| l.len() == crate::leaves::blocks(size))
    }

    /// Whether the leaves of blob `h`, `size` bytes, are cached (as `cached_leaves`
    /// finds them, without reading them).
    pub fn has_cached_leaves(&self, h: &ContentHash, size: u64) -> bool {
        std::fs::metadata(self.leaves_path(h)).is_ok_and(|m| m.len() == crate::leaves::blocks(size) as u64 * 32)
    }

    /// The bytes content `h` takes on the store's disk: a blob's blocks, a patched
    /// content's patch (its blocks that differ from its base), a small one's length;
    /// 0 if it is not here.
    pub fn footprint(&self, h: &ContentHash) -> u64 {
        use std::os::unix::fs::MetadataExt;
        if let Some(n) = self.small.len(h) {
            return n;
        }
        std::fs::metadata(self.blob_path(h)).or_else(|_| std::fs::metadata(self.patched.patch_path(h))).map_or(0, |m| m.blocks() * 512)
    }

    /// The size of blob `h`, if the store has it.
    pub fn size_of(&self, h: &ContentHash) -> Option<u64> {
        self.small.len(h).or_else(|| std::fs::metadata(self.blob_path(h)).ok().map(|m| m.len())).or_else(|| self.patched.header(h).map(|p| p.size))
    }

    /// Whether content `h` is here and hashes to its name.
    pub fn is_whole(&self, h: &ContentHash) -> bool {
        match self.small_bytes(h) {
            Ok(Some(bytes)) => hash_of(&bytes) == *h,
            Ok(None) => self.write_out_if_patched(h).is_ok() && hash_file(&self.blob_path(h)).is_ok_and(|(real, _)| real == *h),
            Err(_) => false,
        }
    }

    /// Queues blob `h` for its leaves to be computed and cached by one background thread
    /// (in the order blobs come: a node streaming it finds them ready, and a tree of
    /// many large files costs one core at a time).
    fn leaves_in_background(&self, h: &ContentHash) {
        type Job = (ContentStore, ContentHash);
        static QUEUE: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> = std::sync::OnceLock::new();
        let q = QUEUE.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            std::thread::spawn(move || {
                for (store, h) in rx {
                    if let Err(e) = store.leaves(&h) {
                        tracing::debug!("the leaves of {h}: {e}");
                    }
                }
            });
            std::sync::Mutex::new(tx)
        });
        let _ = q.lock().unwrap_or_else(|p| p.into_inner()).send((self.clone(), h.clone()));
    }

    /// Caches the leaves of blob `h` (best effort).
    pub fn save_leaves(&self, h: &ContentHash, leaves: &[blake3::hazmat::ChainingValue]) {
        self.save_beside(&self.leaves_path(h), &crate::leaves::to_bytes(leaves));
    }

    /// Removes blob `h` (and its chunk list); returns its size if it was there. Patched
    /// contents over it are written out first (they keep their bytes); a patched `h`
    /// goes with its patch. A blob that older versions are kept over at rest stays
    /// (`None`): writing each of them out whole to free one blob would take more room
    /// than it frees; it goes with the GC once they have gone.
    pub fn remove_blob(&self, h: &ContentHash) -> Option<u64> {
        if let Some(n) = self.small.remove(h) {
            return Some(n);
        }
        // (a few rounds: a patch made over `h` meanwhile is written out in the next)
        for _ in 0..3 {
            let over_it: Vec<(ContentHash, Patched)> = self.patched.all().into_iter().filter(|(_, p, _)| p.base == *h).map(|(c, p, _)| (c, p)).collect();
            if over_it.is_empty() {
                break;
            }
            if over_it.iter().any(|(_, p)| p.role == Role::AtRest) {
                tracing::debug!("blob {h} stays: older versions are kept as patches over it");
                return None;
            }
            for (c, _) in over_it {
                if let Err(e) = self.materialize(&c) {
                    tracing::warn!("writing out patched content {c} before its base {h} goes: {e}; the base stays");
                    return None;
                }
            }
        }
        let _held = self.patching.lock().unwrap_or_else(|p| p.into_inner());
        if self.patched.all().iter().any(|(_, p, _)| p.base == *h) {
            return None;
        }
        if let Some(size) = self.patched.header(h).map(|p| p.size).filter(|_| !self.blob_path(h).exists()) {
            self.patched.remove(h);
            self.remove_cache_files(h);
            return Some(size);
        }
        let path = self.blob_path(h);
        let len = std::fs::metadata(&path).ok()?.len();
        std::fs::remove_file(&path).ok()?;
        self.remove_cache_files(h);
        Some(len)
    }

    /// Removes what is cached beside blob `h` (its chunk list and its leaves) and its
    /// chunks from the index.
    fn remove_cache_files(&self, h: &ContentHash) {
        let _ = std::fs::remove_file(self.chunk_lists.join(h.to_hex().as_str()));
        let _ = std::fs::remove_file(self.leaves_path(h));
        self.drop_from_chunk_index(h);
    }

    /// Drops the chunk index's rows of blob `h`, opening the index for it if this node
    /// ever indexed anything (so no row of a removed blob stays behind for good).
    fn drop_from_chunk_index(&self, h: &ContentHash) {
        let index = match self.chunk_index.get() {
            Some(open) => open.as_ref(),
            None if self.chunk_lists.join("index.db").exists() => self.chunk_index(),
            None => None,
        };
        if let Some(index) = index {
            if let Err(e) = index.remove(h) {
                tracing::debug!("dropping {h} from the chunk index: {e}");
            }
        }
    }

    /// Moves a verified download into the store: a small one into the small contents
    /// (the tmp file goes), a larger one into the blobs.
    pub fn install(&self, tmp: &Path, h: &ContentHash) -> std::io::Result<()> {
        if std::fs::metadata(tmp)?.len() <= self.small_max {
            let bytes = std::fs::read(tmp)?;
            self.put_small(h, &bytes).map_err(std::io::Error::other)?;
            return std::fs::remove_file(tmp);
        }
        let _held = self.patching.lock().unwrap_or_else(|p| p.into_inner());
        self.install_blob_locked(tmp, h)
    }

    /// `install` of a blob, the caller holding the patching lock: the rename and the
    /// removal of a patched content of the same bytes (not needed any more) are one step
    /// for `keep_base_as_patch`, which may be making that content a patch right now.
    fn install_blob_locked(&self, tmp: &Path, h: &ContentHash) -> std::io::Result<()> {
        std::fs::rename(tmp, self.blob_path(h))?;
        if self.patched.has(h) {
            self.patched.remove(h);
        }
        Ok(())
    }

    /// Removes every blob not in `keep` and older than `min_age` (a fresh download may
    /// not be in the tree yet); returns how many were removed.
    /// Patched contents go the same way; a blob that is the base of one that stays,
    /// stays.
    pub fn gc(&self, keep: &HashSet<ContentHash>, min_age: std::time::Duration) -> usize {
        self.sweep(&|h| !keep.contains(h), min_age, Sweep::Remove).len()
    }

    /// What `gc` would remove now, removing nothing: the caller checks them again
    /// (`Tree::gc_with_floor` lists them outside the tree's lock).
    pub fn gc_candidates(&self, keep: &HashSet<ContentHash>, min_age: std::time::Duration) -> Vec<ContentHash> {
        self.sweep(&|h| !keep.contains(h), min_age, Sweep::List)
    }

    /// Removes those of `gone` older than `min_age` (but a blob that is the base of a
    /// patched content that stays), as a sweep would: the GC's second pass, under the
    /// tree's lock, so it looks at `gone` and at the patched contents (those of large
    /// files written in place, and kept versions), never at the whole store.
    pub fn remove_unused(&self, gone: &HashSet<ContentHash>, min_age: std::time::Duration) -> usize {
        let _held = self.patching.lock().unwrap_or_else(|p| p.into_inner());
        let bases = self.sweep_patched(&|h| gone.contains(h), min_age, Sweep::Remove, &mut Vec::new());
        let mut removed = 0;
        for h in gone.iter().filter(|h| **h != Self::empty_hash() && !bases.contains(*h)) {
            let path = self.blob_path(h);
            let old = std::fs::metadata(&path).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().unwrap_or_default() >= min_age);
            if old && std::fs::remove_file(&path).is_ok() {
                self.remove_cache_files(h);
                removed += 1;
            }
        }
        removed + self.small.remove_old(gone, min_age).len()
    }

    /// The patched contents older than `min_age` that `unused` says go: pushed to
    /// `out`, and removed with their cache files (`Sweep::Remove`). Returns the bases of
    /// those that stay (the caller holds the patching lock).
    fn sweep_patched(
        &self,
        unused: &dyn Fn(&ContentHash) -> bool,
        min_age: std::time::Duration,
        how: Sweep,
        out: &mut Vec<ContentHash>,
    ) -> HashSet<ContentHash> {
        let remove = how == Sweep::Remove;
        let mut bases = HashSet::new();
        for (h, p, age) in self.patched.all() {
            if age >= min_age && unused(&h) && (!remove || self.patched.remove(&h)) {
                if remove {
                    self.remove_cache_files(&h);
                }
                out.push(h);
            } else {
                bases.insert(p.base);
            }
        }
        if remove {
            self.patched.remove_orphans(min_age);
        }
        bases
    }

    /// The contents older than `min_age` that `unused` says go, but a blob that is the
    /// base of a patched content that stays: removed (`Sweep::Remove`) or only listed.
    fn sweep(&self, unused: &dyn Fn(&ContentHash) -> bool, min_age: std::time::Duration, how: Sweep) -> Vec<ContentHash> {
        let remove = how == Sweep::Remove;
        let mut out = Vec::new();
        let _held = self.patching.lock().unwrap_or_else(|p| p.into_inner());
        let bases = self.sweep_patched(unused, min_age, how, &mut out);
        if let Ok(dir) = std::fs::read_dir(&self.blobs) {
            for e in dir.flatten() {
                let name = e.file_name();
                let Some(h) = name.to_str().and_then(|s| s.parse::<ContentHash>().ok()) else {
                    continue;
                };
                let young = e.metadata().and_then(|m| m.modified()).map(|t| t.elapsed().unwrap_or_default() < min_age).unwrap_or(true);
                if h != Self::empty_hash() && !young && unused(&h) && !bases.contains(&h) && (!remove || std::fs::remove_file(e.path()).is_ok()) {
                    if remove {
                        self.remove_cache_files(&h);
                    }
                    out.push(h);
                }
            }
        }
        out.extend(self.small.sweep(unused, min_age, remove));
        out
    }
}

/// Whether `ContentStore::sweep` removes what it finds or only lists it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sweep {
    Remove,
    List,
}

/// A file in memory (`memfd_create`) holding `bytes`, open for reading and writing.
fn memory_file_with(name: &str, bytes: &[u8]) -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `name` is a valid C string; the descriptor returned is new and owned here.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    if !bytes.is_empty() {
        std::os::unix::fs::FileExt::write_all_at(&f, bytes, 0)?;
    }
    Ok(f)
}

/// The /proc path that reopens an open file (also one no directory names any more).
pub(crate) fn fd_path(f: &File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// A content's hash and size, and for a large one its leaves (`leaves.rs`).
#[derive(Clone, Debug)]
pub struct Hashed {
    pub hash: ContentHash,
    pub size: u64,
    pub leaves: Option<Vec<blake3::hazmat::ChainingValue>>,
}

/// Hashes a file being committed. A large one is hashed through its leaves (on all
/// cores, as `hash_file` does): the hash costs the same and the leaves come with it, so
/// a peer pulling the new version over its old one asks for them at once.
/// Largest file the node takes (1 TiB): hashing one keeps 32 bytes per 64 KiB block in
/// memory (512 MiB at this size), and every other node fetches it. Larger writes and
/// truncations fail with `EFBIG`, as at a file system's own limit; a larger file made
/// past them (a passthrough write) is not committed (its close says `EFBIG`) and stays
/// on this node only.
pub const MAX_FILE_SIZE: u64 = 1 << 40;

pub fn hash_for_commit(p: &Path) -> anyhow::Result<Hashed> {
    let f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let size = f.metadata().with_context(|| format!("reading the size of {}", p.display()))?.len();
    if size > MAX_FILE_SIZE {
        return Err(std::io::Error::from_raw_os_error(libc::EFBIG))
            .with_context(|| format!("{} holds {size} bytes, more than a synced file may ({MAX_FILE_SIZE})", p.display()));
    }
    if size < crate::chunks::CHUNKED_MIN_BYTES {
        let (hash, size) = hash_path(p, size >= PARALLEL_HASH_MIN_BYTES)?;
        return Ok(Hashed { hash, size, leaves: None });
    }
    let leaves = crate::leaves::leaves_in_parallel(&f, size).with_context(|| format!("hashing {}", p.display()))?;
    let hash = crate::leaves::root(&leaves, size).context("merging the leaves")?;
    Ok(Hashed { hash, size, leaves: Some(leaves) })
}

/// Below this a file is hashed on the calling thread: handing a few hundred KiB to the
/// other cores costs more than it saves, and the pool's threads spin a while after each
/// job (rayon's `sched_yield`, 2.5 % of a node's samples in a `tar x` of sources,
/// docs/benchmarks.md, session 32).
const PARALLEL_HASH_MIN_BYTES: u64 = 1 << 20;

pub fn hash_file(p: &Path) -> anyhow::Result<(ContentHash, u64)> {
    hash_path(p, true)
}

/// Memory-mapped (blake3 reads a small file instead), and hashed on all cores if
/// `parallel`.
fn hash_path(p: &Path, parallel: bool) -> anyhow::Result<(ContentHash, u64)> {
    let mut hasher = blake3::Hasher::new();
    if parallel { hasher.update_mmap_rayon(p) } else { hasher.update_mmap(p) }.with_context(|| format!("hashing {}", p.display()))?;
    Ok((ContentHash::from_bytes(*hasher.finalize().as_bytes()), hasher.count()))
}

/// Keeps `bytes` as a content of the store (tests and small contents).
pub fn put_bytes(store: &ContentStore, bytes: &[u8]) -> anyhow::Result<ContentHash> {
    let h = hash_of(bytes);
    if bytes.len() as u64 <= store.small_max {
        store.put_small(&h, bytes)?;
    } else if !store.has(&h) {
        let (tmp, mut f) = store.tmp_file()?;
        f.write_all(bytes)?;
        store.install(&tmp, &h)?;
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A background pass over a blob stops once the blob is removed, so its space comes
    /// back without waiting for the pass to end.
    #[test]
    fn a_blob_reader_stops_once_the_blob_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blob");
        std::fs::write(&p, vec![7u8; 3 * BlobReader::CHECK_EVERY]).unwrap();
        let mut whole = Vec::new();
        BlobReader::open(&p).unwrap().read_to_end(&mut whole).unwrap();
        assert_eq!(whole.len(), 3 * BlobReader::CHECK_EVERY, "a blob that stays is read whole");
        let mut r = BlobReader::open(&p).unwrap();
        let mut buf = vec![0u8; BlobReader::CHECK_EVERY];
        r.read_exact(&mut buf).unwrap();
        std::fs::remove_file(&p).unwrap();
        let e = r.read_to_end(&mut Vec::new()).expect_err("the reader stops");
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        // A full disk waits for the pass to let go of the removed blob, and no longer.
        assert!(!BlobReader::wait_for_removed(std::time::Duration::from_millis(20)), "the reader still holds it");
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(r);
        });
        assert!(BlobReader::wait_for_removed(std::time::Duration::from_secs(10)), "the wait ends when the reader closes");
        closer.join().unwrap();
    }

    /// The GC's second pass removes, of what it is given, what a sweep would (old enough,
    /// whole or as a row), and nothing else: an unused content it was not given stays.
    #[test]
    fn removing_unused_contents_takes_only_the_old_ones_it_is_given() {
        use std::time::{Duration, SystemTime};
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let hour_old = |h: &ContentHash| {
            let f = File::options().write(true).open(store.blob_path(h)).unwrap();
            f.set_modified(SystemTime::now() - Duration::from_secs(3600)).unwrap();
        };
        let [old_blob, young_blob, old_blob_not_given] = [1u8, 2, 3].map(|n| put_bytes(&store, &vec![n; 100_000]).unwrap());
        hour_old(&old_blob);
        hour_old(&old_blob_not_given);
        let [row, row_not_given] = [b"one small".as_slice(), b"another small"].map(|b| put_bytes(&store, b).unwrap());
        assert!(store.is_small(&row));
        let given: HashSet<ContentHash> = [&old_blob, &young_blob, &row].into_iter().cloned().collect();
        assert_eq!(store.remove_unused(&given, Duration::from_secs(60)), 1, "only the old blob: the row is new too");
        assert!(!store.has(&old_blob));
        assert!(store.has(&young_blob) && store.has(&old_blob_not_given) && store.has(&row));
        assert_eq!(store.remove_unused(&given, Duration::ZERO), 2, "with no minimum age: the young blob and the row");
        assert!(!store.has(&young_blob) && !store.has(&row));
        assert!(store.has(&old_blob_not_given) && store.has(&row_not_given), "what it was not given stays");
    }
}
