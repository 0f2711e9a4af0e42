//! The manager keeps serving whatever one change asks of it. Regression: a conflict on a
//! name with a long extension (`a.` and 230 more bytes), or on a path near the 4,096-byte
//! limit, found no conflict name that fit; the naming loop spun for ever holding the
//! store, the message was never acked and every restart hung again.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use system_tests::*;

/// A directory reached by opening its components one at a time. A path near PATH_MAX with
/// the mount point in front is too long for one system call, so everything below it is
/// named through the descriptor: `/proc/self/fd/N/name`.
struct Deep(File);

impl Deep {
    /// Opens `root/comps…`, making the directories that are missing when `create`.
    fn open(root: &Path, comps: &[String], create: bool) -> Option<Deep> {
        let mut dir = Deep(File::open(root).ok()?);
        for c in comps {
            let p = dir.path(c);
            if create && !p.exists() {
                std::fs::create_dir(&p).unwrap_or_else(|e| panic!("making {c} under {}: {e}", root.display()));
            }
            dir = Deep(File::open(&p).ok()?);
        }
        Some(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.0.as_raw_fd()))
    }

    fn names(&self) -> Vec<String> {
        let rd = std::fs::read_dir(format!("/proc/self/fd/{}", self.0.as_raw_fd())).expect("listing a deep directory");
        rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
    }
}

/// The file `name` and the conflict files in `dir` (the test makes no others), as (name,
/// content), sorted by name.
fn file_and_copies(dir: &Deep, name: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> =
        dir.names().into_iter().filter(|n| n == name || n.contains(" (conflict from ")).filter_map(|n| read(&dir.path(&n)).map(|b| (n, b))).collect();
    out.sort();
    out
}

/// The versions a conflict between n1 and n2 must leave: the original name holds one of
/// them, one conflict file the other.
fn conflict_settled(dir: &Deep, name: &str) -> bool {
    let found = file_and_copies(dir, name);
    let mut bodies: Vec<&[u8]> = found.iter().map(|(_, b)| b.as_slice()).collect();
    bodies.sort();
    found.len() == 2 && found.iter().any(|(n, _)| n == name) && bodies == [b"from n1".as_slice(), b"from n2".as_slice()]
}

#[test]
fn conflicts_on_long_extensions_and_deep_paths_keep_the_manager_serving() {
    let mut c = Cluster::start("resilience", 2);
    let long_ext = format!("a.{}", "e".repeat(230));
    // Sixteen directories of 250 bytes make a 4,015-byte path, which leaves 80 bytes for a
    // name below it: a conflict name that kept this 60-byte stem whole would not fit.
    let dirs: Vec<String> = (0..16).map(|i| format!("{i:02}{}", "d".repeat(248))).collect();
    let deep_name = format!("{}.txt", "s".repeat(60));
    assert_eq!(dirs.join("/").len() + 1 + deep_name.len(), 4_080);

    write(&c.nodes[0].p(&long_ext), b"original");
    {
        let deep = Deep::open(&c.nodes[0].mount, &dirs, true).expect("making the deep directories");
        write(&deep.path(&deep_name), b"original");
    }
    eventually("both files to reach n2", DEADLINE, || {
        read(&c.nodes[1].p(&long_ext)).as_deref() == Some(b"original")
            && Deep::open(&c.nodes[1].mount, &dirs, false).and_then(|d| read(&d.path(&deep_name))).as_deref() == Some(b"original")
    });
    c.converged();

    // Both nodes stay connected; with the manager stopped, both edits are based on the same
    // revision when it decides them, so the second one is a conflict.
    c.manager.stop();
    for (i, n) in c.nodes.iter().enumerate() {
        let body = format!("from n{}", i + 1);
        write(&n.p(&long_ext), body.as_bytes());
        let deep = Deep::open(&n.mount, &dirs, false).expect("the deep directory");
        write(&deep.path(&deep_name), body.as_bytes());
    }
    c.manager.restart();

    for n in &c.nodes {
        let top = Deep::open(&n.mount, &[], false).expect("the mount");
        eventually(&format!("the conflict on the long extension to settle on {}", n.id), DEADLINE, || conflict_settled(&top, &long_ext));
        let deep = Deep::open(&n.mount, &dirs, false).expect("the deep directory");
        eventually(&format!("the conflict on the deep path to settle on {}", n.id), DEADLINE, || conflict_settled(&deep, &deep_name));
        for (name, _) in file_and_copies(&top, &long_ext) {
            assert!(name.len() <= wire::MAX_NAME_BYTES, "{name}");
        }
        for (name, _) in file_and_copies(&deep, &deep_name) {
            let whole = dirs.join("/").len() + 1 + name.len();
            assert!(whole <= wire::MAX_PATH_BYTES, "{name}: {whole} bytes");
        }
    }

    // The manager goes on deciding ordinary changes.
    write(&c.nodes[0].p("later.txt"), b"still flowing");
    eventually("a later file to reach n2", DEADLINE, || read(&c.nodes[1].p("later.txt")).as_deref() == Some(b"still flowing"));
    c.converged();
    assert!(c.manager.status().contains("conflicts: 2"), "{}", c.manager.status());
}
