//! The settlement state machine under random order: a send's accept
//! answer, its reports (any outcome, duplicates, with or without message
//! id, before or after the answer) and the timeout sweep, in any order.
//! Every share resolves exactly once (its first final report decides),
//! nothing is refunded twice or above what it posted, and credit is
//! conserved: balance = opening − posted + refunded, and the journal
//! replays to the balances. A send closed by the timeout before its answer
//! refunds nothing (its settlement is never known to the watcher).
//!
//! `charge_on: delivery` (`delivery_every_part_resolves_once_…`): the same
//! events with multipart shares and part numbers; every delivery hold
//! resolves exactly once (delivered → charged, failed → released, silent
//! → `dlr.on_timeout`), and at every step available + reserved + charged
//! equals the opening credit with no bucket negative. Then the timeout
//! default both ways and start-up after a crash, with the injected clock.

use std::sync::Arc;

use proptest::prelude::*;

use std::collections::HashSet;

use super::*;
use crate::clock::ManualClock;
use crate::ledger::{
    replay, BucketPreference, EntryKind, LedgerConfig, MemorySink, Overdraft, Role,
};
use crate::outbox::OutboxConfig;

#[derive(Debug, Clone)]
enum Event {
    /// The gateway's answer (the settlement), once.
    Answer,
    /// A report for share `share` with `outcome` (0..4: delivered, failed,
    /// expired, rejected, 4: not final), with or without its message id.
    Report {
        share: usize,
        outcome: u8,
        with_id: bool,
    },
    /// `dlr.timeout_s` passes and the sweep runs.
    Timeout,
}

fn event(shares: usize) -> impl Strategy<Value = Event> {
    prop_oneof![
        1 => Just(Event::Answer),
        6 => (0..shares, 0u8..5, any::<bool>()).prop_map(|(share, outcome, with_id)| Event::Report { share, outcome, with_id }),
        1 => Just(Event::Timeout),
    ]
}

const STATUS: [&str; 5] = ["delivered", "undelivered", "expired", "rejected", "enroute"];

