//! Integration tests of the 2sms-compatible SOAP door (SPEC 2.2) over real
//! TCP with the real binaries: the WSDL, both operations over SOAP 1.1 and
//! 1.2, every error code the door gives, faults for malformed envelopes,
//! concurrent transfers, and a stock client (Python `zeep`) loading the WSDL
//! and calling both operations over both bindings.
//!
//! Also the ledger-level properties the door relies on: any sequence of
//! transfers conserves the total of every bucket and never takes one below
//! zero, also with many threads transferring both ways at once.

mod common;
#[path = "python/support.rs"]
mod python_support;

use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use tollgate::ledger::{Bucket, Ledger, LedgerConfig, LedgerError, ManualClock, NullSink, Role};

const PATH: &str = "/WebServices/2.2/Simple/Account.asmx";
const NS: &str = "http://www.2sms.com/WebServices/2.2/Simple/";
const SOAP11: &str = "http://schemas.xmlsoap.org/soap/envelope/";
const SOAP12: &str = "http://www.w3.org/2003/05/soap-envelope";
const PW: &str = "masterpw1";

fn accounts() -> String {
    let pw = password_hash(PW);
    format!(
        "accounts:\n\
         - {{ name: admin, role: admin, password_hash: '{admin}', anytime: 1000 }}\n\
         - {{ name: master, password_hash: '{pw}', anytime: 100, offpeak: 50 }}\n\
         - {{ name: sub1, parent: master, password_hash: '{pw}' }}\n\
         - {{ name: sub2, parent: master, password_hash: '{pw}', anytime: 5 }}\n\
         - {{ name: other, password_hash: '{pw}', anytime: 10 }}\n\
         - {{ name: othersub, parent: other, password_hash: '{pw}', anytime: 3 }}\n",
        admin = password_hash("abc123"),
    )
}

fn start(extra_yaml: &str) -> (Sim, Tollgate) {
    let sim = Sim::start(&[]);
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: extra_yaml.to_string(),
            accounts: accounts(),
            ..Default::default()
        },
    );
    (sim, tg)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum V {
    S11,
    S12,
}

struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

impl Answer {
    fn field(&self, name: &str) -> String {
        xml_field(&self.body, name).unwrap_or_else(|| panic!("no <{name}> in {}", self.body))
    }
}

fn send(
    tg: &Tollgate,
    content_type: &str,
    soap_action: Option<&str>,
    body: impl Into<Vec<u8>>,
) -> Answer {
    let mut r = client()
        .post(tg.url(PATH))
        .header("Content-Type", content_type)
        .body(body.into());
    if let Some(a) = soap_action {
        r = r.header("SOAPAction", a);
    }
    let r = r.send().unwrap();
    Answer {
        status: r.status().as_u16(),
        content_type: r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        body: r.text().unwrap(),
    }
}

fn envelope(v: V, op: &str, params: &[(&str, &str)]) -> String {
    let ns = match v {
        V::S11 => SOAP11,
        V::S12 => SOAP12,
    };
    let params: String = params
        .iter()
        .map(|(n, val)| format!("<{n}>{val}</{n}>"))
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<soap:Envelope xmlns:soap=\"{ns}\" \
         xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"><soap:Body>\
         <{op} xmlns=\"{NS}\">{params}</{op}></soap:Body></soap:Envelope>"
    )
}

/// Calls `op` the way each binding's clients do: SOAP 1.1 with a quoted
/// `SOAPAction`, SOAP 1.2 with the `action` media-type parameter.
fn call(tg: &Tollgate, v: V, op: &str, params: &[(&str, &str)]) -> Answer {
    let action = format!("{NS}{op}");
    let a = match v {
        V::S11 => send(
            tg,
            "text/xml; charset=utf-8",
            Some(&format!("\"{action}\"")),
            envelope(v, op, params),
        ),
        V::S12 => send(
            tg,
            &format!("application/soap+xml; charset=utf-8; action=\"{action}\""),
            None,
            envelope(v, op, params),
        ),
    };
    let expected_ct = match v {
        V::S11 => "text/xml; charset=utf-8",
        V::S12 => "application/soap+xml; charset=utf-8",
    };
    assert_eq!(a.content_type, expected_ct, "{}", a.body);
    a
}

