//! `manager`: the command line. `serve` runs the manager; `status` reads its database.

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

/// The settings file read when none is named (`--config`).
const DEFAULT_CONFIG: &str = "/etc/syncfs/manager.toml";
use std::path::PathBuf;

mod cli_api;

mod cli_provision;

#[derive(Parser)]
#[command(name = "manager", version, about = "The sync manager: orders changes, keeps metadata, provisions nodes")]
struct Cli {
    /// Settings file: TOML whose keys are the long flag names (`broker = "…"`, `db =
    /// "…"`); a flag or an environment variable wins over it. Default:
    /// /etc/syncfs/manager.toml, if it exists.
    #[arg(long, global = true, env = "SYNC_MANAGER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    cluster: cli_provision::ClusterArg,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the manager: consume the update channel, broadcast on the master channel.
    Serve {
        /// Broker URL (amqp:// or amqps://).
        #[arg(long, env = "SYNC_BROKER", default_value = broker_link::DEFAULT_BROKER_URL, hide_default_value = true)]
        broker: String,
        /// SQLite database of the manager.
        #[arg(long, env = "SYNC_MANAGER_DB", default_value = "manager.db")]
        db: PathBuf,
        #[command(flatten)]
        http: cli_api::HttpArgs,
        /// Accept messages only over nodes' own broker users (`manager node add`), each
        /// speaking only as its node; refuse (dead-letter) everything else.
        #[arg(long, env = "SYNC_REQUIRE_NODE_USERS")]
        require_node_users: bool,
        /// How long an overwritten or deleted version is kept (`30d`, `12h`, `90s`…).
        #[arg(long, env = "SYNC_KEEP_FOR", default_value = "30d", value_parser = humantime::parse_duration)]
        keep_for: std::time::Duration,
        /// Most old versions kept per path (0: as many as the time allows).
        #[arg(long, env = "SYNC_KEEP_VERSIONS", default_value_t = 0)]
        keep_versions: u32,
        /// Nodes asked to keep each old version's content, where the cluster has them
        /// (0: keep no old versions).
        #[arg(long, env = "SYNC_KEEP_COPIES", default_value_t = 2)]
        keep_copies: u32,
        /// How long a decided change's id is remembered at least, so that the change sent
        /// again (a node that missed the answer, or brought back from a backup) is not
        /// decided twice; after that, only until its node has nothing left to send.
        #[arg(long, env = "SYNC_REMEMBER_DECISIONS_FOR", default_value = "30d", value_parser = humantime::parse_duration)]
        remember_decisions_for: std::time::Duration,
        /// Forget a node not heard of for this long while the manager served, as
        /// `manager node forget` does (a laptop gone for good holds every delete's
        /// tombstone until then); it is refused from then on, and told so when it syncs.
        /// Never, unless set (0 is never too).
        #[arg(long, env = "SYNC_FORGET_NODES_AFTER", value_parser = humantime::parse_duration)]
        forget_nodes_after: Option<std::time::Duration>,
    },
    /// Print the nodes (online or not), the file count and the conflict count.
    Status {
        #[arg(long, env = "SYNC_MANAGER_DB", default_value = "manager.db")]
        db: PathBuf,
    },
    /// Build the node image (container/).
    #[command(subcommand)]
    Image(cli_provision::ImageCmd),
    /// Local nodes as Docker containers.
    #[command(subcommand)]
    Node(cli_provision::NodeCmd),
    /// Cloud nodes as EC2 VMs (needs the `ec2` feature).
    #[command(subcommand)]
    Vm(cli_provision::VmCmd),
    /// The cluster's credentials: show them, or create the cluster's broker user.
    #[command(subcommand)]
    Credentials(cli_api::CredentialsCmd),
}

fn main() -> std::process::ExitCode {
    broker_link::exit_with(run())
}

