//! Kept versions and the trash on real mounts and the real broker (issue 16): `rm -rf`
//! undone from another node to the exact tree, a script's overwrite undone, a restore
//! that must not overwrite a newer edit, a version whose keepers are all offline shown
//! unavailable, and the retention's end freeing the space on the keepers.

mod api_support;

use api_support::*;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use system_tests::*;

/// A manager with its REST API and `n` mounted nodes.
struct Setup {
    m: Manager,
    _dir: tempfile::TempDir,
    nodes: Vec<NodeProc>,
}

impl Setup {
    fn start(name: &str, n: usize, manager_args: &[&str]) -> Setup {
        let m = Manager::start_with(name, manager_args);
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<NodeProc> = (1..=n).map(|i| NodeProc::start(dir.path(), &format!("n{i}"), &m.vhost)).collect();
        for node in &nodes {
            node.wait_connected();
        }
        Setup { m, _dir: dir, nodes }
    }

    /// Every node's mount shows the same tree and nothing is pending.
    fn converged(&self) {
        let mut last = String::new();
        eventually("the mounts to converge", DEADLINE, || {
            let snaps: Vec<Tree> = self.nodes.iter().map(|n| snapshot(&n.mount)).collect();
            last = self.nodes.iter().zip(&snaps).map(|(n, s)| format!("--- {}\n{}", n.id, describe(s))).collect();
            snaps.windows(2).all(|w| w[0] == w[1]) && self.nodes.iter().all(|n| n.pending() == 0)
        });
        let _ = last;
    }

    /// The path's versions as the REST API lists them.
    fn versions(&self, path: &str) -> Vec<serde_json::Value> {
        self.m.get_json(&format!("/api/files/versions?path={path}"))["versions"].as_array().unwrap().clone()
    }

    /// The nodes that keep the newest old version of `path`, sorted.
    /// The keepers of `path`'s old version once there are `n` of them: each keeper
    /// confirms on its own, and the version is available with the first.
    fn old_keepers_once(&self, path: &str, n: usize) -> Vec<String> {
        eventually(&format!("{n} keepers of the old version of {path}"), DEADLINE, || self.old_keepers(path).len() >= n);
        self.old_keepers(path)
    }

    fn old_keepers(&self, path: &str) -> Vec<String> {
        let mut k: Vec<String> = self.versions(path)[1]["keepers"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()).collect();
        k.sort();
        k
    }

    /// Waits until every old version of `path` is available (its keepers confirmed).
    fn old_versions_kept(&self, path: &str, how_many: usize) {
        eventually(&format!("{how_many} old version(s) of {path} to be kept"), DEADLINE, || {
            let v = self.versions(path);
            v.iter().filter(|v| v.get("ended_ms").is_some() && v["version"].is_object() && v["available"] == true).count() >= how_many
        });
    }
}

fn set_mtime(p: &std::path::Path, secs: u64) {
    let f = std::fs::File::options().write(true).open(p).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(secs)).unwrap();
}

