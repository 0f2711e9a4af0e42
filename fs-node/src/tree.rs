//! The node's file tree: the core every FUSE callback and every remote change goes
//! through. It owns the inode table, the directory entries, the last revision the manager
//! gave each path, open file handles and the outbox, all behind one lock, and persists
//! them in the node's SQLite database in the same step that changes them.
//!
//! Local operations that change synced state (files, directories, symlinks) add a change
//! to the outbox; remote entries are applied with `apply_remote`, which never touches a
//! path with an undecided local change. A file's new content is committed (hashed, moved
//! into the content store, and sent) when it is closed or fsynced. It does no network I/O
//! and never calls the kernel: cache invalidations are returned to the caller.

use crate::db::{Db, InodeRow, OutboxRow};
use crate::env::{Env, PastBug, SystemEnv};
use crate::store::ContentStore;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};
use wire::{Change, ChangeOp, Content, ContentHash, Entry, MessageId, Outcome, RelPath, Revision, Version};

pub const ROOT: u64 = 1;

/// Errors of file system operations; each maps to exactly one errno in `errno()`.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("file name too long")]
    NameTooLong,
    #[error("file name is not valid UTF-8 and cannot be synced")]
    BadName,
    #[error("invalid argument")]
    Invalid,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("operation not supported")]
    NotSupported,
    #[error("bad file handle")]
    BadHandle,
    #[error("too many links")]
    TooManyLinks,
    #[error("no space left on the disk holding the node's data")]
    NoSpace,
    /// The node database could not grow (it shares the disk with the store).
    #[error("no space left for the node database")]
    DbFull,
    #[error("file too large for the disk holding the node's data")]
    TooBig,
    #[error("I/O error: {0:#}")]
    Io(anyhow::Error),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::BadName => libc::EILSEQ,
            FsError::Invalid => libc::EINVAL,
            FsError::NotPermitted => libc::EPERM,
            FsError::NotSupported => libc::EOPNOTSUPP,
            FsError::BadHandle => libc::EBADF,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::NoSpace => libc::ENOSPC,
            FsError::DbFull => libc::ENOSPC,
            FsError::TooBig => libc::EFBIG,
            FsError::Io(_) => libc::EIO,
        }
    }
}

/// Limits of the disk under the node's data (the store, the work files, the node
/// database) are the user's to see, not an I/O failure: the error of one of them, if
/// `e` is one.
fn disk_limit(e: &(dyn std::error::Error + 'static)) -> Option<FsError> {
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        return match io.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Some(FsError::NoSpace),
            Some(libc::EFBIG) => Some(FsError::TooBig),
            _ => None,
        };
    }
    match e.downcast_ref::<rusqlite::Error>() {
        Some(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::DiskFull => Some(FsError::DbFull),
        _ => None,
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        disk_limit(&e).unwrap_or_else(|| FsError::Io(e.into()))
    }
}
impl From<rusqlite::Error> for FsError {
    fn from(e: rusqlite::Error) -> Self {
        disk_limit(&e).unwrap_or_else(|| FsError::Io(anyhow::Error::new(e).context("node database")))
    }
}
impl From<anyhow::Error> for FsError {
    fn from(e: anyhow::Error) -> Self {
        e.chain().find_map(disk_limit).unwrap_or(FsError::Io(e))
    }
}

pub type FsResult<T> = Result<T, FsError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    Socket = 5,
    CharDev = 6,
    BlockDev = 7,
}

impl Kind {
    fn from_code(c: u8) -> Kind {
        match c {
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDev,
            7 => Kind::BlockDev,
            _ => Kind::File,
        }
    }
    /// Kinds that are synced; the others exist only on this node (docs/SEMANTICS.md).
    pub fn synced(self) -> bool {
        matches!(self, Kind::File | Kind::Dir | Kind::Symlink)
    }
    fn from_mode(mode: u32) -> FsResult<Kind> {
        Ok(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return Err(FsError::Invalid),
        })
    }
}

/// Attributes as the FUSE layer needs them.
#[derive(Clone, Debug)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub nlink: u32,
    pub rdev: u32,
}

/// A time given to setattr.
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    Now,
    At(i64),
}

#[derive(Default, Debug)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub fh: Option<u64>,
}

/// Kernel cache entries to drop after a remote change (done by the caller, outside
/// FUSE callbacks, because invalidating from inside one can deadlock the kernel).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inval {
    Entry { parent: u64, name: OsString },
    Inode { ino: u64 },
}

/// What applying a remote entry did.
#[derive(Debug, Default)]
pub struct Applied {
    /// The local tree changed (content, kind or metadata).
    pub changed: bool,
    /// The entry could not be applied because its content is not in the store yet.
    pub missing_content: bool,
    pub invals: Vec<Inval>,
}

/// `node.db` meta key of [`Tree::synced_head`].
const SYNCED_HEAD_KEY: &str = "synced_head";

pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// Nanoseconds since the epoch (negative: before it) as a `SystemTime`.
pub fn system_time(ns: i64) -> std::time::SystemTime {
    if ns >= 0 {
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns as u64)
    } else {
        std::time::UNIX_EPOCH - std::time::Duration::from_nanos(ns.unsigned_abs())
    }
}

struct Inode {
    ino: u64,
    kind: Kind,
    perm: u32,
    uid: u32,
    gid: u32,
    atime: i64,
    mtime: i64,
    ctime: i64,
    nlink: u32,
    rdev: u32,
    size: u64,
    hash: Option<ContentHash>,
    target: Option<Vec<u8>>,
    children: BTreeMap<OsString, u64>,
    /// Directory entries naming this inode (a directory has one; hard links add more).
    links: Vec<(u64, OsString)>,
    /// Uncommitted content being written (copy-on-write of the blob).
    work: Option<Arc<File>>,
    /// Set while `work` is: the synced attributes of the version in the store (`hash`).
    /// The database records these, never the attributes of bytes not yet committed, so
    /// a node that dies while a file is written comes back with the file's last closed
    /// version, whole (`row`).
    committed: Option<Committed>,
    /// The work file is a passthrough backing file detached from the store (it has no
    /// name in the store's work directory, and writes may reach it without passing here).
    detached: bool,
    /// Read handle on the current blob, opened on first read.
    blob: Option<Arc<File>>,
    /// Set while the kernel does this inode's I/O itself on a backing file.
    passthrough: Option<Passthrough>,
    writers: u32,
    open: u32,
    lookups: u64,
}

/// Size and mtime of a file's committed version (see `Inode::committed`).
#[derive(Clone, Debug)]
struct Committed {
    size: u64,
    mtime: i64,
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
struct Passthrough {
    /// The backing file, opened read-only from the store.
    backing: Arc<File>,
    /// (st_dev, st_ino) of the backing file.
    key: (u64, u64),
    handles: u32,
}

/// How the kernel is to do I/O on a handle `Tree::open` made.
pub enum OpenIo {
    /// Through this process (`read`/`write` callbacks), with the page cache.
    Cached,
    /// On the inode's backing file. `register` is the file to register with the kernel
    /// when this is the inode's first passthrough handle; `None` reuses the inode's
    /// registered backing file.
    Passthrough { register: Option<Arc<File>> },
}

/// What `Tree::release` did to the inode's passthrough state.
pub struct Released {
    pub ino: u64,
    /// The inode's last passthrough handle closed: its backing registration can go.
    pub backing_unused: bool,
}

impl Inode {
    /// The row the database keeps: a file being written is recorded as its committed
    /// version (its size, times and mode change with the content, at the commit).
    fn row(&self) -> InodeRow {
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
            target: self.target.clone(),
        }
    }
    /// A copy of everything but the children (see `Undo::Inode`).
    fn fields(&self) -> Inode {
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
            blob: self.blob.clone(),
            passthrough: self.passthrough.clone(),
            writers: self.writers,
            open: self.open,
            lookups: self.lookups,
        }
    }

    fn current(&self) -> Committed {
        Committed { size: self.size, mtime: self.mtime }
    }

    /// Makes `w` the work file (`detached`: see the field); the attributes of the
    /// committed version are kept aside.
    fn set_work(&mut self, w: Arc<File>, detached: bool) {
        if self.work.is_none() {
            self.committed = Some(self.current());
        }
        self.work = Some(w);
        self.detached = detached;
        self.blob = None;
    }

    fn attr(&self) -> Attr {
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
    fn take_passthrough_writes(&mut self) -> FsResult<()> {
        if let (true, Some(w)) = (self.detached, &self.work) {
            let m = w.metadata()?;
            self.size = m.len();
            self.mtime = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos() as i64).unwrap_or(self.mtime);
        }
        Ok(())
    }

    /// The other direction: an explicit mtime (utimensat, truncate) goes to the
    /// detached work file, which holds it from now on.
    fn give_mtime_to_work(&self) -> FsResult<()> {
        if let (true, Some(w)) = (self.detached, &self.work) {
            w.set_modified(system_time(self.mtime))?;
        }
        Ok(())
    }

    fn new(ino: u64, kind: Kind, perm: u32, uid: u32, gid: u32, now: i64) -> Inode {
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
            blob: None,
            passthrough: None,
            writers: 0,
            open: 0,
            lookups: 0,
        }
    }
    /// The synced version of this inode, if it is of a synced kind with known content.
    fn version(&self) -> Option<Version> {
        let content = match self.kind {
            Kind::File => Content::File { hash: self.hash.clone()?, size: self.size },
            Kind::Dir => Content::Dir,
            Kind::Symlink => Content::Symlink { target: String::from_utf8(self.target.clone()?).ok()? },
            _ => return None,
        };
        // Directory and symlink times are local (docs/SEMANTICS.md).
        let mtime_ns = if self.kind == Kind::File { self.mtime } else { 0 };
        Some(Version { content, mode: self.perm & 0o7777, uid: self.uid, gid: self.gid, mtime_ns })
    }
}

struct Handle {
    ino: u64,
    write: bool,
    passthrough: bool,
}

/// The outbox as the tree keeps it in memory (rows are also in the database).
#[derive(Default)]
struct Outbox {
    rows: BTreeMap<i64, OutboxRow>,
    /// Undecided rows per path.
    per_path: HashMap<RelPath, usize>,
    /// Rows that may have reached the broker (published in this run, or loaded from
    /// disk at start); these are never coalesced.
    sent: HashSet<MessageId>,
    /// Rows with a seq up to this one were handed to the broker link in this session.
    published_upto: i64,
}

/// What `sync` and the status page report about the tree.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TreeStats {
    pub files: u64,
    pub dirs: u64,
    pub pending_changes: u64,
    pub conflicts_seen: u64,
    /// Highest revision this node has taken from the manager.
    pub last_revision: u64,
    /// Opens whose I/O the kernel did on a backing file by itself.
    pub passthrough_opens: u64,
    /// Backing files a writer made into an inode's own work file.
    pub passthrough_detaches: u64,
}

/// What a transaction changed in memory, recorded while it runs so that a failed one
/// is undone: the database rolls back, and the tree must again be what it holds (an
/// operation either happens in both or in neither). Undone in reverse order.
enum Undo {
    /// The inode's fields before the transaction first changed them, or `None`: the
    /// transaction made it. Its `children` are left out (a large directory is never
    /// copied) and undone by `Child` entries; an inode dropped from memory is kept whole.
    Inode(u64, Option<Inode>),
    Child {
        parent: u64,
        name: OsString,
        old: Option<u64>,
    },
    Rev(RelPath, Option<Revision>),
    Outbox(i64, Option<OutboxRow>),
    PerPath(RelPath, Option<usize>),
    Sent(MessageId, bool),
    Handle(u64, Option<Handle>),
    BackingOwner((u64, u64), Option<u64>),
    /// The work file of the inode was moved into the store as this blob: moved back.
    Installed(u64, ContentHash),
}

/// Counters a transaction may move, restored whole when it fails.
#[derive(Clone, Copy)]
struct Counters {
    next_ino: u64,
    next_fh: u64,
    conflicts_seen: u64,
    passthrough_opens: u64,
    passthrough_detaches: u64,
}

/// The undo log of the open transaction (see `Undo`).
struct Journal {
    undo: Vec<Undo>,
    /// Inodes whose fields are in `undo` already.
    saved: HashSet<u64>,
    counters: Counters,
    /// Work files to remove once the transaction is committed (removed before, a failed
    /// transaction could not give them back).
    discard_after_commit: Vec<u64>,
    /// Inodes whose passthrough backing file became their work file (see `undo`).
    detached: HashSet<u64>,
}

