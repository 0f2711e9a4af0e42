//! The manager's broker loop: one task owns the AMQP session. It consumes the update
//! queue in batches, handles a batch in one SQLite transaction, publishes the outbox with
//! confirms, and only then acks the batch (so a crash redelivers, and redelivered ids
//! are recognised). Between batches it sends sync reply pages, one short transaction
//! each (`Store::sync_step`).
//!
//! No message can stall it: an undecodable one, or one whose handling fails (an error or
//! a panic, rolled back alone under a savepoint while the rest of its batch commits) and
//! keeps failing for `MAX_ATTEMPTS`, is dead-lettered with its reason and the loop goes
//! on. A message that stops the whole process (nothing a savepoint catches) comes back
//! marked redelivered: those are handled alone, their starts recorded on disk first
//! (`Store::start_suspect`), and one that keeps stopping the manager is given up after
//! [`MAX_STOPS`]. Only a failure of the database or the broker ends the session.

use crate::store::Store;
use anyhow::{bail, Context};
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use wire::{topology, Envelope, ToManager};

/// Most deliveries handled in one transaction: large enough to amortise the commit and
/// the confirms under load, small enough to keep latency low.
pub const BATCH: usize = 256;
/// How often presence is re-evaluated.
pub const TICK: Duration = Duration::from_secs(1);
/// A longer time between two ticks is not counted as the manager's uptime (it stalled).
const MAX_TICK_GAP: Duration = Duration::from_secs(30);
/// How often the uptime counted between ticks is added to the database's.
const UPTIME_EVERY: Duration = Duration::from_secs(60);
/// Records of decided changes forgotten at most per tick (`Tx::forget_settled_decisions`:
/// a few tens of milliseconds).
pub const FORGET_BATCH: usize = 2_000;
/// How often, at most, the manager looks for records of decided changes to forget when
/// the last look found fewer than a batch (with a short `--remember-decisions-for`, more
/// often).
const FORGET_EVERY_MS: i64 = 5 * 60 * 1000;
/// Attempts at a message whose handling fails before it is dead-lettered. The first is
/// made in its batch, the others alone after a pause, in case the cause was passing. A
/// failure that repeats lies in the message, and waiting for it would stall every node.
pub const MAX_ATTEMPTS: u32 = 3;
/// Times a message may be in hand when the manager stops (crashes, is killed, runs out
/// of memory) before it is given up. A stop is seen as the message coming back from the
/// broker marked redelivered; an operator's restart counts too, which is why it takes
/// more than one. A failure this process survives (the database or the broker failing
/// while the message was in hand) does not count (`Handle::stops_before`).
pub const MAX_STOPS: u32 = 3;
/// Pause before the second attempt, doubled before each further one: 0.6 s in all per
/// batch, short enough not to hold up the messages behind it for long.
pub const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Header of a dead letter that says why the manager gave it up.
pub const REASON_HEADER: &str = "x-sync-reason";
/// Header of a dead letter: the broker user it came over (its AMQP `user_id`).
pub const SENDER_HEADER: &str = "x-sync-user";
/// Header of every message the manager publishes: its outbox row (the last one, for a
/// batch). A dead letter keeps it, so the manager knows where a dropped message stood.
pub const SEQ_HEADER: &str = "x-sync-seq";
/// Header of a dead letter: how many times the manager tried to handle it.
pub const ATTEMPTS_HEADER: &str = "x-sync-attempts";
/// Longest reason put in the header: a header must fit in one AMQP frame, and an error
/// chain can be long.
const MAX_REASON_BYTES: usize = 1024;

#[derive(Clone, Debug)]
pub struct Config {
    pub broker: String,
    pub db: PathBuf,
    /// Accept only messages sent over a node's own broker user (`sync-node-<id>`),
    /// whose `from` must be that node; off, messages over a shared user (the demo's
    /// `guest`) are taken at their word.
    pub require_node_users: bool,
    /// How old versions are kept (docs/versions.md).
    pub retention: crate::versions::Retention,
}

