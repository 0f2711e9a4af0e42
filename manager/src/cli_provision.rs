//! The `image`, `node` and `vm` subcommands: clap structs and printing only; the work
//! is done by `manager::provision`.

use anyhow::Context;
use clap::{Args, Subcommand};
use manager::provision::{self, docker::Docker, docker::NodeSpec, ec2};
use std::path::PathBuf;

#[derive(Args)]
pub struct ClusterArg {
    /// Cluster name: the label that marks this manager's containers and instances.
    #[arg(long, env = "SYNC_CLUSTER", default_value = provision::DEFAULT_CLUSTER, global = true)]
    pub cluster: String,
}

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Build the node image (syncfs-node:<version>) FROM scratch through the Docker API.
    Build {
        /// Root file system made by container/build-rootfs.sh.
        #[arg(long, default_value = provision::image::DEFAULT_ROOTFS)]
        rootfs: PathBuf,
        /// Image tag (default: syncfs-node:<manager version>).
        #[arg(long)]
        tag: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Create and start node containers.
    Create {
        /// Node name; with --count K, the prefix of NAME-1..NAME-K (default: <cluster>-<k>).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Broker URL as seen from the containers (they use the host's network).
        #[arg(long, env = "SYNC_BROKER", default_value = broker_link::DEFAULT_BROKER_URL, hide_default_value = true)]
        broker: String,
        /// Image to run (default: syncfs-node:<manager version>).
        #[arg(long)]
        image: Option<String>,
        /// Where the node mounts its file system inside the container.
        #[arg(long, default_value = provision::DEFAULT_MOUNT_PATH)]
        mount_path: String,
        /// Also show each node's mount on the host at DIR/<name>/<last part of --mount-path> (shared bind mount).
        #[arg(long)]
        host_mount: Option<PathBuf>,
        /// Extra environment for the node, KEY=VALUE (repeatable), e.g. RUST_LOG=debug.
        #[arg(long = "env")]
        env: Vec<String>,
        /// Token the nodes require from peers (fs-node --cluster-token); default: the
        /// cluster token in the credentials file next to --db.
        #[arg(long, env = "SYNC_CLUSTER_TOKEN", hide_env_values = true)]
        cluster_token: Option<String>,
        /// The manager's SQLite database; its credentials file gives the cluster token.
        #[arg(long, env = "SYNC_MANAGER_DB", default_value = "manager.db")]
        db: PathBuf,
        /// Give each node its own least-privilege broker user (as `node add`; --broker
        /// must then be a user that may create users' queues, and this must run on the
        /// broker's host).
        #[arg(long)]
        node_users: bool,
    },
    /// Admit a node: create its own broker user (least privilege: it may publish only
    /// on the update exchange and read only its own queue) and its queue, and write the
    /// node's credentials (SYNC_NODE_ID, SYNC_BROKER, SYNC_CLUSTER_TOKEN) to an env file
    /// with mode 0600 for `fs-node` (systemd EnvironmentFile, docker --env-file).
    /// Runs `rabbitmqctl`: run it on the broker's host.
    Add {
        name: wire::NodeId,
        /// The manager's broker URL; the node's URL is this one with the node's user.
        #[arg(long, env = "SYNC_BROKER", default_value = broker_link::DEFAULT_BROKER_URL, hide_default_value = true)]
        broker: String,
        /// The manager's SQLite database (its credentials file gives the cluster token).
        #[arg(long, env = "SYNC_MANAGER_DB", default_value = "manager.db")]
        db: PathBuf,
        /// Where to write the node's env file (default: ./<name>.env).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Forget a node gone for good (its disk lost, the machine retired): the manager
    /// stops keeping deletes and records of decided changes for it, takes it as holding
    /// nothing, and refuses whatever it sends from now on (start a replacement under
    /// another id). Also deletes its broker user, if it has one, and its queue.
    Forget {
        name: wire::NodeId,
        /// The manager's SQLite database (the manager may be running).
        #[arg(long, env = "SYNC_MANAGER_DB", default_value = "manager.db")]
        db: PathBuf,
        /// The manager's broker URL, to delete the node's queue.
        #[arg(long, env = "SYNC_BROKER", default_value = broker_link::DEFAULT_BROKER_URL, hide_default_value = true)]
        broker: String,
    },
    /// List this cluster's node containers.
    List,
    /// Remove node containers (their data volumes are kept unless --purge).
    Rm {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Remove every node of this cluster (and nothing else).
        #[arg(long)]
        all: bool,
        /// Also delete the data volumes.
        #[arg(long)]
        purge: bool,
        /// The manager's broker URL, to delete the node's queue.
        #[arg(long, env = "SYNC_BROKER", default_value = broker_link::DEFAULT_BROKER_URL, hide_default_value = true)]
        broker: String,
    },
    /// Print a node's output.
    Logs {
        name: String,
        /// Number of lines from the end.
        #[arg(long)]
        tail: Option<usize>,
    },
}

#[derive(Args)]
pub struct CloudArgs {
    /// EC2-compatible endpoint (OpenStack, moto); default: AWS for the region.
    #[arg(long, env = "SYNC_EC2_ENDPOINT")]
    pub endpoint_url: Option<String>,
    /// Region (default: AWS_REGION or the profile's).
    #[arg(long)]
    pub region: Option<String>,
    /// AWS profile (default: AWS_PROFILE or "default").
    #[arg(long)]
    pub profile: Option<String>,
    /// The manager's SQLite database (VMs are recorded in its `vms` table).
    #[arg(long, env = "SYNC_MANAGER_DB", default_value = "manager.db")]
    pub db: PathBuf,
}

#[derive(Subcommand)]
pub enum VmCmd {
    /// Launch VMs that each run one node.
    Create {
        #[command(flatten)]
        cloud: CloudArgs,
        #[arg(long, default_value_t = 1)]
        count: i32,
        #[arg(long, default_value = ec2::DEFAULT_INSTANCE_TYPE)]
        instance_type: String,
        /// Machine image (a Debian or Ubuntu AMI with cloud-init).
        #[arg(long)]
        image_id: String,
        #[arg(long)]
        key_name: Option<String>,
        /// Security group id (sg-...) or name; it must let the node port and SSH in.
        #[arg(long)]
        security_group: Option<String>,
        /// Broker URL as the VMs reach it, e.g. amqp://user:pass@PUBLIC_IP:5672/%2f.
        #[arg(long, env = "SYNC_BROKER_PUBLIC")]
        broker_public: String,
        /// URL of the node image tarball (`docker save syncfs-node:<version> | gzip`) for VMs to load.
        #[arg(long)]
        node_image_url: Option<String>,
        /// Token the nodes require from peers (fs-node --cluster-token); default: the
        /// cluster token in the credentials file next to --db.
        #[arg(long, env = "SYNC_CLUSTER_TOKEN", hide_env_values = true)]
        cluster_token: Option<String>,
        /// Give each VM's node its own least-privilege broker user (id `vm-<hex>`), made
        /// through this broker URL (the manager's, a user that may configure the vhost;
        /// run on the broker's host). The VMs get `--broker-public` with that user.
        #[arg(long, value_name = "ADMIN_BROKER_URL")]
        node_users: Option<String>,
    },
    /// List this cluster's VMs as the cloud reports them.
    List {
        #[command(flatten)]
        cloud: CloudArgs,
    },
    /// Terminate VMs (an id must be one this manager launched for the cluster).
    Rm {
        #[command(flatten)]
        cloud: CloudArgs,
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Terminate every VM of this cluster.
        #[arg(long)]
        all: bool,
    },
    /// Print the user-data (boot script) a VM was launched with.
    UserData {
        #[command(flatten)]
        cloud: CloudArgs,
        id: String,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the runtime")
}

pub fn image(cluster: &ClusterArg, cmd: ImageCmd) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let docker = Docker::connect_cluster(&cluster.cluster).await?;
        match cmd {
            ImageCmd::Build { rootfs, tag } => {
                let tag = tag.unwrap_or_else(provision::image_tag);
                let built = docker.build_image(&rootfs, &tag).await?;
                println!("built {} ({}, context {} KiB)", built.tag, built.id, built.context_bytes / 1024);
            }
        }
        Ok(())
    })
}

