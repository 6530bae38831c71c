//! Wiring: build the application state from a validated `Config` and run
//! the pingora server with its services (proxy, admin, sweeper, tariff
//! reloader).
//!
//! This module owns start-up order: the store's ownership is taken first
//! (a second process on an owned store stops here, before it reads the
//! ledger or opens the idempotency key file), then tariffs and accounts are
//! loaded and checked before any listener opens, so a bad file stops
//! start-up with its error instead of serving with half a configuration.
//! Shutdown runs the other way: the store is flushed, then its ownership
//! released.
//!
//! `tollgate run --upgrade` (a successor) is the exception: it listens
//! before it owns the store, through a late-bound app slot, and takes the
//! store over when the running process hands it over on SIGQUIT; that
//! logic lives in `handover/` (this module only picks the path, passes
//! `--upgrade` and the socket paths to pingora, and installs the signal
//! handling that starts the hand-over).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::auth::CredentialStore;
use crate::cluster::node::ClusterNode;
use crate::config::{accounts, Config, InDoubtPolicy};
use crate::downstream::{ConnectionGate, GateConfig};
use crate::handover::{Readiness, Slot, UpgradeSignals};
use crate::ledger::{
    Bucket, BucketBalance, Clock, EntrySink, Ledger, LedgerConfig, NullSink, SystemClock,
};
use crate::metrics::Metrics;
use crate::proxy::TollgateProxy;
use crate::reload::Reloader;
use crate::service::{App, MetricsSink};
use crate::store::fence::FenceKeeper;
use crate::store::{
    AccountDirectory, Loaded, PgSettings, PgStore, SqliteStore, StoreError, WriteBehind,
    WriterConfig,
};
use crate::tariff::Tariff;
use crate::tls::{CertStore, GatewayTls, TlsListener};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Tariff(String),
    #[error("account {account}: {problem}")]
    Account { account: String, problem: String },
    #[error("store {path}: {problem}")]
    Store { path: String, problem: String },
    /// A live process owns the store (a successor polls this one).
    #[error("store {path}: {problem}")]
    StoreOwned { path: String, problem: String },
    #[error("upgrade: {0}")]
    Upgrade(String),
    #[error("{key}: {problem}")]
    Tls { key: &'static str, problem: String },
}

/// How long shutdown keeps retrying a failing store before it gives up on
/// the entries still queued (and exits non-zero).
pub const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// The store opened at start-up: its writer (the ledger's sink, not yet
/// started) and what it loaded. The accounts are not loaded here: the
/// restore reads them itself (see [`restore`]).
pub struct OpenedStore {
    pub writer: Arc<WriteBehind>,
    /// The reservations open at the last stop and the last seq;
    /// `loaded.accounts` is empty.
    pub loaded: Loaded,
    /// Where the store is, for the restore's own connections.
    location: StoreLocation,
    /// A cluster node's runtime (`cluster:`): registered, its writer under
    /// the node's lease.
    cluster: Option<Arc<ClusterNode>>,
    /// About how many accounts the store holds: sizes the ledger's map once.
    accounts_hint: usize,
}

/// Where the ledger store is: an SQLite file or a PostgreSQL database.
#[derive(Clone, Debug)]
enum StoreLocation {
    Sqlite(PathBuf),
    Postgres(Box<PgSettings>),
}

impl StoreLocation {
    /// The store's name in messages (a URL's password redacted).
    fn name(&self) -> String {
        match self {
            StoreLocation::Sqlite(path) => path.display().to_string(),
            StoreLocation::Postgres(pg) => pg.url.redacted().to_string(),
        }
    }

    /// A store error as start-up reports it.
    fn fail(&self, problem: String) -> StartError {
        let problem = match self {
            StoreLocation::Sqlite(_) => problem,
            StoreLocation::Postgres(pg) => pg.url.redact(&problem),
        };
        StartError::Store {
            path: self.name(),
            problem,
        }
    }
}

/// Accounts a restore thread collects before handing them to the ledger
/// (one update of the ledger's running total per batch).
const RESTORE_BATCH: usize = 256;

/// Opens the store named by `store.path` (SQLite) or `store.url`
/// (PostgreSQL: its pending migrations are applied first), takes ownership
/// of it (before anything is read: a store a live process owns stops
/// start-up with a message naming that process) and loads its open
/// reservations and last seq; `None` when no store is configured. The
/// lease is renewed from here on, through the whole load.
pub fn open_store(
    config: &Config,
    metrics: &Arc<Metrics>,
    clock: Arc<dyn Clock>,
) -> Result<Option<OpenedStore>, StartError> {
    if let Some(pg) = &config.store.postgres {
        return open_postgres(config, pg, metrics, clock).map(Some);
    }
    let Some(path) = &config.store.path else {
        return Ok(None);
    };
    let fail = |e: StoreError| {
        let owned = matches!(e, StoreError::Owned { .. });
        let (path, problem) = (path.display().to_string(), e.to_string());
        if owned {
            StartError::StoreOwned { path, problem }
        } else {
            StartError::Store { path, problem }
        }
    };
    let (mut store, fence) =
        SqliteStore::open_owned(path, config.durability, config.store.lease, clock)
            .map_err(fail)?;
    let fence = FenceKeeper::start(fence, metrics.clone());
    let loaded = store.load_without_accounts().map_err(fail)?;
    let accounts_hint = store.account_count_hint().map_err(fail)?;
    let writer = Arc::new(WriteBehind::owned(
        Box::new(store),
        fence,
        WriterConfig::from(&config.store),
        metrics.clone(),
    ));
    Ok(Some(OpenedStore {
        writer,
        loaded,
        location: StoreLocation::Sqlite(path.clone()),
        accounts_hint,
        cluster: None,
    }))
}

