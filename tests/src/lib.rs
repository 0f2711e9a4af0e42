//! Harness for end-to-end tests: a RabbitMQ vhost per test, the real `manager` and
//! `fs-node` processes with real FUSE mounts, a TCP proxy per node to cut it off from the
//! broker for real, and helpers to wait on conditions with deadlines and compare trees.
//!
//! Everything started here is stopped, unmounted and removed in `Drop`, also when a test
//! fails; on failure the processes' logs are printed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default deadline of `eventually`: generous for a loaded 2-core CI machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The directory holding the workspace's built binaries.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("SYNC_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let p = dir.join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace` first (scripts/test.sh does)", p.display());
    p
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `deadline`.
pub fn eventually(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if cond() {
            return;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {:?} waiting for: {what}", deadline);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl runs (scripts/setup.sh installs RabbitMQ)");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A RabbitMQ vhost of its own, deleted on drop.
pub struct Vhost {
    pub name: String,
    /// The broker node it was made on (`rabbitmqctl -n`), when not the default broker.
    broker_node: Option<String>,
}

impl Vhost {
    pub fn new(prefix: &str) -> Vhost {
        Self::make(prefix, None)
    }

    /// A vhost of the broker (cluster) that `broker_node` belongs to.
    pub fn on_broker_node(prefix: &str, broker_node: &str) -> Vhost {
        Self::make(prefix, Some(broker_node.to_string()))
    }

    fn make(prefix: &str, broker_node: Option<String>) -> Vhost {
        let v = Vhost { name: format!("t-{prefix}-{}-{}", std::process::id(), rand::random::<u32>()), broker_node };
        rabbitmqctl(&v.ctl_args(&["add_vhost", &v.name]));
        rabbitmqctl(&v.ctl_args(&["set_permissions", "-p", &v.name, "guest", ".*", ".*", ".*"]));
        v
    }

    /// `rabbitmqctl` arguments for this vhost's broker.
    fn ctl_args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["-q"];
        if let Some(n) = &self.broker_node {
            all.extend(["-n", n.as_str()]);
        }
        all.extend_from_slice(args);
        all
    }
    /// Sets a policy on the vhost's queues whose names match `pattern` (`definition` is
    /// its JSON); of several policies on a queue, the one with the highest `priority`
    /// applies.
    pub fn set_policy(&self, name: &str, pattern: &str, definition: &str, priority: u32) {
        let priority = priority.to_string();
        rabbitmqctl(&self.ctl_args(&["set_policy", "-p", &self.name, "--apply-to", "queues", "--priority", &priority, name, pattern, definition]));
    }
    pub fn url_via(&self, port: u16) -> String {
        format!("amqp://guest:guest@127.0.0.1:{port}/{}?heartbeat=5", self.name)
    }
    pub fn url(&self) -> String {
        self.url_via(5672)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(self.ctl_args(&["delete_vhost", &self.name])).output();
    }
}