struct State {
    db: Db,
    /// The clock and message ids.
    env: Arc<dyn Env>,
    /// Set while a transaction runs (`Tree::atomically`).
    journal: Option<Journal>,
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    revs: HashMap<RelPath, Revision>,
    outbox: Outbox,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    conflicts_seen: u64,
    /// Which inode each passthrough backing file (st_dev, st_ino) belongs to.
    backing_owner: HashMap<(u64, u64), u64>,
    passthrough_opens: u64,
    passthrough_detaches: u64,
}

pub struct Tree {
    state: Mutex<State>,
    store: ContentStore,
    /// Woken whenever the outbox grows.
    pub outbox_ready: Arc<tokio::sync::Notify>,
    /// Files whose committed content `load` found missing or damaged: the only ones
    /// `damaged` looks at (a referenced blob is never removed while the node runs).
    lost_at_load: Vec<u64>,
}

fn check_name(name: &OsStr) -> FsResult<&str> {
    if name.len() > wire::MAX_NAME_BYTES {
        return Err(FsError::NameTooLong);
    }
    let s = std::str::from_utf8(name.as_bytes()).map_err(|_| FsError::BadName)?;
    if s.is_empty() || s == "." || s == ".." || s.contains('/') || s.contains('\0') {
        return Err(FsError::Invalid);
    }
    Ok(s)
}

impl Tree {
    pub fn load(db: Db, store: ContentStore) -> anyhow::Result<Tree> {
        Self::load_with(db, store, Arc::new(SystemEnv))
    }

