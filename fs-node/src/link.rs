//! The node's broker link: one task owns the AMQP connection and drives the sync engine
//! (`crate::engine`) over it. It publishes what the engine says (changes with confirms,
//! heartbeats and sync requests) on the update channel, and consumes the node's queue on
//! the master channel: each message is *prepared* (contents pulled from holders, several
//! messages ahead, concurrently), then handed to the engine strictly in order, then
//! acked. It reconnects with backoff; every (re)connect starts a new engine session,
//! which runs a sync. The engine's tree work runs on a blocking thread.
//!
//! The task owns its state (connected or not, pulls in flight, the last sync's report);
//! others read it, and ask for syncs, through a [`LinkHandle`].

use crate::engine::{self, Action, Engine, EngineResult, NodeInfo};
use crate::metrics::Metrics;
use crate::puller::Puller;
use crate::tree::{Inval, Tree};
use anyhow::Context;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::PublisherConfirm;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use wire::{topology, Envelope, RelPath, ToManager, ToNode};

pub use crate::engine::SyncReport;

/// Deliveries the broker sends ahead of our acks, and messages prepared ahead of the one
/// being applied: enough to keep pulls busy, small enough to bound memory.
const PREFETCH: u16 = 64;
const PIPELINE: usize = 32;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How often the engine looks for missing contents due for another try (and syncs lost).
const RETRY_EVERY: Duration = Duration::from_secs(1);

type Responder = oneshot::Sender<anyhow::Result<SyncReport>>;

/// A question for the manager (`syncctl versions`, `trash`, `restore`) and where its
/// answer goes.
type Asked = (wire::Query, oneshot::Sender<anyhow::Result<wire::Answer>>);

/// Where a background retry reports: the path, the revision it pulled for, success.
type RetryDone = (RelPath, wire::Revision, bool);

/// The link's state as other tasks see it; written by the link task only.
#[derive(Default)]
struct LinkState {
    connected: AtomicBool,
    /// Why the broker blocks this node's connection (a memory or disk alarm), while it
    /// does: nothing the node sends gets through meanwhile. With the session it is
    /// about (a count of sessions): a late word from an ended session's watcher is
    /// not taken for the next one's.
    broker_blocked: Mutex<(u64, Option<String>)>,
    /// Why the last session with the broker ended, while the node is offline.
    offline_because: Mutex<Option<String>>,
    pulls_in_progress: AtomicU64,
    last_sync: Mutex<Option<SyncReport>>,
    /// What the manager said when it refused this node's sync because the operator
    /// forgot the node (`ToNode::Forgotten`), until a sync completes again.
    forgotten: Mutex<Option<String>>,
}

/// Reads the broker link's state and asks it for syncs.
#[derive(Clone)]
pub struct LinkHandle {
    state: Arc<LinkState>,
    sync_requests: mpsc::Sender<Responder>,
    asks: mpsc::Sender<Asked>,
}

impl LinkHandle {
    pub fn connected(&self) -> bool {
        self.state.connected.load(Ordering::Relaxed)
    }
    /// Why the broker blocks the node's connection, while it does.
    pub fn broker_blocked(&self) -> Option<String> {
        self.state.broker_blocked.lock().unwrap_or_else(|p| p.into_inner()).1.clone()
    }

