//! A broker short of memory (or disk) sets off its alarm and blocks every connection that
//! publishes: it reads nothing more from them until it has room again. The mounts go on
//! working, nodes stay connected and say why nothing goes out, nothing is lost, and
//! everything converges once the alarm clears. The alarm is set off on a broker node of
//! its own (`scripts/broker-cluster.sh alone`): on the shared broker it would block every
//! other test.

use std::process::Command;
use std::time::Duration;
use system_tests::*;

const BROKER: (&str, u16) = ("syncfs-rmq4@localhost", 5684);

fn set_watermark(value: &[&str]) {
    let out = Command::new("rabbitmqctl").args(["-q", "-n", BROKER.0, "set_vm_memory_high_watermark"]).args(value).output().expect("rabbitmqctl runs");
    assert!(out.status.success(), "setting the memory watermark: {}", String::from_utf8_lossy(&out.stderr));
}

/// The broker's memory alarm, set off by a watermark of one byte; cleared on drop, also
/// when the test fails.
struct MemoryAlarm;

impl MemoryAlarm {
    fn set_off() -> MemoryAlarm {
        set_watermark(&["absolute", "1"]);
        MemoryAlarm
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        set_watermark(&["0.4"]);
    }
}

fn log_has(p: &std::path::Path, what: &str) -> bool {
    std::fs::read_to_string(p).unwrap_or_default().contains(what)
}

#[test]
fn a_broker_out_of_memory_blocks_nodes_that_stay_connected_and_lose_nothing() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/broker-cluster.sh");
    let out = Command::new(&script).arg("alone").output().expect("scripts/broker-cluster.sh runs");
    assert!(out.status.success(), "starting a broker node of its own: {}", String::from_utf8_lossy(&out.stderr));
    // Left on by a test killed before its guard ran.
    set_watermark(&["0.4"]);
    let vhost = Vhost::on_broker_node("alarm", BROKER.0);
    let url = vhost.url_via(BROKER.1);
    let dir = tempfile::Builder::new().prefix("syncfs-broker-alarm-").tempdir().unwrap();
    let manager = ManagerProc::start(dir.path(), &url);
    let opts = NodeOpts { broker: Some(url.clone()), ..Default::default() };
    let mut c = Cluster { nodes: Vec::new(), manager, vhost, dir };
    for id in ["n1", "n2"] {
        let n = NodeProc::start_opts(c.dir.path(), id, &c.vhost, opts.clone());
        n.wait_connected();
        c.nodes.push(n);
    }
    let content = |name: &str| format!("{name}: {}", "z".repeat(2000)).into_bytes();
    for i in 0..10 {
        write(&c.nodes[0].p(&format!("before{i}")), &content(&format!("before{i}")));
    }
    c.converged();

    let _watch = HangWatch::start("the broker alarm test", Duration::from_secs(240));
    let alarm = MemoryAlarm::set_off();
    // The mounts work as ever meanwhile: each of these returns (a hang would stop the test).
    for i in 0..30 {
        write(&c.nodes[0].p(&format!("during{i:02}")), &content(&format!("during{i:02}")));
    }
    std::fs::rename(c.nodes[0].p("before1"), c.nodes[0].p("renamed1")).unwrap();
    std::fs::remove_file(c.nodes[1].p("before2")).unwrap();
    write(&c.nodes[1].p("before3"), b"edited on n2 during the alarm");
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    eventually("n1 to say the broker blocks it", DEADLINE, || n1.status()["broker_blocked"].as_str().is_some_and(|r| r.contains("memory")));
    // Longer than any one operation with the broker may take on a connection that is not
    // blocked: a blocked one is not taken for dead.
    eventually("n1 to wait on through a whole operation's limit", Duration::from_secs(60), || log_has(&n1.log, "the broker still blocks the connection"));
    assert!(n1.connected(), "n1 went offline while the broker blocked it");
    assert!(n1.pending() > 0, "n1's changes were decided while the broker was blocked");
    assert!(read(&n2.p("during00")).is_none(), "a change arrived through a blocked broker");
    // A sync cannot go out: it says why at once instead of waiting for the alarm.
    let (ok, out, err) = n1.syncctl(&["sync"]);
    assert!(!ok && err.contains("the broker blocks this node's connection"), "syncctl sync during the alarm: {out}{err}");

    // The manager, blocked too once it publishes (a sync it is asked for), says so.
    let (api, token) = c.manager.api();
    let r = http_client().post(format!("{api}/api/nodes/n2/sync")).bearer_auth(&token).send().expect("POST /api/nodes/n2/sync");
    assert_eq!(r.status().as_u16(), 202, "asking n2 to sync");
    let health = || serde_json::from_slice::<serde_json::Value>(&http_get(&format!("{api}/api/health"), Some(&token)).1).unwrap();
    eventually("the manager's health to say the broker blocks it", DEADLINE, || {
        health()["last_failure"].as_str().is_some_and(|f| f.contains("the broker blocked the manager's connection"))
    });
    // A blocked node and a blocked manager still stop at once when asked to.
    assert!(c.nodes[1].signal_and_wait(libc::SIGTERM).success(), "n2 stopped while the broker blocked it");
    assert!(!is_mounted(&c.nodes[1].mount), "n2's mount is still there");
    assert!(c.manager.signal_and_wait(libc::SIGTERM).success(), "the manager stopped while the broker blocked it");

    drop(alarm);
    c.manager.restart();
    c.nodes[1].restart();
    c.nodes[1].wait_connected();
    c.converged();
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    for log in [&n1.log, &n2.log, &c.manager.log] {
        assert!(!log_has(log, "taking the connection for dead"), "a blocked connection was taken for dead: {}", log.display());
    }
    for n in [n1, n2] {
        assert!(n.status()["broker_blocked"].is_null(), "{} still says the broker blocks it: {}", n.id, n.status());
        for i in 0..30 {
            let name = format!("during{i:02}");
            assert_eq!(read(&n.p(&name)), Some(content(&name)), "{name} on {}", n.id);
        }
        assert!(read(&n.p("before1")).is_none() && read(&n.p("renamed1")) == Some(content("before1")), "the rename on {}", n.id);
        assert!(read(&n.p("before2")).is_none(), "the delete on {}", n.id);
        assert_eq!(read(&n.p("before3")).as_deref(), Some(&b"edited on n2 during the alarm"[..]), "the edit on {}", n.id);
    }
    assert!(conflict_files(&n1.mount).is_empty(), "conflicts: {:?}", conflict_files(&n1.mount));
    assert_eq!(queue_depth(&c.vhost, wire::topology::DEAD_QUEUE), 0, "messages dead-lettered");
}
