//! Store ownership over the real binary (SPEC 6, "One owner per store"):
//! a second `tollgate run` on an owned store refuses to start and names
//! the owner; after `kill -9` a new owner serves within a second; an owner
//! paused (SIGSTOP) past its lease is taken over, and when it resumes it
//! refuses credit, is not ready, and commits nothing; the offline readers
//! work beside a running owner.
//!
//! Every process runs on its own loopback ports in its own temp dir, and is
//! killed when its handle drops (a stopped one too).

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tollgate::ledger::EntryKind;
use tollgate::store::{SqliteStore, Store};

/// The name the owner record carries (what a refusal must name).
fn host_name() -> String {
    tollgate::store::fence::host_name()
}

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

/// Writes a second configuration beside `t`'s: the same store (and key
/// file, unless `extra` says otherwise), its own ports.
fn second_config(t: &Tollgate, name: &str, extra: &str) -> (PathBuf, SocketAddr, SocketAddr) {
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
    std::fs::write(&path, format!("{text}{extra}")).unwrap();
    (
        path,
        format!("127.0.0.1:{port}").parse().unwrap(),
        format!("127.0.0.1:{admin_port}").parse().unwrap(),
    )
}

/// A second tollgate over the same store, killed on drop.
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

    /// Waits until it answers a credit request; panics past `limit`.
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

/// A tollgate with `store_yaml` as its `store:` section.
fn with_store(store_yaml: &str) -> TollgateOptions {
    TollgateOptions {
        extra_yaml: store_yaml.to_string(),
        ..TollgateOptions::default()
    }
}

