//! No send escapes the ledger (issue 18, SPEC 1.4a): whatever a request's
//! path spelling, content type or parameter placement, if `ozeki-sim` (which
//! models the gateway's leniency) would deliver a message, tollgate charged
//! it or refused it. Real binaries over real TCP.

mod common;

use std::net::SocketAddr;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

/// john starts with plenty: the property test sends hundreds of messages.
fn accounts() -> String {
    format!(
        "accounts:\n\
         - {{ name: admin, role: admin, password_hash: '{}', anytime: 1000 }}\n\
         - {{ name: john, role: user, password_hash: '{}', anytime: 1000000 }}\n",
        password_hash("abc123"),
        password_hash("secret1"),
    )
}

/// Limits high enough that no case of the property test is rate limited.
const OPEN_LIMITS: &str = "limits: {\n\
      source_ip: { requests_per_s: 100000, burst: 100000 },\n\
      concurrent_per_ip: { max: 1000 },\n\
      account_parts: { parts_per_s: 100000, burst: 100000 },\n\
      upstream_parts: { parts_per_s: 100000, burst: 100000 } }\n\
    ozeki: { blocked_paths: [/api/admin-ui] }\n";

fn start() -> (Sim, Tollgate) {
    let sim = Sim::start(&[]);
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: OPEN_LIMITS.to_string(),
            accounts: accounts(),
            ..Default::default()
        },
    );
    (sim, tg)
}

/// john's available any-time balance, in milli-credits.
fn available_milli(tg: &Tollgate) -> i64 {
    let v = tg.admin_get("/admin/accounts/john");
    let text = v["anytime"]["available"].as_str().expect("available");
    tollgate::money::parse_credits(text).unwrap()
}

