//! Renames of large directories, recorded in parts.
//!
//! For the manager, a rename of a directory is a put of each path below its new name
//! and a delete of each below its old one (docs/protocol.md). Queuing them costs about
//! 6 µs each under the tree's lock: for a directory of 300,000 files, the whole mount
//! was held for seconds. A rename of a directory with more than
//! [`Tree::set_move_in_one_hold`] entries below it (default [`MOVE_IN_ONE_HOLD`]) is
//! therefore one short transaction that changes the namespace, queues the put of the
//! directory itself and records a *pending move*; [`Tree::expand_moves`] then queues the
//! puts of what is below the new name, and after them the deletes of the old paths,
//! [`MOVE_PART`] to a transaction, letting go of the lock between them. The node runs
//! it on a task of its own, woken by such a rename ([`Tree::moves_ready`]) and at start,
//! and at each GC should a pass have failed.
//!
//! This module owns `State::moves`. Each pending move is also in the node database
//! (its old path, the moved inode and the node's last revision then, in the meta table,
//! written in the rename's own transaction), so a move a crash cut short is finished
//! after the next start; the old paths are then those the manager or the outbox knows
//! below the old name, and an entry below the new name is put again unless its path
//! has a revision taken since the rename (the manager has it; a put based on that
//! revision could undo another node's change made since).
//!
//! Invariants:
//! - Every entry below a moved directory gets its put (or is changed again by the user,
//!   which queues its own), and every old path gets its delete unless something is
//!   there again; deletes go children first, and a move's puts before its deletes
//!   (unless a change near the old paths needs the deletes first, below).
//! - A local change queued meanwhile never reaches the manager before what it depends
//!   on (`State::before_change_near_moves`): a change below the moved directory comes
//!   after the puts of the directories above it, and a change at or above old paths
//!   (a file made where the moved directory was, the removal of its old parent) after
//!   the deletes of the old paths at or below it (`State::delete_old_paths_near`). A
//!   directory made or changed there needs none of them: it is put over the manager's
//!   directory, which keeps the old paths below it until their deletes come in parts
//!   (`mv d d.old && mkdir d` queues no delete in the mkdir's hold). The manager never
//!   sees a child without its parent, nor a directory replaced by a file or removed
//!   while it still holds old paths.
//! - The manager's state of a path at or above old paths is applied only once their
//!   deletes are queued, as after a rename in one transaction: what is applied there
//!   meets them as it would have then (a directory made again for an entry below it,
//!   say, is not taken for the user's). So for a decision of the node's own put there,
//!   unless it is a directory's put over the directory the node has there.
//! - The moves are queued in the order they were made: a move's puts onto the old
//!   paths of an earlier one (`mv a a.old && mv b a`) come after that one's deletes,
//!   and an old path that a later move lists too (`mv a a.old && mkdir a && touch a/x
//!   && mv a b`) is deleted by the later move, after what it held then. An old path
//!   that a later move's entry took before the node's own change there was decided
//!   gets no delete (something is there): once that change is decided, the entry is
//!   put over it at once, based on the decision, as a rename in one hold would have
//!   followed the change (`State::move_put_waiting_at`); with several such changes,
//!   on the last one's decision (the revision an earlier one's decision gave the path
//!   is of what was there before the move, no sign of a put of the entry).
//! - Until a move's puts are queued, a delete or a replacement from the manager does
//!   not remove an entry below the moved directory whose put is not queued yet, nor a
//!   directory holding one (`State::move_below`): it is a local change, like a queued
//!   one. (A change of its mode or times is taken: its put then carries it.)
//! - A file of several links is put at each of its paths below the moved directory.

use super::*;
use serde::{Deserialize, Serialize};

/// Entries below a renamed directory up to which its rename queues every change in its
/// own transaction (about 6 ms under the lock).
pub const MOVE_IN_ONE_HOLD: usize = 1_024;

/// Changes of a pending move queued per transaction (about 6 ms under the lock).
pub const MOVE_PART: usize = 1_024;

/// The meta table's key of the pending moves.
const MOVES_KEY: &str = "pending_moves";

