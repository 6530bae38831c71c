//! The one `Idempotency-Key` wrapper (SPEC 3.4) every door runs its
//! changes through: the Ozeki sends and credit changes, the SOAP transfer.
//! The door says who the key belongs to, what the request's fingerprint
//! is, how to check the caller, and how its refusals look; the rules of
//! the key table live in `crate::idempotency`.
//!
//! Order, for every door alike:
//! 1. no key (or an action keys do not apply to): the request just runs;
//! 2. a malformed key: `invalid_request` (400);
//! 3. the table's first step ([`crate::idempotency::Idempotency::begin`]):
//!    - a fresh key: the request runs; its answer is stored under the key,
//!      or the key released when the answer changed nothing
//!      ([`Outcome::changed_nothing`]);
//!    - a stored answer, a mismatch, a conflict: shown **only to a caller
//!      whose credentials verify** through the door's own authentication —
//!      which consults the per-(address, user) lockout before anything
//!      else, so a locked pair learns nothing from a key (not even whether
//!      its password was right). Anyone else runs the request normally and
//!      fails to authenticate there;
//!    - the table full or unwritable: `store_unavailable` (503), no
//!      credentials needed (it reveals nothing).
//!
//! Failure modes: a request dropped after its key was claimed (client
//! gone, panic) leaves the key `pending` (see `crate::idempotency`): a
//! retry gets 409, never a second send.

use std::future::Future;

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};

use crate::error::ErrorCode;
use crate::idempotency::{self, Begin, Claim, Fingerprint, StoredAnswer};
use crate::service::respond::{refuse, Refusal, Reply, Shape};
use crate::service::{App, Outcome};

/// What a door tells the wrapper about a request that may carry a key.
pub struct Keyed<'a> {
    /// Whose key it is: keys are scoped by account.
    pub account: &'a str,
    pub fingerprint: Fingerprint,
    /// A send (its `store_unavailable` changed nothing, see
    /// [`Outcome::changed_nothing`]).
    pub is_send: bool,
    /// How the door answers the wrapper's refusals.
    pub shape: Shape<'a>,
}

/// Runs `handle` under the request's `Idempotency-Key`, if it has one and
/// `keyed` is given (see the module docs). `verify` checks the caller's
/// credentials through the door's authentication (lockout first); it only
/// runs when a stored answer or a refusal would be shown.
///
/// Both are closures that make their future where it is awaited, and
/// `handle`'s is awaited in one place: an async fn keeps every future it
/// was given, and every one it awaits, in its own state, so a wrapper
/// taking the send's future by value (and awaiting it on three paths)
/// was four times its size, and pingora moves the whole request future
/// by value more than once per request (measured with
/// `-Zprint-type-sizes`: 14.7 KB, now about the command's own size).
pub async fn run<V, VF, H, HF>(
    app: &App,
    head: &RequestHeader,
    keyed: Option<Keyed<'_>>,
    verify: V,
    handle: H,
) -> Reply
where
    V: FnOnce() -> VF,
    VF: Future<Output = bool>,
    H: FnOnce() -> HF,
    HF: Future<Output = Reply>,
{
    let claim = match admit(app, head, keyed, verify).await {
        Admitted::Run(claim) => claim,
        Admitted::Answer(reply) => return reply,
    };
    let reply = handle().await;
    if let Some((claim, is_send)) = claim {
        if reply.outcome.changed_nothing(is_send) {
            claim.release();
        } else {
            claim.complete(stored(&reply.header, &reply.body));
        }
    }
    reply
}

/// What the key says before the request runs.
enum Admitted {
    /// Run it; a fresh key's claim (and whether it is a send's) is settled
    /// by the answer.
    Run(Option<(Claim, bool)>),
    /// Answer this instead (a replay, a refusal of the key).
    Answer(Reply),
}

async fn admit<V, VF>(
    app: &App,
    head: &RequestHeader,
    keyed: Option<Keyed<'_>>,
    verify: V,
) -> Admitted
where
    V: FnOnce() -> VF,
    VF: Future<Output = bool>,
{
    let (Some(keyed), Some(raw)) = (keyed, head.headers.get(idempotency::HEADER)) else {
        return Admitted::Run(None);
    };
    if !idempotency::valid_key(raw.as_bytes()) {
        let text = "Invalid request: Idempotency-Key must be 1 to 255 visible ASCII characters";
        return Admitted::Answer(refuse(
            keyed.shape,
            Refusal::with_text(ErrorCode::InvalidRequest, text).status(400),
        ));
    }
    let key = String::from_utf8_lossy(raw.as_bytes()).into_owned();
    let refusal = match app
        .begin_idempotent(keyed.account, &key, keyed.fingerprint)
        .await
    {
        Begin::Fresh(claim) => return Admitted::Run(Some((claim, keyed.is_send))),
        Begin::Full | Begin::Unavailable => {
            let text = "Idempotency keys cannot be recorded now, retry later";
            return Admitted::Answer(refuse(
                keyed.shape,
                Refusal::with_text(ErrorCode::StoreUnavailable, text).status(503),
            ));
        }
        // What follows is shown only to a caller whose credentials verify;
        // anyone else runs the request normally (and fails there).
        Begin::Replay(answer) => {
            return match verify().await {
                true => Admitted::Answer(replayed(answer)),
                false => Admitted::Run(None),
            }
        }
        Begin::Mismatch => Refusal::with_text(
            ErrorCode::InvalidRequest,
            "Invalid request: this Idempotency-Key was used with a different request",
        )
        .status(422)
        .outcome(Outcome::IdempotencyMismatch),
        Begin::Interrupted => Refusal::with_text(
            ErrorCode::Replayed,
            "The first request with this Idempotency-Key did not finish; its outcome is unknown",
        )
        .status(409)
        .outcome(Outcome::IdempotencyConflict),
        Begin::InProgress => Refusal::with_text(
            ErrorCode::Replayed,
            "The first request with this Idempotency-Key is still in progress",
        )
        .status(409)
        .outcome(Outcome::IdempotencyConflict),
    };
    match verify().await {
        true => Admitted::Answer(refuse(keyed.shape, refusal)),
        false => Admitted::Run(None),
    }
}

/// The answer as stored under a key: status, the headers worth replaying,
/// the body.
fn stored(header: &ResponseHeader, body: &[u8]) -> StoredAnswer {
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
    StoredAnswer {
        status: header.status.as_u16(),
        headers,
        body: body.to_vec(),
    }
}

/// A stored answer sent again, marked as a replay.
fn replayed(answer: StoredAnswer) -> Reply {
    let mut header = match ResponseHeader::build(answer.status, Some(answer.headers.len() + 2)) {
        Ok(h) => h,
        Err(_) => ResponseHeader::build(500, None).expect("500 is a status"),
    };
    for (name, value) in answer.headers {
        // Stored from a valid answer; a header that no longer parses is left out.
        let _ = header.append_header(name, value.as_str());
    }
    let body = Bytes::from(answer.body);
    let _ = header.insert_header("Content-Length", body.len().to_string());
    let _ = header.insert_header(idempotency::REPLAYED_HEADER, "true");
    Reply {
        header: Box::new(header),
        body,
        outcome: Outcome::IdempotentReplay,
        close: false,
        log: Default::default(),
    }
}
