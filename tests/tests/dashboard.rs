//! The dashboard in a real browser: Debian's chromium, headless, driven by Playwright
//! (`tests/browser/dashboard.mjs`, installed by `scripts/setup-browser.sh`), against a
//! real manager and a real fs-node with its FUSE mount. The page loads, takes the
//! operator token, shows the nodes, shows a file written in the mount without a reload,
//! and its Sync button makes the node run a sync. The screenshot is saved under
//! `target/test-output/dashboard.png`.

mod api_support;

use api_support::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use system_tests::{dump_log, eventually, write, NodeProc, DEADLINE};

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

fn output_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("test-output")
}

/// Starts a Playwright script of `tests/browser` against manager `m`'s dashboard, with
/// the operator token, where to save its screenshot, a fresh browser profile, and `env`;
/// its stdout is piped (the steps it reports), its stderr goes to `log`.
fn browser_script(m: &Manager, script: &str, screenshot: &Path, profile: &Path, log: &Path, env: &[(&str, String)]) -> std::process::Child {
    Command::new("node")
        .arg(browser_dir().join(script))
        .current_dir(browser_dir())
        .env("DASHBOARD_URL", format!("{}/", m.url()))
        .env("OPERATOR_TOKEN", &m.token)
        .env("SCREENSHOT", screenshot)
        .env("USER_DATA_DIR", profile)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("node runs (scripts/setup-browser.sh installs it)")
}

/// How often the node's log says the manager asked it for a sync.
fn sync_requests_logged(n: &NodeProc) -> usize {
    std::fs::read_to_string(&n.log).unwrap_or_default().matches("the manager asked for a sync").count()
}

#[test]
fn dashboard_shows_live_changes_and_its_sync_button_works() {
    assert!(Path::new("/usr/bin/chromium").exists(), "chromium is missing: run scripts/setup-browser.sh");
    assert!(browser_dir().join("node_modules/playwright-core").exists(), "playwright-core is missing: run scripts/setup-browser.sh");

    let m = Manager::start("dashboard");
    let node_dir = tempfile::tempdir().unwrap();
    let n1 = NodeProc::start(node_dir.path(), "n1", &m.vhost);
    n1.wait_connected();
    // A second node, simulated, that is pulling contents: the page shows its progress.
    let n2 = FakeNode::connect(&m.vhost, "n2");
    n2.heartbeat(0, 4);
    eventually("both nodes to be online in the API", DEADLINE, || {
        let nodes = m.get_json("/api/nodes");
        nodes["nodes"].as_array().unwrap().iter().filter(|n| n["online"] == true).count() == 2
    });
    let syncs_before = sync_requests_logged(&n1);

    let out = output_dir();
    std::fs::create_dir_all(&out).unwrap();
    let screenshot = out.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let profile = tempfile::tempdir().unwrap();
    let browser_log = out.join("dashboard-browser.log");
    let mut script = browser_script(&m, "dashboard.mjs", &screenshot, profile.path(), &browser_log, &[("CHANGED_PATH", "from-the-mount.txt".into())]);
    let (tx, rx) = mpsc::channel();
    let stdout = script.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut expect = |step: &str| match rx.recv_timeout(DEADLINE * 2) {
        Ok(line) if line == step => {}
        other => {
            let _ = script.kill();
            dump_log("browser script", &browser_log);
            panic!("expected {step} from the browser script, got {other:?}");
        }
    };

    expect("READY");
    write(&n1.p("from-the-mount.txt"), b"written through FUSE while the page is open");
    // The simulated pull makes progress: 2 of 4 left.
    let _alive = n2.keep_alive(1, 2);
    expect("CHANGE_SEEN");
    expect("SYNC_CLICKED");
    eventually("n1 to run the sync the button asked for", DEADLINE, || sync_requests_logged(&n1) > syncs_before);
    let head = m.get_json("/api/status")["head"].as_u64().unwrap();
    eventually("n1's status to show that sync's report", DEADLINE, || n1.status()["last_sync"]["head"].as_u64() == Some(head));
    // A stuck manager: its database locked by another process while nodes keep sending.
    expect("STALL_WATCH");
    let lock = rusqlite::Connection::open(m.db()).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    expect("STALL_SHOWN");
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    expect("DONE");
    let status = script.wait().unwrap();
    assert!(status.success(), "browser script failed: {}", std::fs::read_to_string(&browser_log).unwrap_or_default());
    let png = std::fs::read(&screenshot).expect("the screenshot was saved");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "the screenshot is not a real PNG");
    assert_no_secret(&m.log, &[&m.token, &m.cluster_token]);
    assert_no_secret(&n1.log, &[&m.token]);
}

