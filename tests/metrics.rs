//! `/metrics`, `/readyz`, the admin API and the access log, over real TCP:
//! the real `tollgate` binary in front of the real `ozeki-sim`.
//!
//! The workload test checks the credit counters to the milli-credit: every
//! amount below is a sum of tariff prices the test can compute by hand, and
//! the same numbers are cross-checked against the ledger as the admin API
//! shows it.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::*;

type Labels = BTreeMap<String, String>;

/// One scrape, parsed: `name` → [(labels, value)].
struct Scrape {
    text: String,
    series: HashMap<String, Vec<(Labels, f64)>>,
}

impl Scrape {
    fn take(tg: &Tollgate) -> Scrape {
        let r = client().get(tg.admin_url("/metrics")).send().unwrap();
        assert_eq!(r.status(), 200);
        let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        let text = r.text().unwrap();
        let mut series: HashMap<String, Vec<_>> = HashMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (key, value) = line.rsplit_once(' ').expect("name value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("value in {line:?}"));
            let (name, labels) = match key.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (key, BTreeMap::new()),
            };
            series
                .entry(name.to_string())
                .or_default()
                .push((labels, value));
        }
        Scrape { text, series }
    }

    /// The value of the one series of `name` whose labels include `labels`
    /// (and, with `exact`, no others); panics if there are several.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .series
            .get(name)?
            .iter()
            .filter(|(l, _)| {
                labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| *v)
            .collect();
        assert!(
            matching.len() <= 1,
            "{name} {labels:?} matches {matching:?}"
        );
        matching.first().copied()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no series {name} {labels:?} in\n{}", self.text))
    }

    /// Sum over every series of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series
            .get(name)
            .map(|all| {
                all.iter()
                    .filter(|(l, _)| {
                        labels
                            .iter()
                            .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
                    })
                    .map(|(_, v)| v)
                    .sum()
            })
            .unwrap_or(0.0)
    }

    /// Milli-credits moved by `kind` in `bucket`, both directions.
    fn credits(&self, kind: &str, bucket: &str) -> i64 {
        self.sum(
            "tollgate_credits_milli_total",
            &[("kind", kind), ("bucket", bucket)],
        ) as i64
    }

    fn requests(&self, action: &str, outcome: &str) -> i64 {
        self.sum(
            "tollgate_requests_total",
            &[("action", action), ("outcome", outcome)],
        ) as i64
    }
}

fn parse_labels(text: &str) -> Labels {
    // Label values here never contain `",` (closed sets and account names).
    let mut out = BTreeMap::new();
    for pair in text.split("\",").filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
        out.insert(k.to_string(), v.trim_end_matches('"').to_string());
    }
    out
}

fn send(tg: &Tollgate, user: &str, password: &str, recipients: &str) -> (u16, String) {
    get(&tg.url(&format!(
        "/api?action=sendmessage&username={user}&password={password}&recipient={recipients}&messagetype=SMS:TEXT&messagedata=hi"
    )))
}

