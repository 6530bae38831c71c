//! The PostgreSQL store over the real binary (`store.url`): sends and
//! credit changes through the Ozeki front door against `ozeki-sim`,
//! balances that survive a restart, `ledger verify|export` and `check`
//! against PostgreSQL, `Idempotency-Key` on PostgreSQL, and the failure
//! modes: PostgreSQL down at start-up, restarted while running, the
//! writer's session killed under load.
//!
//! Each test has a database of its own (created and dropped by the test);
//! the restart test runs a private PostgreSQL server of its own.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::{self, PrivateServer, TestDb};
use common::*;
use tollgate::ledger::EntryKind;

fn with_store(yaml: String) -> TollgateOptions {
    TollgateOptions {
        extra_yaml: yaml,
        ..TollgateOptions::default()
    }
}

fn add_credits(t: &Tollgate, account: &str, amount: i64) -> String {
    get(&t.url(&format!(
        "/api?action=addcredits&username=admin&password=abc123&useraccount={account}&add={amount}"
    )))
    .1
}

fn send(t: &Tollgate, recipient: &str) -> String {
    get(&t.url(&format!(
        "/api?action=sendmessage&username=john&password=secret1&recipient={recipient}&messagedata=hello"
    )))
    .1
}

fn keyed_add(t: &Tollgate, key: &str, amount: i64) -> (String, Option<String>) {
    let r = client()
        .get(t.url(&format!(
            "/api?action=addcredits&username=admin&password=abc123&useraccount=john&add={amount}"
        )))
        .header("Idempotency-Key", key)
        .send()
        .unwrap();
    let replayed = r
        .headers()
        .get("Idempotent-Replayed")
        .map(|v| v.to_str().unwrap().to_string());
    (r.text().unwrap(), replayed)
}

fn cli_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn verify_clean(t: &Tollgate) -> String {
    let out = t.cli(&["ledger", "verify"]);
    let text = cli_text(&out);
    assert!(out.status.success(), "ledger verify failed:\n{text}");
    text
}

fn accounts(t: &Tollgate) -> Vec<serde_json::Value> {
    ["admin", "john", "poor"]
        .into_iter()
        .map(|a| t.admin_get(&format!("/admin/accounts/{a}")))
        .collect()
}

/// A password in the store's URL (trust authentication ignores it): it must
/// appear in no log line and no command's output (`tests/secrets.rs`
/// searches the suite's logs for it too).
const URL_PASSWORD: &str = "Pg-Url-Pw-33";

fn with_password(url: &str) -> String {
    url.replacen('@', &format!(":{URL_PASSWORD}@"), 1)
}

#[test]
fn sends_and_credits_survive_a_restart_on_postgres_and_verify_clean() {
    let db = TestDb::create("e2e");
    let sim = Sim::start(&[]);
    let url = with_password(&db.url());
    let mut t = Tollgate::start(sim.addr, with_store(pg::store_yaml(&url, "")));
    assert!(add_credits(&t, "john", 5).contains("<balance>749</balance>"));
    for _ in 0..3 {
        let answer = send(&t, "%2B36201234567");
        assert!(answer.contains("<statuscode>0</statuscode>"), "{answer}");
    }
    let set = get(&t.url(
        "/api?action=setcredits&username=admin&password=abc123&useraccount=poor&newbalance=50",
    ))
    .1;
    assert!(set.contains("<balance>50</balance>"), "{set}");
    // Idempotency-Key on PostgreSQL: a retry replays, credits once.
    let (first, replayed) = keyed_add(&t, "pg-key-1", 10);
    assert!(first.contains("<balance>753</balance>"), "{first}");
    assert_eq!(replayed, None);
    let (again, replayed) = keyed_add(&t, "pg-key-1", 10);
    assert_eq!(again, first);
    assert_eq!(replayed.as_deref(), Some("true"));
    assert_eq!(t.balance("john", "secret1"), "753");
    assert_eq!(sim.sendmessage_count(), 3);
    let before = accounts(&t);

    let status = t.stop_with("TERM");
    assert!(status.success(), "SIGTERM exit: {status:?}\n{}", t.log());
    assert!(t.log().contains("store flushed"), "{}", t.log());
    // 2 seeds, 1 add, 3 × (reserve + post), 1 set, 1 keyed add.
    let entries = pg::stored_entries(&db.url());
    assert_eq!(entries.len(), 2 + 1 + 6 + 1 + 1, "{entries:?}");

    t.spawn();
    assert_eq!(accounts(&t), before, "restored balances");
    assert_eq!(t.balance("john", "secret1"), "753");
    // The key survived the restart: still one credit.
    let (replay, replayed) = keyed_add(&t, "pg-key-1", 10);
    assert_eq!(replay, first);
    assert_eq!(replayed.as_deref(), Some("true"));
    // Numbering continues after the stored entries.
    assert!(add_credits(&t, "john", 1).contains("<balance>754</balance>"));
    let report = verify_clean(&t);
    assert!(report.contains("entries:              12"), "{report}");
    let csv = t.cli(&["ledger", "export", "--format", "csv"]);
    assert!(csv.status.success(), "{}", cli_text(&csv));
    let csv = String::from_utf8(csv.stdout).unwrap();
    assert_eq!(csv.lines().count(), 13);
    assert!(csv
        .lines()
        .nth(1)
        .unwrap()
        .starts_with("1,add,admin,anytime,1000,"));
    assert!(t.stop_with("TERM").success());
    let seqs: Vec<u64> = pg::stored_entries(&db.url())
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=12).collect::<Vec<_>>());
}

