//! What the 2sms-compatible SOAP door does (SPEC 2.2): serve the WSDL,
//! answer `GetBalance`, and move credit between a parent and its
//! sub-account for `SubAccountGiveCredit`.
//!
//! Transport rules (SOAP 1.1 and 1.2 HTTP bindings): the `Content-Type`
//! says which version the client speaks (`text/xml` → 1.1,
//! `application/soap+xml` → 1.2); an envelope of the other version is a
//! `VersionMismatch` fault. Every fault is HTTP 500, as ASMX (which the
//! original service runs on) answers both versions; an operation that ran
//! and failed is a normal response (HTTP 200) with a non-zero `Code` from
//! `crate::error`.
//!
//! Credentials are checked by the shared credential store (argon2id and its
//! cache). A failed transfer changes nothing (the ledger's transfer is one
//! atomic operation over both accounts and both buckets). Balances in
//! answers are *available* balances (posted minus reserved). A caller never
//! learns anything about an account that is not its own or its
//! sub-account's: an unknown `SubAccount` is answered like someone else's
//! (`not_a_subaccount`), with zero sub-account balances.
//!
//! Durability (SPEC 6): a transfer is admitted by the store's back-pressure
//! first, and its success is answered only once committed (with
//! `durability: sync`); a store that does not keep up is answered with
//! `store_unavailable` (on a commit timeout the transfer stays made in
//! memory and queued, but is not acknowledged).

use std::net::IpAddr;

use crate::api::soap::{
    balance_response, call_from_envelope, check_action, give_credit_response, parse_envelope, wsdl,
    BalanceAnswer, Balances, Call, CallError, EnvelopeLimits, FaultKind, GiveCreditAnswer,
    OperationName, SoapCredentials, SoapVersion,
};
use crate::auth::AuthOutcome;
use crate::error::ErrorCode;
use crate::idempotency;
use crate::ledger::{AccountView, LedgerError};
use crate::service::idempotent::{self, Keyed};
use crate::service::respond::{self, Refusal, Reply, Shape, SOAP_FAULT_STATUS};
use crate::service::{App, Outcome, Request};

/// HTTP status of every SOAP Fault.
pub const FAULT_STATUS: u16 = SOAP_FAULT_STATUS;

/// The parts of an HTTP request the door looks at.
#[derive(Clone, Copy)]
pub struct SoapHttpRequest<'a> {
    /// The whole request: its `Idempotency-Key`, its id for the ledger.
    pub request: &'a Request<'a>,
    /// For the per-(IP, user) authentication lockout (SPEC 7).
    pub client_ip: Option<std::net::IpAddr>,
    pub method: &'a str,
    pub query: Option<&'a str>,
    /// `Host` header, for the WSDL's address.
    pub host: Option<&'a str>,
    pub content_type: Option<&'a str>,
    /// SOAP 1.1 `SOAPAction` header.
    pub soap_action: Option<&'a str>,
    pub body: &'a [u8],
}

/// Whether the query string asks for the WSDL (`?WSDL`, `?wsdl`, …).
pub fn wants_wsdl(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|pair| {
            pair.split('=')
                .next()
                .unwrap_or("")
                .eq_ignore_ascii_case("wsdl")
        })
    })
}

/// The SOAP version a `Content-Type` announces, and the SOAP 1.2 `action`
/// parameter if present.
pub fn version_of_content_type(
    content_type: Option<&str>,
) -> Option<(SoapVersion, Option<String>)> {
    let ct = content_type?;
    let mut parts = ct.split(';');
    let media = parts.next().unwrap_or("").trim();
    let version = if media.eq_ignore_ascii_case("text/xml") {
        SoapVersion::V11
    } else if media.eq_ignore_ascii_case("application/soap+xml") {
        SoapVersion::V12
    } else {
        return None;
    };
    let action = parts.find_map(|p| {
        let (name, value) = p.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("action")
            .then(|| value.trim().trim_matches('"').to_string())
    });
    Some((version, action))
}

fn fault_answer(version: SoapVersion, kind: FaultKind, reason: &str, status: u16) -> Reply {
    respond::refuse(
        Shape::SoapFault { version, kind },
        Refusal::with_text(ErrorCode::InvalidRequest, reason)
            .status(status)
            .outcome(Outcome::Fault),
    )
}

