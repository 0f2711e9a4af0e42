//! The manager's HTTP front end: the REST API under `/api/`, its OpenAPI document, the
//! live dashboard at `/`, the server-sent event stream and Prometheus `/metrics`, over
//! plain HTTP or TLS (rustls).
//!
//! It reads the manager's database through `service::Handle` (on blocking threads) and
//! changes things only by queueing a message in the outbox (`request_sync`) or by calling
//! the provisioning module. It never talks to the broker, never decides about files and
//! never logs a token or a query string (which may carry one).
//!
//! Layout: `routes` (the route table), `handlers` (one function per route), `queries`
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
use bytes::Bytes;
use credentials::{Credentials, Secret};
use error::{ApiError, ApiResult};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use routes::{Match, Op, Route};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
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
/// Pause after a failed accept (e.g. out of file descriptors) before the next one, so
/// the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub type Body = BoxBody<Bytes, Infallible>;

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
        let listener = TcpListener::bind(cfg.listen).await.with_context(|| format!("listening on {} for the HTTP API", cfg.listen))?;
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
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => break,
                p = slots.clone().acquire_owned() => p.context("connection limit closed")?,
            };
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                a = self.listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accepting an HTTP connection: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let (tls, state, cancel) = (self.tls.clone(), state.clone(), cancel.clone());
            tracker.spawn(async move {
                let _permit = permit;
                let _ = tcp.set_nodelay(true);
                match tls {
                    None => serve_connection(TokioIo::new(tcp), state, cancel).await,
                    Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(TokioIo::new(stream), state, cancel).await,
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    },
                }
            });
        }
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
            tracing::warn!("HTTP requests still running after {SHUTDOWN_GRACE:?}; stopping anyway");
        }
        Ok(())
    }
}

async fn serve_connection<I>(io: I, state: Arc<State>, cancel: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(answer(&state, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { tracing::debug!("HTTP connection ended: {e}") },
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Runs the manager: the broker loop and the HTTP server, sharing one store. The
/// cluster's credentials are created here on first start. When either part stops (an
/// error, or `cancel`), the other is stopped too.
pub async fn run_manager(cfg: service::Config, api: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    let handle = Handle::open(&cfg.db)?;
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

/// Answers one request; every failure becomes a JSON error.
async fn answer(state: &State, req: Request<Incoming>) -> Response<Body> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = match route(state, req).await {
        Ok(r) => r,
        Err(e) => error_response(e),
    };
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

async fn route(state: &State, req: Request<Incoming>) -> ApiResult<Response<Body>> {
    let path = req.uri().path().to_string();
    let (route, params) = match routes::find(req.method().as_str(), &path) {
        Match::Found(r, p) => (r, p.into_iter().map(str::to_string).collect()),
        Match::MethodNotAllowed(allowed) => return Err(ApiError::method_not_allowed(req.method().as_str(), &allowed)),
        Match::NotFound => return Err(ApiError::not_found(format!("no such route: {path} (the routes are listed in /api/openapi.json)"))),
    };
    let query = parse_query(route, req.uri().query())?;
    if !route.public {
        authorize(state, route, req.headers(), &query)?;
    }
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
fn authorize(state: &State, route: &Route, headers: &hyper::HeaderMap, query: &[(String, String)]) -> ApiResult<()> {
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

async fn read_body(req: Request<Incoming>) -> ApiResult<Bytes> {
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
    Full::new(bytes.into()).boxed()
}

fn with_type(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub(crate) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut text = value.to_string();
    text.push('\n');
    with_type(status, "application/json", full(text))
}

fn error_response(e: ApiError) -> Response<Body> {
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
struct EventBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|next| next.map(|b| Ok(Frame::data(b))))
    }
}
