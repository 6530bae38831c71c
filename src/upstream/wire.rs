//! HTTP/1.1 on the gateway connection: the request written in one piece,
//! the answer read whole with its framing (RFC 9112 §6.3).
//!
//! Only what an HTTP/1.1 origin may send is accepted; anything else is an
//! error, never a guess, because settlement reads the body. Sizes are
//! bounded: the head by [`HEAD_MAX_BYTES`], the body by the caller's limit.

use std::io::Write;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderValue, Method, Version};
use pingora::http::{RequestHeader, ResponseHeader};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest answer head (status line and headers) accepted.
pub const HEAD_MAX_BYTES: usize = 64 * 1024;
/// Most headers in one answer head.
const MAX_HEADERS: usize = 128;
/// How much is asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// Why an answer did not come back whole: the `reason` label of
/// `tollgate_upstream_answers_lost_total`. A send whose answer was lost is
/// left in doubt whatever the reason; the reason tells the operator where
/// to look (the network, the gateway's speed, or the gateway's HTTP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// The connection failed under the request or the answer (reset,
    /// broken pipe, any other I/O error).
    Reset,
    /// No byte came within the read timeout.
    Timeout,
    /// The gateway closed the connection before the answer was whole.
    Closed,
    /// The bytes that came are not an HTTP/1.1 answer tollgate can read.
    Unparseable,
    /// The answer is larger than tollgate keeps to settle from.
    TooLarge,
}

impl Lost {
    pub const ALL: [Lost; 5] = [
        Lost::Reset,
        Lost::Timeout,
        Lost::Closed,
        Lost::Unparseable,
        Lost::TooLarge,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Lost::Reset => "reset",
            Lost::Timeout => "timeout",
            Lost::Closed => "closed",
            Lost::Unparseable => "unparseable",
            Lost::TooLarge => "too_large",
        }
    }
}

/// A lost answer: why, and what happened in words for the log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostAnswer {
    pub why: Lost,
    pub detail: String,
}

impl LostAnswer {
    pub fn new(why: Lost, detail: impl Into<String>) -> Self {
        LostAnswer {
            why,
            detail: detail.into(),
        }
    }

    fn closed(detail: &str) -> Self {
        LostAnswer::new(Lost::Closed, detail)
    }

    fn too_large() -> Self {
        LostAnswer::new(Lost::TooLarge, "answer larger than the capture limit")
    }

    fn unparseable(detail: impl Into<String>) -> Self {
        LostAnswer::new(Lost::Unparseable, detail)
    }
}

