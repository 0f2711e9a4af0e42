//! The node's broker link: one task owns the AMQP connection and drives the sync engine
//! (`crate::engine`) over it. It publishes what the engine says (changes with confirms,
//! heartbeats and sync requests) on the update channel, and consumes the node's queue on
//! the master channel: each message is *prepared* (contents pulled from holders, several
//! messages ahead, concurrently), then handed to the engine strictly in order, then
//! acked. It reconnects with backoff; every (re)connect starts a new engine session,
//! which runs a sync. The engine's tree work runs on a blocking thread.

use crate::engine::{self, Action, Engine, EngineResult, NodeInfo};
use crate::node::Shared;
use crate::peer::{Puller, MAX_CONCURRENT_PULLS};
use crate::tree::Inval;
use anyhow::Context;
use futures_util::{stream, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::PublisherConfirm;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use wire::{topology, Envelope, RelPath, ToNode};

pub use crate::engine::SyncReport;

/// Deliveries the broker sends ahead of our acks, and messages prepared ahead of the one
/// being applied: enough to keep pulls busy, small enough to bound memory.
const PREFETCH: u16 = 64;
const PIPELINE: usize = 32;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How often the engine looks for missing contents due for another try (and syncs lost).
const RETRY_EVERY: Duration = Duration::from_secs(1);

type Responder = oneshot::Sender<anyhow::Result<SyncReport>>;

/// Where a background retry reports: the path, the revision it pulled for, success.
type RetryDone = (RelPath, wire::Revision, bool);

pub async fn run(broker: String, shared: Arc<Shared>, puller: Puller, mut sync_rx: mpsc::Receiver<Responder>, cancel: CancellationToken) {
    let mut backoff = broker_link::Backoff::default();
    let clock = Instant::now();
    loop {
        let r = session(&broker, &shared, &puller, &mut sync_rx, &cancel, &mut backoff, clock).await;
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
        let shared = self.shared.clone();
        let (engine, result) = tokio::task::spawn_blocking(move || {
            let result = f(&mut engine).map(|actions| {
                actions
                    .into_iter()
                    .filter_map(|a| match a {
                        Action::Invalidate(invals) => {
                            invalidate(&shared, &invals);
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
                    let confirm = broker_link::bounded(format!("publishing {id}"), async {
                        self.ch
                            .basic_publish(topology::UPDATE_EXCHANGE.into(), "".into(), BasicPublishOptions::default(), &payload, props)
                            .await
                            .context("publishing")
                    })
                    .await?;
                    self.shared.metrics.messages_out.inc();
                    if confirmed {
                        confirms.push((id, confirm));
                    }
                }
                Action::Pull { path, rev, hash, size, holders } => {
                    let (puller, shared, done) = (self.puller.clone(), self.shared.clone(), self.retry_done.clone());
                    tokio::spawn(async move {
                        let ok = pull_counted(&shared, &puller, &hash, size, &holders).await == 0;
                        let _ = done.send((path, rev, ok));
                    });
                }
                Action::Invalidate(invals) => invalidate(self.shared, &invals),
                Action::SyncDone { responders, result } => {
                    if let Ok(report) = &result {
                        *self.shared.last_sync.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
                    }
                    for r in responders {
                        let _ = r.send(result.clone().map_err(anyhow::Error::msg));
                    }
                }
            }
        }
        let n = confirms.len();
        for (id, confirm) in confirms {
            let c = broker_link::bounded(format!("waiting for the confirm of {id}"), async { confirm.await.context("waiting for a confirm") }).await?;
            anyhow::ensure!(c.is_ack(), "the broker refused message {id}");
        }
        if n > 0 {
            tracing::debug!(target: "timing", "published {n} message(s), confirmed");
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
    shared.metrics.messages_in.inc();
    tracing::debug!(target: "timing", "delivery received");
    let wanted = engine::wanted_contents(&shared.tree, &env.body);
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
            shared.metrics.bytes_pulled.inc_by(n);
            if n > 0 {
                shared.metrics.observe_pull(t.elapsed());
            }
            0
        }
        Err(e) => {
            shared.metrics.pulls_failed.inc();
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
    clock: Instant,
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
    let info = NodeInfo { id: shared.id.clone(), url: shared.url.clone(), allow_setid: shared.allow_setid, software: env!("CARGO_PKG_VERSION").to_string() };
    let (tree, pulls, now) = (shared.tree.clone(), shared.pulls_in_progress.load(Ordering::Relaxed), clock.elapsed());
    let (engine, first) = tokio::task::spawn_blocking(move || Engine::connected(tree, info, pulls, now)).await?;
    shared.connected.store(true, Ordering::Relaxed);
    backoff.reset();
    tracing::info!("connected to the broker; consuming {queue}");
    let (retry_done, mut retry_results) = mpsc::unbounded_channel();
    let mut s = Session { shared, user: broker_link::url_user(broker), puller, ch, engine: Some(engine), clock, retry_done };
    s.carry_out(first).await?;
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
            _ = outbox_ready.notified() => s.step(|e| Ok(e.on_outbox_ready())).await?,
            _ = hb.tick() => {
                let pulls = shared.pulls_in_progress.load(Ordering::Relaxed);
                s.step(move |e| Ok(e.on_heartbeat(pulls))).await?;
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
            item = pipeline.next() => {
                match item {
                    None => anyhow::bail!("the broker cancelled our consumer"),
                    Some(Err(e)) => return Err(e),
                    Some(Ok(Prepared::Bad(d, e))) => {
                        tracing::warn!("dead-lettering an undecodable message: {e}");
                        broker_link::bounded("rejecting", async { d.reject(BasicRejectOptions { requeue: false }).await.context("rejecting") }).await?;
                    }
                    Some(Ok(Prepared::Ready(d, env))) => {
                        let now = s.now();
                        s.step(move |e| e.on_message(env, now)).await?;
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