    /// Fails at once where a request could not go out: offline, or blocked by the broker.
    fn check_can_send(&self, offline: &str) -> anyhow::Result<()> {
        if !self.connected() {
            anyhow::bail!("not connected to the broker: {offline}");
        }
        if let Some(reason) = self.broker_blocked() {
            anyhow::bail!(
                "the broker blocks this node's connection ({reason}: a memory or disk alarm of the broker); nothing goes out until it has room again"
            );
        }
        Ok(())
    }
    /// Why the node is offline: how its last session with the broker ended.
    pub fn offline_because(&self) -> Option<String> {
        self.state.offline_because.lock().unwrap_or_else(|p| p.into_inner()).clone().filter(|_| !self.connected())
    }
    pub fn pulls_in_progress(&self) -> u64 {
        self.state.pulls_in_progress.load(Ordering::Relaxed)
    }
    pub fn last_sync(&self) -> Option<SyncReport> {
        self.state.last_sync.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Why the manager refuses this node: the operator forgot it (`manager node forget`).
    pub fn forgotten(&self) -> Option<String> {
        self.state.forgotten.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks the broker link for a sync and waits for its report, however long the sync
    /// takes while it goes on: the engine gives up on one that makes no progress for
    /// `engine::SYNC_GIVE_UP` (and says so), and a lost connection ends the wait. (A
    /// fixed limit failed the sync of a million-file node while small files were
    /// written on its mount: the reply was still coming, page after page.)
    pub async fn sync_now(&self) -> anyhow::Result<SyncReport> {
        self.check_can_send("the node is offline; its changes are kept and will be sent when it reconnects")?;
        let (tx, rx) = oneshot::channel();
        self.sync_requests.send(tx).await.context("the broker link is not running")?;
        match rx.await {
            Ok(r) => r,
            Err(_) => anyhow::bail!("the connection was lost during the sync"),
        }
    }

    /// Asks the manager a question (kept versions, the trash, a restore) and waits for
    /// its answer.
    pub async fn ask(&self, query: wire::Query, timeout: Duration) -> anyhow::Result<wire::Answer> {
        self.check_can_send("the node is offline, and only the manager knows the kept versions")?;
        let (tx, rx) = oneshot::channel();
        self.asks.send((query, tx)).await.context("the broker link is not running")?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => anyhow::bail!("the connection was lost before the manager answered"),
            Err(_) => anyhow::bail!("the manager did not answer within {}s", timeout.as_secs()),
        }
    }
}

/// The broker link task, before it runs.
pub struct LinkTask {
    link: Link,
    sync_rx: mpsc::Receiver<Responder>,
    ask_rx: mpsc::Receiver<Asked>,
}

/// What the link task works with; fixed for its life.
struct Link {
    broker: String,
    info: NodeInfo,
    tree: Arc<Tree>,
    puller: Puller,
    metrics: Arc<Metrics>,
    /// Set once the mount is up: where kernel cache invalidations go.
    notifier: Arc<OnceLock<fuser::Notifier>>,
    state: Arc<LinkState>,
}

impl LinkTask {
    pub fn new(
        broker: String,
        info: NodeInfo,
        tree: Arc<Tree>,
        puller: Puller,
        metrics: Arc<Metrics>,
        notifier: Arc<OnceLock<fuser::Notifier>>,
    ) -> (LinkTask, LinkHandle) {
        let state = Arc::new(LinkState::default());
        let (tx, sync_rx) = mpsc::channel(16);
        let (asks, ask_rx) = mpsc::channel(16);
        let handle = LinkHandle { state: state.clone(), sync_requests: tx, asks };
        (LinkTask { link: Link { broker, info, tree, puller, metrics, notifier, state }, sync_rx, ask_rx }, handle)
    }

    /// Runs until cancelled, reconnecting with backoff.
    pub async fn run(self, cancel: CancellationToken) {
        let LinkTask { link, mut sync_rx, mut ask_rx } = self;
        let mut backoff = broker_link::Backoff::default();
        let clock = Instant::now();
        loop {
            let r = link.session(&mut sync_rx, &mut ask_rx, &cancel, &mut backoff, clock).await;
            link.state.connected.store(false, Ordering::Relaxed);
            {
                let mut blocked = link.state.broker_blocked.lock().unwrap_or_else(|p| p.into_inner());
                *blocked = (blocked.0 + 1, None);
            }
            match r {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!("broker link down: {e:#}; working offline and reconnecting");
                    *link.state.offline_because.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:#}"));
                }
            }
            // Sync requests made while offline fail at once with a clear reason.
            while let Ok(r) = sync_rx.try_recv() {
                let _ = r.send(Err(anyhow::anyhow!("not connected to the broker")));
            }
            while let Ok((_, r)) = ask_rx.try_recv() {
                let _ = r.send(Err(anyhow::anyhow!("not connected to the broker")));
            }
            if !backoff.wait(&cancel).await {
                return;
            }
        }
    }
}

