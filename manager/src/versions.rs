//! Kept versions and the trash (docs/versions.md): which old versions the manager keeps,
//! which nodes keep their contents, and restores.
//!
//! Every version that stops being current (overwritten, deleted, or a put refused at the
//! conflict-file cap) becomes a *kept version*: its history row is marked `kept` until
//! the retention ends (by age, and by count per path). Its content (files) is kept by up
//! to `copies` nodes that held it, asked with `ToNode::Keep` before the broadcast that
//! makes it old; they confirm with `ToManager::Kept`, and say so there when they lack it
//! or drop it (their disk is full), and the manager asks another node to fetch it from a
//! keeper that still has it. When no kept version needs a content any more, its keepers
//! are told to `Release` it. A version is *available* only while a node that confirmed
//! keeping it (or holds it as current) is online: nothing is listed as restorable that no
//! one could hand over.
//!
//! A restore is made by the manager as new revisions of the restored paths, held by the
//! keepers, so every node fetches them from there. It never overwrites a newer edit: a
//! path that changed since the asker saw it gets the restored version beside it.

use crate::rule;
use crate::store::{json, parse_version, Tx, OFFLINE_AFTER_MS};
use anyhow::Context;
use rusqlite::{params, OptionalExtension};
use std::collections::BTreeMap;
use wire::{
    topology, Answer, Content, ContentHash, Holder, KeepItem, NodeId, Outcome, Query, RelPath, RestoreReport, Revision, ToNode, TrashItem, Version,
    VersionInfo, MAX_KEEP_ITEMS, MAX_LISTED,
};

/// How long, how many and in how many copies old versions are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// A version is kept this long after it stopped being current.
    pub keep_for_ms: i64,
    /// At most this many old versions of one path are kept (0: no limit but time).
    pub keep_versions: u32,
    /// Nodes asked to keep each content (where the cluster has them); 0 keeps nothing.
    pub copies: u32,
    /// A decided change's record (`applied`: its id and outcome, for answering a repeat)
    /// is kept at least this long, and then until its sender can no longer send it again
    /// (`Tx::forget_settled_decisions`).
    pub remember_decisions_ms: i64,
    /// A node not heard of for this long is forgotten as by `manager node forget`
    /// (`Tx::forget_silent_nodes`); 0: never (the default).
    pub forget_nodes_ms: i64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { keep_for_ms: 30 * 24 * 3600 * 1000, keep_versions: 0, copies: 2, remember_decisions_ms: 30 * 24 * 3600 * 1000, forget_nodes_ms: 0 }
    }
}

/// History rows forgotten at most per call of [`Tx::expire_versions`] (once a second).
const FORGET_HISTORY_BATCH: i64 = 2_000;

/// Most bytes of one answer to a node (a quarter of the broker's message limit).
pub const ANSWER_BYTES: usize = wire::BROKER_MAX_MESSAGE_BYTES / 4;

/// A reason within the wire's bound (reasons name paths, which may be 4 KB long).
fn bounded_reason(mut reason: String) -> String {
    if reason.len() > wire::MAX_REASON_BYTES {
        let mut cut = wire::MAX_REASON_BYTES - 3;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push_str("...");
    }
    reason
}

/// The range of paths strictly below `p`: `p/` ≤ path < `p0` (`'0'` follows `'/'`).
/// The most paths one restore brings back: it is one transaction in the manager's
/// broker loop, with its plan in memory, asked by any node.
const MAX_RESTORE_PATHS: usize = 100_000;

fn below(p: &RelPath) -> (String, String) {
    (format!("{p}/"), format!("{p}0"))
}

fn file_content(v: &Version) -> Option<(&ContentHash, u64)> {
    match &v.content {
        Content::File { hash, size } if *size > 0 => Some((hash, *size)),
        _ => None,
    }
}

