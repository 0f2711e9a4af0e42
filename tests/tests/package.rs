//! The Debian package (issue 16), built by `scripts/package-deb.sh` from the workspace's
//! binaries: its contents, and what it installs running as its systemd units say, from
//! settings files only: unpacked on this machine (a manager and two nodes), and installed
//! with dpkg in fresh Debian containers (`scripts/setup-debian-image.sh`) whose init is
//! systemd: the services are started with systemctl, a killed node is restarted by
//! systemd, a stopped one unmounts. On this machine the units are checked with
//! `systemd-analyze verify` and run by their `ExecStart` lines.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;
use system_tests::*;

/// How long one `docker exec` or `docker rm` may take before the test fails naming it.
const EXEC_LIMIT: Duration = Duration::from_secs(120);

/// The package built from this workspace's test binaries, in `dir`.
fn build_package(dir: &Path) -> PathBuf {
    let bin_dir = bin("fs-node").parent().unwrap().to_path_buf();
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/package-deb.sh"))
        .env("PACKAGE_BIN_DIR", &bin_dir)
        .env("PACKAGE_OUT_DIR", dir)
        .output()
        .expect("scripts/package-deb.sh runs");
    assert!(out.status.success(), "package-deb.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = Command::new("dpkg-deb").args(args).arg(deb).output().expect("dpkg-deb runs");
    assert!(out.status.success(), "dpkg-deb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The command a unit runs (`ExecStart`), with the package's paths under `root` and the
/// settings file `config` for the one the unit names.
fn unit_command(root: &Path, unit: &str, config: &Path) -> Command {
    let text = std::fs::read_to_string(root.join("lib/systemd/system").join(unit)).unwrap();
    let line = text.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("the unit has an ExecStart");
    let mut words = line.split_whitespace().map(|w| if w.starts_with("/etc/syncfs/") { config.display().to_string() } else { w.to_string() });
    let program = words.next().unwrap();
    assert!(program.starts_with("/usr/bin/"), "{program}");
    let mut cmd = Command::new(root.join(program.trim_start_matches('/')));
    cmd.args(words);
    cmd
}

/// A process started as its unit says; stopped with SIGTERM, as systemd does (`stop`, or
/// when dropped: then a mount it left is unmounted too, also when the test failed).
struct Service {
    child: Option<Child>,
    mount: Option<PathBuf>,
}
impl Service {
    fn start(mut cmd: Command, log: &Path, mount: Option<PathBuf>) -> Service {
        Service { child: Some(spawn_logged(&mut cmd, log)), mount }
    }
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }
}
impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
        if let Some(m) = &self.mount {
            unmount(m);
        }
    }
}