/// [`open_store`] for `store.url`. Runs on the main thread, before any
/// runtime (the PostgreSQL client blocks).
fn open_postgres(
    config: &Config,
    pg: &PgSettings,
    metrics: &Arc<Metrics>,
    clock: Arc<dyn Clock>,
) -> Result<OpenedStore, StartError> {
    let location = StoreLocation::Postgres(Box::new(pg.clone()));
    if let Some(cluster) = &config.cluster {
        return open_cluster_node(config, pg, cluster, metrics, clock, location);
    }
    let fail = |e: StoreError| match (location.fail(e.to_string()), &e) {
        (StartError::Store { path, problem }, StoreError::Owned { .. }) => {
            StartError::StoreOwned { path, problem }
        }
        (other, _) => other,
    };
    let (store, fence) =
        PgStore::open_owned(pg, config.durability, config.store.lease, clock).map_err(fail)?;
    let mut store = store.with_metrics(metrics.clone());
    let fence = FenceKeeper::start(fence, metrics.clone());
    let loaded = store.load_without_accounts().map_err(fail)?;
    let accounts_hint = store.account_count_hint().map_err(fail)?;
    let writer = Arc::new(WriteBehind::owned(
        Box::new(store),
        fence,
        WriterConfig::from(&config.store),
        metrics.clone(),
    ));
    Ok(OpenedStore {
        writer,
        loaded,
        location,
        accounts_hint,
        cluster: None,
    })
}

/// [`open_postgres`] for a cluster node: applies pending migrations (under
/// their lock, so nodes starting together migrate once), registers the
/// node (its lease and fencing token: `crate::cluster`), and opens the
/// writer under that lease; loads only this node's open reservations and
/// continues its own seq range. No single-owner fence: the nodes share the
/// store.
fn open_cluster_node(
    config: &Config,
    pg: &PgSettings,
    cluster: &crate::config::cluster::ClusterConfig,
    metrics: &Arc<Metrics>,
    clock: Arc<dyn Clock>,
    location: StoreLocation,
) -> Result<OpenedStore, StartError> {
    let fail = |problem: String| location.fail(problem);
    let me = crate::store::fence::Claimant::this_process(clock.now_unix_ms());
    drop(
        PgStore::open(pg, config.durability, &me.host, me.started_unix_ms)
            .map_err(|e| fail(e.to_string()))?,
    );
    let node = ClusterNode::start(
        pg,
        cluster,
        metrics.clone(),
        clock,
        config.store.ack_timeout,
    )
    .map_err(|e| fail(format!("cluster (node {}): {e}", cluster.node_id)))?;
    let mut store = PgStore::open_under_lease(pg, config.durability, node.lease())
        .map_err(|e| fail(e.to_string()))?
        .with_metrics(metrics.clone());
    let loaded = store
        .load_without_accounts()
        .map_err(|e| fail(e.to_string()))?;
    let accounts_hint = store
        .account_count_hint()
        .map_err(|e| fail(e.to_string()))?;
    let writer = Arc::new(WriteBehind::new(
        Box::new(store),
        WriterConfig::from(&config.store),
        metrics.clone(),
    ));
    tracing::info!(
        node = %cluster.node_id,
        id = node.lease().node,
        own_open_reservations = loaded.open_reservations.len(),
        "cluster node joined"
    );
    Ok(OpenedStore {
        writer,
        loaded,
        location,
        accounts_hint,
        cluster: Some(node),
    })
}

/// Start-up load (SPEC 6): balances, the reservations open at the last stop
/// or crash (they come back in doubt), and the seq counter.
///
/// The accounts are read and restored by one thread per core, each over
/// its own connection and its own part of the table (issue 8: 10 M
/// accounts in under 10 s). Restoring is bound by cache misses and page
/// faults, not by a lock (accounts spread over the map's shards), so the
/// threads add up; handing accounts from one reading thread to restoring
/// ones cost more in cross-core cache traffic than it saved. Order does not
/// matter: names are unique and an account is restored without its parent.
/// The writer is not started yet, so nothing writes to the store meanwhile.
///
/// A PostgreSQL store is read by one thread over one snapshot session,
/// streamed (the server sends rows as fast as the ledger takes them).
fn restore(ledger: &Ledger, opened: OpenedStore) -> Result<Arc<WriteBehind>, StartError> {
    // A cluster node restores every account's identity but spends only
    // its own: each account's balance is its open reservations here (its
    // grants start empty; `cluster::node`).
    let own = opened.cluster.as_ref().map(|_| {
        let mut own: HashMap<&str, [i64; 2]> = HashMap::new();
        for r in &opened.loaded.open_reservations {
            let sums = own.entry(r.account.as_str()).or_default();
            sums[0] += r.anytime_milli.max(0);
            sums[1] += r.offpeak_milli.max(0);
        }
        own
    });
    let restored = match &opened.location {
        StoreLocation::Sqlite(path) => restore_sqlite(ledger, path),
        StoreLocation::Postgres(pg) => restore_postgres(ledger, pg, own.as_ref()),
    }
    .map_err(|e| opened.location.fail(e.to_string()))?;
    let loaded = opened.loaded;
    let in_doubt = loaded.open_reservations.len();
    for reservation in loaded.open_reservations {
        ledger.restore_reservation(reservation);
    }
    ledger.set_next_seq(loaded.last_seq + 1);
    if in_doubt > 0 {
        tracing::warn!(
            in_doubt,
            "reservations open at the last stop are in doubt; resolve them via /admin/reservations"
        );
    }
    tracing::info!(
        accounts = restored,
        last_seq = loaded.last_seq,
        "ledger restored from the store"
    );
    Ok(opened.writer)
}

