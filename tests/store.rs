//! Persistence over the real binary (SPEC 6): balances and open
//! reservations survive a restart, SIGTERM/SIGINT flush the queue and exit
//! 0, `durability: sync` answers only after the commit, a stuck store turns
//! into `store_unavailable` and recovers, and `tollgate ledger
//! verify|export` read what was written.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use tollgate::ledger::{Entry, EntryKind};
use tollgate::store::{SqliteStore, Store};

/// A tollgate with a store: `yaml` is the `store:` section (and anything
/// else), or [`STORE_YAML`] for the defaults.
fn with_store(yaml: &str) -> TollgateOptions {
    TollgateOptions {
        extra_yaml: yaml.to_string(),
        ..TollgateOptions::default()
    }
}

fn add_credits(t: &Tollgate, account: &str, amount: i64) -> String {
    get(&t.url(&format!(
        "/api?action=addcredits&username=admin&password=abc123&useraccount={account}&add={amount}"
    )))
    .1
}

fn send(t: &Tollgate, user: &str, password: &str, recipient: &str) -> String {
    get(&t.url(&format!(
        "/api?action=sendmessage&username={user}&password={password}&recipient={recipient}&messagedata=hello"
    )))
    .1
}

/// Every account's admin view (posted, reserved, available per bucket).
fn accounts(t: &Tollgate) -> BTreeMap<String, serde_json::Value> {
    ["admin", "john", "poor"]
        .into_iter()
        .map(|a| (a.to_string(), t.admin_get(&format!("/admin/accounts/{a}"))))
        .collect()
}

fn stored_entries(t: &Tollgate) -> Vec<Entry> {
    let mut store = SqliteStore::open_existing(&t.store_path()).unwrap();
    let mut out = Vec::new();
    store
        .for_each_entry(&mut |e| {
            out.push(e);
            Ok(())
        })
        .unwrap();
    out
}

