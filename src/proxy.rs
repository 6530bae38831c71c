//! The pingora glue: one phase → one call into the service layer.
//!
//! Requests on the Ozeki paths that tollgate must look at are read whole
//! (up to `ozeki.body_limit_bytes`), decided by `service::ozeki`, and either
//! answered locally or forwarded with their original bytes by `upstream`
//! (pingora cannot forward a body its `request_filter` consumed). Everything
//! else — other paths, GETs of actions tollgate does not own (and
//! `receivemessage` unless the tariff in force sets a receive price), and
//! every request in `mode: passthrough` — goes through pingora's own proxy
//! path untouched.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};

use crate::api::multipart;
use crate::api::owned::Route;
use crate::api::ozeki::command::{action_of, names_owned_action};
use crate::api::ozeki::params::{
    parse_params, parse_params_and_fields, sniff_action, ParamError, ParamLimits, Params,
};
use crate::config::Mode;
use crate::error::ErrorCode;
use crate::idempotency::{self, Begin, Claim, StoredAnswer};
use crate::limits::{ActiveGuard, Refusal};
use crate::service::ozeki::{self, Decision, LocalAnswer, PendingReceive, PendingSend};
use crate::service::{App, Snapshot};
use crate::upstream::{self, Forwarded};

/// The `Server` header of the gateway we stand in for (SPEC 1.5); local
/// answers carry it so a client cannot tell who answered.
pub const SERVER_HEADER: &str = "OzekiNG/3.0.1 Microsoft-HTTPAPI/1.0";

pub struct TollgateProxy {
    pub app: Arc<App>,
    param_limits: ParamLimits,
}

impl TollgateProxy {
    pub fn new(app: Arc<App>) -> Self {
        // The body limit already bounds memory; a tighter per-value limit
        // would make tollgate visible by refusing requests it does not own.
        let param_limits = ParamLimits {
            max_value_len: app.config.ozeki.body_limit_bytes,
            ..ParamLimits::default()
        };
        TollgateProxy { app, param_limits }
    }
}

/// What one request did, for metrics and the access log.
pub struct RequestCtx {
    started: Instant,
    front_door: &'static str,
    action: String,
    outcome: &'static str,
    request_id: Option<String>,
    /// The account name the client gave (logged, never a metric label:
    /// unbounded); at most [`ACCOUNT_LOG_MAX_CHARS`] characters.
    account: Option<String>,
    cost_milli: Option<i64>,
    /// The send's reservation, so a log line joins the ledger's entries.
    reservation_id: Option<u64>,
    upstream_status: Option<u16>,
    /// When pingora's own proxy path started talking to the gateway; its
    /// upstream latency is measured from here to the end of the relay.
    upstream_started: Option<Instant>,
    upstream_latency: Option<std::time::Duration>,
    /// This request's place in the per-IP concurrency count (SPEC 7),
    /// released when pingora drops the context after logging.
    active: Option<ActiveGuard>,
    /// The `Idempotency-Key` claim of a first request (SPEC 3.4): completed
    /// with the answer when it is written, or released.
    idempotency: Option<Claim>,
}

