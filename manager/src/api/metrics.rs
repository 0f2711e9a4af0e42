//! The manager's Prometheus metrics (text exposition format 0.0.4), computed from the
//! database at scrape time so they are right across restarts. Every metric name is a
//! constant here.

use super::queries::Counts;
use std::fmt::Write;

pub const HEAD_REVISION: &str = "sync_manager_head_revision";
pub const FILES: &str = "sync_manager_files";
pub const CONFLICTS: &str = "sync_manager_conflicts_total";
pub const NODES: &str = "sync_manager_nodes";
pub const NODES_ONLINE: &str = "sync_manager_nodes_online";
pub const PENDING_CHANGES: &str = "sync_manager_node_pending_changes";
pub const PENDING_PULLS: &str = "sync_manager_node_pending_pulls";
pub const OUTBOX: &str = "sync_manager_outbox_messages";
pub const MESSAGES_OUT: &str = "sync_manager_messages_out_total";
pub const MESSAGES_IN: &str = "sync_manager_messages_in_total";
pub const DEAD_LETTERED: &str = "sync_manager_dead_lettered_total";
pub const CHANGES_IN: &str = "sync_manager_changes_in_total";
pub const HTTP_REQUESTS: &str = "sync_manager_http_requests_total";

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// The exposition text for these counts, the number of HTTP requests served and the
/// messages this process received and dead-lettered.
pub fn render(c: &Counts, http_requests: u64, messages_in: u64, dead_lettered: u64) -> String {
    let mut out = String::new();
    metric(&mut out, HEAD_REVISION, "gauge", "Latest revision the manager has assigned.", &[("", c.head)]);
    metric(&mut out, FILES, "gauge", "Paths that currently exist (files, directories, symlinks).", &[("", c.files)]);
    metric(&mut out, CONFLICTS, "counter", "Conflict files the manager has created.", &[("", c.conflicts)]);
    metric(&mut out, NODES, "gauge", "Nodes the manager has heard from.", &[("", c.nodes)]);
    metric(&mut out, NODES_ONLINE, "gauge", "Nodes heard from within the offline timeout.", &[("", c.nodes_online)]);
    metric(&mut out, PENDING_CHANGES, "gauge", "Local changes not yet decided, summed over nodes (from heartbeats).", &[("", c.pending_changes)]);
    metric(&mut out, PENDING_PULLS, "gauge", "Contents being pulled, summed over nodes (from heartbeats).", &[("", c.pending_pulls)]);
    metric(&mut out, OUTBOX, "gauge", "Messages decided but not yet published to the broker.", &[("", c.outbox)]);
    metric(&mut out, MESSAGES_IN, "counter", "Messages this manager process has received on the update queue (heartbeats included).", &[("", messages_in)]);
    metric(&mut out, DEAD_LETTERED, "counter", "Messages this manager process dead-lettered (undecodable, or failing to be handled).", &[("", dead_lettered)]);
    metric(&mut out, MESSAGES_OUT, "counter", "Messages the manager has published to nodes.", &[("", c.published)]);
    let labels: Vec<(String, u64)> = c.decided.iter().map(|(outcome, n)| (format!("{{outcome=\"{}\"}}", escape(outcome)), *n)).collect();
    let samples: Vec<(&str, u64)> = labels.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    metric(&mut out, CHANGES_IN, "counter", "Change messages received from nodes and decided, by outcome (each message id once).", &samples);
    metric(&mut out, HTTP_REQUESTS, "counter", "HTTP requests this manager process has answered.", &[("", http_requests)]);
    out
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
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
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("sync_manager_"), "{line}");
            value.parse::<f64>().unwrap();
        }
    }
}