fn run() -> anyhow::Result<()> {
    if cli_support::generate_if_asked(Cli::command())? {
        return Ok(());
    }
    let settings = cli_support::apply(&Cli::command(), "SYNC_MANAGER_CONFIG", std::path::Path::new(DEFAULT_CONFIG))?;
    let cli = Cli::parse();
    broker_link::init_logging();
    if let Some(f) = settings {
        tracing::info!("settings from {}", f.display());
    }
    match cli.cmd {
        Cmd::Serve { broker, db, http, require_node_users, keep_for, keep_versions, keep_copies, remember_decisions_for, forget_nodes_after } => {
            if let Some(d) = forget_nodes_after.filter(|d| d.as_millis() > 0 && *d < std::time::Duration::from_secs(3600)) {
                tracing::warn!(
                    "--forget-nodes-after {}: a node silent for that little is forgotten for good (did you mean days?)",
                    humantime::format_duration(d)
                );
            }
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            rt.block_on(async {
                let cancel = tokio_util::sync::CancellationToken::new();
                broker_link::cancel_on_signals(cancel.clone());
                let mut api = http.config();
                api.provision = manager::api::ProvisionContext {
                    cluster: cli.cluster.cluster.clone(),
                    broker: broker.clone(),
                    db: db.clone(),
                    cluster_token: None,
                    node_users: require_node_users,
                };
                manager::api::run_manager(
                    manager::Config {
                        broker,
                        db,
                        require_node_users,
                        retention: manager::versions::Retention {
                            keep_for_ms: keep_for.as_millis().min(i64::MAX as u128) as i64,
                            keep_versions,
                            copies: keep_copies,
                            remember_decisions_ms: remember_decisions_for.as_millis().min(i64::MAX as u128) as i64,
                            forget_nodes_ms: forget_nodes_after.map_or(0, |d| d.as_millis().min(i64::MAX as u128) as i64),
                        },
                    },
                    api,
                    cancel,
                )
                .await
            })
        }
        Cmd::Image(cmd) => cli_provision::image(&cli.cluster, cmd),
        Cmd::Node(cmd) => cli_provision::node(&cli.cluster, cmd),
        Cmd::Vm(cmd) => cli_provision::vm(&cli.cluster, cmd),
        Cmd::Credentials(cmd) => cli_api::credentials(cmd),
        Cmd::Status { db } => {
            // Not a new, empty database where none is (a mistyped path), nor one made
            // while the manager is making its own.
            anyhow::ensure!(db.exists(), "no manager database at {}", db.display());
            let store = manager::store::Store::open(&db)?;
            let now = manager::service::now_ms();
            println!("{:<20} {:<8} {:>10} {:>8} {:>7}  url", "node", "state", "last seen", "pending", "pulls");
            for n in store.nodes()? {
                let ago = (now - n.last_seen_ms).max(0) / 1000;
                println!(
                    "{:<20} {:<8} {:>9}s {:>8} {:>7}  {}",
                    n.id,
                    if n.online_at(now) { "online" } else { "offline" },
                    ago,
                    n.pending_changes,
                    n.pending_pulls,
                    n.url
                );
            }
            println!("manager: {}", liveness(&db, now));
            println!("files: {}", store.live_file_count()?);
            println!("conflicts: {}", store.conflict_count()?);
            println!("revision: {}", store.head()?.0);
            if let Some(c) = store.caught_up()? {
                let ago = (now - c.at_ms).max(0) / 1000;
                println!("{c} ({ago}s ago)");
            }
            Ok(())
        }
    }
}

/// What the manager's liveness file says about it (`service::alive_file`).
fn liveness(db: &std::path::Path, now_ms: i64) -> String {
    let alive = manager::service::alive_file(db);
    let Ok(modified) = std::fs::metadata(&alive).and_then(|m| m.modified()) else {
        return format!("no liveness file ({}): the manager has not run with this database", alive.display());
    };
    let at = modified.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let ago = (now_ms - at).max(0) / 1000;
    if ago > manager::service::STALLED_AFTER.as_secs() as i64 {
        format!("WARNING: no progress for {ago}s (stopped, or stuck: see its log and /api/health)")
    } else {
        format!("making progress (checked {ago}s ago)")
    }
}
