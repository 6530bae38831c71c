//! Client connections before pingora reads a request from them: a cap on
//! the connections one source address may hold open, and a deadline for
//! receiving each request header (SPEC 7: slow and greedy clients).
//!
//! [`ConnectionGate`] is the pingora [`ServerApp`] of the client listener.
//! It wraps the proxy's own app: every accepted connection is counted
//! against its source address (refused with `503` past
//! `downstream.max_connections_per_ip`), and its stream is wrapped in a
//! [`ClientStream`] before the proxy sees it. pingora itself only times
//! out *one read* of a header (its keep-alive timeout), so a client sending
//! one byte every few seconds would otherwise hold a connection, and a
//! worker's attention, for as long as it likes.
//!
//! The same wrapper puts the gateway's `Server` header on the few answers
//! pingora writes itself before any tollgate code runs (400 for a header
//! it cannot parse, 405 for `CONNECT`): pingora 0.9.1 hard-codes
//! `Server: Pingora` there, which would tell a client who answers.
//!
//! How the deadline knows where a header ends without parsing HTTP: it
//! watches the bytes read for the blank line that ends a header (`\n\r\n`
//! or `\n\n`, which is what pingora's parser accepts too), and the bytes
//! written for the start of a final answer, after which the next request's
//! header begins. The deadline runs from the connection's accept for the
//! first request and from the first byte of each later one; an idle
//! keep-alive connection between requests is pingora's keep-alive timeout's
//! business. Approximation: a pipelined request whose header arrived with
//! the previous one is not timed (it is already there).
//!
//! On the TLS listener the gate runs the TLS handshake itself (pingora's,
//! with tollgate's certificate callback: `tls.rs`), after the connection
//! was counted and under the same deadline: the handshake and the first
//! header together must arrive within `downstream.header_timeout_ms`, so a
//! client that opens a connection and never sends a ClientHello is closed
//! at the deadline like one that never sends a header. (pingora's own TLS
//! listener would handshake before any app code runs, uncounted, with a
//! fixed 60 s timeout.) The header watch and the `Server` rewrite then run
//! on the decrypted stream.
//!
//! Failure modes: a client past the deadline gets a best-effort
//! `408 Request Timeout` (written only if the socket takes it at once) and
//! its connection is closed; the read fails with `TimedOut`, which pingora
//! logs as a failed header read. Nothing here ever touches a balance.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::limits::{ActiveRequests, IpKey};
use crate::metrics::Metrics;
use crate::proxy::SERVER_HEADER;
use crate::tls::TlsListener;

/// What the gate needs from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateConfig {
    /// Longest time a request header may take to arrive.
    pub header_timeout: Duration,
    /// Most connections one source address may hold open at once.
    pub max_connections_per_ip: u32,
}

/// The client listener's app: counts connections per source address and
/// puts a header deadline on each, then hands them to `inner`.
pub struct ConnectionGate<A> {
    inner: Arc<A>,
    config: GateConfig,
    /// Connections open per source address; shared by the plain and the
    /// TLS listener's gates, so the cap counts both.
    open: Arc<ActiveRequests>,
    metrics: Arc<Metrics>,
    /// The TLS listener's address and handshake.
    tls: Option<(SocketAddr, Arc<TlsListener>)>,
}

impl<A> ConnectionGate<A> {
    pub fn new(inner: Arc<A>, config: GateConfig, metrics: Arc<Metrics>) -> Self {
        ConnectionGate {
            inner,
            config,
            open: Arc::new(ActiveRequests::default()),
            metrics,
            tls: None,
        }
    }

    /// Makes connections accepted on `listen` TLS: the proxy service
    /// listens on both ports with this one gate (one runtime, one
    /// per-address count), and tells them apart by the local address.
    pub fn with_tls(mut self, listen: SocketAddr, tls: Arc<TlsListener>) -> Self {
        self.tls = Some((listen, tls));
        self
    }

    /// The TLS listener's handshake if `stream` came in on its address.
    /// A connection whose local address is unknown counts as TLS: plain
    /// HTTP is never served on the TLS port.
    fn tls_for(&self, stream: &Stream) -> Option<&TlsListener> {
        let (listen, tls) = self.tls.as_ref()?;
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        match local {
            None => Some(tls),
            Some(local) if is_address_of(*listen, local) => Some(tls),
            Some(_) => None,
        }
    }
}