fn admin_post(tg: &Tollgate, path: &str) -> (u16, serde_json::Value) {
    let r = client()
        .post(tg.admin_url(path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    (r.status().as_u16(), r.json().unwrap())
}

fn milli(credits: &serde_json::Value) -> i64 {
    tollgate::money::parse_credits(credits.as_str().expect("decimal text")).unwrap()
}

#[test]
fn credit_counters_match_the_ledger_after_a_scripted_workload() {
    // 3699… numbers are rejected per recipient by the gateway.
    let sim = Sim::start(&["--reject-prefix", "3699"]);
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            // A 2 s TTL lets the sweep expire a reservation whose answer
            // is slower than that, and leaves ordinary sends room on a
            // busy machine.
            extra_yaml: "settle: { reservation_ttl_s: 2 }\n\
                         store: { path: tollgate.db }\n\
                         metrics: { balance_accounts: [john, poor, ghost] }\n"
                .into(),
            ..Default::default()
        },
    );
    // Tariff: 36 → 1, 3620 → 2, 44 → 3 credits per part; "hi" is one part.

    // Accepted + rejected per recipient: reserve 1 + 2 + 1, post 3, void 1.
    let (status, body) = send(
        &tg,
        "john",
        "secret1",
        "%2B36301234567,%2B36201234567,%2B36991234567",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(xml_all(&body, "statuscode")[..2], ["0", "0"], "{body}");
    assert_ne!(xml_all(&body, "statuscode")[2], "0", "{body}");
    // Insufficient credit and wrong credentials: answered locally, no entry.
    let (_, body) = send(&tg, "poor", "poor1", "%2B36301234567");
    assert!(body.contains("nsufficient"), "{body}");
    let (_, body) = send(&tg, "john", "Wr0ngPw", "%2B36301234567");
    assert_eq!(
        xml_field(&body, "statuscode").as_deref(),
        Some("1003"),
        "{body}"
    );
    // Credit actions: add 10 to john, set poor to 5, read john.
    let (_, body) =
        get(&tg
            .url("/api?action=addcredits&username=admin&password=abc123&useraccount=john&add=10"));
    assert_eq!(
        xml_field(&body, "balance").as_deref(),
        Some("751"),
        "{body}"
    );
    let (_, body) = get(&tg.url(
        "/api?action=setcredits&username=admin&password=abc123&useraccount=poor&newbalance=5",
    ));
    assert_eq!(xml_field(&body, "balance").as_deref(), Some("5"), "{body}");
    let (_, body) = get(&tg.url("/api?action=getcredits&username=john&password=secret1"));
    assert_eq!(
        xml_field(&body, "balance").as_deref(),
        Some("751"),
        "{body}"
    );
    // A 5xx: reserve 3, void 3.
    sim.fault("http500", 1);
    assert_eq!(send(&tg, "john", "secret1", "%2B442012345678").0, 500);
    // Two resets after the write: reserve 1 and 2, both in doubt; an
    // operator posts the second.
    sim.fault("reset", 1);
    assert_eq!(send(&tg, "john", "secret1", "%2B36301111111").0, 504);
    sim.fault("reset", 1);
    assert_eq!(send(&tg, "john", "secret1", "%2B36202222222").0, 504);
    let in_doubt = tg.admin_get("/admin/reservations?state=in_doubt");
    let list = in_doubt["reservations"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{in_doubt}");
    let (kept, resolved) = (&list[0], &list[1]);
    assert_eq!(milli(&kept["total"]), 1000);
    assert_eq!(milli(&resolved["total"]), 2000);
    let id = resolved["id"].as_u64().unwrap();
    let (status, answer) = admin_post(&tg, &format!("/admin/reservations/{id}/post"));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(milli(&answer["posted"]), 2000);
    // A reservation resolves at most once.
    let (status, _) = admin_post(&tg, &format!("/admin/reservations/{id}/void"));
    assert_eq!(status, 409);
    // An answer slower than the TTL: reserve 1, expired by the sweep; the
    // late answer finds nothing left to settle.
    let r = client()
        .post(sim.url("/sim/fault?mode=delay&ms=6000&count=1"))
        .send()
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(send(&tg, "john", "secret1", "%2B36303333333").0, 200);
    // Forwarded untouched: an action tollgate does not own, another path.
    assert_eq!(
        get(&tg.url("/api?action=receivemessage&username=john&password=secret1")).0,
        200
    );
    get(&tg.url("/elsewhere?password=topsecret"));

    let m = Scrape::take(&tg);

    // ---- Credit counters, exact. --------------------------------------
    let reserved = m.credits("reserve", "anytime");
    let posted = m.credits("post", "anytime");
    let voided = m.credits("void", "anytime");
    let expired = m.credits("expire", "anytime");
    assert_eq!(reserved, 4000 + 3000 + 1000 + 2000 + 1000);
    assert_eq!(
        posted,
        3000 + 2000,
        "accepted recipients + the operator's post"
    );
    assert_eq!(voided, 1000 + 3000, "the rejected recipient + the 5xx");
    assert_eq!(expired, 1000);
    // Seeds (admin 1000, john 744) and the admin's add of 10; the set of poor.
    assert_eq!(m.credits("add", "anytime"), 1_000_000 + 744_000 + 10_000);
    assert_eq!(m.credits("set", "anytime"), 5_000);
    assert_eq!(m.credits("transfer", "anytime"), 0);
    for kind in [
        "reserve", "post", "void", "expire", "add", "set", "transfer",
    ] {
        assert_eq!(m.credits(kind, "offpeak"), 0, "{kind} offpeak");
    }
    // Every reserved milli-credit is posted, voided, expired or still held.
    let held_in_doubt =
        m.value("tollgate_reservations_held_milli", &[("state", "in_doubt")]) as i64;
    assert_eq!(held_in_doubt, 1000);
    assert_eq!(
        m.value("tollgate_reservations_held_milli", &[("state", "open")]),
        0.0
    );
    assert_eq!(reserved, posted + voided + expired + held_in_doubt);
    assert_eq!(m.value("tollgate_reservations_in_doubt", &[]), 1.0);
    assert_eq!(m.value("tollgate_reservations_open", &[]), 0.0);
    assert_eq!(m.value("tollgate_accounts", &[]), 3.0);

    // ---- The same numbers from the ledger. -----------------------------
    let mut ledger_posted = 0;
    let mut ledger_reserved = 0;
    for name in ["admin", "john", "poor"] {
        let v = tg.admin_get(&format!("/admin/accounts/{name}"));
        for bucket in ["anytime", "offpeak"] {
            ledger_posted += milli(&v[bucket]["posted"]);
            ledger_reserved += milli(&v[bucket]["reserved"]);
        }
    }
    let credited = m.credits("add", "anytime") + m.credits("set", "anytime");
    assert_eq!(
        ledger_posted,
        credited - posted,
        "posted balances = credits in − sends posted"
    );
    assert_eq!(ledger_reserved, reserved - posted - voided - expired);
    let john = tg.admin_get("/admin/accounts/john");
    assert_eq!(
        milli(&john["anytime"]["posted"]),
        744_000 + 10_000 - 3_000 - 2_000
    );
    assert_eq!(milli(&john["anytime"]["reserved"]), 1_000);

    // ---- Per-account balances: only the listed accounts that exist. -----
    let balance = |account: &str, bucket: &str| {
        m.get(
            "tollgate_account_available_milli",
            &[("account", account), ("bucket", bucket)],
        )
    };
    assert_eq!(balance("john", "anytime"), Some(748_000.0));
    assert_eq!(balance("john", "offpeak"), Some(0.0));
    assert_eq!(balance("poor", "anytime"), Some(5_000.0));
    assert_eq!(
        m.get(
            "tollgate_account_reserved_milli",
            &[("account", "john"), ("bucket", "anytime")]
        ),
        Some(1_000.0)
    );
    assert_eq!(balance("admin", "anytime"), None, "admin is not listed");
    assert_eq!(balance("ghost", "anytime"), None, "ghost does not exist");
    assert!(!m.text.contains("account=\"admin\""));

    // ---- Requests by outcome. ------------------------------------------
    assert_eq!(m.requests("sendmessage", "settled"), 1);
    assert_eq!(m.requests("sendmessage", "insufficient_credit"), 1);
    assert_eq!(m.requests("sendmessage", "auth_failed"), 1);
    assert_eq!(m.requests("sendmessage", "voided"), 1);
    assert_eq!(m.requests("sendmessage", "in_doubt"), 2);
    // Both lost answers say why: the simulator's "reset" fault drops the
    // connection without an answer (a close, not an RST).
    assert_eq!(
        m.value(
            "tollgate_upstream_answers_lost_total",
            &[("reason", "closed")]
        ),
        2.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.value(
            "tollgate_upstream_answers_lost_total",
            &[("reason", "timeout")]
        ),
        0.0
    );
    assert_eq!(m.requests("sendmessage", "already_resolved"), 1);
    assert_eq!(m.requests("addcredits", "ok"), 1);
    assert_eq!(m.requests("setcredits", "ok"), 1);
    assert_eq!(m.requests("getcredits", "ok"), 1);
    assert_eq!(m.requests("receivemessage", "forwarded"), 1);
    assert_eq!(
        m.value(
            "tollgate_requests_total",
            &[
                ("front_door", "passthrough"),
                ("action", "-"),
                ("outcome", "forwarded")
            ]
        ),
        1.0
    );
    assert_eq!(m.sum("tollgate_requests_total", &[]), 12.0);
    // Latency histograms: every request, and every answer the gateway gave
    // (the settled send, the 5xx, the slow one; the resets gave none).
    assert_eq!(m.sum("tollgate_request_latency_seconds_count", &[]), 12.0);
    assert_eq!(
        m.value(
            "tollgate_upstream_latency_seconds_count",
            &[("action", "sendmessage")]
        ),
        3.0
    );
    assert_eq!(
        m.value(
            "tollgate_upstream_latency_seconds_count",
            &[("action", "receivemessage")]
        ),
        1.0
    );
    assert!(
        m.value(
            "tollgate_upstream_latency_seconds_sum",
            &[("action", "sendmessage")]
        ) >= 6.0,
        "the slow answer took 6 s"
    );
    // Families registered for later users are there, at 0.
    assert_eq!(
        m.value(
            "tollgate_rate_limit_decisions_total",
            &[("rule", "account_parts"), ("result", "limited")]
        ),
        0.0
    );
    assert_eq!(
        m.value("tollgate_tariff_reloads_total", &[("result", "ok")]),
        0.0
    );
    assert_eq!(m.series["tollgate_tariff_info"].len(), 1);
    assert_eq!(m.value("tollgate_upstream_up", &[]), 1.0);
    // Help text on every family.
    for family in m.series.keys() {
        let base = family
            .trim_end_matches("_bucket")
            .trim_end_matches("_count")
            .trim_end_matches("_sum");
        assert!(
            m.text.contains(&format!("# HELP {base} ")),
            "{family} has no help text"
        );
        // The standard process families are the only unprefixed ones.
        let process = tollgate::metrics::PROCESS_FAMILIES.contains(&base);
        assert!(family.starts_with("tollgate_") || process, "{family}");
    }

    // ---- The access log: one line per request, secrets redacted. --------
    let log = wait_for_log_lines(&tg, 12);
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("tollgate::access"))
        .collect();
    for secret in [
        "secret1",
        "abc123",
        "poor1",
        "topsecret",
        "Wr0ngPw",
        ADMIN_TOKEN,
    ] {
        assert!(
            !log.contains(secret),
            "{secret:?} leaked into the log:\n{log}"
        );
    }
    let first = access
        .iter()
        .find(|l| l.contains("outcome=\"settled\"") || l.contains("outcome=settled"))
        .unwrap_or_else(|| panic!("no settled send in\n{log}"));
    for field in [
        "front_door=",
        "action=",
        "account=",
        "cost_milli=4000",
        "reservation_id=",
        "upstream_status=200",
        "upstream_latency_us=",
        "latency_us=",
        "password=***",
    ] {
        assert!(first.contains(field), "{field} missing from {first}");
    }
    assert!(
        access.iter().any(|l| l.contains("/elsewhere?password=***")),
        "{log}"
    );
}

#[test]
fn process_idempotency_and_commit_latency_families() {
    let sim = Sim::start(&[]);
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: "store: { path: tollgate.db, ack_timeout_ms: 7000 }\n\
                         idempotency: { max_keys: 5 }\n"
                .into(),
            ..Default::default()
        },
    );
    // Two keyed sends (two keys held) and one retry of the first (no new
    // key).
    for key in ["k-1", "k-2", "k-1"] {
        let r = client()
            .get(tg.url(
                "/api?action=sendmessage&username=john&password=secret1&recipient=%2B36301234567&messagedata=hi",
            ))
            .header("Idempotency-Key", key)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{key}");
    }
    // The sweeper refreshes the key gauges once a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = Scrape::take(&tg);
        if m.get("tollgate_idempotency_keys", &[]) == Some(2.0) || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(m.value("tollgate_idempotency_keys", &[]), 2.0, "{}", m.text);
    assert_eq!(m.value("tollgate_idempotency_max_keys", &[]), 5.0);

    // The process families describe the tollgate process, not this test.
    let started = m.value("process_start_time_seconds", &[]);
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started > now_s - 120.0 && started <= now_s + 1.0,
        "started {started}, now {now_s}"
    );
    assert!(m.value("process_resident_memory_bytes", &[]) > 1_000_000.0);
    // Open descriptors are tollgate's: about what its /proc entry lists
    // (connections come and go between the two reads).
    let fds = m.value("process_open_fds", &[]);
    let listed = std::fs::read_dir(format!("/proc/{}/fd", tg.pid()))
        .unwrap()
        .count() as f64;
    assert!(fds >= 5.0, "listeners, store files, log: {fds}");
    assert!(
        (fds - listed).abs() <= 4.0,
        "{fds} reported, {listed} listed"
    );
    assert!(m.value("process_max_fds", &[]) >= fds);
    assert!(m.value("process_cpu_seconds_total", &[]) >= 0.0);

    // Commit latency: the configured 7 s ack timeout is a bucket, and the
    // top finite bucket reaches it.
    let les: Vec<f64> = m.series["tollgate_store_commit_seconds_bucket"]
        .iter()
        .map(|(l, _)| l["le"].as_str())
        .filter(|le| *le != "+Inf")
        .map(|le| le.parse().unwrap())
        .collect();
    assert!(les.contains(&7.0), "{les:?}");
    assert!(les.iter().cloned().fold(0.0, f64::max) >= 7.0, "{les:?}");
    // Commits happened, and each of them beat the timeout.
    let committed = m.value("tollgate_store_commit_seconds_count", &[]);
    assert!(committed >= 1.0);
    assert_eq!(
        m.value("tollgate_store_commit_seconds_bucket", &[("le", "7")]),
        committed
    );
}