/// Whether a message's claimed sender matches the broker user it came over. The broker
/// guarantees `user_id`, when present, is the connection's user (RabbitMQ refuses any
/// other), so a node's own user can speak only as that node.
pub fn check_sender(user_id: Option<&str>, from: &wire::NodeId, require_node_users: bool) -> Result<(), String> {
    match user_id.map(|u| (u, wire::topology::node_of_user(u))) {
        Some((_, Some(node))) if node == *from => Ok(()),
        Some((user, Some(node))) => Err(format!("forged sender: says it is from {from} but came over {user}, the user of node {node}")),
        Some((user, None)) if require_node_users => Err(format!("sent over broker user {user}, not a node's own user (the manager requires node users)")),
        None if require_node_users => Err("no user_id: the manager requires every message to come over a node's own broker user".into()),
        _ => Ok(()),
    }
}

/// Shared access to the manager's state for other front ends (the REST API): the store,
/// and a way to make the broker loop publish what was queued.
#[derive(Clone)]
pub struct Handle {
    pub store: Arc<Mutex<Store>>,
    pub outbox_ready: Arc<Notify>,
    /// Messages received on the update queue by this process (all kinds, bad ones too).
    pub messages_in: Arc<AtomicU64>,
    /// Messages this process gave up and dead-lettered.
    pub dead_lettered: Arc<AtomicU64>,
    /// Of those, messages refused because of their sender (`check_sender`).
    pub refused_senders: Arc<AtomicU64>,
    /// Messages node queues dropped past their length limit, told to this process
    /// (`dropped_from_node_queue`).
    pub queue_drops: Arc<AtomicU64>,
    /// Forgotten nodes whose queues this process deleted, or tried to
    /// (`delete_node_queue`).
    pub queues_deleted: Arc<Mutex<std::collections::HashSet<wire::NodeId>>>,
    /// When the broker loop took up work it has not finished since (ms since the
    /// epoch; 0 while it is keeping up). Read without the store's lock, so a manager
    /// stuck holding the store can still say so (`stalled_for`, `/api/health`).
    pub busy_since_ms: Arc<std::sync::atomic::AtomicI64>,
    /// When (ms since the epoch) and why the last broker session ended, with its
    /// error's chain (a full disk, a locked database, a lost broker), or the broker
    /// blocked the manager's connection: what an operator needs to know about a stuck
    /// manager (`/api/health`, the dashboard's banner, the watchdog's log). Kept, not
    /// cleared: its time says whether it is still news.
    pub last_failure: Arc<Mutex<Option<(i64, String)>>>,
    /// Starts of redelivered messages (`Store::start_suspect`) whose handling this
    /// process survived: it failed with an error that ended the broker session (the
    /// database, the broker), not with a stop. They do not count towards
    /// [`MAX_STOPS`]; stops of earlier processes do.
    survived_starts: Arc<Mutex<std::collections::HashMap<wire::MessageId, u32>>>,
}

/// Work unfinished for this long means the manager is stuck (it logs it, `/api/health`
/// answers 503, the dashboard shows a banner, `manager status` warns).
pub const STALLED_AFTER: Duration = Duration::from_secs(30);
/// How often the watchdog looks, and touches the liveness file while all is well.
const WATCHDOG_EVERY: Duration = Duration::from_secs(5);

/// The file whose modification time says when the manager last made progress; `manager
/// status` reads it (it works whether the manager is stuck, stopped or gone).
pub fn alive_file(db: &std::path::Path) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".alive");
    db.with_file_name(name)
}

impl Handle {
    pub fn open(db: &std::path::Path) -> anyhow::Result<Handle> {
        Ok(Handle {
            store: Arc::new(Mutex::new(Store::open(db)?)),
            outbox_ready: Arc::new(Notify::new()),
            messages_in: Default::default(),
            dead_lettered: Default::default(),
            refused_senders: Default::default(),
            queue_drops: Default::default(),
            queues_deleted: Default::default(),
            last_failure: Default::default(),
            survived_starts: Default::default(),
            busy_since_ms: Default::default(),
        })
    }

