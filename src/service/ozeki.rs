//! What each Ozeki NG command does (SPEC 1.2, 1.3).
//!
//! Credit actions are answered here from the ledger and never reach the
//! gateway. A send is priced, reserved all-or-nothing, forwarded, and settled
//! from the gateway's per-recipient answer. Failure modes:
//! - no answer because the connect failed → the reservation is voided;
//! - the request may have been written but no usable answer came (timeout,
//!   reset, unparseable 2xx, a report missing) → the reservation stays
//!   reserved and goes *in doubt* for an operator or the configured policy;
//! - the request context is dropped before settlement (client gone, panic)
//!   → the `ReservationGuard` voids on drop.

use std::net::IpAddr;

use crate::api::ozeki::answer::{match_reports, parse_send_answer, AnswerError};
use crate::api::ozeki::command::{
    classify, credentials_for, Command, Credentials, OutgoingMessage, SendMessage,
};
use crate::api::ozeki::inbox::{count_messages, has_conflicting_actions, names_receive};
use crate::api::ozeki::params::Params;
use crate::api::ozeki::render;
use crate::config::{ActionEcho, Mode, UnknownAccounts};
use crate::error::ErrorCode;
use crate::ledger::{Bucket, BucketPreference, LedgerError, Overdraft, ReservationGuard, Role};
use crate::limits::Refusal;
use crate::service::dropin::{self, Auth};
use crate::service::{App, Snapshot};
use crate::tariff::QuoteRequest;
use crate::upstream::Forwarded;

pub const CONTENT_TYPE_XML: &str = "application/xml";
pub const CONTENT_TYPE_HTML: &str = "text/html";

/// An answer tollgate makes itself.
#[derive(Debug)]
pub struct LocalAnswer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// The outcome label for metrics and the access log.
    pub outcome: &'static str,
}

/// A send on its way to the gateway, with the credit it holds.
pub struct PendingSend {
    /// `None` when nothing is charged (shadow mode, uncharged unknown
    /// accounts): the answer is relayed and nothing settles.
    pub guard: Option<ReservationGuard>,
    pub account: String,
    pub messages: Vec<OutgoingMessage>,
    pub batch: bool,
    pub cost_milli: i64,
    pub request_id: String,
}

pub enum Decision {
    Answer(LocalAnswer),
    /// Forward the original request; settle `send` from the answer.
    Forward(Option<PendingSend>),
    /// Forward a `receivemessage` and charge each message its answer
    /// returns (receive pricing, see [`charge_receive`]).
    ForwardReceive(PendingReceive),
    /// Refused by a limit (SPEC 7): the answer (HTTP 429) goes out with
    /// `Retry-After: retry_after_s`.
    RateLimited {
        answer: LocalAnswer,
        retry_after_s: u64,
    },
}

/// How a forwarded send settled, for the access log and headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Posted {
        posted_milli: i64,
        voided_milli: i64,
    },
    Voided,
    InDoubt,
    /// The reservation was resolved before the answer came (the TTL sweep
    /// expired it, or an operator posted/voided it): nothing left to settle.
    AlreadyResolved,
    Uncharged,
}

impl Settled {
    pub fn outcome(self) -> &'static str {
        match self {
            Settled::Posted { .. } => "settled",
            Settled::Voided => "voided",
            Settled::InDoubt => "in_doubt",
            Settled::AlreadyResolved => "already_resolved",
            Settled::Uncharged => "forwarded",
        }
    }
}

fn xml(body: String, outcome: &'static str) -> LocalAnswer {
    LocalAnswer {
        status: 200,
        content_type: CONTENT_TYPE_XML,
        body,
        outcome,
    }
}

fn error_answer(action: &str, code: ErrorCode, outcome: &'static str) -> LocalAnswer {
    xml(render::error_answer(action, code, code.message()), outcome)
}

