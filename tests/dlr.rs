//! Delivery reports over real TCP: the real `tollgate` binary in front of
//! `ozeki-sim`, which calls the rewritten `reporturl` back like the
//! gateway; a tiny HTTP receiver plays the client's own `reporturl`.
//! After each test `tollgate ledger verify` must be clean.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// The client's own report URL: records every request target it answers
/// with a 2xx (and its `X-Tollgate-Delivery-Id`), answers `status`
/// (changeable).
struct Receiver {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(String, String)>>>,
    status: Arc<AtomicU16>,
}

impl Receiver {
    fn start(status: u16) -> Receiver {
        Self::on(TcpListener::bind("127.0.0.1:0").unwrap(), status)
    }

    fn on(listener: TcpListener, status: u16) -> Receiver {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let code = Arc::new(AtomicU16::new(status));
        let (s, c) = (seen.clone(), code.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let Some(request) = read_request(&mut stream) else {
                    continue;
                };
                let code = c.load(Ordering::SeqCst);
                if (200..300).contains(&code) {
                    let id = request.header("X-Tollgate-Delivery-Id").unwrap_or("");
                    s.lock()
                        .unwrap()
                        .push((request.target.clone(), id.to_string()));
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        Receiver {
            addr,
            seen,
            status: code,
        }
    }

    fn template(&self) -> String {
        format!(
            "http://{}/r?id=$messageid&to=$recipient&st=$deliverystatus&from=$originator&keep=$nokeyword",
            self.addr
        )
    }

    /// The request targets answered 2xx, in order.
    fn seen(&self) -> Vec<String> {
        self.deliveries().into_iter().map(|(t, _)| t).collect()
    }

    /// (target, `X-Tollgate-Delivery-Id`) of each call answered 2xx.
    fn deliveries(&self) -> Vec<(String, String)> {
        self.seen.lock().unwrap().clone()
    }
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

struct Setup {
    sim: Sim,
    tg: Tollgate,
    dlr_port: u16,
}

fn start(extra_dlr: &str) -> Setup {
    start_on(STORE_YAML, extra_dlr)
}

fn start_on(store_yaml: &str, extra_dlr: &str) -> Setup {
    let sim = Sim::start(&[]);
    let dlr_port = free_port();
    let yaml = format!(
        "{store_yaml}\
         dlr: {{ enabled: true, listen: 127.0.0.1:{dlr_port}{extra_dlr} }}\n\
         outbox: {{ retry_initial_ms: 50, retry_max_ms: 200 }}\n"
    );
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: yaml,
            ..Default::default()
        },
    );
    wait_until(
        || std::net::TcpStream::connect(("127.0.0.1", dlr_port)).is_ok(),
        "the dlr listener",
    );
    Setup { sim, tg, dlr_port }
}

fn sim_post(sim: &Sim, path_and_query: &str) {
    let r = client().post(sim.url(path_and_query)).send().unwrap();
    assert!(r.status().is_success(), "{path_and_query}");
}

fn send(tg: &Tollgate, recipients: &str, text: &str, reporturl: Option<&str>) -> String {
    let mut q = format!(
        "/api?action=sendmessage&username=john&password=secret1&originator=ACME&recipient={}&messagedata={}",
        enc(recipients),
        enc(text)
    );
    if let Some(u) = reporturl {
        q.push_str(&format!("&reporturl={}", enc(u)));
    }
    let (status, body) = get(&tg.url(&q));
    assert_eq!(status, 200, "{body}");
    body
}

fn balance(tg: &Tollgate) -> f64 {
    tg.balance("john", "secret1").parse().unwrap()
}

fn verify_clean(tg: &Tollgate) {
    let out = tg.cli(&["ledger", "verify"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ledger verify:\n{text}");
}

/// Waits until the simulator saw `n` reports answered 200, so recorded in
/// the outbox: a test that kills tollgate after this loses nothing it
/// acknowledged. (The simulator retries a report only for half a second;
/// one it gave up on during a restart was never tollgate's to lose.)
fn wait_acknowledged(sim: &Sim, n: usize) {
    wait_until(
        || sim_calls(sim).iter().filter(|c| c["status"] == 200).count() == n,
        "the reports acknowledged",
    );
}

fn sim_calls(sim: &Sim) -> Vec<serde_json::Value> {
    client()
        .get(sim.url("/sim/dlr"))
        .send()
        .unwrap()
        .json::<serde_json::Value>()
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// `refund` entries in the store (read beside the owner).
fn refund_entries(tg: &Tollgate) -> usize {
    use tollgate::store::Store;
    let mut store = tollgate::store::SqliteStore::open_existing(&tg.store_path()).unwrap();
    let mut n = 0;
    store
        .for_each_entry(&mut |e| {
            if e.kind == tollgate::ledger::EntryKind::Refund {
                n += 1;
            }
            Ok(())
        })
        .unwrap();
    n
}

fn refunds(tg: &Tollgate) -> f64 {
    tg.metric_value("tollgate_dlr_refunds_total")
}

#[test]
fn accept_policy_refunds_failed_expired_rejected_and_keeps_delivered_and_silent() {
    let s = start("");
    let rx = Receiver::start(200);
    sim_post(&s.sim, "/sim/dlr?prefix=3630&outcome=failed");
    sim_post(&s.sim, "/sim/dlr?prefix=3631&outcome=expired");
    sim_post(&s.sim, "/sim/dlr?prefix=3670&outcome=rejected");
    sim_post(&s.sim, "/sim/dlr?prefix=3699&outcome=never");
    // Reports wait until the charge before them is checked.
    sim_post(&s.sim, "/sim/dlr/hold?on=1");
    // Every recipient costs 1 credit (prefix 36), +3620 costs 2.
    let before = balance(&s.tg);
    send(
        &s.tg,
        "+36201111111,+36301111111,+36311111111,+36701111111,+36991111111",
        "hi",
        Some(&rx.template()),
    );
    assert_eq!(balance(&s.tg), before - 6.0);
    sim_post(&s.sim, "/sim/dlr/hold?on=0");
    wait_until(|| rx.seen().len() == 4, "four relayed reports");
    wait_until(|| refunds(&s.tg) == 3.0, "three refunds");
    assert_eq!(
        balance(&s.tg),
        before - 2.0 - 1.0,
        "delivered and silent stay charged"
    );
    let seen = rx.seen();
    // Exactly the gateway's values, substituted as it would have.
    assert!(
        seen.iter().any(|t| t.starts_with("/r?id=")
            && t.contains("&to=%2B36201111111&st=delivered&from=ACME&keep=$nokeyword")),
        "{seen:?}"
    );
    for st in ["undelivered", "expired", "rejected"] {
        assert_eq!(
            seen.iter()
                .filter(|t| t.contains(&format!("st={st}")))
                .count(),
            1,
            "{st}: {seen:?}"
        );
    }
    // The sim's calls went to tollgate's callback, never to the client.
    let calls = sim_calls(&s.sim);
    assert!(calls.iter().all(|c| c["url"]
        .as_str()
        .unwrap()
        .starts_with(&format!("http://127.0.0.1:{}/dlr/", s.dlr_port))));
    assert_eq!(
        s.tg.metric_value("tollgate_dlr_reports_total{outcome=\"failed\",result=\"applied\"}"),
        1.0
    );
    assert_eq!(
        s.tg.metric_value("tollgate_dlr_refunded_milli_total"),
        3000.0
    );
    // The token never reaches the log.
    let token_of = |url: &str| url.split("/dlr/").nth(1).unwrap()[..32].to_string();
    let token = token_of(calls[0]["url"].as_str().unwrap());
    assert!(!s.tg.log().contains(&token));
    verify_clean(&s.tg);
}

#[test]
fn multipart_partial_failure_refunds_the_failed_part_only() {
    let s = start(", keywords: { part: \"$part\" }");
    let rx = Receiver::start(200);
    // Two parts at 2 credits each (+3620): part 2 fails. Two parts at 1
    // credit each (+3630): both fail, one report each.
    sim_post(
        &s.sim,
        "/sim/dlr?prefix=3620&outcome=delivered,failed&parts=2",
    );
    sim_post(&s.sim, "/sim/dlr?prefix=3630&outcome=failed&parts=2");
    sim_post(&s.sim, "/sim/dlr/hold?on=1");
    let before = balance(&s.tg);
    let long = "x".repeat(200);
    send(
        &s.tg,
        "+36201111111,+36301111111",
        &long,
        Some(&rx.template()),
    );
    assert_eq!(balance(&s.tg), before - 6.0);
    sim_post(&s.sim, "/sim/dlr/hold?on=0");
    wait_until(|| rx.seen().len() == 4, "every part report relayed");
    wait_until(|| refunds(&s.tg) == 3.0, "three parts refunded");
    assert_eq!(balance(&s.tg), before - 2.0);
    assert_eq!(refund_entries(&s.tg), 3);
    verify_clean(&s.tg);
}

#[test]
fn duplicates_out_of_order_and_early_reports_move_money_once() {
    let s = start("");
    let rx = Receiver::start(200);
    sim_post(&s.sim, "/sim/dlr?prefix=36&outcome=failed&duplicates=3");
    sim_post(&s.sim, "/sim/dlr/mode?reverse=1&early=1");
    let before = balance(&s.tg);
    send(
        &s.tg,
        "+36301111111,+36302222222",
        "hi",
        Some(&rx.template()),
    );
    wait_until(|| refunds(&s.tg) == 2.0, "two refunds");
    wait_until(|| sim_calls(&s.sim).len() == 8, "all eight calls made");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(refunds(&s.tg), 2.0, "duplicates refunded nothing");
    assert_eq!(balance(&s.tg), before);
    wait_until(|| rx.seen().len() == 2, "one relay per report");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx.seen().len(), 2, "{:?}", rx.seen());
    assert!(
        s.tg.metric_value("tollgate_dlr_reports_total{outcome=\"failed\",result=\"duplicate\"}")
            + s.tg
                .metric_value("tollgate_dlr_refused_total{reason=\"unknown_token\"}")
            >= 6.0
    );
    // Late: the send is closed once every share has its final report; a
    // replayed callback is an unknown token and moves nothing.
    let url = sim_calls(&s.sim)[0]["url"].as_str().unwrap().to_string();
    wait_until(|| get(&url).0 == 404, "the closed token is unknown");
    assert_eq!(balance(&s.tg), before);
    verify_clean(&s.tg);
}

#[test]
fn hostile_callbacks_are_refused_with_a_clear_answer() {
    let s = start(", request: always");
    sim_post(&s.sim, "/sim/dlr?prefix=36&outcome=never");
    let base = format!("http://127.0.0.1:{}", s.dlr_port);
    assert_eq!(
        get(&format!(
            "{base}/dlr/0123456789abcdef0123456789abcdef?deliverystatus=undelivered"
        ))
        .0,
        404
    );
    assert_eq!(get(&format!("{base}/dlr/not-a-token")).0, 404);
    assert_eq!(get(&format!("{base}/elsewhere")).0, 404);
    let big = "a".repeat(9000);
    assert_eq!(get(&format!("{base}/dlr/x?{big}")).0, 413);
    // dlr.request: always adds tollgate's own reporturl.
    send(&s.tg, "+36301111111", "hi", None);
    let rewritten = s.sim.requests();
    let query = rewritten.last().unwrap()["query"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(query.contains("reporturl="), "{query}");
    // A forged report for the right token but another number moves
    // nothing: no share matches.
    let token = last_dlr_token(&s.sim);
    let before = balance(&s.tg);
    let (code, body) = get(&format!(
        "{base}/dlr/{token}?messageid=zz&recipient=%2B449999&deliverystatus=undelivered"
    ));
    assert_eq!((code, body.as_str()), (200, "OK\n"));
    assert_eq!(balance(&s.tg), before);
    assert_eq!(
        s.tg.metric_value("tollgate_dlr_refused_total{reason=\"no_share\"}"),
        1.0
    );
    // The right number: refunded once, however often it is replayed.
    for _ in 0..3 {
        let (code, _) = get(&format!(
            "{base}/dlr/{token}?messageid=m1&recipient=%2B36301111111&deliverystatus=undelivered"
        ));
        assert!(code == 200 || code == 404);
    }
    assert_eq!(balance(&s.tg), before + 1.0);
    assert_eq!(refunds(&s.tg), 1.0);
    // A flood of distinct reports for a live token is cut off.
    send(&s.tg, "+36301111112", "hi", None);
    let token = last_dlr_token(&s.sim);
    let codes: Vec<u16> = (0..40)
        .map(|i| {
            get(&format!(
                "{base}/dlr/{token}?messageid=x{i}&recipient=%2B4400{i}&deliverystatus=enroute"
            ))
            .0
        })
        .collect();
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 24, "{codes:?}");
    assert!(codes[24..].iter().all(|c| *c == 429), "{codes:?}");
    verify_clean(&s.tg);
}

#[test]
fn a_part_number_the_message_lacks_moves_nothing() {
    let s = start(", request: always, keywords: { part: \"$part\" }");
    sim_post(&s.sim, "/sim/dlr?prefix=36&outcome=never");
    let base = format!("http://127.0.0.1:{}", s.dlr_port);
    // Two parts at 1 credit each.
    send(&s.tg, "+36301111111", &"x".repeat(200), None);
    let token = last_dlr_token(&s.sim);
    let before = balance(&s.tg);
    let report = |part: &str| {
        get(&format!(
            "{base}/dlr/{token}?messageid=m1&recipient=%2B36301111111\
             &deliverystatus=undelivered&part={part}"
        ))
    };
    // Read as "every part" before: a bogus part number refunded all.
    for (part, answer) in [
        ("7", "part out of range for this message\n"),
        ("0", "part out of range for this message\n"),
        ("two", "part is not a number\n"),
        ("-1", "part is not a number\n"),
    ] {
        let (code, body) = report(part);
        assert_eq!((code, body.as_str()), (400, answer), "part={part}");
    }
    assert_eq!(balance(&s.tg), before);
    assert_eq!(refunds(&s.tg), 0.0);
    assert_eq!(
        s.tg.metric_value("tollgate_dlr_refused_total{reason=\"malformed\"}"),
        4.0
    );
    assert_eq!(
        s.tg.metric_value("tollgate_dlr_reports_total{outcome=\"failed\",result=\"refused\"}"),
        4.0
    );
    // A part it has: that part only.
    assert_eq!(report("2"), (200, "OK\n".to_string()));
    assert_eq!(balance(&s.tg), before + 1.0);
    verify_clean(&s.tg);
}

#[test]
fn kill_9_with_reports_in_the_outbox_loses_nothing_and_relays_once() {
    let s = start("");
    let mut tg = s.tg;
    // The client's receiver is down (503) while reports arrive.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let rx = Receiver::on(listener, 503);
    sim_post(&s.sim, "/sim/dlr?prefix=3630&outcome=failed");
    let before = balance(&tg);
    send(&tg, "+36301111111,+36201111111", "hi", Some(&rx.template()));
    wait_until(|| refunds(&tg) == 1.0, "the refund");
    wait_until(
        || {
            tg.metric_value("tollgate_outbox_attempts_total{kind=\"dlr_relay\",result=\"failed\"}")
                >= 2.0
        },
        "failed relay attempts",
    );
    wait_acknowledged(&s.sim, 2);
    assert!(rx.seen().is_empty());
    tg.stop_with("KILL");
    rx.status.store(200, Ordering::SeqCst);
    tg.spawn();
    wait_until(
        || rx.seen().len() == 2,
        "both reports relayed after the restart",
    );
    // Money settled once: the refund survived, and was not made again.
    assert_eq!(balance(&tg), before - 2.0);
    std::thread::sleep(Duration::from_millis(400));
    tg.stop_with("KILL");
    tg.spawn();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        rx.seen().len(),
        2,
        "relayed again after an acknowledged success"
    );
    assert_eq!(balance(&tg), before - 2.0);
    assert_eq!(
        tg.metric_value("tollgate_dlr_refunds_total"),
        0.0,
        "no refund after restart"
    );
    verify_clean(&tg);
    let _ = s.sim;
}

#[test]
fn kill_9_with_reports_in_flight_settles_each_once() {
    let s = start("");
    let mut tg = s.tg;
    let rx = Receiver::start(200);
    // Reports trickle in while tollgate is killed and restarted: the sim
    // retries what tollgate did not answer.
    sim_post(&s.sim, "/sim/dlr?prefix=36&outcome=failed&delay_ms=150");
    let before = balance(&tg);
    let recipients: Vec<String> = (0..8).map(|i| format!("+3630111111{i}")).collect();
    send(&tg, &recipients.join(","), "hi", Some(&rx.template()));
    std::thread::sleep(Duration::from_millis(500));
    tg.stop_with("KILL");
    std::thread::sleep(Duration::from_millis(150));
    tg.spawn();
    wait_until(
        || sim_calls(&s.sim).len() == 8,
        "every report called (some retried)",
    );
    let calls = sim_calls(&s.sim);
    let acknowledged = calls.iter().filter(|c| c["status"] == 200).count();
    // A report the gateway saw acknowledged is refunded exactly once; one
    // whose callbacks all failed (tollgate down past the retries) at most
    // once (it may have been committed just before the kill).
    std::thread::sleep(Duration::from_millis(500));
    let refunded = refund_entries(&tg);
    assert!(
        (acknowledged..=8).contains(&refunded),
        "{refunded} refunds for {acknowledged} acknowledged reports"
    );
    assert_eq!(balance(&tg), before - 8.0 + refunded as f64);
    verify_clean(&tg);
    // Each acknowledged report reached the client. A relay is never sent
    // again after its 2xx was committed; one the kill caught between the
    // client's 2xx and that commit is sent again by the next process, with
    // the same `X-Tollgate-Delivery-Id`, so the client can drop it.
    wait_until(|| rx.seen().len() >= acknowledged, "relays");
    std::thread::sleep(Duration::from_millis(300));
    let deliveries = rx.deliveries();
    let mut by_target: HashMap<&str, Vec<&str>> = HashMap::new();
    for (target, id) in &deliveries {
        assert!(!id.is_empty(), "a relay without a delivery id: {target}");
        by_target.entry(target).or_default().push(id);
    }
    for (target, ids) in &by_target {
        assert!(
            ids.len() <= 2 && ids.iter().all(|id| id == &ids[0]),
            "{target} relayed as {ids:?} (one kill: at most once more, same id)"
        );
    }
}

#[test]
fn the_admin_api_lists_given_up_relays() {
    let sim = Sim::start(&[]);
    let dlr_port = free_port();
    let yaml = format!(
        "{STORE_YAML}\
         dlr: {{ enabled: true, listen: 127.0.0.1:{dlr_port} }}\n\
         outbox: {{ retry_initial_ms: 20, retry_max_ms: 50, give_up_after_s: 1 }}\n"
    );
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: yaml,
            ..Default::default()
        },
    );
    wait_until(
        || std::net::TcpStream::connect(("127.0.0.1", dlr_port)).is_ok(),
        "the dlr listener",
    );
    let rx = Receiver::start(500);
    send(&tg, "+36301111111", "hi", Some(&rx.template()));
    wait_until(
        || {
            tg.admin_get("/admin/outbox?state=gave_up")["items"]
                .as_array()
                .unwrap()
                .len()
                == 1
        },
        "the relay given up",
    );
    let listed = tg.admin_get("/admin/outbox?state=gave_up");
    assert_eq!(listed["items"][0]["last_error"], "answered HTTP 500");
    wait_until(
        || tg.metric("tollgate_outbox_given_up{kind=\"dlr_relay\"}") == Some(1.0),
        "the given-up gauge",
    );
    verify_clean(&tg);
}

