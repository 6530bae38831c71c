//! Secrets never leave tollgate (SPEC 5.3, 8): passwords, Boxis user keys
//! and authcodes, and the admin token must not appear in any log line, in
//! `/metrics`, or in an error answer.
//!
//! Two checks:
//! 1. this file drives a workload through every front door (Ozeki GET and
//!    POST, right and wrong passwords, drop-in verification against the
//!    gateway, lockout, rate limits, idempotent replays, gateway failures,
//!    malformed requests, Boxis, SOAP, the admin API with right and wrong
//!    tokens), with tollgate's own modules logging at `trace`, then
//!    searches everything tollgate wrote and `/metrics`;
//! 2. it searches the logs of every tollgate the integration suite has run
//!    so far (the harness copies each one to `suite_log_dir()` when its
//!    test ends) for the secrets the other test files use. Test binaries
//!    run in name order, so in a full `cargo test` this covers every file
//!    before `secrets.rs`; the rest are covered on the next run.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use md5::{Digest, Md5};

const ADMIN_PW: &str = "Adm1n-Pw-Q7zT";
const JOHN_PW: &str = "J0hn-Pw-X9kL";
const WRONG_PW: &str = "Wr0ng-Pw-K3jV";
const GATEWAY_PW: &str = "G4il-Gw-Pw-8R";
const GATEWAY_WRONG_PW: &str = "G4il-Bad-Pw-2N";
const SOAP_PW: &str = "S0ap-Pw-Mast9";
const SOAP_WRONG_PW: &str = "S0ap-Wrong-Pw1";
const BOXIS_KEY: &str = "BxKey-Secret-77aa";
const WRONG_TOKEN: &str = "wrong-admin-token-5555";

fn md5_hex(text: &str) -> String {
    format!("{:x}", Md5::digest(text.as_bytes()))
}

/// Whether `secret` occurs in `text` as a token of its own (not inside a
/// longer run of letters and digits, e.g. a hex request id).
fn occurs(text: &str, secret: &str) -> bool {
    let boundary = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric());
    text.match_indices(secret).any(|(i, _)| {
        boundary(text[..i].chars().next_back()) && boundary(text[i + secret.len()..].chars().next())
    })
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn soap(tg: &Tollgate, op: &str, params: &[(&str, &str)], key: Option<&str>) -> String {
    let params: String = params
        .iter()
        .map(|(n, v)| format!("<{n}>{v}</{n}>"))
        .collect();
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<soap:Envelope xmlns:soap=\"http://schemas.xmlsoap.org/soap/envelope/\"><soap:Body>\
         <{op} xmlns=\"http://www.2sms.com/WebServices/2.2/Simple/\">{params}</{op}></soap:Body></soap:Envelope>"
    );
    let mut r = client()
        .post(tg.url("/WebServices/2.2/Simple/Account.asmx"))
        .header("Content-Type", "text/xml; charset=utf-8")
        .header(
            "SOAPAction",
            format!("\"http://www.2sms.com/WebServices/2.2/Simple/{op}\""),
        )
        .body(body);
    if let Some(k) = key {
        r = r.header("Idempotency-Key", k);
    }
    r.send().unwrap().text().unwrap()
}

