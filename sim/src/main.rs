//! `sim --seeds START..END` runs a range of seeds (in parallel) and exits non-zero if any
//! fails, printing each failing seed and what broke; `sim --seed N` replays one seed
//! exactly and prints its trace, then a shrunk one (the same seed with fewer steps, if
//! that fails too).

use clap::Parser;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Deterministic simulation of a whole sync cluster")]
struct Args {
    /// A range of seeds, `START..END` (END excluded).
    #[arg(long, conflicts_with = "seed")]
    seeds: Option<String>,
    /// One seed, replayed with its trace.
    #[arg(long)]
    seed: Option<u64>,
    /// Random steps per run before everything heals.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Put a past bug back into the nodes: `abandoned-work` or `decided-base` (the run
    /// must then fail).
    #[arg(long, value_parser = parse_bug)]
    bug: Option<fs_node::env::PastBug>,
    /// Print the trace of a replayed seed even when it passes.
    #[arg(long)]
    trace: bool,
    /// The nodes' and the manager's own log lines, interleaved with the trace on standard
    /// error (a `tracing` filter such as `sim=debug,changes=debug`; the `SIM_LOG` variable works too).
    #[arg(long, env = "SIM_LOG")]
    log: Option<String>,
    /// Sync reply pages as large as the wire allows (4 MiB: one page for any tree of the
    /// simulation), as the seeds found before small pages ran.
    #[arg(long)]
    one_page_syncs: bool,
    /// Node queues keep every message while their node is away (as the seeds found
    /// before queues dropped their oldest messages ran).
    #[arg(long)]
    no_queue_drops: bool,
    /// Connected nodes never fall behind far enough for their queues to drop messages
    /// (as the seeds found before that ran)
    #[arg(long)]
    no_connected_drops: bool,
    /// The manager keeps every decided change's record and every history row (as the
    /// seeds found before it forgot them ran)
    #[arg(long)]
    no_forgetting: bool,
    /// Nodes keep deleted paths' revisions longer than any run, and no user asks for a
    /// sync (as the seeds found before nodes forgot them ran)
    #[arg(long)]
    no_forget_deletes: bool,
    /// Nodes never set a file's mtime by itself (as the seeds found before they did ran)
    #[arg(long)]
    no_touches: bool,
    /// Nodes never deal with their conflict files (as the seeds found before they did ran)
    #[arg(long)]
    no_resolutions: bool,
    /// No node chmods a file another node just wrote (as the seeds found before they did ran)
    #[arg(long)]
    no_chmods_elsewhere: bool,
    /// No node chowns a file just chmodded elsewhere (as the seeds found before they did ran)
    #[arg(long)]
    no_chowns_elsewhere: bool,
}

fn parse_bug(s: &str) -> Result<fs_node::env::PastBug, String> {
    match s {
        "abandoned-work" => Ok(fs_node::env::PastBug::AbandonedWork),
        "decided-base" => Ok(fs_node::env::PastBug::DecidedBase),
        _ => Err("abandoned-work or decided-base".into()),
    }
}

fn main() {
    let args = Args::parse();
    if let Some(filter) = &args.log {
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(filter)).with_writer(std::io::stderr).without_time().init();
    }
    let mut cfg = sim::Config { nodes: args.nodes, steps: args.steps, bug: args.bug, ..Default::default() };
    if args.one_page_syncs {
        cfg.sync_page_bytes = None;
    }
    if args.no_connected_drops {
        cfg.connected_drops = false;
    }
    if args.no_queue_drops {
        cfg.queue_drops = false;
    }
    if args.no_forgetting {
        cfg.forget_decisions = false;
    }
    if args.no_forget_deletes {
        cfg.forget_deletes = false;
    }
    if args.no_touches {
        cfg.touches = false;
    }
    if args.no_resolutions {
        cfg.resolutions = false;
    }
    if args.no_chmods_elsewhere {
        cfg.chmods_elsewhere = false;
    }
    if args.no_chowns_elsewhere {
        cfg.chowns_elsewhere = false;
    }
    if let Some(seed) = args.seed {
        match sim::run_seed_traced(seed, cfg.clone()) {
            (Ok(stats), trace) => {
                if args.trace {
                    for line in &trace {
                        println!("{line}");
                    }
                }
                println!("seed {seed}: ok ({stats:?})");
            }
            (Err(what), trace) => {
                for line in &trace {
                    println!("{line}");
                }
                println!("seed {seed} FAILED: {what}");
                if let Some((steps, short_what, short)) = sim::shrink(seed, &cfg) {
                    println!("\nshrunk: the same seed with --steps {steps} fails too ({} trace lines instead of {}):", short.len(), trace.len());
                    for line in &short {
                        println!("{line}");
                    }
                    println!("seed {seed} --steps {steps} FAILED: {short_what}");
                }
                std::process::exit(1);
            }
        }
        return;
    }
    let range = args.seeds.as_deref().unwrap_or("0..1000");
    let (start, end) = range.split_once("..").and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))).unwrap_or_else(|| {
        eprintln!("--seeds takes START..END");
        std::process::exit(2)
    });
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let next = AtomicU64::new(start);
    let done = AtomicUsize::new(0);
    let steps = AtomicU64::new(0);
    let (crashes, stalled, dropped, restores) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let failures: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    break;
                }
                match sim::run_seed(seed, cfg.clone()) {
                    Ok(stats) => {
                        steps.fetch_add(stats.steps as u64, Ordering::Relaxed);
                        crashes.fetch_add(stats.crashes as u64, Ordering::Relaxed);
                        stalled.fetch_add(stats.stalled_pulls as u64, Ordering::Relaxed);
                        dropped.fetch_add(stats.dropped as u64, Ordering::Relaxed);
                        restores.fetch_add(stats.restores as u64, Ordering::Relaxed);
                    }
                    Err((what, _)) => {
                        eprintln!("seed {seed} FAILED: {}", what.lines().next().unwrap_or(""));
                        failures.lock().unwrap().push((seed, what));
                    }
                }
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(1000) {
                    eprintln!("{n} seeds, {:.0} seeds/s", n as f64 / t.elapsed().as_secs_f64());
                }
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    let failures = failures.into_inner().unwrap();
    println!(
        "{n} seeds ({range}) in {secs:.1}s on {threads} threads: {:.1} seeds/s, {:.0} steps/s; {} crashes, {} pulls waited out a frozen holder, {} messages dropped by away queues, {} manager databases brought back from a copy or lost; {} failed",
        n as f64 / secs,
        steps.load(Ordering::Relaxed) as f64 / secs,
        crashes.load(Ordering::Relaxed),
        stalled.load(Ordering::Relaxed),
        dropped.load(Ordering::Relaxed),
        restores.load(Ordering::Relaxed),
        failures.len()
    );
    if let Some((seed, what)) = failures.iter().min_by_key(|(s, _)| *s) {
        println!("first failing seed: {seed}: {what}\nreplay: cargo run -p sim --release -- --seed {seed}");
        std::process::exit(1);
    }
}
