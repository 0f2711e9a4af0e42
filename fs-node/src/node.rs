//! Wiring of one node: configuration, start-up (stale mount cleanup, database, store,
//! FUSE mount, peer HTTP server, broker link) and an orderly shutdown that unmounts
//! first. Each task owns its state and is reached through a handle (the tree, the
//! link's [`LinkHandle`](crate::link::LinkHandle), the metrics); nothing here is shared
//! beyond what each task is given.

use crate::db::Db;
use crate::engine::NodeInfo;
use crate::fs::SyncFs;
use crate::link::LinkTask;
use crate::metrics::Metrics;
use crate::status::Reporter;
use crate::store::ContentStore;
use crate::tree::Tree;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use wire::NodeId;

/// How often unreferenced blobs are removed from the store.
/// How often the store's GC runs by default.
pub const GC_EVERY: Duration = Duration::from_secs(60);
/// How long a large file is left alone before it may share a similar file's bytes on
/// disk: long enough that a file in use (passed through to its blob) is not made a
/// patch between two uses.
pub const DEDUP_IDLE: Duration = Duration::from_secs(600);

#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    pub mount: PathBuf,
    pub data: PathBuf,
    pub broker: String,
    pub listen: SocketAddr,
    /// URL other nodes use to reach this node's HTTP server (default: from `listen`).
    pub advertise: Option<String>,
    /// Required on every peer HTTP request when set.
    pub cluster_token: Option<String>,
    /// Serve the peer HTTP server over TLS with this certificate chain and key (PEM).
    pub tls: Option<TlsFiles>,
    /// Extra CA certificates (PEM) trusted when pulling from peers over https.
    pub tls_ca: Option<PathBuf>,
    /// Let the kernel read committed files straight from the store (FUSE passthrough)
    /// where the kernel supports it.
    pub passthrough: bool,
    /// A holder that makes no progress for this long is dropped from a pull.
    pub pull_stall: Duration,
    /// Apply set-user-id and set-group-id bits that come from other nodes (off: they are
    /// cleared, and the mount is `nosuid` either way).
    pub allow_setid: bool,
    /// The node's own ignore rules (gitignore lines), after the tree's `.syncignore` files.
    pub ignore: Vec<String>,
    /// Below this many free bytes on the data directory's disk, the GC drops kept old
    /// versions' contents, oldest first (the manager asks another node to keep them).
    pub keep_min_free: u64,
    /// How often the store's GC runs (and drops kept contents below the floor).
    pub gc_every: Duration,
    /// A large file left alone this long may be kept as a patch over a similar file's
    /// content (`Tree::keep_at_rest`).
    pub dedup_idle: Duration,
    /// Paths without a pin rule get metadata only; contents come when first read.
    pub on_demand: bool,
    /// Bytes the contents of on-demand files may take here before the least recently
    /// used are dropped (`None`: no limit).
    pub cache_size: Option<u64>,
    /// Threads reading the kernel's requests (`None`: [`default_fuse_threads`]).
    pub fuse_threads: Option<usize>,
    /// How long a deleted path's revision is kept at least (`tree/forget.rs`).
    pub forget_deletes_after: Duration,
}

/// The threads that answer the mount's requests unless told otherwise: one where the
/// kernel may read committed files by passthrough (asked for, and this process is root,
/// which registering a backing file needs). A program's file operations come one at a
/// time, and each one had to wake a sleeping thread; with one thread that goes back to
/// reading the next request at once, a cluster made 30 % more creates and deletes per
/// second and node A spent a fifth less CPU on each (`bench/scripts/ab-ticks.sh`,
/// docs/benchmarks.md, session 32; four were slower than two before, session 30). What
/// takes long or waits (a fetch, a large file's close, an fsync, a write waiting for
/// freed space) is answered from the blocking pool. Without passthrough every read's
/// bytes go through these threads: two, so that a read does not hold up the rest.
pub fn default_fuse_threads(passthrough: bool) -> usize {
    // SAFETY: geteuid has no preconditions.
    if passthrough && unsafe { libc::geteuid() } == 0 {
        1
    } else {
        2
    }
}

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Unmounts the node's own mount at `dir` (at shutdown, and a dead one a killed run left).
fn unmount(dir: &Path) {
    use nix::mount::{umount2, MntFlags};
    if umount2(dir, MntFlags::empty()).is_err() {
        let _ = umount2(dir, MntFlags::MNT_DETACH);
    }
}

/// The FUSE source name of node `id`'s mount (`syncfs:<id>` in /proc/mounts).
fn fs_name(id: &NodeId) -> String {
    format!("syncfs:{id}")
}

/// Readahead of the mount, in KiB, for reads that come through this process (a file
/// streaming on demand; committed files are read by passthrough).
const READAHEAD_KB: u32 = 1024;

