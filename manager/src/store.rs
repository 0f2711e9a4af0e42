//! The manager's SQLite database: nodes, every path's current version, holders, history,
//! conflicts, applied message ids, and the outbox of messages to publish.
//!
//! It owns the revision counter. Every incoming message is handled inside the caller's
//! transaction, and what must be sent is written to the outbox in that same transaction,
//! so a crash can never lose a decision or send one that was not committed. It never
//! talks to the broker itself.

use crate::rule::{self, Current, Decision, UtcTime};
use anyhow::Context;
use rusqlite::{params, OptionalExtension, Transaction};
use std::path::Path;
use wire::{topology, Change, ChangeOp, Content, Entry, Envelope, Holder, MessageId, NodeId, Outcome, RelPath, Revision, ToManager, ToNode, Version};

/// A node that has sent nothing for this long is shown offline.
pub const OFFLINE_AFTER_MS: i64 = 5_000;

/// `synchronous=FULL`: with WAL, a commit is on disk before `commit` returns. The manager
/// acks a message right after committing its decision; with `NORMAL` a power loss could
/// take back commits already acked, and the revisions they issued would be issued again.
const SCHEMA: &str = "
PRAGMA journal_mode=WAL;
PRAGMA synchronous=FULL;
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
";

pub struct Store {
    conn: rusqlite::Connection,
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
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("wire types serialize")
}