fn balance(tg: &Tollgate, v: V, user: &str, pw: &str) -> Answer {
    call(tg, v, "GetBalance", &[("Username", user), ("Password", pw)])
}

fn give(tg: &Tollgate, v: V, user: &str, sub: &str, anytime: &str, offpeak: &str) -> Answer {
    call(
        tg,
        v,
        "SubAccountGiveCredit",
        &[
            ("Username", user),
            ("Password", PW),
            ("SubAccount", sub),
            ("AnyTimeBalance", anytime),
            ("OffPeakBalance", offpeak),
        ],
    )
}

/// (any-time, off-peak) as GetBalance reports them.
fn buckets(tg: &Tollgate, user: &str) -> (String, String) {
    let a = balance(tg, V::S11, user, PW);
    assert_eq!(a.field("Code"), "0", "{}", a.body);
    (a.field("AnyTimeBalance"), a.field("OffPeakBalance"))
}

fn s(a: &str, o: &str) -> (String, String) {
    (a.to_string(), o.to_string())
}

#[test]
fn wsdl_is_served_for_any_case_of_the_query() {
    let (_sim, tg) = start("");
    for q in ["WSDL", "wsdl", "Wsdl"] {
        let r = client().get(tg.url(&format!("{PATH}?{q}"))).send().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/xml"));
        let body = r.text().unwrap();
        assert!(body.starts_with("<?xml"), "{body}");
        assert!(body.contains(&format!("targetNamespace=\"{NS}\"")));
        assert!(body.contains("<wsdl:binding name=\"AccountSoap\""));
        assert!(body.contains("<wsdl:binding name=\"AccountSoap12\""));
        assert!(
            body.contains("<soap12:binding transport=\"http://schemas.xmlsoap.org/soap/http\"/>")
        );
        // The address is the one the client reached.
        assert!(
            body.contains(&format!("location=\"http://{}{PATH}\"", tg.addr)),
            "{body}"
        );
    }
    // The path is matched case-insensitively, as IIS does.
    let (status, body) = get(&tg.url("/webservices/2.2/simple/account.asmx?wsdl"));
    assert_eq!(status, 200);
    assert!(body.contains("AccountSoap12"));
    // Without ?WSDL: a help page naming the operations.
    let (status, body) = get(&tg.url(PATH));
    assert_eq!(status, 200);
    assert!(
        body.contains("SubAccountGiveCredit") && body.contains("?WSDL"),
        "{body}"
    );
}

#[test]
fn get_balance_over_both_versions() {
    let (sim, tg) = start("");
    for v in [V::S11, V::S12] {
        let a = balance(&tg, v, "master", PW);
        assert_eq!(a.status, 200);
        assert!(
            a.body
                .contains(&format!("<GetBalanceResponse xmlns=\"{NS}\">")),
            "{}",
            a.body
        );
        assert_eq!(a.field("GetBalanceResult"), "true");
        assert_eq!(a.field("AnyTimeBalance"), "100");
        assert_eq!(a.field("OffPeakBalance"), "50");
        assert_eq!(a.field("Code"), "0");
        assert!(!a.field("ResultText").is_empty());

        // Wrong password and unknown user: the same auth_failed, no balances.
        let wrong = balance(&tg, v, "master", "nope");
        let unknown = balance(&tg, v, "nobody", "nope");
        assert_eq!(wrong.status, 200);
        assert_eq!(wrong.field("GetBalanceResult"), "false");
        assert_eq!(wrong.field("Code"), "1003");
        // Issue 16: not zeros, which would be wrong; nothing.
        assert_eq!(
            xml_field(&wrong.body, "AnyTimeBalance"),
            None,
            "{}",
            wrong.body
        );
        assert_eq!(wrong.body, unknown.body);

        // Missing credentials: invalid_request in the operation's response.
        let a = call(&tg, v, "GetBalance", &[("Username", "master")]);
        assert_eq!(a.status, 200);
        assert_eq!(a.field("Code"), "1006");
    }
    assert!(sim.requests().is_empty(), "never forwarded");
}

