//! A large tree (issue 14's million files, at the size `BENCH_TREE_FILES` says, default
//! 100,000): files of 1 KiB in directories of 1,000, written through node A's mount; the
//! create rate per tenth of the tree (it must not fall as the tree grows); how long after
//! the last close node B has every file; `find` over the whole tree on the mount and on
//! a native copy; a new node C joining, until its mount shows every file; a sync of node
//! A over the whole tree (`syncctl sync`) while small files are written on its mount one
//! after another (the longest of them: how long the sync held the mount); and the
//! memory and database size each file costs the nodes and the manager.

use std::path::Path;
use std::time::{Duration, Instant};
use system_tests::{eventually, Cluster, NodeProc};

const PER_DIR: usize = 1000;

fn file_name(i: usize) -> String {
    format!("d{:04}/f{:04}", i / PER_DIR, i % PER_DIR)
}

/// Writes files `from..to` below `root` (their directories made as needed).
fn write_files(root: &Path, from: usize, to: usize) {
    let block = [0x33u8; 1024];
    for i in from..to {
        if i % PER_DIR == 0 {
            std::fs::create_dir_all(root.join(format!("d{:04}", i / PER_DIR))).expect("mkdir");
        }
        std::fs::write(root.join(file_name(i)), block).expect("create + write + close");
    }
}

/// Files below `root`, counted with `find` (what a user would run), and the time it took.
fn find(root: &Path) -> (usize, Duration) {
    let t = Instant::now();
    let out = std::process::Command::new("find").arg(root).args(["-type", "f"]).output().expect("find runs");
    assert!(out.status.success(), "find {} failed: {}", root.display(), String::from_utf8_lossy(&out.stderr));
    (out.stdout.iter().filter(|&&b| b == b'\n').count(), t.elapsed())
}

/// Files below `root` so far (0 while it is not there yet).
pub(crate) fn files_so_far(root: &Path) -> usize {
    if root.is_dir() {
        find(root).0
    } else {
        0
    }
}