fn scenario() -> impl Strategy<Value = (Vec<i64>, Vec<bool>, bool, Vec<Event>)> {
    (1usize..5).prop_flat_map(|n| {
        (
            prop::collection::vec(0i64..5_000, n),
            prop::collection::vec(any::<bool>(), n),
            any::<bool>(),
            prop::collection::vec(event(n), 0..24),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn every_share_resolves_once_and_credit_is_conserved(
        (prices, accepted, offpeak_first, events) in scenario()
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let clock = Arc::new(ManualClock::new(1_000_000));
            let sink = Arc::new(MemorySink::new());
            let ledger = Arc::new(Ledger::new(
                LedgerConfig { overdraft: Overdraft::Strict, ..LedgerConfig::default() },
                sink.clone(),
                clock.clone(),
            ));
            ledger.open_account("a", None, Role::User, None).unwrap();
            ledger.add("a", crate::ledger::Bucket::Anytime, 20_000, None).unwrap();
            ledger.add("a", crate::ledger::Bucket::OffPeak, 3_000, None).unwrap();
            let metrics = Arc::new(Metrics::new());
            let outbox = Arc::new(
                Outbox::open(&OutboxConfig::default(), clock.clone(), metrics.clone()).unwrap(),
            );
            let config = DlrConfig { enabled: true, ..DlrConfig::default() };
            let timeout = config.timeout;
            let dlr = Dlr::new(config, outbox, ledger.clone(), None, false, metrics, clock.clone());
            let recipients: Vec<String> =
                (0..prices.len()).map(|i| format!("+3630000000{i}")).collect();
            let refs: Vec<&str> = recipients.iter().map(String::as_str).collect();
            let parts = vec![1u32; prices.len()];
            let pref = if offpeak_first { BucketPreference::OffPeakFirst } else { BucketPreference::AnytimeOnly };
            let id = ledger.reserve("a", &prices, pref, None, None).unwrap();
            let prepared = dlr
                .prepare(Some("http://c/r?id=$messageid"), &refs, &prices, &parts, None, "a")
                .unwrap();
            let token = prepared.callback_url.split("/dlr/").nth(1).unwrap()[..32].to_string();
            let key = dlr.register(prepared, id).await.unwrap();

            // The model: what each share's first final report decided.
            let mut answered = false;
            let mut answered_open = false;
            let mut closed = false;
            let mut decided: Vec<Option<u8>> = vec![None; prices.len()];
            let mut posted_total = 0i64;
            for e in events.iter().cloned().chain([Event::Answer]) {
                match e {
                    Event::Answer if !answered => {
                        answered = true;
                        // Closed (timed out) before its answer: the send is
                        // no longer watched and nothing is refunded.
                        answered_open = !closed;
                        let s = ledger.settle_shares(id, &accepted, None).unwrap();
                        posted_total = s.posted_milli;
                        dlr.settled(&key, Some(Answered::Posted { accepted: accepted.clone(), posted_offpeak_milli: s.posted_offpeak_milli })).await;
                    }
                    Event::Answer => {}
                    Event::Report { share, outcome, with_id } => {
                        let q = format!(
                            "messageid={}&recipient={}&deliverystatus={}",
                            if with_id { format!("m{share}") } else { "$messageid".into() },
                            recipients[share].replace('+', "%2B"),
                            STATUS[outcome as usize],
                        );
                        let a = dlr.report(&token, &q).await;
                        if closed {
                            prop_assert_eq!(a.status, 404);
                            continue;
                        }
                        prop_assert!(a.status == 200 || a.status == 404, "{:?}", a);
                        if a.status == 200 && outcome < 4 && decided[share].is_none() {
                            decided[share] = Some(outcome);
                        }
                    }
                    Event::Timeout => {
                        clock.advance(timeout.as_millis() as i64 + 1_000);
                        dlr.sweep().await;
                        closed = true;
                    }
                }
                if !dlr.sends.contains_key(&key) {
                    closed = true;
                }
            }
            // Each share's refund: its whole price, iff accepted and its
            // first final report was a failure.
            let expected_refund: i64 = if !answered_open { 0 } else { prices
                .iter()
                .zip(&accepted)
                .zip(&decided)
                .filter(|((_, ok), d)| **ok && matches!(d, Some(1..=3)))
                .map(|((p, _), _)| *p)
                .sum() };
            let entries = sink.entries();
            let refunded: i64 = entries
                .iter()
                .filter(|e| e.kind == EntryKind::Refund)
                .map(|e| e.amount_milli)
                .sum();
            prop_assert_eq!(refunded, expected_refund);
            // At most one refund per (share, bucket).
            let mut seen = std::collections::HashSet::new();
            for e in entries.iter().filter(|e| e.kind == EntryKind::Refund) {
                prop_assert!(seen.insert((e.reference.clone(), e.bucket)));
            }
            let view = ledger.account("a").unwrap();
            let total = view.anytime.posted_milli + view.offpeak.posted_milli;
            prop_assert_eq!(total, 23_000 - posted_total + refunded);
            let replayed = replay(&entries);
            for b in crate::ledger::Bucket::ALL {
                prop_assert_eq!(replayed[&("a".to_string(), b)], view.bucket(b));
            }
            Ok(())
        })?;
    }
}

#[test]
fn split_and_part_prices_add_up() {
    assert_eq!(
        split_posted(&[3, 4, 5], &[true, false, true], 4),
        vec![(3, 0), (0, 0), (1, 4)]
    );
    let parts: i64 = (1..=3).map(|p| part_price(1000, 3, p)).sum();
    assert_eq!(parts, 1000);
    let mut left = (2, 3);
    assert_eq!(take_refund(&mut left, 4), (2, 2));
    assert_eq!(take_refund(&mut left, 9), (0, 1));
    assert_eq!(take_refund(&mut left, 1), (0, 0));
}

/// A crash between a report's record and its refund's commit: start-up
/// makes the refund when the journal lacks it, and only then.
#[test]
fn restore_finishes_an_interrupted_refund_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let sink = Arc::new(MemorySink::new());
    let ledger = Arc::new(Ledger::new(
        LedgerConfig::default(),
        sink.clone(),
        clock.clone(),
    ));
    ledger.open_account("a", None, Role::User, None).unwrap();
    ledger
        .add("a", crate::ledger::Bucket::Anytime, 10_000, None)
        .unwrap();
    let id = ledger
        .reserve(
            "a",
            &[1_000, 2_000],
            BucketPreference::AnytimeOnly,
            None,
            None,
        )
        .unwrap();
    ledger.settle_shares(id, &[true, true], None).unwrap();
    let cfg = OutboxConfig {
        path: Some(dir.path().join("o.db")),
        ..OutboxConfig::default()
    };
    let metrics = Arc::new(Metrics::new());
    let open = || Arc::new(Outbox::open(&cfg, clock.clone(), metrics.clone()).unwrap());
    // The rows a crash left: the send, its settlement, a failed report of
    // share 1 whose refund was planned and never seen committed.
    let send = SendRow {
        reservation: id.0,
        account: "a".into(),
        policy: "accept".into(),
        template: None,
        created_unix_ms: 1_000_000,
        shares: vec![
            ShareRow {
                recipient: "+361".into(),
                price_milli: 1_000,
                parts: 1,
            },
            ShareRow {
                recipient: "+362".into(),
                price_milli: 2_000,
                parts: 1,
            },
        ],
    };
    let settled = SettledRow {
        posted: vec![(0, 1_000), (0, 2_000)],
        accepted: vec![true, true],
        holds: vec![],
    };
    let report = ReportRow {
        dedupe: "id:m2||undelivered".into(),
        share: Some(1),
        part: None,
        outcome: Some("failed".into()),
        message_id: Some("m2".into()),
        refund: Some((0, 2_000)),
        applied: false,
        early: false,
        parts: vec![1],
        hold: None,
        hold_ids: vec![],
    };
    {
        let outbox = open();
        outbox
            .commit_blocking(vec![
                Change::Put(
                    STATE_NS.into(),
                    "k".into(),
                    serde_json::to_vec(&send).unwrap(),
                ),
                Change::Put(
                    STATE_NS.into(),
                    "k/settled".into(),
                    serde_json::to_vec(&settled).unwrap(),
                ),
                Change::Put(
                    STATE_NS.into(),
                    "k/r/0".into(),
                    serde_json::to_vec(&report).unwrap(),
                ),
            ])
            .unwrap();
    }
    let restore = |journal: HashSet<(u64, String)>| {
        let dlr = Dlr::new(
            DlrConfig {
                enabled: true,
                ..DlrConfig::default()
            },
            open(),
            ledger.clone(),
            None,
            false,
            metrics.clone(),
            clock.clone(),
        );
        let mut asked = None;
        let r = dlr
            .restore(&mut |min| {
                asked = Some(min);
                Ok(journal.clone())
            })
            .unwrap();
        (r, asked)
    };
    let refunds = || {
        sink.entries()
            .iter()
            .filter(|e| e.kind == EntryKind::Refund)
            .count()
    };
    // The journal has it already: nothing made.
    let (r, asked) = restore(HashSet::from([(id.0, "share:1".to_string())]));
    assert_eq!(asked, Some(id.0));
    assert_eq!((r.sends, r.refunds_found, r.refunds_made), (1, 1, 0));
    assert_eq!(refunds(), 0);
    // It does not: made once, and the row now says so.
    let (r, _) = restore(HashSet::new());
    assert_eq!((r.refunds_found, r.refunds_made), (0, 1));
    assert_eq!(refunds(), 1);
    let (r, asked) = restore(HashSet::new());
    assert_eq!(
        (r.refunds_made, asked),
        (0, None),
        "applied rows are not looked up again"
    );
    assert_eq!(refunds(), 1);
    assert_eq!(
        ledger.account("a").unwrap().anytime.available_milli(),
        10_000 - 3_000 + 2_000
    );
}

