//! `syncfs-bench`: measures the numbers in docs/benchmarks.md on real processes and
//! mounts (release binaries, the local RabbitMQ): propagation latency of a 4 KiB file,
//! 1,000 small files, one 256 MiB file, the same three on two Syncthing instances side
//! by side (`syncthing.rs`), small-file and metadata rates next to the native disk and
//! bindfs (`metadata.rs`), `tar x`, `git clone` and `rm -rf` of real sources next to
//! the same two (`tools.rs`), a large tree: its create rate, sync, `find`, a node
//! joining it and the memory per file (`tree.rs`), a node on demand joining a large
//! tree and reading files it does not hold (`ondemand.rs`), and sequential 1 GiB throughput through the mount next to
//! the native disk and a bindfs passthrough. Only loopback traffic.
//!
//! Run: `scripts/setup.sh && scripts/setup-bench.sh && cargo build --release -p manager
//! -p fs-node -p bench && target/release/syncfs-bench` (it finds the manager and the node
//! next to itself, so a `CARGO_TARGET_DIR` works too).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use system_tests::*;

mod edit;
mod holders;
mod metadata;
mod ondemand;
mod syncthing;
mod tools;
mod tree;
mod versions;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn wait_for(p: &Path, want: &[u8], deadline: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if let Ok(got) = std::fs::read(p) {
            if got == want {
                return start.elapsed();
            }
        }
        assert!(start.elapsed() < deadline, "{} did not arrive", p.display());
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Writes every dirty page out (`sync`): a timed step that follows a big write then does
/// not pay for that write's writeback.
fn flush_writeback() {
    let _ = Command::new("sync").status();
}

fn drop_caches() {
    flush_writeback();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// One round of the sequential test on one row, in MB/s.
struct SeqRound {
    write: f64,
    /// After dropping the page cache: the disk's speed plus the file system's cost.
    cold_read: f64,
    /// Right after the cold read, the file still in the page cache: the file system's
    /// own cost, without the disk.
    warm_read: f64,
}

fn read_all(p: &Path, size: usize) -> f64 {
    let t = Instant::now();
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0;
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        n += k;
    }
    assert_eq!(n, size);
    size as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// Writes `size` bytes in 1 MiB blocks under `dir` (fsync included), then reads them cold
/// and warm.
///
/// Every block starts with a fresh nonce: each run writes new content, so the mount's
/// store cannot hand back a blob it already has (an older file, maybe colder on disk).
fn sequential(dir: &Path, size: usize) -> SeqRound {
    let p = dir.join("seq.bin");
    let mut block = vec![0x5au8; 1 << 20];
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let t = Instant::now();
    let mut f = std::fs::File::create(&p).unwrap();
    for i in 0..size / block.len() {
        block[..8].copy_from_slice(&(nonce ^ i as u64).to_le_bytes());
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let write = size as f64 / t.elapsed().as_secs_f64() / 1e6;
    drop_caches();
    // Only when asked: reading the counters runs findmnt, which the timed rows need not.
    let before = std::env::var_os("BENCH_DIAG").is_some().then(diskstats);
    let cold_read = read_all(&p, size);
    if let Some(before) = before {
        // /proc/diskstats: reads, merged, sectors, ms reading, writes, merged, sectors, ms
        // writing, in flight, io ms, weighted ms, 4 discard fields, flushes, ms flushing.
        let d: Vec<u64> = diskstats().iter().zip(&before).map(|(a, b)| a - b).collect();
        let ms_per_read = d[3] as f64 / d[0].max(1) as f64;
        println!(
            "    disk during the cold read: {} reads of {} MiB in all, {ms_per_read:.1} ms each; {} writes, {} flushes",
            d[0],
            d[2] / 2048,
            d[4],
            d.get(15).copied().unwrap_or(0)
        );
    }
    let warm_read = read_all(&p, size);
    // Kept (under another name) until the phase ends, on every row: the mount's store
    // keeps a deleted file's blob until its GC (5 minutes), so deleting on the other rows
    // would let them reuse freed blocks while the mount always writes fresh ones.
    std::fs::rename(&p, dir.join(format!("kept-{nonce}"))).unwrap();
    SeqRound { write, cold_read, warm_read }
}

/// Counters of the disk under the benchmark's files, from /proc/diskstats.
fn diskstats() -> Vec<u64> {
    let dev = Command::new("findmnt")
        .args(["-no", "SOURCE", "--target"])
        .arg(std::env::temp_dir())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().trim_start_matches("/dev/").to_string())
        .unwrap_or_default();
    let s = std::fs::read_to_string("/proc/diskstats").unwrap_or_default();
    let line = s.lines().find(|l| l.split_whitespace().nth(2) == Some(dev.as_str())).unwrap_or("");
    let mut v: Vec<u64> = line.split_whitespace().skip(3).map(|x| x.parse().unwrap_or(0)).collect();
    v.resize(17, 0);
    v
}

/// The latency row's result, in milliseconds.
struct Latency {
    p50: f64,
    p99: f64,
    trials: usize,
}

/// Row 1, latency: one 4 KiB file at a time, write+close under `a` until `b` reads the same bytes.
fn latency(system: &str, a: &Path, b: &Path, trials: usize) -> Latency {
    let mut lat = Vec::new();
    for i in 0..trials {
        let body: Vec<u8> = (0..4096u32).map(|j| (j as usize * 31 + i) as u8).collect();
        let t = Instant::now();
        write(&a.join(format!("lat{i}")), &body);
        let w = t.elapsed();
        wait_for(&b.join(format!("lat{i}")), &body, Duration::from_secs(30));
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            eprintln!("{system} trial {i}: write+close {:.1} ms, total {:.1} ms", w.as_secs_f64() * 1000.0, t.elapsed().as_secs_f64() * 1000.0);
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
    Latency { p50: percentile(&lat, 0.5), p99: percentile(&lat, 0.99), trials }
}

/// The 1,000-file row's result, each time from the first write.
struct Thousand {
    written: Duration,
    /// All 1,000 are listed on B with their full size.
    listed: Duration,
    /// And B read each of them back with the right bytes: the row's figure.
    verified: Duration,
}

/// Row 2: 1,000 x 4 KiB written at once under `a`, until all are under `b` with the right
/// bytes. Sizes are polled first (cheap); the bytes are read only once all are listed,
/// and a file that is not right yet sends the loop back to polling.
fn thousand(a: &Path, b: &Path) -> Thousand {
    let body = |i: usize| vec![(i % 251) as u8; 4096];
    std::fs::create_dir(a.join("thousand")).unwrap();
    let t = Instant::now();
    for i in 0..1000 {
        write(&a.join(format!("thousand/f{i:04}")), &body(i));
    }
    let written = t.elapsed();
    let file = |i: usize| b.join(format!("thousand/f{i:04}"));
    let mut listed = None;
    loop {
        let n = std::fs::read_dir(b.join("thousand")).map(|d| d.count()).unwrap_or(0);
        if n == 1000 && (0..1000).all(|i| std::fs::metadata(file(i)).map(|m| m.len() == 4096).unwrap_or(false)) {
            listed.get_or_insert(t.elapsed());
            if (0..1000).all(|i| std::fs::read(file(i)).is_ok_and(|got| got == body(i))) {
                break;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(120), "1,000 files did not arrive under {}", b.display());
        std::thread::sleep(Duration::from_millis(5));
    }
    Thousand { written, listed: listed.unwrap_or_default(), verified: t.elapsed() }
}

/// The 256 MiB row's result, from the start of the write.
struct Big {
    closed: Duration,
    total: Duration,
}

/// Row 3: one file of `big.len()` bytes, written under `a`, until `b` reads all of it right.
fn big(a: &Path, b: &Path, big: &[u8]) -> Big {
    let t = Instant::now();
    write(&a.join("big.bin"), big);
    let closed = t.elapsed();
    wait_for(&b.join("big.bin"), big, Duration::from_secs(300));
    Big { closed, total: t.elapsed() }
}

/// One system's results in the sync rows (None: not run).
#[derive(Default)]
struct SyncRows {
    latency: Option<Latency>,
    thousand: Option<Thousand>,
    big: Option<Big>,
    edit: Option<edit::Edit>,
}

fn print_latency(system: &str, l: &Latency) {
    println!("{system}: latency 4 KiB: p50 {:.1} ms, p99 {:.1} ms ({} trials)", l.p50, l.p99, l.trials);
}

fn print_thousand(system: &str, t: &Thousand) {
    println!(
        "{system}: 1,000 x 4 KiB: all on B with the right bytes {:.2} s after the first write (all listed with their size at {:.2} s; writing took {:.2} s)",
        t.verified.as_secs_f64(),
        t.listed.as_secs_f64(),
        t.written.as_secs_f64()
    );
}

fn print_big(system: &str, b: &Big, size: usize) {
    let total = b.total.as_secs_f64();
    println!(
        "{system}: {} MiB: complete on B {total:.2} s after the write began ({:.0} MB/s end to end; the write+close on A took {:.2} s)",
        size >> 20,
        size as f64 / total / 1e6,
        b.closed.as_secs_f64()
    );
}

/// The side-by-side table of docs/benchmarks.md, as Markdown: each row of both systems
/// and Syncthing's time over ours.
fn print_comparison(ours: &SyncRows, theirs: &SyncRows, version: &str) {
    println!();
    println!("| measured in this run | fs-node cluster | {version} | Syncthing / fs-node |");
    println!("|---|---|---|---|");
    let ratio = |s: f64, o: f64| format!("{:.1}x", s / o);
    if let (Some(o), Some(s)) = (&ours.latency, &theirs.latency) {
        let trials = if o.trials == s.trials { format!("{} trials each", o.trials) } else { format!("{} trials; Syncthing {}", o.trials, s.trials) };
        println!("| 4 KiB file, write+close on A until B reads it, p50 ({trials}) | {:.1} ms | {:.1} ms | {} |", o.p50, s.p50, ratio(s.p50, o.p50));
        println!("| the same, p99 | {:.1} ms | {:.1} ms | {} |", o.p99, s.p99, ratio(s.p99, o.p99));
    }
    if let (Some(o), Some(s)) = (&ours.thousand, &theirs.thousand) {
        let (o, s) = (o.verified.as_secs_f64(), s.verified.as_secs_f64());
        println!("| 1,000 x 4 KiB written at once, until all are on B with the right bytes | {o:.2} s | {s:.2} s | {} |", ratio(s, o));
    }
    if let (Some(o), Some(s)) = (&ours.big, &theirs.big) {
        let (o, s) = (o.total.as_secs_f64(), s.total.as_secs_f64());
        println!("| one 256 MiB file, from the start of the write until B reads all of it right | {o:.2} s | {s:.2} s | {} |", ratio(s, o));
    }
    if let (Some(o), Some(s)) = (&ours.edit, &theirs.edit) {
        let (ot, stt) = (o.until_readable.as_secs_f64() * 1000.0, s.until_readable.as_secs_f64() * 1000.0);
        println!("| one byte changed in the middle of that file, until B reads it | {ot:.1} ms | {stt:.1} ms | {} |", ratio(stt, ot));
        println!(
            "| bytes moved A -> B for that edit | {} KiB | {} KiB | {} |",
            o.bytes_moved / 1024,
            s.bytes_moved / 1024,
            ratio(s.bytes_moved as f64, o.bytes_moved.max(1) as f64)
        );
    }
    println!();
}

fn main() {
    if std::env::var_os("SYNC_BIN_DIR").is_none() {
        // The manager and the node are built next to this binary (the same target dir,
        // whatever CARGO_TARGET_DIR says); the workspace's target/release otherwise.
        let here =
            std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)).filter(|d| d.join("manager").exists() && d.join("fs-node").exists());
        std::env::set_var("SYNC_BIN_DIR", here.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release")));
    }
    let trials: usize = std::env::var("BENCH_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    // Syncthing takes a second or two per latency trial (its watcher waits
    // FS_WATCHER_DELAY_S before it scans), so it runs fewer by default.
    let syncthing_trials: usize = std::env::var("BENCH_SYNCTHING_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(trials.min(50));
    // BENCH_ONLY=latency,thousand,big,edit,meta,tools,holders,versions,tree,ondemand,seq,syncthing runs a subset (default: all).
    // `syncthing` runs the sync rows selected on Syncthing too (all three if none is
    // named), side by side with ours.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let named = |name: &str| only.split(',').any(|o| o.trim() == name);
    let any_sync_named = ["latency", "thousand", "big", "edit"].iter().any(|r| named(r));
    let runs = |name: &str| {
        only.is_empty()
            || named(name)
            || (named("syncthing") && !any_sync_named && !["seq", "meta", "tools", "versions", "holders", "tree", "ondemand"].contains(&name))
    };
    let sync_rows = ["latency", "thousand", "big", "edit"].iter().any(|r| runs(r));
    let syncthing_version = syncthing::version();
    let with_syncthing = match (&syncthing_version, only.is_empty() || named("syncthing")) {
        (Some(_), wanted) => wanted && sync_rows,
        (None, true) if named("syncthing") => panic!("BENCH_ONLY names syncthing, which is not installed: run scripts/setup-bench.sh"),
        (None, true) => {
            println!("syncthing not installed (scripts/setup-bench.sh installs it): the side-by-side rows are skipped");
            false
        }
        (None, false) => false,
    };
    let c = Cluster::start("bench", 2);
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    // In the same temp dir as the nodes' stores: the same file system for both systems.
    let st = with_syncthing.then(|| syncthing::Pair::start(c.dir.path()));
    let version = syncthing_version.unwrap_or_default();
    if st.is_some() {
        println!("{version}: A and B connected on loopback, folder idle; fsWatcherDelayS={}", syncthing::FS_WATCHER_DELAY_S);
    }
    // The systems take turns row by row, so that both meet the machine in the same state.
    // One file first on each, not counted: for Syncthing it also proves that the watcher
    // runs (the next scan without it is an hour away).
    let systems: Vec<(&str, PathBuf, PathBuf)> = std::iter::once(("fs-node", a.mount.clone(), b.mount.clone()))
        .chain(st.as_ref().map(|p| ("syncthing", p.a.folder.clone(), p.b.folder.clone())))
        .collect();
    for (_, sa, sb) in systems.iter().filter(|_| sync_rows) {
        write(&sa.join("warm-up"), b"warm-up");
        wait_for(&sb.join("warm-up"), b"warm-up", Duration::from_secs(60));
    }
    let mut results: Vec<SyncRows> = systems.iter().map(|_| SyncRows::default()).collect();
    if runs("latency") {
        for ((system, sa, sb), r) in systems.iter().zip(&mut results) {
            let n = if *system == "syncthing" { syncthing_trials } else { trials };
            let l = latency(system, sa, sb, n);
            print_latency(system, &l);
            r.latency = Some(l);
        }
    }
    if runs("thousand") {
        for ((system, sa, sb), r) in systems.iter().zip(&mut results) {
            let t = thousand(sa, sb);
            print_thousand(system, &t);
            r.thousand = Some(t);
        }
    }
    if runs("big") {
        let data: Vec<u8> = (0..256u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
        for ((system, sa, sb), r) in systems.iter().zip(&mut results) {
            let b = big(sa, sb, &data);
            print_big(system, &b, data.len());
            r.big = Some(b);
        }
    }
    if runs("edit") {
        // A one-byte edit of the 256 MiB file (written now if the big row did not run).
        let data: Vec<u8> = (0..256u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
        for ((system, sa, sb), r) in systems.iter().zip(&mut results) {
            if std::fs::read(sb.join("big.bin")).ok().as_deref() != Some(&data[..]) {
                big(sa, sb, &data);
            }
            // Content, chunk lists and leaves: every byte A served B for the edit.
            let ours = || {
                let m = node_metrics(a);
                ["syncfs_node_bytes_served_total", "syncfs_node_index_bytes_served_total"].iter().map(|k| m.get(*k).copied().unwrap_or(0.0)).sum::<f64>() as u64
            };
            let theirs = || st.as_ref().map(|p| p.sent_a_to_b()).unwrap_or(0);
            let sent: &dyn Fn() -> u64 = if *system == "syncthing" { &theirs } else { &ours };
            let e = edit::run(sa, sb, "big.bin", &mut data.clone(), sent);
            println!(
                "{system}: one byte changed in the middle of 256 MiB: B reads it {:.1} ms after the write began (open+write+close on A {:.1} ms); {} bytes moved A -> B",
                e.until_readable.as_secs_f64() * 1000.0,
                e.write_close.as_secs_f64() * 1000.0,
                e.bytes_moved
            );
            r.edit = Some(e);
        }
    }
    if let [ours, theirs] = &results[..] {
        print_comparison(ours, theirs, &version);
    }
    // Syncthing is stopped and its files removed before the sequential part, which
    // measures the disk.
    drop(st);
    if runs("meta") {
        // BENCH_META_FILES (10,000) files in one directory of each: the mount (B syncs
        // them meanwhile), the native disk next to the node's store, bindfs over it.
        let n: usize = std::env::var("BENCH_META_FILES").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
        let on_mount = a.mount.join("meta");
        std::fs::create_dir(&on_mount).unwrap();
        // BENCH_META_ROUNDS (3) rounds, each system in turn within each.
        let rounds: usize = std::env::var("BENCH_META_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
        let side = metadata::SideBySide::new(c.dir.path(), on_mount.clone());
        let rates: Vec<_> = (0..rounds).map(|_| metadata::run(&side.systems, n)).collect();
        metadata::print(&side.systems, &rates, n);
        drop(side);
        std::fs::remove_dir(&on_mount).unwrap();
    }
    if runs("tools") {
        // tar x, git clone and rm -rf of real sources (BENCH_TOOLS_COPIES copies of the
        // registry's crates) on the mount, the native disk and bindfs.
        let copies: usize = std::env::var("BENCH_TOOLS_COPIES").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
        let work = tempfile::tempdir_in(c.dir.path()).unwrap();
        let src = tools::prepare(work.path(), copies);
        let on_mount = a.mount.join("tools");
        std::fs::create_dir(&on_mount).unwrap();
        let side = metadata::SideBySide::new(c.dir.path(), on_mount.clone());
        let drained = std::cell::Cell::new(Duration::ZERO);
        // Drained: A sent every change and B pulled every content (B's pulls of a
        // previous turn, served by A, would otherwise run through the next turn).
        let drain = || {
            let t = Instant::now();
            eventually("node A's queue of changes to drain and B's pulls to end", Duration::from_secs(1800), || {
                a.pending() == 0 && b.status()["pending_pulls"].as_u64() == Some(0)
            });
            drained.set(drained.get() + t.elapsed());
        };
        let times = tools::run_all(&side.systems, &src, &drain);
        drain();
        tools::print(&side.systems, &times, &src, drained.get());
        drop(side);
        std::fs::remove_dir(&on_mount).unwrap();
    }
    let mut c = c;
    if runs("holders") {
        // BENCH_HOLDERS_MIB (1024) pulled by a new node from one and from three holders,
        // each link limited to BENCH_HOLDERS_RATE (400mbit) with tc tbf.
        let mib: usize = std::env::var("BENCH_HOLDERS_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(1024);
        let rate = std::env::var("BENCH_HOLDERS_RATE").unwrap_or_else(|_| "400mbit".into());
        holders::run(c.dir.path(), mib << 20, &rate);
    }
    if runs("versions") {
        // What keeping old versions costs: BENCH_VERSIONS_ROUNDS (3) rounds each way.
        let rounds: usize = std::env::var("BENCH_VERSIONS_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
        versions::run(&mut c, rounds);
    }
    if runs("tree") {
        // BENCH_TREE_FILES (100,000) files of 1 KiB; adds node C.
        let n: usize = std::env::var("BENCH_TREE_FILES").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000);
        tree::run(&mut c, n);
    }
    if runs("ondemand") {
        // BENCH_OD_FILES (100,000) files of 1 KiB and BENCH_OD_GIB (10) files of 1 GiB;
        // adds node D, on demand.
        let files: usize = std::env::var("BENCH_OD_FILES").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000);
        let gib: usize = std::env::var("BENCH_OD_GIB").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
        // BENCH_OD_ROUNDS (3) of the sequential read and pull.
        let rounds: usize = std::env::var("BENCH_OD_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
        ondemand::run(&mut c, files, gib, rounds);
    }
    if !runs("seq") {
        return;
    }

    // 4. Sequential 1 GiB through the mount, the native disk and bindfs: medians over
    // BENCH_SEQ_ROUNDS (6) rounds; the best cold read too, since this machine's disk has
    // slow spells that only ever lower a figure (see docs/benchmarks.md).
    // This measures the mount as a file system, so B is stopped first: its pull of every
    // file would write a second GiB to the same disk while A's file is read (on a real
    // cluster the other node has its own disk). Propagation is measured above.
    c.nodes[1].stop();
    let a = &c.nodes[0];
    let size: usize = std::env::var("BENCH_SEQ_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(1024) << 20;
    // The native and bindfs files live next to the node's store (same file system, same
    // directory tree), so that all three rows read from comparable places on the disk.
    let native = tempfile::tempdir_in(c.dir.path()).unwrap();
    let bind_src = tempfile::tempdir_in(c.dir.path()).unwrap();
    let bind_mnt = tempfile::tempdir().unwrap();
    let have_bindfs = Command::new("bindfs").arg(bind_src.path()).arg(bind_mnt.path()).status().map(|s| s.success()).unwrap_or(false);
    let mut rows = vec![("mount (fs-node)", a.mount.clone()), ("native disk", native.path().to_path_buf())];
    if have_bindfs {
        rows.push(("bindfs passthrough", bind_mnt.path().to_path_buf()));
    } else {
        println!("bindfs not installed (apt-get install bindfs): skipped");
    }
    // The schedule. The mount and the native disk alternate, each first in every other
    // round. bindfs runs its rounds after theirs: on this machine's disk, a cold read
    // right after a bindfs round was slow whatever the row (measured over 4 runs: 17 of 28
    // such reads under 1.7 GB/s, 2 of 24 after the other rows; docs/benchmarks.md), so
    // interleaving bindfs handed its after-effect to whichever row came next. A first
    // round of each block is not counted: the first gibibyte written and read after other
    // work was slow too, whatever the row.
    let rounds: usize = std::env::var("BENCH_SEQ_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    let mut schedule: Vec<(usize, Option<usize>)> = vec![(0, None), (1, None)];
    for round in 0..rounds {
        schedule.extend(if round % 2 == 0 { [(0, Some(round)), (1, Some(round))] } else { [(1, Some(round)), (0, Some(round))] });
    }
    if rows.len() > 2 {
        schedule.push((2, None));
        schedule.extend((0..rounds).map(|round| (2, Some(round))));
    }
    let mut results: Vec<Vec<SeqRound>> = rows.iter().map(|_| Vec::new()).collect();
    let mut opens = 0.0;
    for (row, round) in schedule {
        let opens_before = node_metrics(a)["syncfs_node_passthrough_opens_total"];
        let r = sequential(&rows[row].1, size);
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            let what = round.map(|n| format!("round {n}")).unwrap_or_else(|| "warm-up (not counted)".into());
            println!("  {what}, {}: write {:.0} MB/s, cold read {:.0} MB/s, warm read {:.0} MB/s", rows[row].0, r.write, r.cold_read, r.warm_read);
        }
        if round.is_some() {
            if row == 0 {
                opens += node_metrics(a)["syncfs_node_passthrough_opens_total"] - opens_before;
            }
            results[row].push(r);
        }
    }

    for ((name, _), rs) in rows.iter().zip(&results) {
        let cold: Vec<f64> = rs.iter().map(|r| r.cold_read).collect();
        let best_cold = cold.iter().cloned().fold(0.0, f64::max);
        println!(
            "sequential {} MiB, {name}: write {:.0} MB/s, cold read {:.0} MB/s (best {best_cold:.0}), warm read {:.0} MB/s (medians of {rounds})",
            size >> 20,
            median(rs.iter().map(|r| r.write).collect()),
            median(cold),
            median(rs.iter().map(|r| r.warm_read).collect()),
        );
    }
    if std::env::var_os("BENCH_REREAD").is_some() {
        // Every kept file read cold once more, the rows interleaved: tells whether a row's
        // files are slow to read where they lie, or were slow only right after writing.
        let kept: Vec<Vec<PathBuf>> = rows
            .iter()
            .map(|(_, d)| {
                let mut v: Vec<PathBuf> = std::fs::read_dir(d).unwrap().flatten().map(|e| e.path()).collect();
                v.sort();
                v
            })
            .collect();
        for i in 0..kept[0].len() {
            let line: Vec<String> = kept
                .iter()
                .zip(&rows)
                .filter_map(|(files, (name, _))| {
                    let f = files.get(i)?;
                    drop_caches();
                    Some(format!("{name} {:.0}", read_all(f, size)))
                })
                .collect();
            println!("  re-read {i}: {}", line.join(", "));
        }
    }
    for (_, dir) in &rows {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    println!("mount reads (cold and warm) the kernel passed through to the store: {opens} of {}", 2 * rounds);
    if have_bindfs {
        unmount(bind_mnt.path());
    }
}
