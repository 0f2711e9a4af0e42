//! A node protects its machine: other local users cannot read synced bytes through its
//! data directory, start-up never unmounts what is not its own, and the mount is
//! `nosuid,nodev` with set-id bits from other nodes cleared.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use system_tests::*;

fn walk(d: &Path, out: &mut Vec<(std::path::PathBuf, u32)>) {
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        out.push((e.path(), m.permissions().mode()));
        if m.is_dir() {
            walk(&e.path(), out);
        }
    }
}

#[test]
fn the_data_directory_is_private() {
    let c = Cluster::start("private-data", 2);
    write(&c.nodes[0].p("secret.txt"), b"only for root\n");
    std::fs::set_permissions(c.nodes[0].p("secret.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    c.converged();
    for n in &c.nodes {
        let mode = std::fs::metadata(&n.data).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", n.data.display());
        let mut all = Vec::new();
        walk(&n.data, &mut all);
        assert!(all.iter().any(|(p, _)| p.ends_with("node.db")), "{all:?}");
        for (p, mode) in all {
            assert_eq!(mode & 0o077, 0, "{} is readable by others ({:o})", p.display(), mode & 0o777);
        }
    }
}

#[test]
fn start_up_refuses_to_unmount_what_is_not_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("taken");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "someone-elses", mnt.to_str().unwrap()]).status().unwrap();
    assert!(ok.success());
    std::fs::write(mnt.join("theirs.txt"), b"not ours").unwrap();
    let vhost = Vhost::new("refuse-mount");
    let mut child = Command::new(bin("fs-node"))
        .args(["--id", "n1", "--broker", &vhost.url(), "--mount"])
        .arg(&mnt)
        .arg("--data")
        .arg(tmp.path().join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < DEADLINE, "fs-node kept running over someone else's mount");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    let still = is_mounted(&mnt) && std::fs::read(mnt.join("theirs.txt")).ok().as_deref() == Some(&b"not ours"[..]);
    unmount(&mnt);
    assert!(!status.success(), "fs-node started over a tmpfs mount");
    assert!(err.contains("not this node's"), "{err}");
    assert!(still, "the tmpfs was unmounted or changed");
}

#[test]
fn set_id_bits_from_other_nodes_are_cleared_and_the_mount_is_nosuid() {
    let c = Cluster::start("setid", 2);
    let f = c.nodes[0].p("tool");
    write(&f, b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o6755)).unwrap();
    let other = c.nodes[1].p("tool");
    // The file comes as 0644 first (the write), then the chmod: wait for the chmod's
    // execute bits, whatever became of the set-id bits.
    let mode_on = |p: &Path| std::fs::metadata(p).ok().map(|m| m.permissions().mode() & 0o7777);
    eventually("tool's chmod on n2", DEADLINE, || mode_on(&other).is_some_and(|m| m & 0o755 == 0o755));
    let local = std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777;
    assert_eq!(local, 0o6755, "the writer's own file keeps its bits");
    let remote = mode_on(&other).unwrap();
    assert_eq!(remote, 0o755, "set-id bits arrived on n2: {remote:o}");
    let want = c.nodes[0].mount.to_string_lossy().to_string();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info.lines().find(|l| l.split(' ').nth(4) == Some(want.as_str())).expect("n1's mount in mountinfo");
    let opts = line.split(' ').nth(5).unwrap();
    assert!(opts.split(',').any(|o| o == "nosuid") && opts.split(',').any(|o| o == "nodev"), "{line}");
}