/// The answer to a body over `soap.body_limit_bytes` (HTTP 413, a fault).
pub fn too_large(content_type: Option<&str>) -> Reply {
    let version = version_of_content_type(content_type)
        .map(|(v, _)| v)
        .unwrap_or(SoapVersion::V11);
    respond::refuse(
        Shape::SoapFault {
            version,
            kind: FaultKind::Client,
        },
        Refusal::with_text(ErrorCode::InvalidRequest, "request body too large")
            .status(413)
            .outcome(Outcome::BodyTooLarge),
    )
    .for_action("other")
}

/// Serves one request on the SOAP path, labelled with its operation.
pub async fn handle(app: &App, req: &SoapHttpRequest<'_>) -> Reply {
    let (label, reply) = answer(app, req, false).await;
    reply.for_action(label)
}

/// The answer of a process that cannot decide credit now (`handover.rs`):
/// the call is read as [`handle`] reads it, and a valid operation fails
/// with `store_unavailable` (no balances) before anything is checked.
pub async fn unavailable(app: &App, req: &SoapHttpRequest<'_>) -> Reply {
    let (label, reply) = answer(app, req, true).await;
    reply.for_action(label)
}

async fn answer(app: &App, req: &SoapHttpRequest<'_>, unavailable: bool) -> (&'static str, Reply) {
    let request_id = req.request.request_id.as_str();
    if req.method.eq_ignore_ascii_case("GET") {
        return if wants_wsdl(req.query) {
            (
                "wsdl",
                Reply::local(
                    200,
                    "text/xml; charset=utf-8",
                    wsdl(&location(app, req.host)),
                    Outcome::Ok,
                ),
            )
        } else {
            ("help", help_page(app))
        };
    }
    if !req.method.eq_ignore_ascii_case("POST") {
        return (
            "other",
            fault_answer(
                SoapVersion::V11,
                FaultKind::Client,
                "use POST (or GET ?WSDL)",
                405,
            )
            .with_header("Allow", "GET, POST"),
        );
    }
    let Some((version, action)) = version_of_content_type(req.content_type) else {
        return (
            "other",
            fault_answer(
                SoapVersion::V11,
                FaultKind::Client,
                "Content-Type must be text/xml (SOAP 1.1) or application/soap+xml (SOAP 1.2)",
                415,
            ),
        );
    };
    let limits = EnvelopeLimits::default();
    let envelope = match parse_envelope(req.body, &limits) {
        Ok(e) => e,
        Err(failure) => {
            // A well-formed envelope of the other version is a version
            // mismatch for the binding the client used.
            let (kind, fault_version) = match failure.version {
                Some(v) if v != version => (FaultKind::VersionMismatch, version),
                Some(v) => (failure.error.fault_kind(), v),
                None => (failure.error.fault_kind(), version),
            };
            return (
                "other",
                fault_answer(
                    fault_version,
                    kind,
                    &failure.error.to_string(),
                    FAULT_STATUS,
                ),
            );
        }
    };
    if envelope.version != version {
        return (
            "other",
            fault_answer(
                version,
                FaultKind::VersionMismatch,
                &format!(
                    "a SOAP {} envelope was sent as SOAP {}",
                    envelope.version.as_str(),
                    version.as_str()
                ),
                FAULT_STATUS,
            ),
        );
    }
    let declared = match version {
        SoapVersion::V11 => req.soap_action.map(str::to_string),
        SoapVersion::V12 => action,
    };
    let call = match call_from_envelope(&envelope) {
        Ok(call) => call,
        Err(CallError::UnknownOperation(name)) => {
            return (
                "other",
                fault_answer(
                    version,
                    FaultKind::Client,
                    &format!("unknown operation {name}"),
                    FAULT_STATUS,
                ),
            )
        }
        Err(CallError::InvalidParams { operation, reason }) => {
            if let Err(reason) = check_action(version, declared.as_deref(), operation) {
                return (
                    operation.label(),
                    fault_answer(version, FaultKind::Client, &reason, FAULT_STATUS),
                );
            }
            tracing::debug!(operation = operation.as_str(), %reason, "soap call refused");
            let code = ErrorCode::InvalidRequest;
            let text = format!("{}: {reason}", code.message());
            return (
                operation.label(),
                failure_answer(version, operation, code, &text, None, None),
            );
        }
    };
    let operation = call.operation();
    if let Err(reason) = check_action(version, declared.as_deref(), operation) {
        return (
            operation.label(),
            fault_answer(version, FaultKind::Client, &reason, FAULT_STATUS),
        );
    }
    if unavailable {
        let code = ErrorCode::StoreUnavailable;
        return (
            operation.label(),
            failure_answer(version, operation, code, code.message(), None, None),
        );
    }
    let answer = match call {
        Call::GetBalance { credentials } => {
            let caller = Caller {
                credentials: &credentials,
                ip: req.client_ip,
            };
            get_balance(app, version, caller).await
        }
        Call::SubAccountGiveCredit {
            credentials,
            sub_account,
            anytime_milli,
            offpeak_milli,
        } => {
            let caller = Caller {
                credentials: &credentials,
                ip: req.client_ip,
            };
            // SPEC 3.4: the call's arguments are its fingerprint (the
            // envelope's formatting and the password do not count).
            let keyed = Keyed {
                account: &credentials.username,
                fingerprint: idempotency::fingerprint(&[
                    b"soap:SubAccountGiveCredit",
                    sub_account.as_bytes(),
                    &anytime_milli.to_le_bytes(),
                    &offpeak_milli.to_le_bytes(),
                ]),
                is_send: false,
                shape: Shape::SoapFault {
                    version,
                    kind: FaultKind::Client,
                },
            };
            let verify = || async { authenticate(app, caller).await.is_ok() };
            let transfer = || {
                give_credit(
                    app,
                    version,
                    caller,
                    &sub_account,
                    anytime_milli,
                    offpeak_milli,
                    request_id,
                )
            };
            idempotent::run(app, req.request.head, Some(keyed), verify, transfer).await
        }
    };
    (operation.label(), answer)
}

