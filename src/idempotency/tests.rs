//! The key table's rules on every backend (memory, SQLite, PostgreSQL):
//! claim, replay, mismatch, interruption, the bound, expiry and restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::clock::ManualClock;

const DAY_MS: i64 = 86_400_000;

fn answer(body: &str) -> StoredAnswer {
    StoredAnswer {
        status: 200,
        headers: vec![("Content-Type".into(), "application/xml".into())],
        body: body.as_bytes().to_vec(),
    }
}

/// Where a test's key table lives.
#[derive(Clone)]
enum Table {
    Memory,
    Sqlite(PathBuf),
    Postgres(Box<crate::store::pg::PgSettings>),
}

impl Table {
    fn is_some(&self) -> bool {
        !matches!(self, Table::Memory)
    }
}

/// A PostgreSQL store's database, migrated (as `tollgate run` does).
fn postgres(db: &crate::store::pg::testing::TestDb) -> Table {
    let settings =
        crate::store::pg::PgSettings::new(crate::store::pg::PgUrl::parse(&db.url()).unwrap());
    drop(
        crate::store::PgStore::open(&settings, crate::config::Durability::Sync, "test", 0).unwrap(),
    );
    Table::Postgres(Box::new(settings))
}

fn open(table: Table, clock: Arc<ManualClock>) -> Idempotency {
    let cfg = IdempotencyConfig {
        path: match &table {
            Table::Sqlite(p) => Some(p.clone()),
            _ => None,
        },
        max_keys: 3,
        wait: Duration::from_millis(300),
        ..IdempotencyConfig::default()
    };
    let clock: Arc<dyn Clock> = clock;
    match &table {
        Table::Postgres(settings) => {
            // The PostgreSQL client must not run on a tokio worker.
            let (cfg, settings) = (cfg.clone(), (**settings).clone());
            std::thread::spawn(move || Idempotency::open_postgres(&cfg, &settings, clock))
                .join()
                .unwrap()
                .unwrap()
        }
        _ => Idempotency::open_with_clock(&cfg, clock).unwrap(),
    }
}

