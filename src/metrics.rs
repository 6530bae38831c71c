//! Every metric tollgate exports, in one place (SPEC 8).
//!
//! Names carry the `tollgate_` prefix; label values come from closed sets
//! (front door, action, outcome, bucket, kind) so cardinality stays bounded.
//! Nothing here ever carries an account's password, a token or a free-form
//! client string.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    /// Requests by front door, action and outcome.
    pub requests: IntCounterVec,
    /// Milli-credits moved, by entry kind (reserve/post/void/expire/add/set/transfer) and bucket.
    pub credits_milli: IntCounterVec,
    pub reservations_open: IntGauge,
    pub reservations_in_doubt: IntGauge,
    /// Sends forwarded without charge because the credentials were unknown
    /// and `auth.unknown_accounts: forward`.
    pub unknown_forwarded: IntCounterVec,
    /// What shadow mode would have done.
    pub shadow_decisions: IntCounterVec,
    pub upstream_latency: HistogramVec,
    pub request_latency: HistogramVec,
    pub accounts: IntGauge,
    pub tariff_info: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tollgate_requests_total",
                "Requests by front door, action and outcome",
            ),
            &["front_door", "action", "outcome"],
        )
        .unwrap();
        let credits_milli = IntCounterVec::new(
            Opts::new(
                "tollgate_credits_milli_total",
                "Milli-credits moved by ledger entries, by kind and bucket",
            ),
            &["kind", "bucket"],
        )
        .unwrap();
        let reservations_open = IntGauge::new(
            "tollgate_reservations_open",
            "Reservations not yet resolved",
        )
        .unwrap();
        let reservations_in_doubt = IntGauge::new(
            "tollgate_reservations_in_doubt",
            "Reservations whose send outcome is unknown",
        )
        .unwrap();
        let unknown_forwarded = IntCounterVec::new(
            Opts::new(
                "tollgate_unknown_account_forwarded_total",
                "Requests from unknown credentials forwarded uncharged",
            ),
            &["action"],
        )
        .unwrap();
        let shadow_decisions = IntCounterVec::new(
            Opts::new(
                "tollgate_shadow_decisions_total",
                "Shadow mode: what enforce mode would have decided",
            ),
            &["decision"],
        )
        .unwrap();
        let upstream_latency = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_upstream_latency_seconds",
                "Time from forwarding a request to the end of the gateway's answer",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["action"],
        )
        .unwrap();
        let request_latency = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_request_latency_seconds",
                "Time from a request's arrival to its answer",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["front_door", "action"],
        )
        .unwrap();
        let accounts = IntGauge::new("tollgate_accounts", "Accounts in memory").unwrap();
        let tariff_info = IntGaugeVec::new(
            Opts::new(
                "tollgate_tariff_info",
                "The tariff version in force (value 1)",
            ),
            &["version"],
        )
        .unwrap();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(credits_milli.clone()),
            Box::new(reservations_open.clone()),
            Box::new(reservations_in_doubt.clone()),
            Box::new(unknown_forwarded.clone()),
            Box::new(shadow_decisions.clone()),
            Box::new(upstream_latency.clone()),
            Box::new(request_latency.clone()),
            Box::new(accounts.clone()),
            Box::new(tariff_info.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            credits_milli,
            reservations_open,
            reservations_in_doubt,
            unknown_forwarded,
            shadow_decisions,
            upstream_latency,
            request_latency,
            accounts,
            tariff_info,
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
