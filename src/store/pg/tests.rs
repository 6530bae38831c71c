//! The [`Store`] contract on PostgreSQL, the same shape as the SQLite
//! store's tests, plus what only a server can do: sessions that die,
//! answers lost after a commit, migrations. Each test has a database of its
//! own (see [`super::testing`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::testing::TestDb;
use super::*;
use crate::ledger::{replay, ManualClock};
use crate::store::fence::{FencingToken, OwnReason, OwnerBackend};

const NOW: i64 = 1_700_000_000_000;
const LEASE: Duration = Duration::from_secs(5);

fn settings(db: &TestDb) -> PgSettings {
    PgSettings::new(PgUrl::parse(&db.url()).unwrap())
}

fn open(db: &TestDb) -> PgStore {
    PgStore::open(&settings(db), Durability::Sync, "test-node", NOW).unwrap()
}

fn entry(seq: u64, kind: EntryKind, account: &str, amount_milli: i64, rid: Option<u64>) -> Entry {
    Entry {
        reference: Some(format!("r{seq}")),
        at_unix_ms: NOW + seq as i64,
        ..Entry::for_test(seq, kind, account, amount_milli, rid)
    }
}

fn meta(name: &str) -> AccountMeta {
    AccountMeta {
        name: name.into(),
        parent: None,
        role: Role::User,
        tariff_class: Some("gold".into()),
    }
}

fn all_entries(store: &mut PgStore) -> Vec<Entry> {
    let mut out = Vec::new();
    store
        .for_each_entry(&mut |e| {
            out.push(e);
            Ok(())
        })
        .unwrap();
    out
}

fn owned(db: &TestDb, clock: &Arc<ManualClock>) -> Result<(PgStore, Fence), StoreError> {
    PgStore::open_owned(
        &settings(db),
        Durability::Sync,
        LEASE,
        clock.clone() as Arc<dyn Clock>,
    )
}

fn verify_clean(store: &mut PgStore) -> crate::store::verify::VerifyReport {
    let report = crate::store::verify::verify(store).unwrap();
    assert!(report.is_ok(crate::ledger::Overdraft::Strict), "{report}");
    report
}

