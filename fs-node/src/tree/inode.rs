//! One inode as the tree keeps it in memory: its attributes, links, content (committed
//! hash, work file), open counts and passthrough state, and its row in `node.db`.

use super::*;

pub(super) struct Inode {
    pub(super) ino: u64,
    pub(super) kind: Kind,
    pub(super) perm: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) atime: i64,
    pub(super) mtime: i64,
    pub(super) ctime: i64,
    pub(super) nlink: u32,
    pub(super) rdev: u32,
    pub(super) size: u64,
    pub(super) hash: Option<ContentHash>,
    pub(super) target: Option<Box<[u8]>>,
    pub(super) children: BTreeMap<OsString, DirEntry>,
    /// Directory entries naming this inode (a directory has one; hard links add more).
    pub(super) links: Vec<(u64, OsString)>,
    /// Uncommitted content being written (copy-on-write of the blob).
    pub(super) work: Option<Arc<File>>,
    /// Set while `work` is: the synced attributes of the version in the store (`hash`).
    /// The database records these, never the attributes of bytes not yet committed, so
    /// a node that dies while a file is written comes back with the file's last closed
    /// version, whole (`row`).
    pub(super) committed: Option<Committed>,
    /// The work file is a passthrough backing file detached from the store (it has no
    /// name in the store's work directory, and writes may reach it without passing here).
    pub(super) detached: bool,
    /// Changes each time the work file's bytes may change (`State::ensure_work`, which
    /// every write and truncation goes through) and when a failed transaction is undone:
    /// a hash taken outside the tree lock is used only if the stamp did not change.
    pub(super) work_stamp: u64,
    /// Read handle on the current blob, opened on first read.
    pub(super) blob: Option<Arc<crate::patched::ContentFile>>,
    /// The kernel's page cache of this inode holds its content (or nothing): the inode
    /// is new to the kernel (every change of a file's content by a remote version is a
    /// new inode), or the kernel dropped its pages at a cached open and every write
    /// since went through them. Passthrough writes, which go past them, clear it. A
    /// cached open of a large file keeps the pages while it is set
    /// (`Tree::keep_pages_at_open`): dropping 256 MiB of them cost 36 ms.
    pub(super) kernel_pages: bool,
    /// Made here by a local operation (a create, a mkdir, a mknod, a symlink; a rename
    /// or a link of a file being written, whose put at its new path waits for its
    /// close), and has taken no state from the manager since (`State::set_rev` clears
    /// it): it is not what the path's revision here (`State::revs`) names, which is a
    /// delete or another inode's state, so its changes say nothing of what they were made on from it
    /// (`MadeOn`; simulator seed 831386: a file made where a directory was deleted said
    /// it was made on its own empty content, and the manager took its write for a touch
    /// of those bytes, and lost it). Not kept across a restart: by then its first put is
    /// queued, which its later changes follow, or decided.
    pub(super) born_here: bool,
    /// Set while the kernel does this inode's I/O itself on a backing file.
    pub(super) passthrough: Option<Box<Passthrough>>,
    pub(super) writers: u32,
    pub(super) open: u32,
    pub(super) lookups: u64,
}

/// What a directory keeps of each entry: the inode it names and that inode's kind (which
/// never changes), so that a listing need not look in the inode table (in a large tree
/// each look there is a cache miss, and a directory of 1,000 files cost 1,000 of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DirEntry {
    pub(super) ino: u64,
    pub(super) kind: Kind,
}

/// The directory entries of the whole tree that name directories and that name anything
/// else (files, symbolic links, special files; a file with two names counts twice, as
/// `find` counts it). Kept as entries come and go (`State::set_child`, its undo, the
/// load), so that `syncctl status` costs the same at a million files as at ten.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct EntryCounts {
    pub(super) files: u64,
    pub(super) dirs: u64,
}

