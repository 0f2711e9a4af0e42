//! The node's broker link: one task owns the AMQP connection. It publishes the outbox
//! (with confirms), heartbeats and sync requests on the update channel, and consumes the
//! node's queue on the master channel: each message is *prepared* (contents pulled from
//! holders, several messages ahead, concurrently) and then *applied* strictly in order,
//! then acked. It reconnects with backoff and runs a sync after every (re)connect.
//!
//! Content that cannot be pulled in time does not hold anything up: the message is
//! applied without that path (the path keeps its old state), and the link retries just
//! that content with backoff, in the background, applying the entry once it is there.
//! Sync requests are coalesced: at most one sync is in flight and one more waits. A sync
//! reply comes in pages, applied as they arrive; the sync completes on the last one.

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
/// How often the link looks for missing contents due for another try (and syncs lost).
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// First and longest wait before pulling a missing content again.
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// A sync whose reply has not come on (no page) within this is taken for lost (its callers
/// are told).
const SYNC_GIVE_UP: Duration = Duration::from_secs(120);
/// Syncs start at most this often; requests in between wait for the next one (each
/// sync makes the manager read the whole tree).
const MIN_SYNC_INTERVAL: Duration = Duration::from_secs(1);

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
    responders: Vec<Responder>,
    started: Instant,
    /// When the request was sent or its last page came.
    progress: Instant,
    pushed: u64,
    conflicts_before: u64,
    /// The page of the reply that comes next.
    next_page: u32,
    /// Every path the reply has named so far. Paths only: each page's entries are
    /// applied when it comes and not kept.
    known: HashSet<RelPath>,
    pulled: u64,
    failed: u64,
    /// Files whose committed content this node lost (found at start-up), with the hash
    /// they need; read when the first page comes.
    damaged: HashMap<RelPath, wire::ContentHash>,
}

/// An entry applied without its content (no holder could give it in time); retried.
struct Missing {
    entry: Entry,
    next_try: Instant,
    backoff: Duration,
    in_flight: bool,
}

