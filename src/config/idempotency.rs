//! The `idempotency:` section of `conf/tollgate.yaml`: the file struct
//! (unknown keys rejected, defaults filled in), validated into
//! [`IdempotencyConfig`], which `crate::idempotency` opens its key table
//! with. Value types only: this module never opens the key file.
//!
//! ```yaml
//! idempotency:
//!   ttl_s: 86400        # at least 24 h (SPEC 3.4)
//!   max_keys: 1000000
//!   wait_ms: 35000
//!   path: keys.db       # default: next to store.path
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// Shortest accepted `idempotency.ttl_s` (SPEC 3.4: keys live ≥ 24 h).
pub const TTL_MIN_S: u64 = 86_400;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIdempotency {
    #[serde(default = "default_ttl_s")]
    ttl_s: u64,
    #[serde(default = "default_max_keys")]
    max_keys: usize,
    #[serde(default = "default_wait_ms")]
    wait_ms: u64,
    #[serde(default)]
    path: Option<String>,
}

impl Default for FileIdempotency {
    fn default() -> Self {
        FileIdempotency {
            ttl_s: default_ttl_s(),
            max_keys: default_max_keys(),
            wait_ms: default_wait_ms(),
            path: None,
        }
    }
}

fn default_ttl_s() -> u64 {
    TTL_MIN_S
}
fn default_max_keys() -> usize {
    1_000_000
}
fn default_wait_ms() -> u64 {
    35_000
}

#[derive(Debug, Clone)]
pub struct IdempotencyConfig {
    pub ttl: Duration,
    pub max_keys: usize,
    /// How long a retry waits for the first request with its key.
    pub wait: Duration,
    /// The key file; `None` → in memory (when there is no ledger store).
    pub path: Option<PathBuf>,
}

impl IdempotencyConfig {
    /// `store_path` is the ledger store's (`store.path`): the key file
    /// defaults to its sibling `<stem>.idempotency.db`.
    pub fn from_file(
        file: &Path,
        f: FileIdempotency,
        store_path: Option<&Path>,
    ) -> Result<IdempotencyConfig, ConfigError> {
        if !(TTL_MIN_S..=30 * 86_400).contains(&f.ttl_s) {
            return Err(ConfigError::new(
                file,
                "idempotency.ttl_s",
                format!("must be {TTL_MIN_S} (24 h, SPEC 3.4) to 2592000 seconds"),
            ));
        }
        if !(1..=100_000_000).contains(&f.max_keys) {
            return Err(ConfigError::new(
                file,
                "idempotency.max_keys",
                "must be 1 to 100000000",
            ));
        }
        if !(100..=600_000).contains(&f.wait_ms) {
            return Err(ConfigError::new(
                file,
                "idempotency.wait_ms",
                "must be 100 to 600000 ms",
            ));
        }
        let path = match (f.path, store_path) {
            (Some(p), _) => Some(crate::config::resolve_relative(file, &p)),
            (None, Some(store)) => Some(sibling_path(store)),
            (None, None) => None,
        };
        Ok(IdempotencyConfig {
            ttl: Duration::from_secs(f.ttl_s),
            max_keys: f.max_keys,
            wait: Duration::from_millis(f.wait_ms),
            path,
        })
    }
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig::from_file(Path::new("(defaults)"), FileIdempotency::default(), None)
            .expect("the default idempotency settings are valid")
    }
}

/// `dir/tollgate.db` → `dir/tollgate.idempotency.db`.
fn sibling_path(store: &Path) -> PathBuf {
    let stem = store
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tollgate".into());
    store.with_file_name(format!("{stem}.idempotency.db"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_file_defaults_to_the_stores_sibling() {
        assert_eq!(
            sibling_path(Path::new("/var/lib/tollgate.db")),
            Path::new("/var/lib/tollgate.idempotency.db")
        );
    }
}
