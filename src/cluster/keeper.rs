//! The node's lease keeper: one dedicated OS thread with a PostgreSQL
//! session of its own (`tollgate lease`) that renews the node's lease every
//! `cluster.lease_renew_ms` and sweeps dead nodes' grants (`sql::expire`),
//! and the one question the request path asks it, [`LeaseKeeper::may_spend`]:
//! a lock-free read of a deadline, never a round trip.
//!
//! The deadline is the **start** of the last confirmed renewal (taken on
//! this node's monotonic clock before the statement was sent) plus the
//! lease less `cluster.lease_margin_ms`. The database's expiry is its own
//! `now()` at that statement plus the lease: later in real time than the
//! statement's start. So a node cut off from PostgreSQL stops spending at
//! least the margin before the database could consider its lease expired,
//! whatever its keeper thread is doing (stuck in a statement, reconnecting,
//! gone): the deadline simply stops moving.
//!
//! # Failure modes
//! - PostgreSQL unreachable, slow or restarted: renewals fail (each bounded
//!   by the session's statement timeout, at most the renewal interval) and
//!   are retried on a new session at the next tick; `may_spend` turns false
//!   at the deadline and true again after the next successful renewal, if
//!   the lease is still valid then.
//! - The lease expired on the database meanwhile (or a new incarnation of
//!   the node registered): the renewal is refused, the keeper marks itself
//!   fenced and stops: this incarnation never spends again (its commits are
//!   refused too). Start a new one.
//! - The database's clock steps forward (NTP): its expiry comes earlier
//!   than this node believes by the step; the node's commits are then
//!   refused (fail closed) but it may have decided reservations meanwhile:
//!   with `durability: sync` none of them was forwarded. Keep the margin
//!   above the clock steps you expect.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postgres::Client;

use super::sql::{self, ClusterError};
use crate::config::cluster::ClusterConfig;
use crate::store::pg::{NodeLease, PgSettings};

/// What the keeper thread and the request path share.
#[derive(Debug)]
struct Shared {
    lease: NodeLease,
    /// The keeper's time base: deadlines are nanoseconds after it.
    base: Instant,
    /// The node may reserve until `base + spend_until_ns`.
    spend_until_ns: AtomicU64,
    /// The lease is gone for good (expired on the database, or replaced).
    fenced: AtomicBool,
    stop: AtomicBool,
    renewals: AtomicU64,
    renewal_failures: AtomicU64,
    /// Grants returned by this node's expiry sweeps.
    swept_milli: AtomicU64,
}

impl Shared {
    fn may_spend(&self) -> bool {
        if self.fenced.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now().saturating_duration_since(self.base);
        (now.as_nanos() as u64) < self.spend_until_ns.load(Ordering::Acquire)
    }

    fn extend(&self, sent: Instant, lease: Duration, margin: Duration) {
        let until = (sent + lease)
            .checked_sub(margin)
            .unwrap_or(sent)
            .saturating_duration_since(self.base);
        let ns = u64::try_from(until.as_nanos()).unwrap_or(u64::MAX);
        self.spend_until_ns.fetch_max(ns, Ordering::AcqRel);
    }
}

/// Whether the node may spend now: a cheap clone of the keeper's deadline.
#[derive(Clone, Debug)]
pub struct SpendGate(Arc<Shared>);

impl SpendGate {
    /// See [`LeaseKeeper::may_spend`].
    pub fn may_spend(&self) -> bool {
        self.0.may_spend()
    }

    /// See [`LeaseKeeper::fenced`].
    pub fn fenced(&self) -> bool {
        self.0.fenced.load(Ordering::Acquire)
    }
}

/// A running lease keeper (see the module docs). Dropping it stops the
/// thread without releasing the lease (it then expires by itself); call
/// [`LeaseKeeper::release`] on a clean shutdown, after the writer flushed.
#[derive(Debug)]
pub struct LeaseKeeper {
    shared: Arc<Shared>,
    settings: PgSettings,
    thread: Option<JoinHandle<Option<Client>>>,
}

/// The keeper session's statement timeout: a renewal never outlasts the
/// interval (so the next tick retries on time).
fn statement_timeout(settings: &PgSettings, config: &ClusterConfig) -> Duration {
    settings
        .statement_timeout
        .min(config.lease_renew)
        .max(Duration::from_millis(100))
}

