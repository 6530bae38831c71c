//! The outbox's HTTP/1.1 client: one request per connection, `http://`
//! or `https://` (TLS 1.2+ through [`RelayTls`]: the peer's certificate
//! verified against `outbox.ca_file` or the system's trust store, and its
//! name against the URL's host), the whole call — connect, handshake,
//! request, status line — under one timeout, only the status line read (at
//! most [`HEAD_MAX_BYTES`] of the answer). A URL with anything but visible
//! ASCII in its path, or a header with a line break, is refused before a
//! byte is written (no request smuggling from a template).

use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Item;
use crate::tls::RelayTls;

/// Most bytes of an answer read while looking for its status line.
pub const HEAD_MAX_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CallError {
    #[error("not an http:// or https:// URL the outbox can call")]
    BadUrl,
    #[error("{0}")]
    Tls(String),
    #[error("a header name or value is not allowed")]
    BadHeader,
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("i/o: {0}")]
    Io(String),
    #[error("no answer within the timeout")]
    Timeout,
    #[error("malformed answer")]
    Malformed,
    #[error("answered HTTP {0}")]
    Status(u16),
}

/// A URL the outbox calls, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The `Host` header.
    pub authority: String,
    /// `host:port` to connect to.
    pub addr: String,
    /// The name (or address) TLS verifies; brackets of IPv6 removed.
    pub host: String,
    pub path: String,
    pub tls: bool,
}

/// `http[s]://host[:port]/path?query`, split.
pub(crate) fn split_url(url: &str) -> Option<Target> {
    let (tls, rest) = match url.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (false, url.strip_prefix("http://")?),
    };
    let (authority, addr, path) = split_rest(rest, if tls { 443 } else { 80 })?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("").to_string()
    } else {
        authority.split(':').next().unwrap_or("").to_string()
    };
    if host.is_empty() {
        return None;
    }
    Some(Target {
        authority,
        addr,
        host,
        path,
        tls,
    })
}

fn split_rest(rest: &str, default_port: u16) -> Option<(String, String, String)> {
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let visible = |s: &str| s.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if !visible(authority) || !visible(&path) {
        return None;
    }
    // Strip a fragment: never sent.
    let path = path.split('#').next().unwrap_or("/").to_string();
    let addr = if authority.starts_with('[') {
        if authority.contains("]:") {
            authority.to_string()
        } else {
            format!("{authority}:{default_port}")
        }
    } else if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    Some((authority.to_string(), addr, path))
}

/// Calls `item` once; `Ok` on a 2xx answer. An `https://` target needs
/// `tls` (without it: [`CallError::BadUrl`]).
pub async fn call(item: &Item, timeout: Duration, tls: Option<&RelayTls>) -> Result<(), CallError> {
    match tokio::time::timeout(timeout, call_inner(item, tls)).await {
        Ok(r) => r,
        Err(_) => Err(CallError::Timeout),
    }
}

async fn call_inner(item: &Item, tls: Option<&RelayTls>) -> Result<(), CallError> {
    let target = split_url(&item.target).ok_or(CallError::BadUrl)?;
    let connector = match (target.tls, tls) {
        (true, None) => return Err(CallError::BadUrl),
        (true, Some(t)) => Some(t),
        (false, _) => None,
    };
    let (authority, addr, path) = (&target.authority, &target.addr, &target.path);
    let method = item.method.as_str();
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(CallError::BadUrl);
    }
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (name, value) in &item.headers {
        let bad_name = name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if bad_name || value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(CallError::BadHeader);
        }
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "X-Tollgate-Delivery-Id: {}\r\n",
        item.dedupe_key
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .collect::<String>()
    ));
    if !item.body.is_empty() || method != "GET" {
        head.push_str(&format!("Content-Length: {}\r\n", item.body.len()));
    }
    head.push_str("\r\n");
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| CallError::Connect(e.kind().to_string()))?;
    let _ = stream.set_nodelay(true);
    match connector {
        Some(t) => {
            let tls = t
                .connect(stream, &target.host)
                .await
                .map_err(CallError::Tls)?;
            exchange(tls, head, &item.body).await
        }
        None => exchange(stream, head, &item.body).await,
    }
}

/// Writes the request and reads the status line.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    head: String,
    body: &[u8],
) -> Result<(), CallError> {
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| CallError::Io(e.kind().to_string()))?;
    if !body.is_empty() {
        stream
            .write_all(body)
            .await
            .map_err(|e| CallError::Io(e.kind().to_string()))?;
    }
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| CallError::Io(e.kind().to_string()))?;
        if n == 0 {
            return Err(CallError::Malformed);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let code = response.code.ok_or(CallError::Malformed)?;
                return if (200..300).contains(&code) {
                    Ok(())
                } else {
                    Err(CallError::Status(code))
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < HEAD_MAX_BYTES => continue,
            Ok(httparse::Status::Partial) | Err(_) => {
                // A status line alone is enough to judge.
                return match parse_status_line(&buf) {
                    Some(code) if (200..300).contains(&code) => Ok(()),
                    Some(code) => Err(CallError::Status(code)),
                    None => Err(CallError::Malformed),
                };
            }
        }
    }
}

fn parse_status_line(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `http://` URL split into (authority, host:port, path).
    fn split_http_url(url: &str) -> Option<(String, String, String)> {
        split_url(url)
            .filter(|t| !t.tls)
            .map(|t| (t.authority, t.addr, t.path))
    }

    #[test]
    fn urls_split_or_are_refused() {
        assert_eq!(
            split_http_url("http://example.com/r?a=1"),
            Some((
                "example.com".into(),
                "example.com:80".into(),
                "/r?a=1".into()
            ))
        );
        assert_eq!(
            split_http_url("http://127.0.0.1:9/x"),
            Some(("127.0.0.1:9".into(), "127.0.0.1:9".into(), "/x".into()))
        );
        assert_eq!(
            split_http_url("http://h?q=1").map(|t| t.2),
            Some("/?q=1".into())
        );
        let t = split_url("https://localhost:8443/r?a=1").unwrap();
        assert!(t.tls);
        assert_eq!(
            (
                t.authority.as_str(),
                t.addr.as_str(),
                t.host.as_str(),
                t.path.as_str()
            ),
            ("localhost:8443", "localhost:8443", "localhost", "/r?a=1")
        );
        assert_eq!(split_url("https://h/").unwrap().addr, "h:443");
        assert_eq!(split_url("https://[::1]/").unwrap().host, "::1");
        assert!(!split_url("http://h/").unwrap().tls);
        for bad in ["https:///x", "ftp://h/", "https://u:p@h/"] {
            assert_eq!(split_url(bad), None, "{bad}");
        }
        for bad in [
            "https://example.com/",
            "http:///x",
            "http://u:p@h/",
            "http://h/a b",
            "http://h/a\r\nX: y",
            "ftp://h/",
        ] {
            assert_eq!(split_http_url(bad), None, "{bad}");
        }
    }

    #[test]
    fn status_lines_are_read() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(parse_status_line(b"SSH-2.0\r\n"), None);
    }
}
