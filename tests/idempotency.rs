//! `Idempotency-Key` (SPEC 3.4) over real TCP: a retry returns the first
//! answer without a second charge or credit, the same key with another
//! request is refused (422), a retry during the first waits for it, and
//! keys survive a restart.

mod common;

use common::*;

#[derive(Debug, Clone, PartialEq)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The headers a client would compare (not the date or the replay mark).
    fn stable_headers(&self) -> Vec<(String, String)> {
        let mut h: Vec<_> = self
            .headers
            .iter()
            .filter(|(n, _)| n != "date" && n != "idempotent-replayed")
            .cloned()
            .collect();
        h.sort();
        h
    }
}

fn post_keyed(url: &str, key: Option<&str>, body: &str) -> Reply {
    let r = client()
        .post(url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(body.to_string());
    send_keyed(r, key)
}

/// Sends `r` with `Idempotency-Key: key` when there is one.
fn send_keyed(mut r: reqwest::blocking::RequestBuilder, key: Option<&str>) -> Reply {
    if let Some(k) = key {
        r = r.header("Idempotency-Key", k);
    }
    let r = r.send().unwrap();
    Reply {
        status: r.status().as_u16(),
        headers: r
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: r.text().unwrap(),
    }
}

const SEND: &str = "action=sendmessage&username=john&password=secret1&recipient=%2B36301111111,%2B447700900123&messagetype=SMS:TEXT&messagedata=hello";

#[test]
fn the_same_key_twice_sends_and_charges_once_and_answers_identically() {
    let (sim, tg) = start_pair(&[], "");
    let url = tg.url("/api");
    let first = post_keyed(&url, Some("order-1"), SEND);
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(xml_all(&first.body, "statuscode"), vec!["0", "0"]);
    assert_eq!(first.header("x-tollgate-cost"), Some("4"));
    assert_eq!(tg.balance("john", "secret1"), "740");
    let again = post_keyed(&url, Some("order-1"), SEND);
    assert_eq!(again.status, first.status);
    assert_eq!(
        again.body, first.body,
        "the same message ids, the same reports"
    );
    assert_eq!(again.stable_headers(), first.stable_headers());
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(sim.sendmessage_count(), 1, "the gateway saw one send");
    assert_eq!(tg.balance("john", "secret1"), "740", "charged once");
    // Without a key, or with another key, it is a new send.
    post_keyed(&url, None, SEND);
    post_keyed(&url, Some("order-2"), SEND);
    assert_eq!(sim.sendmessage_count(), 3);
    assert_eq!(tg.balance("john", "secret1"), "732");
}

#[test]
fn credit_changes_with_a_key_apply_once() {
    let (_sim, tg) = start_pair(&[], "");
    let url = tg.url("/api");
    let add = "action=addcredits&username=admin&password=abc123&useraccount=john&add=10";
    let first = post_keyed(&url, Some("top-up-7"), add);
    assert_eq!(xml_field(&first.body, "balance").as_deref(), Some("754"));
    for _ in 0..3 {
        let again = post_keyed(&url, Some("top-up-7"), add);
        assert_eq!(again.body, first.body);
    }
    assert_eq!(tg.balance("john", "secret1"), "754");
    let set = "action=setcredits&username=admin&password=abc123&useraccount=john&newbalance=100";
    let first = post_keyed(&url, Some("set-1"), set);
    assert_eq!(xml_field(&first.body, "balance").as_deref(), Some("100"));
    post_keyed(&url, None, add);
    let again = post_keyed(&url, Some("set-1"), set);
    assert_eq!(again.body, first.body, "the first answer, not a second set");
    assert_eq!(tg.balance("john", "secret1"), "110");
}

#[test]
fn the_same_key_with_another_request_is_refused() {
    let (sim, tg) = start_pair(&[], "");
    let url = tg.url("/api");
    assert_eq!(post_keyed(&url, Some("k"), SEND).status, 200);
    let other = SEND.replace("hello", "hello again");
    let r = post_keyed(&url, Some("k"), &other);
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(xml_field(&r.body, "errorcode").as_deref(), Some("1006"));
    assert_eq!(sim.sendmessage_count(), 1);
    // The same request in the query string instead of the body is another
    // request too.
    let r = client()
        .get(tg.url(&format!("/api?{SEND}")))
        .header("Idempotency-Key", "k")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    // Keys are per account: admin may use "k" for its own send.
    let admin = SEND.replace(
        "username=john&password=secret1",
        "username=admin&password=abc123",
    );
    assert_eq!(post_keyed(&url, Some("k"), &admin).status, 200);
    assert_eq!(sim.sendmessage_count(), 2);
    // Bad keys are refused before anything runs.
    let r = post_keyed(&url, Some(&"x".repeat(256)), SEND);
    assert_eq!(r.status, 400);
    let r = post_keyed(&url, Some("with space"), SEND);
    assert_eq!(r.status, 400);
    assert_eq!(sim.sendmessage_count(), 2);
}

#[test]
fn a_refusal_that_changed_nothing_frees_the_key() {
    let (sim, tg) = start_pair(&[], "");
    let url = tg.url("/api");
    // Wrong password and insufficient credit: nothing happened; the same
    // key works for the corrected request.
    let wrong = SEND.replace("secret1", "nope");
    let r = post_keyed(&url, Some("retry-me"), &wrong);
    assert_eq!(xml_all(&r.body, "statuscode"), vec!["1003", "1003"]);
    let poor = SEND.replace(
        "username=john&password=secret1",
        "username=poor&password=poor1",
    );
    let r = post_keyed(&url, Some("poor-1"), &poor);
    assert_eq!(xml_all(&r.body, "statuscode"), vec!["1001", "1001"]);
    let ok = post_keyed(&url, Some("retry-me"), SEND);
    assert_eq!(
        xml_all(&ok.body, "statuscode"),
        vec!["0", "0"],
        "{}",
        ok.body
    );
    assert_eq!(sim.sendmessage_count(), 1);
    // Someone with the wrong password never gets the stored answer.
    let r = post_keyed(&url, Some("retry-me"), &wrong);
    assert_eq!(
        xml_all(&r.body, "statuscode"),
        vec!["1003", "1003"],
        "{}",
        r.body
    );
    assert_ne!(r.body, ok.body);
    assert_eq!(r.header("idempotent-replayed"), None);
}

#[test]
fn a_retry_while_the_first_is_in_flight_waits_for_its_answer() {
    let (sim, tg) = start_pair(&["--latency-ms", "700"], "");
    let url = tg.url("/api");
    let threads: Vec<_> = (0..3)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(100 * i));
                post_keyed(&url, Some("same"), SEND)
            })
        })
        .collect();
    let replies: Vec<Reply> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for r in &replies {
        assert_eq!(r.status, 200);
        assert_eq!(r.body, replies[0].body);
    }
    assert_eq!(
        replies
            .iter()
            .filter(|r| r.header("idempotent-replayed").is_some())
            .count(),
        2
    );
    assert_eq!(sim.sendmessage_count(), 1);
    assert_eq!(tg.balance("john", "secret1"), "740");
}

