//! `fs-node`: mounts a synced folder. Flags are documented in `--help`.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "fs-node", version, about = "A sync node: a FUSE mount kept in sync with every other node through the manager")]
struct Args {
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
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    broker_link::init_logging();
    fs_node::node::run(fs_node::node::Config {
        id: a.id,
        mount: a.mount,
        data: a.data,
        broker: a.broker,
        listen: a.listen,
        advertise: a.advertise,
        cluster_token: a.cluster_token.filter(|t| !t.is_empty()),
    })
}