    /// [`Tree::load`] with the clock and ids of `env` (the simulator's).
    pub fn load_with(db: Db, store: ContentStore, env: Arc<dyn Env>) -> anyhow::Result<Tree> {
        let past_bug = env.past_bug();
        let mut inodes = HashMap::new();
        for row in db.inodes()? {
            let mut i = Inode::new(row.ino, Kind::from_code(row.kind), row.perm, row.uid, row.gid, 0);
            i.atime = row.atime;
            i.mtime = row.mtime;
            i.ctime = row.ctime;
            i.nlink = row.nlink;
            i.rdev = row.rdev;
            i.size = row.size;
            i.hash = row.hash.and_then(|h| h.parse().ok());
            i.target = row.target;
            inodes.insert(row.ino, i);
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = inodes.entry(ROOT) {
            let root = Inode::new(ROOT, Kind::Dir, 0o755, 0, 0, env.now_ns());
            db.save_inode(&root.row())?;
            slot.insert(root);
        }
        for (parent, name, ino) in db.dentries()? {
            if inodes.contains_key(&parent) && inodes.contains_key(&ino) {
                inodes.get_mut(&parent).expect("checked").children.insert(name.clone(), ino);
                inodes.get_mut(&ino).expect("checked").links.push((parent, name));
            }
        }
        // A committed file whose content is missing from the store, or whose blob has
        // the wrong size (a lost or damaged disk block, someone deleting files in the
        // data dir), keeps its version: reads fail with EIO (never empty or wrong bytes)
        // until the link pulls the content again (`damaged`). A file that never had
        // content (no hash: created, not yet closed, when the node died) is empty.
        let mut lost_at_load = Vec::new();
        for i in inodes.values_mut() {
            if i.kind != Kind::File {
                continue;
            }
            match &i.hash {
                None => {
                    i.hash = Some(ContentStore::empty_hash());
                    i.size = 0;
                }
                Some(h) => match std::fs::metadata(store.blob_path(h)) {
                    Ok(m) if m.len() == i.size => {}
                    // A node.db from before rows of files being written kept their
                    // committed size: an ftruncate then saved the new size with the old
                    // hash. The blob is right if it hashes to its name; the row is not.
                    Ok(m) if crate::store::hash_file(&store.blob_path(h)).is_ok_and(|(real, _)| real == *h) => {
                        tracing::warn!(ino = i.ino, "the node database gave {h} {} bytes; the store's copy is whole with {}: size corrected", i.size, m.len());
                        i.size = m.len();
                        db.save_inode(&i.row())?;
                    }
                    Ok(m) => {
                        tracing::warn!(ino = i.ino, "the store's copy of {h} has {} bytes, not {}: removed, it will be pulled again", m.len(), i.size);
                        let _ = std::fs::remove_file(store.blob_path(h));
                        lost_at_load.push(i.ino);
                    }
                    Err(_) => {
                        tracing::warn!(ino = i.ino, "content {h} is missing from the store: it will be pulled again");
                        lost_at_load.push(i.ino);
                    }
                },
            }
        }
        let next_ino = inodes.keys().max().copied().unwrap_or(ROOT) + 1;
        let revs = db.revs()?.into_iter().filter_map(|(p, r)| Some((RelPath::new(p).ok()?, Revision(r)))).collect();
        let mut outbox = Outbox::default();
        for row in db.outbox()? {
            *outbox.per_path.entry(row.change.path.clone()).or_default() += 1;
            outbox.sent.insert(row.msg.clone());
            outbox.rows.insert(row.seq, row);
        }
        let state = State {
            db,
            env,
            journal: None,
            inodes,
            next_ino,
            revs,
            outbox,
            handles: HashMap::new(),
            next_fh: 1,
            conflicts_seen: 0,
            backing_owner: HashMap::new(),
            passthrough_opens: 0,
            passthrough_detaches: 0,
        };
        let abandoned = if past_bug == Some(PastBug::AbandonedWork) { Vec::new() } else { store.abandoned_work().to_vec() };
        let tree = Tree { state: Mutex::new(state), store, outbox_ready: Arc::new(tokio::sync::Notify::new()), lost_at_load };
        // A file still open for writing when the node died keeps what was last committed
        // (or nothing), but what happened to it meanwhile was recorded, a rename over
        // another path above all, while its put waited for the last close that never
        // came: it is sent now, or the path would differ from the manager's for good.
        tree.atomically(|st, _| {
            for &ino in &abandoned {
                if st.inodes.get(&ino).is_some_and(|i| i.kind == Kind::File && i.nlink > 0) {
                    st.record_put_all_links(ino)?;
                }
            }
            Ok(())
        })
        .map_err(|e| anyhow::anyhow!("recording the files that were being written: {e}"))?;
        Ok(tree)
    }

    /// The clock and message ids this tree uses.
    pub fn env(&self) -> Arc<dyn Env> {
        self.lock().env.clone()
    }

    pub fn store(&self) -> &ContentStore {
        &self.store
    }

    /// Paths whose committed content is not in the store (see `load`), with the hash
    /// they need; the link pulls them again.
    pub fn damaged(&self) -> Vec<(RelPath, ContentHash)> {
        let st = self.lock();
        let mut out = Vec::new();
        for i in self.lost_at_load.iter().filter_map(|ino| st.inodes.get(ino)) {
            let Some(h) = i.hash.as_ref().filter(|h| i.kind == Kind::File && i.work.is_none() && !self.store.has(h)) else { continue };
            out.extend(i.links.iter().filter_map(|(parent, name)| st.path_of(*parent, name)).map(|p| (p, h.clone())));
        }
        out
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in one database transaction; wakes the broker link if the outbox grew.
    /// If anything fails, the commit included, the transaction is rolled back and what
    /// `f` changed in memory is undone (`Undo`): the tree stays what the database holds.
    /// On a full disk, room is made (`make_room`) and `f` runs once more.
    fn atomically<T>(&self, f: impl FnMut(&mut State, &ContentStore) -> FsResult<T>) -> FsResult<T> {
        self.atomically_locked(self.lock(), f)
    }

    fn atomically_locked<T>(&self, mut st: MutexGuard<'_, State>, mut f: impl FnMut(&mut State, &ContentStore) -> FsResult<T>) -> FsResult<T> {
        let before = st.outbox.rows.len();
        let mut result = self.transaction(&mut st, &mut f);
        // A full disk: once room is made, the operation is tried once more.
        if let Err(e @ (FsError::NoSpace | FsError::DbFull)) = &result {
            if self.make_room(&st, matches!(e, FsError::DbFull)) {
                result = self.transaction(&mut st, &mut f);
            }
        }
        let grew = st.outbox.rows.len() > before;
        drop(st);
        if grew {
            tracing::debug!(target: "timing", "outbox grew");
            self.outbox_ready.notify_one();
        }
        result
    }

    fn transaction<T>(&self, st: &mut State, f: &mut impl FnMut(&mut State, &ContentStore) -> FsResult<T>) -> FsResult<T> {
        st.db.begin()?;
        let counters = st.counters();
        st.journal = Some(Journal { undo: Vec::new(), saved: HashSet::new(), counters, discard_after_commit: Vec::new(), detached: HashSet::new() });
        let result = f(st, &self.store).and_then(|v| {
            st.db.commit()?;
            Ok(v)
        });
        let journal = st.journal.take().expect("set above");
        match result {
            Ok(v) => {
                for ino in journal.discard_after_commit {
                    self.store.discard_work_file(ino);
                }
                Ok(v)
            }
            Err(e) => {
                // Also after a failed COMMIT: SQLite may leave that transaction open.
                st.db.rollback();
                st.undo(journal, &self.store);
                Err(e)
            }
        }
    }

    /// Makes room on a full disk: removes the blobs nothing refers to any more (a file
    /// deleted a moment ago frees its space now, not at the next `gc`) and, when that
    /// freed nothing and the node database needs room (`for_db`), gives it the space
    /// kept in reserve for it (`ContentStore::release_reserve`). Returns whether
    /// anything was freed.
    fn make_room(&self, st: &State, for_db: bool) -> bool {
        // A blob downloaded and not yet applied may go too; it is pulled again.
        let removed = self.store.gc(&Self::referenced(st), std::time::Duration::ZERO);
        if removed > 0 {
            tracing::info!("the disk is full: removed {removed} blobs nothing refers to");
            return true;
        }
        if for_db && self.store.release_reserve() {
            tracing::warn!("the disk is full: the node database now uses the space kept in reserve for it; free some space");
            return true;
        }
        false
    }

    // ---- FUSE operations -------------------------------------------------------------

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let mut st = self.lock();
        let ino = st.child(parent, name)?;
        let i = st.inode_mut(ino)?;
        i.lookups += 1;
        Ok(i.attr())
    }

    pub fn forget(&self, ino: u64, n: u64) {
        let mut st = self.lock();
        if let Some(i) = st.inodes.get_mut(&ino) {
            i.lookups = i.lookups.saturating_sub(n);
        }
        st.maybe_drop(ino, &self.store);
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let mut st = self.lock();
        let i = st.inode_mut(ino)?;
        i.take_passthrough_writes()?;
        Ok(i.attr())
    }

    pub fn setattr(&self, ino: u64, _req_uid: u32, a: SetAttr) -> FsResult<Attr> {
        self.atomically(|st, store| {
            let now = st.env.now_ns();
            let i = st.inode_mut(ino)?;
            // Start from what passthrough writes made of the file, not from older values.
            i.take_passthrough_writes()?;
            if let Some(mode) = a.mode {
                i.perm = mode & 0o7777;
            }
            if a.uid.is_some() || a.gid.is_some() {
                if let Some(u) = a.uid {
                    i.uid = u;
                }
                if let Some(g) = a.gid {
                    i.gid = g;
                }
                // Set-id bits are cleared by the kernel: without FUSE_HANDLE_KILLPRIV it
                // sends the new mode with the chown (and with writes), so the rule is
                // exactly the kernel's.
            }
            if let Some(size) = a.size {
                match i.kind {
                    Kind::File => {}
                    Kind::Dir => return Err(FsError::IsDir),
                    _ => return Err(FsError::Invalid),
                }
                let work = st.ensure_work(ino, size != 0, store)?;
                work.set_len(size)?;
                let i = st.inode_mut(ino)?;
                i.size = size;
                i.mtime = now;
            }
            let i = st.inode_mut(ino)?;
            if let Some(t) = a.atime {
                i.atime = match t {
                    SetTime::Now => now,
                    SetTime::At(t) => t,
                };
            }
            if let Some(t) = a.mtime {
                i.mtime = match t {
                    SetTime::Now => now,
                    SetTime::At(t) => t,
                };
            }
            i.ctime = now;
            i.give_mtime_to_work()?;
            let (writers, dirty) = (i.writers, i.work.is_some());
            if dirty && writers == 0 {
                // truncate(2) with no descriptor open: committed at once.
                st.commit_work(ino, store)?;
            } else if dirty {
                // Sent with the content when the writer closes the file.
                st.save(ino)?;
            } else {
                st.save(ino)?;
                st.record_put_all_links(ino)?;
            }
            Ok(st.inode(ino)?.attr())
        })
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let st = self.lock();
        let i = st.inode(ino)?;
        i.target.clone().ok_or(FsError::Invalid)
    }

    /// mkdir, mknod and symlink share this.
    #[allow(clippy::too_many_arguments)]
    fn make(&self, parent: u64, name: &OsStr, kind: Kind, perm: u32, uid: u32, gid: u32, rdev: u32, target: Option<Vec<u8>>) -> FsResult<Attr> {
        check_name(name)?;
        self.atomically(|st, store| {
            let ino = st.make(parent, name, kind, perm, uid, gid, rdev, target.clone(), store)?;
            if kind == Kind::File {
                // mknod(S_IFREG) makes an empty file with no open handle: committed now.
                st.commit_work(ino, store)?;
            }
            Ok(st.inode(ino)?.attr())
        })
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, uid: u32, gid: u32) -> FsResult<Attr> {
        self.make(parent, name, Kind::Dir, mode, uid, gid, 0, None)
    }

    pub fn mknod(&self, parent: u64, name: &OsStr, mode: u32, rdev: u32, uid: u32, gid: u32) -> FsResult<Attr> {
        let kind = Kind::from_mode(mode)?;
        if kind == Kind::Dir || kind == Kind::Symlink {
            return Err(FsError::Invalid);
        }
        self.make(parent, name, kind, mode, uid, gid, rdev, None)
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &[u8], uid: u32, gid: u32) -> FsResult<Attr> {
        if target.len() > wire::MAX_PATH_BYTES {
            return Err(FsError::NameTooLong);
        }
        self.make(parent, name, Kind::Symlink, 0o777, uid, gid, 0, Some(target.to_vec()))
    }

    pub fn create(&self, parent: u64, name: &OsStr, mode: u32, uid: u32, gid: u32, write: bool) -> FsResult<(Attr, u64)> {
        check_name(name)?;
        // One step: a file with no writer and uncommitted content is one whose commit
        // failed (`gc` tries again), never one being created.
        self.atomically(|st, store| {
            let ino = st.make(parent, name, Kind::File, mode, uid, gid, 0, None, store)?;
            // A new inode has no blob to pass through to.
            let (fh, _) = st.open_handle(ino, write, false, false, store)?;
            Ok((st.inode(ino)?.attr(), fh))
        })
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.atomically(|st, store| {
            let ino = st.child(parent, name)?;
            if st.inode(ino)?.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            st.remove_entry(parent, name, true, store)
        })
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.atomically(|st, store| {
            let ino = st.child(parent, name)?;
            let i = st.inode(ino)?;
            if i.kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
            if !i.children.is_empty() {
                return Err(FsError::NotEmpty);
            }
            st.remove_entry(parent, name, true, store)
        })
    }

    pub fn rename(&self, parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, noreplace: bool) -> FsResult<()> {
        check_name(newname)?;
        self.atomically(|st, store| {
            let ino = st.child(parent, name)?;
            if st.inode(newparent)?.kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
            let moving_dir = st.inode(ino)?.kind == Kind::Dir;
            if moving_dir && (newparent == ino || st.is_ancestor(ino, newparent)) {
                return Err(FsError::Invalid);
            }
            if let Some(&target) = st.inode(newparent)?.children.get(newname) {
                if target == ino {
                    return Ok(());
                }
                if noreplace {
                    return Err(FsError::Exists);
                }
                let t = st.inode(target)?;
                match (moving_dir, t.kind == Kind::Dir) {
                    (true, false) => return Err(FsError::NotDir),
                    (false, true) => return Err(FsError::IsDir),
                    (true, true) if !t.children.is_empty() => return Err(FsError::NotEmpty),
                    _ => {}
                }
                // The replaced entry is overwritten, not deleted: its path gets a put.
                st.remove_entry(newparent, newname, false, store)?;
            }
            // Old paths are deleted (deepest first) after the new ones are put (outermost
            // first), so the manager never sees a child without its parent.
            let old_paths = st.subtree_paths(parent, name);
            st.unlink_from(parent, name)?;
            st.link_into(newparent, newname, ino)?;
            {
                let now = st.env.now_ns();
                let i = st.inode_mut(ino)?;
                i.links.retain(|(p, n)| !(*p == parent && n == name));
                i.links.push((newparent, newname.to_owned()));
                i.ctime = now;
            }
            st.save(ino)?;
            st.record_put_subtree(newparent, newname)?;
            for (path, kind_synced) in old_paths.into_iter().rev() {
                if kind_synced {
                    st.record_delete(path)?;
                }
            }
            Ok(())
        })
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Attr> {
        check_name(newname)?;
        self.atomically(|st, _| {
            let i = st.inode(ino)?;
            if i.kind == Kind::Dir {
                return Err(FsError::NotPermitted);
            }
            if i.nlink >= 65000 {
                return Err(FsError::TooManyLinks);
            }
            if st.inode(newparent)?.kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
            if st.inode(newparent)?.children.contains_key(newname) {
                return Err(FsError::Exists);
            }
            st.link_into(newparent, newname, ino)?;
            let now = st.env.now_ns();
            let i = st.inode_mut(ino)?;
            i.links.push((newparent, newname.to_owned()));
            i.nlink += 1;
            i.ctime = now;
            i.lookups += 1;
            let kind = i.kind;
            let dirty = i.work.is_some();
            st.save(ino)?;
            if kind.synced() && !dirty {
                st.record_put(newparent, newname, ino)?;
            }
            Ok(st.inode(ino)?.attr())
        })
    }

    pub fn open(&self, ino: u64, write: bool, truncate: bool, passthrough: bool) -> FsResult<(u64, OpenIo)> {
        let kind = self.lock().inode(ino)?.kind;
        match kind {
            Kind::Dir if write => return Err(FsError::IsDir),
            Kind::File | Kind::Dir => {}
            _ => return Err(FsError::NotSupported),
        }
        self.open_handle(ino, write, truncate, passthrough)
    }

    /// Opens a handle; `passthrough` says whether the kernel can do passthrough I/O.
    fn open_handle(&self, ino: u64, write: bool, truncate: bool, passthrough: bool) -> FsResult<(u64, OpenIo)> {
        self.atomically(|st, store| st.open_handle(ino, write, truncate, passthrough, store))
    }

    /// The kernel would not take the backing file `open` offered for handle `fh` (no
    /// passthrough support after all): the handle becomes a cached one.
    pub fn passthrough_refused(&self, fh: u64) {
        let mut st = self.lock();
        let Some(h) = st.handles.get_mut(&fh) else {
            return;
        };
        if !std::mem::replace(&mut h.passthrough, false) {
            return;
        }
        let ino = h.ino;
        st.passthrough_opens = st.passthrough_opens.saturating_sub(1);
        st.end_passthrough_handle(ino);
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let file = {
            let mut st = self.lock();
            let ino = st.handles.get(&fh).ok_or(FsError::BadHandle)?.ino;
            let now = st.env.now_ns();
            let i = st.inode_mut(ino)?;
            i.atime = now;
            match (&i.work, &i.blob) {
                (Some(w), _) => w.clone(),
                (None, Some(b)) => b.clone(),
                (None, None) => {
                    let h = i.hash.clone().ok_or(FsError::Invalid)?;
                    let b = Arc::new(self.store.open_blob(&h).map_err(|e| FsError::Io(anyhow::Error::new(e).context(format!("opening blob {h}"))))?);
                    i.blob = Some(b.clone());
                    b
                }
            }
        };
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = file.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// Writes through handle `fh` into the inode's work file. The write happens under the
    /// tree lock so that a commit (another descriptor's close) never hashes and installs
    /// a work file while a write into it is still landing: blobs stay true to their hash.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let mut st = self.lock();
        let h = st.handles.get(&fh).ok_or(FsError::BadHandle)?;
        if !h.write {
            return Err(FsError::BadHandle);
        }
        let ino = h.ino;
        let mut written = self.write_at(&mut st, ino, offset, data);
        if matches!(written, Err(FsError::NoSpace)) && self.make_room(&st, false) {
            written = self.write_at(&mut st, ino, offset, data);
        }
        written?;
        let now = st.env.now_ns();
        let i = st.inode_mut(ino)?;
        i.size = i.size.max(offset + data.len() as u64);
        i.mtime = now;
        i.ctime = i.mtime;
        Ok(data.len() as u32)
    }

    /// Writes into the work file of `ino`. A write that fails leaves the file no longer
    /// than before (on a full disk, part of it may have landed past the end).
    fn write_at(&self, st: &mut State, ino: u64, offset: u64, data: &[u8]) -> FsResult<()> {
        let work = st.ensure_work(ino, true, &self.store)?;
        let size = st.inode(ino)?.size;
        let written = work.write_all_at(data, offset);
        if written.is_err() && offset + data.len() as u64 > size && !st.inode(ino)?.detached {
            let _ = work.set_len(size);
        }
        Ok(written?)
    }

    /// close(2) of one descriptor: commit what was written through it.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        self.atomically(|st, store| {
            let Some(h) = st.handles.get(&fh) else {
                return Ok(());
            };
            let (ino, write) = (h.ino, h.write);
            if write && st.inode(ino)?.work.is_some() {
                st.commit_work(ino, store)?;
            }
            Ok(())
        })
    }

    /// Makes the file's current content and metadata durable: commits pending writes,
    /// then flushes the committed blob (or a work file another handle still writes) and
    /// the node database to disk. The disk flushes run outside the tree lock.
    pub fn fsync(&self, fh: u64) -> FsResult<()> {
        self.flush(fh)?;
        let (work, hash) = {
            let st = self.lock();
            let ino = st.handles.get(&fh).ok_or(FsError::BadHandle)?.ino;
            let i = st.inode(ino)?;
            (i.work.as_ref().map(|w| w.try_clone()).transpose()?, i.hash.clone())
        };
        // A work file is still being written (by another handle, or by passthrough
        // writers, whose file stays after its snapshot was committed): flush it too.
        if let Some(w) = work {
            w.sync_data()?;
        }
        if let Some(h) = hash {
            self.store.sync_blob(&h)?;
        }
        self.lock().db.sync()?;
        Ok(())
    }

    pub fn release(&self, fh: u64) -> FsResult<Released> {
        // The kernel forgets the handle whatever the answer, so forgetting it here is
        // done before, and apart from, the transaction: a failed commit never undoes it.
        let mut st = self.lock();
        let h = st.handles.remove(&fh).ok_or(FsError::BadHandle)?;
        let i = st.inode_mut(h.ino)?;
        i.open = i.open.saturating_sub(1);
        if h.write {
            i.writers = i.writers.saturating_sub(1);
        }
        let backing_unused = h.passthrough && st.end_passthrough_handle(h.ino);
        let ino = h.ino;
        let committed = self.atomically_locked(st, |st, store| {
            let i = st.inode(ino)?;
            // The last writer closed: commit (a removed file has nothing to commit).
            if i.writers == 0 && i.work.is_some() && i.nlink > 0 {
                st.commit_work(ino, store)?;
            }
            st.maybe_drop(ino, store);
            Ok(())
        });
        if let Err(e) = committed {
            // The close (flush) that came first has told the writer. The bytes stay in
            // the work file, and `gc` tries the commit again.
            tracing::warn!(ino, "the last writer closed, but its content could not be committed: {e}; it is tried again later");
        }
        Ok(Released { ino, backing_unused })
    }

    /// Directory listing from `offset`: (ino, next offset, kind, name).
    pub fn readdir(&self, ino: u64, offset: u64) -> FsResult<Vec<(u64, u64, Kind, OsString)>> {
        let st = self.lock();
        let d = st.inode(ino)?;
        if d.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let parent = d.links.first().map(|(p, _)| *p).unwrap_or(ROOT);
        let mut all = vec![(ino, Kind::Dir, OsString::from(".")), (parent, Kind::Dir, OsString::from(".."))];
        for (name, &c) in &d.children {
            let kind = st.inodes.get(&c).map(|i| i.kind).unwrap_or(Kind::File);
            all.push((c, kind, name.clone()));
        }
        Ok(all.into_iter().enumerate().skip(offset as usize).map(|(n, (i, k, name))| (i, n as u64 + 1, k, name)).collect())
    }

    pub fn stats(&self) -> TreeStats {
        let st = self.lock();
        let mut s = TreeStats {
            pending_changes: st.outbox.rows.len() as u64,
            conflicts_seen: st.conflicts_seen,
            last_revision: st.revs.values().map(|r| r.0).max().unwrap_or(0),
            passthrough_opens: st.passthrough_opens,
            passthrough_detaches: st.passthrough_detaches,
            ..Default::default()
        };
        for i in st.inodes.values() {
            if i.nlink == 0 {
                continue;
            }
            match i.kind {
                Kind::Dir => s.dirs += 1,
                _ => s.files += 1,
            }
        }
        s
    }

    // ---- broker side -------------------------------------------------------------------

    /// Outbox rows not yet handed to the broker link in this session, in order; marks
    /// them handed over.
    pub fn take_unpublished(&self) -> Vec<OutboxRow> {
        let mut st = self.lock();
        let from = st.outbox.published_upto;
        let rows: Vec<OutboxRow> = st.outbox.rows.range(from + 1..).map(|(_, r)| r.clone()).collect();
        if let Some(last) = rows.last() {
            st.outbox.published_upto = last.seq;
        }
        for r in &rows {
            st.outbox.sent.insert(r.msg.clone());
        }
        rows
    }

    /// The head of the last sync that completed on this node, kept in `node.db` across
    /// restarts (`link::Session::sync_since`).
    pub fn synced_head(&self) -> Option<u64> {
        self.lock().db.meta(SYNCED_HEAD_KEY).ok().flatten().and_then(|v| v.parse().ok())
    }
    pub fn set_synced_head(&self, head: u64) -> FsResult<()> {
        self.lock().db.set_meta(SYNCED_HEAD_KEY, &head.to_string()).map_err(|e| FsError::Io(anyhow::Error::new(e).context("recording the synced head")))
    }

    /// After a reconnection every undecided row is sent again (the manager recognises
    /// the ids it already decided).
    pub fn republish_all(&self) {
        self.lock().outbox.published_upto = 0;
    }

    /// The manager's revision of `path` this node last took (0: none).
    pub fn revision_of(&self, path: &RelPath) -> Revision {
        self.lock().revs.get(path).copied().unwrap_or_default()
    }

    pub fn pending_changes(&self) -> u64 {
        self.lock().outbox.rows.len() as u64
    }

    /// The manager decided one of our changes: forget it and take the path's current
    /// state, in one step. (Two steps would let a change made in between be based on the
    /// revision from before the decision, and conflict with our own earlier change.)
    pub fn apply_decided(&self, msg: &MessageId, outcome: &Outcome, current: &Entry) -> FsResult<Applied> {
        tracing::debug!(target: "changes", %msg, ?outcome, path = %current.path, rev = current.rev.0, version = ?current.version, "decision received");
        self.atomically(|st, store| {
            let seq = st.outbox.rows.iter().find(|(_, r)| &r.msg == msg).map(|(s, _)| *s);
            let mut decided = false;
            if let Some(seq) = seq {
                let row = st.set_outbox_row(seq, None).expect("found");
                st.db.remove_outbox(msg)?;
                st.count_change(&row.change.path, -1);
                let was_sent = st.outbox.sent.remove(msg);
                st.record(|| Undo::Sent(msg.clone(), was_sent));
                if matches!(outcome, Outcome::Conflict { .. }) {
                    st.conflicts_seen += 1;
                }
                // The path changed again on top of the version just decided (it is
                // being written, or has later changes queued): `apply_remote` leaves
                // it alone, but its next change must be based on the revision this one
                // got. Otherwise a later change that no longer follows a queued one
                // (that one was decided, or coalesced away before it was sent) goes
                // out with an older base and looks like an edit of a stale version: a
                // conflict, or, for the same bytes, a lost chmod.
                let kept = matches!(outcome, Outcome::Accepted | Outcome::Unchanged);
                let changed_again = st.is_dirty(&current.path) || st.outbox.per_path.contains_key(&current.path);
                if kept && current.path == row.change.path && changed_again && st.env.past_bug() != Some(PastBug::DecidedBase) {
                    st.set_rev(&current.path, current.rev)?;
                }
                decided = current.path == row.change.path;
            }
            st.apply_entry(current, store, decided)
        })
    }

    /// Whether applying `entry` needs content that is not in the store.
    pub fn needs_content(&self, entry: &Entry) -> Option<ContentHash> {
        match &entry.version {
            Some(Version { content: Content::File { hash, .. }, .. }) if !self.store.has(hash) => Some(hash.clone()),
            _ => None,
        }
    }

    /// Applies the manager's state of one path, unless the path has undecided local
    /// changes or the entry is older than what this node has.
    pub fn apply_remote(&self, entry: &Entry) -> FsResult<Applied> {
        self.atomically(|st, store| st.apply_remote(entry, store))
    }

    /// Paths this node has (synced kinds) that are not in `known`, with no pending change:
    /// they are sent to the manager as new. Returns how many.
    pub fn push_unknown(&self, known: &HashSet<RelPath>) -> FsResult<usize> {
        self.atomically(|st, _| {
            let mut all = Vec::new();
            st.collect_paths(ROOT, None, &mut all);
            let mut n = 0;
            for (path, parent, name, ino) in all {
                if known.contains(&path) || st.outbox.per_path.contains_key(&path) {
                    continue;
                }
                let i = st.inode(ino)?;
                if !i.kind.synced() || i.work.is_some() {
                    continue;
                }
                st.record_put(parent, &name, ino)?;
                n += 1;
            }
            Ok(n)
        })
    }

    /// Removes blobs nothing refers to, after trying again the commits that failed when
    /// a file's last writer closed and setting aside the node database's reserve again
    /// if it was used (`ContentStore::ensure_reserve`). Runs under the tree lock so that
    /// a commit cannot add a reference between the scan and the removal.
    pub fn gc(&self) -> usize {
        self.commit_unsaved();
        self.store.ensure_reserve();
        let st = self.lock();
        let keep = Self::referenced(&st);
        self.store.gc(&keep, std::time::Duration::from_secs(300))
    }

    /// Commits the files whose last writer closed while their content could not be
    /// committed (a full disk, a failing database: see `release`).
    fn commit_unsaved(&self) {
        let unsaved = |i: &Inode| i.work.is_some() && i.writers == 0 && i.nlink > 0;
        let inos: Vec<u64> = self.lock().inodes.values().filter(|i| unsaved(i)).map(|i| i.ino).collect();
        for ino in inos {
            let committed = self.atomically(|st, store| match st.inodes.get(&ino) {
                Some(i) if unsaved(i) => st.commit_work(ino, store),
                _ => Ok(()),
            });
            match committed {
                Ok(()) => tracing::info!(ino, "committed the content a closed file had left unsaved"),
                Err(e) => tracing::warn!(ino, "the content of a closed file still cannot be committed: {e}"),
            }
        }
    }

    fn referenced(st: &State) -> HashSet<ContentHash> {
        // A removed file still known to the kernel (it has not sent FORGET yet) but open
        // nowhere can never be read again: its content is not kept for it.
        let mut keep: HashSet<ContentHash> = st.inodes.values().filter(|i| i.nlink > 0 || i.open > 0).filter_map(|i| i.hash.clone()).collect();
        for r in st.outbox.rows.values() {
            if let ChangeOp::Put { version: Version { content: Content::File { hash, .. }, .. } } = &r.change.op {
                keep.insert(hash.clone());
            }
        }
        keep
    }

    /// Inodes in use, for statfs.
    pub fn statfs_files(&self) -> u64 {
        self.lock().inodes.len() as u64
    }
}