    /// Runs work the broker loop took up (a batch, a tick, a sync reply page) under the
    /// stall clock: the clock starts with the first piece of work not yet finished and
    /// stops only when one finishes having done something (`progressed` says so of its
    /// result) or found it stopped and did nothing. A piece that fails (a locked
    /// database ends the session) leaves it running, whichever kind of work the next
    /// session tries first; so does a look for a sync page that found none to send (a
    /// read, which a locked database allows).
    async fn timed<T>(&self, work: impl std::future::Future<Output = anyhow::Result<T>>, progressed: impl FnOnce(&T) -> bool) -> anyhow::Result<T> {
        // Whether this piece started the clock (nothing was waiting before it).
        let started = self.busy_since_ms.compare_exchange(0, now_ms(), Ordering::Relaxed, Ordering::Relaxed).is_ok();
        let out = work.await;
        if out.as_ref().is_ok_and(|v| started || progressed(v)) {
            self.busy_since_ms.store(0, Ordering::Relaxed);
        }
        out
    }
    /// Of `recorded` earlier starts of a redelivered message, those that stopped a
    /// process (this one survived the others).
    pub fn stops_before(&self, msg: &wire::MessageId, recorded: u32) -> u32 {
        recorded.saturating_sub(self.survived_starts.lock().unwrap_or_else(|p| p.into_inner()).get(msg).copied().unwrap_or(0))
    }
    /// The handling of a redelivered message ended: survived (an error that ended the
    /// session), or finished (it no longer needs counting).
    pub fn suspect_ended(&self, msg: &wire::MessageId, survived: bool) {
        let mut starts = self.survived_starts.lock().unwrap_or_else(|p| p.into_inner());
        if survived {
            *starts.entry(msg.clone()).or_default() += 1;
        } else {
            starts.remove(msg);
        }
    }
    fn set_last_failure(&self, failure: String) {
        *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some((now_ms(), failure));
    }
    /// When (ms since the epoch) and why the last broker session ended, if one did.
    pub fn last_failure(&self) -> Option<(i64, String)> {
        self.last_failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// How long unfinished work has been waiting, if longer than [`STALLED_AFTER`].
    pub fn stalled_for(&self, now_ms: i64) -> Option<Duration> {
        let since = self.busy_since_ms.load(Ordering::Relaxed);
        let busy = Duration::from_millis((now_ms - since).max(0) as u64);
        (since > 0 && busy > STALLED_AFTER).then_some(busy)
    }

    /// Runs `f` on the store on a blocking thread.
    pub async fn with_store<T: Send + 'static>(&self, f: impl FnOnce(&mut Store) -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut s)
        })
        .await
        .context("store task panicked")?
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Runs the manager until `cancel` fires, reconnecting to the broker as needed.
pub async fn run(cfg: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    let handle = Handle::open(&cfg.db)?;
    handle.store.lock().unwrap_or_else(|p| p.into_inner()).set_retention(cfg.retention);
    run_with(cfg, handle, cancel).await
}

pub async fn run_with(cfg: Config, handle: Handle, cancel: CancellationToken) -> anyhow::Result<()> {
    let head = handle.store.lock().unwrap_or_else(|p| p.into_inner()).start_serving(now_ms())?;
    tracing::info!("revisions go on after {}", head.0);
    tokio::spawn(watchdog(handle.clone(), alive_file(&cfg.db), cancel.clone()));
    let mut backoff = broker_link::Backoff::default();
    loop {
        match session(&cfg, &handle, &cancel, &mut backoff).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!("broker session ended: {e:#}; reconnecting");
                handle.set_last_failure(format!("{e:#}"));
            }
        }
        if !backoff.wait(&cancel).await {
            return Ok(());
        }
    }
}

