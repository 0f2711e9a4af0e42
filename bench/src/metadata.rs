//! Small-file and metadata rows (issue 14): N files of 4 KiB created, written and closed
//! in one directory; every one of them stat'ed warm; the directory listed; every file
//! deleted. The same work on the node's mount (while the second node syncs), on the
//! native disk and through bindfs (a FUSE file system that only passes through: the fair
//! FUSE baseline), the three taking turns operation by operation so that all meet the
//! machine in the same state.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Rates of one system, per second.
#[derive(Default, Clone, Copy)]
pub struct Rates {
    pub create: f64,
    pub stat: f64,
    pub readdir: f64,
    pub delete: f64,
}

fn create(dir: &Path, n: usize) -> f64 {
    // Each file its own content, as in a real tree (a run of equal files would let the
    // mount's store keep one blob for all of them).
    let mut block = [0x5au8; 4096];
    let t = Instant::now();
    for i in 0..n {
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
        std::fs::write(dir.join(format!("f{i:06}")), block).expect("create + write + close");
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn stat(dir: &Path, n: usize) -> f64 {
    let paths: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("f{i:06}"))).collect();
    // The first pass fills the kernel's caches; the second is measured.
    for p in &paths {
        std::fs::symlink_metadata(p).expect("stat");
    }
    let t = Instant::now();
    let mut size = 0;
    for p in &paths {
        size += std::fs::symlink_metadata(p).expect("stat").len();
    }
    assert_eq!(size, 4096 * n as u64, "every file has its 4 KiB");
    n as f64 / t.elapsed().as_secs_f64()
}

/// Entries per second over `rounds` full listings.
fn readdir(dir: &Path, n: usize, rounds: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..rounds {
        let mut seen = 0;
        for e in std::fs::read_dir(dir).expect("opendir") {
            e.expect("readdir");
            seen += 1;
        }
        assert_eq!(seen, n, "the listing has every file");
    }
    (n * rounds) as f64 / t.elapsed().as_secs_f64()
}

fn delete(dir: &Path, n: usize) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        std::fs::remove_file(dir.join(format!("f{i:06}"))).expect("unlink");
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// Runs the rows on `(name, directory)` pairs; each directory must be empty and is left
/// empty.
pub fn run(systems: &[(&str, PathBuf)], n: usize) -> Vec<Rates> {
    let mut out = vec![Rates::default(); systems.len()];
    for ((_, d), r) in systems.iter().zip(&mut out) {
        write_out_page_cache();
        r.create = create(d, n);
    }
    for ((_, d), r) in systems.iter().zip(&mut out) {
        r.stat = stat(d, n);
    }
    for ((_, d), r) in systems.iter().zip(&mut out) {
        r.readdir = readdir(d, n, 5);
    }
    for ((_, d), r) in systems.iter().zip(&mut out) {
        write_out_page_cache();
        r.delete = delete(d, n);
    }
    out
}

/// `sync`: a system's creates or deletes do not pay for writing out what the system
/// before it left in the page cache (the mount's turn leaves two nodes' stores; the
/// native creates after it ran at 1,317/s in one run, 18,000–39,000/s in others).
fn write_out_page_cache() {
    let ok = std::process::Command::new("sync").status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "sync failed");
}

