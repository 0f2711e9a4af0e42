//! The tree's broker side: what the sync engine asks of it (the outbox to send,
//! decisions and remote entries to apply, paths the manager does not know, the synced
//! head), and the blob GC.

use super::*;

/// How old an unused content must be before the GC removes it: a content downloaded a
/// moment ago may not be in the tree yet.
const GC_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(300);
/// How long a node keeps the content of its own version that the manager decided into a
/// conflict file the node has an older state of (`State::keep_own_content_at`): until
/// the conflict file's state comes, it is what other nodes pull it from.
const OWN_CONFLICT_KEEP_MS: i64 = 24 * 3600 * 1000;

/// A round under way (`State::rounds`): a pass that lists a part of the tree at a time
/// what uses which content (the GC's listing, `Tree::evict`'s check), and must know what
/// files and queued changes took meanwhile.
pub(super) struct UseRound {
    id: u64,
    /// The contents files and queued changes took since the round began listing.
    taken: HashSet<ContentHash>,
}

/// What a GC round found unused, for its removal (`Tree::gc_remove`).
pub(super) struct GcCandidates {
    round: u64,
    pub(super) hashes: HashSet<ContentHash>,
}

/// Whether an inode's content is in use. A removed file still known to the kernel (it
/// has not sent FORGET yet) but open nowhere can never be read again: its content is not
/// kept for it.
fn live_file(i: &Inode) -> bool {
    i.nlink > 0 || i.open > 0
}

/// The content a queued change puts, if it puts a file.
pub(super) fn queued_content(op: &ChangeOp) -> Option<&ContentHash> {
    match op {
        ChangeOp::Put { version: Version { content: Content::File { hash, .. }, .. } } => Some(hash),
        _ => None,
    }
}

/// Ends a round (`State::begin_round`) however the pass that began it ends, a panic
/// included: a round left open would note every content taken from then on, for good.
pub(super) struct RoundEnd<'a> {
    tree: &'a Tree,
    id: u64,
}

impl<'a> RoundEnd<'a> {
    pub(super) fn new(tree: &'a Tree, id: u64) -> RoundEnd<'a> {
        RoundEnd { tree, id }
    }

    /// The round goes on past this guard: another one ends it (the GC's two phases).
    pub(super) fn hand_on(self) -> u64 {
        let id = self.id;
        std::mem::forget(self);
        id
    }
}

impl Drop for RoundEnd<'_> {
    fn drop(&mut self) {
        // (A round ended already is not there: nothing happens.)
        self.tree.lock().end_round(self.id);
    }
}

impl State {
    /// A file or a queued change now uses `h`: a round under way (the GC's, `evict`'s,
    /// `release_kept`'s) must not drop it (called wherever an inode or an outbox row
    /// gets a content).
    pub(super) fn note_taken(&mut self, h: &ContentHash) {
        for r in &mut self.rounds {
            r.taken.insert(h.clone());
        }
    }

    /// Begins a round (`UseRound`); returns its id, for `end_round`.
    pub(super) fn begin_round(&mut self) -> u64 {
        self.last_round += 1;
        self.rounds.push(UseRound { id: self.last_round, taken: HashSet::new() });
        self.last_round
    }

    /// What files and queued changes took since round `id` began, so far.
    pub(super) fn taken_in_round(&self, id: u64) -> Option<&HashSet<ContentHash>> {
        self.rounds.iter().find(|r| r.id == id).map(|r| &r.taken)
    }

    /// Ends round `id`: what files and queued changes took since it began (`None`: no
    /// such round).
    pub(super) fn end_round(&mut self, id: u64) -> Option<HashSet<ContentHash>> {
        let at = self.rounds.iter().position(|r| r.id == id)?;
        Some(self.rounds.swap_remove(at).taken)
    }

    /// Inode `ino` may have just come back into use (an open or a link of a file that
    /// was removed, through a name the kernel still had): a round that listed it unused
    /// must spare its content.
    pub(super) fn note_in_use(&mut self, ino: u64) {
        if let Some(h) = (!self.rounds.is_empty()).then(|| self.inodes.get(&ino)).flatten().and_then(|i| i.hash.clone()) {
            self.note_taken(&h);
        }
    }
}

/// What a heartbeat says of a node's progress ([`Tree::progress_for_heartbeat`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatProgress {
    pub pending_changes: u64,
    pub taken: Revision,
    /// Whether the redo log was flushed to make this durable.
    pub flushed: bool,
    /// [`deletes_applied_upto`] as of a moment whose state is on disk; 0 when it was
    /// not (what was committed since the last flush is not vouched for).
    pub applied: Revision,
}

/// The revision up to which a node can vouch to the manager that it has applied every
/// delete (`ToManager::Sync::applied`, `Heartbeat::applied`), once what it holds is on
/// its disk: the head of its last completed sync, which it took whole, no further than
/// the highest revision it has taken (`taken`); 0 before any sync completed. (A node
/// that has taken no revision vouches for the whole head: it had no path to delete.)
pub fn deletes_applied_upto(synced_head: Option<u64>, taken: u64) -> Revision {
    match synced_head {
        Some(head) if taken == 0 => Revision(head),
        Some(head) => Revision(head.min(taken)),
        None => Revision(0),
    }
}