/// Longest account name an access line repeats (a client may send any
/// `username`; valid names are at most 64 characters).
const ACCOUNT_LOG_MAX_CHARS: usize = 64;

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
            action: String::new(),
            outcome: "forwarded",
            request_id: None,
            account: None,
            cost_milli: None,
            reservation_id: None,
            upstream_status: None,
            upstream_started: None,
            upstream_latency: None,
            active: None,
            idempotency: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let snapshot = self.app.snapshot.load_full();
        if snapshot.mode == Mode::Passthrough {
            return Ok(false);
        }
        // SPEC 7: per-IP limits before anything is parsed. Ozeki requests
        // are refused in Ozeki's shape once their parameters are read.
        let limited = match self.admit(session, ctx, &snapshot).await? {
            Admission::Go => None,
            Admission::Answered => return Ok(true),
            Admission::Limited(refusal) => Some(refusal),
        };
        let client_ip = client_ip(session);
        let route = {
            let req = session.req_header();
            self.app.router.route(req.uri.path(), req.uri.query())
        };
        if let (Some(refusal), false) = (limited, route == Route::Ozeki) {
            return self.answer_limited_plain(session, ctx, refusal).await;
        }
        match route {
            Route::Forward => return Ok(false),
            Route::Blocked => return self.answer_blocked(session, ctx).await,
            Route::Boxis => {
                return self
                    .serve_credit_door(session, ctx, CreditDoor::Boxis)
                    .await
            }
            Route::Soap => return self.serve_credit_door(session, ctx, CreditDoor::Soap).await,
            Route::Ozeki => {}
        }
        ctx.front_door = "ozeki";
        let query: Option<Bytes> = session
            .req_header()
            .uri
            .query()
            .map(|q| Bytes::copy_from_slice(q.as_bytes()));

        // Requests without a body whose action tollgate does not own stream
        // through pingora untouched; so does `receivemessage` unless the
        // tariff in force charges for received messages.
        let has_body = request_has_body(session);
        // Without a body the query is all there is: parsed once, here.
        let mut query_params = None;
        if !has_body {
            if let Ok(params) = parse_params(query.as_deref(), None, &self.param_limits) {
                let action = action_of(&params).unwrap_or_default();
                let priced_receive = snapshot.tariff.receive_price_milli() > 0
                    && crate::api::ozeki::inbox::names_receive(&params);
                if !names_owned_action(&params) && !priced_receive {
                    ctx.action = action_label(&action);
                    if let Some(refusal) = limited {
                        let decision = ozeki::limited_answer(&params, refusal);
                        self.carry_out(session, ctx, Bytes::new(), decision).await?;
                        return Ok(true);
                    }
                    return Ok(false);
                }
                query_params = Some(params);
            }
        }

        let body = if has_body {
            let limit = self.app.config.ozeki.body_limit_bytes;
            match self.read_body_timed(session, ctx, limit).await? {
                Ok(body) => body,
                Err(refused) => return self.answer_body_refused(session, ctx, refused).await,
            }
        } else {
            // Nothing to read: no timer, no body reader.
            Bytes::new()
        };
        let parsed = match query_params {
            // Only set for a request without a body.
            Some(p) => Ok(p),
            None => self.ozeki_params(session, query.as_deref(), &body),
        };
        let params = match parsed {
            Ok(p) => p,
            Err(e) => {
                // Malformed encoding: refused, never forwarded — the gateway
                // might read it differently than we did.
                ctx.outcome = "invalid_request";
                let action = sniff_action(query.as_deref(), Some(&body)).unwrap_or_default();
                ctx.action = action_label(&action);
                let message = format!("{}: {e}", ErrorCode::InvalidRequest.message());
                write_ozeki_error(session, 200, &action, ErrorCode::InvalidRequest, &message)
                    .await?;
                return Ok(true);
            }
        };
        ctx.action = action_label(&action_of(&params).unwrap_or_default());
        ctx.account = params
            .get("username")
            .map(|u| u.chars().take(ACCOUNT_LOG_MAX_CHARS).collect());
        let request_id = self.app.new_request_id();
        ctx.request_id = Some(request_id.clone());

        let decision = match limited {
            Some(refusal) => ozeki::limited_answer(&params, refusal),
            None => {
                if self
                    .ozeki_idempotency(session, ctx, &snapshot, &params, &body, client_ip)
                    .await?
                {
                    return Ok(true);
                }
                ozeki::decide(&self.app, &snapshot, &params, &request_id, client_ip).await
            }
        };
        self.carry_out(session, ctx, body, decision).await?;
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.app.upstream.peer()))
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
        ctx.upstream_status = Some(upstream_response.status.as_u16());
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
            redacted_url(req.uri.path(), req.uri.query())
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
        if ctx.outcome == "forwarded" {
            ctx.outcome = failure.outcome;
        }
        let answered = session
            .response_written()
            .is_some_and(|r| !r.status.is_informational());
        if failure.status > 0 && !answered {
            session.set_keepalive(None);
            let body = Bytes::from_static(failure.text.as_bytes());
            if let Err(e) = write_answer(session, failure.status, "text/plain", body, &[]).await {
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
        ctx.outcome == "client_closed"
    }

    async fn logging(
        &self,
        session: &mut Session,
        e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        if let (Some(e), "forwarded") = (e, ctx.outcome) {
            ctx.outcome = Failure::of(e).outcome;
        }
        let action = if ctx.action.is_empty() {
            "-"
        } else {
            ctx.action.as_str()
        };
        let latency = ctx.started.elapsed();
        let m = &self.app.metrics;
        if let (Some(t), None) = (ctx.upstream_started, ctx.upstream_latency) {
            // pingora's own proxy path: the gateway's answer was relayed
            // as it streamed, so its latency ends now.
            let upstream = t.elapsed();
            ctx.upstream_latency = Some(upstream);
            m.upstream_latency
                .with_label_values(&[action])
                .observe(upstream.as_secs_f64());
        }
        m.requests
            .with_label_values(&[ctx.front_door, action, ctx.outcome])
            .inc();
        m.request_latency
            .with_label_values(&[ctx.front_door, action])
            .observe(latency.as_secs_f64());
        let req = session.req_header();
        // Absent values are left out of the line rather than faked.
        tracing::info!(
            target: "tollgate::access",
            front_door = ctx.front_door,
            action,
            account = ctx.account.as_deref(),
            outcome = ctx.outcome,
            cost_milli = ctx.cost_milli,
            reservation_id = ctx.reservation_id,
            upstream_status = ctx.upstream_status,
            upstream_latency_us = ctx.upstream_latency.map(|d| d.as_micros() as u64),
            latency_us = latency.as_micros() as u64,
            status = session.response_written().map(|r| r.status.as_u16()),
            method = req.method.as_str(),
            url = %redacted_url(req.uri.path(), req.uri.query()),
            client = session.client_addr().map(|a| a.to_string()).as_deref(),
            request_id = ctx.request_id.as_deref(),
        );
    }
}

