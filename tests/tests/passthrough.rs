//! Kernel passthrough (issue 2, sequential reads): a committed file opened read-only is
//! read by the kernel straight from the node's store, and none of the ways a file
//! changes while such a handle is open may show the wrong bytes anywhere.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::time::Duration;
use system_tests::*;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn read_all(f: &std::fs::File) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut off = 0u64;
    loop {
        let n = f.read_at(&mut buf, off).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
        off += n as u64;
    }
}

fn metric(n: &NodeProc, name: &str) -> f64 {
    node_metrics(n).get(name).copied().unwrap_or_else(|| panic!("{name} missing from {}'s metrics", n.id))
}

/// Whether the kernel granted passthrough to `n`'s mount. Without it (a kernel before
/// 6.9) the node reads through itself; the tests then still check every byte, but not
/// the passthrough counters, and say so.
fn kernel_passes_through(n: &NodeProc) -> bool {
    let on = metric(n, "syncfs_node_passthrough") == 1.0;
    if !on {
        eprintln!("NOTE: the kernel did not grant FUSE passthrough to {}: its counters are not checked", n.id);
    }
    on
}

#[test]
fn readers_pass_through_and_see_every_change_made_while_they_read() {
    let c = Cluster::start("passthrough", 2);
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let original = pattern(3 << 20, 7);
    // Two files with the same bytes share one blob in B's store.
    write(&a.p("x.bin"), &original);
    write(&a.p("twin.bin"), &original);
    c.converged();

    let pt = kernel_passes_through(b);
    let opens = metric(b, "syncfs_node_passthrough_opens_total");
    let reader = std::fs::File::open(b.p("x.bin")).unwrap();
    assert!(read_all(&reader) == original, "x.bin read through passthrough differs");
    if pt {
        assert_eq!(metric(b, "syncfs_node_passthrough_opens_total"), opens + 1.0, "the read-only open did not pass through");
    }
    // The twin's open cannot share x.bin's backing file: it is read through the node.
    let twin_reader = std::fs::File::open(b.p("twin.bin")).unwrap();
    assert!(read_all(&twin_reader) == original);

    // A writer opens x.bin while the reader holds it: the open passes through too (the
    // kernel allows nothing else) and the reader sees the writes, as on any file system.
    let detaches = metric(b, "syncfs_node_passthrough_detaches_total");
    let mut writer = std::fs::OpenOptions::new().read(true).write(true).open(b.p("x.bin")).unwrap();
    if pt {
        assert_eq!(metric(b, "syncfs_node_passthrough_detaches_total"), detaches + 1.0);
    }
    writer.write_all(b"NEW BYTES").unwrap();
    let mut expected = original.clone();
    expected[..9].copy_from_slice(b"NEW BYTES");
    expected.extend_from_slice(b" and a tail");
    writer.write_all_at(b" and a tail", original.len() as u64).unwrap();
    assert!(read_all(&reader) == expected, "the reader does not see the writer's bytes");
    // Size and contents as stat and a fresh open see them, before the writer closes.
    assert_eq!(std::fs::metadata(b.p("x.bin")).unwrap().len(), expected.len() as u64);
    // Times: an explicit mtime, then a write (which makes it "now"), then a change of
    // the atime alone must not bring the explicit mtime back.
    let y2001 = std::time::UNIX_EPOCH + Duration::from_secs(978_307_200);
    writer.set_modified(y2001).unwrap();
    writer.write_all_at(b"NEW", 0).unwrap();
    writer.set_times(std::fs::FileTimes::new().set_accessed(y2001)).unwrap();
    let mtime = std::fs::metadata(b.p("x.bin")).unwrap().modified().unwrap();
    assert!(mtime > y2001 + Duration::from_secs(3600), "the write's mtime was lost: {mtime:?}");
    assert!(read(&b.p("x.bin")).unwrap() == expected);
    // The twin and the store's blob it shares kept the old bytes.
    assert!(read_all(&twin_reader) == original, "a write to x.bin showed in twin.bin");
    assert!(read(&b.p("twin.bin")).unwrap() == original);
    drop(writer);

    // The change is committed and sent like any other.
    eventually("B's edit to reach A", Duration::from_secs(30), || read(&a.p("x.bin")).is_some_and(|d| d == expected));
    c.converged();
    assert!(read(&a.p("twin.bin")).unwrap() == original);

    // truncate(2) by path while the reader still holds the file.
    let t = std::ffi::CString::new(b.p("x.bin").as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::truncate(t.as_ptr(), 5) }, 0, "truncate: {}", std::io::Error::last_os_error());
    assert_eq!(read_all(&reader), b"NEW B", "the reader does not see the truncation");
    eventually("the truncation to reach A", Duration::from_secs(30), || read(&a.p("x.bin")).as_deref() == Some(&b"NEW B"[..]));

    // A change from A replaces the file: a new open sees it; the old handle keeps the
    // file it opened (as after a rename over it).
    let remote = pattern(1 << 20, 99);
    write(&a.p("x.bin"), &remote);
    eventually("A's version to reach B", Duration::from_secs(30), || read(&b.p("x.bin")).is_some_and(|d| d == remote));
    assert_eq!(read_all(&reader), b"NEW B");
    let mut fresh = Vec::new();
    std::fs::File::open(b.p("x.bin")).unwrap().read_to_end(&mut fresh).unwrap();
    assert!(fresh == remote);
    drop(reader);
    drop(twin_reader);

    c.converged();
    assert_eq!(conflict_files(&a.mount), Vec::<String>::new());
    assert!(read(&b.p("twin.bin")).unwrap() == original);
}

