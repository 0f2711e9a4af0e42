//! A message the manager cannot handle never stalls it: an undecodable one, one whose
//! handling fails with an error and one whose handling panics are each rolled back alone,
//! dead-lettered with their reason, and the messages around them are decided.
//!
//! The failures are made real by SQLite triggers on the test's database: one aborts the
//! insert of `fail.txt` with an error, the other deletes `boom.txt` right after its
//! insert, so the store's "just written" read-back panics.

use manager::service::{self, Handle, ATTEMPTS_HEADER, MAX_ATTEMPTS, REASON_HEADER};
use manager::store::Store;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use wire::{topology, Change, ChangeOp, Content, ContentHash, Envelope, Outcome, RelPath, Revision, ToManager, ToNode, Version};

const BREAK_TWO_PATHS: &str = "
CREATE TRIGGER fail_txt BEFORE INSERT ON paths WHEN NEW.path = 'fail.txt'
  BEGIN SELECT RAISE(ABORT, 'the disk is on fire'); END;
CREATE TRIGGER boom_txt AFTER INSERT ON paths WHEN NEW.path = 'boom.txt'
  BEGIN DELETE FROM paths WHERE path = 'boom.txt'; END;
";

fn put(id: &str, path: &str) -> Envelope<ToManager> {
    let version = Version { content: Content::File { hash: ContentHash::from_bytes([7; 32]), size: 1 }, mode: 0o644, uid: 0, gid: 0, mtime_ns: 0 };
    let change = Change::new(RelPath::new(path).unwrap(), Revision(0), ChangeOp::Put { version });
    Envelope::new(id.parse().unwrap(), "n1".parse().unwrap(), ToManager::Change(change))
}

fn decisions(store: &Store) -> Vec<Outcome> {
    let out = store.outbox(1000).unwrap();
    out.into_iter()
        .filter_map(|o| match Envelope::<ToNode>::decode(&o.payload).unwrap().body {
            ToNode::Decided { outcome, .. } => Some(outcome),
            _ => None,
        })
        .collect()
}

#[test]
fn a_failing_or_panicking_message_is_rolled_back_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("m.db")).unwrap();
    store.conn().execute_batch(BREAK_TWO_PATHS).unwrap();
    let batch = [put("m1", "before.txt"), put("m2", "fail.txt"), put("m3", "boom.txt"), put("m4", "after.txt")];
    let results = store.transaction(|tx| batch.iter().map(|env| tx.handle_isolated(env.clone(), 1_000)).collect::<anyhow::Result<Vec<_>>>()).unwrap();
    assert!(results[0].is_ok() && results[3].is_ok(), "{results:?}");
    let error = results[1].as_ref().unwrap_err();
    assert!(error.contains("the disk is on fire"), "{error}");
    let panic = results[2].as_ref().unwrap_err();
    assert!(panic.starts_with("panicked: "), "{panic}");
    for (path, kept) in [("before.txt", true), ("fail.txt", false), ("boom.txt", false), ("after.txt", true)] {
        assert_eq!(store.entry(&RelPath::new(path).unwrap()).unwrap().is_some(), kept, "{path}");
    }
    // Nothing of the failed ones was queued either: two decisions, no half of a third.
    assert_eq!(decisions(&store), [Outcome::Accepted, Outcome::Accepted]);
    assert_eq!(store.head().unwrap(), Revision(2));
}

/// A vhost of its own on the local RabbitMQ (scripts/setup.sh), deleted on drop.
struct Vhost(String);