/// Decides what an Ozeki request does. `params` were parsed from the query
/// and the form body.
pub async fn decide(
    app: &App,
    snapshot: &Snapshot,
    params: &Params,
    request_id: &str,
    client_ip: Option<IpAddr>,
) -> Decision {
    let command = match classify(params) {
        Ok(c) => c,
        Err(e) => return Decision::Answer(error_answer(&e.action, e.code, e.code.name())),
    };
    match command {
        Command::Other if snapshot.tariff.receive_price_milli() > 0 && names_receive(params) => {
            receive_message(app, snapshot, params, request_id, client_ip).await
        }
        Command::Other => Decision::Forward(None),
        Command::GetCredits {
            credentials,
            useraccount,
        } => match refuse_caller(app, snapshot, client_ip, &credentials, "getcredits").await {
            Some(refused) => refused,
            None => Decision::Answer(get_credits(app, &credentials, useraccount).await),
        },
        Command::SetCredits {
            credentials,
            useraccount,
            new_balance_milli,
        } => {
            let change = Change::Set(new_balance_milli);
            credit_change(
                app,
                snapshot,
                client_ip,
                &credentials,
                useraccount,
                change,
                request_id,
            )
            .await
        }
        Command::AddCredits {
            credentials,
            useraccount,
            add_milli,
        } => {
            let change = Change::Add(add_milli);
            credit_change(
                app,
                snapshot,
                client_ip,
                &credentials,
                useraccount,
                change,
                request_id,
            )
            .await
        }
        Command::SendMessage(send) => {
            send_message(app, snapshot, send, request_id, client_ip).await
        }
    }
}

/// Checks credentials: lockout, local store, drop-in verification
/// (`service::dropin`). The answer never says whether the name exists.
async fn authenticate(
    app: &App,
    snapshot: &Snapshot,
    client_ip: Option<IpAddr>,
    credentials: &Credentials,
) -> Auth {
    dropin::authenticate(
        app,
        snapshot,
        client_ip,
        &credentials.username,
        &credentials.password,
    )
    .await
}

/// Whether the credentials of an intercepted request verify (for
/// replaying an idempotent answer to its caller only); counts towards the
/// lockout like any check.
pub async fn caller_verified(
    app: &App,
    snapshot: &Snapshot,
    client_ip: Option<IpAddr>,
    params: &Params,
    action: &str,
) -> bool {
    match credentials_for(params, action) {
        Ok(c) => authenticate(app, snapshot, client_ip, &c).await == Auth::Verified,
        Err(_) => false,
    }
}

/// The answer for a caller of a credit action that did not authenticate;
/// `None` if it did.
async fn refuse_caller(
    app: &App,
    snapshot: &Snapshot,
    client_ip: Option<IpAddr>,
    credentials: &Credentials,
    action: &str,
) -> Option<Decision> {
    let code = match authenticate(app, snapshot, client_ip, credentials).await {
        Auth::Verified => return None,
        Auth::Failed => ErrorCode::AuthFailed,
        Auth::Unavailable => ErrorCode::UpstreamUnavailable,
        Auth::Locked(refusal) => {
            return Some(rate_limited(
                error_answer(action, ErrorCode::RateLimited, "rate_limited"),
                refusal,
            ))
        }
    };
    Some(Decision::Answer(error_answer(action, code, code.name())))
}

/// An answer refused by a limit: HTTP 429 with `Retry-After`.
fn rate_limited(mut answer: LocalAnswer, refusal: Refusal) -> Decision {
    answer.status = 429;
    answer.outcome = "rate_limited";
    Decision::RateLimited {
        answer,
        retry_after_s: refusal.retry_after_s,
    }
}

async fn get_credits(
    app: &App,
    credentials: &Credentials,
    useraccount: Option<String>,
) -> LocalAnswer {
    const ACTION: &str = "getcredits";
    if let Err(code) = app.ensure_owner() {
        return error_answer(ACTION, code, code.name());
    }
    // The caller authenticated in `decide`.
    let Some(caller) = app.ledger.account(&credentials.username) else {
        return error_answer(ACTION, ErrorCode::UnknownAccount, "unknown_account");
    };
    let target = useraccount.unwrap_or_else(|| caller.name.clone());
    if target != caller.name && caller.role != Role::Admin {
        return error_answer(ACTION, ErrorCode::Forbidden, "forbidden");
    }
    match app.ledger.account(&target) {
        Some(view) => xml(
            render::credits_answer(ACTION, &view.name, view.anytime.available_milli()),
            "ok",
        ),
        None => error_answer(ACTION, ErrorCode::UnknownAccount, "unknown_account"),
    }
}

enum Change {
    Set(Option<i64>),
    Add(i64),
}

impl Change {
    fn action(&self) -> &'static str {
        match self {
            Change::Set(_) => "setcredits",
            Change::Add(_) => "addcredits",
        }
    }
}

