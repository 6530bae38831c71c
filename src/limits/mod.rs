//! Rate limiting and protection (SPEC 7): per-source-IP request rate and
//! concurrency, per (IP, username) authentication-failure lockout,
//! per-account send rate in parts per second, and a global upstream cap in
//! parts per second.
//!
//! Owns the limiter *state* ([`Limiter`], one per process, kept in `App`
//! outside the snapshot so it survives hot reloads) and the limit
//! *settings* ([`LimitsConfig`], part of the hot-reloaded snapshot: a
//! reload changes rates, never resets counters). It never touches a balance
//! and never talks to the gateway; callers refuse with HTTP 429 and
//! `Retry-After` when a check returns a [`Refusal`].
//!
//! Where each check sits in a request:
//! 1. `concurrent_per_ip` and `source_ip`: first thing in `request_filter`,
//!    before the body is parsed or any credential is looked at;
//! 2. `auth_lockout`: before the password check (so a locked pair costs no
//!    argon2 run and no gateway verification), failures recorded after it;
//! 3. `account_parts` then `upstream_parts`: after pricing, before the
//!    reservation, so a refused send reserved nothing. If the upstream cap
//!    refuses, the account's parts are given back; if the reservation then
//!    fails, both are given back ([`SendPermit::refund`]).
//!
//! Shadow mode: a rule in `mode: shadow` (or every rule while the snapshot
//! runs `mode: shadow`) counts `shadow_limited` and lets the request
//! through; its state evolves exactly as if it enforced (a request over the
//! limit consumes nothing), so the shadow count is what enforce would
//! refuse.
//!
//! Memory: every table is bounded by `limits.max_keys_per_rule` and swept
//! once a second by [`Limiter::sweep`]; see `gcra` and `lockout` for what
//! happens when a table is full. IPv6 clients are keyed by their /64 (one
//! subscriber's allocation), IPv4 by address.

/// The `limits:` and `downstream:` configuration (it lives in `config`).
pub use crate::config::limits as config;
pub mod gcra;
pub mod lockout;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use dashmap::DashMap;

pub use config::{DownstreamConfig, LimitsConfig, RuleMode};
pub use gcra::{retry_after_s, KeyedGcra, Rate, Verdict};
pub use lockout::{Lockout, LockoutPolicy};

use prometheus::IntCounter;

use crate::metrics::Metrics;

/// The limiter rules, as named in `tollgate_rate_limit_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    // The discriminants index `Decisions`: keep them in this order.
    AccountParts,
    SourceIp,
    SourceIpConcurrent,
    AuthLockout,
    UpstreamParts,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::AccountParts => "account_parts",
            Rule::SourceIp => "source_ip",
            Rule::SourceIpConcurrent => "source_ip_concurrent",
            Rule::AuthLockout => "auth_lockout",
            Rule::UpstreamParts => "upstream_parts",
        }
    }
}

/// A request refused by a limit: answer HTTP 429 with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub rule: Rule,
    /// Whole seconds, rounded up, at least 1.
    pub retry_after_s: u64,
}

pub use crate::clock::{Clock, ManualClock, SystemClock};

/// A source address as a limiter key: IPv4 (also IPv4-mapped IPv6) by
/// address, IPv6 by its /64 prefix. Two `u64`s rather than a `u128`, so a
/// table slot is 24 bytes, not 32 (`u128` is 16-byte aligned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpKey(u64, u64);

impl IpKey {
    pub fn of(ip: IpAddr) -> IpKey {
        let bits = match ip {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => u128::from(v4.to_ipv6_mapped()),
                None => u128::from(v6) & !((1u128 << 64) - 1),
            },
        };
        IpKey((bits >> 64) as u64, bits as u64)
    }
}

/// Requests in progress per source IP (the `concurrent_per_ip` rule).
///
/// pingora 0.9.1 has no hook when a downstream connection closes (its
/// optional `connection_filter` sees accepts only), so this counts requests
/// being processed, from `request_filter` until the request's context is
/// dropped after logging. With HTTP/1.1 a connection carries one request at
/// a time, so this is the number of *busy* connections per IP; idle
/// keep-alive connections are not counted (they cost a socket and a small
/// buffer until pingora's keep-alive timeout closes them).
#[derive(Default)]
pub struct ActiveRequests {
    counts: DashMap<IpKey, u32>,
}

/// Holds one request's place in [`ActiveRequests`]; leaving on drop.
pub struct ActiveGuard {
    table: Arc<ActiveRequests>,
    key: IpKey,
}

