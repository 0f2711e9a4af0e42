//! Pulls contents from the nodes that hold them over HTTP(S), verifying each byte stream
//! against its hash before it enters the store; drops holders that stall, trickle, or
//! send too much or the wrong bytes.

use crate::store::ContentStore;
use anyhow::{bail, Context};
use futures_util::TryStreamExt;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use wire::{ContentHash, Holder, NodeId};

/// Transfers in flight at once from one node: enough to hide latency on many small files
/// without opening hundreds of sockets.
pub const MAX_CONCURRENT_PULLS: usize = 16;
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
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
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

/// Why one attempt at one holder failed: worth another round (the holder may just be
/// busy or restarting), or a holder that misbehaved and is skipped for the rest of the
/// pull (it stalled, sent too much, or sent wrong bytes).
enum Attempt {
    Retry(anyhow::Error),
    Misbehaved(anyhow::Error),
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
}

impl Puller {
    pub fn new(client: reqwest::Client, store: ContentStore, me: NodeId, token: Option<String>, stall: Duration, tls_only: bool) -> Puller {
        Puller { client, store, me, token, stall, tls_only, limit: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_PULLS)) }
    }

    /// Makes `hash` (of `size` bytes) present in the store, trying each holder in turn
    /// (a few rounds). Returns the number of bytes transferred (0 if it was already there).
    pub async fn pull(&self, hash: &ContentHash, size: u64, holders: &[Holder]) -> anyhow::Result<u64> {
        if self.store.has(hash) {
            return Ok(0);
        }
        let _permit = self.limit.acquire().await.context("pull limiter closed")?;
        let mut others: Vec<&Holder> = holders.iter().filter(|h| h.node != self.me).collect();
        if others.is_empty() {
            bail!("no other node holds {hash}");
        }
        let mut last = None;
        for round in 0..PULL_ROUNDS {
            let mut i = 0;
            while i < others.len() {
                if self.store.has(hash) {
                    return Ok(0);
                }
                match self.pull_from(hash, size, others[i]).await {
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
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no holder answered")).context(format!("pulling {hash}")))
    }

    async fn pull_from(&self, hash: &ContentHash, size: u64, holder: &Holder) -> Result<u64, Attempt> {
        let url = format!("{}/content/{}", holder.url.trim_end_matches('/'), hash);
        let mut req = self.client.get(&url);
        if let Some(t) = &self.token {
            // The token is a secret: never send it in clear text to an `http://` holder
            // when this node itself talks TLS (a hostile manager entry could point there).
            if self.tls_only && !url.starts_with("https://") {
                return Err(Attempt::Misbehaved(anyhow::anyhow!("{} is not an https:// holder; the cluster token is not sent in clear text", holder.node)));
            }
            req = req.bearer_auth(t);
        }
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
        let (tmp, mut file) = self.store.tmp_file().context("creating a download file").map_err(Attempt::Retry)?;
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
                file.write_all(&chunk).context("writing a download").map_err(Attempt::Retry)?;
                window.1 += chunk.len() as u64;
                if window.1 >= MIN_PROGRESS_BYTES.min(size - (n - window.1)) {
                    window = (tokio::time::Instant::now(), 0);
                }
                if n - started_writeback >= WRITEBACK_EVERY {
                    start_writeback(&file, started_writeback, n - started_writeback);
                    started_writeback = n;
                }
            }
            let got = ContentHash::from_bytes(*hasher.finalize().as_bytes());
            if &got != hash {
                return Err(Attempt::Misbehaved(anyhow::anyhow!("{} sent bytes that hash to {got}, not {hash}: thrown away", holder.node)));
            }
            let t = std::time::Instant::now();
            file.sync_data().context("flushing a download to disk").map_err(Attempt::Retry)?;
            tracing::debug!(target: "timing", "pulled {n} bytes of {hash}; sync_data took {:?}", t.elapsed());
            self.store.install(&tmp, hash).context("installing a download").map_err(Attempt::Retry)?;
            Ok(n)
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}
