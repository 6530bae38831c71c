//! Unit tests of the ledger's public operations, one behaviour each.

use std::sync::Arc;

use super::*;

const C: i64 = 1000; // one credit in milli-credits

struct Fixture {
    ledger: Arc<Ledger>,
    sink: Arc<MemorySink>,
    clock: Arc<ManualClock>,
}

fn fixture_with(overdraft: Overdraft) -> Fixture {
    let sink = Arc::new(MemorySink::new());
    let clock = Arc::new(ManualClock::new(1_000_000));
    let config = LedgerConfig {
        overdraft,
        ..LedgerConfig::default()
    };
    let ledger = Arc::new(Ledger::new(config, sink.clone(), clock.clone()));
    Fixture {
        ledger,
        sink,
        clock,
    }
}

fn fixture() -> Fixture {
    fixture_with(Overdraft::Strict)
}

impl Fixture {
    fn account(&self, name: &str, anytime: i64, offpeak: i64) {
        self.ledger
            .open_account(name, None, Role::User, None)
            .unwrap();
        self.fund(name, anytime, offpeak);
    }

    fn fund(&self, name: &str, anytime: i64, offpeak: i64) {
        if anytime != 0 {
            self.ledger
                .add(name, Bucket::Anytime, anytime, Some("fund"))
                .unwrap();
        }
        if offpeak != 0 {
            self.ledger
                .add(name, Bucket::OffPeak, offpeak, Some("fund"))
                .unwrap();
        }
    }

    fn bucket(&self, name: &str, bucket: Bucket) -> BucketBalance {
        self.ledger.account(name).unwrap().bucket(bucket)
    }

    fn avail(&self, name: &str, bucket: Bucket) -> i64 {
        self.bucket(name, bucket).available_milli()
    }

    /// Entries recorded after the first `skip`.
    fn entries_since(&self, skip: usize) -> Vec<Entry> {
        self.sink.entries().split_off(skip)
    }

    /// Replaying the journal reproduces every account's balances.
    fn assert_replay_matches(&self) {
        let replayed = replay(&self.sink.entries());
        for name in self.ledger.account_names() {
            let view = self.ledger.account(&name).unwrap();
            for b in Bucket::ALL {
                let r = replayed
                    .get(&(name.clone(), b))
                    .copied()
                    .unwrap_or_default();
                assert_eq!(r, view.bucket(b), "{name} {b}");
            }
        }
        let total: i64 = replayed.values().map(|b| b.posted_milli).sum();
        assert_eq!(total, self.ledger.total_posted_milli());
    }
}

fn kinds(entries: &[Entry]) -> Vec<(EntryKind, Bucket, i64)> {
    entries
        .iter()
        .map(|e| (e.kind, e.bucket, e.amount_milli))
        .collect()
}

// ----- names ----------------------------------------------------------------

#[test]
fn enum_names_round_trip() {
    for r in [Role::Admin, Role::User] {
        assert_eq!(Role::parse(r.as_str()), Some(r));
    }
    assert_eq!(Role::parse("root"), None);
    for o in [Overdraft::Strict, Overdraft::Ozeki] {
        assert_eq!(Overdraft::parse(o.as_str()), Some(o));
    }
    assert_eq!(ReservationState::InDoubt.as_str(), "in_doubt");
    assert_eq!(ReservationId(42).to_string(), "42");
    assert_eq!(LedgerConfig::default().reservation_ttl_ms, 300_000);
}

// ----- accounts -------------------------------------------------------------

#[test]
fn open_account_checks_parent_and_duplicates_and_records_nothing() {
    let f = fixture();
    f.ledger
        .open_account("boss", None, Role::Admin, Some("gold"))
        .unwrap();
    f.ledger
        .open_account("kid", Some("boss"), Role::User, None)
        .unwrap();
    assert_eq!(
        f.ledger.open_account("kid", None, Role::User, None),
        Err(LedgerError::AccountExists("kid".into()))
    );
    assert_eq!(
        f.ledger
            .open_account("orphan", Some("nobody"), Role::User, None),
        Err(LedgerError::UnknownAccount("nobody".into()))
    );
    let kid = f.ledger.account("kid").unwrap();
    assert_eq!(kid.parent.as_deref(), Some("boss"));
    assert_eq!(kid.role, Role::User);
    assert_eq!(
        f.ledger.account("boss").unwrap().tariff_class.as_deref(),
        Some("gold")
    );
    assert_eq!(kid.anytime, BucketBalance::default());
    assert!(f.ledger.account("nobody").is_none());
    let mut names = f.ledger.account_names();
    names.sort();
    assert_eq!(names, vec!["boss", "kid"]);
    assert_eq!(f.ledger.len(), 2);
    assert!(!f.ledger.is_empty());
    assert!(f.sink.is_empty());
}

// ----- add / set ------------------------------------------------------------

#[test]
fn add_credits_and_deducts_but_never_below_zero() {
    let f = fixture();
    f.ledger.open_account("a", None, Role::User, None).unwrap();
    let applied = f
        .ledger
        .add("a", Bucket::Anytime, 10 * C, Some("topup"))
        .unwrap();
    assert_eq!(
        applied.balance,
        BucketBalance {
            posted_milli: 10 * C,
            reserved_milli: 0
        }
    );
    let applied2 = f.ledger.add("a", Bucket::Anytime, -4 * C, None).unwrap();
    assert_eq!(applied2.seq, applied.seq + 1);
    assert_eq!(f.avail("a", Bucket::Anytime), 6 * C);
    assert_eq!(
        f.ledger.add("a", Bucket::Anytime, -7 * C, None),
        Err(LedgerError::InsufficientCredit {
            needed_milli: 7 * C,
            available_milli: 6 * C
        })
    );
    assert_eq!(
        f.ledger.add("zz", Bucket::Anytime, C, None),
        Err(LedgerError::UnknownAccount("zz".into()))
    );
    assert_eq!(
        f.ledger.add("a", Bucket::Anytime, i64::MAX, None),
        Err(LedgerError::Overflow)
    );
    let e = f.sink.entries();
    assert_eq!(
        kinds(&e),
        vec![
            (EntryKind::Add, Bucket::Anytime, 10 * C),
            (EntryKind::Add, Bucket::Anytime, -4 * C)
        ]
    );
    assert_eq!(e[0].reference.as_deref(), Some("topup"));
    assert_eq!(e[0].account, "a");
    assert_eq!(e[0].at_unix_ms, 1_000_000);
    assert_eq!(f.ledger.total_posted_milli(), 6 * C);
    f.assert_replay_matches();
}