impl State {
    fn inode(&self, ino: u64) -> FsResult<&Inode> {
        self.inodes.get(&ino).ok_or(FsError::NotFound)
    }
    /// The inode, to change: inside a transaction its fields are saved first (`Undo`).
    fn inode_mut(&mut self, ino: u64) -> FsResult<&mut Inode> {
        if let Some(j) = &mut self.journal {
            if let Some(i) = self.inodes.get(&ino) {
                if j.saved.insert(ino) {
                    j.undo.push(Undo::Inode(ino, Some(i.fields())));
                }
            }
        }
        self.inodes.get_mut(&ino).ok_or(FsError::NotFound)
    }

    /// Adds an inode the transaction made.
    fn add_inode(&mut self, i: Inode) {
        let ino = i.ino;
        if let Some(j) = &mut self.journal {
            j.saved.insert(ino);
            j.undo.push(Undo::Inode(ino, None));
        }
        self.inodes.insert(ino, i);
    }

    /// Records how to undo a change, inside a transaction.
    fn record(&mut self, u: impl FnOnce() -> Undo) {
        if let Some(j) = &mut self.journal {
            j.undo.push(u());
        }
    }

    fn counters(&self) -> Counters {
        Counters {
            next_ino: self.next_ino,
            next_fh: self.next_fh,
            conflicts_seen: self.conflicts_seen,
            passthrough_opens: self.passthrough_opens,
            passthrough_detaches: self.passthrough_detaches,
        }
    }

    /// Undoes in memory what a failed transaction did (see `Undo`).
    fn undo(&mut self, j: Journal, store: &ContentStore) {
        let detached = j.detached;
        for u in j.undo.into_iter().rev() {
            match u {
                Undo::Inode(ino, None) => {
                    self.inodes.remove(&ino);
                    store.discard_work_file(ino);
                }
                Undo::Inode(ino, Some(mut before)) => match self.inodes.get_mut(&ino) {
                    Some(now) => {
                        if before.work.is_none() && detached.contains(&ino) {
                            // The backing file the transaction detached from the store
                            // stays this inode's work file: the kernel's readers read it,
                            // and it may have changed already. It is committed like any
                            // other (at the next close, or by `gc`).
                            let reopened = || store.detach_for_work(&before.passthrough.as_ref()?.backing, None, system_time(before.mtime)).ok().map(Arc::new);
                            match now.work.clone().or_else(reopened) {
                                Some(w) => {
                                    before.committed = Some(before.current());
                                    before.work = Some(w);
                                    before.detached = true;
                                }
                                None => tracing::error!(ino, "a passthrough backing file changed by a failed operation could not be reopened"),
                            }
                        } else if before.work.is_none() {
                            // A work file the transaction made goes, also one it
                            // committed and `Installed` gave back.
                            store.discard_work_file(ino);
                        }
                        let children = std::mem::take(&mut now.children);
                        *now = before;
                        now.children = children;
                    }
                    None => {
                        self.inodes.insert(ino, before);
                    }
                },
                Undo::Child { parent, name, old } => {
                    if let Some(p) = self.inodes.get_mut(&parent) {
                        match old {
                            Some(ino) => p.children.insert(name, ino),
                            None => p.children.remove(&name),
                        };
                    }
                }
                Undo::Rev(path, old) => {
                    match old {
                        Some(r) => self.revs.insert(path, r),
                        None => self.revs.remove(&path),
                    };
                }
                Undo::Outbox(seq, old) => {
                    match old {
                        Some(row) => self.outbox.rows.insert(seq, row),
                        None => self.outbox.rows.remove(&seq),
                    };
                }
                Undo::PerPath(path, old) => {
                    match old {
                        Some(n) => self.outbox.per_path.insert(path, n),
                        None => self.outbox.per_path.remove(&path),
                    };
                }
                Undo::Sent(msg, was) => {
                    if was {
                        self.outbox.sent.insert(msg);
                    } else {
                        self.outbox.sent.remove(&msg);
                    }
                }
                Undo::Handle(fh, old) => {
                    match old {
                        Some(h) => self.handles.insert(fh, h),
                        None => self.handles.remove(&fh),
                    };
                }
                Undo::BackingOwner(key, old) => {
                    match old {
                        Some(ino) => self.backing_owner.insert(key, ino),
                        None => self.backing_owner.remove(&key),
                    };
                }
                Undo::Installed(ino, hash) => {
                    if let Err(e) = store.uncommit_work_file(ino, &hash) {
                        tracing::error!(ino, "giving back the work file committed as {hash}: {e}");
                    }
                }
            }
        }
        let c = j.counters;
        self.next_ino = c.next_ino;
        self.next_fh = c.next_fh;
        self.conflicts_seen = c.conflicts_seen;
        self.passthrough_opens = c.passthrough_opens;
        self.passthrough_detaches = c.passthrough_detaches;
    }

    fn set_child(&mut self, parent: u64, name: &OsStr, ino: Option<u64>) -> FsResult<()> {
        let p = self.inode_mut(parent)?;
        let old = match ino {
            Some(ino) => p.children.insert(name.to_owned(), ino),
            None => p.children.remove(name),
        };
        self.record(|| Undo::Child { parent, name: name.to_owned(), old });
        Ok(())
    }

    fn set_outbox_row(&mut self, seq: i64, row: Option<OutboxRow>) -> Option<OutboxRow> {
        let old = match row {
            Some(r) => self.outbox.rows.insert(seq, r),
            None => self.outbox.rows.remove(&seq),
        };
        self.record(|| Undo::Outbox(seq, old.clone()));
        old
    }

