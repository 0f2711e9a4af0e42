//! A crash at the wrong moment loses nothing closed and harms no one else: `kill -9` of
//! a node mid-write, mid-pull and right after an ftruncate, and of the manager with
//! decisions in flight; after a restart everything converges. A full disk on a node fails
//! writes with ENOSPC, keeps what was written before, and syncing resumes once space is
//! freed; a full disk under the manager's database gives up no node's change, and
//! deciding resumes once space is freed. Real broker, real mounts, real processes (docs/SEMANTICS.md, "Crashes and full
//! disks").

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use system_tests::*;

const MIB: usize = 1 << 20;

/// `len` bytes that differ with `seed` (BLAKE3's output stream of it).
fn bytes(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new().update(seed.as_bytes()).finalize_xof().fill(&mut out);
    out
}

fn assert_same(p: &Path, want: &[u8], what: &str) {
    let got = read(p);
    assert!(got.as_deref() == Some(want), "{what}: {} has {:?} bytes, not the {} expected", p.display(), got.map(|b| b.len()), want.len());
}

/// Polls `cond` (every millisecond: the moments these tests wait for are short) until
/// it holds; panics with `what` after `deadline`.
fn soon(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_node_killed_mid_write_comes_back_with_the_closed_version() {
    let mut c = Cluster::start("crash-write", 2);
    let v1 = bytes("v1", 8 * MIB);
    write(&c.nodes[0].p("big.bin"), &v1);
    c.converged();

    // A writer replaces the file (O_TRUNC) and is still writing when the node dies.
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (p, written) = (c.nodes[0].p("big.bin"), written.clone());
        std::thread::spawn(move || -> std::io::Error {
            let mut f = match std::fs::File::create(&p) {
                Ok(f) => f,
                Err(e) => return e,
            };
            let chunk = bytes("v2", MIB);
            while written.load(SeqCst) < 1 << 30 {
                if let Err(e) = f.write_all(&chunk) {
                    return e;
                }
                written.fetch_add(MIB as u64, SeqCst);
            }
            // Never closed: a close would commit what was written.
            std::mem::forget(f);
            std::io::Error::other("wrote 1 GiB and the node is still alive")
        })
    };
    eventually("4 MiB written", DEADLINE, || written.load(SeqCst) >= 4 * MIB as u64);
    c.nodes[0].kill9();
    let e = writer.join().unwrap();
    assert!(matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)), "the writer's write fails when the node dies: {e}");
    assert_same(&c.nodes[1].p("big.bin"), &v1, "the other node, while the writer's node is down");

    c.nodes[0].restart();
    c.nodes[0].wait_connected();
    c.converged();
    for n in &c.nodes {
        assert_same(&n.p("big.bin"), &v1, &format!("{} after the restart", n.id));
        assert!(conflict_files(&n.mount).is_empty(), "the partial write became a version on {}", n.id);
    }
}

/// A TCP relay in front of a node's peer server that holds each response after its
/// first `gate` bytes until `open` is called: a pull through it stops half-way, for as
/// long as the test needs.
struct GateRelay {
    port: u16,
    /// Connections held at the gate now.
    held: Arc<AtomicUsize>,
    open: Arc<(Mutex<bool>, Condvar)>,
}

impl GateRelay {
    fn start(upstream: u16, gate: u64) -> GateRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(AtomicUsize::new(0));
        let open = Arc::new((Mutex::new(false), Condvar::new()));
        let (h, o) = (held.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                });
                let (h, o) = (h.clone(), o.clone());
                std::thread::spawn(move || {
                    let (mut server, mut client) = (server, client);
                    let mut passed = 0u64;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if passed + n as u64 > gate && !*o.0.lock().unwrap() {
                            let first = (gate - passed.min(gate)) as usize;
                            if client.write_all(&buf[..first]).is_err() {
                                break;
                            }
                            h.fetch_add(1, SeqCst);
                            let _open = o.1.wait_while(o.0.lock().unwrap(), |open| !*open).unwrap();
                            h.fetch_sub(1, SeqCst);
                            if client.write_all(&buf[first..n]).is_err() {
                                break;
                            }
                        } else if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        passed += n as u64;
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        GateRelay { port, held, open }
    }

    fn open(&self) {
        *self.open.0.lock().unwrap() = true;
        self.open.1.notify_all();
    }
}

