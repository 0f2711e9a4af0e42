//! A deterministic simulation of a whole cluster from one seed: the real manager store
//! and rule, the real node tree and sync engine, a broker model with RabbitMQ's
//! guarantees, a virtual clock, and faults (partitions from the broker and from peers,
//! crashes and restarts of nodes and of the manager at any step). A random workload of
//! file operations on overlapping paths runs on random nodes; then every fault heals,
//! the cluster runs until it is quiet, and the invariants are checked (`check.rs`).
//!
//! Everything runs on one thread in one order drawn from the seed, so a seed replays
//! exactly: `cargo run -p sim --release -- --seed N`.

pub mod broker;
pub mod check;
pub mod describe;
pub mod manager;
pub mod node;

use broker::Broker;
use fs_node::env::PersistFault;
use manager::{CrashPoint, SimManager};
use node::{NodeOptions, SimNode, WriteHow};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wire::{ContentHash, Envelope, NodeId, RelPath, ToNode};

/// How big a run is.
#[derive(Clone, Debug)]
pub struct Config {
    pub nodes: usize,
    /// Random steps before everything heals.
    pub steps: usize,
    /// Steps allowed to reach quiet after healing.
    pub settle_steps: usize,
    /// Faults on (crashes, partitions).
    pub faults: bool,
    /// Holders that freeze: a node that stops sending what it is asked for, so every
    /// pull from it waits the stall timeout. Drawn from a random stream of their own, so
    /// the seeds kept from before they existed replay as they did (with this off).
    pub stalling_holders: bool,
    /// A past bug put back into the nodes (to show the simulator finds it).
    pub bug: Option<fs_node::env::PastBug>,
    /// Half of the nodes queue a rename of a directory with more than 0 to 2 entries
    /// below it in parts (`fs_node::tree::MOVE_IN_ONE_HOLD`), at a later tick. Drawn
    /// from a random stream of its own, like `stalling_holders`.
    pub large_moves: bool,
    /// After such a rename, now and then a directory made where the renamed one was,
    /// with a file in it (`mv d d.old && mkdir d`), from a random stream of its own; off,
    /// the seeds kept from before replay as they did.
    pub remade_dirs: bool,
    /// The manager's sync reply pages hold at most this many bytes (`None`: the wire's
    /// 4 MiB, one page for any tree of the simulation). Small pages make replies of
    /// several pages, with broadcasts, decisions, crashes and cuts between them (the
    /// node counts what it hears meanwhile as named: a snapshot reply). Draws nothing.
    pub sync_page_bytes: Option<usize>,
    /// Now and then a node queue drops its oldest messages while its node is away (cut
    /// off or crashed), as the length limit of a real node queue does
    /// (`broker::Queue::limit`). From a random stream of its own; off, the seeds kept
    /// from before replay as they did.
    pub queue_drops: bool,
    /// The manager hears of each message a node queue drops (`sync.drops`) and asks the
    /// node to sync; and now and then a connected node falls behind, its queue dropping
    /// its oldest messages for a while. From a random stream of its own; off, the seeds
    /// found with `queue_drops` alone replay as they did.
    pub connected_drops: bool,
    /// Now and then the manager's database is copied (a backup), and later its disk fails
    /// and the copy is brought back (or, now and then, nothing: it starts on an empty
    /// database), while the nodes go on: the decisions made since are lost to it and
    /// only the nodes have them. From a random stream of its own; off, the seeds kept
    /// from before replay as they did.
    pub restores: bool,
    /// At every tick the manager forgets the records of decided changes whose senders can
    /// no longer send them again (`Tx::forget_settled_decisions`, kept no time at all:
    /// `Retention::remember_decisions_ms` 0), and ends old versions two seconds after
    /// they stopped being current, forgetting their history rows a tick later
    /// (`Tx::expire_versions`). Draws nothing: a record forgotten while its change could
    /// still come again would have that change decided twice; a history row forgotten that
    /// a sync's catch-up form needs would leave a path out of it. It also forgets the
    /// tombstones of deletes older than those two seconds that every node said it applied
    /// (`Tx::forget_applied_deletes`), asking lagging nodes to sync every second: one
    /// forgotten while a node could still need it would bring the path back
    /// (`check::all`, *No deleted path brought back*).
    pub forget_decisions: bool,
    /// Nodes forget the revisions of deleted paths a completed sync covered after a wait
    /// drawn per node (none at all, 2 s or 10 s; `tree/forget.rs`), and take a state
    /// from their queue older than a forgotten delete as stale. From a random stream of
    /// its own; off, the nodes keep them for longer than any run.
    pub forget_deletes: bool,
    /// Now and then, after a file operation, the node sets a file's mtime to a past time
    /// (`touch -d`): a put of the same bytes, which a chmod of another node made on the
    /// older state is merged with (`rule::same_bytes_on_a_stale_base`). From a random
    /// stream of its own; off, the seeds kept from before replay as they did.
    pub touches: bool,
    /// Now and then, after a file operation, the node's user deals with a conflict: one
    /// of its conflict files or directories is removed, renamed over the path it is a
    /// conflict of, or written. From a random stream of its own; off, the seeds kept from
    /// before replay as they did.
    pub resolutions: bool,
    /// Now and then, right after a node closes a file, another node chmods the same path
    /// (if it has it): a write and a chmod made at once on the same state, which the
    /// manager merges (`rule::bytes_over_changed_metadata`, and the write's later
    /// changes keep the chmod: `rule::metadata_the_node_did_not_change`). From a random
    /// stream of its own; off, the seeds kept from before replay as they did.
    pub chmods_elsewhere: bool,
    /// Now and then, right after such a chmod, a node (maybe a third one) chowns the
    /// path: the manager merges mode, uid and gid one by one (`rule::merge_fields`), and
    /// neither the chmod nor the chown may be lost. From a random stream of its own; off,
    /// the seeds kept from before replay as they did.
    pub chowns_elsewhere: bool,
}