/// A ledger with account `a` (20 credits anytime, 3 offpeak) and a
/// watcher that settles by `charge_on: delivery`.
fn delivery_fixture(
    on_timeout: crate::config::dlr::OnTimeout,
    outbox: Option<&OutboxConfig>,
) -> (Arc<ManualClock>, Arc<MemorySink>, Arc<Ledger>, Dlr) {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let sink = Arc::new(MemorySink::new());
    let ledger = Arc::new(Ledger::new(
        LedgerConfig::default(),
        sink.clone(),
        clock.clone(),
    ));
    ledger.open_account("a", None, Role::User, None).unwrap();
    ledger
        .add("a", crate::ledger::Bucket::Anytime, 20_000, None)
        .unwrap();
    ledger
        .add("a", crate::ledger::Bucket::OffPeak, 3_000, None)
        .unwrap();
    let metrics = Arc::new(Metrics::new());
    let default = OutboxConfig::default();
    let outbox =
        Arc::new(Outbox::open(outbox.unwrap_or(&default), clock.clone(), metrics.clone()).unwrap());
    let config = DlrConfig {
        enabled: true,
        charge_on_default: ChargeOn::Delivery,
        request: RequestReports::Always,
        on_timeout,
        ..DlrConfig::default()
    };
    let dlr = Dlr::new(
        config,
        outbox,
        ledger.clone(),
        None,
        false,
        metrics,
        clock.clone(),
    );
    (clock, sink, ledger, dlr)
}