async fn session(cfg: &Config, handle: &Handle, cancel: &CancellationToken, backoff: &mut broker_link::Backoff) -> anyhow::Result<()> {
    let conn = broker_link::connect(&cfg.broker).await?;
    let ch = broker_link::Confirmed::open(&conn, cancel.clone()).await?;
    let blocks = handle.clone();
    let _blocks = broker_link::watch_blocks(&conn, move |reason| {
        if let Some(reason) = reason {
            blocks.set_last_failure(format!("the broker blocked the manager's connection: {reason} (a memory or disk alarm of the broker)"));
        }
    });
    broker_link::declare_common(&conn).await?;
    ch.ch.basic_qos(BATCH as u16, BasicQosOptions::default()).await?;
    // Exclusively: a second manager (another database) would decide every other change
    // and assign the same revisions. The broker refuses it; it decides nothing and says
    // why until this one is gone (a standby taking over, docs/deploy.md).
    broker_link::refuse_if_consumed(&conn, topology::UPDATE_QUEUE, "is another manager running on this broker?").await?;
    let exclusive = BasicConsumeOptions { exclusive: true, ..Default::default() };
    const ANOTHER: &str = "exclusively (the broker refuses a second consumer: is another manager running on this broker?)";
    let mut consumer = ch
        .ch
        .basic_consume(topology::UPDATE_QUEUE.into(), "manager".into(), exclusive, FieldTable::default())
        .await
        .with_context(|| format!("consuming the update queue, {ANOTHER}"))?;
    let mut drops = ch
        .ch
        .basic_consume(topology::DROPS_QUEUE.into(), "manager-drops".into(), exclusive, FieldTable::default())
        .await
        .with_context(|| format!("consuming the queue of dropped messages, {ANOTHER}"))?;
    tracing::info!("connected to the broker; consuming {} and {}", topology::UPDATE_QUEUE, topology::DROPS_QUEUE);
    backoff.reset();
    flush_outbox_timed(handle, &ch).await?;
    let mut tick = tokio::time::interval(TICK);
    // Whether a sync reply may have a page to send (one may be under way from before a
    // restart). Pages go out one per turn of this loop, between batches of deliveries.
    let mut sync_work = true;
    // When to look next for decided changes' records to forget: at once after a full
    // batch, else every few minutes (the look scans the old records of nodes that are
    // not settled, each time).
    let mut forget_at_ms = 0;
    // The last tick of this session, and the time served since the uptime was last
    // counted (`Tx::count_uptime`).
    let mut last_tick = None;
    let mut served = Duration::ZERO;
    // (More often with a short `--forget-nodes-after`: a quarter of it at most.)
    let uptime_every = match cfg.retention.forget_nodes_ms {
        ms if ms > 0 => UPTIME_EVERY.min(Duration::from_millis(ms as u64 / 4)).max(TICK),
        _ => UPTIME_EVERY,
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                broker_link::close(&conn, "manager shutting down").await;
                return Ok(());
            }
            _ = tick.tick() => {
                // The time served, added to the database's uptime once a minute.
                if let Some(gap) = last_tick.map(|t: std::time::Instant| t.elapsed()).filter(|g| *g <= MAX_TICK_GAP) {
                    served += gap;
                }
                last_tick = Some(std::time::Instant::now());
                let count = (served >= uptime_every).then(|| std::mem::take(&mut served));
                let (changed, next_forget, silent) = handle.timed(handle.with_store(move |s| s.transaction(|tx| {
                    let now = now_ms();
                    if let Some(served) = count {
                        tx.count_uptime(served, now)?;
                    }
                    tx.expire_versions(now)?;
                    let mut next_forget = forget_at_ms;
                    let mut silent = Vec::new();
                    if now >= forget_at_ms {
                        silent = tx.forget_silent_nodes(now)?;
                        let forgotten = tx.forget_settled_decisions(now, FORGET_BATCH)?.max(tx.forget_applied_deletes(now, FORGET_BATCH)?);
                        // As often as records come of age, every few minutes at most.
                        let every = (tx.retention.remember_decisions_ms / 16).clamp(1_000, FORGET_EVERY_MS);
                        next_forget = if forgotten == FORGET_BATCH { now } else { now + every };
                    }
                    Ok((tx.mark_silent_offline(now)?, next_forget, silent))
                })), |_| true).await?;
                forget_at_ms = next_forget;
                for node in silent {
                    delete_node_queue(handle, &conn, &node).await;
                }
                if changed > 0 {
                    tracing::info!("{changed} node(s) went offline");
                }
                // A request held back by the rate limit may be due now.
                sync_work = true;
            }
            _ = std::future::ready(()), if sync_work => {
                sync_work = handle.timed(handle.with_store(|s| s.sync_step(now_ms())), |sent| *sent).await?;
                flush_outbox_timed(handle, &ch).await?;
            }
            _ = handle.outbox_ready.notified() => flush_outbox_timed(handle, &ch).await?,
            next = consumer.next() => {
                let Some(first) = next else { anyhow::bail!("the broker cancelled the consumer") };
                let mut deliveries = vec![first.context("receiving from the update queue")?];
                while deliveries.len() < BATCH {
                    match consumer.next().now_or_never() {
                        Some(Some(d)) => deliveries.push(d.context("receiving from the update queue")?),
                        _ => break,
                    }
                }
                handle.messages_in.fetch_add(deliveries.len() as u64, Ordering::Relaxed);
                tracing::debug!(target: "timing", "batch of {} received", deliveries.len());
                handle.timed(handle_batch(handle, &ch, cancel, deliveries, cfg.require_node_users), |_| true).await?;
                sync_work = true;
            }
            next = drops.next() => {
                let Some(first) = next else { anyhow::bail!("the broker cancelled the consumer of dropped messages") };
                let mut deliveries = vec![first.context("receiving from the queue of dropped messages")?];
                while let Some(Some(d)) = drops.next().now_or_never() {
                    deliveries.push(d.context("receiving from the queue of dropped messages")?);
                }
                handle.timed(ask_to_sync_after_drops(handle, &conn, &ch, deliveries), |_| true).await?;
            }
        }
    }
}

