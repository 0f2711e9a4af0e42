//! Small contents (up to [`SMALL_MAX`] bytes) kept together in one SQLite file,
//! `<data>/small.db`, instead of one blob file each.
//!
//! A file per content costs an inode on every node for every small file: allocating it
//! is the dearest part of a create on ext4 without a journal (it scans the inode table
//! for recently freed slots, docs/benchmarks.md), every blob costs an open per read and
//! per serve, and a million files are a million inodes in one directory. Here a small
//! content is a row, written in one transaction (durable against a crash of the process
//! like the node database; `sync` makes it durable against power loss).
//!
//! Owned by the content store (`store.rs`), which decides what goes here: every content
//! of at most `SMALL_MAX` bytes it keeps from now on. Blob files of small contents from
//! before stay valid (the store looks here first, then in `blobs/`). Rows are immutable
//! and named by their hash, as blob files are. The database is made on the first put:
//! a node that never keeps a small content never has one.

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use wire::ContentHash;

/// The largest content kept here. SQLite reads and writes blobs of this size faster than
/// the file system makes and opens files (sqlite.org/fasterthanfs.html measures the
/// cross-over near 100 KiB); larger ones are files, which the kernel can pass through.
pub const SMALL_MAX: u64 = 64 * 1024;

/// A page cache of 16 MiB keeps the hash index of about 300,000 contents in memory. The
/// log is copied into the database (a checkpoint, which flushes both to the disk) by a
/// thread of its own (`ask_checkpoint`), not by a put: a put runs where a file is closed
/// or a pull lands, and copying megabytes there would stall them. So the connections do
/// not hold the database exclusively as the node database does (the node database's lock
/// already refuses a second node on the data directory).
///
/// The log starts over from its beginning only after a checkpoint that copied all of it,
/// and while puts keep coming the thread's never does (more is appended as it copies):
/// the log then grew without end (365 MB for 20,000 files of 4 KiB, each new page of it
/// zeroed by the kernel: 12 % of a node's time per create). So once the thread has
/// copied, the next put copies the few pages appended since, on its own connection while
/// nothing else writes (`finish_checkpoint`), and the put after it writes the log from
/// its start again.
const PRAGMAS: &str =
    "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-16384; PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit=67108864;";

/// Pages written to the log after which the checkpoint thread is asked to run.
const CHECKPOINT_PAGES: u64 = 4096;

/// Rows in the order they come (new bytes are appended to the file, not put between
/// others by their random hash), found by an index of the 32-byte hashes alone: a small
/// tree that stays in the cache, where a table keyed by the hash would put every new
/// content in a random page of a table of gigabytes.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS contents (
    id INTEGER PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE, -- the content's 32-byte BLAKE3 hash
    at_ms INTEGER NOT NULL,    -- when it was put (a fresh download is not swept at once)
    bytes BLOB NOT NULL
);
";

/// Rows looked at per step of a sweep: the connection is let go between steps, so a
/// read waits for one step at most, never for a sweep of a million rows.
const SWEEP_STEP: usize = 2_000;

pub struct SmallContents {
    path: PathBuf,
    /// `None` until the database exists (made by the first put).
    conn: Mutex<Option<Connection>>,
    /// Pages (about) written to the log since a checkpoint was last asked for.
    unchecked: std::sync::atomic::AtomicU64,
    /// Wakes the checkpoint thread (started on first use; it ends with this).
    checkpointer: std::sync::OnceLock<std::sync::mpsc::SyncSender<()>>,
    /// Set by the checkpoint thread once it has copied the log: the next put finishes.
    finish_checkpoint: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Checkpoints asked for, for tests.
    #[cfg(test)]
    asked: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for SmallContents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SmallContents({})", self.path.display())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl SmallContents {
    /// The small contents at `path`; opened now if the file exists (so that a damaged
    /// one stops the node at start, with its name), made by the first put otherwise.
    pub fn open(path: &Path) -> anyhow::Result<SmallContents> {
        let conn = if path.exists() { Some(Self::connect(path)?) } else { None };
        Ok(SmallContents {
            path: path.to_owned(),
            conn: Mutex::new(conn),
            unchecked: 0.into(),
            checkpointer: Default::default(),
            finish_checkpoint: Default::default(),
            #[cfg(test)]
            asked: 0.into(),
        })
    }

