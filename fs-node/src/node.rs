//! Wiring of one node: configuration, the state shared by its tasks (`Shared`), start-up
//! (stale mount cleanup, database, store, HTTP, broker link, FUSE mount) and an orderly
//! shutdown that unmounts first.

use crate::db::Db;
use crate::fs::SyncFs;
use crate::link::SyncReport;
use crate::store::ContentStore;
use crate::tree::Tree;
use anyhow::Context;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use wire::NodeId;

/// How often unreferenced blobs are removed from the store.
const GC_EVERY: Duration = Duration::from_secs(60);

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
}

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The node's metrics for `/metrics`. Counters and the pull histogram are kept as they
/// happen; gauges are read from the tree and the link when scraped (`render`).
pub struct Metrics {
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub bytes_pulled: Counter,
    pub bytes_served: Counter,
    pub pulls_failed: Counter,
    /// Time to pull one content, in seconds.
    pub pull_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            bytes_pulled: Counter::default(),
            bytes_served: Counter::default(),
            pulls_failed: Counter::default(),
            pull_seconds: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0, 10.0]),
        }
    }
}

/// Content type of `Metrics::render`'s text.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Metrics {
    pub fn observe_pull(&self, d: Duration) {
        self.pull_seconds.observe(d.as_secs_f64());
    }

    /// The exposition text (OpenMetrics). Counter names get their `_total` from the
    /// encoder.
    pub fn render(&self, shared: &Shared) -> String {
        let stats = shared.tree.stats();
        let mut r = Registry::default();
        let gauge = |v: u64| ConstGauge::new(v as i64);
        r.register("syncfs_node_messages_in", "Messages received from the master channel.", self.messages_in.clone());
        r.register("syncfs_node_messages_out", "Messages published to the update channel.", self.messages_out.clone());
        r.register("syncfs_node_bytes_pulled", "Content bytes pulled from peers.", self.bytes_pulled.clone());
        r.register("syncfs_node_bytes_served", "Content bytes served to peers.", self.bytes_served.clone());
        r.register("syncfs_node_pulls_failed", "Pulls that failed on every holder.", self.pulls_failed.clone());
        r.register("syncfs_node_pending_changes", "Local changes not yet decided by the manager.", gauge(stats.pending_changes));
        r.register("syncfs_node_pending_pulls", "Content pulls in progress.", gauge(shared.pulls_in_progress.load(Ordering::Relaxed)));
        r.register("syncfs_node_conflicts", "Own changes the manager kept as conflict files.", ConstCounter::new(stats.conflicts_seen));
        r.register(
            "syncfs_node_passthrough",
            "1 while the kernel does passthrough I/O for this mount.",
            gauge(shared.passthrough.load(Ordering::Relaxed) as u64),
        );
        r.register("syncfs_node_passthrough_opens", "Opens whose I/O the kernel did on a backing file by itself.", ConstCounter::new(stats.passthrough_opens));
        r.register(
            "syncfs_node_passthrough_detaches",
            "Backing files a writer made into a file's own work file.",
            ConstCounter::new(stats.passthrough_detaches),
        );
        r.register("syncfs_node_connected", "1 when connected to the broker.", gauge(shared.connected.load(Ordering::Relaxed) as u64));
        r.register("syncfs_node_pull_seconds", "Time to pull one content.", self.pull_seconds.clone());
        let mut o = String::new();
        prometheus_client::encoding::text::encode(&mut o, &r).expect("writing to a String cannot fail");
        o
    }
}

/// What `GET /status` returns and `syncctl status` shows.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct NodeStatus {
    pub id: String,
    pub mount: String,
    pub url: String,
    pub connected: bool,
    pub pending_changes: u64,
    pub pending_pulls: u64,
    pub files: u64,
    pub dirs: u64,
    pub conflicts_seen: u64,
    pub last_revision: u64,
    pub bytes_pulled: u64,
    pub last_sync: Option<SyncReport>,
}

/// State shared by the node's tasks. Each field has one writer: the broker link writes
/// `connected` and `last_sync`, the applier `pulls_in_progress`.
pub struct Shared {
    pub id: NodeId,
    pub mount: PathBuf,
    pub url: String,
    pub tree: Arc<Tree>,
    pub cluster_token: Option<String>,
    pub connected: AtomicBool,
    pub pulls_in_progress: AtomicU64,
    /// Whether set-id bits from other nodes are applied (`Config::allow_setid`).
    pub allow_setid: bool,
    pub metrics: Metrics,
    pub notifier: OnceLock<fuser::Notifier>,
    /// Whether the kernel does passthrough I/O for this mount (owned by `fs::SyncFs`).
    pub passthrough: Arc<AtomicBool>,
    pub last_sync: Mutex<Option<SyncReport>>,
    /// Sync requests to the broker link, each with where to send the report.
    pub sync_requests: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<anyhow::Result<SyncReport>>>,
}

