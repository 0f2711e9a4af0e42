//! The FUSE layer: each callback translates its arguments, calls one `Tree` method and
//! replies. Errors go through `fail`, which logs and replies with the errno the tree
//! chose. Besides that it owns only the kernel's passthrough registrations (`BackingId`
//! per inode): the tree decides when an open passes through (`tree::Passthrough`),
//! and the listing each open directory handle reads from (`Listings`).

use crate::fetch::Fetcher;
use crate::stream::{Stream, STREAM_MIN_BYTES};
use crate::tree::{system_time, Attr, CreateOpen, FsError, Kind, OpenIo, RemoteContent, SetAttr, SetTime, Tree, Written};
use fuser::{
    BackingId, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, PollEvents, PollFlags, PollNotifier, RenameFlags, ReplyAttr, ReplyBmap, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// How long the kernel may cache attributes and entries. The node is the only writer of
/// its tree besides the kernel's own requests, and every change it applies from the
/// manager invalidates what it touched (the entries, the inodes, and the attributes of
/// each directory whose entries changed: `link::invalidate`), so the kernel need not ask
/// again every second; this bounds staleness if an invalidation is ever lost.
const TTL: Duration = Duration::from_secs(30);
/// Largest write the kernel sends in one request.
const MAX_WRITE: u32 = 1 << 20;

pub struct SyncFs {
    pub tree: Arc<Tree>,
    pub data_dir: std::path::PathBuf,
    /// Asked for by the operator, then granted by the kernel at init; switched off for
    /// good if the kernel refuses a backing file.
    passthrough: Arc<AtomicBool>,
    /// The registered backing file of each inode with passthrough handles. Locked
    /// around the tree call that decides an open or release, so that a registration is
    /// never dropped while an open reuses it.
    backings: Arc<Mutex<HashMap<u64, BackingId>>>,
    listings: Listings,
    /// Fetches the content of an on-demand file its first open needs, on the runtime
    /// (the FUSE thread does not wait: the open is answered when the fetch ends).
    fetcher: Arc<Fetcher>,
    rt: tokio::runtime::Handle,
    /// Handles on large on-demand files opened while their content streams in: their
    /// reads wait for the blocks they cover (`stream.rs`).
    streams: Mutex<HashMap<u64, Arc<Stream>>>,
}

/// One directory listing: (inode, offset of the next entry, kind, name), `.` and `..`
/// first.
type Listing = Vec<(u64, u64, Kind, std::ffi::OsString)>;

/// The listing each open directory handle reads: taken from the tree when the handle
/// reads from offset 0 (the first `readdir` after `opendir`, or a `rewinddir`), then
/// served by offset. A listing taken once per pass makes a pass over N entries cost
/// O(N) instead of O(N²) (each call taking the whole directory to skip to its offset),
/// and keeps offsets stable while entries are removed during the pass (`rm -rf`
/// unlinks what it has read before it reads on: with offsets counted in the live
/// directory, it would skip entries).
///
/// All handles together hold at most [`MAX_HELD_LISTING_BYTES`]: a program opening a
/// thousand handles on a directory of a million entries would otherwise make the node
/// hold a thousand copies of it (about 90 GB). A handle whose listing does not fit is
/// served from a listing taken anew at each call, from its offset (as before listings
/// were kept: slower, and offsets counted in the live directory).
struct Listings {
    next: AtomicU64,
    open: Mutex<HeldListings>,
    /// [`MAX_HELD_LISTING_BYTES`] (smaller in tests).
    budget: usize,
}

impl Default for Listings {
    fn default() -> Self {
        Listings { next: AtomicU64::default(), open: Mutex::default(), budget: MAX_HELD_LISTING_BYTES }
    }
}

#[derive(Default)]
struct HeldListings {
    by_handle: HashMap<u64, (Arc<Listing>, usize)>,
    bytes: usize,
}

/// What all open directory handles' listings may hold together (about 2 million
/// entries of short names).
const MAX_HELD_LISTING_BYTES: usize = 256 << 20;

/// About what one entry of a listing costs in memory.
fn listing_bytes(l: &Listing) -> usize {
    l.iter().map(|(_, _, _, name)| std::mem::size_of::<(u64, u64, Kind, std::ffi::OsString)>() + name.len()).sum()
}

impl Listings {
    fn open(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }
    fn held(&self) -> MutexGuard<'_, HeldListings> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// The listing of handle `fh` read from `offset`, and the offset it starts at: the
    /// handle's own (from 0), a fresh one at offset 0, or, for a handle that holds none
    /// at a later offset, what `take(offset)` lists from there.
    fn read(&self, fh: u64, offset: u64, take: impl FnOnce(u64) -> Result<Listing, FsError>) -> Result<(Arc<Listing>, u64), FsError> {
        if offset != 0 {
            if let Some((l, _)) = self.held().by_handle.get(&fh) {
                return Ok((l.clone(), 0));
            }
            return Ok((Arc::new(take(offset)?), offset));
        }
        let l = Arc::new(take(0)?);
        let bytes = listing_bytes(&l);
        let mut held = self.held();
        if let Some((_, old)) = held.by_handle.remove(&fh) {
            held.bytes -= old;
        }
        if held.bytes + bytes <= self.budget {
            held.bytes += bytes;
            held.by_handle.insert(fh, (l.clone(), bytes));
        }
        Ok((l, 0))
    }
    fn release(&self, fh: u64) {
        let mut held = self.held();
        if let Some((_, bytes)) = held.by_handle.remove(&fh) {
            held.bytes -= bytes;
        }
    }
}

impl SyncFs {
    /// `passthrough` starts as what the operator asked for; `init` and `open` switch it off
    /// when the kernel says no (shown in the node's metrics).
    pub fn new(tree: Arc<Tree>, data_dir: std::path::PathBuf, passthrough: Arc<AtomicBool>, fetcher: Arc<Fetcher>, rt: tokio::runtime::Handle) -> SyncFs {
        SyncFs { tree, data_dir, passthrough, backings: Arc::default(), listings: Listings::default(), fetcher, rt, streams: Mutex::default() }
    }

    /// Runs `then` (which replies) once `content` (what the inode lacks, from
    /// `Tree::content_to_fetch`) is here, on a blocking thread; replies with the fetch's
    /// error instead if it fails. Returns `Err(reply)` at once when nothing is to be
    /// fetched.
    fn after_fetch<R: Send + 'static>(
        &self,
        op: &'static str,
        content: Option<RemoteContent>,
        reply: R,
        fail_with: fn(R, Errno),
        then: impl FnOnce(Arc<Tree>, R) + Send + 'static,
    ) -> Result<(), R> {
        let Some(c) = content else {
            return Err(reply);
        };
        let (fetcher, tree) = (self.fetcher.clone(), self.tree.clone());
        self.rt.spawn(async move {
            match fetcher.fetch(&c).await {
                Ok(()) => {
                    let _ = tokio::task::spawn_blocking(move || then(tree, reply)).await;
                }
                Err(e) => fail_with(reply, fail(op, e)),
            }
        });
        Ok(())
    }

    /// Runs `answer` (which replies) on this FUSE thread, or on the blocking pool when
    /// it `may_take_long`: the mount has one FUSE thread (`node.rs`), and what holds it
    /// holds every request. The kernel orders nothing between requests in flight but a
    /// program's own (each waits for its answer), so answering one later is safe.
    fn answer(&self, may_take_long: bool, answer: impl FnOnce(&Tree) + Send + 'static) {
        if may_take_long {
            let tree = self.tree.clone();
            self.rt.spawn_blocking(move || answer(&tree));
        } else {
            answer(&self.tree)
        }
    }
}

