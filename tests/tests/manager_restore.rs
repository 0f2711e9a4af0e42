//! The manager's database brought back from an older copy (a backup restored after its
//! disk failed) while the nodes stay up: it lost every decision made after the copy, but
//! the nodes have them. Nothing the nodes have here is lost or reverted, the manager learns
//! the lost states from them, and what is changed afterwards reaches every node, a node
//! that joins afterwards included (docs/protocol.md, *A manager behind its nodes*). And
//! the database does not keep every decided change's record for ever. Real broker, real
//! mounts, real processes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;
use system_tests::*;

const DEADLINE: Duration = Duration::from_secs(90);

/// The manager's database files (`manager.db` and its WAL, if any) copied to `to`.
fn copy_database(db: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let from = Path::new(&format!("{}{suffix}", db.display())).to_path_buf();
        let target = to.join(format!("manager.db{suffix}"));
        let _ = std::fs::remove_file(&target);
        if from.exists() {
            std::fs::copy(&from, &target).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
        }
    }
}

/// The copy at `from` put back in place of the manager's database.
fn restore_database(from: &Path, db: &Path) {
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    copy_database(&from.join("manager.db"), db.parent().unwrap());
}

fn text(p: &Path) -> Option<String> {
    read(p).map(|b| String::from_utf8_lossy(&b).into_owned())
}

#[test]
fn a_manager_brought_back_from_an_older_copy_of_its_database_loses_nothing_and_decides_on() {
    let mut c = Cluster::start("restore", 2);
    let n1 = &c.nodes[0];
    write(&n1.p("edited.txt"), b"v1");
    write(&n1.p("deleted.txt"), b"to be deleted");
    write(&n1.p("kept.txt"), b"never changed");
    std::fs::create_dir(n1.p("dir")).unwrap();
    write(&n1.p("dir/x.txt"), b"x1");
    c.converged();

    // The copy (a backup), taken while the manager is stopped.
    let backup = c.dir.path().join("backup");
    c.manager.stop();
    copy_database(&c.manager.db, &backup);
    c.manager.restart();

    // What the cluster does after the copy: decided by the manager, then lost with it.
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    write(&n1.p("edited.txt"), b"v2");
    std::fs::remove_file(n1.p("deleted.txt")).unwrap();
    write(&n1.p("created.txt"), b"created after the copy");
    std::fs::create_dir(n1.p("later")).unwrap();
    write(&n1.p("later/y.txt"), b"y");
    write(&n2.p("dir/x.txt"), b"x2");
    std::fs::set_permissions(n2.p("dir"), std::fs::Permissions::from_mode(0o750)).unwrap();
    c.converged();
    let before = snapshot(&c.nodes[0].mount);

    // The disk fails; the copy comes back. The nodes stay up and connected throughout.
    c.manager.stop();
    restore_database(&backup, &c.manager.db);
    c.manager.restart();

    // The manager finds out from the nodes (their heartbeats name revisions it never
    // gave) and asks them to sync; they send what it lost. Nothing reverts on them.
    eventually("the manager says it caught up with its nodes", DEADLINE, || c.manager.status().contains("caught up"));
    c.converged_within(DEADLINE);
    assert_eq!(snapshot(&c.nodes[0].mount), before, "the nodes keep every state decided after the copy");

    // Changes made after the restore go everywhere, on paths the copy had at older
    // states, on paths it never had, and on paths it has that were deleted since.
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    write(&n2.p("edited.txt"), b"v3");
    write(&n1.p("created.txt"), b"created, then edited after the restore");
    write(&n2.p("later/y.txt"), b"y2");
    write(&n1.p("deleted.txt"), b"made again");
    c.converged_within(DEADLINE);

    // A node that joins now sees what the others see: the manager has every lost state.
    let n3 = c.add_node("n3");
    c.nodes[n3].wait_connected();
    c.converged_within(DEADLINE);
    for n in &c.nodes {
        let at = |p: &str| text(&n.p(p));
        assert_eq!(at("edited.txt").as_deref(), Some("v3"), "on {}", n.id);
        assert_eq!(at("created.txt").as_deref(), Some("created, then edited after the restore"), "on {}", n.id);
        assert_eq!(at("later/y.txt").as_deref(), Some("y2"), "on {}", n.id);
        assert_eq!(at("deleted.txt").as_deref(), Some("made again"), "on {}", n.id);
        assert_eq!(at("kept.txt").as_deref(), Some("never changed"), "on {}", n.id);
        assert_eq!(at("dir/x.txt").as_deref(), Some("x2"), "on {}", n.id);
        let mode = std::fs::metadata(n.p("dir")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o750, "dir's mode on {}", n.id);
        assert_eq!(conflict_files(&n.mount), Vec::<String>::new(), "no conflict on {}", n.id);
    }
}

