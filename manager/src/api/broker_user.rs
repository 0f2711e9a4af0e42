//! Creates the cluster's own RabbitMQ user (so nothing needs `guest`) with `rabbitmqctl`,
//! which must run on the broker's host with the rights to manage it. The password is
//! generated here, handed to `rabbitmqctl` on its standard input (never on a command
//! line, where `ps` would show it) and stored in the credentials file.

use super::credentials::{BrokerUser, Credentials, Secret};
use anyhow::{bail, Context};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Default name of the cluster's broker user.
pub const DEFAULT_USER: &str = "sync-cluster";

/// Runs `rabbitmqctl -q ARGS`, feeding `stdin`; fails with its output on a non-zero exit.
fn rabbitmqctl(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running rabbitmqctl (it must be installed on the broker's host, see scripts/setup.sh)")?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).context("writing to rabbitmqctl")?;
    }
    let out = child.wait_with_output().context("waiting for rabbitmqctl")?;
    if !out.status.success() {
        bail!("rabbitmqctl {} failed: {}", args.first().unwrap_or(&""), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn user_exists(user: &str) -> anyhow::Result<bool> {
    let list = rabbitmqctl(&["list_users", "--no-table-headers"], None)?;
    Ok(list.lines().any(|l| l.split('\t').next() == Some(user)))
}

/// Creates (or re-keys) `user` with a fresh password, gives it full rights on `vhost`
/// (created if missing) and stores it in the credentials file at `creds_path`.
pub fn init(creds_path: &Path, user: &str, vhost: &str) -> anyhow::Result<BrokerUser> {
    if user == "guest" {
        bail!("the cluster's broker user must not be guest");
    }
    let (mut creds, _) = Credentials::load_or_create(creds_path)?;
    let password = Secret::random()?;
    rabbitmqctl(&["add_vhost", vhost], None).with_context(|| format!("creating vhost {vhost}"))?;
    if user_exists(user)? {
        rabbitmqctl(&["change_password", user], Some(password.expose())).with_context(|| format!("setting the password of {user}"))?;
    } else {
        rabbitmqctl(&["add_user", user], Some(password.expose())).with_context(|| format!("creating user {user}"))?;
    }
    rabbitmqctl(&["set_permissions", "-p", vhost, user, ".*", ".*", ".*"], None).with_context(|| format!("granting {user} access to {vhost}"))?;
    let broker = BrokerUser { user: user.to_string(), password, vhost: vhost.to_string() };
    creds.broker = Some(broker.clone());
    creds.save(creds_path)?;
    Ok(broker)
}

/// A node's own broker user (`sync-node-<id>`, `wire::topology::node_user`) with the
/// least rights a node needs on `vhost`: configure nothing, write only to the update
/// exchange, read only its own queue. The manager creates the node's queue and bindings
/// itself (its user may), so the node never needs to configure anything. Returns the
/// fresh password (the user is re-keyed if it exists).
pub fn add_node_user(vhost: &str, node: &wire::NodeId) -> anyhow::Result<Secret> {
    let user = wire::topology::node_user(node);
    let password = Secret::random()?;
    if user_exists(&user)? {
        rabbitmqctl(&["change_password", &user], Some(password.expose())).with_context(|| format!("setting the password of {user}"))?;
    } else {
        rabbitmqctl(&["add_user", &user], Some(password.expose())).with_context(|| format!("creating user {user}"))?;
    }
    let (configure, write, read) = node_permissions(node);
    rabbitmqctl(&["set_permissions", "-p", vhost, &user, &configure, &write, &read], None).with_context(|| format!("granting {user} its rights on {vhost}"))?;
    set_queue_limits(vhost)?;
    Ok(password)
}

/// Most a node's queue holds (bytes) while the node is away (or falls behind); past it
/// the oldest messages go. That loses nothing: a node runs a full sync whenever it
/// reconnects, and a decision of its own change is sent again when it republishes the
/// change; a node still connected is asked to do both, as each dropped message comes
/// back to the manager (dead-lettered into `sync.dead`, whence `sync.drops`;
/// `service::dropped_from_node_queue`).
pub const NODE_QUEUE_MAX_BYTES: u64 = 1 << 30;
/// Most messages waiting in `sync.update`; past it the broker refuses publishes (the
/// nodes keep their changes and retry), so a flood cannot fill the broker's disk.
pub const UPDATE_QUEUE_MAX_LENGTH: u64 = 1_000_000;
/// Most `sync.dead` keeps (bytes); the oldest dead letters go first.
pub const DEAD_QUEUE_MAX_BYTES: u64 = 256 << 20;
/// Most `sync.drops` keeps (bytes) while the manager is away; the oldest go first (the
/// newest notice of a node is the one that matters).
pub const DROPS_QUEUE_MAX_BYTES: u64 = 64 << 20;

/// Length limits on the vhost's queues, as broker policies (they apply to existing
/// queues without redeclaring them). Idempotent.
pub fn set_queue_limits(vhost: &str) -> anyhow::Result<()> {
    let node = format!(r#"{{"max-length-bytes":{NODE_QUEUE_MAX_BYTES},"overflow":"drop-head"}}"#);
    let update = format!(r#"{{"max-length":{UPDATE_QUEUE_MAX_LENGTH},"overflow":"reject-publish"}}"#);
    let dead = format!(r#"{{"max-length-bytes":{DEAD_QUEUE_MAX_BYTES},"overflow":"drop-head"}}"#);
    let drops = format!(r#"{{"max-length-bytes":{DROPS_QUEUE_MAX_BYTES},"overflow":"drop-head"}}"#);
    let policies = [
        ("sync-node-queues", r"^sync\.node\.", node),
        ("sync-update-queue", r"^sync\.update$", update),
        ("sync-dead-queue", r"^sync\.dead$", dead),
        ("sync-drops-queue", r"^sync\.drops$", drops),
    ];
    for (name, pattern, definition) in policies {
        rabbitmqctl(&["set_policy", "-p", vhost, "--apply-to", "queues", name, pattern, &definition], None)
            .with_context(|| format!("setting the queue limit policy {name} on {vhost}"))?;
    }
    Ok(())
}

/// The (configure, write, read) permission patterns of node `node`'s user.
pub fn node_permissions(node: &wire::NodeId) -> (String, String, String) {
    let esc = |s: &str| s.replace('.', "\\.");
    ("^$".to_string(), format!("^{}$", esc(wire::topology::UPDATE_EXCHANGE)), format!("^{}$", esc(&wire::topology::node_queue(node))))
}

/// Admits node `node` on the broker that `admin_url` (a user that may configure) points
/// at: its own user ([`add_node_user`]), its queue and bindings. Returns the node's
/// password (its user is `wire::topology::node_user`; build its URL with
/// `broker_link::with_user` on the address the node reaches the broker at).
pub async fn admit_node(admin_url: &str, node: &wire::NodeId) -> anyhow::Result<Secret> {
    let vhost = broker_link::url_vhost(admin_url);
    let (v, n) = (vhost.clone(), node.clone());
    let password = tokio::task::spawn_blocking(move || add_node_user(&v, &n)).await.context("rabbitmqctl task")??;
    let conn = broker_link::connect(admin_url).await?;
    broker_link::declare_common(&conn).await?;
    broker_link::declare_node_queue(&conn, node).await?;
    let _ = conn.close(200, "node admitted".into()).await;
    Ok(password)
}

/// Revokes node `node`'s user and deletes its queue on `vhost` with `rabbitmqctl` alone
/// (for callers without a broker connection, such as `vm rm`). Returns whether it had a
/// user.
pub fn revoke_node_local(vhost: &str, node: &wire::NodeId) -> anyhow::Result<bool> {
    if !remove_node_user(node)? {
        return Ok(false);
    }
    let queue = wire::topology::node_queue(node);
    if let Err(e) = rabbitmqctl(&["delete_queue", "-p", vhost, &queue], None) {
        tracing::warn!("deleting queue {queue}: {e:#}");
    }
    Ok(true)
}

/// Undoes [`admit_node`]: revokes the node's user and deletes its queue. Returns what
/// was done, in words (empty if the node had no user of its own).
pub async fn revoke_node(admin_url: &str, node: &wire::NodeId) -> anyhow::Result<Vec<String>> {
    let n = node.clone();
    let revoked = tokio::task::spawn_blocking(move || remove_node_user(&n)).await.context("rabbitmqctl task")??;
    if !revoked {
        return Ok(Vec::new());
    }
    let mut done = vec![format!("revoked broker user {}", wire::topology::node_user(node))];
    done.push(delete_node_queue(admin_url, node).await?);
    Ok(done)
}

/// Deletes node `node`'s queue (what the manager broadcast to it since is gone with it),
/// connecting to the broker at `admin_url` for it.
pub async fn delete_node_queue(admin_url: &str, node: &wire::NodeId) -> anyhow::Result<String> {
    let conn = broker_link::connect(admin_url).await?;
    let done = delete_node_queue_on(&conn, node).await;
    let _ = conn.close(200, "node removed".into()).await;
    done
}

/// Deletes node `node`'s queue on a channel of its own over `conn` (an error on the
/// broker's side closes that channel, not the connection). Returns what was done.
pub async fn delete_node_queue_on(conn: &lapin::Connection, node: &wire::NodeId) -> anyhow::Result<String> {
    let queue = wire::topology::node_queue(node);
    let ch = conn.create_channel().await.context("opening a channel")?;
    ch.queue_delete(queue.as_str().into(), lapin::options::QueueDeleteOptions::default()).await.with_context(|| format!("deleting queue {queue}"))?;
    let _ = ch.close(200, "node queue deleted".into()).await;
    Ok(format!("deleted queue {queue}"))
}

/// Deletes node `node`'s broker user (its open connections are closed by the broker).
/// Returns whether it existed.
pub fn remove_node_user(node: &wire::NodeId) -> anyhow::Result<bool> {
    let user = wire::topology::node_user(node);
    if !user_exists(&user)? {
        return Ok(false);
    }
    rabbitmqctl(&["delete_user", &user], None).with_context(|| format!("deleting user {user}"))?;
    Ok(true)
}

#[cfg(test)]
mod node_user_tests {
    #[test]
    fn node_permissions_are_anchored_and_escaped() {
        let (c, w, r) = super::node_permissions(&"a.b".parse().unwrap());
        assert_eq!((c.as_str(), w.as_str(), r.as_str()), ("^$", "^sync\\.updates$", "^sync\\.node\\.a\\.b$"));
    }
}