/// What an open asks for, and who asks.
struct OpenAsked {
    write: bool,
    truncate: bool,
    caller_uid: u32,
}

/// Opens `ino` in the tree and answers the kernel: a cached handle, or one passing
/// through to the backing file registered for the inode (registered now if it is the
/// first). The registrations are locked around the tree's decision.
fn open_and_answer(tree: &Tree, backings: &Mutex<HashMap<u64, BackingId>>, passthrough: &AtomicBool, ino: u64, open: OpenAsked, reply: ReplyOpen) {
    let OpenAsked { write, truncate, caller_uid } = open;
    // What takes long is done before the registrations are locked.
    let ahead = if write { tree.ready_for_change(ino, !truncate) } else { None };
    let mut backings = lock_backings(backings);
    let fh = match tree.open_after_copy(ino, write, truncate, passthrough.load(Ordering::Relaxed), ahead, caller_uid) {
        Ok((fh, OpenIo::Cached)) => {
            let keep = if tree.keep_pages_at_open(ino) { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
            return reply.opened(FileHandle(fh), keep);
        }
        Ok((fh, OpenIo::Passthrough { register: Some(file) })) => match reply.open_backing(&*file) {
            Ok(id) => {
                backings.insert(ino, id);
                fh
            }
            Err(e) => {
                tracing::warn!("the kernel refused a passthrough backing file ({e}); all reads go through this process from now on");
                passthrough.store(false, Ordering::Relaxed);
                tree.passthrough_refused(fh);
                return reply.opened(FileHandle(fh), FopenFlags::empty());
            }
        },
        Ok((fh, OpenIo::Passthrough { register: None })) => fh,
        Err(e) => return reply.error(fail("open", e)),
    };
    match backings.get(&ino) {
        Some(id) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id),
        None => {
            // The tree and this table disagree: a bug. Fail this open, not the inode.
            tracing::error!(ino = ino, "passthrough handle without a registered backing file");
            drop(backings);
            let _ = tree.release(fh);
            reply.error(Errno::EIO)
        }
    }
}

