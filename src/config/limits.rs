//! The `limits:` and `downstream:` sections of `conf/tollgate.yaml`: file
//! structs that reject unknown keys, validated into [`LimitsConfig`] (part
//! of the hot-reloaded snapshot) and [`DownstreamConfig`] (fixed at start).
//!
//! ```yaml
//! limits:
//!   max_keys_per_rule: 100000
//!   source_ip:      { requests_per_s: 50, burst: 100, mode: enforce }
//!   concurrent_per_ip: { max: 64, mode: enforce }
//!   auth_lockout:   { failures: 10, window_s: 60, lock_s: 300, mode: enforce }
//!   account_parts:  { parts_per_s: 20, burst: 200, mode: enforce,
//!                     overrides: { bulk: { parts_per_s: 500, burst: 5000 } } }
//!   upstream_parts: { parts_per_s: 1000, burst: 2000, mode: enforce }
//! downstream:
//!   read_timeout_ms: 10000
//!   body_timeout_ms: 30000
//!   header_limit_bytes: 65536
//! ```
//!
//! Every rule is off unless configured, except `auth_lockout`, which is on
//! by default (10 failures in 60 s lock for 300 s); `mode: off` switches
//! any rule off explicitly.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::clock::NANOS_PER_S;

/// A rate in units per second with a burst, as GCRA intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Nanoseconds one unit costs (`1 s / units_per_s`), at least 1.
    pub interval_ns: u64,
    /// How far the TAT may run ahead of now: `burst × interval_ns`.
    pub tolerance_ns: u64,
}

impl Rate {
    /// `units_per_s` must be positive and finite (config validation checks);
    /// a burst of 0 counts as 1.
    pub fn new(units_per_s: f64, burst: u32) -> Rate {
        let interval = (NANOS_PER_S as f64 / units_per_s).round();
        // At most ~146 years per unit; at least 1 ns.
        let interval_ns = interval.clamp(1.0, (u64::MAX / 4) as f64) as u64;
        Rate {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(burst.max(1))),
        }
    }
}

/// How many failures in which window lock a key, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    pub failures: u32,
    pub window_ns: u64,
    pub lock_ns: u64,
}

/// Whether a rule refuses, only counts, or does nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleMode {
    /// Over the limit → HTTP 429.
    Enforce,
    /// Over the limit → counted as `shadow_limited`, let through.
    Shadow,
    /// The rule is not evaluated.
    Off,
}

fn default_mode() -> RuleMode {
    RuleMode::Enforce
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    #[serde(default = "default_max_keys")]
    max_keys_per_rule: usize,
    #[serde(default)]
    source_ip: Option<FileRequestRate>,
    #[serde(default)]
    concurrent_per_ip: Option<FileConcurrency>,
    #[serde(default = "default_lockout")]
    auth_lockout: Option<FileLockout>,
    #[serde(default)]
    account_parts: Option<FileAccountParts>,
    #[serde(default)]
    upstream_parts: Option<FilePartsRate>,
}

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits {
            max_keys_per_rule: default_max_keys(),
            source_ip: None,
            concurrent_per_ip: None,
            auth_lockout: default_lockout(),
            account_parts: None,
            upstream_parts: None,
        }
    }
}

fn default_max_keys() -> usize {
    100_000
}