fn restore_postgres(
    ledger: &Ledger,
    pg: &PgSettings,
    own: Option<&HashMap<&str, [i64; 2]>>,
) -> Result<usize, StoreError> {
    let mut reader = PgStore::open_snapshot(pg)?;
    let mut batch = Vec::with_capacity(RESTORE_BATCH);
    let n = reader.for_each_ready_account(&mut |account| {
        let account = match own {
            None => account,
            Some(own) => {
                let [anytime, offpeak] = own.get(account.name()).copied().unwrap_or_default();
                let held = |milli| BucketBalance {
                    posted_milli: milli,
                    reserved_milli: milli,
                };
                account.with_balances(held(anytime), held(offpeak))
            }
        };
        batch.push(account);
        if batch.len() == RESTORE_BATCH {
            ledger.restore_ready(batch.drain(..));
        }
        Ok(())
    })?;
    ledger.restore_ready(batch);
    Ok(n as usize)
}

fn restore_sqlite(ledger: &Ledger, path: &std::path::Path) -> Result<usize, StoreError> {
    let parts = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, 8);
    let restore_part = |part: usize| -> Result<usize, StoreError> {
        let mut reader = SqliteStore::open_existing(path)?;
        let mut batch = Vec::with_capacity(RESTORE_BATCH);
        let mut restored = 0usize;
        reader.for_each_ready_account(part, parts, &mut |account| {
            batch.push(account);
            if batch.len() == RESTORE_BATCH {
                restored += batch.len();
                ledger.restore_ready(batch.drain(..));
            }
            Ok(())
        })?;
        restored += batch.len();
        ledger.restore_ready(batch);
        Ok(restored)
    };
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..parts)
            .map(|part| scope.spawn(move || restore_part(part)))
            .collect();
        let mut restored = restore_part(0)?;
        for helper in helpers {
            restored += helper
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        }
        Ok(restored)
    })
}

/// Builds the shared state without a store: ledger, credentials, tariff,
/// seeded accounts; entries go to `sink` (tests, benchmarks).
pub fn build_app(config: Config, sink: Arc<dyn EntrySink>) -> Result<App, StartError> {
    build_app_with_clock(config, sink, Arc::new(SystemClock::new()))
}

/// [`build_app`] on `clock`: every time-based rule of the app (entry
/// timestamps, pricing windows, limits, key expiry, the in-doubt timer)
/// reads it, so a test can drive them all.
pub fn build_app_with_clock(
    config: Config,
    sink: Arc<dyn EntrySink>,
    clock: Arc<dyn Clock>,
) -> Result<App, StartError> {
    build(config, Arc::new(Metrics::new()), sink, None, clock)
}

/// Builds the shared state over the store from [`open_store`] (if any):
/// the store's accounts, balances and open reservations are restored first,
/// the writer is started, and only then are seed accounts the store does not
/// have created.
pub fn build_app_with_store(
    config: Config,
    metrics: Arc<Metrics>,
    store: Option<OpenedStore>,
    clock: Arc<dyn Clock>,
) -> Result<App, StartError> {
    let sink: Arc<dyn EntrySink> = match &store {
        Some(s) => s.writer.clone(),
        None => Arc::new(NullSink),
    };
    build(config, metrics, sink, store, clock)
}

/// The durable outbox: in its own SQLite file (`outbox.path`), in the
/// PostgreSQL store's database, or in memory without a store.
fn open_outbox(app: &App) -> Result<Arc<crate::outbox::Outbox>, StartError> {
    use crate::outbox::Outbox;
    let cfg = &app.config;
    let fail = |place: String, problem: String| StartError::Store {
        path: place,
        problem,
    };
    let outbox = match (&cfg.outbox.path, &cfg.store.postgres) {
        (Some(path), _) => Outbox::open(&cfg.outbox, app.clock.clone(), app.metrics.clone())
            .map_err(|p| fail(path.display().to_string(), p))?,
        (None, Some(pg)) => {
            Outbox::open_postgres(&cfg.outbox, pg, app.clock.clone(), app.metrics.clone())
                .map_err(|p| fail(pg.url.redacted().to_string(), pg.url.redact(&p)))?
        }
        (None, None) => Outbox::open(&cfg.outbox, app.clock.clone(), app.metrics.clone())
            .map_err(|p| fail("(memory)".into(), p))?,
    };
    Ok(Arc::new(outbox))
}

