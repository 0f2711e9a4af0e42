//! Chunked transfers (issue 15, first part) on real mounts and the real broker: a
//! one-byte edit of a large file moves a few chunks, counted in the bytes its holder
//! served; a pull takes chunks from every holder at once and drops a holder that stalls
//! and one that lies (raw TCP servers in this test, named as holders by fake nodes).

mod api_support;

use api_support::*;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{FileExt, MetadataExt};
use system_tests::*;
use wire::{Held, RelPath, Revision, ToManager};

/// Content, chunk list and leaves bytes `n` served.
fn served(n: &NodeProc) -> f64 {
    let m = node_metrics(n);
    ["syncfs_node_bytes_served_total", "syncfs_node_index_bytes_served_total"].iter().map(|k| m.get(*k).copied().unwrap_or(0.0)).sum()
}

#[test]
fn a_one_byte_edit_of_a_large_file_moves_a_few_chunks() {
    let c = Cluster::start("chunked-edit", 2);
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let mut data = pseudo_random(32 << 20, 1);
    write(&a.p("disk.img"), &data);
    c.converged();
    // b has the leaves of its copy (asking for them makes them if b had not yet).
    let old = blake3::hash(&data).to_hex().to_string();
    assert_eq!(http_get(&format!("{}/leaves/{old}", node_url(b)), None).0, 200);
    let (before, pulled_before) = (served(a), pulled(b));
    let f = std::fs::File::options().write(true).open(a.p("disk.img")).unwrap();
    f.write_all_at(&[data[17 << 20] ^ 0xff], 17 << 20).unwrap();
    drop(f);
    data[17 << 20] ^= 0xff;
    eventually("the edit to reach b", DEADLINE, || read(&b.p("disk.img")).as_deref() == Some(&data[..]));
    let moved = served(a) - before;
    assert!(moved > 0.0 && moved <= 512.0 * 1024.0, "a one-byte edit of 32 MiB moved {moved} bytes");
    // Over its old version, b fetched just the one 64 KiB block the edit is in (the new
    // version's leaves, 16 KiB, told it which): a chunk would be another size.
    assert_eq!(pulled(b) - pulled_before, 65536.0, "b fetched the changed block only");
    c.converged();
}

/// The headers of the patched contents (`fs-node/src/patched.rs`) in `n`'s store.
fn patched_headers(n: &NodeProc) -> Vec<Vec<u8>> {
    let Ok(dir) = std::fs::read_dir(n.data.join("patched")) else {
        return Vec::new();
    };
    dir.flatten().filter(|e| !e.file_name().to_string_lossy().ends_with(".patch")).filter_map(|e| std::fs::read(e.path()).ok()).collect()
}

fn patched_contents(n: &NodeProc) -> usize {
    patched_headers(n).len()
}

/// Whether every patched content in `n`'s store is an older version kept at rest as a
/// patch over a newer one (none waits to be written out whole).
fn only_older_versions_patched(n: &NodeProc) -> bool {
    patched_headers(n).iter().all(|h| h.starts_with(b"SYNCPATR"))
}

