//! What each Ozeki NG command does (SPEC 1.2, 1.3): the credit actions are
//! answered here from the ledger and never reach the gateway; a send is
//! priced, reserved, forwarded and settled (`service::send`); a priced
//! `receivemessage` is charged from its answer (`service::receive`);
//! anything else is forwarded with its original bytes.
//!
//! Order for every request: parameters (already parsed by
//! [`parse`](crate::api::ozeki::params)), a per-address limit refusal from
//! admission, then the `Idempotency-Key` wrapper (`service::idempotent`)
//! around the command, whose first step is always the per-(address, user)
//! lockout, then the credentials, then the change.

use std::net::IpAddr;

use crate::api::ozeki::command::{
    action_of, classify, credentials_for, Command, Credentials, SendMessage,
};
use crate::api::ozeki::inbox::names_receive;
use crate::api::ozeki::params::Params;
use crate::api::ozeki::render;
use crate::config::ActionEcho;
use crate::error::ErrorCode;
use crate::idempotency;
use crate::ledger::{Bucket, LedgerError, Role};
use crate::limits;
use crate::redact::redact_query;
use crate::service::dropin::{self, Auth};
use crate::service::forward::{forward, relay};
use crate::service::idempotent::{self, Keyed};
use crate::service::respond::{refuse, Refusal, Reply, Shape, CONTENT_TYPE_XML};
use crate::service::{action_label, receive, send, App, Outcome, Request, Snapshot};

/// Longest account name an access line repeats (a client may send any
/// `username`; valid names are at most 64 characters).
const ACCOUNT_LOG_MAX_CHARS: usize = 64;

/// The Ozeki actions an `Idempotency-Key` applies to (SPEC 3.4).
const IDEMPOTENT: [&str; 3] = ["sendmessage", "addcredits", "setcredits"];

/// Serves one Ozeki request whose parameters were read.
pub async fn handle(app: &App, snapshot: &Snapshot, req: &Request<'_>, params: Params) -> Reply {
    let action = action_of(&params).unwrap_or_default();
    let label = action_label(&action);
    let account = params
        .get("username")
        .map(|u| u.chars().take(ACCOUNT_LOG_MAX_CHARS).collect());
    let mut reply = match req.limited {
        Some(limit) => limited(&params, &action, limit),
        None => {
            let keyed = keyed(req, &params, &action);
            let verify = || caller_verified(app, snapshot, req.client_ip, &params, &action);
            idempotent::run(app, req.head, keyed, verify, || {
                run(app, snapshot, req, &params)
            })
            .await
        }
    };
    reply.log.action = label;
    reply.log.account = account;
    reply
}

/// The answer of a process that cannot decide credit now (a successor
/// whose store is not loaded in time, `handover.rs`): the command is read
/// as [`handle`] reads it and refused `store_unavailable` in its shape
/// (one refusing report per message of a send) before anything is checked.
pub fn unavailable(req: &Request<'_>, params: &Params) -> Reply {
    let action = action_of(params).unwrap_or_default();
    let mut reply = match (req.limited, classify(params)) {
        (Some(limit), _) => limited(params, &action, limit),
        (None, Err(e)) => refuse(Shape::Ozeki { action: &e.action }, Refusal::new(e.code)),
        (None, Ok(Command::SendMessage(send))) => refuse(
            Shape::OzekiSend(&send),
            Refusal::new(ErrorCode::StoreUnavailable),
        ),
        (None, Ok(_)) => refuse(
            Shape::Ozeki { action: &action },
            Refusal::new(ErrorCode::StoreUnavailable),
        ),
    };
    reply.log.action = action_label(&action);
    reply.log.account = params
        .get("username")
        .map(|u| u.chars().take(ACCOUNT_LOG_MAX_CHARS).collect());
    reply
}

/// Whether answering this command needs the ledger (credit actions, sends,
/// a priced `receivemessage`); `false` for what is only forwarded or
/// refused for its form.
pub fn needs_ledger(snapshot: &Snapshot, params: &Params) -> bool {
    match classify(params) {
        Err(_) => false,
        Ok(Command::Other) => snapshot.tariff.receive_price_milli() > 0 && names_receive(params),
        Ok(_) => true,
    }
}

