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

use crate::api::ozeki::answer::{match_reports, parse_send_answer, AnswerError};
use crate::api::ozeki::command::{classify, Command, Credentials, OutgoingMessage, SendMessage};
use crate::api::ozeki::params::Params;
use crate::api::ozeki::render;
use crate::auth::AuthOutcome;
use crate::config::{ActionEcho, Mode, UnknownAccounts};
use crate::error::ErrorCode;
use crate::ledger::{Bucket, LedgerError, ReservationGuard, Role};
use crate::service::{now_unix_ms, App, Snapshot};
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
    Uncharged,
}

impl Settled {
    pub fn outcome(self) -> &'static str {
        match self {
            Settled::Posted { .. } => "settled",
            Settled::Voided => "voided",
            Settled::InDoubt => "in_doubt",
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
pub async fn decide(app: &App, snapshot: &Snapshot, params: &Params, request_id: &str) -> Decision {
    let command = match classify(params) {
        Ok(c) => c,
        Err(e) => return Decision::Answer(error_answer(&e.action, e.code, e.code.name())),
    };
    match command {
        Command::Other => Decision::Forward(None),
        Command::GetCredits {
            credentials,
            useraccount,
        } => Decision::Answer(get_credits(app, &credentials, useraccount).await),
        Command::SetCredits {
            credentials,
            useraccount,
            new_balance_milli,
        } => Decision::Answer(
            change_credits(
                app,
                &credentials,
                useraccount,
                Change::Set(new_balance_milli),
                request_id,
            )
            .await,
        ),
        Command::AddCredits {
            credentials,
            useraccount,
            add_milli,
        } => Decision::Answer(
            change_credits(
                app,
                &credentials,
                useraccount,
                Change::Add(add_milli),
                request_id,
            )
            .await,
        ),
        Command::SendMessage(send) => send_message(app, snapshot, send, request_id).await,
    }
}

/// Checks credentials; the answer never says whether the name exists.
async fn authenticate(app: &App, credentials: &Credentials) -> AuthOutcome {
    app.credentials
        .verify(&credentials.username, &credentials.password)
        .await
}

async fn get_credits(
    app: &App,
    credentials: &Credentials,
    useraccount: Option<String>,
) -> LocalAnswer {
    const ACTION: &str = "getcredits";
    if authenticate(app, credentials).await != AuthOutcome::Verified {
        return error_answer(ACTION, ErrorCode::AuthFailed, "auth_failed");
    }
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
    if authenticate(app, credentials).await != AuthOutcome::Verified {
        return error_answer(action, ErrorCode::AuthFailed, "auth_failed");
    }
    let Some(caller) = app.ledger.account(&credentials.username) else {
        return error_answer(action, ErrorCode::UnknownAccount, "unknown_account");
    };
    if caller.role != Role::Admin {
        return error_answer(action, ErrorCode::Forbidden, "forbidden");
    }
    let target = useraccount.unwrap_or(caller.name);
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
        Ok(balance) => xml(
            render::credits_answer(echo, &target, balance.available_milli()),
            "ok",
        ),
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

async fn send_message(
    app: &App,
    snapshot: &Snapshot,
    send: SendMessage,
    request_id: &str,
) -> Decision {
    if authenticate(app, &send.credentials).await != AuthOutcome::Verified {
        if app.config.auth.unknown_accounts == UnknownAccounts::Forward {
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
    let account = send.credentials.username.clone();
    let Some(view) = app.ledger.account(&account) else {
        return refusal(
            &send,
            ErrorCode::UnknownAccount,
            ErrorCode::UnknownAccount.message(),
        );
    };

    // Price every (recipient, message) pair with one tariff snapshot.
    let now = now_unix_ms();
    let tariff = &snapshot.tariff;
    let mut shares = Vec::with_capacity(send.messages.len());
    for m in &send.messages {
        let quote = tariff.quote(&QuoteRequest {
            recipient: &m.recipient,
            text: &m.text,
            message_type: &m.message_type,
            class: view.tariff_class.as_deref(),
            at_unix_ms: now,
        });
        match quote {
            Ok(q) => shares.push(q.total_milli),
            Err(e) => {
                let message = format!("{}: {e}", ErrorCode::InvalidRequest.message());
                return refusal(&send, ErrorCode::InvalidRequest, &message);
            }
        }
    }
    let cost_milli: i64 = shares.iter().sum();
    let preference = tariff.bucket_preference(now);

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

    match app.ledger.reserve(
        &account,
        &shares,
        preference,
        Some(request_id),
        Some(tariff.version()),
    ) {
        Ok(id) => Decision::Forward(Some(PendingSend {
            guard: Some(ReservationGuard::new(app.ledger.clone(), id)),
            account,
            messages: send.messages,
            batch: send.batch,
            cost_milli,
            request_id: request_id.to_string(),
        })),
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
            Settled::InDoubt
        }
    }
}

/// Whether a 2xx body is Ozeki's whole-request error answer.
fn is_gateway_error(body: &[u8]) -> bool {
    let window = &body[..body.len().min(4096)];
    window.windows(11).any(|w| w == b"<errorcode>")
}
