//! The pingora glue: one phase → one call into the service layer.
//!
//! Requests on the Ozeki paths that tollgate must look at are read whole
//! (up to `ozeki.body_limit_bytes`), decided by `service::ozeki`, and either
//! answered locally or forwarded with their original bytes by `upstream`
//! (pingora cannot forward a body its `request_filter` consumed). Everything
//! else — other paths, GETs of actions tollgate does not own, and every
//! request in `mode: passthrough` — goes through pingora's own proxy path
//! untouched.

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
use crate::service::ozeki::{self, Decision, LocalAnswer, PendingSend};
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
    cost_milli: Option<i64>,
    upstream_status: Option<u16>,
}

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
            cost_milli: None,
            upstream_status: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let snapshot = self.app.snapshot.load_full();
        if snapshot.mode == Mode::Passthrough {
            return Ok(false);
        }
        let path = session.req_header().uri.path();
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
        // through pingora untouched.
        let has_body = request_has_body(session);
        if !has_body {
            if let Ok(params) = parse_params(query.as_deref(), None, &self.param_limits) {
                let action = action_of(&params).unwrap_or_default();
                if !INTERCEPTED.contains(&action.as_str()) {
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
        let request_id = self.app.new_request_id();
        ctx.request_id = Some(request_id.clone());

        match ozeki::decide(&self.app, &snapshot, &params, &request_id).await {
            Decision::Answer(answer) => {
                ctx.outcome = answer.outcome;
                write_local(session, answer).await?;
            }
            Decision::Forward(pending) => {
                self.forward_and_settle(session, ctx, body, pending).await?;
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
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
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

    async fn logging(
        &self,
        _session: &mut Session,
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
        let m = &self.app.metrics;
        m.requests
            .with_label_values(&[ctx.front_door, action, ctx.outcome])
            .inc();
        m.request_latency
            .with_label_values(&[ctx.front_door, action])
            .observe(ctx.started.elapsed().as_secs_f64());
        tracing::info!(
            target: "tollgate::access",
            front_door = ctx.front_door,
            action,
            outcome = ctx.outcome,
            request_id = ctx.request_id.as_deref().unwrap_or("-"),
            cost_milli = ctx.cost_milli.unwrap_or(0),
            upstream_status = ctx.upstream_status.unwrap_or(0),
            latency_us = ctx.started.elapsed().as_micros() as u64,
        );
    }
}

impl TollgateProxy {
    /// Forwards the original request bytes, settles, and relays the answer
    /// unchanged (plus `X-Tollgate-Cost`/`X-Tollgate-Balance` on sends).
    async fn forward_and_settle(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        body: Bytes,
        pending: Option<PendingSend>,
    ) -> Result<()> {
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let header = Upstream::upstream_header(session.req_header(), body.len(), client_ip)?;
        let forwarded = self.app.upstream.forward(header, body).await;
        if let Forwarded::Answered {
            header, latency, ..
        } = &forwarded
        {
            ctx.upstream_status = Some(header.status.as_u16());
            self.app
                .metrics
                .upstream_latency
                .with_label_values(&[&ctx.action])
                .observe(latency.as_secs_f64());
        }
        let mut extra: Vec<(&'static str, String)> = Vec::new();
        if let Some(send) = pending {
            ctx.cost_milli = Some(send.cost_milli);
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