/// `node add`: the broker user, the queue, the env file.
async fn add_node(name: &wire::NodeId, broker: &str, db: &std::path::Path, out: Option<PathBuf>) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let password = manager::api::broker_user::admit_node(broker, name).await?;
    let (user, queue) = (wire::topology::node_user(name), wire::topology::node_queue(name));
    let url = broker_link::with_user(broker, &user, password.expose());
    let token = cluster_token_for(None, db)?;
    let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.env")));
    let mut text = format!("SYNC_NODE_ID={name}\nSYNC_BROKER={url}\n");
    if let Some(t) = token {
        text.push_str(&format!("SYNC_CLUSTER_TOKEN={t}\n"));
    }
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&out).with_context(|| format!("writing {}", out.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "added node {name}: broker user {user} (may publish only to {}, read only {queue}); its credentials are in {} (secret)",
        wire::topology::UPDATE_EXCHANGE,
        out.display()
    );
    Ok(())
}

/// `node rm NAME`: revokes the node's broker user and deletes its queue, then removes
/// its container if it has one; fails only if there was nothing of that name.
async fn forget_node(name: &wire::NodeId, db: &std::path::Path, broker: &str) -> anyhow::Result<()> {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let mut store = manager::store::Store::open(db)?;
    let gone = store.transaction(|tx| tx.forget_node(name, now_ms))?;
    let mut done = vec![format!(
        "forgot {name}: {} record(s) of its decided changes, {} path(s) it held, {} kept content(s); its messages are refused from now on",
        gone.records, gone.holdings, gone.kept
    )];
    // Its own broker user and queue, or (a node on a shared user) its queue alone.
    let revoked = match manager::api::broker_user::revoke_node(broker, name).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("note: revoking the node's broker user: {e:#}");
            Vec::new()
        }
    };
    if revoked.is_empty() {
        match manager::api::broker_user::delete_node_queue(broker, name).await {
            Ok(d) => done.push(d),
            Err(e) => eprintln!("note: deleting the node's queue: {e:#}"),
        }
    }
    done.extend(revoked);
    println!("{}", done.join("; "));
    Ok(())
}

