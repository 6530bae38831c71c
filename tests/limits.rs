//! Rate limits and protection (SPEC 7) over real TCP: the real `tollgate`
//! in front of the real `ozeki-sim`. Refused requests get HTTP 429 with
//! `Retry-After` and an Ozeki-shaped body, never reach the gateway and
//! never touch a balance; shadow rules count and let through; limiter state
//! survives a reload; a flood of bad passwords is locked out and, in
//! drop-in mode, reaches the gateway a bounded number of times.

mod common;

use std::net::IpAddr;

use common::*;

struct Reply {
    status: u16,
    retry_after: Option<u64>,
    body: String,
}

fn get_from(url: &str, local: Option<&str>) -> Reply {
    let mut b = reqwest::blocking::Client::builder().timeout(std::time::Duration::from_secs(20));
    if let Some(ip) = local {
        b = b.local_address(ip.parse::<IpAddr>().unwrap());
    }
    let r = b.build().unwrap().get(url).send().unwrap();
    Reply {
        status: r.status().as_u16(),
        retry_after: r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()),
        body: r.text().unwrap(),
    }
}

fn send_url(tg: &Tollgate, user: &str, pw: &str, recipients: &str) -> String {
    tg.url(&format!(
        "/api?action=sendmessage&username={user}&password={pw}&recipient={recipients}&messagetype=SMS:TEXT&messagedata=hi"
    ))
}

fn decisions(tg: &Tollgate, rule: &str, result: &str) -> u64 {
    let series =
        format!("tollgate_rate_limit_decisions_total{{result=\"{result}\",rule=\"{rule}\"}}");
    tg.metric_value(&series) as u64
}