impl Link {
    /// What pulling needs, cloned into the tasks that pull.
    fn pulls(&self) -> Pulls {
        Pulls { me: self.info.id.clone(), tree: self.tree.clone(), puller: self.puller.clone(), metrics: self.metrics.clone(), state: self.state.clone() }
    }
}

/// Longest a message waits for its contents, in pull stall windows
/// (`--pull-stall-secs`, 15 s): two, so a holder that answers at all is given a whole
/// window of transfer before later messages stop waiting for it.
const PREPARE_WAIT_STALLS: u32 = 2;

/// What a pull task needs: the puller, and the counters it keeps.
#[derive(Clone)]
struct Pulls {
    /// This node: a batch's items for other nodes need nothing pulled.
    me: wire::NodeId,
    tree: Arc<Tree>,
    puller: Puller,
    metrics: Arc<Metrics>,
    state: Arc<LinkState>,
}

struct Session<'a> {
    link: &'a Link,
    /// The broker user this node connects as: every message carries it as `user_id`,
    /// which the broker checks and the manager matches against the sender.
    user: Option<String>,
    pulls: Pulls,
    /// The channel changes go out on; its operations wait while the broker blocks the
    /// connection (`broker_link::Confirmed`).
    ch: broker_link::Confirmed,
    /// The engine; out only while it works on a blocking thread.
    engine: Option<Engine<Responder>>,
    clock: Instant,
    retry_done: mpsc::UnboundedSender<RetryDone>,
}

impl Session<'_> {
    fn now(&self) -> engine::Now {
        self.clock.elapsed()
    }

    /// Runs one engine step on a blocking thread (it works on the tree), drops the
    /// kernel entries it says changed while still there, then carries out the rest.
    async fn step(&mut self, f: impl FnOnce(&mut Engine<Responder>) -> EngineResult<Vec<Action<Responder>>> + Send + 'static) -> anyhow::Result<()> {
        let mut engine = self.engine.take().expect("the engine is back after every step");
        let notifier = self.link.notifier.clone();
        let (engine, result) = tokio::task::spawn_blocking(move || {
            let result = f(&mut engine).map(|actions| {
                actions
                    .into_iter()
                    .filter_map(|a| match a {
                        Action::Invalidate(invals) => {
                            invalidate(&notifier, &invals);
                            None
                        }
                        a => Some(a),
                    })
                    .collect::<Vec<_>>()
            });
            (engine, result)
        })
        .await
        .context("the sync engine panicked")?;
        self.engine = Some(engine);
        self.carry_out(result?).await
    }

    /// Carries out the engine's actions in order. Publishes go out in order on the one
    /// channel; the confirms of those that need one are awaited together at the end.
    async fn carry_out(&mut self, actions: Vec<Action<Responder>>) -> anyhow::Result<()> {
        let mut confirms: Vec<(String, PublisherConfirm)> = Vec::new();
        for action in actions {
            match action {
                Action::Publish { env, confirmed } => {
                    let id = env.id.to_string();
                    let props = broker_link::message_properties(&id, self.user.as_deref());
                    let payload = env.encode();
                    let confirm = self
                        .ch
                        .bounded(format!("publishing {id}"), async {
                            self.ch
                                .ch
                                .basic_publish(topology::UPDATE_EXCHANGE.into(), "".into(), BasicPublishOptions::default(), &payload, props)
                                .await
                                .context("publishing")
                        })
                        .await?;
                    self.link.metrics.messages_out.inc();
                    if confirmed {
                        confirms.push((id, confirm));
                    }
                }
                Action::Pull { path, rev, hash, size, holders } => {
                    let (pulls, done) = (self.pulls.clone(), self.retry_done.clone());
                    tokio::spawn(async move {
                        let basis = (size >= crate::puller::CHUNKED_MIN_BYTES).then(|| pulls.tree.local_hash(&path)).flatten();
                        let ok = pulls.pull_counted(&hash, size, &holders, basis.as_ref()).await == 0;
                        let _ = done.send((path, rev, ok));
                    });
                }
                Action::Invalidate(invals) => invalidate(&self.link.notifier, &invals),
                Action::Refused(reason) => *self.link.state.forgotten.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason),
                Action::SyncDone { responders, result } => {
                    if let Ok(report) = &result {
                        *self.link.state.last_sync.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
                        // Taken again (a manager brought back from a copy older than the
                        // `forget`): no longer refused.
                        *self.link.state.forgotten.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    }
                    for r in responders {
                        let _ = r.send(result.clone().map_err(anyhow::Error::msg));
                    }
                }
            }
        }
        let n = confirms.len();
        for (id, confirm) in confirms {
            let c = self.ch.bounded(format!("waiting for the confirm of {id}"), async { confirm.await.context("waiting for a confirm") }).await?;
            anyhow::ensure!(c.is_ack(), "the broker refused message {id}");
        }
        if n > 0 {
            tracing::debug!(target: "timing", "published {n} message(s), confirmed");
        }
        Ok(())
    }
}

