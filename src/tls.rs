//! Transport security: the client listener's certificate and handshake,
//! the connector for HTTPS to the gateway, and the one of the outbox's
//! relay to `https://` targets ([`RelayTls`]). Built on pingora 0.9.1's
//! OpenSSL support (`pingora::tls` is its `openssl` re-export).
//!
//! # The client listener
//! [`CertStore`] holds the certificate chain and key in force in an
//! `ArcSwap`. The handshake (run by the connection gate in
//! `downstream.rs`, inside the header deadline) asks pingora's
//! `certificate_callback` ([`TlsAccept`]) for a certificate, and the
//! callback hands it the one in force at that moment. A reload
//! ([`CertStore::reload`], on a change of either file and on `SIGHUP`)
//! parses both files, checks that the key belongs to the certificate and
//! only then swaps: new handshakes get the new certificate, connections
//! already open keep theirs (a TLS session never changes certificate), and
//! nothing is dropped. A file that does not parse, or a key that does not
//! match, is refused whole — logged, counted in
//! `tollgate_tls_cert_reloads_total{result="error"}` — and the previous pair
//! stays in force; there is no state in which one of the two is new.
//!
//! Protocols: TLS 1.2 and 1.3 only (OpenSSL's minimum protocol version;
//! the Mozilla "intermediate" cipher list pingora starts from). ALPN
//! offers `http/1.1` only: tollgate speaks HTTP/1.1 to clients.
//!
//! Failure modes: a deploy that writes the certificate and then the key as
//! two separate writes more than the reload debounce apart sees one
//! refused reload (new certificate, old key: they do not match) and then a
//! good one; the old pair is served in between. A certificate past its
//! `notAfter` is loaded (with a warning): refusing it would not make the
//! clients' view any better. Resumed TLS sessions carry the certificate of
//! their first handshake.
//!
//! # The gateway
//! [`GatewayTls`] wraps the upstream pool's TCP connections in TLS:
//! verified against `upstream.ca_file` (or the system's trust store) and
//! the host name `upstream.sni`, unless `upstream.insecure_skip_verify`
//! says otherwise (logged at start and every reload, exported as
//! `tollgate_upstream_tls_insecure_skip_verify 1`). A handshake that fails —
//! expired certificate, wrong host, unknown CA — fails the connect, so no
//! byte of the request was sent: the send is voided and answered
//! `upstream_unavailable`.
//!
//! This module never looks at a request and never touches a balance.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use openssl::asn1::{Asn1Time, Asn1TimeRef};
use parking_lot::Mutex;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::{server::handshake_with_callback, SslStream, TlsRef};
use pingora::protocols::IO;
use pingora::tls::ext;
use pingora::tls::nid::Nid;
use pingora::tls::pkey::{PKey, Private};
use pingora::tls::ssl::{
    select_next_proto, AlpnError, SslAcceptor, SslConnector, SslMethod, SslVerifyMode, SslVersion,
};
use pingora::tls::x509::store::X509StoreBuilder;
use pingora::tls::x509::X509;
use tokio::net::TcpStream;

use crate::config::tls::{TlsListenerConfig, UpstreamTlsConfig};
use crate::metrics::Metrics;

/// Largest certificate or key file read (a chain of a few certificates is
/// a few KiB).
pub const PEM_FILE_MAX_BYTES: u64 = 1024 * 1024;

/// ALPN: HTTP/1.1 only, in wire format.
const ALPN_HTTP11: &[u8] = b"\x08http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {problem}")]
    Read { path: String, problem: String },
    #[error("{path}: larger than {PEM_FILE_MAX_BYTES} bytes; is this a PEM file?")]
    TooLarge { path: String },
    #[error("{path}: {problem}")]
    Parse { path: String, problem: String },
    #[error("{key}: this private key does not belong to the certificate in {cert}")]
    KeyMismatch { cert: String, key: String },
    #[error("TLS set-up: {0}")]
    Setup(String),
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let name = || path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| TlsError::Read {
        path: name(),
        problem: e.to_string(),
    })?;
    let mut bytes = Vec::new();
    file.take(PEM_FILE_MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| TlsError::Read {
            path: name(),
            problem: e.to_string(),
        })?;
    if bytes.len() as u64 > PEM_FILE_MAX_BYTES {
        return Err(TlsError::TooLarge { path: name() });
    }
    Ok(bytes)
}