impl Shared {
    pub fn status(&self) -> NodeStatus {
        let stats = self.tree.stats();
        NodeStatus {
            id: self.id.to_string(),
            mount: self.mount.display().to_string(),
            url: self.url.clone(),
            connected: self.connected.load(Ordering::Relaxed),
            pending_changes: stats.pending_changes,
            pending_pulls: self.pulls_in_progress.load(Ordering::Relaxed),
            files: stats.files,
            dirs: stats.dirs,
            conflicts_seen: stats.conflicts_seen,
            last_revision: stats.last_revision,
            bytes_pulled: self.metrics.bytes_pulled.get(),
            last_sync: self.last_sync.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// Asks the broker link for a sync and waits for its report.
    pub async fn sync_now(&self, timeout: Duration) -> anyhow::Result<SyncReport> {
        if !self.connected.load(Ordering::Relaxed) {
            anyhow::bail!("not connected to the broker: the node is offline; its changes are kept and will be sent when it reconnects");
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.sync_requests.send(tx).await.context("the broker link is not running")?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => anyhow::bail!("the connection was lost during the sync"),
            Err(_) => anyhow::bail!("the manager did not answer within {}s", timeout.as_secs()),
        }
    }
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
        if fstype == "fuse.syncfs" && source == fs_name(id) {
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

/// Runs a node until SIGINT/SIGTERM.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    prepare_mount_point(&cfg.mount, &cfg.id)?;
    prepare_data_dir(&cfg.data)?;
    raise_fd_limit();
    let _ = std::fs::remove_file(cfg.data.join("node.url"));
    let db = Db::open(&cfg.data.join("node.db"))?;
    let store = ContentStore::open(&cfg.data)?;
    let tree = Arc::new(Tree::load(db, store.clone())?);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let cancel = CancellationToken::new();
    let listener = rt.block_on(tokio::net::TcpListener::bind(cfg.listen)).with_context(|| format!("listening on {}", cfg.listen))?;
    let local = listener.local_addr()?;
    let acceptor = cfg.tls.as_ref().map(|t| tls_pem::acceptor(&t.cert, &t.key)).transpose()?;
    let acceptor_is_tls = acceptor.is_some();
    let scheme = if acceptor_is_tls { "https" } else { "http" };
    let url = cfg.advertise.clone().unwrap_or_else(|| format!("{scheme}://{local}"));
    let (sync_tx, sync_rx) = tokio::sync::mpsc::channel(16);
    let shared = Arc::new(Shared {
        id: cfg.id.clone(),
        mount: cfg.mount.clone(),
        url: url.clone(),
        tree: tree.clone(),
        cluster_token: cfg.cluster_token.clone(),
        connected: AtomicBool::new(false),
        pulls_in_progress: AtomicU64::new(0),
        allow_setid: cfg.allow_setid,
        metrics: Metrics::default(),
        notifier: OnceLock::new(),
        passthrough: Arc::new(AtomicBool::new(cfg.passthrough)),
        last_sync: Mutex::new(None),
        sync_requests: sync_tx,
    });

    let fs = SyncFs::new(tree.clone(), cfg.data.clone(), shared.passthrough.clone());
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
    fcfg.n_threads = Some(4);
    let session = fuser::spawn_mount(fs, &cfg.mount, &fcfg).with_context(|| format!("mounting FUSE at {}", cfg.mount.display()))?;
    let _ = shared.notifier.set(session.notifier());
    tracing::info!(node = %cfg.id, mount = %cfg.mount.display(), %url, "mounted");

    let tracker = tokio_util::task::TaskTracker::new();
    let client = crate::peer::http_client(cfg.tls_ca.as_deref())?;
    let puller = crate::peer::Puller::new(client, store.clone(), cfg.id.clone(), cfg.cluster_token.clone(), cfg.pull_stall, acceptor_is_tls);
    let _guard = rt.enter();
    tracker.spawn(crate::peer::serve(listener, acceptor, shared.clone(), cancel.clone()));
    tracker.spawn(crate::link::run(cfg.broker.clone(), shared.clone(), puller, sync_rx, cancel.clone()));
    tracker.spawn(gc_loop(tree.clone(), cancel.clone()));
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
    let _ = std::fs::remove_file(cfg.data.join("node.url"));
    Ok(())
}

async fn gc_loop(tree: Arc<Tree>, cancel: CancellationToken) {
    let mut every = tokio::time::interval(GC_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {
                let t = tree.clone();
                let removed = tokio::task::spawn_blocking(move || t.gc()).await.unwrap_or(0);
                if removed > 0 {
                    tracing::debug!("removed {removed} unreferenced blobs");
                }
            }
        }
    }
}
