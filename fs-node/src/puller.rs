//! Pulls contents from the nodes that hold them over HTTP(S), verifying each byte stream
//! against its hash before it enters the store; drops holders that stall, trickle, or
//! send too much or the wrong bytes.

use crate::chunk_index::Found;
use crate::store::ContentStore;
use anyhow::Context;
use futures_util::TryStreamExt;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wire::{ContentHash, Holder, NodeId};

/// Transfers in flight at once from one node: enough to hide latency on many small files
/// without opening hundreds of sockets.
pub const MAX_CONCURRENT_PULLS: usize = 16;
/// Whole pulls from one holder at once, at most: a holder sending just fast enough to
/// pass the stall rule (64 KiB per 15 s) holds only this share of the
/// [`MAX_CONCURRENT_PULLS`] slots, however many contents it is asked for, and pulls from
/// other holders go on. (A holder that is slow for real loses nothing: its link is the
/// limit.)
pub const PULLS_PER_HOLDER: usize = 4;
/// A holder that does not answer within this is skipped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Attempts over all holders before a pull is reported failed (a later sync retries).
const PULL_ROUNDS: usize = 3;

/// A client that trusts the system's CAs plus those in `extra_ca` (PEM), for pulls from
/// peers and for `syncctl`.
pub fn http_client(extra_ca: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
    if let Some(ca) = extra_ca {
        let pem = tls_pem::read_ca_bundle(ca, "the CA certificate")?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem).with_context(|| format!("reading {}", ca.display()))? {
            b = b.add_root_certificate(cert);
        }
    }
    b.build().context("building the HTTP client")
}

/// A large download asks the kernel to start writing what it has every this many bytes,
/// so the `fdatasync` before installing it has little left to wait for.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Starts (does not wait for) writeback of `len` bytes at `offset`; only a hint.
pub(crate) fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; the call only schedules I/O on it.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset as libc::off64_t, len as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// How long a holder may go without making progress before a pull gives up on it: it
/// must answer within this, and then send at least [`MIN_PROGRESS_BYTES`] (or the rest of
/// the content) within every such window. A frozen or trickling holder costs at most this
/// per attempt, and is not asked again during the same pull.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Bytes a holder must send per stall window (a 4 KiB/s trickle is a stall).
pub const MIN_PROGRESS_BYTES: u64 = 64 * 1024;
/// Most room made at once for an answer held in memory; a longer one grows as it comes.
const PREALLOCATE_AT_MOST: u64 = 1 << 20;

pub use crate::chunks::CHUNKED_MIN_BYTES;
/// Chunk requests in flight to one holder at once.
const CHUNK_REQUESTS_PER_HOLDER: usize = 4;

/// Most bytes one request of a pull by chunks asks for: consecutive chunks go in one
/// range (13,000 requests of 80 KiB for a GiB cost more than the transfer itself on a
/// busy machine; docs/benchmarks.md), each still checked against its own hash.
const RUN_BYTES: u64 = 1 << 20;

/// Takes from the front of `queue` the next run of chunks that follow each other in the
/// file, at most [`RUN_BYTES`] (always at least one chunk).
fn take_run(queue: &mut std::collections::VecDeque<usize>, chunks: &[crate::chunks::Chunk]) -> Vec<usize> {
    let mut run: Vec<usize> = Vec::new();
    let mut bytes = 0u64;
    while let Some(&i) = queue.front() {
        let follows = run.last().is_none_or(|&j| i == j + 1);
        if !follows || (!run.is_empty() && bytes + chunks[i].len as u64 > RUN_BYTES) {
            break;
        }
        bytes += chunks[i].len as u64;
        run.push(i);
        queue.pop_front();
    }
    run
}

/// Why one attempt at one holder failed: worth another round (the holder may just be
/// busy or restarting), or a holder that misbehaved and is skipped for the rest of the
/// pull (it stalled, sent too much, or sent wrong bytes).
enum Attempt {
    Retry(anyhow::Error),
    Misbehaved(anyhow::Error),
}

impl Attempt {
    fn into_error(self) -> anyhow::Error {
        match self {
            Attempt::Retry(e) | Attempt::Misbehaved(e) => e,
        }
    }
}

/// Pulls contents from holders into the store.
#[derive(Clone)]
pub struct Puller {
    client: reqwest::Client,
    store: ContentStore,
    me: NodeId,
    token: Option<String>,
    stall: Duration,
    /// This node serves TLS: its token goes only to `https://` holders.
    tls_only: bool,
    limit: Arc<tokio::sync::Semaphore>,
    /// Each holder's share of the slots for whole pulls ([`PULLS_PER_HOLDER`]).
    holder_slots: Arc<std::sync::Mutex<HashMap<NodeId, Arc<tokio::sync::Semaphore>>>>,
    /// Pulls under way, with their bytes so far (`in_progress`).
    progress: Arc<std::sync::Mutex<HashMap<ContentHash, Progress>>>,
    /// Every holder named to this node, by node: where a content opened on demand is
    /// asked for (`known_holders`).
    known: Arc<std::sync::Mutex<std::collections::BTreeMap<NodeId, String>>>,
    /// One pull per content at a time: a second pull of a content (a sync and a
    /// broadcast, or a retry, naming it at once) waits for the first and takes its
    /// result from the store instead of fetching it again.
    flights: Arc<std::sync::Mutex<HashMap<ContentHash, Arc<tokio::sync::Mutex<()>>>>>,
    /// Holders whose last `POST /small` failed (an older node without it, one that
    /// stalls or lies), and until when they are not asked for batches again: their
    /// small contents are pulled one by one meanwhile.
    no_batches: Arc<std::sync::Mutex<HashMap<NodeId, std::time::Instant>>>,
}

/// How long a holder whose batch of small contents failed is not asked for another.
const NO_BATCHES_FOR: Duration = Duration::from_secs(60);

/// One pull under way.
#[derive(Clone)]
struct Progress {
    size: u64,
    done: Arc<AtomicU64>,
    /// Pulls of this content at once (a fetch on open and a sync may meet).
    pulls: usize,
}

/// One pull under way, as `syncctl status` and the dashboard show it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PullProgress {
    pub hash: ContentHash,
    pub size: u64,
    pub done: u64,
}

/// No holder of a content could be reached (none known, or every one refused the
/// connection or timed out): a read of it fails with `EHOSTUNREACH`.
#[derive(Debug, thiserror::Error)]
#[error("no node holding {0} could be reached")]
pub struct Unreachable(pub ContentHash);

/// Whether an attempt failed before reaching the holder at all.
/// Why a content is pulled by chunks: it always pays (the path's old version is here,
/// or several holders share the work), or only if this node has enough of its chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunked {
    Always,
    IfMostlyLocal,
}

/// Local chunks that make a pull by chunks from one holder worth it (a few chunks:
/// fewer save less than the chunk list and the range requests cost).
const LOCAL_BYTES_WORTH_IT: u64 = 1 << 20;

