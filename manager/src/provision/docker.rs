//! Local nodes as Docker containers, through the Docker API (bollard).
//!
//! Each node is one container running the node image's `fs-node`, with `/dev/fuse`,
//! CAP_SYS_ADMIN and AppArmor unconfined (FUSE mounts need them), host networking (so
//! nodes reach the broker on the host and each other's HTTP servers; each gets its own
//! free port), a named volume for its data directory (so a container re-created with the
//! same name keeps its files), and the cluster label. Everything listed or removed is
//! selected by that label: other containers on the same daemon are never touched.

use super::{validate_name, Error, Result, LABEL_CLUSTER, LABEL_HOST_MOUNT, LABEL_LISTEN, LABEL_ROLE, ROLE_NODE};
use bollard::models::{
    ContainerCreateBody, DeviceMapping, HostConfig, Mount, MountBindOptions, MountBindOptionsPropagationEnum, MountType, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures_util::{StreamExt, TryStreamExt};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Docker calls in flight at once when creating or removing many nodes: enough to hide
/// the daemon's latency, few enough not to flood a small machine's dockerd.
pub const MAX_PARALLEL_DOCKER_CALLS: usize = 8;
/// Seconds `rm` gives a node to unmount and flush after SIGTERM before it is killed.
pub const STOP_TIMEOUT_S: i32 = 10;
/// Most nodes one `create_nodes` call makes; a typo like `--count 2000` should not fork-bomb dockerd.
pub const MAX_NODES_PER_CALL: usize = 200;
/// Log lines `logs` returns when no tail is asked for.
pub const DEFAULT_LOG_TAIL: usize = 200;

/// A connection to a Docker daemon, scoped to one cluster label.
#[derive(Clone)]
pub struct Docker {
    api: bollard::Docker,
    cluster: String,
}

/// What a new node looks like. `Default` gives the standard layout; set at least `broker`.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// Node name (also the container name and node id). With `count > 1` it is a prefix:
    /// `NAME-1`, `NAME-2`, … Without it, nodes are called `<cluster>-<k>` with the lowest free k.
    pub name: Option<String>,
    /// Broker URL as seen from inside the container (host networking: `127.0.0.1` is the host).
    pub broker: String,
    /// Image to run; normally [`super::image_tag`].
    pub image: String,
    /// Where the node mounts its file system inside the container.
    pub mount_path: String,
    /// The node's data directory inside the container (a named volume is mounted there).
    pub data_path: String,
    /// If set, each node's mount also appears on the host at `<host_mount>/<name>/<leaf>`,
    /// `<leaf>` being the mount path's last component (`sync` for `/mnt/sync`): the host
    /// directory `<host_mount>/<name>` is bind-mounted with shared propagation onto the
    /// mount path's parent. `host_mount` is made a shared mount point first.
    pub host_mount: Option<PathBuf>,
    /// Extra environment for the node (`KEY=VALUE`), e.g. `RUST_LOG=debug`.
    pub env: Vec<String>,
    /// Token peers must present on HTTP requests (fs-node `--cluster-token`); passed as
    /// `SYNC_CLUSTER_TOKEN` in the environment so it is not on the command line.
    pub cluster_token: Option<String>,
    /// Give each node its own least-privilege broker user (`api::broker_user::admit_node`),
    /// `broker` being a user that may configure the vhost.
    pub node_users: bool,
    /// Ids the manager forgot (`manager node forget`): it refuses them for good, so no
    /// node is made under one ([`crate::store::forgotten_nodes`]).
    pub forgotten: BTreeSet<String>,
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec {
            name: None,
            broker: broker_link::DEFAULT_BROKER_URL.to_string(),
            image: super::image_tag(),
            mount_path: super::DEFAULT_MOUNT_PATH.into(),
            data_path: super::DEFAULT_DATA_PATH.into(),
            host_mount: None,
            env: Vec::new(),
            cluster_token: None,
            node_users: false,
            forgotten: BTreeSet::new(),
        }
    }
}

/// A node container as the daemon reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub container_id: String,
    /// Docker's state: `created`, `running`, `exited`, …
    pub state: String,
    /// Docker's human status, e.g. `Up 3 seconds`.
    pub status: String,
    /// The node's HTTP address (`127.0.0.1:PORT`).
    pub listen: String,
    /// The node's peer URL, `http://<listen>`.
    pub url: String,
    /// The named volume holding the node's data directory.
    pub volume: String,
    /// Where the node's mount is visible on the host, if it was asked for.
    pub host_mount: Option<PathBuf>,
}

/// The data volume of node `name`.
pub fn volume_name(name: &str) -> String {
    format!("{name}-data")
}