/// The manager's database lost altogether (no copy at all): a manager started on a new,
/// empty database learns the whole tree from the nodes, and a node that joins then
/// gets all of it.
#[test]
fn a_manager_started_anew_on_an_empty_database_learns_the_tree_from_its_nodes() {
    let mut c = Cluster::start("anew", 2);
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    std::fs::create_dir_all(n1.p("a/b")).unwrap();
    for i in 0..20 {
        write(&n1.p(&format!("a/b/f{i}")), format!("file {i}").as_bytes());
    }
    write(&n2.p("top.txt"), b"top");
    std::fs::remove_file(n1.p("a/b/f7")).unwrap();
    std::os::unix::fs::symlink("a/b/f1", n2.p("link")).unwrap();
    c.converged();
    let before = snapshot(&c.nodes[0].mount);

    c.manager.stop();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", c.manager.db.display()));
    }
    c.manager.restart();
    // (`manager status` opens the database while the manager may be making it anew.)
    eventually("the manager says it caught up", DEADLINE, || c.manager.status().contains("caught up"));
    c.converged_within(DEADLINE);
    assert_eq!(snapshot(&c.nodes[0].mount), before, "nothing reverts or goes away on the nodes");

    write(&c.nodes[1].p("a/b/f3"), b"edited after");
    let n3 = c.add_node("n3");
    c.nodes[n3].wait_connected();
    c.converged_within(DEADLINE);
    assert_eq!(text(&c.nodes[n3].p("a/b/f3")).as_deref(), Some("edited after"));
    assert_eq!(text(&c.nodes[n3].p("a/b/f0")).as_deref(), Some("file 0"));
    assert!(!c.nodes[n3].p("a/b/f7").exists(), "a file deleted before stays deleted");
    assert_eq!(conflict_files(&c.nodes[n3].mount), Vec::<String>::new());
}

/// Two nodes hold different lost states of one path: n1 the older (it missed the later
/// one's broadcast: its queue dropped it, as past its length limit) and syncs first. The
/// state it sends is marked as coming from its lost revision; n2, holding a later one,
/// sends that instead of taking n1's, and it wins, as it had on the lost database.
#[test]
fn a_later_lost_state_wins_over_an_older_one_sent_first() {
    let mut c = Cluster::start("restore-two", 2);
    write(&c.nodes[0].p("p.txt"), b"v0");
    c.converged();
    let backup = c.dir.path().join("backup");
    c.manager.stop();
    copy_database(&c.manager.db, &backup);
    c.manager.restart();

    write(&c.nodes[0].p("p.txt"), b"older, from n1");
    c.converged();
    c.nodes[0].stop();
    write(&c.nodes[1].p("p.txt"), b"later, from n2");
    eventually("n2's edit decided", DEADLINE, || c.nodes[1].pending() == 0);
    // n1's queue loses the broadcast of n2's edit.
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "purge_queue", "-p", &c.vhost.name, &wire::topology::node_queue(&"n1".parse().unwrap())])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.nodes[1].stop();

    c.manager.stop();
    restore_database(&backup, &c.manager.db);
    c.manager.restart();
    c.nodes[0].restart();
    c.nodes[0].wait_connected();
    eventually("n1 sent its lost state", DEADLINE, || c.nodes[0].pending() == 0 && c.manager.status().contains("caught up"));
    c.nodes[1].restart();
    c.nodes[1].wait_connected();
    c.converged_within(DEADLINE);
    for n in &c.nodes {
        assert_eq!(text(&n.p("p.txt")).as_deref(), Some("later, from n2"), "on {}", n.id);
        assert_eq!(conflict_files(&n.mount), Vec::<String>::new(), "on {}", n.id);
    }
}