#[test]
fn add_cannot_deduct_reserved_credit() {
    let f = fixture();
    f.account("a", 10 * C, 0);
    f.ledger
        .reserve("a", &[8 * C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    assert!(matches!(
        f.ledger.add("a", Bucket::Anytime, -3 * C, None),
        Err(LedgerError::InsufficientCredit {
            available_milli: 2000,
            ..
        })
    ));
}

#[test]
fn set_sets_available_and_journals_the_delta_with_reservations_in_flight() {
    let f = fixture();
    f.account("a", 10 * C, 0);
    let id = f
        .ledger
        .reserve("a", &[3 * C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    let before = f.sink.len();
    let applied = f
        .ledger
        .set("a", Bucket::Anytime, 20 * C, Some("admin"))
        .unwrap();
    // posted = new available + reserved
    assert_eq!(
        applied.balance,
        BucketBalance {
            posted_milli: 23 * C,
            reserved_milli: 3 * C
        }
    );
    assert_eq!(
        kinds(&f.entries_since(before)),
        vec![(EntryKind::Set, Bucket::Anytime, 13 * C)]
    );
    // The reservation in flight still settles against the new balance.
    f.ledger.settle(id, 3 * C, None).unwrap();
    assert_eq!(
        f.bucket("a", Bucket::Anytime),
        BucketBalance {
            posted_milli: 20 * C,
            reserved_milli: 0
        }
    );
    // Setting lower is a negative delta; setting to 0 is allowed.
    f.ledger.set("a", Bucket::Anytime, 0, None).unwrap();
    assert_eq!(f.sink.entries().last().unwrap().amount_milli, -20 * C);
    assert!(matches!(
        f.ledger.set("a", Bucket::Anytime, -1, None),
        Err(LedgerError::InvalidAmount(_))
    ));
    assert!(matches!(
        f.ledger.set("b", Bucket::Anytime, 1, None),
        Err(LedgerError::UnknownAccount(_))
    ));
    f.assert_replay_matches();
}

// ----- reserve --------------------------------------------------------------

#[test]
fn reserve_anytime_only_ignores_offpeak() {
    let f = fixture();
    f.account("a", 5 * C, 100 * C);
    let before = f.sink.len();
    let id = f
        .ledger
        .reserve(
            "a",
            &[2 * C, 2 * C],
            BucketPreference::AnytimeOnly,
            Some("req-1"),
            Some("t7"),
        )
        .unwrap();
    let e = f.entries_since(before);
    assert_eq!(
        kinds(&e),
        vec![(EntryKind::Reserve, Bucket::Anytime, 4 * C)]
    );
    assert_eq!(id, ReservationId(e[0].seq));
    assert_eq!(e[0].reservation_id, Some(id.0));
    assert_eq!(e[0].reference.as_deref(), Some("req-1"));
    assert_eq!(e[0].tariff_version.as_deref(), Some("t7"));
    assert_eq!(
        f.bucket("a", Bucket::Anytime),
        BucketBalance {
            posted_milli: 5 * C,
            reserved_milli: 4 * C
        }
    );
    assert_eq!(
        f.ledger
            .reserve("a", &[2 * C], BucketPreference::AnytimeOnly, None, None),
        Err(LedgerError::InsufficientCredit {
            needed_milli: 2 * C,
            available_milli: C
        })
    );
    let v = f.ledger.reservation(id).unwrap();
    assert_eq!(
        (v.anytime_milli, v.offpeak_milli, v.total_milli),
        (4 * C, 0, 4 * C)
    );
    assert_eq!(v.shares_milli, vec![2 * C, 2 * C]);
    assert_eq!(v.state, ReservationState::Open);
    assert_eq!(v.account, "a");
    assert_eq!(v.created_unix_ms, 1_000_000);
}

#[test]
fn reserve_offpeak_first_splits_across_buckets_all_or_nothing() {
    let f = fixture();
    f.account("a", 10 * C, 3 * C);
    let before = f.sink.len();
    let id = f
        .ledger
        .reserve("a", &[5 * C], BucketPreference::OffPeakFirst, None, None)
        .unwrap();
    assert_eq!(
        kinds(&f.entries_since(before)),
        vec![
            (EntryKind::Reserve, Bucket::OffPeak, 3 * C),
            (EntryKind::Reserve, Bucket::Anytime, 2 * C)
        ]
    );
    let v = f.ledger.reservation(id).unwrap();
    assert_eq!((v.offpeak_milli, v.anytime_milli), (3 * C, 2 * C));
    assert_eq!(f.avail("a", Bucket::OffPeak), 0);
    assert_eq!(f.avail("a", Bucket::Anytime), 8 * C);
    // 9 > 0 + 8: refused and nothing moves.
    let before = f.sink.len();
    assert_eq!(
        f.ledger.reserve(
            "a",
            &[4 * C, 5 * C],
            BucketPreference::OffPeakFirst,
            None,
            None
        ),
        Err(LedgerError::InsufficientCredit {
            needed_milli: 9 * C,
            available_milli: 8 * C
        })
    );
    assert_eq!(f.sink.len(), before);
    assert_eq!(f.avail("a", Bucket::Anytime), 8 * C);
    assert_eq!(f.ledger.reservation_count(), 1);
}

#[test]
fn reserve_validates_shares() {
    let f = fixture();
    f.account("a", 10 * C, 0);
    assert!(matches!(
        f.ledger
            .reserve("a", &[C, -1], BucketPreference::AnytimeOnly, None, None),
        Err(LedgerError::InvalidAmount(_))
    ));
    assert_eq!(
        f.ledger.reserve(
            "a",
            &[i64::MAX, 1],
            BucketPreference::AnytimeOnly,
            None,
            None
        ),
        Err(LedgerError::Overflow)
    );
    assert!(matches!(
        f.ledger
            .reserve("b", &[1], BucketPreference::AnytimeOnly, None, None),
        Err(LedgerError::UnknownAccount(_))
    ));
    assert_eq!(f.ledger.reservation_count(), 0);
}

#[test]
fn zero_reservation_is_journaled_and_resolves_once() {
    let f = fixture();
    f.ledger.open_account("a", None, Role::User, None).unwrap();
    let id = f
        .ledger
        .reserve("a", &[], BucketPreference::OffPeakFirst, None, None)
        .unwrap();
    let id2 = f
        .ledger
        .reserve("a", &[0, 0], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    assert_eq!(
        kinds(&f.sink.entries()),
        vec![
            (EntryKind::Reserve, Bucket::Anytime, 0),
            (EntryKind::Reserve, Bucket::Anytime, 0)
        ]
    );
    let before = f.sink.len();
    assert_eq!(f.ledger.settle(id, 0, None).unwrap().posted_milli, 0);
    assert_eq!(
        f.ledger
            .settle_shares(id2, &[true, false], None)
            .unwrap()
            .voided_milli,
        0
    );
    assert_eq!(
        kinds(&f.entries_since(before)),
        vec![
            (EntryKind::Void, Bucket::Anytime, 0),
            (EntryKind::Void, Bucket::Anytime, 0)
        ]
    );
    assert_eq!(f.ledger.void(id), Err(LedgerError::UnknownReservation(id)));
    f.assert_replay_matches();
}

// ----- settle / void ----------------------------------------------------------

#[test]
fn settle_posts_offpeak_first_and_voids_the_rest_exactly_once() {
    let f = fixture();
    f.account("a", 10 * C, 3 * C);
    let id = f
        .ledger
        .reserve(
            "a",
            &[2 * C, 2 * C, C],
            BucketPreference::OffPeakFirst,
            Some("req"),
            Some("v1"),
        )
        .unwrap();
    let before = f.sink.len();
    let s = f.ledger.settle(id, 4 * C, Some("msgid")).unwrap();
    assert_eq!((s.posted_milli, s.voided_milli), (4 * C, C));
    let e = f.entries_since(before);
    assert_eq!(
        kinds(&e),
        vec![
            (EntryKind::Post, Bucket::OffPeak, -3 * C),
            (EntryKind::Post, Bucket::Anytime, -C),
            (EntryKind::Void, Bucket::Anytime, -C),
        ]
    );
    assert_eq!(s.seq, e.last().unwrap().seq);
    assert!(e.iter().all(|x| x.reservation_id == Some(id.0)));
    assert_eq!(e[0].reference.as_deref(), Some("msgid"));
    assert_eq!(e[0].tariff_version.as_deref(), Some("v1"));
    assert_eq!(
        f.bucket("a", Bucket::OffPeak),
        BucketBalance {
            posted_milli: 0,
            reserved_milli: 0
        }
    );
    assert_eq!(
        f.bucket("a", Bucket::Anytime),
        BucketBalance {
            posted_milli: 9 * C,
            reserved_milli: 0
        }
    );
    assert_eq!(
        f.ledger.settle(id, 0, None),
        Err(LedgerError::UnknownReservation(id))
    );
    assert_eq!(f.ledger.void(id), Err(LedgerError::UnknownReservation(id)));
    assert_eq!(
        f.ledger.mark_in_doubt(id),
        Err(LedgerError::UnknownReservation(id))
    );
    assert!(f.ledger.reservation(id).is_none());
    assert_eq!(f.ledger.total_posted_milli(), 9 * C);
    f.assert_replay_matches();
}

#[test]
fn settle_rejects_out_of_range_posts_and_leaves_the_reservation_open() {
    let f = fixture();
    f.account("a", 10 * C, 0);
    let id = f
        .ledger
        .reserve("a", &[2 * C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    let before = f.sink.len();
    assert!(matches!(
        f.ledger.settle(id, 2 * C + 1, None),
        Err(LedgerError::InvalidAmount(_))
    ));
    assert!(matches!(
        f.ledger.settle(id, -1, None),
        Err(LedgerError::InvalidAmount(_))
    ));
    assert_eq!(f.sink.len(), before);
    assert!(f.ledger.reservation(id).is_some());
    // The reference falls back to the reservation's own.
    let id2 = f
        .ledger
        .reserve(
            "a",
            &[C],
            BucketPreference::AnytimeOnly,
            Some("req-2"),
            None,
        )
        .unwrap();
    f.ledger.void(id2).unwrap();
    assert_eq!(
        f.sink.entries().last().unwrap().reference.as_deref(),
        Some("req-2")
    );
    assert_eq!(
        f.ledger.settle(id, 2 * C, None).unwrap().posted_milli,
        2 * C
    );
    assert_eq!(f.avail("a", Bucket::Anytime), 8 * C);
    let unknown = ReservationId(999_999);
    assert_eq!(
        f.ledger.settle(unknown, 0, None),
        Err(LedgerError::UnknownReservation(unknown))
    );
}

#[test]
fn settle_shares_posts_accepted_shares() {
    let f = fixture();
    f.account("a", 10 * C, 0);
    let id = f
        .ledger
        .reserve(
            "a",
            &[C, 2 * C, 3 * C],
            BucketPreference::AnytimeOnly,
            None,
            None,
        )
        .unwrap();
    assert!(matches!(
        f.ledger.settle_shares(id, &[true], None),
        Err(LedgerError::InvalidAmount(_))
    ));
    let s = f
        .ledger
        .settle_shares(id, &[true, false, true], None)
        .unwrap();
    assert_eq!((s.posted_milli, s.voided_milli), (4 * C, 2 * C));
    assert_eq!(
        f.bucket("a", Bucket::Anytime),
        BucketBalance {
            posted_milli: 6 * C,
            reserved_milli: 0
        }
    );
    assert_eq!(
        f.ledger.settle_shares(id, &[true, true, true], None),
        Err(LedgerError::UnknownReservation(id))
    );
    f.assert_replay_matches();
}

#[test]
fn void_returns_everything() {
    let f = fixture();
    f.account("a", 10 * C, 4 * C);
    let id = f
        .ledger
        .reserve("a", &[6 * C], BucketPreference::OffPeakFirst, None, None)
        .unwrap();
    let before = f.sink.len();
    let s = f.ledger.void(id).unwrap();
    assert_eq!((s.posted_milli, s.voided_milli), (0, 6 * C));
    assert_eq!(
        kinds(&f.entries_since(before)),
        vec![
            (EntryKind::Void, Bucket::OffPeak, -4 * C),
            (EntryKind::Void, Bucket::Anytime, -2 * C)
        ]
    );
    assert_eq!(f.avail("a", Bucket::Anytime), 10 * C);
    assert_eq!(f.avail("a", Bucket::OffPeak), 4 * C);
    f.assert_replay_matches();
}

#[test]
fn racing_resolutions_resolve_exactly_once() {
    for _ in 0..50 {
        let f = fixture();
        f.account("a", 100 * C, 0);
        let id = f
            .ledger
            .reserve("a", &[10 * C], BucketPreference::AnytimeOnly, None, None)
            .unwrap();
        f.clock
            .advance(LedgerConfig::default().reservation_ttl_ms + 1);
        let wins: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let l = &f.ledger;
                    s.spawn(move || match i {
                        0 => l.settle(id, 10 * C, None).is_ok(),
                        1 => l.void(id).is_ok(),
                        2 => l.expire_due().contains(&id),
                        _ => l.settle_shares(id, &[true], None).is_ok(),
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().unwrap()))
                .sum()
        });
        assert_eq!(wins, 1);
        assert_eq!(f.bucket("a", Bucket::Anytime).reserved_milli, 0);
        f.assert_replay_matches();
    }
}

// ----- guard ----------------------------------------------------------------

#[test]
fn guard_voids_on_drop() {
    let f = fixture();
    f.account("a", 10 * C, 0);
    let id = f
        .ledger
        .reserve("a", &[4 * C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    {
        let g = ReservationGuard::new(f.ledger.clone(), id);
        assert_eq!(g.id(), id);
        assert_eq!(f.avail("a", Bucket::Anytime), 6 * C);
    }
    assert!(f.ledger.reservation(id).is_none());
    assert_eq!(f.avail("a", Bucket::Anytime), 10 * C);
    assert_eq!(f.sink.entries().last().unwrap().kind, EntryKind::Void);
}

#[test]
fn guard_dropped_while_forwarding_goes_in_doubt_not_void() {
    let f = fixture();
    f.account("a", 10 * C, 0);
    let id = f
        .ledger
        .reserve("a", &[4 * C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    {
        let mut g = ReservationGuard::new(f.ledger.clone(), id);
        g.forwarding();
    }
    let r = f.ledger.reservation(id).expect("still reserved");
    assert_eq!(r.state, ReservationState::InDoubt);
    assert_eq!(f.avail("a", Bucket::Anytime), 6 * C);
    // A guard that settles while forwarding resolves normally.
    let id = f
        .ledger
        .reserve("a", &[C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    let mut g = ReservationGuard::new(f.ledger.clone(), id);
    g.forwarding();
    g.settle(C, None).unwrap();
    assert!(f.ledger.reservation(id).is_none());
    f.assert_replay_matches();
}

#[test]
fn guard_settle_disarms_and_a_failed_settle_still_voids() {
    let f = fixture();
    f.account("a", 10 * C, 0);
    let id = f
        .ledger
        .reserve("a", &[C, C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    let s = ReservationGuard::new(f.ledger.clone(), id)
        .settle_shares(&[true, false], None)
        .unwrap();
    assert_eq!(s.posted_milli, C);
    assert_eq!(
        f.bucket("a", Bucket::Anytime),
        BucketBalance {
            posted_milli: 9 * C,
            reserved_milli: 0
        }
    );
    let n = f.sink.len();

    let id = f
        .ledger
        .reserve("a", &[C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    ReservationGuard::new(f.ledger.clone(), id)
        .settle(C, None)
        .unwrap();
    assert_eq!(f.avail("a", Bucket::Anytime), 8 * C);
    assert_eq!(f.sink.len(), n + 2); // reserve + post, no extra void

    let id = f
        .ledger
        .reserve("a", &[C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    let err = ReservationGuard::new(f.ledger.clone(), id).settle_shares(&[true, true], None);
    assert!(matches!(err, Err(LedgerError::InvalidAmount(_))));
    assert!(
        f.ledger.reservation(id).is_none(),
        "a consumed guard whose settle failed voids"
    );
    assert_eq!(f.avail("a", Bucket::Anytime), 8 * C);

    let id = f
        .ledger
        .reserve("a", &[C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    ReservationGuard::new(f.ledger.clone(), id).void().unwrap();
    assert_eq!(f.avail("a", Bucket::Anytime), 8 * C);
    f.assert_replay_matches();
}

#[test]
fn guard_into_in_doubt_keeps_the_credit_reserved() {
    let f = fixture();
    f.account("a", 10 * C, 0);
    let id = f
        .ledger
        .reserve("a", &[3 * C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    f.clock.advance(5);
    ReservationGuard::new(f.ledger.clone(), id)
        .into_in_doubt()
        .unwrap();
    let v = f.ledger.reservation(id).unwrap();
    assert_eq!(v.state, ReservationState::InDoubt);
    assert_eq!(v.in_doubt_since_unix_ms, Some(1_000_005));
    assert_eq!(f.avail("a", Bucket::Anytime), 7 * C);
    assert_eq!(
        f.ledger.reservations(Some(ReservationState::InDoubt)).len(),
        1
    );
    assert!(f
        .ledger
        .reservations(Some(ReservationState::Open))
        .is_empty());
    // Marking twice keeps the first time.
    f.clock.advance(5);
    f.ledger.mark_in_doubt(id).unwrap();
    assert_eq!(
        f.ledger.reservation(id).unwrap().in_doubt_since_unix_ms,
        Some(1_000_005)
    );
}

#[test]
fn guard_drop_after_the_sweep_resolved_it_is_harmless() {
    let f = fixture();
    f.account("a", 10 * C, 0);
    let id = f
        .ledger
        .reserve("a", &[3 * C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    let g = ReservationGuard::new(f.ledger.clone(), id);
    f.clock
        .advance(LedgerConfig::default().reservation_ttl_ms + 1);
    assert_eq!(f.ledger.expire_due(), vec![id]);
    drop(g);
    assert_eq!(f.avail("a", Bucket::Anytime), 10 * C);
    assert_eq!(f.sink.entries().last().unwrap().kind, EntryKind::Expire);
    f.assert_replay_matches();
}

// ----- sweeps ---------------------------------------------------------------

#[test]
fn expire_due_returns_forgotten_open_reservations_only() {
    let f = fixture();
    f.account("a", 10 * C, 2 * C);
    let old = f
        .ledger
        .reserve("a", &[3 * C], BucketPreference::OffPeakFirst, None, None)
        .unwrap();
    let doubtful = f
        .ledger
        .reserve("a", &[C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    f.ledger.mark_in_doubt(doubtful).unwrap();
    f.clock.advance(200_000);
    let young = f
        .ledger
        .reserve("a", &[C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    f.clock.advance(100_000); // old is exactly at the TTL: not yet older than it
    assert!(f.ledger.expire_due().is_empty());
    f.clock.advance(1);
    let before = f.sink.len();
    assert_eq!(f.ledger.expire_due(), vec![old]);
    assert_eq!(
        kinds(&f.entries_since(before)),
        vec![
            (EntryKind::Expire, Bucket::OffPeak, -2 * C),
            (EntryKind::Expire, Bucket::Anytime, -C)
        ]
    );
    assert!(f.ledger.reservation(young).is_some());
    assert!(f.ledger.reservation(doubtful).is_some());
    f.clock.advance(1_000_000);
    assert_eq!(f.ledger.expire_due(), vec![young]);
    assert!(
        f.ledger.reservation(doubtful).is_some(),
        "in doubt never expires"
    );
    assert_eq!(f.avail("a", Bucket::Anytime), 9 * C);
    assert_eq!(f.avail("a", Bucket::OffPeak), 2 * C);
    f.assert_replay_matches();
}

#[test]
fn in_doubt_policy_sweep_posts_or_voids_by_age() {
    let f = fixture();
    f.account("a", 10 * C, 0);
    let a = f
        .ledger
        .reserve("a", &[2 * C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    let b = f
        .ledger
        .reserve("a", &[3 * C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    let open = f
        .ledger
        .reserve("a", &[C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    f.ledger.mark_in_doubt(a).unwrap();
    f.clock.advance(10_000);
    f.ledger.mark_in_doubt(b).unwrap();
    f.clock.advance(10_000);
    // a is 20 s in doubt, b 10 s.
    let posted = f.ledger.resolve_in_doubt_older_than(15_000, true);
    assert_eq!(posted.len(), 1);
    assert_eq!(posted[0].0, a);
    assert_eq!(
        (posted[0].1.posted_milli, posted[0].1.voided_milli),
        (2 * C, 0)
    );
    let voided = f.ledger.resolve_in_doubt_older_than(5_000, false);
    assert_eq!(voided.len(), 1);
    assert_eq!(voided[0].0, b);
    assert_eq!(
        (voided[0].1.posted_milli, voided[0].1.voided_milli),
        (0, 3 * C)
    );
    assert!(
        f.ledger.resolve_in_doubt_older_than(0, true).is_empty(),
        "open ones are not in doubt"
    );
    assert!(f.ledger.reservation(open).is_some());
    assert_eq!(
        f.bucket("a", Bucket::Anytime),
        BucketBalance {
            posted_milli: 8 * C,
            reserved_milli: C
        }
    );
    f.assert_replay_matches();
}

// ----- overdraft --------------------------------------------------------------

#[test]
fn ozeki_overdraft_allows_a_send_while_positive_and_goes_negative_by_its_cost() {
    let f = fixture_with(Overdraft::Ozeki);
    f.account("a", C, 0);
    let id = f
        .ledger
        .reserve("a", &[3 * C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    assert_eq!(f.avail("a", Bucket::Anytime), -2 * C);
    assert_eq!(
        f.ledger
            .reserve("a", &[1], BucketPreference::AnytimeOnly, None, None),
        Err(LedgerError::InsufficientCredit {
            needed_milli: 1,
            available_milli: -2 * C
        })
    );
    f.ledger.settle(id, 3 * C, None).unwrap();
    assert_eq!(
        f.bucket("a", Bucket::Anytime),
        BucketBalance {
            posted_milli: -2 * C,
            reserved_milli: 0
        }
    );
    // Deductions stay strict; top-ups are always allowed, even if still negative.
    assert!(matches!(
        f.ledger.add("a", Bucket::Anytime, -1, None),
        Err(LedgerError::InsufficientCredit { .. })
    ));
    f.ledger.add("a", Bucket::Anytime, C, None).unwrap();
    assert_eq!(f.avail("a", Bucket::Anytime), -C);
    // At exactly 0 a send is refused; a free send is not.
    f.ledger.add("a", Bucket::Anytime, C, None).unwrap();
    assert!(matches!(
        f.ledger
            .reserve("a", &[1], BucketPreference::AnytimeOnly, None, None),
        Err(LedgerError::InsufficientCredit { .. })
    ));
    let free = f
        .ledger
        .reserve("a", &[0], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    f.ledger.settle(free, 0, None).unwrap();
    // Off-peak credit counts towards "positive"; the excess lands on anytime.
    f.ledger.add("a", Bucket::OffPeak, C, None).unwrap();
    let id = f
        .ledger
        .reserve("a", &[5 * C], BucketPreference::OffPeakFirst, None, None)
        .unwrap();
    let v = f.ledger.reservation(id).unwrap();
    assert_eq!((v.offpeak_milli, v.anytime_milli), (C, 4 * C));
    assert_eq!(f.avail("a", Bucket::OffPeak), 0);
    assert_eq!(f.avail("a", Bucket::Anytime), -4 * C);
    f.assert_replay_matches();
}

#[test]
fn strict_refuses_what_ozeki_allows() {
    let f = fixture();
    f.account("a", C, C);
    assert!(matches!(
        f.ledger
            .reserve("a", &[3 * C], BucketPreference::OffPeakFirst, None, None),
        Err(LedgerError::InsufficientCredit {
            needed_milli: 3000,
            available_milli: 2000
        })
    ));
    f.ledger
        .reserve("a", &[2 * C], BucketPreference::OffPeakFirst, None, None)
        .unwrap();
    assert_eq!(f.avail("a", Bucket::Anytime), 0);
    assert_eq!(f.avail("a", Bucket::OffPeak), 0);
}

// ----- transfer -------------------------------------------------------------

fn family() -> Fixture {
    let f = fixture();
    f.ledger.open_account("p", None, Role::Admin, None).unwrap();
    f.ledger
        .open_account("c", Some("p"), Role::User, None)
        .unwrap();
    f.ledger
        .open_account("other", None, Role::User, None)
        .unwrap();
    f.fund("p", 10 * C, 5 * C);
    f.fund("c", C, 0);
    f
}

#[test]
fn transfer_moves_both_buckets_both_ways() {
    let f = family();
    let before = f.sink.len();
    let out = f
        .ledger
        .transfer("p", "c", 4 * C, 2 * C, Some("soap"))
        .unwrap();
    assert_eq!(out.parent.anytime.available_milli(), 6 * C);
    assert_eq!(out.parent.offpeak.available_milli(), 3 * C);
    assert_eq!(out.child.anytime.available_milli(), 5 * C);
    assert_eq!(out.child.offpeak.available_milli(), 2 * C);
    let e = f.entries_since(before);
    assert_eq!(
        kinds(&e),
        vec![
            (EntryKind::Transfer, Bucket::Anytime, -4 * C),
            (EntryKind::Transfer, Bucket::Anytime, 4 * C),
            (EntryKind::Transfer, Bucket::OffPeak, -2 * C),
            (EntryKind::Transfer, Bucket::OffPeak, 2 * C),
        ]
    );
    assert_eq!(
        e.iter().map(|x| x.account.as_str()).collect::<Vec<_>>(),
        vec!["p", "c", "p", "c"]
    );
    assert_eq!(out.seq, e[3].seq);
    // Back again, anytime only: zero legs are skipped.
    let before = f.sink.len();
    let out = f.ledger.transfer("p", "c", -5 * C, 0, None).unwrap();
    assert_eq!(out.parent.anytime.available_milli(), 11 * C);
    assert_eq!(out.child.anytime.available_milli(), 0);
    assert_eq!(kinds(&f.entries_since(before)).len(), 2);
    assert_eq!(f.ledger.total_posted_milli(), 16 * C);
    f.assert_replay_matches();
}

#[test]
fn transfer_fails_as_a_whole() {
    let f = family();
    let before = f.sink.len();
    // Anytime would be fine, offpeak is short.
    assert_eq!(
        f.ledger.transfer("p", "c", 4 * C, 6 * C, None),
        Err(LedgerError::InsufficientCredit {
            needed_milli: 6 * C,
            available_milli: 5 * C
        })
    );
    // The child cannot give back more than it has.
    assert!(matches!(
        f.ledger.transfer("p", "c", -2 * C, 0, None),
        Err(LedgerError::InsufficientCredit {
            needed_milli: 2000,
            available_milli: 1000
        })
    ));
    // Reserved credit cannot be transferred.
    f.ledger
        .reserve("p", &[8 * C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    assert!(matches!(
        f.ledger.transfer("p", "c", 3 * C, 0, None),
        Err(LedgerError::InsufficientCredit { .. })
    ));
    assert_eq!(f.sink.len(), before + 1);
    assert_eq!(f.avail("p", Bucket::OffPeak), 5 * C);
    assert_eq!(f.avail("c", Bucket::Anytime), C);
    assert!(matches!(
        f.ledger.transfer("p", "c", 0, 0, None),
        Err(LedgerError::InvalidAmount(_))
    ));
    assert_eq!(
        f.ledger.transfer("p", "c", i64::MIN, 0, None),
        Err(LedgerError::Overflow)
    );
}

#[test]
fn transfer_requires_a_subaccount() {
    let f = family();
    let not = |p: &str, c: &str| LedgerError::NotASubaccount {
        parent: p.into(),
        child: c.into(),
    };
    assert_eq!(
        f.ledger.transfer("p", "other", C, 0, None),
        Err(not("p", "other"))
    );
    assert_eq!(f.ledger.transfer("c", "p", C, 0, None), Err(not("c", "p")));
    assert_eq!(f.ledger.transfer("p", "p", C, 0, None), Err(not("p", "p")));
    assert_eq!(
        f.ledger.transfer("p", "ghost", C, 0, None),
        Err(LedgerError::UnknownAccount("ghost".into()))
    );
}

// ----- restore --------------------------------------------------------------

#[test]
fn restore_rebuilds_a_ledger_from_its_journal() {
    let f = family();
    let settled = f
        .ledger
        .reserve("c", &[C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    f.ledger.settle(settled, C, None).unwrap();
    let open = f
        .ledger
        .reserve(
            "p",
            &[2 * C, C],
            BucketPreference::OffPeakFirst,
            Some("req"),
            Some("v9"),
        )
        .unwrap();
    f.ledger.transfer("p", "c", C, C, None).unwrap();
    let journal = f.sink.entries();
    let last_seq = journal.iter().map(|e| e.seq).max().unwrap();

    let g = fixture();
    let balances = replay(&journal);
    let mut views: Vec<AccountView> = f
        .ledger
        .account_names()
        .iter()
        .map(|n| f.ledger.account(n).unwrap())
        .collect();
    views.sort_by_key(|v| v.parent.is_some()); // parents first
    for v in views {
        let b = |bucket| {
            balances
                .get(&(v.name.clone(), bucket))
                .copied()
                .unwrap_or_default()
        };
        g.ledger.restore_account(AccountView {
            anytime: b(Bucket::Anytime),
            offpeak: b(Bucket::OffPeak),
            ..v
        });
    }
    for r in replay_open_reservations(&journal) {
        g.ledger.restore_reservation(r);
    }
    g.ledger.set_next_seq(last_seq + 1);
    for n in f.ledger.account_names() {
        assert_eq!(g.ledger.account(&n), f.ledger.account(&n));
    }
    assert_eq!(g.ledger.total_posted_milli(), f.ledger.total_posted_milli());
    let restored = g.ledger.reservation(open).unwrap();
    assert_eq!(restored.state, ReservationState::InDoubt);
    assert_eq!(restored.in_doubt_since_unix_ms, Some(1_000_000));
    assert_eq!(
        (
            restored.offpeak_milli,
            restored.anytime_milli,
            restored.total_milli
        ),
        (3 * C, 0, 3 * C)
    );
    assert_eq!(restored.reference.as_deref(), Some("req"));
    assert_eq!(restored.tariff_version.as_deref(), Some("v9"));
    assert!(g.ledger.reservation(settled).is_none());
    // Numbering continues, and the restored reservation settles normally.
    let s = g.ledger.settle(open, 3 * C, None).unwrap();
    assert_eq!(s.seq, last_seq + 1);
    assert_eq!(
        g.ledger.account("p").unwrap().offpeak,
        BucketBalance {
            posted_milli: C,
            reserved_milli: 0
        }
    );
}

#[test]
fn restore_reservation_normalises_shares_and_keeps_ids_unique() {
    let f = fixture();
    f.account("a", 10 * C, 0);
    f.ledger.restore_reservation(ReservationView {
        id: ReservationId(500),
        account: "a".into(),
        state: ReservationState::Open,
        anytime_milli: 3 * C,
        offpeak_milli: 0,
        total_milli: 3 * C,
        shares_milli: vec![C, C], // does not sum to the total
        reference: None,
        tariff_version: None,
        created_unix_ms: 1,
        in_doubt_since_unix_ms: Some(7),
    });
    let v = f.ledger.reservation(ReservationId(500)).unwrap();
    assert_eq!(v.shares_milli, vec![3 * C]);
    assert_eq!(v.in_doubt_since_unix_ms, Some(7));
    assert!(f.ledger.next_seq() > 500);
    f.ledger.set_next_seq(10); // never backwards
    assert!(f.ledger.next_seq() > 500);
    let id = f
        .ledger
        .reserve("a", &[C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    assert!(id.0 > 500);
}

#[test]
fn restore_needs_no_parent_first_and_overwrites_an_existing_account() {
    let f = fixture();
    let view = |name: &str, parent: Option<&str>, role, class: Option<&str>, posted| AccountView {
        name: name.into(),
        parent: parent.map(Into::into),
        role,
        tariff_class: class.map(Into::into),
        anytime: BucketBalance {
            posted_milli: posted,
            reserved_milli: C,
        },
        offpeak: BucketBalance {
            posted_milli: posted / 2,
            reserved_milli: 0,
        },
    };
    // A child before its parent, in one batch of ready accounts.
    let child = view("kid", Some("boss"), Role::User, Some("gold"), 10 * C);
    let parent = view("boss", None, Role::Admin, None, 4 * C);
    let plain = view("plain", None, Role::User, None, 2 * C);
    f.ledger.restore_ready(
        [child.clone(), parent.clone(), plain.clone()]
            .into_iter()
            .map(ReadyAccount::from),
    );
    assert_eq!(ReadyAccount::from(plain.clone()).name(), "plain");
    for v in [&child, &parent, &plain] {
        assert_eq!(f.ledger.account(&v.name).as_ref(), Some(v));
    }
    assert_eq!(f.ledger.total_posted_milli(), 24 * C);
    assert!(f.sink.entries().is_empty(), "a restore records nothing");
    // The restored relationship works.
    f.ledger.transfer("boss", "kid", C, 0, None).unwrap();
    assert_eq!(f.ledger.total_posted_milli(), 24 * C);
    // Restoring an existing account replaces all of it, the running total
    // follows.
    let again = view("kid", None, Role::Admin, None, 2 * C);
    f.ledger.restore_account(again.clone());
    assert_eq!(f.ledger.account("kid"), Some(again));
    assert_eq!(f.ledger.len(), 3);
    // boss 3 + 2 (after the transfer), plain 2 + 1, kid 2 + 1.
    assert_eq!(f.ledger.total_posted_milli(), 11 * C);
}

#[test]
fn a_reservation_restored_before_its_account_resolves_once_the_account_exists() {
    let f = fixture();
    let restore = |id: u64, account: &str| {
        f.ledger.restore_reservation(ReservationView {
            id: ReservationId(id),
            account: account.into(),
            state: ReservationState::Open,
            anytime_milli: C,
            offpeak_milli: 0,
            total_milli: C,
            shares_milli: vec![C],
            reference: None,
            tariff_version: None,
            created_unix_ms: 1,
            in_doubt_since_unix_ms: None,
        })
    };
    restore(10, "late");
    restore(11, "never");
    assert_eq!(
        f.ledger.reservation(ReservationId(10)).unwrap().account,
        "late"
    );
    assert_eq!(
        f.ledger.void(ReservationId(11)),
        Err(LedgerError::UnknownAccount("never".into()))
    );
    f.ledger.restore_account(AccountView {
        name: "late".into(),
        parent: None,
        role: Role::User,
        tariff_class: None,
        anytime: BucketBalance {
            posted_milli: 5 * C,
            reserved_milli: C,
        },
        offpeak: BucketBalance::default(),
    });
    let s = f.ledger.settle(ReservationId(10), C, None).unwrap();
    assert_eq!(s.posted_milli, C);
    assert_eq!(f.avail("late", Bucket::Anytime), 4 * C);
    assert!(f.ledger.reservation(ReservationId(11)).is_some());
}

#[test]
fn an_account_opens_with_its_balance_in_one_operation_exactly_once() {
    let f = fixture();
    f.ledger
        .open_account_with_balance(
            "new",
            None,
            Role::User,
            None,
            Bucket::Anytime,
            12 * C,
            Some("adopt"),
        )
        .unwrap();
    assert_eq!(f.avail("new", Bucket::Anytime), 12 * C);
    let entries = f.sink.entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        (
            entries[0].kind,
            entries[0].amount_milli,
            entries[0].reference.as_deref()
        ),
        (EntryKind::Add, 12 * C, Some("adopt"))
    );
    // A second opening (a retry) changes nothing.
    assert!(matches!(
        f.ledger.open_account_with_balance(
            "new",
            None,
            Role::User,
            None,
            Bucket::Anytime,
            12 * C,
            None
        ),
        Err(LedgerError::AccountExists(_))
    ));
    assert_eq!(f.avail("new", Bucket::Anytime), 12 * C);
    assert_eq!(f.sink.len(), 1);
    // Zero records nothing; a negative opening is refused.
    f.ledger
        .open_account_with_balance("zero", None, Role::User, None, Bucket::OffPeak, 0, None)
        .unwrap();
    assert_eq!(f.sink.len(), 1);
    assert!(f
        .ledger
        .open_account_with_balance("neg", None, Role::User, None, Bucket::Anytime, -1, None)
        .is_err());
    assert!(f.ledger.account("neg").is_none());
    assert_eq!(f.ledger.total_posted_milli(), 12 * C);
}

#[test]
fn a_refund_gives_a_posted_share_back_to_the_bucket_that_paid() {
    let f = fixture();
    f.account("a", 10 * C, 2 * C);
    let id = f
        .ledger
        .reserve("a", &[3 * C, C], BucketPreference::OffPeakFirst, None, None)
        .unwrap();
    let s = f.ledger.settle_shares(id, &[true, true], None).unwrap();
    // Posts take offpeak first: 2 credits offpeak, 2 anytime.
    assert_eq!((s.posted_milli, s.posted_offpeak_milli), (4 * C, 2 * C));
    f.ledger.refund("a", id, 1, None, 0, C).unwrap();
    assert_eq!(f.avail("a", Bucket::Anytime), 9 * C);
    assert_eq!(f.avail("a", Bucket::OffPeak), 0);
    let entries = f.sink.entries();
    let last = entries.last().unwrap();
    assert_eq!(last.kind, EntryKind::Refund);
    assert_eq!(last.reservation_id, Some(id.0));
    assert_eq!(last.reference.as_deref(), Some("share:1"));
    assert_eq!(parse_refund_reference("share:1"), Some(1));
    assert_eq!(parse_refund_reference("share:"), None);
    assert_eq!(refund_reference(2, Some(&[1, 3])), "share:2/part:1+3");
    assert_eq!(parse_refund_reference("share:2/part:1+3"), Some(2));
    assert_eq!(parse_refund_reference("share:2/part:"), None);
    assert_eq!(parse_refund_reference("share:2/x"), None);
    // Replay reproduces the balances, refunds included.
    let replayed = replay(&entries);
    assert_eq!(
        replayed[&("a".to_string(), Bucket::Anytime)],
        f.bucket("a", Bucket::Anytime)
    );
    assert!(replay_open_reservations(&entries).is_empty());
    assert!(matches!(
        f.ledger.refund("a", id, 0, None, -1, 0),
        Err(LedgerError::InvalidAmount(_))
    ));
}

// ----- delivery holds (charge_on: delivery) ------------------------------

#[test]
fn hold_for_delivery_voids_rejected_shares_and_holds_each_part() {
    let f = fixture();
    f.account("a", 10 * C, 3 * C);
    let id = f
        .ledger
        .reserve(
            "a",
            &[2 * C, 3 * C, 4 * C],
            BucketPreference::OffPeakFirst,
            Some("req"),
            Some("t1"),
        )
        .unwrap();
    let before = f.sink.len();
    let held = f
        .ledger
        .hold_for_delivery(id, &[vec![C, C], vec![], vec![4 * C]], None)
        .unwrap();
    assert_eq!((held.held_milli, held.voided_milli), (6 * C, 3 * C));
    assert_eq!(held.holds[0].len(), 2);
    assert!(held.holds[1].is_empty());
    assert_eq!(held.holds[2].len(), 1);
    // Nothing charged, the accepted shares still reserved, offpeak first.
    let off = f.bucket("a", Bucket::OffPeak);
    let any = f.bucket("a", Bucket::Anytime);
    assert_eq!((off.posted_milli, off.reserved_milli), (3 * C, 3 * C));
    assert_eq!((any.posted_milli, any.reserved_milli), (10 * C, 3 * C));
    assert!(
        f.ledger.reservation(id).is_none(),
        "the send's reservation resolved"
    );
    for h in held.holds.iter().flatten() {
        let r = f.ledger.reservation(*h).unwrap();
        assert_eq!(r.state, ReservationState::Delivery);
        assert!(r
            .reference
            .unwrap()
            .starts_with(&format!("delivery:{}/share:", id.0)));
    }
    // Each hold resolves once: post, void, and a second try is refused.
    f.ledger.post_whole(held.holds[0][0], None).unwrap();
    f.ledger.void(held.holds[0][1]).unwrap();
    f.ledger.post_whole(held.holds[2][0], None).unwrap();
    assert!(matches!(
        f.ledger.void(held.holds[2][0]),
        Err(LedgerError::UnknownReservation(_))
    ));
    assert_eq!(f.ledger.reservation_count(), 0);
    let a = f.ledger.account("a").unwrap();
    assert_eq!(a.anytime.reserved_milli + a.offpeak.reserved_milli, 0);
    assert_eq!(
        a.anytime.posted_milli + a.offpeak.posted_milli,
        13 * C - 5 * C
    );
    // The journal replays to the balances and leaves nothing open.
    let entries = f.sink.entries();
    let r = replay(&entries);
    assert_eq!(r[&("a".to_string(), Bucket::Anytime)], a.anytime);
    assert_eq!(r[&("a".to_string(), Bucket::OffPeak)], a.offpeak);
    assert!(replay_open_reservations(&entries).is_empty());
    assert!(f.sink.len() > before);
}

#[test]
fn delivery_holds_are_never_expired_nor_taken_by_the_in_doubt_policy() {
    let f = fixture();
    f.account("a", 10 * C, 0);
    let id = f
        .ledger
        .reserve("a", &[2 * C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    let held = f
        .ledger
        .hold_for_delivery(id, &[vec![2 * C]], None)
        .unwrap();
    f.clock.advance(10 * RESERVATION_TTL_DEFAULT_MS);
    assert!(f.ledger.expire_due().is_empty());
    assert!(f.ledger.resolve_in_doubt_older_than(0, true).is_empty());
    let h = held.holds[0][0];
    // A restart brings it back in doubt; the watcher takes it back.
    f.ledger.mark_in_doubt(h).unwrap();
    assert_eq!(
        f.ledger.reservation(h).unwrap().state,
        ReservationState::InDoubt
    );
    f.ledger.await_delivery(h).unwrap();
    assert_eq!(
        f.ledger.reservation(h).unwrap().state,
        ReservationState::Delivery
    );
    assert_eq!(f.avail("a", Bucket::Anytime), 8 * C);
}

#[test]
fn hold_for_delivery_refuses_parts_that_do_not_add_up() {
    let f = fixture();
    f.account("a", 10 * C, 0);
    let id = f
        .ledger
        .reserve("a", &[2 * C, C], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    let n = f.sink.len();
    for bad in [
        vec![vec![C], vec![C]],
        vec![vec![2 * C]],
        vec![vec![3 * C, -C], vec![C]],
    ] {
        assert!(matches!(
            f.ledger.hold_for_delivery(id, &bad, None),
            Err(LedgerError::InvalidAmount(_))
        ));
    }
    assert_eq!(f.sink.len(), n, "a refused hold records nothing");
    assert!(f.ledger.reservation(id).is_some());
    assert_eq!(
        parse_hold_reference("delivery:7/share:2/part:3"),
        Some((7, 2, 3))
    );
    assert_eq!(
        parse_hold_reference(&hold_reference(ReservationId(9), 0, 1)),
        Some((9, 0, 1))
    );
    assert_eq!(parse_hold_reference("delivery:7/share:x/part:3"), None);
}
