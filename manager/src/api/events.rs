//! Live updates (`GET /api/events`, server-sent events) for the dashboard and scripts.
//!
//! One poller reads a [`Snapshot`] of the database every [`POLL`] while anyone listens
//! and publishes it on a `watch` channel (which keeps only the latest value, so a slow
//! listener never makes anything queue up). Each stream compares the snapshot with what
//! it sent last and sends only the parts that changed: `status`, `nodes`, `transfers`,
//! `conflicts`, and `changes` (the new revisions). Streams are capped at
//! [`MAX_STREAMS`] and end when the client leaves or the manager stops.

use super::error::ApiError;
use super::queries;
use crate::service::Handle;
use bytes::Bytes;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How often the database is read while a stream is open: live enough for a person
/// watching, cheap (a handful of indexed queries) for SQLite.
pub const POLL: Duration = Duration::from_millis(500);
/// Latest changes kept in a snapshot; a listener that falls further behind is told
/// (`"gap": true`) and can fetch the rest from `/api/changes`.
pub const RECENT_CHANGES: u64 = 50;
/// Conflicts kept in a snapshot (newest first); the total is always sent.
pub const RECENT_CONFLICTS: u64 = 20;
/// Open event streams at once; each holds a connection and a task.
pub const MAX_STREAMS: usize = 32;
/// A comment line this often keeps idle connections open through proxies.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Events buffered per stream before the stream waits for the client.
const STREAM_BUFFER: usize = 16;
/// Tells EventSource how long to wait before reconnecting, in milliseconds.
const RETRY_MS: u64 = 2000;

/// What the dashboard shows, read in one go.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub head: u64,
    pub status: Value,
    pub nodes: Value,
    pub transfers: Value,
    pub conflicts: Value,
    /// The latest changes, oldest first.
    pub recent: Vec<Value>,
}

async fn snapshot(handle: &Handle) -> anyhow::Result<Snapshot> {
    handle
        .with_store(|s| {
            let counts = queries::counts(s)?;
            let nodes = queries::nodes(s)?;
            let transfers: Vec<Value> = nodes
                .iter()
                .filter(|n| n["pending_pulls"].as_u64().unwrap_or(0) > 0 || n["pending_changes"].as_u64().unwrap_or(0) > 0)
                .map(|n| json!({"node": n["id"], "pending_pulls": n["pending_pulls"], "pending_changes": n["pending_changes"], "online": n["online"]}))
                .collect();
            let (total, conflicts) = queries::conflicts(s.conn(), 0, RECENT_CONFLICTS)?;
            Ok(Snapshot {
                head: counts.head,
                status: queries::counts_json(&counts),
                nodes: Value::Array(nodes),
                transfers: Value::Array(transfers),
                conflicts: json!({"total": total, "conflicts": conflicts}),
                recent: queries::latest_changes(s.conn(), RECENT_CHANGES)?,
            })
        })
        .await
}

fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

pub struct Hub {
    latest: watch::Sender<Arc<Snapshot>>,
    streams: Arc<Semaphore>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub { latest: watch::Sender::new(Arc::new(Snapshot::default())), streams: Arc::new(Semaphore::new(MAX_STREAMS)) }
    }
}

impl Hub {
    /// The poller; runs until `cancel`.
    pub async fn run(self: Arc<Self>, handle: Handle, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.latest.receiver_count() == 0 {
                continue;
            }
            match snapshot(&handle).await {
                Ok(snap) => {
                    self.latest.send_if_modified(|cur| {
                        if **cur == snap {
                            return false;
                        }
                        *cur = Arc::new(snap);
                        true
                    });
                }
                Err(e) => tracing::warn!("reading the dashboard snapshot: {e:#}"),
            }
        }
    }

    /// Opens a stream: the receiver yields the text of the event stream.
    pub fn subscribe(&self, handle: Handle, cancel: CancellationToken) -> Result<mpsc::Receiver<Bytes>, ApiError> {
        let permit = self
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::unavailable(format!("too many open event streams (the limit is {MAX_STREAMS}); close another dashboard tab")))?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(stream(handle, self.latest.subscribe(), tx, cancel, permit));
        Ok(rx)
    }
}