/// Every certificate of a PEM file, in order; at least one.
fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<X509>, TlsError> {
    let certs = X509::stack_from_pem(pem).map_err(|e| TlsError::Parse {
        path: path.display().to_string(),
        problem: format!("not a PEM certificate chain: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Parse {
            path: path.display().to_string(),
            problem: "holds no certificate (expected -----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

/// Seconds since the epoch of an ASN.1 time.
fn unix_seconds(t: &Asn1TimeRef) -> Option<i64> {
    let epoch = Asn1Time::from_unix(0).ok()?;
    let diff = epoch.diff(t).ok()?;
    Some(i64::from(diff.days) * 86_400 + i64::from(diff.secs))
}

/// A certificate chain and its key, checked to belong together.
pub struct ServerCert {
    /// The server certificate first, then intermediates.
    chain: Vec<X509>,
    key: PKey<Private>,
    /// Hash of both files' bytes: a reload that reads the same bytes
    /// changes nothing (and is not counted).
    digest: blake3::Hash,
    /// The first certificate's serial number, upper-case hex.
    pub serial: String,
    /// The first certificate's subject common name (empty if none).
    pub subject: String,
    /// The first certificate's `notAfter`, seconds since the epoch.
    pub not_after_unix_s: i64,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("serial", &self.serial)
            .field("subject", &self.subject)
            .field("not_after_unix_s", &self.not_after_unix_s)
            .finish_non_exhaustive()
    }
}

impl ServerCert {
    /// Reads and checks `cert` and `key`: both parse, and the key is the
    /// first certificate's.
    pub fn load(cert: &Path, key: &Path) -> Result<ServerCert, TlsError> {
        let cert_pem = read_pem(cert)?;
        let key_pem = read_pem(key)?;
        let chain = parse_certs(cert, &cert_pem)?;
        let private = PKey::private_key_from_pem(&key_pem).map_err(|e| TlsError::Parse {
            path: key.display().to_string(),
            problem: format!("not a PEM private key: {e}"),
        })?;
        let public = chain[0].public_key().map_err(|e| TlsError::Parse {
            path: cert.display().to_string(),
            problem: format!("unreadable public key: {e}"),
        })?;
        if !public.public_eq(&private) {
            return Err(TlsError::KeyMismatch {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
            });
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&(cert_pem.len() as u64).to_le_bytes());
        hasher.update(&cert_pem);
        hasher.update(&key_pem);
        let leaf = &chain[0];
        let serial = leaf
            .serial_number()
            .to_bn()
            .and_then(|bn| bn.to_hex_str().map(|s| s.to_string()))
            .unwrap_or_default();
        let subject = leaf
            .subject_name()
            .entries_by_nid(Nid::COMMONNAME)
            .next()
            .and_then(|e| e.data().to_string().ok())
            .unwrap_or_default();
        let not_after_unix_s = unix_seconds(leaf.not_after()).unwrap_or(0);
        Ok(ServerCert {
            digest: hasher.finalize(),
            chain,
            key: private,
            serial,
            subject,
            not_after_unix_s,
        })
    }

    /// Whether `notAfter` is behind `now_unix_s`.
    pub fn expired(&self, now_unix_s: i64) -> bool {
        self.not_after_unix_s <= now_unix_s
    }

    /// Hands this certificate, its chain and key to one handshake.
    fn apply(&self, ssl: &mut TlsRef) -> Result<(), pingora::tls::error::ErrorStack> {
        ext::ssl_use_certificate(ssl, &self.chain[0])?;
        for intermediate in &self.chain[1..] {
            ext::ssl_add_chain_cert(ssl, intermediate)?;
        }
        ext::ssl_use_private_key(ssl, &self.key)
    }
}

fn now_unix_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What a reload of the certificate files did.
#[derive(Debug)]
pub enum CertReload {
    /// The files hold what is in force already.
    Unchanged,
    /// The new pair is in force for new handshakes.
    Swapped { serial: String },
    /// The new pair was refused; the previous one stays.
    Refused(TlsError),
}

/// The client listener's certificate in force, swapped whole by reloads.
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<ServerCert>,
    /// Serialises reloads (the swap itself is lock-free for handshakes).
    reloading: Mutex<()>,
    metrics: Arc<Metrics>,
}

impl CertStore {
    /// Loads the pair named by `tls:`; an error stops start-up.
    pub fn load(config: &TlsListenerConfig, metrics: Arc<Metrics>) -> Result<CertStore, TlsError> {
        let cert = ServerCert::load(&config.cert, &config.key)?;
        warn_if_expired(&cert);
        metrics.tls_cert_not_after_s.set(cert.not_after_unix_s);
        Ok(CertStore {
            cert_path: config.cert.clone(),
            key_path: config.key.clone(),
            current: ArcSwap::from_pointee(cert),
            reloading: Mutex::new(()),
            metrics,
        })
    }

    pub fn current(&self) -> Arc<ServerCert> {
        self.current.load_full()
    }

    /// The certificate and key files (watched by the reloader).
    pub fn files(&self) -> [&Path; 2] {
        [&self.cert_path, &self.key_path]
    }

    /// Re-reads both files; swaps them in only if both parse and match.
    /// Logs and counts the outcome (an unchanged pair is neither).
    pub fn reload(&self) -> CertReload {
        let _serialised = self.reloading.lock();
        let loaded = ServerCert::load(&self.cert_path, &self.key_path);
        let cert = match loaded {
            Ok(c) if c.digest == self.current.load().digest => return CertReload::Unchanged,
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    error = %e,
                    serial = %self.current.load().serial,
                    "TLS certificate reload refused; the certificate in force stays"
                );
                self.metrics.record_tls_reload(false);
                return CertReload::Refused(e);
            }
        };
        warn_if_expired(&cert);
        let serial = cert.serial.clone();
        let previous = self.current.swap(Arc::new(cert));
        let now = self.current.load();
        self.metrics.tls_cert_not_after_s.set(now.not_after_unix_s);
        self.metrics.record_tls_reload(true);
        tracing::info!(
            previous_serial = %previous.serial,
            serial = %now.serial,
            subject = %now.subject,
            not_after_unix_s = now.not_after_unix_s,
            "TLS certificate reloaded; new handshakes use it, open connections keep theirs"
        );
        CertReload::Swapped { serial }
    }
}

