//! Ordinary operations on one mount reach the two others, byte for byte (issue 2).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use system_tests::*;

fn set_mode(p: &std::path::Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn every_operation_reaches_every_node() {
    let c = Cluster::start("ops", 3);
    let (a, b, n3) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);

    // Names: empty file, one byte, unicode, spaces.
    write(&a.p("empty"), b"");
    write(&a.p("one"), b"x");
    write(&a.p("über naïve 文件.txt"), "grüße".as_bytes());
    write(&b.p("with space.md"), b"# title\n");
    c.converged();
    assert_eq!(read(&n3.p("über naïve 文件.txt")).unwrap(), "grüße".as_bytes());
    assert_eq!(read(&n3.p("empty")).unwrap(), b"");

    // Appends, overwrite in the middle, truncate down and up.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().append(true).open(a.p("one")).unwrap();
        f.write_all(b"yz").unwrap();
        drop(f);
        let mut f = std::fs::OpenOptions::new().write(true).open(b.p("with space.md")).unwrap();
        f.seek(SeekFrom::Start(2)).unwrap();
        f.write_all(b"TI").unwrap();
    }
    c.converged();
    assert_eq!(read(&n3.p("one")).unwrap(), b"xyz");
    assert_eq!(read(&n3.p("with space.md")).unwrap(), b"# TItle\n");
    std::fs::OpenOptions::new().write(true).open(n3.p("one")).unwrap().set_len(1).unwrap();
    c.converged();
    assert_eq!(read(&a.p("one")).unwrap(), b"x");
    std::fs::OpenOptions::new().write(true).open(a.p("one")).unwrap().set_len(4).unwrap();
    c.converged();
    assert_eq!(read(&b.p("one")).unwrap(), b"x\0\0\0");

    // chmod, chown (numeric), mtime.
    set_mode(&a.p("one"), 0o600);
    std::os::unix::fs::chown(a.p("empty"), Some(1234), Some(4321)).unwrap();
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options().write(true).open(b.p("with space.md")).unwrap().set_modified(t).unwrap();
    c.converged();
    let m = std::fs::metadata(n3.p("one")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(n3.p("empty")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 4321));
    assert_eq!(std::fs::metadata(a.p("with space.md")).unwrap().modified().unwrap(), t);
    // A time past what a node keeps (nanoseconds in an i64: 2262) is clamped to it, as a
    // file system clamps a time to its range; it was wrapped to 1715.
    let far = std::time::UNIX_EPOCH + Duration::from_secs(10_413_792_000);
    std::fs::File::options().write(true).open(a.p("empty")).unwrap().set_modified(far).unwrap();
    let clamped = std::time::UNIX_EPOCH + Duration::from_nanos(i64::MAX as u64);
    assert_eq!(std::fs::metadata(a.p("empty")).unwrap().modified().unwrap(), clamped);
    c.converged();
    assert_eq!(std::fs::metadata(n3.p("empty")).unwrap().modified().unwrap(), clamped);

    // Nested directories, rename of a non-empty directory, rename over a file.
    std::fs::create_dir_all(a.p("d1/d2/d3")).unwrap();
    write(&a.p("d1/d2/d3/deep.txt"), b"deep");
    write(&a.p("d1/top.txt"), b"top");
    set_mode(&a.p("d1/d2"), 0o750);
    c.converged();
    std::fs::rename(b.p("d1"), b.p("moved")).unwrap();
    c.converged();
    assert_eq!(read(&a.p("moved/d2/d3/deep.txt")).unwrap(), b"deep");
    assert!(!a.p("d1").exists());
    write(&n3.p("target.txt"), b"old");
    write(&n3.p("source.txt"), b"new");
    c.converged();
    std::fs::rename(n3.p("source.txt"), n3.p("target.txt")).unwrap();
    c.converged();
    assert_eq!(read(&a.p("target.txt")).unwrap(), b"new");
    assert!(!b.p("source.txt").exists());

    // Symlinks (also dangling) and deletes of files and directories.
    std::os::unix::fs::symlink("moved/top.txt", a.p("link")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", a.p("dangling")).unwrap();
    c.converged();
    assert_eq!(std::fs::read_link(b.p("link")).unwrap().to_str().unwrap(), "moved/top.txt");
    assert_eq!(read(&b.p("link")).unwrap(), b"top");
    std::fs::remove_file(b.p("link")).unwrap();
    std::fs::remove_dir_all(b.p("moved")).unwrap();
    c.converged();
    assert!(!a.p("moved").exists() && !n3.p("link").exists());
    assert_eq!(c.manager.status().lines().filter(|l| l.contains("online")).count(), 3, "{}", c.manager.status());
    let (ok, human, _) = a.syncctl(&["status"]);
    assert!(ok && human.contains("online") && human.contains("revision:"), "{human}");
    assert!(a.status()["last_revision"].as_u64().unwrap() > 10);
}

