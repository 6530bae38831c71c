//! Journal entries: the immutable record of every balance change, the sink
//! they are handed to, and their replay.
//!
//! Owns the entry format and its sign convention (see the `ledger` module
//! docs: amounts are signed deltas to `posted` and/or `reserved`, by kind).
//! It must never do I/O itself: persistence is the store's job, behind
//! [`EntrySink`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use parking_lot::Mutex;

use super::{Bucket, BucketBalance, ReservationId, ReservationState, ReservationView};

/// What an entry did (SPEC 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Admin credit or debit; moves `posted`.
    Add,
    /// Admin "set available balance to", journaled as the delta; moves
    /// `posted`.
    Set,
    /// Credit held for a send; moves `reserved` (up).
    Reserve,
    /// A reservation's spent part; moves `posted` and `reserved` (both down).
    Post,
    /// A reservation's unspent part returned; moves `reserved` (down).
    Void,
    /// Parent ↔ sub-account move; moves `posted`.
    Transfer,
    /// A forgotten reservation returned by the TTL sweep; moves `reserved`
    /// (down).
    Expire,
    /// Credit given back for a posted share whose delivery report said it
    /// never arrived; moves `posted` (up), on the bucket that paid. Carries
    /// the reservation id and, as its reference, `share:<index>` (or
    /// `share:<index>/part:<p>+…`, see [`refund_reference`](super::refund_reference)).
    Refund,
}

impl EntryKind {
    pub const ALL: [EntryKind; 8] = [
        EntryKind::Add,
        EntryKind::Set,
        EntryKind::Reserve,
        EntryKind::Post,
        EntryKind::Void,
        EntryKind::Transfer,
        EntryKind::Expire,
        EntryKind::Refund,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Add => "add",
            EntryKind::Set => "set",
            EntryKind::Reserve => "reserve",
            EntryKind::Post => "post",
            EntryKind::Void => "void",
            EntryKind::Transfer => "transfer",
            EntryKind::Expire => "expire",
            EntryKind::Refund => "refund",
        }
    }

    /// Inverse of [`EntryKind::as_str`] (for the store and exports).
    pub fn parse(text: &str) -> Option<EntryKind> {
        EntryKind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// Whether an entry of this kind adds its amount to `posted`.
    pub fn moves_posted(self) -> bool {
        matches!(
            self,
            EntryKind::Add
                | EntryKind::Set
                | EntryKind::Transfer
                | EntryKind::Post
                | EntryKind::Refund
        )
    }

    /// Whether an entry of this kind adds its amount to `reserved`.
    pub fn moves_reserved(self) -> bool {
        matches!(
            self,
            EntryKind::Reserve | EntryKind::Post | EntryKind::Void | EntryKind::Expire
        )
    }
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One immutable change to one bucket of one account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Unique, increasing per account; consecutive within one operation.
    pub seq: u64,
    pub kind: EntryKind,
    pub account: String,
    pub bucket: Bucket,
    /// Signed delta; see the module docs for which balance it moves.
    pub amount_milli: i64,
    /// Set on reserve/post/void/expire: the reservation it belongs to (the
    /// seq of the reservation's first `reserve` entry).
    pub reservation_id: Option<u64>,
    /// Request id, gateway message id or operator note.
    pub reference: Option<String>,
    /// Tariff version that priced the send (reservation entries only).
    pub tariff_version: Option<String>,
    pub at_unix_ms: i64,
}

#[cfg(test)]
impl Entry {
    /// A plain entry for tests: the any-time bucket, no reference, no
    /// tariff version, a fixed time.
    pub(crate) fn for_test(
        seq: u64,
        kind: EntryKind,
        account: &str,
        amount_milli: i64,
        reservation_id: Option<u64>,
    ) -> Entry {
        Entry {
            seq,
            kind,
            account: account.into(),
            bucket: Bucket::Anytime,
            amount_milli,
            reservation_id,
            reference: None,
            tariff_version: None,
            at_unix_ms: 1_700_000_000_000,
        }
    }
}

impl Entry {
    /// This entry's contribution to its bucket's `posted`.
    pub fn posted_delta_milli(&self) -> i64 {
        if self.kind.moves_posted() {
            self.amount_milli
        } else {
            0
        }
    }

    /// This entry's contribution to its bucket's `reserved`.
    pub fn reserved_delta_milli(&self) -> i64 {
        if self.kind.moves_reserved() {
            self.amount_milli
        } else {
            0
        }
    }
}

/// Where the ledger hands its entries (the store's write-behind queue).
///
/// `record` is called once per ledger operation with all its entries in seq
/// order, while the touched accounts' locks are held, so per-account call
/// order equals seq order. It must not block, must not panic and must not
/// call back into the ledger. The entries of one call belong to one
/// operation; a store should commit them in one transaction.
pub trait EntrySink: Send + Sync {
    fn record(&self, entries: &[Entry]);
}

/// Discards entries (benchmarks, tests that only look at balances).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl EntrySink for NullSink {
    fn record(&self, _entries: &[Entry]) {}
}

/// Keeps every entry in memory, in the order recorded (tests, `ledger verify`
/// tooling).
#[derive(Debug, Default)]
pub struct MemorySink {
    entries: Mutex<Vec<Entry>>,
}

impl MemorySink {
    pub fn new() -> MemorySink {
        MemorySink::default()
    }

    /// A copy of every entry recorded so far, in recording order.
    pub fn entries(&self) -> Vec<Entry> {
        self.entries.lock().clone()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.lock().is_empty()
    }
}

