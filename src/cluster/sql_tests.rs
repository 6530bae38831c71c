//! The grant protocol's SQL against the real local PostgreSQL (each test a
//! database of its own, `store::pg::testing`): leases and their fencing,
//! takes racing for the last credit, the group commit under a grant,
//! give-back, release, expiry of a dead node's grants (its committed
//! reservations stay), concurrent sweepers, credit actions, Boxis authcode
//! claims.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use super::sql::{self, ClusterError, CreditKind, Take};
use crate::config::Durability;
use crate::ledger::{Bucket, Entry, EntryKind, Role};
use crate::store::pg::testing::TestDb;
use crate::store::pg::{schema, NodeLease, PgSettings, PgStore, PgUrl};
use crate::store::{AccountMeta, Store, StoreError};

const NOW: i64 = 1_700_000_000_000;
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

fn settings(db: &TestDb) -> PgSettings {
    PgSettings::new(PgUrl::parse(&db.url()).unwrap())
}

/// A migrated store and a session on it.
fn session(db: &TestDb) -> (PgSettings, postgres::Client) {
    let s = settings(db);
    let mut c = s.connect("test", Some(Duration::from_secs(10))).unwrap();
    schema::migrate(&mut c, &s, NOW).unwrap();
    (s, c)
}

fn node(c: &mut postgres::Client, s: &PgSettings, name: &str) -> NodeLease {
    sql::register(c, s, name, LEASE, NOW).unwrap()
}

/// An account with `milli` of any-time credit, added by `by`.
fn fund(c: &mut postgres::Client, s: &PgSettings, by: NodeLease, account: &str, milli: i64) {
    let seq = sql::next_node_seq(c, s, by.node).unwrap();
    let got = sql::credit(
        c,
        s,
        by,
        seq,
        CreditKind::Add,
        account,
        Role::User,
        Bucket::Anytime,
        milli,
        Some("seed"),
        NOW,
    )
    .unwrap();
    assert_eq!(got, Some(milli));
}

fn anytime(c: &mut postgres::Client, s: &PgSettings, account: &str) -> sql::ClusterBalance {
    sql::balance(c, s, account).unwrap().unwrap()[0]
}

fn entry(seq: u64, kind: EntryKind, account: &str, amount_milli: i64, rid: u64) -> Entry {
    Entry {
        seq,
        kind,
        account: account.into(),
        bucket: Bucket::Anytime,
        amount_milli,
        reservation_id: Some(rid),
        reference: None,
        tariff_version: None,
        at_unix_ms: NOW,
    }
}

fn meta(name: &str) -> Vec<AccountMeta> {
    vec![AccountMeta {
        name: name.into(),
        parent: None,
        role: Role::User,
        tariff_class: None,
    }]
}

/// Makes `lease`'s lease (and last renewal) lie `ago_ms` in the past, as if
/// the node had stopped renewing that long ago: no sleeping in tests.
fn age_lease(c: &mut postgres::Client, lease: NodeLease, ago_ms: i64) {
    c.execute(
        "UPDATE cluster_nodes SET expires_at = now() - $2::bigint * interval '1 millisecond',
             renewed_at = now() - ($2::bigint + 30000) * interval '1 millisecond'
         WHERE node = $1",
        &[&lease.node, &ago_ms],
    )
    .unwrap();
}

/// A node's session parses and plans its per-request statements once:
/// however often they run, each is one prepared statement on the server,
/// and the answers are those of a plain client.
#[test]
fn a_session_prepares_each_frequent_statement_once() {
    let db = TestDb::create("cluster_session");
    let (s, mut c) = session(&db);
    let a = node(&mut c, &s, "node-a");
    fund(&mut c, &s, a, "john", 10_000);
    let mut session = sql::Session::new(s.connect("node", Some(Duration::from_secs(10))).unwrap());
    let prepared = |session: &mut sql::Session| -> i64 {
        session
            .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
            .unwrap()
            .get(0)
    };
    let before = prepared(&mut session);
    for round in 1..=3 {
        let take = sql::take(&mut session, &s, a, "john", Bucket::Anytime, 1_000).unwrap();
        assert_eq!(
            take,
            Take::Granted {
                grant_milli: round * 1_000,
                available_milli: 10_000 - round * 1_000,
            }
        );
        assert!(sql::give_back(&mut session, &s, a, "john", Bucket::Anytime, 500).unwrap());
        assert!(sql::take(&mut session, &s, a, "john", Bucket::Anytime, 500).is_ok());
        let balance = sql::balance(&mut session, &s, "john").unwrap().unwrap()[0];
        assert_eq!(balance.granted_milli, round * 1_000);
        assert_eq!(
            balance,
            anytime(&mut c, &s, "john"),
            "the same answer as a plain client"
        );
        let key = [round as u8; 16];
        assert!(sql::claim_authcode(&mut session, &s, &key, NOW / 1000 + 60, NOW / 1000).unwrap());
        assert!(!sql::claim_authcode(&mut session, &s, &key, NOW / 1000 + 60, NOW / 1000).unwrap());
    }
    assert_eq!(
        prepared(&mut session) - before,
        4,
        "take, give_back, balance, claim_authcode"
    );
}