impl ActiveRequests {
    /// Takes a place for `key` unless it already has `max`; `Err(n)` with
    /// the number in progress when refused.
    pub fn enter(self: &Arc<Self>, key: IpKey, max: u32) -> Result<ActiveGuard, u32> {
        // Short critical section: one counter under its shard's lock.
        let mut n = self.counts.entry(key).or_insert(0);
        if *n >= max {
            let current = *n;
            return Err(current);
        }
        *n += 1;
        Ok(ActiveGuard {
            table: self.clone(),
            key,
        })
    }

    pub fn in_progress(&self, key: IpKey) -> u32 {
        self.counts.get(&key).map_or(0, |n| *n)
    }

    /// IPs with requests in progress (entries at 0 are removed).
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

impl std::fmt::Debug for ActiveGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveGuard").finish_non_exhaustive()
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(mut n) = self.table.counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
        }
        self.table.counts.remove_if(&self.key, |_, n| *n == 0);
    }
}

/// Credit taken from the send limits by an allowed send; give it back with
/// [`SendPermit::refund`] if the send is refused after all.
#[derive(Debug, Default)]
#[must_use = "refund the permit if the send does not go ahead"]
pub struct SendPermit {
    account: Option<(String, Rate, u64)>,
    upstream: Option<(Rate, u64)>,
}

impl SendPermit {
    /// Gives the parts back (once: a second call does nothing).
    pub fn refund(&mut self, limiter: &Limiter) {
        if let Some((account, rate, cost)) = self.account.take() {
            limiter.accounts.refund(&account, cost, rate);
        }
        if let Some((rate, cost)) = self.upstream.take() {
            gcra::refund(&limiter.upstream, cost, rate);
        }
    }
}

/// What one sweep removed (for the log and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub source_ips: usize,
    pub accounts: usize,
    pub lockouts: usize,
}

/// The limiter state of the process. Rates come from the snapshot's
/// [`LimitsConfig`] on every call.
pub struct Limiter {
    /// Reads `monotonic_ns` (the crate's one clock, see `crate::clock`).
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    decisions: Decisions,
    source_ips: KeyedGcra<IpKey>,
    accounts: KeyedGcra<String>,
    /// The global upstream cap: one cell.
    upstream: AtomicU64,
    /// Keyed by (IP, a keyed hash of the username): a flood of invented
    /// usernames costs 24 bytes of key each, never their length.
    lockouts: Lockout<(IpKey, u64)>,
    active: Arc<ActiveRequests>,
    username_hasher: RandomState,
}

/// Decides `limited` under `mode`, counting the decision: `Err` only when
/// the rule enforces.
fn record(
    decisions: &Decisions,
    rule: Rule,
    mode: RuleMode,
    shadow_all: bool,
    limited: Option<u64>,
) -> Result<(), Refusal> {
    let shadow = shadow_all || mode == RuleMode::Shadow;
    let result = match (limited, shadow) {
        (None, _) => 0,
        (Some(_), false) => 1,
        (Some(_), true) => 2,
    };
    decisions.0[rule as usize][result].inc();
    match limited {
        Some(ns) if !shadow => Err(Refusal {
            rule,
            retry_after_s: retry_after_s(ns),
        }),
        _ => Ok(()),
    }
}

/// `tollgate_rate_limit_decisions_total` by [`Rule`] and result (allowed,
/// limited, shadow_limited), looked up once: a label lookup on every
/// request would cost a hash and a lock.
struct Decisions([[IntCounter; 3]; 5]);

impl Decisions {
    fn new(metrics: &Metrics) -> Self {
        let rules = [
            Rule::AccountParts,
            Rule::SourceIp,
            Rule::SourceIpConcurrent,
            Rule::AuthLockout,
            Rule::UpstreamParts,
        ];
        Decisions(rules.map(|rule| {
            ["allowed", "limited", "shadow_limited"].map(|result| {
                metrics
                    .rate_limit_decisions
                    .with_label_values(&[rule.as_str(), result])
            })
        }))
    }
}

fn limited_ns(v: Verdict) -> Option<u64> {
    match v {
        Verdict::Allowed => None,
        Verdict::Limited { retry_after_ns } => Some(retry_after_ns),
    }
}

impl Limiter {
    pub fn new(max_keys_per_rule: usize, metrics: Arc<Metrics>) -> Self {
        Self::with_clock(max_keys_per_rule, metrics, Arc::new(SystemClock::new()))
    }