fn build(
    config: Config,
    metrics: Arc<Metrics>,
    sink: Arc<dyn EntrySink>,
    store: Option<OpenedStore>,
    clock: Arc<dyn Clock>,
) -> Result<App, StartError> {
    let tariff =
        Tariff::load(&config.tariffs_path).map_err(|e| StartError::Tariff(e.to_string()))?;
    // Low-balance webhooks see every entry's account (`notify`).
    let touched = config
        .notify
        .low_balance
        .is_some()
        .then(|| Arc::new(crate::notify::Touched::default()));
    // Sized for the stored accounts, so restoring millions never rehashes.
    let stored_accounts = store.as_ref().map_or(0, |s| s.accounts_hint);
    let ledger = Arc::new(Ledger::with_capacity(
        LedgerConfig {
            overdraft: config.overdraft,
            reservation_ttl_ms: config.settle.reservation_ttl.as_millis() as i64,
        },
        Arc::new(MetricsSink {
            metrics: metrics.clone(),
            next: match &touched {
                Some(touched) => Arc::new(crate::notify::TouchedSink {
                    touched: touched.clone(),
                    next: sink,
                }),
                None => sink,
            },
        }),
        clock.clone(),
        stored_accounts,
    ));
    let location = store.as_ref().map(|s| s.location.clone());
    let cluster = store.as_ref().and_then(|s| s.cluster.clone());
    let writer = match store {
        Some(opened) => {
            let writer = restore(&ledger, opened)?;
            let directory: Weak<dyn AccountDirectory> = Arc::downgrade(&ledger) as _;
            writer.start(directory);
            Some(writer)
        }
        None => None,
    };
    let seeds = match &config.accounts_path {
        Some(path) => accounts::load(path)?,
        None => Vec::new(),
    };
    let credentials = Arc::new(CredentialStore::with_capacity(
        config.auth.credential_cache_entries,
        seeds.len(),
    ));
    if let Some(node) = &cluster {
        if let Some(writer) = &writer {
            node.attach(ledger.clone(), writer.clone());
        }
        seed_cluster(node, &ledger, &seeds)?;
    }
    for seed in &seeds {
        seed_account(&ledger, &credentials, seed, cluster.is_none())?;
    }
    let mut app = App::new(config, ledger, credentials, tariff, metrics, clock);
    app.store = writer;
    app.cluster = cluster;
    // Idempotency keys live next to the ledger store (SPEC 3.4) and belong to
    // its owner: opened only once this process owns the store. With a
    // PostgreSQL store and no key file, in the store's database.
    if let Some(path) = &app.config.idempotency.path {
        let keys =
            crate::idempotency::Idempotency::open(&app.config.idempotency, app.clock.clone())
                .map_err(|problem| StartError::Store {
                    path: path.display().to_string(),
                    problem,
                })?;
        app.idempotency = Arc::new(keys);
    } else if let Some(pg) = &app.config.store.postgres {
        // Cluster nodes share the key table: PostgreSQL decides each claim
        // (a retry on another node replays, never runs twice).
        let open = if app.cluster.is_some() {
            crate::idempotency::Idempotency::open_postgres_cluster
        } else {
            crate::idempotency::Idempotency::open_postgres
        };
        let keys = open(&app.config.idempotency, pg, app.clock.clone()).map_err(|problem| {
            StartError::Store {
                path: pg.url.redacted().to_string(),
                problem: pg.url.redact(&problem),
            }
        })?;
        app.idempotency = Arc::new(keys);
    }
    if app.config.dlr.enabled || app.config.notify.low_balance.is_some() {
        app.outbox = Some(open_outbox(&app)?);
    }
    if let (Some(outbox), true) = (&app.outbox, app.config.dlr.enabled) {
        app.dlr = Some(open_dlr(&app, outbox.clone(), location.as_ref())?);
    }
    // Boxis identities (e-mail, user key) come from the seeds only.
    for seed in &seeds {
        app.boxis.keys.set(
            &seed.name,
            seed.email.as_deref(),
            seed.boxis_user_key.as_deref(),
        );
    }
    // Low-balance webhooks start from the restored and seeded balances.
    if let (Some(lb), Some(touched)) = (&app.config.notify.low_balance, touched) {
        app.low_balance = Some(Arc::new(crate::notify::LowBalanceNotifier::new(
            lb.clone(),
            &app.ledger,
            touched,
        )));
    }
    Ok(app)
}

/// Opens the delivery-report watcher over the outbox, and restores the sends
/// it was watching (finishing refunds a crash interrupted: the journal
/// says which it already has).
fn open_dlr(
    app: &App,
    outbox: Arc<crate::outbox::Outbox>,
    location: Option<&StoreLocation>,
) -> Result<Arc<crate::dlr::Dlr>, StartError> {
    let cfg = &app.config;
    let fail = |place: String, problem: String| StartError::Store {
        path: place,
        problem,
    };
    let dlr = crate::dlr::Dlr::new(
        cfg.dlr.clone(),
        outbox,
        app.ledger.clone(),
        app.store.clone(),
        cfg.durability == crate::config::Durability::Sync,
        app.metrics.clone(),
        app.clock.clone(),
    );
    let mut lookup = |min: u64| -> Result<std::collections::HashSet<(u64, String)>, String> {
        let Some(location) = location else {
            return Ok(Default::default());
        };
        refunds_in_journal(location, min).map_err(|e| e.to_string())
    };
    let restored = dlr
        .restore(&mut lookup)
        .map_err(|p| fail("(outbox)".into(), p))?;
    if restored.sends > 0 {
        tracing::info!(
            sends = restored.sends,
            refunds_found = restored.refunds_found,
            refunds_made = restored.refunds_made,
            "delivery reports: watched sends restored"
        );
    }
    Ok(Arc::new(dlr))
}

