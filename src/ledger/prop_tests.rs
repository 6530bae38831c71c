//! Concurrency tests and property tests of the ledger's invariants:
//! `available ≥ 0` under strict overdraft, exactly-once resolution, and
//! conservation (replaying the journal reproduces every balance).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;

const PART_MILLI: i64 = 1000;

fn ledger_with(overdraft: Overdraft) -> (Arc<Ledger>, Arc<MemorySink>, Arc<ManualClock>) {
    let sink = Arc::new(MemorySink::new());
    let clock = Arc::new(ManualClock::new(0));
    let config = LedgerConfig {
        overdraft,
        reservation_ttl_ms: 1_000,
    };
    (
        Arc::new(Ledger::new(config, sink.clone(), clock.clone())),
        sink,
        clock,
    )
}

/// Every account's balances equal the replay of the journal, the running
/// total equals the sum of posted, and reserved equals the sum of the
/// unresolved reservations per bucket.
fn assert_consistent(ledger: &Ledger, sink: &MemorySink) {
    let entries = sink.entries();
    let replayed = replay(&entries);
    let mut reserved: HashMap<(String, Bucket), i64> = HashMap::new();
    for r in ledger.reservations(None) {
        *reserved
            .entry((r.account.clone(), Bucket::Anytime))
            .or_default() += r.anytime_milli;
        *reserved
            .entry((r.account.clone(), Bucket::OffPeak))
            .or_default() += r.offpeak_milli;
    }
    let mut total = 0;
    for name in ledger.account_names() {
        let view = ledger.account(&name).unwrap();
        for b in Bucket::ALL {
            let key = (name.clone(), b);
            assert_eq!(
                replayed.get(&key).copied().unwrap_or_default(),
                view.bucket(b),
                "{name} {b}"
            );
            assert_eq!(
                reserved.get(&key).copied().unwrap_or(0),
                view.bucket(b).reserved_milli,
                "{name} {b}"
            );
            total += view.bucket(b).posted_milli;
        }
    }
    assert_eq!(total, ledger.total_posted_milli());
    let open: Vec<ReservationId> = replay_open_reservations(&entries)
        .iter()
        .map(|r| r.id)
        .collect();
    let live: Vec<ReservationId> = ledger.reservations(None).iter().map(|r| r.id).collect();
    assert_eq!(open, live);
}

// ----- concurrency ----------------------------------------------------------