/// The answer to a connection over its address's cap, written before the
/// connection is closed.
fn over_cap_answer() -> Vec<u8> {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nServer: {SERVER_HEADER}\r\n\
         Content-Type: text/plain\r\nContent-Length: 29\r\nRetry-After: 1\r\n\
         Connection: close\r\n\r\nToo many connections from you\n"
    )
    .into_bytes()
}

/// Written (best effort) to a client whose header did not arrive in time.
fn header_timeout_answer() -> Vec<u8> {
    format!(
        "HTTP/1.1 408 Request Timeout\r\nServer: {SERVER_HEADER}\r\n\
         Content-Type: text/plain\r\nContent-Length: 16\r\nConnection: close\r\n\r\n\
         Request Timeout\n"
    )
    .into_bytes()
}

/// Whether a connection accepted at `local` came in on a listener bound to
/// `listen` (an unspecified IP listens on every address of its port).
fn is_address_of(listen: SocketAddr, local: SocketAddr) -> bool {
    listen.port() == local.port() && (listen.ip().is_unspecified() || listen.ip() == local.ip())
}

fn peer_ip(stream: &Stream) -> Option<IpAddr> {
    let digest = stream.get_socket_digest()?;
    let addr = digest.peer_addr()?;
    addr.as_inet().map(|a| a.ip())
}

#[async_trait]
impl<A> ServerApp for ConnectionGate<A>
where
    A: ServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let key = peer_ip(&stream).map(IpKey::of);
        let tls = self.tls_for(&stream);
        let _held = match key {
            Some(key) => match self.open.enter(key, self.config.max_connections_per_ip) {
                Ok(guard) => Some(guard),
                Err(_) => {
                    self.metrics.downstream_connections_refused.inc();
                    // A TLS client could not read a plain answer: it is
                    // only closed.
                    if tls.is_none() {
                        let answer = over_cap_answer();
                        let write = stream.write_all(&answer);
                        let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
                    }
                    Shutdown::shutdown(&mut *stream).await;
                    return None;
                }
            },
            None => None,
        };
        self.metrics.downstream_connections.inc();
        let timeout = self.config.header_timeout;
        let mut client = match tls {
            None => ClientStream::new(stream, timeout, self.metrics.clone()),
            Some(tls) => {
                let deadline = Instant::now() + timeout;
                let raw = ClientStream::raw(stream, self.metrics.clone());
                let failure = match tokio::time::timeout_at(deadline, tls.handshake(raw)).await {
                    Ok(Ok(tls_stream)) => Ok(tls_stream),
                    Ok(Err(e)) => Err(("error", e.to_string())),
                    Err(_) => Err(("timeout", "not done within the header deadline".into())),
                };
                match failure {
                    Ok(tls_stream) => ClientStream::with_deadline(
                        Box::new(tls_stream),
                        timeout,
                        deadline,
                        self.metrics.clone(),
                    ),
                    Err((reason, error)) => {
                        // Dropping the stream closes the connection.
                        self.metrics
                            .tls_handshake_failures
                            .with_label_values(&[reason])
                            .inc();
                        tracing::debug!(reason, error = %error, "TLS handshake failed");
                        self.metrics.downstream_connections.dec();
                        return None;
                    }
                }
            }
        };
        // The first bytes before pingora sees the connection: pingora drops
        // a connection still waiting for its first request when the server
        // stops listening (graceful shutdown, the end of an upgrade's
        // accept window), even one accepted a moment before whose request
        // is on its way; with the bytes already read, its request is served.
        if !matches!(client.prefetch().await, Ok(n) if n > 0) {
            self.metrics.downstream_connections.dec();
            return None;
        }
        let stream: Stream = Box::new(client);
        let reused = self.inner.process_new(stream, shutdown).await;
        self.metrics.downstream_connections.dec();
        reused
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// Where a connection is in its current request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the end of a request header; `armed` once the deadline runs.
    Header { armed: bool },
    /// After the header: the body and the answer (no header deadline).
    Rest,
    /// The deadline passed: every read fails.
    Expired,
    /// Not HTTP (the ciphertext under TLS, while the handshake runs):
    /// nothing is watched or rewritten.
    Off,
}