fn invalidate(notifier: &OnceLock<fuser::Notifier>, invals: &[Inval]) {
    let Some(n) = notifier.get() else {
        return;
    };
    // A directory whose entries changed has new attributes too (mtime, nlink): each such
    // parent is invalidated once, after its entries.
    let mut parents = std::collections::BTreeSet::new();
    for i in invals {
        // ENOENT means the kernel had nothing cached: fine.
        let _ = match i {
            Inval::Entry { parent, name } => {
                parents.insert(*parent);
                n.inval_entry(fuser::INodeNo(*parent), name)
            }
            Inval::Inode { ino } => n.inval_inode(fuser::INodeNo(*ino), 0, 0),
        };
    }
    for p in parents {
        let _ = n.inval_inode(fuser::INodeNo(p), 0, 0);
    }
}

/// A delivery with its decoded message and the result of pulling what it needs.
#[allow(clippy::large_enum_variant)] // one per delivery in flight, moved once
enum Prepared {
    Bad(Delivery, wire::DecodeError),
    Ready(Delivery, Envelope<ToNode>),
}

impl Pulls {
    /// Decodes a delivery and pulls the contents it needs (several at once).
    async fn prepare(self, d: Delivery) -> Prepared {
        let env = match Envelope::<ToNode>::decode(&d.data) {
            Ok(e) => e,
            Err(e) => return Prepared::Bad(d, e),
        };
        self.metrics.messages_in.inc();
        tracing::debug!(target: "timing", "delivery received");
        // Every holder named is remembered: an on-demand open asks them.
        for part in env.body.parts_for(&self.me) {
            match part {
                ToNode::Applied { entry, .. } | ToNode::Decided { current: entry, .. } => self.puller.learn_holders(&entry.holders),
                ToNode::SyncReply { entries, .. } => self.puller.learn_holders(entries.iter().flat_map(|e| &e.holders)),
                ToNode::Keep { items } => self.puller.learn_holders(items.iter().flat_map(|i| &i.holders)),
                _ => {}
            }
        }
        let wanted = engine::wanted_contents(&self.tree, &self.me, &env.body);
        self.pull_small_together(&wanted).await;
        // Each pull is a task of its own (the puller bounds how many run at once), waited
        // for a bounded time: a holder sending just enough not to count as stalled must
        // not hold back every message behind this one. Past the wait the message is
        // applied without what is still coming, as after a failed pull (the engine
        // keeps the old state and retries, joining the pull still under way).
        let pulls: Vec<_> = wanted
            .into_iter()
            .map(|w| {
                let pulls = self.clone();
                tokio::spawn(async move { pulls.pull_counted(&w.hash, w.size, &w.holders, w.basis.as_ref()).await })
            })
            .collect();
        let wait = self.puller.stall_timeout() * PREPARE_WAIT_STALLS;
        if tokio::time::timeout(wait, futures_util::future::join_all(pulls)).await.is_err() {
            tracing::warn!("a message's contents are still coming after {wait:?}: it is applied without them, and they keep coming");
        }
        tracing::debug!(target: "timing", "delivery prepared");
        Prepared::Ready(d, env)
    }

