//! Delivery reports settle the money (SPEC 9a).
//!
//! Owns the report tokens of the sends it watches, the rule that maps a
//! report to a reservation share, the money each report moves (a `refund`
//! under `charge_on: accept`; under `charge_on: delivery` the post or void
//! of the part's delivery hold), and the relay of the report to the
//! client's own `reporturl` (through the [`outbox`](crate::outbox)). It
//! never parses a front-door request (the send hands it the parsed send
//! and the raw bytes to rewrite) and never moves credit except through
//! [`Ledger::refund`], and [`Ledger::post_whole`] / [`Ledger::void`] of
//! the delivery holds [`Ledger::hold_for_delivery`] made.
//!
//! # The life of a watched send
//! 1. **Before forwarding** ([`Dlr::prepare`], [`Dlr::register`]): a
//!    random 128-bit token; the client's `reporturl` (kept as the relay
//!    template) is replaced by `<dlr.public_url>/dlr/<token>?…` asking the
//!    gateway for every keyword the role set and the client's template
//!    name. The send's record (reservation, account, shares, template) is
//!    committed to the outbox's state table **before** the request leaves;
//!    only the token's BLAKE3 hash names it there and in memory, so a copy
//!    of the store cannot forge reports. A record that cannot be committed
//!    refuses the send (`store_unavailable`), nothing forwarded.
//! 2. **After the answer** ([`Dlr::settled`]): once the ledger's
//!    settlement is durable, the per-share split of what was posted
//!    (offpeak first, as the ledger posts) is committed; only then does a
//!    report move money.
//! 3. **Each report** ([`Dlr::report`]): matched to a share by message id,
//!    else by recipient (the first unresolved share of that number); the
//!    report row and the relay item commit in one transaction before the
//!    gateway gets its `200`; a failed, expired or rejected report of a
//!    posted share then refunds what that share (or part) posted, on the
//!    bucket that paid, and waits for the ledger's commit.
//! 4. A send whose shares all have a final report, or older than
//!    `dlr.timeout_s`, is closed: its rows deleted, its token unknown.
//!    Under `charge_on: delivery` the holds no report resolved get
//!    `dlr.on_timeout` first (`charge`: posted, `release`: voided).
//!
//! # Commits per send
//! Each outbox commit is a transaction and an fsync (shared by whatever
//! the writer batches with it), the bulk of a report round trip's CPU. So
//! the last open report of a send that refunds nothing (delivered under
//! `charge_on: accept`; under `charge_on: delivery` any final report, its
//! holds resolved first — the ledger resolves a hold once) writes no row:
//! its relay item and the send's deletes are one commit; a crash before it
//! leaves the report unanswered and the gateway retries it. Reports that
//! all came before the answer close the send at the answer, without the
//! settlement row (a crash before it: start-up rebuilds the settlement
//! from the holds the ledger still has, or brings the send back unknown
//! with nothing left to move). A refund keeps its recorded plan; only its
//! "applied" mark merges into the close. A watched send delivered at
//! once: 3 commits (record, settlement or early row, close), was 4-5.
//!
//! # `charge_on: delivery`
//! The send's answer does not post: the ledger swaps the reservation for
//! one delivery hold per part of each accepted share
//! ([`Ledger::hold_for_delivery`], state `delivery`, never expired nor
//! taken by the in-doubt policy); the settlement row lists their ids. A
//! final report plans `post` (delivered) or `void` (failed, expired,
//! rejected) for the holds of the parts it resolves, records that in its
//! row, then resolves them; the ledger resolves a hold once, so a racing
//! timeout, a retry or a restart can never move it twice. Start-up: the
//! store brings the holds back in doubt; [`Dlr::restore`] finds them by
//! their reference (`delivery:<reservation>/share:<i>/part:<p>`), puts
//! them back in state `delivery`, rebuilds a settlement row a crash lost
//! from them, and resolves the holds of recorded reports the ledger still
//! has. Holds the watcher cannot follow are put in doubt (fail closed).
//!
//! # Exactly once
//! - A share (or a part of it) resolves once: the claim is made in memory
//!   under the send's lock before anything is written; a duplicate (same
//!   message id or recipient, part and status) gets `200 duplicate` and
//!   moves nothing; a report being processed gets `503` (the gateway
//!   retries).
//! - Crash between the report row and the refund's commit: the row says
//!   "refund planned"; start-up looks the refund up in the journal
//!   (`refund` entries of that reservation and share) and makes it only if
//!   it is not there.
//! - Crash before the settlement split is committed: the send comes back
//!   `unknown`: its reports are relayed, never refunded (the ledger's
//!   in-doubt process owns that reservation) — fail closed.
//!
//! # Failure modes (each answered to the gateway)
//! - unknown, closed or malformed token: `404`; a callback larger than
//!   `dlr.callback_max_bytes`: `413`; the outbox cannot commit: `503`;
//! - a report before the send's answer: recorded and relayed at once, its
//!   money moved after the settlement;
//! - more than `dlr.max_pending_sends` sends watched: new sends are
//!   forwarded unchanged (the client's own `reporturl`, charged on accept,
//!   no refund), counted in `tollgate_dlr_refused_total{reason="full"}`.

pub mod callback;
pub mod template;

#[cfg(test)]
mod prop_tests;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;
use rand::RngCore;
use serde::{Deserialize, Serialize};

pub use crate::config::dlr::{ChargeOn, DlrConfig, FileDlr, Outcome, RequestReports};

use crate::clock::Clock;
use crate::ledger::{Ledger, LedgerError, ReservationId};
use crate::metrics::Metrics;
use crate::outbox::{Change, NewItem, Outbox, OutboxError};
use crate::store::WriteBehind;

/// The namespace of this module's rows in the outbox state table.
pub const STATE_NS: &str = "dlr";
/// The outbox kind of relayed reports.
pub const RELAY_KIND: &str = "dlr_relay";
/// Most query pairs read from one callback.
pub const CALLBACK_PAIRS_MAX: usize = 64;
/// Reports recorded per part of a send (intermediate states, a final one,
/// a few repeats with other values), plus a few, before callbacks for its
/// token are refused (`429`).
pub const REPORTS_PER_PART_MAX: u64 = 8;
pub const REPORTS_EXTRA_MAX: u64 = 16;

// ---------------------------------------------------------------------------
// Pure settlement arithmetic (property-tested)
// ---------------------------------------------------------------------------

/// What each accepted share posted, per bucket, given the ledger's rule
/// (the posted total takes `offpeak` first, shares in index order).
pub fn split_posted(
    shares_milli: &[i64],
    accepted: &[bool],
    posted_offpeak_milli: i64,
) -> Vec<(i64, i64)> {
    let mut offpeak_left = posted_offpeak_milli.max(0);
    shares_milli
        .iter()
        .zip(accepted)
        .map(|(&s, &ok)| {
            if !ok {
                return (0, 0);
            }
            let off = s.min(offpeak_left);
            offpeak_left -= off;
            (off, s - off)
        })
        .collect()
}

