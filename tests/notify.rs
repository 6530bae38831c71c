//! Low-balance webhooks over real TCP: a crossing below the threshold is
//! POSTed once, signed, from the outbox; going back up re-arms it; an
//! account already below at start is not notified again; a receiver that
//! fails is retried until it answers 2xx.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::tls_receiver::{ca, write_ca, TlsReceiver};
use common::*;

const SECRET: &str = "whsec-0123456789abcdef";

/// A webhook receiver that answers `fail_first` calls with 500, then 200.
fn receiver(fail_first: usize) -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/hooks/low-balance",
        listener.local_addr().unwrap()
    );
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let Some(call) = read_request(&mut stream).filter(|r| r.method == "POST") else {
                continue;
            };
            let status = if n < fail_first {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            if n >= fail_first {
                seen.lock().unwrap().push(call);
            }
            let _ = stream.write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    (url, calls)
}

fn config(url: &str, extra: &str) -> String {
    format!(
        "notify: {{ low_balance: {{ url: '{url}', secret: {SECRET}, default_threshold: 743.5, accounts: {{ admin: off }} }} }}\n\
         outbox: {{ retry_initial_ms: 100, retry_max_ms: 200 }}\n{extra}"
    )
}

fn send(tg: &Tollgate) {
    let (status, body) = get(&tg.url(
        "/api?action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagedata=hi",
    ));
    assert_eq!(status, 200, "{body}");
}

fn wait_calls(calls: &Arc<Mutex<Vec<Received>>>, n: usize) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = calls.lock().unwrap().clone();
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_crossing_is_notified_once_signed_and_going_back_up_rearms_it() {
    let (url, calls) = receiver(0);
    let (_sim, tg) = start_pair(&[], &config(&url, STORE_YAML));
    // 744 → 743: below 743.5.
    send(&tg);
    let got = wait_calls(&calls, 1);
    assert_eq!(got.len(), 1, "{got:?}");
    let call = &got[0];
    let v = call.json();
    assert_eq!(v["event"], "low_balance");
    assert_eq!(v["account"], "john");
    assert_eq!(v["available"], "743");
    assert_eq!(v["threshold"], "743.5");
    assert_eq!(call.header("X-Tollgate-Event"), Some("low_balance"));
    assert_eq!(call.header("X-Tollgate-Delivery-Id"), v["id"].as_str());
    let sig = call.header("X-Tollgate-Signature").unwrap();
    assert!(
        tollgate::notify::webhook::verify(SECRET.as_bytes(), sig, &call.body),
        "signature {sig} does not verify"
    );
    assert!(!tollgate::notify::webhook::verify(
        b"another-secret-xx",
        sig,
        &call.body
    ));
    // Still below: no second notification.
    send(&tg);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(calls.lock().unwrap().len(), 1);
    // Back up (addcredits) re-arms; setcredits below crosses again.
    let (_, body) =
        get(&tg
            .url("/api?action=addcredits&username=admin&password=abc123&useraccount=john&add=10"));
    assert!(body.contains("752"), "{body}");
    let (_, body) = get(&tg.url(
        "/api?action=setcredits&username=admin&password=abc123&useraccount=john&newbalance=5",
    ));
    assert!(body.contains("<balance>5</balance>"), "{body}");
    let got = wait_calls(&calls, 2);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1].json()["available"], "5");
    assert_ne!(got[0].json()["id"], got[1].json()["id"]);
    // The admin account, turned off, never notified although it moved.
    assert!(got.iter().all(|c| c.json()["account"] == "john"));
    assert!(
        !tg.log().contains(SECRET),
        "the webhook secret reached the log"
    );
    let m = tg.metric_value("tollgate_low_balance_notifications_total{result=\"queued\"}");
    assert_eq!(m, 2.0);
}

#[test]
fn a_failing_receiver_is_retried_and_a_restart_repeats_nothing() {
    let (url, calls) = receiver(2);
    let (_sim, mut tg) = start_pair(&[], &config(&url, STORE_YAML));
    send(&tg);
    // Two 500s, then the 200: one delivered call.
    let got = wait_calls(&calls, 1);
    assert_eq!(got.len(), 1, "{got:?}");
    // Restart on the same store: john is still below, already notified.
    tg.stop_with("TERM");
    tg.spawn();
    send(&tg);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(calls.lock().unwrap().len(), 1, "a restart notified again");
}

#[test]
fn a_webhook_goes_to_https_receivers_the_configured_ca_signed() {
    let trusted = ca("tollgate webhook test CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_ca(dir.path(), &trusted);
    let good = TlsReceiver::start(&trusted);
    let stranger = TlsReceiver::start(&ca("some other CA"));
    // One account's webhook goes to the trusted receiver; a second
    // tollgate's to one whose certificate that CA did not sign.
    let tls = |url: &str| {
        config(url, STORE_YAML).replace(
            "outbox: { ",
            &format!("outbox: {{ ca_file: {}, ", ca_file.display()),
        )
    };
    let (_sim, tg) = start_pair(&[], &tls(&good.url("/hooks/low-balance")));
    let (_sim2, refused) = start_pair(&[], &tls(&stranger.url("/hooks/low-balance")));
    send(&tg);
    send(&refused);
    wait_until(|| good.received().len() == 1, "the webhook over https");
    let call = &good.received()[0];
    assert_eq!(call.target, "/hooks/low-balance");
    let v = call.json();
    assert_eq!(
        (v["account"].as_str(), v["available"].as_str()),
        (Some("john"), Some("743"))
    );
    let sig = call.header("X-Tollgate-Signature").unwrap();
    assert!(tollgate::notify::webhook::verify(
        SECRET.as_bytes(),
        sig,
        &call.body
    ));
    // The stranger's certificate is refused: retried, never delivered.
    wait_until(
        || {
            refused.metric_value(
                "tollgate_outbox_attempts_total{kind=\"low_balance\",result=\"failed\"}",
            ) >= 2.0
        },
        "failed attempts at the untrusted receiver",
    );
    assert!(stranger.received().is_empty());
}

#[test]
fn a_webhook_url_without_a_host_or_a_short_secret_is_a_config_error() {
    for (notify, key) in [
        (
            "{ low_balance: { url: 'https:///x', secret: whsec-0123456789abcdef } }",
            "notify.low_balance.url",
        ),
        (
            "{ low_balance: { url: 'http://hooks.example/x', secret: short } }",
            "notify.low_balance.secret",
        ),
    ] {
        let out = check_config(&format!("notify: {notify}"));
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{err}");
        assert!(!err.contains("whsec-0123456789abcdef"), "{err}");
    }
}