impl Vhost {
    fn new() -> Vhost {
        let name = format!("t-manager-dead-{}", uuid::Uuid::new_v4());
        // The broker may still be starting.
        let start = Instant::now();
        while !rabbitmqctl(&["-q", "add_vhost", &name]) {
            assert!(start.elapsed() < Duration::from_secs(60), "rabbitmqctl add_vhost keeps failing: is RabbitMQ running (scripts/setup.sh)?");
            std::thread::sleep(Duration::from_millis(500));
        }
        assert!(rabbitmqctl(&["-q", "set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]));
        Vhost(name)
    }
    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}?heartbeat=5", self.0)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        rabbitmqctl(&["-q", "delete_vhost", &self.0]);
    }
}

fn rabbitmqctl(args: &[&str]) -> bool {
    Command::new("rabbitmqctl").args(args).output().map(|o| o.status.success()).unwrap_or(false)
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_dead_lettered_with_a_reason_and_later_ones_are_decided() {
    let vhost = Vhost::new();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let handle = Handle::open(&db).unwrap();
    handle.store.lock().unwrap().conn().execute_batch(BREAK_TWO_PATHS).unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let manager = tokio::spawn(service::run_with(
        service::Config { broker: vhost.url(), db, require_node_users: false, retention: Default::default() },
        handle.clone(),
        cancel.clone(),
    ));

    let conn = broker_link::connect(&vhost.url()).await.unwrap();
    let ch = broker_link::confirmed_channel(&conn).await.unwrap();
    broker_link::declare_common(&conn).await.unwrap();
    let publish = |id: &'static str, body: Vec<u8>| {
        let ch = ch.clone();
        async move { broker_link::publish_confirmed(&ch, "", topology::UPDATE_QUEUE, id, &body).await.unwrap() }
    };
    publish("m1", put("m1", "before.txt").encode()).await;
    publish("garbage", b"this is not json".to_vec()).await;
    publish("m2", put("m2", "fail.txt").encode()).await;
    publish("m3", put("m3", "boom.txt").encode()).await;
    publish("m4", put("m4", "after.txt").encode()).await;

    let store = handle.store.clone();
    let decided = |path: &str| store.lock().unwrap().entry(&RelPath::new(path).unwrap()).unwrap().is_some();
    eventually("the messages around the bad ones to be decided", || decided("before.txt") && decided("after.txt")).await;
    eventually("three dead letters", || handle.dead_lettered.load(Ordering::Relaxed) == 3).await;
    assert!(!decided("fail.txt") && !decided("boom.txt"));

    let mut reasons = Vec::new();
    while let Some(m) = ch.basic_get(topology::DEAD_QUEUE.into(), lapin::options::BasicGetOptions { no_ack: true }).await.unwrap() {
        let headers = m.delivery.properties.headers().clone().unwrap_or_default();
        let header = |name: &str| headers.inner().get(name).cloned();
        let Some(lapin::types::AMQPValue::LongString(reason)) = header(REASON_HEADER) else { panic!("no {REASON_HEADER} in {headers:?}") };
        let Some(lapin::types::AMQPValue::LongUInt(attempts)) = header(ATTEMPTS_HEADER) else { panic!("no {ATTEMPTS_HEADER} in {headers:?}") };
        let id = m.delivery.properties.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default();
        reasons.push((id, attempts, reason.to_string()));
    }
    reasons.sort();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    let (id, attempts, reason) = &reasons[0];
    assert!(id == "garbage" && *attempts == 1 && reason.starts_with("undecodable: "), "{reasons:?}");
    let (id, attempts, reason) = &reasons[1];
    assert!(id == "m2" && *attempts == MAX_ATTEMPTS && reason.contains("the disk is on fire"), "{reasons:?}");
    let (id, attempts, reason) = &reasons[2];
    assert!(id == "m3" && *attempts == MAX_ATTEMPTS && reason.starts_with("panicked: "), "{reasons:?}");

    // The manager goes on: a later message is decided too.
    publish("m5", put("m5", "later.txt").encode()).await;
    eventually("a later message to be decided", || decided("later.txt")).await;
    assert!(!manager.is_finished(), "the manager must keep running");
    cancel.cancel();
    manager.await.unwrap().unwrap();
    let _ = conn.close(200, "done".into()).await;
}

/// The manager binary, run with the test-only fault that aborts the process on a change
/// of `poison.txt` (in the middle of its batch's transaction); killed on drop.
struct ManagerProcess {
    child: std::process::Child,
    args: Vec<String>,
    starts: u32,
}

impl ManagerProcess {
    fn start(broker: &str, db: &std::path::Path) -> ManagerProcess {
        Self::start_with_fault(broker, db, ("SYNC_TEST_ABORT_ON_PATH", "poison.txt"))
    }
    /// With this test-only fault (`manager::store`) set.
    fn start_with_fault(broker: &str, db: &std::path::Path, fault: (&str, &str)) -> ManagerProcess {
        let mut args = ["serve", "--http", "127.0.0.1:0", "--broker", broker, "--db", db.to_str().unwrap()].map(String::from).to_vec();
        args.extend([fault.0.to_string(), fault.1.to_string()]);
        let child = Self::spawn(&args);
        ManagerProcess { child, args, starts: 1 }
    }
    /// `args`: the manager's, then the fault's variable and value.
    fn spawn(args: &[String]) -> std::process::Child {
        let (args, fault) = args.split_at(args.len() - 2);
        Command::new(env!("CARGO_BIN_EXE_manager"))
            .args(args)
            .env(&fault[0], &fault[1])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting the manager")
    }
    /// Restarts it if it stopped, as a service manager would; true while it runs.
    fn keep_running(&mut self) -> bool {
        match self.child.try_wait().unwrap() {
            None => true,
            Some(_) => {
                self.child = Self::spawn(&self.args);
                self.starts += 1;
                false
            }
        }
    }
}

impl Drop for ManagerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Dead letters in the queue, as (message id, reason), taken off it.
async fn take_dead_letters(ch: &lapin::Channel) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some(m) = ch.basic_get(topology::DEAD_QUEUE.into(), lapin::options::BasicGetOptions { no_ack: true }).await.unwrap() {
        let headers = m.delivery.properties.headers().clone().unwrap_or_default();
        let reason = match headers.inner().get(REASON_HEADER) {
            Some(lapin::types::AMQPValue::LongString(r)) => r.to_string(),
            other => panic!("no {REASON_HEADER}: {other:?}"),
        };
        out.push((m.delivery.properties.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default(), reason));
    }
    out
}

