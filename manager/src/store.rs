//! The manager's SQLite database: nodes, every path's current version, holders, history,
//! conflicts, applied message ids, and the outbox of messages to publish.
//!
//! It owns the revision counter. Every incoming message is handled inside the caller's
//! transaction, and what must be sent is written to the outbox in that same transaction,
//! so a crash can never lose a decision or send one that was not committed. It never
//! talks to the broker itself.
//!
//! A `Sync` is only recorded there (the newest request of a node replaces an older one);
//! its reply is made later, one page per short transaction ([`Store::sync_step`]), so no
//! transaction reads the whole tree and a node asking again and again gets at most one
//! reply started per [`SYNC_MIN_INTERVAL_MS`].

use crate::rule::{self, Current, Decision, UtcTime};
use anyhow::Context;
use rusqlite::{params, OptionalExtension};
use std::path::Path;
use wire::{topology, Change, ChangeOp, Content, Entry, Envelope, Held, Holder, MessageId, NodeId, Outcome, RelPath, Revision, ToManager, ToNode, Version};

/// A node that has sent nothing for this long is shown offline.
pub const OFFLINE_AFTER_MS: i64 = 5_000;
/// A node's sync replies start at most this often. Each one reads the whole tree, and
/// anything that can publish as a node (or a node told to sync by an unauthenticated
/// caller) can ask without end; requests in between wait, and the newest is answered.
pub const SYNC_MIN_INTERVAL_MS: i64 = 1_000;
/// Paths read from the database at a time while a sync reply page is filled.
const SYNC_READ_ROWS: i64 = 512;

/// Start of the reason [`Tx::handle_isolated`] gives for a message given up before
/// ([`Store::give_up_suspect`]): it is dead-lettered at once, not tried again.
pub const GIVEN_UP: &str = "given up";

/// Start of the reason [`Tx::handle_isolated`] gives for a message of a node the
/// operator forgot ([`Tx::forget_node`]): dead-lettered at once.
pub const FORGOTTEN_NODE: &str = "from a forgotten node";

/// `meta` key of the manager's uptime ([`Tx::count_uptime`]).
const UPTIME_KEY: &str = "uptime_ms";

/// Whether a message that failed with `reason` fails again however often it is tried
/// (it is dead-lettered at once).
pub fn fails_for_good(reason: &str) -> bool {
    reason.starts_with(GIVEN_UP) || reason.starts_with(FORGOTTEN_NODE)
}

/// Test-only fault: with `SYNC_TEST_ABORT_ON_PATH` set, a change of exactly that path
/// aborts the process in the middle of its batch's transaction, the way a crash or a
/// kill would (tests of what the manager does with a message that kills it). Never set
/// in production; read once.
fn test_abort_on_path() -> Option<&'static str> {
    static PATH: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    PATH.get_or_init(|| std::env::var("SYNC_TEST_ABORT_ON_PATH").ok().filter(|p| !p.is_empty())).as_deref()
}

/// Test-only fault: with `SYNC_TEST_DB_FAULT_ON_PATH=PATH:N`, the first N times a
/// message changing exactly PATH is handled, handling fails as a failing database would
/// (an error outside the message's savepoint, which ends the broker session; tests of
/// what the manager does with a message in hand when the database fails, not the
/// message). Never set in production; read once.
fn test_db_fault(env: &Envelope<ToManager>) -> bool {
    static FAULT: std::sync::OnceLock<Option<(String, std::sync::atomic::AtomicU32)>> = std::sync::OnceLock::new();
    let fault = FAULT.get_or_init(|| {
        let v = std::env::var("SYNC_TEST_DB_FAULT_ON_PATH").ok()?;
        let (path, n) = v.rsplit_once(':')?;
        Some((path.to_string(), std::sync::atomic::AtomicU32::new(n.parse().ok()?)))
    });
    let Some((path, left)) = fault else { return false };
    let names = |c: &Change| c.path.as_str() == path;
    let hit = match &env.body {
        ToManager::Change(c) => names(c),
        ToManager::Changes { items } => items.iter().any(|i| names(&i.change)),
        _ => false,
    };
    hit && left.fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

/// Schema version 2: the base each change was decided on, so that a change following a
/// refused one keeps that base (rows from before have 0: no base passed on).
const SCHEMA_V2: &str = "ALTER TABLE applied ADD COLUMN base INTEGER NOT NULL DEFAULT 0;";

/// Schema version 3: kept versions (docs/versions.md). Each history row says its content
/// hash (files), when it stopped being current, whether it is a kept version now, and
/// whether it was a put refused at the conflict-file cap (kept, never current); `kept`
/// says which nodes keep which contents. Versions from before were never kept by any node
/// (their contents were collected): they are not listed as kept.
const SCHEMA_V3: &str = "
ALTER TABLE history ADD COLUMN hash TEXT;
ALTER TABLE history ADD COLUMN ended_ms INTEGER;
ALTER TABLE history ADD COLUMN kept INTEGER NOT NULL DEFAULT 0;
ALTER TABLE history ADD COLUMN refused INTEGER NOT NULL DEFAULT 0;
CREATE INDEX history_kept_by_end ON history(ended_ms) WHERE kept = 1;
CREATE INDEX history_kept_by_hash ON history(hash) WHERE kept = 1;
CREATE INDEX history_kept_by_path ON history(path, rev) WHERE kept = 1;
CREATE INDEX paths_deleted ON paths(rev) WHERE version IS NULL;
CREATE TABLE kept(hash TEXT NOT NULL, node TEXT NOT NULL, size INTEGER NOT NULL, confirmed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(hash, node));
";

/// Schema version 4: what a node with files on demand said of its contents in its last
/// heartbeat (JSON `NodeResidency`; NULL for other nodes), for the dashboard.
const SCHEMA_V4: &str = "ALTER TABLE nodes ADD COLUMN residency TEXT;";

/// Schema version 5: a sync request and its reply say whether the node counts what it
/// hears meanwhile as named (`ToManager::Sync::snapshot`); a reply of such a node is a
/// snapshot at the revision its walk started from (`caught_up`, which then stays put).
const SCHEMA_V5: &str = "
ALTER TABLE sync_requests ADD COLUMN snapshot INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sync_replies ADD COLUMN snapshot INTEGER NOT NULL DEFAULT 0;
";

/// Schema version 6: the last request to sync sent to a node because its queue dropped
/// messages, by its outbox `seq` (`Tx::ask_to_sync_after_drop`).
const SCHEMA_V6: &str = "
CREATE TABLE IF NOT EXISTS sync_asks (node TEXT PRIMARY KEY, seq INTEGER NOT NULL);
";

/// Schema version 7: where a path's states come from when some were states the manager
/// lost (`rule::TakenIn`: the lost revision of the latest one taken in again, the
/// revisions the first and the latest got), kept by every later state of the path
/// (`Tx::mark_taken_in`).
const SCHEMA_V7: &str = "
ALTER TABLE paths ADD COLUMN lost_base INTEGER;
ALTER TABLE paths ADD COLUMN lost_first INTEGER;
ALTER TABLE paths ADD COLUMN lost_last INTEGER;
";

/// Schema version 8: what the database keeps for ever no more.
/// - Decided changes' records are forgotten once their sender can no longer send them
///   again (`Tx::forget_settled_decisions`): each record says the head after its
///   decision (rows from before have 0, and their revision is taken instead), each node
///   the highest revision it had taken when it last said it had no change undecided,
///   `applied_marks` which records were there at what time (records are kept at least
///   `Retention::remember_decisions_ms`); `applied_by_node` finds a node's records,
///   `applied_by_head` the last one decided before a head.
/// - History rows of states that stopped being current, kept versions no more, go once
///   their retention is over (`Tx::expire_versions`), found by `history_ended`. Rows that
///   ended before ends were recorded (a delete followed by a new file there, rows from
///   before schema 3) take the time they were made as their end.
const SCHEMA_V8: &str = "
ALTER TABLE applied ADD COLUMN head INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN settled_taken INTEGER NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS applied_marks(at_ms INTEGER PRIMARY KEY, last_rowid INTEGER NOT NULL);
CREATE INDEX applied_by_node ON applied(node);
CREATE INDEX applied_by_head ON applied(head);
UPDATE history SET ended_ms = at_ms
  WHERE ended_ms IS NULL AND NOT EXISTS (SELECT 1 FROM paths p WHERE p.path = history.path AND p.rev = history.rev);
CREATE INDEX history_ended ON history(ended_ms) WHERE kept = 0 AND ended_ms IS NOT NULL;
";

/// Schema version 9: a deleted path's tombstone is no longer kept for ever
/// (`Tx::forget_applied_deletes`): each node records the highest revision up to which it
/// said, in a sync request, it had applied every delete (`since`, at most the head then),
/// and when the manager last asked it to sync so that it would say more. Nodes the
/// operator forgot (`manager node forget`, `Tx::forget_node`) are refused for good.
const SCHEMA_V9: &str = "
ALTER TABLE nodes ADD COLUMN deletes_applied INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN deletes_asked_ms INTEGER NOT NULL DEFAULT 0;
CREATE TABLE forgotten_nodes(id TEXT PRIMARY KEY, at_ms INTEGER NOT NULL);
";

/// Schema version 10: a node's silence is counted in the manager's uptime (`meta`
/// `uptime_ms`, the time it served with the broker), not in wall-clock time: what the
/// uptime was when the node was last heard of (`Tx::forget_silent_nodes`).
const SCHEMA_V10: &str = "ALTER TABLE nodes ADD COLUMN seen_uptime_ms INTEGER NOT NULL DEFAULT 0;";

/// `synchronous=FULL`: with WAL, a commit is on disk before `commit` returns. The manager
/// acks a message right after committing its decision; with `NORMAL` a power loss could
/// take back commits already acked, and the revisions they issued would be issued again.
/// How long a statement waits for another process's lock before it fails.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

const PRAGMAS: &str = "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA temp_store=MEMORY; PRAGMA cache_size=-65536;";

/// The schema's versions, oldest first (`PRAGMA user_version` says which one a database
/// is at); a new version is a new entry at the end.
const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5, SCHEMA_V6, SCHEMA_V7, SCHEMA_V8, SCHEMA_V9, SCHEMA_V10];

