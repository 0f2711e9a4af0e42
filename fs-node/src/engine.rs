//! The node's sync engine, without I/O: what the node does with each message from the
//! manager, with its sync requests and their paged replies, with contents that could not
//! be pulled in time, and with the clock. Events go in (a message, a tick, a pull that
//! ended, a sync asked for), actions come out (publish this, pull that, invalidate these
//! kernel entries, tell these callers that their sync is done). It owns the state of one
//! broker session: syncs in flight, the one waiting, and the contents being retried.
//!
//! The tree (`crate::tree::Tree`) holds the files, the outbox and what is durable; the
//! engine calls it directly. The drivers carry out the actions: `link.rs` over AMQP,
//! HTTP and FUSE, the simulator (`sim/`) over its broker model and virtual clock. Time
//! is what the driver says it is (`Now`), never read here.
//!
//! Content that cannot be pulled in time does not hold anything up: the message is
//! applied without that path (the path keeps its old state), and the engine retries just
//! that content with backoff, applying the entry once it is there. Sync requests are
//! coalesced: at most one sync is in flight and one more waits. A sync reply comes in
//! pages, applied as they arrive; the sync completes on the last one.

use crate::tree::{Applied, FsError, HeardPaths, Incoming, Inval, NamedPaths, Tree};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use wire::{
    ChangeItem, Content, ContentHash, Entry, Envelope, Held, Holder, MessageId, NodeId, Outcome, RelPath, Revision, ToManager, ToNode, Version,
    MAX_CHANGES_PER_MESSAGE, MAX_HELD, MAX_KEPT_REPORT, MAX_TO_MANAGER_BYTES,
};

/// Bytes of `Held` items per `Holding` message: the limit, less room for the envelope.
const HOLDING_BYTES: usize = MAX_TO_MANAGER_BYTES - 1024;

/// Time since the driver started, on the driver's clock (real or simulated).
pub type Now = Duration;

/// Entries of a sync reply page applied in one transaction of the tree.
const APPLY_AT_ONCE: usize = 1000;

/// What a message's parts come to the engine as: the contents it asks this node to
/// keep, all in one request and first; runs of decisions and broadcast entries (each
/// run goes to the tree a group at a time, one transaction per group); any other part
/// alone.
enum Run {
    Changes(Vec<Incoming>),
    Keep(Vec<wire::KeepItem>),
    One(ToNode),
}

/// `parts` gathered into [`Run`]s, in order but for the keep requests: those go first
/// among the decisions and broadcasts around them, as one. A keep must reach the node
/// before the broadcast that makes its version old; keeping a content a few items sooner
/// than asked changes nothing else. Any other part (a release, which a batch may hold
/// though the manager sends each alone) stays where it is, and no keep is moved past
/// it. So a burst of deletes, which comes back as a keep, the broadcast and the decision
/// for each file, costs the node two transactions instead of three per file.
fn runs(parts: Vec<ToNode>) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    // The keeps of the current stretch of decisions and broadcasts, and where it starts.
    let mut keep = Vec::new();
    let mut stretch_start = 0;
    let end_stretch = |runs: &mut Vec<Run>, keep: &mut Vec<wire::KeepItem>, start: usize| {
        if !keep.is_empty() {
            runs.insert(start, Run::Keep(std::mem::take(keep)));
        }
    };
    for part in parts {
        let incoming = match part {
            ToNode::Keep { items } => {
                keep.extend(items);
                continue;
            }
            ToNode::Decided { change, outcome, current, first_rev } => Incoming::Decided { change, outcome, current, first_rev },
            ToNode::Applied { entry, .. } => Incoming::Entry(entry),
            other => {
                end_stretch(&mut runs, &mut keep, stretch_start);
                runs.push(Run::One(other));
                stretch_start = runs.len();
                continue;
            }
        };
        match runs.last_mut() {
            Some(Run::Changes(c)) => c.push(incoming),
            _ => runs.push(Run::Changes(vec![incoming])),
        }
    }
    end_stretch(&mut runs, &mut keep, stretch_start);
    runs
}

/// First and longest wait before pulling a missing content again.
pub const RETRY_FIRST: Duration = Duration::from_secs(2);
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// A content still missing after its wait has grown to this (three pulls failed, about
/// 14 s) asks for a sync, and so does each failure after: the reply brings the current
/// holders and their addresses. (At `RETRY_MAX` only, a node that came back at another
/// address left the others pulling from the old one for over a minute.)
pub const SYNC_AFTER_BACKOFF: Duration = Duration::from_secs(16);
/// A sync whose reply has not come on (no page) within this is taken for lost (its
/// callers are told).
pub const SYNC_GIVE_UP: Duration = Duration::from_secs(120);
/// While a message of changes waits for its decisions, new changes wait with it (and
/// then go together, one message for the lot) for at most this long: a burst of file
/// operations makes a few large messages instead of many small ones, each costing the
/// broker a replicated write, the manager a commit and every node a step. A change made
/// while nothing is awaited goes at once.
pub const GATHER_WAIT: Duration = Duration::from_millis(50);
/// A burst: when the awaited decision comes and at least this many changes gathered
/// meanwhile, they keep gathering until [`GATHER_WAIT`] after the last publish is up
/// instead of going at once. Under a steady stream of operations (an unpacked archive,
/// a clone) messages then carry tens of changes rather than the handful made during one
/// decision's round trip, which took the broker's, the manager's and the other node's
/// CPU per change down by about a third (docs/benchmarks.md, session 30). An editor's
/// save (two or three changes) is below it and goes when its decision comes, as before.
pub const BURST_CHANGES: usize = 8;
/// Syncs start at most this often; requests in between wait for the next one (each
/// sync makes the manager read the whole tree).
pub const MIN_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// A heartbeat flushes the node database's redo log at most this often
/// (`Tree::progress_for_heartbeat`).
pub const HEARTBEAT_FLUSH_EVERY: Duration = Duration::from_secs(10);

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
    /// Of `pushed`, paths this node had taken from the manager that its reply named
    /// neither live nor deleted, sent as new (`PushedUnknown::taken_before`).
    #[serde(default)]
    pub pushed_again: u64,
    /// The manager's revision when it answered.
    pub head: u64,
    pub seconds: f64,
}

/// What the driver must do, in this order.
#[derive(Debug)]
pub enum Action<R> {
    /// Publish on the update channel. `confirmed`: the driver waits for the broker's
    /// confirm before it goes on with the next event (changes, sync requests); the others
    /// (heartbeats, `Holding`) cost nothing when lost.
    Publish { env: Envelope<ToManager>, confirmed: bool },
    /// Pull this content in the background and report with [`Engine::pull_finished`].
    Pull { path: RelPath, rev: Revision, hash: ContentHash, size: u64, holders: Vec<Holder> },
    /// Drop the kernel's cached view of what changed.
    Invalidate(Vec<Inval>),
    /// These callers' sync ended.
    SyncDone { responders: Vec<R>, result: Result<SyncReport, String> },
    /// The manager refuses whatever this node sends, and why (the operator forgot it):
    /// to be said until a sync completes.
    Refused(String),
}

/// What the engine needs to know about its node.
#[derive(Clone)]
pub struct NodeInfo {
    pub id: NodeId,
    /// Where peers pull from this node.
    pub url: String,
    /// Apply set-id bits that come from other nodes.
    pub allow_setid: bool,
    /// Program version, sent in heartbeats.
    pub software: String,
}

struct ActiveSync<R> {
    responders: Vec<R>,
    started: Now,
    /// When the request was sent or its last page came.
    progress: Now,
    pushed: u64,
    conflicts_before: u64,
    /// The page of the reply that comes next.
    next_page: u32,
    /// Every path the reply has named so far. Paths only: each page's entries are
    /// applied when it comes and not kept.
    known: NamedPaths,
    /// Every path heard of on the queue since the request was sent, at the highest
    /// revision heard: a snapshot reply leaves out what changed after it started, which
    /// comes on the queue; those above the reply's head count as named once it is in.
    heard: HeardPaths,
    /// The reply is a snapshot (`ToManager::Sync::snapshot`).
    snapshot: bool,
    /// The head of the reply's first page: the reply names every path at its revision
    /// then or later (`Tree::send_states_the_manager_lost`).
    head: Revision,
    /// Deletes the manager lost, sent once the reply is in (deepest first).
    lost_deletes: Vec<(RelPath, Revision)>,
    pulled: u64,
    failed: u64,
    /// Files whose committed content this node lost (found at start-up), with the hash
    /// they need; read when the first page comes.
    damaged: HashMap<RelPath, ContentHash>,
}

/// An entry applied without its content (no holder could give it in time); retried.
struct Missing {
    entry: Entry,
    next_try: Now,
    backoff: Duration,
    in_flight: bool,
}

/// A failure of the tree (its database or store): the session ends, like a broker
/// failure, and the driver reconnects.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct EngineError {
    what: String,
    source: FsError,
}

pub type EngineResult<T> = Result<T, EngineError>;

fn fail(what: impl Into<String>) -> impl FnOnce(FsError) -> EngineError {
    let what = what.into();
    move |source| EngineError { what, source }
}

