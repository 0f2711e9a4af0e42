//! AMQP plumbing shared by the manager and the nodes: connecting, declaring the topology
//! of `wire::topology`, publishing with confirms, reconnect backoff, logging and signal
//! handling. It never decodes message bodies and never decides anything about files.

use anyhow::{bail, Context};
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Connection, ConnectionProperties, ConnectionStatus, ExchangeKind,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use wire::{topology, NodeId};

/// Local broker with AMQP heartbeats every 10 s, so a dead TCP peer is noticed.
pub const DEFAULT_BROKER_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10";

/// First and longest wait between reconnection attempts. Short enough that a broker
/// restart costs a user a few seconds, long enough not to hammer a dead broker.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(250);
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The URLs of a broker address list: one URL, or several separated by commas (the
/// nodes of a RabbitMQ cluster, e.g. `amqp://u:p@rmq1:5672/v,amqp://u:p@rmq2:5672/v`).
/// A comma inside a URL must be percent-encoded (`%2C`).
pub fn broker_urls(list: &str) -> Vec<&str> {
    list.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

/// Which URL of a list the next connection tries first: the one after the URL the last
/// connection of this process used, so a reconnection after a broker node went away
/// tries the others before it.
static NEXT_URL: AtomicUsize = AtomicUsize::new(0);

/// A broker that does not complete the connection within this is skipped for the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the first broker of the list that answers (see [`broker_urls`]); the
/// URLs are never logged in full because they may carry a password.
///
/// `amqps://` URLs are verified against the system's certificate authorities, plus the
/// PEM file named by the URL's `cacertfile` query parameter (RabbitMQ's URI convention),
/// e.g. `amqps://user:pw@broker:5671/%2f?heartbeat=10&cacertfile=/etc/sync/ca.pem`.
pub async fn connect(list: &str) -> anyhow::Result<Connection> {
    let urls = broker_urls(list);
    anyhow::ensure!(!urls.is_empty(), "no broker URL given");
    let first = NEXT_URL.load(Ordering::Relaxed);
    let mut failures = Vec::new();
    for k in 0..urls.len() {
        let i = (first + k) % urls.len();
        match connect_one(urls[i]).await {
            Ok(conn) => {
                NEXT_URL.store(i + 1, Ordering::Relaxed);
                if k > 0 {
                    tracing::info!("connected to the broker at {} ({} did not answer)", redact(urls[i]), failures.len());
                }
                return Ok(conn);
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    bail!("{}", failures.join("; "))
}

async fn connect_one(url: &str) -> anyhow::Result<Connection> {
    let tls = tls_config(url)?;
    let runtime = lapin::runtime::default_runtime().context("no async runtime to connect from")?;
    let attempt = Connection::connect_with_config(url, ConnectionProperties::default(), tls, runtime);
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(conn) => conn.with_context(|| format!("connecting to the broker at {}", redact(url))),
        Err(_) => bail!("the broker at {} did not answer within {CONNECT_TIMEOUT:?}", redact(url)),
    }
}

/// The extra certificate authorities an `amqps://` URL asks for.
fn tls_config(url: &str) -> anyhow::Result<lapin::tcp::OwnedTLSConfig> {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    let Some((_, ca)) = form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "cacertfile") else {
        return Ok(Default::default());
    };
    if !url.starts_with("amqps://") {
        bail!("the broker URL names a cacertfile but is not amqps://: {}", redact(url));
    }
    let pem = tls_pem::read_ca_bundle(std::path::Path::new(ca.as_ref()), "the broker's CA certificate")?;
    let pem = String::from_utf8(pem).with_context(|| format!("{ca} is not a PEM text file"))?;
    Ok(lapin::tcp::OwnedTLSConfig { identity: None, cert_chain: Some(pem) })
}

/// The URL (or each URL of a list) with its password replaced by `***`, for logs and
/// errors.
pub fn redact(list: &str) -> String {
    broker_urls(list).into_iter().map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

/// A channel with publisher confirms on.
pub async fn confirmed_channel(conn: &Connection) -> anyhow::Result<Channel> {
    let ch = conn.create_channel().await.context("opening an AMQP channel")?;
    ch.confirm_select(ConfirmSelectOptions::default()).await.context("enabling publisher confirms")?;
    Ok(ch)
}

/// A channel with publisher confirms on, and the state of its connection. Operations
/// through it are bounded like [`bounded`], except while the broker blocks the
/// connection: a broker short of memory or disk (a RabbitMQ resource alarm) blocks every
/// connection that publishes, reads nothing from it until it has room again, and keeps
/// it open. Reconnecting would not help (the new connection is blocked at its first
/// publish) and would send everything again, so an operation's limit counts from the
/// last moment the connection was seen blocked, for as long as it stays up (lapin closes
/// it when the broker's heartbeats stop; without negotiated heartbeats nothing would
/// notice a dead peer, so then a block gets no extra time). Every operation ends when
/// `cancel` fires (a shutdown during a block).
#[derive(Clone)]
pub struct Confirmed {
    pub ch: Channel,
    conn: ConnectionStatus,
    heartbeats: bool,
    cancel: CancellationToken,
    /// When a wait on a blocked connection was last logged: once per
    /// [`BROKER_OP_TIMEOUT`] for the whole connection, however many wait.
    said: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl Confirmed {
    pub async fn open(conn: &Connection, cancel: CancellationToken) -> anyhow::Result<Confirmed> {
        Ok(Confirmed {
            ch: confirmed_channel(conn).await?,
            conn: conn.status().clone(),
            heartbeats: conn.configuration().heartbeat() != 0,
            cancel,
            said: Default::default(),
        })
    }

    /// Whether the broker blocks the connection (`connection.blocked`) and it is up.
    fn blocked(&self) -> bool {
        self.heartbeats && self.conn.blocked() && self.conn.connected()
    }

    /// Runs one operation on this connection: [`bounded`], but with its limit counted
    /// from the last moment the broker was seen blocking the connection.
    pub async fn bounded<T>(&self, what: impl std::fmt::Display, op: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
        let mut op = std::pin::pin!(op);
        let start = std::time::Instant::now();
        let mut deadline = start + BROKER_OP_TIMEOUT;
        loop {
            // The operation first: most answer at once, and the timers need no look.
            tokio::select! {
                biased;
                r = &mut op => return r,
                _ = self.cancel.cancelled() => bail!("{what}: shutting down"),
                _ = tokio::time::sleep(BLOCK_POLL) => {}
            }
            let now = std::time::Instant::now();
            if self.blocked() {
                deadline = now + BROKER_OP_TIMEOUT;
                let mut said = self.said.lock().unwrap_or_else(|p| p.into_inner());
                if now.duration_since(start) >= BROKER_OP_TIMEOUT && said.is_none_or(|t| now.duration_since(t) >= BROKER_OP_TIMEOUT) {
                    *said = Some(now);
                    tracing::info!("{what}: the broker still blocks the connection after {:?}; waiting on", now.duration_since(start));
                }
            } else if now >= deadline {
                bail!("{what}: no answer from the broker in {BROKER_OP_TIMEOUT:?}; taking the connection for dead");
            }
        }
    }

    /// Publishes and waits for the broker's confirm, with these headers; a nack is an error.
    pub async fn publish_with(&self, exchange: &str, key: &str, id: &str, payload: &[u8], headers: FieldTable) -> anyhow::Result<()> {
        let props = message_properties(id, None).with_headers(headers);
        self.bounded(format!("publishing {id} to {exchange:?}/{key} and its confirm"), publish_and_confirm(&self.ch, exchange, key, id, payload, props)).await
    }
}

/// How often an operation on a [`Confirmed`] channel looks whether the broker blocks it.
const BLOCK_POLL: Duration = Duration::from_secs(1);

/// Closes a connection, waiting for the broker's answer at most a few seconds (a blocked
/// connection sends nothing, so its close would wait for the alarm to clear).
pub async fn close(conn: &Connection, reason: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, reason.into())).await;
}

/// Fails when `queue` has a consumer already: a second process with the same role (a
/// node started twice with one id, a second manager) would take every other message and
/// diverge. `who` says what the other one probably is. Checked before consuming (quorum
/// queues do not enforce an exclusive consumer; classic ones refuse the second too); a
/// consumer of this process's own previous connection, not yet closed, fails it as
/// well, and the next attempt after the backoff succeeds.
pub async fn refuse_if_consumed(conn: &Connection, queue: &str, who: &str) -> anyhow::Result<()> {
    let ch = conn.create_channel().await.context("opening a channel")?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let q = bounded(format!("looking at queue {queue}"), async {
        ch.queue_declare(queue.into(), passive, FieldTable::default()).await.with_context(|| format!("looking at queue {queue}"))
    })
    .await?;
    let _ = ch.close(200, "looked".into()).await;
    if q.consumer_count() > 0 {
        bail!("queue {queue} already has a consumer: {who}; waiting until it is gone");
    }
    Ok(())
}

/// Follows the broker's blocks of `conn` (`connection.blocked` with its reason, such as
/// "low on memory", and `connection.unblocked`): logs each and hands it to `on_change`
/// (`Some(reason)` while blocked). Stops when the returned guard is dropped.
pub fn watch_blocks(conn: &Connection, on_change: impl Fn(Option<&str>) + Send + 'static) -> AbortOnDrop {
    use futures_util::StreamExt;
    let mut events = conn.events_listener();
    AbortOnDrop(tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                lapin::Event::ConnectionBlocked(reason) => {
                    tracing::warn!("the broker blocked this connection: {reason} (a memory or disk alarm); nothing is sent or acked until it has room again");
                    on_change(Some(&reason));
                }
                lapin::Event::ConnectionUnblocked => {
                    tracing::info!("the broker unblocked this connection");
                    on_change(None);
                }
                _ => {}
            }
        }
    }))
}

