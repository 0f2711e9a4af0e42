//! Nodes as Docker containers against the real dockerd: build the image, create three
//! nodes with one command, see a file written in one container's mount appear in the
//! others and in a host node, remove and re-create a node and find its data back, and
//! check that `rm --all` leaves other clusters' and unlabelled containers alone.
//! Needs scripts/setup.sh and scripts/setup-docker.sh to have run.

#[path = "api_support/mod.rs"]
mod api_support;
mod prov_support;

use prov_support::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Containers start, mount and join within seconds; generous for a loaded 2-core CI box.
const SYNC_DEADLINE: Duration = Duration::from_secs(90);

struct Cluster {
    name: String,
    extra_containers: Vec<String>,
    extra_clusters: Vec<String>,
    host_mount: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        purge_cluster(&self.name);
        for c in &self.extra_clusters {
            purge_cluster(c);
        }
        for c in &self.extra_containers {
            let _ = docker().args(["rm", "-f", c]).output();
        }
        if let Ok(entries) = std::fs::read_dir(&self.host_mount) {
            for e in entries.flatten() {
                detach(&e.path().join("sync"));
                detach(&e.path());
            }
        }
        detach(&self.host_mount);
    }
}

fn expect_file(dir: &Path, rel: &str, want: &[u8]) -> Result<(), String> {
    match std::fs::read(dir.join(rel)) {
        Ok(got) if got == want => Ok(()),
        Ok(got) => Err(format!("{} has {} bytes, want {}", dir.join(rel).display(), got.len(), want.len())),
        Err(e) => Err(format!("{}: {e}", dir.join(rel).display())),
    }
}

/// Some file in the volume's directory on the host holds `want`: a blob file, or the
/// small contents' database (a small content is a row, its bytes in one piece).
fn volume_holds(volume: &str, want: &[u8]) -> bool {
    let out = run_ok(docker().args(["volume", "inspect", "--format", "{{.Mountpoint}}", volume]));
    let dir = PathBuf::from(out.trim());
    fn walk(d: &Path, want: &[u8]) -> bool {
        std::fs::read_dir(d)
            .map(|it| {
                it.flatten().any(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        walk(&p, want)
                    } else {
                        std::fs::read(&p).map(|b| b.windows(want.len()).any(|w| w == want)).unwrap_or(false)
                    }
                })
            })
            .unwrap_or(false)
    }
    walk(&dir, want)
}

#[test]
fn three_container_nodes_and_a_host_node_share_files() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tag = build_node_image(dir);
    eprintln!("image {tag} built at {:.1}s", t0.elapsed().as_secs_f64());

    let vhost = Vhost::new("prov-docker-");
    let broker = vhost.url();
    let mgr = ManagerProc::start(dir, &broker);
    let cluster = unique("dn");
    let other = unique("other");
    let host_mount = dir.join("mounts");
    let raw = unique("unlabelled-");
    let guard = Cluster { name: cluster.clone(), extra_containers: vec![raw.clone()], extra_clusters: vec![other.clone()], host_mount: host_mount.clone() };

    // Three nodes, one command.
    let out = run_ok(manager(&cluster).args(["node", "create", "--count", "3", "--broker", &broker, "--host-mount"]).arg(&host_mount));
    let names: Vec<String> = out.lines().filter_map(|l| l.split_whitespace().next().map(str::to_string)).collect();
    assert_eq!(names, vec![format!("{cluster}-1"), format!("{cluster}-2"), format!("{cluster}-3")], "create printed:\n{out}");
    let list = node_list(&cluster);
    assert_eq!(list.len(), 3, "{list:?}");
    assert!(list.iter().all(|(_, state)| state == "running"), "{list:?}");

    let host = NodeProc::start(dir, &unique("host-"), &vhost);
    let mounts: Vec<PathBuf> = names.iter().map(|n| host_mount.join(n).join("sync")).collect();
    eventually(SYNC_DEADLINE, "all four nodes online at the manager", || {
        let online = online_nodes(&mgr.db);
        if names.iter().chain([&host.id]).all(|n| online.contains(n)) {
            Ok(())
        } else {
            Err(format!("online: {online:?}"))
        }
    });

    // Written in container 1's mount (through its shared bind mount on the host).
    let body = b"written inside container one\n".to_vec();
    std::fs::create_dir_all(mounts[0].join("docs")).unwrap();
    std::fs::write(mounts[0].join("docs/hello.txt"), &body).unwrap();
    eventually(SYNC_DEADLINE, "docs/hello.txt on every node", || {
        for m in mounts.iter().chain([&host.mount]) {
            expect_file(m, "docs/hello.txt", &body)?;
        }
        Ok(())
    });
    // And the other way: written on the host node, seen in the containers.
    std::fs::write(host.mount.join("from-host.txt"), b"host").unwrap();
    eventually(SYNC_DEADLINE, "from-host.txt in every container", || mounts.iter().try_for_each(|m| expect_file(m, "from-host.txt", b"host")));
    eprintln!("three nodes and the host node in sync at {:.1}s", t0.elapsed().as_secs_f64());

    // Remove node 2: the container goes, its volume (and the file in it) stays.
    let victim = &names[1];
    run_ok(manager(&cluster).args(["node", "rm", victim]));
    assert!(!node_list(&cluster).iter().any(|(n, _)| n == victim));
    assert!(volume_holds(&format!("{victim}-data"), &body), "the data volume of {victim} lost the file's contents");
    // Re-created with the same name: its files are back.
    run_ok(manager(&cluster).args(["node", "create", "--name", victim, "--broker", &broker, "--host-mount"]).arg(&host_mount));
    eventually(SYNC_DEADLINE, "the re-created node to show its files", || {
        expect_file(&mounts[1], "docs/hello.txt", &body)?;
        expect_file(&mounts[1], "from-host.txt", b"host")
    });
    let logs = run_ok(manager(&cluster).args(["node", "logs", victim]));
    assert!(!logs.trim().is_empty(), "node logs of {victim} are empty");

    // Other containers on the same daemon: another cluster's node and an unlabelled one.
    run_ok(manager(&other).args(["node", "create", "--broker", &broker]));
    run_ok(docker().args(["create", "--name", &raw, "--label", "syncfs.cluster=someone-else", &tag, "--help"]));
    let removed = run_ok(manager(&cluster).args(["node", "rm", "--all", "--purge"]));
    assert!(removed.contains("removed 3 node(s)"), "{removed}");
    assert!(node_list(&cluster).is_empty());
    assert_eq!(node_list(&other).len(), 1, "rm --all touched another cluster");
    let raw_state = run_ok(docker().args(["inspect", "--format", "{{.State.Status}}", &raw]));
    assert_eq!(raw_state.trim(), "created", "rm --all touched an unlabelled container");
    // Removing a node that is not ours fails clearly and touches nothing.
    let out = run(manager(&cluster).args(["node", "rm", &raw]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("no node named {raw} in cluster {cluster}")), "{}", String::from_utf8_lossy(&out.stderr));

    drop(guard);
    drop(host);
    drop(mgr);
    eprintln!("docker_nodes took {:.1}s", t0.elapsed().as_secs_f64());
}

