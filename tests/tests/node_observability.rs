//! What a node shows about itself: `syncctl status --watch` lines, Prometheus metrics
//! whose counters move when files sync, and the cluster token on its HTTP server.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use system_tests::*;

#[test]
fn metrics_move_when_files_sync() {
    let c = Cluster::start("metrics", 2);
    let url = node_url(&c.nodes[1]);
    let (s, body) = http_get(&format!("{url}/metrics"), None);
    assert_eq!(s, 200);
    let before = parse_metrics(&String::from_utf8(body).unwrap());
    assert_eq!(before["syncfs_node_connected"], 1.0);
    write(&c.nodes[0].p("m.bin"), &vec![7u8; 300_000]);
    c.converged();
    let (_, body) = http_get(&format!("{url}/metrics"), None);
    let after = parse_metrics(&String::from_utf8(body).unwrap());
    assert!(after["syncfs_node_bytes_pulled_total"] >= before["syncfs_node_bytes_pulled_total"] + 300_000.0, "{after:?}");
    assert!(after["syncfs_node_messages_in_total"] > before["syncfs_node_messages_in_total"]);
    assert!(after["syncfs_node_pull_seconds_count"] >= 1.0);
    let (_, body) = http_get(&format!("{}/metrics", node_url(&c.nodes[0])), None);
    let served = parse_metrics(&String::from_utf8(body).unwrap());
    assert!(served["syncfs_node_bytes_served_total"] >= 300_000.0, "{served:?}");
    // The status counts entries as they come and go: one file, and the root.
    for n in &c.nodes {
        let s = n.status();
        assert_eq!((s["files"].as_u64(), s["dirs"].as_u64()), (Some(1), Some(1)), "{}: {s}", n.id);
    }
    // Its output into a pipe closed at once ends it quietly, not with a panic.
    let mut status = Command::new(bin("syncctl"))
        .arg("--data")
        .arg(&c.nodes[1].data)
        .args(["status", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(status.stdout.take());
    let out = status.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "syncctl status into a closed pipe: {err}");
}

#[test]
fn status_watch_reports_transfers_as_they_happen() {
    let c = Cluster::start("watch", 2);
    let mut watch = Command::new(bin("syncctl")).arg("--data").arg(&c.nodes[1].data).args(["status", "--watch"]).stdout(Stdio::piped()).spawn().unwrap();
    let lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(DEADLINE).expect("a first status line");
    assert!(first.starts_with("n2 online"), "{first}");
    // Large enough (400 MB) that pulling it takes a few of the watch's 100 ms samples
    // even now that pulls run at a few hundred MB/s (80 MB once finished between two).
    for i in 0..40 {
        write(&c.nodes[0].p(&format!("w{i}.bin")), &vec![i as u8; 10_000_000]);
    }
    let mut seen_busy = false;
    let mut seen_done = false;
    let start = std::time::Instant::now();
    while start.elapsed() < DEADLINE && !(seen_busy && seen_done) {
        if let Ok(l) = rx.recv_timeout(std::time::Duration::from_secs(1)) {
            seen_busy |= !l.contains(" 0 pull(s) in progress") || !l.contains(" 0 pending change(s)");
            seen_done |= seen_busy && l.contains(" 0 pull(s) in progress") && l.contains("400 MB pulled");
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(seen_busy && seen_done, "watch showed work in progress ({seen_busy}) and then all 400 MB pulled ({seen_done})");
}

#[test]
fn content_needs_the_cluster_token() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::new("token");
    let _m = ManagerProc::start(dir.path(), &vhost.url());
    let a = NodeProc::start_with(dir.path(), "a", &vhost, &["--cluster-token", "s3cret-token-for-tests"]);
    let b = NodeProc::start_with(dir.path(), "b", &vhost, &["--cluster-token", "s3cret-token-for-tests"]);
    let ctl = |n: &NodeProc| {
        let out =
            Command::new(bin("syncctl")).arg("--data").arg(&n.data).args(["--cluster-token", "s3cret-token-for-tests", "status", "--json"]).output().unwrap();
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"connected\": true")
    };
    eventually("both nodes connected", DEADLINE, || ctl(&a) && ctl(&b));
    write(&a.p("secret.txt"), b"for members only");
    eventually("b to get the file with the token", DEADLINE, || read(&b.p("secret.txt")).as_deref() == Some(b"for members only"));
    let hash = blake3::hash(b"for members only").to_hex().to_string();
    let url = format!("{}/content/{hash}", node_url(&a));
    let (s, body) = http_get(&url, None);
    assert_eq!(s, 401, "no token");
    assert!(!String::from_utf8_lossy(&body).contains("for members only"));
    let (s, body) = http_get(&url, Some("wrong-token"));
    assert_eq!(s, 401, "wrong token");
    assert!(!String::from_utf8_lossy(&body).contains("for members only"));
    assert_eq!(http_get(&url, Some("s3cret-token-for-tests")), (200, b"for members only".to_vec()));
    // syncctl without the token is refused too (NodeProc::syncctl would pass it).
    let out = Command::new(bin("syncctl")).arg("--data").arg(&a.data).arg("status").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cluster token"), "{err}");
    for n in [&a, &b] {
        assert!(!std::fs::read_to_string(&n.log).unwrap().contains("s3cret-token-for-tests"), "the token must never be logged");
    }
}

/// A node needs the cluster's broker credentials to join: with a wrong password it never
/// connects and the manager never hears of it; with the right one it joins.
#[test]
fn a_node_with_wrong_broker_credentials_cannot_join() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::new("creds");
    let user = format!("u{}", std::process::id());
    let ok = |args: &[&str]| assert!(Command::new("rabbitmqctl").args(args).status().unwrap().success(), "rabbitmqctl {args:?}");
    ok(&["-q", "add_user", &user, "right-password"]);
    ok(&["-q", "set_permissions", "-p", &vhost.name, &user, ".*", ".*", ".*"]);
    let m = ManagerProc::start(dir.path(), &vhost.url());
    let url = |pw: &str| format!("amqp://{user}:{pw}@127.0.0.1:5672/{}?heartbeat=5", vhost.name);
    let start = |id: &str, pw: &str| {
        let log = dir.path().join(format!("{id}.log"));
        let child = Command::new(bin("fs-node"))
            .args(["--id", id, "--broker", &url(pw), "--mount"])
            .arg(dir.path().join(format!("mnt-{id}")))
            .arg("--data")
            .arg(dir.path().join(format!("data-{id}")))
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join(format!("{id}.err"))).unwrap())
            .spawn()
            .unwrap();
        (child, dir.path().join(format!("data-{id}")), dir.path().join(format!("mnt-{id}")))
    };
    let connected = |data: &std::path::Path| {
        let out = Command::new(bin("syncctl")).arg("--data").arg(data).args(["status", "--json"]).output().unwrap();
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"connected\": true")
    };
    let (mut bad, bad_data, bad_mnt) = start("intruder", "wrong-password");
    let (mut good, good_data, good_mnt) = start("member", "right-password");
    eventually("the member to join", DEADLINE, || connected(&good_data));
    eventually("the manager to list the member", DEADLINE, || m.status().contains("member"));
    // The intruder has been trying all along; it is still out.
    eventually("the intruder to be running", DEADLINE, || bad_data.join("node.url").exists());
    assert!(!connected(&bad_data), "a node with a wrong password must not connect");
    assert!(!m.status().contains("intruder"), "{}", m.status());
    let err = std::fs::read_to_string(dir.path().join("intruder.err")).unwrap();
    assert!(err.contains("ACCESS_REFUSED") || err.to_lowercase().contains("auth") || err.contains("refused"), "the node says why it cannot join:\n{err}");
    assert!(!err.contains("wrong-password"), "the password must not be logged");
    for c in [&mut bad, &mut good] {
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let _ = c.wait();
    }
    unmount(&bad_mnt);
    unmount(&good_mnt);
    let _ = Command::new("rabbitmqctl").args(["-q", "delete_user", &user]).status();
}

