//! Writer tests against a scriptable fake store: batching, group commit,
//! back-pressure, failure recovery, shutdown. Waits are bounded polls of
//! the fake's state (the writer runs on a real thread with real time), with
//! generous upper bounds so a loaded CI machine does not flake.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::*;
use crate::config::Durability;
use crate::ledger::{
    Bucket, BucketPreference, Clock, EntryKind, Ledger, LedgerConfig, Role, SystemClock,
};
use crate::store::{Loaded, SqliteStore, StoreError};

/// What the fake store saw, shared with the test.
#[derive(Default)]
struct FakeState {
    /// Every committed batch, in commit order.
    batches: Mutex<Vec<Vec<Entry>>>,
    /// When each batch committed.
    commit_times: Mutex<Vec<Instant>>,
    /// Commits fail while this is > 0 (decremented per failure).
    fail_next: AtomicUsize,
    /// Commits block while the gate is closed.
    gate_closed: Mutex<bool>,
    gate: Condvar,
    /// Commits currently blocked at the gate.
    blocked: AtomicUsize,
}

impl FakeState {
    fn close_gate(&self) {
        *self.gate_closed.lock() = true;
    }

    fn open_gate(&self) {
        *self.gate_closed.lock() = false;
        self.gate.notify_all();
    }

    fn batch_sizes(&self) -> Vec<usize> {
        self.batches.lock().iter().map(Vec::len).collect()
    }

    fn committed_entries(&self) -> Vec<Entry> {
        self.batches.lock().iter().flatten().cloned().collect()
    }
}

struct FakeStore(Arc<FakeState>);

impl Store for FakeStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        Ok(Loaded::default())
    }

    fn commit(&mut self, entries: &[Entry], _accounts: &[AccountMeta]) -> Result<(), StoreError> {
        let s = &self.0;
        {
            let mut closed = s.gate_closed.lock();
            if *closed {
                s.blocked.fetch_add(1, Ordering::SeqCst);
                while *closed {
                    s.gate.wait(&mut closed);
                }
                s.blocked.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if s.fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Unavailable("injected failure".into()));
        }
        s.batches.lock().push(entries.to_vec());
        s.commit_times.lock().push(Instant::now());
        Ok(())
    }

    fn for_each_entry(
        &mut self,
        _visit: &mut dyn FnMut(Entry) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn stored_balances(&mut self) -> Result<Vec<crate::ledger::AccountView>, StoreError> {
        Ok(Vec::new())
    }
}

fn config(batch_max_entries: usize, batch_age_max: Duration) -> WriterConfig {
    WriterConfig {
        batch_max_entries,
        batch_age_max,
        commit_delay: Duration::from_micros(200),
        queue_max_entries: 1_000,
        ack_timeout: Duration::from_secs(10),
    }
}

fn writer(config: WriterConfig) -> (Arc<WriteBehind>, Arc<FakeState>, Arc<Metrics>) {
    let state = Arc::new(FakeState::default());
    let metrics = Arc::new(Metrics::new());
    let w = Arc::new(WriteBehind::new(
        Box::new(FakeStore(state.clone())),
        config,
        metrics.clone(),
    ));
    w.start(Weak::<NoDirectory>::new());
    (w, state, metrics)
}

fn entry(seq: u64) -> Entry {
    Entry {
        seq,
        kind: EntryKind::Add,
        account: format!("acct{}", seq % 3),
        bucket: Bucket::Anytime,
        amount_milli: seq as i64,
        reservation_id: None,
        reference: None,
        tariff_version: None,
        at_unix_ms: 0,
    }
}

/// Polls `cond` every millisecond for up to 10 s.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn batches_close_on_size() {
    // An age no test outlives: only size (and the final flush) closes them.
    let (w, state, _) = writer(config(4, Duration::from_secs(3600)));
    for seq in 1..=10 {
        w.record(&[entry(seq)]);
    }
    eventually("two full batches", || state.batch_sizes().len() == 2);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(state.batch_sizes(), vec![4, 4], "the last 2 wait for age");
    assert_eq!(w.depth(), 2);
    w.flush_and_stop(Duration::from_secs(5)).unwrap();
    assert_eq!(state.batch_sizes(), vec![4, 4, 2]);
    let seqs: Vec<u64> = state.committed_entries().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    assert_eq!(w.committed_position(), 10);
}