#[test]
fn check_reports_pending_migrations_and_run_applies_them_once() {
    let db = TestDb::create("check");
    let sim = Sim::start(&[]);
    // A configuration on the new database, checked before anything ran.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tariffs.yaml"), TARIFFS).unwrap();
    let config = dir.path().join("tollgate.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{}\nupstream: {{ address: {} }}\ntariffs: tariffs.yaml\n{}",
            free_port(),
            sim.addr,
            pg::store_yaml(&db.url(), "")
        ),
    )
    .unwrap();
    let check = || {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["check", "-c"])
            .arg(&config)
            .output()
            .unwrap();
        let text = cli_text(&out);
        assert!(out.status.success(), "{text}");
        text
    };
    let text = check();
    assert!(text.contains("schema version 0"), "{text}");
    assert!(text.contains("5 pending migrations"), "{text}");
    assert!(text.contains("1 ledger: nodes, entries"), "{text}");
    assert!(text.contains("2 idempotency keys"), "{text}");
    assert!(text.contains("3 outbox"), "{text}");
    // `check` applied nothing.
    let tables: i64 = db
        .client()
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);

    let mut t = Tollgate::start(sim.addr, with_store(pg::store_yaml(&db.url(), "")));
    assert!(t.log().contains("store schema migrated"), "{}", t.log());
    let text = check();
    assert!(text.contains("schema version 5"), "{text}");
    assert!(text.contains("no pending migration"), "{text}");
    let applied = |db: &TestDb| -> Vec<(i32, i64)> {
        db.client()
            .query(
                "SELECT version, applied_unix_ms FROM schema_migrations ORDER BY version",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let first = applied(&db);
    assert_eq!(
        first.iter().map(|a| a.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert!(t.stop_with("TERM").success());
    t.spawn();
    assert_eq!(applied(&db), first, "applied once");
    assert!(t.stop_with("TERM").success());

    // A database holding a newer schema: check fails, run refuses.
    db.client()
        .execute(
            "INSERT INTO schema_migrations VALUES (99, 'future', 0)",
            &[],
        )
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        cli_text(&out).contains("schema version 99 is newer"),
        "{}",
        cli_text(&out)
    );
}

#[test]
fn postgres_down_at_start_up_is_a_clear_error_and_a_non_zero_exit() {
    let sim = Sim::start(&[]);
    let port = free_port(); // nothing listens there
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tariffs.yaml"), TARIFFS).unwrap();
    let config = dir.path().join("tollgate.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{}\nupstream: {{ address: {} }}\ntariffs: tariffs.yaml\n{}",
            free_port(),
            sim.addr,
            pg::store_yaml(
                &format!("postgres://tollgate:Pg-Secret-71x@127.0.0.1:{port}/ledger"),
                "connect_timeout_ms: 1000"
            )
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run", "-c"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let text = cli_text(&out);
    eprintln!("refused in {:?}:\n{text}", started.elapsed());
    assert!(!out.status.success(), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        text.contains(&format!(
            "store postgres://tollgate:***@127.0.0.1:{port}/ledger: postgres: connecting to"
        )),
        "{text}"
    );
    assert!(text.contains("refused"), "{text}");
    assert!(
        !text.contains("Pg-Secret-71x"),
        "the password leaked:\n{text}"
    );
    // `check` says the same, naming the key.
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let text = cli_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("store.url: postgres: connecting to"),
        "{text}"
    );
    assert!(!text.contains("Pg-Secret-71x"), "{text}");
}

/// Credit changes from `threads` clients until stopped; counts the
/// acknowledged ones (an answer with a balance) and the refused ones.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(t: &Tollgate, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|_| {
                let url = t.url(
                    "/api?action=addcredits&username=admin&password=abc123&useraccount=poor&add=1",
                );
                let (stop, acked, refused) = (stop.clone(), acked.clone(), refused.clone());
                std::thread::spawn(move || {
                    let client = client();
                    while !stop.load(Ordering::Relaxed) {
                        match client.get(&url).send().and_then(|r| r.text()) {
                            Ok(body) if body.contains("<balance>") => {
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            acked,
            refused,
            threads,
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    fn wait_for_more(&self, n: u64, what: &str) {
        let target = self.acked() + n;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.acked() < target {
            assert!(Instant::now() < deadline, "no progress: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        (
            self.acked.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

/// Checks that nothing acknowledged is lost: `poor`'s stored `add` entries
/// are at least the acknowledged ones (a refused answer may still have
/// committed: "not acknowledged" is not "not done"), the stored balance is
/// the live one, and the store verifies.
fn nothing_acknowledged_is_lost(t: &Tollgate, url: &str, acked: u64) {
    wait_until(
        || t.metric_value("tollgate_store_queue_depth") == 0.0,
        "the writer's queue to drain",
    );
    let live = t.balance("poor", "poor1");
    let adds = pg::stored_entries(url)
        .iter()
        .filter(|e| e.kind == EntryKind::Add && e.account == "poor")
        .count() as u64;
    assert!(adds >= acked, "{adds} adds stored, {acked} acknowledged");
    assert_eq!(live, adds.to_string(), "the live balance is the stored one");
    verify_clean(t);
}

#[test]
fn a_postgres_restart_while_running_recovers_by_itself_and_loses_nothing_acknowledged() {
    let server = PrivateServer::start();
    let mut admin: postgres::Client = server
        .url("postgres")
        .parse::<postgres::Config>()
        .unwrap()
        .connect(postgres::NoTls)
        .unwrap();
    admin.batch_execute("CREATE DATABASE ledger").unwrap();
    drop(admin);
    let url = server.url("ledger");
    let sim = Sim::start(&[]);
    let mut t = Tollgate::start(
        sim.addr,
        with_store(pg::store_yaml(
            &url,
            "ack_timeout_ms: 1000, connect_timeout_ms: 500, statement_timeout_ms: 1000",
        )),
    );
    let load = Load::start(&t, 4);
    load.wait_for_more(50, "before the restart");

    server.stop();
    let down = Instant::now();
    // While it is down, changes are refused (not acknowledged), never lost.
    std::thread::sleep(Duration::from_millis(1_500));
    let during = load.acked();
    server.start_again();
    eprintln!("PostgreSQL down for {:?}", down.elapsed());
    load.wait_for_more(50, "after the restart");
    let recovered = down.elapsed();
    let (acked, refused) = load.stop();
    eprintln!(
        "restart: {acked} acknowledged, {refused} refused, serving again {recovered:?} after the stop"
    );
    assert!(refused > 0, "nothing was refused while PostgreSQL was down");
    assert!(acked > during);
    assert!(t.metric_value("tollgate_store_pg_reconnects_total") >= 1.0);
    assert!(t.metric_value("tollgate_store_commit_errors_total") >= 1.0);
    assert_eq!(t.metric_value("tollgate_store_fenced"), 0.0);
    // Ready again: the lease was renewed on a new session, the lock retaken.
    wait_until(|| get(&t.admin_url("/readyz")).0 == 200, "ready again");
    assert!(t.log().contains("taking it again"), "{}", t.log());
    nothing_acknowledged_is_lost(&t, &url, acked);
    assert!(t.stop_with("TERM").success(), "{}", t.log());
    let record = tollgate::store::PgStore::open_snapshot(&pg::settings(&url))
        .unwrap()
        .owner_record()
        .unwrap();
    assert!(record.released, "{record:?}");
}

#[test]
fn the_writers_session_killed_under_load_loses_nothing_and_doubles_nothing() {
    let db = TestDb::create("killed_writer");
    let sim = Sim::start(&[]);
    let t = Tollgate::start(sim.addr, with_store(pg::store_yaml(&db.url(), "")));
    let load = Load::start(&t, 4);
    let mut killed = 0;
    for _ in 0..10 {
        load.wait_for_more(20, "between kills");
        killed += db.terminate("tollgate writer");
    }
    load.wait_for_more(20, "after the last kill");
    let (acked, _) = load.stop();
    eprintln!("{killed} writer sessions killed, {acked} changes acknowledged");
    assert!(killed >= 10);
    assert!(t.metric_value("tollgate_store_pg_reconnects_total") >= 10.0);
    nothing_acknowledged_is_lost(&t, &db.url(), acked);
}
