//! What a node forgets of deleted paths: the revision of each one it took (`State::revs`
//! of a path that is not here), kept so that an older state of the path coming late (a
//! broadcast still in the queue, a page of a sync given up) is known as stale and not
//! applied. Kept for good, these grew a node's memory and `node.db` by about 100 bytes
//! per path ever deleted (build output, editors' temporary files).
//!
//! A deleted path's revision goes once it is at or below the head of a sync that
//! completed (nothing held back) at least `forget_after` ago (`--forget-deletes-after`,
//! 30 days by default, as long as the manager keeps a deleted version). The highest head
//! forgotten up to is kept (`forgotten_upto`, never going back), and a state from the
//! queue at or below it, of a path this node neither has nor knows a revision of, is
//! stale: the sync with that head named every path live then (a live path at such a
//! revision would be known here), so the state was deleted since, and applying it would
//! bring a deleted path back. A sync reply's own entries are the manager's state at its
//! head and are applied as before.
//!
//! What the wait guards: a manager brought back from a copy older than a forgotten
//! delete may name the path live again; the node then has no later revision to set
//! against it (`lost_by_the_manager`) and takes it back. Past the wait, as for the
//! manager's own forgotten tombstones, a restore that old brings deleted files back.
//! Which completed syncs' heads and when: a short list in `node.db` (`checkpoints`).
//!
//! Not forgotten: a path with a change of the node's own queued at or below it, a state
//! deferred there, or an old path of a pending large rename (its delete, queued later, is
//! based on that revision). The highest revision taken never goes down with what is
//! forgotten (`forgotten_max_rev`): a sync's `since` and the deletes a node vouches for
//! stay where they were. A pass looks at the revisions taken since the last one; the
//! first after a start, or after a failed one, at all of them.

use super::*;

/// `node.db` meta key of [`State::forgotten_upto`].
pub(super) const FORGOTTEN_UPTO_KEY: &str = "forgotten_deletes_upto";
/// `node.db` meta key of [`State::forgotten_max_rev`].
pub(super) const FORGOTTEN_MAX_REV_KEY: &str = "forgotten_max_rev";
/// `node.db` meta key of [`State::checkpoints`].
pub(super) const CHECKPOINTS_KEY: &str = "sync_checkpoints";
/// How long a deleted path's revision is kept at least, unless the node is told.
pub const FORGET_DELETES_AFTER: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);
/// Checkpoints kept: one per sixteenth of the wait, so a revision goes at most a
/// sixteenth of the wait late.
const CHECKPOINTS: usize = 16;
/// Revisions looked at in one transaction when forgetting.
const FORGET_PART: usize = 4_096;

/// A sync that completed: its head, and when (ns since the epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Checkpoint {
    pub head: u64,
    pub at_ns: i64,
}

/// What `node.db` keeps of forgetting, for `State`.
pub(super) struct Kept {
    pub forgotten_upto: u64,
    pub forgotten_max_rev: u64,
    pub checkpoints: Vec<Checkpoint>,
}

impl Kept {
    /// As `node.db` holds it: 0 for a value never set, no checkpoints if unreadable
    /// (nothing is forgotten then).
    pub fn load(db: &Db) -> rusqlite::Result<Kept> {
        let number = |key| -> rusqlite::Result<u64> { Ok(db.meta(key)?.and_then(|v| v.parse().ok()).unwrap_or(0)) };
        Ok(Kept {
            forgotten_upto: number(FORGOTTEN_UPTO_KEY)?,
            forgotten_max_rev: number(FORGOTTEN_MAX_REV_KEY)?,
            checkpoints: db.meta(CHECKPOINTS_KEY)?.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default(),
        })
    }
}

impl State {
    /// Whether `entry`, from the queue, is older than a forgotten delete of its path (see
    /// the module): at or below `forgotten_upto`, of a path with no revision here and not
    /// here.
    pub(super) fn older_than_forgotten(&self, entry: &Entry) -> bool {
        entry.rev.0 <= self.forgotten_upto && !self.revs.contains_key(&entry.path) && self.resolve(&entry.path).is_none()
    }

    /// Applies a state from the queue (a broadcast, a page of a sync no longer waited
    /// for): as [`State::apply_remote`], unless it is older than a forgotten delete.
    pub(super) fn apply_queued(&mut self, entry: &Entry, store: &ContentStore) -> FsResult<Applied> {
        if self.older_than_forgotten(entry) {
            tracing::debug!(target: "changes", path = %entry.path, rev = entry.rev.0, forgotten_upto = self.forgotten_upto, "older than a forgotten delete of the path: not applied");
            return Ok(Applied { stale: true, ..Applied::default() });
        }
        self.apply_remote(entry, store)
    }