/// Watches and answers a send of `prices` (one part each) with every
/// share accepted; returns (token, key, holds).
async fn held_send(dlr: &Dlr, ledger: &Arc<Ledger>, prices: &[i64]) -> (String, String, Vec<u64>) {
    let recipients: Vec<String> = (0..prices.len())
        .map(|i| format!("+3630000000{i}"))
        .collect();
    let refs: Vec<&str> = recipients.iter().map(String::as_str).collect();
    let parts = vec![1u32; prices.len()];
    let id = ledger
        .reserve("a", prices, BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    let prepared = dlr.prepare(None, &refs, prices, &parts, None, "a").unwrap();
    assert!(prepared.holds_until_delivery());
    let token = prepared.callback_url.split("/dlr/").nth(1).unwrap()[..32].to_string();
    let key = dlr.register(prepared, id).await.unwrap();
    let parts_milli: Vec<Vec<i64>> = prices.iter().map(|p| vec![*p]).collect();
    let held = ledger.hold_for_delivery(id, &parts_milli, None).unwrap();
    let ids = held.holds.iter().flatten().map(|h| h.0).collect();
    dlr.settled(&key, Some(Answered::Held { holds: held.holds }))
        .await;
    (token, key, ids)
}

fn report_query(i: usize, status: &str) -> String {
    format!("messageid=m{i}&recipient=%2B3630000000{i}&deliverystatus={status}")
}

#[test]
fn delivery_timeout_charges_or_releases_the_silent_shares_by_config() {
    use crate::config::dlr::OnTimeout;
    for on_timeout in [OnTimeout::Charge, OnTimeout::Release] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (clock, sink, ledger, dlr) = delivery_fixture(on_timeout, None);
            let (token, _, holds) = held_send(&dlr, &ledger, &[1_000, 2_000, 4_000]).await;
            let a = ledger.account("a").unwrap();
            assert_eq!(
                (a.anytime.posted_milli, a.anytime.reserved_milli),
                (20_000, 7_000)
            );
            // Share 0 delivered, share 1 failed, share 2 silent.
            assert_eq!(
                dlr.report(&token, &report_query(0, "delivered"))
                    .await
                    .status,
                200
            );
            assert_eq!(
                dlr.report(&token, &report_query(1, "undelivered"))
                    .await
                    .status,
                200
            );
            assert_eq!(
                ledger.reservation(ReservationId(holds[2])).unwrap().state,
                crate::ledger::ReservationState::Delivery
            );
            // Before the timeout the sweep changes nothing.
            dlr.sweep().await;
            assert_eq!(dlr.watched(), 1);
            clock.advance(dlr.config.timeout.as_millis() as i64 + 1_000);
            dlr.sweep().await;
            assert_eq!(dlr.watched(), 0, "closed by the timeout");
            assert_eq!(ledger.reservation_count(), 0, "every hold resolved");
            let a = ledger.account("a").unwrap();
            let charged = match on_timeout {
                OnTimeout::Charge => 1_000 + 4_000,
                OnTimeout::Release => 1_000,
            };
            assert_eq!(
                (a.anytime.posted_milli, a.anytime.reserved_milli),
                (20_000 - charged, 0)
            );
            let (result, other) = match on_timeout {
                OnTimeout::Charge => ("charged", "released"),
                OnTimeout::Release => ("released", "charged"),
            };
            let m = &dlr.metrics;
            assert_eq!(
                m.dlr_holds_resolved
                    .with_label_values(&[result, "timeout"])
                    .get(),
                1
            );
            assert_eq!(
                m.dlr_holds_resolved
                    .with_label_values(&[other, "timeout"])
                    .get(),
                0
            );
            assert_eq!(m.dlr_timeouts.with_label_values(&["delivery"]).get(), 1);
            // A late report moves nothing.
            assert_eq!(
                dlr.report(&token, &report_query(2, "delivered"))
                    .await
                    .status,
                404
            );
            assert_eq!(ledger.account("a").unwrap(), a);
            let replayed = replay(&sink.entries());
            assert_eq!(
                replayed[&("a".to_string(), crate::ledger::Bucket::Anytime)],
                a.anytime
            );
        });
    }
}

/// A crash after a report's row was committed and before its hold was
/// resolved (or with the resolution lost under `durability: async`):
/// start-up resolves the hold the ledger still has, once; the holds
/// without a report go back to waiting (state `delivery`, not in doubt).
#[test]
fn restore_resolves_recorded_holds_once_and_keeps_the_rest_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboxConfig {
        path: Some(dir.path().join("o.db")),
        ..OutboxConfig::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (clock, sink, ledger, dlr) =
        delivery_fixture(crate::config::dlr::OnTimeout::Charge, Some(&cfg));
    let (_, key, holds) = rt.block_on(held_send(&dlr, &ledger, &[1_000, 2_000]));
    // The row of a "delivered" report of share 0, planned, not applied.
    let row = ReportRow {
        dedupe: "id:m0||delivered".into(),
        share: Some(0),
        part: None,
        outcome: Some("delivered".into()),
        message_id: Some("m0".into()),
        refund: None,
        applied: false,
        early: false,
        parts: vec![1],
        hold: Some(HoldAction::Post),
        hold_ids: vec![holds[0]],
    };
    dlr.outbox()
        .commit_blocking(vec![Change::Put(
            STATE_NS.into(),
            format!("{key}/r/0"),
            serde_json::to_vec(&row).unwrap(),
        )])
        .unwrap();
    drop(dlr);
    // The restart: the store brings every hold back in doubt.
    for h in &holds {
        ledger.mark_in_doubt(ReservationId(*h)).unwrap();
    }
    let restart = || {
        let metrics = Arc::new(Metrics::new());
        let outbox = Arc::new(Outbox::open(&cfg, clock.clone(), metrics.clone()).unwrap());
        let config = DlrConfig {
            enabled: true,
            charge_on_default: ChargeOn::Delivery,
            request: RequestReports::Always,
            ..DlrConfig::default()
        };
        let dlr = Dlr::new(
            config,
            outbox,
            ledger.clone(),
            None,
            false,
            metrics,
            clock.clone(),
        );
        let r = dlr.restore(&mut |_| Ok(HashSet::new())).unwrap();
        (dlr, r)
    };
    let (dlr, r) = restart();
    assert_eq!((r.sends, r.holds, r.holds_resolved), (1, 2, 1));
    assert!(
        ledger.reservation(ReservationId(holds[0])).is_none(),
        "posted"
    );
    assert_eq!(
        ledger.reservation(ReservationId(holds[1])).unwrap().state,
        crate::ledger::ReservationState::Delivery
    );
    let posts = || {
        sink.entries()
            .iter()
            .filter(|e| e.kind == EntryKind::Post)
            .count()
    };
    assert_eq!(posts(), 1);
    drop(dlr);
    let (_, r) = restart();
    assert_eq!(
        (r.holds, r.holds_resolved),
        (1, 0),
        "nothing resolved twice"
    );
    assert_eq!(posts(), 1);
    let a = ledger.account("a").unwrap();
    assert_eq!(
        (a.anytime.posted_milli, a.anytime.reserved_milli),
        (19_000, 2_000)
    );
}