impl EntrySink for MemorySink {
    fn record(&self, entries: &[Entry]) {
        // Critical section: one Vec append; never calls out.
        self.entries.lock().extend_from_slice(entries);
    }
}

/// Replays entries from zero: every (account, bucket) that appears gets the
/// `posted` and `reserved` the sign convention implies. Order does not
/// matter (the sums commute). Arithmetic saturates: a journal that overflows
/// an `i64` cannot match any stored balance anyway.
pub fn replay(entries: &[Entry]) -> HashMap<(String, Bucket), BucketBalance> {
    let mut balances: HashMap<(String, Bucket), BucketBalance> = HashMap::new();
    for e in entries {
        let b = balances.entry((e.account.clone(), e.bucket)).or_default();
        b.posted_milli = b.posted_milli.saturating_add(e.posted_delta_milli());
        b.reserved_milli = b.reserved_milli.saturating_add(e.reserved_delta_milli());
    }
    balances
}

/// The reservations the entries leave unresolved (a `reserve` without any
/// `post`/`void`/`expire` of the same id), sorted by id, for the store's
/// startup load. Their shares are not journaled: each comes back with one
/// share of its whole total, and state `Open` —
/// [`Ledger::restore_reservation`](super::Ledger::restore_reservation)
/// turns it in doubt.
pub fn replay_open_reservations(entries: &[Entry]) -> Vec<ReservationView> {
    struct Acc {
        view: ReservationView,
        resolved: bool,
    }
    let mut by_id: BTreeMap<u64, Acc> = BTreeMap::new();
    for e in entries {
        let Some(id) = e.reservation_id else { continue };
        if e.kind == EntryKind::Refund {
            // Follows the reservation's resolution; never opens one.
            continue;
        }
        let acc = by_id.entry(id).or_insert_with(|| Acc {
            view: ReservationView {
                id: ReservationId(id),
                account: e.account.clone(),
                state: ReservationState::Open,
                anytime_milli: 0,
                offpeak_milli: 0,
                total_milli: 0,
                shares_milli: Vec::new(),
                reference: None,
                tariff_version: None,
                created_unix_ms: e.at_unix_ms,
                in_doubt_since_unix_ms: None,
            },
            resolved: false,
        });
        if e.kind == EntryKind::Reserve {
            let v = &mut acc.view;
            match e.bucket {
                Bucket::Anytime => v.anytime_milli = v.anytime_milli.saturating_add(e.amount_milli),
                Bucket::OffPeak => v.offpeak_milli = v.offpeak_milli.saturating_add(e.amount_milli),
            }
            v.created_unix_ms = e.at_unix_ms;
            v.account.clone_from(&e.account);
            if e.reference.is_some() {
                v.reference.clone_from(&e.reference);
            }
            if e.tariff_version.is_some() {
                v.tariff_version.clone_from(&e.tariff_version);
            }
        } else {
            acc.resolved = true;
        }
    }
    by_id
        .into_values()
        .filter(|a| !a.resolved)
        .map(|a| {
            let mut v = a.view;
            v.total_milli = v.anytime_milli.saturating_add(v.offpeak_milli);
            v.shares_milli = vec![v.total_milli];
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        seq: u64,
        kind: EntryKind,
        bucket: Bucket,
        amount_milli: i64,
        rid: Option<u64>,
    ) -> Entry {
        Entry {
            seq,
            kind,
            account: "a".into(),
            bucket,
            amount_milli,
            reservation_id: rid,
            reference: None,
            tariff_version: None,
            at_unix_ms: 7,
        }
    }

    #[test]
    fn kind_names_round_trip() {
        for k in EntryKind::ALL {
            assert_eq!(EntryKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(EntryKind::parse("Add"), None);
        for b in Bucket::ALL {
            assert_eq!(Bucket::parse(b.as_str()), Some(b));
        }
    }

    #[test]
    fn replay_applies_the_sign_convention() {
        use EntryKind::*;
        let entries = vec![
            entry(1, Add, Bucket::Anytime, 10_000, None),
            entry(2, Reserve, Bucket::Anytime, 3_000, Some(2)),
            entry(3, Post, Bucket::Anytime, -2_000, Some(2)),
            entry(4, Void, Bucket::Anytime, -1_000, Some(2)),
            entry(5, Set, Bucket::OffPeak, 5_000, None),
            entry(6, Reserve, Bucket::OffPeak, 1_000, Some(6)),
            entry(7, Transfer, Bucket::OffPeak, -500, None),
        ];
        let r = replay(&entries);
        assert_eq!(
            r[&("a".to_string(), Bucket::Anytime)],
            BucketBalance {
                posted_milli: 8_000,
                reserved_milli: 0
            }
        );
        assert_eq!(
            r[&("a".to_string(), Bucket::OffPeak)],
            BucketBalance {
                posted_milli: 4_500,
                reserved_milli: 1_000
            }
        );
        let open = replay_open_reservations(&entries);
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].id, ReservationId(6));
        assert_eq!(open[0].offpeak_milli, 1_000);
        assert_eq!(open[0].total_milli, 1_000);
        assert_eq!(open[0].shares_milli, vec![1_000]);
    }

    #[test]
    fn memory_sink_keeps_recording_order() {
        let s = MemorySink::new();
        assert!(s.is_empty());
        s.record(&[entry(2, EntryKind::Add, Bucket::Anytime, 1, None)]);
        s.record(&[entry(1, EntryKind::Add, Bucket::Anytime, 2, None)]);
        let seqs: Vec<u64> = s.entries().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![2, 1]);
        assert_eq!(s.len(), 2);
        NullSink.record(&s.entries());
    }
}