/// The sync engine of one broker session (see the module doc). `R` is how a caller of a
/// sync is told its result (a channel in a real node, nothing in the simulator).
pub struct Engine<R> {
    tree: Arc<Tree>,
    node: NodeInfo,
    syncs: BTreeMap<MessageId, ActiveSync<R>>,
    /// Callers (and manager requests) waiting for the sync after the one in flight.
    next_sync: Option<Vec<R>>,
    last_sync_start: Option<Now>,
    /// When a heartbeat last flushed the redo log ([`HEARTBEAT_FLUSH_EVERY`]).
    last_heartbeat_flush: Option<Now>,
    /// The next sync asks for the catch-up form of reply, not a snapshot: the last one
    /// held back paths the manager had and neither named nor told of (`sync_reply_page`).
    catch_up_next: bool,
    missing: BTreeMap<RelPath, Missing>,
    out: Vec<Action<R>>,
    /// Contents taken in this step, told to the manager together at its end (`take`).
    held: Vec<Held>,
    /// Contents asked to be kept in this step: kept (true) or lacking; told together at
    /// its end (`take`).
    kept: Vec<(ContentHash, bool)>,
    /// Whether changes go several to a message (`publish_outbox`): not in the session's
    /// first publish, which sends again what an earlier session left undecided.
    batch_changes: bool,
    /// The last change sent in this session while its decision has not come, and when
    /// it went: new changes wait while there is one (at most [`GATHER_WAIT`]). The
    /// manager decides a node's changes in the order they were sent, so when the last
    /// one's decision comes, the earlier ones' came.
    awaiting: Option<MessageId>,
    awaiting_since: Now,
    /// Changes are waiting to go (`publish_due`).
    gathering: bool,
    /// The next sync sends again every undecided change first (`ToNode::SyncRequested`).
    resend_undecided_next: bool,
}

impl<R> Engine<R> {
    /// A new session: every undecided change is sent again (the manager recognises the
    /// ids it already decided), a heartbeat says the node is here, and a sync starts.
    pub fn connected(tree: Arc<Tree>, node: NodeInfo, pending_pulls: u64, now: Now) -> (Engine<R>, Vec<Action<R>>) {
        tree.republish_all();
        let mut e = Engine {
            tree,
            node,
            syncs: BTreeMap::new(),
            next_sync: None,
            last_sync_start: None,
            last_heartbeat_flush: None,
            catch_up_next: false,
            missing: BTreeMap::new(),
            out: Vec::new(),
            held: Vec::new(),
            kept: Vec::new(),
            batch_changes: false,
            awaiting: None,
            awaiting_since: now,
            gathering: false,
            resend_undecided_next: false,
        };
        e.heartbeat(pending_pulls, None, now);
        e.start_sync(Vec::new(), now);
        let out = e.take();
        (e, out)
    }

    pub fn tree(&self) -> &Arc<Tree> {
        &self.tree
    }

    /// Contents being retried in the background.
    pub fn missing(&self) -> usize {
        self.missing.len()
    }

    /// Whether anything is under way: a sync in flight or waiting, a content to retry.
    pub fn busy(&self) -> bool {
        !self.syncs.is_empty() || self.next_sync.is_some() || !self.missing.is_empty()
    }

    /// A message from the node's queue, whose contents the driver has tried to pull.
    pub fn on_message(&mut self, env: Envelope<ToNode>, now: Now) -> EngineResult<Vec<Action<R>>> {
        let awaited = self.awaiting.is_some();
        for run in runs(env.body.into_parts_for(&self.node.id)) {
            self.handle(run, now)?;
        }
        // The decision awaited came: what gathered meanwhile goes.
        let released = awaited && self.awaiting.is_none();
        if released {
            self.publish_outbox_gathered(now);
        }
        Ok(self.take())
    }

    /// When the changes waiting to go (`GATHER_WAIT`) go even if no decision comes: the
    /// driver calls [`Engine::on_outbox_ready`] then.
    pub fn publish_due(&self) -> Option<Now> {
        self.gathering.then(|| self.awaiting_since + GATHER_WAIT)
    }

    /// One message for this node (a batch's item, or a message alone), or a run of
    /// decisions, broadcast entries or keep requests that came one after the other.
    fn handle(&mut self, run: Run, now: Now) -> EngineResult<()> {
        let body = match run {
            Run::Changes(items) => return self.apply_changes(items, now),
            Run::Keep(items) => ToNode::Keep { items },
            Run::One(body) => body,
        };
        match body {
            // Runs (above).
            ToNode::Applied { .. } | ToNode::Decided { .. } => unreachable!("`runs` gathers them"),
            ToNode::SyncReply { request, head, entries, page, more } => {
                self.sync_reply_page(request, head, entries, page, more, now)?;
            }
            ToNode::SyncRequested {} => {
                // Also when this node's queue dropped messages past its length limit
                // (the manager hears of each): decisions of its changes may be among
                // them, so the sync sends again what is undecided, as a new session does.
                tracing::info!("the manager asked for a sync");
                self.resend_undecided_next = true;
                self.request_sync(None, now);
            }
            ToNode::Forgotten { request, at_ms } => {
                // The sync it answers ends with the reason, and those waiting for the
                // next one; none is started again for it until asked (a reconnection,
                // `syncctl sync`): each would be refused. A notice of a sync no longer
                // waited for (from before a reconnection) says nothing of this one.
                let Some(s) = self.syncs.remove(&request) else {
                    tracing::debug!(%request, "a refusal of a sync no longer waited for");
                    return Ok(());
                };
                let reason = forgotten_reason(at_ms);
                tracing::error!("{reason}");
                // What it was for is still to do if the manager takes this node again.
                self.catch_up_next |= !s.snapshot;
                let waiting = s.responders.into_iter().chain(self.next_sync.take().into_iter().flatten());
                self.out.push(Action::SyncDone { responders: waiting.collect(), result: Err(reason.clone()) });
                self.out.push(Action::Refused(reason));
            }
            ToNode::Keep { items } => {
                let (keeping, lacking) = self.tree.keep(&items).map_err(fail("recording contents to keep"))?;
                if !lacking.is_empty() {
                    tracing::warn!(count = lacking.len(), "asked to keep contents this node does not have (or could not fetch)");
                }
                self.kept.extend(keeping.into_iter().map(|h| (h, true)).chain(lacking.into_iter().map(|h| (h, false))));
            }
            ToNode::Release { hashes } => {
                self.tree.release_kept(&hashes).map_err(fail("releasing kept contents"))?;
            }
            // The driver hands answers to whoever asked; nothing for the engine.
            ToNode::Answer { .. } => {}
            // `into_parts_for` took it apart; a batch inside a batch fails decoding.
            ToNode::Batch { .. } => {}
        }
        Ok(())
    }

    /// The manager's decisions on our changes and other nodes' changes, in order,
    /// [`APPLY_AT_ONCE`] to a transaction (`apply_grouped`).
    fn apply_changes(&mut self, items: Vec<Incoming>, now: Now) -> EngineResult<()> {
        // The manager has each of these paths: a sync under way counts them as named.
        for sync in self.syncs.values_mut() {
            for entry in items.iter().map(Incoming::entry) {
                sync.heard.insert(&entry.path, entry.rev);
            }
        }
        self.apply_queued(items, now)
    }

    /// Items from the queue (decisions, broadcasts, the entries of a sync reply page no
    /// longer waited for): a state older than a forgotten delete of its path is not
    /// applied (`tree/forget.rs`).
    fn apply_queued(&mut self, mut items: Vec<Incoming>, now: Now) -> EngineResult<()> {
        for item in &mut items {
            match item {
                Incoming::Decided { change, outcome, current, .. } => {
                    if self.awaiting.as_ref() == Some(change) {
                        self.awaiting = None;
                    }
                    if let Outcome::Conflict { copy } = outcome {
                        tracing::info!(path = %current.path, %copy, "conflict: our version was kept as a conflict file");
                    }
                }
                Incoming::Entry(entry) => self.clear_setid(entry),
            }
        }
        let one = |tree: &Tree, item: &Incoming| {
            let what = match item {
                Incoming::Decided { current, .. } => format!("applying the decision on {}", current.path),
                Incoming::Entry(e) => format!("applying {}", e.path),
            };
            tree.apply_incoming(item).map_err(fail(what))
        };
        self.apply_grouped(&items, Incoming::entry, Tree::apply_incoming_all, one, now).map(drop)
    }