/// The `(reservation, refund reference)` pairs the journal refunds, from
/// seq `min` on (start-up after a crash interrupted a refund; one pass over
/// the journal).
fn refunds_in_journal(
    location: &StoreLocation,
    min: u64,
) -> Result<std::collections::HashSet<(u64, String)>, StoreError> {
    use crate::ledger::EntryKind;
    use crate::store::Store;
    let mut reader: Box<dyn Store> = match location {
        StoreLocation::Sqlite(path) => Box::new(SqliteStore::open_existing(path)?),
        StoreLocation::Postgres(pg) => Box::new(PgStore::open_snapshot(pg)?),
    };
    let mut found = std::collections::HashSet::new();
    reader.for_each_entry(&mut |e| {
        if e.kind == EntryKind::Refund && e.seq >= min {
            if let (Some(r), Some(reference)) = (e.reservation_id, e.reference) {
                found.insert((r, reference));
            }
        }
        Ok(())
    })?;
    Ok(found)
}

/// A cluster node's seeds: the accounts the cluster lacks are created in
/// the database with their opening balances (by whichever node starts
/// first); the ledger then opens every seed empty (`seed_account`), as a
/// node spends only from its grants.
fn seed_cluster(
    node: &ClusterNode,
    ledger: &Ledger,
    seeds: &[accounts::AccountSeed],
) -> Result<(), StartError> {
    let rows: Vec<crate::cluster::sql::Seed<'_>> = seeds
        .iter()
        .map(|s| crate::cluster::sql::Seed {
            name: &s.name,
            parent: s.parent.as_deref(),
            role: s.role,
            tariff_class: s.tariff_class.as_deref(),
            anytime_milli: s.anytime_milli,
            offpeak_milli: s.offpeak_milli,
        })
        .collect();
    let created = node
        .seed_blocking(ledger, &rows)
        .map_err(|e| StartError::Store {
            path: node.settings().url.redacted().to_string(),
            problem: node.settings().url.redact(&e.to_string()),
        })?;
    if created > 0 {
        tracing::info!(
            created,
            "cluster: seed accounts created in the shared store"
        );
    }
    Ok(())
}

/// Opens a seed account the ledger does not know yet, with its opening
/// balances (`with_balance`; a cluster node opens it empty: the balance
/// is the cluster's, `seed_cluster`); an account the ledger already has
/// keeps its balance.
fn seed_account(
    ledger: &Ledger,
    credentials: &CredentialStore,
    seed: &accounts::AccountSeed,
    with_balance: bool,
) -> Result<(), StartError> {
    let fail = |problem: String| StartError::Account {
        account: seed.name.clone(),
        problem,
    };
    credentials.set(&seed.name, &seed.password_hash);
    if ledger.account(&seed.name).is_some() {
        return Ok(());
    }
    ledger
        .open_account(
            &seed.name,
            seed.parent.as_deref(),
            seed.role,
            seed.tariff_class.as_deref(),
        )
        .map_err(|e| fail(e.to_string()))?;
    for (bucket, amount) in [
        (Bucket::Anytime, seed.anytime_milli),
        (Bucket::OffPeak, seed.offpeak_milli),
    ] {
        if amount != 0 && with_balance {
            ledger
                .add(&seed.name, bucket, amount, Some("seed"))
                .map_err(|e| fail(e.to_string()))?;
        }
    }
    Ok(())
}

/// Expires forgotten reservations and applies the in-doubt policy, once a
/// second, and refreshes the gauges nothing on the request path keeps
/// (store queue, idempotency keys). Runs on its own pingora background
/// runtime.
///
/// Only while this process serves credit (`handover.rs`): a successor has
/// no ledger yet, and an old process handing over moves no money.
struct Sweeper {
    slot: Arc<Slot>,
}

#[async_trait]
impl BackgroundService for Sweeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            let (Some(app), Readiness::Serving) = (self.slot.bound(), self.slot.readiness()) else {
                continue;
            };
            if let Some(store) = &app.store {
                store.refresh_gauges();
            }
            if let Some(dlr) = &app.dlr {
                dlr.sweep().await;
            }
            if let Some(outbox) = &app.outbox {
                outbox.refresh().await;
            }
            app.sweep_protection();
            let m = &app.metrics;
            m.idempotency_keys.set(app.idempotency.keys_held() as i64);
            m.idempotency_max_keys
                .set(app.config.idempotency.max_keys as i64);
            let expired = app.ledger.expire_due();
            if !expired.is_empty() {
                tracing::warn!(count = expired.len(), "expired forgotten reservations");
            }
            let settle = &app.config.settle;
            let post = match settle.in_doubt_policy {
                InDoubtPolicy::Manual => continue,
                InDoubtPolicy::Post => true,
                InDoubtPolicy::Void => false,
            };
            let resolved = app
                .ledger
                .resolve_in_doubt_older_than(settle.in_doubt_after.as_millis() as i64, post);
            if !resolved.is_empty() {
                tracing::warn!(
                    count = resolved.len(),
                    post,
                    "resolved in-doubt reservations by policy"
                );
            }
        }
    }
}

