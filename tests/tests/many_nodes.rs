//! Many nodes at once: 20 container nodes created with one command all connect to the
//! broker and converge to the same tree (the original design failed as soon as a second
//! node connected soon after the first). Prints the time until all 20 are in sync.
//! Needs scripts/setup.sh and scripts/setup-docker.sh to have run.

mod prov_support;

use prov_support::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const NODES: usize = 20;
/// Files written before the nodes exist; each new node must fetch all of them.
const FILES: usize = 10;
/// 20 containers on a 2-core machine: starting them is the slow part, not the sync.
const DEADLINE: Duration = Duration::from_secs(240);

struct Cluster {
    name: String,
    host_mount: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        purge_cluster(&self.name);
        if let Ok(entries) = std::fs::read_dir(&self.host_mount) {
            for e in entries.flatten() {
                detach(&e.path().join("sync"));
                detach(&e.path());
            }
        }
        detach(&self.host_mount);
    }
}

#[test]
fn twenty_container_nodes_converge() {
    // Before the runner's 300 s: if this hangs, the machine's state is in the output.
    let _watch = system_tests::HangWatch::start("many_nodes", Duration::from_secs(200));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    build_node_image(dir);
    let vhost = Vhost::new("prov-many-");
    let broker = vhost.url();
    let mgr = ManagerProc::start(dir, &broker);
    let host = NodeProc::start(dir, &unique("host-"), &vhost);
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..FILES {
        let body = format!("file {i} written before the nodes existed\n").repeat(i + 1).into_bytes();
        std::fs::write(host.mount.join(format!("seed-{i}.txt")), &body).unwrap();
        expected.insert(format!("seed-{i}.txt"), body);
    }

    let cluster = unique("many");
    let host_mount = dir.join("mounts");
    let guard = Cluster { name: cluster.clone(), host_mount: host_mount.clone() };
    let t0 = Instant::now();
    let out = run_ok(manager(&cluster).args(["node", "create", "--count", &NODES.to_string(), "--broker", &broker, "--host-mount"]).arg(&host_mount));
    let created = t0.elapsed();
    let names: Vec<String> = out.lines().filter_map(|l| l.split_whitespace().next().map(str::to_string)).collect();
    assert_eq!(names.len(), NODES, "create printed:\n{out}");

    eventually(DEADLINE, "all 20 nodes online at the manager", || {
        let online = online_nodes(&mgr.db);
        let missing: Vec<&String> = names.iter().filter(|n| !online.contains(n)).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("not online: {missing:?}"))
        }
    });
    let connected = t0.elapsed();
    eventually(DEADLINE, "all 20 nodes to hold the seed files", || {
        for n in &names {
            let t = tree(&host_mount.join(n).join("sync"))?;
            if t != expected {
                return Err(format!("{n}: {}", describe(&t)));
            }
        }
        Ok(())
    });
    let synced = t0.elapsed();

    // A write in one container reaches the 19 others and the host node.
    let body = b"from node 7\n".to_vec();
    std::fs::write(host_mount.join(&names[6]).join("sync").join("late.txt"), &body).unwrap();
    expected.insert("late.txt".into(), body);
    let t1 = Instant::now();
    eventually(DEADLINE, "every node to converge to the same tree", || {
        for m in names.iter().map(|n| host_mount.join(n).join("sync")).chain([host.mount.clone()]) {
            let t = tree(&m)?;
            if t != expected {
                return Err(format!("{}: {}", m.display(), describe(&t)));
            }
        }
        Ok(())
    });
    let spread = t1.elapsed();
    println!(
        "many_nodes: {NODES} nodes: create command {:.1}s, all online {:.1}s, all {FILES} seed files on all nodes {:.1}s (from the create command); one write reached all {} nodes in {:.2}s",
        created.as_secs_f64(),
        connected.as_secs_f64(),
        synced.as_secs_f64(),
        NODES + 1,
        spread.as_secs_f64()
    );
    drop(guard);
    drop(host);
    drop(mgr);
}
