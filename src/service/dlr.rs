//! The send's hook into delivery reports (`crate::dlr`): before forwarding,
//! watch the send and rewrite its `reporturl`; after settling, hand the
//! settlement over. Kept out of `send.rs` so the send stays one page.
//!
//! Failure modes: the send's record cannot be committed → the send is
//! refused (`store_unavailable`) and its reservation voided by the caller,
//! nothing forwarded; the `reporturl` sits where tollgate cannot rewrite
//! it (a multipart body) → the send is forwarded unchanged, not watched
//! (charged on accept, no refunds: as without delivery reports).

use bytes::Bytes;
use pingora::http::RequestHeader;

use crate::api::ozeki::command::SendMessage;
use crate::dlr::template::{append_reporturl, rewrite_reporturl};
use crate::error::ErrorCode;
use crate::ledger::ReservationId;
use crate::service::{App, Request};

/// A watched send: its key and the request to forward instead.
pub struct Watched {
    key: String,
    /// `charge_on: delivery`: the answer holds the accepted shares.
    pub hold: bool,
    pub head: Option<RequestHeader>,
    pub body: Option<Bytes>,
}

/// Whether a body is form data tollgate may rewrite.
fn form_body(head: &RequestHeader) -> bool {
    match head
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        None => true,
        Some(ct) => ct
            .trim()
            .to_ascii_lowercase()
            .starts_with("application/x-www-form-urlencoded"),
    }
}

/// Decides, registers (durably) and rewrites; `Ok(None)`: forward as is.
pub async fn before_forward(
    app: &App,
    send: &SendMessage,
    req: &Request<'_>,
    reservation: ReservationId,
    shares_milli: &[i64],
    parts: &[u32],
    class: Option<&str>,
) -> Result<Option<Watched>, ErrorCode> {
    let Some(dlr) = &app.dlr else {
        return Ok(None);
    };
    let recipients: Vec<&str> = send.messages.iter().map(|m| m.recipient.as_str()).collect();
    let Some(prepared) = dlr.prepare(
        send.report_url.as_deref(),
        &recipients,
        shares_milli,
        parts,
        class,
        &send.credentials.username,
    ) else {
        return Ok(None);
    };
    let raw = req.head.raw_path();
    let (path, query) = match raw.iter().position(|b| *b == b'?') {
        Some(i) => (&raw[..i], Some(&raw[i + 1..])),
        None => (raw, None),
    };
    let url = prepared.callback_url.clone();
    let new_query = query.and_then(|q| rewrite_reporturl(q, &url));
    let new_body = if !req.body.is_empty() && form_body(req.head) {
        rewrite_reporturl(&req.body, &url)
    } else {
        None
    };
    let new_query = match (new_query, &new_body, send.report_url.is_some()) {
        (Some(q), _, _) => Some(q),
        (None, Some(_), _) => None,
        // The client's reporturl is where tollgate cannot rewrite it.
        (None, None, true) => return Ok(None),
        // dlr.request: always, none passed: add tollgate's.
        (None, None, false) => Some(append_reporturl(query.unwrap_or_default(), &url)),
    };
    let head = match new_query {
        Some(q) => {
            let mut head = req.head.clone();
            let mut raw_path = path.to_vec();
            raw_path.push(b'?');
            raw_path.extend_from_slice(&q);
            if head.set_raw_path(&raw_path).is_err() {
                return Ok(None);
            }
            Some(head)
        }
        None => None,
    };
    let hold = prepared.holds_until_delivery();
    match dlr.register(prepared, reservation).await {
        Ok(key) => Ok(Some(Watched {
            key,
            hold,
            head,
            body: new_body.map(Bytes::from),
        })),
        Err(e) => {
            tracing::warn!(error = %e, "delivery-report record not committed; send refused");
            Err(ErrorCode::StoreUnavailable)
        }
    }
}

/// Hands the settlement over once the ledger committed it (`None`: in
/// doubt or voided as a whole).
pub async fn after_settle(app: &App, watched: Watched, accepted: Option<crate::dlr::Answered>) {
    let Some(dlr) = &app.dlr else { return };
    // A refund may only follow a posting the store has: wait for its
    // commit whatever `durability` says (under `async` too, a refund of a
    // post a crash lost would create credit). Not committed in time: the
    // send's reports are relayed, never refunded.
    let durable = match &app.store {
        Some(w) => w.wait_durable().await.is_ok(),
        None => true,
    };
    let accepted = if durable {
        accepted
    } else {
        // Holds the watcher will not follow are left in doubt.
        if let Some(crate::dlr::Answered::Held { holds }) = &accepted {
            let ids: Vec<_> = holds.iter().flatten().copied().collect();
            dlr.holds_in_doubt(&ids);
        }
        None
    };
    dlr.settled(&watched.key, accepted).await;
}
