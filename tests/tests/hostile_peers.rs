//! Peers that misbehave harm no one else: holders that never answer, stall mid-transfer,
//! trickle, stream for ever or send more than the content's size are dropped and the
//! node goes on syncing other paths (also while one sends just fast enough not to count
//! as stalled); 2,000 idle connections to a node's peer port do not
//! starve it; a flood of sync requests costs the manager one sync per second. Real broker,
//! real mounts, real HTTP; the hostile holder is a raw TCP server in this test.

#[path = "api_support/mod.rs"]
mod api_support;

use api_support::FakeNode;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use system_tests::*;
use wire::ToManager;

#[derive(Clone, Copy, Debug)]
enum Holder {
    /// Reads the request and never answers.
    Silent,
    /// Sends the headers and 1,000 bytes, then nothing.
    Stall,
    /// Sends one byte every 200 ms.
    Trickle,
    /// Sends zeros without end (no length).
    Endless,
    /// Sends a megabyte more than the content has (no length), then closes.
    TooMany,
    /// Announces twice the content's length.
    WrongLength,
    /// Sends 64 KiB (what a pull asks per stall window) every 1.5 s: never stalled by
    /// the rule, a pull of a large content from it would take half an hour.
    JustFastEnough,
}

/// How long a misbehaving connection is held open at most (the node gives up long before).
const HOLD: Duration = Duration::from_secs(60);

fn read_request(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        let n = s.read(&mut b).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
    }
    let line = String::from_utf8_lossy(&buf).lines().next()?.to_string();
    line.split(' ').nth(1).and_then(|p| p.strip_prefix("/content/")).map(str::to_string)
}

fn misbehave(mut s: TcpStream, how: Holder, size: u64) {
    let deadline = Instant::now() + HOLD;
    let head = |len: Option<u64>| match len {
        Some(n) => format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"),
        None => "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n".to_string(),
    };
    let zeros = vec![0u8; 64 * 1024];
    let _ = match how {
        Holder::Silent => {
            std::thread::sleep(HOLD);
            Ok(())
        }
        Holder::Stall => s.write_all(head(Some(size)).as_bytes()).and_then(|_| s.write_all(&zeros[..1000])).map(|_| std::thread::sleep(HOLD)),
        Holder::Trickle => s.write_all(head(Some(size)).as_bytes()).and_then(|_| {
            while Instant::now() < deadline {
                s.write_all(&[0u8])?;
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        }),
        Holder::Endless => s.write_all(head(None).as_bytes()).and_then(|_| {
            while Instant::now() < deadline {
                s.write_all(&zeros)?;
            }
            Ok(())
        }),
        Holder::TooMany => s.write_all(head(None).as_bytes()).and_then(|_| {
            let mut left = size + (1 << 20);
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                s.write_all(&zeros[..n])?;
                left -= n as u64;
            }
            Ok(())
        }),
        Holder::WrongLength => s.write_all(head(Some(size * 2)).as_bytes()).and_then(|_| s.write_all(&zeros)),
        Holder::JustFastEnough => s.write_all(head(Some(size)).as_bytes()).and_then(|_| {
            while Instant::now() < deadline {
                s.write_all(&zeros)?;
                std::thread::sleep(Duration::from_millis(1500));
            }
            Ok(())
        }),
    };
}

/// A content server that misbehaves per content hash; returns its base URL.
fn hostile_server(plan: HashMap<String, (Holder, u64)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let plan = plan.clone();
            std::thread::spawn(move || {
                let mut s = s;
                if let Some((how, size)) = read_request(&mut s).and_then(|h| plan.get(&h).copied()) {
                    misbehave(s, how, size);
                }
            });
        }
    });
    url
}