#[test]
fn batches_close_on_age() {
    let age = Duration::from_millis(40);
    let (w, state, _) = writer(config(1_000, age));
    let recorded = Instant::now();
    w.record(&[entry(1)]);
    w.record(&[entry(2)]);
    eventually("the batch ages out", || !state.batch_sizes().is_empty());
    let committed_after = state.commit_times.lock()[0] - recorded;
    assert!(
        committed_after >= age,
        "committed after {committed_after:?}"
    );
    assert!(committed_after < Duration::from_secs(5));
    assert_eq!(state.batch_sizes(), vec![2]);
    assert_eq!(w.depth(), 0);
}

#[test]
fn an_operation_is_never_split_across_batches() {
    let (w, state, _) = writer(config(4, Duration::from_millis(1)));
    state.close_gate();
    w.record(&[entry(1)]);
    eventually("first commit blocked", || {
        state.blocked.load(Ordering::SeqCst) == 1
    });
    w.record(&[entry(2), entry(3), entry(4)]);
    w.record(&[entry(5), entry(6), entry(7)]);
    w.record(&[
        entry(8),
        entry(9),
        entry(10),
        entry(11),
        entry(12),
        entry(13),
    ]);
    state.open_gate();
    w.flush_and_stop(Duration::from_secs(5)).unwrap();
    // 3 + 3 would exceed 4; an oversized operation goes alone.
    assert_eq!(state.batch_sizes(), vec![1, 3, 3, 6]);
}

#[test]
fn a_waiter_closes_the_batch_without_waiting_for_its_age() {
    let (w, state, _) = writer(config(1_000, Duration::from_secs(3600)));
    let rt = runtime();
    w.record(&[entry(1)]);
    let started = Instant::now();
    rt.block_on(w.wait_durable()).unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(state.batch_sizes(), vec![1]);
    // Nothing pending: returns at once, no commit.
    rt.block_on(w.wait_durable()).unwrap();
    assert_eq!(state.batch_sizes(), vec![1]);
}

#[test]
fn under_load_the_next_commit_waits_commit_delay_to_gather_more() {
    let mut cfg = config(4096, Duration::from_secs(3600));
    cfg.commit_delay = Duration::from_millis(300);
    let (w, state, _) = writer(cfg);
    let rt = runtime();
    let send = |seq: u64| {
        let w = w.clone();
        rt.spawn(async move {
            w.record(&[entry(seq)]);
            w.wait_durable().await
        })
    };
    // One waiter: no load, committed at once.
    let started = Instant::now();
    rt.block_on(send(1)).unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_millis(250));
    // Ten waiters held behind a commit: the last batch had one waiter, so
    // theirs closes at once too.
    state.close_gate();
    let blocker = send(2);
    eventually("commit blocked", || {
        state.blocked.load(Ordering::SeqCst) == 1
    });
    let ten: Vec<_> = (3..=12).map(send).collect();
    eventually("ten queued", || w.enqueued_position() == 12);
    state.open_gate();
    rt.block_on(blocker).unwrap().unwrap();
    for t in ten {
        rt.block_on(t).unwrap().unwrap();
    }
    assert_eq!(state.batch_sizes(), vec![1, 1, 10]);
    // Now the load is high: the next batch waits `commit_delay` after the
    // last commit and gathers what arrives meanwhile.
    let started = Instant::now();
    let more: Vec<_> = (13..=17).map(send).collect();
    for t in more {
        rt.block_on(t).unwrap().unwrap();
    }
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(state.batch_sizes(), vec![1, 1, 10, 5]);
    // That batch had five waiters: one more delayed commit, then a lone
    // waiter is committed at once again.
    rt.block_on(send(18)).unwrap().unwrap();
    let started = Instant::now();
    rt.block_on(send(19)).unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_millis(250));
    assert_eq!(state.batch_sizes(), vec![1, 1, 10, 5, 1, 1]);
}