fn ok_answer(version: SoapVersion, body: String) -> Reply {
    Reply::local(200, version.content_type(), body, Outcome::Ok)
}

/// An operation's response for a failure: `…Result` false, the code, and
/// the balances the caller may see (zeros otherwise).
fn failure_answer(
    version: SoapVersion,
    operation: OperationName,
    code: ErrorCode,
    text: &str,
    parent: Option<&AccountView>,
    sub: Option<&AccountView>,
) -> Reply {
    let shape = Shape::SoapOperation {
        version,
        operation,
        parent,
        sub,
    };
    respond::refuse(shape, Refusal::with_text(code, text))
}

/// A cluster node's `SubAccountGiveCredit`: one transaction in the shared
/// database, both buckets or neither (`cluster::sql::transfer`); the
/// answer shows both accounts' balances across the cluster.
async fn cluster_give_credit(
    app: &App,
    node: &crate::cluster::node::ClusterNode,
    parent: &str,
    sub_account: &str,
    amounts_milli: [i64; 2],
    request_id: &str,
) -> Result<(Balances, Balances), ErrorCode> {
    use crate::cluster::sql::TransferRefused;
    if amounts_milli == [0, 0] {
        return Err(ErrorCode::InvalidRequest);
    }
    if !node.may_spend() {
        return Err(ErrorCode::StoreUnavailable);
    }
    let of = |[anytime, offpeak]: [crate::cluster::sql::ClusterBalance; 2]| Balances {
        anytime_milli: anytime.balance_milli(),
        offpeak_milli: offpeak.balance_milli(),
    };
    match node
        .transfer(
            &app.ledger,
            parent,
            sub_account,
            amounts_milli,
            Some(request_id),
        )
        .await
    {
        Ok(Ok([p, c])) => Ok((of(p), of(c))),
        Ok(Err(TransferRefused::NotASubaccount)) => Err(ErrorCode::NotASubaccount),
        Ok(Err(TransferRefused::Insufficient { .. })) => Err(ErrorCode::InsufficientCredit),
        Err(e) => {
            tracing::warn!(error = %e, "cluster: a transfer failed");
            Err(ErrorCode::StoreUnavailable)
        }
    }
}

