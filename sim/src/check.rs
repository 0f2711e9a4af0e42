//! The invariants, checked once everything has healed and the cluster is quiet:
//!
//! - **Converged**: every node's tree (what a user sees: kinds, permission bits, bytes,
//!   symlink targets) equals the manager's current state, and no node has a change
//!   left undecided.
//! - **Verified bytes**: every file reads back whole, and its bytes hash to the version
//!   the manager holds (the tree equality above compares hashes of the bytes read).
//! - **No lost write**: every version a node's user closed either reached the manager
//!   (it is in the manager's history, as the path's version or as a conflict file) or
//!   was replaced by that same node's later operation on the path (a later write,
//!   truncate, delete or rename of it or of a directory above it). docs/sync.md says
//!   why this is the definition.
//! - **Conflicts**: no conflict file of a conflict file, and never more conflict files
//!   of one path than `MAX_CONFLICT_COPIES`.

use crate::node::{snapshot, Seen};
use crate::World;
use anyhow::{bail, Context};
use fs_node::tree::Kind;
use std::collections::{BTreeMap, HashSet};
use wire::{Content, ContentHash, Version};

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
    }

    let mut in_history: HashSet<ContentHash> = HashSet::new();
    let mut st = conn.prepare("SELECT version FROM history WHERE version IS NOT NULL")?;
    for v in st.query_map([], |r| r.get::<_, String>(0))? {
        if let Content::File { hash, .. } = serde_json::from_str::<Version>(&v?)?.content {
            in_history.insert(hash);
        }
    }
    for c in w.closed.iter().filter(|c| !c.superseded) {
        if !in_history.contains(&c.hash) {
            bail!("lost write: n{} closed {} ({}) at step {}, and it never reached the manager", c.node + 1, c.path, c.hash, c.step);
        }
    }

    let mut copies: BTreeMap<String, usize> = BTreeMap::new();
    for path in manager_view.keys() {
        let name = path.rsplit('/').next().unwrap_or(path);
        let marks = name.matches(" (conflict from ").count();
        if marks > 1 {
            bail!("a conflict file of a conflict file: {path}");
        }
        if marks == 1 {
            let original = path.split(" (conflict from ").next().unwrap_or(path).to_string();
            *copies.entry(original).or_default() += 1;
            w.stats.conflicts += 1;
        }
    }
    if let Some((path, n)) = copies.iter().find(|(_, n)| **n > manager::rule::MAX_CONFLICT_COPIES) {
        bail!("{n} conflict files of {path}, more than the cap");
    }
    Ok(())
}

fn seen_of(v: &Version) -> Seen {
    let (kind, content, target) = match &v.content {
        Content::File { hash, .. } => (Kind::File, Some(hash.clone()), None),
        Content::Dir => (Kind::Dir, None, None),
        Content::Symlink { target } => (Kind::Symlink, None, Some(target.as_bytes().to_vec())),
    };
    Seen { kind, perm: v.mode & 0o7777, content, target }
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
