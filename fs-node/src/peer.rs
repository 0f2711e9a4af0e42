//! The peer HTTP server every node runs: contents by hash for other nodes; status, sync
//! and metrics for `syncctl` and operators. (Pulling from other nodes is `puller`.)

use crate::status::Reporter;
use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;
use std::time::Duration;
use wire::ContentHash;

type Body = BoxBody<Bytes, std::io::Error>;

/// A client that has not finished its TLS handshake by then is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    reporter: Arc<Reporter>,
    token: Option<String>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let shared = Arc::new(Served { reporter, token });
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

/// What the server serves from: the node's reporter (tree, link, metrics) and the
/// cluster token every request must carry (when set).
struct Served {
    reporter: Arc<Reporter>,
    token: Option<String>,
}

async fn serve_connection<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(stream: S, shared: Arc<Served>) {
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

async fn route(req: Request<hyper::body::Incoming>, shared: Arc<Served>) -> Response<Body> {
    if !authorized(&req, &shared.token) {
        return json_error(StatusCode::UNAUTHORIZED, "a valid cluster token is required (Authorization: Bearer ...)");
    }
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, p) if p.starts_with("/content/") => content(&shared.reporter, &p["/content/".len()..]).await,
        (&Method::GET, "/status") => full(StatusCode::OK, "application/json", serde_json::to_vec(&shared.reporter.status()).unwrap_or_default()),
        (&Method::GET, "/metrics") => full(StatusCode::OK, crate::metrics::METRICS_CONTENT_TYPE, shared.reporter.metrics_text()),
        (&Method::POST, "/sync") => match shared.reporter.link.sync_now(Duration::from_secs(120)).await {
            Ok(report) => full(StatusCode::OK, "application/json", serde_json::to_vec(&report).unwrap_or_default()),
            Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}")),
        },
        (_, "/status" | "/metrics" | "/sync") => json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => json_error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

async fn content(shared: &Reporter, hash: &str) -> Response<Body> {
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
