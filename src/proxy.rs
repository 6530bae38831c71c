//! The pingora glue: pingora I/O only. For every request outside `mode:
//! passthrough` it checks the header size, asks the service for admission
//! (per-address limits), routes by `api::owned`, reads the body of what the
//! service owns (bounded, timed, `100 Continue` first), builds one
//! `service::Request`, calls `service::handle`, writes the `Reply` it gets,
//! and logs. Requests that are no door's — other paths, body-less Ozeki
//! requests whose action tollgate does not own, and everything in `mode:
//! passthrough` — go through pingora's own proxy path, streamed.
//!
//! Nothing here decides what a request costs or how it is answered; the
//! only answers made here are about the transport (431, 413, 408, 400 for
//! framing, 403 for a blocked path, and pingora's own errors), each with the
//! gateway's `Server` header.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};

use crate::api::owned::Route;
use crate::config::Mode;
use crate::handover::{self, Readiness, Slot};
use crate::limits::ActiveGuard;
use crate::redact::redacted_url;
use crate::service::{
    self, respond, AccessLog, App, Door, Intake, Outcome, Refusal, Reply, Request, Shape,
};
use crate::upstream;

pub use crate::service::respond::SERVER_HEADER;

pub struct TollgateProxy {
    /// The app, late-bound: a stand-in without the ledger while a
    /// successor waits for its store (`handover.rs`).
    pub slot: Arc<Slot>,
}

impl TollgateProxy {
    pub fn new(app: Arc<App>) -> Self {
        TollgateProxy {
            slot: Slot::serving(app),
        }
    }

    pub fn with_slot(slot: Arc<Slot>) -> Self {
        TollgateProxy { slot }
    }
}

/// What one request did, for metrics and the access log.
pub struct RequestCtx {
    started: Instant,
    front_door: &'static str,
    outcome: Outcome,
    log: AccessLog,
    request_id: Option<String>,
    /// When pingora's own proxy path started talking to the gateway; its
    /// upstream latency is measured from here to the end of the relay.
    upstream_started: Option<Instant>,
    /// This request's place in the per-address concurrency count (SPEC 7),
    /// released when pingora drops the context after logging.
    active: Option<ActiveGuard>,
}

#[async_trait]
impl ProxyHttp for TollgateProxy {
    type CTX = RequestCtx;

