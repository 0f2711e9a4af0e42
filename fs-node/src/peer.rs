//! The peer HTTP server every node runs: contents by hash for other nodes; status, sync
//! and metrics for `syncctl` and operators. (Pulling from other nodes is `puller`.)

use crate::status::Reporter;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path as UrlPath, RawQuery, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{any, get, post, MethodRouter};
use axum::Router;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use wire::ContentHash;

/// A client that has not finished its TLS handshake by then is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Peer connections served at once; more wait in the kernel's accept queue. Far below
/// the descriptor limit, so FUSE opens in the same process never run out.
pub const MAX_PEER_CONNECTIONS: usize = 512;
/// A client must send a request's headers within this, also on an idle kept-alive
/// connection: an idle or slow client cannot hold a connection slot for long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A client that takes nothing of an answer for this long loses its connection: a peer
/// that asks for a large content and stops reading cannot hold a slot (a puller gives
/// up on a holder after 15 s without progress, so a live one never waits this long).
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause after a failed accept (out of descriptors, say) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The peer server's limits for the shared accept loop. On shutdown the server stops
/// accepting and open connections are left to end by themselves: the node unmounts
/// first and its runtime stops soon after, so there is nothing to drain for.
pub(crate) const LIMITS: http_serve::Limits = http_serve::Limits {
    max_connections: MAX_PEER_CONNECTIONS,
    header_read_timeout: HEADER_READ_TIMEOUT,
    tls_handshake_timeout: TLS_HANDSHAKE_TIMEOUT,
    write_stall_timeout: WRITE_STALL_TIMEOUT,
    accept_backoff: ACCEPT_BACKOFF,
    shutdown_grace: None,
};

/// Serves HTTP (or HTTPS with `tls`) on `listener` until cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    reporter: Arc<Reporter>,
    token: Option<String>,
    cancel: tokio_util::sync::CancellationToken,
) {
    http_serve::serve(listener, tls, router(reporter, token), LIMITS, cancel).await
}

/// What the server serves from: the node's reporter (tree, link, metrics) and the
/// cluster token every request must carry (when set).
struct Served {
    reporter: Arc<Reporter>,
    token: Option<String>,
}

/// The peer server's routes. Every request needs the cluster token (when the node has
/// one), unknown paths included; a known path asked with another method is a 405.
pub fn router(reporter: Arc<Reporter>, token: Option<String>) -> Router {
    let served = Arc::new(Served { reporter, token });
    Router::new()
        // Any method reaches `content`, which serves GET alone: other methods on a content
        // path were never a route (404), and HEAD must not count as bytes served.
        .route("/content/{*hash}", any(content))
        // An empty hash is a malformed one (400), as any other path below /content/.
        .route("/content/", any(content))
        .route("/small", only(Method::POST, post(small_batch)))
        .route("/chunks/{hash}", only(Method::GET, get(chunks)))
        .route("/leaves/{hash}", only(Method::GET, get(leaves)))
        .route("/status", only(Method::GET, get(status)))
        .route("/status/brief", only(Method::GET, get(brief_status)))
        .route("/ignored", only(Method::GET, get(ignored)))
        .route("/metrics", only(Method::GET, get(metrics)))
        .route("/sync", only(Method::POST, post(sync)))
        .route("/ask", only(Method::POST, post(ask)))
        .route("/pin", only(Method::POST, post(pin)))
        .fallback(no_such_endpoint)
        .layer(axum::middleware::from_fn_with_state(served.clone(), require_token))
        .with_state(served)
}