/// Raises the kernel's readahead for the mount at `mount` to [`READAHEAD_KB`]: a FUSE
/// mount starts at 128 KiB, so a sequential read of a streaming file came in 8,192
/// requests per GiB, and the requests, not the transfer, set its pace. Best effort (a
/// container may have no writable /sys).
fn raise_readahead(mount: &Path) {
    use std::os::unix::fs::MetadataExt;
    // A request answered: the kernel has the mount's answer to INIT, which would lower
    // the readahead again.
    let dev = match std::fs::metadata(mount) {
        Ok(m) => m.dev(),
        Err(e) => return tracing::debug!("readahead left as it is: {e}"),
    };
    let knob = format!("/sys/class/bdi/{}:{}/read_ahead_kb", nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    match std::fs::write(&knob, READAHEAD_KB.to_string()) {
        Ok(()) => tracing::debug!("readahead of the mount: {READAHEAD_KB} KiB ({knob})"),
        Err(e) => tracing::debug!("readahead left as it is ({knob}: {e})"),
    }
}

/// What is mounted exactly at `dir`: (file system type, source), from mountinfo.
fn mounted_at(dir: &Path) -> Option<(String, String)> {
    let want = dir.to_string_lossy().replace('\\', "\\134").replace(' ', "\\040").replace('\t', "\\011").replace('\n', "\\012");
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The last mount at a point is the one that shows.
    info.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (left.split(' ').nth(4)? == want).then(|| {
            let mut r = right.split(' ');
            (r.next().unwrap_or("").to_string(), r.next().unwrap_or("").to_string())
        })
    })
}

/// Makes `mount` ready to mount on: a dead mount of this same node (a killed run) is
/// removed; anything else mounted there is refused, never unmounted.
fn prepare_mount_point(mount: &Path, id: &NodeId) -> anyhow::Result<()> {
    if let Some((fstype, source)) = mounted_at(mount) {
        // The type is `fuse.syncfs` when mounted through fusermount3 and plain `fuse` when
        // the kernel was asked directly (as root where fusermount3 is missing, as in a
        // minimal container); the source names the node either way.
        if (fstype == "fuse.syncfs" || fstype == "fuse") && source == fs_name(id) {
            tracing::info!("removing this node's stale mount at {}", mount.display());
            unmount(mount);
        } else {
            anyhow::bail!(
                "{} already has a {fstype} mount ({source}) that is not this node's; the node does not unmount it: unmount it yourself or choose another --mount",
                mount.display()
            );
        }
    }
    std::fs::create_dir_all(mount).with_context(|| format!("creating mount point {}", mount.display()))
}

/// The data directory holds every synced file's bytes whatever its mode in the mount:
/// it is made (and kept) 0700, and what the node creates in it is 0600 (umask 077).
fn prepare_data_dir(data: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(data).with_context(|| format!("creating data directory {}", data.display()))?;
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700)).with_context(|| format!("making {} private (0700)", data.display()))?;
    // SAFETY: umask only changes this process's file creation mask.
    unsafe {
        libc::umask(0o077);
    }
    Ok(())
}

/// Lets the process hold as many descriptors as its hard limit allows: peer connections
/// must never starve the FUSE side of descriptors (the peer server's connection limit
/// stays well below this).
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref::<rusqlite::Error>(), Some(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::DiskFull)
            || matches!(c.downcast_ref::<std::io::Error>().and_then(|e| e.raw_os_error()), Some(libc::ENOSPC | libc::EDQUOT))
    })
}