/// Edits in place of a large file, one after another and faster than a new version is
/// written out whole: the writer keeps each as a patch over the same whole base, the
/// other node pulls each over its old version and keeps it the same way; every version
/// (one that grows the file too) reads right on both, and both stores end with the last
/// version a whole blob that hashes to its name; what stays a patch is an older version
/// kept (for the cluster's versions) as a patch over a newer one, a few blocks on disk.
#[test]
fn edits_in_place_one_after_another_arrive_right_and_are_written_out_whole() {
    let c = Cluster::start("chunked-patches", 2);
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let mut data = pseudo_random(16 << 20, 3);
    write(&a.p("db"), &data);
    c.converged();
    let mut patched_seen = 0;
    for i in 0..5usize {
        let f = std::fs::File::options().write(true).open(a.p("db")).unwrap();
        let at = ((i * 3 + 1) << 20) + i * 7;
        data[at] ^= 0xa5;
        f.write_all_at(&[data[at]], at as u64).unwrap();
        if i == 3 {
            let tail = pseudo_random(100 << 10, 9);
            f.write_all_at(&tail, data.len() as u64).unwrap();
            data.extend_from_slice(&tail);
        }
        drop(f);
        patched_seen = patched_seen.max(patched_contents(a));
        assert!(read(&a.p("db")).as_deref() == Some(&data[..]), "edit {i} reads right on a");
        eventually(&format!("edit {i} to reach b"), DEADLINE, || read(&b.p("db")).as_deref() == Some(&data[..]));
    }
    assert!(patched_seen > 0, "a kept no edit as a patch");
    for n in [a, b] {
        eventually(&format!("{}'s new versions to be written out", n.id), DEADLINE, || only_older_versions_patched(n));
        let h = blake3::hash(&data).to_hex().to_string();
        let blob = std::fs::read(n.data.join("blobs").join(&h)).unwrap_or_default();
        assert!(blob == data, "{}'s blob of the last version holds its bytes", n.id);
        let patches: u64 = std::fs::read_dir(n.data.join("patched")).unwrap().flatten().map(|e| e.metadata().unwrap().blocks() * 512).sum();
        assert!(patches <= 4 << 20, "{}'s older versions kept as patches take {patches} bytes, not whole copies", n.id);
    }
    c.converged();
}

/// truncate(2) of a large file by its name (no descriptor open) commits the new size at
/// once, and its hash (of the new zeros past the old end, here 1 GiB less 16 MiB)
/// takes long: taken under the tree's lock, every operation of the mount would wait
/// for it. The mount must go on answering while the node still holds the truncated
/// file's work file, and every node must end with the truncated bytes.
#[test]
fn a_large_file_truncated_by_its_name_leaves_the_mount_answering() {
    let c = Cluster::start("chunked-truncate", 2);
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let mut data = pseudo_random(16 << 20, 5);
    write(&a.p("disk.img"), &data);
    c.converged();
    let to: u64 = 1 << 30;
    // (not truncate(1): it opens the file and truncates the descriptor)
    let path = std::ffi::CString::new(a.p("disk.img").into_os_string().into_encoded_bytes()).unwrap();
    let truncating = std::thread::spawn(move || unsafe { libc::truncate(path.as_ptr(), to as libc::off_t) });
    let work = a.data.join("work");
    eventually("the node's work file of the truncated size", DEADLINE, || {
        std::fs::read_dir(&work).unwrap().flatten().any(|e| e.metadata().is_ok_and(|m| m.len() == to))
    });
    write(&a.p("probe.txt"), b"answered");
    assert_eq!(read(&a.p("probe.txt")).as_deref(), Some(&b"answered"[..]));
    let still_hashing = std::fs::read_dir(&work).unwrap().flatten().any(|e| e.metadata().is_ok_and(|m| m.len() == to));
    assert!(still_hashing, "the mount answered only once the truncated file was committed: its hash held it");
    assert_eq!(truncating.join().unwrap(), 0, "truncate(2) failed");
    data.resize(to as usize, 0);
    let want = blake3::hash(&data).to_hex().to_string();
    for n in [a, b] {
        eventually(&format!("the truncated file on {}", n.id), DEADLINE, || {
            std::fs::read(n.p("disk.img")).is_ok_and(|d| blake3::hash(&d).to_hex().to_string() == want)
        });
    }
    c.converged();
}

