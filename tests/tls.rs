//! Transport security with real TLS clients and the real binary: the HTTPS
//! client listener (curl, Python's `ssl`, `openssl s_client`), TLS 1.1 and
//! lower refused, the handshake under the header deadline and the
//! per-address cap, certificate reload without dropping a connection (and a
//! bad pair refused), and HTTPS to the gateway (`ozeki-sim` behind a TLS
//! terminator in this test): an expired, wrong-host or self-signed
//! certificate refused with nothing charged, and the logged opt-out.
//!
//! Certificates are made here with the `openssl` crate (the OpenSSL
//! tollgate links).

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tls_receiver::{ca, ec_key, name, write_ca, Ca};
use common::*;
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslStream};
use openssl::x509::extension::{ExtendedKeyUsage, SubjectAlternativeName};
use openssl::x509::X509;

const SEND: &str = "/api?action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagedata=hi";

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// What a server certificate says.
struct Leaf<'a> {
    serial: u32,
    /// DNS names; the certificate also names IP 127.0.0.1 when `ip` is set.
    dns: &'a [&'a str],
    ip: bool,
    not_before_s: i64,
    not_after_s: i64,
}

impl Leaf<'_> {
    fn valid(serial: u32) -> Leaf<'static> {
        Leaf {
            serial,
            dns: &["localhost"],
            ip: true,
            not_before_s: now_s() - 3600,
            not_after_s: now_s() + 30 * 86_400,
        }
    }
}

/// A server certificate and its key, signed by `ca` (self-signed without).
fn leaf(ca: Option<&Ca>, spec: &Leaf) -> (X509, PKey<Private>) {
    let key = ec_key();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&Asn1Integer::from_bn(&BigNum::from_u32(spec.serial).unwrap()).unwrap())
        .unwrap();
    let cn = spec.dns.first().copied().unwrap_or("server");
    b.set_subject_name(&name(cn)).unwrap();
    b.set_issuer_name(ca.map_or(&*name(cn), |c| c.cert.subject_name()))
        .unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::from_unix(spec.not_before_s).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::from_unix(spec.not_after_s).unwrap())
        .unwrap();
    let mut san = SubjectAlternativeName::new();
    for d in spec.dns {
        san.dns(d);
    }
    if spec.ip {
        san.ip("127.0.0.1");
    }
    let san = san
        .build(&b.x509v3_context(ca.map(|c| &*c.cert), None))
        .unwrap();
    b.append_extension(san).unwrap();
    b.append_extension(ExtendedKeyUsage::new().server_auth().build().unwrap())
        .unwrap();
    b.sign(ca.map_or(&key, |c| &c.key), MessageDigest::sha256())
        .unwrap();
    (b.build(), key)
}

/// Writes `cert` and `key` as PEM files under `dir` named `stem.crt` and
/// `stem.key`, each by a rename over the old file (as deploy tools do).
fn write_pair(dir: &Path, stem: &str, cert: &X509, key: &PKey<Private>) -> (PathBuf, PathBuf) {
    let c = dir.join(format!("{stem}.crt"));
    let k = dir.join(format!("{stem}.key"));
    replace_file(&k, &key.private_key_to_pem_pkcs8().unwrap());
    replace_file(&c, &cert.to_pem().unwrap());
    (c, k)
}

fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// The real TLS clients these tests drive (`openssl`, `curl`, `python3`),
/// installed from Debian's packages when missing (`common::ensure_installed`).
fn ensure_tls_clients() {
    ensure_installed(&[
        ("openssl", "version", "openssl"),
        ("curl", "--version", "curl"),
        ("python3", "--version", "python3"),
    ]);
}

/// A TLS connection verified against `ca_file` for 127.0.0.1.
fn tls_connect(addr: SocketAddr, ca_file: &Path) -> SslStream<TcpStream> {
    let mut b = SslConnector::builder(SslMethod::tls()).unwrap();
    b.set_ca_file(ca_file).unwrap();
    let connector = b.build();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut conf = connector.configure().unwrap();
    conf.set_use_server_name_indication(false);
    conf.connect("127.0.0.1", tcp).expect("TLS handshake")
}

fn peer_serial(s: &SslStream<TcpStream>) -> String {
    s.ssl()
        .peer_certificate()
        .unwrap()
        .serial_number()
        .to_bn()
        .unwrap()
        .to_hex_str()
        .unwrap()
        .to_string()
}

