//! How long the GC's second pass holds the tree's lock in a store of many small
//! contents (docs/benchmarks.md, session 34). The pass removes the candidates the first
//! pass found (outside the lock) once it has checked them again under the lock.
//!
//! `gc-pass [SMALL_CONTENTS] [CANDIDATES]` (default 1,000,000 and 1,000) fills a store in a
//! temporary directory with that many small contents (rows of `small.db`), then times,
//! each over its own set of candidates:
//! - `walk`: the removal as a walk of the whole store that removes what is in the set
//!   (what the second pass was until session 34: `ContentStore::gc` with every other
//!   content kept is the same walk);
//! - `given`: `ContentStore::remove_unused`, which looks at the candidates alone.
use fs_node::store::{hash_of, put_bytes, ContentStore};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use wire::ContentHash;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let contents = args.next().transpose()?.unwrap_or(1_000_000);
    let candidates = args.next().transpose()?.unwrap_or(1_000);
    let dir = tempfile::tempdir()?;
    let store = ContentStore::open(dir.path())?;
    let t = Instant::now();
    let mut all = Vec::with_capacity(contents);
    for chunk in (0..contents).collect::<Vec<_>>().chunks(10_000) {
        let items: Vec<(ContentHash, Vec<u8>)> = chunk.iter().map(|n| format!("small content {n}").into_bytes()).map(|b| (hash_of(&b), b)).collect();
        let refs: Vec<(&ContentHash, &[u8])> = items.iter().map(|(h, b)| (h, b.as_slice())).collect();
        store.put_small_many(&refs)?;
        all.extend(items.into_iter().map(|(h, _)| h));
    }
    // One blob too, as a store has.
    put_bytes(&store, &vec![7u8; 200_000])?;
    println!("{contents} small contents put in {:.1} s", t.elapsed().as_secs_f64());
    let walk_set: HashSet<_> = all[..candidates].iter().cloned().collect();
    let given_set: HashSet<_> = all[candidates..2 * candidates].iter().cloned().collect();
    let keep: HashSet<_> = all.iter().filter(|h| !walk_set.contains(*h)).cloned().collect();
    let t = Instant::now();
    let walked = store.gc(&keep, Duration::ZERO);
    let walk = t.elapsed();
    let t = Instant::now();
    let given = store.remove_unused(&given_set, Duration::ZERO);
    let look = t.elapsed();
    println!("walk:  {walked} removed in {:.1} ms", walk.as_secs_f64() * 1e3);
    println!("given: {given} removed in {:.1} ms", look.as_secs_f64() * 1e3);
    Ok(())
}