/// A rename of a large directory whose changes are being queued (see the module doc).
pub(super) struct PendingMove {
    id: u64,
    /// The directory's old path.
    from: RelPath,
    /// The moved directory.
    ino: u64,
    /// The old paths to delete, in the order of their components (`cmp_components`: a
    /// directory right before what it held, so a range holds a subtree and the deletes
    /// go from the end, children first); those from `left` on are done, and so are
    /// those at `flushed`, whose deletes a change near them queued early.
    old_paths: Vec<RelPath>,
    left: usize,
    flushed: HashSet<usize>,
    /// The entries below `ino` whose put the move queued (directories and files of one
    /// link: a file of several is put at each of its paths).
    put: HashSet<u64>,
    puts_done: bool,
    /// The last revision the node had taken at the rename: a path below the new name
    /// whose revision is later was put since (or changed by another node and taken),
    /// and the manager has what the node has there (`State::move_has_put`).
    since_rev: u64,
    /// The outbox seq of the first change queued after the rename. A change queued
    /// before, decided since, was of what its path held then, not of the entry the move
    /// brought there: its revision says nothing of that entry (`move_put_waiting_at`).
    first_seq: i64,
}

/// What the database keeps of a pending move.
#[derive(Serialize, Deserialize)]
struct MoveRecord {
    id: u64,
    from: RelPath,
    ino: u64,
    #[serde(default)]
    since_rev: u64,
    #[serde(default)]
    first_seq: i64,
}

impl State {
    /// Whether a rename of `ino` (a directory) is queued in parts: it has more than
    /// `limit` entries below it, an old path (`None`: a name that is not UTF-8, which
    /// the manager never had) and no ignore rules file of its own (the rules must move
    /// with the paths they rule, in one step).
    pub(super) fn move_in_parts(&self, ino: u64, from: Option<&RelPath>, limit: usize) -> bool {
        from.is_some_and(|p| !self.ignore.has_rules_within(p.as_str())) && self.count_below(ino, limit + 1) > limit
    }

    /// How many entries are below directory `dir`, counting no further than `stop`.
    fn count_below(&self, dir: u64, stop: usize) -> usize {
        let mut n = 0;
        let mut dirs = vec![dir];
        while let Some(d) = dirs.pop() {
            let Some(i) = self.inodes.get(&d) else { continue };
            for e in i.children.values() {
                n += 1;
                if n >= stop {
                    return n;
                }
                if e.kind == Kind::Dir {
                    dirs.push(e.ino);
                }
            }
        }
        n
    }

    /// Records, in the rename's transaction, that directory `ino`, now at its new place
    /// with its own put queued, moved from `from`, whose synced paths were `old_paths`
    /// (outermost first).
    pub(super) fn start_move(&mut self, from: RelPath, ino: u64, old_paths: Vec<RelPath>) -> FsResult<()> {
        self.last_move = self.last_move.max(self.moves.iter().map(|m| m.id).max().unwrap_or(0)) + 1;
        let id = self.last_move;
        let left = old_paths.len();
        debug_assert!(old_paths.windows(2).all(|w| cmp_components(&w[0], &w[1]).is_lt()), "a subtree's paths come in the order of their components");
        tracing::info!(from = %from, entries = left, "a large directory renamed: its changes are queued in parts");
        let (since_rev, first_seq) = (self.last_rev, self.outbox.next_seq());
        self.moves.push(PendingMove {
            id,
            from,
            ino,
            old_paths,
            left,
            flushed: HashSet::new(),
            put: HashSet::from([ino]),
            puts_done: false,
            since_rev,
            first_seq,
        });
        self.record(|| Undo::Move(MoveUndo::Started(id)));
        self.save_moves()
    }

    /// Writes the pending moves to the database (in the open transaction).
    fn save_moves(&self) -> FsResult<()> {
        let records: Vec<MoveRecord> =
            self.moves.iter().map(|m| MoveRecord { id: m.id, from: m.from.clone(), ino: m.ino, since_rev: m.since_rev, first_seq: m.first_seq }).collect();
        let json = serde_json::to_string(&records).map_err(|e| FsError::Io(e.into()))?;
        self.db.set_meta(MOVES_KEY, &json)?;
        Ok(())
    }

