//! The one HTTP(S) accept loop of both servers (the manager's API and dashboard, the
//! nodes' peer server): accepts TCP connections up to a limit, finishes the TLS handshake
//! within a deadline, and serves each connection with hyper's HTTP/1 (with a header read
//! timeout, and a limit on how long a write may wait for the client) and the caller's
//! `axum::Router`.
//!
//! It owns the connections and nothing else: no routes, no authentication, no request
//! bodies. It never logs a request (a query string may carry a token); each server's
//! router does what logging it wants.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How one server bounds its clients. Each server states its own values (as named
/// constants with their reasons); nothing here has a default.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A client must send a request's headers within this, also on an idle kept-alive
    /// connection, so a slow or idle client cannot hold a connection slot for long.
    pub header_read_timeout: Duration,
    /// A TLS client must finish its handshake within this.
    pub tls_handshake_timeout: Duration,
    /// A write the client leaves waiting this long (it stopped reading: its receive
    /// window is full) ends the connection, so a client that asks for a large answer and
    /// never takes it cannot hold a connection slot.
    pub write_stall_timeout: Duration,
    /// Pause after a failed accept (out of descriptors, say) so the loop does not spin.
    pub accept_backoff: Duration,
    /// What happens to open connections on cancellation. `Some(grace)`: each is told to
    /// finish the request in progress and close, and [`serve`] waits up to `grace` for
    /// them. `None`: [`serve`] returns at once and the connections go on until they end
    /// (or the runtime stops).
    pub shutdown_grace: Option<Duration>,
}

/// The accept queue a listener asks the kernel for (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default). Connections beyond [`Limits::max_connections`]
/// wait there in arrival order, their handshakes done: with tokio's default of 1024, a
/// crowd of idle clients filled the queue, later clients' SYNs were dropped, and who got
/// in next was a lottery of SYN retries (an operator's `syncctl status` timed out behind
/// 2,000 idle connections).
pub const ACCEPT_QUEUE: u32 = 4096;

/// A listener on `addr` with an accept queue of [`ACCEPT_QUEUE`].
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As `TcpListener::bind` does: a restarted server can take its port back at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_QUEUE)
}

/// Serves `router` over HTTP/1 (HTTPS with `tls`) on `listener` until `cancel`.
pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, router: Router, limits: Limits, cancel: CancellationToken) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                // The semaphore is ours and never closed; stop rather than panic.
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accepting an HTTP connection on {local}: {e}; pausing {:?}", limits.accept_backoff);
                    tokio::time::sleep(limits.accept_backoff).await;
                    continue;
                }
            },
        };
        // Headers and body go out in separate writes: without this, Nagle's algorithm
        // holds the body until the client's delayed ACK (40 ms per small response).
        let _ = tcp.set_nodelay(true);
        let (tls, router) = (tls.clone(), router.clone());
        // Only a draining server makes its connections watch for cancellation.
        let drain = limits.shutdown_grace.map(|_| cancel.clone());
        tracker.spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(tcp, router, limits, drain).await,
                Some(acceptor) => match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => serve_connection(stream, router, limits, drain).await,
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
        });
    }
    tracker.close();
    if let Some(grace) = limits.shutdown_grace {
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!("HTTP requests on {local} still running after {grace:?}; stopping anyway");
        }
    }
}

async fn serve_connection<S>(stream: S, router: Router, limits: Limits, drain: Option<CancellationToken>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stream = WriteStallLimit { inner: stream, limit: limits.write_stall_timeout, stalled: None };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    tokio::pin!(conn);
    let ended = match drain {
        None => conn.await,
        Some(cancel) => tokio::select! {
            r = conn.as_mut() => r,
            _ = cancel.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        },
    };
    if let Err(e) = ended {
        tracing::debug!("HTTP connection ended: {e}");
    }
}

/// A connection whose writes must make progress ([`Limits::write_stall_timeout`]): a
/// write left pending that long fails with `TimedOut`, which ends the connection. Reads
/// pass through (hyper bounds the wait for a request's headers; while an answer is made
/// it waits on the read side for the client's close, as long as the answer takes).
struct WriteStallLimit<S> {
    inner: S,
    limit: Duration,
    /// Armed by the first write left pending, disarmed by any write that goes on.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: AsyncWrite + Unpin> WriteStallLimit<S> {
    fn progress<T>(&mut self, cx: &mut Context<'_>, op: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if let Poll::Ready(r) = op(Pin::new(&mut self.inner), cx) {
            self.stalled = None;
            return Poll::Ready(r);
        }
        let limit = self.limit;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("the client took nothing for {limit:?}")))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStallLimit<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteStallLimit<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.get_mut().progress(cx, |s, cx| s.poll_write(cx, buf))
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        self.get_mut().progress(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().progress(cx, |s, cx| s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().progress(cx, |s, cx| s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const LIMITS: Limits = Limits {
        max_connections: 1,
        header_read_timeout: Duration::from_millis(300),
        tls_handshake_timeout: Duration::from_millis(300),
        write_stall_timeout: Duration::from_millis(300),
        accept_backoff: Duration::from_millis(10),
        shutdown_grace: Some(Duration::from_secs(2)),
    };

    async fn start(limits: Limits) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let router = Router::new().route("/hello", get(|| async { "hi" })).route("/big", get(|| async { vec![7u8; 64 << 20] }));
        let task = tokio::spawn(serve(listener, None, router, limits, cancel.clone()));
        (addr, cancel, task)
    }

    async fn read_all(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.expect("the server closes the connection");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_the_router_and_drops_a_client_that_sends_no_headers() {
        let (addr, cancel, task) = start(LIMITS).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let answer = read_all(&mut c).await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hi"), "{answer}");
        // A silent client is dropped after the header read timeout.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        read_all(&mut idle).await;
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_connection_over_the_limit_waits_for_a_free_slot() {
        let (addr, cancel, task) = start(Limits { header_read_timeout: Duration::from_secs(30), ..LIMITS }).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 256];
        let n = first.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        let mut second = TcpStream::connect(addr).await.unwrap();
        second.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
        assert!(waited.is_err(), "the second connection was served while the first held the only slot");
        drop(first);
        assert!(read_all(&mut second).await.starts_with("HTTP/1.1 200"));
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_that_stops_taking_its_answer_loses_its_slot() {
        let (addr, cancel, task) = start(Limits { header_read_timeout: Duration::from_secs(30), ..LIMITS }).await;
        // Asks for 64 MiB and never reads: the server's writes wait once the socket
        // buffers are full.
        let mut greedy = TcpStream::connect(addr).await.unwrap();
        greedy.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut next = TcpStream::connect(addr).await.unwrap();
        next.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        // The only slot is freed when the stalled write times out.
        assert!(read_all(&mut next).await.starts_with("HTTP/1.1 200"));
        drop(greedy);
        cancel.cancel();
        task.await.unwrap();
    }
}
