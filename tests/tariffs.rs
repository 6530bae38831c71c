//! Tariffs as an operator uses them (SPEC 3.2, 4.2): edge cases of the
//! calculator through the public API (those `src/tariff/tests.rs` does not
//! already cover), the price breakdown of `tollgate quote` and `GET
//! /admin/quote`, off-peak sends through the ledger, and receive pricing
//! over the real binaries against `ozeki-sim`.

mod common;

use std::path::Path;
use std::sync::Arc;

use chrono::TimeZone;
use common::*;
use tollgate::ledger::{
    Bucket, BucketPreference, EntryKind, Ledger, LedgerConfig, MemorySink, Role, SystemClock,
};
use tollgate::tariff::{Encoding, PriceSource, QuoteRequest, Tariff};

fn tariff(yaml: &str) -> Tariff {
    Tariff::from_yaml(yaml, Path::new("tariffs.yaml")).unwrap()
}

fn utc_ms(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> i64 {
    chrono::Utc
        .with_ymd_and_hms(y, mo, d, h, mi, s)
        .unwrap()
        .timestamp_millis()
}

fn quote_at<'a>(recipient: &'a str, at_unix_ms: i64) -> QuoteRequest<'a> {
    QuoteRequest {
        recipient,
        text: "hi",
        message_type: "SMS:TEXT",
        class: None,
        at_unix_ms,
    }
}

// ---------------------------------------------------------------------------
// The calculator through the public API.

#[test]
fn longest_prefix_over_overlapping_chains_and_both_sources() {
    let dir = tempfile::tempdir().unwrap();
    // The chain 4 ⊂ 44 ⊂ 447 ⊂ 4477 ⊂ 447700900 is split between the
    // prefixes file and the YAML: which source a prefix came from does not
    // matter, only its length.
    std::fs::write(
        dir.path().join("prefixes.csv"),
        "prefix,price\n4,9\n447,3\n447700900,0\n123456789012345,5\n",
    )
    .unwrap();
    let path = dir.path().join("tariffs.yaml");
    std::fs::write(
        &path,
        "default_country_code: \"44\"\n\
         default_price: 1\n\
         prefixes_file: prefixes.csv\n\
         prices: { \"44\": 2, \"4477\": 4, \"1\": 6 }\n",
    )
    .unwrap();
    let t = Tariff::load(&path).unwrap();
    assert_eq!(t.prefix_count(), 7);
    let price = |number: &str| {
        let q = t.quote(&quote_at(number, 0)).unwrap();
        (q.matched_prefix, q.price_per_part_milli)
    };
    let p = |prefix: &str, credits: i64| (Some(prefix.to_string()), credits * 1000);
    // Each link of the chain wins for the numbers it is the longest for.
    assert_eq!(price("+4912345678"), p("4", 9));
    assert_eq!(price("+4420 7946 0000"), p("44", 2));
    assert_eq!(price("+44 7911 123456"), p("447", 3));
    assert_eq!(price("+44 7712 345678"), p("4477", 4));
    // A free destination (price 0) is a price, not "unmatched".
    assert_eq!(price("+44 7700 900123"), p("447700900", 0));
    // A number exactly as long as a prefix matches it; one a digit shorter
    // than the longest prefix falls back to the next link.
    assert_eq!(price("+447700900"), p("447700900", 0));
    assert_eq!(price("+44770090"), p("4477", 4));
    // A 15-digit prefix matches the 15-digit number that equals it only.
    assert_eq!(price("+123456789012345"), p("123456789012345", 5));
    assert_eq!(price("+123456789012344"), p("1", 6));
    // National and international forms of one number price the same.
    for form in [
        "07700 900123",
        "+447700900123",
        "00447700900123",
        "447700900123",
    ] {
        assert_eq!(price(form), p("447700900", 0), "{form}");
    }
    assert_eq!(price("07911 123456"), p("447", 3));
    // "+44 (0)…" is not stripped of its trunk 0: the number stays
    // 4407911123456, which only "44" prefixes.
    assert_eq!(price("+44 (0)7911 123456"), p("44", 2));
    // Unknown numbers pay the default and name no prefix.
    assert_eq!(price("+33 1 23 45 67 89"), (None, 1000));
    assert_eq!(price("+999"), (None, 1000));
}

