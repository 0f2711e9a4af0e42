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
    Ok(password)
}

/// The (configure, write, read) permission patterns of node `node`'s user.
pub fn node_permissions(node: &wire::NodeId) -> (String, String, String) {
    let esc = |s: &str| s.replace('.', "\\.");
    ("^$".to_string(), format!("^{}$", esc(wire::topology::UPDATE_EXCHANGE)), format!("^{}$", esc(&wire::topology::node_queue(node))))
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
