//! Transport security settings: the `tls:` section (the client listener's
//! certificate) and the TLS keys of `upstream:` (HTTPS to the gateway).
//!
//! Only the shape and the rules between keys are checked here; the files
//! are read and parsed by the runtime `tls` module (at start-up, at each
//! reload, and by `tollgate check`). This module never opens a file or a
//! socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{parse_addr, resolve_relative, ConfigError};

/// `tls:` as the file spells it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    listen: String,
    /// PEM certificate chain: the server certificate first, then any
    /// intermediates.
    cert: String,
    /// PEM private key of the first certificate of `cert`.
    key: String,
}

/// The TLS client listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListenerConfig {
    pub listen: SocketAddr,
    /// Reloaded on change and on `SIGHUP` (the path itself needs a restart).
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsListenerConfig {
    pub fn from_file(path: &Path, f: FileTls) -> Result<Self, ConfigError> {
        for (key, value) in [("tls.cert", &f.cert), ("tls.key", &f.key)] {
            if value.is_empty() {
                return Err(ConfigError::new(
                    path,
                    key,
                    "must name a PEM file (relative paths resolve against this file's directory)",
                ));
            }
        }
        let listen = parse_addr(path, "tls.listen", &f.listen)?;
        if listen.port() == 0 {
            // The proxy tells TLS connections by the port they came in on.
            return Err(ConfigError::new(
                path,
                "tls.listen",
                "needs a port (e.g. 0.0.0.0:8443), not 0",
            ));
        }
        Ok(TlsListenerConfig {
            listen,
            cert: resolve_relative(path, &f.cert),
            key: resolve_relative(path, &f.key),
        })
    }
}

/// The TLS keys of `upstream:` as the file spells them (`FileUpstream`
/// holds them itself: serde's `flatten` would lose `deny_unknown_fields`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstreamTls {
    /// Speak HTTPS to the gateway.
    #[serde(default)]
    pub tls: bool,
    /// PEM file of the CA certificates the gateway's certificate must chain
    /// to; without it the system's trust store.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// The host name sent in SNI and that the gateway's certificate must
    /// name.
    #[serde(default)]
    pub sni: Option<String>,
    /// Accept any certificate (self-signed installs). Logged at start and at
    /// every reload, and exported as a metric.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// HTTPS to the gateway (`upstream.tls: true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTlsConfig {
    pub ca_file: Option<PathBuf>,
    /// SNI and the name verified; `None` only with `insecure_skip_verify`.
    pub sni: Option<String>,
    pub insecure_skip_verify: bool,
}

/// Longest host name (RFC 1035).
const HOST_NAME_MAX: usize = 253;

fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= HOST_NAME_MAX
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl UpstreamTlsConfig {
    /// `None` for plain HTTP. The TLS keys without `tls: true` are refused
    /// (they would silently do nothing), as is a verification that could
    /// not name what it verifies.
    pub fn from_file(path: &Path, f: FileUpstreamTls) -> Result<Option<Self>, ConfigError> {
        if !f.tls {
            for (key, set) in [
                ("upstream.ca_file", f.ca_file.is_some()),
                ("upstream.sni", f.sni.is_some()),
                ("upstream.insecure_skip_verify", f.insecure_skip_verify),
            ] {
                if set {
                    return Err(ConfigError::new(
                        path,
                        key,
                        "applies to HTTPS only; add upstream.tls: true or remove it",
                    ));
                }
            }
            return Ok(None);
        }
        if let Some(sni) = &f.sni {
            if !valid_host_name(sni) {
                return Err(ConfigError::new(
                    path,
                    "upstream.sni",
                    format!("{sni:?} is not a host name; write the name the gateway's certificate carries, e.g. gw.example.com"),
                ));
            }
        }
        if f.insecure_skip_verify {
            if f.ca_file.is_some() {
                return Err(ConfigError::new(
                    path,
                    "upstream.ca_file",
                    "contradicts upstream.insecure_skip_verify: true (nothing would be verified against it); remove one",
                ));
            }
        } else if f.sni.is_none() {
            return Err(ConfigError::new(
                path,
                "upstream.sni",
                "is required with upstream.tls: true: the host name the gateway's certificate must carry \
                 (or, for a self-signed gateway, upstream.insecure_skip_verify: true)",
            ));
        }
        if f.ca_file.as_deref() == Some("") {
            return Err(ConfigError::new(
                path,
                "upstream.ca_file",
                "must name a PEM file of CA certificates",
            ));
        }
        Ok(Some(UpstreamTlsConfig {
            ca_file: f.ca_file.as_deref().map(|p| resolve_relative(path, p)),
            sni: f.sni,
            insecure_skip_verify: f.insecure_skip_verify,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(yaml: &str) -> Result<Option<UpstreamTlsConfig>, ConfigError> {
        let f: FileUpstreamTls = serde_yaml::from_str(yaml).unwrap();
        UpstreamTlsConfig::from_file(Path::new("/etc/tollgate/tollgate.yaml"), f)
    }

    #[test]
    fn upstream_tls_keys_need_tls_and_verification_needs_a_name() {
        assert_eq!(upstream("{}").unwrap(), None);
        let e = upstream("{ ca_file: ca.pem }").unwrap_err();
        assert_eq!(e.key, "upstream.ca_file");
        assert!(e.problem.contains("upstream.tls: true"), "{e}");
        let e = upstream("{ tls: true }").unwrap_err();
        assert_eq!(e.key, "upstream.sni");
        let e = upstream("{ tls: true, sni: \"gw example\" }").unwrap_err();
        assert_eq!(e.key, "upstream.sni");
        let e = upstream("{ tls: true, insecure_skip_verify: true, ca_file: ca.pem }").unwrap_err();
        assert_eq!(e.key, "upstream.ca_file");

        let c = upstream("{ tls: true, sni: gw.example.com, ca_file: ca.pem }")
            .unwrap()
            .unwrap();
        assert_eq!(c.ca_file, Some(PathBuf::from("/etc/tollgate/ca.pem")));
        assert_eq!(c.sni.as_deref(), Some("gw.example.com"));
        assert!(!c.insecure_skip_verify);
        let c = upstream("{ tls: true, insecure_skip_verify: true }")
            .unwrap()
            .unwrap();
        assert!(c.insecure_skip_verify);
        assert_eq!(c.sni, None);
    }

    #[test]
    fn host_names() {
        assert!(valid_host_name("gw.example.com"));
        assert!(valid_host_name("localhost"));
        assert!(!valid_host_name(""));
        assert!(!valid_host_name("a..b"));
        assert!(!valid_host_name("a/b"));
        assert!(!valid_host_name(&"a".repeat(254)));
    }
}