/// `setcredits`/`addcredits`: authenticate (lockout first), then change.
async fn credit_change(
    app: &App,
    snapshot: &Snapshot,
    client_ip: Option<IpAddr>,
    credentials: &Credentials,
    useraccount: Option<String>,
    change: Change,
    request_id: &str,
) -> Decision {
    match refuse_caller(app, snapshot, client_ip, credentials, change.action()).await {
        Some(refused) => refused,
        None => Decision::Answer(
            change_credits(app, credentials, useraccount, change, request_id).await,
        ),
    }
}

async fn change_credits(
    app: &App,
    credentials: &Credentials,
    useraccount: Option<String>,
    change: Change,
    request_id: &str,
) -> LocalAnswer {
    let action = match change {
        Change::Set(_) => "setcredits",
        Change::Add(_) => "addcredits",
    };
    let echo = match (&change, app.config.ozeki.addcredits_action_echo) {
        (Change::Add(_), ActionEcho::Getcredits) => "getcredits",
        _ => action,
    };
    // The caller authenticated in `decide`.
    let Some(caller) = app.ledger.account(&credentials.username) else {
        return error_answer(action, ErrorCode::UnknownAccount, "unknown_account");
    };
    if caller.role != Role::Admin {
        return error_answer(action, ErrorCode::Forbidden, "forbidden");
    }
    let target = useraccount.unwrap_or(caller.name);
    // Back-pressure before a change; `setcredits` without a new balance
    // changes nothing and neither waits nor needs durability (but it reads
    // the balance, so only an owner answers it).
    let changes = !matches!(change, Change::Set(None));
    let admitted = if changes {
        app.admit_change().await
    } else {
        app.ensure_owner()
    };
    if let Err(code) = admitted {
        return error_answer(action, code, code.name());
    }
    let result = match change {
        Change::Set(None) => match app.ledger.account(&target) {
            Some(v) => Ok(v.anytime),
            None => Err(LedgerError::UnknownAccount(target.clone())),
        },
        Change::Set(Some(new)) => app
            .ledger
            .set(&target, Bucket::Anytime, new, Some(request_id))
            .map(|a| a.balance),
        Change::Add(amount) => app
            .ledger
            .add(&target, Bucket::Anytime, amount, Some(request_id))
            .map(|a| a.balance),
    };
    match result {
        Ok(balance) => {
            // The answer acknowledges the change: with `durability: sync` it
            // waits for the commit (SPEC 6).
            if changes {
                if let Err(code) = app.change_durable().await {
                    return error_answer(action, code, code.name());
                }
            }
            xml(
                render::credits_answer(echo, &target, balance.available_milli()),
                "ok",
            )
        }
        Err(e) => {
            let code = ledger_error_code(&e);
            error_answer(action, code, code.name())
        }
    }
}

pub fn ledger_error_code(e: &LedgerError) -> ErrorCode {
    match e {
        LedgerError::UnknownAccount(_) => ErrorCode::UnknownAccount,
        LedgerError::InsufficientCredit { .. } => ErrorCode::InsufficientCredit,
        LedgerError::NotASubaccount { .. } => ErrorCode::NotASubaccount,
        _ => ErrorCode::InvalidRequest,
    }
}

fn refusal(send: &SendMessage, code: ErrorCode, message: &str) -> Decision {
    let body = render::send_refusal(&send.messages, send.batch, send.format, code, message);
    let content_type = match send.format {
        crate::api::ozeki::command::ResponseFormat::Html => CONTENT_TYPE_HTML,
        crate::api::ozeki::command::ResponseFormat::Xml => CONTENT_TYPE_XML,
    };
    Decision::Answer(LocalAnswer {
        status: 200,
        content_type,
        body,
        outcome: code.name(),
    })
}

/// The answer to an Ozeki request refused by a per-IP limit before it was
/// decided: a send gets one refusing report per message, anything else an
/// error answer (`rate_limited`); HTTP 429.
pub fn limited_answer(params: &Params, refusal_: Refusal) -> Decision {
    match classify(params) {
        Ok(Command::SendMessage(send)) => rate_limited_send(&send, refusal_),
        _ => {
            let action = crate::api::ozeki::command::action_of(params).unwrap_or_default();
            rate_limited(
                error_answer(&action, ErrorCode::RateLimited, "rate_limited"),
                refusal_,
            )
        }
    }
}