/// How `tollgate run` starts.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// `--upgrade`: take the listening sockets and the store over from the
    /// running process (told by SIGQUIT), see `handover.rs`.
    pub upgrade: bool,
}

/// What `pick` takes from the app this process serves credit with, once
/// there is one (a successor binds its app after taking the store over);
/// `None` if shutdown comes first.
async fn once_bound<T>(
    slot: &Slot,
    shutdown: &mut ShutdownWatch,
    pick: impl Fn(&App) -> Option<T>,
) -> Option<T> {
    loop {
        if let Some(found) = slot.bound().and_then(|app| pick(&app)) {
            return Some(found);
        }
        tokio::select! {
            _ = shutdown.changed() => return None,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Runs the low-balance notifier once this process serves credit.
struct Notifier {
    slot: Arc<Slot>,
}

#[async_trait]
impl BackgroundService for Notifier {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let bound = once_bound(&self.slot, &mut shutdown, |app| {
            Some((
                app.low_balance.clone()?,
                app.outbox.clone()?,
                app.ledger.clone(),
            ))
        });
        let Some((notifier, outbox, ledger)) = bound.await else {
            return;
        };
        let app = self.slot.current();
        notifier
            .run(
                ledger,
                outbox,
                app.clock.clone(),
                app.metrics.clone(),
                shutdown,
            )
            .await;
    }
}

/// Runs the outbox's relay on its own background runtime until shutdown,
/// from the moment this process serves credit (a successor's outbox opens
/// with its store).
struct Relay {
    slot: Arc<Slot>,
}

#[async_trait]
impl BackgroundService for Relay {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if let Some(outbox) = once_bound(&self.slot, &mut shutdown, |app| app.outbox.clone()).await
        {
            outbox.relay(shutdown).await;
        }
    }
}

/// Runs tollgate until a signal stops it.
pub fn run(config: Config) -> Result<(), StartError> {
    run_with(config, RunOptions::default())
}

/// [`run`] with `options`.
pub fn run_with(config: Config, options: RunOptions) -> Result<(), StartError> {
    let metrics = Arc::new(Metrics::with_store_ack_timeout(config.store.ack_timeout));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    if options.upgrade && config.cluster.is_some() {
        return Err(StartError::Upgrade(
            "a cluster node is not upgraded in place: stop it (SIGTERM: it gives its grants \
             back) and start the new build; the load balancer sends clients to the other \
             nodes meanwhile"
                .into(),
        ));
    }
    let slot = if options.upgrade {
        // The successor listens before it owns the store; the ledger is
        // bound into the slot once the old process released it.
        crate::handover::start::successor(&config, &metrics, &clock)?
    } else {
        // The store first: a store that cannot open (or that a live
        // process owns) stops start-up before any listener does.
        let store = open_store(&config, &metrics, clock.clone())?;
        let slot = Slot::serving(Arc::new(build_app_with_store(
            config.clone(),
            metrics,
            store,
            clock,
        )?));
        crate::handover::start::write_pid_file(&config.upgrade.pid_file);
        slot
    };
    let front = slot.current();
    let cfg = &front.config;

    let mut conf = ServerConf::default();
    if let Some(t) = cfg.threads {
        conf.threads = t;
    }
    // pingora's own knobs (`pingora:`), absent ones at pingora's default.
    if let Some(n) = cfg.pingora.listener_tasks_per_fd {
        conf.listener_tasks_per_fd = n;
    }
    if let Some(w) = cfg.pingora.work_stealing {
        conf.work_stealing = w;
    }
    if let Some(n) = cfg.pingora.upstream_keepalive_pool_size {
        conf.upstream_keepalive_pool_size = n;
    }
    conf.grace_period_seconds = Some(cfg.shutdown_grace.as_secs());
    conf.graceful_shutdown_timeout_seconds = Some(10);
    // pingora's graceful upgrade (docs/user_guide/graceful.md): the old
    // process sends its listening sockets to `upgrade_sock` on SIGQUIT.
    conf.upgrade_sock = cfg.upgrade.sock.display().to_string();
    conf.pid_file = cfg.upgrade.pid_file.display().to_string();
    let opt = Opt {
        upgrade: options.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    // With `--upgrade` this waits (pingora: about 6 s at most) for the old
    // process's sockets; it exits the process if none come.
    server.bootstrap();

    // The proxy's app behind the connection gate (per-address connection
    // cap, header deadline: `downstream.rs`).
    let gate = ConnectionGate::new(
        Arc::new(pingora::proxy::http_proxy(
            &server.configuration,
            TollgateProxy::with_slot(slot.clone()),
        )),
        GateConfig {
            header_timeout: cfg.downstream.header_timeout,
            max_connections_per_ip: cfg.downstream.max_connections_per_ip,
        },
        front.metrics.clone(),
    );
    let (gate, certs) = client_tls(gate, &front)?;
    let mut proxy = Service::new("tollgate proxy".to_string(), gate);
    add_client_listeners(&mut proxy, cfg);

    let mut admin = Service::new(
        "tollgate admin".to_string(),
        AdminApp::with_slot(slot.clone()).with_certs(certs.clone()),
    );
    admin.add_tcp(&cfg.admin.listen.to_string());
    admin.threads = Some(1);

    let sweeper = background_service("sweeper", Sweeper { slot: slot.clone() });
    // Delivery reports: their own listener and the outbox's relay, bound to
    // the app that serves credit (late in a successor).
    let outbox_relay = (cfg.dlr.enabled || cfg.notify.low_balance.is_some())
        .then(|| background_service("outbox relay", Relay { slot: slot.clone() }));
    let notifier = cfg
        .notify
        .low_balance
        .is_some()
        .then(|| background_service("low-balance notifier", Notifier { slot: slot.clone() }));
    let dlr_services = cfg.dlr.enabled.then(|| {
        let mut callbacks = Service::new(
            "tollgate dlr".to_string(),
            crate::dlr::callback::CallbackApp {
                dlr: Box::new({
                    let slot = slot.clone();
                    move || slot.bound().and_then(|app| app.dlr.clone())
                }),
            },
        );
        callbacks.add_listener(crate::dlr::callback::listener(&cfg.dlr.listen.to_string()));
        callbacks.threads = Some(1);
        callbacks
    });

    tracing::info!(
        listen = ?cfg.listen,
        tls_listen = ?cfg.tls.as_ref().map(|t| t.listen),
        upstream = %cfg.upstream.address,
        upstream_tls = cfg.upstream.tls.is_some(),
        admin = %cfg.admin.listen,
        mode = ?cfg.mode,
        tariff_version = front.snapshot.load().tariff.version(),
        accounts = front.ledger.len(),
        readiness = slot.readiness().as_str(),
        "tollgate starting"
    );
    // The reloader first, and the listeners after it is ready: its SIGHUP
    // handler is installed before a port accepts (pingora 0.9.1 has none,
    // and an unhandled SIGHUP ends the process). See `reload.rs`.
    let reloader = server.add_service(background_service(
        "tariff reloader",
        Reloader::with_slot(slot.clone()).with_certs(certs),
    ));
    server.add_service(proxy).add_dependency(&reloader);
    server.add_service(admin).add_dependency(&reloader);
    server.add_service(sweeper);
    if let Some(callbacks) = dlr_services {
        server.add_service(callbacks).add_dependency(&reloader);
    }
    if let Some(relay) = outbox_relay {
        server.add_service(relay);
    }
    if let Some(notifier) = notifier {
        server.add_service(notifier);
    }
    drop(front);
    // Not `run_forever`: it exits the process. `run` returns once a signal
    // (SIGTERM: graceful, SIGINT: fast, SIGQUIT: upgrade, which starts the
    // hand-over of the store first) has stopped every service runtime — so
    // no request is left to record entries — and the store is flushed
    // before the process exits 0.
    server.run(RunArgs {
        shutdown_signal: Box::new(UpgradeSignals { slot: slot.clone() }),
    });
    // SIGQUIT: the hand-over thread flushes and releases the store; wait
    // for it (the flush below then finds nothing left).
    let handed_over = slot.join_handover();
    crate::handover::start::remove_pid_file(&config.upgrade.pid_file);
    if let Some(Err(e)) = handed_over {
        return Err(StartError::Upgrade(e));
    }
    match slot.bound() {
        Some(app) => {
            app.idempotency.flush_blocking();
            let flushed = flush_store(&app);
            // After the last commit: every grant back, the lease released.
            if let Some(node) = &app.cluster {
                node.shutdown();
            }
            flushed
        }
        // A successor stopped before it got the store: nothing to flush.
        None => Ok(()),
    }
}

/// The TLS side of the client listener (`tls:`), if configured: the
/// certificate is loaded and checked here, so a bad pair stops start-up;
/// and HTTPS to the gateway (`upstream.tls`), whose CA file is checked
/// here for the same reason.
fn client_tls<A>(
    gate: ConnectionGate<A>,
    app: &App,
) -> Result<(ConnectionGate<A>, Option<Arc<CertStore>>), StartError> {
    let cfg = &app.config;
    if let Some(up) = &cfg.upstream.tls {
        GatewayTls::new(up).map_err(|e| StartError::Tls {
            key: "upstream.ca_file",
            problem: e.to_string(),
        })?;
        crate::reload::warn_if_upstream_unverified(app);
    }
    let Some(tls) = &cfg.tls else {
        return Ok((gate, None));
    };
    let fail = |e: crate::tls::TlsError| StartError::Tls {
        key: "tls",
        problem: e.to_string(),
    };
    let certs = Arc::new(CertStore::load(tls, app.metrics.clone()).map_err(fail)?);
    let listener = Arc::new(TlsListener::new(certs.clone()).map_err(fail)?);
    let current = certs.current();
    tracing::info!(
        listen = %tls.listen,
        serial = %current.serial,
        subject = %current.subject,
        not_after_unix_s = current.not_after_unix_s,
        "TLS listener certificate loaded"
    );
    Ok((gate.with_tls(tls.listen, listener), Some(certs)))
}

/// The client listeners of the proxy service: `listen` (plain HTTP) and
/// `tls.listen` (the gate tells its connections by their local address).
///
/// The plain listener reads straight from the socket: pingora's default
/// L4 read buffer (64 KiB, allocated and zeroed for every accepted
/// connection) only adds a copy in front of its HTTP/1 reader, which has
/// its own header buffer — the cost of every new connection, the common
/// case for Ozeki clients (benches/e2e/results.md). The TLS listener keeps
/// it: OpenSSL reads a record's 5-byte header and then its body, and the
/// buffer turns those into one read of the socket.
fn add_client_listeners<A>(proxy: &mut Service<A>, cfg: &Config) {
    if let Some(listen) = cfg.listen {
        proxy.add_listener(
            ListenerConfig::tcp(listen.to_string()).l4_buffer(L4BufferSettings::default().read(0)),
        );
    }
    if let Some(tls) = &cfg.tls {
        proxy.add_tcp(&tls.listen.to_string());
    }
}

/// Commits everything the writer still holds and stops it.
fn flush_store(app: &App) -> Result<(), StartError> {
    let Some(writer) = &app.store else {
        return Ok(());
    };
    let queued = writer.depth();
    match writer.flush_and_stop(SHUTDOWN_FLUSH_TIMEOUT) {
        Ok(()) => {
            tracing::info!(
                flushed = queued,
                committed = writer.committed_position(),
                "store flushed; exiting"
            );
            Ok(())
        }
        Err(e) => Err(StartError::Store {
            path: match (&app.config.store.path, &app.config.store.postgres) {
                (Some(p), _) => p.display().to_string(),
                (None, Some(pg)) => pg.url.redacted().to_string(),
                (None, None) => String::new(),
            },
            problem: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;
    use crate::ledger::{BucketBalance, Entry, EntryKind, ReservationState, Role};
    use crate::store::{AccountMeta, Store};

    fn entry(seq: u64, kind: EntryKind, account: &str, amount_milli: i64) -> Entry {
        let reservation = (kind == EntryKind::Reserve).then_some(seq);
        Entry::for_test(seq, kind, account, amount_milli, reservation)
    }

    fn config(dir: &std::path::Path) -> Config {
        std::fs::write(
            dir.join("tariffs.yaml"),
            "default_country_code: \"36\"\ndefault_price: 1\nprices:\n  \"36\": 1\n",
        )
        .unwrap();
        let path = dir.join("tollgate.yaml");
        std::fs::write(
            &path,
            "listen: 127.0.0.1:0\n\
             upstream: { address: 127.0.0.1:9 }\n\
             tariffs: tariffs.yaml\n\
             store: { path: tollgate.db }\n",
        )
        .unwrap();
        Config::load(&path).unwrap()
    }

    #[test]
    fn start_up_restores_every_stored_account_and_fails_on_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let db = config.store.path.clone().unwrap();
        let mut store = SqliteStore::open(&db, Durability::Sync).unwrap();
        let names: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
        let mut entries: Vec<Entry> = names
            .iter()
            .zip(1..)
            .map(|(n, seq)| entry(seq, EntryKind::Add, n, 1000 + seq as i64))
            .collect();
        entries.push(entry(1001, EntryKind::Reserve, "kid", 0));
        let mut metas: Vec<AccountMeta> = names
            .iter()
            .map(|n| AccountMeta {
                name: n.clone(),
                parent: None,
                role: Role::User,
                tariff_class: None,
            })
            .collect();
        metas.push(AccountMeta {
            name: "kid".into(),
            parent: Some("u7".into()),
            role: Role::User,
            tariff_class: Some("gold".into()),
        });
        store.commit(&entries, &metas).unwrap();
        let stored = store.load().unwrap();
        drop(store);

        let metrics = Arc::new(Metrics::new());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let opened = open_store(&config, &metrics, clock.clone()).unwrap();
        let app = build_app_with_store(config.clone(), metrics, opened, clock).unwrap();
        assert_eq!(app.ledger.len(), 1001);
        for a in &stored.accounts {
            assert_eq!(app.ledger.account(&a.name).as_ref(), Some(a));
        }
        assert_eq!(
            app.ledger.account("u999").map(|a| a.anytime),
            Some(BucketBalance {
                posted_milli: 2000,
                reserved_milli: 0
            })
        );
        let in_doubt = app.ledger.reservations(Some(ReservationState::InDoubt));
        assert_eq!(in_doubt.len(), 1);
        assert_eq!(app.ledger.next_seq(), 1002);
        let total: i64 = (1..=1000).map(|seq| 1000 + seq).sum();
        assert_eq!(app.ledger.total_posted_milli(), total);
        app.store
            .as_ref()
            .unwrap()
            .flush_and_stop(Duration::from_secs(5))
            .unwrap();
        drop(app);

        // A row start-up cannot read stops it, naming the store.
        let store = SqliteStore::open(&db, Durability::Sync).unwrap();
        store
            .connection()
            .execute("UPDATE accounts SET role = 'boss' WHERE name = 'u500'", [])
            .unwrap();
        drop(store);
        let metrics = Arc::new(Metrics::new());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let opened = open_store(&config, &metrics, clock.clone()).unwrap();
        match build_app_with_store(config, metrics, opened, clock) {
            Err(StartError::Store { path, problem }) => {
                assert!(path.ends_with("tollgate.db"), "{path}");
                assert!(problem.contains("boss"), "{problem}");
            }
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("a corrupt account must stop start-up"),
        }
    }
}