impl EntryCounts {
    /// Counts `new` in and `old` out (an entry replaced, added or removed).
    pub(super) fn replaced(&mut self, old: Option<&DirEntry>, new: Option<&DirEntry>) {
        if let Some(e) = new {
            *self.of_kind(e.kind) += 1;
        }
        if let Some(e) = old {
            // (Never below zero: the tree tests and the simulator check the counts.)
            let n = self.of_kind(e.kind);
            debug_assert!(*n > 0, "an entry counted out was counted in");
            *n = n.saturating_sub(1);
        }
    }

    fn of_kind(&mut self, kind: Kind) -> &mut u64 {
        if kind == Kind::Dir {
            &mut self.dirs
        } else {
            &mut self.files
        }
    }
}

/// Size and mtime of a file's committed version (see `Inode::committed`).
#[derive(Clone, Debug)]
pub(super) struct Committed {
    pub(super) size: u64,
    pub(super) mtime: i64,
    /// The mode and owners the file had before the first setattr since it began to be
    /// written (none: no setattr, and they are the file's own). Its put waits for the
    /// last close (or, after a crash, for the load), and carries them as the state it
    /// was made on, as a setattr's own put does (`Change::base_meta`): without them, a
    /// chmod made while a file was open for writing, on a base the manager's history
    /// has forgotten, was taken for no change (simulator seed 661047). Kept in the
    /// database with the row.
    pub(super) meta_base: Option<ModeAndOwners>,
}

/// Kernel passthrough of one inode: while any of its handles is open, the kernel reads
/// (and writes) one backing file directly, without a round trip through this process.
/// The kernel insists on one backing file per inode for as long as a passthrough handle
/// is open, and refuses to mix passthrough and cached handles on an inode, so:
/// - passthrough starts only on a read-only open of a committed file with no other open
///   handle, on the blob itself;
/// - every later open of the inode is passthrough too, on the same backing file; a
///   writer first *detaches* it (`ContentStore::detach_for_work`): the backing file
///   becomes the inode's work file (readers see the writes, as POSIX wants), and the
///   store keeps a copy of the blob if it still named that file;
/// - two inodes never share a backing file (`State::backing_owner`), so one inode's
///   writes never show in another;
/// - while a detached work file is open for writing, its size and mtime are the file's
///   own (the writes do not pass here).
#[derive(Clone)]
pub(super) struct Passthrough {
    /// The backing file, opened read-only from the store.
    pub(super) backing: Arc<File>,
    /// (st_dev, st_ino) of the backing file.
    pub(super) key: (u64, u64),
    pub(super) handles: u32,
}

impl Inode {
    /// The row the database keeps: a file being written is recorded as its committed
    /// version (its size, times and mode change with the content, at the commit).
    pub(super) fn row(&self) -> InodeRow {
        let c = self.committed.clone().unwrap_or_else(|| self.current());
        InodeRow {
            ino: self.ino,
            kind: self.kind as u8,
            // Ownership and mode are saved as they are now, also while the file is
            // written: a chmod must survive a crash of the node like any metadata
            // change (only the bytes wait for the last close).
            perm: self.perm,
            uid: self.uid,
            gid: self.gid,
            atime: self.atime,
            mtime: c.mtime,
            ctime: self.ctime,
            nlink: self.nlink,
            rdev: self.rdev,
            size: c.size,
            hash: self.hash.as_ref().map(|h| h.to_string()),
            target: self.target.as_deref().map(<[u8]>::to_vec),
            meta_base: c.meta_base,
        }
    }
    /// A copy of everything but the children (see `Undo::Inode`).
    pub(super) fn fields(&self) -> Inode {
        Inode {
            ino: self.ino,
            kind: self.kind,
            perm: self.perm,
            uid: self.uid,
            gid: self.gid,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            nlink: self.nlink,
            rdev: self.rdev,
            size: self.size,
            hash: self.hash.clone(),
            target: self.target.clone(),
            children: BTreeMap::new(),
            links: self.links.clone(),
            work: self.work.clone(),
            committed: self.committed.clone(),
            detached: self.detached,
            work_stamp: self.work_stamp,
            blob: self.blob.clone(),
            kernel_pages: self.kernel_pages,
            born_here: self.born_here,
            passthrough: self.passthrough.clone(),
            writers: self.writers,
            open: self.open,
            lookups: self.lookups,
        }
    }

