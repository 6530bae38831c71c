//! Integration tests of the Boxis-compatible door (SPEC 2.1) over real TCP:
//! the real `tollgate` binary (in front of the real `ozeki-sim`, which must
//! never hear of these requests), both return types, every error code the
//! door can give, the three content charsets, and a Python `requests`
//! client written from Boxis' public documentation.

mod common;
#[path = "python/support.rs"]
mod python_support;

use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use md5::{Digest, Md5};

const JOHN_KEY: &str = "JohnKey-0123456789";
const FRAC_KEY: &str = "FracKey-0123456789";
const WHOLESALE_KEY: &str = "SaleKey-0123456789";

const TARIFFS_WITH_CLASS: &str = r#"
default_country_code: "36"
default_price: 1
prices:
  "36": 1
classes:
  wholesale: { default_price: 0.5 }
max_parts: 10
"#;

fn accounts() -> String {
    format!(
        "accounts:\n\
         - {{ name: admin, role: admin, password_hash: '{admin}', anytime: 1000 }}\n\
         - {{ name: john, role: user, password_hash: '{john}', anytime: 744, email: john@example.com, boxis_user_key: {JOHN_KEY} }}\n\
         - {{ name: frac, role: user, password_hash: '{john}', anytime: '12.5', boxis_user_key: {FRAC_KEY} }}\n\
         - {{ name: sale, role: user, password_hash: '{john}', tariff_class: wholesale, email: sale@example.com, boxis_user_key: {WHOLESALE_KEY} }}\n\
         - {{ name: nokey, role: user, password_hash: '{john}', email: nokey@example.com }}\n",
        admin = password_hash("abc123"),
        john = password_hash("secret1"),
    )
}