/// Schema version 1: the tables every manager had before versions were kept. A database
/// from then has them already (they are created only if missing) and is taken as is.
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS nodes(
  id TEXT PRIMARY KEY, url TEXT NOT NULL, online INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL,
  pending_changes INTEGER NOT NULL DEFAULT 0, pending_pulls INTEGER NOT NULL DEFAULT 0,
  software TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS paths(path TEXT PRIMARY KEY, rev INTEGER NOT NULL, version TEXT, origin TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS holders(path TEXT NOT NULL, node TEXT NOT NULL, rev INTEGER NOT NULL, PRIMARY KEY(path, node));
CREATE TABLE IF NOT EXISTS history(rev INTEGER PRIMARY KEY, path TEXT NOT NULL, version TEXT, origin TEXT NOT NULL, at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS history_by_path ON history(path, rev);
CREATE TABLE IF NOT EXISTS applied(msg TEXT PRIMARY KEY, node TEXT NOT NULL, rev INTEGER NOT NULL, outcome TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS conflicts(
  id INTEGER PRIMARY KEY, path TEXT NOT NULL, copy TEXT NOT NULL, node TEXT NOT NULL,
  base INTEGER NOT NULL, current_rev INTEGER NOT NULL, copy_rev INTEGER NOT NULL, at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS conflicts_by_path ON conflicts(path);
CREATE TABLE IF NOT EXISTS outbox(seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, id TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sync_requests(
  node TEXT PRIMARY KEY, request TEXT NOT NULL, since INTEGER NOT NULL, paged INTEGER NOT NULL,
  merged INTEGER NOT NULL, at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sync_replies(
  node TEXT PRIMARY KEY, started_ms INTEGER NOT NULL, request TEXT, since INTEGER NOT NULL, paged INTEGER NOT NULL,
  merged INTEGER NOT NULL, cursor TEXT NOT NULL, walk_done INTEGER NOT NULL, caught_up INTEGER NOT NULL,
  page INTEGER NOT NULL, entries INTEGER NOT NULL, bytes INTEGER NOT NULL, largest INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS suspects(msg TEXT PRIMARY KEY, starts INTEGER NOT NULL, given_up INTEGER NOT NULL DEFAULT 0);
";

pub struct Store {
    conn: rusqlite::Connection,
    retention: crate::versions::Retention,
    /// Whether commits are flushed to disk (`synchronous=FULL`, unless the benchmark
    /// setting turned it off).
    durable: bool,
    /// The most bytes a sync reply page takes, envelope included.
    sync_page_bytes: usize,
}

/// A message waiting in the outbox.
pub struct Outgoing {
    pub seq: i64,
    pub key: String,
    pub id: String,
    pub payload: Vec<u8>,
}

/// One node as the manager sees it.
#[derive(Clone, Debug)]
pub struct NodeRow {
    pub id: String,
    pub url: String,
    pub online: bool,
    pub last_seen_ms: i64,
    pub pending_changes: u64,
    pub pending_pulls: u64,
    pub software: String,
    /// Bytes of old versions' contents the node confirmed it keeps.
    pub kept_bytes: u64,
    /// What a node with files on demand said in its last heartbeat.
    pub residency: Option<wire::NodeResidency>,
}

pub(crate) fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("wire types serialize")
}

pub(crate) fn parse_version(s: Option<String>) -> anyhow::Result<Option<Version>> {
    s.map(|s| serde_json::from_str(&s).context("corrupt version in the manager database")).transpose()
}

/// Sets the connection's pragmas. Turning a new database to WAL while another process
/// does the same fails with SQLITE_BUSY at once (the busy handler does not wait for a
/// journal mode change), so that is tried again for as long as the busy timeout.
fn set_up(conn: &rusqlite::Connection, path: &Path) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.execute_batch(PRAGMAS) {
            Ok(()) => return Ok(()),
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Err(e) => return Err(e).with_context(|| format!("setting up {}", path.display())),
        }
    }
}

/// Brings the database to the latest schema version, or refuses one written by a newer
/// manager: it may hold what this one would misread.
///
/// Unless the database is at the latest version already, the version is read again and
/// the missing versions are made in one transaction that takes the write lock first, so
/// processes opening a database at once (the service starting
/// while an operator runs `manager status`) make each version once, one after the
/// other. (rusqlite_migration, used before, reads the version before its transaction:
/// the process that lost the race ran versions the other had just made, and failed.)
/// A failed version leaves nothing behind: the whole transaction is rolled back.
fn migrate(conn: &mut rusqlite::Connection, path: &Path) -> anyhow::Result<()> {
    let latest = MIGRATIONS.len();
    let version_of = |conn: &rusqlite::Connection| -> anyhow::Result<usize> {
        let v: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).with_context(|| format!("reading the schema version of {}", path.display()))?;
        if v > latest {
            anyhow::bail!(
                "the manager database {} is at schema version {v}, which this program does not know (it knows up to {latest}; is the database from a newer version?); not touching it",
                path.display()
            );
        }
        Ok(v)
    };
    // A database at the latest version (versions only go up) needs no lock: `manager
    // status` must open one that another process holds locked (a stuck manager's).
    if version_of(conn)? == latest {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .with_context(|| format!("taking the write lock of {} to bring its schema on", path.display()))?;
    let read = version_of(&tx)?;
    if read == latest {
        return Ok(());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(read) {
        tx.execute_batch(sql).with_context(|| format!("bringing the manager database {} to schema version {} (from {read})", path.display(), i + 1))?;
    }
    tx.pragma_update(None, "user_version", latest).with_context(|| format!("setting the schema version of {}", path.display()))?;
    tx.commit().with_context(|| format!("committing the schema of {}", path.display()))?;
    tracing::info!(from = read, to = latest, "brought the manager database's schema to version {latest}");
    Ok(())
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut conn = rusqlite::Connection::open(path).with_context(|| format!("opening database {}", path.display()))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Every statement is prepared once and kept (parsing SQL was a third of the
        // time a message took).
        conn.set_prepared_statement_cache_capacity(128);
        set_up(&conn, path)?;
        migrate(&mut conn, path)?;
        // For the benchmark only (what durability costs): SYNC_BENCH_UNSAFE_SYNCHRONOUS=NORMAL.
        if std::env::var("SYNC_BENCH_UNSAFE_SYNCHRONOUS").as_deref() == Ok("NORMAL") {
            tracing::warn!("synchronous=NORMAL (benchmark setting): acked decisions can be lost on power loss");
            conn.execute_batch("PRAGMA synchronous=NORMAL;")?;
            return Ok(Store { conn, retention: Default::default(), durable: false, sync_page_bytes: wire::SYNC_PAGE_BYTES });
        }
        Ok(Store { conn, retention: Default::default(), durable: true, sync_page_bytes: wire::SYNC_PAGE_BYTES })
    }

    /// How long, how many and in how many copies overwritten and deleted versions are kept.
    pub fn set_retention(&mut self, retention: crate::versions::Retention) {
        self.retention = retention;
    }
    pub fn retention(&self) -> crate::versions::Retention {
        self.retention
    }

    /// Sync reply pages of at most `bytes` instead of `wire::SYNC_PAGE_BYTES` (never
    /// more): the simulator's trees are small, and with small pages its replies come in
    /// several, with broadcasts, decisions, crashes and cuts between them.
    pub fn set_sync_page_bytes(&mut self, bytes: usize) {
        self.sync_page_bytes = bytes.min(wire::SYNC_PAGE_BYTES);
    }

    /// Read-only access for status queries.
    pub fn conn(&self) -> &rusqlite::Connection {
        &self.conn
    }

    /// Runs `f` in one transaction that takes the write lock up front: if the database
    /// is locked (another writer, a backup), the whole batch fails here, before any
    /// message is handled, so no message is blamed (and dead-lettered) for it. An error
    /// or a panic in `f` rolls the transaction back.
    pub fn transaction<T>(&mut self, f: impl FnOnce(&mut Tx<'_>) -> anyhow::Result<T>) -> anyhow::Result<T> {
        // Transaction control goes through the statement cache: `execute_batch` (what
        // rusqlite's `Transaction` uses) parses it again for every batch.
        run_cached(&self.conn, "BEGIN IMMEDIATE").context("taking the manager database's write lock (is another process writing it?)")?;
        let open = OpenTransaction(&self.conn);
        let mut t = Tx { tx: &self.conn, retention: self.retention, sync_page_bytes: self.sync_page_bytes };
        let out = f(&mut t)?;
        run_cached(&self.conn, "COMMIT").context("committing to the manager database")?;
        std::mem::forget(open);
        Ok(out)
    }

    /// A redelivered message is about to be handled, and it may be what stopped the
    /// manager last time (a crash, a kill, running out of memory: nothing a savepoint
    /// catches). Records the start, committed before handling begins, and returns how
    /// many earlier starts of it never finished. The count is cleared when its handling
    /// commits ([`Tx::handle_isolated`]).
    pub fn start_suspect(&mut self, msg: &MessageId) -> anyhow::Result<u32> {
        let starts: i64 = self
            .conn
            .prepare_cached("INSERT INTO suspects(msg, starts) VALUES(?1, 1) ON CONFLICT(msg) DO UPDATE SET starts = starts + 1 RETURNING starts")?
            .query_row([msg.as_str()], |r| r.get(0))
            .context("recording the start of a redelivered message")?;
        Ok((starts - 1).clamp(0, u32::MAX as i64) as u32)
    }

    /// The message stopped the manager too often and is given up: a copy of it sent
    /// again later (a node resends what was not decided after it reconnects) is
    /// dead-lettered without being handled.
    pub fn give_up_suspect(&mut self, msg: &MessageId) -> anyhow::Result<()> {
        self.conn.prepare_cached("UPDATE suspects SET given_up = 1 WHERE msg = ?1")?.execute([msg.as_str()]).context("recording a message given up")?;
        Ok(())
    }

    pub fn outbox(&self, limit: usize) -> anyhow::Result<Vec<Outgoing>> {
        // The limit is part of the statement's text, not a parameter: SQLite re-prepares
        // a statement whose LIMIT parameter is bound anew on every run.
        let mut st = self.conn.prepare_cached(&format!("SELECT seq, key, id, payload FROM outbox ORDER BY seq LIMIT {limit}"))?;
        let rows = st.query_map([], |r| Ok(Outgoing { seq: r.get(0)?, key: r.get(1)?, id: r.get(2)?, payload: r.get(3)? }))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets the outbox rows up to `up_to_seq`, published. This commit alone is not
    /// flushed to disk (`synchronous=NORMAL` for it; the next decision's commit flushes
    /// it along): a power loss that takes it back makes the manager publish those rows
    /// again after its restart, which nodes take as they take any redelivery (an entry
    /// no newer than theirs changes nothing, a decision on a change no longer queued is
    /// the path's state), as after a crash between publishing and this. It was one
    /// `fsync` per publish, a third of the manager's.
    pub fn remove_outbox(&mut self, up_to_seq: i64) -> anyhow::Result<()> {
        if self.durable {
            self.conn.prepare_cached("PRAGMA synchronous=NORMAL")?.execute([])?;
        }
        let removed = self.conn.prepare_cached("DELETE FROM outbox WHERE seq <= ?1").and_then(|mut st| st.execute([up_to_seq]));
        if self.durable {
            self.conn.prepare_cached("PRAGMA synchronous=FULL")?.execute([])?;
        }
        removed?;
        Ok(())
    }

    pub fn head(&self) -> anyhow::Result<Revision> {
        head(&self.conn)
    }

    /// A manager starts serving: its revisions go on from at least the time of the start,
    /// in microseconds since the Unix epoch. A database brought back from an older copy
    /// then never gives again a revision that the lost one gave (those are all older than
    /// this start, unless the lost one decided a million changes a second), so no node
    /// takes a new decision for one it already has. A node ahead of the copy is caught
    /// up with besides ([`Tx::catch_up_with`]); this covers the decisions made before the
    /// first message that says so. Not past [`REV_LIMIT`]` / 2` (a clock far ahead).
    pub fn start_serving(&mut self, now_ms: i64) -> anyhow::Result<Revision> {
        let floor = Revision(((now_ms.max(0) as u64).saturating_mul(1000)).min(REV_LIMIT / 2));
        self.transaction(|tx| {
            let head = head(tx.tx)?;
            if head < floor {
                tx.set_head(floor)?;
                // A node that names a revision in the range skipped has it from a
                // database this one does not know of (`Tx::catch_up_with`).
                let mut ranges = skipped(tx.tx)?;
                ranges.push((head.0, floor.0));
                let keep = ranges.len().saturating_sub(SKIPPED_KEPT);
                tx.set_meta("skipped", &json(&&ranges[keep..]))?;
            }
            Ok(head.max(floor))
        })
    }

    /// The last time the database was found behind its nodes ([`Tx::catch_up_with`]).
    pub fn caught_up(&self) -> anyhow::Result<Option<CaughtUp>> {
        caught_up(&self.conn)
    }

    pub fn nodes(&self) -> anyhow::Result<Vec<NodeRow>> {
        let mut st = self.conn.prepare(
            "SELECT id, url, online, last_seen_ms, pending_changes, pending_pulls, software,
               (SELECT CAST(total(size) AS INTEGER) FROM kept k WHERE k.node = nodes.id AND k.confirmed = 1), residency FROM nodes ORDER BY id",
        )?;
        let rows = st.query_map([], |r| {
            Ok(NodeRow {
                id: r.get(0)?,
                url: r.get(1)?,
                online: r.get(2)?,
                last_seen_ms: r.get(3)?,
                pending_changes: r.get::<_, i64>(4)? as u64,
                pending_pulls: r.get::<_, i64>(5)? as u64,
                software: r.get(6)?,
                kept_bytes: r.get::<_, i64>(7)? as u64,
                residency: r.get::<_, Option<String>>(8)?.and_then(|j| serde_json::from_str(&j).ok()),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn live_file_count(&self) -> anyhow::Result<u64> {
        Ok(self.conn.prepare_cached("SELECT count(*) FROM paths WHERE version IS NOT NULL")?.query_row([], |r| r.get::<_, i64>(0))? as u64)
    }

    pub fn conflict_count(&self) -> anyhow::Result<u64> {
        Ok(self.conn.prepare_cached("SELECT count(*) FROM conflicts")?.query_row([], |r| r.get::<_, i64>(0))? as u64)
    }

    /// The current entry of a path, with holders.
    pub fn entry(&self, path: &RelPath) -> anyhow::Result<Option<Entry>> {
        entry(&self.conn, path)
    }

    /// Answers messages node queues dropped, in one transaction: `drops` names, for each,
    /// the node and the message's outbox `seq` (`Tx::ask_to_sync_after_drop`). Returns
    /// the nodes asked, and the forgotten nodes among the others (their queues, left
    /// behind, are full: the service deletes them).
    pub fn ask_to_sync_after_drops(&mut self, drops: &[(NodeId, Option<i64>)]) -> anyhow::Result<(Vec<NodeId>, Vec<NodeId>)> {
        self.transaction(|tx| {
            let (mut asked, mut forgotten) = (Vec::new(), Vec::new());
            for (node, seq) in drops {
                if tx.is_forgotten(node)? {
                    if !forgotten.contains(node) {
                        forgotten.push(node.clone());
                    }
                } else if tx.ask_to_sync_after_drop(node, *seq)? {
                    asked.push(node.clone());
                }
            }
            Ok((asked, forgotten))
        })
    }

    /// Sends the next page of a sync reply, in a transaction of its own, after starting
    /// the replies of the requests that are due. Returns whether it sent one (there may
    /// be more to send); `false` when nothing is due now.
    pub fn sync_step(&mut self, now_ms: i64) -> anyhow::Result<bool> {
        self.transaction(|tx| {
            while tx.start_due_reply(now_ms)? {}
            let Some(reply) = tx.active_reply()? else {
                return Ok(false);
            };
            tx.send_page(reply, now_ms)?;
            Ok(true)
        })
    }
}

/// The ids the manager at `db` forgot ([`Tx::forget_node`]); none if there is no such
/// database yet (or it is older than the table).
pub fn forgotten_nodes(db: &Path) -> anyhow::Result<std::collections::BTreeSet<String>> {
    if !db.exists() {
        return Ok(Default::default());
    }
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).with_context(|| format!("opening {}", db.display()))?;
    let has_table = conn.query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'forgotten_nodes'", [], |_| Ok(())).optional()?.is_some();
    if !has_table {
        return Ok(Default::default());
    }
    let mut st = conn.prepare("SELECT id FROM forgotten_nodes")?;
    let ids = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    Ok(ids)
}

/// What [`Tx::forget_node`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForgottenNode {
    /// Records of its decided changes.
    pub records: usize,
    /// Paths it was a holder of.
    pub holdings: usize,
    /// Contents of old versions it was asked to keep.
    pub kept: usize,
}

/// A sync reply being sent, one row of `sync_replies`. The reply walks the paths in
/// order (`cursor`: the last one sent). Every path the node was told about on its queue
/// before the last page must be named by the reply or counted as named by the node:
/// - a node that counts what it hears meanwhile (`snapshot`) gets the paths as of the
///   revision the walk started from (`caught_up`, which stays put): a path changed later
///   is skipped by the walk and comes on its queue, so a tree that grows faster than the
///   walk does not keep the reply going;
/// - to an older node, changes made while the reply is under way to paths already
///   walked are sent again from the history (`caught_up`: the revision up to which they
///   are), and the walk takes every path changed ahead of it.
#[derive(Debug)]
struct Reply {
    node: NodeId,
    request: MessageId,
    since: Revision,
    paged: bool,
    snapshot: bool,
    /// How many requests of the node this reply answers.
    merged: i64,
    cursor: String,
    walk_done: bool,
    caught_up: Revision,
    page: u32,
    entries: i64,
    bytes: i64,
    largest: i64,
    started_ms: i64,
}

/// One page being filled: entries and their encoded size, within the page budget.
struct Page {
    entries: Vec<Entry>,
    paths: std::collections::HashSet<RelPath>,
    bytes: usize,
    /// The most bytes the page may take (`Store::set_sync_page_bytes`).
    budget: usize,
    full: bool,
}

impl Page {
    /// Adds `entry` if it fits; marks the page full otherwise. An entry that cannot fit
    /// even alone loses holders until it does (they are hints; the first are the best).
    fn add(&mut self, mut entry: Entry) -> bool {
        if self.full {
            return false;
        }
        if self.paths.contains(&entry.path) {
            return true;
        }
        let mut size = entry_bytes(&entry);
        if self.entries.is_empty() {
            let room = self.budget.saturating_sub(self.bytes);
            if size > room {
                tracing::warn!(path = %entry.path, holders = entry.holders.len(), "a sync reply entry is too large for one page; sending it with fewer holders");
            }
            while size > room && entry.holders.pop().is_some() {
                size = entry_bytes(&entry);
            }
        }
        // The comma before every entry but the first.
        let added = size + usize::from(!self.entries.is_empty());
        if self.bytes + added > self.budget {
            if self.entries.is_empty() {
                // Cannot happen with the wire's page size (a path and a symlink target
                // take at most ~50 KB even escaped; a smaller budget, the simulator's
                // 1,200 bytes, only with a name of ~800), but a page must always make
                // progress: leave the entry out rather than send empty pages for ever.
                tracing::error!(path = %entry.path, bytes = size, "a sync reply entry does not fit in a page even alone; left out");
                return true;
            }
            self.full = true;
            return false;
        }
        self.bytes += added;
        self.paths.insert(entry.path.clone());
        self.entries.push(entry);
        true
    }
}

fn entry_bytes(e: &Entry) -> usize {
    serde_json::to_vec(e).map(|v| v.len()).unwrap_or(usize::MAX)
}

fn new_message_id() -> MessageId {
    uuid::Uuid::new_v4().to_string().parse().expect("uuids are valid message ids")
}

/// The database was found behind its nodes: `node` had taken revision `seen`, which it
/// never gave; the head was `head`, and revisions went on after `to`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaughtUp {
    pub at_ms: i64,
    pub node: String,
    pub seen: u64,
    pub head: u64,
    pub to: u64,
}

impl std::fmt::Display for CaughtUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "caught up with its nodes: {} had taken revision {}, which this database never gave (brought back from an older copy?); every node was asked to sync, and revisions went on after {}",
            self.node, self.seen, self.to
        )
    }
}

/// The highest revision a message from a node says it took, if it names one
/// ([`Tx::catch_up_with`]).
fn named_revision(body: &ToManager) -> Option<Revision> {
    match body {
        ToManager::Heartbeat { taken, .. } | ToManager::Sync { taken, .. } => Some(*taken),
        ToManager::Change(c) => Some(c.base),
        ToManager::Changes { items } => items.iter().map(|i| i.change.base).max(),
        _ => None,
    }
}

/// How many of the last starts' skipped ranges of revisions are kept
/// (`Store::start_serving`): a restored database that starts again this many times
/// before a node says anything no longer sees that it is behind from a heartbeat (the
/// nodes still sync after their next reconnection).
const SKIPPED_KEPT: usize = 16;

/// How long after every node was asked to sync for a database found behind it is not
/// asked again ([`Tx::catch_up_with`]).
const CATCH_UP_QUIET_MS: i64 = 60_000;

fn caught_up(conn: &rusqlite::Connection) -> anyhow::Result<Option<CaughtUp>> {
    let note: Option<String> = conn.prepare_cached("SELECT value FROM meta WHERE key = 'caught_up'")?.query_row([], |r| r.get(0)).optional()?;
    note.map(|n| serde_json::from_str(&n).context("reading the last catch-up's note")).transpose()
}

/// The ranges of revisions (from, to] the last starts of the database skipped.
fn skipped(conn: &rusqlite::Connection) -> anyhow::Result<Vec<(u64, u64)>> {
    let v: Option<String> = conn.prepare_cached("SELECT value FROM meta WHERE key = 'skipped'")?.query_row([], |r| r.get(0)).optional()?;
    v.map_or(Ok(Vec::new()), |v| serde_json::from_str(&v).context("reading the ranges of revisions skipped at start"))
}

/// How far past the revision a node names the head goes when the database is found
/// behind its nodes ([`Tx::catch_up_with`]): other nodes may have taken later revisions
/// of the lost ones, up to as many decisions as the cluster made after the older copy.
const CATCH_UP_MARGIN: u64 = 1 << 24;
/// The largest jump at once beyond the head.
const CATCH_UP_MAX: u64 = 1 << 32;
/// The highest head a catch-up may set: revisions are SQLite integers, and the dashboard
/// shows them as JavaScript numbers (exact up to 2^53).
const REV_LIMIT: u64 = 1 << 53;

/// The kind of a decision's outcome (`accepted`, `unchanged`, `conflict`, `refused`), in
/// SQL over a row of `applied`.
const OUTCOME_KIND: &str = "json_extract(outcome, '$.outcome')";
/// The `meta` keys counting the decisions forgotten, by outcome
/// (`Tx::forget_settled_decisions`).
const FORGOTTEN_PREFIX: &str = "forgotten_";

/// Change messages decided, by outcome, those forgotten since included.
pub(crate) fn decided_by_outcome(conn: &rusqlite::Connection) -> anyhow::Result<Vec<(String, u64)>> {
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    let mut st = conn.prepare_cached(&format!("SELECT {OUTCOME_KIND}, count(*) FROM applied GROUP BY 1"))?;
    for row in st.query_map([], |r| Ok((r.get::<_, Option<String>>(0)?.unwrap_or_else(|| "unknown".into()), r.get::<_, i64>(1)?)))? {
        let (outcome, n) = row?;
        *counts.entry(outcome).or_default() += n as u64;
    }
    let mut st = conn.prepare_cached("SELECT substr(key, ?2 + 1), value FROM meta WHERE substr(key, 1, ?2) = ?1")?;
    for row in st.query_map(params![FORGOTTEN_PREFIX, FORGOTTEN_PREFIX.len() as i64], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (outcome, n) = row?;
        *counts.entry(outcome).or_default() += n as u64;
    }
    Ok(counts.into_iter().collect())
}

fn head(conn: &rusqlite::Connection) -> anyhow::Result<Revision> {
    let v: Option<i64> = conn.prepare_cached("SELECT value FROM meta WHERE key='head'")?.query_row([], |r| r.get(0)).optional()?;
    Ok(Revision(v.unwrap_or(0) as u64))
}

/// A count a node reports, as SQLite stores it (a claim past `i64::MAX` is that).
fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The first [`wire::MAX_HOLDERS`] holders of `path` at `rev` (a message naming more is
/// refused by every node).
fn holders(conn: &rusqlite::Connection, path: &str, rev: i64) -> anyhow::Result<Vec<Holder>> {
    // Online holders first; the origin (inserted first) before later pullers.
    let mut st = conn.prepare_cached(
        "SELECT h.node, n.url FROM holders h JOIN nodes n ON n.id = h.node
         WHERE h.path = ?1 AND h.rev = ?2 ORDER BY n.online DESC, h.rowid LIMIT ?3",
    )?;
    let rows = st.query_map(params![path, rev, wire::MAX_HOLDERS as i64], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (node, url) = row?;
        if let Ok(node) = node.parse() {
            out.push(Holder { node, url });
        }
    }
    Ok(out)
}

/// The first of `ancestors` ([`Tx::ancestors_live`]) that is live and not a directory.
fn first_non_dir(ancestors: &[(RelPath, Option<Version>)]) -> Option<RelPath> {
    ancestors.iter().find(|(_, v)| v.as_ref().is_some_and(|v| !matches!(v.content, Content::Dir))).map(|(a, _)| a.clone())
}

fn entry(conn: &rusqlite::Connection, path: &RelPath) -> anyhow::Result<Option<Entry>> {
    let row: Option<(i64, Option<String>, Option<i64>, Option<i64>)> = conn
        .prepare_cached("SELECT rev, version, lost_base, lost_first FROM paths WHERE path = ?1")?
        .query_row([path.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    let Some((rev, version, lost_base, lost_first)) = row else {
        return Ok(None);
    };
    let version = parse_version(version)?;
    let holders = if matches!(version, Some(Version { content: Content::File { .. }, .. })) { holders(conn, path.as_str(), rev)? } else { Vec::new() };
    Ok(Some(Entry { path: path.clone(), rev: Revision(rev as u64), version, holders, from_lost: from_lost(lost_base, lost_first) }))
}

/// The `lost_base` and `lost_first` columns of a path's row, as nodes are told them.
fn from_lost(base: Option<i64>, first: Option<i64>) -> Option<wire::FromLost> {
    Some(wire::FromLost { base: Revision(base? as u64), at: Revision(first? as u64) })
}

/// One transaction over the store; every handler of a message runs inside one.
pub struct Tx<'a> {
    pub(crate) tx: &'a rusqlite::Connection,
    pub(crate) retention: crate::versions::Retention,
    sync_page_bytes: usize,
}

/// Runs one statement without parameters through the connection's statement cache.
fn run_cached(conn: &rusqlite::Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// A transaction begun and not yet committed: dropped (an error or a panic on the way),
/// it rolls back.
struct OpenTransaction<'a>(&'a rusqlite::Connection);

impl Drop for OpenTransaction<'_> {
    fn drop(&mut self) {
        if let Err(e) = run_cached(self.0, "ROLLBACK") {
            tracing::warn!("rolling back a manager database transaction: {e}");
        }
    }
}

impl Tx<'_> {
    pub(crate) fn next_rev(&mut self) -> anyhow::Result<Revision> {
        let rev = head(self.tx)?.next();
        self.set_head(rev)?;
        Ok(rev)
    }

    fn set_head(&mut self, rev: Revision) -> anyhow::Result<()> {
        self.set_meta("head", &(rev.0 as i64))
    }

    pub(crate) fn enqueue(&mut self, key: &str, body: ToNode) -> anyhow::Result<()> {
        self.enqueue_envelope(key, Envelope::new(new_message_id(), NodeId::manager(), body))?;
        Ok(())
    }

    /// Puts a message in the outbox; returns its encoded size.
    fn enqueue_envelope(&mut self, key: &str, env: Envelope<ToNode>) -> anyhow::Result<usize> {
        let payload = env.encode();
        // The broker refuses a larger message, and a row it refuses would stop every
        // message behind it: the change that made it fails instead (and is dead-lettered).
        anyhow::ensure!(
            payload.len() <= wire::BROKER_MAX_MESSAGE_BYTES,
            "a message of {} bytes for {key} is larger than the broker takes ({} bytes)",
            payload.len(),
            wire::BROKER_MAX_MESSAGE_BYTES
        );
        self.tx.prepare_cached("INSERT INTO outbox(key, id, payload) VALUES(?1, ?2, ?3)")?.execute(params![key, env.id.as_str(), payload])?;
        Ok(payload.len())
    }

    fn current(&self, path: &RelPath) -> anyhow::Result<Option<Current>> {
        type Row = (i64, Option<String>, String, [Option<i64>; 3]);
        let row: Option<Row> = self
            .tx
            .prepare_cached("SELECT rev, version, origin, lost_base, lost_first, lost_last FROM paths WHERE path = ?1")?
            .query_row([path.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, [r.get(3)?, r.get(4)?, r.get(5)?])))
            .optional()?;
        let Some((rev, version, origin, [lost_base, lost_first, lost_last])) = row else {
            return Ok(None);
        };
        let version = parse_version(version)?;
        let has_children = matches!(version, Some(Version { content: Content::Dir, .. })) && self.has_live_children(path)?;
        Ok(Some(Current {
            rev: Revision(rev as u64),
            version,
            has_children,
            made_by_manager: origin == NodeId::manager().as_str(),
            from_lost: (|| Some(rule::TakenIn { base: Revision(lost_base? as u64), first: Revision(lost_first? as u64), last: Revision(lost_last? as u64) }))(),
        }))
    }

    /// The version `path` had at revision `rev`, if the history still has that state (and
    /// it was live).
    /// Whether the states of `path` after `base` up to `current` are all `node`'s own
    /// (`rule::MadeOn::only_own_since`), as the history holds them (it holds the state
    /// at `base`, so none after it is forgotten).
    fn only_own_since(&self, path: &RelPath, base: Revision, current: Revision, node: &NodeId) -> anyhow::Result<bool> {
        let (states, others): (i64, i64) = self
            .tx
            .prepare_cached("SELECT count(*), coalesce(sum(origin != ?4), 0) FROM history WHERE path = ?1 AND rev > ?2 AND rev <= ?3")?
            .query_row(params![path.as_str(), base.0 as i64, current.0 as i64, node.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(states > 0 && others == 0)
    }

    fn version_at(&self, path: &RelPath, rev: Revision) -> anyhow::Result<Option<Version>> {
        let version: Option<Option<String>> = self
            .tx
            .prepare_cached("SELECT version FROM history WHERE rev = ?1 AND path = ?2")?
            .query_row(params![rev.0 as i64, path.as_str()], |r| r.get(0))
            .optional()?;
        parse_version(version.flatten())
    }

    /// A change made on a state the manager lost, later than any of the path it took in
    /// before, is accepted at the next revision (`rule::from_a_later_lost_state`): the
    /// path's states from it on are marked as coming from it (`rule::TakenIn`; nodes are
    /// told `wire::FromLost`), so that a node holding a later lost state sends it
    /// instead of taking one made from an older. The first revision taken in stays: the
    /// nodes' revisions of the path below it and above the base are lost ones. Called
    /// just before the state is set (its revision is the next one).
    fn mark_taken_in(&mut self, path: &RelPath, base: Revision) -> anyhow::Result<()> {
        let at = head(self.tx)?.next();
        self.tx.prepare_cached("UPDATE paths SET lost_base = ?2, lost_first = coalesce(lost_first, ?3), lost_last = ?3 WHERE path = ?1")?.execute(params![
            path.as_str(),
            base.0 as i64,
            at.0 as i64
        ])?;
        Ok(())
    }

    fn has_live_children(&self, path: &RelPath) -> anyhow::Result<bool> {
        // Paths below `p` sort between "p/" and "p0" ('0' follows '/').
        let lo = format!("{}/", path);
        let hi = format!("{}0", path);
        Ok(self
            .tx
            .prepare_cached("SELECT 1 FROM paths WHERE path > ?1 AND path < ?2 AND version IS NOT NULL LIMIT 1")?
            .query_row(params![lo, hi], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Records a new current state of `path` at a new revision and broadcasts it; the
    /// sender holds its content.
    fn set(&mut self, path: &RelPath, version: Option<&Version>, origin: &NodeId, now_ms: i64) -> anyhow::Result<Entry> {
        let holders: &[NodeId] = if *origin != NodeId::manager() { std::slice::from_ref(origin) } else { &[] };
        self.set_held(path, version, origin, holders, now_ms)
    }

    /// Makes `version`, a put accepted, the path's state: its ancestors deleted elsewhere
    /// are brought back first, and, with `taken_in`, the path's states from it on are
    /// marked as coming from that later lost state ([`Tx::mark_taken_in`]).
    fn accept_put(
        &mut self,
        path: &RelPath,
        version: &Version,
        ancestors: &[(RelPath, Option<Version>)],
        taken_in: Option<Revision>,
        from: &NodeId,
        now_ms: i64,
    ) -> anyhow::Result<Entry> {
        self.restore_dirs(ancestors, now_ms)?;
        if let Some(base) = taken_in {
            self.mark_taken_in(path, base)?;
        }
        self.set(path, Some(version), from, now_ms)
    }

    /// Makes `merged`, a node's mode and owners over the bytes the path has now (written
    /// by another: `rule::Decision::OverChangedBytes`), the path's state. The manager
    /// made it (neither node's version: a later change of either, stale against it, is
    /// not one against its own), and the nodes that hold those bytes stay its holders
    /// (the chmodding node may not have them).
    fn set_over_current_bytes(&mut self, path: &RelPath, merged: &Version, now_ms: i64) -> anyhow::Result<Entry> {
        let holders: Vec<NodeId> = entry(self.tx, path)?.map(|e| e.holders.into_iter().map(|h| h.node).collect()).unwrap_or_default();
        self.set_held(path, Some(merged), &NodeId::manager(), &holders, now_ms)
    }

    /// [`Tx::set`] with the nodes that hold the content named (a restore: the nodes that
    /// keep the old version). The version it replaces becomes a kept version first
    /// (`end_current`), so the nodes asked to keep its content hear of it before the
    /// broadcast that makes it old.
    pub(crate) fn set_held(&mut self, path: &RelPath, version: Option<&Version>, origin: &NodeId, holders: &[NodeId], now_ms: i64) -> anyhow::Result<Entry> {
        self.end_current(path, origin, now_ms)?;
        let rev = self.next_rev()?;
        let v = version.map(json);
        let hash = match version {
            Some(Version { content: Content::File { hash, .. }, .. }) => Some(hash.to_hex()),
            _ => None,
        };
        self.tx
            .prepare_cached(
                "INSERT INTO paths(path, rev, version, origin) VALUES(?1, ?2, ?3, ?4)
             ON CONFLICT(path) DO UPDATE SET rev = excluded.rev, version = excluded.version, origin = excluded.origin",
            )?
            .execute(params![path.as_str(), rev.0 as i64, v, origin.as_str()])?;
        self.tx.prepare_cached("INSERT INTO history(rev, path, version, origin, at_ms, hash) VALUES(?1, ?2, ?3, ?4, ?5, ?6)")?.execute(params![
            rev.0 as i64,
            path.as_str(),
            v,
            origin.as_str(),
            now_ms,
            hash.as_ref().map(|h| h.as_str())
        ])?;
        self.tx.prepare_cached("DELETE FROM holders WHERE path = ?1")?.execute([path.as_str()])?;
        if matches!(version, Some(Version { content: Content::File { .. }, .. })) {
            for node in holders {
                self.tx.prepare_cached("INSERT OR IGNORE INTO holders(path, node, rev) VALUES(?1, ?2, ?3)")?.execute(params![
                    path.as_str(),
                    node.as_str(),
                    rev.0 as i64
                ])?;
            }
        }
        let entry = entry(self.tx, path)?.expect("just written");
        self.enqueue(topology::BROADCAST_KEY, ToNode::Applied { entry: entry.clone(), origin: origin.clone() })?;
        Ok(entry)
    }

    /// Marks a node as seen (and online), creating it on first contact.
    fn seen(&mut self, node: &NodeId, url: Option<&str>, now_ms: i64) -> anyhow::Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO nodes(id, url, online, last_seen_ms, seen_uptime_ms)
                 VALUES(?1, coalesce(?2, ''), 1, ?3, coalesce((SELECT value FROM meta WHERE key = ?4), 0))
             ON CONFLICT(id) DO UPDATE SET online = 1, last_seen_ms = excluded.last_seen_ms, seen_uptime_ms = excluded.seen_uptime_ms,
               url = coalesce(?2, nodes.url)",
            )?
            .execute(params![node.as_str(), url, now_ms, UPTIME_KEY])?;
        Ok(())
    }

    /// Forgets at most `limit` records of decided changes (`applied`) that no node can
    /// send again, oldest first; returns how many. A record is kept at least
    /// `Retention::remember_decisions_ms` (a node brought back from a backup of that age
    /// sends its old changes again and must get their first answers), and then until its
    /// sender said, in a heartbeat, that it had no change undecided while it had taken a
    /// revision later than the head after that decision (`nodes.settled_taken`): that
    /// heartbeat was built after the node took the decision's answer, so the change is
    /// out of its outbox for good. A heartbeat built before the change existed is handled
    /// before it (one channel, in order); one built after says nothing is undecided only
    /// once the answer was taken. Records of a node the database does not know stay. The
    /// newest record always stays (rowids then never go back, and the marks stay true).
    ///
    /// Which records are old enough comes from `applied_marks`: the last rowid at a time,
    /// noted at most every `remember_decisions_ms / 64` (10 minutes at most). The head
    /// only grows with the rowid, so the records decided before a node's settled revision
    /// are those up to the last one whose head is below it (`applied_by_head`). Each
    /// settled node's records up to both bounds are deleted by the index on `node`: no
    /// record is read that is not forgotten (a node that is not settled costs nothing).
    pub fn forget_settled_decisions(&mut self, now_ms: i64, limit: usize) -> anyhow::Result<usize> {
        let remember = self.retention.remember_decisions_ms.max(0);
        let mark_every = (remember / 64).min(10 * 60 * 1000);
        let newest_mark: Option<i64> = self.tx.prepare_cached("SELECT max(at_ms) FROM applied_marks")?.query_row([], |r| r.get(0))?;
        let newest: Option<i64> = self.tx.prepare_cached("SELECT max(rowid) FROM applied")?.query_row([], |r| r.get(0))?;
        let Some(newest) = newest else { return Ok(0) };
        if newest_mark.is_none_or(|at| now_ms.saturating_sub(at) >= mark_every) {
            self.tx
                .prepare_cached(
                    "INSERT INTO applied_marks(at_ms, last_rowid) VALUES(?1, ?2) ON CONFLICT(at_ms) DO UPDATE SET last_rowid = excluded.last_rowid",
                )?
                .execute([now_ms, newest])?;
        }
        let cutoff = now_ms.saturating_sub(remember);
        let old_enough: Option<i64> = self
            .tx
            .prepare_cached("SELECT last_rowid FROM applied_marks WHERE at_ms <= ?1 ORDER BY at_ms DESC LIMIT 1")?
            .query_row([cutoff], |r| r.get(0))
            .optional()?;
        let Some(old_enough) = old_enough else { return Ok(0) };
        let settled: Vec<(String, i64)> = self
            .tx
            .prepare_cached("SELECT id, settled_taken FROM nodes WHERE settled_taken > 0")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut forgotten = 0;
        // The count of decisions by outcome (`/metrics`) goes on counting the forgotten.
        let mut by_outcome: std::collections::BTreeMap<String, i64> = Default::default();
        for (node, settled_taken) in settled {
            if forgotten >= limit {
                break;
            }
            let before_head: Option<i64> = self
                .tx
                .prepare_cached("SELECT rowid FROM applied INDEXED BY applied_by_head WHERE head < ?1 ORDER BY head DESC, rowid DESC LIMIT 1")?
                .query_row([settled_taken], |r| r.get(0))
                .optional()?;
            let Some(before_head) = before_head else { continue };
            let bound = old_enough.min(before_head).min(newest - 1);
            let mut st = self.tx.prepare_cached(&format!(
                "DELETE FROM applied WHERE rowid IN (
                   SELECT rowid FROM applied INDEXED BY applied_by_node WHERE node = ?1 AND rowid <= ?2 AND max(head, rev) < ?4
                   ORDER BY rowid LIMIT ?3)
                 RETURNING {OUTCOME_KIND}"
            ))?;
            let kinds = st.query_map(params![node, bound, (limit - forgotten) as i64, settled_taken], |r| r.get::<_, Option<String>>(0))?;
            for kind in kinds {
                *by_outcome.entry(kind?.unwrap_or_else(|| "unknown".into())).or_default() += 1;
                forgotten += 1;
            }
        }
        for (outcome, n) in by_outcome {
            self.add_to_meta(&format!("{FORGOTTEN_PREFIX}{outcome}"), n)?;
        }
        // Marks below every record left say nothing any more.
        self.tx.prepare_cached("DELETE FROM applied_marks WHERE last_rowid < (SELECT min(rowid) FROM applied)")?.execute([])?;
        if forgotten > 0 {
            tracing::debug!(forgotten, "forgot the records of decided changes no node can send again");
        }
        Ok(forgotten)
    }

    /// Forgets at most `limit` tombstones (a deleted path's row, and its history row:
    /// the delete) that no node can need any more, oldest first; returns how many. A
    /// tombstone is what tells a node that missed the delete to apply it; a node's sync
    /// reply leaves out the tombstones at or below the sync's `since`, up to which the
    /// node has applied every delete. So a tombstone at or below the lowest `since` any
    /// node the manager knows has said (`nodes.deletes_applied`) is named to none of
    /// them again (`since` never goes back on a node; a new node asks for none): it goes
    /// once the delete is also older than the retention of versions and of decisions
    /// (the trash lists it until then). A put of the path later is decided as on a
    /// tombstone (nothing live there: accepted), a delete as well (unchanged).
    /// A node connected for long sends no `since` (it syncs when it starts): an online
    /// node below an old tombstone is asked to sync, at most every quarter of that age
    /// (and a second). A node that never syncs again keeps the tombstones above its last
    /// `since` (docs/operations.md, *How the manager's database grows*).
    pub fn forget_applied_deletes(&mut self, now_ms: i64, limit: usize) -> anyhow::Result<usize> {
        let age = self.retention.keep_for_ms.max(self.retention.remember_decisions_ms).max(0);
        let cutoff = now_ms.saturating_sub(age);
        let floor: Option<i64> = self.tx.prepare_cached("SELECT min(deletes_applied) FROM nodes")?.query_row([], |r| r.get(0))?;
        // The oldest tombstones first, by revision; the first one too young ends the
        // look (revisions and their times grow together).
        let mut due = Vec::new();
        let mut lagging_below = None;
        {
            let mut st = self.tx.prepare_cached(
                "SELECT p.path, p.rev, h.at_ms FROM paths p INDEXED BY paths_deleted JOIN history h ON h.rev = p.rev
                 WHERE p.version IS NULL ORDER BY p.rev LIMIT ?1",
            )?;
            let rows = st.query_map([i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1)], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            })?;
            let mut older = self.tx.prepare_cached("SELECT 1 FROM history WHERE path = ?1 AND rev < ?2 LIMIT 1")?;
            for row in rows {
                let (path, rev, at_ms) = row?;
                if at_ms > cutoff {
                    break;
                }
                if floor.is_none_or(|f| rev > f) {
                    lagging_below = Some(rev);
                    break;
                }
                // An older state of the path still in the history (its retention ends
                // at the delete, and `expire_versions` takes it soon): without the delete
                // after it, a restore to a later point would take the path for live.
                if due.len() < limit && !older.exists(params![path, rev])? {
                    due.push((path, rev));
                }
            }
        }
        for (path, rev) in &due {
            self.tx.prepare_cached("DELETE FROM paths WHERE path = ?1 AND rev = ?2 AND version IS NULL")?.execute(params![path, rev])?;
            self.tx.prepare_cached("DELETE FROM history WHERE rev = ?1 AND kept = 0")?.execute([rev])?;
            self.tx.prepare_cached("DELETE FROM holders WHERE path = ?1")?.execute([path])?;
        }
        if !due.is_empty() {
            self.add_to_meta("forgotten_deletes", due.len() as i64)?;
            tracing::debug!(forgotten = due.len(), "forgot the tombstones of deletes every node has applied");
        }
        if let Some(rev) = lagging_below {
            let ask_every = (age / 4).max(1_000);
            let lagging: Vec<String> = self
                .tx
                .prepare_cached("SELECT id FROM nodes WHERE deletes_applied < ?1 AND online = 1 AND (deletes_asked_ms = 0 OR deletes_asked_ms <= ?2)")?
                .query_map(params![rev, now_ms.saturating_sub(ask_every)], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for id in lagging {
                let node: NodeId = id.parse().context("corrupt node id in the manager database")?;
                tracing::info!(%node, "asking a node to sync: it has not said since when it applied deletes that are old enough to be forgotten");
                self.request_sync(&node)?;
                self.tx.prepare_cached("UPDATE nodes SET deletes_asked_ms = ?2 WHERE id = ?1")?.execute(params![id, now_ms])?;
            }
        }
        Ok(due.len())
    }

    /// Records the revision up to which `node` vouched, in its latest sync request or
    /// heartbeat that said it, that it applied every delete (`ToManager::Sync::applied`,
    /// `Heartbeat::applied`; at most the head), for
    /// [`Tx::forget_applied_deletes`]. Its latest word, not its highest: a node whose
    /// data came back from an older copy, or that lost power before its log was on disk
    /// after all (a node flushes it before it vouches), or started anew under the same
    /// id, vouches for less than before, and the deletes in between are still needed.
    fn note_deletes_applied(&mut self, node: &NodeId, applied: Revision) -> anyhow::Result<()> {
        let applied = applied.min(head(self.tx)?).0.min(i64::MAX as u64) as i64;
        let before: Option<i64> =
            self.tx.prepare_cached("SELECT deletes_applied FROM nodes WHERE id = ?1")?.query_row([node.as_str()], |r| r.get(0)).optional()?;
        if before == Some(applied) {
            // (What a node's heartbeats say every second, most of the time.)
            return Ok(());
        }
        if before.is_some_and(|b| applied < b) && applied > 0 {
            tracing::warn!(%node, before = before.unwrap_or(0), now = applied, "a node vouches for fewer applied deletes than before (its data brought back from an older copy, or started anew under the same id?)");
        }
        self.tx.prepare_cached("UPDATE nodes SET deletes_applied = ?2 WHERE id = ?1")?.execute(params![node.as_str(), applied])?;
        Ok(())
    }

    /// Whether the operator forgot `node` ([`Tx::forget_node`]).
    pub fn is_forgotten(&self, node: &NodeId) -> anyhow::Result<bool> {
        Ok(self.forgotten_at(node)?.is_some())
    }

    /// When the operator forgot `node` (ms since the epoch), if they did.
    fn forgotten_at(&self, node: &NodeId) -> anyhow::Result<Option<i64>> {
        Ok(self.tx.prepare_cached("SELECT at_ms FROM forgotten_nodes WHERE id = ?1")?.query_row([node.as_str()], |r| r.get(0)).optional()?)
    }

    /// The operator's word that `node` is gone for good (`manager node forget`): the
    /// manager no longer waits for it to apply deletes (`Tx::forget_applied_deletes`)
    /// nor keeps the records of its decided changes, takes it as a holder of nothing and
    /// a keeper of no version, and refuses whatever it sends from now on (a node with
    /// its old data back would bring back files deleted since). A node that was never
    /// seen is an error (a mistyped id would be refused for good).
    pub fn forget_node(&mut self, node: &NodeId, now_ms: i64) -> anyhow::Result<ForgottenNode> {
        let known = self.tx.prepare_cached("SELECT 1 FROM nodes WHERE id = ?1")?.exists([node.as_str()])?;
        anyhow::ensure!(known, "no node {node} is known to this manager (is the id right?); nothing forgotten");
        // What it kept of old versions: as if it reported it lacks them (another online
        // node is asked to fetch each from a keeper that has it).
        let kept: Vec<wire::ContentHash> = self
            .tx
            .prepare_cached("SELECT hash FROM kept WHERE node = ?1")?
            .query_map([node.as_str()], |r| r.get::<_, String>(0))?
            .map(|h| Ok(h?.parse::<wire::ContentHash>().map_err(|e| anyhow::anyhow!("corrupt hash in the manager database: {e}"))?))
            .collect::<anyhow::Result<_>>()?;
        self.kept_report(node, &[], &kept, now_ms)?;
        let delete = |sql: &str| -> anyhow::Result<usize> { Ok(self.tx.prepare_cached(sql)?.execute([node.as_str()])?) };
        delete("DELETE FROM nodes WHERE id = ?1")?;
        let forgotten = ForgottenNode {
            records: delete("DELETE FROM applied WHERE node = ?1")?,
            holdings: delete("DELETE FROM holders WHERE node = ?1")?,
            kept: kept.len(),
        };
        for sql in ["DELETE FROM sync_requests WHERE node = ?1", "DELETE FROM sync_replies WHERE node = ?1", "DELETE FROM sync_asks WHERE node = ?1"] {
            delete(sql)?;
        }
        self.tx.prepare_cached("INSERT INTO forgotten_nodes(id, at_ms) VALUES(?1, ?2) ON CONFLICT(id) DO NOTHING")?.execute(params![node.as_str(), now_ms])?;
        tracing::info!(%node, records = forgotten.records, holdings = forgotten.holdings, kept = forgotten.kept, "node forgotten");
        Ok(forgotten)
    }

    /// Adds `served` (time the manager served with the broker, which the service counts
    /// between its ticks on a monotonic clock, leaving out the first tick of a session
    /// and gaps of a stall) to its uptime, unless no node was heard of within it (and
    /// [`OFFLINE_AFTER_MS`]): nodes cut off from a broker the manager still reaches, or a
    /// memory alarm blocking them. A node's silence is counted in it
    /// ([`Tx::forget_silent_nodes`]), so a manager or a broker that was down, nodes that
    /// could not reach it, a database brought back from an older copy or a clock that
    /// jumped make no node look silent.
    pub fn count_uptime(&mut self, served: std::time::Duration, now_ms: i64) -> anyhow::Result<()> {
        let served = served.as_millis().min(i64::MAX as u128) as i64;
        let since = now_ms.saturating_sub(served).saturating_sub(OFFLINE_AFTER_MS);
        if served > 0 && self.tx.prepare_cached("SELECT 1 FROM nodes WHERE last_seen_ms >= ?1 LIMIT 1")?.exists([since])? {
            self.add_to_meta(UPTIME_KEY, served)?;
        }
        Ok(())
    }

    /// Forgets (as [`Tx::forget_node`]) the nodes not heard of for longer than
    /// `--forget-nodes-after` of the manager's uptime ([`Tx::count_uptime`]), if set, a
    /// few at a time; returns them. One that cannot be forgotten is skipped (and said).
    pub fn forget_silent_nodes(&mut self, now_ms: i64) -> anyhow::Result<Vec<NodeId>> {
        let after = self.retention.forget_nodes_ms;
        if after <= 0 {
            return Ok(Vec::new());
        }
        let uptime: i64 = self.tx.prepare_cached("SELECT coalesce((SELECT value FROM meta WHERE key = ?1), 0)")?.query_row([UPTIME_KEY], |r| r.get(0))?;
        let silent: Vec<String> = self
            .tx
            .prepare_cached("SELECT id FROM nodes WHERE seen_uptime_ms < ?1 ORDER BY seen_uptime_ms LIMIT 16")?
            .query_map([uptime.saturating_sub(after)], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut forgotten = Vec::new();
        for id in silent {
            let gone = match id.parse::<NodeId>() {
                Ok(node) => self.isolated(|tx| tx.forget_node(&node, now_ms))?.map(|gone| (gone, node)),
                Err(e) => Err(e.to_string()),
            };
            match gone {
                Ok((gone, node)) => {
                    tracing::warn!(%node, after_ms = after, records = gone.records, holdings = gone.holdings, kept = gone.kept, "node silent for longer than --forget-nodes-after: forgotten, and refused from now on");
                    forgotten.push(node);
                }
                Err(reason) => {
                    // Its silence starts again: it does not come first at every pass
                    // (ahead of those that can be forgotten).
                    self.tx.prepare_cached("UPDATE nodes SET seen_uptime_ms = ?2 WHERE id = ?1")?.execute(params![id, uptime])?;
                    tracing::warn!(node = %id, "a node silent for longer than --forget-nodes-after could not be forgotten (tried again after as long): {reason}");
                }
            }
        }
        Ok(forgotten)
    }

    /// Marks nodes silent for too long as offline; returns how many changed.
    pub fn mark_silent_offline(&mut self, now_ms: i64) -> anyhow::Result<usize> {
        Ok(self.tx.prepare_cached("UPDATE nodes SET online = 0 WHERE online = 1 AND last_seen_ms < ?1")?.execute([now_ms - OFFLINE_AFTER_MS])?)
    }

    /// Asks one node to run a sync.
    pub fn request_sync(&mut self, node: &NodeId) -> anyhow::Result<()> {
        self.enqueue(&topology::node_key(node), ToNode::SyncRequested {})
    }

    /// Node `node`'s queue dropped the message of outbox row `seq` (`None`: one sent
    /// without it): asks the node to sync, unless the last request sent for a drop is
    /// later than that message. A queue is FIFO and drops its oldest: such a request is
    /// still in the queue, behind the drop, and its sync will cover it. A drop of that
    /// request, or of anything after it, means it is gone (consumed, or dropped), and the
    /// node is asked again. Returns whether it asked. (Asking on every drop, each request
    /// published to a full queue pushed out the oldest message, whose notice asked again:
    /// for as long as the node was away.)
    pub(crate) fn ask_to_sync_after_drop(&mut self, node: &NodeId, seq: Option<i64>) -> anyhow::Result<bool> {
        let asked: Option<i64> = self.tx.prepare_cached("SELECT seq FROM sync_asks WHERE node = ?1")?.query_row([node.as_str()], |r| r.get(0)).optional()?;
        if let (Some(asked), Some(seq)) = (asked, seq) {
            if seq < asked {
                return Ok(false);
            }
        }
        self.request_sync(node)?;
        let ask = self.tx.last_insert_rowid();
        self.tx
            .prepare_cached("INSERT INTO sync_asks(node, seq) VALUES(?1, ?2) ON CONFLICT(node) DO UPDATE SET seq = excluded.seq")?
            .execute(params![node.as_str(), ask])?;
        Ok(true)
    }

    /// Handles one message from a node.
    pub fn handle(&mut self, env: Envelope<ToManager>, now_ms: i64) -> anyhow::Result<()> {
        let from = env.from.clone();
        match env.body {
            ToManager::Heartbeat { url, pending_changes, pending_pulls, software, residency, taken, applied } => {
                self.seen(&from, Some(&url), now_ms)?;
                self.catch_up_with(&from, taken, "its heartbeat", now_ms)?;
                if applied.0 > 0 {
                    self.note_deletes_applied(&from, applied)?;
                }
                // With nothing undecided, the node can send none of its changes again that
                // were decided before it took revision `taken` (settled_taken).
                // (Never above the head: a catch-up moves it a bounded way at once.)
                let settled = if pending_changes == 0 { taken.min(head(self.tx)?).0 as i64 } else { 0 };
                self.tx
                    .prepare_cached(
                        "UPDATE nodes SET pending_changes = ?2, pending_pulls = ?3, software = ?4, residency = ?5,
                           settled_taken = max(settled_taken, ?6) WHERE id = ?1",
                    )?
                    .execute(params![
                        from.as_str(),
                        saturating_i64(pending_changes),
                        saturating_i64(pending_pulls),
                        software,
                        residency.as_ref().map(json),
                        settled
                    ])?;
            }
            ToManager::Have { path, rev, hash } => {
                self.seen(&from, None, now_ms)?;
                self.holds(&from, &Held { path, rev, hash })?;
            }
            ToManager::Holding { items } => {
                self.seen(&from, None, now_ms)?;
                for held in &items {
                    self.holds(&from, held)?;
                }
            }
            ToManager::Sync { request, url, since, paged, snapshot, taken, applied } => {
                self.seen(&from, Some(&url), now_ms)?;
                self.catch_up_with(&from, taken, "its sync request", now_ms)?;
                self.note_deletes_applied(&from, applied)?;
                self.queue_sync(&from, &request, since, paged, snapshot, now_ms)?;
            }
            ToManager::Kept { keeping, lacking } => {
                self.seen(&from, None, now_ms)?;
                self.kept_report(&from, &keeping, &lacking, now_ms)?;
            }
            ToManager::Ask { query } => {
                self.seen(&from, None, now_ms)?;
                // A restore is done once per message id: a copy of the message (a
                // redelivery after a crash) gets the first answer again.
                let done: Option<String> =
                    self.tx.prepare_cached("SELECT outcome FROM applied WHERE msg = ?1")?.query_row([env.id.as_str()], |r| r.get(0)).optional()?;
                let answer = match done.and_then(|a| serde_json::from_str::<wire::Answer>(&a).ok()) {
                    Some(answer) => answer,
                    None => {
                        let answer = self.answer(&query, &from, now_ms)?;
                        if matches!(query, wire::Query::Restore { .. }) {
                            self.tx
                                .prepare_cached("INSERT INTO applied(msg, node, rev, outcome, base, head) VALUES(?1, ?2, 0, ?3, 0, ?4)")?
                                .execute(params![env.id.as_str(), from.as_str(), json(&answer), head(self.tx)?.0 as i64])?;
                        }
                        answer
                    }
                };
                self.enqueue(&topology::node_key(&from), ToNode::Answer { request: env.id, answer })?;
            }
            ToManager::Change(change) => {
                self.seen(&from, None, now_ms)?;
                self.decide_change(env.id, &from, change, now_ms)?;
            }
            // Each change as if it had come alone, in order; the message is handled (and,
            // if one of them fails, rolled back and tried again) as a whole.
            ToManager::Changes { items } => {
                self.seen(&from, None, now_ms)?;
                for item in items {
                    self.decide_change(item.id, &from, item.change, now_ms)?;
                }
            }
        }
        Ok(())
    }

    fn decide_change(&mut self, id: MessageId, from: &NodeId, change: Change, now_ms: i64) -> anyhow::Result<()> {
        if test_abort_on_path().is_some_and(|p| p == change.path.as_str()) {
            tracing::error!(path = %change.path, "SYNC_TEST_ABORT_ON_PATH: aborting the process");
            std::process::abort();
        }
        self.catch_up_with(from, change.base, &format!("the base of its change of {}", change.path), now_ms)?;
        self.change(id, from, change, now_ms)
    }

    /// `node` names revision `seen` as one it took (its highest, or the base of a
    /// change). Nodes have only revisions this manager gave, so one that this database
    /// never gave means that it lost decisions: it was brought back from an older copy
    /// (a backup restored after a disk failure), or started anew, and the nodes still
    /// have what it lost. Such a revision is above the head, or in a range a start of
    /// this database skipped ([`Store::start_serving`]) while the lost one gave it.
    /// Every node is then asked to sync, which sends the manager the states it lost
    /// (docs/protocol.md, *A manager behind its nodes*), and the note says so. Above the
    /// head, revisions also go on from well past `seen` (`CATCH_UP_MARGIN`: past what
    /// other nodes took of the lost ones too, so that every later decision is newer than
    /// any of them). A jump is at most `CATCH_UP_MAX` beyond the head (a lying node
    /// cannot use up the revisions at once); a node still ahead after it makes the next.
    fn catch_up_with(&mut self, node: &NodeId, seen: Revision, what: &str, now_ms: i64) -> anyhow::Result<()> {
        let head = head(self.tx)?;
        let skipped = self.skipped()?;
        let to = if seen > head {
            let to = Revision(seen.0.min(head.0.saturating_add(CATCH_UP_MAX)).saturating_add(CATCH_UP_MARGIN));
            anyhow::ensure!(
                to.0 <= REV_LIMIT,
                "{node} names revision {} in {what}, and revisions cannot go on past it (at most {REV_LIMIT}); not caught up",
                seen.0
            );
            self.set_head(to)?;
            to
        } else if skipped.iter().any(|&(from, to)| from < seen.0 && seen.0 <= to) {
            head
        } else {
            return Ok(());
        };
        tracing::error!(
            %node,
            seen = seen.0,
            head = head.0,
            to = to.0,
            "{node} took revision {} ({what}), which this database never gave (its last one before this start was {}): it lost decisions (restored from an older copy?). Revisions go on after {}; every node is asked to sync and sends the states the manager lost",
            seen.0,
            skipped.last().map_or(head.0, |&(from, _)| from),
            to.0
        );
        // Every node syncs now: no range skipped before tells anything more. Not again
        // within a minute (a node that keeps naming revisions above the head, a lie,
        // moves the head each time, but does not make every node sync each time).
        self.tx.prepare_cached("DELETE FROM meta WHERE key = 'skipped'")?.execute([])?;
        if self.caught_up()?.is_some_and(|last| now_ms.saturating_sub(last.at_ms) < CATCH_UP_QUIET_MS) {
            return Ok(());
        }
        let note = CaughtUp { at_ms: now_ms, node: node.to_string(), seen: seen.0, head: head.0, to: to.0 };
        self.set_meta("caught_up", &json(&note))?;
        self.enqueue(topology::BROADCAST_KEY, ToNode::SyncRequested {})
    }

    /// The last time the database was found behind its nodes.
    fn caught_up(&self) -> anyhow::Result<Option<CaughtUp>> {
        caught_up(self.tx)
    }

    /// Adds `n` to the counter `key` of `meta` (0 if it had none).
    fn add_to_meta(&mut self, key: &str, n: i64) -> anyhow::Result<()> {
        self.tx
            .prepare_cached("INSERT INTO meta(key, value) VALUES(?1, ?2) ON CONFLICT(key) DO UPDATE SET value = value + excluded.value")?
            .execute(params![key, n])?;
        Ok(())
    }

    fn set_meta(&mut self, key: &str, value: &dyn rusqlite::ToSql) -> anyhow::Result<()> {
        self.tx
            .prepare_cached("INSERT INTO meta(key, value) VALUES(?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")?
            .execute(params![key, value])?;
        Ok(())
    }

    /// The ranges of revisions (from, to] the last starts of this database skipped.
    fn skipped(&self) -> anyhow::Result<Vec<(u64, u64)>> {
        skipped(self.tx)
    }

    /// `node` no longer holds the path's content (it dropped it from its cache).
    pub(crate) fn drop_holder(&mut self, path: &RelPath, node: &NodeId) -> anyhow::Result<()> {
        self.tx.prepare_cached("DELETE FROM holders WHERE path = ?1 AND node = ?2")?.execute(params![path.as_str(), node.as_str()])?;
        Ok(())
    }

    /// Records `node` as a holder of the path's content, if that is still the path's
    /// current version (a holding of an older one is stale, and dropped).
    fn holds(&mut self, node: &NodeId, held: &Held) -> anyhow::Result<()> {
        if let Some(Entry { rev: cur, version: Some(Version { content: Content::File { hash, .. }, .. }), .. }) = entry(self.tx, &held.path)? {
            if cur == held.rev && hash == held.hash {
                self.tx.prepare_cached("INSERT OR IGNORE INTO holders(path, node, rev) VALUES(?1, ?2, ?3)")?.execute(params![
                    held.path.as_str(),
                    node.as_str(),
                    held.rev.0 as i64
                ])?;
            }
        }
        Ok(())
    }

    /// Handles a batch of messages, each under a savepoint ([`Tx::handle_isolated`]).
    /// First the manager catches up with the highest revision any of them names
    /// ([`Tx::catch_up_with`]): after its database was brought back from an older copy,
    /// the first batch holds the heartbeats that queued up while it was down, and no
    /// change of that batch gets a revision a node took from the lost ones before it.
    pub fn handle_batch(&mut self, envs: Vec<Envelope<ToManager>>, now_ms: i64) -> anyhow::Result<Vec<Result<(), String>>> {
        // The highest revision named by a node not forgotten (a forgotten node's message
        // is refused and moves nothing): looked up for the highest first, so a batch
        // costs one lookup, not one per message.
        let mut named: Vec<(Revision, &NodeId)> = envs.iter().filter_map(|env| Some((named_revision(&env.body)?, &env.from))).collect();
        // (Of equal revisions the last message's, as `max_by_key` took.)
        named.reverse();
        named.sort_by_key(|(rev, _)| std::cmp::Reverse(*rev));
        let mut highest = None;
        for (rev, from) in named {
            if !self.is_forgotten(from)? {
                highest = Some((rev, from));
                break;
            }
        }
        if let Some((rev, from)) = highest {
            // Under a savepoint: a failure leaves nothing half done, and that message
            // fails alone when it is handled.
            run_cached(self.tx, "SAVEPOINT catch_up").context("opening a savepoint in the manager database")?;
            let from = from.clone();
            match self.catch_up_with(&from, rev, "a message of its, ahead of the others of the batch", now_ms) {
                Ok(()) => run_cached(self.tx, "RELEASE catch_up")?,
                Err(e) => {
                    tracing::warn!("not caught up before the batch: {e:#}");
                    run_cached(self.tx, "ROLLBACK TO catch_up").and_then(|()| run_cached(self.tx, "RELEASE catch_up"))?;
                }
            }
        }
        envs.into_iter().map(|env| self.handle_isolated(env, now_ms)).collect()
    }

    /// Handles one message under a savepoint, so that one bad message does not undo the
    /// others of its batch. When handling fails, with an error or a panic, everything it
    /// wrote is rolled back and the reason is returned. Only a failure of the database
    /// itself (the savepoint cannot be opened, released or rolled back) is an error.
    pub fn handle_isolated(&mut self, env: Envelope<ToManager>, now_ms: i64) -> anyhow::Result<Result<(), String>> {
        if test_db_fault(&env) {
            anyhow::bail!("SYNC_TEST_DB_FAULT_ON_PATH: the database failed (a test fault)");
        }
        let given_up: Option<bool> = self
            .tx
            .prepare_cached("SELECT given_up FROM suspects WHERE msg = ?1")?
            .query_row([env.id.as_str()], |r| r.get(0))
            .optional()
            .context("reading suspects")?;
        if given_up == Some(true) {
            return Ok(Err(format!("{GIVEN_UP}: it stopped the manager each time it was handled before")));
        }
        if given_up.is_some() {
            self.tx.prepare_cached("DELETE FROM suspects WHERE msg = ?1")?.execute([env.id.as_str()])?;
        }
        if let Some(at_ms) = self.forgotten_at(&env.from)? {
            match &env.body {
                // Dropped, not dead-lettered: one a second would fill the dead letters.
                ToManager::Heartbeat { .. } => return Ok(Ok(())),
                // Answered with the reason, so the node says why nothing it sends is
                // taken (one per connection, or when its user asks).
                ToManager::Sync { request, .. } => {
                    self.enqueue(&topology::node_key(&env.from), ToNode::Forgotten { request: request.clone(), at_ms })?;
                }
                _ => {}
            }
            return Ok(Err(format!(
                "{FORGOTTEN_NODE}: {} was forgotten (`manager node forget`, or silent past `--forget-nodes-after`); start it anew under another id",
                env.from
            )));
        }
        self.isolated(|tx| tx.handle(env, now_ms))
    }

    /// Runs `f` under a savepoint: when it fails, with an error or a panic, everything it
    /// wrote is rolled back and the reason is returned. Only a failure of the database
    /// itself (the savepoint cannot be opened, released or rolled back) is an error.
    fn isolated<T>(&mut self, f: impl FnOnce(&mut Self) -> anyhow::Result<T>) -> anyhow::Result<Result<T, String>> {
        run_cached(self.tx, "SAVEPOINT isolated").context("opening a savepoint in the manager database")?;
        // Nothing is left half-done by a panic: the rollback below undoes the savepoint's
        // writes, and every statement it had open was reset while unwinding.
        let failure = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self))) {
            Ok(Ok(done)) => {
                run_cached(self.tx, "RELEASE isolated").context("releasing a savepoint in the manager database")?;
                return Ok(Ok(done));
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(panic) => {
                let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
                format!("panicked: {}", what.unwrap_or_else(|| "(no message)".into()))
            }
        };
        run_cached(self.tx, "ROLLBACK TO isolated")
            .and_then(|()| run_cached(self.tx, "RELEASE isolated"))
            .context("rolling back a failed operation in the manager database")?;
        Ok(Err(failure))
    }

    /// Records a node's sync request; [`Store::sync_step`] answers it. A request still
    /// waiting is replaced: the newer reply answers both (a node has one sync in flight,
    /// so an older request is one it no longer waits for).
    fn queue_sync(&mut self, node: &NodeId, request: &MessageId, since: Revision, paged: bool, snapshot: bool, now_ms: i64) -> anyhow::Result<()> {
        let waiting: Option<String> =
            self.tx.prepare_cached("SELECT request FROM sync_requests WHERE node = ?1")?.query_row([node.as_str()], |r| r.get(0)).optional()?;
        if let Some(older) = waiting {
            tracing::debug!(%node, %older, newer = %request, "a sync request replaces an older one still waiting; one reply answers both");
        }
        self.tx
            .prepare_cached(
                "INSERT INTO sync_requests(node, request, since, paged, snapshot, merged, at_ms) VALUES(?1, ?2, ?3, ?4, ?5, 1, ?6)
             ON CONFLICT(node) DO UPDATE SET request = excluded.request, since = excluded.since, paged = excluded.paged,
               snapshot = excluded.snapshot, merged = sync_requests.merged + 1",
            )?
            .execute(
                // A node that needs no deleted path says so with the largest revision.
                params![node.as_str(), request.as_str(), since.0.min(i64::MAX as u64) as i64, paged, snapshot, now_ms],
            )?;
        Ok(())
    }

    /// Starts the reply of the longest-waiting request whose node has no reply under way
    /// and had none started within [`SYNC_MIN_INTERVAL_MS`]; returns whether it did.
    fn start_due_reply(&mut self, now_ms: i64) -> anyhow::Result<bool> {
        let due: Option<(String, String, i64, (bool, bool), i64)> = self
            .tx
            .query_row(
                // A start time in the future means the clock went back: do not wait for it.
                "SELECT q.node, q.request, q.since, q.paged, q.snapshot, q.merged FROM sync_requests q LEFT JOIN sync_replies r ON r.node = q.node
                 WHERE r.node IS NULL OR (r.request IS NULL AND (r.started_ms <= ?1 OR r.started_ms > ?2))
                 ORDER BY q.at_ms, q.node LIMIT 1",
                params![now_ms - SYNC_MIN_INTERVAL_MS, now_ms],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, (r.get(3)?, r.get(4)?), r.get(5)?)),
            )
            .optional()?;
        let Some((node, request, since, (paged, snapshot), merged)) = due else {
            return Ok(false);
        };
        self.tx.prepare_cached("DELETE FROM sync_requests WHERE node = ?1")?.execute([&node])?;
        self.tx
            .prepare_cached(
                "INSERT INTO sync_replies(node, started_ms, request, since, paged, snapshot, merged, cursor, walk_done, caught_up, page, entries, bytes, largest)
             VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, '', 0, ?8, 0, 0, 0, 0)
             ON CONFLICT(node) DO UPDATE SET started_ms = excluded.started_ms, request = excluded.request, since = excluded.since,
               paged = excluded.paged, snapshot = excluded.snapshot, merged = excluded.merged, cursor = '', walk_done = 0,
               caught_up = excluded.caught_up, page = 0, entries = 0, bytes = 0, largest = 0",
            )?
            .execute(params![node, now_ms, request, since, paged, snapshot, merged, head(self.tx)?.0 as i64])?;
        // A node syncs whenever it (re)connects: with each reply it is asked again to keep
        // what it keeps, and says what it lacks (a drop it could not report before it
        // stopped, a data directory emptied meanwhile). Here, not per request: replies
        // start at most once a second per node, however often it asks.
        self.ask_to_keep_again(&node.parse().context("corrupt node id in sync_requests")?)?;
        Ok(true)
    }

    /// The reply under way that has sent the fewest pages (a small reply is not held up
    /// behind a large one).
    fn active_reply(&self) -> anyhow::Result<Option<Reply>> {
        let row = self
            .tx
            .prepare_cached(
                "SELECT node, request, since, paged, merged, cursor, walk_done, caught_up, page, entries, bytes, largest, started_ms, snapshot
                 FROM sync_replies WHERE request IS NOT NULL ORDER BY page, node LIMIT 1",
            )?
            .query_row([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    (r.get::<_, i64>(2)?, r.get::<_, bool>(3)?, r.get::<_, i64>(4)?, r.get::<_, String>(5)?, r.get::<_, bool>(6)?),
                    (r.get::<_, i64>(7)?, r.get::<_, i64>(8)?, r.get::<_, i64>(9)?, r.get::<_, i64>(10)?, r.get::<_, i64>(11)?, r.get::<_, i64>(12)?),
                    r.get::<_, bool>(13)?,
                ))
            })
            .optional()?;
        let Some((node, request, (since, paged, merged, cursor, walk_done), (caught_up, page, entries, bytes, largest, started_ms), snapshot)) = row else {
            return Ok(None);
        };
        Ok(Some(Reply {
            node: node.parse().context("corrupt node id in sync_replies")?,
            request: request.parse().context("corrupt request id in sync_replies")?,
            since: Revision(since as u64),
            paged,
            snapshot,
            merged,
            cursor,
            walk_done,
            caught_up: Revision(caught_up as u64),
            page: page as u32,
            entries,
            bytes,
            largest,
            started_ms,
        }))
    }

    /// Fills and queues the next page of `r`: first what changed since the last page
    /// among the paths already walked, then the walk goes on. The last page is the one
    /// after which nothing is left to walk or to catch up, in this same transaction.
    fn send_page(&mut self, mut r: Reply, now_ms: i64) -> anyhow::Result<()> {
        // A snapshot stays at the revision it started from: nothing to catch up, and its
        // pages say that revision, so the node asks for the deletes after it in its next
        // sync (those it heard of meanwhile came on its queue, but a queue may drop its
        // oldest messages).
        let head = if r.snapshot { r.caught_up } else { head(self.tx)? };
        let id = new_message_id();
        let empty = |page: u32, more: bool| ToNode::SyncReply { request: r.request.clone(), head, entries: Vec::new(), page, more };
        // The envelope without entries, in its longer form (`more` written out).
        let overhead = Envelope::new(id.clone(), NodeId::manager(), empty(r.page, true)).encode().len();
        let mut page = Page { entries: Vec::new(), paths: Default::default(), bytes: overhead, budget: self.sync_page_bytes, full: false };

        let walked = |r: &Reply, path: &str| r.walk_done || path <= r.cursor.as_str();
        if r.caught_up < head {
            let mut st = self.tx.prepare_cached("SELECT rev, path FROM history WHERE rev > ?1 ORDER BY rev")?;
            let rows = st.query_map([r.caught_up.0 as i64], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)))?;
            let mut done = r.caught_up;
            for row in rows {
                let (rev, path) = row?;
                if walked(&r, &path) {
                    let path = RelPath::new(path).context("corrupt path in the manager database")?;
                    if let Some(e) = entry(self.tx, &path)? {
                        if (e.version.is_some() || e.rev > r.since) && !page.add(e) {
                            break;
                        }
                    }
                }
                done = Revision(rev as u64);
            }
            r.caught_up = if page.full { done } else { head };
        }
        // A snapshot's walk leaves out paths changed after it started (they came on the
        // node's queue); any other walk takes them.
        let walk_upto = if r.snapshot { r.caught_up.0 as i64 } else { i64::MAX };
        while !page.full && !r.walk_done {
            let mut st = self.tx.prepare_cached(&format!(
                "SELECT path, rev, version, lost_base, lost_first FROM paths WHERE path > ?1 AND (version IS NOT NULL OR rev > ?2) AND rev <= ?3 ORDER BY path LIMIT {SYNC_READ_ROWS}"
            ))?;
            type Row = (String, i64, Option<String>, Option<i64>, Option<i64>);
            let rows: Vec<Row> = st
                .query_map(params![r.cursor, r.since.0 as i64, walk_upto], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)))?
                .collect::<Result<_, _>>()?;
            let read = rows.len() as i64;
            for (path, rev, version, lost_base, lost_first) in rows {
                let version = parse_version(version)?;
                let holders = if matches!(version, Some(Version { content: Content::File { .. }, .. })) { holders(self.tx, &path, rev)? } else { Vec::new() };
                let e = Entry {
                    path: RelPath::new(path.clone()).context("corrupt path in the manager database")?,
                    rev: Revision(rev as u64),
                    version,
                    holders,
                    from_lost: from_lost(lost_base, lost_first),
                };
                if !page.add(e) {
                    break;
                }
                r.cursor = path;
            }
            r.walk_done = !page.full && read < SYNC_READ_ROWS;
        }
        let last = r.walk_done && r.caught_up == head;

        let n = page.entries.len() as i64;
        let body = ToNode::SyncReply { request: r.request.clone(), head, entries: page.entries, page: r.page, more: !last };
        if !r.paged && !last {
            // An older node takes one reply and would stop at the first page.
            tracing::warn!(node = %r.node, request = %r.request, "a node of an older version asked for a sync whose reply does not fit in one message of {} bytes; it is not answered: upgrade the node", self.sync_page_bytes);
            self.tx.prepare_cached("UPDATE sync_replies SET request = NULL WHERE node = ?1")?.execute([r.node.as_str()])?;
            return Ok(());
        }
        let size = self.enqueue_envelope(&topology::node_key(&r.node), Envelope::new(id, NodeId::manager(), body))?;
        debug_assert!(size <= self.sync_page_bytes, "a sync page of {size} bytes");
        tracing::debug!(node = %r.node, request = %r.request, page = r.page, entries = n, bytes = size, last, "sync reply page");
        r.page += 1;
        r.entries += n;
        r.bytes += size as i64;
        r.largest = r.largest.max(size as i64);
        if last {
            tracing::info!(
                node = %r.node,
                request = %r.request,
                pages = r.page,
                entries = r.entries,
                bytes = r.bytes,
                largest_page = r.largest,
                requests = r.merged,
                since = r.since.0,
                head = head.0,
                ms = now_ms - r.started_ms,
                "sync answered"
            );
        }
        self.tx
            .prepare_cached(
                "UPDATE sync_replies SET request = ?2, cursor = ?3, walk_done = ?4, caught_up = ?5, page = ?6, entries = ?7, bytes = ?8, largest = ?9
             WHERE node = ?1",
            )?
            .execute(params![
                r.node.as_str(),
                (!last).then(|| r.request.as_str()),
                r.cursor,
                r.walk_done,
                r.caught_up.0 as i64,
                r.page,
                r.entries,
                r.bytes,
                r.largest
            ])?;
        Ok(())
    }

    fn change(&mut self, msg: MessageId, from: &NodeId, change: Change, now_ms: i64) -> anyhow::Result<()> {
        let reply_key = topology::node_key(from);
        // At-least-once delivery: a message id is decided once. A repeat gets the path's
        // current state again, so the sender can stop waiting for it.
        let done: Option<(String, i64)> =
            self.tx.prepare_cached("SELECT outcome, rev FROM applied WHERE msg = ?1")?.query_row([msg.as_str()], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
        if let Some((outcome, first_rev)) = done {
            let outcome: Outcome = serde_json::from_str(&outcome).context("corrupt outcome")?;
            let current = self.entry_or_absent(&change.path)?;
            // The path changed since: `current` is not the state this change left (it may
            // be another node's that looks the same), which the sender must not take for
            // its own (simulator seed 206769).
            let first_rev = Some(Revision(first_rev.max(0) as u64)).filter(|r| *r != current.rev);
            // The first answer followed the broadcast of the conflict file with the
            // sender's version; a node asks again when its queue lost that answer (its
            // oldest messages dropped while it was away), most likely with that broadcast.
            // The sender may be the only one holding the content, and once the decision
            // is applied nothing of its own refers to it any more: the conflict file's
            // state goes first again, so that the node takes it from its own store.
            if let Outcome::Conflict { copy } = &outcome {
                let entry = self.entry_or_absent(copy)?;
                self.enqueue(&reply_key, ToNode::Applied { entry, origin: from.clone() })?;
            }
            return self.enqueue(&reply_key, ToNode::Decided { change: msg, outcome, current, first_rev });
        }
        let prior = match &change.follows {
            Some(prev) => self.prior(prev, from)?,
            None => None,
        };
        let base = match rule::basis(change.base, prior.as_ref(), &change.op) {
            rule::Basis::Base(base) => base,
            rule::Basis::UpdateConflictFile(copy) => {
                let ChangeOp::Put { version } = &change.op else { unreachable!("only a put updates a conflict file") };
                self.set(&copy, Some(version), from, now_ms)?;
                tracing::info!(path = %change.path, %copy, node = %from, "a later edit of a conflicting change updates its conflict file");
                return self.decided(msg, from, &change.path, Outcome::Conflict { copy }, change.base);
            }
        };
        let current = self.current(&change.path)?;
        // The cap counts the conflict files that still exist: once a user has dealt with
        // them (deleted or renamed them), new conflicts are kept again.
        let copies: i64 = self
            .tx
            .prepare_cached("SELECT count(*) FROM conflicts c JOIN paths p ON p.path = c.copy WHERE c.path = ?1 AND p.version IS NOT NULL")?
            .query_row([change.path.as_str()], |r| r.get(0))?;
        // A put's ancestors, read once: for the file above it, and for the directories
        // to restore if it is accepted.
        let ancestors = match &change.op {
            ChangeOp::Put { .. } => self.ancestors_live(&change.path)?,
            ChangeOp::Delete => Vec::new(),
        };
        let file_above = first_non_dir(&ancestors);
        // On a stale base, the path's mode and owners at the base tell what the change
        // changed of them (`rule::same_bytes_on_a_stale_base`), and its content whether
        // the change wrote or deleted only bytes nobody else wrote since
        // (`rule::bytes_over_changed_metadata`): from the history, or,
        // for a revision it lacks (forgotten, or given by a database this one was
        // restored over), as the node says them (simulator seed 683815: a write over
        // bytes only chmodded elsewhere since became a conflict file, and the path was
        // left with bytes nobody held any more) when the base is the one it sent, or
        // the change follows another (it then says what that change put there, on
        // which it was made, whatever its decision: seed 1184, a chmod and chown
        // following a touch decided unchanged, whose state was forgotten since, taken
        // for no change). So too for a change that follows one this database has no
        // record of (decided by a database it was restored over), sent with no base of
        // its own (simulator seed 603090: a chmod following a lost touch was taken for
        // no change, on base 0, and lost).
        let follows_a_lost_change = change.follows.is_some() && prior.is_none();
        let said_at_base = || {
            change.base_meta.filter(|_| base == change.base || change.follows.is_some()).map(|meta| rule::AtBase {
                meta,
                mtime_ns: None,
                content: change.base_content.clone(),
            })
        };
        let (at_base, only_own_since) = match &current {
            Some(c) if c.rev > base && (base > Revision::NONE || follows_a_lost_change) => match self.version_at(&change.path, base)? {
                Some(v) => (Some(rule::AtBase::from(&v)), self.only_own_since(&change.path, base, c.rev, from)?),
                None => (said_at_base(), false),
            },
            _ => (None, false),
        };
        let made_on = rule::MadeOn { base, at_base, said: change.base_meta, only_own_since };
        let decision = rule::decide(&change.path, current.as_ref(), &made_on, &change.op, copies as usize, file_above.as_ref());
        // A change of only the metadata of bytes written over elsewhere: its record says
        // the revision it was made on, which the changes that follow it were made on too
        // (`rule::basis` bases them on the recorded revision).
        if let Decision::OverChangedBytes(merged) = decision {
            let (entry, outcome) = match merged {
                Some(m) => (self.set_over_current_bytes(&change.path, &m, now_ms)?, Outcome::Accepted),
                None => (self.entry_or_absent(&change.path)?, Outcome::Unchanged),
            };
            tracing::debug!(target: "changes", %msg, path = %change.path, base = base.0, "a change of the metadata of bytes written over elsewhere since");
            return self.record_decision(msg, from, entry, outcome, base, base);
        }
        let cur_rev = current.as_ref().map(|c| c.rev.0).unwrap_or(0);
        // The path's state once accepted (read back by `set` already).
        let mut accepted = None;
        let from_lost = current.as_ref().is_some_and(|c| rule::from_a_later_lost_state(c, base));
        let outcome = match (decision, &change.op) {
            (Decision::Accept, ChangeOp::Put { version }) => {
                accepted = Some(self.accept_put(&change.path, version, &ancestors, from_lost.then_some(base), from, now_ms)?);
                Outcome::Accepted
            }
            // (The version the rule merged, made by the sender.)
            (Decision::Merge(merged), ChangeOp::Put { .. }) => {
                tracing::debug!(target: "changes", %msg, path = %change.path, version = ?merged, "merged with metadata changed elsewhere");
                accepted = Some(self.accept_put(&change.path, &merged, &ancestors, from_lost.then_some(base), from, now_ms)?);
                Outcome::Accepted
            }
            (Decision::Accept, ChangeOp::Delete) => {
                if from_lost {
                    self.mark_taken_in(&change.path, base)?;
                }
                accepted = Some(self.set(&change.path, None, from, now_ms)?);
                Outcome::Accepted
            }
            (Decision::Unchanged, _) => Outcome::Unchanged,
            (Decision::Refuse(reason), _) => {
                tracing::info!(path = %change.path, node = %from, %reason, "change refused");
                Outcome::Refused { reason }
            }
            (Decision::KeepAsVersion(reason), ChangeOp::Put { version }) => self.keep_refused(&change.path, version, from, &reason, now_ms)?,
            (Decision::Conflict, ChangeOp::Put { version }) => match self.keep_as_conflict(&change.path, version, from, base, cur_rev, now_ms)? {
                Some(copy) => Outcome::Conflict { copy },
                // Only beside a path within a few bytes of the length limit, or when
                // every candidate name is taken by other files.
                None => self.keep_refused(&change.path, version, from, "no free conflict file name fits beside this path", now_ms)?,
            },
            (Decision::ConflictBelow { file }, ChangeOp::Put { version }) => self.keep_below_conflict_dir(&change.path, &file, version, from, base, now_ms)?,
            (Decision::OverChangedBytes(_), _) => unreachable!("decided above"),
            (Decision::Merge(_) | Decision::Conflict | Decision::ConflictBelow { .. } | Decision::KeepAsVersion(_), ChangeOp::Delete) => {
                unreachable!("the rule only makes merges and conflicts of puts")
            }
        };
        tracing::debug!(target: "changes", %msg, path = %change.path, sent_base = change.base.0, base = base.0, "based on");
        match accepted {
            Some(entry) => self.decided_with(msg, from, entry, outcome, base),
            None => self.decided(msg, from, &change.path, outcome, base),
        }
    }

    /// Records how a change was decided and queues the decision for its sender, with the
    /// path's state now.
    fn decided(&mut self, msg: MessageId, from: &NodeId, path: &RelPath, outcome: Outcome, base: Revision) -> anyhow::Result<()> {
        let current = self.entry_or_absent(path)?;
        self.decided_with(msg, from, current, outcome, base)
    }

    /// [`Tx::decided`] with the path's state now already known (the entry a `set` made).
    fn decided_with(&mut self, msg: MessageId, from: &NodeId, current: Entry, outcome: Outcome, base: Revision) -> anyhow::Result<()> {
        let rev = current.rev;
        self.record_decision(msg, from, current, outcome, base, rev)
    }

    /// [`Tx::decided_with`], recording `rev` as the revision the change left: the path's
    /// revision now but for a change of only the metadata of bytes written over since
    /// (`rule::Decision::OverChangedBytes`), whose sender's version is not the state now.
    fn record_decision(&mut self, msg: MessageId, from: &NodeId, current: Entry, outcome: Outcome, base: Revision, rev: Revision) -> anyhow::Result<()> {
        let reply_key = topology::node_key(from);
        let path = &current.path;
        tracing::debug!(target: "changes", %msg, node = %from, %path, ?outcome, rev = current.rev.0, recorded = rev.0, "decided");
        let head = head(&self.tx)?;
        self.tx.prepare_cached("INSERT INTO applied(msg, node, rev, outcome, base, head) VALUES(?1, ?2, ?3, ?4, ?5, ?6)")?.execute(params![
            msg.as_str(),
            from.as_str(),
            rev.0 as i64,
            json(&outcome),
            base.0 as i64,
            head.0 as i64
        ])?;
        self.enqueue(&reply_key, ToNode::Decided { change: msg, outcome, current, first_rev: None })
    }

    /// How `prev`, the change a change of `from` follows, was decided (`None` if it was
    /// not, or its record is unreadable: the change is then decided on its own base).
    fn prior(&self, prev: &MessageId, from: &NodeId) -> anyhow::Result<Option<rule::Prior>> {
        let row: Option<(i64, String, i64)> = self
            .tx
            .prepare_cached("SELECT rev, outcome, base FROM applied WHERE msg = ?1")?
            .query_row([prev.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let Some((rev, outcome, base)) = row else { return Ok(None) };
        let Ok(outcome) = serde_json::from_str::<Outcome>(&outcome) else { return Ok(None) };
        let copy_still_own = match &outcome {
            Outcome::Conflict { copy } => self.is_own_conflict_file(copy, from)?,
            _ => false,
        };
        Ok(Some(rule::Prior { rev: Revision(rev as u64), outcome, base: Revision(base.max(0) as u64), copy_still_own }))
    }

    /// Whether `copy` is a live conflict file (not a directory) whose version is still
    /// `node`'s own.
    fn is_own_conflict_file(&self, copy: &RelPath, node: &NodeId) -> anyhow::Result<bool> {
        let row: Option<(String, Option<String>)> = self
            .tx
            .prepare_cached("SELECT origin, version FROM paths WHERE path = ?1")?
            .query_row([copy.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(match row {
            Some((origin, version)) if origin == node.as_str() => parse_version(version)?.is_some_and(|v| !matches!(v.content, Content::Dir)),
            _ => false,
        })
    }

    /// The path's state as a decision reports it: absent (revision 0) if never known.
    pub(crate) fn entry_or_absent(&self, path: &RelPath) -> anyhow::Result<Entry> {
        Ok(entry(self.tx, path)?.unwrap_or(Entry { path: path.clone(), rev: Revision(0), version: None, holders: vec![], from_lost: None }))
    }

    /// The path's live version, if it has one (no more: what `current` adds is not
    /// needed to walk ancestors).
    pub(crate) fn live_version(&self, path: &RelPath) -> anyhow::Result<Option<Version>> {
        let v: Option<Option<String>> =
            self.tx.prepare_cached("SELECT version FROM paths WHERE path = ?1")?.query_row([path.as_str()], |r| r.get(0)).optional()?;
        parse_version(v.flatten())
    }

    /// The highest ancestor of `path` that is live and not a directory, if any.
    pub(crate) fn first_non_dir_ancestor(&mut self, path: &RelPath) -> anyhow::Result<Option<RelPath>> {
        Ok(first_non_dir(&self.ancestors_live(path)?))
    }

    /// Each ancestor of `path`, in the order `RelPath::ancestors` gives, with its live
    /// version.
    fn ancestors_live(&self, path: &RelPath) -> anyhow::Result<Vec<(RelPath, Option<Version>)>> {
        path.ancestors()
            .into_iter()
            .map(|anc| {
                let live = self.live_version(&anc)?;
                Ok((anc, live))
            })
            .collect()
    }

    /// [`Tx::restore_ancestors`] over ancestors already read ([`Tx::ancestors_live`]).
    fn restore_dirs(&mut self, ancestors: &[(RelPath, Option<Version>)], now_ms: i64) -> anyhow::Result<()> {
        for (anc, live) in ancestors {
            if live.is_none() {
                self.set(anc, Some(&rule::restored_dir(now_ms)), &NodeId::manager(), now_ms)?;
            }
        }
        Ok(())
    }

    /// Every ancestor of an accepted path must be a live directory: ancestors deleted
    /// elsewhere are brought back (nothing added to a directory is lost because someone
    /// removed the directory). The caller has made sure none is a file.
    pub(crate) fn restore_ancestors(&mut self, path: &RelPath, now_ms: i64) -> anyhow::Result<()> {
        let ancestors = self.ancestors_live(path)?;
        self.restore_dirs(&ancestors, now_ms)
    }

    /// Keeps `version`, a change of `path` based on a stale revision, as a conflict file
    /// beside it (the copy gets the next revision; the last candidate names carry it, so
    /// the search ends with a name no other path has had). `None` when no name fits.
    fn keep_as_conflict(
        &mut self,
        path: &RelPath,
        version: &Version,
        from: &NodeId,
        base: Revision,
        cur_rev: u64,
        now_ms: i64,
    ) -> anyhow::Result<Option<RelPath>> {
        let at = UtcTime { unix_secs: now_ms.div_euclid(1000) };
        let copy_rev = head(self.tx)?.next();
        let mut free = None;
        for candidate in rule::conflict_candidates(path, from, at, copy_rev) {
            if self.live_version(&candidate)?.is_none() {
                free = Some(candidate);
                break;
            }
        }
        let Some(copy) = free else { return Ok(None) };
        self.restore_ancestors(&copy, now_ms)?;
        let copy_entry = self.set(&copy, Some(version), from, now_ms)?;
        self.tx
            .prepare_cached("INSERT INTO conflicts(path, copy, node, base, current_rev, copy_rev, at_ms) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)")?
            .execute(params![path.as_str(), copy.as_str(), from.as_str(), base.0 as i64, cur_rev as i64, copy_entry.rev.0 as i64, now_ms])?;
        tracing::info!(%path, %copy, node = %from, "conflict: kept the node's version as a conflict file");
        Ok(Some(copy))
    }

    /// Whether `version` of `path` can go below `dir_copy`, a conflict directory `from`
    /// already has for `blocker`, without replacing anything but its own earlier copy of
    /// `path`: every directory between them is absent or a live directory, and the place
    /// itself is free, a directory a directory is put over, or the copy this node made of
    /// `path` there that nobody else changed since. The node may have made or moved something
    /// into its conflict directory since (a directory with files in it, found by the
    /// simulator, seed 252083); a file put over that would leave the files below a file.
    fn fits_below_conflict_dir(&mut self, path: &RelPath, blocker: &RelPath, dir_copy: &RelPath, version: &Version, from: &NodeId) -> anyhow::Result<bool> {
        let Some(moved) = rule::moved_below(path, blocker, dir_copy) else { return Ok(true) };
        let between_are_dirs = self
            .ancestors_live(&moved)?
            .iter()
            .filter(|(anc, _)| anc.as_str().len() > dir_copy.as_str().len())
            .all(|(_, live)| matches!(live, None | Some(Version { content: Content::Dir, .. })));
        if !between_are_dirs {
            return Ok(false);
        }
        let Some(current) = self.current(&moved)? else { return Ok(true) };
        Ok(match (&current.version, &version.content) {
            (None, _) => true,
            (Some(Version { content: Content::Dir, .. }), Content::Dir) => true,
            (Some(Version { content: Content::Dir, .. }), _) => false,
            // Its own copy of `path`, last written by it (a later edit of the copy, which
            // follows it, updates it in place without a new `conflicts` row).
            (Some(_), _) => self
                .tx
                .prepare_cached(
                    "SELECT 1 FROM conflicts c JOIN paths p ON p.path = c.copy WHERE c.path = ?1 AND c.copy = ?2 AND c.node = ?3 AND p.origin = ?3",
                )?
                .exists(params![path.as_str(), moved.as_str(), from.as_str()])?,
        })
    }

    /// `path` is below `blocker`, which is a file on the manager (made one elsewhere
    /// while `from` wrote below it as a directory). The version goes to the same place
    /// below a conflict directory beside `blocker`: the one `from` already has for it (so
    /// that all it wrote there stays together), or a new one.
    fn keep_below_conflict_dir(
        &mut self,
        path: &RelPath,
        blocker: &RelPath,
        version: &Version,
        from: &NodeId,
        base: Revision,
        now_ms: i64,
    ) -> anyhow::Result<Outcome> {
        let earlier: Vec<String> = self
            .tx
            .prepare_cached("SELECT copy FROM conflicts WHERE path = ?1 AND node = ?2 ORDER BY id DESC LIMIT 8")?
            .query_map(params![blocker.as_str(), from.as_str()], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut reuse = None;
        for copy in earlier.into_iter().filter_map(|c| RelPath::new(c).ok()) {
            if matches!(self.live_version(&copy)?, Some(Version { content: Content::Dir, .. })) {
                reuse = Some(copy);
                break;
            }
        }
        if let Some(copy) = &reuse {
            if !self.fits_below_conflict_dir(path, blocker, copy, version, from)? {
                reuse = None;
            }
        }
        let dir_copy = match reuse {
            Some(copy) => copy,
            None => {
                let dir = rule::conflict_dir(version, now_ms);
                let blocker_rev = self.current(blocker)?.map(|c| c.rev.0).unwrap_or(0);
                match self.keep_as_conflict(blocker, &dir, from, base, blocker_rev, now_ms)? {
                    Some(copy) => copy,
                    None => {
                        return Ok(Outcome::Refused { reason: format!("{blocker} is a file on the manager, and no conflict directory name fits beside it") })
                    }
                }
            }
        };
        let Some(moved) = rule::moved_below(path, blocker, &dir_copy) else {
            return Ok(Outcome::Refused { reason: format!("{blocker} is a file on the manager, and the path below its conflict directory would be too long") });
        };
        self.restore_ancestors(&moved, now_ms)?;
        let moved_entry = self.set(&moved, Some(version), from, now_ms)?;
        self.tx
            .prepare_cached("INSERT INTO conflicts(path, copy, node, base, current_rev, copy_rev, at_ms) VALUES(?1, ?2, ?3, ?4, 0, ?5, ?6)")?
            .execute(params![path.as_str(), moved.as_str(), from.as_str(), base.0 as i64, moved_entry.rev.0 as i64, now_ms])?;
        tracing::info!(%path, copy = %moved, node = %from, "conflict: {blocker} is a file now; kept the node's version below a conflict directory");
        Ok(Outcome::Conflict { copy: moved })
    }
}

impl NodeRow {
    /// Online as of `now_ms`: marked online and a heartbeat recorded within
    /// [`OFFLINE_AFTER_MS`]. Read this, not the stored flag: the flag is only cleared by
    /// a manager that is making progress, and a stopped or stuck one never clears it.
    pub fn online_at(&self, now_ms: i64) -> bool {
        self.online && now_ms - self.last_seen_ms <= OFFLINE_AFTER_MS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{ContentHash, Envelope, ModeAndOwners};

    fn node(s: &str) -> NodeId {
        s.parse().unwrap()
    }
    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }
    /// A store on a database of its own (the directory lives as long as the guard).
    fn fresh_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("m.db")).unwrap();
        (dir, s)
    }
    fn file(h: u8) -> Version {
        Version { content: Content::File { hash: ContentHash::from_bytes([h; 32]), size: 1 }, mode: 0o644, uid: 0, gid: 0, mtime_ns: 0 }
    }

    /// `manager status` opens a database another process holds the write lock of (a
    /// stuck manager's): at the latest schema version, opening takes no lock.
    #[test]
    fn a_locked_database_at_the_latest_version_opens() {
        let (dir, _s) = fresh_store();
        let path = dir.path().join("m.db");
        let lock = rusqlite::Connection::open(&path).unwrap();
        lock.execute_batch("BEGIN IMMEDIATE").unwrap();
        // (Waiting for the lock, it would fail after the busy timeout.)
        Store::open(&path).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// The service starting while an operator runs `manager status` on a database that
    /// is not there yet, or on one from before schema versions were kept: every process
    /// that opens it at once gets a working store, and each version is made once.
    #[test]
    fn processes_opening_a_new_database_at_once_all_get_it() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..20 {
            let path = dir.path().join(format!("m{round}.db"));
            if round % 2 == 1 {
                // The tables of version 1, no version said.
                rusqlite::Connection::open(&path).unwrap().execute_batch(SCHEMA_V1).unwrap();
            }
            let start = std::sync::Arc::new(std::sync::Barrier::new(4));
            let openers: Vec<_> = (0..4)
                .map(|_| {
                    let (path, start) = (path.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        Store::open(&path).map(|_| ()).map_err(|e| format!("{e:#}"))
                    })
                })
                .collect();
            for opener in openers {
                opener.join().unwrap().unwrap_or_else(|e| panic!("round {round}: {e}"));
            }
            let s = Store::open(&path).unwrap();
            let version: i64 = s.conn().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
            assert_eq!(version as usize, MIGRATIONS.len());
        }
    }
    fn send(store: &mut Store, from: &str, id: &str, body: ToManager) {
        let env = Envelope::new(id.parse().unwrap(), node(from), body);
        store.transaction(|tx| tx.handle(env, 1_000)).unwrap();
    }
    /// `body` from node `from` as message `id`, handled at `now` ms.
    fn at(store: &mut Store, from: &str, id: &str, body: ToManager, now: i64) {
        store.transaction(|tx| tx.handle(Envelope::new(id.parse().unwrap(), node(from), body), now)).unwrap();
    }
    /// The service tick's forgetting of deletes at `now` (after its end of old versions:
    /// a delete goes once no older state of its path is left in the history); how many.
    fn forget_deletes(s: &mut Store, now: i64) -> usize {
        s.transaction(|tx| {
            tx.expire_versions(now)?;
            tx.forget_applied_deletes(now, 100)
        })
        .unwrap()
    }
    /// A store that keeps old versions, deletes and decisions' records `ms` only.
    fn store_keeping_for(ms: i64) -> (tempfile::TempDir, Store) {
        let (dir, mut s) = fresh_store();
        s.set_retention(crate::versions::Retention { keep_for_ms: ms, remember_decisions_ms: ms, ..Default::default() });
        (dir, s)
    }
    fn put(path: &str, base: u64, v: Version) -> ToManager {
        ToManager::Change(Change::new(p(path), Revision(base), ChangeOp::Put { version: v }))
    }
    fn decided(store: &Store) -> Vec<Outcome> {
        decisions(store).into_iter().map(|(outcome, _)| outcome).collect()
    }
    /// Every decision queued, with its `first_rev`.
    fn decisions(store: &Store) -> Vec<(Outcome, Option<Revision>)> {
        store
            .outbox(1000)
            .unwrap()
            .into_iter()
            .filter_map(|o| match Envelope::<ToNode>::decode(&o.payload).unwrap().body {
                ToNode::Decided { outcome, first_rev, .. } => Some((outcome, first_rev)),
                _ => None,
            })
            .collect()
    }

    fn sync(request: &str, since: u64, paged: bool) -> ToManager {
        ToManager::Sync {
            request: request.parse().unwrap(),
            url: "http://127.0.0.1:1".into(),
            since: Revision(since),
            paged,
            snapshot: false,
            taken: Revision(0),
            // As a node does: vouching for its `since`, unless it asks for no delete.
            applied: Revision(if since == u64::MAX { 0 } else { since }),
        }
    }

    /// A node whose queue drops messages is asked to sync, unless the last request sent
    /// for a drop came after the message dropped (it is then still in the queue, behind
    /// it): asked again when that request itself, or anything after it, is dropped.
    #[test]
    fn a_node_whose_queue_drops_messages_is_asked_to_sync_unless_a_request_follows_the_drop() {
        let (_dir, mut s) = fresh_store();
        // The outbox seq of each request to sync.
        let asks = |s: &mut Store| -> Vec<i64> {
            let out = s.outbox(1000).unwrap();
            if let Some(last) = out.last() {
                s.remove_outbox(last.seq).unwrap();
            }
            out.iter().filter(|o| matches!(Envelope::<ToNode>::decode(&o.payload).unwrap().body, ToNode::SyncRequested {})).map(|o| o.seq).collect()
        };
        let (n1, n2) = (node("n1"), node("n2"));
        send(&mut s, "n3", "m1", put("a", 0, file(1)));
        let before = s.outbox(1000).unwrap().last().unwrap().seq;
        asks(&mut s);
        assert_eq!(
            s.ask_to_sync_after_drops(&[(n1.clone(), Some(before)), (n1.clone(), Some(before)), (n2.clone(), None)]).unwrap().0,
            [n1.clone(), n2.clone()]
        );
        let sent = asks(&mut s);
        assert_eq!(sent.len(), 2, "one request each");
        assert_eq!(s.ask_to_sync_after_drops(&[(n1.clone(), Some(before))]).unwrap().0, Vec::<NodeId>::new(), "its request follows the drop");
        assert_eq!(s.ask_to_sync_after_drops(&[(n1.clone(), Some(sent[0]))]).unwrap().0, [n1.clone()], "the request itself was dropped");
        let again = asks(&mut s)[0];
        assert_eq!(
            s.ask_to_sync_after_drops(&[(n1.clone(), Some(again + 1))]).unwrap().0,
            [n1],
            "a message after the request was dropped: the request is gone"
        );
    }

    /// A node vouches for the deletes it applied in its heartbeats too, once on its disk:
    /// a delete is forgotten without waiting for the node's next sync; a heartbeat that
    /// does not say (0) leaves what the node said last.
    #[test]
    fn a_heartbeat_vouching_for_the_deletes_applied_lets_them_go() {
        let (_dir, mut s) = store_keeping_for(1_000);
        let forget = forget_deletes;
        let heartbeat = |applied: u64| ToManager::Heartbeat {
            url: "http://n2".into(),
            pending_changes: 0,
            pending_pulls: 0,
            software: String::new(),
            residency: None,
            taken: Revision(3),
            applied: Revision(applied),
        };
        at(&mut s, "n1", "m1", put("a", 0, file(1)), 1_000);
        at(&mut s, "n1", "m2", put("b", 0, file(2)), 1_000);
        at(&mut s, "n1", "m3", change("a", 1, None, ChangeOp::Delete), 1_000);
        at(&mut s, "n1", "s1", sync("r1", 3, true), 1_000);
        at(&mut s, "n2", "s2", sync("r2", 2, true), 1_000);
        assert_eq!(forget(&mut s, 5_000), 0, "n2 vouched up to revision 2");
        at(&mut s, "n2", "h1", heartbeat(0), 5_000);
        assert_eq!(forget(&mut s, 5_000), 0, "a heartbeat that does not say changes nothing");
        at(&mut s, "n2", "h2", heartbeat(3), 5_000);
        assert_eq!(forget(&mut s, 5_000), 1, "n2's heartbeat vouched for the delete");
        at(&mut s, "n2", "h3", heartbeat(0), 5_000);
        let applied: i64 = s.conn.query_row("SELECT deletes_applied FROM nodes WHERE id = 'n2'", [], |r| r.get(0)).unwrap();
        assert_eq!(applied, 3);
    }

    /// A deleted path's tombstone is forgotten once every node the manager knows said in
    /// a sync request that it applied every delete up to it (a new node asking for none
    /// says nothing) and once it is older than the retention; an online node that has not said
    /// so is asked to sync (not again within a quarter of the retention, a second here). A put there later is accepted,
    /// as over the tombstone.
    #[test]
    fn a_delete_every_node_applied_is_forgotten_once_old() {
        let (_dir, mut s) = store_keeping_for(1_000);
        let delete = |path: &str, base: u64| change(path, base, None, ChangeOp::Delete);
        let forget = forget_deletes;
        let tombstones = |s: &Store| -> Vec<(String, i64)> {
            s.conn
                .prepare("SELECT path, rev FROM paths WHERE version IS NULL ORDER BY rev")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let asked = |s: &mut Store, who: &str| {
            let out = s.outbox(1000).unwrap();
            if let Some(last) = out.last() {
                s.remove_outbox(last.seq).unwrap();
            }
            out.iter()
                .filter(|o| o.key == topology::node_key(&node(who)) && matches!(Envelope::<ToNode>::decode(&o.payload).unwrap().body, ToNode::SyncRequested {}))
                .count()
        };
        at(&mut s, "n1", "m1", put("a", 0, file(1)), 1_000);
        at(&mut s, "n1", "m2", put("b", 0, file(2)), 1_000);
        at(&mut s, "n1", "m3", delete("a", 1), 1_000);
        at(&mut s, "n1", "s1", sync("r1", 3, true), 1_000);
        at(&mut s, "n2", "h1", heartbeat_taken(2), 1_000);
        asked(&mut s, "n2");
        assert_eq!(forget(&mut s, 5_000), 0, "n2 has not said it applied the delete");
        assert_eq!(asked(&mut s, "n2"), 1, "so it is asked to sync");
        assert_eq!((forget(&mut s, 5_500), asked(&mut s, "n2")), (0, 0), "not again within a second (a quarter of the retention, at least a second)");
        assert_eq!((forget(&mut s, 6_000), asked(&mut s, "n2")), (0, 1), "but after it");
        at(&mut s, "n2", "s2", sync("r2", 2, true), 5_000);
        assert_eq!(forget(&mut s, 5_000), 0, "n2 applied deletes up to revision 2 only");
        at(&mut s, "n2", "s3", sync("r3", u64::MAX, true), 5_000);
        assert_eq!(forget(&mut s, 5_000), 0, "a new node (asking for no delete) may still take older broadcasts from its queue");
        at(&mut s, "n2", "s4", sync("r4", 3, true), 5_000);
        assert_eq!(forget(&mut s, 5_000), 1, "n2 applied the delete");
        assert_eq!(tombstones(&s), []);
        assert_eq!(s.conn.query_row("SELECT count(*) FROM history WHERE rev = 3", [], |r| r.get::<_, i64>(0)).unwrap(), 0, "the delete's history row");
        assert_eq!(s.conn.query_row("SELECT value FROM meta WHERE key = 'forgotten_deletes'", [], |r| r.get::<_, i64>(0)).unwrap(), 1);

        // A delete younger than the retention stays, whatever the nodes applied.
        at(&mut s, "n2", "m4", delete("b", 2), 4_500);
        at(&mut s, "n1", "s5", sync("r5", 4, true), 5_000);
        at(&mut s, "n2", "s6", sync("r6", 4, true), 5_000);
        assert_eq!(forget(&mut s, 5_000), 0, "deleted 500 ms ago");
        assert_eq!(tombstones(&s), [("b".to_string(), 4)]);
        assert_eq!(forget(&mut s, 6_000), 1);
        assert_eq!(tombstones(&s), []);

        // A put of a path whose delete was forgotten is taken as over it.
        let before = decided(&s).len();
        at(&mut s, "n2", "m5", put("a", 1, file(3)), 7_000);
        assert_eq!(decided(&s)[before..], [Outcome::Accepted]);

        // A delete stays while an older state of its path is left in the history.
        at(&mut s, "n2", "m6", change("a", 5, None, ChangeOp::Delete), 7_000);
        at(&mut s, "n1", "s7", sync("r7", 6, true), 7_000);
        at(&mut s, "n2", "s8", sync("r8", 6, true), 7_000);
        assert_eq!(s.transaction(|tx| tx.forget_applied_deletes(9_000, 100)).unwrap(), 0, "a's put at revision 5 is still in the history");
        assert_eq!(forget(&mut s, 9_000), 1, "once it ended");
    }

    /// A node the operator forgot (`manager node forget`) holds back no delete and none
    /// of its records stays; whatever it sends afterwards is refused for good, and does
    /// not make it known again; its sync, not its heartbeat, is answered with when it was
    /// forgotten (so it can say why). An id never seen is not forgotten.
    #[test]
    fn a_forgotten_node_holds_nothing_back_and_is_refused() {
        let (dir, mut s) = store_keeping_for(1_000);
        let forget = forget_deletes;
        at(&mut s, "n1", "m1", put("a", 0, file(1)), 1_000);
        at(&mut s, "n1", "m2", change("a", 1, None, ChangeOp::Delete), 1_000);
        at(&mut s, "n1", "s1", sync("r1", 2, true), 1_000);
        at(&mut s, "n2", "m3", put("b", 0, file(2)), 1_000);
        assert_eq!(forget(&mut s, 5_000), 0, "n2 has not said it applied the delete");

        let unknown = s.transaction(|tx| tx.forget_node(&node("n9"), 5_000)).err().expect("an id never seen is refused");
        assert!(format!("{unknown:#}").contains("no node n9"), "{unknown:#}");
        let gone = s.transaction(|tx| tx.forget_node(&node("n2"), 5_000)).unwrap();
        assert_eq!((gone.records, gone.holdings), (1, 1), "its change of b, and b, which it made");
        assert_eq!(forget(&mut s, 5_000), 1, "nothing holds the delete back any more");

        let env = Envelope::new("m4".parse().unwrap(), node("n2"), put("c", 0, file(3)));
        let refused = s.transaction(|tx| tx.handle_isolated(env, 6_000)).unwrap();
        assert!(refused.as_ref().is_err_and(|e| fails_for_good(e)), "{refused:?}");
        let env = Envelope::new("h1".parse().unwrap(), node("n2"), heartbeat_taken(3));
        assert_eq!(s.transaction(|tx| tx.handle_isolated(env, 6_000)).unwrap(), Ok(()), "a heartbeat is dropped, not dead-lettered");
        assert_eq!(s.conn.query_row("SELECT count(*) FROM nodes WHERE id = 'n2'", [], |r| r.get::<_, i64>(0)).unwrap(), 0, "not known again");
        assert!(forgotten_notices(&s, "n2").is_empty(), "nothing but a sync is answered");
        let env = Envelope::new("s2".parse().unwrap(), node("n2"), sync("r2", 3, true));
        let refused = s.transaction(|tx| tx.handle_isolated(env, 6_000)).unwrap();
        assert!(refused.as_ref().is_err_and(|e| fails_for_good(e)), "{refused:?}");
        assert_eq!(forgotten_notices(&s, "n2"), vec![("r2".to_string(), 5_000)], "its sync is answered with when it was forgotten");
        let drops = s.ask_to_sync_after_drops(&[(node("n2"), None), (node("n2"), None), (node("n1"), None)]).unwrap();
        assert_eq!(drops, (vec![node("n1")], vec![node("n2")]), "its queue, left behind and full, is named to be deleted; it is not asked to sync");
        // What `node create` avoids.
        assert_eq!(forgotten_nodes(&dir.path().join("m.db")).unwrap(), ["n2".to_string()].into());
        assert!(forgotten_nodes(&dir.path().join("none.db")).unwrap().is_empty());
    }

    /// The `forgotten` notices in the outbox for node `who`: the sync each answers, and
    /// when the node was forgotten.
    fn forgotten_notices(s: &Store, who: &str) -> Vec<(String, i64)> {
        let out = s.outbox(1000).unwrap();
        out.iter()
            .filter(|o| o.key == topology::node_key(&node(who)))
            .filter_map(|o| match Envelope::<ToNode>::decode(&o.payload).unwrap().body {
                ToNode::Forgotten { request, at_ms } => Some((request.to_string(), at_ms)),
                _ => None,
            })
            .collect()
    }

    /// With `--forget-nodes-after`, a node not heard of for longer, in the manager's
    /// uptime, is forgotten as by `manager node forget` (and told so at its next sync);
    /// time the manager did not count (down, a stall, a clock that jumped) does not make
    /// a node silent; without the setting, none is forgotten.
    #[test]
    fn a_node_silent_for_longer_than_the_setting_is_forgotten() {
        let (_dir, mut s) = store_keeping_for(1_000);
        let silent = |s: &mut Store, now: i64| s.transaction(|tx| tx.forget_silent_nodes(now)).unwrap();
        // Ticks of one broker session from `from` to `to`, a second apart, n2 heard of
        // at each (uptime is counted only while some node is).
        let run = |s: &mut Store, from: i64, to: i64| {
            for t in (from..=to).step_by(1_000) {
                at(s, "n2", &format!("h{t}"), heartbeat_taken(1), t);
                if t > from {
                    s.transaction(|tx| tx.count_uptime(std::time::Duration::from_secs(1), t)).unwrap();
                }
            }
        };
        let uptime = |s: &Store| s.conn.query_row("SELECT value FROM meta WHERE key = 'uptime_ms'", [], |r| r.get::<_, i64>(0)).unwrap();
        at(&mut s, "n1", "m1", put("a", 0, file(1)), 1_000);
        at(&mut s, "n2", "m2", put("b", 0, file(2)), 1_000);
        // n3 cannot be forgotten (its kept contents are unreadable).
        at(&mut s, "n3", "m3", put("c", 0, file(3)), 1_000);
        s.conn.execute("INSERT INTO kept(hash, node, size) VALUES('not a hash', 'n3', 1)", []).unwrap();
        run(&mut s, 1_000, 100_000);
        assert_eq!(uptime(&s), 99_000);
        // Nobody heard of (cut off from the broker, blocked by it): not counted.
        let served = |s: &mut Store, secs: u64, t: i64| s.transaction(|tx| tx.count_uptime(std::time::Duration::from_secs(secs), t)).unwrap();
        (110_000..=170_000).step_by(1_000).for_each(|t| served(&mut s, 1, t));
        served(&mut s, 60, 240_000);
        assert_eq!(uptime(&s), 99_000);
        assert_eq!(silent(&mut s, 100_000), vec![], "never, unless set");
        s.set_retention(crate::versions::Retention { forget_nodes_ms: 200_000, ..s.retention() });
        // Down for a day (a session's first tick counts nothing), then 50 s of uptime:
        // n1 silent 149 s of uptime, n2 not at all.
        run(&mut s, 86_500_000, 86_550_000);
        assert_eq!(silent(&mut s, 86_550_000), vec![], "a day down is not silence");
        run(&mut s, 86_560_000, 86_612_000);
        assert_eq!(silent(&mut s, 86_612_000), vec![node("n1")], "n1 silent 201 s of uptime; n3 could not be, and the rest went");
        let n3_silence_from = |s: &Store| s.conn.query_row("SELECT seen_uptime_ms FROM nodes WHERE id = 'n3'", [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!(n3_silence_from(&s), 201_000, "n3's silence starts again");
        assert_eq!(silent(&mut s, 86_612_000), vec![], "forgotten once");
        let env = Envelope::new("s1".parse().unwrap(), node("n1"), sync("r1", 1, true));
        let refused = s.transaction(|tx| tx.handle_isolated(env, 86_613_000)).unwrap();
        assert!(refused.as_ref().is_err_and(|e| fails_for_good(e)), "{refused:?}");
        assert_eq!(forgotten_notices(&s, "n1"), vec![("r1".to_string(), 86_612_000)]);
    }

    /// A decided change's record is forgotten only once it is old enough and its sender
    /// said it had nothing undecided while it had taken a revision past the head after
    /// that decision; a node that is not settled keeps its records however old. The
    /// newest record stays.
    #[test]
    fn decided_changes_are_forgotten_once_old_and_their_node_settled() {
        let (_dir, mut s) = fresh_store();
        s.set_retention(crate::versions::Retention { remember_decisions_ms: 1_000, ..Default::default() });
        let heartbeat = |pending: u64, taken: Revision| ToManager::Heartbeat {
            url: "http://n2".into(),
            pending_changes: pending,
            pending_pulls: 0,
            software: String::new(),
            residency: None,
            taken,
            applied: Revision(0),
        };
        let forget = |s: &mut Store, now: i64| s.transaction(|tx| tx.forget_settled_decisions(now, 100)).unwrap();
        let records = |s: &Store| -> Vec<String> {
            let mut st = s.conn.prepare("SELECT msg FROM applied ORDER BY rowid").unwrap();
            st.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
        };
        at(&mut s, "n2", "m1", put("a", 0, file(1)), 1_000);
        let after_m1 = s.head().unwrap();
        // The look notes the rowid and the head now, and so after each later decision.
        assert_eq!(forget(&mut s, 1_000), 0);
        at(&mut s, "n1", "m2", put("b", 0, file(2)), 1_000);
        at(&mut s, "n2", "m3", put("c", 0, file(3)), 1_000);
        assert_eq!(forget(&mut s, 1_500), 0, "none is old enough");
        // n2 has taken every revision, but says a change is still undecided.
        let head = s.head().unwrap();
        at(&mut s, "n2", "h1", heartbeat(1, head), 2_000);
        assert_eq!(forget(&mut s, 3_000), 0, "n2 is not settled");
        // Settled, having taken the head after m1's decision, not past it.
        at(&mut s, "n2", "h2", heartbeat(0, after_m1), 3_000);
        assert_eq!(forget(&mut s, 3_000), 0, "n2 took no revision past m1's decision");
        let head = s.head().unwrap();
        at(&mut s, "n2", "h3", heartbeat(0, head), 3_000);
        assert_eq!(forget(&mut s, 3_000), 1, "m1 goes; m3 is the newest record");
        assert_eq!(records(&s), ["m2", "m3"]);
        at(&mut s, "n2", "m4", put("d", 0, file(4)), 3_000);
        assert_eq!(forget(&mut s, 3_000), 0, "n2 took m3's revision, none past it");
        let head = s.head().unwrap();
        at(&mut s, "n2", "h4", heartbeat(0, head), 3_000);
        assert_eq!(forget(&mut s, 3_000), 1, "m3: n2 settled past it");
        assert_eq!(records(&s), ["m2", "m4"], "n1 never settled");
        // A node the database does not know keeps its records.
        s.conn.execute("DELETE FROM nodes WHERE id = 'n1'", []).unwrap();
        assert_eq!(forget(&mut s, 9_000), 0);
        s.conn.execute("INSERT INTO nodes(id, url, online, last_seen_ms) VALUES('n1', '', 0, 0)", []).unwrap();
        let head = s.head().unwrap();
        at(&mut s, "n1", "h5", heartbeat(0, head), 9_000);
        at(&mut s, "n1", "m5", put("e", 0, file(5)), 9_000);
        assert_eq!(forget(&mut s, 9_000), 1, "m2: n1 settled past it");
        assert_eq!(records(&s), ["m4", "m5"]);
        assert_eq!(decided_by_outcome(&s.conn).unwrap(), [("accepted".to_string(), 5)], "the forgotten are still counted");
        // A repeat of a change whose record was forgotten is decided again: the same
        // bytes over themselves change nothing.
        at(&mut s, "n2", "m1", put("a", 0, file(1)), 4_000);
        assert_eq!(decided(&s).last(), Some(&Outcome::Unchanged));
    }

    /// A chmod made on a state since touched elsewhere (same bytes, a new mtime) is
    /// taken, and the touch's mtime with it: the history holds the state it was made on, whose mode nobody else
    /// changed. A second chmod on that old state is not (the mode changed meanwhile).
    #[test]
    fn a_chmod_on_a_state_touched_elsewhere_is_taken() {
        let (_dir, mut s) = fresh_store();
        send(&mut s, "n3", "m0", put("z", 0, file(9)));
        send(&mut s, "n1", "m1", put("a", 0, file(1)));
        let made = s.head().unwrap().0;
        send(&mut s, "n2", "m2", put("a", made, Version { mtime_ns: 9, ..file(1) }));
        send(&mut s, "n1", "m3", put("a", made, Version { mode: 0o755, ..file(1) }));
        send(&mut s, "n3", "m4", put("a", made, Version { mode: 0o600, ..file(1) }));
        assert_eq!(decided(&s)[1..], [Outcome::Accepted, Outcome::Accepted, Outcome::Accepted, Outcome::Unchanged]);
        let a = s.entry(&p("a")).unwrap().unwrap().version.unwrap();
        assert_eq!((a.mode, a.mtime_ns), (0o755, 9), "n1's chmod, with n2's touch");
        // A base the history lacks for the path (here, another path's revision: for a, as
        // one a lost database gave) is merged with the mode and owners the node says.
        let lost = made - 1;
        let chmod_on_lost = |mode: u32, said: Option<u32>| {
            let claim = said.map(|mode| wire::ModeAndOwners { mode, uid: 0, gid: 0 });
            ToManager::Change(Change { base_meta: claim, ..Change::new(p("a"), Revision(lost), ChangeOp::Put { version: Version { mode, ..file(1) } }) })
        };
        send(&mut s, "n2", "m5", chmod_on_lost(0o700, None));
        send(&mut s, "n2", "m6", chmod_on_lost(0o700, Some(0o644)));
        send(&mut s, "n2", "m7", chmod_on_lost(0o711, Some(0o755)));
        assert_eq!(decided(&s)[5..], [Outcome::Unchanged, Outcome::Unchanged, Outcome::Accepted], "unknown; mode changed since; taken");
        assert_eq!(s.entry(&p("a")).unwrap().unwrap().version.unwrap().mode, 0o711);
    }

    /// A write or a delete made on a base the history has forgotten, over bytes only
    /// chmodded elsewhere since: with the content it replaced said (`base_content`), the
    /// write is merged with the chmod and the delete taken, as with the base in the
    /// history; without, as before, a conflict file and a refusal. (Simulator seed
    /// 683815: the write became a conflict file, and the path was left with bytes its
    /// writer, their only holder, no longer had.)
    #[test]
    fn a_write_over_bytes_chmodded_on_a_forgotten_base_is_merged_when_the_node_says_what_it_replaced() {
        let (_dir, mut s) = fresh_store();
        send(&mut s, "n1", "m1", put("a", 0, file(1)));
        send(&mut s, "n1", "m2", put("b", 0, file(1)));
        let made = s.head().unwrap().0;
        let (a_made, b_made) = (made - 1, made);
        send(&mut s, "n2", "m3", put("a", a_made, Version { mode: 0o600, ..file(1) }));
        send(&mut s, "n2", "m4", put("b", b_made, Version { mode: 0o600, ..file(1) }));
        s.conn.execute("DELETE FROM history WHERE rev <= ?1", [made as i64]).unwrap();
        let on_forgotten = |path: &str, base: u64, op: ChangeOp, said: Option<Content>| {
            ToManager::Change(Change {
                path: p(path),
                base: Revision(base),
                follows: None,
                op,
                base_meta: Some(ModeAndOwners::from(&file(1))),
                base_content: said,
            })
        };
        let write = || ChangeOp::Put { version: Version { mtime_ns: 5, ..file(2) } };
        send(&mut s, "n1", "m5", on_forgotten("a", a_made, write(), None));
        send(&mut s, "n1", "m6", on_forgotten("b", b_made, ChangeOp::Delete, None));
        assert!(matches!(decided(&s)[4..], [Outcome::Conflict { .. }, Outcome::Refused { .. }]), "{:?}", decided(&s));
        send(&mut s, "n3", "m7", on_forgotten("a", a_made, write(), Some(file(1).content)));
        send(&mut s, "n3", "m8", on_forgotten("b", b_made, ChangeOp::Delete, Some(file(1).content)));
        assert_eq!(decided(&s)[6..], [Outcome::Accepted, Outcome::Accepted]);
        assert_eq!(s.entry(&p("a")).unwrap().unwrap().version, Some(Version { mode: 0o600, mtime_ns: 5, ..file(2) }), "the write, with the chmod");
        assert_eq!(s.entry(&p("b")).unwrap().unwrap().version, None, "deleted");
    }

    /// A chmod that follows a change this database has no record of (decided by one it
    /// was restored over), sent with base 0 and the mode that change put there, is
    /// merged with that mode as its base, not taken for no change (simulator seed
    /// 603090); a chmod made elsewhere since that lost change stays.
    #[test]
    fn a_chmod_following_a_change_the_database_lost_is_taken() {
        let (_dir, mut s) = fresh_store();
        send(&mut s, "n1", "m1", put("a", 0, file(1)));
        let following_lost = |mode: u32, made_on: u32| {
            ToManager::Change(Change {
                follows: Some("lost".parse().unwrap()),
                base_meta: Some(ModeAndOwners { mode: made_on, uid: 0, gid: 0 }),
                ..Change::new(p("a"), Revision(0), ChangeOp::Put { version: Version { mode, ..file(1) } })
            })
        };
        send(&mut s, "n1", "m2", following_lost(0o700, 0o644));
        assert_eq!(decided(&s)[1], Outcome::Accepted);
        assert_eq!(s.entry(&p("a")).unwrap().unwrap().version.unwrap().mode, 0o700, "the chmod");
        let chmodded = s.head().unwrap().0;
        send(&mut s, "n2", "m3", put("a", chmodded, Version { mode: 0o600, ..file(1) }));
        send(&mut s, "n1", "m4", following_lost(0o711, 0o755));
        assert_eq!(decided(&s)[3], Outcome::Unchanged, "the mode changed elsewhere since the node's base");
        assert_eq!(s.entry(&p("a")).unwrap().unwrap().version.unwrap().mode, 0o600);
    }

    /// A chmod and chown that follow the node's touch, decided unchanged (another node's
    /// touch came first), whose state the history has forgotten since, are merged with the
    /// mode and owners the node says they were made on (those of its touch), not taken
    /// for no change (simulator seed 1184: the chown was lost).
    #[test]
    fn a_chmod_following_a_change_whose_state_was_forgotten_is_taken() {
        let (_dir, mut s) = fresh_store();
        send(&mut s, "n1", "m1", put("a", 0, file(1)));
        let made = s.head().unwrap().0;
        send(&mut s, "n2", "m2", put("a", made, Version { mtime_ns: 5, ..file(1) }));
        send(&mut s, "n1", "m3", put("a", made, Version { mtime_ns: 7, ..file(1) }));
        let touched = s.head().unwrap().0;
        assert_eq!(decided(&s)[1..], [Outcome::Accepted, Outcome::Unchanged]);
        s.conn.execute("DELETE FROM history WHERE rev = ?1", [touched as i64]).unwrap();
        send(&mut s, "n3", "m4", put("a", touched, Version { mtime_ns: 9, ..file(1) }));
        let mine = Version { mode: 0o600, uid: 1000, mtime_ns: 7, ..file(1) };
        send(
            &mut s,
            "n1",
            "m5",
            ToManager::Change(Change {
                follows: Some("m3".parse().unwrap()),
                base_meta: Some(ModeAndOwners::from(&file(1))),
                ..Change::new(p("a"), Revision(made), ChangeOp::Put { version: mine })
            }),
        );
        assert_eq!(decided(&s)[3..], [Outcome::Accepted, Outcome::Accepted]);
        let a = s.entry(&p("a")).unwrap().unwrap().version.unwrap();
        assert_eq!((a.mode, a.uid, a.mtime_ns), (0o600, 1000, 9), "n1's chmod and chown, n3's touch");
    }

    /// A chmod made on a state whose bytes were written elsewhere since is kept on those
    /// bytes, not as a conflict file of the older ones: the manager made the merged state,
    /// whose holder the writer stays (the chmodding node may not have those bytes). A change
    /// that follows it was made on the chmodding node's own version, not on the merged
    /// state: its write is a conflict, not an overwrite of the other node's (simulator
    /// seed 15533 found that with a touch, decided unchanged, then followed).
    #[test]
    fn a_chmod_of_bytes_written_elsewhere_since_is_kept_on_them() {
        let (_dir, mut s) = fresh_store();
        for node in ["n1", "n2"] {
            send(&mut s, node, &format!("h-{node}"), heartbeat_of(node, 0));
        }
        send(&mut s, "n1", "m1", put("a", 0, file(1)));
        let made = s.head().unwrap().0;
        send(&mut s, "n2", "m2", put("a", made, Version { mtime_ns: 9, ..file(2) }));
        send(&mut s, "n1", "m3", put("a", made, Version { mode: 0o755, ..file(1) }));
        assert_eq!(decided(&s)[1..], [Outcome::Accepted, Outcome::Accepted]);
        let a = s.entry(&p("a")).unwrap().unwrap();
        assert_eq!(a.version, Some(Version { mode: 0o755, mtime_ns: 9, ..file(2) }), "n2's bytes, n1's mode");
        assert_eq!(a.holders.iter().map(|h| h.node.as_str()).collect::<Vec<_>>(), ["n2"]);
        let origin: String = s.conn.query_row("SELECT origin FROM paths WHERE path = 'a'", [], |r| r.get(0)).unwrap();
        assert_eq!(origin, NodeId::manager().as_str(), "the manager's merge");
        assert_eq!(s.conn.query_row("SELECT count(*) FROM conflicts", [], |r| r.get::<_, i64>(0)).unwrap(), 0);
        // n1's touch, then its write, each following the one before.
        let put_following = |follows: &str, version: Version| change("a", made, Some(follows), ChangeOp::Put { version });
        send(&mut s, "n1", "m4", put_following("m3", Version { mode: 0o755, mtime_ns: 5, ..file(1) }));
        send(&mut s, "n1", "m5", put_following("m4", Version { mode: 0o755, ..file(3) }));
        let last = decided(&s);
        assert_eq!(last[3], Outcome::Unchanged, "a touch of the older bytes");
        assert!(matches!(last[4], Outcome::Conflict { .. }), "n1's write was made on its own bytes, not on n2's: {:?}", last[4]);
        assert_eq!(s.entry(&p("a")).unwrap().unwrap().version, Some(Version { mode: 0o755, mtime_ns: 9, ..file(2) }), "n2's write stays");
    }

    /// A write made on the state before a chmod made elsewhere (the bytes still those at
    /// its base) is taken with that chmod's mode, not kept as a conflict file; it is
    /// the writer's, held by it. The writer's next write, following it and carrying the
    /// mode the writer had (it had not applied the merged one yet), keeps the merged mode;
    /// a chmod that follows is the writer's own, and is taken.
    #[test]
    fn a_write_on_a_state_chmodded_elsewhere_since_keeps_the_chmod() {
        let (_dir, mut s) = fresh_store();
        send(&mut s, "n1", "m1", put("a", 0, file(1)));
        let made = s.head().unwrap().0;
        send(&mut s, "n2", "m2", put("a", made, Version { mode: 0o600, ..file(1) }));
        send(&mut s, "n1", "m3", put("a", made, Version { mtime_ns: 9, ..file(2) }));
        assert_eq!(decided(&s)[1..], [Outcome::Accepted, Outcome::Accepted]);
        let a = s.entry(&p("a")).unwrap().unwrap();
        assert_eq!(a.version, Some(Version { mode: 0o600, mtime_ns: 9, ..file(2) }), "n1's bytes, n2's mode");
        assert_eq!(a.holders.iter().map(|h| h.node.as_str()).collect::<Vec<_>>(), ["n1"]);
        assert_eq!(s.conn.query_row("SELECT count(*) FROM conflicts", [], |r| r.get::<_, i64>(0)).unwrap(), 0);
        // (Each says the mode of the version of n1's it follows.)
        let following = |follows: &str, made_on: &Version, version: Version| {
            ToManager::Change(Change {
                follows: Some(follows.parse().unwrap()),
                base_meta: Some(ModeAndOwners::from(made_on)),
                ..Change::new(p("a"), Revision(made), ChangeOp::Put { version })
            })
        };
        send(&mut s, "n1", "m4", following("m3", &file(2), file(3)));
        assert_eq!(decided(&s)[3], Outcome::Accepted);
        assert_eq!(s.entry(&p("a")).unwrap().unwrap().version, Some(Version { mode: 0o600, ..file(3) }), "the next write keeps n2's mode");
        send(&mut s, "n1", "m5", following("m4", &file(3), Version { mode: 0o755, ..file(3) }));
        assert_eq!(s.entry(&p("a")).unwrap().unwrap().version, Some(Version { mode: 0o755, ..file(3) }), "n1's chmod after it");
    }

    /// A heartbeat of n2 saying it took revision `taken`.
    fn heartbeat_taken(taken: u64) -> ToManager {
        heartbeat_of("n2", taken)
    }

    /// A heartbeat of `node` (its url `http://<node>`) saying it took revision `taken`.
    fn heartbeat_of(node: &str, taken: u64) -> ToManager {
        ToManager::Heartbeat {
            url: format!("http://{node}"),
            pending_changes: 0,
            pending_pulls: 0,
            software: String::new(),
            residency: None,
            taken: Revision(taken),
            applied: Revision(0),
        }
    }

    /// How many requests to sync every node the outbox holds (and removes the outbox).
    fn sync_requests(s: &mut Store) -> usize {
        let out = s.outbox(1000).unwrap();
        if let Some(last) = out.last() {
            s.remove_outbox(last.seq).unwrap();
        }
        out.iter()
            .filter(|o| o.key == topology::BROADCAST_KEY && matches!(Envelope::<ToNode>::decode(&o.payload).unwrap().body, ToNode::SyncRequested {}))
            .count()
    }

    /// A database brought back from an older copy: a node names a revision above its
    /// head (in a heartbeat, a sync request, a change's base). Revisions go on from well
    /// past it, every node is asked to sync, and the note says so; a node's change based
    /// on the lost later state is taken as made on the current one. A lying node moves the
    /// head at most `CATCH_UP_MAX` at a time, and never past `REV_LIMIT`.
    #[test]
    fn a_node_ahead_of_the_database_moves_revisions_past_it_and_everyone_syncs() {
        let (_dir, mut s) = fresh_store();
        send(&mut s, "n1", "m1", put("a", 0, file(1)));
        send(&mut s, "n2", "h1", heartbeat_taken(1));
        assert_eq!((s.head().unwrap(), sync_requests(&mut s), s.caught_up().unwrap()), (Revision(1), 0, None), "a node at the head");

        send(&mut s, "n2", "h2", heartbeat_taken(40));
        let to = 40 + CATCH_UP_MARGIN;
        assert_eq!(s.head().unwrap(), Revision(to));
        assert_eq!(sync_requests(&mut s), 1, "every node is asked to sync, in one broadcast");
        assert_eq!(s.caught_up().unwrap(), Some(CaughtUp { at_ms: 1_000, node: "n2".into(), seen: 40, head: 1, to }));
        send(&mut s, "n2", "h3", heartbeat_taken(40));
        assert_eq!((s.head().unwrap(), sync_requests(&mut s)), (Revision(to), 0), "once past it, nothing more");

        // `a` was changed at revision 30 after the copy: a change made on that state is
        // made on the current one, and its revision is newer than any the node took.
        send(&mut s, "n2", "m2", put("a", 30, file(2)));
        assert_eq!(decided(&s), [Outcome::Accepted]);
        assert_eq!(s.head().unwrap(), Revision(to + 1));

        // A change's base and a sync request name revisions too.
        send(&mut s, "n3", "m3", put("b", to + 10, file(3)));
        assert_eq!(s.head().unwrap(), Revision(to + 10 + CATCH_UP_MARGIN + 1), "past the base, then the change's own revision");
        let sync = ToManager::Sync {
            request: "r1".parse().unwrap(),
            url: "http://n3".into(),
            since: Revision(0),
            paged: true,
            snapshot: true,
            taken: Revision(1 << 40),
            applied: Revision(0),
        };
        let head = s.head().unwrap().0;
        send(&mut s, "n3", "s1", sync);
        assert_eq!(s.head().unwrap(), Revision(head + CATCH_UP_MAX + CATCH_UP_MARGIN), "a jump of at most CATCH_UP_MAX");
        // Past the limit: refused, the head stays.
        let (_dir2, mut s2) = fresh_store();
        s2.transaction(|tx| {
            tx.tx.execute("INSERT INTO meta(key, value) VALUES('head', ?1)", [(REV_LIMIT - 10) as i64])?;
            Ok(())
        })
        .unwrap();
        let env = Envelope::new("h5".parse().unwrap(), node("n4"), heartbeat_taken(REV_LIMIT));
        let refused = s2.transaction(|tx| tx.handle_isolated(env, 2_000)).unwrap();
        assert!(refused.is_err_and(|e| e.contains("cannot go on past it")), "a revision past the limit is refused");
        assert_eq!(s2.head().unwrap(), Revision(REV_LIMIT - 10));
    }

    /// Each start goes on from the time of the start (µs): a copy brought back never
    /// gives again a revision the lost database gave. A node that names one of those
    /// (in the range the start skipped) shows the database behind: every node is asked
    /// to sync, once; a node at a revision this database gave shows nothing.
    #[test]
    fn a_start_skips_to_its_time_and_a_node_in_the_skipped_range_shows_the_database_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (db, copy) = (dir.path().join("m.db"), dir.path().join("copy.db"));
        let mut s = Store::open(&db).unwrap();
        assert_eq!(s.start_serving(1_000).unwrap(), Revision(1_000_000), "the time of the start, in µs");
        send(&mut s, "n1", "m1", put("a", 0, file(1)));
        assert_eq!(s.head().unwrap(), Revision(1_000_001));
        sync_requests(&mut s);
        s.conn().execute("VACUUM INTO ?1", [copy.to_string_lossy()]).unwrap();
        // A restart: on from its own later time; nodes at revisions it gave show nothing.
        assert_eq!(s.start_serving(2_000).unwrap(), Revision(2_000_000));
        send(&mut s, "n1", "m2", put("a", 1_000_001, file(2)));
        assert_eq!(s.head().unwrap(), Revision(2_000_001));
        send(&mut s, "n2", "h1", heartbeat_taken(2_000_001));
        send(&mut s, "n2", "h2", heartbeat_taken(1_000_001));
        assert_eq!((sync_requests(&mut s), s.caught_up().unwrap()), (0, None));
        drop(s);

        // The copy comes back: it ends at 1,000,001, and never gave 2,000,001.
        std::fs::remove_file(&db).unwrap();
        std::fs::copy(&copy, &db).unwrap();
        let mut s = Store::open(&db).unwrap();
        assert_eq!(s.start_serving(3_000).unwrap(), Revision(3_000_000), "above anything the lost one gave");
        send(&mut s, "n2", "h3", heartbeat_taken(1_000_001));
        assert_eq!(sync_requests(&mut s), 0, "a revision the copy gave");
        send(&mut s, "n2", "h4", heartbeat_taken(2_000_001));
        assert_eq!(sync_requests(&mut s), 1, "every node is asked to sync");
        let note = s.caught_up().unwrap().unwrap();
        assert_eq!((note.node.as_str(), note.seen, note.to), ("n2", 2_000_001, 3_000_000));
        assert_eq!(s.head().unwrap(), Revision(3_000_000), "no jump: the start is past it already");
        send(&mut s, "n3", "h5", heartbeat_taken(2_000_001));
        assert_eq!(sync_requests(&mut s), 0, "once");
        // The lost state of `a` (taken at 2,000,001) is the current one for the rule.
        send(&mut s, "n2", "m3", put("a", 2_000_001, file(3)));
        assert_eq!(decided(&s), [Outcome::Accepted]);
    }

    /// Every sync reply page in the outbox, in order, with its encoded size (and removes
    /// the outbox, as publishing does).
    fn take_pages(store: &mut Store) -> Vec<(usize, MessageId, Revision, Vec<Entry>, u32, bool)> {
        let out = store.outbox(usize::MAX >> 1).unwrap();
        if let Some(last) = out.last() {
            store.remove_outbox(last.seq).unwrap();
        }
        out.into_iter()
            .filter_map(|o| match Envelope::<ToNode>::decode(&o.payload).unwrap().body {
                ToNode::SyncReply { request, head, entries, page, more } => Some((o.payload.len(), request, head, entries, page, more)),
                _ => None,
            })
            .collect()
    }

    fn answer_all(store: &mut Store, now_ms: i64) {
        while store.sync_step(now_ms).unwrap() {}
    }

    /// Paths with long names (9,000 of ~720 bytes: a reply of three pages), written
    /// straight into the tables (deciding each would make the test slow, not better).
    fn big_tree(store: &mut Store) {
        store
            .transaction(|tx| {
                let v = json(&file(1));
                for i in 0..9_000 {
                    let name = format!("{}{}/{}/{i:06}-{}", "d".repeat(240), i % 3, "e".repeat(240), "x".repeat(230));
                    let rev = tx.next_rev()?.0 as i64;
                    tx.tx.execute("INSERT INTO paths(path, rev, version, origin) VALUES(?1, ?2, ?3, 'n1')", params![name, rev, v])?;
                    tx.tx.execute("INSERT INTO history(rev, path, version, origin, at_ms) VALUES(?1, ?2, ?3, 'n1', 0)", params![rev, name, v])?;
                }
                Ok(())
            })
            .unwrap();
    }

    fn live_paths(store: &Store) -> std::collections::BTreeSet<String> {
        let mut st = store.conn().prepare("SELECT path FROM paths WHERE version IS NOT NULL").unwrap();
        st.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
    }

    /// One `Holding` message records the node as a holder of every path it names at
    /// that path's current version, and drops the items that are stale (an older
    /// revision, another content) or name no file.
    #[test]
    fn a_holding_message_records_each_current_item_and_drops_stale_ones() {
        let (_dir, mut s) = fresh_store();
        send(&mut s, "n1", "m1", put("a", 0, file(1)));
        send(&mut s, "n1", "m2", put("b", 0, file(2)));
        send(&mut s, "n1", "m3", put("b", 2, file(3)));
        let held = |path: &str, rev: u64, h: u8| Held { path: p(path), rev: Revision(rev), hash: ContentHash::from_bytes([h; 32]) };
        let items = vec![held("a", 1, 1), held("b", 2, 2), held("b", 3, 4), held("nothing", 1, 1)];
        send(&mut s, "n2", "h1", ToManager::Holding { items });
        let holders_of =
            |s: &Store, path: &str, rev: i64| -> Vec<String> { holders(s.conn(), path, rev).unwrap().into_iter().map(|h| h.node.to_string()).collect() };
        assert_eq!(holders_of(&s, "a", 1), ["n1", "n2"]);
        assert_eq!(holders_of(&s, "b", 3), ["n1"], "a stale revision or another content is not held");
        send(&mut s, "n2", "h2", ToManager::Holding { items: vec![held("b", 3, 3)] });
        assert_eq!(holders_of(&s, "b", 3), ["n1", "n2"]);
    }

    /// A path held by more nodes than a message may name (a cluster that large, or one
    /// sender claiming many ids in shared-user mode) is sent with the first of them: a
    /// longer list would be refused by every node, and no sync could complete.
    #[test]
    fn a_path_held_by_more_nodes_than_a_message_may_name_is_sent_with_the_first_of_them() {
        let (_dir, mut s) = fresh_store();
        send(&mut s, "n0", "m0", put("a", 0, file(1)));
        for i in 1..=wire::MAX_HOLDERS + 5 {
            let item = Held { path: p("a"), rev: Revision(1), hash: ContentHash::from_bytes([1; 32]) };
            send(&mut s, &format!("n{i}"), &format!("h{i}"), ToManager::Holding { items: vec![item] });
        }
        let entry = s.entry(&p("a")).unwrap().unwrap();
        assert_eq!(entry.holders.len(), wire::MAX_HOLDERS);
        assert_eq!(entry.holders[0].node, node("n0"), "the origin first");
    }

    /// A reply larger than a page is sent in numbered pages, each within the budget,
    /// the last one marked, together holding every path once.
    #[test]
    fn a_large_sync_reply_is_paged_under_the_budget() {
        let (_dir, mut s) = fresh_store();
        big_tree(&mut s);
        send(&mut s, "n2", "s1", sync("r1", 0, true));
        assert!(take_pages(&mut s).is_empty(), "the batch transaction does not build the reply");
        answer_all(&mut s, 10_000);
        let pages = take_pages(&mut s);
        assert!(pages.len() >= 2, "{} page(s)", pages.len());
        let mut seen = std::collections::BTreeSet::new();
        for (i, (bytes, request, _, entries, page, more)) in pages.iter().enumerate() {
            assert!(*bytes <= wire::SYNC_PAGE_BYTES, "page {i} has {bytes} bytes");
            assert_eq!((request.as_str(), *page as usize, *more), ("r1", i, i + 1 < pages.len()));
            for e in entries {
                assert!(seen.insert(e.path.to_string()), "{} sent twice", e.path);
            }
        }
        assert_eq!(seen, live_paths(&s));
    }

    /// Deleted paths are sent only when deleted after the node's `since`; live ones
    /// always (the node pushes what the reply does not name).
    #[test]
    fn deleted_paths_at_or_below_since_are_left_out() {
        let (_dir, mut s) = fresh_store();
        send(&mut s, "n1", "m1", put("old.txt", 0, file(1)));
        send(&mut s, "n1", "m2", put("keep.txt", 0, file(1)));
        send(&mut s, "n1", "m3", ToManager::Change(Change::new(p("old.txt"), Revision(1), ChangeOp::Delete)));
        let deleted_at = s.entry(&p("old.txt")).unwrap().unwrap().rev;
        let paths = |s: &mut Store, since: u64, request: &str, now: i64| {
            send(s, "n2", &format!("s-{request}"), sync(request, since, true));
            answer_all(s, now);
            let pages = take_pages(s);
            assert_eq!(pages.len(), 1);
            pages[0].3.iter().map(|e| (e.path.to_string(), e.version.is_some())).collect::<Vec<_>>()
        };
        assert_eq!(paths(&mut s, 0, "r1", 10_000), vec![("keep.txt".into(), true), ("old.txt".into(), false)]);
        assert_eq!(paths(&mut s, deleted_at.0 - 1, "r2", 20_000), vec![("keep.txt".into(), true), ("old.txt".into(), false)]);
        assert_eq!(paths(&mut s, deleted_at.0, "r3", 30_000), vec![("keep.txt".into(), true)]);
        // What a node that has taken no revision yet sends.
        assert_eq!(paths(&mut s, u64::MAX, "r4", 40_000), vec![("keep.txt".into(), true)]);
    }

    /// A `changes` message is decided exactly as its changes sent one by one: the same
    /// outcomes, in order, under each change's own id; sent again (a redelivery), it
    /// changes nothing.
    #[test]
    fn changes_in_one_message_are_decided_as_if_they_came_alone() {
        let item = |id: &str, c: ToManager| match c {
            ToManager::Change(change) => wire::ChangeItem { id: id.parse().unwrap(), change },
            _ => unreachable!(),
        };
        let script = [("c1", put("a", 0, file(1))), ("c2", put("b", 0, file(2))), ("c3", put("a", 1, file(3))), ("c4", put("a", 0, file(4)))];
        let (_d1, mut alone) = fresh_store();
        for (id, c) in &script {
            send(&mut alone, "n1", id, c.clone());
        }
        let (_d2, mut together) = fresh_store();
        let items: Vec<wire::ChangeItem> = script.iter().map(|(id, c)| item(id, c.clone())).collect();
        send(&mut together, "n1", "batch-1", ToManager::Changes { items: items.clone() });
        assert_eq!(decided(&together), decided(&alone));
        assert!(matches!(decided(&together).last(), Some(Outcome::Conflict { .. })), "the stale one is a conflict: {:?}", decided(&together));
        for path in ["a", "b"] {
            assert_eq!(together.entry(&p(path)).unwrap(), alone.entry(&p(path)).unwrap(), "{path}");
        }
        let before = (together.entry(&p("a")).unwrap(), decided(&together).len());
        send(&mut together, "n1", "batch-1", ToManager::Changes { items });
        assert_eq!(together.entry(&p("a")).unwrap(), before.0, "a redelivered batch changes nothing");
        assert_eq!(decided(&together)[..before.1], decided(&alone)[..], "and the decisions made stay as they were");
    }

    /// Paths changed while a reply is under way, behind its cursor, are sent again before
    /// the last page: the node may already have them from a broadcast, and must not take
    /// them for paths the manager does not know.
    #[test]
    fn changes_behind_the_cursor_are_in_the_reply() {
        let (_dir, mut s) = fresh_store();
        big_tree(&mut s);
        send(&mut s, "n2", "s1", sync("r1", 0, true));
        assert!(s.sync_step(10_000).unwrap());
        let first = take_pages(&mut s);
        assert!(first[0].5, "more pages follow");
        send(&mut s, "n1", "late", put("a-new.txt", 0, file(2)));
        let rev = s.entry(&p("a-new.txt")).unwrap().unwrap().rev;
        answer_all(&mut s, 10_000);
        let rest = take_pages(&mut s);
        assert!(!rest.last().unwrap().5);
        let sent: Vec<&Entry> = first.iter().chain(&rest).flat_map(|p| &p.3).filter(|e| e.path.as_str() == "a-new.txt").collect();
        assert_eq!(sent.iter().map(|e| e.rev).collect::<Vec<_>>(), vec![rev]);
        let all: std::collections::BTreeSet<String> = first.iter().chain(&rest).flat_map(|p| &p.3).map(|e| e.path.to_string()).collect();
        assert_eq!(all, live_paths(&s));
    }

    /// A node that counts what it hears meanwhile gets a snapshot: the paths as of the
    /// revision the reply started from, every page saying that revision, nothing changed
    /// later (behind the walk or ahead of it: those come on its queue), and a reply as
    /// long as the tree was however fast it grows meanwhile.
    #[test]
    fn a_snapshot_reply_leaves_out_what_changed_after_it_started_and_ends() {
        let (_dir, mut s) = fresh_store();
        big_tree(&mut s);
        let at_start = live_paths(&s);
        let start = s.head().unwrap();
        let (ahead_changed, ahead_deleted) = {
            let mut last = at_start.iter().rev();
            (last.next().unwrap().clone(), last.next().unwrap().clone())
        };
        let snapshot = |request: &str| ToManager::Sync {
            request: request.parse().unwrap(),
            url: "http://127.0.0.1:1".into(),
            since: Revision(0),
            paged: true,
            snapshot: true,
            taken: Revision(0),
            applied: Revision(0),
        };
        send(&mut s, "n2", "s1", snapshot("r1"));
        let mut pages = Vec::new();
        let mut made = 0;
        while s.sync_step(10_000).unwrap() {
            pages.extend(take_pages(&mut s));
            if made == 0 {
                let rev = |s: &Store, path: &str| s.entry(&p(path)).unwrap().unwrap().rev.0;
                send(&mut s, "n1", "behind", put("a-new.txt", 0, file(2)));
                let (changed_rev, deleted_rev) = (rev(&s, &ahead_changed), rev(&s, &ahead_deleted));
                send(&mut s, "n1", "changed", put(&ahead_changed, changed_rev, file(3)));
                let deleted = ToManager::Change(Change::new(p(&ahead_deleted), Revision(deleted_rev), ChangeOp::Delete));
                send(&mut s, "n1", "deleted", deleted);
            }
            // The tree grows ahead of the walk after every page.
            made += 1;
            send(&mut s, "n1", &format!("grow{made}"), put(&format!("zz-{made:04}.txt"), 0, file(4)));
            assert!(made < 20, "the reply goes on while the tree grows");
        }
        pages.extend(take_pages(&mut s));
        assert_eq!(pages.iter().map(|p| p.4).collect::<Vec<_>>(), (0..pages.len() as u32).collect::<Vec<_>>());
        assert_eq!(pages.iter().filter(|p| !p.5).count(), 1, "one last page");
        assert!(!pages.last().unwrap().5, "the last page says so");
        assert!(pages.iter().all(|p| p.2 == start), "every page says the snapshot's revision");
        let named: std::collections::BTreeSet<String> = pages.iter().flat_map(|p| &p.3).map(|e| e.path.to_string()).collect();
        let mut expected = at_start.clone();
        expected.remove(&ahead_changed);
        expected.remove(&ahead_deleted);
        assert_eq!(named, expected, "the paths as of the start, but those changed since");
        assert!(pages.iter().flat_map(|p| &p.3).all(|e| e.rev <= start));
        assert!(s.head().unwrap() > start);
    }

    /// Syncs queued together are answered once, for the newest request; the next reply
    /// of the same node waits out the interval.
    #[test]
    fn syncs_of_a_node_are_coalesced_and_rate_limited() {
        let (_dir, mut s) = fresh_store();
        send(&mut s, "n1", "m1", put("a.txt", 0, file(1)));
        s.remove_outbox(i64::MAX).unwrap();
        s.transaction(|tx| {
            for i in 0..50 {
                tx.handle(Envelope::new(format!("s{i}").parse().unwrap(), node("n2"), sync(&format!("r{i}"), 0, true)), 1_000)?;
            }
            Ok(())
        })
        .unwrap();
        answer_all(&mut s, 10_000);
        let pages = take_pages(&mut s);
        assert_eq!(pages.iter().map(|p| p.1.as_str()).collect::<Vec<_>>(), vec!["r49"]);
        send(&mut s, "n2", "s50", sync("r50", 0, true));
        send(&mut s, "n3", "s51", sync("other", 0, true));
        answer_all(&mut s, 10_500);
        let pages = take_pages(&mut s);
        assert_eq!(pages.iter().map(|p| p.1.as_str()).collect::<Vec<_>>(), vec!["other"], "another node is not held back");
        answer_all(&mut s, 10_999);
        assert!(take_pages(&mut s).is_empty(), "within the interval");
        answer_all(&mut s, 11_000);
        assert_eq!(take_pages(&mut s).iter().map(|p| p.1.as_str()).collect::<Vec<_>>(), vec!["r50"]);
    }

    /// A node that does not take pages (an older one) gets its reply as one message when
    /// it fits, written as before pages existed, and none when it does not.
    #[test]
    fn an_older_node_gets_one_page_or_none() {
        let (_dir, mut s) = fresh_store();
        send(&mut s, "n1", "m1", put("a.txt", 0, file(1)));
        s.remove_outbox(i64::MAX).unwrap();
        send(&mut s, "n2", "s1", sync("r1", 0, false));
        answer_all(&mut s, 10_000);
        let out = s.outbox(10).unwrap();
        assert_eq!(out.len(), 1);
        let text = String::from_utf8(out[0].payload.clone()).unwrap();
        assert!(!text.contains("\"page\"") && !text.contains("\"more\""), "{text}");
        s.remove_outbox(i64::MAX).unwrap();
        big_tree(&mut s);
        send(&mut s, "n2", "s2", sync("r2", 0, false));
        answer_all(&mut s, 20_000);
        assert!(take_pages(&mut s).is_empty());
        send(&mut s, "n2", "s3", sync("r3", 0, true));
        answer_all(&mut s, 30_000);
        assert!(take_pages(&mut s).len() >= 2, "the node is answered again when it asks for pages");
    }

    /// A decision is acked right after its commit, so the commit must be durable.
    #[test]
    fn commits_are_durable_before_they_return() {
        let (_dir, mut s) = fresh_store();
        let journal: String = s.conn().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        let synchronous = |s: &Store| s.conn().query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!((journal.as_str(), synchronous(&s)), ("wal", 2), "WAL with synchronous=FULL (2)");
        // Forgetting published rows is the one commit left unflushed; the decisions
        // after it are flushed again.
        s.remove_outbox(10).unwrap();
        assert_eq!(synchronous(&s), 2, "synchronous=FULL again after removing published rows");
    }

    /// A database gets a schema version; one from before versions were kept is taken
    /// as is, and one written by a newer manager is refused with a clear error.
    #[test]
    fn the_schema_is_versioned_and_a_newer_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db");
        // A database from before versions: the first schema, user_version 0, a path in it.
        let old = rusqlite::Connection::open(&db).unwrap();
        old.execute_batch(SCHEMA_V1).unwrap();
        old.execute("INSERT INTO paths(path, rev, version, origin) VALUES('a.txt', 1, NULL, 'n1')", []).unwrap();
        // An older state of it, and another path's current state.
        old.execute("INSERT INTO paths(path, rev, version, origin) VALUES('z', -1, NULL, 'n1')", []).unwrap();
        old.execute("INSERT INTO history(rev, path, version, origin, at_ms) VALUES(-2, 'a.txt', NULL, 'n1', 5), (-1, 'z', NULL, 'n1', 7)", []).unwrap();
        drop(old);
        let mut s = Store::open(&db).unwrap();
        let ends: Vec<(i64, Option<i64>)> = s
            .conn()
            .prepare("SELECT rev, ended_ms FROM history ORDER BY rev")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ends, [(-2, Some(5)), (-1, None)], "a state that is no longer current ends when it was made (schema 8)");
        let version: i64 = s.conn().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        assert_eq!(s.head().unwrap(), Revision(0), "the old rows were kept as they were");
        assert!(s.conn().query_row("SELECT count(*) FROM paths WHERE path = 'a.txt'", [], |r| r.get::<_, i64>(0)).unwrap() == 1);
        send(&mut s, "n1", "m1", put("b.txt", 0, file(1)));
        drop(s);
        let newer = MIGRATIONS.len() + 1;
        rusqlite::Connection::open(&db).unwrap().execute_batch(&format!("PRAGMA user_version = {newer}")).unwrap();
        let err = format!("{:#}", Store::open(&db).err().expect("a newer database is refused"));
        assert!(err.contains(&format!("at schema version {newer}, which this program does not know")), "{err}");
    }

    fn change(path: &str, base: u64, follows: Option<&str>, op: ChangeOp) -> ToManager {
        ToManager::Change(Change { path: p(path), base: Revision(base), follows: follows.map(|f| f.parse().unwrap()), op, base_meta: None, base_content: None })
    }
    fn dir_version() -> Version {
        Version { content: Content::Dir, mode: 0o755, uid: 0, gid: 0, mtime_ns: 0 }
    }

    /// Found by the simulator (seeds 3798, 17674): a node's own later edits conflicted
    /// with its own earlier ones. A later edit of a change kept as a conflict file
    /// updates that file; a change following a refused one keeps the refused one's base.
    #[test]
    fn regression_follow_ups_of_conflicting_and_refused_changes_do_not_conflict_with_their_own_node() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("m.db")).unwrap();
        send(&mut s, "n1", "m1", put("d", 0, dir_version()));
        send(&mut s, "n2", "x1", put("d/x", 1, file(9)));
        // n1, which never saw d/x, deletes d (refused: files were added below), then
        // writes a file d twice.
        send(&mut s, "n1", "m2", change("d", 0, Some("m1"), ChangeOp::Delete));
        send(&mut s, "n1", "m3", change("d", 0, Some("m2"), ChangeOp::Put { version: file(1) }));
        send(&mut s, "n1", "m4", change("d", 0, Some("m3"), ChangeOp::Put { version: file(2) }));
        let out = decided(&s);
        assert!(matches!(out[2], Outcome::Refused { .. }), "{out:?}");
        let (Outcome::Conflict { copy: c3 }, Outcome::Conflict { copy: c4 }) = (&out[3], &out[4]) else { panic!("{out:?}") };
        assert_eq!(c3, c4, "the second edit updates the first one's conflict file");
        assert_eq!(s.entry(c3).unwrap().unwrap().version, Some(file(2)));
        let own: i64 = s
            .conn()
            .query_row("SELECT count(*) FROM conflicts c JOIN history h ON h.rev = c.current_rev WHERE h.origin = c.node AND c.base < c.current_rev", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(own, 0, "no conflict of n1 with its own version of d");
    }

    /// Found by the simulator (seed 179): files written below a directory that became a
    /// file elsewhere go below a conflict directory beside that file, all in one.
    #[test]
    fn regression_files_below_a_directory_that_became_a_file_go_below_a_conflict_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("m.db")).unwrap();
        send(&mut s, "n2", "x1", put("e", 0, file(9)));
        send(&mut s, "n1", "m1", put("e", 0, dir_version()));
        send(&mut s, "n1", "m2", put("e/a", 0, file(1)));
        send(&mut s, "n1", "m3", put("e/b/c", 0, file(2)));
        let out = decided(&s);
        let [Outcome::Conflict { copy: d }, Outcome::Conflict { copy: a }, Outcome::Conflict { copy: c }] = &out[1..] else { panic!("{out:?}") };
        assert_eq!(a.as_str(), format!("{d}/a"));
        assert_eq!(c.as_str(), format!("{d}/b/c"));
        assert_eq!(s.entry(c).unwrap().unwrap().version, Some(file(2)));
        assert_eq!(s.entry(&p("e")).unwrap().unwrap().version, Some(file(9)), "the file stays");
    }

    /// Found by the simulator (seed 252083): a node's conflict directory is reused for
    /// what it writes below the blocking file only where that replaces nothing but its
    /// own earlier copy; a directory it made there since, with files in it, or a file
    /// above the place, sends the version to a new conflict directory.
    #[test]
    fn regression_a_conflict_directory_is_reused_only_where_the_copy_replaces_nothing_else() {
        let current = |s: &Store, path: &RelPath| s.entry(path).unwrap().unwrap().rev.0;
        // n1's `e` became a file on n2; n1 writes `e/a` twice (as a node that learnt
        // nothing between does), then makes a directory
        // with a file in it, and a file, in its conflict directory `d`.
        let setup = || {
            let (dir, mut s) = fresh_store();
            send(&mut s, "n2", "x1", put("e", 0, file(9)));
            send(&mut s, "n1", "m1", put("e", 0, dir_version()));
            send(&mut s, "n1", "m2", put("e/a", 0, file(1)));
            send(&mut s, "n1", "m3", put("e/a", 0, file(2)));
            // An edit following that one updates the copy in place; one that does not
            // follow it (made while other changes below `e` were pending) replaces it.
            let follows = Change { follows: Some("m3".parse().unwrap()), ..Change::new(p("e/a"), Revision(0), ChangeOp::Put { version: file(7) }) };
            send(&mut s, "n1", "m3f", ToManager::Change(follows));
            send(&mut s, "n1", "m3n", put("e/a", 0, file(8)));
            let out = decided(&s);
            let [Outcome::Conflict { copy: d }, copies @ ..] = &out[1..] else { panic!("{out:?}") };
            let copies: Vec<String> = copies.iter().map(|o| if let Outcome::Conflict { copy } = o { copy.to_string() } else { format!("{o:?}") }).collect();
            assert_eq!(copies, vec![format!("{d}/a"); 4], "its own copy is replaced in place");
            assert_eq!(s.entry(&p(&copies[3])).unwrap().unwrap().version, Some(file(8)));
            let made = [p(&format!("{d}/x")), p(&format!("{d}/x/f")), p(&format!("{d}/y"))];
            send(&mut s, "n1", "m4", put(made[0].as_str(), 0, dir_version()));
            send(&mut s, "n1", "m5", put(made[1].as_str(), 0, file(3)));
            send(&mut s, "n1", "m6", put(made[2].as_str(), 0, file(4)));
            let seen = made.clone().map(|m| current(&s, &m));
            (dir, s, d.clone(), made, seen)
        };
        // A file where it made a directory with a file in it, and a file below a file
        // it made: each goes to a new conflict directory, and what it made stays.
        for (path, ends) in [("e/x", "/x"), ("e/y/z", "/y/z")] {
            let (_dir, mut s, d, made, seen) = setup();
            send(&mut s, "n1", "m7", put(path, 0, file(5)));
            let out = decided(&s);
            let [Outcome::Accepted, Outcome::Accepted, Outcome::Accepted, Outcome::Conflict { copy }] = &out[6..] else { panic!("{path}: {out:?}") };
            assert!(!copy.as_str().starts_with(&format!("{d}/")) && copy.as_str().ends_with(ends), "{path} went to {copy}, not to a new conflict directory");
            assert_eq!(s.entry(copy).unwrap().unwrap().version, Some(file(5)));
            assert_eq!(made.clone().map(|m| current(&s, &m)), seen, "{path}: what the node made in its conflict directory stays");
            assert_eq!(s.entry(&made[1]).unwrap().unwrap().version, Some(file(3)));
        }
    }

    #[test]
    fn revisions_increase_and_duplicates_change_nothing() {
        let (_dir, mut s) = fresh_store();
        send(&mut s, "n1", "m1", put("a/b.txt", 0, file(1)));
        // The parent was restored first (r1), then the file (r2).
        assert_eq!(s.head().unwrap(), Revision(2));
        assert_eq!(s.entry(&p("a/b.txt")).unwrap().unwrap().rev, Revision(2));
        send(&mut s, "n1", "m1", put("a/b.txt", 0, file(1)));
        assert_eq!(s.head().unwrap(), Revision(2));
        assert_eq!(decided(&s), vec![Outcome::Accepted, Outcome::Accepted]);
    }

    /// The answer to a change sent again says the revision it first got when the path has
    /// changed since (simulator seed 206769: another node's identical directory there,
    /// which the sender took for its own put's state), and only then.
    #[test]
    fn a_repeat_after_the_path_changed_says_the_revision_the_change_first_got() {
        let (_dir, mut s) = fresh_store();
        let first_revs = |s: &Store| decisions(s).into_iter().map(|(_, first)| first).collect::<Vec<_>>();
        send(&mut s, "n3", "m1", put("a", 0, dir_version()));
        let made = s.entry(&p("a")).unwrap().unwrap().rev;
        send(&mut s, "n3", "m1", put("a", 0, dir_version()));
        assert_eq!(first_revs(&s), [None, None], "nothing changed since: the state now is the one it left");
        send(&mut s, "n3", "m2", ToManager::Change(Change::new(p("a"), made, ChangeOp::Delete)));
        send(&mut s, "n1", "m3", put("a", 0, dir_version()));
        let now = s.entry(&p("a")).unwrap().unwrap();
        assert!(now.rev > made && now.version == Some(dir_version()), "n1's directory looks just like n3's");
        send(&mut s, "n3", "m1", put("a", 0, dir_version()));
        assert_eq!(first_revs(&s).last(), Some(&Some(made)));
    }

    /// Found by the simulator (seed 1851, with node queues that drop their oldest
    /// messages while their node is away): the decision of a node's first edit was lost,
    /// the second's came, and its third edit, made on top of the second's revision, still
    /// followed the first. It was decided against the first's revision: a conflict with
    /// the node's own second edit.
    #[test]
    fn regression_a_follow_up_sent_with_a_later_own_revision_is_based_on_it() {
        let (_dir, mut s) = fresh_store();
        send(&mut s, "n1", "m1", put("f", 0, file(1)));
        send(&mut s, "n1", "m2", change("f", 0, Some("m1"), ChangeOp::Put { version: file(2) }));
        let second = s.entry(&p("f")).unwrap().unwrap().rev.0;
        send(&mut s, "n1", "m3", change("f", second, Some("m1"), ChangeOp::Put { version: file(3) }));
        assert_eq!(decided(&s), vec![Outcome::Accepted, Outcome::Accepted, Outcome::Accepted]);
        assert_eq!(s.entry(&p("f")).unwrap().unwrap().version, Some(file(3)));
        assert_eq!(s.conflict_count().unwrap(), 0);
    }

    /// Found by the simulator (seed 17468, with node queues that drop their oldest
    /// messages while their node is away): a node's queue lost the broadcast of its
    /// change's conflict file and the decision; the node sent the change again, and the
    /// answer (the decision alone) let it forget the content, which no other node had
    /// fetched yet: every node tried to fetch it for good. A repeat of a change kept as a
    /// conflict file is answered with that file's state first.
    #[test]
    fn regression_a_repeated_conflict_is_answered_with_its_conflict_file_first() {
        let (_dir, mut s) = fresh_store();
        send(&mut s, "n1", "m1", put("f", 0, file(1)));
        send(&mut s, "n2", "x1", put("f", 0, file(2)));
        let Outcome::Conflict { copy } = decided(&s).pop().unwrap() else { panic!("a conflict") };
        let before = s.outbox(1000).unwrap().len();
        send(&mut s, "n2", "x1", put("f", 0, file(2)));
        let answer: Vec<(String, ToNode)> =
            s.outbox(1000).unwrap().into_iter().skip(before).map(|o| (o.key, Envelope::<ToNode>::decode(&o.payload).unwrap().body)).collect();
        let to_n2 = topology::node_key(&node("n2"));
        let [(k1, ToNode::Applied { entry, .. }), (k2, ToNode::Decided { change, outcome: Outcome::Conflict { copy: again }, .. })] = &answer[..] else {
            panic!("{answer:?}")
        };
        assert_eq!((k1, k2), (&to_n2, &to_n2));
        assert_eq!((&entry.path, &entry.version, change.as_str(), again), (&copy, &Some(file(2)), "x1", &copy));
    }

    #[test]
    fn stale_put_becomes_a_conflict_file_and_follows_chains() {
        let (_dir, mut s) = fresh_store();
        send(&mut s, "n1", "m1", put("f.txt", 0, file(1)));
        send(
            &mut s,
            "n1",
            "m2",
            ToManager::Change(Change { follows: Some("m1".parse().unwrap()), ..Change::new(p("f.txt"), Revision(0), ChangeOp::Put { version: file(2) }) }),
        );
        send(&mut s, "n2", "m3", put("f.txt", 1, file(3)));
        let out = decided(&s);
        assert_eq!(out[0], Outcome::Accepted);
        assert_eq!(out[1], Outcome::Accepted);
        let Outcome::Conflict { copy } = &out[2] else { panic!("{out:?}") };
        assert!(copy.as_str().starts_with("f (conflict from n2 "), "{copy}");
        assert_eq!(s.entry(copy).unwrap().unwrap().version, Some(file(3)));
        assert_eq!(s.entry(&p("f.txt")).unwrap().unwrap().version, Some(file(2)));
        assert_eq!(s.conflict_count().unwrap(), 1);
    }

    /// Regression: the naming loop never ended for a name with a long extension, holding
    /// the store for good. Now the copy gets a name that fits, and next to a path that
    /// leaves no room for any conflict name the change is refused.
    #[test]
    fn regression_conflicts_beside_long_names_are_decided() {
        let (_dir, mut s) = fresh_store();
        let long = format!("a.{}", "e".repeat(230));
        let tight = format!("{}/{}/f", vec!["d".repeat(250); 16].join("/"), "e".repeat(61));
        assert_eq!(tight.len(), 4_079);
        send(&mut s, "n1", "m1", put(&long, 0, file(1)));
        send(&mut s, "n1", "m2", put(&tight, 0, file(1)));
        let (long_rev, tight_rev) = (s.entry(&p(&long)).unwrap().unwrap().rev.0, s.entry(&p(&tight)).unwrap().unwrap().rev.0);
        send(&mut s, "n1", "m3", put(&long, long_rev, file(2)));
        send(&mut s, "n1", "m4", put(&tight, tight_rev, file(2)));
        send(&mut s, "n2", "m5", put(&long, long_rev, file(3)));
        send(&mut s, "n2", "m6", put(&tight, tight_rev, file(3)));
        let out = decided(&s);
        let Outcome::Conflict { copy } = &out[4] else { panic!("{out:?}") };
        assert!(copy.as_str().len() <= wire::MAX_NAME_BYTES && copy.as_str().starts_with("a (conflict from n2 "), "{copy}");
        assert_eq!(s.entry(copy).unwrap().unwrap().version, Some(file(3)));
        assert!(matches!(&out[5], Outcome::Refused { .. }), "{out:?}");
        assert_eq!(s.entry(&p(&tight)).unwrap().unwrap().version, Some(file(2)));
    }
}