    /// Adds `delta` to the count of undecided changes of `path`.
    fn count_change(&mut self, path: &RelPath, delta: isize) {
        let old = self.outbox.per_path.get(path).copied();
        self.record(|| Undo::PerPath(path.clone(), old));
        match old.unwrap_or(0).saturating_add_signed(delta) {
            0 => self.outbox.per_path.remove(path),
            n => self.outbox.per_path.insert(path.clone(), n),
        };
    }

    fn set_backing_owner(&mut self, key: (u64, u64), owner: Option<u64>) {
        let old = match owner {
            Some(ino) => self.backing_owner.insert(key, ino),
            None => self.backing_owner.remove(&key),
        };
        self.record(|| Undo::BackingOwner(key, old));
    }
    fn child(&self, parent: u64, name: &OsStr) -> FsResult<u64> {
        let p = self.inode(parent)?;
        if p.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if name.len() > wire::MAX_NAME_BYTES {
            return Err(FsError::NameTooLong);
        }
        p.children.get(name).copied().ok_or(FsError::NotFound)
    }
    fn save(&self, ino: u64) -> FsResult<()> {
        let i = self.inode(ino)?;
        if i.nlink > 0 {
            self.db.save_inode(&i.row())?;
        }
        Ok(())
    }
    fn is_ancestor(&self, anc: u64, mut ino: u64) -> bool {
        while ino != ROOT {
            match self.inodes.get(&ino).and_then(|i| i.links.first()) {
                Some((p, _)) if *p == anc => return true,
                Some((p, _)) => ino = *p,
                None => return false,
            }
        }
        false
    }

    /// The synced path of entry `name` in directory `parent`, if every component is a
    /// valid path (non-UTF-8 names are refused at creation, so this is the normal case).
    fn path_of(&self, parent: u64, name: &OsStr) -> Option<RelPath> {
        let mut parts: Vec<&OsStr> = vec![name];
        let mut ino = parent;
        while ino != ROOT {
            let (p, n) = self.inodes.get(&ino)?.links.first()?;
            parts.push(n);
            ino = *p;
        }
        let mut s = String::new();
        for part in parts.iter().rev() {
            if !s.is_empty() {
                s.push('/');
            }
            s.push_str(part.to_str()?);
        }
        RelPath::new(s).ok()
    }

    fn resolve(&self, path: &RelPath) -> Option<(u64, OsString, u64)> {
        let mut dir = ROOT;
        let mut comps = path.as_str().split('/').peekable();
        while let Some(c) = comps.next() {
            let ino = *self.inodes.get(&dir)?.children.get(OsStr::new(c))?;
            if comps.peek().is_none() {
                return Some((dir, OsString::from(c), ino));
            }
            dir = ino;
        }
        None
    }

    fn link_into(&mut self, parent: u64, name: &OsStr, ino: u64) -> FsResult<()> {
        let now = self.env.now_ns();
        let is_dir = self.inode(ino)?.kind == Kind::Dir;
        self.set_child(parent, name, Some(ino))?;
        let p = self.inode_mut(parent)?;
        p.mtime = now;
        p.ctime = now;
        if is_dir {
            p.nlink += 1;
        }
        self.save(parent)?;
        self.db.save_dentry(parent, name, ino)?;
        Ok(())
    }

    fn unlink_from(&mut self, parent: u64, name: &OsStr) -> FsResult<()> {
        let now = self.env.now_ns();
        let ino = self.child(parent, name)?;
        let is_dir = self.inode(ino)?.kind == Kind::Dir;
        self.set_child(parent, name, None)?;
        let p = self.inode_mut(parent)?;
        p.mtime = now;
        p.ctime = now;
        if is_dir {
            p.nlink = p.nlink.saturating_sub(1);
        }
        self.save(parent)?;
        self.db.delete_dentry(parent, name)?;
        Ok(())
    }

    /// Removes one directory entry (the caller checked emptiness); `send` records a delete.
    fn remove_entry(&mut self, parent: u64, name: &OsStr, send: bool, store: &ContentStore) -> FsResult<()> {
        let ino = self.child(parent, name)?;
        let path = self.path_of(parent, name);
        self.unlink_from(parent, name)?;
        let now = self.env.now_ns();
        let i = self.inode_mut(ino)?;
        i.links.retain(|(p, n)| !(*p == parent && n == name));
        i.nlink = if i.kind == Kind::Dir { 0 } else { i.nlink.saturating_sub(1) };
        i.ctime = now;
        let (kind, gone) = (i.kind, i.nlink == 0);
        if gone {
            self.db.delete_inode(ino)?;
        } else {
            self.save(ino)?;
        }
        if send && kind.synced() {
            if let Some(path) = path {
                self.record_delete(path)?;
            }
        }
        self.maybe_drop(ino, store);
        Ok(())
    }

    /// Forgets an inode the kernel and every handle are done with.
    fn maybe_drop(&mut self, ino: u64, store: &ContentStore) {
        if ino == ROOT {
            return;
        }
        let Some(i) = self.inodes.get(&ino) else {
            return;
        };
        if i.nlink != 0 || i.lookups != 0 || i.open != 0 {
            return;
        }
        let i = self.inodes.remove(&ino).expect("checked");
        if i.work.is_some() {
            self.discard_work_file(ino, store);
        }
        if let Some(j) = &mut self.journal {
            j.saved.insert(ino);
            j.undo.push(Undo::Inode(ino, Some(i)));
        }
    }

    /// Removes the work file of `ino`; inside a transaction, once it is committed.
    fn discard_work_file(&mut self, ino: u64, store: &ContentStore) {
        match &mut self.journal {
            Some(j) => j.discard_after_commit.push(ino),
            None => store.discard_work_file(ino),
        }
    }

    /// (path, synced kind) of an entry and everything below it, outermost first.
    fn subtree_paths(&self, parent: u64, name: &OsStr) -> Vec<(RelPath, bool)> {
        let mut out = Vec::new();
        let Ok(ino) = self.child(parent, name) else {
            return out;
        };
        let Some(path) = self.path_of(parent, name) else {
            return out;
        };
        let synced = self.inodes.get(&ino).map(|i| i.kind.synced()).unwrap_or(false);
        out.push((path, synced));
        let mut all = Vec::new();
        self.collect_paths(ino, None, &mut all);
        for (p, _, _, i) in all {
            out.push((p, self.inodes.get(&i).map(|i| i.kind.synced()).unwrap_or(false)));
        }
        out
    }

    /// Every entry below directory `dir` as (path, parent, name, ino), outermost first.
    fn collect_paths(&self, dir: u64, _prefix: Option<&RelPath>, out: &mut Vec<(RelPath, u64, OsString, u64)>) {
        let Some(d) = self.inodes.get(&dir) else {
            return;
        };
        for (name, &ino) in &d.children {
            if let Some(p) = self.path_of(dir, name) {
                out.push((p, dir, name.clone(), ino));
            }
            if self.inodes.get(&ino).map(|i| i.kind == Kind::Dir).unwrap_or(false) {
                self.collect_paths(ino, None, out);
            }
        }
    }

    // ---- outbox ----------------------------------------------------------------------

    fn push_change(&mut self, path: RelPath, op: ChangeOp) -> FsResult<()> {
        // Coalesce with a change to the same path that never left this process: the
        // manager only needs the latest state.
        let unsent = self
            .outbox
            .rows
            .iter()
            .rev()
            .find(|(s, r)| r.change.path == path && **s > self.outbox.published_upto && !self.outbox.sent.contains(&r.msg))
            .map(|(s, r)| (*s, matches!(r.change.op, ChangeOp::Put { .. })));
        let base = self.revs.get(&path).copied().unwrap_or(Revision::NONE);
        if let Some((seq, true)) = unsent {
            if matches!(op, ChangeOp::Put { .. }) {
                // A put replacing a put keeps its place in the queue: puts of its
                // parents are before it, puts of its children after it. (Appended at
                // the end, a directory's put would follow its children's, and the
                // manager would have made the directory itself, with a default mode.)
                let follows = self.outbox.rows.range(..seq).rev().find(|(_, r)| r.change.path == path).map(|(_, r)| r.msg.clone());
                let mut row = self.outbox.rows.get(&seq).expect("found").clone();
                row.change = Change { path, base, follows, op };
                tracing::debug!(target: "changes", msg = %row.msg, path = %row.change.path, base = base.0, follows = ?row.change.follows, op = ?row.change.op, "replaced in the queue");
                self.db.replace_outbox(seq, &row.change)?;
                self.set_outbox_row(seq, Some(row));
                return Ok(());
            }
        }
        if let Some((seq, _)) = unsent {
            // Anything else goes to the end, where the order of deletes (children
            // first) and of a put after a delete is kept.
            let row = self.set_outbox_row(seq, None).expect("found");
            tracing::debug!(target: "changes", msg = %row.msg, path = %row.change.path, "coalesced with a newer change");
            self.db.remove_outbox(&row.msg)?;
            self.count_change(&path, -1);
        }
        let follows = self.outbox.rows.values().rev().find(|r| r.change.path == path).map(|r| r.msg.clone());
        let msg = self.env.new_id();
        let change = Change { path: path.clone(), base, follows, op };
        tracing::debug!(target: "changes", %msg, path = %change.path, base = base.0, follows = ?change.follows, op = ?change.op, "queued");
        let seq = self.db.push_outbox(&msg, &change)?;
        self.count_change(&path, 1);
        self.set_outbox_row(seq, Some(OutboxRow { seq, msg, change }));
        Ok(())
    }

    fn record_put(&mut self, parent: u64, name: &OsStr, ino: u64) -> FsResult<()> {
        let Some(path) = self.path_of(parent, name) else {
            return Ok(());
        };
        let i = self.inode(ino)?;
        match i.version() {
            Some(version) => self.push_change(path, ChangeOp::Put { version }),
            // A local-only kind (FIFO, socket, device) now occupies a path that may hold
            // a synced file elsewhere: for the others, that path is gone. Without this,
            // the manager's older state of the path would come back over it.
            None if !i.kind.synced() => self.push_change(path, ChangeOp::Delete),
            None => Ok(()),
        }
    }

    fn record_put_all_links(&mut self, ino: u64) -> FsResult<()> {
        let links = self.inode(ino)?.links.clone();
        for (p, n) in links {
            self.record_put(p, &n, ino)?;
        }
        Ok(())
    }

    fn record_put_subtree(&mut self, parent: u64, name: &OsStr) -> FsResult<()> {
        let ino = self.child(parent, name)?;
        if self.inode(ino)?.work.is_none() {
            self.record_put(parent, name, ino)?;
        }
        let mut all = Vec::new();
        self.collect_paths(ino, None, &mut all);
        for (_, p, n, i) in all {
            if self.inode(i)?.work.is_none() {
                self.record_put(p, &n, i)?;
            }
        }
        Ok(())
    }

    fn record_delete(&mut self, path: RelPath) -> FsResult<()> {
        self.push_change(path, ChangeOp::Delete)
    }

    /// Makes an inode of `kind` named `name` in `parent`; a file gets an empty work
    /// file (it is sent when closed, with its content). Returns its number.
    #[allow(clippy::too_many_arguments)]
    fn make(
        &mut self,
        parent: u64,
        name: &OsStr,
        kind: Kind,
        perm: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: Option<Vec<u8>>,
        store: &ContentStore,
    ) -> FsResult<u64> {
        let p = self.inode(parent)?;
        if p.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if p.children.contains_key(name) {
            return Err(FsError::Exists);
        }
        // BSD group semantics for set-gid directories, as ext4 does.
        let (gid, perm) = if p.perm & libc::S_ISGID != 0 { (p.gid, if kind == Kind::Dir { perm | libc::S_ISGID } else { perm }) } else { (gid, perm) };
        let ino = self.next_ino;
        self.next_ino += 1;
        let mut i = Inode::new(ino, kind, perm & 0o7777, uid, gid, self.env.now_ns());
        i.rdev = rdev;
        if kind == Kind::Symlink {
            i.size = target.as_ref().map(|t| t.len() as u64).unwrap_or(0);
            i.target = target;
            i.perm = 0o777;
        }
        if kind == Kind::File {
            i.hash = Some(ContentStore::empty_hash());
        }
        i.lookups = 1;
        i.links.push((parent, name.to_owned()));
        self.add_inode(i);
        self.link_into(parent, name, ino)?;
        self.save(ino)?;
        if kind == Kind::File {
            let w = Arc::new(store.new_work_file(ino, None)?);
            self.inode_mut(ino)?.set_work(w, false);
        } else if kind.synced() {
            self.record_put(parent, name, ino)?;
        }
        Ok(ino)
    }