fn chmod(p: &std::path::Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn rm_rf_on_one_node_is_restored_from_another_to_the_exact_tree() {
    let s = Setup::start("versions-rmrf", 3, &[]);
    let (a, b) = (&s.nodes[0], &s.nodes[1]);
    std::fs::create_dir_all(a.p("proj/src/deep")).unwrap();
    write(&a.p("proj/README"), b"read me\n");
    write(&a.p("proj/src/main.rs"), b"fn main() {}\n");
    write(&a.p("proj/src/deep/data.bin"), &vec![7u8; 300_000]);
    write(&a.p("proj/run.sh"), b"#!/bin/sh\necho hi\n");
    chmod(&a.p("proj/run.sh"), 0o755);
    chmod(&a.p("proj/README"), 0o600);
    chmod(&a.p("proj/src"), 0o750);
    std::os::unix::fs::symlink("src/main.rs", a.p("proj/main")).unwrap();
    set_mtime(&a.p("proj/README"), 1_600_000_000);
    set_mtime(&a.p("proj/src/deep/data.bin"), 1_500_000_000);
    s.converged();
    let before = snapshot(&b.p("proj"));
    assert_eq!(before.len(), 7, "{}", describe(&before));

    std::fs::remove_dir_all(a.p("proj")).unwrap();
    eventually("the removal to reach every node", DEADLINE, || s.nodes.iter().all(|n| !n.p("proj").exists()));
    s.converged();

    let (ok, out, err) = b.syncctl(&["trash"]);
    assert!(ok, "syncctl trash: {err}");
    let line = out.lines().find(|l| l.starts_with("proj ")).unwrap_or_else(|| panic!("proj is in the trash: {out}"));
    assert!(line.contains("directory with 7 path(s) below") && line.contains("by n1"), "{line}");

    let (ok, out, err) = b.syncctl(&["restore", "proj"]);
    assert!(ok, "syncctl restore: {out} {err}");
    assert!(out.contains("restored 8 path(s)"), "{out}");
    for n in &s.nodes {
        eventually(&format!("proj to be back on {} as it was", n.id), DEADLINE, || snapshot(&n.p("proj")) == before);
    }
    s.converged();
    let (_, out, _) = b.syncctl(&["trash"]);
    assert!(!out.lines().any(|l| l.starts_with("proj ")), "restored: no longer in the trash: {out}");
}

#[test]
fn a_scripts_overwrite_is_undone_by_restoring_the_previous_revision() {
    let s = Setup::start("versions-overwrite", 3, &[]);
    let (a, c) = (&s.nodes[0], &s.nodes[2]);
    write(&a.p("report.txt"), b"the good text\n");
    write(&a.p("ledger.csv"), b"1,2,3\n4,5,6\n");
    s.converged();
    // A script gone wrong: one file rewritten, one truncated.
    write(&a.p("report.txt"), b"garbage");
    std::fs::File::options().write(true).open(a.p("ledger.csv")).unwrap().set_len(0).unwrap();
    s.converged();
    assert_eq!(read(&c.p("report.txt")).unwrap(), b"garbage");
    s.old_versions_kept("report.txt", 1);
    s.old_versions_kept("ledger.csv", 1);

    let (ok, out, err) = c.syncctl(&["versions", "report.txt"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].contains("current") && lines[1].contains("available") && lines[1].contains("n1"), "{out}");

    for f in ["report.txt", "ledger.csv"] {
        let (ok, out, err) = c.syncctl(&["restore", f]);
        assert!(ok && out.contains("restored 1 path(s)"), "restore {f}: {out} {err}");
    }
    for n in &s.nodes {
        eventually(&format!("the good contents back on {}", n.id), DEADLINE, || {
            read(&n.p("report.txt")).as_deref() == Some(b"the good text\n") && read(&n.p("ledger.csv")).as_deref() == Some(b"1,2,3\n4,5,6\n")
        });
    }
    s.converged();
    // The restore is a change like any other: the garbage is a kept version now.
    let v = s.versions("report.txt");
    assert_eq!(v.len(), 3);
    assert_eq!(v[0]["node"], "n3", "the restore is n3's change: {v:?}");
}

#[test]
fn a_restore_never_overwrites_a_path_changed_since() {
    let s = Setup::start("versions-changed", 2, &[]);
    let (a, b) = (&s.nodes[0], &s.nodes[1]);
    write(&a.p("notes.txt"), b"v1");
    s.converged();
    write(&a.p("notes.txt"), b"v2");
    s.converged();
    s.old_versions_kept("notes.txt", 1);
    let v = s.versions("notes.txt");
    let (seen, old) = (v[0]["rev"].as_u64().unwrap(), v[1]["rev"].as_u64().unwrap());
    // Someone edits again after the operator looked.
    write(&b.p("notes.txt"), b"v3, newer");
    s.converged();
    let r = s.m.call("POST", "/api/restore", Some(&format!(r#"{{"path":"notes.txt","rev":{old},"base":{seen}}}"#)));
    assert_eq!(r.status, 200, "{}", r.text());
    let report = r.json();
    assert_eq!(report["restored"].as_array().unwrap().len(), 0, "{report}");
    let copy = report["beside"][0][1].as_str().unwrap().to_string();
    assert_eq!(copy, format!("notes (restored r{old}).txt"));
    for n in &s.nodes {
        eventually(&format!("the restored copy beside the newer edit on {}", n.id), DEADLINE, || {
            read(&n.p(&copy)).as_deref() == Some(b"v1") && read(&n.p("notes.txt")).as_deref() == Some(b"v3, newer")
        });
    }
    // Asked from a node that has the newest revision, the same restore overwrites: the
    // asker saw what it replaces (and that is kept in turn).
    let (ok, out, err) = a.syncctl(&["restore", "notes.txt", "--rev", &old.to_string()]);
    assert!(ok && out.contains("restored 1 path(s)"), "{out} {err}");
    eventually("v1 back in place on b", DEADLINE, || read(&b.p("notes.txt")).as_deref() == Some(b"v1"));
    s.converged();
}

#[test]
fn a_version_whose_keepers_are_all_offline_is_shown_unavailable() {
    let mut s = Setup::start("versions-offline", 3, &[]);
    write(&s.nodes[0].p("plan.txt"), b"first plan");
    s.converged();
    write(&s.nodes[0].p("plan.txt"), b"second plan");
    s.converged();
    s.old_versions_kept("plan.txt", 1);
    let keepers = s.old_keepers_once("plan.txt", 2);
    assert_eq!(keepers.len(), 2, "two copies kept: {keepers:?}");
    let old = s.versions("plan.txt")[1]["rev"].as_u64().unwrap();
    for n in s.nodes.iter_mut().filter(|n| keepers.contains(&n.id)) {
        n.stop();
    }
    let asker = s.nodes.iter().find(|n| !keepers.contains(&n.id)).unwrap();
    eventually("the old version to be shown unavailable", DEADLINE, || {
        let (ok, out, _) = asker.syncctl(&["versions", "plan.txt", "--json"]);
        ok && serde_json::from_str::<serde_json::Value>(&out).unwrap()[1]["available"] == false
    });
    let (_, out, _) = asker.syncctl(&["versions", "plan.txt"]);
    assert!(out.lines().nth(1).unwrap().contains("UNAVAILABLE"), "{out}");
    let (ok, out, _) = asker.syncctl(&["restore", "plan.txt", "--rev", &old.to_string()]);
    assert!(!ok && out.contains("not restored"), "a restore of what nobody online keeps fails: {out}");
    assert_eq!(read(&asker.p("plan.txt")).unwrap(), b"second plan");
    // A keeper comes back: available again, and the restore works.
    let back = s.nodes.iter().position(|n| keepers.contains(&n.id)).unwrap();
    s.nodes[back].restart();
    s.nodes[back].wait_connected();
    let asker = s.nodes.iter().find(|n| !keepers.contains(&n.id)).unwrap();
    eventually("the old version to be available again", DEADLINE, || {
        let (ok, out, _) = asker.syncctl(&["versions", "plan.txt", "--json"]);
        ok && serde_json::from_str::<serde_json::Value>(&out).unwrap()[1]["available"] == true
    });
    let (ok, out, err) = asker.syncctl(&["restore", "plan.txt", "--rev", &old.to_string()]);
    assert!(ok, "{out} {err}");
    eventually("the first plan back", DEADLINE, || read(&asker.p("plan.txt")).as_deref() == Some(b"first plan"));
}

#[test]
fn the_end_of_the_retention_frees_the_space_on_the_keepers() {
    let s = Setup::start("versions-expiry", 2, &["--keep-for", "6s"]);
    let (a, b) = (&s.nodes[0], &s.nodes[1]);
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    write(&a.p("big.bin"), &big);
    s.converged();
    let old_blob = b.data.join("blobs").join(blake3::hash(&big).to_hex().as_str());
    assert!(old_blob.exists(), "b holds the content: {}", old_blob.display());
    let t0 = SystemTime::now();
    write(&a.p("big.bin"), b"small now");
    s.converged();
    s.old_versions_kept("big.bin", 1);
    for n in &s.nodes {
        assert!(n.status()["kept_bytes"].as_u64().unwrap() >= 2_000_000, "{} keeps the old version", n.id);
    }
    let (_, out, _) = b.syncctl(&["status"]);
    assert!(out.contains("versions:  1 old content(s) kept for the cluster, 2000000 bytes"), "{out}");
    assert!(old_blob.exists(), "kept past the node's GC");
    eventually("the retention to end and the space to be freed", DEADLINE, || s.nodes.iter().all(|n| n.status()["kept_bytes"] == 0) && !old_blob.exists());
    assert!(t0.elapsed().unwrap() >= Duration::from_secs(6), "not before the retention ended");
    assert_eq!(s.versions("big.bin").len(), 1, "only the current version is listed");
    let m = node_metrics(b);
    assert_eq!(m.get("syncfs_node_kept_bytes"), Some(&0.0));
}

#[test]
fn a_keeper_short_of_disk_drops_its_copy_and_another_node_fetches_it_from_a_keeper() {
    let mut s = Setup::start("versions-floor", 3, &[]);
    let old: Vec<u8> = (0..300_000u32).map(|i| (i % 199) as u8).collect();
    write(&s.nodes[0].p("plan.bin"), &old);
    s.converged();
    write(&s.nodes[0].p("plan.bin"), b"the new plan");
    s.converged();
    s.old_versions_kept("plan.bin", 1);
    let keepers = |s: &Setup| s.old_keepers("plan.bin");
    assert_eq!(s.old_keepers_once("plan.bin", 2), ["n2", "n3"], "the nodes that pulled it keep it, not the one that overwrote it");
    // n4 joins later: it never had the old version. n1 (which may still have its bytes)
    // goes away, so n4 is the only node that can take over a copy.
    let dir = s._dir.path().to_path_buf();
    s.nodes.push(NodeProc::start(&dir, "n4", &s.m.vhost));
    s.nodes[3].wait_connected();
    s.nodes[0].stop();
    eventually("n1 to be offline", DEADLINE, || {
        s.m.get_json("/api/nodes")["nodes"].as_array().unwrap().iter().any(|n| n["id"] == "n1" && n["online"] == false)
    });
    // n2 comes back with a free-space floor above what its disk has: its GC drops the copy.
    s.nodes[1].stop();
    s.nodes[1] = NodeProc::start_with(&dir, "n2", &s.m.vhost, &["--keep-min-free-mib", "1000000000", "--gc-every-secs", "1"]);
    s.nodes[1].wait_connected();
    eventually("n4 to keep the copy n2 dropped", DEADLINE, || keepers(&s) == ["n3", "n4"]);
    let blob = s.nodes[3].data.join("blobs").join(blake3::hash(&old).to_hex().as_str());
    assert!(blob.exists(), "n4 fetched the old content from n3: {}", blob.display());
    assert!(s.nodes[3].status()["kept_bytes"].as_u64().unwrap() >= 300_000);
    assert_eq!(s.nodes[1].status()["kept_bytes"], 0, "n2 keeps nothing below its floor");
    assert!(s.versions("plan.bin")[1]["available"] == true);
    let log = std::fs::read_to_string(&s.nodes[1].log).unwrap_or_default();
    assert!(log.contains("below the free-space floor"), "n2 says why it dropped it");
}

#[test]
fn a_removed_directory_is_restored_to_another_path_and_the_trash_lists_by_directory() {
    let s = Setup::start("versions-to", 2, &[]);
    let (a, b) = (&s.nodes[0], &s.nodes[1]);
    std::fs::create_dir_all(a.p("work/reports/2026")).unwrap();
    std::fs::create_dir_all(a.p("work/drafts")).unwrap();
    write(&a.p("work/reports/2026/q1.txt"), b"first quarter");
    write(&a.p("work/drafts/idea.txt"), b"an idea");
    s.converged();
    std::fs::remove_dir_all(a.p("work/reports")).unwrap();
    std::fs::remove_file(a.p("work/drafts/idea.txt")).unwrap();
    s.converged();
    // Below work/reports' parent: the removed directory and the removed file, each once.
    let (ok, out, err) = b.syncctl(&["trash", "work"]);
    assert!(ok, "{err}");
    let roots: Vec<&str> = out.lines().map(|l| l.split("  ").next().unwrap()).collect();
    assert_eq!(roots, ["work/drafts/idea.txt", "work/reports"], "{out}");
    let (_, out, _) = b.syncctl(&["trash", "work/drafts"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    // Restored beside where it was, under another name; the original path stays deleted.
    let (ok, out, err) = b.syncctl(&["restore", "work/reports", "--to", "work/reports-back"]);
    assert!(ok && out.contains("restored 3 path(s)"), "{out} {err}");
    for n in &s.nodes {
        eventually(&format!("the tree at its new path on {}", n.id), DEADLINE, || {
            read(&n.p("work/reports-back/2026/q1.txt")).as_deref() == Some(b"first quarter")
        });
        assert!(!n.p("work/reports").exists());
    }
    s.converged();
}

#[test]
fn a_keeper_that_lost_a_content_while_stopped_says_so_when_it_returns_and_another_keeps_it() {
    let mut s = Setup::start("versions-lost", 3, &[]);
    let old: Vec<u8> = (0..200_000u32).map(|i| (i % 97) as u8).collect();
    write(&s.nodes[0].p("notes.bin"), &old);
    s.converged();
    write(&s.nodes[0].p("notes.bin"), b"rewritten");
    s.converged();
    s.old_versions_kept("notes.bin", 1);
    let keepers = |s: &Setup| s.old_keepers("notes.bin");
    assert_eq!(s.old_keepers_once("notes.bin", 2), ["n2", "n3"]);
    // n2 stops, and its copy is lost meanwhile (a data directory restored from an old
    // backup, a disk swapped): it never got to say so.
    s.nodes[1].stop();
    let blob = s.nodes[1].data.join("blobs").join(blake3::hash(&old).to_hex().as_str());
    std::fs::remove_file(&blob).unwrap();
    s.nodes[1].restart();
    s.nodes[1].wait_connected();
    eventually("n1 to keep the copy n2 lost", DEADLINE, || keepers(&s) == ["n1", "n3"]);
    assert!(s.versions("notes.bin")[1]["available"] == true);
    let (ok, out, err) = s.nodes[1].syncctl(&["restore", "notes.bin"]);
    assert!(ok, "{out} {err}");
    for n in &s.nodes {
        eventually(&format!("the old notes back on {}", n.id), DEADLINE, || read(&n.p("notes.bin")).as_deref() == Some(&old[..]));
    }
}