#[test]
fn class_overrides_and_exact_rounding() {
    let t = tariff(
        "default_country_code: \"36\"\n\
         default_price: 1\n\
         prices: { \"36\": 0.333, \"3620\": 0.8, \"44\": 2.5 }\n\
         classes:\n\
         \x20 reseller: { default_price: 0.7, prices: { \"3620\": 0.111, \"49\": 0.9 } }\n\
         \x20 premium: { prices: { \"36\": 1.25 } }\n\
         fast_multiplier: 1.5\n\
         fast_rounding: up_to_credit\n",
    );
    let quote = |number: &str, text: &str, class: Option<&str>| {
        t.quote(&QuoteRequest {
            recipient: number,
            text,
            message_type: "",
            class,
            at_unix_ms: 0,
        })
        .unwrap()
    };
    // Totals are parts × price in exact milli-credits: 3 × 0.333 = 0.999.
    let long = "x".repeat(400); // 3 GSM-7 parts
    let q = quote("030 123 4567", &long, None);
    assert_eq!(
        (q.parts, q.price_per_part_milli, q.total_milli),
        (3, 333, 999)
    );
    let q = quote("020 123 4567", &long, Some("reseller"));
    assert_eq!(
        (q.matched_prefix.as_deref(), q.total_milli),
        (Some("3620"), 333)
    );
    // The class overrides only what it lists.
    let q = quote("030 123 4567", "hi", Some("reseller"));
    assert_eq!(
        (q.matched_prefix.as_deref(), q.total_milli),
        (Some("36"), 333)
    );
    let q = quote("+44 7700 900123", "hi", Some("reseller"));
    assert_eq!(q.total_milli, 2500);
    let q = quote("+33 123456789", "hi", Some("reseller"));
    assert_eq!((q.matched_prefix, q.total_milli), (None, 700));
    let q = quote("+36 20 1234567", "hi", Some("premium"));
    assert_eq!(
        (q.matched_prefix.as_deref(), q.total_milli),
        (Some("36"), 1250)
    );
    assert_eq!(
        t.price_per_part("36201234567", Some("premium")).source,
        PriceSource::ClassPrefix
    );
    // UCS-2 counting decides the parts; the price is per part.
    let q = quote("+36 20 1234567", &"ő".repeat(71), Some("premium"));
    assert_eq!(
        (q.encoding, q.parts, q.total_milli),
        (Encoding::Ucs2, 2, 2500)
    );
    // Fast mode rounds up to a whole credit, never down.
    assert_eq!(t.fast_price(333), 1000);
    assert_eq!(t.fast_price(1250), 2000); // 1.875 → 2
    assert_eq!(t.fast_price(2000), 3000); // exactly 3
    assert_eq!(t.fast_price(2001), 4000); // 3.0015 → 4
}

