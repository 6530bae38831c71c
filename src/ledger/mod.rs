//! The authoritative in-memory ledger.
//!
//! Owns every account's two buckets (`anytime`, `offpeak`), the two-phase
//! reservations drawn against them, and the numbering of the immutable
//! entries that describe every change (SPEC 3). It is plain synchronous Rust:
//! it must never know about HTTP, pingora, tokio, tariffs or SQL, and it must
//! never block on I/O — persistence happens behind the [`EntrySink`] trait,
//! whose `record` is called with the locks held and therefore must only
//! enqueue.
//!
//! # Balances
//! Each bucket keeps `posted` (credit the account owns) and `reserved` (the
//! part of `posted` held by open or in-doubt reservations);
//! `available = posted − reserved`. Under [`Overdraft::Strict`] (default)
//! `available ≥ 0` holds for every bucket at every instant. Under
//! [`Overdraft::Ozeki`] a reservation is also allowed while the payable
//! balance is > 0, and may take `anytime` below zero by that send's cost;
//! `add`, `set` and `transfer` never take a bucket below zero under either
//! policy.
//!
//! # Entry sign convention (the store and `ledger verify` depend on it)
//! Every [`Entry::amount_milli`] is a **signed delta**; the entry's kind says
//! which of the bucket's two numbers it moves:
//!
//! | kind       | `posted` += | `reserved` += | sign of amount                         |
//! |------------|-------------|---------------|----------------------------------------|
//! | `add`      | amount      | —             | either (negative deducts)              |
//! | `set`      | amount      | —             | either: new available − old available  |
//! | `transfer` | amount      | —             | either: + on the receiving account     |
//! | `reserve`  | —           | amount        | ≥ 0                                    |
//! | `post`     | amount      | amount        | ≤ 0: the spend leaves both             |
//! | `void`     | —           | amount        | ≤ 0: credit returns to available       |
//! | `expire`   | —           | amount        | ≤ 0: like `void`, by the TTL sweep     |
//! | `refund`   | amount      | —             | ≥ 0: a posted share given back         |
//!
//! So `available` moves by `amount` for add/set/transfer/refund, by `−amount` for
//! reserve/void/expire, and not at all for post. Replaying all entries from
//! zero with these rules ([`replay`]) reproduces every bucket's `posted` and
//! `reserved`; the sums commute, so replay does not depend on entry order.
//!
//! Further journal facts:
//! - Every successful operation records at least one entry, with consecutive
//!   seqs, in one `record` call. Zero legs are skipped, except that a
//!   reservation of 0 records one `reserve` entry of 0 (and its resolution one
//!   `void`/`expire` entry of 0) on `anytime`, so every reservation appears
//!   in the journal. A transfer records up to 4 entries (zero legs skipped).
//! - A reservation's id is the seq of its first `reserve` entry, so ids stay
//!   unique across restarts once [`Ledger::set_next_seq`] is called; every
//!   entry of a reservation (reserve, post, void, expire) carries the id.
//! - A settlement records its `post` legs (offpeak first) and then its
//!   `void` legs; a reservation resolves in exactly one operation.
//! - Failed operations record nothing and consume no seq.
//! - Marking a reservation in doubt changes no balance and records nothing.
//! - `charge_on: delivery` ([`Ledger::hold_for_delivery`]): one operation
//!   voids the whole reservation and reserves one **delivery hold** per
//!   part of each accepted share (each a reservation of its own, id = its
//!   first `reserve` seq, reference [`hold_reference`]); `reserved` drops
//!   by the rejected shares only. Holds are in state `delivery`: never
//!   expired, never taken by the in-doubt policy; each resolves once by
//!   `post` ([`Ledger::post_whole`]) or `void`. No new entry kind: the
//!   store, `ledger verify` and export treat holds as reservations.
//! - Seqs are unique and, per account, reach the sink in increasing order.
//!   Across accounts the sink may see them slightly out of order (two
//!   operations on different accounts race between taking seqs and calling
//!   `record`); the store must not assume global order.
//!
//! # Concurrency
//! Lock order: account mutex(es) — two of them in name order — then, briefly,
//! one shard of the reservation map. A guard on the account map is never
//! held while an account is locked, and the sink is called with the account
//! locks held, so it must not call back into the ledger.
//!
//! # Failure modes
//! - Crash: everything not yet committed by the store is lost with the
//!   process; on restart the store restores balances
//!   ([`Ledger::restore_account`]), the reservations that were open
//!   ([`Ledger::restore_reservation`], they come back in doubt) and the seq
//!   counter ([`Ledger::set_next_seq`]).
//! - A request that never settles: its [`ReservationGuard`] voids on drop; a
//!   reservation whose guard leaked is expired by [`Ledger::expire_due`].
//! - A sink that panics poisons nothing (parking_lot mutexes) but loses that
//!   operation's entries while the balances already moved; sinks must not
//!   panic.

mod engine;
mod entry;
mod reservation;

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;