/// A task aborted when this is dropped.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn dead_letter_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(topology::DEAD_EXCHANGE.into()));
    args
}

/// Declares what both sides rely on: the update queue, the master exchange and the
/// dead-letter exchange and queue. Idempotent.
pub async fn declare_common(conn: &Connection) -> anyhow::Result<()> {
    let mut ch = conn.create_channel().await.context("opening a channel to declare the topology")?;
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare(topology::DEAD_EXCHANGE.into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .context("declaring the dead-letter exchange")?;
    declare_queue(conn, &mut ch, topology::DEAD_QUEUE, FieldTable::default()).await?;
    ch.queue_bind(topology::DEAD_QUEUE.into(), topology::DEAD_EXCHANGE.into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .context("binding the dead-letter queue")?;
    // No dead-letter exchange of its own: what it drops must not come back to it.
    declare_queue(conn, &mut ch, topology::DROPS_QUEUE, FieldTable::default()).await?;
    ch.queue_bind(topology::DROPS_QUEUE.into(), topology::DEAD_EXCHANGE.into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .context("binding the queue of dropped messages")?;
    ch.exchange_declare(topology::MASTER_EXCHANGE.into(), ExchangeKind::Direct, durable, FieldTable::default())
        .await
        .context("declaring the master exchange")?;
    declare_queue(conn, &mut ch, topology::UPDATE_QUEUE, dead_letter_args()).await?;
    ch.exchange_declare(topology::UPDATE_EXCHANGE.into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .context("declaring the update exchange")?;
    ch.queue_bind(topology::UPDATE_QUEUE.into(), topology::UPDATE_EXCHANGE.into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .context("binding the update queue")?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// Declares durable queue `name` as a quorum queue: replicated over the broker nodes of
/// a cluster (a majority must have a message before its publish is confirmed), and what
/// RabbitMQ recommends for data that must not be lost. A queue an older version made as
/// a classic queue is used as it is, with a warning: the broker refuses to change a
/// queue's type, and deleting it would drop the messages in it. `ch` is replaced when
/// the broker closed it over that refusal.
async fn declare_queue(conn: &Connection, ch: &mut Channel, name: &str, mut args: FieldTable) -> anyhow::Result<()> {
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let Err(e) = ch.queue_declare(name.into(), QueueDeclareOptions::durable(), args).await else { return Ok(()) };
    if !e.to_string().contains("inequivalent arg 'x-queue-type'") {
        return Err(e).with_context(|| format!("declaring queue {name}"));
    }
    *ch = conn.create_channel().await.context("opening a channel to declare the topology")?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    ch.queue_declare(name.into(), passive, FieldTable::default()).await.with_context(|| format!("checking queue {name}"))?;
    tracing::warn!(
        "queue {name} is a classic queue (made by an older version): it works, but is not replicated over a broker cluster; \
         to make it a quorum queue, stop its producers and consumers, let it drain, delete it and restart the manager"
    );
    Ok(())
}

/// Makes sure a node can work: declares the common topology and its queue where its
/// broker user may (a shared or administrative user); with a node's own least-privilege
/// user (`own_user`), which may configure nothing, checks passively that the manager
/// made them, without trying (a refused declare is logged as an error by lapin).
pub async fn prepare_node_topology(conn: &Connection, node: &NodeId, own_user: bool) -> anyhow::Result<String> {
    // A refused declare closes its channel: try on a channel of its own.
    let attempt = async {
        if own_user {
            anyhow::bail!("a node's own broker user may not declare");
        }
        declare_common(conn).await?;
        declare_node_queue(conn, node).await
    };
    match bounded("declaring the topology", attempt).await {
        Ok(q) => Ok(q),
        Err(e) => {
            tracing::debug!("declaring the topology as this user failed ({e:#}); checking that it exists");
            let ch = conn.create_channel().await.context("opening a channel")?;
            let queue = topology::node_queue(node);
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            ch.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await.with_context(|| {
                format!("queue {queue} does not exist and this broker user may not create it: the manager creates it with `manager node add {node}`")
            })?;
            let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
            ch.exchange_declare(topology::UPDATE_EXCHANGE.into(), ExchangeKind::Fanout, passive, FieldTable::default())
                .await
                .with_context(|| format!("exchange {} does not exist yet: start the manager first", topology::UPDATE_EXCHANGE))?;
            let _ = ch.close(200, "checked".into()).await;
            Ok(queue)
        }
    }
}

/// The vhost a broker URL names (percent-decoded; `/` when it names none); of a list,
/// the first URL's (all name the same vhost of one cluster).
pub fn url_vhost(list: &str) -> String {
    let url = broker_urls(list).first().copied().unwrap_or("");
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let path = rest.split_once('/').map(|(_, p)| p).unwrap_or("");
    if path.is_empty() {
        return "/".into();
    }
    form_urlencoded::parse(format!("v={}", path.replace('+', "%2B")).as_bytes()).next().map(|(_, v)| v.into_owned()).unwrap_or_else(|| "/".into())
}

/// The URL (or each URL of a list) with its user and password replaced (both
/// percent-encoded).
pub fn with_user(list: &str, user: &str, password: &str) -> String {
    broker_urls(list).into_iter().map(|u| with_user_one(u, user, password)).collect::<Vec<_>>().join(",")
}

fn with_user_one(url: &str, user: &str, password: &str) -> String {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20");
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
    let host_part = match rest.split_once('/') {
        Some((auth_host, _)) => auth_host,
        None => rest.split('?').next().unwrap_or(rest),
    };
    let after = &rest[host_part.len()..];
    let host = host_part.rsplit_once('@').map(|(_, h)| h).unwrap_or(host_part);
    format!("{scheme}://{}:{}@{host}{after}", enc(user), enc(password))
}

/// The user name in a broker URL (percent-decoded), if it has one; of a list, the first
/// URL's.
pub fn url_user(list: &str) -> Option<String> {
    let url = *broker_urls(list).first()?;
    let rest = &url[url.find("://")? + 3..];
    let creds = &rest[..rest.find('@')?];
    let user = creds.split(':').next()?;
    let decoded: String = form_urlencoded::parse(format!("u={user}").as_bytes()).next()?.1.into_owned();
    (!decoded.is_empty()).then_some(decoded)
}

/// Declares and binds a node's own durable (quorum) queue; returns its name.
pub async fn declare_node_queue(conn: &Connection, node: &NodeId) -> anyhow::Result<String> {
    let queue = topology::node_queue(node);
    let mut ch = conn.create_channel().await.context("opening a channel to declare a node's queue")?;
    declare_queue(conn, &mut ch, &queue, dead_letter_args()).await?;
    for key in [topology::BROADCAST_KEY.to_string(), topology::node_key(node)] {
        ch.queue_bind(queue.as_str().into(), topology::MASTER_EXCHANGE.into(), key.as_str().into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .with_context(|| format!("binding queue {queue} to {key}"))?;
    }
    let _ = ch.close(200, "declared".into()).await;
    Ok(queue)
}

/// Persistent JSON message properties; with `user`, the AMQP `user_id` the broker
/// checks against the connection's user (so the manager knows who really sent it).
pub fn message_properties(id: &str, user: Option<&str>) -> BasicProperties {
    let p = BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into()).with_message_id(id.into());
    match user {
        Some(u) => p.with_user_id(u.into()),
        None => p,
    }
}

/// Publishes and waits for the broker's confirm; a nack is an error.
pub async fn publish_confirmed(ch: &Channel, exchange: &str, key: &str, id: &str, payload: &[u8]) -> anyhow::Result<()> {
    publish_confirmed_as(ch, exchange, key, id, payload, None).await
}

/// [`publish_confirmed`] with the AMQP `user_id` set to `user`.
pub async fn publish_confirmed_as(ch: &Channel, exchange: &str, key: &str, id: &str, payload: &[u8], user: Option<&str>) -> anyhow::Result<()> {
    publish_confirmed_props(ch, exchange, key, id, payload, message_properties(id, user)).await
}

async fn publish_confirmed_props(ch: &Channel, exchange: &str, key: &str, id: &str, payload: &[u8], props: BasicProperties) -> anyhow::Result<()> {
    bounded(format!("publishing {id} to {exchange:?}/{key} and its confirm"), publish_and_confirm(ch, exchange, key, id, payload, props)).await
}

/// Publishes and waits for the broker's confirm; a nack is an error.
async fn publish_and_confirm(ch: &Channel, exchange: &str, key: &str, id: &str, payload: &[u8], props: BasicProperties) -> anyhow::Result<()> {
    let confirm = ch
        .basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), payload, props)
        .await
        .with_context(|| format!("publishing {id} to {exchange:?}/{key}"))?
        .await
        .with_context(|| format!("waiting for the confirm of {id}"))?;
    if !confirm.is_ack() {
        bail!("the broker refused message {id} ({key})");
    }
    Ok(())
}

/// The longest one round trip with the broker (a publish and its confirm, an ack) may
/// take. A healthy broker answers in milliseconds, a loaded one in a second or two; a
/// connection that broke at the wrong moment can leave a lapin future pending for ever,
/// and the caller's link would then hang instead of reconnecting.
pub const BROKER_OP_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs one broker operation, failing it when it takes longer than `BROKER_OP_TIMEOUT`.
pub async fn bounded<T>(what: impl std::fmt::Display, op: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    match tokio::time::timeout(BROKER_OP_TIMEOUT, op).await {
        Ok(r) => r,
        Err(_) => bail!("{what}: no answer from the broker in {BROKER_OP_TIMEOUT:?}; taking the connection for dead"),
    }
}

/// Exponential backoff between reconnection attempts.
pub struct Backoff {
    next: Duration,
}
impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: RECONNECT_FIRST }
    }
}
impl Backoff {
    pub fn reset(&mut self) {
        self.next = RECONNECT_FIRST;
    }
    /// Waits the current delay (or until cancelled); returns false when cancelled.
    pub async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let d = self.next;
        self.next = (self.next * 2).min(RECONNECT_MAX);
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,lapin=warn".into());
    // Colour only on a terminal: log files and `docker logs` get plain text.
    let ansi = std::io::stderr().is_terminal();
    // A line that cannot be written (its file's disk is full) is lost, and that is all:
    // the library's fallback, printing the error to stderr, panics when that fails too,
    // which killed the process (and a node's mount) at its first line on a full disk.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).log_internal_errors(false).try_init();
}

/// Ends a command: success, or its error and causes on one line (`Error: what: why`),
/// with exit status 1 and no backtrace, whatever RUST_BACKTRACE says.
pub fn exit_with(result: anyhow::Result<()>) -> std::process::ExitCode {
    use std::io::Write;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`: it panics when stderr cannot be written (a full disk).
            let _ = writeln!(std::io::stderr(), "Error: {}", format!("{e:#}").replace('\n', " "));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The signals that end the process cleanly: interrupt (Ctrl-C), terminate (`kill`,
/// systemd, Docker), hang-up (the terminal closed) and quit (Ctrl-\).
pub fn terminating_signals() -> [(&'static str, tokio::signal::unix::SignalKind); 4] {
    use tokio::signal::unix::SignalKind;
    [("SIGINT", SignalKind::interrupt()), ("SIGTERM", SignalKind::terminate()), ("SIGHUP", SignalKind::hangup()), ("SIGQUIT", SignalKind::quit())]
}

/// Cancels `token` on any of [`terminating_signals`], so every one of them takes the
/// same clean path (a node unmounts first) instead of killing the process.
pub fn cancel_on_signals(token: CancellationToken) {
    use tokio::signal::unix::signal;
    // Installed before returning: a signal that arrives right after start-up must not
    // take the default action (death without unmounting).
    let mut streams = Vec::new();
    for (name, kind) in terminating_signals() {
        match signal(kind) {
            Ok(s) => streams.push((name, s)),
            Err(e) => tracing::error!("cannot install a handler for {name}: {e}"),
        }
    }
    tokio::spawn(async move {
        let waits = streams.iter_mut().map(|(name, s)| {
            let name = *name;
            Box::pin(async move {
                s.recv().await;
                name
            })
        });
        let (name, _, _) = futures_util::future::select_all(waits).await;
        tracing::info!("{name} received, shutting down");
        token.cancel();
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn vhost_and_user_of_urls() {
        assert_eq!(super::url_vhost("amqp://g:g@127.0.0.1:5672/%2f?heartbeat=10"), "/");
        assert_eq!(super::url_vhost("amqp://g:g@127.0.0.1:5672/test-1"), "test-1");
        assert_eq!(super::url_vhost("amqp://g:g@127.0.0.1:5672"), "/");
        assert_eq!(
            super::with_user("amqp://guest:guest@127.0.0.1:5672/v1?heartbeat=10", "sync-node-a", "p w"),
            "amqp://sync-node-a:p%20w@127.0.0.1:5672/v1?heartbeat=10"
        );
        assert_eq!(super::with_user("amqp://127.0.0.1:5672", "u", "p"), "amqp://u:p@127.0.0.1:5672");
    }

    #[test]
    fn url_user_is_decoded() {
        assert_eq!(super::url_user("amqp://sync-node-a:pw@h:5672/v").as_deref(), Some("sync-node-a"));
        assert_eq!(super::url_user("amqp://we%20ird:pw@h/v").as_deref(), Some("we ird"));
        assert_eq!(super::url_user("amqp://h:5672/v"), None);
    }

    #[test]
    fn redact_hides_passwords() {
        assert_eq!(super::redact("amqp://sync:s3cret@host:5672/v"), "amqp://sync:***@host:5672/v");
        assert_eq!(super::redact("amqp://host/v"), "amqp://host/v");
    }

    #[test]
    fn a_list_of_brokers_is_read_url_by_url() {
        let list = "amqp://a:pw@h1:5672/v1?heartbeat=5, amqp://a:pw@h2:5672/v1?heartbeat=5,";
        assert_eq!(super::broker_urls(list), ["amqp://a:pw@h1:5672/v1?heartbeat=5", "amqp://a:pw@h2:5672/v1?heartbeat=5"]);
        assert_eq!(super::redact(list), "amqp://a:***@h1:5672/v1?heartbeat=5,amqp://a:***@h2:5672/v1?heartbeat=5");
        assert_eq!(super::url_user(list).as_deref(), Some("a"));
        assert_eq!(super::url_vhost(list), "v1");
        assert_eq!(super::with_user(list, "n", "p,w"), "amqp://n:p%2Cw@h1:5672/v1?heartbeat=5,amqp://n:p%2Cw@h2:5672/v1?heartbeat=5");
    }
}