impl std::fmt::Display for LostAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// One whole answer.
#[derive(Debug)]
pub struct Answer {
    pub header: Box<ResponseHeader>,
    pub body: Bytes,
    /// The connection may carry another request: HTTP/1.1, no
    /// `Connection: close`, self-delimited body, nothing left over.
    pub reusable: bool,
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus
/// framing recomputed because the body is forwarded whole.
pub const HOP_BY_HOP: [&str; 9] = [
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

/// The upstream request as it goes on the wire, written straight from the
/// client's header: request line, the client's fields in their order and
/// case minus hop-by-hop ones (and any the client's `Connection` names),
/// `Content-Length` for the whole body, `X-Forwarded-For` extended by
/// `client_ip`, a blank line and the body.
pub fn encode_request(
    client: &RequestHeader,
    body: &[u8],
    client_ip: Option<std::net::IpAddr>,
) -> BytesMut {
    let path = client.raw_path();
    let mut buf = BytesMut::with_capacity(512 + path.len() + body.len());
    buf.put_slice(client.method.as_str().as_bytes());
    buf.put_u8(b' ');
    buf.put_slice(path);
    buf.put_slice(b" HTTP/1.1\r\n");

    let named_by_connection = |name: &[u8]| {
        client
            .headers
            .get_all(http::header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
    };
    let mut field = |name: &[u8], value: &HeaderValue| {
        if name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"x-forwarded-for")
        {
            // Written below.
        } else if !HOP_BY_HOP
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
            && !named_by_connection(name)
        {
            buf.put_slice(name);
            buf.put_slice(b": ");
            buf.put_slice(value.as_bytes());
            buf.put_slice(b"\r\n");
        }
    };
    if client.has_case() {
        for (name, value) in client.case_header_iter() {
            field(name.as_slice(), value);
        }
    } else {
        for (name, value) in client.headers.iter() {
            field(name.as_str().as_bytes(), value);
        }
    }
    // Writing into a BytesMut cannot fail.
    if !body.is_empty() || client.headers.contains_key(http::header::CONTENT_LENGTH) {
        let _ = write!((&mut buf).writer(), "Content-Length: {}\r\n", body.len());
    }
    let forwarded_for = client.headers.get_all("x-forwarded-for");
    if let Some(ip) = client_ip {
        buf.put_slice(b"X-Forwarded-For: ");
        for prev in forwarded_for {
            buf.put_slice(prev.as_bytes());
            buf.put_slice(b", ");
        }
        let _ = write!((&mut buf).writer(), "{ip}\r\n");
    } else {
        for prev in forwarded_for {
            buf.put_slice(b"X-Forwarded-For: ");
            buf.put_slice(prev.as_bytes());
            buf.put_slice(b"\r\n");
        }
    }
    buf.put_slice(b"\r\n");
    buf.put_slice(body);
    buf
}

/// How the body of an answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

/// Reads one answer from `io`. `buf` holds whatever was already read (it is
/// usually empty); `read_timeout` bounds each wait for bytes.
pub async fn read_answer<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    method: &Method,
    body_max: usize,
    read_timeout: Duration,
) -> Result<Answer, LostAnswer> {
    loop {
        let header = loop {
            if let Some(parsed) = parse_head(buf)? {
                break parsed;
            }
            if buf.len() >= HEAD_MAX_BYTES {
                return Err(LostAnswer::new(
                    Lost::TooLarge,
                    "answer head larger than 64 KiB",
                ));
            }
            if fill(io, buf, read_timeout).await? == 0 {
                return Err(LostAnswer::closed(if buf.is_empty() {
                    "connection closed before an answer"
                } else {
                    "connection closed inside the answer head"
                }));
            }
        };
        let status = header.status.as_u16();
        // Interim answers (100 Continue, 103 Early Hints) come before the
        // real one; 101 would switch protocols, which nothing here asks for.
        if (100..200).contains(&status) {
            if status == 101 {
                return Err(LostAnswer::unparseable("gateway switched protocols"));
            }
            continue;
        }
        let framing = framing(&header, method, status).map_err(LostAnswer::unparseable)?;
        let mut keep_alive = header.version == Version::HTTP_11 && !wants_close(&header);
        let body = match framing {
            Framing::Empty => Bytes::new(),
            Framing::Length(n) => {
                if n > body_max {
                    return Err(LostAnswer::too_large());
                }
                while buf.len() < n {
                    if fill(io, buf, read_timeout).await? == 0 {
                        return Err(LostAnswer::closed(
                            "connection closed inside the answer body",
                        ));
                    }
                }
                buf.split_to(n).freeze()
            }
            Framing::Chunked => read_chunked(io, buf, body_max, read_timeout).await?,
            Framing::UntilClose => {
                keep_alive = false;
                while fill(io, buf, read_timeout).await? != 0 {
                    if buf.len() > body_max {
                        return Err(LostAnswer::too_large());
                    }
                }
                std::mem::take(buf).freeze()
            }
        };
        return Ok(Answer {
            header,
            body,
            reusable: keep_alive && buf.is_empty(),
        });
    }
}

/// Reads more bytes into `buf`; 0 means the peer closed.
async fn fill<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    read_timeout: Duration,
) -> Result<usize, LostAnswer> {
    buf.reserve(READ_CHUNK);
    match tokio::time::timeout(read_timeout, io.read_buf(buf)).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(LostAnswer::new(
            Lost::Reset,
            format!("reading the answer: {e}"),
        )),
        Err(_) => Err(LostAnswer::new(
            Lost::Timeout,
            format!("no answer byte within {} ms", read_timeout.as_millis()),
        )),
    }
}

/// Parses an answer head at the start of `buf` and takes it off `buf`:
/// `None` (and `buf` untouched) until it is whole. Names and values are
/// slices of the head's one buffer, not copies.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Box<ResponseHeader>>, LostAnswer> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(LostAnswer::new(
                Lost::TooLarge,
                format!("answer head with more than {MAX_HEADERS} headers"),
            ))
        }
        Err(e) => {
            return Err(LostAnswer::unparseable(format!(
                "malformed answer head: {e}"
            )))
        }
    };

    let status = resp
        .code
        .ok_or_else(|| LostAnswer::unparseable("answer without a status"))?;
    let mut header = ResponseHeader::build(status, Some(resp.headers.len()))
        .map_err(|_| LostAnswer::unparseable(format!("answer status {status} out of range")))?;
    header.set_version(match resp.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    });
    header
        .set_reason_phrase(resp.reason)
        .map_err(|_| LostAnswer::unparseable("malformed reason phrase"))?;
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| (s.as_ptr() as usize - base, s.len());
    let spans: Vec<_> = resp
        .headers
        .iter()
        .map(|h| (span(h.name.as_bytes()), span(h.value)))
        .collect();
    let head = buf.split_to(head_len).freeze();
    for ((name_at, name_len), (value_at, value_len)) in spans {
        let name = head.slice(name_at..name_at + name_len);
        let value =
            pingora::http::header_value_from_raw(head.slice(value_at..value_at + value_len));
        header
            .append_header(name, value)
            .map_err(|_| LostAnswer::unparseable("malformed answer header"))?;
    }
    Ok(Some(Box::new(header)))
}