    /// The pending moves the database holds (at load, with `revs` and the outbox loaded):
    /// their old paths are those the manager or the outbox knows below the old name.
    pub(super) fn load_moves(&mut self) -> anyhow::Result<()> {
        let Some(json) = self.db.meta(MOVES_KEY)? else { return Ok(()) };
        let records: Vec<MoveRecord> = serde_json::from_str(&json).map_err(|e| anyhow::anyhow!("the pending moves in the node database: {e}"))?;
        for r in records {
            let mut old_paths: Vec<RelPath> = self.revs.keys().filter(|p| p.is_within(&r.from)).cloned().chain(self.outbox.paths_within(&r.from)).collect();
            old_paths.sort_unstable_by(cmp_components);
            old_paths.dedup();
            let puts_done = self.inodes.get(&r.ino).is_none_or(|i| i.kind != Kind::Dir);
            tracing::info!(from = %r.from, old_paths = old_paths.len(), "finishing the queuing of a large rename cut short");
            self.last_move = self.last_move.max(r.id);
            let left = old_paths.len();
            let since_rev = r.since_rev;
            // (Seqs start again after a restart with an empty outbox: the changes
            // queued from now on must still come after the move's.)
            self.outbox.seqs_from(r.first_seq);
            self.moves.push(PendingMove {
                id: r.id,
                from: r.from,
                ino: r.ino,
                old_paths,
                left,
                flushed: HashSet::new(),
                put: HashSet::new(),
                puts_done,
                since_rev,
                first_seq: r.first_seq,
            });
        }
        Ok(())
    }

    /// Runs `f`, which queues a pending move's own changes (`before_change_near_moves`
    /// leaves them alone).
    fn queuing_move<T>(&mut self, f: impl FnOnce(&mut State) -> FsResult<T>) -> FsResult<T> {
        self.queuing_move = true;
        let r = f(self);
        self.queuing_move = false;
        r
    }

    /// Before a local change of `path` is queued while moves are pending: queues first
    /// what the manager needs before it (see the module's invariants): the puts of the
    /// moved directories above `path` not queued yet, and, near an old path, the deletes
    /// of the old paths (`delete_old_paths_near`).
    pub(super) fn before_change_near_moves(&mut self, path: &RelPath) -> FsResult<()> {
        if self.queuing_move || self.moves.is_empty() {
            return Ok(());
        }
        if let Some((_, _, dir)) = path.parent().and_then(|p| self.resolve(&p)) {
            let entry = self.resolve(path).map(|(_, _, ino)| ino);
            self.queuing_move(|st| st.put_moved_dirs_from(dir, entry))?;
        }
        self.delete_old_paths_near(path, true, self.dir_at(path))?;
        Ok(())
    }

    /// The puts of the directories from a moved directory down to `dir`, outermost
    /// first, that their move has not queued yet; `entry`, below `dir`, is noted as put
    /// (the change about to be queued is its own, of what it is now).
    fn put_moved_dirs_from(&mut self, dir: u64, entry: Option<u64>) -> FsResult<()> {
        for at in 0..self.moves.len() {
            let (id, top) = (self.moves[at].id, self.moves[at].ino);
            if self.moves[at].puts_done || !self.dir_within(dir, top) {
                continue;
            }
            let mut chain = Vec::new();
            let mut d = dir;
            while d != top {
                let Some((parent, name)) = self.inodes.get(&d).and_then(|i| i.links.first()).cloned() else { break };
                if !self.moves[at].put.contains(&d) {
                    chain.push((parent, name, d));
                }
                d = parent;
            }
            for (parent, name, d) in chain.into_iter().rev() {
                self.record_put(parent, &name, d)?;
                self.note_move_put(id, d);
            }
            if let Some(ino) = entry {
                self.note_move_put(id, ino);
            }
        }
        Ok(())
    }

    /// Notes that entry `ino`'s put is queued, for move `id` (not for a file of several
    /// links: its put at one path is not its put at the others).
    fn note_move_put(&mut self, id: u64, ino: u64) {
        if self.inodes.get(&ino).is_some_and(|i| i.kind != Kind::Dir && i.nlink > 1) {
            return;
        }
        if let Some(m) = self.pending_move(id) {
            if m.put.insert(ino) {
                self.record(|| Undo::Move(MoveUndo::Put(id, ino)));
            }
        }
    }