/// A send refused by a limit: one refusing report per message, HTTP 429.
fn rate_limited_send(send: &SendMessage, refusal_: Refusal) -> Decision {
    match refusal(
        send,
        ErrorCode::RateLimited,
        ErrorCode::RateLimited.message(),
    ) {
        Decision::Answer(answer) => rate_limited(answer, refusal_),
        other => other,
    }
}

async fn send_message(
    app: &App,
    snapshot: &Snapshot,
    send: SendMessage,
    request_id: &str,
    client_ip: Option<IpAddr>,
) -> Decision {
    let shadow_all = snapshot.mode == Mode::Shadow;
    match authenticate(app, snapshot, client_ip, &send.credentials).await {
        Auth::Verified => {}
        Auth::Locked(r) => return rate_limited_send(&send, r),
        Auth::Unavailable => {
            return refusal(
                &send,
                ErrorCode::UpstreamUnavailable,
                ErrorCode::UpstreamUnavailable.message(),
            )
        }
        Auth::Failed => {
            if app.config.auth.unknown_accounts == UnknownAccounts::Forward {
                // Uncharged, but it still loads the gateway's links: the
                // upstream cap counts one part per message.
                let parts = send.messages.len() as u64;
                if let Err(r) = app
                    .limiter
                    .check_send(&snapshot.limits, None, parts, shadow_all)
                {
                    return rate_limited_send(&send, r);
                }
                app.metrics
                    .unknown_forwarded
                    .with_label_values(&["sendmessage"])
                    .inc();
                return Decision::Forward(None);
            }
            return refusal(
                &send,
                ErrorCode::AuthFailed,
                ErrorCode::AuthFailed.message(),
            );
        }
    }
    let account = send.credentials.username.clone();
    let Some(view) = app.ledger.account(&account) else {
        return refusal(
            &send,
            ErrorCode::UnknownAccount,
            ErrorCode::UnknownAccount.message(),
        );
    };

    // Price every (recipient, message) pair with one tariff snapshot.
    let now = app.clock.now_unix_ms();
    let tariff = &snapshot.tariff;
    let mut shares = Vec::with_capacity(send.messages.len());
    let mut parts: u64 = 0;
    for m in &send.messages {
        let quote = tariff.quote(&QuoteRequest {
            recipient: &m.recipient,
            text: &m.text,
            message_type: &m.message_type,
            class: view.tariff_class.as_deref(),
            at_unix_ms: now,
        });
        match quote {
            Ok(q) => {
                parts = parts.saturating_add(u64::from(q.parts));
                shares.push(q.total_milli)
            }
            Err(e) => {
                let message = format!("{}: {e}", ErrorCode::InvalidRequest.message());
                return refusal(&send, ErrorCode::InvalidRequest, &message);
            }
        }
    }
    let cost_milli: i64 = shares.iter().sum();
    let preference = tariff.bucket_preference(now);

    // SPEC 7: the account's parts rate, then the upstream cap, after
    // pricing and before reserving (a refused send reserved nothing).
    let mut permit =
        match app
            .limiter
            .check_send(&snapshot.limits, Some(&account), parts, shadow_all)
        {
            Ok(p) => p,
            Err(r) => return rate_limited_send(&send, r),
        };

    if snapshot.mode == Mode::Shadow {
        let payable = match preference {
            crate::ledger::BucketPreference::AnytimeOnly => view.anytime.available_milli(),
            crate::ledger::BucketPreference::OffPeakFirst => {
                view.anytime.available_milli() + view.offpeak.available_milli()
            }
        };
        let decision = if payable >= cost_milli {
            "would_charge"
        } else {
            "would_refuse"
        };
        app.metrics
            .shadow_decisions
            .with_label_values(&[decision])
            .inc();
        return Decision::Forward(Some(PendingSend {
            guard: None,
            account,
            messages: send.messages,
            batch: send.batch,
            cost_milli,
            request_id: request_id.to_string(),
        }));
    }

    if let Err(code) = app.admit_change().await {
        permit.refund(&app.limiter);
        return refusal(&send, code, code.message());
    }
    let reserved = app.ledger.reserve(
        &account,
        &shares,
        preference,
        Some(request_id),
        Some(tariff.version()),
    );
    if reserved.is_err() {
        // Nothing goes upstream: the parts are given back.
        permit.refund(&app.limiter);
    }
    match reserved {
        Ok(id) => {
            let guard = ReservationGuard::new(app.ledger.clone(), id);
            // SPEC 1.3 step 6: a reservation is durable before the request
            // leaves; one the store did not commit in time is voided and the
            // send refused locally, never forwarded.
            if let Err(code) = app.change_durable().await {
                if let Err(e) = guard.void() {
                    tracing::warn!(request_id, error = %e, "voiding an unpersisted reservation");
                }
                permit.refund(&app.limiter);
                return refusal(&send, code, code.message());
            }
            // The parts are spent: the send goes upstream.
            drop(permit);
            Decision::Forward(Some(PendingSend {
                guard: Some(guard),
                account,
                messages: send.messages,
                batch: send.batch,
                cost_milli,
                request_id: request_id.to_string(),
            }))
        }
        Err(LedgerError::InsufficientCredit { .. }) => refusal(
            &send,
            ErrorCode::InsufficientCredit,
            "Insufficient credit to send this message",
        ),
        Err(e) => {
            let code = ledger_error_code(&e);
            refusal(&send, code, code.message())
        }
    }
}