#[test]
fn clear_errors_without_image_or_with_bad_names() {
    let cluster = unique("dn-err");
    let out = run(manager(&cluster).args(["node", "create", "--image", "syncfs-node:does-not-exist"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("syncfs-node:does-not-exist is not in the Docker daemon") && err.contains("manager image build"), "{err}");
    let out = run(manager(&cluster).args(["node", "create", "--name", "bad/name"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid node name"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `POST /api/nodes {"id": ...}` (what the dashboard's "Create node" sends) makes the node
/// it was asked for, and that node holds the cluster token and, since this manager
/// requires node users, its own least-privilege broker user: it fetches from a node that
/// requires the token (without it, every pull is refused with 401 for ever) and its
/// changes are accepted. Removing it through the API revokes its broker user.
#[test]
fn api_creates_the_node_asked_for_and_gives_it_the_cluster_token() {
    let tmp = tempfile::tempdir().unwrap();
    build_node_image(tmp.path());
    let m = api_support::Manager::start_with("prov-api-", &["--require-node-users"]);
    let id = unique("charlie-");
    let host_id = unique("host-");
    let _users = BrokerUsers(vec![format!("sync-node-{id}"), format!("sync-node-{host_id}")]);
    let r = m.call("POST", "/api/nodes", Some(&format!(r#"{{"id": "{id}"}}"#)));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["created"][0]["name"], id.as_str(), "{}", r.text());
    // A field the route does not take is refused, not ignored.
    let r = m.call("POST", "/api/nodes", Some(r#"{"name": "charlie"}"#));
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.error().contains("unknown field \"name\""), "{}", r.text());
    // The broker URL (a secret) is in the container's environment, not its command line.
    let args = run_ok(docker().args(["inspect", "--format", "{{json .Args}}", &id]));
    assert!(!args.contains("amqp"), "the broker URL is on the command line: {args}");

    // The host node is admitted with its own user too (the manager refuses guest).
    let env_file = tmp.path().join("host.env");
    run_ok(Command::new(bin("manager")).args(["node", "add", &host_id, "--broker", &m.vhost.url(), "--out"]).arg(&env_file).env("SYNC_MANAGER_DB", m.db()));
    let env: std::collections::HashMap<String, String> =
        std::fs::read_to_string(&env_file).unwrap().lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect();
    assert_eq!(env["SYNC_CLUSTER_TOKEN"], m.cluster_token);
    let opts = system_tests::NodeOpts {
        broker: Some(env["SYNC_BROKER"].clone()),
        extra: vec!["--cluster-token".into(), m.cluster_token.clone()],
        ..Default::default()
    };
    let host = NodeProc::start_opts(tmp.path(), &host_id, &m.vhost, opts);
    let body = format!("for {id} from a node that requires the cluster token\n").into_bytes();
    std::fs::write(host.mount.join("token.txt"), &body).unwrap();
    eventually(SYNC_DEADLINE, "the API-made node to fetch token.txt from the host node", || {
        if volume_holds(&format!("{id}-data"), &body) {
            Ok(())
        } else {
            Err(format!("not in {id}'s volume yet; host log tail: {}", tail(&host.log)))
        }
    });
    let r = m.call("DELETE", &format!("/api/nodes/{id}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let users = run_ok(Command::new("rabbitmqctl").args(["-q", "list_users"]));
    assert!(!users.contains(&format!("sync-node-{id}")), "the removed node's broker user is still there");
    // Dropping the manager removes what it provisioned (its cluster label), also on failure.
    drop(host);
    drop(m);
}

/// Deletes the test's broker users (they are broker-wide), also on failure.
struct BrokerUsers(Vec<String>);
impl Drop for BrokerUsers {
    fn drop(&mut self) {
        for u in &self.0 {
            let _ = Command::new("rabbitmqctl").args(["-q", "delete_user", u]).output();
        }
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
}