#[test]
fn no_secret_reaches_a_log_line_metrics_or_an_error_answer() {
    let sim = Sim::start(&["--user", &format!("gail:{GATEWAY_PW}:20")]);
    let accounts = format!(
        "accounts:\n\
         - {{ name: admin, role: admin, password_hash: '{}', anytime: 1000 }}\n\
         - {{ name: john, role: user, password_hash: '{}', anytime: 744, email: john@example.com, boxis_user_key: {BOXIS_KEY} }}\n\
         - {{ name: master, password_hash: '{}', anytime: 100 }}\n\
         - {{ name: sub1, parent: master, password_hash: '{}' }}\n",
        password_hash(ADMIN_PW),
        password_hash(JOHN_PW),
        password_hash(SOAP_PW),
        password_hash(SOAP_PW),
    );
    let mut tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: format!(
                "{STORE_YAML}auth: {{ verify_upstream: true, adopt_balance: true }}\n\
                 limits: {{ auth_lockout: {{ failures: 3, window_s: 60, lock_s: 60 }}, \
                 account_parts: {{ parts_per_s: 0.01, burst: 6 }} }}\n"
            ),
            accounts,
            ..Default::default()
        },
    );
    // Every line tollgate's own modules can write.
    tg.kill();
    tg.spawn_with_log("info,tollgate=trace");
    let mut answers: Vec<String> = Vec::new();

    // --- Ozeki, GET: right, wrong, unknown, drop-in right and wrong.
    for pw in [JOHN_PW, WRONG_PW] {
        answers.push(
            (get(&tg.url(&format!(
                "/api?action=getcredits&username=john&password={}",
                enc(pw)
            ))))
            .1,
        );
        answers.push(get(&tg.url(&format!(
            "/api?action=sendmessage&UserName=john&PassWord={}&recipient=%2B36301111111&messagedata=hi",
            enc(pw)
        ))).1);
    }
    answers.push(
        (get(&tg.url(&format!(
            "/api?action=getcredits&username=gail&password={}",
            enc(GATEWAY_WRONG_PW)
        ))))
        .1,
    );
    answers.push(
        (get(&tg.url(&format!(
            "/api?action=getcredits&username=gail&password={}",
            enc(GATEWAY_PW)
        ))))
        .1,
    );
    answers.push(
        (get(&tg.url(&format!(
            "/api?action=addcredits&username=admin&password={}&useraccount=john&add=5",
            enc(ADMIN_PW)
        ))))
        .1,
    );
    // Forwarded actions and other paths carry the password too.
    answers.push(
        (get(&tg.url(&format!(
            "/api?action=receivemessage&username=john&password={}",
            enc(JOHN_PW)
        ))))
        .1,
    );
    answers.push(
        (get(&tg.url(&format!(
            "/elsewhere?user=john&pass={}&secret={}",
            enc(JOHN_PW),
            enc(ADMIN_PW)
        ))))
        .1,
    );
    // --- Ozeki, POST, with an idempotency key (and its replay).
    for _ in 0..2 {
        let r = client()
            .post(tg.url("/api"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Idempotency-Key", "secrets-test-1")
            .body(format!(
                "action=sendmessage&username=john&password={}&recipient=%2B36301111111&messagedata=hi",
                enc(JOHN_PW)
            ))
            .send()
            .unwrap();
        answers.push(r.text().unwrap());
    }
    // Malformed encoding, an over-long password, a rate-limited send.
    answers.push(
        (get(&tg.url(&format!(
            "/api?action=getcredits&username=john&password={}%ZZ",
            enc(JOHN_PW)
        ))))
        .1,
    );
    answers.push(
        (get(&tg.url(&format!(
            "/api?action=getcredits&username=john&password={}{}",
            enc(JOHN_PW),
            enc(JOHN_PW)
        ))))
        .1,
    );
    for _ in 0..4 {
        answers.push(get(&tg.url(&format!(
            "/api?action=sendmessage&username=john&password={}&recipient=%2B36301111111,%2B36302222222&messagedata=hi",
            enc(JOHN_PW)
        ))).1);
    }
    // The gateway failing mid-send (logged as a warning).
    sim.fault("reset", 1);
    answers.push(get(&tg.url(&format!(
        "/api?action=sendmessage&username=admin&password={}&recipient=%2B36301111111&messagedata=hi",
        enc(ADMIN_PW)
    ))).1);
    // Lockout: a flood of wrong passwords (logged when it locks).
    for i in 0..5 {
        answers.push(
            (get(&tg.url(&format!(
                "/api?action=getcredits&username=admin&password={WRONG_PW}{i}"
            ))))
            .1,
        );
    }
    // --- Boxis: right key, wrong key, replay.
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut authcodes = Vec::new();
    for (i, key) in [BOXIS_KEY, "not-the-key", BOXIS_KEY].iter().enumerate() {
        let t = ts - i as u64;
        let authcode = md5_hex(&format!("{t}{key}"));
        let body = format!(
            "version=1.0&timestamp={t}&username=john&authcode={authcode}&section=sms&action=calculateCredits&recipients_count=1&content=hi"
        );
        answers.push(post_form(&tg.url("/boxis"), body.clone()).2);
        answers.push(post_form(&tg.url("/boxis"), body).2); // replayed
        authcodes.push(authcode);
    }
    // --- SOAP: balance and transfer with right and wrong passwords.
    for pw in [SOAP_PW, SOAP_WRONG_PW] {
        answers.push(soap(
            &tg,
            "GetBalance",
            &[("Username", "master"), ("Password", pw)],
            None,
        ));
        answers.push(soap(
            &tg,
            "SubAccountGiveCredit",
            &[
                ("Username", "master"),
                ("Password", pw),
                ("SubAccount", "sub1"),
                ("AnyTimeBalance", "1"),
                ("OffPeakBalance", "0"),
            ],
            Some("soap-secrets-1"),
        ));
    }
    // --- Admin API: right and wrong tokens.
    for token in [ADMIN_TOKEN, WRONG_TOKEN] {
        for path in ["/admin/accounts/john", "/admin/reservations?state=in_doubt"] {
            let r = client()
                .get(tg.admin_url(path))
                .bearer_auth(token)
                .send()
                .unwrap();
            answers.push(r.text().unwrap());
        }
        let r = client()
            .post(tg.admin_url("/admin/reload"))
            .bearer_auth(token)
            .send()
            .unwrap();
        answers.push(r.text().unwrap());
    }
    let metrics = get(&tg.admin_url("/metrics")).1;

    // Stop (flushes everything), then read all tollgate wrote.
    assert!(tg.stop_with("TERM").success());
    let log = tg.log();
    assert!(log.lines().count() > 40, "the workload ran:\n{log}");
    assert!(log.contains("tollgate::access"), "{log}");
    assert!(log.contains("locking this client"), "{log}");
    assert!(log.contains("account adopted"), "{log}");
    assert!(log.contains("gateway answer lost"), "{log}");
    let mut secrets: Vec<String> = [
        ADMIN_PW,
        JOHN_PW,
        WRONG_PW,
        GATEWAY_PW,
        GATEWAY_WRONG_PW,
        SOAP_PW,
        SOAP_WRONG_PW,
        BOXIS_KEY,
        ADMIN_TOKEN,
        WRONG_TOKEN,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    secrets.extend(secrets.clone().iter().map(|s| enc(s)));
    secrets.extend(authcodes);
    for secret in &secrets {
        for (i, line) in log.lines().enumerate() {
            assert!(
                !line.contains(secret.as_str()),
                "log line {i} holds a secret: {line}"
            );
        }
        assert!(
            !metrics.contains(secret.as_str()),
            "/metrics holds {secret}"
        );
        for a in &answers {
            assert!(
                !a.contains(secret.as_str()),
                "an answer holds a secret: {a}"
            );
        }
    }
    // The key files hold hashes, not passwords.
    for file in ["tollgate.db", "tollgate.idempotency.db"] {
        let bytes = std::fs::read(tg.dir.path().join(file)).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "{file} holds a secret");
        }
    }
}

