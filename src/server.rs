//! Wiring: build the application state from a validated `Config` and run
//! the pingora server with its services (proxy, admin, sweeper).
//!
//! This module owns start-up order: tariffs and accounts are loaded and
//! checked before any listener opens, so a bad file stops start-up with its
//! error instead of serving with half a configuration.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::auth::CredentialStore;
use crate::config::{accounts, Config, InDoubtPolicy};
use crate::ledger::{Bucket, Clock, EntrySink, Ledger, LedgerConfig, NullSink, SystemClock};
use crate::metrics::Metrics;
use crate::proxy::TollgateProxy;
use crate::service::{App, MetricsSink};
use crate::tariff::Tariff;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Tariff(String),
    #[error("account {account}: {problem}")]
    Account { account: String, problem: String },
}

/// Builds the shared state: ledger, credentials, tariff, seeded accounts.
pub fn build_app(config: Config, sink: Arc<dyn EntrySink>) -> Result<App, StartError> {
    let tariff =
        Tariff::load(&config.tariffs_path).map_err(|e| StartError::Tariff(e.to_string()))?;
    let metrics = Arc::new(Metrics::new());
    let ledger = Arc::new(Ledger::new(
        LedgerConfig {
            overdraft: config.overdraft,
            reservation_ttl_ms: config.settle.reservation_ttl.as_millis() as i64,
        },
        Arc::new(MetricsSink {
            metrics: metrics.clone(),
            next: sink,
        }),
        Arc::new(SystemClock) as Arc<dyn Clock>,
    ));
    let credentials = Arc::new(CredentialStore::new(config.auth.credential_cache_entries));
    if let Some(path) = &config.accounts_path {
        for seed in accounts::load(path)? {
            seed_account(&ledger, &credentials, &seed)?;
        }
    }
    Ok(App::new(config, ledger, credentials, tariff, metrics))
}

/// Opens a seed account the ledger does not know yet, with its opening
/// balances; an account the ledger already has keeps its balance.
fn seed_account(
    ledger: &Ledger,
    credentials: &CredentialStore,
    seed: &accounts::AccountSeed,
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
        if amount != 0 {
            ledger
                .add(&seed.name, bucket, amount, Some("seed"))
                .map_err(|e| fail(e.to_string()))?;
        }
    }
    Ok(())
}

/// Expires forgotten reservations and applies the in-doubt policy, once a
/// second. Runs on its own pingora background runtime.
struct Sweeper {
    app: Arc<App>,
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
            let expired = self.app.ledger.expire_due();
            if !expired.is_empty() {
                tracing::warn!(count = expired.len(), "expired forgotten reservations");
            }
            let settle = &self.app.config.settle;
            let post = match settle.in_doubt_policy {
                InDoubtPolicy::Manual => continue,
                InDoubtPolicy::Post => true,
                InDoubtPolicy::Void => false,
            };
            let resolved = self
                .app
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

/// Runs tollgate until a signal stops it.
pub fn run(config: Config) -> Result<(), StartError> {
    let sink: Arc<dyn EntrySink> = Arc::new(NullSink);
    let app = Arc::new(build_app(config, sink)?);
    let cfg = &app.config;

    let mut conf = ServerConf::default();
    if let Some(t) = cfg.threads {
        conf.threads = t;
    }
    conf.grace_period_seconds = Some(0);
    conf.graceful_shutdown_timeout_seconds = Some(10);
    let opt = Opt::default();
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        TollgateProxy::new(app.clone()),
        "tollgate proxy",
    );
    proxy.add_tcp(&cfg.listen.to_string());

    let mut admin = Service::new("tollgate admin".to_string(), AdminApp { app: app.clone() });
    admin.add_tcp(&cfg.admin.listen.to_string());
    admin.threads = Some(1);

    let sweeper = background_service("sweeper", Sweeper { app: app.clone() });

    tracing::info!(
        listen = %cfg.listen,
        upstream = %cfg.upstream.address,
        admin = %cfg.admin.listen,
        mode = ?cfg.mode,
        tariff_version = app.snapshot.load().tariff.version(),
        accounts = app.ledger.len(),
        "tollgate starting"
    );
    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(sweeper);
    server.run_forever();
}
