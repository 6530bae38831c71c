//! The relay's wire format: one request frame from the old process to its
//! successor over the relay socket, one answer frame back (`relay.rs`).
//!
//! Both ends are tollgate processes on one host and the socket is the
//! operator's (mode 0600), yet every frame is read with a size limit and
//! every field is bounds-checked: a malformed frame is an error, never a
//! panic, and never reaches the service.
//!
//! ```text
//! request:  "TGQ1" u32:len | u8:door u32:wait_ms str:client_ip str:request_id
//!           str:method bytes:path u8:version u16:n (bytes:name bytes:value)×n
//!           bytes:body
//! answer:   "TGA1" u32:len | u8:kind (0 answered, 1 misdirected)
//!           [u16:status u16:n (bytes:name bytes:value)×n bytes:body
//!            str:outcome u8:close str:action opt-str:account opt-i64:cost
//!            opt-u64:reservation opt-u16:upstream_status opt-u64:upstream_us]
//! ```
//! `bytes` is a u32 length and the bytes; `str` the same, UTF-8; `opt-` a
//! u8 presence flag first. Integers are big-endian.

use std::net::IpAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::service::{AccessLog, Door, Outcome, Reply};

pub const REQUEST_MAGIC: &[u8; 4] = b"TGQ1";
pub const ANSWER_MAGIC: &[u8; 4] = b"TGA1";
/// Most header fields a frame may carry.
pub const MAX_HEADERS: usize = 1024;

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not a relay frame (bad magic)")]
    Magic,
    #[error("relay frame of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("relay frame truncated")]
    Truncated,
    #[error("relay frame field invalid: {0}")]
    Invalid(&'static str),
}

/// A request as the old process read it, for its successor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayedRequest {
    pub door: Door,
    /// How much longer the client may wait for a process that serves.
    pub wait: Duration,
    pub client_ip: Option<IpAddr>,
    pub request_id: String,
    pub method: String,
    pub path: Vec<u8>,
    pub http10: bool,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Bytes,
}

impl RelayedRequest {
    /// Captures what the service reads of a request.
    pub fn capture(
        req: &crate::service::Request<'_>,
        wait: Duration,
    ) -> Result<RelayedRequest, FrameError> {
        let head = req.head;
        let headers: Vec<(Vec<u8>, Vec<u8>)> = if head.has_case() {
            head.case_header_iter()
                .map(|(n, v)| (n.as_slice().to_vec(), v.as_bytes().to_vec()))
                .collect()
        } else {
            head.headers
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect()
        };
        if headers.len() > MAX_HEADERS {
            return Err(FrameError::Invalid("too many header fields"));
        }
        Ok(RelayedRequest {
            door: req.door,
            wait,
            client_ip: req.client_ip,
            request_id: req.request_id.clone(),
            method: head.method.as_str().to_string(),
            path: head.raw_path().to_vec(),
            http10: head.version == http::Version::HTTP_10,
            headers,
            body: req.body.clone(),
        })
    }

    /// The request header again, names in their original case and order.
    pub fn head(&self) -> Result<RequestHeader, FrameError> {
        let mut head =
            RequestHeader::build(self.method.as_str(), &self.path, Some(self.headers.len()))
                .map_err(|_| FrameError::Invalid("request line"))?;
        head.set_version(if self.http10 {
            http::Version::HTTP_10
        } else {
            http::Version::HTTP_11
        });
        for (name, value) in &self.headers {
            let name = std::str::from_utf8(name).map_err(|_| FrameError::Invalid("header name"))?;
            let value = http::HeaderValue::from_bytes(value)
                .map_err(|_| FrameError::Invalid("header value"))?;
            head.append_header(name.to_string(), value)
                .map_err(|_| FrameError::Invalid("header name"))?;
        }
        Ok(head)
    }

