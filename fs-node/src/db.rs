//! The node's SQLite database (`<data>/node.db`): inodes, directory entries, the last
//! revision the manager gave each path, and the outbox of changes not yet decided.
//! Plain row access; the tree (`tree/`) owns the one connection and decides what to
//! write. Never talks to the network.
//!
//! A transaction of the tree is not a SQLite transaction: its writes are kept as
//! [`Op`]s and committed as one frame of the database's redo log ([`crate::journal`]),
//! one `write` of a few hundred bytes where a SQLite commit wrote a log frame of 4 KiB
//! for every page it touched (most of a delete's time, docs/benchmarks.md, session 31).
//! Once [`FOLD_OPS`] writes are logged, a thread of its own folds them into SQLite.
//! Opening the database folds what the log holds. The tree never reads the database
//! except at start-up (and in tests), so a read waits for the fold under way and folds
//! the rest first: it always sees every committed write.

use crate::journal::{lock_conn as lock, Journal};
use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension};
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use wire::{Change, ContentHash, MessageId, RelPath, Revision};

/// Set on every connection.
/// Only this process opens the node database, so it holds the lock for good
/// (`locking_mode=EXCLUSIVE`, set before WAL so that the WAL index lives in the heap):
/// a transaction takes no file locks, which were a third of a create's system calls
/// (docs/benchmarks.md). A second node started on the same data directory is refused.
/// The log is copied into the database (a checkpoint: three `fsync`s, under the tree's
/// lock) every 8,192 pages rather than SQLite's 1,000: a checkpoint every 50 or so deletes
/// was 7 % of a node's time in a `rm -r` (docs/benchmarks.md, session 20), and a longer
/// log folds more writes of the same pages into one. The log file is cut back to 64 MiB
/// after one.
/// SQLite commits only at a fold, and a fold's commit is flushed to disk
/// (`synchronous=FULL`) before the redo log is cut back.
const PRAGMAS: &str =
    "PRAGMA locking_mode=EXCLUSIVE; PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA wal_autocheckpoint=8192; PRAGMA journal_size_limit=67108864;";

/// Writes logged before they are folded into SQLite (a fold of this many takes a few
/// tens of milliseconds under the tree's lock, and the log holds about 1 MiB).
pub const FOLD_OPS: usize = 4096;

/// Schema version 1: the tables every node had before versions were kept. A database
/// from then has them already (they are created only if missing) and is taken as is.
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS inodes(
  ino INTEGER PRIMARY KEY, kind INTEGER NOT NULL, perm INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
  atime INTEGER NOT NULL, mtime INTEGER NOT NULL, ctime INTEGER NOT NULL, nlink INTEGER NOT NULL, rdev INTEGER NOT NULL,
  size INTEGER NOT NULL, hash TEXT, target BLOB);
