//! Writes to a SQLite database that go first to a redo log pair beside it (`<db>-redo0`
//! and `<db>-redo1`, frames of [`crate::redo`]) and into SQLite later, a batch at a time:
//! the node database (`db.rs`, its tree's transactions) and the small contents
//! (`small.rs`, the bytes of closed files) both write this way. An append is one `write`
//! where a SQLite commit wrote a 4 KiB log frame for every page it touched (most of a
//! delete's time, and the small-content row a sixth of a create's, docs/benchmarks.md,
//! sessions 31 and 32).
//!
//! Once the writes appended weigh enough, a thread of its own applies them to SQLite in
//! one transaction, committed and flushed, that also records the next epoch (a fold),
//! while new frames go to the other file; that file is emptied by the fold's thread once
//! the fold of its frames committed, and started again (with a mark of what the other
//! file holds, `redo::Prior`) at the next fold. Opening reads back what both files hold,
//! oldest epoch first, and leaves out a file's frames after a mark the other file does
//! not live up to (a power loss kept them and not all of the other's); the owner folds
//! what it read before anything else. Nothing at the switch of files waits for the disk:
//! it happens in an append, under the owner's lock (the tree's, for the node database). A [`Journal`] owns
//! the two files and the writes not yet in SQLite; its owner decides what a write is
//! (`T`), how a frame encodes it, and how a batch is applied.

use crate::redo::{Prior, ReadBack, RedoLog};
use anyhow::Context;
use rusqlite::{Connection, OptionalExtension};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// The key, in the database's `meta(key, value)` table, of the epoch its last fold
/// recorded.
const EPOCH_KEY: &str = "redo_epoch";

/// The epoch the database's last fold recorded (0 before the first).
pub fn recorded_epoch(conn: &Connection) -> anyhow::Result<u64> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [EPOCH_KEY], |r| r.get::<_, String>(0))
        .optional()?
        .map(|v| v.parse().context("corrupt redo epoch"))
        .transpose()
        .map(|e| e.unwrap_or(0))
}

/// A fold's transaction: what `apply` writes, and `epoch` recorded, committed together
/// (flushed to disk by a connection with `synchronous=FULL`), or rolled back.
pub fn fold_transaction(conn: &Connection, epoch: u64, apply: impl FnOnce(&Connection) -> rusqlite::Result<()>) -> rusqlite::Result<()> {
    conn.prepare_cached("BEGIN")?.execute([])?;
    let applied = apply(conn).and_then(|()| {
        conn.prepare_cached("INSERT INTO meta(key, value) VALUES(?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")?
            .execute([EPOCH_KEY, &epoch.to_string()])?;
        conn.prepare_cached("COMMIT")?.execute([]).map(drop)
    });
    if applied.is_err() {
        let _ = conn.prepare_cached("ROLLBACK").and_then(|mut s| s.execute([]));
    }
    applied
}

/// A connection's lock, also after a fold's thread panicked holding it (its
/// transaction, if one was left open, is rolled back).
pub fn lock_conn(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    conn.lock().unwrap_or_else(|poisoned| {
        conn.clear_poison();
        let c = poisoned.into_inner();
        if !c.is_autocommit() {
            let _ = c.execute_batch("ROLLBACK");
        }
        c
    })
}

/// Applies a batch of writes (oldest first) to the database in one transaction that
/// also records the epoch given, committed and flushed to disk before it returns.
pub type Apply<T> = Arc<dyn Fn(&mut dyn Iterator<Item = &T>, u64) -> rusqlite::Result<()> + Send + Sync>;

/// An append waits for the fold under way once this many batches wait behind it.
const BACKLOG_BATCHES: usize = 2;