/// The secrets the other integration test files use, searched for in the
/// log of every tollgate the suite has run (see the module docs).
#[test]
fn no_log_of_the_suite_holds_a_secret_it_used() {
    let secrets = [
        // tests/common: the default accounts and the admin token.
        "abc123",
        "secret1",
        "poor1",
        ADMIN_TOKEN,
        // tests/soap.rs, tests/boxis.rs
        "masterpw1",
        "JohnKey-0123456789",
        "FracKey-0123456789",
        "SaleKey-0123456789",
        "wrong-key-000000",
        "wrong-token-0123456789",
        // tests/limits.rs, tests/dropin.rs
        "RightPw-42",
        "Carol%26Pw%201",
        "Carol&Pw 1",
        "erinpw",
        "davepw",
        "zedpw",
        // tests/pg_store.rs: passwords in store.url
        "Pg-Url-Pw-33",
        "Pg-Secret-71x",
    ];
    let Ok(dir) = std::fs::read_dir(suite_log_dir()) else {
        return; // nothing ran yet
    };
    let mut files = 0;
    for entry in dir.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        files += 1;
        for (i, line) in text.lines().enumerate() {
            for s in secrets {
                assert!(
                    !occurs(line, s),
                    "{}:{}: holds {s:?}: {line}",
                    entry.path().display(),
                    i + 1
                );
            }
        }
    }
    eprintln!("searched {files} tollgate logs of the suite");
}

#[test]
fn occurs_matches_whole_tokens_only() {
    assert!(occurs("password=abc123&x", "abc123"));
    assert!(occurs("abc123", "abc123"));
    assert!(!occurs("id=19abc1234", "abc123"));
}