/// Where a background retry reports: the path, the revision it pulled for, success.
type RetryDone = (RelPath, wire::Revision, bool);

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
    /// The broker user this node connects as: every message carries it as `user_id`,
    /// which the broker checks and the manager matches against the sender.
    user: Option<String>,
    puller: &'a Puller,
    ch: lapin::Channel,
    syncs: HashMap<MessageId, ActiveSync>,
    /// Callers (and manager requests) waiting for the sync after the one in flight.
    next_sync: Option<Vec<Responder>>,
    last_sync_start: Option<Instant>,
    missing: HashMap<RelPath, Missing>,
    retry_done: mpsc::UnboundedSender<RetryDone>,
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
            let sends = chunk.iter().map(|(id, p)| broker_link::publish_confirmed_as(&self.ch, topology::UPDATE_EXCHANGE, "", id, p, self.user.as_deref()));
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
            topology::UPDATE_EXCHANGE.into(),
            "".into(),
            BasicPublishOptions::default(),
            &payload,
            broker_link::message_properties(env.id.as_str(), self.user.as_deref()),
        );
        let _confirm = broker_link::bounded("publishing", async { publish.await.context("publishing") }).await?;
        self.shared.metrics.messages_out.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Asks for a sync. While one is in flight, or one started less than
    /// [`MIN_SYNC_INTERVAL`] ago, the request waits for the next one: a flood of requests
    /// costs the manager at most one sync per interval.
    async fn request_sync(&mut self, responder: Option<Responder>) -> anyhow::Result<()> {
        self.next_sync.get_or_insert_with(Vec::new).extend(responder);
        self.start_next_sync().await
    }

    /// Starts the waiting sync, if any, none is in flight and the interval has passed
    /// (the retry tick calls this again).
    async fn start_next_sync(&mut self) -> anyhow::Result<()> {
        if self.syncs.is_empty() && self.last_sync_start.is_none_or(|t| t.elapsed() >= MIN_SYNC_INTERVAL) {
            if let Some(responders) = self.next_sync.take() {
                self.start_sync(responders).await?;
            }
        }
        Ok(())
    }

    /// Sends the outbox, then a `Sync`; the reply comes after the manager has decided
    /// every change sent before it.
    async fn start_sync(&mut self, responders: Vec<Responder>) -> anyhow::Result<()> {
        self.last_sync_start = Some(Instant::now());
        let pushed = self.publish_outbox().await?;
        let request = new_id();
        let since = self.sync_since();
        let env = self.envelope(ToManager::Sync { request: request.clone(), url: self.shared.url.clone(), since, paged: true });
        broker_link::publish_confirmed_as(&self.ch, topology::UPDATE_EXCHANGE, "", env.id.as_str(), &env.encode(), self.user.as_deref()).await?;
        self.shared.metrics.messages_out.fetch_add(1, Ordering::Relaxed);
        let conflicts_before = self.shared.tree.stats().conflicts_seen;
        let now = Instant::now();
        let sync = ActiveSync {
            responders,
            started: now,
            progress: now,
            pushed,
            conflicts_before,
            next_page: 0,
            known: HashSet::new(),
            pulled: 0,
            failed: 0,
            damaged: HashMap::new(),
        };
        self.syncs.insert(request, sync);
        Ok(())
    }

    /// The revision up to which the manager may leave deleted paths out of the reply
    /// (docs/sync.md, *Deleted paths in a sync reply*). This node has applied every delete
    /// up to the highest revision it has taken: deletes come on its queue in revision
    /// order, and a sync reply brings what the queue could not. A reply cut off half-way
    /// may have moved that revision past deletes it had not brought yet, so once a sync
    /// has completed, no further than its head. A node that has taken no revision has no
    /// path the manager knew, and needs no deleted path at all.
    fn sync_since(&self) -> wire::Revision {
        let taken = self.shared.tree.stats().last_revision;
        if taken == 0 {
            return wire::Revision(u64::MAX);
        }
        // The last completed sync's head, also from before a restart: a sync cut off
        // half-way, or a queue that dropped old messages while the node was away, may
        // have moved `taken` past deletes it never brought.
        let completed = self.shared.tree.synced_head();
        wire::Revision(completed.map_or(taken, |head| head.min(taken)))
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
    /// `entry` is another node's state of the path (a broadcast of someone else's change,
    /// a sync reply); set-id bits are cleared in it unless allowed. Own decided changes
    /// go through `apply_decided` and keep what this node's user set.
    async fn apply_entry(&mut self, mut entry: Entry) -> anyhow::Result<Applied> {
        self.clear_setid(&mut entry);
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

    /// Set-id bits from other nodes are cleared unless the operator allows them.
    fn clear_setid(&self, entry: &mut Entry) {
        if !self.shared.allow_setid {
            if let Some(v) = &mut entry.version {
                if v.mode & 0o6000 != 0 {
                    tracing::info!(path = %entry.path, mode = format!("{:o}", v.mode), "clearing set-id bits that came from another node");
                    v.mode &= !0o6000;
                }
            }
        }
    }

    /// Tells the manager we can serve what we just took, and keeps an entry whose content
    /// was not there for a retry (a newer entry of the path replaces it).
    async fn after_apply(&mut self, entry: &Entry, applied: &Applied) -> anyhow::Result<()> {
        if applied.missing_content {
            let retry = self.missing.entry(entry.path.clone()).or_insert_with(|| Missing {
                entry: entry.clone(),
                next_try: Instant::now() + RETRY_FIRST,
                backoff: RETRY_FIRST,
                in_flight: false,
            });
            if entry.rev >= retry.entry.rev {
                retry.entry = entry.clone();
            }
        } else if self.missing.get(&entry.path).is_some_and(|m| entry.rev >= m.entry.rev) {
            self.missing.remove(&entry.path);
        }
        if applied.changed {
            if let Some(Version { content: Content::File { hash, .. }, .. }) = &entry.version {
                self.publish_unconfirmed(ToManager::Have { path: entry.path.clone(), rev: entry.rev, hash: hash.clone() }).await?;
            }
        }
        Ok(())
    }

    async fn apply(&mut self, env: Envelope<ToNode>) -> anyhow::Result<()> {
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
            ToNode::SyncReply { request, head, entries, page, more } => {
                self.sync_reply_page(request, head, entries, page, more).await?;
            }
            ToNode::SyncRequested {} => {
                tracing::info!("the manager asked for a sync");
                self.request_sync(None).await?;
            }
        }
        Ok(())
    }
}

