//! How the manager's database grows under edits, keeping every record for ever (as
//! before session 44) and forgetting what its retention lets go (docs/benchmarks.md,
//! session 44): decided changes' records once their nodes settled, history rows of
//! states past `--keep-for`.
//!
//! With `churn` as a third argument (session 45), each round n1 makes FILES files under
//! names never used before and deletes them (build output, editors' temporary files),
//! and both nodes sync (saying they applied every delete up to the head): the store that
//! forgets also forgets the deletes' tombstones once a month old (`forget_applied_deletes`).
//! Printed then: the deleted paths' rows instead of the history's.
//!
//! `manager-growth [FILES] [ROUNDS] [churn]` (default 10,000 and 10): two managers' stores in a
//! temporary directory take the same work, each round node n1 writing every one of
//! FILES paths again (a new version on the one before, in messages of 100 changes), then
//! both nodes' heartbeats saying they took everything and have nothing undecided. Between
//! rounds a month passes. One store keeps what it decided (retention too long to end in
//! the run); the other ends versions after 30 days and forgets records once 30 days old
//! and settled, as `manager serve` does by default, every batch of it timed. Printed per
//! round: the database's used bytes (pages in use, after a checkpoint) and rows kept.
use manager::store::Store;
use manager::versions::Retention;
use std::time::Instant;
use wire::{Change, ChangeItem, ChangeOp, Content, ContentHash, Envelope, MessageId, NodeId, RelPath, Revision, ToManager, Version};

const DAY_MS: i64 = 24 * 3600 * 1000;

fn id(n: u64) -> MessageId {
    format!("m-{n:016x}").parse().expect("a valid message id")
}

fn version(round: u64, i: usize) -> Version {
    let hash = ContentHash::from_bytes(*blake3::hash(format!("{round} {i}").as_bytes()).as_bytes());
    Version { content: Content::File { hash, size: 100 }, mode: 0o644, uid: 0, gid: 0, mtime_ns: 0 }
}