fn lock_backings(backings: &Mutex<HashMap<u64, BackingId>>) -> MutexGuard<'_, HashMap<u64, BackingId>> {
    backings.lock().unwrap_or_else(|p| p.into_inner())
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.ctime),
        kind: file_type(a.kind),
        perm: a.perm as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(st) => SetTime::At(crate::tree::ns_since_epoch(st)),
    })
}

/// Logs at a level that follows the error (ENOENT is routine; EIO is not) and returns
/// the errno.
fn fail(op: &str, e: FsError) -> Errno {
    match &e {
        FsError::Io(_) | FsError::Unreachable(_) => tracing::warn!(op, "{e}"),
        FsError::NotFound | FsError::Exists | FsError::NotEmpty => tracing::trace!(op, "{e}"),
        _ => tracing::debug!(op, "{e}"),
    }
    Errno::from_i32(e.errno())
}

impl Filesystem for SyncFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        // Set-id bits are cleared here (`SetAttr::kills_set_id`): otherwise the kernel
        // asks for the attributes before every chown, to compute the new mode itself.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV);
        let _ = config.set_max_write(MAX_WRITE);
        if self.passthrough.load(Ordering::Relaxed) {
            // Depth 2: the store may itself be on a stacked file system (overlayfs in a
            // container).
            let granted = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(2).is_ok();
            if granted {
                tracing::info!("FUSE passthrough on: the kernel reads committed files straight from the store");
            } else {
                tracing::info!("the kernel has no FUSE passthrough: all reads go through this process");
            }
            self.passthrough.store(granted, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.tree.lookup(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &attr(&a), Generation(0)),
            Err(e) => reply.error(fail("lookup", e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.tree.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.tree.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &attr(&a)),
            Err(e) => reply.error(fail("getattr", e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        mut reply: ReplyAttr,
    ) {
        let a = SetAttr { mode, uid, gid, size, atime: set_time(atime), mtime: set_time(mtime), fh: fh.map(|f| f.0) };
        let uid = req.uid();
        let ino = ino.0;
        let set = move |tree: &Tree, a: SetAttr, reply: ReplyAttr| match tree.setattr(ino, uid, a) {
            Ok(a) => reply.attr(&TTL, &attr(&a)),
            Err(e) => reply.error(fail("setattr", e)),
        };
        // Truncating an on-demand file to a size other than 0 keeps what is below it:
        // that is fetched first.
        if size.is_some_and(|n| n > 0) {
            let later = a.clone();
            let missing = self.tree.content_to_fetch(ino, false);
            let Err(r) = self.after_fetch("setattr", missing, reply, |r, e| r.error(e), move |tree, reply| set(&tree, later, reply)) else { return };
            reply = r;
        }
        // A truncation may copy a large file, or hash one (`Tree::change_may_take_long`,
        // `Tree::truncation_commits_large`).
        let long = size.is_some_and(|n| self.tree.change_may_take_long(ino, n > 0) || self.tree.truncation_commits_large(ino, n));
        self.answer(long, move |tree| set(tree, a, reply))
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.tree.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(fail("readlink", e)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        match self.tree.mknod(parent.0, name, mode & !umask | (mode & libc::S_IFMT), rdev, req.uid(), req.gid()) {
            Ok(a) => reply.entry(&TTL, &attr(&a), Generation(0)),
            Err(e) => reply.error(fail("mknod", e)),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        match self.tree.mkdir(parent.0, name, mode & !umask, req.uid(), req.gid()) {
            Ok(a) => reply.entry(&TTL, &attr(&a), Generation(0)),
            Err(e) => reply.error(fail("mkdir", e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.tree.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("unlink", e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.tree.rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("rmdir", e)),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        match self.tree.symlink(parent.0, link_name, target.as_os_str().as_bytes(), req.uid(), req.gid()) {
            Ok(a) => reply.entry(&TTL, &attr(&a), Generation(0)),
            Err(e) => reply.error(fail("symlink", e)),
        }
    }

    fn rename(&self, _req: &Request, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr, flags: RenameFlags, reply: ReplyEmpty) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) || flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        match self.tree.rename(parent.0, name, newparent.0, newname, flags.contains(RenameFlags::RENAME_NOREPLACE)) {
            // (A large directory's changes are queued after the answer, a part at a
            // time, by the node's task for them: `node::expand_moves_loop`.)
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("rename", e)),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        match self.tree.link(ino.0, newparent.0, newname) {
            Ok(a) => reply.entry(&TTL, &attr(&a), Generation(0)),
            Err(e) => reply.error(fail("link", e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        let truncate = flags.0 & libc::O_TRUNC != 0;
        // A large on-demand file opened for reading streams in: the open returns at once
        // and each read waits for the blocks it covers.
        let missing = self.tree.content_to_fetch(ino.0, write && truncate);
        if !write {
            if let Some(c) = missing.as_ref().filter(|c| c.size >= STREAM_MIN_BYTES) {
                let stream = match self.fetcher.stream(c) {
                    Ok(s) => s,
                    Err(e) => return reply.error(fail("open", e)),
                };
                return match self.tree.open(ino.0, false, false, false) {
                    Ok((fh, _)) => {
                        self.streams.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, stream);
                        reply.opened(FileHandle(fh), FopenFlags::empty())
                    }
                    Err(e) => {
                        self.fetcher.release_stream(&stream);
                        reply.error(fail("open", e))
                    }
                };
            }
        }
        // An on-demand file's first open waits for its content (an open that truncates
        // needs none); that open reads through this process, later ones may pass through.
        let fetching = self.after_fetch(
            "open",
            missing,
            reply,
            |r, e| r.error(e),
            move |tree, reply| match tree.open(ino.0, write, truncate, false) {
                Ok((fh, _)) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(fail("open", e)),
            },
        );
        let Err(reply) = fetching else { return };
        // An open for writing may copy a large file (`Tree::change_may_take_long`).
        let long = write && self.tree.change_may_take_long(ino.0, !truncate);
        let (backings, passthrough) = (self.backings.clone(), self.passthrough.clone());
        let open = OpenAsked { write, truncate, caller_uid: req.uid() };
        self.answer(long, move |tree| open_and_answer(tree, &backings, &passthrough, ino.0, open, reply));
    }

    fn read(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags, _lock: Option<LockOwner>, reply: ReplyData) {
        let stream = self.streams.lock().unwrap_or_else(|p| p.into_inner()).get(&fh.0).cloned();
        if let Some(s) = stream {
            self.rt.spawn(async move {
                match s.read(offset, size).await {
                    Ok(d) => {
                        reply.data(&d);
                        s.give_back(d);
                    }
                    Err(e) => reply.error(fail("read", e)),
                }
            });
            return;
        }
        match self.tree.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(fail("read", e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.tree.write_without_waiting(fh.0, offset, data) {
            Ok(Written::Done(n)) => reply.written(n),
            // A full disk: what was removed to make room frees its space when its last
            // holder lets go, perhaps a release queued behind this request. That wait
            // happens on the blocking pool, so this thread can answer the release.
            Ok(Written::RoomComing) => {
                let (tree, data) = (self.tree.clone(), data.to_vec());
                self.rt.spawn_blocking(move || match tree.write_after_room(fh.0, offset, &data) {
                    Ok(n) => reply.written(n),
                    Err(e) => reply.error(fail("write", e)),
                });
            }
            Err(e) => reply.error(fail("write", e)),
        }
    }

    /// A close commits what was written; hashing a large file takes long, so that one is
    /// answered from the blocking pool and the FUSE threads stay free for the mount's
    /// other operations (there are few of them: `node.rs`).
    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        self.answer(self.tree.flush_may_take_long(fh.0), move |tree| match tree.flush(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("flush", e)),
        })
    }

    fn release(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, _lock: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        if let Some(s) = self.streams.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh.0) {
            self.fetcher.release_stream(&s);
        }
        // The last writer's close of a file passthrough readers share commits it: its
        // snapshot is taken before the registrations and the tree are locked.
        let backings = self.backings.clone();
        self.answer(self.tree.release_may_take_long(fh.0), move |tree| {
            let prehashed = tree.hash_before_release(fh.0);
            let mut backings = lock_backings(&backings);
            match tree.release_hashed(fh.0, prehashed) {
                Ok(r) => {
                    if r.backing_unused {
                        backings.remove(&r.ino);
                    }
                    reply.ok()
                }
                Err(e) => reply.error(fail("release", e)),
            }
        })
    }

    /// Flushing to the disk takes long: answered from the blocking pool, as a large
    /// file's close is.
    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let tree = self.tree.clone();
        self.rt.spawn_blocking(move || match tree.fsync(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("fsync", e)),
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.tree.getattr(ino.0) {
            // The kernel may keep listings across opens (CACHE_DIR + KEEP_CACHE): a local
            // change of the directory goes through the kernel, which drops its listing,
            // and a remote one invalidates the directory's inode (`link::invalidate`).
            Ok(a) if a.kind == Kind::Dir => reply.opened(FileHandle(self.listings.open()), FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(fail("opendir", e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.listings.read(fh.0, offset, |from| self.tree.readdir(ino.0, from)) {
            Ok((listing, starts_at)) => {
                for (i, next, kind, name) in listing.iter().skip((offset - starts_at) as usize) {
                    if reply.add(INodeNo(*i), *next, file_type(*kind), name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(fail("readdir", e)),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.listings.release(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Directory changes are committed to the node database when they happen.
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Space is that of the disk holding the node's data directory.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        let c = std::ffi::CString::new(self.data_dir.as_os_str().as_bytes()).unwrap_or_default();
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return reply.error(Errno::EIO);
        }
        let files = self.tree.statfs_files();
        reply.statfs(s.f_blocks, s.f_bfree, s.f_bavail, files + s.f_ffree, s.f_ffree, s.f_bsize as u32, 255, s.f_frsize as u32);
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, flags: i32, reply: ReplyCreate) {
        let open = CreateOpen { write: flags & libc::O_ACCMODE != libc::O_RDONLY, exclusive: flags & libc::O_EXCL != 0, truncate: flags & libc::O_TRUNC != 0 };
        match self.tree.create(parent.0, name, mode & !umask, req.uid(), req.gid(), open) {
            Ok((a, fh)) => reply.created(&TTL, &attr(&a), Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(fail("create", e)),
        }
    }

    // Extended attributes are not synced and not kept: say so clearly instead of
    // pretending (docs/SEMANTICS.md).
    fn setxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _value: &[u8], _flags: i32, _position: u32, reply: ReplyEmpty) {
        reply.error(Errno::from_i32(libc::EOPNOTSUPP))
    }
    // ENOSYS tells the kernel that this file system has no extended attributes at all:
    // it answers `EOPNOTSUPP` itself from then on, and stops asking for
    // `security.capability` before every write (one request less per written file).
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::from_i32(libc::ENOSYS))
    }
    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }
    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::from_i32(libc::ENODATA))
    }

    // Operations the node does not implement, answered quietly (fuser's defaults log a
    // warning on every call, and programs send some of them all the time: Python's
    // `open` asks `TCGETS` of every file). The errno is what a local file system that
    // lacks the feature answers, so programs take their usual fallback.

    /// No device controls on synced files: "not a terminal / no such control".
    fn ioctl(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: IoctlFlags, cmd: u32, _in: &[u8], _out_size: u32, reply: ReplyIoctl) {
        tracing::trace!(cmd, "ioctl: ENOTTY");
        reply.error(Errno::from_i32(libc::ENOTTY))
    }
    /// `ENOSYS` makes the kernel stop asking and report files always ready, as for
    /// regular files on a local disk.
    fn poll(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _ph: PollNotifier, _events: PollEvents, _flags: PollFlags, reply: ReplyPoll) {
        reply.error(Errno::ENOSYS)
    }
    /// `posix_fallocate` falls back to writing zeros, which the node syncs like any write.
    fn fallocate(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _offset: u64, _length: u64, _mode: i32, reply: ReplyEmpty) {
        reply.error(Errno::from_i32(libc::EOPNOTSUPP))
    }
    /// The kernel falls back to its generic `SEEK_DATA`/`SEEK_HOLE` (the whole file is data).
    fn lseek(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _offset: i64, _whence: i32, reply: ReplyLseek) {
        reply.error(Errno::ENOSYS)
    }
    /// The kernel (and `cp`) fall back to reading and writing.
    #[allow(clippy::too_many_arguments)]
    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS)
    }
    fn bmap(&self, _req: &Request, _ino: INodeNo, _blocksize: u32, _idx: u64, reply: ReplyBmap) {
        reply.error(Errno::ENOSYS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(names: usize) -> Listing {
        (0..names as u64).map(|i| (i + 1, i + 1, Kind::File, format!("{i:08}").into())).collect()
    }

    /// Handles hold their listings up to the budget; one past it is served from a listing
    /// taken anew at each call, from its offset; a released handle makes room again.
    #[test]
    fn open_directory_handles_hold_listings_up_to_a_budget() {
        let one = listing_bytes(&listing(100));
        let listings = Listings { budget: 2 * one, ..Listings::default() };
        let takes = std::cell::RefCell::new(Vec::new());
        let read = |fh: u64, offset: u64| {
            let (l, from) = listings
                .read(fh, offset, |from| {
                    takes.borrow_mut().push((fh, from));
                    Ok(listing(100).split_off(from as usize))
                })
                .unwrap();
            l[(offset - from) as usize].3.clone()
        };
        let (a, b, c) = (listings.open(), listings.open(), listings.open());
        for fh in [a, b, c] {
            assert_eq!(read(fh, 0), "00000000");
        }
        assert_eq!(listings.held().bytes, 2 * one, "two listings fit, the third does not");
        takes.borrow_mut().clear();
        for fh in [a, b, c] {
            assert_eq!(read(fh, 50), "00000050", "every handle reads on where it was");
        }
        assert_eq!(*takes.borrow(), [(c, 50)], "only the handle past the budget takes its listing again");
        listings.release(a);
        assert_eq!(listings.held().bytes, one);
        assert_eq!(read(c, 0), "00000000", "a rewind takes it anew");
        assert_eq!(listings.held().bytes, 2 * one, "and now it fits");
        listings.release(b);
        listings.release(c);
        listings.release(c);
        let held = listings.held();
        assert_eq!((held.bytes, held.by_handle.len()), (0, 0));
    }
}
