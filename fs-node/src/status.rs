//! What a node says about itself to `syncctl` and operators: [`NodeStatus`] (`GET
//! /status`), [`BriefStatus`] (`GET /status/brief`) and the metrics text (`GET
//! /metrics`). Owns nothing that changes: a [`Reporter`] reads the tree, the broker
//! link's handle and the metrics when asked.

use crate::fetch::{CacheReport, Fetcher};
use crate::link::{LinkHandle, SyncReport};
use crate::metrics::{Gauges, Metrics};
use crate::puller::PullProgress;
use crate::tree::{ResidencyReport, Tree};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use wire::NodeId;

/// What a node is doing right now (`GET /status/brief`): read from counters, so it costs
/// the same at any tree size; what `syncctl status --watch` and the progress of `syncctl
/// sync` poll several times a second.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BriefStatus {
    pub id: String,
    pub mount: String,
    pub url: String,
    pub connected: bool,
    /// Why the broker blocks the node's connection, while it does (a memory or disk
    /// alarm of the broker: the node's changes wait until it has room again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_blocked: Option<String>,
    /// Why the node is offline: how its last session with the broker ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_because: Option<String>,
    /// Why the manager refuses everything this node sends: the operator forgot it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forgotten: Option<String>,
    pub pending_changes: u64,
    pub pending_pulls: u64,
    pub conflicts_seen: u64,
    pub bytes_pulled: u64,
}

impl BriefStatus {
    /// The node's link as a word or two for people: online, offline, or blocked by the
    /// broker and why.
    pub fn state(&self) -> String {
        if let Some(why) = &self.forgotten {
            return format!("refused by the manager: {why}");
        }
        match (&self.broker_blocked, self.connected) {
            (Some(reason), true) => format!("online, but the broker blocks its connection ({reason}): changes wait"),
            (_, true) => "online".into(),
            (_, false) => match &self.offline_because {
                Some(why) => format!("offline ({why})"),
                None => "offline".into(),
            },
        }
    }
}

/// What `GET /status` returns and `syncctl status` shows: the brief status and what
/// the tree holds. Where versions are kept, ignore rules apply or paths are on demand,
/// some of it takes a pass over the tree.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct NodeStatus {
    #[serde(flatten)]
    pub brief: BriefStatus,
    pub files: u64,
    pub dirs: u64,
    pub last_revision: u64,
    /// Paths this node keeps to itself (`syncctl ignored` lists them).
    #[serde(default)]
    pub ignored: u64,
    /// Contents this node keeps for the cluster's old versions, and their bytes.
    #[serde(default)]
    pub kept_contents: u64,
    #[serde(default)]
    pub kept_bytes: u64,
    /// What keeping them takes on the disk beyond the files' own contents (older
    /// versions at rest are patches).
    #[serde(default)]
    pub kept_disk_bytes: u64,
    /// Paths whose revision the node keeps: those it took from the manager, and deleted
    /// ones not forgotten yet (docs/sync.md, *What a node forgets*).
    #[serde(default)]
    pub revisions_kept: u64,
    pub last_sync: Option<SyncReport>,
    /// Local and on-demand contents, and the pin rules (docs/on-demand.md).
    #[serde(default)]
    pub residency: ResidencyReport,
    /// Contents being pulled (for a sync, an open, a pin), with their bytes so far.
    #[serde(default)]
    pub pulls: Vec<PullProgress>,
    /// The cache of on-demand contents: its budget and what it dropped.
    #[serde(default)]
    pub cache: CacheReport,
}

/// Reads a node's state for its status and metrics.
pub struct Reporter {
    pub id: NodeId,
    pub mount: PathBuf,
    pub url: String,
    pub tree: Arc<Tree>,
    pub link: LinkHandle,
    pub metrics: Arc<Metrics>,
    /// Whether the kernel does passthrough I/O for this mount (owned by `fs::SyncFs`).
    pub passthrough: Arc<AtomicBool>,
    /// On-demand fetches and pins.
    pub fetcher: Arc<Fetcher>,
}

impl Reporter {
    pub fn brief(&self) -> BriefStatus {
        BriefStatus {
            id: self.id.to_string(),
            mount: self.mount.display().to_string(),
            url: self.url.clone(),
            connected: self.link.connected(),
            broker_blocked: self.link.broker_blocked(),
            offline_because: self.link.offline_because(),
            forgotten: self.link.forgotten(),
            pending_changes: self.tree.pending_changes(),
            pending_pulls: self.link.pulls_in_progress(),
            conflicts_seen: self.tree.conflicts_seen(),
            bytes_pulled: self.metrics.bytes_pulled.get(),
        }
    }

    pub fn status(&self) -> NodeStatus {
        let stats = self.tree.stats();
        NodeStatus {
            brief: self.brief(),
            files: stats.files,
            dirs: stats.dirs,
            last_revision: stats.last_revision,
            ignored: stats.ignored,
            kept_contents: stats.kept_contents,
            kept_bytes: stats.kept_bytes,
            kept_disk_bytes: stats.kept_disk_bytes,
            revisions_kept: stats.revisions_kept,
            last_sync: self.link.last_sync(),
            residency: self.tree.residency(),
            pulls: self.fetcher.in_progress(),
            cache: self.fetcher.cache_report(),
        }
    }

    pub fn metrics_text(&self) -> String {
        let stats = self.tree.gauges();
        self.metrics.render(&Gauges {
            pending_changes: stats.pending_changes,
            pending_pulls: self.link.pulls_in_progress(),
            conflicts_seen: stats.conflicts_seen,
            passthrough: self.passthrough.load(Ordering::Relaxed),
            passthrough_opens: stats.passthrough_opens,
            passthrough_detaches: stats.passthrough_detaches,
            db_commits: stats.db_commits,
            kept_bytes: stats.kept_bytes,
            connected: self.link.connected(),
            tree_holds: self.tree.holds().0,
        })
    }
}