/// The paths a sync reply and the node's queue named while it came: what
/// [`Tree::push_unknown`] leaves alone. A sync holds every path of the tree here at once,
/// so each is kept as a 128-bit digest (BLAKE3's first 16 bytes), not as the path: about
/// 100 bytes a path became 16 and the set's own (at a million paths, about 75 MB less
/// for the length of the sync). Two paths taken for one another need two equal digests:
/// with n paths a chance of about n²/2¹²⁹ (10⁻²⁷ at a million).
#[derive(Debug, Default)]
pub struct NamedPaths(HashSet<u128>);

impl NamedPaths {
    fn digest(p: &RelPath) -> u128 {
        let h = blake3::hash(p.as_str().as_bytes());
        u128::from_le_bytes(h.as_bytes()[..16].try_into().expect("16 bytes"))
    }
    pub fn insert(&mut self, p: &RelPath) {
        self.0.insert(Self::digest(p));
    }
    pub fn contains(&self, p: &RelPath) -> bool {
        self.0.contains(&Self::digest(p))
    }
    /// Counts as named the paths `heard` holds at a revision above `head`, the revision
    /// the reply is as of. A state at or below it that the reply leaves out was no
    /// longer live then (deleted, or changed again by a message the queue dropped): it
    /// names nothing (simulator seed 99334, where such a state, kept as named, was
    /// pulled again after the reply and brought a deleted file back).
    pub fn add_heard_above(&mut self, heard: HeardPaths, head: Revision) {
        self.0.extend(heard.0.into_iter().filter(|&(_, rev)| rev > head.0).map(|(digest, _)| digest));
    }
}

/// The paths a node heard of on its queue while a sync reply came, each with the
/// highest revision heard (digests as in [`NamedPaths`]).
#[derive(Debug, Default)]
pub struct HeardPaths(HashMap<u128, u64>);

impl HeardPaths {
    pub fn insert(&mut self, p: &RelPath, rev: Revision) {
        let heard = self.0.entry(NamedPaths::digest(p)).or_default();
        *heard = (*heard).max(rev.0);
    }
}

impl<'a> FromIterator<&'a RelPath> for NamedPaths {
    fn from_iter<I: IntoIterator<Item = &'a RelPath>>(iter: I) -> Self {
        let mut named = NamedPaths::default();
        named.extend(iter);
        named
    }
}

impl<'a> Extend<&'a RelPath> for NamedPaths {
    fn extend<I: IntoIterator<Item = &'a RelPath>>(&mut self, iter: I) {
        self.0.extend(iter.into_iter().map(Self::digest));
    }
}

/// What [`Tree::push_unknown`] did with the local paths a sync reply did not name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushedUnknown {
    /// Sent to the manager as new.
    pub pushed: usize,
    /// Taken from the manager once, so held back (`hold_back_known`).
    pub held_back: usize,
    /// Of `pushed`, those this node had taken from the manager (`hold_back_known` off):
    /// a manager names every live path and every delete after the sync's `since`, so it
    /// lost these (its database brought back from an older copy), or a delete this node
    /// missed was left out (docs/sync.md, *Deleted paths in a sync reply*).
    pub taken_before: usize,
}

impl Tree {
    /// Outbox rows not yet handed to the broker link in this session, in order; marks
    /// them handed over. Taken `WALK_PART` rows per hold of the lock: while the link is
    /// busy (a sync's reply applied) a burst of writes queues hundreds of thousands.
    pub fn take_unpublished(&self) -> Vec<OutboxRow> {
        self.take_unpublished_in_parts(WALK_PART)
    }

    pub(super) fn take_unpublished_in_parts(&self, part: usize) -> Vec<OutboxRow> {
        let mut rows = Vec::new();
        loop {
            let mut st = self.lock();
            let taken: Vec<OutboxRow> = st.outbox.unpublished().take(part.max(1)).cloned().collect();
            if let Some(last) = taken.last() {
                st.outbox.published_upto = last.seq;
            }
            for r in &taken {
                st.outbox.sent.insert(r.msg.clone());
            }
            let more = st.outbox.unpublished().next().is_some() && taken.len() == part.max(1);
            drop(st);
            rows.extend(taken);
            if !more {
                return rows;
            }
            self.yield_to_waiters();
        }
    }

    /// The head of the last sync that completed on this node, kept in `node.db` across
    /// restarts (`link::Session::sync_since`).
    pub fn synced_head(&self) -> Option<u64> {
        self.lock().synced_head
    }
    pub fn set_synced_head(&self, head: u64) -> FsResult<()> {
        let mut st = self.lock();
        st.db.set_meta(SYNCED_HEAD_KEY, &head.to_string()).map_err(|e| FsError::Io(anyhow::Error::new(e).context("recording the synced head")))?;
        st.synced_head = Some(head);
        Ok(())
    }

    /// After a reconnection every undecided row is sent again (the manager recognises
    /// the ids it already decided).
    pub fn republish_all(&self) {
        let mut st = self.lock();
        let outbox = &mut st.outbox;
        outbox.published_upto = 0;
        let again: Vec<MessageId> = outbox.sent.iter().filter(|m| outbox.seq_of(m).is_some()).cloned().collect();
        outbox.resent.extend(again);
    }

