//! The manager's HTTP front end: the REST API under `/api/`, its OpenAPI document, the
//! live dashboard at `/`, the server-sent event stream and Prometheus `/metrics`, over
//! plain HTTP or TLS (rustls).
//!
//! It reads the manager's database through `service::Handle` (on blocking threads) and
//! changes things only by queueing a message in the outbox (`request_sync`) or by calling
//! the provisioning module. It never talks to the broker, never decides about files and
//! never logs a token or a query string (which may carry one).
//!
//! Layout: `routes` (the route table, from which both the axum router here and the
//! OpenAPI document are built; the shared `http-serve` loop serves it), `handlers` (one
//! function per route), `queries`
//! (read-only SQL), `events` (live updates), `metrics`, `openapi`, `credentials` (the
//! cluster's secrets), `broker_user` (the cluster's RabbitMQ user); TLS files are read by the `tls-pem` crate.

pub mod broker_user;
pub mod credentials;
mod error;
mod events;
mod handlers;
pub mod metrics;
pub mod openapi;
mod provisioning;
mod queries;
pub mod routes;

use crate::service::{self, Handle};
use anyhow::Context;
use axum::body::Body;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{RawPathParams, Request};
use axum::http::header::{HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{MethodFilter, MethodRouter};
use bytes::Bytes;
use credentials::{Credentials, Secret};
use error::{ApiError, ApiResult};
use http_body_util::{BodyExt, Limited};
use routes::{Op, Route, ROUTES};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Address the HTTP server listens on unless told otherwise: local only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Largest request body: requests carry a few small JSON fields.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Open connections at once; more wait to be accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// A client has this long to send its request headers (slow clients cannot hold a
/// connection slot forever).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A TLS client has this long to finish the handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, requests in progress get this long to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// A client that takes nothing of an answer for this long loses its connection (a
/// browser tab left open keeps reading its event stream; a stuck client holds no slot).
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause after a failed accept (e.g. out of file descriptors) before the next one, so
/// the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The API's connection limits for the shared accept loop.
const LIMITS: http_serve::Limits = http_serve::Limits {
    max_connections: MAX_CONNECTIONS,
    header_read_timeout: HEADER_READ_TIMEOUT,
    tls_handshake_timeout: TLS_HANDSHAKE_TIMEOUT,
    write_stall_timeout: WRITE_STALL_TIMEOUT,
    accept_backoff: ACCEPT_BACKOFF,
    shutdown_grace: Some(SHUTDOWN_GRACE),
};

/// Where and how to serve.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// When false (the address is only the default), a failure to listen is logged and
    /// the manager runs without its HTTP front end instead of stopping: several managers
    /// on one machine (tests, say) must not all need port 8080.
    pub required: bool,
    /// PEM certificate chain and private key; plain HTTP without them.
    pub tls: Option<TlsFiles>,
    /// What provisioning requests need to know about this cluster.
    pub provision: ProvisionContext,
}

/// The cluster as node and VM creation see it.
#[derive(Clone, Debug, Default)]
pub struct ProvisionContext {
    /// Cluster name (labels and tags of what is created).
    pub cluster: String,
    /// Broker URL given to container nodes (they use the host's network).
    pub broker: String,
    /// The manager's database (the `vms` table).
    pub db: std::path::PathBuf,
    /// The token every node of this cluster requires from its peers; given to each node
    /// or VM the API creates (`run_manager` fills it in from the credentials file).
    pub cluster_token: Option<Secret>,
    /// Nodes created through the API get their own broker users (set when the manager
    /// requires node users).
    pub node_users: bool,
}

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config { listen: DEFAULT_LISTEN.parse().expect("valid default address"), required: false, tls: None, provision: ProvisionContext::default() }
    }
}

/// What every request handler can reach.
pub(crate) struct State {
    handle: Handle,
    pub(crate) provision: ProvisionContext,
    operator_token: Secret,
    hub: Arc<events::Hub>,
    cancel: CancellationToken,
    requests: AtomicU64,
}

/// A bound, not yet running, HTTP server.
pub struct Server {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handle: Handle,
    operator_token: Secret,
    provision: ProvisionContext,
}

