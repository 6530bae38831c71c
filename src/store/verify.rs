//! `tollgate ledger verify`: replays every stored entry and checks the sums
//! against the stored balances and open reservations.
//!
//! Owns the comparison and its report; it only reads the store. Entries are
//! streamed in seq order and replayed in chunks with [`ledger::replay`]
//! (the sums commute, so chunk totals add up), so memory stays bounded by
//! the number of accounts and open reservations, not by the journal.
//!
//! [`ledger::replay`]: crate::ledger::replay

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::{Store, StoreError};
use crate::ledger::{replay, Bucket, BucketBalance, Entry, EntryKind, Overdraft};
use crate::money::format_credits;

/// Entries replayed per chunk.
const CHUNK_ENTRIES: usize = 65_536;

/// A stored bucket that does not equal the replay of its entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalanceMismatch {
    pub account: String,
    pub bucket: Bucket,
    pub stored: BucketBalance,
    pub replayed: BucketBalance,
}

/// What `verify` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub entries: u64,
    pub last_seq: u64,
    pub accounts: usize,
    pub balance_mismatches: Vec<BalanceMismatch>,
    /// Open reservations: stored rows vs. reserves without a resolution.
    pub open_reservations_stored: usize,
    pub open_reservations_replayed: usize,
    /// Reservation ids whose stored row disagrees with the journal.
    pub reservation_mismatches: Vec<String>,
    /// Buckets with `available < 0` (an error under `overdraft: strict`).
    pub below_zero: Vec<(String, Bucket, i64)>,
    /// `reserved < 0` anywhere is always an error.
    pub negative_reserved: Vec<(String, Bucket, i64)>,
    /// `refund` entries that break their rules: a share refunded twice, a
    /// refund without a share reference or reservation, a negative one, or
    /// refunds of a reservation above what it posted on that bucket.
    pub refund_mismatches: Vec<String>,
    /// `refund` entries replayed.
    pub refunds: u64,
}

impl VerifyReport {
    /// Whether the store is consistent under `overdraft`.
    pub fn is_ok(&self, overdraft: Overdraft) -> bool {
        self.balance_mismatches.is_empty()
            && self.reservation_mismatches.is_empty()
            && self.negative_reserved.is_empty()
            && self.refund_mismatches.is_empty()
            && (overdraft == Overdraft::Ozeki || self.below_zero.is_empty())
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "entries:              {}", self.entries)?;
        writeln!(f, "last seq:             {}", self.last_seq)?;
        writeln!(f, "accounts:             {}", self.accounts)?;
        writeln!(
            f,
            "open reservations:    {} stored, {} replayed",
            self.open_reservations_stored, self.open_reservations_replayed
        )?;
        writeln!(f, "balance mismatches:   {}", self.balance_mismatches.len())?;
        for m in &self.balance_mismatches {
            writeln!(
                f,
                "  {} {}: stored posted {} reserved {}, entries sum to posted {} reserved {}",
                m.account,
                m.bucket,
                format_credits(m.stored.posted_milli),
                format_credits(m.stored.reserved_milli),
                format_credits(m.replayed.posted_milli),
                format_credits(m.replayed.reserved_milli)
            )?;
        }
        writeln!(
            f,
            "reservation mismatches: {}",
            self.reservation_mismatches.len()
        )?;
        for m in &self.reservation_mismatches {
            writeln!(f, "  {m}")?;
        }
        writeln!(f, "buckets below zero:   {}", self.below_zero.len())?;
        for (a, b, v) in &self.below_zero {
            writeln!(f, "  {a} {b}: available {}", format_credits(*v))?;
        }
        writeln!(
            f,
            "refunds:              {} ({} mismatches)",
            self.refunds,
            self.refund_mismatches.len()
        )?;
        for m in &self.refund_mismatches {
            writeln!(f, "  {m}")?;
        }
        writeln!(f, "negative reserved:    {}", self.negative_reserved.len())?;
        for (a, b, v) in &self.negative_reserved {
            writeln!(f, "  {a} {b}: reserved {}", format_credits(*v))?;
        }
        Ok(())
    }
}

/// A reservation as the journal leaves it: reserved per bucket, by account.
#[derive(Default)]
struct ReplayedReservation {
    account: String,
    anytime_milli: i64,
    offpeak_milli: i64,
}