/// The command of a request, carried out.
async fn run(app: &App, snapshot: &Snapshot, req: &Request<'_>, params: &Params) -> Reply {
    let command = match classify(params) {
        Ok(c) => c,
        Err(e) => return refuse(Shape::Ozeki { action: &e.action }, Refusal::new(e.code)),
    };
    match command {
        Command::Other if snapshot.tariff.receive_price_milli() > 0 && names_receive(params) => {
            receive::receive(app, snapshot, req, params).await
        }
        Command::Other => {
            let label = action_label(&action_of(params).unwrap_or_default());
            let forwarded = forward(app, req, label).await;
            relay(req, forwarded, Outcome::Forwarded, label, &[])
        }
        Command::GetCredits {
            credentials,
            useraccount,
        } => {
            const ACTION: &str = "getcredits";
            match check_caller(app, snapshot, req.client_ip, &credentials).await {
                Ok(()) => get_credits(app, &credentials, useraccount).await,
                Err(refusal) => refuse(Shape::Ozeki { action: ACTION }, refusal),
            }
        }
        Command::SetCredits {
            credentials,
            useraccount,
            new_balance_milli,
        } => {
            let change = Change::Set(new_balance_milli);
            credit_change(app, snapshot, req, &credentials, useraccount, change).await
        }
        Command::AddCredits {
            credentials,
            useraccount,
            add_milli,
        } => {
            let change = Change::Add(add_milli);
            credit_change(app, snapshot, req, &credentials, useraccount, change).await
        }
        Command::SendMessage(s) => send::send(app, snapshot, req, s).await,
    }
}

/// The idempotency wrapper's view of a request: keys apply to sends and
/// credit changes; the fingerprint is the method, path, query and body
/// with secret values left out (it is stored). No `username`: the request
/// fails authentication anyway, and there is no account to scope the key.
fn keyed<'a>(req: &Request<'_>, params: &'a Params, action: &'a str) -> Option<Keyed<'a>> {
    // Without the header there is nothing to key, and the fingerprint
    // (the redacted request, hashed) is a tenth of a send's cost.
    if !IDEMPOTENT.contains(&action) || !req.head.headers.contains_key(idempotency::HEADER) {
        return None;
    }
    let account = params.get("username")?;
    let head = req.head;
    let query = redact_query("", head.uri.query());
    let body = match std::str::from_utf8(&req.body) {
        Ok(text) => redact_query("", Some(text)).into_bytes(),
        Err(_) => req.body.to_vec(),
    };
    let fingerprint = idempotency::fingerprint(&[
        head.method.as_str().as_bytes(),
        head.uri.path().as_bytes(),
        query.as_bytes(),
        &body,
    ]);
    Some(Keyed {
        account,
        fingerprint,
        is_send: action == "sendmessage",
        shape: Shape::Ozeki { action },
    })
}

/// The answer to a request refused by a per-address limit before it was
/// decided: a send gets one refusing report per message, anything else an
/// error answer; HTTP 429 with `Retry-After`.
fn limited(params: &Params, action: &str, limit: limits::Refusal) -> Reply {
    let send: Option<SendMessage> = match classify(params) {
        Ok(Command::SendMessage(send)) => Some(send),
        _ => None,
    };
    let shape = match &send {
        Some(send) => Shape::OzekiSend(send),
        None => Shape::Ozeki { action },
    };
    refuse(shape, Refusal::limited(limit))
}

