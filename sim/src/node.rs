//! A node in the simulation: the real tree (`fs_node::tree::Tree`, its SQLite database
//! and content store in the run's directory) and the real sync engine
//! (`fs_node::engine::Engine`), driven the way `fs_node::link` drives them, with the
//! broker model for AMQP and other nodes' stores for peer HTTP. File operations go to
//! the tree the way the FUSE layer sends them.
//!
//! A crash drops the tree and the engine (open handles, unsaved work files, everything
//! in memory) and loads the tree again from what its database committed.

use crate::broker::Broker;
use fs_node::db::Db;
use fs_node::engine::{Action, Engine, NodeInfo};
use fs_node::env::{Env, PastBug, PersistFault};
use fs_node::store::ContentStore;
use fs_node::tree::{CreateOpen, FsError, FsResult, Kind, SetAttr, SetTime, Tree, ROOT};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wire::{ContentHash, Envelope, Holder, MessageId, NodeId, RelPath, Revision, ToNode};

/// The virtual clock and the ids of one node, drawn in order (the same run gives the
/// same ids).
pub struct SimEnv {
    pub clock_ns: Arc<AtomicI64>,
    node: NodeId,
    next: AtomicU64,
    bug: Option<PastBug>,
    /// A disk fault for the next commit of the node database, taken by it.
    fault: std::sync::Mutex<Option<PersistFault>>,
}

impl Env for SimEnv {
    fn now_ns(&self) -> i64 {
        self.clock_ns.load(Ordering::Relaxed)
    }
    fn new_id(&self) -> MessageId {
        format!("{}-{}", self.node, self.next.fetch_add(1, Ordering::Relaxed)).parse().expect("valid id")
    }
    fn past_bug(&self) -> Option<PastBug> {
        self.bug
    }
    fn persist_fault(&self) -> Option<PersistFault> {
        self.fault.lock().expect("not poisoned").take()
    }
}

/// A content pull the engine asked for, running in the background.
struct PendingPull {
    path: RelPath,
    rev: Revision,
    hash: ContentHash,
    holders: Vec<Holder>,
}

/// What the world needs from other nodes to serve a pull.
pub trait Peers {
    /// The bytes of `hash` from `holder`, if it is reachable and has them.
    fn serve(&self, holder: &NodeId, hash: &ContentHash) -> Option<Vec<u8>>;
    /// Whether `holder` is frozen: it takes the request and sends nothing.
    fn stalls(&self, holder: &NodeId) -> bool;
}

/// How long a pull waits on a frozen holder before it drops it (the real puller's
/// default stall timeout).
const STALL: Duration = fs_node::puller::DEFAULT_STALL_TIMEOUT;

pub struct SimNode {
    pub id: NodeId,
    dir: PathBuf,
    env: Arc<SimEnv>,
    tree: Option<Arc<Tree>>,
    engine: Option<Engine<()>>,
    /// Cut off from the broker.
    pub partitioned: bool,
    /// Cut off from its peers (neither serves nor pulls).
    pub peer_cut: bool,
    /// Frozen as a holder: takes pulls and sends nothing (`Peers::stalls`).
    pub stalls: bool,
    /// Pulls of this node that waited out a frozen holder.
    pub stalled_pulls: std::cell::Cell<usize>,
    pulls: Vec<PendingPull>,
    /// Writers left open across steps: (handle, inode, path it was opened as).
    pub held: Vec<(u64, u64, RelPath)>,
    /// Results of syncs this node ran (errors only matter).
    pub sync_errors: Vec<String>,
    /// Paths its completed syncs sent as new that it had taken from the manager
    /// (`SyncReport::pushed_again`): without a restore of the manager, a deleted path
    /// brought back.
    pub pushed_again: u64,
    options: NodeOptions,
}

