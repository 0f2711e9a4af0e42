//! A large file pulled from one holder and from three (issue 15), each holder's link to
//! the puller limited to the same rate: node D runs in a network namespace of its own,
//! joined to this one by three veth pairs, each shaped with `tc tbf` on the holder side
//! (what holders send D); holders A, B and C listen here and each advertises its address
//! on its own pair. D reaches the broker through a forwarder on the first pair (RabbitMQ
//! listens on loopback only). Timed from D's start until the content is in D's store.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use system_tests::{bin, eventually, unmount, NodeProc, Vhost};

const NS: &str = "syncfs-bench-d";
const BROKER_FWD_PORT: u16 = 5673;

fn sh(cmd: &str) {
    let ok = Command::new("sh").arg("-c").arg(cmd).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "`{cmd}` failed");
}

/// The namespace and its three shaped pairs (made anew).
fn make_links(rate: &str) {
    remove_links();
    sh(&format!("ip netns add {NS}"));
    for i in 1..=3 {
        sh(&format!("ip link add sbh{i} type veth peer name sbd{i} && ip link set sbd{i} netns {NS}"));
        sh(&format!("ip addr add 10.77.{i}.1/24 dev sbh{i} && ip link set sbh{i} up"));
        sh(&format!("ip -n {NS} addr add 10.77.{i}.2/24 dev sbd{i} && ip -n {NS} link set sbd{i} up"));
        sh(&format!("tc qdisc add dev sbh{i} root tbf rate {rate} burst 256kb latency 100ms"));
    }
    sh(&format!("ip -n {NS} link set lo up"));
}

fn remove_links() {
    for i in 1..=3 {
        let _ = Command::new("ip").args(["link", "del", &format!("sbh{i}")]).stderr(Stdio::null()).status();
    }
    let _ = Command::new("ip").args(["netns", "del", NS]).stderr(Stdio::null()).status();
}

/// Forwards connections on 10.77.1.1:5673 to the broker on loopback.
fn broker_forwarder() {
    let l = TcpListener::bind(("10.77.1.1", BROKER_FWD_PORT)).expect("binding the broker forwarder");
    std::thread::spawn(move || {
        for inbound in l.incoming().flatten() {
            let Ok(outbound) = TcpStream::connect("127.0.0.1:5672") else { continue };
            for (mut from, mut to) in [(inbound.try_clone().unwrap(), outbound.try_clone().unwrap()), (outbound, inbound)] {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64 * 1024];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
}

fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// Node D, in the namespace (network only: its mount is visible here).
struct NodeD {
    child: Child,
    mount: PathBuf,
    data: PathBuf,
}

impl NodeD {
    fn start(dir: &Path, vhost: &Vhost) -> NodeD {
        let (mount, data) = (dir.join("mnt-d"), dir.join("data-d"));
        let broker = format!("amqp://guest:guest@10.77.1.1:{BROKER_FWD_PORT}/{}?heartbeat=5", vhost.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("node-d.log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{NS}"))
            .arg(bin("fs-node"))
            .args(["--id", "d", "--broker", &broker, "--listen", "10.77.1.2:0", "--mount"])
            .arg(&mount)
            .arg("--data")
            .arg(&data)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting node D in its namespace");
        NodeD { child, mount, data }
    }
    fn has(&self, hash: &str) -> bool {
        self.data.join("blobs").join(hash).exists()
    }
    fn stop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        unmount(&self.mount);
    }
}

/// Runs the row: `size` bytes, links at `rate` (tc syntax).
pub fn run(parent: &Path, size: usize, rate: &str) {
    let dir = tempfile::tempdir_in(parent).unwrap();
    let vhost = Vhost::new("bench-holders");
    let manager = system_tests::ManagerProc::start(dir.path(), &vhost.url());
    make_links(rate);
    broker_forwarder();
    let holder = |i: usize| {
        let port = free_port("0.0.0.0");
        let listen = format!("0.0.0.0:{port}");
        let advertise = format!("http://10.77.{i}.1:{port}");
        NodeProc::start_with(dir.path(), &format!("h{i}"), &vhost, &["--listen", &listen, "--advertise", &advertise])
    };
    let a = holder(1);
    a.wait_connected();
    let timed = |name: &str, data: &[u8]| -> Duration {
        let hash = blake3::hash(data).to_hex().to_string();
        let mut d = NodeD::start(dir.path(), &vhost);
        let t = Instant::now();
        eventually(&format!("{name} in D's store"), Duration::from_secs(1800), || d.has(&hash));
        let took = t.elapsed();
        eprintln!("holders: {name} in D's store after {:.2} s", took.as_secs_f64());
        d.stop();
        // D's whole log, for a closer look: SYNC_KEEP_LOGS=DIR.
        if let Some(keep) = std::env::var_os("SYNC_KEEP_LOGS") {
            let _ = std::fs::create_dir_all(&keep);
            let _ = std::fs::copy(dir.path().join("node-d.log"), Path::new(&keep).join(format!("node-d-{name}.log")));
        }
        took
    };
    // One holder: A alone has f1 when D starts.
    let f1 = system_tests::pseudo_random(size, 1);
    system_tests::write(&a.p("f1.bin"), &f1);
    eprintln!("holders: f1 written on A");
    let one = timed("f1", &f1);
    // Three holders: B and C take f2 from A (on this side, not shaped) while D is stopped.
    let (b, c) = (holder(2), holder(3));
    let f2 = system_tests::pseudo_random(size, 2);
    system_tests::write(&a.p("f2.bin"), &f2);
    eprintln!("holders: f2 written on A");
    for n in [&b, &c] {
        eventually("B and C to hold f2", Duration::from_secs(600), || {
            std::fs::metadata(n.p("f2.bin")).is_ok_and(|m| m.len() == f2.len() as u64) && std::fs::read(n.p("f2.bin")).ok().as_deref() == Some(&f2[..])
        });
    }
    // Each holder chunks a large content once it has it (in the background); on one
    // machine those three chunkings would share its two cores with D's pull, where on a
    // real cluster each holder has its own: D starts once all three lists are ready.
    let f2_hash = blake3::hash(&f2).to_hex().to_string();
    for n in [&a, &b, &c] {
        eventually("the holders' chunk lists of f2", Duration::from_secs(600), || n.data.join("chunks").join(&f2_hash).exists());
    }
    eprintln!("holders: B and C hold f2, and the three have its chunk list");
    let three = timed("f2", &f2);
    drop((a, b, c, manager));
    remove_links();
    let mib = size >> 20;
    println!();
    println!("| {mib} MiB pulled by a new node, each holder's link limited to {rate} (tc tbf) | time | MB/s |");
    println!("|---|---|---|");
    println!("| from one holder | {:.2} s | {:.0} |", one.as_secs_f64(), size as f64 / one.as_secs_f64() / 1e6);
    println!("| from three holders | {:.2} s | {:.0} |", three.as_secs_f64(), size as f64 / three.as_secs_f64() / 1e6);
    println!("| speed-up | {:.2}x | |", one.as_secs_f64() / three.as_secs_f64());
    println!();
}
