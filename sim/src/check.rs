//! The invariants, checked once everything has healed and the cluster is quiet:
//!
//! - **Converged**: every node's tree (what a user sees: kinds, permission bits, bytes,
//!   symlink targets, file mtimes) equals the manager's current state, and no node has a change
//!   left undecided.
//!   Its status counts as many files and directories as its tree has.
//! - **Verified bytes**: every file reads back whole, and its bytes hash to the version
//!   the manager holds (the tree equality above compares hashes of the bytes read).
//! - **No lost write**: every version a node's user closed either reached the manager
//!   (it is in the manager's history, as the path's version or as a conflict file) or
//!   was replaced by that same node's later operation on the path (a later write,
//!   truncate, delete or rename of it or of a directory above it). docs/sync.md says
//!   why this is the definition.
//! - **A tree**: every path the manager holds is below a directory it holds (never
//!   below a file, never orphaned).
//! - **Conflicts**: no conflict file of a conflict file, and never more conflict files
//!   of one path than `MAX_CONFLICT_COPIES`; no conflict of a node with its own change
//!   (but after a restore of the manager's database, which decides again, maybe
//!   otherwise, the changes whose decisions it lost).
//! - **No deleted path brought back**: without a restore of the manager, no node sends
//!   as new a path it took from the manager (the manager names every live path and
//!   every delete a node may not have applied, `SyncReport::pushed_again`).
//! - **Restores**: the versions that reached the manager before its database was
//!   brought back from an older copy count as having reached it (its history then is
//!   that of the copy); a run without a restore never has the manager find a node ahead
//!   of it.

use crate::node::{snapshot, Seen};
use crate::{Made, World};
use anyhow::{bail, Context};
use fs_node::tree::Kind;
use std::collections::{BTreeMap, HashMap, HashSet};
use wire::{Content, ContentHash, NodeId, Version};