fn warn_if_expired(cert: &ServerCert) {
    if cert.expired(now_unix_s()) {
        tracing::warn!(
            serial = %cert.serial,
            subject = %cert.subject,
            not_after_unix_s = cert.not_after_unix_s,
            "the TLS certificate has expired; clients will refuse it"
        );
    }
}

/// pingora's certificate callback: the certificate in force, per handshake.
struct CurrentCert(Arc<CertStore>);

#[async_trait]
impl TlsAccept for CurrentCert {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let cert = self.0.current();
        if let Err(e) = cert.apply(ssl) {
            // The handshake then fails for want of a certificate.
            tracing::error!(error = %e, serial = %cert.serial, "cannot use the TLS certificate");
        }
    }
}

/// The TLS side of the client listener: the acceptor (protocols, ciphers,
/// ALPN) and the certificate callback.
pub struct TlsListener {
    acceptor: SslAcceptor,
    callbacks: CurrentCert,
}

impl TlsListener {
    pub fn new(certs: Arc<CertStore>) -> Result<TlsListener, TlsError> {
        let setup = |e: pingora::tls::error::ErrorStack| TlsError::Setup(e.to_string());
        // Mozilla intermediate (what pingora's `TlsSettings` starts from),
        // and explicitly nothing below TLS 1.2.
        let mut builder =
            SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).map_err(setup)?;
        builder
            .set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(setup)?;
        builder.set_alpn_select_callback(|_, offered| {
            select_next_proto(ALPN_HTTP11, offered).ok_or(AlpnError::NOACK)
        });
        Ok(TlsListener {
            acceptor: builder.build(),
            callbacks: CurrentCert(certs),
        })
    }

    /// The server side of a handshake over `stream` with the certificate in
    /// force. No timeout of its own: the caller's deadline bounds it.
    pub async fn handshake<S: IO>(&self, stream: S) -> pingora::Result<SslStream<S>> {
        handshake_with_callback(&self.acceptor, stream, &self.callbacks).await
    }
}

