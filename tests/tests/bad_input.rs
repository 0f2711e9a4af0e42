//! Bad input gets a clear error and loses nothing: malformed messages, hostile HTTP
//! requests, a lying holder, impossible file names.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use system_tests::*;
use wire::{BatchItem, Content, ContentHash, Entry, Envelope, Holder, RelPath, Revision, ToNode, Version};

#[test]
fn malformed_messages_are_dead_lettered_and_the_next_good_one_is_applied() {
    let c = Cluster::start("badmsg", 2);
    publish_raw(&c.vhost, "", wire::topology::UPDATE_QUEUE, b"this is not json");
    publish_raw(&c.vhost, "", wire::topology::UPDATE_QUEUE, br#"{"v":99,"id":"x","from":"n1","body":{}}"#);
    publish_raw(
        &c.vhost,
        "",
        wire::topology::UPDATE_QUEUE,
        br#"{"v":1,"id":"x","from":"n1","body":{"type":"change","path":"../../etc/passwd","base":0,"op":{"op":"delete"}}}"#,
    );
    publish_raw(&c.vhost, wire::topology::MASTER_EXCHANGE, "node.n1", b"\xff\xfe garbage for a node");
    write(&c.nodes[0].p("after.txt"), b"still flowing");
    c.converged();
    assert_eq!(read(&c.nodes[1].p("after.txt")).unwrap(), b"still flowing");
    eventually("four messages in the dead-letter queue", DEADLINE, || queue_depth(&c.vhost, wire::topology::DEAD_QUEUE) == 4);
}

#[test]
fn hostile_http_requests_get_clear_errors() {
    let c = Cluster::start("badhttp", 1);
    let url = node_url(&c.nodes[0]);
    let (s, body) = http_get(&format!("{url}/content/{}", "0".repeat(64)), None);
    assert_eq!(s, 404, "{}", String::from_utf8_lossy(&body));
    let (s, body) = http_get(&format!("{url}/content/..%2F..%2Fnode.db"), None);
    assert_eq!(s, 400);
    assert!(String::from_utf8_lossy(&body).contains("malformed content hash"));
    let (s, _) = http_get(&format!("{url}/no/such/thing"), None);
    assert_eq!(s, 404);
    write(&c.nodes[0].p("served.txt"), b"served bytes");
    let hash = blake3::hash(b"served bytes").to_hex().to_string();
    eventually("the content to be served", DEADLINE, || http_get(&format!("{url}/content/{hash}"), None) == (200, b"served bytes".to_vec()));
}

/// A holder that sends bytes that do not match the hash: nothing of it appears in the
/// mount, and the node keeps working.
#[test]
fn a_lying_holder_corrupts_nothing() {
    let c = Cluster::start("liar", 1);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let liar_url = format!("http://{}", listener.local_addr().unwrap());
    let asked = Arc::new(AtomicUsize::new(0));
    let a2 = asked.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            a2.fetch_add(1, Ordering::SeqCst);
            // As many bytes as the real content, so only the hash check can catch them.
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\nConnection: close\r\n\r\nevil bytes 16 by");
        }
    });
    let truth = b"the real content";
    let version = Version {
        content: Content::File { hash: ContentHash::from_bytes(*blake3::hash(truth).as_bytes()), size: truth.len() as u64 },
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
    };
    let entry = Entry {
        path: RelPath::new("lie.txt").unwrap(),
        rev: Revision(1 << 52),
        version: Some(version),
        holders: vec![Holder { node: "liar".parse().unwrap(), url: liar_url }],
        from_lost: None,
    };
    let env = Envelope::new("lie-1".parse().unwrap(), "manager".parse().unwrap(), ToNode::Applied { entry, origin: "liar".parse().unwrap() });
    publish_raw(&c.vhost, wire::topology::MASTER_EXCHANGE, "node.n1", &env.encode());
    eventually("the node to ask the liar", DEADLINE, || asked.load(Ordering::SeqCst) >= 1);
    write(&c.nodes[0].p("next.txt"), b"next");
    eventually("the node to go on", DEADLINE, || c.nodes[0].pending() == 0);
    assert!(!c.nodes[0].p("lie.txt").exists(), "unverified bytes must never appear in the mount");
    assert!(std::fs::read_to_string(&c.nodes[0].log).unwrap().contains("thrown away"));
}

