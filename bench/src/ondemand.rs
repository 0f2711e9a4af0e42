//! Files on demand (issue 15): a tree of `files` small files and `gib` files of 1 GiB
//! written on node A (node B takes that directory on demand, so it pulls none of it);
//! then a new node D started with `--on-demand`: how long until `find` on D counts
//! every file, how long the first 4 KiB of each 1 GiB file (none of it on D) take to
//! read, and a sequential read of a 1 GiB file not on D next to the rate of B's own
//! pull of a new 1 GiB file (a pinned directory: pulled as it arrives, the way every
//! node pulls). No Syncthing row: it has no files on demand.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};
use system_tests::{eventually, node_metrics, Cluster, NodeProc};

const PER_DIR: usize = 1000;

/// Writes `size` bytes of fresh content to `p`: every 1 MiB block its own pseudo-random
/// bytes, so no chunk of one file is found in another (a pull of it copies nothing it
/// already has, and pulls the whole size).
fn write_big(p: &Path, size: usize, seed: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(p).unwrap();
    for i in 0..size >> 20 {
        f.write_all(&system_tests::pseudo_random(1 << 20, seed << 32 | i as u64)).unwrap();
    }
    drop(f);
}

fn pulled(n: &NodeProc) -> f64 {
    node_metrics(n).get("syncfs_node_bytes_pulled_total").copied().unwrap_or(0.0)
}

pub fn run(c: &mut Cluster, files: usize, gib: usize, rounds: usize) {
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let root = a.mount.join("od");
    std::fs::create_dir_all(root.join("pulled")).unwrap();
    // B keeps od/ on demand, except od/pulled/, which it pulls as every node does.
    for (cmd, p) in [("unpin", "od"), ("pin", "od/pulled")] {
        let (ok, out, err) = b.syncctl(&[cmd, p]);
        assert!(ok, "syncctl {cmd} {p}: {out} {err}");
    }
    let t = Instant::now();
    let block = [0x44u8; 1024];
    for i in 0..files {
        if i % PER_DIR == 0 {
            std::fs::create_dir_all(root.join(format!("d{:04}", i / PER_DIR))).unwrap();
        }
        std::fs::write(root.join(format!("d{:04}/f{:04}", i / PER_DIR, i % PER_DIR)), block).unwrap();
    }
    for g in 0..gib {
        write_big(&root.join(format!("big{g}.bin")), 1 << 30, g as u64);
    }
    let total = files + gib;
    eventually("A's changes to drain", Duration::from_secs(3600), || a.pending() == 0);
    println!("on demand: a tree of {files} files of 1 KiB and {gib} of 1 GiB written on A in {:.0} s", t.elapsed().as_secs_f64());

    // A new node D, on demand: the whole tree, by `find`.
    let started = Instant::now();
    let d = NodeProc::start_with(c.dir.path(), "n4", &c.vhost, &["--on-demand"]);
    let on_d = d.mount.join("od");
    eventually("D to show every file", Duration::from_secs(3600), || crate::tree::files_so_far(&on_d) == total);
    let shown = started.elapsed();
    let status = d.status();
    println!(
        "- a new on-demand node D shows all {total} files {:.2} s after it started (its first sync took {:.2} s; its store: {} bytes pulled, {} files on demand; memory {:.0} MiB)",
        shown.as_secs_f64(),
        status["last_sync"]["seconds"].as_f64().unwrap_or(f64::NAN),
        status["bytes_pulled"],
        status["residency"]["remote_files"],
        d.rss().unwrap_or_default() as f64 / 1048576.0
    );

    // The first 4 KiB of each 1 GiB file but the last `rounds`, none of it on D.
    let rounds = rounds.min(gib);
    let mut firsts = Vec::new();
    for g in 0..gib - rounds {
        crate::flush_writeback();
        let t = Instant::now();
        let mut f = std::fs::File::open(on_d.join(format!("big{g}.bin"))).unwrap();
        let mut head = vec![0u8; 4096];
        f.read_exact(&mut head).unwrap();
        firsts.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(head == system_tests::pseudo_random(4096, (g as u64) << 32), "the first block's bytes");
    }
    if !firsts.is_empty() {
        println!(
            "- first 4 KiB of a 1 GiB file not on D: median {:.1} ms, max {:.1} ms over {} files ({})",
            crate::median(firsts.clone()),
            firsts.iter().cloned().fold(0.0, f64::max),
            firsts.len(),
            firsts.iter().map(|m| format!("{m:.1}")).collect::<Vec<_>>().join(", ")
        );
    }

    // A whole 1 GiB file not on D, read sequentially, next to B's pull of a new one:
    // `rounds` rounds, each a file of its own.
    let (mut reads, mut pulls) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let p = on_d.join(format!("big{}.bin", gib - rounds + r));
        crate::flush_writeback();
        reads.push(crate::read_all(&p, 1 << 30));
        crate::flush_writeback();
        let before = pulled(b);
        let t = Instant::now();
        write_big(&root.join(format!("pulled/fresh{r}.bin")), 1 << 30, 99 + r as u64);
        // A's writeback of the new file overlaps B's pull, as after any write; the
        // writeback of what came before (D's read) does not.
        let closed = t.elapsed();
        eventually("B to pull the new file", Duration::from_secs(600), || pulled(b) >= before + (1u64 << 30) as f64);
        pulls.push((1u64 << 30) as f64 / (t.elapsed() - closed).as_secs_f64() / 1e6);
    }
    if rounds > 0 {
        let med = |v: &[f64]| crate::median(v.to_vec());
        let list = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
        println!(
            "- sequential read of a 1 GiB file not on D: {:.0} MB/s ({}); B's pull of a new 1 GiB file (after A's close, until B holds it): {:.0} MB/s ({}); ratio of the medians {:.2}",
            med(&reads),
            list(&reads),
            med(&pulls),
            list(&pulls),
            med(&reads) / med(&pulls)
        );
    }
    c.nodes.push(d);
}
