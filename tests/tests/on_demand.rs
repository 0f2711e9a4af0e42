//! Files on demand (issue 15) on real mounts and the real broker: a node started with
//! `--on-demand` shows every name, size and mode of the tree without pulling a byte;
//! the first open fetches the content; with no holder reachable a read fails with
//! EHOSTUNREACH while `ls` and `stat` go on working; `syncctl pin` fetches a subtree now
//! and keeps new contents below it local, also after a restart; writing into a file
//! that is not here fetches it first, and overwriting it fetches nothing; a cache
//! budget evicts the least recently used but never the last copy; a large file streams:
//! its first bytes read while the rest has not come, and a holder that lies about a
//! block never gets a byte of it to a reader; what a stream had when its reader closed
//! early is not fetched again by the next open.

mod api_support;

use api_support::*;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use system_tests::*;

/// A manager, a plain node n1 and an on-demand node n2.
fn start(name: &str) -> Cluster {
    let mut c = Cluster::start(name, 1);
    let n2 = NodeProc::start_with(c.dir.path(), "n2", &c.vhost, &["--on-demand"]);
    n2.wait_connected();
    c.nodes.push(n2);
    c
}

/// (path, size, mode) of everything below `root`, by `stat` only (no content is read).
fn metadata(root: &Path) -> Vec<(String, u64, u32)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else { continue };
            if m.is_dir() {
                dirs.push(p.clone());
            }
            out.push((p.strip_prefix(root).unwrap().display().to_string(), if m.is_dir() { 0 } else { m.len() }, m.mode()));
        }
    }
    out.sort();
    out
}

fn residency(n: &NodeProc) -> serde_json::Value {
    n.status()["residency"].clone()
}

fn remote_files(n: &NodeProc) -> u64 {
    residency(n)["remote_files"].as_u64().unwrap()
}

fn pulled(n: &NodeProc) -> u64 {
    n.status()["bytes_pulled"].as_u64().unwrap()
}

/// The errno of reading `p` whole, if it fails.
fn read_errno(p: &Path) -> Option<i32> {
    std::fs::read(p).err().map(|e| e.raw_os_error().unwrap_or(0))
}

