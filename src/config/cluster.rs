//! The `cluster:` section: several tollgate nodes on one PostgreSQL ledger
//! through credit grants (the runtime is `crate::cluster`). Value types
//! only: validated here, no socket opened. Without the section everything
//! behaves as on one node; with it, `store.url` (PostgreSQL) is required.
//!
//! ```yaml
//! cluster:
//!   node_id: node-a            # unique per node: [A-Za-z0-9._-], 1 to 64
//!   lease_ms: 3000             # the node's lease on the database's clock
//!   lease_renew_ms: 1000       # renewal interval
//!   lease_margin_ms: 1000      # stop spending this long before the lease ends
//!   grant_ttl_ms: 10000        # a dead node's grants come back after this
//!   grant_min_milli: 1000      # grant sizing: within [min, max] ...
//!   grant_max_milli: 1000000
//!   grant_target_s: 5          # ... covering this many seconds of spend
//!   top_up_below_percent: 50   # top up when free < this % of the grant
//!   direct_below_milli: 5000   # smaller accounts reserve straight in PostgreSQL
//!   grant_idle_ms: 2000        # a grant unused this long goes back to the account
//! ```

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// Longest accepted `cluster.node_id`.
pub const NODE_ID_MAX: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    node_id: String,
    #[serde(default = "default_lease_ms")]
    lease_ms: u64,
    #[serde(default = "default_lease_renew_ms")]
    lease_renew_ms: u64,
    #[serde(default = "default_lease_margin_ms")]
    lease_margin_ms: u64,
    #[serde(default = "default_grant_ttl_ms")]
    grant_ttl_ms: u64,
    #[serde(default = "default_grant_min_milli")]
    grant_min_milli: i64,
    #[serde(default = "default_grant_max_milli")]
    grant_max_milli: i64,
    #[serde(default = "default_grant_target_s")]
    grant_target_s: i64,
    #[serde(default = "default_top_up_below_percent")]
    top_up_below_percent: i64,
    #[serde(default = "default_direct_below_milli")]
    direct_below_milli: i64,
    #[serde(default = "default_grant_idle_ms")]
    grant_idle_ms: u64,
}

fn default_lease_ms() -> u64 {
    3_000
}
fn default_lease_renew_ms() -> u64 {
    1_000
}
fn default_lease_margin_ms() -> u64 {
    1_000
}
fn default_grant_ttl_ms() -> u64 {
    10_000
}
fn default_grant_min_milli() -> i64 {
    1_000
}
fn default_grant_max_milli() -> i64 {
    1_000_000
}
fn default_grant_target_s() -> i64 {
    5
}
fn default_top_up_below_percent() -> i64 {
    50
}
fn default_direct_below_milli() -> i64 {
    5_000
}
fn default_grant_idle_ms() -> u64 {
    2_000
}

/// The validated `cluster:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's name in the store's `nodes` table.
    pub node_id: String,
    pub lease: Duration,
    pub lease_renew: Duration,
    /// The node stops reserving at its last confirmed renewal's start plus
    /// the lease less this margin: before the database's expiry.
    pub lease_margin: Duration,
    pub grant_ttl: Duration,
    /// Grant sizing (`crate::cluster::sizing::Sizing` is made of these).
    pub grant_min_milli: i64,
    pub grant_max_milli: i64,
    pub grant_target_s: i64,
    pub top_up_below_percent: i64,
    pub direct_below_milli: i64,
    /// A grant not reserved from this long goes back to the account, so
    /// other nodes can spend it (stranded credit is bounded by this).
    pub grant_idle: Duration,
}