/// Decides a batch of deliveries and acks each one once its decision is committed and
/// published; gives up (dead-letters) what cannot be decoded or keeps failing.
///
/// A message that failed is tried again after the rest of its batch was committed and
/// acked, so a later message of the same node may be decided before it; that costs at
/// worst a conflict file, where waiting would stall every node.
/// Says when the manager stops making progress, and keeps the liveness file fresh while
/// it does.
async fn watchdog(handle: Handle, alive: PathBuf, cancel: CancellationToken) {
    let mut every = tokio::time::interval(WATCHDOG_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        match handle.stalled_for(now_ms()) {
            Some(d) => tracing::error!(
                "the manager has not finished the work it took up {}s ago: it is stuck ({}); nodes' changes wait",
                d.as_secs(),
                match handle.last_failure() {
                    Some((at, why)) => format!("last failure {}s ago: {why}", (now_ms() - at).max(0) / 1000),
                    None => "no failure seen: a database locked by another process? a disk too slow?".into(),
                }
            ),
            None => {
                let touched = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&alive)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                if let Err(e) = touched {
                    tracing::debug!("touching {}: {e}", alive.display());
                }
            }
        }
    }
}

async fn handle_batch(
    handle: &Handle,
    ch: &broker_link::Confirmed,
    cancel: &CancellationToken,
    deliveries: Vec<Delivery>,
    require_node_users: bool,
) -> anyhow::Result<()> {
    let mut pending = Vec::with_capacity(deliveries.len());
    for d in deliveries {
        match Envelope::<ToManager>::decode(&d.data) {
            Ok(env) => {
                let user = d.properties.user_id().as_ref().map(|u| u.as_str().to_string());
                match check_sender(user.as_deref(), &env.from, require_node_users) {
                    Ok(()) => pending.push((d, env)),
                    Err(reason) => {
                        handle.refused_senders.fetch_add(1, Ordering::Relaxed);
                        dead_letter(handle, ch, &d, &reason, 1).await?;
                    }
                }
            }
            // Trying again cannot help.
            Err(e) => dead_letter(handle, ch, &d, &format!("undecodable: {e}"), 1).await?,
        }
    }
    // Redelivered messages come first (they were at the head of the queue). Any of them
    // may be what stopped the manager last time, so each is handled alone, its start
    // recorded on disk first: one that keeps stopping the manager is given up.
    let fresh = pending.iter().position(|(d, _)| !d.redelivered).unwrap_or(pending.len());
    let rest = pending.split_off(fresh);
    for (d, env) in pending {
        let id = env.id.clone();
        let recorded = handle.with_store(move |s| s.start_suspect(&id)).await?;
        let earlier = handle.stops_before(&env.id, recorded);
        if earlier >= MAX_STOPS {
            let id = env.id.clone();
            handle.with_store(move |s| s.give_up_suspect(&id)).await?;
            let reason = format!("the manager stopped while handling it, {earlier} times in a row (a crash, a kill or running out of memory)");
            dead_letter(handle, ch, &d, &reason, earlier).await?;
            continue;
        }
        let id = env.id.clone();
        let handled = decide_with_retries(handle, ch, cancel, vec![(d, env)]).await;
        handle.suspect_ended(&id, handled.is_err());
        handled?;
    }
    decide_with_retries(handle, ch, cancel, rest).await
}

