//! Two Syncthing instances, A and B, sharing one send-receive folder: the system the
//! sync rows are compared with (docs/benchmarks.md). Owns their temp homes and their
//! processes: both are killed and the homes removed on drop, also when the bench fails.
//!
//! They talk to nothing but 127.0.0.1: each listens on a loopback port and knows the
//! other by an explicit `tcp://127.0.0.1:port` address; global and local discovery,
//! relays, NAT traversal (and so STUN), usage and crash reporting and upgrades are off.
//! Never measures anything itself: the rows in `main.rs` write under `a.folder` and
//! read under `b.folder`, as they do on the mounts of our cluster.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shared folder's id on both instances.
const FOLDER: &str = "bench";

/// The file-system watcher's delay in seconds: a change is scanned this long after the
/// watcher saw it. 1 is the lowest Syncthing takes (its default is 10), so that
/// Syncthing is measured at its fastest setting.
pub const FS_WATCHER_DELAY_S: u32 = 1;

/// How long both may take to come up, connect and finish their first scan: generous for
/// a loaded 2-core machine (it takes a few seconds when idle).
const START_DEADLINE: Duration = Duration::from_secs(120);

/// How often a condition is polled while waiting on an instance's REST API.
const POLL: Duration = Duration::from_millis(100);

/// One Syncthing process with its home (keys, config, database, log) and its folder.
pub struct Instance {
    pub name: &'static str,
    /// The shared folder's directory on this instance.
    pub folder: PathBuf,
    home: PathBuf,
    /// Device id, from the key `syncthing generate` made.
    id: String,
    /// Loopback port of the sync protocol (TCP).
    listen: u16,
    /// Loopback port of the GUI and REST API.
    gui: u16,
    api_key: String,
    child: Option<Child>,
}

/// A and B, started, connected and idle.
pub struct Pair {
    pub a: Instance,
    pub b: Instance,
    /// Holds both homes and folders; removed on drop, after the processes are killed.
    _dir: tempfile::TempDir,
}

/// "Syncthing v1.19.2-ds1" (from `syncthing --version`), or None when Syncthing is not
/// installed.
pub fn version() -> Option<String> {
    let out = Command::new("syncthing").arg("--version").output().ok()?;
    let line = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string();
    out.status.success().then(|| format!("Syncthing {}", line.split_whitespace().nth(1).unwrap_or("(unknown version)")))
}

/// A free TCP port on 127.0.0.1. The listener is closed before Syncthing binds the port:
/// another process could take it in between, and then start-up fails loudly (the wait
/// below names the instance and prints its log).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    l.local_addr().expect("local address of a bound listener").port()
}

impl Instance {
    /// Generates the keys under `dir/home-<name>` and makes the folder with its marker;
    /// nothing runs yet.
    fn generate(dir: &Path, name: &'static str) -> Instance {
        let home = dir.join(format!("home-{name}"));
        let out = Command::new("syncthing")
            .args(["generate", "--no-default-folder", "--skip-port-probing"])
            .arg(format!("--home={}", home.display()))
            .output()
            .expect("running `syncthing generate` (scripts/setup-bench.sh installs Syncthing)");
        assert!(out.status.success(), "syncthing generate --home={}: {}", home.display(), String::from_utf8_lossy(&out.stderr));
        let out =
            Command::new("syncthing").args(["serve", "--device-id"]).arg(format!("--home={}", home.display())).output().expect("syncthing serve --device-id");
        assert!(out.status.success(), "syncthing serve --device-id --home={}: {}", home.display(), String::from_utf8_lossy(&out.stderr));
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let folder = dir.join(format!("folder-{name}"));
        // Syncthing refuses to sync a folder without its marker (so that an unmounted
        // disk is not taken for an empty folder).
        std::fs::create_dir_all(folder.join(".stfolder")).unwrap_or_else(|e| panic!("creating {}: {e}", folder.display()));
        let api_key = format!("bench-{}-{}", std::process::id(), free_port());
        Instance { name, folder, home, id, listen: free_port(), gui: free_port(), api_key, child: None }
    }