fn balances_of(b: &crate::ledger::AccountBalances) -> Balances {
    Balances {
        anytime_milli: b.anytime.available_milli(),
        offpeak_milli: b.offpeak.available_milli(),
    }
}

/// Who calls: the credentials in the envelope and the address they came
/// from (for the authentication lockout).
#[derive(Clone, Copy)]
struct Caller<'a> {
    credentials: &'a SoapCredentials,
    ip: Option<IpAddr>,
}

/// The caller's ledger account if the credentials verify; else the error
/// to answer (the same for an unknown name and a wrong password). A locked
/// (IP, user) pair is refused before any check (SPEC 7).
async fn authenticate(app: &App, caller: Caller<'_>) -> Result<AccountView, ErrorCode> {
    let Caller {
        credentials,
        ip: client_ip,
    } = caller;
    let snapshot = app.snapshot.load();
    let user = credentials.username.as_str();
    if app.check_auth_lockout(&snapshot, client_ip, user).is_err() {
        return Err(ErrorCode::RateLimited);
    }
    let verified =
        app.credentials.verify(user, &credentials.password).await == AuthOutcome::Verified;
    app.record_auth(&snapshot, client_ip, user, verified);
    if !verified {
        return Err(ErrorCode::AuthFailed);
    }
    app.ledger
        .account(&credentials.username)
        .ok_or(ErrorCode::UnknownAccount)
}

async fn get_balance(app: &App, version: SoapVersion, caller: Caller<'_>) -> Reply {
    let op = OperationName::GetBalance;
    let view = match authenticate(app, caller).await {
        Ok(v) => v,
        Err(code) => return failure_answer(version, op, code, code.message(), None, None),
    };
    if let Err(code) = app.ensure_owner() {
        return failure_answer(version, op, code, code.message(), None, None);
    }
    ok_answer(
        version,
        balance_response(
            version,
            &BalanceAnswer {
                ok: true,
                balances: Some(balances_of(&view.balances())),
                result_text: format!("Balance of {} retrieved successfully.", view.name),
                code: 0,
            },
        ),
    )
}

async fn give_credit(
    app: &App,
    version: SoapVersion,
    caller: Caller<'_>,
    sub_account: &str,
    anytime_milli: i64,
    offpeak_milli: i64,
    request_id: &str,
) -> Reply {
    let op = OperationName::SubAccountGiveCredit;
    let caller = match authenticate(app, caller).await {
        Ok(v) => v,
        Err(code) => return failure_answer(version, op, code, code.message(), None, None),
    };
    // Back-pressure before the change (SPEC 6); nothing has moved yet.
    // A refusal shows the balances as they are now: the caller's own, and
    // the sub-account's only if it is the caller's (never a stranger's,
    // never 0).
    let refused = |code: ErrorCode, text: &str| {
        let parent = app.ledger.account(&caller.name);
        let sub = app
            .ledger
            .account(sub_account)
            .filter(|s| s.parent.as_deref() == Some(caller.name.as_str()));
        failure_answer(version, op, code, text, parent.as_ref(), sub.as_ref())
    };
    if let Err(code) = app.admit_change().await {
        return refused(code, code.message());
    }
    if let Some(node) = &app.cluster {
        let amounts = [anytime_milli, offpeak_milli];
        let given = Box::pin(cluster_give_credit(
            app,
            node,
            &caller.name,
            sub_account,
            amounts,
            request_id,
        ))
        .await;
        return match given {
            Ok((parent, sub)) => ok_answer(
                version,
                give_credit_response(
                    version,
                    &GiveCreditAnswer {
                        ok: true,
                        parent: Some(parent),
                        sub: Some(sub),
                        result_text: format!(
                            "Credits successfully exchanged between {} (master account) and {} (sub account).",
                            caller.name, sub_account
                        ),
                        code: 0,
                    },
                ),
            ),
            // A cluster node's ledger holds grants, not balances: the
            // refusal shows none.
            Err(code) => failure_answer(version, op, code, code.message(), None, None),
        };
    }
    match app.ledger.transfer(
        &caller.name,
        sub_account,
        anytime_milli,
        offpeak_milli,
        Some(request_id),
    ) {
        Ok(outcome) => {
            // The answer acknowledges the transfer: with `durability: sync`
            // it waits for the commit (SPEC 6). On a timeout the change is
            // made in memory and stays queued (committed when the store
            // recovers), but the client is told it is not acknowledged.
            if let Err(code) = app.change_durable().await {
                return refused(code, code.message());
            }
            let body = give_credit_response(
                version,
                &GiveCreditAnswer {
                    ok: true,
                    parent: Some(balances_of(&outcome.parent)),
                    sub: Some(balances_of(&outcome.child)),
                    result_text: format!(
                        "Credits successfully exchanged between {} (master account) and {} (sub account).",
                        caller.name, sub_account
                    ),
                    code: 0,
                },
            );
            ok_answer(version, body)
        }
        Err(e) => {
            let code = match &e {
                LedgerError::InsufficientCredit { .. } => ErrorCode::InsufficientCredit,
                LedgerError::NotASubaccount { .. } => ErrorCode::NotASubaccount,
                // The caller exists (it just authenticated), so an unknown
                // account is the sub-account: answered like a stranger's.
                LedgerError::UnknownAccount(name) if *name != caller.name => {
                    ErrorCode::NotASubaccount
                }
                LedgerError::UnknownAccount(_) => ErrorCode::UnknownAccount,
                _ => ErrorCode::InvalidRequest,
            };
            let text = match &e {
                LedgerError::InvalidAmount(reason) => format!("{}: {reason}", code.message()),
                _ => code.message().to_string(),
            };
            refused(code, &text)
        }
    }
}

