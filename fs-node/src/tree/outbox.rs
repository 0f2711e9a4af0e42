//! The outbox: recording local changes as changes for the manager, coalesced with
//! unsent ones of the same path, in an order the manager can apply (parents before
//! children, deletes children first), each based on the revision it was made on.
//!
//! [`Outbox`] owns the queued rows in memory (they are also in the database) and their
//! indexes by path and by message id, so no operation costs time proportional to the
//! number of queued changes: a burst of 100,000 creates queues 100,000 rows.

use super::*;
use std::collections::BTreeSet;
use std::ops::Bound;

/// The outbox as the tree keeps it in memory: undecided rows, ordered by seq.
#[derive(Default)]
pub(super) struct Outbox {
    rows: BTreeMap<i64, OutboxRow>,
    /// The seqs of the rows of each path (a path is in the map while it has a row).
    by_path: BTreeMap<RelPath, BTreeSet<i64>>,
    by_msg: HashMap<MessageId, i64>,
    /// Rows that may have reached the broker (published in this run, or loaded from
    /// disk at start); these are never coalesced.
    pub(super) sent: HashSet<MessageId>,
    /// Rows with a seq up to this one were handed to the broker link in this session.
    pub(super) published_upto: i64,
    /// Rows sent again (`Tree::republish_all`) after they may have reached the broker: a
    /// manager that lost its first decision of one (its database brought back from a
    /// copy) decides it again, maybe otherwise (`State::apply_decided`). A row leaves
    /// this set with the row.
    pub(super) resent: HashSet<MessageId>,
    /// Above every seq this run has seen (loaded or assigned): seqs only grow within a
    /// run, which `published_upto` relies on.
    next_seq: i64,
}

impl Outbox {
    /// Puts `row` at `seq`, or removes the row there (`None`); returns the row that was
    /// there. The only way rows change, so the indexes always match them.
    pub(super) fn set(&mut self, seq: i64, row: Option<OutboxRow>) -> Option<OutboxRow> {
        let old = self.rows.remove(&seq);
        if let Some(o) = &old {
            if let Some(seqs) = self.by_path.get_mut(&o.change.path) {
                seqs.remove(&seq);
                if seqs.is_empty() {
                    self.by_path.remove(&o.change.path);
                }
            }
            if self.by_msg.get(&o.msg) == Some(&seq) {
                self.by_msg.remove(&o.msg);
                self.resent.remove(&o.msg);
            }
        }
        if let Some(r) = row {
            self.next_seq = self.next_seq.max(seq + 1);
            self.by_path.entry(r.change.path.clone()).or_default().insert(seq);
            self.by_msg.insert(r.msg.clone(), seq);
            self.rows.insert(seq, r);
        }
        old
    }

    /// The seq for a new row: after every row there is or was in this run.
    pub(super) fn take_seq(&mut self) -> i64 {
        let seq = self.next_seq.max(1);
        self.next_seq = seq + 1;
        seq
    }

    /// The seq the next new row will get.
    pub(super) fn next_seq(&self) -> i64 {
        self.next_seq.max(1)
    }

    /// Makes every new row's seq at least `seq`.
    pub(super) fn seqs_from(&mut self, seq: i64) {
        self.next_seq = self.next_seq.max(seq);
    }

    /// The rows not yet handed to the broker link in this session, in order.
    pub(super) fn unpublished(&self) -> impl Iterator<Item = &OutboxRow> {
        self.rows.range(self.published_upto + 1..).map(|(_, r)| r)
    }