#[test]
fn an_on_demand_node_shows_the_tree_at_once_and_fetches_a_content_when_it_is_read() {
    let mut c = start("ondemand-read");
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    for d in 0..4 {
        std::fs::create_dir_all(a.p(&format!("src/d{d}"))).unwrap();
        for f in 0..25 {
            write(&a.p(&format!("src/d{d}/f{f}.txt")), format!("file {d}/{f}\n").repeat(f + 1).as_bytes());
        }
    }
    let big = pseudo_random(6 << 20, 7);
    write(&a.p("big.bin"), &big);
    std::fs::set_permissions(a.p("src/d1/f3.txt"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    eventually("b to show every name, size and mode", DEADLINE, || metadata(&b.mount) == metadata(&a.mount) && a.pending() == 0);
    assert_eq!(remote_files(b), 101, "no content came with the metadata: {}", residency(b));
    assert_eq!(pulled(b), 0);

    // The first open fetches the content; the bytes are the holder's.
    assert_eq!(read(&b.p("big.bin")).unwrap(), big);
    assert_eq!(read(&b.p("src/d2/f7.txt")).unwrap(), read(&a.p("src/d2/f7.txt")).unwrap());
    // A stream read to its end is installed after its reader closed (it once was
    // cancelled then, when the close came before the install).
    eventually("the two contents read to be local", DEADLINE, || remote_files(b) == 99);
    assert!(pulled(b) >= big.len() as u64);

    // No holder reachable: the tree is still there, a content not here fails to read
    // with EHOSTUNREACH (never empty bytes), what was fetched still reads.
    c.nodes[0].stop();
    let b = &c.nodes[1];
    assert_eq!(metadata(&b.mount).len(), 106, "ls and stat work with no holder reachable");
    assert_eq!(std::fs::metadata(b.p("src/d3/f9.txt")).unwrap().len(), "file 3/9\n".len() as u64 * 10);
    assert_eq!(read_errno(&b.p("src/d3/f9.txt")), Some(libc::EHOSTUNREACH));
    assert_eq!(read(&b.p("big.bin")).unwrap(), big, "what was fetched stays readable");
    let log = std::fs::read_to_string(&b.log).unwrap();
    assert!(log.contains("EHOSTUNREACH"), "the node's log says why the read failed");

    // Once a holder is back (it serves on a new port, which the manager names once the
    // node has told it), the same read succeeds.
    c.nodes[0].restart();
    c.nodes[0].wait_connected();
    c.wait_known_to_manager(0);
    let expected = read(&c.nodes[0].p("src/d3/f9.txt")).unwrap();
    assert_eq!(read(&c.nodes[1].p("src/d3/f9.txt")).unwrap(), expected);
}

#[test]
fn pin_fetches_a_subtree_now_keeps_new_contents_local_and_survives_a_restart() {
    let mut c = start("ondemand-pin");
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    for d in ["keep", "keep/deeper", "other"] {
        std::fs::create_dir_all(a.p(d)).unwrap();
        for f in 0..10 {
            write(&a.p(&format!("{d}/f{f}")), format!("{d} {f}").as_bytes());
        }
    }
    eventually("b to show the tree", DEADLINE, || metadata(&b.mount) == metadata(&a.mount) && a.pending() == 0);
    assert_eq!(remote_files(b), 30);

    let (ok, out, err) = b.syncctl(&["pin", b.p("keep").to_str().unwrap()]);
    assert!(ok, "syncctl pin: {out} {err}");
    assert!(out.contains("20 file(s) being fetched"), "{out}");
    eventually("keep/ to be fetched", DEADLINE, || remote_files(b) == 10);
    assert_eq!(residency(b)["pins"], serde_json::json!([["keep", true]]));

    // A new content below a pinned directory comes with its entry.
    write(&a.p("keep/new"), b"new and pinned");
    write(&a.p("other/new"), b"new, on demand");
    eventually("b to show both new files", DEADLINE, || b.p("keep/new").exists() && b.p("other/new").exists() && a.pending() == 0);
    eventually("keep/new to be local", DEADLINE, || remote_files(b) == 11);

    // The pins live in node.db: after a restart of b, with its only holder gone, the
    // pinned tree reads and the rest fails with EHOSTUNREACH.
    c.nodes[1].restart();
    c.nodes[1].wait_connected();
    c.nodes[0].stop();
    let b = &c.nodes[1];
    assert_eq!(residency(b)["pins"], serde_json::json!([["keep", true]]));
    for f in 0..10 {
        assert_eq!(read(&b.p(&format!("keep/deeper/f{f}"))).unwrap(), format!("keep/deeper {f}").into_bytes());
    }
    assert_eq!(read(&b.p("keep/new")).unwrap(), b"new and pinned");
    assert_eq!(read_errno(&b.p("other/new")), Some(libc::EHOSTUNREACH));

    // Unpinned again: a new content below it comes on demand.
    c.nodes[0].restart();
    c.nodes[0].wait_connected();
    let (ok, _, err) = c.nodes[1].syncctl(&["unpin", c.nodes[1].p("keep").to_str().unwrap()]);
    assert!(ok, "{err}");
    write(&c.nodes[0].p("keep/later"), b"later");
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    eventually("b to show keep/later", DEADLINE, || b.p("keep/later").exists() && a.pending() == 0);
    assert_eq!(remote_files(b), 12, "keep/later came without its content: {}", residency(b));
    assert_eq!(read(&b.p("keep/later")).unwrap(), b"later");
}

#[test]
fn writing_into_a_file_that_is_not_here_fetches_it_first_and_an_overwrite_fetches_nothing() {
    let c = start("ondemand-write");
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let old = pseudo_random(1 << 20, 3);
    write(&a.p("append.log"), &old);
    write(&a.p("replace.bin"), &pseudo_random(2 << 20, 4));
    eventually("b to show both files", DEADLINE, || metadata(&b.mount) == metadata(&a.mount) && a.pending() == 0);
    assert_eq!(pulled(b), 0);

    let mut f = std::fs::OpenOptions::new().append(true).open(b.p("append.log")).unwrap();
    f.write_all(b"one more line\n").unwrap();
    drop(f);
    let mut expected = old.clone();
    expected.extend_from_slice(b"one more line\n");
    eventually("a to have the appended file", DEADLINE, || read(&a.p("append.log")).as_deref() == Some(&expected[..]));
    let after_append = pulled(b);
    assert!(after_append >= old.len() as u64, "the append fetched the file first");

    write(&b.p("replace.bin"), b"all new");
    eventually("a to have the overwrite", DEADLINE, || read(&a.p("replace.bin")).as_deref() == Some(&b"all new"[..]));
    assert_eq!(pulled(b), after_append, "an overwrite (O_TRUNC) fetched nothing");
    c.converged();
}

fn cache(n: &NodeProc) -> serde_json::Value {
    n.status()["cache"].clone()
}

fn local_bytes(n: &NodeProc) -> u64 {
    residency(n)["local_bytes"].as_u64().unwrap()
}

#[test]
fn a_small_cache_evicts_the_least_recently_used_but_never_the_last_copy() {
    let mut c = Cluster::start("ondemand-evict", 1);
    let n2 = NodeProc::start_with(c.dir.path(), "n2", &c.vhost, &["--on-demand", "--cache-size", "1MiB", "--gc-every-secs", "1"]);
    n2.wait_connected();
    c.nodes.push(n2);
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let files: Vec<Vec<u8>> = (0..6).map(|i| pseudo_random(400 << 10, 100 + i)).collect();
    for (i, f) in files.iter().enumerate() {
        write(&a.p(&format!("f{i}")), f);
    }
    eventually("b to show the files", DEADLINE, || metadata(&b.mount) == metadata(&a.mount) && a.pending() == 0);
    // Read them all on b: 2.4 MiB through a 1 MiB cache.
    for (i, f) in files.iter().enumerate() {
        assert_eq!(read(&b.p(&format!("f{i}"))).unwrap(), *f);
    }
    eventually("b's cache to be within its budget", DEADLINE, || local_bytes(b) <= 1 << 20 && cache(b)["evicted_contents"].as_u64().unwrap() >= 4);
    // The last read is the most recently used: it stays; an evicted one comes back.
    assert_eq!(remote_files(b), 6 - (local_bytes(b) / (400 << 10)));
    assert!(local_bytes(b) >= 400 << 10, "the most recently used content stays: {}", residency(b));
    assert_eq!(read(&b.p("f0")).unwrap(), files[0], "an evicted content is fetched again");

    // With a away, what b writes is the only copy: it is never evicted.
    c.nodes[0].stop();
    let b = &c.nodes[1];
    let own: Vec<Vec<u8>> = (0..4).map(|i| pseudo_random(400 << 10, 200 + i)).collect();
    for (i, f) in own.iter().enumerate() {
        write(&b.p(&format!("own{i}")), f);
    }
    eventually("the manager to refuse evicting b's only copies", DEADLINE, || cache(b)["last_copies_kept"].as_u64().unwrap() >= 4);
    for (i, f) in own.iter().enumerate() {
        assert_eq!(read(&b.p(&format!("own{i}"))).unwrap(), *f, "b's own file is still here with no other holder");
    }
    // Once a holds them too, they may go.
    c.nodes[0].restart();
    c.nodes[0].wait_connected();
    let a = &c.nodes[0];
    eventually("a to have b's files", DEADLINE, || (0..4).all(|i| read(&a.p(&format!("own{i}"))).as_deref() == Some(&own[i][..])));
    eventually("b's cache to be within its budget again", DEADLINE, || local_bytes(&c.nodes[1]) <= 1 << 20);
}

#[test]
fn a_large_file_streams_its_first_bytes_read_before_the_rest_and_a_lying_block_never_reaches_a_reader() {
    let big = pseudo_random(24 << 20, 11);
    let other = pseudo_random(8 << 20, 12);
    let setup = StalledHolder::start("ondemand-stream", &big, &other, &["--pull-stall-secs", "60"]);
    let (m, n2, hashes) = (&setup.m, &setup.n2, &setup.hashes);

    // The first 4 KiB read while the rest of the file has not come (and never will).
    let mut f = std::fs::File::open(n2.p("big.bin")).unwrap();
    let mut head = vec![0u8; 4096];
    if let Err(e) = f.read_exact(&mut head) {
        dump_log("n2", &n2.log);
        panic!("reading the head of big.bin: {e}");
    }
    assert_eq!(head, big[..4096]);
    let pulls = n2.status()["pulls"].clone();
    let this = pulls.as_array().unwrap().iter().find(|p| p["hash"] == hashes[0]).unwrap_or_else(|| panic!("the stream is under way: {pulls}"));
    assert!(this["done"].as_u64().unwrap() < big.len() as u64, "read before the whole file came: {this}");
    assert_eq!(this["size"].as_u64().unwrap(), big.len() as u64);
    // The manager hears of it in n2's heartbeats (the dashboard shows it).
    eventually("n2's heartbeat to name the fetch", DEADLINE, || {
        let nodes = m.get_json("/api/nodes");
        let r = &nodes["nodes"].as_array().unwrap().iter().find(|n| n["id"] == "n2").unwrap()["residency"];
        r["pulls"].as_array().is_some_and(|p| p.iter().any(|p| p["hash"] == hashes[0] && p["done"].as_u64().unwrap() < big.len() as u64))
    });
    drop(f);

    // Every block of other.bin is a lie: the read fails; no wrong byte is returned.
    let err = std::fs::read(n2.p("other.bin")).expect_err("a read of lies fails");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = std::fs::read_to_string(&n2.log).unwrap();
    assert!(log.contains("sent a wrong block"), "the liar is named in the log");
}

/// Content bytes `n` served to peers.
fn served(n: &NodeProc) -> u64 {
    node_metrics(n).get("syncfs_node_bytes_served_total").copied().unwrap_or(0.0) as u64
}

#[test]
fn a_reader_that_closes_early_leaves_what_came_for_the_next_open() {
    let c = start("ondemand-resume");
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    let big = pseudo_random(48 << 20, 21);
    write(&n1.p("big.bin"), &big);
    eventually("n2 to show big.bin", DEADLINE, || std::fs::metadata(n2.p("big.bin")).is_ok_and(|m| m.len() == big.len() as u64));
    let hash = blake3::hash(&big).to_hex().to_string();
    let start = served(n1);

    // The first 16 MiB read, then the file closed: the stream is cancelled.
    let mut f = std::fs::File::open(n2.p("big.bin")).unwrap();
    let mut head = vec![0u8; 16 << 20];
    f.read_exact(&mut head).unwrap();
    assert!(head == big[..16 << 20], "the head read is not the file's");
    drop(f);
    eventually("the stream to end once nobody reads it", DEADLINE, || {
        let pulls = n2.status()["pulls"].clone();
        !pulls.as_array().unwrap().iter().any(|p| p["hash"] == hash.as_str())
    });
    let first = served(n1) - start;
    assert!(first >= 16 << 20, "the head came from n1: {first} bytes served");
    assert!(first < big.len() as u64, "the cancelled stream went on to fetch all of it ({first} bytes)");

    // The next open reads it all: the head comes from what the first stream had.
    let pulled_before = pulled(n2);
    assert!(std::fs::read(n2.p("big.bin")).unwrap() == big, "the whole file read is not the file");
    let total = served(n1) - start;
    // n2 counts as pulled only what the second stream fetched itself.
    let second = pulled(n2) - pulled_before;
    assert!(second + (16 << 20) <= big.len() as u64, "the second stream counts {second} bytes pulled of {}", big.len());
    // Runs in flight when the first stream was cancelled (1 MiB each, four) may be
    // fetched again.
    assert!(total <= big.len() as u64 + (4 << 20), "{total} bytes served for a {} byte file read twice ({first} the first time)", big.len());
    c.converged();
}
