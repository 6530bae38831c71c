//! Crash test (issue 3): the real `tollgate` binary against `ozeki-sim`,
//! concurrent `addcredits` and `sendmessage` traffic from several threads,
//! `kill -9` at a random moment, restart — `CRASH_ITERATIONS` times
//! (default 20). After every crash:
//! (a) `tollgate ledger verify` passes;
//! (b) every change whose answer a client received is in the store: each
//!     acknowledged `addcredits` (amounts are unique, so each is found by
//!     account and amount) and, per account, at least as many reservations
//!     as acknowledged sends;
//! (c) no bucket of any account is below zero;
//! and after the restart the ledger serves exactly the stored balances.
//! Reservations left in doubt by a crash are voided by the operator API
//! before the next round, so that path is exercised (and persisted) too.
//!
//! Bounded: every HTTP call has a timeout, every round a fixed traffic
//! window (150–500 ms), and the whole test fails past 120 s.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rand::Rng;
use tollgate::ledger::{EntryKind, Overdraft};
use tollgate::store::{verify, SqliteStore, Store};

const SENDERS: [(&str, &str); 2] = [("john", "secret1"), ("jane", "jane1")];
const CREDITED: [&str; 3] = ["john", "jane", "poor"];

fn accounts_yaml() -> String {
    format!(
        "accounts:\n\
         - {{ name: admin, role: admin, password_hash: '{}', anytime: 1000 }}\n\
         - {{ name: john, role: user, password_hash: '{}', anytime: 100000 }}\n\
         - {{ name: jane, role: user, password_hash: '{}', anytime: 100000 }}\n\
         - {{ name: poor, role: user, password_hash: '{}' }}\n",
        password_hash("abc123"),
        password_hash("secret1"),
        password_hash("jane1"),
        password_hash("poor1"),
    )
}

/// What clients saw acknowledged, over all rounds.
#[derive(Default)]
struct Acked {
    /// (account, milli-credits) of every acknowledged addcredits.
    adds: HashSet<(String, i64)>,
    /// Acknowledged sends per account.
    sends: HashMap<String, usize>,
}

fn quick_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap()
}

/// Runs traffic until `stop`: adds with unique amounts from `next_amount`
/// (`adder`) or single-recipient sends (`sender`).
fn traffic_thread(
    t: &Tollgate,
    worker: usize,
    stop: Arc<AtomicBool>,
    next_amount: Arc<AtomicI64>,
    acked: Arc<Mutex<Acked>>,
) -> std::thread::JoinHandle<()> {
    let base = t.url("/api");
    std::thread::spawn(move || {
        let client = quick_client();
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            if worker < 2 {
                let amount = next_amount.fetch_add(1, Ordering::Relaxed);
                let account = CREDITED[(worker + i) % CREDITED.len()];
                let url = format!(
                    "{base}?action=addcredits&username=admin&password=abc123&useraccount={account}&add={amount}"
                );
                let Ok(r) = client.get(url).send() else {
                    continue;
                };
                let Ok(body) = r.text() else { continue };
                if body.contains("<balance>") {
                    acked
                        .lock()
                        .unwrap()
                        .adds
                        .insert((account.to_string(), amount * 1000));
                } else {
                    assert!(body.contains("<errorcode>"), "unexpected answer {body}");
                }
            } else {
                let (user, password) = SENDERS[worker % 2];
                let url = format!(
                    "{base}?action=sendmessage&username={user}&password={password}&recipient=%2B3620{:07}&messagedata=crash+{i}",
                    i
                );
                let Ok(r) = client.get(url).send() else {
                    continue;
                };
                let Ok(body) = r.text() else { continue };
                if body.contains("<statuscode>0</statuscode>") {
                    *acked
                        .lock()
                        .unwrap()
                        .sends
                        .entry(user.to_string())
                        .or_default() += 1;
                }
            }
        }
    })
}

