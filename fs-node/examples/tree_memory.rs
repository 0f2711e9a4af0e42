//! Heap bytes the node's in-memory tree keeps per file, at rest, counted by a counting
//! allocator (exact and repeatable, unlike a process's RSS, which also holds the
//! allocator's free lists and SQLite's page cache):
//! - `local`: files written through the tree (as on the node a user writes on), with
//!   every change decided by the manager (`apply_decided`), so nothing is queued;
//! - `remote`: the same files applied from the manager (as on every other node, and on
//!   a node joining), their content already in the store.
//!
//! `cargo run --release -p fs-node --example tree_memory -- [files]` (default 100,000),
//! in directories of 1,000, names as in the bench's tree row.

use fs_node::db::Db;
use fs_node::store::{put_bytes, ContentStore};
use fs_node::tree::{CreateOpen, Tree, ROOT};
use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use wire::{ChangeOp, Content, Entry, Outcome, RelPath, Revision, Version};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const PER_DIR: usize = 1000;
const BYTES: &[u8] = &[0x33; 1024];

fn open(dir: &std::path::Path) -> Tree {
    Tree::load(Db::open(&dir.join("node.db")).unwrap(), ContentStore::open(dir).unwrap()).unwrap()
}

fn local(n: usize) -> (usize, Tree) {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    let before = LIVE.load(Ordering::Relaxed);
    let mut rev = 0;
    let mut decide = |t: &Tree| {
        for row in t.take_unpublished() {
            rev += 1;
            let entry = Entry {
                path: row.change.path.clone(),
                rev: Revision(rev),
                version: match &row.change.op {
                    ChangeOp::Put { version } => Some(version.clone()),
                    _ => None,
                },
                holders: vec![],
                from_lost: None,
            };
            t.apply_decided(&row.msg, &Outcome::Accepted, &entry).unwrap();
        }
    };
    let mut d = ROOT;
    for i in 0..n {
        if i % PER_DIR == 0 {
            d = t.mkdir(ROOT, OsStr::new(&format!("d{:04}", i / PER_DIR)), 0o755, 0, 0).unwrap().ino;
        }
        let (_, fh) = t.create(d, OsStr::new(&format!("f{:04}", i % PER_DIR)), 0o644, 0, 0, CreateOpen::NEW).unwrap();
        t.write(fh, 0, BYTES).unwrap();
        t.flush(fh).unwrap();
        t.release(fh).unwrap();
        if i % 1000 == 999 {
            decide(&t);
        }
    }
    decide(&t);
    assert_eq!(t.stats().pending_changes, 0);
    (LIVE.load(Ordering::Relaxed) - before, t)
}

fn remote(n: usize) -> (usize, Tree) {
    let dir = tempfile::tempdir().unwrap();
    let hash = put_bytes(&ContentStore::open(dir.path()).unwrap(), BYTES).unwrap();
    let t = open(dir.path());
    let before = LIVE.load(Ordering::Relaxed);
    let version = |content| Some(Version { content, mode: 0o644, uid: 0, gid: 0, mtime_ns: 1 });
    let mut rev = 0;
    for i in 0..n {
        let mut apply = |path: String, content| {
            rev += 1;
            t.apply_remote(&Entry { path: RelPath::new(path).unwrap(), rev: Revision(rev), version: version(content), holders: vec![], from_lost: None })
                .unwrap();
        };
        if i % PER_DIR == 0 {
            apply(format!("d{:04}", i / PER_DIR), Content::Dir);
        }
        apply(format!("d{:04}/f{:04}", i / PER_DIR, i % PER_DIR), Content::File { hash: hash.clone(), size: BYTES.len() as u64 });
    }
    (LIVE.load(Ordering::Relaxed) - before, t)
}

fn main() {
    let n: usize = std::env::args().nth(1).map(|a| a.parse().expect("a number of files")).unwrap_or(100_000);
    for (name, (bytes, tree)) in [("local", local(n)), ("remote", remote(n))] {
        println!("{name}: {n} files, {} heap bytes per file in the tree", bytes / n);
        drop(tree);
    }
}