/// Local blobs a pull by chunks keeps open at once to copy chunks from.
const MOST_OPEN_SOURCES: usize = 64;

/// Why a pull by chunks from one holder did not start: it had no chunk list at hand.
const NOT_LISTED_YET: &str = "no holder has its chunk list at hand";

/// A pull by chunks that would not pay (the content is pulled whole instead).
#[derive(Debug, thiserror::Error)]
#[error("not worth pulling by chunks: {0}")]
struct NotWorthIt(&'static str);

/// Bytes of `list` whose chunks the chunk index names a blob for (stops counting at
/// [`LOCAL_BYTES_WORTH_IT`]).
fn indexed_bytes(store: &ContentStore, list: &crate::chunks::ChunkList) -> u64 {
    let Some(index) = store.chunk_index() else {
        return 0;
    };
    let mut n = 0;
    for c in &list.chunks {
        if n >= LOCAL_BYTES_WORTH_IT {
            break;
        }
        if index.find(&c.hash, c.len).is_ok_and(|f| !f.is_empty()) {
            n += c.len as u64;
        }
    }
    n
}

/// Writes into `file` every chunk of `list` this node has: from `basis` (the path's old
/// version) first, else from any blob the chunk index names; each checked against its
/// hash before it is written. Returns the indices of the chunks left to fetch.
fn copy_local_chunks(
    store: &ContentStore,
    basis: Option<&ContentHash>,
    list: &crate::chunks::ChunkList,
    file: &std::fs::File,
    leaves: &crate::leaves::AssembledLeaves,
) -> std::io::Result<std::collections::VecDeque<usize>> {
    use std::os::unix::fs::FileExt;
    let basis = basis.filter(|b| store.has(b));
    let in_basis: HashMap<ContentHash, crate::chunks::Chunk> = match basis {
        Some(b) => store.chunk_list(b)?.chunks.into_iter().map(|c| (c.hash.clone(), c)).collect(),
        None => HashMap::new(),
    };
    let index = store.chunk_index();
    // Blobs opened so far (`None`: gone).
    let mut open: HashMap<ContentHash, Option<std::fs::File>> = HashMap::new();
    let mut read_chunk = |blob: &ContentHash, offset: u64, c: &crate::chunks::Chunk, buf: &mut Vec<u8>| -> bool {
        // Chunks spread over many blobs: a few open at once, not one per blob.
        if open.len() >= MOST_OPEN_SOURCES && !open.contains_key(blob) {
            open.clear();
        }
        let src = open.entry(blob.clone()).or_insert_with(|| store.open_blob(blob).ok());
        let Some(src) = src else {
            return false;
        };
        buf.resize(c.len as usize, 0);
        src.read_exact_at(buf, offset).is_ok() && crate::store::hash_of(buf) == c.hash
    };
    let mut rest = std::collections::VecDeque::new();
    let mut buf = Vec::new();
    for (i, c) in list.chunks.iter().enumerate() {
        // Where the chunk may be: the basis first, then (looked up only if needed) the
        // blobs the index names.
        let in_basis = basis.zip(in_basis.get(&c.hash).filter(|at| at.len == c.len)).map(|(b, at)| Found { blob: b.clone(), offset: at.offset });
        let indexed = std::iter::once_with(|| index.map(|x| x.find(&c.hash, c.len).unwrap_or_default()).unwrap_or_default()).flatten();
        let source = in_basis.into_iter().chain(indexed).find(|f| {
            let ok = read_chunk(&f.blob, f.offset, c, &mut buf);
            if !ok && !store.has(&f.blob) {
                // A stale entry: its blob was removed while the index was closed.
                let _ = index.map(|x| x.remove(&f.blob));
            }
            ok
        });
        let Some(source) = source else {
            rest.push_back(i);
            continue;
        };
        // The basis's bytes at the same offset: its leaf for the block holds.
        let same_offset = basis == Some(&source.blob) && source.offset == c.offset;
        file.write_all_at(&buf, c.offset)?;
        leaves.wrote(file, c.offset, c.len as u64, same_offset)?;
    }
    Ok(rest)
}

pub(crate) fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<reqwest::Error>().is_some_and(|r| r.is_connect() || (r.is_timeout() && r.status().is_none())))
}

/// Removes its pull from the progress table when the pull ends, however it ends.
pub(crate) struct ProgressGuard {
    table: Arc<std::sync::Mutex<HashMap<ContentHash, Progress>>>,
    hash: ContentHash,
}

impl Drop for ProgressGuard {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = t.get_mut(&self.hash) {
            p.pulls -= 1;
            if p.pulls == 0 {
                t.remove(&self.hash);
            }
        }
    }
}

