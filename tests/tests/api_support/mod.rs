//! Shared by the API and dashboard tests: a real `manager serve --http` process on its own
//! vhost and port, requests through the harness's HTTP client (also the event stream), and a fake node
//! that speaks the wire protocol to the broker directly (heartbeats, changes, and reading
//! its own queue).

#![allow(dead_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use system_tests::{bin, dump_log, eventually, http_client, Vhost, DEADLINE};
use wire::{Change, ChangeOp, Content, ContentHash, Envelope, NodeId, RelPath, Revision, ToManager, ToNode, Version};

/// A free local port: bound to 0, read, released (the manager binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `manager serve --http 127.0.0.1:PORT` on a vhost of its own; stopped on drop, its
/// log printed if the test failed.
pub struct Manager {
    pub vhost: Vhost,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub token: String,
    pub cluster_token: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Manager {
    pub fn start(name: &str) -> Manager {
        Self::start_with(name, &[])
    }

    pub fn start_with(name: &str, extra: &[&str]) -> Manager {
        // A port found free may be taken by another test's process before the manager
        // binds it: the manager then exits, and it starts again on another port.
        for _ in 0..5 {
            let vhost = Vhost::new(name);
            let dir = tempfile::tempdir().unwrap();
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let log = dir.path().join("manager.log");
            let f = std::fs::File::create(&log).unwrap();
            let child = Command::new(bin("manager"))
                .args(["serve", "--broker", &vhost.url(), "--http", &addr.to_string(), "--db"])
                .arg(dir.path().join("manager.db"))
                .args(extra)
                // Anything the API provisions (the OpenAPI test POSTs every route) carries
                // this test's own cluster label, and is removed when the manager is dropped.
                .env("SYNC_CLUSTER", &vhost.name)
                .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "debug,lapin=warn,hyper=info".into()))
                .stdin(Stdio::null())
                .stdout(f.try_clone().unwrap())
                .stderr(f)
                .spawn()
                .expect("starting manager serve");
            let creds = dir.path().join("credentials.json");
            let mut m = Manager { vhost, addr, token: String::new(), cluster_token: String::new(), log, child: Some(child), dir };
            // Its own server answers (it says so once it has bound the port), or it ended.
            let mut exited = false;
            eventually("the manager's HTTP server to answer", DEADLINE, || {
                exited = matches!(m.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))));
                exited
                    || (creds.exists()
                        && std::fs::read_to_string(&m.log).unwrap_or_default().contains("dashboard and REST API on")
                        && TcpStream::connect(addr).is_ok())
            });
            if exited && std::fs::read_to_string(&m.log).unwrap_or_default().contains("Address already in use") {
                eprintln!("the manager's port {} was taken meanwhile: starting it again on another", addr.port());
                continue;
            }
            m.assert_running();
            let c: serde_json::Value = serde_json::from_slice(&std::fs::read(&creds).unwrap()).unwrap();
            m.token = c["operator_token"].as_str().unwrap().to_string();
            m.cluster_token = c["cluster_token"].as_str().unwrap().to_string();
            return m;
        }
        panic!("the manager could not bind a free port in five tries");
    }

    /// The head when it started (it says so in its log): its revisions go on from the
    /// time of its start (`Store::start_serving`), so those it gives are counted from it.
    pub fn first_head(&self) -> u64 {
        const SAYS: &str = "revisions go on after ";
        let log = || std::fs::read_to_string(&self.log).unwrap_or_default();
        eventually("the manager to log its first revision", DEADLINE, || log().contains(SAYS));
        let log = log();
        let after = log.split(SAYS).nth(1).expect("just seen");
        after.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().expect("a revision")
    }

    fn assert_running(&mut self) {
        if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
            panic!("manager exited with {status}: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("manager.db")
    }

    /// A request with the operator token.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        request(self.addr, method, path, Some(&self.token), body)
    }

    /// GET with the token that must answer 200 with JSON.
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let r = self.call("GET", path, None);
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r.json()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop();
        remove_cluster_containers(&self.vhost.name);
        if std::thread::panicking() {
            dump_log("manager", &self.log);
        }
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    /// The response head, header names lower-cased.
    pub head: String,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().to_string()))
    }
    /// The JSON error message; panics unless the body is `{"error": "..."}`.
    pub fn error(&self) -> String {
        let v = self.json();
        assert_eq!(v.as_object().map(|o| o.len()), Some(1), "error body has only `error`: {v}");
        v["error"].as_str().unwrap_or_else(|| panic!("no error message in {v}")).to_string()
    }
}