#[test]
fn keys_survive_a_restart() {
    let (sim, mut tg) = start_pair(&[], STORE_YAML);
    let url = tg.url("/api");
    let first = post_keyed(&url, Some("durable-1"), SEND);
    assert_eq!(first.status, 200, "{}", first.body);
    let add = "action=addcredits&username=admin&password=abc123&useraccount=john&add=5";
    let added = post_keyed(&url, Some("durable-2"), add);
    assert_eq!(xml_field(&added.body, "balance").as_deref(), Some("745"));
    assert!(tg
        .store_path()
        .with_file_name("tollgate.idempotency.db")
        .exists());
    let status = tg.stop_with("TERM");
    assert!(status.success(), "{status:?}");
    tg.spawn();
    let again = post_keyed(&tg.url("/api"), Some("durable-1"), SEND);
    assert_eq!(again.status, first.status);
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let again = post_keyed(&tg.url("/api"), Some("durable-2"), add);
    assert_eq!(again.body, added.body);
    assert_eq!(sim.sendmessage_count(), 1);
    assert_eq!(tg.balance("john", "secret1"), "745");
    let other = post_keyed(
        &tg.url("/api"),
        Some("durable-1"),
        &SEND.replace("hello", "x"),
    );
    assert_eq!(other.status, 422);
}

#[test]
fn a_key_whose_request_died_with_the_process_answers_409() {
    // The gateway never answers: the send is in flight when tollgate is
    // killed; after the restart its outcome is unknown, and the key must
    // not run it again.
    let (sim, mut tg) = start_pair(&[], STORE_YAML);
    sim.fault("hang", 1);
    let url = tg.url("/api");
    let t = std::thread::spawn(move || {
        let _ = client()
            .post(url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Idempotency-Key", "lost")
            .body(SEND)
            .send();
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sim.sendmessage_count() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the send never reached the gateway"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    tg.stop_with("KILL");
    let _ = t.join();
    tg.spawn();
    let r = post_keyed(&tg.url("/api"), Some("lost"), SEND);
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(xml_field(&r.body, "errorcode").as_deref(), Some("1010"));
    assert_eq!(sim.sendmessage_count(), 1, "never sent twice");
}

const SOAP_PATH: &str = "/WebServices/2.2/Simple/Account.asmx";

fn soap_give(tg: &Tollgate, key: Option<&str>, amount: &str) -> Reply {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<soap:Envelope xmlns:soap=\"http://schemas.xmlsoap.org/soap/envelope/\"><soap:Body>\
         <SubAccountGiveCredit xmlns=\"http://www.2sms.com/WebServices/2.2/Simple/\"><Username>master</Username><Password>masterpw1</Password>\
         <SubAccount>sub1</SubAccount><AnyTimeBalance>{amount}</AnyTimeBalance><OffPeakBalance>0</OffPeakBalance></SubAccountGiveCredit></soap:Body></soap:Envelope>"
    );
    let r = client()
        .post(tg.url(SOAP_PATH))
        .header("Content-Type", "text/xml; charset=utf-8")
        .header(
            "SOAPAction",
            "\"http://www.2sms.com/WebServices/2.2/Simple/SubAccountGiveCredit\"",
        )
        .body(body);
    send_keyed(r, key)
}

#[test]
fn the_soap_transfer_with_a_key_moves_credit_once() {
    let sim = Sim::start(&[]);
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            accounts: format!(
                "accounts:\n\
                 - {{ name: master, password_hash: '{pw}', anytime: 100 }}\n\
                 - {{ name: sub1, parent: master, password_hash: '{pw}' }}\n",
                pw = password_hash("masterpw1")
            ),
            ..Default::default()
        },
    );
    let first = soap_give(&tg, Some("gift-1"), "10");
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(
        xml_field(&first.body, "ParentAnyTimeBalance").as_deref(),
        Some("90")
    );
    let again = soap_give(&tg, Some("gift-1"), "10");
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let other = soap_give(&tg, Some("gift-1"), "11");
    assert_eq!(other.status, 422, "{}", other.body);
    assert!(other.body.contains("Fault"), "{}", other.body);
    // Without a key: a second transfer.
    let plain = soap_give(&tg, None, "10");
    assert_eq!(
        xml_field(&plain.body, "ParentAnyTimeBalance").as_deref(),
        Some("80")
    );
}
