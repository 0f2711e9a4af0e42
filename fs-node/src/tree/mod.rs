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
use crate::env::{Env, PastBug, PersistFault, SystemEnv};
use crate::store::ContentStore;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use wire::{Change, ChangeOp, Content, ContentHash, Entry, MessageId, ModeAndOwners, Outcome, RelPath, Revision, Version};

mod error;
mod files;
mod forget;
pub use forget::FORGET_DELETES_AFTER;
mod hold;
use hold::{HoldRecord, TreeGuard};
pub use hold::{HoldReport, LONG_HOLD};
mod ignore_rules;
use ignore_rules::IgnoreRules;
pub use ignore_rules::IGNORE_FILE;
mod inode;
mod kept;
mod moves;
pub use moves::{MOVE_IN_ONE_HOLD, MOVE_PART};
mod ops;
mod outbox;
use outbox::{MadeOn, Outbox};
mod overlay;
use overlay::Overlay;
mod remote;
mod residency;
use residency::Residency;
pub use residency::{Evictable, PinRules, RemoteContent, ResidencyReport};
mod state;
mod sync;
pub use sync::{deletes_applied_upto, HeardPaths, HeartbeatProgress, NamedPaths, PushedUnknown};
#[cfg(test)]
mod tests;

pub use error::{FsError, FsResult};
use inode::{DirEntry, EntryCounts, Inode, Passthrough};
pub use ops::CreateOpen;

pub const ROOT: u64 = 1;

/// Files at least this large keep the kernel's pages across cached opens when they can
/// (`Inode::kernel_pages`); dropping a smaller file's pages costs little.
pub const KEEP_PAGES_MIN: u64 = 1 << 20;

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

#[derive(Default, Debug, Clone)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub fh: Option<u64>,
}

impl SetAttr {
    /// Whether this change clears the file's set-id bits. The kernel leaves that to the
    /// file system (FUSE_HANDLE_KILLPRIV, asked for in `fs.rs`: it spares a GETATTR
    /// before every chown), and Linux's rule is: a change of owner or group, even to
    /// the same ones (`chown(f, -1, -1)` comes as a change of nothing), and a
    /// truncation by a caller without CAP_FSETID (here: not root); the kernel also
    /// sends a change of nothing before such a caller's write, and for an open with
    /// O_TRUNC (`Tree::open`) the tree applies the truncation's rule.
    pub fn kills_set_id(&self, caller_uid: u32) -> bool {
        let owner = self.uid.is_some() || self.gid.is_some();
        let nothing = self.mode.is_none() && !owner && self.size.is_none() && self.atime.is_none() && self.mtime.is_none();
        self.mode.is_none() && (owner || nothing || (self.size.is_some() && caller_uid != 0))
    }
}

/// `perm` without set-user-ID, and without set-group-ID where group execute is set
/// (without it, set-group-ID means mandatory locking, and stays).
pub fn without_set_id(perm: u32) -> u32 {
    let mut p = perm & !libc::S_ISUID;
    if p & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
        p &= !libc::S_ISGID;
    }
    p
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
    /// The entry was applied without its content: the path is on demand here, and the
    /// content comes when a program first opens it.
    pub remote: bool,
    /// The entry was not applied: a state from the queue older than a forgotten delete of
    /// its path (`forget.rs`). Nothing it stands for (a retry of its content) changes.
    pub stale: bool,
    pub invals: Vec<Inval>,
    /// States of other paths applied with it (the manager's states deferred above a
    /// decided change, `remote.rs`), each with what it did.
    pub also: Vec<(Entry, Applied)>,
}

impl Applied {
    /// What it did, without the kernel invalidations (which go to the link).
    pub fn summary(&self) -> Applied {
        Applied { changed: self.changed, missing_content: self.missing_content, remote: self.remote, stale: self.stale, invals: Vec::new(), also: Vec::new() }
    }
}

/// A message from the manager that changes the tree, as [`Tree::apply_incoming_all`]
/// takes it.
#[derive(Clone, Debug)]
pub enum Incoming {
    /// The manager decided one of this node's changes (`ToNode::Decided`).
    /// `first_rev`: see `ToNode::Decided`.
    Decided { change: MessageId, outcome: Outcome, current: Entry, first_rev: Option<Revision> },
    /// A path's new state, another node's change or ours (`ToNode::Applied`).
    Entry(Entry),
}

