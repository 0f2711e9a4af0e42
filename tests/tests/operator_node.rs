//! What an operator running a node sees: quiet logs for operations the node does not
//! implement, plain-text log files, a clean unmount on every terminating signal, a stuck
//! manager that says so, and a node or manager started twice by mistake that stays out
//! of the way and says why.

use std::process::Command;
use std::time::Duration;
use system_tests::*;

/// Python's `open` asks every file whether it is a terminal (`ioctl(TCGETS)`): the node
/// answers `ENOTTY`, as a local file system does, and logs nothing about it.
#[test]
fn unimplemented_ioctls_answer_enotty_quietly() {
    let c = Cluster::start("quietops", 1);
    let n = &c.nodes[0];
    write(&n.p("t.txt"), b"hello\n");
    let script = r#"
import errno, fcntl, os, sys, termios
p = sys.argv[1]
for _ in range(50):
    with open(p) as f:
        f.read()
fd = os.open(p, os.O_RDONLY)
assert not os.isatty(fd)
try:
    fcntl.ioctl(fd, termios.TCGETS, bytes(64))
    print("ioctl succeeded")
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
"#;
    let out = Command::new("python3").arg("-c").arg(script).arg(n.p("t.txt")).output().expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ENOTTY");
    // And `cp` (copy_file_range), `fallocate` and SEEK_DATA take their fallbacks quietly.
    let copied = n.p("copy.txt");
    assert!(Command::new("cp").arg(n.p("t.txt")).arg(&copied).status().unwrap().success());
    assert_eq!(read(&copied).as_deref(), Some(&b"hello\n"[..]));
    let _ = Command::new("fallocate").args(["-l", "4096"]).arg(n.p("fa.bin")).status();
    let log = std::fs::read_to_string(&n.log).unwrap();
    for noise in ["Not Implemented", "ioctl", "copy_file_range", "fallocate"] {
        assert!(!log.contains(noise), "the node's log mentions {noise:?}:\n{log}");
    }
}

/// Log files get no ANSI colour codes (the node's stderr is a file here, not a terminal).
#[test]
fn log_files_carry_no_colour_codes() {
    let c = Cluster::start("nocolour", 1);
    write(&c.nodes[0].p("x"), b"x");
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    assert!(log.contains("INFO"), "the node logged nothing at info:\n{log}");
    assert!(!log.contains('\x1b'), "the node's log has escape codes:\n{log:?}");
    let mlog = std::fs::read_to_string(&c.manager.log).unwrap();
    assert!(!mlog.contains('\x1b'), "the manager's log has escape codes:\n{mlog:?}");
}

/// Closing the terminal (SIGHUP) or Ctrl-\ (SIGQUIT) ends the node like SIGTERM: it
/// unmounts, exits with success, and keeps what was written.
#[test]
fn every_terminating_signal_unmounts() {
    let mut c = Cluster::start("signals", 1);
    for (name, sig) in [("SIGHUP", libc::SIGHUP), ("SIGQUIT", libc::SIGQUIT), ("SIGINT", libc::SIGINT), ("SIGTERM", libc::SIGTERM)] {
        let n = &mut c.nodes[0];
        let file = format!("before-{name}.txt");
        write(&n.p(&file), name.as_bytes());
        let status = n.signal_and_wait(sig);
        assert!(status.success(), "after {name} the node exited with {status:?}");
        assert!(!is_mounted(&n.mount), "after {name} the mount is still there");
        std::fs::read_dir(&n.mount).unwrap_or_else(|e| panic!("after {name} the mount point is unusable: {e}"));
        n.restart();
        assert_eq!(read(&n.p(&file)).as_deref(), Some(name.as_bytes()), "{file} after the restart");
    }
}