    /// The manager's revision of `path` this node last took (0: none).
    pub fn revision_of(&self, path: &RelPath) -> Revision {
        self.lock().revs.get(path).copied().unwrap_or_default()
    }

    /// Whether at least `n` outbox rows wait to be handed to the broker link (counts no
    /// further than `n`).
    pub fn unpublished_at_least(&self, n: usize) -> bool {
        self.lock().outbox.unpublished().take(n).count() >= n
    }

    /// Local changes not decided yet: queued ones, and renames of large directories
    /// whose changes are still being queued (`moves.rs`).
    pub fn pending_changes(&self) -> u64 {
        let st = self.lock();
        (st.outbox.len() + st.moves.len()) as u64
    }

    /// What a heartbeat says of this node's progress: its undecided changes
    /// ([`Tree::pending_changes`]) and the highest revision it took. The manager forgets
    /// the records of a node's decided changes once that node said it had none undecided
    /// while it had taken a revision past them (docs/protocol.md, *Envelope*); a node that
    /// lost power with the removal of a decided change from its outbox still in the page
    /// cache would send that change again to a manager that no longer knows it decided
    /// it. So with none undecided, the revision said is one taken while that was on disk:
    /// the current one if nothing was committed since the last flush of the redo log, or
    /// after one made now (`may_flush`: the engine lets one happen every
    /// [`crate::engine::HEARTBEAT_FLUSH_EVERY`], not each second: a flush waits behind
    /// the disk's other writes, and the engine waits for it), else the one taken at the
    /// last such moment.
    ///
    /// It also vouches for the deletes applied ([`deletes_applied_upto`]) when what it
    /// read is on disk, so that after a sync completes the manager hears the new head
    /// from the next such heartbeat instead of the next sync (which may be days away).
    pub fn progress_for_heartbeat(&self, may_flush: bool) -> FsResult<HeartbeatProgress> {
        let (pending, taken, applied) = {
            let st = self.lock();
            let synced_head = st.synced_head;
            ((st.outbox.len() + st.moves.len()) as u64, Revision(st.last_rev), deletes_applied_upto(synced_head, st.last_rev))
        };
        let flushed = pending == 0 && may_flush && self.flush_log()?;
        let mut st = self.lock();
        // What was read above is on disk if nothing was committed since the last flush
        // began; a change undecided since (pending > 0) is not said to be settled anyway.
        let on_disk = st.db.commits() == st.flushed_commits;
        if pending == 0 && on_disk {
            st.idle_taken_on_disk = st.idle_taken_on_disk.max(taken);
        }
        let taken = if pending == 0 { st.idle_taken_on_disk } else { taken };
        let applied = if on_disk { applied } else { Revision(0) };
        Ok(HeartbeatProgress { pending_changes: pending, taken, flushed, applied })
    }

    /// Flushes the node database's redo log to disk (outside the tree's lock) unless
    /// nothing was committed since the last flush; returns whether it flushed. Everything
    /// committed before it began is then on disk.
    pub fn flush_log(&self) -> FsResult<bool> {
        let (logs, commits) = {
            let st = self.lock();
            let commits = st.db.commits();
            if commits == st.flushed_commits {
                return Ok(false);
            }
            (st.db.log_handles()?, commits)
        };
        for log in logs {
            log.sync_data()?;
        }
        let mut st = self.lock();
        st.flushed_commits = st.flushed_commits.max(commits);
        Ok(true)
    }

    /// The manager decided one of our changes: forget it and take the path's current
    /// state, in one step. (Two steps would let a change made in between be based on the
    /// revision from before the decision, and conflict with our own earlier change.)
    /// A first decision: the answer to a repeat comes as `Incoming::Decided`.
    pub fn apply_decided(&self, msg: &MessageId, outcome: &Outcome, current: &Entry) -> FsResult<Applied> {
        self.atomically(|st, store| st.apply_decided(msg, outcome, current, None, store))
    }

    /// Each of `items` (a decision on one of our changes, or another node's change),
    /// in order, in one transaction: all or, if any fails, none. A burst of changes
    /// comes back as decisions and broadcasts one after the other; one commit for them
    /// all instead of one per run of each kind.
    pub fn apply_incoming_all(&self, items: &[Incoming]) -> FsResult<Vec<Applied>> {
        self.apply_each(items, |st, store, item| st.apply_incoming(item, store))
    }

    /// One of [`Tree::apply_incoming_all`]'s items in a transaction of its own.
    pub fn apply_incoming(&self, item: &Incoming) -> FsResult<Applied> {
        self.atomically(|st, store| st.apply_incoming(item, store))
    }

    /// `apply` for each of `items`, in order, in one transaction; a rules file applied
    /// takes effect for the items after it.
    fn apply_each<T>(&self, items: &[T], mut apply: impl FnMut(&mut State, &ContentStore, &T) -> FsResult<Applied>) -> FsResult<Vec<Applied>> {
        self.atomically(|st, store| {
            items
                .iter()
                .map(|item| {
                    let applied = apply(st, store, item)?;
                    st.settle_rules(store)?;
                    Ok(applied)
                })
                .collect()
        })
    }