/// The log file is written by another process: wait until `n` access lines
/// of the proxy are in it (the admin API's own access lines aside).
fn wait_for_log_lines(tg: &Tollgate, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = tg.log();
        let count = log
            .lines()
            .filter(|l| l.contains("tollgate::access") && !l.contains("front_door=\"admin\""))
            .count();
        if count >= n || Instant::now() > deadline {
            assert_eq!(count, n, "access lines:\n{log}");
            return log;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn readyz_follows_the_upstream_and_healthz_the_process() {
    // A stand-in upstream: a bare listener is enough for a TCP probe.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = listener.local_addr().unwrap();
    let tg = Tollgate::start(upstream, TollgateOptions::default());
    assert_eq!(get(&tg.admin_url("/healthz")), (200, "ok\n".to_string()));
    assert_eq!(get(&tg.admin_url("/readyz")), (200, "ready\n".to_string()));

    drop(listener);
    // The probe result is cached for about a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (status, body) = loop {
        let (status, body) = get(&tg.admin_url("/readyz"));
        if status != 200 || Instant::now() > deadline {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&upstream.to_string()) && body.contains("unreachable"),
        "{body}"
    );
    assert_eq!(
        get(&tg.admin_url("/healthz")).0,
        200,
        "alive while not ready"
    );
    let m = Scrape::take(&tg);
    assert_eq!(m.value("tollgate_upstream_up", &[]), 0.0);

    // pingora's own error log for a failed proxy attempt names the request:
    // its password is redacted there too.
    let (status, _) = get(&tg.url("/elsewhere?action=x&password=n0tInLogs"));
    assert_eq!(status, 502);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tg.log().contains("/elsewhere") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = tg.log();
    assert!(log.contains("/elsewhere?action=x&password=***"), "{log}");
    assert!(!log.contains("n0tInLogs"), "{log}");
}

#[test]
fn admin_api_guards_its_token_and_reloads_tariffs() {
    let sim = Sim::start(&[]);
    let tg = Tollgate::start(sim.addr, TollgateOptions::default());

    // The bearer token: missing or wrong → 401, never echoed.
    for token in [None, Some("wrong-token-0123456789")] {
        let mut req = client().get(tg.admin_url("/admin/accounts/john"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().unwrap();
        assert_eq!(r.status(), 401);
        assert!(!r.text().unwrap().contains("wrong-token"));
    }
    let r = client().post(tg.admin_url("/admin/reload")).send().unwrap();
    assert_eq!(r.status(), 401, "reload needs the token too");

    // Account view, unknown account, wrong method, unknown reservation.
    let john = tg.admin_get("/admin/accounts/john");
    assert_eq!(john["anytime"]["available"], "744");
    assert_eq!(john["role"], "user");
    let r = client()
        .get(tg.admin_url("/admin/accounts/nobody"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client()
        .get(tg.admin_url("/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(admin_post(&tg, "/admin/reservations/999/post").0, 404);
    assert_eq!(admin_post(&tg, "/admin/reservations/abc/post").0, 400);
    let r = client()
        .get(tg.admin_url("/admin/reservations?state=bogus"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);

    // An open reservation belongs to its request in flight: an operator
    // cannot resolve it.
    let r = client()
        .post(sim.url("/sim/fault?mode=delay&ms=1500&count=1"))
        .send()
        .unwrap();
    assert!(r.status().is_success());
    let in_flight = {
        let url = tg.url("/api?action=sendmessage&username=john&password=secret1&recipient=%2B36301234567&messagedata=hi");
        std::thread::spawn(move || get(&url).0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let open = loop {
        let list = tg.admin_get("/admin/reservations?state=open")["reservations"].clone();
        if !list.as_array().unwrap().is_empty() || Instant::now() > deadline {
            break list;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let id = open[0]["id"].as_u64().expect("an open reservation");
    let (status, answer) = admin_post(&tg, &format!("/admin/reservations/{id}/void"));
    assert_eq!(status, 409, "{answer}");
    assert_eq!(in_flight.join().unwrap(), 200);
    assert_eq!(
        tg.balance("john", "secret1"),
        "743",
        "settled by its request"
    );

    // Quote with the tariff in force: +44 costs 3 per part.
    let q = tg.admin_get("/admin/quote?recipient=%2B447700900123&text=hello");
    assert_eq!(q["total"], "3", "{q}");
    assert_eq!(q["parts"], 1);
    let v1 = q["tariff_version"].as_str().unwrap().to_string();
    let before = Scrape::take(&tg);
    assert_eq!(
        before.value("tollgate_tariff_info", &[("version", &v1)]),
        1.0
    );

    // Reload a changed tariff: new version, new price, one info series.
    let path = tg.dir.path().join("tariffs.yaml");
    std::fs::write(&path, TARIFFS.replace("\"44\": 3", "\"44\": 5")).unwrap();
    let (status, answer) = admin_post(&tg, "/admin/reload");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["changed"], true);
    let v2 = answer["tariff_version"].as_str().unwrap().to_string();
    assert_ne!(v1, v2);
    let q = tg.admin_get("/admin/quote?recipient=%2B447700900123&text=hello");
    assert_eq!(
        (q["total"].as_str(), q["tariff_version"].as_str()),
        (Some("5"), Some(v2.as_str()))
    );
    // Sends are priced with it.
    let (_, body) = send(&tg, "john", "secret1", "%2B447700900123");
    assert_eq!(
        xml_field(&body, "statuscode").as_deref(),
        Some("0"),
        "{body}"
    );
    assert_eq!(tg.balance("john", "secret1"), "738");

    // An invalid file is rejected and the previous tariff stays.
    std::fs::write(&path, "prices: [this is not a tariff").unwrap();
    let (status, answer) = admin_post(&tg, "/admin/reload");
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("tariffs.yaml"),
        "{answer}"
    );
    assert_eq!(answer["tariff_version"], v2.as_str());
    assert_eq!(
        tg.admin_get("/admin/quote?recipient=%2B447700900123&text=hello")["total"],
        "5"
    );

    let m = Scrape::take(&tg);
    assert_eq!(
        m.value("tollgate_tariff_reloads_total", &[("result", "ok")]),
        1.0
    );
    assert_eq!(
        m.value("tollgate_tariff_reloads_total", &[("result", "error")]),
        1.0
    );
    assert_eq!(
        m.series["tollgate_tariff_info"].len(),
        1,
        "only the version in force"
    );
    assert_eq!(m.value("tollgate_tariff_info", &[("version", &v2)]), 1.0);
    assert!(m.value("tollgate_tariff_loaded_timestamp_seconds", &[]) > 1.6e9);
}
