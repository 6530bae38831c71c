//! A cluster node at run time: what the request path asks of the grant
//! protocol. Owns the node's lease keeper, its grants' bookkeeping (spend
//! rate, last use, whether the account is scarce), the grant thread that
//! tops grants up ahead of need, gives idle ones back and deletes expired
//! Boxis authcode claims, and a small pool of PostgreSQL sessions on
//! threads of their own for what a request must wait for: a take on a
//! miss, credit actions, cluster-wide balances, Boxis authcode claims.
//!
//! # How a reservation is decided here
//! The in-memory ledger holds, per account and bucket, what this node may
//! spend: `posted` is its grant plus its own open reservations, so the
//! ledger's `available` is the grant's free part and its `reserve` decides
//! exactly as on one node, with no round trip. [`ClusterNode::reserve`]:
//! 1. the lease must let the node spend ([`SpendGate::may_spend`]);
//! 2. the ledger reserves from the grant; on a shortfall the node takes
//!    the shortfall, or a grant sized by the spend rate, with one
//!    conditional statement ([`sql::take`]) and tries again (at most
//!    twice); an account whose ungranted credit is below
//!    `cluster.direct_below_milli` is *scarce*: only shortfalls are taken,
//!    one round trip per send (direct mode), and free credit goes back
//!    after a quarter of `cluster.grant_idle_ms`, so the last credits are
//!    usable from any node;
//! 3. after a reservation the grant thread is asked to top up when the
//!    free part falls below `cluster.top_up_below_percent` of the grant
//!    the spend rate wants: off the request path.
//!
//! A take is applied to the ledger by the session thread that ran it, the
//! moment the database answered, whether or not the request still waits:
//! a request that timed out strands nothing.
//!
//! # Giving back
//! A give-back takes the amount out of the ledger first (no reservation
//! can use it meanwhile), waits until the store writer has committed every
//! entry recorded before (so the database's grant already holds what
//! uncommitted voids freed: giving those back early could leave a later
//! reserve without its grant, the hole `model::Node::returnable_milli`
//! describes), then runs [`sql::give_back`]. A refused or unanswered
//! give-back is not put back: the node spends less, never more.
//!
//! # Failure modes
//! - PostgreSQL slow or down: takes and credit actions fail after
//!   `store.ack_timeout_ms` (`store_unavailable`); sends go on from the
//!   grants held until the lease's spend deadline passes.
//! - The lease is lost for good (cut off longer than `cluster.lease_ms`,
//!   or replaced): the node can never commit again. The grant thread logs
//!   `cluster lease lost` and exits the process with status 75, so that
//!   its supervisor starts a new incarnation, which rejoins by itself
//!   (what it had not committed is lost as in a crash; with
//!   `durability: sync` nothing uncommitted was forwarded).
//! - A crash: the grants come back after `cluster.grant_ttl_ms` (any
//!   node's keeper sweeps them), or at once when the node registers again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use parking_lot::Mutex;

use super::keeper::{LeaseKeeper, SpendGate};
use super::sizing::{Sizing, SpendRate};
use super::sql::{self, ClusterBalance, ClusterError, Session, Take};
use crate::clock::Clock;
use crate::config::cluster::ClusterConfig;
use crate::ledger::{Bucket, BucketPreference, Ledger, LedgerError, ReservationId};
use crate::metrics::Metrics;
use crate::store::pg::{NodeLease, PgSettings};
use crate::store::{StoreError, WriteBehind};

/// Sessions for what requests wait on (takes on a miss, credit actions,
/// balances). Takes of different accounts run side by side.
const POOL_SESSIONS: usize = 3;
/// How often the grant thread looks at idle grants and refreshes gauges.
const SCAN_EVERY: Duration = Duration::from_millis(200);
/// How often the grant thread deletes expired Boxis authcode claims.
const AUTHCODE_SWEEP_EVERY: Duration = Duration::from_secs(30);
/// How long past its expiry a Boxis claim is kept: a node whose clock runs
/// behind the sweeper's by up to this still finds the claim and refuses a
/// replay its own timestamp window lets through.
const AUTHCODE_KEPT_AFTER_S: i64 = 60;
/// Top-up requests waiting for the grant thread; more are dropped (the
/// next reservation asks again).
const TOP_UP_QUEUE: usize = 1024;
/// Stripes of [`GrantLocks`]: enough that takes of different accounts
/// rarely wait for each other on the node's few sessions.
const GRANT_LOCK_STRIPES: usize = 64;
/// The process exit status of a node whose lease is lost for good
/// (`EX_TEMPFAIL`: start it again).
pub const EXIT_LEASE_LOST: i32 = 75;

