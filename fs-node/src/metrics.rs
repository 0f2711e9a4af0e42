//! The node's metrics for `/metrics` (OpenMetrics text). Owns the counters and the pull
//! histogram; each is written by the task that counts it (the broker link its messages
//! and pulls, the peer server the bytes it serves). Gauges are not kept here: they are
//! read from their owners when the metrics are scraped ([`Gauges`]).

use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

/// Content type of [`Metrics::render`]'s text.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub struct Metrics {
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub bytes_pulled: Counter,
    pub bytes_served: Counter,
    /// Chunk lists and leaves served (what a peer reads to know which bytes to fetch).
    pub index_bytes_served: Counter,
    pub pulls_failed: Counter,
    /// Time to pull one content, in seconds.
    pub pull_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            bytes_pulled: Counter::default(),
            bytes_served: Counter::default(),
            index_bytes_served: Counter::default(),
            pulls_failed: Counter::default(),
            pull_seconds: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0, 10.0]),
        }
    }
}

/// What the metrics read from the tree and the broker link when scraped.
pub struct Gauges {
    pub pending_changes: u64,
    pub pending_pulls: u64,
    pub conflicts_seen: u64,
    pub passthrough: bool,
    pub passthrough_opens: u64,
    pub passthrough_detaches: u64,
    /// Transactions committed to the node database.
    pub db_commits: u64,
    /// Bytes of contents kept for the cluster's old versions.
    pub kept_bytes: u64,
    pub connected: bool,
    /// How long the holds of the tree's lock lasted (a hold stalls the mount).
    pub tree_holds: crate::tree::HoldReport,
}

impl Metrics {
    pub fn observe_pull(&self, d: Duration) {
        self.pull_seconds.observe(d.as_secs_f64());
    }

    /// Counts the end of one pull that took `took`: its bytes, or its failure.
    pub fn count_pull(&self, r: &anyhow::Result<u64>, took: Duration) {
        match r {
            Ok(n) => {
                self.bytes_pulled.inc_by(*n);
                if *n > 0 {
                    self.observe_pull(took);
                }
            }
            Err(_) => {
                self.pulls_failed.inc();
            }
        }
    }

    /// The exposition text (OpenMetrics). Counter names get their `_total` from the
    /// encoder.
    pub fn render(&self, g: &Gauges) -> String {
        let mut r = Registry::default();
        let gauge = |v: u64| ConstGauge::new(v as i64);
        r.register("syncfs_node_messages_in", "Messages received from the master channel.", self.messages_in.clone());
        r.register("syncfs_node_messages_out", "Messages published to the update channel.", self.messages_out.clone());
        r.register("syncfs_node_bytes_pulled", "Content bytes pulled from peers.", self.bytes_pulled.clone());
        r.register("syncfs_node_bytes_served", "Content bytes served to peers.", self.bytes_served.clone());
        r.register("syncfs_node_index_bytes_served", "Chunk list and leaves bytes served to peers.", self.index_bytes_served.clone());
        r.register("syncfs_node_pulls_failed", "Pulls that failed on every holder.", self.pulls_failed.clone());
        r.register("syncfs_node_pending_changes", "Local changes not yet decided by the manager.", gauge(g.pending_changes));
        r.register("syncfs_node_pending_pulls", "Content pulls in progress.", gauge(g.pending_pulls));
        r.register("syncfs_node_conflicts", "Own changes the manager kept as conflict files.", ConstCounter::new(g.conflicts_seen));
        r.register("syncfs_node_passthrough", "1 while the kernel does passthrough I/O for this mount.", gauge(g.passthrough as u64));
        r.register("syncfs_node_passthrough_opens", "Opens whose I/O the kernel did on a backing file by itself.", ConstCounter::new(g.passthrough_opens));
        r.register("syncfs_node_passthrough_detaches", "Backing files a writer made into a file's own work file.", ConstCounter::new(g.passthrough_detaches));
        r.register("syncfs_node_db_commits", "Transactions committed to the node database.", ConstCounter::new(g.db_commits));
        r.register("syncfs_node_kept_bytes", "Bytes of contents kept for the cluster's old versions (retention).", gauge(g.kept_bytes));
        r.register("syncfs_node_connected", "1 when connected to the broker.", gauge(g.connected as u64));
        r.register(
            "syncfs_node_tree_long_holds",
            "Holds of the tree's lock of 100 ms or more (the mount waited meanwhile).",
            ConstCounter::new(g.tree_holds.long_holds),
        );
        r.register(
            "syncfs_node_tree_longest_hold_seconds",
            "The longest hold of the tree's lock since the node started (counted from 10 ms).",
            ConstGauge::new(g.tree_holds.longest_ns as f64 / 1e9),
        );
        r.register("syncfs_node_pull_seconds", "Time to pull one content.", self.pull_seconds.clone());
        let mut o = String::new();
        prometheus_client::encoding::text::encode(&mut o, &r).expect("writing to a String cannot fail");
        o
    }
}