/// Settles a forwarded send from what the gateway did (SPEC 1.3 step 8).
pub fn settle(send: PendingSend, forwarded: &Forwarded) -> Settled {
    let Some(guard) = send.guard else {
        return Settled::Uncharged;
    };
    let settled = match forwarded {
        Forwarded::NotSent(_) => guard.void().map(|_| Settled::Voided),
        Forwarded::Unknown(_) => guard.into_in_doubt().map(|_| Settled::InDoubt),
        Forwarded::Answered { header, body, .. } => {
            let status = header.status.as_u16();
            if (200..300).contains(&status) {
                let per_message = parse_send_answer(body)
                    .map(|reports| match_reports(&send.messages, send.batch, &reports));
                match per_message {
                    Ok(flags) if flags.iter().all(Option::is_some) => {
                        let accepted: Vec<bool> = flags.into_iter().map(Option::unwrap).collect();
                        guard
                            .settle_shares(&accepted, Some(&send.request_id))
                            .map(|s| Settled::Posted {
                                posted_milli: s.posted_milli,
                                voided_milli: s.voided_milli,
                            })
                    }
                    // An Ozeki error answer (no reports, an errorcode): the
                    // gateway refused the request as a whole and sent nothing.
                    Err(AnswerError::NoReports) if is_gateway_error(body) => {
                        guard.void().map(|_| Settled::Voided)
                    }
                    _ => guard.into_in_doubt().map(|_| Settled::InDoubt),
                }
            } else if status >= 400 {
                // The gateway refused the request as a whole: nothing was sent.
                guard.void().map(|_| Settled::Voided)
            } else {
                guard.into_in_doubt().map(|_| Settled::InDoubt)
            }
        }
    };
    match settled {
        Ok(s) => s,
        Err(e) => {
            // Only possible if an operator or the sweep resolved it first.
            tracing::warn!(request_id = %send.request_id, error = %e, "reservation already resolved");
            Settled::AlreadyResolved
        }
    }
}

/// Whether a 2xx body is Ozeki's whole-request error answer.
fn is_gateway_error(body: &[u8]) -> bool {
    let window = &body[..body.len().min(4096)];
    window.windows(11).any(|w| w == b"<errorcode>")
}

// ---------------------------------------------------------------------------
// Receive pricing (SPEC 4.2): every message a `receivemessage` answer hands
// out costs the tariff's `receive_price`, charged after the answer came
// (post-debit: the number of messages is only known then).
//
// How it is charged: one reservation of `count × price` (one share per
// message), posted in full at once — `reserve` then `settle`, with no await
// between them. Not an `add` of a negative amount, because a reservation
// draws from the bucket the tariff says pays now (off-peak first inside a
// window), records the tariff version on its entries like a send, obeys the
// overdraft policy like a send, and is counted as `posted` credit like one.
//
// What happens when the account cannot pay (the messages are already out
// of the gateway's inbox, so refusing after the fact is impossible):
// - before forwarding, a receive is refused locally (`insufficient_credit`,
//   the messages stay in the gateway's inbox for later) when the account
//   cannot pay for even one message: under `overdraft: strict` its payable
//   balance is below `receive_price`; under `overdraft: ozeki` it is not
//   above zero (Ozeki's rule);
// - after the answer, under `strict`, a charge larger than the payable
//   balance takes what is available (never below zero) and the rest is a
//   *shortfall*: logged as a warning with the account and request id and
//   counted in `tollgate_receive_shortfall_milli_total`. Under `ozeki` the
//   whole charge is taken while the payable balance is above zero, as for
//   a send.
// An answer tollgate cannot read (not Ozeki XML, malformed, too large) is
// relayed unchanged and uncharged, with outcome `uncounted` in the access
// log and `tollgate_requests_total`: it never guesses a count.

