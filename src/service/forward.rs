//! Forwarding a request the service decided to send on: through the
//! [`Gateway`](crate::upstream::Gateway) (tollgate's own pool, or a test's
//! fake), and back as a [`Reply`]. A gateway answer is relayed unchanged
//! but for hop-by-hop headers, an exact `Content-Length` and the headers
//! the caller adds (`X-Tollgate-Cost`, `X-Tollgate-Balance`); a request the
//! gateway never got is answered `upstream_unavailable` (502), one whose
//! answer was lost `504`.
//!
//! This module moves no credit: what a forwarded request costs is settled
//! by the caller from the [`Forwarded`] it gets back.

use bytes::Bytes;

use crate::error::ErrorCode;
use crate::service::respond::{refuse, Refusal, Reply, Shape, CONTENT_TYPE_TEXT};
use crate::service::{App, Outcome, Request};
use crate::upstream::{self, Forwarded};

/// Sends the original request bytes to the gateway and observes what
/// became of it.
pub async fn forward(app: &App, req: &Request<'_>, action: &'static str) -> Forwarded {
    let forwarded = app
        .gateway
        .forward(req.head, req.body.clone(), req.client_ip)
        .await;
    observe(app, action, &forwarded);
    forwarded
}

/// The metrics of one gateway round trip: its latency (by action label)
/// when it answered, why when its answer was lost.
pub fn observe(app: &App, action: &'static str, forwarded: &Forwarded) {
    match forwarded {
        Forwarded::Answered { latency, .. } => app
            .metrics
            .upstream_latency
            .with_label_values(&[action])
            .observe(latency.as_secs_f64()),
        Forwarded::Unknown(lost) => app
            .metrics
            .upstream_answers_lost
            .with_label_values(&[lost.why.label()])
            .inc(),
        Forwarded::NotSent(_) => {}
    }
}

/// The reply for what became of a forwarded request. `outcome` is the
/// request's outcome when the gateway answered (settled, voided, …) or
/// lost the answer; `extra` headers are added to a relayed answer.
pub fn relay(
    req: &Request<'_>,
    forwarded: Forwarded,
    outcome: Outcome,
    action: &'static str,
    extra: &[(&'static str, String)],
) -> Reply {
    match forwarded {
        Forwarded::Answered {
            mut header,
            body,
            latency,
        } => {
            upstream::strip_hop_by_hop_response(&mut header);
            let status = header.status.as_u16();
            let length = body.len().to_string();
            let mut reply = Reply {
                header,
                body,
                outcome,
                close: false,
                log: Default::default(),
            }
            .with_header("Content-Length", length);
            for (name, value) in extra {
                reply = reply.with_header(name, value.clone());
            }
            reply.log.upstream_status = Some(status);
            reply.log.upstream_latency = Some(latency);
            reply
        }
        Forwarded::NotSent(reason) => {
            tracing::warn!(request_id = %req.request_id, %reason, "gateway unreachable");
            // Nothing reached the gateway: whatever it cost was voided, and
            // a retry with the same idempotency key may run.
            refuse(
                Shape::Ozeki { action },
                Refusal::new(ErrorCode::UpstreamUnavailable).status(502),
            )
        }
        Forwarded::Unknown(lost) => {
            tracing::warn!(
                request_id = %req.request_id,
                why = lost.why.label(),
                reason = %lost,
                "gateway answer lost"
            );
            // The send may have gone out: a retry with the same key gets
            // this answer, never a second send.
            let lost = if outcome == Outcome::Forwarded {
                Outcome::UpstreamError
            } else {
                outcome
            };
            Reply::local(
                504,
                CONTENT_TYPE_TEXT,
                Bytes::from_static(b"Gateway answer lost\n"),
                lost,
            )
        }
    }
}