    pub fn encode(&self) -> Bytes {
        let mut b = Body::default();
        b.u8(door_code(self.door));
        b.u32(self.wait.as_millis().min(u32::MAX as u128) as u32);
        b.str(&self.client_ip.map(|ip| ip.to_string()).unwrap_or_default());
        b.str(&self.request_id);
        b.str(&self.method);
        b.bytes(&self.path);
        b.u8(self.http10 as u8);
        b.u16(self.headers.len() as u16);
        for (n, v) in &self.headers {
            b.bytes(n);
            b.bytes(v);
        }
        b.bytes(&self.body);
        b.finish(REQUEST_MAGIC)
    }

    /// Reads the body of a request frame (after its magic and length).
    pub fn decode(body: &[u8]) -> Result<RelayedRequest, FrameError> {
        let mut r = Reader { buf: body };
        let door = match r.u8()? {
            0 => Door::Ozeki,
            1 => Door::Boxis,
            2 => Door::Soap,
            _ => return Err(FrameError::Invalid("door")),
        };
        let wait = Duration::from_millis(u64::from(r.u32()?));
        let ip = r.str()?;
        let client_ip = if ip.is_empty() {
            None
        } else {
            Some(
                ip.parse()
                    .map_err(|_| FrameError::Invalid("client address"))?,
            )
        };
        let request_id = r.str()?;
        let method = r.str()?;
        let path = r.bytes()?.to_vec();
        let http10 = r.u8()? != 0;
        let n = r.u16()? as usize;
        if n > MAX_HEADERS {
            return Err(FrameError::Invalid("too many header fields"));
        }
        let mut headers = Vec::with_capacity(n);
        for _ in 0..n {
            headers.push((r.bytes()?.to_vec(), r.bytes()?.to_vec()));
        }
        let body = Bytes::copy_from_slice(r.bytes()?);
        r.end()?;
        Ok(RelayedRequest {
            door,
            wait,
            client_ip,
            request_id,
            method,
            path,
            http10,
            headers,
            body,
        })
    }
}

/// What the successor answered.
#[derive(Debug)]
pub enum Answer {
    Answered(Reply),
    /// Not processed: this process does not serve relayed requests (it is
    /// handing over itself). The old process tries again.
    Misdirected,
}

pub fn encode_answer(answer: &Answer) -> Bytes {
    let mut b = Body::default();
    match answer {
        Answer::Misdirected => b.u8(1),
        Answer::Answered(reply) => {
            b.u8(0);
            b.u16(reply.header.status.as_u16());
            let headers: Vec<(&[u8], &[u8])> = reply
                .header
                .case_header_iter()
                .map(|(n, v)| (n.as_slice(), v.as_bytes()))
                .collect();
            b.u16(headers.len().min(MAX_HEADERS) as u16);
            for (n, v) in headers.into_iter().take(MAX_HEADERS) {
                b.bytes(n);
                b.bytes(v);
            }
            b.bytes(&reply.body);
            b.str(reply.outcome.label());
            b.u8(reply.close as u8);
            let log = &reply.log;
            b.str(log.action);
            b.opt(log.account.as_deref(), |b, a| b.str(a));
            b.opt(log.cost_milli, |b, c| b.u64(c as u64));
            b.opt(log.reservation_id, |b, r| b.u64(r));
            b.opt(log.upstream_status, |b, s| b.u16(s));
            b.opt(log.upstream_latency, |b, d| {
                b.u64(d.as_micros().min(u64::MAX as u128) as u64)
            });
        }
    }
    b.finish(ANSWER_MAGIC)
}