    /// Table sizes are fixed at start (`limits.max_keys_per_rule` of the
    /// first snapshot); a reload changes rates, not table bounds.
    pub fn with_clock(
        max_keys_per_rule: usize,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Limiter {
            clock,
            decisions: Decisions::new(&metrics),
            metrics,
            source_ips: KeyedGcra::new(max_keys_per_rule),
            accounts: KeyedGcra::new(max_keys_per_rule),
            upstream: AtomicU64::new(0),
            lockouts: Lockout::new(max_keys_per_rule),
            active: Arc::new(ActiveRequests::default()),
            username_hasher: RandomState::new(),
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.clock.monotonic_ns()
    }

    /// `concurrent_per_ip`: a place for this request, held until the guard
    /// drops. `Ok(None)` when the rule is off, the IP unknown, or the rule
    /// only shadows.
    pub fn enter_request(
        &self,
        cfg: &LimitsConfig,
        ip: Option<IpAddr>,
        shadow_all: bool,
    ) -> Result<Option<ActiveGuard>, Refusal> {
        let (Some(rule), Some(ip)) = (cfg.concurrent_per_ip, ip) else {
            return Ok(None);
        };
        match self.active.enter(IpKey::of(ip), rule.max) {
            Ok(guard) => {
                record(
                    &self.decisions,
                    Rule::SourceIpConcurrent,
                    rule.mode,
                    shadow_all,
                    None,
                )?;
                Ok(Some(guard))
            }
            Err(_) => {
                // No rate to wait for: the next free place comes when a
                // request ends, so 1 s.
                record(
                    &self.decisions,
                    Rule::SourceIpConcurrent,
                    rule.mode,
                    shadow_all,
                    Some(gcra::NANOS_PER_S),
                )?;
                Ok(None)
            }
        }
    }

    /// `source_ip`: one request from `ip`.
    pub fn check_source_ip(
        &self,
        cfg: &LimitsConfig,
        ip: Option<IpAddr>,
        shadow_all: bool,
    ) -> Result<(), Refusal> {
        let (Some(rule), Some(ip)) = (cfg.source_ip, ip) else {
            return Ok(());
        };
        let v = self
            .source_ips
            .check(&IpKey::of(ip), 1, rule.rate, self.now_ns());
        record(
            &self.decisions,
            Rule::SourceIp,
            rule.mode,
            shadow_all,
            limited_ns(v),
        )
    }

    fn lockout_key(&self, ip: Option<IpAddr>, username: &str) -> (IpKey, u64) {
        (
            IpKey::of(ip.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))),
            self.username_hasher.hash_one(username),
        )
    }

    /// `auth_lockout`, before a password check: refused while the pair is
    /// locked.
    pub fn check_lockout(
        &self,
        cfg: &LimitsConfig,
        ip: Option<IpAddr>,
        username: &str,
        shadow_all: bool,
    ) -> Result<(), Refusal> {
        let Some(rule) = cfg.auth_lockout else {
            return Ok(());
        };
        let locked = self
            .lockouts
            .locked_for(&self.lockout_key(ip, username), self.now_ns());
        record(
            &self.decisions,
            Rule::AuthLockout,
            rule.mode,
            shadow_all,
            locked,
        )
    }

    /// After a failed password check. Returns whether the pair is locked now.
    pub fn auth_failed(&self, cfg: &LimitsConfig, ip: Option<IpAddr>, username: &str) -> bool {
        let Some(rule) = cfg.auth_lockout else {
            return false;
        };
        let locked = self.lockouts.record_failure(
            &self.lockout_key(ip, username),
            rule.policy,
            self.now_ns(),
        );
        if locked.is_some() {
            // The username is client data: logged as given is a risk
            // (it could be a mistyped password); log its length only.
            tracing::warn!(
                client = ?ip,
                username_len = username.len(),
                lock_s = rule.policy.lock_ns / gcra::NANOS_PER_S,
                "authentication failures: locking this client and username"
            );
        }
        locked.is_some()
    }

    /// After a successful password check: forgets the pair's failures.
    pub fn auth_succeeded(&self, ip: Option<IpAddr>, username: &str) {
        if !self.lockouts.is_empty() {
            self.lockouts
                .record_success(&self.lockout_key(ip, username), self.now_ns());
        }
    }

    /// `account_parts` then `upstream_parts` for a send of `parts` parts
    /// (after pricing, before reserving). `account` = `None` for an
    /// uncharged send (unknown credentials forwarded): only the upstream
    /// cap applies.
    pub fn check_send(
        &self,
        cfg: &LimitsConfig,
        account: Option<&str>,
        parts: u64,
        shadow_all: bool,
    ) -> Result<SendPermit, Refusal> {
        let now = self.now_ns();
        let mut permit = SendPermit::default();
        if let (Some(rule), Some(account)) = (&cfg.account_parts, account) {
            if let Some(rate) = rule.rate_for(account) {
                let v = self.accounts.check(&account.to_string(), parts, rate, now);
                record(
                    &self.decisions,
                    Rule::AccountParts,
                    rule.mode,
                    shadow_all,
                    limited_ns(v),
                )?;
                if v.is_allowed() {
                    permit.account = Some((account.to_string(), rate, parts));
                }
            }
        }
        if let Some(rule) = cfg.upstream_parts {
            let v = gcra::apply(&self.upstream, parts, rule.rate, now);
            if let Err(refusal) = record(
                &self.decisions,
                Rule::UpstreamParts,
                rule.mode,
                shadow_all,
                limited_ns(v),
            ) {
                permit.refund(self);
                return Err(refusal);
            }
            if v.is_allowed() {
                permit.upstream = Some((rule.rate, parts));
            }
        }
        Ok(permit)
    }

    /// Evicts idle keys from every table (lossless for rates, see `gcra`)
    /// and refreshes the key-count gauges. Call about once a second.
    pub fn sweep(&self) -> Swept {
        let now = self.now_ns();
        let swept = Swept {
            source_ips: self.source_ips.evict_idle(now),
            accounts: self.accounts.evict_idle(now),
            lockouts: self.lockouts.evict_expired(now),
        };
        let m = &self.metrics.rate_limit_keys;
        m.with_label_values(&[Rule::SourceIp.as_str()])
            .set(self.source_ips.len() as i64);
        m.with_label_values(&[Rule::AccountParts.as_str()])
            .set(self.accounts.len() as i64);
        m.with_label_values(&[Rule::AuthLockout.as_str()])
            .set(self.lockouts.len() as i64);
        m.with_label_values(&[Rule::SourceIpConcurrent.as_str()])
            .set(self.active.len() as i64);
        swept
    }

    /// Keys each table holds now: (source IPs, accounts, lockouts, IPs
    /// with requests in progress).
    pub fn sizes(&self) -> (usize, usize, usize, usize) {
        (
            self.source_ips.len(),
            self.accounts.len(),
            self.lockouts.len(),
            self.active.len(),
        )
    }

    /// The source-IP table, for the memory measurement in tests.
    pub fn source_ip_table(&self) -> &KeyedGcra<IpKey> {
        &self.source_ips
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::config::{AccountPartsRule, ConcurrencyRule, LockoutRule, RateRule};
    use std::collections::HashMap;

    const S: u64 = gcra::NANOS_PER_S;

    fn limiter() -> (Limiter, Arc<ManualClock>, Arc<Metrics>) {
        let clock = Arc::new(ManualClock::new(0));
        let metrics = Arc::new(Metrics::new());
        (
            Limiter::with_clock(1000, metrics.clone(), clock.clone()),
            clock,
            metrics,
        )
    }

    fn decisions(m: &Metrics, rule: Rule, result: &str) -> u64 {
        m.rate_limit_decisions
            .with_label_values(&[rule.as_str(), result])
            .get()
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn cfg() -> LimitsConfig {
        LimitsConfig {
            max_keys_per_rule: 1000,
            source_ip: Some(RateRule {
                rate: Rate::new(1.0, 2),
                mode: RuleMode::Enforce,
            }),
            concurrent_per_ip: Some(ConcurrencyRule {
                max: 2,
                mode: RuleMode::Enforce,
            }),
            auth_lockout: Some(LockoutRule {
                policy: LockoutPolicy {
                    failures: 3,
                    window_ns: 60 * S,
                    lock_ns: 30 * S,
                },
                mode: RuleMode::Enforce,
            }),
            account_parts: Some(AccountPartsRule {
                default: Some(Rate::new(10.0, 20)),
                overrides: HashMap::from([("bulk".to_string(), Rate::new(100.0, 1000))]),
                mode: RuleMode::Enforce,
            }),
            upstream_parts: Some(RateRule {
                rate: Rate::new(50.0, 50),
                mode: RuleMode::Enforce,
            }),
        }
    }

    #[test]
    fn ip_keys_group_ipv6_by_64_and_map_ipv4() {
        let a = IpKey::of("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = IpKey::of("2001:db8:1:2:bbbb::2".parse().unwrap());
        let c = IpKey::of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            IpKey::of("10.0.0.1".parse().unwrap()),
            IpKey::of("::ffff:10.0.0.1".parse().unwrap())
        );
        assert_ne!(
            IpKey::of("10.0.0.1".parse().unwrap()),
            IpKey::of("10.0.0.2".parse().unwrap())
        );
    }

    #[test]
    fn source_ip_rate_refuses_with_retry_after_and_counts() {
        let (l, clock, m) = limiter();
        let c = cfg();
        assert!(l.check_source_ip(&c, ip("1.2.3.4"), false).is_ok());
        assert!(l.check_source_ip(&c, ip("1.2.3.4"), false).is_ok());
        let r = l.check_source_ip(&c, ip("1.2.3.4"), false).unwrap_err();
        assert_eq!(
            r,
            Refusal {
                rule: Rule::SourceIp,
                retry_after_s: 1
            }
        );
        assert!(l.check_source_ip(&c, ip("5.6.7.8"), false).is_ok());
        clock.advance_ns(S);
        assert!(l.check_source_ip(&c, ip("1.2.3.4"), false).is_ok());
        assert_eq!(decisions(&m, Rule::SourceIp, "allowed"), 4);
        assert_eq!(decisions(&m, Rule::SourceIp, "limited"), 1);
        // No IP (a Unix socket): not limited.
        for _ in 0..10 {
            assert!(l.check_source_ip(&c, None, false).is_ok());
        }
    }

    #[test]
    fn shadow_rules_count_but_let_through_and_do_not_consume() {
        let (l, _clock, m) = limiter();
        let mut c = cfg();
        c.source_ip.as_mut().unwrap().mode = RuleMode::Shadow;
        for _ in 0..5 {
            assert!(l.check_source_ip(&c, ip("1.2.3.4"), false).is_ok());
        }
        assert_eq!(decisions(&m, Rule::SourceIp, "allowed"), 2);
        assert_eq!(decisions(&m, Rule::SourceIp, "shadow_limited"), 3);
        assert_eq!(decisions(&m, Rule::SourceIp, "limited"), 0);
        // Global shadow mode overrides an enforcing rule.
        let c = cfg();
        assert!(l.check_source_ip(&c, ip("1.2.3.4"), true).is_ok());
        assert_eq!(decisions(&m, Rule::SourceIp, "shadow_limited"), 4);
    }

    #[test]
    fn lockout_refuses_a_locked_pair_only() {
        let (l, clock, m) = limiter();
        let c = cfg();
        for i in 0..3 {
            assert!(l.check_lockout(&c, ip("1.1.1.1"), "john", false).is_ok());
            assert_eq!(l.auth_failed(&c, ip("1.1.1.1"), "john"), i == 2);
        }
        let r = l
            .check_lockout(&c, ip("1.1.1.1"), "john", false)
            .unwrap_err();
        assert_eq!(
            r,
            Refusal {
                rule: Rule::AuthLockout,
                retry_after_s: 30
            }
        );
        // Another IP, another user: not locked.
        assert!(l.check_lockout(&c, ip("2.2.2.2"), "john", false).is_ok());
        assert!(l.check_lockout(&c, ip("1.1.1.1"), "jane", false).is_ok());
        clock.advance_ns(29 * S + 1);
        assert_eq!(
            l.check_lockout(&c, ip("1.1.1.1"), "john", false)
                .unwrap_err()
                .retry_after_s,
            1
        );
        clock.advance_ns(S);
        assert!(l.check_lockout(&c, ip("1.1.1.1"), "john", false).is_ok());
        assert_eq!(decisions(&m, Rule::AuthLockout, "limited"), 2);
        // A success forgets the count.
        l.auth_failed(&c, ip("1.1.1.1"), "john");
        l.auth_failed(&c, ip("1.1.1.1"), "john");
        l.auth_succeeded(ip("1.1.1.1"), "john");
        assert!(!l.auth_failed(&c, ip("1.1.1.1"), "john"));
    }

    #[test]
    fn send_limits_use_overrides_and_refund_the_account_when_upstream_refuses() {
        let (l, clock, m) = limiter();
        let c = cfg();
        // john: 10/s burst 20.
        let p = l.check_send(&c, Some("john"), 20, false).unwrap();
        drop(p);
        let r = l.check_send(&c, Some("john"), 1, false).unwrap_err();
        assert_eq!(r.rule, Rule::AccountParts);
        // bulk: override 100/s burst 1000, but the upstream cap (50 burst)
        // has 30 left.
        let r = l.check_send(&c, Some("bulk"), 40, false).unwrap_err();
        assert_eq!(r.rule, Rule::UpstreamParts);
        assert_eq!(decisions(&m, Rule::UpstreamParts, "limited"), 1);
        // bulk's parts were given back: after the upstream refills, its
        // whole burst is there.
        clock.advance_ns(S);
        let mut p = l.check_send(&c, Some("bulk"), 50, false).unwrap();
        // The reservation failed: refund both.
        p.refund(&l);
        assert!(l.check_send(&c, Some("bulk"), 50, false).is_ok());
        // Uncharged sends only meet the upstream cap.
        assert_eq!(
            l.check_send(&c, None, 1, false).unwrap_err().rule,
            Rule::UpstreamParts
        );
    }

    #[test]
    fn concurrency_cap_counts_requests_in_progress() {
        let (l, _clock, m) = limiter();
        let c = cfg();
        let a = l.enter_request(&c, ip("9.9.9.9"), false).unwrap();
        let b = l.enter_request(&c, ip("9.9.9.9"), false).unwrap();
        assert!(a.is_some() && b.is_some());
        let r = l.enter_request(&c, ip("9.9.9.9"), false).unwrap_err();
        assert_eq!(r.rule, Rule::SourceIpConcurrent);
        assert!(l.enter_request(&c, ip("8.8.8.8"), false).is_ok());
        drop(a);
        let again = l.enter_request(&c, ip("9.9.9.9"), false).unwrap();
        drop((b, again));
        assert_eq!(l.sizes().3, 0, "entries at zero are removed");
        assert_eq!(decisions(&m, Rule::SourceIpConcurrent, "limited"), 1);
    }

    #[test]
    fn state_outlives_a_new_config() {
        // A reload swaps the config; the state (here: an exhausted key) is
        // the limiter's and stays.
        let (l, _clock, _m) = limiter();
        let c = cfg();
        l.check_source_ip(&c, ip("1.2.3.4"), false).unwrap();
        l.check_source_ip(&c, ip("1.2.3.4"), false).unwrap();
        let mut reloaded = cfg();
        reloaded.source_ip.as_mut().unwrap().rate = Rate::new(1.0, 3);
        assert!(l.check_source_ip(&reloaded, ip("1.2.3.4"), false).is_ok());
        assert!(l.check_source_ip(&reloaded, ip("1.2.3.4"), false).is_err());
    }

    #[test]
    fn sweep_evicts_idle_keys_and_sets_the_gauges() {
        let (l, clock, m) = limiter();
        let c = cfg();
        for i in 0..100u32 {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            l.check_source_ip(&c, Some(IpAddr::V4(a)), false).unwrap();
        }
        l.auth_failed(&c, ip("1.1.1.1"), "x");
        assert_eq!(l.sweep().source_ips, 0);
        assert_eq!(
            m.rate_limit_keys.with_label_values(&["source_ip"]).get(),
            100
        );
        clock.advance_ns(61 * S);
        let swept = l.sweep();
        assert_eq!((swept.source_ips, swept.lockouts), (100, 1));
        assert_eq!(l.sizes(), (0, 0, 0, 0));
    }

    /// A million distinct source IPs (one request each) never hold more
    /// than `max_keys_per_rule` entries, and a sweep a second later empties
    /// the table and gives its memory back.
    #[test]
    fn a_million_distinct_ips_stay_bounded_and_are_evicted() {
        let clock = Arc::new(ManualClock::new(0));
        let l = Limiter::with_clock(100_000, Arc::new(Metrics::new()), clock.clone());
        let c = LimitsConfig {
            source_ip: Some(RateRule {
                rate: Rate::new(10.0, 20),
                mode: RuleMode::Enforce,
            }),
            ..cfg()
        };
        for i in 0..1_000_000u32 {
            let a = std::net::Ipv4Addr::from(0x0b00_0000 + i);
            assert!(l.check_source_ip(&c, Some(IpAddr::V4(a)), false).is_ok());
            if i % 100_000 == 99_999 {
                // Time passes (10 µs per request: 100k requests a second).
                clock.advance_ns(S);
            }
            assert!(l.source_ip_table().len() <= 100_000);
        }
        clock.advance_ns(S);
        l.sweep();
        assert_eq!(l.source_ip_table().len(), 0);
        assert!(
            l.source_ip_table().capacity() < 10_000,
            "{}",
            l.source_ip_table().capacity()
        );
    }
}