#[test]
fn offpeak_windows_across_midnight_week_wrap_and_dst() {
    use BucketPreference::{AnytimeOnly as Peak, OffPeakFirst as Off};
    // Sunday 22:00 → Monday 06:00 (UTC): the window wraps the week.
    let t = tariff(
        "default_price: 1\noffpeak: { timezone: UTC, windows: [ { days: [sun], from: \"22:00\", to: \"06:00\" }, { days: [fri], from: \"23:00\", to: \"01:00\" } ] }\n",
    );
    let at = |ms| t.bucket_preference(ms);
    // 2025-01-19 is a Sunday.
    assert_eq!(at(utc_ms(2025, 1, 19, 21, 59, 59)), Peak);
    assert_eq!(at(utc_ms(2025, 1, 19, 22, 0, 0)), Off);
    assert_eq!(at(utc_ms(2025, 1, 20, 5, 59, 59)), Off); // Monday
    assert_eq!(at(utc_ms(2025, 1, 20, 6, 0, 0)), Peak);
    assert_eq!(at(utc_ms(2025, 1, 20, 22, 0, 0)), Peak); // Monday opens none
                                                         // Friday 23:00 → Saturday 01:00: Saturday 00:30 is Friday's window;
                                                         // Friday 00:30 is not (Thursday opens no window).
    assert_eq!(at(utc_ms(2025, 1, 24, 0, 30, 0)), Peak);
    assert_eq!(at(utc_ms(2025, 1, 24, 23, 0, 0)), Off);
    assert_eq!(at(utc_ms(2025, 1, 25, 0, 30, 0)), Off);
    assert_eq!(at(utc_ms(2025, 1, 25, 1, 0, 0)), Peak);

    // New York, Saturday 22:00 → Sunday 06:00 local, over both DST nights
    // of 2025 (US dates differ from Europe's).
    let ny = tariff(
        "default_price: 1\noffpeak: { timezone: America/New_York, windows: [ { days: [sat], from: \"22:00\", to: \"06:00\" } ] }\n",
    );
    let at = |ms| ny.bucket_preference(ms);
    // 2025-03-09 02:00 EST → 03:00 EDT: the window is 7 real hours,
    // 03:00Z (22:00 EST) to 10:00Z (06:00 EDT).
    assert_eq!(at(utc_ms(2025, 3, 9, 2, 59, 59)), Peak);
    assert_eq!(at(utc_ms(2025, 3, 9, 3, 0, 0)), Off);
    assert_eq!(at(utc_ms(2025, 3, 9, 7, 0, 0)), Off); // 03:00 EDT, just after the jump
    assert_eq!(at(utc_ms(2025, 3, 9, 9, 59, 59)), Off);
    assert_eq!(at(utc_ms(2025, 3, 9, 10, 0, 0)), Peak);
    // 2025-11-02 02:00 EDT → 01:00 EST: 9 real hours, 02:00Z (22:00 EDT)
    // to 11:00Z (06:00 EST); 01:30 happens twice and is off-peak both times.
    assert_eq!(at(utc_ms(2025, 11, 2, 1, 59, 59)), Peak);
    assert_eq!(at(utc_ms(2025, 11, 2, 2, 0, 0)), Off);
    assert_eq!(at(utc_ms(2025, 11, 2, 5, 30, 0)), Off); // 01:30 EDT
    assert_eq!(at(utc_ms(2025, 11, 2, 6, 30, 0)), Off); // 01:30 EST
    assert_eq!(at(utc_ms(2025, 11, 2, 10, 59, 59)), Off);
    assert_eq!(at(utc_ms(2025, 11, 2, 11, 0, 0)), Peak);
}

/// SPEC 3.2 through the ledger: a send priced inside an off-peak window
/// reserves from `offpeak` first and the rest from `anytime`; outside a
/// window only from `anytime`. Its entries carry the tariff version.
#[test]
fn an_offpeak_send_draws_offpeak_first_through_the_ledger() {
    let t = tariff(
        "default_price: 1\noffpeak: { timezone: Europe/Budapest, windows: [ { days: [sat, sun], from: \"00:00\", to: \"24:00\" } ] }\n",
    );
    let sink = Arc::new(MemorySink::new());
    let ledger = Ledger::new(
        LedgerConfig::default(),
        sink.clone(),
        Arc::new(SystemClock::new()),
    );
    ledger.open_account("john", None, Role::User, None).unwrap();
    ledger.add("john", Bucket::Anytime, 10_000, None).unwrap();
    ledger.add("john", Bucket::OffPeak, 2_000, None).unwrap();

    let send = |at_unix_ms: i64, recipients: &[&str]| {
        let shares: Vec<i64> = recipients
            .iter()
            .map(|r| t.quote(&quote_at(r, at_unix_ms)).unwrap().total_milli)
            .collect();
        let pref = t.bucket_preference(at_unix_ms);
        let id = ledger
            .reserve("john", &shares, pref, Some("req"), Some(t.version()))
            .unwrap();
        ledger.settle(id, shares.iter().sum(), None).unwrap();
        pref
    };
    // Saturday 2025-01-18 12:00 local: 3 credits, 2 from off-peak.
    let saturday = utc_ms(2025, 1, 18, 11, 0, 0);
    assert_eq!(
        send(saturday, &["+3620", "+3630", "+3670"]),
        BucketPreference::OffPeakFirst
    );
    let john = ledger.account("john").unwrap();
    assert_eq!(john.offpeak.available_milli(), 0);
    assert_eq!(john.anytime.available_milli(), 9_000);
    // Monday noon: anytime only, even with off-peak credit.
    ledger.add("john", Bucket::OffPeak, 5_000, None).unwrap();
    let monday = utc_ms(2025, 1, 20, 11, 0, 0);
    assert_eq!(send(monday, &["+3620"]), BucketPreference::AnytimeOnly);
    let john = ledger.account("john").unwrap();
    assert_eq!(john.offpeak.available_milli(), 5_000);
    assert_eq!(john.anytime.available_milli(), 8_000);
    // Every reserve and post entry names the tariff version.
    let priced: Vec<_> = sink
        .entries()
        .into_iter()
        .filter(|e| matches!(e.kind, EntryKind::Reserve | EntryKind::Post))
        .collect();
    assert_eq!(priced.len(), 6);
    assert!(priced
        .iter()
        .all(|e| e.tariff_version.as_deref() == Some(t.version())));
}