#[test]
fn group_commit_many_waiters_share_one_commit() {
    let (w, state, metrics) = writer(config(4096, Duration::from_secs(3600)));
    let rt = runtime();
    // Hold the writer inside a commit while 200 writers record and wait.
    state.close_gate();
    w.record(&[entry(1)]);
    let first = {
        let w = w.clone();
        rt.spawn(async move { w.wait_durable().await })
    };
    eventually("first commit blocked", || {
        state.blocked.load(Ordering::SeqCst) == 1
    });
    let mut waiters = Vec::new();
    for seq in 2..=201 {
        let w = w.clone();
        waiters.push(rt.spawn(async move {
            w.record(&[entry(seq)]);
            w.wait_durable().await
        }));
    }
    eventually("every writer queued", || w.enqueued_position() == 201);
    state.open_gate();
    rt.block_on(async {
        first.await.unwrap().unwrap();
        for t in waiters {
            t.await.unwrap().unwrap();
        }
    });
    assert_eq!(state.batch_sizes(), vec![1, 200], "200 waiters, one commit");
    assert_eq!(metrics.store_batch_entries.get_sample_count(), 2);
    assert_eq!(metrics.store_committed_entries.get(), 201);
}

#[test]
fn back_pressure_waits_then_fails_and_recovers() {
    let cfg = WriterConfig {
        batch_max_entries: 4,
        batch_age_max: Duration::from_millis(1),
        commit_delay: Duration::from_micros(200),
        queue_max_entries: 8,
        ack_timeout: Duration::from_millis(150),
    };
    let (w, state, metrics) = writer(cfg);
    let rt = runtime();
    state.close_gate();
    for seq in 1..=4 {
        w.record(&[entry(seq)]);
    }
    eventually("a commit blocked", || {
        state.blocked.load(Ordering::SeqCst) == 1
    });
    // Under the limit: admitted at once.
    rt.block_on(w.admit()).unwrap();
    for seq in 5..=12 {
        w.record(&[entry(seq)]);
    }
    assert_eq!(w.depth(), 12);
    // Over the limit and the store is stuck: both waits time out.
    let started = Instant::now();
    assert_eq!(rt.block_on(w.admit()), Err(StoreUnavailable));
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(rt.block_on(w.wait_durable()), Err(StoreUnavailable));
    assert_eq!(
        metrics
            .store_ack_timeouts
            .with_label_values(&["admit"])
            .get(),
        1
    );
    // Nothing was dropped while refusing.
    assert_eq!(w.enqueued_position(), 12);
    // A waiting admit is let in as soon as the queue drains.
    let admit = {
        let w = w.clone();
        rt.spawn(async move { w.admit().await })
    };
    std::thread::sleep(Duration::from_millis(20));
    state.open_gate();
    rt.block_on(admit).unwrap().unwrap();
    rt.block_on(w.wait_durable()).unwrap();
    let seqs: Vec<u64> = state.committed_entries().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=12).collect::<Vec<_>>());
}

#[test]
fn a_failing_store_recovers_without_losing_entries() {
    let (w, state, metrics) = writer(config(8, Duration::from_millis(1)));
    state.fail_next.store(3, Ordering::SeqCst);
    let rt = runtime();
    for seq in 1..=50 {
        w.record(&[entry(seq)]);
    }
    rt.block_on(w.wait_durable()).unwrap();
    let seqs: Vec<u64> = state.committed_entries().iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=50).collect::<Vec<_>>(),
        "each entry exactly once"
    );
    assert_eq!(metrics.store_commit_errors.get(), 3);
    assert_eq!(w.depth(), 0);
    w.refresh_gauges();
    assert_eq!(metrics.store_queue_depth.get(), 0);
    assert_eq!(metrics.store_oldest_unpersisted_age.get(), 0.0);
}