/// The WSDL's service address: the client's `Host` if it is a plain
/// host[:port], else the listen address.
fn location(app: &App, host: Option<&str>) -> String {
    let valid = |h: &&str| {
        !h.is_empty()
            && h.len() <= 255
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
    };
    // Without a usable Host: the plain listener, else the TLS one.
    let (scheme, listen) = match (app.config.listen, &app.config.tls) {
        (Some(plain), _) => ("http", plain),
        (None, Some(tls)) => ("https", tls.listen),
        (None, None) => ("http", std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
    };
    let host = host
        .filter(valid)
        .map(str::to_string)
        .unwrap_or_else(|| listen.to_string());
    format!("{scheme}://{host}{}", app.config.soap.path)
}

fn help_page(app: &App) -> Reply {
    let path = &app.config.soap.path;
    let mut body = String::from(
        "<!DOCTYPE html>\n<html><head><title>Account</title></head><body>\n<h1>Account</h1>\n<ul>\n",
    );
    for op in OperationName::ALL {
        body.push_str(&format!("<li>{}</li>\n", op.as_str()));
    }
    let mut escaped = String::new();
    crate::api::soap::render::push_escaped(&mut escaped, path);
    body.push_str(&format!(
        "</ul>\n<p>Service description: <a href=\"{escaped}?WSDL\">{escaped}?WSDL</a></p>\n</body></html>\n"
    ));
    Reply::local(200, "text/html; charset=utf-8", body, Outcome::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_announce_versions_and_actions() {
        assert_eq!(
            version_of_content_type(Some("text/xml; charset=utf-8")),
            Some((SoapVersion::V11, None))
        );
        assert_eq!(
            version_of_content_type(Some(
                "application/soap+xml; charset=utf-8; action=\"http://x/GetBalance\""
            )),
            Some((SoapVersion::V12, Some("http://x/GetBalance".into())))
        );
        assert_eq!(version_of_content_type(Some("application/json")), None);
        assert_eq!(version_of_content_type(None), None);
    }

    #[test]
    fn wsdl_query_is_case_insensitive() {
        assert!(wants_wsdl(Some("WSDL")));
        assert!(wants_wsdl(Some("wsdl")));
        assert!(wants_wsdl(Some("x=1&Wsdl=")));
        assert!(!wants_wsdl(Some("op=GetBalance")));
        assert!(!wants_wsdl(None));
    }
}