/// The serial of the certificate a new handshake gets.
fn served_serial(addr: SocketAddr, ca_file: &Path) -> String {
    peer_serial(&tls_connect(addr, ca_file))
}

fn keep_alive_get(s: &mut SslStream<TcpStream>, path: &str) -> RawAnswer {
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    s.flush().unwrap();
    read_answer(s)
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `openssl s_client` with `args`, sending `input` and closing.
fn s_client(addr: SocketAddr, args: &[&str], input: &str) -> (bool, String) {
    use std::process::Stdio;
    let mut child = Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client (apt-get install openssl)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn python(script: &str, args: &[&str]) -> (bool, String) {
    run(Command::new("python3").arg("-c").arg(script).args(args))
}

// ---------------------------------------------------------------------------
// Set-up
// ---------------------------------------------------------------------------

/// A tollgate with an HTTPS listener (beside the plain one) serving a
/// certificate for 127.0.0.1/localhost signed by a test CA.
struct TlsTollgate {
    tg: Tollgate,
    sim: Sim,
    tls: SocketAddr,
    ca: Ca,
    ca_file: PathBuf,
    certs: tempfile::TempDir,
}

fn start_tls(extra_yaml: &str) -> TlsTollgate {
    ensure_tls_clients();
    let certs = tempfile::tempdir().unwrap();
    let ca = ca("tollgate test CA");
    let ca_file = write_ca(certs.path(), &ca);
    let (cert, key) = leaf(Some(&ca), &Leaf::valid(1));
    let (cert_file, key_file) = write_pair(certs.path(), "server", &cert, &key);
    let port = free_port();
    let tls: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (sim, tg) = start_pair(
        &[],
        &format!(
            "tls: {{ listen: {tls}, cert: {}, key: {} }}\n{extra_yaml}",
            cert_file.display(),
            key_file.display()
        ),
    );
    TlsTollgate {
        tg,
        sim,
        tls,
        ca,
        ca_file,
        certs,
    }
}

// ---------------------------------------------------------------------------
// The client listener
// ---------------------------------------------------------------------------

#[test]
fn curl_python_and_openssl_s_client_send_over_https() {
    let t = start_tls("");
    let url = |path: &str| format!("https://{}{path}", t.tls);

    // curl, verifying the certificate against the test CA.
    let (ok, out) = run(Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&t.ca_file)
        .args(["-w", "\n%{http_code} %{ssl_verify_result}"])
        .arg(url(SEND)));
    assert!(ok, "curl failed: {out}");
    assert!(out.ends_with("\n200 0"), "{out}");
    assert!(out.contains("<statuscode>"), "{out}");
    assert_eq!(t.sim.sendmessage_count(), 1);
    assert_eq!(t.tg.balance("john", "secret1"), "743");

    // curl without the CA refuses the server: the certificate is checked.
    let (ok, out) = run(Command::new("curl").args(["-sS"]).arg(url(SEND)));
    assert!(!ok, "curl trusted an unknown CA: {out}");

    // Python's ssl, default (verifying) context.
    let script = r#"
import http.client, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
c = http.client.HTTPSConnection("127.0.0.1", int(sys.argv[2]), context=ctx)
c.request("GET", sys.argv[3])
r = c.getresponse()
print(r.status, c.sock.version(), r.getheader("Server"))
print(r.read().decode())
"#;
    let (ok, out) = python(
        script,
        &[
            t.ca_file.to_str().unwrap(),
            &t.tls.port().to_string(),
            "/api?action=getcredits&username=john&password=secret1",
        ],
    );
    assert!(ok, "python failed: {out}");
    assert!(out.starts_with("200 TLSv1.3"), "{out}");
    assert!(out.contains("<balance>743</balance>"), "{out}");

    // openssl s_client, TLS 1.2 and 1.3, verified.
    for version in ["-tls1_2", "-tls1_3"] {
        let (ok, out) = s_client(
            t.tls,
            &[
                version,
                "-CAfile",
                t.ca_file.to_str().unwrap(),
                "-verify_return_error",
                "-verify_ip",
                "127.0.0.1",
                "-ign_eof",
            ],
            "GET /api?action=getcredits&username=john&password=secret1 HTTP/1.1\r\n\
             Host: 127.0.0.1\r\nConnection: close\r\n\r\n",
        );
        assert!(ok, "s_client {version} failed: {out}");
        assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
        assert!(out.contains("HTTP/1.1 200"), "{out}");
        assert!(out.contains("<balance>743</balance>"), "{out}");
    }
    // ALPN: HTTP/1.1 only (a client offering h2 gets http/1.1).
    let (ok, out) = s_client(
        t.tls,
        &[
            "-alpn",
            "h2,http/1.1",
            "-CAfile",
            t.ca_file.to_str().unwrap(),
        ],
        "",
    );
    assert!(ok, "{out}");
    assert!(out.contains("ALPN protocol: http/1.1"), "{out}");

    // The plain listener still answers beside it.
    assert_eq!(
        get(&t
            .tg
            .url("/api?action=getcredits&username=john&password=secret1"))
        .0,
        200
    );
}

#[test]
fn answers_over_tls_carry_the_gateways_server_header_too() {
    let t = start_tls("");
    let server = "OzekiNG/3.0.1 Microsoft-HTTPAPI/1.0";
    for (request, status) in [
        (
            "GET /api?action=getcredits&username=john&password=secret1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            200,
        ),
        // pingora's own answers, rewritten on the decrypted stream.
        ("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
        ("CONNECT x:1 HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    ] {
        let mut s = tls_connect(t.tls, &t.ca_file);
        s.write_all(request.as_bytes()).unwrap();
        let a = read_answer(&mut s);
        assert_eq!(a.status, status, "{request:?}: {a:?}");
        assert_eq!(a.header("server").as_deref(), Some(server), "{a:?}");
    }
    // Plain HTTP sent to the TLS port: a failed handshake, no answer.
    let mut plain = TcpStream::connect(t.tls).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain
        .write_all(b"GET /api?action=getcredits HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut rest);
    assert!(
        !rest.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
    wait_until(
        || {
            t.tg.metric_value("tollgate_tls_handshake_failures_total{reason=\"error\"}") >= 1.0
        },
        "the plain request counted as a failed handshake",
    );
}

#[test]
fn tls_1_1_and_lower_are_refused() {
    let t = start_tls("");
    let failures = || {
        t.tg.metric_value("tollgate_tls_handshake_failures_total{reason=\"error\"}")
    };
    assert_eq!(failures(), 0.0);
    for version in ["-tls1_1", "-tls1"] {
        // SECLEVEL=0: the client itself would allow the old protocol, so
        // the refusal is the server's (its protocol_version alert).
        let (ok, out) = s_client(t.tls, &[version, "-cipher", "DEFAULT@SECLEVEL=0"], "");
        assert!(!ok, "{version} was accepted: {out}");
        assert!(
            out.contains("alert protocol version") || out.contains("unsupported protocol"),
            "{version}: {out}"
        );
        assert!(!out.contains("Server certificate"), "{out}");
    }
    let script = r#"
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_ciphers("DEFAULT@SECLEVEL=0")
ctx.minimum_version = ssl.TLSVersion.TLSv1
ctx.maximum_version = ssl.TLSVersion[sys.argv[2]]
try:
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))))
    print("CONNECTED", s.version())
except ssl.SSLError as e:
    print("REFUSED", e)
"#;
    let port = t.tls.port().to_string();
    let (_, out) = python(script, &[&port, "TLSv1_1"]);
    assert!(out.starts_with("REFUSED"), "{out}");
    let (_, out) = python(script, &[&port, "TLSv1_2"]);
    assert!(out.starts_with("CONNECTED TLSv1.2"), "{out}");
    wait_until(|| failures() >= 3.0, "three refused handshakes counted");
}

#[test]
fn a_silent_client_is_closed_at_the_header_deadline_and_tls_counts_against_the_cap() {
    // A 3 s deadline: the refusals below must happen before it, which takes
    // a few hundred ms on a machine busy with other tests.
    let t = start_tls("downstream: { header_timeout_ms: 3000, max_connections_per_ip: 2 }\n");
    // Two connections to the TLS port that never send a ClientHello hold
    // the address's two places: the plain listener refuses a third.
    let started = Instant::now();
    let mut silent: Vec<TcpStream> = (0..2)
        .map(|_| {
            let s = TcpStream::connect(t.tls).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let refused = raw_exchange(
        t.tg.addr,
        b"GET /api?action=getcredits&username=john&password=secret1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(refused.status, 503, "{refused:?}");
    // A third on the TLS port is closed at once, without a plain answer.
    let mut third = TcpStream::connect(t.tls).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(std::io::Read::read(&mut third, &mut buf).unwrap_or(0), 0);
    assert!(started.elapsed() < Duration::from_millis(2900));
    assert_eq!(
        t.tg.metric_value("tollgate_downstream_connections_refused_total"),
        2.0
    );
    // Both are closed at the deadline, without a byte.
    for s in &mut silent {
        let mut buf = [0u8; 16];
        let n = std::io::Read::read(s, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "the server wrote to a client that never said hello");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2900) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    wait_until(
        || {
            t.tg.metric_value("tollgate_tls_handshake_failures_total{reason=\"timeout\"}") == 2.0
        },
        "two handshake timeouts counted",
    );

    // A handshake that completes but no header after it: the same deadline
    // (from the accept) closes it, with a 408 over TLS.
    let mut s = tls_connect(t.tls, &t.ca_file);
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut rest);
    assert!(started.elapsed() < Duration::from_secs(8));
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    wait_until(
        || {
            t.tg.metric_value("tollgate_downstream_header_timeouts_total") >= 1.0
        },
        "the header timeout counted",
    );

    // The places are free again: a TLS request works.
    let mut s = tls_connect(t.tls, &t.ca_file);
    let a = keep_alive_get(
        &mut s,
        "/api?action=getcredits&username=john&password=secret1",
    );
    assert_eq!(a.status, 200, "{a:?}");
}

#[test]
fn a_certificate_reload_keeps_open_connections_and_refuses_a_bad_pair() {
    let t = start_tls("");
    let getcredits = "/api?action=getcredits&username=john&password=secret1";
    let mut old = tls_connect(t.tls, &t.ca_file);
    assert_eq!(peer_serial(&old), "01");
    assert_eq!(keep_alive_get(&mut old, getcredits).status, 200);

    // A new pair, renamed over the old files: new handshakes get it.
    let (cert, key) = leaf(Some(&t.ca), &Leaf::valid(2));
    write_pair(t.certs.path(), "server", &cert, &key);
    wait_until(
        || served_serial(t.tls, &t.ca_file) == "02",
        "new handshakes to see the new certificate",
    );
    assert_eq!(
        t.tg.metric_value("tollgate_tls_cert_reloads_total{result=\"ok\"}"),
        1.0
    );
    // The connection opened before goes on, with its certificate.
    let a = keep_alive_get(&mut old, getcredits);
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.text().contains("<balance>744</balance>"), "{}", a.text());
    assert_eq!(peer_serial(&old), "01");
    // So does python, from a fresh process.
    let (ok, out) = python(
        r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[2]))), server_hostname="localhost")
