//! Contents fetched because a program opened an on-demand file, or because a path was
//! pinned (docs/on-demand.md). Owns the fetches under way: one pull per content at a
//! time, which every opener of that content waits on. Contents come from every holder
//! this node has heard of (the puller remembers them from the manager's messages): one
//! that lacks it answers 404 and the next is asked, so this works while the manager is
//! away as long as a holder is reachable.

use crate::link::LinkHandle;
use crate::metrics::Metrics;
use crate::puller::{Puller, Unreachable};
use crate::stream::{Failure, Partial, Stream, STREAM_MIN_BYTES};
use crate::tree::{FsError, FsResult, RemoteContent, Tree};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use wire::{Answer, ContentHash, Holder, Query, RelPath};

/// How long an open waits for the manager to name the holders before it asks the ones
/// this node knows of.
const ASK_HOLDERS_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of paths in one `MayDrop` question (a node's message is at most 64 KiB).
const MAY_DROP_BYTES: usize = 48 << 10;

/// Pinned contents fetched at once in the background.
const BACKGROUND_FETCHES: usize = 4;

/// Downloads of streams nobody read to the end, kept for the next open of the same
/// content: at most this many, and this many bytes together (the oldest go first).
const PARTIALS_KEPT: usize = 8;
const PARTIAL_BYTES_KEPT: u64 = 1 << 30;

/// How a whole fetch ended (its failure logged where it happened).
type Outcome = Result<(), Failure>;

/// The cache's counters since the node started.
#[derive(Default)]
struct CacheCounters {
    budget: AtomicU64,
    evicted_contents: AtomicU64,
    evicted_bytes: AtomicU64,
    last_copies_kept: AtomicU64,
}

/// What `syncctl status` says of the cache of on-demand contents.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CacheReport {
    /// `--cache-size` in bytes; 0: no budget (nothing is evicted).
    pub budget: u64,
    pub evicted_contents: u64,
    pub evicted_bytes: u64,
    /// Evictions the manager refused: this node held the only copy of a current version.
    pub last_copies_kept: u64,
}

pub struct Fetcher {
    cache: CacheCounters,
    /// Large contents being streamed, by content.
    streams: Mutex<HashMap<ContentHash, Arc<Stream>>>,
    /// What cancelled streams had (`Partial`), oldest first: a later stream of the same
    /// content starts from it.
    partials: Mutex<std::collections::VecDeque<(ContentHash, Partial)>>,
    rt: tokio::runtime::Handle,
    puller: Puller,
    /// Set once the broker link exists (`set_link`).
    link: OnceLock<LinkHandle>,
    metrics: Arc<Metrics>,
    under_way: Mutex<HashMap<ContentHash, Shared<BoxFuture<'static, Outcome>>>>,
}

impl Fetcher {
    pub fn new(puller: Puller, metrics: Arc<Metrics>, rt: tokio::runtime::Handle) -> Arc<Fetcher> {
        Arc::new(Fetcher {
            cache: CacheCounters::default(),
            streams: Mutex::default(),
            partials: Mutex::default(),
            rt,
            puller,
            link: OnceLock::new(),
            metrics,
            under_way: Mutex::new(HashMap::new()),
        })
    }

    /// The stream of `c` (`stream.rs`), started if none is under way, counted as one
    /// more reader (give it back with `release_stream`).
    pub fn stream(self: &Arc<Self>, c: &RemoteContent) -> FsResult<Arc<Stream>> {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = streams.get(&c.hash).filter(|s| !s.ended() && !s.cancelled()) {
            s.readers.fetch_add(1, Ordering::Relaxed);
            return Ok(s.clone());
        }
        let partial = self.take_partial(&c.hash);
        let s = Stream::resume(self.puller.store(), c.hash.clone(), c.size, partial)
            .map_err(|e| FsError::Io(anyhow::Error::new(e).context("creating a download file")))?;
        s.readers.fetch_add(1, Ordering::Relaxed);
        streams.insert(c.hash.clone(), s.clone());
        let (me, c, stream) = (self.clone(), c.clone(), s.clone());
        self.rt.spawn(async move {
            let (guard, progress) = me.puller.track(&c.hash, c.size);
            let holders = me.holders_of(&c).await;
            let t = std::time::Instant::now();
            let end = stream.clone().run(me.puller.clone(), holders, me.puller.store().clone(), progress.clone(), None).await;
            {
                let mut streams = me.streams.lock().unwrap_or_else(|p| p.into_inner());
                let newest = streams.get(&c.hash).is_some_and(|s| Arc::ptr_eq(s, &stream));
                if newest {
                    streams.remove(&c.hash);
                }
                // What a cancelled stream had is kept for the next open, unless a newer
                // stream of the content (opened while this one wound down) has begun.
                if end.is_err() && stream.cancelled() {
                    match stream.partial() {
                        Some(p) if newest => me.keep_partial(c.hash.clone(), p),
                        Some(p) => p.discard(),
                        None => {}
                    }
                }
            }
            // Reported as ended only now: what it had is kept (or not) already.
            drop(guard);
            // Bytes this stream fetched (not those an earlier one had).
            let counted = end.map(|()| progress.load(Ordering::Relaxed).saturating_sub(stream.resumed())).map_err(|f| anyhow::anyhow!("{}", f.reason));
            me.metrics.count_pull(&counted, t.elapsed());
        });
        Ok(s)
    }

