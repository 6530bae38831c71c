//! The service driven directly, one way: a [`Request`] in, a [`Reply`]
//! out, with a fake gateway behind the [`Gateway`] trait and the app's
//! clock in the test's hands. (The real binary over real TCP is tested
//! under `tests/`.)

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use pingora::http::{RequestHeader, ResponseHeader};

use super::*;
use crate::clock::ManualClock;
use crate::config::accounts::hash_password;
use crate::ledger::{Bucket, MemorySink};
use crate::store::{SqliteStore, WriteBehind, WriterConfig};
use crate::upstream::Forwarded;

/// A gateway that answers every request with `answer` and records what it
/// was sent.
struct FakeGateway {
    answer: Box<dyn Fn(&RequestHeader) -> Forwarded + Send + Sync>,
    seen: Mutex<Vec<String>>,
}

#[async_trait]
impl Gateway for FakeGateway {
    async fn forward(
        &self,
        client: &RequestHeader,
        _body: Bytes,
        _client_ip: Option<IpAddr>,
    ) -> Forwarded {
        self.seen.lock().push(client.uri.to_string());
        (self.answer)(client)
    }
}

fn ok(body: &str) -> Forwarded {
    let mut header = ResponseHeader::build(200, None).unwrap();
    header
        .insert_header("Content-Type", "application/xml")
        .unwrap();
    Forwarded::Answered {
        header: Box::new(header),
        body: Bytes::from(body.to_string()),
        latency: Duration::from_millis(1),
    }
}