/// Checks credentials: lockout, local store, drop-in verification
/// (`service::dropin`). The answer never says whether the name exists.
pub async fn authenticate(
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

/// Whether the credentials of a request verify, by the same path as the
/// request itself (lockout first): only such a caller is shown a stored
/// idempotent answer. Counts towards the lockout like any check.
async fn caller_verified(
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

/// `Ok` if the caller of a credit action authenticated; else the refusal.
async fn check_caller(
    app: &App,
    snapshot: &Snapshot,
    client_ip: Option<IpAddr>,
    credentials: &Credentials,
) -> Result<(), Refusal> {
    match authenticate(app, snapshot, client_ip, credentials).await {
        Auth::Verified => Ok(()),
        Auth::Failed => Err(Refusal::new(ErrorCode::AuthFailed)),
        Auth::Unavailable => Err(Refusal::new(ErrorCode::UpstreamUnavailable)),
        Auth::Locked(limit) => Err(Refusal::limited(limit)),
    }
}

/// An Ozeki credits answer (HTTP 200).
fn credits(action_echo: &str, account: &str, available_milli: i64) -> Reply {
    Reply::local(
        200,
        CONTENT_TYPE_XML,
        render::credits_answer(action_echo, account, available_milli),
        Outcome::Ok,
    )
}

async fn get_credits(app: &App, credentials: &Credentials, useraccount: Option<String>) -> Reply {
    const ACTION: &str = "getcredits";
    let refused = |code: ErrorCode| refuse(Shape::Ozeki { action: ACTION }, Refusal::new(code));
    if let Err(code) = app.ensure_owner() {
        return refused(code);
    }
    // The caller authenticated in `run`.
    let Some(caller) = app.ledger.account(&credentials.username) else {
        return refused(ErrorCode::UnknownAccount);
    };
    let target = useraccount.unwrap_or_else(|| caller.name.clone());
    if target != caller.name && caller.role != Role::Admin {
        return refused(ErrorCode::Forbidden);
    }
    match (app.ledger.account(&target), &app.cluster) {
        (Some(view), None) => credits(ACTION, &view.name, view.anytime.available_milli()),
        // The account's balance across the cluster, one round trip (boxed:
        // only cluster nodes wait here).
        (Some(view), Some(node)) => match Box::pin(cluster_balance(node, &view.name)).await {
            Ok(balance) => credits(ACTION, &view.name, balance),
            Err(code) => refused(code),
        },
        (None, _) => refused(ErrorCode::UnknownAccount),
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
    req: &Request<'_>,
    credentials: &Credentials,
    useraccount: Option<String>,
    change: Change,
) -> Reply {
    let action = change.action();
    let refused = |refusal: Refusal| refuse(Shape::Ozeki { action }, refusal);
    if let Err(refusal) = check_caller(app, snapshot, req.client_ip, credentials).await {
        return refused(refusal);
    }
    let echo = match (&change, app.config.ozeki.addcredits_action_echo) {
        (Change::Add(_), ActionEcho::Getcredits) => "getcredits",
        _ => action,
    };
    // The caller authenticated above.
    let Some(caller) = app.ledger.account(&credentials.username) else {
        return refused(Refusal::new(ErrorCode::UnknownAccount));
    };
    if caller.role != Role::Admin {
        return refused(Refusal::new(ErrorCode::Forbidden));
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
        return refused(Refusal::new(code));
    }
    let reference = Some(req.request_id.as_str());
    if let Some(node) = &app.cluster {
        let Some(view) = app.ledger.account(&target) else {
            return refused(Refusal::new(ErrorCode::UnknownAccount));
        };
        let answer = Box::pin(cluster_credit_change(app, node, &view, change, reference)).await;
        return match answer {
            Ok(balance) => credits(echo, &target, balance),
            Err(code) => refused(Refusal::new(code)),
        };
    }
    let result = match change {
        Change::Set(None) => match app.ledger.account(&target) {
            Some(v) => Ok(v.anytime),
            None => Err(LedgerError::UnknownAccount(target.clone())),
        },
        Change::Set(Some(new)) => app
            .ledger
            .set(&target, Bucket::Anytime, new, reference)
            .map(|a| a.balance),
        Change::Add(amount) => app
            .ledger
            .add(&target, Bucket::Anytime, amount, reference)
            .map(|a| a.balance),
    };
    match result {
        Ok(balance) => {
            // The answer acknowledges the change: with `durability: sync` it
            // waits for the commit (SPEC 6).
            if changes {
                if let Err(code) = app.change_durable().await {
                    return refused(Refusal::new(code));
                }
            }
            credits(echo, &target, balance.available_milli())
        }
        Err(e) => refused(Refusal::new(ledger_error_code(&e))),
    }
}

/// The any-time balance of `account` across the cluster, as the credit
/// answers show it (0 for an account the database has no row of yet); a
/// database error is `store_unavailable`. Boxis' `getCreditLimit` answers
/// the same.
pub(super) async fn cluster_balance(
    node: &crate::cluster::node::ClusterNode,
    account: &str,
) -> Result<i64, ErrorCode> {
    match node.balance(account).await {
        Ok(b) => Ok(b.map_or(0, |[anytime, _]| anytime.balance_milli())),
        Err(e) => {
            tracing::warn!(error = %e, "cluster: reading a balance failed");
            Err(ErrorCode::StoreUnavailable)
        }
    }
}

/// A cluster node's `setcredits`/`addcredits`: straight in the shared
/// database (committed before the answer, visible to every node's next
/// take); the answer is the account's balance across the cluster. Refused
/// with `insufficient_credit` when the change would take the balance below
/// what reservations and nodes' grants hold (idle grants come back within
/// `cluster.grant_idle_ms`).
async fn cluster_credit_change(
    app: &App,
    node: &crate::cluster::node::ClusterNode,
    target: &crate::ledger::AccountView,
    change: Change,
    reference: Option<&str>,
) -> Result<i64, ErrorCode> {
    use crate::cluster::sql::CreditKind;
    let (kind, amount) = match change {
        Change::Set(None) => return cluster_balance(node, &target.name).await,
        Change::Set(Some(_)) | Change::Add(_) if !node.may_spend() => {
            return Err(ErrorCode::StoreUnavailable)
        }
        Change::Set(Some(new)) if new < 0 => return Err(ErrorCode::InvalidRequest),
        Change::Set(Some(new)) => (CreditKind::Set, new),
        Change::Add(amount) => (CreditKind::Add, amount),
    };
    match node
        .credit(
            &app.ledger,
            kind,
            &target.name,
            target.role,
            amount,
            reference,
        )
        .await
    {
        Ok(Some([anytime, _])) => Ok(anytime.balance_milli()),
        Ok(None) => Err(ErrorCode::InsufficientCredit),
        Err(e) => {
            tracing::warn!(error = %e, "cluster: a credit action failed");
            Err(ErrorCode::StoreUnavailable)
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