use std::fmt;

use thiserror::Error;

pub use crate::clock::{Clock, ManualClock, SystemClock};
pub use engine::{Ledger, ReadyAccount};
pub use entry::{
    replay, replay_open_reservations, Entry, EntryKind, EntrySink, MemorySink, NullSink,
};
pub use reservation::{
    Held, ReservationGuard, ReservationId, ReservationState, ReservationView, Settlement,
};

/// The reference a `refund` entry carries: which share of its reservation
/// it gives back (`share:<index>`, the index in the reservation's shares),
/// or which parts of it (`share:<index>/part:<p>+<q>`, 1-based) when a
/// multipart message's parts are refunded one report at a time. Each
/// reference is refunded at most once per bucket.
pub fn refund_reference(share: usize, parts: Option<&[u32]>) -> String {
    match parts {
        None => format!("share:{share}"),
        Some(parts) => {
            let list: Vec<String> = parts.iter().map(u32::to_string).collect();
            format!("share:{share}/part:{}", list.join("+"))
        }
    }
}

/// The reference of a delivery hold ([`Ledger::hold_for_delivery`]):
/// `delivery:<reservation>/share:<index>/part:<p>` (part 1-based), so a
/// restart can tell which part of which send each hold is.
pub fn hold_reference(reservation: ReservationId, share: usize, part: u32) -> String {
    format!("delivery:{}/share:{share}/part:{part}", reservation.0)
}

/// Inverse of [`hold_reference`]: (reservation, share, part).
pub fn parse_hold_reference(reference: &str) -> Option<(u64, usize, u32)> {
    let rest = reference.strip_prefix("delivery:")?;
    let (rid, rest) = rest.split_once("/share:")?;
    let (share, part) = rest.split_once("/part:")?;
    let ok = |t: &str| !t.is_empty() && t.len() <= 19 && t.bytes().all(|b| b.is_ascii_digit());
    if !(ok(rid) && ok(share) && ok(part)) {
        return None;
    }
    Some((rid.parse().ok()?, share.parse().ok()?, part.parse().ok()?))
}

/// The share index of a [`refund_reference`].
pub fn parse_refund_reference(reference: &str) -> Option<usize> {
    let rest = reference.strip_prefix("share:")?;
    let (digits, tail) = match rest.split_once('/') {
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    };
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if let Some(tail) = tail {
        let parts = tail.strip_prefix("part:")?;
        if parts.is_empty()
            || parts.len() > 64
            || !parts
                .split('+')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            return None;
        }
    }
    digits.parse().ok()
}

/// One of an account's two balances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bucket {
    Anytime,
    OffPeak,
}

impl Bucket {
    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Anytime => "anytime",
            Bucket::OffPeak => "offpeak",
        }
    }
}

/// Which buckets a send may draw from (decided by the tariff's off-peak
/// windows at the time of the send).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketPreference {
    /// Outside off-peak windows: only `anytime` pays.
    AnytimeOnly,
    /// Inside an off-peak window: `offpeak` first, then `anytime`.
    OffPeakFirst,
}

impl BucketPreference {
    /// The name quotes use (the admin API and `tollgate quote` alike).
    pub fn as_str(self) -> &'static str {
        match self {
            BucketPreference::AnytimeOnly => "anytime",
            BucketPreference::OffPeakFirst => "offpeak_first",
        }
    }
}

impl Bucket {
    /// Both buckets, in the order the journal and exports list them.
    pub const ALL: [Bucket; 2] = [Bucket::Anytime, Bucket::OffPeak];

    /// Inverse of [`Bucket::as_str`] (for the store and exports).
    pub fn parse(text: &str) -> Option<Bucket> {
        match text {
            "anytime" => Some(Bucket::Anytime),
            "offpeak" => Some(Bucket::OffPeak),
            _ => None,
        }
    }
}

impl fmt::Display for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Longest account name, in characters (SPEC 3.1).
pub const ACCOUNT_NAME_MAX_CHARS: usize = 64;

/// What an account may do through the credit front doors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// May read and change other accounts' credit.
    Admin,
    /// May read its own credit and send.
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }

    /// Inverse of [`Role::as_str`]; exact lower-case names only.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How far a send may take a balance (SPEC 3.1, `overdraft:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overdraft {
    /// `available ≥ 0` for every bucket, always.
    #[default]
    Strict,
    /// Ozeki's rule: a send is allowed while the payable available balance
    /// is above 0 and may take it below zero by that send's cost. Only
    /// reservations get this leeway; add, set and transfer stay strict.
    Ozeki,
}

impl Overdraft {
    pub fn as_str(self) -> &'static str {
        match self {
            Overdraft::Strict => "strict",
            Overdraft::Ozeki => "ozeki",
        }
    }

    /// Inverse of [`Overdraft::as_str`] (config key `overdraft:`).
    pub fn parse(text: &str) -> Option<Overdraft> {
        match text {
            "strict" => Some(Overdraft::Strict),
            "ozeki" => Some(Overdraft::Ozeki),
            _ => None,
        }
    }
}

