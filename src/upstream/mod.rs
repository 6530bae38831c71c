//! Forwarding a fully-read request to the gateway and reading its answer.
//!
//! The Ozeki front door must see a request's whole body before deciding
//! anything (SPEC 1.1), and pingora 0.9 cannot forward a body its
//! `request_filter` already consumed (its retry buffer stops at 64 KiB). So
//! intercepted paths forward here, with the original method, path, query
//! and body bytes, over a keep-alive pool of TCP connections (TLS with
//! `upstream.tls: true`, see `tls.rs`): one write per request and one read
//! per answer in the common case. This path
//! carries every charged send, so it is kept lean; pingora's own upstream
//! session spent about twice the CPU per request (benches/e2e/results.md).
//!
//! The outcome says precisely how far the request got, because settlement
//! depends on it (SPEC 1.3 step 8): a failure to connect, or a pooled
//! connection found dead before any byte of the request went into it, means
//! the gateway never saw the request (void); anything after the first byte
//! was written may have reached it (in doubt). This module never retries
//! once a byte was written. A TLS handshake that fails (the gateway's
//! certificate refused) is a failed connect: nothing was sent.

mod wire;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::config::UpstreamConfig;
use crate::tls::{GatewayStream, GatewayTls};

pub use wire::{Lost, LostAnswer, HEAD_MAX_BYTES};

/// Largest gateway answer kept in memory for settlement. Ozeki answers are a
/// few hundred bytes per recipient; 20 000 recipients stay far below this.
pub const ANSWER_CAPTURE_MAX_BYTES: usize = 16 * 1024 * 1024;

/// The SMS gateway as the service sees it: send a request, get what became
/// of it. [`Upstream`] is the real one (tollgate's keep-alive pool); tests
/// give the service a fake.
#[async_trait::async_trait]
pub trait Gateway: Send + Sync {
    /// Sends the client's request with `body` (see [`Upstream::forward`])
    /// and reads the whole answer; never retries once a byte was written.
    async fn forward(
        &self,
        client: &RequestHeader,
        body: Bytes,
        client_ip: Option<std::net::IpAddr>,
    ) -> Forwarded;
}

#[async_trait::async_trait]
impl Gateway for Upstream {
    async fn forward(
        &self,
        client: &RequestHeader,
        body: Bytes,
        client_ip: Option<std::net::IpAddr>,
    ) -> Forwarded {
        Upstream::forward(self, client, body, client_ip).await
    }
}

/// Idle gateway connections kept for reuse.
const POOL_MAX_IDLE: usize = 512;

/// How far a forwarded request got.
pub enum Forwarded {
    /// The gateway answered: status, headers and the whole body.
    Answered {
        header: Box<ResponseHeader>,
        body: Bytes,
        latency: Duration,
    },
    /// No byte of the request reached the gateway (connect failed).
    NotSent(String),
    /// The request was (or may have been) written but no usable answer came:
    /// timeout, reset, or an answer too large to keep.
    Unknown(LostAnswer),
}

/// A connection to the gateway: plain or TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<GatewayStream>),
}