impl Drop for GateRelay {
    fn drop(&mut self) {
        self.open();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

#[test]
fn a_node_killed_mid_pull_gets_the_whole_file_after_restart() {
    let mut c = Cluster::start("crash-pull", 1);
    // n2's peer server is reached through a relay that stops every response after 4 MiB.
    let listen = free_port();
    let relay = GateRelay::start(listen, 4 * MIB as u64);
    let extra = vec!["--listen".to_string(), format!("127.0.0.1:{listen}"), "--advertise".to_string(), format!("http://127.0.0.1:{}", relay.port)];
    let n2 = NodeProc::start_opts(c.dir.path(), "n2", &c.vhost, NodeOpts { extra, ..Default::default() });
    c.nodes.push(n2);
    c.nodes[1].wait_connected();

    let body = bytes("pulled", 16 * MIB);
    write(&c.nodes[1].p("big.bin"), &body);
    eventually("n1 to be half-way through pulling big.bin", DEADLINE, || relay.held.load(SeqCst) > 0);
    let partial: u64 = files_in(&c.nodes[0].data.join("tmp")).iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
    assert!(partial > 0, "n1 holds part of the content in its tmp area");
    assert!(read(&c.nodes[0].p("big.bin")).is_none(), "no partial bytes are visible in n1's mount");
    c.nodes[0].kill9();
    relay.open();

    c.nodes[0].restart();
    c.nodes[0].wait_connected();
    c.converged();
    assert_same(&c.nodes[0].p("big.bin"), &body, "n1 after the restart");
    assert!(files_in(&c.nodes[0].data.join("tmp")).is_empty(), "the partial download is gone");
}

#[test]
fn a_node_killed_right_after_an_ftruncate_keeps_the_closed_version() {
    let mut c = Cluster::start("crash-ftruncate", 2);
    let body = bytes("closed", MIB);
    write(&c.nodes[0].p("f"), &body);
    write(&c.nodes[0].p("same content"), &body);
    c.converged();

    let f = std::fs::OpenOptions::new().write(true).open(c.nodes[0].p("f")).unwrap();
    f.set_len(10).unwrap();
    c.nodes[0].kill9();
    drop(f);

    c.nodes[0].restart();
    c.nodes[0].wait_connected();
    c.converged();
    for n in &c.nodes {
        assert_same(&n.p("f"), &body, &format!("{} after the restart", n.id));
        assert_same(&n.p("same content"), &body, &format!("{} after the restart", n.id));
    }
}

/// (decisions committed, messages of committed decisions not yet confirmed by the broker)
/// in the manager's database.
fn manager_progress(conn: &rusqlite::Connection) -> (u64, u64) {
    conn.query_row("SELECT (SELECT count(*) FROM applied), (SELECT count(*) FROM outbox)", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap_or((0, 0))
}

#[test]
fn the_manager_killed_with_decisions_in_flight_loses_no_closed_file() {
    // The writer goes on until both kills are done (so it is still writing at the first
    // kill however fast creates are), and writes at least this many files: a node sends a
    // burst's changes in few messages, and the manager decides them in few batches.
    const AT_LEAST: usize = 1000;
    let mut c = Cluster::start("crash-manager", 2);
    let content = |i: usize| format!("file {i}: {}", "x".repeat(i % 2000)).into_bytes();
    let closed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dir, closed, stop) = (c.nodes[0].mount.clone(), closed.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while i < AT_LEAST || !stop.load(SeqCst) {
                write(&dir.join(format!("f{i:03}")), &content(i));
                i += 1;
                closed.store(i, SeqCst);
            }
            i
        })
    };