fn default_lockout() -> Option<FileLockout> {
    Some(FileLockout {
        failures: default_lockout_failures(),
        window_s: default_lockout_window_s(),
        lock_s: default_lockout_lock_s(),
        mode: RuleMode::Enforce,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRequestRate {
    requests_per_s: f64,
    burst: u32,
    #[serde(default = "default_mode")]
    mode: RuleMode,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePartsRate {
    parts_per_s: f64,
    burst: u32,
    #[serde(default = "default_mode")]
    mode: RuleMode,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAccountParts {
    /// The default rate; absent → only the overridden accounts are limited.
    #[serde(default)]
    parts_per_s: Option<f64>,
    #[serde(default)]
    burst: Option<u32>,
    #[serde(default = "default_mode")]
    mode: RuleMode,
    #[serde(default)]
    overrides: HashMap<String, FileOverride>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOverride {
    parts_per_s: f64,
    burst: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConcurrency {
    max: u32,
    #[serde(default = "default_mode")]
    mode: RuleMode,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLockout {
    #[serde(default = "default_lockout_failures")]
    failures: u32,
    #[serde(default = "default_lockout_window_s")]
    window_s: u64,
    #[serde(default = "default_lockout_lock_s")]
    lock_s: u64,
    #[serde(default = "default_mode")]
    mode: RuleMode,
}

fn default_lockout_failures() -> u32 {
    10
}
fn default_lockout_window_s() -> u64 {
    60
}
fn default_lockout_lock_s() -> u64 {
    300
}

/// A rate rule in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateRule {
    pub rate: Rate,
    /// `Enforce` or `Shadow` (an `Off` rule is `None`).
    pub mode: RuleMode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountPartsRule {
    /// Applies to accounts without an override; `None` = unlimited.
    pub default: Option<Rate>,
    pub overrides: HashMap<String, Rate>,
    pub mode: RuleMode,
}

impl AccountPartsRule {
    pub fn rate_for(&self, account: &str) -> Option<Rate> {
        self.overrides.get(account).copied().or(self.default)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutRule {
    pub policy: LockoutPolicy,
    pub mode: RuleMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyRule {
    pub max: u32,
    pub mode: RuleMode,
}

/// The limits in force: part of the hot-reloaded snapshot. Holds rates
/// only; the limiter *state* lives in [`super::Limiter`] and survives
/// reloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Most keys each rule's table remembers (memory bound).
    pub max_keys_per_rule: usize,
    pub source_ip: Option<RateRule>,
    pub concurrent_per_ip: Option<ConcurrencyRule>,
    pub auth_lockout: Option<LockoutRule>,
    pub account_parts: Option<AccountPartsRule>,
    pub upstream_parts: Option<RateRule>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig::from_file(Path::new("(defaults)"), FileLimits::default())
            .expect("the default limits are valid")
    }
}

/// Largest accepted rate (units per second) and burst.
const RATE_MAX: f64 = 1e9;
const BURST_MAX: u32 = 1_000_000_000;

fn rate(file: &Path, key: &str, per_s: f64, burst: u32) -> Result<Rate, ConfigError> {
    if !per_s.is_finite() || per_s <= 0.0 || per_s > RATE_MAX {
        return Err(ConfigError::new(
            file,
            key,
            format!("{per_s} is not a rate; write a number above 0 and at most {RATE_MAX}"),
        ));
    }
    if burst == 0 || burst > BURST_MAX {
        return Err(ConfigError::new(
            file,
            key.replace("requests_per_s", "burst")
                .replace("parts_per_s", "burst"),
            format!("must be 1 to {BURST_MAX}"),
        ));
    }
    Ok(Rate::new(per_s, burst))
}

fn seconds(file: &Path, key: &str, value: u64) -> Result<u64, ConfigError> {
    if value == 0 || value > 30 * 86_400 {
        return Err(ConfigError::new(file, key, "must be 1 to 2592000 seconds"));
    }
    Ok(value * NANOS_PER_S)
}

impl LimitsConfig {
    pub fn from_file(file: &Path, f: FileLimits) -> Result<LimitsConfig, ConfigError> {
        if !(1..=100_000_000).contains(&f.max_keys_per_rule) {
            return Err(ConfigError::new(
                file,
                "limits.max_keys_per_rule",
                "must be 1 to 100000000",
            ));
        }
        let on = |mode: RuleMode| mode != RuleMode::Off;
        let source_ip = match f.source_ip {
            Some(r) if on(r.mode) => Some(RateRule {
                rate: rate(
                    file,
                    "limits.source_ip.requests_per_s",
                    r.requests_per_s,
                    r.burst,
                )?,
                mode: r.mode,
            }),
            _ => None,
        };
        let upstream_parts = match f.upstream_parts {
            Some(r) if on(r.mode) => Some(RateRule {
                rate: rate(
                    file,
                    "limits.upstream_parts.parts_per_s",
                    r.parts_per_s,
                    r.burst,
                )?,
                mode: r.mode,
            }),
            _ => None,
        };
        let concurrent_per_ip = match f.concurrent_per_ip {
            Some(c) if on(c.mode) => {
                if c.max == 0 {
                    return Err(ConfigError::new(
                        file,
                        "limits.concurrent_per_ip.max",
                        "must be at least 1 (or mode: off)",
                    ));
                }
                Some(ConcurrencyRule {
                    max: c.max,
                    mode: c.mode,
                })
            }
            _ => None,
        };
        let auth_lockout = match f.auth_lockout {
            Some(l) if on(l.mode) => {
                if l.failures == 0 {
                    return Err(ConfigError::new(
                        file,
                        "limits.auth_lockout.failures",
                        "must be at least 1 (or mode: off)",
                    ));
                }
                Some(LockoutRule {
                    policy: LockoutPolicy {
                        failures: l.failures,
                        window_ns: seconds(file, "limits.auth_lockout.window_s", l.window_s)?,
                        lock_ns: seconds(file, "limits.auth_lockout.lock_s", l.lock_s)?,
                    },
                    mode: l.mode,
                })
            }
            _ => None,
        };
        let account_parts = match f.account_parts {
            Some(a) if on(a.mode) => {
                let default = match (a.parts_per_s, a.burst) {
                    (Some(per_s), Some(burst)) => Some(rate(
                        file,
                        "limits.account_parts.parts_per_s",
                        per_s,
                        burst,
                    )?),
                    (None, None) => None,
                    _ => return Err(ConfigError::new(
                        file,
                        "limits.account_parts",
                        "give both parts_per_s and burst (or neither, to limit only the overrides)",
                    )),
                };
                let mut overrides = HashMap::new();
                for (name, o) in a.overrides {
                    if name.is_empty() || name.chars().count() > 64 {
                        return Err(ConfigError::new(
                            file,
                            "limits.account_parts.overrides",
                            format!("{name:?} is not an account name (1 to 64 characters)"),
                        ));
                    }
                    let key = format!("limits.account_parts.overrides.{name}.parts_per_s");
                    let r = rate(file, &key, o.parts_per_s, o.burst)?;
                    overrides.insert(name, r);
                }
                Some(AccountPartsRule {
                    default,
                    overrides,
                    mode: a.mode,
                })
            }
            _ => None,
        };
        Ok(LimitsConfig {
            max_keys_per_rule: f.max_keys_per_rule,
            source_ip,
            concurrent_per_ip,
            auth_lockout,
            account_parts,
            upstream_parts,
        })
    }
}

// ---------------------------------------------------------------------------
// downstream: how long and how much a client may take (fixed at start).
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDownstream {
    #[serde(default = "default_read_timeout_ms")]
    read_timeout_ms: u64,
    #[serde(default = "default_body_timeout_ms")]
    body_timeout_ms: u64,
    #[serde(default = "default_header_limit")]
    header_limit_bytes: usize,
    #[serde(default = "default_header_timeout_ms")]
    header_timeout_ms: u64,
    #[serde(default = "default_max_connections_per_ip")]
    max_connections_per_ip: u32,
}

impl Default for FileDownstream {
    fn default() -> Self {
        FileDownstream {
            read_timeout_ms: default_read_timeout_ms(),
            body_timeout_ms: default_body_timeout_ms(),
            header_limit_bytes: default_header_limit(),
            header_timeout_ms: default_header_timeout_ms(),
            max_connections_per_ip: default_max_connections_per_ip(),
        }
    }
}

fn default_header_timeout_ms() -> u64 {
    10_000
}
fn default_max_connections_per_ip() -> u32 {
    256
}

fn default_read_timeout_ms() -> u64 {
    10_000
}
fn default_body_timeout_ms() -> u64 {
    30_000
}
fn default_header_limit() -> usize {
    64 * 1024
}

/// Client-side limits that do not reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownstreamConfig {
    /// Longest wait for one read of a request body (pingora's per-read
    /// timeout, set on each session).
    pub read_timeout: Duration,
    /// Longest time a whole request body may take to arrive (a client
    /// trickling bytes just under the read timeout is cut off here).
    pub body_timeout: Duration,
    /// Largest request header (request line + headers) accepted; larger
    /// ones are answered 431. pingora itself stops reading at 1 MiB.
    pub header_limit_bytes: usize,
    /// Longest time one request header may take to arrive, from the accept
    /// (first request) or its first byte (later ones); then 408 and close.
    pub header_timeout: Duration,
    /// Most connections one source address may hold open (idle keep-alive
    /// ones included); more are refused with 503 at accept.
    pub max_connections_per_ip: u32,
}

impl DownstreamConfig {
    pub fn from_file(file: &Path, f: FileDownstream) -> Result<DownstreamConfig, ConfigError> {
        for (key, ms) in [
            ("downstream.read_timeout_ms", f.read_timeout_ms),
            ("downstream.body_timeout_ms", f.body_timeout_ms),
            ("downstream.header_timeout_ms", f.header_timeout_ms),
        ] {
            if !(100..=3_600_000).contains(&ms) {
                return Err(ConfigError::new(file, key, "must be 100 to 3600000 ms"));
            }
        }
        if !(1024..=1_048_575).contains(&f.header_limit_bytes) {
            return Err(ConfigError::new(
                file,
                "downstream.header_limit_bytes",
                "must be 1024 to 1048575 (pingora's own limit)",
            ));
        }
        if f.max_connections_per_ip == 0 {
            return Err(ConfigError::new(
                file,
                "downstream.max_connections_per_ip",
                "must be at least 1",
            ));
        }
        Ok(DownstreamConfig {
            read_timeout: Duration::from_millis(f.read_timeout_ms),
            body_timeout: Duration::from_millis(f.body_timeout_ms),
            header_limit_bytes: f.header_limit_bytes,
            header_timeout: Duration::from_millis(f.header_timeout_ms),
            max_connections_per_ip: f.max_connections_per_ip,
        })
    }
}

impl Default for DownstreamConfig {
    fn default() -> Self {
        DownstreamConfig::from_file(Path::new("(defaults)"), FileDownstream::default())
            .expect("the default downstream limits are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<LimitsConfig, ConfigError> {
        let f: FileLimits = serde_yaml::from_str(yaml)
            .map_err(|e| crate::config::yaml_error(Path::new("t.yaml"), e))?;
        LimitsConfig::from_file(Path::new("t.yaml"), f)
    }

    #[test]
    fn defaults_lock_out_and_limit_nothing_else() {
        let d = LimitsConfig::default();
        assert!(d.source_ip.is_none() && d.account_parts.is_none() && d.upstream_parts.is_none());
        let l = d.auth_lockout.unwrap();
        assert_eq!(l.policy.failures, 10);
        assert_eq!(l.mode, RuleMode::Enforce);
    }

    #[test]
    fn rules_parse_with_overrides_and_modes() {
        let c = parse(
            "source_ip: { requests_per_s: 5, burst: 10, mode: shadow }\n\
             account_parts: { parts_per_s: 2, burst: 4, overrides: { bulk: { parts_per_s: 100, burst: 1000 } } }\n\
             upstream_parts: { parts_per_s: 0.5, burst: 1 }\n\
             auth_lockout: { failures: 1, window_s: 1, lock_s: 1, mode: off }\n",
        )
        .unwrap();
        let ip = c.source_ip.unwrap();
        assert_eq!((ip.rate, ip.mode), (Rate::new(5.0, 10), RuleMode::Shadow));
        let a = c.account_parts.unwrap();
        assert_eq!(a.rate_for("john"), Some(Rate::new(2.0, 4)));
        assert_eq!(a.rate_for("bulk"), Some(Rate::new(100.0, 1000)));
        assert_eq!(c.upstream_parts.unwrap().rate.interval_ns, 2 * NANOS_PER_S);
        assert!(c.auth_lockout.is_none());
        // Only overrides: other accounts unlimited.
        let c =
            parse("account_parts: { overrides: { bulk: { parts_per_s: 1, burst: 1 } } }").unwrap();
        assert_eq!(c.account_parts.unwrap().rate_for("john"), None);
    }

    #[test]
    fn bad_values_name_the_key() {
        for (yaml, key) in [
            (
                "source_ip: { requests_per_s: 0, burst: 1 }",
                "limits.source_ip.requests_per_s",
            ),
            (
                "source_ip: { requests_per_s: 1, burst: 0 }",
                "limits.source_ip.burst",
            ),
            (
                "upstream_parts: { parts_per_s: .nan, burst: 1 }",
                "limits.upstream_parts.parts_per_s",
            ),
            (
                "auth_lockout: { failures: 0, window_s: 1, lock_s: 1 }",
                "limits.auth_lockout.failures",
            ),
            (
                "auth_lockout: { failures: 1, window_s: 0, lock_s: 1 }",
                "limits.auth_lockout.window_s",
            ),
            ("account_parts: { parts_per_s: 1 }", "limits.account_parts"),
            (
                "concurrent_per_ip: { max: 0 }",
                "limits.concurrent_per_ip.max",
            ),
            ("max_keys_per_rule: 0", "limits.max_keys_per_rule"),
        ] {
            let e = parse(yaml).unwrap_err();
            assert_eq!(e.key, key, "{yaml}: {e}");
        }
        let e = parse("source_ip: { requests_per_s: 1, burst: 1, bogus: 1 }").unwrap_err();
        assert!(e.problem.contains("bogus"), "{e}");
    }
}
