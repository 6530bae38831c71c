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