pub fn decode_answer(body: &[u8]) -> Result<Answer, FrameError> {
    let mut r = Reader { buf: body };
    match r.u8()? {
        1 => {
            r.end()?;
            return Ok(Answer::Misdirected);
        }
        0 => {}
        _ => return Err(FrameError::Invalid("answer kind")),
    }
    let status = r.u16()?;
    let n = r.u16()? as usize;
    if n > MAX_HEADERS {
        return Err(FrameError::Invalid("too many header fields"));
    }
    let mut header =
        ResponseHeader::build(status, Some(n)).map_err(|_| FrameError::Invalid("status"))?;
    for _ in 0..n {
        let name = std::str::from_utf8(r.bytes()?)
            .map_err(|_| FrameError::Invalid("header name"))?
            .to_string();
        let value = http::HeaderValue::from_bytes(r.bytes()?)
            .map_err(|_| FrameError::Invalid("header value"))?;
        header
            .append_header(name, value)
            .map_err(|_| FrameError::Invalid("header name"))?;
    }
    let body = Bytes::copy_from_slice(r.bytes()?);
    let outcome = Outcome::from_label(&r.str()?).ok_or(FrameError::Invalid("outcome"))?;
    let close = r.u8()? != 0;
    let action = crate::service::action_label(&r.str()?);
    let account = r.opt(|r| r.str())?;
    let cost_milli = r.opt(|r| r.u64().map(|c| c as i64))?;
    let reservation_id = r.opt(|r| r.u64())?;
    let upstream_status = r.opt(|r| r.u16())?;
    let upstream_latency = r.opt(|r| r.u64().map(Duration::from_micros))?;
    r.end()?;
    Ok(Answer::Answered(Reply {
        header: Box::new(header),
        body,
        outcome,
        close,
        log: AccessLog {
            action,
            account,
            cost_milli,
            reservation_id,
            upstream_status,
            upstream_latency,
        },
    }))
}

fn door_code(door: Door) -> u8 {
    match door {
        Door::Ozeki => 0,
        Door::Boxis => 1,
        Door::Soap => 2,
    }
}