impl Session<'_> {
    /// One page of a sync reply. Its entries are applied at once, like broadcasts (each
    /// is the state a path had, and an older state than the node's is ignored). The sync
    /// it answers gathers the paths it names; only the last page pushes the local paths
    /// the manager did not name, and reports. A page of a sync this node no longer waits
    /// for (sent before a reconnection, or given up) completes nothing.
    async fn sync_reply_page(&mut self, request: MessageId, head: wire::Revision, entries: Vec<Entry>, page: u32, more: bool) -> anyhow::Result<()> {
        let mut sync = self.syncs.remove(&request);
        if let Some(s) = sync.take_if(|s| s.next_page != page) {
            // Pages of one reply come in order on our queue; a gap means one was lost
            // (dead-lettered). The reply cannot tell what is unknown any more: its callers
            // wait for the next sync instead.
            tracing::warn!(%request, page, expected = s.next_page, "a sync reply page is missing; syncing again");
            self.next_sync.get_or_insert_with(Vec::new).extend(s.responders);
        }
        let Some(mut s) = sync else {
            tracing::debug!(%request, page, "a page of a sync no longer waited for: applying its entries only");
            for entry in entries {
                self.apply_entry(entry).await?;
            }
            return self.start_next_sync().await;
        };
        if page == 0 {
            let tree = self.shared.tree.clone();
            s.damaged = tokio::task::spawn_blocking(move || tree.damaged()).await?.into_iter().collect();
        }
        let mut heal = Vec::new();
        for entry in entries {
            s.known.insert(entry.path.clone());
            if matches!((&entry.version, s.damaged.get(&entry.path)), (Some(Version { content: Content::File { hash, .. }, .. }), Some(lost)) if hash == lost) {
                heal.push(entry.clone());
            }
            let a = self.apply_entry(entry).await?;
            s.pulled += a.changed as u64;
            s.failed += a.missing_content as u64;
        }
        self.heal_damaged(heal);
        s.progress = Instant::now();
        if more {
            s.next_page += 1;
            self.syncs.insert(request, s);
            return Ok(());
        }
        let tree = self.shared.tree.clone();
        let known = std::mem::take(&mut s.known);
        let unknown = tokio::task::spawn_blocking(move || tree.push_unknown(&known)).await?.map_err(|e| anyhow::anyhow!("pushing local paths: {e}"))? as u64;
        self.publish_outbox().await?;
        let report = SyncReport {
            pushed: s.pushed + unknown,
            pulled: s.pulled,
            conflicts: self.shared.tree.stats().conflicts_seen.saturating_sub(s.conflicts_before),
            failed: s.failed,
            head: head.0,
            seconds: s.started.elapsed().as_secs_f64(),
        };
        tracing::info!(pushed = report.pushed, pulled = report.pulled, conflicts = report.conflicts, failed = report.failed, pages = page + 1, "sync done");
        *self.shared.last_sync.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
        let tree = self.shared.tree.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || tree.set_synced_head(head.0)).await? {
            tracing::warn!("{e}; the next sync asks for more deleted paths");
        }
        for r in s.responders {
            let _ = r.send(Ok(report.clone()));
        }
        self.start_next_sync().await
    }

    /// Files whose committed content vanished from the store (found at start-up) are
    /// pulled again like any missing content, from the holders the sync reply names:
    /// `entries` are the reply's entries of such files, already applied.
    fn heal_damaged(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            let Some(hash) = self.shared.tree.needs_content(&entry) else { continue };
            if !self.missing.contains_key(&entry.path) {
                tracing::warn!(path = %entry.path, "pulling {hash} again: this node's copy was lost");
                let path = entry.path.clone();
                self.missing.insert(path, Missing { entry, next_try: Instant::now(), backoff: RETRY_FIRST, in_flight: false });
            }
        }
    }

    /// Starts a background pull for every missing content due for another try, and gives
    /// up on syncs the manager never answered.
    async fn retry_due(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        for (path, m) in self.missing.iter_mut().filter(|(_, m)| !m.in_flight && m.next_try <= now) {
            let Some(Version { content: Content::File { hash, size }, .. }) = m.entry.version.clone() else {
                continue;
            };
            m.in_flight = true;
            let (puller, shared, done) = (self.puller.clone(), self.shared.clone(), self.retry_done.clone());
            let (path, rev, holders) = (path.clone(), m.entry.rev, m.entry.holders.clone());
            tokio::spawn(async move {
                let ok = pull_counted(&shared, &puller, &hash, size, &holders).await == 0;
                let _ = done.send((path, rev, ok));
            });
        }
        let lost: Vec<MessageId> = self.syncs.iter().filter(|(_, s)| s.progress.elapsed() > SYNC_GIVE_UP).map(|(id, _)| id.clone()).collect();
        for id in lost {
            if let Some(s) = self.syncs.remove(&id) {
                tracing::warn!("the manager did not answer a sync within {SYNC_GIVE_UP:?}");
                for r in s.responders {
                    let _ = r.send(Err(anyhow::anyhow!("the manager did not answer within {}s", SYNC_GIVE_UP.as_secs())));
                }
            }
        }
        self.start_next_sync().await
    }

    /// A background retry ended: apply the entry if its content came, else back off. When
    /// the holders it knows keep failing, a sync (coalesced) brings the current holders.
    async fn retry_finished(&mut self, (path, rev, ok): RetryDone) -> anyhow::Result<()> {
        let Some(m) = self.missing.get_mut(&path).filter(|m| m.entry.rev == rev) else {
            return Ok(());
        };
        m.in_flight = false;
        if ok {
            let entry = m.entry.clone();
            self.apply_entry(entry).await?;
            return Ok(());
        }
        m.backoff = (m.backoff * 2).min(RETRY_MAX);
        m.next_try = Instant::now() + m.backoff;
        if m.backoff == RETRY_MAX {
            self.request_sync(None).await?;
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
    Ready(Delivery, Envelope<ToNode>),
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
    let wanted: Vec<(wire::ContentHash, u64, Vec<wire::Holder>)> = entries
        .into_iter()
        .filter_map(|e| match (&e.version, shared.tree.needs_content(e)) {
            (Some(Version { content: Content::File { size, .. }, .. }), Some(h)) => Some((h, (*size, e.holders.clone()))),
            _ => None,
        })
        .collect::<HashMap<_, _>>()
        .into_iter()
        .map(|(h, (size, holders))| (h, size, holders))
        .collect();
    stream::iter(wanted)
        .map(|(hash, size, holders)| {
            let shared = shared.clone();
            let puller = puller.clone();
            async move { pull_counted(&shared, &puller, &hash, size, &holders).await }
        })
        .buffer_unordered(MAX_CONCURRENT_PULLS)
        .for_each(|_| async {})
        .await;
    tracing::debug!(target: "timing", "delivery prepared");
    Prepared::Ready(d, env)
}

/// Pulls one content, keeping the node's counters; returns 1 if it failed, else 0.
async fn pull_counted(shared: &Shared, puller: &Puller, hash: &wire::ContentHash, size: u64, holders: &[wire::Holder]) -> u64 {
    shared.pulls_in_progress.fetch_add(1, Ordering::Relaxed);
    let t = Instant::now();
    let r = puller.pull(hash, size, holders).await;
    shared.pulls_in_progress.fetch_sub(1, Ordering::Relaxed);
    match r {
        Ok(n) => {
            shared.metrics.bytes_pulled.fetch_add(n, Ordering::Relaxed);
            if n > 0 {
                shared.metrics.observe_pull(t.elapsed());
            }
            0
        }
        Err(e) => {
            shared.metrics.pulls_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("{e:#}; will retry");
            1
        }
    }
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
    let own_user = broker_link::url_user(broker).is_some_and(|u| wire::topology::node_of_user(&u).is_some());
    let queue = broker_link::prepare_node_topology(&conn, &shared.id, own_user).await?;
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
    let (retry_done, mut retry_results) = mpsc::unbounded_channel();
    let mut s = Session {
        shared,
        user: broker_link::url_user(broker),
        puller,
        ch,
        syncs: HashMap::new(),
        next_sync: None,
        last_sync_start: None,
        missing: HashMap::new(),
        retry_done,
    };
    s.heartbeat().await?;
    s.start_sync(Vec::new()).await?;
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
            _ = retry.tick() => s.retry_due().await?,
            Some(done) = retry_results.recv() => s.retry_finished(done).await?,
            Some(r) = sync_rx.recv() => s.request_sync(Some(r)).await?,
            item = pipeline.next() => {
                match item {
                    None => anyhow::bail!("the broker cancelled our consumer"),
                    Some(Err(e)) => return Err(e),
                    Some(Ok(Prepared::Bad(d, e))) => {
                        tracing::warn!("dead-lettering an undecodable message: {e}");
                        broker_link::bounded("rejecting", async { d.reject(BasicRejectOptions { requeue: false }).await.context("rejecting") }).await?;
                    }
                    Some(Ok(Prepared::Ready(d, env))) => {
                        s.apply(env).await?;
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