/// A sync reply page of the simulation: a few entries (each of its entries takes 150 to
/// 450 bytes, the envelope about 250), so most runs have replies of several pages (34
/// of seeds 1..=40, against 16 with 2,048 bytes).
pub const SMALL_SYNC_PAGE_BYTES: usize = 1_200;

impl Default for Config {
    fn default() -> Self {
        Config {
            nodes: 3,
            steps: 200,
            settle_steps: 3_000,
            faults: true,
            stalling_holders: true,
            bug: None,
            large_moves: true,
            remade_dirs: true,
            sync_page_bytes: Some(SMALL_SYNC_PAGE_BYTES),
            queue_drops: true,
            connected_drops: true,
            restores: true,
            forget_decisions: true,
            forget_deletes: true,
            touches: true,
            resolutions: true,
            chmods_elsewhere: true,
            chowns_elsewhere: true,
        }
    }
}

/// What a node's later change at a path (or above it) makes of its earlier ones there:
/// they are checked no more (`World::supersede`).
#[derive(Clone, Copy)]
enum Superseded {
    /// A write, a removal, a rename: everything before.
    All,
    /// A chmod: the chmods before.
    Modes,
    /// A chown: the chowns before.
    Owners,
}

/// What a node's user made that must not be lost (see `check.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Made {
    /// A file closed with these bytes.
    Bytes(ContentHash),
    /// A chmod to these bits, made on top of this revision of the path.
    Mode(u32, u64),
    /// A chown to this owner, made on top of this revision of the path.
    Owner(u32, u64),
}

/// One thing a node's user made at a path.
#[derive(Clone, Debug)]
pub struct Closed {
    pub node: usize,
    pub path: RelPath,
    pub made: Made,
    pub step: usize,
    /// Virtual time (ms since the epoch) when it was made.
    pub at_ms: i64,
    /// The same node changed or removed this path (or an ancestor) afterwards: its own
    /// later operation replaced this version.
    pub superseded: bool,
}

/// What happened, for a failing seed's report.
pub type Trace = Vec<String>;

/// Figures of one run.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    pub steps: usize,
    pub ops: usize,
    pub conflicts: usize,
    pub crashes: usize,
    /// Pulls that waited out a frozen holder.
    pub stalled_pulls: usize,
    /// Messages node queues dropped while their node was away.
    pub dropped: usize,
    /// Times the manager's database was brought back from an older copy (or lost).
    pub restores: usize,
}

pub struct World {
    pub rng: ChaCha8Rng,
    /// The random stream of the faults added later (`Config::stalling_holders`).
    late_rng: ChaCha8Rng,
    /// The random stream of the large renames (`Config::large_moves`).
    move_rng: ChaCha8Rng,
    /// Draws of `Config::forget_deletes`: each node's wait, and syncs users ask for.
    forget_rng: ChaCha8Rng,
    /// The random stream of the directories made again (`Config::remade_dirs`).
    remake_rng: ChaCha8Rng,
    /// The random stream of the queue length limits (`Config::queue_drops`).
    drop_rng: ChaCha8Rng,
    /// The random stream of connected nodes falling behind (`Config::connected_drops`).
    lag_rng: ChaCha8Rng,
    /// The random stream of the manager's backups and restores (`Config::restores`).
    restore_rng: ChaCha8Rng,
    /// The random stream of the touches (`Config::touches`).
    touch_rng: ChaCha8Rng,
    /// The random stream of the conflicts dealt with (`Config::resolutions`).
    resolve_rng: ChaCha8Rng,
    /// The random stream of the chmods made elsewhere (`Config::chmods_elsewhere`).
    chmod_rng: ChaCha8Rng,
    /// The random stream of the chowns made elsewhere (`Config::chowns_elsewhere`).
    chown_rng: ChaCha8Rng,
    /// The node and path of the last file closed (`record_closed`), for
    /// `Config::chmods_elsewhere`.
    last_closed: Option<(usize, RelPath)>,
    /// The step of the manager database's last copy, if one was made.
    backup_step: Option<usize>,
    /// Every revision of the manager's history that a restore lost: the versions that
    /// reached the manager, for the check that no write was lost.
    pub lost_history: Vec<check::HistoryRow>,
    /// Every conflict a restore lost the record of: where a change kept as a conflict
    /// went, for the same check.
    pub lost_conflicts: Vec<check::ConflictRow>,
    pub cfg: Config,
    pub broker: Broker,
    pub manager: SimManager,
    pub nodes: Vec<SimNode>,
    clock_ns: Arc<AtomicI64>,
    pub closed: Vec<Closed>,
    pub trace: Trace,
    pub stats: RunStats,
    step: usize,
    counter: u64,
    _dir: tempfile::TempDir,
}

/// Start of the virtual clock (2026-01-01), so times look like times.
const EPOCH_NS: i64 = 1_767_225_600 * 1_000_000_000;

/// The peers as a node's pull sees them: every other node's store, when reachable.
struct PeerView<'a> {
    others: [&'a [SimNode]; 2],
}

impl node::Peers for PeerView<'_> {
    fn serve(&self, holder: &NodeId, hash: &ContentHash) -> Option<Vec<u8>> {
        self.others.iter().flat_map(|s| s.iter()).find(|n| n.id == *holder)?.serve(hash)
    }
    fn stalls(&self, holder: &NodeId) -> bool {
        self.others.iter().flat_map(|s| s.iter()).any(|n| n.id == *holder && n.stalls && !n.peer_cut && n.is_up())
    }
}

const NAMES: [&str; 4] = ["a", "b", "d", "e.txt"];