/// A program that saves a large file as a new file renamed over the old one, with bytes
/// inserted: the version before stays kept for the cluster's versions, on each node as a
/// patch over the new version (its blocks found there moved by the insertion, through
/// the chunk lists) instead of a whole copy; a restore of it gives every mount its bytes.
#[test]
fn an_older_version_whose_bytes_moved_is_kept_as_a_patch_over_the_new_one() {
    let mut c = Cluster::start("chunked-moved", 0);
    for id in ["n1", "n2"] {
        let n = NodeProc::start_with(c.dir.path(), id, &c.vhost, &["--gc-every-secs", "1"]);
        c.nodes.push(n);
    }
    for n in &c.nodes {
        n.wait_connected();
    }
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let old = pseudo_random(16 << 20, 21);
    write(&a.p("doc.odt"), &old);
    c.converged();
    let mut new = old[..5 << 20].to_vec();
    new.extend_from_slice(&pseudo_random(1000, 22));
    new.extend_from_slice(&old[5 << 20..]);
    write(&a.p(".doc.odt.tmp"), &new);
    std::fs::rename(a.p(".doc.odt.tmp"), a.p("doc.odt")).unwrap();
    eventually("the new version to reach b", DEADLINE, || read(&b.p("doc.odt")).as_deref() == Some(&new[..]));
    let old_hash = blake3::hash(&old).to_hex().to_string();
    for n in [a, b] {
        let header = n.data.join("patched").join(&old_hash);
        // (The header is renamed in before the whole blob goes: both are waited for.)
        let whole = n.data.join("blobs").join(&old_hash);
        eventually(&format!("{} to keep the older version as a patch, no whole copy left", n.id), DEADLINE, || {
            std::fs::read(&header).is_ok_and(|h| h.starts_with(b"SYNCPM2R")) && !whole.exists()
        });
        let patch = std::fs::metadata(n.data.join("patched").join(format!("{old_hash}.patch"))).unwrap().blocks() * 512;
        assert!(patch <= 1 << 20, "{}: the older version takes {patch} bytes", n.id);
        let (ok, out, err) = n.syncctl(&["status", "--json"]);
        assert!(ok, "{err}");
        let s: serde_json::Value = serde_json::from_str(&out).unwrap();
        // (Also kept: the new version, as the content of the deleted temporary name.)
        assert!(s["kept_bytes"].as_u64().unwrap() >= old.len() as u64, "{}: {out}", n.id);
        assert!(s["kept_disk_bytes"].as_u64().unwrap() <= 1 << 20, "{}: status shows what the kept versions take on disk: {out}", n.id);
    }
    let (ok, out, err) = b.syncctl(&["restore", "doc.odt"]);
    assert!(ok && out.contains("restored 1 path(s)"), "restore: {out} {err}");
    for n in [a, b] {
        eventually(&format!("the older version back on {}", n.id), DEADLINE, || read(&n.p("doc.odt")).as_deref() == Some(&old[..]));
    }
    c.converged();
}

/// Two large files that are near-copies (a copy with 1,000 bytes inserted), both in the
/// tree: once neither is used for a while, every node keeps one of them whole and the
/// other as the blocks the first does not hold (a patch, header format 2 at rest), and
/// both read right through every mount (an open writes the patched one out again).
#[test]
fn two_near_copies_left_alone_take_the_disk_of_one() {
    near_copies_left_alone_take_the_disk_of_one("chunked-twins", &[]);
}

/// The same in the cache of a node with files on demand (`--on-demand`): the two,
/// fetched when read, are two evictable contents, and one becomes a patch over the other.
#[test]
fn near_copies_in_an_on_demand_nodes_cache_take_the_disk_of_one() {
    near_copies_left_alone_take_the_disk_of_one("chunked-twins-on-demand", &["--on-demand"]);
}

