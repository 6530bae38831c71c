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
use pingora::proxy::{ProxyHttp, Session};

use crate::api::ozeki::command::action_of;
use crate::api::ozeki::params::{parse_params, sniff_action, ParamLimits};
use crate::config::Mode;
use crate::error::ErrorCode;
use crate::service::ozeki::{self, Decision, LocalAnswer, PendingReceive, PendingSend};
use crate::service::App;
use crate::upstream::{self, Forwarded, Upstream};

/// The `Server` header of the gateway we stand in for (SPEC 1.5); local
/// answers carry it so a client cannot tell who answered.
pub const SERVER_HEADER: &str = "OzekiNG/3.0.1 Microsoft-HTTPAPI/1.0";

/// Actions tollgate must see the whole request for.
const INTERCEPTED: [&str; 4] = ["getcredits", "setcredits", "addcredits", "sendmessage"];

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

    fn is_ozeki_path(&self, path: &str) -> bool {
        self.app.config.ozeki.paths.iter().any(|p| p == path)
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
}

/// Longest account name an access line repeats (a client may send any
/// `username`; valid names are at most 64 characters).
const ACCOUNT_LOG_MAX_CHARS: usize = 64;

#[async_trait]
impl ProxyHttp for TollgateProxy {
    type CTX = RequestCtx;

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
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let snapshot = self.app.snapshot.load_full();
        if snapshot.mode == Mode::Passthrough {
            return Ok(false);
        }
        let path = session.req_header().uri.path();
        if let Some(door) = self.credit_door(path) {
            return self.serve_credit_door(session, ctx, door).await;
        }
        if !self.is_ozeki_path(path) {
            return Ok(false);
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
        if !has_body {
            if let Ok(params) = parse_params(query.as_deref(), None, &self.param_limits) {
                let action = action_of(&params).unwrap_or_default();
                let priced_receive = snapshot.tariff.receive_price_milli() > 0
                    && crate::api::ozeki::inbox::names_receive(&params);
                if !INTERCEPTED.contains(&action.as_str()) && !priced_receive {
                    ctx.action = action_label(&action);
                    return Ok(false);
                }
            }
        }

        let body = match read_body(session, self.app.config.ozeki.body_limit_bytes).await? {
            Some(b) => b,
            None => {
                ctx.outcome = "body_too_large";
                session.set_keepalive(None);
                write_answer(
                    session,
                    413,
                    "text/plain",
                    Bytes::from_static(b"Request body too large\n"),
                    &[],
                )
                .await?;
                linger(session).await;
                return Ok(true);
            }
        };
        let form_body = is_form(session).then_some(&body[..]);
        let params = match parse_params(query.as_deref(), form_body, &self.param_limits) {
            Ok(p) => p,
            Err(e) => {
                // Malformed encoding: refused, never forwarded — the gateway
                // might read it differently than we did.
                ctx.outcome = "invalid_request";
                let action = sniff_action(query.as_deref(), form_body).unwrap_or_default();
                ctx.action = action_label(&action);
                let text = crate::api::ozeki::render::error_answer(
                    &action,
                    ErrorCode::InvalidRequest,
                    &format!("{}: {e}", ErrorCode::InvalidRequest.message()),
                );
                write_answer(
                    session,
                    200,
                    ozeki::CONTENT_TYPE_XML,
                    Bytes::from(text),
                    &[],
                )
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

        match ozeki::decide(&self.app, &snapshot, &params, &request_id).await {
            Decision::Answer(answer) => {
                ctx.outcome = answer.outcome;
                write_local(session, answer).await?;
            }
            Decision::Forward(pending) => {
                self.forward_and_settle(session, ctx, body, pending, None)
                    .await?;
            }
            Decision::ForwardReceive(receive) => {
                self.forward_and_settle(session, ctx, body, None, Some(receive))
                    .await?;
            }
        }
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
        if let Some(ip) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        {
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

    async fn logging(
        &self,
        session: &mut Session,
        e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        if e.is_some() && ctx.outcome == "forwarded" {
            ctx.outcome = "upstream_error";
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
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let header = Upstream::upstream_header(session.req_header(), body.len(), client_ip)?;
        let mut pending = pending;
        if let Some(guard) = pending.as_mut().and_then(|p| p.guard.as_mut()) {
            // From here a dropped context (client gone, shutdown) may belong
            // to a sent message: in doubt, never void.
            guard.forwarding();
        }
        let forwarded = self.app.upstream.forward(header, body).await;
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
                session.write_response_header(header, false).await?;
                session.write_response_body(Some(body), true).await?;
            }
            Forwarded::NotSent(reason) => {
                tracing::warn!(request_id = ctx.request_id.as_deref().unwrap_or("-"), %reason, "gateway unreachable");
                if ctx.outcome == "forwarded" {
                    ctx.outcome = "upstream_unavailable";
                }
                let text = crate::api::ozeki::render::error_answer(
                    &ctx.action,
                    ErrorCode::UpstreamUnavailable,
                    ErrorCode::UpstreamUnavailable.message(),
                );
                write_answer(
                    session,
                    502,
                    ozeki::CONTENT_TYPE_XML,
                    Bytes::from(text),
                    &[],
                )
                .await?;
            }
            Forwarded::Unknown(reason) => {
                tracing::warn!(request_id = ctx.request_id.as_deref().unwrap_or("-"), %reason, "gateway answer lost");
                if ctx.outcome == "forwarded" {
                    ctx.outcome = "upstream_error";
                }
                write_answer(
                    session,
                    504,
                    "text/plain",
                    Bytes::from_static(b"Gateway answer lost\n"),
                    &[],
                )
                .await?;
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
    fn credit_door(&self, path: &str) -> Option<CreditDoor> {
        if path == self.app.config.boxis.path {
            Some(CreditDoor::Boxis)
        } else if crate::service::soap::is_soap_path(&self.app, path) {
            Some(CreditDoor::Soap)
        } else {
            None
        }
    }

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
        let now_s = crate::service::now_unix_ms().div_euclid(1000);
        let body = read_body(session, limit).await?;
        let (action, answer) = match (&body, door) {
            (None, CreditDoor::Boxis) => ("other", boxis::too_large(&[], now_s)),
            (None, CreditDoor::Soap) => ("other", soap::too_large(content_type.as_deref())),
            (Some(body), CreditDoor::Boxis) => boxis::handle(
                &self.app,
                &boxis::BoxisHttpRequest {
                    method: &method,
                    content_type: content_type.as_deref(),
                    body,
                },
                now_s,
            ),
            (Some(body), CreditDoor::Soap) => {
                let request = soap::SoapHttpRequest {
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
        let mut h = ResponseHeader::build(answer.status, Some(3))?;
        h.insert_header("Content-Type", answer.content_type)?;
        h.insert_header("Content-Length", answer.body.len().to_string())?;
        if answer.status == 405 {
            h.insert_header("Allow", "GET, POST")?;
        }
        session.write_response_header(Box::new(h), false).await?;
        session
            .write_response_body(Some(Bytes::from(answer.body)), true)
            .await?;
        if body.is_none() {
            linger(session).await;
        }
        Ok(true)
    }
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

fn is_form(session: &Session) -> bool {
    match session.req_header().headers.get("content-type") {
        None => true,
        Some(v) => v
            .to_str()
            .map(|s| {
                s.to_ascii_lowercase()
                    .starts_with("application/x-www-form-urlencoded")
            })
            .unwrap_or(false),
    }
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

async fn write_local(session: &mut Session, answer: LocalAnswer) -> Result<()> {
    write_answer(
        session,
        answer.status,
        answer.content_type,
        Bytes::from(answer.body),
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
    let mut h = ResponseHeader::build(status, Some(4 + extra.len()))?;
    h.insert_header("Server", SERVER_HEADER)?;
    h.insert_header("Content-Type", content_type)?;
    h.insert_header("Content-Length", body.len().to_string())?;
    for (k, v) in extra {
        h.insert_header(*k, v.as_str())?;
    }
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
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
