//! How long a rename of a directory holding a large tree takes in the node's tree (and
//! so holds the mount: the rename is one transaction under the tree's lock), without
//! FUSE or a broker: `rename-dir [FILES]` (default 100,000) makes FILES small files in
//! directories of 1,000 below `top` in a tree in a temporary directory, then renames
//! `top` and back, timing each (docs/benchmarks.md, session 36). Run it under
//! `perf record -g` to see where a rename's time goes.
use fs_node::db::Db;
use fs_node::store::ContentStore;
use fs_node::tree::{CreateOpen, Tree, ROOT};
use std::ffi::OsStr;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let files = std::env::args().nth(1).map(|a| a.parse::<u64>()).transpose()?.unwrap_or(100_000);
    let dir = tempfile::tempdir()?;
    let tree = Tree::load(Db::open(&dir.path().join("node.db"))?, ContentStore::open(dir.path())?)?;
    let t = Instant::now();
    let top = tree.mkdir(ROOT, OsStr::new("top"), 0o755, 0, 0)?.ino;
    for d in 0..files.div_ceil(1000) {
        let sub = tree.mkdir(top, OsStr::new(&format!("d{d}")), 0o755, 0, 0)?.ino;
        for f in 0..(files - d * 1000).min(1000) {
            let (_, fh) = tree.create(sub, OsStr::new(&format!("f{f}")), 0o644, 0, 0, CreateOpen::NEW)?;
            tree.write(fh, 0, format!("file {d}/{f}").as_bytes())?;
            tree.flush(fh)?;
            tree.release(fh)?;
        }
    }
    println!("{files} files made in {:.1} s", t.elapsed().as_secs_f64());
    for (from, to) in [("top", "moved"), ("moved", "top")] {
        let t = Instant::now();
        tree.rename(ROOT, OsStr::new(from), ROOT, OsStr::new(to), false)?;
        let took = t.elapsed();
        println!("rename {from} -> {to}: {:.3} s, {:.2} us per file", took.as_secs_f64(), took.as_secs_f64() * 1e6 / files as f64);
    }
    Ok(())
}
