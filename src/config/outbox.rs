//! The `outbox` section: where the durable outbox lives and how its relay
//! retries (`outbox.*`; the runtime is `crate::outbox`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOutbox {
    #[serde(default)]
    path: Option<String>,
    #[serde(default = "default_retry_initial_ms")]
    retry_initial_ms: u64,
    #[serde(default = "default_retry_max_ms")]
    retry_max_ms: u64,
    #[serde(default = "default_give_up_after_s")]
    give_up_after_s: u64,
    #[serde(default = "default_request_timeout_ms")]
    request_timeout_ms: u64,
    #[serde(default = "default_concurrency")]
    concurrency: usize,
    #[serde(default = "default_max_pending")]
    max_pending: usize,
    #[serde(default = "default_done_retention_s")]
    done_retention_s: u64,
    /// PEM CA certificates `https://` relay targets are verified against
    /// (unset: the system's trust store).
    #[serde(default)]
    ca_file: Option<String>,
}

impl Default for FileOutbox {
    fn default() -> Self {
        FileOutbox {
            path: None,
            retry_initial_ms: default_retry_initial_ms(),
            retry_max_ms: default_retry_max_ms(),
            give_up_after_s: default_give_up_after_s(),
            request_timeout_ms: default_request_timeout_ms(),
            concurrency: default_concurrency(),
            max_pending: default_max_pending(),
            done_retention_s: default_done_retention_s(),
            ca_file: None,
        }
    }
}

fn default_retry_initial_ms() -> u64 {
    1_000
}
fn default_retry_max_ms() -> u64 {
    300_000
}
fn default_give_up_after_s() -> u64 {
    86_400
}
fn default_request_timeout_ms() -> u64 {
    5_000
}
fn default_concurrency() -> usize {
    16
}
fn default_max_pending() -> usize {
    1_000_000
}
fn default_done_retention_s() -> u64 {
    7 * 86_400
}

/// The validated `outbox:` section.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// The outbox file; `None` → the PostgreSQL store's database (with
    /// `store.url`) or memory (no store).
    pub path: Option<PathBuf>,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub give_up_after: Duration,
    pub request_timeout: Duration,
    /// Calls in flight at once.
    pub concurrency: usize,
    pub max_pending: usize,
    pub done_retention: Duration,
    /// `outbox.ca_file`: the CAs of `https://` targets (`None`: the
    /// system's trust store).
    pub ca_file: Option<PathBuf>,
}

impl OutboxConfig {
    /// `store_path` is the ledger store's: the outbox file defaults to its
    /// sibling `<stem>.outbox.db`.
    pub fn from_file(
        file: &Path,
        f: FileOutbox,
        store_path: Option<&Path>,
    ) -> Result<OutboxConfig, ConfigError> {
        let range = |key: &str, value: u64, lo: u64, hi: u64, unit: &str| {
            if (lo..=hi).contains(&value) {
                Ok(())
            } else {
                Err(ConfigError::new(
                    file,
                    key,
                    format!("must be {lo} to {hi} {unit}"),
                ))
            }
        };
        range(
            "outbox.retry_initial_ms",
            f.retry_initial_ms,
            1,
            3_600_000,
            "ms",
        )?;
        range(
            "outbox.retry_max_ms",
            f.retry_max_ms,
            f.retry_initial_ms,
            86_400_000,
            "ms (at least outbox.retry_initial_ms)",
        )?;
        range(
            "outbox.give_up_after_s",
            f.give_up_after_s,
            1,
            30 * 86_400,
            "seconds",
        )?;
        range(
            "outbox.request_timeout_ms",
            f.request_timeout_ms,
            10,
            600_000,
            "ms",
        )?;
        range("outbox.concurrency", f.concurrency as u64, 1, 1024, "calls")?;
        range(
            "outbox.max_pending",
            f.max_pending as u64,
            1,
            100_000_000,
            "items",
        )?;
        range(
            "outbox.done_retention_s",
            f.done_retention_s,
            60,
            90 * 86_400,
            "seconds",
        )?;
        let path = match (f.path, store_path) {
            (Some(p), _) => Some(crate::config::resolve_relative(file, &p)),
            (None, Some(store)) => Some(sibling_path(store)),
            (None, None) => None,
        };
        let ca_file = f.ca_file.map(|p| crate::config::resolve_relative(file, &p));
        if let Some(ca) = &ca_file {
            if !ca.is_file() {
                return Err(ConfigError::new(
                    file,
                    "outbox.ca_file",
                    format!("{} is not a readable file", ca.display()),
                ));
            }
        }
        Ok(OutboxConfig {
            path,
            ca_file,
            retry_initial: Duration::from_millis(f.retry_initial_ms),
            retry_max: Duration::from_millis(f.retry_max_ms),
            give_up_after: Duration::from_secs(f.give_up_after_s),
            request_timeout: Duration::from_millis(f.request_timeout_ms),
            concurrency: f.concurrency,
            max_pending: f.max_pending,
            done_retention: Duration::from_secs(f.done_retention_s),
        })
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig::from_file(Path::new("(defaults)"), FileOutbox::default(), None)
            .expect("the default outbox settings are valid")
    }
}

/// `dir/tollgate.db` → `dir/tollgate.outbox.db`.
fn sibling_path(store: &Path) -> PathBuf {
    let stem = store
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tollgate".into());
    store.with_file_name(format!("{stem}.outbox.db"))
}