/// The writes not yet in SQLite: those appended to the file being appended to, and
/// those of a fold under way (the other file's).
pub struct Journal<T> {
    logs: [RedoLog; 2],
    /// The log file new frames go to; the other one's frames are folded (or being).
    current: usize,
    /// Appended to `logs[current]`, not handed to a fold, in order.
    unfolded: Vec<T>,
    /// What `unfolded` weighs (as its appends said).
    unfolded_weight: usize,
    /// The fold of the other file's writes, under way or failed (to be tried again).
    folding: Option<Fold<T>>,
    /// Which files a fold's thread emptied after its commit (`RedoLog::empty`): they
    /// are not cut again when started.
    emptied: [bool; 2],
    /// Frames were left out at opening (after a mark the other file did not live up
    /// to): the fold at opening runs even with nothing to fold, to record an epoch
    /// newer than theirs.
    left_out: bool,
    /// A fold starts once `unfolded` weighs this much (more after one failed).
    fold_at: usize,
    /// `fold_at` after a fold: what a batch weighs.
    batch_weight: usize,
    folds: u64,
    apply: Apply<T>,
    /// The database, in log messages ("the node database").
    what: &'static str,
    /// Folds started in the background after this many fail (before they commit).
    #[cfg(test)]
    pub fail_folds_after: Option<u64>,
    #[cfg(test)]
    pub folds_started: u64,
}