#[test]
fn every_field_of_every_entry_survives_a_commit() {
    let db = TestDb::create("fields");
    let mut s = open(&db);
    let mut seq = 0u64;
    let mut expected = Vec::new();
    for size in [1, 31, 32, 71, 1000] {
        let batch: Vec<Entry> = (0..size)
            .map(|i| {
                seq += 1;
                let mut e = entry(
                    seq,
                    EntryKind::ALL[i % EntryKind::ALL.len()],
                    &format!("acct{}", i % 5),
                    i as i64 - 3,
                    (i % 2 == 0).then_some(seq),
                );
                e.bucket = if i % 2 == 0 {
                    Bucket::Anytime
                } else {
                    Bucket::OffPeak
                };
                e.reference = (i % 3 != 0).then(|| format!("ref-{seq} ünï'cödé\"; --"));
                e.tariff_version = (i % 4 == 0).then(|| format!("v{i}"));
                e.at_unix_ms = i64::MAX - seq as i64;
                e
            })
            .collect();
        let metas: Vec<_> = (0..5).map(|i| meta(&format!("acct{i}"))).collect();
        s.commit(&batch, &metas).unwrap();
        expected.extend(batch);
    }
    assert_eq!(all_entries(&mut s), expected);
    // The node that wrote them is recorded.
    let nodes: Vec<(i32, String)> = db
        .client()
        .query(
            "SELECT DISTINCT e.node, n.name FROM entries e JOIN nodes n ON n.id = e.node",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(nodes, vec![(1, "test-node".to_string())]);
}

#[test]
fn migrations_are_applied_once_and_reported() {
    let db = TestDb::create("migrations");
    let s = settings(&db);
    let mut client = s.connect("test", None).unwrap();
    let before = schema::report(&mut client, &s).unwrap();
    assert_eq!(before.current, 0);
    assert_eq!(before.pending.len(), schema::MIGRATIONS.len());
    assert!(
        before.to_string().contains("5 pending migrations"),
        "{before}"
    );
    assert!(matches!(
        PgStore::open_snapshot(&s),
        Err(StoreError::NoSchema(_))
    ));

    // Two writers opening a new store at once: one applies, none twice.
    let applied: Vec<Vec<i32>> = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..3)
            .map(|_| {
                let s = s.clone();
                scope.spawn(move || {
                    let mut c = s.connect("test", Some(Duration::from_secs(10))).unwrap();
                    schema::migrate(&mut c, &s, NOW).unwrap()
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let mut all: Vec<i32> = applied.concat();
    all.sort_unstable();
    assert_eq!(all, vec![1, 2, 3, 4, 5], "{applied:?}");

    let after = schema::report(&mut client, &s).unwrap();
    assert_eq!(after.current, schema::SCHEMA_VERSION);
    assert!(after.pending.is_empty());
    assert_eq!(
        after.applied.iter().map(|a| a.version).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert!(after.applied.iter().all(|a| a.applied_unix_ms == NOW));
    assert!(
        after.to_string().contains("no pending migration"),
        "{after}"
    );
    // Opening again applies nothing; the store is usable.
    let mut store = open(&db);
    assert_eq!(store.load().unwrap(), Loaded::default());
    assert_eq!(
        schema::migrate(&mut client, &s, NOW + 1).unwrap(),
        Vec::<i32>::new()
    );

    // A newer schema than this build's is refused by writers and readers.
    client
        .execute(
            "INSERT INTO schema_migrations VALUES (99, 'from the future', 0)",
            &[],
        )
        .unwrap();
    assert!(matches!(
        PgStore::open(&s, Durability::Sync, "n", NOW),
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));
    assert!(matches!(
        PgStore::open_snapshot(&s),
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));
}

#[test]
fn balances_are_the_sum_of_committed_entries() {
    use EntryKind::*;
    let db = TestDb::create("balances");
    let mut s = open(&db);
    let b1 = vec![
        entry(2, Add, "b", 5_000, None),
        entry(1, Add, "a", 10_000, None),
        entry(3, Reserve, "a", 3_000, Some(3)),
        entry(4, Reserve, "b", 1_000, Some(4)),
        entry(5, Void, "b", -1_000, Some(4)),
    ];
    s.commit(&b1, &[meta("a"), meta("b")]).unwrap();
    let loaded = s.load().unwrap();
    assert_eq!(loaded.last_seq, 5);
    assert_eq!(loaded.open_reservations.len(), 1);
    let r = &loaded.open_reservations[0];
    assert_eq!((r.id, r.account.as_str()), (ReservationId(3), "a"));
    assert_eq!((r.anytime_milli, r.total_milli), (3_000, 3_000));
    assert_eq!(r.shares_milli, vec![3_000]);
    assert_eq!(r.reference.as_deref(), Some("r3"));
    let a = loaded.accounts.iter().find(|a| a.name == "a").unwrap();
    assert_eq!(a.tariff_class.as_deref(), Some("gold"));
    assert_eq!(
        a.anytime,
        BucketBalance {
            posted_milli: 10_000,
            reserved_milli: 3_000
        }
    );

    // An account the batch does not describe still gets a row.
    let b2 = vec![
        entry(6, Post, "a", -2_000, Some(3)),
        entry(7, Void, "a", -1_000, Some(3)),
        entry(8, Set, "c", 700, None),
    ];
    s.commit(&b2, &[meta("a")]).unwrap();
    let loaded = s.load().unwrap();
    assert!(loaded.open_reservations.is_empty());
    assert_eq!(loaded.last_seq, 8);
    let entries = all_entries(&mut s);
    assert_eq!(
        entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>(),
        "seq order, whatever the commit order"
    );
    let replayed = replay(&entries);
    for acct in s.stored_balances().unwrap() {
        for b in Bucket::ALL {
            let want = replayed
                .get(&(acct.name.clone(), b))
                .copied()
                .unwrap_or_default();
            assert_eq!(acct.bucket(b), want, "{} {b}", acct.name);
        }
    }
    let c = loaded.accounts.iter().find(|a| a.name == "c").unwrap();
    assert_eq!(c.role, Role::User);
    verify_clean(&mut s);
}

#[test]
fn loads_parents_before_children_and_restores_every_account() {
    let db = TestDb::create("parents");
    let mut s = open(&db);
    let child = AccountMeta {
        parent: Some("zz-parent".into()),
        ..meta("aa-child")
    };
    s.commit(
        &[
            entry(1, EntryKind::Add, "aa-child", 1, None),
            entry(2, EntryKind::Add, "zz-parent", 1, None),
        ],
        &[child, meta("zz-parent")],
    )
    .unwrap();
    let names: Vec<String> = s
        .load()
        .unwrap()
        .accounts
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, vec!["zz-parent", "aa-child"]);
    // Start-up's streamed read gives the ledger what `load` reads.
    let ledger = crate::ledger::Ledger::new(
        Default::default(),
        Arc::new(crate::ledger::NullSink),
        Arc::new(crate::ledger::SystemClock::new()),
    );
    let mut reader = PgStore::open_snapshot(&settings(&db)).unwrap();
    let n = reader
        .for_each_ready_account(&mut |a| {
            ledger.restore_ready([a]);
            Ok(())
        })
        .unwrap();
    assert_eq!(n, 2);
    for a in s.load().unwrap().accounts {
        assert_eq!(ledger.account(&a.name).as_ref(), Some(&a));
    }
}

#[test]
fn a_retried_batch_that_did_commit_is_not_applied_twice() {
    let db = TestDb::create("retry");
    let mut s = open(&db);
    let batch = vec![
        entry(1, EntryKind::Add, "a", 1_000, None),
        entry(2, EntryKind::Reserve, "a", 100, Some(2)),
    ];
    s.commit(&batch, &[meta("a")]).unwrap();
    // Pretend the commit reported an error although it committed.
    s.last_commit_failed = true;
    s.commit(&batch, &[meta("a")]).unwrap();
    assert_eq!(all_entries(&mut s).len(), 2);
    let a = &s.stored_balances().unwrap()[0];
    assert_eq!(
        (a.anytime.posted_milli, a.anytime.reserved_milli),
        (1_000, 100)
    );
    // Without the flag, a duplicate seq is an error, not a silent skip, and
    // changes nothing.
    assert!(s.commit(&batch, &[meta("a")]).is_err());
    assert_eq!(s.stored_balances().unwrap()[0].anytime.posted_milli, 1_000);
    assert_eq!(s.load().unwrap().open_reservations.len(), 1);
    verify_clean(&mut s);
}

/// A TCP relay between the store and PostgreSQL that can lose the
/// server's next answer and break the connection (what a network failure
/// right after a commit looks like to the client).
struct LossyRelay {
    addr: SocketAddr,
    drop_next_answer: Arc<AtomicBool>,
}

impl LossyRelay {
    fn start(upstream: SocketAddr) -> LossyRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let drop_next_answer = Arc::new(AtomicBool::new(false));
        let armed = drop_next_answer.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = c_read.read(&mut buf) {
                        if n == 0 || s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_write.shutdown(std::net::Shutdown::Both);
                });
                let armed = armed.clone();
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = s_read.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if armed.swap(false, Ordering::SeqCst) {
                            // The server answered (it had committed): lose it.
                            break;
                        }
                        if c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Both);
                    let _ = s_read.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        LossyRelay {
            addr,
            drop_next_answer,
        }
    }
}

#[test]
fn a_commit_whose_answer_is_lost_is_not_applied_twice() {
    let db = TestDb::create("lost_answer");
    drop(open(&db)); // the schema
    let direct = settings(&db);
    let host = direct.url.config().get_hosts().len();
    assert_eq!(host, 1);
    let port = direct
        .url
        .config()
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432);
    let relay = LossyRelay::start(format!("127.0.0.1:{port}").parse().unwrap());
    let user = direct.url.config().get_user().unwrap().to_string();
    let via_relay = PgSettings::new(
        PgUrl::parse(&format!("postgres://{user}@{}/{}", relay.addr, db.name)).unwrap(),
    );
    let mut s = PgStore::open(&via_relay, Durability::Sync, "test-node", NOW).unwrap();
    s.commit(&[entry(1, EntryKind::Add, "a", 1_000, None)], &[meta("a")])
        .unwrap();

    let batch = vec![
        entry(2, EntryKind::Add, "a", 5_000, None),
        entry(3, EntryKind::Reserve, "a", 700, Some(3)),
    ];
    relay.drop_next_answer.store(true, Ordering::SeqCst);
    let first = s.commit(&batch, &[meta("a")]);
    assert!(first.is_err(), "the answer was lost: {first:?}");
    // It did commit.
    let mut side = PgStore::open_snapshot(&direct).unwrap();
    assert_eq!(all_entries(&mut side).len(), 3);
    drop(side);
    // The writer retries the same batch (over a new session): a no-op.
    s.commit(&batch, &[meta("a")]).unwrap();
    let mut reader = PgStore::open_snapshot(&direct).unwrap();
    assert_eq!(all_entries(&mut reader).len(), 3);
    let a = &reader.stored_balances().unwrap()[0];
    assert_eq!(
        (a.anytime.posted_milli, a.anytime.reserved_milli),
        (6_000, 700)
    );
    assert_eq!(reader.load().unwrap().open_reservations.len(), 1);
    verify_clean(&mut reader);
}