/// Messages the simulator accepted for delivery so far.
fn delivered(sim: &Sim) -> u64 {
    let v: serde_json::Value = client()
        .get(sim.url("/sim/stats"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    v["messages_accepted"].as_u64().unwrap()
}

/// A request as bytes: method, target, extra header lines, body.
fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: tollgate\r\nConnection: close\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

const SEND: &str =
    "action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagedata=hi";

/// Sends `req` and checks that the message was delivered and charged.
fn assert_charged(sim: &Sim, tg: &Tollgate, what: &str, req: &[u8]) {
    let (sent0, avail0) = (delivered(sim), available_milli(tg));
    let answer = raw_exchange(tg.addr, req);
    let (sent1, avail1) = (delivered(sim), available_milli(tg));
    assert_eq!(sent1 - sent0, 1, "{what}: not delivered: {answer:?}");
    assert_eq!(
        avail0 - avail1,
        1000,
        "{what}: delivered but not charged: {answer:?}"
    );
    assert_eq!(
        answer.header("x-tollgate-cost").as_deref(),
        Some("1"),
        "{what}"
    );
}

#[test]
fn the_reported_holes_are_closed() {
    let (sim, tg) = start();
    // The three requests of the report: a trailing slash on both API paths,
    // and a form body sent as text/plain.
    assert_charged(
        &sim,
        &tg,
        "/api/",
        &request("GET", &format!("/api/?{SEND}"), &[], b""),
    );
    assert_charged(
        &sim,
        &tg,
        "/httpapi/",
        &request("GET", &format!("/httpapi/?{SEND}"), &[], b""),
    );
    assert_charged(
        &sim,
        &tg,
        "text/plain body",
        &request(
            "POST",
            "/api",
            &[("Content-Type", "text/plain")],
            SEND.as_bytes(),
        ),
    );
}

#[test]
fn sends_are_charged_however_they_are_spelled() {
    let (sim, tg) = start();
    let multipart = {
        let mut b = Vec::new();
        for (n, v) in [
            ("action", "sendmessage"),
            ("username", "john"),
            ("password", "secret1"),
            ("recipient", "+36301111111"),
            ("messagedata", "hi"),
        ] {
            b.extend_from_slice(
                format!("--XyZ\r\nContent-Disposition: form-data; name=\"{n}\"\r\n\r\n{v}\r\n")
                    .as_bytes(),
            );
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        b
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("//api", request("GET", &format!("//api?{SEND}"), &[], b"")),
        ("/API", request("GET", &format!("/API?{SEND}"), &[], b"")),
        ("/%61pi", request("GET", &format!("/%61pi?{SEND}"), &[], b"")),
        ("/x/../api", request("GET", &format!("/x/../api?{SEND}"), &[], b"")),
        ("/ozeki/./", request("GET", &format!("/ozeki/./?{SEND}"), &[], b"")),
        ("/api/sub", request("GET", &format!("/api/sub?{SEND}"), &[], b"")),
        ("/api.", request("GET", &format!("/api.?{SEND}"), &[], b"")),
        ("other path", request("GET", &format!("/index.html?{SEND}"), &[], b"")),
        (
            "name with spaces",
            request(
                "GET",
                "/api?+action+=sendmessage&username=john&password=secret1&recipient%20=%2B36301111111",
                &[],
                b"",
            ),
        ),
        (
            "json content type",
            request("POST", "/api", &[("Content-Type", "application/json")], SEND.as_bytes()),
        ),
        (
            "no content type",
            request("POST", "/api/", &[], SEND.as_bytes()),
        ),
        (
            "multipart",
            request(
                "POST",
                "/api",
                &[("Content-Type", "multipart/form-data; boundary=XyZ")],
                &multipart,
            ),
        ),
        (
            "split between query and body",
            request(
                "PUT",
                "/Api?action=SendMessage&username=john",
                &[("Content-Type", "application/xml")],
                b"password=secret1&recipient=%2B36301111111",
            ),
        ),
    ];
    for (what, req) in &cases {
        assert_charged(&sim, &tg, what, req);
    }
}

#[test]
fn lookalikes_and_blocked_paths_are_refused_never_forwarded() {
    let (sim, tg) = start();
    for action in ["send_message", "send%20message", "sendmessage."] {
        let before = sim.requests().len();
        let target =
            format!("/api?action={action}&username=john&password=secret1&recipient=%2B36301111111");
        let answer = raw_exchange(tg.addr, &request("GET", &target, &[], b""));
        assert_eq!(answer.status, 200);
        assert!(
            answer.text().contains("<errorcode>"),
            "{action}: {}",
            answer.text()
        );
        assert_eq!(sim.requests().len(), before, "{action} reached the gateway");
    }
    // A charset under which ASCII bytes spell something else is refused.
    let answer = raw_exchange(
        tg.addr,
        &request("GET", &format!("/api?_charset_=utf-16&{SEND}"), &[], b""),
    );
    assert!(answer.text().contains("charset"), "{}", answer.text());
    // The operator's blocked paths: 403, whatever the request.
    let before = sim.requests().len();
    for target in ["/api/admin-ui", "/API/Admin-UI/x?action=getversion"] {
        let answer = raw_exchange(tg.addr, &request("GET", target, &[], b""));
        assert_eq!(answer.status, 403, "{target}");
        assert_eq!(
            answer.header("server").as_deref(),
            Some("OzekiNG/3.0.1 Microsoft-HTTPAPI/1.0")
        );
    }
    assert_eq!(sim.requests().len(), before);
    // Counted when the access line is written, just after the answer.
    let series =
        "tollgate_requests_total{action=\"-\",front_door=\"passthrough\",outcome=\"blocked\"}";
    wait_until(|| tg.metric(series) == Some(2.0), series);
}

// ---------------------------------------------------------------------------
// The property: random spellings, compared with what the simulator did.
// ---------------------------------------------------------------------------

/// One way of writing a request.
#[derive(Debug, Clone)]
struct Spelling {
    method: &'static str,
    path: String,
    /// Where each parameter goes: query (true) or body (false).
    in_query: Vec<bool>,
    names: Vec<String>,
    values: Vec<String>,
    content_type: Option<&'static str>,
    multipart: bool,
    extra: Vec<(String, String)>,
}

fn case_mix(s: &str, mask: &[bool]) -> String {
    s.chars()
        .zip(mask.iter().cycle())
        .map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c })
        .collect()
}

fn escape_some(s: &str, mask: &[bool]) -> String {
    s.chars()
        .zip(mask.iter().cycle())
        .map(|(c, esc)| {
            if *esc && c.is_ascii_alphanumeric() {
                format!("%{:02X}", c as u8)
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn spelling() -> impl Strategy<Value = Spelling> {
    let path = (
        prop::sample::select(vec![
            "api",
            "httpapi",
            "ozeki",
            "index.html",
            "apix",
            "x/api",
            "",
        ]),
        prop::sample::select(vec!["/", "//", "/./", "/y/../", "/%2e/"]),
        prop::sample::select(vec!["", "/", "//", "/.", ".", "/sub", "%2f"]),
        prop::collection::vec(any::<bool>(), 4),
        prop::collection::vec(prop::bool::weighted(0.2), 4),
    )
        .prop_map(|(base, lead, tail, up, esc)| {
            format!("{lead}{}{tail}", escape_some(&case_mix(base, &up), &esc))
        });
    let action = prop::sample::select(vec![
        "sendmessage",
        "SendMessage",
        " sendmessage ",
        "sendMessage%00",
        "send%6Dessage",
        "send_message",
        "getversion",
        "receivemessage",
    ]);
    let recipients = prop::sample::select(vec![
        "%2B36301111111",
        "%2B36301111111,%2B36302222222",
        "36301111111;36303333333,",
        "+36301111111",
    ]);
    let name_spelling = (
        prop::collection::vec(any::<bool>(), 6),
        prop::sample::select(vec!["", "+", "%20"]),
    );
    (
        prop::sample::select(vec!["GET", "POST", "PUT"]),
        path,
        action,
        recipients,
        prop::collection::vec(any::<bool>(), 5),
        prop::collection::vec(name_spelling, 5),
        prop::sample::select(vec![
            None,
            Some("application/x-www-form-urlencoded"),
            Some("text/plain"),
            Some("application/json"),
            Some("multipart/form-data; boundary=BoUnD"),
        ]),
        prop::collection::vec(
            prop::sample::select(vec![
                ("action", "getversion"),
                ("recipient", "%2B36309999999"),
                ("messagecount", "1"),
                ("recipient0", "%2B36308888888"),
                ("Recepient", "%2B36307777777"),
                ("username", "admin"),
            ]),
            0..2,
        ),
    )
        .prop_map(
            |(method, path, action, recipients, in_query, name_spellings, content_type, extra)| {
                let base = ["action", "username", "password", "recipient", "messagedata"];
                let names = base
                    .iter()
                    .zip(&name_spellings)
                    .map(|(n, (mask, pad))| format!("{pad}{}{pad}", case_mix(n, mask)))
                    .collect();
                let values = vec![
                    action.to_string(),
                    "john".into(),
                    "secret1".into(),
                    recipients.to_string(),
                    "hello".into(),
                ];
                let multipart = content_type.is_some_and(|c| c.starts_with("multipart"));
                Spelling {
                    method,
                    path,
                    in_query,
                    names,
                    values,
                    content_type,
                    multipart,
                    extra: extra
                        .into_iter()
                        .map(|(n, v)| (n.to_string(), v.to_string()))
                        .collect(),
                }
            },
        )
}

impl Spelling {
    fn to_request(&self) -> Vec<u8> {
        let mut query = Vec::new();
        let mut body_pairs = Vec::new();
        for ((name, value), in_query) in self.names.iter().zip(&self.values).zip(&self.in_query) {
            if *in_query || self.method == "GET" {
                query.push(format!("{name}={value}"));
            } else {
                body_pairs.push((name.clone(), value.clone()));
            }
        }
        for (n, v) in &self.extra {
            query.push(format!("{n}={v}"));
        }
        let body = if self.multipart {
            let mut b = Vec::new();
            for (n, v) in &body_pairs {
                // Multipart values are not percent-encoded.
                let n = percent_encoding::percent_decode_str(n)
                    .decode_utf8_lossy()
                    .replace('+', " ");
                let v = percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned();
                b.extend_from_slice(
                    format!(
                        "--BoUnD\r\nContent-Disposition: form-data; name=\"{n}\"\r\n\r\n{v}\r\n"
                    )
                    .as_bytes(),
                );
            }
            b.extend_from_slice(b"--BoUnD--\r\n");
            b
        } else {
            body_pairs
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("&")
                .into_bytes()
        };
        let target = if query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, query.join("&"))
        };
        let headers: Vec<(&str, &str)> = self
            .content_type
            .iter()
            .map(|c| ("Content-Type", *c))
            .collect();
        request(self.method, &target, &headers, &body)
    }
}

fn check_one(
    sim: &Sim,
    tg: &Tollgate,
    addr: SocketAddr,
    s: &Spelling,
) -> Result<bool, TestCaseError> {
    let (sent0, avail0) = (delivered(sim), available_milli(tg));
    let req = s.to_request();
    let answer = raw_exchange(addr, &req);
    let (sent1, avail1) = (delivered(sim), available_milli(tg));
    let sent = sent1 - sent0;
    let charged = avail0 - avail1;
    // Every recipient costs at least 1 credit (1 part at 1 credit).
    prop_assert!(
        charged >= sent as i64 * 1000,
        "delivered {sent} message(s) but charged {charged} milli-credits for\n{}\nanswer: {} {}",
        String::from_utf8_lossy(&req),
        answer.status,
        answer.text()
    );
    Ok(sent > 0)
}

#[test]
fn whatever_the_simulator_delivers_was_charged() {
    let (sim, tg) = start();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let delivered_cases = std::cell::Cell::new(0u32);
    runner
        .run(&spelling(), |s| {
            if check_one(&sim, &tg, tg.addr, &s)? {
                delivered_cases.set(delivered_cases.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    // Not vacuous: a good share of the spellings are real sends.
    assert!(
        delivered_cases.get() >= 30,
        "only {} of 300 spellings were delivered",
        delivered_cases.get()
    );
}
