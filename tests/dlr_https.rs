//! `https://` client report URLs: the outbox relays a delivery report to a
//! local TLS receiver whose certificate a test CA signed (`outbox.ca_file`),
//! and refuses one whose certificate that CA did not sign (retried, the
//! error says why). Real `tollgate` and `ozeki-sim` over TCP; the
//! certificates are generated here as `tests/tls.rs` does.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslAcceptor, SslMethod};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509NameBuilder, X509};

fn ec_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn name(cn: &str) -> openssl::x509::X509Name {
    let mut n = X509NameBuilder::new().unwrap();
    n.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    n.build()
}

struct Ca {
    cert: X509,
    key: PKey<Private>,
}

fn ca(cn: &str) -> Ca {
    let key = ec_key();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&Asn1Integer::from_bn(&BigNum::from_u32(1).unwrap()).unwrap())
        .unwrap();
    b.set_subject_name(&name(cn)).unwrap();
    b.set_issuer_name(&name(cn)).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
        .unwrap();
    b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
        .unwrap();
    b.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()
            .unwrap(),
    )
    .unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    Ca {
        cert: b.build(),
        key,
    }
}

/// A server certificate for `localhost` signed by `ca`.
fn leaf(ca: &Ca) -> (X509, PKey<Private>) {
    let key = ec_key();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&Asn1Integer::from_bn(&BigNum::from_u32(2).unwrap()).unwrap())
        .unwrap();
    b.set_subject_name(&name("localhost")).unwrap();
    b.set_issuer_name(ca.cert.subject_name()).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
        .unwrap();
    let san = SubjectAlternativeName::new()
        .dns("localhost")
        .build(&b.x509v3_context(Some(&ca.cert), None))
        .unwrap();
    b.append_extension(san).unwrap();
    b.append_extension(ExtendedKeyUsage::new().server_auth().build().unwrap())
        .unwrap();
    b.sign(&ca.key, MessageDigest::sha256()).unwrap();
    (b.build(), key)
}

fn write_ca(dir: &Path, ca: &Ca) -> PathBuf {
    let p = dir.join("relay-ca.pem");
    std::fs::write(&p, ca.cert.to_pem().unwrap()).unwrap();
    p
}

/// A TLS receiver on 127.0.0.1: records each request target, answers 200.
struct TlsReceiver {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl TlsReceiver {
    fn start(ca: &Ca) -> TlsReceiver {
        let (cert, key) = leaf(ca);
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
        b.set_certificate(&cert).unwrap();
        b.set_private_key(&key).unwrap();
        let acceptor = b.build();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let Ok(mut tls) = acceptor.accept(stream) else {
                    continue;
                };
                let mut line = String::new();
                {
                    let mut reader = BufReader::new(&mut tls);
                    if reader.read_line(&mut line).is_err() {
                        continue;
                    }
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                            break;
                        }
                    }
                }
                s.lock()
                    .unwrap()
                    .push(line.split_whitespace().nth(1).unwrap_or("").to_string());
                let _ = write!(
                    tls,
                    "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = tls.shutdown();
            }
        });
        TlsReceiver { addr, seen }
    }

    fn template(&self) -> String {
        format!(
            "https://localhost:{}/r?id=$messageid&st=$deliverystatus",
            self.addr.port()
        )
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

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
    send(&good.template());
    send(&bad.template());
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