impl Server {
    pub async fn bind(cfg: &Config, handle: Handle, operator_token: Secret) -> anyhow::Result<Server> {
        let tls = match &cfg.tls {
            Some(files) => Some(tls_pem::acceptor(&files.cert, &files.key)?),
            None => None,
        };
        let listener = http_serve::bind(cfg.listen).with_context(|| format!("listening on {} for the HTTP API", cfg.listen))?;
        Ok(Server { listener, tls, handle, operator_token, provision: cfg.provision.clone() })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listener.local_addr().context("reading the HTTP listener's address")
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Serves until `cancel`, then gives requests in progress [`SHUTDOWN_GRACE`].
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let hub = Arc::new(events::Hub::default());
        let state = Arc::new(State {
            handle: self.handle.clone(),
            provision: self.provision.clone(),
            operator_token: self.operator_token,
            hub: hub.clone(),
            cancel: cancel.clone(),
            requests: AtomicU64::new(0),
        });
        let tracker = TaskTracker::new();
        tracker.spawn(hub.run(self.handle, cancel.clone()));
        http_serve::serve(self.listener, self.tls, router(state), LIMITS, cancel).await;
        // The event poller stops on `cancel` too.
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
            tracing::warn!("the event poller still running after {SHUTDOWN_GRACE:?}; stopping anyway");
        }
        Ok(())
    }
}

/// Runs the manager: the broker loop and the HTTP server, sharing one store. The
/// cluster's credentials are created here on first start. When either part stops (an
/// error, or `cancel`), the other is stopped too.
pub async fn run_manager(cfg: service::Config, api: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    let handle = Handle::open(&cfg.db)?;
    handle.store.lock().unwrap_or_else(|p| p.into_inner()).set_retention(cfg.retention);
    let creds_path = credentials::path_for_db(&cfg.db);
    let (creds, created) = Credentials::load_or_create(&creds_path)?;
    if created {
        tracing::info!("created the cluster's credentials in {}; `manager credentials show` prints them", creds_path.display());
    }
    let mut api = api;
    api.provision.cluster_token = Some(creds.cluster_token.clone());
    let server = match Server::bind(&api, handle.clone(), creds.operator_token.clone()).await {
        Ok(server) => server,
        Err(e) if !api.required => {
            tracing::warn!("no dashboard or REST API: {e:#}; pass --http ADDR to choose another address");
            return service::run_with(cfg, handle, cancel).await;
        }
        Err(e) => return Err(e),
    };
    tracing::info!("dashboard and REST API on {}://{}/", server.scheme(), server.local_addr()?);
    let (broker, http) = tokio::join!(
        async {
            let r = service::run_with(cfg, handle, cancel.clone()).await;
            cancel.cancel();
            r
        },
        async {
            let r = server.run(cancel.clone()).await;
            cancel.cancel();
            r
        }
    );
    broker.and(http)
}

