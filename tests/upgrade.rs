//! Zero-downtime upgrade over the real binary (issue 13): `tollgate run
//! --upgrade` plus SIGQUIT to the running one, repeated under load.
//!
//! - **Under load, five times in a row**: four keep-alive clients and a
//!   stream of new connections send `sendmessage`, `addcredits` and
//!   forwarded actions (streamed GETs and read-then-forwarded POSTs)
//!   throughout. Zero failed requests; every acknowledged change is there
//!   afterwards (balances, the gateway's count of sends) and `ledger
//!   verify` is clean. Each round also races 4N sends over the hand-over
//!   against credit for exactly N: exactly N are accepted.
//! - **The pause**: the extra wait a request sees during a hand-over
//!   (p50/p99 against the same run's requests outside hand-overs), and how
//!   it grows with sends in flight at the gateway (ozeki-sim's latency).
//!
//! What a client must do, as every HTTP client does: a request written on
//! a *reused* keep-alive connection that the server closes before sending
//! a single byte back (the old process drops its idle connections when it
//! stops listening) was never read; it is sent again on a new connection
//! (RFC 9112 §9.3.1). The test counts those retries and fails on anything
//! else: a connection refused, an answer cut short, an error answer.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Parts the race account can pay for in each round.
const RACE_N: usize = 10;
const JOHN_START: i64 = 1_000_000;

fn accounts_yaml() -> String {
    format!(
        "accounts:\n\
         - {{ name: admin, role: admin, password_hash: '{}', anytime: 1000 }}\n\
         - {{ name: john, role: user, password_hash: '{}', anytime: {JOHN_START} }}\n\
         - {{ name: poor, role: user, password_hash: '{}' }}\n\
         - {{ name: racer, role: user, password_hash: '{}' }}\n",
        password_hash("abc123"),
        password_hash("secret1"),
        password_hash("poor1"),
        password_hash("racer1"),
    )
}

/// A tollgate directory (config, store, log) whose processes this test
/// starts itself: the first with `run`, every successor with `run
/// --upgrade`.
struct Fleet {
    t: Tollgate,
}

impl Fleet {
    fn new(sim: &Sim, extra_yaml: &str) -> Fleet {
        Fleet::with_store(sim, STORE_YAML, extra_yaml)
    }

    fn with_store(sim: &Sim, store_yaml: &str, extra_yaml: &str) -> Fleet {
        let mut t = Tollgate::start(
            sim.addr,
            TollgateOptions {
                extra_yaml: format!("{store_yaml}{extra_yaml}"),
                accounts: accounts_yaml(),
                ..Default::default()
            },
        );
        assert!(t.stop_with("TERM").success());
        // The old process lives 5 s (pingora) + shutdown_grace_s after
        // SIGQUIT: room for the requests it still holds.
        let config = std::fs::read_to_string(t.config_path())
            .unwrap()
            .replace("shutdown_grace_s: 0", "shutdown_grace_s: 2");
        std::fs::write(t.config_path(), config).unwrap();
        Fleet { t }
    }