/// One request to the manager's HTTP server.
pub fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Resp {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("an HTTP method");
    let mut req = http_client().request(method.clone(), format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_string());
    }
    let r = req.send().unwrap_or_else(|e| panic!("{method} {path}: {:#}", anyhow::Error::new(e)));
    let status = r.status().as_u16();
    let head = head_of(&r);
    let body = r.bytes().unwrap_or_else(|e| panic!("reading the body of {method} {path}: {e}")).to_vec();
    Resp { status, head, body }
}

/// The response's headers as `name: value` lines, lower-cased.
fn head_of(r: &reqwest::blocking::Response) -> String {
    r.headers().iter().map(|(k, v)| format!("{}: {}", k, String::from_utf8_lossy(v.as_bytes()))).collect::<Vec<_>>().join("\n").to_ascii_lowercase()
}

/// A server-sent event stream being read.
pub struct Events {
    stream: reqwest::blocking::Response,
    text: String,
    pub status: u16,
    pub content_type: String,
}

impl Events {
    /// Opens `/api/events` with the token in the query (as a browser does).
    pub fn open(addr: SocketAddr, token: &str) -> Events {
        let stream = http_client()
            .get(format!("http://{addr}/api/events?token={token}"))
            .header("accept", "text/event-stream")
            .send()
            .unwrap_or_else(|e| panic!("opening /api/events: {e}"));
        let status = stream.status().as_u16();
        let content_type = stream.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        Events { stream, text: String::new(), status, content_type }
    }

    /// Reads events until one named `name` whose data satisfies `pred`; returns its data.
    pub fn wait_for(&mut self, name: &str, what: &str, mut pred: impl FnMut(&serde_json::Value) -> bool) -> serde_json::Value {
        let start = Instant::now();
        loop {
            while let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut event = "message";
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event: ") {
                        event = e;
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push_str(d);
                    }
                }
                if event == name {
                    let v: serde_json::Value = serde_json::from_str(&data).unwrap_or_else(|e| panic!("event {name} data is not JSON ({e}): {data}"));
                    if pred(&v) {
                        return v;
                    }
                }
            }
            assert!(start.elapsed() < DEADLINE, "timed out waiting for event {name}: {what}");
            // Each read waits at most the client's timeout (the harness deadline).
            let mut buf = [0u8; 8192];
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("event stream closed while waiting for {name}: {what}"),
                Ok(n) => self.text.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) => panic!("reading the event stream while waiting for {name} ({what}): {e}"),
            }
        }
    }
}

/// A node simulated at the protocol level: publishes to the update queue and reads its
/// own queue, like fs-node does, with no file system.
pub struct FakeNode {
    pub id: NodeId,
    rt: tokio::runtime::Runtime,
    conn: lapin::Connection,
    ch: lapin::Channel,
    queue: String,
    seq: std::sync::atomic::AtomicU64,
}

impl FakeNode {
    pub fn connect(vhost: &Vhost, id: &str) -> FakeNode {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let id: NodeId = id.parse().unwrap();
        let (conn, ch, queue) = rt.block_on(async {
            let conn = broker_link::connect(&vhost.url()).await.unwrap();
            let ch = broker_link::confirmed_channel(&conn).await.unwrap();
            broker_link::declare_common(&conn).await.unwrap();
            let queue = broker_link::declare_node_queue(&conn, &id).await.unwrap();
            (conn, ch, queue)
        });
        FakeNode { id, rt, conn, ch, queue, seq: Default::default() }
    }

    pub fn send(&self, body: ToManager) {
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-{}-{n}", self.id, std::process::id());
        let env = Envelope::new(id.parse().unwrap(), self.id.clone(), body);
        self.rt.block_on(broker_link::publish_confirmed(&self.ch, "", wire::topology::UPDATE_QUEUE, &id, &env.encode())).unwrap();
    }