/// HTTPS to the gateway: one connector, configured once.
pub struct GatewayTls {
    connector: SslConnector,
    /// SNI and the host name verified.
    sni: Option<String>,
    insecure_skip_verify: bool,
    /// The CA certificates of `upstream.ca_file` (pingora's own proxy path
    /// takes them as a list).
    ca: Option<Vec<X509>>,
}

/// A TLS connection to the gateway.
pub type GatewayStream = pingora::tls::tokio_ssl::SslStream<TcpStream>;

impl GatewayTls {
    pub fn new(config: &UpstreamTlsConfig) -> Result<GatewayTls, TlsError> {
        let setup = |e: pingora::tls::error::ErrorStack| TlsError::Setup(e.to_string());
        let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(setup)?;
        builder
            .set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(setup)?;
        builder.set_alpn_protos(ALPN_HTTP11).map_err(setup)?;
        let ca = match &config.ca_file {
            Some(path) => {
                let certs = parse_certs(path, &read_pem(path)?)?;
                let mut store = X509StoreBuilder::new().map_err(setup)?;
                for c in &certs {
                    store.add_cert(c.clone()).map_err(setup)?;
                }
                builder.set_cert_store(store.build());
                Some(certs)
            }
            None => {
                // The system's trust store (the bundled OpenSSL's own
                // default directory is its build directory).
                let probe = openssl_probe::probe();
                match (&probe.cert_file, &probe.cert_dir) {
                    (None, None) => builder.set_default_verify_paths().map_err(setup)?,
                    (file, dir) => builder
                        .load_verify_locations(file.as_deref(), dir.as_deref())
                        .map_err(setup)?,
                }
                None
            }
        };
        if config.insecure_skip_verify {
            builder.set_verify(SslVerifyMode::NONE);
        }
        Ok(GatewayTls {
            connector: builder.build(),
            sni: config.sni.clone(),
            insecure_skip_verify: config.insecure_skip_verify,
            ca,
        })
    }

    pub fn ca_certs(&self) -> Option<&[X509]> {
        self.ca.as_deref()
    }

    /// The client side of a handshake over `tcp`; the error says why the
    /// gateway's certificate was refused.
    pub async fn connect(&self, tcp: TcpStream) -> Result<GatewayStream, String> {
        let fail = |e: &dyn std::fmt::Display| format!("TLS to the gateway: {e}");
        let mut conf = self.connector.configure().map_err(|e| fail(&e))?;
        if self.insecure_skip_verify {
            conf.set_verify_hostname(false);
            conf.set_verify(SslVerifyMode::NONE);
        }
        conf.set_use_server_name_indication(self.sni.is_some());
        let ssl = conf
            .into_ssl(self.sni.as_deref().unwrap_or(""))
            .map_err(|e| fail(&e))?;
        client_handshake(ssl, tcp, fail).await
    }
}

