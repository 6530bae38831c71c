//! The `dlr:` section: where the gateway calls back, which keywords it is
//! asked to fill in, what its status values mean, and which policy each
//! tariff class settles by.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;

/// When tollgate asks the gateway for delivery reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestReports {
    /// Only for sends whose client passed a `reporturl`.
    Client,
    /// For every send: tollgate adds its own `reporturl` when the client
    /// passed none.
    Always,
}

/// When a share's money is settled (per tariff class).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ChargeOn {
    /// On the gateway's accept answer (as without reports); a failed,
    /// expired or rejected report then refunds.
    Accept,
    /// The share stays reserved until its report: delivered posts,
    /// failed/expired/rejected voids, none within `dlr.timeout_s` applies
    /// `dlr.on_timeout`.
    Delivery,
}

impl ChargeOn {
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeOn::Accept => "accept",
            ChargeOn::Delivery => "delivery",
        }
    }
}

/// What `charge_on: delivery` does with a share whose report never came
/// within `dlr.timeout_s` (`dlr.on_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// Post the held share (the gateway accepted it; silence is not a
    /// failure report). The default.
    Charge,
    /// Void it: the credit returns to the account.
    Release,
}

impl OnTimeout {
    pub fn as_str(self) -> &'static str {
        match self {
            OnTimeout::Charge => "charge",
            OnTimeout::Release => "release",
        }
    }
}