async fn remove_node(cluster: &ClusterArg, name: &str, purge: bool, broker: &str) -> anyhow::Result<()> {
    let mut done = Vec::new();
    if let Ok(node) = name.parse::<wire::NodeId>() {
        match manager::api::broker_user::revoke_node(broker, &node).await {
            Ok(d) => done.extend(d),
            Err(e) => eprintln!("note: revoking the node's broker user and queue: {e:#}"),
        }
    }
    let container = match Docker::connect_cluster(&cluster.cluster).await {
        Ok(docker) => docker.remove_node(name, purge).await,
        Err(e) => Err(e),
    };
    match container {
        Ok(()) => done.push("removed its container".into()),
        Err(e) if done.is_empty() => return Err(e.into()),
        Err(provision::Error::NodeNotFound { .. }) => {}
        Err(e) => eprintln!("note: {e}"),
    }
    println!("removed {name}: {}", done.join(", "));
    Ok(())
}

pub fn node(cluster: &ClusterArg, cmd: NodeCmd) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let cmd = match cmd {
            NodeCmd::Add { name, broker, db, out } => return add_node(&name, &broker, &db, out).await,
            NodeCmd::Forget { name, db, broker } => return forget_node(&name, &db, &broker).await,
            NodeCmd::Rm { name: Some(name), purge, broker, .. } => return remove_node(cluster, &name, purge, &broker).await,
            other => other,
        };
        let docker = Docker::connect_cluster(&cluster.cluster).await?;
        match cmd {
            NodeCmd::Add { .. } | NodeCmd::Forget { .. } => unreachable!("handled above"),
            NodeCmd::Create { name, count, broker, image, mount_path, host_mount, env, cluster_token, db, node_users } => {
                let cluster_token = cluster_token_for(cluster_token, &db)?;
                let spec = NodeSpec {
                    name,
                    broker,
                    image: image.unwrap_or_else(provision::image_tag),
                    mount_path,
                    data_path: provision::DEFAULT_DATA_PATH.into(),
                    host_mount,
                    env,
                    cluster_token,
                    node_users,
                    forgotten: manager::store::forgotten_nodes(&db)?,
                };
                for n in docker.create_nodes(&spec, count).await? {
                    print_node(&n);
                }
                warn_no_token(&spec.cluster_token, &db);
            }
            NodeCmd::List => {
                println!("{:<24} {:<10} {:<22} {:<28} host mount", "name", "state", "listen", "status");
                for n in docker.list_nodes().await? {
                    print_node(&n);
                }
            }
            NodeCmd::Rm { name: Some(_), .. } => unreachable!("handled above"),
            NodeCmd::Rm { name: None, purge, .. } => {
                let names = docker.remove_all(purge).await?;
                println!("removed {} node(s){}", names.len(), if names.is_empty() { String::new() } else { format!(": {}", names.join(" ")) });
            }
            NodeCmd::Logs { name, tail } => print!("{}", docker.logs(&name, tail).await?),
        }
        Ok(())
    })
}