    /// No downstream modules. pingora's default adds a response-compression
    /// module that is disabled yet still built and consulted for every
    /// request; the gateway's answers are relayed as they are.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            front_door: "passthrough",
            outcome: Outcome::Forwarded,
            log: AccessLog::default(),
            request_id: None,
            upstream_started: None,
            active: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if self.slot.readiness() == Readiness::HandingOver {
            // Handing over: every answer closes its connection, so a
            // keep-alive client's next request opens a new one (which the
            // successor accepts once pingora stops this process listening).
            session.set_keepalive(None);
        }
        let app = &self.slot.current();
        let snapshot = app.snapshot.load_full();
        if snapshot.mode == Mode::Passthrough {
            return Ok(false);
        }
        let downstream = &app.config.downstream;
        session.set_read_timeout(Some(downstream.read_timeout));
        if header_bytes(session.req_header()) > downstream.header_limit_bytes {
            let reply = Reply::local(
                431,
                respond::CONTENT_TYPE_TEXT,
                Bytes::from_static(b"Request header fields too large\n"),
                Outcome::HeaderTooLarge,
            );
            return self.answer(session, ctx, closing(reply)).await;
        }
        let client_ip = client_ip(session);
        let admission = service::admit(app, &snapshot, client_ip);
        ctx.active = admission.active;
        let route = {
            let req = session.req_header();
            app.router.route(req.uri.path(), req.uri.query())
        };
        let door = match route {
            Route::Forward if admission.limited.is_none() => return Ok(false),
            Route::Blocked => {
                let refusal = Refusal::with_text(crate::error::ErrorCode::Forbidden, "Forbidden")
                    .outcome(Outcome::Blocked);
                return self.refuse_plain(session, ctx, refusal).await;
            }
            Route::Ozeki => Door::Ozeki,
            // Only the Ozeki door answers a limit refusal in its own shape
            // (once its parameters are read); anything else gets plain 429.
            _ if admission.limited.is_some() => {
                let limit = admission.limited.expect("checked");
                let refusal = Refusal::limited(limit).text("Too many requests");
                return self.refuse_plain(session, ctx, refusal).await;
            }
            Route::Boxis => Door::Boxis,
            Route::Soap => Door::Soap,
            Route::Forward => unreachable!("forwarded above"),
        };
        ctx.front_door = door.label();
        let mut params = None;
        if door == Door::Ozeki {
            let has_body = request_has_body(session);
            let query = session.req_header().uri.query();
            match service::intake(app, &snapshot, query, has_body, admission.limited.is_some()) {
                Intake::Stream { action } => {
                    ctx.log.action = action;
                    return Ok(false);
                }
                Intake::Read => {}
                Intake::Parsed(p) => params = Some(p),
            }
        }
        let body = if params.is_some() {
            // Nothing to read: no timer, no body reader.
            Bytes::new()
        } else {
            let limit = match door {
                Door::Ozeki => app.config.ozeki.body_limit_bytes,
                Door::Boxis => app.config.boxis.body_limit_bytes,
                Door::Soap => app.config.soap.body_limit_bytes,
            };
            match self.read_body_timed(session, limit).await? {
                Ok(body) => body,
                Err(BodyRefused::TooLarge) => {
                    let reply = service::too_large(app, door, session.req_header());
                    self.answer(session, ctx, reply).await?;
                    linger(session).await;
                    return Ok(true);
                }
                Err(refused) => return self.answer_body_refused(session, ctx, refused).await,
            }
        };
        let request_id = app.new_request_id();
        ctx.request_id = Some(request_id.clone());
        let reply = handover::serve(
            &self.slot,
            Request {
                door,
                head: session.req_header(),
                body,
                client_ip,
                request_id,
                limited: admission.limited,
                params,
            },
        )
        .await;
        self.answer(session, ctx, reply).await
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.slot.current().upstream.peer()))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_started = Some(Instant::now());
        if let Some(ip) = client_ip(session) {
            upstream::append_forwarded_for(upstream_request, ip)?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.log.upstream_status = Some(upstream_response.status.as_u16());
        Ok(())
    }

    /// What pingora's own error logs say about a request: its default
    /// repeats the URL, and Ozeki URLs carry passwords.
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let req = session.req_header();
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        format!(
            "{} {}, Host: {host}",
            req.method,
            redacted_url(
                req.uri.path(),
                req.uri.query(),
                self.slot.current().config.log.message_text
            )
        )
    }

    /// An error on pingora's own proxy path (or one a filter returned): the
    /// answer is tollgate's, with the gateway's `Server` header, and the
    /// outcome says whose fault it was — a client that went away or sent
    /// a malformed body is not an upstream error.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let failure = Failure::of(e);
        if ctx.outcome == Outcome::Forwarded {
            ctx.outcome = failure.outcome;
        }
        let answered = session
            .response_written()
            .is_some_and(|r| !r.status.is_informational());
        if failure.status > 0 && !answered {
            session.set_keepalive(None);
            let text = Bytes::from_static(failure.text.as_bytes());
            let reply = Reply::local(
                failure.status,
                respond::CONTENT_TYPE_TEXT,
                text,
                ctx.outcome,
            );
            if let Err(e) = write_reply(session, reply).await {
                tracing::debug!(error = %e, "the error answer could not be written");
            }
        }
        FailToProxy {
            error_code: failure.status,
            can_reuse_downstream: false,
        }
    }

    /// pingora logs every failed request at error level; a client that
    /// hung up is not one an operator needs to see.
    fn suppress_error_log(
        &self,
        _session: &Session,
        ctx: &RequestCtx,
        _e: &pingora::Error,
    ) -> bool {
        ctx.outcome == Outcome::ClientClosed
    }

    async fn logging(
        &self,
        session: &mut Session,
        e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        if let (Some(e), Outcome::Forwarded) = (e, ctx.outcome) {
            ctx.outcome = Failure::of(e).outcome;
        }
        let action = match ctx.log.action {
            "" => "-",
            a => a,
        };
        let latency = ctx.started.elapsed();
        let app = self.slot.current();
        let m = &app.metrics;
        if let (Some(t), None) = (ctx.upstream_started, ctx.log.upstream_latency) {
            // pingora's own proxy path: the gateway's answer was relayed
            // as it streamed, so its latency ends now.
            let upstream = t.elapsed();
            ctx.log.upstream_latency = Some(upstream);
            m.upstream_latency
                .with_label_values(&[action])
                .observe(upstream.as_secs_f64());
        }
        let outcome = ctx.outcome.label();
        m.requests
            .with_label_values(&[ctx.front_door, action, outcome])
            .inc();
        m.request_latency
            .with_label_values(&[ctx.front_door, action])
            .observe(latency.as_secs_f64());
        let req = session.req_header();
        let log = &ctx.log;
        // Absent values are left out of the line rather than faked.
        tracing::info!(
            target: "tollgate::access",
            front_door = ctx.front_door,
            action,
            account = log.account.as_deref(),
            outcome,
            cost_milli = log.cost_milli,
            reservation_id = log.reservation_id,
            upstream_status = log.upstream_status,
            upstream_latency_us = log.upstream_latency.map(|d| d.as_micros() as u64),
            latency_us = latency.as_micros() as u64,
            status = session.response_written().map(|r| r.status.as_u16()),
            method = req.method.as_str(),
            url = %redacted_url(req.uri.path(), req.uri.query(), app.config.log.message_text),
            client = session.client_addr().map(|a| a.to_string()).as_deref(),
            request_id = ctx.request_id.as_deref(),
        );
    }
}