/// A crash between the holds' commit and the settlement row: start-up
/// reads the answer from the holds (their references name the send's
/// reservation, share and part), and a report then settles them.
#[test]
fn restore_rebuilds_a_lost_settlement_from_the_holds() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboxConfig {
        path: Some(dir.path().join("o.db")),
        ..OutboxConfig::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (clock, _sink, ledger, dlr) =
        delivery_fixture(crate::config::dlr::OnTimeout::Charge, Some(&cfg));
    let (token, key, holds) = rt.block_on(held_send(&dlr, &ledger, &[1_000, 2_000]));
    dlr.outbox()
        .commit_blocking(vec![Change::Delete(
            STATE_NS.into(),
            format!("{key}/settled"),
        )])
        .unwrap();
    drop(dlr);
    for h in &holds {
        ledger.mark_in_doubt(ReservationId(*h)).unwrap();
    }
    let metrics = Arc::new(Metrics::new());
    let outbox = Arc::new(Outbox::open(&cfg, clock.clone(), metrics.clone()).unwrap());
    let config = DlrConfig {
        enabled: true,
        charge_on_default: ChargeOn::Delivery,
        request: RequestReports::Always,
        ..DlrConfig::default()
    };
    let dlr = Dlr::new(
        config,
        outbox,
        ledger.clone(),
        None,
        false,
        metrics,
        clock.clone(),
    );
    let r = dlr.restore(&mut |_| Ok(HashSet::new())).unwrap();
    assert_eq!((r.sends, r.holds), (1, 2));
    rt.block_on(async {
        assert_eq!(
            dlr.report(&token, &report_query(1, "expired")).await.status,
            200
        );
        assert_eq!(
            dlr.report(&token, &report_query(0, "delivered"))
                .await
                .status,
            200
        );
    });
    assert_eq!(ledger.reservation_count(), 0);
    let a = ledger.account("a").unwrap();
    assert_eq!(
        (a.anytime.posted_milli, a.anytime.reserved_milli),
        (19_000, 0)
    );
}

#[derive(Debug, Clone)]
enum DeliveryEvent {
    /// The gateway's answer: the accepted shares become holds, once.
    Answer,
    /// A report for share `share`, part `part` (0: no part number: every
    /// part still open), outcome 0..4 as [`STATUS`] (4: not final).
    Report {
        share: usize,
        part: u32,
        outcome: u8,
        with_id: bool,
    },
    /// `dlr.timeout_s` passes and the sweep runs.
    Timeout,
}