/// `route` answers its method; any other (HEAD too, which axum would give to a GET
/// route) is a 405.
fn only(method: Method, route: MethodRouter<Arc<Served>>) -> MethodRouter<Arc<Served>> {
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

async fn require_token(State(served): State<Arc<Served>>, req: Request, next: Next) -> Response {
    if !authorized(&req, &served.token) {
        return json_error(StatusCode::UNAUTHORIZED, "a valid cluster token is required (Authorization: Bearer ...)");
    }
    next.run(req).await
}

async fn no_such_endpoint() -> Response {
    json_error(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn status(State(served): State<Arc<Served>>) -> Response {
    full(StatusCode::OK, "application/json", serde_json::to_vec(&served.reporter.status()).unwrap_or_default())
}

async fn brief_status(State(served): State<Arc<Served>>) -> Response {
    full(StatusCode::OK, "application/json", serde_json::to_vec(&served.reporter.brief()).unwrap_or_default())
}

/// Every path the node ignores, as a JSON list of paths relative to the mount.
async fn ignored(State(served): State<Arc<Served>>) -> Response {
    let paths: Vec<String> = served.reporter.tree.ignored().iter().map(|p| p.to_string()).collect();
    full(StatusCode::OK, "application/json", serde_json::to_vec(&paths).unwrap_or_default())
}

async fn metrics(State(served): State<Arc<Served>>) -> Response {
    full(StatusCode::OK, crate::metrics::METRICS_CONTENT_TYPE, served.reporter.metrics_text())
}

async fn sync(State(served): State<Arc<Served>>) -> Response {
    match served.reporter.link.sync_now().await {
        Ok(report) => full(StatusCode::OK, "application/json", serde_json::to_vec(&report).unwrap_or_default()),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}")),
    }
}

/// Longest question `POST /ask` takes (a query names at most three paths).
const MAX_ASK_BYTES: usize = 64 << 10;

/// A question for the manager (kept versions, the trash, a restore: `wire::Query` as
/// JSON), relayed over the broker; answers `wire::Answer`. A restore that does not say
/// which revision of the path its asker saw is taken as asked from this node: the
/// revision this node has (so a newer edit that reached the manager is never
/// overwritten).
async fn ask(State(served): State<Arc<Served>>, body: Bytes) -> Response {
    if body.len() > MAX_ASK_BYTES {
        return json_error(StatusCode::PAYLOAD_TOO_LARGE, &format!("a question is at most {MAX_ASK_BYTES} bytes"));
    }
    let mut query: wire::Query = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("not a question: {e}")),
    };
    if let wire::Query::Restore { path, base: base @ None, .. } = &mut query {
        let rev = served.reporter.tree.revision_of(path);
        if rev.0 > 0 {
            *base = Some(rev);
        }
    }
    match served.reporter.link.ask(query, Duration::from_secs(30)).await {
        Ok(answer) => full(StatusCode::OK, "application/json", serde_json::to_vec(&answer).unwrap_or_default()),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}")),
    }
}

/// What `POST /pin` takes: a path in the tree ("" for all of it) and its rule (true:
/// keep local, false: on demand, absent: remove the rule).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PinRequest {
    path: String,
    pinned: Option<bool>,
}

/// Sets a pin rule (`syncctl pin` / `unpin`); answers how many files are being fetched.
async fn pin(State(served): State<Arc<Served>>, body: Bytes) -> Response {
    if body.len() > MAX_ASK_BYTES {
        return json_error(StatusCode::PAYLOAD_TOO_LARGE, &format!("a pin request is at most {MAX_ASK_BYTES} bytes"));
    }
    let req: PinRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("not a pin request: {e}")),
    };
    let r = &served.reporter;
    let (tree, fetcher) = (r.tree.clone(), r.fetcher.clone());
    let done = tokio::task::spawn_blocking(move || fetcher.pin(&tree, &req.path, req.pinned)).await;
    match done {
        Ok(Ok(n)) => full(StatusCode::OK, "application/json", serde_json::json!({ "fetching": n }).to_string()),
        Ok(Err(crate::tree::FsError::Invalid)) => json_error(StatusCode::BAD_REQUEST, "not a path in the tree"),
        Ok(Err(e)) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}")),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}")),
    }
}

/// The chunk list of a content this node holds (`chunks.rs`), as JSON. With the query
/// `?cached`, only a list made already (else 404 "not chunked yet"): a puller that only
/// wants to know whether it has chunks of the content elsewhere does not wait for it.
async fn chunks(State(served): State<Arc<Served>>, hash: Result<UrlPath<String>, PathRejection>, RawQuery(query): RawQuery) -> Response {
    // Chunking a large blob not chunked before reads and hashes all of it: a few at a
    // time, whatever many peers ask at once.
    static CHUNKING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    fn as_json(list: crate::chunks::ChunkList) -> (&'static str, Vec<u8>) {
        ("application/json", serde_json::to_vec(&list.to_json()).unwrap_or_default())
    }
    if query.as_deref() == Some("cached") {
        static READING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(8);
        return from_blob(&served, hash, &READING, "reading a chunk list", |store, h| {
            store.cached_chunk_list(h).map(as_json).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::WouldBlock, "not chunked yet"))
        })
        .await;
    }
    from_blob(&served, hash, &CHUNKING, "chunking a blob", |store, h| Ok(as_json(store.chunk_list(h)?))).await
}