#[test]
fn oldest_unpersisted_age_is_exported_while_a_commit_is_stuck() {
    let (w, state, metrics) = writer(config(8, Duration::from_millis(1)));
    state.close_gate();
    w.record(&[entry(1)]);
    eventually("commit blocked", || {
        state.blocked.load(Ordering::SeqCst) == 1
    });
    w.record(&[entry(2)]);
    std::thread::sleep(Duration::from_millis(30));
    w.refresh_gauges();
    assert_eq!(metrics.store_queue_depth.get(), 2);
    assert!(metrics.store_oldest_unpersisted_age.get() >= 0.03);
    state.open_gate();
    w.flush_and_stop(Duration::from_secs(5)).unwrap();
    assert_eq!(metrics.store_queue_depth.get(), 0);
}

#[test]
fn flush_gives_up_on_a_store_that_stays_down() {
    let (w, state, metrics) = writer(config(8, Duration::from_secs(3600)));
    state.fail_next.store(usize::MAX, Ordering::SeqCst);
    for seq in 1..=5 {
        w.record(&[entry(seq)]);
    }
    let started = Instant::now();
    let e = w.flush_and_stop(Duration::from_millis(100)).unwrap_err();
    assert_eq!(e, FlushError::StoreFailing { unpersisted: 5 });
    assert!(started.elapsed() < Duration::from_secs(5));
    // Recording after the stop is counted, not silently accepted.
    w.record(&[entry(6)]);
    assert_eq!(metrics.store_entries_after_stop.get(), 1);
    // A second stop is a no-op.
    w.flush_and_stop(Duration::from_millis(1)).unwrap();
}

#[test]
fn entries_recorded_before_start_are_committed() {
    let state = Arc::new(FakeState::default());
    let w = WriteBehind::new(
        Box::new(FakeStore(state.clone())),
        config(100, Duration::from_secs(3600)),
        Arc::new(Metrics::new()),
    );
    w.record(&[entry(1), entry(2)]);
    w.start(Weak::<NoDirectory>::new());
    w.flush_and_stop(Duration::from_secs(5)).unwrap();
    assert_eq!(state.batch_sizes(), vec![2]);
}

/// End to end over SQLite: a ledger writing through the writer, then a
/// fresh ledger restored from what the store loads.
#[test]
fn a_ledger_restored_from_sqlite_matches_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let metrics = Arc::new(Metrics::new());
    let store = SqliteStore::open(&path, Durability::Sync).unwrap();
    let w = Arc::new(WriteBehind::new(
        Box::new(store),
        config(64, Duration::from_millis(2)),
        metrics,
    ));
    let clock = Arc::new(SystemClock::new()) as Arc<dyn Clock>;
    let ledger = Arc::new(Ledger::new(
        LedgerConfig::default(),
        w.clone(),
        clock.clone(),
    ));
    w.start(Arc::downgrade(&ledger) as Weak<dyn AccountDirectory>);
    ledger
        .open_account("parent", None, Role::Admin, None)
        .unwrap();
    ledger
        .open_account("kid", Some("parent"), Role::User, Some("gold"))
        .unwrap();
    ledger
        .add("parent", Bucket::Anytime, 100_000, Some("seed"))
        .unwrap();
    ledger
        .add("kid", Bucket::OffPeak, 5_000, Some("seed"))
        .unwrap();
    ledger
        .transfer("parent", "kid", 20_000, 0, Some("t1"))
        .unwrap();
    let settled = ledger
        .reserve(
            "kid",
            &[1_000, 2_000],
            BucketPreference::OffPeakFirst,
            Some("r1"),
            Some("v1"),
        )
        .unwrap();
    ledger
        .settle_shares(settled, &[true, false], Some("gw"))
        .unwrap();
    let open = ledger
        .reserve(
            "kid",
            &[7_000],
            BucketPreference::OffPeakFirst,
            Some("r2"),
            Some("v1"),
        )
        .unwrap();
    ledger
        .set("parent", Bucket::Anytime, 50_000, Some("op"))
        .unwrap();
    let rt = runtime();
    rt.block_on(w.wait_durable()).unwrap();
    w.flush_and_stop(Duration::from_secs(5)).unwrap();

    let mut store = SqliteStore::open(&path, Durability::Sync).unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(loaded.last_seq + 1, ledger.next_seq());
    let restored = Ledger::new(
        LedgerConfig::default(),
        Arc::new(crate::ledger::NullSink),
        clock,
    );
    for a in loaded.accounts {
        restored.restore_account(a);
    }
    for r in loaded.open_reservations {
        restored.restore_reservation(r);
    }
    for name in ["parent", "kid"] {
        assert_eq!(restored.account(name), ledger.account(name), "{name}");
    }
    let back = restored
        .reservation(open)
        .expect("open reservation restored");
    assert_eq!(back.state, crate::ledger::ReservationState::InDoubt);
    assert_eq!(back.total_milli, 7_000);
    assert_eq!(back.reference.as_deref(), Some("r2"));
    let report = crate::store::verify::verify(&mut store).unwrap();
    assert!(report.is_ok(crate::ledger::Overdraft::Strict), "{report}");
}