    // Twice: while the writer's changes stream in, and while the restarted manager works
    // through what queued up while it was down. Each time the kill comes when a batch's
    // decisions are committed and the messages they cause are not all confirmed yet
    // (the manager acks the batch only after that).
    let db = rusqlite::Connection::open_with_flags(&c.manager.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut decided_before = 0;
    for round in 0..2 {
        soon(&format!("round {round}: a committed batch whose messages are still going out"), DEADLINE, || {
            let (decided, unsent) = manager_progress(&db);
            decided > decided_before && unsent > 0
        });
        c.manager.kill9();
        decided_before = manager_progress(&db).0;
        let at_kill = closed.load(SeqCst);
        // Let changes queue up while the manager is down.
        eventually("more files closed while the manager is down", DEADLINE, || closed.load(SeqCst) >= at_kill + 100);
        c.manager.restart();
    }
    stop.store(true, SeqCst);
    let files = writer.join().unwrap();
    c.converged();
    for n in &c.nodes {
        for i in 0..files {
            assert_same(&n.p(&format!("f{i:03}")), &content(i), &format!("f{i:03} on {}", n.id));
        }
    }
}

/// A tmpfs of its own at `sub` in a temporary directory (a node's data directory, a
/// manager's database), unmounted on drop (after its user: declare it before).
struct SmallDisk {
    dir: tempfile::TempDir,
    sub: &'static str,
}

impl SmallDisk {
    fn new(size: &str, sub: &'static str) -> SmallDisk {
        let dir = tempfile::Builder::new().prefix("syncfs-small-").tempdir().unwrap();
        let data = dir.path().join(sub);
        std::fs::create_dir(&data).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"]).arg(&data).output().unwrap();
        assert!(out.status.success(), "mounting a tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        SmallDisk { dir, sub }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join(self.sub)
    }

    /// Writes a file of zeros until the disk is full.
    fn fill(&self) -> PathBuf {
        let p = self.path().join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0u8; 64 << 10];
        let e = loop {
            if let Err(e) = f.write_all(&chunk) {
                break e;
            }
        };
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling {}: {e}", p.display());
        p
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        unmount(&self.path());
    }
}

/// Writes `bytes` to a new file; returns the error of the first call that failed.
fn try_write(p: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(p)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[test]
fn a_full_disk_fails_writes_with_enospc_and_syncing_resumes_when_space_is_freed() {
    let disk = SmallDisk::new("24m", "data-n2");
    let mut c = Cluster::start("crash-full", 1);
    let n2 = NodeProc::start(disk.dir.path(), "n2", &c.vhost);
    c.nodes.push(n2);
    c.nodes[1].wait_connected();
    let kept: Vec<Vec<u8>> = (0..4).map(|i| bytes(&format!("kept {i}"), MIB)).collect();
    for (i, b) in kept.iter().enumerate() {
        write(&c.nodes[1].p(&format!("kept{i}")), b);
    }
    c.converged();

    // Fill the disk through the mount.
    let mut f = std::fs::File::create(c.nodes[1].p("big")).unwrap();
    let chunk = bytes("filler", MIB);
    let mut filled = 0;
    let e = loop {
        match f.write_all(&chunk) {
            Ok(()) => filled += 1,
            Err(e) => break e,
        }
        assert!(filled < 64, "wrote 64 MiB to a 24 MiB disk");
    };
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "a write to a full disk fails with ENOSPC: {e}");
    drop(f);
    let e = try_write(&c.nodes[1].p("one more"), &chunk).expect_err("the disk is full");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "a new file on a full disk fails with ENOSPC: {e}");

    // What was closed before is intact on both nodes, and syncing goes on (the part of
    // `big` that fitted was committed when it was closed, as on a local disk).
    c.converged();
    for n in &c.nodes {
        for (i, b) in kept.iter().enumerate() {
            assert_same(&n.p(&format!("kept{i}")), b, &format!("kept{i} on {} with n2's disk full", n.id));
        }
    }

    // Deleting frees the space: new writes work and sync, both ways.
    std::fs::remove_file(c.nodes[1].p("big")).unwrap();
    let _ = std::fs::remove_file(c.nodes[1].p("one more"));
    let after = bytes("after", 4 * MIB);
    try_write(&c.nodes[1].p("after"), &after).expect("writing after space was freed");
    let from_n1 = bytes("from n1", 2 * MIB);
    write(&c.nodes[0].p("from n1"), &from_n1);
    c.converged();
    for n in &c.nodes {
        assert_same(&n.p("after"), &after, &format!("after on {}", n.id));
        assert_same(&n.p("from n1"), &from_n1, &format!("from n1 on {}", n.id));
        for (i, b) in kept.iter().enumerate() {
            assert_same(&n.p(&format!("kept{i}")), b, &format!("kept{i} on {}", n.id));
        }
    }
}

/// `manager::service::MAX_STOPS`: times a message may be in hand when the manager stops
/// before it is given up.
const MANAGER_MAX_STOPS: usize = 3;

/// Lines of the manager's log that say a session ended on a full disk.
fn full_disk_sessions(log: &Path) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.contains("session ended") && l.contains("full")).count()
}

