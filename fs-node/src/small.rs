//! Small contents (up to [`SMALL_MAX`] bytes) kept together in one SQLite file,
//! `<data>/small.db`, instead of one blob file each.
//!
//! A file per content costs an inode on every node for every small file: allocating it
//! is the dearest part of a create on ext4 without a journal (it scans the inode table
//! for recently freed slots, docs/benchmarks.md), every blob costs an open per read and
//! per serve, and a million files are a million inodes in one directory. Here a small
//! content is a row.
//!
//! A put is one frame appended to the database's redo log (`small.db-redo0` and
//! `-redo1`, [`crate::journal`]), one `write`, where a row written by SQLite wrote a log
//! frame for every page it touched (the table's, its overflow page's, the hash index's):
//! a sixth of a node's CPU per create (docs/benchmarks.md, session 32). It outlives a
//! crash of the process once the put returns, like the node database's writes; `sync`
//! makes it outlive a power loss. The contents in the log are also kept in memory
//! (`Logged::pending`), until a thread of its own folds them into the table, about
//! [`FOLD_BYTES`] at a time, in one transaction flushed to disk, and copies SQLite's log
//! into the database after it (a checkpoint): puts never write SQLite themselves.
//!
//! Owned by the content store (`store.rs`), which decides what goes here: every content
//! of at most `SMALL_MAX` bytes it keeps from now on. Blob files of small contents from
//! before stay valid (the store looks here first, then in `blobs/`). Rows are immutable
//! and named by their hash, as blob files are. The database is made on the first put:
//! a node that never keeps a small content never has one.

use crate::journal::{lock_conn, Journal};
use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use wire::ContentHash;

/// The largest content kept here. SQLite reads and writes blobs of this size faster than
/// the file system makes and opens files (sqlite.org/fasterthanfs.html measures the
/// cross-over near 100 KiB); larger ones are files, which the kernel can pass through.
pub const SMALL_MAX: u64 = 64 * 1024;

/// A page cache of 16 MiB keeps the hash index of about 300,000 contents in memory.
/// SQLite's log is copied into the database by the thread that folds, after each fold
/// (`PRAGMA wal_checkpoint(PASSIVE)`: it never waits for a reader), not automatically;
/// the next fold then writes the log from its start again. The connection of folds
/// flushes each commit (`synchronous=FULL`): the redo log's file is started again once
/// its fold committed.
const PRAGMAS: &str =
    "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-16384; PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit=67108864;";

/// Bytes of contents (and [`ROW_WEIGHT`] per content) appended before they are folded
/// into the table: what the log holds in memory, and a fold's transaction.
const FOLD_BYTES: usize = 8 << 20;
/// What a content weighs besides its bytes (its row and index entry), so that many tiny
/// ones are folded too.
const ROW_WEIGHT: usize = 512;

/// Rows in the order they come (new bytes are appended to the file, not put between
/// others by their random hash), found by an index of the 32-byte hashes alone: a small
/// tree that stays in the cache, where a table keyed by the hash would put every new
/// content in a random page of a table of gigabytes. `meta` holds the redo epoch.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS contents (
    id INTEGER PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE, -- the content's 32-byte BLAKE3 hash
    at_ms INTEGER NOT NULL,    -- when it was put (a fresh download is not swept at once)
    bytes BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
";

/// Rows looked at per step of a sweep: the connection is let go between steps, so a
/// read waits for one step at most, never for a sweep of a million rows.
const SWEEP_STEP: usize = 2_000;

/// What a put weighs against [`FOLD_BYTES`].
fn weigh(p: &Put) -> usize {
    p.bytes.len() + ROW_WEIGHT
}

/// One content put, as the redo log keeps it until it is folded into the table.
#[derive(Clone)]
struct Put {
    hash: ContentHash,
    at_ms: i64,
    bytes: Arc<[u8]>,
}