CREATE TABLE IF NOT EXISTS dentries(parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL, PRIMARY KEY(parent, name));
CREATE TABLE IF NOT EXISTS revs(path TEXT PRIMARY KEY, rev INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox(seq INTEGER PRIMARY KEY AUTOINCREMENT, msg TEXT NOT NULL UNIQUE, path TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
";

/// Schema version 2: contents kept past GC because the manager asked (kept versions,
/// docs/versions.md), until `until_ms` or until it releases them; `at_ms` is when this
/// node was first asked (the oldest go first when the disk runs short).
const SCHEMA_V2: &str = "
CREATE TABLE IF NOT EXISTS kept(hash TEXT PRIMARY KEY, size INTEGER NOT NULL, until_ms INTEGER NOT NULL, at_ms INTEGER NOT NULL);
";

/// Schema version 3: which paths this node keeps local (`pinned` 1) or fetches on
/// demand (0), as `syncctl pin` and `unpin` set them; a path without a row takes its
/// nearest ancestor's rule, the root the node's `--on-demand` default.
const SCHEMA_V3: &str = "
CREATE TABLE IF NOT EXISTS pins(path TEXT PRIMARY KEY, pinned INTEGER NOT NULL);
";

/// Schema version 4: the files being written (a work file made and not yet committed).
/// A work file in memory (`store.rs`) is gone after a crash: these rows say which files'
/// changes (a rename while being written above all) the restart must send.
const SCHEMA_V4: &str = "
CREATE TABLE IF NOT EXISTS writing(ino INTEGER PRIMARY KEY);
";

/// Schema version 5: fewer B-trees written per operation (docs/benchmarks.md, session
/// 20): directory entries, revisions and kept contents are stored in their primary key's B-tree
/// (`WITHOUT ROWID`; before, each had a table and an index, and every change wrote a page
/// of both), and an outbox row is found by its seq, which the tree assigns, so the
/// message id needs no index of its own and the seqs no `sqlite_sequence` row. Whether
/// a file is being written is a column of its inode row (written in the same transactions
/// anyway) instead of a table of its own.
const SCHEMA_V5: &str = "
CREATE TABLE dentries_v5(parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL, PRIMARY KEY(parent, name)) WITHOUT ROWID;
INSERT INTO dentries_v5(parent, name, ino) SELECT parent, name, ino FROM dentries;
DROP TABLE dentries;
ALTER TABLE dentries_v5 RENAME TO dentries;
CREATE TABLE revs_v5(path TEXT PRIMARY KEY, rev INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO revs_v5(path, rev) SELECT path, rev FROM revs;
DROP TABLE revs;
ALTER TABLE revs_v5 RENAME TO revs;
CREATE TABLE outbox_v5(seq INTEGER PRIMARY KEY, msg TEXT NOT NULL, path TEXT NOT NULL, body TEXT NOT NULL);
INSERT INTO outbox_v5(seq, msg, path, body) SELECT seq, msg, path, body FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_v5 RENAME TO outbox;
CREATE TABLE kept_v5(hash TEXT PRIMARY KEY, size INTEGER NOT NULL, until_ms INTEGER NOT NULL, at_ms INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO kept_v5(hash, size, until_ms, at_ms) SELECT hash, size, until_ms, at_ms FROM kept;
DROP TABLE kept;
ALTER TABLE kept_v5 RENAME TO kept;
ALTER TABLE inodes ADD COLUMN writing INTEGER NOT NULL DEFAULT 0;
UPDATE inodes SET writing = 1 WHERE ino IN (SELECT ino FROM writing);
DROP TABLE writing;
";

/// Schema version 6: a kept content says until when the node keeps it for a reason of its
/// own (its version decided into a conflict file it has not taken yet), which the
/// manager's `release` does not end.
const SCHEMA_V6: &str = "ALTER TABLE kept ADD COLUMN own_until_ms INTEGER NOT NULL DEFAULT 0;";

/// Schema version 7: a file being written whose mode or owners were changed meanwhile
/// keeps the mode and owners it had before (`InodeRow::meta_base`, JSON), which its put
/// sends at the last close, or after a crash, as a setattr's does.
const SCHEMA_V7: &str = "ALTER TABLE inodes ADD COLUMN meta_base TEXT;";

/// One content kept past GC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptRow {
    pub hash: ContentHash,
    pub size: u64,
    pub until_ms: i64,
    pub at_ms: i64,
    /// Kept for the node's own reason until then (0: none), whatever the manager says.
    pub own_until_ms: i64,
}

/// One inode row.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct InodeRow {
    pub ino: u64,
    pub kind: u8,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub nlink: u32,
    pub rdev: u32,
    pub size: u64,
    pub hash: Option<String>,
    pub target: Option<Vec<u8>>,
    /// Of a file being written whose mode or owners a setattr changed: those before the
    /// first such change (`tree::Committed::meta_base`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_base: Option<wire::ModeAndOwners>,
}

/// One outbox row: a change waiting for the manager's decision.
#[derive(Clone, Debug)]
pub struct OutboxRow {
    pub seq: i64,
    pub msg: MessageId,
    pub change: Change,
}

/// One write of the tree, as the redo log keeps it until it is folded into SQLite.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
enum Op {
    SaveInode(InodeRow),
    DeleteInode(u64),
    SetWriting(u64, bool),
    SaveDentry(u64, Vec<u8>, u64),
    DeleteDentry(u64, Vec<u8>),
    SetRev(String, u64),
    /// (Frames with it are not read by a node from before it: `tree/forget.rs`.)
    RemoveRev(String),
    PushOutbox {
        seq: i64,
        msg: String,
        path: String,
        body: String,
    },
    ReplaceOutbox {
        seq: i64,
        path: String,
        body: String,
    },
    RemoveOutbox(i64),
    SetMeta(String, String),
    SetPin(String, Option<bool>),
    PutKept {
        hash: String,
        size: i64,
        until_ms: i64,
        at_ms: i64,
        /// (Absent from frames written before schema 6.)
        #[serde(default)]
        own_until_ms: i64,
    },
    RemoveKept(String),
}

impl Op {
    fn apply(&self, conn: &Connection) -> rusqlite::Result<()> {
        match self {
            Op::SaveInode(i) => conn
                .prepare_cached(
                    "INSERT INTO inodes(ino, kind, perm, uid, gid, atime, mtime, ctime, nlink, rdev, size, hash, target, meta_base)
                     VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                     ON CONFLICT(ino) DO UPDATE SET kind = excluded.kind, perm = excluded.perm, uid = excluded.uid, gid = excluded.gid,
                       atime = excluded.atime, mtime = excluded.mtime, ctime = excluded.ctime, nlink = excluded.nlink, rdev = excluded.rdev,
                       size = excluded.size, hash = excluded.hash, target = excluded.target, meta_base = excluded.meta_base",
                )?
                .execute(params![
                    i.ino as i64,
                    i.kind,
                    i.perm,
                    i.uid,
                    i.gid,
                    i.atime,
                    i.mtime,
                    i.ctime,
                    i.nlink,
                    i.rdev,
                    i.size as i64,
                    i.hash,
                    i.target,
                    i.meta_base.map(|m| serde_json::to_string(&m).expect("three numbers"))
                ])?,
            Op::DeleteInode(ino) => conn.prepare_cached("DELETE FROM inodes WHERE ino = ?1")?.execute([*ino as i64])?,
            Op::SetWriting(ino, writing) => {
                conn.prepare_cached("UPDATE inodes SET writing = ?2 WHERE ino = ?1 AND writing != ?2")?.execute(params![*ino as i64, writing])?
            }
            Op::SaveDentry(parent, name, ino) => conn
                .prepare_cached("INSERT OR REPLACE INTO dentries(parent, name, ino) VALUES(?1, ?2, ?3)")?
                .execute(params![*parent as i64, name, *ino as i64])?,
            Op::DeleteDentry(parent, name) => {
                conn.prepare_cached("DELETE FROM dentries WHERE parent = ?1 AND name = ?2")?.execute(params![*parent as i64, name])?
            }
            Op::SetRev(path, rev) => conn
                .prepare_cached("INSERT INTO revs(path, rev) VALUES(?1, ?2) ON CONFLICT(path) DO UPDATE SET rev = excluded.rev")?
                .execute(params![path, *rev as i64])?,
            Op::RemoveRev(path) => conn.prepare_cached("DELETE FROM revs WHERE path = ?1")?.execute([path])?,
            // The tree's seqs are unique; a row that was there anyway (a tree bug) would
            // otherwise stop every fold after it, and the log would grow without end.
            Op::PushOutbox { seq, msg, path, body } => {
                conn.prepare_cached("INSERT OR REPLACE INTO outbox(seq, msg, path, body) VALUES(?1, ?2, ?3, ?4)")?.execute(params![seq, msg, path, body])?
            }
            Op::ReplaceOutbox { seq, path, body } => {
                conn.prepare_cached("UPDATE outbox SET path = ?2, body = ?3 WHERE seq = ?1")?.execute(params![seq, path, body])?
            }
            Op::RemoveOutbox(seq) => conn.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?.execute([seq])?,
            Op::SetMeta(key, value) => conn
                .prepare_cached("INSERT INTO meta(key, value) VALUES(?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")?
                .execute([key, value])?,
            Op::SetPin(path, Some(p)) => conn
                .prepare_cached("INSERT INTO pins(path, pinned) VALUES(?1, ?2) ON CONFLICT(path) DO UPDATE SET pinned = excluded.pinned")?
                .execute(params![path, p])?,
            Op::SetPin(path, None) => conn.prepare_cached("DELETE FROM pins WHERE path = ?1")?.execute([path])?,
            Op::PutKept { hash, size, until_ms, at_ms, own_until_ms } => conn
                .prepare_cached(
                    "INSERT INTO kept(hash, size, until_ms, at_ms, own_until_ms) VALUES(?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(hash) DO UPDATE SET until_ms = excluded.until_ms, own_until_ms = excluded.own_until_ms",
                )?
                .execute(params![hash, size, until_ms, at_ms, own_until_ms])?,
            Op::RemoveKept(hash) => conn.prepare_cached("DELETE FROM kept WHERE hash = ?1")?.execute([hash])?,
        };
        Ok(())
    }
}

/// The writes not yet in SQLite: those of the transaction being made, and the
/// committed ones in the redo log.
struct Redo {
    journal: Journal<Op>,
    /// The writes of the transaction being made (`Some` between `begin` and its end).
    pending: Option<Vec<Op>>,
    #[cfg(test)]
    injected: Option<Injected>,
}

/// A failure a test asked for: at the `n`th write from now, or at the commit of the
/// transaction that makes it; `full`: as on a full disk.
#[cfg(test)]
#[derive(Clone, Copy, Debug)]
struct Injected {
    n: i64,
    at_commit: bool,
    full: bool,
}

fn sqlite_failure(code: i32, what: String) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), Some(what))
}