/// A manager that cannot make progress (here: its database is locked by another process)
/// says so — log, `/api/health`, `manager status` — and its nodes do not look online on
/// the strength of old heartbeats; once the lock goes, it catches up and loses nothing.
#[test]
fn a_stuck_manager_says_so_and_recovers_without_losing_anything() {
    let c = Cluster::start("stuck", 1);
    let n = &c.nodes[0];
    let (api, token) = c.manager.api();
    eventually("the manager's liveness file", DEADLINE, || c.manager.status().contains("manager: making progress"));
    assert_eq!(http_get(&format!("{api}/api/health"), Some(&token)).0, 200);
    eventually("n1 online", DEADLINE, || c.manager.status().lines().any(|l| l.starts_with("n1 ") && l.contains(" online ")));

    let lock = rusqlite::Connection::open(&c.manager.db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    write(&n.p("while-stuck.txt"), b"written while the manager is stuck");
    eventually("n1 shown offline once its heartbeats are not recorded", DEADLINE, || {
        c.manager.status().lines().any(|l| l.starts_with("n1 ") && l.contains(" offline "))
    });
    eventually("the manager to say it is stuck", Duration::from_secs(90), || {
        let (status, body) = http_get(&format!("{api}/api/health"), Some(&token));
        status == 503
            && String::from_utf8_lossy(&body).contains("\"ok\":false")
            && String::from_utf8_lossy(&body).contains("database is locked")
            && c.manager.status().contains("WARNING: no progress")
            && std::fs::read_to_string(&c.manager.log).unwrap().contains("it is stuck")
    });
    assert!(n.pending() > 0, "the change was decided while the database was locked");

    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    eventually("the change decided after the lock went", DEADLINE, || n.pending() == 0);
    eventually("the manager healthy again", DEADLINE, || http_get(&format!("{api}/api/health"), Some(&token)).0 == 200);
    eventually("n1 online again", DEADLINE, || c.manager.status().lines().any(|l| l.starts_with("n1 ") && l.contains(" online ")));
    assert_eq!(queue_depth(&c.vhost, wire::topology::DEAD_QUEUE), 0, "a message was dead-lettered because the database was locked");
    assert!(c.manager.status().contains("files: 1"), "{}", c.manager.status());
}

/// Publishing the outbox is work under the manager's stall clock. Here a decision waits in
/// the outbox while the database is locked: each broker session starts by publishing it,
/// and fails removing it (a write), before any other work can start; the manager must
/// still say it is stuck, and once the lock goes it publishes and empties the outbox.
/// (Before the outbox flush was timed, the clock never started and the manager said
/// nothing; the test of a locked database above met this only by chance.)
#[test]
fn a_manager_stuck_publishing_its_outbox_says_so() {
    let dir = tempfile::Builder::new().prefix("syncfs-stuck-outbox-").tempdir().unwrap();
    let vhost = Vhost::new("stuck-outbox");
    let proxy = BrokerProxy::start();
    let mut m = ManagerProc::start(dir.path(), &format!("amqp://guest:guest@127.0.0.1:{}/{}?heartbeat=5", proxy.port, vhost.name));
    let log = |m: &ManagerProc| std::fs::read_to_string(&m.log).unwrap_or_default();
    eventually("the manager to consume its queue", DEADLINE, || log(&m).contains("consuming sync.update"));
    let (api, token) = m.api();
    let health = || http_get(&format!("{api}/api/health"), Some(&token));
    assert_eq!(health().0, 200);

    // Away from the broker, the manager does no database work at all.
    proxy.cut();
    eventually("the manager to lose the broker", DEADLINE, || log(&m).contains("broker session ended"));
    let db = rusqlite::Connection::open(&m.db).unwrap();
    let id = wire::MessageId::try_from("stuck-outbox-0001".to_string()).unwrap();
    let env = wire::Envelope::new(id, wire::NodeId::manager(), wire::ToNode::SyncRequested {});
    db.execute("INSERT INTO outbox(key, id, payload) VALUES(?1, ?2, ?3)", rusqlite::params![wire::topology::BROADCAST_KEY, env.id.as_str(), env.encode()])
        .unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    proxy.restore();
    eventually("the manager to say it is stuck", Duration::from_secs(90), || {
        let (status, body) = health();
        status == 503 && String::from_utf8_lossy(&body).contains("\"ok\":false") && log(&m).contains("it is stuck")
    });

    db.execute_batch("COMMIT").unwrap();
    drop(db);
    eventually("the manager healthy again", DEADLINE, || health().0 == 200);
    let outbox = || rusqlite::Connection::open(&m.db).unwrap().query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0)).unwrap();
    eventually("the outbox published and emptied", DEADLINE, || outbox() == 0);
    m.stop();
}