/// What the journal refunded of one reservation.
#[derive(Default)]
struct ReservationRefunds {
    /// (reference, bucket) pairs refunded: each at most once.
    shares: std::collections::HashSet<(String, Bucket)>,
    /// Per bucket (anytime, offpeak): refunded, and posted (second pass).
    refunded: [i64; 2],
    posted: [i64; 2],
}

fn bucket_index(bucket: Bucket) -> usize {
    match bucket {
        Bucket::Anytime => 0,
        Bucket::OffPeak => 1,
    }
}

/// The rules one `refund` entry must follow on its own (the amount bound
/// needs the second pass).
fn check_refund(
    e: &Entry,
    refunded: &mut HashMap<u64, ReservationRefunds>,
    mismatches: &mut Vec<String>,
) {
    let share = e
        .reference
        .as_deref()
        .and_then(crate::ledger::parse_refund_reference);
    let (Some(id), Some(share)) = (e.reservation_id, share) else {
        mismatches.push(format!("refund entry {} names no reservation share", e.seq));
        return;
    };
    if e.amount_milli < 0 {
        mismatches.push(format!("refund entry {} is negative", e.seq));
    }
    let r = refunded.entry(id).or_default();
    let reference = e.reference.clone().unwrap_or_default();
    if !r.shares.insert((reference.clone(), e.bucket)) {
        mismatches.push(format!(
            "reservation {id} share {share} ({reference}) is refunded twice on {}",
            e.bucket
        ));
    }
    let i = bucket_index(e.bucket);
    r.refunded[i] = r.refunded[i].saturating_add(e.amount_milli);
}