impl Incoming {
    /// The path's state the item brings.
    pub fn entry(&self) -> &Entry {
        match self {
            Incoming::Decided { current, .. } => current,
            Incoming::Entry(e) => e,
        }
    }
}

/// `node.db` meta key of [`Tree::synced_head`].
const SYNCED_HEAD_KEY: &str = "synced_head";

/// Nanoseconds since the epoch (negative: before it) as a `SystemTime`.
pub fn system_time(ns: i64) -> std::time::SystemTime {
    if ns >= 0 {
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns as u64)
    } else {
        std::time::UNIX_EPOCH - std::time::Duration::from_nanos(ns.unsigned_abs())
    }
}

/// The inverse of [`system_time`]: nanoseconds since the epoch, saturated at what an
/// `i64` holds (years 1677 to 2262), as the kernel clamps a time to what a file system
/// keeps. (A plain cast of a later time wrapped it to some other date.)
pub fn ns_since_epoch(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
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

/// What `Tree::write_without_waiting` did.
pub enum Written {
    /// This many bytes were written.
    Done(u32),
    /// The disk is full, and contents nobody uses were removed to make room that has
    /// not come back yet (a holder of one still has to let go): `Tree::write_after_room`
    /// waits for it, elsewhere.
    RoomComing,
}

struct Handle {
    ino: u64,
    write: bool,
    passthrough: bool,
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
    /// Transactions committed to the node database since the node started.
    pub db_commits: u64,
    /// Paths this node keeps to itself (an ignored directory counts once).
    pub ignored: u64,
    /// Contents kept past GC for the manager's kept versions, and their bytes.
    pub kept_contents: u64,
    pub kept_bytes: u64,
    /// What keeping them takes on the disk beyond the contents of the tree's files (an
    /// older version at rest: its patch; one a file has too: nothing).
    pub kept_disk_bytes: u64,
    /// Paths whose revision this node keeps: every live path it took from the manager,
    /// and deleted ones not forgotten yet (`forget.rs`).
    pub revisions_kept: u64,
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
        old: Option<DirEntry>,
    },
    Rev(RelPath, Option<Revision>),
    Outbox(i64, Option<OutboxRow>),
    Sent(MessageId, bool),
    Handle(u64, Option<Handle>),
    BackingOwner((u64, u64), Option<u64>),
    /// The work file of the inode was moved into the store as this blob: moved back.
    Installed(u64, ContentHash),
    /// The overlay of the inode's work file, dropped by its commit: put back.
    Overlay(u64, Box<Overlay>),
    /// A directory's ignore rules before the transaction read them again.
    IgnoreRules(String, Option<ignore_rules::DirRules>),
    /// A change of the pending moves (`moves.rs`).
    Move(moves::MoveUndo),
    /// A kept content's row before the transaction changed it (`None`: it made it).
    Kept(ContentHash, Option<crate::db::KeptRow>),
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
    /// transaction could not give them back): the inode, and whether its work file is
    /// on the disk (else only its overlay goes).
    discard_after_commit: Vec<(u64, bool)>,
    /// Inodes whose passthrough backing file became their work file (see `undo`).
    detached: HashSet<u64>,
    /// Rules files the transaction changed: read again before it commits.
    rules_touched: Vec<RelPath>,
}