    /// When old paths of pending moves are at or below `path`: their deletes, queued now
    /// (children first, across moves), as a rename in one transaction would have queued
    /// them before a change there. Returns whether it queued any.
    ///
    /// `dir_there`: after the change, `path` is a directory for the manager (a directory
    /// made where an old one was, a chmod of a directory above the old paths). Then
    /// nothing is queued: the manager takes a directory put over what it has there (a
    /// directory, whose old paths below then keep coming in parts, or a file) when it is
    /// based on its revision. So `mv d d.old && mkdir d` does not queue every delete of
    /// `d.old`'s old paths in the mkdir's hold. (A delete of the old path itself, queued
    /// first, would even go after the puts of what the node made below it since: the
    /// directory's unsent put it replaces would be taken out of its place.)
    ///
    /// `made_here`: `path` is changed by a local operation, which may have just made
    /// something there; if it is an old path, its delete goes first all the same (the
    /// operation's own change then replaces it, after the deletes below it, as after a
    /// rename in one transaction).
    pub(super) fn delete_old_paths_near(&mut self, path: &RelPath, made_here: bool, dir_there: bool) -> FsResult<bool> {
        if dir_there {
            return Ok(false);
        }
        // (the move's index, the old path's index)
        let mut due: Vec<(usize, usize)> = Vec::new();
        // The moves whose every old path left is due.
        let mut all_due = Vec::new();
        for (at, m) in self.moves.iter().enumerate() {
            let within = old_paths_within(m, path);
            let whole = within.start == 0 && within.end == m.left;
            let undone = within.filter(|i| !m.flushed.contains(i));
            let before = due.len();
            due.extend(undone.map(|i| (at, i)));
            if whole && due.len() > before {
                all_due.push(at);
            }
        }
        if due.is_empty() {
            return Ok(false);
        }
        let depth = |p: &RelPath| p.as_str().bytes().filter(|b| *b == b'/').count();
        due.sort_by_key(|&(at, i)| std::cmp::Reverse((depth(&self.moves[at].old_paths[i]), i)));
        for &(at, i) in &due {
            let p = self.moves[at].old_paths[i].clone();
            let made = made_here && p == *path && !self.outbox.deletes_last(&p);
            if made || self.old_path_to_delete(&p) {
                self.queuing_move(|st| st.record_delete(p))?;
            }
        }
        for at in 0..self.moves.len() {
            let mine: Vec<usize> = due.iter().filter(|(a, _)| *a == at).map(|(_, i)| *i).collect();
            if mine.is_empty() {
                continue;
            }
            let m = &mut self.moves[at];
            let (id, left) = (m.id, m.left);
            if all_due.contains(&at) {
                // Every old path left: the move has no deletes to queue in parts.
                m.left = 0;
                self.record(|| Undo::Move(MoveUndo::Left(id, left)));
            } else {
                m.flushed.extend(mine.iter().copied());
                self.record(|| Undo::Move(MoveUndo::Flushed(id, mine)));
            }
        }
        Ok(true)
    }

    /// The outermost old name of a pending move (with deletes left) at or above `path`,
    /// or `path` itself if there is none.
    pub(super) fn outermost_old_name_above(&self, path: &RelPath) -> RelPath {
        let above = self.moves.iter().filter(|m| m.left > 0 && path.is_within(&m.from)).map(|m| &m.from);
        above.min_by_key(|from| from.as_str().len()).unwrap_or(path).clone()
    }

    /// Whether a directory is at `path` here.
    pub(super) fn dir_at(&self, path: &RelPath) -> bool {
        self.resolve(path).is_some_and(|(_, _, ino)| self.inodes.get(&ino).is_some_and(|i| i.kind == Kind::Dir))
    }

    /// Whether a move's old path gets a delete: nothing is there now, and no delete of
    /// it is queued already (one from before a crash: the old paths of a move finished
    /// after a restart include those the outbox names).
    fn old_path_to_delete(&self, path: &RelPath) -> bool {
        self.resolve(path).is_none() && !self.outbox.deletes_last(path)
    }

