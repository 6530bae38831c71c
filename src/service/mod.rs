//! The application layer: the state every front door shares and the
//! decisions that join a parsed request to the ledger.
//!
//! Front doors (`api/`) turn bytes into typed commands and typed answers
//! into bytes; this layer decides what a command does to the ledger and what
//! the answer is. It knows HTTP only as status codes; the pingora glue in
//! `proxy.rs` moves the bytes.

pub mod boxis;
pub mod dropin;
pub mod ozeki;
pub mod soap;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::api::owned::Router;
use crate::auth::CredentialStore;
use crate::clock::Clock;
use crate::config::{Config, Durability, Mode};
use crate::error::ErrorCode;
use crate::idempotency::Idempotency;
use crate::ledger::{Entry, EntrySink, Ledger};
use crate::limits::{Limiter, LimitsConfig, Refusal};
use crate::metrics::Metrics;
use crate::store::fence::NotOwner;
use crate::store::WriteBehind;
use crate::tariff::{Tariff, TariffError};
use crate::upstream::Upstream;

/// What a request runs with from start to end, swapped whole on reload
/// (SPEC 5.2): a request keeps the snapshot it started with.
///
/// Everything that hot-reloads lives here, in this one struct behind one
/// `ArcSwap`, so a request never sees the tariff of one reload with the
/// limits of another. The rate limits (SPEC 7) join as a field of their own
/// next to `tariff`, and [`App::reload_tariffs`] builds the next snapshot
/// from the previous one, carrying over whatever it does not reload (the
/// limiter *state* lives outside the snapshot so it survives reloads).
pub struct Snapshot {
    pub mode: Mode,
    pub tariff: Arc<Tariff>,
    /// The rates and rules of SPEC 7 (the `limits:` section of
    /// `tollgate.yaml`, re-read on every reload).
    pub limits: Arc<LimitsConfig>,
}

pub struct App {
    pub config: Config,
    /// The crate's one clock (`crate::clock`): the ledger, the limiter, the
    /// idempotency table, pricing and the sweeps all read it.
    pub clock: Arc<dyn Clock>,
    /// Which door a request goes to (`api::owned`), from the configured
    /// paths, normalised once.
    pub router: Router,
    pub ledger: Arc<Ledger>,
    pub credentials: Arc<CredentialStore>,
    pub snapshot: ArcSwap<Snapshot>,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    /// The Boxis door's user keys and replay cache (seeded at startup).
    pub boxis: boxis::BoxisState,
    /// The write-behind store writer; `None` when `store.path` is unset
    /// (the ledger then lives in memory only). Set once at start-up.
    pub store: Option<Arc<WriteBehind>>,
    /// Limiter state (SPEC 7): outside the snapshot, so a reload changes
    /// rates without resetting what clients have used.
    pub limiter: Arc<Limiter>,
    /// `Idempotency-Key` table (SPEC 3.4): in memory until start-up opens
    /// its SQLite file (`server::build`).
    pub idempotency: Arc<Idempotency>,
    /// Drop-in authentication state: single flight and the negative cache
    /// of gateway verifications (SPEC 5.3).
    pub dropin: dropin::DropIn,
    /// Makes request ids unique across restarts: the start time prefixes a
    /// per-process counter.
    started_unix_ms: i64,
    next_request: AtomicU64,
    /// Serialises reloads, so two at once cannot swap in the older file
    /// last or interleave their metrics.
    reload_lock: parking_lot::Mutex<()>,
}

