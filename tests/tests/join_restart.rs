//! Nodes that join late or restart catch up; the manager can restart under them.

use system_tests::*;

#[test]
fn a_late_node_gets_everything_and_a_restarted_node_catches_up() {
    let mut c = Cluster::start("join", 2);
    for d in 0..5 {
        std::fs::create_dir(c.nodes[0].p(&format!("d{d}"))).unwrap();
        for f in 0..100 {
            write(&c.nodes[0].p(&format!("d{d}/f{f}")), format!("{d}/{f}").as_bytes());
        }
    }
    c.converged();
    c.add_node("late");
    c.nodes[2].wait_connected();
    c.converged();
    assert_eq!(read(&c.nodes[2].p("d4/f99")).unwrap(), b"4/99");
    let late = snapshot(&c.nodes[2].mount);
    assert_eq!(late.len(), 505, "500 files and 5 directories");

    // A node that was stopped misses changes; after restarting it has them all.
    c.nodes[1].stop();
    write(&c.nodes[0].p("while away.txt"), b"news");
    std::fs::remove_dir_all(c.nodes[0].p("d0")).unwrap();
    std::fs::rename(c.nodes[0].p("d1"), c.nodes[0].p("renamed")).unwrap();
    c.nodes[1].restart();
    c.converged();
    assert_eq!(read(&c.nodes[1].p("while away.txt")).unwrap(), b"news");
    assert!(!c.nodes[1].p("d0").exists() && c.nodes[1].p("renamed/f0").exists());
}

#[test]
fn the_manager_can_restart_under_working_nodes() {
    let mut c = Cluster::start("mgr-restart", 2);
    write(&c.nodes[0].p("before.txt"), b"before");
    c.converged();
    c.manager.stop();
    // Changes made while the manager is down wait in the durable update queue.
    write(&c.nodes[0].p("during.txt"), b"during");
    write(&c.nodes[1].p("other.txt"), b"other");
    c.manager.restart();
    c.converged();
    assert_eq!(read(&c.nodes[1].p("during.txt")).unwrap(), b"during");
    assert_eq!(read(&c.nodes[0].p("other.txt")).unwrap(), b"other");
}
