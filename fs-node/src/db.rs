//! The node's SQLite database (`<data>/node.db`): inodes, directory entries, the last
//! revision the manager gave each path, and the outbox of changes not yet decided.
//! Plain row access; the tree (`tree/`) owns the one connection and decides what to
//! write. Never talks to the network.

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension};
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
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
const PRAGMAS: &str =
    "PRAGMA locking_mode=EXCLUSIVE; PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint=8192; PRAGMA journal_size_limit=67108864;";

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

/// One content kept past GC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptRow {
    pub hash: ContentHash,
    pub size: u64,
    pub until_ms: i64,
    pub at_ms: i64,
}

/// One inode row.
#[derive(Clone, Debug)]
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
}

/// One outbox row: a change waiting for the manager's decision.
#[derive(Clone, Debug)]
pub struct OutboxRow {
    pub seq: i64,
    pub msg: MessageId,
    pub change: Change,
}

pub struct Db {
    conn: Connection,
    /// Transactions committed since the database was opened (`Db::commits`).
    commits: std::cell::Cell<u64>,
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
    ])
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
        Ok(Db { conn, commits: Default::default() })
    }

    // Transaction control goes through the statement cache like every other statement:
    // `execute_batch` would parse it again on every transaction.
    pub fn begin(&self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("BEGIN")?.execute([]).map(drop)
    }
    pub fn commit(&self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        self.commits.set(self.commits.get() + 1);
        Ok(())
    }
    /// Transactions committed since the database was opened: each writes the pages it
    /// changed to the log, so fewer of them for the same work is what keeps a burst of
    /// file operations cheap (the `syncfs_node_db_commits` metric).
    pub fn commits(&self) -> u64 {
        self.commits.get()
    }
    /// Makes every committed transaction durable: a checkpoint flushes the WAL to disk
    /// first (with `synchronous=NORMAL`, commits alone do not).
    pub fn sync(&self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("PRAGMA wal_checkpoint(PASSIVE)")?.query_row([], |_| Ok(()))
    }

    /// Closes the database file as a dead process would leave it (committed
    /// transactions in it, its lock gone); the `Db` is unusable afterwards.
    #[cfg(test)]
    pub fn let_go_for_test(&mut self) {
        let _ = std::mem::replace(&mut self.conn, Connection::open_in_memory().unwrap());
    }

    /// The connection itself, for tests that make the database fail on purpose.
    #[cfg(test)]
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn rollback(&self) {
        let _ = self.conn.prepare_cached("ROLLBACK").and_then(|mut s| s.execute([]));
    }

    pub fn meta(&self, key: &str) -> rusqlite::Result<Option<String>> {
        self.conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()
    }
    pub fn set_meta(&self, key: &str, value: &str) -> rusqlite::Result<()> {
        self.conn.execute("INSERT INTO meta(key, value) VALUES(?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value", [key, value])?;
        Ok(())
    }

    /// Every pin rule: (path, "" for the root, and whether it keeps contents local).
    pub fn pins(&self) -> rusqlite::Result<Vec<(String, bool)>> {
        let mut st = self.conn.prepare("SELECT path, pinned FROM pins")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)))?;
        rows.collect()
    }

    pub fn set_pin(&self, path: &str, pinned: Option<bool>) -> rusqlite::Result<()> {
        match pinned {
            Some(p) => self
                .conn
                .prepare_cached("INSERT INTO pins(path, pinned) VALUES(?1, ?2) ON CONFLICT(path) DO UPDATE SET pinned = excluded.pinned")?
                .execute(params![path, p])?,
            None => self.conn.prepare_cached("DELETE FROM pins WHERE path = ?1")?.execute([path])?,
        };
        Ok(())
    }

    pub fn kept(&self) -> rusqlite::Result<Vec<KeptRow>> {
        let mut st = self.conn.prepare("SELECT hash, size, until_ms, at_ms FROM kept")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (hash, size, until_ms, at_ms) = row?;
            if let Ok(hash) = hash.parse() {
                out.push(KeptRow { hash, size: size as u64, until_ms, at_ms });
            }
        }
        Ok(out)
    }
    /// Records kept contents, all or none (one transaction).
    pub fn put_kept_all(&self, rows: &[KeptRow]) -> rusqlite::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        self.all_or_none(|db| {
            let mut put = db.conn.prepare_cached(
                "INSERT INTO kept(hash, size, until_ms, at_ms) VALUES(?1, ?2, ?3, ?4) ON CONFLICT(hash) DO UPDATE SET until_ms = excluded.until_ms",
            )?;
            for k in rows {
                put.execute(params![k.hash.to_hex().as_str(), k.size as i64, k.until_ms, k.at_ms])?;
            }
            Ok(())
        })
    }
    /// Forgets kept contents, all or none (one transaction).
    pub fn remove_kept_all<'a>(&self, hashes: impl IntoIterator<Item = &'a ContentHash>) -> rusqlite::Result<()> {
        let mut hashes = hashes.into_iter().peekable();
        if hashes.peek().is_none() {
            // (The GC asks on every pass, mostly with nothing expired.)
            return Ok(());
        }
        self.all_or_none(|db| {
            let mut remove = db.conn.prepare_cached("DELETE FROM kept WHERE hash = ?1")?;
            for h in hashes {
                remove.execute([h.to_hex().as_str()])?;
            }
            Ok(())
        })
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
        let mut st = self.conn.prepare("SELECT ino, kind, perm, uid, gid, atime, mtime, ctime, nlink, rdev, size, hash, target, writing FROM inodes")?;
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
            })
        })?;
        let rows = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok((rows, writing))
    }

    pub fn save_inode(&self, i: &InodeRow) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO inodes(ino, kind, perm, uid, gid, atime, mtime, ctime, nlink, rdev, size, hash, target)
                 VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                 ON CONFLICT(ino) DO UPDATE SET kind = excluded.kind, perm = excluded.perm, uid = excluded.uid, gid = excluded.gid,
                   atime = excluded.atime, mtime = excluded.mtime, ctime = excluded.ctime, nlink = excluded.nlink, rdev = excluded.rdev,
                   size = excluded.size, hash = excluded.hash, target = excluded.target",
            )?
            .execute(params![i.ino as i64, i.kind, i.perm, i.uid, i.gid, i.atime, i.mtime, i.ctime, i.nlink, i.rdev, i.size as i64, i.hash, i.target])?;
        Ok(())
    }

    pub fn delete_inode(&self, ino: u64) -> rusqlite::Result<()> {
        self.conn.prepare_cached("DELETE FROM inodes WHERE ino = ?1")?.execute([ino as i64])?;
        Ok(())
    }

    /// Records that `ino` is being written (a work file was made for it), or no longer,
    /// in its saved row (an inode without one, removed while open, is not recorded).
    /// Saving the row again leaves this as it is.
    pub fn set_writing(&self, ino: u64, writing: bool) -> rusqlite::Result<()> {
        self.conn.prepare_cached("UPDATE inodes SET writing = ?2 WHERE ino = ?1 AND writing != ?2")?.execute(params![ino as i64, writing])?;
        Ok(())
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
        let mut st = self.conn.prepare("SELECT parent, name, ino FROM dentries")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, OsString::from_vec(r.get(1)?), r.get::<_, i64>(2)? as u64)))?;
        rows.collect()
    }

    pub fn save_dentry(&self, parent: u64, name: &std::ffi::OsStr, ino: u64) -> rusqlite::Result<()> {
        self.conn.prepare_cached("INSERT OR REPLACE INTO dentries(parent, name, ino) VALUES(?1, ?2, ?3)")?.execute(params![
            parent as i64,
            name.as_bytes(),
            ino as i64
        ])?;
        Ok(())
    }

    pub fn delete_dentry(&self, parent: u64, name: &std::ffi::OsStr) -> rusqlite::Result<()> {
        self.conn.prepare_cached("DELETE FROM dentries WHERE parent = ?1 AND name = ?2")?.execute(params![parent as i64, name.as_bytes()])?;
        Ok(())
    }

    pub fn revs(&self) -> rusqlite::Result<Vec<(String, u64)>> {
        let mut st = self.conn.prepare("SELECT path, rev FROM revs")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        rows.collect()
    }

    pub fn set_rev(&self, path: &RelPath, rev: Revision) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("INSERT INTO revs(path, rev) VALUES(?1, ?2) ON CONFLICT(path) DO UPDATE SET rev = excluded.rev")?
            .execute(params![path.as_str(), rev.0 as i64])?;
        Ok(())
    }

    pub fn outbox(&self) -> anyhow::Result<Vec<OutboxRow>> {
        let mut st = self.conn.prepare("SELECT seq, msg, body FROM outbox ORDER BY seq")?;
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
        self.conn.prepare_cached("INSERT INTO outbox(seq, msg, path, body) VALUES(?1, ?2, ?3, ?4)")?.execute(params![
            seq,
            msg.as_str(),
            change.path.as_str(),
            serde_json::to_string(change).expect("wire types serialize")
        ])?;
        Ok(())
    }

    /// Replaces the change of a row that was never sent; the row keeps its place.
    pub fn replace_outbox(&self, seq: i64, change: &Change) -> rusqlite::Result<usize> {
        self.conn.prepare_cached("UPDATE outbox SET path = ?2, body = ?3 WHERE seq = ?1")?.execute(params![
            seq,
            change.path.as_str(),
            serde_json::to_string(change).expect("wire types serialize")
        ])
    }

    pub fn remove_outbox(&self, seq: i64) -> rusqlite::Result<usize> {
        self.conn.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?.execute([seq])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(db.conn().query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)).unwrap(), 5);
        drop(db);
        Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 7").unwrap();
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
        let change = Change { path: RelPath::new("d/f").unwrap(), base: Revision(3), follows: None, op: wire::ChangeOp::Delete };
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
        assert_eq!(db.kept().unwrap(), vec![KeptRow { hash: ContentHash::from_bytes([7; 32]), size: 7, until_ms: 20, at_ms: 10 }]);
    }
}