    /// Whether directory `ino` is `top` or lies below it.
    fn dir_within(&self, mut ino: u64, top: u64) -> bool {
        loop {
            if ino == top {
                return true;
            }
            match self.inodes.get(&ino).and_then(|i| i.links.first()) {
                Some((parent, _)) if ino != ROOT => ino = *parent,
                _ => return false,
            }
        }
    }

    /// Whether move `m` has queued the put of entry `ino` at `path` (or the manager has
    /// had it from the node since: a revision taken after the rename).
    fn move_has_put(&self, m: &PendingMove, ino: u64, path: &RelPath) -> bool {
        m.put.contains(&ino) || self.revs.get(path).is_some_and(|r| r.0 > m.since_rev)
    }

    /// The entry at `path` if it lies below a pending move that has not queued its put
    /// yet (nor has a change of it queued otherwise): (its directory, its name, itself).
    /// `decided`: the seq of the node's change of `path` being decided. A change queued
    /// before the move was of what the path held then, and so was an earlier one whose
    /// decision set the path's revision: that revision is no sign of a put of the entry
    /// the move brought (seed 557683: the node's two touches of a file, decided after
    /// `mv d x/y && mv x d` brought a directory to the file's path, the first
    /// decision's revision taken for the directory's put, which then went out based on
    /// it: a conflict of the node with its own second touch).
    pub(super) fn move_put_waiting_at(&self, path: &RelPath, decided: i64) -> Option<(u64, OsString, u64)> {
        // (Asked at every decision: no path walk while no move waits.)
        if self.moves.iter().all(|m| m.puts_done) {
            return None;
        }
        let (parent, name, ino) = self.resolve(path)?;
        let has_put = |m: &PendingMove| if decided < m.first_seq { m.put.contains(&ino) } else { self.move_has_put(m, ino, path) };
        let waits = self.moves.iter().any(|m| !m.puts_done && self.dir_within(parent, m.ino) && !has_put(m));
        (waits && self.inodes.get(&ino).is_some_and(|i| i.kind.synced() && i.work.is_none())).then_some((parent, name, ino))
    }

    /// Whether `path` is a pending move's old path (its directory's old name or below it),
    /// here or not: its delete may still be queued, based on the revision it had.
    pub(super) fn old_path_of_a_move(&self, path: &RelPath) -> bool {
        self.moves.iter().any(|m| path.is_within(&m.from))
    }

    /// Whether `path` is, or holds, an entry below a moved directory whose put the move
    /// has not queued yet: what a delete or a replacement from the manager must keep.
    /// (Below a directory put early, for a change under it, a whole subtree may still
    /// wait for its puts: it is walked, here only.)
    pub(super) fn move_below(&self, path: &RelPath) -> bool {
        if self.moves.iter().all(|m| m.puts_done) {
            return false;
        }
        let Some((parent, _, ino)) = self.resolve(path) else { return false };
        self.moves.iter().filter(|m| !m.puts_done).any(|m| {
            let holds_the_move = self.dir_within(m.ino, ino);
            holds_the_move || (self.dir_within(parent, m.ino) && self.unput_within(m, ino, path))
        })
    }

    /// Whether entry `ino` at `path`, or anything below it, waits for move `m`'s put.
    fn unput_within(&self, m: &PendingMove, ino: u64, path: &RelPath) -> bool {
        let mut todo = vec![(ino, path.clone())];
        while let Some((ino, path)) = todo.pop() {
            if !self.move_has_put(m, ino, &path) {
                return true;
            }
            let Some(i) = self.inodes.get(&ino) else { continue };
            for (name, e) in &i.children {
                if let Some(p) = name.to_str().and_then(|n| path.join(n).ok()) {
                    todo.push((e.ino, p));
                }
            }
        }
        false
    }

    fn pending_move(&mut self, id: u64) -> Option<&mut PendingMove> {
        self.moves.iter_mut().find(|m| m.id == id)
    }

    /// Takes back a change of `moves` a failed transaction made.
    pub(super) fn undo_move(&mut self, u: MoveUndo) {
        match u {
            MoveUndo::Started(id) => self.moves.retain(|m| m.id != id),
            MoveUndo::Put(id, ino) => {
                if let Some(m) = self.pending_move(id) {
                    m.put.remove(&ino);
                }
            }
            MoveUndo::Left(id, left) => {
                if let Some(m) = self.pending_move(id) {
                    m.left = left;
                }
            }
            MoveUndo::Flushed(id, paths) => {
                if let Some(m) = self.pending_move(id) {
                    for i in paths {
                        m.flushed.remove(&i);
                    }
                }
            }
            MoveUndo::Ended(m) => self.moves.push(*m),
        }
    }
}