pub fn all(w: &mut World) -> anyhow::Result<()> {
    let store = w.manager.store().context("the manager is up after healing")?;
    let conn = store.conn();
    let mut manager_view = BTreeMap::new();
    let mut st = conn.prepare("SELECT path, version FROM paths WHERE version IS NOT NULL")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    for row in rows {
        let (path, version) = row?;
        let v: Version = serde_json::from_str(&version)?;
        manager_view.insert(path, seen_of(&v));
    }
    // The manager's tree is a tree: each live path's parent is a live directory.
    for path in manager_view.keys() {
        if let Some((parent, _)) = path.rsplit_once('/') {
            match manager_view.get(parent) {
                Some(p) if p.kind == Kind::Dir => {}
                Some(p) => bail!("the manager has {path} below {parent}, a {:?}", p.kind),
                None => bail!("the manager has {path} below {parent}, which it does not have"),
            }
        }
    }
    for n in &w.nodes {
        let tree = n.tree().context("every node is up after healing")?;
        let pending = tree.pending_changes();
        if pending > 0 {
            bail!("{} still has {pending} undecided change(s) after settling", n.id);
        }
        let view = snapshot(tree).map_err(|e| anyhow::anyhow!("{}: {e}", n.id))?;
        if view != manager_view {
            bail!("{} did not converge with the manager:\n{}", n.id, diff(&view, &manager_view));
        }
        // The status's counts, kept as entries came and went, against the tree walked.
        let dirs = view.values().filter(|s| s.kind == Kind::Dir).count() as u64 + 1;
        let files = view.len() as u64 + 1 - dirs;
        let stats = tree.stats();
        if (stats.files, stats.dirs) != (files, dirs) {
            bail!("{} counts {} file(s) and {} directories; its tree has {files} and {dirs}", n.id, stats.files, stats.dirs);
        }
    }

    // Without a restore, no node ever names a revision the manager did not give.
    if w.stats.restores == 0 {
        if let Some(c) = store.caught_up()? {
            bail!("the manager was never restored, yet it {c}");
        }
        // Nor does the manager lose a path: a node that sends one it took from the
        // manager as new brings back a path deleted since (a sync's `since` above a
        // delete the node had not applied, or a delete the manager forgot too early).
        if let Some(n) = w.nodes.iter().find(|n| n.pushed_again > 0) {
            bail!("{} sent {} path(s) it had taken from the manager as new: a deleted path brought back", n.id, n.pushed_again);
        }
    }
    // Every revision, also those a restore lost or the manager forgot since: what reached
    // the manager then reached it.
    let mut history = history(conn)?;
    history.extend(w.lost_history.iter().cloned());
    history.extend(w.manager.seen_history().iter().cloned());
    let in_history: HashSet<&ContentHash> = history
        .iter()
        .filter_map(|(_, v, _, _)| match v.as_ref().map(|v| &v.content) {
            Some(Content::File { hash, .. }) => Some(hash),
            _ => None,
        })
        .collect();
    // Where a node's change of a path may be: there, or in a conflict file of it kept
    // for the node (the change kept as one carries its mode and owner there), also one a
    // database brought back from a copy had kept (seed 42570).
    let paths_kept_at = |c: &crate::Closed| -> anyhow::Result<Vec<String>> {
        let who = format!("n{}", c.node + 1);
        let mut at: Vec<String> = conn
            .prepare_cached("SELECT copy FROM conflicts WHERE path = ?1 AND node = ?2")?
            .query_map([c.path.as_str(), who.as_str()], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        at.extend(w.lost_conflicts.iter().filter(|(p, n, _)| *p == c.path.as_str() && *n == who).map(|(_, _, copy)| copy.clone()));
        at.push(c.path.to_string());
        Ok(at)
    };
    for c in w.closed.iter().filter(|c| !c.superseded) {
        let who = format!("n{}", c.node + 1);
        match &c.made {
            Made::Bytes(hash) => {
                if !in_history.contains(hash) {
                    bail!("lost write: {who} closed {} ({hash}) at step {}, and it never reached the manager", c.path, c.step);
                }
            }
            Made::Mode(mode, base) => {
                // Lost unless it made it, or another node changed the path after the
                // revision the chmod was made on (a concurrent chmod of the same bytes
                // keeps the first one by design). A file or symlink the manager put
                // there is another node's change merged (a chmod made on older bytes,
                // a write over a chmod): decided first, it wins as that node's would
                // (seed 1969); a directory the manager made is no one's change.
                let others = history.iter().any(|(p, v, origin, rev)| {
                    let by_manager = origin.as_str() == NodeId::manager().as_str();
                    *p == c.path.as_str()
                        && *rev > *base as i64
                        && *origin != who
                        && (!by_manager || v.as_ref().is_some_and(|v| !matches!(v.content, Content::Dir)))
                });
                let at = paths_kept_at(c)?;
                let made_it = history.iter().any(|(p, v, _, _)| at.contains(p) && v.as_ref().is_some_and(|v| v.mode & 0o7777 == *mode));
                if !made_it && !others {
                    bail!("lost chmod: {who} set {} to {mode:o} at step {}, and no version of it ever had that mode", c.path, c.step);
                }
            }
            Made::Owner(uid, base) => {
                // Lost unless it made it, or another node changed the owner after the
                // revision the chown was made on (of two concurrent chowns the first
                // decided stays), or removed or replaced what was chowned (a directory
                // replaced by a file: seed 7840). Mode, uid and gid merge one by one: a
                // chmod made elsewhere meanwhile is no excuse. (The state at the base
                // unknown, its row forgotten: any change made elsewhere since is.)
                let owner_and_kind = |v: &Option<Version>| v.as_ref().map(|v| (v.uid, std::mem::discriminant(&v.content)));
                let at_base = history.iter().find(|(p, _, _, rev)| *p == c.path.as_str() && *rev == *base as i64).map(|(_, v, _, _)| owner_and_kind(v));
                let others = history.iter().any(|(p, v, origin, rev)| {
                    *p == c.path.as_str() && *rev > *base as i64 && *origin != who && at_base.is_none_or(|b| b.is_none() || owner_and_kind(v) != b)
                });
                let at = paths_kept_at(c)?;
                let made_it = history.iter().any(|(p, v, _, _)| at.contains(p) && v.as_ref().is_some_and(|v| v.uid == *uid));
                if !made_it && !others {
                    bail!("lost chown: {who} set {} to owner {uid} at step {}, and no version of it ever had that owner", c.path, c.step);
                }
            }
        }
    }

    // A node's own changes are ordered: none may be taken for an edit of a stale version
    // when the newer version is the node's own. (A file put over a directory that got
    // files elsewhere is kept as a conflict file at the current revision: not stale.
    // Nor is a newer version the manager put there as a conflict copy of the node's
    // change of another path: the node made nothing at this path to follow.)
    // (The origin of the current revision from every history row seen: the manager may
    // have forgotten that row since.)
    let origin_of: HashMap<i64, &str> = history.iter().map(|(_, _, origin, rev)| (*rev, origin.as_str())).collect();
    // (Such a version is also one the manager put at a node's own conflict file as the
    // node's later edit of the path the conflict file is of (`rule::Basis::
    // UpdateConflictFile`): bytes the node closed at another path, never at this one.)
    let redirected = |path: &str, node: &str, rev: i64| {
        let Some((_, Some(Version { content: Content::File { hash, .. }, .. }), _, _)) = history.iter().find(|(p, _, _, r)| p == path && *r == rev) else {
            return false;
        };
        let closed_at = |elsewhere: bool| {
            w.closed.iter().any(|c| format!("n{}", c.node + 1) == node && c.made == Made::Bytes(hash.clone()) && (c.path.as_str() != path) == elsewhere)
        };
        closed_at(true) && !closed_at(false)
    };
    let mut st = conn.prepare(
        "SELECT c.path, c.copy, c.node, c.current_rev FROM conflicts c WHERE c.base < c.current_rev
         AND NOT EXISTS (SELECT 1 FROM conflicts k WHERE k.copy = c.path AND k.copy_rev = c.current_rev)",
    )?;
    let own: Vec<(String, String, String)> = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?)))?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|(_, _, node, rev)| origin_of.get(rev) == Some(&node.as_str()))
        .filter(|(path, _, node, rev)| !redirected(path, node, *rev))
        .map(|(path, copy, node, _)| (path, copy, node))
        .collect();
    // (Not after a restore: a change whose decision the manager lost is decided again,
    // maybe otherwise, after the node acted on the first decision.)
    if let Some((path, copy, node)) = own.first().filter(|_| w.stats.restores == 0) {
        bail!("a conflict of {node} with its own change: {path} kept as {copy}");
    }

    let mut copies: BTreeMap<String, usize> = BTreeMap::new();
    for path in manager_view.keys() {
        let name = path.rsplit('/').next().unwrap_or(path);
        let marks = name.matches(manager::rule::CONFLICT_MARK).count();
        if marks > 1 {
            bail!("a conflict file of a conflict file: {path}");
        }
        if marks == 1 {
            let original = path.split(manager::rule::CONFLICT_MARK).next().unwrap_or(path).to_string();
            *copies.entry(original).or_default() += 1;
            w.stats.conflicts += 1;
        }
    }
    if let Some((path, n)) = copies.iter().find(|(_, n)| **n > manager::rule::MAX_CONFLICT_COPIES) {
        bail!("{n} conflict files of {path}, more than the cap");
    }
    Ok(())
}

