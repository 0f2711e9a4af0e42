//! Peer HTTP: the server every node runs (contents by hash for other nodes; status, sync
//! and metrics for `syncctl` and operators) and the client that pulls contents from
//! holders, verifying each byte stream against its hash before it enters the store.

use crate::node::Shared;
use crate::store::ContentStore;
use anyhow::{bail, Context};
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{any, get, post, MethodRouter};
use axum::Router;
use bytes::Bytes;
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
/// A client that has not finished its TLS handshake by then is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts over all holders before a pull is reported failed (a later sync retries).
const PULL_ROUNDS: usize = 3;

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response {
    Response::builder().status(status).header("content-type", content_type).body(Body::from(body.into())).expect("static response parts are valid")
}

fn json_error(status: StatusCode, msg: &str) -> Response {
    full(status, "application/json", serde_json::json!({ "error": msg }).to_string())
}

fn authorized(req: &Request, token: &Option<String>) -> bool {
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

/// The peer server's limits for the shared accept loop. On shutdown the server stops
/// accepting and open connections are left to end by themselves: the node unmounts
/// first and its runtime stops soon after, so there is nothing to drain for.
const LIMITS: http_serve::Limits = http_serve::Limits {
    max_connections: MAX_PEER_CONNECTIONS,
    header_read_timeout: HEADER_READ_TIMEOUT,
    tls_handshake_timeout: TLS_HANDSHAKE_TIMEOUT,
    accept_backoff: ACCEPT_BACKOFF,
    shutdown_grace: None,
};

/// Serves HTTP (or HTTPS with `tls`) on `listener` until cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    cancel: tokio_util::sync::CancellationToken,
) {
    http_serve::serve(listener, tls, router(shared), LIMITS, cancel).await
}

/// The peer server's routes. Every request needs the cluster token (when the node has
/// one), unknown paths included; a known path asked with another method is a 405.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        // Any method reaches `content`, which serves GET alone: other methods on a content
        // path were never a route (404), and HEAD must not count as bytes served.
        .route("/content/{*hash}", any(content))
        // An empty hash is a malformed one (400), as any other path below /content/.
        .route("/content/", any(content))
        .route("/status", only(Method::GET, get(status)))
        .route("/metrics", only(Method::GET, get(metrics)))
        .route("/sync", only(Method::POST, post(sync)))
        .fallback(no_such_endpoint)
        .layer(axum::middleware::from_fn_with_state(shared.clone(), require_token))
        .with_state(shared)
}

/// `route` answers its method; any other (HEAD too, which axum would give to a GET
/// route) is a 405.
fn only(method: Method, route: MethodRouter<Arc<Shared>>) -> MethodRouter<Arc<Shared>> {
    let allow = HeaderValue::from_str(method.as_str()).expect("a method is a valid header value");
    let refuse = move || {
        let allow = allow.clone();
        async move {
            let mut r = json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            r.headers_mut().insert(header::ALLOW, allow);
            r
        }
    };
    let route = if method == Method::HEAD { route } else { route.head(refuse.clone()) };
    route.fallback(refuse)
}

async fn require_token(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if !authorized(&req, &shared.cluster_token) {
        return json_error(StatusCode::UNAUTHORIZED, "a valid cluster token is required (Authorization: Bearer ...)");
    }
    next.run(req).await
}

async fn no_such_endpoint() -> Response {
    json_error(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    full(StatusCode::OK, "application/json", serde_json::to_vec(&shared.status()).unwrap_or_default())
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    full(StatusCode::OK, crate::node::METRICS_CONTENT_TYPE, shared.metrics.render(&shared))
}

async fn sync(State(shared): State<Arc<Shared>>) -> Response {
    match shared.sync_now(Duration::from_secs(120)).await {
        Ok(report) => full(StatusCode::OK, "application/json", serde_json::to_vec(&report).unwrap_or_default()),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}")),
    }
}