impl TollgateProxy {
    /// Forwards the original request bytes, settles a send (or charges a
    /// priced receive), and relays the answer unchanged (plus
    /// `X-Tollgate-Cost`/`X-Tollgate-Balance` when credit moved).
    async fn forward_and_settle(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        body: Bytes,
        pending: Option<PendingSend>,
        receive: Option<PendingReceive>,
    ) -> Result<()> {
        let client_ip = client_ip(session);
        let mut pending = pending;
        if let Some(guard) = pending.as_mut().and_then(|p| p.guard.as_mut()) {
            // From here a dropped context (client gone, shutdown) may belong
            // to a sent message: in doubt, never void.
            guard.forwarding();
        }
        let forwarded = self
            .app
            .upstream
            .forward(session.req_header(), body, client_ip)
            .await;
        if let Forwarded::Answered {
            header, latency, ..
        } = &forwarded
        {
            ctx.upstream_status = Some(header.status.as_u16());
            ctx.upstream_latency = Some(*latency);
            self.app
                .metrics
                .upstream_latency
                .with_label_values(&[&ctx.action])
                .observe(latency.as_secs_f64());
        }
        let mut extra: Vec<(&'static str, String)> = Vec::new();
        if let Some(send) = pending {
            ctx.cost_milli = Some(send.cost_milli);
            ctx.reservation_id = send.guard.as_ref().map(|g| g.id().0);
            let account = send.account.clone();
            let charged = send.guard.is_some();
            let settled = ozeki::settle(send, &forwarded);
            ctx.outcome = settled.outcome();
            if charged {
                extra.push((
                    "X-Tollgate-Cost",
                    crate::money::format_credits(ctx.cost_milli.unwrap_or(0)),
                ));
                if let Some(view) = self.app.ledger.account(&account) {
                    extra.push((
                        "X-Tollgate-Balance",
                        crate::money::format_credits(view.anytime.available_milli()),
                    ));
                }
            }
        }
        if let Some(receive) = receive {
            let charge = ozeki::charge_receive(&self.app, &receive, &forwarded).await;
            ctx.outcome = charge.outcome;
            if !receive.shadow {
                ctx.cost_milli = Some(charge.charged_milli);
                extra.push((
                    "X-Tollgate-Cost",
                    crate::money::format_credits(charge.charged_milli),
                ));
                if let Some(view) = self.app.ledger.account(&receive.account) {
                    extra.push((
                        "X-Tollgate-Balance",
                        crate::money::format_credits(view.anytime.available_milli()),
                    ));
                }
            }
        }
        match forwarded {
            Forwarded::Answered {
                mut header, body, ..
            } => {
                upstream::strip_hop_by_hop_response(&mut header);
                header.insert_header("Content-Length", body.len().to_string())?;
                for (k, v) in extra {
                    header.insert_header(k, v)?;
                }
                self.record_answer(ctx, &header, &body);
                session.write_response_header(header, false).await?;
                session.write_response_body(Some(body), true).await?;
            }
            Forwarded::NotSent(reason) => {
                tracing::warn!(request_id = ctx.request_id.as_deref().unwrap_or("-"), %reason, "gateway unreachable");
                if ctx.outcome == "forwarded" {
                    ctx.outcome = "upstream_unavailable";
                }
                // Nothing reached the gateway (any reservation is void): a
                // retry with the same key may run.
                if let Some(claim) = ctx.idempotency.take() {
                    claim.release();
                }
                let code = ErrorCode::UpstreamUnavailable;
                write_ozeki_error(session, 502, &ctx.action, code, code.message()).await?;
            }
            Forwarded::Unknown(reason) => {
                tracing::warn!(request_id = ctx.request_id.as_deref().unwrap_or("-"), %reason, "gateway answer lost");
                if ctx.outcome == "forwarded" {
                    ctx.outcome = "upstream_error";
                }
                let body = Bytes::from_static(b"Gateway answer lost\n");
                let header = local_header(504, "text/plain", body.len(), &[])?;
                // The send may have gone out: a retry with the same key
                // gets this answer, never a second send.
                self.record_answer(ctx, &header, &body);
                session.write_response_header(header, false).await?;
                session.write_response_body(Some(body), true).await?;
            }
        }
        Ok(())
    }
}

/// The other vendors' credit doors (SPEC 2): answered by tollgate, never
/// forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CreditDoor {
    Boxis,
    Soap,
}