    /// The whole config.xml: this instance, `peer` at its loopback address, the shared
    /// folder, and every option that would reach past loopback switched off. Fields not
    /// named keep Syncthing's defaults.
    fn config(&self, peer: &Instance) -> String {
        let device = |d: &Instance| {
            format!(
                r#"    <device id="{id}" name="{name}" compression="metadata" introducer="false">
        <address>tcp://127.0.0.1:{port}</address>
        <paused>false</paused>
        <autoAcceptFolders>false</autoAcceptFolders>
    </device>
"#,
                id = d.id,
                name = d.name,
                port = d.listen
            )
        };
        format!(
            r#"<configuration version="36">
    <folder id="{FOLDER}" label="{FOLDER}" path="{path}" type="sendreceive" rescanIntervalS="3600" fsWatcherEnabled="true" fsWatcherDelayS="{FS_WATCHER_DELAY_S}" ignorePerms="false" autoNormalize="true">
        <filesystemType>basic</filesystemType>
        <device id="{me}"></device>
        <device id="{peer}"></device>
    </folder>
{device_me}{device_peer}    <gui enabled="true" tls="false" debugging="false">
        <address>127.0.0.1:{gui}</address>
        <apikey>{api_key}</apikey>
    </gui>
    <options>
        <listenAddress>tcp://127.0.0.1:{listen}</listenAddress>
        <globalAnnounceEnabled>false</globalAnnounceEnabled>
        <localAnnounceEnabled>false</localAnnounceEnabled>
        <relaysEnabled>false</relaysEnabled>
        <natEnabled>false</natEnabled>
        <stunKeepaliveStartS>0</stunKeepaliveStartS>
        <announceLANAddresses>false</announceLANAddresses>
        <urAccepted>-1</urAccepted>
        <crashReportingEnabled>false</crashReportingEnabled>
        <autoUpgradeIntervalH>0</autoUpgradeIntervalH>
        <startBrowser>false</startBrowser>
        <setLowPriority>false</setLowPriority>
    </options>
</configuration>
"#,
            path = self.folder.display(),
            me = self.id,
            peer = peer.id,
            device_me = device(self),
            device_peer = device(peer),
            gui = self.gui,
            api_key = self.api_key,
            listen = self.listen,
        )
    }

    fn log(&self) -> PathBuf {
        self.home.join("syncthing.log")
    }

    fn spawn(&mut self, peer_config: String) {
        let config = self.home.join("config.xml");
        std::fs::write(&config, peer_config).unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
        let log = std::fs::File::create(self.log()).unwrap_or_else(|e| panic!("creating {}: {e}", self.log().display()));
        let child = Command::new("syncthing")
            // --no-restart: one process, no monitor parent, so that killing it ends it.
            .args(["serve", "--no-browser", "--no-restart", "--no-upgrade", "--no-default-folder"])
            .arg(format!("--home={}", self.home.display()))
            .env("STNOUPGRADE", "1")
            .env("STNORESTART", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a log file handle"))
            .stderr(log)
            .spawn()
            .expect("starting syncthing (scripts/setup-bench.sh installs it)");
        self.child = Some(child);
    }

    /// A GET on the REST API, parsed; None while it does not answer 200 with JSON.
    fn rest(&self, path_and_query: &str) -> Option<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}{path_and_query}", self.gui);
        let r = system_tests::http_client().get(&url).header("X-API-Key", &self.api_key).send().ok()?;
        if !r.status().is_success() {
            return None;
        }
        serde_json::from_slice(&r.bytes().ok()?).ok()
    }

    /// What is not yet ready, or None when this instance is connected to `peer`, its
    /// folder idle with nothing to pull, and `peer` complete as far as it knows.
    fn not_ready(&mut self, peer: &Instance) -> Option<String> {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            system_tests::dump_log(&format!("syncthing {}", self.name), &self.log());
            panic!("syncthing {} exited during start-up ({status})", self.name);
        }
        let Some(conns) = self.rest("/rest/system/connections") else {
            return Some(format!("{}: REST API on 127.0.0.1:{} not answering", self.name, self.gui));
        };
        if conns["connections"][&peer.id]["connected"] != true {
            return Some(format!("{}: not connected to {}", self.name, peer.name));
        }
        let Some(db) = self.rest(&format!("/rest/db/status?folder={FOLDER}")) else {
            return Some(format!("{}: no folder status", self.name));
        };
        if db["state"] != "idle" || db["needTotalItems"] != 0 {
            return Some(format!("{}: folder state {}, {} items to pull", self.name, db["state"], db["needTotalItems"]));
        }
        let Some(done) = self.rest(&format!("/rest/db/completion?folder={FOLDER}&device={}", peer.id)) else {
            return Some(format!("{}: no completion of {}", self.name, peer.name));
        };
        if done["completion"].as_f64() != Some(100.0) {
            return Some(format!("{}: {} is {}% complete", self.name, peer.name, done["completion"]));
        }
        None
    }
}