    /// The content `path` has in this node's tree now, if it is a committed file: what a
    /// pull of its next version takes unchanged chunks from.
    pub fn local_hash(&self, path: &RelPath) -> Option<ContentHash> {
        let st = self.lock();
        let (_, _, ino) = st.resolve(path)?;
        st.inodes.get(&ino).and_then(|i| i.hash.clone())
    }

    /// Whether applying `entry` needs content that is not in the store: a pinned path's
    /// (an on-demand path is applied without it, `residency.rs`).
    pub fn needs_content(&self, entry: &Entry) -> Option<ContentHash> {
        self.needs_content_under(entry, &self.pin_rules())
    }

    /// The file contents that the undecided changes `msgs` (of this node's outbox) put:
    /// the store has them, since the GC keeps every content the outbox names.
    pub fn queued_contents(&self, msgs: &[&MessageId]) -> HashSet<ContentHash> {
        if msgs.is_empty() {
            return HashSet::new();
        }
        let st = self.lock();
        msgs.iter()
            .filter_map(|m| st.outbox.seq_of(m).and_then(|seq| st.outbox.rows().get(&seq)))
            .filter_map(|r| match &r.change.op {
                ChangeOp::Put { version: Version { content: Content::File { hash, .. }, .. } } => Some(hash.clone()),
                _ => None,
            })
            .collect()
    }

    /// [`Tree::needs_content`] with the pin rules taken once for many entries.
    pub fn needs_content_under(&self, entry: &Entry, rules: &PinRules) -> Option<ContentHash> {
        match &entry.version {
            Some(Version { content: Content::File { hash, .. }, .. }) if rules.pinned(&entry.path) && !self.store.has(hash) => Some(hash.clone()),
            _ => None,
        }
    }

    /// Applies the manager's state of one path, unless the path has undecided local
    /// changes or the entry is older than what this node has.
    pub fn apply_remote(&self, entry: &Entry) -> FsResult<Applied> {
        self.atomically(|st, store| st.apply_remote(entry, store))
    }

    /// [`Tree::apply_remote`] for each of `entries`, in order, in one transaction: all
    /// or, if any fails, none. A rules file among them takes effect for the entries
    /// after it.
    pub fn apply_remote_all(&self, entries: &[Entry]) -> FsResult<Vec<Applied>> {
        self.apply_each(entries, |st, store, e| st.apply_remote(e, store))
    }

    /// Paths this node has (synced kinds) that `known` does not name, with no pending change:
    /// they are sent to the manager as new, outermost first. First commits again the
    /// files whose last close could not commit them (a disk fault), so that a sync sends
    /// them instead of leaving them to the next GC.
    ///
    /// `hold_back_known`: the paths among them that this node took from the manager (a
    /// revision above 0) are counted, not sent. After a snapshot reply such a path is
    /// one whose change after the snapshot never reached this node (its queue dropped
    /// it), or one the manager lost: sent now, a clean copy would bring back a path
    /// deleted meanwhile, or conflict with an edit; the engine syncs again in the
    /// catch-up form, which names every path, and sends what that leaves unnamed.
    ///
    /// A directory at a time (a large one `WALK_PART` entries at a time): its entries are
    /// looked at under the tree's lock, which is then let go, and those to send are
    /// looked at again and sent in a transaction of their own. The lock is never held for a walk of the whole tree (at a million
    /// files, that held the mount for about a second at every sync). An entry moved
    /// meanwhile from a directory not looked at yet into one already looked at is not
    /// seen here; its rename queued it.
    pub fn push_unknown(&self, known: &NamedPaths, hold_back_known: bool) -> FsResult<PushedUnknown> {
        self.push_unknown_in_parts(known, hold_back_known, WALK_PART)
    }

    /// `push_unknown`, looking at `part` entries of a directory per hold of the lock.
    pub(super) fn push_unknown_in_parts(&self, known: &NamedPaths, hold_back_known: bool, part_len: usize) -> FsResult<PushedUnknown> {
        let part_len = part_len.max(1);
        self.commit_unsaved();
        // `None`: not unknown; `Some(true)`: to send; `Some(false)`: to hold back.
        let taken = |st: &State, p: &RelPath| st.revs.get(p).is_some_and(|r| r.0 > 0);
        let unknown = |st: &State, dir: u64, name: &OsStr, ino: u64| {
            let i = st.inodes.get(&ino).filter(|i| i.kind.synced() && i.work.is_none())?;
            let here = st.inodes.get(&dir).and_then(|d| d.children.get(name)).is_some_and(|e| e.ino == i.ino);
            let p = st.path_of(dir, name).filter(|p| here && !known.contains(p) && !st.outbox.has(p))?;
            Some(!(hold_back_known && taken(st, &p)))
        };
        let held_back = std::cell::Cell::new(0);
        let mut pushed = 0;
        let mut taken_before = 0;
        self.walk_dirs_in_parts(
            ROOT,
            part_len,
            |st, dir, entries| {
                let dirs = entries.iter().filter(|(_, e)| e.kind == Kind::Dir).map(|(_, e)| e.ino).collect();
                let mut to_push: Vec<(OsString, u64)> = Vec::new();
                for (name, e) in entries {
                    match unknown(st, dir, name, e.ino) {
                        Some(true) => to_push.push(((*name).clone(), e.ino)),
                        Some(false) => held_back.set(held_back.get() + 1),
                        None => {}
                    }
                }
                (dirs, to_push)
            },
            |dir, to_push| {
                if to_push.is_empty() {
                    return Ok(());
                }
                let (n, again) = self.atomically(|st, _| {
                    let (mut n, mut again) = (0, 0);
                    for (name, ino) in &to_push {
                        if unknown(st, dir, name, *ino) == Some(true) {
                            again += st.path_of(dir, name).is_some_and(|p| taken(st, &p)) as usize;
                            st.record_put(dir, name, *ino)?;
                            n += 1;
                        }
                    }
                    Ok((n, again))
                })?;
                pushed += n;
                taken_before += again;
                Ok(())
            },
        )?;
        Ok(PushedUnknown { pushed, held_back: held_back.get(), taken_before })
    }