/// A failed append to the redo log, as the database error the tree maps to an errno
/// (a full disk is `SQLITE_FULL`, which the tree answers with `ENOSPC`).
fn log_failure(e: std::io::Error) -> rusqlite::Error {
    let code = match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => rusqlite::ffi::SQLITE_FULL,
        _ => rusqlite::ffi::SQLITE_IOERR,
    };
    sqlite_failure(code, format!("appending to the node database's redo log: {e}"))
}

/// Applies `ops` to SQLite in one transaction that also records `epoch`, committed and
/// flushed to disk (`synchronous=FULL`).
fn apply_all<'a>(conn: &Connection, ops: impl Iterator<Item = &'a Op>, epoch: u64) -> rusqlite::Result<usize> {
    let started = std::time::Instant::now();
    let mut n = 0;
    crate::journal::fold_transaction(conn, epoch, |conn| ops.inspect(|_| n += 1).try_for_each(|op| op.apply(conn)))?;
    tracing::debug!(target: "timing", writes = n, ms = started.elapsed().as_secs_f64() * 1e3, "redo log folded");
    Ok(n)
}

pub struct Db {
    /// Used by a fold's thread while it runs, and by reads (which wait for it).
    conn: Arc<Mutex<Connection>>,
    /// Transactions committed since the database was opened (`Db::commits`).
    commits: std::cell::Cell<u64>,
    redo: std::cell::RefCell<Redo>,
}

/// The schema's versions, oldest first (`PRAGMA user_version` says which one a database
/// is at). A new version is a new `M::up` at the end; the ones before never change.
fn migrations() -> rusqlite_migration::Migrations<'static> {
    rusqlite_migration::Migrations::new(vec![
        rusqlite_migration::M::up(SCHEMA_V1),
        rusqlite_migration::M::up(SCHEMA_V2),
        rusqlite_migration::M::up(SCHEMA_V3),
        rusqlite_migration::M::up(SCHEMA_V4),
        rusqlite_migration::M::up(SCHEMA_V5),
        rusqlite_migration::M::up(SCHEMA_V6),
        rusqlite_migration::M::up(SCHEMA_V7),
    ])
}