#[test]
fn a_large_file_arrives_whole() {
    let c = Cluster::start("large", 3);
    let data: Vec<u8> = (0..64u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    write(&c.nodes[0].p("big.bin"), &data);
    c.converged_within(Duration::from_secs(120));
    for n in &c.nodes[1..] {
        assert!(read(&n.p("big.bin")).unwrap() == data, "big.bin differs on {}", n.id);
    }
}

#[test]
fn a_thousand_files_in_one_directory() {
    let c = Cluster::start("many", 3);
    std::fs::create_dir(c.nodes[1].p("many")).unwrap();
    for i in 0..1000 {
        write(&c.nodes[1].p(&format!("many/f{i:04}")), format!("file {i}").as_bytes());
    }
    c.converged_within(Duration::from_secs(120));
    assert_eq!(std::fs::read_dir(c.nodes[2].p("many")).unwrap().count(), 1000);
    assert_eq!(read(&c.nodes[0].p("many/f0999")).unwrap(), b"file 999");
}

/// A file's own earlier change is decided by the manager while the file is still open
/// and being written: `dd of=F` duplicates its descriptor and closes the original
/// before writing, so the empty file is committed and sent at once. The final close
/// must build on the revision that change got: it is the same writer's file, not a
/// conflict.
#[test]
fn writing_on_after_an_own_change_was_decided_is_no_conflict() {
    use std::io::Write;
    let c = Cluster::start("own-base", 2);
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let mut f = std::fs::File::create(a.p("grown.bin")).unwrap();
    drop(f.try_clone().unwrap()); // close(2) of a duplicate: the empty file is committed
    f.write_all(b"written before ").unwrap();
    // The empty file's change is decided and that decision has come back to A while
    // the file is being written. (Asked over HTTP: spawning `syncctl` would fork this
    // process, and the child's exec closes a copy of `f`, which commits the file.)
    let url = format!("{}/status", node_url(a));
    let pending = || serde_json::from_slice::<serde_json::Value>(&http_get(&url, None).1).unwrap()["pending_changes"].as_u64();
    eventually("A's empty file to be decided", Duration::from_secs(30), || pending() == Some(0) && read(&b.p("grown.bin")).is_some());
    f.write_all(b"and after the decision").unwrap();
    drop(f);
    let want = &b"written before and after the decision"[..];
    eventually("the content to reach B", Duration::from_secs(30), || read(&b.p("grown.bin")).as_deref() == Some(want) || !conflict_files(&b.mount).is_empty());
    c.converged();
    assert_eq!(conflict_files(&a.mount), Vec::<String>::new(), "a spurious conflict on A");
    assert_eq!(conflict_files(&b.mount), Vec::<String>::new(), "a spurious conflict on B");
}

/// What `tar x` and then `rm -rf` of parts of a big tree do: 20,000 creates, then 7,500
/// single deletes and 5 whole directories (5,000 files) removed, all on one node while
/// the other is connected. The other ends with exactly the files left, each with its
/// bytes: nothing lost, nothing left over.
#[test]
fn twenty_thousand_creates_and_deletes_on_one_node_converge() {
    let c = Cluster::start("bulk", 2);
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let dir = |d: usize| format!("bulk/d{d:02}");
    let file = |d: usize, f: usize| format!("bulk/d{d:02}/f{f:04}");
    std::fs::create_dir(a.p("bulk")).unwrap();
    for d in 0..20 {
        std::fs::create_dir(a.p(&dir(d))).unwrap();
        for f in 0..1000 {
            write(&a.p(&file(d, f)), format!("{d} {f}").as_bytes());
        }
    }
    let gone_dir = |d: usize| d % 4 == 3;
    for d in 0..20 {
        if gone_dir(d) {
            std::fs::remove_dir_all(a.p(&dir(d))).unwrap();
        } else {
            for f in (1..1000).step_by(2) {
                std::fs::remove_file(a.p(&file(d, f))).unwrap();
            }
        }
    }
    let kept: Vec<(usize, usize)> = (0..20).filter(|d| !gone_dir(*d)).flat_map(|d| (0..1000).step_by(2).map(move |f| (d, f))).collect();
    assert_eq!(kept.len(), 7_500);
    let count_on = |n: &NodeProc| -> usize {
        std::fs::read_dir(n.p("bulk")).map(|ds| ds.flatten().map(|d| std::fs::read_dir(d.path()).map(|fs| fs.count()).unwrap_or(0)).sum()).unwrap_or(0)
    };
    eventually("B to have as many files as A kept, with nothing pending anywhere", Duration::from_secs(600), || {
        a.pending() == 0 && b.pending() == 0 && count_on(b) == kept.len()
    });
    let dirs_on_b: Vec<String> = std::fs::read_dir(b.p("bulk")).unwrap().flatten().map(|d| d.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(dirs_on_b.len(), 15, "the removed directories are gone on B: {dirs_on_b:?}");
    for (d, f) in kept {
        assert_eq!(read(&b.p(&file(d, f))).as_deref(), Some(format!("{d} {f}").as_bytes()), "{} on B", file(d, f));
    }
    assert!(conflict_files(&b.mount).is_empty() && conflict_files(&a.mount).is_empty());
}