    /// Records that a sync with head `head` completed now, one checkpoint per sixteenth
    /// of the wait (the list stays short).
    fn add_checkpoint(&mut self, head: u64) -> FsResult<()> {
        let now = self.env.now_ns();
        // A clock set back: checkpoints from its future would stop new ones until it
        // caught up; they go (what they allowed is forgotten later, never earlier).
        let before = self.checkpoints.len();
        self.checkpoints.retain(|c| c.at_ns <= now);
        let step = self.forget_after_ns / CHECKPOINTS as i64;
        let recent = self.checkpoints.last().is_some_and(|c| now.saturating_sub(c.at_ns) < step || c.head >= head);
        if recent && self.checkpoints.len() == before {
            return Ok(());
        }
        if !recent {
            self.checkpoints.push(Checkpoint { head, at_ns: now });
            // The newest one old enough is all that is used of those before it.
            let old_enough = self.checkpoints.iter().rposition(|c| now.saturating_sub(c.at_ns) >= self.forget_after_ns).unwrap_or(0);
            self.checkpoints.drain(..old_enough);
            if self.checkpoints.len() > CHECKPOINTS + 1 {
                self.checkpoints.remove(1);
            }
        }
        let json = serde_json::to_string(&self.checkpoints).expect("checkpoints serialize");
        self.db.set_meta(CHECKPOINTS_KEY, &json)?;
        Ok(())
    }

    /// The head up to which deleted paths' revisions may go now: that of the newest
    /// checkpoint at least the wait old.
    fn forgettable_upto(&self) -> Option<u64> {
        let now = self.env.now_ns();
        self.checkpoints.iter().rev().find(|c| now.saturating_sub(c.at_ns) >= self.forget_after_ns).map(|c| c.head)
    }

    /// Whether the revision of `path`, not here, may go: nothing undecided or deferred at
    /// or below it, and no pending move's old path (its delete, still to be queued, is
    /// based on that revision: based on none, the manager would refuse it and the rename
    /// would become a copy; review of session 47).
    fn may_forget(&self, path: &RelPath) -> bool {
        !self.outbox.has_within(path) && !self.deferred.contains_key(path) && !self.old_path_of_a_move(path)
    }
}

impl Tree {
    /// How long a deleted path's revision is kept at least (`--forget-deletes-after`).
    pub fn set_forget_deletes_after(&self, wait: std::time::Duration) {
        self.lock().forget_after_ns = wait.as_nanos().min(i64::MAX as u128) as i64;
    }

    /// The highest revision up to which deleted paths' revisions were forgotten.
    pub fn forgotten_upto(&self) -> u64 {
        self.lock().forgotten_upto
    }

    /// A sync with head `head` completed with nothing held back (`Tree::set_synced_head`
    /// was just called): recorded as a checkpoint, then the revisions of deleted paths
    /// at or below the newest checkpoint old enough go (see the module). Returns how
    /// many went. Only the revisions taken since the last pass are looked at (and those
    /// that could not go then), [`FORGET_PART`] at a time: the mount is not held for a
    /// pass over the whole tree; the first pass after a start, or after one that failed,
    /// looks at all of them (what a crash, or a path gone without a revision of its own,
    /// left behind).
    pub fn forget_old_deletes(&self, head: u64) -> FsResult<usize> {
        let r = self.forget_pass(head);
        if r.is_err() {
            self.lock().forget_all_next = true;
        }
        r
    }

    fn forget_pass(&self, head: u64) -> FsResult<usize> {
        let started = std::time::Instant::now();
        let (upto, candidates) = {
            let mut st = self.lock();
            st.add_checkpoint(head)?;
            let Some(upto) = st.forgettable_upto().filter(|u| *u > st.forgotten_upto) else {
                return Ok(0);
            };
            let from = if std::mem::take(&mut st.forget_all_next) { 0 } else { st.forgotten_upto };
            let mut candidates = std::mem::take(&mut st.forget_later);
            candidates.extend(st.revs.iter().filter(|(_, r)| from < r.0 && r.0 <= upto).map(|(p, _)| p.clone()));
            // The watermark first: a state from the queue at or below it is stale
            // whether or not its path's revision is gone yet.
            st.db.set_meta(FORGOTTEN_UPTO_KEY, &upto.to_string())?;
            st.forgotten_upto = upto;
            (upto, candidates)
        };
        let mut gone = 0;
        for part in candidates.chunks(FORGET_PART) {
            gone += self
                .atomically(|st, _| {
                    // (Revisions gone, the highest of them.)
                    let mut n = (0, 0);
                    for p in part {
                        // (The lock was let go: what changed meanwhile is looked at again.)
                        if st.revs.get(p).is_none_or(|r| r.0 > upto) || st.resolve(p).is_some() {
                            continue;
                        }
                        if !st.may_forget(p) {
                            st.forget_later.push(p.clone());
                            continue;
                        }
                        if let Some(old) = st.revs.remove(p) {
                            st.record(|| Undo::Rev(p.clone(), Some(old)));
                            st.db.remove_rev(p)?;
                            n.0 += 1;
                            n.1 = n.1.max(old.0);
                        }
                    }
                    // The highest revision taken stays what it was (a sync's `since`, the
                    // deletes vouched for, the `taken` the manager checks), also after a
                    // restart.
                    if n.1 > st.forgotten_max_rev {
                        st.db.set_meta(FORGOTTEN_MAX_REV_KEY, &n.1.to_string())?;
                    }
                    Ok(n)
                })
                .map(|(n, max)| {
                    let mut st = self.lock();
                    st.forgotten_max_rev = st.forgotten_max_rev.max(max);
                    n
                })?;
        }
        let mut st = self.lock();
        st.last_rev = last_revision_in(&st.revs, st.forgotten_max_rev);
        let (looked_at, ms) = (candidates.len(), started.elapsed().as_millis());
        tracing::info!(paths = gone, looked_at, upto, ms, "forgot the revisions of deleted paths");
        Ok(gone)
    }
}