impl Puller {
    pub fn new(client: reqwest::Client, store: ContentStore, me: NodeId, token: Option<String>, stall: Duration, tls_only: bool) -> Puller {
        Puller {
            client,
            store,
            me,
            token,
            stall,
            tls_only,
            limit: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_PULLS)),
            holder_slots: Arc::default(),
            progress: Arc::default(),
            known: Arc::default(),
            flights: Arc::default(),
            no_batches: Arc::default(),
        }
    }

    /// How long a holder may go without progress ([`DEFAULT_STALL_TIMEOUT`]).
    pub fn stall_timeout(&self) -> Duration {
        self.stall
    }

    /// Remembers the holders a message named (their latest URLs).
    pub fn learn_holders<'a>(&self, holders: impl IntoIterator<Item = &'a Holder>) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        for h in holders {
            if h.node != self.me && known.get(&h.node) != Some(&h.url) {
                if known.len() >= wire::MAX_HOLDERS && !known.contains_key(&h.node) {
                    continue;
                }
                known.insert(h.node.clone(), h.url.clone());
            }
        }
    }

    /// Every holder this node has heard of: asked, in turn, for a content opened on
    /// demand (those that lack it answer 404 and the next is asked).
    pub fn known_holders(&self) -> Vec<Holder> {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(node, url)| Holder { node: node.clone(), url: url.clone() }).collect()
    }

    /// How many contents are being pulled.
    pub fn pulls_under_way(&self) -> usize {
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The pulls under way, and their bytes so far.
    pub fn in_progress(&self) -> Vec<PullProgress> {
        let t = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<PullProgress> =
            t.iter().map(|(h, p)| PullProgress { hash: h.clone(), size: p.size, done: p.done.load(Ordering::Relaxed).min(p.size) }).collect();
        v.sort_by_key(|p| p.hash.to_hex().as_str().to_string());
        v
    }

    /// Shows a pull of `hash` in `in_progress` until the guard is dropped; returns the
    /// guard and the pull's byte counter.
    pub(crate) fn track(&self, hash: &ContentHash, size: u64) -> (ProgressGuard, Arc<AtomicU64>) {
        let mut t = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        let p = t.entry(hash.clone()).or_insert_with(|| Progress { size, done: Arc::default(), pulls: 0 });
        p.pulls += 1;
        (ProgressGuard { table: self.progress.clone(), hash: hash.clone() }, p.done.clone())
    }

    pub(crate) fn store(&self) -> &ContentStore {
        &self.store
    }

    pub(crate) fn me(&self) -> &NodeId {
        &self.me
    }

    /// The byte counter of a pull of `hash` under way (a fresh one if there is none).
    fn counter(&self, hash: &ContentHash) -> Arc<AtomicU64> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).get(hash).map(|p| p.done.clone()).unwrap_or_default()
    }

    /// Makes `hash` (of `size` bytes) present in the store, trying each holder in turn
    /// (a few rounds). Returns the number of bytes transferred (0 if it was already there).
    pub async fn pull(&self, hash: &ContentHash, size: u64, holders: &[Holder]) -> anyhow::Result<u64> {
        self.pull_with_basis(hash, size, holders, None).await
    }

    /// [`Puller::pull`]; a content of [`CHUNKED_MIN_BYTES`] or more is pulled by chunks,
    /// those `basis` (a blob of the store) has too taken from it, the others from all
    /// holders at once. If that fails, the content is pulled whole.
    pub async fn pull_with_basis(&self, hash: &ContentHash, size: u64, holders: &[Holder], basis: Option<&ContentHash>) -> anyhow::Result<u64> {
        if self.store.has(hash) {
            return Ok(0);
        }
        let flight = self.flights.lock().unwrap_or_else(|p| p.into_inner()).entry(hash.clone()).or_default().clone();
        let result = async {
            let _alone = flight.lock().await;
            self.pull_alone(hash, size, holders, basis).await
        }
        .await;
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        // The last one out (the table's and this one's references) removes the entry.
        if Arc::strong_count(&flight) == 2 {
            flights.remove(hash);
        }
        result
    }

    /// [`Puller::pull_with_basis`], no other pull of `hash` under way.
    async fn pull_alone(&self, hash: &ContentHash, size: u64, holders: &[Holder], basis: Option<&ContentHash>) -> anyhow::Result<u64> {
        if self.store.has(hash) {
            return Ok(0);
        }
        self.learn_holders(holders);
        let mut slot = Some(self.slot().await?);
        let others: Vec<&Holder> = holders.iter().filter(|h| h.node != self.me).collect();
        if others.is_empty() {
            return Err(anyhow::Error::new(Unreachable(hash.clone())).context("no other node holds it"));
        }
        let (_progress, _) = self.track(hash, size);
        // By chunks when there is something to gain: chunks this node has, or several
        // holders to share the work. A new file from one holder streams whole (its chunk
        // list would only delay the first byte).
        // Over the old version first: a file overwritten in place (a database page, a disk
        // image block) is the old one's blocks but a few, found by comparing leaves.
        if let Some(b) = basis.filter(|b| size >= CHUNKED_MIN_BYTES && self.store.cached_leaves(b).is_some()) {
            match self.pull_over(hash, size, &others, b).await {
                Ok(n) => return Ok(n),
                Err(e) => tracing::debug!("pulling {hash} over {b} did not work ({e:#}); pulling it by chunks"),
            }
            if self.store.has(hash) {
                return Ok(0);
            }
        }
        if size >= CHUNKED_MIN_BYTES {
            let worth = if basis.is_some_and(|b| self.store.has(b)) || others.len() > 1 {
                Some(Chunked::Always)
            } else {
                // A content new to this path, from one holder: by chunks only if other
                // blobs here have enough of them (`chunk_index.rs`).
                let store = self.store.clone();
                let indexed = tokio::task::spawn_blocking(move || store.chunk_index().is_some_and(|i| i.has_blobs())).await.unwrap_or(false);
                indexed.then_some(Chunked::IfMostlyLocal)
            };
            if let Some(worth) = worth {
                match self.pull_chunked(hash, size, &others, basis, worth).await {
                    Ok(n) => return Ok(n),
                    Err(e) if e.downcast_ref::<NotWorthIt>().is_some_and(|w| w.0 == NOT_LISTED_YET) => {
                        return self.pull_whole_unless_listed(hash, size, others, basis, &mut slot).await;
                    }
                    Err(e) if e.is::<NotWorthIt>() => tracing::debug!("{e:#}; pulling {hash} whole"),
                    Err(e) => tracing::info!("pulling {hash} by chunks failed ({e:#}); pulling it whole"),
                }
                if self.store.has(hash) {
                    return Ok(0);
                }
            }
        }
        self.pull_whole(hash, size, others, &mut slot).await
    }

    /// A slot of the pull limit ([`MAX_CONCURRENT_PULLS`]).
    async fn slot(&self) -> anyhow::Result<tokio::sync::OwnedSemaphorePermit> {
        self.limit.clone().acquire_owned().await.context("pull limiter closed")
    }

    /// `holder`'s turn for a whole pull ([`PULLS_PER_HOLDER`]). While its share is in use
    /// the pull waits without its `slot` of the pull limit (given back, then taken again),
    /// so that pulls from other holders go on meanwhile.
    async fn holder_turn(&self, holder: &NodeId, slot: &mut Option<tokio::sync::OwnedSemaphorePermit>) -> anyhow::Result<tokio::sync::OwnedSemaphorePermit> {
        let share = {
            let mut slots = self.holder_slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.entry(holder.clone()).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(PULLS_PER_HOLDER))).clone()
        };
        if let Ok(turn) = share.clone().try_acquire_owned() {
            return Ok(turn);
        }
        slot.take();
        let turn = share.acquire_owned().await.context("holder limiter closed")?;
        *slot = Some(self.slot().await?);
        Ok(turn)
    }

    /// A content new to this path whose holder had no chunk list of it at hand (it
    /// makes one in the background after the close; a puller is usually faster): pulled
    /// whole at once, while the holder is asked to make the list. If the list comes
    /// first and this node has enough of its chunks, the whole download is dropped and
    /// the rest comes by chunks (a file saved as a new one, or a copy edited, over a
    /// slow link moves what is new, not all of it); otherwise the whole pull goes on.
    async fn pull_whole_unless_listed(
        &self,
        hash: &ContentHash,
        size: u64,
        others: Vec<&Holder>,
        basis: Option<&ContentHash>,
        slot: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> anyhow::Result<u64> {
        // Boxed, so that dropping it ends the download (its connection and file) at once.
        let mut whole = Box::pin(self.pull_whole(hash, size, others.clone(), slot));
        let listed = async {
            let list = self.chunk_list_from(hash, size, &others, &format!("chunks/{hash}")).await?;
            self.enough_here(&list).await.ok()?.then_some(list)
        };
        let list = tokio::select! {
            biased;
            done = &mut whole => return done,
            list = listed => list,
        };
        // Switching pays only while most of the content has still to come.
        let came = self.counter(hash).load(Ordering::Relaxed);
        let Some(list) = list.filter(|_| came < size / 2) else {
            return whole.await;
        };
        tracing::debug!(%hash, came, "the chunk list came first: pulling the rest by chunks");
        drop(whole);
        if self.store.has(hash) {
            return Ok(0);
        }
        match self.assemble_and_install(hash, size, &others, basis, list, Chunked::IfMostlyLocal).await {
            Ok(n) => Ok(n + came),
            Err(e) => {
                if self.store.has(hash) {
                    return Ok(came);
                }
                tracing::info!("pulling {hash} by chunks failed ({e:#}); pulling it whole");
                self.pull_whole(hash, size, others, slot).await
            }
        }
    }

    /// Pulls `hash` (`size` bytes) whole from one of `others` at a time, a few rounds; a
    /// holder that misbehaves is dropped. Returns the bytes transferred.
    /// `slot`: the pull's slot of the pull limit (see [`Puller::holder_turn`]).
    async fn pull_whole(
        &self,
        hash: &ContentHash,
        size: u64,
        mut others: Vec<&Holder>,
        slot: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> anyhow::Result<u64> {
        let mut last = None;
        // Whether any holder was reached at all (else the pull fails as `Unreachable`).
        let mut reached = false;
        for round in 0..PULL_ROUNDS {
            let mut i = 0;
            while i < others.len() {
                if self.store.has(hash) {
                    return Ok(0);
                }
                let turn = self.holder_turn(&others[i].node, slot).await?;
                if self.store.has(hash) {
                    return Ok(0);
                }
                let attempt = self.pull_from(hash, size, others[i]).await;
                drop(turn);
                if let Err(Attempt::Retry(e) | Attempt::Misbehaved(e)) = &attempt {
                    reached |= !is_unreachable(e);
                }
                match attempt {
                    Ok(n) => return Ok(n),
                    Err(Attempt::Retry(e)) => {
                        tracing::debug!("pull of {hash} from {} failed: {e:#}", others[i].node);
                        last = Some(e);
                        i += 1;
                    }
                    Err(Attempt::Misbehaved(e)) => {
                        tracing::warn!("dropping holder {} for this pull: {e:#}", others[i].node);
                        last = Some(e);
                        others.remove(i);
                    }
                }
            }
            if others.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200 * (round as u64 + 1))).await;
        }
        let last = last.unwrap_or_else(|| anyhow::anyhow!("no holder answered"));
        if !reached {
            return Err(last.context(Unreachable(hash.clone())));
        }
        Err(last.context(format!("pulling {hash}")))
    }

    /// Pulls `hash` as a stream (`stream.rs`) that copies from `basis` every block it has
    /// at the same offset and fetches the others; returns the bytes fetched.
    async fn pull_over(&self, hash: &ContentHash, size: u64, holders: &[&Holder], basis: &ContentHash) -> anyhow::Result<u64> {
        let stream = crate::stream::Stream::new(&self.store, hash.clone(), size).context("creating a download file")?;
        let holders: Vec<Holder> = holders.iter().map(|h| (*h).clone()).collect();
        stream
            .clone()
            .run(self.clone(), holders, self.store.clone(), self.counter(hash), Some(basis.clone()))
            .await
            .map_err(|f| anyhow::anyhow!("{}", f.reason))?;
        Ok(size - stream.seeded())
    }

    /// One GET of `what` from `holder` (bytes `first..=last` of it if given), at most
    /// `most` bytes, within the stall window (for streams, `stream.rs`).
    pub(crate) async fn get_bytes(&self, holder: &Holder, what: &str, range: Option<(u64, u64)>, most: u64) -> anyhow::Result<bytes::Bytes> {
        let got = async {
            let mut req = self.get(holder, what)?;
            if let Some((first, last)) = range {
                req = req.header("range", format!("bytes={first}-{last}"));
            }
            self.fetch(holder, req, most).await
        }
        .await;
        got.map_err(Attempt::into_error)
    }

    /// Pulls the small contents `wanted` (hash and size, each at most the store's
    /// `small_max`, at most [`SMALL_BATCH_MAX`]) from `holder` in one request
    /// (`POST /small`, docs/protocol.md) and keeps in one transaction those that came
    /// and hash right. Returns their bytes. What did not come (the holder lacks it, its
    /// answer's budget ran out, it is an older node without the endpoint, or it sent
    /// bytes that do not check) is left to the pulls one by one, which try every holder
    /// and drop one that misbehaves.
    pub async fn pull_small_batch(&self, holder: &Holder, wanted: &[(ContentHash, u64)]) -> anyhow::Result<u64> {
        anyhow::ensure!(wanted.len() <= SMALL_BATCH_MAX && wanted.iter().all(|(_, s)| *s <= self.store.small_max()), "not a batch of small contents");
        let now = std::time::Instant::now();
        {
            let mut paused = self.no_batches.lock().unwrap_or_else(|p| p.into_inner());
            paused.retain(|_, until| *until > now);
            anyhow::ensure!(!paused.contains_key(&holder.node), "{} failed a batch lately: not asked for another yet", holder.node);
        }
        let got = self.small_batch_from(holder, wanted).await;
        if got.is_err() {
            self.no_batches.lock().unwrap_or_else(|p| p.into_inner()).insert(holder.node.clone(), now + NO_BATCHES_FOR);
        }
        got
    }

    /// [`Puller::pull_small_batch`], the request itself.
    async fn small_batch_from(&self, holder: &Holder, wanted: &[(ContentHash, u64)]) -> anyhow::Result<u64> {
        let body: Vec<u8> = wanted.iter().flat_map(|(h, _)| *h.as_bytes()).collect();
        // No holder sends more than SMALL_BATCH_BYTES of contents in one answer.
        let most = wanted.iter().map(|(_, s)| s).sum::<u64>().min(SMALL_BATCH_BYTES as u64) + (SMALL_LEN_BYTES * wanted.len()) as u64;
        let req = self.request(reqwest::Method::POST, holder, "small").map_err(Attempt::into_error)?.body(body);
        let answer = self.fetch(holder, req, most).await.map_err(Attempt::into_error)?;
        let (taken, bad) = parse_small_batch(&answer, wanted);
        let bad = bad.map(|e| anyhow::anyhow!("the batch of small contents from {} is cut short: {e}", holder.node));
        if taken.is_empty() {
            return bad.map_or(Ok(0), Err);
        }
        let n = taken.iter().map(|(_, b)| b.len() as u64).sum();
        let store = self.store.clone();
        // The contents stay in the answer's buffer (shared, not copied) for the blocking
        // thread that keeps them.
        let owned: Vec<(ContentHash, bytes::Bytes)> = taken.into_iter().map(|(h, b)| (h.clone(), answer.slice_ref(b))).collect();
        tokio::task::spawn_blocking(move || store.put_small_many(&owned.iter().map(|(h, b)| (h, &b[..])).collect::<Vec<_>>()))
            .await
            .context("keeping a batch of small contents")??;
        // What came before a bad part is kept; the holder is not asked for batches again
        // for a while.
        bad.map_or(Ok(n), Err)
    }

    /// A GET of `what` (`content/<hash>`, `chunks/<hash>`) from `holder`, with the
    /// cluster token where it may go.
    fn get(&self, holder: &Holder, what: &str) -> Result<reqwest::RequestBuilder, Attempt> {
        self.request(reqwest::Method::GET, holder, what)
    }

    /// A request of `what` from `holder`, with the cluster token where it may go.
    fn request(&self, method: reqwest::Method, holder: &Holder, what: &str) -> Result<reqwest::RequestBuilder, Attempt> {
        let url = format!("{}/{what}", holder.url.trim_end_matches('/'));
        let mut req = self.client.request(method, &url);
        if let Some(t) = &self.token {
            // The token is a secret: never send it in clear text to an `http://` holder
            // when this node itself talks TLS (a hostile manager entry could point there).
            if self.tls_only && !url.starts_with("https://") {
                return Err(Attempt::Misbehaved(anyhow::anyhow!("{} is not an https:// holder; the cluster token is not sent in clear text", holder.node)));
            }
            req = req.bearer_auth(t);
        }
        Ok(req)
    }

    /// One request's whole answer within the stall window, checked to be a success.
    async fn fetch(&self, holder: &Holder, req: reqwest::RequestBuilder, most: u64) -> Result<bytes::Bytes, Attempt> {
        let stall = self.stall;
        let answer = async {
            let resp = req.send().await.map_err(|e| Attempt::Retry(anyhow::Error::new(e).context(format!("asking {}", holder.node))))?;
            if !resp.status().is_success() {
                return Err(Attempt::Retry(anyhow::anyhow!("{} answered {}", holder.node, resp.status())));
            }
            if resp.content_length().is_some_and(|n| n > most) {
                return Err(Attempt::Misbehaved(anyhow::anyhow!("{} offers more than the {most} bytes asked for", holder.node)));
            }
            // Read as it comes, and not a byte past `most` (an answer without a length
            // could otherwise stream without end into memory); room for what the answer
            // says it brings is made at once, up to a bound (the length is the holder's
            // word: a claim of gigabytes it never sends reserves nothing).
            let mut body = Vec::with_capacity(resp.content_length().unwrap_or(0).min(most).min(PREALLOCATE_AT_MOST) as usize);
            let mut stream = resp.bytes_stream();
            while let Some(part) =
                stream.try_next().await.map_err(|e| Attempt::Retry(anyhow::Error::new(e).context(format!("receiving from {}", holder.node))))?
            {
                if (body.len() + part.len()) as u64 > most {
                    return Err(Attempt::Misbehaved(anyhow::anyhow!("{} sent more than the {most} bytes asked for", holder.node)));
                }
                body.extend_from_slice(&part);
            }
            Ok(bytes::Bytes::from(body))
        };
        match tokio::time::timeout(stall, answer).await {
            Err(_) => Err(Attempt::Misbehaved(anyhow::anyhow!("{} did not answer within {stall:?}", holder.node))),
            Ok(r) => r,
        }
    }

    /// Pulls `hash` by chunks (see [`Puller::pull_with_basis`]); returns the bytes fetched.
    /// With [`Chunked::IfMostlyLocal`], fails with [`NotWorthIt`] unless the holder has
    /// the chunk list made already and this node has enough of the chunks.
    async fn pull_chunked(&self, hash: &ContentHash, size: u64, holders: &[&Holder], basis: Option<&ContentHash>, worth: Chunked) -> anyhow::Result<u64> {
        let what = match worth {
            Chunked::Always => format!("chunks/{hash}"),
            Chunked::IfMostlyLocal => format!("chunks/{hash}?cached"),
        };
        let list = match (self.chunk_list_from(hash, size, holders, &what).await, worth) {
            (Some(l), _) => l,
            (None, Chunked::IfMostlyLocal) => return Err(NotWorthIt(NOT_LISTED_YET).into()),
            (None, Chunked::Always) => anyhow::bail!("no holder gave a chunk list"),
        };
        if worth == Chunked::IfMostlyLocal {
            // A first look in the index (no blob read) before any download file is made.
            if !self.enough_here(&list).await? {
                return Err(NotWorthIt("too few of its chunks are here").into());
            }
        }
        self.assemble_and_install(hash, size, holders, basis, list, worth).await
    }

    /// Whether the chunk index names local blobs for at least [`LOCAL_BYTES_WORTH_IT`] of
    /// `list` (no blob is read).
    async fn enough_here(&self, list: &crate::chunks::ChunkList) -> anyhow::Result<bool> {
        let (store, l) = (self.store.clone(), list.clone());
        let indexed = tokio::task::spawn_blocking(move || indexed_bytes(&store, &l)).await.context("the index lookup panicked")?;
        Ok(indexed >= LOCAL_BYTES_WORTH_IT)
    }

    /// The chunk list of `hash` (asked for as `what`) from the first of `holders` that
    /// gives one that adds up to its `size`.
    async fn chunk_list_from(&self, hash: &ContentHash, size: u64, holders: &[&Holder], what: &str) -> Option<crate::chunks::ChunkList> {
        for h in holders {
            let got = async {
                let bytes = self.fetch(h, self.get(h, what)?, crate::chunks::max_list_bytes(size)).await?;
                let json: crate::chunks::ChunkListJson =
                    serde_json::from_slice(&bytes).map_err(|e| Attempt::Misbehaved(anyhow::anyhow!("{} sent a malformed chunk list: {e}", h.node)))?;
                crate::chunks::ChunkList::from_json(json, size)
                    .map_err(|e| Attempt::Misbehaved(anyhow::anyhow!("{} sent a chunk list that does not fit: {e}", h.node)))
            }
            .await;
            match got {
                Ok(l) => return Some(l),
                Err(Attempt::Retry(e) | Attempt::Misbehaved(e)) => tracing::debug!("no chunk list of {hash} from {}: {e:#}", h.node),
            }
        }
        None
    }

    /// Assembles `hash` from the chunks of `list` (those here copied, the others fetched
    /// from `holders`), checks it and installs it; returns the bytes fetched.
    async fn assemble_and_install(
        &self,
        hash: &ContentHash,
        size: u64,
        holders: &[&Holder],
        basis: Option<&ContentHash>,
        list: crate::chunks::ChunkList,
        worth: Chunked,
    ) -> anyhow::Result<u64> {
        tracing::debug!(target: "timing", %hash, "chunk list in");
        let (tmp, file) = self.store.tmp_file().context("creating a download file")?;
        let file = Arc::new(file);
        // The basis's leaves, if cached: the blocks an edit did not touch need no hashing.
        let basis_leaves = basis.and_then(|b| Some((self.store.cached_leaves(b)?, self.store.size_of(b)?)));
        let leaves = Arc::new(crate::leaves::AssembledLeaves::new(size, basis_leaves));
        let result = self.assemble(hash, size, holders, basis, &list, &file, &leaves, worth).await;
        let result = match result {
            Ok(fetched) => {
                tracing::debug!(target: "timing", %hash, "chunks in");
                async {
                    let (f, store, list, h) = (file.clone(), self.store.clone(), list.clone(), hash.clone());
                    let tmp2 = tmp.clone();
                    // The whole file is checked against its hash: its chunks were, but not
                    // their order against the holder's word. The leaves of its blocks were
                    // taken as they were written; merging them is the check.
                    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                        f.sync_data().context("flushing a download to disk")?;
                        let leaves = leaves.verified(&h).with_context(|| format!("the assembled chunks do not hash to {h}"))?;
                        store.install(&tmp2, &h).context("installing a download")?;
                        store.save_chunk_list(&h, &list);
                        store.save_leaves(&h, &leaves);
                        tracing::debug!(target: "timing", hash = %h, "flushed, checked and installed");
                        Ok(())
                    })
                    .await
                    .context("the assembling task panicked")??;
                    Ok(fetched)
                }
                .await
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Writes every chunk of `list` into `file`: those `basis` has from it, the others
    /// fetched by byte range from all `holders` at once (each takes the next run of
    /// consecutive chunks not yet asked for when it is done with one, so a faster holder
    /// serves more). A holder that
    /// fails, stalls or sends a chunk whose hash is wrong is dropped and its chunk goes
    /// back for the others. Returns the bytes fetched.
    async fn assemble(
        &self,
        hash: &ContentHash,
        size: u64,
        holders: &[&Holder],
        basis: Option<&ContentHash>,
        list: &crate::chunks::ChunkList,
        file: &Arc<std::fs::File>,
        leaves: &Arc<crate::leaves::AssembledLeaves>,
        worth: Chunked,
    ) -> anyhow::Result<u64> {
        use std::os::unix::fs::FileExt;
        file.set_len(size).context("sizing a download file")?;
        // Chunks this node has (in the basis or any other blob): copied locally, each
        // checked against its hash.
        let (store, b, f, l, leaves_) = (self.store.clone(), basis.cloned(), file.clone(), list.clone(), leaves.clone());
        let wanted = tokio::task::spawn_blocking(move || copy_local_chunks(&store, b.as_ref(), &l, &f, &leaves_))
            .await
            .context("the copying task panicked")?
            .context("copying the chunks this node has")?;
        let local = list.chunks.len() - wanted.len();
        let local_bytes = size - wanted.iter().map(|&i| list.chunks[i].len as u64).sum::<u64>();
        if worth == Chunked::IfMostlyLocal && local_bytes < LOCAL_BYTES_WORTH_IT {
            return Err(NotWorthIt("too few of its chunks are here").into());
        }
        let progress = self.counter(hash);
        progress.store(local_bytes, Ordering::Relaxed);
        // The chunks not yet asked for, and how many are being fetched: a worker whose
        // holder is fine waits while others still have chunks in flight (one may come
        // back, its holder dropped), and ends when nothing is left anywhere.
        let work = Arc::new(std::sync::Mutex::new((wanted, 0usize)));
        let changed = Arc::new(tokio::sync::Notify::new());
        let fetched = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut workers = Vec::new();
        for h in holders {
            let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
            for _ in 0..CHUNK_REQUESTS_PER_HOLDER {
                let (work, changed, fetched, dropped, file, progress, leaves) =
                    (work.clone(), changed.clone(), fetched.clone(), dropped.clone(), file.clone(), progress.clone(), leaves.clone());
                let holder: Holder = (*h).clone();
                workers.push(async move {
                    loop {
                        if dropped.load(std::sync::atomic::Ordering::Relaxed) {
                            return;
                        }
                        let notified = changed.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        let run = {
                            let mut w = work.lock().unwrap_or_else(|p| p.into_inner());
                            let run = take_run(&mut w.0, &list.chunks);
                            if run.is_empty() && w.1 == 0 {
                                return;
                            }
                            w.1 += usize::from(!run.is_empty());
                            run
                        };
                        if run.is_empty() {
                            notified.await;
                            continue;
                        }
                        // Chunks written (each once), and the error after which the rest
                        // of the run goes back.
                        let mut written = 0;
                        let got = async {
                            let (first, last) = (&list.chunks[run[0]], &list.chunks[run[run.len() - 1]]);
                            let (from, to) = (first.offset, last.offset + last.len as u64 - 1);
                            let req = self.get(&holder, &format!("content/{hash}"))?.header("range", format!("bytes={from}-{to}"));
                            let bytes = self.fetch(&holder, req, to - from + 1).await?;
                            if bytes.len() as u64 != to - from + 1 {
                                return Err(Attempt::Misbehaved(anyhow::anyhow!(
                                    "{} sent {} bytes for chunks at {from}..={to} of {hash}",
                                    holder.node,
                                    bytes.len()
                                )));
                            }
                            // Every chunk is checked before any is written.
                            for &i in &run {
                                let c = &list.chunks[i];
                                let at = (c.offset - from) as usize;
                                if crate::store::hash_of(&bytes[at..at + c.len as usize]) != c.hash {
                                    return Err(Attempt::Misbehaved(anyhow::anyhow!("{} sent a wrong chunk at {} of {hash}", holder.node, c.offset)));
                                }
                            }
                            for &i in &run {
                                let c = &list.chunks[i];
                                let at = (c.offset - from) as usize;
                                file.write_all_at(&bytes[at..at + c.len as usize], c.offset)
                                    .and_then(|()| leaves.wrote(&file, c.offset, c.len as u64, false))
                                    .map_err(|e| Attempt::Retry(anyhow::Error::new(e).context("writing a chunk")))?;
                                written += 1;
                            }
                            // Written back as it comes, so the flush before install has
                            // little left to wait for (as a whole pull does).
                            start_writeback(&file, from, to - from + 1);
                            Ok(bytes.len() as u64)
                        }
                        .await;
                        let mut w = work.lock().unwrap_or_else(|p| p.into_inner());
                        w.1 -= 1;
                        let n: u64 = run[..written].iter().map(|&i| list.chunks[i].len as u64).sum();
                        fetched.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        progress.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        if let Err(Attempt::Retry(e) | Attempt::Misbehaved(e)) = got {
                            if !dropped.swap(true, std::sync::atomic::Ordering::Relaxed) {
                                tracing::warn!("dropping holder {} for this pull: {e:#}", holder.node);
                            }
                            w.0.extend(&run[written..]);
                        }
                        drop(w);
                        changed.notify_waiters();
                    }
                });
            }
        }
        futures_util::future::join_all(workers).await;
        let left = work.lock().unwrap_or_else(|p| p.into_inner()).0.len();
        anyhow::ensure!(left == 0, "{left} chunk(s) of {hash} could not be had from any holder");
        let n = fetched.load(std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(%hash, chunks = list.chunks.len(), local, fetched = n, "pulled by chunks");
        Ok(n)
    }

    async fn pull_from(&self, hash: &ContentHash, size: u64, holder: &Holder) -> Result<u64, Attempt> {
        let req = self.get(holder, &format!("content/{hash}"))?;
        let stall = self.stall;
        let resp = match tokio::time::timeout(stall, req.send()).await {
            Err(_) => return Err(Attempt::Misbehaved(anyhow::anyhow!("{} did not answer within {stall:?}", holder.node))),
            Ok(r) => r.with_context(|| format!("asking {} for {hash}", holder.node)).map_err(Attempt::Retry)?,
        };
        if !resp.status().is_success() {
            return Err(Attempt::Retry(anyhow::anyhow!("{} answered {} for {hash}", holder.node, resp.status())));
        }
        if let Some(declared) = resp.content_length().filter(|n| *n != size) {
            return Err(Attempt::Misbehaved(anyhow::anyhow!("{} offers {declared} bytes of {hash}, which has {size}", holder.node)));
        }
        // A small content comes into memory and becomes a row (`small.rs`); a larger
        // one into a tmp file.
        let mut download = if size <= self.store.small_max() {
            Download::Memory(Vec::with_capacity(size as usize))
        } else {
            let (tmp, file) = self.store.tmp_file().context("creating a download file").map_err(Attempt::Retry)?;
            Download::File { tmp, file }
        };
        let progress = self.counter(hash);
        progress.store(0, Ordering::Relaxed);
        let result = async {
            let mut hasher = blake3::Hasher::new();
            let mut n = 0u64;
            let mut started_writeback = 0u64;
            let mut stream = resp.bytes_stream();
            // Progress: within every `stall` window, MIN_PROGRESS_BYTES or the rest.
            let mut window = (tokio::time::Instant::now(), 0u64);
            loop {
                let wait = stall.saturating_sub(window.0.elapsed());
                let chunk = match tokio::time::timeout(wait, stream.try_next()).await {
                    Err(_) => {
                        return Err(Attempt::Misbehaved(anyhow::anyhow!(
                            "{} sent {} bytes of {hash} in {stall:?} after {n} of {size}: stalled",
                            holder.node,
                            window.1
                        )))
                    }
                    Ok(Err(e)) => return Err(Attempt::Retry(anyhow::Error::new(e).context(format!("receiving {hash} from {}", holder.node)))),
                    Ok(Ok(None)) => break,
                    Ok(Ok(Some(chunk))) => chunk,
                };
                n += chunk.len() as u64;
                if n > size {
                    return Err(Attempt::Misbehaved(anyhow::anyhow!("{} sent more than the {size} bytes of {hash}: thrown away", holder.node)));
                }
                hasher.update(&chunk);
                match &mut download {
                    Download::Memory(bytes) => bytes.extend_from_slice(&chunk),
                    Download::File { file, .. } => file.write_all(&chunk).context("writing a download").map_err(Attempt::Retry)?,
                }
                progress.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                window.1 += chunk.len() as u64;
                if window.1 >= MIN_PROGRESS_BYTES.min(size - (n - window.1)) {
                    window = (tokio::time::Instant::now(), 0);
                }
                if let Download::File { file, .. } = &download {
                    if n - started_writeback >= WRITEBACK_EVERY {
                        start_writeback(file, started_writeback, n - started_writeback);
                        started_writeback = n;
                    }
                }
            }
            let got = ContentHash::from_bytes(*hasher.finalize().as_bytes());
            if &got != hash {
                return Err(Attempt::Misbehaved(anyhow::anyhow!("{} sent bytes that hash to {got}, not {hash}: thrown away", holder.node)));
            }
            match &download {
                Download::Memory(bytes) => self.store.put_small(hash, bytes).context("keeping a download").map_err(Attempt::Retry)?,
                Download::File { tmp, file } => {
                    let t = std::time::Instant::now();
                    file.sync_data().context("flushing a download to disk").map_err(Attempt::Retry)?;
                    tracing::debug!(target: "timing", "pulled {n} bytes of {hash}; sync_data took {:?}", t.elapsed());
                    self.store.install(tmp, hash).context("installing a download").map_err(Attempt::Retry)?;
                    self.store.chunk_in_background(hash, n);
                }
            }
            Ok(n)
        }
        .await;
        // `download` goes here (`Drop` removes a download file not installed).
        result
    }
}

/// Most contents one `POST /small` asks for.
pub const SMALL_BATCH_MAX: usize = 256;
/// Most content bytes one answer to `POST /small` carries; the contents past it are
/// answered as absent (and pulled one by one).
pub const SMALL_BATCH_BYTES: usize = 4 << 20;
/// Each content of a `/small` answer is preceded by its length, 4 bytes big-endian;
/// [`SMALL_ABSENT`] there says the holder does not send it.
pub const SMALL_LEN_BYTES: usize = 4;
pub const SMALL_ABSENT: u32 = u32::MAX;

/// The contents of an answer to `POST /small` for `wanted` that are there and check
/// (their size and hash), in order; and why the answer was cut short, if it was (what
/// came before that point is kept).
pub(crate) fn parse_small_batch<'a>(answer: &'a [u8], wanted: &'a [(ContentHash, u64)]) -> (Vec<(&'a ContentHash, &'a [u8])>, Option<String>) {
    let mut taken = Vec::new();
    let mut rest = answer;
    for (h, size) in wanted {
        let Some((len, after)) = rest.split_first_chunk::<SMALL_LEN_BYTES>() else {
            return (taken, Some(format!("it ends before the entry of {h}")));
        };
        rest = after;
        let len = u32::from_be_bytes(*len);
        if len == SMALL_ABSENT {
            continue;
        }
        if u64::from(len) != *size || rest.len() < len as usize {
            return (taken, Some(format!("{h} is {len} bytes, not {size}")));
        }
        let (bytes, after) = rest.split_at(len as usize);
        rest = after;
        if blake3::hash(bytes).as_bytes() != h.as_bytes() {
            return (taken, Some(format!("the bytes sent for {h} hash to something else")));
        }
        taken.push((h, bytes));
    }
    let trailing = (!rest.is_empty()).then(|| format!("{} bytes follow the last entry", rest.len()));
    (taken, trailing)
}