/// The leaves of a content this node holds (`leaves.rs`: 32 bytes per 64 KiB block),
/// for a node that streams it and checks each block as it comes.
async fn leaves(State(served): State<Arc<Served>>, hash: Result<UrlPath<String>, PathRejection>) -> Response {
    // Leaves not cached yet cost a read of the whole blob: a few at a time.
    static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    from_blob(&served, hash, &HASHING, "the leaves of a blob", |store, h| Ok(("application/octet-stream", crate::leaves::to_bytes(&store.leaves(h)?)))).await
}

/// What a peer endpoint computes from a blob: the answer's content type and body.
type FromBlob = fn(&crate::store::ContentStore, &ContentHash) -> std::io::Result<(&'static str, Vec<u8>)>;

/// What `make` computes from a content this node holds (a pass over the blob, at most
/// as many at once as `limit` lets through), as the answer's type and body; 400 for a
/// malformed hash, 404 for a content this node does not hold.
async fn from_blob(
    served: &Served,
    hash: Result<UrlPath<String>, PathRejection>,
    limit: &'static tokio::sync::Semaphore,
    what: &'static str,
    make: FromBlob,
) -> Response {
    let Some(hash) = hash.ok().and_then(|UrlPath(h)| h.parse::<ContentHash>().ok()) else {
        return json_error(StatusCode::BAD_REQUEST, "malformed content hash: expected 64 lowercase hex digits");
    };
    let store = served.reporter.tree.store().clone();
    if !store.has(&hash) {
        return json_error(StatusCode::NOT_FOUND, "this node does not hold that content");
    }
    let Ok(_permit) = limit.acquire().await else {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    match tokio::task::spawn_blocking(move || make(&store, &hash)).await {
        Ok(Ok((content_type, body))) => {
            served.reporter.metrics.index_bytes_served.inc_by(body.len() as u64);
            full(StatusCode::OK, content_type, body)
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => json_error(StatusCode::NOT_FOUND, "this node does not hold that content"),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => json_error(StatusCode::NOT_FOUND, &e.to_string()),
        other => {
            tracing::warn!("{what}: {:?}", other.map(|r| r.map(|_| ())));
            json_error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the content")
        }
    }
}

/// `Range: bytes=FIRST-LAST` (one range, both ends given), as (first, length) within a
/// content of `len` bytes; `None` without such a header; `Err` for one that cannot be met.
fn byte_range(headers: &axum::http::HeaderMap, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = headers.get(header::RANGE) else { return Ok(None) };
    let spec = v.to_str().map_err(drop)?.strip_prefix("bytes=").ok_or(())?;
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (first, last): (u64, u64) = (a.trim().parse().map_err(drop)?, b.trim().parse().map_err(drop)?);
    if first > last || last >= len {
        return Err(());
    }
    Ok(Some((first, last - first + 1)))
}

/// `POST /small`: several small contents in one answer (a node pulling a burst of
/// small files asks once instead of once per file). The body is the contents' 32-byte
/// hashes, one after the other, at most `SMALL_BATCH_MAX`; the answer gives each in
/// order, its length (4 bytes, big-endian) then its bytes, or `SMALL_ABSENT` alone for
/// one this node does not keep as a small content or that would take the answer past
/// `SMALL_BATCH_BYTES` (docs/protocol.md).
async fn small_batch(State(served): State<Arc<Served>>, body: Bytes) -> Response {
    use crate::puller::{SMALL_ABSENT, SMALL_BATCH_BYTES, SMALL_BATCH_MAX, SMALL_LEN_BYTES};
    if body.is_empty() || !body.len().is_multiple_of(32) || body.len() / 32 > SMALL_BATCH_MAX {
        return json_error(StatusCode::BAD_REQUEST, &format!("expected 1 to {SMALL_BATCH_MAX} content hashes of 32 bytes each, one after the other"));
    }
    let hashes: Vec<ContentHash> = body.chunks_exact(32).map(|c| ContentHash::from_bytes(c.try_into().expect("32 bytes"))).collect();
    // Each answer holds up to twice its 4 MiB while it is made: a few at once.
    static ANSWERING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
    let Ok(_permit) = ANSWERING.acquire().await else {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    let store = served.reporter.tree.store().clone();
    let found = tokio::task::spawn_blocking(move || store.small_many(&hashes, SMALL_BATCH_BYTES)).await.map_err(std::io::Error::other).and_then(|r| r);
    let found = match found {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!("reading a batch of small contents: {e}");
            return json_error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the contents");
        }
    };
    let n: usize = found.iter().map(|b| b.as_ref().map_or(0, Vec::len)).sum();
    let mut out = Vec::with_capacity(n + found.len() * SMALL_LEN_BYTES);
    for bytes in &found {
        match bytes {
            Some(b) => {
                out.extend_from_slice(&(b.len() as u32).to_be_bytes());
                out.extend_from_slice(b);
            }
            None => out.extend_from_slice(&SMALL_ABSENT.to_be_bytes()),
        }
    }
    served.reporter.metrics.bytes_served.inc_by(n as u64);
    full(StatusCode::OK, "application/octet-stream", out)
}

/// Where a content served is read from.
enum Source {
    /// A small content's bytes (`small.rs`).
    Small(Vec<u8>),
    File(tokio::fs::File),
    /// A content kept as a patch (`patched.rs`): read a piece at a time.
    Patched(Arc<crate::patched::ContentFile>),
}

/// How much of a patched content is read into memory at a time to serve it.
const PATCHED_PIECE: u64 = 1 << 20;

async fn content(State(served): State<Arc<Served>>, method: Method, headers: axum::http::HeaderMap, hash: Result<UrlPath<String>, PathRejection>) -> Response {
    if method != Method::GET {
        return no_such_endpoint().await;
    }
    let Some(hash) = hash.ok().and_then(|UrlPath(h)| h.parse::<ContentHash>().ok()) else {
        return json_error(StatusCode::BAD_REQUEST, "malformed content hash: expected 64 lowercase hex digits");
    };
    let reporter = &served.reporter;
    // A small content is a row (`small.rs`): read at once, no file to open.
    let small = match reporter.tree.store().small_bytes(&hash) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("reading small content {hash}: {e}");
            return json_error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the content");
        }
    };
    let store = reporter.tree.store().clone();
    let source = match small {
        Some(bytes) => Source::Small(bytes),
        None => match tokio::fs::File::open(store.blob_path(&hash)).await {
            Ok(f) => Source::File(f),
            // Not a blob file: a patched content, or one written out just now.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (s, h) = (store.clone(), hash.clone());
                match tokio::task::spawn_blocking(move || s.open_content(&h)).await.map_err(std::io::Error::other).and_then(|r| r) {
                    Ok(crate::patched::ContentFile::Whole(f)) => Source::File(tokio::fs::File::from_std(f)),
                    Ok(c) => Source::Patched(Arc::new(c)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return json_error(StatusCode::NOT_FOUND, "this node does not hold that content"),
                    Err(e) => {
                        tracing::warn!("opening content {hash}: {e}");
                        return json_error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the content");
                    }
                }
            }
            Err(e) => {
                tracing::warn!("opening blob {hash}: {e}");
                return json_error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the content");
            }
        },
    };
    let len = match &source {
        Source::Small(b) => b.len() as u64,
        Source::File(f) => f.metadata().await.map(|m| m.len()).unwrap_or(0),
        Source::Patched(c) => c.size().unwrap_or(0),
    };
    let range = match byte_range(&headers, len) {
        Ok(r) => r,
        Err(()) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header("content-range", format!("bytes */{len}"))
                .header("content-type", "application/json")
                .body(Body::from(serde_json::json!({"error": "one range `bytes=FIRST-LAST` within the content"}).to_string()))
                .expect("static response parts are valid")
        }
    };
    let (status, first, n) = match range {
        Some((first, n)) => (StatusCode::PARTIAL_CONTENT, first, n),
        None => (StatusCode::OK, 0, len),
    };
    let body = match source {
        Source::Small(mut bytes) => {
            bytes.truncate((first + n) as usize);
            bytes.drain(..first as usize);
            Body::from(bytes)
        }
        Source::File(mut file) => {
            if first > 0 {
                use tokio::io::AsyncSeekExt;
                if let Err(e) = file.seek(std::io::SeekFrom::Start(first)).await {
                    tracing::warn!("seeking in blob {hash}: {e}");
                    return json_error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the content");
                }
            }
            use tokio::io::AsyncReadExt;
            Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file.take(n), 256 * 1024))
        }
        Source::Patched(c) => {
            // Read a piece at a time (never written out whole for a peer: that would undo
            // what keeping it as a patch saves); the first piece before the answer, so
            // that a content that cannot be read is a 500, not a cut-off body.
            let read_piece = |c: Arc<crate::patched::ContentFile>, at: u64, len: u64| async move {
                tokio::task::spawn_blocking(move || -> std::io::Result<Bytes> {
                    let mut bytes = vec![0u8; len as usize];
                    let got = c.read_full_at(&mut bytes, at)?;
                    if got as u64 != len {
                        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the patched content ends early"));
                    }
                    Ok(Bytes::from(bytes))
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r)
            };
            let end = first + n;
            let first_len = n.min(PATCHED_PIECE);
            let head = match read_piece(c.clone(), first, first_len).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("reading patched content {hash}: {e}");
                    return json_error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the content");
                }
            };
            let rest = futures_util::stream::unfold(first + first_len, move |at| {
                let (c, hash) = (c.clone(), hash.clone());
                async move {
                    if at >= end {
                        return None;
                    }
                    let len = (end - at).min(PATCHED_PIECE);
                    match read_piece(c, at, len).await {
                        Ok(b) => Some((Ok(b), at + len)),
                        Err(e) => {
                            // The peer sees the body cut short, and takes the bytes elsewhere.
                            tracing::warn!("reading patched content {hash}: {e}");
                            Some((Err(e), end))
                        }
                    }
                }
            });
            Body::from_stream(futures_util::StreamExt::chain(futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(head) }), rest))
        }
    };
    reporter.metrics.bytes_served.inc_by(n);
    let mut resp = Response::builder().status(status).header("content-type", "application/octet-stream").header("content-length", n);
    if range.is_some() {
        resp = resp.header("content-range", format!("bytes {first}-{}/{len}", first + n - 1));
    }
    resp.body(body).expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Db;
    use crate::engine::NodeInfo;
    use crate::link::LinkTask;
    use crate::metrics::Metrics;
    use crate::puller::Puller;
    use crate::store::ContentStore;
    use crate::tree::Tree;
    use http_body_util::BodyExt;
    use std::io::Write;
    use std::path::Path;
    use std::sync::atomic::AtomicBool;
    use std::sync::OnceLock;
    use tower::ServiceExt;

    const TOKEN: &str = "cluster-secret";

    /// A reporter over a fresh tree and a broker link that never runs (so never connected).
    fn reporter(data: &Path) -> Arc<Reporter> {
        // Every content a blob file: the chunk lists below are made of files.
        reporter_with(ContentStore::open_with_small_max(data, 0).unwrap(), data)
    }

    fn reporter_with(store: ContentStore, data: &Path) -> Arc<Reporter> {
        let tree = Arc::new(Tree::load(Db::open(&data.join("node.db")).unwrap(), store.clone()).unwrap());
        let id: wire::NodeId = "n1".parse().unwrap();
        let url = "http://127.0.0.1:1".to_string();
        let metrics = Arc::new(Metrics::default());
        let puller = Puller::new(reqwest::Client::new(), store, id.clone(), None, Duration::from_secs(1), false);
        let info = NodeInfo { id: id.clone(), url: url.clone(), allow_setid: false, software: "test".into() };
        let fetcher = crate::fetch::Fetcher::new(puller.clone(), metrics.clone(), tokio::runtime::Handle::current());
        let (_task, link) = LinkTask::new("amqp://127.0.0.1:1".into(), info, tree.clone(), puller, metrics.clone(), Arc::new(OnceLock::new()));
        Arc::new(Reporter { id, mount: data.join("mnt"), url, tree, link, metrics, passthrough: Arc::new(AtomicBool::new(false)), fetcher })
    }

    async fn call(router: &Router, method: &str, uri: &str, token: Option<&str>) -> (StatusCode, axum::http::HeaderMap, Bytes) {
        call_with(router, method, uri, token, Vec::new()).await
    }

    async fn call_with(router: &Router, method: &str, uri: &str, token: Option<&str>, body: Vec<u8>) -> (StatusCode, axum::http::HeaderMap, Bytes) {
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = router.clone().oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
        let (parts, body) = resp.into_parts();
        (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
    }

    #[tokio::test]
    async fn token_routes_methods_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let reporter = reporter(dir.path());
        let router = router(reporter.clone(), Some(TOKEN.into()));
        let bytes = b"served bytes";
        let hash = ContentHash::from_bytes(*blake3::hash(bytes).as_bytes());
        let (tmp, mut f) = reporter.tree.store().tmp_file().unwrap();
        f.write_all(bytes).unwrap();
        reporter.tree.store().install(&tmp, &hash).unwrap();
        let content = format!("/content/{hash}");

        // The token is needed everywhere, unknown paths included.
        for (path, token) in [(content.as_str(), None), ("/status", Some("wrong")), ("/status/brief", None), ("/ignored", None), ("/no/such/thing", None)] {
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
        assert_eq!(reporter.metrics.bytes_served.get(), bytes.len() as u64);

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
            ("GET", "/status/brief".to_string(), StatusCode::OK),
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
        assert_eq!(reporter.metrics.bytes_served.get(), bytes.len() as u64);

        // A chunk list: `?cached` gives only one made already.
        let chunks = format!("/chunks/{hash}");
        let (status, _, body) = call(&router, "GET", &format!("{chunks}?cached"), Some(TOKEN)).await;
        assert_eq!((status, &body[..]), (StatusCode::NOT_FOUND, &br#"{"error":"not chunked yet"}"#[..]));
        let (status, _, made) = call(&router, "GET", &chunks, Some(TOKEN)).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, cached) = call(&router, "GET", &format!("{chunks}?cached"), Some(TOKEN)).await;
        assert_eq!((status, &cached), (StatusCode::OK, &made));
        let (status, _, _) = call(&router, "GET", &format!("/chunks/{}?cached", "0".repeat(64)), Some(TOKEN)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    /// `POST /small` answers each hash asked, in order: a small content's length and
    /// bytes, or "absent" for one it does not keep as a row; a body that is not 1 to
    /// SMALL_BATCH_MAX hashes is refused, and only the bytes sent count as served.
    #[tokio::test]
    async fn small_contents_are_served_several_in_one_answer() {
        use crate::puller::{SMALL_ABSENT, SMALL_BATCH_MAX};
        let dir = tempfile::tempdir().unwrap();
        let reporter = reporter_with(ContentStore::open(dir.path()).unwrap(), dir.path());
        let router = router(reporter.clone(), Some(TOKEN.into()));
        let store = reporter.tree.store();
        let contents: Vec<Vec<u8>> = vec![b"first small".to_vec(), vec![7u8; 5000]];
        let hashes: Vec<ContentHash> = contents.iter().map(|c| ContentHash::from_bytes(*blake3::hash(c).as_bytes())).collect();
        for (h, c) in hashes.iter().zip(&contents) {
            store.put_small(h, c).unwrap();
        }
        let missing = ContentHash::from_bytes([9; 32]);
        let ask: Vec<u8> = [&hashes[1], &missing, &hashes[0]].iter().flat_map(|h| *h.as_bytes()).collect();
        let (status, headers, body) = call_with(&router, "POST", "/small", Some(TOKEN), ask.clone()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "application/octet-stream");
        let mut expected = Vec::new();
        for part in [Some(&contents[1]), None, Some(&contents[0])] {
            match part {
                Some(c) => {
                    expected.extend_from_slice(&(c.len() as u32).to_be_bytes());
                    expected.extend_from_slice(c);
                }
                None => expected.extend_from_slice(&SMALL_ABSENT.to_be_bytes()),
            }
        }
        assert_eq!(&body[..], &expected[..]);
        assert_eq!(reporter.metrics.bytes_served.get(), (contents[0].len() + contents[1].len()) as u64);
        // What a puller makes of it: both contents, in the order asked.
        let wanted = vec![(hashes[1].clone(), 5000), (missing.clone(), 10), (hashes[0].clone(), contents[0].len() as u64)];
        let (taken, bad) = crate::puller::parse_small_batch(&body, &wanted);
        assert_eq!(bad, None);
        assert_eq!(taken, vec![(&hashes[1], &contents[1][..]), (&hashes[0], &contents[0][..])]);

        // The token, the method and the body's shape are checked.
        let (status, _, _) = call_with(&router, "POST", "/small", None, ask.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, headers, _) = call_with(&router, "GET", "/small", Some(TOKEN), Vec::new()).await;
        assert_eq!((status, &headers["allow"]), (StatusCode::METHOD_NOT_ALLOWED, &HeaderValue::from_static("POST")));
        for body in [Vec::new(), ask[..31].to_vec(), vec![1u8; 32 * (SMALL_BATCH_MAX + 1)]] {
            let (status, _, answer) = call_with(&router, "POST", "/small", Some(TOKEN), body.clone()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "a body of {} bytes", body.len());
            assert!(answer.starts_with(br#"{"error":""#));
        }
        assert_eq!(reporter.metrics.bytes_served.get(), (contents[0].len() + contents[1].len()) as u64);
    }
}
