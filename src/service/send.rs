//! `sendmessage` (SPEC 1.3): authenticate, price every (recipient,
//! message), apply the send limits, reserve all-or-nothing, make the
//! reservation durable, forward the original bytes, settle from the
//! gateway's answer, answer with the cost and balance headers.
//!
//! Failure modes:
//! - refused before forwarding (credit, limits, the store, the gateway
//!   down for drop-in authentication): nothing is reserved or forwarded,
//!   and the access line still says what the send would have cost;
//! - the connect failed (nothing written) → the reservation is voided;
//! - the request may have been written but no usable answer came
//!   (timeout, reset, unparseable 2xx, a report missing) → the
//!   reservation stays reserved, *in doubt*, for an operator or the policy;
//! - the request is dropped before it settles (client gone, panic, a
//!   shutdown past its grace) → the [`ReservationGuard`] voids it before
//!   forwarding began and puts it in doubt after.

use crate::api::ozeki::answer::{match_reports, parse_send_answer, AnswerError};
use crate::api::ozeki::command::SendMessage;
use crate::cluster::node::Refused;
use crate::config::{Mode, UnknownAccounts};
use crate::error::ErrorCode;
use crate::ledger::{BucketPreference, LedgerError, ReservationGuard};
use crate::money::format_credits;
use crate::service::dropin::Auth;
use crate::service::forward::{forward, relay};
use crate::service::ozeki::{authenticate, ledger_error_code};
use crate::service::respond::{refuse, Refusal, Reply, Shape};
use crate::service::{App, Outcome, Request, Snapshot};
use crate::tariff::QuoteRequest;
use crate::upstream::Forwarded;

const ACTION: &str = "sendmessage";

/// A priced send: what each message costs and what that adds up to.
struct Priced {
    shares: Vec<i64>,
    /// Parts of each message (delivery reports may come per part).
    share_parts: Vec<u32>,
    parts: u64,
    cost_milli: i64,
    preference: BucketPreference,
}