/// Writes at `path` a new, empty database already at the latest schema, copied from one
/// `make` built once per process: every seed starts a manager and several nodes, and
/// running their migrations each time was a sixth of the simulator's time. What the
/// program does with the database afterwards is unchanged.
fn fresh_database(
    path: &std::path::Path,
    template: &'static std::sync::OnceLock<Vec<u8>>,
    make: fn(&std::path::Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let bytes = match template.get() {
        Some(b) => b,
        None => {
            let dir = tempfile::tempdir()?;
            let db = dir.path().join("template.db");
            // Closed before it is read: the last close checkpoints the WAL into the file.
            make(&db)?;
            let _ = template.set(std::fs::read(&db)?);
            template.get().expect("just set")
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, bytes)?;
    Ok(())
}

pub(crate) fn fresh_manager_database(path: &std::path::Path) -> anyhow::Result<()> {
    static TEMPLATE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    fresh_database(path, &TEMPLATE, |p| ::manager::store::Store::open(p).map(drop))
}

fn fresh_node_database(path: &std::path::Path) -> anyhow::Result<()> {
    static TEMPLATE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    fresh_database(path, &TEMPLATE, |p| fs_node::db::Db::open(p).map(drop))
}

impl World {
    pub fn new(seed: u64, cfg: Config) -> anyhow::Result<World> {
        let base = if std::path::Path::new("/dev/shm").is_dir() { std::path::PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = tempfile::Builder::new().prefix("syncfs-sim-").tempdir_in(base)?;
        let clock_ns = Arc::new(AtomicI64::new(EPOCH_NS));
        fresh_manager_database(&dir.path().join("manager.db"))?;
        let manager = SimManager::start(dir.path().join("manager.db"), cfg.sync_page_bytes, cfg.restores.then(|| clock_ns.clone()), cfg.forget_decisions)?;
        let mut broker = Broker::default();
        let mut nodes = Vec::new();
        let mut move_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4d_4f56_4553);
        let mut forget_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x464f_5247_4554);
        for i in 0..cfg.nodes {
            let id: NodeId = format!("n{}", i + 1).parse().expect("valid id");
            broker.declare_node(&id);
            let node_dir = dir.path().join(format!("n{}", i + 1));
            fresh_node_database(&node_dir.join("node.db"))?;
            let move_in_one_hold = (cfg.large_moves && move_rng.random_bool(0.5)).then(|| move_rng.random_range(0..3));
            let forget_deletes_after = cfg.forget_deletes.then(|| Duration::from_secs([0, 2, 10][forget_rng.random_range(0..3)]));
            nodes.push(SimNode::start(id, node_dir, clock_ns.clone(), cfg.bug, NodeOptions { move_in_one_hold, forget_deletes_after })?);
        }
        let mut w = World {
            rng: ChaCha8Rng::seed_from_u64(seed),
            late_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5354_414c_4c53),
            move_rng,
            forget_rng,
            remake_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5245_4d41_4b45),
            drop_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x4452_4f50_5321),
            lag_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x4c41_4747_494e),
            restore_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5245_5354_4f52),
            touch_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x544f_5543_4845),
            resolve_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5245_534f_4c56),
            chmod_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x43_484d_4f44),
            chown_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x43_484f_574e),
            last_closed: None,
            backup_step: None,
            lost_history: Vec::new(),
            lost_conflicts: Vec::new(),
            cfg,
            broker,
            manager,
            nodes,
            clock_ns,
            closed: Vec::new(),
            trace: Vec::new(),
            stats: RunStats::default(),
            step: 0,
            counter: 0,
            _dir: dir,
        };
        for i in 0..w.nodes.len() {
            w.connect(i)?;
        }
        Ok(w)
    }

    fn now(&self) -> Duration {
        Duration::from_nanos((self.clock_ns.load(Ordering::Relaxed) - EPOCH_NS) as u64)
    }
    fn now_ms(&self) -> i64 {
        self.clock_ns.load(Ordering::Relaxed) / 1_000_000
    }
    fn log(&mut self, what: String) {
        let line = format!("{:>5} t={:>6}ms {what}", self.step, self.now().as_millis());
        tracing::debug!(target: "sim", "{line}");
        self.trace.push(line);
    }

    /// Runs node `i`'s method with the other nodes as its peers.
    fn with_node<T>(&mut self, i: usize, f: impl FnOnce(&mut SimNode, &mut Broker, &dyn node::Peers, Duration) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let now = self.now();
        let (before, rest) = self.nodes.split_at_mut(i);
        let (n, after) = rest.split_first_mut().expect("a node index");
        f(n, &mut self.broker, &PeerView { others: [before, after] }, now)
    }

    fn connect(&mut self, i: usize) -> anyhow::Result<()> {
        self.with_node(i, |n, b, _, now| {
            n.connect(b, now);
            Ok(())
        })?;
        if self.nodes[i].is_connected() {
            self.queue_of(i).limit = None;
        }
        Ok(())
    }

    fn queue_of(&mut self, i: usize) -> &mut broker::Queue {
        let id = self.nodes[i].id.clone();
        self.broker.nodes.get_mut(&id).expect("every node's queue is declared")
    }

    /// Node `i` went away (cut off, crashed): now and then its queue gets a small length
    /// limit until it is back, so that it drops its oldest messages meanwhile.
    fn maybe_limit_queue(&mut self, i: usize) {
        if self.cfg.queue_drops && self.drop_rng.random_bool(0.5) {
            let limit = self.drop_rng.random_range(1..=6);
            self.log(format!("n{}'s queue keeps at most {limit} messages while n{} is away", i + 1, i + 1));
            self.queue_of(i).limit = Some(limit);
        }
    }

    /// Now and then a connected node falls behind: its queue gets a small length limit
    /// for a while (until it catches up, is cut off, or everything heals).
    fn maybe_fall_behind(&mut self) {
        if !self.cfg.queue_drops || !self.cfg.connected_drops || !self.cfg.faults {
            return;
        }
        let i = self.lag_rng.random_range(0..self.nodes.len());
        if !self.nodes[i].is_connected() {
            return;
        }
        let limited = self.queue_of(i).limit.is_some();
        if !limited && self.lag_rng.random_range(0..150) == 0 {
            let limit = self.lag_rng.random_range(1..=4);
            self.log(format!("n{} falls behind: its queue keeps at most {limit} messages ready", i + 1));
            self.queue_of(i).limit = Some(limit);
        } else if limited && self.lag_rng.random_range(0..20) == 0 {
            self.log(format!("n{} catches up: its queue has no limit", i + 1));
            self.queue_of(i).limit = None;
        }
    }

    /// Now and then a copy of the manager's database is made; later, now and then, the
    /// manager's disk fails and the copy comes back (one time in four, no copy: an
    /// empty database), while the nodes go on.
    fn maybe_restore_the_manager(&mut self) -> anyhow::Result<()> {
        if !self.cfg.restores || !self.cfg.faults {
            return Ok(());
        }
        if self.manager.is_up() && self.restore_rng.random_range(0..40) == 0 {
            self.manager.back_up()?;
            self.backup_step = Some(self.step);
            self.log("the manager's database is copied (a backup)".into());
        } else if let Some(at) = self.backup_step.filter(|_| self.restore_rng.random_range(0..150) == 0) {
            let empty = self.restore_rng.random_range(0..4) == 0;
            let (history, conflicts) = self.manager.history()?;
            self.lost_history.extend(history);
            self.lost_conflicts.extend(conflicts);
            self.stats.restores += 1;
            if empty {
                self.log("the manager's disk fails: it starts again on an empty database".into());
            } else {
                self.log(format!("the manager's disk fails: its database is brought back from the copy of step {at}"));
            }
            self.manager.restore(&mut self.broker, !empty)?;
        }
        Ok(())
    }

    /// Logs what the node queues' length limits dropped.
    fn log_dropped(&mut self) {
        for i in 0..self.nodes.len() {
            for dropped in self.queue_of(i).take_dropped() {
                self.stats.dropped += 1;
                if self.cfg.connected_drops {
                    let id = self.nodes[i].id.clone();
                    self.broker.drops.push((id, dropped.seq));
                }
                let what = match Envelope::<ToNode>::decode(&dropped.body) {
                    Ok(env) => describe::to_node(&env.body, false),
                    Err(e) => format!("an undecodable message ({e})"),
                };
                self.log(format!("n{}'s queue drops its oldest message: {what}", i + 1));
            }
        }
    }

    /// The whole run: random steps with faults, then heal and settle, then the checks.
    pub fn run(&mut self) -> anyhow::Result<()> {
        for _ in 0..self.cfg.steps {
            self.step += 1;
            self.random_step()?;
            self.maybe_fall_behind();
            self.log_dropped();
        }
        self.heal_all()?;
        self.log_dropped();
        self.settle()?;
        // A final sync everywhere, as after a reconnection, then quiet again.
        for i in 0..self.nodes.len() {
            self.with_node(i, |n, b, _, now| {
                n.request_sync(b, now);
                Ok(())
            })?;
        }
        self.settle()?;
        self.stats.steps = self.step;
        self.stats.stalled_pulls = self.nodes.iter().map(|n| n.stalled_pulls.get()).sum();
        check::all(self)
    }

    fn random_step(&mut self) -> anyhow::Result<()> {
        let roll = self.rng.random_range(0..100);
        let faults = self.cfg.faults;
        match roll {
            0..=34 => self.local_op(),
            35..=54 => {
                let batch = self.rng.random_range(1..=8);
                let crash = if faults && self.rng.random_range(0..40) == 0 {
                    Some([CrashPoint::BeforeCommit, CrashPoint::AfterCommit, CrashPoint::AfterPublish][self.rng.random_range(0..3)])
                } else {
                    None
                };
                if let Some(c) = crash {
                    if !self.broker.update.is_empty() && self.manager.is_up() {
                        self.log(format!("manager crashes {c:?}"));
                        self.stats.crashes += 1;
                    }
                }
                let now_ms = self.now_ms();
                let seen = self.manager.handle_batch(&mut self.broker, batch, now_ms, crash)?;
                for line in seen {
                    self.log(line);
                }
                Ok(())
            }
            55..=79 => {
                let i = self.rng.random_range(0..self.nodes.len());
                let crash = faults && self.rng.random_range(0..60) == 0;
                self.maybe_disk_fault(i, 40);
                let delivered = self.with_node(i, |n, b, p, now| n.deliver_one(b, p, now, crash))?;
                self.nodes[i].set_persist_fault(None);
                if let Some(what) = &delivered {
                    self.log(format!("n{} takes {what}", i + 1));
                }
                let delivered = delivered.is_some();
                if delivered && crash {
                    self.stats.crashes += 1;
                    self.log(format!("n{} crashes after applying a message, before its ack", i + 1));
                    self.maybe_limit_queue(i);
                }
                Ok(())
            }
            80..=89 => self.tick(),
            90..=93 if faults => {
                let i = self.rng.random_range(0..self.nodes.len());
                if self.nodes[i].partitioned {
                    self.log(format!("n{} reconnects to the broker", i + 1));
                    self.nodes[i].partitioned = false;
                    self.connect(i)
                } else {
                    self.log(format!("n{} is cut off from the broker", i + 1));
                    self.nodes[i].partitioned = true;
                    self.nodes[i].disconnect(&mut self.broker);
                    self.maybe_limit_queue(i);
                    Ok(())
                }
            }
            94..=95 if faults => {
                let i = self.rng.random_range(0..self.nodes.len());
                self.nodes[i].peer_cut = !self.nodes[i].peer_cut;
                let what = if self.nodes[i].peer_cut { "cut off from its peers" } else { "reachable by its peers again" };
                self.log(format!("n{} is {what}", i + 1));
                Ok(())
            }
            96..=97 if faults => {
                let i = self.rng.random_range(0..self.nodes.len());
                if self.nodes[i].is_up() {
                    self.log(format!("n{} crashes", i + 1));
                    self.stats.crashes += 1;
                    self.nodes[i].crash(&mut self.broker);
                    self.maybe_limit_queue(i);
                    Ok(())
                } else {
                    self.log(format!("n{} restarts", i + 1));
                    self.nodes[i].restart()?;
                    self.connect(i)
                }
            }
            98..=99 if faults => {
                if self.manager.is_up() {
                    self.log("manager crashes between batches".into());
                    self.stats.crashes += 1;
                    self.manager.crash(&mut self.broker);
                    Ok(())
                } else {
                    self.log("manager restarts".into());
                    self.manager.restart(&mut self.broker)
                }
            }
            _ => self.tick(),
        }
    }

    /// One second of virtual time: the manager's tick, every node's heartbeat and
    /// retries, and a manager that is down comes back.
    fn tick(&mut self) -> anyhow::Result<()> {
        self.clock_ns.fetch_add(1_000_000_000, Ordering::Relaxed);
        if self.cfg.faults && self.cfg.stalling_holders && self.late_rng.random_range(0..25) == 0 {
            let i = self.late_rng.random_range(0..self.nodes.len());
            self.nodes[i].stalls = !self.nodes[i].stalls;
            let what = if self.nodes[i].stalls { "freezes as a holder: pulls from it stall" } else { "sends contents again" };
            self.log(format!("n{} {what}", i + 1));
        }
        // What the FUSE layer does right after a rename's answer happens here, later.
        if self.cfg.large_moves {
            for i in 0..self.nodes.len() {
                let Some(tree) = self.nodes[i].tree().cloned().filter(|t| t.has_pending_moves()) else { continue };
                if self.move_rng.random_bool(0.5) {
                    let r = tree.expand_moves();
                    self.log(format!("n{} queues what its large renames left to queue: {r:?}", i + 1));
                    let now = self.now();
                    self.nodes[i].outbox_ready(&mut self.broker, now);
                }
            }
        }
        // A user asks for a sync now and then: syncs complete often, and with them the
        // nodes forget deleted paths' revisions (`tree/forget.rs`).
        if self.cfg.forget_deletes && self.forget_rng.random_range(0..6) == 0 {
            let i = self.forget_rng.random_range(0..self.nodes.len());
            self.log(format!("n{} is asked to sync", i + 1));
            self.with_node(i, |n, b, _, now| {
                n.request_sync(b, now);
                Ok(())
            })?;
        }
        self.maybe_restore_the_manager()?;
        if !self.manager.is_up() && self.rng.random_bool(0.5) {
            self.log("manager restarts".into());
            self.manager.restart(&mut self.broker)?;
        }
        let now_ms = self.now_ms();
        self.manager.tick(&mut self.broker, now_ms)?;
        for i in 0..self.nodes.len() {
            self.with_node(i, |n, b, p, now| n.tick(b, p, now))?;
        }
        Ok(())
    }

    fn heal_all(&mut self) -> anyhow::Result<()> {
        self.log("everything heals".into());
        // First, so that nothing the manager publishes from here on is dropped.
        for i in 0..self.nodes.len() {
            self.queue_of(i).limit = None;
        }
        if !self.manager.is_up() {
            self.manager.restart(&mut self.broker)?;
        }
        for i in 0..self.nodes.len() {
            let held = std::mem::take(&mut self.nodes[i].held);
            for (fh, ino, path) in held {
                self.close_held(i, fh, ino, path)?;
            }
            self.nodes[i].peer_cut = false;
            self.nodes[i].stalls = false;
            self.nodes[i].partitioned = false;
            if !self.nodes[i].is_up() {
                self.nodes[i].restart()?;
            }
            self.connect(i)?;
            let now = self.now();
            self.nodes[i].outbox_ready(&mut self.broker, now);
        }
        Ok(())
    }

    /// Delivers everything and ticks until nothing is in flight and no node is busy.
    fn settle(&mut self) -> anyhow::Result<()> {
        for _ in 0..self.cfg.settle_steps {
            self.step += 1;
            let mut moved = false;
            if !self.broker.update.is_empty() {
                let now_ms = self.now_ms();
                let seen = self.manager.handle_batch(&mut self.broker, 64, now_ms, None)?;
                moved |= !seen.is_empty();
                for line in seen {
                    self.log(line);
                }
            }
            for i in 0..self.nodes.len() {
                while let Some(what) = self.with_node(i, |n, b, p, now| n.deliver_one(b, p, now, false))? {
                    self.log(format!("n{} takes {what}", i + 1));
                    moved = true;
                }
            }
            let busy = self.nodes.iter().any(|n| n.busy() || n.tree().is_some_and(|t| t.pending_changes() > 0));
            if !moved && self.broker.in_flight() == 0 && !busy {
                return Ok(());
            }
            if !moved {
                self.tick()?;
            }
        }
        let busy: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "{}: busy {}, pending {}, queue {}, connected {}",
                    n.id,
                    n.busy(),
                    n.tree().map(|t| t.pending_changes()).unwrap_or(0),
                    self.broker.nodes.get(&n.id).map_or(0, |q| q.len()),
                    n.is_connected()
                )
            })
            .collect();
        anyhow::bail!(
            "no quiescence within {} steps after healing: {} messages in flight ({} on the update queue, {} unacked, manager up {}); {}",
            self.cfg.settle_steps,
            self.broker.in_flight(),
            self.broker.update.len(),
            self.broker.update.unacked(),
            self.manager.is_up(),
            busy.join("; ")
        )
    }

    fn random_path(&mut self) -> RelPath {
        let depth = self.rng.random_range(1..=3);
        let parts: Vec<&str> = (0..depth).map(|_| NAMES[self.rng.random_range(0..NAMES.len())]).collect();
        RelPath::new(parts.join("/")).expect("valid path")
    }

    fn content(&mut self, node: usize) -> Vec<u8> {
        self.counter += 1;
        let len = self.rng.random_range(1..64);
        format!("n{} write {} ", node + 1, self.counter).into_bytes().into_iter().cycle().take(len.max(12)).collect()
    }

    /// Marks what node `i` made at or below `path` as replaced by its own later
    /// operation (`what`: of which kind).
    fn supersede(&mut self, i: usize, path: &RelPath, what: Superseded) {
        let prefix = format!("{}/", path.as_str());
        for c in self.closed.iter_mut().filter(|c| c.node == i && !c.superseded) {
            let of_that_kind = match what {
                Superseded::All => true,
                Superseded::Modes => matches!(c.made, Made::Mode(..)),
                Superseded::Owners => matches!(c.made, Made::Owner(..)),
            };
            if (c.path == *path || c.path.as_str().starts_with(&prefix)) && of_that_kind {
                c.superseded = true;
            }
        }
    }

    fn record(&mut self, i: usize, path: &RelPath, made: Made) {
        let at_ms = self.now_ms();
        self.closed.push(Closed { node: i, path: path.clone(), made, step: self.step, at_ms, superseded: false });
    }

    /// Records the version now at `path` on node `i` as closed by its user.
    fn record_closed(&mut self, i: usize, path: &RelPath) {
        let Some(tree) = self.nodes[i].tree().cloned() else { return };
        let Some((_, ino)) = node::resolve(&tree, path) else { return };
        // Another writer still open: the file is not closed yet (its last close commits it).
        if self.nodes[i].held.iter().any(|(_, held, _)| *held == ino) {
            return;
        }
        if let Ok(bytes) = node::read_file(&tree, ino) {
            self.supersede(i, path, Superseded::All);
            self.record(i, path, Made::Bytes(fs_node::store::hash_of(&bytes)));
            self.last_closed = Some((i, path.clone()));
        }
    }

    /// Closes a writer left open. Its version is checked when its file is still at the
    /// path it was opened as (renamed, its path is not known here).
    fn close_held(&mut self, i: usize, fh: u64, ino: u64, path: RelPath) -> anyhow::Result<()> {
        let Some(tree) = self.nodes[i].tree().cloned() else { return Ok(()) };
        let r = tree.release(fh);
        self.log(format!("n{} closes its held writer of {path}: {r:?}", i + 1, r = r.as_ref().map(|_| ())));
        if node::resolve(&tree, &path).is_some_and(|(_, at)| at == ino) {
            self.record_closed(i, &path);
        }
        {
            let now = self.now();
            self.nodes[i].outbox_ready(&mut self.broker, now);
            Ok(())
        }
    }

    /// A disk fault for node `i`'s next commit, now and then (with faults on).
    fn maybe_disk_fault(&mut self, i: usize, one_in: u32) {
        if self.cfg.faults && self.rng.random_range(0..one_in) == 0 {
            let fault = if self.rng.random_bool(0.5) { PersistFault::Io } else { PersistFault::NoSpace };
            self.log(format!("n{}: the next commit of its database fails ({fault:?})", i + 1));
            self.nodes[i].set_persist_fault(Some(fault));
        }
    }

    /// One random file operation on a random node that is up.
    fn local_op(&mut self) -> anyhow::Result<()> {
        let i = self.rng.random_range(0..self.nodes.len());
        let Some(tree) = self.nodes[i].tree().cloned() else { return Ok(()) };
        self.maybe_disk_fault(i, 25);
        let r = self.local_op_on(i, tree.clone());
        if self.cfg.touches && self.touch_rng.random_range(0..4) == 0 {
            self.touch(i, &tree);
        }
        if self.cfg.resolutions && self.resolve_rng.random_range(0..4) == 0 {
            self.resolve_conflict(i, &tree);
        }
        self.nodes[i].set_persist_fault(None);
        r
    }

    /// Node `j` chmods `path`, and the chmod is recorded as a change of its to be kept.
    /// (A chmod to the mode the file shows is nothing new: the chmod that gave it that
    /// mode is judged on its own base; seed 549850.)
    fn chmod_recorded(&mut self, j: usize, tree: &fs_node::tree::Tree, path: &RelPath, mode: u32) -> fs_node::tree::FsResult<()> {
        let base = tree.revision_of(path).0;
        let changed = node::chmod(tree, path, mode)?;
        if changed {
            self.supersede(j, path, Superseded::Modes);
            self.record(j, path, Made::Mode(mode, base));
        }
        Ok(())
    }

    /// Another node than `i`, which just closed `path`, chmods it (`Config::chmods_elsewhere`).
    fn chmod_elsewhere(&mut self, i: usize, path: &RelPath) {
        let others: Vec<usize> = (0..self.nodes.len()).filter(|j| *j != i && self.nodes[*j].tree().is_some()).collect();
        if others.is_empty() {
            return;
        }
        let j = others[self.chmod_rng.random_range(0..others.len())];
        let Some(tree) = self.nodes[j].tree().cloned() else { return };
        let mode = [0o644, 0o600, 0o755, 0o700][self.chmod_rng.random_range(0..4)];
        let r = self.chmod_recorded(j, &tree, path, mode);
        self.log(format!("n{} chmod {mode:o} {path}, just written on n{}: {r:?}", j + 1, i + 1));
        if self.chmod_rng.random_bool(0.7) {
            let now = self.now();
            self.nodes[j].outbox_ready(&mut self.broker, now);
        }
        if self.cfg.chowns_elsewhere && self.chown_rng.random_bool(0.4) {
            self.chown_elsewhere(path);
        }
    }

    /// A node, maybe the one that wrote `path` or chmodded it just now, chowns it
    /// (`Config::chowns_elsewhere`).
    fn chown_elsewhere(&mut self, path: &RelPath) {
        let with_tree: Vec<usize> = (0..self.nodes.len()).filter(|k| self.nodes[*k].tree().is_some()).collect();
        if with_tree.is_empty() {
            return;
        }
        let k = with_tree[self.chown_rng.random_range(0..with_tree.len())];
        let Some(tree) = self.nodes[k].tree().cloned() else { return };
        let uid = [0, 1000, 1001][self.chown_rng.random_range(0..3)];
        let base = tree.revision_of(path).0;
        let r = node::chown(&tree, path, uid);
        if matches!(r, Ok(true)) {
            self.supersede(k, path, Superseded::Owners);
            self.record(k, path, Made::Owner(uid, base));
        }
        self.log(format!("n{} chown {uid} {path}: {:?}", k + 1, r.map(|_| ())));
        if self.chown_rng.random_bool(0.7) {
            let now = self.now();
            self.nodes[k].outbox_ready(&mut self.broker, now);
        }
    }

    /// Node `i`'s user deals with one of its conflicts (`Config::resolutions`).
    fn resolve_conflict(&mut self, i: usize, tree: &fs_node::tree::Tree) {
        // (Chosen from a snapshot, which reads every file: the seeds kept replay so.)
        let conflicts: Vec<RelPath> = node::snapshot(tree)
            .map(|v| v.into_keys().filter_map(|p| RelPath::new(p).ok()).filter(::manager::rule::is_conflict_file).collect())
            .unwrap_or_default();
        if conflicts.is_empty() {
            return;
        }
        let path = conflicts[self.resolve_rng.random_range(0..conflicts.len())].clone();
        let (what, r, touched) = match self.resolve_rng.random_range(0..3) {
            0 => (format!("rm -rf {path}"), node::remove_all(tree, &path), vec![path.clone()]),
            1 => {
                let Some(to) = original_of(&path) else { return };
                (format!("mv {path} {to}"), node::rename(tree, &path, &to), vec![path.clone(), to])
            }
            _ => {
                let bytes = format!("n{} resolves at step {} ", i + 1, self.step).into_bytes();
                let r = node::write_file(tree, &path, WriteHow::Overwrite, &bytes).map(|_| ());
                if r.is_ok() {
                    self.record_closed(i, &path);
                }
                (format!("write {path}"), r, vec![])
            }
        };
        if r.is_ok() {
            for p in &touched {
                self.supersede(i, p, Superseded::All);
            }
        }
        self.log(format!("n{} deals with a conflict: {what}: {r:?}", i + 1));
        if self.resolve_rng.random_bool(0.7) {
            let now = self.now();
            self.nodes[i].outbox_ready(&mut self.broker, now);
        }
    }

    /// `touch -d` of one of node `i`'s files (`Config::touches`).
    fn touch(&mut self, i: usize, tree: &fs_node::tree::Tree) {
        let files: Vec<RelPath> = node::snapshot(tree)
            .map(|v| v.into_iter().filter(|(_, s)| s.kind == fs_node::tree::Kind::File).filter_map(|(p, _)| RelPath::new(p).ok()).collect())
            .unwrap_or_default();
        if files.is_empty() {
            return;
        }
        let path = files[self.touch_rng.random_range(0..files.len())].clone();
        let at_ns = EPOCH_NS - self.touch_rng.random_range(1..1_000i64) * 1_000_000_000;
        let r = node::touch(tree, &path, at_ns);
        self.log(format!("n{} touch -d @{} {path}: {r:?}", i + 1, at_ns / 1_000_000_000));
        if self.touch_rng.random_bool(0.7) {
            let now = self.now();
            self.nodes[i].outbox_ready(&mut self.broker, now);
        }
    }

    fn local_op_on(&mut self, i: usize, tree: Arc<fs_node::tree::Tree>) -> anyhow::Result<()> {
        self.stats.ops += 1;
        let path = self.random_path();
        let kind = self.rng.random_range(0..100);
        let (what, result, touched): (String, Result<(), fs_node::tree::FsError>, Vec<RelPath>) = match kind {
            0..=39 => {
                let how = [WriteHow::Overwrite, WriteHow::Overwrite, WriteHow::Append, WriteHow::Patch][self.rng.random_range(0..4)];
                let bytes = self.content(i);
                let r = node::write_file(&tree, &path, how, &bytes).map(|_| ());
                if r.is_ok() {
                    self.record_closed(i, &path);
                }
                (format!("write {how:?} {path} ({} bytes)", bytes.len()), r, vec![])
            }
            40..=44 => {
                let size = self.rng.random_range(0..8);
                let r = node::truncate(&tree, &path, size);
                if r.is_ok() {
                    self.record_closed(i, &path);
                }
                (format!("truncate {path} to {size}"), r, vec![])
            }
            45..=56 => (format!("mkdir {path}"), node::mkdir(&tree, &path), vec![path.clone()]),
            57..=60 => (format!("rmdir {path}"), node::rmdir(&tree, &path), vec![path.clone()]),
            61..=66 => (format!("unlink {path}"), node::unlink(&tree, &path), vec![path.clone()]),
            67..=69 => (format!("rm -rf {path}"), node::remove_all(&tree, &path), vec![path.clone()]),
            70..=78 => {
                let to = self.random_path();
                // A node that queues renames in parts renames a directory it has, often, to a
                // name in the root or in another directory it has.
                let dirs = if self.nodes[i].moves_in_parts() && self.move_rng.random_bool(0.8) { node::dirs_holding_entries(&tree) } else { Vec::new() };
                let (path, to) = if dirs.is_empty() {
                    (path, to)
                } else {
                    let name = NAMES[self.move_rng.random_range(0..NAMES.len())];
                    let into = self.move_rng.random_range(0..=dirs.len());
                    let to = dirs.get(into).and_then(|d| d.join(name).ok()).unwrap_or_else(|| RelPath::new(name).expect("a name"));
                    (dirs[self.move_rng.random_range(0..dirs.len())].clone(), to)
                };
                let r = node::rename(&tree, &path, &to);
                let mut what = format!("rename {path} -> {to}");
                if r.is_ok() && !dirs.is_empty() && self.cfg.remade_dirs && self.remake_rng.random_bool(0.5) {
                    let made = node::mkdir(&tree, &path);
                    what += &format!(", then mkdir {path}: {made:?}");
                    let name = NAMES[self.remake_rng.random_range(0..NAMES.len())];
                    if let (Ok(()), Ok(file)) = (made, path.join(name)) {
                        let bytes = self.content(i);
                        let wrote = node::write_file(&tree, &file, WriteHow::Overwrite, &bytes).map(|_| ());
                        what += &format!(", then write {file}: {wrote:?}");
                        if wrote.is_ok() {
                            self.record_closed(i, &file);
                        }
                    }
                }
                (what, r, vec![path.clone(), to])
            }
            79..=84 => {
                let mode = [0o644, 0o600, 0o755, 0o700][self.rng.random_range(0..4)];
                let r = self.chmod_recorded(i, &tree, &path, mode);
                (format!("chmod {mode:o} {path}"), r, vec![])
            }
            85..=87 => {
                let target = NAMES[self.rng.random_range(0..NAMES.len())];
                (format!("symlink {path} -> {target}"), node::symlink(&tree, &path, target), vec![path.clone()])
            }
            88..=91 => {
                // Two handles writing the same file, closed in turn.
                let (a, b) = (self.content(i), self.content(i));
                let r = (|| {
                    let (ino, fh1) = node::open_writer(&tree, &path, false)?;
                    let (_, fh2) = node::open_writer(&tree, &path, false)?;
                    node::write_with(&tree, ino, fh1, WriteHow::Overwrite, &a)?;
                    node::write_with(&tree, ino, fh2, WriteHow::Append, &b)?;
                    tree.release(fh1)?;
                    tree.release(fh2)?;
                    Ok(())
                })();
                if r.is_ok() {
                    self.record_closed(i, &path);
                }
                (format!("two writers on {path}"), r, vec![])
            }
            92..=95 => {
                // A writer left open across steps.
                let bytes = self.content(i);
                let r = node::open_writer(&tree, &path, true).and_then(|(ino, fh)| {
                    node::write_with(&tree, ino, fh, WriteHow::Overwrite, &bytes)?;
                    self.nodes[i].held.push((fh, ino, path.clone()));
                    Ok(())
                });
                (format!("open {path} for writing and keep it open"), r, vec![])
            }
            _ => {
                if self.nodes[i].held.is_empty() {
                    return Ok(());
                }
                let (fh, ino, held_path) = self.nodes[i].held.remove(0);
                return self.close_held(i, fh, ino, held_path);
            }
        };
        if result.is_ok() {
            for p in &touched {
                self.supersede(i, p, Superseded::All);
            }
        }
        self.log(format!("n{} {what}: {}", i + 1, result.as_ref().map(|_| "ok".to_string()).unwrap_or_else(|e| format!("{e}"))));
        // (Before the write goes out, most often: the chmod is then decided first.)
        if let Some((i, path)) = self.last_closed.take().filter(|_| self.cfg.chmods_elsewhere) {
            if self.chmod_rng.random_bool(0.8) {
                self.chmod_elsewhere(i, &path);
            }
        }
        if self.rng.random_bool(0.7) {
            let now = self.now();
            self.nodes[i].outbox_ready(&mut self.broker, now);
        }
        Ok(())
    }
}