/// Waits until `node` has every file `writer` has, `n` of them below `tree` (its status
/// counts them all and has no pull under way, and `writer` has nothing left to send),
/// and returns how long after `since` that was; then `find` on `node`'s mount must
/// count the `n`. A node's tree takes in a file only once its content is here, and its
/// status costs the same at any size, while a `find` over a million files takes
/// seconds and would make each look that much later.
fn has_every_file(node: &NodeProc, writer: &NodeProc, tree: &Path, n: usize, since: Instant) -> Duration {
    let count = |s: &serde_json::Value| s["files"].as_u64().unwrap_or(0);
    eventually(&format!("node {} to have every file", node.id), Duration::from_secs(3600), || {
        let w = writer.status();
        let s = node.status();
        w["pending_changes"] == 0 && count(&w) >= n as u64 && count(&s) == count(&w) && s["pending_pulls"] == 0
    });
    let took = since.elapsed();
    assert_eq!(find(tree).0, n, "node {}'s status counted every file: its mount shows them all", node.id);
    took
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

fn db_size(p: &Path) -> u64 {
    let file = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    // The database, its SQLite log and (a node's) redo log files.
    ["", "-wal", "-redo0", "-redo1"].iter().map(|end| file(&p.with_file_name(format!("{}{end}", p.file_name().unwrap().to_string_lossy())))).sum()
}

/// Runs the rows on cluster `c` (nodes A and B running); adds node C.
pub fn run(c: &mut Cluster, n: usize) {
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let root = a.mount.join("tree");
    std::fs::create_dir(&root).unwrap();
    let base = [a.rss(), b.rss(), c.manager.rss()].map(Option::unwrap_or_default);
    let base_db = [db_size(&a.data.join("node.db")), db_size(&b.data.join("node.db")), db_size(&c.manager.db)];
    println!("{n} files of 1 KiB in directories of {PER_DIR}, written through node A's mount:");
    let tenth = n.div_ceil(10);
    let mut rates = Vec::new();
    let start = Instant::now();
    for chunk in 0..10 {
        let (from, to) = (chunk * tenth, ((chunk + 1) * tenth).min(n));
        let t = Instant::now();
        write_files(&root, from, to);
        rates.push((to - from) as f64 / t.elapsed().as_secs_f64());
    }
    let written = start.elapsed();
    let last_close = Instant::now();
    println!(
        "- create + write + close: {:.0} files/s over all; per tenth of the tree: {}",
        n as f64 / written.as_secs_f64(),
        rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")
    );
    let on_b = b.mount.join("tree");
    let b_took = has_every_file(b, a, &on_b, n, last_close);
    println!(
        "- on node B {:.1} s after the last close (B's status counts every file; its `find` confirmed it {:.1} s after the last close)",
        b_took.as_secs_f64(),
        last_close.elapsed().as_secs_f64()
    );
    let native = tempfile::tempdir_in(c.dir.path()).unwrap();
    write_files(native.path(), 0, n);
    let (seen, mount_find) = find(&root);
    assert_eq!(seen, n);
    let (seen, native_find) = find(native.path());
    assert_eq!(seen, n);
    println!(
        "- find -type f over the whole tree: mount {:.2} s, native {:.2} s ({:.2}x native)",
        mount_find.as_secs_f64(),
        native_find.as_secs_f64(),
        mount_find.as_secs_f64() / native_find.as_secs_f64()
    );
    drop(native);
    let at_rest = [a.rss(), b.rss(), c.manager.rss()].map(Option::unwrap_or_default);
    let dbs = [db_size(&a.data.join("node.db")), db_size(&b.data.join("node.db")), db_size(&c.manager.db)];
    let joined = Instant::now();
    let ci = c.add_node("n3");
    let cnode = &c.nodes[ci];
    cnode.wait_connected();
    let on_c = cnode.mount.join("tree");
    let c_took = has_every_file(cnode, &c.nodes[0], &on_c, n, joined);
    println!(
        "- a new node C shows every file {:.1} s after it started (its `find` confirmed it {:.1} s after)",
        c_took.as_secs_f64(),
        joined.elapsed().as_secs_f64()
    );
    let c_rss = cnode.rss().unwrap_or_default();
    let profiles = Profiles::start(&[("manager", c.manager.pid()), ("node-a", c.nodes[0].pid())]);
    sync_while_writing(&c.nodes[0]);
    drop(profiles);
    println!("| at rest, {n} files | before the tree | with the tree | per file |");
    println!("|---|---|---|---|");
    let rows = [
        ("node A memory", base[0], at_rest[0]),
        ("node B memory", base[1], at_rest[1]),
        ("manager memory", base[2], at_rest[2]),
        ("node C memory after joining (before: node B's before the tree)", base[1], c_rss),
        ("node A node.db", base_db[0], dbs[0]),
        ("node B node.db", base_db[1], dbs[1]),
        ("manager.db", base_db[2], dbs[2]),
    ];
    for (what, before, after) in rows {
        println!("| {what} | {:.1} MiB | {:.1} MiB | {:.0} bytes |", mib(before), mib(after), (after as f64 - before as f64) / n as f64);
    }
}

/// `perf record -g` of some processes while it lives, when `BENCH_PERF` names a
/// directory: `<name>.perf.data` in it for each (read them with `perf report -i`).
struct Profiles(Vec<std::process::Child>);

impl Profiles {
    fn start(procs: &[(&str, Option<u32>)]) -> Profiles {
        let Some(dir) = std::env::var_os("BENCH_PERF").map(std::path::PathBuf::from) else { return Profiles(Vec::new()) };
        std::fs::create_dir_all(&dir).expect("BENCH_PERF directory");
        let children = procs
            .iter()
            .filter_map(|(name, pid)| {
                let out = dir.join(format!("{name}.perf.data"));
                let pid = (*pid)?.to_string();
                std::process::Command::new("perf")
                    .args(["record", "-q", "-F", "499", "-g", "-p", &pid, "-o"])
                    .arg(&out)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .map_err(|e| eprintln!("perf record of {name}: {e}"))
                    .ok()
            })
            .collect();
        Profiles(children)
    }
}

impl Drop for Profiles {
    /// `perf record` writes its file on SIGINT.
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = std::process::Command::new("kill").args(["-INT", &c.id().to_string()]).status();
            let _ = c.wait();
        }
    }
}

/// `syncctl sync` on node `n`, timed, while small files are created, written and closed
/// on its mount one after another; prints the sync's time, the slowest small file, and
/// the node's largest resident memory seen meanwhile (every 64 files).
fn sync_while_writing(n: &NodeProc) {
    let done = std::sync::atomic::AtomicBool::new(false);
    let before = n.rss().unwrap_or_default();
    let mut peak = before;
    let (took, probes) = std::thread::scope(|s| {
        let sync = s.spawn(|| {
            let t = Instant::now();
            let (ok, _, err) = n.syncctl(&["sync"]);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            assert!(ok, "syncctl sync: {err}");
            t.elapsed()
        });
        let mut probes = Vec::new();
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let t = Instant::now();
            std::fs::write(n.mount.join(format!("probe-{}", probes.len())), [1u8; 4096]).expect("a small file");
            probes.push(t.elapsed());
            if probes.len() % 64 == 0 {
                peak = peak.max(n.rss().unwrap_or_default());
            }
        }
        (sync.join().unwrap(), probes)
    });
    let longest = probes.iter().max().copied().unwrap_or_default();
    println!(
        "- a sync of node A over the whole tree took {:.2} s; {} small files written on A meanwhile, the longest {:.1} ms; A's memory {:.1} MiB before, at most {:.1} MiB during it",
        took.as_secs_f64(),
        probes.len(),
        longest.as_secs_f64() * 1e3,
        mib(before),
        mib(peak)
    );
}