/// The mount clears set-id bits as the local disk does (Linux's rules: the kernel
/// leaves them to the node, which spares it a GETATTR before every chown): a change of
/// owner or group clears them, a truncation or a write by anyone but root too, and an
/// open with O_TRUNC by anyone but root; root's truncations and writes keep them, and
/// set-group-ID without group execute stays. Each step runs on a file of the mount and
/// on one of a local directory, and the two modes must agree.
#[test]
fn set_id_bits_go_as_on_the_local_disk() {
    let c = Cluster::start("setid-rules", 1);
    let native = tempfile::tempdir().unwrap();
    let mount = c.nodes[0].p("rules");
    std::fs::create_dir(&mount).unwrap();
    // The other user must reach both files.
    for d in [native.path(), c.nodes[0].mount.parent().unwrap()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"];
    let root: [&str; 0] = [];
    let cases: [(&str, u32, &[&str], &[&str]); 10] = [
        ("chown by root", 0o6777, &root, &["chown", "1000:1000"]),
        ("chgrp by the owner", 0o6777, &nobody, &["chgrp", "65534"]),
        ("chown keeps set-group-ID without group execute", 0o2767, &root, &["chown", "1000:1000"]),
        ("truncate by another user", 0o6777, &nobody, &["truncate", "-s", "3"]),
        ("truncate by root", 0o6777, &root, &["truncate", "-s", "3"]),
        ("write by another user", 0o6777, &nobody, &["sh", "-c", "echo more >> \"$0\""]),
        ("write by root", 0o6777, &root, &["sh", "-c", "echo more >> \"$0\""]),
        ("O_TRUNC by another user", 0o6777, &nobody, &["sh", "-c", ": > \"$0\""]),
        ("O_TRUNC by root", 0o6777, &root, &["sh", "-c", ": > \"$0\""]),
        ("chmod by root", 0o6777, &root, &["chmod", "6755"]),
    ];
    for (i, (what, mode, who, cmd)) in cases.iter().enumerate() {
        let after = |dir: &Path| {
            let f = dir.join(format!("f{i}"));
            write(&f, b"0123456789");
            std::os::unix::fs::chown(&f, Some(65534), Some(65534)).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(*mode)).unwrap();
            let argv: Vec<&str> = who.iter().chain(cmd.iter()).copied().collect();
            let out = Command::new(argv[0]).args(&argv[1..]).arg(&f).output().unwrap();
            assert!(out.status.success(), "{what} in {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777
        };
        let (on_disk, on_mount) = (after(native.path()), after(&mount));
        assert_eq!(format!("{on_mount:o}"), format!("{on_disk:o}"), "{what}: the mount's mode differs from the local disk's");
    }
}

/// A blob lost or damaged while the node was down (a bad disk block, someone deleting
/// files in the data dir) never shows as an empty or wrong file: reads fail until the
/// content is pulled again from another holder, which happens by itself.
#[test]
fn a_lost_or_damaged_blob_is_pulled_again_never_shown_empty() {
    let mut c = Cluster::start("heal", 2);
    let lost = vec![0x5au8; 300_000];
    let damaged = vec![0xa5u8; 200_000];
    write(&c.nodes[0].p("lost.bin"), &lost);
    write(&c.nodes[0].p("damaged.bin"), &damaged);
    c.converged();
    let n2 = &mut c.nodes[1];
    n2.stop();
    let blob = |bytes: &[u8]| n2.data.join("blobs").join(blake3::hash(bytes).to_hex().as_str());
    assert!(blob(&lost).exists() && blob(&damaged).exists(), "blobs are kept under data/blobs/<hash>");
    std::fs::remove_file(blob(&lost)).unwrap();
    std::fs::OpenOptions::new().write(true).open(blob(&damaged)).unwrap().set_len(1000).unwrap();
    n2.restart();
    for (name, want) in [("lost.bin", &lost), ("damaged.bin", &damaged)] {
        eventually(&format!("{name} healed on n2"), DEADLINE, || match std::fs::read(n2.p(name)) {
            Ok(got) => {
                assert!(got == *want, "{name} read {} wrong bytes on n2 before it was healed", got.len());
                true
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name}: {e}");
                false
            }
        });
        assert_eq!(std::fs::metadata(n2.p(name)).unwrap().len(), want.len() as u64);
    }
    let log = std::fs::read_to_string(&n2.log).unwrap();
    assert!(log.contains("is missing from the store: it will be pulled again"), "the lost blob is not reported in the log");
    assert!(log.contains("bytes, not 200000: removed, it will be pulled again"), "the damaged blob is not reported in the log");
}