/// The API as an axum router built from [`ROUTES`], the table the OpenAPI document is
/// made from, so the two cannot disagree. Each path answers its table methods; any other
/// method (HEAD too, where only GET is listed) is a 405 with `Allow`, and a path not in
/// the table is a 404, both as JSON errors like every other failure.
fn router(state: Arc<State>) -> axum::Router {
    let mut paths: Vec<(&'static str, Vec<&'static Route>)> = Vec::new();
    for r in ROUTES {
        match paths.iter_mut().find(|(p, _)| *p == r.path) {
            Some((_, routes)) => routes.push(r),
            None => paths.push((r.path, vec![r])),
        }
    }
    let mut router = axum::Router::new();
    for (path, routes) in paths {
        let allowed: Arc<[&'static str]> = routes.iter().map(|r| r.method).collect();
        let refuse = move |req: Request| async move { error_response(ApiError::method_not_allowed(req.method().as_str(), &allowed)) };
        let mut methods = MethodRouter::new().fallback(refuse.clone());
        for route in routes {
            let state = state.clone();
            let method = Method::from_bytes(route.method.as_bytes()).ok().and_then(|m| MethodFilter::try_from(m).ok());
            let method = method.unwrap_or_else(|| panic!("{route:?}: not a method axum routes"));
            methods = methods.on(method, move |params: Result<RawPathParams, RawPathParamsRejection>, req: Request| async move {
                answer(&state, route, params, req).await.unwrap_or_else(error_response)
            });
        }
        // axum answers HEAD with the GET handler; the table lists no HEAD routes.
        methods = methods.on(MethodFilter::HEAD, refuse);
        router = router.route(path, methods);
    }
    router
        // axum lets a `{name}` segment be empty (`/api/nodes//sync`); no such path exists.
        .route_layer(axum::middleware::from_fn(|params: Result<RawPathParams, RawPathParamsRejection>, req: Request, next: Next| async move {
            match params {
                Ok(params) if params.iter().any(|(_, v)| v.is_empty()) => no_such_route(req).await,
                _ => next.run(req).await,
            }
        }))
        .fallback(no_such_route)
        .layer(axum::middleware::from_fn_with_state(state, count_and_log))
}

async fn no_such_route(req: Request) -> Response {
    error_response(ApiError::not_found(format!("no such route: {} (the routes are listed in /api/openapi.json)", req.uri().path())))
}

/// Counts every request (404s and 405s too) and logs it.
async fn count_and_log(axum::extract::State(state): axum::extract::State<Arc<State>>, req: Request, next: Next) -> Response {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let response = next.run(req).await;
    // The path only: a query string may carry the operator token.
    tracing::debug!(%method, %path, status = response.status().as_u16(), "HTTP request");
    response
}

/// A matched request, ready for its handler.
pub(crate) struct Call {
    /// Values of the route's `{name}` segments, in order.
    pub params: Vec<String>,
    pub query: Vec<(String, String)>,
    pub body: Bytes,
}

impl Call {
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Answers a request the router matched to `route`: query, token, path parameters,
/// body, then the handler.
async fn answer(state: &State, route: &'static Route, params: Result<RawPathParams, RawPathParamsRejection>, req: Request) -> ApiResult<Response> {
    let query = parse_query(route, req.uri().query())?;
    if !route.public {
        authorize(state, route, req.headers(), &query)?;
    }
    let params = params.map_err(|e| ApiError::bad_request(format!("malformed path: {e}")))?.iter().map(|(_, v)| v.to_string()).collect();
    let body = read_body(req).await?;
    handlers::dispatch(state, route.op, Call { params, query, body }).await
}

/// Decodes the query string; unknown or repeated parameters are refused, so a typo is
/// not silently ignored.
fn parse_query(route: &Route, raw: Option<&str>) -> ApiResult<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        if !route.query.iter().any(|p| p.name == k) {
            let known: Vec<&str> = route.query.iter().map(|p| p.name).collect();
            return Err(ApiError::bad_request(if known.is_empty() {
                format!("unknown query parameter {k:?}: {} {} takes none", route.method, route.path)
            } else {
                format!("unknown query parameter {k:?}: {} {} takes {}", route.method, route.path, known.join(", "))
            }));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(ApiError::bad_request(format!("query parameter {k:?} is given twice")));
        }
        out.push((k.into_owned(), v.into_owned()));
    }
    Ok(out)
}

/// Requires the operator token: `Authorization: Bearer <token>`, or for the event stream
/// (browsers' EventSource cannot set headers) `?token=`.
fn authorize(state: &State, route: &Route, headers: &HeaderMap, query: &[(String, String)]) -> ApiResult<()> {
    let header = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    let from_query = || {
        if route.op == Op::Events {
            query.iter().find(|(k, _)| k == "token").map(|(_, v)| v.as_str())
        } else {
            None
        }
    };
    match header.or_else(from_query) {
        Some(token) if state.operator_token.matches(token) => Ok(()),
        _ => Err(ApiError::unauthorized()),
    }
}

async fn read_body(req: Request) -> ApiResult<Bytes> {
    let too_large = || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body is larger than {MAX_BODY_BYTES} bytes"));
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(format!("reading the request body: {e}"))),
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Body::from(bytes.into())
}

fn with_type(status: StatusCode, content_type: &'static str, body: Body) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub(crate) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut text = value.to_string();
    text.push('\n');
    with_type(status, "application/json", full(text))
}

fn error_response(e: ApiError) -> Response {
    let mut r = json_response(e.status, &serde_json::json!({ "error": e.message }));
    if e.status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"sync-manager\""));
    }
    if let Some(allow) = e.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
        r.headers_mut().insert(ALLOW, allow);
    }
    r
}