fn in_doubt(t: &Tollgate) -> Vec<serde_json::Value> {
    t.admin_get("/admin/reservations?state=in_doubt")["reservations"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn verify(t: &Tollgate) -> (bool, String) {
    let out = t.cli(&["ledger", "verify"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn balances_survive_sigterm_and_restart() {
    let sim = Sim::start(&[]);
    let mut t = Tollgate::start(sim.addr, with_store(STORE_YAML));
    for amount in [5, -3, 100] {
        assert!(add_credits(&t, "john", amount).contains("<balance>"));
    }
    let set = get(&t.url(
        "/api?action=setcredits&username=admin&password=abc123&useraccount=poor&newbalance=50",
    ))
    .1;
    assert!(set.contains("<balance>50</balance>"), "{set}");
    for _ in 0..3 {
        let answer = send(&t, "john", "secret1", "%2B36201234567");
        assert!(answer.contains("<statuscode>0</statuscode>"), "{answer}");
    }
    let before = accounts(&t);
    assert_eq!(t.balance("john", "secret1"), "840"); // 744 + 102 − 3 × 2

    let status = t.stop_with("TERM");
    assert!(status.success(), "SIGTERM exit: {status:?}\n{}", t.log());
    assert!(t.log().contains("store flushed"), "{}", t.log());

    t.spawn();
    assert_eq!(accounts(&t), before, "restored balances");
    assert_eq!(t.balance("john", "secret1"), "840");
    assert!(in_doubt(&t).is_empty());
    // Numbering continues after the stored entries; a second life verifies too.
    assert!(add_credits(&t, "john", 1).contains("<balance>841</balance>"));
    assert!(t.stop_with("TERM").success());
    let entries = stored_entries(&t);
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // 2 seeds, 3 adds, 1 set, 3 × (reserve + post), 1 add.
    assert_eq!(entries.len(), 2 + 3 + 1 + 6 + 1);
    let (ok, report) = verify(&t);
    assert!(ok, "{report}");
}

#[test]
fn a_reservation_open_at_a_crash_comes_back_in_doubt() {
    let sim = Sim::start(&[]);
    let mut t = Tollgate::start(sim.addr, with_store(STORE_YAML));
    // The gateway takes its time: the send is forwarded and waiting when
    // tollgate dies.
    client()
        .post(sim.url("/sim/latency?ms=5000"))
        .send()
        .unwrap();
    let url = t.url(
        "/api?action=sendmessage&username=john&password=secret1&recipient=%2B36201234567&messagedata=hi",
    );
    let pending = std::thread::spawn(move || client().get(url).send().is_ok());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = t.admin_get("/admin/reservations?state=open")["reservations"]
            .as_array()
            .map_or(0, Vec::len);
        if open == 1 && sim.sendmessage_count() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the send never got in flight");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.kill(); // kill -9: no flush, no settlement
    assert!(!pending.join().unwrap(), "the client saw no answer");
    client().post(sim.url("/sim/latency?ms=0")).send().unwrap();

    t.spawn();
    let doubts = in_doubt(&t);
    assert_eq!(doubts.len(), 1, "{doubts:?}");
    assert_eq!(doubts[0]["account"], "john");
    // The reserved credit stays held: 744 − 2.
    assert_eq!(t.balance("john", "secret1"), "742");
    let id = doubts[0]["id"].as_u64().unwrap();
    let (ok, report) = verify(&t);
    assert!(ok, "verify while running: {report}");
    assert!(
        report.contains("open reservations:    1 stored, 1 replayed"),
        "{report}"
    );

    // It stays in doubt across a clean restart too, until an operator acts.
    assert!(t.stop_with("TERM").success());
    t.spawn();
    assert_eq!(in_doubt(&t).len(), 1);
    let r = client()
        .post(t.admin_url(&format!("/admin/reservations/{id}/void")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().unwrap());
    assert_eq!(t.balance("john", "secret1"), "744");
    assert!(t.stop_with("TERM").success());
    t.spawn();
    assert!(in_doubt(&t).is_empty());
    assert_eq!(t.balance("john", "secret1"), "744");
}

#[test]
fn ledger_verify_and_export_cover_every_entry() {
    let sim = Sim::start(&["--reject-prefix", "+44"]);
    let mut t = Tollgate::start(sim.addr, with_store(STORE_YAML));
    add_credits(&t, "john", 10);
    // One accepted, one rejected recipient: a partial post and a void.
    let answer = send(&t, "john", "secret1", "%2B36201234567,%2B447700900123");
    assert!(answer.contains("<statuscode>0</statuscode>"), "{answer}");
    assert!(t.stop_with("TERM").success());

    let (ok, report) = verify(&t);
    assert!(ok, "{report}");
    let entries = stored_entries(&t);
    assert!(report.contains(&format!("entries:              {}", entries.len())));
    assert!(entries.iter().any(|e| e.kind == EntryKind::Post));
    assert!(entries.iter().any(|e| e.kind == EntryKind::Void));

    let csv = t.cli(&["ledger", "export", "--format", "csv"]);
    assert!(csv.status.success());
    let csv = String::from_utf8(csv.stdout).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], tollgate::store::export::CSV_HEADER);
    assert_eq!(lines.len(), entries.len() + 1);
    assert!(lines[1].starts_with("1,add,admin,anytime,1000,1000000,,seed,"));

    let out = t.dir.path().join("ledger.jsonl");
    let jsonl = t.cli(&[
        "ledger",
        "export",
        "--format",
        "jsonl",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(jsonl.status.success());
    let rows: Vec<serde_json::Value> = read_to_string(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), entries.len());
    for (row, e) in rows.iter().zip(&entries) {
        assert_eq!(row["seq"].as_u64(), Some(e.seq));
        assert_eq!(row["kind"], e.kind.as_str());
        assert_eq!(row["amount_milli"].as_i64(), Some(e.amount_milli));
    }

    // A balance row that disagrees with the journal fails verification.
    let store = SqliteStore::open_existing(&t.store_path()).unwrap();
    store
        .connection()
        .execute(
            "UPDATE accounts SET anytime_posted_milli = anytime_posted_milli + 1 WHERE name = 'john'",
            [],
        )
        .unwrap();
    drop(store);
    let (ok, report) = verify(&t);
    assert!(!ok, "{report}");
    assert!(report.contains("balance mismatches:   1"), "{report}");
    assert!(report.contains("john anytime"), "{report}");
}

#[test]
fn sync_answers_wait_for_their_commit() {
    // Batches would otherwise wait 10 minutes: only the waiting answer
    // closes them, so the entry must be on disk when the answer arrives.
    let sim = Sim::start(&[]);
    let t = Tollgate::start(
        sim.addr,
        with_store("store: { path: tollgate.db, batch_age_max_ms: 600000 }\n"),
    );
    for amount in [7, 8, 9] {
        let started = Instant::now();
        assert!(add_credits(&t, "poor", amount).contains("<balance>"));
        assert!(started.elapsed() < Duration::from_secs(5));
        let entries = stored_entries(&t);
        assert!(
            entries
                .iter()
                .any(|e| e.account == "poor" && e.amount_milli == amount * 1000),
            "add {amount} acknowledged but not stored"
        );
    }
    let answer = send(&t, "john", "secret1", "%2B36201234567");
    assert!(answer.contains("<statuscode>0</statuscode>"));
    // The reservation was stored before the request left for the gateway.
    assert!(stored_entries(&t)
        .iter()
        .any(|e| e.account == "john" && e.kind == EntryKind::Reserve));
}

#[test]
fn async_mode_is_flushed_by_sigterm_and_sigint() {
    // Async answers never wait; with a 10-minute batch age nothing would
    // commit before shutdown, so every entry below is persisted by the
    // shutdown flush.
    let sim = Sim::start(&[]);
    let mut t = Tollgate::start(
        sim.addr,
        with_store("durability: async\nstore: { path: tollgate.db, batch_age_max_ms: 600000 }\n"),
    );
    for amount in 1..=20 {
        assert!(add_credits(&t, "poor", amount).contains("<balance>"));
    }
    let metrics = get(&t.admin_url("/metrics")).1;
    assert!(metrics.contains("tollgate_store_queue_depth"), "{metrics}");
    assert!(t.stop_with("TERM").success(), "{}", t.log());
    let adds = |t: &Tollgate| {
        stored_entries(t)
            .iter()
            .filter(|e| e.account == "poor" && e.kind == EntryKind::Add)
            .count()
    };
    assert_eq!(adds(&t), 20);
    t.spawn();
    assert_eq!(t.balance("poor", "poor1"), "210");

    for amount in 21..=25 {
        assert!(add_credits(&t, "poor", amount).contains("<balance>"));
    }
    assert!(t.stop_with("INT").success(), "{}", t.log());
    assert_eq!(adds(&t), 25);
    let (ok, report) = verify(&t);
    assert!(ok, "{report}");
}

#[test]
fn a_stuck_store_answers_store_unavailable_then_recovers() {
    let sim = Sim::start(&[]);
    let mut t = Tollgate::start(
        sim.addr,
        with_store("store: { path: tollgate.db, ack_timeout_ms: 300 }\n"),
    );
    assert!(add_credits(&t, "poor", 1).contains("<balance>1</balance>"));

    // Another connection holds the write lock: commits block.
    let lock = rusqlite::Connection::open(t.store_path()).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();

    let answer = add_credits(&t, "poor", 2);
    assert!(answer.contains("<errorcode>1008</errorcode>"), "{answer}");
    let answer = send(&t, "john", "secret1", "%2B36201234567");
    assert!(answer.contains("<statuscode>1008</statuscode>"), "{answer}");
    assert_eq!(
        sim.sendmessage_count(),
        0,
        "an unpersisted reservation left"
    );

    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    // Recovers by itself; nothing was dropped: the refused add was applied in
    // memory and is committed now (store_unavailable = not acknowledged).
    assert!(add_credits(&t, "poor", 4).contains("<balance>7</balance>"));
    assert_eq!(
        t.balance("john", "secret1"),
        "744",
        "the refused send was voided"
    );
    let metrics = get(&t.admin_url("/metrics")).1;
    assert!(
        metrics.contains("tollgate_store_ack_timeouts_total{wait=\"durable\"} 2"),
        "{metrics}"
    );
    assert!(t.stop_with("TERM").success());
    let (ok, report) = verify(&t);
    assert!(ok, "{report}");
}
