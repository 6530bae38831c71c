//! The `notify` section: low-balance webhooks.
//!
//! ```yaml
//! notify:
//!   low_balance:
//!     url: https://billing.example.com/hooks/tollgate
//!     secret: "a long random string"   # HMAC key, at least 16 bytes
//!     default_threshold: 10            # credits; omit: only listed accounts
//!     accounts: { vip: 50, test: off } # per account; `off` = never
//! ```
//!
//! Retries, time-outs and giving up are the outbox's (`outbox.*`), as for
//! every call tollgate owes someone.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use super::accounts::decimal_text;
use super::ConfigError;
use crate::money::parse_credits;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNotify {
    #[serde(default)]
    low_balance: Option<FileLowBalance>,
}

impl FileNotify {
    /// Whether `notify.low_balance` is set (refused with `cluster:`).
    pub fn has_low_balance(&self) -> bool {
        self.low_balance.is_some()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLowBalance {
    url: String,
    secret: String,
    #[serde(default)]
    default_threshold: Option<serde_yaml::Value>,
    #[serde(default)]
    accounts: HashMap<String, serde_yaml::Value>,
}

impl std::fmt::Debug for FileLowBalance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLowBalance")
            .field("url", &self.url)
            .field("secret", &"***")
            .finish_non_exhaustive()
    }
}

/// Thresholds in milli-credits of available balance (both buckets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Thresholds {
    /// For accounts without their own; `None`: no notification for them.
    pub default_milli: Option<i64>,
    /// Per account; `None` turns notification off for that account.
    pub accounts: HashMap<String, Option<i64>>,
}

impl Thresholds {
    pub fn of(&self, account: &str) -> Option<i64> {
        match self.accounts.get(account) {
            Some(own) => *own,
            None => self.default_milli,
        }
    }
}

/// Shortest HMAC secret accepted.
pub const SECRET_MIN_BYTES: usize = 16;

/// Validated low-balance webhook settings.
#[derive(Clone, PartialEq, Eq)]
pub struct LowBalanceConfig {
    /// `http://` URL the notifications are POSTed to.
    pub url: http::Uri,
    pub secret: Vec<u8>,
    pub thresholds: Thresholds,
}

impl std::fmt::Debug for LowBalanceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LowBalanceConfig")
            .field("url", &self.url)
            .field("secret", &"***")
            .field("thresholds", &self.thresholds)
            .finish()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyConfig {
    pub low_balance: Option<LowBalanceConfig>,
}

impl NotifyConfig {
    pub fn from_file(path: &Path, f: FileNotify) -> Result<Self, ConfigError> {
        let Some(lb) = f.low_balance else {
            return Ok(NotifyConfig::default());
        };
        let key = |k: &str| format!("notify.low_balance.{k}");
        let url: http::Uri = lb.url.parse().map_err(|_| {
            ConfigError::new(path, key("url"), "must be an http:// or https:// URL")
        })?;
        // The outbox calls it: `https://` verified against `outbox.ca_file`
        // (or the system's roots), as delivery-report relays are.
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            return Err(ConfigError::new(
                path,
                key("url"),
                "must be an http:// or https:// URL with a host",
            ));
        }
        if lb.secret.len() < SECRET_MIN_BYTES {
            return Err(ConfigError::new(
                path,
                key("secret"),
                format!("must be at least {SECRET_MIN_BYTES} bytes (it signs every notification)"),
            ));
        }
        let threshold = |k: String, v: &serde_yaml::Value| -> Result<Option<i64>, ConfigError> {
            if matches!(v, serde_yaml::Value::Bool(false))
                || v.as_str().is_some_and(|s| s.eq_ignore_ascii_case("off"))
            {
                return Ok(None);
            }
            let text = decimal_text(v)
                .ok_or_else(|| ConfigError::new(path, &k, "must be an amount of credits or off"))?;
            parse_credits(&text)
                .map(Some)
                .map_err(|e| ConfigError::new(path, &k, e.to_string()))
        };
        let default_milli = match &lb.default_threshold {
            Some(v) => threshold(key("default_threshold"), v)?,
            None => None,
        };
        let mut accounts = HashMap::with_capacity(lb.accounts.len());
        for (name, v) in &lb.accounts {
            accounts.insert(
                name.clone(),
                threshold(key(&format!("accounts.{name}")), v)?,
            );
        }
        Ok(NotifyConfig {
            low_balance: Some(LowBalanceConfig {
                url,
                secret: lb.secret.into_bytes(),
                thresholds: Thresholds {
                    default_milli,
                    accounts,
                },
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<NotifyConfig, ConfigError> {
        NotifyConfig::from_file(Path::new("t.yaml"), serde_yaml::from_str(yaml).unwrap())
    }

    #[test]
    fn thresholds_are_credits_or_off() {
        let c = parse(
            "low_balance: { url: 'http://127.0.0.1:9/h', secret: 0123456789abcdef, default_threshold: 10, accounts: { vip: '50.5', test: off } }",
        )
        .unwrap();
        let lb = c.low_balance.unwrap();
        assert_eq!(lb.thresholds.of("john"), Some(10_000));
        assert_eq!(lb.thresholds.of("vip"), Some(50_500));
        assert_eq!(lb.thresholds.of("test"), None);
        assert!(
            !format!("{lb:?}").contains("0123456789abcdef"),
            "the secret is never printed"
        );
    }

    #[test]
    fn bad_settings_name_their_key() {
        for (yaml, key) in [
            ("low_balance: { url: 'ftp://x/', secret: 0123456789abcdef }", "url"),
            ("low_balance: { url: 'http://x/', secret: short }", "secret"),
            ("low_balance: { url: 'http://x/', secret: 0123456789abcdef, default_threshold: 1.0001 }", "default_threshold"),
            ("low_balance: { url: 'http://x/', secret: 0123456789abcdef, accounts: { a: [1] } }", "accounts.a"),
            ("low_balance: { url: 'https:///x', secret: 0123456789abcdef }", "url"),
        ] {
            let e = parse(yaml).unwrap_err();
            assert_eq!(e.key, format!("notify.low_balance.{key}"), "{yaml}: {e:?}");
            assert!(!e.problem.contains("0123456789abcdef"));
        }
    }
}