/// The price of part `part` (1-based) of a share of `parts` parts: equal
/// parts, the last one takes the remainder.
pub fn part_price(share_milli: i64, parts: u32, part: u32) -> i64 {
    let parts = i64::from(parts.max(1));
    let each = share_milli / parts;
    if i64::from(part) == parts {
        share_milli - each * (parts - 1)
    } else {
        each
    }
}

/// Takes `amount` from what is left to refund of a share, offpeak first;
/// never more than is left.
pub fn take_refund(left: &mut (i64, i64), amount: i64) -> (i64, i64) {
    let amount = amount.clamp(0, left.0 + left.1);
    let off = amount.min(left.0);
    let any = amount - off;
    left.0 -= off;
    left.1 -= any;
    (off, any)
}

// ---------------------------------------------------------------------------
// Durable rows
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShareRow {
    recipient: String,
    price_milli: i64,
    parts: u32,
}

/// Written before the send is forwarded.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SendRow {
    reservation: u64,
    account: String,
    policy: String,
    template: Option<String>,
    created_unix_ms: i64,
    shares: Vec<ShareRow>,
}

/// Written once the ledger's settlement is durable.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SettledRow {
    /// Per share: what it posted (offpeak, anytime); (0, 0) if rejected
    /// or held.
    posted: Vec<(i64, i64)>,
    accepted: Vec<bool>,
    /// `charge_on: delivery`: per share, its delivery holds (reservation
    /// ids), one per part; empty for a rejected share.
    #[serde(default)]
    holds: Vec<Vec<u64>>,
}

/// What a final report does to the delivery holds it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum HoldAction {
    /// Delivered: the held parts are charged.
    Post,
    /// Failed, expired or rejected: the held parts are released.
    Void,
}

/// What the gateway's answer did to a watched send's reservation (handed
/// to [`Dlr::settled`] once the ledger committed it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answered {
    /// `charge_on: accept`: the accepted shares were posted
    /// ([`Ledger::settle_shares`]).
    Posted {
        accepted: Vec<bool>,
        posted_offpeak_milli: i64,
    },
    /// `charge_on: delivery`: the accepted shares are delivery holds, per
    /// share one per part ([`Ledger::hold_for_delivery`]).
    Held { holds: Vec<Vec<ReservationId>> },
}

/// One report, written with its relay item.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReportRow {
    dedupe: String,
    share: Option<usize>,
    part: Option<u32>,
    outcome: Option<String>,
    message_id: Option<String>,
    /// The refund this report makes (offpeak, anytime), once planned.
    refund: Option<(i64, i64)>,
    /// The refund's ledger commit was seen.
    applied: bool,
    /// Arrived before the send was settled: its money is decided after.
    early: bool,
    /// The parts (1-based) this report resolved.
    #[serde(default)]
    parts: Vec<u32>,
    /// `charge_on: delivery`: what this report does to the holds of the
    /// parts it resolved, and their ids.
    #[serde(default)]
    hold: Option<HoldAction>,
    #[serde(default)]
    hold_ids: Vec<u64>,
}

// ---------------------------------------------------------------------------
// In-memory state
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Registered, waiting for the gateway's answer.
    Forwarding,
    /// The settlement split is known and durable: reports move money.
    Settled,
    /// The settlement is not known (in doubt, or lost in a crash):
    /// reports are relayed, never refunded.
    Unknown,
}

#[derive(Debug, Clone)]
struct ShareState {
    recipient: String,
    digits: Option<String>,
    price_milli: i64,
    parts: u32,
    accepted: bool,
    /// What is left to refund (offpeak, anytime).
    left: (i64, i64),
    /// Parts resolved by a final report (index 0 = part 1).
    resolved: Vec<bool>,
    /// `charge_on: delivery`: each part's delivery hold (index 0 = part 1).
    holds: Vec<Option<u64>>,
    message_id: Option<String>,
}

impl ShareState {
    fn is_final(&self) -> bool {
        self.resolved.iter().all(|r| *r)
    }
}

#[derive(Debug, Clone)]
struct SendState {
    reservation: u64,
    account: String,
    policy: ChargeOn,
    template: Option<String>,
    created_unix_ms: i64,
    phase: Phase,
    shares: Vec<ShareState>,
    /// Dedupe keys of reports committed.
    seen: HashSet<String>,
    /// Dedupe keys of reports being processed now.
    busy: HashSet<String>,
    /// Report rows written (their keys are `<hash>/r/<n>`).
    rows: u64,
    /// Early reports waiting for the settlement: (row number, row).
    early: Vec<(u64, ReportRow)>,
    /// Its rows are being deleted (the close is committing): further
    /// reports are answered as for a closed send.
    closing: bool,
    /// Early reports planned by [`early_close`], recorded with the
    /// settlement if the close does not commit.
    planned_early: Vec<(u64, ReportRow)>,
}

/// What a report callback gets back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub text: &'static str,
}

impl Answer {
    const fn new(status: u16, text: &'static str) -> Answer {
        Answer { status, text }
    }
}

/// A send about to be watched: its token, the rewritten request parts and
/// the record to commit.
pub struct Prepared {
    key: String,
    /// The new `reporturl` value (tollgate's callback URL, with the token).
    pub callback_url: String,
    row: SendRow,
}

impl Prepared {
    /// Whether this send settles by `charge_on: delivery` (its accepted
    /// shares become delivery holds on the answer, not posts).
    pub fn holds_until_delivery(&self) -> bool {
        self.row.policy == ChargeOn::Delivery.as_str()
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The callback URL carries the token: never printed.
        f.debug_struct("Prepared").finish_non_exhaustive()
    }
}

/// The watcher of the process.
pub struct Dlr {
    pub config: DlrConfig,
    outbox: Arc<Outbox>,
    ledger: Arc<Ledger>,
    store: Option<Arc<WriteBehind>>,
    /// Whether a refund must wait for the store's commit before the
    /// callback is answered (`durability: sync`).
    sync: bool,
    pub(crate) metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    /// Watched sends by token hash. Guards are never held across an await.
    sends: DashMap<String, Arc<Mutex<SendState>>>,
}