    fn spawn(&self, upgrade: bool) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.t.log_path())
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("run");
        if upgrade {
            cmd.arg("--upgrade");
        }
        let child = cmd
            .arg("-c")
            .arg(self.t.config_path())
            .env("RUST_LOG", "info,tollgate::access=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tollgate");
        Proc {
            child,
            log: Some(self.t.log_path()),
        }
    }

    fn upgrade_sock(&self) -> std::path::PathBuf {
        self.t.dir.path().join("tollgate.upgrade.sock")
    }

    /// Starts the first process and waits until it serves.
    fn start(&self) -> Proc {
        let p = self.spawn(false);
        self.wait_ready(Duration::from_secs(30));
        p
    }

    /// Until `/readyz` says 200 and the client listener accepts: the
    /// admin and proxy services start side by side, so the first can
    /// answer before the second has bound its port.
    fn wait_ready(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if readyz(self.t.admin) == Some(200) && connect(self.t.addr).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not ready after {limit:?}; log:\n{}",
                tail(&self.t.log())
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The upgrade recipe: start the successor, wait for its upgrade
    /// socket, SIGQUIT the old one; returns the successor and when the
    /// hand-over window opened and closed (the old process exited).
    fn upgrade(&self, mut old: Proc) -> (Proc, Instant, Instant) {
        let mut new = self.spawn(true);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.upgrade_sock().exists() {
            if let Some(status) = new.child.try_wait().unwrap() {
                panic!(
                    "the successor exited with {status}; log:\n{}",
                    tail(&self.t.log())
                );
            }
            assert!(
                Instant::now() < deadline,
                "no upgrade socket; log:\n{}",
                tail(&self.t.log())
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let quit = Instant::now();
        signal(old.child.id(), "QUIT");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = old.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the old process did not exit; log:\n{}",
                tail(&self.t.log())
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let exited = Instant::now();
        assert!(
            status.success(),
            "the old process exited with {status}; log:\n{}",
            tail(&self.t.log())
        );
        assert!(
            new.child.try_wait().unwrap().is_none(),
            "the successor died"
        );
        self.wait_ready(Duration::from_secs(10));
        // The pid file names the process that serves now (the unit's
        // reload signals it).
        let pid_file = self.t.dir.path().join("tollgate.pid");
        assert_eq!(
            std::fs::read_to_string(&pid_file).unwrap().trim(),
            new.child.id().to_string()
        );
        (new, quit, exited)
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

fn signal(pid: u32, name: &str) {
    let sent = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{name} {pid}");
}

fn readyz(admin: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.split(' ').nth(1)?.parse().ok()
}

/// One answer read off a connection; `Err(n)`: the connection ended after
/// `n` bytes of it.
fn read_one(s: &mut TcpStream) -> Result<(u16, bool, String), usize> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .expect("answers carry Content-Length");
            if buf.len() >= end + 4 + len {
                let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                let close = head.to_ascii_lowercase().contains("connection: close");
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                return Ok((status, close, body));
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return Err(buf.len()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// What one kind of request expects back.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Send,
    Add(i64),
    ForwardGet,
    ForwardPost,
}

fn request(kind: Kind, n: usize, close: bool) -> Vec<u8> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    match kind {
        Kind::Send => format!(
            "GET /api?action=sendmessage&username=john&password=secret1&recipient=%2B36201{n:06}&messagedata=up+{n} HTTP/1.1\r\nHost: t\r\n{connection}\r\n"
        )
        .into_bytes(),
        Kind::Add(amount) => format!(
            "GET /api?action=addcredits&username=admin&password=abc123&useraccount=poor&add={amount} HTTP/1.1\r\nHost: t\r\n{connection}\r\n"
        )
        .into_bytes(),
        Kind::ForwardGet => format!(
            "GET /api?action=getreport&username=john&password=secret1&n={n} HTTP/1.1\r\nHost: t\r\n{connection}\r\n"
        )
        .into_bytes(),
        Kind::ForwardPost => {
            let body = format!("action=getreport&username=john&password=secret1&n={n}");
            format!(
                "POST /api HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n{connection}\r\n{body}",
                body.len()
            )
            .into_bytes()
        }
    }
}

fn accepted(kind: Kind, status: u16, body: &str) -> bool {
    status == 200
        && match kind {
            Kind::Send => body.contains("<statuscode>0</statuscode>"),
            Kind::Add(_) => body.contains("<balance>"),
            Kind::ForwardGet | Kind::ForwardPost => body.contains("getreport"),
        }
}

/// What the clients saw, over the whole run.
#[derive(Default)]
struct Seen {
    sends: usize,
    adds_milli: i64,
    /// (when it started, how long it took).
    latencies: Vec<(Instant, Duration)>,
    failures: Vec<String>,
    /// Requests sent again after a reused connection closed unanswered.
    retried: usize,
}

impl Seen {
    fn record(&mut self, kind: Kind, started: Instant, status: u16, body: &str) {
        self.latencies.push((started, started.elapsed()));
        if !accepted(kind, status, body) {
            self.failures.push(format!(
                "{kind:?}: status {status}: {}",
                &body[..body.len().min(400)]
            ));
            return;
        }
        match kind {
            Kind::Send => self.sends += 1,
            Kind::Add(a) => self.adds_milli += a * 1000,
            _ => {}
        }
    }
}

struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    seen: Arc<Mutex<Seen>>,
}

fn kind_for(i: usize, next_amount: &AtomicI64) -> Kind {
    match i % 4 {
        0 | 1 => Kind::Send,
        2 => Kind::Add(next_amount.fetch_add(1, Ordering::Relaxed)),
        _ if i % 8 == 3 => Kind::ForwardGet,
        _ => Kind::ForwardPost,
    }
}

/// Four keep-alive clients and two threads opening a connection per
/// request, until stopped.
fn start_load(addr: SocketAddr) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let next_amount = Arc::new(AtomicI64::new(1));
    let counter = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for _ in 0..4 {
        let (stop, seen, next_amount, counter) = (
            stop.clone(),
            seen.clone(),
            next_amount.clone(),
            counter.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut conn: Option<TcpStream> = None;
            while !stop.load(Ordering::Relaxed) {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let kind = kind_for(i, &next_amount);
                let started = Instant::now();
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    let reused = conn.is_some();
                    let mut s = match conn.take() {
                        Some(s) => s,
                        None => match connect(addr) {
                            Ok(s) => s,
                            Err(e) => {
                                seen.lock().unwrap().failures.push(format!("connect: {e}"));
                                break;
                            }
                        },
                    };
                    if s.write_all(&request(kind, i, false)).is_err() && !reused {
                        seen.lock().unwrap().failures.push("write on a new connection".into());
                        break;
                    }
                    match read_one(&mut s) {
                        Ok((status, close, body)) => {
                            seen.lock().unwrap().record(kind, started, status, &body);
                            if !close {
                                conn = Some(s);
                            }
                            break;
                        }
                        // Closed unanswered on a reused connection: the
                        // request was never read; send it again.
                        Err(0) if reused && attempts < 5 => {
                            seen.lock().unwrap().retried += 1;
                        }
                        Err(n) => {
                            seen.lock().unwrap().failures.push(format!(
                                "{kind:?}: connection ended after {n} answer bytes (reused: {reused})"
                            ));
                            break;
                        }
                    }
                }
            }
        }));
    }
    for _ in 0..2 {
        let (stop, seen, next_amount, counter) = (
            stop.clone(),
            seen.clone(),
            next_amount.clone(),
            counter.clone(),
        );
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let kind = kind_for(i, &next_amount);
                let started = Instant::now();
                let result = connect(addr).and_then(|mut s| {
                    s.write_all(&request(kind, i, true))?;
                    Ok(s)
                });
                match result.map(|mut s| read_one(&mut s)) {
                    Ok(Ok((status, _, body))) => {
                        seen.lock().unwrap().record(kind, started, status, &body)
                    }
                    Ok(Err(n)) => seen.lock().unwrap().failures.push(format!(
                        "{kind:?}: new connection ended after {n} answer bytes"
                    )),
                    Err(e) => seen
                        .lock()
                        .unwrap()
                        .failures
                        .push(format!("new connection: {e}")),
                }
            }
        }));
    }
    Load {
        stop,
        threads,
        seen,
    }
}