    /// What an earlier stream of `hash` had, if kept.
    fn take_partial(&self, hash: &ContentHash) -> Option<Partial> {
        let mut partials = self.partials.lock().unwrap_or_else(|p| p.into_inner());
        // Those whose content came meanwhile (a sync pulled it, a pin fetched it) are done.
        let store = self.puller.store();
        let (done, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *partials).into_iter().partition(|(h, _)| store.has(h));
        *partials = kept.into();
        for (_, p) in done {
            p.discard();
        }
        let at = partials.iter().position(|(h, _)| h == hash)?;
        partials.remove(at).map(|(_, p)| p)
    }

    /// Keeps `p` for a later stream of `hash`, within the bounds (the oldest go first).
    fn keep_partial(&self, hash: ContentHash, p: Partial) {
        // Not on a disk short of space: the store's blobs come first (nothing else knows
        // these files are there).
        let kept: u64 = self.partials.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(_, p)| p.bytes()).sum();
        let room = self.puller.store().free_bytes().is_ok_and(|free| free >= 4 * (kept + p.bytes()));
        if !room || self.puller.store().has(&hash) {
            p.discard();
            return;
        }
        tracing::debug!(%hash, bytes = p.bytes(), "keeping what a cancelled stream had for the next open");
        let mut partials = self.partials.lock().unwrap_or_else(|p| p.into_inner());
        partials.push_back((hash, p));
        while partials.len() > PARTIALS_KEPT || partials.iter().map(|(_, p)| p.bytes()).sum::<u64>() > PARTIAL_BYTES_KEPT {
            if let Some((_, old)) = partials.pop_front() {
                old.discard();
            }
        }
    }

    /// One reader of `s` is done; the last one before it has every block cancels it (a
    /// `head` of a large file does not go on to fetch all of it; one that read it all
    /// leaves it to be installed).
    pub fn release_stream(&self, s: &Arc<Stream>) {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if s.readers.fetch_sub(1, Ordering::Relaxed) == 1 && !s.ended() && !s.complete() {
            tracing::debug!(hash = %s.hash, "nobody reads a stream any more: cancelled");
            s.cancel();
        }
        drop(streams);
    }

    /// Makes `c` present in the store: waits for the fetch under way, or starts one (a
    /// large content is streamed, from every holder at once). Fails with
    /// `FsError::Unreachable` when no holder could be reached.
    pub async fn fetch(self: &Arc<Self>, c: &RemoteContent) -> FsResult<()> {
        if c.size >= STREAM_MIN_BYTES {
            let s = self.stream(c)?;
            s.fetch_everything();
            let r = s.finished().await;
            self.release_stream(&s);
            return r;
        }
        let pull = {
            let mut under_way = self.under_way.lock().unwrap_or_else(|p| p.into_inner());
            under_way
                .entry(c.hash.clone())
                .or_insert_with(|| {
                    let (me, c) = (self.clone(), c.clone());
                    async move {
                        let holders = me.holders_of(&c).await;
                        let t = std::time::Instant::now();
                        let r = me.puller.pull(&c.hash, c.size, &holders).await;
                        me.metrics.count_pull(&r, t.elapsed());
                        me.under_way.lock().unwrap_or_else(|p| p.into_inner()).remove(&c.hash);
                        match r {
                            Ok(n) => {
                                tracing::info!(hash = %c.hash, bytes = n, "fetched on demand");
                                Ok(())
                            }
                            Err(e) => {
                                let f = Failure::new(e.downcast_ref::<Unreachable>().is_some(), format!("{e:#}"));
                                f.log(&c.hash, "fetching");
                                Err(f)
                            }
                        }
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        pull.await.map_err(|f| f.to_error(&c.hash, "fetching"))
    }

    /// Gives the fetcher the broker link, to ask the manager who holds a content now.
    pub fn set_link(&self, link: LinkHandle) {
        let _ = self.link.set(link);
    }

    /// Where to fetch `c` from: the holders the manager names now (when it can be
    /// asked), then every other holder this node has heard of (so a content still comes
    /// while the manager is away, from a holder whose URL has not changed).
    async fn holders_of(&self, c: &RemoteContent) -> Vec<Holder> {
        let mut holders = Vec::new();
        if let (Some(path), Some(link)) = (&c.path, self.link.get().filter(|l| l.connected())) {
            match link.ask(Query::Holders { path: path.clone() }, ASK_HOLDERS_TIMEOUT).await {
                Ok(Answer::Holders { hash: Some(h), holders: named, .. }) if h == c.hash => holders = named,
                Ok(_) => tracing::debug!(%path, "the manager names no holders of this content (the file changed since)"),
                Err(e) => tracing::debug!(%path, "asking the manager for holders: {e:#}"),
            }
        }
        for k in self.puller.known_holders() {
            if !holders.iter().any(|h| h.node == k.node) {
                holders.push(k);
            }
        }
        holders
    }

    /// Brings the contents of on-demand files here within `budget` bytes
    /// (`--cache-size`): the least recently opened go first, each only if the manager
    /// says another node holds it too (the last copy of a current version stays) or it
    /// is no longer current. Nothing is dropped while the manager cannot be asked.
    pub async fn evict_over_budget(&self, tree: &Arc<Tree>) {
        let budget = self.cache.budget.load(Ordering::Relaxed);
        if budget == 0 {
            return;
        }
        let Some(link) = self.link.get().filter(|l| l.connected()).cloned() else { return };
        let t = tree.clone();
        let Ok((candidates, cached)) = tokio::task::spawn_blocking(move || t.eviction_candidates(budget)).await else { return };
        if candidates.is_empty() {
            return;
        }
        tracing::debug!(cached, budget, candidates = candidates.len(), "the cache is over its budget");
        let mut droppable = Vec::new();
        let mut refused = 0u64;
        // A question is one small message: the candidates go in rounds that fit.
        let mut rest = candidates.as_slice();
        while !rest.is_empty() {
            let mut bytes = 0;
            let n = rest.iter().take_while(|e| {
                bytes += e.paths.iter().map(|p| p.path.as_str().len() + 200).sum::<usize>();
                bytes <= MAY_DROP_BYTES
            });
            let n = n.count().max(1);
            let (round, later) = rest.split_at(n.min(rest.len()));
            rest = later;
            let items: Vec<wire::Held> = round.iter().flat_map(|e| e.paths.iter().cloned()).collect();
            let answer = link.ask(Query::MayDrop { items: items.clone() }, ASK_HOLDERS_TIMEOUT).await;
            let Ok(Answer::MayDrop { droppable: verdicts }) = answer else {
                tracing::debug!("the manager did not say what may be dropped: {answer:?}");
                break;
            };
            let ok: HashMap<&ContentHash, bool> = items.iter().zip(verdicts.iter().chain(std::iter::repeat(&false))).fold(HashMap::new(), |mut m, (i, v)| {
                *m.entry(&i.hash).or_insert(true) &= *v;
                m
            });
            for e in round {
                if ok.get(&e.hash).copied().unwrap_or(false) {
                    droppable.push(e.hash.clone());
                } else {
                    refused += 1;
                }
            }
        }
        let t = tree.clone();
        let hashes = droppable.clone();
        let freed = tokio::task::spawn_blocking(move || t.evict(&hashes)).await.unwrap_or(0);
        self.cache.evicted_contents.fetch_add(droppable.len() as u64, Ordering::Relaxed);
        self.cache.evicted_bytes.fetch_add(freed, Ordering::Relaxed);
        self.cache.last_copies_kept.fetch_add(refused, Ordering::Relaxed);
        tracing::info!(
            evicted = droppable.len(),
            freed,
            last_copies_kept = refused,
            cached,
            budget,
            "cache over its budget: least recently used contents dropped"
        );
    }

    /// What the cache did so far.
    pub fn cache_report(&self) -> CacheReport {
        CacheReport {
            budget: self.cache.budget.load(Ordering::Relaxed),
            evicted_contents: self.cache.evicted_contents.load(Ordering::Relaxed),
            evicted_bytes: self.cache.evicted_bytes.load(Ordering::Relaxed),
            last_copies_kept: self.cache.last_copies_kept.load(Ordering::Relaxed),
        }
    }

    /// Sets the cache budget (`--cache-size`; 0: none, nothing is evicted).
    pub fn set_budget(&self, budget: u64) {
        self.cache.budget.store(budget, Ordering::Relaxed);
    }

    /// The pulls under way (these and every other), with their bytes so far.
    pub fn in_progress(&self) -> Vec<crate::puller::PullProgress> {
        self.puller.in_progress()
    }

    /// Sets or removes the pin rule of `path` ("" for the whole tree; `syncctl pin` and
    /// `unpin`) and fetches, in the background, what it makes wanted here. Returns how
    /// many files are to be fetched.
    pub fn pin(self: &Arc<Self>, tree: &Tree, path: &str, pinned: Option<bool>) -> FsResult<usize> {
        let missing = tree.set_pin(path, pinned)?;
        let n = missing.len();
        tracing::info!(path, ?pinned, fetching = n, "pin rule set");
        self.fetch_all(missing);
        Ok(n)
    }

    /// Fetches pinned contents in the background, a few at once; a failure is logged
    /// and the next sync or pin tries again.
    pub fn fetch_all(self: &Arc<Self>, items: Vec<(RelPath, RemoteContent)>) {
        if items.is_empty() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let n = items.len();
            let failed = futures_util::stream::iter(items)
                .map(|(path, c)| {
                    let me = me.clone();
                    async move {
                        let r = me.fetch(&c).await;
                        if let Err(e) = &r {
                            tracing::warn!(%path, "fetching a pinned file: {e}");
                        }
                        r.is_err() as usize
                    }
                })
                .buffer_unordered(BACKGROUND_FETCHES)
                .fold(0, |a, b| async move { a + b })
                .await;
            tracing::info!(files = n, failed, "pinned contents fetched");
        });
    }
}