/// How a simulated node is set up, drawn from the seed.
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeOptions {
    /// Above how many entries a rename of a directory is queued in parts
    /// (`Tree::set_move_in_one_hold`; `None`: the node's default).
    pub move_in_one_hold: Option<usize>,
    /// How long the revision of a deleted path is kept after a completed sync covered it
    /// (`Tree::set_forget_deletes_after`; `None`: the node's default, longer than any run).
    pub forget_deletes_after: Option<Duration>,
}

impl SimNode {
    pub fn start(id: NodeId, dir: PathBuf, clock_ns: Arc<AtomicI64>, bug: Option<PastBug>, options: NodeOptions) -> anyhow::Result<SimNode> {
        std::fs::create_dir_all(&dir)?;
        let env = Arc::new(SimEnv { clock_ns, node: id.clone(), next: AtomicU64::new(1), bug, fault: Default::default() });
        let mut n = SimNode {
            id,
            dir,
            env,
            tree: None,
            engine: None,
            partitioned: false,
            peer_cut: false,
            stalls: false,
            stalled_pulls: Default::default(),
            pulls: Vec::new(),
            held: Vec::new(),
            sync_errors: Vec::new(),
            pushed_again: 0,
            options,
        };
        n.load()?;
        Ok(n)
    }

    fn load(&mut self) -> anyhow::Result<()> {
        let db = Db::open(&self.dir.join("node.db"))?;
        let store = ContentStore::open(&self.dir)?;
        let tree = Tree::load_with(db, store, self.env.clone())?;
        if let Some(n) = self.options.move_in_one_hold {
            tree.set_move_in_one_hold(n);
        }
        if let Some(wait) = self.options.forget_deletes_after {
            tree.set_forget_deletes_after(wait);
        }
        self.tree = Some(Arc::new(tree));
        Ok(())
    }

    pub fn tree(&self) -> Option<&Arc<Tree>> {
        self.tree.as_ref()
    }
    pub fn is_up(&self) -> bool {
        self.tree.is_some()
    }
    pub fn is_connected(&self) -> bool {
        self.engine.is_some()
    }
    /// Anything still to do: an engine busy, pulls under way.
    pub fn busy(&self) -> bool {
        self.engine.as_ref().is_some_and(|e| e.busy()) || !self.pulls.is_empty()
    }
    /// Whether this node queues its renames of directories in parts (most of them).
    pub fn moves_in_parts(&self) -> bool {
        self.options.move_in_one_hold.is_some()
    }
    pub fn url(&self) -> String {
        format!("sim://{}", self.id)
    }

    /// Kills the node process: memory, handles, engine and pulls are gone; the broker
    /// takes back what it had not acked.
    pub fn crash(&mut self, broker: &mut Broker) {
        self.disconnect(broker);
        self.tree = None;
        self.held.clear();
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.load()
    }

    /// Makes the next commit of the node database fail with `fault` (`None`: clears one
    /// that was not taken).
    pub fn set_persist_fault(&self, fault: Option<PersistFault>) {
        *self.env.fault.lock().expect("not poisoned") = fault;
    }

    /// The engine failed on the tree (a commit that failed): like the real link, the
    /// session ends (what was not acked comes back) and a later tick reconnects.
    fn engine_failed(&mut self, broker: &mut Broker, e: fs_node::engine::EngineError) -> String {
        self.disconnect(broker);
        format!("the engine failed ({e}); the session ends")
    }

    /// The broker connection is lost (a partition, a crash).
    pub fn disconnect(&mut self, broker: &mut Broker) {
        self.engine = None;
        self.pulls.clear();
        if let Some(q) = broker.nodes.get_mut(&self.id) {
            q.connection_lost();
        }
    }

    /// Connects when up and reachable: a new engine session (which republishes and syncs).
    pub fn connect(&mut self, broker: &mut Broker, now: Duration) {
        let Some(tree) = self.tree.clone() else { return };
        if self.engine.is_some() || self.partitioned {
            return;
        }
        broker.declare_node(&self.id);
        let info = NodeInfo { id: self.id.clone(), url: self.url(), allow_setid: false, software: "sim".into() };
        let (engine, actions) = Engine::connected(tree, info, 0, now);
        self.engine = Some(engine);
        self.carry_out(actions, broker);
    }

