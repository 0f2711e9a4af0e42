//! Kept versions and the trash: what the manager asks nodes to keep past their GC, what
//! nodes report of it, and the questions a node relays for `syncctl versions`, `trash`
//! and `restore` with their answers (docs/versions.md).

use crate::{ContentHash, Holder, NodeId, RelPath, Revision, Version};
use serde::{Deserialize, Serialize};

/// Most hashes a `Kept` report (node → manager) carries in all; a node with more sends
/// several. 400 hex hashes stay far below the 64 KiB limit of node messages.
pub const MAX_KEPT_REPORT: usize = 400;
/// Most items of one `Keep` or `Release` (manager → node).
pub const MAX_KEEP_ITEMS: usize = 4096;
/// Most versions or trash items one answer lists (the newest first).
pub const MAX_LISTED: usize = 2000;

/// One content a node is asked to keep until `until_ms` (manager clock, ms since the
/// epoch), or until a `Release` names it. `holders`: where to fetch it from when the
/// node does not have it (another keeper dropped its copy); empty when the node has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepItem {
    pub hash: ContentHash,
    pub size: u64,
    pub until_ms: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<Holder>,
}

/// A question a node relays to the manager for its user (`ToManager::Ask`), answered
/// with `ToNode::Answer` on the node's own queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "query", rename_all = "snake_case", deny_unknown_fields)]
pub enum Query {
    /// The kept versions of one path, newest first.
    Versions { path: RelPath },
    /// Deleted files and directories (the roots of what was removed) at or below `dir`.
    Trash {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dir: Option<RelPath>,
    },
    /// Bring back `path` as it was at revision `rev` (default: its last version before
    /// the current one, or before it was deleted), at `to` (default: where it was). A
    /// directory comes back with its whole tree. `base`: the revision of the path the
    /// asker last saw; a path changed since then is not overwritten (the restored version
    /// goes beside it).
    Restore {
        path: RelPath,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rev: Option<Revision>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<RelPath>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base: Option<Revision>,
    },
    /// The nodes that hold the current content of `path` (online first), with their
    /// URLs now: where a node that has the file on demand fetches it.
    Holders { path: RelPath },
    /// Whether the asker may drop its copies of these contents from its cache (files on
    /// demand): a content may go only if another node holds it too, or if it is no
    /// longer the path's current content. The manager stops counting the asker as a
    /// holder of each one it allows.
    MayDrop { items: Vec<crate::Held> },
}

/// The manager's answer to a [`Query`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case", deny_unknown_fields)]
pub enum Answer {
    Versions {
        path: RelPath,
        versions: Vec<VersionInfo>,
    },
    Trash {
        items: Vec<TrashItem>,
    },
    Restored(RestoreReport),
    /// The holders of the path's current content, and that content (none: the path is
    /// not a file now).
    Holders {
        path: RelPath,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hash: Option<ContentHash>,
        holders: Vec<Holder>,
    },
    /// For each item of a `MayDrop`, in order: whether it may be dropped.
    MayDrop {
        droppable: Vec<bool>,
    },
    /// The question could not be answered (no such path, nothing kept…).
    Failed {
        reason: String,
    },
}

/// One version of a path as `syncctl versions` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionInfo {
    pub rev: Revision,
    /// `None`: the path was deleted at this revision.
    pub version: Option<Version>,
    /// The node whose change this was (`manager` for what the manager made).
    pub node: NodeId,
    /// When the manager accepted it (ms since the epoch).
    pub at_ms: i64,
    /// When it stopped being the current version (`None`: it is the current one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<i64>,
    /// It was refused at the conflict-file cap and kept only as a version.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
    /// Its content can be fetched now: a node that keeps (or holds) it is online.
    /// Directories, symlinks and empty files are always available.
    pub available: bool,
    /// Nodes that confirmed they keep its content.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keepers: Vec<NodeId>,
}

/// One deleted path whose parent still exists (the root of what a delete removed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrashItem {
    pub path: RelPath,
    /// The revision of the delete, and the revision a restore takes by default.
    pub deleted_rev: Revision,
    pub deleted_ms: i64,
    pub deleted_by: NodeId,
    pub restore_rev: Revision,
    /// The version it had (a directory's: `Content::Dir`).
    pub version: Version,
    /// Paths below it (a directory) that a restore brings back.
    pub below: u64,
}

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreReport {
    /// The revision the paths were restored from.
    pub from_rev: Revision,
    /// Paths brought back where they belong.
    pub restored: Vec<RelPath>,
    /// Paths that changed since and were left alone: the restored version is beside
    /// them, at the second path of each pair.
    pub beside: Vec<(RelPath, RelPath)>,
    /// Paths whose version no online node keeps: not restored.
    pub unavailable: Vec<RelPath>,
    /// Paths left out of the three lists above to keep the answer small (a large tree).
    #[serde(default, skip_serializing_if = "crate::messages::is_default")]
    pub left_out: u64,
}

pub(crate) fn check_items<T>(what: &str, items: &[T], max: usize) -> Result<(), String> {
    if items.len() > max {
        return Err(format!("{} {what}, more than {max}", items.len()));
    }
    Ok(())
}