#[test]
fn a_writer_with_o_trunc_empties_the_file_under_its_readers() {
    let c = Cluster::start("pt-trunc", 2);
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let original = pattern(1 << 20, 3);
    write(&a.p("log.txt"), &original);
    c.converged();
    let reader = std::fs::File::open(b.p("log.txt")).unwrap();
    assert!(read_all(&reader) == original);
    let mut w = std::fs::File::create(b.p("log.txt")).unwrap();
    assert_eq!(read_all(&reader), b"", "the reader still sees the bytes O_TRUNC removed");
    w.write_all(b"line 1\n").unwrap();
    assert_eq!(read_all(&reader), b"line 1\n");
    drop(w);
    drop(reader);
    eventually("the new log to reach A", Duration::from_secs(30), || read(&a.p("log.txt")).as_deref() == Some(&b"line 1\n"[..]));
    c.converged();
    assert_eq!(conflict_files(&b.mount), Vec::<String>::new());
}

#[test]
fn no_passthrough_flag_keeps_every_read_in_the_node() {
    let c = Cluster::start("pt-off", 1);
    let dir = tempfile::tempdir().unwrap();
    let n = NodeProc::start_with(dir.path(), "plain", &c.vhost, &["--no-passthrough"]);
    n.wait_connected();
    write(&c.nodes[0].p("f"), b"through the node");
    eventually("f to reach the plain node", Duration::from_secs(30), || read(&n.p("f")).as_deref() == Some(&b"through the node"[..]));
    assert_eq!(metric(&n, "syncfs_node_passthrough"), 0.0);
    assert_eq!(metric(&n, "syncfs_node_passthrough_opens_total"), 0.0);
}

/// Writes `mib` MiB of distinct bytes to `p` (through the mount: one change).
fn write_large(p: &std::path::Path, mib: usize) -> Vec<u8> {
    let mut all = Vec::with_capacity(mib << 20);
    let mut f = std::fs::File::create(p).unwrap();
    for i in 0..mib {
        let chunk = pattern(1 << 20, i as u8);
        f.write_all(&chunk).unwrap();
        all.extend_from_slice(&chunk);
    }
    all
}

/// Waits until node `n` copies a file of `full` bytes into its tmp area (the copy a
/// detach of a passthrough backing file keeps, or a snapshot of one to hash), and
/// returns the copy's path.
fn copy_under_way(n: &NodeProc, full: u64) -> std::path::PathBuf {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let tmp = std::fs::read_dir(n.data.join("tmp")).unwrap();
        if let Some(e) = tmp.flatten().find(|e| e.metadata().is_ok_and(|m| m.len() < full)) {
            return e.path();
        }
        assert!(std::time::Instant::now() < deadline, "the node never copied the file");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether the copy at `p` is still in the node's hands: being made, or hashed (it
/// leaves the tmp area once installed or dropped).
fn still_copying(p: &std::path::Path) -> bool {
    p.exists()
}

/// With one thread answering the kernel, whatever that thread or the tree's lock waits
/// for, every operation of the mount waits for. A writer's open of a large file that
/// passthrough readers share copies the content first (the readers' file becomes the
/// writer's), and the last writer's close copies a snapshot to hash: the mount must go
/// on answering while those copies run.
#[test]
fn the_mount_answers_while_a_large_shared_file_is_copied() {
    let c = Cluster::start("pt-busy", 2);
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let mut expected = write_large(&a.p("big.bin"), 768);
    if !kernel_passes_through(a) {
        eprintln!("NOTE: without passthrough nothing here copies a file: the test has nothing to check");
        return;
    }
    let full = expected.len() as u64;
    let reader = std::fs::File::open(a.p("big.bin")).unwrap();
    let probe = |name: &str| {
        write(&a.p(name), name.as_bytes());
        assert_eq!(read(&a.p(name)).as_deref(), Some(name.as_bytes()));
    };
    let writer = std::thread::scope(|s| {
        let writer = s.spawn(|| std::fs::OpenOptions::new().write(true).open(a.p("big.bin")).unwrap());
        let copy = copy_under_way(a, full);
        probe("during-open.txt");
        assert!(still_copying(&copy), "the mount answered only once the copy for the writer's open had ended: the copy held it");
        writer.join().unwrap()
    });
    writer.write_all_at(b"written by the writer", 1 << 20).unwrap();
    expected[1 << 20..(1 << 20) + 21].copy_from_slice(b"written by the writer");
    assert!(read_all(&reader) == expected, "the reader does not see the writer's bytes");
    // The close: the writer's flush and then its release each commit a snapshot.
    std::thread::scope(|s| {
        let closing = s.spawn(move || drop(writer));
        let copy = copy_under_way(a, full);
        probe("during-flush.txt");
        assert!(still_copying(&copy), "the mount answered only once the flush's snapshot was copied: the copy held it");
        closing.join().unwrap();
    });
    let copy = copy_under_way(a, full);
    probe("during-release.txt");
    assert!(still_copying(&copy), "the mount answered only once the release's snapshot was copied: the copy held it");
    drop(reader);
    eventually("the writer's bytes to reach B", Duration::from_secs(120), || read(&b.p("big.bin")).is_some_and(|d| d == expected));
    c.converged();
    assert_eq!(read(&a.p("big.bin")).map(|d| d == expected), Some(true));
    assert_eq!(conflict_files(&a.mount), Vec::<String>::new());
}