#[test]
fn give_credit_moves_both_buckets_both_ways() {
    let (_sim, tg) = start("");
    let a = give(&tg, V::S11, "master", "sub1", "10.5", "2.25");
    assert_eq!(a.status, 200);
    assert_eq!(a.field("SubAccountGiveCreditResult"), "true");
    assert_eq!(a.field("Code"), "0");
    assert_eq!(a.field("ParentAnyTimeBalance"), "89.5");
    assert_eq!(a.field("ParentOffPeakBalance"), "47.75");
    assert_eq!(a.field("SubAnyTimeBalance"), "10.5");
    assert_eq!(a.field("SubOffPeakBalance"), "2.25");
    assert_eq!(
        a.field("ResultText"),
        "Credits successfully exchanged between master (master account) and sub1 (sub account)."
    );

    // SOAP 1.2, negative amounts move credit back; one bucket may be zero.
    let a = give(&tg, V::S12, "master", "sub1", "-0.5", "0");
    assert_eq!(a.field("Code"), "0", "{}", a.body);
    assert_eq!(a.field("ParentAnyTimeBalance"), "90");
    assert_eq!(a.field("SubAnyTimeBalance"), "10");
    assert_eq!(a.field("SubOffPeakBalance"), "2.25");
    // Opposite directions at once: give any-time, take off-peak back.
    let a = give(&tg, V::S12, "master", "sub1", "1", "-2.25");
    assert_eq!(a.field("Code"), "0", "{}", a.body);
    assert_eq!(buckets(&tg, "master"), s("89", "50"));
    assert_eq!(buckets(&tg, "sub1"), s("11", "0"));
    // Trailing zeros past the third decimal are exact, so accepted.
    let a = give(&tg, V::S11, "master", "sub2", "1.0000", "0.125");
    assert_eq!(a.field("Code"), "0", "{}", a.body);
    assert_eq!(buckets(&tg, "sub2"), s("6", "0.125"));

    // The sub-account spends through the Ozeki door: the ledger is one.
    let (_, body) = get(&tg.url("/api?action=getcredits&username=sub1&password=masterpw1"));
    assert_eq!(xml_field(&body, "balance").as_deref(), Some("11"), "{body}");
    let log = tg.log();
    assert!(!log.contains(PW), "passwords never reach the log");
}

