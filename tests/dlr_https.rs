//! `https://` client report URLs: the outbox relays a delivery report to a
//! local TLS receiver whose certificate a test CA signed (`outbox.ca_file`),
//! and refuses one whose certificate that CA did not sign (retried, the
//! error says why). Real `tollgate` and `ozeki-sim` over TCP.

mod common;

use std::time::Duration;

use common::tls_receiver::{ca, write_ca, TlsReceiver};
use common::*;

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[test]
fn reports_are_relayed_to_https_urls_whose_certificate_the_configured_ca_signed() {
    let trusted = ca("tollgate relay test CA");
    let stranger = ca("some other CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_ca(dir.path(), &trusted);
    let good = TlsReceiver::start(&trusted);
    let bad = TlsReceiver::start(&stranger);
    let sim = Sim::start(&[]);
    let dlr_port = free_port();
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: format!(
                "{STORE_YAML}\
                 dlr: {{ enabled: true, listen: 127.0.0.1:{dlr_port} }}\n\
                 outbox: {{ retry_initial_ms: 50, retry_max_ms: 200, ca_file: {} }}\n",
                ca_file.display()
            ),
            ..Default::default()
        },
    );
    let send = |reporturl: &str| {
        let (status, body) = get(&tg.url(&format!(
            "/api?action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagedata=hi&reporturl={}",
            enc(reporturl)
        )));
        assert_eq!(status, 200, "{body}");
    };
    send(&good.url("/r?id=$messageid&st=$deliverystatus"));
    send(&bad.url("/r?id=$messageid&st=$deliverystatus"));
    wait_until(|| good.seen().len() == 1, "the report relayed over https");
    assert!(good.seen()[0].starts_with("/r?id="), "{:?}", good.seen());
    assert!(good.seen()[0].contains("st=delivered"), "{:?}", good.seen());
    // The other certificate is refused: retried, never delivered, and the
    // item says why.
    wait_until(
        || {
            tg.metric_value("tollgate_outbox_attempts_total{kind=\"dlr_relay\",result=\"failed\"}")
                >= 2.0
        },
        "failed attempts at the untrusted receiver",
    );
    assert!(bad.seen().is_empty());
    let pending = tg.admin_get("/admin/outbox?state=pending");
    let errors: Vec<String> = pending["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["last_error"].as_str().map(str::to_string))
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("certificate refused")),
        "{errors:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(good.seen().len(), 1, "relayed once");
}

#[test]
fn a_missing_outbox_ca_file_is_refused_by_check() {
    let out = check_config("outbox: { ca_file: /nonexistent/ca.pem }");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("outbox.ca_file"), "{text}");
}
