//! Peer HTTP: the server every node runs (contents by hash for other nodes; status, sync
//! and metrics for `syncctl` and operators) and the client that pulls contents from
//! holders, verifying each byte stream against its hash before it enters the store.

use crate::node::Shared;
use crate::store::ContentStore;
use anyhow::{bail, Context};
use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use wire::{ContentHash, Holder, NodeId};

type Body = BoxBody<Bytes, std::io::Error>;

/// Transfers in flight at once from one node: enough to hide latency on many small files
/// without opening hundreds of sockets.
pub const MAX_CONCURRENT_PULLS: usize = 16;
/// A holder that does not answer within this is skipped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A client that has not finished its TLS handshake by then is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts over all holders before a pull is reported failed (a later sync retries).
const PULL_ROUNDS: usize = 3;

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).map_err(|never| match never {}).boxed())
        .expect("static response parts are valid")
}

fn json_error(status: StatusCode, msg: &str) -> Response<Body> {
    full(status, "application/json", serde_json::json!({ "error": msg }).to_string())
}

fn authorized(req: &Request<hyper::body::Incoming>, token: &Option<String>) -> bool {
    let Some(token) = token else { return true };
    let Some(h) = req.headers().get("authorization").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(given) = h.strip_prefix("Bearer ") else {
        return false;
    };
    // Constant-time comparison: the token must not leak through timing.
    use subtle::ConstantTimeEq;
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

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

/// Peer connections served at once; more wait in the kernel's accept queue. Far below
/// the descriptor limit, so FUSE opens in the same process never run out.
pub const MAX_PEER_CONNECTIONS: usize = 512;
/// A client must send a request's headers within this, also on an idle kept-alive
/// connection: an idle or slow client cannot hold a connection slot for long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (out of descriptors, say) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves HTTP (or HTTPS with `tls`) on `listener` until cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PEER_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accepting a peer connection: {e}; pausing {ACCEPT_BACKOFF:?}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Headers and body go out in separate writes: without this, Nagle's algorithm
        // holds the body until the client's delayed ACK (40 ms per small response).
        let _ = stream.set_nodelay(true);
        let (shared, tls) = (shared.clone(), tls.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(stream, shared).await,
                Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => serve_connection(stream, shared).await,
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
        });
    }
}

async fn serve_connection<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(stream: S, shared: Arc<Shared>) {
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, std::convert::Infallible>(route(req, shared).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
        .await;
}

async fn route(req: Request<hyper::body::Incoming>, shared: Arc<Shared>) -> Response<Body> {
    if !authorized(&req, &shared.cluster_token) {
        return json_error(StatusCode::UNAUTHORIZED, "a valid cluster token is required (Authorization: Bearer ...)");
    }
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, p) if p.starts_with("/content/") => content(&shared, &p["/content/".len()..]).await,
        (&Method::GET, "/status") => full(StatusCode::OK, "application/json", serde_json::to_vec(&shared.status()).unwrap_or_default()),
        (&Method::GET, "/metrics") => full(StatusCode::OK, crate::node::METRICS_CONTENT_TYPE, shared.metrics.render(&shared)),
        (&Method::POST, "/sync") => match shared.sync_now(Duration::from_secs(120)).await {
            Ok(report) => full(StatusCode::OK, "application/json", serde_json::to_vec(&report).unwrap_or_default()),
            Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}")),
        },
        (_, "/status" | "/metrics" | "/sync") => json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => json_error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

async fn content(shared: &Shared, hash: &str) -> Response<Body> {
    let Ok(hash) = hash.parse::<ContentHash>() else {
        return json_error(StatusCode::BAD_REQUEST, "malformed content hash: expected 64 lowercase hex digits");
    };
    let file = match tokio::fs::File::open(shared.tree.store().blob_path(&hash)).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return json_error(StatusCode::NOT_FOUND, "this node does not hold that content"),
        Err(e) => {
            tracing::warn!("opening blob {hash}: {e}");
            return json_error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the content");
        }
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    shared.metrics.bytes_served.inc_by(len);
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map_ok(Frame::data);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .header("content-length", len)
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("static response parts are valid")
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
