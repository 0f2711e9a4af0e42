//! Seeded random work on three nodes with random disconnections. After every round all
//! trees are identical, and the last thing a node wrote to a path while it was cut off
//! survives, as the path's content or as a conflict file. (An online write may be
//! legitimately replaced by another node's later write made on top of it, so only writes
//! nobody else could have seen are checked.)
//! `SYNC_RANDOM_SEED` replays a run; `SYNC_RANDOM_ROUNDS` sets its length.

use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use system_tests::*;

const NAMES: [&str; 8] = ["a.txt", "b.txt", "c.txt", "d.txt", "e", "f.md", "g.txt", "h"];

#[test]
fn random_work_with_random_cuts_converges_without_losing_writes() {
    let seed: u64 = std::env::var("SYNC_RANDOM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let rounds: usize = std::env::var("SYNC_RANDOM_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    eprintln!("random convergence: SYNC_RANDOM_SEED={seed} SYNC_RANDOM_ROUNDS={rounds}");
    let mut rng = StdRng::seed_from_u64(seed);
    let c = Cluster::start("random", 3);
    for round in 0..rounds {
        let cut: Vec<bool> = (0..3).map(|_| rng.random_bool(0.4)).collect();
        eprintln!("round {round}: cut {cut:?}");
        for (n, &is_cut) in c.nodes.iter().zip(&cut) {
            if is_cut {
                n.proxy.cut();
            }
        }
        for (n, &is_cut) in c.nodes.iter().zip(&cut) {
            if is_cut {
                eventually("node to go offline", DEADLINE, || !n.connected());
            }
        }
        // Last operation per (node, path) in this round: Some(body) for a write.
        let mut last: BTreeMap<(usize, &str), Option<String>> = BTreeMap::new();
        for op in 0..12 {
            let who = rng.random_range(0..3);
            let name = NAMES[rng.random_range(0..NAMES.len())];
            let p = c.nodes[who].p(name);
            if rng.random_bool(0.2) {
                let ok = std::fs::remove_file(&p).is_ok();
                eprintln!("round {round} op {op}: n{} deletes {name} ({})", who + 1, if ok { "done" } else { "absent" });
                if ok {
                    last.insert((who, name), None);
                }
            } else {
                eprintln!("round {round} op {op}: n{} writes {name}", who + 1);
                let body = format!("round {round} op {op} by n{}", who + 1);
                write(&p, body.as_bytes());
                last.insert((who, name), Some(body));
            }
        }
        for n in &c.nodes {
            n.proxy.restore();
        }
        for n in &c.nodes {
            n.wait_connected();
        }
        c.converged();
        let tree = snapshot(&c.nodes[0].mount);
        let contents: BTreeSet<Vec<u8>> = tree.keys().filter_map(|p| read(&c.nodes[0].p(p))).collect();
        for ((who, name), body) in &last {
            let Some(body) = body else { continue };
            if !cut[*who] {
                continue;
            }
            assert!(
                contents.contains(body.as_bytes()),
                "seed {seed}, round {round}: n{}'s last write to {name} ({body:?}) was lost\n{}",
                who + 1,
                describe(&tree)
            );
        }
        // The user deals with the conflict files, as one would; this also keeps every
        // path below the cap on conflict files.
        for f in conflict_files(&c.nodes[0].mount) {
            std::fs::remove_file(c.nodes[0].p(&f)).unwrap();
        }
        c.converged();
    }
}