fn start(extra_yaml: &str) -> (Sim, Tollgate) {
    let sim = Sim::start(&[]);
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: extra_yaml.to_string(),
            tariffs: TARIFFS_WITH_CLASS.to_string(),
            accounts: accounts(),
        },
    );
    (sim, tg)
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Percent-encodes every byte outside the unreserved set.
fn enc(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn md5_hex(text: &str) -> String {
    format!("{:x}", Md5::digest(text.as_bytes()))
}

/// A form body: the authcode fields for `username`/`key` at `ts`, then
/// `extra`.
fn signed(username: &str, key: &str, ts: i64, extra: &[(&str, &[u8])]) -> String {
    let mut body = format!(
        "version=1.0&timestamp={ts}&username={}&authcode={}&section=sms",
        enc(username.as_bytes()),
        md5_hex(&format!("{ts}{key}"))
    );
    for (name, value) in extra {
        body.push('&');
        body.push_str(name);
        body.push('=');
        body.push_str(&enc(value));
    }
    body
}

/// Distinct timestamps for successive calls, so none is a replay: each call
/// takes the next second back from now.
struct Clock(i64);

impl Clock {
    fn new() -> Clock {
        Clock(now_s())
    }
    fn next(&mut self) -> i64 {
        self.0 -= 1;
        self.0
    }
}

struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

fn post(tg: &Tollgate, body: impl Into<Vec<u8>>) -> Answer {
    let (status, headers, body) = post_form(&tg.url("/boxis"), body);
    Answer {
        status,
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        body,
    }
}

fn json(a: &Answer) -> serde_json::Value {
    assert_eq!(a.content_type, "application/json", "{}", a.body);
    serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", a.body))
}

/// The `credit` of a successful XML answer.
fn xml_credit(a: &Answer) -> String {
    assert_eq!(a.status, 200);
    assert!(a.content_type.starts_with("text/xml"), "{}", a.content_type);
    assert_eq!(
        xml_field(&a.body, "result").as_deref(),
        Some("1"),
        "{}",
        a.body
    );
    xml_field(&a.body, "credit").unwrap()
}

/// The `resulttxt` of an XML error answer (which must have no params).
fn xml_error(a: &Answer) -> String {
    assert_eq!(
        xml_field(&a.body, "result").as_deref(),
        Some("0"),
        "{}",
        a.body
    );
    assert!(!a.body.contains("<params>"), "{}", a.body);
    xml_field(&a.body, "resulttxt").unwrap()
}

fn calc(content: &[u8], encoding: Option<&[u8]>, count: &str) -> Vec<(&'static str, Vec<u8>)> {
    let mut v = vec![
        ("action", b"calculateCredits".to_vec()),
        ("recipients_count", count.as_bytes().to_vec()),
        ("content", content.to_vec()),
    ];
    if let Some(e) = encoding {
        v.push(("encoding", e.to_vec()));
    }
    v
}

fn as_refs<'a>(v: &'a [(&'static str, Vec<u8>)]) -> Vec<(&'static str, &'a [u8])> {
    v.iter().map(|(n, b)| (*n, b.as_slice())).collect()
}

#[test]
fn calculate_credits_answers_in_xml_and_json() {
    let (sim, tg) = start("");
    let mut clock = Clock::new();

    // The documentation's example: 4 recipients of "test1" → 4 credits.
    let ts = clock.next();
    let a = post(
        &tg,
        signed(
            "john@example.com",
            JOHN_KEY,
            ts,
            &as_refs(&calc(b"test1", Some(b"UTF-8"), "4")),
        ),
    );
    assert_eq!(xml_credit(&a), "4");
    let body = a.body.clone();
    let server_ts: i64 = xml_field(&body, "timestamp").unwrap().parse().unwrap();
    assert!((server_ts - now_s()).abs() < 30);
    assert_eq!(
        body,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<return><result>1</result><resulttxt>success</resulttxt>\
             <params><credit>4</credit></params><timestamp>{server_ts}</timestamp></return>\n"
        )
    );

    // JSON: result a string, credit a number.
    let mut fields = calc(b"test1", Some(b"UTF-8"), "4");
    fields.push(("returntype", b"json".to_vec()));
    let a = post(
        &tg,
        signed(
            "john@example.com",
            JOHN_KEY,
            clock.next(),
            &as_refs(&fields),
        ),
    );
    let v = json(&a);
    assert_eq!(v["result"], serde_json::json!("1"));
    assert_eq!(v["resulttxt"], "success");
    assert_eq!(v["params"]["credit"], serde_json::json!(4));
    assert!(v["timestamp"].is_i64());

    // Multi-part: 161 GSM characters are 2 parts; × 3 recipients.
    let long = "a".repeat(161);
    let a = post(
        &tg,
        signed(
            "john",
            JOHN_KEY,
            clock.next(),
            &as_refs(&calc(long.as_bytes(), None, "3")),
        ),
    );
    assert_eq!(xml_credit(&a), "6");
    // Empty content is one part.
    let a = post(
        &tg,
        signed(
            "john",
            JOHN_KEY,
            clock.next(),
            &as_refs(&calc(b"", None, "1")),
        ),
    );
    assert_eq!(xml_credit(&a), "1");

    // Fast mode: 1.5 × 1 credit rounds up to 2 per message; 2 parts → 3.
    let mut fields = calc(b"hello", None, "3");
    fields.push(("fast", b"1".to_vec()));
    let a = post(
        &tg,
        signed("john", JOHN_KEY, clock.next(), &as_refs(&fields)),
    );
    assert_eq!(xml_credit(&a), "6");
    let mut fields = calc(long.as_bytes(), None, "1");
    fields.push(("fast", b"1".to_vec()));
    let a = post(
        &tg,
        signed("john", JOHN_KEY, clock.next(), &as_refs(&fields)),
    );
    assert_eq!(xml_credit(&a), "3");
    let mut fields = calc(b"hello", None, "3");
    fields.push(("fast", b"0".to_vec()));
    let a = post(
        &tg,
        signed("john", JOHN_KEY, clock.next(), &as_refs(&fields)),
    );
    assert_eq!(xml_credit(&a), "3");

    // The account's tariff class prices it: 0.5 a part, fast 0.75 → 1.
    let mut fields = calc(b"hello", None, "3");
    fields.push(("returntype", b"json".to_vec()));
    let a = post(
        &tg,
        signed(
            "sale@example.com",
            WHOLESALE_KEY,
            clock.next(),
            &as_refs(&fields),
        ),
    );
    assert_eq!(json(&a)["params"]["credit"].to_string(), "1.5");
    fields.push(("fast", b"1".to_vec()));
    let a = post(
        &tg,
        signed("sale", WHOLESALE_KEY, clock.next(), &as_refs(&fields)),
    );
    assert_eq!(json(&a)["params"]["credit"], serde_json::json!(3));

    // Over the tariff's max_parts: invalid_request.
    let huge = "a".repeat(153 * 11);
    let a = post(
        &tg,
        signed(
            "john",
            JOHN_KEY,
            clock.next(),
            &as_refs(&calc(huge.as_bytes(), None, "1")),
        ),
    );
    assert_eq!(
        xml_error(&a),
        "error: invalid_request: message needs 11 parts, more than the maximum of 10"
    );

    // Nothing reached the gateway, nothing was charged.
    assert!(sim.requests().is_empty());
    assert_eq!(tg.balance("john", "secret1"), "744");
}

#[test]
fn content_is_decoded_with_the_named_charset() {
    let (_sim, tg) = start("");
    let mut clock = Clock::new();
    let mut credit = |content: &[u8], encoding: Option<&[u8]>| -> String {
        let a = post(
            &tg,
            signed(
                "john",
                JOHN_KEY,
                clock.next(),
                &as_refs(&calc(content, encoding, "1")),
            ),
        );
        if xml_field(&a.body, "result").as_deref() == Some("1") {
            xml_credit(&a)
        } else {
            xml_error(&a)
        }
    };

    // ő is 0xF5 in ISO-8859-2 and not GSM-7: UCS-2, 70 a part, 67 when split.
    assert_eq!(credit(&[0xF5; 70], Some(b"ISO-8859-2")), "1");
    assert_eq!(credit(&[0xF5; 71], Some(b"ISO-8859-2")), "2");
    // 0xE8 is č in ISO-8859-2 (UCS-2: 160 → 3 parts) but è in Windows-1252
    // (GSM-7: 160 → 1 part).
    assert_eq!(credit(&[0xE8; 160], Some(b"ISO-8859-2")), "3");
    assert_eq!(credit(&[0xE8; 160], Some(b"Windows-1252")), "1");
    // € is 0x80 in Windows-1252 and a GSM-7 extension character (2 septets):
    // 80 fit one part, 81 need two.
    assert_eq!(credit(&[0x80; 80], Some(b"Windows-1252")), "1");
    assert_eq!(credit(&[0x80; 81], Some(b"Windows-1252")), "2");
    // UTF-8 (named or by default): ő is two bytes, one UCS-2 unit.
    let o70 = "ő".repeat(70);
    assert_eq!(credit(o70.as_bytes(), Some(b"UTF-8")), "1");
    assert_eq!(credit(o70.as_bytes(), None), "1");
    let e81 = "€".repeat(81);
    assert_eq!(credit(e81.as_bytes(), Some(b"UTF-8")), "2");
    // Bytes that are not UTF-8, and labels in the wrong case or unknown.
    assert_eq!(
        credit(&[0x80], Some(b"UTF-8")),
        "error: invalid_request: content is not valid UTF-8"
    );
    assert_eq!(
        credit(&[0xF5], None),
        "error: invalid_request: content is not valid UTF-8"
    );
    let bad_label = "error: invalid_request: encoding must be one of UTF-8, ISO-8859-2, Windows-1252 (case-sensitive)";
    for label in [&b"utf-8"[..], b"iso-8859-2", b"windows-1252", b"Latin-1"] {
        assert_eq!(credit(b"x", Some(label)), bad_label);
    }
}

#[test]
fn get_credit_limit_reads_the_available_anytime_balance() {
    let (_sim, tg) = start("");
    let mut clock = Clock::new();
    let limit = |who: &str, key: &str, rt: &[u8], ts: i64| {
        let mut fields: Vec<(&str, &[u8])> = vec![("action", b"getCreditLimit")];
        fields.push(("returntype", rt));
        post(&tg, signed(who, key, ts, &fields))
    };
    assert_eq!(
        xml_credit(&limit("john@example.com", JOHN_KEY, b"xml", clock.next())),
        "744"
    );
    let v = json(&limit("john", JOHN_KEY, b"json", clock.next()));
    assert_eq!(v["params"]["credit"], serde_json::json!(744));
    // A fractional balance is a JSON number with its decimals.
    let a = limit("frac", FRAC_KEY, b"JSON", clock.next());
    assert_eq!(
        a.body
            .split("\"credit\":")
            .nth(1)
            .unwrap()
            .split('}')
            .next(),
        Some("12.5")
    );
    assert_eq!(json(&a)["params"]["credit"].as_f64(), Some(12.5));

    // It follows the ledger: a send elsewhere (through the Ozeki door) or
    // an admin change shows up at once.
    let (_, body) =
        get(&tg
            .url("/api?action=addcredits&username=admin&password=abc123&useraccount=john&add=-44"));
    assert_eq!(
        xml_field(&body, "balance").as_deref(),
        Some("700"),
        "{body}"
    );
    assert_eq!(
        xml_credit(&limit("john", JOHN_KEY, b"xml", clock.next())),
        "700"
    );
}

#[test]
fn authcodes_are_checked_and_failures_look_alike() {
    let (_sim, tg) = start("");
    let mut clock = Clock::new();
    let fields: [(&str, &[u8]); 1] = [("action", b"getCreditLimit")];

    // By e-mail (any case) and by account name; uppercase hex is accepted.
    assert_eq!(
        xml_credit(&post(
            &tg,
            signed("John@Example.COM", JOHN_KEY, clock.next(), &fields)
        )),
        "744"
    );
    let ts = clock.next();
    let upper = signed("john", JOHN_KEY, ts, &fields).replace(
        &md5_hex(&format!("{ts}{JOHN_KEY}")),
        &md5_hex(&format!("{ts}{JOHN_KEY}")).to_uppercase(),
    );
    assert_eq!(xml_credit(&post(&tg, upper)), "744");

    // Wrong key, another account's key, unknown user, an account without a
    // key, an authcode over another timestamp: all the same auth_failed.
    let ts = clock.next();
    let cases = [
        signed("john", "wrong-key-000000", ts, &fields),
        signed("john", FRAC_KEY, ts, &fields),
        signed("nobody@example.com", JOHN_KEY, ts, &fields),
        signed("nokey@example.com", "", ts, &fields),
        signed("john", JOHN_KEY, ts, &fields)
            .replace(&format!("timestamp={ts}"), &format!("timestamp={}", ts - 1)),
        signed("john", JOHN_KEY, ts, &fields).replace("authcode=", "authcode=0"),
    ];
    for body in cases {
        let a = post(&tg, body);
        assert_eq!(a.status, 200);
        assert_eq!(xml_error(&a), "error: auth_failed");
    }
    // JSON errors: result "0", no params.
    let mut json_fields = fields.to_vec();
    json_fields.push(("returntype", b"json"));
    let v = json(&post(
        &tg,
        signed("john", "wrong-key-000000", clock.next(), &json_fields),
    ));
    assert_eq!(v["result"], serde_json::json!("0"));
    assert_eq!(v["resulttxt"], "error: auth_failed");
    assert!(v.get("params").is_none());
    // The key never reaches the log.
    assert!(!tg.log().contains(JOHN_KEY));
}

#[test]
fn stale_and_replayed_requests_are_refused() {
    let (_sim, tg) = start("boxis: { timestamp_window_s: 60 }");
    let fields: [(&str, &[u8]); 2] = [("action", b"getCreditLimit"), ("returntype", b"json")];

    for ts in [now_s() - 3600, now_s() + 3600, 0] {
        let v = json(&post(&tg, signed("john", JOHN_KEY, ts, &fields)));
        assert_eq!(v["resulttxt"], "error: timestamp_out_of_window", "{v}");
        let server = v["timestamp"].as_i64().unwrap();
        assert!(
            (server - now_s()).abs() < 30,
            "carries the server's time: {v}"
        );
    }
    // Inside the window, a little off either way, works.
    let ts = now_s() - 30;
    let body = signed("john", JOHN_KEY, ts, &fields);
    assert_eq!(json(&post(&tg, body.clone()))["result"], "1");
    // The same authcode again: replayed, even with other fields changed.
    let v = json(&post(&tg, body.clone()));
    assert_eq!(v["resulttxt"], "error: replayed");
    let again = signed("john", JOHN_KEY, ts, &as_refs(&calc(b"x", None, "1")));
    assert_eq!(xml_error(&post(&tg, again)), "error: replayed");
    // The same timestamp for another account is not a replay.
    assert_eq!(
        json(&post(&tg, signed("frac", FRAC_KEY, ts, &fields)))["result"],
        "1"
    );
    // A failed authcode is not remembered: the right one still works after.
    let ts2 = now_s() + 20;
    let wrong = signed("john", "wrong-key-000000", ts2, &fields);
    assert_eq!(json(&post(&tg, wrong))["resulttxt"], "error: auth_failed");
    assert_eq!(
        json(&post(&tg, signed("john", JOHN_KEY, ts2, &fields)))["result"],
        "1"
    );
}

#[test]
fn a_full_replay_cache_refuses_instead_of_forgetting() {
    let (_sim, tg) = start("boxis: { replay_cache_entries: 2 }");
    let mut clock = Clock::new();
    let fields: [(&str, &[u8]); 1] = [("action", b"getCreditLimit")];
    assert_eq!(
        xml_credit(&post(&tg, signed("john", JOHN_KEY, clock.next(), &fields))),
        "744"
    );
    assert_eq!(
        xml_credit(&post(&tg, signed("john", JOHN_KEY, clock.next(), &fields))),
        "744"
    );
    let a = post(&tg, signed("john", JOHN_KEY, clock.next(), &fields));
    assert_eq!(xml_error(&a), "error: rate_limited");
}

#[test]
fn bad_input_is_invalid_request_and_touches_nothing() {
    let (sim, tg) = start("");
    let mut clock = Clock::new();
    // Each bad body with the description its answer must carry: the
    // field that is wrong, never its value.
    let mut bodies: Vec<(Vec<u8>, &str)> = Vec::new();
    let mut push = |extra: &[(&str, &[u8])], why: &'static str| {
        bodies.push((
            signed("john", JOHN_KEY, clock.next(), extra).into_bytes(),
            why,
        ));
    };
    push(
        &[("action", b"sendSms")],
        "action must be calculateCredits or getCreditLimit",
    );
    push(&[], "action is missing");
    push(
        &[("action", b"calculateCredits")],
        "recipients_count is missing",
    );
    let count_range = "recipients_count must be an integer from 1 to 1000000";
    push(
        &[("action", b"calculateCredits"), ("recipients_count", b"0")],
        count_range,
    );
    push(
        &[
            ("action", b"calculateCredits"),
            ("recipients_count", b"two"),
        ],
        count_range,
    );
    push(
        &[
            ("action", b"calculateCredits"),
            ("recipients_count", b"99999999"),
        ],
        count_range,
    );
    push(
        &[
            ("action", b"calculateCredits"),
            ("recipients_count", b"1"),
            ("content", b"x"),
            ("fast", b"yes"),
        ],
        "fast must be 0 or 1",
    );
    push(
        &[("action", b"calculateCredits"), ("recipients_count", b"1")],
        "content is missing",
    );
    push(
        &[("action", b"getCreditLimit"), ("returntype", b"csv")],
        "returntype must be xml or json",
    );
    push(
        &[
            ("action", b"getCreditLimit"),
            ("action", b"calculateCredits"),
        ],
        "field \"action\" is given more than once",
    );
    bodies.push((
        signed(
            "john",
            JOHN_KEY,
            clock.next(),
            &[("action", b"getCreditLimit")],
        )
        .replace("section=sms", "section=mms")
        .into_bytes(),
        "section must be sms",
    ));
    bodies.push((
        signed(
            "john",
            JOHN_KEY,
            clock.next(),
            &[("action", b"getCreditLimit")],
        )
        .replace("version=1.0", "version=2.0")
        .into_bytes(),
        "version must be 1.0",
    ));
    bodies.push((
        b"timestamp=abc&username=john&authcode=x&section=sms&action=getCreditLimit".to_vec(),
        "timestamp must be Unix seconds",
    ));
    bodies.push((
        b"section=sms&action=getCreditLimit&username=john&authcode=%zz".to_vec(),
        "malformed percent-encoding",
    ));
    bodies.push((Vec::new(), "section is missing"));
    for (body, why) in bodies {
        let shown = String::from_utf8_lossy(&body).to_string();
        let a = post(&tg, body);
        assert_eq!(a.status, 200, "{shown}");
        assert_eq!(
            xml_error(&a),
            format!("error: invalid_request: {why}"),
            "{shown}"
        );
        assert!(!a.body.contains(JOHN_KEY), "{shown}");
    }

    // Errors answer in JSON when asked, even when the body is unreadable.
    let a = post(&tg, "returntype=json&content=%G0");
    assert_eq!(
        json(&a)["resulttxt"],
        "error: invalid_request: malformed percent-encoding"
    );

    // Not a form POST.
    let r = client()
        .post(tg.url("/boxis"))
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .unwrap();
    let body = r.text().unwrap();
    assert_eq!(
        xml_field(&body, "resulttxt").as_deref(),
        Some("error: invalid_request: Content-Type must be application/x-www-form-urlencoded or multipart/form-data")
    );
    let (status, body) = get(&tg.url("/boxis?action=getCreditLimit"));
    assert_eq!(status, 200);
    assert_eq!(
        xml_field(&body, "resulttxt").as_deref(),
        Some("error: invalid_request: not a POST")
    );

    // Over the body limit: 413 with a Boxis error.
    let big = format!(
        "{}&content={}",
        signed(
            "john",
            JOHN_KEY,
            clock.next(),
            &[("action", b"calculateCredits")]
        ),
        "a".repeat(70 * 1024)
    );
    let a = post(&tg, big);
    assert_eq!(a.status, 413);
    assert_eq!(xml_error(&a), "error: invalid_request: body too large");

    // Bad input never reached the gateway nor moved a balance.
    assert!(sim.requests().is_empty());
    assert_eq!(tg.balance("john", "secret1"), "744");
    // Metrics count the door's outcomes with bounded labels.
    let metrics = client()
        .get(tg.admin_url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("front_door=\"boxis\"") && l.contains("invalid_request")),
        "{metrics}"
    );
}