#[test]
fn a_full_disk_under_the_manager_gives_up_no_change_and_deciding_resumes_when_space_is_freed() {
    let disk = SmallDisk::new("16m", "manager");
    let dir = tempfile::Builder::new().prefix("syncfs-crash-manager-full-").tempdir().unwrap();
    let vhost = Vhost::new("crash-manager-full");
    // Its log elsewhere, so that it says what happened.
    let manager = ManagerProc::start_logged(&disk.path(), &dir.path().join("manager.log"), &vhost.url(), &[]);
    let mut c = Cluster { nodes: Vec::new(), manager, vhost, dir };
    c.add_node("n1");
    c.add_node("n2");
    for n in &c.nodes {
        n.wait_connected();
    }
    let content = |name: &str| format!("{name}: {}", "y".repeat(3000)).into_bytes();
    // Some history, so the database and its log hold pages that small writes can reuse
    // while the disk is full (the case where a redelivered message's start is recorded
    // and its decision then fails).
    for i in 0..300 {
        write(&c.nodes[0].p(&format!("before{i:03}")), &content(&format!("before{i:03}")));
    }
    c.converged();

    let filler = disk.fill();
    let edited = content("edited on n2");
    write(&c.nodes[1].p("before000"), &edited);
    for i in 0..20 {
        write(&c.nodes[0].p(&format!("during{i:02}")), &content(&format!("during{i:02}")));
    }
    // The manager tries again and again, each time more than the stops after which it
    // gives up a message that keeps stopping it.
    let tries = MANAGER_MAX_STOPS + 2;
    eventually(&format!("{tries} sessions of the manager ended on its full disk"), DEADLINE, || full_disk_sessions(&c.manager.log) >= tries);
    assert_eq!(queue_depth(&c.vhost, wire::topology::DEAD_QUEUE), 0, "changes given up while the manager's disk was full");

    let (api, token) = c.manager.api();
    let health = || serde_json::from_slice::<serde_json::Value>(&http_get(&format!("{api}/api/health"), Some(&token)).1).unwrap();
    eventually("/api/health to say why the manager is not deciding", DEADLINE, || {
        health()["last_failure"].as_str().is_some_and(|f| f.contains("disk is full"))
    });
    // And that it is stuck, once its work has waited `STALLED_AFTER` (30 s).
    eventually("/api/health to say the manager is stuck", Duration::from_secs(90), || health()["ok"] == false);
    std::fs::remove_file(&filler).unwrap();
    c.converged();
    assert_eq!(queue_depth(&c.vhost, wire::topology::DEAD_QUEUE), 0, "changes given up after the manager's disk was full");
    assert_eq!(health()["ok"], true, "the manager is healthy again: {}", health());
    for n in &c.nodes {
        assert_same(&n.p("before000"), &edited, &format!("before000 on {}", n.id));
        for i in 0..20 {
            let name = format!("during{i:02}");
            assert_same(&n.p(&name), &content(&name), &format!("{name} on {}", n.id));
        }
    }
    assert!(conflict_files(&c.nodes[0].mount).is_empty(), "conflicts: {:?}", conflict_files(&c.nodes[0].mount));
}

/// A node's and the manager's logs on a disk that is full (logs written to a file, as
/// `fs-node … 2>>/var/log/…` would): what they cannot log is lost, nothing else. (The
/// logging library's fallback for a failed write printed to stderr again, and Rust's
/// `eprintln!` panics when that fails: the first line logged on a full disk killed the
/// process, and a node's mount with it.)
#[test]
fn a_full_disk_under_the_logs_stops_neither_the_nodes_nor_the_manager() {
    let disk = SmallDisk::new("4m", "logs");
    let dir = tempfile::Builder::new().prefix("syncfs-crash-logs-full-").tempdir().unwrap();
    let vhost = Vhost::new("crash-logs-full");
    let manager = ManagerProc::start_logged(dir.path(), &disk.path().join("manager.log"), &vhost.url(), &[]);
    let mut c = Cluster { nodes: Vec::new(), manager, vhost, dir };
    for id in ["n1", "n2"] {
        std::os::unix::fs::symlink(disk.path().join(format!("node-{id}.log")), c.dir.path().join(format!("node-{id}.log"))).unwrap();
        c.add_node(id);
    }
    for n in &c.nodes {
        n.wait_connected();
    }
    write(&c.nodes[0].p("before"), b"before the logs' disk filled up");
    c.converged();

    disk.fill();
    // And the room left in the last page of each log.
    for log in std::fs::read_dir(disk.path()).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "log")) {
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        let e = f.write_all(&[b'\n'; 8192]).expect_err("the disk is full");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling {}: {e}", log.display());
    }
    // Each sync is logged at `info`, on the node and on the manager.
    for n in &c.nodes {
        let (ok, out, err) = n.syncctl(&["sync"]);
        assert!(ok, "syncctl sync on {} with its log's disk full: {out}{err}", n.id);
    }
    for i in 0..20 {
        write(&c.nodes[0].p(&format!("after{i:02}")), format!("after {i}").as_bytes());
    }
    write(&c.nodes[1].p("before"), b"edited on n2");
    c.converged();
    for n in &c.nodes {
        assert!(is_mounted(&n.mount), "{}'s mount is gone", n.id);
        assert_eq!(read(&n.p("before")).as_deref(), Some(&b"edited on n2"[..]), "the edit on {}", n.id);
        for i in 0..20 {
            assert_eq!(read(&n.p(&format!("after{i:02}"))), Some(format!("after {i}").into_bytes()), "after{i:02} on {}", n.id);
        }
    }
    let (api, token) = c.manager.api();
    assert_eq!(http_get(&format!("{api}/api/health"), Some(&token)).0, 200, "the manager answers");
}