impl App {
    pub fn new(
        config: Config,
        ledger: Arc<Ledger>,
        credentials: Arc<CredentialStore>,
        tariff: Tariff,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        metrics.set_tariff_version(tariff.version(), clock.now_unix_ms() / 1000);
        let upstream = Upstream::new(&config.upstream);
        let boxis = boxis::BoxisState::new(&config.boxis);
        let snapshot = ArcSwap::from_pointee(Snapshot {
            mode: config.mode,
            tariff: Arc::new(tariff),
            limits: Arc::new(config.limits.clone()),
        });
        let limiter = Arc::new(Limiter::with_clock(
            config.limits.max_keys_per_rule,
            metrics.clone(),
            clock.clone(),
        ));
        let idempotency = Arc::new(
            Idempotency::open(
                &crate::idempotency::IdempotencyConfig {
                    path: None,
                    ..config.idempotency.clone()
                },
                clock.clone(),
            )
            .expect("an in-memory key table always opens"),
        );
        let dropin = dropin::DropIn::new(&config.auth);
        let router = Router::new(
            &config.ozeki.paths,
            &config.boxis.path,
            &config.soap.path,
            &config.ozeki.blocked_paths,
        );
        App {
            router,
            limiter,
            idempotency,
            dropin,
            config,
            ledger,
            credentials,
            snapshot,
            upstream,
            metrics,
            boxis,
            started_unix_ms: clock.now_unix_ms(),
            clock,
            next_request: AtomicU64::new(1),
            reload_lock: parking_lot::Mutex::new(()),
            store: None,
        }
    }