/// The node whose queue dropped this message, if it is one of the manager's own messages
/// that the broker dead-lettered from a node queue past the queue's length limit (its
/// `x-death` header says `maxlen` and the queue), and the outbox row it came from (its
/// [`SEQ_HEADER`]). Node queues dead-letter into `sync.dead`, whose copies in
/// `sync.drops` come here.
pub fn dropped_from_node_queue(d: &Delivery) -> Option<(wire::NodeId, Option<i64>)> {
    let field = |t: &FieldTable, key: &str| t.inner().iter().find(|(k, _)| k.as_str() == key).map(|(_, v)| v.clone());
    let headers = d.properties.headers().as_ref()?;
    // What the manager itself gave up (it may carry a sender's forged `x-death`).
    if field(headers, REASON_HEADER).is_some() {
        return None;
    }
    let AMQPValue::FieldArray(deaths) = field(headers, "x-death")? else { return None };
    // The first is the latest death.
    let AMQPValue::FieldTable(death) = deaths.as_slice().first()?.clone() else { return None };
    let text = |key: &str| match field(&death, key) {
        Some(AMQPValue::LongString(v)) => Some(v.to_string()),
        _ => None,
    };
    if text("reason")? != "maxlen" {
        return None;
    }
    let node = text("queue")?.strip_prefix("sync.node.")?.parse().ok()?;
    // A node can publish any headers; what its queue holds comes from the manager. (A
    // forged notice costs the node it names one sync, nothing more.)
    Envelope::<wire::ToNode>::decode(&d.data).ok().filter(|e| e.from == wire::NodeId::manager())?;
    let seq = match field(headers, SEQ_HEADER) {
        Some(AMQPValue::LongLongInt(seq)) => Some(seq),
        Some(AMQPValue::LongInt(seq)) => Some(seq.into()),
        Some(AMQPValue::LongUInt(seq)) => Some(seq.into()),
        _ => None,
    };
    Some((node, seq))
}

/// Answers what came on `sync.drops`: each node whose queue dropped a message there
/// (`dropped_from_node_queue`) is asked to sync, behind everything its queue holds now,
/// unless a request sent for an earlier drop follows the message in that queue
/// (`Store::ask_to_sync_after_drops`). The node then sends again what it has not seen
/// decided and takes the manager's whole tree, which brings back whatever the dropped
/// messages said. Everything is acked once the requests are published (the other dead
/// letters stay in `sync.dead`).
async fn ask_to_sync_after_drops(handle: &Handle, conn: &lapin::Connection, ch: &broker_link::Confirmed, deliveries: Vec<Delivery>) -> anyhow::Result<()> {
    let drops: Vec<(wire::NodeId, Option<i64>)> = deliveries.iter().filter_map(dropped_from_node_queue).collect();
    if !drops.is_empty() {
        handle.queue_drops.fetch_add(drops.len() as u64, Ordering::Relaxed);
        let (asked, forgotten) = handle.with_store(move |s| s.ask_to_sync_after_drops(&drops)).await?;
        if !asked.is_empty() {
            tracing::warn!(?asked, "node queues dropped their oldest messages past their length limit; asking those nodes to sync");
            flush_outbox(handle, ch).await?;
        }
        // The queue of a forgotten node that is left (its deletion refused, or lost to
        // a crash) fills up and sends a notice per broadcast: deleted now, once per
        // process (a refusal is said once).
        for node in forgotten {
            delete_node_queue(handle, conn, &node).await;
        }
    }
    for d in deliveries {
        ch.bounded("acking a dropped message's notice", async { d.ack(BasicAckOptions::default()).await.context("acking") }).await?;
    }
    Ok(())
}