fn get_text(addr: SocketAddr, path_and_query: &str) -> String {
    let mut s = connect(addr).unwrap();
    s.write_all(
        format!("GET {path_and_query} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    read_one(&mut s).map(|(_, _, b)| b).unwrap_or_default()
}

fn balance(addr: SocketAddr, user: &str, password: &str) -> String {
    let body = get_text(
        addr,
        &format!("/api?action=getcredits&username={user}&password={password}"),
    );
    xml_field(&body, "balance").unwrap_or_else(|| panic!("no balance: {body}"))
}

/// Races 4N single-part sends against credit for exactly N, one every
/// `every`, from its own thread: (accepted, refused for credit, other).
fn race(addr: SocketAddr, every: Duration) -> std::thread::JoinHandle<(usize, usize, Vec<String>)> {
    std::thread::spawn(move || {
        let handles: Vec<_> = (0..4 * RACE_N)
            .map(|i| {
                std::thread::sleep(every);
                std::thread::spawn(move || {
                    let body = get_text(
                        addr,
                        &format!(
                            "/api?action=sendmessage&username=racer&password=racer1&recipient=%2B3611{i:07}&messagedata=race"
                        ),
                    );
                    body
                })
            })
            .collect();
        let (mut ok, mut refused, mut other) = (0, 0, Vec::new());
        for h in handles {
            let body = h.join().unwrap();
            if body.contains("<statuscode>0</statuscode>") {
                ok += 1;
            } else if body.contains("<statuscode>1001</statuscode>") {
                refused += 1;
            } else {
                other.push(body);
            }
        }
        (ok, refused, other)
    })
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
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
fn five_upgrades_under_load_fail_no_request_and_lose_no_change() {
    let sim = Sim::start(&["--user", "racer:racer1:0", "--threads", "4"]);
    let fleet = Fleet::new(&sim, "");
    let addr = fleet.t.addr;
    let mut current = fleet.start();
    let load = start_load(addr);
    std::thread::sleep(Duration::from_millis(500));
    let mut windows = Vec::new();
    let mut raced = 0;
    for round in 1..=5 {
        let set = get_text(
            addr,
            &format!(
                "/api?action=setcredits&username=admin&password=abc123&useraccount=racer&newbalance={RACE_N}"
            ),
        );
        assert!(
            set.contains(&format!("<balance>{RACE_N}</balance>")),
            "{set}"
        );
        // The race starts just before SIGQUIT and runs across the hand-over.
        let racing = race(addr, Duration::from_millis(60));
        std::thread::sleep(Duration::from_millis(300));
        let (next, quit, exited) = fleet.upgrade(current);
        current = next;
        windows.push((quit, exited));
        let (ok, refused, other) = racing.join().unwrap();
        eprintln!(
            "round {round}: hand-over window {:?}; race: {ok} accepted, {refused} refused",
            exited - quit
        );
        assert!(
            other.is_empty(),
            "round {round}: {} race answers neither accepted nor refused, first: {}",
            other.len(),
            other[0]
        );
        assert_eq!((ok, refused), (RACE_N, 3 * RACE_N), "round {round}");
        raced += ok;
        assert_eq!(balance(addr, "racer", "racer1"), "0", "round {round}");
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(500));
    load.stop.store(true, Ordering::Relaxed);
    for t in load.threads {
        t.join().unwrap();
    }
    let seen = load.seen.lock().unwrap();
    let total = seen.latencies.len();
    eprintln!(
        "{total} requests ({} sends, {} credits added), {} failed, {} re-sent after an idle keep-alive close",
        seen.sends,
        seen.adds_milli / 1000,
        seen.failures.len(),
        seen.retried
    );
    assert!(
        seen.failures.is_empty(),
        "{} failed requests, first: {:#?}",
        seen.failures.len(),
        &seen.failures[..seen.failures.len().min(5)]
    );
    assert!(seen.sends > 50 && seen.adds_milli > 0, "too little traffic");

    // Every acknowledged change is there: balances and the gateway.
    assert_eq!(
        balance(addr, "poor", "poor1"),
        (seen.adds_milli / 1000).to_string()
    );
    assert_eq!(
        balance(addr, "john", "secret1"),
        (JOHN_START - 2 * seen.sends as i64).to_string()
    );
    assert_eq!(sim.sendmessage_count(), seen.sends + raced);

    // The pause: requests that started in the 2 s after a SIGQUIT (the
    // store moves within them; the old process then only winds down)
    // against those outside any hand-over window.
    let inside = |t: Instant| {
        windows
            .iter()
            .any(|(q, _)| t >= *q && t <= *q + Duration::from_secs(2))
    };
    let outside_any = |t: Instant| windows.iter().all(|(q, e)| t < *q || t > *e);
    let (mut during, mut outside): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    for (started, took) in &seen.latencies {
        if inside(*started) {
            during.push(*took);
        } else if outside_any(*started) {
            outside.push(*took);
        }
    }
    during.sort();
    outside.sort();
    let (b50, b99) = (quantile(&outside, 0.5), quantile(&outside, 0.99));
    let (d50, d99) = (quantile(&during, 0.5), quantile(&during, 0.99));
    eprintln!(
        "latency outside hand-overs: p50 {b50:?} p99 {b99:?} ({} requests); in the 2 s after SIGQUIT: p50 {d50:?} p99 {d99:?} max {:?} ({} requests); extra wait p50 {:?} p99 {:?}",
        outside.len(),
        during.last().copied().unwrap_or_default(),
        during.len(),
        d50.saturating_sub(b50),
        d99.saturating_sub(b99)
    );
    drop(seen);

    // A clean stop, and the store verifies.
    signal(current.child.id(), "TERM");
    let status = current.child.wait().unwrap();
    assert!(status.success(), "final stop: {status}");
    let report = verify_clean(&fleet.t);
    eprintln!("{report}");
    let log = fleet.t.log();
    assert_eq!(
        log.matches("store taken over and ledger restored").count(),
        5,
        "{}",
        tail(&log)
    );
    assert!(!log.contains("not persisted"), "{}", tail(&log));
}

/// The extra wait of a credit request during a hand-over, with sends in
/// flight at a gateway that answers after `latency`: the old process lets
/// them finish (up to `upgrade.handover_grace_ms`) before it releases the
/// store, and credit requests wait that long.
#[test]
fn the_handover_pause_grows_with_sends_in_flight() {
    let sim = Sim::start(&["--user", "racer:racer1:0", "--threads", "4"]);
    let fleet = Fleet::new(&sim, "");
    let addr = fleet.t.addr;
    let mut current = fleet.start();
    let mut rows = Vec::new();
    for latency_ms in [0u64, 100, 400, 1000] {
        client()
            .post(sim.url(&format!("/sim/latency?ms={latency_ms}")))
            .send()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        // Eight senders keep sends in flight at the gateway.
        let senders: Vec<_> = (0..8)
            .map(|k| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut n = 0;
                    let mut failed = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let body = get_text(
                            addr,
                            &format!(
                                "/api?action=sendmessage&username=john&password=secret1&recipient=%2B3610{k}{n:05}&messagedata=f"
                            ),
                        );
                        if !body.contains("<statuscode>0</statuscode>") {
                            failed.push(body);
                        }
                    }
                    failed
                })
            })
            .collect();
        // A probe: one addcredits every 5 ms, timed.
        let probe = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut out: Vec<(Instant, Duration, String)> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let body = get_text(
                        addr,
                        "/api?action=addcredits&username=admin&password=abc123&useraccount=poor&add=1",
                    );
                    out.push((t, t.elapsed(), body));
                    std::thread::sleep(Duration::from_millis(5));
                }
                out
            })
        };
        std::thread::sleep(Duration::from_millis(latency_ms + 500));
        let (next, quit, exited) = fleet.upgrade(current);
        current = next;
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        for s in senders {
            let failed = s.join().unwrap();
            assert!(
                failed.is_empty(),
                "latency {latency_ms}: {:?}",
                &failed[..1]
            );
        }
        let probes = probe.join().unwrap();
        let failed: Vec<&String> = probes
            .iter()
            .map(|p| &p.2)
            .filter(|b| !b.contains("<balance>"))
            .collect();
        assert!(
            failed.is_empty(),
            "latency {latency_ms}: {} probes failed, first: {:?}",
            failed.len(),
            failed[0]
        );
        let mut before: Vec<Duration> = probes.iter().filter(|p| p.0 < quit).map(|p| p.1).collect();
        let mut during: Vec<Duration> = probes
            .iter()
            .filter(|p| p.0 >= quit && p.0 <= exited)
            .map(|p| p.1)
            .collect();
        before.sort();
        during.sort();
        let pause = during.last().copied().unwrap_or_default();
        let row = format!(
            "gateway latency {latency_ms:>4} ms: credit request p50 {:?} before; during the hand-over window p50 {:?} p99 {:?}, longest (the pause) {pause:?} ({} probes)",
            quantile(&before, 0.5),
            quantile(&during, 0.5),
            quantile(&during, 0.99),
            during.len()
        );
        // Bounded by the grace (2 s) plus the successor's restore.
        assert!(pause < Duration::from_secs(5), "{row}");
        eprintln!("{row}");
        rows.push(row);
    }
    eprintln!("hand-over pause by sends in flight:\n{}", rows.join("\n"));
    signal(current.child.id(), "TERM");
    assert!(current.child.wait().unwrap().success());
    verify_clean(&fleet.t);
}