impl LeaseKeeper {
    /// Registers this incarnation of `config.node_id` (refused while a live
    /// one holds the lease) on the calling thread, then starts renewing.
    pub fn start(
        settings: &PgSettings,
        config: &ClusterConfig,
        now_unix_ms: i64,
    ) -> Result<LeaseKeeper, ClusterError> {
        let mut client = settings.connect("lease", Some(statement_timeout(settings, config)))?;
        let base = Instant::now();
        let sent = Instant::now();
        let lease = sql::register(
            &mut client,
            settings,
            &config.node_id,
            config.lease,
            now_unix_ms,
        )?;
        let shared = Arc::new(Shared {
            lease,
            base,
            spend_until_ns: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            renewals: AtomicU64::new(0),
            renewal_failures: AtomicU64::new(0),
            swept_milli: AtomicU64::new(0),
        });
        shared.extend(sent, config.lease, config.lease_margin);
        let thread = {
            let (shared, settings, config) = (shared.clone(), settings.clone(), config.clone());
            std::thread::Builder::new()
                .name("tollgate-lease".into())
                .spawn(move || keep(shared, settings, config, Some(client)))
                .map_err(|e| ClusterError::Store(e.into()))?
        };
        tracing::info!(
            node = %config.node_id,
            id = lease.node,
            token = lease.token,
            "cluster node registered"
        );
        Ok(LeaseKeeper {
            shared,
            settings: settings.clone(),
            thread: Some(thread),
        })
    }

    pub fn lease(&self) -> NodeLease {
        self.shared.lease
    }

    /// Whether the node may decide a reservation now: its lease is known to
    /// outlast this instant by the margin on the database's side.
    pub fn may_spend(&self) -> bool {
        self.shared.may_spend()
    }

    /// The lease is gone for good: this incarnation never spends again.
    pub fn fenced(&self) -> bool {
        self.shared.fenced.load(Ordering::Acquire)
    }

    /// [`Self::may_spend`] for the request path, which must not hold the
    /// keeper (shutdown takes it to release the lease).
    pub fn gate(&self) -> SpendGate {
        SpendGate(self.shared.clone())
    }

    pub fn renewals(&self) -> (u64, u64) {
        (
            self.shared.renewals.load(Ordering::Relaxed),
            self.shared.renewal_failures.load(Ordering::Relaxed),
        )
    }

    /// Grants of dead nodes this node's sweeps returned.
    pub fn swept_milli(&self) -> u64 {
        self.shared.swept_milli.load(Ordering::Relaxed)
    }

    /// A clean shutdown, after the writer flushed: stops renewing, gives
    /// every grant back and releases the lease (one statement). Returns
    /// how much came back.
    pub fn release(mut self) -> Result<i64, ClusterError> {
        self.shared.stop.store(true, Ordering::Release);
        let client = self.thread.take().and_then(|t| t.join().ok()).flatten();
        let mut client = match client {
            Some(c) if !c.is_closed() => c,
            _ => self
                .settings
                .connect("lease", Some(self.settings.statement_timeout))?,
        };
        self.shared.fenced.store(true, Ordering::Release);
        sql::release(&mut client, &self.settings, self.shared.lease)
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The keeper thread: renew, sweep, sleep; until stopped or fenced.
/// Returns its session, if it has one (for the release).
fn keep(
    shared: Arc<Shared>,
    settings: PgSettings,
    config: ClusterConfig,
    mut client: Option<Client>,
) -> Option<Client> {
    let timeout = statement_timeout(&settings, &config);
    let mut next = Instant::now() + config.lease_renew;
    loop {
        // Sleep in short steps so a stop is seen quickly.
        while Instant::now() < next {
            if shared.stop.load(Ordering::Acquire) {
                return client;
            }
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(20)));
        }
        // A renewal that took long does not make the next ones bunch up.
        next = (next + config.lease_renew).max(Instant::now());
        if shared.stop.load(Ordering::Acquire) {
            return client;
        }
        if client.as_ref().is_none_or(Client::is_closed) {
            client = settings.connect("lease", Some(timeout)).ok();
        }
        let Some(c) = client.as_mut() else {
            shared.renewal_failures.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let sent = Instant::now();
        match sql::renew(c, &settings, shared.lease, config.lease) {
            Ok(()) => {
                shared.extend(sent, config.lease, config.lease_margin);
                shared.renewals.fetch_add(1, Ordering::Relaxed);
            }
            Err(ClusterError::Fenced { node, token }) => {
                shared.fenced.store(true, Ordering::Release);
                tracing::error!(
                    node,
                    token,
                    "cluster lease expired or replaced: this node spends and commits nothing more"
                );
                return client;
            }
            Err(e) => {
                shared.renewal_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cluster lease renewal failed; retrying");
                if let ClusterError::Store(_) = e {
                    // Whether the session survived is not known from the
                    // text: a new one at the next tick is cheap.
                    client = None;
                }
                continue;
            }
        }
        match sql::expire(c, &settings, config.grant_ttl) {
            Ok(x) if x.returned_milli > 0 => {
                shared
                    .swept_milli
                    .fetch_add(x.returned_milli.max(0) as u64, Ordering::Relaxed);
                tracing::info!(
                    nodes = x.nodes,
                    grants = x.grants,
                    returned_milli = x.returned_milli,
                    "dead nodes' grants returned"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cluster grant expiry sweep failed"),
        }
    }
}
