//! Least privilege on the broker: each node has its own RabbitMQ user (`manager node
//! add`), which may publish only on the update exchange and read only its own queue, and
//! may speak only as itself. With a node's credentials one cannot publish decisions on
//! `sync.master`, read another node's queue, drain `sync.update`, reach another queue
//! through the default exchange, or pose as another node; `manager node rm` revokes it.

#[path = "api_support/mod.rs"]
mod api_support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use system_tests::*;
use wire::{Change, ChangeOp, Content, ContentHash, Entry, Envelope, RelPath, Revision, ToManager, ToNode, Version};

fn env_file(p: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(p).unwrap().lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn manager_cmd(db: &Path, broker: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("manager")).args(args).args(["--broker", broker]).env("SYNC_MANAGER_DB", db).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Removes the test's broker users even if the test fails (users are broker-wide).
struct Users(Vec<String>);
impl Drop for Users {
    fn drop(&mut self) {
        for u in &self.0 {
            let _ = Command::new("rabbitmqctl").args(["-q", "delete_user", u]).output();
        }
    }
}

/// What the broker answers one attempt made with a node's credentials.
fn attempt(url: &str, what: impl AsyncFnOnce(&lapin::Channel) -> anyhow::Result<()>) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let conn = broker_link::connect(url).await.map_err(|e| format!("{e:#}"))?;
        let ch = broker_link::confirmed_channel(&conn).await.map_err(|e| format!("{e:#}"))?;
        let r = what(&ch).await.map_err(|e| format!("{e:#}"));
        let _ = conn.close(200, "done".into()).await;
        r
    })
}

fn put(path: &str, bytes: &[u8]) -> ToManager {
    let version = Version {
        content: Content::File { hash: ContentHash::from_bytes(*blake3::hash(bytes).as_bytes()), size: bytes.len() as u64 },
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
    };
    ToManager::Change(Change::new(RelPath::new(path).unwrap(), Revision(0), ChangeOp::Put { version }))
}

