//! The node's broker link: one task owns the AMQP connection. It publishes the outbox
//! (with confirms), heartbeats and sync requests on the update channel, and consumes the
//! node's queue on the master channel: each message is *prepared* (contents pulled from
//! holders, several messages ahead, concurrently) and then *applied* strictly in order,
//! then acked. It reconnects with backoff and runs a sync after every (re)connect.

use crate::node::Shared;
use crate::peer::{Puller, MAX_CONCURRENT_PULLS};
use crate::tree::{Applied, Inval};
use anyhow::Context;
use futures_util::{stream, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use wire::{topology, Content, Entry, Envelope, MessageId, RelPath, ToManager, ToNode, Version};

/// Deliveries the broker sends ahead of our acks, and messages prepared ahead of the one
/// being applied: enough to keep pulls busy, small enough to bound memory.
const PREFETCH: u16 = 64;
const PIPELINE: usize = 32;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// After a failed pull, a new sync is run this often until contents arrive.
const RETRY_EVERY: Duration = Duration::from_secs(2);

type Responder = oneshot::Sender<anyhow::Result<SyncReport>>;

/// What one sync did, as `syncctl sync` prints it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SyncReport {
    /// Local changes sent to the manager.
    pub pushed: u64,
    /// Paths whose state was taken from the manager (contents pulled, deletes applied).
    pub pulled: u64,
    /// Own changes kept as conflict files during the sync.
    pub conflicts: u64,
    /// Paths whose content could not be pulled yet (retried automatically).
    pub failed: u64,
    /// The manager's revision when it answered.
    pub head: u64,
    pub seconds: f64,
}

struct ActiveSync {
    responder: Option<Responder>,
    started: Instant,
    pushed: u64,
    conflicts_before: u64,
}

fn new_id() -> MessageId {
    uuid::Uuid::new_v4().to_string().parse().expect("uuids are valid message ids")
}

pub async fn run(broker: String, shared: Arc<Shared>, puller: Puller, mut sync_rx: mpsc::Receiver<Responder>, cancel: CancellationToken) {
    let mut backoff = broker_link::Backoff::default();
    loop {
        let r = session(&broker, &shared, &puller, &mut sync_rx, &cancel, &mut backoff).await;
        shared.connected.store(false, Ordering::Relaxed);
        match r {
            Ok(()) => return,
            Err(e) => tracing::warn!("broker link down: {e:#}; working offline and reconnecting"),
        }
        // Sync requests made while offline fail at once with a clear reason.
        while let Ok(r) = sync_rx.try_recv() {
            let _ = r.send(Err(anyhow::anyhow!("not connected to the broker")));
        }
        if !backoff.wait(&cancel).await {
            return;
        }
    }
}

struct Session<'a> {
    shared: &'a Arc<Shared>,
    ch: lapin::Channel,
    syncs: HashMap<MessageId, ActiveSync>,
}