/// A change of `State::moves` to undo (`Undo::Move`).
pub(super) enum MoveUndo {
    Started(u64),
    Put(u64, u64),
    Left(u64, usize),
    Flushed(u64, Vec<usize>),
    Ended(Box<PendingMove>),
}

impl PendingMove {
    /// Whether `path` is one of the old paths whose delete this move has yet to queue.
    fn lists_undone(&self, path: &RelPath) -> bool {
        let within = old_paths_within(self, path);
        !within.is_empty() && self.old_paths[within.start] == *path && !self.flushed.contains(&within.start)
    }
}

/// Paths compared component by component ('/' below every byte of a name): a
/// directory's path comes right before the paths below it, and these right after it.
fn cmp_components(a: &RelPath, b: &RelPath) -> std::cmp::Ordering {
    fn key(p: &RelPath) -> impl Iterator<Item = u8> + '_ {
        p.as_str().bytes().map(|c| if c == b'/' { 0 } else { c })
    }
    key(a).cmp(key(b))
}

/// The indexes of move `m`'s old paths not done yet that are at or below `path` (a
/// range: they are in the order of their components).
fn old_paths_within(m: &PendingMove, path: &RelPath) -> std::ops::Range<usize> {
    let paths = &m.old_paths[..m.left];
    let from = paths.partition_point(|q| cmp_components(q, path).is_lt());
    from..from + paths[from..].partition_point(|q| q.is_within(path))
}

impl Tree {
    /// Renames of directories with more than `n` entries below them are queued in parts
    /// (see the module doc; tests and the simulator make it small).
    pub fn set_move_in_one_hold(&self, n: usize) {
        self.lock().move_in_one_hold = n;
    }

    /// Whether a rename's changes wait to be queued ([`Tree::expand_moves`]).
    pub fn has_pending_moves(&self) -> bool {
        !self.lock().moves.is_empty()
    }

    /// Queues the changes of every pending move, [`MOVE_PART`] to a transaction; returns
    /// how many it queued. One caller at a time; another waits for it, then finds
    /// nothing left. On an error the move stays pending, to be finished by the next call.
    pub fn expand_moves(&self) -> FsResult<usize> {
        let _one_at_a_time = self.expanding.lock().unwrap_or_else(|p| p.into_inner());
        let mut queued = 0;
        loop {
            let Some((id, ino, puts_done)) = self.lock().moves.first().map(|m| (m.id, m.ino, m.puts_done)) else { return Ok(queued) };
            if !puts_done {
                queued += self.queue_move_puts(id, ino)?;
                if let Some(m) = self.lock().pending_move(id) {
                    m.puts_done = true;
                    m.put = HashSet::new();
                }
            }
            queued += self.queue_move_deletes(id)?;
            self.atomically(|st, _| {
                let Some(at) = st.moves.iter().position(|m| m.id == id) else { return Ok(()) };
                let m = st.moves.remove(at);
                st.record(|| Undo::Move(MoveUndo::Ended(Box::new(m))));
                st.save_moves()
            })?;
        }
    }

    /// [`Tree::expand_moves`] for callers that do not wait for it (the node's task for
    /// it, its GC): an error is logged, and the move stays pending for the next call (at
    /// the latest the next GC).
    pub fn expand_moves_or_warn(&self) {
        if self.has_pending_moves() {
            if let Err(e) = self.expand_moves() {
                tracing::warn!("queuing the changes of a large rename: {e}; the rest is queued at the next GC");
            }
        }
    }

    /// The puts of the first pending move, alone (tests: a crash between a move's puts
    /// and its deletes).
    #[cfg(test)]
    pub(super) fn queue_first_move_puts_for_test(&self) {
        let (id, ino) = self.lock().moves.first().map(|m| (m.id, m.ino)).expect("a pending move");
        self.queue_move_puts(id, ino).unwrap();
        self.lock().pending_move(id).expect("still pending").puts_done = true;
    }