    /// Opens a handle on `ino` (see `Tree::open_handle`).
    fn open_handle(&mut self, ino: u64, write: bool, truncate: bool, passthrough: bool, store: &ContentStore) -> FsResult<(u64, OpenIo)> {
        let io = self.choose_io(ino, write, passthrough, store)?;
        let pt = matches!(io, OpenIo::Passthrough { .. });
        // A failure undoes the passthrough set-up with the rest of the transaction.
        self.prepare_write_open(ino, write, truncate, pt, store)?;
        let i = self.inode_mut(ino)?;
        i.open += 1;
        if write {
            i.writers += 1;
        }
        if pt {
            self.passthrough_opens += 1;
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { ino, write, passthrough: pt });
        self.record(|| Undo::Handle(fh, None));
        Ok((fh, io))
    }

    /// How the kernel is to do I/O on a new handle of `ino` (see `Passthrough`).
    fn choose_io(&mut self, ino: u64, write: bool, passthrough: bool, store: &ContentStore) -> FsResult<OpenIo> {
        let i = self.inode_mut(ino)?;
        if let Some(pt) = &mut i.passthrough {
            pt.handles += 1;
            return Ok(OpenIo::Passthrough { register: None });
        }
        let committed = i.kind == Kind::File && i.work.is_none() && i.open == 0;
        let Some(hash) = i.hash.clone().filter(|_| passthrough && !write && committed) else {
            return Ok(OpenIo::Cached);
        };
        let backing = match store.open_blob(&hash) {
            Ok(f) => Arc::new(f),
            Err(e) => return Err(FsError::Io(anyhow::Error::new(e).context(format!("opening blob {hash}")))),
        };
        let key = {
            use std::os::unix::fs::MetadataExt;
            let m = backing.metadata()?;
            (m.dev(), m.ino())
        };
        if self.backing_owner.contains_key(&key) {
            // Another inode with the same content passes through to this blob.
            return Ok(OpenIo::Cached);
        }
        self.set_backing_owner(key, Some(ino));
        self.inode_mut(ino)?.passthrough = Some(Passthrough { backing: backing.clone(), key, handles: 1 });
        Ok(OpenIo::Passthrough { register: Some(backing) })
    }

    /// What opening `ino` for writing does before the first write: a passthrough
    /// writer detaches the backing file now (its writes will not pass here), and
    /// O_TRUNC empties the file.
    fn prepare_write_open(&mut self, ino: u64, write: bool, truncate: bool, passthrough: bool, store: &ContentStore) -> FsResult<()> {
        if !write {
            return Ok(());
        }
        if passthrough {
            self.ensure_work(ino, true, store)?;
        }
        let i = self.inode(ino)?;
        if truncate && (i.size != 0 || i.work.is_none()) {
            let w = self.ensure_work(ino, false, store)?;
            w.set_len(0)?;
            let now = self.env.now_ns();
            let i = self.inode_mut(ino)?;
            i.size = 0;
            i.mtime = now;
            i.ctime = i.mtime;
            i.give_mtime_to_work()?;
        }
        Ok(())
    }

    /// One passthrough handle of `ino` closed; true when it was the last one.
    fn end_passthrough_handle(&mut self, ino: u64) -> bool {
        if self.inodes.get(&ino).is_none_or(|i| i.passthrough.is_none()) {
            return false;
        }
        let Ok(i) = self.inode_mut(ino) else {
            return false;
        };
        let Some(pt) = &mut i.passthrough else {
            return false;
        };
        pt.handles = pt.handles.saturating_sub(1);
        if pt.handles > 0 {
            return false;
        }
        let key = pt.key;
        i.passthrough = None;
        self.set_backing_owner(key, None);
        true
    }

    /// The inode's work file, made if there is none: a copy of the blob (or empty when
    /// `keep_content` is false), or, under passthrough, the backing file detached from
    /// the store.
    fn ensure_work(&mut self, ino: u64, keep_content: bool, store: &ContentStore) -> FsResult<Arc<File>> {
        let i = self.inode_mut(ino)?;
        if let Some(w) = &i.work {
            return Ok(w.clone());
        }
        let detached = i.passthrough.is_some();
        let w = match &i.passthrough {
            Some(pt) => {
                let hash = i.hash.clone();
                let w = store.detach_for_work(&pt.backing, hash.as_ref(), system_time(i.mtime))?;
                self.passthrough_detaches += 1;
                if let Some(j) = &mut self.journal {
                    j.detached.insert(ino);
                }
                // Inodes with the same content may read through a handle on the file
                // that is now this inode's: they reopen the store's blob.
                for other in self.inodes.values_mut().filter(|o| o.hash.is_some() && o.hash == hash) {
                    other.blob = None;
                }
                w
            }
            None => store.new_work_file(ino, if keep_content { i.hash.as_ref() } else { None })?,
        };
        let w = Arc::new(w);
        self.inode_mut(ino)?.set_work(w.clone(), detached);
        Ok(w)
    }

    /// Hashes and stores the work file of `ino` and records a put for each of its names.
    fn commit_work(&mut self, ino: u64, store: &ContentStore) -> FsResult<()> {
        let i = self.inode_mut(ino)?;
        let Some(work) = i.work.take() else {
            return Ok(());
        };
        i.blob = None;
        let (hash, size) = if i.detached {
            // The work file is the kernel's backing file: it stays, and while a writer
            // is still open the file stays dirty (its writes do not pass here).
            i.work = Some(work.clone());
            i.take_passthrough_writes()?;
            let committed = store.commit_snapshot(&work)?;
            let i = self.inode_mut(ino)?;
            if i.writers == 0 {
                i.work = None;
                i.detached = false;
            }
            committed
        } else {
            let c = store.commit_work_file(ino)?;
            if c.moved {
                self.record(|| Undo::Installed(ino, c.hash.clone()));
            } else {
                self.discard_work_file(ino, store);
            }
            (c.hash, c.size)
        };
        let i = self.inode_mut(ino)?;
        i.hash = Some(hash);
        i.size = size;
        // A passthrough writer still open keeps writing: what was just committed is
        // the version a crash would come back to.
        i.committed = i.work.is_some().then(|| i.current());
        if i.nlink == 0 {
            return Ok(());
        }
        self.save(ino)?;
        self.record_put_all_links(ino)
    }

    // ---- remote changes ----------------------------------------------------------------

    /// Whether the file at `path` has writes not yet committed.
    fn is_dirty(&self, path: &RelPath) -> bool {
        self.resolve(path).and_then(|(_, _, ino)| self.inodes.get(&ino)).is_some_and(|i| i.work.is_some())
    }

    fn set_rev(&mut self, path: &RelPath, rev: Revision) -> FsResult<()> {
        let cur = self.revs.get(path).copied().unwrap_or_default();
        if rev > cur {
            let old = self.revs.insert(path.clone(), rev);
            self.record(|| Undo::Rev(path.clone(), old));
            self.db.set_rev(path, rev)?;
        }
        Ok(())
    }

    fn has_pending_below(&self, path: &RelPath) -> bool {
        self.outbox.per_path.keys().any(|p| p.is_within(path))
    }

    fn apply_remote(&mut self, entry: &Entry, store: &ContentStore) -> FsResult<Applied> {
        self.apply_entry(entry, store, false)
    }

    /// Applies the manager's state of one path (see `Tree::apply_remote`). `decided`:
    /// the entry answers this node's own change, which was just decided and is the last
    /// one of the path; the node takes it even at a revision it already had (a refused or
    /// conflicting change leaves the path at the revision it was based on, and the node
    /// must drop what it had there).
    fn apply_entry(&mut self, entry: &Entry, store: &ContentStore, decided: bool) -> FsResult<Applied> {
        let mut out = Applied::default();
        let path = &entry.path;
        if self.outbox.per_path.contains_key(path) {
            return Ok(out);
        }
        let local = self.resolve(path);
        let local_version = local.as_ref().and_then(|(_, _, ino)| self.inodes.get(ino)).and_then(|i| if i.work.is_some() { None } else { i.version() });
        let local_dirty = self.is_dirty(path);
        if !local_dirty && local_version == entry.version && (local.is_some() || entry.version.is_none()) {
            self.set_rev(path, entry.rev)?;
            return Ok(out);
        }
        let local_rev = self.revs.get(path).copied().unwrap_or_default();
        if (entry.rev <= local_rev && !decided) || entry.rev < local_rev || local_dirty {
            return Ok(out);
        }
        tracing::debug!(target: "changes", path = %path, rev = entry.rev.0, local_rev = local_rev.0, "applying the manager's state");
        match &entry.version {
            None => {
                if let Some((parent, name, _)) = local {
                    if self.has_pending_below(path) {
                        // Something below has a local change: the manager will bring
                        // the directory back for it, so keep it.
                        self.remove_below_except_pending(path, store, &mut out)?;
                    } else {
                        self.remove_subtree(parent, &name, store, &mut out)?;
                    }
                    out.changed = true;
                }
            }
            Some(v) => {
                if let Content::File { hash, .. } = &v.content {
                    if !store.has(hash) {
                        out.missing_content = true;
                        return Ok(out);
                    }
                }
                let Some(parent) = self.ensure_dirs(path, &mut out)? else {
                    return Ok(out);
                };
                let name = OsString::from(path.name());
                if let Some((_, _, ino)) = local {
                    let i = self.inode(ino)?;
                    let same_kind_in_place = match (&i.kind, &v.content) {
                        (Kind::Dir, Content::Dir) => true,
                        (Kind::File, Content::File { hash, .. }) => i.hash.as_ref() == Some(hash),
                        _ => false,
                    };
                    if same_kind_in_place {
                        let now = self.env.now_ns();
                        let i = self.inode_mut(ino)?;
                        i.perm = v.mode & 0o7777;
                        i.uid = v.uid;
                        i.gid = v.gid;
                        if i.kind == Kind::File {
                            i.mtime = v.mtime_ns;
                        }
                        i.ctime = now;
                        self.save(ino)?;
                        out.invals.push(Inval::Inode { ino });
                        out.changed = true;
                        self.set_rev(path, entry.rev)?;
                        return Ok(out);
                    }
                    if self.has_pending_below(path) {
                        return Ok(out);
                    }
                    self.remove_subtree(parent, &name, store, &mut out)?;
                }
                self.create_from_version(parent, &name, v)?;
                out.invals.push(Inval::Entry { parent, name });
                out.changed = true;
            }
        }
        self.set_rev(path, entry.rev)?;
        Ok(out)
    }

    /// Makes sure every ancestor of `path` is a directory here, creating missing ones
    /// (their own entries from the manager will set their metadata). Returns the parent.
    fn ensure_dirs(&mut self, path: &RelPath, out: &mut Applied) -> FsResult<Option<u64>> {
        let mut dir = ROOT;
        for anc in path.ancestors() {
            let name = OsString::from(anc.name());
            match self.inode(dir)?.children.get(&name).copied() {
                Some(ino) if self.inode(ino)?.kind == Kind::Dir => dir = ino,
                Some(_) => return Ok(None),
                None => {
                    let ino = self.next_ino;
                    self.next_ino += 1;
                    let mut d = Inode::new(ino, Kind::Dir, 0o755, 0, 0, self.env.now_ns());
                    d.links.push((dir, name.clone()));
                    self.add_inode(d);
                    self.link_into(dir, &name, ino)?;
                    self.save(ino)?;
                    out.invals.push(Inval::Entry { parent: dir, name });
                    dir = ino;
                }
            }
        }
        Ok(Some(dir))
    }