#[test]
fn failed_transfers_change_nothing_and_say_why() {
    let (_sim, tg) = start("");
    let before: Vec<_> = ["master", "sub1", "sub2", "other", "othersub"]
        .iter()
        .map(|n| buckets(&tg, n))
        .collect();
    let cases: Vec<(V, &str, &str, &str, &str, &str)> = vec![
        // More than the parent has (in either bucket).
        (V::S11, "master", "sub1", "100.001", "0", "1001"),
        (V::S12, "master", "sub1", "1", "50.5", "1001"),
        // More than the sub-account has, moving back; the other leg was fine.
        (V::S11, "master", "sub2", "-5.001", "0", "1001"),
        (V::S12, "master", "sub2", "1", "-1", "1001"),
        // Not the caller's sub-account, unknown, the caller itself, its parent.
        (V::S11, "master", "othersub", "1", "0", "1007"),
        (V::S12, "master", "ghost", "1", "0", "1007"),
        (V::S11, "master", "master", "1", "0", "1007"),
        (V::S11, "sub1", "master", "0", "0.5", "1007"),
        (V::S12, "other", "sub1", "1", "0", "1007"),
        // Amounts: too precise, zero, not a decimal, absurd.
        (V::S11, "master", "sub1", "0.0001", "0", "1006"),
        (V::S12, "master", "sub1", "0", "0", "1006"),
        (V::S11, "master", "sub1", "1e3", "0", "1006"),
        (
            V::S11,
            "master",
            "sub1",
            "99999999999999999999",
            "0",
            "1006",
        ),
    ];
    for (v, user, sub, anytime, offpeak, code) in cases {
        let a = give(&tg, v, user, sub, anytime, offpeak);
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.field("SubAccountGiveCreditResult"), "false", "{}", a.body);
        assert_eq!(
            a.field("Code"),
            code,
            "{user}->{sub} {anytime}/{offpeak}: {}",
            a.body
        );
    }
    // A failure reports the caller's balances and its sub-account's real
    // ones; a foreign account's are left out (issue 16: never as 0).
    let a = give(&tg, V::S11, "master", "othersub", "1", "0");
    assert_eq!(a.field("ParentAnyTimeBalance"), "100");
    assert_eq!(xml_field(&a.body, "SubAnyTimeBalance"), None, "{}", a.body);
    assert_eq!(xml_field(&a.body, "SubOffPeakBalance"), None, "{}", a.body);
    let a = give(&tg, V::S11, "master", "sub2", "-6", "0");
    assert_eq!(a.field("SubAnyTimeBalance"), "5");
    assert_eq!(a.field("SubOffPeakBalance"), "0");
    let a = give(&tg, V::S11, "master", "sub1", "100.001", "0");
    assert_eq!(a.field("SubAnyTimeBalance"), "0", "sub1 really holds 0");
    // Wrong password: auth_failed, nothing revealed.
    let a = call(
        &tg,
        V::S12,
        "SubAccountGiveCredit",
        &[
            ("Username", "master"),
            ("Password", "wrong"),
            ("SubAccount", "sub1"),
            ("AnyTimeBalance", "1"),
            ("OffPeakBalance", "0"),
        ],
    );
    assert_eq!(a.field("Code"), "1003");
    assert_eq!(
        xml_field(&a.body, "ParentAnyTimeBalance"),
        None,
        "{}",
        a.body
    );
    assert_eq!(xml_field(&a.body, "SubAnyTimeBalance"), None, "{}", a.body);

    let after: Vec<_> = ["master", "sub1", "sub2", "other", "othersub"]
        .iter()
        .map(|n| buckets(&tg, n))
        .collect();
    assert_eq!(before, after);
}

fn fault_code_11(a: &Answer) -> String {
    assert_eq!(a.status, 500, "{}", a.body);
    assert_eq!(a.content_type, "text/xml; charset=utf-8");
    assert!(a.body.contains(SOAP11), "{}", a.body);
    assert!(!a.field("faultstring").is_empty());
    a.field("faultcode")
}

fn fault_code_12(a: &Answer) -> String {
    assert_eq!(a.status, 500, "{}", a.body);
    assert_eq!(a.content_type, "application/soap+xml; charset=utf-8");
    assert!(a.body.contains(SOAP12), "{}", a.body);
    assert!(
        a.body.contains("<soap:Reason><soap:Text xml:lang=\"en\">"),
        "{}",
        a.body
    );
    a.field("soap:Value")
}