impl TollgateProxy {
    /// Reads the body whole (bounded by the door's limit), lets the door's
    /// service answer, and writes the answer.
    async fn serve_credit_door(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        door: CreditDoor,
    ) -> Result<bool> {
        use crate::service::{boxis, soap};
        let req = session.req_header();
        let header = |name: &str| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let method = req.method.as_str().to_string();
        let query = req.uri.query().map(str::to_string);
        let (host, content_type, soap_action) =
            (header("host"), header("content-type"), header("soapaction"));
        let config = &self.app.config;
        let (limit, front_door) = match door {
            CreditDoor::Boxis => (config.boxis.body_limit_bytes, "boxis"),
            CreditDoor::Soap => (config.soap.body_limit_bytes, "soap"),
        };
        ctx.front_door = front_door;
        let request_id = self.app.new_request_id();
        ctx.request_id = Some(request_id.clone());
        let now_s = self.app.clock.now_unix_ms().div_euclid(1000);
        let body = match self.read_body_timed(session, ctx, limit).await? {
            Ok(body) => Some(body),
            Err(BodyRefused::TooLarge) => None,
            Err(refused) => return self.answer_body_refused(session, ctx, refused).await,
        };
        if let (Some(body), CreditDoor::Soap) = (&body, door) {
            if self.soap_idempotency(session, ctx, body).await? {
                return Ok(true);
            }
        }
        let (action, answer) = match (&body, door) {
            (None, CreditDoor::Boxis) => ("other", boxis::too_large(&[], now_s)),
            (None, CreditDoor::Soap) => ("other", soap::too_large(content_type.as_deref())),
            (Some(body), CreditDoor::Boxis) => boxis::handle(
                &self.app,
                &boxis::BoxisHttpRequest {
                    client_ip: client_ip(session),
                    method: &method,
                    content_type: content_type.as_deref(),
                    body,
                },
                now_s,
            ),
            (Some(body), CreditDoor::Soap) => {
                let request = soap::SoapHttpRequest {
                    client_ip: client_ip(session),
                    method: &method,
                    query: query.as_deref(),
                    host: host.as_deref(),
                    content_type: content_type.as_deref(),
                    soap_action: soap_action.as_deref(),
                    body,
                };
                soap::handle(&self.app, &request, &request_id).await
            }
        };
        ctx.action = action.to_string();
        ctx.outcome = answer.outcome;
        if body.is_none() {
            session.set_keepalive(None);
        }
        let allow = [("Allow", "GET, POST".to_string())];
        let extra: &[(&'static str, String)] = if answer.status == 405 { &allow } else { &[] };
        let h = local_header(answer.status, answer.content_type, answer.body.len(), extra)?;
        self.record_answer(ctx, &h, answer.body.as_bytes());
        session.write_response_header(h, false).await?;
        session
            .write_response_body(Some(Bytes::from(answer.body)), true)
            .await?;
        if body.is_none() {
            linger(session).await;
        }
        Ok(true)
    }
}

// ---------------------------------------------------------------------------
// Protection (SPEC 7) and idempotency (SPEC 3.4): the pingora side. The
// decisions are `limits` and `idempotency`; this only moves bytes.
// ---------------------------------------------------------------------------

/// The Ozeki actions an `Idempotency-Key` applies to (SPEC 3.4).
const IDEMPOTENT: [&str; 3] = ["sendmessage", "addcredits", "setcredits"];

/// What admission decided for a request.
enum Admission {
    Go,
    /// Over a per-IP limit. Ozeki requests are answered in Ozeki's shape
    /// once their parameters are read; others at once.
    Limited(Refusal),
    /// Already answered (header too large).
    Answered,
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

impl TollgateProxy {
    /// First thing for every request outside passthrough: the body read
    /// timeout, the header size, then the per-IP concurrency and rate.
    async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        snapshot: &Snapshot,
    ) -> Result<Admission> {
        let downstream = &self.app.config.downstream;
        session.set_read_timeout(Some(downstream.read_timeout));
        if header_bytes(session.req_header()) > downstream.header_limit_bytes {
            ctx.outcome = "header_too_large";
            session.set_keepalive(None);
            write_answer(
                session,
                431,
                "text/plain",
                Bytes::from_static(b"Request header fields too large\n"),
                &[],
            )
            .await?;
            return Ok(Admission::Answered);
        }
        let ip = client_ip(session);
        let shadow_all = snapshot.mode == Mode::Shadow;
        let limiter = &self.app.limiter;
        match limiter.enter_request(&snapshot.limits, ip, shadow_all) {
            Ok(guard) => ctx.active = guard,
            Err(refusal) => return Ok(Admission::Limited(refusal)),
        }
        Ok(
            match limiter.check_source_ip(&snapshot.limits, ip, shadow_all) {
                Ok(()) => Admission::Go,
                Err(refusal) => Admission::Limited(refusal),
            },
        )
    }

    /// HTTP 429 for a request that is not an Ozeki action (plain text).
    async fn answer_limited_plain(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        refusal: Refusal,
    ) -> Result<bool> {
        ctx.outcome = "rate_limited";
        let has_body = request_has_body(session);
        if has_body {
            session.set_keepalive(None);
        }
        write_answer(
            session,
            429,
            "text/plain",
            Bytes::from_static(b"Too many requests\n"),
            &[("Retry-After", refusal.retry_after_s.to_string())],
        )
        .await?;
        if has_body {
            linger(session).await;
        }
        Ok(true)
    }

    /// Carries out an Ozeki decision: a local answer, or forwarding.
    async fn carry_out(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        body: Bytes,
        decision: Decision,
    ) -> Result<()> {
        match decision {
            Decision::Answer(answer) => {
                ctx.outcome = answer.outcome;
                self.write_local_recorded(session, ctx, answer, &[]).await
            }
            Decision::RateLimited {
                answer,
                retry_after_s,
            } => {
                ctx.outcome = answer.outcome;
                let extra = [("Retry-After", retry_after_s.to_string())];
                self.write_local_recorded(session, ctx, answer, &extra)
                    .await
            }
            Decision::Forward(pending) => {
                self.forward_and_settle(session, ctx, body, pending, None)
                    .await
            }
            Decision::ForwardReceive(receive) => {
                self.forward_and_settle(session, ctx, body, None, Some(receive))
                    .await
            }
        }
    }

    async fn write_local_recorded(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        answer: LocalAnswer,
        extra: &[(&'static str, String)],
    ) -> Result<()> {
        let body = Bytes::from(answer.body);
        let header = local_header(answer.status, answer.content_type, body.len(), extra)?;
        self.record_answer(ctx, &header, &body);
        session.write_response_header(header, false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }

    /// Reads the whole body within `downstream.body_timeout`, up to `limit`
    /// bytes. Sends `100 Continue` first when the client asked for it and
    /// the declared length is acceptable (RFC 9110 §10.1.1). `Ok(Err(_))`
    /// is a body tollgate refuses (the caller answers); `Err` is a broken
    /// connection.
    async fn read_body_timed(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        limit: usize,
    ) -> Result<std::result::Result<Bytes, BodyRefused>> {
        let deadline = self.app.config.downstream.body_timeout;
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
        ctx.outcome = refused.outcome();
        Ok(Err(refused))
    }

    /// Answers a refused body and closes the connection after a lingering
    /// read (the client may still be sending). (A body too large for a
    /// credit door is answered by the door in its own shape instead.)
    async fn answer_body_refused(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        refused: BodyRefused,
    ) -> Result<bool> {
        ctx.outcome = refused.outcome();
        session.set_keepalive(None);
        let (status, text): (u16, &'static [u8]) = match refused {
            BodyRefused::TooLarge => (413, b"Request body too large\n"),
            BodyRefused::Timeout => (408, b"Request body not received in time\n"),
            BodyRefused::BadFraming => (400, b"Malformed request body framing\n"),
        };
        write_answer(session, status, "text/plain", Bytes::from_static(text), &[]).await?;
        if refused != BodyRefused::Timeout {
            linger(session).await;
        }
        Ok(true)
    }

    /// Refuses a request on one of `ozeki.blocked_paths` (never forwarded).
    async fn answer_blocked(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.outcome = "blocked";
        let has_body = request_has_body(session);
        session.set_keepalive(None);
        write_answer(
            session,
            403,
            "text/plain",
            Bytes::from_static(b"Forbidden\n"),
            &[],
        )
        .await?;
        if has_body {
            linger(session).await;
        }
        Ok(true)
    }

    /// The Ozeki parameters of a request whose body was read: the query and
    /// the body, whatever its `Content-Type` says (a `multipart/form-data`
    /// body as its fields, anything else as a form), so that a send cannot
    /// hide behind a content type.
    fn ozeki_params(
        &self,
        session: &Session,
        query: Option<&[u8]>,
        body: &[u8],
    ) -> std::result::Result<Params, ParamError> {
        let content_type = session
            .req_header()
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        match content_type {
            Some(ct) if !body.is_empty() && multipart::is_multipart(ct) => {
                let boundary = multipart::boundary(ct)?;
                let fields = multipart::parse(body, &boundary, self.param_limits.max_params)?;
                parse_params_and_fields(query, &fields, &self.param_limits)
            }
            _ => parse_params(query, Some(body), &self.param_limits),
        }
    }

    /// Binds the request's idempotency key (if it holds one) to the answer
    /// about to be written, or releases it when nothing happened.
    fn record_answer(&self, ctx: &mut RequestCtx, header: &ResponseHeader, body: &[u8]) {
        let Some(claim) = ctx.idempotency.take() else {
            return;
        };
        if idempotency::releases(&ctx.action, ctx.outcome) {
            claim.release();
            return;
        }
        let headers = header
            .headers
            .iter()
            .filter(|(name, _)| idempotency::should_store_header(name.as_str()))
            .map(|(name, value)| {
                (
                    name.as_str().to_string(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        claim.complete(StoredAnswer {
            status: header.status.as_u16(),
            headers,
            body: body.to_vec(),
        });
    }

    /// SPEC 3.4 for an Ozeki send or credit change carrying an
    /// `Idempotency-Key`: `Ok(true)` when answered here (a replay or a
    /// refusal); otherwise the request goes on, holding the key's claim in
    /// `ctx` if the key is new.
    async fn ozeki_idempotency(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        snapshot: &Snapshot,
        params: &Params,
        body: &Bytes,
        client_ip: Option<std::net::IpAddr>,
    ) -> Result<bool> {
        let Some(raw) = session.req_header().headers.get(idempotency::HEADER) else {
            return Ok(false);
        };
        let action = action_of(params).unwrap_or_default();
        if !IDEMPOTENT.contains(&action.as_str()) {
            return Ok(false);
        }
        if !idempotency::valid_key(raw.as_bytes()) {
            ctx.outcome = "invalid_request";
            let message =
                "Invalid request: Idempotency-Key must be 1 to 255 visible ASCII characters";
            write_ozeki_error(session, 400, &action, ErrorCode::InvalidRequest, message).await?;
            return Ok(true);
        }
        let key = String::from_utf8_lossy(raw.as_bytes()).into_owned();
        // No account to scope the key by: the request fails authentication.
        let Some(account) = params.get("username") else {
            return Ok(false);
        };
        let req = session.req_header();
        // Secret values are left out of the fingerprint (it is stored).
        let query = redact_query("", req.uri.query());
        let body_part = match std::str::from_utf8(body) {
            Ok(text) => redact_query("", Some(text)).into_bytes(),
            Err(_) => body.to_vec(),
        };
        let fingerprint = idempotency::fingerprint(&[
            req.method.as_str().as_bytes(),
            req.uri.path().as_bytes(),
            query.as_bytes(),
            &body_part,
        ]);
        let (status, code, text, outcome) = match self
            .app
            .begin_idempotent(account, &key, fingerprint)
            .await
        {
            Begin::Fresh(claim) => {
                ctx.idempotency = Some(claim);
                return Ok(false);
            }
            Begin::Replay(answer) => {
                // Only to a caller who could have made the first request;
                // anyone else goes the normal way (and fails to log in).
                if !ozeki::caller_verified(&self.app, snapshot, client_ip, params, &action).await {
                    return Ok(false);
                }
                ctx.outcome = "idempotent_replay";
                write_stored(session, answer).await?;
                return Ok(true);
            }
            Begin::Mismatch => (
                422,
                ErrorCode::InvalidRequest,
                "Invalid request: this Idempotency-Key was used with a different request",
                "idempotency_mismatch",
            ),
            Begin::Interrupted => (
                409,
                ErrorCode::Replayed,
                "The first request with this Idempotency-Key did not finish; its outcome is unknown",
                "idempotency_conflict",
            ),
            Begin::InProgress => (
                409,
                ErrorCode::Replayed,
                "The first request with this Idempotency-Key is still in progress",
                "idempotency_conflict",
            ),
            Begin::Full | Begin::Unavailable => (
                503,
                ErrorCode::StoreUnavailable,
                "Idempotency keys cannot be recorded now, retry later",
                "store_unavailable",
            ),
        };
        if status != 503
            && !ozeki::caller_verified(&self.app, snapshot, client_ip, params, &action).await
        {
            return Ok(false);
        }
        ctx.outcome = outcome;
        write_ozeki_error(session, status, &action, code, text).await?;
        Ok(true)
    }

    /// SPEC 3.4 for the SOAP transfer (`SubAccountGiveCredit`) carrying an
    /// `Idempotency-Key`; as [`Self::ozeki_idempotency`]. The fingerprint
    /// is the call's arguments (the envelope's formatting and the password
    /// do not count).
    async fn soap_idempotency(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        body: &Bytes,
    ) -> Result<bool> {
        use crate::api::soap::{self as soap_api, Call, FaultKind};
        let req = session.req_header();
        let Some(raw) = req.headers.get(idempotency::HEADER) else {
            return Ok(false);
        };
        if !req.method.as_str().eq_ignore_ascii_case("POST") {
            return Ok(false);
        }
        // Anything the door would refuse anyway is left to the door.
        let Ok(envelope) = soap_api::parse_envelope(body, &soap_api::EnvelopeLimits::default())
        else {
            return Ok(false);
        };
        let Ok(Call::SubAccountGiveCredit {
            credentials,
            sub_account,
            anytime_milli,
            offpeak_milli,
        }) = soap_api::call_from_envelope(&envelope)
        else {
            return Ok(false);
        };
        let version = envelope.version;
        ctx.action = soap_api::OperationName::SubAccountGiveCredit
            .label()
            .to_string();
        ctx.account = Some(
            credentials
                .username
                .chars()
                .take(ACCOUNT_LOG_MAX_CHARS)
                .collect(),
        );
        let fault =
            |status: u16, text: &str| (status, soap_api::fault(version, FaultKind::Client, text));
        let refused = if !idempotency::valid_key(raw.as_bytes()) {
            ctx.outcome = "invalid_request";
            fault(
                400,
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )
        } else {
            let key = String::from_utf8_lossy(raw.as_bytes()).into_owned();
            let fingerprint = idempotency::fingerprint(&[
                b"soap:SubAccountGiveCredit",
                sub_account.as_bytes(),
                &anytime_milli.to_le_bytes(),
                &offpeak_milli.to_le_bytes(),
            ]);
            let begin = self
                .app
                .begin_idempotent(&credentials.username, &key, fingerprint)
                .await;
            let (status, text, outcome) = match begin {
                Begin::Fresh(claim) => {
                    ctx.idempotency = Some(claim);
                    return Ok(false);
                }
                Begin::Replay(answer) => {
                    if self
                        .app
                        .credentials
                        .verify(&credentials.username, &credentials.password)
                        .await
                        != crate::auth::AuthOutcome::Verified
                    {
                        return Ok(false);
                    }
                    ctx.outcome = "idempotent_replay";
                    write_stored(session, answer).await?;
                    return Ok(true);
                }
                Begin::Mismatch => (
                    422,
                    "this Idempotency-Key was used with a different request",
                    "idempotency_mismatch",
                ),
                Begin::Interrupted => (
                    409,
                    "the first request with this Idempotency-Key did not finish; its outcome is unknown",
                    "idempotency_conflict",
                ),
                Begin::InProgress => (
                    409,
                    "the first request with this Idempotency-Key is still in progress",
                    "idempotency_conflict",
                ),
                Begin::Full | Begin::Unavailable => (
                    503,
                    "idempotency keys cannot be recorded now, retry later",
                    "store_unavailable",
                ),
            };
            if status != 503
                && self
                    .app
                    .credentials
                    .verify(&credentials.username, &credentials.password)
                    .await
                    != crate::auth::AuthOutcome::Verified
            {
                return Ok(false);
            }
            ctx.outcome = outcome;
            fault(status, text)
        };
        let (status, text) = refused;
        write_answer(
            session,
            status,
            version.content_type(),
            Bytes::from(text),
            &[],
        )
        .await?;
        Ok(true)
    }
}

/// Writes an answer stored under an idempotency key, marked as a replay.
async fn write_stored(session: &mut Session, answer: StoredAnswer) -> Result<()> {
    let mut h = ResponseHeader::build(answer.status, Some(answer.headers.len() + 2))?;
    for (name, value) in answer.headers {
        h.append_header(name, value.as_str())?;
    }
    h.insert_header("Content-Length", answer.body.len().to_string())?;
    h.insert_header(idempotency::REPLAYED_HEADER, "true")?;
    session.write_response_header(Box::new(h), false).await?;
    session
        .write_response_body(Some(Bytes::from(answer.body)), true)
        .await?;
    Ok(())
}

/// Parameter names whose values never reach a log: Ozeki passes the
/// password in the query string, Boxis an authcode (SPEC 5.3). Matched
/// case-insensitively; any name containing "pass" counts.
const SECRET_PARAMS: [&str; 5] = ["authcode", "token", "apikey", "api_key", "secret"];

fn is_secret_param(name: &str) -> bool {
    let decoded = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    let lower = decoded.to_ascii_lowercase();
    lower.contains("pass") || SECRET_PARAMS.contains(&lower.as_str())
}

/// Longest URL an access line repeats; a batch GET can carry thousands of
/// recipients.
const URL_LOG_MAX_BYTES: usize = 2048;

/// `path?query` for a log line, with the value of every secret parameter
/// replaced by `***` (names and other values kept byte for byte), cut at
/// [`URL_LOG_MAX_BYTES`].
pub fn redacted_url(path: &str, query: Option<&str>) -> String {
    let mut out = redact_query(path, query);
    if out.len() > URL_LOG_MAX_BYTES {
        let total = out.len();
        let mut cut = URL_LOG_MAX_BYTES;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str(&format!("...({total} bytes)"));
    }
    out
}

fn redact_query(path: &str, query: Option<&str>) -> String {
    let Some(query) = query else {
        return path.to_string();
    };
    let mut out = String::with_capacity(path.len() + 1 + query.len());
    out.push_str(path);
    out.push('?');
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((name, _)) if is_secret_param(name) => {
                out.push_str(name);
                out.push_str("=***");
            }
            _ => out.push_str(pair),
        }
    }
    out
}

fn action_label(action: &str) -> String {
    // Bounded label values: known Ozeki actions by name, anything else "other".
    const KNOWN: [&str; 8] = [
        "getcredits",
        "setcredits",
        "addcredits",
        "sendmessage",
        "receivemessage",
        "reporting",
        "deletemessage",
        "",
    ];
    if KNOWN.contains(&action) {
        action.to_string()
    } else {
        "other".to_string()
    }
}

fn request_has_body(session: &Session) -> bool {
    let h = &session.req_header().headers;
    h.contains_key("transfer-encoding")
        || h.get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
}

/// What an error on the proxy path means for the client: the status of
/// tollgate's answer (0: the connection is gone, nothing can be sent), its
/// text and the outcome label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Failure {
    status: u16,
    text: &'static str,
    outcome: &'static str,
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
            (_, ErrorType::HTTPStatus(code)) => failure(*code, "Request failed\n", "client_error"),
            (ErrorSource::Downstream, ErrorType::ReadTimedout) => {
                failure(408, "Request Timeout\n", "client_timeout")
            }
            (
                ErrorSource::Downstream,
                ErrorType::ReadError
                | ErrorType::WriteError
                | ErrorType::ConnectionClosed
                | ErrorType::WriteTimedout
                | ErrorType::Custom("PrematureBodyEnd"),
            ) => failure(0, "", "client_closed"),
            (ErrorSource::Downstream, _) => failure(400, "Bad Request\n", "bad_request"),
            (ErrorSource::Upstream, _) => failure(502, "Bad Gateway\n", "upstream_error"),
            (ErrorSource::Internal | ErrorSource::Unset, _) => {
                failure(500, "Internal Server Error\n", "internal_error")
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

impl BodyRefused {
    fn outcome(self) -> &'static str {
        match self {
            BodyRefused::TooLarge => "body_too_large",
            BodyRefused::Timeout => "body_timeout",
            BodyRefused::BadFraming => "bad_request",
        }
    }
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

/// Writes an Ozeki-shaped error answer (`<errormessage>`, `<errorcode>`).
async fn write_ozeki_error(
    session: &mut Session,
    status: u16,
    action: &str,
    code: ErrorCode,
    message: &str,
) -> Result<()> {
    let text = crate::api::ozeki::render::error_answer(action, code, message);
    write_answer(
        session,
        status,
        ozeki::CONTENT_TYPE_XML,
        Bytes::from(text),
        &[],
    )
    .await
}

/// Writes a locally made answer with the headers the gateway would send.
pub async fn write_answer(
    session: &mut Session,
    status: u16,
    content_type: &str,
    body: Bytes,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let h = local_header(status, content_type, body.len(), extra)?;
    session.write_response_header(h, false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// The header of a locally made answer: the gateway's `Server`, the type,
/// the length, and `extra`.
fn local_header(
    status: u16,
    content_type: &str,
    body_len: usize,
    extra: &[(&'static str, String)],
) -> Result<Box<ResponseHeader>> {
    let mut h = ResponseHeader::build(status, Some(4 + extra.len()))?;
    h.insert_header("Server", SERVER_HEADER)?;
    h.insert_header("Content-Type", content_type)?;
    h.insert_header("Content-Length", body_len.to_string())?;
    for (k, v) in extra {
        h.insert_header(*k, v.as_str())?;
    }
    Ok(Box::new(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_urls_hide_secret_values_only() {
        assert_eq!(
            redacted_url(
                "/api",
                Some("action=sendmessage&UserName=john&PassWord=s%26cret&recipient=%2B36&authcode=abc&passwd")
            ),
            "/api?action=sendmessage&UserName=john&PassWord=***&recipient=%2B36&authcode=***&passwd"
        );
        assert_eq!(redacted_url("/api", None), "/api");
        assert_eq!(
            redacted_url("/x", Some("p%61ssword=x&a=b")),
            "/x?p%61ssword=***&a=b"
        );
        let long = format!("password=secret&recipient={}", "é".repeat(3000));
        let logged = redacted_url("/api", Some(&long));
        assert!(logged.starts_with("/api?password=***&recipient="));
        assert!(logged.ends_with(&format!(
            "...({} bytes)",
            "/api?password=***&recipient=".len() + 6000
        )));
        assert!(!logged.contains("secret"));
    }
}
