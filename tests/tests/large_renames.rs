//! A rename of a directory holding more entries than a rename queues in its own
//! transaction (`fs_node::tree::MOVE_IN_ONE_HOLD`): its changes are queued in parts after
//! the rename is answered. Through real mounts: the other node ends with the tree, also
//! with files made meanwhile below the moved directory and where it was, and after the
//! node is killed right after the rename.

use system_tests::*;

/// More than `MOVE_IN_ONE_HOLD` (1,024) entries: 8 directories of 400 files.
const DIRS: usize = 8;
const FILES: usize = 400;

fn fill(c: &Cluster, top: &str) {
    std::fs::create_dir(c.nodes[0].p(top)).unwrap();
    for d in 0..DIRS {
        std::fs::create_dir(c.nodes[0].p(&format!("{top}/d{d}"))).unwrap();
        for f in 0..FILES {
            write(&c.nodes[0].p(&format!("{top}/d{d}/f{f}")), format!("{d}/{f}").as_bytes());
        }
    }
}

fn assert_moved(c: &Cluster, node: usize, to: &str) {
    let tree = snapshot(&c.nodes[node].mount);
    let below = tree.keys().filter(|p| p.starts_with(&format!("{to}/"))).count();
    assert!(below >= DIRS * (FILES + 1), "{}: {below} entries below {to}", c.nodes[node].id);
    assert_eq!(read(&c.nodes[node].p(&format!("{to}/d7/f399"))).as_deref(), Some(&b"7/399"[..]));
}

#[test]
fn a_large_directory_renamed_arrives_whole_with_what_was_made_meanwhile() {
    let c = Cluster::start("large-mv", 2);
    fill(&c, "top");
    c.converged();
    std::fs::rename(c.nodes[0].p("top"), c.nodes[0].p("moved")).unwrap();
    // Right after the rename's answer, while its changes may still be queued: a file
    // below the moved directory, and a file where the directory was.
    write(&c.nodes[0].p("moved/d3/new"), b"made below the moved directory");
    write(&c.nodes[0].p("top"), b"made where the directory was");
    c.converged();
    assert_moved(&c, 1, "moved");
    assert_eq!(read(&c.nodes[1].p("moved/d3/new")).as_deref(), Some(&b"made below the moved directory"[..]));
    assert_eq!(read(&c.nodes[1].p("top")).as_deref(), Some(&b"made where the directory was"[..]));
    assert!(conflict_files(&c.nodes[1].mount).is_empty(), "no conflict: {:?}", conflict_files(&c.nodes[1].mount));
}

#[test]
fn a_node_killed_right_after_a_large_rename_sends_it_whole_after_its_restart() {
    let mut c = Cluster::start("large-mv-kill", 2);
    fill(&c, "top");
    c.converged();
    std::fs::rename(c.nodes[0].p("top"), c.nodes[0].p("moved")).unwrap();
    c.nodes[0].kill9();
    c.nodes[0].restart();
    c.converged();
    assert_moved(&c, 1, "moved");
    assert!(!c.nodes[1].p("top").exists(), "the old path is gone on the other node");
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default();
    eprintln!(
        "the restarted node {} the rename's queuing",
        if log.contains("finishing the queuing of a large rename cut short") { "finished" } else { "had nothing left of" }
    );
}

/// `mv top top.old && mkdir top`, then files made in the new `top`, one of them where an
/// old file was: the other node ends with both trees, the new `top` holding only what
/// was made in it, and no conflict.
#[test]
fn a_directory_made_where_a_large_one_was_holds_only_what_is_made_in_it() {
    let c = Cluster::start("large-mv-mkdir", 2);
    fill(&c, "top");
    c.converged();
    std::fs::rename(c.nodes[0].p("top"), c.nodes[0].p("top.old")).unwrap();
    std::fs::create_dir(c.nodes[0].p("top")).unwrap();
    std::fs::create_dir(c.nodes[0].p("top/d3")).unwrap();
    write(&c.nodes[0].p("top/d3/f5"), b"made where an old file was");
    write(&c.nodes[0].p("top/new"), b"made in the new directory");
    c.converged();
    assert_moved(&c, 1, "top.old");
    let tree = snapshot(&c.nodes[1].mount);
    let below: Vec<&str> = tree.keys().map(|p| p.as_str()).filter(|p| p.starts_with("top/")).collect();
    assert_eq!(below, ["top/d3", "top/d3/f5", "top/new"], "the new top holds only what was made in it");
    assert_eq!(read(&c.nodes[1].p("top/d3/f5")).as_deref(), Some(&b"made where an old file was"[..]));
    assert_eq!(read(&c.nodes[1].p("top.old/d3/f5")).as_deref(), Some(&b"3/5"[..]));
    assert!(conflict_files(&c.nodes[1].mount).is_empty(), "no conflict: {:?}", conflict_files(&c.nodes[1].mount));
}
