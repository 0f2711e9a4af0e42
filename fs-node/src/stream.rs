//! A large content streamed into this node while programs read it (files on demand):
//! `head` of a 10 GiB file does not wait for 10 GiB. The stream fetches the content's
//! leaves (`leaves.rs`) from a holder and checks them against the content hash, then
//! fetches runs of blocks by byte range from every holder at once, starting where a
//! reader waits and going on sequentially ahead of it; each block is checked against
//! its leaf before it is marked present, and a read returns as soon as the blocks it
//! covers are. A holder that fails, stalls or sends a wrong block is dropped and its
//! blocks go back to the others. When every block is here, the file is flushed and
//! installed in the store like any pull. Owns its download file and which blocks it
//! holds; the `Fetcher` owns the streams under way.

use crate::leaves::{self, BLOCK};
use crate::puller::Puller;
use crate::store::{ContentStore, MAX_FILE_SIZE};
use crate::tree::{FsError, FsResult};
use blake3::hazmat::ChainingValue;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use wire::{ContentHash, Holder};

/// Contents at least this large are streamed when opened for reading; smaller ones are
/// fetched whole before the open returns.
pub const STREAM_MIN_BYTES: u64 = 4 << 20;
/// Blocks per range request (1 MiB).
const RUN_BLOCKS: usize = 16;
/// Range requests in flight to one holder.
const REQUESTS_PER_HOLDER: usize = 4;
/// How far a stream that programs read fetches ahead of the furthest block read (16 MiB):
/// `head` of a large file, or a reader that stops, does not fetch the rest.
const READ_AHEAD_BLOCKS: usize = 256;

/// Why getting an on-demand content failed (a stream or a whole fetch), kept for every
/// reader that waited on it.
#[derive(Clone, Debug)]
pub struct Failure {
    /// No holder could be reached at all: readers get `EHOSTUNREACH`, else `EIO`.
    pub unreachable: bool,
    pub reason: Arc<String>,
}

impl Failure {
    pub fn new(unreachable: bool, reason: impl Into<String>) -> Failure {
        Failure { unreachable, reason: Arc::new(reason.into()) }
    }

    /// Says once, in the node's log, why and with which errno its readers fail.
    pub fn log(&self, hash: &ContentHash, doing: &str) {
        if self.unreachable {
            tracing::warn!(%hash, "no node holding an on-demand content can be reached (reads fail with EHOSTUNREACH): {}", self.reason);
        } else {
            tracing::warn!(%hash, "{doing} an on-demand content failed (reads fail with EIO): {}", self.reason);
        }
    }

    /// The error a reader gets.
    pub fn to_error(&self, hash: &ContentHash, doing: &str) -> FsError {
        let e = anyhow::anyhow!("{doing} {hash}: {}", self.reason);
        if self.unreachable {
            FsError::Unreachable(e)
        } else {
            FsError::Io(e)
        }
    }
}

/// How a stream ended: installed, or failed.
pub(crate) type End = Result<(), Failure>;

pub struct Stream {
    pub hash: ContentHash,
    pub size: u64,
    tmp: PathBuf,
    file: std::fs::File,
    state: Mutex<State>,
    changed: tokio::sync::Notify,
    /// Open handles and waiters on this stream (`Fetcher` counts them): with none left
    /// before it ends, the stream is cancelled.
    pub(crate) readers: AtomicUsize,
    cancel: CancellationToken,
    /// Set once the leaves are checked: what a read needs to fetch a run itself.
    ctx: std::sync::OnceLock<Ctx>,
    /// Buffers of reads given back (`give_back`), used again by the next reads: a fresh
    /// buffer of a megabyte per read cost a page fault per 4 KiB (a tenth of a
    /// streamed read's time).
    buffers: Mutex<Vec<Vec<u8>>>,
}

/// Read buffers a stream keeps for reuse.
const SPARE_BUFFERS: usize = 8;

/// What fetching a run takes, fixed once the leaves are checked.
struct Ctx {
    puller: Puller,
    leaves: Vec<ChainingValue>,
    holders: Vec<Holder>,
    progress: Arc<AtomicU64>,
}