/// A TCP proxy in front of the broker; `cut` drops every connection and refuses new
/// ones until `restore`. This is how a test takes a node offline for real.
pub struct BrokerProxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl BrokerProxy {
    pub fn start() -> BrokerProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, s, cs) = (cut.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                // The flag is checked and the connection registered under the lock that
                // `cut` takes, so no connection slips through a cut.
                let mut g = cs.lock().unwrap();
                if c.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(upstream) = TcpStream::connect("127.0.0.1:5672") else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                // A relay must not add Nagle's delay to the AMQP frames it forwards.
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                g.push(client.try_clone().unwrap());
                g.push(upstream.try_clone().unwrap());
                drop(g);
                for (mut a, mut b) in [(client.try_clone().unwrap(), upstream.try_clone().unwrap()), (upstream, client)] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 64 * 1024];
                        loop {
                            match a.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if b.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = a.shutdown(Shutdown::Both);
                        let _ = b.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        BrokerProxy { port, cut, conns, stop }
    }

    pub fn cut(&self) {
        let mut g = self.conns.lock().unwrap();
        self.cut.store(true, Ordering::SeqCst);
        for s in g.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for BrokerProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Sends `signal` to `child` and waits (deadline) for it to exit; its exit status.
pub fn signal_and_wait(mut child: Child, signal: i32, what: &str) -> std::process::ExitStatus {
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let mut status = None;
    eventually(&format!("{what} to exit after signal {signal}"), DEADLINE, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    status.expect("exited")
}

pub fn stop_child(child: &mut Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    cmd.stdout(f.try_clone().unwrap()).stderr(f).stdin(Stdio::null());
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info,lapin=warn");
    }
    cmd.spawn().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"))
}

pub struct ManagerProc {
    pub db: PathBuf,
    pub log: PathBuf,
    broker: String,
    extra: Vec<String>,
    child: Option<Child>,
}

impl ManagerProc {
    pub fn start(dir: &Path, broker: &str) -> ManagerProc {
        Self::start_with(dir, broker, &[])
    }
    /// With extra `manager serve` arguments.
    pub fn start_with(dir: &Path, broker: &str, extra: &[&str]) -> ManagerProc {
        Self::start_logged(dir, &dir.join("manager.log"), broker, extra)
    }
    /// With its database in `dir` and its log at `log`.
    pub fn start_logged(dir: &Path, log: &Path, broker: &str, extra: &[&str]) -> ManagerProc {
        let mut m = ManagerProc {
            db: dir.join("manager.db"),
            log: log.to_path_buf(),
            broker: broker.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        m.restart();
        m
    }
    pub fn restart(&mut self) {
        self.stop();
        // An HTTP port of its own, so tests running side by side never compete for one.
        let child = spawn_logged(
            Command::new(bin("manager")).args(["serve", "--http", "127.0.0.1:0", "--broker", &self.broker, "--db"]).arg(&self.db).args(&self.extra),
            &self.log,
        );
        self.child = Some(child);
    }
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }
    /// Sends `signal` and waits (deadline) for the manager to exit; its exit status.
    pub fn signal_and_wait(&mut self, signal: i32) -> std::process::ExitStatus {
        signal_and_wait(self.child.take().expect("the manager is running"), signal, "the manager")
    }
    /// The manager's HTTP address and operator token, from its log and credentials file.
    pub fn api(&self) -> (String, String) {
        let log = std::fs::read_to_string(&self.log).unwrap();
        // The last start's address (a restarted manager logs a new one).
        let url = log
            .lines()
            .rev()
            .find_map(|l| l.split("dashboard and REST API on ").nth(1))
            .expect("the manager logged its address")
            .trim()
            .trim_end_matches('/')
            .to_string();
        let creds: serde_json::Value = serde_json::from_slice(&std::fs::read(self.db.with_file_name("credentials.json")).unwrap()).unwrap();
        (url, creds["operator_token"].as_str().unwrap().to_string())
    }
    /// `manager status` output.
    pub fn status(&self) -> String {
        let out = Command::new(bin("manager")).args(["status", "--db"]).arg(&self.db).output().expect("manager status");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for ManagerProc {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct NodeProc {
    pub id: String,
    pub mount: PathBuf,
    pub data: PathBuf,
    pub log: PathBuf,
    pub proxy: BrokerProxy,
    vhost: String,
    child: Option<Child>,
    opts: NodeOpts,
}

/// How a test node differs from the default (plain AMQP through its proxy, plain HTTP).
#[derive(Clone, Debug, Default)]
pub struct NodeOpts {
    /// Broker URL to use instead of the proxy's (the node then cannot be cut off).
    pub broker: Option<String>,
    /// Extra `fs-node` arguments.
    pub extra: Vec<String>,
    /// CA file `syncctl` trusts when the node serves https.
    pub tls_ca: Option<PathBuf>,
    /// AMQP heartbeat interval asked of the broker through the proxy (default 5 s: the
    /// broker closes the connection of a node silent for two of them).
    pub heartbeat_secs: Option<u32>,
}

impl NodeProc {
    pub fn start(dir: &Path, id: &str, vhost: &Vhost) -> NodeProc {
        Self::start_with(dir, id, vhost, &[])
    }

    pub fn start_with(dir: &Path, id: &str, vhost: &Vhost, extra: &[&str]) -> NodeProc {
        Self::start_opts(dir, id, vhost, NodeOpts { extra: extra.iter().map(|s| s.to_string()).collect(), ..Default::default() })
    }

    pub fn start_opts(dir: &Path, id: &str, vhost: &Vhost, opts: NodeOpts) -> NodeProc {
        let mut n = NodeProc {
            id: id.to_string(),
            mount: dir.join(format!("mnt-{id}")),
            data: dir.join(format!("data-{id}")),
            log: dir.join(format!("node-{id}.log")),
            proxy: BrokerProxy::start(),
            vhost: vhost.name.clone(),
            child: None,
            opts,
        };
        n.restart();
        n
    }

    pub fn broker_url(&self) -> String {
        if let Some(b) = &self.opts.broker {
            return b.clone();
        }
        let heartbeat = self.opts.heartbeat_secs.unwrap_or(5);
        format!("amqp://guest:guest@127.0.0.1:{}/{}?heartbeat={heartbeat}", self.proxy.port, self.vhost)
    }

    /// Restarts the node asking the broker for heartbeats every `secs` seconds, so that
    /// it can be frozen (SIGSTOP) for up to about twice that and stay connected.
    pub fn restart_with_heartbeat(&mut self, secs: u32) {
        self.opts.heartbeat_secs = Some(secs);
        self.restart();
    }

    /// (Re)starts the process and waits until it is mounted.
    pub fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new(bin("fs-node"));
        cmd.args(["--id", &self.id, "--broker", &self.broker_url(), "--mount"]).arg(&self.mount).arg("--data").arg(&self.data).args(&self.opts.extra);
        self.child = Some(spawn_logged(&mut cmd, &self.log));
        let url = self.data.join("node.url");
        eventually(&format!("node {} to mount", self.id), DEADLINE, || url.exists());
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
        unmount(&self.mount);
    }

    /// Sends `signal` to the node process and waits (with the harness deadline) for it to
    /// exit; returns how it exited. The mount is left as the process left it.
    pub fn signal_and_wait(&mut self, signal: i32) -> std::process::ExitStatus {
        signal_and_wait(self.child.take().expect("the node is running"), signal, &format!("node {}", self.id))
    }

    /// `syncctl` with arguments; returns (success, stdout, stderr).
    pub fn syncctl(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new(bin("syncctl"));
        cmd.arg("--data").arg(&self.data);
        if let Some(ca) = &self.opts.tls_ca {
            cmd.arg("--tls-ca").arg(ca);
        }
        // The node's own cluster token, if it was started with one.
        if let Some(i) = self.opts.extra.iter().position(|a| a == "--cluster-token") {
            cmd.arg("--cluster-token").arg(&self.opts.extra[i + 1]);
        }
        let out = cmd.args(args).output().expect("syncctl runs");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    pub fn status(&self) -> serde_json::Value {
        let (ok, out, err) = self.syncctl(&["status", "--json"]);
        assert!(ok, "syncctl status failed: {err}");
        serde_json::from_str(&out).expect("status is JSON")
    }

    pub fn connected(&self) -> bool {
        let (ok, out, _) = self.syncctl(&["status", "--json"]);
        ok && serde_json::from_str::<serde_json::Value>(&out).map(|v| v["connected"] == true).unwrap_or(false)
    }

    pub fn wait_connected(&self) {
        eventually(&format!("node {} to connect", self.id), DEADLINE, || self.connected());
    }

    pub fn pending(&self) -> u64 {
        self.status()["pending_changes"].as_u64().unwrap_or(u64::MAX)
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.mount.join(rel)
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether some mount sits exactly at `dir` (read from /proc/self/mountinfo).
pub fn is_mounted(dir: &Path) -> bool {
    let want = dir.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines().any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

pub fn unmount(dir: &Path) {
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
        unsafe {
            if libc::umount2(c.as_ptr(), 0) != 0 {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// A manager and some nodes on a vhost of their own.
pub struct Cluster {
    pub nodes: Vec<NodeProc>,
    pub manager: ManagerProc,
    pub vhost: Vhost,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start(name: &str, n: usize) -> Cluster {
        let dir = tempfile::Builder::new().prefix(&format!("syncfs-{name}-")).tempdir().expect("temp dir");
        let vhost = Vhost::new(name);
        let manager = ManagerProc::start(dir.path(), &vhost.url());
        let mut c = Cluster { nodes: Vec::new(), manager, vhost, dir };
        for i in 0..n {
            c.add_node(&format!("n{}", i + 1));
        }
        for node in &c.nodes {
            node.wait_connected();
        }
        c
    }

    pub fn add_node(&mut self, id: &str) -> usize {
        let node = NodeProc::start(self.dir.path(), id, &self.vhost);
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Waits until the manager names node `i` online at the peer URL it serves now: a
    /// node restarted on a new port is a holder others can be sent to only from then on
    /// (before, the manager still names its old address).
    pub fn wait_known_to_manager(&self, i: usize) {
        let n = &self.nodes[i];
        let (api, token) = self.manager.api();
        eventually(&format!("the manager to name {} at its current URL", n.id), DEADLINE, || {
            let (status, body) = http_get(&format!("{api}/api/nodes/{}", n.id), Some(&token));
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            status == 200 && v["online"] == true && v["url"].as_str() == Some(node_url(n).as_str())
        });
    }

    /// Waits until every node's mount shows the same tree and no node has pending work.
    pub fn converged(&self) {
        self.converged_within(DEADLINE);
    }

    pub fn converged_within(&self, deadline: Duration) {
        let mut last = String::new();
        let start = Instant::now();
        loop {
            let snaps: Vec<Tree> = self.nodes.iter().map(|n| snapshot(&n.mount)).collect();
            let same = snaps.windows(2).all(|w| w[0] == w[1]);
            if same && self.nodes.iter().all(|n| n.pending() == 0) {
                // Stable across two looks: nothing was in flight.
                std::thread::sleep(Duration::from_millis(100));
                if self.nodes.iter().map(|n| snapshot(&n.mount)).all(|s| s == snaps[0]) {
                    return;
                }
            }
            if start.elapsed() > deadline {
                for (n, s) in self.nodes.iter().zip(&snaps) {
                    last.push_str(&format!("--- {} ---\n{}\n", n.id, describe(s)));
                }
                panic!("trees did not converge within {deadline:?}:\n{last}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let show = failed || std::env::var_os("SYNC_SHOW_LOGS").is_some();
        for n in &mut self.nodes {
            n.stop();
        }
        self.manager.stop();
        if show {
            dump_log("manager", &self.manager.log);
            for n in &self.nodes {
                dump_log(&format!("node {}", n.id), &n.log);
            }
        }
        // Whole logs of a failed test (or of any, with SYNC_SHOW_LOGS), for a closer
        // look: SYNC_KEEP_LOGS=DIR.
        if let (true, Some(keep)) = (show, std::env::var_os("SYNC_KEEP_LOGS")) {
            let to = Path::new(&keep).join(self.dir.path().file_name().unwrap_or_default());
            let logs = std::iter::once(&self.manager.log).chain(self.nodes.iter().map(|n| &n.log));
            for log in logs {
                let copied = std::fs::create_dir_all(&to).and_then(|_| std::fs::copy(log, to.join(log.file_name().unwrap_or_default())));
                if let Err(e) = copied {
                    eprintln!("could not keep {}: {e}", log.display());
                }
            }
            eprintln!("logs kept in {}", to.display());
        }
    }
}

pub fn dump_log(what: &str, p: &Path) {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    // The per-step timing lines (debug level, target `timing`) would fill the dump and
    // push out what says why a test failed; they are counted instead.
    let is_timing = |l: &&str| l.contains(" timing: ");
    let timing = s.lines().filter(is_timing).count();
    let lines: Vec<&str> = s.lines().filter(|l| !is_timing(l)).collect();
    let from = lines.len().saturating_sub(150);
    eprintln!("===== last lines of {what} log ({}; {timing} timing lines left out) =====", p.display());
    for l in &lines[from..] {
        eprintln!("{l}");
    }
}

/// What a test compares between mounts, per path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    File { mode: u32, uid: u32, gid: u32, mtime: i64, hash: String, size: u64 },
    Dir { mode: u32, uid: u32, gid: u32 },
    Symlink { target: String },
    Other,
}

pub type Tree = BTreeMap<String, Node>;

fn hash_file(p: &Path) -> String {
    match std::fs::read(p) {
        Ok(b) => blake3::hash(&b).to_hex().to_string(),
        Err(e) => format!("<unreadable: {e}>"),
    }
}

/// Every path under `root` with what is synced of it.
pub fn snapshot(root: &Path) -> Tree {
    let mut t = Tree::new();
    walk(root, root, &mut t);
    t
}

fn walk(root: &Path, dir: &Path, t: &mut Tree) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let ft = m.file_type();
        let mode = m.permissions().mode() & 0o7777;
        let node = if ft.is_symlink() {
            Node::Symlink { target: std::fs::read_link(&p).map(|t| t.to_string_lossy().into_owned()).unwrap_or_default() }
        } else if ft.is_dir() {
            walk(root, &p, t);
            Node::Dir { mode, uid: m.uid(), gid: m.gid() }
        } else if ft.is_file() {
            Node::File { mode, uid: m.uid(), gid: m.gid(), mtime: m.mtime() * 1_000_000_000 + m.mtime_nsec(), hash: hash_file(&p), size: m.len() }
        } else {
            Node::Other
        };
        t.insert(rel, node);
    }
}

pub fn describe(t: &Tree) -> String {
    t.iter().map(|(p, n)| format!("{p}: {n:?}")).collect::<Vec<_>>().join("\n")
}

/// `n` bytes that look random (xorshift from `seed`): contents no chunker or compressor
/// finds structure in, the same for the same seed.
pub fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes a file through the mount (open, write, close: one change).
pub fn write(p: &Path, bytes: &[u8]) {
    std::fs::write(p, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
}

pub fn read(p: &Path) -> Option<Vec<u8>> {
    std::fs::read(p).ok()
}

/// Files in `dir` whose name marks them as conflict files.
pub fn conflict_files(dir: &Path) -> Vec<String> {
    snapshot(dir).into_keys().filter(|p| p.contains(" (conflict from ")).collect()
}

/// Publishes raw bytes on the test's vhost, as a misbehaving client would.
pub fn publish_raw(vhost: &Vhost, exchange: &str, key: &str, bytes: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let conn = broker_link::connect(&vhost.url()).await.unwrap();
        let ch = broker_link::confirmed_channel(&conn).await.unwrap();
        broker_link::declare_common(&conn).await.unwrap();
        broker_link::publish_confirmed(&ch, exchange, key, "raw", bytes).await.unwrap();
        let _ = conn.close(200, "done".into()).await;
    });
}

/// Messages waiting in a queue of the vhost.
pub fn queue_depth(vhost: &Vhost, queue: &str) -> u64 {
    queues(vhost).into_iter().find(|(name, _)| name == queue).map_or(0, |(_, n)| n)
}

/// The queues of `vhost`, each with its ready messages.
pub fn queues(vhost: &Vhost) -> Vec<(String, u64)> {
    let out = Command::new("rabbitmqctl").args(vhost.ctl_args(&["list_queues", "-p", &vhost.name, "name", "messages"])).output().expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// The harness's HTTP client: one for the whole test process, each request on a fresh
/// connection (servers under test close connections, and some tests restart them) and
/// bounded by the harness deadline (also each read of a streamed body).
pub fn http_client() -> &'static reqwest::blocking::Client {
    static CLIENT: std::sync::OnceLock<reqwest::blocking::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| reqwest::blocking::Client::builder().timeout(DEADLINE).pool_max_idle_per_host(0).build().expect("an HTTP client"))
}

/// A GET; returns (status, body).
pub fn http_get(url: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    let mut req = http_client().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().unwrap_or_else(|e| panic!("GET {url}: {:#}", anyhow::Error::new(e)));
    let status = r.status().as_u16();
    (status, r.bytes().unwrap_or_else(|e| panic!("reading the body of {url}: {e}")).to_vec())
}

/// Parses Prometheus text into name{labels} → value, refusing malformed lines.
pub fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    let mut m = std::collections::HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("malformed metrics line {line:?}"));
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("malformed value in {line:?}"));
        m.insert(name.to_string(), v);
    }
    m
}

/// A node's metrics, parsed.
pub fn node_metrics(n: &NodeProc) -> std::collections::HashMap<String, f64> {
    let (status, body) = http_get(&format!("{}/metrics", node_url(n)), None);
    assert_eq!(status, 200, "GET /metrics of {}", n.id);
    parse_metrics(&String::from_utf8(body).expect("metrics are UTF-8"))
}

/// The node's peer URL.
pub fn node_url(n: &NodeProc) -> String {
    std::fs::read_to_string(n.data.join("node.url")).expect("node.url").trim().to_string()
}

impl NodeProc {
    /// Kills the node with SIGKILL, as a crash would, and waits for it to exit: nothing
    /// is flushed or unmounted (the dead mount stays until `restart`). Its `node.url`
    /// is removed so that `restart` waits for the new process, not the dead one's file.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.data.join("node.url"));
    }
}

impl ManagerProc {
    /// The running manager's process id.
    pub fn pid(&self) -> Option<u32> {
        Some(self.child.as_ref()?.id())
    }

    /// Kills the manager with SIGKILL, as a crash would, and waits for it to exit.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Resident memory of the running manager, in bytes.
    pub fn rss(&self) -> Option<u64> {
        rss_of(self.child.as_ref()?.id())
    }
}

impl NodeProc {
    /// The running node's process id.
    pub fn pid(&self) -> Option<u32> {
        Some(self.child.as_ref()?.id())
    }

    /// Resident memory of the running node, in bytes.
    pub fn rss(&self) -> Option<u64> {
        rss_of(self.child.as_ref()?.id())
    }
}

/// `VmRSS` of process `pid`, in bytes.
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// The head (request line and headers) of the next HTTP/1.1 request a fake peer reads
/// from `s`; `None` once the client closed the connection.
pub fn read_request_head(s: &mut std::net::TcpStream) -> Option<String> {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
    Some(String::from_utf8_lossy(&buf).to_string())
}

/// The `Range: bytes=FIRST-LAST` of a request head, as (first, last); (0, 0) without one.
pub fn requested_range(head: &str) -> (usize, usize) {
    let range = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("range: bytes=").map(str::to_string)).unwrap_or_default();
    let (x, y) = range.trim().split_once('-').unwrap_or(("0", "0"));
    (x.parse().unwrap_or(0), y.parse().unwrap_or(0))
}

/// A fake peer that never answers: holds the connection until the client closes it.
pub fn hold_until_closed(s: &mut std::net::TcpStream) {
    use std::io::Read;
    let mut b = [0u8; 4096];
    while matches!(s.read(&mut b), Ok(n) if n > 0) {}
}

/// Runs `cmd` to its end or for at most `limit`, whichever comes first, collecting its
/// output. A command still running at the limit is killed and reported as
/// `ErrorKind::TimedOut`, so that a hung `docker` or CLI call fails the test with its
/// name instead of holding it until the runner's timeout.
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::io::Result<std::process::Output> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{cmd:?} still running after {limit:?}; killed")));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(std::process::Output { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() })
}

/// What the machine looks like when a test seems to hang: processes in uninterruptible
/// sleep (a hung FUSE mount or device) and where they wait, the FUSE mounts, the
/// containers and the end of dockerd's log. Each probe is itself bounded.
pub fn hang_report() -> String {
    let probe = |what: &str, cmd: &mut Command| -> String {
        match output_within(cmd, Duration::from_secs(15)) {
            Ok(o) => format!("--- {what} ---\n{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
            Err(e) => format!("--- {what} --- {e}\n"),
        }
    };
    let mut report = String::new();
    report += &probe("processes in D state", Command::new("sh").args(["-c", "ps -eo pid,stat,wchan:32,etimes,args | awk 'NR==1 || $2 ~ /D/'"]));
    report += &probe("fuse mounts", Command::new("sh").args(["-c", "grep fuse /proc/self/mounts | head -50"]));
    report += &probe("docker ps", Command::new("docker").args(["ps", "-a", "--format", "{{.Names}} {{.Status}}"]));
    report += &probe("dockerd log", Command::new("sh").args(["-c", "tail -n 40 /var/log/syncfs-dockerd.log"]));
    report
}

/// Prints [`hang_report`] to stderr (which the test runner shows, also for a test it
/// times out) if it is still alive `after` a while; dropped, it does nothing.
pub struct HangWatch {
    done: Option<std::sync::mpsc::Sender<()>>,
}

impl HangWatch {
    pub fn start(what: &str, after: Duration) -> HangWatch {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let what = what.to_string();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(after) {
                eprintln!("===== {what}: still running after {after:?}; the machine now =====\n{}", hang_report());
            }
        });
        HangWatch { done: Some(tx) }
    }
}

impl Drop for HangWatch {
    fn drop(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}
