//! Reservations: credit held for a send between pre-debit and settlement
//! (SPEC 3.3), and the guard that voids a forgotten one.
//!
//! Owns the reservation record and its public view. It must never move a
//! balance itself: every resolution goes through the [`Ledger`], which
//! removes the record from its map under the account lock, so a reservation
//! resolves at most once however many paths (settle, guard drop, TTL sweep,
//! in-doubt policy, operator) race for it.

use std::fmt;
use std::sync::Arc;

use super::engine::Holder;
use super::{Ledger, LedgerError};

/// Identifies a reservation: the seq of its first `reserve` entry, so it is
/// unique across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservationId(pub u64);

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where an unresolved reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReservationState {
    /// Waiting for its request to settle; expired by the TTL sweep if
    /// forgotten.
    Open,
    /// The gateway may or may not have sent (timeout after writing, an
    /// unparseable answer, a crash): kept reserved, never expired, resolved
    /// by an operator or by the in-doubt policy sweep.
    InDoubt,
    /// A delivery hold (`charge_on: delivery`): one part of an accepted
    /// share, waiting for its delivery report. Never expired by the TTL
    /// sweep, never taken by the in-doubt policy; resolved by the
    /// delivery-report module (report or `dlr.timeout_s`).
    Delivery,
}

impl ReservationState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationState::Open => "open",
            ReservationState::InDoubt => "in_doubt",
            ReservationState::Delivery => "delivery",
        }
    }
}

/// A copy of one unresolved reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservationView {
    pub id: ReservationId,
    pub account: String,
    pub state: ReservationState,
    /// Part of the total held in the account's `anytime` bucket.
    pub anytime_milli: i64,
    /// Part of the total held in the account's `offpeak` bucket.
    pub offpeak_milli: i64,
    /// `anytime_milli + offpeak_milli` = the sum of the shares.
    pub total_milli: i64,
    /// One price per (recipient, message), so a settlement can post exactly
    /// the shares the gateway accepted.
    pub shares_milli: Vec<i64>,
    pub reference: Option<String>,
    pub tariff_version: Option<String>,
    pub created_unix_ms: i64,
    pub in_doubt_since_unix_ms: Option<i64>,
}

/// The outcome of resolving a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settlement {
    /// Spent: left `posted` for good.
    pub posted_milli: i64,
    /// The part of `posted_milli` paid by the `offpeak` bucket (posts take
    /// offpeak first), so a later refund can go back where it came from.
    pub posted_offpeak_milli: i64,
    /// Returned to the account's available balance (voided or expired).
    pub voided_milli: i64,
    /// Seq of the last entry recorded.
    pub seq: u64,
}

/// The outcome of [`Ledger::hold_for_delivery`](super::Ledger::hold_for_delivery).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// Still reserved, now in delivery holds.
    pub held_milli: i64,
    /// Returned to available (the rejected shares).
    pub voided_milli: i64,
    /// Per share: its holds, one per part (empty: rejected, voided).
    pub holds: Vec<Vec<ReservationId>>,
    /// Seq of the last entry recorded.
    pub seq: u64,
}

/// The ledger's record of an unresolved reservation. Only mutated (state)
/// or removed while its account's lock is held.
#[derive(Debug)]
pub(super) struct Reservation {
    pub(super) account: Holder,
    pub(super) state: ReservationState,
    pub(super) anytime_milli: i64,
    pub(super) offpeak_milli: i64,
    pub(super) shares_milli: Box<[i64]>,
    pub(super) reference: Option<Box<str>>,
    pub(super) tariff_version: Option<Box<str>>,
    pub(super) created_unix_ms: i64,
    pub(super) in_doubt_since_unix_ms: Option<i64>,
}

impl Reservation {
    /// Cannot overflow: checked when the reservation was made or restored.
    pub(super) fn total_milli(&self) -> i64 {
        self.anytime_milli + self.offpeak_milli
    }

    pub(super) fn view(&self, id: u64) -> ReservationView {
        ReservationView {
            id: ReservationId(id),
            account: self.account.name().to_string(),
            state: self.state,
            anytime_milli: self.anytime_milli,
            offpeak_milli: self.offpeak_milli,
            total_milli: self.total_milli(),
            shares_milli: self.shares_milli.to_vec(),
            reference: self.reference.as_deref().map(str::to_string),
            tariff_version: self.tariff_version.as_deref().map(str::to_string),
            created_unix_ms: self.created_unix_ms,
            in_doubt_since_unix_ms: self.in_doubt_since_unix_ms,
        }
    }
}

