//! The application layer: the state every front door shares and the
//! decisions that join a parsed request to the ledger.
//!
//! Front doors (`api/`) turn bytes into typed commands and typed answers
//! into bytes; this layer decides what a command does to the ledger and what
//! the answer is. It knows HTTP only as status codes; the pingora glue in
//! `proxy.rs` moves the bytes.

pub mod ozeki;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::CredentialStore;
use crate::config::{Config, Mode};
use crate::ledger::{Entry, EntrySink, Ledger};
use crate::metrics::Metrics;
use crate::tariff::Tariff;
use crate::upstream::Upstream;

/// What a request runs with from start to end, swapped whole on reload
/// (SPEC 5.2): a request keeps the snapshot it started with.
pub struct Snapshot {
    pub mode: Mode,
    pub tariff: Arc<Tariff>,
}

pub struct App {
    pub config: Config,
    pub ledger: Arc<Ledger>,
    pub credentials: Arc<CredentialStore>,
    pub snapshot: ArcSwap<Snapshot>,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    /// Makes request ids unique across restarts: the start time prefixes a
    /// per-process counter.
    started_unix_ms: i64,
    next_request: AtomicU64,
}

impl App {
    pub fn new(
        config: Config,
        ledger: Arc<Ledger>,
        credentials: Arc<CredentialStore>,
        tariff: Tariff,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics
            .tariff_info
            .with_label_values(&[tariff.version()])
            .set(1);
        let upstream = Upstream::new(&config.upstream);
        let snapshot = ArcSwap::from_pointee(Snapshot {
            mode: config.mode,
            tariff: Arc::new(tariff),
        });
        App {
            config,
            ledger,
            credentials,
            snapshot,
            upstream,
            metrics,
            started_unix_ms: now_unix_ms(),
            next_request: AtomicU64::new(1),
        }
    }

    /// A reference for ledger entries and logs: unique, short, and free of
    /// client data.
    pub fn new_request_id(&self) -> String {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n:x}", self.started_unix_ms)
    }
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Counts every ledger entry into the credit metrics, then hands the batch
/// on (to the store, when there is one).
pub struct MetricsSink {
    pub metrics: Arc<Metrics>,
    pub next: Arc<dyn EntrySink>,
}

impl EntrySink for MetricsSink {
    fn record(&self, entries: &[Entry]) {
        for e in entries {
            self.metrics
                .credits_milli
                .with_label_values(&[e.kind.as_str(), e.bucket.as_str()])
                .inc_by(e.amount_milli.unsigned_abs());
        }
        self.next.record(entries);
    }
}