/// Replays the whole journal of `store` and compares.
pub fn verify(store: &mut dyn Store) -> Result<VerifyReport, StoreError> {
    let mut totals: HashMap<(String, Bucket), BucketBalance> = HashMap::new();
    let mut open: BTreeMap<u64, ReplayedReservation> = BTreeMap::new();
    let mut chunk: Vec<Entry> = Vec::with_capacity(CHUNK_ENTRIES);
    let mut last_seq = 0u64;
    // Refunds are rare (one per failed delivery report): kept per
    // reservation until the second pass compares them with its posts.
    let mut refunded: HashMap<u64, ReservationRefunds> = HashMap::new();
    let mut refund_mismatches: Vec<String> = Vec::new();
    let mut refunds = 0u64;

    fn merge(totals: &mut HashMap<(String, Bucket), BucketBalance>, chunk: &mut Vec<Entry>) {
        for (key, b) in replay(chunk) {
            let t = totals.entry(key).or_default();
            t.posted_milli = t.posted_milli.saturating_add(b.posted_milli);
            t.reserved_milli = t.reserved_milli.saturating_add(b.reserved_milli);
        }
        chunk.clear();
    }

    let entries = store.for_each_entry(&mut |e| {
        last_seq = last_seq.max(e.seq);
        if e.kind == EntryKind::Refund {
            refunds += 1;
            check_refund(&e, &mut refunded, &mut refund_mismatches);
        }
        // Seq order: a reservation's reserve entries precede its resolution.
        if let Some(id) = e.reservation_id {
            if e.kind == EntryKind::Refund {
                // Follows a resolution; opens and resolves nothing.
            } else if e.kind == EntryKind::Reserve {
                let r = open.entry(id).or_default();
                r.account.clone_from(&e.account);
                match e.bucket {
                    Bucket::Anytime => {
                        r.anytime_milli = r.anytime_milli.saturating_add(e.amount_milli)
                    }
                    Bucket::OffPeak => {
                        r.offpeak_milli = r.offpeak_milli.saturating_add(e.amount_milli)
                    }
                }
            } else {
                open.remove(&id);
            }
        }
        chunk.push(e);
        if chunk.len() >= CHUNK_ENTRIES {
            merge(&mut totals, &mut chunk);
        }
        Ok(())
    })?;
    merge(&mut totals, &mut chunk);

    if !refunded.is_empty() {
        // Second pass: what each refunded reservation posted, per bucket.
        store.for_each_entry(&mut |e| {
            if e.kind == EntryKind::Post {
                if let Some(r) = e.reservation_id.and_then(|id| refunded.get_mut(&id)) {
                    r.posted[bucket_index(e.bucket)] += -e.amount_milli;
                }
            }
            Ok(())
        })?;
        let mut ids: Vec<_> = refunded.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let r = &refunded[&id];
            for bucket in Bucket::ALL {
                let i = bucket_index(bucket);
                if r.refunded[i] > r.posted[i] {
                    refund_mismatches.push(format!(
                        "reservation {id} {bucket}: refunded {} but posted {}",
                        format_credits(r.refunded[i]),
                        format_credits(r.posted[i])
                    ));
                }
            }
        }
    }

    let stored = store.stored_balances()?;
    let loaded = store.load()?;
    let mut report = VerifyReport {
        entries,
        last_seq,
        accounts: stored.len(),
        open_reservations_stored: loaded.open_reservations.len(),
        open_reservations_replayed: open.len(),
        refund_mismatches,
        refunds,
        ..VerifyReport::default()
    };

    for account in &stored {
        for bucket in Bucket::ALL {
            let stored_b = account.bucket(bucket);
            let replayed = totals
                .remove(&(account.name.clone(), bucket))
                .unwrap_or_default();
            if stored_b != replayed {
                report.balance_mismatches.push(BalanceMismatch {
                    account: account.name.clone(),
                    bucket,
                    stored: stored_b,
                    replayed,
                });
            }
            if stored_b.available_milli() < 0 {
                report
                    .below_zero
                    .push((account.name.clone(), bucket, stored_b.available_milli()));
            }
            if stored_b.reserved_milli < 0 {
                report.negative_reserved.push((
                    account.name.clone(),
                    bucket,
                    stored_b.reserved_milli,
                ));
            }
        }
    }
    // Entries of accounts without a balance row.
    let mut orphans: Vec<_> = totals.into_iter().collect();
    orphans.sort_by(|a, b| (&a.0 .0, a.0 .1.as_str()).cmp(&(&b.0 .0, b.0 .1.as_str())));
    for ((account, bucket), replayed) in orphans {
        report.balance_mismatches.push(BalanceMismatch {
            account,
            bucket,
            stored: BucketBalance::default(),
            replayed,
        });
    }

    for r in &loaded.open_reservations {
        match open.remove(&r.id.0) {
            None => report.reservation_mismatches.push(format!(
                "reservation {} is stored as open but the journal resolves it (or has no reserve)",
                r.id
            )),
            Some(j) => {
                if j.account != r.account
                    || j.anytime_milli != r.anytime_milli
                    || j.offpeak_milli != r.offpeak_milli
                {
                    report.reservation_mismatches.push(format!(
                        "reservation {}: stored {} anytime {} offpeak {}, journal {} anytime {} offpeak {}",
                        r.id,
                        r.account,
                        format_credits(r.anytime_milli),
                        format_credits(r.offpeak_milli),
                        j.account,
                        format_credits(j.anytime_milli),
                        format_credits(j.offpeak_milli)
                    ));
                }
            }
        }
    }
    for (id, j) in open {
        report.reservation_mismatches.push(format!(
            "reservation {id} of {} is open in the journal but not stored as open",
            j.account
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;
    use crate::ledger::Role;
    use crate::store::{AccountMeta, SqliteStore};

    fn e(seq: u64, kind: EntryKind, account: &str, amount_milli: i64, rid: Option<u64>) -> Entry {
        Entry {
            at_unix_ms: 0,
            ..Entry::for_test(seq, kind, account, amount_milli, rid)
        }
    }

    fn meta(name: &str) -> AccountMeta {
        AccountMeta {
            name: name.into(),
            parent: None,
            role: Role::User,
            tariff_class: None,
        }
    }

    fn store_with_history(dir: &tempfile::TempDir) -> SqliteStore {
        use EntryKind::*;
        let mut s = SqliteStore::open(&dir.path().join("v.db"), Durability::Sync).unwrap();
        s.commit(
            &[
                e(1, Add, "a", 10_000, None),
                e(2, Reserve, "a", 4_000, Some(2)),
                e(3, Add, "b", 1_000, None),
            ],
            &[meta("a"), meta("b")],
        )
        .unwrap();
        s.commit(
            &[
                e(4, Post, "a", -1_000, Some(2)),
                e(5, Void, "a", -3_000, Some(2)),
            ],
            &[meta("a")],
        )
        .unwrap();
        s.commit(&[e(6, Reserve, "b", 500, Some(6))], &[meta("b")])
            .unwrap();
        s
    }

    #[test]
    fn a_consistent_store_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store_with_history(&dir);
        let r = verify(&mut s).unwrap();
        assert!(r.is_ok(Overdraft::Strict), "{r}");
        assert_eq!((r.entries, r.last_seq, r.accounts), (6, 6, 2));
        assert_eq!(
            (r.open_reservations_stored, r.open_reservations_replayed),
            (1, 1)
        );
        assert!(r.to_string().contains("balance mismatches:   0"));
    }

    fn refund(seq: u64, amount_milli: i64, rid: u64, share: usize) -> Entry {
        Entry {
            reference: Some(crate::ledger::refund_reference(share, None)),
            ..e(seq, EntryKind::Refund, "a", amount_milli, Some(rid))
        }
    }

    #[test]
    fn refunds_within_what_was_posted_verify() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store_with_history(&dir);
        s.commit(&[refund(7, 600, 2, 0), refund(8, 400, 2, 1)], &[meta("a")])
            .unwrap();
        let r = verify(&mut s).unwrap();
        assert!(r.is_ok(Overdraft::Strict), "{r}");
        assert_eq!(r.refunds, 2);
    }

    #[test]
    fn a_share_refunded_twice_or_above_its_post_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store_with_history(&dir);
        // Reservation 2 posted 1 000 on anytime.
        s.commit(&[refund(7, 600, 2, 0), refund(8, 600, 2, 0)], &[meta("a")])
            .unwrap();
        s.commit(
            &[Entry {
                reference: Some("oops".into()),
                ..e(9, EntryKind::Refund, "a", 1, Some(2))
            }],
            &[meta("a")],
        )
        .unwrap();
        let r = verify(&mut s).unwrap();
        assert!(!r.is_ok(Overdraft::Strict));
        let text = r.refund_mismatches.join("\n");
        assert!(
            text.contains("share 0 (share:0) is refunded twice"),
            "{text}"
        );
        assert!(text.contains("refunded 1.2 but posted 1"), "{text}");
        assert!(text.contains("names no reservation share"), "{text}");
        // The balances themselves still replay: the journal is consistent,
        // its refunds are not.
        assert!(r.balance_mismatches.is_empty(), "{r}");
    }

    #[test]
    fn tampered_balances_and_reservations_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store_with_history(&dir);
        s.connection()
            .execute(
                "UPDATE accounts SET anytime_posted_milli = anytime_posted_milli + 1 WHERE name = 'b'",
                [],
            )
            .unwrap();
        s.connection()
            .execute("DELETE FROM open_reservations", [])
            .unwrap();
        s.connection()
            .execute(
                "INSERT INTO entries (seq, kind, account, bucket, amount_milli, at_unix_ms)
                 VALUES (7, 'add', 'ghost', 'offpeak', 5, 0)",
                [],
            )
            .unwrap();
        let r = verify(&mut s).unwrap();
        assert!(!r.is_ok(Overdraft::Ozeki));
        assert_eq!(r.balance_mismatches.len(), 2, "{r}");
        assert_eq!(r.balance_mismatches[0].account, "b");
        assert_eq!(r.balance_mismatches[0].stored.posted_milli, 1_001);
        assert_eq!(r.balance_mismatches[0].replayed.posted_milli, 1_000);
        assert_eq!(r.balance_mismatches[1].account, "ghost");
        assert_eq!(r.reservation_mismatches.len(), 1, "{r}");
        assert!(r.to_string().contains("ghost offpeak"));
    }

    #[test]
    fn below_zero_fails_only_under_strict_overdraft() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("v.db"), Durability::Sync).unwrap();
        s.commit(
            &[
                e(1, EntryKind::Add, "a", 1_000, None),
                e(2, EntryKind::Reserve, "a", 3_000, Some(2)),
            ],
            &[meta("a")],
        )
        .unwrap();
        let r = verify(&mut s).unwrap();
        assert_eq!(
            r.below_zero,
            vec![("a".to_string(), Bucket::Anytime, -2_000)]
        );
        assert!(!r.is_ok(Overdraft::Strict));
        assert!(r.is_ok(Overdraft::Ozeki));
    }
}