/// Two nodes (the second started with `second_args` too); a writes two 20 MiB
/// near-copies, both nodes read them, and each keeps one of them as a patch.
fn near_copies_left_alone_take_the_disk_of_one(name: &str, second_args: &[&str]) {
    let mut c = Cluster::start(name, 0);
    let quick = ["--gc-every-secs", "1", "--dedup-idle-secs", "1"];
    for (id, more) in [("n1", &[][..]), ("n2", second_args)] {
        let args: Vec<&str> = quick.iter().chain(more).copied().collect();
        let n = NodeProc::start_with(c.dir.path(), id, &c.vhost, &args);
        c.nodes.push(n);
    }
    for n in &c.nodes {
        n.wait_connected();
    }
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let original = pseudo_random(20 << 20, 31);
    let mut copy = original[..7 << 20].to_vec();
    copy.extend_from_slice(&pseudo_random(1000, 32));
    copy.extend_from_slice(&original[7 << 20..]);
    write(&a.p("disk.img"), &original);
    write(&a.p("disk-copy.img"), &copy);
    c.converged();
    // (On demand, a read fetches them.)
    for n in [a, b] {
        assert!(read(&n.p("disk.img")).as_deref() == Some(&original[..]), "{}: the original reads right", n.id);
        assert!(read(&n.p("disk-copy.img")).as_deref() == Some(&copy[..]), "{}: the copy reads right", n.id);
    }
    let hashes = [blake3::hash(&original).to_hex().to_string(), blake3::hash(&copy).to_hex().to_string()];
    let on_disk = |n: &NodeProc| -> u64 {
        let files = hashes.iter().flat_map(|h| [n.data.join("blobs").join(h), n.data.join("patched").join(format!("{h}.patch"))]);
        files.filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.blocks() * 512).sum()
    };
    for n in [a, b] {
        eventually(&format!("{} to keep one of the near-copies as a patch over the other", n.id), DEADLINE, || {
            let patched: Vec<bool> = hashes.iter().map(|h| std::fs::read(n.data.join("patched").join(h)).is_ok_and(|x| x.starts_with(b"SYNCPM2R"))).collect();
            patched.iter().filter(|p| **p).count() == 1 && on_disk(n) <= (21 << 20)
        });
    }
    // A peer asking for the patched one whole gets its bytes, and it stays a patch.
    for n in [a, b] {
        let i = hashes.iter().position(|h| n.data.join("patched").join(h).exists()).expect("one is a patch");
        let (status, body) = http_get(&format!("{}/content/{}", node_url(n), hashes[i]), None);
        assert_eq!(status, 200);
        assert!(body == [&original, &copy][i][..], "{}: the patched content served whole reads right", n.id);
        assert!(!n.data.join("blobs").join(&hashes[i]).exists(), "{}: serving it did not write it out", n.id);
    }
    for n in [a, b] {
        assert!(read(&n.p("disk.img")).as_deref() == Some(&original[..]), "{}: the original reads right", n.id);
        assert!(read(&n.p("disk-copy.img")).as_deref() == Some(&copy[..]), "{}: the copy reads right", n.id);
    }
    c.converged();
}

/// Chunk dedup across files: a file new to a node, most of whose chunks the node has in
/// another file (a copy edited, a new file sharing most of an old one), moves only what
/// is new, found through the node's chunk index (kept across its restart).
#[test]
fn a_new_file_sharing_most_chunks_with_another_moves_only_the_new_ones() {
    let mut c = Cluster::start("chunked-dedup", 2);
    let data = pseudo_random(32 << 20, 7);
    write(&c.nodes[0].p("base.img"), &data);
    c.converged();
    // b's chunk list of its copy, made (and indexed) now if b had not made it yet.
    let base = blake3::hash(&data).to_hex().to_string();
    assert_eq!(http_get(&format!("{}/chunks/{base}", node_url(&c.nodes[1])), None).0, 200);
    // b is away while a makes a copy with one byte changed and 1 MiB more at the end.
    c.nodes[1].stop();
    let mut copy = data.clone();
    copy[11 << 20] ^= 0xff;
    copy.extend(pseudo_random(1 << 20, 8));
    write(&c.nodes[0].p("copy.img"), &copy);
    let a = &c.nodes[0];
    let copy_hash = blake3::hash(&copy).to_hex().to_string();
    // A chunk list made already is what a puller asks for before it takes the chunks it
    // has (made in the background after the close).
    eventually("a to have the copy's chunk list made", DEADLINE, || http_get(&format!("{}/chunks/{copy_hash}?cached", node_url(a)), None).0 == 200);
    let before = served(a);
    c.nodes[1].restart();
    c.nodes[1].wait_connected();
    let b = &c.nodes[1];
    eventually("the copy to reach b", DEADLINE, || read(&b.p("copy.img")).as_deref() == Some(&copy[..]));
    let moved = served(&c.nodes[0]) - before;
    // The new MiB, the chunk or two around the changed byte, and the chunk list.
    assert!(moved >= (1 << 20) as f64, "the new MiB was not fetched? {moved} bytes served");
    assert!(moved <= (2 << 20) as f64, "a copy sharing 32 of its 33 MiB moved {moved} bytes");
    c.converged();
}