    fn carry_out(&mut self, actions: Vec<Action<()>>, broker: &mut Broker) {
        for a in actions {
            match a {
                Action::Publish { env, .. } => broker.update.publish(env.encode()),
                Action::Pull { path, rev, hash, holders, .. } => self.pulls.push(PendingPull { path, rev, hash, holders }),
                Action::Invalidate(_) | Action::Refused(_) => {}
                Action::SyncDone { result, .. } => match result {
                    Ok(report) => self.pushed_again += report.pushed_again,
                    Err(e) => self.sync_errors.push(e),
                },
            }
        }
    }

    /// Gets `hash` from one of `holders` into this node's store, checked.
    fn fetch(&self, peers: &dyn Peers, hash: &ContentHash, holders: &[Holder]) -> bool {
        let Some(tree) = &self.tree else { return false };
        if self.peer_cut {
            return false;
        }
        for h in holders {
            if h.node == self.id {
                continue;
            }
            if peers.stalls(&h.node) {
                // The pull waits out the stall timeout, then tries the next holder.
                self.env.clock_ns.fetch_add(STALL.as_nanos() as i64, Ordering::Relaxed);
                self.stalled_pulls.set(self.stalled_pulls.get() + 1);
                continue;
            }
            if let Some(bytes) = peers.serve(&h.node, hash) {
                if fs_node::store::hash_of(&bytes) != *hash {
                    continue;
                }
                return fs_node::store::put_bytes(tree.store(), &bytes).is_ok();
            }
        }
        false
    }

    /// Virtual time passed since the clock read `before` (ns).
    fn time_since(&self, before: i64) -> Duration {
        Duration::from_nanos((self.env.clock_ns.load(Ordering::Relaxed) - before).max(0) as u64)
    }

    /// The bytes of `hash`, when this node can serve it.
    pub fn serve(&self, hash: &ContentHash) -> Option<Vec<u8>> {
        let tree = self.tree.as_ref()?;
        if self.peer_cut || self.stalls || !tree.store().has(hash) {
            return None;
        }
        tree.store().read_whole(hash).ok()
    }

    /// Takes one message from the node's queue: pulls what it needs, hands it to the
    /// engine, acks it. `crash_before_ack`: the process dies after applying it.
    /// Returns what it took, if anything.
    pub fn deliver_one(&mut self, broker: &mut Broker, peers: &dyn Peers, now: Duration, crash_before_ack: bool) -> anyhow::Result<Option<String>> {
        if self.engine.is_none() {
            return Ok(None);
        }
        let Some(m) = broker.nodes.get_mut(&self.id).and_then(|q| q.deliver()) else { return Ok(None) };
        let env = Envelope::<ToNode>::decode(&m.body).map_err(|e| anyhow::anyhow!("node {} got an undecodable message: {e}", self.id))?;
        let what = crate::describe::to_node(&env.body, m.redelivered);
        let tree = self.tree.clone().expect("connected means up");
        let before = self.env.clock_ns.load(Ordering::Relaxed);
        for fs_node::engine::Wanted { hash, holders, .. } in fs_node::engine::wanted_contents(&tree, &self.id, &env.body) {
            self.fetch(peers, &hash, &holders);
        }
        // The message reaches the engine once its pulls are done (frozen holders take
        // their time).
        let now = now + self.time_since(before);
        let engine = self.engine.as_mut().expect("checked");
        let actions = match engine.on_message(env, now) {
            Ok(actions) => actions,
            Err(e) => return Ok(Some(format!("{what}, but {}", self.engine_failed(broker, e)))),
        };
        self.carry_out(actions, broker);
        if crash_before_ack {
            self.crash(broker);
            return Ok(Some(what));
        }
        if let Some(q) = broker.nodes.get_mut(&self.id) {
            q.ack_all();
        }
        Ok(Some(what))
    }