fn delivery_scenario() -> impl Strategy<Value = (Vec<(i64, u32, bool)>, bool, Vec<DeliveryEvent>)> {
    (1usize..4).prop_flat_map(|n| {
        let event = prop_oneof![
            1 => Just(DeliveryEvent::Answer),
            8 => (0..n, 0u32..4, 0u8..5, any::<bool>()).prop_map(|(share, part, outcome, with_id)| {
                DeliveryEvent::Report { share, part, outcome, with_id }
            }),
            1 => Just(DeliveryEvent::Timeout),
        ];
        (
            prop::collection::vec((0i64..5_000, 1u32..4, any::<bool>()), n),
            any::<bool>(),
            prop::collection::vec(event, 0..32),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    /// `charge_on: delivery`: the answer, reports (any part, outcome,
    /// duplicates, before or after the answer) and timeouts in random
    /// order. Each part's first final report decides it (delivered →
    /// charged, else released); a part no report decided gets
    /// `dlr.on_timeout`; every hold resolves exactly once (one `post` or
    /// `void` entry); at every step the opening credit equals available +
    /// reserved + charged, nothing is negative, and the journal replays to
    /// the balances.
    #[test]
    fn delivery_every_part_resolves_once_and_credit_is_conserved(
        (shares, charge_on_timeout, events) in delivery_scenario()
    ) {
        use crate::config::dlr::OnTimeout;
        use crate::ledger::Bucket;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let clock = Arc::new(ManualClock::new(1_000_000));
            let sink = Arc::new(MemorySink::new());
            let ledger = Arc::new(Ledger::new(LedgerConfig::default(), sink.clone(), clock.clone()));
            ledger.open_account("a", None, Role::User, None).unwrap();
            ledger.add("a", Bucket::Anytime, 20_000, None).unwrap();
            ledger.add("a", Bucket::OffPeak, 3_000, None).unwrap();
            let opening = 23_000i64;
            let metrics = Arc::new(Metrics::new());
            let outbox = Arc::new(
                Outbox::open(&OutboxConfig::default(), clock.clone(), metrics.clone()).unwrap(),
            );
            let mut config = DlrConfig {
                enabled: true,
                charge_on_default: ChargeOn::Delivery,
                on_timeout: if charge_on_timeout { OnTimeout::Charge } else { OnTimeout::Release },
                ..DlrConfig::default()
            };
            config.keywords.part = Some("$part".into());
            let timeout = config.timeout;
            let dlr = Dlr::new(config, outbox, ledger.clone(), None, false, metrics, clock.clone());
            let prices: Vec<i64> = shares.iter().map(|s| s.0).collect();
            let parts: Vec<u32> = shares.iter().map(|s| s.1).collect();
            let accepted: Vec<bool> = shares.iter().map(|s| s.2).collect();
            let recipients: Vec<String> = (0..prices.len()).map(|i| format!("+3630000000{i}")).collect();
            let refs: Vec<&str> = recipients.iter().map(String::as_str).collect();
            let id = ledger.reserve("a", &prices, BucketPreference::OffPeakFirst, None, None).unwrap();
            let prepared = dlr
                .prepare(Some("http://c/r?id=$messageid"), &refs, &prices, &parts, None, "a")
                .unwrap();
            prop_assert!(prepared.holds_until_delivery());
            let token = prepared.callback_url.split("/dlr/").nth(1).unwrap()[..32].to_string();
            let key = dlr.register(prepared, id).await.unwrap();

            // The model: per share and part, the first final outcome.
            let mut decided: Vec<Vec<Option<u8>>> =
                parts.iter().map(|p| vec![None; *p as usize]).collect();
            let mut answered = false;
            let mut closed = false;
            let charged = || -> i64 {
                sink.entries().iter().filter(|e| e.kind == EntryKind::Post).map(|e| -e.amount_milli).sum()
            };
            // Every share resolves in the end: the answer, then a timeout.
            let tail = [DeliveryEvent::Answer, DeliveryEvent::Timeout];
            for e in events.iter().cloned().chain(tail) {
                match e {
                    DeliveryEvent::Answer if !answered => {
                        answered = true;
                        let parts_milli: Vec<Vec<i64>> = prices.iter().zip(&parts).zip(&accepted)
                            .map(|((p, n), ok)| if *ok { (1..=*n).map(|k| part_price(*p, *n, k)).collect() } else { vec![] })
                            .collect();
                        let held = ledger.hold_for_delivery(id, &parts_milli, None).unwrap();
                        dlr.settled(&key, Some(Answered::Held { holds: held.holds })).await;
                    }
                    DeliveryEvent::Answer => {}
                    DeliveryEvent::Report { share, part, outcome, with_id } => {
                        let q = format!(
                            "messageid={}&recipient={}&deliverystatus={}&part={}",
                            if with_id { format!("m{share}") } else { "$messageid".into() },
                            recipients[share].replace('+', "%2B"),
                            STATUS[outcome as usize],
                            if part == 0 { "$part".to_string() } else { part.to_string() },
                        );
                        let a = dlr.report(&token, &q).await;
                        if closed {
                            prop_assert_eq!(a.status, 404);
                            continue;
                        }
                        // A part the message does not have is the
                        // gateway's error: refused while the share is
                        // open, moving nothing either way (a report for a
                        // resolved share matches none).
                        let bogus = part as usize > decided[share].len();
                        if bogus {
                            prop_assert!(
                                a.status == 200
                                    || (a.status, a.text) == (400, "part out of range for this message\n"),
                                "{:?}", a
                            );
                        } else {
                            prop_assert!(a.status == 200, "{:?}", a);
                        }
                        if !bogus && a.text == "OK\n" && outcome < 4 {
                            let d = &mut decided[share];
                            // No part number: every open part.
                            if part == 0 {
                                for slot in d.iter_mut().filter(|s| s.is_none()) {
                                    *slot = Some(outcome);
                                }
                            } else {
                                d[part as usize - 1].get_or_insert(outcome);
                            }
                        }
                    }
                    DeliveryEvent::Timeout => {
                        clock.advance(timeout.as_millis() as i64 + 1_000);
                        dlr.sweep().await;
                    }
                }
                if !dlr.sends.contains_key(&key) {
                    closed = true;
                }
                // Conservation and nothing negative, at every step.
                let v = ledger.account("a").unwrap();
                for b in Bucket::ALL {
                    let bb = v.bucket(b);
                    prop_assert!(bb.reserved_milli >= 0 && bb.available_milli() >= 0, "{:?}", bb);
                }
                let avail = v.anytime.available_milli() + v.offpeak.available_milli();
                let reserved = v.anytime.reserved_milli + v.offpeak.reserved_milli;
                prop_assert_eq!(avail + reserved + charged(), opening);
            }
            prop_assert!(closed, "the final timeout closes the send");
            prop_assert_eq!(ledger.reservation_count(), 0, "every hold resolved");
            // Charged: each accepted part delivered by its first final
            // report, or silent with on_timeout: charge.
            let expected: i64 = (0..prices.len())
                .filter(|i| accepted[*i])
                .flat_map(|i| (1..=parts[i]).map(move |p| (i, p)))
                .filter(|(i, p)| match decided[*i][(*p - 1) as usize] {
                    Some(0) => true,
                    Some(_) => false,
                    None => charge_on_timeout,
                })
                .map(|(i, p)| part_price(prices[i], parts[i], p))
                .sum();
            prop_assert_eq!(charged(), expected);
            // Each hold resolved exactly once: its post/void entries are one
            // operation (consecutive seqs, one kind) and give back exactly
            // what it reserved.
            let entries = sink.entries();
            let mut reserved_by: HashMap<u64, i64> = HashMap::new();
            let mut resolved_by: HashMap<u64, Vec<(u64, EntryKind, i64)>> = HashMap::new();
            for e in entries.iter().filter(|e| e.reservation_id != Some(id.0)) {
                let Some(r) = e.reservation_id else { continue };
                match e.kind {
                    EntryKind::Reserve => *reserved_by.entry(r).or_default() += e.amount_milli,
                    EntryKind::Post | EntryKind::Void => {
                        resolved_by.entry(r).or_default().push((e.seq, e.kind, e.amount_milli))
                    }
                    _ => {}
                }
            }
            let n_parts: usize = (0..prices.len()).filter(|i| accepted[*i]).map(|i| parts[i] as usize).sum();
            prop_assert_eq!(reserved_by.len(), n_parts);
            for (h, amount) in &reserved_by {
                let legs = resolved_by.get(h).cloned().unwrap_or_default();
                prop_assert!(!legs.is_empty(), "hold {} never resolved", h);
                prop_assert!(legs.len() <= 2 && legs.iter().all(|l| l.1 == legs[0].1), "{:?}", legs);
                prop_assert!(legs.windows(2).all(|w| w[1].0 == w[0].0 + 1), "{:?}", legs);
                prop_assert_eq!(-legs.iter().map(|l| l.2).sum::<i64>(), *amount);
            }
            prop_assert_eq!(entries.iter().filter(|e| e.kind == EntryKind::Refund).count(), 0);
            let v = ledger.account("a").unwrap();
            let replayed = replay(&entries);
            for b in Bucket::ALL {
                prop_assert_eq!(replayed[&("a".to_string(), b)], v.bucket(b));
            }
            prop_assert_eq!(v.anytime.posted_milli + v.offpeak.posted_milli, opening - expected);
            Ok(())
        })?;
    }
}

// ---------------------------------------------------------------------------
// Outbox commits per watched send (the CPU of a report round trip is mostly
// its commits: benches/e2e scenarios 6a/6b)
// ---------------------------------------------------------------------------

/// A watcher settling by `charge_on: accept`, with a relay template.
fn accept_fixture() -> (Arc<Ledger>, Dlr) {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let ledger = Arc::new(Ledger::new(
        LedgerConfig::default(),
        Arc::new(MemorySink::new()),
        clock.clone(),
    ));
    ledger.open_account("a", None, Role::User, None).unwrap();
    ledger
        .add("a", crate::ledger::Bucket::Anytime, 20_000, None)
        .unwrap();
    let metrics = Arc::new(Metrics::new());
    let outbox =
        Arc::new(Outbox::open(&OutboxConfig::default(), clock.clone(), metrics.clone()).unwrap());
    let config = DlrConfig {
        enabled: true,
        ..DlrConfig::default()
    };
    let dlr = Dlr::new(config, outbox, ledger.clone(), None, false, metrics, clock);
    (ledger, dlr)
}

/// Registers a one-recipient send of 1 000 (relayed to the client's
/// template); returns (token, key, reservation).
async fn accept_send(dlr: &Dlr, ledger: &Arc<Ledger>) -> (String, String, ReservationId) {
    let id = ledger
        .reserve("a", &[1_000], BucketPreference::AnytimeOnly, None, None)
        .unwrap();
    let prepared = dlr
        .prepare(
            Some("http://c/r?id=$messageid&s=$deliverystatus"),
            &["+36300000000"],
            &[1_000],
            &[1],
            None,
            "a",
        )
        .unwrap();
    let token = prepared.callback_url.split("/dlr/").nth(1).unwrap()[..32].to_string();
    let key = dlr.register(prepared, id).await.unwrap();
    (token, key, id)
}

async fn answer_accepted(dlr: &Dlr, ledger: &Arc<Ledger>, key: &str, id: ReservationId) {
    let s = ledger.settle_shares(id, &[true], None).unwrap();
    dlr.settled(
        key,
        Some(Answered::Posted {
            accepted: vec![true],
            posted_offpeak_milli: s.posted_offpeak_milli,
        }),
    )
    .await;
}

async fn relayed(dlr: &Dlr) -> usize {
    dlr.outbox()
        .list(crate::outbox::ItemState::Pending, 100)
        .await
        .unwrap()
        .len()
}

#[test]
fn a_delivered_report_closes_its_send_in_the_commit_that_records_it() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // charge_on: accept, the report after the answer: the record, the
        // settlement, then one commit holding the relay and the close.
        let (ledger, dlr) = accept_fixture();
        let (token, key, id) = accept_send(&dlr, &ledger).await;
        answer_accepted(&dlr, &ledger, &key, id).await;
        let before = dlr.outbox().commits();
        assert_eq!(before, 2, "the record and the settlement");
        let a = dlr.report(&token, &report_query(0, "delivered")).await;
        assert_eq!((a.status, a.text), (200, "OK\n"));
        assert_eq!(
            dlr.outbox().commits() - before,
            1,
            "relay and close together"
        );
        assert_eq!(dlr.watched(), 0, "closed");
        assert!(dlr.outbox().state_rows(STATE_NS).await.unwrap().is_empty());
        assert_eq!(
            relayed(&dlr).await,
            1,
            "the relay item committed with the close"
        );
        // The send is closed: a repeat is answered as for any closed token.
        let again = dlr.report(&token, &report_query(0, "delivered")).await;
        assert_eq!(again.status, 404);
        assert_eq!(relayed(&dlr).await, 1);
        assert_eq!(ledger.account("a").unwrap().anytime.posted_milli, 19_000);

        // charge_on: delivery: the hold is posted, then the close commits.
        let (_c, _s, ledger, dlr) = delivery_fixture(crate::config::dlr::OnTimeout::Charge, None);
        let (token, _key, holds) = held_send(&dlr, &ledger, &[1_000, 2_000]).await;
        let before = dlr.outbox().commits();
        assert_eq!(before, 2);
        let a = dlr.report(&token, &report_query(0, "delivered")).await;
        assert_eq!(a.status, 200);
        assert_eq!(
            dlr.outbox().commits() - before,
            2,
            "share 1 open: the planned row, then its mark"
        );
        assert!(
            ledger.reservation(ReservationId(holds[0])).is_none(),
            "posted"
        );
        let a = dlr.report(&token, &report_query(1, "undelivered")).await;
        assert_eq!(a.status, 200);
        assert_eq!(dlr.outbox().commits() - before, 3, "the last one closes");
        assert_eq!(dlr.watched(), 0);
        assert!(dlr.outbox().state_rows(STATE_NS).await.unwrap().is_empty());
        assert_eq!(ledger.reservation_count(), 0, "both holds resolved");
        assert_eq!(
            ledger.account("a").unwrap().anytime.posted_milli,
            20_000 - 1_000,
            "the delivered part charged, the failed one released"
        );
    });
}

