//! Read-only queries for the API over the manager's database (`Store::conn()`), returning
//! the JSON the API sends. Nothing here writes; the store owns every write.

use crate::store::{NodeRow, Store};
use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};
use wire::{Content, RelPath, Version};

/// Milliseconds since the epoch as RFC 3339, for people reading the JSON.
fn rfc3339(ms: i64) -> Value {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .map(Value::String)
        .unwrap_or(Value::Null)
}

pub fn node_json(n: &NodeRow) -> Value {
    json!({
        "id": n.id,
        "online": n.online_at(crate::service::now_ms()),
        "url": n.url,
        "software": n.software,
        "last_seen_ms": n.last_seen_ms,
        "last_seen": rfc3339(n.last_seen_ms),
        "pending_changes": n.pending_changes,
        "pending_pulls": n.pending_pulls,
        "kept_bytes": n.kept_bytes,
        "residency": n.residency,
    })
}

pub fn nodes(store: &Store) -> anyhow::Result<Vec<Value>> {
    Ok(store.nodes()?.iter().map(node_json).collect())
}

pub fn node(store: &Store, id: &str) -> anyhow::Result<Option<Value>> {
    Ok(store.nodes()?.iter().find(|n| n.id == id).map(node_json))
}

/// A version column as JSON: the wire form plus flat `kind`, `size` and `hash` fields
/// that a table can show directly. `None` is a deletion.
fn version_json(stored: Option<String>) -> anyhow::Result<Value> {
    let Some(text) = stored else {
        return Ok(json!({"kind": "deleted", "version": null}));
    };
    let v: Version = serde_json::from_str(&text).context("corrupt version in the manager database")?;
    let (kind, size, hash) = match &v.content {
        Content::File { hash, size } => ("file", Some(*size), Some(hash.to_string())),
        Content::Dir => ("dir", None, None),
        Content::Symlink { .. } => ("symlink", None, None),
    };
    Ok(json!({"kind": kind, "size": size, "hash": hash, "version": serde_json::to_value(&v).context("encoding a version")?}))
}

fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
}

/// Current (not deleted) paths starting with `prefix`: `(total, page)`.
pub fn files(conn: &Connection, prefix: &str, offset: u64, limit: u64) -> anyhow::Result<(u64, Vec<Value>)> {
    let total: i64 = conn.query_row("SELECT count(*) FROM paths WHERE version IS NOT NULL AND substr(path, 1, length(?1)) = ?1", [prefix], |r| r.get(0))?;
    let mut st = conn.prepare_cached(
        "SELECT path, rev, version, origin FROM paths WHERE version IS NOT NULL AND substr(path, 1, length(?1)) = ?1
         ORDER BY path LIMIT ?2 OFFSET ?3",
    )?;
    let rows = st.query_map(params![prefix, limit as i64, offset as i64], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<String>>(2)?, r.get::<_, String>(3)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (path, rev, version, origin) = row?;
        out.push(merge(json!({"path": path, "rev": rev, "origin": origin}), version_json(version)?));
    }
    Ok((total as u64, out))
}

fn change_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, String, Option<String>, String, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn change_json((rev, path, version, origin, at_ms): (i64, String, Option<String>, String, i64)) -> anyhow::Result<Value> {
    Ok(merge(json!({"rev": rev, "path": path, "origin": origin, "at_ms": at_ms, "at": rfc3339(at_ms)}), version_json(version)?))
}

/// One path's history (oldest first) and current entry with holders; `None` if the
/// manager never saw the path.
pub fn history(store: &Store, path: &RelPath) -> anyhow::Result<Option<Value>> {
    let conn = store.conn();
    let mut st = conn.prepare_cached("SELECT rev, path, version, origin, at_ms FROM history WHERE path = ?1 ORDER BY rev")?;
    let revisions = st.query_map([path.as_str()], change_row)?.map(|r| change_json(r?)).collect::<anyhow::Result<Vec<_>>>()?;
    let Some(entry) = store.entry(path)? else {
        return Ok(None);
    };
    let holders: Vec<Value> = entry.holders.iter().map(|h| json!({"node": h.node.as_str(), "url": h.url})).collect();
    let conflicts = conflicts_where(conn, "WHERE path = ?1 OR copy = ?1", path.as_str(), 0, u64::MAX >> 1)?;
    Ok(Some(json!({
        "path": path.as_str(),
        "current_rev": entry.rev.0,
        "deleted": entry.version.is_none(),
        "holders": holders,
        "revisions": revisions,
        "conflicts": conflicts,
    })))
}