async fn scenario(path: Table) {
    let clock = Arc::new(ManualClock::new(1_000));
    let t = open(path.clone(), clock.clone());
    let fp = fingerprint(&[b"GET", b"/api", b"a=1"]);
    let other = fingerprint(&[b"GET", b"/api", b"a=2"]);

    let Begin::Fresh(claim) = t.begin("john", "k1", fp).await else {
        panic!("fresh")
    };
    // While it runs: another request with the key waits; a different
    // request is refused at once.
    assert!(matches!(
        t.begin("john", "k1", other).await,
        Begin::Mismatch
    ));
    assert!(matches!(t.begin("john", "k1", fp).await, Begin::InProgress));
    claim.complete(answer("first"));
    t.flush().await;
    match t.begin("john", "k1", fp).await {
        Begin::Replay(a) => assert_eq!(a, answer("first")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        t.begin("john", "k1", other).await,
        Begin::Mismatch
    ));
    // Scoped per account.
    let Begin::Fresh(c) = t.begin("jane", "k1", other).await else {
        panic!("fresh for another account")
    };
    c.release();
    // Released: fresh again.
    let Begin::Fresh(c) = t.begin("jane", "k1", fp).await else {
        panic!("released key is free")
    };
    // Dropped without an answer: interrupted.
    drop(c);
    assert!(matches!(
        t.begin("jane", "k1", fp).await,
        Begin::Interrupted
    ));
    // Bounded: john/k1 and jane/k1 held; one more fits, then full.
    let Begin::Fresh(c) = t.begin("x", "k", fp).await else {
        panic!()
    };
    c.complete(answer("x"));
    assert!(matches!(t.begin("y", "k", fp).await, Begin::Full));
    // After the TTL every key is gone.
    clock.advance(DAY_MS);
    t.sweep();
    let Begin::Fresh(c) = t.begin("john", "k1", other).await else {
        panic!("expired key is free")
    };
    c.complete(answer("second"));
    t.flush().await;
    drop(t);

    if path.is_some() {
        // Survives a restart.
        let t = open(path, clock.clone());
        match t.begin("john", "k1", other).await {
            Begin::Replay(a) => assert_eq!(a, answer("second")),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn keys_in_memory() {
    scenario(Table::Memory).await;
}

#[tokio::test]
async fn keys_in_sqlite_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    scenario(Table::Sqlite(dir.path().join("keys.db"))).await;
}

/// `test` on a runtime of its own: the PostgreSQL database is created
/// and dropped outside it (the blocking client must not run on it).
fn on_runtime(test: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(test);
}

#[test]
fn keys_in_postgres_survive_a_restart() {
    let db = crate::store::pg::testing::TestDb::create("idem_scenario");
    on_runtime(scenario(postgres(&db)));
}

#[test]
fn keys_held_in_postgres() {
    let db = crate::store::pg::testing::TestDb::create("idem_held");
    on_runtime(keys_held_follows_the_table(postgres(&db)));
}

/// `keys_held` counts what `max_keys` counts: claimed and answered
/// keys, not released ones, until the sweep drops expired ones.
async fn keys_held_follows_the_table(path: Table) {
    let clock = Arc::new(ManualClock::new(1_000));
    let t = open(path.clone(), clock.clone());
    assert_eq!(t.keys_held(), 0);
    let fp = fingerprint(&[b"x"]);
    let Begin::Fresh(answered) = t.begin("a", "k1", fp).await else {
        panic!()
    };
    let Begin::Fresh(pending) = t.begin("a", "k2", fp).await else {
        panic!()
    };
    let Begin::Fresh(released) = t.begin("b", "k1", fp).await else {
        panic!()
    };
    t.flush().await;
    assert_eq!(t.keys_held(), 3, "claims count at once");
    answered.complete(answer("a"));
    released.release();
    t.flush().await;
    assert_eq!(t.keys_held(), 2, "the released key is gone");
    // A pending key stays held while its request runs.
    drop(pending);
    if path.is_some() {
        drop(t);
        let t = open(path.clone(), clock.clone());
        assert_eq!(t.keys_held(), 2, "counted from the file at start");
        clock.advance(DAY_MS);
        t.sweep();
        t.flush().await;
        assert_eq!(t.keys_held(), 0, "expired keys swept");
    } else {
        clock.advance(DAY_MS);
        assert_eq!(t.keys_held(), 2, "expired keys count until the sweep");
        t.sweep();
        assert_eq!(t.keys_held(), 0, "expired keys swept");
    }
}

#[tokio::test]
async fn keys_held_in_memory() {
    keys_held_follows_the_table(Table::Memory).await;
}

#[tokio::test]
async fn keys_held_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    keys_held_follows_the_table(Table::Sqlite(dir.path().join("keys.db"))).await;
}

#[tokio::test]
async fn a_waiting_retry_gets_the_first_answer() {
    let clock = Arc::new(ManualClock::new(1_000));
    let t = Arc::new(open(Table::Memory, clock));
    let fp = fingerprint(&[b"x"]);
    let Begin::Fresh(claim) = t.begin("a", "k", fp).await else {
        panic!()
    };
    let waiter = {
        let t = t.clone();
        tokio::spawn(async move { t.begin("a", "k", fp).await })
    };
    tokio::task::yield_now().await;
    claim.complete(answer("once"));
    match waiter.await.unwrap() {
        Begin::Replay(a) => assert_eq!(a.body, b"once"),
        other => panic!("{other:?}"),
    }
    assert_eq!(t.in_flight(), 0);
}

#[test]
fn keys_and_fingerprints() {
    assert!(valid_key(b"3f2a-uuid"));
    assert!(!valid_key(b""));
    assert!(!valid_key(b"has space"));
    assert!(!valid_key(&[b'a'; 256]));
    assert!(valid_key(&[b'a'; 255]));
    assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
}

// ---------------------------------------------------------------------------
// Two nodes of a cluster on one PostgreSQL table.
// ---------------------------------------------------------------------------

/// A node's key table in the shared mode (`cluster:`), opened off the
/// runtime as `tollgate run` does.
fn cluster_node(table: &Table, clock: Arc<ManualClock>, wait_ms: u64) -> Arc<Idempotency> {
    let Table::Postgres(settings) = table else {
        panic!("the shared mode needs PostgreSQL")
    };
    let cfg = IdempotencyConfig {
        max_keys: 100,
        wait: Duration::from_millis(wait_ms),
        ..IdempotencyConfig::default()
    };
    let (settings, clock): (_, Arc<dyn Clock>) = ((**settings).clone(), clock);
    let node =
        std::thread::spawn(move || Idempotency::open_postgres_cluster(&cfg, &settings, clock))
            .join()
            .unwrap()
            .unwrap();
    Arc::new(node)
}

#[test]
fn cluster_a_retry_on_another_node_waits_then_replays() {
    let db = crate::store::pg::testing::TestDb::create("idem_cluster_wait");
    let table = postgres(&db);
    on_runtime(async {
        let clock = Arc::new(ManualClock::new(1_000));
        let a = cluster_node(&table, clock.clone(), 5_000);
        let b = cluster_node(&table, clock.clone(), 5_000);
        let fp = fingerprint(&[b"POST", b"/api", b"to=1"]);
        let other = fingerprint(&[b"POST", b"/api", b"to=2"]);

        let Begin::Fresh(claim) = a.begin("john", "k1", fp).await else {
            panic!("fresh on A")
        };
        // The same key with another request on B: refused at once, from
        // the row A committed (B has nothing in memory).
        assert!(matches!(
            b.begin("john", "k1", other).await,
            Begin::Mismatch
        ));
        // The same request on B while A runs: B waits for A's answer.
        let started = tokio::time::Instant::now();
        let retry = {
            let b = b.clone();
            tokio::spawn(async move { b.begin("john", "k1", fp).await })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!retry.is_finished(), "B waits while A runs");
        claim.complete(answer("from A"));
        match retry.await.unwrap() {
            Begin::Replay(got) => assert_eq!(got, answer("from A")),
            other => panic!("{other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "woken by the poll"
        );
        assert_eq!(b.in_flight(), 0);
        // Done on A: B replays at once, A too; another request: 422.
        for node in [&a, &b] {
            match node.begin("john", "k1", fp).await {
                Begin::Replay(got) => assert_eq!(got, answer("from A")),
                other => panic!("{other:?}"),
            }
            assert!(matches!(
                node.begin("john", "k1", other).await,
                Begin::Mismatch
            ));
        }
        // Scoped per account across nodes too.
        let Begin::Fresh(c) = b.begin("jane", "k1", other).await else {
            panic!("another account's key is free")
        };
        c.complete(answer("jane"));
        b.flush().await;
        assert_eq!(b.keys_held(), 1, "B's claims since it counted");
        // A sweep recounts the shared table: every node's keys.
        clock.advance(SWEEP_EVERY_MS);
        b.sweep();
        b.flush().await;
        assert_eq!(b.keys_held(), 2, "both nodes' keys");
    });
}

#[test]
fn cluster_a_release_on_one_node_lets_another_run_afresh() {
    let db = crate::store::pg::testing::TestDb::create("idem_cluster_release");
    let table = postgres(&db);
    on_runtime(async {
        let clock = Arc::new(ManualClock::new(1_000));
        let a = cluster_node(&table, clock.clone(), 5_000);
        let b = cluster_node(&table, clock.clone(), 5_000);
        let fp = fingerprint(&[b"x"]);

        // Released while B waits: B claims the key itself.
        let Begin::Fresh(claim) = a.begin("john", "k", fp).await else {
            panic!()
        };
        let retry = {
            let b = b.clone();
            tokio::spawn(async move { b.begin("john", "k", fp).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        claim.release();
        let Begin::Fresh(on_b) = retry.await.unwrap() else {
            panic!("B runs afresh after A's release")
        };
        // Now B holds it: A's retry waits for B.
        on_b.complete(answer("from B"));
        b.flush().await;
        match a.begin("john", "k", fp).await {
            Begin::Replay(got) => assert_eq!(got, answer("from B")),
            other => panic!("{other:?}"),
        }

        // Released and committed before the retry: fresh at once.
        let Begin::Fresh(claim) = a.begin("john", "k2", fp).await else {
            panic!()
        };
        claim.release();
        a.flush().await;
        assert!(matches!(b.begin("john", "k2", fp).await, Begin::Fresh(_)));
    });
}

#[test]
fn cluster_a_key_left_pending_by_a_dead_node_is_409_never_a_second_run() {
    let db = crate::store::pg::testing::TestDb::create("idem_cluster_crash");
    let table = postgres(&db);
    on_runtime(async {
        let clock = Arc::new(ManualClock::new(1_000));
        let a = cluster_node(&table, clock.clone(), 300);
        let b = cluster_node(&table, clock.clone(), 300);
        let fp = fingerprint(&[b"x"]);
        let Begin::Fresh(claim) = a.begin("john", "k", fp).await else {
            panic!()
        };
        // A "crashes": the claim ends without an answer and the node goes.
        drop(claim);
        a.flush().await;
        drop(a);
        let started = tokio::time::Instant::now();
        assert!(matches!(b.begin("john", "k", fp).await, Begin::InProgress));
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "waited first"
        );
        // Every later retry, on any node: the same.
        let c = cluster_node(&table, clock.clone(), 100);
        assert!(matches!(c.begin("john", "k", fp).await, Begin::InProgress));
        assert!(matches!(b.begin("john", "k", fp).await, Begin::InProgress));
        // Until the key expires (without a sweep): then it is free.
        clock.advance(DAY_MS);
        let Begin::Fresh(claim) = c.begin("john", "k", fp).await else {
            panic!("an expired key is free")
        };
        claim.complete(answer("late"));
        c.flush().await;
        match b.begin("john", "k", fp).await {
            Begin::Replay(got) => assert_eq!(got, answer("late")),
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn cluster_nodes_claiming_one_key_at_once_run_it_once() {
    let db = crate::store::pg::testing::TestDb::create("idem_cluster_race");
    let table = postgres(&db);
    on_runtime(async {
        let clock = Arc::new(ManualClock::new(1_000));
        let nodes: Vec<_> = (0..3)
            .map(|_| cluster_node(&table, clock.clone(), 5_000))
            .collect();
        let fp = fingerprint(&[b"x"]);
        for round in 0..20 {
            let key = format!("k{round}");
            let tasks: Vec<_> = nodes
                .iter()
                .flat_map(|n| [n.clone(), n.clone()])
                .map(|n| {
                    let key = key.clone();
                    tokio::spawn(async move {
                        match n.begin("john", &key, fp).await {
                            Begin::Fresh(claim) => {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                claim.complete(answer(&key));
                                true
                            }
                            Begin::Replay(got) => {
                                assert_eq!(got, answer(&key));
                                false
                            }
                            other => panic!("{other:?}"),
                        }
                    })
                })
                .collect();
            let mut runs = 0;
            for t in tasks {
                runs += usize::from(t.await.unwrap());
            }
            assert_eq!(runs, 1, "round {round}: one run, every other replays");
        }
    });
}

/// Lets the test database accept sessions or not, and with `false` cuts
/// tollgate's; on a thread of its own (the blocking client must not run
/// on the test's runtime).
fn allow_connections(db: &str, allow: bool) {
    let db = db.to_string();
    std::thread::spawn(move || {
        let url = format!("{}/postgres", crate::store::pg::testing::server_url());
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.batch_execute(&format!(
            "ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS {allow}"
        ))
        .unwrap();
        if !allow {
            assert!(crate::store::pg::testing::terminate(&db, "tollgate") >= 1);
        }
    })
    .join()
    .unwrap();
}

#[test]
fn cluster_claims_fail_closed_when_postgres_is_gone() {
    let db = crate::store::pg::testing::TestDb::create("idem_cluster_down");
    let table = postgres(&db);
    on_runtime(async {
        let clock = Arc::new(ManualClock::new(1_000));
        let a = cluster_node(&table, clock.clone(), 300);
        let fp = fingerprint(&[b"x"]);
        let Begin::Fresh(held) = a.begin("john", "held", fp).await else {
            panic!()
        };
        allow_connections(&db.name, false);
        // A new key: refused before anything runs.
        assert!(matches!(
            a.begin("john", "new", fp).await,
            Begin::Unavailable
        ));
        assert_eq!(a.in_flight(), 1, "only the held claim");
        // An answer that cannot be stored: the key stays pending → 409.
        held.complete(answer("lost"));
        a.flush().await;
        allow_connections(&db.name, true);
        assert!(matches!(
            a.begin("john", "held", fp).await,
            Begin::InProgress
        ));
        // Back: new keys are claimed again (the session reconnects).
        assert!(matches!(a.begin("john", "new", fp).await, Begin::Fresh(_)));
    });
}