/// Splits a frame's prefix: checks `magic` and returns the body length,
/// refused past `max`.
pub fn frame_len(prefix: &[u8; 8], magic: &[u8; 4], max: usize) -> Result<usize, FrameError> {
    if &prefix[..4] != magic {
        return Err(FrameError::Magic);
    }
    let len = u32::from_be_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// A frame body being written.
#[derive(Default)]
struct Body {
    buf: BytesMut,
}

impl Body {
    fn u8(&mut self, v: u8) {
        self.buf.put_u8(v);
    }
    fn u16(&mut self, v: u16) {
        self.buf.put_u16(v);
    }
    fn u32(&mut self, v: u32) {
        self.buf.put_u32(v);
    }
    fn u64(&mut self, v: u64) {
        self.buf.put_u64(v);
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.buf.put_slice(v);
    }
    fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    fn opt<T>(&mut self, v: Option<T>, put: impl FnOnce(&mut Body, T)) {
        match v {
            Some(v) => {
                self.u8(1);
                put(self, v);
            }
            None => self.u8(0),
        }
    }
    fn finish(self, magic: &[u8; 4]) -> Bytes {
        let mut out = BytesMut::with_capacity(8 + self.buf.len());
        out.put_slice(magic);
        out.put_u32(self.buf.len() as u32);
        out.put_slice(&self.buf);
        out.freeze()
    }
}

/// A frame body being read; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], FrameError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Result<String, FrameError> {
        std::str::from_utf8(self.bytes()?)
            .map(str::to_string)
            .map_err(|_| FrameError::Invalid("text"))
    }
    fn opt<T>(
        &mut self,
        get: impl FnOnce(&mut Reader<'a>) -> Result<T, FrameError>,
    ) -> Result<Option<T>, FrameError> {
        match self.u8()? {
            0 => Ok(None),
            1 => get(self).map(Some),
            _ => Err(FrameError::Invalid("presence flag")),
        }
    }
    fn end(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Invalid("trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> RelayedRequest {
        RelayedRequest {
            door: Door::Ozeki,
            wait: Duration::from_millis(9_500),
            client_ip: Some("10.1.2.3".parse().unwrap()),
            request_id: "18f-2a".into(),
            method: "POST".into(),
            path: b"/api?action=sendmessage".to_vec(),
            http10: false,
            headers: vec![
                (b"Host".to_vec(), b"gw".to_vec()),
                (
                    b"content-TYPE".to_vec(),
                    b"application/x-www-form-urlencoded".to_vec(),
                ),
            ],
            body: Bytes::from_static(b"username=john&password=secret1"),
        }
    }

    #[test]
    fn a_request_frame_round_trips_with_header_case_and_order() {
        let req = sample();
        let frame = req.encode();
        let len = frame_len(frame[..8].try_into().unwrap(), REQUEST_MAGIC, 1 << 20).unwrap();
        assert_eq!(len, frame.len() - 8);
        let back = RelayedRequest::decode(&frame[8..]).unwrap();
        assert_eq!(back, req);
        let head = back.head().unwrap();
        let names: Vec<Vec<u8>> = head
            .case_header_iter()
            .map(|(n, _)| n.as_slice().to_vec())
            .collect();
        assert_eq!(names, vec![b"Host".to_vec(), b"content-TYPE".to_vec()]);
        assert_eq!(head.uri.query(), Some("action=sendmessage"));
    }

    #[test]
    fn an_answer_frame_round_trips() {
        let reply = Reply::local(200, "application/xml", "<x/>", Outcome::Settled);
        let mut reply = reply.with_header("X-Tollgate-Cost", "2");
        reply.log = AccessLog {
            action: "sendmessage",
            account: Some("john".into()),
            cost_milli: Some(2000),
            reservation_id: Some(7),
            upstream_status: Some(200),
            upstream_latency: Some(Duration::from_micros(1234)),
        };
        let frame = encode_answer(&Answer::Answered(reply));
        let Answer::Answered(back) = decode_answer(&frame[8..]).unwrap() else {
            panic!("misdirected")
        };
        assert_eq!(back.status(), 200);
        assert_eq!(back.body, Bytes::from_static(b"<x/>"));
        assert_eq!(back.outcome, Outcome::Settled);
        assert_eq!(back.log.account.as_deref(), Some("john"));
        assert_eq!(back.log.reservation_id, Some(7));
        assert_eq!(
            back.header
                .headers
                .get("x-tollgate-cost")
                .unwrap()
                .as_bytes(),
            b"2"
        );
        let frame = encode_answer(&Answer::Misdirected);
        assert!(matches!(
            decode_answer(&frame[8..]),
            Ok(Answer::Misdirected)
        ));
    }

    #[test]
    fn a_bad_prefix_is_refused_before_anything_is_read() {
        let frame = sample().encode();
        let mut prefix: [u8; 8] = frame[..8].try_into().unwrap();
        assert_eq!(
            frame_len(&prefix, REQUEST_MAGIC, 10),
            Err(FrameError::TooLarge {
                len: frame.len() - 8,
                max: 10
            })
        );
        prefix[0] = b'X';
        assert_eq!(
            frame_len(&prefix, REQUEST_MAGIC, 1 << 20),
            Err(FrameError::Magic)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = RelayedRequest::decode(&bytes).map(|r| r.head());
            let _ = decode_answer(&bytes);
        }

        #[test]
        fn every_truncation_of_a_frame_is_an_error(cut in 0usize..200) {
            let frame = sample().encode();
            let body = &frame[8..];
            prop_assume!(cut < body.len());
            prop_assert!(RelayedRequest::decode(&body[..cut]).is_err());
        }

        #[test]
        fn requests_round_trip(
            body in proptest::collection::vec(any::<u8>(), 0..256),
            id in "[a-f0-9-]{0,20}",
            wait in 0u32..100_000,
        ) {
            let mut req = sample();
            req.body = Bytes::from(body);
            req.request_id = id;
            req.wait = Duration::from_millis(u64::from(wait));
            let frame = req.encode();
            prop_assert_eq!(RelayedRequest::decode(&frame[8..]).unwrap(), req);
        }
    }
}