impl Tx<'_> {
    fn online_since(&self, now_ms: i64) -> i64 {
        now_ms - OFFLINE_AFTER_MS
    }

    /// The path's current version stops being current (a new one replaces it, or it is
    /// deleted): it becomes a kept version, and nodes that hold its content are asked to
    /// keep it. `by` made the change that replaces it: it is asked last, since its own
    /// copy may be gone already (it changed the file first).
    pub(crate) fn end_current(&mut self, path: &RelPath, by: &NodeId, now_ms: i64) -> anyhow::Result<()> {
        let row: Option<(i64, Option<String>)> =
            self.tx.prepare_cached("SELECT rev, version FROM paths WHERE path = ?1")?.query_row([path.as_str()], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
        let Some((rev, version)) = row else { return Ok(()) };
        let Some(version) = version else {
            // A delete stops being current: its row ends too (it goes when its retention
            // is over, `expire_versions`).
            self.tx.prepare_cached("UPDATE history SET ended_ms = ?2 WHERE rev = ?1")?.execute(params![rev, now_ms])?;
            return Ok(());
        };
        let version = parse_version(Some(version))?.expect("some");
        let keep = self.retention.copies > 0;
        self.tx.prepare_cached("UPDATE history SET ended_ms = ?2, kept = ?3 WHERE rev = ?1")?.execute(params![rev, now_ms, keep])?;
        if !keep {
            // Nothing is kept any more (`copies` set to 0 since): bytes kept while they
            // were still current go now that they are not.
            if let Some((hash, _)) = file_content(&version) {
                self.release_unkept(vec![(path.to_string(), hash.to_hex().to_string())], now_ms)?;
            }
            return Ok(());
        }
        if let Some((hash, size)) = file_content(&version) {
            let candidates: Vec<String> = self
                .tx
                .prepare_cached(
                    "SELECT h.node FROM holders h JOIN nodes n ON n.id = h.node WHERE h.path = ?1 AND h.rev = ?2
                     ORDER BY h.node = ?3, n.online DESC, h.rowid",
                )?
                .query_map(params![path.as_str(), rev, by.as_str()], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            self.keep_content(hash, size, &candidates, &[], now_ms)?;
        }
        self.prune_by_count(path, now_ms)
    }

    /// Makes sure `copies` nodes keep `hash` (those that do already count), asking the
    /// first `candidates` that do not, in order; `sources`: where they fetch it from
    /// (empty: they hold it). Keepers already asked hear the new end of the retention.
    fn keep_content(&mut self, hash: &ContentHash, size: u64, candidates: &[String], sources: &[Holder], now_ms: i64) -> anyhow::Result<()> {
        let hex = hash.to_hex();
        let keepers: Vec<String> =
            self.tx.prepare_cached("SELECT node FROM kept WHERE hash = ?1")?.query_map([hex.as_str()], |r| r.get(0))?.collect::<Result<_, _>>()?;
        let until_ms = now_ms.saturating_add(self.retention.keep_for_ms);
        let item = |holders: &[Holder]| KeepItem { hash: hash.clone(), size, until_ms, holders: holders.to_vec() };
        for node in &keepers {
            self.enqueue_to(node, ToNode::Keep { items: vec![item(&[])] })?;
        }
        let want = (self.retention.copies as usize).saturating_sub(keepers.len());
        for node in candidates.iter().filter(|c| !keepers.contains(c)).take(want) {
            self.tx.prepare_cached("INSERT INTO kept(hash, node, size, confirmed) VALUES(?1, ?2, ?3, 0)")?.execute(params![hex.as_str(), node, size as i64])?;
            self.enqueue_to(node, ToNode::Keep { items: vec![item(sources)] })?;
        }
        Ok(())
    }

    /// Asks `node` again to keep every content the manager counts it as keeping, with
    /// the end of each one's retention; its `kept` answer confirms them or names what
    /// it lacks (which another node is then asked to keep).
    pub(crate) fn ask_to_keep_again(&mut self, node: &NodeId) -> anyhow::Result<()> {
        let rows: Vec<(String, i64, Option<i64>)> = self
            .tx
            .prepare_cached(
                "SELECT k.hash, k.size, (SELECT max(h.ended_ms) FROM history h INDEXED BY history_kept_by_hash WHERE h.hash = k.hash AND h.kept = 1)
                 FROM kept k WHERE k.node = ?1",
            )?
            .query_map([node.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let items: Vec<KeepItem> = rows
            .into_iter()
            .filter_map(|(hash, size, ended)| {
                Some(KeepItem { hash: hash.parse().ok()?, size: size as u64, until_ms: ended?.saturating_add(self.retention.keep_for_ms), holders: vec![] })
            })
            .collect();
        for chunk in items.chunks(MAX_KEEP_ITEMS) {
            self.enqueue(&topology::node_key(node), ToNode::Keep { items: chunk.to_vec() })?;
        }
        Ok(())
    }

    fn enqueue_to(&mut self, node: &str, body: ToNode) -> anyhow::Result<()> {
        let node: NodeId = node.parse().context("corrupt node id in the manager database")?;
        self.enqueue(&topology::node_key(&node), body)
    }

    /// Keeps only the newest `keep_versions` old versions of `path`.
    fn prune_by_count(&mut self, path: &RelPath, now_ms: i64) -> anyhow::Result<()> {
        if self.retention.keep_versions == 0 {
            return Ok(());
        }
        let old: Vec<(i64, Option<String>)> = self
            .tx
            .prepare_cached("SELECT rev, hash FROM history INDEXED BY history_kept_by_path WHERE path = ?1 AND kept = 1 ORDER BY rev DESC LIMIT -1 OFFSET ?2")?
            .query_map(params![path.as_str(), self.retention.keep_versions], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (rev, _) in &old {
            self.tx.prepare_cached("UPDATE history SET kept = 0 WHERE rev = ?1")?.execute([rev])?;
        }
        self.release_unkept(old.into_iter().filter_map(|(_, h)| Some((path.to_string(), h?))).collect(), now_ms)
    }

    /// Ends the versions whose retention ran out; returns how many. Their contents are
    /// released where no kept version needs them any more. History rows of states that
    /// ended before the retention (kept no more) are forgotten, [`FORGET_HISTORY_BATCH`]
    /// at a time: every path's current row stays, so the paths changed since any
    /// revision (a sync's catch-up form) are still all there.
    pub fn expire_versions(&mut self, now_ms: i64) -> anyhow::Result<usize> {
        let cutoff = now_ms.saturating_sub(self.retention.keep_for_ms);
        let ended: Vec<(String, Option<String>)> = self
            .tx
            .prepare_cached("SELECT path, hash FROM history INDEXED BY history_kept_by_end WHERE kept = 1 AND ended_ms < ?1")?
            .query_map([cutoff], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let n = ended.len();
        if n > 0 {
            self.tx.prepare_cached("UPDATE history SET kept = 0 WHERE kept = 1 AND ended_ms < ?1")?.execute([cutoff])?;
            self.release_unkept(ended.into_iter().filter_map(|(path, h)| Some((path, h?))).collect(), now_ms)?;
            tracing::info!("{n} kept version(s) reached the end of their retention");
        }
        // Ended first, gone first: a path's rows go oldest first (its states end in
        // order), so what is left of a path's history is never older than a gap.
        let forgotten = self
            .tx
            .prepare_cached(
                "DELETE FROM history WHERE rev IN (
                   SELECT h.rev FROM history h INDEXED BY history_ended
                   WHERE h.kept = 0 AND h.ended_ms IS NOT NULL AND h.ended_ms < ?1
                     AND NOT EXISTS (SELECT 1 FROM paths p WHERE p.path = h.path AND p.rev = h.rev)
                   ORDER BY h.ended_ms LIMIT ?2)",
            )?
            .execute(params![cutoff, FORGET_HISTORY_BATCH])?;
        if forgotten > 0 {
            tracing::debug!(forgotten, "forgot history rows past the retention");
        }
        Ok(n)
    }

    /// Tells the keepers of the content of each of `ended` (kept versions no more: their
    /// path and content) that no kept version needs it, if none does and it is not the
    /// current content of that path. Such a content stays kept, its keepers told its
    /// retention begins again: a chmod, chown or touch made elsewhere (or the manager's
    /// merge of one) made a new current version of the same bytes, and its keepers may be
    /// the only nodes that still have them: the node that wrote them may have written over
    /// them since, in a change yet to be decided, which may become a conflict file while
    /// the path keeps these bytes (simulator seed 2076).
    fn release_unkept(&mut self, ended: Vec<(String, String)>, now_ms: i64) -> anyhow::Result<()> {
        let mut paths_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (path, h) in ended {
            paths_of.entry(h).or_default().push(path);
        }
        let mut released: BTreeMap<String, Vec<ContentHash>> = BTreeMap::new();
        let mut renewed: BTreeMap<String, Vec<KeepItem>> = BTreeMap::new();
        let until_ms = now_ms.saturating_add(self.retention.keep_for_ms);
        for (h, paths) in paths_of {
            let needed =
                self.tx.prepare_cached("SELECT 1 FROM history WHERE hash = ?1 AND kept = 1 LIMIT 1")?.query_row([&h], |_| Ok(())).optional()?.is_some();
            if needed {
                continue;
            }
            let mut still_current = false;
            for path in &paths {
                let mut current = self.tx.prepare_cached("SELECT 1 FROM paths p JOIN history h ON h.rev = p.rev WHERE p.path = ?1 AND h.hash = ?2")?;
                if current.query_row([path, &h], |_| Ok(())).optional()?.is_some() {
                    still_current = true;
                    break;
                }
            }
            let hash: ContentHash = h.parse().context("corrupt hash in the manager database")?;
            if still_current {
                let keepers: Vec<(String, i64)> = self
                    .tx
                    .prepare_cached("SELECT node, size FROM kept WHERE hash = ?1")?
                    .query_map([&h], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                for (node, size) in keepers {
                    renewed.entry(node).or_default().push(KeepItem { hash: hash.clone(), size: size as u64, until_ms, holders: vec![] });
                }
                continue;
            }
            let nodes: Vec<String> =
                self.tx.prepare_cached("DELETE FROM kept WHERE hash = ?1 RETURNING node")?.query_map([&h], |r| r.get(0))?.collect::<Result<_, _>>()?;
            for n in nodes {
                released.entry(n).or_default().push(hash.clone());
            }
        }
        for (node, hashes) in released {
            for chunk in hashes.chunks(MAX_KEEP_ITEMS) {
                self.enqueue_to(&node, ToNode::Release { hashes: chunk.to_vec() })?;
            }
        }
        for (node, items) in renewed {
            for chunk in items.chunks(MAX_KEEP_ITEMS) {
                self.enqueue_to(&node, ToNode::Keep { items: chunk.to_vec() })?;
            }
        }
        Ok(())
    }

    /// A node's report on what it keeps: confirmations, and contents it lacks or dropped
    /// (another node is asked to fetch those from a keeper that has them).
    pub(crate) fn kept_report(&mut self, node: &NodeId, keeping: &[ContentHash], lacking: &[ContentHash], now_ms: i64) -> anyhow::Result<()> {
        for h in keeping {
            self.tx.prepare_cached("UPDATE kept SET confirmed = 1 WHERE hash = ?1 AND node = ?2")?.execute(params![h.to_hex().as_str(), node.as_str()])?;
        }
        for h in lacking {
            let hex = h.to_hex();
            let size: Option<i64> = self
                .tx
                .prepare_cached("DELETE FROM kept WHERE hash = ?1 AND node = ?2 RETURNING size")?
                .query_row(params![hex.as_str(), node.as_str()], |r| r.get(0))
                .optional()?;
            let Some(size) = size else { continue };
            tracing::warn!(%node, hash = %h, "a node does not keep a kept version's content (it lacks it or dropped it)");
            let needed = self
                .tx
                .prepare_cached("SELECT 1 FROM history WHERE hash = ?1 AND kept = 1 LIMIT 1")?
                .query_row([hex.as_str()], |_| Ok(()))
                .optional()?
                .is_some();
            if !needed {
                continue;
            }
            let sources = self.online_keepers(h, now_ms)?;
            if sources.is_empty() {
                tracing::warn!(hash = %h, "no online node keeps this content any more: its versions are unavailable");
                continue;
            }
            let candidates: Vec<String> = self
                .tx
                .prepare_cached(
                    "SELECT id FROM nodes WHERE online = 1 AND last_seen_ms >= ?1 AND id != ?2
                     AND id NOT IN (SELECT node FROM kept WHERE hash = ?3) ORDER BY last_seen_ms DESC",
                )?
                .query_map(params![self.online_since(now_ms), node.as_str(), hex.as_str()], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            self.keep_content(h, size as u64, &candidates, &sources, now_ms)?;
        }
        Ok(())
    }

    /// Nodes that confirmed they keep `hash`, each with whether it is online, online
    /// ones first.
    fn keepers(&self, hash: &ContentHash, now_ms: i64) -> anyhow::Result<Vec<(Holder, bool)>> {
        let rows: Vec<(String, String, bool)> = self
            .tx
            .prepare_cached(
                "SELECT k.node, n.url, n.online = 1 AND n.last_seen_ms >= ?2 AS up FROM kept k JOIN nodes n ON n.id = k.node
                 WHERE k.hash = ?1 AND k.confirmed = 1 ORDER BY up DESC, n.last_seen_ms DESC",
            )?
            .query_map(params![hash.to_hex().as_str(), self.online_since(now_ms)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows.into_iter().filter_map(|(node, url, up)| Some((Holder { node: node.parse().ok()?, url }, up))).collect())
    }

    /// [`Tx::keepers`] that are online.
    fn online_keepers(&self, hash: &ContentHash, now_ms: i64) -> anyhow::Result<Vec<Holder>> {
        Ok(self.keepers(hash, now_ms)?.into_iter().filter(|(_, up)| *up).map(|(h, _)| h).collect())
    }

    /// Online nodes holding `path`'s current content at `rev`.
    fn online_holders(&self, path: &str, rev: i64, now_ms: i64) -> anyhow::Result<Vec<NodeId>> {
        let rows: Vec<String> = self
            .tx
            .prepare_cached(
                "SELECT h.node FROM holders h JOIN nodes n ON n.id = h.node WHERE h.path = ?1 AND h.rev = ?2 AND n.online = 1 AND n.last_seen_ms >= ?3",
            )?
            .query_map(params![path, rev, self.online_since(now_ms)], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(rows.into_iter().filter_map(|n| n.parse().ok()).collect())
    }

    /// A put refused at the conflict-file cap: kept as a version of `path` (a revision of
    /// its own that never becomes current), its content kept by the sender.
    pub(crate) fn keep_refused(&mut self, path: &RelPath, version: &Version, from: &NodeId, why: &str, now_ms: i64) -> anyhow::Result<Outcome> {
        let rev = self.next_rev()?;
        let hash = file_content(version).map(|(h, _)| h.to_hex());
        self.tx
            .prepare_cached("INSERT INTO history(rev, path, version, origin, at_ms, hash, ended_ms, kept, refused) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?5, 1, 1)")?
            .execute(params![rev.0 as i64, path.as_str(), json(version), from.as_str(), now_ms, hash.as_ref().map(|h| h.as_str())])?;
        if let Some((hash, size)) = file_content(version) {
            self.keep_content(hash, size, &[from.to_string()], &[], now_ms)?;
        }
        // The path is not in the reason: it may be 4 KB long, and a reason is bounded.
        let reason = format!("{why}; this version is kept as revision {} of the path (`syncctl restore PATH --rev {}` brings it back)", rev.0, rev.0);
        tracing::warn!(%path, node = %from, %reason, "change refused");
        Ok(Outcome::Refused { reason })
    }

    /// Whether `from` may drop its copy of `item`'s content (`Query::MayDrop`): yes when
    /// the path's current content is another, or another node holds it too (then `from`
    /// is no longer counted as a holder: nobody is sent to it for this content).
    fn may_drop(&mut self, item: &wire::Held, from: &NodeId) -> anyhow::Result<bool> {
        let e = self.entry_or_absent(&item.path)?;
        let current = matches!(&e.version, Some(wire::Version { content: Content::File { hash, .. }, .. }) if *hash == item.hash);
        if !current {
            return Ok(true);
        }
        if !e.holders.iter().any(|h| h.node != *from) {
            return Ok(false);
        }
        self.drop_holder(&item.path, from)?;
        Ok(true)
    }

    /// Answers a node's question, within [`ANSWER_BYTES`]: the longest lists are cut
    /// (the newest versions and trash items are kept; a restore report's lists keep
    /// their first paths and say how many were left out).
    pub fn answer(&mut self, query: &Query, from: &NodeId, now_ms: i64) -> anyhow::Result<Answer> {
        let mut answer = match query {
            Query::Versions { path } => Answer::Versions { path: path.clone(), versions: self.versions(path, now_ms)? },
            Query::Trash { dir } => Answer::Trash { items: self.trash(dir.as_ref(), now_ms)? },
            Query::Restore { path, rev, to, base } => match self.restore(path, *rev, to.as_ref(), *base, from, now_ms)? {
                Ok(report) => Answer::Restored(report),
                Err(reason) => Answer::Failed { reason: bounded_reason(reason) },
            },
            Query::MayDrop { items } => Answer::MayDrop { droppable: items.iter().map(|i| self.may_drop(i, from)).collect::<anyhow::Result<_>>()? },
            Query::Holders { path } => {
                let e = self.entry_or_absent(path)?;
                match e.version.map(|v| v.content) {
                    Some(Content::File { hash, .. }) => Answer::Holders { path: path.clone(), hash: Some(hash), holders: e.holders },
                    _ => Answer::Holders { path: path.clone(), hash: None, holders: Vec::new() },
                }
            }
        };
        while serde_json::to_vec(&answer).map_or(0, |v| v.len()) > ANSWER_BYTES {
            let cut = match &mut answer {
                Answer::Versions { versions, .. } => versions.pop().is_some(),
                Answer::Trash { items } => items.pop().is_some(),
                Answer::Restored(r) => {
                    let longest = [r.restored.len(), r.beside.len(), r.unavailable.len()].into_iter().max().unwrap_or(0);
                    let keep = longest / 2;
                    let before = r.restored.len() + r.beside.len() + r.unavailable.len();
                    r.restored.truncate(keep);
                    r.beside.truncate(keep);
                    r.unavailable.truncate(keep);
                    r.left_out += (before - r.restored.len() - r.beside.len() - r.unavailable.len()) as u64;
                    longest > 0
                }
                Answer::Holders { holders, .. } => holders.pop().is_some(),
                Answer::MayDrop { .. } => false,
                Answer::Failed { .. } => false,
            };
            if !cut {
                break;
            }
        }
        Ok(answer)
    }

    /// The path's current state and kept versions, newest first.
    pub fn versions(&self, path: &RelPath, now_ms: i64) -> anyhow::Result<Vec<VersionInfo>> {
        let current: Option<i64> = self.tx.prepare_cached("SELECT rev FROM paths WHERE path = ?1")?.query_row([path.as_str()], |r| r.get(0)).optional()?;
        let cutoff = now_ms.saturating_sub(self.retention.keep_for_ms);
        let rows: Vec<(i64, Option<String>, String, i64, Option<i64>, bool, bool)> = self
            .tx
            .prepare_cached(&format!(
                "SELECT rev, version, origin, at_ms, ended_ms, kept, refused FROM history WHERE path = ?1
                 AND (rev = ?2 OR kept = 1 OR (version IS NULL AND at_ms >= ?3)) ORDER BY rev DESC LIMIT {MAX_LISTED}"
            ))?
            .query_map(params![path.as_str(), current.unwrap_or(-1), cutoff], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
            })?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for (rev, version, origin, at_ms, ended_ms, _kept, refused) in rows {
            let version = parse_version(version)?;
            let is_current = Some(rev) == current;
            let (available, keepers) = match version.as_ref().and_then(file_content) {
                None => (version.is_some(), Vec::new()),
                Some((hash, _)) => {
                    let all = self.keepers(hash, now_ms)?;
                    let online = all.iter().any(|(_, up)| *up) || (is_current && !self.online_holders(path.as_str(), rev, now_ms)?.is_empty());
                    let keepers: Vec<NodeId> = all.into_iter().map(|(h, _)| h.node).collect();
                    (online, keepers)
                }
            };
            out.push(VersionInfo {
                rev: Revision(rev as u64),
                version,
                node: origin.parse().unwrap_or_else(|_| NodeId::manager()),
                at_ms,
                ended_ms: if is_current { None } else { ended_ms.or(Some(at_ms)) },
                refused,
                available,
                keepers,
            });
        }
        Ok(out)
    }

    /// Deleted paths at or below `dir` whose parent is still there, deleted within the
    /// retention, newest first.
    pub fn trash(&self, dir: Option<&RelPath>, now_ms: i64) -> anyhow::Result<Vec<TrashItem>> {
        let cutoff = now_ms.saturating_sub(self.retention.keep_for_ms);
        let (lo, hi) = match dir {
            Some(d) => below(d),
            None => (String::new(), "\u{10FFFF}".to_string()),
        };
        let rows: Vec<(String, i64, i64, String)> = self
            .tx
            .prepare_cached(
                // Newest deletes first, through the index of deleted paths; a bounded
                // number of candidates (most are below a deleted directory, not roots).
                "SELECT p.path, p.rev, h.at_ms, h.origin FROM paths p INDEXED BY paths_deleted JOIN history h ON h.rev = p.rev
                 WHERE p.version IS NULL AND h.at_ms >= ?1 AND p.path >= ?2 AND p.path < ?3 ORDER BY p.rev DESC LIMIT 20000",
            )?
            .query_map(params![cutoff, lo, hi], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for (path, rev, at_ms, origin) in rows {
            if out.len() >= MAX_LISTED {
                break;
            }
            let path = RelPath::new(path).context("corrupt path in the manager database")?;
            if let Some(parent) = path.parent() {
                if self.live_version(&parent)?.is_none() {
                    continue;
                }
            }
            let Ok(restore_rev) = self.default_restore_rev(&path)? else { continue };
            // What it was then, and how many paths below it a restore brings back (counted
            // in SQL: a removed tree may be large, and the list is asked for often).
            let top: Option<Option<String>> = self
                .tx
                .prepare_cached("SELECT version FROM history WHERE path = ?1 AND rev <= ?2 AND refused = 0 ORDER BY rev DESC LIMIT 1")?
                .query_row(params![path.as_str(), restore_rev.0 as i64], |r| r.get(0))
                .optional()?;
            let Some(version) = parse_version(top.flatten())? else { continue };
            let (lo, hi) = below(&path);
            let below_count: i64 = self
                .tx
                .prepare_cached(
                    "SELECT count(*) FROM (SELECT path, max(rev), version FROM history INDEXED BY history_by_path
                     WHERE path >= ?1 AND path < ?2 AND rev <= ?3 AND refused = 0 GROUP BY path LIMIT 100000) WHERE version IS NOT NULL",
                )?
                .query_row(params![lo, hi, restore_rev.0 as i64], |r| r.get(0))?;
            out.push(TrashItem {
                path: path.clone(),
                deleted_rev: Revision(rev as u64),
                deleted_ms: at_ms,
                deleted_by: origin.parse().unwrap_or_else(|_| NodeId::manager()),
                restore_rev,
                version,
                below: below_count as u64,
            });
        }
        Ok(out)
    }

    /// The revision a restore of `path` takes when none is named: for a deleted path, the
    /// last one at which it (and everything below it) was still there; for a file or
    /// symlink, its newest kept version before the current one.
    fn default_restore_rev(&self, path: &RelPath) -> anyhow::Result<Result<Revision, String>> {
        let cur: Option<(i64, Option<String>)> =
            self.tx.prepare_cached("SELECT rev, version FROM paths WHERE path = ?1")?.query_row([path.as_str()], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
        let found: Option<i64> = match cur {
            None => return Ok(Err(format!("{path}: the manager has never had this path"))),
            Some((deleted_at, None)) => {
                let (lo, hi) = below(path);
                self.tx
                    .prepare_cached(
                        "SELECT max(rev) FROM history INDEXED BY history_by_path
                         WHERE (path = ?1 OR (path >= ?2 AND path < ?3)) AND rev < ?4 AND version IS NOT NULL AND refused = 0",
                    )?
                    .query_row(params![path.as_str(), lo, hi, deleted_at], |r| r.get(0))?
            }
            Some((rev, Some(v))) => {
                if matches!(parse_version(Some(v))?, Some(Version { content: Content::Dir, .. })) {
                    return Ok(Err(format!("{path} is a directory that exists: name the revision to restore it as of (--rev)")));
                }
                self.tx
                    .prepare_cached("SELECT max(rev) FROM history WHERE path = ?1 AND rev < ?2 AND version IS NOT NULL AND kept = 1")?
                    .query_row(params![path.as_str(), rev], |r| r.get(0))?
            }
        };
        Ok(found.map(|r| Revision(r as u64)).ok_or_else(|| format!("{path}: no earlier version is kept")))
    }

    /// What `path` and everything below it were as of revision `rev`, parents first, if
    /// that is at most `most` paths (else why not). A refused version (never current) is
    /// named by its own revision alone.
    fn restore_plan(&self, path: &RelPath, rev: Revision, most: usize) -> anyhow::Result<Result<Vec<Planned>, String>> {
        let refused: Option<(String, Option<String>, bool)> = self
            .tx
            .prepare_cached("SELECT path, version, kept FROM history WHERE rev = ?1 AND refused = 1")?
            .query_row([rev.0 as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        if let Some((p, version, kept)) = refused {
            return Ok(Ok(match parse_version(version)? {
                Some(version) if p == path.as_str() => vec![Planned { path: path.clone(), rev, version, kept }],
                _ => Vec::new(),
            }));
        }
        let (lo, hi) = below(path);
        let rows: Vec<(String, i64, Option<String>, bool)> = self
            .tx
            .prepare_cached(
                "SELECT path, max(rev), version, kept FROM history WHERE (path = ?1 OR (path >= ?2 AND path < ?3)) AND rev <= ?4 AND refused = 0
                 GROUP BY path ORDER BY path LIMIT ?5",
            )?
            .query_map(params![path.as_str(), lo, hi, rev.0 as i64, most.saturating_add(1) as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?;
        if rows.len() > most {
            return Ok(Err(format!("{path} held more than {most} paths as of revision {}: restore the directories below it one at a time", rev.0)));
        }
        let mut out = Vec::new();
        for (p, r, version, kept) in rows {
            if let Some(version) = parse_version(version)? {
                out.push(Planned { path: RelPath::new(p).context("corrupt path in the manager database")?, rev: Revision(r as u64), version, kept });
            }
        }
        Ok(Ok(out))
    }

    /// Restores `path` (and what was below it) as of `rev` at `to` (see the module doc).
    /// `Err` says why nothing could be restored.
    pub fn restore(
        &mut self,
        path: &RelPath,
        rev: Option<Revision>,
        to: Option<&RelPath>,
        base: Option<Revision>,
        by: &NodeId,
        now_ms: i64,
    ) -> anyhow::Result<Result<RestoreReport, String>> {
        let from_rev = match rev {
            Some(r) => r,
            None => match self.default_restore_rev(path)? {
                Ok(r) => r,
                Err(e) => return Ok(Err(e)),
            },
        };
        if let Some(to) = to.filter(|to| *to != path && to.is_within(path)) {
            // Each such restore would copy the tree into itself (as `cp -r d d/c`
            // refuses to): repeated, it doubles the tree every time.
            return Ok(Err(format!("{path} cannot be restored into {to}, which is below it")));
        }
        let plan = match self.restore_plan(path, from_rev, MAX_RESTORE_PATHS)? {
            Ok(plan) => plan,
            Err(e) => return Ok(Err(e)),
        };
        if plan.is_empty() {
            return Ok(Err(format!("{path} did not exist as of revision {}", from_rev.0)));
        }
        let mut report = RestoreReport { from_rev, ..Default::default() };
        // Directories put beside a path that is not a directory now: what was below them
        // goes below the copy.
        let mut moved: Vec<(RelPath, RelPath)> = Vec::new();
        for item in plan {
            let mut target = match to {
                Some(to) => rebase(&item.path, path, to),
                None => Some(item.path.clone()),
            };
            if let Some(t) = &target {
                if let Some((from, onto)) = moved.iter().find(|(from, _)| t.as_str().starts_with(&format!("{from}/"))) {
                    target = rebase(t, from, onto);
                }
            }
            let Some(target) = target else {
                report.unavailable.push(item.path.clone());
                continue;
            };
            let mut holders = Vec::new();
            if let Some((hash, _)) = file_content(&item.version) {
                holders = self.online_keepers(hash, now_ms)?.into_iter().map(|h| h.node).collect();
                let current: Option<i64> =
                    self.tx.prepare_cached("SELECT rev FROM paths WHERE path = ?1")?.query_row([item.path.as_str()], |r| r.get(0)).optional()?;
                if current == Some(item.rev.0 as i64) {
                    holders.extend(self.online_holders(item.path.as_str(), item.rev.0 as i64, now_ms)?);
                }
                if holders.is_empty() || (!item.kept && current != Some(item.rev.0 as i64)) {
                    report.unavailable.push(target);
                    continue;
                }
            }
            let live = self.live_version(&target)?;
            let place = match &live {
                None => Some(target.clone()),
                Some(v) if *v == item.version => {
                    report.restored.push(target);
                    continue;
                }
                Some(Version { content: Content::Dir, .. }) if matches!(item.version.content, Content::Dir) => {
                    report.restored.push(target);
                    continue;
                }
                Some(_) => {
                    let cur_rev = self.tx.prepare_cached("SELECT rev FROM paths WHERE path = ?1")?.query_row([target.as_str()], |r| r.get::<_, i64>(0))?;
                    let seen = target == item.path && to.is_none() && item.path == *path && base == Some(Revision(cur_rev as u64));
                    let both_files = !matches!(item.version.content, Content::Dir) && !matches!(live, Some(Version { content: Content::Dir, .. }));
                    if seen && both_files {
                        Some(target.clone())
                    } else {
                        let next = self.head_rev()?.next();
                        let mut free = None;
                        for c in rule::restored_candidates(&target, from_rev, next) {
                            if self.live_version(&c)?.is_none() {
                                free = Some(c);
                                break;
                            }
                        }
                        if let (Some(c), Content::Dir) = (&free, &item.version.content) {
                            moved.push((target.clone(), c.clone()));
                        }
                        match free {
                            Some(c) => {
                                report.beside.push((target.clone(), c.clone()));
                                Some(c)
                            }
                            None => None,
                        }
                    }
                }
            };
            let Some(place) = place else {
                report.unavailable.push(target);
                continue;
            };
            if self.first_non_dir_ancestor(&place)?.is_some() {
                report.unavailable.push(place);
                continue;
            }
            self.restore_ancestors(&place, now_ms)?;
            self.set_held(&place, Some(&item.version), by, &holders, now_ms)?;
            if place == target {
                report.restored.push(place);
            }
        }
        tracing::info!(%path, from_rev = from_rev.0, node = %by, restored = report.restored.len(), beside = report.beside.len(), unavailable = report.unavailable.len(), "restored");
        Ok(Ok(report))
    }

    fn head_rev(&self) -> anyhow::Result<Revision> {
        let v: Option<i64> = self.tx.prepare_cached("SELECT value FROM meta WHERE key='head'")?.query_row([], |r| r.get(0)).optional()?;
        Ok(Revision(v.unwrap_or(0) as u64))
    }
}

/// One path of a restore: its version as of the restore's revision.
struct Planned {
    path: RelPath,
    rev: Revision,
    version: Version,
    kept: bool,
}

/// `p` (which is `from` or below it) moved to `onto`.
fn rebase(p: &RelPath, from: &RelPath, onto: &RelPath) -> Option<RelPath> {
    if p == from {
        return Some(onto.clone());
    }
    let rest = p.as_str().strip_prefix(&format!("{from}/"))?;
    RelPath::new(format!("{onto}/{rest}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use wire::{Change, ChangeOp, Envelope, Held, ToManager};

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }
    fn node(s: &str) -> NodeId {
        s.parse().unwrap()
    }
    fn file(h: u8, mode: u32) -> Version {
        Version { content: Content::File { hash: ContentHash::from_bytes([h; 32]), size: 100 + h as u64 }, mode, uid: 0, gid: 0, mtime_ns: h as i64 * 1000 }
    }
    fn dir() -> Version {
        Version { content: Content::Dir, mode: 0o750, uid: 0, gid: 0, mtime_ns: 77 }
    }

    /// A manager store with nodes and a clock of its own.
    struct Cluster {
        _dir: tempfile::TempDir,
        s: Store,
        now: i64,
        ids: u32,
    }

    impl Cluster {
        /// A manager with `nodes` online.
        fn new(retention: Retention, nodes: &[&str]) -> Cluster {
            let dir = tempfile::tempdir().unwrap();
            let mut s = Store::open(&dir.path().join("m.db")).unwrap();
            s.set_retention(retention);
            let mut c = Cluster { _dir: dir, s, now: 1_000_000, ids: 0 };
            for n in nodes {
                c.heartbeat(n);
            }
            c
        }
        fn send(&mut self, from: &str, body: ToManager) {
            self.ids += 1;
            let env = Envelope::new(format!("m{}", self.ids).parse().unwrap(), node(from), body);
            let now = self.now;
            self.s.transaction(|tx| tx.handle(env, now)).unwrap();
        }
        fn heartbeat(&mut self, from: &str) {
            self.send(
                from,
                ToManager::Heartbeat {
                    url: format!("http://{from}"),
                    pending_changes: 0,
                    pending_pulls: 0,
                    software: String::new(),
                    residency: None,
                    taken: Revision(0),
                    applied: Revision(0),
                },
            );
        }
        fn put(&mut self, from: &str, path: &str, v: Version) -> Revision {
            let base = self.s.entry(&p(path)).unwrap().map(|e| e.rev).unwrap_or_default();
            self.send(
                from,
                ToManager::Change(Change { path: p(path), base, follows: None, op: ChangeOp::Put { version: v }, base_meta: None, base_content: None }),
            );
            self.s.entry(&p(path)).unwrap().unwrap().rev
        }
        fn delete(&mut self, from: &str, path: &str) {
            let base = self.s.entry(&p(path)).unwrap().unwrap().rev;
            self.send(from, ToManager::Change(Change { path: p(path), base, follows: None, op: ChangeOp::Delete, base_meta: None, base_content: None }));
        }
        /// `from` took the path's current content (as a node says after a pull).
        fn took(&mut self, from: &str, path: &str) {
            let e = self.s.entry(&p(path)).unwrap().unwrap();
            let Some(Version { content: Content::File { hash, .. }, .. }) = e.version else { panic!("not a file") };
            self.send(from, ToManager::Holding { items: vec![Held { path: p(path), rev: e.rev, hash }] });
        }
        /// The messages queued since the last call, each with its routing key.
        fn sent(&mut self) -> Vec<(String, ToNode)> {
            let out = self.s.outbox(100_000).unwrap();
            if let Some(last) = out.last() {
                self.s.remove_outbox(last.seq).unwrap();
            }
            out.into_iter().map(|o| (o.key, Envelope::<ToNode>::decode(&o.payload).unwrap().body)).collect()
        }
        /// Every node asked to keep something confirms all it was asked.
        fn confirm_keeps(&mut self, sent: &[(String, ToNode)]) {
            for (key, msg) in sent {
                if let ToNode::Keep { items } = msg {
                    let n = topology::node_of_key(key).unwrap();
                    self.send(n.as_str(), ToManager::Kept { keeping: items.iter().map(|i| i.hash.clone()).collect(), lacking: vec![] });
                }
            }
        }
        fn versions(&mut self, path: &str) -> Vec<VersionInfo> {
            let now = self.now;
            self.s.transaction(|tx| tx.versions(&p(path), now)).unwrap()
        }
        fn restore(&mut self, by: &str, path: &str, rev: Option<u64>, base: Option<Revision>) -> Result<RestoreReport, String> {
            let now = self.now;
            self.s.transaction(|tx| tx.restore(&p(path), rev.map(Revision), None, base, &node(by), now)).unwrap()
        }
        fn live(&self, path: &str) -> Option<Version> {
            self.s.entry(&p(path)).unwrap().and_then(|e| e.version)
        }
    }

    /// The `keep` messages among `sent`: to which node, asking what.
    fn keeps(sent: &[(String, ToNode)]) -> Vec<(String, Vec<KeepItem>)> {
        sent.iter()
            .filter_map(|(k, m)| match m {
                ToNode::Keep { items } => Some((topology::node_of_key(k).unwrap().to_string(), items.clone())),
                _ => None,
            })
            .collect()
    }

    fn keeps_to(sent: &[(String, ToNode)]) -> Vec<String> {
        keeps(sent).into_iter().map(|(n, _)| n).collect()
    }

    #[test]
    fn an_overwritten_version_is_kept_by_its_holders_told_before_the_broadcast_and_listed_available() {
        let mut c = Cluster::new(Retention { copies: 2, ..Default::default() }, &["n1", "n2", "n3"]);
        let r1 = c.put("n1", "a.txt", file(1, 0o644));
        c.took("n2", "a.txt");
        c.sent();
        c.put("n3", "a.txt", file(2, 0o600));
        let sent = c.sent();
        // The holders of the old version are asked (the overwriting node holds nothing of it).
        assert_eq!(keeps_to(&sent), vec!["n1".to_string(), "n2".to_string()]);
        let first_keep = sent.iter().position(|(_, m)| matches!(m, ToNode::Keep { .. })).unwrap();
        let broadcast = sent.iter().position(|(_, m)| matches!(m, ToNode::Applied { .. })).unwrap();
        assert!(first_keep < broadcast, "keepers hear of it before the broadcast that makes it old: {sent:?}");
        let listed = c.versions("a.txt");
        assert_eq!(listed.len(), 2);
        assert!(listed[0].ended_ms.is_none() && listed[0].available);
        assert_eq!(listed[1].rev, r1);
        assert!(!listed[1].available, "nobody confirmed keeping it yet");
        c.confirm_keeps(&sent);
        let listed = c.versions("a.txt");
        assert!(listed[1].available);
        assert_eq!(listed[1].keepers.len(), 2);
        // All its keepers go quiet: it is shown unavailable, and a restore says so.
        c.now += OFFLINE_AFTER_MS + 1;
        c.heartbeat("n3");
        assert!(!c.versions("a.txt")[1].available);
        let r = c.restore("n3", "a.txt", Some(r1.0), None).unwrap();
        assert_eq!(r.unavailable, vec![p("a.txt")]);
        assert_eq!(c.live("a.txt"), Some(file(2, 0o600)), "nothing was overwritten");
    }

    #[test]
    fn a_deleted_tree_is_in_the_trash_and_comes_back_as_it_was() {
        let mut c = Cluster::new(Retention::default(), &["n1", "n2"]);
        c.put("n1", "d", dir());
        c.put("n1", "d/x", file(1, 0o640));
        c.put("n1", "d/sub", dir());
        c.put("n1", "d/sub/y", file(2, 0o755));
        c.put("n1", "keep.txt", file(3, 0o644));
        c.took("n2", "d/x");
        c.took("n2", "d/sub/y");
        for path in ["d/sub/y", "d/sub", "d/x", "d"] {
            c.delete("n1", path);
        }
        let sent = c.sent();
        c.confirm_keeps(&sent);
        let now = c.now;
        let trash = c.s.transaction(|tx| tx.trash(None, now)).unwrap();
        assert_eq!(trash.len(), 1, "only the root of what was removed: {trash:?}");
        assert_eq!((trash[0].path.as_str(), trash[0].below, trash[0].version.mode), ("d", 3, 0o750));
        let r = c.restore("n2", "d", None, None).unwrap();
        assert_eq!(r.restored, vec![p("d"), p("d/sub"), p("d/sub/y"), p("d/x")]);
        assert!(r.beside.is_empty() && r.unavailable.is_empty(), "{r:?}");
        assert_eq!(c.live("d"), Some(dir()));
        assert_eq!(c.live("d/x"), Some(file(1, 0o640)));
        assert_eq!(c.live("d/sub/y"), Some(file(2, 0o755)));
        // The restored files are held by the nodes that kept them: everyone pulls from there.
        let holders: Vec<String> = c.s.entry(&p("d/x")).unwrap().unwrap().holders.iter().map(|h| h.node.to_string()).collect();
        assert!(!holders.is_empty() && holders.iter().all(|h| h == "n1" || h == "n2"), "{holders:?}");
        let now = c.now;
        assert!(c.s.transaction(|tx| tx.trash(None, now)).unwrap().is_empty());
    }

    #[test]
    fn a_restore_into_its_own_tree_or_of_too_many_paths_is_refused_and_changes_nothing() {
        let mut c = Cluster::new(Retention::default(), &["n1"]);
        c.put("n1", "d", dir());
        for i in 0..4 {
            c.put("n1", &format!("d/f{i}"), file(i, 0o644));
        }
        let head = c.put("n1", "d/sub", dir());
        c.sent();
        let now = c.now;
        // Below the restored path: refused (repeated, it would double the tree each time).
        let into_itself = c.s.transaction(|tx| tx.restore(&p("d"), Some(head), Some(&p("d/sub/copy")), None, &node("n1"), now)).unwrap();
        assert!(into_itself.as_ref().is_err_and(|e| e.contains("below it")), "{into_itself:?}");
        assert!(c.live("d/sub/copy").is_none());
        assert!(c.sent().is_empty(), "nothing decided, nothing sent");
        // Beside it: allowed.
        let beside = c.s.transaction(|tx| tx.restore(&p("d"), Some(head), Some(&p("d2")), None, &node("n1"), now)).unwrap().unwrap();
        assert_eq!(beside.restored.len(), 6, "{beside:?}");
        // A plan over the limit says so; at the limit it is made.
        let over = c.s.transaction(|tx| tx.restore_plan(&p("d"), head, 5).map(|plan| plan.map(|v| v.len()))).unwrap();
        assert!(over.as_ref().is_err_and(|e| e.contains("more than 5 paths")), "{over:?}");
        let at = c.s.transaction(|tx| tx.restore_plan(&p("d"), head, 6).map(|plan| plan.map(|v| v.len()))).unwrap();
        assert_eq!(at, Ok(6));
    }

    #[test]
    fn a_restore_never_overwrites_a_newer_edit() {
        let mut c = Cluster::new(Retention::default(), &["n1"]);
        let r1 = c.put("n1", "notes.txt", file(1, 0o644));
        let r2 = c.put("n1", "notes.txt", file(2, 0o644));
        let sent = c.sent();
        c.confirm_keeps(&sent);
        // Asked by one who saw r2: it is overwritten (r2 is kept in turn).
        let r = c.restore("n1", "notes.txt", None, Some(r2)).unwrap();
        assert_eq!((r.from_rev, r.restored.clone()), (r1, vec![p("notes.txt")]));
        assert_eq!(c.live("notes.txt"), Some(file(1, 0o644)));
        // Asked by one who saw an older revision: the restored version goes beside it.
        let cur = c.s.entry(&p("notes.txt")).unwrap().unwrap().rev;
        c.put("n1", "notes.txt", file(3, 0o644));
        let sent = c.sent();
        c.confirm_keeps(&sent);
        let r = c.restore("n1", "notes.txt", Some(r2.0), Some(cur)).unwrap();
        assert!(r.restored.is_empty());
        assert_eq!(r.beside.len(), 1);
        let (orig, copy) = &r.beside[0];
        assert_eq!(orig, &p("notes.txt"));
        assert_eq!(copy.as_str(), format!("notes (restored r{}).txt", r2.0));
        assert_eq!(c.live("notes.txt"), Some(file(3, 0o644)), "the newer edit stays");
        assert_eq!(c.live(copy.as_str()), Some(file(2, 0o644)));
    }

    #[test]
    fn retention_ends_by_age_and_by_count_and_keepers_are_released() {
        let mut c = Cluster::new(Retention { keep_for_ms: 10_000, keep_versions: 2, copies: 1, ..Default::default() }, &["n1"]);
        for h in 1..=4 {
            c.put("n1", "log", file(h, 0o644));
        }
        let sent = c.sent();
        c.confirm_keeps(&sent);
        // Three old versions, two kept: the oldest one's content was released.
        let released: Vec<ContentHash> =
            sent.iter().filter_map(|(_, m)| if let ToNode::Release { hashes } = m { Some(hashes.clone()) } else { None }).flatten().collect();
        assert_eq!(released, vec![ContentHash::from_bytes([1; 32])]);
        assert_eq!(c.versions("log").len(), 3, "the current one and two kept");
        c.now += 10_001;
        let now = c.now;
        assert_eq!(c.s.transaction(|tx| tx.expire_versions(now)).unwrap(), 2);
        let mut released: Vec<ContentHash> =
            c.sent().into_iter().filter_map(|(_, m)| if let ToNode::Release { hashes } = m { Some(hashes) } else { None }).flatten().collect();
        released.sort_by_key(|h| h.to_hex().as_str().to_string());
        assert_eq!(released, vec![ContentHash::from_bytes([2; 32]), ContentHash::from_bytes([3; 32])]);
        assert_eq!(c.versions("log").len(), 1);
        let kept: i64 = c.s.conn().query_row("SELECT count(*) FROM kept", [], |r| r.get(0)).unwrap();
        assert_eq!(kept, 0);
    }

    /// A content whose kept version's retention ends while a chmod made elsewhere keeps
    /// it current at the same path is not released: its keeper may be the only node left
    /// with it (it wrote the bytes and may have written over them since). Its keeper hears
    /// the retention begin again; once the path has other bytes and their retention ends
    /// too, it is released (simulator seed 2076).
    #[test]
    fn bytes_still_current_after_a_chmod_are_not_released_when_their_old_version_expires() {
        let mut c = Cluster::new(Retention { keep_for_ms: 10_000, keep_versions: 0, copies: 1, ..Default::default() }, &["n1", "n2"]);
        let released = |sent: &[(String, ToNode)]| -> Vec<(String, ContentHash)> {
            sent.iter()
                .filter_map(
                    |(k, m)| if let ToNode::Release { hashes } = m { Some((topology::node_of_key(k).unwrap().to_string(), hashes.clone())) } else { None },
                )
                .flat_map(|(n, hs)| hs.into_iter().map(move |h| (n.clone(), h)))
                .collect()
        };
        c.put("n1", "doc", file(1, 0o644));
        c.put("n2", "doc", file(1, 0o600));
        let sent = c.sent();
        assert_eq!(keeps_to(&sent), vec!["n1"], "the writer keeps the bytes of the version the chmod ended");
        c.confirm_keeps(&sent);
        c.sent();
        c.now += 10_001;
        let now = c.now;
        assert_eq!(c.s.transaction(|tx| tx.expire_versions(now)).unwrap(), 1);
        let sent = c.sent();
        assert_eq!(released(&sent), vec![], "the bytes are still the path's: their keeper keeps them");
        let renewed = keeps(&sent);
        assert_eq!(renewed.len(), 1, "{sent:?}");
        assert_eq!((renewed[0].0.as_str(), &renewed[0].1[0].hash, renewed[0].1[0].until_ms), ("n1", &ContentHash::from_bytes([1; 32]), now + 10_000));
        // Other bytes: the chmodded version ends, and once its retention ends the bytes go.
        c.put("n1", "doc", file(2, 0o600));
        let sent = c.sent();
        c.confirm_keeps(&sent);
        c.now += 10_001;
        let now = c.now;
        c.s.transaction(|tx| tx.expire_versions(now)).unwrap();
        assert_eq!(released(&c.sent()), vec![("n1".to_string(), ContentHash::from_bytes([1; 32]))]);
    }

    /// History rows of states past their retention are forgotten (a delete's too, once a
    /// new file replaced it); each path's current row stays, so a sync's catch-up form
    /// still names every path changed since any revision.
    #[test]
    fn history_past_the_retention_is_forgotten_but_each_paths_current_row() {
        let mut c = Cluster::new(Retention { keep_for_ms: 10_000, keep_versions: 0, copies: 1, ..Default::default() }, &["n1"]);
        let rows = |c: &mut Cluster| -> Vec<String> {
            let conn = c.s.conn();
            let mut st = conn.prepare("SELECT path FROM history ORDER BY rev").unwrap();
            st.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
        };
        let first = c.put("n1", "log", file(1, 0o644));
        c.put("n1", "log", file(2, 0o644));
        c.put("n1", "gone", file(3, 0o644));
        c.delete("n1", "gone");
        c.put("n1", "back", file(4, 0o644));
        c.delete("n1", "back");
        c.put("n1", "back", file(5, 0o644));
        c.put("n1", "still", file(6, 0o644));
        let sent = c.sent();
        c.confirm_keeps(&sent);
        assert_eq!(rows(&mut c).len(), 8);
        c.now += 10_001;
        let now = c.now;
        // One call ends the kept versions and forgets their rows.
        c.s.transaction(|tx| tx.expire_versions(now)).unwrap();
        assert_eq!(rows(&mut c), ["log", "gone", "back", "still"], "the current rows: log's v2, gone's delete, back's v5, still");
        let since =
            c.s.transaction(|tx| {
                Ok(tx
                    .tx
                    .prepare("SELECT DISTINCT path FROM history WHERE rev > ?1 ORDER BY path")?
                    .query_map([first.0 as i64], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()?)
            })
            .unwrap();
        assert_eq!(since, ["back", "gone", "log", "still"]);
    }

    #[test]
    fn a_put_refused_at_the_conflict_cap_is_kept_as_a_version_and_can_be_restored_beside() {
        let mut c = Cluster::new(Retention::default(), &["n1", "n2"]);
        let base = c.put("n1", "a", file(1, 0o644));
        for i in 0..=rule::MAX_CONFLICT_COPIES as u8 {
            c.put("n1", "a", file(10 + i, 0o644));
            c.send(
                "n2",
                ToManager::Change(Change {
                    path: p("a"),
                    base,
                    follows: None,
                    op: ChangeOp::Put { version: file(100 + i, 0o644) },
                    base_meta: None,
                    base_content: None,
                }),
            );
        }
        let sent = c.sent();
        let refused: Vec<&str> = sent
            .iter()
            .filter_map(|(_, m)| match m {
                ToNode::Decided { outcome: Outcome::Refused { reason }, .. } => Some(reason.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].contains("kept as revision"), "{}", refused[0]);
        c.confirm_keeps(&sent);
        let kept = c.versions("a").into_iter().find(|v| v.refused).expect("the refused put is listed");
        assert_eq!(kept.version, Some(file(100 + rule::MAX_CONFLICT_COPIES as u8, 0o644)));
        assert!(kept.available && kept.keepers == vec![node("n2")], "{kept:?}");
        let r = c.restore("n2", "a", Some(kept.rev.0), None).unwrap();
        assert_eq!(r.beside.len(), 1, "{r:?}");
        assert_eq!(c.live(r.beside[0].1.as_str()), kept.version);
    }

    #[test]
    fn a_keeper_that_drops_a_content_is_replaced_by_another_that_fetches_it() {
        let mut c = Cluster::new(Retention { copies: 2, ..Default::default() }, &["n1", "n2", "n3"]);
        c.put("n1", "a", file(1, 0o644));
        c.took("n2", "a");
        c.put("n1", "a", file(2, 0o644));
        let sent = c.sent();
        c.confirm_keeps(&sent);
        c.send("n2", ToManager::Kept { keeping: vec![], lacking: vec![ContentHash::from_bytes([1; 32])] });
        let sent = c.sent();
        let asked = keeps(&sent);
        let new = asked.iter().find(|(n, _)| n == "n3").expect("n3 is asked to keep it");
        assert_eq!(new.1[0].holders.iter().map(|h| h.node.to_string()).collect::<Vec<_>>(), vec!["n1".to_string()], "from the keeper left");
    }

    /// A keeper that lost a content without saying so (it stopped before it could, or its
    /// data directory was emptied) is asked again when it syncs; its answer gets the
    /// content another keeper.
    #[test]
    fn a_node_that_syncs_is_asked_again_to_keep_and_what_it_lacks_is_kept_elsewhere() {
        let mut c = Cluster::new(Retention { copies: 1, ..Default::default() }, &["n1", "n2", "n3"]);
        c.put("n1", "a", file(1, 0o644));
        c.took("n2", "a");
        c.put("n1", "a", file(2, 0o644));
        let sent = c.sent();
        assert_eq!(keeps_to(&sent), ["n2"]);
        c.confirm_keeps(&sent);
        c.send(
            "n2",
            ToManager::Sync {
                request: "s1".parse().unwrap(),
                url: "http://n2".into(),
                since: Revision(0),
                paged: true,
                snapshot: true,
                taken: Revision(0),
                applied: Revision(0),
            },
        );
        let now = c.now;
        c.s.sync_step(now).unwrap();
        let sent = c.sent();
        let again: Vec<KeepItem> = keeps(&sent).into_iter().filter(|(n, _)| n == "n2").flat_map(|(_, items)| items).collect();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].hash, ContentHash::from_bytes([1; 32]));
        assert!(again[0].until_ms > c.now, "{again:?}");
        c.send("n2", ToManager::Kept { keeping: vec![], lacking: vec![ContentHash::from_bytes([1; 32])] });
        let sent = c.sent();
        // No other node keeps it to fetch it from: the version is shown unavailable, with
        // no keeper, never as restorable.
        assert!(keeps_to(&sent).is_empty(), "no keeper left to fetch from: {sent:?}");
        assert!(!c.versions("a")[1].available);
        assert!(c.versions("a")[1].keepers.is_empty());
    }
}