/// HTTPS for the outbox's relay (`https://` client report URLs): one
/// connector, TLS 1.2+, the peer's certificate verified against
/// `outbox.ca_file` or the system's trust store, and its name against the
/// URL's host (no opt-out).
pub struct RelayTls {
    connector: SslConnector,
}

/// A TLS connection of the relay.
pub type RelayStream = pingora::tls::tokio_ssl::SslStream<TcpStream>;

/// The client side of a handshake over `tcp`; a failure says whether the
/// peer's certificate was refused (and why) or the handshake failed.
async fn client_handshake(
    ssl: pingora::tls::ssl::Ssl,
    tcp: TcpStream,
    fail: impl Fn(&dyn std::fmt::Display) -> String,
) -> Result<pingora::tls::tokio_ssl::SslStream<TcpStream>, String> {
    let mut stream = pingora::tls::tokio_ssl::SslStream::new(ssl, tcp).map_err(|e| fail(&e))?;
    match Pin::new(&mut stream).connect().await {
        Ok(()) => Ok(stream),
        Err(e) => {
            let verify = stream.ssl().verify_result();
            if verify.as_raw() != 0 {
                Err(fail(&format!(
                    "certificate refused: {}",
                    verify.error_string()
                )))
            } else {
                Err(fail(&e))
            }
        }
    }
}

impl RelayTls {
    pub fn new(ca_file: Option<&Path>) -> Result<RelayTls, TlsError> {
        let setup = |e: pingora::tls::error::ErrorStack| TlsError::Setup(e.to_string());
        let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(setup)?;
        builder
            .set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(setup)?;
        builder.set_alpn_protos(ALPN_HTTP11).map_err(setup)?;
        match ca_file {
            Some(path) => {
                let certs = parse_certs(path, &read_pem(path)?)?;
                let mut store = X509StoreBuilder::new().map_err(setup)?;
                for c in certs {
                    store.add_cert(c).map_err(setup)?;
                }
                builder.set_cert_store(store.build());
            }
            None => {
                let probe = openssl_probe::probe();
                match (&probe.cert_file, &probe.cert_dir) {
                    (None, None) => builder.set_default_verify_paths().map_err(setup)?,
                    (file, dir) => builder
                        .load_verify_locations(file.as_deref(), dir.as_deref())
                        .map_err(setup)?,
                }
            }
        }
        builder.set_verify(SslVerifyMode::PEER);
        Ok(RelayTls {
            connector: builder.build(),
        })
    }

    /// The client side of a handshake with `host` (SNI unless an IP
    /// address, and the name or address the certificate must carry).
    pub async fn connect(&self, tcp: TcpStream, host: &str) -> Result<RelayStream, String> {
        let fail = |e: &dyn std::fmt::Display| format!("TLS: {e}");
        let mut conf = self.connector.configure().map_err(|e| fail(&e))?;
        conf.set_use_server_name_indication(host.parse::<std::net::IpAddr>().is_err());
        let ssl = conf.into_ssl(host).map_err(|e| fail(&e))?;
        client_handshake(ssl, tcp, fail).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::asn1::Asn1Integer;
    use openssl::bn::BigNum;
    use openssl::rsa::Rsa;
    use pingora::tls::hash::MessageDigest;
    use pingora::tls::x509::X509NameBuilder;

    fn key() -> PKey<Private> {
        PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
    }

    fn self_signed(key: &PKey<Private>, serial: u32) -> X509 {
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_nid(Nid::COMMONNAME, "localhost")
            .unwrap();
        let name = name.build();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        let serial = Asn1Integer::from_bn(&BigNum::from_u32(serial).unwrap()).unwrap();
        b.set_serial_number(&serial).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
            .unwrap();
        b.sign(key, MessageDigest::sha256()).unwrap();
        b.build()
    }

    fn write_pair(dir: &Path, serial: u32) -> (PathBuf, PathBuf, PKey<Private>) {
        let k = key();
        let cert = dir.join("cert.pem");
        let keyfile = dir.join("key.pem");
        std::fs::write(&cert, self_signed(&k, serial).to_pem().unwrap()).unwrap();
        std::fs::write(&keyfile, k.private_key_to_pem_pkcs8().unwrap()).unwrap();
        (cert, keyfile, k)
    }

    #[test]
    fn a_pair_loads_and_a_mismatched_or_broken_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, keyfile, _) = write_pair(dir.path(), 0x1234);
        let c = ServerCert::load(&cert, &keyfile).unwrap();
        assert_eq!(c.serial, "1234");
        assert_eq!(c.subject, "localhost");
        assert!(!c.expired(now_unix_s()));
        assert!(c.not_after_unix_s > now_unix_s() + 29 * 86_400);