    /// Sends again the states of paths the manager lost: those `entries` (a page of a sync
    /// reply whose first page had head `head`) name at an older revision than this node
    /// took, when the node took that revision before `head`. A path's revision never goes
    /// back on the manager, so its reply as of `head` names the path at that revision or
    /// a later one; an older one means the manager's database lost the decisions after it
    /// (it was brought back from an older copy, or started anew: docs/protocol.md, *A
    /// manager behind its nodes*). What this node has there is then the later state,
    /// and goes to the manager as a change based on the revision it had it at (the rule
    /// takes a base above the path's revision for the current state), unless that is what
    /// the entry says already; the path's revision here goes back to the entry's, so that
    /// the decision is taken whatever it is (another node's change decided before the
    /// manager found out it was behind has a revision below the lost one: simulator seed
    /// 479). A path with a change of this node's own is left to that change. Returns how
    /// many were sent.
    ///
    /// A delete is not sent here but added to `deletes`, for
    /// [`Tree::send_deletes_the_manager_lost`] once the whole reply is in: a directory's
    /// delete sent before its children's would be refused (it has children on the
    /// manager) and the directory would come back. A file whose content this node lacks
    /// (files on demand) is left to a node that has it.
    pub fn send_states_the_manager_lost(&self, entries: &[Entry], head: Revision, deletes: &mut Vec<(RelPath, Revision)>) -> FsResult<usize> {
        {
            let st = self.lock();
            if !entries.iter().any(|e| st.lost_by_the_manager(&e.path, e.rev, head)) {
                return Ok(0);
            }
        }
        self.atomically(|st, store| {
            let mut sent = 0;
            for e in entries {
                if !st.lost_by_the_manager(&e.path, e.rev, head) {
                    continue;
                }
                let local = st.resolve(&e.path);
                let version = local.as_ref().and_then(|(_, _, ino)| st.inodes.get(ino)).and_then(|i| i.version());
                if version == e.version {
                    continue;
                }
                let Some((parent, name, ino)) = local else {
                    deletes.push((e.path.clone(), e.rev));
                    continue;
                };
                if matches!(&version, Some(Version { content: Content::File { hash, .. }, .. }) if !store.has(hash)) {
                    continue;
                }
                tracing::debug!(target: "changes", path = %e.path, rev = e.rev.0, taken = st.revs.get(&e.path).map(|r| r.0), "the manager lost this path's later state: sending it again");
                st.record_put(parent, &name, ino)?;
                // Queued on the revision the node took (the rule takes it for the
                // current state); the decision, whatever it is, comes at the manager's
                // revision or a later one, and the node must take it.
                st.set_rev_to(&e.path, e.rev)?;
                sent += st.outbox.has(&e.path) as usize;
            }
            Ok(sent)
        })
    }

    /// Sends the deletes [`Tree::send_states_the_manager_lost`] set aside, of paths still
    /// absent here with nothing of this node's own there, deepest first.
    pub fn send_deletes_the_manager_lost(&self, mut deletes: Vec<(RelPath, Revision)>, head: Revision) -> FsResult<usize> {
        if deletes.is_empty() {
            return Ok(0);
        }
        deletes.sort_by_key(|(p, _)| std::cmp::Reverse(p.as_str().matches('/').count()));
        self.atomically(|st, _| {
            let mut sent = 0;
            for (path, rev) in &deletes {
                if !st.lost_by_the_manager(path, *rev, head) || st.resolve(path).is_some() {
                    continue;
                }
                tracing::debug!(target: "changes", %path, rev = rev.0, "the manager lost this path's delete: sending it again");
                st.record_delete(path.clone())?;
                st.set_rev_to(path, *rev)?;
                sent += st.outbox.has(path) as usize;
            }
            Ok(sent)
        })
    }

    /// Removes blobs nothing refers to, after trying again the commits that failed when
    /// a file's last writer closed and setting aside the node database's reserve again
    /// if it was used (`ContentStore::ensure_reserve`). A content is removed under the
    /// tree lock, after a look that nothing uses it then, so that a commit cannot add a
    /// reference between the look and the removal.
    pub fn gc(&self) -> usize {
        self.gc_with_floor(0)
    }

