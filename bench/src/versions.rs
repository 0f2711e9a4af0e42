//! What keeping old versions costs (issue 16): the same cluster with the manager keeping
//! every overwritten and deleted version in two copies (the default) and keeping none
//! (`--keep-copies 0`), taking turns round by round. Each round overwrites 1,000 files of
//! 4 KiB, overwrites one 256 MiB file, and deletes the 1,000 files, each timed on A
//! until B has the result; and says how many bytes each node keeps for old versions.

use std::path::Path;
use std::time::{Duration, Instant};
use system_tests::{eventually, write, Cluster, ManagerProc};

const FILES: usize = 1000;
const BIG: usize = 256 << 20;

fn small(g: u32, i: usize) -> Vec<u8> {
    let mut v = vec![(i % 251) as u8; 4096];
    v[..4].copy_from_slice(&g.to_le_bytes());
    v
}

fn big(g: u32) -> Vec<u8> {
    let mut v: Vec<u8> = (0..BIG as u32).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    v[..4].copy_from_slice(&g.to_le_bytes());
    v
}

fn arrived(p: &Path, want: &[u8]) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.len() == want.len() as u64) && std::fs::read(p).is_ok_and(|got| got == want)
}

/// One round's times, in seconds: 1,000 overwrites, the 256 MiB overwrite, 1,000 deletes.
type Round = [f64; 3];

fn round(a: &Path, b: &Path, g: u32) -> Round {
    let t = Instant::now();
    for i in 0..FILES {
        write(&a.join(format!("f{i:04}")), &small(g, i));
    }
    eventually("1,000 overwrites to reach B", Duration::from_secs(300), || (0..FILES).all(|i| arrived(&b.join(format!("f{i:04}")), &small(g, i))));
    let overwrite = t.elapsed().as_secs_f64();
    let data = big(g);
    let t = Instant::now();
    write(&a.join("big.bin"), &data);
    eventually("the 256 MiB overwrite to reach B", Duration::from_secs(300), || arrived(&b.join("big.bin"), &data));
    let big_time = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..FILES {
        std::fs::remove_file(a.join(format!("f{i:04}"))).unwrap();
    }
    eventually("1,000 deletes to reach B", Duration::from_secs(300), || (0..FILES).all(|i| !b.join(format!("f{i:04}")).exists()));
    let delete = t.elapsed().as_secs_f64();
    // The files again for the next round (not timed).
    for i in 0..FILES {
        write(&a.join(format!("f{i:04}")), &small(g + 1_000_000, i));
    }
    eventually("the files to be back on B", Duration::from_secs(300), || (0..FILES).all(|i| arrived(&b.join(format!("f{i:04}")), &small(g + 1_000_000, i))));
    [overwrite, big_time, delete]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn run(c: &mut Cluster, rounds: usize) {
    let modes: [(&str, &[&str]); 2] = [("versions kept, 2 copies (default)", &[]), ("no versions kept (--keep-copies 0)", &["--keep-copies", "0"])];
    let (a, b) = (c.nodes[0].mount.join("versions"), c.nodes[1].mount.join("versions"));
    std::fs::create_dir(&a).unwrap();
    for i in 0..FILES {
        write(&a.join(format!("f{i:04}")), &small(0, i));
    }
    write(&a.join("big.bin"), &big(0));
    eventually("the starting files to reach B", Duration::from_secs(300), || {
        arrived(&b.join("big.bin"), &big(0)) && (0..FILES).all(|i| arrived(&b.join(format!("f{i:04}")), &small(0, i)))
    });
    let mut times: Vec<Vec<Round>> = vec![Vec::new(), Vec::new()];
    let mut g = 1;
    for r in 0..rounds {
        for (m, (label, args)) in modes.iter().enumerate() {
            c.manager.stop();
            c.manager = ManagerProc::start_with(c.dir.path(), &c.vhost.url(), args);
            let t = round(&a, &b, g);
            g += 1;
            println!("versions round {r}, {label}: 1,000 overwrites {:.2} s, 256 MiB overwrite {:.2} s, 1,000 deletes {:.2} s", t[0], t[1], t[2]);
            times[m].push(t);
        }
    }
    let kept: Vec<u64> = c.nodes.iter().map(|n| n.status()["kept_bytes"].as_u64().unwrap_or(0)).collect();
    println!();
    println!("| measured in this run (median of {rounds} rounds) | {} | {} | kept / none |", modes[0].0, modes[1].0);
    println!("|---|---|---|---|");
    for (k, row) in
        ["1,000 x 4 KiB overwritten on A, until B has all", "one 256 MiB file overwritten on A, until B has it", "1,000 files deleted on A, until B has none"]
            .iter()
            .enumerate()
    {
        let on = median(times[0].iter().map(|t| t[k]).collect());
        let off = median(times[1].iter().map(|t| t[k]).collect());
        println!("| {row} | {on:.2} s | {off:.2} s | {:.2}x |", on / off);
    }
    println!();
    println!("bytes kept for old versions at the end: A {:.0} MiB, B {:.0} MiB", kept[0] as f64 / 1048576.0, kept[1] as f64 / 1048576.0);
}