/// Decides messages in one transaction, acks those decided, and tries the failed ones
/// again alone, up to [`MAX_ATTEMPTS`], before dead-lettering them.
async fn decide_with_retries(
    handle: &Handle,
    ch: &broker_link::Confirmed,
    cancel: &CancellationToken,
    mut pending: Vec<(Delivery, Envelope<ToManager>)>,
) -> anyhow::Result<()> {
    let mut attempt = 1;
    while !pending.is_empty() {
        let envs: Vec<_> = pending.iter().map(|(_, env)| env.clone()).collect();
        let results = handle.with_store(move |s| s.transaction(|tx| tx.handle_batch(envs, now_ms()))).await?;
        tracing::debug!(target: "timing", "batch committed");
        flush_outbox(handle, ch).await?;
        tracing::debug!(target: "timing", "outbox published, confirmed");
        let mut failed = Vec::new();
        for ((d, env), result) in pending.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    ch.bounded("acking", async { d.ack(BasicAckOptions::default()).await.context("acking") }).await?;
                }
                Err(reason) => {
                    tracing::warn!(msg = %env.id, node = %env.from, attempt, %reason, "handling a message failed; its changes were rolled back");
                    failed.push((d, env, reason));
                }
            }
        }
        // A message given up earlier, or from a forgotten node, is not tried again.
        let (given_up, failed): (Vec<_>, Vec<_>) = failed.into_iter().partition(|(_, _, reason)| crate::store::fails_for_good(reason));
        for (d, _, reason) in &given_up {
            dead_letter(handle, ch, d, reason, attempt).await?;
        }
        if attempt >= MAX_ATTEMPTS {
            for (d, _, reason) in &failed {
                dead_letter(handle, ch, d, reason, attempt).await?;
            }
            break;
        }
        if !failed.is_empty() {
            // Cancelled: the messages are not acked, and the broker redelivers them.
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(RETRY_PAUSE * 2u32.pow(attempt - 1)) => {}
            }
        }
        pending = failed.into_iter().map(|(d, env, _)| (d, env)).collect();
        attempt += 1;
    }
    Ok(())
}

/// Deletes the queue of a forgotten node (what `manager node forget` does too), once per
/// process: broadcasts would fill it to its limit and each one past it would come back
/// as a drop. On a channel of its own, so that a refusal (no configure permission on it)
/// only says so.
async fn delete_node_queue(handle: &Handle, conn: &lapin::Connection, node: &wire::NodeId) {
    if !handle.queues_deleted.lock().unwrap_or_else(|p| p.into_inner()).insert(node.clone()) {
        return;
    }
    let queue = topology::node_queue(node);
    match broker_link::bounded(format!("deleting queue {queue}"), crate::api::broker_user::delete_node_queue_on(conn, node)).await {
        Ok(_) => tracing::info!(%node, %queue, "deleted the queue of a forgotten node"),
        Err(e) => tracing::warn!(%node, %queue, "could not delete the queue of a forgotten node (delete it with rabbitmqctl): {e:#}"),
    }
}