    /// Asks for the small contents among `wanted` together, several per request to
    /// each one's first holder (`Puller::pull_small_batch`): a burst of small files
    /// costs a request per holder and a transaction per batch instead of one each.
    /// Whatever does not come this way is pulled alone afterwards (every holder is
    /// tried there, and one that misbehaves is dropped).
    async fn pull_small_together(&self, wanted: &[engine::Wanted]) {
        let small_max = self.tree.store().small_max();
        let mut by_holder: HashMap<&wire::Holder, Vec<(wire::ContentHash, u64)>> = HashMap::new();
        for w in wanted.iter().filter(|w| w.size <= small_max) {
            if let Some(holder) = w.holders.iter().find(|h| h.node != self.me) {
                by_holder.entry(holder).or_default().push((w.hash.clone(), w.size));
            }
        }
        // The holders at once; each one's batches in turn, until one fails (the puller
        // then does not ask that holder for batches for a while).
        futures_util::future::join_all(by_holder.into_iter().map(|(holder, items)| async move {
            for batch in items.chunks(crate::puller::SMALL_BATCH_MAX).filter(|b| b.len() > 1) {
                self.state.pulls_in_progress.fetch_add(batch.len() as u64, Ordering::Relaxed);
                let r = self.puller.pull_small_batch(holder, batch).await;
                self.state.pulls_in_progress.fetch_sub(batch.len() as u64, Ordering::Relaxed);
                match r {
                    Ok(n) => {
                        self.metrics.bytes_pulled.inc_by(n);
                    }
                    Err(e) => {
                        tracing::debug!("asking {} for {} small contents at once: {e:#}; pulling them one by one", holder.node, batch.len());
                        break;
                    }
                }
            }
        }))
        .await;
    }

    /// Pulls one content, keeping the node's counters; returns 1 if it failed, else 0.
    async fn pull_counted(&self, hash: &wire::ContentHash, size: u64, holders: &[wire::Holder], basis: Option<&wire::ContentHash>) -> u64 {
        self.state.pulls_in_progress.fetch_add(1, Ordering::Relaxed);
        let t = Instant::now();
        let r = self.puller.pull_with_basis(hash, size, holders, basis).await;
        self.state.pulls_in_progress.fetch_sub(1, Ordering::Relaxed);
        self.metrics.count_pull(&r, t.elapsed());
        match r {
            Ok(_) => 0,
            Err(e) => {
                tracing::warn!("{e:#}; will retry");
                1
            }
        }
    }
}

/// How often a node with files on demand counts its local and remote bytes for its
/// heartbeat (a pass over the tree and a stat per content).
const RESIDENCY_EVERY: Duration = Duration::from_secs(30);
const RESIDENCY_SOONEST: Duration = Duration::from_secs(2);

/// The last count of a node's bytes here and on demand, and when messages last came in.
struct ResidencyCount {
    /// When it was counted, the messages received by then, and the count.
    last: Option<(Instant, u64, wire::NodeResidency)>,
    msgs_seen: u64,
    msgs_changed: Instant,
}

impl Default for ResidencyCount {
    fn default() -> Self {
        ResidencyCount { last: None, msgs_seen: 0, msgs_changed: Instant::now() }
    }
}