async fn content(State(shared): State<Arc<Shared>>, method: Method, hash: Result<UrlPath<String>, PathRejection>) -> Response {
    if method != Method::GET {
        return no_such_endpoint().await;
    }
    let Some(hash) = hash.ok().and_then(|UrlPath(h)| h.parse::<ContentHash>().ok()) else {
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
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .header("content-length", len)
        .body(Body::from_stream(stream))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Db;
    use crate::node::Metrics;
    use crate::tree::Tree;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::{Mutex, OnceLock};
    use tower::ServiceExt;

    const TOKEN: &str = "cluster-secret";

    fn shared(data: &Path) -> Arc<Shared> {
        let store = ContentStore::open(data).unwrap();
        let tree = Arc::new(Tree::load(Db::open(&data.join("node.db")).unwrap(), store).unwrap());
        let (sync_requests, _) = tokio::sync::mpsc::channel(1);
        Arc::new(Shared {
            id: "n1".parse().unwrap(),
            mount: data.join("mnt"),
            url: "http://127.0.0.1:1".into(),
            tree,
            cluster_token: Some(TOKEN.into()),
            connected: AtomicBool::new(false),
            pulls_in_progress: AtomicU64::new(0),
            allow_setid: false,
            metrics: Metrics::default(),
            notifier: OnceLock::new(),
            passthrough: Arc::new(AtomicBool::new(false)),
            last_sync: Mutex::new(None),
            sync_requests,
        })
    }

    async fn call(router: &Router, method: &str, uri: &str, token: Option<&str>) -> (StatusCode, axum::http::HeaderMap, Bytes) {
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = router.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        let (parts, body) = resp.into_parts();
        (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
    }

    #[tokio::test]
    async fn token_routes_methods_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path());
        let router = router(shared.clone());
        let bytes = b"served bytes";
        let hash = ContentHash::from_bytes(*blake3::hash(bytes).as_bytes());
        let (tmp, mut f) = shared.tree.store().tmp_file().unwrap();
        f.write_all(bytes).unwrap();
        shared.tree.store().install(&tmp, &hash).unwrap();
        let content = format!("/content/{hash}");

        // The token is needed everywhere, unknown paths included.
        for (path, token) in [(content.as_str(), None), ("/status", Some("wrong")), ("/no/such/thing", None)] {
            let (status, _, body) = call(&router, "GET", path, token).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
            assert_eq!(&body[..], br#"{"error":"a valid cluster token is required (Authorization: Bearer ...)"}"#);
        }

        let (status, headers, body) = call(&router, "GET", &content, Some(TOKEN)).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &bytes[..]));
        assert_eq!(
            (&headers["content-length"], &headers["content-type"]),
            (&HeaderValue::from(bytes.len()), &HeaderValue::from_static("application/octet-stream"))
        );
        assert_eq!(shared.metrics.bytes_served.get(), bytes.len() as u64);

        for (method, path, expected) in [
            ("GET", format!("/content/{}", "0".repeat(64)), StatusCode::NOT_FOUND),
            ("GET", "/content/..%2F..%2Fnode.db".to_string(), StatusCode::BAD_REQUEST),
            ("GET", "/content/a/b".to_string(), StatusCode::BAD_REQUEST),
            ("GET", "/content/".to_string(), StatusCode::BAD_REQUEST),
            ("HEAD", content.clone(), StatusCode::NOT_FOUND),
            ("POST", content.clone(), StatusCode::NOT_FOUND),
            ("GET", "/content".to_string(), StatusCode::NOT_FOUND),
            ("GET", "/nope".to_string(), StatusCode::NOT_FOUND),
            ("GET", "/status".to_string(), StatusCode::OK),
            ("GET", "/metrics".to_string(), StatusCode::OK),
            ("POST", "/sync".to_string(), StatusCode::SERVICE_UNAVAILABLE),
            ("POST", "/status".to_string(), StatusCode::METHOD_NOT_ALLOWED),
            ("HEAD", "/metrics".to_string(), StatusCode::METHOD_NOT_ALLOWED),
            ("GET", "/sync".to_string(), StatusCode::METHOD_NOT_ALLOWED),
        ] {
            let (status, headers, body) = call(&router, method, &path, Some(TOKEN)).await;
            assert_eq!(status, expected, "{method} {path}: {}", String::from_utf8_lossy(&body));
            if status != StatusCode::OK && method != "HEAD" {
                assert_eq!(headers["content-type"], "application/json", "{method} {path}");
                assert!(body.starts_with(br#"{"error":""#), "{method} {path}");
            }
            if status == StatusCode::METHOD_NOT_ALLOWED {
                assert_eq!(headers["allow"], if path == "/sync" { "POST" } else { "GET" });
            } else {
                assert!(!headers.contains_key("allow"), "{method} {path}");
            }
        }
        // Only the GET above counted.
        assert_eq!(shared.metrics.bytes_served.get(), bytes.len() as u64);
    }
}