/// An accept report for every recipient the request names.
fn accept_all(head: &RequestHeader) -> Forwarded {
    let query = head.uri.query().unwrap_or("");
    let recipients: Vec<String> = query
        .split('&')
        .filter_map(|p| p.strip_prefix("recipient="))
        .flat_map(|list| {
            percent_encoding::percent_decode_str(list)
                .decode_utf8_lossy()
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    let reports: String = recipients
        .iter()
        .map(|r| {
            format!(
                "<acceptreport><statuscode>0</statuscode><statusmessage>ok</statusmessage>\
                 <messageid>M</messageid><recipient>{r}</recipient></acceptreport>"
            )
        })
        .collect();
    ok(&format!(
        "<response><action>sendmessage</action><data>{reports}</data></response>"
    ))
}

struct Harness {
    app: App,
    clock: Arc<ManualClock>,
    gateway: Arc<FakeGateway>,
    _dir: tempfile::TempDir,
}

/// Monday 2026-11-30 12:00 UTC.
const MONDAY_NOON_MS: i64 = 1_796_040_000_000;

fn harness(extra_yaml: &str, tariffs: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tariffs.yaml"), tariffs).unwrap();
    std::fs::write(
        dir.path().join("accounts.yaml"),
        format!(
            "accounts:\n\
             - {{ name: admin, role: admin, password_hash: '{}', anytime: 1000 }}\n\
             - {{ name: john, role: user, password_hash: '{}', anytime: 10, offpeak: 5 }}\n",
            hash_password("abc123"),
            hash_password("secret1"),
        ),
    )
    .unwrap();
    let path = dir.path().join("tollgate.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0\nupstream: {{ address: 127.0.0.1:9 }}\n\
             tariffs: tariffs.yaml\naccounts: accounts.yaml\n{extra_yaml}\n"
        ),
    )
    .unwrap();
    let config = Config::load(&path).unwrap();
    let clock = Arc::new(ManualClock::new(MONDAY_NOON_MS));
    let mut app =
        crate::server::build_app_with_clock(config, Arc::new(MemorySink::new()), clock.clone())
            .unwrap();
    let gateway = Arc::new(FakeGateway {
        answer: Box::new(accept_all),
        seen: Mutex::new(Vec::new()),
    });
    app.gateway = gateway.clone();
    Harness {
        app,
        clock,
        gateway,
        _dir: dir,
    }
}

const TARIFFS: &str = "default_country_code: \"36\"\ndefault_price: 1\nprices:\n  \"36\": 1\n";

/// Serves `method path?query` with `headers` and `body` from `ip`.
async fn serve(
    app: &App,
    door: Door,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
    ip: &str,
) -> Reply {
    let method = if body.is_empty() { "GET" } else { "POST" };
    let mut head = RequestHeader::build(method, target.as_bytes(), None).unwrap();
    for (n, v) in headers {
        head.insert_header(n.to_string(), *v).unwrap();
    }
    handle(
        app,
        Request {
            door,
            head: &head,
            body: Bytes::from(body.to_string()),
            client_ip: Some(ip.parse().unwrap()),
            request_id: app.new_request_id(),
            limited: None,
            params: None,
        },
    )
    .await
}

fn balance(app: &App, name: &str) -> (i64, i64) {
    let v = app.ledger.account(name).unwrap();
    (v.anytime.available_milli(), v.offpeak.available_milli())
}

#[tokio::test]
async fn a_send_is_priced_reserved_forwarded_and_settled_in_one_call() {
    let h = harness("", TARIFFS);
    let reply = serve(
        &h.app,
        Door::Ozeki,
        "/api?action=sendmessage&username=john&password=secret1&recipient=%2B3611,%2B3622&messagedata=hi",
        &[],
        "",
        "10.0.0.1",
    )
    .await;
    assert_eq!(reply.outcome, Outcome::Settled);
    assert_eq!(reply.header.headers.get("x-tollgate-cost").unwrap(), "2");
    assert_eq!(reply.log.cost_milli, Some(2000));
    assert!(reply.log.reservation_id.is_some());
    assert_eq!(reply.log.action, "sendmessage");
    assert_eq!(h.gateway.seen.lock().len(), 1);
    assert_eq!(balance(&h.app, "john"), (8_000, 5_000));
}

#[tokio::test]
async fn a_refused_send_says_what_it_would_have_cost() {
    let h = harness("", TARIFFS);
    let reply = serve(
        &h.app,
        Door::Ozeki,
        "/api?action=sendmessage&username=john&password=secret1&recipient=%2B3611&messagedata=x",
        &[],
        "",
        "10.0.0.1",
    )
    .await;
    assert_eq!(reply.outcome, Outcome::Settled);
    // 20 recipients at 1 credit: john has 9 left.
    let many: Vec<String> = (0..20).map(|i| format!("%2B36{i:08}")).collect();
    let target = format!(
        "/api?action=sendmessage&username=john&password=secret1&recipient={}&messagedata=x",
        many.join(",")
    );
    let reply = serve(&h.app, Door::Ozeki, &target, &[], "", "10.0.0.1").await;
    assert_eq!(
        reply.outcome,
        Outcome::Refused(crate::error::ErrorCode::InsufficientCredit)
    );
    assert_eq!(reply.log.cost_milli, Some(20_000));
    assert_eq!(
        h.gateway.seen.lock().len(),
        1,
        "the refused send stayed here"
    );
}

#[tokio::test]
async fn off_peak_pricing_follows_the_apps_clock() {
    let tariffs = "default_country_code: \"36\"\ndefault_price: 1\n\
        offpeak: { timezone: UTC, windows: [ { days: [mon], from: \"20:00\", to: \"24:00\" } ] }\n";
    let h = harness("", tariffs);
    let send =
        "/api?action=sendmessage&username=john&password=secret1&recipient=%2B3611&messagedata=x";
    // Noon: peak, the any-time bucket pays.
    serve(&h.app, Door::Ozeki, send, &[], "", "10.0.0.1").await;
    assert_eq!(balance(&h.app, "john"), (9_000, 5_000));
    // Nine hours later: inside the window, off-peak pays first.
    h.clock.advance(9 * 3_600_000);
    serve(&h.app, Door::Ozeki, send, &[], "", "10.0.0.1").await;
    assert_eq!(balance(&h.app, "john"), (9_000, 4_000));
}

/// SOAP `SubAccountGiveCredit` with `Idempotency-Key: k`.
fn give_credit(password: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\
         <soap:Envelope xmlns:soap=\"http://schemas.xmlsoap.org/soap/envelope/\"><soap:Body>\
         <SubAccountGiveCredit xmlns=\"http://www.2sms.com/WebServices/2.2/Simple/\">\
         <Username>admin</Username><Password>{password}</Password><SubAccount>kid</SubAccount>\
         <AnyTimeBalance>1</AnyTimeBalance><OffPeakBalance>0</OffPeakBalance>\
         </SubAccountGiveCredit></soap:Body></soap:Envelope>"
    )
}

