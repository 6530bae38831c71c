//! Every metric tollgate exports, in one place (SPEC 8).
//!
//! Names carry the `tollgate_` prefix and every family has help text. Label
//! values come from closed sets (front door, action, outcome, bucket, entry
//! kind, limiter rule, reload result) so cardinality stays bounded; the only
//! per-account series are the balance gauges of the accounts an operator
//! listed in `metrics.balance_accounts`. Nothing here ever carries a
//! password, a token or a free-form client string.
//!
//! Credit amounts are exported in **milli-credits** (1 credit = 1000), the
//! ledger's own integer unit, so a counter is exactly the sum of the entries
//! it counts; dashboards divide by 1000 to show credits.
//!
//! Families with label sets that may see no traffic for a long time (credit
//! kinds per bucket, limiter decisions, reload results, shadow decisions)
//! are initialised to 0 for every label combination, so a dashboard shows a
//! flat line rather than "no data".
//!
//! Gauges that describe the ledger (reservations, accounts, watched
//! balances) are computed at scrape time by [`Metrics::observe_ledger`]; a
//! scrape walks the reservation map once, one shard lock at a time, so the
//! numbers are consistent per reservation but not one global snapshot.
//!
//! The standard `process_*` families (resident memory, file descriptors,
//! CPU seconds, start time; Linux only) come from the `prometheus` crate's
//! process collector, read from `/proc/self` at scrape time: they are the
//! only names without the prefix, so the usual dashboards and alerts for
//! any Prometheus target work on tollgate too.

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::ledger::{Bucket, EntryKind, Ledger, ReservationState};

/// Limiter rules of SPEC 7, the `rule` label of
/// `tollgate_rate_limit_decisions_total`.
pub const RATE_LIMIT_RULES: [&str; 5] = [
    // Per-account send rate in parts per second.
    "account_parts",
    // Per-source-IP request rate.
    "source_ip",
    // Per-source-IP requests in progress (the connection cap).
    "source_ip_concurrent",
    // Per (IP, username) authentication-failure lockout.
    "auth_lockout",
    // Global upstream cap in parts per second.
    "upstream_parts",
];

/// The `result` label of `tollgate_rate_limit_decisions_total`: allowed,
/// refused (429), or over the limit but let through because the rule runs
/// in shadow mode.
pub const RATE_LIMIT_RESULTS: [&str; 3] = ["allowed", "limited", "shadow_limited"];

/// The `reason` label of `tollgate_upstream_answers_lost_total`: the
/// labels of `upstream::Lost` (a test there keeps the two the same).
pub const LOST_ANSWER_REASONS: [&str; 5] =
    ["reset", "timeout", "closed", "unparseable", "too_large"];

/// The `result` label of `tollgate_upstream_verifications_total`: the
/// gateway confirmed the credentials; refused them; could not be asked;
/// or the same wrong credentials were refused from the negative cache
/// without asking (drop-in authentication, SPEC 5.3).
pub const VERIFICATION_RESULTS: [&str; 4] =
    ["verified", "rejected", "unavailable", "cached_rejection"];

/// The `result` label of `tollgate_tariff_reloads_total`.
pub const RELOAD_RESULTS: [&str; 2] = ["ok", "error"];

/// The `decision` label of `tollgate_shadow_decisions_total`.
pub const SHADOW_DECISIONS: [&str; 2] = ["would_charge", "would_refuse"];

/// The `result` label of `tollgate_received_messages_total`: charged in
/// full; delivered with a charge that fell short (strict overdraft, see
/// `tollgate_receive_shortfall_milli_total`); counted but not charged
/// (shadow mode).
pub const RECEIVE_RESULTS: [&str; 3] = ["charged", "shortfall", "shadow"];

/// The standard process families /metrics also serves (Linux only): the
/// only names without the `tollgate_` prefix.
pub const PROCESS_FAMILIES: [&str; 7] = [
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
];

/// The `direction` label of `tollgate_credits_milli_total`: which way an
/// entry moved money for its account. add, set and transfer entries are
/// signed (a negative `addcredits`, a transfer's paying side are debits);
/// the two-phase kinds (reserve, post, void, expire) always move one way,
/// which their kind says.
pub fn credit_direction(kind: EntryKind, amount_milli: i64) -> &'static str {
    match kind {
        EntryKind::Add | EntryKind::Set | EntryKind::Transfer if amount_milli < 0 => "debit",
        EntryKind::Add | EntryKind::Set | EntryKind::Transfer => "credit",
        EntryKind::Refund => "credit",
        _ => "none",
    }
}