fn token_key(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

fn new_token() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digits_of(recipient: &str) -> Option<String> {
    let digits: String = recipient.chars().filter(char::is_ascii_digit).collect();
    let digits = match digits.strip_prefix("00") {
        Some(rest) if recipient.trim_start().starts_with("00") => rest.to_string(),
        _ => digits,
    };
    (!digits.is_empty()).then_some(digits)
}

fn is_token(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Dlr {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: DlrConfig,
        outbox: Arc<Outbox>,
        ledger: Arc<Ledger>,
        store: Option<Arc<WriteBehind>>,
        sync: bool,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Dlr {
        Dlr {
            config,
            outbox,
            ledger,
            store,
            sync,
            metrics,
            clock,
            sends: DashMap::new(),
        }
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Sends watched now.
    pub fn watched(&self) -> usize {
        self.sends.len()
    }

    /// Whether this send is watched, and its token and record if so
    /// (`None`: forward unchanged). `shares_milli` and `parts` are per
    /// message, in the send's order.
    pub fn prepare(
        &self,
        report_url: Option<&str>,
        recipients: &[&str],
        shares_milli: &[i64],
        parts: &[u32],
        class: Option<&str>,
        account: &str,
    ) -> Option<Prepared> {
        if !self.config.enabled {
            return None;
        }
        let template = match (report_url, self.config.request) {
            (Some(t), _) => Some(t),
            (None, RequestReports::Always) => None,
            (None, RequestReports::Client) => return None,
        };
        if template.is_some_and(|t| t.len() > template::TEMPLATE_MAX_BYTES) {
            return None;
        }
        if self.sends.len() >= self.config.max_pending_sends {
            self.metrics.dlr_refused.with_label_values(&["full"]).inc();
            return None;
        }
        let policy = self.config.charge_on(class);
        let k = &self.config.keywords;
        let mut keywords = vec![k.message_id.clone(), k.recipient.clone(), k.status.clone()];
        if let Some(p) = &k.part {
            keywords.push(p.clone());
        }
        for kw in template
            .map(template::template_keywords)
            .unwrap_or_default()
        {
            if !keywords.contains(&kw) {
                keywords.push(kw);
            }
        }
        let token = new_token();
        let callback_url = template::callback_url(&self.config.public_url, &token, &keywords);
        let row = SendRow {
            reservation: 0,
            account: account.to_string(),
            policy: policy.as_str().to_string(),
            template: template.map(str::to_string),
            created_unix_ms: self.clock.now_unix_ms(),
            shares: recipients
                .iter()
                .zip(shares_milli)
                .zip(parts)
                .map(|((r, p), n)| ShareRow {
                    recipient: r.to_string(),
                    price_milli: *p,
                    parts: (*n).max(1),
                })
                .collect(),
        };
        Some(Prepared {
            key: token_key(&token),
            callback_url,
            row,
        })
    }

    /// Commits the send's record (durable before it returns) and starts
    /// watching it.
    pub async fn register(
        &self,
        mut prepared: Prepared,
        reservation: ReservationId,
    ) -> Result<String, OutboxError> {
        prepared.row.reservation = reservation.0;
        let value = serde_json::to_vec(&prepared.row).expect("rows serialise");
        self.outbox
            .commit(vec![Change::Put(
                STATE_NS.into(),
                prepared.key.clone(),
                value,
            )])
            .await?;
        let state = state_of(&prepared.row, Phase::Forwarding);
        self.sends
            .insert(prepared.key.clone(), Arc::new(Mutex::new(state)));
        self.refresh_gauges();
        Ok(prepared.key)
    }

    /// The send's settlement is durable in the ledger: what the answer did
    /// (`None`: the outcome is unknown or the reservation was voided as a
    /// whole — reports are then relayed, never refunded).
    pub async fn settled(&self, key: &str, answered: Option<Answered>) {
        let Some(cell) = self.sends.get(key).map(|c| c.clone()) else {
            // Closed by `dlr.timeout_s` before its answer came: its holds
            // get the timeout's default at once.
            if let Some(Answered::Held { holds }) = answered {
                let ids: Vec<u64> = holds.iter().flatten().map(|h| h.0).collect();
                self.resolve_timed_out(&ids).await;
            }
            return;
        };
        let held_ids: Vec<ReservationId> = match &answered {
            Some(Answered::Held { holds }) => holds.iter().flatten().copied().collect(),
            _ => Vec::new(),
        };
        let settled = {
            let st = cell.lock();
            let prices: Vec<i64> = st.shares.iter().map(|s| s.price_milli).collect();
            match answered {
                Some(Answered::Posted {
                    accepted,
                    posted_offpeak_milli,
                }) if accepted.len() == st.shares.len() => Some(SettledRow {
                    posted: split_posted(&prices, &accepted, posted_offpeak_milli),
                    accepted,
                    holds: Vec::new(),
                }),
                Some(Answered::Held { holds }) if holds.len() == st.shares.len() => {
                    Some(SettledRow {
                        posted: vec![(0, 0); prices.len()],
                        accepted: holds.iter().map(|h| !h.is_empty()).collect(),
                        holds: holds
                            .iter()
                            .map(|h| h.iter().map(|r| r.0).collect())
                            .collect(),
                    })
                }
                _ => None,
            }
        };
        let Some(row) = settled else {
            // Holds this watcher cannot follow go to the in-doubt process.
            self.holds_in_doubt(&held_ids);
            cell.lock().phase = Phase::Unknown;
            self.process_early(key, &cell).await;
            return;
        };
        // Its reports all came before the answer and none refunds (each
        // delivered under `charge_on: accept`, or resolving delivery holds):
        // the holds are resolved and the send closes now, the settlement
        // never written. A crash before the close: the early rows are
        // durable; start-up rebuilds the settlement from the holds the
        // ledger still has and resolves them, once (without any, the send
        // comes back unknown: relayed, nothing left to move).
        let claimed = early_close(&mut cell.lock(), &row);
        if let Some(rows) = claimed {
            let planned: Vec<ReportRow> = cell
                .lock()
                .planned_early
                .iter()
                .map(|(_, r)| r.clone())
                .collect();
            let mut resolved = true;
            for r in &planned {
                resolved &= self.resolve_now(r).await;
            }
            if resolved && self.close(key, rows, Vec::new()).await {
                return;
            }
            cell.lock().closing = false;
            // Not closed: the settlement and the plans, recorded as usual.
            let mut changes = vec![Change::Put(
                STATE_NS.into(),
                format!("{key}/settled"),
                serde_json::to_vec(&row).expect("rows serialise"),
            )];
            let planned = std::mem::take(&mut cell.lock().planned_early);
            for (n, r) in planned {
                changes.push(Change::Put(
                    STATE_NS.into(),
                    format!("{key}/r/{n}"),
                    serde_json::to_vec(&r).expect("rows serialise"),
                ));
            }
            if self.outbox.commit(changes).await.is_err() {
                cell.lock().phase = Phase::Unknown;
                self.holds_in_doubt(&held_ids);
            }
            self.maybe_close(key, &cell).await;
            return;
        }
        let value = serde_json::to_vec(&row).expect("rows serialise");
        let committed = self
            .outbox
            .commit(vec![Change::Put(
                STATE_NS.into(),
                format!("{key}/settled"),
                value,
            )])
            .await;
        {
            let mut st = cell.lock();
            match committed {
                Ok(_) => apply_settled(&mut st, &row),
                Err(e) => {
                    tracing::warn!(error = %e, "delivery-report settlement not recorded; its reports will not refund");
                    st.phase = Phase::Unknown;
                }
            }
        }
        if cell.lock().phase == Phase::Unknown {
            self.holds_in_doubt(&held_ids);
        }
        self.process_early(key, &cell).await;
        self.maybe_close(key, &cell).await;
    }

    /// Decides the money of reports that came before the settlement.
    async fn process_early(&self, key: &str, cell: &Arc<Mutex<SendState>>) {
        let early: Vec<(u64, ReportRow)> = std::mem::take(&mut cell.lock().early);
        let last = early.len();
        for (i, (n, row)) in early.into_iter().enumerate() {
            self.decide_early(key, cell, n, row, i + 1 == last).await;
        }
    }

    /// One early report, once the send is settled (or known unknown):
    /// plans its money, records the plan, makes the refund.
    async fn decide_early(
        &self,
        key: &str,
        cell: &Arc<Mutex<SendState>>,
        n: u64,
        mut row: ReportRow,
        may_close: bool,
    ) -> bool {
        let closes = {
            let mut st = cell.lock();
            if st.phase == Phase::Settled {
                plan_money(&mut st, &mut row);
            } else {
                claim_only(&mut st, &mut row);
            }
            // The send's last open report, moving no money or only
            // delivery holds: its early row and the settlement row are
            // durable, from which start-up plans it again after a crash
            // (the ledger resolves a hold once), so the plan is not
            // recorded: the holds are resolved and the send closed.
            if may_close && row.refund.is_none() {
                claim_close(&mut st, Some(&row.dedupe))
            } else {
                None
            }
        };
        if let Some(rows) = closes {
            if self.resolve_now(&row).await && self.close(key, rows, Vec::new()).await {
                return true;
            }
            cell.lock().closing = false;
        }
        row.early = false;
        let value = serde_json::to_vec(&row).expect("rows serialise");
        let recorded = self
            .outbox
            .commit(vec![Change::Put(
                STATE_NS.into(),
                format!("{key}/r/{n}"),
                value,
            )])
            .await
            .is_ok();
        if !recorded {
            // The row still says early: start-up decides it again.
            return false;
        }
        self.apply_refund(key, cell, n, row, may_close).await
    }

    /// The delivery holds a planned row names, resolved (and, under
    /// `durability: sync`, committed by the store); `true` when it names
    /// none. `false`: the ledger refused one or the store did not commit.
    async fn resolve_now(&self, row: &ReportRow) -> bool {
        let Some(action) = row.hold else {
            return true;
        };
        if !self.resolve_holds(&row.hold_ids, action, "report") {
            return false;
        }
        if self.sync {
            if let Some(w) = &self.store {
                return w.wait_durable().await.is_ok();
            }
        }
        true
    }

    /// One callback (`token` from the path, `query` raw).
    pub async fn report(&self, token: &str, query: &str) -> Answer {
        let refuse = |reason: &str, a: Answer| {
            self.metrics.dlr_refused.with_label_values(&[reason]).inc();
            a
        };
        if !is_token(token) {
            return refuse("unknown_token", Answer::new(404, "unknown token\n"));
        }
        let key = token_key(token);
        let Some(cell) = self.sends.get(&key).map(|c| c.clone()) else {
            return refuse("unknown_token", Answer::new(404, "unknown token\n"));
        };
        let Some(pairs) = template::raw_pairs(query, CALLBACK_PAIRS_MAX) else {
            return refuse("malformed", Answer::new(400, "too many parameters\n"));
        };
        let k = &self.config.keywords;
        let read = |kw: &str| -> Option<String> {
            let name = template::query_name(kw);
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| template::decode_value(v))
                .filter(|v| !v.trim().is_empty() && v.trim() != kw)
        };
        let message_id = read(&k.message_id);
        let recipient = read(&k.recipient);
        let status = read(&k.status).unwrap_or_default();
        let outcome = self.config.outcome(&status);
        let outcome_label = outcome.map_or("other", Outcome::as_str);
        // A part number the send does not have is the gateway's error,
        // not "every part": it moves nothing (see the range check below).
        let part = match k.part.as_deref().and_then(read) {
            None => None,
            Some(p) => match p.trim().parse::<u32>() {
                Ok(p) => Some(p),
                Err(_) => {
                    self.count(outcome_label, "refused");
                    return refuse("malformed", Answer::new(400, "part is not a number\n"));
                }
            },
        };
        let who = message_id
            .clone()
            .map(|m| format!("id:{m}"))
            .or_else(|| recipient.as_ref().map(|r| format!("to:{r}")))
            .unwrap_or_default();
        let dedupe = format!(
            "{who}|{}|{}",
            part.map_or(String::new(), |p| p.to_string()),
            status.trim().to_ascii_lowercase()
        );
        // Under the send's lock: dedupe, claim, plan. No await inside.
        let (n, mut row, template, early, closes) = {
            let mut st = cell.lock();
            if st.seen.contains(&dedupe) {
                drop(st);
                self.count(outcome_label, "duplicate");
                return Answer::new(200, "duplicate\n");
            }
            if st.closing {
                // Its last report is closing it: answered as closed.
                drop(st);
                return refuse("unknown_token", Answer::new(404, "unknown token\n"));
            }
            // Memory and rows per send stay bounded: a flood of distinct
            // reports for one token is refused past a few per part.
            let parts: u64 = st.shares.iter().map(|s| u64::from(s.parts)).sum();
            if st.rows >= REPORTS_PER_PART_MAX * parts + REPORTS_EXTRA_MAX {
                drop(st);
                self.count(outcome_label, "refused");
                return refuse(
                    "flood",
                    Answer::new(429, "too many reports for this send\n"),
                );
            }
            let share = match_share(&st, message_id.as_deref(), recipient.as_deref());
            if let (Some(p), Some(i)) = (part, share) {
                if p == 0 || p > st.shares[i].parts {
                    drop(st);
                    self.count(outcome_label, "refused");
                    return refuse(
                        "malformed",
                        Answer::new(400, "part out of range for this message\n"),
                    );
                }
            }
            if !st.busy.insert(dedupe.clone()) {
                return Answer::new(503, "report being processed; retry\n");
            }
            let mut row = ReportRow {
                dedupe: dedupe.clone(),
                share,
                part,
                outcome: outcome.map(|o| o.as_str().to_string()),
                message_id: message_id.clone(),
                refund: None,
                applied: false,
                early: st.phase == Phase::Forwarding,
                parts: Vec::new(),
                hold: None,
                hold_ids: Vec::new(),
            };
            if let (Some(i), Some(m)) = (share, &message_id) {
                st.shares[i].message_id.get_or_insert_with(|| m.clone());
            }
            if st.phase == Phase::Settled {
                plan_money(&mut st, &mut row);
            } else if st.phase == Phase::Unknown {
                claim_only(&mut st, &mut row);
            }
            let n = st.rows;
            st.rows += 1;
            // The send's last open report, moving no money (or only its
            // delivery holds, which the ledger resolves once): the send
            // closes in the transaction that enqueues the relay, with no
            // report row. A crash before it commits leaves the report
            // unanswered (the gateway retries it).
            let closes = if row.refund.is_none() && st.phase != Phase::Forwarding {
                claim_close(&mut st, Some(&dedupe)).map(|_| n)
            } else {
                None
            };
            (
                n,
                row,
                st.template.clone(),
                st.phase == Phase::Forwarding,
                closes,
            )
        };
        // A closing report's holds are resolved before the close commits.
        let closes = match closes {
            Some(rows) if self.resolve_now(&row).await => {
                row.applied = true;
                Some(rows)
            }
            Some(_) => {
                cell.lock().closing = false;
                None
            }
            None => None,
        };
        let mut changes = Vec::with_capacity(2);
        if closes.is_none() {
            changes.push(Change::Put(
                STATE_NS.into(),
                format!("{key}/r/{n}"),
                serde_json::to_vec(&row).expect("rows serialise"),
            ));
        }
        if let Some(t) = &template {
            let values: Vec<(String, String)> = pairs
                .iter()
                .map(|(name, v)| (format!("${name}"), v.to_string()))
                .collect();
            changes.push(Change::Enqueue(NewItem {
                kind: RELAY_KIND,
                target: template::substitute(t, &values),
                method: "GET".into(),
                headers: vec![],
                body: vec![],
                dedupe_key: format!("dlr:{}:{dedupe}", &key[..32]),
            }));
        }
        let committed = match closes {
            Some(rows) => {
                if self.close(&key, rows, changes).await {
                    Ok(())
                } else {
                    Err(OutboxError::Unavailable("the close did not commit".into()))
                }
            }
            None => self.outbox.commit(changes).await.map(|_| ()),
        };
        if let Err(e) = committed {
            let mut st = cell.lock();
            st.busy.remove(&dedupe);
            unclaim(&mut st, &row);
            drop(st);
            tracing::warn!(error = %e, "delivery report not recorded; the gateway will retry");
            self.count(outcome_label, "refused");
            return refuse(
                "store_unavailable",
                Answer::new(503, "report not recorded; retry\n"),
            );
        }
        // An early report waits for the settlement, unless it came
        // meanwhile (then its money is decided now).
        let mut decided_now = false;
        if early {
            let mut st = cell.lock();
            if st.phase == Phase::Forwarding {
                st.early.push((n, row.clone()));
            } else {
                decided_now = true;
            }
        }
        if row.share.is_none() {
            self.count(outcome_label, "refused");
            self.metrics
                .dlr_refused
                .with_label_values(&["no_share"])
                .inc();
        } else {
            self.count(outcome_label, "applied");
        }
        if closes.is_some() {
            // Closed: nothing is left to decide for this send.
            return Answer::new(200, "OK\n");
        }
        let refund_ok = if decided_now {
            self.decide_early(&key, &cell, n, row, true).await
        } else if row.refund.is_some() || row.hold.is_some() {
            self.apply_refund(&key, &cell, n, row, true).await
        } else {
            true
        };
        {
            let mut st = cell.lock();
            st.busy.remove(&dedupe);
            if refund_ok {
                st.seen.insert(dedupe);
            }
        }
        if !refund_ok {
            return Answer::new(503, "refund not committed; retry\n");
        }
        self.maybe_close(&key, &cell).await;
        Answer::new(200, "OK\n")
    }

    /// Resolves the delivery holds a report names (`action`), each once
    /// (a hold already resolved — by a racing timeout, or before a crash —
    /// is skipped), waits for the store under `durability: sync`, then
    /// marks the row applied. `false`: the ledger refused or the store did
    /// not commit in time (the row stays planned: start-up finishes it).
    async fn apply_holds(
        &self,
        key: &str,
        cell: &Arc<Mutex<SendState>>,
        n: u64,
        mut row: ReportRow,
        action: HoldAction,
        may_close: bool,
    ) -> bool {
        if !self.resolve_holds(&row.hold_ids, action, "report") {
            return false;
        }
        if !self.durable_if_sync().await {
            return false;
        }
        row.applied = true;
        self.record_or_close(key, cell, n, &row, may_close).await;
        true
    }

    /// Under `durability: sync`, waits until the ledger's changes so far
    /// are committed; `false` if they were not in time.
    async fn durable_if_sync(&self) -> bool {
        match (&self.store, self.sync) {
            (Some(w), true) => w.wait_durable().await.is_ok(),
            _ => true,
        }
    }

    /// Posts or voids each hold once; `false` if the ledger refused one
    /// for another reason than "already resolved".
    fn resolve_holds(&self, ids: &[u64], action: HoldAction, cause: &str) -> bool {
        let mut ok = true;
        for id in ids {
            let id = ReservationId(*id);
            let (result, label) = match action {
                HoldAction::Post => (self.ledger.post_whole(id, None), "charged"),
                HoldAction::Void => (self.ledger.void(id), "released"),
            };
            match result {
                Ok(_) => self
                    .metrics
                    .dlr_holds_resolved
                    .with_label_values(&[label, cause])
                    .inc(),
                Err(LedgerError::UnknownReservation(_)) => {}
                Err(e) => {
                    tracing::error!(error = %e, reservation = id.0, "delivery hold not resolved");
                    ok = false;
                }
            }
        }
        ok
    }

    /// `dlr.timeout_s` passed without a report: `dlr.on_timeout` applies to
    /// each hold; waits for the store under `durability: sync`.
    async fn resolve_timed_out(&self, ids: &[u64]) {
        if ids.is_empty() {
            return;
        }
        let action = match self.config.on_timeout {
            crate::config::dlr::OnTimeout::Charge => HoldAction::Post,
            crate::config::dlr::OnTimeout::Release => HoldAction::Void,
        };
        self.resolve_holds(ids, action, "timeout");
        if self.sync {
            if let Some(w) = &self.store {
                let _ = w.wait_durable().await;
            }
        }
    }

    /// Holds whose send this watcher cannot follow (its settlement could
    /// not be recorded): kept reserved, in doubt, for an operator or the
    /// in-doubt policy — fail closed.
    pub fn holds_in_doubt(&self, ids: &[ReservationId]) {
        for id in ids {
            let _ = self.ledger.mark_in_doubt(*id);
        }
    }

    fn count(&self, outcome: &str, result: &str) {
        self.metrics
            .dlr_reports
            .with_label_values(&[outcome, result])
            .inc();
    }

    /// Makes a planned refund and waits for its commit; then marks the row
    /// applied. `false` when the ledger refused or the store did not commit
    /// in time (the row stays planned: start-up or a retry finishes it).
    async fn apply_refund(
        &self,
        key: &str,
        cell: &Arc<Mutex<SendState>>,
        n: u64,
        mut row: ReportRow,
        may_close: bool,
    ) -> bool {
        if let Some(action) = row.hold {
            return self.apply_holds(key, cell, n, row, action, may_close).await;
        }
        let (Some((off, any)), Some(share)) = (row.refund, row.share) else {
            return true;
        };
        let (account, reservation, parts) = {
            let st = cell.lock();
            (st.account.clone(), st.reservation, refund_parts(&st, &row))
        };
        if let Err(e) = self.ledger.refund(
            &account,
            ReservationId(reservation),
            share,
            parts.as_deref(),
            off,
            any,
        ) {
            tracing::error!(error = %e, reservation, "refund refused by the ledger");
            return false;
        }
        self.metrics.dlr_refunds.inc();
        self.metrics
            .dlr_refunded_milli
            .inc_by((off + any).max(0) as u64);
        if !self.durable_if_sync().await {
            // Queued, and committed once the store recovers; the row
            // stays planned so a restart looks it up.
            return false;
        }
        row.applied = true;
        self.record_or_close(key, cell, n, &row, may_close).await;
        true
    }

    /// Closes a send whose every share has a final report.
    async fn maybe_close(&self, key: &str, cell: &Arc<Mutex<SendState>>) {
        let Some(rows) = claim_close(&mut cell.lock(), None) else {
            return;
        };
        self.close(key, rows, Vec::new()).await;
    }

    /// Deletes a send's rows (`rows` report rows), with `extra` changes in
    /// the same transaction, and forgets it; the caller claimed the close
    /// ([`claim_close`]). `false`: not committed, the send stays watched.
    async fn close(&self, key: &str, rows: u64, extra: Vec<Change>) -> bool {
        let mut changes = extra;
        changes.reserve(rows as usize + 2);
        changes.push(Change::Delete(STATE_NS.into(), key.to_string()));
        changes.push(Change::Delete(STATE_NS.into(), format!("{key}/settled")));
        for n in 0..rows {
            changes.push(Change::Delete(STATE_NS.into(), format!("{key}/r/{n}")));
        }
        if self.outbox.commit(changes).await.is_ok() {
            self.sends.remove(key);
            self.refresh_gauges();
            true
        } else {
            if let Some(cell) = self.sends.get(key) {
                cell.lock().closing = false;
            }
            false
        }
    }

    /// A report's money is made (`row.applied`): records that, or — when
    /// `may_close` and this was the send's last open report — closes the
    /// send instead, in one transaction (the deletes supersede the mark; a
    /// crash before it leaves the row planned, which start-up finishes
    /// once, as it would with the mark lost).
    async fn record_or_close(
        &self,
        key: &str,
        cell: &Arc<Mutex<SendState>>,
        n: u64,
        row: &ReportRow,
        may_close: bool,
    ) {
        let rows = if may_close {
            claim_close(&mut cell.lock(), Some(&row.dedupe))
        } else {
            None
        };
        if let Some(rows) = rows {
            if self.close(key, rows, Vec::new()).await {
                return;
            }
        }
        let _ = self
            .outbox
            .commit(vec![Change::Put(
                STATE_NS.into(),
                format!("{key}/r/{n}"),
                serde_json::to_vec(row).expect("rows serialise"),
            )])
            .await;
    }

    /// Closes sends older than `dlr.timeout_s` (the sweeper, every second).
    pub async fn sweep(&self) {
        let now = self.clock.now_unix_ms();
        let timeout_ms = self.config.timeout.as_millis() as i64;
        let old: Vec<(String, u64, String, u64, Vec<u64>)> = self
            .sends
            .iter()
            .filter_map(|e| {
                let mut st = e.value().lock();
                let due =
                    now - st.created_unix_ms >= timeout_ms && st.busy.is_empty() && !st.closing;
                // A delivery send still waiting for its answer is left to
                // `settled` (its holds do not exist yet).
                if !due || (st.policy == ChargeOn::Delivery && st.phase == Phase::Forwarding) {
                    return None;
                }
                let open = st
                    .shares
                    .iter()
                    .filter(|s| s.accepted && !s.is_final())
                    .count() as u64;
                // The holds of the parts no report resolved, claimed here
                // so a late report moves nothing.
                let mut holds = Vec::new();
                if st.phase == Phase::Settled && st.policy == ChargeOn::Delivery {
                    for s in st.shares.iter_mut().filter(|s| s.accepted) {
                        for (p, done) in s.resolved.iter_mut().enumerate() {
                            if !*done {
                                *done = true;
                                holds.extend(s.holds.get(p).copied().flatten());
                            }
                        }
                    }
                }
                st.closing = true;
                Some((
                    e.key().clone(),
                    st.rows,
                    st.policy.as_str().to_string(),
                    open,
                    holds,
                ))
            })
            .collect();
        for (key, rows, policy, open, holds) in old {
            if open > 0 {
                self.metrics
                    .dlr_timeouts
                    .with_label_values(&[&policy])
                    .inc_by(open);
            }
            self.resolve_timed_out(&holds).await;
            self.close(&key, rows, Vec::new()).await;
        }
        self.refresh_gauges();
    }

    fn refresh_gauges(&self) {
        let mut pending: HashMap<&'static str, i64> = HashMap::new();
        for e in self.sends.iter() {
            let st = e.value().lock();
            let open = st
                .shares
                .iter()
                .filter(|s| (st.phase == Phase::Forwarding || s.accepted) && !s.is_final())
                .count() as i64;
            *pending.entry(st.policy.as_str()).or_default() += open;
        }
        for policy in crate::metrics::DLR_POLICIES {
            self.metrics
                .dlr_pending_shares
                .with_label_values(&[policy])
                .set(pending.get(policy).copied().unwrap_or(0));
        }
    }

    /// Start-up: the watched sends from the state table. `refunds_in_journal`
    /// is asked (only if a refund may have been lost in a crash) for the
    /// `(reservation, share)` pairs the journal refunds from reservation
    /// `min` on.
    pub fn restore(
        &self,
        refunds_in_journal: &mut dyn FnMut(u64) -> Result<HashSet<(u64, String)>, String>,
    ) -> Result<RestoreReport, String> {
        let rows = self
            .outbox
            .state_rows_blocking(STATE_NS)
            .map_err(|e| e.to_string())?;
        let mut sends: HashMap<String, StoredSend> = HashMap::new();
        for (k, v) in rows {
            let (key, rest) = k.split_once('/').unwrap_or((k.as_str(), ""));
            let entry = sends.entry(key.to_string()).or_default();
            if rest.is_empty() {
                entry.0 = serde_json::from_slice(&v).ok();
            } else if rest == "settled" {
                entry.1 = serde_json::from_slice(&v).ok();
            } else if let Some(n) = rest.strip_prefix("r/").and_then(|n| n.parse().ok()) {
                if let Ok(r) = serde_json::from_slice(&v) {
                    entry.2.push((n, r));
                }
            }
        }
        let mut report = RestoreReport::default();
        // Refunds planned but not seen committed: the journal decides.
        let unsure: Vec<u64> = sends
            .values()
            .filter_map(|(send, _, reports)| {
                let send = send.as_ref()?;
                reports
                    .iter()
                    .any(|(_, r)| {
                        (r.refund.is_some() && !r.applied) || (r.early && r.outcome.is_some())
                    })
                    .then_some(send.reservation)
            })
            .collect();
        let in_journal = match unsure.iter().min() {
            Some(min) => refunds_in_journal(*min)?,
            None => HashSet::new(),
        };
        let mut to_refund: Vec<(String, u64, ReportRow)> = Vec::new();
        let mut to_hold: Vec<(String, u64, ReportRow)> = Vec::new();
        // The delivery holds the ledger still has (restored in doubt, like
        // every open reservation), by (reservation, share, part).
        let mut live_holds: HashMap<u64, Vec<(usize, u32, u64)>> = HashMap::new();
        for r in self.ledger.reservations(None) {
            if let Some((rid, share, part)) = r
                .reference
                .as_deref()
                .and_then(crate::ledger::parse_hold_reference)
            {
                live_holds
                    .entry(rid)
                    .or_default()
                    .push((share, part, r.id.0));
            }
        }
        for (key, (send, mut settled, mut reports)) in sends {
            let Some(send) = send else { continue };
            reports.sort_by_key(|(n, _)| *n);
            let holds = live_holds.remove(&send.reservation).unwrap_or_default();
            if settled.is_none() && send.policy == ChargeOn::Delivery.as_str() && !holds.is_empty()
            {
                // A crash came between the holds' commit and the
                // settlement row: the holds say what the answer was.
                let mut by_share: Vec<Vec<u64>> = vec![Vec::new(); send.shares.len()];
                for (share, part, id) in &holds {
                    if let Some(v) = by_share.get_mut(*share) {
                        let slot = (*part as usize).saturating_sub(1);
                        if v.len() <= slot {
                            v.resize(slot + 1, 0);
                        }
                        v[slot] = *id;
                    }
                }
                let row = SettledRow {
                    posted: vec![(0, 0); send.shares.len()],
                    accepted: by_share.iter().map(|h| !h.is_empty()).collect(),
                    holds: by_share,
                };
                let _ = self.outbox.commit_blocking(vec![Change::Put(
                    STATE_NS.into(),
                    format!("{key}/settled"),
                    serde_json::to_vec(&row).expect("rows serialise"),
                )]);
                settled = Some(row);
            }
            for (_, _, id) in &holds {
                if self.ledger.await_delivery(ReservationId(*id)).is_ok() {
                    report.holds += 1;
                }
            }
            let phase = if settled.is_some() {
                Phase::Settled
            } else {
                Phase::Unknown
            };
            let mut st = state_of(&send, phase);
            if let Some(s) = &settled {
                apply_settled(&mut st, s);
            }
            st.rows = reports.last().map_or(0, |(n, _)| n + 1);
            for (n, mut r) in reports {
                if let (Some(i), Some(m)) = (r.share, &r.message_id) {
                    if let Some(s) = st.shares.get_mut(i) {
                        s.message_id.get_or_insert_with(|| m.clone());
                    }
                }
                if r.early && st.phase == Phase::Settled {
                    plan_money(&mut st, &mut r);
                    r.early = false;
                    if r.hold.is_some() {
                        to_hold.push((key.clone(), n, r.clone()));
                    }
                    if let (Some(_), Some(share)) = (r.refund, r.share) {
                        // A refund decided by an earlier start-up whose
                        // row update was lost is in the journal already.
                        let reference = crate::ledger::refund_reference(
                            share,
                            refund_parts(&st, &r).as_deref(),
                        );
                        if in_journal.contains(&(send.reservation, reference)) {
                            report.refunds_found += 1;
                        } else {
                            to_refund.push((key.clone(), n, r.clone()));
                        }
                    }
                } else {
                    mark_recorded(&mut st, &r);
                    if r.hold.is_some() {
                        // Whether or not it says applied (under `durability:
                        // async` the ledger may have lost it): the holds
                        // still in the ledger are resolved now, once.
                        to_hold.push((key.clone(), n, r.clone()));
                    }
                    if let (Some(_), Some(share)) = (r.refund, r.share) {
                        let reference = crate::ledger::refund_reference(
                            share,
                            refund_parts(&st, &r).as_deref(),
                        );
                        if !r.applied {
                            if in_journal.contains(&(send.reservation, reference)) {
                                report.refunds_found += 1;
                            } else {
                                to_refund.push((key.clone(), n, r.clone()));
                            }
                        }
                    }
                }
                st.seen.insert(r.dedupe.clone());
            }
            report.sends += 1;
            self.sends.insert(key, Arc::new(Mutex::new(st)));
        }
        // Reports whose holds the ledger still has: resolved now.
        for (key, n, mut row) in to_hold {
            let Some(action) = row.hold else { continue };
            let live: Vec<u64> = row
                .hold_ids
                .iter()
                .copied()
                .filter(|id| self.ledger.reservation(ReservationId(*id)).is_some())
                .collect();
            if live.is_empty() && row.applied {
                continue;
            }
            if self.resolve_holds(&live, action, "report") {
                report.holds_resolved += live.len();
                row.applied = true;
                let _ = self.outbox.commit_blocking(vec![Change::Put(
                    STATE_NS.into(),
                    format!("{key}/r/{n}"),
                    serde_json::to_vec(&row).expect("rows serialise"),
                )]);
            }
        }
        // Refunds the crash lost: made now (the writer is running; the
        // commit follows like any other).
        for (key, n, mut row) in to_refund {
            let Some(cell) = self.sends.get(&key).map(|c| c.clone()) else {
                continue;
            };
            let (account, reservation, parts) = {
                let st = cell.lock();
                (st.account.clone(), st.reservation, refund_parts(&st, &row))
            };
            let (Some((off, any)), Some(share)) = (row.refund, row.share) else {
                continue;
            };
            match self.ledger.refund(
                &account,
                ReservationId(reservation),
                share,
                parts.as_deref(),
                off,
                any,
            ) {
                Ok(_) => {
                    report.refunds_made += 1;
                    row.applied = true;
                    let _ = self.outbox.commit_blocking(vec![Change::Put(
                        STATE_NS.into(),
                        format!("{key}/r/{n}"),
                        serde_json::to_vec(&row).expect("rows serialise"),
                    )]);
                }
                Err(e) => tracing::error!(error = %e, reservation, "restoring a refund failed"),
            }
        }
        self.refresh_gauges();
        Ok(report)
    }
}

/// One send's rows as stored: record, settlement, reports.
type StoredSend = (Option<SendRow>, Option<SettledRow>, Vec<(u64, ReportRow)>);

/// What [`Dlr::restore`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RestoreReport {
    pub sends: usize,
    /// Refunds a crash interrupted that the journal already had.
    pub refunds_found: usize,
    /// Refunds a crash interrupted before their entry: made at start-up.
    pub refunds_made: usize,
    /// `charge_on: delivery` holds still waiting for their report.
    pub holds: usize,
    /// Holds a recorded report had not resolved yet: resolved at start-up.
    pub holds_resolved: usize,
}

fn state_of(row: &SendRow, phase: Phase) -> SendState {
    SendState {
        reservation: row.reservation,
        account: row.account.clone(),
        policy: if row.policy == "delivery" {
            ChargeOn::Delivery
        } else {
            ChargeOn::Accept
        },
        template: row.template.clone(),
        created_unix_ms: row.created_unix_ms,
        phase,
        shares: row
            .shares
            .iter()
            .map(|s| ShareState {
                recipient: s.recipient.clone(),
                digits: digits_of(&s.recipient),
                price_milli: s.price_milli,
                parts: s.parts.max(1),
                accepted: true,
                left: (0, 0),
                resolved: vec![false; s.parts.max(1) as usize],
                holds: Vec::new(),
                message_id: None,
            })
            .collect(),
        seen: HashSet::new(),
        busy: HashSet::new(),
        rows: 0,
        early: Vec::new(),
        closing: false,
        planned_early: Vec::new(),
    }
}

/// The settlement `row` applied to a send whose open reports all came
/// early: when none of them refunds and they leave every share final, the
/// send is claimed for closing (its state settled, the early reports
/// planned into `planned_early`) and its row count returned; otherwise
/// nothing changes.
fn early_close(st: &mut SendState, row: &SettledRow) -> Option<u64> {
    if st.early.is_empty() || !st.busy.is_empty() {
        return None;
    }
    let mut trial = st.clone();
    apply_settled(&mut trial, row);
    let mut early = std::mem::take(&mut trial.early);
    for (_, r) in early.iter_mut() {
        plan_money(&mut trial, r);
        r.early = false;
        if r.refund.is_some() {
            return None;
        }
    }
    let rows = claim_close(&mut trial, None)?;
    trial.planned_early = early;
    *st = trial;
    Some(rows)
}

/// Claims the close of a send that nothing keeps open any more: past its
/// answer, every accepted share final, no early report waiting, no report
/// in flight but `own` (the one asking). Returns its report row count.
fn claim_close(st: &mut SendState, own: Option<&str>) -> Option<u64> {
    let done = !st.closing
        && st.phase != Phase::Forwarding
        && st.busy.iter().all(|d| Some(d.as_str()) == own)
        && st.early.is_empty()
        && st.shares.iter().all(|s| !s.accepted || s.is_final());
    if !done {
        return None;
    }
    st.closing = true;
    Some(st.rows)
}

fn apply_settled(st: &mut SendState, row: &SettledRow) {
    for ((s, posted), ok) in st.shares.iter_mut().zip(&row.posted).zip(&row.accepted) {
        s.accepted = *ok;
        s.left = *posted;
    }
    for (s, holds) in st.shares.iter_mut().zip(&row.holds) {
        s.holds = (0..s.parts as usize)
            .map(|p| holds.get(p).copied())
            .collect();
    }
    st.phase = Phase::Settled;
}

/// The share a report names: by message id first, else the first share
/// of that recipient without a final report (exact text, then digits).
fn match_share(st: &SendState, message_id: Option<&str>, recipient: Option<&str>) -> Option<usize> {
    if let Some(m) = message_id {
        if let Some(i) = st
            .shares
            .iter()
            .position(|s| s.message_id.as_deref() == Some(m))
        {
            return Some(i);
        }
    }
    let r = recipient?;
    let digits = digits_of(r);
    let candidates = |exact: bool| {
        st.shares.iter().position(|s| {
            let same = if exact {
                s.recipient == r
            } else {
                digits.is_some() && s.digits == digits
            };
            // A share already named by another message id is not this one.
            let free = match (message_id, &s.message_id) {
                (Some(m), Some(known)) => known == m,
                _ => true,
            };
            same && free && !s.is_final()
        })
    };
    candidates(true).or_else(|| candidates(false))
}

/// The parts a report resolves: one part, or all unresolved ones (no part
/// number; `report` refuses one out of range, so only a row recorded
/// before that check can name one here).
fn parts_of(share: &ShareState, part: Option<u32>) -> Vec<u32> {
    match part {
        Some(p) if p >= 1 && p <= share.parts => {
            if share.resolved[(p - 1) as usize] {
                vec![]
            } else {
                vec![p]
            }
        }
        _ => (1..=share.parts)
            .filter(|p| !share.resolved[(*p - 1) as usize])
            .collect(),
    }
}

/// Marks what a final report resolves, moving no money (phase unknown,
/// or a restored row whose money is already accounted for).
fn claim_only(st: &mut SendState, row: &mut ReportRow) {
    let (Some(i), Some(_)) = (row.share, row.outcome.as_deref()) else {
        return;
    };
    let Some(share) = st.shares.get_mut(i) else {
        return;
    };
    row.parts = parts_of(share, row.part);
    for p in &row.parts {
        share.resolved[(*p - 1) as usize] = true;
    }
}

/// A restored row: marks the parts it resolved (as recorded).
fn mark_recorded(st: &mut SendState, row: &ReportRow) {
    let Some(share) = row.share.and_then(|i| st.shares.get_mut(i)) else {
        return;
    };
    for p in &row.parts {
        if let Some(r) = share.resolved.get_mut((*p as usize).wrapping_sub(1)) {
            *r = true;
        }
    }
    if let Some((off, any)) = row.refund {
        share.left.0 -= off;
        share.left.1 -= any;
    }
}

/// Settled phase: resolves what the report names and plans its refund
/// (`charge_on: accept`, a failed/expired/rejected outcome, a posted
/// share); returns the planned refund.
fn plan_money(st: &mut SendState, row: &mut ReportRow) -> Option<(i64, i64)> {
    let i = row.share?;
    let outcome = row.outcome.as_deref().and_then(Outcome::parse)?;
    let policy = st.policy;
    let share = st.shares.get_mut(i)?;
    if !share.accepted {
        return None;
    }
    let parts = parts_of(share, row.part);
    let mut amount = 0i64;
    for p in &parts {
        share.resolved[(*p - 1) as usize] = true;
        amount += part_price(share.price_milli, share.parts, *p);
    }
    row.parts = parts.clone();
    if parts.is_empty() {
        return None;
    }
    if policy == ChargeOn::Delivery {
        // The held parts are charged (delivered) or released; the ledger
        // resolves each hold once.
        row.hold_ids = parts
            .iter()
            .filter_map(|p| share.holds.get((*p - 1) as usize).copied().flatten())
            .collect();
        if !row.hold_ids.is_empty() {
            row.hold = Some(if outcome == Outcome::Delivered {
                HoldAction::Post
            } else {
                HoldAction::Void
            });
        }
        return None;
    }
    if outcome == Outcome::Delivered || policy != ChargeOn::Accept {
        return None;
    }
    let refund = take_refund(&mut share.left, amount);
    if refund == (0, 0) {
        return None;
    }
    row.refund = Some(refund);
    row.refund
}

/// The parts a refund names in its reference: `None` when the report
/// resolved the whole message at once.
fn refund_parts(st: &SendState, row: &ReportRow) -> Option<Vec<u32>> {
    let share = row.share.and_then(|i| st.shares.get(i))?;
    if row.parts.len() as u32 == share.parts {
        None
    } else {
        Some(row.parts.clone())
    }
}

/// Undoes the claim of a report whose row could not be committed.
fn unclaim(st: &mut SendState, row: &ReportRow) {
    let Some(i) = row.share else { return };
    let Some(share) = st.shares.get_mut(i) else {
        return;
    };
    for p in &row.parts {
        if let Some(r) = share.resolved.get_mut((*p as usize).wrapping_sub(1)) {
            *r = false;
        }
    }
    if let Some((off, any)) = row.refund {
        share.left.0 += off;
        share.left.1 += any;
    }
}