struct State {
    db: Db,
    /// The clock and message ids.
    env: Arc<dyn Env>,
    /// Set while a transaction runs (`Tree::atomically`).
    journal: Option<Journal>,
    /// Boxed: the table keeps twice as many slots as entries at worst, and a slot is
    /// then a pointer, not a whole inode.
    inodes: HashMap<u64, Box<Inode>>,
    next_ino: u64,
    revs: HashMap<RelPath, Revision>,
    /// The manager's latest state of paths where it was not applied because something
    /// below had a local change (`remote.rs`): applied once a decision of this node's
    /// leaves nothing below with one. In memory only: after a restart, the sync at
    /// connection brings them again.
    deferred: BTreeMap<RelPath, Entry>,
    /// The highest of `revs`: the last revision this node took.
    last_rev: u64,
    /// Directory entries by kind, over the whole tree (`EntryCounts`).
    entry_counts: EntryCounts,
    outbox: Outbox,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    conflicts_seen: u64,
    /// Which inode each passthrough backing file (st_dev, st_ino) belongs to.
    backing_owner: HashMap<(u64, u64), u64>,
    passthrough_opens: u64,
    passthrough_detaches: u64,
    /// The last work stamp given out (`Inode::work_stamp`); never goes back.
    last_work_stamp: u64,
    /// What this node keeps to itself (`.syncignore` files, the node's own rules).
    ignore: IgnoreRules,
    /// Inodes that may hold a read handle on their blob (`Inode::blob`): a superset,
    /// pruned when walked, so that dropping the handles on one content does not walk
    /// every inode.
    with_blob: HashSet<u64>,
    /// Inodes that may have a work file (`Inode::work`): a superset (an inode goes when a
    /// commit or `forget_uncommitted` drops its work file, and the rest when walked,
    /// in `Tree::commit_unsaved`), so that looking for files a failed commit left
    /// unsaved does not walk every inode.
    with_work: HashSet<u64>,
    /// The rounds under way (`sync::UseRound`): the GC's (`Tree::gc_candidates`) lists
    /// the contents in use a part of the tree at a time and spares at its removal what
    /// files and queued changes took meanwhile; `Tree::evict`'s likewise.
    rounds: Vec<sync::UseRound>,
    /// The last round's number (`rounds`).
    last_round: u64,
    /// The database's commits (`Db::commits`) the last flush of its redo log made
    /// durable (`Tree::flush_log`).
    flushed_commits: u64,
    /// The highest revision taken at a moment with no change undecided and everything
    /// committed on disk (`Tree::progress_for_heartbeat`).
    idle_taken_on_disk: Revision,
    /// The head of the last completed sync, as `node.db` keeps it (`Tree::synced_head`):
    /// read by every heartbeat, which must not look through the redo log for it.
    synced_head: Option<u64>,
    /// Deleted paths' revisions were forgotten up to here (`forget.rs`); never goes back.
    forgotten_upto: u64,
    /// Completed syncs' heads and when (`forget.rs`).
    checkpoints: Vec<forget::Checkpoint>,
    /// How long a deleted path's revision is kept at least (`forget.rs`).
    forget_after_ns: i64,
    /// Deleted paths whose revisions could not go at the last pass (a change of the
    /// node's own there): looked at again at the next (`forget.rs`). In memory only.
    forget_later: Vec<RelPath>,
    /// The next pass looks at every revision, not only those taken since the last one
    /// (after a start, which lost `forget_later`, or a failed pass).
    forget_all_next: bool,
    /// The highest revision forgotten: `last_rev` never goes below it (`forget.rs`).
    forgotten_max_rev: u64,
    /// Contents kept past GC for the manager (kept versions), by hash (`kept.rs`).
    kept: HashMap<ContentHash, crate::db::KeptRow>,
    /// Kept contents dropped for space and not yet reported to the manager.
    kept_dropped: Vec<ContentHash>,
    /// Free bytes below which nothing more is kept and the oldest kept go.
    kept_floor: u64,
    /// Which paths keep their contents local (`residency.rs`).
    residency: Residency,
    /// When each content was last opened (ns; since the node started): the cache
    /// drops the least recently used first, and a large content left alone may be kept
    /// as a patch over a similar one (`Tree::keep_at_rest`).
    last_used: HashMap<ContentHash, i64>,
    /// When the tree was loaded (ns): what was not opened since counts as opened then.
    loaded_ns: i64,
    /// Work files written in place over their committed content, by inode
    /// (`overlay.rs`).
    overlays: HashMap<u64, Box<Overlay>>,
    /// The copy of a blob a detach is about to make (`ContentStore::copy_blob_ahead`),
    /// made by the tree outside its lock, for the one transaction that may detach.
    copy_ahead: Option<CopyAhead>,
    /// When room-making last found nothing to free (ns) and the node database's count
    /// of commits then (`Db::commits`): until a commit or `ROOM_LOOK_AGAIN`, a full disk
    /// fails at once instead of walking the tree and the store again under the lock.
    futile_room: Option<(i64, u64)>,
    /// Renames of large directories whose changes are being queued (`moves.rs`), the
    /// last one's number, and above how many entries a rename is queued in parts.
    moves: Vec<moves::PendingMove>,
    last_move: u64,
    move_in_one_hold: usize,
    /// Set while a pending move queues its own changes (`moves.rs`).
    queuing_move: bool,
}