/// Prints the rows over `rounds` runs of [`run`]: each system's median rate, the median
/// of the rounds' ratios (each round's systems met the machine in the same state; the
/// baselines swing by up to 3x between runs minutes apart, session 40), and every round's
/// ratio to bindfs.
pub fn print(systems: &[(&str, PathBuf)], rounds: &[Vec<Rates>], n: usize) {
    println!("{n} files of 4 KiB in one directory, {} round(s), medians (rates per second; the mount syncs to a second node meanwhile):", rounds.len());
    println!(
        "| operation | {} | mount / native | mount / bindfs | mount / bindfs, each round |",
        systems.iter().map(|(s, _)| *s).collect::<Vec<_>>().join(" | ")
    );
    let row = |name: &str, f: fn(&Rates) -> f64| {
        let rates: Vec<f64> = (0..systems.len()).map(|i| median(rounds.iter().map(|r| f(&r[i])).collect())).collect();
        let ratios = |i: usize| -> Vec<f64> { rounds.iter().filter(|r| r.len() > i).map(|r| f(&r[0]) / f(&r[i])).collect() };
        let ratio = |i: usize| if systems.len() > i { format!("{:.2}", median(ratios(i))) } else { "—".into() };
        let each: Vec<String> = ratios(2).iter().map(|x| format!("{x:.2}")).collect();
        let cells: Vec<String> = rates.iter().map(|x| format!("{x:.0}")).collect();
        println!("| {name} | {} | {} | {} | {} |", cells.join(" | "), ratio(1), ratio(2), if each.is_empty() { "—".into() } else { each.join(", ") });
    };
    row("create + write 4 KiB + close", |r| r.create);
    row("stat (warm)", |r| r.stat);
    row("readdir (entries)", |r| r.readdir);
    row("delete", |r| r.delete);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The header of a side-by-side table: `what`, each system, and the two ratios.
pub fn print_header(what: &str, systems: &[(&str, PathBuf)]) {
    println!("| {what} | {} | mount / native | mount / bindfs |", systems.iter().map(|(s, _)| *s).collect::<Vec<_>>().join(" | "));
}

/// One row: a value per system (the mount first) with `decimals`, and the mount's value
/// over the native disk's and bindfs's.
pub fn print_row(name: &str, v: &[f64], decimals: usize) {
    let cells: Vec<String> = v.iter().map(|x| format!("{x:.decimals$}")).collect();
    let ratio = |i: usize| v.get(i).map(|b| format!("{:.2}", v[0] / b)).unwrap_or_else(|| "—".into());
    println!("| {name} | {} | {} | {} |", cells.join(" | "), ratio(1), ratio(2));
}

/// The systems a side-by-side row compares: a directory on the mount, one on the native
/// disk next to the node's store, and bindfs over another there (if installed). The
/// temporary directories and the bindfs mount last as long as this.
pub struct SideBySide {
    pub systems: Vec<(&'static str, PathBuf)>,
    // Declared first: unmounted before its directories go.
    _bindfs: Option<Bindfs>,
    _native: tempfile::TempDir,
    _bind_src: tempfile::TempDir,
    _bind_mnt: tempfile::TempDir,
}

impl SideBySide {
    pub fn new(work: &Path, on_mount: PathBuf) -> SideBySide {
        let native = tempfile::tempdir_in(work).unwrap();
        let bind_src = tempfile::tempdir_in(work).unwrap();
        let bind_mnt = tempfile::tempdir().unwrap();
        let bindfs = Bindfs::mount(bind_src.path(), bind_mnt.path());
        let mut systems = vec![("mount (fs-node)", on_mount), ("native disk", native.path().to_path_buf())];
        match &bindfs {
            Some(_) => systems.push(("bindfs", bind_mnt.path().to_path_buf())),
            None => println!("bindfs not installed (scripts/setup-bench.sh): its column is skipped"),
        }
        SideBySide { systems, _bindfs: bindfs, _native: native, _bind_src: bind_src, _bind_mnt: bind_mnt }
    }
}

/// A bindfs mount of `src` at `mnt`, unmounted when dropped; None if bindfs is missing.
pub struct Bindfs {
    mnt: PathBuf,
}

impl Bindfs {
    pub fn mount(src: &Path, mnt: &Path) -> Option<Bindfs> {
        let ok = Command::new("bindfs").arg(src).arg(mnt).status().map(|s| s.success()).unwrap_or(false);
        ok.then(|| Bindfs { mnt: mnt.to_path_buf() })
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        system_tests::unmount(&self.mnt);
    }
}