/// Two small files in one delivery, named with two holders: the first lies to the batch
/// request (`POST /small`: entries of the right lengths, wrong bytes) and to every other
/// request, the second tells the truth one content at a time. Nothing of the liar's bytes
/// appears; both files come, whole, from the honest holder.
#[test]
fn a_holder_lying_about_a_batch_of_small_contents_corrupts_nothing() {
    let c = Cluster::start("batchliar", 1);
    let files: [(&str, &[u8]); 2] = [("one.txt", b"the first content"), ("two.txt", b"the second content")];
    let hash = |b: &[u8]| ContentHash::from_bytes(*blake3::hash(b).as_bytes());
    // The liar: whatever it is asked, two length-prefixed entries of the right sizes.
    let liar = TcpListener::bind("127.0.0.1:0").unwrap();
    let liar_url = format!("http://{}", liar.local_addr().unwrap());
    let batch_asked = Arc::new(AtomicUsize::new(0));
    let asked = batch_asked.clone();
    let mut lie = Vec::new();
    for (_, bytes) in files {
        lie.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        lie.extend(std::iter::repeat_n(b'!', bytes.len()));
    }
    std::thread::spawn(move || {
        for s in liar.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 8192];
            let n = s.read(&mut buf).unwrap_or(0);
            if buf[..n].starts_with(b"POST /small ") {
                asked.fetch_add(1, Ordering::SeqCst);
            }
            let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", lie.len()).as_bytes());
            let _ = s.write_all(&lie);
        }
    });
    // The honest holder: `GET /content/<hash>` of either file, nothing else.
    let honest = TcpListener::bind("127.0.0.1:0").unwrap();
    let honest_url = format!("http://{}", honest.local_addr().unwrap());
    let served: Vec<(String, Vec<u8>)> = files.iter().map(|(_, b)| (hash(b).to_string(), b.to_vec())).collect();
    std::thread::spawn(move || {
        for s in honest.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 8192];
            let n = s.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            match served.iter().find(|(h, _)| request.starts_with(&format!("GET /content/{h} "))) {
                Some((_, bytes)) => {
                    let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", bytes.len()).as_bytes());
                    let _ = s.write_all(bytes);
                }
                None => {
                    let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                }
            }
        }
    });
    let holders = vec![Holder { node: "liar".parse().unwrap(), url: liar_url }, Holder { node: "honest".parse().unwrap(), url: honest_url }];
    let items = files
        .iter()
        .enumerate()
        .map(|(i, (path, bytes))| {
            let version = Version { content: Content::File { hash: hash(bytes), size: bytes.len() as u64 }, mode: 0o644, uid: 0, gid: 0, mtime_ns: 0 };
            let entry = Entry {
                path: RelPath::new(*path).unwrap(),
                rev: Revision((1 << 52) + i as u64),
                version: Some(version),
                holders: holders.clone(),
                from_lost: None,
            };
            BatchItem { to: None, msg: ToNode::Applied { entry, origin: "honest".parse().unwrap() } }
        })
        .collect();
    let env = Envelope::new("batch-lie-1".parse().unwrap(), "manager".parse().unwrap(), ToNode::Batch { items });
    publish_raw(&c.vhost, wire::topology::MASTER_EXCHANGE, "node.n1", &env.encode());
    for (path, bytes) in files {
        eventually(&format!("{path} from the honest holder"), DEADLINE, || read(&c.nodes[0].p(path)).is_some_and(|b| b == bytes));
    }
    assert_eq!(batch_asked.load(Ordering::SeqCst), 1, "the liar was asked for the batch once");
    write(&c.nodes[0].p("next.txt"), b"next");
    eventually("the node to go on", DEADLINE, || c.nodes[0].pending() == 0);
}

#[test]
fn impossible_names_fail_with_the_right_errno() {
    let c = Cluster::start("names", 1);
    let n = &c.nodes[0];
    let long = "x".repeat(256);
    let e = std::fs::write(n.p(&long), b"").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    use std::os::unix::ffi::OsStrExt;
    let bad = n.mount.join(std::ffi::OsStr::from_bytes(b"bad\xffname"));
    let e = std::fs::write(&bad, b"").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EILSEQ), "non-UTF-8 names cannot be synced: {e}");
    let e = xattr_set(&n.p("."), "user.test");
    assert_eq!(e, libc::EOPNOTSUPP);
    // Reading one too, also after a write (the kernel asks the node once, then knows).
    std::fs::write(n.p("plain.txt"), b"x").unwrap();
    for _ in 0..2 {
        assert_eq!(xattr_get(&n.p("plain.txt"), "security.capability"), libc::EOPNOTSUPP);
    }
}

fn xattr_get(p: &std::path::Path, name: &str) -> i32 {
    let cp = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let cn = std::ffi::CString::new(name).unwrap();
    let mut buf = [0u8; 64];
    let r = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr() as *mut _, buf.len()) };
    assert_eq!(r, -1);
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

fn xattr_set(p: &std::path::Path, name: &str) -> i32 {
    let cp = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let cn = std::ffi::CString::new(name).unwrap();
    let r = unsafe { libc::setxattr(cp.as_ptr(), cn.as_ptr(), b"v".as_ptr() as *const _, 1, 0) };
    assert_eq!(r, -1);
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

/// Oversized fields never reach the manager's database: a heartbeat with a 1 MB URL is
/// dead-lettered before it is parsed, and one with a 20 MB URL is refused by the broker
/// itself (its max_message_size, set by scripts/setup.sh); the manager goes on.
#[test]
fn oversized_heartbeats_are_refused_and_the_manager_goes_on() {
    let c = Cluster::start("bighb", 2);
    let heartbeat = |n: usize| {
        let body = wire::ToManager::Heartbeat {
            url: format!("http://x/{}", "u".repeat(n)),
            pending_changes: 0,
            pending_pulls: 0,
            software: "evil".into(),
            residency: None,
            taken: wire::Revision(0),
            applied: wire::Revision(0),
        };
        Envelope::new("big-hb-1".parse().unwrap(), "evil".parse().unwrap(), body).encode()
    };
    publish_raw(&c.vhost, "", wire::topology::UPDATE_QUEUE, &heartbeat(1 << 20));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let huge = rt.block_on(async {
        let conn = broker_link::connect(&c.vhost.url()).await.unwrap();
        let ch = broker_link::confirmed_channel(&conn).await.unwrap();
        let r = broker_link::publish_confirmed(&ch, "", wire::topology::UPDATE_QUEUE, "big-hb-2", &heartbeat(20 << 20)).await;
        let _ = conn.close(200, "done".into()).await;
        r
    });
    assert!(huge.is_err(), "the broker took a 20 MB message");
    write(&c.nodes[0].p("after.txt"), b"still flowing");
    c.converged();
    assert_eq!(read(&c.nodes[1].p("after.txt")).unwrap(), b"still flowing");
    eventually("the 1 MB heartbeat in the dead-letter queue", DEADLINE, || queue_depth(&c.vhost, wire::topology::DEAD_QUEUE) == 1);
    assert!(!c.manager.status().contains("evil"), "the oversized heartbeat's node was recorded:\n{}", c.manager.status());
}