#[test]
fn a_session_killed_mid_commit_commits_nothing_and_its_retry_commits_once() {
    let db = TestDb::create("killed");
    let metrics = Arc::new(Metrics::new());
    let mut s = open(&db).with_metrics(metrics.clone());
    s.commit(&[entry(1, EntryKind::Add, "a", 1_000, None)], &[meta("a")])
        .unwrap();
    // Make the next commit slow, so that it can be killed in the middle.
    let mut admin = db.client();
    admin
        .batch_execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$;
             CREATE TRIGGER slow BEFORE INSERT ON entries
                 FOR EACH STATEMENT EXECUTE FUNCTION slow();",
        )
        .unwrap();
    let batch = vec![entry(2, EntryKind::Add, "a", 5_000, None)];
    let killer = {
        let name = db.name.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            super::testing::terminate(&name, "tollgate writer")
        })
    };
    let first = s.commit(&batch, &[meta("a")]);
    assert_eq!(killer.join().unwrap(), 1);
    let err = first.expect_err("the session was killed mid-commit");
    assert!(matches!(err, StoreError::Postgres(_)), "{err}");
    admin.batch_execute("DROP TRIGGER slow ON entries").unwrap();
    let mut reader = PgStore::open_snapshot(&settings(&db)).unwrap();
    assert_eq!(all_entries(&mut reader).len(), 1, "nothing of it committed");
    drop(reader);
    // The retry reconnects and commits it, once.
    s.commit(&batch, &[meta("a")]).unwrap();
    assert_eq!(metrics.store_pg_reconnects.get(), 1);
    let mut reader = PgStore::open_snapshot(&settings(&db)).unwrap();
    assert_eq!(all_entries(&mut reader).len(), 2);
    assert_eq!(
        reader.stored_balances().unwrap()[0].anytime.posted_milli,
        6_000
    );
    verify_clean(&mut reader);
}