pub fn head(conn: &Connection) -> anyhow::Result<u64> {
    let v: Option<i64> = conn.query_row("SELECT value FROM meta WHERE key='head'", [], |r| r.get(0)).optional()?;
    Ok(v.unwrap_or(0) as u64)
}

/// Changes with a revision above `since`, oldest first, at most `limit`.
pub fn changes_since(conn: &Connection, since: u64, limit: u64) -> anyhow::Result<Vec<Value>> {
    let mut st = conn.prepare_cached("SELECT rev, path, version, origin, at_ms FROM history WHERE rev > ?1 ORDER BY rev LIMIT ?2")?;
    let rows = st.query_map(params![since as i64, limit as i64], change_row)?;
    rows.map(|r| change_json(r?)).collect()
}

/// The latest `limit` changes, oldest first.
pub fn latest_changes(conn: &Connection, limit: u64) -> anyhow::Result<Vec<Value>> {
    let mut st = conn.prepare_cached("SELECT rev, path, version, origin, at_ms FROM history ORDER BY rev DESC LIMIT ?1")?;
    let rows = st.query_map([limit as i64], change_row)?;
    let mut out = rows.map(|r| change_json(r?)).collect::<anyhow::Result<Vec<_>>>()?;
    out.reverse();
    Ok(out)
}