/// A frame: for each put its hash (32 bytes), `at_ms` (i64 LE), length (u32 LE), bytes.
fn encode(puts: &[Put]) -> Vec<u8> {
    let mut out = Vec::with_capacity(puts.iter().map(|p| 44 + p.bytes.len()).sum());
    for p in puts {
        out.extend_from_slice(p.hash.as_bytes());
        out.extend_from_slice(&p.at_ms.to_le_bytes());
        out.extend_from_slice(&(p.bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&p.bytes);
    }
    out
}

fn decode(mut frame: &[u8]) -> anyhow::Result<Vec<Put>> {
    let mut out = Vec::new();
    while !frame.is_empty() {
        anyhow::ensure!(frame.len() >= 44, "a put cut short");
        let hash = ContentHash::from_bytes(frame[..32].try_into().expect("32 bytes"));
        let at_ms = i64::from_le_bytes(frame[32..40].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(frame[40..44].try_into().expect("4 bytes")) as usize;
        anyhow::ensure!(len as u64 <= SMALL_MAX && frame.len() - 44 >= len, "a put of {len} bytes does not fit");
        out.push(Put { hash, at_ms, bytes: Arc::from(&frame[44..44 + len]) });
        frame = &frame[44 + len..];
    }
    Ok(out)
}

/// The redo log, and the bytes of every content in it that is not in the table yet.
struct Logged {
    journal: Journal<Put>,
    /// Each content the journal holds (appended, or being folded and not yet seen to
    /// have committed), with the number of its puts there: it leaves only once every
    /// one of them is folded. A sweep never deletes a row of a content here.
    pending: HashMap<ContentHash, (Arc<[u8]>, usize)>,
}

impl Logged {
    fn add(&mut self, puts: &[Put]) {
        for p in puts {
            self.pending.entry(p.hash.clone()).or_insert_with(|| (p.bytes.clone(), 0)).1 += 1;
        }
    }

    /// These puts are in the table now.
    fn folded(&mut self, puts: &[Put]) {
        for p in puts {
            if let std::collections::hash_map::Entry::Occupied(mut e) = self.pending.entry(p.hash.clone()) {
                e.get_mut().1 -= 1;
                if e.get().1 == 0 {
                    e.remove();
                }
            }
        }
    }

    /// Sees whether a fold committed, and starts one if enough is appended.
    fn maybe_fold(&mut self) {
        if let Some(done) = self.journal.maybe_fold() {
            self.folded(&done);
        }
    }

    /// Everything logged goes into the table now.
    fn fold_all(&mut self) -> rusqlite::Result<()> {
        let (joined, rest) = self.journal.fold_now();
        if let Some(done) = joined {
            self.folded(&done);
        }
        rest?;
        self.pending.clear();
        Ok(())
    }
}

/// Puts are refused once a fold failed and this many batches wait behind it (their
/// bytes are held in memory until a fold takes them).
const STUCK_BATCHES: usize = 8;

pub struct SmallContents {
    path: PathBuf,
    /// Reads, removals and sweeps; `None` until the database exists (made by the first
    /// put).
    conn: Mutex<Option<Connection>>,
    /// `None` until the database exists. Taken before `conn` when both are.
    logged: Mutex<Option<Logged>>,
    /// What a fold takes ([`FOLD_BYTES`]).
    batch: usize,
}

impl std::fmt::Debug for SmallContents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SmallContents({})", self.path.display())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Inserts `puts` in one transaction that also records `epoch`, flushed to disk (the
/// connection's `synchronous=FULL`), then copies SQLite's log into the database.
fn fold_into(conn: &Connection, puts: &mut dyn Iterator<Item = &Put>, epoch: u64) -> rusqlite::Result<()> {
    crate::journal::fold_transaction(conn, epoch, |conn| {
        let mut q = conn.prepare_cached("INSERT OR IGNORE INTO contents (hash, bytes, at_ms) VALUES (?1, ?2, ?3)")?;
        for p in puts {
            q.execute(params![p.hash.as_bytes(), &p.bytes[..], p.at_ms])?;
        }
        Ok(())
    })?;
    if let Err(e) = checkpoint(conn) {
        tracing::debug!("small contents: checkpoint after a fold: {e}");
    }
    Ok(())
}

impl SmallContents {
    /// The small contents at `path`; opened now if the database or its redo log exists
    /// (so that a damaged one stops the node at start, with its name, and what the log
    /// holds goes into the table first), made by the first put otherwise.
    pub fn open(path: &Path) -> anyhow::Result<SmallContents> {
        Self::open_with_batch(path, FOLD_BYTES)
    }

    /// [`Self::open`], folding every `batch` bytes.
    fn open_with_batch(path: &Path, batch: usize) -> anyhow::Result<SmallContents> {
        let s = SmallContents { path: path.to_owned(), conn: Mutex::new(None), logged: Mutex::new(None), batch };
        if path.exists() || (0..2).any(|i| crate::redo::RedoLog::path_for(path, i).exists()) {
            drop(s.logged()?);
        }
        Ok(s)
    }

    fn connect(path: &Path) -> anyhow::Result<Connection> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(2))?;
        conn.execute_batch(PRAGMAS).with_context(|| format!("setting up {}", path.display()))?;
        conn.execute_batch(SCHEMA).with_context(|| format!("making the tables of {}", path.display()))?;
        Ok(conn)
    }

    /// The redo log, opened (and the database made) if it was not yet; what an earlier
    /// run left in it is folded first.
    fn logged(&self) -> anyhow::Result<MutexGuard<'_, Option<Logged>>> {
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.is_none() {
            let folder = Self::connect(&self.path)?;
            folder.execute_batch("PRAGMA synchronous=FULL").with_context(|| format!("setting up {}", self.path.display()))?;
            let epoch = crate::journal::recorded_epoch(&folder).with_context(|| format!("reading {}", self.path.display()))?;
            let folder = Mutex::new(folder);
            let apply = Arc::new(move |puts: &mut dyn Iterator<Item = &Put>, epoch| fold_into(&lock_conn(&folder), puts, epoch));
            let journal = Journal::open(&self.path, epoch, self.batch, "the small contents", apply, decode, weigh)?;
            let mut l = Logged { journal, pending: HashMap::new() };
            let replayed: Vec<Put> = l.journal.newest_first().cloned().collect();
            l.add(&replayed);
            // What the last run left goes into the table; should that fail (a full
            // disk), it stays in the log and in memory, for a later fold.
            if let Err(e) = l.fold_all() {
                tracing::warn!(puts = replayed.len(), "applying the redo log to {} (tried again later): {e}", self.path.display());
            }
            let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            if conn.is_none() {
                *conn = Some(Self::connect(&self.path)?);
            }
            *logged = Some(l);
        }
        Ok(logged)
    }

    /// Runs `f` on the connection; `None` if the database does not exist yet.
    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> anyhow::Result<Option<T>> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = conn.as_ref() else {
            return Ok(None);
        };
        f(c).map(Some).with_context(|| format!("small contents ({})", self.path.display()))
    }

    /// The bytes of those of `hashes` that are in the redo log, not yet in the table.
    fn logged_bytes(&self, hashes: &[ContentHash]) -> Vec<Option<Arc<[u8]>>> {
        let logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        hashes.iter().map(|h| logged.as_ref().and_then(|l| l.pending.get(h).map(|(b, _)| b.clone()))).collect()
    }

    /// Folds everything logged into the table (before a read of the whole table, and at
    /// a clean stop: the next start, perhaps of an older version, finds nothing to
    /// replay).
    pub fn fold(&self) -> anyhow::Result<()> {
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = logged.as_mut() {
            l.fold_all().with_context(|| format!("folding the redo log into {}", self.path.display()))?;
        }
        Ok(())
    }

    /// The bytes of `h`, if they are here.
    pub fn get(&self, h: &ContentHash) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.get_many(std::slice::from_ref(h), usize::MAX)?.pop().flatten())
    }

    /// The size of `h`, if it is here.
    pub fn len(&self, h: &ContentHash) -> Option<u64> {
        if let Some(Some(b)) = self.logged_bytes(std::slice::from_ref(h)).pop() {
            return Some(b.len() as u64);
        }
        self.size_from("looking up", "SELECT length(bytes) FROM contents WHERE hash = ?1", h)
    }

    /// Runs `sql` (one row at most, a content's size, for the hash `?1`); a failure is
    /// logged as `doing` `h` and taken for no row.
    fn size_from(&self, doing: &str, sql: &str, h: &ContentHash) -> Option<u64> {
        match self.with(|c| c.prepare_cached(sql)?.query_row([h.as_bytes()], |r| r.get::<_, i64>(0)).optional()) {
            Ok(size) => size.flatten().map(|n| n as u64),
            Err(e) => {
                tracing::warn!("{doing} {h}: {e:#}");
                None
            }
        }
    }

    pub fn has(&self, h: &ContentHash) -> bool {
        self.len(h).is_some()
    }

    pub fn get_many(&self, hashes: &[ContentHash], mut budget: usize) -> anyhow::Result<Vec<Option<Vec<u8>>>> {
        let logged = self.logged_bytes(hashes);
        let got = self.with(|c| {
            let mut q = c.prepare_cached("SELECT bytes FROM contents WHERE hash = ?1")?;
            let mut out = Vec::with_capacity(hashes.len());
            for (h, in_log) in hashes.iter().zip(logged) {
                let bytes: Option<Vec<u8>> = match in_log {
                    _ if budget == 0 => None,
                    Some(b) => Some(b.to_vec()),
                    None => q.query_row([h.as_bytes()], |r| r.get(0)).optional()?,
                };
                let bytes = bytes.filter(|b| b.len() <= budget);
                budget -= bytes.as_ref().map_or(0, |b| b.len());
                out.push(bytes);
            }
            Ok(out)
        })?;
        Ok(got.unwrap_or_else(|| vec![None; hashes.len()]))
    }

    pub fn put(&self, h: &ContentHash, bytes: &[u8]) -> anyhow::Result<()> {
        self.put_many(&[(h, bytes)])
    }

    /// Keeps these contents: one frame appended to the redo log.
    pub fn put_many(&self, items: &[(&ContentHash, &[u8])]) -> anyhow::Result<()> {
        anyhow::ensure!(items.iter().all(|(_, b)| b.len() as u64 <= SMALL_MAX), "a small content of more than {SMALL_MAX} bytes");
        let at_ms = now_ms();
        let puts: Vec<Put> = items.iter().map(|(h, b)| Put { hash: (*h).clone(), at_ms, bytes: Arc::from(*b) }).collect();
        let payload = encode(&puts);
        let weight = puts.iter().map(weigh).sum();
        let mut logged = self.logged()?;
        let l = logged.as_mut().expect("opened by logged()");
        l.maybe_fold();
        anyhow::ensure!(!l.journal.stuck(STUCK_BATCHES), "{}: folding its redo log keeps failing (see the warnings before)", self.path.display());
        l.journal.append(&payload, puts.iter().cloned(), weight).with_context(|| format!("appending to the redo log of {}", self.path.display()))?;
        l.add(&puts);
        l.maybe_fold();
        Ok(())
    }

    #[cfg(test)]
    pub fn let_go_for_test(&self) {
        if let Some(mut l) = self.logged.lock().unwrap_or_else(|p| p.into_inner()).take() {
            l.journal.join_fold();
        }
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn remove(&self, h: &ContentHash) -> Option<u64> {
        // A content still in the log goes into the table first, so that a later fold
        // cannot bring it back.
        let logged = self.logged_bytes(std::slice::from_ref(h)).pop().flatten().is_some();
        if logged {
            if let Err(e) = self.fold() {
                tracing::warn!("removing {h}: {e:#}");
                return None;
            }
        }
        self.size_from("removing", "DELETE FROM contents WHERE hash = ?1 RETURNING length(bytes)", h)
    }

    /// The contents written before `before` (ms) that the redo log holds: they go into
    /// the table first (a fold that fails, on a full disk, leaves them to a later
    /// sweep). A content the log holds then is not swept: its row may be a fold's that
    /// committed unseen, and the log's memory answers for it until that fold is seen.
    fn in_log_folding_old(&self, before: i64) -> std::collections::HashSet<ContentHash> {
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        match logged.as_mut() {
            Some(l) => {
                if l.journal.newest_first().any(|p| p.at_ms <= before) {
                    if let Err(e) = l.fold_all() {
                        tracing::warn!("sweeping small contents: folding their redo log: {e}");
                    }
                }
                l.pending.keys().cloned().collect()
            }
            None => Default::default(),
        }
    }

    /// Removes those of `candidates` written at least `min_age` ago (as `sweep` would):
    /// a look for each, not a walk of the table; returns what went.
    pub fn remove_old(&self, candidates: &std::collections::HashSet<ContentHash>, min_age: std::time::Duration) -> Vec<ContentHash> {
        let before = now_ms() - min_age.as_millis() as i64;
        let in_log = self.in_log_folding_old(before);
        let removed = self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let mut gone = Vec::new();
            {
                let mut delete = tx.prepare_cached("DELETE FROM contents WHERE hash = ?1 AND at_ms <= ?2")?;
                for h in candidates.iter().filter(|h| !in_log.contains(*h)) {
                    if delete.execute(params![h.as_bytes(), before])? > 0 {
                        gone.push(h.clone());
                    }
                }
            }
            tx.commit()?;
            Ok(gone)
        });
        match removed {
            Ok(gone) => gone.unwrap_or_default(),
            Err(e) => {
                tracing::warn!("removing small contents: {e:#}");
                Vec::new()
            }
        }
    }

    pub fn sweep(&self, unused: &dyn Fn(&ContentHash) -> bool, min_age: std::time::Duration, remove: bool) -> Vec<ContentHash> {
        let before = now_ms() - min_age.as_millis() as i64;
        let in_log = self.in_log_folding_old(before);
        let mut after: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        loop {
            let step = self.with(|c| {
                let rows: Vec<(Vec<u8>, i64)> = c
                    .prepare_cached("SELECT hash, at_ms FROM contents WHERE hash > ?1 ORDER BY hash LIMIT ?2")?
                    .query_map(params![after, SWEEP_STEP as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                let mut gone = Vec::new();
                for (hash, at) in &rows {
                    let Ok(bytes) = <[u8; 32]>::try_from(hash.as_slice()) else {
                        continue;
                    };
                    let h = ContentHash::from_bytes(bytes);
                    if *at > before || in_log.contains(&h) || !unused(&h) {
                        continue;
                    }
                    if !remove || c.prepare_cached("DELETE FROM contents WHERE hash = ?1 AND at_ms <= ?2")?.execute(params![hash, before])? > 0 {
                        gone.push(h);
                    }
                }
                Ok((rows.last().map(|(h, _)| h.clone()), gone))
            });
            match step {
                Ok(Some((Some(last), gone))) => {
                    out.extend(gone);
                    after = last;
                }
                Ok(Some((None, _))) | Ok(None) => return out,
                Err(e) => {
                    tracing::warn!("sweeping small contents: {e:#}");
                    return out;
                }
            }
        }
    }

    pub fn hashes(&self) -> anyhow::Result<Vec<ContentHash>> {
        self.fold()?;
        let rows = self.with(|c| c.prepare("SELECT hash FROM contents")?.query_map([], |r| r.get::<_, Vec<u8>>(0))?.collect::<Result<Vec<_>, _>>())?;
        Ok(rows.unwrap_or_default().into_iter().filter_map(|h| <[u8; 32]>::try_from(h.as_slice()).ok()).map(ContentHash::from_bytes).collect())
    }

    /// Makes every put durable against a power loss: the redo log's files are flushed,
    /// and folded puts are (a fold's commit is flushed; the checkpoint flushes rows an
    /// older version wrote without flushing).
    pub fn sync(&self) -> anyhow::Result<()> {
        // Flushed without holding the log: reads and puts go on meanwhile.
        let handles = self.logged.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|l| l.journal.handles()).transpose();
        for f in handles.with_context(|| format!("opening the redo log of {}", self.path.display()))?.into_iter().flatten() {
            f.sync_data().with_context(|| format!("flushing the redo log of {}", self.path.display()))?;
        }
        self.with(checkpoint)?;
        Ok(())
    }
}

