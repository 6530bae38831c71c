//! Store ownership on PostgreSQL over the real binary: a second `tollgate
//! run` on the same database refuses to start and names the owner; after
//! `kill -9` the server frees the owner's advisory lock with its session
//! and a new owner serves at once; an owner paused (SIGSTOP) past a short
//! lease is taken over, and when it resumes it is fenced and commits
//! nothing.
//!
//! Each test has a database of its own; every process is killed when its
//! handle drops.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::{self, TestDb};
use common::*;
use tollgate::ledger::EntryKind;
use tollgate::store::PgStore;

fn add_credits(url: &str, account: &str, amount: i64) -> String {
    get(&format!(
        "{url}/api?action=addcredits&username=admin&password=abc123&useraccount={account}&add={amount}"
    ))
    .1
}

fn getcredits(url: &str) -> (u16, String) {
    get(&format!(
        "{url}/api?action=getcredits&username=john&password=secret1"
    ))
}

fn signal(pid: u32, name: &str) {
    let sent = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{name} {pid}");
}

fn with_store(yaml: String) -> TollgateOptions {
    TollgateOptions {
        extra_yaml: yaml,
        ..TollgateOptions::default()
    }
}

/// A second configuration beside `t`'s: the same store, its own ports.
fn second_config(t: &Tollgate, name: &str) -> (PathBuf, SocketAddr, SocketAddr) {
    let text = std::fs::read_to_string(t.config_path()).unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let text = text
        .replace(
            &format!("listen: {}", t.addr),
            &format!("listen: 127.0.0.1:{port}"),
        )
        .replace(
            &format!("listen: {}", t.admin),
            &format!("listen: 127.0.0.1:{admin_port}"),
        );
    let path = t.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (
        path,
        format!("127.0.0.1:{port}").parse().unwrap(),
        format!("127.0.0.1:{admin_port}").parse().unwrap(),
    )
}

/// Whether `url` answers getcredits with a balance.
fn serves(url: &str) -> bool {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    client
        .get(format!(
            "{url}/api?action=getcredits&username=john&password=secret1"
        ))
        .send()
        .and_then(|r| r.text())
        .is_ok_and(|body| body.contains("<balance>"))
}

