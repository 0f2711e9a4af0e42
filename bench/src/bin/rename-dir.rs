//! How long a rename of a directory holding a large tree holds the node's tree (and so
//! the mount), without FUSE or a broker: `rename-dir [FILES]` (default 100,000) makes
//! FILES small files in directories of 1,000 below `top` in a tree in a temporary
//! directory, then renames `top` and back, first with every change queued in the
//! rename's own transaction (as before `tree/moves.rs`), then with the changes below the
//! directory queued in parts afterwards (`Tree::expand_moves`, the node's default). A
//! thread looks up an attribute every millisecond meanwhile: its longest wait is how long
//! a user of the mount would have waited (docs/benchmarks.md, sessions 36 and 37). Run it
//! under `perf record -g` to see where a rename's time goes.
use fs_node::db::Db;
use fs_node::store::ContentStore;
use fs_node::tree::{CreateOpen, Tree, ROOT};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let files = std::env::args().nth(1).map(|a| a.parse::<u64>()).transpose()?.unwrap_or(100_000);
    let dir = tempfile::tempdir()?;
    let tree = Arc::new(Tree::load(Db::open(&dir.path().join("node.db"))?, ContentStore::open(dir.path())?)?);
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
    for (how, in_one_hold) in [("in one transaction", usize::MAX), ("in parts", fs_node::tree::MOVE_IN_ONE_HOLD)] {
        tree.set_move_in_one_hold(in_one_hold);
        for (from, to) in [("top", "moved"), ("moved", "top")] {
            // Nothing else queued: the changes of the run before are taken away.
            drop(tree.take_unpublished());
            let stop = Arc::new(AtomicBool::new(false));
            let probe = {
                let (tree, stop) = (tree.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut longest = Duration::ZERO;
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let _ = tree.getattr(ROOT);
                        longest = longest.max(t.elapsed());
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    longest
                })
            };
            let t = Instant::now();
            tree.rename(ROOT, OsStr::new(from), ROOT, OsStr::new(to), false)?;
            let renamed = t.elapsed();
            // `mv dir dir.old && mkdir dir`: a directory made where the moved one was.
            let made = (how == "in parts")
                .then(|| -> anyhow::Result<Duration> {
                    let t = Instant::now();
                    tree.mkdir(ROOT, OsStr::new(from), 0o755, 0, 0)?;
                    Ok(t.elapsed())
                })
                .transpose()?;
            let queued = tree.expand_moves()?;
            if made.is_some() {
                // Out of the way of the rename back, once the deletes below it are queued.
                tree.rmdir(ROOT, OsStr::new(from))?;
            }
            let all = t.elapsed();
            stop.store(true, Ordering::Relaxed);
            let longest = probe.join().expect("the probe thread");
            println!(
                "{how}: rename {from} -> {to}: the rename {:.3} s, with the changes queued after it ({queued}) {:.3} s ({:.2} us per file); longest wait of a lookup meanwhile {:.1} ms",
                renamed.as_secs_f64(),
                all.as_secs_f64(),
                all.as_secs_f64() * 1e6 / files as f64,
                longest.as_secs_f64() * 1e3
            );
            if let Some(made) = made {
                println!("  a mkdir where it was, right after the rename: {:.3} s", made.as_secs_f64());
            }
        }
    }
    Ok(())
}