/// A second node with the same id (a cloned machine, a second mount started by mistake)
/// would take every other message of the node's queue, and both would diverge. The
/// broker refuses its consumer: it works offline and says why, the first one goes on
/// unharmed, and once the first is gone the second takes its place.
#[test]
fn a_node_started_twice_stays_offline_and_says_why() {
    let mut c = Cluster::start("twice-node", 2);
    let other = tempfile::Builder::new().prefix("syncfs-twice-node-").tempdir().unwrap();
    let twin = NodeProc::start(other.path(), "n1", &c.vhost);
    eventually("the second n1 to say why it is offline", DEADLINE, || {
        twin.status()["offline_because"].as_str().is_some_and(|why| why.contains("is node n1 running elsewhere too?"))
    });
    assert!(!twin.connected(), "two n1 consume one queue");

    // The first n1 misses nothing meanwhile.
    for i in 0..30 {
        write(&c.nodes[1].p(&format!("from-n2-{i:02}")), format!("{i}").as_bytes());
    }
    write(&c.nodes[0].p("from-n1"), b"n1");
    c.converged();
    for i in 0..30 {
        assert_eq!(read(&c.nodes[0].p(&format!("from-n2-{i:02}"))), Some(format!("{i}").into_bytes()), "from-n2-{i:02} on the first n1");
    }
    assert!(!twin.connected(), "the second n1 got in while the first ran");

    // The first one stops: the second takes its place and gets the tree.
    c.nodes[0].stop();
    twin.wait_connected();
    eventually("the second n1 to show the tree", DEADLINE, || read(&twin.p("from-n2-29")).is_some() && read(&twin.p("from-n1")).is_some());
}

/// A second manager on the same broker (another database) would decide every other
/// change and assign the same revisions. The broker refuses its consumer: it decides
/// nothing and says why; the first goes on unharmed.
#[test]
fn a_second_manager_decides_nothing_and_says_why() {
    let c = Cluster::start("twice-manager", 2);
    let other = tempfile::Builder::new().prefix("syncfs-twice-manager-").tempdir().unwrap();
    let second = ManagerProc::start(other.path(), &c.vhost.url());
    eventually("the second manager to say why it decides nothing", DEADLINE, || {
        std::fs::read_to_string(&second.log).unwrap_or_default().contains("is another manager running on this broker?")
    });
    for i in 0..30 {
        write(&c.nodes[0].p(&format!("f{i:02}")), format!("{i}").as_bytes());
    }
    c.converged();
    for i in 0..30 {
        assert_eq!(read(&c.nodes[1].p(&format!("f{i:02}"))), Some(format!("{i}").into_bytes()), "f{i:02} on n2");
    }
    let db = rusqlite::Connection::open_with_flags(&second.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let decided: i64 = db.query_row("SELECT count(*) FROM applied", [], |r| r.get(0)).unwrap();
    assert_eq!(decided, 0, "the second manager decided changes");
    let (api, token) = second.api();
    let health: serde_json::Value = serde_json::from_slice(&http_get(&format!("{api}/api/health"), Some(&token)).1).unwrap();
    assert!(health["last_failure"].as_str().is_some_and(|f| f.contains("another manager")), "{health}");
}