impl ClusterConfig {
    /// `statement_timeout`: the store's (`store.statement_timeout_ms`):
    /// the grant TTL must outlast a lease plus one statement, so no commit
    /// that passed its lease check can still be running when a sweeper
    /// returns the node's grants.
    pub fn from_file(
        file: &Path,
        f: FileCluster,
        statement_timeout: Duration,
    ) -> Result<ClusterConfig, ConfigError> {
        let bad = |key: &str, problem: String| Err(ConfigError::new(file, key, problem));
        if f.node_id.is_empty()
            || f.node_id.len() > NODE_ID_MAX
            || !f
                .node_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return bad(
                "cluster.node_id",
                format!(
                    "{:?} is not a node id: use 1 to {NODE_ID_MAX} of A-Z a-z 0-9 . _ -, unique per node",
                    f.node_id.chars().take(NODE_ID_MAX + 1).collect::<String>()
                ),
            );
        }
        if !(500..=600_000).contains(&f.lease_ms) {
            return bad("cluster.lease_ms", "must be 500 to 600000 ms".into());
        }
        if f.lease_margin_ms == 0 || f.lease_margin_ms >= f.lease_ms {
            return bad(
                "cluster.lease_margin_ms",
                format!(
                    "must be 1 to {} ms (below cluster.lease_ms)",
                    f.lease_ms - 1
                ),
            );
        }
        let spend_window = f.lease_ms - f.lease_margin_ms;
        if f.lease_renew_ms == 0 || f.lease_renew_ms >= spend_window {
            return bad(
                "cluster.lease_renew_ms",
                format!(
                    "must be 1 to {} ms: below cluster.lease_ms less cluster.lease_margin_ms, \
                     so a renewal lands before the node must stop spending",
                    spend_window - 1
                ),
            );
        }
        let ttl_min = f.lease_ms + statement_timeout.as_millis() as u64;
        if f.grant_ttl_ms < ttl_min || f.grant_ttl_ms > 86_400_000 {
            return bad(
                "cluster.grant_ttl_ms",
                format!(
                    "must be {ttl_min} to 86400000 ms: at least cluster.lease_ms plus \
                     store.statement_timeout_ms, so a dead node can no longer commit when its \
                     grants come back"
                ),
            );
        }
        if f.grant_min_milli < 1 || f.grant_max_milli < f.grant_min_milli {
            return bad(
                "cluster.grant_min_milli",
                "must be at least 1 and at most cluster.grant_max_milli".into(),
            );
        }
        if f.grant_max_milli > 1_000_000_000_000 {
            return bad(
                "cluster.grant_max_milli",
                "must be at most 1000000000000 (a billion credits)".into(),
            );
        }
        if !(1..=3_600).contains(&f.grant_target_s) {
            return bad("cluster.grant_target_s", "must be 1 to 3600 seconds".into());
        }
        if !(1..=99).contains(&f.top_up_below_percent) {
            return bad("cluster.top_up_below_percent", "must be 1 to 99".into());
        }
        if !(0..=f.grant_max_milli).contains(&f.direct_below_milli) {
            return bad(
                "cluster.direct_below_milli",
                "must be 0 to cluster.grant_max_milli".into(),
            );
        }
        if !(100..=3_600_000).contains(&f.grant_idle_ms) {
            return bad("cluster.grant_idle_ms", "must be 100 to 3600000 ms".into());
        }
        Ok(ClusterConfig {
            node_id: f.node_id,
            lease: Duration::from_millis(f.lease_ms),
            lease_renew: Duration::from_millis(f.lease_renew_ms),
            lease_margin: Duration::from_millis(f.lease_margin_ms),
            grant_ttl: Duration::from_millis(f.grant_ttl_ms),
            grant_min_milli: f.grant_min_milli,
            grant_max_milli: f.grant_max_milli,
            grant_target_s: f.grant_target_s,
            top_up_below_percent: f.top_up_below_percent,
            direct_below_milli: f.direct_below_milli,
            grant_idle: Duration::from_millis(f.grant_idle_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(yaml: &str) -> Result<ClusterConfig, ConfigError> {
        let f: FileCluster = serde_yaml::from_str(yaml)
            .map_err(|e| ConfigError::new(Path::new("t.yaml"), "cluster", e.to_string()))?;
        ClusterConfig::from_file(Path::new("t.yaml"), f, Duration::from_millis(5_000))
    }

    #[test]
    fn defaults_and_bounds() {
        let c = parse("node_id: node-a").unwrap();
        assert_eq!(c.lease, Duration::from_millis(3_000));
        assert_eq!(c.grant_ttl, Duration::from_millis(10_000));
        assert_eq!(c.grant_target_s, 5);
        assert_eq!(c.direct_below_milli, 5_000);
        for (yaml, key) in [
            ("node_id: ''", "cluster.node_id"),
            ("node_id: 'a b'", "cluster.node_id"),
            ("node_id: a\nlease_ms: 100", "cluster.lease_ms"),
            (
                "node_id: a\nlease_margin_ms: 3000",
                "cluster.lease_margin_ms",
            ),
            ("node_id: a\nlease_renew_ms: 2000", "cluster.lease_renew_ms"),
            ("node_id: a\ngrant_ttl_ms: 7999", "cluster.grant_ttl_ms"),
            ("node_id: a\ngrant_min_milli: 0", "cluster.grant_min_milli"),
            (
                "node_id: a\ngrant_min_milli: 10\ngrant_max_milli: 9",
                "cluster.grant_min_milli",
            ),
            ("node_id: a\ngrant_target_s: 0", "cluster.grant_target_s"),
            (
                "node_id: a\ntop_up_below_percent: 100",
                "cluster.top_up_below_percent",
            ),
            (
                "node_id: a\ndirect_below_milli: -1",
                "cluster.direct_below_milli",
            ),
            ("node_id: a\ngrant_idle_ms: 50", "cluster.grant_idle_ms"),
        ] {
            let e = parse(yaml).unwrap_err();
            assert_eq!(e.key, key, "{yaml}: {e}");
        }
        let e = parse("node_id: a\nnode: b").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    proptest! {
        #[test]
        fn any_node_id_is_accepted_or_refused_with_a_bounded_message(id in ".{0,200}") {
            let yaml = format!("node_id: {}", serde_json::to_string(&id).unwrap());
            match parse(&yaml) {
                Ok(c) => prop_assert!(c.node_id.len() <= NODE_ID_MAX && !c.node_id.is_empty()),
                Err(e) => prop_assert!(e.to_string().len() < 400),
            }
        }
    }
}