    pub(super) fn rows(&self) -> &BTreeMap<i64, OutboxRow> {
        &self.rows
    }
    pub(super) fn len(&self) -> usize {
        self.rows.len()
    }
    pub(super) fn seq_of(&self, msg: &MessageId) -> Option<i64> {
        self.by_msg.get(msg).copied()
    }
    /// Whether `path` has an undecided change.
    pub(super) fn has(&self, path: &RelPath) -> bool {
        self.by_path.contains_key(path)
    }
    /// Whether the last undecided change of `path` is its delete.
    pub(super) fn deletes_last(&self, path: &RelPath) -> bool {
        self.of_path(path).next_back().is_some_and(|r| matches!(r.change.op, ChangeOp::Delete))
    }
    /// Whether `path` or anything below it has an undecided change.
    pub(super) fn has_within(&self, path: &RelPath) -> bool {
        self.has(path) || self.paths_below(path).next().is_some()
    }
    /// `path` and the paths below it that have an undecided change.
    pub(super) fn paths_within<'a>(&'a self, path: &'a RelPath) -> impl Iterator<Item = RelPath> + 'a {
        self.by_path.get_key_value(path).map(|(p, _)| p).into_iter().chain(self.paths_below(path)).cloned()
    }
    fn paths_below<'a>(&'a self, path: &RelPath) -> impl Iterator<Item = &'a RelPath> + 'a {
        let p: &str = std::borrow::Borrow::borrow(path);
        // Below `p` is exactly the range from `p/` up to `p0` ('0' follows '/').
        let (from, to) = (format!("{p}/"), format!("{p}0"));
        self.by_path.range::<str, _>((Bound::Included(from.as_str()), Bound::Excluded(to.as_str()))).map(|(p, _)| p)
    }
    /// Panics unless the indexes list exactly the rows (the tree's tests call it after
    /// every step).
    #[cfg(test)]
    pub(super) fn check_indexes(&self, when: &str) {
        let mut by_path: BTreeMap<RelPath, BTreeSet<i64>> = BTreeMap::new();
        for (seq, r) in &self.rows {
            by_path.entry(r.change.path.clone()).or_default().insert(*seq);
            assert_eq!(self.by_msg.get(&r.msg), Some(seq), "outbox index by message, {when}");
        }
        assert_eq!(by_path, self.by_path, "outbox index by path, {when}");
        assert_eq!(self.by_msg.len(), self.rows.len(), "outbox index by message, {when}");
    }
    /// The rows of `path`, oldest first.
    fn of_path(&self, path: &RelPath) -> impl DoubleEndedIterator<Item = &OutboxRow> {
        self.by_path.get(path).into_iter().flatten().map(|s| &self.rows[s])
    }
    /// The latest row of `path` before `seq`.
    fn last_of_path_before(&self, path: &RelPath, seq: i64) -> Option<&OutboxRow> {
        self.by_path.get(path).and_then(|s| s.range(..seq).next_back()).map(|s| &self.rows[s])
    }
}

impl State {
    /// Queues a local change for the manager, unless its path is ignored here; a change
    /// of a rules file has its directory's rules read again before the transaction ends.
    pub(super) fn push_change(&mut self, path: RelPath, op: ChangeOp) -> FsResult<()> {
        self.push_change_from(path, op, None)
    }

    /// [`push_change`](Self::push_change) of an operation that found the path in the
    /// state `before` (a setattr, a written file's commit, a delete): with no earlier
    /// change of the path undecided, that is the state at the base, which the change
    /// carries (`Change::base_meta`, `Change::base_content`).
    fn push_change_from(&mut self, path: RelPath, op: ChangeOp, before: Option<MadeOn>) -> FsResult<()> {
        self.before_change_near_moves(&path)?;
        self.touch_rules(&path);
        let is_dir = match &op {
            ChangeOp::Put { version } => Some(matches!(version.content, Content::Dir)),
            ChangeOp::Delete => None,
        };
        if self.ignore.is_ignored(path.as_str(), is_dir) {
            tracing::debug!(target: "changes", path = %path, "ignored here: not sent");
            return Ok(());
        }
        self.queue_change(path, op, before)
    }