/// Where a download lands until it is checked. A download file left when it is dropped
/// (the pull failed, or was dropped half-way for a pull by chunks) is removed; one
/// installed was renamed away already.
enum Download {
    Memory(Vec<u8>),
    File { tmp: std::path::PathBuf, file: std::fs::File },
}

impl Drop for Download {
    fn drop(&mut self) {
        if let Download::File { tmp, .. } = self {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs are consecutive chunks up to RUN_BYTES; a gap (a chunk the basis had, or one
    /// that went back to the queue's end) ends a run; a chunk larger than RUN_BYTES is a
    /// run of its own.
    #[test]
    fn runs_take_consecutive_chunks_up_to_the_limit() {
        let lens = [300_000u32, 300_000, 300_000, 300_000, 2_000_000, 10, 10, 10];
        let mut offset = 0;
        let chunks: Vec<crate::chunks::Chunk> = lens
            .iter()
            .map(|&len| {
                let c = crate::chunks::Chunk { offset, len, hash: crate::store::hash_of(&offset.to_le_bytes()) };
                offset += len as u64;
                c
            })
            .collect();
        let mut queue: std::collections::VecDeque<usize> = [0, 1, 2, 3, 4, 5, 7, 6].into_iter().collect();
        let mut runs = Vec::new();
        while !queue.is_empty() {
            runs.push(take_run(&mut queue, &chunks));
        }
        assert_eq!(runs, vec![vec![0, 1, 2], vec![3], vec![4], vec![5], vec![7], vec![6]]);
        assert!(take_run(&mut queue, &chunks).is_empty());
    }

    /// A holder serving `contents` on 127.0.0.1; `trickle`: it sends 64 KiB every
    /// `every` (just fast enough for a stall window longer than that) instead of at once.
    async fn holder(name: &str, contents: HashMap<ContentHash, Vec<u8>>, trickle: Option<Duration>) -> Holder {
        use axum::extract::{Path, State};
        async fn content(
            State((contents, trickle)): State<(Arc<HashMap<ContentHash, Vec<u8>>>, Option<Duration>)>,
            Path(hash): Path<String>,
        ) -> axum::response::Response {
            let Some(bytes) = hash.parse().ok().and_then(|h: ContentHash| contents.get(&h).cloned()) else {
                return axum::http::StatusCode::NOT_FOUND.into_response();
            };
            let Some(every) = trickle else { return bytes.into_response() };
            let len = bytes.len();
            let pieces = futures_util::stream::unfold((bytes, 0usize), move |(bytes, at)| async move {
                if at > 0 {
                    tokio::time::sleep(every).await;
                }
                let end = (at + MIN_PROGRESS_BYTES as usize).min(bytes.len());
                (at < end).then(|| (Ok::<_, std::io::Error>(axum::body::Bytes::copy_from_slice(&bytes[at..end])), (bytes, end)))
            });
            ([(axum::http::header::CONTENT_LENGTH, len.to_string())], axum::body::Body::from_stream(pieces)).into_response()
        }
        use axum::response::IntoResponse;
        let app = axum::Router::new().route("/content/{hash}", axum::routing::get(content)).with_state((Arc::new(contents), trickle));
        let listener = http_serve::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let cancel = tokio_util::sync::CancellationToken::new();
        tokio::spawn(async move { http_serve::serve(listener, None, app, crate::peer::LIMITS, cancel).await });
        Holder { node: name.parse().unwrap(), url }
    }

    /// A holder sending just fast enough holds at most its share of the pull slots: with
    /// every slot's worth of its contents being pulled, a content of another holder still
    /// comes at once (it waited for the trickles to end, the whole pull limit theirs).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_trickling_holder_holds_only_its_share_of_the_pull_slots() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let stall = Duration::from_secs(2);
        let puller = Puller::new(reqwest::Client::new(), store.clone(), "me".parse().unwrap(), None, stall, false);
        let hashed = |b: Vec<u8>| (crate::store::hash_of(&b), b);
        let slow: Vec<(ContentHash, Vec<u8>)> = (0..MAX_CONCURRENT_PULLS as u8).map(|i| hashed(vec![i; 1 << 20])).collect();
        let trickler = holder("trickler", slow.iter().cloned().collect(), Some(stall * 3 / 4)).await;
        let (good_hash, good) = hashed(b"from an honest holder".to_vec());
        let honest = holder("honest", [(good_hash.clone(), good.clone())].into(), None).await;
        let trickles: Vec<_> = slow
            .iter()
            .map(|(h, b)| {
                let (p, h, n, t) = (puller.clone(), h.clone(), b.len() as u64, trickler.clone());
                tokio::spawn(async move { p.pull(&h, n, &[t]).await })
            })
            .collect();
        let coming = || puller.in_progress().iter().filter(|p| p.done > 0).count();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while coming() < PULLS_PER_HOLDER && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(coming(), PULLS_PER_HOLDER, "the trickler's share of pulls is coming, no more");
        let pulled = tokio::time::timeout(Duration::from_secs(60), puller.pull(&good_hash, good.len() as u64, &[honest])).await;
        assert_eq!(pulled.expect("the honest holder's content came").unwrap(), good.len() as u64);
        assert!(store.has(&good_hash));
        assert!(trickles.iter().all(|t| !t.is_finished()), "it came while every trickle was still under way");
        for t in trickles {
            t.abort();
        }
    }

    /// A holder's answer to `POST /small` is taken as far as it checks: absent entries
    /// are skipped, and a wrong size, bytes that hash to something else, a cut answer or
    /// bytes after the last entry stop it, keeping what came before.
    #[test]
    fn a_batch_of_small_contents_is_taken_as_far_as_it_checks() {
        let a = b"alpha".to_vec();
        let b = b"bravo!".to_vec();
        let hash = |c: &[u8]| ContentHash::from_bytes(*blake3::hash(c).as_bytes());
        let wanted = vec![(hash(&a), a.len() as u64), (hash(b"gone"), 4), (hash(&b), b.len() as u64)];
        let entry = |c: &[u8]| [&(c.len() as u32).to_be_bytes()[..], c].concat();
        let absent = SMALL_ABSENT.to_be_bytes().to_vec();
        let good = [entry(&a), absent.clone(), entry(&b)].concat();
        let (taken, bad) = parse_small_batch(&good, &wanted);
        assert_eq!((taken.len(), bad), (2, None));
        assert_eq!((taken[0].1, taken[1].1), (&a[..], &b[..]));
        let lies = [
            ("a wrong size", [entry(&a), absent.clone(), entry(b"bravo")].concat()),
            ("other bytes", [entry(&a), absent.clone(), entry(b"BRAVO!")].concat()),
            ("cut short", [entry(&a), absent.clone(), entry(&b)[..7].to_vec()].concat()),
            ("no entry", [entry(&a), absent.clone()].concat()),
        ];
        for (what, answer) in lies {
            let (taken, bad) = parse_small_batch(&answer, &wanted);
            assert_eq!(taken.iter().map(|(h, _)| (*h).clone()).collect::<Vec<_>>(), vec![hash(&a)], "{what}");
            assert!(bad.is_some(), "{what}");
        }
        let trailing = [good.clone(), vec![0]].concat();
        let (taken, bad) = parse_small_batch(&trailing, &wanted);
        assert_eq!((taken.len(), bad.is_some()), (2, true), "bytes after the last entry");
    }
}