struct Second {
    proc: Proc,
    addr: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Second {
    fn spawn(config: &Path, addr: SocketAddr, admin: SocketAddr, log: PathBuf) -> Second {
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["run", "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn tollgate");
        Second {
            proc: Proc {
                child,
                log: Some(log.clone()),
            },
            addr,
            admin,
            log,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_serving(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.proc.child.try_wait().unwrap() {
                panic!("tollgate exited with {status}; log:\n{}", self.log());
            }
            if TcpStream::connect_timeout(&self.admin, Duration::from_millis(100)).is_ok()
                && serves(&self.url())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not serving after {limit:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn owner_record(url: &str) -> tollgate::store::fence::OwnerRecord {
    PgStore::open_snapshot(&pg::settings(url))
        .unwrap()
        .owner_record()
        .unwrap()
}

fn verify_clean(t: &Tollgate) {
    let out = t.cli(&["ledger", "verify"]);
    assert!(
        out.status.success(),
        "ledger verify failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_second_run_on_the_same_database_exits_non_zero_naming_the_owner() {
    let db = TestDb::create("fence_second");
    let sim = Sim::start(&[]);
    let t = Tollgate::start(sim.addr, with_store(pg::store_yaml(&db.url(), "")));
    assert!(add_credits(&t.url(""), "john", 5).contains("<balance>749</balance>"));
    let (config, _, _) = second_config(&t, "second.yaml");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run", "-c"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run a second tollgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("second run refused in {:?}:\n{stderr}", started.elapsed());
    assert!(!out.status.success(), "a second owner started:\n{stderr}");
    for part in [
        format!("store {}: the store is owned by another tollgate", db.url()),
        format!(
            "pid {} on host {}",
            t.pid(),
            tollgate::store::fence::host_name()
        ),
        "Stop that process".to_string(),
        "store.lease_s: 5 s".to_string(),
    ] {
        assert!(stderr.contains(&part), "{part:?} not in:\n{stderr}");
    }
    // The owner goes on serving, ready and unfenced, under token 1.
    assert_eq!(t.balance("john", "secret1"), "749");
    assert_eq!(get(&t.admin_url("/readyz")).0, 200);
    assert_eq!(t.metric_value("tollgate_store_fenced"), 0.0);
    assert_eq!(t.metric_value("tollgate_store_owner_token"), 1.0);
    let record = owner_record(&db.url());
    assert_eq!((record.token.0, record.pid), (1, t.pid()));
    verify_clean(&t);
}

#[test]
fn after_kill_9_a_new_owner_serves_at_once() {
    let db = TestDb::create("fence_kill");
    let sim = Sim::start(&[]);
    let mut t = Tollgate::start(sim.addr, with_store(pg::store_yaml(&db.url(), "")));
    assert!(add_credits(&t.url(""), "john", 5).contains("<balance>749</balance>"));

    let started = Instant::now();
    t.kill(); // SIGKILL: no release; the server ends its sessions
    t.spawn();
    while !serves(&t.url("")) {
        assert!(started.elapsed() < Duration::from_secs(10), "{}", t.log());
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = started.elapsed();
    eprintln!("kill -9 to a new owner serving: {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(2),
        "a new owner took {elapsed:?} after kill -9"
    );
    assert_eq!(t.balance("john", "secret1"), "749");
    assert_eq!(t.metric_value("tollgate_store_owner_token"), 2.0);
    assert!(t.log().contains("exited without releasing"), "{}", t.log());
    assert!(t.stop_with("TERM").success());
    let record = owner_record(&db.url());
    assert!(record.released && !record.holds_lock, "{record:?}");
}

#[test]
fn a_paused_owner_is_taken_over_and_commits_nothing_when_it_resumes() {
    let db = TestDb::create("fence_pause");
    let sim = Sim::start(&[]);
    let mut a = Tollgate::start(
        sim.addr,
        with_store(pg::store_yaml(&db.url(), "lease_s: 1")),
    );
    assert!(add_credits(&a.url(""), "john", 5).contains("<balance>749</balance>"));
    let pid_a = a.pid();
    signal(pid_a, "STOP");
    let paused = Instant::now();
    // A request that reaches A while it is paused waits in its socket.
    let a_url = a.url("");
    let queued_add = {
        let url = a_url.clone();
        std::thread::spawn(move || add_credits(&url, "john", 777))
    };

    // Past the lease, B takes the store over (A still holds the lock).
    std::thread::sleep(Duration::from_millis(1_300));
    let (config_b, addr_b, admin_b) = second_config(&a, "b.yaml");
    let mut b = Second::spawn(&config_b, addr_b, admin_b, a.dir.path().join("b.log"));
    b.wait_serving(Duration::from_secs(10));
    eprintln!(
        "SIGSTOP to a new owner serving: {:?} (lease 1 s)",
        paused.elapsed()
    );
    assert!(b.log().contains("did not renew its lease"), "{}", b.log());
    assert_eq!(
        xml_field(&getcredits(&b.url()).1, "balance").as_deref(),
        Some("749")
    );
    assert!(add_credits(&b.url(), "john", 10).contains("<balance>759</balance>"));

    // A resumes: fenced. The request that waited is refused, and nothing
    // more is answered from its stale ledger.
    signal(pid_a, "CONT");
    let answer = queued_add.join().unwrap();
    assert!(answer.contains("<errorcode>1008</errorcode>"), "{answer}");
    let (_, body) = getcredits(&a_url);
    assert!(body.contains("<errorcode>1008</errorcode>"), "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(&a.admin_url("/readyz"));
        assert_eq!(status, 503, "{body}");
        if body.contains("fenced") {
            break;
        }
        assert!(Instant::now() < deadline, "never reported fenced: {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(a.metric_value("tollgate_store_fenced"), 1.0);
    let status = a.stop_with("TERM");
    assert!(!status.success(), "a fenced process exits non-zero");

    // Nothing A did after the takeover is in the store; B holds the lock.
    let adds: Vec<i64> = pg::stored_entries(&db.url())
        .iter()
        .filter(|e| e.kind == EntryKind::Add && e.account == "john")
        .map(|e| e.amount_milli)
        .collect();
    assert_eq!(adds, vec![744_000, 5_000, 10_000], "john's adds");
    wait_until(
        || owner_record(&db.url()).holds_lock,
        "the new owner to pick the lock up",
    );
    let record = owner_record(&db.url());
    assert_eq!(record.token.0, 2);
    assert_eq!(
        xml_field(&getcredits(&b.url()).1, "balance").as_deref(),
        Some("759")
    );
    verify_clean(&a);
    drop(b);
}