/// The manager's record of each decided change (its message id and outcome, which answer
/// the change sent again) does not grow for ever: once older than
/// `--remember-decisions-for` and once its node has said it has nothing undecided while
/// it had taken a later revision, it is forgotten. The decisions' count by outcome
/// (`/api/status`, `/metrics`) goes on counting them, and the cluster goes on as before.
#[test]
fn records_of_decided_changes_are_forgotten_once_every_node_settled() {
    let mut c = Cluster::start("forget-decided", 2);
    c.manager.stop();
    c.manager = ManagerProc::start_with(c.dir.path(), &c.vhost.url(), &["--remember-decisions-for", "1s"]);
    for n in &c.nodes {
        n.wait_connected();
    }
    for i in 0..300 {
        write(&c.nodes[0].p(&format!("f{i:03}")), format!("{i}").as_bytes());
    }
    c.converged();
    // n1's last decisions are forgotten once it takes a revision past them.
    write(&c.nodes[1].p("from-n2"), b"n2");
    c.converged();
    let records = || -> i64 {
        let db = rusqlite::Connection::open_with_flags(&c.manager.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        db.query_row("SELECT count(*) FROM applied", [], |r| r.get(0)).unwrap()
    };
    assert!(records() >= 300, "every decision recorded at first");
    eventually("the records of settled nodes' decisions forgotten", DEADLINE, || records() <= 1);
    let (api, token) = c.manager.api();
    let status: serde_json::Value = serde_json::from_slice(&http_get(&format!("{api}/api/status"), Some(&token)).1).unwrap();
    assert_eq!(status["changes_decided"]["accepted"], 301, "the forgotten decisions still counted: {status}");

    // The cluster goes on: an edit of a file whose creation's record is gone, and a delete.
    write(&c.nodes[1].p("f000"), b"edited by n2");
    std::fs::remove_file(c.nodes[0].p("f001")).unwrap();
    c.converged();
    assert_eq!(read(&c.nodes[0].p("f000")).as_deref(), Some(&b"edited by n2"[..]));
    assert!(conflict_files(&c.nodes[0].mount).is_empty());
}

/// A cluster of two nodes whose manager keeps old versions, deletes and decisions'
/// records a second only; node n1 has written `count` files `{prefix}NNN` that n2 has
/// too, then n2 is stopped, n1 deletes the first half and writes `later` (a revision
/// after the deletes), and the records of the deletes are forgotten: the forgetting pass
/// that forgot them (at least a second old) found the deletes old enough too.
fn deletes_while_n2_is_away(name: &str, prefix: &str, count: usize) -> Cluster {
    let mut c = Cluster::start(name, 2);
    c.manager.stop();
    c.manager = ManagerProc::start_with(c.dir.path(), &c.vhost.url(), &FORGET_SOON);
    for n in &c.nodes {
        n.wait_connected();
    }
    for i in 0..count {
        write(&c.nodes[0].p(&format!("{prefix}{i:03}")), format!("{i}").as_bytes());
    }
    c.converged();
    c.nodes[1].stop();
    for i in 0..count / 2 {
        std::fs::remove_file(c.nodes[0].p(&format!("{prefix}{i:03}"))).unwrap();
    }
    write(&c.nodes[0].p("later"), b"later");
    eventually("the deletes decided", DEADLINE, || tombstones(&c) == count as i64 / 2 && c.nodes[0].pending() == 0);
    eventually("the records of the deletes forgotten", DEADLINE, || query(&c, "SELECT count(*) FROM applied") <= 1);
    c
}

/// The manager's flags of [`deletes_while_n2_is_away`]: decisions' records and deleted
/// versions kept a second.
const FORGET_SOON: [&str; 4] = ["--remember-decisions-for", "1s", "--keep-for", "1s"];

/// One number from the manager's database.
fn query(c: &Cluster, sql: &str) -> i64 {
    let db = rusqlite::Connection::open_with_flags(&c.manager.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    db.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn tombstones(c: &Cluster) -> i64 {
    query(c, "SELECT count(*) FROM paths WHERE version IS NULL")
}

/// Nor does it keep every deleted path's tombstone for ever: one goes once every node
/// said in a sync or a heartbeat that it applied the delete and the delete is older than the
/// retention. A node away holds them (back, it deletes its copies instead of sending
/// them as new files); once it has synced they go, and a file made again at such a path
/// syncs as any new file (docs/sync.md, *When a tombstone goes*).
#[test]
fn deletes_are_forgotten_once_every_node_applied_them() {
    let mut c = deletes_while_n2_is_away("forget-deletes", "d", 100);
    assert_eq!(tombstones(&c), 50, "a node away has not applied the deletes");

    c.nodes[1].restart();
    c.nodes[1].wait_connected();
    c.converged();
    for i in 0..100 {
        assert_eq!(c.nodes[1].p(&format!("d{i:03}")).exists(), i >= 50, "d{i:03} on the node that was away");
    }
    eventually("the tombstones forgotten once both nodes applied them", DEADLINE, || tombstones(&c) == 0);
    assert_eq!(query(&c, "SELECT value FROM meta WHERE key = 'forgotten_deletes'"), 50);

    // A path whose delete was forgotten takes a new file as any other path, and a node
    // restarted brings back nothing that was deleted.
    write(&c.nodes[1].p("d000"), b"made again");
    c.nodes[0].restart();
    c.nodes[0].wait_connected();
    c.converged();
    assert_eq!(read(&c.nodes[0].p("d000")).as_deref(), Some(&b"made again"[..]));
    assert!(!c.nodes[0].p("d001").exists() && !c.nodes[1].p("d001").exists(), "a forgotten delete stays a delete");
    assert!(conflict_files(&c.nodes[0].mount).is_empty());
}

/// Nor does a node keep the revision of every path it saw deleted: one goes once a sync
/// that completed at least `--forget-deletes-after` ago covered it (here no wait at
/// all), also across a restart; a node with the default wait keeps them. A path whose
/// revision was forgotten takes a new file from either side as any new path
/// (docs/sync.md, *What a node forgets*).
#[test]
fn a_node_forgets_the_revisions_of_deleted_paths_after_a_completed_sync() {
    let mut c = Cluster::start("forget-revisions", 1);
    let n2 = NodeProc::start_with(c.dir.path(), "n2", &c.vhost, &["--forget-deletes-after", "0s"]);
    n2.wait_connected();
    c.nodes.push(n2);
    let kept = |n: &NodeProc| n.status()["revisions_kept"].as_u64().unwrap();
    std::fs::create_dir(c.nodes[0].p("tmp")).unwrap();
    for i in 0..100 {
        write(&c.nodes[0].p(&format!("tmp/t{i:03}")), format!("scratch {i}").as_bytes());
    }
    write(&c.nodes[0].p("keep"), b"kept");
    c.converged();
    std::fs::remove_dir_all(c.nodes[0].p("tmp")).unwrap();
    c.converged();
    assert!(kept(&c.nodes[1]) >= 102, "the deletes' revisions are kept until a sync covers them: {}", kept(&c.nodes[1]));

    let (ok, out, err) = c.nodes[1].syncctl(&["sync"]);
    assert!(ok, "syncctl sync: {out} {err}");
    eventually("n2 to keep only the live path's revision", DEADLINE, || kept(&c.nodes[1]) == 1);
    let (ok, out, err) = c.nodes[0].syncctl(&["sync"]);
    assert!(ok, "syncctl sync: {out} {err}");
    assert!(kept(&c.nodes[0]) >= 102, "n1 waits 30 days: {}", kept(&c.nodes[0]));

    c.nodes[1].restart();
    c.nodes[1].wait_connected();
    c.converged();
    assert_eq!(kept(&c.nodes[1]), 1, "forgotten for good, not brought back by a restart");
    // Made again on either side, a forgotten path syncs as a new one.
    std::fs::create_dir(c.nodes[1].p("tmp")).unwrap();
    write(&c.nodes[1].p("tmp/t000"), b"again from n2");
    write(&c.nodes[0].p("tmp2"), b"new on n1");
    c.converged();
    assert_eq!(read(&c.nodes[0].p("tmp/t000")).as_deref(), Some(&b"again from n2"[..]));
    assert!(!c.nodes[0].p("tmp/t001").exists() && !c.nodes[1].p("tmp/t001").exists(), "a forgotten delete stays a delete");
    assert!(conflict_files(&c.nodes[0].mount).is_empty());
}

/// `manager serve --forget-nodes-after`: a node silent for longer (while the manager
/// served) is forgotten on its own, as by `manager node forget` (its deletes go, and its
/// queue), while a node connected all along is not; back, the forgotten one says why it
/// is refused.
#[test]
fn a_node_silent_for_longer_than_the_setting_is_forgotten_on_its_own() {
    let mut c = deletes_while_n2_is_away("forget-silent", "s", 20);
    assert_eq!(tombstones(&c), 10, "the node away holds them");
    c.manager.stop();
    c.manager = ManagerProc::start_with(c.dir.path(), &c.vhost.url(), &[&FORGET_SOON[..], &["--forget-nodes-after", "10s"]].concat());
    let forgotten = |c: &Cluster, id: &str| query(c, &format!("SELECT count(*) FROM forgotten_nodes WHERE id = '{id}'")) == 1;
    eventually("n2 forgotten for its silence", DEADLINE, || forgotten(&c, "n2"));
    eventually("the deletes it held back forgotten", DEADLINE, || tombstones(&c) == 0);
    let n2_queue = wire::topology::node_queue(&"n2".parse().unwrap());
    eventually("its queue deleted", DEADLINE, || !queues(&c.vhost).iter().any(|(name, _)| *name == n2_queue));
    assert!(!forgotten(&c, "n1"), "n1 was heard of all along");

    c.nodes[1].restart();
    eventually("the forgotten node to say so", DEADLINE, || c.nodes[1].status()["forgotten"].as_str().is_some_and(|r| r.contains("forgot this node")));
    for i in 0..10 {
        assert!(!c.nodes[0].p(&format!("s{i:03}")).exists(), "s{i:03} came back");
    }
}

/// A node gone for good holds the deletes made since its last sync; the operator's
/// `manager node forget` lets them go, deletes the node's queue, and from then on the
/// manager refuses (dead-letters) whatever that node sends: started again with its old
/// data, it cannot bring back a file deleted while it was away, and it says why.
#[test]
fn a_node_forgotten_by_the_operator_holds_nothing_back_and_is_refused() {
    let mut c = deletes_while_n2_is_away("forget-node", "g", 20);
    assert_eq!(tombstones(&c), 10, "the node away holds them");

    let out =
        std::process::Command::new(bin("manager")).args(["node", "forget", "n2", "--broker", &c.vhost.url(), "--db"]).arg(&c.manager.db).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "manager node forget failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("forgot n2") && said.contains("deleted queue sync.node.n2"), "{said}");
    eventually("the deletes forgotten once the node away is", DEADLINE, || tombstones(&c) == 0);
    let again = std::process::Command::new(bin("manager")).args(["node", "forget", "n9", "--db"]).arg(&c.manager.db).output().unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("no node n9"), "an id never seen is refused");

    // Back with its old data: refused, and the files deleted meanwhile stay deleted.
    c.nodes[1].restart();
    eventually("the forgotten node's sync dead-lettered", DEADLINE, || queue_depth(&c.vhost, wire::topology::DEAD_QUEUE) >= 1);
    assert_eq!(query(&c, "SELECT count(*) FROM nodes WHERE id = 'n2'"), 0, "not known again");
    let refused = |n: &NodeProc| n.status()["forgotten"].as_str().map(str::to_string);
    eventually("the forgotten node to say so", DEADLINE, || refused(&c.nodes[1]).is_some_and(|r| r.contains("forgot this node")));
    let (ok, out, err) = c.nodes[1].syncctl(&["sync"]);
    assert!(!ok && err.contains("forgot this node"), "syncctl sync on a forgotten node: {out} {err}");
    let (_, out, _) = c.nodes[1].syncctl(&["status"]);
    assert!(out.contains("refused by the manager") && out.contains("every file is still in this mount"), "{out}");
    write(&c.nodes[0].p("after"), b"after");
    eventually("n1's later file decided", DEADLINE, || c.nodes[0].pending() == 0);
    for i in 0..10 {
        assert!(!c.nodes[0].p(&format!("g{i:03}")).exists(), "g{i:03} came back");
    }
    assert_eq!(query(&c, "SELECT count(*) FROM paths WHERE version IS NOT NULL AND path LIKE 'g%'"), 10);
}