impl Pair {
    /// Bytes A has sent to B over their connection so far (Syncthing's own count).
    pub fn sent_a_to_b(&self) -> u64 {
        let conns = self.a.rest("/rest/system/connections").expect("A's connections");
        conns["connections"][&self.b.id]["outBytesTotal"].as_u64().unwrap_or(0)
    }

    /// Starts A and B under a new temp dir inside `parent` and waits until they are
    /// connected to each other and their folder is idle.
    pub fn start(parent: &Path) -> Pair {
        let dir = tempfile::Builder::new().prefix("syncthing-").tempdir_in(parent).expect("a temp dir for Syncthing");
        let mut a = Instance::generate(dir.path(), "A");
        let mut b = Instance::generate(dir.path(), "B");
        let (config_a, config_b) = (a.config(&b), b.config(&a));
        a.spawn(config_a);
        b.spawn(config_b);
        let mut pair = Pair { a, b, _dir: dir };
        let start = Instant::now();
        loop {
            let waiting = {
                let Pair { a, b, .. } = &mut pair;
                a.not_ready(b).or_else(|| b.not_ready(a))
            };
            let Some(what) = waiting else { break };
            if start.elapsed() > START_DEADLINE {
                for i in [&pair.a, &pair.b] {
                    system_tests::dump_log(&format!("syncthing {}", i.name), &i.log());
                }
                panic!("Syncthing did not become ready within {START_DEADLINE:?}: {what}");
            }
            std::thread::sleep(POLL);
        }
        pair.check_loopback_only();
        pair
    }

    /// Refuses to measure if the running instances say they would reach past loopback:
    /// the config is checked as Syncthing read it, not as it was written.
    fn check_loopback_only(&self) {
        for i in [&self.a, &self.b] {
            let cfg = i.rest("/rest/config").unwrap_or_else(|| panic!("GET /rest/config of {}", i.name));
            let o = &cfg["options"];
            for (key, off) in [
                ("globalAnnounceEnabled", false),
                ("localAnnounceEnabled", false),
                ("relaysEnabled", false),
                ("natEnabled", false),
                ("crashReportingEnabled", false),
                ("announceLANAddresses", false),
                ("setLowPriority", false),
            ] {
                assert_eq!(o[key], off, "syncthing {}: option {key} is {} in the running config", i.name, o[key]);
            }
            assert!(o["urAccepted"].as_i64().is_some_and(|v| v < 0), "syncthing {}: usage reporting not declined ({})", i.name, o["urAccepted"]);
            assert_eq!(o["listenAddresses"], serde_json::json!([format!("tcp://127.0.0.1:{}", i.listen)]), "syncthing {}: listen addresses", i.name);
            let folder = &cfg["folders"][0];
            assert_eq!(folder["fsWatcherDelayS"], FS_WATCHER_DELAY_S, "syncthing {}: watcher delay", i.name);
            assert_eq!(folder["type"], "sendreceive", "syncthing {}: folder type", i.name);
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        for i in [&mut self.a, &mut self.b] {
            if let Some(mut c) = i.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            if failed || std::env::var_os("SYNC_SHOW_LOGS").is_some() {
                system_tests::dump_log(&format!("syncthing {}", i.name), &i.log());
            }
        }
    }
}