impl Docker {
    /// Connects to the local daemon (`DOCKER_HOST` or `/var/run/docker.sock`) for the
    /// default cluster, negotiating the API version (dockerd 20.10 speaks 1.41).
    pub async fn connect() -> Result<Docker> {
        Self::connect_cluster(super::DEFAULT_CLUSTER).await
    }

    /// Like [`Docker::connect`], for the cluster named `cluster`.
    pub async fn connect_cluster(cluster: &str) -> Result<Docker> {
        validate_name("cluster name", cluster)?;
        let api = bollard::Docker::connect_with_local_defaults().map_err(|source| Error::DockerUnavailable { source })?;
        let api = api.negotiate_version().await.map_err(|source| Error::DockerUnavailable { source })?;
        api.ping().await.map_err(|source| Error::DockerUnavailable { source })?;
        Ok(Docker { api, cluster: cluster.to_string() })
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The underlying API client, for what this module does not wrap.
    pub fn api(&self) -> &bollard::Docker {
        &self.api
    }

    /// Creates and starts `count` nodes. Either all of them are created and started, or
    /// the containers this call made are removed again and the first error is returned.
    pub async fn create_nodes(&self, spec: &NodeSpec, count: usize) -> Result<Vec<NodeInfo>> {
        if count == 0 || count > MAX_NODES_PER_CALL {
            return Err(Error::Invalid { what: "count", value: count.to_string(), reason: format!("must be 1 to {MAX_NODES_PER_CALL}") });
        }
        if let Some(n) = &spec.name {
            validate_name("node name", n)?;
        }
        if self.image_id(&spec.image).await?.is_none() {
            return Err(Error::ImageMissing { tag: spec.image.clone() });
        }
        let names = self.pick_names(spec.name.as_deref(), count, &spec.forgotten).await?;
        for n in &names {
            validate_name("node name", n)?;
            if let Some(other_cluster) = self.container_cluster(n).await? {
                return Err(Error::NodeExists { name: n.clone(), other_cluster: other_cluster != self.cluster });
            }
        }
        if let Some(dir) = &spec.host_mount {
            split_mount_path(&spec.mount_path)?;
            ensure_shared_mount(dir)?;
        }
        // Hold every port until its container exists, so no two nodes get the same one.
        // A port could still be taken by someone else between release and the node's bind;
        // the node then fails loudly and `node logs` says so.
        let mut held = Vec::with_capacity(count);
        for _ in 0..count {
            held.push(std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Io { what: "picking a free port".into(), source })?);
        }
        let mut plans = Vec::with_capacity(count);
        for (name, l) in names.iter().zip(&held) {
            let port = l.local_addr().map_err(|source| Error::Io { what: "picking a free port".into(), source })?.port();
            plans.push((name.clone(), format!("127.0.0.1:{port}")));
        }

        let created: Vec<Result<String>> = futures_util::stream::iter(plans.iter())
            .map(|(name, listen)| self.create_one(spec, name, listen))
            .buffer_unordered(MAX_PARALLEL_DOCKER_CALLS)
            .collect()
            .await;
        drop(held);
        let mut first_err = None;
        let mut made = Vec::new();
        for r in created {
            match r {
                Ok(name) => made.push(name),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        if first_err.is_none() {
            let started: Vec<Result<()>> = futures_util::stream::iter(made.iter())
                .map(|name| async move {
                    self.api.start_container(name, None).await.map_err(|source| Error::Docker { op: format!("start container {name}"), source })
                })
                .buffer_unordered(MAX_PARALLEL_DOCKER_CALLS)
                .collect()
                .await;
            first_err = started.into_iter().find_map(|r| r.err());
        }
        if let Some(err) = first_err {
            let mut cleanup = Vec::new();
            for name in &made {
                if let Err(e) = self.remove_container(name).await {
                    cleanup.push(format!("{name}: {e}"));
                }
            }
            return Err(if cleanup.is_empty() {
                err
            } else {
                Error::CleanupFailed { what: "creating nodes".into(), source: Box::new(err), cleanup: cleanup.join("; ") }
            });
        }
        let all = self.list_nodes().await?;
        let wanted: BTreeSet<&String> = names.iter().collect();
        Ok(all.into_iter().filter(|n| wanted.contains(&n.name)).collect())
    }

    async fn create_one(&self, spec: &NodeSpec, name: &str, listen: &str) -> Result<String> {
        let volume = volume_name(name);
        let mut labels = HashMap::from([(LABEL_CLUSTER.to_string(), self.cluster.clone())]);
        // The volume outlives its container on purpose; creating an existing one is a no-op.
        self.api
            .create_volume(VolumeCreateRequest { name: Some(volume.clone()), labels: Some(labels.clone()), ..Default::default() })
            .await
            .map_err(|source| Error::Docker { op: format!("create volume {volume}"), source })?;
        labels.insert(LABEL_ROLE.into(), ROLE_NODE.into());
        labels.insert(LABEL_LISTEN.into(), listen.to_string());
        let mut mounts = vec![Mount { typ: Some(MountType::VOLUME), source: Some(volume.clone()), target: Some(spec.data_path.clone()), ..Default::default() }];
        if let Some(dir) = &spec.host_mount {
            // The bind mount goes on the mount path's parent, not on the mount path itself:
            // fs-node unmounts whatever is at its mount path at start-up (stale FUSE mounts),
            // which would remove a bind mount placed there.
            let (parent, leaf) = split_mount_path(&spec.mount_path)?;
            let host_dir = dir.join(name);
            std::fs::create_dir_all(&host_dir).map_err(|source| Error::Io { what: format!("creating {}", host_dir.display()), source })?;
            labels.insert(LABEL_HOST_MOUNT.into(), host_dir.join(leaf).display().to_string());
            mounts.push(Mount {
                typ: Some(MountType::BIND),
                source: Some(host_dir.display().to_string()),
                target: Some(parent.to_string()),
                bind_options: Some(MountBindOptions { propagation: Some(MountBindOptionsPropagationEnum::RSHARED), ..Default::default() }),
                ..Default::default()
            });
        }
        let broker = if spec.node_users {
            let node: wire::NodeId =
                name.parse().map_err(|_| Error::Invalid { what: "node name", value: name.into(), reason: "not a valid node id".into() })?;
            let password =
                crate::api::broker_user::admit_node(&spec.broker, &node).await.map_err(|e| Error::Broker { node: name.into(), message: format!("{e:#}") })?;
            broker_link::with_user(&spec.broker, &wire::topology::node_user(&node), password.expose())
        } else {
            spec.broker.clone()
        };
        let cmd = node_args(name, &spec.mount_path, &spec.data_path, listen);
        // Secrets go in the environment, not on the command line (`ps`, `docker inspect`'s
        // Args would show them).
        let secrets = std::iter::once(format!("SYNC_BROKER={broker}")).chain(spec.cluster_token.iter().map(|t| format!("SYNC_CLUSTER_TOKEN={t}")));
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: Some(cmd),
            env: Some(spec.env.iter().cloned().chain(secrets).collect()),
            labels: Some(labels),
            hostname: Some(name.to_string()),
            host_config: Some(HostConfig {
                devices: Some(vec![DeviceMapping {
                    path_on_host: Some("/dev/fuse".into()),
                    path_in_container: Some("/dev/fuse".into()),
                    cgroup_permissions: Some("rwm".into()),
                }]),
                cap_add: Some(vec!["SYS_ADMIN".into()]),
                security_opt: Some(vec!["apparmor=unconfined".into()]),
                network_mode: Some("host".into()),
                mounts: Some(mounts),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        self.api.create_container(Some(options), body).await.map_err(|source| match source {
            bollard::errors::Error::DockerResponseServerError { status_code: 409, .. } => Error::NodeExists { name: name.into(), other_cluster: false },
            source => Error::Docker { op: format!("create container {name}"), source },
        })?;
        tracing::info!(node = name, %listen, "node container created");
        Ok(name.to_string())
    }

    /// The cluster's node containers, running or not, sorted by name.
    pub async fn list_nodes(&self) -> Result<Vec<NodeInfo>> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_CLUSTER}={}", self.cluster), format!("{LABEL_ROLE}={ROLE_NODE}")])]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let list = self.api.list_containers(Some(options)).await.map_err(|source| Error::Docker { op: "list containers".into(), source })?;
        let mut nodes: Vec<NodeInfo> = list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                // The daemon filtered already; check again so a filter bug can never leak others.
                if labels.get(LABEL_CLUSTER) != Some(&self.cluster) {
                    return None;
                }
                let name = c.names.unwrap_or_default().first()?.trim_start_matches('/').to_string();
                let listen = labels.get(LABEL_LISTEN).cloned().unwrap_or_default();
                Some(NodeInfo {
                    volume: volume_name(&name),
                    url: format!("http://{listen}"),
                    listen,
                    host_mount: labels.get(LABEL_HOST_MOUNT).map(PathBuf::from),
                    container_id: c.id.unwrap_or_default(),
                    state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                    status: c.status.unwrap_or_default(),
                    name,
                })
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(nodes)
    }

    /// Stops and removes node `name`. Its data volume is kept (a node re-created with the
    /// same name gets its files back) unless `purge` is set.
    pub async fn remove_node(&self, name: &str, purge: bool) -> Result<()> {
        match self.container_cluster(name).await? {
            Some(c) if c == self.cluster => {}
            _ => return Err(Error::NodeNotFound { name: name.into(), cluster: self.cluster.clone() }),
        }
        self.remove_container(name).await?;
        if purge {
            self.remove_volume(&volume_name(name)).await?;
        }
        Ok(())
    }

    /// Removes every node of the cluster (and, with `purge`, the cluster's volumes).
    /// Returns the names removed.
    pub async fn remove_all(&self, purge: bool) -> Result<Vec<String>> {
        let names: Vec<String> = self.list_nodes().await?.into_iter().map(|n| n.name).collect();
        let results: Vec<Result<()>> =
            futures_util::stream::iter(names.iter()).map(|n| self.remove_node(n, purge)).buffer_unordered(MAX_PARALLEL_DOCKER_CALLS).collect().await;
        if let Some(e) = results.into_iter().find_map(|r| r.err()) {
            return Err(e);
        }
        if purge {
            // Volumes of nodes removed earlier without purge.
            let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_CLUSTER}={}", self.cluster)])]);
            let opts = bollard::query_parameters::ListVolumesOptionsBuilder::default().filters(&filters).build();
            let vols = self.api.list_volumes(Some(opts)).await.map_err(|source| Error::Docker { op: "list volumes".into(), source })?;
            for v in vols.volumes.unwrap_or_default() {
                if v.labels.get(LABEL_CLUSTER) == Some(&self.cluster) {
                    self.remove_volume(&v.name).await?;
                }
            }
        }
        Ok(names)
    }

    /// The last `tail` lines (default [`DEFAULT_LOG_TAIL`]) of node `name`'s output.
    pub async fn logs(&self, name: &str, tail: Option<usize>) -> Result<String> {
        match self.container_cluster(name).await? {
            Some(c) if c == self.cluster => {}
            _ => return Err(Error::NodeNotFound { name: name.into(), cluster: self.cluster.clone() }),
        }
        let tail = tail.unwrap_or(DEFAULT_LOG_TAIL).to_string();
        let options = LogsOptionsBuilder::default().stdout(true).stderr(true).tail(&tail).build();
        let chunks: Vec<bollard::container::LogOutput> =
            self.api.logs(name, Some(options)).try_collect().await.map_err(|source| Error::Docker { op: format!("read the logs of {name}"), source })?;
        Ok(chunks.into_iter().map(|c| String::from_utf8_lossy(&c.into_bytes()).into_owned()).collect())
    }

    /// The cluster label of container `name`, `Some("")` if it has none, `None` if no such container.
    async fn container_cluster(&self, name: &str) -> Result<Option<String>> {
        match self.api.inspect_container(name, None).await {
            Ok(c) => Ok(Some(c.config.and_then(|c| c.labels).and_then(|mut l| l.remove(LABEL_CLUSTER)).unwrap_or_default())),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(source) => Err(Error::Docker { op: format!("inspect container {name}"), source }),
        }
    }

    async fn remove_container(&self, name: &str) -> Result<()> {
        let host_mount =
            self.api.inspect_container(name, None).await.ok().and_then(|c| c.config.and_then(|c| c.labels).and_then(|mut l| l.remove(LABEL_HOST_MOUNT)));
        // SIGTERM first so the node unmounts and flushes; errors here (already stopped) are fine.
        let _ = self.api.stop_container(name, Some(StopContainerOptionsBuilder::default().t(STOP_TIMEOUT_S).build())).await;
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.api.remove_container(name, Some(options)).await {
            Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
            Err(source) => return Err(Error::Docker { op: format!("remove container {name}"), source }),
        }
        if let Some(dir) = host_mount {
            // A node killed before it unmounted leaves a dead FUSE mount on the host side.
            detach_stale_mount(Path::new(&dir));
        }
        tracing::info!(node = name, "node container removed");
        Ok(())
    }

    async fn remove_volume(&self, volume: &str) -> Result<()> {
        match self.api.remove_volume(volume, Some(RemoveVolumeOptionsBuilder::default().force(true).build())).await {
            Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(source) => Err(Error::Docker { op: format!("remove volume {volume}"), source }),
        }
    }

    /// `count` names: `base` alone, `base-1..base-count`, or `<cluster>-<k>` with the lowest
    /// free k that the manager did not forget (`forgotten`; a name given that it forgot is
    /// refused).
    async fn pick_names(&self, base: Option<&str>, count: usize, forgotten: &BTreeSet<String>) -> Result<Vec<String>> {
        let given = |names: Vec<String>| match names.iter().find(|n| forgotten.contains(*n)) {
            Some(n) => Err(Error::Invalid {
                what: "node name",
                value: n.clone(),
                reason: "the manager forgot a node of that id (`manager node forget`) and refuses it; choose another".into(),
            }),
            None => Ok(names),
        };
        match base {
            Some(b) if count == 1 => given(vec![b.to_string()]),
            Some(b) => given((1..=count).map(|k| format!("{b}-{k}")).collect()),
            None => {
                let taken: BTreeSet<String> = self.list_nodes().await?.into_iter().map(|n| n.name).collect();
                let mut names = Vec::with_capacity(count);
                let mut k = 1;
                while names.len() < count {
                    let n = format!("{}-{k}", self.cluster);
                    if !taken.contains(&n) && !forgotten.contains(&n) && self.container_cluster(&n).await?.is_none() {
                        names.push(n);
                    }
                    k += 1;
                }
                Ok(names)
            }
        }
    }
}

/// Splits an absolute mount path into (parent, last component); the parent must not be `/`
/// because with `host_mount` the parent is bind-mounted from the host.
pub fn split_mount_path(mount_path: &str) -> Result<(&str, &str)> {
    let invalid = |reason: &str| Error::Invalid { what: "mount path", value: mount_path.into(), reason: reason.into() };
    let trimmed = mount_path.trim_end_matches('/');
    let (parent, leaf) = trimmed.rsplit_once('/').ok_or_else(|| invalid("must be absolute"))?;
    if !mount_path.starts_with('/') || leaf.is_empty() || leaf == ".." || leaf == "." {
        return Err(invalid("must be an absolute path like /mnt/sync"));
    }
    if parent.is_empty() {
        return Err(invalid("with --host-mount it needs a parent directory other than / (e.g. /mnt/sync)"));
    }
    Ok((parent, leaf))
}

/// The node's command line after the image's entrypoint (`fs-node`).
pub fn node_args(name: &str, mount: &str, data: &str, listen: &str) -> Vec<String> {
    ["--id", name, "--mount", mount, "--data", data, "--listen", listen].iter().map(|s| s.to_string()).collect()
}

/// Makes `dir` a shared mount point (bind-mounting it onto itself first if it is not a
/// mount point), so that FUSE mounts made inside containers propagate back to the host.
/// Docker refuses `rshared` bind mounts whose source is on a private mount.
pub fn ensure_shared_mount(dir: &Path) -> Result<()> {
    let io = |what: String| move |source| Error::Io { what, source };
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let dir = dir.canonicalize().map_err(io(format!("resolving {}", dir.display())))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(io("reading /proc/self/mountinfo".into()))?;
    let target = dir.to_string_lossy();
    // Field 5 is the mount point; optional fields after field 6 hold "shared:N".
    let line = mountinfo.lines().rfind(|l| l.split(' ').nth(4) == Some(&target));
    if line.is_some_and(|l| l.split(" - ").next().unwrap_or("").split(' ').skip(6).any(|f| f.starts_with("shared:"))) {
        return Ok(());
    }
    use nix::mount::{mount, MsFlags};
    let failed = |what: String| move |e: nix::Error| Error::Io { what, source: std::io::Error::from(e) };
    if line.is_none() {
        mount(Some(&dir), &dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(failed(format!("bind-mounting {} onto itself (needs root)", dir.display())))?;
    }
    mount(None::<&str>, &dir, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
        .map_err(failed(format!("making {} a shared mount (needs root)", dir.display())))?;
    Ok(())
}

/// Lazily unmounts whatever is still mounted at `dir` (a FUSE mount whose node died).
fn detach_stale_mount(dir: &Path) {
    // Failure (nothing mounted there) is expected and ignored.
    let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_args_match_fs_node_flags() {
        let a = node_args("n1", "/mnt/sync", "/var/lib/syncfs", "127.0.0.1:7000");
        assert_eq!(a.join(" "), "--id n1 --mount /mnt/sync --data /var/lib/syncfs --listen 127.0.0.1:7000");
    }

    #[test]
    fn mount_paths_split_for_the_host_bind() {
        assert_eq!(split_mount_path("/mnt/sync").unwrap(), ("/mnt", "sync"));
        assert_eq!(split_mount_path("/a/b/c/").unwrap(), ("/a/b", "c"));
        for bad in ["/sync", "sync", "/", "/mnt/..", ""] {
            assert!(split_mount_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn volume_is_named_after_the_node() {
        assert_eq!(volume_name("c-1"), "c-1-data");
    }
}