#[test]
fn the_package_holds_everything_and_its_units_run_a_cluster_from_settings_files() {
    let dir = tempfile::tempdir().unwrap();
    let deb = build_package(dir.path());
    assert_eq!(dpkg_deb(&["-f"], &deb).lines().find(|l| l.starts_with("Package:")), Some("Package: syncfs"));
    let listing = dpkg_deb(&["-c"], &deb);
    for f in [
        "./usr/bin/manager",
        "./usr/bin/fs-node",
        "./usr/bin/syncctl",
        "./lib/systemd/system/syncfs-node.service",
        "./lib/systemd/system/syncfs-manager.service",
        "./etc/syncfs/node.toml",
        "./etc/syncfs/manager.toml",
        "./usr/share/man/man1/fs-node.1.gz",
        "./usr/share/man/man1/manager.1.gz",
        "./usr/share/man/man1/syncctl.1.gz",
        "./usr/share/bash-completion/completions/syncctl",
    ] {
        assert!(listing.lines().any(|l| l.ends_with(f)), "{f} is not in the package:\n{listing}");
    }
    let control = dir.path().join("control");
    assert_eq!(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control).status().unwrap().code(), Some(0));
    assert_eq!(std::fs::read_to_string(control.join("conffiles")).unwrap(), "/etc/syncfs/node.toml\n/etc/syncfs/manager.toml\n");

    let root = dir.path().join("root");
    assert_eq!(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root).status().unwrap().code(), Some(0));
    let man = Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -dc {} | grep -c 'gitignore syntax'", root.join("usr/share/man/man1/fs-node.1.gz").display()))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&man.stdout).trim() != "0", "the man page documents the flags");

    // The units are what systemd accepts (an unknown key or a bad value is a warning it
    // prints), with their commands pointed at the unpacked binaries; and they ask for a
    // restart after a failure and a SIGTERM to stop (the node unmounts on it, below).
    let units = dir.path().join("units");
    std::fs::create_dir(&units).unwrap();
    for unit in ["syncfs-node.service", "syncfs-manager.service"] {
        let text = std::fs::read_to_string(root.join("lib/systemd/system").join(unit)).unwrap();
        for want in ["Restart=on-failure", "KillSignal=SIGTERM", "WantedBy=multi-user.target"] {
            assert!(text.lines().any(|l| l == want), "{unit} has {want}");
        }
        std::fs::write(units.join(unit), text.replace("ExecStart=/usr/bin/", &format!("ExecStart={}/usr/bin/", root.display()))).unwrap();
    }
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(units.join("syncfs-node.service"))
        .arg(units.join("syncfs-manager.service"))
        .current_dir(&units)
        .output()
        .expect("systemd-analyze runs (Debian's systemd package)");
    let said = format!("{}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
    assert!(verify.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");

    // The default settings files parse (a missing id and mount are reported as such).
    let out = Command::new(root.join("usr/bin/fs-node")).args(["--config"]).arg(root.join("etc/syncfs/node.toml")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--id") && !err.contains("unknown setting"), "{err}");

    // A manager and two nodes, each started by its unit's command with a settings file.
    let vhost = Vhost::new("pkg");
    let broker = vhost.url();
    let manager_toml = dir.path().join("manager.toml");
    std::fs::write(&manager_toml, format!("broker = \"{broker}\"\ndb = \"{}\"\nhttp = \"127.0.0.1:0\"\n", dir.path().join("manager.db").display())).unwrap();
    let _manager = Service::start(unit_command(&root, "syncfs-manager.service", &manager_toml), &dir.path().join("manager.log"), None);
    let mut nodes = Vec::new();
    for id in ["pa", "pb"] {
        let toml = dir.path().join(format!("{id}.toml"));
        let (mount, data) = (dir.path().join(format!("mnt-{id}")), dir.path().join(format!("data-{id}")));
        std::fs::write(
            &toml,
            format!("id = \"{id}\"\nmount = \"{}\"\ndata = \"{}\"\nbroker = \"{broker}\"\nignore = [\"*.swp\"]\n", mount.display(), data.display()),
        )
        .unwrap();
        let service = Service::start(unit_command(&root, "syncfs-node.service", &toml), &dir.path().join(format!("{id}.log")), Some(mount.clone()));
        eventually(&format!("node {id} to mount"), DEADLINE, || data.join("node.url").exists());
        nodes.push((service, mount));
    }
    write(&nodes[0].1.join("hello.txt"), b"from the package");
    write(&nodes[0].1.join("scratch.swp"), b"ignored by the settings file");
    write(&nodes[0].1.join("after.txt"), b"later");
    eventually("hello.txt and after.txt to reach the other node", DEADLINE, || {
        read(&nodes[1].1.join("hello.txt")).as_deref() == Some(b"from the package") && nodes[1].1.join("after.txt").exists()
    });
    assert!(!nodes[1].1.join("scratch.swp").exists(), "the settings file's ignore rule holds");

    // Stopped as systemd stops them: each node unmounts.
    for (mut service, mount) in nodes {
        service.stop();
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        assert!(!mounts.contains(&format!(" {} ", mount.display())), "{} is still mounted after the stop", mount.display());
    }
}

/// A container of the fresh Debian image (`scripts/setup-debian-image.sh`) with the
/// package file at /tmp/syncfs.deb, systemd running as its init; removed when dropped.
struct DebianBox {
    name: String,
}

impl DebianBox {
    fn start(name: &str, deb: &Path) -> DebianBox {
        let image = std::env::var("SYNC_DEBIAN_IMAGE").unwrap_or_else(|_| "syncfs-debian:bookworm-systemd".into());
        let _ = Command::new("docker").args(["rm", "-f", name]).output();
        let mut run = Command::new("docker");
        run.args(["run", "-d", "--name", name, "--network", "host", "--device", "/dev/fuse", "--cap-add", "SYS_ADMIN"]);
        run.args(["--security-opt", "apparmor=unconfined", "--tmpfs", "/run", "--tmpfs", "/run/lock", "-v"])
            .arg(format!("{}:/tmp/syncfs.deb:ro", deb.display()));
        // systemd as init needs the cgroup tree: read-only with cgroup v1, its own
        // writable one with the unified hierarchy (v2).
        if std::fs::metadata("/sys/fs/cgroup/cgroup.controllers").is_ok() {
            run.args(["--cgroupns", "host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw"]);
        } else {
            run.args(["-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro"]);
        }
        let out = run.args([&image, "/lib/systemd/systemd"]).output().expect("docker runs");
        assert!(out.status.success(), "docker run: {} (scripts/setup-debian-image.sh makes the image)", String::from_utf8_lossy(&out.stderr));
        let b = DebianBox { name: name.to_string() };
        eventually(&format!("systemd to be up in {name}"), DEADLINE, || {
            let (_, state) = b.sh("systemctl is-system-running");
            matches!(state.trim(), "running" | "degraded")
        });
        b
    }

    /// Runs `script` with sh in the container; returns (success, stdout + stderr).
    fn sh(&self, script: &str) -> (bool, String) {
        let out = output_within(Command::new("docker").args(["exec", &self.name, "sh", "-c", script]), EXEC_LIMIT)
            .unwrap_or_else(|e| panic!("in {}: {script}: {e}\n{}", self.name, hang_report()));
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }

    /// Starts a unit with systemctl and checks systemd calls it active.
    fn start_unit(&self, unit: &str) {
        let (ok, out) = self.sh(&format!("systemctl start {unit} && systemctl is-active {unit}"));
        assert!(ok, "starting {unit}: {out}");
    }

    /// What systemd says of a unit's property.
    fn show(&self, unit: &str, property: &str) -> String {
        self.sh(&format!("systemctl show -p {property} --value {unit}")).1.trim().to_string()
    }
}

impl Drop for DebianBox {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for unit in ["syncfs-manager.service", "syncfs-node.service"] {
                eprintln!("--- {} {unit} ---\n{}", self.name, self.sh(&format!("journalctl -u {unit} --no-pager | tail -40")).1);
            }
        }
        if let Err(e) = output_within(Command::new("docker").args(["rm", "-f", &self.name]), EXEC_LIMIT) {
            eprintln!("removing container {}: {e}\n{}", self.name, hang_report());
        }
    }
}