/// Runs a send to its reply.
pub async fn send(app: &App, snapshot: &Snapshot, req: &Request<'_>, send: SendMessage) -> Reply {
    let shadow = snapshot.mode == Mode::Shadow;
    let refused = |refusal: Refusal| refuse(Shape::OzekiSend(&send), refusal);
    match authenticate(app, snapshot, req.client_ip, &send.credentials).await {
        Auth::Verified => {}
        Auth::Locked(limit) => return refused(Refusal::limited(limit)),
        Auth::Unavailable => return refused(Refusal::new(ErrorCode::UpstreamUnavailable)),
        Auth::Failed if app.config.auth.unknown_accounts == UnknownAccounts::Forward => {
            return forward_unknown(app, snapshot, req, &send).await;
        }
        Auth::Failed => return refused(Refusal::new(ErrorCode::AuthFailed)),
    }
    let account = send.credentials.username.clone();
    let Some(view) = app.ledger.account(&account) else {
        return refused(Refusal::new(ErrorCode::UnknownAccount));
    };
    let priced = match price(app, snapshot, &send, view.tariff_class.as_deref()) {
        Ok(p) => p,
        Err(refusal) => return refused(refusal),
    };
    let cost = priced.cost_milli;
    // From here every refusal is logged with what the send would have cost.
    let refused = |refusal: Refusal| with_cost(refused(refusal), cost);

    // SPEC 7: the account's parts rate, then the upstream cap, after
    // pricing and before reserving (a refused send reserved nothing).
    let mut permit =
        match app
            .limiter
            .check_send(&snapshot.limits, Some(&account), priced.parts, shadow)
        {
            Ok(p) => p,
            Err(limit) => return refused(Refusal::limited(limit)),
        };
    if shadow {
        count_shadow(app, &view, &priced);
        let forwarded = forward(app, req, ACTION).await;
        return with_cost(relay(req, forwarded, Outcome::Forwarded, ACTION, &[]), cost);
    }
    if let Err(code) = app.admit_change().await {
        permit.refund(&app.limiter);
        return refused(Refusal::new(code));
    }
    let reference = Some(req.request_id.as_str());
    let version = Some(snapshot.tariff.version());
    let reserved = match &app.cluster {
        None => app
            .ledger
            .reserve(
                &account,
                &priced.shares,
                priced.preference,
                reference,
                version,
            )
            .map_err(Refused::Ledger),
        // From this node's grants, taking more from the cluster on a
        // shortfall (`cluster::node`).
        // Boxed: its state would otherwise size every send's future.
        Some(node) => {
            Box::pin(node.reserve(
                &app.ledger,
                &account,
                &priced.shares,
                priced.preference,
                reference,
                version,
            ))
            .await
        }
    };
    let mut guard = match reserved {
        Ok(id) => ReservationGuard::new(app.ledger.clone(), id),
        Err(e) => {
            // Nothing goes upstream: the parts are given back.
            permit.refund(&app.limiter);
            return refused(match e {
                Refused::Ledger(LedgerError::InsufficientCredit { .. }) => Refusal::with_text(
                    ErrorCode::InsufficientCredit,
                    "Insufficient credit to send this message",
                ),
                Refused::Ledger(e) => Refusal::new(ledger_error_code(&e)),
                Refused::Unavailable => Refusal::new(ErrorCode::StoreUnavailable),
            });
        }
    };
    let reservation_id = guard.id().0;
    // SPEC 1.3 step 6: a reservation is durable before the request leaves;
    // one the store did not commit in time is voided and the send refused
    // locally, never forwarded.
    if let Err(code) = app.change_durable().await {
        if let Err(e) = guard.void() {
            tracing::warn!(request_id = %req.request_id, error = %e, "voiding an unpersisted reservation");
        }
        permit.refund(&app.limiter);
        return refused(Refusal::new(code));
    }
    // SPEC 9a: a watched send's record is durable before it leaves, and
    // its reporturl names tollgate's callback (`service::dlr`).
    let watched = match crate::service::dlr::before_forward(
        app,
        &send,
        req,
        guard.id(),
        &priced.shares,
        &priced.share_parts,
        view.tariff_class.as_deref(),
    )
    .await
    {
        Ok(w) => w,
        Err(code) => {
            if let Err(e) = guard.void() {
                tracing::warn!(request_id = %req.request_id, error = %e, "voiding an unwatched reservation");
            }
            permit.refund(&app.limiter);
            return refused(Refusal::new(code));
        }
    };
    // The parts are spent: the send goes upstream. From here a dropped
    // request (client gone, shutdown) may belong to a sent message: in
    // doubt, never void.
    drop(permit);
    guard.forwarding();
    let forwarded = match &watched {
        Some(w) if w.head.is_some() || w.body.is_some() => {
            let rewritten = Request {
                door: req.door,
                head: w.head.as_ref().unwrap_or(req.head),
                body: w.body.clone().unwrap_or_else(|| req.body.clone()),
                client_ip: req.client_ip,
                request_id: req.request_id.clone(),
                limited: None,
                params: None,
            };
            forward(app, &rewritten, ACTION).await
        }
        _ => forward(app, req, ACTION).await,
    };
    // `charge_on: delivery`: the accepted shares are held per part, not
    // posted, until their reports.
    let parts_milli: Option<Vec<Vec<i64>>> = watched.as_ref().filter(|w| w.hold).map(|_| {
        priced
            .shares
            .iter()
            .zip(&priced.share_parts)
            .map(|(share, parts)| {
                let n = (*parts).max(1);
                (1..=n)
                    .map(|p| crate::dlr::part_price(*share, n, p))
                    .collect()
            })
            .collect()
    });
    let (settled, flags) = settle_with_holds(
        guard,
        &send,
        &forwarded,
        &req.request_id,
        cost,
        parts_milli.as_deref(),
    );
    if let Some(w) = watched {
        // Boxed: only watched sends wait here, and its state is larger
        // than the rest of the send's (every send's future would carry it).
        Box::pin(crate::service::dlr::after_settle(app, w, flags)).await;
    }
    count_recipients(app, &settled);
    // What the send cost after settlement (rejected recipients are not
    // charged), and what stays held while its outcome is unknown.
    let mut extra = vec![("X-Tollgate-Cost", format_credits(settled.charged_milli))];
    if settled.held_milli > 0 {
        extra.push(("X-Tollgate-Held", format_credits(settled.held_milli)));
    }
    // A cluster node's ledger holds its grants, not the account's balance
    // (that is one round trip away: `getcredits`), so it says nothing.
    if let (None, Some(view)) = (&app.cluster, app.ledger.account(&account)) {
        extra.push((
            "X-Tollgate-Balance",
            format_credits(view.anytime.available_milli()),
        ));
    }
    let mut reply = with_cost(relay(req, forwarded, settled.outcome, ACTION, &extra), cost);
    reply.log.reservation_id = Some(reservation_id);
    reply
}