/// A message that kills the manager process outright (no error, no panic to catch: the
/// process is gone, its transaction with it, and the broker redelivers the message at
/// every restart) is given up after a bounded number of restarts, and the messages
/// around it are decided exactly once. A copy sent again later is dead-lettered without
/// being handled: it does not take the manager down again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_kills_the_manager_is_given_up_after_a_few_restarts() {
    let vhost = Vhost::new();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let mut manager = ManagerProcess::start(&vhost.url(), &db);

    let conn = broker_link::connect(&vhost.url()).await.unwrap();
    let ch = broker_link::confirmed_channel(&conn).await.unwrap();
    broker_link::declare_common(&conn).await.unwrap();
    let publish = |id: &'static str, path: &'static str| {
        let ch = ch.clone();
        async move { broker_link::publish_confirmed(&ch, "", topology::UPDATE_QUEUE, id, &put(id, path).encode()).await.unwrap() }
    };
    publish("m1", "before.txt").await;
    publish("m2", "poison.txt").await;
    publish("m3", "after.txt").await;

    let decided = |msg: &str| -> bool {
        let Ok(c) = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else { return false };
        c.query_row("SELECT count(*) FROM applied WHERE msg = ?1", [msg], |r| r.get::<_, i64>(0)).unwrap_or(0) == 1
    };
    let mut dead = Vec::new();
    let start = Instant::now();
    while !(decided("m1") && decided("m3") && !dead.is_empty()) {
        assert!(start.elapsed() < Duration::from_secs(90), "timed out waiting for the poison to be given up; {} starts", manager.starts);
        assert!(manager.starts <= 2 + service::MAX_STOPS, "the manager keeps being stopped by the same message");
        manager.keep_running();
        dead.extend(take_dead_letters(&ch).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].0 == "m2" && dead[0].1.contains("the manager stopped while handling it"), "{dead:?}");
    // The first start, and one per stop: the fresh delivery and MAX_STOPS redeliveries.
    assert_eq!(manager.starts, 2 + service::MAX_STOPS, "restarts it took");
    assert!(!decided("m2"));
    let c = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let revisions: i64 = c.query_row("SELECT count(*) FROM history", [], |r| r.get(0)).unwrap();
    assert_eq!(revisions, 2, "before.txt and after.txt, each decided once across the restarts");

    // The node sends the change again (as it does after a reconnection): given up at once.
    publish("m2", "poison.txt").await;
    publish("m4", "later.txt").await;
    eventually("a later message to be decided", || decided("m4")).await;
    assert!(manager.keep_running(), "the resent poison must not stop the manager again");
    // The dead letter is routed by the broker: it may land after m4's decision is seen.
    let mut again = Vec::new();
    let start = Instant::now();
    while again.is_empty() && start.elapsed() < Duration::from_secs(30) {
        again.extend(take_dead_letters(&ch).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    again.extend(take_dead_letters(&ch).await);
    assert!(again.len() == 1 && again[0].0 == "m2" && again[0].1.starts_with("given up"), "{again:?}");
    let _ = conn.close(200, "done".into()).await;
}

/// A message in hand when the database fails (an error that ends the broker session,
/// not the process) is not taken for one that stops the manager: failing more times in
/// a row than a poison message may stop it, it is decided once the database works
/// again, and nothing is dead-lettered. (Such failures counted as stops: a full disk
/// under the database for a minute gave up every change that came meanwhile.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_in_hand_when_the_database_fails_is_not_given_up() {
    let vhost = Vhost::new();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let failures = (service::MAX_STOPS + 3).to_string();
    let mut manager = ManagerProcess::start_with_fault(&vhost.url(), &db, ("SYNC_TEST_DB_FAULT_ON_PATH", &format!("flaky.txt:{failures}")));

    let conn = broker_link::connect(&vhost.url()).await.unwrap();
    let ch = broker_link::confirmed_channel(&conn).await.unwrap();
    broker_link::declare_common(&conn).await.unwrap();
    for (id, path) in [("m1", "before.txt"), ("m2", "flaky.txt"), ("m3", "after.txt")] {
        broker_link::publish_confirmed(&ch, "", topology::UPDATE_QUEUE, id, &put(id, path).encode()).await.unwrap();
    }
    let decided = |msg: &str| -> bool {
        let Ok(c) = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else { return false };
        c.query_row("SELECT count(*) FROM applied WHERE msg = ?1", [msg], |r| r.get::<_, i64>(0)).unwrap_or(0) == 1
    };
    let mut dead = Vec::new();
    let start = Instant::now();
    while !(decided("m1") && decided("m2") && decided("m3")) {
        assert!(start.elapsed() < Duration::from_secs(90), "timed out waiting for every message to be decided; dead letters: {dead:?}");
        assert!(manager.keep_running(), "the manager stopped");
        dead.extend(take_dead_letters(&ch).await);
        assert!(dead.is_empty(), "a message was given up: {dead:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dead.extend(take_dead_letters(&ch).await);
    assert!(dead.is_empty(), "a message was given up: {dead:?}");
    assert_eq!(manager.starts, 1, "the manager was restarted");
    let _ = conn.close(200, "done".into()).await;
}
