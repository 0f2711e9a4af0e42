//! The manager in the simulation: the real `manager::store::Store` (rule, revisions,
//! conflicts, outbox, sync replies) on a database in the run's directory, driven the
//! way `manager::service` drives it: a batch of deliveries handled in one transaction
//! (each message under its own savepoint), the outbox published, then the batch acked.
//! A crash can come at any of those points; what the store committed survives it.

use crate::broker::Broker;
use manager::store::Store;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use wire::{Envelope, ToManager};

/// Where a crash of the manager may come while it handles a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// Before the transaction commits: nothing of the batch is kept.
    BeforeCommit,
    /// After the commit, before the outbox is published.
    AfterCommit,
    /// After the outbox went out, before the batch is acked.
    AfterPublish,
}

pub struct SimManager {
    db: PathBuf,
    store: Option<Store>,
    sync_page_bytes: Option<usize>,
    /// The virtual clock (ns since the epoch), when each start begins its revisions at
    /// the time of the start (`Store::start_serving`, as `manager serve` does). Only with
    /// `Config::restores`: the seeds kept from before replay with the revisions they had.
    start_clock: Option<Arc<AtomicI64>>,
    /// `Config::forget_decisions`.
    forget_decisions: bool,
    /// Every history row the database had at a tick, and the highest revision of them:
    /// with `forget_decisions` rows go, and the checks count what reached the manager at
    /// any time.
    seen_history: Vec<crate::check::HistoryRow>,
    seen_to: i64,
}

/// With `Config::forget_decisions`, old versions are kept this long (virtual time), and
/// their history rows are forgotten after that (`Tx::expire_versions`).
const FORGET_HISTORY_AFTER_MS: i64 = 2_000;

impl SimManager {
    pub fn start(db: PathBuf, sync_page_bytes: Option<usize>, start_clock: Option<Arc<AtomicI64>>, forget_decisions: bool) -> anyhow::Result<SimManager> {
        let mut m = SimManager { db, store: None, sync_page_bytes, start_clock, forget_decisions, seen_history: Vec::new(), seen_to: i64::MIN };
        m.open()?;
        Ok(m)
    }

    fn open(&mut self) -> anyhow::Result<()> {
        let mut store = Store::open(&self.db)?;
        if let Some(bytes) = self.sync_page_bytes {
            store.set_sync_page_bytes(bytes);
        }
        if let Some(clock) = &self.start_clock {
            store.start_serving(clock.load(Ordering::Relaxed) / 1_000_000)?;
        }
        if self.forget_decisions {
            store.set_retention(manager::versions::Retention { remember_decisions_ms: 0, keep_for_ms: FORGET_HISTORY_AFTER_MS, ..store.retention() });
        }
        self.store = Some(store);
        Ok(())
    }

    pub fn is_up(&self) -> bool {
        self.store.is_some()
    }

    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// Kills the process: the store is closed, what it committed stays; the broker
    /// takes back what the manager had not acked.
    pub fn crash(&mut self, broker: &mut Broker) {
        self.store = None;
        broker.update.connection_lost();
    }

    /// Where [`SimManager::back_up`] puts its copy.
    fn backup_path(&self) -> PathBuf {
        self.db.with_extension("backup")
    }

    /// Copies the database, as a backup would (`VACUUM INTO`: a consistent copy of what
    /// is committed).
    pub fn back_up(&self) -> anyhow::Result<()> {
        let store = self.store.as_ref().ok_or_else(|| anyhow::anyhow!("the manager is down"))?;
        let to = self.backup_path();
        let _ = std::fs::remove_file(&to);
        store.conn().execute("VACUUM INTO ?1", [to.to_string_lossy()])?;
        Ok(())
    }

    /// Every revision in the manager's history, and every conflict it kept (its
    /// database read even while it is down).
    pub fn history(&self) -> anyhow::Result<(Vec<crate::check::HistoryRow>, Vec<crate::check::ConflictRow>)> {
        let read = |conn: &rusqlite::Connection| Ok((crate::check::history(conn)?, crate::check::conflicts(conn)?));
        match &self.store {
            Some(store) => read(store.conn()),
            None => read(&rusqlite::Connection::open(&self.db)?),
        }
    }

    /// Every history row the database had at a tick (`Config::forget_decisions`; empty
    /// without).
    pub fn seen_history(&self) -> &[crate::check::HistoryRow] {
        &self.seen_history
    }

