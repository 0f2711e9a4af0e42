//! A node's own data gone or brought back from an older copy: its database deleted (an
//! operator resetting it, a disk that lost the file), or its whole data directory
//! restored from a backup. The node starts again from what the manager and its peers
//! have, loses nothing it had sent, and takes nothing away from the others. Real broker,
//! real mounts, real processes (docs/operations.md, *A node's data lost or brought back*).

use std::path::Path;
use system_tests::*;

/// Writes `n` small files below `dir` of node `node` (ten directories), each saying its
/// name and `tag`.
fn small_files(node: &NodeProc, dir: &str, n: usize, tag: &str) {
    for i in 0..n {
        let d = node.p(&format!("{dir}/d{}", i % 10));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("f{i}")), format!("{dir} {i} {tag}\n")).unwrap();
    }
}

/// The paths and contents of every file below `root`, for comparing two mounts or one
/// mount with itself at another time.
fn files_below(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A node killed (its database's log left behind, as a crash leaves it) whose `node.db`
/// is then deleted, with the redo logs, the small contents and the blobs beside it
/// left as they were: it starts with nothing of its own, takes the whole tree again, and
/// no other node loses a file. What the logs held is a part of the tree of a database that
/// is gone: they are set aside, not taken into the new one.
#[test]
fn a_node_whose_database_is_deleted_takes_the_tree_again_and_takes_nothing_away() {
    let mut c = Cluster::start("node-db-lost", 2);
    // Enough writes that the node database folded its redo log at least once, and more
    // after the last fold.
    small_files(&c.nodes[0], "many", 3000, "first");
    c.converged();
    small_files(&c.nodes[0], "later", 300, "second");
    for i in (0..3000).step_by(7) {
        std::fs::remove_file(c.nodes[0].p(&format!("many/d{}/f{i}", i % 10))).unwrap();
    }
    std::fs::write(c.nodes[1].p("from-b.txt"), b"b's own\n").unwrap();
    c.converged();
    let before = files_below(&c.nodes[1].mount);
    assert_eq!(before.len(), 3000 - (0..3000).step_by(7).count() + 300 + 1, "files on B before");

    c.nodes[0].kill9();
    let data = c.nodes[0].data.clone();
    let left: Vec<String> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(left.iter().any(|f| f.starts_with("node.db-redo")), "the node left its redo logs: {left:?}");
    for f in ["node.db", "node.db-wal"] {
        let _ = std::fs::remove_file(data.join(f));
    }
    c.nodes[0].restart();
    let aside: Vec<String> =
        std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|f| f.contains(".orphaned-")).collect();
    assert!(!aside.is_empty(), "the old database's redo logs were set aside: {aside:?}");
    c.nodes[0].wait_connected();
    c.converged();
    assert_eq!(files_below(&c.nodes[1].mount), before, "node B lost or gained files when A's database was deleted");
    assert_eq!(files_below(&c.nodes[0].mount), before, "node A took the whole tree again");
}

/// Copies directory `from` to `to` as it is (`cp -a`), replacing what `to` held.
fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let ok = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().expect("cp").success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

/// A node whose whole data directory is brought back from an older copy (a backup made
/// while it held changes not yet sent): it takes what was decided since, on its own
/// paths and on others', its old changes do not count a second time (a file they made
/// and another node deleted since stays deleted), and nothing becomes a conflict file, on
/// any node.
#[test]
fn a_node_brought_back_from_an_older_copy_of_its_data_takes_what_came_since() {
    let mut c = Cluster::start("node-data-restored", 2);
    for i in 0..20 {
        std::fs::write(c.nodes[0].p(&format!("f{i}")), format!("f{i} v1\n")).unwrap();
    }
    c.converged();
    // The copy holds a change the node made offline, not yet sent.
    c.nodes[0].proxy.cut();
    std::fs::write(c.nodes[0].p("f0"), b"f0 changed offline\n").unwrap();
    std::fs::write(c.nodes[0].p("made-offline"), b"new on A, offline\n").unwrap();
    eventually("A's offline change queued", DEADLINE, || c.nodes[0].pending() > 0);
    c.nodes[0].stop();
    let backup = c.dir.path().join("backup-n1");
    copy_dir(&c.nodes[0].data, &backup);
    c.nodes[0].restart();
    c.nodes[0].proxy.restore();
    c.nodes[0].wait_connected();
    c.converged();

    // What came after the copy, on the node's own paths and on the other node's.
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    std::fs::write(a.p("f1"), b"f1 changed by A after the copy\n").unwrap();
    std::fs::remove_file(a.p("f2")).unwrap();
    std::fs::write(a.p("g"), b"new on A after the copy\n").unwrap();
    std::fs::create_dir(a.p("dir-a")).unwrap();
    std::fs::write(b.p("f3"), b"f3 changed by B after the copy\n").unwrap();
    std::fs::remove_file(b.p("f4")).unwrap();
    // The copy's change that made this file was sent and decided; the file is deleted
    // since: the copy must not bring it back.
    std::fs::remove_file(b.p("made-offline")).unwrap();
    std::fs::write(b.p("h"), b"new on B after the copy\n").unwrap();
    c.converged();
    let want = files_below(&c.nodes[1].mount);
    assert_eq!(want.get("f0").map(Vec::as_slice), Some(&b"f0 changed offline\n"[..]));

    c.nodes[0].stop();
    copy_dir(&backup, &c.nodes[0].data);
    c.nodes[0].restart();
    c.nodes[0].wait_connected();
    c.converged();
    for n in &c.nodes {
        assert_eq!(files_below(&n.mount), want, "node {} after A's data was brought back", n.id);
        assert!(n.p("dir-a").is_dir(), "node {}: dir-a", n.id);
        assert_eq!(conflict_files(&n.mount), Vec::<String>::new(), "node {}", n.id);
    }
}