/// A `receivemessage` on its way to the gateway, to be charged from the
/// answer.
#[derive(Debug)]
pub struct PendingReceive {
    pub account: String,
    pub price_per_message_milli: i64,
    /// Which bucket pays, decided when the request arrived.
    pub preference: BucketPreference,
    /// The tariff snapshot that priced it, recorded on the entries.
    pub tariff_version: String,
    pub request_id: String,
    /// Shadow mode: count and report, never move a balance.
    pub shadow: bool,
}

/// What charging a `receivemessage` answer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveCharge {
    pub messages: u32,
    pub charged_milli: i64,
    pub shortfall_milli: i64,
    pub outcome: &'static str,
}

/// What an account can pay now with `preference`, never below 0.
fn payable_milli(view: &crate::ledger::AccountView, preference: BucketPreference) -> i64 {
    let anytime = view.anytime.available_milli().max(0);
    match preference {
        BucketPreference::AnytimeOnly => anytime,
        BucketPreference::OffPeakFirst => {
            anytime.saturating_add(view.offpeak.available_milli().max(0))
        }
    }
}

async fn receive_message(
    app: &App,
    snapshot: &Snapshot,
    params: &Params,
    request_id: &str,
    client_ip: Option<IpAddr>,
) -> Decision {
    const ACTION: &str = "receivemessage";
    if has_conflicting_actions(params) {
        return Decision::Answer(error_answer(
            ACTION,
            ErrorCode::InvalidRequest,
            ErrorCode::InvalidRequest.name(),
        ));
    }
    let credentials = match credentials_for(params, ACTION) {
        Ok(c) => c,
        Err(e) => return Decision::Answer(error_answer(ACTION, e.code, e.code.name())),
    };
    let auth = authenticate(app, snapshot, client_ip, &credentials).await;
    if let Auth::Locked(r) = auth {
        return rate_limited(
            error_answer(ACTION, ErrorCode::RateLimited, "rate_limited"),
            r,
        );
    }
    if auth != Auth::Verified {
        if app.config.auth.unknown_accounts == UnknownAccounts::Forward {
            app.metrics
                .unknown_forwarded
                .with_label_values(&[ACTION])
                .inc();
            return Decision::Forward(None);
        }
        return Decision::Answer(error_answer(ACTION, ErrorCode::AuthFailed, "auth_failed"));
    }
    let Some(view) = app.ledger.account(&credentials.username) else {
        return Decision::Answer(error_answer(
            ACTION,
            ErrorCode::UnknownAccount,
            "unknown_account",
        ));
    };
    let tariff = &snapshot.tariff;
    let price = tariff.receive_price_milli();
    let preference = tariff.bucket_preference(app.clock.now_unix_ms());
    let shadow = snapshot.mode == Mode::Shadow;
    if !shadow {
        let payable = payable_milli(&view, preference);
        let can_pay_one = match app.ledger.config().overdraft {
            Overdraft::Strict => payable >= price,
            Overdraft::Ozeki => payable > 0,
        };
        if !can_pay_one {
            return Decision::Answer(error_answer(
                ACTION,
                ErrorCode::InsufficientCredit,
                ErrorCode::InsufficientCredit.name(),
            ));
        }
        // Back-pressure before a change: messages must not leave the
        // gateway while their charge could not be recorded.
        if let Err(code) = app.admit_change().await {
            return Decision::Answer(error_answer(ACTION, code, code.name()));
        }
    }
    Decision::ForwardReceive(PendingReceive {
        account: view.name,
        price_per_message_milli: price,
        preference,
        tariff_version: tariff.version().to_string(),
        request_id: request_id.to_string(),
        shadow,
    })
}