/// The path a conflict file or directory is a conflict of: its name without the mark
/// and what the mark holds (`a (conflict from n1 2026-01-01 00.00.02).txt` is of `a.txt`).
fn original_of(path: &RelPath) -> Option<RelPath> {
    let (stem, rest) = path.name().split_once(::manager::rule::CONFLICT_MARK)?;
    let (_, ext) = rest.split_once(')')?;
    let name = format!("{stem}{ext}");
    match path.parent() {
        Some(parent) => parent.join(&name).ok(),
        None => RelPath::new(&name).ok(),
    }
}

/// Runs one seed: Ok with its figures, or Err with what broke and the trace.
pub fn run_seed(seed: u64, cfg: Config) -> Result<RunStats, (String, Trace)> {
    let (result, trace) = run_seed_traced(seed, cfg);
    result.map_err(|what| (what, trace))
}

/// Runs one seed; returns its outcome and its trace either way.
pub fn run_seed_traced(seed: u64, cfg: Config) -> (Result<RunStats, String>, Trace) {
    let mut world = match World::new(seed, cfg) {
        Ok(w) => w,
        Err(e) => return (Err(format!("setting up: {e:#}")), Vec::new()),
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| world.run()));
    let trace = std::mem::take(&mut world.trace);
    let result = match r {
        Ok(Ok(())) => Ok(world.stats.clone()),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(p) => {
            let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
            Err(format!("panic: {msg}"))
        }
    };
    (result, trace)
}

/// A shorter run of a failing seed that still fails, if there is one: the same seed with
/// fewer random steps before everything heals (the steps are drawn in order, so a
/// shorter run is a prefix of the longer one's workload and faults). Tries 40 lengths,
/// shortest first; returns (steps, what broke, trace) of the first that fails.
pub fn shrink(seed: u64, cfg: &Config) -> Option<(usize, String, Trace)> {
    let stride = (cfg.steps / 40).max(1);
    (1..cfg.steps).step_by(stride).find_map(|steps| run_seed(seed, Config { steps, ..cfg.clone() }).err().map(|(what, trace)| (steps, what, trace)))
}