    fn queue_change(&mut self, path: RelPath, op: ChangeOp, before: Option<MadeOn>) -> FsResult<()> {
        // Coalesce with a change to the same path that never left this process: the
        // manager only needs the latest state.
        let unsent = self
            .outbox
            .of_path(&path)
            .rev()
            .find(|r| r.seq > self.outbox.published_upto && !self.outbox.sent.contains(&r.msg))
            .map(|r| (r.seq, matches!(r.change.op, ChangeOp::Put { .. })));
        let base = self.revs.get(&path).copied().unwrap_or(Revision::NONE);
        if let Some((seq, true)) = unsent {
            if matches!(op, ChangeOp::Put { .. }) {
                // A put replacing a put keeps its place in the queue: puts of its
                // parents are before it, puts of its children after it. (Appended at
                // the end, a directory's put would follow its children's, and the
                // manager would have made the directory itself, with a default mode.)
                let earlier = self.outbox.last_of_path_before(&path, seq);
                let follows = earlier.map(|r| r.msg.clone());
                let mut row = self.outbox.rows[&seq].clone();
                // Made on the same state as the change it replaces, also when the base
                // moved meanwhile: only the decision of the change that one followed
                // moves it (nothing is applied over a queued change), to that change's
                // revision, and it said what that change put there. (Simulator seed
                // 702593: a chown replacing a touch whose predecessor had been decided
                // went without it, on a base the manager's history had forgotten, and
                // was taken for no change.)
                let made_on = match earlier {
                    Some(e) => MadeOn::put_by(&e.change.op),
                    None => MadeOn::said_by(&row.change),
                };
                let (base_meta, base_content) = MadeOn::fields(made_on);
                row.change = Change { path, base, follows, op, base_meta, base_content };
                tracing::debug!(target: "changes", msg = %row.msg, path = %row.change.path, base = base.0, follows = ?row.change.follows, op = ?row.change.op, "replaced in the queue");
                self.db.replace_outbox(seq, &row.change)?;
                self.set_outbox_row(seq, Some(row));
                return Ok(());
            }
        }
        let mut replaced = None;
        if let Some((seq, _)) = unsent {
            // Anything else goes to the end, where the order of deletes (children
            // first) and of a put after a delete is kept.
            let row = self.set_outbox_row(seq, None).expect("found");
            tracing::debug!(target: "changes", msg = %row.msg, path = %row.change.path, "coalesced with a newer change");
            self.db.remove_outbox(seq)?;
            replaced = Some(MadeOn::said_by(&row.change));
        }
        let earlier = self.outbox.of_path(&path).next_back();
        let follows = earlier.map(|r| r.msg.clone());
        // Made on what the change it replaces was made on (a file made where the node
        // deleted a directory, say, is made on that directory: simulator seed 831386),
        // or on what the node showed (`before`), or else on what the earlier change put
        // there (nothing, after a delete), or, with none undecided, on the state at the
        // base, which `before` is (a new path has none). (What the node shows may differ
        // from its earlier change's: a decision that kept the manager's mode over that
        // change was applied meanwhile; a chmod back to the mode that change had is a
        // change, simulator seed 549850.)
        let made_on = match (replaced, earlier) {
            (Some(said), _) => said,
            (None, Some(e)) if matches!(e.change.op, ChangeOp::Delete) => None,
            (None, Some(e)) => before.or_else(|| MadeOn::put_by(&e.change.op)),
            (None, None) => before.filter(|_| base > Revision::NONE),
        };
        let msg = self.env.new_id();
        let (base_meta, base_content) = MadeOn::fields(made_on);
        let change = Change { path: path.clone(), base, follows, op, base_meta, base_content };
        tracing::debug!(target: "changes", %msg, path = %change.path, base = base.0, follows = ?change.follows, op = ?change.op, "queued");
        let seq = self.outbox.take_seq();
        self.db.push_outbox(seq, &msg, &change)?;
        self.set_outbox_row(seq, Some(OutboxRow { seq, msg, change }));
        Ok(())
    }

    pub(super) fn record_put(&mut self, parent: u64, name: &OsStr, ino: u64) -> FsResult<()> {
        self.record_put_from(parent, name, ino, None)
    }

    /// [`record_put`](Self::record_put) of an operation that found the inode in the
    /// state `before` ([`push_change_from`](Self::push_change_from)).
    fn record_put_from(&mut self, parent: u64, name: &OsStr, ino: u64, before: Option<MadeOn>) -> FsResult<()> {
        let Some(path) = self.path_of(parent, name) else {
            return Ok(());
        };
        let i = self.inode(ino)?;
        match i.version() {
            Some(version) => self.push_change_from(path, ChangeOp::Put { version }, before),
            // A local-only kind (FIFO, socket, device) now occupies a path that may hold
            // a synced file elsewhere: for the others, that path is gone. Without this,
            // the manager's older state of the path would come back over it.
            None if !i.kind.synced() => self.push_change(path, ChangeOp::Delete),
            None => Ok(()),
        }
    }

    /// The puts of every link of `ino`, made on the state `before` (a setattr's, or a
    /// written file's before its writing and the setattrs made meanwhile).
    pub(super) fn record_put_all_links_from(&mut self, ino: u64, before: Option<MadeOn>) -> FsResult<()> {
        let links = self.inode(ino)?.links.clone();
        for (p, n) in links {
            self.record_put_from(p, &n, ino, before.clone())?;
        }
        Ok(())
    }