fn parse_version(s: Option<String>) -> anyhow::Result<Option<Version>> {
    s.map(|s| serde_json::from_str(&s).context("corrupt version in the manager database")).transpose()
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let conn = rusqlite::Connection::open(path).with_context(|| format!("opening database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA).with_context(|| format!("creating the schema in {}", path.display()))?;
        Ok(Store { conn })
    }

    /// Read-only access for status queries.
    pub fn conn(&self) -> &rusqlite::Connection {
        &self.conn
    }

    /// Runs `f` in one transaction.
    pub fn transaction<T>(&mut self, f: impl FnOnce(&mut Tx<'_>) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .context("taking the manager database's write lock (is another process writing it?)")?;
        let mut t = Tx { tx };
        let out = f(&mut t)?;
        t.tx.commit().context("committing to the manager database")?;
        Ok(out)
    }

    pub fn outbox(&self, limit: usize) -> anyhow::Result<Vec<Outgoing>> {
        let mut st = self.conn.prepare_cached("SELECT seq, key, id, payload FROM outbox ORDER BY seq LIMIT ?1")?;
        let rows = st.query_map([limit as i64], |r| Ok(Outgoing { seq: r.get(0)?, key: r.get(1)?, id: r.get(2)?, payload: r.get(3)? }))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn remove_outbox(&mut self, up_to_seq: i64) -> anyhow::Result<()> {
        self.conn.execute("DELETE FROM outbox WHERE seq <= ?1", [up_to_seq])?;
        Ok(())
    }

    pub fn head(&self) -> anyhow::Result<Revision> {
        head(&self.conn)
    }

    pub fn nodes(&self) -> anyhow::Result<Vec<NodeRow>> {
        let mut st = self.conn.prepare("SELECT id, url, online, last_seen_ms, pending_changes, pending_pulls, software FROM nodes ORDER BY id")?;
        let rows = st.query_map([], |r| {
            Ok(NodeRow {
                id: r.get(0)?,
                url: r.get(1)?,
                online: r.get(2)?,
                last_seen_ms: r.get(3)?,
                pending_changes: r.get::<_, i64>(4)? as u64,
                pending_pulls: r.get::<_, i64>(5)? as u64,
                software: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn live_file_count(&self) -> anyhow::Result<u64> {
        Ok(self.conn.query_row("SELECT count(*) FROM paths WHERE version IS NOT NULL", [], |r| r.get::<_, i64>(0))? as u64)
    }

    pub fn conflict_count(&self) -> anyhow::Result<u64> {
        Ok(self.conn.query_row("SELECT count(*) FROM conflicts", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// The current entry of a path, with holders.
    pub fn entry(&self, path: &RelPath) -> anyhow::Result<Option<Entry>> {
        entry(&self.conn, path)
    }
}

fn head(conn: &rusqlite::Connection) -> anyhow::Result<Revision> {
    let v: Option<i64> = conn.query_row("SELECT value FROM meta WHERE key='head'", [], |r| r.get(0)).optional()?;
    Ok(Revision(v.unwrap_or(0) as u64))
}

fn holders(conn: &rusqlite::Connection, path: &str, rev: i64) -> anyhow::Result<Vec<Holder>> {
    // Online holders first; the origin (inserted first) before later pullers.
    let mut st = conn.prepare_cached(
        "SELECT h.node, n.url FROM holders h JOIN nodes n ON n.id = h.node
         WHERE h.path = ?1 AND h.rev = ?2 ORDER BY n.online DESC, h.rowid",
    )?;
    let rows = st.query_map(params![path, rev], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (node, url) = row?;
        if let Ok(node) = node.parse() {
            out.push(Holder { node, url });
        }
    }
    Ok(out)
}

fn entry(conn: &rusqlite::Connection, path: &RelPath) -> anyhow::Result<Option<Entry>> {
    let row: Option<(i64, Option<String>)> =
        conn.query_row("SELECT rev, version FROM paths WHERE path = ?1", [path.as_str()], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
    let Some((rev, version)) = row else {
        return Ok(None);
    };
    let version = parse_version(version)?;
    let holders = if matches!(version, Some(Version { content: Content::File { .. }, .. })) { holders(conn, path.as_str(), rev)? } else { Vec::new() };
    Ok(Some(Entry { path: path.clone(), rev: Revision(rev as u64), version, holders }))
}

/// One transaction over the store; every handler of a message runs inside one.
pub struct Tx<'a> {
    tx: Transaction<'a>,
}

impl Tx<'_> {
    fn next_rev(&mut self) -> anyhow::Result<Revision> {
        let rev = head(&self.tx)?.next();
        self.tx.execute("INSERT INTO meta(key, value) VALUES('head', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value", [rev.0 as i64])?;
        Ok(rev)
    }

    fn enqueue(&mut self, key: &str, body: ToNode) -> anyhow::Result<()> {
        let id: MessageId = uuid::Uuid::new_v4().to_string().parse().expect("uuids are valid message ids");
        let env = Envelope::new(id.clone(), NodeId::manager(), body);
        self.tx.execute("INSERT INTO outbox(key, id, payload) VALUES(?1, ?2, ?3)", params![key, id.as_str(), env.encode()])?;
        Ok(())
    }

    fn current(&self, path: &RelPath) -> anyhow::Result<Option<Current>> {
        let row: Option<(i64, Option<String>)> =
            self.tx.query_row("SELECT rev, version FROM paths WHERE path = ?1", [path.as_str()], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
        let Some((rev, version)) = row else {
            return Ok(None);
        };
        let version = parse_version(version)?;
        let has_children = matches!(version, Some(Version { content: Content::Dir, .. })) && self.has_live_children(path)?;
        Ok(Some(Current { rev: Revision(rev as u64), version, has_children }))
    }

    fn has_live_children(&self, path: &RelPath) -> anyhow::Result<bool> {
        // Paths below `p` sort between "p/" and "p0" ('0' follows '/').
        let lo = format!("{}/", path);
        let hi = format!("{}0", path);
        Ok(self
            .tx
            .query_row("SELECT 1 FROM paths WHERE path > ?1 AND path < ?2 AND version IS NOT NULL LIMIT 1", params![lo, hi], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Records a new current state of `path` at a new revision and broadcasts it.
    fn set(&mut self, path: &RelPath, version: Option<&Version>, origin: &NodeId, now_ms: i64) -> anyhow::Result<Entry> {
        let rev = self.next_rev()?;
        let v = version.map(json);
        self.tx.execute(
            "INSERT INTO paths(path, rev, version, origin) VALUES(?1, ?2, ?3, ?4)
             ON CONFLICT(path) DO UPDATE SET rev = excluded.rev, version = excluded.version, origin = excluded.origin",
            params![path.as_str(), rev.0 as i64, v, origin.as_str()],
        )?;
        self.tx.execute(
            "INSERT INTO history(rev, path, version, origin, at_ms) VALUES(?1, ?2, ?3, ?4, ?5)",
            params![rev.0 as i64, path.as_str(), v, origin.as_str(), now_ms],
        )?;
        self.tx.execute("DELETE FROM holders WHERE path = ?1", [path.as_str()])?;
        if matches!(version, Some(Version { content: Content::File { .. }, .. })) && *origin != NodeId::manager() {
            self.tx.execute("INSERT INTO holders(path, node, rev) VALUES(?1, ?2, ?3)", params![path.as_str(), origin.as_str(), rev.0 as i64])?;
        }
        let entry = entry(&self.tx, path)?.expect("just written");
        self.enqueue(topology::BROADCAST_KEY, ToNode::Applied { entry: entry.clone(), origin: origin.clone() })?;
        Ok(entry)
    }

    /// Marks a node as seen (and online), creating it on first contact.
    fn seen(&mut self, node: &NodeId, url: Option<&str>, now_ms: i64) -> anyhow::Result<()> {
        self.tx.execute(
            "INSERT INTO nodes(id, url, online, last_seen_ms) VALUES(?1, coalesce(?2, ''), 1, ?3)
             ON CONFLICT(id) DO UPDATE SET online = 1, last_seen_ms = excluded.last_seen_ms, url = coalesce(?2, nodes.url)",
            params![node.as_str(), url, now_ms],
        )?;
        Ok(())
    }

    /// Marks nodes silent for too long as offline; returns how many changed.
    pub fn mark_silent_offline(&mut self, now_ms: i64) -> anyhow::Result<usize> {
        Ok(self.tx.execute("UPDATE nodes SET online = 0 WHERE online = 1 AND last_seen_ms < ?1", [now_ms - OFFLINE_AFTER_MS])?)
    }

    /// Asks one node to run a sync.
    pub fn request_sync(&mut self, node: &NodeId) -> anyhow::Result<()> {
        self.enqueue(&topology::node_key(node), ToNode::SyncRequested {})
    }

    /// Handles one message from a node.
    pub fn handle(&mut self, env: Envelope<ToManager>, now_ms: i64) -> anyhow::Result<()> {
        let from = env.from.clone();
        match env.body {
            ToManager::Heartbeat { url, pending_changes, pending_pulls, software } => {
                self.seen(&from, Some(&url), now_ms)?;
                self.tx.execute(
                    "UPDATE nodes SET pending_changes = ?2, pending_pulls = ?3, software = ?4 WHERE id = ?1",
                    params![from.as_str(), pending_changes as i64, pending_pulls as i64, software],
                )?;
            }
            ToManager::Have { path, rev, hash } => {
                self.seen(&from, None, now_ms)?;
                if let Some(Entry { rev: cur, version: Some(Version { content: Content::File { hash: h, .. }, .. }), .. }) = entry(&self.tx, &path)? {
                    if cur == rev && h == hash {
                        self.tx.execute(
                            "INSERT OR IGNORE INTO holders(path, node, rev) VALUES(?1, ?2, ?3)",
                            params![path.as_str(), from.as_str(), rev.0 as i64],
                        )?;
                    }
                }
            }
            ToManager::Sync { request, url } => {
                self.seen(&from, Some(&url), now_ms)?;
                let entries = self.all_entries()?;
                let head = head(&self.tx)?;
                self.enqueue(&topology::node_key(&from), ToNode::SyncReply { request, head, entries })?;
            }
            ToManager::Change(change) => {
                self.seen(&from, None, now_ms)?;
                self.change(env.id, &from, change, now_ms)?;
            }
        }
        Ok(())
    }

    /// Handles one message under a savepoint, so that one bad message does not undo the
    /// others of its batch. When handling fails, with an error or a panic, everything it
    /// wrote is rolled back and the reason is returned. Only a failure of the database
    /// itself (the savepoint cannot be opened, released or rolled back) is an error.
    pub fn handle_isolated(&mut self, env: Envelope<ToManager>, now_ms: i64) -> anyhow::Result<Result<(), String>> {
        self.tx.execute_batch("SAVEPOINT message").context("opening a savepoint in the manager database")?;
        // Nothing is left half-done by a panic: the rollback below undoes the savepoint's
        // writes, and every statement it had open was reset while unwinding.
        let failure = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(env, now_ms))) {
            Ok(Ok(())) => {
                self.tx.execute_batch("RELEASE message").context("releasing a savepoint in the manager database")?;
                return Ok(Ok(()));
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(panic) => {
                let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
                format!("panicked: {}", what.unwrap_or_else(|| "(no message)".into()))
            }
        };
        self.tx.execute_batch("ROLLBACK TO message; RELEASE message").context("rolling back a failed message in the manager database")?;
        Ok(Err(failure))
    }

    fn all_entries(&self) -> anyhow::Result<Vec<Entry>> {
        let mut st = self.tx.prepare("SELECT path, rev, version FROM paths ORDER BY path")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<String>>(2)?)))?;
        let mut holder_st = self.tx.prepare("SELECT h.path, h.node, n.url FROM holders h JOIN nodes n ON n.id = h.node JOIN paths p ON p.path = h.path AND p.rev = h.rev ORDER BY n.online DESC, h.rowid")?;
        let mut by_path: std::collections::HashMap<String, Vec<Holder>> = Default::default();
        for row in holder_st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))? {
            let (path, node, url) = row?;
            if let Ok(node) = node.parse() {
                by_path.entry(path).or_default().push(Holder { node, url });
            }
        }
        let mut out = Vec::new();
        for row in rows {
            let (path, rev, version) = row?;
            let holders = by_path.remove(&path).unwrap_or_default();
            out.push(Entry {
                path: RelPath::new(path).context("corrupt path in the manager database")?,
                rev: Revision(rev as u64),
                version: parse_version(version)?,
                holders,
            });
        }
        Ok(out)
    }

    fn change(&mut self, msg: MessageId, from: &NodeId, change: Change, now_ms: i64) -> anyhow::Result<()> {
        let reply_key = topology::node_key(from);
        // At-least-once delivery: a message id is decided once. A repeat gets the path's
        // current state again, so the sender can stop waiting for it.
        let done: Option<String> = self.tx.query_row("SELECT outcome FROM applied WHERE msg = ?1", [msg.as_str()], |r| r.get(0)).optional()?;
        if let Some(outcome) = done {
            let outcome: Outcome = serde_json::from_str(&outcome).context("corrupt outcome")?;
            let current = entry(&self.tx, &change.path)?.unwrap_or(Entry { path: change.path.clone(), rev: Revision(0), version: None, holders: vec![] });
            return self.enqueue(&reply_key, ToNode::Decided { change: msg, outcome, current });
        }
        // A change made on top of the sender's own earlier change is based on the
        // revision that change got, if it was kept.
        let mut base = change.base;
        if let Some(prev) = &change.follows {
            let prior: Option<(i64, String)> =
                self.tx.query_row("SELECT rev, outcome FROM applied WHERE msg = ?1", [prev.as_str()], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
            if let Some((rev, outcome)) = prior {
                if let Ok(Outcome::Accepted | Outcome::Unchanged) = serde_json::from_str::<Outcome>(&outcome) {
                    base = Revision(rev as u64);
                }
            }
        }
        let current = self.current(&change.path)?;
        // The cap counts the conflict files that still exist: once a user has dealt with
        // them (deleted or renamed them), new conflicts are kept again.
        let copies: i64 = self.tx.query_row(
            "SELECT count(*) FROM conflicts c JOIN paths p ON p.path = c.copy WHERE c.path = ?1 AND p.version IS NOT NULL",
            [change.path.as_str()],
            |r| r.get(0),
        )?;
        let mut decision = rule::decide(&change.path, current.as_ref(), base, &change.op, copies as usize);
        if decision == Decision::Accept {
            if let ChangeOp::Put { .. } = change.op {
                if let Err(reason) = self.restore_ancestors(&change.path, now_ms)? {
                    decision = Decision::Refuse(reason);
                }
            }
        }
        let outcome = match decision {
            Decision::Accept => {
                let version = match &change.op {
                    ChangeOp::Put { version } => Some(version),
                    ChangeOp::Delete => None,
                };
                self.set(&change.path, version, from, now_ms)?;
                Outcome::Accepted
            }
            Decision::Unchanged => Outcome::Unchanged,
            Decision::Refuse(reason) => {
                tracing::info!(path = %change.path, node = %from, %reason, "change refused");
                Outcome::Refused { reason }
            }
            Decision::Conflict => {
                let ChangeOp::Put { version } = &change.op else { unreachable!("the rule only makes conflicts of puts") };
                let at = UtcTime { unix_secs: now_ms.div_euclid(1000) };
                // The copy gets the next revision; the last candidates carry it in their
                // names, so the search ends with a name no other path has had.
                let copy_rev = head(&self.tx)?.next();
                let mut free = None;
                for candidate in rule::conflict_candidates(&change.path, from, at, copy_rev) {
                    if !matches!(self.current(&candidate)?, Some(Current { version: Some(_), .. })) {
                        free = Some(candidate);
                        break;
                    }
                }
                match free {
                    Some(copy) => {
                        let copy_entry = self.set(&copy, Some(version), from, now_ms)?;
                        let cur_rev = current.as_ref().map(|c| c.rev.0).unwrap_or(0);
                        self.tx.execute(
                            "INSERT INTO conflicts(path, copy, node, base, current_rev, copy_rev, at_ms) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                            params![change.path.as_str(), copy.as_str(), from.as_str(), base.0 as i64, cur_rev as i64, copy_entry.rev.0 as i64, now_ms],
                        )?;
                        tracing::info!(path = %change.path, %copy, node = %from, "conflict: kept the node's version as a conflict file");
                        Outcome::Conflict { copy }
                    }
                    None => {
                        // Only beside a path within a few bytes of the length limit, or
                        // when every candidate name is taken by other files.
                        let reason = "no free conflict file name fits beside this path; this version was not kept".to_string();
                        tracing::warn!(path = %change.path, node = %from, %reason, "change refused");
                        Outcome::Refused { reason }
                    }
                }
            }
        };
        let current = entry(&self.tx, &change.path)?.unwrap_or(Entry { path: change.path.clone(), rev: Revision(0), version: None, holders: vec![] });
        tracing::debug!(target: "changes", %msg, node = %from, path = %change.path, sent_base = change.base.0, base = base.0, ?outcome, rev = current.rev.0, "decided");
        self.tx.execute(
            "INSERT INTO applied(msg, node, rev, outcome) VALUES(?1, ?2, ?3, ?4)",
            params![msg.as_str(), from.as_str(), current.rev.0 as i64, json(&outcome)],
        )?;
        self.enqueue(&reply_key, ToNode::Decided { change: msg, outcome, current })
    }

    /// Every ancestor of an accepted path must be a live directory: ancestors deleted
    /// elsewhere are brought back (nothing added to a directory is lost because someone
    /// removed the directory). An ancestor that is a file refuses the change.
    fn restore_ancestors(&mut self, path: &RelPath, now_ms: i64) -> anyhow::Result<Result<(), String>> {
        for anc in path.ancestors() {
            match self.current(&anc)? {
                Some(Current { version: Some(Version { content: Content::Dir, .. }), .. }) => {}
                Some(Current { version: Some(_), .. }) => return Ok(Err(format!("{anc} is not a directory on the manager"))),
                _ => {
                    let dir = Version { content: Content::Dir, mode: 0o755, uid: 0, gid: 0, mtime_ns: now_ms * 1_000_000 };
                    self.set(&anc, Some(&dir), &NodeId::manager(), now_ms)?;
                }
            }
        }
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{ContentHash, Envelope};

    fn node(s: &str) -> NodeId {
        s.parse().unwrap()
    }
    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }
    fn file(h: u8) -> Version {
        Version { content: Content::File { hash: ContentHash::from_bytes([h; 32]), size: 1 }, mode: 0o644, uid: 0, gid: 0, mtime_ns: 0 }
    }
    fn send(store: &mut Store, from: &str, id: &str, body: ToManager) {
        let env = Envelope::new(id.parse().unwrap(), node(from), body);
        store.transaction(|tx| tx.handle(env, 1_000)).unwrap();
    }
    fn put(path: &str, base: u64, v: Version) -> ToManager {
        ToManager::Change(Change { path: p(path), base: Revision(base), follows: None, op: ChangeOp::Put { version: v } })
    }
    fn decided(store: &Store) -> Vec<Outcome> {
        store
            .outbox(1000)
            .unwrap()
            .into_iter()
            .filter_map(|o| match Envelope::<ToNode>::decode(&o.payload).unwrap().body {
                ToNode::Decided { outcome, .. } => Some(outcome),
                _ => None,
            })
            .collect()
    }

    /// A decision is acked right after its commit, so the commit must be durable.
    #[test]
    fn commits_are_durable_before_they_return() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("m.db")).unwrap();
        let journal: String = s.conn().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        let synchronous: i64 = s.conn().query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!((journal.as_str(), synchronous), ("wal", 2), "WAL with synchronous=FULL (2)");
    }

    #[test]
    fn revisions_increase_and_duplicates_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("m.db")).unwrap();
        send(&mut s, "n1", "m1", put("a/b.txt", 0, file(1)));
        // The parent was restored first (r1), then the file (r2).
        assert_eq!(s.head().unwrap(), Revision(2));
        assert_eq!(s.entry(&p("a/b.txt")).unwrap().unwrap().rev, Revision(2));
        send(&mut s, "n1", "m1", put("a/b.txt", 0, file(1)));
        assert_eq!(s.head().unwrap(), Revision(2));
        assert_eq!(decided(&s), vec![Outcome::Accepted, Outcome::Accepted]);
    }

    #[test]
    fn stale_put_becomes_a_conflict_file_and_follows_chains() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("m.db")).unwrap();
        send(&mut s, "n1", "m1", put("f.txt", 0, file(1)));
        send(
            &mut s,
            "n1",
            "m2",
            ToManager::Change(Change { path: p("f.txt"), base: Revision(0), follows: Some("m1".parse().unwrap()), op: ChangeOp::Put { version: file(2) } }),
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
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("m.db")).unwrap();
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

impl NodeRow {
    /// Online as of `now_ms`: marked online and a heartbeat recorded within
    /// [`OFFLINE_AFTER_MS`]. Read this, not the stored flag: the flag is only cleared by
    /// a manager that is making progress, and a stopped or stuck one never clears it.
    pub fn online_at(&self, now_ms: i64) -> bool {
        self.online && now_ms - self.last_seen_ms <= OFFLINE_AFTER_MS
    }
}