fn conflicts_where(conn: &Connection, filter: &str, arg: &str, offset: u64, limit: u64) -> anyhow::Result<Vec<Value>> {
    let sql = format!("SELECT id, path, copy, node, base, current_rev, copy_rev, at_ms FROM conflicts {filter} ORDER BY id DESC LIMIT ?2 OFFSET ?3");
    let mut st = conn.prepare_cached(&sql)?;
    let rows = st.query_map(params![arg, limit as i64, offset as i64], |r| {
        let at_ms: i64 = r.get(7)?;
        Ok(json!({
            "id": r.get::<_, i64>(0)?,
            "path": r.get::<_, String>(1)?,
            "copy": r.get::<_, String>(2)?,
            "node": r.get::<_, String>(3)?,
            "base": r.get::<_, i64>(4)?,
            "current_rev": r.get::<_, i64>(5)?,
            "copy_rev": r.get::<_, i64>(6)?,
            "at_ms": at_ms,
            "at": rfc3339(at_ms),
        }))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Conflicts, newest first: `(total, page)`.
pub fn conflicts(conn: &Connection, offset: u64, limit: u64) -> anyhow::Result<(u64, Vec<Value>)> {
    let total: i64 = conn.query_row("SELECT count(*) FROM conflicts", [], |r| r.get(0))?;
    // `?1` is unused without a filter but keeps the numbering of the shared query.
    Ok((total as u64, conflicts_where(conn, "WHERE ?1 = ?1", "", offset, limit)?))
}

/// Counters the status endpoint, the metrics and the event stream share.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    pub head: u64,
    pub files: u64,
    pub conflicts: u64,
    pub nodes: u64,
    pub nodes_online: u64,
    pub pending_changes: u64,
    pub pending_pulls: u64,
    /// Messages waiting in the outbox to be published.
    pub outbox: u64,
    /// Messages the manager has published since the database was created: every
    /// message ever queued (SQLite's AUTOINCREMENT high-water mark) minus those still
    /// waiting.
    pub published: u64,
    /// The last time the database was found behind its nodes.
    pub caught_up: Option<crate::store::CaughtUp>,
    /// Change messages decided, by outcome (`accepted`, `unchanged`, `conflict`, `refused`).
    pub decided: Vec<(String, u64)>,
}

pub fn counts(store: &Store) -> anyhow::Result<Counts> {
    let conn = store.conn();
    let one = |sql: &str| -> anyhow::Result<u64> { Ok(conn.query_row(sql, [], |r| r.get::<_, Option<i64>>(0))?.unwrap_or(0) as u64) };
    let outbox = one("SELECT count(*) FROM outbox")?;
    let queued: Option<i64> = conn.query_row("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'", [], |r| r.get(0)).optional()?;
    let decided = crate::store::decided_by_outcome(conn)?;
    Ok(Counts {
        head: head(conn)?,
        files: store.live_file_count()?,
        conflicts: store.conflict_count()?,
        nodes: one("SELECT count(*) FROM nodes")?,
        nodes_online: store.nodes()?.iter().filter(|n| n.online_at(crate::service::now_ms())).count() as u64,
        // total(): a sum past i64's range (counts are each node's word) saturates, where
        // sum() would fail the whole status.
        pending_changes: one("SELECT CAST(total(pending_changes) AS INTEGER) FROM nodes")?,
        pending_pulls: one("SELECT CAST(total(pending_pulls) AS INTEGER) FROM nodes")?,
        outbox,
        published: (queued.unwrap_or(0) as u64).saturating_sub(outbox),
        caught_up: store.caught_up()?,
        decided,
    })
}

pub fn counts_json(c: &Counts) -> Value {
    let decided: serde_json::Map<String, Value> = c.decided.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    json!({
        "head": c.head,
        "files": c.files,
        "conflicts": c.conflicts,
        "nodes": c.nodes,
        "nodes_online": c.nodes_online,
        "pending_changes": c.pending_changes,
        "pending_pulls": c.pending_pulls,
        "outbox": c.outbox,
        "messages_published": c.published,
        "changes_decided": decided,
        "caught_up": c.caught_up,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{Change, ChangeOp, ContentHash, Envelope, NodeId, Revision, ToManager};

    fn put(store: &mut Store, from: &str, id: &str, path: &str, base: u64, h: u8) {
        let v = Version { content: Content::File { hash: ContentHash::from_bytes([h; 32]), size: 3 }, mode: 0o644, uid: 0, gid: 0, mtime_ns: 0 };
        let change = Change::new(RelPath::new(path).unwrap(), Revision(base), ChangeOp::Put { version: v });
        let env = Envelope::new(id.parse().unwrap(), from.parse::<NodeId>().unwrap(), ToManager::Change(change));
        store.transaction(|tx| tx.handle(env, 1_000)).unwrap();
    }

    #[test]
    fn files_changes_history_conflicts_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("m.db")).unwrap();
        put(&mut s, "n1", "m1", "a.txt", 0, 1);
        put(&mut s, "n1", "m2", "b/c.txt", 0, 2);
        put(&mut s, "n2", "m3", "a.txt", 0, 3); // stale: becomes a conflict file
        let (total, page) = files(s.conn(), "", 0, 10).unwrap();
        assert_eq!(total, 4, "{page:?}"); // a.txt, b, b/c.txt, the conflict copy
        let (total, page) = files(s.conn(), "b/", 0, 10).unwrap();
        assert_eq!((total, page[0]["path"].as_str()), (1, Some("b/c.txt")));
        assert_eq!(page[0]["kind"], "file");
        let (_, page) = files(s.conn(), "", 1, 2).unwrap();
        assert_eq!(page.len(), 2);

        assert_eq!(changes_since(s.conn(), 0, 100).unwrap().len(), 4);
        assert_eq!(changes_since(s.conn(), 3, 100).unwrap()[0]["rev"], 4);
        let latest = latest_changes(s.conn(), 2).unwrap();
        assert_eq!((latest[0]["rev"].as_u64(), latest[1]["rev"].as_u64()), (Some(3), Some(4)));

        let h = history(&s, &RelPath::new("a.txt").unwrap()).unwrap().unwrap();
        assert_eq!(h["revisions"].as_array().unwrap().len(), 1);
        assert_eq!(h["holders"][0]["node"], "n1");
        assert_eq!(h["conflicts"].as_array().unwrap().len(), 1);
        assert!(history(&s, &RelPath::new("nope").unwrap()).unwrap().is_none());

        let (total, list) = conflicts(s.conn(), 0, 10).unwrap();
        assert_eq!((total, list[0]["node"].as_str()), (1, Some("n2")));

        let c = counts(&s).unwrap();
        assert_eq!((c.head, c.files, c.conflicts, c.nodes), (4, 4, 1, 2));
        assert_eq!(c.decided, vec![("accepted".to_string(), 2), ("conflict".to_string(), 1)]);
        assert!(c.published + c.outbox >= 3);
    }

    /// Counts are each node's word: claims whose sum is past SQLite's integers (one of
    /// them past i64 itself) make the status say the most it can, not fail.
    #[test]
    fn counts_nodes_claim_past_any_sum_saturate() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("m.db")).unwrap();
        for (i, claim) in [u64::MAX, i64::MAX as u64, 1].into_iter().enumerate() {
            let heartbeat = ToManager::Heartbeat {
                url: format!("http://n{i}"),
                pending_changes: claim,
                pending_pulls: claim,
                software: String::new(),
                residency: None,
                taken: Revision(0),
                applied: Revision(0),
            };
            let env = Envelope::new(format!("h{i}").parse().unwrap(), format!("n{i}").parse::<NodeId>().unwrap(), heartbeat);
            s.transaction(|tx| tx.handle(env, 1_000)).unwrap();
        }
        let c = counts(&s).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!((c.pending_changes, c.pending_pulls), (i64::MAX as u64, i64::MAX as u64));
        assert_eq!(s.nodes().unwrap().len(), 3);
    }
}