#[test]
fn node_users_may_do_only_what_a_node_does() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::new("acl");
    let admin = vhost.url();
    let mgr = ManagerProc::start_with(dir.path(), &admin, &["--require-node-users"]);
    let tag = std::process::id();
    let (a, b) = (format!("acl-a-{tag}"), format!("acl-b-{tag}"));
    let _users = Users(vec![format!("sync-node-{a}"), format!("sync-node-{b}")]);
    let mut nodes = Vec::new();
    let mut urls = HashMap::new();
    for id in [&a, &b] {
        let out = dir.path().join(format!("{id}.env"));
        let (ok, text) = manager_cmd(&mgr.db, &admin, &["node", "add", id, "--out", out.to_str().unwrap()]);
        assert!(ok, "{text}");
        let mode = std::fs::metadata(&out).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let env = env_file(&out);
        assert!(env["SYNC_BROKER"].contains(&format!("sync-node-{id}:")), "{env:?}");
        urls.insert(id.clone(), env["SYNC_BROKER"].clone());
        let opts = NodeOpts {
            broker: Some(env["SYNC_BROKER"].clone()),
            extra: vec!["--cluster-token".into(), env["SYNC_CLUSTER_TOKEN"].clone()],
            ..Default::default()
        };
        nodes.push(NodeProc::start_opts(dir.path(), id, &vhost, opts));
    }
    for n in &nodes {
        n.wait_connected();
    }
    // Admitting nodes set length limits on the vhost's queues.
    let policies = String::from_utf8_lossy(&Command::new("rabbitmqctl").args(["-q", "list_policies", "-p", &vhost.name]).output().unwrap().stdout).to_string();
    for p in ["sync-node-queues", "sync-update-queue", "sync-dead-queue", "sync-drops-queue"] {
        assert!(policies.contains(p), "no policy {p}: {policies}");
    }
    // The cluster works with its least-privilege users.
    write(&nodes[0].p("hello.txt"), b"from a");
    eventually("hello.txt on b", DEADLINE, || read(&nodes[1].p("hello.txt")).as_deref() == Some(&b"from a"[..]));

    let a_url = &urls[&a];
    let forged_entry = |path: &str| {
        let entry = Entry { path: RelPath::new(path).unwrap(), rev: Revision(1 << 52), version: None, holders: vec![], from_lost: None };
        Envelope::new("forged-1".parse().unwrap(), "manager".parse().unwrap(), ToNode::Applied { entry, origin: "manager".parse().unwrap() }).encode()
    };
    // A decision on sync.master: refused by the broker.
    let r = attempt(a_url, async |ch| broker_link::publish_confirmed(ch, wire::topology::MASTER_EXCHANGE, "all", "forged-1", &forged_entry("hello.txt")).await);
    assert!(r.as_ref().is_err_and(|e| e.contains("ACCESS_REFUSED")), "publish on sync.master: {r:?}");
    // Another node's queue, through the default exchange: refused.
    let b_queue = wire::topology::node_queue(&b.parse().unwrap());
    let r = attempt(a_url, async |ch| broker_link::publish_confirmed(ch, "", &b_queue, "forged-2", &forged_entry("hello.txt")).await);
    assert!(r.as_ref().is_err_and(|e| e.contains("ACCESS_REFUSED")), "publish to b's queue: {r:?}");
    // Reading another node's queue, or draining the update queue: refused.
    for queue in [b_queue.as_str(), wire::topology::UPDATE_QUEUE] {
        let r = attempt(a_url, async |ch| {
            use anyhow::Context;
            ch.basic_consume(queue.into(), "thief".into(), Default::default(), Default::default()).await.context("consuming")?;
            Ok(())
        });
        assert!(r.as_ref().is_err_and(|e| e.contains("ACCESS_REFUSED")), "consume {queue}: {r:?}");
    }
    // Posing as b: a user_id that is not the connection's user is refused by the broker...
    let b_user = format!("sync-node-{b}");
    let as_b = Envelope::new("forged-3".parse().unwrap(), b.parse().unwrap(), put("posed.txt", b"x")).encode();
    let r = attempt(a_url, async |ch| broker_link::publish_confirmed_as(ch, wire::topology::UPDATE_EXCHANGE, "", "forged-3", &as_b, Some(&b_user)).await);
    assert!(r.is_err(), "a user_id of another user was accepted");
    // ...and a `from` that is not the sender's node is refused by the manager.
    let a_user = format!("sync-node-{a}");
    let r = attempt(a_url, async |ch| broker_link::publish_confirmed_as(ch, wire::topology::UPDATE_EXCHANGE, "", "forged-4", &as_b, Some(&a_user)).await);
    assert!(r.is_ok(), "a's own publish to the update exchange: {r:?}");
    // A message over the shared admin user is refused too (the manager requires node users).
    let fake = api_support::FakeNode::connect(&vhost, &b);
    fake.put_file("shared-user.txt", b"y");
    let refused = |log: &str| log.contains("forged sender") && log.contains("no user_id: the manager requires");
    let start = std::time::Instant::now();
    while !refused(&std::fs::read_to_string(&mgr.log).unwrap_or_default()) {
        assert!(start.elapsed() < DEADLINE, "the manager did not refuse both messages; its log:\n{}", std::fs::read_to_string(&mgr.log).unwrap_or_default());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    eventually("both refusals in sync.dead", DEADLINE, || queue_depth(&vhost, wire::topology::DEAD_QUEUE) >= 2);
    drop(fake);
    // Nothing forged reached any node, and the cluster still works.
    write(&nodes[1].p("after.txt"), b"from b");
    eventually("after.txt on a", DEADLINE, || read(&nodes[0].p("after.txt")).as_deref() == Some(&b"from b"[..]));
    for n in &nodes {
        for forged in ["posed.txt", "shared-user.txt"] {
            assert!(read(&n.p(forged)).is_none(), "{forged} reached {}", n.id);
        }
        assert_eq!(read(&n.p("hello.txt")).as_deref(), Some(&b"from a"[..]));
    }

    // Removing a revokes its user and deletes its queue.
    let (ok, text) = manager_cmd(&mgr.db, &admin, &["node", "rm", &a]);
    assert!(ok, "{text}");
    assert!(text.contains("revoked broker user") && text.contains("deleted queue"), "{text}");
    let r = attempt(a_url, async |_| Ok(()));
    assert!(r.is_err(), "a's credentials still connect after node rm");
    let queues =
        String::from_utf8_lossy(&Command::new("rabbitmqctl").args(["-q", "list_queues", "-p", &vhost.name, "name"]).output().unwrap().stdout).to_string();
    assert!(!queues.lines().any(|l| l.trim() == format!("sync.node.{a}")), "{queues}");
    drop(nodes);
}