impl TollgateProxy {
    /// Writes `reply` and records what it says for the access line.
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        reply: Reply,
    ) -> Result<bool> {
        ctx.outcome = reply.outcome;
        let log = std::mem::take(&mut ctx.log);
        ctx.log = AccessLog {
            action: if reply.log.action.is_empty() {
                log.action
            } else {
                reply.log.action
            },
            ..reply.log.clone()
        };
        write_reply(session, reply).await?;
        Ok(true)
    }

    /// A plain-text refusal of a request no door answers in its own shape,
    /// with a lingering close when the client may still be sending a body.
    async fn refuse_plain(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        refusal: Refusal,
    ) -> Result<bool> {
        let has_body = request_has_body(session);
        let mut reply = respond::refuse(Shape::Plain, refusal);
        reply.close = has_body || reply.outcome == Outcome::Blocked;
        self.answer(session, ctx, reply).await?;
        if has_body {
            linger(session).await;
        }
        Ok(true)
    }

    /// Reads the whole body within `downstream.body_timeout`, up to `limit`
    /// bytes. Sends `100 Continue` first when the client asked for it and
    /// the declared length is acceptable (RFC 9110 §10.1.1). `Ok(Err(_))`
    /// is a body tollgate refuses (the caller answers); `Err` is a broken
    /// connection.
    async fn read_body_timed(
        &self,
        session: &mut Session,
        limit: usize,
    ) -> Result<std::result::Result<Bytes, BodyRefused>> {
        let deadline = self.slot.current().config.downstream.body_timeout;
        let refused = match tokio::time::timeout(deadline, read_body(session, limit)).await {
            Ok(Ok(Some(body))) => return Ok(Ok(body)),
            Ok(Ok(None)) => BodyRefused::TooLarge,
            // A client that stalls longer than `downstream.read_timeout`
            // between two reads: a client error, not a server one.
            Ok(Err(e)) if matches!(e.etype(), pingora::ErrorType::ReadTimedout) => {
                BodyRefused::Timeout
            }
            Ok(Err(e)) if is_bad_framing(&e) => BodyRefused::BadFraming,
            Ok(Err(e)) => return Err(e),
            Err(_) => BodyRefused::Timeout,
        };
        Ok(Err(refused))
    }

    /// Answers a body refused for its timing or framing and closes the
    /// connection (after a lingering read for framing errors: the client
    /// may still be sending).
    async fn answer_body_refused(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        refused: BodyRefused,
    ) -> Result<bool> {
        let (status, text, outcome): (u16, &'static [u8], Outcome) = match refused {
            BodyRefused::TooLarge => (413, b"Request body too large\n", Outcome::BodyTooLarge),
            BodyRefused::Timeout => (
                408,
                b"Request body not received in time\n",
                Outcome::BodyTimeout,
            ),
            BodyRefused::BadFraming => (
                400,
                b"Malformed request body framing\n",
                Outcome::BadRequest,
            ),
        };
        let reply = Reply::local(
            status,
            respond::CONTENT_TYPE_TEXT,
            Bytes::from_static(text),
            outcome,
        );
        self.answer(session, ctx, closing(reply)).await?;
        if refused != BodyRefused::Timeout {
            linger(session).await;
        }
        Ok(true)
    }
}

