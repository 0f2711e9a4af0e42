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
use std::sync::atomic::Ordering;
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
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
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

/// Serves HTTP (or HTTPS with `tls`) on `listener` until cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accepting an HTTP connection: {e}");
                    continue;
                }
            },
        };
        // Headers and body go out in separate writes: without this, Nagle's algorithm
        // holds the body until the client's delayed ACK (40 ms per small response).
        let _ = stream.set_nodelay(true);
        let (shared, tls) = (shared.clone(), tls.clone());
        tokio::spawn(async move {
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
    let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
}

async fn route(req: Request<hyper::body::Incoming>, shared: Arc<Shared>) -> Response<Body> {
    if !authorized(&req, &shared.cluster_token) {
        return json_error(StatusCode::UNAUTHORIZED, "a valid cluster token is required (Authorization: Bearer ...)");
    }
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, p) if p.starts_with("/content/") => content(&shared, &p["/content/".len()..]).await,
        (&Method::GET, "/status") => full(StatusCode::OK, "application/json", serde_json::to_vec(&shared.status()).unwrap_or_default()),
        (&Method::GET, "/metrics") => full(StatusCode::OK, "text/plain; version=0.0.4", shared.metrics.render(&shared)),
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
    shared.metrics.bytes_served.fetch_add(len, Ordering::Relaxed);
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

/// Pulls contents from holders into the store.
#[derive(Clone)]
pub struct Puller {
    client: reqwest::Client,
    store: ContentStore,
    me: NodeId,
    token: Option<String>,
    limit: Arc<tokio::sync::Semaphore>,
}

impl Puller {
    pub fn new(client: reqwest::Client, store: ContentStore, me: NodeId, token: Option<String>) -> Puller {
        Puller { client, store, me, token, limit: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_PULLS)) }
    }

    /// Makes `hash` present in the store, trying each holder in turn (a few rounds).
    /// Returns the number of bytes transferred (0 if it was already there).
    pub async fn pull(&self, hash: &ContentHash, holders: &[Holder]) -> anyhow::Result<u64> {
        if self.store.has(hash) {
            return Ok(0);
        }
        let _permit = self.limit.acquire().await.context("pull limiter closed")?;
        let others: Vec<&Holder> = holders.iter().filter(|h| h.node != self.me).collect();
        if others.is_empty() {
            bail!("no other node holds {hash}");
        }
        let mut last = None;
        for round in 0..PULL_ROUNDS {
            for h in &others {
                if self.store.has(hash) {
                    return Ok(0);
                }
                match self.pull_from(hash, h).await {
                    Ok(n) => return Ok(n),
                    Err(e) => {
                        tracing::debug!("pull of {hash} from {} failed: {e:#}", h.node);
                        last = Some(e);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200 * (round as u64 + 1))).await;
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no holder answered")).context(format!("pulling {hash}")))
    }

    async fn pull_from(&self, hash: &ContentHash, holder: &Holder) -> anyhow::Result<u64> {
        let url = format!("{}/content/{}", holder.url.trim_end_matches('/'), hash);
        let mut req = self.client.get(&url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.with_context(|| format!("asking {} for {hash}", holder.node))?;
        if !resp.status().is_success() {
            bail!("{} answered {} for {hash}", holder.node, resp.status());
        }
        let (tmp, mut file) = self.store.tmp_file().context("creating a download file")?;
        let result = async {
            let mut hasher = blake3::Hasher::new();
            let mut n = 0u64;
            let mut started_writeback = 0u64;
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.try_next().await.with_context(|| format!("receiving {hash} from {}", holder.node))? {
                hasher.update(&chunk);
                file.write_all(&chunk).context("writing a download")?;
                n += chunk.len() as u64;
                if n - started_writeback >= WRITEBACK_EVERY {
                    start_writeback(&file, started_writeback, n - started_writeback);
                    started_writeback = n;
                }
            }
            let got = ContentHash::from_bytes(*hasher.finalize().as_bytes());
            if &got != hash {
                bail!("{} sent bytes that hash to {got}, not {hash}: thrown away", holder.node);
            }
            let t = std::time::Instant::now();
            file.sync_data().context("flushing a download to disk")?;
            tracing::debug!(target: "timing", "pulled {n} bytes of {hash}; sync_data took {:?}", t.elapsed());
            self.store.install(&tmp, hash).context("installing a download")?;
            Ok(n)
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}