fn count_recipients(app: &App, settled: &Settled) {
    let m = &app.metrics.send_recipients;
    for (result, n) in [
        ("accepted", settled.accepted),
        ("rejected", settled.rejected),
        ("unknown", settled.unknown),
    ] {
        if n > 0 {
            m.with_label_values(&[result]).inc_by(n);
        }
    }
}

fn with_cost(mut reply: Reply, cost_milli: i64) -> Reply {
    reply.log.cost_milli = Some(cost_milli);
    reply
}

/// Prices every (recipient, message) pair with one tariff snapshot, at the
/// app's clock.
fn price(
    app: &App,
    snapshot: &Snapshot,
    send: &SendMessage,
    class: Option<&str>,
) -> Result<Priced, Refusal> {
    let now = app.clock.now_unix_ms();
    let tariff = &snapshot.tariff;
    let mut shares = Vec::with_capacity(send.messages.len());
    let mut share_parts = Vec::with_capacity(send.messages.len());
    let mut parts: u64 = 0;
    for m in &send.messages {
        let quote = tariff
            .quote(&QuoteRequest {
                recipient: &m.recipient,
                text: &m.text,
                message_type: &m.message_type,
                class,
                at_unix_ms: now,
            })
            .map_err(Refusal::invalid)?;
        parts = parts.saturating_add(u64::from(quote.parts));
        share_parts.push(quote.parts);
        shares.push(quote.total_milli);
    }
    Ok(Priced {
        cost_milli: shares.iter().sum(),
        shares,
        share_parts,
        parts,
        preference: tariff.bucket_preference(now),
    })
}

/// Shadow mode: what enforce mode would have done, counted.
fn count_shadow(app: &App, view: &crate::ledger::AccountView, priced: &Priced) {
    let payable = match priced.preference {
        BucketPreference::AnytimeOnly => view.anytime.available_milli(),
        BucketPreference::OffPeakFirst => {
            view.anytime.available_milli() + view.offpeak.available_milli()
        }
    };
    let decision = if payable >= priced.cost_milli {
        "would_charge"
    } else {
        "would_refuse"
    };
    app.metrics
        .shadow_decisions
        .with_label_values(&[decision])
        .inc();
}

/// `auth.unknown_accounts: forward`: uncharged, but it still loads the
/// gateway's links, so the upstream cap counts one part per message.
async fn forward_unknown(
    app: &App,
    snapshot: &Snapshot,
    req: &Request<'_>,
    send: &SendMessage,
) -> Reply {
    let parts = send.messages.len() as u64;
    let shadow = snapshot.mode == Mode::Shadow;
    if let Err(limit) = app
        .limiter
        .check_send(&snapshot.limits, None, parts, shadow)
    {
        return refuse(Shape::OzekiSend(send), Refusal::limited(limit));
    }
    app.metrics
        .unknown_forwarded
        .with_label_values(&[ACTION])
        .inc();
    let forwarded = forward(app, req, ACTION).await;
    relay(req, forwarded, Outcome::Forwarded, ACTION, &[])
}

/// What settling a send did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub outcome: Outcome,
    /// Posted: what the client pays.
    pub charged_milli: i64,
    /// Still reserved, in doubt: neither charged nor given back yet.
    pub held_milli: i64,
    /// Recipients the gateway accepted, rejected, or whose fate is unknown.
    pub accepted: u64,
    pub rejected: u64,
    pub unknown: u64,
}

/// Settles a forwarded send of `cost_milli` from what the gateway did
/// (SPEC 1.3 step 8).
pub fn settle(
    guard: ReservationGuard,
    send: &SendMessage,
    forwarded: &Forwarded,
    request_id: &str,
    cost_milli: i64,
) -> Settled {
    settle_with_holds(guard, send, forwarded, request_id, cost_milli, None).0
}

