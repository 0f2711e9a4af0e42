//! The broker restarted under load: no update is lost, and the manager and every node
//! reconnect by themselves. Restarts the shared broker, so it runs alone
//! (`--run-ignored only`, after the parallel run in scripts/test.sh).

use std::process::Command;
use std::time::Duration;
use system_tests::*;

#[test]
#[ignore = "restarts the shared broker: run alone (scripts/test.sh does)"]
fn broker_restart_under_load_loses_nothing() {
    let c = Cluster::start("broker-restart", 2);
    let dir = c.nodes[0].p("load");
    std::fs::create_dir(&dir).unwrap();
    let writer = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            for i in 0..300 {
                write(&dir.join(format!("f{i:03}")), format!("payload {i}").as_bytes());
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    // Restart the broker application in the middle of the writes.
    eventually("some writes to be made", DEADLINE, || std::fs::read_dir(&dir).map(|d| d.count() >= 60).unwrap_or(false));
    let ok = Command::new("rabbitmqctl").args(["-q", "stop_app"]).status().unwrap().success();
    // Whatever happens next, the broker is started again for the tests after this one.
    let _restart = StartAppOnDrop;
    assert!(ok, "rabbitmqctl stop_app");
    eventually("the nodes to notice", DEADLINE, || !c.nodes[0].connected());
    let ok = Command::new("rabbitmqctl").args(["-q", "start_app"]).status().unwrap().success();
    assert!(ok, "rabbitmqctl start_app");
    writer.join().unwrap();
    for n in &c.nodes {
        n.wait_connected();
    }
    c.converged_within(Duration::from_secs(120));
    for i in 0..300 {
        assert_eq!(read(&c.nodes[1].p(&format!("load/f{i:03}"))).unwrap(), format!("payload {i}").as_bytes());
    }
}

struct StartAppOnDrop;

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["-q", "start_app"]).status();
    }
}