/// The same reply, closing the connection after it.
fn closing(mut reply: Reply) -> Reply {
    reply.close = true;
    reply
}

async fn write_reply(session: &mut Session, reply: Reply) -> Result<()> {
    if reply.close {
        session.set_keepalive(None);
    }
    session.write_response_header(reply.header, false).await?;
    session.write_response_body(Some(reply.body), true).await?;
    Ok(())
}

/// What an error on the proxy path means for the client: the status of
/// tollgate's answer (0: the connection is gone, nothing can be sent), its
/// text and the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Failure {
    status: u16,
    text: &'static str,
    outcome: Outcome,
}

impl Failure {
    fn of(e: &pingora::Error) -> Failure {
        use pingora::{ErrorSource, ErrorType};
        let failure = |status, text, outcome| Failure {
            status,
            text,
            outcome,
        };
        match (e.esource(), e.etype()) {
            (_, ErrorType::HTTPStatus(code)) => {
                failure(*code, "Request failed\n", Outcome::ClientError)
            }
            (ErrorSource::Downstream, ErrorType::ReadTimedout) => {
                failure(408, "Request Timeout\n", Outcome::ClientTimeout)
            }
            (
                ErrorSource::Downstream,
                ErrorType::ReadError
                | ErrorType::WriteError
                | ErrorType::ConnectionClosed
                | ErrorType::WriteTimedout
                | ErrorType::Custom("PrematureBodyEnd"),
            ) => failure(0, "", Outcome::ClientClosed),
            (ErrorSource::Downstream, _) => failure(400, "Bad Request\n", Outcome::BadRequest),
            (ErrorSource::Upstream, _) => failure(502, "Bad Gateway\n", Outcome::UpstreamError),
            (ErrorSource::Internal | ErrorSource::Unset, _) => {
                failure(500, "Internal Server Error\n", Outcome::InternalError)
            }
        }
    }
}

/// Why tollgate refused to take a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyRefused {
    /// Over the door's body limit (413).
    TooLarge,
    /// Not received within `downstream.body_timeout`, or a read stalled
    /// past `downstream.read_timeout` (408).
    Timeout,
    /// A malformed or overflowing chunk size, a bad trailer (400): the
    /// client's error.
    BadFraming,
}

/// Whether a body read failed on the client's framing (pingora's chunked
/// decoder) rather than on the connection.
fn is_bad_framing(e: &pingora::Error) -> bool {
    // pingora's body decoder names these error types (`pingora-core`
    // `protocols/http/v1/body.rs`, not exported).
    matches!(
        e.etype(),
        pingora::ErrorType::Custom("InvalidChunk" | "InvalidTrailerEnd")
    )
}

/// `Expect: 100-continue` on an HTTP/1.1 request.
fn expects_continue(req: &RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && req
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

fn client_ip(session: &Session) -> Option<std::net::IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// Bytes of the request line and headers, as received (roughly: names,
/// values and separators).
fn header_bytes(req: &RequestHeader) -> usize {
    let line = req.method.as_str().len()
        + req.uri.path().len()
        + req.uri.query().map_or(0, |q| q.len() + 1)
        + 12;
    req.headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}

fn request_has_body(session: &Session) -> bool {
    let h = &session.req_header().headers;
    h.contains_key("transfer-encoding")
        || h.get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
}

/// Reads the whole request body; `None` if it exceeds `limit` bytes.
async fn read_body(session: &mut Session, limit: usize) -> Result<Option<Bytes>> {
    let declared = session
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Ok(None);
    }
    if expects_continue(session.req_header()) {
        session.write_continue_response().await?;
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = session.read_request_body().await? {
        if buf.len() + chunk.len() > limit {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(buf.freeze()))
}

/// After refusing a body, reads and discards what the client is still
/// sending (bounded in bytes and time) so that closing the connection does
/// not reset it before the client has read our answer — a lingering close.
async fn linger(session: &mut Session) {
    const LINGER_MAX_BYTES: usize = 64 * 1024 * 1024;
    const LINGER_MAX: std::time::Duration = std::time::Duration::from_secs(5);
    let mut drained = 0usize;
    let _ = tokio::time::timeout(LINGER_MAX, async {
        while let Ok(Some(chunk)) = session.read_request_body().await {
            drained += chunk.len();
            if drained > LINGER_MAX_BYTES {
                break;
            }
        }
    })
    .await;
}