#[test]
fn python_requests_client_written_from_the_boxis_docs_works() {
    python_support::ensure_python_packages(&[("requests", "requests")]);
    let (_sim, tg) = start("");
    let out = python_support::run_script(
        "boxis_client.py",
        &[
            tg.url("/boxis"),
            "john@example.com".to_string(),
            JOHN_KEY.to_string(),
            "744".to_string(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

#[test]
fn authcode_guessing_is_locked_out_per_address_and_user() {
    let (_sim, tg) = start("limits: { auth_lockout: { failures: 3, window_s: 60, lock_s: 300 } }");
    let mut clock = Clock::new();
    let fields: [(&str, &[u8]); 1] = [("action", b"getCreditLimit")];
    // The account name and its e-mail in any case are one user.
    let names = [
        "john",
        "John@Example.COM",
        "john@example.com",
        "JOHN@EXAMPLE.COM",
        "john",
    ];
    let errors: Vec<String> = names
        .iter()
        .map(|name| {
            xml_error(&post(
                &tg,
                signed(name, "wrong-key-000000", clock.next(), &fields),
            ))
        })
        .collect();
    assert_eq!(
        errors,
        [
            "error: auth_failed",
            "error: auth_failed",
            "error: auth_failed",
            "error: rate_limited",
            "error: rate_limited",
        ]
    );
    // Locked: the right key is refused too; another user is not locked.
    let right = post(&tg, signed("john", JOHN_KEY, clock.next(), &fields));
    assert_eq!(xml_error(&right), "error: rate_limited");
    let other = post(&tg, signed("frac", FRAC_KEY, clock.next(), &fields));
    assert!(!xml_credit(&other).is_empty());
}

/// Issue 16: the vendor's sample client resynchronises only when an answer
/// says `timestamperror` (`$return['timestamperror']` in JSON,
/// `$return->timestamperror` in XML), taking the answer's `timestamp`.
#[test]
fn a_stale_timestamp_says_timestamperror_and_the_client_can_resync() {
    let (_sim, tg) = start("boxis: { timestamp_window_s: 60 }");
    let skewed = now_s() - 3600;
    let json_fields: [(&str, &[u8]); 2] = [("action", b"getCreditLimit"), ("returntype", b"json")];
    let v = json(&post(&tg, signed("john", JOHN_KEY, skewed, &json_fields)));
    assert_eq!(v["timestamperror"], serde_json::json!(1), "{v}");
    // Resynchronised the way the sample does: the server's timestamp.
    let server = v["timestamp"].as_i64().unwrap();
    let v = json(&post(&tg, signed("john", JOHN_KEY, server, &json_fields)));
    assert_eq!(v["result"], "1", "{v}");
    assert!(v.get("timestamperror").is_none(), "{v}");

    let a = post(
        &tg,
        signed(
            "john",
            JOHN_KEY,
            skewed - 1,
            &[("action", b"getCreditLimit")],
        ),
    );
    assert_eq!(
        xml_field(&a.body, "timestamperror").as_deref(),
        Some("1"),
        "{}",
        a.body
    );
    let server: i64 = xml_field(&a.body, "timestamp").unwrap().parse().unwrap();
    let a = post(
        &tg,
        signed(
            "john",
            JOHN_KEY,
            server + 1,
            &[("action", b"getCreditLimit")],
        ),
    );
    assert_eq!(
        xml_field(&a.body, "result").as_deref(),
        Some("1"),
        "{}",
        a.body
    );
    // Other errors carry no such marker.
    let a = post(
        &tg,
        signed(
            "john",
            "wrong-key-000000",
            now_s(),
            &[("action", b"getCreditLimit")],
        ),
    );
    assert!(!a.body.contains("timestamperror"), "{}", a.body);
}

/// Issue 16: PHP's curl sends an array of fields as `multipart/form-data`.
#[test]
fn multipart_form_bodies_are_read_like_forms() {
    let (_sim, tg) = start("");
    let ts = now_s();
    let authcode = md5_hex(&format!("{ts}{JOHN_KEY}"));
    let ts_text = ts.to_string();
    let fields: [(&str, &str); 10] = [
        ("version", "1.0"),
        ("returntype", "json"),
        ("timestamp", &ts_text),
        ("username", "john@example.com"),
        ("authcode", &authcode),
        ("section", "sms"),
        ("action", "calculateCredits"),
        ("recipients_count", "4"),
        ("content", "test1"),
        ("encoding", "UTF-8"),
    ];
    let mut body = String::new();
    for (name, value) in fields {
        body.push_str(&format!(
            "--PhpCurl\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    body.push_str("--PhpCurl--\r\n");
    let r = client()
        .post(tg.url("/boxis"))
        .header("Content-Type", "multipart/form-data; boundary=PhpCurl")
        .body(body)
        .send()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.text().unwrap()).unwrap();
    assert_eq!(v["result"], "1", "{v}");
    assert_eq!(v["params"]["credit"], serde_json::json!(4));
    // A multipart body that cannot be split is refused, naming why.
    let r = client()
        .post(tg.url("/boxis"))
        .header("Content-Type", "multipart/form-data; boundary=PhpCurl")
        .body("--PhpCurl\r\nno headers")
        .send()
        .unwrap();
    let text = r.text().unwrap();
    assert!(
        xml_field(&text, "resulttxt")
            .is_some_and(|t| t.starts_with("error: invalid_request: a multipart part")),
        "{text}"
    );
}