/// Buckets of the latency histograms, in seconds: sub-millisecond local
/// answers up to the gateway's slowest answers.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    pub registry: Registry,
    /// `tollgate_build_info{version}`: always 1; says which build runs.
    pub build_info: IntGaugeVec,
    /// Requests by front door, action and outcome.
    pub requests: IntCounterVec,
    /// Milli-credits moved by ledger entries, by entry kind and bucket
    /// (absolute amounts: an `add` of −5 counts 5000).
    pub credits_milli: IntCounterVec,
    pub reservations_open: IntGauge,
    pub reservations_in_doubt: IntGauge,
    /// Credit held by unresolved reservations, by state (`open`,
    /// `in_doubt`): what an operator's decision on them is worth.
    pub reservations_held_milli: IntGaugeVec,
    /// Sends forwarded without charge because the credentials were unknown
    /// and `auth.unknown_accounts: forward`.
    pub unknown_forwarded: IntCounterVec,
    /// What shadow mode would have done.
    pub shadow_decisions: IntCounterVec,
    /// Messages handed out by priced `receivemessage` answers, by result.
    pub received_messages: IntCounterVec,
    /// Receive charges that could not be taken because the account had
    /// too little credit (the gateway had already delivered the messages).
    pub receive_shortfall_milli: IntCounter,
    /// Limiter decisions by rule and result (SPEC 7).
    pub rate_limit_decisions: IntCounterVec,
    /// Keys each limiter table holds (bounded by
    /// `limits.max_keys_per_rule`), refreshed by the sweep.
    pub rate_limit_keys: IntGaugeVec,
    /// Drop-in credential checks against the gateway, by result.
    pub upstream_verifications: IntCounterVec,
    pub upstream_latency: HistogramVec,
    pub request_latency: HistogramVec,
    /// Whether the last readiness probe could connect to the gateway.
    pub upstream_up: IntGauge,
    pub accounts: IntGauge,
    /// `tollgate_tariff_info{version}`: 1 for the version in force, no other
    /// series (a reload replaces it).
    pub tariff_info: IntGaugeVec,
    pub tariff_reloads: IntCounterVec,
    pub tariff_loaded_timestamp_s: IntGauge,
    /// Available balance of each account in `metrics.balance_accounts`.
    pub account_available_milli: IntGaugeVec,
    /// Reserved balance of each account in `metrics.balance_accounts`.
    pub account_reserved_milli: IntGaugeVec,
    /// Ledger entries recorded and not yet committed by the store.
    pub store_queue_depth: IntGauge,
    /// Entries per committed store batch: how well group commit works.
    pub store_batch_entries: Histogram,
    /// Time one batch's transaction took, fsync included.
    pub store_commit_latency: Histogram,
    /// Age of the oldest entry not yet committed: the loss window of
    /// `durability: async`.
    pub store_oldest_unpersisted_age: Gauge,
    /// Failed batch commits (each is retried; nothing is dropped).
    pub store_commit_errors: IntCounter,
    pub store_committed_entries: IntCounter,
    /// Changes refused with `store_unavailable`, by the wait that timed out
    /// (`admit`: the queue stayed full; `durable`: the commit did not come).
    pub store_ack_timeouts: IntCounterVec,
    /// Entries recorded after the writer stopped: lost; should stay 0.
    pub store_entries_after_stop: IntCounter,
    /// Recipients of settled sends, by what the gateway said of each.
    pub send_recipients: IntCounterVec,
    /// Gateway answers lost after the request was (or may have been)
    /// written, by why.
    pub upstream_answers_lost: IntCounterVec,
    /// Client connections open on the proxy listener.
    pub downstream_connections: IntGauge,
    /// Client connections refused at accept: their source address already
    /// held `downstream.max_connections_per_ip`.
    pub downstream_connections_refused: IntCounter,
    /// Client connections closed because a request header did not arrive
    /// within `downstream.header_timeout_ms` (slow clients).
    pub downstream_header_timeouts: IntCounter,
    /// 1 once this process found another one owns its store (fenced): it
    /// commits nothing more and refuses credit.
    pub store_fenced: IntGauge,
    /// The fencing token this process owns its store under (0: no store).
    pub store_owner_token: IntGauge,
    /// Lease renewals that failed (busy or failing store); the lease
    /// lapses if they go on.
    pub store_lease_renewal_failures: IntCounter,
    /// SQL statements the PostgreSQL store's writer sent (one per batch
    /// commit when all is well): statements per commit is this over the
    /// `tollgate_store_batch_entries` count.
    pub store_pg_statements: IntCounter,
    /// PostgreSQL sessions of the store's writer re-established after the
    /// previous one ended (server restarted, connection killed).
    pub store_pg_reconnects: IntCounter,
    /// Idempotency keys held (pending or answered, not yet swept), set by
    /// the 1 s sweeper from a count the key table keeps anyway.
    pub idempotency_keys: IntGauge,
    /// `idempotency.max_keys`: past it new keys are refused, so alerts
    /// compare the gauge above with this one.
    pub idempotency_max_keys: IntGauge,
    /// Reloads of the client listener's certificate and key, by result
    /// (ok: swapped in; error: refused, the previous pair kept).
    pub tls_cert_reloads: IntCounterVec,
    /// `notAfter` of the client listener's certificate in force, for an
    /// expiry alert (0 without a TLS listener).
    pub tls_cert_not_after_s: IntGauge,
    /// TLS handshakes on the client listener that did not complete, by why
    /// (`timeout`: not done within `downstream.header_timeout_ms`;
    /// `error`: refused protocol, no shared cipher, a plain HTTP client).
    pub tls_handshake_failures: IntCounterVec,
    /// 1 when `upstream.insecure_skip_verify` is on: the gateway's
    /// certificate is not checked.
    pub upstream_tls_insecure_skip_verify: IntGauge,
    /// Outbox items waiting for a successful call, by kind (set by the
    /// relay after each poll).
    pub outbox_pending: IntGaugeVec,
    /// Age of the oldest pending outbox item, by kind.
    pub outbox_oldest_age_seconds: IntGaugeVec,
    /// Outbox call attempts by kind and result (`delivered`: a 2xx,
    /// `failed`: retried later, `gave_up`: past `outbox.give_up_after_s`).
    pub outbox_attempts: IntCounterVec,
    /// Outbox items given up and kept for the operator, by kind.
    pub outbox_given_up: IntGaugeVec,
    /// Delivery reports received on the callback listener, by outcome
    /// (`delivered`, `failed`, `expired`, `rejected`, `other`: a status
    /// that settles nothing) and by what became of them (`applied`,
    /// `duplicate`, `refused`).
    pub dlr_reports: IntCounterVec,
    /// Callbacks refused before they named a share, by reason.
    pub dlr_refused: IntCounterVec,
    /// Refunds made for failed reports, and their sum in milli-credits.
    pub dlr_refunds: IntCounter,
    pub dlr_refunded_milli: IntCounter,
    /// Shares whose delivery report is still awaited, by policy.
    pub dlr_pending_shares: IntGaugeVec,
    /// Shares resolved by `dlr.timeout_s` without a report, by policy.
    pub dlr_timeouts: IntCounterVec,
    /// `charge_on: delivery`: delivery holds (one per part of an accepted
    /// share) resolved, by `result` (`charged`, `released`) and `cause`
    /// (`report`, `timeout`: `dlr.on_timeout` applied).
    pub dlr_holds_resolved: IntCounterVec,
    /// Cluster nodes (`cluster:`): the free part of this node's grants,
    /// by bucket (what it may still reserve without a round trip).
    pub cluster_grant_held_milli: IntGaugeVec,
    /// Grant takes and top-ups by result (granted, insufficient, error).
    pub cluster_grant_takes: IntCounterVec,
    /// Milli-credits taken into and returned from this node's grants.
    pub cluster_grant_milli: IntCounterVec,
    /// Takes of exactly a send's shortfall (direct mode: the account has
    /// too little left to slice).
    pub cluster_direct_takes: IntCounter,
    /// Dead nodes' grants this node's expiry sweeps returned.
    pub cluster_swept_milli: IntCounter,
    /// Lease renewals by result (ok, failed).
    pub cluster_lease_renewals: IntCounterVec,
    /// 1 while this node's lease lets it reserve, else 0.
    pub cluster_may_spend: IntGauge,
    /// The grant protocol's PostgreSQL round trips, by statement.
    pub cluster_pg_seconds: HistogramVec,
    /// Low-balance crossings, by whether their webhook was queued in the
    /// outbox (`queued`) or refused by it (`refused`: retried on the
    /// account's next change).
    pub low_balance_notifications: IntCounterVec,
}