    fn connect(path: &Path) -> anyhow::Result<Connection> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(2))?;
        conn.execute_batch(PRAGMAS).with_context(|| format!("setting up {}", path.display()))?;
        conn.execute_batch(SCHEMA).with_context(|| format!("making the tables of {}", path.display()))?;
        Ok(conn)
    }

    /// Runs `f` on the connection; `None` if the database does not exist yet and
    /// `make` is false.
    fn with<T>(&self, make: bool, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> anyhow::Result<Option<T>> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if conn.is_none() {
            if !make {
                return Ok(None);
            }
            *conn = Some(Self::connect(&self.path)?);
        }
        let c = conn.as_ref().expect("opened above");
        f(c).map(Some).with_context(|| format!("small contents ({})", self.path.display()))
    }

    /// The bytes of `h`, if they are here.
    pub fn get(&self, h: &ContentHash) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.get_many(std::slice::from_ref(h), usize::MAX)?.pop().flatten())
    }

    /// The size of `h`, if it is here.
    pub fn len(&self, h: &ContentHash) -> Option<u64> {
        self.size_from("looking up", "SELECT length(bytes) FROM contents WHERE hash = ?1", h)
    }

    /// Runs `sql` (one row at most, a content's size, for the hash `?1`); a failure is
    /// logged as `doing` `h` and taken for no row.
    fn size_from(&self, doing: &str, sql: &str, h: &ContentHash) -> Option<u64> {
        match self.with(false, |c| c.prepare_cached(sql)?.query_row([h.as_bytes()], |r| r.get::<_, i64>(0)).optional()) {
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

    /// The bytes of each of `hashes` that is here, in order (`None` for one that is not),
    /// within `budget` bytes in all: one that would pass it is `None` too (a smaller one
    /// after it may still fit).
    pub fn get_many(&self, hashes: &[ContentHash], mut budget: usize) -> anyhow::Result<Vec<Option<Vec<u8>>>> {
        let got = self.with(false, |c| {
            let mut q = c.prepare_cached("SELECT bytes FROM contents WHERE hash = ?1")?;
            let mut out = Vec::with_capacity(hashes.len());
            for h in hashes {
                let bytes: Option<Vec<u8>> = if budget == 0 { None } else { q.query_row([h.as_bytes()], |r| r.get(0)).optional()? };
                let bytes = bytes.filter(|b| b.len() <= budget);
                budget -= bytes.as_ref().map_or(0, |b| b.len());
                out.push(bytes);
            }
            Ok(out)
        })?;
        Ok(got.unwrap_or_else(|| vec![None; hashes.len()]))
    }

    /// Keeps `bytes` as content `h` (the caller checked that they hash to it); a content
    /// already here stays as it is.
    pub fn put(&self, h: &ContentHash, bytes: &[u8]) -> anyhow::Result<()> {
        self.put_many(&[(h, bytes)])
    }

    /// [`SmallContents::put`] of several contents in one transaction (one commit for a
    /// batch of pulled contents).
    pub fn put_many(&self, items: &[(&ContentHash, &[u8])]) -> anyhow::Result<()> {
        debug_assert!(items.iter().all(|(_, b)| b.len() as u64 <= SMALL_MAX));
        use std::sync::atomic::Ordering;
        self.with(true, |c| {
            if self.finish_checkpoint.swap(false, Ordering::Relaxed) {
                // Copies what came since the thread's pass; this put's transaction then
                // finds the log all copied and writes it from its start. A checkpoint
                // that fails (a full disk) leaves the log as it was: the put goes on.
                if let Err(e) = checkpoint(c) {
                    tracing::debug!("small contents: finishing checkpoint: {e}");
                }
            }
            let tx = (items.len() > 1).then(|| c.unchecked_transaction()).transpose()?;
            let mut q = c.prepare_cached("INSERT OR IGNORE INTO contents (hash, bytes, at_ms) VALUES (?1, ?2, ?3)")?;
            let at = now_ms();
            for (h, bytes) in items {
                q.execute(params![h.as_bytes(), bytes, at])?;
            }
            tx.map_or(Ok(()), |tx| tx.commit())
        })?;
        let pages = items.iter().map(|(_, b)| b.len() as u64 / 4096 + 2).sum::<u64>();
        if self.unchecked.fetch_add(pages, Ordering::Relaxed) + pages >= CHECKPOINT_PAGES {
            self.unchecked.store(0, Ordering::Relaxed);
            self.ask_checkpoint();
        }
        Ok(())
    }

    /// Asks the checkpoint thread to copy the log into the database (a passive
    /// checkpoint: it never blocks a put); one request waiting is enough.
    fn ask_checkpoint(&self) {
        #[cfg(test)]
        self.asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tx = self.checkpointer.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
            let path = self.path.clone();
            let finish = self.finish_checkpoint.clone();
            std::thread::spawn(move || {
                let mut conn = None;
                for () in rx {
                    if conn.is_none() {
                        conn = Self::connect(&path)
                            .map_err(|e| tracing::warn!("small contents: the checkpoint thread cannot open {}: {e:#}", path.display()))
                            .ok();
                    }
                    if let Some(c) = &conn {
                        // The second pass copies what was appended during the first
                        // (less), so that what the finishing put copies is little.
                        for _ in 0..2 {
                            if let Err(e) = checkpoint(c) {
                                tracing::debug!("small contents: checkpoint: {e}");
                            }
                        }
                        finish.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
            tx
        });
        let _ = tx.try_send(());
    }

    #[cfg(test)]
    fn checkpoints_asked(&self) -> u64 {
        self.asked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Removes `h`; returns its size if it was here.
    pub fn remove(&self, h: &ContentHash) -> Option<u64> {
        self.size_from("removing", "DELETE FROM contents WHERE hash = ?1 RETURNING length(bytes)", h)
    }

    /// The contents put more than `min_age` ago that `unused` says go: removed if
    /// `remove` (each only if it is still that old), else only listed.
    pub fn sweep(&self, unused: &dyn Fn(&ContentHash) -> bool, min_age: std::time::Duration, remove: bool) -> Vec<ContentHash> {
        let before = now_ms() - min_age.as_millis() as i64;
        let mut after: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        loop {
            let step = self.with(false, |c| {
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
                    if *at > before || !unused(&h) {
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

    /// Closes the database as a dead process would leave it (its lock gone).
    #[cfg(test)]
    pub fn let_go_for_test(&self) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Every content here (for a check of the whole store; a million small files are
    /// 32 MB of hashes).
    pub fn hashes(&self) -> anyhow::Result<Vec<ContentHash>> {
        let rows = self.with(false, |c| c.prepare("SELECT hash FROM contents")?.query_map([], |r| r.get::<_, Vec<u8>>(0))?.collect::<Result<Vec<_>, _>>())?;
        Ok(rows.unwrap_or_default().into_iter().filter_map(|h| <[u8; 32]>::try_from(h.as_slice()).ok()).map(ContentHash::from_bytes).collect())
    }

    /// Makes every put so far survive a power loss: the log is flushed to disk and
    /// copied into the database (with `synchronous=NORMAL`, commits alone are durable
    /// against a crash of the process only).
    pub fn sync(&self) -> anyhow::Result<()> {
        self.with(false, checkpoint)?;
        Ok(())
    }
}

/// Copies the log into the database as far as no reader holds it back (a passive
/// checkpoint: it never waits for one, and one that finds another checkpoint under way
/// reports it in its row instead of failing).
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
        // Young contents stay; old ones not kept go.
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

    /// Puts that never stop must not make the log grow without end: after each
    /// checkpoint the log is written from its start again.
    #[test]
    fn the_log_starts_over_while_puts_keep_coming() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.db");
        let wal = dir.path().join("small.db-wal");
        let s = SmallContents::open(&path).unwrap();
        let mut n = 0u32;
        let mut put = |s: &SmallContents| {
            n += 1;
            let mut b = vec![0u8; 60 * 1024];
            b[..4].copy_from_slice(&n.to_le_bytes());
            s.put(&hash(&b), &b).unwrap();
        };
        // One checkpoint's worth of pages at a time, then the thread's pass is awaited
        // (the puts that come while it copies are what the node sees under load).
        let mut sizes = Vec::new();
        for _ in 0..4 {
            let asked = s.checkpoints_asked();
            while s.checkpoints_asked() == asked {
                put(&s);
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !s.finish_checkpoint.load(std::sync::atomic::Ordering::Relaxed) {
                assert!(std::time::Instant::now() < deadline, "the checkpoint thread never finished its pass");
                put(&s);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            put(&s);
            sizes.push(std::fs::metadata(&wal).unwrap().len());
        }
        // Each round appends a checkpoint's worth (16 MiB) and more; without starting
        // over the log would be four times that by now.
        let one_round = CHECKPOINT_PAGES * 4096;
        assert!(sizes.iter().all(|&n| n < 2 * one_round), "the log grew round after round: {sizes:?}");
        for h in [1u32, n / 2, n] {
            let mut b = vec![0u8; 60 * 1024];
            b[..4].copy_from_slice(&h.to_le_bytes());
            assert_eq!(s.get(&hash(&b)).unwrap().as_deref(), Some(&b[..]), "content {h} reads back");
        }
    }
}