    /// `items` to the tree [`APPLY_AT_ONCE`] at a time, each group in one transaction
    /// (`all`: a commit per group instead of one per path, and the tree's lock let go
    /// between groups, so file operations wait for one group at most); if a group's
    /// transaction fails, its items are applied one by one (`one`), so one bad item fails
    /// alone. Returns what each changed.
    fn apply_grouped<T>(
        &mut self,
        items: &[T],
        entry: impl Fn(&T) -> &Entry,
        all: impl Fn(&Tree, &[T]) -> crate::tree::FsResult<Vec<Applied>>,
        one: impl Fn(&Tree, &T) -> EngineResult<Applied>,
        now: Now,
    ) -> EngineResult<Vec<Applied>> {
        let mut out = Vec::with_capacity(items.len());
        for group in items.chunks(APPLY_AT_ONCE) {
            self.tree.yield_to_waiters();
            let applied = match all(&self.tree, group) {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!("applying {} at once failed ({e}); one by one", group.len());
                    for item in group {
                        let applied = one(&self.tree, item)?;
                        out.push(applied.summary());
                        self.after_apply(entry(item), applied, now);
                    }
                    continue;
                }
            };
            for (item, applied) in group.iter().zip(applied) {
                out.push(applied.summary());
                self.after_apply(entry(item), applied, now);
            }
        }
        Ok(out)
    }

    /// Tells the manager what this node keeps and lacks, in messages within the limit.
    fn report_kept(&mut self, all: Vec<(ContentHash, bool)>) {
        for chunk in all.chunks(MAX_KEPT_REPORT) {
            let keeping = chunk.iter().filter(|(_, k)| *k).map(|(h, _)| h.clone()).collect();
            let lacking = chunk.iter().filter(|(_, k)| !*k).map(|(h, _)| h.clone()).collect();
            let env = Envelope::new(self.tree.env().new_id(), self.node.id.clone(), ToManager::Kept { keeping, lacking });
            self.out.push(Action::Publish { env, confirmed: false });
        }
    }

    /// Heartbeat time: presence, whatever the outbox holds that was not sent, and the
    /// kept contents the GC dropped for space.
    pub fn on_heartbeat(&mut self, pending_pulls: u64, residency: Option<wire::NodeResidency>, now: Now) -> Vec<Action<R>> {
        let dropped = self.tree.take_dropped();
        self.kept.extend(dropped.into_iter().map(|h| (h, false)));
        self.heartbeat(pending_pulls, residency, now);
        self.publish_outbox_gathered(now);
        self.take()
    }

    /// The tree has new changes to send (or the time to gather them is up).
    pub fn on_outbox_ready(&mut self, now: Now) -> Vec<Action<R>> {
        self.publish_outbox_gathered(now);
        self.take()
    }

    /// Sends the outbox now unless the last publish was less than [`GATHER_WAIT`] ago
    /// and its changes are still awaited, or a burst ([`BURST_CHANGES`]) gathered: then
    /// the new ones wait to go together, when the last decision comes (and no burst
    /// gathered) or the wait is up.
    fn publish_outbox_gathered(&mut self, now: Now) {
        let held = self.awaiting.is_some() || self.tree.unpublished_at_least(BURST_CHANGES);
        if held && now.saturating_sub(self.awaiting_since) < GATHER_WAIT {
            self.gathering = true;
            return;
        }
        self.publish_outbox_at(now);
    }

    /// Someone asks for a sync (`syncctl sync`, the manager, a content that keeps
    /// failing). It starts now, or after the one in flight.
    pub fn on_sync_requested(&mut self, responder: Option<R>, now: Now) -> Vec<Action<R>> {
        self.request_sync(responder, now);
        self.take()
    }

    /// Retry time: starts a pull for every missing content due for another try, gives up
    /// on syncs the manager never answered, and starts a sync that was waiting.
    pub fn on_retry_tick(&mut self, now: Now) -> Vec<Action<R>> {
        for (path, m) in self.missing.iter_mut().filter(|(_, m)| !m.in_flight && m.next_try <= now) {
            let Some(Version { content: Content::File { hash, size }, .. }) = m.entry.version.clone() else {
                continue;
            };
            m.in_flight = true;
            self.out.push(Action::Pull { path: path.clone(), rev: m.entry.rev, hash, size, holders: m.entry.holders.clone() });
        }
        let lost: Vec<MessageId> = self.syncs.iter().filter(|(_, s)| now.saturating_sub(s.progress) > SYNC_GIVE_UP).map(|(id, _)| id.clone()).collect();
        for id in lost {
            if let Some(s) = self.syncs.remove(&id) {
                tracing::warn!("the manager did not answer a sync within {SYNC_GIVE_UP:?}; syncing again");
                let reason = format!("the manager did not answer within {}s", SYNC_GIVE_UP.as_secs());
                self.out.push(Action::SyncDone { responders: s.responders, result: Err(reason) });
                // What the sync was for (sending the paths the manager does not know)
                // is still to do: the request may be lost with the manager's database
                // (brought back from an older copy; simulator seed 1116).
                self.catch_up_next |= !s.snapshot;
                self.next_sync.get_or_insert_with(Vec::new);
            }
        }
        self.start_next_sync(now);
        self.take()
    }

    /// A background pull asked for by [`Action::Pull`] ended: the entry is applied if
    /// its content came, else retried later. When the holders it knows keep failing, a
    /// sync (coalesced) brings the current holders.
    pub fn pull_finished(&mut self, path: &RelPath, rev: Revision, ok: bool, now: Now) -> EngineResult<Vec<Action<R>>> {
        let Some(m) = self.missing.get_mut(path).filter(|m| m.entry.rev == rev) else {
            return Ok(self.take());
        };
        m.in_flight = false;
        if ok {
            let entry = m.entry.clone();
            self.apply_entry(entry, now)?;
            return Ok(self.take());
        }
        m.backoff = (m.backoff * 2).min(RETRY_MAX);
        m.next_try = now + m.backoff;
        if m.backoff >= SYNC_AFTER_BACKOFF {
            self.request_sync(None, now);
        }
        Ok(self.take())
    }

    /// The step's actions; what it took is told to the manager last, in as few
    /// `Holding` messages as fit the size limits.
    fn take(&mut self) -> Vec<Action<R>> {
        let mut items = Vec::new();
        let mut bytes = 0;
        for held in std::mem::take(&mut self.held) {
            let len = held.encoded_len();
            if !items.is_empty() && (items.len() == MAX_HELD || bytes + len > HOLDING_BYTES) {
                self.publish_holding(std::mem::take(&mut items));
                bytes = 0;
            }
            bytes += len;
            items.push(held);
        }
        if !items.is_empty() {
            self.publish_holding(items);
        }
        let kept = std::mem::take(&mut self.kept);
        self.report_kept(kept);
        std::mem::take(&mut self.out)
    }

    fn publish_holding(&mut self, items: Vec<Held>) {
        let env = self.envelope(ToManager::Holding { items });
        self.out.push(Action::Publish { env, confirmed: false });
    }

    fn envelope(&self, body: ToManager) -> Envelope<ToManager> {
        Envelope::new(self.tree.env().new_id(), self.node.id.clone(), body)
    }

    /// A heartbeat whose progress is durable when it says nothing is undecided
    /// ([`Tree::progress_for_heartbeat`]); if the flush fails, it does not say the
    /// revision taken (0), which lets the manager forget nothing of this node's.
    fn heartbeat(&mut self, pending_pulls: u64, residency: Option<wire::NodeResidency>, now: Now) {
        let may_flush = self.last_heartbeat_flush.is_none_or(|t| now.saturating_sub(t) >= HEARTBEAT_FLUSH_EVERY);
        let progress = self.tree.progress_for_heartbeat(may_flush).unwrap_or_else(|e| {
            tracing::warn!("flushing the node database's log for a heartbeat: {e}");
            crate::tree::HeartbeatProgress { pending_changes: self.tree.pending_changes(), taken: Revision(0), flushed: false, applied: Revision(0) }
        });
        if progress.flushed {
            self.last_heartbeat_flush = Some(now);
        }
        let body = ToManager::Heartbeat {
            url: self.node.url.clone(),
            pending_changes: progress.pending_changes,
            pending_pulls,
            software: self.node.software.clone(),
            residency,
            taken: progress.taken,
            applied: progress.applied,
        };
        let env = self.envelope(body);
        self.out.push(Action::Publish { env, confirmed: false });
    }

    /// Queues the outbox rows not yet sent in this session; returns how many.
    /// Sends the changes not sent yet in this session, in order: several to a message
    /// (`ToManager::Changes`, as many as fit), so that a burst of local operations costs
    /// the broker and the manager one message per run of changes instead of one each.
    /// The session's first publish sends each change alone: it sends again what an
    /// earlier session left undecided, and a change the manager cannot take (its message
    /// is dead-lettered after retries) must not hold back the changes sent with it.
    fn publish_outbox_at(&mut self, now: Now) -> u64 {
        self.gathering = false;
        let rows = self.tree.take_unpublished();
        if let Some(last) = rows.last() {
            self.awaiting = Some(last.msg.clone());
            self.awaiting_since = now;
        }
        let n = rows.len() as u64;
        let together = std::mem::replace(&mut self.batch_changes, true) && rows.len() > 1;
        if !together {
            for r in rows {
                let env = Envelope::new(r.msg, self.node.id.clone(), ToManager::Change(r.change));
                self.out.push(Action::Publish { env, confirmed: true });
            }
            return n;
        }
        // What an envelope with no items costs, with room to spare.
        const ENVELOPE_BYTES: usize = 512;
        let mut items: Vec<ChangeItem> = Vec::new();
        let mut bytes = ENVELOPE_BYTES;
        for r in rows {
            let item = ChangeItem { id: r.msg, change: r.change };
            let len = item.encoded_len();
            if !items.is_empty() && (bytes + len > MAX_TO_MANAGER_BYTES || items.len() == MAX_CHANGES_PER_MESSAGE) {
                self.publish_changes(std::mem::take(&mut items));
                bytes = ENVELOPE_BYTES;
            }
            bytes += len;
            items.push(item);
        }
        self.publish_changes(items);
        n
    }

    /// One message for `items`: a `Changes`, or a lone change as it always went.
    fn publish_changes(&mut self, mut items: Vec<ChangeItem>) {
        let env = match items.len() {
            0 => return,
            1 => {
                let item = items.pop().expect("one");
                Envelope::new(item.id, self.node.id.clone(), ToManager::Change(item.change))
            }
            _ => self.envelope(ToManager::Changes { items }),
        };
        self.out.push(Action::Publish { env, confirmed: true });
    }

    fn request_sync(&mut self, responder: Option<R>, now: Now) {
        self.next_sync.get_or_insert_with(Vec::new).extend(responder);
        self.start_next_sync(now);
    }

    /// Starts the waiting sync, if any, none is in flight and the interval has passed
    /// (the retry tick calls this again).
    fn start_next_sync(&mut self, now: Now) {
        if self.syncs.is_empty() && self.last_sync_start.is_none_or(|t| now.saturating_sub(t) >= MIN_SYNC_INTERVAL) {
            if let Some(responders) = self.next_sync.take() {
                self.start_sync(responders, now);
            }
        }
    }

    /// Sends the outbox, then a `Sync`; the reply comes after the manager has decided
    /// every change sent before it.
    fn start_sync(&mut self, responders: Vec<R>, now: Now) {
        self.last_sync_start = Some(now);
        if std::mem::take(&mut self.resend_undecided_next) {
            // Each alone, as in a new session (`publish_outbox_at`).
            self.tree.republish_all();
            self.batch_changes = false;
        }
        let pushed = self.publish_outbox_at(now);
        let request = self.tree.env().new_id();
        let synced_head = self.tree.synced_head();
        let since = self.sync_since(synced_head);
        let applied = self.vouched_applied(synced_head);
        let snapshot = !std::mem::take(&mut self.catch_up_next);
        let taken = Revision(self.tree.last_revision());
        let env = self.envelope(ToManager::Sync { request: request.clone(), url: self.node.url.clone(), since, paged: true, snapshot, taken, applied });
        self.out.push(Action::Publish { env, confirmed: true });
        let conflicts_before = self.tree.conflicts_seen();
        let sync = ActiveSync {
            responders,
            started: now,
            progress: now,
            pushed,
            conflicts_before,
            next_page: 0,
            known: NamedPaths::default(),
            heard: HeardPaths::default(),
            snapshot,
            head: Revision(0),
            lost_deletes: Vec::new(),
            pulled: 0,
            failed: 0,
            damaged: HashMap::new(),
        };
        self.syncs.insert(request, sync);
    }

    /// The revision up to which the manager may leave deleted paths out of the reply
    /// (docs/sync.md, *Deleted paths in a sync reply*). This node has applied every delete
    /// up to the highest revision it has taken: deletes come on its queue in revision
    /// order, and a sync reply brings what the queue could not. A reply cut off half-way
    /// may have moved that revision past deletes it had not brought yet, so once a sync
    /// has completed, no further than its head, and before any sync completed, none (0).
    /// A node that has taken no revision has no path the manager knew, and needs no
    /// deleted path at all.
    fn sync_since(&self, synced_head: Option<u64>) -> Revision {
        let taken = self.tree.last_revision();
        if taken == 0 {
            return Revision(u64::MAX);
        }
        // The last completed sync's head, also from before a restart: a sync cut off
        // half-way, or a queue that dropped old messages while the node was away, may
        // have moved `taken` past deletes it never brought. A node that took revisions
        // but never completed a sync (its first reply lost with its queue's oldest
        // messages, and a delete's broadcast with it) can vouch for none: `taken` there
        // brought back a path deleted meanwhile (simulator seeds 216 and 5925).
        Revision(synced_head.map_or(0, |head| head.min(taken)))
    }

    /// The revision up to which this node vouches to the manager, in a sync request,
    /// that it has applied every delete ([`crate::tree::deletes_applied_upto`]). What it
    /// vouches for is on its disk first (a power loss would take back the deletes it
    /// applied, and the manager forgets a delete every node vouched past); if the flush
    /// fails, 0.
    fn vouched_applied(&self, synced_head: Option<u64>) -> Revision {
        let applied = crate::tree::deletes_applied_upto(synced_head, self.tree.last_revision());
        if applied.0 == 0 {
            return applied;
        }
        match self.tree.flush_log() {
            Ok(_) => applied,
            Err(e) => {
                tracing::warn!("flushing the node database's log before a sync: {e}; vouching for no applied delete");
                Revision(0)
            }
        }
    }

    /// Applies another node's state of one path (a broadcast, a sync reply); set-id bits
    /// are cleared in it unless allowed. Own decided changes go through `apply_decided`
    /// and keep what this node's user set.
    fn apply_entry(&mut self, mut entry: Entry, now: Now) -> EngineResult<Applied> {
        self.clear_setid(&mut entry);
        let applied = self.tree.apply_remote(&entry).map_err(fail(format!("applying {}", entry.path)))?;
        let result = applied.summary();
        self.after_apply(&entry, applied, now);
        Ok(result)
    }

    /// [`Engine::apply_entry`] for many entries (a sync reply page, a batch's run of
    /// broadcasts), [`APPLY_AT_ONCE`] to a transaction (`apply_grouped`).
    fn apply_entries(&mut self, mut entries: Vec<Entry>, now: Now) -> EngineResult<Vec<Applied>> {
        for e in &mut entries {
            self.clear_setid(e);
        }
        self.apply_grouped(&entries, |e| e, Tree::apply_remote_all, |tree, e| tree.apply_remote(e).map_err(fail(format!("applying {}", e.path))), now)
    }

    fn clear_setid(&self, entry: &mut Entry) {
        if !self.node.allow_setid {
            if let Some(v) = &mut entry.version {
                if v.mode & 0o6000 != 0 {
                    tracing::info!(path = %entry.path, mode = format!("{:o}", v.mode), "clearing set-id bits that came from another node");
                    v.mode &= !0o6000;
                }
            }
        }
    }

    /// Passes on what the kernel must forget, tells the manager we can serve what we just
    /// took, and keeps an entry whose content was not there for a retry (a newer entry of
    /// the path replaces it).
    fn after_apply(&mut self, entry: &Entry, mut applied: Applied, now: Now) {
        if applied.stale {
            return;
        }
        for (other, its) in std::mem::take(&mut applied.also) {
            self.after_apply(&other, its, now);
        }
        if !applied.invals.is_empty() {
            self.out.push(Action::Invalidate(applied.invals));
        }
        if applied.missing_content {
            tracing::debug!(path = %entry.path, rev = %entry.rev, "the content of a pinned path is not here yet: tried again later");
            let retry = self.missing.entry(entry.path.clone()).or_insert_with(|| Missing {
                entry: entry.clone(),
                next_try: now + RETRY_FIRST,
                backoff: RETRY_FIRST,
                in_flight: false,
            });
            if entry.rev >= retry.entry.rev {
                retry.entry = entry.clone();
            }
        } else if self.missing.get(&entry.path).is_some_and(|m| entry.rev >= m.entry.rev) {
            self.missing.remove(&entry.path);
        }
        if !matches!(&entry.version, Some(Version { content: Content::Dir, .. })) {
            self.drop_missing_below(&entry.path, entry.rev);
        }
        // A path applied without its content (on demand here) is not held.
        if applied.changed && !applied.remote {
            if let Some(Version { content: Content::File { hash, .. }, .. }) = &entry.version {
                self.held.push(Held { path: entry.path.clone(), rev: entry.rev, hash: hash.clone() });
            }
        }
    }

    /// Ends the retries of contents below `path` from before `rev`, a state of `path`
    /// that is no directory (deleted, or a file): the manager deletes a directory only
    /// once everything below it is deleted, so those states are gone too, though their
    /// deletes may not reach this node (lost with its queue's oldest messages: simulator
    /// seed 5925). Pulled, such a content is thrown away as stale
    /// (`State::gone_above_since`); while no holder has it any more, it would be retried,
    /// and ask for syncs, for good. A pull in flight runs out and is ignored.
    fn drop_missing_below(&mut self, path: &RelPath, rev: Revision) {
        if self.missing.is_empty() {
            return;
        }
        // Below `path`: from "path/" up to "path0" ('0' follows '/').
        let (from, to) = (format!("{path}/"), format!("{path}0"));
        let gone: Vec<RelPath> = self
            .missing
            .range::<str, _>((std::ops::Bound::Included(from.as_str()), std::ops::Bound::Excluded(to.as_str())))
            .filter(|(_, m)| m.entry.rev < rev)
            .map(|(p, _)| p.clone())
            .collect();
        for p in gone {
            tracing::debug!(target: "changes", path = %p, above = %path, rev = rev.0, "no longer pulled: a path above it is no directory since");
            self.missing.remove(&p);
        }
    }

    /// Ends the retries of contents whose paths a completed sync reply did not name (nor
    /// did the queue while it came, above the head), at revisions up to its head: as of
    /// the head those paths are no longer live, though their deletes may never reach
    /// this node (lost with its queue's oldest messages). Pulled later, such a content
    /// would make the file again with no delete left to undo it (a node that had taken
    /// no revision vouches for every delete up to the head after its first sync; review
    /// of session 46). A state after the head is kept: it comes on the queue.
    fn drop_missing_not_named(&mut self, named: &NamedPaths, head: Revision) {
        self.missing.retain(|path, m| {
            let keep = m.entry.rev > head || named.contains(path);
            if !keep {
                tracing::debug!(target: "changes", %path, rev = m.entry.rev.0, head = head.0, "no longer pulled: the sync reply did not name it");
            }
            keep
        });
    }

    /// One page of a sync reply. Its entries are applied at once, like broadcasts (each
    /// is the state a path had, and an older state than the node's is ignored). The sync
    /// it answers gathers the paths it names; only the last page pushes the local paths
    /// the manager did not name, and reports. A page of a sync this node no longer waits
    /// for (sent before a reconnection, or given up) completes nothing.
    fn sync_reply_page(&mut self, request: MessageId, head: Revision, entries: Vec<Entry>, page: u32, more: bool, now: Now) -> EngineResult<()> {
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
            self.apply_queued(entries.into_iter().map(Incoming::Entry).collect(), now)?;
            self.start_next_sync(now);
            return Ok(());
        };
        if page == 0 {
            s.damaged = self.tree.damaged().into_iter().collect();
            s.head = head;
        }
        let resent = self.tree.send_states_the_manager_lost(&entries, s.head, &mut s.lost_deletes).map_err(fail("sending states the manager lost"))?;
        if resent > 0 {
            tracing::warn!(paths = resent, "the manager names paths at older revisions than this node took from it (its database lost decisions: restored from an older copy?); sending it this node's later states");
            s.pushed += resent as u64;
        }
        let mut heal = Vec::new();
        for entry in &entries {
            s.known.insert(&entry.path);
            if matches!((&entry.version, s.damaged.get(&entry.path)), (Some(Version { content: Content::File { hash, .. }, .. }), Some(lost)) if hash == lost) {
                heal.push(entry.clone());
            }
        }
        for a in self.apply_entries(entries, now)? {
            s.pulled += a.changed as u64;
            s.failed += a.missing_content as u64;
        }
        self.heal_damaged(heal, now);
        s.progress = now;
        if more {
            s.next_page += 1;
            self.syncs.insert(request, s);
            return Ok(());
        }
        let deleted = self.tree.send_deletes_the_manager_lost(std::mem::take(&mut s.lost_deletes), s.head).map_err(fail("sending deletes the manager lost"))?;
        if deleted > 0 {
            tracing::warn!(paths = deleted, "the manager names paths this node took as deleted later (its database lost decisions); sending it the deletes");
            s.pushed += deleted as u64;
        }
        s.known.add_heard_above(std::mem::take(&mut s.heard), s.head);
        let unknown = self.tree.push_unknown(&s.known, s.snapshot).map_err(fail("pushing local paths"))?;
        self.drop_missing_not_named(&s.known, s.head);
        let held_back = unknown.held_back;
        if unknown.held_back > 0 {
            tracing::warn!(
                paths = unknown.held_back,
                "paths this node took from the manager are neither in the sync's snapshot nor were told of meanwhile (a message this node's queue dropped?); not sending them, syncing again in the catch-up form"
            );
            self.catch_up_next = true;
            self.next_sync.get_or_insert_with(Vec::new);
        }
        if unknown.taken_before > 0 {
            tracing::warn!(
                paths = unknown.taken_before,
                "paths this node took from the manager are neither live nor deleted in the sync's reply (its database lost them?); sending them as new"
            );
        }
        let pushed_again = unknown.taken_before as u64;
        let unknown = unknown.pushed as u64;
        self.publish_outbox_at(now);
        let report = SyncReport {
            pushed: s.pushed + unknown,
            pushed_again,
            pulled: s.pulled,
            conflicts: self.tree.conflicts_seen().saturating_sub(s.conflicts_before),
            failed: s.failed,
            head: head.0,
            seconds: now.saturating_sub(s.started).as_secs_f64(),
        };
        tracing::info!(pushed = report.pushed, pulled = report.pulled, conflicts = report.conflicts, failed = report.failed, pages = page + 1, "sync done");
        // A reply that left paths this node took neither live nor deleted (held back)
        // shows it has not applied every delete up to the head (a stale broadcast taken
        // from its queue after the delete's was dropped): the catch-up sync it runs next
        // must name the deletes since the last sync that showed none (simulator seed 7401).
        if held_back == 0 {
            match self.tree.set_synced_head(head.0) {
                Ok(()) => {
                    if let Err(e) = self.tree.forget_old_deletes(head.0) {
                        tracing::warn!("forgetting the revisions of deleted paths: {e}; tried again after the next sync");
                    }
                }
                Err(e) => tracing::warn!("{e}; the next sync asks for more deleted paths"),
            }
        }
        self.out.push(Action::SyncDone { responders: s.responders, result: Ok(report) });
        self.start_next_sync(now);
        Ok(())
    }

    /// Files whose committed content vanished from the store (found at start-up) are
    /// pulled again like any missing content, from the holders the sync reply names:
    /// `entries` are the reply's entries of such files, already applied.
    fn heal_damaged(&mut self, entries: Vec<Entry>, now: Now) {
        let rules = self.tree.pin_rules();
        for entry in entries {
            let Some(hash) = self.tree.needs_content_under(&entry, &rules) else { continue };
            if !self.missing.contains_key(&entry.path) {
                tracing::warn!(path = %entry.path, "pulling {hash} again: this node's copy was lost");
                let path = entry.path.clone();
                self.missing.insert(path, Missing { entry, next_try: now, backoff: RETRY_FIRST, in_flight: false });
            }
        }
    }
}