#[tokio::test]
async fn a_locked_out_caller_learns_nothing_from_an_idempotent_replay() {
    let h = harness(
        "limits: { auth_lockout: { failures: 3, window_s: 60, lock_s: 300 } }",
        TARIFFS,
    );
    h.app
        .ledger
        .open_account("kid", Some("admin"), crate::ledger::Role::User, None)
        .unwrap();
    let path = "/WebServices/2.2/Simple/Account.asmx";
    let headers = [
        ("Content-Type", "text/xml; charset=utf-8"),
        (
            "SOAPAction",
            "\"http://www.2sms.com/WebServices/2.2/Simple/SubAccountGiveCredit\"",
        ),
        ("Idempotency-Key", "k"),
    ];
    let ip = "10.0.0.7";
    let first = serve(
        &h.app,
        Door::Soap,
        path,
        &headers,
        &give_credit("abc123"),
        ip,
    )
    .await;
    assert_eq!(first.outcome, Outcome::Ok, "{:?}", first.body);
    // Three wrong passwords lock the pair out.
    for _ in 0..3 {
        let r = serve(
            &h.app,
            Door::Soap,
            path,
            &headers[..2],
            &give_credit("wrong"),
            ip,
        )
        .await;
        assert_eq!(
            r.outcome,
            Outcome::Refused(crate::error::ErrorCode::AuthFailed)
        );
    }
    // The retry with the right password is refused exactly like a wrong
    // one: the stored answer is not shown to a locked pair.
    let right = serve(
        &h.app,
        Door::Soap,
        path,
        &headers,
        &give_credit("abc123"),
        ip,
    )
    .await;
    let wrong = serve(&h.app, Door::Soap, path, &headers, &give_credit("nope"), ip).await;
    let limited = Outcome::Refused(crate::error::ErrorCode::RateLimited);
    assert_eq!((right.outcome, wrong.outcome), (limited, limited));
    assert_eq!(right.body, wrong.body);
    assert_eq!(right.status(), wrong.status());
    assert_eq!(balance(&h.app, "kid"), (1_000, 0), "moved once");
    // From another address the key replays the first answer.
    let replay = serve(
        &h.app,
        Door::Soap,
        path,
        &headers,
        &give_credit("abc123"),
        "10.0.0.8",
    )
    .await;
    assert_eq!(replay.outcome, Outcome::IdempotentReplay);
    assert_eq!(replay.body, first.body);
}

#[tokio::test]
async fn an_adopted_balance_is_imported_once_even_when_the_store_is_behind() {
    let h = harness(
        "auth: { verify_upstream: true, adopt_balance: true }",
        TARIFFS,
    );
    let mut app = h.app;
    // A store that is behind: queue cap 1, already holding 2 entries, writer
    // not started — admission times out.
    let dir = tempfile::tempdir().unwrap();
    let store =
        SqliteStore::open(&dir.path().join("s.db"), crate::config::Durability::Sync).unwrap();
    let writer = Arc::new(WriteBehind::new(
        Box::new(store),
        WriterConfig {
            queue_max_entries: 1,
            batch_max_entries: 1,
            ack_timeout: Duration::from_millis(50),
            ..WriterConfig::default()
        },
        app.metrics.clone(),
    ));
    let entries = [
        crate::ledger::Entry::for_test(1, crate::ledger::EntryKind::Add, "admin", 1, None),
        crate::ledger::Entry::for_test(2, crate::ledger::EntryKind::Add, "admin", 1, None),
    ];
    crate::ledger::EntrySink::record(&*writer, &entries);
    app.store = Some(writer.clone());
    app.gateway = Arc::new(FakeGateway {
        answer: Box::new(|_| {
            ok("<response><action>getcredits</action><data><account>\
                <username>newbie</username><balance>12</balance></account></data></response>")
        }),
        seen: Mutex::new(Vec::new()),
    });
    let ask = "/api?action=getcredits&username=newbie&password=pw";
    let first = serve(&app, Door::Ozeki, ask, &[], "", "10.0.0.1").await;
    assert_eq!(
        first.outcome,
        Outcome::Refused(crate::error::ErrorCode::UpstreamUnavailable)
    );
    assert!(
        app.ledger.account("newbie").is_none(),
        "not opened half-way"
    );
    // The store catches up; the retry adopts the account with its balance.
    writer.start(std::sync::Weak::<crate::ledger::Ledger>::new());
    let second = serve(&app, Door::Ozeki, ask, &[], "", "10.0.0.1").await;
    assert_eq!(second.outcome, Outcome::Ok, "{:?}", second.body);
    assert_eq!(balance(&app, "newbie"), (12_000, 0));
    let third = serve(&app, Door::Ozeki, ask, &[], "", "10.0.0.1").await;
    assert_eq!(third.outcome, Outcome::Ok);
    assert_eq!(balance(&app, "newbie"), (12_000, 0), "imported once");
    let _ = Bucket::Anytime;
}