#[test]
fn nodes_racing_for_an_account_never_take_more_than_it_holds() {
    let db = TestDb::create("cluster_race");
    let (s, mut c) = session(&db);
    let leases: Vec<NodeLease> = (0..4).map(|i| node(&mut c, &s, &format!("n{i}"))).collect();
    // 20 rounds: an account with exactly 10 takes' worth, 4 nodes × 5
    // attempts at once; then the last credit alone, 4 nodes at once.
    for round in 0..20 {
        let account = format!("acct{round}");
        fund(&mut c, &s, leases[0], &account, 1_000);
        let barrier = Arc::new(Barrier::new(leases.len()));
        let granted: Vec<i64> = std::thread::scope(|scope| {
            let runs: Vec<_> = leases
                .iter()
                .map(|&lease| {
                    let (s, account, barrier) = (s.clone(), account.clone(), barrier.clone());
                    scope.spawn(move || {
                        let mut c = s.connect("racer", Some(Duration::from_secs(10))).unwrap();
                        barrier.wait();
                        let mut got = 0;
                        for _ in 0..5 {
                            if let Take::Granted { .. } =
                                sql::take(&mut c, &s, lease, &account, Bucket::Anytime, 100)
                                    .unwrap()
                            {
                                got += 100;
                            }
                        }
                        got
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(
            granted.iter().sum::<i64>(),
            1_000,
            "round {round}: {granted:?}"
        );
        let b = anytime(&mut c, &s, &account);
        assert_eq!((b.granted_milli, b.ungranted_milli()), (1_000, 0));
        let rows: i64 = leases
            .iter()
            .map(|l| sql::grant_of(&mut c, &s, l.node, &account, Bucket::Anytime).unwrap())
            .sum();
        assert_eq!(rows, 1_000, "granted = Σ grants");
    }
    // The last credit: one of four nodes gets it.
    fund(&mut c, &s, leases[0], "last", 1);
    let barrier = Arc::new(Barrier::new(leases.len()));
    let wins: usize = std::thread::scope(|scope| {
        let runs: Vec<_> = leases
            .iter()
            .map(|&lease| {
                let (s, barrier) = (s.clone(), barrier.clone());
                scope.spawn(move || {
                    let mut c = s.connect("racer", Some(Duration::from_secs(10))).unwrap();
                    barrier.wait();
                    matches!(
                        sql::take(&mut c, &s, lease, "last", Bucket::Anytime, 1).unwrap(),
                        Take::Granted { .. }
                    )
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| usize::from(r.join().unwrap()))
            .sum()
    });
    assert_eq!(wins, 1);
}

#[test]
fn a_commit_moves_reserved_credit_out_of_the_grant_and_voids_back_in() {
    let db = TestDb::create("cluster_commit");
    let (s, mut c) = session(&db);
    let lease = node(&mut c, &s, "a");
    fund(&mut c, &s, lease, "john", 10_000);
    assert_eq!(
        sql::take(&mut c, &s, lease, "john", Bucket::Anytime, 5_000).unwrap(),
        Take::Granted {
            grant_milli: 5_000,
            available_milli: 5_000
        }
    );
    let mut store = PgStore::open_under_lease(&s, Durability::Sync, lease).unwrap();
    let base = sql::next_node_seq(&mut c, &s, lease.node).unwrap();
    // reserve 1000 (posted 800, voided 200) and an open reservation of 700.
    let batch = vec![
        entry(base, EntryKind::Reserve, "john", 1_000, base),
        entry(base + 1, EntryKind::Post, "john", -800, base),
        entry(base + 2, EntryKind::Void, "john", -200, base),
        entry(base + 3, EntryKind::Reserve, "john", 700, base + 3),
    ];
    store.commit(&batch, &meta("john")).unwrap();
    let b = anytime(&mut c, &s, "john");
    assert_eq!(b.posted_milli, 9_200);
    assert_eq!(b.reserved_milli, 700);
    assert_eq!(b.granted_milli, 5_000 - 1_000 + 200 - 700);
    assert_eq!(
        sql::grant_of(&mut c, &s, lease.node, "john", Bucket::Anytime).unwrap(),
        3_500
    );
    assert_eq!(
        b.ungranted_milli(),
        5_000,
        "the rest of the account untouched"
    );
    // The journal replays to the stored balances (what `ledger verify`
    // checks), with the entries tagged with the node.
    let report = crate::store::verify::verify(&mut store).unwrap();
    assert!(report.is_ok(crate::ledger::Overdraft::Strict), "{report}");
    let tagged: i64 = c
        .query_one(
            "SELECT count(*) FROM entries WHERE node = $1",
            &[&lease.node],
        )
        .unwrap()
        .get(0);
    assert_eq!(tagged, 5, "the seed and the batch");

    // More than the grant holds: the whole statement fails, nothing written.
    let over = vec![entry(base + 4, EntryKind::Reserve, "john", 3_501, base + 4)];
    let e = store.commit(&over, &meta("john")).unwrap_err();
    assert!(matches!(e, StoreError::Postgres(_)), "{e}");
    assert_eq!(anytime(&mut c, &s, "john"), b);
}

#[test]
fn after_its_lease_expired_a_node_can_neither_commit_nor_take_nor_renew() {
    let db = TestDb::create("cluster_fenced");
    let (s, mut c) = session(&db);
    let lease = node(&mut c, &s, "a");
    fund(&mut c, &s, lease, "john", 10_000);
    sql::take(&mut c, &s, lease, "john", Bucket::Anytime, 5_000).unwrap();
    let mut store = PgStore::open_under_lease(&s, Durability::Sync, lease).unwrap();
    let base = sql::next_node_seq(&mut c, &s, lease.node).unwrap();
    store
        .commit(
            &[entry(base, EntryKind::Reserve, "john", 1_000, base)],
            &meta("john"),
        )
        .unwrap();
    sql::renew(&mut c, &s, lease, LEASE).unwrap();

    age_lease(&mut c, lease, 1);
    let before = anytime(&mut c, &s, "john");
    let e = store
        .commit(
            &[entry(base + 1, EntryKind::Post, "john", -1_000, base)],
            &meta("john"),
        )
        .unwrap_err();
    assert!(matches!(e, StoreError::LeaseLost { .. }), "{e}");
    assert_eq!(anytime(&mut c, &s, "john"), before, "nothing written");
    assert_eq!(
        sql::next_node_seq(&mut c, &s, lease.node).unwrap(),
        base + 1
    );
    assert!(matches!(
        sql::renew(&mut c, &s, lease, LEASE),
        Err(ClusterError::Fenced { .. })
    ));
    assert!(matches!(
        sql::take(&mut c, &s, lease, "john", Bucket::Anytime, 1),
        Err(ClusterError::Fenced { .. })
    ));
    assert!(matches!(
        sql::credit(
            &mut c,
            &s,
            lease,
            base + 1,
            CreditKind::Add,
            "john",
            Role::User,
            Bucket::Anytime,
            5,
            None,
            NOW
        ),
        Err(ClusterError::Fenced { .. })
    ));
    // A new incarnation gets a new token; the old one stays fenced.
    let again = node(&mut c, &s, "a");
    assert_eq!(again.node, lease.node);
    assert!(again.token > lease.token);
    let e = store
        .commit(
            &[entry(base + 1, EntryKind::Post, "john", -1_000, base)],
            &meta("john"),
        )
        .unwrap_err();
    assert!(matches!(e, StoreError::LeaseLost { .. }), "{e}");
    // Registering returned the old incarnation's grant; its committed
    // reservation stays reserved.
    let b = anytime(&mut c, &s, "john");
    assert_eq!((b.reserved_milli, b.granted_milli), (1_000, 0));
    assert_eq!(b.ungranted_milli(), 9_000);
}

#[test]
fn a_live_lease_refuses_a_second_incarnation_and_a_release_frees_it() {
    let db = TestDb::create("cluster_held");
    let (s, mut c) = session(&db);
    let lease = node(&mut c, &s, "a");
    fund(&mut c, &s, lease, "john", 10_000);
    sql::take(&mut c, &s, lease, "john", Bucket::Anytime, 4_000).unwrap();
    match sql::register(&mut c, &s, "a", LEASE, NOW) {
        Err(e @ ClusterError::LeaseHeld { .. }) => {
            let text = e.to_string();
            assert!(text.contains("already running"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    // Give back: only what the grant holds.
    assert!(!sql::give_back(&mut c, &s, lease, "john", Bucket::Anytime, 4_001).unwrap());
    assert!(sql::give_back(&mut c, &s, lease, "john", Bucket::Anytime, 1_000).unwrap());
    assert_eq!(anytime(&mut c, &s, "john").granted_milli, 3_000);
    assert_eq!(sql::release(&mut c, &s, lease).unwrap(), 3_000);
    assert_eq!(anytime(&mut c, &s, "john").granted_milli, 0);
    assert!(matches!(
        sql::release(&mut c, &s, lease),
        Err(ClusterError::Fenced { .. })
    ));
    let again = node(&mut c, &s, "a");
    assert!(again.token > lease.token);
    let status = sql::status(&mut c, &s).unwrap();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].name, "a");
    assert!(status[0].lease_left_ms > 0 && !status[0].released);
}

#[test]
fn a_dead_nodes_grants_come_back_after_the_ttl_and_its_reservations_stay() {
    let db = TestDb::create("cluster_expire");
    let (s, mut c) = session(&db);
    let dead = node(&mut c, &s, "dead");
    let alive = node(&mut c, &s, "alive");
    fund(&mut c, &s, alive, "john", 10_000);
    sql::take(&mut c, &s, dead, "john", Bucket::Anytime, 3_000).unwrap();
    sql::take(&mut c, &s, alive, "john", Bucket::Anytime, 2_000).unwrap();
    let mut store = PgStore::open_under_lease(&s, Durability::Sync, dead).unwrap();
    let base = sql::next_node_seq(&mut c, &s, dead.node).unwrap();
    store
        .commit(
            &[entry(base, EntryKind::Reserve, "john", 1_000, base)],
            &meta("john"),
        )
        .unwrap();
    drop(store);
    // Not yet: the lease is valid.
    assert_eq!(
        sql::expire(&mut c, &s, TTL).unwrap(),
        sql::Expired::default()
    );
    // Expired, but not for the TTL yet.
    c.execute(
        "UPDATE cluster_nodes SET expires_at = now() - interval '1 ms',
             renewed_at = now() - interval '31 s' WHERE node = $1",
        &[&dead.node],
    )
    .unwrap();
    assert_eq!(sql::expire(&mut c, &s, TTL).unwrap().returned_milli, 0);
    age_lease(&mut c, dead, TTL.as_millis() as i64);
    // Several sweepers at once: returned exactly once.
    let barrier = Arc::new(Barrier::new(4));
    let returned: i64 = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..4)
            .map(|_| {
                let (s, barrier) = (s.clone(), barrier.clone());
                scope.spawn(move || {
                    let mut c = s.connect("sweeper", Some(Duration::from_secs(10))).unwrap();
                    barrier.wait();
                    sql::expire(&mut c, &s, TTL).unwrap().returned_milli
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).sum()
    });
    assert_eq!(
        returned, 2_000,
        "the dead node's grant less what it reserved"
    );
    let b = anytime(&mut c, &s, "john");
    assert_eq!(
        b.reserved_milli, 1_000,
        "committed reservation stays (in doubt)"
    );
    assert_eq!(b.granted_milli, 2_000, "the live node's grant untouched");
    assert_eq!(b.ungranted_milli(), 7_000);
    let open: i64 = c
        .query_one(
            "SELECT count(*) FROM open_reservations WHERE node = $1",
            &[&dead.node],
        )
        .unwrap()
        .get(0);
    assert_eq!(open, 1);
}

#[test]
fn credit_actions_are_cluster_wide_and_never_take_what_nodes_hold() {
    let db = TestDb::create("cluster_credit");
    let (s, mut c) = session(&db);
    let a = node(&mut c, &s, "a");
    let b = node(&mut c, &s, "b");
    fund(&mut c, &s, a, "john", 10_000);
    sql::take(&mut c, &s, b, "john", Bucket::Anytime, 6_000).unwrap();
    let mut seq = sql::next_node_seq(&mut c, &s, a.node).unwrap();
    let mut credit = |c: &mut postgres::Client, kind, amount| {
        let r = sql::credit(
            c,
            &s,
            a,
            seq,
            kind,
            "john",
            Role::User,
            Bucket::Anytime,
            amount,
            None,
            NOW,
        )
        .unwrap();
        seq += 1;
        r
    };
    // Node b holds 6000: a deduction may take only the ungranted 4000.
    assert_eq!(credit(&mut c, CreditKind::Add, -4_001), None);
    assert_eq!(credit(&mut c, CreditKind::Add, -1_000), Some(-1_000));
    assert_eq!(credit(&mut c, CreditKind::Set, 5_999), None);
    assert_eq!(credit(&mut c, CreditKind::Set, 7_000), Some(-2_000));
    assert_eq!(credit(&mut c, CreditKind::Set, 7_000), Some(0));
    let bal = anytime(&mut c, &s, "john");
    assert_eq!((bal.balance_milli(), bal.ungranted_milli()), (7_000, 1_000));
    // Visible to the next take of any node.
    assert!(matches!(
        sql::take(&mut c, &s, b, "john", Bucket::Anytime, 1_001).unwrap(),
        Take::Insufficient {
            available_milli: 1_000
        }
    ));
    // Node seq ranges never collide; the journal replays to the balances.
    assert!(sql::next_node_seq(&mut c, &s, b.node).unwrap() < sql::node_seq_base(b.node + 1));
    let mut reader = PgStore::open_snapshot(&s).unwrap();
    let report = crate::store::verify::verify(&mut reader).unwrap();
    assert!(report.is_ok(crate::ledger::Overdraft::Strict), "{report}");
}

#[test]
fn a_boxis_authcode_is_claimed_once_across_nodes_until_it_expires() {
    let db = TestDb::create("cluster_authcodes");
    let (s, mut a) = session(&db);
    let mut b = s.connect("node-b", Some(Duration::from_secs(10))).unwrap();
    let now = NOW / 1000;
    let (key, other) = ([7u8; 16], [8u8; 16]);
    let claim = |c: &mut postgres::Client, key: [u8; 16], expires, now| {
        sql::claim_authcode(c, &s, &key, expires, now).unwrap()
    };
    assert!(claim(&mut a, key, now + 301, now));
    // The same key again, on another node's session or this one: a
    // replay, up to the last second of its window.
    assert!(!claim(&mut b, key, now + 301, now + 10));
    assert!(!claim(&mut a, key, now + 301, now + 300));
    // Another key is fresh.
    assert!(claim(&mut b, other, now + 101, now));
    // Expired (its timestamp left the window): claimable again, and the
    // new claim holds.
    assert!(claim(&mut b, key, now + 700, now + 301));
    assert!(!claim(&mut a, key, now + 700, now + 302));

    // The sweep deletes only what expired before its bound.
    assert_eq!(sql::expire_authcodes(&mut a, &s, now + 102).unwrap(), 1);
    assert_eq!(sql::expire_authcodes(&mut a, &s, now + 102).unwrap(), 0);
    assert!(!claim(&mut b, key, now + 700, now + 400));
    let rows: i64 = a
        .query_one("SELECT count(*) FROM boxis_authcodes", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);

    // Eight nodes claiming one new key at once: exactly one gets it.
    let racers = 8;
    let barrier = Arc::new(Barrier::new(racers));
    let won: usize = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..racers)
            .map(|_| {
                let (s, barrier) = (s.clone(), barrier.clone());
                scope.spawn(move || {
                    let mut c = s.connect("racer", Some(Duration::from_secs(10))).unwrap();
                    barrier.wait();
                    sql::claim_authcode(&mut c, &s, &[9u8; 16], now + 301, now).unwrap()
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| usize::from(r.join().unwrap()))
            .sum()
    });
    assert_eq!(won, 1);
}

fn keeper_config(name: &str) -> crate::config::cluster::ClusterConfig {
    crate::config::cluster::ClusterConfig {
        node_id: name.into(),
        lease: Duration::from_millis(3_000),
        lease_renew: Duration::from_millis(200),
        lease_margin: Duration::from_millis(1_500),
        grant_ttl: Duration::from_millis(10_000),
        grant_min_milli: 1_000,
        grant_max_milli: 1_000_000,
        grant_target_s: 5,
        top_up_below_percent: 50,
        direct_below_milli: 5_000,
        grant_idle: Duration::from_millis(2_000),
    }
}

/// Polls `done` every 10 ms for up to `within`; panics naming `what`.
fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn lease_valid_on_the_database(c: &mut postgres::Client, lease: NodeLease) -> bool {
    c.query_one(
        "SELECT expires_at > now() FROM cluster_nodes WHERE node = $1",
        &[&lease.node],
    )
    .unwrap()
    .get(0)
}

#[test]
fn a_node_cut_off_from_postgres_stops_spending_before_its_lease_expires_there() {
    use super::keeper::LeaseKeeper;
    let db = TestDb::create("cluster_keeper");
    let (s, mut c) = session(&db);
    let keeper = LeaseKeeper::start(&s, &keeper_config("k"), NOW).unwrap();
    let lease = keeper.lease();
    assert!(keeper.may_spend());
    wait_for("three renewals", Duration::from_secs(10), || {
        keeper.renewals().0 >= 3
    });
    assert!(keeper.may_spend());
    // A second incarnation of the same node id is refused meanwhile.
    assert!(matches!(
        LeaseKeeper::start(&s, &keeper_config("k"), NOW),
        Err(ClusterError::LeaseHeld { .. })
    ));

    // Cut off: no new session to the database, the keeper's killed.
    let mut admin = postgres::Client::connect(
        &format!("{}/postgres", crate::store::pg::testing::server_url()),
        postgres::NoTls,
    )
    .unwrap();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS false",
            db.name
        ))
        .unwrap();
    assert!(db.terminate("tollgate lease") >= 1);
    wait_for("the node to stop spending", Duration::from_secs(10), || {
        !keeper.may_spend()
    });
    assert!(
        lease_valid_on_the_database(&mut c, lease),
        "the node stopped spending while the database still counts its lease"
    );
    assert!(keeper.renewals().1 >= 1, "failed renewals are counted");

    // Back after the lease expired there: the renewal is refused, the node
    // is fenced for good.
    wait_for("the lease to expire", Duration::from_secs(10), || {
        !lease_valid_on_the_database(&mut c, lease)
    });
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true",
            db.name
        ))
        .unwrap();
    wait_for(
        "the keeper to see it is fenced",
        Duration::from_secs(10),
        || keeper.fenced(),
    );
    assert!(!keeper.may_spend());
}

#[test]
fn a_released_keeper_gives_every_grant_back_and_sweeps_dead_nodes() {
    use super::keeper::LeaseKeeper;
    let db = TestDb::create("cluster_keeper_release");
    let (s, mut c) = session(&db);
    let dead = node(&mut c, &s, "dead");
    fund(&mut c, &s, dead, "john", 10_000);
    sql::take(&mut c, &s, dead, "john", Bucket::Anytime, 4_000).unwrap();
    age_lease(&mut c, dead, 20_000);
    let keeper = LeaseKeeper::start(&s, &keeper_config("k"), NOW).unwrap();
    wait_for(
        "the dead node's grants swept",
        Duration::from_secs(10),
        || keeper.swept_milli() == 4_000,
    );
    sql::take(&mut c, &s, keeper.lease(), "john", Bucket::Anytime, 3_000).unwrap();
    assert_eq!(keeper.release().unwrap(), 3_000);
    let b = anytime(&mut c, &s, "john");
    assert_eq!((b.granted_milli, b.ungranted_milli()), (0, 10_000));
    // Released: a new incarnation may start at once.
    let again = LeaseKeeper::start(&s, &keeper_config("k"), NOW).unwrap();
    assert!(again.may_spend());
}

/// The SQL against its specification: random sequences of takes,
/// give-backs, batches (valid and overdrawing), credit actions, node deaths
/// with expiry and re-registration, run on PostgreSQL and on
/// [`super::model::Db`] side by side; every outcome and every balance,
/// grant and sum must agree after every step.
mod against_the_model {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::super::model::{Change, Db, DbAccount, Lease, Refused};
    use super::*;

    /// The (account, bucket) slots the operations pick from: the model is
    /// one bucket per key, the SQL carries two per account row.
    const ACCOUNTS: [(&str, Bucket); 3] = [
        ("x", Bucket::Anytime),
        ("x", Bucket::OffPeak),
        ("y", Bucket::Anytime),
    ];
    const NODES: usize = 2;

    fn bucket(a: usize) -> Bucket {
        ACCOUNTS[a].1
    }

    #[derive(Clone, Debug)]
    enum Op {
        Take(usize, usize, i64),
        GiveBack(usize, usize, i64),
        /// A batch of a node: reserves of these amounts on these accounts,
        /// then settles of its open reservations (pick, spent %).
        Batch(usize, Vec<(usize, i64)>, Vec<(usize, i64)>),
        Credit(usize, i64),
        /// The node dies: its lease lies in the past; a sweep; it registers again.
        Die(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..NODES, 0..ACCOUNTS.len(), 1i64..3_000).prop_map(|(n, a, x)| Op::Take(n, a, x)),
            1 => (0..NODES, 0..ACCOUNTS.len(), 1i64..3_000).prop_map(|(n, a, x)| Op::GiveBack(n, a, x)),
            4 => (
                0..NODES,
                proptest::collection::vec((0..ACCOUNTS.len(), 0i64..1_500), 0..3),
                proptest::collection::vec((any::<usize>(), 0i64..=100), 0..3),
            )
                .prop_map(|(n, r, s)| Op::Batch(n, r, s)),
            1 => (0..ACCOUNTS.len(), -2_000i64..4_000).prop_map(|(a, d)| Op::Credit(a, d)),
            1 => (0..NODES).prop_map(Op::Die),
        ]
    }

    struct Side {
        s: PgSettings,
        c: postgres::Client,
        prefix: String,
        leases: Vec<NodeLease>,
        stores: Vec<PgStore>,
        seqs: Vec<u64>,
        model: Db,
        /// Open committed reservations per node: id → (account, amount left).
        open: Vec<BTreeMap<u64, (usize, i64)>>,
    }

    impl Side {
        fn account(&self, a: usize) -> String {
            format!("{}{}", self.prefix, ACCOUNTS[a].0)
        }

        /// The model's key of slot `a`.
        fn key(&self, a: usize) -> String {
            format!("{}:{}", self.account(a), ACCOUNTS[a].1.as_str())
        }

        fn register(&mut self, i: usize) {
            let name = format!("{}n{i}", self.prefix);
            let lease = sql::register(&mut self.c, &self.s, &name, LEASE, NOW).unwrap();
            let node = lease.node as u32;
            let token = self.model.register(node, 1_000_000).unwrap();
            self.model.leases.get_mut(&node).unwrap().token = token;
            let store = PgStore::open_under_lease(&self.s, Durability::Sync, lease).unwrap();
            let seq = sql::next_node_seq(&mut self.c, &self.s, lease.node).unwrap();
            if i < self.leases.len() {
                self.leases[i] = lease;
                self.stores[i] = store;
                self.seqs[i] = self.seqs[i].max(seq);
            } else {
                self.leases.push(lease);
                self.stores.push(store);
                self.seqs.push(seq);
                self.open.push(BTreeMap::new());
            }
        }

        fn model_token(&self, i: usize) -> u64 {
            self.model.leases[&(self.leases[i].node as u32)].token
        }

        fn next_seq(&mut self, i: usize) -> u64 {
            let seq = self.seqs[i];
            self.seqs[i] += 1;
            seq
        }

        fn apply(&mut self, op: &Op) {
            match op {
                Op::Take(i, a, x) => {
                    let (lease, account, key) = (self.leases[*i], self.account(*a), self.key(*a));
                    let got =
                        sql::take(&mut self.c, &self.s, lease, &account, bucket(*a), *x).unwrap();
                    let want = self
                        .model
                        .take(lease.node as u32, self.model_token(*i), &key, *x);
                    match (got, want) {
                        (Take::Granted { .. }, Ok(())) => {}
                        (
                            Take::Insufficient { available_milli },
                            Err(Refused::Insufficient { available_milli: m }),
                        ) => {
                            assert_eq!(available_milli, m.max(0));
                        }
                        other => panic!("take disagrees: {other:?}"),
                    }
                }
                Op::GiveBack(i, a, x) => {
                    let (lease, account, key) = (self.leases[*i], self.account(*a), self.key(*a));
                    let got = sql::give_back(&mut self.c, &self.s, lease, &account, bucket(*a), *x)
                        .unwrap();
                    let want = self
                        .model
                        .give_back(lease.node as u32, self.model_token(*i), &key, *x)
                        .is_ok();
                    assert_eq!(got, want, "give back");
                }
                Op::Batch(i, reserves, settles) => {
                    let i = *i;
                    let mut entries = Vec::new();
                    let mut changes = Vec::new();
                    let mut opened = Vec::new();
                    for (a, x) in reserves {
                        let seq = self.next_seq(i);
                        let (account, bucket) = (self.account(*a), bucket(*a));
                        entries.push(Entry {
                            bucket,
                            ..entry(seq, EntryKind::Reserve, &account, *x, seq)
                        });
                        changes.push(Change::Reserve {
                            id: seq,
                            account: self.key(*a),
                            amount_milli: *x,
                        });
                        opened.push((seq, *a, *x));
                    }
                    let mut settled = Vec::new();
                    let ids: Vec<u64> = self.open[i].keys().copied().collect();
                    for (pick, percent) in settles {
                        if ids.is_empty() {
                            break;
                        }
                        let id = ids[pick % ids.len()];
                        if settled.contains(&id) {
                            continue;
                        }
                        settled.push(id);
                        let (a, left) = self.open[i][&id];
                        let (account, bucket, key) = (self.account(a), bucket(a), self.key(a));
                        let spent = left * percent / 100;
                        if spent > 0 {
                            let seq = self.next_seq(i);
                            entries.push(Entry {
                                bucket,
                                ..entry(seq, EntryKind::Post, &account, -spent, id)
                            });
                            changes.push(Change::Post {
                                id,
                                account: key.clone(),
                                amount_milli: spent,
                            });
                        }
                        if left - spent > 0 {
                            let seq = self.next_seq(i);
                            entries.push(Entry {
                                bucket,
                                ..entry(seq, EntryKind::Void, &account, spent - left, id)
                            });
                            changes.push(Change::Void {
                                id,
                                account: key,
                                amount_milli: left - spent,
                            });
                        }
                    }
                    if entries.is_empty() {
                        return;
                    }
                    let metas: Vec<AccountMeta> = (0..ACCOUNTS.len())
                        .flat_map(|a| meta(&self.account(a)))
                        .collect();
                    let got = self.stores[i].commit(&entries, &metas);
                    let want = self.model.commit(
                        self.leases[i].node as u32,
                        self.model_token(i),
                        &changes,
                    );
                    match (&got, &want) {
                        (Ok(()), Ok(())) => {
                            for id in settled {
                                self.open[i].remove(&id);
                            }
                            for (id, a, x) in opened {
                                if x > 0 {
                                    self.open[i].insert(id, (a, x));
                                }
                            }
                        }
                        (Err(StoreError::Postgres(text)), Err(Refused::GrantOverdrawn)) => {
                            assert!(text.contains("grants_amount_milli_check"), "{text}");
                        }
                        other => panic!("batch disagrees: {other:?}"),
                    }
                }
                Op::Credit(a, d) => {
                    let account = self.account(*a);
                    let seq = self.next_seq(0);
                    let got = sql::credit(
                        &mut self.c,
                        &self.s,
                        self.leases[0],
                        seq,
                        CreditKind::Add,
                        &account,
                        Role::User,
                        bucket(*a),
                        *d,
                        None,
                        NOW,
                    )
                    .unwrap();
                    let want = self.model.credit(&self.key(*a), *d);
                    assert_eq!(got.is_some(), want.is_ok(), "credit {d}");
                }
                Op::Die(i) => {
                    let i = *i;
                    let lease = self.leases[i];
                    age_lease(&mut self.c, lease, TTL.as_millis() as i64);
                    let now = self.model.now_ms;
                    *self.model.leases.get_mut(&(lease.node as u32)).unwrap() = Lease {
                        renewed_at_ms: now - 10_000_000,
                        expires_at_ms: now,
                        ..self.model.leases[&(lease.node as u32)]
                    };
                    let got = sql::expire(&mut self.c, &self.s, TTL)
                        .unwrap()
                        .returned_milli;
                    let want = self.model.expire(1_000_000);
                    assert_eq!(got, want, "expired");
                    self.register(i);
                }
            }
        }

        fn check(&mut self) {
            for a in 0..ACCOUNTS.len() {
                let (account, key) = (self.account(a), self.key(a));
                let index = match bucket(a) {
                    Bucket::Anytime => 0,
                    Bucket::OffPeak => 1,
                };
                let b = sql::balance(&mut self.c, &self.s, &account)
                    .unwrap()
                    .unwrap()[index];
                let m = self.model.accounts.get(&key).copied().unwrap_or_default();
                assert_eq!(
                    DbAccount {
                        posted_milli: b.posted_milli,
                        reserved_milli: b.reserved_milli,
                        granted_milli: b.granted_milli
                    },
                    m,
                    "{key}"
                );
                assert!(b.ungranted_milli() >= 0);
                for l in &self.leases {
                    let g =
                        sql::grant_of(&mut self.c, &self.s, l.node, &account, bucket(a)).unwrap();
                    let want = self
                        .model
                        .grants
                        .get(&(key.clone(), l.node as u32))
                        .copied()
                        .unwrap_or(0);
                    assert_eq!(g, want, "grant of node {} on {key}", l.node);
                }
            }
        }
    }

    #[test]
    fn the_sql_does_what_the_model_specifies() {
        let db = TestDb::create("cluster_vs_model");
        let (s, c) = session(&db);
        let side = std::cell::RefCell::new(Some((s, c)));
        let case = std::cell::Cell::new(0u32);
        let config = ProptestConfig {
            cases: 24,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        proptest!(config, |(ops in proptest::collection::vec(op(), 1..40))| {
            let (s, c) = side.borrow_mut().take().unwrap();
            case.set(case.get() + 1);
            let mut w = Side {
                s,
                c,
                prefix: format!("c{}_", case.get()),
                leases: Vec::new(),
                stores: Vec::new(),
                seqs: Vec::new(),
                model: Db::default(),
                open: Vec::new(),
            };
            for i in 0..NODES {
                w.register(i);
            }
            for a in 0..ACCOUNTS.len() {
                w.apply(&Op::Credit(a, 5_000));
            }
            w.check();
            for op in &ops {
                w.apply(op);
                w.check();
            }
            *side.borrow_mut() = Some((w.s, w.c));
        });
    }
}

#[test]
fn a_transfer_moves_only_ungranted_credit_between_parent_and_child() {
    use super::sql::TransferRefused;
    let db = TestDb::create("cluster_transfer");
    let (s, mut c) = session(&db);
    let a = node(&mut c, &s, "a");
    fund(&mut c, &s, a, "parent", 10_000);
    fund(&mut c, &s, a, "child", 0);
    fund(&mut c, &s, a, "stranger", 0);
    c.execute(
        "UPDATE accounts SET parent = 'parent' WHERE name = 'child'",
        &[],
    )
    .unwrap();
    sql::take(&mut c, &s, a, "parent", Bucket::Anytime, 7_000).unwrap();
    let mut seq = sql::next_node_seq(&mut c, &s, a.node).unwrap();
    let mut transfer = |c: &mut postgres::Client, from: &str, to: &str, amount: i64| {
        let r = sql::transfer(c, &s, a, seq, from, to, [amount, 0], Some("t"), NOW).unwrap();
        seq += 2;
        r
    };
    assert_eq!(
        transfer(&mut c, "parent", "child", 3_001),
        Err(TransferRefused::Insufficient {
            available_milli: 3_000
        })
    );
    assert_eq!(transfer(&mut c, "parent", "child", 3_000), Ok(()));
    assert_eq!(transfer(&mut c, "parent", "child", -1_000), Ok(()));
    assert_eq!(
        transfer(&mut c, "parent", "child", -2_001),
        Err(TransferRefused::Insufficient {
            available_milli: 2_000
        })
    );
    assert_eq!(
        transfer(&mut c, "parent", "stranger", 1),
        Err(TransferRefused::NotASubaccount)
    );
    let (p, ch) = (anytime(&mut c, &s, "parent"), anytime(&mut c, &s, "child"));
    assert_eq!((p.posted_milli, p.ungranted_milli()), (8_000, 1_000));
    assert_eq!(ch.posted_milli, 2_000);
    let mut reader = PgStore::open_snapshot(&s).unwrap();
    let report = crate::store::verify::verify(&mut reader).unwrap();
    assert!(report.is_ok(crate::ledger::Overdraft::Strict), "{report}");
}

/// The locking arguments under real concurrency: three nodes take, reserve,
/// settle and give back on the same accounts while a fourth thread adds
/// and deducts credit and sweeps, and one node dies half-way (its lease is
/// aged, its grants swept while the others go on). At the end every sum
/// holds: granted = Σ grants, nothing below zero, each live node's grant
/// is exactly what it believes it holds, the journal replays to the
/// balances, and posted = seeded + credited − spent.
#[test]
fn concurrent_nodes_credit_and_sweeps_keep_every_sum() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

    const ACCOUNTS: [&str; 3] = ["a", "b", "c"];
    let db = TestDb::create("cluster_stress");
    let (s, mut c) = session(&db);
    let admin = node(&mut c, &s, "admin");
    for a in ACCOUNTS {
        fund(&mut c, &s, admin, a, 20_000);
    }
    let leases: Vec<NodeLease> = (0..3).map(|i| node(&mut c, &s, &format!("n{i}"))).collect();
    let credited = AtomicI64::new(0);
    let spent = AtomicI64::new(0);
    let stop = AtomicBool::new(false);
    let dead = leases[0]; // joined first: it dies while the others run
    let finals: Vec<(NodeLease, HashMap<&str, i64>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = leases
            .iter()
            .enumerate()
            .map(|(n, &lease)| {
                let (s, spent) = (s.clone(), &spent);
                scope.spawn(move || {
                    let mut c = s.connect("stress", Some(Duration::from_secs(10))).unwrap();
                    let mut store = PgStore::open_under_lease(&s, Durability::Sync, lease).unwrap();
                    let mut seq = sql::next_node_seq(&mut c, &s, lease.node).unwrap();
                    let mut free: HashMap<&str, i64> = HashMap::new();
                    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (n as u64);
                    let mut next = |m: u64| {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng % m
                    };
                    let rounds = if lease == dead { 60 } else { 150 };
                    for _ in 0..rounds {
                        let account = ACCOUNTS[next(3) as usize];
                        match next(4) {
                            0 => {
                                let x = 100 + next(900) as i64;
                                if let Take::Granted { .. } =
                                    sql::take(&mut c, &s, lease, account, Bucket::Anytime, x)
                                        .unwrap()
                                {
                                    *free.entry(account).or_default() += x;
                                }
                            }
                            1 | 2 => {
                                let have = free.get(account).copied().unwrap_or(0);
                                if have == 0 {
                                    continue;
                                }
                                let x = 1 + next(have as u64) as i64;
                                let id = seq;
                                let reserve = entry(id, EntryKind::Reserve, account, x, id);
                                store.commit(&[reserve], &meta(account)).unwrap();
                                *free.get_mut(account).unwrap() -= x;
                                let post = next(x as u64 + 1) as i64;
                                let mut settle = Vec::new();
                                if post > 0 {
                                    settle.push(entry(id + 1, EntryKind::Post, account, -post, id));
                                }
                                if x - post > 0 {
                                    settle.push(entry(
                                        id + 2,
                                        EntryKind::Void,
                                        account,
                                        post - x,
                                        id,
                                    ));
                                }
                                seq += 3;
                                store.commit(&settle, &meta(account)).unwrap();
                                *free.get_mut(account).unwrap() += x - post;
                                spent.fetch_add(post, Ordering::Relaxed);
                            }
                            _ => {
                                let have = free.get(account).copied().unwrap_or(0);
                                let x = next(have as u64 + 1) as i64;
                                if x > 0
                                    && sql::give_back(
                                        &mut c,
                                        &s,
                                        lease,
                                        account,
                                        Bucket::Anytime,
                                        x,
                                    )
                                    .unwrap()
                                {
                                    *free.get_mut(account).unwrap() -= x;
                                }
                            }
                        }
                    }
                    (lease, free)
                })
            })
            .collect();
        // Credit actions and sweeps beside them.
        let side = {
            let (s, credited, stop) = (s.clone(), &credited, &stop);
            scope.spawn(move || {
                let mut c = s.connect("stress", Some(Duration::from_secs(10))).unwrap();
                let mut seq = sql::next_node_seq(&mut c, &s, admin.node).unwrap();
                let mut i = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    let account = ACCOUNTS[(i % 3) as usize];
                    let delta = if i % 2 == 0 { 700 } else { -900 };
                    if let Some(d) = sql::credit(
                        &mut c,
                        &s,
                        admin,
                        seq,
                        CreditKind::Add,
                        account,
                        Role::User,
                        Bucket::Anytime,
                        delta,
                        None,
                        NOW,
                    )
                    .unwrap()
                    {
                        credited.fetch_add(d, Ordering::Relaxed);
                    }
                    seq += 1;
                    sql::expire(&mut c, &s, TTL).unwrap();
                    i += 1;
                }
            })
        };
        let mut finals = Vec::new();
        for w in workers {
            let (lease, free) = w.join().unwrap();
            if lease == dead {
                // It dies here: its lease lies in the past, sweeps return
                // its grants while the others still run.
                let mut c = s.connect("stress", None).unwrap();
                age_lease(&mut c, lease, TTL.as_millis() as i64);
            } else {
                finals.push((lease, free));
            }
        }
        stop.store(true, Ordering::Relaxed);
        side.join().unwrap();
        finals
    });
    sql::expire(&mut c, &s, TTL).unwrap();

    let mut posted_total = 0;
    for a in ACCOUNTS {
        let b = anytime(&mut c, &s, a);
        assert!(
            b.ungranted_milli() >= 0 && b.reserved_milli == 0,
            "{a}: {b:?}"
        );
        let grants: i64 = c
            .query_one(
                "SELECT COALESCE(sum(amount_milli), 0)::bigint FROM grants WHERE account = $1",
                &[&a],
            )
            .unwrap()
            .get(0);
        assert_eq!(grants, b.granted_milli, "{a}: granted = Σ grants");
        posted_total += b.posted_milli;
        for (lease, free) in &finals {
            let held = sql::grant_of(&mut c, &s, lease.node, a, Bucket::Anytime).unwrap();
            assert_eq!(
                held,
                free.get(a).copied().unwrap_or(0),
                "node {} on {a}",
                lease.node
            );
        }
        assert_eq!(
            sql::grant_of(&mut c, &s, dead.node, a, Bucket::Anytime).unwrap(),
            0
        );
    }
    assert_eq!(
        posted_total,
        60_000 + credited.load(Ordering::Relaxed) - spent.load(Ordering::Relaxed)
    );
    let mut reader = PgStore::open_snapshot(&s).unwrap();
    let report = crate::store::verify::verify(&mut reader).unwrap();
    assert!(report.is_ok(crate::ledger::Overdraft::Strict), "{report}");
}

/// The real write path of a cluster node: the writer commits under the
/// lease, and once a commit finds the lease gone it stops for good (never
/// retried): waiting answers fail at once, nothing more is written.
#[test]
fn the_writer_stops_for_good_when_a_cluster_commit_finds_its_lease_gone() {
    use std::sync::Weak;

    use crate::ledger::EntrySink;
    use crate::store::{AccountDirectory, FlushError, StoreUnavailable, WriteBehind, WriterConfig};

    struct Nobody;
    impl AccountDirectory for Nobody {
        fn account_meta(&self, _name: &str) -> Option<AccountMeta> {
            None
        }
    }
    let db = TestDb::create("cluster_writer");
    let (s, mut c) = session(&db);
    let lease = node(&mut c, &s, "a");
    fund(&mut c, &s, lease, "john", 10_000);
    sql::take(&mut c, &s, lease, "john", Bucket::Anytime, 5_000).unwrap();
    let base = sql::next_node_seq(&mut c, &s, lease.node).unwrap();
    let store = PgStore::open_under_lease(&s, Durability::Sync, lease).unwrap();
    let w = Arc::new(WriteBehind::new(
        Box::new(store),
        WriterConfig {
            batch_max_entries: 64,
            batch_age_max: Duration::from_millis(2),
            commit_delay: Duration::from_micros(200),
            queue_max_entries: 1_000,
            ack_timeout: Duration::from_secs(10),
        },
        Arc::new(crate::metrics::Metrics::new()),
    ));
    w.start(Weak::<Nobody>::new());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    w.record(&[entry(base, EntryKind::Reserve, "john", 1_000, base)]);
    rt.block_on(w.wait_durable()).unwrap();
    assert_eq!(anytime(&mut c, &s, "john").reserved_milli, 1_000);

    age_lease(&mut c, lease, 1);
    w.record(&[entry(base + 1, EntryKind::Post, "john", -1_000, base)]);
    let started = std::time::Instant::now();
    assert_eq!(rt.block_on(w.wait_durable()), Err(StoreUnavailable));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed at once, not at the ack timeout"
    );
    assert!(matches!(
        w.flush_and_stop(Duration::from_secs(5)),
        Err(FlushError::Fenced { .. })
    ));
    let b = anytime(&mut c, &s, "john");
    assert_eq!((b.posted_milli, b.reserved_milli), (10_000, 1_000));
    assert_eq!(
        sql::next_node_seq(&mut c, &s, lease.node).unwrap(),
        base + 1
    );
}