    /// The manager's disk fails and the database comes back from the last copy
    /// (`from_copy`), or starts empty; the process restarts on it. The broker takes back
    /// what it had not acked.
    pub fn restore(&mut self, broker: &mut Broker, from_copy: bool) -> anyhow::Result<()> {
        self.crash(broker);
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.db.display()));
        }
        std::fs::remove_file(&self.db)?;
        if from_copy {
            std::fs::copy(self.backup_path(), &self.db)?;
        } else {
            crate::fresh_manager_database(&self.db)?;
        }
        self.restart(broker)
    }

    /// Starts again over the same database and publishes what a crash left in the outbox.
    pub fn restart(&mut self, broker: &mut Broker) -> anyhow::Result<()> {
        self.open()?;
        self.flush_outbox(broker)
    }

    /// Handles up to `batch` messages of the update queue; `crash` stops the process at
    /// that point of the batch. Returns what it took, a line each (heartbeats left out).
    pub fn handle_batch(&mut self, broker: &mut Broker, batch: usize, now_ms: i64, crash: Option<CrashPoint>) -> anyhow::Result<Vec<String>> {
        let Some(store) = self.store.as_mut() else { return Ok(Vec::new()) };
        let mut taken = Vec::new();
        // The copies on `sync.drops` of what node queues dropped (the real manager
        // consumes that queue beside the update queue: `service::ask_to_sync_after_drops`).
        if !broker.drops.is_empty() {
            let (asked, _) = store.ask_to_sync_after_drops(&broker.drops)?;
            if !asked.is_empty() {
                let names: Vec<String> = asked.iter().map(|n| n.to_string()).collect();
                taken.push(format!("manager asks {} to sync: their queues dropped messages", names.join(", ")));
            }
            self.flush_outbox(broker)?;
            broker.drops.clear();
        }
        let Some(store) = self.store.as_mut() else { return Ok(taken) };
        let mut envs = Vec::new();
        while envs.len() < batch {
            let Some(m) = broker.update.deliver() else { break };
            match Envelope::<ToManager>::decode(&m.body) {
                Ok(env) => {
                    if !matches!(env.body, ToManager::Heartbeat { .. }) {
                        taken.push(format!("manager takes {}", crate::describe::to_manager(&env, m.redelivered)));
                    }
                    envs.push(env)
                }
                Err(e) => anyhow::bail!("the manager got a message it cannot decode: {e}"),
            }
        }
        if envs.is_empty() {
            return Ok(taken);
        }
        if crash == Some(CrashPoint::BeforeCommit) {
            self.crash(broker);
            return Ok(taken);
        }
        let results = store.transaction(|tx| tx.handle_batch(envs, now_ms))?;
        for r in results {
            if let Err(reason) = r {
                anyhow::bail!("the manager failed to handle a message: {reason}");
            }
        }
        if crash == Some(CrashPoint::AfterCommit) {
            self.crash(broker);
            return Ok(taken);
        }
        self.flush_outbox(broker)?;
        if crash == Some(CrashPoint::AfterPublish) {
            self.crash(broker);
            return Ok(taken);
        }
        broker.update.ack_all();
        Ok(taken)
    }

    /// The manager's tick: presence (and the records of decided changes forgotten, with
    /// `Config::forget_decisions`), then every sync reply page that is due.
    pub fn tick(&mut self, broker: &mut Broker, now_ms: i64) -> anyhow::Result<()> {
        let Some(store) = self.store.as_mut() else { return Ok(()) };
        let forget = self.forget_decisions;
        if forget {
            let new = crate::check::history_after(store.conn(), self.seen_to)?;
            self.seen_to = new.last().map_or(self.seen_to, |r| r.3);
            self.seen_history.extend(new);
        }
        store.transaction(|tx| {
            if forget {
                tx.forget_settled_decisions(now_ms, usize::MAX)?;
                tx.forget_applied_deletes(now_ms, usize::MAX)?;
                tx.expire_versions(now_ms)?;
            }
            tx.mark_silent_offline(now_ms)
        })?;
        self.sync_work(broker, now_ms)
    }

    /// Sends sync reply pages until none is due.
    pub fn sync_work(&mut self, broker: &mut Broker, now_ms: i64) -> anyhow::Result<()> {
        while let Some(store) = self.store.as_mut() {
            let more = store.sync_step(now_ms)?;
            self.flush_outbox(broker)?;
            if !more {
                break;
            }
        }
        Ok(())
    }

    fn flush_outbox(&mut self, broker: &mut Broker) -> anyhow::Result<()> {
        let Some(store) = self.store.as_mut() else { return Ok(()) };
        loop {
            let out = store.outbox(512)?;
            let Some(last) = out.last().map(|o| o.seq) else { return Ok(()) };
            for o in manager::batch::for_broker(out) {
                broker.publish_master(&o.key, &o.payload, o.seq);
            }
            store.remove_outbox(last)?;
        }
    }
}