/// Charges the messages of a forwarded `receivemessage` answer (see the
/// comment above [`PendingReceive`]). Nothing is charged unless the gateway
/// answered 2xx with an answer tollgate can count.
pub async fn charge_receive(
    app: &App,
    pending: &PendingReceive,
    forwarded: &Forwarded,
) -> ReceiveCharge {
    let mut charge = ReceiveCharge {
        messages: 0,
        charged_milli: 0,
        shortfall_milli: 0,
        outcome: "forwarded",
    };
    let Forwarded::Answered { header, body, .. } = forwarded else {
        return charge;
    };
    if !header.status.is_success() {
        return charge;
    }
    charge.messages = match count_messages(body) {
        Ok(0) => return charge,
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(
                request_id = %pending.request_id,
                account = %pending.account,
                error = %e,
                "receivemessage answer could not be counted; relayed uncharged"
            );
            charge.outcome = "uncounted";
            return charge;
        }
    };
    let metrics = &app.metrics;
    // Cannot overflow: the answer is at most 16 MiB (< 2^24 messages) and a
    // price at most 10^9 milli-credits.
    let amount_milli = i64::from(charge.messages) * pending.price_per_message_milli;
    if pending.shadow {
        metrics
            .received_messages
            .with_label_values(&["shadow"])
            .inc_by(u64::from(charge.messages));
        let payable = app
            .ledger
            .account(&pending.account)
            .map_or(0, |v| payable_milli(&v, pending.preference));
        let decision = if payable >= amount_milli {
            "would_charge"
        } else {
            "would_refuse"
        };
        metrics
            .shadow_decisions
            .with_label_values(&[decision])
            .inc();
        charge.outcome = "shadow";
        return charge;
    }
    let shares = vec![pending.price_per_message_milli; charge.messages as usize];
    charge.charged_milli = post_receive(app, pending, &shares, amount_milli);
    charge.shortfall_milli = amount_milli - charge.charged_milli;
    if charge.shortfall_milli > 0 {
        metrics
            .received_messages
            .with_label_values(&["shortfall"])
            .inc_by(u64::from(charge.messages));
        metrics
            .receive_shortfall_milli
            .inc_by(charge.shortfall_milli.unsigned_abs());
        tracing::warn!(
            request_id = %pending.request_id,
            account = %pending.account,
            messages = charge.messages,
            charged_milli = charge.charged_milli,
            shortfall_milli = charge.shortfall_milli,
            "received messages cost more than the account could pay; the rest is a shortfall"
        );
        charge.outcome = "receive_shortfall";
    } else {
        metrics
            .received_messages
            .with_label_values(&["charged"])
            .inc_by(u64::from(charge.messages));
        charge.outcome = "receive_charged";
    }
    if charge.charged_milli > 0 {
        // The answer does not acknowledge the charge, but with `durability:
        // sync` the charge is committed before the client sees it; a store
        // that is behind leaves it queued (committed when it recovers).
        if let Err(code) = app.change_durable().await {
            tracing::warn!(request_id = %pending.request_id, code = code.name(), "receive charge not yet durable");
        }
    }
    charge
}

/// Reserves and posts `amount_milli` (one share per message); when the
/// account cannot pay it all, whatever it can pay. Returns what was posted.
fn post_receive(app: &App, pending: &PendingReceive, shares: &[i64], amount_milli: i64) -> i64 {
    let ledger = &app.ledger;
    let reference = Some(pending.request_id.as_str());
    let version = Some(pending.tariff_version.as_str());
    let mut attempt: Vec<i64> = shares.to_vec();
    // A few tries: a concurrent send may take the balance between reading
    // it and reserving.
    for _ in 0..3 {
        let total: i64 = attempt.iter().sum();
        if total == 0 {
            return 0;
        }
        match ledger.reserve(
            &pending.account,
            &attempt,
            pending.preference,
            reference,
            version,
        ) {
            Ok(id) => {
                return match ledger.settle(id, total, reference) {
                    Ok(s) => s.posted_milli,
                    Err(e) => {
                        // Only possible if the sweep or an operator resolved
                        // it in between, which needs far more time than this.
                        tracing::warn!(request_id = %pending.request_id, error = %e, "receive charge resolved elsewhere");
                        0
                    }
                };
            }
            Err(LedgerError::InsufficientCredit { .. }) => {
                let payable = ledger
                    .account(&pending.account)
                    .map_or(0, |v| payable_milli(&v, pending.preference));
                attempt = vec![payable.min(amount_milli)];
            }
            Err(e) => {
                tracing::warn!(request_id = %pending.request_id, error = %e, "receive charge failed");
                return 0;
            }
        }
    }
    0
}