    /// The outbox grew: the engine publishes it.
    pub fn outbox_ready(&mut self, broker: &mut Broker, now: Duration) {
        if let Some(e) = self.engine.as_mut() {
            let actions = e.on_outbox_ready(now);
            self.carry_out(actions, broker);
        }
    }

    /// One second passed: heartbeat, retries due, background pulls finish.
    pub fn tick(&mut self, broker: &mut Broker, peers: &dyn Peers, now: Duration) -> anyhow::Result<()> {
        // The node's periodic GC (`fs_node::node`, every 60 s): it also commits again the
        // files whose last close could not commit them (a disk fault), after queuing what
        // large renames left to queue.
        if now.as_secs().is_multiple_of(60) {
            if let Some(tree) = &self.tree {
                tree.expand_moves_or_warn();
                tree.gc();
                if let Some(e) = self.engine.as_mut() {
                    let actions = e.on_outbox_ready(now);
                    self.carry_out(actions, broker);
                }
            }
        }
        // Reconnect after a failed session (a partition heals by itself elsewhere).
        if self.engine.is_none() && self.is_up() && !self.partitioned {
            self.connect(broker, now);
        }
        let Some(e) = self.engine.as_mut() else { return Ok(()) };
        let mut actions = e.on_heartbeat(self.pulls.len() as u64, None, now);
        actions.extend(e.on_retry_tick(now));
        self.carry_out(actions, broker);
        for p in std::mem::take(&mut self.pulls) {
            let before = self.env.clock_ns.load(Ordering::Relaxed);
            let ok = self.fetch(peers, &p.hash, &p.holders);
            let now = now + self.time_since(before);
            let Some(e) = self.engine.as_mut() else { break };
            match e.pull_finished(&p.path, p.rev, ok, now) {
                Ok(actions) => self.carry_out(actions, broker),
                Err(e) => {
                    self.engine_failed(broker, e);
                    break;
                }
            }
        }
        Ok(())
    }

    /// Asks for a sync, as `syncctl sync` does.
    pub fn request_sync(&mut self, broker: &mut Broker, now: Duration) {
        if let Some(e) = self.engine.as_mut() {
            let actions = e.on_sync_requested(Some(()), now);
            self.carry_out(actions, broker);
        }
    }
}

// ---- file operations, as the FUSE layer sends them ------------------------------------

/// The inode of `path` and its parent's, when it exists.
pub fn resolve(tree: &Tree, path: &RelPath) -> Option<(u64, u64)> {
    let mut parent = ROOT;
    let mut ino = ROOT;
    for name in path.as_str().split('/') {
        parent = ino;
        ino = tree.lookup(ino, OsStr::new(name)).ok()?.ino;
    }
    Some((parent, ino))
}

/// The inode of `path`'s parent directory, when it exists.
pub fn parent_of(tree: &Tree, path: &RelPath) -> Option<u64> {
    match path.parent() {
        None => Some(ROOT),
        Some(p) => resolve(tree, &p).map(|(_, ino)| ino),
    }
}

/// The whole content of a file, read through a handle.
pub fn read_file(tree: &Tree, ino: u64) -> FsResult<Vec<u8>> {
    let size = tree.getattr(ino)?.size;
    let (fh, _) = tree.open(ino, false, false, false)?;
    let r = tree.read(fh, 0, size as u32);
    tree.release(fh)?;
    r
}

/// What a user sees at one path: kind, permission bits, and content (bytes of a file,
/// target of a symlink).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub kind: Kind,
    pub perm: u32,
    /// The owner (changed by `Config::chowns_elsewhere` only).
    pub uid: u32,
    pub content: Option<ContentHash>,
    pub target: Option<Vec<u8>>,
    /// A file's mtime (synced for files only), nanoseconds since the epoch.
    pub mtime: Option<i64>,
}