/// SIGQUIT with no successor (an operator error): the old process stops
/// deciding credit, so credit requests wait `upgrade.wait_max_ms` and are
/// refused `store_unavailable` in their door's shape, while forwarded
/// traffic keeps flowing; readiness says `handing_over`; the process then
/// exits 0 having released the store, and the next `tollgate run` starts
/// at once.
#[test]
fn sigquit_without_a_successor_refuses_credit_in_shape_and_releases_the_store() {
    let sim = Sim::start(&[]);
    let fleet = Fleet::new(&sim, "upgrade: { wait_max_ms: 300 }\n");
    let addr = fleet.t.addr;
    let mut p = fleet.start();
    assert_eq!(balance(addr, "john", "secret1"), JOHN_START.to_string());
    let quit = Instant::now();
    signal(p.child.id(), "QUIT");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(readyz(fleet.t.admin), Some(503));

    let started = Instant::now();
    let body = get_text(
        addr,
        "/api?action=getcredits&username=john&password=secret1",
    );
    let waited = started.elapsed();
    assert!(body.contains("<errorcode>1008</errorcode>"), "{body}");
    assert!(
        waited >= Duration::from_millis(250),
        "answered after {waited:?}"
    );
    let send = get_text(
        addr,
        "/api?action=sendmessage&username=john&password=secret1&recipient=%2B36201234567,%2B36207654321&messagedata=x",
    );
    assert_eq!(xml_all(&send, "statuscode"), vec!["1008", "1008"], "{send}");
    // SOAP: the operation's own failure answer, no balances.
    let soap = client()
        .post(format!("http://{addr}/WebServices/2.2/Simple/Account.asmx"))
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
        soap.contains("<GetBalanceResult>false</GetBalanceResult>") && soap.contains("1008"),
        "{soap}"
    );
    // Not tollgate's: flows.
    let forwarded = get_text(addr, "/api?action=getreport&username=john&password=secret1");
    assert!(forwarded.contains("getreport"), "{forwarded}");
    assert_eq!(sim.sendmessage_count(), 0);

    let status = p.child.wait().unwrap();
    assert!(status.success(), "{status}");
    eprintln!(
        "SIGQUIT without a successor: exited after {:?}",
        quit.elapsed()
    );
    let record = tollgate::store::SqliteStore::open_existing(&fleet.t.store_path())
        .unwrap()
        .owner_record()
        .unwrap();
    assert!(record.released, "{record:?}");
    let mut again = fleet.start();
    assert_eq!(balance(addr, "john", "secret1"), JOHN_START.to_string());
    signal(again.child.id(), "TERM");
    assert!(again.child.wait().unwrap().success());
    verify_clean(&fleet.t);
}