/// A TCP link to port `to` that carries at most `rate` bytes a second towards the side
/// that connected (the way contents go) and counts them; returns its port and the count.
fn slow_link(to: u16, rate: u64) -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::io::Read;
    use std::sync::atomic::Ordering;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let crossed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = crossed.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", to)) else { continue };
            let (mut up_from, mut up_to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut up_from, &mut up_to);
                let _ = up_to.shutdown(std::net::Shutdown::Write);
            });
            let count = count.clone();
            std::thread::spawn(move || {
                let (mut from, mut to) = (server, client);
                let (start, mut sent) = (std::time::Instant::now(), 0u64);
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    let n = match from.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n as u64;
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    // Paced: the bytes sent so far may not have gone faster than `rate`.
                    let due = std::time::Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(ahead) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(ahead);
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Both);
                let _ = from.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (port, crossed)
}

/// Online dedup before the holder has a chunk list: b is online when a writes a new file
/// that is mostly the chunks of a file b made, and a's contents reach b only through a
/// slow link (2 MiB/s, counted). a makes the new file's chunk list in the background
/// after the close, after b first asked; b starts the whole pull and asks a to make the
/// list, the list comes first, and b takes the rest by chunks: far fewer bytes cross the
/// link than the file holds (all of them did before).
#[test]
fn a_new_file_sharing_most_chunks_comes_by_chunks_over_a_slow_link_before_its_holder_listed_it() {
    let mut c = Cluster::start("chunked-online", 0);
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (link, crossed) = slow_link(listen, 2 << 20);
    let advertise = ["--listen".to_string(), format!("127.0.0.1:{listen}"), "--advertise".into(), format!("http://127.0.0.1:{link}")];
    let a = NodeProc::start_opts(c.dir.path(), "n1", &c.vhost, NodeOpts { extra: advertise.to_vec(), ..Default::default() });
    c.nodes.push(a);
    c.add_node("n2");
    for n in &c.nodes {
        n.wait_connected();
    }
    // b makes the base itself (a pulls it over b's own, fast link), and b's chunk index
    // has it once its chunk list is made.
    let data = pseudo_random(16 << 20, 11);
    write(&c.nodes[1].p("base.img"), &data);
    c.converged();
    let base = blake3::hash(&data).to_hex().to_string();
    assert_eq!(http_get(&format!("{}/chunks/{base}", node_url(&c.nodes[1])), None).0, 200);
    let before = crossed.load(std::sync::atomic::Ordering::Relaxed);
    let mut copy = data.clone();
    copy[5 << 20] ^= 0xff;
    copy.extend(pseudo_random(1 << 20, 12));
    write(&c.nodes[0].p("copy.img"), &copy);
    let b = &c.nodes[1];
    eventually("the copy to reach b", DEADLINE, || read(&b.p("copy.img")).as_deref() == Some(&copy[..]));
    let moved = crossed.load(std::sync::atomic::Ordering::Relaxed) - before;
    println!("the copy of 17 MiB moved {moved} bytes over the link");
    // The new MiB, the chunks around the changed byte, the list, and what the whole pull
    // took before the list came.
    assert!(moved >= 1 << 20, "the new MiB did not cross the link? {moved} bytes");
    assert!(moved <= 8 << 20, "a copy sharing 16 of its 17 MiB moved {moved} bytes over the link");
    c.converged();
    // The whole download dropped half-way left no file behind.
    let left: Vec<_> = std::fs::read_dir(b.data.join("tmp")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "download files left in b's store: {left:?}");
}

