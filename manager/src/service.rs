//! The manager's broker loop: one task owns the AMQP session. It consumes the update
//! queue in batches, handles a batch in one SQLite transaction, publishes the outbox with
//! confirms, and only then acks the batch (so a crash redelivers, and redelivered ids
//! are recognised). Undecodable messages are rejected into the dead-letter queue.

use crate::store::Store;
use anyhow::Context;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use std::path::PathBuf;
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

#[derive(Clone, Debug)]
pub struct Config {
    pub broker: String,
    pub db: PathBuf,
}

/// Shared access to the manager's state for other front ends (the REST API): the store,
/// and a way to make the broker loop publish what was queued.
#[derive(Clone)]
pub struct Handle {
    pub store: Arc<Mutex<Store>>,
    pub outbox_ready: Arc<Notify>,
    /// Messages received on the update queue by this process (all kinds, bad ones too).
    pub messages_in: Arc<std::sync::atomic::AtomicU64>,
}

impl Handle {
    pub fn open(db: &std::path::Path) -> anyhow::Result<Handle> {
        Ok(Handle { store: Arc::new(Mutex::new(Store::open(db)?)), outbox_ready: Arc::new(Notify::new()), messages_in: Default::default() })
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
    run_with(cfg, handle, cancel).await
}

pub async fn run_with(cfg: Config, handle: Handle, cancel: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = broker_link::Backoff::default();
    loop {
        match session(&cfg, &handle, &cancel, &mut backoff).await {
            Ok(()) => return Ok(()),
            Err(e) => tracing::warn!("broker session ended: {e:#}; reconnecting"),
        }
        if !backoff.wait(&cancel).await {
            return Ok(());
        }
    }
}

async fn session(cfg: &Config, handle: &Handle, cancel: &CancellationToken, backoff: &mut broker_link::Backoff) -> anyhow::Result<()> {
    let conn = broker_link::connect(&cfg.broker).await?;
    let ch = broker_link::confirmed_channel(&conn).await?;
    broker_link::declare_common(&ch).await?;
    ch.basic_qos(BATCH as u16, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(topology::UPDATE_QUEUE.into(), "manager".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .context("consuming the update queue")?;
    tracing::info!("connected to the broker; consuming {}", topology::UPDATE_QUEUE);
    backoff.reset();
    flush_outbox(handle, &ch).await?;
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = conn.close(200, "manager shutting down".into()).await;
                return Ok(());
            }
            _ = tick.tick() => {
                let changed = handle.with_store(|s| s.transaction(|tx| tx.mark_silent_offline(now_ms()))).await?;
                if changed > 0 {
                    tracing::info!("{changed} node(s) went offline");
                }
            }
            _ = handle.outbox_ready.notified() => flush_outbox(handle, &ch).await?,
            next = consumer.next() => {
                let Some(first) = next else { anyhow::bail!("the broker cancelled the consumer") };
                let mut deliveries = vec![first.context("receiving from the update queue")?];
                while deliveries.len() < BATCH {
                    match consumer.next().now_or_never() {
                        Some(Some(d)) => deliveries.push(d.context("receiving from the update queue")?),
                        _ => break,
                    }
                }
                handle.messages_in.fetch_add(deliveries.len() as u64, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(target: "timing", "batch of {} received", deliveries.len());
                let mut good = Vec::with_capacity(deliveries.len());
                for d in deliveries {
                    match Envelope::<ToManager>::decode(&d.data) {
                        Ok(env) => good.push((d, env)),
                        Err(e) => {
                            tracing::warn!("dead-lettering an undecodable message of {} bytes: {e}", d.data.len());
                            broker_link::bounded("rejecting a bad message", async { d.reject(BasicRejectOptions { requeue: false }).await.context("rejecting") })
                                .await?;
                        }
                    }
                }
                let (acks, envs): (Vec<_>, Vec<_>) = good.into_iter().unzip();
                handle
                    .with_store(move |s| {
                        s.transaction(|tx| {
                            let now = now_ms();
                            for env in envs {
                                let id = env.id.clone();
                                tx.handle(env, now).with_context(|| format!("handling message {id}"))?;
                            }
                            Ok(())
                        })
                    })
                    .await?;
                tracing::debug!(target: "timing", "batch committed");
                flush_outbox(handle, &ch).await?;
                tracing::debug!(target: "timing", "outbox published, confirmed");
                for d in acks {
                    broker_link::bounded("acking", async { d.ack(BasicAckOptions::default()).await.context("acking") }).await?;
                }
            }
        }
    }
}

/// Publishes everything in the outbox, in order, pipelining the confirms.
async fn flush_outbox(handle: &Handle, ch: &lapin::Channel) -> anyhow::Result<()> {
    loop {
        let batch = handle.with_store(|s| s.outbox(512)).await?;
        let Some(last) = batch.last().map(|o| o.seq) else {
            return Ok(());
        };
        let sends = batch.iter().map(|o| broker_link::publish_confirmed(ch, topology::MASTER_EXCHANGE, &o.key, &o.id, &o.payload));
        for r in futures_util::future::join_all(sends).await {
            r?;
        }
        handle.with_store(move |s| s.remove_outbox(last)).await?;
    }
}