/// The `reason` label of `tollgate_tls_handshake_failures_total`.
pub const TLS_HANDSHAKE_FAILURES: [&str; 2] = ["timeout", "error"];

/// The `kind` label of the outbox metrics: every producer of outbox items.
pub const OUTBOX_KINDS: [&str; 2] = ["dlr_relay", "low_balance"];
/// The `result` label of `tollgate_outbox_attempts_total`.
pub const OUTBOX_RESULTS: [&str; 3] = ["delivered", "failed", "gave_up"];
/// The `outcome` label of `tollgate_dlr_reports_total`.
pub const DLR_OUTCOMES: [&str; 5] = ["delivered", "failed", "expired", "rejected", "other"];
/// The `result` label of `tollgate_dlr_reports_total`.
pub const DLR_RESULTS: [&str; 3] = ["applied", "duplicate", "refused"];
/// The `reason` label of `tollgate_dlr_refused_total`.
pub const DLR_REFUSALS: [&str; 7] = [
    "full",
    "flood",
    "unknown_token",
    "no_share",
    "too_large",
    "malformed",
    "store_unavailable",
];
/// The `policy` label of the share gauges.
pub const DLR_POLICIES: [&str; 2] = ["accept", "delivery"];

/// Every reservation state, in the order the gauges list them.
pub const RESERVATION_STATES: [ReservationState; 3] = [
    ReservationState::Open,
    ReservationState::InDoubt,
    ReservationState::Delivery,
];

/// The `wait` label of `tollgate_store_ack_timeouts_total`.
pub const STORE_WAITS: [&str; 2] = ["admit", "durable"];

/// Entries per store batch: 1 (idle) up to past the default batch size.
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// Store commit latency, in seconds: a page-cache commit up to a stalled
/// disk. [`commit_latency_buckets`] adds `store.ack_timeout` when it lies
/// beyond the last one, so the histogram always tells commits that beat the
/// acknowledgement timeout from those that did not.
const COMMIT_LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// The `store.ack_timeout_ms` default, for [`Metrics::new`].
const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// [`COMMIT_LATENCY_BUCKETS`] with `ack_timeout` as a bucket boundary of
/// its own (sorted, no duplicate), so `le` = the timeout always exists.
fn commit_latency_buckets(ack_timeout: Duration) -> Vec<f64> {
    let ack_s = ack_timeout.as_secs_f64();
    let mut buckets = COMMIT_LATENCY_BUCKETS.to_vec();
    if !buckets.contains(&ack_s) {
        buckets.push(ack_s);
        buckets.sort_by(f64::total_cmp);
    }
    buckets
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric definition")
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid metric definition")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric definition")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

fn latency_histogram(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric definition")
}

impl Metrics {
    /// The metrics of a tollgate with the default `store.ack_timeout_ms`.
    pub fn new() -> Self {
        Self::with_store_ack_timeout(DEFAULT_ACK_TIMEOUT)
    }