fn pulled(n: &NodeProc) -> f64 {
    node_metrics(n).get("syncfs_node_bytes_pulled_total").copied().unwrap_or(0.0)
}

/// A holder that serves the true chunk list but, for content, stalls (never answers) or
/// lies (the right length of wrong bytes); returns its URL.
fn bad_holder(list_json: Vec<u8>, lies: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let list_json = list_json.clone();
            std::thread::spawn(move || {
                let mut s = s;
                while let Some(req) = read_request_head(&mut s) {
                    let first = req.lines().next().unwrap_or("").to_string();
                    if first.contains(" /chunks/") {
                        let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", list_json.len());
                        let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(&list_json));
                        continue;
                    }
                    if !lies {
                        // Never answers: holds the connection until the puller gives up
                        // on it and closes it.
                        hold_until_closed(&mut s);
                        return;
                    }
                    let (x, y) = requested_range(&req);
                    let n = y - x + 1;
                    let head = format!("HTTP/1.1 206 Partial Content\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n");
                    if s.write_all(head.as_bytes()).and_then(|_| s.write_all(&vec![0x42u8; n])).is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

#[test]
fn a_pull_takes_chunks_from_every_holder_and_drops_one_that_stalls_and_one_that_lies() {
    let m = Manager::start("chunked-holders");
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<NodeProc> = ["n1", "n2"].iter().map(|id| NodeProc::start(dir.path(), id, &m.vhost)).collect();
    for n in &nodes {
        n.wait_connected();
    }
    let data = pseudo_random(48 << 20, 2);
    write(&nodes[0].p("big.bin"), &data);
    eventually("n2 to hold big.bin", DEADLINE, || {
        std::fs::metadata(nodes[1].p("big.bin")).is_ok_and(|m| m.len() == data.len() as u64) && read(&nodes[1].p("big.bin")).as_deref() == Some(&data[..])
    });
    let hash = blake3::hash(&data).to_hex().to_string();
    let (status, list) = http_get(&format!("{}/chunks/{hash}", node_url(&nodes[0])), None);
    assert_eq!(status, 200);
    // Two more "holders" of the same content: one stalls, one lies.
    let rev = m.get_json("/api/files/history?path=big.bin")["current_rev"].as_u64().unwrap();
    let mut alive = Vec::new();
    let mut fakes = Vec::new();
    for (id, lies) in [("staller", false), ("liar", true)] {
        let fake = FakeNode::connect(&m.vhost, id);
        alive.push(fake.keep_alive_at(bad_holder(list.clone(), lies), 0, 0));
        fake.send(ToManager::Holding { items: vec![Held { path: RelPath::new("big.bin").unwrap(), rev: Revision(rev), hash: hash.parse().unwrap() }] });
        fakes.push(fake);
    }
    eventually("four holders of big.bin", DEADLINE, || m.get_json("/api/files/history?path=big.bin")["holders"].as_array().unwrap().len() == 4);
    let before: Vec<f64> = nodes.iter().map(served).collect();
    nodes.push(NodeProc::start_with(dir.path(), "n3", &m.vhost, &["--pull-stall-secs", "2"]));
    let n3 = &nodes[2];
    eventually("n3 to have big.bin, verified", DEADLINE, || read(&n3.p("big.bin")).as_deref() == Some(&data[..]));
    let log = std::fs::read_to_string(&n3.log).unwrap_or_default();
    assert!(log.contains("dropping holder staller"), "the staller is dropped");
    assert!(log.contains("dropping holder liar"), "the liar is dropped");
    let gave: Vec<f64> = nodes[..2].iter().zip(&before).map(|(n, b)| served(n) - b).collect();
    assert!(gave.iter().all(|g| *g > 0.0), "both honest holders served chunks: {gave:?}");
    assert!(gave.iter().sum::<f64>() <= data.len() as f64 * 1.1, "about the file once in all: {gave:?}");
}