/// Why [`ClusterNode::reserve`] reserved nothing.
#[derive(Debug)]
pub enum Refused {
    /// The ledger said no (insufficient credit after asking the cluster,
    /// unknown account, a bad amount).
    Ledger(LedgerError),
    /// The lease does not let the node spend now, or PostgreSQL did not
    /// answer a take in time: `store_unavailable`.
    Unavailable,
}

/// What the node knows of one (account, bucket) it spends from.
#[derive(Debug, Default)]
struct GrantState {
    rate: SpendRate,
    last_use_ms: i64,
    /// The account's ungranted credit was below `direct_below_milli` at the
    /// last look: take shortfalls only, give free credit back soon.
    scarce: bool,
    /// A top-up is queued or running.
    topping: bool,
}

/// Serialises this node's statements on one grant row (a take, a top-up, a
/// give-back of the same account and bucket), across its sessions.
///
/// A take locks its grant row before the account row (see "Lock order" in
/// `sql`), but `FOR UPDATE` locks only a row its snapshot sees. Two takes
/// of one node on an account whose grant row a third creates meanwhile
/// (the first sends after a restart) could otherwise lock in opposite
/// orders: the one that missed the row locks the account, then waits in
/// its `ON CONFLICT` for the other, which holds the grant row and waits
/// for the account. PostgreSQL breaks that after `deadlock_timeout`, and
/// the group commit and the lease renewal queued behind it lose that
/// second (seen in `tests/cluster_nodes.rs` under load). Other nodes never
/// touch this node's grant rows while it lives, so a lock per node is
/// enough. Striped by a hash: bounded memory, whatever the accounts.
#[derive(Debug)]
struct GrantLocks([Mutex<()>; GRANT_LOCK_STRIPES]);

impl GrantLocks {
    fn new() -> GrantLocks {
        GrantLocks(std::array::from_fn(|_| Mutex::new(())))
    }

    /// Held for one statement on `account`'s `bucket` grant row.
    fn hold(&self, account: &str, bucket: Bucket) -> parking_lot::MutexGuard<'_, ()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one((account, bucket));
        self.0[(hash % GRANT_LOCK_STRIPES as u64) as usize].lock()
    }
}

/// One job of the session pool: runs with a live session; returns whether
/// the session is suspect (dropped and made again for the next job).
type Job = Box<dyn FnOnce(&mut Session) -> bool + Send>;

/// A running cluster node (see the module docs). Made by
/// [`ClusterNode::start`] before the ledger exists, attached to it and the
/// store writer by [`ClusterNode::attach`], ended by
/// [`ClusterNode::shutdown`] after the writer flushed.
pub struct ClusterNode {
    config: ClusterConfig,
    sizing: Sizing,
    settings: Arc<PgSettings>,
    lease: NodeLease,
    gate: SpendGate,
    keeper: Mutex<Option<LeaseKeeper>>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    /// How long a request waits for the database.
    wait: Duration,
    /// Per bucket ([`bucket_index`]), by account name.
    grants: [DashMap<String, GrantState>; 2],
    grant_locks: Arc<GrantLocks>,
    attached: OnceLock<(Arc<Ledger>, Arc<WriteBehind>)>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    top_ups: Mutex<Option<mpsc::SyncSender<(String, Bucket)>>>,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("node_id", &self.config.node_id)
            .field("lease", &self.lease)
            .finish()
    }
}

fn bucket_index(bucket: Bucket) -> usize {
    match bucket {
        Bucket::Anytime => 0,
        Bucket::OffPeak => 1,
    }
}

/// The buckets a send may draw from, in the order the ledger draws.
fn buckets(pref: BucketPreference) -> &'static [Bucket] {
    match pref {
        BucketPreference::AnytimeOnly => &[Bucket::Anytime],
        BucketPreference::OffPeakFirst => &[Bucket::OffPeak, Bucket::Anytime],
    }
}

fn unavailable(what: &str) -> ClusterError {
    ClusterError::Store(StoreError::Unavailable(format!(
        "cluster: {what}: PostgreSQL did not answer in time"
    )))
}

