//! Forwarding a fully-read request to the gateway and reading its answer.
//!
//! The Ozeki front door must see a request's whole body before deciding
//! anything (SPEC 1.1), and pingora 0.9 cannot forward a body its
//! `request_filter` already consumed (its retry buffer stops at 64 KiB). So
//! intercepted paths forward here, over pingora's pooled upstream connector,
//! with the original method, path, query and body bytes.
//!
//! The outcome says precisely how far the request got, because settlement
//! depends on it (SPEC 1.3 step 8): a failure to connect means the gateway
//! never saw the request (void); anything after the first byte was written
//! may have reached it (in doubt). This module never retries once a byte was
//! written; it retries a failed *connect* once.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::client::HttpSession;

use crate::config::UpstreamConfig;

/// Largest gateway answer kept in memory for settlement. Ozeki answers are a
/// few hundred bytes per recipient; 20 000 recipients stay far below this.
pub const ANSWER_CAPTURE_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus
/// framing we recompute because the body is forwarded whole.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

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
    Unknown(String),
}

pub struct Upstream {
    connector: Connector,
    peer: HttpPeer,
    read_timeout: Duration,
    idle_timeout: Duration,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Self {
        let mut peer = HttpPeer::new(config.address, false, String::new());
        peer.options.connection_timeout = Some(config.connect_timeout);
        peer.options.read_timeout = Some(config.read_timeout);
        peer.options.idle_timeout = Some(config.idle_timeout);
        Upstream {
            connector: Connector::new(None),
            peer,
            read_timeout: config.read_timeout,
            idle_timeout: config.idle_timeout,
        }
    }

    pub fn address(&self) -> SocketAddr {
        match self.peer._address {
            pingora::protocols::l4::socket::SocketAddr::Inet(a) => a,
            _ => unreachable!("tollgate only configures TCP upstreams"),
        }
    }

    pub fn peer(&self) -> HttpPeer {
        self.peer.clone()
    }

    /// Builds the upstream request header: the client's, minus hop-by-hop
    /// headers, with an exact Content-Length and `X-Forwarded-For`.
    pub fn upstream_header(
        client: &RequestHeader,
        body_len: usize,
        client_ip: Option<std::net::IpAddr>,
    ) -> pingora::Result<RequestHeader> {
        let mut req = client.clone();
        strip_hop_by_hop_request(&mut req);
        if body_len > 0 || client.headers.contains_key("content-length") {
            req.insert_header("Content-Length", body_len.to_string())?;
        }
        if let Some(ip) = client_ip {
            append_forwarded_for(&mut req, ip)?;
        }
        Ok(req)
    }

    /// Sends `header` + `body` and reads the whole answer.
    pub async fn forward(&self, header: RequestHeader, body: Bytes) -> Forwarded {
        let started = Instant::now();
        let mut session = match self.connect().await {
            Ok(s) => s,
            Err(e) => return Forwarded::NotSent(e),
        };
        session.set_read_timeout(Some(self.read_timeout));
        session.set_write_timeout(Some(self.read_timeout));
        // From here on a byte may have reached the gateway.
        if let Err(e) = session.write_request_header(Box::new(header)).await {
            return Forwarded::Unknown(format!("writing request header: {e}"));
        }
        if !body.is_empty() {
            if let Err(e) = session.write_request_body(body, true).await {
                return Forwarded::Unknown(format!("writing request body: {e}"));
            }
        }
        if let Err(e) = session.finish_request_body().await {
            return Forwarded::Unknown(format!("finishing request body: {e}"));
        }
        if let Err(e) = session.read_response_header().await {
            return Forwarded::Unknown(format!("reading answer header: {e}"));
        }
        let header = match session.response_header() {
            Some(h) => Box::new(h.clone()),
            None => return Forwarded::Unknown("no answer header".into()),
        };
        let mut buf = BytesMut::new();
        loop {
            match session.read_response_body().await {
                Ok(Some(chunk)) => {
                    if buf.len() + chunk.len() > ANSWER_CAPTURE_MAX_BYTES {
                        return Forwarded::Unknown("answer larger than the capture limit".into());
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Forwarded::Unknown(format!("reading answer body: {e}")),
            }
        }
        let latency = started.elapsed();
        self.connector
            .release_http_session(session, &self.peer, Some(self.idle_timeout))
            .await;
        Forwarded::Answered {
            header,
            body: buf.freeze(),
            latency,
        }
    }

    /// Connects, retrying one failed connect (nothing was sent, so this is
    /// always safe).
    async fn connect(&self) -> Result<HttpSession, String> {
        let mut last = String::new();
        for _ in 0..2 {
            match self.connector.get_http_session(&self.peer).await {
                Ok((s, _reused)) => return Ok(s),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }
}

pub fn strip_hop_by_hop_request(req: &mut RequestHeader) {
    for h in HOP_BY_HOP {
        req.remove_header(h);
    }
}

pub fn strip_hop_by_hop_response(resp: &mut ResponseHeader) {
    for h in HOP_BY_HOP {
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