/// Gives a message up: publishes a copy with the reason to the dead-letter exchange,
/// waits for the broker's confirm, then acks the original. A failure to do so ends the
/// session like any broker failure, and the message is redelivered.
async fn dead_letter(handle: &Handle, ch: &broker_link::Confirmed, d: &Delivery, reason: &str, attempts: u32) -> anyhow::Result<()> {
    let mut cut = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let reason = &reason[..cut];
    let msg_id = d.properties.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default();
    tracing::warn!(msg = %msg_id, bytes = d.data.len(), attempts, %reason, "dead-lettering a message into {}", topology::DEAD_EXCHANGE);
    let mut headers = d.properties.headers().clone().unwrap_or_default();
    headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
    headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongUInt(attempts));
    // Fresh properties: the original `user_id` names the sender's connection, and the
    // broker refuses any `user_id` but the publisher's own (the manager's). It is kept
    // as a header instead.
    if let Some(user) = d.properties.user_id() {
        headers.insert(SENDER_HEADER.into(), AMQPValue::LongString(user.as_str().into()));
    }
    let props = broker_link::message_properties(&msg_id, None).with_headers(headers);
    let confirm = ch
        .bounded("dead-lettering a message and its confirm", async {
            ch.ch
                .basic_publish(topology::DEAD_EXCHANGE.into(), topology::UPDATE_QUEUE.into(), BasicPublishOptions::default(), &d.data, props)
                .await
                .context("dead-lettering a message")?
                .await
                .context("waiting for the confirm of a dead letter")
        })
        .await?;
    if !confirm.is_ack() {
        bail!("the broker refused a dead letter");
    }
    ch.bounded("acking a dead-lettered message", async { d.ack(BasicAckOptions::default()).await.context("acking") }).await?;
    handle.dead_lettered.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// [`flush_outbox`] as work of its own under the stall clock: removing what was
/// published is a write, and a database locked between a decision's commit and that
/// removal ended every broker session in this flush, at its start, before any other
/// work could start the clock (the manager was stuck without saying so).
async fn flush_outbox_timed(handle: &Handle, ch: &broker_link::Confirmed) -> anyhow::Result<()> {
    handle.timed(flush_outbox(handle, ch), |published| *published).await.map(|_| ())
}

/// Publishes everything in the outbox, in order (runs of decisions as batches,
/// `batch.rs`), pipelining the confirms. Returns whether there was anything to publish.
async fn flush_outbox(handle: &Handle, ch: &broker_link::Confirmed) -> anyhow::Result<bool> {
    let mut published = false;
    loop {
        let batch = handle.with_store(|s| s.outbox(OUTBOX_READ)).await?;
        let Some(last) = batch.last().map(|o| o.seq) else {
            return Ok(published);
        };
        // Rows are added by this task (between flushes) and by the REST API, which wakes
        // it (`outbox_ready`): a short read was the whole outbox.
        let whole = batch.len() < OUTBOX_READ;
        let messages = crate::batch::for_broker(batch);
        let sends = messages.iter().map(|o| {
            let mut headers = FieldTable::default();
            headers.insert(SEQ_HEADER.into(), AMQPValue::LongLongInt(o.seq));
            ch.publish_with(topology::MASTER_EXCHANGE, &o.key, &o.id, &o.payload, headers)
        });
        for r in futures_util::future::join_all(sends).await {
            r?;
        }
        handle.with_store(move |s| s.remove_outbox(last)).await?;
        published = true;
        if whole {
            return Ok(published);
        }
    }
}

/// Outbox rows read (and published) at a time.
const OUTBOX_READ: usize = 512;

#[cfg(test)]
mod sender_tests {
    use super::check_sender;

    #[test]
    fn a_node_user_speaks_only_as_its_node() {
        let n1: wire::NodeId = "n1".parse().unwrap();
        assert!(check_sender(Some("sync-node-n1"), &n1, true).is_ok());
        assert!(check_sender(Some("sync-node-n2"), &n1, false).unwrap_err().contains("forged"));
        assert!(check_sender(Some("guest"), &n1, false).is_ok());
        assert!(check_sender(None, &n1, false).is_ok());
        assert!(check_sender(Some("guest"), &n1, true).is_err());
        assert!(check_sender(None, &n1, true).is_err());
    }
}
