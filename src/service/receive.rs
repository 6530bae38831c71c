//! Receive pricing (SPEC 4.2): every message a `receivemessage` answer
//! hands out costs the tariff's `receive_price`, charged after the answer
//! came (post-debit: the number of messages is only known then).
//!
//! How it is charged: one reservation of `count × price` (one share per
//! message), posted in full at once — `reserve` then `settle`, with no
//! await between them. Not an `add` of a negative amount, because a
//! reservation draws from the bucket the tariff says pays now (off-peak
//! first inside a window), records the tariff version on its entries like
//! a send, obeys the overdraft policy like a send, and is counted as
//! `posted` credit like one.
//!
//! What happens when the account cannot pay (the messages are already out
//! of the gateway's inbox, so refusing after the fact is impossible):
//! - before forwarding, a receive is refused locally (`insufficient_credit`,
//!   the messages stay in the gateway's inbox for later) when the account
//!   cannot pay for even one message: under `overdraft: strict` its payable
//!   balance is below `receive_price`; under `overdraft: ozeki` it is not
//!   above zero (Ozeki's rule);
//! - after the answer, under `strict`, a charge larger than the payable
//!   balance takes what is available (never below zero) and the rest is a
//!   *shortfall*: logged as a warning with the account and request id and
//!   counted in `tollgate_receive_shortfall_milli_total`. Under `ozeki` the
//!   whole charge is taken while the payable balance is above zero, as for
//!   a send.
//!
//! An answer tollgate cannot read (not Ozeki XML, malformed, too large) is
//! relayed unchanged and uncharged, with outcome `uncounted`: it never
//! guesses a count.

use crate::api::ozeki::command::credentials_for;
use crate::api::ozeki::inbox::{count_messages, has_conflicting_actions};
use crate::api::ozeki::params::Params;
use crate::config::{Mode, UnknownAccounts};
use crate::error::ErrorCode;
use crate::ledger::{BucketPreference, LedgerError, Overdraft};
use crate::money::format_credits;
use crate::service::dropin::Auth;
use crate::service::forward::{forward, relay};
use crate::service::ozeki::authenticate;
use crate::service::respond::{refuse, Refusal, Reply, Shape};
use crate::service::{App, Outcome, Request, Snapshot};
use crate::upstream::Forwarded;

const ACTION: &str = "receivemessage";

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
    pub outcome: Outcome,
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

/// A priced `receivemessage`: refused locally when the account cannot pay
/// for one message, else forwarded and charged per message its answer
/// hands out.
pub async fn receive(app: &App, snapshot: &Snapshot, req: &Request<'_>, params: &Params) -> Reply {
    let refused = |refusal: Refusal| refuse(Shape::Ozeki { action: ACTION }, refusal);
    if has_conflicting_actions(params) {
        return refused(Refusal::new(ErrorCode::InvalidRequest));
    }
    let credentials = match credentials_for(params, ACTION) {
        Ok(c) => c,
        Err(e) => return refused(Refusal::new(e.code)),
    };
    match authenticate(app, snapshot, req.client_ip, &credentials).await {
        Auth::Verified => {}
        Auth::Locked(limit) => return refused(Refusal::limited(limit)),
        Auth::Failed | Auth::Unavailable
            if app.config.auth.unknown_accounts == UnknownAccounts::Forward =>
        {
            app.metrics
                .unknown_forwarded
                .with_label_values(&[ACTION])
                .inc();
            let forwarded = forward(app, req, ACTION).await;
            return relay(req, forwarded, Outcome::Forwarded, ACTION, &[]);
        }
        Auth::Failed | Auth::Unavailable => return refused(Refusal::new(ErrorCode::AuthFailed)),
    }
    let Some(view) = app.ledger.account(&credentials.username) else {
        return refused(Refusal::new(ErrorCode::UnknownAccount));
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
            return refused(Refusal::new(ErrorCode::InsufficientCredit));
        }
        // Back-pressure before a change: messages must not leave the
        // gateway while their charge could not be recorded.
        if let Err(code) = app.admit_change().await {
            return refused(Refusal::new(code));
        }
    }
    let pending = PendingReceive {
        account: view.name,
        price_per_message_milli: price,
        preference,
        tariff_version: tariff.version().to_string(),
        request_id: req.request_id.clone(),
        shadow,
    };
    let forwarded = forward(app, req, ACTION).await;
    let charge = charge_receive(app, &pending, &forwarded).await;
    let mut extra = Vec::new();
    if !shadow {
        extra.push(("X-Tollgate-Cost", format_credits(charge.charged_milli)));
        if let Some(view) = app.ledger.account(&pending.account) {
            extra.push((
                "X-Tollgate-Balance",
                format_credits(view.anytime.available_milli()),
            ));
        }
    }
    let mut reply = relay(req, forwarded, charge.outcome, ACTION, &extra);
    if !shadow {
        reply.log.cost_milli = Some(charge.charged_milli);
    }
    reply
}

/// Charges the messages of a forwarded `receivemessage` answer (see the
/// module docs). Nothing is charged unless the gateway
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
        outcome: Outcome::Forwarded,
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
            charge.outcome = Outcome::Uncounted;
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
        charge.outcome = Outcome::Shadow;
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
        charge.outcome = Outcome::ReceiveShortfall;
    } else {
        metrics
            .received_messages
            .with_label_values(&["charged"])
            .inc_by(u64::from(charge.messages));
        charge.outcome = Outcome::ReceiveCharged;
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