#[test]
fn over_the_account_rate_sends_get_429_and_never_reach_the_gateway() {
    // john: 2 parts of burst, then one part every 10 s.
    let (sim, tg) = start_pair(
        &[],
        "limits: { account_parts: { parts_per_s: 0.1, burst: 2, overrides: { admin: { parts_per_s: 100, burst: 100 } } } }",
    );
    for _ in 0..2 {
        let r = get_from(&send_url(&tg, "john", "secret1", "%2B36301111111"), None);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(xml_field(&r.body, "statuscode").as_deref(), Some("0"));
    }
    let r = get_from(
        &send_url(&tg, "john", "secret1", "%2B36301111111,%2B36302222222"),
        None,
    );
    assert_eq!(r.status, 429, "{}", r.body);
    let retry = r.retry_after.expect("Retry-After");
    assert!((1..=30).contains(&retry), "Retry-After {retry}");
    // Ozeki-shaped: one refusing report per recipient, code rate_limited.
    assert!(r.body.starts_with("<?xml"), "{}", r.body);
    assert_eq!(
        xml_all(&r.body, "statuscode"),
        vec!["1002", "1002"],
        "{}",
        r.body
    );
    assert_eq!(
        xml_all(&r.body, "recipient"),
        vec!["+36301111111", "+36302222222"]
    );
    // The gateway saw the two allowed sends only; john paid for two parts.
    assert_eq!(sim.sendmessage_count(), 2);
    assert_eq!(tg.balance("john", "secret1"), "742");
    // Another account has its own (overridden) budget.
    let r = get_from(&send_url(&tg, "admin", "abc123", "%2B36301111111"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(decisions(&tg, "account_parts", "limited"), 1);
    assert_eq!(decisions(&tg, "account_parts", "allowed"), 3);
    // No reservation was left behind.
    let open = tg.admin_get("/admin/reservations");
    assert_eq!(
        open["reservations"].as_array().map(Vec::len),
        Some(0),
        "{open}"
    );
}

#[test]
fn source_ip_rate_answers_ozeki_actions_in_ozeki_shape_and_others_in_text() {
    let (sim, tg) = start_pair(
        &[],
        "limits: { source_ip: { requests_per_s: 0.1, burst: 3 } }",
    );
    let getcredits = tg.url("/api?action=getcredits&username=john&password=secret1");
    for _ in 0..3 {
        assert_eq!(get_from(&getcredits, None).status, 200);
    }
    let r = get_from(&getcredits, None);
    assert_eq!(r.status, 429);
    assert!(r.retry_after.unwrap() >= 1);
    assert_eq!(xml_field(&r.body, "action").as_deref(), Some("getcredits"));
    assert_eq!(
        xml_field(&r.body, "errorcode").as_deref(),
        Some("1002"),
        "{}",
        r.body
    );
    // A forwarded action and another path: refused, never forwarded.
    let before = sim.requests().len();
    let r = get_from(
        &tg.url("/api?action=receivemessage&username=john&password=secret1"),
        None,
    );
    assert_eq!(r.status, 429);
    assert_eq!(xml_field(&r.body, "errorcode").as_deref(), Some("1002"));
    let r = get_from(&tg.url("/other/path"), None);
    assert_eq!((r.status, r.body.as_str()), (429, "Too many requests\n"));
    assert_eq!(
        sim.requests().len(),
        before,
        "the gateway saw a refused request"
    );
    // Another source address (127.0.0.2 is loopback too) has its own budget.
    assert_eq!(get_from(&getcredits, Some("127.0.0.2")).status, 200);
    assert_eq!(decisions(&tg, "source_ip", "limited"), 3);
}

#[test]
fn upstream_cap_refuses_before_anything_is_reserved() {
    let (sim, tg) = start_pair(
        &[],
        "limits: { upstream_parts: { parts_per_s: 0.1, burst: 3 } }",
    );
    let r = get_from(
        &send_url(&tg, "john", "secret1", "%2B36301111111,%2B36302222222"),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Two more parts exceed the cap (one left).
    let r = get_from(
        &send_url(&tg, "admin", "abc123", "%2B36301111111,%2B36302222222"),
        None,
    );
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(xml_all(&r.body, "statuscode"), vec!["1002", "1002"]);
    assert_eq!(sim.sendmessage_count(), 1);
    assert_eq!(tg.balance("admin", "abc123"), "1000");
    assert_eq!(tg.balance("john", "secret1"), "742");
    // The one part left still goes.
    let r = get_from(&send_url(&tg, "admin", "abc123", "%2B36301111111"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(decisions(&tg, "upstream_parts", "limited"), 1);
}

#[test]
fn a_shadow_rule_passes_traffic_and_counts() {
    let (sim, tg) = start_pair(
        &[],
        "limits: { account_parts: { parts_per_s: 0.1, burst: 1, mode: shadow } }",
    );
    for _ in 0..4 {
        let r = get_from(&send_url(&tg, "john", "secret1", "%2B36301111111"), None);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(xml_field(&r.body, "statuscode").as_deref(), Some("0"));
    }
    assert_eq!(sim.sendmessage_count(), 4);
    assert_eq!(tg.balance("john", "secret1"), "740");
    assert_eq!(decisions(&tg, "account_parts", "shadow_limited"), 3);
    assert_eq!(decisions(&tg, "account_parts", "limited"), 0);
    assert_eq!(decisions(&tg, "account_parts", "allowed"), 1);
}

#[test]
fn limiter_state_survives_a_reload_and_new_rates_apply() {
    let yaml = |burst: u32| {
        format!("limits: {{ account_parts: {{ parts_per_s: 0.01, burst: {burst} }} }}\n")
    };
    let (_sim, tg) = start_pair(&[], &yaml(2));
    let send = || get_from(&send_url(&tg, "john", "secret1", "%2B36301111111"), None).status;
    assert_eq!((send(), send(), send()), (200, 200, 429));
    // Raise the burst to 3 in tollgate.yaml and reload: one more part fits
    // (the two used are still counted), not three.
    let path = tg.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace(&yaml(2), &yaml(3))).unwrap();
    let r = client()
        .post(tg.admin_url("/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().unwrap());
    assert_eq!((send(), send()), (200, 429));
    // An invalid limits section is rejected; the limits in force stay.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("burst: 3", "burst: 0")).unwrap();
    let r = client()
        .post(tg.admin_url("/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    assert!(!r.status().is_success());
    assert!(r.text().unwrap().contains("limits.account_parts.burst"));
    assert_eq!(send(), 429);
}

#[test]
fn concurrent_requests_per_ip_are_capped() {
    // The gateway takes 600 ms per request: 4 sends at once from one IP
    // with a cap of 2 in progress.
    let (sim, tg) = start_pair(
        &["--latency-ms", "600"],
        "limits: { concurrent_per_ip: { max: 2 } }",
    );
    let url = send_url(&tg, "john", "secret1", "%2B36301111111");
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || get_from(&url, None).status)
        })
        .collect();
    let mut statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 429, 429]);
    assert_eq!(sim.sendmessage_count(), 2);
    // Once they finished, places are free again.
    assert_eq!(get_from(&url, None).status, 200);
}

#[test]
fn bad_password_flood_is_locked_out_and_the_gateway_sees_a_bounded_number_of_checks() {
    // carol exists only on the gateway: every guess would be a gateway
    // call in drop-in mode.
    let (sim, tg) = start_pair(
        &["--user", "carol:RightPw-42:50"],
        "auth: { verify_upstream: true, adopt_balance: true }\n\
         limits: { auth_lockout: { failures: 5, window_s: 60, lock_s: 300 } }",
    );
    let mut statuses = Vec::new();
    for i in 0..40 {
        let r = get_from(
            &tg.url(&format!(
                "/api?action=getcredits&username=carol&password=guess{i}"
            )),
            None,
        );
        statuses.push((
            r.status,
            xml_field(&r.body, "errorcode").unwrap_or_default(),
        ));
        if r.status == 429 {
            assert!(r.retry_after.unwrap() > 200, "lock_s is 300");
        }
    }
    let failed = statuses.iter().filter(|s| s.1 == "1003").count();
    let locked = statuses
        .iter()
        .filter(|s| (s.0, s.1.as_str()) == (429, "1002"))
        .count();
    assert_eq!((failed, locked), (5, 35), "{statuses:?}");
    // Even the right password is refused while locked.
    let r = get_from(
        &tg.url("/api?action=getcredits&username=carol&password=RightPw-42"),
        None,
    );
    assert_eq!(r.status, 429);
    let checks = sim
        .requests()
        .iter()
        .filter(|r| r["action"].as_str() == Some("getcredits"))
        .count();
    assert_eq!(checks, 5, "one gateway check per failure before the lock");
    // Another client address is not locked; a sends from it works.
    let r = get_from(
        &tg.url("/api?action=getcredits&username=carol&password=RightPw-42"),
        Some("127.0.0.2"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(xml_field(&r.body, "balance").as_deref(), Some("50"));
    assert!(decisions(&tg, "auth_lockout", "limited") >= 36);
}

#[test]
fn oversized_headers_are_refused() {
    let (sim, tg) = start_pair(&[], "downstream: { header_limit_bytes: 2048 }");
    let r = client()
        .get(tg.url("/api?action=getcredits&username=john&password=secret1"))
        .header("X-Padding", "a".repeat(4096))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 431);
    assert!(sim.requests().is_empty());
    let ok = get_from(
        &tg.url("/api?action=getcredits&username=john&password=secret1"),
        None,
    );
    assert_eq!(ok.status, 200);
}

/// Opens a connection and sends a form POST's header; the body follows.
fn slow_post(tg: &Tollgate, body: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(tg.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "POST /api HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s
}

const SLOW_BODY: &str =
    "action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagedata=hi";

#[test]
fn a_client_stalling_its_body_gets_408() {
    use std::io::{Read, Write};
    let (sim, tg) = start_pair(
        &[],
        "downstream: { read_timeout_ms: 300, body_timeout_ms: 10000 }",
    );
    let mut s = slow_post(&tg, SLOW_BODY);
    s.write_all(&SLOW_BODY.as_bytes()[..10]).unwrap();
    // Then silence: the next read times out.
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert_eq!(sim.sendmessage_count(), 0);
    assert_eq!(tg.balance("john", "secret1"), "744");
    assert!(tg.log().contains("outcome=\"body_timeout\""));
}

#[test]
fn a_client_trickling_its_body_is_cut_off() {
    use std::io::{Read, Write};
    let (sim, tg) = start_pair(
        &[],
        "downstream: { read_timeout_ms: 1000, body_timeout_ms: 500 }",
    );
    let mut s = slow_post(&tg, SLOW_BODY);
    // A byte every 100 ms: every read is within the read timeout, the
    // whole body is not within the body timeout. tollgate answers 408 and
    // closes (the client may see the answer or, writing on, a reset).
    let started = std::time::Instant::now();
    for b in SLOW_BODY.bytes() {
        if s.write_all(&[b]).is_err() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        if started.elapsed() > std::time::Duration::from_secs(3) {
            break;
        }
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
    assert_eq!(sim.sendmessage_count(), 0);
    assert_eq!(tg.balance("john", "secret1"), "744");
    assert!(
        tg.log().contains("outcome=\"body_timeout\""),
        "{}",
        tg.log()
    );
}

/// Resident memory of this process, in bytes (Linux).
fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// A flood of one million distinct source IPs (one request each, 100 000
/// a second) against the source-IP limiter: with the default bound of
/// 100 000 keys per rule the table never holds more, and a sweep once the
/// keys are idle empties it and gives the memory back. The same flood with
/// the bound raised to 1 000 000 shows what unbounded growth would cost.
/// Prints the resident-memory numbers (`cargo test --test limits million
/// -- --nocapture`).
#[test]
fn a_million_distinct_source_ips_leave_memory_bounded() {
    use std::sync::Arc;
    use tollgate::limits::config::RateRule;
    use tollgate::limits::{Limiter, LimitsConfig, ManualClock, Rate, RuleMode};
    const S: u64 = 1_000_000_000;
    let run = |max_keys: usize| -> (usize, usize, usize, usize) {
        let clock = Arc::new(ManualClock::new(0));
        let limiter = Limiter::with_clock(
            max_keys,
            Arc::new(tollgate::metrics::Metrics::new()),
            clock.clone(),
        );
        let cfg = LimitsConfig {
            max_keys_per_rule: max_keys,
            source_ip: Some(RateRule {
                rate: Rate::new(10.0, 20),
                mode: RuleMode::Enforce,
            }),
            ..LimitsConfig::default()
        };
        let before = rss_bytes();
        let mut peak_keys = 0;
        for i in 0..1_000_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            assert!(limiter.check_source_ip(&cfg, Some(ip), false).is_ok());
            if i % 100_000 == 99_999 {
                peak_keys = peak_keys.max(limiter.source_ip_table().len());
                clock.advance_ns(S);
            }
        }
        let peak = rss_bytes().saturating_sub(before);
        clock.advance_ns(S);
        limiter.sweep();
        assert_eq!(limiter.source_ip_table().len(), 0);
        let after = rss_bytes().saturating_sub(before);
        (peak_keys, peak, after, limiter.source_ip_table().capacity())
    };
    let (keys, peak, after, capacity) = run(100_000);
    eprintln!(
        "bound 100000: at most {keys} keys, RSS +{} KiB at peak, +{} KiB after the sweep (capacity {capacity})",
        peak / 1024,
        after / 1024
    );
    assert!(keys <= 100_000);
    assert!(peak < 32 << 20, "peak RSS grew {peak} bytes");
    let (keys, peak, after, capacity) = run(1_000_000);
    eprintln!(
        "bound 1000000: at most {keys} keys, RSS +{} KiB at peak, +{} KiB after the sweep (capacity {capacity})",
        peak / 1024,
        after / 1024
    );
    assert!(capacity < 10_000, "the table was shrunk");
    assert!(
        after < 16 << 20,
        "memory given back: {after} bytes still held"
    );
}