#[test]
fn statements_per_commit_do_not_grow_with_the_batch() {
    let db = TestDb::create("statements");
    let metrics = Arc::new(Metrics::new());
    let mut s = open(&db).with_metrics(metrics.clone());
    let mut seq = 0;
    for size in [1usize, 10, 100, 1000, 4096] {
        let before = metrics.store_pg_statements.get();
        let batch: Vec<Entry> = (0..size)
            .map(|i| {
                seq += 1;
                let kind = if i % 3 == 1 {
                    EntryKind::Reserve
                } else {
                    EntryKind::Add
                };
                entry(
                    seq,
                    kind,
                    &format!("acct{}", i % 97),
                    10,
                    (kind == EntryKind::Reserve).then_some(seq),
                )
            })
            .collect();
        s.commit(&batch, &[]).unwrap();
        assert_eq!(
            metrics.store_pg_statements.get() - before,
            1,
            "a batch of {size} entries"
        );
    }
    verify_clean(&mut PgStore::open_snapshot(&settings(&db)).unwrap());
}

#[test]
fn a_second_owner_is_refused_while_the_lease_is_fresh() {
    let db = TestDb::create("second_owner");
    let clock = Arc::new(ManualClock::new(NOW));
    let (_a, fence_a) = owned(&db, &clock).unwrap();
    assert_eq!(fence_a.token(), FencingToken(1));
    assert_eq!(fence_a.acquired().reason, OwnReason::Free);
    assert!(fence_a.acquired().holds_lock);

    clock.advance(5_000); // exactly the lease: not yet stale
    match owned(&db, &clock) {
        Err(StoreError::Owned {
            owner,
            lease_age_ms,
            ..
        }) => {
            assert_eq!(owner.pid, std::process::id());
            assert_eq!(owner.token, FencingToken(1));
            assert_eq!(lease_age_ms, 5_000);
        }
        other => panic!("expected Owned, got {other:?}"),
    }
    let record = PgStore::open_snapshot(&settings(&db))
        .unwrap()
        .owner_record()
        .unwrap();
    assert_eq!(
        record.token,
        FencingToken(1),
        "the refused claim changed nothing"
    );
}

