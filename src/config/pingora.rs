//! The `pingora:` section of `conf/tollgate.yaml`: pingora's own server
//! knobs that shape throughput and tail latency, passed to its
//! `ServerConf` as they are (`server.rs`). Every key is optional; an
//! absent key keeps pingora's default. Value types only.
//!
//! ```yaml
//! pingora:
//!   listener_tasks_per_fd: 1           # accept tasks per listening socket
//!   work_stealing: true                # false: one runtime per worker thread
//!   upstream_keepalive_pool_size: 128  # idle gateway connections kept (passthrough path)
//! ```
//!
//! What each did on the benchmark machine is in `benches/e2e/results.md`
//! (README "Performance"): none of them is a free gain on two cores.

use std::path::Path;

use serde::Deserialize;

use super::ConfigError;

/// Largest accepted `pingora.listener_tasks_per_fd`: more accept tasks on
/// one socket only contend for it.
pub const LISTENER_TASKS_MAX: usize = 64;
/// Largest accepted `pingora.upstream_keepalive_pool_size`.
pub const POOL_SIZE_MAX: usize = 65_536;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePingora {
    #[serde(default)]
    listener_tasks_per_fd: Option<usize>,
    #[serde(default)]
    work_stealing: Option<bool>,
    #[serde(default)]
    upstream_keepalive_pool_size: Option<usize>,
}

/// pingora's server knobs; `None` keeps pingora's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PingoraConfig {
    /// Accept tasks per listening socket (pingora default 1).
    pub listener_tasks_per_fd: Option<usize>,
    /// Work-stealing runtime (pingora default `true`); `false` runs one
    /// single-threaded runtime per worker thread.
    pub work_stealing: Option<bool>,
    /// Idle upstream connections pingora's own proxy path (passthrough,
    /// streamed requests) keeps for reuse (pingora default 128).
    pub upstream_keepalive_pool_size: Option<usize>,
}

impl PingoraConfig {
    pub fn from_file(file: &Path, f: FilePingora) -> Result<PingoraConfig, ConfigError> {
        if let Some(n) = f.listener_tasks_per_fd {
            if !(1..=LISTENER_TASKS_MAX).contains(&n) {
                return Err(ConfigError::new(
                    file,
                    "pingora.listener_tasks_per_fd",
                    format!("must be 1 to {LISTENER_TASKS_MAX}"),
                ));
            }
        }
        if let Some(n) = f.upstream_keepalive_pool_size {
            if !(1..=POOL_SIZE_MAX).contains(&n) {
                return Err(ConfigError::new(
                    file,
                    "pingora.upstream_keepalive_pool_size",
                    format!("must be 1 to {POOL_SIZE_MAX}"),
                ));
            }
        }
        Ok(PingoraConfig {
            listener_tasks_per_fd: f.listener_tasks_per_fd,
            work_stealing: f.work_stealing,
            upstream_keepalive_pool_size: f.upstream_keepalive_pool_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<PingoraConfig, ConfigError> {
        let f: FilePingora = serde_yaml::from_str(yaml).expect("yaml");
        PingoraConfig::from_file(Path::new("t.yaml"), f)
    }

    #[test]
    fn absent_keys_keep_pingoras_defaults() {
        assert_eq!(parse("{}").unwrap(), PingoraConfig::default());
    }

    #[test]
    fn values_are_taken_as_given() {
        let c = parse(
            "listener_tasks_per_fd: 4\nwork_stealing: false\nupstream_keepalive_pool_size: 512\n",
        )
        .unwrap();
        assert_eq!(c.listener_tasks_per_fd, Some(4));
        assert_eq!(c.work_stealing, Some(false));
        assert_eq!(c.upstream_keepalive_pool_size, Some(512));
    }

    #[test]
    fn out_of_range_values_are_refused_naming_the_key() {
        for (yaml, key) in [
            ("listener_tasks_per_fd: 0", "pingora.listener_tasks_per_fd"),
            ("listener_tasks_per_fd: 65", "pingora.listener_tasks_per_fd"),
            (
                "upstream_keepalive_pool_size: 0",
                "pingora.upstream_keepalive_pool_size",
            ),
        ] {
            let e = parse(yaml).unwrap_err();
            assert_eq!(e.key, key, "{yaml}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(serde_yaml::from_str::<FilePingora>("threads: 2").is_err());
    }
}