struct State {
    present: Vec<bool>,
    in_flight: Vec<bool>,
    have: usize,
    /// Where the next run is looked for: after the last one handed out, or the block a
    /// reader waits for.
    cursor: usize,
    /// Blocks before this one may be fetched: all of them for a pull, those up to
    /// [`READ_AHEAD_BLOCKS`] past the furthest block read for a stream programs read.
    fetch_to: usize,
    end: Option<End>,
    /// Holders dropped for this stream (they failed, stalled or lied).
    dropped: std::collections::HashSet<wire::NodeId>,
    /// Runs fetched so far (the next read-driven fetch takes the next live holder).
    turn: usize,
    /// Bytes copied from a basis instead of fetched.
    seeded: u64,
    /// Bytes an earlier stream had fetched (`resume`).
    resumed: u64,
    /// A pull over an old version: that version and which blocks it has at the same
    /// offsets. Those are marked present without being copied: the content is kept as
    /// a patch over the old version (`patched.rs`). Nobody reads such a stream.
    basis: Option<(ContentHash, Vec<bool>)>,
}

/// What a stream nobody read to the end had: its download file and which blocks are in
/// it, each checked against its leaf. A later stream of the same content starts from it
/// ([`Stream::resume`]): `head` and then `cat` of a large file fetch its head once.
pub struct Partial {
    tmp: PathBuf,
    present: Vec<bool>,
    have: usize,
}

impl Partial {
    /// Bytes in it (whole blocks).
    pub fn bytes(&self) -> u64 {
        self.have as u64 * BLOCK
    }

    /// Removes its download file.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

impl Stream {
    /// A stream that fetches the whole content (a pull nobody reads).
    pub fn new(store: &ContentStore, hash: ContentHash, size: u64) -> std::io::Result<Arc<Stream>> {
        Self::open(store, hash, size, None, None)
    }

    /// A stream of `hash` that programs read, fetching ahead of them, that starts from
    /// what `partial` (an earlier stream of it) had, if it can be opened still; else from
    /// nothing.
    pub fn resume(store: &ContentStore, hash: ContentHash, size: u64, partial: Option<Partial>) -> std::io::Result<Arc<Stream>> {
        Self::open(store, hash, size, partial, Some(READ_AHEAD_BLOCKS))
    }