    /// The metrics of a tollgate whose store waits `ack_timeout` for a
    /// commit: the commit-latency buckets reach it. Buckets are fixed at
    /// start, as the writer's timeout is (a reload changes neither).
    pub fn with_store_ack_timeout(ack_timeout: Duration) -> Self {
        let m = Metrics {
            registry: Registry::new(),
            build_info: gauge_vec(
                "tollgate_build_info",
                "Always 1; the version label names the running build",
                &["version"],
            ),
            requests: counter_vec(
                "tollgate_requests_total",
                "Requests by front door (ozeki, passthrough, ...), action and outcome",
                &["front_door", "action", "outcome"],
            ),
            credits_milli: counter_vec(
                "tollgate_credits_milli_total",
                "Milli-credits (1 credit = 1000) moved by ledger entries, by entry kind \
                 (reserve, post, void, expire, add, set, transfer), bucket and direction \
                 (credit: into the account, debit: out of it; none for the two-phase kinds, \
                 whose kind says it); absolute amounts, so a transfer counts once per side",
                &["kind", "bucket", "direction"],
            ),
            reservations_open: gauge(
                "tollgate_reservations_open",
                "Reservations awaiting the gateway's answer (not yet posted, voided or expired)",
            ),
            reservations_in_doubt: gauge(
                "tollgate_reservations_in_doubt",
                "Reservations whose send outcome is unknown, awaiting an operator or the policy",
            ),
            reservations_held_milli: gauge_vec(
                "tollgate_reservations_held_milli",
                "Milli-credits held by unresolved reservations, by state (open, in_doubt, delivery)",
                &["state"],
            ),
            unknown_forwarded: counter_vec(
                "tollgate_unknown_account_forwarded_total",
                "Requests from unknown credentials forwarded uncharged (auth.unknown_accounts: forward)",
                &["action"],
            ),
            shadow_decisions: counter_vec(
                "tollgate_shadow_decisions_total",
                "Shadow mode: what enforce mode would have decided for a send",
                &["decision"],
            ),
            received_messages: counter_vec(
                "tollgate_received_messages_total",
                "Messages returned by priced receivemessage answers, by result (charged, shortfall, shadow)",
                &["result"],
            ),
            receive_shortfall_milli: counter(
                "tollgate_receive_shortfall_milli_total",
                "Milli-credits of receive charges not taken: the account could not pay and the messages were already delivered",
            ),
            rate_limit_decisions: counter_vec(
                "tollgate_rate_limit_decisions_total",
                "Rate-limit decisions by rule (account_parts, source_ip, source_ip_concurrent, \
                 auth_lockout, upstream_parts) and result (allowed, limited, shadow_limited)",
                &["rule", "result"],
            ),
            rate_limit_keys: gauge_vec(
                "tollgate_rate_limit_keys",
                "Keys held by each limiter table (source_ip, source_ip_concurrent, auth_lockout, \
                 account_parts); bounded by limits.max_keys_per_rule",
                &["rule"],
            ),
            upstream_verifications: counter_vec(
                "tollgate_upstream_verifications_total",
                "Drop-in credential checks against the gateway (auth.verify_upstream) by result \
                 (verified, rejected, unavailable, cached_rejection)",
                &["result"],
            ),
            upstream_latency: latency_histogram(
                "tollgate_upstream_latency_seconds",
                "Time from forwarding a request to the end of the gateway's answer",
                &["action"],
            ),
            request_latency: latency_histogram(
                "tollgate_request_latency_seconds",
                "Time from a request's arrival to the end of its answer",
                &["front_door", "action"],
            ),
            upstream_up: gauge(
                "tollgate_upstream_up",
                "1 if the last readiness probe connected to the gateway, else 0",
            ),
            accounts: gauge("tollgate_accounts", "Accounts in memory"),
            tariff_info: gauge_vec(
                "tollgate_tariff_info",
                "The tariff version (content hash) in force; value 1",
                &["version"],
            ),
            tariff_reloads: counter_vec(
                "tollgate_tariff_reloads_total",
                "Tariff reloads by result (ok: swapped in; error: rejected, previous kept)",
                &["result"],
            ),
            tariff_loaded_timestamp_s: gauge(
                "tollgate_tariff_loaded_timestamp_seconds",
                "Unix time the tariff in force was loaded",
            ),
            account_available_milli: gauge_vec(
                "tollgate_account_available_milli",
                "Available milli-credits of the accounts listed in metrics.balance_accounts",
                &["account", "bucket"],
            ),
            account_reserved_milli: gauge_vec(
                "tollgate_account_reserved_milli",
                "Reserved milli-credits of the accounts listed in metrics.balance_accounts",
                &["account", "bucket"],
            ),
            store_queue_depth: gauge(
                "tollgate_store_queue_depth",
                "Ledger entries recorded and not yet committed by the store",
            ),
            store_batch_entries: histogram(
                "tollgate_store_batch_entries",
                "Entries per committed store batch (group commit)",
                BATCH_SIZE_BUCKETS,
            ),
            store_commit_latency: histogram(
                "tollgate_store_commit_seconds",
                "Time to commit one store batch, fsync included",
                &commit_latency_buckets(ack_timeout),
            ),
            store_oldest_unpersisted_age: Gauge::new(
                "tollgate_store_oldest_unpersisted_age_seconds",
                "Age of the oldest ledger entry not yet committed (the async-mode loss window)",
            )
            .expect("valid metric definition"),
            store_commit_errors: counter(
                "tollgate_store_commit_errors_total",
                "Failed store batch commits (kept and retried, never dropped)",
            ),
            store_committed_entries: counter(
                "tollgate_store_committed_entries_total",
                "Ledger entries committed by the store",
            ),
            store_ack_timeouts: counter_vec(
                "tollgate_store_ack_timeouts_total",
                "Changes refused with store_unavailable, by the wait that timed out (admit, durable)",
                &["wait"],
            ),
            store_entries_after_stop: counter(
                "tollgate_store_entries_after_stop_total",
                "Ledger entries recorded after the store writer stopped (not persisted)",
            ),
            send_recipients: counter_vec(
                "tollgate_send_recipients_total",
                "Recipients of forwarded sends by the gateway's answer: accepted (charged), rejected \
                 (not charged), unknown (the answer was lost or unreadable: held in doubt)",
                &["result"],
            ),
            upstream_answers_lost: counter_vec(
                "tollgate_upstream_answers_lost_total",
                "Gateway answers lost after the request was written, by reason (reset, timeout, \
                 closed, unparseable, too_large); a send among them is held in doubt",
                &["reason"],
            ),
            downstream_connections: gauge(
                "tollgate_downstream_connections",
                "Client connections open on the proxy listener",
            ),
            downstream_connections_refused: counter(
                "tollgate_downstream_connections_refused_total",
                "Client connections refused at accept: their source address already held \
                 downstream.max_connections_per_ip",
            ),
            downstream_header_timeouts: counter(
                "tollgate_downstream_header_timeouts_total",
                "Client connections closed because a request header did not arrive within \
                 downstream.header_timeout_ms",
            ),
            store_fenced: gauge(
                "tollgate_store_fenced",
                "1 when another process took the store over: this one commits nothing and refuses credit",
            ),
            store_owner_token: gauge(
                "tollgate_store_owner_token",
                "Fencing token this process owns the store under (0 without a store)",
            ),
            store_lease_renewal_failures: counter(
                "tollgate_store_lease_renewal_failures_total",
                "Store ownership lease renewals that failed",
            ),
            store_pg_statements: counter(
                "tollgate_store_pg_statements_total",
                "SQL statements the PostgreSQL store writer sent (one per commit when all is well)",
            ),
            store_pg_reconnects: counter(
                "tollgate_store_pg_reconnects_total",
                "PostgreSQL sessions of the store writer re-established after one ended",
            ),
            idempotency_keys: gauge(
                "tollgate_idempotency_keys",
                "Idempotency keys held (pending or answered, expired ones until the next sweep)",
            ),
            idempotency_max_keys: gauge(
                "tollgate_idempotency_max_keys",
                "idempotency.max_keys: past it new Idempotency-Keys are refused (store_unavailable)",
            ),
            tls_cert_reloads: counter_vec(
                "tollgate_tls_cert_reloads_total",
                "Reloads of the TLS listener's certificate and key by result (ok: swapped in for new \
                 handshakes; error: refused, the previous pair kept)",
                &["result"],
            ),
            tls_cert_not_after_s: gauge(
                "tollgate_tls_cert_not_after_timestamp_seconds",
                "notAfter of the TLS listener's certificate in force (0 without a TLS listener)",
            ),
            tls_handshake_failures: counter_vec(
                "tollgate_tls_handshake_failures_total",
                "Client TLS handshakes that did not complete (timeout: not within \
                 downstream.header_timeout_ms; error: refused by either side)",
                &["reason"],
            ),
            upstream_tls_insecure_skip_verify: gauge(
                "tollgate_upstream_tls_insecure_skip_verify",
                "1 when upstream.insecure_skip_verify is on: the gateway's certificate is not checked",
            ),
            low_balance_notifications: counter_vec(
                "tollgate_low_balance_notifications_total",
                "Low-balance crossings by result (queued: the webhook is in the outbox; refused: the \
                 outbox refused it, retried on the account's next change)",
                &["result"],
            ),
            outbox_pending: gauge_vec(
                "tollgate_outbox_pending",
                "Outbox items waiting for a successful call",
                &["kind"],
            ),
            outbox_oldest_age_seconds: gauge_vec(
                "tollgate_outbox_oldest_age_seconds",
                "Age of the oldest pending outbox item",
                &["kind"],
            ),
            outbox_attempts: counter_vec(
                "tollgate_outbox_attempts_total",
                "Outbox call attempts by result (delivered, failed, gave_up)",
                &["kind", "result"],
            ),
            outbox_given_up: gauge_vec(
                "tollgate_outbox_given_up",
                "Outbox items given up (listed at /admin/outbox?state=gave_up)",
                &["kind"],
            ),
            dlr_reports: counter_vec(
                "tollgate_dlr_reports_total",
                "Delivery reports received, by outcome and what became of them",
                &["outcome", "result"],
            ),
            dlr_refused: counter_vec(
                "tollgate_dlr_refused_total",
                "Delivery report callbacks refused before they named a share",
                &["reason"],
            ),
            dlr_refunds: counter(
                "tollgate_dlr_refunds_total",
                "Shares (or parts) refunded after a failed delivery report",
            ),
            dlr_refunded_milli: counter(
                "tollgate_dlr_refunded_milli_total",
                "Milli-credits refunded after failed delivery reports",
            ),
            dlr_pending_shares: gauge_vec(
                "tollgate_dlr_pending_shares",
                "Shares whose delivery report is still awaited",
                &["policy"],
            ),
            dlr_timeouts: counter_vec(
                "tollgate_dlr_timeouts_total",
                "Shares resolved by dlr.timeout_s without a final report",
                &["policy"],
            ),
            dlr_holds_resolved: counter_vec(
                "tollgate_dlr_holds_resolved_total",
                "charge_on: delivery holds (one per part) resolved, by result and cause",
                &["result", "cause"],
            ),
            cluster_grant_held_milli: gauge_vec(
                "tollgate_cluster_grant_held_milli",
                "Cluster node: milli-credits of this node's grants not yet reserved, by bucket",
                &["bucket"],
            ),
            cluster_grant_takes: counter_vec(
                "tollgate_cluster_grant_takes_total",
                "Cluster node: grant takes and top-ups by result (granted, insufficient, error)",
                &["result"],
            ),
            cluster_grant_milli: counter_vec(
                "tollgate_cluster_grant_milli_total",
                "Cluster node: milli-credits taken into (taken) and given back from (returned) its grants",
                &["direction"],
            ),
            cluster_direct_takes: counter(
                "tollgate_cluster_direct_takes_total",
                "Cluster node: takes of exactly a send's shortfall (the account has too little left to slice)",
            ),
            cluster_swept_milli: counter(
                "tollgate_cluster_swept_milli_total",
                "Cluster node: milli-credits of dead nodes' grants this node's expiry sweeps returned",
            ),
            cluster_lease_renewals: counter_vec(
                "tollgate_cluster_lease_renewals_total",
                "Cluster node: lease renewals by result (ok, failed)",
                &["result"],
            ),
            cluster_may_spend: gauge(
                "tollgate_cluster_may_spend",
                "Cluster node: 1 while its lease lets it reserve, else 0",
            ),
            cluster_pg_seconds: latency_histogram(
                "tollgate_cluster_pg_seconds",
                "Cluster node: PostgreSQL round trips of the grant protocol, by statement \
                 (take, give_back, credit, balance, transfer, claim_authcode, \
                 expire_authcodes); a take or give_back includes its wait for the \
                 node's other statement on the same grant row",
                &["statement"],
            ),
        };
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(m.build_info.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.credits_milli.clone()),
            Box::new(m.reservations_open.clone()),
            Box::new(m.reservations_in_doubt.clone()),
            Box::new(m.reservations_held_milli.clone()),
            Box::new(m.unknown_forwarded.clone()),
            Box::new(m.shadow_decisions.clone()),
            Box::new(m.received_messages.clone()),
            Box::new(m.receive_shortfall_milli.clone()),
            Box::new(m.rate_limit_decisions.clone()),
            Box::new(m.rate_limit_keys.clone()),
            Box::new(m.upstream_verifications.clone()),
            Box::new(m.upstream_latency.clone()),
            Box::new(m.request_latency.clone()),
            Box::new(m.upstream_up.clone()),
            Box::new(m.accounts.clone()),
            Box::new(m.tariff_info.clone()),
            Box::new(m.tariff_reloads.clone()),
            Box::new(m.tariff_loaded_timestamp_s.clone()),
            Box::new(m.account_available_milli.clone()),
            Box::new(m.account_reserved_milli.clone()),
            Box::new(m.store_queue_depth.clone()),
            Box::new(m.store_batch_entries.clone()),
            Box::new(m.store_commit_latency.clone()),
            Box::new(m.store_oldest_unpersisted_age.clone()),
            Box::new(m.store_commit_errors.clone()),
            Box::new(m.store_committed_entries.clone()),
            Box::new(m.store_ack_timeouts.clone()),
            Box::new(m.store_entries_after_stop.clone()),
            Box::new(m.send_recipients.clone()),
            Box::new(m.upstream_answers_lost.clone()),
            Box::new(m.downstream_connections.clone()),
            Box::new(m.downstream_connections_refused.clone()),
            Box::new(m.downstream_header_timeouts.clone()),
            Box::new(m.store_fenced.clone()),
            Box::new(m.store_owner_token.clone()),
            Box::new(m.store_lease_renewal_failures.clone()),
            Box::new(m.store_pg_statements.clone()),
            Box::new(m.store_pg_reconnects.clone()),
            Box::new(m.idempotency_keys.clone()),
            Box::new(m.idempotency_max_keys.clone()),
            Box::new(m.tls_cert_reloads.clone()),
            Box::new(m.tls_cert_not_after_s.clone()),
            Box::new(m.tls_handshake_failures.clone()),
            Box::new(m.upstream_tls_insecure_skip_verify.clone()),
            Box::new(m.low_balance_notifications.clone()),
            Box::new(m.outbox_pending.clone()),
            Box::new(m.outbox_oldest_age_seconds.clone()),
            Box::new(m.outbox_attempts.clone()),
            Box::new(m.outbox_given_up.clone()),
            Box::new(m.dlr_reports.clone()),
            Box::new(m.dlr_refused.clone()),
            Box::new(m.dlr_refunds.clone()),
            Box::new(m.dlr_refunded_milli.clone()),
            Box::new(m.dlr_pending_shares.clone()),
            Box::new(m.dlr_timeouts.clone()),
            Box::new(m.dlr_holds_resolved.clone()),
            Box::new(m.cluster_grant_held_milli.clone()),
            Box::new(m.cluster_grant_takes.clone()),
            Box::new(m.cluster_grant_milli.clone()),
            Box::new(m.cluster_direct_takes.clone()),
            Box::new(m.cluster_swept_milli.clone()),
            Box::new(m.cluster_lease_renewals.clone()),
            Box::new(m.cluster_may_spend.clone()),
            Box::new(m.cluster_pg_seconds.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metric names are unique");
        m.initialise_series();
        m
    }

    /// Creates every series of the closed label sets at 0, so they exist
    /// before the first event.
    fn initialise_series(&self) {
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for kind in EntryKind::ALL {
            for bucket in [Bucket::Anytime, Bucket::OffPeak] {
                for amount in [1, -1] {
                    let direction = credit_direction(kind, amount);
                    self.credits_milli.with_label_values(&[
                        kind.as_str(),
                        bucket.as_str(),
                        direction,
                    ]);
                }
            }
        }
        for result in ["accepted", "rejected", "unknown"] {
            self.send_recipients.with_label_values(&[result]);
        }
        for reason in LOST_ANSWER_REASONS {
            self.upstream_answers_lost.with_label_values(&[reason]);
        }
        for result in ["queued", "refused"] {
            self.low_balance_notifications.with_label_values(&[result]);
        }
        for kind in OUTBOX_KINDS {
            self.outbox_pending.with_label_values(&[kind]);
            self.outbox_oldest_age_seconds.with_label_values(&[kind]);
            self.outbox_given_up.with_label_values(&[kind]);
            for result in OUTBOX_RESULTS {
                self.outbox_attempts.with_label_values(&[kind, result]);
            }
        }
        for outcome in DLR_OUTCOMES {
            for result in DLR_RESULTS {
                self.dlr_reports.with_label_values(&[outcome, result]);
            }
        }
        for reason in DLR_REFUSALS {
            self.dlr_refused.with_label_values(&[reason]);
        }
        for policy in DLR_POLICIES {
            self.dlr_pending_shares.with_label_values(&[policy]);
            self.dlr_timeouts.with_label_values(&[policy]);
        }
        for result in ["charged", "released"] {
            for cause in ["report", "timeout"] {
                self.dlr_holds_resolved.with_label_values(&[result, cause]);
            }
        }
        for state in RESERVATION_STATES {
            self.reservations_held_milli
                .with_label_values(&[state.as_str()]);
        }
        for rule in RATE_LIMIT_RULES {
            for result in RATE_LIMIT_RESULTS {
                self.rate_limit_decisions.with_label_values(&[rule, result]);
            }
        }
        for rule in [
            "source_ip",
            "source_ip_concurrent",
            "auth_lockout",
            "account_parts",
        ] {
            self.rate_limit_keys.with_label_values(&[rule]);
        }
        for result in VERIFICATION_RESULTS {
            self.upstream_verifications.with_label_values(&[result]);
        }
        for result in RELOAD_RESULTS {
            self.tariff_reloads.with_label_values(&[result]);
            self.tls_cert_reloads.with_label_values(&[result]);
        }
        for reason in TLS_HANDSHAKE_FAILURES {
            self.tls_handshake_failures.with_label_values(&[reason]);
        }
        for decision in SHADOW_DECISIONS {
            self.shadow_decisions.with_label_values(&[decision]);
        }
        for result in RECEIVE_RESULTS {
            self.received_messages.with_label_values(&[result]);
        }
        self.unknown_forwarded.with_label_values(&["sendmessage"]);
        for wait in STORE_WAITS {
            self.store_ack_timeouts.with_label_values(&[wait]);
        }
    }

    /// Makes `version` the only `tollgate_tariff_info` series.
    pub fn set_tariff_version(&self, version: &str, loaded_unix_s: i64) {
        self.tariff_info.reset();
        self.tariff_info.with_label_values(&[version]).set(1);
        self.tariff_loaded_timestamp_s.set(loaded_unix_s);
    }

    /// Counts a tariff reload; `ok` is whether it was swapped in.
    pub fn record_reload(&self, ok: bool) {
        self.tariff_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// Counts a reload of the TLS listener's certificate; `ok` is whether
    /// it was swapped in.
    pub fn record_tls_reload(&self, ok: bool) {
        self.tls_cert_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// Refreshes the gauges that describe the ledger: reservations by state,
    /// accounts, and the balances of `balance_accounts` (an account not in
    /// the ledger gets no series). Called before each scrape.
    pub fn observe_ledger(&self, ledger: &Ledger, balance_accounts: &[String]) {
        let mut count = [0i64; 3];
        let mut held_milli = [0i64; 3];
        for r in ledger.reservations(None) {
            let i = match r.state {
                ReservationState::Open => 0,
                ReservationState::InDoubt => 1,
                ReservationState::Delivery => 2,
            };
            count[i] += 1;
            held_milli[i] += r.total_milli;
        }
        self.reservations_open.set(count[0]);
        self.reservations_in_doubt.set(count[1]);
        for (i, state) in RESERVATION_STATES.into_iter().enumerate() {
            self.reservations_held_milli
                .with_label_values(&[state.as_str()])
                .set(held_milli[i]);
        }
        self.accounts.set(ledger.len() as i64);
        for name in balance_accounts {
            let Some(view) = ledger.account(name) else {
                // Removed since the last scrape (or never seeded).
                for bucket in [Bucket::Anytime, Bucket::OffPeak] {
                    let _ = self
                        .account_available_milli
                        .remove_label_values(&[name, bucket.as_str()]);
                    let _ = self
                        .account_reserved_milli
                        .remove_label_values(&[name, bucket.as_str()]);
                }
                continue;
            };
            for bucket in [Bucket::Anytime, Bucket::OffPeak] {
                let b = view.bucket(bucket);
                self.account_available_milli
                    .with_label_values(&[name, bucket.as_str()])
                    .set(b.available_milli());
                self.account_reserved_milli
                    .with_label_values(&[name, bucket.as_str()])
                    .set(b.reserved_milli);
            }
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod direction_tests {
    use super::*;

    #[test]
    fn credits_say_which_way_they_moved() {
        assert_eq!(credit_direction(EntryKind::Add, -5), "debit");
        assert_eq!(credit_direction(EntryKind::Add, 5), "credit");
        assert_eq!(credit_direction(EntryKind::Transfer, -2500), "debit");
        assert_eq!(credit_direction(EntryKind::Transfer, 2500), "credit");
        assert_eq!(credit_direction(EntryKind::Set, -1), "debit");
        for kind in [
            EntryKind::Reserve,
            EntryKind::Post,
            EntryKind::Void,
            EntryKind::Expire,
        ] {
            assert_eq!(credit_direction(kind, 1), "none");
            assert_eq!(credit_direction(kind, -1), "none");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ledger::{
        BucketPreference, Clock, LedgerConfig, ManualClock, NullSink, Overdraft, Role,
    };

    fn ledger() -> Ledger {
        let l = Ledger::new(
            LedgerConfig {
                overdraft: Overdraft::Strict,
                reservation_ttl_ms: 300_000,
            },
            Arc::new(NullSink),
            Arc::new(ManualClock::new(0)) as Arc<dyn Clock>,
        );
        for name in ["watched", "other"] {
            l.open_account(name, None, Role::User, None).unwrap();
            l.add(name, Bucket::Anytime, 10_000, None).unwrap();
        }
        l
    }

    #[test]
    fn every_family_is_prefixed_and_documented() {
        let m = Metrics::new();
        // Vectors without a series are not gathered: give each one.
        m.upstream_latency.with_label_values(&["x"]).observe(0.1);
        m.request_latency
            .with_label_values(&["x", "y"])
            .observe(0.1);
        m.account_available_milli.with_label_values(&["a", "b"]);
        m.account_reserved_milli.with_label_values(&["a", "b"]);
        m.requests.with_label_values(&["a", "b", "c"]);
        m.cluster_grant_held_milli.with_label_values(&["anytime"]);
        m.cluster_grant_takes.with_label_values(&["granted"]);
        m.cluster_grant_milli.with_label_values(&["taken"]);
        m.cluster_lease_renewals.with_label_values(&["ok"]);
        m.cluster_pg_seconds
            .with_label_values(&["take"])
            .observe(0.001);
        m.set_tariff_version("v", 0);
        let families = m.registry.gather();
        let (ours, process): (Vec<_>, Vec<_>) = families
            .iter()
            .partition(|f| f.get_name().starts_with("tollgate_"));
        assert_eq!(ours.len(), 66);
        let mut process: Vec<&str> = process.iter().map(|f| f.get_name()).collect();
        process.sort_unstable();
        let mut expected = PROCESS_FAMILIES.to_vec();
        expected.sort_unstable();
        assert_eq!(
            process, expected,
            "only the process families lack the prefix"
        );
        for f in families {
            assert!(!f.get_help().is_empty(), "{} has no help", f.get_name());
        }
    }

    #[test]
    fn process_metrics_describe_this_process() {
        let text = Metrics::new().render();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        };
        assert!(value("process_resident_memory_bytes") > 1_000_000.0);
        let fds = value("process_open_fds");
        assert!(fds >= 3.0, "stdin, stdout, stderr at least: {fds}");
        assert!(value("process_max_fds") >= fds);
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(
            started <= now_s + 1.0 && started > now_s - 86_400.0,
            "{started}"
        );
        assert!(value("process_cpu_seconds_total") >= 0.0);
    }

    /// The top finite `le` of the commit-latency histogram in `text`.
    fn commit_buckets(text: &str) -> Vec<f64> {
        text.lines()
            .filter_map(|l| l.strip_prefix("tollgate_store_commit_seconds_bucket{le=\""))
            .filter_map(|l| l.split('"').next())
            .filter(|le| *le != "+Inf")
            .map(|le| le.parse().unwrap())
            .collect()
    }

    #[test]
    fn commit_latency_buckets_reach_the_ack_timeout() {
        // The default 5 s timeout is a boundary; the top bucket is past it.
        let default = commit_buckets(&Metrics::new().render());
        assert!(default.contains(&5.0), "{default:?}");
        assert!(*default.last().unwrap() >= 5.0);
        assert!(default.windows(2).all(|w| w[0] < w[1]), "{default:?}");
        // A longer timeout becomes the top bucket; a shorter one is added
        // in order, and a boundary already there is not repeated.
        for (ack_ms, top) in [(30_000, 30.0), (12_500, 12.5), (750, 10.0), (2_500, 10.0)] {
            let m = Metrics::with_store_ack_timeout(Duration::from_millis(ack_ms));
            let b = commit_buckets(&m.render());
            let ack_s = ack_ms as f64 / 1000.0;
            assert!(b.contains(&ack_s), "{ack_ms} ms: {b:?}");
            assert_eq!(*b.last().unwrap(), top, "{ack_ms} ms: {b:?}");
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{ack_ms} ms: {b:?}");
            assert_eq!(
                b.len(),
                default.len() + usize::from(!default.contains(&ack_s))
            );
        }
    }

    #[test]
    fn closed_label_sets_start_at_zero() {
        let text = Metrics::new().render();
        for line in [
            "tollgate_credits_milli_total{bucket=\"offpeak\",direction=\"none\",kind=\"expire\"} 0",
            "tollgate_rate_limit_decisions_total{result=\"limited\",rule=\"account_parts\"} 0",
            "tollgate_tariff_reloads_total{result=\"error\"} 0",
            "tollgate_shadow_decisions_total{decision=\"would_refuse\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn tariff_info_keeps_only_the_version_in_force() {
        let m = Metrics::new();
        m.set_tariff_version("aaaa", 1);
        m.set_tariff_version("bbbb", 2);
        let text = m.render();
        assert!(text.contains("tollgate_tariff_info{version=\"bbbb\"} 1"));
        assert!(!text.contains("aaaa"));
        assert!(text.contains("tollgate_tariff_loaded_timestamp_seconds 2"));
    }

    #[test]
    fn ledger_gauges_and_only_listed_balances() {
        let l = ledger();
        let id = l
            .reserve(
                "watched",
                &[1_500],
                BucketPreference::AnytimeOnly,
                None,
                None,
            )
            .unwrap();
        let doubt = l
            .reserve("other", &[250], BucketPreference::AnytimeOnly, None, None)
            .unwrap();
        l.mark_in_doubt(doubt).unwrap();
        let m = Metrics::new();
        m.observe_ledger(&l, &["watched".to_string(), "gone".to_string()]);
        let text = m.render();
        assert!(text.contains("tollgate_reservations_open 1"), "{text}");
        assert!(text.contains("tollgate_reservations_in_doubt 1"));
        assert!(text.contains("tollgate_reservations_held_milli{state=\"open\"} 1500"));
        assert!(text.contains("tollgate_reservations_held_milli{state=\"in_doubt\"} 250"));
        assert!(text.contains("tollgate_accounts 2"));
        assert!(text.contains(
            "tollgate_account_available_milli{account=\"watched\",bucket=\"anytime\"} 8500"
        ));
        assert!(text.contains(
            "tollgate_account_reserved_milli{account=\"watched\",bucket=\"anytime\"} 1500"
        ));
        assert!(!text.contains("account=\"other\""));
        assert!(!text.contains("account=\"gone\""));
        l.void(id).unwrap();
        m.observe_ledger(&l, &["watched".to_string()]);
        assert!(m.render().contains("tollgate_reservations_open 0"));
    }
}