/// Contents are addressed by hash: a rename or a copy of a synced file moves no bytes
/// between nodes (the others have the content already), which the holders' served-byte
/// counters show.
#[test]
fn a_rename_or_a_copy_moves_no_bytes() {
    let c = Cluster::start("nobytes", 2);
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let metric = |n: &NodeProc, name: &str| {
        let (_, body) = http_get(&format!("{}/metrics", node_url(n)), None);
        parse_metrics(&String::from_utf8(body).unwrap())[name]
    };
    let bytes: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    write(&a.p("big.bin"), &bytes);
    c.converged();
    let moved = || metric(a, "syncfs_node_bytes_served_total") + metric(b, "syncfs_node_bytes_served_total");
    let before = moved();
    assert!(before >= 2_000_000.0, "the first copy moved the bytes: {before}");
    std::fs::rename(a.p("big.bin"), a.p("renamed.bin")).unwrap();
    std::fs::copy(a.p("renamed.bin"), a.p("copy.bin")).unwrap();
    std::fs::copy(a.p("renamed.bin"), b.p("copy on b.bin")).unwrap();
    c.converged();
    assert_eq!(read(&b.p("copy.bin")).unwrap(), bytes);
    assert_eq!(read(&a.p("copy on b.bin")).unwrap(), bytes);
    assert_eq!(moved(), before, "a rename or a copy moved bytes");
}