/// Bytes of the pages in use, and the rows of `applied` and `history` (with `churn`,
/// of deleted paths instead of `history`).
fn size(store: &Store, churn: bool) -> anyhow::Result<(i64, i64, i64)> {
    let c = store.conn();
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let applied: i64 = c.query_row("SELECT count(*) FROM applied", [], |r| r.get(0))?;
    let sql = if churn { "SELECT count(*) FROM paths WHERE version IS NULL" } else { "SELECT count(*) FROM history" };
    let history: i64 = c.query_row(sql, [], |r| r.get(0))?;
    Ok(((pages - free) * page, applied, history))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let files = args.first().map(|a| a.parse::<usize>()).transpose()?.unwrap_or(10_000);
    let rounds = args.get(1).map(|a| a.parse::<u64>()).transpose()?.unwrap_or(10);
    let churn = match args.get(2).map(String::as_str) {
        None => false,
        Some("churn") => true,
        Some(other) => anyhow::bail!("the third argument is `churn` or nothing, not {other:?}"),
    };
    let dir = tempfile::tempdir()?;
    let month = 30 * DAY_MS;
    let mut keeps = Store::open(&dir.path().join("keeps.db"))?;
    keeps.set_retention(Retention { keep_for_ms: i64::MAX / 4, remember_decisions_ms: i64::MAX / 4, ..Retention::default() });
    let mut forgets = Store::open(&dir.path().join("forgets.db"))?;
    forgets.set_retention(Retention::default());
    let (n1, n2): (NodeId, NodeId) = ("n1".parse()?, "n2".parse()?);
    let paths_of = |round: u64| -> anyhow::Result<Vec<RelPath>> {
        let name = |i: usize| if churn { format!("d{}/t{round}-{i}", i % 100) } else { format!("d{}/f{i}", i % 100) };
        Ok((0..files).map(|i| RelPath::new(name(i))).collect::<Result<_, _>>()?)
    };
    let mut next_id = 0u64;
    let mut now = 1_800_000_000_000i64;
    if churn {
        println!("{files} files made under new names and deleted in each of {rounds} rounds, a month between rounds");
        println!("round | keeps: used MiB, applied, deleted paths | forgets: used MiB, applied, deleted paths | forget batches: count, ms each (median, max)");
    } else {
        println!("{files} files, {rounds} rounds of edits of each, a month between rounds");
        println!("round | keeps: used MiB, applied, history | forgets: used MiB, applied, history | forget batches: count, ms each (median, max)");
    }
    for round in 0..rounds {
        let paths = paths_of(round)?;
        let mut batch_ms = Vec::new();
        let mut row = Vec::new();
        for (which, store) in [&mut keeps, &mut forgets].into_iter().enumerate() {
            let revs: std::collections::HashMap<String, u64> = {
                let mut st = store.conn().prepare("SELECT path, rev FROM paths")?;
                let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut start = next_id;
            // Edits: a put of each path. Churn: a put of each new path, then its delete.
            let passes: &[bool] = if churn { &[false, true] } else { &[false] };
            for &delete in passes {
                let revs: std::collections::HashMap<String, u64> = if delete {
                    let mut st = store.conn().prepare("SELECT path, rev FROM paths")?;
                    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
                    rows.collect::<Result<_, _>>()?
                } else {
                    revs.clone()
                };
                for chunk in paths.chunks(100).enumerate() {
                    let (c, chunk) = chunk;
                    let items = chunk
                        .iter()
                        .enumerate()
                        .map(|(k, p)| {
                            let op = if delete { ChangeOp::Delete } else { ChangeOp::Put { version: version(round, c * 100 + k) } };
                            let change = Change::new(p.clone(), Revision(revs.get(p.as_str()).copied().unwrap_or(0)), op);
                            start += 1;
                            ChangeItem { id: id(start), change }
                        })
                        .collect();
                    store.transaction(|tx| tx.handle_batch(vec![Envelope::new(id(start + 1_000_000_000), n1.clone(), ToManager::Changes { items })], now))?;
                    // What the manager sends is published and gone.
                    while let Some(last) = store.outbox(10_000)?.last().map(|o| o.seq) {
                        store.remove_outbox(last)?;
                    }
                }
            }
            let head = store.head()?;
            for n in [&n1, &n2] {
                let hb = ToManager::Heartbeat {
                    url: "http://n".into(),
                    pending_changes: 0,
                    pending_pulls: 0,
                    software: String::new(),
                    residency: None,
                    taken: head,
                    // (Vouched for in the sync below, as before heartbeats could.)
                    applied: Revision(0),
                };
                start += 1;
                store.transaction(|tx| tx.handle_batch(vec![Envelope::new(id(start + 2_000_000_000), n.clone(), hb)], now))?;
                if churn {
                    // Each node syncs (as after a restart): it applied every delete so far.
                    let sync = ToManager::Sync {
                        request: id(start + 3_000_000_000),
                        url: "http://n".into(),
                        since: head,
                        paged: true,
                        snapshot: true,
                        taken: head,
                        applied: head,
                    };
                    store.transaction(|tx| tx.handle_batch(vec![Envelope::new(id(start + 4_000_000_000), n.clone(), sync)], now))?;
                }
            }
            // A month later, the manager's ticks until nothing more goes.
            let later = now + month + DAY_MS;
            let mut quiet = 0;
            while quiet < 2 {
                let before = size(store, churn)?;
                let t = Instant::now();
                store.transaction(|tx| {
                    tx.expire_versions(later)?;
                    let records = tx.forget_settled_decisions(later, manager::service::FORGET_BATCH)?;
                    Ok(records.max(tx.forget_applied_deletes(later, manager::service::FORGET_BATCH)?))
                })?;
                let took = t.elapsed().as_secs_f64() * 1000.0;
                let after = size(store, churn)?;
                if (after.1, after.2) == (before.1, before.2) {
                    quiet += 1;
                } else if which == 1 {
                    batch_ms.push(took);
                }
                while let Some(last) = store.outbox(10_000)?.last().map(|o| o.seq) {
                    store.remove_outbox(last)?;
                }
            }
            row.push(size(store, churn)?);
            next_id = start;
        }
        now += month + DAY_MS;
        batch_ms.sort_by(f64::total_cmp);
        let mib = |b: i64| b as f64 / (1 << 20) as f64;
        println!(
            "{round:>5} | {:>7.1} {:>8} {:>8} | {:>7.1} {:>8} {:>8} | {:>4}, {:.1}, {:.1}",
            mib(row[0].0),
            row[0].1,
            row[0].2,
            mib(row[1].0),
            row[1].1,
            row[1].2,
            batch_ms.len(),
            batch_ms.get(batch_ms.len() / 2).copied().unwrap_or(0.0),
            batch_ms.last().copied().unwrap_or(0.0)
        );
    }
    Ok(())
}
