//! AMQP plumbing shared by the manager and the nodes: connecting, declaring the topology
//! of `wire::topology`, publishing with confirms, reconnect backoff, logging and signal
//! handling. It never decodes message bodies and never decides anything about files.

use anyhow::{bail, Context};
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use wire::{topology, NodeId};

/// Local broker with AMQP heartbeats every 10 s, so a dead TCP peer is noticed.
pub const DEFAULT_BROKER_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10";

/// First and longest wait between reconnection attempts. Short enough that a broker
/// restart costs a user a few seconds, long enough not to hammer a dead broker.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(250);
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Connects; the URL is never logged because it may carry a password.
///
/// `amqps://` URLs are verified against the system's certificate authorities, plus the
/// PEM file named by the URL's `cacertfile` query parameter (RabbitMQ's URI convention),
/// e.g. `amqps://user:pw@broker:5671/%2f?heartbeat=10&cacertfile=/etc/sync/ca.pem`.
pub async fn connect(url: &str) -> anyhow::Result<Connection> {
    let tls = tls_config(url)?;
    let runtime = lapin::runtime::default_runtime().context("no async runtime to connect from")?;
    let conn = Connection::connect_with_config(url, ConnectionProperties::default(), tls, runtime)
        .await
        .with_context(|| format!("connecting to the broker at {}", redact(url)))?;
    Ok(conn)
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

/// The URL with its password replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
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

fn dead_letter_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(topology::DEAD_EXCHANGE.into()));
    args
}

/// Declares what both sides rely on: the update queue, the master exchange and the
/// dead-letter exchange and queue. Idempotent.
pub async fn declare_common(ch: &Channel) -> anyhow::Result<()> {
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare(topology::DEAD_EXCHANGE.into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .context("declaring the dead-letter exchange")?;
    ch.queue_declare(topology::DEAD_QUEUE.into(), QueueDeclareOptions::durable(), FieldTable::default()).await.context("declaring the dead-letter queue")?;
    ch.queue_bind(topology::DEAD_QUEUE.into(), topology::DEAD_EXCHANGE.into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .context("binding the dead-letter queue")?;
    ch.exchange_declare(topology::MASTER_EXCHANGE.into(), ExchangeKind::Direct, durable, FieldTable::default())
        .await
        .context("declaring the master exchange")?;
    ch.queue_declare(topology::UPDATE_QUEUE.into(), QueueDeclareOptions::durable(), dead_letter_args()).await.context("declaring the update queue")?;
    Ok(())
}

/// Declares and binds a node's own durable queue; returns its name.
pub async fn declare_node_queue(ch: &Channel, node: &NodeId) -> anyhow::Result<String> {
    let queue = topology::node_queue(node);
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), dead_letter_args()).await.with_context(|| format!("declaring queue {queue}"))?;
    for key in [topology::BROADCAST_KEY.to_string(), topology::node_key(node)] {
        ch.queue_bind(queue.as_str().into(), topology::MASTER_EXCHANGE.into(), key.as_str().into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .with_context(|| format!("binding queue {queue} to {key}"))?;
    }
    Ok(queue)
}

/// Persistent JSON message properties.
pub fn message_properties(id: &str) -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into()).with_message_id(id.into())
}

/// Publishes and waits for the broker's confirm; a nack is an error.
pub async fn publish_confirmed(ch: &Channel, exchange: &str, key: &str, id: &str, payload: &[u8]) -> anyhow::Result<()> {
    let confirm = bounded(format!("publishing {id} to {exchange:?}/{key} and its confirm"), async {
        ch.basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), payload, message_properties(id))
            .await
            .with_context(|| format!("publishing {id} to {exchange:?}/{key}"))?
            .await
            .with_context(|| format!("waiting for the confirm of {id}"))
    })
    .await?;
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
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
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
    fn redact_hides_passwords() {
        assert_eq!(super::redact("amqp://sync:s3cret@host:5672/v"), "amqp://sync:***@host:5672/v");
        assert_eq!(super::redact("amqp://host/v"), "amqp://host/v");
    }
}