/// Told when a fold's thread ends, committed or failed: what a long pass that would
/// otherwise outpace the folds waits for, without holding anything ([`Journal::behind`]).
#[derive(Default)]
pub struct FoldEnd {
    ended: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl FoldEnd {
    fn end(&self) {
        *self.ended.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Waits until the fold ended, `limit` at most.
    pub fn wait(&self, limit: std::time::Duration) {
        let ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.cv.wait_timeout_while(ended, limit, |ended| !*ended);
    }
}

/// Ends a fold's `FoldEnd` when its thread ends, however it ends.
struct EndsFold(Arc<FoldEnd>);

impl Drop for EndsFold {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// The writes of one log file being applied to SQLite by a thread of its own; once
/// committed, the database says `epoch` (that file's frames are older).
struct Fold<T> {
    items: Arc<Vec<T>>,
    epoch: u64,
    /// The log file whose frames these are (0 or 1).
    file: usize,
    /// `None` once it failed (it is started again later). Its result says whether it
    /// emptied the file too.
    thread: Option<std::thread::JoinHandle<rusqlite::Result<bool>>>,
    /// Told when `thread` ends.
    end: Arc<FoldEnd>,
}

impl<T: Send + Sync + 'static> Journal<T> {
    /// Opens (or makes) the log files of the database at `db_path`, whose last fold
    /// recorded `epoch`, with what they hold that was not folded: every frame of `epoch`
    /// or later, oldest epoch first, turned into writes by `decode` (each weighing what
    /// `weigh` says). A fold starts once the writes appended weigh `batch_weight`.
    pub fn open(
        db_path: &Path,
        epoch: u64,
        batch_weight: usize,
        what: &'static str,
        apply: Apply<T>,
        mut decode: impl FnMut(&[u8]) -> anyhow::Result<Vec<T>>,
        weigh: impl Fn(&T) -> usize,
    ) -> anyhow::Result<Journal<T>> {
        // Frames of both files not folded yet, oldest epoch first (each file holds one
        // epoch's, apart from older ones that are skipped).
        let mut logs = Vec::new();
        let mut reads = Vec::new();
        for i in 0..2 {
            let log_path = RedoLog::path_for(db_path, i);
            let (log, read) = RedoLog::open(&log_path, epoch).with_context(|| format!("reading {}", log_path.display()))?;
            logs.push(log);
            reads.push(read);
        }
        // The next epoch is newer than any whole frame read, also those left out below:
        // the fold at opening records it, so that a frame left out can never be taken
        // for an unfolded one later (were its cut below lost, or never made).
        let newest = reads.iter().filter_map(ReadBack::newest).fold(epoch, u64::max);
        // A file started for a new epoch marked how long the other file was, whose frames
        // were not flushed then: if the other file now ends its frames of that epoch
        // earlier (a power loss kept the later file's frames and not all of the earlier
        // one's), what follows the mark is not a prefix of what was appended, and is
        // left out, and cut for good. A mark of an epoch the database folded says nothing.
        let mut left_out = false;
        for i in 0..2 {
            let short =
                reads[i].priors.iter().filter(|(_, p, _)| p.epoch >= epoch && reads[1 - i].end_of(p.epoch) < p.len).min_by_key(|(from, ..)| *from).copied();
            if let Some((from, _, at)) = short {
                let dropped = reads[i].frames.iter().filter(|(e, _)| *e >= from).count();
                tracing::warn!(
                    log = %RedoLog::path_for(db_path, i).display(),
                    dropped,
                    "the other redo log of {what} lost frames that came before these (a power loss before they reached the disk): these are left out too",
                );
                reads[i].frames.retain(|(e, _)| *e < from);
                if let Err(e) = logs[i].cut_for_good(at) {
                    tracing::warn!(log = %RedoLog::path_for(db_path, i).display(), "cutting the frames left out of the redo log of {what} (the fold at opening skips them): {e}");
                }
                left_out = true;
            }
        }
        let mut frames = Vec::new();
        for (i, read) in reads.into_iter().enumerate() {
            for (n, (e, frame)) in read.frames.into_iter().enumerate() {
                frames.push((e, i, n, frame));
            }
        }
        frames.sort_by_key(|&(e, i, n, _)| (e, i, n));
        let mut unfolded = Vec::new();
        for (e, i, n, frame) in &frames {
            unfolded.extend(decode(frame).with_context(|| format!("frame {n} (epoch {e}) of {}", RedoLog::path_for(db_path, *i).display()))?);
        }
        let mut logs: [RedoLog; 2] = logs.try_into().map_err(|_| anyhow::anyhow!("two redo logs"))?;
        for log in &mut logs {
            log.continue_at(newest);
        }
        let unfolded_weight = unfolded.iter().map(weigh).sum();
        Ok(Journal {
            logs,
            current: 0,
            unfolded,
            unfolded_weight,
            folding: None,
            emptied: [false; 2],
            left_out,
            fold_at: batch_weight,
            batch_weight,
            folds: 0,
            apply,
            what,
            #[cfg(test)]
            fail_folds_after: None,
            #[cfg(test)]
            folds_started: 0,
        })
    }

    /// Appends one frame (`payload`, which encodes `items`, weighing `weight`): once it
    /// returns, the writes outlive a crash of the process.
    pub fn append(&mut self, payload: &[u8], items: impl IntoIterator<Item = T>, weight: usize) -> std::io::Result<()> {
        let current = self.current;
        self.logs[current].append(payload)?;
        self.unfolded.extend(items);
        self.unfolded_weight += weight;
        Ok(())
    }

    /// Sees whether the fold under way is done, and starts one once the appended writes
    /// weigh enough: the file being appended to is handed to it, and new frames go to
    /// the other file (whose frames the fold before folded), for the next epoch. Returns
    /// the writes of a fold that committed since the last call. (One that took 5 ms or
    /// more is logged at debug level, target `timing`: it runs under its owner's lock.)
    pub fn maybe_fold(&mut self) -> Option<Arc<Vec<T>>> {
        let started = std::time::Instant::now();
        let folded = self.fold_if_due();
        let took = started.elapsed();
        if took >= std::time::Duration::from_millis(5) {
            tracing::debug!(target: "timing", what = self.what, took_us = took.as_micros() as u64, "maybe_fold");
        }
        folded
    }

    /// `maybe_fold`'s work.
    fn fold_if_due(&mut self) -> Option<Arc<Vec<T>>> {
        let mut folded = self.finish_fold(false);
        if self.unfolded_weight < self.fold_at {
            return folded;
        }
        // Appends that outpace the folds wait for the one under way: what is not folded
        // is held in memory and goes into the next fold's one transaction.
        if self.unfolded_weight >= BACKLOG_BATCHES * self.batch_weight && self.folding.as_ref().is_some_and(|f| f.thread.is_some()) {
            let t = std::time::Instant::now();
            folded = self.finish_fold(true);
            tracing::debug!(target: "timing", what = self.what, took_us = t.elapsed().as_micros() as u64, "maybe_fold: waited for the fold");
        }
        match &mut self.folding {
            None => {
                // What is replayed after a power loss must be a prefix of what was
                // appended: the next epoch's file begins with a mark of how long this
                // one is (a reader that finds this one shorter leaves the next one's
                // frames out), so that this one need not reach the disk first.
                let handed = self.current;
                let prior = Prior { epoch: self.logs[handed].epoch(), len: self.logs[handed].len() };
                let epoch = prior.epoch + 1;
                let next = 1 - handed;
                if let Err(e) = self.logs[next].start(epoch, Some(prior), self.emptied[next]) {
                    // (A full disk.) Without the mark, the file handed to the fold must
                    // reach the disk before the other one gets a frame.
                    if let Err(e2) = self.logs[handed].sync().and_then(|()| self.logs[next].start(epoch, None, false)) {
                        tracing::warn!("starting the other redo log of {} for a fold (tried again at the next append): {e}; {e2}", self.what);
                        return folded;
                    }
                }
                self.emptied[next] = false;
                self.current = next;
                let items = Arc::new(std::mem::take(&mut self.unfolded));
                self.unfolded_weight = 0;
                self.fold_at = self.batch_weight;
                let end = Arc::new(FoldEnd::default());
                let thread = self.spawn_fold(items.clone(), epoch, handed, end.clone());
                self.folding = Some(Fold { thread, items, epoch, file: handed, end });
            }
            // A failed fold goes again (the file being appended to keeps growing).
            Some(fold) if fold.thread.is_none() => {
                let (items, epoch, file) = (fold.items.clone(), fold.epoch, fold.file);
                let end = Arc::new(FoldEnd::default());
                let thread = self.spawn_fold(items, epoch, file, end.clone());
                let fold = self.folding.as_mut().expect("matched");
                (fold.thread, fold.end) = (thread, end);
                self.fold_at = self.unfolded_weight + self.batch_weight;
            }
            Some(_) => {}
        }
        folded
    }

    /// Joins the thread of the fold under way if it is done (or, with `wait`, once it
    /// is): a fold that committed is over, and its writes are returned; one that failed
    /// stays, to be tried again.
    fn finish_fold(&mut self, wait: bool) -> Option<Arc<Vec<T>>> {
        let fold = self.folding.as_mut()?;
        if !fold.thread.as_ref().is_some_and(|t| wait || t.is_finished()) {
            return None;
        }
        match fold.thread.take().expect("checked").join() {
            Ok(Ok(emptied)) => {
                self.folds += 1;
                self.emptied[fold.file] = emptied;
                return self.folding.take().map(|f| f.items);
            }
            Ok(Err(e)) => tracing::warn!(writes = fold.items.len(), "folding the redo log into {} (tried again later): {e}", self.what),
            Err(_) => tracing::warn!(writes = fold.items.len(), "folding the redo log into {} panicked (tried again later)", self.what),
        }
        None
    }

    /// The thread of a fold; `None` if it could not be started (the fold counts as
    /// failed, and is tried again later).
    /// Once committed, it empties `file`, whose frames these are (a failure to is only
    /// logged: the file is cut when it is started again).
    fn spawn_fold(&mut self, items: Arc<Vec<T>>, epoch: u64, file: usize, end: Arc<FoldEnd>) -> Option<std::thread::JoinHandle<rusqlite::Result<bool>>> {
        let apply = self.apply.clone();
        let what = self.what;
        let handle = self.logs[file].handle().inspect_err(|e| tracing::warn!("a handle of the redo log of {what} for its fold: {e}")).ok();
        #[cfg(test)]
        let fail = {
            self.folds_started += 1;
            self.fail_folds_after.is_some_and(|n| self.folds_started > n)
        };
        #[cfg(not(test))]
        let fail = false;
        std::thread::Builder::new()
            .name("db-fold".into())
            .spawn(move || {
                let _ends = EndsFold(end);
                if fail {
                    return Err(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                        Some("injected: the fold fails".into()),
                    ));
                }
                apply(&mut items.iter(), epoch)?;
                Ok(handle.is_some_and(|h| RedoLog::empty(&h).inspect_err(|e| tracing::warn!("emptying the redo log of {what} after its fold: {e}")).is_ok()))
            })
            .inspect_err(|e| tracing::warn!("starting a thread to fold the redo log of {} (tried again later): {e}", self.what))
            .ok()
    }

    /// Applies every write not yet in SQLite (after the fold under way, if any) in one
    /// transaction, flushed to disk, and starts both log files again, for a new epoch
    /// recorded in that transaction: once it returns `Ok`, everything appended is in
    /// SQLite. Also returns the writes of the fold under way if it committed (they are
    /// in SQLite whatever the rest did).
    pub fn fold_now(&mut self) -> (Option<Arc<Vec<T>>>, rusqlite::Result<()>) {
        let joined = self.finish_fold(true);
        (joined, self.fold_rest())
    }

    fn fold_rest(&mut self) -> rusqlite::Result<()> {
        if self.unfolded.is_empty() && self.folding.is_none() && !self.left_out {
            return Ok(());
        }
        let epoch = self.logs[self.current].epoch() + 1;
        let failed = self.folding.as_ref().map(|f| f.items.clone()).unwrap_or_default();
        (self.apply)(&mut failed.iter().chain(self.unfolded.iter()), epoch)?;
        self.folding = None;
        self.unfolded.clear();
        self.unfolded_weight = 0;
        self.left_out = false;
        for (log, emptied) in self.logs.iter_mut().zip(&mut self.emptied) {
            // Without a mark: both files start empty, and everything is in the database.
            let _ = log.start(epoch, None, std::mem::take(emptied));
        }
        self.fold_at = self.batch_weight;
        self.folds += 1;
        Ok(())
    }

    /// The end of the fold under way, if a whole batch waits behind it already: the
    /// next appends would soon wait for that fold (under their caller's locks), and a
    /// long pass that can wait lets it end first.
    pub fn behind(&self) -> Option<Arc<FoldEnd>> {
        self.folding.as_ref().filter(|f| f.thread.is_some() && self.unfolded_weight >= self.batch_weight).map(|f| f.end.clone())
    }

    /// Whether the fold of the other file failed (it is tried again) and the writes
    /// appended since weigh `batches` batches or more: an owner that holds its writes in
    /// memory refuses more.
    pub fn stuck(&self, batches: usize) -> bool {
        self.folding.as_ref().is_some_and(|f| f.thread.is_none()) && self.unfolded_weight >= batches * self.batch_weight
    }

    /// The writes not in SQLite yet, newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &T> {
        self.unfolded.iter().rev().chain(self.folding.iter().flat_map(|f| f.items.iter().rev()))
    }