    /// Before a part of a move: lets the node database's fold under way end first if
    /// the appends outpace it (`Db::fold_behind`). Hundreds of thousands of changes
    /// queued as fast as they go would otherwise make the next transaction wait for
    /// the fold under the tree's lock: a user's, as likely as the move's.
    fn let_folds_catch_up(&self) {
        let behind = self.lock().db.fold_behind();
        if let Some(fold) = behind {
            fold.wait(std::time::Duration::from_secs(30));
        }
    }

    /// The puts of move `id`: each synced entry below `top` not put yet, outermost
    /// first.
    fn queue_move_puts(&self, id: u64, top: u64) -> FsResult<usize> {
        // (Not skipped for a queued change of its path: that may be from before the
        // rename, of what was there then. A change queued since is the entry's own, and
        // `before_change_near_moves` noted it as put.)
        let wanted = |st: &State, dir: u64, name: &OsStr, ino: u64| {
            let Some(i) = st.inodes.get(&ino).filter(|i| i.kind.synced() && i.work.is_none()) else { return false };
            let here = st.inodes.get(&dir).and_then(|d| d.children.get(name)).is_some_and(|e| e.ino == i.ino);
            let Some(m) = st.moves.iter().find(|m| m.id == id) else { return false };
            here && st.path_of(dir, name).is_some_and(|p| !st.move_has_put(m, ino, &p))
        };
        let mut queued = 0;
        self.walk_dirs_in_parts(
            top,
            MOVE_PART,
            |st, dir, entries| {
                let dirs = entries.iter().filter(|(_, e)| e.kind == Kind::Dir).map(|(_, e)| e.ino).collect();
                let to_put: Vec<(OsString, u64)> =
                    entries.iter().filter(|(name, e)| wanted(st, dir, name, e.ino)).map(|(name, e)| ((*name).clone(), e.ino)).collect();
                (dirs, to_put)
            },
            |dir, to_put| {
                if to_put.is_empty() {
                    return Ok(());
                }
                self.let_folds_catch_up();
                queued += self.atomically(|st, _| {
                    // A directory above that another move (of a directory above this
                    // one's, renamed since) has not put yet goes first.
                    st.queuing_move(|st| st.put_moved_dirs_from(dir, None))?;
                    let mut n = 0;
                    for (name, ino) in &to_put {
                        if wanted(st, dir, name, *ino) {
                            st.queuing_move(|st| st.record_put(dir, name, *ino))?;
                            st.note_move_put(id, *ino);
                            n += 1;
                        }
                    }
                    Ok(n)
                })?;
                Ok(())
            },
        )?;
        Ok(queued)
    }

    /// The deletes of move `id`: each old path nothing is at now, children first. An old
    /// path that a later move lists too (a directory made where this move's was, then
    /// renamed itself) is left to that move: it deletes it after what it held then.
    fn queue_move_deletes(&self, id: u64) -> FsResult<usize> {
        let mut queued = 0;
        loop {
            self.yield_to_waiters();
            self.let_folds_catch_up();
            let done = self.atomically(|st, _| {
                let Some(m) = st.moves.iter().find(|m| m.id == id) else { return Ok(None) };
                let left = m.left;
                if left == 0 {
                    return Ok(None);
                }
                let from = left.saturating_sub(MOVE_PART);
                let later: Vec<&PendingMove> = st.moves.iter().skip_while(|l| l.id != id).skip(1).collect();
                let part: Vec<RelPath> = (from..left)
                    .filter(|i| !m.flushed.contains(i))
                    .map(|i| m.old_paths[i].clone())
                    .filter(|p| !later.iter().any(|l| l.lists_undone(p)))
                    .collect();
                let mut n = 0;
                for path in part.into_iter().rev() {
                    if st.old_path_to_delete(&path) {
                        st.queuing_move(|st| st.record_delete(path))?;
                        n += 1;
                    }
                }
                if let Some(m) = st.pending_move(id) {
                    m.left = from;
                }
                st.record(|| Undo::Move(MoveUndo::Left(id, left)));
                Ok(Some(n))
            })?;
            match done {
                Some(n) => queued += n,
                None => return Ok(queued),
            }
        }
    }
}