/// A final delivery outcome (what a status value means).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Delivered,
    Failed,
    Expired,
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Failed => "failed",
            Outcome::Expired => "expired",
            Outcome::Rejected => "rejected",
        }
    }

    pub fn parse(text: &str) -> Option<Outcome> {
        match text {
            "delivered" => Some(Outcome::Delivered),
            "failed" => Some(Outcome::Failed),
            "expired" => Some(Outcome::Expired),
            "rejected" => Some(Outcome::Rejected),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileKeywords {
    #[serde(default = "default_kw_message_id")]
    message_id: String,
    #[serde(default = "default_kw_recipient")]
    recipient: String,
    #[serde(default = "default_kw_status")]
    status: String,
    /// The part number of a multipart message's report, if the gateway
    /// reports parts (unset: reports are per message).
    #[serde(default)]
    part: Option<String>,
}

impl Default for FileKeywords {
    fn default() -> Self {
        FileKeywords {
            message_id: default_kw_message_id(),
            recipient: default_kw_recipient(),
            status: default_kw_status(),
            part: None,
        }
    }
}

fn default_kw_message_id() -> String {
    "$messageid".into()
}
fn default_kw_recipient() -> String {
    "$recipient".into()
}
fn default_kw_status() -> String {
    "$deliverystatus".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDlr {
    #[serde(default)]
    enabled: bool,
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default)]
    public_url: Option<String>,
    #[serde(default = "default_request")]
    request: RequestReports,
    #[serde(default = "default_timeout_s")]
    timeout_s: u64,
    #[serde(default = "default_on_timeout")]
    on_timeout: OnTimeout,
    #[serde(default = "default_max_pending_sends")]
    max_pending_sends: usize,
    #[serde(default = "default_callback_max_bytes")]
    callback_max_bytes: usize,
    #[serde(default)]
    keywords: FileKeywords,
    /// Status values by outcome (compared case-insensitively).
    #[serde(default)]
    outcomes: Option<BTreeMap<String, Vec<String>>>,
    /// `default:` and one entry per tariff class.
    #[serde(default)]
    charge_on: Option<BTreeMap<String, ChargeOn>>,
}

impl Default for FileDlr {
    fn default() -> Self {
        FileDlr {
            enabled: false,
            listen: default_listen(),
            public_url: None,
            request: default_request(),
            timeout_s: default_timeout_s(),
            on_timeout: default_on_timeout(),
            max_pending_sends: default_max_pending_sends(),
            callback_max_bytes: default_callback_max_bytes(),
            keywords: FileKeywords::default(),
            outcomes: None,
            charge_on: None,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:9602".into()
}
fn default_request() -> RequestReports {
    RequestReports::Client
}
fn default_timeout_s() -> u64 {
    172_800
}
fn default_on_timeout() -> OnTimeout {
    OnTimeout::Charge
}
fn default_max_pending_sends() -> usize {
    100_000
}
fn default_callback_max_bytes() -> usize {
    8 * 1024
}

/// The roles tollgate reads from a report, by the keyword that fills them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keywords {
    pub message_id: String,
    pub recipient: String,
    pub status: String,
    pub part: Option<String>,
}

/// The validated `dlr:` section.
#[derive(Debug, Clone)]
pub struct DlrConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Base URL the gateway calls (`http://host:port`), without a trailing
    /// slash; the callback path is `/dlr/<token>`.
    pub public_url: String,
    pub request: RequestReports,
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
    pub max_pending_sends: usize,
    pub callback_max_bytes: usize,
    pub keywords: Keywords,
    /// Lower-cased status value → outcome.
    pub outcomes: BTreeMap<String, Outcome>,
    pub charge_on_default: ChargeOn,
    pub charge_on_classes: BTreeMap<String, ChargeOn>,
}

/// Longest keyword (`$` and up to 63 letters, digits or `_`).
pub const KEYWORD_MAX_LEN: usize = 64;

pub fn is_keyword(text: &str) -> bool {
    text.len() >= 2
        && text.len() <= KEYWORD_MAX_LEN
        && text.starts_with('$')
        && text[1..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn default_outcomes() -> BTreeMap<String, Outcome> {
    // Ozeki's message states (ozekisms.com, "Ozeki message status values":
    // delivered / undelivered) and the SMPP final states the gateway
    // relays from its service providers.
    let mut m = BTreeMap::new();
    for v in ["delivered", "delivrd", "deliveredtohandset"] {
        m.insert(v.to_string(), Outcome::Delivered);
    }
    for v in ["undelivered", "undeliv", "failed", "notsent", "deleted"] {
        m.insert(v.to_string(), Outcome::Failed);
    }
    m.insert("expired".into(), Outcome::Expired);
    for v in ["rejected", "rejectd"] {
        m.insert(v.to_string(), Outcome::Rejected);
    }
    m
}

impl DlrConfig {
    pub fn from_file(file: &Path, f: FileDlr) -> Result<DlrConfig, ConfigError> {
        let listen: SocketAddr = f.listen.parse().map_err(|_| {
            ConfigError::new(file, "dlr.listen", "must be an address like 127.0.0.1:9602")
        })?;
        let public_url = f
            .public_url
            .unwrap_or_else(|| format!("http://{listen}"))
            .trim_end_matches('/')
            .to_string();
        if !(public_url.starts_with("http://") || public_url.starts_with("https://"))
            || public_url.contains(['?', '#', ' '])
        {
            return Err(ConfigError::new(
                file,
                "dlr.public_url",
                "must be an http:// or https:// base URL without query, e.g. http://tollgate.example:9602",
            ));
        }
        if !(60..=30 * 86_400).contains(&f.timeout_s) {
            return Err(ConfigError::new(
                file,
                "dlr.timeout_s",
                "must be 60 to 2592000 seconds",
            ));
        }
        if !(1..=10_000_000).contains(&f.max_pending_sends) {
            return Err(ConfigError::new(
                file,
                "dlr.max_pending_sends",
                "must be 1 to 10000000",
            ));
        }
        if !(512..=65_536).contains(&f.callback_max_bytes) {
            return Err(ConfigError::new(
                file,
                "dlr.callback_max_bytes",
                "must be 512 to 65536 bytes",
            ));
        }
        let k = f.keywords;
        for (key, value) in [
            ("dlr.keywords.message_id", Some(&k.message_id)),
            ("dlr.keywords.recipient", Some(&k.recipient)),
            ("dlr.keywords.status", Some(&k.status)),
            ("dlr.keywords.part", k.part.as_ref()),
        ] {
            if let Some(v) = value {
                if !is_keyword(v) {
                    return Err(ConfigError::new(
                        file,
                        key,
                        "must be a keyword: $ followed by letters, digits or _ (at most 64 characters)",
                    ));
                }
            }
        }
        let outcomes = match f.outcomes {
            None => default_outcomes(),
            Some(by_outcome) => {
                let mut m = BTreeMap::new();
                for (name, values) in by_outcome {
                    let outcome = Outcome::parse(&name).ok_or_else(|| {
                        ConfigError::new(
                            file,
                            "dlr.outcomes",
                            format!("{name:?} is not an outcome; use delivered, failed, expired or rejected"),
                        )
                    })?;
                    for v in values {
                        m.insert(v.to_ascii_lowercase(), outcome);
                    }
                }
                m
            }
        };
        let mut classes = f.charge_on.unwrap_or_default();
        let charge_on_default = classes.remove("default").unwrap_or(ChargeOn::Accept);
        Ok(DlrConfig {
            enabled: f.enabled,
            listen,
            public_url,
            request: f.request,
            timeout: Duration::from_secs(f.timeout_s),
            on_timeout: f.on_timeout,
            max_pending_sends: f.max_pending_sends,
            callback_max_bytes: f.callback_max_bytes,
            keywords: Keywords {
                message_id: k.message_id,
                recipient: k.recipient,
                status: k.status,
                part: k.part,
            },
            outcomes,
            charge_on_default,
            charge_on_classes: classes,
        })
    }

    /// The policy of a tariff class (`None`: the default tariff).
    pub fn charge_on(&self, class: Option<&str>) -> ChargeOn {
        class
            .and_then(|c| self.charge_on_classes.get(c).copied())
            .unwrap_or(self.charge_on_default)
    }

    /// What a report's status value means (`None`: not final, or unknown).
    pub fn outcome(&self, status: &str) -> Option<Outcome> {
        self.outcomes
            .get(&status.trim().to_ascii_lowercase())
            .copied()
    }
}

impl Default for DlrConfig {
    fn default() -> Self {
        DlrConfig::from_file(Path::new("(defaults)"), FileDlr::default())
            .expect("the default dlr settings are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<DlrConfig, ConfigError> {
        let f: FileDlr = serde_yaml::from_str(yaml).unwrap();
        DlrConfig::from_file(Path::new("t.yaml"), f)
    }

    #[test]
    fn defaults_and_errors_name_the_key() {
        let c = parse("enabled: true").unwrap();
        assert_eq!(c.public_url, "http://127.0.0.1:9602");
        assert_eq!(c.outcome(" Undelivered "), Some(Outcome::Failed));
        assert_eq!(c.outcome("enroute"), None);
        assert_eq!(c.charge_on(Some("x")), ChargeOn::Accept);
        for (yaml, key) in [
            ("public_url: ftp://x", "dlr.public_url"),
            ("timeout_s: 1", "dlr.timeout_s"),
            ("keywords: { status: status }", "dlr.keywords.status"),
            ("outcomes: { gone: [x] }", "dlr.outcomes"),
        ] {
            let e = parse(yaml).unwrap_err().to_string();
            assert!(e.contains(key), "{yaml}: {e}");
        }
        let c = parse("outcomes: { delivered: [OK] }\ncharge_on: { default: accept }").unwrap();
        assert_eq!(c.outcome("ok"), Some(Outcome::Delivered));
        assert_eq!(c.outcome("delivered"), None);
        let c = parse("charge_on: { default: accept, premium: delivery }\non_timeout: release")
            .unwrap();
        assert_eq!(c.charge_on(Some("premium")), ChargeOn::Delivery);
        assert_eq!(c.charge_on(None), ChargeOn::Accept);
        assert_eq!(c.on_timeout, OnTimeout::Release);
        assert_eq!(
            parse("enabled: false").unwrap().on_timeout,
            OnTimeout::Charge
        );
        // Unknown values are refused by the file's types.
        for yaml in ["on_timeout: post", "charge_on: { premium: later }"] {
            assert!(serde_yaml::from_str::<FileDlr>(yaml).is_err(), "{yaml}");
        }
    }
}