/// The trash and versions views: a directory removed with `rm -rf` on one node is
/// restored with the trash's button, an overwritten file with the versions view's; both
/// come back in every mount.
#[test]
fn dashboard_restores_from_the_trash_and_from_a_files_versions() {
    assert!(Path::new("/usr/bin/chromium").exists(), "chromium is missing: run scripts/setup-browser.sh");
    let m = Manager::start("dashboard-versions");
    let node_dir = tempfile::tempdir().unwrap();
    let n1 = NodeProc::start(node_dir.path(), "n1", &m.vhost);
    let n2 = NodeProc::start(node_dir.path(), "n2", &m.vhost);
    n1.wait_connected();
    n2.wait_connected();
    std::fs::create_dir_all(n1.p("album/2024")).unwrap();
    write(&n1.p("album/2024/beach.jpg"), b"sand and sea");
    write(&n1.p("album/index.txt"), b"one photo");
    write(&n1.p("letter.txt"), b"Dear all, the first draft");
    eventually("the files to reach n2", DEADLINE, || system_tests::read(&n2.p("letter.txt")).is_some() && n2.p("album/2024/beach.jpg").exists());
    write(&n1.p("letter.txt"), b"overwritten by mistake");
    eventually("the overwrite to reach n2", DEADLINE, || system_tests::read(&n2.p("letter.txt")).as_deref() == Some(b"overwritten by mistake"));
    std::fs::remove_dir_all(n1.p("album")).unwrap();
    eventually("the removal to reach n2", DEADLINE, || !n2.p("album").exists());
    let mut old_rev = 0;
    eventually("the old letter to be kept", DEADLINE, || {
        let v = m.get_json("/api/files/versions?path=letter.txt");
        let old = v["versions"].as_array().unwrap().iter().find(|v| v["available"] == true && v.get("ended_ms").is_some()).cloned();
        old_rev = old.and_then(|o| o["rev"].as_u64()).unwrap_or(0);
        old_rev > 0
    });

    let out = output_dir();
    std::fs::create_dir_all(&out).unwrap();
    let screenshot = out.join("dashboard-versions.png");
    let browser_log = out.join("dashboard-versions-browser.log");
    let profile = tempfile::tempdir().unwrap();
    let mut script = browser_script(
        &m,
        "versions.mjs",
        &screenshot,
        profile.path(),
        &browser_log,
        &[("TRASH_PATH", "album".into()), ("VERSIONS_PATH", "letter.txt".into()), ("OLD_REV", old_rev.to_string())],
    );
    let lines: Vec<String> = BufReader::new(script.stdout.take().unwrap()).lines().map_while(Result::ok).collect();
    let status = script.wait().unwrap();
    if !status.success() {
        dump_log("browser script", &browser_log);
    }
    assert!(status.success() && lines == ["TRASH_RESTORED", "VERSION_RESTORED", "DONE"], "browser script: {lines:?}");
    for n in [&n1, &n2] {
        eventually(&format!("the restored files on {}", n.id), DEADLINE, || {
            system_tests::read(&n.p("album/2024/beach.jpg")).as_deref() == Some(b"sand and sea")
                && system_tests::read(&n.p("album/index.txt")).as_deref() == Some(b"one photo")
                && system_tests::read(&n.p("letter.txt")).as_deref() == Some(b"Dear all, the first draft")
        });
    }
    let png = std::fs::read(&screenshot).expect("the screenshot was saved");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a real PNG");
}

/// The nodes table shows what an on-demand node said in its heartbeat: bytes here and
/// on demand, its pin rule, and a part-filled bar for a content it is fetching (the only
/// holder serves the first MiB and never the rest, and the file stays open meanwhile).
#[test]
fn dashboard_shows_an_on_demand_nodes_contents_and_a_fetch_in_progress() {
    assert!(Path::new("/usr/bin/chromium").exists(), "chromium is missing: run scripts/setup-browser.sh");
    let big: Vec<u8> = (0..24u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    // The holder stalls for longer than the browser may take to start on a busy machine:
    // n2 must not give up on it (and end the fetch) before the page looks.
    let setup = StalledHolder::start("dashboard-ondemand", &big, b"small", &["--pull-stall-secs", "600"]);
    let n2 = &setup.n2;
    let (ok, out, err) = n2.syncctl(&["pin", "keep"]);
    assert!(ok, "syncctl pin: {out} {err}");
    // The first MiB comes, the rest never: the fetch stays in progress while it is open.
    let mut f = std::fs::File::open(n2.p("big.bin")).unwrap();
    let mut head = vec![0u8; 4096];
    std::io::Read::read_exact(&mut f, &mut head).unwrap();
    assert_eq!(head, big[..4096]);

    let out = output_dir();
    std::fs::create_dir_all(&out).unwrap();
    let screenshot = out.join("dashboard-ondemand.png");
    let browser_log = out.join("dashboard-ondemand-browser.log");
    let profile = tempfile::tempdir().unwrap();
    let mut script = browser_script(
        &setup.m,
        "ondemand.mjs",
        &screenshot,
        profile.path(),
        &browser_log,
        &[("NODE", "n2".into()), ("PINNED", "keep".into()), ("PULL_HASH", setup.hashes[0].clone())],
    );
    let lines: Vec<String> = BufReader::new(script.stdout.take().unwrap()).lines().map_while(Result::ok).collect();
    let status = script.wait().unwrap();
    if !status.success() {
        dump_log("browser script", &browser_log);
    }
    assert!(status.success() && lines == ["RESIDENCY", "PULL_BAR", "DONE"], "browser script: {lines:?}");
    drop(f);
    let png = std::fs::read(&screenshot).expect("the screenshot was saved");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a real PNG");
}