impl Drop for SmallContents {
    /// A fold under way finishes (it is short) before the connections close.
    fn drop(&mut self) {
        if let Some(l) = self.logged.get_mut().unwrap_or_else(|p| p.into_inner()).as_mut() {
            l.journal.join_fold();
        }
    }
}

fn checkpoint(c: &Connection) -> rusqlite::Result<()> {
    c.prepare_cached("PRAGMA wal_checkpoint(PASSIVE)")?.query_row([], |_| Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn hash(b: &[u8]) -> ContentHash {
        ContentHash::from_bytes(*blake3::hash(b).as_bytes())
    }

    #[test]
    fn contents_are_kept_found_removed_and_swept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.db");
        let s = SmallContents::open(&path).unwrap();
        let (a, b) = (b"first".to_vec(), vec![7u8; SMALL_MAX as usize]);
        assert!(!s.has(&hash(&a)) && !path.exists(), "nothing is made before the first put");
        s.put(&hash(&a), &a).unwrap();
        s.put(&hash(&b), &b).unwrap();
        s.put(&hash(&a), &a).unwrap();
        assert_eq!(s.get(&hash(&a)).unwrap(), Some(a.clone()));
        assert_eq!(s.len(&hash(&b)), Some(SMALL_MAX));
        assert_eq!(s.get(&hash(b"other")).unwrap(), None);
        // Young contents stay (in the table too); old ones not kept go.
        s.fold().unwrap();
        assert_eq!(s.sweep(&|_| true, std::time::Duration::from_secs(60), true).len(), 0);
        let keep: HashSet<_> = [hash(&a)].into();
        assert_eq!(s.sweep(&|h| !keep.contains(h), std::time::Duration::ZERO, true).len(), 1);
        assert!(s.has(&hash(&a)) && !s.has(&hash(&b)));
        assert_eq!(s.remove(&hash(&a)), Some(a.len() as u64));
        assert_eq!(s.remove(&hash(&a)), None);
        s.put(&hash(&a), &a).unwrap();
        s.sync().unwrap();
        drop(s);
        let again = SmallContents::open(&path).unwrap();
        assert_eq!(again.hashes().unwrap(), vec![hash(&a)], "contents outlive the process");
    }

    #[test]
    fn a_sweep_goes_through_more_rows_than_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let s = SmallContents::open(&dir.path().join("small.db")).unwrap();
        let all: Vec<Vec<u8>> = (0..(SWEEP_STEP * 2 + 10) as u32).map(|i| i.to_le_bytes().to_vec()).collect();
        for b in &all {
            s.put(&hash(b), b).unwrap();
        }
        let keep: HashSet<_> = all.iter().step_by(3).map(|b| hash(b)).collect();
        assert_eq!(s.sweep(&|h| !keep.contains(h), std::time::Duration::ZERO, true).len(), all.len() - keep.len());
        assert_eq!(s.hashes().unwrap().len(), keep.len());
    }

    fn numbered(n: u32, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        b[..4].copy_from_slice(&n.to_le_bytes());
        b
    }

    /// Puts read back at once, from the log; after a crash (the process gone without a
    /// fold), across folds made in the background and folds that failed (so that both
    /// log files hold puts), every content comes back, and opening folded both files.
    #[test]
    fn puts_come_back_after_a_crash_across_folds() {
        for fail_folds in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("small.db");
            let s = SmallContents::open(&path).unwrap();
            let first = numbered(0, 100);
            s.put(&hash(&first), &first).unwrap();
            assert_eq!(s.get(&hash(&first)).unwrap(), Some(first.clone()), "a put reads back before any fold");
            s.logged.lock().unwrap().as_mut().unwrap().journal.fail_folds_after = fail_folds.then_some(1);
            let mut n = 1;
            let started = |s: &SmallContents| s.logged.lock().unwrap().as_ref().unwrap().journal.folds_started;
            while (n as usize) * (40 * 1024 + ROW_WEIGHT) < 3 * FOLD_BYTES || (fail_folds && started(&s) < 2) {
                let b = numbered(n, 40 * 1024);
                s.put(&hash(&b), &b).unwrap();
                n += 1;
            }
            // One more after the last switch of files.
            let last = numbered(n, 40 * 1024);
            s.put(&hash(&last), &last).unwrap();
            n += 1;
            if fail_folds {
                let on_disk = [0, 1].map(|i| std::fs::metadata(crate::redo::RedoLog::path_for(&path, i)).unwrap().len() > 0);
                assert_eq!(on_disk, [true, true], "the failed fold's file and the one appended to since");
            }
            s.let_go_for_test();
            std::mem::forget(s);

            let s = SmallContents::open(&path).unwrap();
            assert!([0, 1].iter().all(|&i| std::fs::metadata(crate::redo::RedoLog::path_for(&path, i)).unwrap().len() == 0), "opening folded both files");
            assert_eq!(s.get(&hash(&first)).unwrap(), Some(first.clone()), "fail_folds {fail_folds}");
            for k in 1..n {
                let b = numbered(k, 40 * 1024);
                assert_eq!(s.len(&hash(&b)), Some(b.len() as u64), "content {k}, fail_folds {fail_folds}");
            }
            assert_eq!(s.hashes().unwrap().len(), n as usize);
        }
    }

    /// A removed content that was still in the log stays removed (a later fold does not
    /// bring it back), and puts that never stop do not make SQLite's log grow without
    /// end: each fold's checkpoint lets the next fold write it from its start again.
    #[test]
    fn removals_hold_and_the_sqlite_log_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.db");
        let s = SmallContents::open(&path).unwrap();
        let gone = numbered(u32::MAX, 1000);
        s.put(&hash(&gone), &gone).unwrap();
        assert_eq!(s.remove(&hash(&gone)), Some(1000));
        assert!(!s.has(&hash(&gone)));
        let folds = |s: &SmallContents| s.logged.lock().unwrap().as_ref().unwrap().journal.folds();
        let mut n = 0;
        while folds(&s) < 6 {
            let b = numbered(n, 60 * 1024);
            s.put(&hash(&b), &b).unwrap();
            n += 1;
        }
        s.fold().unwrap();
        assert!(!s.has(&hash(&gone)), "a fold brought a removed content back");
        let wal = std::fs::metadata(dir.path().join("small.db-wal")).unwrap().len();
        assert!(wal < 3 * FOLD_BYTES as u64, "SQLite's log grew fold after fold: {wal} bytes after {} folds", folds(&s));
    }

    /// A content put again after its first put was folded stays in the log's memory
    /// until its second put is folded too, so a removal folds first and no fold brings
    /// it back; and a sweep leaves a content the log holds, even when a fold that put
    /// its row in the table committed unseen: that fold being seen later must not leave
    /// it with neither a row nor a place in memory.
    #[test]
    fn the_log_answers_for_a_content_until_its_every_put_is_folded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.db");
        // Every put starts a fold.
        let s = SmallContents::open_with_batch(&path, 1).unwrap();
        let twice = numbered(1, 2000);
        s.put(&hash(&twice), &twice).unwrap();
        s.put(&hash(&twice), &twice).unwrap();
        let pending = |s: &SmallContents, h: &ContentHash| s.logged.lock().unwrap().as_ref().unwrap().pending.get(h).map(|(_, n)| *n);
        let wait_for_fold = |s: &SmallContents| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !s.logged.lock().unwrap().as_ref().unwrap().journal.fold_ended_for_test() {
                assert!(std::time::Instant::now() < deadline, "the fold never ended");
                std::thread::yield_now();
            }
        };
        wait_for_fold(&s);
        assert!(pending(&s, &hash(&twice)).is_some(), "the second put is not folded yet");
        assert_eq!(s.remove(&hash(&twice)), Some(2000));
        s.fold().unwrap();
        assert!(!s.has(&hash(&twice)), "a fold brought a removed content back");

        // A fold of `old` commits; nothing has looked at it yet when the sweep comes.
        let old = numbered(2, 3000);
        s.put(&hash(&old), &old).unwrap();
        wait_for_fold(&s);
        s.with(|c| c.execute("UPDATE contents SET at_ms = 0", [])).unwrap();
        assert_eq!(pending(&s, &hash(&old)), Some(1));
        let swept = s.sweep(&|_| true, std::time::Duration::from_secs(60), true);
        assert!(!swept.contains(&hash(&old)), "swept a content the log still answers for");
        // The next put sees the fold: `old` leaves the log's memory, its row stays.
        let other = numbered(3, 100);
        s.put(&hash(&other), &other).unwrap();
        assert_eq!(pending(&s, &hash(&old)), None);
        assert_eq!(s.get(&hash(&old)).unwrap(), Some(old.clone()));
    }
}
