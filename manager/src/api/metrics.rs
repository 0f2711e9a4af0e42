//! The manager's Prometheus metrics (OpenMetrics text, `prometheus-client`), computed
//! from the database at scrape time so they are right across restarts.

use super::queries::Counts;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The exposition text (OpenMetrics) for these counts, the number of HTTP requests
/// served and the messages this process received and dead-lettered. Counter names get
/// their `_total` from the encoder.
pub fn render(c: &Counts, http_requests: u64, messages_in: u64, dead_lettered: u64) -> String {
    let mut r = Registry::default();
    let gauge = |v: u64| ConstGauge::new(v as i64);
    r.register("sync_manager_head_revision", "Latest revision the manager has assigned.", gauge(c.head));
    r.register("sync_manager_files", "Paths that currently exist (files, directories, symlinks).", gauge(c.files));
    r.register("sync_manager_conflicts", "Conflict files the manager has created.", ConstCounter::new(c.conflicts));
    r.register("sync_manager_nodes", "Nodes the manager has heard from.", gauge(c.nodes));
    r.register("sync_manager_nodes_online", "Nodes heard from within the offline timeout.", gauge(c.nodes_online));
    r.register("sync_manager_node_pending_changes", "Local changes not yet decided, summed over nodes (from heartbeats).", gauge(c.pending_changes));
    r.register("sync_manager_node_pending_pulls", "Contents being pulled, summed over nodes (from heartbeats).", gauge(c.pending_pulls));
    r.register("sync_manager_outbox_messages", "Messages decided but not yet published to the broker.", gauge(c.outbox));
    r.register(
        "sync_manager_messages_in",
        "Messages this manager process has received on the update queue (heartbeats included).",
        ConstCounter::new(messages_in),
    );
    r.register(
        "sync_manager_dead_lettered",
        "Messages this manager process dead-lettered (undecodable, or failing to be handled).",
        ConstCounter::new(dead_lettered),
    );
    r.register("sync_manager_messages_out", "Messages the manager has published to nodes.", ConstCounter::new(c.published));
    let changes_in = Family::<[(&'static str, String); 1], Counter>::default();
    for (outcome, n) in &c.decided {
        changes_in.get_or_create(&[("outcome", outcome.clone())]).inc_by(*n);
    }
    r.register("sync_manager_changes_in", "Change messages received from nodes and decided, by outcome (each message id once).", changes_in);
    r.register("sync_manager_http_requests", "HTTP requests this manager process has answered.", ConstCounter::new(http_requests));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_line_is_name_labels_value() {
        let c = Counts { head: 7, decided: vec![("accepted".into(), 3), ("conflict".into(), 1)], ..Default::default() };
        let text = render(&c, 5, 0, 2);
        assert!(text.contains("sync_manager_head_revision 7\n"));
        assert!(text.contains("sync_manager_dead_lettered_total 2\n"));
        assert!(text.contains("sync_manager_changes_in_total{outcome=\"accepted\"} 3\n"));
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("sync_manager_"), "{line}");
            value.parse::<f64>().unwrap();
        }
    }
}