    pub fn heartbeat(&self, pending_changes: u64, pending_pulls: u64) {
        self.send(ToManager::Heartbeat {
            url: format!("http://127.0.0.1:1/{}", self.id),
            pending_changes,
            pending_pulls,
            software: "fake-node 0.0.1".into(),
            residency: None,
            taken: Revision(0),
            applied: Revision(0),
        });
    }

    /// Keeps the node online: a heartbeat every second (as fs-node sends) until dropped.
    pub fn keep_alive(&self, pending_changes: u64, pending_pulls: u64) -> tokio::task::JoinHandle<()> {
        self.keep_alive_at(format!("http://127.0.0.1:1/{}", self.id), pending_changes, pending_pulls)
    }

    /// [`FakeNode::keep_alive`], saying its content server is at `url`.
    pub fn keep_alive_at(&self, url: String, pending_changes: u64, pending_pulls: u64) -> tokio::task::JoinHandle<()> {
        let (ch, id) = (self.ch.clone(), self.id.clone());
        self.rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            for n in 0u64.. {
                tick.tick().await;
                let msg = format!("{id}-hb-{}-{n}", std::process::id());
                let body = ToManager::Heartbeat {
                    url: url.clone(),
                    pending_changes,
                    pending_pulls,
                    software: "fake-node 0.0.1".into(),
                    residency: None,
                    taken: Revision(0),
                    applied: Revision(0),
                };
                let env = Envelope::new(msg.parse().unwrap(), id.clone(), body);
                if broker_link::publish_confirmed(&ch, "", wire::topology::UPDATE_QUEUE, &msg, &env.encode()).await.is_err() {
                    return;
                }
            }
        })
    }

    /// A new file at `path` (based on revision 0) with these bytes' hash.
    pub fn put_file(&self, path: &str, bytes: &[u8]) {
        let version = Version {
            content: Content::File { hash: ContentHash::from_bytes(*blake3::hash(bytes).as_bytes()), size: bytes.len() as u64 },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 1_764_000_000_000_000_000,
        };
        self.send(ToManager::Change(Change::new(RelPath::new(path).unwrap(), Revision(0), ChangeOp::Put { version })));
    }

    /// Waits for a message on the node's own queue matching `pred` (others are acked and
    /// skipped).
    pub fn wait_message(&self, what: &str, mut pred: impl FnMut(&ToNode) -> bool) -> ToNode {
        use lapin::options::{BasicAckOptions, BasicGetOptions};
        let start = Instant::now();
        loop {
            let got = self.rt.block_on(self.ch.basic_get(self.queue.as_str().into(), BasicGetOptions::default())).unwrap();
            match got {
                Some(msg) => {
                    self.rt.block_on(msg.delivery.ack(BasicAckOptions::default())).unwrap();
                    let env = Envelope::<ToNode>::decode(&msg.delivery.data).expect("the manager sends valid messages");
                    // A batch's items for this node count one by one, as a node takes them.
                    if let Some(found) = env.body.into_parts_for(&self.id).into_iter().find(|m| pred(m)) {
                        return found;
                    }
                }
                None => {
                    assert!(start.elapsed() < DEADLINE, "timed out waiting on {} for {what}", self.queue);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.conn.close(200, "test done".into()));
    }
}

/// Fails if `log` contains any of `secrets`.
pub fn assert_no_secret(log: &Path, secrets: &[&str]) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    for s in secrets {
        assert!(!s.is_empty() && !text.contains(s), "a secret appears in {}", log.display());
    }
}

/// Removes the containers and volumes labelled with `cluster` (none unless the test
/// provisioned some through the API). Quiet when Docker is not there.
fn remove_cluster_containers(cluster: &str) {
    let filter = format!("label=syncfs.cluster={cluster}");
    for (list, rm) in [(&["ps", "-aq"][..], &["rm", "-f"][..]), (&["volume", "ls", "-q"][..], &["volume", "rm", "-f"][..])] {
        let Ok(out) = Command::new("docker").args(list).args(["--filter", &filter]).output() else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect();
        if !ids.is_empty() {
            let _ = Command::new("docker").args(rm).args(&ids).output();
        }
    }
}