/// One bucket of one account.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketBalance {
    /// Credit the account owns, including what is reserved.
    pub posted_milli: i64,
    /// The part of `posted_milli` held by open or in-doubt reservations;
    /// never negative.
    pub reserved_milli: i64,
}

impl BucketBalance {
    /// `posted − reserved`: what a new reservation, a deduction or a transfer
    /// may use. Saturates instead of overflowing (the ledger itself never
    /// builds a balance where this would overflow; restored data might).
    pub fn available_milli(&self) -> i64 {
        self.posted_milli.saturating_sub(self.reserved_milli)
    }

    /// Applies signed deltas with checked arithmetic; refuses results whose
    /// available balance would not fit an `i64` or whose reserved amount
    /// would be negative.
    pub(crate) fn checked_apply(
        self,
        posted_delta_milli: i64,
        reserved_delta_milli: i64,
    ) -> Result<BucketBalance, LedgerError> {
        let posted_milli = self
            .posted_milli
            .checked_add(posted_delta_milli)
            .ok_or(LedgerError::Overflow)?;
        let reserved_milli = self
            .reserved_milli
            .checked_add(reserved_delta_milli)
            .ok_or(LedgerError::Overflow)?;
        if reserved_milli < 0 {
            return Err(LedgerError::Overflow);
        }
        posted_milli
            .checked_sub(reserved_milli)
            .ok_or(LedgerError::Overflow)?;
        Ok(BucketBalance {
            posted_milli,
            reserved_milli,
        })
    }
}

/// Both buckets of one account (e.g. each side of a transfer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccountBalances {
    pub anytime: BucketBalance,
    pub offpeak: BucketBalance,
}

impl AccountBalances {
    pub fn bucket(&self, bucket: Bucket) -> BucketBalance {
        match bucket {
            Bucket::Anytime => self.anytime,
            Bucket::OffPeak => self.offpeak,
        }
    }
}

/// A consistent copy of one account, taken under its lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountView {
    pub name: String,
    /// The account that may move credit into and out of this one (SPEC 2.2).
    pub parent: Option<String>,
    pub role: Role,
    /// Which tariff prices this account's sends; `None` → the default tariff.
    pub tariff_class: Option<String>,
    pub anytime: BucketBalance,
    pub offpeak: BucketBalance,
}

impl AccountView {
    pub fn bucket(&self, bucket: Bucket) -> BucketBalance {
        match bucket {
            Bucket::Anytime => self.anytime,
            Bucket::OffPeak => self.offpeak,
        }
    }

    pub fn balances(&self) -> AccountBalances {
        AccountBalances {
            anytime: self.anytime,
            offpeak: self.offpeak,
        }
    }
}

/// The result of a single-bucket change (`add`, `set`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Seq of the last entry recorded: the store has made the change durable
    /// once it has committed this seq.
    pub seq: u64,
    /// The bucket right after the change.
    pub balance: BucketBalance,
}

/// The result of a parent ↔ sub-account transfer: both accounts' buckets
/// right after the move (what the 2sms answer reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferOutcome {
    pub parent: AccountBalances,
    pub child: AccountBalances,
    /// Seq of the last entry recorded.
    pub seq: u64,
}

/// Why a ledger operation changed nothing. Every variant means no balance
/// moved and no entry was recorded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LedgerError {
    #[error("unknown account {0:?}")]
    UnknownAccount(String),
    #[error("account {0:?} already exists")]
    AccountExists(String),
    #[error(
        "insufficient credit: {needed_milli} milli-credits needed, {available_milli} available"
    )]
    InsufficientCredit {
        needed_milli: i64,
        available_milli: i64,
    },
    /// Also returned for a reservation that has already been resolved.
    #[error("unknown or already resolved reservation {0}")]
    UnknownReservation(ReservationId),
    #[error("invalid amount: {0}")]
    InvalidAmount(String),
    #[error("{child:?} is not a sub-account of {parent:?}")]
    NotASubaccount { parent: String, child: String },
    #[error("amount out of range")]
    Overflow,
    /// Empty, longer than [`ACCOUNT_NAME_MAX_CHARS`], or containing control
    /// characters.
    #[error("invalid account name {0:?}")]
    InvalidAccountName(String),
}

/// Ledger policy, fixed at construction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerConfig {
    pub overdraft: Overdraft,
    /// Age at which an open reservation is expired by
    /// [`Ledger::expire_due`] (`settle.reservation_ttl_s`).
    pub reservation_ttl_ms: i64,
}

/// Default reservation TTL (SPEC 3.3: 300 s).
pub const RESERVATION_TTL_DEFAULT_MS: i64 = 300_000;

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            overdraft: Overdraft::Strict,
            reservation_ttl_ms: RESERVATION_TTL_DEFAULT_MS,
        }
    }
}