impl Link {
    /// What a node with files on demand tells the manager in its heartbeat (None for
    /// other nodes): its bytes local and on demand (counted again every
    /// `RESIDENCY_EVERY`), its pin rules and its pulls under way.
    async fn residency(&self, counted: &mut ResidencyCount) -> Option<wire::NodeResidency> {
        if !self.tree.uses_on_demand() {
            return None;
        }
        // Counted again every RESIDENCY_EVERY, or sooner once messages from the manager
        // came in (the tree may have moved on) and none came for RESIDENCY_SOONEST: a
        // join or a large change is counted when it is done, not while it runs.
        let msgs = self.metrics.messages_in.get();
        if msgs != counted.msgs_seen {
            counted.msgs_seen = msgs;
            counted.msgs_changed = Instant::now();
        }
        let quiet = counted.msgs_changed.elapsed() >= RESIDENCY_SOONEST;
        let stale = counted.last.as_ref().is_none_or(|(at, at_msgs, _)| at.elapsed() >= RESIDENCY_EVERY || (*at_msgs != msgs && quiet));
        if stale {
            let tree = self.tree.clone();
            let r = tokio::task::spawn_blocking(move || tree.residency()).await.ok()?;
            counted.last = Some((Instant::now(), msgs, wire::NodeResidency { local_bytes: r.local_bytes, remote_bytes: r.remote_bytes, ..Default::default() }));
        }
        let mut out = counted.last.as_ref()?.2.clone();
        let pins = self.tree.pins();
        let named: Vec<(String, bool)> =
            pins.iter().filter(|(p, _)| p.len() <= wire::MAX_HEARTBEAT_PIN_BYTES).take(wire::MAX_HEARTBEAT_PINS).cloned().collect();
        out.more_pins = (pins.len() - named.len()) as u32;
        out.pins = named;
        out.pulls = self
            .puller
            .in_progress()
            .into_iter()
            .take(wire::MAX_HEARTBEAT_PULLS)
            .map(|p| wire::PullState { hash: p.hash, size: p.size, done: p.done })
            .collect();
        Some(out)
    }

