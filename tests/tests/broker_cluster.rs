//! The cluster on a RabbitMQ cluster: three broker nodes on this machine
//! (`scripts/broker-cluster.sh`), quorum queues, and the manager and the nodes given all
//! three addresses. The broker node that leads the queues is stopped while files are
//! being written on two nodes: nothing is lost, and everything arrives everywhere.
//! Also: a queue an older version made as a classic queue keeps working.

use std::process::Command;
use system_tests::*;

const BROKERS: [(&str, u16); 3] = [("syncfs-rmq1@localhost", 5681), ("syncfs-rmq2@localhost", 5682), ("syncfs-rmq3@localhost", 5683)];

fn ctl(node: &str, args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl").args(["-q", "-n", node]).args(args).output().expect("rabbitmqctl runs");
    assert!(out.status.success(), "rabbitmqctl -n {node} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts the three broker nodes if they are not running (idempotent).
fn broker_cluster() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/broker-cluster.sh");
    let out = Command::new(&script).arg("start").output().expect("scripts/broker-cluster.sh runs");
    assert!(out.status.success(), "starting the broker cluster: {}", String::from_utf8_lossy(&out.stderr));
}

/// The broker address list of `vhost` on the cluster: every broker node.
fn urls(vhost: &Vhost) -> String {
    BROKERS.iter().map(|(_, port)| format!("amqp://guest:guest@127.0.0.1:{port}/{}?heartbeat=5", vhost.name)).collect::<Vec<_>>().join(",")
}

/// A broker node stopped by the test; started again on drop, also when the test fails.
struct Stopped(String);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["-q", "-n", &self.0, "start_app"]).output();
        let _ = Command::new("rabbitmqctl").args(["-q", "-n", &self.0, "await_startup", "--timeout", "60"]).output();
    }
}

/// (type, leader) of `queue`, from a running broker node other than `not`.
fn queue_info(vhost: &str, queue: &str, not: Option<&str>) -> Option<(String, String)> {
    let ask = BROKERS.iter().map(|(n, _)| *n).find(|n| Some(*n) != not)?;
    let out = ctl(ask, &["list_queues", "-p", vhost, "name", "type", "leader"]);
    out.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&queue)).then(|| (f.get(1).unwrap_or(&"").to_string(), f.get(2).unwrap_or(&"").to_string()))
    })
}

#[test]
fn stopping_the_broker_node_that_leads_the_queues_loses_nothing() {
    broker_cluster();
    let vhost = Vhost::on_broker_node("cluster", BROKERS[0].0);
    let dir = tempfile::Builder::new().prefix("syncfs-broker-cluster-").tempdir().unwrap();
    let _manager = ManagerProc::start(dir.path(), &urls(&vhost));
    let opts = NodeOpts { broker: Some(urls(&vhost)), ..Default::default() };
    let a = NodeProc::start_opts(dir.path(), "n1", &vhost, opts.clone());
    let b = NodeProc::start_opts(dir.path(), "n2", &vhost, opts);
    a.wait_connected();
    b.wait_connected();

    let (kind, leader) = queue_info(&vhost.name, "sync.update", None).expect("the update queue exists");
    assert_eq!(kind, "quorum", "the update queue is a quorum queue");
    for n in ["n1", "n2"] {
        let (kind, _) = queue_info(&vhost.name, &format!("sync.node.{n}"), None).expect("the node's queue exists");
        assert_eq!(kind, "quorum", "the queue of {n} is a quorum queue");
    }

    // Files written on both nodes before, while and after the broker node that leads
    // the update queue goes away: each writer goes on until the stop has returned, and
    // then writes 50 more.
    let stop_done = std::sync::atomic::AtomicBool::new(false);
    let write_on = |n: &NodeProc| -> usize {
        let mut i = 0;
        let mut after = 0;
        while after < 50 {
            write(&n.p(&format!("{}-{i:04}.txt", n.id)), format!("{} wrote {i}", n.id).as_bytes());
            i += 1;
            if stop_done.load(std::sync::atomic::Ordering::Relaxed) {
                after += 1;
            }
        }
        i
    };
    let (written, stopped) = std::thread::scope(|s| {
        let wa = s.spawn(|| write_on(&a));
        let wb = s.spawn(|| write_on(&b));
        eventually("both nodes to have written some files", DEADLINE, || a.p("n1-0020.txt").exists() && b.p("n2-0020.txt").exists());
        ctl(&leader, &["stop_app"]);
        let stopped = Stopped(leader.clone());
        stop_done.store(true, std::sync::atomic::Ordering::Relaxed);
        ([wa.join().unwrap(), wb.join().unwrap()], stopped)
    });
    let mut new_leader = String::new();
    eventually("another broker node to lead the update queue", DEADLINE, || {
        new_leader = queue_info(&vhost.name, "sync.update", Some(&leader)).map(|(_, l)| l).unwrap_or_default();
        !new_leader.is_empty() && new_leader != leader
    });

    // Everything arrives on both nodes, while the old leader is still down.
    for ((n, other), count) in [(&a, &b), (&b, &a)].into_iter().zip(written) {
        for i in 0..count {
            let name = format!("{}-{i:04}.txt", n.id);
            let want = format!("{} wrote {i}", n.id);
            eventually(&format!("{name} on {}", other.id), DEADLINE, || read(&other.p(&name)).as_deref() == Some(want.as_bytes()));
        }
    }
    let reconnected: Vec<&str> =
        [&a, &b].iter().filter(|n| std::fs::read_to_string(&n.log).unwrap_or_default().contains("broker link down")).map(|n| n.id.as_str()).collect();
    eprintln!("written: {written:?}; leader {leader} stopped, now {new_leader}; nodes that lost their broker connection: {reconnected:?}");
    drop(stopped);
    for n in [&a, &b] {
        eventually(&format!("{} to have nothing pending", n.id), DEADLINE, || n.pending() == 0);
        assert!(conflict_files(&n.mount).is_empty(), "no conflict files on {}", n.id);
    }
}

#[test]
fn a_classic_queue_made_by_an_older_version_keeps_working() {
    let vhost = Vhost::new("classic");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use lapin::options::QueueDeclareOptions;
        use lapin::types::{AMQPValue, FieldTable};
        let conn = broker_link::connect(&vhost.url()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        // What the versions before quorum queues declared.
        let mut args = FieldTable::default();
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(wire::topology::DEAD_EXCHANGE.into()));
        ch.queue_declare(wire::topology::UPDATE_QUEUE.into(), QueueDeclareOptions::durable(), args).await.unwrap();
        broker_link::declare_common(&conn).await.expect("the topology is declared over a classic update queue");
        let _ = conn.close(200, "done".into()).await;
    });
    let out = Command::new("rabbitmqctl").args(["-q", "list_queues", "-p", &vhost.name, "name", "type"]).output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["sync.update", "classic"]), "{out}");
    assert!(out.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["sync.dead", "quorum"]), "{out}");
}