    pub(super) fn record_put_subtree(&mut self, parent: u64, name: &OsStr) -> FsResult<()> {
        let ino = self.child(parent, name)?;
        self.put_at_new_path(parent, name, ino)?;
        let mut all = Vec::new();
        self.collect_paths(ino, None, &mut all);
        for (_, p, n, i) in all {
            self.put_at_new_path(p, &n, i)?;
        }
        Ok(())
    }

    /// Queues the put of `ino` at a path a rename or a link gave it; of a file being
    /// written, leaves it to the last close, whose put then says nothing of what it was
    /// made on: there, the inode is born here (`Inode::born_here`), not the state the
    /// path's revision names.
    pub(super) fn put_at_new_path(&mut self, parent: u64, name: &OsStr, ino: u64) -> FsResult<()> {
        if self.inode(ino)?.work.is_none() {
            return self.record_put(parent, name, ino);
        }
        self.inode_mut(ino)?.born_here = true;
        Ok(())
    }

    pub(super) fn record_delete(&mut self, path: RelPath) -> FsResult<()> {
        self.push_change(path, ChangeOp::Delete)
    }

    /// [`record_delete`](Self::record_delete) of a path found in the state `before`.
    pub(super) fn record_delete_from(&mut self, path: RelPath, before: Option<MadeOn>) -> FsResult<()> {
        self.push_change_from(path, ChangeOp::Delete, before)
    }
}

/// The state a local change was made on, as the node knows it: its mode and owners, and
/// its content when known (the bytes a write or delete replaced). Sent with the change
/// (`Change::base_meta`, `Change::base_content`): where the manager's history lacks the
/// base, it is all the manager knows of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct MadeOn {
    pub(super) meta: ModeAndOwners,
    pub(super) content: Option<Content>,
}

impl MadeOn {
    /// What a change puts there (nothing for a delete).
    fn put_by(op: &ChangeOp) -> Option<MadeOn> {
        match op {
            ChangeOp::Put { version } => Some(MadeOn { meta: version.into(), content: Some(version.content.clone()) }),
            ChangeOp::Delete => None,
        }
    }

    /// What a queued change says it was made on.
    fn said_by(change: &Change) -> Option<MadeOn> {
        change.base_meta.map(|meta| MadeOn { meta, content: change.base_content.clone() })
    }

    /// A change's `base_meta` and `base_content`.
    fn fields(this: Option<MadeOn>) -> (Option<ModeAndOwners>, Option<Content>) {
        match this {
            Some(m) => (Some(m.meta), m.content),
            None => (None, None),
        }
    }
}

#[cfg(test)]
mod index_tests {
    use super::*;

    fn row(seq: i64, path: &str) -> OutboxRow {
        let msg: MessageId = format!("m-{seq}").parse().unwrap();
        OutboxRow { seq, msg, change: Change::new(RelPath::new(path).unwrap(), Revision(0), ChangeOp::Delete) }
    }

    #[test]
    fn below_a_path_means_its_subtree_not_its_siblings_that_share_a_prefix() {
        let mut o = Outbox::default();
        for (seq, p) in [(1, "a-b"), (2, "a0"), (3, "ab/c"), (4, "d/a/x")] {
            o.set(seq, Some(row(seq, p)));
        }
        let p = |s: &str| RelPath::new(s).unwrap();
        assert!(!o.has_within(&p("a")), "siblings a-b, a0 and ab/c are not below a");
        o.set(5, Some(row(5, "a/b/c")));
        assert!(o.has_within(&p("a")) && o.has_within(&p("a/b")) && !o.has_within(&p("a/b/c/d")));
        assert!(o.has_within(&p("d")) && !o.has(&p("d")) && !o.has_within(&p("d/a/x/y")));
        o.set(5, None);
        assert!(!o.has_within(&p("a")));
        o.check_indexes("after removing");
    }

    #[test]
    fn replacing_a_row_moves_it_between_paths_and_messages() {
        let mut o = Outbox::default();
        o.set(1, Some(row(1, "x")));
        let mut r = row(1, "y");
        r.msg = "other".parse().unwrap();
        assert_eq!(o.set(1, Some(r)).map(|r| r.change.path), Some(RelPath::new("x").unwrap()));
        assert!(!o.has(&RelPath::new("x").unwrap()) && o.has(&RelPath::new("y").unwrap()));
        assert_eq!(o.seq_of(&"m-1".parse().unwrap()), None);
        assert_eq!(o.seq_of(&"other".parse().unwrap()), Some(1));
        o.check_indexes("after replacing");
    }
}