    /// Re-reads and validates the tariff file and swaps it into the
    /// snapshot (SPEC 5.2), keeping the mode; returns the version now in
    /// force. An invalid file changes nothing: the previous tariff stays,
    /// the error is logged and counted. Requests in flight keep the
    /// snapshot they loaded. Blocks on file I/O and parsing: call it off
    /// the request path.
    pub fn reload_tariffs(&self) -> Result<String, TariffError> {
        let _serialised = self.reload_lock.lock();
        let tariff = match Tariff::load(&self.config.tariffs_path) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "tariff reload rejected; the previous tariff stays in force");
                self.metrics.record_reload(false);
                return Err(e);
            }
        };
        let version = tariff.version().to_string();
        let previous = self.snapshot.load_full();
        let (mode, limits) = match self.reload_config(&previous) {
            Ok(parts) => parts,
            Err(e) => {
                tracing::error!(error = %e, "limits reload rejected; the previous snapshot stays in force");
                self.metrics.record_reload(false);
                return Err(TariffError::Invalid {
                    file: e.file.into(),
                    key: e.key,
                    problem: e.problem,
                });
            }
        };
        if mode != previous.mode {
            tracing::warn!(previous = ?previous.mode, mode = ?mode, "mode changed by reload");
        }
        self.snapshot.store(Arc::new(Snapshot {
            mode,
            tariff: Arc::new(tariff),
            limits,
        }));
        self.metrics
            .set_tariff_version(&version, self.clock.now_unix_ms() / 1000);
        self.metrics.record_reload(true);
        tracing::info!(
            previous = previous.tariff.version(),
            version = %version,
            "tariff reloaded"
        );
        Ok(version)
    }

    /// Re-reads the hot-reloadable parts of the configuration file: `mode`
    /// (SPEC 5.1a) and `limits:`. A file that cannot be read keeps both in
    /// force (with a warning); a file that is invalid fails the reload.
    /// Everything else in the file (listeners, store, …) needs a restart.
    fn reload_config(
        &self,
        previous: &Snapshot,
    ) -> Result<(Mode, Arc<LimitsConfig>), crate::config::ConfigError> {
        if !self.config.source.is_file() {
            tracing::warn!(
                file = %self.config.source.display(),
                "configuration file not found; the mode and limits in force stay"
            );
            return Ok((previous.mode, previous.limits.clone()));
        }
        let config = Config::load(&self.config.source)?;
        if config.limits == *previous.limits {
            return Ok((config.mode, previous.limits.clone()));
        }
        tracing::info!("limits reloaded");
        Ok((config.mode, Arc::new(config.limits)))
    }

    /// Evicts idle limiter keys, expired drop-in refusals and (at most once
    /// a minute) expired idempotency keys. The sweeper calls it every
    /// second.
    pub fn sweep_protection(&self) {
        self.limiter.sweep();
        self.dropin.sweep();
        self.idempotency.sweep();
    }

    /// Whether this process owns its store now (SPEC 6, one owner per
    /// store): `Err` once another process took the store over (fenced), or
    /// while the ownership lease could not be renewed lately. Always `Ok`
    /// without a store.
    pub fn ownership(&self) -> Result<(), NotOwner> {
        match &self.store {
            Some(w) => w.ensure_owner(),
            None => Ok(()),
        }
    }

    /// Fail closed (SPEC 1.4a): every answer that reads or moves credit
    /// calls this first (directly, or through [`Self::admit_change`]). A
    /// process that does not own its store has a stale ledger and can
    /// commit nothing, so it answers `store_unavailable`.
    pub fn ensure_owner(&self) -> Result<(), ErrorCode> {
        self.ownership().map_err(|_| ErrorCode::StoreUnavailable)
    }

    /// [`Idempotency::begin`] for a process that owns its store: the key
    /// file belongs to the store's owner, so a process that does not own
    /// the store never claims a key in it (it answers `Unavailable`).
    pub async fn begin_idempotent(
        &self,
        account: &str,
        key: &str,
        fingerprint: crate::idempotency::Fingerprint,
    ) -> crate::idempotency::Begin {
        if self.ensure_owner().is_err() {
            return crate::idempotency::Begin::Unavailable;
        }
        self.idempotency.begin(account, key, fingerprint).await
    }

    /// Back-pressure (SPEC 6): call before a ledger change a client asked
    /// for. Refuses at once when this process does not own its store
    /// ([`Self::ensure_owner`]). Waits while the store's queue is over
    /// `store.queue_max_entries`; past `store.ack_timeout` the change must
    /// be refused with `store_unavailable` (nothing has changed yet).
    pub async fn admit_change(&self) -> Result<(), ErrorCode> {
        self.ensure_owner()?;
        match &self.store {
            Some(w) => w.admit().await.map_err(|_| ErrorCode::StoreUnavailable),
            None => Ok(()),
        }
    }

    /// Call after a ledger change and before the answer that acknowledges
    /// it (or before forwarding a send). With `durability: sync` it waits
    /// until everything recorded so far is committed — one group commit
    /// serves every request waiting at the same time. With `async`, or
    /// without a store, it returns at once. `Err(StoreUnavailable)` after
    /// `store.ack_timeout`: the change is made in memory and stays queued
    /// (it is committed if the store recovers), but it is not acknowledged.
    /// Also `Err` at once when this process was fenced (the change will
    /// never be committed) or, with `async`, does not own its store now.
    pub async fn change_durable(&self) -> Result<(), ErrorCode> {
        match (&self.store, self.config.durability) {
            (Some(w), Durability::Sync) => w
                .wait_durable()
                .await
                .map_err(|_| ErrorCode::StoreUnavailable),
            (Some(_), Durability::Async) => self.ensure_owner(),
            (None, _) => Ok(()),
        }
    }

    /// SPEC 7's per-(IP, username) lockout, checked before any credential
    /// check on every front door: `Err` while the pair is locked (in shadow
    /// mode the limiter only logs).
    pub fn check_auth_lockout(
        &self,
        snapshot: &Snapshot,
        ip: Option<IpAddr>,
        username: &str,
    ) -> Result<(), Refusal> {
        let shadow = snapshot.mode == Mode::Shadow;
        self.limiter
            .check_lockout(&snapshot.limits, ip, username, shadow)
    }

    /// Feeds a credential check's verdict to the lockout: a failure counts
    /// towards it, a success resets it.
    pub fn record_auth(
        &self,
        snapshot: &Snapshot,
        ip: Option<IpAddr>,
        username: &str,
        verified: bool,
    ) {
        if verified {
            self.limiter.auth_succeeded(ip, username);
        } else {
            self.limiter.auth_failed(&snapshot.limits, ip, username);
        }
    }

    /// A reference for ledger entries and logs: unique, short, and free of
    /// client data.
    pub fn new_request_id(&self) -> String {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n:x}", self.started_unix_ms)
    }
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