fn framing(header: &ResponseHeader, method: &Method, status: u16) -> Result<Framing, String> {
    if *method == Method::HEAD || status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    let te = header.headers.get_all(http::header::TRANSFER_ENCODING);
    if te.iter().next().is_some() {
        // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3 3);
        // the final coding must be chunked or the body runs to the close.
        let last = te
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|c| !c.is_empty());
        return Ok(match last {
            Some(c) if c.eq_ignore_ascii_case("chunked") => Framing::Chunked,
            _ => Framing::UntilClose,
        });
    }
    let mut length: Option<usize> = None;
    for v in header.headers.get_all(http::header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let n = parse_decimal(part.trim_ascii())
                .ok_or_else(|| "malformed Content-Length in the answer".to_string())?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length in the answer".into());
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

fn parse_decimal(s: &[u8]) -> Option<usize> {
    if s.is_empty() || s.len() > 15 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0usize, |n, d| n * 10 + usize::from(d - b'0')))
}

fn wants_close(header: &ResponseHeader) -> bool {
    header
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

/// Decodes a chunked body; trailers are read and dropped.
async fn read_chunked<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    body_max: usize,
    read_timeout: Duration,
) -> Result<Bytes, LostAnswer> {
    let mut body = BytesMut::new();
    loop {
        let (start, size) = loop {
            match httparse::parse_chunk_size(buf) {
                Ok(httparse::Status::Complete((start, size))) => break (start, size),
                Ok(httparse::Status::Partial) => {
                    if buf.len() > HEAD_MAX_BYTES {
                        return Err(LostAnswer::unparseable("chunk size line too long"));
                    }
                    if fill(io, buf, read_timeout).await? == 0 {
                        return Err(LostAnswer::closed(
                            "connection closed inside a chunked answer",
                        ));
                    }
                }
                Err(_) => {
                    return Err(LostAnswer::unparseable(
                        "malformed chunk size in the answer",
                    ))
                }
            }
        };
        if size == 0 {
            let _ = buf.split_to(start);
            return read_trailers(io, buf, read_timeout)
                .await
                .map(|()| body.freeze());
        }
        let size = usize::try_from(size)
            .ok()
            .filter(|&s| body.len().saturating_add(s) <= body_max)
            .ok_or_else(LostAnswer::too_large)?;
        // Chunk data and its CRLF.
        while buf.len() < start + size + 2 {
            if fill(io, buf, read_timeout).await? == 0 {
                return Err(LostAnswer::closed(
                    "connection closed inside a chunked answer",
                ));
            }
        }
        if &buf[start + size..start + size + 2] != b"\r\n" {
            return Err(LostAnswer::unparseable("chunk not followed by CRLF"));
        }
        body.extend_from_slice(&buf[start..start + size]);
        let _ = buf.split_to(start + size + 2);
    }
}