/// A content a message needs that the store does not have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub hash: ContentHash,
    pub size: u64,
    pub holders: Vec<Holder>,
    /// What the path holds here now: a pull takes the chunks they share from it.
    pub basis: Option<ContentHash>,
}

/// What a node forgotten by the operator at `at_ms` is told, and tells its user.
pub fn forgotten_reason(at_ms: i64) -> String {
    // (Within what RFC 3339 can write: years up to 9999.)
    let at = std::time::UNIX_EPOCH + Duration::from_millis(at_ms.clamp(0, 253_402_300_799_000) as u64);
    format!(
        "the manager forgot this node at {} (`manager node forget`, or silent past `--forget-nodes-after`) and refuses whatever it sends, for good; every file is still in this mount: to sync again, copy out what is only here and start a node under another id with an empty data directory",
        humantime::format_rfc3339_seconds(at)
    )
}

/// The contents a message needs that the store does not have, once each, with their
/// size, holders and basis: the driver pulls them before it hands the message to the
/// engine.
pub fn wanted_contents(tree: &Tree, me: &NodeId, body: &ToNode) -> Vec<Wanted> {
    let entries: Vec<&Entry> = body
        .parts_for(me)
        .flat_map(|part| match part {
            ToNode::Applied { entry, .. } => vec![entry],
            ToNode::Decided { current, .. } => vec![current],
            ToNode::SyncReply { entries, .. } => entries.iter().collect(),
            ToNode::SyncRequested {}
            | ToNode::Forgotten { .. }
            | ToNode::Batch { .. }
            | ToNode::Keep { .. }
            | ToNode::Release { .. }
            | ToNode::Answer { .. } => vec![],
        })
        .collect();
    // The contents of this node's own changes being decided are here: an undecided
    // change keeps its content from the GC. (Asking the store would be a `small.db` read
    // per decision, which a close waits for.)
    let own: Vec<&MessageId> = body
        .parts_for(me)
        .filter_map(|part| match part {
            ToNode::Decided { change, .. } => Some(change),
            _ => None,
        })
        .collect();
    let here = tree.queued_contents(&own);
    let mut seen = here.clone();
    let rules = tree.pin_rules();
    let mut wanted: Vec<Wanted> = entries
        .into_iter()
        .filter(|e| !matches!(&e.version, Some(Version { content: Content::File { hash, .. }, .. }) if here.contains(hash)))
        .filter_map(|e| match (&e.version, tree.needs_content_under(e, &rules)) {
            (Some(Version { content: Content::File { size, .. }, .. }), Some(hash)) if seen.insert(hash.clone()) => {
                let basis = (*size >= crate::puller::CHUNKED_MIN_BYTES).then(|| tree.local_hash(&e.path)).flatten();
                Some(Wanted { hash, size: *size, holders: e.holders.clone(), basis })
            }
            _ => None,
        })
        .collect();
    // Contents to keep that this node is to fetch from another keeper, if the disk has
    // room for them above the free-space floor (else they are reported lacking).
    for part in body.parts_for(me) {
        if let ToNode::Keep { items } = part {
            for i in items.iter().filter(|i| !i.holders.is_empty() && !tree.store().has(&i.hash) && tree.room_to_keep(i.size)) {
                if seen.insert(i.hash.clone()) {
                    wanted.push(Wanted { hash: i.hash.clone(), size: i.size, holders: i.holders.clone(), basis: None });
                }
            }
        }
    }
    wanted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Db;
    use crate::store::{put_bytes, ContentStore};
    use wire::{BatchItem, Version, MAX_TO_MANAGER_BYTES};

    /// Node n2, as the tests' engines run it.
    fn n2_info() -> NodeInfo {
        NodeInfo { id: "n2".parse().unwrap(), url: "http://127.0.0.1:1".into(), allow_setid: false, software: "test".into() }
    }

    /// A tree in `dir` whose store holds `bytes`, and the engine of node n2 on it.
    fn engine_with(dir: &std::path::Path, bytes: &[u8]) -> (ContentHash, Arc<Tree>, NodeId, Engine<()>) {
        let hash = put_bytes(&ContentStore::open(dir).unwrap(), bytes).unwrap();
        let tree = Arc::new(Tree::load(Db::open(&dir.join("node.db")).unwrap(), ContentStore::open(dir).unwrap()).unwrap());
        let me: NodeId = "n2".parse().unwrap();
        let info = n2_info();
        let (engine, _) = Engine::<()>::connected(tree.clone(), info, 0, Duration::ZERO);
        (hash, tree, me, engine)
    }

    /// A batch of broadcasts applied in one step is told to the manager in as few
    /// `Holding` messages as fit the size limit, naming every file once.
    #[test]
    fn files_taken_in_one_step_are_told_in_few_holding_messages_under_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (hash, _tree, _me, mut engine) = engine_with(dir.path(), b"x");
        let applied = |path: String, rev: u64, content| ToNode::Applied {
            entry: Entry {
                path: RelPath::new(path).unwrap(),
                rev: Revision(rev),
                version: Some(Version { content, mode: 0o644, uid: 0, gid: 0, mtime_ns: 1 }),
                holders: vec![],
                from_lost: None,
            },
            origin: "n1".parse().unwrap(),
        };
        let mut items = vec![BatchItem { to: None, msg: applied("d".into(), 1, Content::Dir) }];
        let names: Vec<String> = (0..400).map(|i| format!("d/{i:03}{}", "n".repeat(240))).collect();
        for (i, name) in names.iter().enumerate() {
            items.push(BatchItem { to: None, msg: applied(name.clone(), 2 + i as u64, Content::File { hash: hash.clone(), size: 1 }) });
        }
        let actions = engine.on_message(Envelope::new("b1".parse().unwrap(), NodeId::manager(), ToNode::Batch { items }), Duration::ZERO).unwrap();
        let mut told = Vec::new();
        let mut messages = 0;
        for a in actions {
            if let Action::Publish { env, .. } = a {
                if let ToManager::Holding { items } = &env.body {
                    assert!(env.encode().len() <= MAX_TO_MANAGER_BYTES, "a holding message of {} bytes", env.encode().len());
                    messages += 1;
                    told.extend(items.iter().map(|h| h.path.to_string()));
                }
            }
        }
        // The items are of one size: each message but the last is full.
        let len = Held { path: RelPath::new(names[0].clone()).unwrap(), rev: Revision(100), hash }.encoded_len();
        assert_eq!(messages, names.len().div_ceil(HOLDING_BYTES / len));
        assert!(messages > 1);
        assert_eq!(told, names);
    }

    /// A content being retried below a directory stops being retried when the
    /// directory's delete arrives, though the file's own delete never did (lost with the
    /// queue's oldest messages); one beside the directory, and one put there later, go on.
    #[test]
    fn a_directory_deleted_ends_the_retries_of_contents_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _tree, _me, mut engine) = engine_with(dir.path(), b"x");
        let absent = ContentHash::from_bytes([7; 32]);
        let applied = |path: &str, rev: u64, content: Option<Content>| ToNode::Applied {
            entry: Entry {
                path: RelPath::new(path.to_string()).unwrap(),
                rev: Revision(rev),
                version: content.map(|content| Version { content, mode: 0o644, uid: 0, gid: 0, mtime_ns: 1 }),
                holders: vec![],
                from_lost: None,
            },
            origin: "n1".parse().unwrap(),
        };
        let file = || Some(Content::File { hash: absent.clone(), size: 1 });
        let take = |engine: &mut Engine<()>, msg| engine.on_message(Envelope::new(engine.tree.env().new_id(), NodeId::manager(), msg), Duration::ZERO).unwrap();
        for msg in [
            applied("d", 1, Some(Content::Dir)),
            applied("d/e", 2, Some(Content::Dir)),
            applied("d/e/f", 3, file()),
            applied("d.txt", 4, file()),
            applied("d0", 5, Some(Content::Dir)),
            applied("d0/g", 6, file()),
        ] {
            take(&mut engine, msg);
        }
        assert_eq!(engine.missing(), 3, "three contents no node here has");
        take(&mut engine, applied("d", 9, None));
        assert_eq!(engine.missing.keys().map(|p| p.to_string()).collect::<Vec<_>>(), ["d.txt", "d0/g"]);
    }

    /// A content being retried whose path a completed sync reply does not name (its
    /// delete lost with the queue's oldest messages) stops being retried; one named, and
    /// one at a revision after the reply's head, go on.
    #[test]
    fn a_sync_reply_that_does_not_name_a_path_ends_the_retries_of_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let tree = Arc::new(Tree::load(Db::open(&dir.path().join("node.db")).unwrap(), ContentStore::open(dir.path()).unwrap()).unwrap());
        let info = n2_info();
        let (mut engine, first) = Engine::<()>::connected(tree.clone(), info, 0, Duration::ZERO);
        let sync_sent = |actions: &[Action<()>]| {
            actions
                .iter()
                .find_map(|a| match a {
                    Action::Publish { env, .. } => match &env.body {
                        ToManager::Sync { request, .. } => Some(request.clone()),
                        _ => None,
                    },
                    _ => None,
                })
                .expect("a sync is sent")
        };
        let entry = |path: &str, rev: u64| Entry {
            path: RelPath::new(path.to_string()).unwrap(),
            rev: Revision(rev),
            version: Some(Version { content: Content::File { hash: ContentHash::from_bytes([7; 32]), size: 1 }, mode: 0o644, uid: 0, gid: 0, mtime_ns: 1 }),
            holders: vec![],
            from_lost: None,
        };
        let to_node = |body| Envelope::new(tree.env().new_id(), NodeId::manager(), body);
        let reply = |request, head, entries| to_node(ToNode::SyncReply { request, head: Revision(head), entries, page: 0, more: false });
        engine.on_message(reply(sync_sent(&first), 1, vec![]), Duration::ZERO).unwrap();
        for (path, rev) in [("gone", 2), ("named", 3), ("later", 7)] {
            engine.on_message(to_node(ToNode::Applied { entry: entry(path, rev), origin: "n1".parse().unwrap() }), Duration::ZERO).unwrap();
        }
        assert_eq!(engine.missing(), 3);
        // (Heard of before this sync began: only the reply names what is live.)
        let request = sync_sent(&engine.on_sync_requested(None, MIN_SYNC_INTERVAL));
        engine.on_message(reply(request, 5, vec![entry("named", 3)]), MIN_SYNC_INTERVAL).unwrap();
        assert_eq!(engine.missing.keys().map(|p| p.to_string()).collect::<Vec<_>>(), ["later", "named"]);
    }

    /// A sync's reply is a snapshot as of the revision it started from: a path the node
    /// hears of on its queue while the reply is under way, and the reply does not name,
    /// is not pushed as new. Nor is a path it took from the manager before and neither
    /// named nor told of (a message its queue dropped: pushed, a clean copy could bring
    /// back a path deleted meanwhile): the next sync asks for the catch-up form, and what
    /// that one does not name is pushed.
    #[test]
    fn a_snapshot_sync_pushes_neither_what_it_heard_of_nor_what_the_manager_had() {
        let dir = tempfile::tempdir().unwrap();
        let (hash, tree, _me, _) = engine_with(dir.path(), b"x");
        let entry = |path: &str, rev: u64| Entry {
            path: RelPath::new(path.to_string()).unwrap(),
            rev: Revision(rev),
            version: Some(Version { content: Content::File { hash: hash.clone(), size: 1 }, mode: 0o644, uid: 0, gid: 0, mtime_ns: 1 }),
            holders: vec![],
            from_lost: None,
        };
        tree.apply_remote(&entry("had.txt", 2)).unwrap();
        let info = n2_info();
        let (mut engine, first) = Engine::<()>::connected(tree.clone(), info, 0, Duration::ZERO);
        let sent = |actions: &[Action<()>]| -> (Option<(MessageId, bool)>, Vec<String>) {
            let mut sync = None;
            let mut pushed = Vec::new();
            for a in actions {
                if let Action::Publish { env, .. } = a {
                    match &env.body {
                        ToManager::Sync { request, snapshot, .. } => sync = Some((request.clone(), *snapshot)),
                        ToManager::Change(c) => pushed.push(c.path.to_string()),
                        ToManager::Changes { items } => pushed.extend(items.iter().map(|i| i.change.path.to_string())),
                        _ => {}
                    }
                }
            }
            (sync, pushed)
        };
        let (Some((request, true)), _) = sent(&first) else { panic!("a sync that takes a snapshot is sent at connection") };
        let to_node = |body| Envelope::new(tree.env().new_id(), NodeId::manager(), body);
        let page = |request: &MessageId, n: u32, more: bool| {
            to_node(ToNode::SyncReply { request: request.clone(), head: Revision(3), entries: vec![], page: n, more })
        };
        engine.on_message(page(&request, 0, true), Duration::ZERO).unwrap();
        engine.on_message(to_node(ToNode::Applied { entry: entry("heard.txt", 5), origin: "n1".parse().unwrap() }), Duration::ZERO).unwrap();
        let (_, pushed) = sent(&engine.on_message(page(&request, 1, false), Duration::ZERO).unwrap());
        assert_eq!(pushed, Vec::<String>::new(), "neither the path heard of meanwhile nor the one the manager had");
        let (Some((again, false)), _) = sent(&engine.on_retry_tick(MIN_SYNC_INTERVAL)) else { panic!("a sync in the catch-up form follows") };
        let catch_up = to_node(ToNode::SyncReply { request: again, head: Revision(5), entries: vec![entry("heard.txt", 5)], page: 0, more: false });
        let (_, pushed) = sent(&engine.on_message(catch_up, MIN_SYNC_INTERVAL).unwrap());
        assert_eq!(pushed, ["had.txt"], "what the catch-up reply does not name is pushed");
        assert_eq!(sent(&engine.on_retry_tick(MIN_SYNC_INTERVAL * 3)).0, None, "and no sync after that one");
    }

    /// The manager asks a node to sync when the node's queue dropped messages past its
    /// length limit. The decisions of its changes may have been among them: the sync
    /// sends again what is undecided first (each alone, as in a new session), and a sync
    /// the node starts for itself does not.
    #[test]
    fn a_sync_the_manager_asks_for_sends_again_what_is_undecided() {
        let dir = tempfile::tempdir().unwrap();
        let (_, tree, me, _) = engine_with(dir.path(), b"x");
        let info = NodeInfo { id: me, url: "http://127.0.0.1:1".into(), allow_setid: false, software: "test".into() };
        let (mut engine, first) = Engine::<()>::connected(tree.clone(), info, 0, Duration::ZERO);
        let to_node = |body| Envelope::new(tree.env().new_id(), NodeId::manager(), body);
        let reply = |actions: &[Action<()>]| {
            let request = actions.iter().find_map(|a| match a {
                Action::Publish { env: Envelope { body: ToManager::Sync { request, .. }, .. }, .. } => Some(request.clone()),
                _ => None,
            });
            to_node(ToNode::SyncReply { request: request.expect("a sync sent"), head: Revision(0), entries: vec![], page: 0, more: false })
        };
        engine.on_message(reply(&first), Duration::ZERO).unwrap();
        let changes = |actions: &[Action<()>]| -> Vec<String> {
            let mut out = Vec::new();
            for a in actions {
                if let Action::Publish { env, .. } = a {
                    match &env.body {
                        ToManager::Change(c) => out.push(c.path.to_string()),
                        ToManager::Changes { items } => out.extend(items.iter().map(|i| format!("{} (batched)", i.change.path))),
                        ToManager::Sync { .. } => out.push("sync".into()),
                        _ => {}
                    }
                }
            }
            out
        };
        for name in ["a", "b"] {
            tree.mkdir(crate::tree::ROOT, std::ffi::OsStr::new(name), 0o755, 0, 0).unwrap();
        }
        assert_eq!(changes(&engine.on_outbox_ready(Duration::ZERO)), ["a (batched)", "b (batched)"], "sent, and no decision comes");
        let later = MIN_SYNC_INTERVAL * 2;
        let own = engine.on_sync_requested(None, later);
        assert_eq!(changes(&own), ["sync"], "a sync of its own sends nothing again");
        engine.on_message(reply(&own), later).unwrap();
        let asked = engine.on_message(to_node(ToNode::SyncRequested {}), later * 2).unwrap();
        assert_eq!(changes(&asked), ["a", "b", "sync"], "the sync asked for sends them again first");
    }

    /// A node the operator forgot hears so in answer to its sync: every sync waited for
    /// ends with the reason, and none starts again by itself (each would be refused).
    #[test]
    fn a_forgotten_node_ends_its_syncs_with_the_reason_and_starts_none() {
        let dir = tempfile::tempdir().unwrap();
        let (_, tree, _, _) = engine_with(dir.path(), b"x");
        let (mut engine, first) = Engine::<u32>::connected(tree.clone(), n2_info(), 0, Duration::ZERO);
        let syncs_sent = |actions: &[Action<u32>]| {
            actions.iter().filter(|a| matches!(a, Action::Publish { env: Envelope { body: ToManager::Sync { .. }, .. }, .. })).count()
        };
        assert_eq!(syncs_sent(&first), 1, "a new session syncs");
        let request = first
            .iter()
            .find_map(|a| match a {
                Action::Publish { env: Envelope { body: ToManager::Sync { request, .. }, .. }, .. } => Some(request.clone()),
                _ => None,
            })
            .unwrap();
        let asked = engine.on_sync_requested(Some(7), Duration::ZERO);
        assert_eq!(syncs_sent(&asked), 0, "one sync at a time: the user's waits for the next");
        let forgotten =
            |request: &MessageId| Envelope::new(tree.env().new_id(), NodeId::manager(), ToNode::Forgotten { request: request.clone(), at_ms: 1_000 });
        let stale = engine.on_message(forgotten(&tree.env().new_id()), Duration::ZERO).unwrap();
        assert!(stale.is_empty(), "a refusal of another sync says nothing of this one: {}", stale.len());
        let told = engine.on_message(forgotten(&request), Duration::ZERO).unwrap();
        let ended: Vec<(Vec<u32>, String)> = told
            .iter()
            .filter_map(|a| match a {
                Action::SyncDone { responders, result: Err(reason) } => Some((responders.clone(), reason.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert_eq!(ended[0].0, vec![7], "the user's sync ends");
        assert!(ended[0].1.contains("forgot this node at 1970-01-01T00:00:01Z"), "{}", ended[0].1);
        assert!(told.iter().any(|a| matches!(a, Action::Refused(r) if *r == ended[0].1)), "said until a sync completes");
        assert!(forgotten_reason(i64::MAX).contains("9999-12-31T23:59:59Z"), "any time from the manager is written");
        let later = engine.on_retry_tick(SYNC_GIVE_UP * 3);
        assert_eq!(syncs_sent(&later), 0, "no sync given up, none started again");
    }

    /// Keeps go before the decisions and broadcasts around them, never past a release.
    #[test]
    fn keeps_go_first_but_never_past_a_release() {
        let h = |b: u8| ContentHash::from_bytes([b; 32]);
        let keep = |b: u8| ToNode::Keep { items: vec![wire::KeepItem { hash: h(b), size: 1, until_ms: 1, holders: vec![] }] };
        let entry = |p: &str| Entry { path: RelPath::new(p.to_string()).unwrap(), rev: Revision(1), version: None, holders: vec![], from_lost: None };
        let applied = |p: &str| ToNode::Applied { entry: entry(p), origin: "n1".parse().unwrap() };
        let parts = vec![applied("a"), keep(1), applied("b"), ToNode::Release { hashes: vec![h(1)] }, applied("c"), keep(1), keep(2)];
        let shape: Vec<String> = runs(parts)
            .into_iter()
            .map(|r| match r {
                Run::Keep(items) => format!("keep{:?}", items.iter().map(|i| i.hash.as_bytes()[0]).collect::<Vec<_>>()),
                Run::Changes(c) => format!("changes{:?}", c.iter().map(|i| i.entry().path.to_string()).collect::<Vec<_>>()),
                Run::One(ToNode::Release { .. }) => "release".into(),
                Run::One(_) => "other".into(),
            })
            .collect();
        assert_eq!(shape, ["keep[1]", "changes[\"a\", \"b\"]", "release", "keep[1, 2]", "changes[\"c\"]"]);
    }

    /// A burst of deletes comes back from the manager as one batch holding, for each
    /// file, a keep of its content (kept versions), the broadcast and the decision. The
    /// node takes it in two transactions (the keeps, then the rest in order), not three
    /// per file, and ends where taking the parts one by one would: every file gone,
    /// nothing queued, every content kept.
    #[test]
    fn a_batch_of_decided_deletes_costs_two_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let (_, tree, me, mut engine) = engine_with(dir.path(), b"x");
        const FILES: usize = 20;
        let root = crate::tree::ROOT;
        let name = |i: usize| format!("f{i:02}");
        let mut hashes = Vec::new();
        for i in 0..FILES {
            let bytes = format!("content {i}").into_bytes();
            let (_, fh) = tree.create(root, std::ffi::OsStr::new(&name(i)), 0o644, 0, 0, crate::tree::CreateOpen::NEW).unwrap();
            tree.write(fh, 0, &bytes).unwrap();
            tree.flush(fh).unwrap();
            tree.release(fh).unwrap();
            hashes.push((crate::store::hash_of(&bytes), bytes.len() as u64));
        }
        let entry = |i: usize, rev: u64, version: Option<Version>| Entry {
            path: RelPath::new(name(i)).unwrap(),
            rev: Revision(rev),
            version,
            holders: vec![],
            from_lost: None,
        };
        let to_me = |msg: ToNode| BatchItem { to: Some(me.clone()), msg };
        let batch = |items: Vec<BatchItem>| Envelope::new(tree.env().new_id(), NodeId::manager(), ToNode::Batch { items });
        // The creates, decided.
        let creates = tree.take_unpublished();
        assert_eq!(creates.len(), FILES);
        let decided: Vec<BatchItem> = creates
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let (hash, size) = hashes[i].clone();
                let version = Version { content: Content::File { hash, size }, mode: 0o644, uid: 0, gid: 0, mtime_ns: 1 };
                to_me(ToNode::Decided { change: row.msg.clone(), outcome: Outcome::Accepted, current: entry(i, 1 + i as u64, Some(version)), first_rev: None })
            })
            .collect();
        engine.on_message(batch(decided), Duration::ZERO).unwrap();
        assert_eq!(tree.pending_changes(), 0);
        // The deletes, as the manager answers them.
        for i in 0..FILES {
            tree.unlink(root, std::ffi::OsStr::new(&name(i))).unwrap();
        }
        let deletes = tree.take_unpublished();
        assert_eq!(deletes.len(), FILES);
        let mut items = Vec::new();
        for (i, row) in deletes.iter().enumerate() {
            let (hash, size) = hashes[i].clone();
            let rev = 100 + i as u64;
            items.push(to_me(ToNode::Keep { items: vec![wire::KeepItem { hash, size, until_ms: i64::MAX, holders: vec![] }] }));
            items.push(BatchItem { to: None, msg: ToNode::Applied { entry: entry(i, rev, None), origin: me.clone() } });
            items.push(to_me(ToNode::Decided { change: row.msg.clone(), outcome: Outcome::Accepted, current: entry(i, rev, None), first_rev: None }));
        }
        let before = tree.gauges().db_commits;
        engine.on_message(batch(items), Duration::ZERO).unwrap();
        assert_eq!(tree.gauges().db_commits - before, 2, "one transaction for the keeps, one for the broadcasts and decisions");
        assert_eq!(tree.pending_changes(), 0, "every delete decided");
        for i in 0..FILES {
            assert!(tree.lookup(root, std::ffi::OsStr::new(&name(i))).is_err(), "{} is gone", name(i));
            assert_eq!(tree.revision_of(&RelPath::new(name(i)).unwrap()), Revision(100 + i as u64));
        }
        assert_eq!(tree.gauges().kept_contents, FILES as u64, "every deleted content is kept");
    }

    /// Local changes made while the engine was busy go out several to a message, in the
    /// order they were made, each under its own id; the session's first publish sends
    /// each change alone (what an earlier session left undecided).
    #[test]
    fn changes_go_several_to_a_message_after_the_sessions_first_publish() {
        let dir = tempfile::tempdir().unwrap();
        let (_, tree, _, _) = engine_with(dir.path(), b"x");
        let names: Vec<String> = (0..5).map(|i| format!("d{i}")).collect();
        let mkdir = |n: &str| {
            tree.mkdir(crate::tree::ROOT, std::ffi::OsStr::new(n), 0o755, 0, 0).unwrap();
        };
        let changes = |actions: Vec<Action<()>>| -> Vec<Vec<(MessageId, String)>> {
            actions
                .into_iter()
                .filter_map(|a| match a {
                    Action::Publish { env, confirmed: true } => match env.body {
                        ToManager::Change(c) => Some(vec![(env.id, c.path.to_string())]),
                        ToManager::Changes { items } => Some(items.into_iter().map(|i| (i.id, i.change.path.to_string())).collect()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        };
        // Two changes left from before the session: sent one by one when it starts.
        mkdir(&names[0]);
        mkdir(&names[1]);
        let info = n2_info();
        let (mut engine, first) = Engine::<()>::connected(tree.clone(), info, 0, Duration::ZERO);
        let first = changes(first);
        assert_eq!(first.iter().map(|m| m.len()).collect::<Vec<_>>(), vec![1, 1], "the session's first publish: one change per message");
        // Three made since: one message, in order, each with the id of its outbox row.
        for n in &names[2..] {
            mkdir(n);
        }
        // (Past the wait for the first publish's decisions, which never come here.)
        let mut now = Duration::ZERO;
        let mut after_the_wait = || {
            now += GATHER_WAIT;
            now
        };
        let later = changes(engine.on_outbox_ready(after_the_wait()));
        assert_eq!(later.len(), 1, "{later:?}");
        assert_eq!(later[0].iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>(), ["d2", "d3", "d4"]);
        let ids: std::collections::HashSet<&MessageId> = first.iter().chain(&later).flatten().map(|(id, _)| id).collect();
        assert_eq!(ids.len(), 5, "every change keeps an id of its own");
        // A lone change still goes as it always did.
        mkdir("alone");
        let alone = engine.on_outbox_ready(after_the_wait());
        assert!(alone.iter().any(|a| matches!(a, Action::Publish { env, .. } if matches!(env.body, ToManager::Change(_)))));
        // Many changes are cut into messages within the limits.
        for i in 0..(MAX_CHANGES_PER_MESSAGE + 10) {
            mkdir(&format!("many-{i:05}-{}", "x".repeat(200)));
        }
        let many = engine.on_outbox_ready(after_the_wait());
        let sizes: Vec<usize> = many
            .iter()
            .filter_map(|a| match a {
                Action::Publish { env, .. } if matches!(env.body, ToManager::Changes { .. }) => {
                    assert!(env.encode().len() <= MAX_TO_MANAGER_BYTES);
                    Some(match &env.body {
                        ToManager::Changes { items } => items.len(),
                        _ => 0,
                    })
                }
                _ => None,
            })
            .collect();
        assert!(sizes.len() > 1, "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), MAX_CHANGES_PER_MESSAGE + 10);
    }

    /// While the last change sent waits for its decision, new changes wait too and then
    /// go together: when that decision comes, or when `GATHER_WAIT` is up (a decision
    /// that never comes holds nothing back for longer; nor does a burst). A change made
    /// while nothing is awaited goes at once.
    #[test]
    fn changes_made_while_one_awaits_its_decision_go_together_when_it_comes() {
        let dir = tempfile::tempdir().unwrap();
        let (_, tree, _, mut engine) = engine_with(dir.path(), b"x");
        let ms = Duration::from_millis;
        let mkdir = |n: &str| {
            tree.mkdir(crate::tree::ROOT, std::ffi::OsStr::new(n), 0o755, 0, 0).unwrap();
        };
        let sent = |actions: &[Action<()>]| -> Vec<Vec<(MessageId, String)>> {
            actions
                .iter()
                .filter_map(|a| match a {
                    Action::Publish { env, confirmed: true } => match &env.body {
                        ToManager::Change(c) => Some(vec![(env.id.clone(), c.path.to_string())]),
                        ToManager::Changes { items } => Some(items.iter().map(|i| (i.id.clone(), i.change.path.to_string())).collect()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        };
        let paths = |m: &[(MessageId, String)]| m.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>();
        mkdir("a");
        let first = sent(&engine.on_outbox_ready(ms(100)));
        assert_eq!(first.iter().map(|m| paths(m)).collect::<Vec<_>>(), [["a"]], "nothing awaited: at once");
        assert_eq!(engine.publish_due(), None);
        mkdir("b");
        mkdir("c");
        assert!(sent(&engine.on_outbox_ready(ms(110))).is_empty(), "a awaits its decision: b and c wait");
        assert_eq!(engine.publish_due(), Some(ms(100) + GATHER_WAIT));
        // The decision on a comes: b and c go, in one message.
        let decided = |id: &MessageId, path: &str, rev: u64| {
            let current = Entry {
                path: RelPath::new(path.to_string()).unwrap(),
                rev: Revision(rev),
                version: Some(Version { content: Content::Dir, mode: 0o755, uid: 0, gid: 0, mtime_ns: 1 }),
                holders: vec![],
                from_lost: None,
            };
            Envelope::new(
                tree.env().new_id(),
                "manager".parse().unwrap(),
                ToNode::Decided { change: id.clone(), outcome: Outcome::Accepted, current, first_rev: None },
            )
        };
        let together = sent(&engine.on_message(decided(&first[0][0].0, "a", 1), ms(120)).unwrap());
        assert_eq!(together.iter().map(|m| paths(m)).collect::<Vec<_>>(), [["b", "c"]]);
        assert_eq!(engine.publish_due(), None);
        // c's decision does not come: d waits until the wait is up, then goes.
        mkdir("d");
        assert!(sent(&engine.on_outbox_ready(ms(130))).is_empty());
        assert!(sent(&engine.on_outbox_ready(ms(120) + GATHER_WAIT - ms(1))).is_empty());
        let late = sent(&engine.on_outbox_ready(ms(120) + GATHER_WAIT));
        assert_eq!(late.iter().map(|m| paths(m)).collect::<Vec<_>>(), [["d"]]);
        // A decision on an earlier change than the last one sent releases nothing.
        mkdir("e");
        let t = ms(120) + GATHER_WAIT;
        assert!(sent(&engine.on_outbox_ready(t)).is_empty());
        assert!(sent(&engine.on_message(decided(&together[0][1].0, "c", 3), t + ms(1)).unwrap()).is_empty());
        let d_id = late[0][0].0.clone();
        let e = sent(&engine.on_message(decided(&d_id, "d", 4), t + ms(2)).unwrap());
        assert_eq!(e.iter().map(|m| paths(m)).collect::<Vec<_>>(), [["e"]]);
        // A burst gathered while e awaited: its decision releases nothing, the burst
        // goes as one message when the wait is up.
        let burst: Vec<String> = (0..BURST_CHANGES).map(|i| format!("burst-{i}")).collect();
        for n in &burst {
            mkdir(n);
        }
        assert!(sent(&engine.on_outbox_ready(t + ms(3))).is_empty());
        assert!(sent(&engine.on_message(decided(&e[0][0].0, "e", 5), t + ms(4)).unwrap()).is_empty(), "a burst keeps gathering");
        assert_eq!(engine.publish_due(), Some(t + ms(2) + GATHER_WAIT));
        assert!(sent(&engine.on_outbox_ready(t + ms(2) + GATHER_WAIT - ms(1))).is_empty());
        let went = sent(&engine.on_outbox_ready(t + ms(2) + GATHER_WAIT));
        assert_eq!(went.iter().map(|m| paths(m)).collect::<Vec<_>>(), [burst]);
    }

    /// A `Keep` is answered with what the node keeps and lacks; a content it lacks that
    /// comes with holders is one the driver fetches first; many hashes go in several
    /// reports under the limit.
    #[test]
    fn keep_requests_are_reported_and_what_to_fetch_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (have, tree, me, mut engine) = engine_with(dir.path(), b"kept");
        let missing: Vec<ContentHash> = (0..MAX_KEPT_REPORT as u32 + 10).map(|i| crate::store::hash_of(&i.to_le_bytes())).collect();
        let holder = Holder { node: "n1".parse().unwrap(), url: "http://127.0.0.1:2".into() };
        let mut items = vec![wire::KeepItem { hash: have.clone(), size: 4, until_ms: i64::MAX, holders: vec![] }];
        items.push(wire::KeepItem { hash: missing[0].clone(), size: 9, until_ms: i64::MAX, holders: vec![holder.clone()] });
        items.extend(missing[1..].iter().map(|h| wire::KeepItem { hash: h.clone(), size: 1, until_ms: i64::MAX, holders: vec![] }));
        let body = ToNode::Keep { items };
        let wanted = wanted_contents(&tree, &me, &body);
        assert_eq!(
            wanted,
            vec![Wanted { hash: missing[0].clone(), size: 9, holders: vec![holder.clone()], basis: None }],
            "only what comes with holders is fetched"
        );
        // A content to keep that would take the disk below the free-space floor is not
        // fetched: the room is the user's.
        tree.set_keep_floor(1);
        assert_eq!(wanted_contents(&tree, &me, &body).len(), 1, "9 bytes fit above a floor of 1 byte");
        let huge = ToNode::Keep { items: vec![wire::KeepItem { hash: missing[0].clone(), size: 1 << 62, until_ms: i64::MAX, holders: vec![holder.clone()] }] };
        assert_eq!(wanted_contents(&tree, &me, &huge), vec![], "no disk has room for 4 EiB above the floor");
        tree.set_keep_floor(u64::MAX / 2);
        assert_eq!(wanted_contents(&tree, &me, &body), vec![], "below the floor, nothing is fetched to keep");
        tree.set_keep_floor(0);
        let actions = engine.on_message(Envelope::new("k1".parse().unwrap(), NodeId::manager(), body), Duration::ZERO).unwrap();
        let (mut keeping, mut lacking, mut reports) = (Vec::new(), Vec::new(), 0);
        for a in actions {
            if let Action::Publish { env, confirmed: false } = a {
                if let ToManager::Kept { keeping: k, lacking: l } = env.body.clone() {
                    assert!(env.encode().len() <= MAX_TO_MANAGER_BYTES);
                    keeping.extend(k);
                    lacking.extend(l);
                    reports += 1;
                }
            }
        }
        assert_eq!((keeping, lacking, reports), (vec![have.clone()], missing, 2));
        assert_eq!(tree.kept_usage(), (1, 4));
        engine.on_message(Envelope::new("r1".parse().unwrap(), NodeId::manager(), ToNode::Release { hashes: vec![have] }), Duration::ZERO).unwrap();
        assert_eq!(tree.kept_usage(), (0, 0));
    }
}