#[test]
fn a_stale_lease_is_taken_over_and_the_old_owner_commits_nothing() {
    let db = TestDb::create("takeover");
    let clock = Arc::new(ManualClock::new(NOW));
    let (mut a, mut fence_a) = owned(&db, &clock).unwrap();
    a.commit(&[entry(1, EntryKind::Add, "a", 1_000, None)], &[meta("a")])
        .unwrap();

    clock.advance(5_001);
    let (mut b, fence_b) = owned(&db, &clock).unwrap();
    assert_eq!(fence_b.token(), FencingToken(2));
    assert_eq!(fence_b.acquired().reason, OwnReason::LeaseExpired);
    assert!(!fence_b.acquired().holds_lock, "A still holds the lock");

    let stale = [
        entry(2, EntryKind::Add, "a", 7_000, None),
        entry(3, EntryKind::Reserve, "a", 500, Some(3)),
    ];
    match a.commit(&stale, &[meta("a")]) {
        Err(StoreError::Fenced { owner: Some(owner) }) => {
            assert_eq!(owner.token, FencingToken(2));
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert!(fence_a.watch().is_fenced());
    let mut reader = PgStore::open_snapshot(&settings(&db)).unwrap();
    assert_eq!(all_entries(&mut reader).len(), 1);
    assert!(reader.load().unwrap().open_reservations.is_empty());
    drop(reader);
    assert!(matches!(
        a.commit(&stale, &[meta("a")]),
        Err(StoreError::Fenced { .. })
    ));
    assert!(matches!(fence_a.renew(), Err(StoreError::Fenced { .. })));

    // B commits; A lets go of the lock and B picks it up.
    b.commit(&[entry(2, EntryKind::Add, "a", 2_000, None)], &[meta("a")])
        .unwrap();
    fence_a.fenced(None);
    let mut fence_b = fence_b;
    fence_b.renew().unwrap();
    let mut reader = PgStore::open_snapshot(&settings(&db)).unwrap();
    let record = reader.owner_record().unwrap();
    assert_eq!((record.token, record.holds_lock), (FencingToken(2), true));
    assert_eq!(all_entries(&mut reader).len(), 2);
    verify_clean(&mut reader);
}

#[test]
fn a_dead_session_frees_the_store_at_once_and_a_release_too() {
    let db = TestDb::create("dead_holder");
    let clock = Arc::new(ManualClock::new(NOW));
    let (a, fence_a) = owned(&db, &clock).unwrap();
    // The owner's session dies with its process: the server frees the lock
    // (the record still says "held").
    assert_eq!(db.terminate("tollgate owner"), 1);
    std::mem::forget(fence_a); // no unlock, no release: as if killed
    drop(a);
    clock.advance(10);
    let mut tries = 0;
    let (b, fence_b) = loop {
        // The server ends the session asynchronously: a few ms at most.
        match owned(&db, &clock) {
            Ok(owned) => break owned,
            Err(StoreError::Owned { .. }) if tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(fence_b.acquired().reason, OwnReason::HolderDied);
    assert_eq!(fence_b.token(), FencingToken(2));
    drop(b);
    fence_b.release().unwrap();
    let record = PgStore::open_snapshot(&settings(&db))
        .unwrap()
        .owner_record()
        .unwrap();
    assert!(record.released && !record.holds_lock);
    let (_c, fence_c) = owned(&db, &clock).unwrap();
    assert_eq!(fence_c.acquired().reason, OwnReason::Free);
    assert_eq!(fence_c.token(), FencingToken(3));
}

#[test]
fn a_lock_lost_with_its_session_is_taken_again_at_the_next_renewal() {
    let db = TestDb::create("lock_lost");
    let clock = Arc::new(ManualClock::new(NOW));
    let (mut s, mut fence) = owned(&db, &clock).unwrap();
    // The server ends every session (what a restart does).
    assert!(db.terminate_sessions() >= 2);
    std::thread::sleep(Duration::from_millis(50));
    // The first renewal finds its session gone and fails; the next one
    // takes the lock on a new session and renews.
    let mut renewals = 0;
    while fence.renew().is_err() {
        renewals += 1;
        assert!(renewals < 5, "never renewed");
    }
    let mut probe = PgOwner::connect(&settings(&db), LEASE).unwrap();
    assert!(!probe.try_lock().unwrap(), "the owner holds the lock again");
    // The writer reconnects by itself too.
    let _ = s.commit(&[entry(1, EntryKind::Add, "a", 1, None)], &[meta("a")]);
    s.commit(&[entry(1, EntryKind::Add, "a", 1, None)], &[meta("a")])
        .unwrap();
    let record = PgStore::open_snapshot(&settings(&db))
        .unwrap()
        .owner_record()
        .unwrap();
    assert_eq!((record.token, record.holds_lock), (FencingToken(1), true));
    assert_eq!(
        PgStore::open_snapshot(&settings(&db))
            .unwrap()
            .stored_balances()
            .unwrap()[0]
            .anytime
            .posted_milli,
        1,
        "committed once"
    );
}

#[test]
fn a_snapshot_reader_sees_one_consistent_state_while_the_owner_commits() {
    let db = TestDb::create("snapshot");
    let clock = Arc::new(ManualClock::new(NOW));
    let (mut owner, _fence) = owned(&db, &clock).unwrap();
    owner
        .commit(&[entry(1, EntryKind::Add, "a", 1_000, None)], &[meta("a")])
        .unwrap();
    let mut reader = PgStore::open_snapshot(&settings(&db)).unwrap();
    let entries = all_entries(&mut reader);
    owner
        .commit(&[entry(2, EntryKind::Add, "a", 2_000, None)], &[meta("a")])
        .unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        reader.stored_balances().unwrap()[0].anytime.posted_milli,
        1_000
    );
    assert_eq!(verify_clean(&mut reader).entries, 1);
    // A snapshot never writes.
    assert!(reader
        .commit(&[entry(3, EntryKind::Add, "a", 1, None)], &[meta("a")])
        .is_err());
    let mut later = PgStore::open_snapshot(&settings(&db)).unwrap();
    assert_eq!(all_entries(&mut later).len(), 2);
}

#[test]
fn a_server_that_is_down_is_a_clear_error_without_the_password() {
    // Nothing listens on this port (bound and released).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = PgUrl::parse(&format!("postgres://tg:Pw-9zQx@127.0.0.1:{port}/ledger")).unwrap();
    let mut s = PgSettings::new(url);
    s.connect_timeout = Duration::from_millis(500);
    let e = PgStore::open(&s, Durability::Sync, "n", NOW).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("connecting to postgres://tg:***@127.0.0.1"),
        "{text}"
    );
    assert!(text.contains("refused"), "{text}");
    assert!(!text.contains("Pw-9zQx"), "{text}");
}