#[test]
fn on_postgres_the_outbox_and_refunds_survive_kill_9() {
    let db = common::pg::TestDb::create("dlr");
    let s = start_on(&common::pg::store_yaml(&db.url(), ""), "");
    let mut tg = s.tg;
    let rx = Receiver::start(503);
    sim_post(&s.sim, "/sim/dlr?prefix=3630&outcome=failed");
    sim_post(&s.sim, "/sim/dlr/hold?on=1");
    let before = balance(&tg);
    send(&tg, "+36301111111,+36201111111", "hi", Some(&rx.template()));
    assert_eq!(balance(&tg), before - 3.0);
    sim_post(&s.sim, "/sim/dlr/hold?on=0");
    wait_until(|| refunds(&tg) == 1.0, "the refund");
    wait_acknowledged(&s.sim, 2);
    tg.stop_with("KILL");
    rx.status.store(200, Ordering::SeqCst);
    tg.spawn();
    wait_until(
        || rx.seen().len() == 2,
        "both reports relayed after the restart",
    );
    assert_eq!(balance(&tg), before - 2.0);
    let refunds_stored = common::pg::stored_entries(&db.url())
        .iter()
        .filter(|e| e.kind == tollgate::ledger::EntryKind::Refund)
        .count();
    assert_eq!(refunds_stored, 1);
    verify_clean(&tg);
}