    /// [`Tree::gc`], dropping kept versions' contents, oldest first, while the store's
    /// disk has less than `floor` bytes free (`kept.rs`).
    ///
    /// The tree's lock is never held for a walk of the whole tree (at a million files, a
    /// walk held the mount for about 0.1 s every minute): the contents in use are listed
    /// a part of the tree at a time, the lock let go between; the set is made and the
    /// store walked outside it for what nothing uses; and under the lock again those
    /// candidates go, but for those a file or a queued change took since the listing
    /// began (`State::note_taken`: a content taken meanwhile may have moved from a part
    /// not listed yet into one listed already).
    pub fn gc_with_floor(&self, floor: u64) -> usize {
        self.commit_unsaved();
        self.store.ensure_reserve();
        let candidates = self.gc_candidates(floor);
        let _end = RoundEnd::new(self, candidates.round);
        self.gc_remove(&candidates)
    }

    /// The first phase of `gc_with_floor`: what nothing used when it looked.
    pub(super) fn gc_candidates(&self, floor: u64) -> GcCandidates {
        self.gc_candidates_in_parts(floor, WALK_PART, || {})
    }

    /// `gc_candidates`, listing `part` inodes or queued changes per hold of the lock and
    /// calling `between` after each (the tests change the tree there).
    pub(super) fn gc_candidates_in_parts(&self, floor: u64, part: usize, mut between: impl FnMut()) -> GcCandidates {
        let round = {
            let mut st = self.lock();
            st.close_unreachable_blobs();
            st.begin_round()
        };
        let end = RoundEnd::new(self, round);
        let mut keep = self.used_in_parts(part, &mut between, |_| true);
        let in_use = |h: &ContentHash| keep.contains(h);
        let kept = self.kept_for_gc(&mut self.lock(), floor, round, &in_use);
        keep.extend(kept);
        let hashes = self.store.gc_candidates(&keep, GC_MIN_AGE).into_iter().collect();
        // The round goes on until `gc_remove`.
        GcCandidates { round: end.hand_on(), hashes }
    }

    /// The contents files (live ones) or queued changes use, of those `among` takes,
    /// listed `part` inodes or queued changes per hold of the lock (`visit_in_parts`);
    /// a content taken meanwhile may be missed: a caller that acts on what is not listed
    /// began a round first (`State::begin_round`) and looks at what it noted.
    pub(super) fn used_in_parts(&self, part: usize, between: &mut impl FnMut(), among: impl Fn(&ContentHash) -> bool) -> HashSet<ContentHash> {
        let (inos, seqs) = {
            let st = self.lock();
            (st.inodes.keys().copied().collect(), st.outbox.rows().keys().copied().collect())
        };
        let mut used = HashSet::new();
        self.visit_in_parts(inos, part, between, |st, ino| {
            if let Some(h) = st.inodes.get(&ino).filter(|i| live_file(i)).and_then(|i| i.hash.as_ref()).filter(|h| among(h)) {
                used.insert(h.clone());
            }
        });
        self.visit_in_parts(seqs, part, between, |st, seq| {
            if let Some(h) = st.outbox.rows().get(&seq).and_then(|r| queued_content(&r.change.op)).filter(|h| among(h)) {
                used.insert(h.clone());
            }
        });
        used
    }

    /// The second phase: removes the candidates that nothing uses now.
    pub(super) fn gc_remove(&self, candidates: &GcCandidates) -> usize {
        let mut st = self.lock();
        // (Never `None`: a round ends only here. Were it, what the listing missed would
        // not be known, and it is looked for in the whole tree.)
        let taken = st.end_round(candidates.round);
        if candidates.hashes.is_empty() {
            return 0;
        }
        let gone: HashSet<ContentHash> = match taken {
            Some(taken) => candidates.hashes.iter().filter(|h| !taken.contains(*h) && !st.kept.contains_key(*h)).cloned().collect(),
            None => {
                let in_use: HashSet<&ContentHash> = Self::live_hashes(&st).chain(st.kept.keys()).filter(|h| candidates.hashes.contains(*h)).collect();
                candidates.hashes.iter().filter(|h| !in_use.contains(h)).cloned().collect()
            }
        };
        // (A walk of the whole tree, in debug builds only: the tests' check that every
        // place a content is taken notes it.)
        debug_assert!(
            !Self::live_hashes(&st).any(|h| gone.contains(h)),
            "the GC would remove a content in use: a place where a file or a queued change takes a content does not call `note_taken`"
        );
        self.store.remove_unused(&gone, GC_MIN_AGE)
    }

    /// Commits the files whose last writer closed while their content could not be
    /// committed (a full disk, a failing database: see `release`).
    pub(super) fn commit_unsaved(&self) {
        let unsaved = |i: &Inode| i.work.is_some() && i.writers == 0 && i.nlink > 0;
        let inos: Vec<u64> = {
            let mut st = self.lock();
            let st = &mut *st;
            let inodes = &st.inodes;
            st.with_work.retain(|ino| inodes.get(ino).is_some_and(|i| i.work.is_some()));
            let mut inos: Vec<u64> = st.with_work.iter().copied().filter(|ino| inodes.get(ino).is_some_and(|i| unsaved(i))).collect();
            inos.sort_unstable();
            inos
        };
        for ino in inos {
            let committed = self.atomically(|st, store| match st.inodes.get(&ino) {
                Some(i) if unsaved(i) => st.commit_work(ino, store, None),
                _ => Ok(()),
            });
            match committed {
                Ok(()) => tracing::info!(ino, "committed the content a closed file had left unsaved"),
                Err(e) => tracing::warn!(ino, "the content of a closed file still cannot be committed: {e}"),
            }
        }
    }