/// (path, version, origin, rev) of a revision of the manager's history.
pub type HistoryRow = (String, Option<Version>, String, i64);

/// (path, node, copy) of a conflict the manager kept.
pub type ConflictRow = (String, String, String);

/// Every conflict the manager kept, as a conflict file or below a conflict directory.
pub fn conflicts(conn: &rusqlite::Connection) -> anyhow::Result<Vec<ConflictRow>> {
    let mut st = conn.prepare("SELECT path, node, copy FROM conflicts")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Every revision in the manager's history.
pub fn history(conn: &rusqlite::Connection) -> anyhow::Result<Vec<HistoryRow>> {
    history_after(conn, i64::MIN)
}

/// The revisions in the manager's history after `rev`, oldest first.
pub fn history_after(conn: &rusqlite::Connection, rev: i64) -> anyhow::Result<Vec<HistoryRow>> {
    let mut out = Vec::new();
    let mut st = conn.prepare_cached("SELECT path, version, origin, rev FROM history WHERE rev > ?1 ORDER BY rev")?;
    for row in st.query_map([rev], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?)))? {
        let (path, version, origin, at) = row?;
        out.push((path, version.map(|v| serde_json::from_str(&v)).transpose()?, origin, at));
    }
    Ok(out)
}

fn seen_of(v: &Version) -> Seen {
    let (kind, content, target, mtime) = match &v.content {
        Content::File { hash, .. } => (Kind::File, Some(hash.clone()), None, Some(v.mtime_ns)),
        Content::Dir => (Kind::Dir, None, None, None),
        Content::Symlink { target } => (Kind::Symlink, None, Some(target.as_bytes().to_vec()), None),
    };
    Seen { kind, perm: v.mode & 0o7777, uid: v.uid, content, target, mtime }
}

fn diff(node: &BTreeMap<String, Seen>, manager: &BTreeMap<String, Seen>) -> String {
    let mut out = Vec::new();
    for (p, s) in node {
        match manager.get(p) {
            None => out.push(format!("  only on the node: {p} {s:?}")),
            Some(m) if m != s => out.push(format!("  differs: {p}\n    node:    {s:?}\n    manager: {m:?}")),
            _ => {}
        }
    }
    for (p, m) in manager {
        if !node.contains_key(p) {
            out.push(format!("  only on the manager: {p} {m:?}"));
        }
    }
    out.join("\n")
}