/// The body of an event stream: what the stream's task sends, as it comes.
fn event_body(rx: mpsc::Receiver<Bytes>) -> Body {
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    const TOKEN: &str = "operator-secret";

    fn test_router(dir: &std::path::Path) -> axum::Router {
        let handle = Handle::open(&dir.join("m.db")).unwrap();
        let state = Arc::new(State {
            handle,
            provision: ProvisionContext::default(),
            operator_token: Secret::new(TOKEN),
            hub: Arc::new(events::Hub::default()),
            cancel: CancellationToken::new(),
            requests: AtomicU64::new(0),
        });
        router(state)
    }

    async fn call(router: &axum::Router, method: &str, uri: &str, token: Option<&str>, body: &str) -> (StatusCode, HeaderMap, String) {
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = router.clone().oneshot(req.body(Body::from(body.to_string())).unwrap()).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Every route of the table is routed (a token-less call reaches the token check, or
    /// the page), and the other methods on its path are 405 with `Allow` listing exactly
    /// the table's methods.
    #[tokio::test]
    async fn the_router_serves_exactly_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let router = test_router(dir.path());
        for r in ROUTES {
            let concrete = r.path.replace("{id}", "n1");
            let (status, headers, body) = call(&router, r.method, &concrete, None, "").await;
            if r.public {
                assert_eq!(status, StatusCode::OK, "{r:?}: {body}");
            } else {
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{r:?}: {body}");
                assert_eq!(headers[WWW_AUTHENTICATE], "Bearer realm=\"sync-manager\"");
                assert!(body.contains("operator token"), "{body}");
            }
            let allowed: Vec<&str> = ROUTES.iter().filter(|o| o.path == r.path).map(|o| o.method).collect();
            for method in ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
                if allowed.contains(&method) {
                    continue;
                }
                let (status, headers, body) = call(&router, method, &concrete, Some(TOKEN), "").await;
                assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {concrete}");
                assert_eq!(headers[ALLOW], allowed.join(", "), "{method} {concrete}");
                if method != "HEAD" {
                    let expected = format!("{{\"error\":\"method {method} is not allowed here; allowed: {}\"}}\n", allowed.join(", "));
                    assert_eq!(body, expected);
                }
            }
        }
    }

    #[tokio::test]
    async fn unknown_paths_tokens_queries_and_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let router = test_router(dir.path());
        for path in ["/api", "/api/", "/api/nodes/", "/api/nodes//sync", "/api/nodes/a/b", "/metrics/x", "//api/status"] {
            let (status, headers, body) = call(&router, "GET", path, Some(TOKEN), "").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(headers[CONTENT_TYPE], "application/json");
            assert_eq!(body, format!("{{\"error\":\"no such route: {path} (the routes are listed in /api/openapi.json)\"}}\n"));
        }
        let (status, _, body) = call(&router, "GET", "/api/status", Some("wrong"), "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        let (status, headers, body) = call(&router, "GET", "/api/status", Some(TOKEN), "").await;
        assert_eq!((status, &headers[CACHE_CONTROL]), (StatusCode::OK, &HeaderValue::from_static("no-store")), "{body}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["head"], 0);
        // The event stream alone takes the token in the query string.
        let (status, _, _) = call(&router, "GET", &format!("/api/status?token={TOKEN}"), None, "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _, body) = call(&router, "GET", "/api/files?limit=0", Some(TOKEN), "").await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let (status, _, body) = call(&router, "GET", "/api/files?nope=1", Some(TOKEN), "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("unknown query parameter \\\"nope\\\""), "{body}");
        let (status, _, body) = call(&router, "GET", "/api/nodes/bad%20id", Some(TOKEN), "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let (status, _, body) = call(&router, "GET", "/api/nodes/n1", Some(TOKEN), "").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert!(body.contains("no node named \\\"n1\\\""), "{body}");
        let big = "x".repeat(MAX_BODY_BYTES + 1);
        let (status, _, body) = call(&router, "POST", "/api/nodes", Some(TOKEN), &big).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        let (status, _, body) = call(&router, "POST", "/api/nodes", Some(TOKEN), r#"{"idd": "x"}"#).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let (status, headers, body) = call(&router, "GET", "/", None, "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers["content-security-policy"].to_str().unwrap().starts_with("default-src 'none'"));
        assert!(body.contains("<html") || body.contains("<!doctype") || body.contains("<!DOCTYPE"), "{body}");
    }
}