/// Before a new node database is made where none is: redo log files beside it were left
/// by a database that is gone (deleted by hand, or lost with a disk), and hold only its
/// writes since its last fold, a part of a tree that a new database must not take as its
/// own (rows of files whose directories are missing, a move or a synced revision of a
/// tree it does not have). They are renamed to `<log>.orphaned-<unix seconds>`, kept for
/// a look, and the node starts with an empty tree, which it takes from the manager again.
fn set_aside_logs_of_a_database_gone(path: &Path) -> anyhow::Result<()> {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    for i in 0..2 {
        let log = crate::redo::RedoLog::path_for(path, i);
        if std::fs::metadata(&log).map(|m| m.len() == 0).unwrap_or(true) {
            continue;
        }
        let mut aside = log.clone().into_os_string();
        aside.push(format!(".orphaned-{stamp}"));
        std::fs::rename(&log, &aside).with_context(|| format!("setting aside {}, a redo log of a node database that is gone", log.display()))?;
        tracing::warn!(
            log = %log.display(),
            kept_as = %std::path::Path::new(&aside).display(),
            "{} is not there (removed, or lost): the node starts with an empty tree and takes the cluster's again; this redo log held writes of the database that is gone and is set aside",
            path.display()
        );
    }
    Ok(())
}

/// Brings a database to the latest schema version, or refuses one written by a newer
/// program with a clear error (it may hold what this one would misread).
fn migrate(conn: &mut Connection, path: &Path, what: &str) -> anyhow::Result<()> {
    let migrations = migrations();
    migrations
        .to_latest(conn)
        .with_context(|| format!("{what} {} is at a schema version this program does not know (is it from a newer version?); not touching it", path.display()))
}