/// [`settle`], also returning, when the gateway's answer named every
/// share, what the answer did for delivery reports: which shares were
/// accepted and what the ledger posted on offpeak (what reports refund
/// against), or — with `hold_parts` (`charge_on: delivery`: per share its
/// parts' prices) — the delivery holds of the accepted shares, which are
/// then reserved, not posted.
pub fn settle_with_holds(
    guard: ReservationGuard,
    send: &SendMessage,
    forwarded: &Forwarded,
    request_id: &str,
    cost_milli: i64,
    hold_parts: Option<&[Vec<i64>]>,
) -> (Settled, Option<crate::dlr::Answered>) {
    let mut flags_out = None;
    let recipients = send.messages.len() as u64;
    let nothing = |outcome| Settled {
        outcome,
        charged_milli: 0,
        held_milli: 0,
        accepted: 0,
        rejected: 0,
        unknown: 0,
    };
    let voided = |outcome| Settled {
        rejected: recipients,
        ..nothing(outcome)
    };
    let in_doubt = || Settled {
        held_milli: cost_milli,
        unknown: recipients,
        ..nothing(Outcome::InDoubt)
    };
    let settled = match forwarded {
        // Nothing reached the gateway: the outcome is the gateway's being
        // unreachable (the reply says so), the reservation void.
        Forwarded::NotSent(_) => guard.void().map(|_| Settled {
            unknown: 0,
            ..nothing(Outcome::Refused(ErrorCode::UpstreamUnavailable))
        }),
        Forwarded::Unknown(_) => guard.into_in_doubt().map(|_| in_doubt()),
        Forwarded::Answered { header, body, .. } => {
            let status = header.status.as_u16();
            if (200..300).contains(&status) {
                let per_message = parse_send_answer(body)
                    .map(|reports| match_reports(&send.messages, send.batch, &reports));
                match per_message {
                    Ok(flags) if flags.iter().all(Option::is_some) => {
                        let accepted: Vec<bool> = flags.into_iter().map(Option::unwrap).collect();
                        let n_accepted = accepted.iter().filter(|a| **a).count() as u64;
                        match hold_parts.filter(|p| p.len() == accepted.len()) {
                            Some(parts) => {
                                let holds: Vec<Vec<i64>> = parts
                                    .iter()
                                    .zip(&accepted)
                                    .map(|(p, ok)| if *ok { p.clone() } else { Vec::new() })
                                    .collect();
                                let result = guard.hold_for_delivery(&holds, Some(request_id));
                                result.map(|h| {
                                    let held_milli = h.held_milli;
                                    flags_out = Some(crate::dlr::Answered::Held { holds: h.holds });
                                    Settled {
                                        held_milli,
                                        accepted: n_accepted,
                                        rejected: recipients - n_accepted,
                                        ..nothing(Outcome::Settled)
                                    }
                                })
                            }
                            None => {
                                let result = guard.settle_shares(&accepted, Some(request_id));
                                if let Ok(s) = &result {
                                    flags_out = Some(crate::dlr::Answered::Posted {
                                        accepted: accepted.clone(),
                                        posted_offpeak_milli: s.posted_offpeak_milli,
                                    });
                                }
                                result.map(|s| Settled {
                                    charged_milli: s.posted_milli,
                                    accepted: n_accepted,
                                    rejected: recipients - n_accepted,
                                    ..nothing(Outcome::Settled)
                                })
                            }
                        }
                    }
                    // An Ozeki error answer (no reports, an errorcode): the
                    // gateway refused the request as a whole and sent nothing.
                    Err(AnswerError::NoReports) if is_gateway_error(body) => {
                        guard.void().map(|_| voided(Outcome::Voided))
                    }
                    _ => guard.into_in_doubt().map(|_| in_doubt()),
                }
            } else if status >= 400 {
                // The gateway refused the request as a whole: nothing was sent.
                guard.void().map(|_| voided(Outcome::Voided))
            } else {
                guard.into_in_doubt().map(|_| in_doubt())
            }
        }
    };
    let settled = settled.unwrap_or_else(|e| {
        // Only possible if an operator or the sweep resolved it first.
        tracing::warn!(request_id, error = %e, "reservation already resolved");
        nothing(Outcome::AlreadyResolved)
    });
    (settled, flags_out)
}

/// Whether a 2xx body is Ozeki's whole-request error answer.
fn is_gateway_error(body: &[u8]) -> bool {
    let window = &body[..body.len().min(4096)];
    window.windows(11).any(|w| w == b"<errorcode>")
}