#[test]
fn malformed_envelopes_get_faults_of_their_version() {
    let (sim, tg) = start("");
    let t11 = "text/xml; charset=utf-8";
    let t12 = "application/soap+xml; charset=utf-8";
    let good11 = envelope(
        V::S11,
        "GetBalance",
        &[("Username", "master"), ("Password", PW)],
    );
    let good12 = envelope(
        V::S12,
        "GetBalance",
        &[("Username", "master"), ("Password", PW)],
    );

    // Not XML, broken XML.
    assert_eq!(fault_code_11(&send(&tg, t11, None, "hello")), "soap:Client");
    assert_eq!(fault_code_12(&send(&tg, t12, None, "hello")), "soap:Sender");
    let broken = good11.replace("</soap:Body>", "");
    assert_eq!(fault_code_11(&send(&tg, t11, None, broken)), "soap:Client");
    let broken = good12.replace("</GetBalance>", "");
    assert_eq!(fault_code_12(&send(&tg, t12, None, broken)), "soap:Sender");

    // DTDs (entity bombs, external entities) are refused outright.
    let bomb = format!(
        "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol2 \
         \"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;\">]>{}",
        good11
            .replace("<Username>master</Username>", "<Username>&lol2;</Username>")
            .trim_start_matches("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n")
    );
    let a = send(&tg, t11, None, bomb);
    assert_eq!(fault_code_11(&a), "soap:Client");
    assert!(a.field("faultstring").contains("DOCTYPE"), "{}", a.body);
    let xxe = format!(
        "<!DOCTYPE x [<!ENTITY xxe SYSTEM \"file:///etc/passwd\">]>{}",
        good12.trim_start_matches("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n")
    );
    assert_eq!(fault_code_12(&send(&tg, t12, None, xxe)), "soap:Sender");
    // An undeclared entity is an error, not expanded or kept.
    let undeclared = good11.replace(">master<", ">&xxe;<");
    assert_eq!(
        fault_code_11(&send(&tg, t11, None, undeclared)),
        "soap:Client"
    );

    // Nesting beyond the limit.
    let deep = good11.replace(
        "<soap:Body>",
        &format!(
            "<soap:Header>{}{}</soap:Header><soap:Body>",
            "<h>".repeat(64),
            "</h>".repeat(64)
        ),
    );
    let a = send(&tg, t11, None, deep);
    assert_eq!(fault_code_11(&a), "soap:Client");
    assert!(a.field("faultstring").contains("deeper"), "{}", a.body);

    // Unknown operation, wrong namespace, SOAPAction naming another one.
    let unknown = envelope(V::S12, "SendSMS", &[("Username", "master")]);
    let a = send(&tg, t12, None, unknown);
    assert_eq!(fault_code_12(&a), "soap:Sender");
    assert!(a.body.contains("unknown operation"), "{}", a.body);
    let foreign = good11.replace(NS, "http://tempuri.org/");
    assert_eq!(fault_code_11(&send(&tg, t11, None, foreign)), "soap:Client");
    let mismatch = send(
        &tg,
        t11,
        Some(&format!("\"{NS}SubAccountGiveCredit\"")),
        good11.clone(),
    );
    assert_eq!(fault_code_11(&mismatch), "soap:Client");
    let mismatch12 = send(
        &tg,
        &format!("{t12}; action=\"{NS}SubAccountGiveCredit\""),
        None,
        good12.clone(),
    );
    assert_eq!(fault_code_12(&mismatch12), "soap:Sender");

    // An envelope of the other version than the binding: VersionMismatch.
    assert_eq!(
        fault_code_11(&send(&tg, t11, None, good12.clone())),
        "soap:VersionMismatch"
    );
    let a = send(&tg, t12, None, good11.clone());
    assert_eq!(fault_code_12(&a), "soap:VersionMismatch");
    assert!(a.body.contains("<soap:Upgrade>"));
    assert_eq!(
        fault_code_11(&send(&tg, t11, None, "<Envelope xmlns=\"urn:nope\"/>")),
        "soap:VersionMismatch"
    );
    // A header block that must be understood.
    let must = good12.replace(
        "<soap:Body>",
        "<soap:Header><x:Tx xmlns:x=\"urn:x\" soap:mustUnderstand=\"true\"/></soap:Header><soap:Body>",
    );
    assert_eq!(
        fault_code_12(&send(&tg, t12, None, must)),
        "soap:MustUnderstand"
    );
    // No Body, an empty Body.
    let no_body = format!("<soap:Envelope xmlns:soap=\"{SOAP11}\"/>");
    assert_eq!(fault_code_11(&send(&tg, t11, None, no_body)), "soap:Client");
    let empty_body = format!("<soap:Envelope xmlns:soap=\"{SOAP12}\"><soap:Body/></soap:Envelope>");
    assert_eq!(
        fault_code_12(&send(&tg, t12, None, empty_body)),
        "soap:Sender"
    );

    // Not SOAP at all, too big, wrong method.
    let a = send(&tg, "application/json", None, "{}");
    assert_eq!(a.status, 415);
    assert!(a.body.contains("soap:Client"), "{}", a.body);
    let big = good11.replace(">master<", &format!(">{}<", "m".repeat(70 * 1024)));
    let a = send(&tg, t11, None, big);
    assert_eq!(a.status, 413);
    assert!(a.body.contains("soap:Client"), "{}", a.body);
    let r = client()
        .put(tg.url(PATH))
        .body(good11.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["allow"], "GET, POST");

    // The well-formed requests still work, and nothing was forwarded or moved.
    assert_eq!(send(&tg, t11, Some("\"\""), good11).status, 200);
    assert_eq!(send(&tg, t12, None, good12).status, 200);
    assert_eq!(buckets(&tg, "master"), s("100", "50"));
    assert!(sim.requests().is_empty());
}