/// Every path of the tree with what a user sees there; a file whose bytes cannot be read
/// shows as an error.
pub fn snapshot(tree: &Tree) -> Result<BTreeMap<String, Seen>, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(ROOT, String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let entries = tree.readdir(dir, 0).map_err(|e| format!("readdir {prefix:?}: {e}"))?;
        for (ino, _, kind, name) in entries {
            let name = name.to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            let path = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            let attr = tree.getattr(ino).map_err(|e| format!("getattr {path}: {e}"))?;
            let mut seen = Seen { kind, perm: attr.perm & 0o7777, uid: attr.uid, content: None, target: None, mtime: None };
            match kind {
                Kind::Dir => stack.push((ino, path.clone())),
                Kind::File => {
                    let bytes = read_file(tree, ino).map_err(|e| format!("reading {path}: {e}"))?;
                    seen.content = Some(fs_node::store::hash_of(&bytes));
                    seen.mtime = Some(attr.mtime);
                }
                Kind::Symlink => seen.target = Some(tree.readlink(ino).map_err(|e| format!("readlink {path}: {e}"))?),
                _ => {}
            }
            out.insert(path, seen);
        }
    }
    Ok(out)
}

/// The directories of the tree that hold something, outermost first.
pub fn dirs_holding_entries(tree: &Tree) -> Vec<RelPath> {
    let mut out = Vec::new();
    let mut stack: Vec<(u64, Option<RelPath>)> = vec![(ROOT, None)];
    while let Some((dir, path)) = stack.pop() {
        let Ok(entries) = tree.readdir(dir, 0) else { continue };
        let mut holds = false;
        for (ino, _, kind, name) in entries {
            let Some(name) = name.to_str().filter(|n| *n != "." && *n != "..") else { continue };
            holds = true;
            if kind == Kind::Dir {
                let child = match &path {
                    Some(p) => p.join(name),
                    None => RelPath::new(name),
                };
                stack.extend(child.ok().map(|c| (ino, Some(c))));
            }
        }
        if let (true, Some(p)) = (holds, path) {
            out.push(p);
        }
    }
    out
}

/// How a write changes a file.
#[derive(Clone, Copy, Debug)]
pub enum WriteHow {
    /// Open with O_TRUNC and write.
    Overwrite,
    /// Write at the end.
    Append,
    /// Write in the middle, keeping the rest.
    Patch,
}

/// Writes `bytes` to `path` (creating it when missing) and closes it; returns the inode.
pub fn write_file(tree: &Tree, path: &RelPath, how: WriteHow, bytes: &[u8]) -> FsResult<u64> {
    let (ino, fh) = open_writer(tree, path, matches!(how, WriteHow::Overwrite))?;
    let r = write_with(tree, ino, fh, how, bytes);
    tree.release(fh)?;
    r.map(|_| ino)
}

/// Opens `path` for writing, creating it when missing.
pub fn open_writer(tree: &Tree, path: &RelPath, truncate: bool) -> FsResult<(u64, u64)> {
    match resolve(tree, path) {
        Some((_, ino)) => {
            let (fh, _) = tree.open(ino, true, truncate, false)?;
            Ok((ino, fh))
        }
        None => {
            let parent = parent_of(tree, path).ok_or(FsError::NotFound)?;
            let (attr, fh) = tree.create(parent, OsStr::new(path.name()), 0o644, 0, 0, CreateOpen::NEW)?;
            Ok((attr.ino, fh))
        }
    }
}

pub fn write_with(tree: &Tree, ino: u64, fh: u64, how: WriteHow, bytes: &[u8]) -> FsResult<()> {
    let size = tree.getattr(ino)?.size;
    let offset = match how {
        WriteHow::Overwrite => 0,
        WriteHow::Append => size,
        WriteHow::Patch => size / 2,
    };
    tree.write(fh, offset, bytes)?;
    Ok(())
}

