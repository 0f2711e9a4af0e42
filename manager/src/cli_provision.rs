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
        /// Token the nodes require from peers (fs-node --cluster-token).
        #[arg(long, env = "SYNC_CLUSTER_TOKEN", hide_env_values = true)]
        cluster_token: Option<String>,
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
        /// Token the nodes require from peers (fs-node --cluster-token).
        #[arg(long, env = "SYNC_CLUSTER_TOKEN", hide_env_values = true)]
        cluster_token: Option<String>,
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

pub fn node(cluster: &ClusterArg, cmd: NodeCmd) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let docker = Docker::connect_cluster(&cluster.cluster).await?;
        match cmd {
            NodeCmd::Create { name, count, broker, image, mount_path, host_mount, env, cluster_token } => {
                let spec = NodeSpec {
                    name,
                    broker,
                    image: image.unwrap_or_else(provision::image_tag),
                    mount_path,
                    data_path: provision::DEFAULT_DATA_PATH.into(),
                    host_mount,
                    env,
                    cluster_token: cluster_token.filter(|t| !t.is_empty()),
                };
                for n in docker.create_nodes(&spec, count).await? {
                    print_node(&n);
                }
            }
            NodeCmd::List => {
                println!("{:<24} {:<10} {:<22} {:<28} host mount", "name", "state", "listen", "status");
                for n in docker.list_nodes().await? {
                    print_node(&n);
                }
            }
            NodeCmd::Rm { name: Some(name), purge, .. } => {
                docker.remove_node(&name, purge).await?;
                println!("removed {name}");
            }
            NodeCmd::Rm { name: None, purge, .. } => {
                let names = docker.remove_all(purge).await?;
                println!("removed {} node(s){}", names.len(), if names.is_empty() { String::new() } else { format!(": {}", names.join(" ")) });
            }
            NodeCmd::Logs { name, tail } => print!("{}", docker.logs(&name, tail).await?),
        }
        Ok(())
    })
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
        VmCmd::Create { cloud, count, instance_type, image_id, key_name, security_group, broker_public, node_image_url, cluster_token } => {
            let ec2 = ec2::Ec2::new(&ec2_config(cluster, cloud)).await?;
            let spec = ec2::VmSpec {
                count,
                instance_type,
                image_id,
                key_name,
                security_group,
                broker_public,
                node_image_url,
                cluster_token: cluster_token.filter(|t| !t.is_empty()),
                ..Default::default()
            };
            for v in ec2.create(&spec).await? {
                print_vm(&v);
            }
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
