//! Provisioning: creates and removes nodes as local Docker containers (`docker`), as
//! cloud VMs through the EC2 API (`ec2`), and builds the node image (`image`).
//!
//! Owns the cluster labels and the `vms` table of the manager's database. It never
//! touches containers or instances that do not carry its cluster label, never
//! decides anything about files, and never logs a broker URL with its password.
//! The CLI (`manager image|node|vm`) and the REST API both call these functions.

pub mod docker;
pub mod ec2;
pub mod image;

/// Label that marks a container, volume or instance as belonging to a cluster.
pub const LABEL_CLUSTER: &str = "syncfs.cluster";
/// Label with the node's role (always [`ROLE_NODE`] for now).
pub const LABEL_ROLE: &str = "syncfs.role";
pub const ROLE_NODE: &str = "node";
/// Label with the node's HTTP address (`127.0.0.1:PORT` for host-network containers).
pub const LABEL_LISTEN: &str = "syncfs.listen";
/// Label with the host directory the node's mount is exposed at, if any.
pub const LABEL_HOST_MOUNT: &str = "syncfs.host-mount";
/// Cluster name used when none is given.
pub const DEFAULT_CLUSTER: &str = "syncfs";
/// Where the node mounts its file system inside the container, unless told otherwise.
pub const DEFAULT_MOUNT_PATH: &str = "/mnt/sync";
/// The node's data directory inside the container; a named volume is mounted there.
pub const DEFAULT_DATA_PATH: &str = "/var/lib/syncfs";
/// Port a node listens on in a VM (one node per VM, so a fixed port is fine).
pub const VM_NODE_PORT: u16 = 7070;

/// The node image's tag: name and this crate's version, so a manager always asks for
/// the image built from the same release.
pub fn image_tag() -> String {
    format!("syncfs-node:{}", env!("CARGO_PKG_VERSION"))
}

/// Everything that can go wrong while provisioning, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the Docker daemon ({source}); is dockerd running? (scripts/setup-docker.sh starts one)")]
    DockerUnavailable { source: bollard::errors::Error },
    #[error("Docker refused to {op}: {source}")]
    Docker { op: String, source: bollard::errors::Error },
    #[error("the node image {tag} is not in the Docker daemon; build it with `manager image build`")]
    ImageMissing { tag: String },
    #[error("building image {tag} failed: {message}")]
    ImageBuild { tag: String, message: String },
    #[error("root file system {path} is not usable: {reason}; run container/build-rootfs.sh first")]
    Rootfs { path: String, reason: String },
    #[error("a container named {name} already exists{}", if *.other_cluster { " and does not belong to this cluster" } else { "" })]
    NodeExists { name: String, other_cluster: bool },
    #[error("no node named {name} in cluster {cluster}")]
    NodeNotFound { name: String, cluster: String },
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid { what: &'static str, value: String, reason: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// Giving a node its own broker user failed (`rabbitmqctl` or the broker).
    #[error(
        "admitting node {node} on the broker failed: {message} (node users need rabbitmqctl on this host and a --broker user that may configure the vhost)"
    )]
    Broker { node: String, message: String },
    #[error("built without EC2 support; rebuild with --features ec2")]
    Ec2NotBuilt,
    /// A cloud (EC2) call failed, or the cloud client could not be set up. `message` is the
    /// whole sentence, on one line: what failed, why and what to do (see `ec2::explain`).
    /// `op` is what was being done ("launch instances", "configure the EC2 client").
    #[error("{message}")]
    Cloud { op: &'static str, message: String },
    /// The manager has no record of this VM in this cluster; the cloud was not asked.
    #[error("no VM {id} in cluster {cluster} (see `manager vm list`)")]
    VmNotFound { id: String, cluster: String },
    #[error("the manager database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{what} failed: {source}; after that, cleaning up also failed: {cleanup}")]
    CleanupFailed { what: String, source: Box<Error>, cleanup: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Checks that a node or cluster name is usable as a node id, a container name and a label.
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let invalid = |reason: &str| Error::Invalid { what, value: name.to_string(), reason: reason.to_string() };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(invalid(&format!("must be 1 to {MAX_NAME_LEN} characters")));
    }
    let first_ok = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(invalid("use letters, digits, '.', '_' and '-', starting with a letter or digit"));
    }
    name.parse::<wire::NodeId>().map_err(|e| invalid(&e.to_string()))?;
    Ok(())
}

/// Docker allows longer names, but node ids travel in every message; 63 also fits a DNS label.
pub const MAX_NAME_LEN: usize = 63;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("node name", "syncfs-1").is_ok());
        assert!(validate_name("node name", "a.b_c-9").is_ok());
        for bad in ["", "-x", "a/b", "a b", "é", &"x".repeat(64)] {
            assert!(validate_name("node name", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn tag_carries_the_version() {
        assert_eq!(image_tag(), format!("syncfs-node:{}", env!("CARGO_PKG_VERSION")));
    }
}