#[test]
fn installed_with_dpkg_in_fresh_debian_containers_the_services_sync_a_file() {
    // Before the runner's 300 s: if this hangs, the machine's state is in the output.
    let _watch = HangWatch::start("the dpkg containers test", Duration::from_secs(200));
    let dir = tempfile::tempdir().unwrap();
    let deb = build_package(dir.path());
    let vhost = Vhost::new("pkgbox");
    let broker = vhost.url();
    let boxes: Vec<DebianBox> = (1..=2).map(|i| DebianBox::start(&format!("syncfs-pkg-{}-{i}", std::process::id()), &deb)).collect();
    for b in &boxes {
        let (ok, out) = b.sh("dpkg -i /tmp/syncfs.deb && dpkg-query -W -f '${Status}' syncfs");
        assert!(ok && out.ends_with("install ok installed"), "dpkg -i in {}: {out}", b.name);
        let (ok, out) =
            b.sh("test -x /usr/bin/fs-node && test -f /lib/systemd/system/syncfs-node.service && test -f /etc/syncfs/node.toml && fs-node --version");
        assert!(ok, "{out}");
    }
    let manager_toml = format!("broker = \"{broker}\"\ndb = \"/var/lib/syncfs/manager.db\"\nhttp = \"127.0.0.1:0\"\n");
    let (ok, out) = boxes[0].sh(&format!("mkdir -p /var/lib/syncfs && printf '%s' '{manager_toml}' > /etc/syncfs/manager.toml"));
    assert!(ok, "{out}");
    boxes[0].start_unit("syncfs-manager.service");
    for (i, b) in boxes.iter().enumerate() {
        let node_toml = format!("id = \"box{i}\"\nmount = \"/srv/sync\"\ndata = \"/var/lib/syncfs/node\"\nbroker = \"{broker}\"\n");
        let (ok, out) = b.sh(&format!("mkdir -p /srv/sync && printf '%s' '{node_toml}' > /etc/syncfs/node.toml"));
        assert!(ok, "{out}");
        b.start_unit("syncfs-node.service");
        eventually(&format!("the node in {} to mount", b.name), DEADLINE, || b.sh("test -f /var/lib/syncfs/node/node.url").0);
    }
    let (ok, out) = boxes[0].sh("echo 'from one container' > /srv/sync/hello.txt");
    assert!(ok, "{out}");
    eventually("hello.txt to reach the other container", DEADLINE, || boxes[1].sh("cat /srv/sync/hello.txt").1 == "from one container\n");
    let (ok, out) = boxes[1].sh("syncctl --data /var/lib/syncfs/node status");
    assert!(ok && out.contains("state:     online"), "{out}");

    // Killed, the node is restarted by systemd (Restart=on-failure), clears the dead
    // mount it left and serves the same files again.
    let node = "syncfs-node.service";
    let first = boxes[1].show(node, "MainPID");
    let (ok, out) = boxes[1].sh(&format!("systemctl kill -s KILL {node}"));
    assert!(ok, "{out}");
    eventually("systemd to restart the killed node", DEADLINE, || {
        let pid = boxes[1].show(node, "MainPID");
        boxes[1].show(node, "NRestarts") == "1" && pid != "0" && pid != first && boxes[1].sh("systemctl is-active syncfs-node").0
    });
    eventually("the restarted node to serve the mount again", DEADLINE, || boxes[1].sh("cat /srv/sync/hello.txt").1 == "from one container\n");
    let (ok, out) = boxes[0].sh("echo 'after the restart' > /srv/sync/later.txt");
    assert!(ok, "{out}");
    eventually("a later file to reach the restarted node", DEADLINE, || boxes[1].sh("cat /srv/sync/later.txt").1 == "after the restart\n");
    // Stopped, it unmounts cleanly and systemd records a clean exit.
    let (ok, out) = boxes[1].sh(&format!("systemctl stop {node}"));
    assert!(ok, "{out}");
    let (_, mounts) = boxes[1].sh("cat /proc/mounts");
    assert!(!mounts.contains(" /srv/sync "), "/srv/sync is still mounted after systemctl stop: {mounts}");
    assert_eq!(boxes[1].show(node, "Result"), "success", "the stop was a clean exit");
    assert_eq!(boxes[0].show("syncfs-manager.service", "ActiveState"), "active");
}