fn verify_clean(t: &Tollgate) -> String {
    let out = t.cli(&["ledger", "verify"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ledger verify failed:\n{text}");
    text
}

#[test]
fn a_second_run_on_an_owned_store_exits_non_zero_naming_the_owner() {
    let sim = Sim::start(&[]);
    let t = Tollgate::start(sim.addr, with_store(STORE_YAML));
    assert!(add_credits(&t.url(""), "john", 5).contains("<balance>749</balance>"));
    // The second one has a key file of its own: it must never open it.
    let keys = t.dir.path().join("second-keys.db");
    let (config, _, _) =
        second_config(&t, "second.yaml", "idempotency: { path: second-keys.db }\n");

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
        format!("pid {} on host {}", t.pid(), host_name()),
        "started ".to_string(),
        " UTC".to_string(),
        "Stop that process".to_string(),
        "upgrade procedure".to_string(),
        "store.lease_s: 5 s".to_string(),
    ] {
        assert!(stderr.contains(&part), "{part:?} not in:\n{stderr}");
    }
    assert!(!keys.exists(), "the refused process opened its key file");

    // The owner goes on serving, ready and unfenced.
    assert_eq!(t.balance("john", "secret1"), "749");
    assert_eq!(get(&t.admin_url("/readyz")).0, 200);
    assert_eq!(t.metric_value("tollgate_store_fenced"), 0.0);
    assert_eq!(t.metric_value("tollgate_store_owner_token"), 1.0);
    verify_clean(&t);
}

#[test]
fn after_kill_9_a_new_owner_serves_within_a_second() {
    let sim = Sim::start(&[]);
    let mut t = Tollgate::start(sim.addr, with_store(STORE_YAML));
    assert!(add_credits(&t.url(""), "john", 5).contains("<balance>749</balance>"));
    let token = t.metric_value("tollgate_store_owner_token");

    let started = Instant::now();
    t.kill(); // SIGKILL: no release, the kernel frees the lock
    t.spawn();
    while !serves(&t.url("")) {
        assert!(started.elapsed() < Duration::from_secs(10), "{}", t.log());
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = started.elapsed();
    eprintln!("kill -9 to a new owner serving: {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(1),
        "a new owner took {elapsed:?} after kill -9"
    );
    assert_eq!(t.balance("john", "secret1"), "749");
    assert_eq!(t.metric_value("tollgate_store_owner_token"), token + 1.0);
    assert!(t.log().contains("exited without releasing"), "{}", t.log());
    // A clean stop releases: the next start finds the store free.
    assert!(t.stop_with("TERM").success());
    let record = SqliteStore::open_existing(&t.store_path())
        .unwrap()
        .owner_record()
        .unwrap();
    assert!(record.released && !record.holds_lock, "{record:?}");
}

#[test]
fn a_paused_owner_is_taken_over_and_commits_nothing_when_it_resumes() {
    let sim = Sim::start(&[]);
    let mut a = Tollgate::start(
        sim.addr,
        with_store("store: { path: tollgate.db, lease_s: 1 }\n"),
    );
    assert!(add_credits(&a.url(""), "john", 5).contains("<balance>749</balance>"));

    // A send is in flight at the gateway when A is paused.
    client()
        .post(sim.url("/sim/latency?ms=3000"))
        .send()
        .unwrap();
    let send_url = a.url(
        "/api?action=sendmessage&username=john&password=secret1&recipient=%2B36201234567&messagedata=paused",
    );
    let in_flight = std::thread::spawn(move || client().get(send_url).send().map(|r| r.text()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(sim.sendmessage_count() == 1
        && a.admin_get("/admin/reservations?state=open")["reservations"]
            .as_array()
            .map_or(0, Vec::len)
            == 1)
    {
        assert!(Instant::now() < deadline, "the send never got in flight");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid_a = a.pid();
    signal(pid_a, "STOP");
    let paused = Instant::now();

    // Requests that reach A while it is paused wait in its socket.
    let a_url = a.url("");
    let queued_add = {
        let url = a_url.clone();
        std::thread::spawn(move || add_credits(&url, "john", 777))
    };

    // Past the lease, B takes the store over (A still holds the lock).
    std::thread::sleep(Duration::from_millis(1_300));
    let (config_b, addr_b, admin_b) = second_config(&a, "b.yaml", "");
    let log_b = a.dir.path().join("b.log");
    let takeover = Instant::now();
    let mut b = Second::spawn(&config_b, addr_b, admin_b, log_b);
    b.wait_serving(Duration::from_secs(10));
    eprintln!(
        "SIGSTOP to takeover: {:?} (lease 1 s); new owner serving {:?} after its start",
        paused.elapsed(),
        takeover.elapsed()
    );
    assert!(b.log().contains("did not renew its lease"), "{}", b.log());
    // B has what A acknowledged; the send in flight is in doubt (744 + 5 − 2).
    assert_eq!(
        xml_field(&getcredits(&b.url()).1, "balance").as_deref(),
        Some("747")
    );
    let in_doubt: serde_json::Value = client()
        .get(format!(
            "http://{admin_b}/admin/reservations?state=in_doubt"
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let doubts = in_doubt["reservations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(doubts.len(), 1, "{in_doubt}");
    let reservation = doubts[0]["id"].as_u64().unwrap();
    assert!(add_credits(&b.url(), "john", 10).contains("<balance>757</balance>"));

    // A resumes: fenced. The request that waited is refused, nothing new is
    // answered from its stale ledger, and it is not ready.
    signal(pid_a, "CONT");
    let answer = queued_add.join().unwrap();
    assert!(answer.contains("<errorcode>1008</errorcode>"), "{answer}");
    let (_, body) = getcredits(&a_url);
    assert!(body.contains("<errorcode>1008</errorcode>"), "{body}");
    let send = get(&a.url(
        "/api?action=sendmessage&username=john&password=secret1&recipient=%2B36201234567&messagedata=late",
    ))
    .1;
    assert!(send.contains("<statuscode>1008</statuscode>"), "{send}");
    let soap = client()
        .post(a.url("/WebServices/2.2/Simple/Account.asmx"))
        .header("Content-Type", "text/xml; charset=utf-8")
        .header(
            "SOAPAction",
            "\"http://www.2sms.com/WebServices/2.2/Simple/GetBalance\"",
        )
        .body(
            "<?xml version=\"1.0\"?><soap:Envelope xmlns:soap=\"http://schemas.xmlsoap.org/soap/envelope/\"><soap:Body>\
             <GetBalance xmlns=\"http://www.2sms.com/WebServices/2.2/Simple/\"><Username>john</Username>\
             <Password>secret1</Password></GetBalance></soap:Body></soap:Envelope>",
        )
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        soap.contains("<GetBalanceResult>false</GetBalanceResult>"),
        "{soap}"
    );
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
    // The send that was in flight settles in A's memory only.
    let _ = in_flight.join().unwrap();
    let status = a.stop_with("TERM");
    assert!(!status.success(), "a fenced process exits non-zero");
    assert!(a.log().contains("this process is fenced"), "{}", a.log());

    // Nothing A did after the takeover is in the store.
    let mut store = SqliteStore::open_existing(&a.store_path()).unwrap();
    let mut adds = Vec::new();
    let mut resolved = false;
    store
        .for_each_entry(&mut |e| {
            if e.kind == EntryKind::Add && e.account == "john" {
                adds.push(e.amount_milli);
            }
            if e.reservation_id == Some(reservation) && e.kind != EntryKind::Reserve {
                resolved = true;
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(adds, vec![744_000, 5_000, 10_000], "john's adds");
    assert!(!resolved, "the fenced process settled the reservation");
    assert_eq!(
        xml_field(&getcredits(&b.url()).1, "balance").as_deref(),
        Some("757")
    );
    verify_clean(&a);
    drop(b);
}

#[test]
fn ledger_export_and_verify_read_beside_a_running_owner() {
    let sim = Sim::start(&[]);
    let t = Tollgate::start(sim.addr, with_store(STORE_YAML));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicI64::new(0));
    let traffic = {
        let (url, stop, acked) = (t.url(""), stop.clone(), acked.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if add_credits(&url, "poor", 1).contains("<balance>") {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let mut exported = 0;
    for _ in 0..5 {
        verify_clean(&t);
        let out = t.cli(&["ledger", "export", "--format", "csv"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = String::from_utf8(out.stdout).unwrap().lines().count();
        assert!(lines >= exported, "an export went back in time");
        exported = lines;
    }
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    assert!(acked.load(Ordering::Relaxed) > 0, "no traffic got through");
    // The readers took no ownership: the owner still owns and serves.
    assert_eq!(get(&t.admin_url("/readyz")).0, 200);
    assert!(add_credits(&t.url(""), "poor", 1).contains("<balance>"));
    let record = SqliteStore::open_existing(&t.store_path())
        .unwrap()
        .owner_record()
        .unwrap();
    assert_eq!((record.token.0, record.pid), (1, t.pid()));
}