#[test]
fn concurrent_transfers_over_http_conserve_credit() {
    let (_sim, tg) = start("");
    let tg = Arc::new(tg);
    // Warm the credential cache so the threads race on the ledger, not argon2.
    buckets(&tg, "master");
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let tg = tg.clone();
            std::thread::spawn(move || {
                let sub = if t % 2 == 0 { "sub1" } else { "sub2" };
                let v = if t % 3 == 0 { V::S12 } else { V::S11 };
                let mut ok = 0;
                for i in 0..25 {
                    let sign = if (i + t) % 2 == 0 { "" } else { "-" };
                    let a = give(
                        &tg,
                        v,
                        "master",
                        sub,
                        &format!("{sign}{}.5", (i * 7 + t) % 9),
                        &format!("{sign}{}", (i + t) % 4),
                    );
                    match a.field("Code").as_str() {
                        "0" => ok += 1,
                        "1001" | "1006" => {}
                        other => panic!("unexpected code {other}: {}", a.body),
                    }
                    for f in [
                        "ParentAnyTimeBalance",
                        "ParentOffPeakBalance",
                        "SubAnyTimeBalance",
                        "SubOffPeakBalance",
                    ] {
                        assert!(!a.field(f).starts_with('-'), "{}", a.body);
                    }
                }
                ok
            })
        })
        .collect();
    let ok: i32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(ok > 10, "only {ok} transfers succeeded");
    let milli = |t: &str| tollgate::money::parse_credits(t).unwrap();
    let (mut anytime, mut offpeak) = (0, 0);
    for n in ["master", "sub1", "sub2"] {
        let (a, o) = buckets(&tg, n);
        assert!(milli(&a) >= 0 && milli(&o) >= 0);
        anytime += milli(&a);
        offpeak += milli(&o);
    }
    assert_eq!((anytime, offpeak), (105_000, 50_000));
}

#[test]
fn acknowledged_transfers_survive_a_kill_9() {
    // durability: sync (the default) over the SQLite store: a transfer is
    // answered only once committed, so killing the process right after the
    // answer loses nothing.
    let (_sim, mut tg) = start(STORE_YAML);
    let a = give(&tg, V::S11, "master", "sub1", "12.345", "6");
    assert_eq!(a.field("Code"), "0", "{}", a.body);
    let a = give(&tg, V::S12, "master", "sub2", "-2", "0.5");
    assert_eq!(a.field("Code"), "0", "{}", a.body);
    tg.kill();
    tg.spawn();
    assert_eq!(buckets(&tg, "master"), s("89.655", "43.5"));
    assert_eq!(buckets(&tg, "sub1"), s("12.345", "6"));
    assert_eq!(buckets(&tg, "sub2"), s("3", "0.5"));
    // The restored relation still gates transfers.
    let a = give(&tg, V::S11, "master", "othersub", "1", "0");
    assert_eq!(a.field("Code"), "1007");
    let a = give(&tg, V::S11, "master", "sub1", "-12.345", "-6");
    assert_eq!(a.field("Code"), "0", "{}", a.body);
}

