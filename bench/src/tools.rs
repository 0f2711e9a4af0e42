//! What users do every day in a synced folder (issue 14): unpack a source archive with
//! `tar x`, `git clone` a repository of that size, and `rm -rf` the result. The archive
//! is real source code: the crates unpacked in the local cargo registry, repeated
//! `BENCH_TOOLS_COPIES` (2) times into subdirectories (about 55,000 files here). Each
//! tool runs on the node's mount (the second node syncs meanwhile), the native disk and
//! bindfs, taking turns tool by tool; before each turn the node's queue of changes is
//! drained, the second node has pulled every content and the page cache is written
//! out, so what a previous turn left behind slows nobody else's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Seconds each tool took on one system.
#[derive(Default, Clone, Copy)]
pub struct Times {
    pub tar_x: f64,
    pub git_clone: f64,
    pub rm_rf: f64,
}

/// The archive and the repository made from it, in `work`.
pub struct Sources {
    pub archive: PathBuf,
    pub repo: PathBuf,
    pub files: usize,
}

fn run(what: &str, cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn files_below(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().map(Result::unwrap) {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

/// Builds the archive (`copies` copies of the registry's unpacked crates) and a git
/// repository holding the same tree, committed.
pub fn prepare(work: &Path, copies: usize) -> Sources {
    let registry = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"))
        .join("registry/src");
    assert!(registry.is_dir(), "no unpacked crates in {} to make the archive from", registry.display());
    let archive = work.join("sources.tar");
    for c in 0..copies {
        let op = if c == 0 { "-cf" } else { "-rf" };
        run("tar c", Command::new("tar").arg(op).arg(&archive).arg(format!("--transform=s,^\\.,copy{c},")).arg("-C").arg(&registry).arg("."));
    }
    let repo = work.join("repo");
    std::fs::create_dir(&repo).unwrap();
    run("tar x into the repository", Command::new("tar").arg("-xf").arg(&archive).arg("-C").arg(&repo));
    let files = files_below(&repo);
    let git = |args: &[&str]| {
        run(
            &format!("git {args:?}"),
            Command::new("git")
                .arg("-C")
                .arg(&repo)
                .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost", "-c", "core.autocrlf=false"])
                .args(args),
        );
    };
    git(&["init", "-q"]);
    // Some crates ship .gitignore files; everything is committed all the same.
    git(&["add", "-A", "-f", "."]);
    git(&["commit", "-q", "-m", "sources"]);
    Sources { archive, repo, files }
}

fn timed(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

/// Drains the node's work (`drain`), then writes every dirty page of the machine out
/// (`sync`): a turn does not pay for writing out what the turn before it left in the
/// page cache (the mount's turn leaves two nodes' stores of the tree, which the native
/// turn after it paid for: its `tar x` took 5.8 s in one run and 24.3 s in the next).
fn settle(drain: &dyn Fn()) {
    drain();
    run("sync", &mut Command::new("sync"));
}

/// Runs the three tools on each `(name, directory)`; each turn starts settled
/// ([`settle`]). Each directory must be empty and is left empty.
pub fn run_all(systems: &[(&str, PathBuf)], src: &Sources, drain: &dyn Fn()) -> Vec<Times> {
    let mut out = vec![Times::default(); systems.len()];
    for ((_, d), t) in systems.iter().zip(&mut out) {
        settle(drain);
        let into = d.join("x");
        std::fs::create_dir(&into).unwrap();
        t.tar_x = timed(|| run("tar x", Command::new("tar").arg("-xf").arg(&src.archive).arg("-C").arg(&into)));
        assert_eq!(files_below(&into), src.files, "tar x unpacked every file");
    }
    for ((_, d), t) in systems.iter().zip(&mut out) {
        settle(drain);
        let into = d.join("clone");
        // --no-local: the objects come through git's transport, as from a remote, not as
        // hard links (which cannot cross into another file system).
        t.git_clone = timed(|| run("git clone", Command::new("git").args(["clone", "-q", "--no-local"]).arg(&src.repo).arg(&into)));
        assert_eq!(files_below(&into) - files_below(&into.join(".git")), src.files, "git clone checked out every file");
    }
    for ((_, d), t) in systems.iter().zip(&mut out) {
        settle(drain);
        t.rm_rf = timed(|| run("rm -rf", Command::new("rm").arg("-rf").arg(d.join("x")).arg(d.join("clone"))));
        assert_eq!(std::fs::read_dir(d).unwrap().count(), 0, "rm -rf removed everything");
    }
    out
}

pub fn print(systems: &[(&str, PathBuf)], times: &[Times], src: &Sources, drained: Duration) {
    println!(
        "{} real source files ({} MiB archive; seconds, lower is better; the mount syncs to a second node meanwhile):",
        src.files,
        std::fs::metadata(&src.archive).map(|m| m.len() >> 20).unwrap_or(0)
    );
    crate::metadata::print_header("tool", systems);
    let row = |name: &str, f: fn(&Times) -> f64| crate::metadata::print_row(name, &times.iter().map(f).collect::<Vec<_>>(), 2);
    row("tar x", |t| t.tar_x);
    row("git clone --no-local", |t| t.git_clone);
    row("rm -rf (both trees)", |t| t.rm_rf);
    println!("(the node's queue of changes took {:.1} s in all to drain after the mount's turns)", drained.as_secs_f64());
}