/// Runs a node until SIGINT/SIGTERM.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    prepare_mount_point(&cfg.mount, &cfg.id)?;
    prepare_data_dir(&cfg.data)?;
    raise_fd_limit();
    let _ = std::fs::remove_file(cfg.data.join("node.url"));
    // The database first: its lock refuses a second node on this data directory before
    // the store's opening clears the work files of the previous run.
    let db_path = cfg.data.join("node.db");
    let db = match Db::open(&db_path) {
        // Opening folds what the redo log holds into the database: on a full disk, the
        // space set aside for the node database makes room for it.
        Err(e) if is_disk_full(&e) && ContentStore::release_reserve_of(&cfg.data) => Db::open(&db_path)?,
        opened => opened?,
    };
    let store = ContentStore::open(&cfg.data)?;
    let tree = Arc::new(Tree::load_on_demand(db, store.clone(), cfg.on_demand)?);
    tree.set_forget_deletes_after(cfg.forget_deletes_after);
    tree.set_node_ignore_rules(&cfg.ignore).map_err(|e| anyhow::anyhow!("taking the node's ignore rules: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let cancel = CancellationToken::new();
    let listener = rt.block_on(async { http_serve::bind(cfg.listen) }).with_context(|| format!("listening on {}", cfg.listen))?;
    let local = listener.local_addr()?;
    let acceptor = cfg.tls.as_ref().map(|t| tls_pem::acceptor(&t.cert, &t.key)).transpose()?;
    let acceptor_is_tls = acceptor.is_some();
    let scheme = if acceptor_is_tls { "https" } else { "http" };
    let url = cfg.advertise.clone().unwrap_or_else(|| format!("{scheme}://{local}"));
    let passthrough = Arc::new(AtomicBool::new(cfg.passthrough));
    let client = crate::puller::http_client(cfg.tls_ca.as_deref())?;
    let puller = crate::puller::Puller::new(client, store.clone(), cfg.id.clone(), cfg.cluster_token.clone(), cfg.pull_stall, acceptor_is_tls);
    let metrics = Arc::new(Metrics::default());
    let fetcher = crate::fetch::Fetcher::new(puller.clone(), metrics.clone(), rt.handle().clone());
    let fs = SyncFs::new(tree.clone(), cfg.data.clone(), passthrough.clone(), fetcher.clone(), rt.handle().clone());
    let mut fcfg = fuser::Config::default();
    fcfg.mount_options =
        // nosuid and nodev whatever the defaults: contents come from other machines.
        vec![
            fuser::MountOption::FSName(fs_name(&cfg.id)),
            fuser::MountOption::Subtype("syncfs".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoDev,
        ];
    fcfg.acl = fuser::SessionACL::All;
    fcfg.n_threads = Some(cfg.fuse_threads.unwrap_or_else(|| default_fuse_threads(cfg.passthrough)).max(1));
    let session = fuser::spawn_mount(fs, &cfg.mount, &fcfg).with_context(|| format!("mounting FUSE at {}", cfg.mount.display()))?;
    let notifier = Arc::new(OnceLock::new());
    let _ = notifier.set(session.notifier());
    raise_readahead(&cfg.mount);
    tracing::info!(node = %cfg.id, mount = %cfg.mount.display(), %url, "mounted");

    let tracker = tokio_util::task::TaskTracker::new();
    let info = NodeInfo { id: cfg.id.clone(), url: url.clone(), allow_setid: cfg.allow_setid, software: env!("CARGO_PKG_VERSION").to_string() };
    let (link, link_handle) = LinkTask::new(cfg.broker.clone(), info, tree.clone(), puller, metrics.clone(), notifier);
    fetcher.set_link(link_handle.clone());
    let reporter = Reporter {
        id: cfg.id.clone(),
        mount: cfg.mount.clone(),
        url: url.clone(),
        tree: tree.clone(),
        link: link_handle,
        metrics,
        passthrough,
        fetcher: fetcher.clone(),
    };
    let _guard = rt.enter();
    tracker.spawn(crate::peer::serve(listener, acceptor, Arc::new(reporter), cfg.cluster_token.clone(), cancel.clone()));
    tracker.spawn(link.run(cancel.clone()));
    tree.set_keep_floor(cfg.keep_min_free);
    fetcher.set_budget(cfg.cache_size.unwrap_or(0));
    tracker.spawn(gc_loop(tree.clone(), fetcher.clone(), cfg.keep_min_free, (cfg.gc_every, cfg.dedup_idle), cancel.clone()));
    tracker.spawn(expand_moves_loop(tree.clone(), cancel.clone()));
    broker_link::cancel_on_signals(cancel.clone());
    std::fs::write(cfg.data.join("node.url"), &url).context("writing node.url")?;

    rt.block_on(cancel.cancelled());
    tracing::info!("unmounting {}", cfg.mount.display());
    unmount(&cfg.mount);
    if let Err(e) = session.umount_and_join() {
        tracing::debug!("joining the FUSE session: {e}");
    }
    tracker.close();
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    });
    if let Err(e) = tree.fold_database() {
        tracing::warn!("folding the node database's redo log at the stop (the next start does): {e}");
    }
    let _ = std::fs::remove_file(cfg.data.join("node.url"));
    Ok(())
}

/// Queues what large renames left to queue (`Tree::expand_moves`): at start (a move a
/// crash cut short), then each time a rename leaves some (`Tree::moves_ready`), one pass
/// at a time on a blocking thread; a rename during a pass wakes it once more after.
async fn expand_moves_loop(tree: Arc<Tree>, cancel: CancellationToken) {
    loop {
        let t = tree.clone();
        let _ = tokio::task::spawn_blocking(move || t.expand_moves_or_warn()).await;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tree.moves_ready.notified() => {}
        }
    }
}

/// Every `period` (the first at once): what a large rename left to queue, should
/// `expand_moves_loop`'s pass have failed (`Tree::expand_moves`), the store's GC, large
/// contents that a similar one mostly holds (kept versions, files left alone for
/// `idle`) made patches over it (`Tree::keep_at_rest`),
/// and, with a cache budget, the eviction of the least recently used on-demand contents
/// (`Fetcher::evict_over_budget`).
async fn gc_loop(tree: Arc<Tree>, fetcher: Arc<crate::fetch::Fetcher>, floor: u64, (period, idle): (Duration, Duration), cancel: CancellationToken) {
    let mut every = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {
                let t = tree.clone();
                let (removed, at_rest) = tokio::task::spawn_blocking(move || {
                    t.expand_moves_or_warn();
                    (t.gc_with_floor(floor), t.keep_at_rest(idle))
                }).await.unwrap_or((0, 0));
                if removed > 0 || at_rest > 0 {
                    tracing::debug!("removed {removed} unreferenced blobs; {at_rest} contents now patches over similar contents");
                }
                fetcher.evict_over_budget(&tree).await;
            }
        }
    }
}