    pub(super) fn current(&self) -> Committed {
        Committed { size: self.size, mtime: self.mtime, meta_base: None }
    }

    /// Makes `w` the work file (`detached`: see the field); the attributes of the
    /// committed version are kept aside.
    pub(super) fn set_work(&mut self, w: Arc<File>, detached: bool) {
        if self.work.is_none() {
            self.committed = Some(self.current());
        }
        self.work = Some(w);
        self.detached = detached;
        self.blob = None;
    }

    pub(super) fn attr(&self) -> Attr {
        Attr {
            ino: self.ino,
            kind: self.kind,
            perm: self.perm,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            nlink: self.nlink,
            rdev: self.rdev,
        }
    }
    /// Size and mtime of a detached work file come from the file: passthrough writes
    /// change it without passing here.
    pub(super) fn take_passthrough_writes(&mut self) -> FsResult<()> {
        if let (true, Some(w)) = (self.detached, &self.work) {
            let m = w.metadata()?;
            self.size = m.len();
            self.mtime = m.modified().ok().map(super::ns_since_epoch).unwrap_or(self.mtime);
        }
        Ok(())
    }

    /// The other direction: an explicit mtime (utimensat, truncate) goes to the
    /// detached work file, which holds it from now on.
    pub(super) fn give_mtime_to_work(&self) -> FsResult<()> {
        if let (true, Some(w)) = (self.detached, &self.work) {
            w.set_modified(system_time(self.mtime))?;
        }
        Ok(())
    }

    pub(super) fn new(ino: u64, kind: Kind, perm: u32, uid: u32, gid: u32, now: i64) -> Inode {
        Inode {
            ino,
            kind,
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            rdev: 0,
            size: 0,
            hash: None,
            target: None,
            children: BTreeMap::new(),
            links: Vec::new(),
            work: None,
            committed: None,
            detached: false,
            work_stamp: 0,
            blob: None,
            kernel_pages: true,
            born_here: false,
            passthrough: None,
            writers: 0,
            open: 0,
            lookups: 0,
        }
    }

    /// What a chmod or chown changes, as [`version`](Self::version) says them.
    pub(super) fn mode_and_owners(&self) -> ModeAndOwners {
        ModeAndOwners { mode: self.perm & 0o7777, uid: self.uid, gid: self.gid }
    }

    /// The state a change of this inode is made on (`MadeOn`): its mode and owners, and
    /// its committed content (of a file being written, the one before the writing);
    /// none for an inode born here.
    pub(super) fn made_on(&self) -> Option<MadeOn> {
        if self.born_here {
            return None;
        }
        let content = match self.kind {
            Kind::File => self.hash.clone().map(|hash| Content::File { hash, size: self.committed.as_ref().map_or(self.size, |c| c.size) }),
            _ => self.version().map(|v| v.content),
        };
        Some(MadeOn { meta: self.mode_and_owners(), content })
    }

    /// The synced version of this inode, if it is of a synced kind with known content.
    pub(super) fn version(&self) -> Option<Version> {
        let content = match self.kind {
            Kind::File => Content::File { hash: self.hash.clone()?, size: self.size },
            Kind::Dir => Content::Dir,
            Kind::Symlink => Content::Symlink { target: std::str::from_utf8(self.target.as_deref()?).ok()?.to_string() },
            _ => return None,
        };
        // Directory and symlink times are local (docs/SEMANTICS.md).
        let mtime_ns = if self.kind == Kind::File { self.mtime } else { 0 };
        Some(Version { content, mode: self.perm & 0o7777, uid: self.uid, gid: self.gid, mtime_ns })
    }
}