print(s.getpeercert()["serialNumber"])
"#,
        &[t.ca_file.to_str().unwrap(), &t.tls.port().to_string()],
    );
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "02");

    // A broken certificate file: refused, the pair in force stays.
    let errors = || {
        t.tg.metric_value("tollgate_tls_cert_reloads_total{result=\"error\"}")
    };
    replace_file(
        &t.certs.path().join("server.crt"),
        b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    );
    wait_until(|| errors() >= 1.0, "the broken certificate refused");
    assert_eq!(served_serial(t.tls, &t.ca_file), "02");
    // SIGHUP with the files still broken: refused again, still served.
    let before = errors();
    let hup = Command::new("kill")
        .args(["-HUP", &t.tg.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_until(|| errors() > before, "the SIGHUP reload refused");
    assert_eq!(served_serial(t.tls, &t.ca_file), "02");
    // A valid certificate whose key is another one: refused too.
    let (cert3, _) = leaf(Some(&t.ca), &Leaf::valid(3));
    let before = errors();
    replace_file(&t.certs.path().join("server.crt"), &cert3.to_pem().unwrap());
    wait_until(|| errors() > before, "the mismatched pair refused");
    assert_eq!(served_serial(t.tls, &t.ca_file), "02");
    assert_eq!(
        t.tg.metric_value("tollgate_tls_cert_reloads_total{result=\"ok\"}"),
        1.0
    );
    // POST /admin/reload reloads the pair too and says so.
    let r = client()
        .post(t.tg.admin_url("/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    let answer: serde_json::Value = r.json().unwrap();
    assert_eq!(answer["tls_certificate"]["result"], "refused", "{answer}");
    assert!(
        answer["tls_certificate"]["error"]
            .as_str()
            .unwrap()
            .contains("does not belong"),
        "{answer}"
    );
    assert_eq!(served_serial(t.tls, &t.ca_file), "02");
    let log = t.tg.log();
    assert!(log.contains("TLS certificate reload refused"), "{log}");
    assert!(log.contains("does not belong to the certificate"), "{log}");
    // The old connection never noticed.
    assert_eq!(keep_alive_get(&mut old, getcredits).status, 200);
}

#[test]
fn check_validates_the_certificate_pair() {
    let t = start_tls("");
    let out = t.tg.cli(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("tls: ") && text.contains("serial 01"),
        "{text}"
    );
    // Another key: check fails naming both files.
    let other = t.certs.path().join("other.key");
    std::fs::write(&other, ec_key().private_key_to_pem_pkcs8().unwrap()).unwrap();
    let config = std::fs::read_to_string(t.tg.config_path()).unwrap();
    let server_key = t.certs.path().join("server.key");
    std::fs::write(
        t.tg.config_path(),
        config.replace(server_key.to_str().unwrap(), other.to_str().unwrap()),
    )
    .unwrap();
    let out = t.tg.cli(&["check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("does not belong to the certificate"), "{err}");
}

// ---------------------------------------------------------------------------
// HTTPS to the gateway
// ---------------------------------------------------------------------------

/// A TLS terminator in front of `backend` serving `cert`/`key`; runs until
/// the test process ends.
fn tls_terminator(cert: &X509, key: &PKey<Private>, backend: SocketAddr) -> SocketAddr {
    tls_terminator_counting(cert, key, backend).0
}

/// [`tls_terminator`] and the number of handshakes it completed.
fn tls_terminator_counting(
    cert: &X509,
    key: &PKey<Private>,
    backend: SocketAddr,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = handshakes.clone();
    use openssl::ssl::{Ssl, SslAcceptor};
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = write_pair(dir.path(), "gw", cert, key);
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    b.set_certificate_chain_file(&cert_file).unwrap();
    b.set_private_key_file(&key_file, SslFiletype::PEM).unwrap();
    let acceptor = Arc::new(b.build());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let ssl = Ssl::new(acceptor.context()).unwrap();
                    let mut tls = pingora::tls::tokio_ssl::SslStream::new(ssl, tcp).unwrap();
                    if std::pin::Pin::new(&mut tls).accept().await.is_err() {
                        return;
                    }
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Ok(mut back) = tokio::net::TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut back).await;
                });
            }
        });
        drop(dir);
    });
    (addr, handshakes)
}