impl Db {
    pub fn open(path: &Path) -> anyhow::Result<Db> {
        if !path.exists() {
            set_aside_logs_of_a_database_gone(path)?;
        }
        let mut conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        // Only a node process that is still ending can hold the lock a moment longer.
        conn.busy_timeout(std::time::Duration::from_secs(2))?;
        conn.set_prepared_statement_cache_capacity(64);
        conn.execute_batch(PRAGMAS).map_err(|e| {
            let busy = e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy);
            let e = anyhow::Error::new(e).context(format!("setting up {}", path.display()));
            if busy {
                e.context("another node is using this data directory (its database is locked)")
            } else {
                e
            }
        })?;
        migrate(&mut conn, path, "the node database")?;
        let epoch = crate::journal::recorded_epoch(&conn).with_context(|| format!("reading {}", path.display()))?;
        let conn = Arc::new(Mutex::new(conn));
        let folder = conn.clone();
        let journal = Journal::open(
            path,
            epoch,
            FOLD_OPS,
            "the node database",
            Arc::new(move |ops: &mut dyn Iterator<Item = &Op>, epoch| apply_all(&lock(&folder), ops, epoch).map(drop)),
            |frame| Ok(serde_json::from_slice::<Vec<Op>>(frame)?),
            |_| 1,
        )?;
        let redo = Redo {
            journal,
            pending: None,
            #[cfg(test)]
            injected: None,
        };
        let db = Db { conn, commits: Default::default(), redo: std::cell::RefCell::new(redo) };
        // What the last run committed to the log goes into SQLite before anything is read.
        db.fold().with_context(|| format!("applying the redo log to {}", path.display()))?;
        Ok(db)
    }

    /// Starts a transaction: the writes until `commit` or `rollback` are kept together.
    pub fn begin(&self) -> rusqlite::Result<()> {
        let mut r = self.redo.borrow_mut();
        if r.pending.is_some() {
            return Err(sqlite_failure(rusqlite::ffi::SQLITE_MISUSE, "a node database transaction is already open".into()));
        }
        r.pending = Some(Vec::new());
        Ok(())
    }

    /// Commits the open transaction: its writes, as one frame appended to the redo log.
    /// Once enough writes are logged, they are folded into SQLite (a fold that fails is
    /// tried again later: what it would have written is safe in the log).
    pub fn commit(&self) -> rusqlite::Result<()> {
        let mut r = self.redo.borrow_mut();
        let ops = r.pending.take().ok_or_else(|| sqlite_failure(rusqlite::ffi::SQLITE_MISUSE, "no node database transaction is open".into()))?;
        #[cfg(test)]
        if let Some(Injected { n: 0, at_commit: true, full }) = r.injected {
            if !ops.is_empty() {
                return Err(injected_failure(full));
            }
        }
        if !ops.is_empty() {
            let payload = serde_json::to_vec(&ops).expect("database writes serialize");
            let n = ops.len();
            r.journal.append(&payload, ops, n).map_err(log_failure)?;
        }
        self.commits.set(self.commits.get() + 1);
        r.journal.maybe_fold();
        Ok(())
    }

    pub fn rollback(&self) {
        self.redo.borrow_mut().pending = None;
    }

    /// Keeps one write in the open transaction, or commits it alone if none is open.
    fn record(&self, op: Op) -> rusqlite::Result<()> {
        let mut r = self.redo.borrow_mut();
        #[cfg(test)]
        if let Some(inj) = &mut r.injected {
            inj.n = (inj.n - 1).max(0);
            if inj.n == 0 && !inj.at_commit {
                return Err(injected_failure(inj.full));
            }
        }
        match &mut r.pending {
            Some(ops) => {
                ops.push(op);
                Ok(())
            }
            None => {
                r.pending = Some(vec![op]);
                drop(r);
                self.commit()
            }
        }
    }

    /// Applies every logged write to SQLite (after the fold under way, if any) in one
    /// transaction, flushed to disk, and starts both log files again, for a new epoch
    /// recorded in that transaction. Nothing is folded while a transaction is open.
    pub fn fold(&self) -> rusqlite::Result<()> {
        let mut r = self.redo.borrow_mut();
        if r.pending.is_some() {
            return Err(sqlite_failure(rusqlite::ffi::SQLITE_MISUSE, "the node database is read inside a transaction".into()));
        }
        r.journal.fold_now().1
    }

    /// Transactions committed since the database was opened: each is one append to the
    /// redo log, so fewer of them for the same work is what keeps a burst of file
    /// operations cheap (the `syncfs_node_db_commits` metric).
    pub fn commits(&self) -> u64 {
        self.commits.get()
    }
    /// The end of the fold under way, if the appends outpace the folds
    /// ([`crate::journal::Journal::behind`]).
    pub fn fold_behind(&self) -> Option<std::sync::Arc<crate::journal::FoldEnd>> {
        self.redo.borrow().journal.behind()
    }
    /// Folds of the redo log into SQLite since the database was opened.
    pub fn folds(&self) -> u64 {
        self.redo.borrow().journal.folds()
    }
    /// Handles of the redo log's files: flushing both (`sync_data`), also later and
    /// without the database (or the tree's lock), makes durable against a power loss
    /// every transaction committed before this call (what was folded is: a fold's
    /// commit is flushed; the other file holds the writes of a fold under way).
    pub fn log_handles(&self) -> std::io::Result<[std::fs::File; 2]> {
        self.redo.borrow().journal.handles()
    }

    /// Closes the database file as a dead process would leave it (committed
    /// transactions in it, its lock gone); the `Db` is unusable afterwards.
    #[cfg(test)]
    pub fn let_go_for_test(&mut self) {
        self.redo.get_mut().journal.join_fold();
        let _ = std::mem::replace(&mut *lock(&self.conn), Connection::open_in_memory().unwrap());
    }

    /// The connection itself, for tests that read it directly (after a fold).
    #[cfg(test)]
    pub fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.fold().unwrap();
        lock(&self.conn)
    }

    /// Makes the `n`th write from now and every one after it fail (`at_commit`: the
    /// commits of the transactions that make them), as an I/O error or (`full`) as on a
    /// full disk, until the next call; `n` 0 or less: no failure.
    #[cfg(test)]
    pub fn inject_failure_for_test(&self, n: i64, at_commit: bool, full: bool) {
        self.redo.borrow_mut().injected = (n > 0).then_some(Injected { n, at_commit, full });
    }

    pub fn meta(&self, key: &str) -> rusqlite::Result<Option<String>> {
        // The newest write of the key, also one of the open transaction.
        {
            let r = self.redo.borrow();
            let written = r.pending.iter().flatten().rev().chain(r.journal.newest_first()).find_map(|op| match op {
                Op::SetMeta(k, v) if k == key => Some(v.clone()),
                _ => None,
            });
            if written.is_some() {
                return Ok(written);
            }
        }
        lock(&self.conn).query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()
    }
    pub fn set_meta(&self, key: &str, value: &str) -> rusqlite::Result<()> {
        self.record(Op::SetMeta(key.into(), value.into()))
    }

    /// Every pin rule: (path, "" for the root, and whether it keeps contents local).
    pub fn pins(&self) -> rusqlite::Result<Vec<(String, bool)>> {
        self.fold()?;
        let conn = lock(&self.conn);
        let mut st = conn.prepare("SELECT path, pinned FROM pins")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)))?;
        rows.collect()
    }

    pub fn set_pin(&self, path: &str, pinned: Option<bool>) -> rusqlite::Result<()> {
        self.record(Op::SetPin(path.into(), pinned))
    }

    pub fn kept(&self) -> rusqlite::Result<Vec<KeptRow>> {
        self.fold()?;
        let conn = lock(&self.conn);
        let mut st = conn.prepare("SELECT hash, size, until_ms, at_ms, own_until_ms FROM kept")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?, r.get::<_, i64>(4)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (hash, size, until_ms, at_ms, own_until_ms) = row?;
            if let Ok(hash) = hash.parse() {
                out.push(KeptRow { hash, size: size as u64, until_ms, at_ms, own_until_ms });
            }
        }
        Ok(out)
    }
    /// Records kept contents, all or none (one transaction).
    pub fn put_kept_all(&self, rows: &[KeptRow]) -> rusqlite::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        self.all_or_none(|db| rows.iter().try_for_each(|k| db.put_kept(k)))
    }
    /// Records a kept content, in the transaction open (the tree's).
    pub fn put_kept(&self, k: &KeptRow) -> rusqlite::Result<()> {
        self.record(Op::PutKept { hash: k.hash.to_hex().to_string(), size: k.size as i64, until_ms: k.until_ms, at_ms: k.at_ms, own_until_ms: k.own_until_ms })
    }
    /// Forgets kept contents, all or none (one transaction).
    pub fn remove_kept_all<'a>(&self, hashes: impl IntoIterator<Item = &'a ContentHash>) -> rusqlite::Result<()> {
        let mut hashes = hashes.into_iter().peekable();
        if hashes.peek().is_none() {
            // (The GC asks on every pass, mostly with nothing expired.)
            return Ok(());
        }
        self.all_or_none(|db| hashes.try_for_each(|h| db.record(Op::RemoveKept(h.to_hex().to_string()))))
    }
    /// Runs `f` in a transaction of its own, committed if it succeeds, rolled back if not.
    fn all_or_none(&self, f: impl FnOnce(&Self) -> rusqlite::Result<()>) -> rusqlite::Result<()> {
        self.begin()?;
        match f(self).and_then(|()| self.commit()) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.rollback();
                Err(e)
            }
        }
    }

    /// Every inode row, and the inodes among them marked as being written
    /// ([`Db::set_writing`]), read in the one pass start-up makes over the table.
    pub fn inodes(&self) -> rusqlite::Result<(Vec<InodeRow>, Vec<u64>)> {
        self.fold()?;
        let conn = lock(&self.conn);
        let mut st = conn.prepare("SELECT ino, kind, perm, uid, gid, atime, mtime, ctime, nlink, rdev, size, hash, target, writing, meta_base FROM inodes")?;
        let mut writing = Vec::new();
        let rows = st.query_map([], |r| {
            if r.get::<_, bool>(13)? {
                writing.push(r.get::<_, i64>(0)? as u64);
            }
            Ok(InodeRow {
                ino: r.get::<_, i64>(0)? as u64,
                kind: r.get(1)?,
                perm: r.get(2)?,
                uid: r.get(3)?,
                gid: r.get(4)?,
                atime: r.get(5)?,
                mtime: r.get(6)?,
                ctime: r.get(7)?,
                nlink: r.get(8)?,
                rdev: r.get(9)?,
                size: r.get::<_, i64>(10)? as u64,
                hash: r.get(11)?,
                target: r.get(12)?,
                // (An unreadable one is dropped: the put then goes without it, as before.)
                meta_base: r.get::<_, Option<String>>(14)?.and_then(|m| serde_json::from_str(&m).ok()),
            })
        })?;
        let rows = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok((rows, writing))
    }

    pub fn save_inode(&self, i: &InodeRow) -> rusqlite::Result<()> {
        self.record(Op::SaveInode(i.clone()))
    }

    pub fn delete_inode(&self, ino: u64) -> rusqlite::Result<()> {
        self.record(Op::DeleteInode(ino))
    }

    /// Records that `ino` is being written (a work file was made for it), or no longer,
    /// in its saved row (an inode without one, removed while open, is not recorded).
    /// Saving the row again leaves this as it is.
    pub fn set_writing(&self, ino: u64, writing: bool) -> rusqlite::Result<()> {
        self.record(Op::SetWriting(ino, writing))
    }

    /// Empties the record of files being written for `inos` (the ones [`Db::inodes`]
    /// named, at start-up: no file is being written then).
    pub fn clear_writing(&self, inos: &[u64]) -> rusqlite::Result<()> {
        for &ino in inos {
            self.set_writing(ino, false)?;
        }
        Ok(())
    }

    pub fn dentries(&self) -> rusqlite::Result<Vec<(u64, OsString, u64)>> {
        self.fold()?;
        let conn = lock(&self.conn);
        let mut st = conn.prepare("SELECT parent, name, ino FROM dentries")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, OsString::from_vec(r.get(1)?), r.get::<_, i64>(2)? as u64)))?;
        rows.collect()
    }

    pub fn save_dentry(&self, parent: u64, name: &std::ffi::OsStr, ino: u64) -> rusqlite::Result<()> {
        self.record(Op::SaveDentry(parent, name.as_bytes().to_vec(), ino))
    }

    pub fn delete_dentry(&self, parent: u64, name: &std::ffi::OsStr) -> rusqlite::Result<()> {
        self.record(Op::DeleteDentry(parent, name.as_bytes().to_vec()))
    }

    pub fn revs(&self) -> rusqlite::Result<Vec<(String, u64)>> {
        self.fold()?;
        let conn = lock(&self.conn);
        let mut st = conn.prepare("SELECT path, rev FROM revs")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        rows.collect()
    }

    pub fn set_rev(&self, path: &RelPath, rev: Revision) -> rusqlite::Result<()> {
        self.record(Op::SetRev(path.as_str().into(), rev.0))
    }

    pub fn remove_rev(&self, path: &RelPath) -> rusqlite::Result<()> {
        self.record(Op::RemoveRev(path.as_str().into()))
    }

    pub fn outbox(&self) -> anyhow::Result<Vec<OutboxRow>> {
        self.fold()?;
        let conn = lock(&self.conn);
        let mut st = conn.prepare("SELECT seq, msg, body FROM outbox ORDER BY seq")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, msg, body) = row?;
            out.push(OutboxRow {
                seq,
                msg: msg.parse().context("corrupt message id in the outbox")?,
                change: serde_json::from_str(&body).context("corrupt change in the outbox")?,
            });
        }
        Ok(out)
    }

    /// Adds a row at `seq` (the tree assigns seqs: `Outbox::take_seq`).
    pub fn push_outbox(&self, seq: i64, msg: &MessageId, change: &Change) -> rusqlite::Result<()> {
        self.record(Op::PushOutbox {
            seq,
            msg: msg.as_str().into(),
            path: change.path.as_str().into(),
            body: serde_json::to_string(change).expect("wire types serialize"),
        })
    }

    /// Replaces the change of a row that was never sent; the row keeps its place.
    pub fn replace_outbox(&self, seq: i64, change: &Change) -> rusqlite::Result<()> {
        self.record(Op::ReplaceOutbox { seq, path: change.path.as_str().into(), body: serde_json::to_string(change).expect("wire types serialize") })
    }

    pub fn remove_outbox(&self, seq: i64) -> rusqlite::Result<()> {
        self.record(Op::RemoveOutbox(seq))
    }
}