    pub(super) fn referenced(st: &State) -> HashSet<ContentHash> {
        Self::live_hashes(st).cloned().collect()
    }

    /// The contents files use or queued changes name (a content may come more than once).
    pub(super) fn live_hashes(st: &State) -> impl Iterator<Item = &ContentHash> {
        let files = st.inodes.values().filter(|i| live_file(i)).filter_map(|i| i.hash.as_ref());
        let queued = st.outbox.rows().values().filter_map(|r| queued_content(&r.change.op));
        files.chain(queued)
    }

    /// Inodes in use, for statfs.
    pub fn statfs_files(&self) -> u64 {
        self.lock().inodes.len() as u64
    }
}

impl State {
    fn apply_incoming(&mut self, item: &Incoming, store: &ContentStore) -> FsResult<Applied> {
        match item {
            Incoming::Decided { change, outcome, current, first_rev } => self.apply_decided(change, outcome, current, *first_rev, store),
            Incoming::Entry(e) => self.apply_queued(e, store),
        }
    }

    /// See [`Tree::apply_decided`].
    /// Keeps `hash`, the node's own version decided into the conflict file `copy`, as a
    /// kept content for [`OWN_CONFLICT_KEEP_MS`], unless the file at `copy` has it
    /// already or the store lacks it.
    fn keep_own_content_at(&mut self, copy: &RelPath, hash: &ContentHash, size: u64, store: &ContentStore) -> FsResult<()> {
        let there = self.resolve(copy).and_then(|(_, _, ino)| self.inodes.get(&ino)).and_then(|i| i.hash.as_ref()) == Some(hash);
        if there {
            return Ok(());
        }
        tracing::debug!(target: "changes", path = %copy, %hash, "the node's version decided into a conflict file it has an older state of: its content kept");
        self.keep_own_content(hash, size, store)
    }

    /// Keeps `hash`, the content of a change of this node's own, as a kept content for
    /// [`OWN_CONFLICT_KEEP_MS`] (whatever the manager says of it), if the store has it.
    fn keep_own_content(&mut self, hash: &ContentHash, size: u64, store: &ContentStore) -> FsResult<()> {
        if !store.has(hash) {
            return Ok(());
        }
        let now_ms = self.env.now_ns() / 1_000_000;
        let until_ms = now_ms + OWN_CONFLICT_KEEP_MS;
        let old = self.kept.get(hash).cloned();
        let row = match &old {
            Some(k) => crate::db::KeptRow { until_ms: k.until_ms.max(until_ms), own_until_ms: k.own_until_ms.max(until_ms), ..k.clone() },
            None => crate::db::KeptRow { hash: hash.clone(), size, until_ms, at_ms: now_ms, own_until_ms: until_ms },
        };
        self.db.put_kept(&row).map_err(|e| FsError::Io(anyhow::Error::new(e).context("keeping a content of this node's own")))?;
        self.record(|| Undo::Kept(hash.clone(), old));
        self.kept.insert(hash.clone(), row);
        self.note_taken(hash);
        Ok(())
    }