#[test]
fn zeep_loads_the_wsdl_and_calls_both_operations_over_both_bindings() {
    python_support::ensure_python_packages(&[("zeep", "zeep")]);
    let (_sim, tg) = start("");
    let out = python_support::run_script(
        "zeep_client.py",
        &[
            tg.url(&format!("{PATH}?WSDL")),
            "master".to_string(),
            PW.to_string(),
            "sub1".to_string(),
            "othersub".to_string(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    assert_eq!(buckets(&tg, "sub1"), s("10", "0"));
}

// ----- ledger properties of transfers ----------------------------------------

const C: i64 = 1000;
const ACCOUNTS: [&str; 4] = ["p", "c1", "c2", "q"];

fn ledger() -> Arc<Ledger> {
    let l = Arc::new(Ledger::new(
        LedgerConfig::default(),
        Arc::new(NullSink),
        Arc::new(ManualClock::new(0)),
    ));
    l.open_account("p", None, Role::User, None).unwrap();
    l.open_account("c1", Some("p"), Role::User, None).unwrap();
    l.open_account("c2", Some("p"), Role::User, None).unwrap();
    l.open_account("q", Some("c1"), Role::User, None).unwrap();
    for (name, a, o) in [("p", 50, 20), ("c1", 5, 0), ("c2", 0, 7), ("q", 1, 1)] {
        l.add(name, Bucket::Anytime, a * C, None).unwrap();
        l.add(name, Bucket::OffPeak, o * C, None).unwrap();
    }
    l
}

fn totals(l: &Ledger) -> (i64, i64) {
    ACCOUNTS.iter().fold((0, 0), |(a, o), n| {
        let v = l.account(n).unwrap();
        (a + v.anytime.posted_milli, o + v.offpeak.posted_milli)
    })
}

fn assert_no_negative(l: &Ledger) {
    for n in ACCOUNTS {
        let v = l.account(n).unwrap();
        assert!(v.anytime.available_milli() >= 0, "{n} {v:?}");
        assert!(v.offpeak.available_milli() >= 0, "{n} {v:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any sequence of transfers between any two accounts (related or not)
    /// keeps each bucket's total, never takes a bucket below zero, and a
    /// failed transfer changes nothing at all.
    #[test]
    fn transfer_sequences_conserve_and_never_overdraw(
        ops in prop::collection::vec(
            (0..4usize, 0..4usize, -60_000i64..60_000, -30_000i64..30_000),
            1..100,
        )
    ) {
        let l = ledger();
        let start = totals(&l);
        for (from, to, anytime, offpeak) in ops {
            let before: Vec<_> = ACCOUNTS.iter().map(|n| l.account(n).unwrap()).collect();
            let r = l.transfer(ACCOUNTS[from], ACCOUNTS[to], anytime, offpeak, Some("prop"));
            let related = from != to
                && l.account(ACCOUNTS[to]).unwrap().parent.as_deref() == Some(ACCOUNTS[from]);
            match r {
                Ok(out) => {
                    prop_assert!(related);
                    let parent = &before[from];
                    prop_assert_eq!(out.parent.anytime.posted_milli, parent.anytime.posted_milli - anytime);
                    prop_assert_eq!(out.parent.offpeak.posted_milli, parent.offpeak.posted_milli - offpeak);
                }
                Err(e) => {
                    if !related {
                        prop_assert!(
                            matches!(e, LedgerError::NotASubaccount { .. }),
                            "{:?}", e
                        );
                    }
                    let after: Vec<_> = ACCOUNTS.iter().map(|n| l.account(n).unwrap()).collect();
                    prop_assert_eq!(before, after);
                }
            }
            assert_no_negative(&l);
            prop_assert_eq!(totals(&l), start);
        }
    }
}

#[test]
fn many_threads_transferring_both_ways_conserve_credit() {
    for round in 0..4 {
        let l = ledger();
        let start = totals(&l);
        std::thread::scope(|s| {
            for t in 0..8i64 {
                let l = &l;
                s.spawn(move || {
                    let (parent, child) = match t % 3 {
                        0 => ("p", "c1"),
                        1 => ("p", "c2"),
                        _ => ("c1", "q"),
                    };
                    for i in 0..2_000i64 {
                        let sign = if (i + t + round) % 2 == 0 { 1 } else { -1 };
                        let a = sign * ((i * 7 + t) % 13) * 250;
                        let o = -sign * ((i * 3 + t) % 5) * 125;
                        match l.transfer(parent, child, a, o, None) {
                            Ok(out) => {
                                for b in [
                                    out.parent.anytime,
                                    out.parent.offpeak,
                                    out.child.anytime,
                                    out.child.offpeak,
                                ] {
                                    assert!(b.available_milli() >= 0);
                                }
                            }
                            Err(
                                LedgerError::InsufficientCredit { .. }
                                | LedgerError::InvalidAmount(_),
                            ) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                });
            }
            // A reader sees conserved totals at every instant it looks.
            let l = &l;
            s.spawn(move || {
                for _ in 0..500 {
                    assert_eq!(l.total_posted_milli(), start.0 + start.1);
                }
            });
        });
        assert_no_negative(&l);
        assert_eq!(totals(&l), start);
    }
}

#[test]
fn password_guessing_is_locked_out_per_address_and_user() {
    let (_sim, tg) = start("limits: { auth_lockout: { failures: 3, window_s: 60, lock_s: 300 } }");
    let codes: Vec<String> = (0..6)
        .map(|i| balance(&tg, V::S11, "master", &format!("guess{i}")).field("Code"))
        .collect();
    assert_eq!(codes, ["1003", "1003", "1003", "1002", "1002", "1002"]);
    // Locked: even the right password is refused, over either binding.
    let a = balance(&tg, V::S12, "master", PW);
    assert_eq!(a.field("GetBalanceResult"), "false");
    assert_eq!(a.field("Code"), "1002");
    let a = give(&tg, V::S11, "master", "sub1", "1", "0");
    assert_eq!(a.field("Code"), "1002");
    assert_eq!(
        buckets(&tg, "other"),
        s("10", "0"),
        "another user is not locked"
    );
    let log = tg.log();
    assert!(
        !log.contains("guess0") && !log.contains(PW),
        "no password in the log"
    );
}

/// Issue 12: the idempotent replay of a transfer checked the password
/// without the per-(address, user) lockout, so while a pair was locked out
/// the right password got the stored answer and a wrong one did not — a
/// guesser learnt it had found the password. Every path consults the
/// lockout first.
#[test]
fn a_locked_out_pair_learns_nothing_from_an_idempotency_key() {
    let (_sim, tg) = start("limits: { auth_lockout: { failures: 3, window_s: 60, lock_s: 300 } }");
    let action = format!("\"{NS}SubAccountGiveCredit\"");
    let keyed = |password: &str| {
        let body = envelope(
            V::S11,
            "SubAccountGiveCredit",
            &[
                ("Username", "master"),
                ("Password", password),
                ("SubAccount", "sub1"),
                ("AnyTimeBalance", "1"),
                ("OffPeakBalance", "0"),
            ],
        );
        let r = client()
            .post(tg.url(PATH))
            .header("Content-Type", "text/xml; charset=utf-8")
            .header("SOAPAction", action.as_str())
            .header("Idempotency-Key", "transfer-1")
            .body(body)
            .send()
            .unwrap();
        (
            r.status().as_u16(),
            r.headers().contains_key("idempotent-replayed"),
            r.text().unwrap(),
        )
    };
    let (status, replayed, first) = keyed(PW);
    assert_eq!((status, replayed), (200, false), "{first}");
    assert_eq!(xml_field(&first, "Code").as_deref(), Some("0"));
    for i in 0..3 {
        balance(&tg, V::S11, "master", &format!("guess{i}"));
    }
    // Locked: the right and a wrong password get the same refusal.
    let right = keyed(PW);
    let wrong = keyed("guess9");
    assert_eq!(right, wrong);
    assert_eq!(
        xml_field(&right.2, "Code").as_deref(),
        Some("1002"),
        "{}",
        right.2
    );
    assert!(!right.1, "no replay for a locked pair");
    assert_eq!(buckets(&tg, "sub1"), s("1", "0"), "moved once");
}