/// A copy of content `.0` made ahead of the detach that needs it (`State::copy_ahead`).
pub struct CopyAhead(ContentHash, crate::store::TmpCopy);

/// A work file's hash and size, taken outside the tree lock; good for its commit only if
/// the file's stamp is still `stamp` (nothing wrote or truncated it since).
/// What `State::work_to_hash` gives to hash outside the lock.
pub(super) struct WorkToHash {
    work: Arc<File>,
    stamp: u64,
    detached: bool,
    overlay: Option<overlay::OverlayView>,
}

pub struct Prehashed {
    work: Arc<File>,
    stamp: u64,
    hashed: crate::store::Hashed,
    /// With an overlay (`overlay.rs`): which blocks are in the work file.
    from_patch: Option<Vec<bool>>,
    /// Of a work file passthrough writers may write (detached): the copy that was
    /// hashed, to install.
    snapshot: Option<crate::store::TmpCopy>,
}

/// How long a full disk's room-making, having found nothing to remove, is not tried
/// again unless a transaction commits (`Tree::make_room`).
const ROOM_LOOK_AGAIN: std::time::Duration = std::time::Duration::from_secs(2);

pub struct Tree {
    state: Mutex<State>,
    /// Threads waiting for `state`'s lock (`lock`): a long pass that takes the lock a
    /// part at a time lets them have it between its parts (`yield_to_waiters`).
    lock_waiters: std::sync::atomic::AtomicUsize,
    /// How long the holds of `state`'s lock lasted.
    holds: HoldRecord,
    store: ContentStore,
    /// Woken whenever the outbox grows.
    pub outbox_ready: Arc<tokio::sync::Notify>,
    /// Files whose committed content `load` found missing or damaged: the only ones
    /// `damaged` looks at (a referenced blob is never removed while the node runs).
    lost_at_load: Vec<u64>,
    /// Held by the one thread queuing the pending moves' changes (`Tree::expand_moves`).
    expanding: Mutex<()>,
    /// Woken when a rename leaves changes to queue in parts (`moves.rs`): the node's
    /// task that queues them waits for it.
    pub moves_ready: Arc<tokio::sync::Notify>,
}

/// How many inodes (or queued changes) a pass over the whole tree looks at per hold of
/// the tree's lock (`Tree::visit_in_parts`): about 2 ms.
const WALK_PART: usize = 8_192;