        // Another key: refused, naming both files.
        let other = dir.path().join("other.pem");
        std::fs::write(&other, key().private_key_to_pem_pkcs8().unwrap()).unwrap();
        let e = ServerCert::load(&cert, &other).unwrap_err();
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");

        // Not PEM, empty, missing, too large.
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        assert!(matches!(
            ServerCert::load(&junk, &keyfile),
            Err(TlsError::Parse { .. })
        ));
        assert!(matches!(
            ServerCert::load(&cert, &junk),
            Err(TlsError::Parse { .. })
        ));
        assert!(matches!(
            ServerCert::load(&dir.path().join("none.pem"), &keyfile),
            Err(TlsError::Read { .. })
        ));
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'a'; PEM_FILE_MAX_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            ServerCert::load(&big, &keyfile),
            Err(TlsError::TooLarge { .. })
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever the files hold (PEM armour around junk included), loading
        /// is an error, never a panic and never a pair.
        #[test]
        fn arbitrary_files_are_refused_cleanly(
            cert in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
            key in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
            armoured in proptest::bool::ANY,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
            let wrap = |label: &str, body: &[u8]| {
                let mut out = format!("-----BEGIN {label}-----\n").into_bytes();
                out.extend_from_slice(body);
                out.extend_from_slice(format!("\n-----END {label}-----\n").as_bytes());
                out
            };
            if armoured {
                std::fs::write(&c, wrap("CERTIFICATE", &cert)).unwrap();
                std::fs::write(&k, wrap("PRIVATE KEY", &key)).unwrap();
            } else {
                std::fs::write(&c, &cert).unwrap();
                std::fs::write(&k, &key).unwrap();
            }
            proptest::prop_assert!(ServerCert::load(&c, &k).is_err());
        }
    }

    #[test]
    fn a_reload_swaps_a_good_pair_and_keeps_the_old_one_on_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, keyfile, _) = write_pair(dir.path(), 1);
        let metrics = Arc::new(Metrics::new());
        let store = CertStore::load(
            &TlsListenerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                cert: cert.clone(),
                key: keyfile.clone(),
            },
            metrics.clone(),
        )
        .unwrap();
        assert!(matches!(store.reload(), CertReload::Unchanged));

        // A new certificate with the old key: half a pair, refused.
        let k2 = key();
        std::fs::write(&cert, self_signed(&k2, 2).to_pem().unwrap()).unwrap();
        assert!(matches!(store.reload(), CertReload::Refused(_)));
        assert_eq!(store.current().serial, "01");
        // The key follows: swapped.
        std::fs::write(&keyfile, k2.private_key_to_pem_pkcs8().unwrap()).unwrap();
        assert!(matches!(store.reload(), CertReload::Swapped { .. }));
        assert_eq!(store.current().serial, "02");
        // A broken file: refused, the new pair stays.
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(matches!(store.reload(), CertReload::Refused(_)));
        assert_eq!(store.current().serial, "02");
        let text = metrics.render();
        assert!(
            text.contains("tollgate_tls_cert_reloads_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("tollgate_tls_cert_reloads_total{result=\"error\"} 2"));
    }
}