/// Voids its reservation on drop unless it was settled, voided or put in
/// doubt first (SPEC 3.3: "dropping a request context without settling must
/// void").
///
/// Once the request may have reached the gateway, voiding on drop would be
/// wrong: a context dropped mid-forward (client gone, shutdown) may belong to
/// a message that was sent. [`ReservationGuard::forwarding`] switches the
/// drop action to "in doubt" for that phase.
///
/// A settle that fails (e.g. a wrong number of flags) leaves the guard armed,
/// so the reservation is still voided when the consumed guard drops. A void
/// on drop that finds the reservation already resolved (by the TTL sweep or
/// an operator) is silently ignored.
#[must_use = "dropping the guard voids the reservation"]
pub struct ReservationGuard {
    ledger: Arc<Ledger>,
    id: ReservationId,
    /// Cleared once the reservation has been resolved or handed over to the
    /// in-doubt process; while set, drop applies `on_drop`.
    armed: bool,
    on_drop: DropAction,
}

/// What an armed guard does when dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DropAction {
    /// Nothing left the building: return the credit.
    Void,
    /// The request may have been written upstream: keep the credit reserved
    /// for an operator or the in-doubt policy.
    InDoubt,
}

impl ReservationGuard {
    pub fn new(ledger: Arc<Ledger>, id: ReservationId) -> Self {
        ReservationGuard {
            ledger,
            id,
            armed: true,
            on_drop: DropAction::Void,
        }
    }

    /// Marks the start of forwarding: from now on, dropping the guard puts
    /// the reservation in doubt instead of voiding it.
    pub fn forwarding(&mut self) {
        self.on_drop = DropAction::InDoubt;
    }

    pub fn id(&self) -> ReservationId {
        self.id
    }

    /// Posts the shares whose flag is true and voids the rest.
    pub fn settle_shares(
        mut self,
        accepted: &[bool],
        reference: Option<&str>,
    ) -> Result<Settlement, LedgerError> {
        let result = self.ledger.settle_shares(self.id, accepted, reference);
        self.disarm_unless_still_open(&result);
        result
    }

    /// Posts `post_milli` and voids the rest.
    pub fn settle(
        mut self,
        post_milli: i64,
        reference: Option<&str>,
    ) -> Result<Settlement, LedgerError> {
        let result = self.ledger.settle(self.id, post_milli, reference);
        self.disarm_unless_still_open(&result);
        result
    }

    /// `charge_on: delivery`: the accepted shares become delivery holds,
    /// the rejected ones are voided ([`Ledger::hold_for_delivery`]).
    pub fn hold_for_delivery(
        mut self,
        parts_milli: &[Vec<i64>],
        reference: Option<&str>,
    ) -> Result<Held, LedgerError> {
        let result = self
            .ledger
            .hold_for_delivery(self.id, parts_milli, reference);
        self.disarm_unless_still_open(&result);
        result
    }

    pub fn void(mut self) -> Result<Settlement, LedgerError> {
        self.armed = false;
        self.ledger.void(self.id)
    }

    /// Keeps the credit reserved and lists the reservation as in doubt; the
    /// guard no longer voids on drop.
    pub fn into_in_doubt(mut self) -> Result<(), LedgerError> {
        let result = self.ledger.mark_in_doubt(self.id);
        self.disarm_unless_still_open(&result);
        result
    }

    /// Disarms unless the call failed in a way that left the reservation
    /// open (anything but "already resolved").
    fn disarm_unless_still_open<T>(&mut self, result: &Result<T, LedgerError>) {
        match result {
            Ok(_) | Err(LedgerError::UnknownReservation(_)) => self.armed = false,
            Err(_) => {}
        }
    }
}

impl fmt::Debug for ReservationGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReservationGuard")
            .field("id", &self.id)
            .field("armed", &self.armed)
            .field("on_drop", &self.on_drop)
            .finish()
    }
}

impl Drop for ReservationGuard {
    fn drop(&mut self) {
        if self.armed {
            // Already resolved elsewhere (sweep, operator) is fine: nothing
            // left to return.
            let _ = match self.on_drop {
                DropAction::Void => self.ledger.void(self.id).map(drop),
                DropAction::InDoubt => self.ledger.mark_in_doubt(self.id),
            };
        }
    }
}