impl ClusterNode {
    /// Registers this node (waiting once, up to the lease, for a previous
    /// incarnation's lease to lapse: a node restarted right after a crash
    /// finds its old lease still valid) and starts its lease keeper and
    /// session pool. Runs on the main thread before any runtime.
    pub fn start(
        settings: &PgSettings,
        config: &ClusterConfig,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        wait: Duration,
    ) -> Result<Arc<ClusterNode>, ClusterError> {
        let keeper = match LeaseKeeper::start(settings, config, clock.now_unix_ms()) {
            Err(ClusterError::LeaseHeld { expires_in_ms, .. })
                if expires_in_ms <= config.lease.as_millis() as i64 =>
            {
                tracing::warn!(
                    node = %config.node_id,
                    expires_in_ms,
                    "a previous incarnation of this node still holds its lease; waiting for it to lapse"
                );
                std::thread::sleep(Duration::from_millis(expires_in_ms.max(0) as u64 + 100));
                LeaseKeeper::start(settings, config, clock.now_unix_ms())?
            }
            other => other?,
        };
        for result in ["granted", "insufficient", "error"] {
            metrics.cluster_grant_takes.with_label_values(&[result]);
        }
        for direction in ["taken", "returned"] {
            metrics.cluster_grant_milli.with_label_values(&[direction]);
        }
        for result in ["ok", "failed"] {
            metrics.cluster_lease_renewals.with_label_values(&[result]);
        }
        for bucket in Bucket::ALL {
            metrics
                .cluster_grant_held_milli
                .with_label_values(&[bucket.as_str()]);
        }
        let node = Arc::new(ClusterNode {
            config: config.clone(),
            sizing: Sizing::from(config),
            settings: Arc::new(settings.clone()),
            lease: keeper.lease(),
            gate: keeper.gate(),
            keeper: Mutex::new(Some(keeper)),
            metrics,
            clock,
            wait,
            grants: [DashMap::new(), DashMap::new()],
            grant_locks: Arc::new(GrantLocks::new()),
            attached: OnceLock::new(),
            jobs: Mutex::new(None),
            top_ups: Mutex::new(None),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        });
        node.start_pool()?;
        Ok(node)
    }

    pub fn lease(&self) -> NodeLease {
        self.lease
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    pub fn settings(&self) -> &PgSettings {
        &self.settings
    }

    /// Whether the lease lets this node reserve now.
    pub fn may_spend(&self) -> bool {
        self.gate.may_spend()
    }

    fn start_pool(self: &Arc<Self>) -> Result<(), ClusterError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = self.threads.lock();
        for i in 0..POOL_SESSIONS {
            let (rx, settings) = (rx.clone(), self.settings.clone());
            let handle = std::thread::Builder::new()
                .name(format!("tollgate-cluster-{i}"))
                .spawn(move || pool_thread(&rx, &settings))
                .map_err(|e| ClusterError::Store(e.into()))?;
            threads.push(handle);
        }
        *self.jobs.lock() = Some(tx);
        Ok(())
    }

