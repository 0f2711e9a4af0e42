//! Offline work and reconciliation (issue 3): a node is cut off from the broker for real
//! (its TCP proxy drops every connection), keeps working, comes back, and every branch of
//! the rule ends with identical trees and the expected conflict files.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use system_tests::*;

fn text(n: &NodeProc, rel: &str) -> String {
    String::from_utf8(read(&n.p(rel)).unwrap_or_else(|| panic!("{rel} missing on {}", n.id))).unwrap()
}

fn wait_offline(c: &Cluster, n: &NodeProc) {
    eventually("the node to notice it is offline", DEADLINE, || !n.connected());
    eventually("the manager to mark the node offline", DEADLINE, || c.manager.status().lines().any(|l| l.starts_with(&n.id) && l.contains("offline")));
}

#[test]
fn every_branch_of_the_rule_after_an_offline_period() {
    let c = Cluster::start("offline", 3);
    let (a, b, off) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
    for f in [
        "only_off.txt",
        "only_else.txt",
        "both.txt",
        "same.txt",
        "del_here.txt",
        "del_there.txt",
        "meta.txt",
        "mode.txt",
        "written.txt",
        "stamped.txt",
        "del_mode.txt",
        "owned.txt",
    ] {
        write(&a.p(f), b"v1");
    }
    std::fs::create_dir(a.p("gone")).unwrap();
    write(&a.p("gone/old.txt"), b"old");
    c.converged();

    off.proxy.cut();
    wait_offline(&c, off);
    // The mount keeps working offline.
    write(&off.p("only_off.txt"), b"offline edit");
    write(&off.p("both.txt"), b"offline both");
    write(&off.p("same.txt"), b"identical");
    std::fs::remove_file(off.p("del_here.txt")).unwrap();
    std::fs::remove_file(off.p("del_mode.txt")).unwrap();
    write(&off.p("del_there.txt"), b"edited offline");
    write(&off.p("gone/new_offline.txt"), b"added offline");
    std::fs::set_permissions(off.p("meta.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(off.p("mode.txt"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(off.p("owned.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    write(&off.p("written.txt"), b"written offline");
    write(&off.p("stamped.txt"), b"written offline");
    let st = off.status();
    assert_eq!(st["connected"], false);
    assert!(st["pending_changes"].as_u64().unwrap() >= 6, "{st}");
    let (_, human, _) = off.syncctl(&["status"]);
    assert!(human.contains("offline"), "{human}");
    let (ok, _, err) = off.syncctl(&["sync"]);
    assert!(!ok, "sync must fail while the node is cut off");
    assert!(err.contains("not connected"), "{err}");

    // Meanwhile, elsewhere.
    write(&a.p("only_else.txt"), b"online edit");
    write(&b.p("both.txt"), b"online both");
    write(&b.p("same.txt"), b"identical");
    write(&a.p("del_here.txt"), b"edited online");
    std::fs::remove_file(a.p("del_there.txt")).unwrap();
    std::fs::remove_dir_all(b.p("gone")).unwrap();
    let touched = std::time::UNIX_EPOCH + std::time::Duration::from_secs(978_307_200); // 2001-01-01
    std::fs::File::open(a.p("meta.txt")).unwrap().set_modified(touched).unwrap();
    write(&b.p("mode.txt"), b"written online");
    std::fs::set_permissions(b.p("written.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::File::open(b.p("stamped.txt")).unwrap().set_modified(touched).unwrap();
    std::fs::set_permissions(a.p("del_mode.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(b.p("owned.txt"), Some(4321), None).unwrap();
    eventually("a and b to agree", DEADLINE, || snapshot(&a.mount) == snapshot(&b.mount) && !a.p("gone").exists());

    off.proxy.restore();
    off.wait_connected();
    let (ok, out, err) = off.syncctl(&["sync"]);
    assert!(ok, "sync after reconnecting: {err}");
    assert!(out.contains("pushed"), "{out}");
    c.converged();

    for n in &c.nodes {
        assert_eq!(text(n, "only_off.txt"), "offline edit", "changed only offline: pushed ({})", n.id);
        assert_eq!(text(n, "only_else.txt"), "online edit", "changed only elsewhere: pulled ({})", n.id);
        assert_eq!(text(n, "both.txt"), "online both", "changed on both: the others' version stays ({})", n.id);
        assert_eq!(text(n, "same.txt"), "identical");
        assert_eq!(text(n, "del_here.txt"), "edited online", "deleted offline, edited elsewhere: restored ({})", n.id);
        assert_eq!(text(n, "del_there.txt"), "edited offline", "edited offline, deleted elsewhere: kept ({})", n.id);
        assert_eq!(text(n, "gone/new_offline.txt"), "added offline", "file added offline in a directory deleted elsewhere: kept ({})", n.id);
        assert!(!n.p("gone/old.txt").exists());
        assert!(!n.p("del_mode.txt").exists(), "deleted offline, chmodded elsewhere: deleted ({})", n.id);
        let meta = std::fs::metadata(n.p("meta.txt")).unwrap();
        assert_eq!(
            (meta.permissions().mode() & 0o7777, meta.modified().unwrap()),
            (0o600, touched),
            "chmodded offline, touched elsewhere: both kept ({})",
            n.id
        );
        let text_and_mode = |f: &str| (text(n, f), std::fs::metadata(n.p(f)).unwrap().permissions().mode() & 0o7777);
        assert_eq!(text_and_mode("mode.txt"), ("written online".into(), 0o700), "chmodded offline, written elsewhere: both kept, no conflict file ({})", n.id);
        assert_eq!(
            text_and_mode("written.txt"),
            ("written offline".into(), 0o640),
            "written offline, chmodded elsewhere: both kept, no conflict file ({})",
            n.id
        );
        let owned = std::fs::metadata(n.p("owned.txt")).unwrap();
        assert_eq!((owned.permissions().mode() & 0o7777, owned.uid()), (0o600, 4321), "chmodded offline, chowned elsewhere: both kept ({})", n.id);
        let stamped = std::fs::metadata(n.p("stamped.txt")).unwrap().modified().unwrap();
        assert!(
            text(n, "stamped.txt") == "written offline" && stamped != touched,
            "written offline, touched elsewhere: the write with its own mtime, no conflict file ({})",
            n.id
        );
        let conflicts = conflict_files(&n.mount);
        assert_eq!(conflicts.len(), 1, "exactly one conflict file on {}: {conflicts:?}", n.id);
        assert!(conflicts[0].starts_with("both (conflict from n3 ") && conflicts[0].ends_with(").txt"), "{conflicts:?}");
        assert_eq!(text(n, &conflicts[0]), "offline both", "the offline version is kept in the conflict file");
    }
    let (ok, listed, _) = off.syncctl(&["conflicts"]);
    assert!(ok && listed.contains("both (conflict from n3"), "{listed}");
    assert!(c.manager.status().contains("conflicts: 1"), "{}", c.manager.status());
}

/// A node's queue drops its oldest messages past its length limit (a gigabyte, the
/// manager's policy; three messages here, by a policy that takes precedence) while the
/// node is away. What the node missed so (new files, edits, deletes, a renamed directory)
/// comes with the sync it runs when it reconnects, and what it wrote meanwhile goes out.
#[test]
fn a_node_whose_queue_dropped_messages_while_it_was_away_converges() {
    let c = Cluster::start("queue-drops", 2);
    let (a, away) = (&c.nodes[0], &c.nodes[1]);
    for i in 0..6 {
        write(&a.p(&format!("old{i}.txt")), b"v1");
    }
    std::fs::create_dir(a.p("dir")).unwrap();
    write(&a.p("dir/inside.txt"), b"inside");
    c.converged();
    let queue = format!("sync.node.{}", away.id);
    c.vhost.set_policy("test-tiny-node-queue", &format!("^{}$", queue.replace('.', "\\.")), r#"{"max-length":3,"overflow":"drop-head"}"#, 10);

    away.proxy.cut();
    wait_offline(&c, away);
    write(&away.p("written while away.txt"), b"from the node that was away");
    // One change at a time, each decided before the next: a message each on the queue
    // of the node away (changes together would go in a few).
    let decided = || eventually("the manager to decide a's change", DEADLINE, || a.pending() == 0);
    new_files_one_by_one(a, 20);
    write(&a.p("old0.txt"), b"edited");
    decided();
    std::fs::remove_file(a.p("old2.txt")).unwrap();
    decided();
    std::fs::remove_file(a.p("old3.txt")).unwrap();
    decided();
    std::fs::rename(a.p("dir"), a.p("moved")).unwrap();
    decided();
    // The broadcasts of a's changes went out before the decisions a waited for: at least
    // 24 messages were published to the queue of the node away, which kept three.
    // (The broker's message counts lag behind by a few seconds.)
    let kept_three = || (1..=3).contains(&queue_depth(&c.vhost, &queue));
    eventually(
        "the queue of the node away to hold at most its last three messages (else the policy did not apply, and this test shows nothing)",
        DEADLINE,
        kept_three,
    );

    away.proxy.restore();
    away.wait_connected();
    c.converged();
    for n in &c.nodes {
        assert_eq!(text(n, "old0.txt"), "edited", "on {}", n.id);
        assert_eq!(text(n, "new0.txt"), "new 0", "on {}", n.id);
        assert_eq!(text(n, "new19.txt"), "new 19", "on {}", n.id);
        assert!(!n.p("old2.txt").exists() && !n.p("old3.txt").exists(), "deletes the queue dropped came with the sync on {}", n.id);
        assert!(!n.p("dir").exists() && text(n, "moved/inside.txt") == "inside", "the rename on {}", n.id);
        assert_eq!(text(n, "written while away.txt"), "from the node that was away", "on {}", n.id);
    }
}

/// Writes `new0.txt` .. `new{n-1}.txt` ("new i") on `a`, each decided before the next:
/// a message each on the other nodes' queues (changes together would go in a few).
fn new_files_one_by_one(a: &NodeProc, n: usize) {
    for i in 0..n {
        write(&a.p(&format!("new{i}.txt")), format!("new {i}").as_bytes());
        eventually("the manager to decide a's change", DEADLINE, || a.pending() == 0);
    }
}

/// (ready, unacknowledged) messages in a queue of the vhost.
fn ready_and_unacked(c: &Cluster, queue: &str) -> (u64, u64) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "-p", &c.vhost.name, "name", "messages_ready", "messages_unacknowledged"])
        .output()
        .expect("rabbitmqctl");
    let counts = String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() == 3 && f[0] == queue).then(|| Some((f[1].parse().ok()?, f[2].parse().ok()?)))?
    });
    counts.unwrap_or((0, 0))
}

/// A node's queue drops its oldest messages while the node is still connected (frozen,
/// or too slow to keep up: a real queue's limit is a gigabyte). The broker dead-letters
/// each into `sync.dead`, and a copy reaches the manager on `sync.drops`: it asks the
/// node to sync; the node sends again what it has not seen decided, and takes
/// what it missed.
#[test]
fn a_connected_node_whose_queue_dropped_messages_is_asked_to_sync_and_converges() {
    let mut c = Cluster::start("queue-drops-connected", 2);
    // Frozen below for as long as 80 decisions take (well over the harness's 5 s
    // heartbeats on a loaded machine): with 60 s heartbeats the broker keeps its
    // connection open, which is the case this test is about.
    c.nodes[1].restart_with_heartbeat(60);
    let (a, slow) = (&c.nodes[0], &c.nodes[1]);
    write(&a.p("old.txt"), b"v1");
    write(&a.p("gone.txt"), b"to be deleted");
    c.converged();
    let queue = format!("sync.node.{}", slow.id);
    c.vhost.set_policy("test-tiny-node-queue", &format!("^{}$", queue.replace('.', "\\.")), r#"{"max-length":3,"overflow":"drop-head"}"#, 10);

    let pid = slow.pid().expect("running") as i32;
    // Frozen, its connection stays open: the broker hands it up to its prefetch (64)
    // and keeps the rest ready, where the limit applies. (Nothing may look at its
    // mount until it thaws.)
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let thaw = Thaw(pid);
    let decided = || eventually("the manager to decide a's change", DEADLINE, || a.pending() == 0);
    const FILES: usize = 80;
    new_files_one_by_one(a, FILES);
    write(&a.p("old.txt"), b"edited");
    decided();
    std::fs::remove_file(a.p("gone.txt")).unwrap();
    decided();
    eventually(
        "the frozen node's queue to hold at most three ready messages beyond what it was handed (else the policy did not apply, and this test shows nothing)",
        DEADLINE,
        || {
            let (ready, unacked) = ready_and_unacked(&c, &queue);
            (1..=3).contains(&ready) && unacked > 0 && ready + unacked < FILES as u64
        },
    );
    drop(thaw);
    c.converged();
    for n in &c.nodes {
        assert_eq!(text(n, "old.txt"), "edited", "on {}", n.id);
        for i in [0, FILES / 2, FILES - 1] {
            assert_eq!(text(n, &format!("new{i}.txt")), format!("new {i}"), "on {}", n.id);
        }
        assert!(!n.p("gone.txt").exists(), "the delete on {}", n.id);
    }
}

/// Sends SIGCONT to a process when dropped (also when the test fails).
struct Thaw(i32);

impl Drop for Thaw {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

#[test]
fn a_node_restarted_while_offline_keeps_its_changes() {
    let mut c = Cluster::start("restart-offline", 2);
    write(&c.nodes[0].p("base.txt"), b"base");
    c.converged();
    c.nodes[1].proxy.cut();
    eventually("node to go offline", DEADLINE, || !c.nodes[1].connected());
    write(&c.nodes[1].p("written offline.txt"), b"survives a restart");
    write(&c.nodes[1].p("base.txt"), b"edited offline");
    c.nodes[1].restart();
    let st = c.nodes[1].status();
    assert_eq!(st["connected"], false, "still cut off after the restart");
    assert!(st["pending_changes"].as_u64().unwrap() >= 2, "{st}");
    assert_eq!(read(&c.nodes[1].p("written offline.txt")).unwrap(), b"survives a restart");
    c.nodes[1].proxy.restore();
    c.converged();
    assert_eq!(read(&c.nodes[0].p("written offline.txt")).unwrap(), b"survives a restart");
    assert_eq!(read(&c.nodes[0].p("base.txt")).unwrap(), b"edited offline");
}

#[test]
fn concurrent_online_edits_become_a_conflict_not_an_overwrite() {
    let mut c = Cluster::start("concurrent", 2);
    write(&c.nodes[0].p("doc.txt"), b"original");
    c.converged();
    // Both nodes stay connected to the broker; with the manager paused, both updates are
    // based on the same revision when it decides them.
    c.manager.stop();
    write(&c.nodes[0].p("doc.txt"), b"from n1");
    write(&c.nodes[1].p("doc.txt"), b"from n2");
    c.manager.restart();
    c.converged();
    let a = &c.nodes[0];
    let body = read(&a.p("doc.txt")).unwrap();
    let conflicts = conflict_files(&a.mount);
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    let copy = read(&a.p(&conflicts[0])).unwrap();
    let mut both = vec![body, copy];
    both.sort();
    assert_eq!(both, vec![b"from n1".to_vec(), b"from n2".to_vec()], "neither write is lost");
}