// ---------------------------------------------------------------------------
// Over the real binaries.

fn accounts(extra: &str) -> String {
    format!(
        "accounts:\n\
         - {{ name: admin, role: admin, password_hash: '{}', anytime: 1000 }}\n\
         - {{ name: john, role: user, password_hash: '{}', anytime: 744 }}\n\
         - {{ name: poor, role: user, password_hash: '{}', anytime: 1 }}\n{extra}",
        password_hash("abc123"),
        password_hash("secret1"),
        password_hash("poor1"),
    )
}

fn account_json(tg: &Tollgate, name: &str) -> serde_json::Value {
    tg.admin_get(&format!("/admin/accounts/{name}"))
}

#[test]
fn an_offpeak_send_through_the_proxy_draws_offpeak_first() {
    let sim = Sim::start(&["--user", "night:night1:0"]);
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            // Always off-peak.
            tariffs: "default_country_code: \"36\"\ndefault_price: 1\noffpeak: { timezone: UTC, windows: [ { days: [mon, tue, wed, thu, fri, sat, sun], from: \"00:00\", to: \"24:00\" } ] }\n".into(),
            accounts: accounts(&format!(
                "- {{ name: night, role: user, password_hash: '{}', anytime: 10, offpeak: 2 }}\n",
                password_hash("night1")
            )),
            ..Default::default()
        },
    );
    let (status, headers, body) = post_form(
        &tg.url("/api"),
        "action=sendmessage&username=night&password=night1&recipient=%2B3620,%2B3630,%2B3670&messagedata=hi",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-tollgate-cost"], "3");
    let night = account_json(&tg, "night");
    assert_eq!(night["offpeak"]["available"], "0");
    assert_eq!(night["anytime"]["available"], "9");
    assert_eq!(
        tg.admin_get("/admin/quote?recipient=%2B3620&text=hi")["bucket"],
        "offpeak_first"
    );
}