    fn apply_decided(&mut self, msg: &MessageId, outcome: &Outcome, current: &Entry, first_rev: Option<Revision>, store: &ContentStore) -> FsResult<Applied> {
        tracing::debug!(target: "changes", %msg, ?outcome, path = %current.path, rev = current.rev.0, version = ?current.version, "decision received");
        let seq = self.outbox.seq_of(msg);
        let mut decided = false;
        let mut kept_copy = None;
        let mut merged_into = None;
        if let Some(seq) = seq {
            // Near a large rename's old paths, their deletes are queued before the
            // decided change goes: they follow it, as if queued by the rename itself
            // (`moves.rs`); queued after, the old path's would be based on the revision
            // from before the decision. (Not for a decided delete: the move's own, most
            // often, whose path is gone and whose siblings' deletes need nothing of it.)
            let row = &self.outbox.rows()[&seq].change;
            if let ChangeOp::Put { version } = &row.op {
                // A directory put over the local directory there needs none of the
                // deletes below it (`delete_old_paths_near`).
                let path = row.path.clone();
                let dir_there = matches!(version.content, Content::Dir) && self.dir_at(&path);
                self.delete_old_paths_near(&path, false, dir_there)?;
            }
            let resent = self.outbox.resent.contains(msg);
            let row = self.set_outbox_row(seq, None).expect("found");
            self.db.remove_outbox(seq)?;
            // A change sent again may be decided again by a manager that lost this
            // decision (its database brought back from a copy, or lost), maybe as a
            // conflict file that other nodes can fetch only from here, while this node,
            // having taken this decision, may have let go of the content (deleted the
            // file, and its old version's retention ended: simulator seed 12659). The
            // content is kept for a while, as for a conflict file it has not seen yet.
            if let (true, ChangeOp::Put { version: Version { content: Content::File { hash, size }, .. } }) = (resent, &row.change.op) {
                self.keep_own_content(hash, *size, store)?;
            }
            // The node's version kept as a conflict file, at a path of which the node has
            // seen no state (the broadcast lost with its queue's oldest messages, seed
            // 63226): the node puts it there itself, from its own store, so that it does
            // not let go of what may be the only copy of the content. The manager's entry
            // for that path, when it comes, finds it in place.
            if let (Outcome::Conflict { copy }, ChangeOp::Put { version }) = (outcome, &row.change.op) {
                if !self.revs.contains_key(copy) && self.resolve(copy).is_none() {
                    let own = Entry { path: copy.clone(), rev: Revision(0), version: Some(version.clone()), holders: vec![], from_lost: None };
                    tracing::debug!(target: "changes", path = %copy, "the node's version kept as a conflict file, put there from its own store");
                    let applied = self.apply_entry(&own, store, true)?;
                    kept_copy = Some((own, applied));
                } else if let Content::File { hash, size } = &version.content {
                    // The node has seen an older state of the conflict file (its own
                    // earlier copy, which the manager updates with this version: seed
                    // 86668), not this one's: until the conflict file's state comes
                    // (a broadcast, a sync reply), nothing of the node refers to the
                    // content, which may be the only copy. Kept for a while, as a kept
                    // version is, so that neither the GC nor a failed apply loses it.
                    self.keep_own_content_at(copy, hash, *size, store)?;
                }
            }
            let was_sent = self.outbox.sent.remove(msg);
            self.record(|| Undo::Sent(msg.clone(), was_sent));
            if matches!(outcome, Outcome::Conflict { .. }) {
                self.conflicts_seen += 1;
            }
            // The path changed again on top of the version just decided (it is
            // being written, or has later changes queued): `apply_remote` leaves
            // it alone, but its next change must be based on the revision this one
            // got. Otherwise a later change that no longer follows a queued one
            // (that one was decided, or coalesced away before it was sent) goes
            // out with an older base and looks like an edit of a stale version: a
            // conflict, or, for the same bytes, a lost chmod.
            // Only when `current` is the state this change left: the decision of a change
            // sent again (its first decision lost with the queue's oldest messages while
            // the node was away) comes with the path's state now, which may be another
            // node's later version; based on that, the node's next change would pass for
            // an edit of it (and its own version would stay when that change conflicts).
            let kept = matches!(outcome, Outcome::Accepted | Outcome::Unchanged);
            // (`Unchanged` keeps the manager's metadata over the same bytes.)
            // A decision sent again says so when the path has changed since (`first_rev`):
            // the state now may look just like this change's (another node's identical
            // directory, seed 206769), but it is not the one it left.
            let left_by_it = first_rev.is_none()
                && match (&row.change.op, outcome) {
                    (ChangeOp::Put { version }, Outcome::Unchanged) => current.version.as_ref().is_some_and(|v| v.content == version.content),
                    // (An accepted chmod may come back with the mtime of a touch made
                    // elsewhere meanwhile, a write with the mode of a chmod made
                    // elsewhere: the manager's merges.)
                    (ChangeOp::Put { version }, Outcome::Accepted) => current.version.as_ref().is_some_and(|v| v.content == version.content),
                    (ChangeOp::Put { version }, _) => current.version.as_ref() == Some(version),
                    (ChangeOp::Delete, _) => current.version.is_none(),
                };
            let changed_again = self.is_dirty(&current.path) || self.outbox.has(&current.path);
            // What a later large rename brought to the path since this change was queued
            // (`mv d d.old && mv e d`, both in parts) waits for its move's put, which a
            // rename in one hold would have queued right then, after this change: it is
            // queued now, based on this decision, as a change of it made now would be.
            // Queued later with the revision from before, it would pass for an edit of a
            // version the node never saw (seed 60097: a conflict of the node with itself).
            let moved_here = if kept && left_by_it { self.move_put_waiting_at(&current.path, seq) } else { None };
            if kept
                && left_by_it
                && current.path == row.change.path
                && (changed_again || moved_here.is_some())
                && self.env.past_bug() != Some(PastBug::DecidedBase)
            {
                self.set_rev(&current.path, current.rev)?;
                // (What was moved here is another file: the merge was of the one it
                // replaced. Its put waits for the decision of the node's later change of
                // that one, if one is queued.)
                match moved_here {
                    Some((parent, name, ino)) if !changed_again => self.record_put(parent, &name, ino)?,
                    Some(_) => {}
                    None => merged_into = self.take_merged_meta(&current.path, &row.change.op, current)?,
                }
            }
            decided = current.path == row.change.path;
        }
        let mut out = self.apply_entry(current, store, decided)?;
        out.also.extend(kept_copy);
        if let Some(ino) = merged_into {
            out.invals.push(Inval::Inode { ino });
            out.changed = true;
        }
        if seq.is_some() {
            self.apply_deferred_above(&current.path, store, &mut out)?;
        }
        Ok(out)
    }
}