/// A client stream with a deadline on each request header (see the module
/// docs). Everything but reading and writing is passed through.
pub struct ClientStream {
    inner: Stream,
    timeout: Duration,
    phase: Phase,
    sleep: Pin<Box<Sleep>>,
    /// The last two bytes read, to find a header end split across reads.
    tail: [u8; 2],
    /// A rewritten answer header not yet fully written (see
    /// [`rewrite_pingora_server`]); drained before anything else is.
    pending: Vec<u8>,
    /// Bytes [`Self::prefetch`] read (already seen by the deadline),
    /// returned before anything else is read.
    prefetched: Vec<u8>,
    metrics: Arc<Metrics>,
}

impl ClientStream {
    pub fn new(inner: Stream, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        // The first header is timed from the accept.
        Self::with_deadline(inner, timeout, Instant::now() + timeout, metrics)
    }

    /// A stream whose first header must be in by `first_deadline` (the
    /// TLS listener: the deadline that also bounded the handshake).
    pub fn with_deadline(
        inner: Stream,
        timeout: Duration,
        first_deadline: Instant,
        metrics: Arc<Metrics>,
    ) -> Self {
        ClientStream {
            inner,
            timeout,
            phase: Phase::Header { armed: true },
            sleep: Box::pin(tokio::time::sleep_until(first_deadline)),
            tail: [0; 2],
            pending: Vec::new(),
            prefetched: Vec::new(),
            metrics,
        }
    }

    /// Reads the first bytes of the connection (under the header
    /// deadline) and keeps them for the next read; how many (0: closed).
    pub async fn prefetch(&mut self) -> io::Result<usize> {
        const PREFETCH: usize = 4096;
        let mut buf = vec![0u8; PREFETCH];
        let n = std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut *self).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await?;
        buf.truncate(n);
        self.prefetched = buf;
        Ok(n)
    }

    /// A pass-through stream (under TLS: the handshake is timed by its
    /// caller, and the bytes are not HTTP).
    pub fn raw(inner: Stream, metrics: Arc<Metrics>) -> Self {
        ClientStream {
            phase: Phase::Off,
            ..Self::new(inner, Duration::ZERO, metrics)
        }
    }

    /// Writes what is left of `pending`; `Ready(Ok)` once it is empty.
    fn drain_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            match Pin::new(&mut *self.inner).poll_write(cx, &self.pending) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.pending.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Looks at freshly read bytes while in a header.
    fn saw(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if let Phase::Header { armed: false } = self.phase {
            self.sleep.as_mut().reset(Instant::now() + self.timeout);
            self.phase = Phase::Header { armed: true };
        }
        if header_ends(self.tail, bytes) {
            self.phase = Phase::Rest;
        }
        self.tail = match bytes {
            [.., a, b] => [*a, *b],
            [b] => [self.tail[1], *b],
            [] => self.tail,
        };
    }

    fn expire(&mut self, cx: &mut Context<'_>) -> io::Error {
        if self.phase != Phase::Expired {
            self.phase = Phase::Expired;
            self.metrics.downstream_header_timeouts.inc();
            // Best effort: only if the socket takes the answer at once.
            let answer = header_timeout_answer();
            let _ = Pin::new(&mut *self.inner).poll_write(cx, &answer);
        }
        io::Error::new(
            io::ErrorKind::TimedOut,
            "request header not received in time",
        )
    }
}

/// Whether the blank line ending a header is in `bytes` (given the two
/// bytes before them): `\n\r\n` or `\n\n`.
fn header_ends(tail: [u8; 2], bytes: &[u8]) -> bool {
    let mut prev = tail;
    for &b in bytes {
        if b == b'\n' && (prev[1] == b'\n' || (prev[1] == b'\r' && prev[0] == b'\n')) {
            return true;
        }
        prev = [prev[1], b];
    }
    false
}