#[test]
fn quote_shows_the_breakdown_in_the_cli_and_the_admin_api() {
    let sim = Sim::start(&[]);
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            tariffs: "default_country_code: \"36\"\nnational_prefix: \"06\"\ndefault_price: 1\nprices: { \"36\": 1, \"3620\": 0.8 }\nclasses: { wholesale: { prices: { \"3620\": 0.5 } } }\n".into(),
            ..Default::default()
        },
    );
    let text = "Árvíztűrő tükörfúrógép ".repeat(4); // 92 UCS-2 units: 2 parts
    let q = tg.admin_get(&format!(
        "/admin/quote?recipient=06201234567&class=wholesale&text={}",
        percent_encoding::utf8_percent_encode(&text, percent_encoding::NON_ALPHANUMERIC)
    ));
    assert_eq!(q["encoding"], "ucs2");
    assert_eq!(q["parts"], 2);
    assert_eq!(q["normalised"], "36201234567");
    assert_eq!(q["matched_prefix"], "3620");
    assert_eq!(q["price_per_part"], "0.5");
    assert_eq!(q["bucket"], "anytime");
    assert_eq!(q["total"], "1");
    let version = q["tariff_version"].as_str().unwrap().to_string();
    assert_eq!(version.len(), 16);
    // Unpriceable input is a 400 with the reason.
    let r = client()
        .get(tg.admin_url("/admin/quote?recipient=abc"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    let out = tg.cli(&[
        "quote",
        "--recipient",
        "+36 30 123 4567",
        "--text",
        &"a".repeat(161),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    for line in [
        format!("tariff_version  {version}"),
        "normalised      36301234567".to_string(),
        "matched_prefix  36".to_string(),
        "encoding        gsm7".to_string(),
        "parts           2".to_string(),
        "units           161".to_string(),
        "price_per_part  1".to_string(),
        "total           2".to_string(),
    ] {
        assert!(stdout.contains(&line), "{line:?} missing from:\n{stdout}");
    }
    // The same words as the admin API's JSON, field for field.
    assert!(
        stdout.contains(&format!(
            "bucket          {}",
            q["bucket"].as_str().unwrap()
        )),
        "{stdout}"
    );
    for line in stdout.lines() {
        let name = line.split_whitespace().next().unwrap();
        assert!(
            q.get(name).is_some(),
            "{name} is not an admin quote field: {q}"
        );
    }
}

// ---------------------------------------------------------------------------
// Receive pricing.

const RECEIVE_TARIFF: &str = "default_country_code: \"36\"\ndefault_price: 1\nreceive_price: 0.5\n";

fn inbox(sim: &Sim, count: u32) {
    let r = client()
        .post(sim.url(&format!("/sim/inbox?count={count}")))
        .send()
        .unwrap();
    assert!(r.status().is_success());
}

fn sim_inbox_len(sim: &Sim) -> u64 {
    let v: serde_json::Value = client()
        .get(sim.url("/sim/stats"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    v["inbox"].as_u64().unwrap()
}

fn receive(tg: &Tollgate, user: &str, password: &str) -> (u16, Option<String>, String) {
    let r = client()
        .get(tg.url(&format!(
            "/api?action=receivemessage&username={user}&password={password}"
        )))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let cost = r
        .headers()
        .get("x-tollgate-cost")
        .map(|v| v.to_str().unwrap().to_string());
    (status, cost, r.text().unwrap())
}

fn receive_requests(sim: &Sim) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r["action"].as_str() == Some("receivemessage"))
        .count()
}

#[test]
fn received_messages_are_charged_per_message() {
    let sim = Sim::start(&["--user", "poor:poor1:0"]);
    let mut tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            tariffs: RECEIVE_TARIFF.into(),
            accounts: accounts(""),
            extra_yaml: STORE_YAML.into(),
        },
    );
    let version = tg.admin_get("/admin/quote?recipient=%2B3620")["tariff_version"]
        .as_str()
        .unwrap()
        .to_string();
    inbox(&sim, 3);
    let (status, cost, body) = receive(&tg, "john", "secret1");
    assert_eq!(status, 200);
    // The gateway's answer, unchanged, with its three messages.
    assert!(body.contains("<!DOCTYPE response"), "{body}");
    assert_eq!(xml_all(&body, "message").len(), 3, "{body}");
    assert_eq!(cost.as_deref(), Some("1.5"));
    assert_eq!(tg.balance("john", "secret1"), "742.5");
    // An empty inbox costs nothing.
    let (status, cost, body) = receive(&tg, "john", "secret1");
    assert_eq!((status, cost.as_deref()), (200, Some("0")));
    assert!(xml_all(&body, "message").is_empty());
    assert_eq!(tg.balance("john", "secret1"), "742.5");
    // A POSTed receive is charged the same way.
    inbox(&sim, 2);
    let (status, headers, body) = post_form(
        &tg.url("/api"),
        "action=receivemessage&username=john&password=secret1",
    );
    assert_eq!(status, 200);
    assert_eq!(xml_all(&body, "message").len(), 2);
    assert_eq!(headers["x-tollgate-cost"], "1");
    assert_eq!(tg.balance("john", "secret1"), "741.5");
    assert_eq!(receive_requests(&sim), 3);
    assert_eq!(
        tg.metric_value("tollgate_received_messages_total{result=\"charged\"}"),
        5.0
    );

    // Wrong credentials are refused locally: the gateway's inbox is safe.
    inbox(&sim, 1);
    let (status, cost, body) = receive(&tg, "john", "wrong");
    assert_eq!((status, cost), (200, None));
    assert_eq!(
        xml_field(&body, "errorcode").as_deref(),
        Some("1003"),
        "{body}"
    );
    assert_eq!(receive_requests(&sim), 3);
    assert_eq!(sim_inbox_len(&sim), 1);
    // `action=x&action=receivemessage` cannot fetch messages uncharged.
    let (_, body) =
        get(&tg.url("/api?action=getversion&action=receivemessage&username=john&password=secret1"));
    assert_eq!(
        xml_field(&body, "errorcode").as_deref(),
        Some("1006"),
        "{body}"
    );
    assert_eq!(sim_inbox_len(&sim), 1);

    // Under strict overdraft, poor (1 credit) pays for two of five messages
    // and the rest is a counted shortfall; all five are delivered.
    let (_, _, body) = receive(&tg, "john", "secret1"); // drain
    assert_eq!(xml_all(&body, "message").len(), 1);
    inbox(&sim, 5);
    let (status, cost, body) = receive(&tg, "poor", "poor1");
    assert_eq!(status, 200);
    assert_eq!(xml_all(&body, "message").len(), 5);
    assert_eq!(cost.as_deref(), Some("1"));
    assert_eq!(tg.balance("poor", "poor1"), "0");
    assert_eq!(
        tg.metric_value("tollgate_receive_shortfall_milli_total"),
        1500.0
    );
    assert_eq!(
        tg.metric_value("tollgate_received_messages_total{result=\"shortfall\"}"),
        5.0
    );
    assert!(tg.log().contains("shortfall_milli=1500"), "{}", tg.log());
    // With nothing left to pay even one message, the receive is refused up
    // front and the messages stay in the gateway's inbox.
    inbox(&sim, 2);
    let (status, cost, body) = receive(&tg, "poor", "poor1");
    assert_eq!((status, cost), (200, None));
    assert_eq!(
        xml_field(&body, "errorcode").as_deref(),
        Some("1001"),
        "{body}"
    );
    assert_eq!(
        xml_field(&body, "action").as_deref(),
        Some("receivemessage")
    );
    assert_eq!(sim_inbox_len(&sim), 2);

    // The charges are ledger entries priced by the tariff version in force.
    let status = tg.stop_with("TERM");
    assert!(status.success());
    let out = tg.cli(&["ledger", "export", "--format", "jsonl"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let posts: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["kind"] == "post")
        .collect();
    let amounts: Vec<i64> = posts
        .iter()
        .map(|e| e["amount_milli"].as_i64().unwrap())
        .collect();
    assert_eq!(amounts, [-1500, -1000, -500, -1000], "{posts:#?}");
    assert!(posts
        .iter()
        .all(|e| e["tariff_version"] == version.as_str()));
}

#[test]
fn receive_pricing_modes_and_overdraft_policies() {
    let sim = Sim::start(&["--user", "poor:poor1:0"]);
    // receive_price 0 (the default): receivemessage streams through
    // untouched and nothing is charged.
    let free = Tollgate::start(sim.addr, TollgateOptions::default());
    inbox(&sim, 2);
    let (status, cost, body) = receive(&free, "john", "secret1");
    assert_eq!((status, cost), (200, None));
    assert_eq!(xml_all(&body, "message").len(), 2);
    assert_eq!(free.balance("john", "secret1"), "744");
    drop(free);

    // Shadow mode counts what it would charge and moves nothing.
    let shadow = Tollgate::start(
        sim.addr,
        TollgateOptions {
            tariffs: RECEIVE_TARIFF.into(),
            accounts: accounts(""),
            extra_yaml: "mode: shadow\n".into(),
        },
    );
    inbox(&sim, 4);
    let (status, cost, body) = receive(&shadow, "poor", "poor1");
    assert_eq!((status, cost), (200, None));
    assert_eq!(xml_all(&body, "message").len(), 4);
    assert_eq!(shadow.balance("poor", "poor1"), "1");
    assert_eq!(
        shadow.metric_value("tollgate_received_messages_total{result=\"shadow\"}"),
        4.0
    );
    assert_eq!(
        shadow.metric_value("tollgate_shadow_decisions_total{decision=\"would_refuse\"}"),
        1.0
    );
    drop(shadow);

    // `overdraft: ozeki`: charged in full while the balance is above zero,
    // even below zero; then refused.
    let ozeki = Tollgate::start(
        sim.addr,
        TollgateOptions {
            tariffs: RECEIVE_TARIFF.into(),
            accounts: accounts(""),
            extra_yaml: "ledger: { overdraft: ozeki }\n".into(),
        },
    );
    inbox(&sim, 5);
    let (_, cost, body) = receive(&ozeki, "poor", "poor1");
    assert_eq!(xml_all(&body, "message").len(), 5);
    assert_eq!(cost.as_deref(), Some("2.5"));
    assert_eq!(ozeki.balance("poor", "poor1"), "-1.5");
    inbox(&sim, 1);
    let (_, cost, body) = receive(&ozeki, "poor", "poor1");
    assert_eq!(cost, None);
    assert_eq!(
        xml_field(&body, "errorcode").as_deref(),
        Some("1001"),
        "{body}"
    );
    assert_eq!(sim_inbox_len(&sim), 1);
}