/// A holder that serves the true leaves of its contents; of `stalls` only the first
/// MiB (every later range is never answered), of `lies` wrong bytes of the right length.
pub fn slow_and_lying_holder(leaves: Vec<(String, Vec<u8>)>, stalls: (String, Vec<u8>), lies: String) -> String {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (leaves, stalls) = (std::sync::Arc::new(leaves), std::sync::Arc::new(stalls));
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let (leaves, stalls, lies) = (leaves.clone(), stalls.clone(), lies.clone());
            std::thread::spawn(move || {
                let mut s = s;
                while let Some(req) = system_tests::read_request_head(&mut s) {
                    let first = req.lines().next().unwrap_or("").to_string();
                    let body: Vec<u8> = if let Some((_, l)) = leaves.iter().find(|(h, _)| first.contains(&format!("/leaves/{h}"))) {
                        l.clone()
                    } else {
                        let (x, y) = system_tests::requested_range(&req);
                        if first.contains(&format!("/content/{}", stalls.0)) && x < 1 << 20 {
                            stalls.1[x..=y].to_vec()
                        } else if first.contains(&format!("/content/{lies}")) {
                            vec![0x42; y - x + 1]
                        } else {
                            system_tests::hold_until_closed(&mut s);
                            return;
                        }
                    };
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n", body.len());
                    if s.write_all(head.as_bytes()).and_then(|_| s.write_all(&body)).is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// A manager, node n1 that wrote `stalls` as big.bin and `lies` as other.bin and then
/// stopped, a fake node that holds both and serves them through
/// `slow_and_lying_holder` (the first MiB of big.bin, lies for other.bin), and node n2
/// on demand (with `n2_args`) that shows both: every fetch n2 makes of them goes to the
/// fake holder.
pub struct StalledHolder {
    pub m: Manager,
    pub n2: system_tests::NodeProc,
    pub hashes: Vec<String>,
    pub fake: FakeNode,
    _alive: tokio::task::JoinHandle<()>,
    _n1: system_tests::NodeProc,
    _dir: tempfile::TempDir,
}

impl StalledHolder {
    pub fn start(name: &str, stalls: &[u8], lies: &[u8], n2_args: &[&str]) -> StalledHolder {
        use system_tests::{http_get, node_url, write, NodeProc};
        let m = Manager::start(name);
        let dir = tempfile::tempdir().unwrap();
        let mut n1 = NodeProc::start(dir.path(), "n1", &m.vhost);
        n1.wait_connected();
        write(&n1.p("big.bin"), stalls);
        write(&n1.p("other.bin"), lies);
        let hashes: Vec<String> = [stalls, lies].iter().map(|d| blake3::hash(d).to_hex().to_string()).collect();
        let leaves: Vec<(String, Vec<u8>)> = hashes
            .iter()
            .map(|h| {
                let mut got = (0, Vec::new());
                eventually("n1 to serve the leaves", DEADLINE, || {
                    got = http_get(&format!("{}/leaves/{h}", node_url(&n1)), None);
                    got.0 == 200
                });
                (h.clone(), got.1)
            })
            .collect();
        // The only reachable holder of both: n1 goes away, a fake holder stays.
        let fake = FakeNode::connect(&m.vhost, "fake");
        let alive = fake.keep_alive_at(slow_and_lying_holder(leaves, (hashes[0].clone(), stalls.to_vec()), hashes[1].clone()), 0, 0);
        for (path, h) in [("big.bin", &hashes[0]), ("other.bin", &hashes[1])] {
            let rev = m.get_json(&format!("/api/files/history?path={path}"))["current_rev"].as_u64().unwrap();
            fake.send(ToManager::Holding { items: vec![wire::Held { path: RelPath::new(path).unwrap(), rev: Revision(rev), hash: h.parse().unwrap() }] });
        }
        eventually("two holders of each file", DEADLINE, || {
            ["big.bin", "other.bin"].iter().all(|p| m.get_json(&format!("/api/files/history?path={p}"))["holders"].as_array().unwrap().len() == 2)
        });
        let args: Vec<&str> = std::iter::once("--on-demand").chain(n2_args.iter().copied()).collect();
        let n2 = NodeProc::start_with(dir.path(), "n2", &m.vhost, &args);
        n2.wait_connected();
        eventually("n2 to show both files", DEADLINE, || n2.p("big.bin").exists() && n2.p("other.bin").exists());
        n1.stop();
        StalledHolder { m, n2, hashes, fake, _alive: alive, _n1: n1, _dir: dir }
    }
}