impl Session<'_> {
    fn envelope(&self, body: ToManager) -> Envelope<ToManager> {
        Envelope::new(new_id(), self.shared.id.clone(), body)
    }

    /// Publishes outbox rows not yet sent in this session; returns how many.
    async fn publish_outbox(&self) -> anyhow::Result<u64> {
        let tree = self.shared.tree.clone();
        let rows = tokio::task::spawn_blocking(move || tree.take_unpublished()).await?;
        let n = rows.len() as u64;
        let payloads: Vec<(String, Vec<u8>)> =
            rows.into_iter().map(|r| (r.msg.to_string(), Envelope::new(r.msg, self.shared.id.clone(), ToManager::Change(r.change)).encode())).collect();
        for chunk in payloads.chunks(256) {
            let sends = chunk.iter().map(|(id, p)| broker_link::publish_confirmed(&self.ch, "", topology::UPDATE_QUEUE, id, p));
            for r in futures_util::future::join_all(sends).await {
                r?;
            }
        }
        self.shared.metrics.messages_out.fetch_add(n, Ordering::Relaxed);
        if n > 0 {
            tracing::debug!(target: "timing", "published {n} change(s), confirmed");
        }
        Ok(n)
    }

    /// Publishes without waiting for the confirm: for messages whose loss costs nothing
    /// (heartbeats, `Have`), so they never slow the apply loop.
    async fn publish_unconfirmed(&self, body: ToManager) -> anyhow::Result<()> {
        let env = self.envelope(body);
        let payload = env.encode();
        let publish = self.ch.basic_publish(
            "".into(),
            topology::UPDATE_QUEUE.into(),
            BasicPublishOptions::default(),
            &payload,
            broker_link::message_properties(env.id.as_str()),
        );
        let _confirm = broker_link::bounded("publishing", async { publish.await.context("publishing") }).await?;
        self.shared.metrics.messages_out.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Sends the outbox, then a `Sync`; the reply comes after the manager has decided
    /// every change sent before it.
    async fn start_sync(&mut self, responder: Option<Responder>) -> anyhow::Result<()> {
        let pushed = self.publish_outbox().await?;
        let request = new_id();
        let env = self.envelope(ToManager::Sync { request: request.clone(), url: self.shared.url.clone() });
        broker_link::publish_confirmed(&self.ch, "", topology::UPDATE_QUEUE, env.id.as_str(), &env.encode()).await?;
        self.shared.metrics.messages_out.fetch_add(1, Ordering::Relaxed);
        let conflicts_before = self.shared.tree.stats().conflicts_seen;
        self.syncs.insert(request, ActiveSync { responder, started: Instant::now(), pushed, conflicts_before });
        Ok(())
    }

    async fn heartbeat(&self) -> anyhow::Result<()> {
        let body = ToManager::Heartbeat {
            url: self.shared.url.clone(),
            pending_changes: self.shared.tree.pending_changes(),
            pending_pulls: self.shared.pulls_in_progress.load(Ordering::Relaxed),
            software: env!("CARGO_PKG_VERSION").to_string(),
        };
        self.publish_unconfirmed(body).await
    }

    /// Applies one entry (blocking work off the runtime), then drops the kernel's cached
    /// view of what changed. Returns whether the tree changed and whether content was
    /// missing.
    async fn apply_entry(&self, entry: Entry) -> anyhow::Result<Applied> {
        let shared = self.shared.clone();
        let e = entry.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let r = shared.tree.apply_remote(&e);
            if let Ok(a) = &r {
                invalidate(&shared, &a.invals);
            }
            r
        })
        .await?
        .map_err(|e| anyhow::anyhow!("applying {}: {e}", entry.path))?;
        self.after_apply(&entry, &applied).await?;
        Ok(applied)
    }

    /// Tells the manager we can serve what we just took, and asks for a retry when the
    /// content was not there.
    async fn after_apply(&self, entry: &Entry, applied: &Applied) -> anyhow::Result<()> {
        if applied.missing_content {
            self.shared.needs_resync.store(true, Ordering::Relaxed);
        }
        if applied.changed {
            if let Some(Version { content: Content::File { hash, .. }, .. }) = &entry.version {
                self.publish_unconfirmed(ToManager::Have { path: entry.path.clone(), rev: entry.rev, hash: hash.clone() }).await?;
            }
        }
        Ok(())
    }

    async fn apply(&mut self, env: Envelope<ToNode>, pull_failures: u64) -> anyhow::Result<()> {
        match env.body {
            ToNode::Applied { entry, .. } => {
                self.apply_entry(entry).await?;
            }
            ToNode::Decided { change, outcome, current } => {
                if let wire::Outcome::Conflict { copy } = &outcome {
                    tracing::info!(path = %current.path, %copy, "conflict: our version was kept as a conflict file");
                }
                let shared = self.shared.clone();
                let entry = current.clone();
                let a = tokio::task::spawn_blocking(move || {
                    let r = shared.tree.apply_decided(&change, &outcome, &entry);
                    if let Ok(a) = &r {
                        invalidate(&shared, &a.invals);
                    }
                    r
                })
                .await?
                .map_err(|e| anyhow::anyhow!("applying the decision on {}: {e}", current.path))?;
                self.after_apply(&current, &a).await?;
            }
            ToNode::SyncReply { request, head, entries } => {
                let mut pulled = 0u64;
                let mut failed = pull_failures;
                let known: HashSet<RelPath> = entries.iter().map(|e| e.path.clone()).collect();
                for entry in entries {
                    let a = self.apply_entry(entry).await?;
                    pulled += a.changed as u64;
                    failed += a.missing_content as u64;
                }
                let tree = self.shared.tree.clone();
                let unknown =
                    tokio::task::spawn_blocking(move || tree.push_unknown(&known)).await?.map_err(|e| anyhow::anyhow!("pushing local paths: {e}"))? as u64;
                self.publish_outbox().await?;
                if failed > 0 {
                    self.shared.needs_resync.store(true, Ordering::Relaxed);
                }
                if let Some(s) = self.syncs.remove(&request) {
                    let report = SyncReport {
                        pushed: s.pushed + unknown,
                        pulled,
                        conflicts: self.shared.tree.stats().conflicts_seen.saturating_sub(s.conflicts_before),
                        failed,
                        head: head.0,
                        seconds: s.started.elapsed().as_secs_f64(),
                    };
                    tracing::info!(pushed = report.pushed, pulled, conflicts = report.conflicts, failed, "sync done");
                    *self.shared.last_sync.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
                    if let Some(r) = s.responder {
                        let _ = r.send(Ok(report));
                    }
                }
            }
            ToNode::SyncRequested {} => {
                tracing::info!("the manager asked for a sync");
                self.start_sync(None).await?;
            }
        }
        Ok(())
    }
}

fn invalidate(shared: &Shared, invals: &[Inval]) {
    let Some(n) = shared.notifier.get() else {
        return;
    };
    for i in invals {
        // ENOENT means the kernel had nothing cached: fine.
        let _ = match i {
            Inval::Entry { parent, name } => n.inval_entry(fuser::INodeNo(*parent), name),
            Inval::Inode { ino } => n.inval_inode(fuser::INodeNo(*ino), 0, 0),
        };
    }
}