/// Over SQLite: once another process takes the store over, the writer's
/// next commit is refused, its waiters fail at once, nothing more is
/// committed, and shutdown reports what was lost.
#[test]
fn a_fenced_writer_stops_and_fails_its_waiters() {
    use crate::ledger::ManualClock;
    use crate::store::fence::{FenceKeeper, NotOwner};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    // A long lease: the keeper does not renew during the test, so the
    // injected clock alone decides when the lease is stale.
    let lease = Duration::from_secs(300);
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let wall = clock.clone() as Arc<dyn Clock>;
    let metrics = Arc::new(Metrics::new());
    let (store, fence) =
        SqliteStore::open_owned(&path, Durability::Sync, lease, wall.clone()).unwrap();
    let keeper = FenceKeeper::start(fence, metrics.clone());
    assert_eq!(metrics.store_owner_token.get(), 1);
    let w = WriteBehind::owned(
        Box::new(store),
        keeper,
        config(64, Duration::from_millis(2)),
        metrics.clone(),
    );
    w.start(Weak::<NoDirectory>::new());
    let rt = runtime();
    w.record(&[entry(1)]);
    rt.block_on(w.wait_durable()).unwrap();
    assert_eq!(w.ensure_owner(), Ok(()));

    // Paused past its lease: its own view lapses first...
    clock.advance(300_001);
    assert!(matches!(
        w.ensure_owner(),
        Err(NotOwner::LeaseLapsed { .. })
    ));
    // ...then another process takes the store over.
    let (_b, fence_b) = SqliteStore::open_owned(&path, Durability::Sync, lease, wall).unwrap();
    assert_eq!(fence_b.token().0, 2);

    w.record(&[entry(2), entry(3)]);
    let started = Instant::now();
    assert_eq!(rt.block_on(w.wait_durable()), Err(StoreUnavailable));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed at once, not at ack_timeout"
    );
    match w.ensure_owner() {
        Err(NotOwner::Fenced { by: Some(owner) }) => assert_eq!(owner.token.0, 2),
        other => panic!("expected fenced, got {other:?}"),
    }
    assert_eq!(metrics.store_fenced.get(), 1);
    assert_eq!(rt.block_on(w.admit()), Err(StoreUnavailable));
    w.record(&[entry(4)]);
    assert_eq!(
        w.flush_and_stop(Duration::from_secs(5)),
        Err(FlushError::Fenced { unpersisted: 2 })
    );
    assert_eq!(metrics.store_entries_after_stop.get(), 3);

    let mut reader = SqliteStore::open_existing(&path).unwrap();
    let mut seqs = Vec::new();
    reader
        .for_each_entry(&mut |e| {
            seqs.push(e.seq);
            Ok(())
        })
        .unwrap();
    assert_eq!(seqs, vec![1], "nothing committed after the takeover");
    let record = reader.owner_record().unwrap();
    assert_eq!(
        (record.token.0, record.released),
        (2, false),
        "B still owns it"
    );
}
