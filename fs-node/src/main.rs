//! `fs-node`: mounts a synced folder. Flags are documented in `--help`.

use clap::{CommandFactory, Parser};

/// The settings file read when none is named (`--config`).
const DEFAULT_CONFIG: &str = "/etc/syncfs/node.toml";

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "fs-node", version, about = "A sync node: a FUSE mount kept in sync with every other node through the manager")]
struct Args {
    /// Settings file: TOML whose keys are these flags' long names (`broker = "…"`,
    /// `ignore = ["*.o"]`); a flag or an environment variable wins over it. Default:
    /// /etc/syncfs/node.toml, if it exists.
    #[arg(long, env = "SYNC_NODE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// This node's id (1-64 of A-Z a-z 0-9 . _ -); also names its broker queue.
    #[arg(long, env = "SYNC_NODE_ID")]
    id: wire::NodeId,
    /// Where to mount the synced folder.
    #[arg(long, env = "SYNC_MOUNT")]
    mount: PathBuf,
    /// Node state: database, content store.
    #[arg(long, env = "SYNC_DATA")]
    data: PathBuf,
    /// Broker URL (amqp:// or amqps://).
    #[arg(long, env = "SYNC_BROKER", default_value = broker_link::DEFAULT_BROKER_URL, hide_default_value = true)]
    broker: String,
    /// Address of this node's HTTP server (contents for peers, status, sync).
    #[arg(long, env = "SYNC_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// URL peers should use to reach the HTTP server (default: http://<listen address>).
    #[arg(long, env = "SYNC_ADVERTISE")]
    advertise: Option<String>,
    /// Cluster token: required from peers on every HTTP request, sent on every pull.
    #[arg(long, env = "SYNC_CLUSTER_TOKEN", hide_env_values = true)]
    cluster_token: Option<String>,
    /// Serve the HTTP server over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "SYNC_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "SYNC_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust when pulling from peers over https.
    #[arg(long, env = "SYNC_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Do all file I/O through this process, never by kernel passthrough to the store.
    #[arg(long, env = "SYNC_NO_PASSTHROUGH")]
    no_passthrough: bool,
    /// Seconds a holder may go without progress before a pull drops it and tries the next.
    #[arg(long, env = "SYNC_PULL_STALL_SECS", default_value_t = fs_node::puller::DEFAULT_STALL_TIMEOUT.as_secs())]
    pull_stall_secs: u64,
    /// Apply set-user-id/set-group-id bits that come from other nodes (default: cleared).
    #[arg(long, env = "SYNC_ALLOW_SETID")]
    allow_setid: bool,
    /// A path this node keeps to itself, in gitignore syntax (repeat the flag for more;
    /// in SYNC_IGNORE, separate them with newlines). `.syncignore` files in the tree
    /// come first (docs/SEMANTICS.md).
    #[arg(long = "ignore", value_name = "PATTERN", env = "SYNC_IGNORE", value_delimiter = '\n')]
    ignore: Vec<String>,
    /// Free space (MiB) below which kept old versions are dropped, oldest first, on this
    /// node (docs/versions.md).
    #[arg(long, env = "SYNC_KEEP_MIN_FREE_MIB", default_value_t = 1024)]
    keep_min_free_mib: u64,
    /// Seconds between runs of the store's GC (which also drops kept contents below the
    /// free-space floor).
    #[arg(long, env = "SYNC_GC_EVERY_SECS", default_value_t = fs_node::node::GC_EVERY.as_secs())]
    gc_every_secs: u64,
    /// Seconds a large file (4 MiB or more) is neither opened nor changed before it may
    /// keep on disk only the bytes a similar file's content does not hold (a near-copy:
    /// docs/sync.md); its first open afterwards writes it out whole again.
    #[arg(long, env = "SYNC_DEDUP_IDLE_SECS", default_value_t = fs_node::node::DEDUP_IDLE.as_secs())]
    dedup_idle_secs: u64,
    /// Files on demand: every name, size and time appears at once, and a file's content
    /// is fetched when a program first opens it; `syncctl pin` keeps a path local
    /// (docs/on-demand.md).
    #[arg(long, env = "SYNC_ON_DEMAND")]
    on_demand: bool,
    /// Most bytes the contents of on-demand files keep here (e.g. 20GiB, 500MiB, or
    /// bytes); beyond it the least recently opened are dropped, never the only copy of
    /// a current version. Default: no limit.
    #[arg(long, env = "SYNC_CACHE_SIZE", value_parser = parse_size)]
    cache_size: Option<u64>,
    /// Threads that answer the kernel's requests on the mount. Default: one where the
    /// kernel reads committed files itself (passthrough, as root), which is fastest for
    /// file operations (docs/benchmarks.md, session 32); two otherwise, so that reading
    /// a file's bytes does not hold up every other operation.
    #[arg(long, env = "SYNC_FUSE_THREADS", value_parser = clap::value_parser!(u16).range(1..=64))]
    fuse_threads: Option<u16>,
    /// How long the revision of a deleted path is kept at least, after a completed sync
    /// covered it (`30d`, `12h`…): a manager brought back from a copy older than that
    /// may bring the path back (docs/sync.md, *What a node forgets*). As long as the
    /// manager keeps deleted versions (`--keep-for`) or longer.
    #[arg(long, env = "SYNC_FORGET_DELETES_AFTER", default_value = "30d", value_parser = humantime::parse_duration)]
    forget_deletes_after: std::time::Duration,
}

/// A size with an optional binary unit: 1048576, 512KiB, 20GiB (K, M, G, T also).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a size (e.g. 20GiB, 500MiB, 1048576)"))?;
    let shift = match unit.trim().trim_end_matches("iB").trim_end_matches('B').to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("unknown unit in {s:?}: use KiB, MiB, GiB or TiB")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

fn main() -> std::process::ExitCode {
    broker_link::exit_with(run())
}

fn run() -> anyhow::Result<()> {
    if cli_support::generate_if_asked(Args::command())? {
        return Ok(());
    }
    let settings = cli_support::apply(&Args::command(), "SYNC_NODE_CONFIG", std::path::Path::new(DEFAULT_CONFIG))?;
    let a = Args::parse();
    broker_link::init_logging();
    if let Some(f) = settings {
        tracing::info!("settings from {}", f.display());
    }
    fs_node::node::run(fs_node::node::Config {
        id: a.id,
        mount: a.mount,
        data: a.data,
        broker: a.broker,
        listen: a.listen,
        advertise: a.advertise,
        cluster_token: a.cluster_token.filter(|t| !t.is_empty()),
        tls: a.tls_cert.zip(a.tls_key).map(|(cert, key)| fs_node::node::TlsFiles { cert, key }),
        tls_ca: a.tls_ca,
        passthrough: !a.no_passthrough,
        pull_stall: std::time::Duration::from_secs(a.pull_stall_secs.max(1)),
        allow_setid: a.allow_setid,
        ignore: a.ignore,
        keep_min_free: a.keep_min_free_mib.saturating_mul(1 << 20),
        gc_every: std::time::Duration::from_secs(a.gc_every_secs.max(1)),
        dedup_idle: std::time::Duration::from_secs(a.dedup_idle_secs),
        on_demand: a.on_demand,
        cache_size: a.cache_size,
        fuse_threads: a.fuse_threads.map(usize::from),
        forget_deletes_after: a.forget_deletes_after,
    })
}