pub fn truncate(tree: &Tree, path: &RelPath, size: u64) -> FsResult<()> {
    let (_, ino) = resolve(tree, path).ok_or(FsError::NotFound)?;
    tree.setattr(ino, 0, SetAttr { size: Some(size), ..Default::default() })?;
    Ok(())
}

/// `chmod`; returns whether the mode was another before (a chmod to the mode a file
/// already shows changes nothing its user could lose).
pub fn chmod(tree: &Tree, path: &RelPath, mode: u32) -> FsResult<bool> {
    let (_, ino) = resolve(tree, path).ok_or(FsError::NotFound)?;
    let before = tree.getattr(ino)?.perm & 0o7777;
    tree.setattr(ino, 0, SetAttr { mode: Some(mode), ..Default::default() })?;
    Ok(before != mode & 0o7777)
}

/// `chown`; returns whether the owner was another before.
pub fn chown(tree: &Tree, path: &RelPath, uid: u32) -> FsResult<bool> {
    let (_, ino) = resolve(tree, path).ok_or(FsError::NotFound)?;
    let before = tree.getattr(ino)?.uid;
    tree.setattr(ino, 0, SetAttr { uid: Some(uid), ..Default::default() })?;
    Ok(before != uid)
}

/// `touch -d`: sets the mtime (and atime) of `path` to `at_ns`.
pub fn touch(tree: &Tree, path: &RelPath, at_ns: i64) -> FsResult<()> {
    let (_, ino) = resolve(tree, path).ok_or(FsError::NotFound)?;
    tree.setattr(ino, 0, SetAttr { atime: Some(SetTime::At(at_ns)), mtime: Some(SetTime::At(at_ns)), ..Default::default() })?;
    Ok(())
}

pub fn mkdir(tree: &Tree, path: &RelPath) -> FsResult<()> {
    let parent = parent_of(tree, path).ok_or(FsError::NotFound)?;
    tree.mkdir(parent, OsStr::new(path.name()), 0o755, 0, 0)?;
    Ok(())
}

pub fn symlink(tree: &Tree, path: &RelPath, target: &str) -> FsResult<()> {
    let parent = parent_of(tree, path).ok_or(FsError::NotFound)?;
    tree.symlink(parent, OsStr::new(path.name()), target.as_bytes(), 0, 0)?;
    Ok(())
}

pub fn unlink(tree: &Tree, path: &RelPath) -> FsResult<()> {
    let parent = parent_of(tree, path).ok_or(FsError::NotFound)?;
    tree.unlink(parent, OsStr::new(path.name()))
}

pub fn rmdir(tree: &Tree, path: &RelPath) -> FsResult<()> {
    let parent = parent_of(tree, path).ok_or(FsError::NotFound)?;
    tree.rmdir(parent, OsStr::new(path.name()))
}

pub fn rename(tree: &Tree, from: &RelPath, to: &RelPath) -> FsResult<()> {
    let p1 = parent_of(tree, from).ok_or(FsError::NotFound)?;
    let p2 = parent_of(tree, to).ok_or(FsError::NotFound)?;
    tree.rename(p1, OsStr::new(from.name()), p2, OsStr::new(to.name()), false)
}

/// `rm -rf path`: children first.
pub fn remove_all(tree: &Tree, path: &RelPath) -> FsResult<()> {
    let (_, ino) = resolve(tree, path).ok_or(FsError::NotFound)?;
    if tree.getattr(ino)?.kind == Kind::Dir {
        for (_, _, _, name) in tree.readdir(ino, 2)? {
            let child = path.join(&name.to_string_lossy()).map_err(|_| FsError::NotFound)?;
            remove_all(tree, &child)?;
        }
        rmdir(tree, path)
    } else {
        unlink(tree, path)
    }
}