    async fn session(
        &self,
        sync_rx: &mut mpsc::Receiver<Responder>,
        ask_rx: &mut mpsc::Receiver<Asked>,
        cancel: &CancellationToken,
        backoff: &mut broker_link::Backoff,
        clock: Instant,
    ) -> anyhow::Result<()> {
        let broker = self.broker.as_str();
        let conn = broker_link::connect(broker).await?;
        let ch = broker_link::Confirmed::open(&conn, cancel.clone()).await?;
        let state = self.state.clone();
        let this_session = state.broker_blocked.lock().unwrap_or_else(|p| p.into_inner()).0;
        let _blocks = broker_link::watch_blocks(&conn, move |reason| {
            let mut blocked = state.broker_blocked.lock().unwrap_or_else(|p| p.into_inner());
            if blocked.0 == this_session {
                blocked.1 = reason.map(str::to_string);
            }
        });
        let own_user = broker_link::url_user(broker).is_some_and(|u| wire::topology::node_of_user(&u).is_some());
        let queue = broker_link::prepare_node_topology(&conn, &self.info.id, own_user).await?;
        let cons = conn.create_channel().await.context("opening the consumer channel")?;
        cons.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        // Exclusively: a second node with this id (a cloned machine, a second mount
        // started by mistake) would take every other message of this queue and diverge.
        // The broker refuses it; it stays offline and says why until this one is gone.
        broker_link::refuse_if_consumed(&conn, &queue, &format!("is node {} running elsewhere too?", self.info.id)).await?;
        let exclusive = BasicConsumeOptions { exclusive: true, ..Default::default() };
        let consumer = cons.basic_consume(queue.as_str().into(), self.info.id.as_str().into(), exclusive, FieldTable::default()).await.with_context(|| {
            format!("consuming {queue}, exclusively (the broker refuses a second consumer: is node {} running elsewhere too?)", self.info.id)
        })?;
        let info = self.info.clone();
        let (tree, pulls, now) = (self.tree.clone(), self.state.pulls_in_progress.load(Ordering::Relaxed), clock.elapsed());
        let (engine, first) = tokio::task::spawn_blocking(move || Engine::connected(tree, info, pulls, now)).await?;
        self.state.connected.store(true, Ordering::Relaxed);
        backoff.reset();
        tracing::info!("connected to the broker; consuming {queue}");
        let (retry_done, mut retry_results) = mpsc::unbounded_channel();
        let link = self;
        let mut s = Session { link, user: broker_link::url_user(broker), pulls: link.pulls(), ch, engine: Some(engine), clock, retry_done };
        s.carry_out(first).await?;
        let pulls = link.pulls();
        let mut pipeline = consumer.map(move |d| prepare_or_error(d, pulls.clone())).buffered(PIPELINE);
        let mut hb = tokio::time::interval(HEARTBEAT_EVERY);
        let mut retry = tokio::time::interval(RETRY_EVERY);
        let outbox_ready = link.tree.outbox_ready.clone();
        // Questions sent to the manager in this session, by request id.
        let mut asked: HashMap<wire::MessageId, oneshot::Sender<anyhow::Result<wire::Answer>>> = HashMap::new();
        let mut residency_counted = ResidencyCount::default();
        loop {
            let gather_due = s.engine.as_ref().and_then(|e| e.publish_due()).map(|due| tokio::time::Instant::from_std(clock + due));
            tokio::select! {
                _ = cancel.cancelled() => {
                    broker_link::close(&conn, "node shutting down").await;
                    return Ok(());
                }
                // While changes gather (a decision awaited), the engine sends them when it
                // comes or the wait is up: new changes need not wake it, one wake per
                // change (a worker, a blocking thread, back) cost more than the change.
                // A notification meanwhile is kept by `Notify` and taken after.
                _ = outbox_ready.notified(), if gather_due.is_none() => {
                    let now = s.now();
                    s.step(move |e| Ok(e.on_outbox_ready(now))).await?;
                }
                // Changes gathered while others await their decisions: the wait is up.
                _ = tokio::time::sleep_until(gather_due.unwrap_or_else(tokio::time::Instant::now)), if gather_due.is_some() => {
                    let now = s.now();
                    s.step(move |e| Ok(e.on_outbox_ready(now))).await?;
                }
                _ = hb.tick() => {
                    // The link's pulls, or all under way (on-demand fetches too).
                    let pulls = link.state.pulls_in_progress.load(Ordering::Relaxed).max(link.puller.pulls_under_way() as u64);
                    let residency = link.residency(&mut residency_counted).await;
                    let now = s.now();
                    s.step(move |e| Ok(e.on_heartbeat(pulls, residency, now))).await?;
                }
                _ = retry.tick() => {
                    let now = s.now();
                    s.step(move |e| Ok(e.on_retry_tick(now))).await?;
                }
                Some((path, rev, ok)) = retry_results.recv() => {
                    let now = s.now();
                    s.step(move |e| e.pull_finished(&path, rev, ok, now)).await?;
                }
                Some(r) = sync_rx.recv() => {
                    let now = s.now();
                    s.step(move |e| Ok(e.on_sync_requested(Some(r), now))).await?;
                }
                Some((query, r)) = ask_rx.recv() => {
                    asked.retain(|_, r| !r.is_closed());
                    let env = Envelope::new(link.tree.env().new_id(), link.info.id.clone(), ToManager::Ask { query });
                    asked.insert(env.id.clone(), r);
                    s.carry_out(vec![Action::Publish { env, confirmed: true }]).await?;
                }
                item = pipeline.next() => {
                    match item {
                        None => anyhow::bail!("the broker cancelled our consumer"),
                        Some(Err(e)) => return Err(e),
                        Some(Ok(Prepared::Bad(d, e))) => {
                            tracing::warn!("dead-lettering an undecodable message: {e}");
                            s.ch.bounded("rejecting", async { d.reject(BasicRejectOptions { requeue: false }).await.context("rejecting") }).await?;
                        }
                        Some(Ok(Prepared::Ready(d, env))) => {
                            if let ToNode::Answer { request, answer } = &env.body {
                                if let Some(r) = asked.remove(request) {
                                    let _ = r.send(Ok(answer.clone()));
                                }
                            }
                            let now = s.now();
                            s.step(move |e| e.on_message(env, now)).await?;
                            s.ch.bounded("acking", async { d.ack(BasicAckOptions::default()).await.context("acking") }).await?;
                            tracing::debug!(target: "timing", "delivery applied and acked");
                        }
                    }
                }
            }
        }
    }
}

async fn prepare_or_error(d: lapin::Result<Delivery>, pulls: Pulls) -> anyhow::Result<Prepared> {
    let d = d.context("receiving from our queue")?;
    Ok(pulls.prepare(d).await)
}