fn check_store(t: &Tollgate, acked: &Acked, round: usize) {
    // (a) the CLI verifies.
    let out = t.cli(&["ledger", "verify"]);
    assert!(
        out.status.success(),
        "round {round}: ledger verify failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let mut store = SqliteStore::open_existing(&t.store_path()).unwrap();
    let report = verify::verify(&mut store).unwrap();
    assert!(report.is_ok(Overdraft::Strict), "round {round}: {report}");

    // (b) every acknowledged change is stored.
    let mut adds: HashSet<(String, i64)> = HashSet::new();
    let mut reservations: HashMap<String, HashSet<u64>> = HashMap::new();
    store
        .for_each_entry(&mut |e| {
            match e.kind {
                EntryKind::Add if e.reference.as_deref() != Some("seed") => {
                    adds.insert((e.account, e.amount_milli));
                }
                EntryKind::Reserve => {
                    reservations
                        .entry(e.account)
                        .or_default()
                        .insert(e.reservation_id.expect("reserve has an id"));
                }
                _ => {}
            }
            Ok(())
        })
        .unwrap();
    let missing: Vec<_> = acked.adds.difference(&adds).collect();
    assert!(
        missing.is_empty(),
        "round {round}: acknowledged addcredits missing from the store: {missing:?}"
    );
    for (user, n) in &acked.sends {
        let stored = reservations.get(user).map_or(0, HashSet::len);
        assert!(
            stored >= *n,
            "round {round}: {user} has {n} acknowledged sends but {stored} stored reservations"
        );
    }

    // (c) nobody is below zero.
    for a in store.stored_balances().unwrap() {
        for b in [a.anytime, a.offpeak] {
            assert!(
                b.available_milli() >= 0 && b.reserved_milli >= 0,
                "round {round}: {} below zero: {b:?}",
                a.name
            );
        }
    }
}

/// After a restart the ledger serves exactly what the store holds.
fn check_restored(t: &Tollgate, round: usize) {
    let mut store = SqliteStore::open_existing(&t.store_path()).unwrap();
    for a in store.stored_balances().unwrap() {
        let v = t.admin_get(&format!("/admin/accounts/{}", a.name));
        let posted = tollgate::money::format_credits(a.anytime.posted_milli);
        let reserved = tollgate::money::format_credits(a.anytime.reserved_milli);
        assert_eq!(
            (
                v["anytime"]["posted"].as_str(),
                v["anytime"]["reserved"].as_str()
            ),
            (Some(posted.as_str()), Some(reserved.as_str())),
            "round {round}: {} restored differently: {v}",
            a.name
        );
    }
}

/// Voids what the crash left in doubt (they hold credit until an operator
/// decides).
fn void_in_doubt(t: &Tollgate) -> usize {
    let list = t.admin_get("/admin/reservations?state=in_doubt")["reservations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for r in &list {
        let id = r["id"].as_u64().unwrap();
        let resp = client()
            .post(t.admin_url(&format!("/admin/reservations/{id}/void")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .unwrap();
        assert!(
            resp.status().is_success(),
            "void {id}: {}",
            resp.text().unwrap()
        );
    }
    list.len()
}

#[test]
fn kill_9_under_load_loses_nothing_acknowledged() {
    let rounds: usize = std::env::var("CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let test_deadline = Instant::now() + Duration::from_secs(120);
    let sim = Sim::start(&["--no-record"]);
    let mut t = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: STORE_YAML.to_string(),
            accounts: accounts_yaml(),
            ..TollgateOptions::default()
        },
    );
    let next_amount = Arc::new(AtomicI64::new(1));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut rng = rand::thread_rng();
    let mut voided = 0;
    for round in 1..=rounds {
        assert!(
            Instant::now() < test_deadline,
            "crash test over its time budget"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..4)
            .map(|w| traffic_thread(&t, w, stop.clone(), next_amount.clone(), acked.clone()))
            .collect();
        std::thread::sleep(Duration::from_millis(rng.gen_range(150..500)));
        t.kill(); // SIGKILL: no flush, no settlement, no goodbye
        stop.store(true, Ordering::Relaxed);
        for th in threads {
            th.join().expect("traffic thread");
        }
        check_store(&t, &acked.lock().unwrap(), round);
        t.spawn();
        check_restored(&t, round);
        voided += void_in_doubt(&t);
    }
    let acked = acked.lock().unwrap();
    let sends: usize = acked.sends.values().sum();
    eprintln!(
        "{rounds} crashes: {} acknowledged adds, {sends} acknowledged sends, {voided} in-doubt reservations voided",
        acked.adds.len()
    );
    assert!(
        acked.adds.len() >= rounds && sends >= rounds,
        "too little traffic got through to mean anything"
    );
    assert!(t.stop_with("TERM").success());
    check_store(&t, &acked, rounds + 1);
}