    fn open(store: &ContentStore, hash: ContentHash, size: u64, partial: Option<Partial>, ahead: Option<usize>) -> std::io::Result<Arc<Stream>> {
        if size > MAX_FILE_SIZE {
            // A size any node may claim: refused before sizing anything by it (what a
            // stream keeps per block, two flags here and 32 bytes of leaf while fetching).
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a content of {size} bytes is larger than a node takes ({MAX_FILE_SIZE})"),
            ));
        }
        let n = leaves::blocks(size);
        // Read and written: readers take their blocks from it.
        let reopen = |p: &Partial| std::fs::OpenOptions::new().read(true).write(true).open(&p.tmp).ok().filter(|f| f.metadata().is_ok_and(|m| m.len() == size));
        let resumed = partial.and_then(|p| match reopen(&p).filter(|_| p.present.len() == n) {
            Some(file) => Some((p.tmp, file, p.present, p.have)),
            None => {
                p.discard();
                None
            }
        });
        let (tmp, file, present, have) = match resumed {
            Some(r) => r,
            None => {
                let (tmp, file) = store.tmp_file()?;
                drop(file);
                let file = std::fs::OpenOptions::new().read(true).write(true).open(&tmp)?;
                file.set_len(size)?;
                (tmp, file, vec![false; n], 0)
            }
        };
        Ok(Arc::new(Stream {
            hash,
            size,
            tmp,
            file,
            state: Mutex::new(State {
                present,
                in_flight: vec![false; n],
                have,
                cursor: 0,
                fetch_to: ahead.map_or(n, |a| a.min(n)),
                end: None,
                dropped: Default::default(),
                turn: 0,
                seeded: 0,
                resumed: 0,
                basis: None,
            }),
            changed: tokio::sync::Notify::new(),
            readers: AtomicUsize::new(0),
            cancel: CancellationToken::new(),
            ctx: std::sync::OnceLock::new(),
            buffers: Mutex::default(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After a cancelled run: its download file and the blocks in it, for a later stream
    /// of the same content (`None` if it had none; its file is removed then).
    pub fn partial(&self) -> Option<Partial> {
        let st = self.lock();
        let p = Partial { tmp: self.tmp.clone(), present: st.present.clone(), have: st.have };
        if p.have == 0 {
            p.discard();
            return None;
        }
        Some(p)
    }

    pub fn ended(&self) -> bool {
        self.lock().end.is_some()
    }

    /// Every block is here (checked): the stream only has to install the content, which
    /// it does whether anyone still reads it or not.
    pub fn complete(&self) -> bool {
        let st = self.lock();
        st.have == st.present.len()
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
        self.changed.notify_waiters();
    }

    fn error(&self, f: &Failure) -> FsError {
        f.to_error(&self.hash, "streaming")
    }

    /// Bytes `offset..offset+len` (cut at the end), as soon as the blocks they cover are
    /// here and checked. A block nobody is fetching (every request in flight is further
    /// ahead, or stuck on a holder about to be dropped) is fetched for the read at once.
    pub async fn read(self: &Arc<Self>, offset: u64, len: u32) -> FsResult<Vec<u8>> {
        let end = (offset + len as u64).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let (first, last) = ((offset / BLOCK) as usize, ((end - 1) / BLOCK) as usize);
        // A read further on lets the stream fetch further ahead.
        let further = {
            let mut st = self.lock();
            let to = (last + 1 + READ_AHEAD_BLOCKS).min(st.present.len());
            let further = to > st.fetch_to;
            st.fetch_to = st.fetch_to.max(to);
            further
        };
        if further {
            self.changed.notify_waiters();
        }
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if let Some(Err(e)) = &st.end {
                    return Err(self.error(e));
                }
                match (first..=last).find(|&b| !st.present[b]) {
                    None => break,
                    Some(b) if !st.in_flight[b] => {
                        if let Some(ctx) = self.ctx.get() {
                            if let Some(h) = Self::live_holder(&mut st, &ctx.holders) {
                                let j = Self::take_run(&mut st, b);
                                let me = self.clone();
                                tokio::spawn(async move {
                                    let ctx = me.ctx.get().expect("set before");
                                    match me.fetch_run(&ctx.puller, &h, &ctx.leaves, (b, j)).await {
                                        Ok(n) => {
                                            ctx.progress.fetch_add(n, Ordering::Relaxed);
                                        }
                                        Err(e) => me.drop_holder(&h, e),
                                    }
                                });
                            }
                        } else {
                            st.cursor = b;
                        }
                    }
                    Some(_) => {}
                }
            }
            if self.cancel.is_cancelled() {
                return Err(FsError::Io(anyhow::anyhow!("the stream of {} was cancelled", self.hash)));
            }
            notified.await;
        }
        let mut buf = self.buffers.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default();
        // A buffer used before is usually as long as this read already: then nothing is
        // zeroed (the read overwrites it all, or fails and the buffer is dropped).
        buf.resize((end - offset) as usize, 0);
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Takes back the buffer of a read once its bytes are sent, for the next reads.
    pub fn give_back(&self, buf: Vec<u8>) {
        let mut spare = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < SPARE_BUFFERS {
            spare.push(buf);
        }
    }

    /// The next holder not dropped, in turn.
    fn live_holder(st: &mut State, holders: &[Holder]) -> Option<Holder> {
        let live: Vec<&Holder> = holders.iter().filter(|h| !st.dropped.contains(&h.node)).collect();
        if live.is_empty() {
            return None;
        }
        st.turn += 1;
        Some(live[st.turn % live.len()].clone())
    }

    fn drop_holder(&self, h: &Holder, e: anyhow::Error) {
        if self.lock().dropped.insert(h.node.clone()) {
            tracing::warn!("dropping holder {} for this stream: {e:#}", h.node);
        }
        self.changed.notify_waiters();
    }

    /// Lets the stream fetch the whole content, whatever its readers read (someone needs
    /// it whole: a write, a pin).
    pub fn fetch_everything(&self) {
        {
            let mut st = self.lock();
            st.fetch_to = st.present.len();
        }
        self.changed.notify_waiters();
    }

    /// Waits until the stream has ended: the content is in the store, or the error.
    pub async fn finished(&self) -> FsResult<()> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match &self.lock().end {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => return Err(self.error(e)),
                None => {}
            }
            if self.cancel.is_cancelled() {
                return Err(FsError::Io(anyhow::anyhow!("the stream of {} was cancelled", self.hash)));
            }
            notified.await;
        }
    }

    /// The next run of blocks to fetch (marked in flight), `Ok(None)` to wait for one
    /// coming back, `Err(())` when there is nothing left.
    fn next_run(&self) -> Result<Option<(usize, usize)>, ()> {
        let mut st = self.lock();
        let n = st.present.len();
        if st.have == n {
            return Err(());
        }
        let start = st.cursor.min(n);
        let Some(i) = (start..n).chain(0..start).find(|&b| !st.present[b] && !st.in_flight[b] && b < st.fetch_to) else {
            // Blocks past what readers let it fetch wait for a read further on.
            let waiting = st.in_flight.iter().any(|f| *f) || st.present[st.fetch_to..].iter().any(|p| !p);
            return if waiting { Ok(None) } else { Err(()) };
        };
        let j = Self::take_run(&mut st, i);
        st.cursor = j;
        Ok(Some((i, j)))
    }

    /// Marks in flight the run of up to `RUN_BLOCKS` blocks from `first` that are neither
    /// present nor in flight; returns the end of the run.
    fn take_run(st: &mut State, first: usize) -> usize {
        let mut j = first;
        while j < st.present.len() && j - first < RUN_BLOCKS && !st.present[j] && !st.in_flight[j] {
            st.in_flight[j] = true;
            j += 1;
        }
        j
    }

    /// Fetches blocks `i..j` from `holder`, checks each against its leaf and writes the
    /// good ones; returns how many bytes were good, or the error after which the holder
    /// is dropped (its blocks go back).
    async fn fetch_run(&self, puller: &Puller, holder: &Holder, leaves: &[ChainingValue], (i, j): (usize, usize)) -> Result<u64, anyhow::Error> {
        let first = i as u64 * BLOCK;
        let last = (j as u64 * BLOCK).min(self.size) - 1;
        let got = puller.get_bytes(holder, &format!("content/{}", self.hash), Some((first, last)), last - first + 1).await;
        let mut good = 0u64;
        let mut result = Ok(());
        match got {
            Ok(bytes) if bytes.len() as u64 == last - first + 1 => {
                for b in i..j {
                    let at = b as u64 * BLOCK;
                    let block = &bytes[(at - first) as usize..((at + BLOCK).min(self.size) - first) as usize];
                    if leaves::leaf(block, at) != leaves[b] {
                        result = Err(anyhow::anyhow!("{} sent a wrong block at {at} of {}", holder.node, self.hash));
                        break;
                    }
                    if let Err(e) = self.file.write_all_at(block, at) {
                        result = Err(anyhow::Error::new(e).context("writing a streamed block"));
                        break;
                    }
                    let mut st = self.lock();
                    st.present[b] = true;
                    st.in_flight[b] = false;
                    st.have += 1;
                    drop(st);
                    good += block.len() as u64;
                    self.changed.notify_waiters();
                }
            }
            Ok(bytes) => result = Err(anyhow::anyhow!("{} sent {} bytes for a range of {}", holder.node, bytes.len(), last - first + 1)),
            Err(e) => result = Err(e),
        }
        let mut st = self.lock();
        for b in i..j {
            st.in_flight[b] = false;
        }
        drop(st);
        self.changed.notify_waiters();
        result.map(|()| good)
    }

    /// Streams the content from `holders` into the store (see the module), counting its
    /// bytes in `progress`; ends the stream either way, and returns how. With a `basis`
    /// (a pull of a new version of a file this node has: nobody reads the stream), the
    /// blocks the basis has at the same offsets are copied from it and only the others
    /// fetched; if it shares less than half of them, the stream ends at once (the caller
    /// pulls by chunks, which also find moved bytes).
    pub(crate) async fn run(
        self: Arc<Self>,
        puller: Puller,
        holders: Vec<Holder>,
        store: ContentStore,
        progress: Arc<AtomicU64>,
        basis: Option<ContentHash>,
    ) -> End {
        let holders: Vec<Holder> = holders.into_iter().filter(|h| h.node != *puller.me()).collect();
        // Blocks an earlier stream had (`resume`) count as done.
        let resumed: u64 = {
            let mut st = self.lock();
            st.resumed = st.present.iter().enumerate().filter(|(_, p)| **p).map(|(b, _)| leaves::block_len(self.size, b)).sum();
            st.resumed
        };
        progress.fetch_add(resumed, Ordering::Relaxed);
        let end = self.fetch_all(&puller, &holders, &store, progress, basis.as_ref()).await;
        // A cancelled stream's download file is its owner's to keep (`partial`).
        if end.is_err() && !self.cancel.is_cancelled() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        match &end {
            Ok(()) => tracing::info!(hash = %self.hash, bytes = self.size, seeded = self.lock().seeded, "streamed"),
            Err(f) if basis.is_some() => tracing::debug!(hash = %self.hash, "pulling over the old version failed: {}", f.reason),
            Err(f) => f.log(&self.hash, "streaming"),
        }
        self.lock().end = Some(end.clone());
        self.changed.notify_waiters();
        end
    }

    /// Bytes copied from the basis instead of fetched.
    pub fn seeded(&self) -> u64 {
        self.lock().seeded
    }

    /// Bytes an earlier stream of the content had fetched (counted in its progress, not
    /// fetched again).
    pub fn resumed(&self) -> u64 {
        self.lock().resumed
    }

    /// Marks present every block content `basis` has at the same offset (its cached
    /// leaf and length are those of this content's block), without copying it: they are
    /// taken from the basis when the stream is kept (`keep`). Returns their bytes (0
    /// without cached leaves of the basis). The basis is this node's own content and its
    /// leaves were taken from it.
    fn seed_from_basis(&self, store: &ContentStore, basis: &ContentHash, leaves: &[ChainingValue]) -> std::io::Result<u64> {
        let (Some(theirs), Some(basis_size)) = (store.cached_leaves(basis), store.size_of(basis)) else {
            return Ok(0);
        };
        let same: Vec<bool> = (0..leaves.len())
            .map(|b| b < theirs.len() && theirs[b] == leaves[b] && leaves::block_len(basis_size, b) == leaves::block_len(self.size, b))
            .collect();
        if !store.has(basis) {
            return Ok(0);
        }
        let mut st = self.lock();
        let mut seeded = 0;
        for (b, &s) in same.iter().enumerate() {
            if s && !st.present[b] {
                st.present[b] = true;
                st.have += 1;
                seeded += leaves::block_len(self.size, b);
            }
        }
        st.seeded = seeded;
        st.basis = Some((basis.clone(), same));
        Ok(seeded)
    }

    /// Keeps the whole download (checked) in the store: as a patch over the basis when
    /// it was pulled over one (if the basis went meanwhile, the pull fails, and the
    /// puller takes the content by chunks or whole), else as a blob.
    fn keep(&self, store: &ContentStore, leaves: &[ChainingValue]) -> anyhow::Result<()> {
        use anyhow::Context;
        let basis = self.lock().basis.take();
        if let Some((basis, same)) = basis {
            self.file.sync_data().context("flushing the download")?;
            let from_patch: Vec<bool> = same.iter().map(|s| !s).collect();
            let made = store
                .install_patched(&self.hash, self.size, &self.tmp, &self.file, &basis, from_patch, leaves, true)
                .with_context(|| format!("keeping the pull as a patch over {basis}"))?;
            if !made {
                // The store had it already (another pull of it landed first).
                let _ = std::fs::remove_file(&self.tmp);
            }
            return Ok(());
        }
        self.file.sync_data().context("flushing the download")?;
        store.install(&self.tmp, &self.hash).context("installing the download")?;
        store.save_leaves(&self.hash, leaves);
        Ok(())
    }

    async fn fetch_all(
        self: &Arc<Self>,
        puller: &Puller,
        holders: &[Holder],
        store: &ContentStore,
        progress: Arc<AtomicU64>,
        basis: Option<&ContentHash>,
    ) -> End {
        // The leaves, from the first holder whose leaves merge into the hash.
        let mut reached = false;
        let mut leaves = None;
        let most = 32 * leaves::blocks(self.size) as u64;
        for h in holders {
            match puller.get_bytes(h, &format!("leaves/{}", self.hash), None, most).await {
                Ok(b) => {
                    reached = true;
                    match leaves::from_bytes(&b).filter(|l| leaves::verify(l, self.size, &self.hash)) {
                        Some(l) => {
                            leaves = Some(l);
                            break;
                        }
                        None => tracing::warn!("{} sent leaves of {} that do not merge into its hash: not asked again", h.node, self.hash),
                    }
                }
                Err(e) => {
                    reached |= !crate::puller::is_unreachable(&e);
                    tracing::debug!("no leaves of {} from {}: {e:#}", self.hash, h.node);
                }
            }
        }
        let Some(leaves) = leaves else {
            return Err(Failure::new(!reached, format!("no holder of the {} holders asked gave the leaves of {}", holders.len(), self.hash)));
        };
        if let Some(b) = basis {
            let (me, s, l, b) = (self.clone(), store.clone(), leaves.clone(), b.clone());
            let seeded =
                tokio::task::spawn_blocking(move || me.seed_from_basis(&s, &b, &l)).await.unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match seeded {
                Ok(copied) if copied * 2 >= self.size => {
                    progress.fetch_add(copied, Ordering::Relaxed);
                }
                Ok(copied) => return Err(Failure::new(false, format!("the old version shares only {copied} bytes at the same offsets"))),
                Err(e) => return Err(Failure::new(false, format!("copying from the old version: {e}"))),
            }
        }
        let _ = self.ctx.set(Ctx { puller: puller.clone(), leaves, holders: holders.to_vec(), progress });
        let ctx = self.ctx.get().expect("just set");
        let leaves = &ctx.leaves;
        let reached = AtomicUsize::new(0);
        let workers = holders.iter().flat_map(|h| std::iter::repeat_n(h, REQUESTS_PER_HOLDER)).map(|h| {
            let reached = &reached;
            async move {
                loop {
                    if self.cancel.is_cancelled() || self.lock().dropped.contains(&h.node) {
                        return;
                    }
                    let notified = self.changed.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    let run = match self.next_run() {
                        Err(()) => return,
                        Ok(None) => {
                            notified.await;
                            continue;
                        }
                        Ok(Some(run)) => run,
                    };
                    match self.fetch_run(puller, h, leaves, run).await {
                        Ok(n) => {
                            reached.fetch_add(1, Ordering::Relaxed);
                            ctx.progress.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if !crate::puller::is_unreachable(&e) {
                                reached.fetch_add(1, Ordering::Relaxed);
                            }
                            self.drop_holder(h, e);
                            return;
                        }
                    }
                }
            }
        });
        futures_util::future::join_all(workers).await;
        // Read-driven fetches may still be under way (their holders alive): wait for them.
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.cancel.is_cancelled() || !self.lock().in_flight.iter().any(|f| *f) {
                break;
            }
            notified.await;
        }
        let missing = {
            let st = self.lock();
            st.present.len() - st.have
        };
        // A stream whose last reader left after the last block came is installed all the
        // same (CI: `cat` of a whole file, then its content was missing from the store).
        if missing > 0 && self.cancel.is_cancelled() {
            return Err(Failure::new(false, "cancelled: nobody reads it any more"));
        }
        if missing > 0 {
            return Err(Failure::new(reached.load(Ordering::Relaxed) == 0, format!("{missing} block(s) of {} could not be had from any holder", self.hash)));
        }
        let (me, store, leaves) = (self.clone(), store.clone(), leaves.clone());
        let installed = tokio::task::spawn_blocking(move || me.keep(&store, &leaves)).await;
        match installed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failure::new(false, format!("installing a streamed content: {e:#}"))),
            Err(e) => Err(Failure::new(false, format!("installing a streamed content: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change may claim any size: past the largest a stream takes, nothing is sized
    /// by it (a claim of 2^62 bytes would otherwise ask for 2^46 flags at once).
    #[test]
    fn a_claimed_size_past_the_largest_is_refused_before_anything_is_sized_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let hash = ContentHash::from_bytes([7; 32]);
        let refused = Stream::new(&store, hash.clone(), MAX_FILE_SIZE + 1).err().expect("refused");
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidInput, "{refused}");
        assert!(Stream::new(&store, hash, 3 * BLOCK + 1).is_ok());
    }
}