/// The highest revision taken: the highest in `revs`, never below `forgotten_max`, the
/// highest one forgotten (`forget.rs`); 0 for none.
fn last_revision_in(revs: &HashMap<RelPath, Revision>, forgotten_max: u64) -> u64 {
    revs.values().map(|r| r.0).max().unwrap_or(0).max(forgotten_max)
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

    /// [`Tree::load`] of a node whose paths are on demand unless pinned
    /// (`fs-node --on-demand`).
    pub fn load_on_demand(db: Db, store: ContentStore, on_demand: bool) -> anyhow::Result<Tree> {
        Self::load_full(db, store, Arc::new(SystemEnv), on_demand)
    }

    /// [`Tree::load`] with the clock and ids of `env` (the simulator's).
    pub fn load_with(db: Db, store: ContentStore, env: Arc<dyn Env>) -> anyhow::Result<Tree> {
        Self::load_full(db, store, env, false)
    }

    fn load_full(db: Db, store: ContentStore, env: Arc<dyn Env>, on_demand: bool) -> anyhow::Result<Tree> {
        let loaded_ns = env.now_ns();
        // Where no path is on demand, a content missing from the store is lost and told
        // file by file; elsewhere most are just not here, and told in one line.
        let residency = Residency { on_demand, rules: db.pins()?.into_iter().collect() };
        let any_on_demand = residency.any_on_demand();
        let past_bug = env.past_bug();
        let mut inodes = HashMap::new();
        let (rows, writing) = db.inodes()?;
        // Of the files being written when the node died: the state their puts were made on.
        let meta_bases: HashMap<u64, ModeAndOwners> = rows.iter().filter_map(|r| Some((r.ino, r.meta_base?))).collect();
        for row in rows {
            let mut i = Inode::new(row.ino, Kind::from_code(row.kind), row.perm, row.uid, row.gid, 0);
            i.atime = row.atime;
            i.mtime = row.mtime;
            i.ctime = row.ctime;
            i.nlink = row.nlink;
            i.rdev = row.rdev;
            i.size = row.size;
            i.hash = row.hash.and_then(|h| h.parse().ok());
            i.target = row.target.map(Vec::into_boxed_slice);
            inodes.insert(row.ino, Box::new(i));
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = inodes.entry(ROOT) {
            let root = Inode::new(ROOT, Kind::Dir, 0o755, 0, 0, env.now_ns());
            db.save_inode(&root.row())?;
            slot.insert(Box::new(root));
        }
        let mut entry_counts = EntryCounts::default();
        for (parent, name, ino) in db.dentries()? {
            if inodes.contains_key(&parent) && inodes.contains_key(&ino) {
                let child = inodes.get_mut(&ino).expect("checked");
                let entry = DirEntry { ino, kind: child.kind };
                child.links.push((parent, name.clone()));
                let old = inodes.get_mut(&parent).expect("checked").children.insert(name, entry);
                entry_counts.replaced(old.as_ref(), Some(&entry));
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
                Some(h) => match store.size_of(h) {
                    Some(len) if len == i.size => {}
                    // A node.db from before rows of files being written kept their
                    // committed size: an ftruncate then saved the new size with the old
                    // hash. The blob is right if it hashes to its name; the row is not.
                    Some(len) if store.is_whole(h) => {
                        tracing::warn!(ino = i.ino, "the node database gave {h} {} bytes; the store's copy is whole with {len}: size corrected", i.size);
                        i.size = len;
                        db.save_inode(&i.row())?;
                    }
                    Some(len) => {
                        tracing::warn!(ino = i.ino, "the store's copy of {h} has {len} bytes, not {}: removed, it will be pulled again", i.size);
                        store.remove_blob(h);
                        lost_at_load.push(i.ino);
                    }
                    None => {
                        if !any_on_demand {
                            tracing::warn!(ino = i.ino, "content {h} is missing from the store: it will be pulled again");
                        }
                        lost_at_load.push(i.ino);
                    }
                },
            }
        }
        if any_on_demand && !lost_at_load.is_empty() {
            tracing::info!(files = lost_at_load.len(), "files without their content here: on demand, or lost (a pinned one is pulled again at the next sync)");
        }
        let next_ino = inodes.keys().max().copied().unwrap_or(ROOT) + 1;
        let revs = db.revs()?.into_iter().filter_map(|(p, r)| Some((RelPath::new(p).ok()?, Revision(r)))).collect();
        let forget::Kept { forgotten_upto, forgotten_max_rev, checkpoints } = forget::Kept::load(&db)?;
        let last_rev = last_revision_in(&revs, forgotten_max_rev);
        let mut outbox = Outbox::default();
        for row in db.outbox()? {
            outbox.sent.insert(row.msg.clone());
            outbox.set(row.seq, Some(row));
        }
        let synced_head = db.meta(SYNCED_HEAD_KEY)?.and_then(|v| v.parse().ok());
        let state = State {
            db,
            env,
            journal: None,
            inodes,
            next_ino,
            revs,
            deferred: BTreeMap::new(),
            last_rev,
            entry_counts,
            outbox,
            handles: HashMap::new(),
            next_fh: 1,
            conflicts_seen: 0,
            backing_owner: HashMap::new(),
            passthrough_opens: 0,
            passthrough_detaches: 0,
            last_work_stamp: 0,
            ignore: IgnoreRules::default(),
            with_blob: HashSet::new(),
            with_work: HashSet::new(),
            rounds: Vec::new(),
            last_round: 0,
            flushed_commits: 0,
            idle_taken_on_disk: Revision(0),
            synced_head,
            forgotten_upto,
            checkpoints,
            forget_after_ns: FORGET_DELETES_AFTER.as_nanos() as i64,
            forget_later: Vec::new(),
            forget_all_next: true,
            forgotten_max_rev,
            kept: HashMap::new(),
            kept_dropped: Vec::new(),
            kept_floor: 0,
            residency,
            last_used: HashMap::new(),
            loaded_ns,
            overlays: HashMap::new(),
            copy_ahead: None,
            futile_room: None,
            moves: Vec::new(),
            last_move: 0,
            move_in_one_hold: MOVE_IN_ONE_HOLD,
            queuing_move: false,
        };
        let work_left = store.abandoned_work().to_vec();
        let mut state = state;
        state.load_ignore_rules(&store);
        state.kept = state.db.kept()?.into_iter().map(|k| (k.hash.clone(), k)).collect();
        state.load_moves()?;
        let tree = Tree {
            state: Mutex::new(state),
            lock_waiters: Default::default(),
            holds: HoldRecord::default(),
            store,
            outbox_ready: Arc::new(tokio::sync::Notify::new()),
            lost_at_load,
            expanding: Mutex::new(()),
            moves_ready: Arc::new(tokio::sync::Notify::new()),
        };
        // A file still open for writing when the node died keeps what was last committed
        // (or nothing), but what happened to it meanwhile was recorded, a rename over
        // another path above all, while its put waited for the last close that never
        // came: it is sent now, or the path would differ from the manager's for good.
        // Which files were being written: recorded in the database (a work file in memory
        // leaves nothing else behind), or with a work file left on the disk.
        tree.atomically(|st, _| {
            st.db.clear_writing(&writing)?;
            let mut abandoned = writing.clone();
            abandoned.extend_from_slice(&work_left);
            abandoned.sort_unstable();
            abandoned.dedup();
            if past_bug == Some(PastBug::AbandonedWork) {
                abandoned.clear();
            }
            for &ino in &abandoned {
                if st.inodes.get(&ino).is_some_and(|i| i.kind == Kind::File && i.nlink > 0) {
                    // (Said only with the mark of a setattr made while it was written:
                    // whether it was born here is not kept, nor is the content it
                    // replaced, the row's being the version the put is of, or one
                    // committed before it.)
                    let made_on = meta_bases.get(&ino).map(|&meta| MadeOn { meta, content: None });
                    st.record_put_all_links_from(ino, made_on)?;
                }
            }
            // The row's state is no longer the one of a file being written.
            for &ino in meta_bases.keys() {
                if st.inodes.contains_key(&ino) {
                    st.save(ino)?;
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
            out.extend(
                i.links.iter().filter_map(|(parent, name)| st.path_of(*parent, name)).filter(|p| st.residency.pinned(p.as_str())).map(|p| (p, h.clone())),
            );
        }
        out
    }

    /// Takes the tree's lock; the hold is recorded, with the caller's place, when it ends.
    #[track_caller]
    fn lock(&self) -> TreeGuard<'_> {
        use std::sync::{atomic::Ordering, TryLockError};
        let at = std::panic::Location::caller();
        let st = match self.state.try_lock() {
            Ok(st) => st,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                self.lock_waiters.fetch_add(1, Ordering::SeqCst);
                let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                self.lock_waiters.fetch_sub(1, Ordering::SeqCst);
                st
            }
        };
        TreeGuard::new(st, at, &self.holds)
    }

    /// How long the holds of the tree's lock lasted since the node started.
    pub fn holds(&self) -> (HoldReport, Option<&'static std::panic::Location<'static>>) {
        (self.holds.report(), self.holds.longest_at())
    }

    /// Calls `visit` for each of `keys` (inodes or outbox seqs there were when the
    /// caller listed them, looked up again by `visit`), in their order, `part` of them
    /// per hold of the lock; between holds, lets the threads waiting for the lock have it
    /// (`yield_to_waiters`) and calls `between`. For passes over the whole tree that must
    /// not hold the mount for as long as they take.
    #[track_caller]
    fn visit_in_parts<K: Copy + Ord>(&self, mut keys: Vec<K>, part: usize, between: &mut impl FnMut(), mut visit: impl FnMut(&State, K)) {
        keys.sort_unstable();
        for part in keys.chunks(part.max(1)) {
            let st = self.lock();
            for k in part {
                visit(&st, *k);
            }
            drop(st);
            self.yield_to_waiters();
            between();
        }
    }

    /// `visit_in_parts` over the inodes there are now, each still there when its part
    /// comes.
    #[track_caller]
    fn visit_inodes_in_parts(&self, mut visit: impl FnMut(&State, &Inode)) {
        let inos = self.lock().inodes.keys().copied().collect();
        self.visit_in_parts(inos, WALK_PART, &mut || {}, |st, ino| {
            if let Some(i) = st.inodes.get(&ino) {
                visit(st, i)
            }
        });
    }

    /// Visits the directories below `top` (and `top`), outermost first, `part` entries
    /// of a directory per hold of the lock: `visit` gets a directory and a part of its
    /// entries under the lock and says which of them are directories to go into, and
    /// what to hand to `after`, called with it once the lock is let go. A directory
    /// moved meanwhile from one not visited yet into one visited already is not
    /// visited. Stops at the first error of `after`.
    #[allow(clippy::type_complexity)]
    fn walk_dirs_in_parts<T>(
        &self,
        top: u64,
        part: usize,
        mut visit: impl FnMut(&State, u64, &[(&OsString, &DirEntry)]) -> (Vec<u64>, T),
        mut after: impl FnMut(u64, T) -> FsResult<()>,
    ) -> FsResult<()> {
        let part = part.max(1);
        let mut dirs = vec![top];
        // The directory being visited and the last name visited in it.
        let mut going: Option<(u64, Option<OsString>)> = None;
        loop {
            let (dir, last) = match going.take() {
                Some(g) => g,
                None => match dirs.pop() {
                    Some(dir) => (dir, None),
                    None => return Ok(()),
                },
            };
            self.yield_to_waiters();
            let handed = {
                let st = self.lock();
                let Some(d) = st.inodes.get(&dir) else { continue };
                let from = match &last {
                    Some(name) => std::ops::Bound::Excluded(name.as_os_str()),
                    None => std::ops::Bound::Unbounded,
                };
                let entries: Vec<(&OsString, &DirEntry)> = d.children.range::<OsStr, _>((from, std::ops::Bound::Unbounded)).take(part).collect();
                if entries.len() == part {
                    going = entries.last().map(|(name, _)| (dir, Some((*name).clone())));
                }
                let (into, handed) = visit(&st, dir, &entries);
                dirs.extend(into);
                handed
            };
            after(dir, handed)?;
        }
    }

    /// Called by a long pass between its parts, the lock let go: lets the threads that
    /// wait for the lock have it first (for 2 ms at most). The lock is not
    /// fair: without this, the pass takes it back at once, before a woken waiter runs,
    /// and holds the mount as long as if it never let go.
    pub(crate) fn yield_to_waiters(&self) {
        use std::sync::atomic::Ordering;
        let until = std::time::Instant::now() + std::time::Duration::from_millis(2);
        while self.lock_waiters.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < until {
            std::thread::yield_now();
        }
    }

    /// Runs `f` in one database transaction; wakes the broker link if the outbox grew.
    /// If anything fails, the commit included, the transaction is rolled back and what
    /// `f` changed in memory is undone (`Undo`): the tree stays what the database holds.
    /// On a full disk, room is made (`make_room`) and `f` runs once more.
    #[track_caller]
    fn atomically<T>(&self, f: impl FnMut(&mut State, &ContentStore) -> FsResult<T>) -> FsResult<T> {
        self.atomically_locked(self.lock(), f)
    }

    fn atomically_locked<T>(&self, mut st: TreeGuard<'_>, f: impl FnMut(&mut State, &ContentStore) -> FsResult<T>) -> FsResult<T> {
        let before = st.outbox.len();
        let result = self.transaction_making_room(&mut st, f);
        self.let_go(st, before);
        result
    }

    /// `atomically`, and should `f` fail, `undo` under the same hold of the lock (nothing
    /// else changes the tree between them) and outside any transaction: what `undo`
    /// changes is the tree in memory only, back to what the database still holds.
    #[track_caller]
    fn atomically_or_undo<T>(&self, f: impl FnMut(&mut State, &ContentStore) -> FsResult<T>, undo: impl FnOnce(&mut State, &ContentStore)) -> FsResult<T> {
        let mut st = self.lock();
        let before = st.outbox.len();
        let result = self.transaction_making_room(&mut st, f);
        if result.is_err() {
            undo(&mut st, &self.store);
        }
        self.let_go(st, before);
        result
    }

    /// `transaction`; on a full disk, once room is made, `f` is tried once more.
    fn transaction_making_room<T>(&self, st: &mut State, mut f: impl FnMut(&mut State, &ContentStore) -> FsResult<T>) -> FsResult<T> {
        let result = self.transaction(st, &mut f);
        if let Err(e @ (FsError::NoSpace | FsError::DbFull)) = &result {
            if self.make_room(st, matches!(e, FsError::DbFull)) {
                return self.transaction(st, &mut f);
            }
        }
        result
    }

    /// Lets go of the tree lock; wakes the broker link if the outbox grew past `before`.
    fn let_go(&self, st: TreeGuard<'_>, before: usize) {
        let grew = st.outbox.len() > before;
        drop(st);
        if grew {
            tracing::debug!(target: "timing", "outbox grew");
            self.outbox_ready.notify_one();
        }
    }

    fn transaction<T>(&self, st: &mut State, f: &mut impl FnMut(&mut State, &ContentStore) -> FsResult<T>) -> FsResult<T> {
        st.db.begin()?;
        let counters = st.counters();
        st.journal = Some(Journal {
            undo: Vec::new(),
            saved: HashSet::new(),
            counters,
            discard_after_commit: Vec::new(),
            detached: HashSet::new(),
            rules_touched: Vec::new(),
        });
        let result = f(st, &self.store).and_then(|v| {
            // Reading a rules file again may send changes (of paths no longer ignored):
            // in the same transaction.
            st.settle_rules(&self.store)?;
            match st.env.persist_fault() {
                None => st.db.commit()?,
                Some(PersistFault::Io) => return Err(FsError::Io(anyhow::anyhow!("committing to the node database: injected I/O error"))),
                Some(PersistFault::NoSpace) => return Err(FsError::NoSpace),
            }
            Ok(v)
        });
        let journal = st.journal.take().expect("set above");
        match result {
            Ok(v) => {
                for (ino, on_disk) in journal.discard_after_commit {
                    if on_disk {
                        self.store.discard_work_file(ino);
                    }
                    // Its overlay goes with it (unless the inode has a work file again).
                    let _ = st.overlay_mut(ino);
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

    /// Makes room on a full disk: removes the blobs nothing refers to any more and that
    /// are not kept for the manager (a file
    /// deleted a moment ago frees its space now, not at the next `gc`) and, when that
    /// freed nothing and the node database needs room (`for_db`), gives it the space
    /// kept in reserve for it (`ContentStore::release_reserve`). Returns whether
    /// anything was freed. The removal walks the tree and the store under the lock:
    /// once it found nothing, it is not tried again before a transaction commits (a
    /// delete, a decision that lets go of a queued content) or `ROOM_LOOK_AGAIN` has
    /// passed, so that a writer retrying on a full disk does not hold the mount.
    fn make_room(&self, st: &mut State, for_db: bool) -> bool {
        let now = st.env.now_ns();
        // (A clock set back counts as time passed.)
        let looked_in_vain =
            st.futile_room.is_some_and(|(at, commits)| commits == st.db.commits() && (0..ROOM_LOOK_AGAIN.as_nanos() as i64).contains(&now.saturating_sub(at)));
        if !looked_in_vain {
            // A removed file's blob may still be held open for reads it can no longer get.
            st.close_unreachable_blobs();
            // A blob downloaded and not yet applied may go too; it is pulled again. Kept
            // contents stay: the manager counts on them (a kept version, a node's own
            // version decided into a conflict file it has not seen yet, seed 86668);
            // the GC drops the oldest below the free-space floor and tells it.
            let mut keep = Self::referenced(st);
            keep.extend(st.kept.keys().cloned());
            let removed = self.store.gc(&keep, std::time::Duration::ZERO);
            if removed > 0 {
                st.futile_room = None;
                tracing::info!("the disk is full: removed {removed} blobs nothing refers to");
                // Their space comes back once a background pass reading one lets go of it.
                if !crate::store::BlobReader::wait_for_removed(std::time::Duration::from_secs(2)) {
                    tracing::warn!("the disk is full: a background pass still holds a removed blob");
                }
                return true;
            }
            st.futile_room = Some((now, st.db.commits()));
        }
        if for_db && self.store.release_reserve() {
            tracing::warn!("the disk is full: the node database now uses the space kept in reserve for it; free some space");
            return true;
        }
        false
    }
}