/// A tollgate whose `upstream:` mapping has `upstream_yaml` added (the
/// harness writes a plain one: it is rewritten, and the process restarted).
fn start_behind(gateway: SocketAddr, upstream_yaml: &str) -> Tollgate {
    let mut tg = Tollgate::start(gateway, TollgateOptions::default());
    tg.kill();
    let config = std::fs::read_to_string(tg.config_path()).unwrap();
    let plain = "read_timeout_ms: 10000 }";
    assert!(config.contains(plain), "{config}");
    std::fs::write(
        tg.config_path(),
        config.replace(plain, &format!("read_timeout_ms: 10000{upstream_yaml} }}")),
    )
    .unwrap();
    std::fs::remove_file(tg.log_path()).unwrap();
    tg.spawn();
    tg
}

#[test]
fn https_to_the_gateway_is_verified_and_a_bad_certificate_charges_nothing() {
    let sim = Sim::start(&[]);
    let certs = tempfile::tempdir().unwrap();
    let ca = ca("tollgate test CA");
    let ca_file = write_ca(certs.path(), &ca);
    let verified = format!(
        ", tls: true, sni: localhost, ca_file: {}",
        ca_file.display()
    );

    // A good certificate: the send goes through and is charged.
    let (cert, key) = leaf(Some(&ca), &Leaf::valid(10));
    let (good, handshakes) = tls_terminator_counting(&cert, &key, sim.addr);
    let tg = start_behind(good, &verified);
    for _ in 0..3 {
        let (status, body) = get(&tg.url(SEND));
        assert_eq!(status, 200, "{body}");
        assert!(xml_field(&body, "statuscode").is_some(), "{body}");
    }
    assert_eq!(sim.sendmessage_count(), 3);
    assert_eq!(tg.balance("john", "secret1"), "741");
    // One TLS connection, kept alive for all three.
    assert_eq!(handshakes.load(std::sync::atomic::Ordering::SeqCst), 1);
    // A path tollgate does not own goes by pingora's own proxy path: HTTPS
    // and verified there too.
    let (status, body) = get(&tg.url("/sim/requests"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        tg.metric_value("tollgate_upstream_tls_insecure_skip_verify"),
        0.0
    );
    let check = tg.cli(&["check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(text.contains("verified against"), "{text}");
    // An unreadable CA file: check names it, and run refuses to start.
    let config = std::fs::read_to_string(tg.config_path()).unwrap();
    std::fs::write(
        tg.config_path(),
        config.replace(ca_file.to_str().unwrap(), "/nonexistent/ca.pem"),
    )
    .unwrap();
    for command in ["check", "run"] {
        let out = tg.cli(&[command]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{command} accepted a missing CA file"
        );
        assert!(
            err.contains("upstream.ca_file") && err.contains("/nonexistent/ca.pem"),
            "{command}: {err}"
        );
    }
    drop(tg);

    // Expired, for another host, self-signed: refused before a byte of the
    // request is sent; nothing charged, nothing reaches the gateway.
    let now = now_s();
    let expired = leaf(
        Some(&ca),
        &Leaf {
            not_before_s: now - 10 * 86_400,
            not_after_s: now - 86_400,
            ..Leaf::valid(11)
        },
    );
    let wrong_host = leaf(
        Some(&ca),
        &Leaf {
            dns: &["gateway.example.com"],
            ip: false,
            ..Leaf::valid(12)
        },
    );
    let self_signed = leaf(None, &Leaf::valid(13));
    for (what, (cert, key), reason) in [
        ("expired", expired, "expired"),
        ("wrong host", wrong_host, "mismatch"),
        ("self-signed", self_signed, "self-signed"),
    ] {
        sim.reset();
        let gw = tls_terminator(&cert, &key, sim.addr);
        let tg = start_behind(gw, &verified);
        let (status, body) = get(&tg.url(SEND));
        assert!(
            body.contains("1009") || body.contains("unavailable"),
            "{what}: {status} {body}"
        );
        assert_eq!(sim.sendmessage_count(), 0, "{what}: the gateway got it");
        let (status, _) = get(&tg.url("/sim/requests"));
        assert_eq!(status, 502, "{what}: pingora's proxy path trusted it");
        assert_eq!(tg.balance("john", "secret1"), "744", "{what}: charged");
        assert_eq!(status, 502, "{what}: {body}");
        // Reserved, then voided: the credit came back whole.
        assert_eq!(
            tg.metric_value(
                "tollgate_credits_milli_total{bucket=\"anytime\",direction=\"none\",kind=\"void\"}"
            ),
            1000.0,
            "{what}"
        );
        let log = tg.log();
        assert!(
            log.contains("certificate refused") && log.to_lowercase().contains(reason),
            "{what}: {log}"
        );
    }

    // The opt-out: a self-signed gateway goes through, loudly.
    sim.reset();
    let (cert, key) = leaf(None, &Leaf::valid(14));
    let gw = tls_terminator(&cert, &key, sim.addr);
    let tg = start_behind(gw, ", tls: true, insecure_skip_verify: true");
    let (status, body) = get(&tg.url(SEND));
    assert_eq!(status, 200, "{body}");
    assert_eq!(sim.sendmessage_count(), 1);
    assert_eq!(tg.balance("john", "secret1"), "743");
    assert_eq!(get(&tg.url("/sim/requests")).0, 200);
    assert_eq!(
        tg.metric_value("tollgate_upstream_tls_insecure_skip_verify"),
        1.0
    );
    let warnings = |log: &str| log.matches("NOT verified").count();
    assert_eq!(warnings(&tg.log()), 1, "{}", tg.log());
    // ... and again at every reload.
    let hup = Command::new("kill")
        .args(["-HUP", &tg.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_until(
        || warnings(&tg.log()) >= 2,
        "the warning repeated at reload",
    );
    let check = tg.cli(&["check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(text.contains("NOT VERIFIED"), "{text}");
}