/// A delivery with its decoded message and the result of pulling what it needs.
#[allow(clippy::large_enum_variant)] // one per delivery in flight, moved once
enum Prepared {
    Bad(Delivery, wire::DecodeError),
    Ready(Delivery, Envelope<ToNode>, u64),
}

async fn prepare(d: Delivery, shared: Arc<Shared>, puller: Puller) -> Prepared {
    let env = match Envelope::<ToNode>::decode(&d.data) {
        Ok(e) => e,
        Err(e) => return Prepared::Bad(d, e),
    };
    shared.metrics.messages_in.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(target: "timing", "delivery received");
    let entries: Vec<&Entry> = match &env.body {
        ToNode::Applied { entry, .. } => vec![entry],
        ToNode::Decided { current, .. } => vec![current],
        ToNode::SyncReply { entries, .. } => entries.iter().collect(),
        ToNode::SyncRequested {} => vec![],
    };
    let wanted: Vec<(wire::ContentHash, Vec<wire::Holder>)> =
        entries.into_iter().filter_map(|e| shared.tree.needs_content(e).map(|h| (h, e.holders.clone()))).collect::<HashMap<_, _>>().into_iter().collect();
    let failures = stream::iter(wanted)
        .map(|(hash, holders)| {
            let shared = shared.clone();
            let puller = puller.clone();
            async move {
                shared.pulls_in_progress.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let r = puller.pull(&hash, &holders).await;
                shared.pulls_in_progress.fetch_sub(1, Ordering::Relaxed);
                match r {
                    Ok(n) => {
                        shared.metrics.bytes_pulled.fetch_add(n, Ordering::Relaxed);
                        if n > 0 {
                            shared.metrics.observe_pull(t.elapsed());
                        }
                        0u64
                    }
                    Err(e) => {
                        shared.metrics.pulls_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("{e:#}; will retry");
                        1
                    }
                }
            }
        })
        .buffer_unordered(MAX_CONCURRENT_PULLS)
        .fold(0u64, |a, b| async move { a + b })
        .await;
    tracing::debug!(target: "timing", "delivery prepared");
    Prepared::Ready(d, env, failures)
}

async fn session(
    broker: &str,
    shared: &Arc<Shared>,
    puller: &Puller,
    sync_rx: &mut mpsc::Receiver<Responder>,
    cancel: &CancellationToken,
    backoff: &mut broker_link::Backoff,
) -> anyhow::Result<()> {
    let conn = broker_link::connect(broker).await?;
    let ch = broker_link::confirmed_channel(&conn).await?;
    broker_link::declare_common(&ch).await?;
    let queue = broker_link::declare_node_queue(&ch, &shared.id).await?;
    let cons = conn.create_channel().await.context("opening the consumer channel")?;
    cons.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let consumer = cons
        .basic_consume(queue.as_str().into(), shared.id.as_str().into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .context("consuming")?;
    shared.tree.republish_all();
    shared.connected.store(true, Ordering::Relaxed);
    backoff.reset();
    tracing::info!("connected to the broker; consuming {queue}");
    let mut s = Session { shared, ch, syncs: HashMap::new() };
    s.heartbeat().await?;
    s.start_sync(None).await?;
    let sh = shared.clone();
    let p = puller.clone();
    let mut pipeline = consumer.map(move |d| prepare_or_error(d, sh.clone(), p.clone())).buffered(PIPELINE);
    let mut hb = tokio::time::interval(HEARTBEAT_EVERY);
    let mut retry = tokio::time::interval(RETRY_EVERY);
    let outbox_ready = shared.tree.outbox_ready.clone();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = conn.close(200, "node shutting down".into()).await;
                return Ok(());
            }
            _ = outbox_ready.notified() => { s.publish_outbox().await?; }
            _ = hb.tick() => {
                s.heartbeat().await?;
                s.publish_outbox().await?;
            }
            _ = retry.tick() => {
                if shared.needs_resync.swap(false, Ordering::Relaxed) && s.syncs.is_empty() {
                    s.start_sync(None).await?;
                }
            }
            Some(r) = sync_rx.recv() => s.start_sync(Some(r)).await?,
            item = pipeline.next() => {
                match item {
                    None => anyhow::bail!("the broker cancelled our consumer"),
                    Some(Err(e)) => return Err(e),
                    Some(Ok(Prepared::Bad(d, e))) => {
                        tracing::warn!("dead-lettering an undecodable message: {e}");
                        broker_link::bounded("rejecting", async { d.reject(BasicRejectOptions { requeue: false }).await.context("rejecting") }).await?;
                    }
                    Some(Ok(Prepared::Ready(d, env, failures))) => {
                        s.apply(env, failures).await?;
                        broker_link::bounded("acking", async { d.ack(BasicAckOptions::default()).await.context("acking") }).await?;
                        tracing::debug!(target: "timing", "delivery applied and acked");
                    }
                }
            }
        }
    }
}

async fn prepare_or_error(d: lapin::Result<Delivery>, shared: Arc<Shared>, puller: Puller) -> anyhow::Result<Prepared> {
    let d = d.context("receiving from our queue")?;
    Ok(prepare(d, shared, puller).await)
}