#[test]
fn reports_before_the_answer_close_the_send_with_its_settlement() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // charge_on: accept, delivered before the answer: the record, the
        // early report (with its relay), then the close instead of the
        // settlement, the report's plan and the close.
        let (ledger, dlr) = accept_fixture();
        let (token, key, id) = accept_send(&dlr, &ledger).await;
        let a = dlr.report(&token, &report_query(0, "delivered")).await;
        assert_eq!(a.status, 200);
        assert_eq!(dlr.outbox().commits(), 2);
        assert_eq!(dlr.watched(), 1, "waits for the answer");
        answer_accepted(&dlr, &ledger, &key, id).await;
        assert_eq!(dlr.outbox().commits(), 3, "closed at the answer");
        assert_eq!(dlr.watched(), 0);
        assert!(dlr.outbox().state_rows(STATE_NS).await.unwrap().is_empty());
        assert_eq!(relayed(&dlr).await, 1);
        assert_eq!(ledger.account("a").unwrap().anytime.posted_milli, 19_000);

        // A failed report before the answer still refunds, once, through
        // its recorded plan (the plan's mark and the close are one commit).
        let (ledger, dlr) = accept_fixture();
        let (token, key, id) = accept_send(&dlr, &ledger).await;
        let a = dlr.report(&token, &report_query(0, "undelivered")).await;
        assert_eq!(a.status, 200);
        answer_accepted(&dlr, &ledger, &key, id).await;
        assert_eq!(
            dlr.outbox().commits(),
            5,
            "record, early row, settlement, plan, close"
        );
        assert_eq!(dlr.watched(), 0);
        assert!(dlr.outbox().state_rows(STATE_NS).await.unwrap().is_empty());
        assert_eq!(ledger.account("a").unwrap().anytime.posted_milli, 20_000);
        assert_eq!(dlr.metrics.dlr_refunds.get(), 1);

        // charge_on: delivery, delivered before the answer: the hold is
        // posted at the answer and the send closed, no settlement row.
        let (_c, _s, ledger, dlr) = delivery_fixture(crate::config::dlr::OnTimeout::Release, None);
        let id = ledger
            .reserve("a", &[1_000], BucketPreference::AnytimeOnly, None, None)
            .unwrap();
        let prepared = dlr
            .prepare(None, &["+36300000000"], &[1_000], &[1], None, "a")
            .unwrap();
        let token = prepared.callback_url.split("/dlr/").nth(1).unwrap()[..32].to_string();
        let key = dlr.register(prepared, id).await.unwrap();
        let a = dlr.report(&token, &report_query(0, "delivered")).await;
        assert_eq!(a.status, 200);
        let held = ledger.hold_for_delivery(id, &[vec![1_000]], None).unwrap();
        dlr.settled(&key, Some(Answered::Held { holds: held.holds }))
            .await;
        assert_eq!(dlr.outbox().commits(), 3, "record, early row, close");
        assert_eq!(dlr.watched(), 0);
        assert!(dlr.outbox().state_rows(STATE_NS).await.unwrap().is_empty());
        assert_eq!(ledger.reservation_count(), 0, "the hold posted");
        assert_eq!(ledger.account("a").unwrap().anytime.posted_milli, 19_000);
    });
}