/// A successor whose old process is never told (no SIGQUIT): it never
/// owns the store, pingora gives up waiting for the sockets and it exits
/// non-zero; the old process serves on throughout and a later upgrade
/// works.
#[test]
fn a_successor_never_handed_over_exits_and_the_old_process_serves_on() {
    let sim = Sim::start(&[]);
    let fleet = Fleet::new(&sim, "");
    let addr = fleet.t.addr;
    let old = fleet.start();
    let mut stray = fleet.spawn(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        assert!(
            get_text(
                addr,
                "/api?action=addcredits&username=admin&password=abc123&useraccount=poor&add=1"
            )
            .contains("<balance>"),
            "the old process stopped serving"
        );
        if let Some(status) = stray.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the stray successor never exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "a successor that got nothing exited 0");
    assert_eq!(readyz(fleet.t.admin), Some(200));
    let adds: i64 = balance(addr, "poor", "poor1").parse().unwrap();
    assert!(adds > 0);
    // The proper recipe still works after it.
    let (mut next, _, _) = fleet.upgrade(old);
    assert_eq!(balance(addr, "poor", "poor1"), adds.to_string());
    signal(next.child.id(), "TERM");
    assert!(next.child.wait().unwrap().success());
    verify_clean(&fleet.t);
}

/// A send still at the gateway when the hand-over grace ends: its
/// reservation, committed before it was forwarded, is in doubt at the
/// successor (neither charged nor returned), its client still gets the
/// gateway's answer, and nothing the old process does after the release
/// reaches the store.
#[test]
fn a_send_in_flight_past_the_grace_is_in_doubt_at_the_successor() {
    let sim = Sim::start(&[]);
    let fleet = Fleet::new(&sim, "upgrade: { handover_grace_ms: 200 }\n");
    let addr = fleet.t.addr;
    let old = fleet.start();
    client()
        .post(sim.url("/sim/latency?ms=3000"))
        .send()
        .unwrap();
    let in_flight = std::thread::spawn(move || {
        get_text(
            addr,
            "/api?action=sendmessage&username=john&password=secret1&recipient=%2B36201234567&messagedata=slow",
        )
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.sendmessage_count() == 0 {
        assert!(
            Instant::now() < deadline,
            "the send never reached the gateway"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    client().post(sim.url("/sim/latency?ms=0")).send().unwrap();
    let (mut next, _, _) = fleet.upgrade(old);
    let answer = in_flight.join().unwrap();
    assert!(answer.contains("<statuscode>0</statuscode>"), "{answer}");
    // In doubt at the successor: reserved, not posted, not voided.
    let doubts: serde_json::Value = client()
        .get(fleet.t.admin_url("/admin/reservations?state=in_doubt"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let doubts = doubts["reservations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(doubts.len(), 1, "{doubts:?}");
    assert_eq!(doubts[0]["total"], "2", "{doubts:?}");
    // 2 credits held for it: the available balance shows them taken.
    assert_eq!(
        balance(addr, "john", "secret1"),
        (JOHN_START - 2).to_string()
    );
    let log = fleet.t.log();
    assert!(
        log.contains("still in flight at the end of the hand-over grace"),
        "{}",
        tail(&log)
    );
    assert!(
        log.contains("recorded after the store was handed over"),
        "{}",
        tail(&log)
    );
    signal(next.child.id(), "TERM");
    assert!(next.child.wait().unwrap().success());
    verify_clean(&fleet.t);
}

/// The same hand-over on a PostgreSQL store: the fence is the store's
/// (an advisory lock and the owner row), the recipe and the guarantees are
/// the same.
#[test]
fn upgrades_on_a_postgresql_store_fail_no_request() {
    let db = common::pg::TestDb::create("upgrade_pg");
    let sim = Sim::start(&["--user", "racer:racer1:0", "--threads", "4"]);
    // No store.path: the sockets go beside the configuration.
    let fleet = Fleet::with_store(
        &sim,
        &common::pg::store_yaml(&db.url(), ""),
        "upgrade: { sock: tollgate.upgrade.sock, pid_file: tollgate.pid }\n",
    );
    let addr = fleet.t.addr;
    let mut current = fleet.start();
    let load = start_load(addr);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..2 {
        let (next, _, _) = fleet.upgrade(current);
        current = next;
        std::thread::sleep(Duration::from_millis(300));
    }
    load.stop.store(true, Ordering::Relaxed);
    for t in load.threads {
        t.join().unwrap();
    }
    let seen = load.seen.lock().unwrap();
    eprintln!(
        "postgresql: {} requests, {} failed, {} re-sent",
        seen.latencies.len(),
        seen.failures.len(),
        seen.retried
    );
    assert!(
        seen.failures.is_empty(),
        "{:#?}",
        &seen.failures[..seen.failures.len().min(5)]
    );
    assert_eq!(
        balance(addr, "poor", "poor1"),
        (seen.adds_milli / 1000).to_string()
    );
    assert_eq!(
        balance(addr, "john", "secret1"),
        (JOHN_START - 2 * seen.sends as i64).to_string()
    );
    assert_eq!(sim.sendmessage_count(), seen.sends);
    drop(seen);
    signal(current.child.id(), "TERM");
    assert!(current.child.wait().unwrap().success());
    verify_clean(&fleet.t);
}