/// Whether a write starts a final answer (not a `100 Continue`).
fn starts_final_answer(buf: &[u8]) -> bool {
    buf.starts_with(b"HTTP/") && !matches!(buf.get(9), Some(b'1'))
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefetched.is_empty() {
            let n = this.prefetched.len().min(buf.remaining());
            buf.put_slice(&this.prefetched[..n]);
            this.prefetched.drain(..n);
            return Poll::Ready(Ok(()));
        }
        if this.phase == Phase::Expired {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request header not received in time",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut *this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if matches!(this.phase, Phase::Header { .. }) {
                    let fresh = buf.filled()[before..].to_vec();
                    this.saw(&fresh);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.phase == (Phase::Header { armed: true })
                    && this.sleep.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(this.expire(cx)));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

/// pingora's own error answers say `Server: Pingora`; the gateway's name
/// goes in its place. `None` if `buf` is not such an answer header.
fn rewrite_pingora_server(buf: &[u8]) -> Option<Vec<u8>> {
    const PINGORA: &[u8] = b"\r\nServer: Pingora\r\n";
    if !buf.starts_with(b"HTTP/1.") {
        return None;
    }
    let head_end = memchr::memmem::find(buf, b"\r\n\r\n")?;
    let at = memchr::memmem::find(&buf[..head_end + 2], PINGORA)?;
    let mut out = Vec::with_capacity(buf.len() + SERVER_HEADER.len());
    out.extend_from_slice(&buf[..at]);
    out.extend_from_slice(b"\r\nServer: ");
    out.extend_from_slice(SERVER_HEADER.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&buf[at + PINGORA.len()..]);
    Some(out)
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.drain_pending(cx)?.is_pending() {
            return Poll::Pending;
        }
        if this.phase == Phase::Rest && starts_final_answer(buf) {
            // The next bytes read belong to the next request's header.
            this.phase = Phase::Header { armed: false };
            this.tail = [0; 2];
        }
        if this.phase == Phase::Off {
            return Pin::new(&mut *this.inner).poll_write(cx, buf);
        }
        if let Some(rewritten) = rewrite_pingora_server(buf) {
            // Taken whole: written from `pending` by this and later calls.
            this.pending = rewritten;
            let _ = this.drain_pending(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut *this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.drain_pending(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut *this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.drain_pending(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut *this.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for ClientStream {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await;
    }
}

impl UniqueID for ClientStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ClientStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ClientStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ClientStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for ClientStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for ClientStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientStream")
            .field("phase", &self.phase)
            .field("inner", &self.inner)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_connections_are_told_by_their_local_address() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(is_address_of(at("0.0.0.0:8443"), at("10.0.0.5:8443")));
        assert!(is_address_of(at("[::]:8443"), at("[::1]:8443")));
        assert!(is_address_of(at("127.0.0.1:8443"), at("127.0.0.1:8443")));
        assert!(!is_address_of(at("127.0.0.1:8443"), at("127.0.0.2:8443")));
        assert!(!is_address_of(at("0.0.0.0:8443"), at("10.0.0.5:9501")));
    }

    #[test]
    fn finds_header_ends_across_reads() {
        assert!(header_ends([0, 0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(header_ends([0, 0], b"GET / HTTP/1.1\nHost: x\n\n"));
        assert!(!header_ends([0, 0], b"GET / HTTP/1.1\r\nHost: x\r\n"));
        assert!(header_ends([b'\r', b'\n'], b"\r\n"));
        assert!(header_ends([b'\n', b'\r'], b"\n"));
        assert!(header_ends([0, b'\n'], b"\n"));
        assert!(!header_ends([0, b'\r'], b"\n"));
    }

    #[test]
    fn pingoras_own_answers_get_the_gateways_server_header() {
        let pingora =
            b"HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\nDate: x\r\nContent-Length: 0\r\n\r\n";
        let rewritten = rewrite_pingora_server(pingora).unwrap();
        assert_eq!(
            String::from_utf8(rewritten).unwrap(),
            format!("HTTP/1.1 400 Bad Request\r\nServer: {SERVER_HEADER}\r\nDate: x\r\nContent-Length: 0\r\n\r\n")
        );
        // Anything else is written as it is.
        assert_eq!(
            rewrite_pingora_server(b"HTTP/1.1 200 OK\r\nServer: OzekiNG\r\n\r\n"),
            None
        );
        assert_eq!(
            rewrite_pingora_server(b"body with \r\nServer: Pingora\r\n"),
            None
        );
        assert_eq!(
            rewrite_pingora_server(b"HTTP/1.1 200 OK\r\n\r\n\r\nServer: Pingora\r\n"),
            None,
            "only in the header block"
        );
    }

    #[test]
    fn interim_answers_do_not_end_a_request() {
        assert!(starts_final_answer(b"HTTP/1.1 200 OK\r\n"));
        assert!(starts_final_answer(b"HTTP/1.0 408 Request Timeout\r\n"));
        assert!(!starts_final_answer(b"HTTP/1.1 100 Continue\r\n\r\n"));
        assert!(!starts_final_answer(b"<response>"));
    }
}