/// The token new nodes get: the one given, else the cluster token of the manager whose
/// database is `db` (nodes without it could not fetch from a cluster that requires it).
/// Without either, the nodes serve their peers without a token ([`warn_no_token`] says so
/// once they exist).
fn cluster_token_for(given: Option<String>, db: &std::path::Path) -> anyhow::Result<Option<String>> {
    if let Some(t) = given.filter(|t| !t.is_empty()) {
        return Ok(Some(t));
    }
    let path = manager::api::credentials::path_for_db(db);
    if !path.exists() {
        return Ok(None);
    }
    let creds = manager::api::credentials::Credentials::load(&path)?;
    Ok(Some(creds.cluster_token.expose().to_string()))
}

fn warn_no_token(token: &Option<String>, db: &std::path::Path) {
    if token.is_none() {
        let path = manager::api::credentials::path_for_db(db);
        eprintln!("note: no credentials at {} (pass --db or --cluster-token): the new nodes require no cluster token", path.display());
    }
}

fn print_node(n: &provision::docker::NodeInfo) {
    let hm = n.host_mount.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into());
    println!("{:<24} {:<10} {:<22} {:<28} {}", n.name, n.state, n.listen, n.status, hm);
}

fn ec2_config(cluster: &ClusterArg, cloud: CloudArgs) -> ec2::Ec2Config {
    ec2::Ec2Config { cluster: cluster.cluster.clone(), region: cloud.region, endpoint_url: cloud.endpoint_url, profile: cloud.profile, db: cloud.db }
}

fn print_vm(v: &ec2::VmInfo) {
    let ip = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    println!("{:<22} {:<14} {:<16} {:<16} {}", v.id, v.state, ip(&v.public_ip), ip(&v.private_ip), v.instance_type);
}

/// Runs a `vm` command. Its errors go up as one sentence: `provision::Error`'s message
/// already holds its causes (`{what}: {source}`), and main prints an error's chain of
/// sources on `Caused by:` lines, which would repeat them over several lines.
pub fn vm(cluster: &ClusterArg, cmd: VmCmd) -> anyhow::Result<()> {
    runtime()?.block_on(vm_run(cluster, cmd)).map_err(|e| anyhow::anyhow!("{e}"))
}

async fn vm_run(cluster: &ClusterArg, cmd: VmCmd) -> provision::Result<()> {
    match cmd {
        VmCmd::Create { cloud, count, instance_type, image_id, key_name, security_group, broker_public, node_image_url, cluster_token, node_users } => {
            let db = cloud.db.clone();
            let ec2 = ec2::Ec2::new(&ec2_config(cluster, cloud)).await?;
            let cluster_token = cluster_token_for(cluster_token, &db).map_err(|e| provision::Error::Invalid {
                what: "credentials file",
                value: db.display().to_string(),
                reason: format!("{e:#}"),
            })?;
            let spec = ec2::VmSpec {
                count,
                instance_type,
                image_id,
                key_name,
                security_group,
                broker_public,
                node_image_url,
                cluster_token,
                admin_broker: node_users,
                ..Default::default()
            };
            for v in ec2.create(&spec).await? {
                print_vm(&v);
            }
            warn_no_token(&spec.cluster_token, &db);
        }
        VmCmd::List { cloud } => {
            let ec2 = ec2::Ec2::new(&ec2_config(cluster, cloud)).await?;
            // The header only once the cloud answered: a failure prints nothing on stdout.
            let vms = ec2.list().await?;
            println!("{:<22} {:<14} {:<16} {:<16} type", "id", "state", "public ip", "private ip");
            for v in vms {
                print_vm(&v);
            }
        }
        VmCmd::Rm { cloud, id, .. } => {
            let ec2 = ec2::Ec2::new(&ec2_config(cluster, cloud)).await?;
            match id {
                Some(id) => {
                    ec2.remove(&id).await?;
                    println!("terminated {id}");
                }
                None => {
                    let ids = ec2.remove_all().await?;
                    println!("terminated {} VM(s){}", ids.len(), if ids.is_empty() { String::new() } else { format!(": {}", ids.join(" ")) });
                }
            }
        }
        VmCmd::UserData { cloud, id } => {
            let ec2 = ec2::Ec2::new(&ec2_config(cluster, cloud)).await?;
            print!("{}", ec2.user_data_of(&id).await?);
        }
    }
    Ok(())
}