/// Sends the parts of `new` that differ from `old`; false once the client is gone.
async fn send_diff(old: &Snapshot, new: &Snapshot, out: &mpsc::Sender<Bytes>) -> bool {
    let parts = [
        ("status", &old.status, &new.status),
        ("nodes", &old.nodes, &new.nodes),
        ("transfers", &old.transfers, &new.transfers),
        ("conflicts", &old.conflicts, &new.conflicts),
    ];
    for (name, a, b) in parts {
        if a != b && out.send(event(name, b)).await.is_err() {
            return false;
        }
    }
    if new.head > old.head {
        let fresh: Vec<&Value> = new.recent.iter().filter(|c| c["rev"].as_u64().unwrap_or(0) > old.head).collect();
        // Changes between the old head and the oldest one kept were not seen.
        let gap = fresh.first().and_then(|c| c["rev"].as_u64()).is_some_and(|first| first > old.head + 1);
        if out.send(event("changes", &json!({"head": new.head, "gap": gap, "changes": fresh}))).await.is_err() {
            return false;
        }
    }
    true
}

async fn stream(
    handle: Handle,
    mut latest: watch::Receiver<Arc<Snapshot>>,
    out: mpsc::Sender<Bytes>,
    cancel: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    // The first snapshot is read fresh: the poller's may be old if nobody was listening.
    let first = match snapshot(&handle).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("reading the dashboard snapshot: {e:#}");
            return;
        }
    };
    let empty = Snapshot { status: Value::Null, nodes: Value::Null, transfers: Value::Null, conflicts: Value::Null, ..Default::default() };
    if out.send(Bytes::from(format!("retry: {RETRY_MS}\n\n"))).await.is_err() || !send_diff(&empty, &first, &out).await {
        return;
    }
    let mut last = first;
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = out.closed() => return,
            changed = latest.changed() => {
                if changed.is_err() {
                    return;
                }
                let snap = (**latest.borrow_and_update()).clone();
                // A poll older than the fresh first read must not move the head back.
                if snap.head < last.head {
                    continue;
                }
                if !send_diff(&last, &snap, &out).await {
                    return;
                }
                last = snap;
            }
            _ = keepalive.tick() => {
                if out.send(Bytes::from_static(b": keepalive\n\n")).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(rev: u64) -> Value {
        json!({"rev": rev, "path": format!("f{rev}")})
    }

    async fn collect(old: &Snapshot, new: &Snapshot) -> Vec<String> {
        let (tx, mut rx) = mpsc::channel(16);
        assert!(send_diff(old, new, &tx).await);
        drop(tx);
        let mut out = Vec::new();
        while let Some(b) = rx.recv().await {
            out.push(String::from_utf8(b.to_vec()).unwrap());
        }
        out
    }

    #[tokio::test]
    async fn only_changed_parts_and_new_revisions_are_sent() {
        let a = Snapshot { head: 2, nodes: json!([{"id": "n1"}]), recent: vec![change(1), change(2)], ..Default::default() };
        let mut b = a.clone();
        b.head = 4;
        b.recent = vec![change(1), change(2), change(3), change(4)];
        let sent = collect(&a, &b).await;
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert!(sent[0].starts_with("event: changes\ndata: "), "{}", sent[0]);
        assert!(sent[0].contains("\"gap\":false") && sent[0].contains("\"rev\":3") && !sent[0].contains("\"rev\":2"));
        b.nodes = json!([{"id": "n1"}, {"id": "n2"}]);
        b.recent = vec![change(4)];
        b.head = 9;
        let sent = collect(&a, &b).await;
        assert_eq!(sent.len(), 2);
        assert!(sent[0].starts_with("event: nodes\n"));
        assert!(sent[1].contains("\"gap\":true"));
        assert!(collect(&a, &a).await.is_empty());
    }
}