    /// Folds committed since the journal was opened.
    pub fn folds(&self) -> u64 {
        self.folds
    }

    /// Handles of both log files: flushing them (`sync_data`), also later and without
    /// holding the journal, makes durable against a power loss every append made before
    /// this call (what was folded is: a fold's commit is flushed; the other file holds
    /// the writes of a fold under way, or folded ones).
    pub fn handles(&self) -> std::io::Result<[std::fs::File; 2]> {
        Ok([self.logs[0].handle()?, self.logs[1].handle()?])
    }

    /// Waits for the fold under way, if any, to end (its outcome is not looked at).
    pub fn join_fold(&mut self) {
        if let Some(t) = self.folding.as_mut().and_then(|f| f.thread.take()) {
            let _ = t.join();
        }
    }

    /// Whether the fold under way, if any, has ended (committed or failed), for tests.
    #[cfg(test)]
    pub fn fold_ended_for_test(&self) -> bool {
        self.folding.as_ref().is_none_or(|f| f.thread.as_ref().is_none_or(|t| t.is_finished()))
    }

    /// The log file being appended to (0 or 1), for tests.
    #[cfg(test)]
    pub fn current(&self) -> usize {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal of numbers on a database at `db` whose folds do what `apply` does
    /// (nothing is written to SQLite: what the files hold is what is looked at).
    fn open(db: &Path, epoch: u64, apply: Apply<u64>) -> Journal<u64> {
        let decode = |b: &[u8]| -> anyhow::Result<Vec<u64>> { Ok(vec![u64::from_le_bytes(b.try_into()?)]) };
        Journal::open(db, epoch, 4, "the test database", apply, decode, |_| 1).unwrap()
    }

    fn failing() -> Apply<u64> {
        Arc::new(|_, _| Err(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR), Some("the test's folds fail".into()))))
    }

    fn unfolded(j: &Journal<u64>) -> Vec<u64> {
        let mut v: Vec<u64> = j.newest_first().copied().collect();
        v.reverse();
        v
    }

    fn append(j: &mut Journal<u64>, n: u64) {
        j.append(&n.to_le_bytes(), [n], 1).unwrap();
        j.maybe_fold();
    }

    /// A new database's journal, whose folds fail, given 0..10 and dropped: 0..4 in the
    /// first file, then a mark and the rest in the second. Returns the temporary
    /// directory (to keep) and the database's path.
    fn ten_across_both_files() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("test.db");
        let mut j = open(&db, 0, failing());
        for n in 0..10 {
            append(&mut j, n);
        }
        assert_eq!(j.current(), 1, "the fourth append moved on to the second file");
        j.join_fold();
        drop(j);
        (dir, db)
    }

    /// The switch to the second file does not flush the first: a power loss may keep
    /// the second's frames and lose the end of the first. The second begins with a mark
    /// of how long the first was, and its frames are left out when the first is
    /// shorter, so that what comes back is a prefix of what was appended; a mark of an
    /// epoch the database folded already says nothing.
    #[test]
    fn frames_after_a_mark_the_other_file_does_not_live_up_to_are_left_out() {
        let (_dir, db) = ten_across_both_files();
        assert_eq!(unfolded(&open(&db, 0, failing())), (0..10).collect::<Vec<_>>(), "both files whole: everything, in order");

        let first = RedoLog::path_for(&db, 0);
        let len = std::fs::metadata(&first).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&first).unwrap().set_len(len - 1).unwrap();
        let j = open(&db, 0, failing());
        assert_eq!(unfolded(&j), vec![0, 1, 2], "the first file lost its last frame: nothing of the second comes back");
        drop(j);

        // Again, with the first file's epoch folded into the database: the second's
        // frames are all that is unfolded, whatever became of the first.
        let (_dir, db) = ten_across_both_files();
        std::fs::OpenOptions::new().write(true).open(RedoLog::path_for(&db, 0)).unwrap().set_len(0).unwrap();
        assert_eq!(unfolded(&open(&db, 1, failing())), (4..10).collect::<Vec<_>>());
    }

    /// Frames left out at opening (after a mark the other file did not live up to) never
    /// come back: their file is cut at the mark, and the fold at opening, which runs even
    /// with nothing to fold, records an epoch newer than theirs, so that they are skipped
    /// even were the cut and the fold's emptying lost (found by a review: the fold used to
    /// record the left-out frames' own epoch, or, with nothing else unfolded, nothing).
    #[test]
    fn frames_left_out_at_opening_never_come_back() {
        for lost_of_the_first in [1, u64::MAX] {
            let (_dir, db) = ten_across_both_files();
            let (first, second) = (RedoLog::path_for(&db, 0), RedoLog::path_for(&db, 1));
            let len = std::fs::metadata(&first).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&first).unwrap().set_len(len.saturating_sub(lost_of_the_first)).unwrap();
            let (first_bytes, second_bytes) = (std::fs::read(&first).unwrap(), std::fs::read(&second).unwrap());

            // The folds' (epoch, numbers).
            type Folds = Arc<Mutex<Vec<(u64, Vec<u64>)>>>;
            let folds: Folds = Default::default();
            let recorded = folds.clone();
            let recording: Apply<u64> = Arc::new(move |items, epoch| {
                recorded.lock().unwrap().push((epoch, items.copied().collect()));
                Ok(())
            });
            let mut j = open(&db, 0, recording);
            let kept: Vec<u64> = if lost_of_the_first == 1 { vec![0, 1, 2] } else { vec![] };
            assert_eq!(unfolded(&j), kept);
            assert_eq!(std::fs::metadata(&second).unwrap().len(), 0, "the second file is cut at its mark");
            j.fold_now().1.unwrap();
            let (epoch, folded) = folds.lock().unwrap().pop().expect("the fold at opening runs, also with nothing to fold");
            assert_eq!(folded, kept);
            assert!(epoch > 1, "the fold records an epoch newer than the left-out frames' (1): {epoch}");
            drop(j);

            // The cut and the fold's emptying lost: the files as they were found.
            std::fs::write(&first, &first_bytes).unwrap();
            std::fs::write(&second, &second_bytes).unwrap();
            assert_eq!(unfolded(&open(&db, epoch, failing())), Vec::<u64>::new(), "nothing left out comes back");
        }
    }

    /// A fold's thread empties the file it folded once it committed; the switch back to
    /// that file does not cut it again, and writes the mark first.
    #[test]
    fn a_fold_empties_its_file_and_the_next_switch_starts_it_with_a_mark() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("test.db");
        let mut j = open(&db, 0, Arc::new(|_, _| Ok(())));
        for n in 0..4 {
            append(&mut j, n);
        }
        assert_eq!(j.current(), 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !j.fold_ended_for_test() {
            assert!(std::time::Instant::now() < deadline, "the fold did not end");
            std::thread::yield_now();
        }
        let first = RedoLog::path_for(&db, 0);
        assert_eq!(std::fs::metadata(&first).unwrap().len(), 0, "emptied by the fold");
        for n in 4..8 {
            append(&mut j, n);
        }
        assert_eq!((j.current(), j.folds()), (0, 1), "back on the first file once the first fold was joined");
        j.join_fold();
        drop(j);
        let (_, read) = RedoLog::open(&first, 0).unwrap();
        // The second file then held its mark and four numbers: 24 bytes of header per
        // frame, 16 of mark, 8 per number (its fold has emptied it since).
        let second = (24 + 16) + 4 * (24 + 8);
        assert_eq!(read.priors, vec![(2, Prior { epoch: 1, len: second }, 0)], "the mark: the second file's epoch and length");
        assert!(read.frames.is_empty());
    }

    /// While a fold is under way with a whole batch appended behind it, `behind` hands
    /// out its end: a pass waiting on it outside any lock wakes when the fold ends.
    #[test]
    fn a_pass_can_wait_for_a_fold_the_appends_outpace() {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = Mutex::new(held);
        let apply: Apply<u64> = Arc::new(move |_, _| {
            let _ = held.lock().unwrap().recv();
            Ok(())
        });
        let dir = tempfile::tempdir().unwrap();
        let mut j = open(&dir.path().join("test.db"), 0, apply);
        for n in 0..4 {
            append(&mut j, n);
        }
        assert!(j.behind().is_none(), "a fold under way, nothing behind it yet");
        for n in 4..8 {
            append(&mut j, n);
        }
        let end = j.behind().expect("a whole batch behind the fold");
        let limit = std::time::Duration::from_secs(60);
        let waiter = std::thread::spawn(move || {
            let t = std::time::Instant::now();
            end.wait(limit);
            t.elapsed()
        });
        release.send(()).unwrap();
        assert!(waiter.join().unwrap() < limit, "woken by the fold's end, not by the limit");
        drop(release);
        j.join_fold();
    }

    /// A switch whose mark cannot be written (a full disk) flushes the file it hands to
    /// the fold and starts the other without a mark: appends go on, the other file has
    /// no mark, and everything appended comes back, in order.
    #[test]
    fn a_switch_that_cannot_write_its_mark_goes_on_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("test.db");
        let mut j = open(&db, 0, failing());
        j.logs[1].marks_fail = true;
        for n in 0..10 {
            append(&mut j, n);
        }
        assert_eq!(j.current(), 1, "the fourth append moved on to the second file");
        j.join_fold();
        drop(j);
        let (_, read) = RedoLog::open(&RedoLog::path_for(&db, 1), 0).unwrap();
        assert!(read.priors.is_empty(), "no mark: {:?}", read.priors);
        assert_eq!(read.frames.len(), 6, "the numbers after the switch");
        assert_eq!(unfolded(&open(&db, 0, failing())), (0..10).collect::<Vec<_>>(), "everything, in order");
    }
}