    /// Runs `f` on a pool session and waits for it, at most the request
    /// wait; its round trip is timed under `statement`.
    async fn run<T: Send + 'static>(
        &self,
        statement: &'static str,
        f: impl FnOnce(&mut Session) -> Result<T, ClusterError> + Send + 'static,
    ) -> Result<T, ClusterError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let histogram = self
            .metrics
            .cluster_pg_seconds
            .with_label_values(&[statement]);
        let job: Job = Box::new(move |client| {
            let result = timed(&histogram, || f(client));
            let suspect = matches!(result, Err(ClusterError::Store(_)));
            let _ = tx.send(result);
            suspect
        });
        let sent = match &*self.jobs.lock() {
            Some(jobs) => jobs.send(job).is_ok(),
            None => false,
        };
        if !sent {
            return Err(unavailable(statement));
        }
        match tokio::time::timeout(self.wait, rx).await {
            Ok(Ok(result)) => result,
            // The session thread could not connect (the job was dropped),
            // or the wait ran out: the outcome is unknown.
            _ => Err(unavailable(statement)),
        }
    }

    /// Attaches the node to its ledger and store writer (restored and
    /// started) and starts the grant thread.
    pub fn attach(self: &Arc<Self>, ledger: Arc<Ledger>, writer: Arc<WriteBehind>) {
        if self.attached.set((ledger, writer)).is_err() {
            return;
        }
        let (tx, rx) = mpsc::sync_channel(TOP_UP_QUEUE);
        *self.top_ups.lock() = Some(tx);
        let node = self.clone();
        let handle = std::thread::Builder::new()
            .name("tollgate-grants".into())
            .spawn(move || node.grant_thread(&rx))
            .expect("spawning the cluster grant thread");
        self.threads.lock().push(handle);
    }

    // ----- the request path ---------------------------------------------

    /// Reserves a send's shares from this node's grants, taking more from
    /// the cluster on a shortfall (see the module docs).
    pub async fn reserve(
        &self,
        ledger: &Arc<Ledger>,
        account: &str,
        shares_milli: &[i64],
        pref: BucketPreference,
        reference: Option<&str>,
        tariff_version: Option<&str>,
    ) -> Result<ReservationId, Refused> {
        let cost: i64 = shares_milli.iter().fold(0i64, |s, x| s.saturating_add(*x));
        for attempt in 0..3 {
            if !self.gate.may_spend() {
                return Err(Refused::Unavailable);
            }
            match ledger.reserve(account, shares_milli, pref, reference, tariff_version) {
                Ok(id) => {
                    self.spent(ledger, account, pref, cost);
                    return Ok(id);
                }
                Err(e @ LedgerError::InsufficientCredit { .. }) => {
                    if attempt == 2 {
                        return Err(Refused::Ledger(e));
                    }
                    match self.acquire(ledger, account, pref, cost).await {
                        Ok(true) => continue,
                        Ok(false) => return Err(Refused::Ledger(e)),
                        Err(error) => {
                            tracing::warn!(account, error = %error, "cluster: taking a grant failed");
                            return Err(Refused::Unavailable);
                        }
                    }
                }
                Err(e) => return Err(Refused::Ledger(e)),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// What the ledger's grants lack for a send of `cost_milli`.
    fn shortfall(ledger: &Ledger, account: &str, pref: BucketPreference, cost_milli: i64) -> i64 {
        let free: i64 = buckets(pref)
            .iter()
            .map(|b| ledger.available_milli(account, *b).unwrap_or(0).max(0))
            .sum();
        cost_milli.saturating_sub(free)
    }

    /// Takes what a send lacks (or a grant of the size the spend rate
    /// wants) into this node's grants. `Ok(false)`: the cluster has not
    /// that much.
    async fn acquire(
        &self,
        ledger: &Arc<Ledger>,
        account: &str,
        pref: BucketPreference,
        cost_milli: i64,
    ) -> Result<bool, ClusterError> {
        let mut need = Self::shortfall(ledger, account, pref, cost_milli);
        let order = buckets(pref);
        for (i, &bucket) in order.iter().enumerate() {
            if need <= 0 {
                break;
            }
            // The last bucket must cover the rest; an earlier one (off-peak
            // first) may cover part of it.
            let partial_ok = i + 1 < order.len();
            let (scarce, want) = self.wanted(account, bucket);
            let mut amount = if scarce { need } else { need.max(want) };
            for _ in 0..2 {
                match self.take(ledger, account, bucket, amount).await? {
                    Take::Granted { .. } => {
                        if amount == need {
                            self.metrics.cluster_direct_takes.inc();
                        }
                        need -= amount;
                        break;
                    }
                    Take::Insufficient { available_milli } => {
                        // Take what is there, when it covers the need (or
                        // part of it, on an earlier bucket).
                        let next = available_milli.min(need);
                        if next <= 0 || (next < need && !partial_ok) || next == amount {
                            break;
                        }
                        amount = next;
                    }
                }
            }
        }
        Ok(need <= 0)
    }

    /// Whether the account is scarce here, and the grant its spend rate
    /// wants.
    fn wanted(&self, account: &str, bucket: Bucket) -> (bool, i64) {
        let now = self.clock.now_unix_ms();
        match self.grants[bucket_index(bucket)].get_mut(account) {
            Some(mut st) => {
                let rate = st.rate.rate_milli_per_s(now);
                (st.scarce, self.sizing.want_milli(rate))
            }
            None => (false, self.sizing.want_milli(0)),
        }
    }

    /// One take on a pool session; applied to the ledger on that session's
    /// thread as soon as the database answered.
    async fn take(
        &self,
        ledger: &Arc<Ledger>,
        account: &str,
        bucket: Bucket,
        amount_milli: i64,
    ) -> Result<Take, ClusterError> {
        let (settings, lease, ledger) = (self.settings.clone(), self.lease, ledger.clone());
        let (metrics, locks) = (self.metrics.clone(), self.grant_locks.clone());
        let name = account.to_string();
        let result = self
            .run("take", move |c| {
                let _row = locks.hold(&name, bucket);
                take_into(
                    c,
                    &settings,
                    lease,
                    &ledger,
                    &metrics,
                    &name,
                    bucket,
                    amount_milli,
                )
            })
            .await;
        if let Ok(take) = &result {
            self.grants[bucket_index(bucket)]
                .entry(account.to_string())
                .or_default()
                .scarce = self.scarce_after(take);
        }
        result
    }

    /// Whether an account is scarce after `take` answered: what is left
    /// ungranted is below `direct_below_milli` (or not even the amount
    /// asked for was there).
    fn scarce_after(&self, take: &Take) -> bool {
        match take {
            Take::Granted {
                available_milli, ..
            } => *available_milli < self.config.direct_below_milli,
            Take::Insufficient { .. } => true,
        }
    }

    /// After a reservation: counts the spend and asks for a top-up when
    /// the grant runs low.
    fn spent(&self, ledger: &Ledger, account: &str, pref: BucketPreference, cost_milli: i64) {
        let bucket = buckets(pref)[0];
        let now = self.clock.now_unix_ms();
        let map = &self.grants[bucket_index(bucket)];
        let mut st = match map.get_mut(account) {
            Some(st) => st,
            None => map.entry(account.to_string()).or_default(),
        };
        st.rate.record(now, cost_milli);
        st.last_use_ms = now;
        if st.scarce || st.topping {
            return;
        }
        let want = self.sizing.want_milli(st.rate.rate_milli_per_s(now));
        let free = ledger.available_milli(account, bucket).unwrap_or(0);
        if !self.sizing.needs_top_up(free, want) {
            return;
        }
        if let Some(tx) = &*self.top_ups.lock() {
            if tx.try_send((account.to_string(), bucket)).is_ok() {
                st.topping = true;
            }
        }
    }

    /// `account`'s balances across the cluster (`None`: no such row).
    pub async fn balance(
        &self,
        account: &str,
    ) -> Result<Option<[ClusterBalance; 2]>, ClusterError> {
        let settings = self.settings.clone();
        let name = account.to_string();
        self.run("balance", move |c| sql::balance(c, &settings, &name))
            .await
    }

    /// Claims a Boxis authcode's replay key for the whole cluster until
    /// `expires_at_s` ([`sql::claim_authcode`]): `Ok(true)` the first time
    /// any node sees it, `Ok(false)` for a replay. An error leaves the
    /// outcome unknown: the caller refuses the request.
    pub async fn claim_authcode(
        &self,
        key: [u8; 16],
        expires_at_s: i64,
        now_s: i64,
    ) -> Result<bool, ClusterError> {
        let settings = self.settings.clone();
        self.run("claim_authcode", move |c| {
            sql::claim_authcode(c, &settings, &key, expires_at_s, now_s)
        })
        .await
    }

    /// A credit action on `account`'s anytime bucket straight in the
    /// database; the account's balances after it, or `None` when refused
    /// for want of credit no node holds.
    pub async fn credit(
        &self,
        ledger: &Ledger,
        kind: sql::CreditKind,
        account: &str,
        role: crate::ledger::Role,
        amount_milli: i64,
        reference: Option<&str>,
    ) -> Result<Option<[ClusterBalance; 2]>, ClusterError> {
        let (settings, lease) = (self.settings.clone(), self.lease);
        let seq = ledger.take_external_seqs(1);
        let at = self.clock.now_unix_ms();
        let (name, reference) = (account.to_string(), reference.map(str::to_string));
        self.run("credit", move |c| {
            let done = sql::credit(
                c,
                &settings,
                lease,
                seq,
                kind,
                &name,
                role,
                Bucket::Anytime,
                amount_milli,
                reference.as_deref(),
                at,
            )?;
            match done {
                Some(_) => sql::balance(c, &settings, &name),
                None => Ok(None),
            }
        })
        .await
    }

    /// A parent ↔ sub-account transfer straight in the database; both
    /// accounts' balances after it.
    #[allow(clippy::type_complexity)]
    pub async fn transfer(
        &self,
        ledger: &Ledger,
        parent: &str,
        child: &str,
        amounts_milli: [i64; 2],
        reference: Option<&str>,
    ) -> Result<Result<[[ClusterBalance; 2]; 2], sql::TransferRefused>, ClusterError> {
        let (settings, lease) = (self.settings.clone(), self.lease);
        let seq = ledger.take_external_seqs(4);
        let at = self.clock.now_unix_ms();
        let (p, ch) = (parent.to_string(), child.to_string());
        let reference = reference.map(str::to_string);
        self.run("transfer", move |c| {
            if let Err(refused) = sql::transfer(
                c,
                &settings,
                lease,
                seq,
                &p,
                &ch,
                amounts_milli,
                reference.as_deref(),
                at,
            )? {
                return Ok(Err(refused));
            }
            let parent = sql::balance(c, &settings, &p)?.unwrap_or_default();
            let child = sql::balance(c, &settings, &ch)?.unwrap_or_default();
            Ok(Ok([parent, child]))
        })
        .await
    }

    /// Start-up: seeds `accounts.yaml`'s accounts the cluster lacks
    /// (blocking; before the server runs). Returns how many it created.
    pub fn seed_blocking(
        &self,
        ledger: &Ledger,
        seeds: &[sql::Seed<'_>],
    ) -> Result<usize, ClusterError> {
        let mut client = self
            .settings
            .connect("seed", Some(self.settings.statement_timeout))?;
        let mut created = 0;
        for seed in seeds {
            let seq = ledger.take_external_seqs(2);
            let at = self.clock.now_unix_ms();
            if sql::seed(&mut client, &self.settings, self.lease, seq, seed, at)? {
                created += 1;
            }
        }
        Ok(created)
    }

    // ----- the grant thread ---------------------------------------------

    fn grant_thread(&self, top_ups: &mpsc::Receiver<(String, Bucket)>) {
        let Some((ledger, writer)) = self.attached.get() else {
            return;
        };
        let mut client: Option<Session> = None;
        let mut last_scan = Instant::now();
        let mut last_authcode_sweep = Instant::now();
        let mut renewals_seen = (0u64, 0u64);
        while !self.stop.load(Ordering::Acquire) {
            match top_ups.recv_timeout(SCAN_EVERY) {
                Ok((account, bucket)) => {
                    self.top_up(&mut client, ledger, &account, bucket);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if last_scan.elapsed() < SCAN_EVERY {
                continue;
            }
            last_scan = Instant::now();
            if self.gate.fenced() || writer.is_fenced() {
                self.lease_lost();
            }
            self.metrics
                .cluster_may_spend
                .set(i64::from(self.may_spend()));
            if let Some(keeper) = &*self.keeper.lock() {
                let (ok, failed) = keeper.renewals();
                let m = &self.metrics.cluster_lease_renewals;
                m.with_label_values(&["ok"])
                    .inc_by(ok.saturating_sub(renewals_seen.0));
                m.with_label_values(&["failed"])
                    .inc_by(failed.saturating_sub(renewals_seen.1));
                renewals_seen = (ok, failed);
                let swept = keeper.swept_milli();
                let counted = self.metrics.cluster_swept_milli.get();
                self.metrics
                    .cluster_swept_milli
                    .inc_by(swept.saturating_sub(counted));
            }
            self.scan(&mut client, ledger, writer);
            if last_authcode_sweep.elapsed() >= AUTHCODE_SWEEP_EVERY {
                last_authcode_sweep = Instant::now();
                self.sweep_authcodes(&mut client);
            }
        }
    }

    /// [`timed`] under `statement`, for the grant thread's own round trips.
    fn timed<T>(&self, statement: &str, f: impl FnOnce() -> T) -> T {
        timed(
            &self
                .metrics
                .cluster_pg_seconds
                .with_label_values(&[statement]),
            f,
        )
    }

    /// Deletes the Boxis claims that expired a while ago (every node does,
    /// every [`AUTHCODE_SWEEP_EVERY`]; the table holds only authcodes
    /// still inside some node's timestamp window).
    fn sweep_authcodes(&self, client: &mut Option<Session>) {
        let Some(c) = self.session(client) else {
            return;
        };
        let before_s = self
            .clock
            .now_unix_ms()
            .div_euclid(1000)
            .saturating_sub(AUTHCODE_KEPT_AFTER_S);
        let result = self.timed("expire_authcodes", || {
            sql::expire_authcodes(c, &self.settings, before_s)
        });
        if let Err(e) = result {
            tracing::warn!(error = %e, "cluster: deleting expired Boxis authcodes failed");
            *client = None;
        }
    }

    /// Exits the process: this incarnation can never commit again (see the
    /// module docs).
    fn lease_lost(&self) -> ! {
        tracing::error!(
            node = %self.config.node_id,
            id = self.lease.node,
            token = self.lease.token,
            "cluster lease lost: this node can never commit again; exiting so that its supervisor \
             starts a new incarnation"
        );
        eprintln!(
            "tollgate: cluster lease lost (node {}); exiting with status {EXIT_LEASE_LOST}",
            self.config.node_id
        );
        std::process::exit(EXIT_LEASE_LOST)
    }

    /// The grant thread's session, made again when it ended.
    fn session<'c>(&self, client: &'c mut Option<Session>) -> Option<&'c mut Session> {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            *client = self
                .settings
                .connect("grants", Some(self.settings.statement_timeout))
                .ok()
                .map(Session::new);
        }
        client.as_mut()
    }

    fn top_up(
        &self,
        client: &mut Option<Session>,
        ledger: &Arc<Ledger>,
        account: &str,
        bucket: Bucket,
    ) {
        let map = &self.grants[bucket_index(bucket)];
        let now = self.clock.now_unix_ms();
        let (scarce, want) = match map.get_mut(account) {
            Some(mut st) => {
                st.topping = false;
                (
                    st.scarce,
                    self.sizing.want_milli(st.rate.rate_milli_per_s(now)),
                )
            }
            None => return,
        };
        let free = ledger.available_milli(account, bucket).unwrap_or(0);
        if scarce || !self.sizing.needs_top_up(free, want) || !self.gate.may_spend() {
            return;
        }
        let amount = self.sizing.top_up_milli(free, want, i64::MAX);
        if amount <= 0 {
            return;
        }
        let Some(c) = self.session(client) else {
            self.metrics
                .cluster_grant_takes
                .with_label_values(&["error"])
                .inc();
            return;
        };
        let result = self.timed("take", || {
            let _row = self.grant_locks.hold(account, bucket);
            take_into(
                c,
                &self.settings,
                self.lease,
                ledger,
                &self.metrics,
                account,
                bucket,
                amount,
            )
        });
        let scarce = match result {
            Ok(take) => self.scarce_after(&take),
            Err(e) => {
                tracing::warn!(account, error = %e, "cluster: a grant top-up failed");
                *client = None;
                return;
            }
        };
        if let Some(mut st) = map.get_mut(account) {
            st.scarce = scarce;
        }
    }

    /// Gives idle and oversized grants back; refreshes the held gauges.
    fn scan(&self, client: &mut Option<Session>, ledger: &Arc<Ledger>, writer: &Arc<WriteBehind>) {
        let now = self.clock.now_unix_ms();
        let idle_ms = self.config.grant_idle.as_millis() as i64;
        for bucket in Bucket::ALL {
            let map = &self.grants[bucket_index(bucket)];
            // Copied out: no map guard is held across a statement.
            let looked: Vec<(String, i64, bool, i64)> = map
                .iter_mut()
                .map(|mut st| {
                    let want = self.sizing.want_milli(st.rate.rate_milli_per_s(now));
                    (st.key().clone(), now - st.last_use_ms, st.scarce, want)
                })
                .collect();
            let mut held = 0i64;
            for (account, idle_for, scarce, want) in looked {
                let free = ledger.available_milli(&account, bucket).unwrap_or(0).max(0);
                let idle_after = if scarce { idle_ms / 4 } else { idle_ms };
                let give = if idle_for >= idle_after {
                    free
                } else if free > want.saturating_mul(2) {
                    free - want
                } else {
                    0
                };
                let given = if give > 0 {
                    self.give_back(client, ledger, writer, &account, bucket, give)
                } else {
                    0
                };
                held += free - given;
                if free - given == 0 && idle_for > idle_ms.saturating_mul(10) {
                    map.remove(&account);
                }
            }
            self.metrics
                .cluster_grant_held_milli
                .with_label_values(&[bucket.as_str()])
                .set(held);
        }
    }

    /// Gives up to `amount_milli` of the free grant back (see the module
    /// docs for why it waits for the writer first). Returns how much left
    /// this node (given back, or lost with an unanswered statement).
    fn give_back(
        &self,
        client: &mut Option<Session>,
        ledger: &Ledger,
        writer: &WriteBehind,
        account: &str,
        bucket: Bucket,
        amount_milli: i64,
    ) -> i64 {
        let Ok(n) = ledger.grant_out(account, bucket, amount_milli) else {
            return 0;
        };
        if n == 0 {
            return 0;
        }
        let target = writer.enqueued_position();
        if !writer.wait_committed_blocking(target, self.wait) {
            // The store is behind: keep the grant, try again later.
            let _ = ledger.grant_in(account, bucket, n);
            return 0;
        }
        let Some(c) = self.session(client) else {
            let _ = ledger.grant_in(account, bucket, n);
            return 0;
        };
        let result = self.timed("give_back", || {
            let _row = self.grant_locks.hold(account, bucket);
            sql::give_back(c, &self.settings, self.lease, account, bucket, n)
        });
        match result {
            Ok(true) => {
                self.metrics
                    .cluster_grant_milli
                    .with_label_values(&["returned"])
                    .inc_by(n as u64);
            }
            Ok(false) => {
                // The database's grant is smaller than this node counted:
                // a bug; spend less, never more.
                tracing::error!(
                    account,
                    bucket = bucket.as_str(),
                    amount_milli = n,
                    "cluster: the database refused a give-back; the node no longer counts it"
                );
            }
            Err(e) => {
                // Unknown outcome: counted as given (stranded at worst,
                // until the lease is released or expires).
                tracing::warn!(account, error = %e, "cluster: a give-back got no answer");
                *client = None;
            }
        }
        n
    }

    // ----- shutdown -------------------------------------------------------

    /// A clean stop, after the store writer flushed: stops the threads,
    /// gives every grant back and releases the lease.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        self.jobs.lock().take();
        self.top_ups.lock().take();
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        if let Some(keeper) = self.keeper.lock().take() {
            match keeper.release() {
                Ok(returned_milli) => tracing::info!(
                    node = %self.config.node_id,
                    returned_milli,
                    "cluster lease released; grants returned"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cluster lease release failed; the grants come back at their TTL"
                ),
            }
        }
    }
}

/// Runs one round trip of the grant protocol, observed in `histogram`
/// (`tollgate_cluster_pg_seconds{statement}`).
fn timed<T>(histogram: &prometheus::Histogram, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let result = f();
    histogram.observe(started.elapsed().as_secs_f64());
    result
}

/// A take, applied to the ledger at once (see the module docs).
#[allow(clippy::too_many_arguments)]
fn take_into(
    client: &mut Session,
    settings: &PgSettings,
    lease: NodeLease,
    ledger: &Ledger,
    metrics: &Metrics,
    account: &str,
    bucket: Bucket,
    amount_milli: i64,
) -> Result<Take, ClusterError> {
    let result = sql::take(client, settings, lease, account, bucket, amount_milli);
    let label = match &result {
        Ok(Take::Granted { .. }) => "granted",
        Ok(Take::Insufficient { .. }) => "insufficient",
        Err(_) => "error",
    };
    metrics
        .cluster_grant_takes
        .with_label_values(&[label])
        .inc();
    if let Ok(Take::Granted { .. }) = result {
        metrics
            .cluster_grant_milli
            .with_label_values(&["taken"])
            .inc_by(amount_milli.max(0) as u64);
        if let Err(e) = ledger.grant_in(account, bucket, amount_milli) {
            // Taken but not countable here: stranded, never spent twice.
            tracing::error!(account, error = %e, "cluster: a granted amount could not be counted");
        }
    }
    result
}

/// A pool session thread: runs jobs until the pool is dropped.
fn pool_thread(jobs: &Mutex<mpsc::Receiver<Job>>, settings: &PgSettings) {
    let mut client: Option<Session> = None;
    loop {
        let job = {
            let rx = jobs.lock();
            rx.recv()
        };
        let Ok(job) = job else {
            return;
        };
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = settings
                .connect("cluster", Some(settings.statement_timeout))
                .ok()
                .map(Session::new);
        }
        // No session: the job is dropped and its requester told so.
        let Some(c) = client.as_mut() else {
            continue;
        };
        if job(c) {
            client = None;
        }
    }
}