    fn create_from_version(&mut self, parent: u64, name: &OsStr, v: &Version) -> FsResult<u64> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let kind = match v.content {
            Content::File { .. } => Kind::File,
            Content::Dir => Kind::Dir,
            Content::Symlink { .. } => Kind::Symlink,
        };
        let mut i = Inode::new(ino, kind, v.mode & 0o7777, v.uid, v.gid, self.env.now_ns());
        match &v.content {
            Content::File { hash, size } => {
                i.hash = Some(hash.clone());
                i.size = *size;
                i.mtime = v.mtime_ns;
            }
            Content::Symlink { target } => {
                i.target = Some(target.as_bytes().to_vec());
                i.size = target.len() as u64;
            }
            Content::Dir => {}
        }
        i.links.push((parent, name.to_owned()));
        self.add_inode(i);
        self.link_into(parent, name, ino)?;
        self.save(ino)?;
        Ok(ino)
    }

    /// Removes an entry and everything below it (no deletes are sent: this is the
    /// manager's state arriving).
    fn remove_subtree(&mut self, parent: u64, name: &OsStr, store: &ContentStore, out: &mut Applied) -> FsResult<()> {
        let ino = self.child(parent, name)?;
        let children: Vec<OsString> = self.inode(ino)?.children.keys().cloned().collect();
        for c in children {
            self.remove_subtree(ino, &c, store, out)?;
        }
        self.remove_entry(parent, name, false, store)?;
        out.invals.push(Inval::Entry { parent, name: name.to_owned() });
        Ok(())
    }

    fn remove_below_except_pending(&mut self, path: &RelPath, store: &ContentStore, out: &mut Applied) -> FsResult<()> {
        let Some((_, _, ino)) = self.resolve(path) else {
            return Ok(());
        };
        let children: Vec<OsString> = self.inode(ino)?.children.keys().cloned().collect();
        for c in children {
            let Some(cp) = c.to_str().and_then(|c| path.join(c).ok()) else {
                continue;
            };
            if self.has_pending_below(&cp) {
                if self.inode(self.child(ino, &c)?)?.kind == Kind::Dir {
                    self.remove_below_except_pending(&cp, store, out)?;
                }
            } else {
                self.remove_subtree(ino, &c, store, out)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dir: &std::path::Path) -> Tree {
        let db = Db::open(&dir.join("node.db")).unwrap();
        let store = ContentStore::open(dir).unwrap();
        Tree::load(db, store).unwrap()
    }

    /// A fresh tree with directory `d` (mode 0700) made in it; the temp dir must outlive it.
    fn tree_with_dir() -> (tempfile::TempDir, Tree, u64) {
        let dir = tempfile::tempdir().unwrap();
        let t = tree(dir.path());
        let d = t.mkdir(ROOT, OsStr::new("d"), 0o700, 0, 0).unwrap().ino;
        (dir, t, d)
    }

    fn chmod(t: &Tree, ino: u64, mode: u32) {
        t.setattr(ino, 0, SetAttr { mode: Some(mode), uid: None, gid: None, size: None, atime: None, mtime: None, fh: None }).unwrap();
    }

    fn dir_entry(path: &str, rev: u64, mode: u32) -> Entry {
        Entry {
            path: RelPath::new(path).unwrap(),
            rev: Revision(rev),
            version: Some(Version { content: Content::Dir, mode, uid: 0, gid: 0, mtime_ns: 0 }),
            holders: vec![],
        }
    }

    /// `cp -a` makes a directory 0700 and chmods it at the end. When the mkdir was decided
    /// while a later change of the directory was still queued, and that queued change was
    /// then replaced by the final chmod before it was sent, the chmod must be based on the
    /// mkdir's revision: with base 0 the manager took it for a stale edit and kept 0700.
    #[test]
    fn a_change_queued_after_an_own_decided_one_is_based_on_its_revision() {
        let (_dir, t, d) = tree_with_dir();
        let sent = t.take_unpublished();
        assert_eq!(sent.len(), 1);
        chmod(&t, d, 0o700); // queued, not sent: follows the mkdir
        t.apply_decided(&sent[0].msg, &Outcome::Accepted, &dir_entry("d", 7, 0o700)).unwrap();
        chmod(&t, d, 0o755); // replaces the unsent change; nothing queued is left to follow
        let rows = t.take_unpublished();
        assert_eq!(rows.len(), 1, "the unsent change was coalesced: {rows:?}");
        let c = &rows[0].change;
        assert_eq!((c.base, &c.follows), (Revision(7), &None), "the chmod must be based on the mkdir's revision");
        assert!(matches!(&c.op, ChangeOp::Put { version } if version.mode == 0o755));
    }

    /// An own change decided while the same path still has a sent, undecided change
    /// queued: the later change keeps following it (the manager resolves its base).
    #[test]
    fn a_sent_change_keeps_following_the_one_before() {
        let (_dir, t, d) = tree_with_dir();
        let first = t.take_unpublished();
        chmod(&t, d, 0o750);
        let second = t.take_unpublished();
        assert_eq!(second[0].change.follows.as_ref(), Some(&first[0].msg));
        t.apply_decided(&first[0].msg, &Outcome::Accepted, &dir_entry("d", 3, 0o700)).unwrap();
        t.apply_decided(&second[0].msg, &Outcome::Accepted, &dir_entry("d", 4, 0o750)).unwrap();
        chmod(&t, d, 0o755);
        let third = t.take_unpublished();
        assert_eq!((third[0].change.base, &third[0].change.follows), (Revision(4), &None));
        assert_eq!(t.getattr(d).unwrap().perm, 0o755);
    }

    fn queued(rows: &[OutboxRow]) -> Vec<(String, Option<u32>)> {
        rows.iter()
            .map(|r| {
                let mode = match &r.change.op {
                    ChangeOp::Put { version } => Some(version.mode),
                    ChangeOp::Delete => None,
                };
                (r.change.path.to_string(), mode)
            })
            .collect()
    }

    /// A directory's final mode replaces its queued mkdir in place, ahead of its
    /// children; appended, the manager would see the children first and make the
    /// directory itself (mode 0755), and the node's put would then change nothing.
    #[test]
    fn a_put_replacing_a_queued_put_keeps_its_place() {
        let (_dir, t, d) = tree_with_dir();
        t.mkdir(d, OsStr::new("e"), 0o700, 0, 0).unwrap();
        chmod(&t, d, 0o750);
        let rows = t.take_unpublished();
        assert_eq!(queued(&rows), vec![("d".into(), Some(0o750)), ("d/e".into(), Some(0o700))]);
        assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    /// The tree a restarted node loads from `dir` after the process died without
    /// cleaning up (`tree` must not be used again).
    fn crash_and_reload(t: Tree, dir: &std::path::Path) -> Tree {
        std::mem::forget(t);
        tree(dir)
    }

    fn truncate(t: &Tree, ino: u64, size: u64, fh: Option<u64>) {
        t.setattr(ino, 0, SetAttr { size: Some(size), fh, ..Default::default() }).unwrap();
    }

    fn read_all(t: &Tree, ino: u64) -> FsResult<Vec<u8>> {
        let (fh, _) = t.open(ino, false, false, false)?;
        let bytes = t.read(fh, 0, 1 << 20);
        t.release(fh)?;
        bytes
    }

    /// A closed file `name` holding `bytes`; returns its inode.
    fn closed_file(t: &Tree, parent: u64, name: &str, bytes: &[u8]) -> u64 {
        let (a, fh) = t.create(parent, OsStr::new(name), 0o644, 0, 0, true).unwrap();
        t.write(fh, 0, bytes).unwrap();
        t.flush(fh).unwrap();
        t.release(fh).unwrap();
        a.ino
    }

    /// Found by the simulator (seed 407 of `sim`): a file open for writing was renamed
    /// over a synced path and the node died before the last close. The put of the new
    /// path waited for that close and never came: the node showed the renamed file and
    /// the others the old one, for good.
    #[test]
    fn regression_a_file_renamed_while_being_written_is_sent_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let t = tree(dir.path());
        closed_file(&t, ROOT, "target", b"synced");
        let (_, fh) = t.create(ROOT, OsStr::new("new"), 0o644, 0, 0, true).unwrap();
        t.write(fh, 0, b"not closed").unwrap();
        t.rename(ROOT, OsStr::new("new"), ROOT, OsStr::new("target"), false).unwrap();
        let before: Vec<String> = t.take_unpublished().into_iter().map(|r| format!("{} {:?}", r.change.path, r.change.op)).collect();
        let t = crash_and_reload(t, dir.path());
        let after = t.take_unpublished();
        let last = after.iter().rev().find(|r| r.change.path.as_str() == "target").expect("a change of target queued");
        let ChangeOp::Put { version } = &last.change.op else { panic!("{:?}", last.change.op) };
        assert_eq!(version.content, Content::File { hash: ContentStore::empty_hash(), size: 0 }, "before the crash: {before:?}");
    }

    /// Crash gap: ftruncate with a writer open saved the new size with the old hash. A
    /// node killed then came back with a file whose size matched no content: the load
    /// took the blob for damaged and removed it (reads failed until a peer sent it again;
    /// with no other holder, the closed version was gone).
    #[test]
    fn regression_ftruncate_with_a_writer_open_never_pairs_a_size_with_other_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let t = tree(dir.path());
        let ino = closed_file(&t, ROOT, "f", b"hello world");
        let before = t.lock().inode(ino).unwrap().version();
        let (fh, _) = t.open(ino, true, false, false).unwrap();
        truncate(&t, ino, 5, Some(fh));
        t.write(fh, 5, b"!").unwrap();
        assert_eq!(read_all(&t, ino).unwrap(), b"hello!");
        let t = crash_and_reload(t, dir.path());
        let ino = t.lookup(ROOT, OsStr::new("f")).unwrap().ino;
        assert_eq!(t.lock().inode(ino).unwrap().version(), before, "after a crash the file is its closed version");
        assert_eq!(read_all(&t, ino).unwrap(), b"hello world");
    }

    /// A node.db written before that fix may hold such a row: the blob hashes to its
    /// name, so it is kept and the row's size corrected, never the blob removed.
    #[test]
    fn a_row_with_a_wrong_size_keeps_a_whole_blob() {
        let dir = tempfile::tempdir().unwrap();
        let t = tree(dir.path());
        let ino = closed_file(&t, ROOT, "f", b"hello world");
        let mut row = t.lock().inode(ino).unwrap().row();
        row.size = 5;
        t.lock().db.save_inode(&row).unwrap();
        let t = crash_and_reload(t, dir.path());
        assert_eq!(t.getattr(ino).unwrap().size, 11);
        assert_eq!(read_all(&t, ino).unwrap(), b"hello world");
        let t = crash_and_reload(t, dir.path());
        assert_eq!(t.getattr(ino).unwrap().size, 11, "the corrected size was saved");
    }

    /// Makes the node database fail at its `n`th write from now, through triggers on
    /// every table the tree writes: at that statement, or (`at_commit`) at the COMMIT,
    /// through a deferred foreign key.
    struct Chaos {
        conn: rusqlite::Connection,
    }

    impl Chaos {
        fn install(t: &Tree, dir: &std::path::Path) -> Chaos {
            t.lock().db.conn().execute_batch("PRAGMA foreign_keys = ON").unwrap();
            let conn = rusqlite::Connection::open(dir.join("node.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE chaos(n INTEGER NOT NULL, at_commit INTEGER NOT NULL); INSERT INTO chaos VALUES(-1, 0);
                 CREATE TABLE chaos_parent(id INTEGER PRIMARY KEY);
                 CREATE TABLE chaos_orphan(parent INTEGER REFERENCES chaos_parent(id) DEFERRABLE INITIALLY DEFERRED);",
            )
            .unwrap();
            for table in ["inodes", "dentries", "revs", "outbox"] {
                for op in ["INSERT", "UPDATE", "DELETE"] {
                    conn.execute_batch(&format!(
                        "CREATE TRIGGER chaos_{table}_{op} BEFORE {op} ON {table} BEGIN
                           UPDATE chaos SET n = n - 1 WHERE n > 0;
                           SELECT RAISE(ABORT, 'injected failure') WHERE (SELECT n = 0 AND NOT at_commit FROM chaos);
                           INSERT INTO chaos_orphan(parent) SELECT 1 WHERE (SELECT n = 0 AND at_commit FROM chaos);
                         END;"
                    ))
                    .unwrap();
                }
            }
            Chaos { conn }
        }

        fn arm(&self, n: i64, at_commit: bool) {
            self.conn.execute("UPDATE chaos SET n = ?1, at_commit = ?2", rusqlite::params![n, at_commit]).unwrap();
        }

        /// Runs `op` with the database failing at its first write, then its second, and
        /// so on, until it succeeds; after every failure the tree in memory must be what
        /// the database holds, and the next attempt starts from there.
        fn every_failure_of<T>(&self, t: &Tree, what: &str, mut op: impl FnMut(&Tree) -> FsResult<T>) -> T {
            for n in 1.. {
                for at_commit in [true, false] {
                    self.arm(n, at_commit);
                    let r = op(t);
                    self.arm(-1, false);
                    assert_memory_is_persisted(t, &format!("{what}, failing at write {n} (at commit: {at_commit})"));
                    match r {
                        Ok(_) if n == 1 && at_commit => panic!("{what} wrote nothing to fail"),
                        Ok(v) => return v,
                        Err(FsError::Io(_)) => {}
                        Err(e) => panic!("{what}: {e}"),
                    }
                }
            }
            unreachable!("the loop returns")
        }
    }

    /// The tree in memory is exactly what the database holds (and the store has every
    /// work file and blob the tree names, and no other work file).
    fn assert_memory_is_persisted(t: &Tree, when: &str) {
        let st = t.lock();
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        // atime and ctime are local, and reads and writes change them without saving.
        let row = |r: &InodeRow| format!("{:?}", InodeRow { atime: 0, ctime: 0, ..r.clone() });
        let mem = sorted(st.inodes.values().filter(|i| i.nlink > 0).map(|i| row(&i.row())).collect());
        let disk = sorted(st.db.inodes().unwrap().iter().map(row).collect());
        assert_eq!(mem, disk, "inodes, {when}");
        let mem = sorted(st.inodes.values().flat_map(|d| d.children.iter().map(|(n, c)| format!("{} {n:?} {c}", d.ino))).collect());
        let disk = sorted(st.db.dentries().unwrap().iter().map(|(p, n, c)| format!("{p} {n:?} {c}")).collect());
        assert_eq!(mem, disk, "directory entries, {when}");
        let links = sorted(st.inodes.values().flat_map(|i| i.links.iter().map(|(p, n)| format!("{p} {n:?} {}", i.ino))).collect());
        assert_eq!(links, disk, "links, {when}");
        assert!(st.inodes.keys().all(|&i| i < st.next_ino), "next_ino, {when}");
        let mem = sorted(st.revs.iter().map(|(p, r)| format!("{p} {}", r.0)).collect());
        let disk = sorted(st.db.revs().unwrap().iter().map(|(p, r)| format!("{p} {r}")).collect());
        assert_eq!(mem, disk, "revisions, {when}");
        let mem: Vec<String> = st.outbox.rows.values().map(|r| format!("{} {} {:?}", r.seq, r.msg, r.change)).collect();
        let disk: Vec<String> = st.db.outbox().unwrap().iter().map(|r| format!("{} {} {:?}", r.seq, r.msg, r.change)).collect();
        assert_eq!(mem, disk, "outbox, {when}");
        let mut per_path: HashMap<RelPath, usize> = HashMap::new();
        for r in st.outbox.rows.values() {
            *per_path.entry(r.change.path.clone()).or_default() += 1;
        }
        assert_eq!(per_path, st.outbox.per_path, "outbox per path, {when}");
        for i in st.inodes.values() {
            if let Some(h) = &i.hash {
                assert!(t.store.has(h), "inode {} names blob {h}, which is missing, {when}", i.ino);
            }
        }
        let work: Vec<String> =
            sorted(std::fs::read_dir(t.store.work_path(0).parent().unwrap()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect());
        let mem = sorted(st.inodes.values().filter(|i| i.work.is_some() && !i.detached).map(|i| i.ino.to_string()).collect());
        assert_eq!(work, mem, "work files, {when}");
        for i in st.inodes.values() {
            if let (Some(pt), None) = (&i.passthrough, &i.work) {
                let (hash, _) = crate::store::hash_file(&crate::store::fd_path(&pt.backing)).unwrap();
                assert_eq!(Some(hash), i.hash, "the kernel reads inode {} from a backing file that is not its committed content, {when}", i.ino);
            }
        }
        for i in st.inodes.values().filter(|i| i.work.is_some() && !i.detached) {
            let len = std::fs::metadata(t.store.work_path(i.ino)).unwrap().len();
            assert_eq!(len, i.size, "work file of {}, {when}", i.ino);
        }
    }

    /// Crash gap: a failed SQLite transaction left its changes in memory (an inode made,
    /// an entry moved, an outbox row gone), so the tree showed and sent what the database
    /// did not hold, until the node restarted and the tree changed under its users. Every
    /// operation fails here at each of its database writes in turn, and at its commit.
    #[test]
    fn regression_a_failed_transaction_changes_nothing_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let t = tree(dir.path());
        let chaos = Chaos::install(&t, dir.path());
        let c = |what: &str, op: &mut dyn FnMut(&Tree) -> FsResult<()>| chaos.every_failure_of(&t, what, op);
        let d = chaos.every_failure_of(&t, "mkdir", |t| t.mkdir(ROOT, OsStr::new("d"), 0o755, 0, 0)).ino;
        let (f, fh) = chaos.every_failure_of(&t, "create", |t| t.create(d, OsStr::new("f"), 0o644, 0, 0, true));
        let f = f.ino;
        t.write(fh, 0, b"first version").unwrap();
        c("close", &mut |t| t.flush(fh));
        t.release(fh).unwrap();
        let (fh, _) = t.open(f, true, false, false).unwrap();
        c("ftruncate with a writer open", &mut |t| t.setattr(f, 0, SetAttr { size: Some(5), fh: Some(fh), ..Default::default() }).map(|_| ()));
        t.write(fh, 5, b", second").unwrap();
        c("chmod with a writer open", &mut |t| t.setattr(f, 0, SetAttr { mode: Some(0o600), ..Default::default() }).map(|_| ()));
        c("close of the second version", &mut |t| t.flush(fh));
        t.release(fh).unwrap();
        assert_eq!(read_all(&t, f).unwrap(), b"first, second");
        c("truncate", &mut |t| t.setattr(f, 0, SetAttr { size: Some(3), ..Default::default() }).map(|_| ()));
        c("rename", &mut |t| t.rename(d, OsStr::new("f"), ROOT, OsStr::new("g"), false));
        c("link", &mut |t| t.link(f, d, OsStr::new("h")).map(|_| ()));
        c("chmod", &mut |t| t.setattr(d, 0, SetAttr { mode: Some(0o700), ..Default::default() }).map(|_| ()));
        let (reader, _) = t.open(f, false, false, true).unwrap();
        let (writer, io) = t.open(f, true, false, true).unwrap();
        assert!(matches!(io, OpenIo::Passthrough { register: None }));
        t.write(writer, 0, b"through").unwrap();
        c("close of a passthrough writer", &mut |t| t.flush(writer));
        t.release(writer).unwrap();
        t.release(reader).unwrap();
        assert_eq!(read_all(&t, f).unwrap(), b"through");
        let (reader, _) = t.open(f, false, false, true).unwrap();
        c("truncate under a passthrough reader", &mut |t| t.setattr(f, 0, SetAttr { size: Some(4), ..Default::default() }).map(|_| ()));
        t.release(reader).unwrap();
        t.gc();
        assert_eq!(read_all(&t, f).unwrap(), b"thro");
        c("rename of a directory", &mut |t| t.rename(ROOT, OsStr::new("d"), ROOT, OsStr::new("e"), false));
        let sent = t.take_unpublished();
        let first = sent.first().unwrap();
        c("a decision", &mut |t| t.apply_decided(&first.msg, &Outcome::Accepted, &dir_entry("d", 3, 0o755)).map(|_| ()));
        let remote = crate::store::put_bytes(&t.store, b"from elsewhere").unwrap();
        let file_entry = |path: &str, rev: u64| Entry {
            path: RelPath::new(path).unwrap(),
            rev: Revision(rev),
            version: Some(Version { content: Content::File { hash: remote.clone(), size: 14 }, mode: 0o644, uid: 0, gid: 0, mtime_ns: 7 }),
            holders: vec![],
        };
        c("a remote file in new directories", &mut |t| t.apply_remote(&file_entry("r/s/x", 10)).map(|_| ()));
        c("a remote file over a local one", &mut |t| t.apply_remote(&file_entry("r/s/x", 11)).map(|_| ()));
        c("a remote delete of a directory", &mut |t| {
            t.apply_remote(&Entry { path: RelPath::new("r").unwrap(), rev: Revision(12), version: None, holders: vec![] }).map(|_| ())
        });
        c("unlink", &mut |t| t.unlink(d, OsStr::new("h")));
        c("unlink of the last name", &mut |t| t.unlink(ROOT, OsStr::new("g")));
        c("rmdir", &mut |t| t.rmdir(ROOT, OsStr::new("e")));
        let t = crash_and_reload(t, dir.path());
        assert_memory_is_persisted(&t, "after a reload");
    }

    /// The close that fails to commit (the flush) tells the writer; the release after
    /// it cannot. The bytes stay unsaved in the work file, and `gc` commits them later.
    #[test]
    fn a_close_that_could_not_commit_is_committed_later() {
        let dir = tempfile::tempdir().unwrap();
        let t = tree(dir.path());
        let chaos = Chaos::install(&t, dir.path());
        let (a, fh) = t.create(ROOT, OsStr::new("f"), 0o644, 0, 0, true).unwrap();
        t.take_unpublished();
        t.write(fh, 0, b"kept").unwrap();
        chaos.arm(1, false);
        assert!(matches!(t.flush(fh), Err(FsError::Io(_))));
        t.release(fh).unwrap();
        chaos.arm(-1, false);
        assert_memory_is_persisted(&t, "after the failed close");
        assert!(t.take_unpublished().is_empty());
        assert_eq!(read_all(&t, a.ino).unwrap(), b"kept", "the bytes are still there");
        t.gc();
        assert_memory_is_persisted(&t, "after gc");
        let sent = t.take_unpublished();
        assert!(
            matches!(&sent[..], [r] if matches!(&r.change.op, ChangeOp::Put { version: Version { content: Content::File { size: 4, .. }, .. } })),
            "{sent:?}"
        );

        // The same when the kernel wrote the bytes itself (passthrough), and the handle
        // that failed was the inode's last one: the backing file stays its work file.
        let (reader, _) = t.open(a.ino, false, false, true).unwrap();
        let (writer, _) = t.open(a.ino, true, false, true).unwrap();
        t.release(reader).unwrap();
        t.write(writer, 4, b" and more").unwrap();
        chaos.arm(1, true);
        assert!(matches!(t.flush(writer), Err(FsError::Io(_))));
        let released = t.release(writer).unwrap();
        chaos.arm(-1, false);
        assert!(released.backing_unused);
        assert_memory_is_persisted(&t, "after the failed close of a passthrough writer");
        assert_eq!(read_all(&t, a.ino).unwrap(), b"kept and more");
        t.gc();
        assert_memory_is_persisted(&t, "after gc");
        let sent = t.take_unpublished();
        let size = |r: &OutboxRow| match &r.change.op {
            ChangeOp::Put { version: Version { content: Content::File { size, .. }, .. } } => Some(*size),
            _ => None,
        };
        assert_eq!(sent.iter().map(size).collect::<Vec<_>>(), vec![Some(13)]);
        assert!(t.lock().inode(a.ino).unwrap().work.is_none());
    }

    /// A node database that cannot grow fails the operation with ENOSPC (not EIO), after
    /// giving it the space kept in reserve; nothing changes in memory, and the reserve is
    /// set aside again later.
    #[test]
    fn a_full_database_fails_with_enospc_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let t = tree(dir.path());
        for i in 0..50 {
            t.mkdir(ROOT, OsStr::new(&format!("d{i}")), 0o755, 0, 0).unwrap();
        }
        let reserve = dir.path().join("reserve");
        assert_eq!(std::fs::metadata(&reserve).unwrap().len(), crate::store::DB_RESERVE_BYTES);
        // SQLite reports SQLITE_FULL, as on a full disk, once the database would grow.
        t.lock().db.conn().execute_batch("PRAGMA max_page_count = 1").unwrap();
        let e = (0..1000).find_map(|i| closed_file_or_error(&t, &format!("f{i}"))).expect("the database filled up");
        assert!(matches!(e, FsError::DbFull), "{e:?}");
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_memory_is_persisted(&t, "after the database filled up");
        assert!(!reserve.exists(), "the reserve was given to the database");
        t.lock().db.conn().execute_batch("PRAGMA max_page_count = 1073741823").unwrap();
        t.mkdir(ROOT, OsStr::new("room again"), 0o755, 0, 0).unwrap();
        t.gc();
        assert!(reserve.exists(), "the reserve is set aside again");
    }

    fn closed_file_or_error(t: &Tree, name: &str) -> Option<FsError> {
        let (_, fh) = match t.create(ROOT, OsStr::new(name), 0o644, 0, 0, true) {
            Ok(made) => made,
            Err(e) => return Some(e),
        };
        t.write(fh, 0, name.as_bytes()).unwrap();
        let e = t.flush(fh).err();
        t.release(fh).unwrap();
        e
    }

    /// A delete replacing a queued put goes to the end: a directory is deleted after its
    /// children (before them, the manager refuses to delete a directory with children).
    #[test]
    fn a_delete_replacing_a_queued_put_goes_after_the_children() {
        let (_dir, t, d) = tree_with_dir();
        t.mkdir(d, OsStr::new("e"), 0o700, 0, 0).unwrap();
        t.take_unpublished();
        chmod(&t, d, 0o755);
        t.rmdir(d, OsStr::new("e")).unwrap();
        t.rmdir(ROOT, OsStr::new("d")).unwrap();
        assert_eq!(queued(&t.take_unpublished()), vec![("d/e".into(), None), ("d".into(), None)]);
    }
}
