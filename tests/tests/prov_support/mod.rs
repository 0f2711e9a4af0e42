//! Shared pieces of the provisioning tests (docker_nodes, many_nodes, ec2_moto) on top of
//! the harness in tests/src/lib.rs (vhosts, manager and host node processes): the node
//! image, the `manager` CLI with a test's cluster name, and waits that report the last
//! state seen.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Poll interval of `eventually`: short enough not to add latency to timings we report.
pub const POLL: Duration = Duration::from_millis(100);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

#[allow(unused_imports)]
pub use system_tests::{bin, ManagerProc, NodeProc, Vhost};

pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

/// A port free on `host` at the moment of asking (another process may take it before
/// the caller binds it: on a shared address, check that what answers is the caller's own).
pub fn free_port_on(host: &str) -> u16 {
    std::net::TcpListener::bind((host, 0)).unwrap().local_addr().unwrap().port()
}

/// A loopback address of the calling test alone (127.x.y.z, chosen at random): servers it
/// starts there cannot be confused with another test's that found the same free port,
/// and a port nothing listens on stays so.
pub fn own_loopback() -> String {
    let r = uuid_like();
    let byte = |i: usize| u8::from_str_radix(&r[2 * i..2 * i + 2], 16).unwrap() % 254 + 1;
    format!("127.{}.{}.{}", byte(0), byte(1), byte(2))
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", &uuid_like()[..8])
}

fn uuid_like() -> String {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Polls `f` until it returns `Some`, or panics after `deadline` with `what` and the last state.
pub fn eventually<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let end = Instant::now() + deadline;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= end => {
                panic!("timed out after {deadline:?} waiting for {what}; last state: {last}")
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// How long one CLI or docker command of these tests may take (20 containers created
/// by one command take a few seconds here).
pub const COMMAND_LIMIT: Duration = Duration::from_secs(180);

/// Runs a command, returning its output; panics with stdout+stderr if it fails, and
/// with what the machine looks like if it hangs.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn run(cmd: &mut Command) -> Output {
    system_tests::output_within(cmd, COMMAND_LIMIT).unwrap_or_else(|e| panic!("running {cmd:?}: {e}\n{}", system_tests::hang_report()))
}

/// A child process killed (SIGTERM, then SIGKILL) on drop; its output goes to a log file.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(f.try_clone().unwrap()).stderr(f).spawn().unwrap_or_else(|e| panic!("spawning {name} ({cmd:?}): {e}"));
        Proc { name: name.into(), child, log }
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    pub fn assert_alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("{} exited ({st}); its log:\n{}", self.name, self.log_text());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lazily unmounts `dir` (ignoring "not mounted").
pub fn detach(dir: &Path) {
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2 on a NUL-terminated path.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Regular files under `dir`, relative path → contents. Errors are returned as text.
pub fn tree(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>, String> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<String, Vec<u8>>) -> Result<(), String> {
        for e in std::fs::read_dir(d).map_err(|e| format!("{}: {e}", d.display()))? {
            let e = e.map_err(|e| e.to_string())?;
            let p = e.path();
            let ft = e.file_type().map_err(|e| e.to_string())?;
            if ft.is_dir() {
                walk(root, &p, out)?;
            } else if ft.is_file() {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?);
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// Short description of a tree for failure messages.
pub fn describe(t: &BTreeMap<String, Vec<u8>>) -> String {
    t.iter().map(|(k, v)| format!("{k}({}B)", v.len())).collect::<Vec<_>>().join(", ")
}

/// `manager` with the test's cluster name.
pub fn manager(cluster: &str) -> Command {
    let mut c = Command::new(bin("manager"));
    c.env("SYNC_CLUSTER", cluster).env_remove("SYNC_BROKER").env("RUST_LOG", "warn");
    c
}

/// Directory holding the fs-node/syncctl binaries put into the image: `$SYNC_NODE_BIN_DIR`,
/// or the ones these tests run everywhere else (the workspace's test build; the package
/// test packs the same). No release build is needed for the suite.
pub fn node_bin_dir() -> PathBuf {
    match std::env::var_os("SYNC_NODE_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => bin("fs-node").parent().expect("a binary has a directory").to_path_buf(),
    }
}

/// Builds the node image through `manager image build` and returns its tag.
pub fn build_node_image(dir: &Path) -> String {
    let bins = node_bin_dir();
    let rootfs = dir.join("rootfs");
    run_ok(Command::new(repo_root().join("container/build-rootfs.sh")).arg("--bin-dir").arg(&bins).arg("--out").arg(&rootfs));
    let out = run_ok(manager("syncfs-image-build").args(["image", "build", "--rootfs"]).arg(&rootfs));
    assert!(out.starts_with("built syncfs-node:"), "unexpected output: {out}");
    out.split_whitespace().nth(1).unwrap().to_string()
}

/// The docker CLI (Debian's, matching the daemon, when present).
pub fn docker() -> Command {
    if Path::new("/usr/bin/docker").exists() {
        Command::new("/usr/bin/docker")
    } else {
        Command::new("docker")
    }
}

/// Removes every container and volume of `cluster` (best effort), for Drop guards.
pub fn purge_cluster(cluster: &str) {
    if let Err(e) = system_tests::output_within(manager(cluster).args(["node", "rm", "--all", "--purge"]), COMMAND_LIMIT) {
        eprintln!("removing the nodes of cluster {cluster}: {e}\n{}", system_tests::hang_report());
    }
}

/// Names and states from `manager node list`.
pub fn node_list(cluster: &str) -> Vec<(String, String)> {
    let out = run_ok(manager(cluster).args(["node", "list"]));
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

/// Nodes `manager status` reports online.
pub fn online_nodes(db: &Path) -> Vec<String> {
    let out = run(Command::new(bin("manager")).args(["status", "--db"]).arg(db));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let id = w.next()?;
            (w.next()? == "online").then(|| id.to_string())
        })
        .collect()
}