#[cfg(test)]
fn injected_failure(full: bool) -> rusqlite::Error {
    if full {
        sqlite_failure(rusqlite::ffi::SQLITE_FULL, "injected: the disk is full".into())
    } else {
        sqlite_failure(rusqlite::ffi::SQLITE_IOERR, "injected failure".into())
    }
}

impl Drop for Db {
    /// A fold under way finishes (it is short) before the connection closes.
    fn drop(&mut self) {
        self.redo.get_mut().journal.join_fold();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk under the redo log is a full node database to the tree: `ENOSPC`,
    /// after the reserve is given up (`FsError::DbFull`); other failures are I/O errors.
    #[test]
    fn a_full_disk_under_the_redo_log_is_a_full_database() {
        use crate::tree::FsError;
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let e = FsError::from(log_failure(std::io::Error::from_raw_os_error(errno)));
            assert!(matches!(e, FsError::DbFull), "{errno}: {e:?}");
        }
        assert!(matches!(FsError::from(log_failure(std::io::Error::from_raw_os_error(libc::EIO))), FsError::Io(_)));
    }

    /// Writes committed across several folds (made in the background while new frames
    /// go to the other log file) come back after a crash, the last write of each row
    /// winning; also when the folds after the first one failed, so that both files hold
    /// frames to replay, the second file's first (they are older).
    #[test]
    fn writes_across_folds_come_back_after_a_crash() {
        for fail_folds in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("node.db");
            let mut db = Db::open(&path).unwrap();
            db.redo.get_mut().journal.fail_folds_after = fail_folds.then_some(1);
            let mut n = 0;
            // Until both folds began (the first one runs on a thread of its own).
            while n < 3 * FOLD_OPS as u64 + 17 || (fail_folds && db.redo.get_mut().journal.folds_started < 2) {
                let i = n;
                db.begin().unwrap();
                db.save_dentry(1, std::ffi::OsStr::new(&format!("f{}", i % 1000)), i).unwrap();
                db.set_meta("last", &i.to_string()).unwrap();
                db.commit().unwrap();
                n += 1;
            }
            let both_files = [0, 1].map(|i| std::fs::metadata(crate::redo::RedoLog::path_for(&path, i)).unwrap().len() > 0);
            if fail_folds {
                assert_eq!(both_files, [true, true], "the failed fold's file and the one appended to since");
                let j = &db.redo.get_mut().journal;
                assert_eq!((j.current(), j.folds()), (0, 1), "one fold made, the next one (of the second file) failed");
            }
            assert_eq!(db.meta("last").unwrap(), Some((n - 1).to_string()));
            db.let_go_for_test();
            std::mem::forget(db);

            let db = Db::open(&path).unwrap();
            let mut rows = db.dentries().unwrap();
            rows.sort();
            assert_eq!(rows.len(), 1000, "fail_folds {fail_folds}");
            for (parent, name, ino) in rows {
                let k: u64 = name.to_str().unwrap()[1..].parse().unwrap();
                assert_eq!((parent, ino), (1, k + (n - 1 - k) / 1000 * 1000), "{name:?}, fail_folds {fail_folds}");
            }
            assert_eq!(db.meta("last").unwrap(), Some((n - 1).to_string()));
            assert!([0, 1].iter().all(|&i| std::fs::metadata(crate::redo::RedoLog::path_for(&path, i)).unwrap().len() == 0), "opening folded both files");
        }
    }

    /// A node database removed after a crash (its redo logs left, holding the writes since
    /// its last fold) is made again empty: the logs' writes, a part of the old tree, are
    /// not taken into it, and the logs are kept aside.
    #[test]
    fn the_redo_logs_of_a_database_gone_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let mut db = Db::open(&path).unwrap();
        for i in 0..FOLD_OPS as u64 + 100 {
            db.begin().unwrap();
            db.save_dentry(1, std::ffi::OsStr::new(&format!("f{i}")), i + 2).unwrap();
            db.commit().unwrap();
        }
        db.let_go_for_test();
        std::mem::forget(db);
        assert!((0..2).any(|i| std::fs::metadata(crate::redo::RedoLog::path_for(&path, i)).unwrap().len() > 0), "writes left in a log");
        std::fs::remove_file(&path).unwrap();

        let db = Db::open(&path).unwrap();
        assert_eq!(db.dentries().unwrap(), vec![], "the new database took nothing of the old one's logs");
        let aside: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".orphaned-"))
            .collect();
        assert!(!aside.is_empty() && aside.iter().all(|n| n.starts_with("node.db-redo")), "{aside:?}");
        drop(db);
        assert_eq!(Db::open(&path).unwrap().dentries().unwrap(), vec![], "and a restart of the new one keeps it so");
    }

    /// A second node on the same data directory is refused with a clear error while the
    /// first runs (the first holds its database exclusively), and starts once it is gone.
    #[test]
    fn a_database_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let first = Db::open(&path).unwrap();
        first.set_meta("k", "v").unwrap();
        let err = format!("{:#}", Db::open(&path).err().expect("the database is in use"));
        assert!(err.contains("another node is using this data directory"), "{err}");
        drop(first);
        assert_eq!(Db::open(&path).unwrap().meta("k").unwrap().as_deref(), Some("v"));
    }

    /// A node.db gets a schema version; one from before versions were kept is taken as
    /// is, and one written by a newer node is refused with a clear error.
    #[test]
    fn the_schema_is_versioned_and_a_newer_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        // From before versions were kept: the first tables, user_version 0.
        let old = Connection::open(&path).unwrap();
        old.execute_batch(SCHEMA_V1).unwrap();
        old.execute("INSERT INTO meta(key, value) VALUES ('k', 'v')", []).unwrap();
        drop(old);
        let db = Db::open(&path).unwrap();
        assert_eq!(db.meta("k").unwrap().as_deref(), Some("v"), "the old database was kept as it was");
        assert_eq!(db.conn().query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)).unwrap(), 7);
        drop(db);
        Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 8").unwrap();
        let err = format!("{:#}", Db::open(&path).err().expect("a newer database is refused"));
        assert!(err.contains("schema version this program does not know"), "{err}");
    }

    /// A database from schema version 4 (directory entries and revisions with a table
    /// and an index each, outbox seqs from `AUTOINCREMENT`, a table of the files being
    /// written) keeps every row, and what was being written, in version 5.
    #[test]
    fn a_version_4_database_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let mut conn = Connection::open(&path).unwrap();
        migrations().to_version(&mut conn, 4).unwrap();
        let change =
            Change { path: RelPath::new("d/f").unwrap(), base: Revision(3), follows: None, op: wire::ChangeOp::Delete, base_meta: None, base_content: None };
        let body = serde_json::to_string(&change).unwrap();
        let kept = ContentHash::from_bytes([7; 32]).to_hex().as_str().to_string();
        conn.execute_batch(&format!(
            "INSERT INTO dentries(parent, name, ino) VALUES (1, x'64', 2), (2, x'66ff', 3);
             INSERT INTO revs(path, rev) VALUES ('d', 4), ('d/f', 3);
             INSERT INTO outbox(msg, path, body) VALUES ('m1', 'd/f', '{body}'), ('m2', 'd/f', '{body}');
             DELETE FROM outbox WHERE msg = 'm1';
             INSERT INTO inodes(ino, kind, perm, uid, gid, atime, mtime, ctime, nlink, rdev, size, hash, target)
               VALUES (3, 1, 420, 0, 0, 0, 0, 0, 1, 0, 5, NULL, NULL), (4, 1, 420, 0, 0, 0, 0, 0, 1, 0, 5, NULL, NULL);
             INSERT INTO writing(ino) VALUES (4);
             INSERT INTO kept(hash, size, until_ms, at_ms) VALUES ('{kept}', 7, 20, 10);"
        ))
        .unwrap();
        drop(conn);
        let db = Db::open(&path).unwrap();
        assert_eq!(db.dentries().unwrap(), vec![(1, OsString::from("d"), 2), (2, OsString::from_vec(vec![0x66, 0xff]), 3)]);
        assert_eq!(db.revs().unwrap(), vec![("d".to_string(), 4), ("d/f".to_string(), 3)]);
        let rows = db.outbox().unwrap();
        assert_eq!(rows.iter().map(|r| (r.seq, r.msg.to_string(), r.change.clone())).collect::<Vec<_>>(), vec![(2, "m2".to_string(), change)]);
        db.remove_outbox(2).unwrap();
        assert!(db.outbox().unwrap().is_empty());
        let (rows, writing) = db.inodes().unwrap();
        assert_eq!(rows.iter().map(|i| i.ino).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(writing, vec![4]);
        // Being written: kept through a save of the row, until cleared at start-up.
        db.save_inode(&rows[1]).unwrap();
        db.set_writing(3, true).unwrap();
        db.set_writing(3, false).unwrap();
        assert_eq!(db.inodes().unwrap().1, vec![4]);
        db.clear_writing(&[4]).unwrap();
        assert!(db.inodes().unwrap().1.is_empty());
        assert_eq!(db.kept().unwrap(), vec![KeptRow { hash: ContentHash::from_bytes([7; 32]), size: 7, until_ms: 20, at_ms: 10, own_until_ms: 0 }]);
    }
}