fn dir_bytes(d: &std::path::Path) -> u64 {
    std::fs::read_dir(d)
        .map(|it| {
            it.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn stuck_and_lying_holders_are_dropped_and_other_paths_keep_syncing() {
    let mut c = Cluster::start("hostile-holders", 0);
    c.nodes.push(NodeProc::start_with(c.dir.path(), "n1", &c.vhost, &["--pull-stall-secs", "2"]));
    c.add_node("n2");
    for n in &c.nodes {
        n.wait_connected();
    }
    let kinds = [Holder::Silent, Holder::Stall, Holder::Trickle, Holder::Endless, Holder::TooMany, Holder::WrongLength, Holder::JustFastEnough];
    let files: Vec<(String, Vec<u8>, Holder)> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let size = if matches!(k, Holder::JustFastEnough) { 64u64 << 20 } else { 1 << 20 };
            let bytes: Vec<u8> = (0..size).map(|j| (j as u8).wrapping_mul(i as u8 + 3).wrapping_add(i as u8)).collect();
            (format!("evil/{k:?}.bin").to_lowercase(), bytes, *k)
        })
        .collect();
    let plan = files.iter().map(|(_, b, k)| (blake3::hash(b).to_hex().to_string(), (*k, b.len() as u64))).collect();
    let url = hostile_server(plan);
    let evil = FakeNode::connect(&c.vhost, "evil");
    evil.send(ToManager::Heartbeat {
        url: url.clone(),
        pending_changes: 0,
        pending_pulls: 0,
        software: "evil 1".into(),
        residency: None,
        taken: wire::Revision(0),
        applied: wire::Revision(0),
    });
    for (path, bytes, _) in &files {
        evil.put_file(path, bytes);
    }
    // An honest change right behind them: it must not wait for the hostile pulls.
    let good = b"written on n2 after the hostile puts\n";
    write(&c.nodes[1].p("good.txt"), good);
    let t = Instant::now();
    let n1 = &c.nodes[0];
    eventually("good.txt on n1 while hostile holders hold its other pulls", DEADLINE, || read(&n1.p("good.txt")).as_deref() == Some(&good[..]));
    eprintln!("good.txt reached n1 after {:.1}s", t.elapsed().as_secs_f64());
    // Every hostile holder was dropped, for the reason it gave.
    let log_says = |what: &str| std::fs::read_to_string(&n1.log).unwrap_or_default().contains(what);
    eventually("n1 to drop every hostile holder", DEADLINE, || {
        log_says("did not answer within") && log_says("stalled") && log_says("sent more than") && log_says("offers 2097152 bytes")
    });
    // No unverified byte is visible, and the endless stream did not fill the disk.
    for (path, _, how) in &files {
        assert!(read(&n1.p(path)).is_none(), "{path} ({how:?}) appeared on n1 without its verified content");
    }
    let used = dir_bytes(&n1.data);
    assert!(used < 64 << 20, "n1's data directory holds {used} bytes after the hostile pulls");
    // And n1 keeps syncing both ways.
    write(&n1.p("after.txt"), b"after");
    eventually("after.txt on n2", DEADLINE, || read(&c.nodes[1].p("after.txt")).as_deref() == Some(&b"after"[..]));
}

fn raise_own_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

#[test]
fn two_thousand_idle_connections_do_not_starve_a_node() {
    raise_own_fd_limit();
    let c = Cluster::start("idle-conns", 2);
    let addr = node_url(&c.nodes[0]).trim_start_matches("http://").to_string();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // 2,000 attackers, each holding an idle connection and opening a new one as soon as
    // the node closes it, for as long as the test runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..2000 {
        let (addr, stop, opened) = (addr.clone(), stop.clone(), opened.clone());
        rt.spawn(async move {
            use tokio::io::AsyncReadExt;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(&addr)).await {
                    Ok(Ok(mut s)) => {
                        opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let mut b = [0u8; 64];
                        let _ = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b)).await;
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    }
    eventually("2,000 idle connections to n1's peer port", DEADLINE, || opened.load(std::sync::atomic::Ordering::Relaxed) >= 2000);
    // While they are held: n1's mount works, and files go both ways (n2 pulls from n1's
    // crowded port, n1 pulls from n2).
    write(&c.nodes[0].p("from-n1.txt"), b"one");
    write(&c.nodes[1].p("from-n2.txt"), b"two");
    c.converged();
    assert_eq!(read(&c.nodes[1].p("from-n1.txt")).as_deref(), Some(&b"one"[..]));
    assert_eq!(read(&c.nodes[0].p("from-n2.txt")).as_deref(), Some(&b"two"[..]));
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    let accept_errors = log.matches("accepting an HTTP connection").count();
    assert!(accept_errors < 50, "n1 logged {accept_errors} accept errors");
    eprintln!("{} attacking connections opened", opened.load(std::sync::atomic::Ordering::Relaxed));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    rt.shutdown_background();
}

#[test]
fn a_flood_of_sync_requests_costs_one_sync_per_second() {
    let c = Cluster::start("sync-flood", 1);
    let n = &c.nodes[0];
    let addr = node_url(n).trim_start_matches("http://").to_string();
    let syncs_before = std::fs::read_to_string(&n.log).unwrap().matches("sync done").count();
    let t = Instant::now();
    let answers: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..100)
            .map(|_| {
                let addr = addr.clone();
                s.spawn(move || {
                    let mut t = TcpStream::connect(&addr).unwrap();
                    t.write_all(b"POST /sync HTTP/1.1\r\nHost: n\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
                    let mut out = String::new();
                    let _ = t.read_to_string(&mut out);
                    out.lines().next().unwrap_or("").to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(answers.iter().all(|a| a.contains(" 200 ")), "{answers:?}");
    let syncs = std::fs::read_to_string(&n.log).unwrap().matches("sync done").count() - syncs_before;
    let allowed = t.elapsed().as_secs() as usize + 2;
    assert!(syncs <= allowed, "100 concurrent sync requests ran {syncs} syncs in {:?}", t.elapsed());
}