#[test]
fn contended_reserve_and_settle_never_oversells() {
    const PARTS: i64 = 1000;
    const THREADS: usize = 64;
    const TRIES: usize = 100;
    for _round in 0..20 {
        let (ledger, sink, _) = ledger_with(Overdraft::Strict);
        ledger.open_account("hot", None, Role::User, None).unwrap();
        ledger
            .add("hot", Bucket::Anytime, PARTS * PART_MILLI, None)
            .unwrap();
        let posted = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| {
                    for _ in 0..TRIES {
                        match ledger.reserve(
                            "hot",
                            &[PART_MILLI],
                            BucketPreference::AnytimeOnly,
                            None,
                            None,
                        ) {
                            Ok(id) => {
                                let done = ledger.settle(id, PART_MILLI, None).unwrap();
                                assert_eq!(done.posted_milli, PART_MILLI);
                                posted.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(LedgerError::InsufficientCredit { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                });
            }
        });
        assert_eq!(posted.load(Ordering::Relaxed) as i64, PARTS);
        let hot = ledger.account("hot").unwrap().anytime;
        assert_eq!(
            hot,
            BucketBalance {
                posted_milli: 0,
                reserved_milli: 0
            }
        );
        assert_eq!(hot.available_milli(), 0);
        assert_eq!(ledger.reservation_count(), 0);
        // 1 add + PARTS × (reserve + post); seqs unique and per account
        // (here: globally) recorded in increasing order.
        let entries = sink.entries();
        assert_eq!(entries.len() as i64, 1 + 2 * PARTS);
        assert!(entries.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_consistent(&ledger, &sink);
    }
}

#[test]
fn concurrent_transfers_both_ways_conserve_credit() {
    for _round in 0..5 {
        let (ledger, sink, _) = ledger_with(Overdraft::Strict);
        ledger.open_account("p", None, Role::Admin, None).unwrap();
        ledger
            .open_account("c", Some("p"), Role::User, None)
            .unwrap();
        ledger
            .open_account("d", Some("p"), Role::User, None)
            .unwrap();
        for (n, a, o) in [("p", 500, 300), ("c", 50, 20), ("d", 0, 10)] {
            ledger
                .add(n, Bucket::Anytime, a * PART_MILLI, None)
                .unwrap();
            ledger
                .add(n, Bucket::OffPeak, o * PART_MILLI, None)
                .unwrap();
        }
        let total_before = ledger.total_posted_milli();
        std::thread::scope(|s| {
            for t in 0..8i64 {
                let ledger = &ledger;
                s.spawn(move || {
                    let child = if t % 2 == 0 { "c" } else { "d" };
                    for i in 0..500i64 {
                        let sign = if (i + t) % 2 == 0 { 1 } else { -1 };
                        let a = sign * ((i * 7 + t) % 40) * PART_MILLI;
                        let o = sign * ((i * 3 + t) % 25) * PART_MILLI;
                        match ledger.transfer("p", child, a, o, None) {
                            Ok(out) => {
                                for b in [
                                    out.parent.anytime,
                                    out.parent.offpeak,
                                    out.child.anytime,
                                    out.child.offpeak,
                                ] {
                                    assert!(b.available_milli() >= 0);
                                }
                            }
                            Err(
                                LedgerError::InsufficientCredit { .. }
                                | LedgerError::InvalidAmount(_),
                            ) => {}
                            Err(e) => panic!("{e}"),
                        }
                        // Sends race with the transfers on the child.
                        if let Ok(id) = ledger.reserve(
                            child,
                            &[PART_MILLI],
                            BucketPreference::OffPeakFirst,
                            None,
                            None,
                        ) {
                            ledger.void(id).unwrap();
                        }
                    }
                });
            }
        });
        assert_eq!(ledger.total_posted_milli(), total_before);
        let mut per_bucket = [0i64; 2];
        for n in ["p", "c", "d"] {
            let v = ledger.account(n).unwrap();
            per_bucket[0] += v.anytime.posted_milli;
            per_bucket[1] += v.offpeak.posted_milli;
            assert!(v.anytime.available_milli() >= 0 && v.offpeak.available_milli() >= 0);
        }
        assert_eq!(per_bucket, [550 * PART_MILLI, 330 * PART_MILLI]);
        assert_consistent(&ledger, &sink);
    }
}

// ----- property tests ---------------------------------------------------------

const ACCOUNTS: [&str; 3] = ["p", "c1", "c2"];

#[derive(Debug, Clone)]
enum Op {
    Add {
        account: usize,
        offpeak: bool,
        amount: i64,
    },
    Set {
        account: usize,
        offpeak: bool,
        amount: i64,
    },
    Reserve {
        account: usize,
        shares: Vec<i64>,
        offpeak_first: bool,
    },
    Settle {
        pick: usize,
        permille: i64,
    },
    SettleShares {
        pick: usize,
        flags: Vec<bool>,
    },
    Void {
        pick: usize,
    },
    InDoubt {
        pick: usize,
    },
    Expire {
        advance_ms: i64,
    },
    ResolveInDoubt {
        post: bool,
    },
    Transfer {
        child: usize,
        anytime: i64,
        offpeak: i64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let account = 0..ACCOUNTS.len();
    prop_oneof![
        (account.clone(), any::<bool>(), -5_000i64..20_000).prop_map(
            |(account, offpeak, amount)| Op::Add {
                account,
                offpeak,
                amount
            }
        ),
        (account.clone(), any::<bool>(), -100i64..10_000).prop_map(|(account, offpeak, amount)| {
            Op::Set {
                account,
                offpeak,
                amount,
            }
        }),
        (
            account.clone(),
            prop::collection::vec(0i64..3_000, 0..4),
            any::<bool>()
        )
            .prop_map(|(account, shares, offpeak_first)| Op::Reserve {
                account,
                shares,
                offpeak_first
            }),
        (any::<usize>(), 0i64..=1000).prop_map(|(pick, permille)| Op::Settle { pick, permille }),
        (any::<usize>(), prop::collection::vec(any::<bool>(), 0..4))
            .prop_map(|(pick, flags)| Op::SettleShares { pick, flags }),
        any::<usize>().prop_map(|pick| Op::Void { pick }),
        any::<usize>().prop_map(|pick| Op::InDoubt { pick }),
        (0i64..800).prop_map(|advance_ms| Op::Expire { advance_ms }),
        any::<bool>().prop_map(|post| Op::ResolveInDoubt { post }),
        (1usize..3, -8_000i64..8_000, -8_000i64..8_000).prop_map(|(child, anytime, offpeak)| {
            Op::Transfer {
                child,
                anytime,
                offpeak,
            }
        }),
    ]
}

fn bucket(offpeak: bool) -> Bucket {
    if offpeak {
        Bucket::OffPeak
    } else {
        Bucket::Anytime
    }
}

/// Picks an unresolved reservation, or sometimes an already-resolved id so
/// the exactly-once paths are exercised too.
fn pick(ledger: &Ledger, resolved: &[ReservationId], pick: usize) -> Option<ReservationId> {
    let live = ledger.reservations(None);
    if pick.is_multiple_of(5) && !resolved.is_empty() {
        return Some(resolved[pick / 5 % resolved.len()]);
    }
    (!live.is_empty()).then(|| live[pick % live.len()].id)
}

/// Applies `op`, checking each outcome against what the ledger looked like
/// before it.
fn run(ledger: &Ledger, clock: &ManualClock, resolved: &mut Vec<ReservationId>, op: Op) {
    let strict = ledger.config().overdraft == Overdraft::Strict;
    match op {
        Op::Add {
            account,
            offpeak,
            amount,
        } => {
            let name = ACCOUNTS[account];
            let before = ledger
                .account(name)
                .unwrap()
                .bucket(bucket(offpeak))
                .available_milli();
            let r = ledger.add(name, bucket(offpeak), amount, None);
            assert_eq!(r.is_ok(), amount >= 0 || before + amount >= 0, "{r:?}");
        }
        Op::Set {
            account,
            offpeak,
            amount,
        } => {
            let r = ledger.set(ACCOUNTS[account], bucket(offpeak), amount, None);
            assert_eq!(r.is_ok(), amount >= 0);
            if let Ok(a) = r {
                assert_eq!(a.balance.available_milli(), amount);
            }
        }
        Op::Reserve {
            account,
            shares,
            offpeak_first,
        } => {
            let name = ACCOUNTS[account];
            let v = ledger.account(name).unwrap();
            let pref = if offpeak_first {
                BucketPreference::OffPeakFirst
            } else {
                BucketPreference::AnytimeOnly
            };
            let total: i64 = shares.iter().sum();
            let r = ledger.reserve(name, &shares, pref, None, None);
            if strict {
                let payable = v.anytime.available_milli()
                    + if offpeak_first {
                        v.offpeak.available_milli()
                    } else {
                        0
                    };
                assert_eq!(r.is_ok(), total <= payable, "{r:?}");
            }
            if let Ok(id) = r {
                assert_eq!(ledger.reservation(id).unwrap().total_milli, total);
            }
        }
        Op::Settle { pick: p, permille } => {
            if let Some(id) = pick(ledger, resolved, p) {
                let total = ledger.reservation(id).map(|r| r.total_milli);
                let post = total.unwrap_or(0) * permille / 1000;
                match (ledger.settle(id, post, None), total) {
                    (Ok(s), Some(t)) => {
                        assert_eq!((s.posted_milli, s.voided_milli), (post, t - post));
                        resolved.push(id);
                    }
                    (Err(LedgerError::UnknownReservation(_)), None) => {}
                    other => panic!("{other:?}"),
                }
            }
        }
        Op::SettleShares { pick: p, flags } => {
            if let Some(id) = pick(ledger, resolved, p) {
                let shares = ledger.reservation(id).map(|r| r.shares_milli);
                match (ledger.settle_shares(id, &flags, None), shares) {
                    (Ok(s), Some(sh)) => {
                        let want: i64 = sh
                            .iter()
                            .zip(&flags)
                            .filter(|(_, f)| **f)
                            .map(|(s, _)| s)
                            .sum();
                        assert_eq!(s.posted_milli, want);
                        resolved.push(id);
                    }
                    (Err(LedgerError::InvalidAmount(_)), Some(sh)) => {
                        assert_ne!(sh.len(), flags.len())
                    }
                    (Err(LedgerError::UnknownReservation(_)), None) => {}
                    other => panic!("{other:?}"),
                }
            }
        }
        Op::Void { pick: p } => {
            if let Some(id) = pick(ledger, resolved, p) {
                let live = ledger.reservation(id).is_some();
                assert_eq!(ledger.void(id).is_ok(), live);
                resolved.push(id);
            }
        }
        Op::InDoubt { pick: p } => {
            if let Some(id) = pick(ledger, resolved, p) {
                let live = ledger.reservation(id).is_some();
                assert_eq!(ledger.mark_in_doubt(id).is_ok(), live);
            }
        }
        Op::Expire { advance_ms } => {
            clock.advance(advance_ms);
            let open_before = ledger.reservations(Some(ReservationState::Open)).len();
            let expired = ledger.expire_due();
            assert!(expired.iter().all(|id| ledger.reservation(*id).is_none()));
            assert_eq!(
                ledger.reservations(Some(ReservationState::Open)).len(),
                open_before - expired.len()
            );
            resolved.extend(expired);
        }
        Op::ResolveInDoubt { post } => {
            let done = ledger.resolve_in_doubt_older_than(300, post);
            for (id, s) in done {
                assert_eq!(
                    s.posted_milli == 0,
                    !post || s.voided_milli + s.posted_milli == 0
                );
                resolved.push(id);
            }
        }
        Op::Transfer {
            child,
            anytime,
            offpeak,
        } => {
            let r = ledger.transfer("p", ACCOUNTS[child], anytime, offpeak, None);
            if anytime == 0 && offpeak == 0 {
                assert!(matches!(r, Err(LedgerError::InvalidAmount(_))));
            }
        }
    }
}

fn run_sequence(overdraft: Overdraft, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let (ledger, sink, clock) = ledger_with(overdraft);
    ledger.open_account("p", None, Role::Admin, None).unwrap();
    ledger
        .open_account("c1", Some("p"), Role::User, None)
        .unwrap();
    ledger
        .open_account("c2", Some("p"), Role::User, None)
        .unwrap();
    let mut resolved = Vec::new();
    for op in ops {
        let seen = sink.len();
        run(&ledger, &clock, &mut resolved, op);
        for name in ACCOUNTS {
            let v = ledger.account(name).unwrap();
            for b in Bucket::ALL {
                let bal = v.bucket(b);
                prop_assert!(bal.reserved_milli >= 0);
                if overdraft == Overdraft::Strict {
                    prop_assert!(bal.available_milli() >= 0, "{name} {b} {bal:?}");
                }
            }
        }
        // One operation's entries have consecutive seqs continuing the journal.
        let entries = sink.entries();
        for (i, e) in entries.iter().enumerate().skip(seen) {
            prop_assert_eq!(e.seq, i as u64 + 1);
        }
    }
    assert_consistent(&ledger, &sink);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn strict_keeps_every_bucket_non_negative_and_replay_reproduces_balances(
        ops in prop::collection::vec(op(), 1..80)
    ) {
        run_sequence(Overdraft::Strict, ops)?;
    }

    #[test]
    fn ozeki_replay_reproduces_balances(ops in prop::collection::vec(op(), 1..80)) {
        run_sequence(Overdraft::Ozeki, ops)?;
    }

    #[test]
    fn replay_is_order_independent(ops in prop::collection::vec(op(), 1..40), seed in any::<u64>()) {
        let (ledger, sink, clock) = ledger_with(Overdraft::Strict);
        ledger.open_account("p", None, Role::Admin, None).unwrap();
        ledger.open_account("c1", Some("p"), Role::User, None).unwrap();
        ledger.open_account("c2", Some("p"), Role::User, None).unwrap();
        let mut resolved = Vec::new();
        for op in ops {
            run(&ledger, &clock, &mut resolved, op);
        }
        let entries = sink.entries();
        let mut shuffled = entries.clone();
        // A cheap deterministic shuffle.
        let n = shuffled.len();
        for i in 0..n {
            let j = (seed.wrapping_mul(6364136223846793005).wrapping_add(i as u64) % n as u64) as usize;
            shuffled.swap(i, j);
        }
        prop_assert_eq!(replay(&entries), replay(&shuffled));
    }
}