impl Conn {
    /// The socket under any TLS.
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An idle keep-alive connection and when it went idle.
struct Idle {
    stream: Conn,
    since: Instant,
}

/// How connections to the gateway are secured.
enum Transport {
    Plain,
    Tls(Arc<GatewayTls>),
    /// `upstream.tls` is set but its connector could not be built (an
    /// unreadable `ca_file`): every connect fails, nothing is sent in the
    /// clear. `server::run` refuses to start in this state; this covers the
    /// other builders of an `App`.
    Broken(String),
}

pub struct Upstream {
    address: SocketAddr,
    /// For pingora's own proxy path (requests tollgate does not own).
    peer: HttpPeer,
    transport: Transport,
    connect_timeout: Duration,
    read_timeout: Duration,
    idle_timeout: Duration,
    /// Most recently used at the back (reused first: warm, least likely
    /// closed by the gateway); oldest at the front.
    idle: Mutex<VecDeque<Idle>>,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Self {
        let transport = match &config.tls {
            None => Transport::Plain,
            Some(tls) => match GatewayTls::new(tls) {
                Ok(t) => Transport::Tls(Arc::new(t)),
                Err(e) => Transport::Broken(e.to_string()),
            },
        };
        let sni = config
            .tls
            .as_ref()
            .and_then(|t| t.sni.clone())
            .unwrap_or_default();
        let mut peer = HttpPeer::new(config.address, config.tls.is_some(), sni);
        peer.options.connection_timeout = Some(config.connect_timeout);
        peer.options.read_timeout = Some(config.read_timeout);
        peer.options.idle_timeout = Some(config.idle_timeout);
        if let Some(tls) = &config.tls {
            // pingora's connector verifies against `sni` (an empty one, as
            // with insecure_skip_verify and no sni, turns verification off).
            peer.options.verify_cert = !tls.insecure_skip_verify;
            peer.options.verify_hostname = !tls.insecure_skip_verify;
            peer.options.alpn = pingora::protocols::ALPN::H1;
            if let Transport::Tls(t) = &transport {
                if let Some(ca) = t.ca_certs() {
                    peer.options.ca = Some(Arc::new(ca.to_vec().into_boxed_slice()));
                }
            }
        }
        Upstream {
            address: config.address,
            peer,
            transport,
            connect_timeout: config.connect_timeout,
            read_timeout: config.read_timeout,
            idle_timeout: config.idle_timeout,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn peer(&self) -> HttpPeer {
        self.peer.clone()
    }

    /// Sends the client's request — its method, raw path and query, its
    /// headers minus hop-by-hop ones, an exact `Content-Length`, and
    /// `X-Forwarded-For` extended by `client_ip` — with `body`, and reads
    /// the whole answer.
    pub async fn forward(
        &self,
        client: &RequestHeader,
        body: Bytes,
        client_ip: Option<std::net::IpAddr>,
    ) -> Forwarded {
        let started = Instant::now();
        let request = wire::encode_request(client, &body, client_ip);
        let mut stream = match self.send(&request).await {
            Ok(s) => s,
            Err(Unsent::Nothing(e)) => return Forwarded::NotSent(e),
            Err(Unsent::Partly(e)) => return Forwarded::Unknown(e),
        };
        // From here the whole request is with the gateway.
        let mut buf = BytesMut::new();
        let answer = match wire::read_answer(
            &mut stream,
            &mut buf,
            &client.method,
            ANSWER_CAPTURE_MAX_BYTES,
            self.read_timeout,
        )
        .await
        {
            Ok(a) => a,
            Err(e) => return Forwarded::Unknown(e),
        };
        let latency = started.elapsed();
        if answer.reusable {
            self.check_in(stream);
        }
        Forwarded::Answered {
            header: answer.header,
            body: answer.body,
            latency,
        }
    }

    /// Writes the request on a pooled connection, or a new one. A pooled
    /// connection that fails before taking a single byte was dead (the
    /// gateway closed it while idle): the next one is tried.
    async fn send(&self, request: &[u8]) -> Result<Conn, Unsent> {
        while let Some(mut stream) = self.check_out() {
            match self.write(&mut stream, request).await {
                Ok(()) => return Ok(stream),
                Err(Unsent::Nothing(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        let mut stream = self.connect().await.map_err(Unsent::Nothing)?;
        self.write(&mut stream, request).await?;
        Ok(stream)
    }

    async fn write(&self, stream: &mut Conn, request: &[u8]) -> Result<(), Unsent> {
        let mut written = 0;
        while written < request.len() {
            let step = tokio::time::timeout(self.read_timeout, stream.write(&request[written..]));
            let (why, failed) = match step.await {
                Ok(Ok(0)) => (Lost::Closed, "connection closed".to_string()),
                Ok(Ok(n)) => {
                    written += n;
                    continue;
                }
                Ok(Err(e)) => (Lost::Reset, e.to_string()),
                Err(_) => (
                    Lost::Timeout,
                    format!("not writable within {} ms", self.read_timeout.as_millis()),
                ),
            };
            let reason = format!("writing the request: {failed}");
            return Err(if written == 0 {
                Unsent::Nothing(reason)
            } else {
                Unsent::Partly(LostAnswer::new(why, reason))
            });
        }
        Ok(())
    }

    /// Connects (and with TLS, handshakes: `connect_timeout` covers both),
    /// retrying one failed connect (nothing was sent, so this is always
    /// safe).
    async fn connect(&self) -> Result<Conn, String> {
        let tls = match &self.transport {
            Transport::Plain => None,
            Transport::Tls(t) => Some(t),
            Transport::Broken(e) => return Err(format!("upstream TLS is not usable: {e}")),
        };
        let mut last = String::new();
        for _ in 0..2 {
            let attempt = async {
                let stream = TcpStream::connect(self.address)
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = stream.set_nodelay(true);
                match tls {
                    None => Ok(Conn::Plain(stream)),
                    Some(t) => t.connect(stream).await.map(|s| Conn::Tls(Box::new(s))),
                }
            };
            match tokio::time::timeout(self.connect_timeout, attempt).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => last = format!("connecting to {}: {e}", self.address),
                Err(_) => {
                    last = format!(
                        "connecting to {}: no answer within {} ms",
                        self.address,
                        self.connect_timeout.as_millis()
                    )
                }
            }
        }
        Err(last)
    }

    /// The most recently used idle connection that is still open. Expired
    /// ones, and ones the gateway closed or wrote to while idle, are dropped.
    fn check_out(&self) -> Option<Conn> {
        let mut idle = self.idle.lock();
        while let Some(Idle { stream, since }) = idle.pop_back() {
            if since.elapsed() >= self.idle_timeout {
                // Everything older is expired too.
                idle.clear();
                return None;
            }
            // Non-blocking: a FIN or stray bytes show as readable. Usually no
            // syscall at all (tokio knows the socket was drained). Under TLS
            // the raw socket is probed: a byte there (a close_notify, say)
            // means the connection is dropped, so taking it is harmless.
            let mut probe = [0u8; 1];
            match stream.tcp().try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(stream),
                _ => continue,
            }
        }
        None
    }

    fn check_in(&self, stream: Conn) {
        let mut idle = self.idle.lock();
        while idle
            .front()
            .is_some_and(|i| i.since.elapsed() >= self.idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() >= POOL_MAX_IDLE {
            idle.pop_front();
        }
        idle.push_back(Idle {
            stream,
            since: Instant::now(),
        });
    }
}

/// Why a request did not go out whole.
enum Unsent {
    /// Not one byte was written.
    Nothing(String),
    /// Some bytes were written: the gateway may act on them.
    Partly(LostAnswer),
}

pub fn strip_hop_by_hop_response(resp: &mut ResponseHeader) {
    // Usually there is none: one pass over the few names present is
    // cheaper than nine map removals.
    let is_hop = |name: &http::HeaderName| wire::HOP_BY_HOP.contains(&name.as_str());
    if !resp.headers.keys().any(is_hop) {
        return;
    }
    for h in wire::HOP_BY_HOP {
        resp.remove_header(h);
    }
}

pub fn append_forwarded_for(req: &mut RequestHeader, ip: std::net::IpAddr) -> pingora::Result<()> {
    let value = match req
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.to_string(),
    };
    req.insert_header("X-Forwarded-For", value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    fn config(address: SocketAddr) -> UpstreamConfig {
        UpstreamConfig {
            address,
            connect_timeout: Duration::from_millis(500),
            read_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(30),
            tls: None,
        }
    }

    fn request() -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/api?action=sendmessage", None).unwrap();
        req.append_header("Host", "gw").unwrap();
        req
    }

    /// A gateway that reads one request head per answer and, per
    /// connection, answers `answers_per_conn` requests, then closes.
    async fn gateway(
        answers_per_conn: usize,
        answer: &'static [u8],
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..answers_per_conn {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.clear();
                        if answer.is_empty() || s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    #[tokio::test]
    async fn keep_alive_connections_are_reused() {
        let (addr, conns) = gateway(usize::MAX, OK).await;
        let up = Upstream::new(&config(addr));
        for _ in 0..5 {
            match up.forward(&request(), Bytes::new(), None).await {
                Forwarded::Answered { body, .. } => assert_eq!(&body[..], b"ok"),
                _ => panic!("no answer"),
            }
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_gateway_closed_while_idle_is_not_used() {
        // One answer per connection, then the gateway closes it.
        let (addr, conns) = gateway(1, OK).await;
        let up = Upstream::new(&config(addr));
        for _ in 0..3 {
            assert!(matches!(
                up.forward(&request(), Bytes::new(), None).await,
                Forwarded::Answered { .. }
            ));
            // Let the FIN arrive and the reactor see it.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn nothing_listening_is_not_sent() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let up = Upstream::new(&config(addr));
        assert!(matches!(
            up.forward(&request(), Bytes::new(), None).await,
            Forwarded::NotSent(_)
        ));
    }

    #[tokio::test]
    async fn a_gateway_that_reads_and_hangs_up_leaves_the_request_in_doubt() {
        let (addr, _) = gateway(1, b"").await;
        let up = Upstream::new(&config(addr));
        assert!(matches!(
            up.forward(&request(), Bytes::new(), None).await,
            Forwarded::Unknown(LostAnswer {
                why: Lost::Closed,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_reset_is_told_from_a_hang_up() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            // Linger 0: the close sends RST, not FIN.
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        });
        let up = Upstream::new(&config(addr));
        match up.forward(&request(), Bytes::new(), None).await {
            Forwarded::Unknown(lost) => assert_eq!(lost.why, Lost::Reset, "{lost}"),
            _ => panic!("expected in doubt"),
        }
    }

    #[tokio::test]
    async fn a_silent_gateway_times_out_in_doubt() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (_s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let up = Upstream::new(&config(addr));
        let started = Instant::now();
        match up.forward(&request(), Bytes::new(), None).await {
            Forwarded::Unknown(lost) => {
                assert!(lost.detail.contains("no answer byte"), "{lost}");
                assert_eq!(lost.why, Lost::Timeout);
            }
            _ => panic!("expected in doubt"),
        }
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    #[tokio::test]
    async fn expired_idle_connections_are_not_reused() {
        let (addr, conns) = gateway(usize::MAX, OK).await;
        let mut cfg = config(addr);
        cfg.idle_timeout = Duration::from_millis(20);
        let up = Upstream::new(&cfg);
        for _ in 0..2 {
            assert!(matches!(
                up.forward(&request(), Bytes::new(), None).await,
                Forwarded::Answered { .. }
            ));
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }
}