/// Consumes the trailer section after the last chunk, up to its blank line.
async fn read_trailers<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    read_timeout: Duration,
) -> Result<(), LostAnswer> {
    loop {
        if buf.starts_with(b"\r\n") {
            let _ = buf.split_to(2);
            return Ok(());
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let _ = buf.split_to(end + 4);
            return Ok(());
        }
        if buf.len() > HEAD_MAX_BYTES {
            return Err(LostAnswer::new(
                Lost::TooLarge,
                "trailers larger than 64 KiB",
            ));
        }
        if fill(io, buf, read_timeout).await? == 0 {
            return Err(LostAnswer::closed("connection closed inside the trailers"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A reader that hands out `data` in the given piece sizes, then EOF.
    struct Pieces {
        data: Vec<u8>,
        at: usize,
        sizes: Vec<usize>,
        next: usize,
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            out: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let left = self.data.len() - self.at;
            let piece = self
                .sizes
                .get(self.next)
                .copied()
                .unwrap_or(usize::MAX)
                .max(1);
            self.next += 1;
            let n = left.min(piece).min(out.remaining());
            let at = self.at;
            out.put_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    fn read(data: &[u8], sizes: Vec<usize>) -> Result<(Answer, BytesMut), LostAnswer> {
        read_as(data, sizes, Method::GET)
    }

    fn read_as(
        data: &[u8],
        sizes: Vec<usize>,
        method: Method,
    ) -> Result<(Answer, BytesMut), LostAnswer> {
        let mut io = Pieces {
            data: data.to_vec(),
            at: 0,
            sizes,
            next: 0,
        };
        let mut buf = BytesMut::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let answer = rt.block_on(read_answer(
            &mut io,
            &mut buf,
            &method,
            1 << 20,
            Duration::from_secs(5),
        ))?;
        Ok((answer, buf))
    }

    const OZEKI: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 5\r\n\r\n<a/>\n";

    #[test]
    fn content_length_answer_is_read_exactly_and_reusable() {
        let (a, rest) = read(OZEKI, vec![]).unwrap();
        assert_eq!(a.header.status.as_u16(), 200);
        assert_eq!(&a.body[..], b"<a/>\n");
        assert!(a.reusable);
        assert!(rest.is_empty());
        assert_eq!(
            a.header.headers.get("content-type").unwrap().as_bytes(),
            b"text/xml"
        );
    }

    #[test]
    fn header_name_case_and_reason_phrase_survive() {
        let (a, _) = read(
            b"HTTP/1.1 200 Fine Thanks\r\nX-Ozeki-Thing: 1\r\nContent-Length: 0\r\n\r\n",
            vec![],
        )
        .unwrap();
        assert_eq!(a.header.get_reason_phrase(), Some("Fine Thanks"));
        let mut wire = BytesMut::new();
        a.header.header_to_h1_wire(&mut wire);
        assert!(wire.starts_with(b"X-Ozeki-Thing: 1\r\n"), "{wire:?}");
    }

    #[test]
    fn chunked_answer_is_decoded_with_trailers() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\nX-T: 1\r\n\r\n";
        let (a, rest) = read(raw, vec![]).unwrap();
        assert_eq!(&a.body[..], b"abcdefg");
        assert!(a.reusable);
        assert!(rest.is_empty());
    }

    #[test]
    fn answer_without_length_runs_to_the_close_and_is_not_reused() {
        let (a, _) = read(b"HTTP/1.1 200 OK\r\n\r\nhello", vec![]).unwrap();
        assert_eq!(&a.body[..], b"hello");
        assert!(!a.reusable);
    }

    #[test]
    fn connection_close_and_http10_are_not_reused() {
        let (a, _) = read(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n",
            vec![],
        )
        .unwrap();
        assert!(!a.reusable);
        let (a, _) = read(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", vec![]).unwrap();
        assert!(!a.reusable);
    }

    #[test]
    fn interim_answers_are_skipped() {
        let mut raw = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        raw.extend_from_slice(OZEKI);
        let (a, _) = read(&raw, vec![]).unwrap();
        assert_eq!(a.header.status.as_u16(), 200);
        assert_eq!(&a.body[..], b"<a/>\n");
    }

    #[test]
    fn head_and_no_content_answers_have_no_body() {
        let (a, _) = read_as(
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
            vec![],
            Method::HEAD,
        )
        .unwrap();
        assert!(a.body.is_empty());
        assert!(a.reusable);
        let (a, _) = read(b"HTTP/1.1 204 No Content\r\n\r\n", vec![]).unwrap();
        assert!(a.body.is_empty());
    }

    #[test]
    fn bad_answers_are_errors_that_say_why() {
        use Lost::{Closed, Unparseable};
        for (raw, why, lost) in [
            (&b""[..], "closed before", Closed),
            (
                b"HTTP/1.1 200 OK\r\nContent-Le",
                "inside the answer head",
                Closed,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                "inside the answer body",
                Closed,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                "malformed Content-Length",
                Unparseable,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                "conflicting",
                Unparseable,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "chunk size",
                Unparseable,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n",
                "CRLF",
                Unparseable,
            ),
            (b"garbage\r\n\r\n", "malformed answer head", Unparseable),
            (b"HTTP/1.1 101 Switching\r\n\r\n", "switched", Unparseable),
        ] {
            let err = read(raw, vec![])
                .err()
                .unwrap_or_else(|| panic!("{raw:?} read"));
            assert!(err.detail.contains(why), "{raw:?}: {err}");
            assert_eq!(err.why, lost, "{raw:?}: {err}");
        }
    }

    #[test]
    fn lost_labels_are_the_metric_labels() {
        let labels: Vec<&str> = Lost::ALL.iter().map(|l| l.label()).collect();
        assert_eq!(labels, crate::metrics::LOST_ANSWER_REASONS);
    }

    #[test]
    fn limits_hold() {
        let big = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 2 << 20);
        let err = read(big.as_bytes(), vec![]).unwrap_err();
        assert!(err.detail.contains("capture limit"), "{err}");
        assert_eq!(err.why, Lost::TooLarge);
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        while head.len() <= HEAD_MAX_BYTES {
            head.extend_from_slice(b"X-Pad: 0123456789012345678901234567890123456789\r\n");
        }
        assert_eq!(read(&head, vec![]).unwrap_err().why, Lost::TooLarge);
    }

    #[test]
    fn request_is_written_in_one_piece_with_its_case() {
        let mut req = RequestHeader::build("POST", b"/api?action=sendmessage&x=%20", None).unwrap();
        req.append_header("Host", "gw").unwrap();
        req.append_header("X-Custom-Case", "v").unwrap();
        let wire = encode_request(&req, b"body", None);
        assert_eq!(
            &wire[..],
            &b"POST /api?action=sendmessage&x=%20 HTTP/1.1\r\nHost: gw\r\nX-Custom-Case: v\r\n\
               Content-Length: 4\r\n\r\nbody"[..]
        );
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_and_forwarded_for_grows() {
        let mut req = RequestHeader::build("GET", b"/api?action=sendmessage", None).unwrap();
        req.append_header("Host", "gw").unwrap();
        req.append_header("Connection", "keep-alive, X-Hop")
            .unwrap();
        req.append_header("X-Hop", "secret-to-this-hop").unwrap();
        req.append_header("Keep-Alive", "timeout=5").unwrap();
        req.append_header("Transfer-Encoding", "chunked").unwrap();
        req.append_header("Content-Length", "999").unwrap();
        req.append_header("X-Forwarded-For", "10.0.0.1").unwrap();
        req.append_header("X-Forwarded-For", "10.0.0.2").unwrap();
        req.append_header("Accept", "*/*").unwrap();
        let ip = "192.0.2.7".parse().ok();
        let wire = encode_request(&req, b"", ip);
        assert_eq!(
            std::str::from_utf8(&wire).unwrap(),
            "GET /api?action=sendmessage HTTP/1.1\r\nHost: gw\r\nAccept: */*\r\n\
             Content-Length: 0\r\nX-Forwarded-For: 10.0.0.1, 10.0.0.2, 192.0.2.7\r\n\r\n"
        );
    }

    fn arb_answer() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (
            proptest::collection::vec(any::<u8>(), 0..300),
            0usize..3,
            proptest::collection::vec(1usize..40, 1..8),
        )
            .prop_map(|(body, kind, chunks)| {
                let mut raw = b"HTTP/1.1 200 OK\r\nServer: sim\r\n".to_vec();
                match kind {
                    0 => {
                        raw.extend_from_slice(
                            format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes(),
                        );
                        raw.extend_from_slice(&body);
                    }
                    1 => {
                        raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                        let mut rest = &body[..];
                        let mut sizes = chunks.iter().cycle();
                        while !rest.is_empty() {
                            let n = (*sizes.next().unwrap()).min(rest.len());
                            raw.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                            raw.extend_from_slice(&rest[..n]);
                            raw.extend_from_slice(b"\r\n");
                            rest = &rest[n..];
                        }
                        raw.extend_from_slice(b"0\r\n\r\n");
                    }
                    _ => {
                        raw.extend_from_slice(b"Connection: close\r\n\r\n");
                        raw.extend_from_slice(&body);
                    }
                }
                (raw, body)
            })
    }

    proptest! {
        /// However the bytes are split by the network, the body read is
        /// the body sent.
        #[test]
        fn any_split_reads_the_same_body(
            (raw, body) in arb_answer(),
            sizes in proptest::collection::vec(1usize..64, 0..40),
        ) {
            let (a, rest) = read(&raw, sizes).unwrap();
            prop_assert_eq!(&a.body[..], &body[..]);
            prop_assert!(rest.is_empty());
        }

        /// Arbitrary bytes never panic and never claim more than was sent.
        #[test]
        fn arbitrary_bytes_never_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..600),
            with_head in any::<bool>(),
            sizes in proptest::collection::vec(1usize..64, 0..10),
        ) {
            let mut raw = if with_head { b"HTTP/1.1 200 OK\r\n".to_vec() } else { Vec::new() };
            raw.extend_from_slice(&tail);
            if let Ok((a, _)) = read(&raw, sizes) {
                prop_assert!(a.body.len() <= raw.len());
            }
        }
    }
}
