//! The write-behind writer: the ledger's [`EntrySink`], an unbounded
//! in-memory queue with a soft limit, and the one thread that commits it.
//!
//! # How it works
//! - [`EntrySink::record`] (called by the ledger with account locks held)
//!   appends the operation's entries to the queue under a short mutex and
//!   gives each an **enqueue position** (1, 2, 3, … in queue order). It never
//!   blocks on I/O and never drops: the queue limit is enforced *before* a
//!   change, by [`WriteBehind::admit`].
//! - One dedicated `std::thread` (the stores are blocking) takes a batch from the
//!   head of the queue, commits it in one transaction and advances the
//!   `committed` watermark to the position of the batch's last entry. The
//!   queue is FIFO and batches are committed in order, so "position ≤
//!   committed" means "durable". Positions, not seqs, are tracked because
//!   entries of different accounts reach the queue slightly out of seq order.
//! - A batch closes when it holds `batch_max_entries`, when its oldest entry
//!   is `batch_age_max` old, or as soon as someone waits for durability (a
//!   waiter, a flush) — so in `durability: sync` a lone request pays one
//!   commit, not the batch age, and under load every request that arrives
//!   while a commit runs joins the next one (**group commit**: one fsync for
//!   all of them). An operation's entries are never split across batches.
//! - [`WriteBehind::wait_durable`] reads the current enqueue position P
//!   (everything the caller recorded is at or before it) and waits on a
//!   `tokio::sync::watch` until `committed ≥ P`; all waiters of one batch
//!   wake on its one commit. Past `ack_timeout` it fails with
//!   [`StoreUnavailable`].
//!
//! # Failure modes
//! - The store fails: the batch is kept and retried with exponential backoff
//!   (10 ms … 1 s), each failure counted in
//!   `tollgate_store_commit_errors_total` and logged. Meanwhile the queue
//!   grows; `admit` makes new changes wait and then fail with
//!   `store_unavailable`, and changes already made (settlements, sweeps,
//!   operator actions — they never wait) keep queueing, so the limit is soft
//!   by at most one operation per admitted caller plus those. Nothing is
//!   dropped, and it all drains by itself once the store recovers.
//! - Crash: the queue is lost; what was acknowledged is not (it waited).
//! - Shutdown: [`WriteBehind::flush_and_stop`] commits everything queued,
//!   joins the thread, and only then releases the store's ownership (see
//!   [`super::fence`]). Entries recorded after that are lost and counted in
//!   `tollgate_store_entries_after_stop_total`; the server only stops the
//!   writer after pingora's runtimes (and so every request) have ended.
//! - Fenced (another process took the store over while this one was paused
//!   or could not renew its lease): a commit fails with
//!   [`StoreError::Fenced`](super::StoreError::Fenced), or the lease keeper
//!   finds the token changed. The writer never retries that: it stops,
//!   drops what is queued (counted in
//!   `tollgate_store_entries_after_stop_total`; the store's new owner has
//!   the reservations those entries would have settled in doubt), and
//!   fails every waiter and every later [`WriteBehind::admit`] with
//!   [`StoreUnavailable`]. A fenced process commits nothing, ever again.
//!   A cluster node's commit that finds its lease gone
//!   ([`StoreError::LeaseLost`](super::StoreError::LeaseLost)) is the same
//!   (its store has no owner watch: the refused commit itself fences it).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use thiserror::Error;
use tokio::sync::watch;

use super::fence::{FenceKeeper, LeaseWatch, NotOwner};
use super::{AccountDirectory, AccountMeta, Store, StoreError};
use crate::config::StoreConfig;
use crate::ledger::{Entry, EntrySink};
use crate::metrics::Metrics;

/// The writer's tuning (`store:` in the configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterConfig {
    pub batch_max_entries: usize,
    pub batch_age_max: Duration,
    /// See [`StoreConfig::commit_delay`].
    pub commit_delay: Duration,
    /// Un-persisted entries above which `admit` makes callers wait.
    pub queue_max_entries: usize,
    /// How long `admit` and `wait_durable` wait before `store_unavailable`.
    pub ack_timeout: Duration,
}

impl From<&StoreConfig> for WriterConfig {
    fn from(c: &StoreConfig) -> Self {
        WriterConfig {
            batch_max_entries: c.batch_max_entries.max(1),
            batch_age_max: c.batch_age_max,
            commit_delay: c.commit_delay,
            queue_max_entries: c.queue_max_entries,
            ack_timeout: c.ack_timeout,
        }
    }
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            batch_max_entries: 4096,
            batch_age_max: Duration::from_millis(2),
            commit_delay: Duration::from_micros(200),
            queue_max_entries: 65_536,
            ack_timeout: Duration::from_secs(5),
        }
    }
}

/// The store did not commit in time (`store_unavailable` to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("the ledger store did not commit in time")]
pub struct StoreUnavailable;

/// Why `flush_and_stop` could not persist everything.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FlushError {
    /// The store kept failing until the deadline.
    #[error("the ledger store kept failing; {unpersisted} entries were not persisted")]
    StoreFailing { unpersisted: u64 },
    /// Another process took the store over; the writer stopped committing.
    #[error(
        "this process lost ownership of the store (fenced); {unpersisted} entries were not persisted"
    )]
    Fenced { unpersisted: u64 },
}

/// Backoff between attempts to commit a failing batch.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(10);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The entries of one `record` call: committed together, never split.
struct Pending {
    enqueued_at: Instant,
    entries: Vec<Entry>,
}

struct Queue {
    calls: VecDeque<Pending>,
    /// Entries in `calls`.
    len: usize,
    /// Enqueue time of the oldest entry of the batch being committed, for
    /// the oldest-un-persisted-entry gauge.
    in_flight_since: Option<Instant>,
    /// Set by `flush_and_stop`: drain everything, then exit; give up on a
    /// failing store at this deadline.
    stop_deadline: Option<Instant>,
    /// The writer thread has exited (later entries cannot be persisted).
    stopped: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer thread: new work, a waiter, a stop.
    wake: Condvar,
    /// Position of the newest enqueued entry. Advanced under the queue lock,
    /// so positions follow queue order.
    enqueued: AtomicU64,
    /// Position of the newest committed entry (fast path of the waits).
    committed: AtomicU64,
    /// The same watermark, for async waiters.
    committed_tx: watch::Sender<u64>,
    /// Tasks inside `wait_durable`: while any, a batch closes at once.
    waiters: AtomicUsize,
    config: WriterConfig,
    metrics: Arc<Metrics>,
    /// Whether this process still owns the store; `None` for a store
    /// without ownership (tests, benchmarks).
    owner: Option<Arc<LeaseWatch>>,
    /// A commit was refused as fenced: what the owner watch says for an
    /// owned store, and the only sign for a store whose commits check a
    /// lease of their own (a cluster node's, `crate::cluster`).
    commit_fenced: AtomicBool,
}

impl Shared {
    fn is_fenced(&self) -> bool {
        self.commit_fenced.load(Ordering::Acquire)
            || self.owner.as_ref().is_some_and(|w| w.is_fenced())
    }

    fn depth(&self, committed: u64) -> u64 {
        self.enqueued
            .load(Ordering::Acquire)
            .saturating_sub(committed)
    }

    fn refresh_gauges(&self) {
        let depth = self.depth(self.committed.load(Ordering::Acquire));
        let oldest = {
            let q = self.queue.lock();
            // Critical section: two reads.
            q.in_flight_since
                .or_else(|| q.calls.front().map(|p| p.enqueued_at))
        };
        let m = &self.metrics;
        m.store_queue_depth.set(depth as i64);
        m.store_oldest_unpersisted_age
            .set(oldest.map_or(0.0, |t| t.elapsed().as_secs_f64()));
    }

    /// Wakes the writer so it re-checks its batch-closing conditions. Takes
    /// the queue lock so the wake-up cannot fall between the writer's check
    /// and its wait.
    fn nudge(&self) {
        drop(self.queue.lock());
        self.wake.notify_one();
    }
}

/// Counts a task as waiting for durability for as long as it lives.
struct WaiterGuard<'a>(&'a Shared);

impl<'a> WaiterGuard<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.waiters.fetch_add(1, Ordering::AcqRel);
        shared.nudge();
        WaiterGuard(shared)
    }
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The write-behind writer. Hand it to the ledger as its sink, then
/// [`start`](WriteBehind::start) it.
pub struct WriteBehind {
    shared: Arc<Shared>,
    /// The store until `start` moves it into the thread.
    store: Mutex<Option<Box<dyn Store>>>,
    thread: Mutex<Option<JoinHandle<Result<(), FlushError>>>>,
    /// The store's ownership, released after the last commit.
    fence: Mutex<Option<FenceKeeper>>,
}

impl std::fmt::Debug for WriteBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBehind")
            .field("enqueued", &self.enqueued_position())
            .field("committed", &self.committed_position())
            .finish()
    }
}

impl WriteBehind {
    /// A writer over `store`. Entries recorded before [`start`] queue up.
    ///
    /// [`start`]: WriteBehind::start
    pub fn new(store: Box<dyn Store>, config: WriterConfig, metrics: Arc<Metrics>) -> WriteBehind {
        Self::build(store, None, config, metrics)
    }

    /// A writer over a store this process owns under `fence` (whose token
    /// the store's commits check): the writer stops for good when the
    /// process is found fenced, and releases the ownership once it has
    /// committed its last entry.
    pub fn owned(
        store: Box<dyn Store>,
        fence: FenceKeeper,
        config: WriterConfig,
        metrics: Arc<Metrics>,
    ) -> WriteBehind {
        Self::build(store, Some(fence), config, metrics)
    }

    fn build(
        store: Box<dyn Store>,
        fence: Option<FenceKeeper>,
        config: WriterConfig,
        metrics: Arc<Metrics>,
    ) -> WriteBehind {
        let (committed_tx, _) = watch::channel(0);
        let owner = fence.as_ref().map(|f| f.watch().clone());
        let writer = WriteBehind {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    calls: VecDeque::new(),
                    len: 0,
                    in_flight_since: None,
                    stop_deadline: None,
                    stopped: false,
                }),
                wake: Condvar::new(),
                enqueued: AtomicU64::new(0),
                committed: AtomicU64::new(0),
                committed_tx,
                waiters: AtomicUsize::new(0),
                config,
                metrics,
                owner,
                commit_fenced: AtomicBool::new(false),
            }),
            store: Mutex::new(Some(store)),
            thread: Mutex::new(None),
            fence: Mutex::new(fence),
        };
        if let Some(owner) = &writer.shared.owner {
            // Found fenced (by the lease keeper or a commit): wake the
            // thread so it stops, and every waiter so it fails now.
            let shared = Arc::downgrade(&writer.shared);
            owner.on_fenced(Box::new(move || {
                if let Some(shared) = shared.upgrade() {
                    shared.wake.notify_all();
                    shared.committed_tx.send_modify(|_| {});
                }
            }));
        }
        writer
    }

    /// Whether this process may act as the store's owner (always, for a
    /// store without ownership): not fenced, lease renewed lately.
    pub fn ensure_owner(&self) -> Result<(), NotOwner> {
        match &self.shared.owner {
            Some(watch) => watch.check(),
            None => Ok(()),
        }
    }

    /// The hand-over (`handover.rs`): this process decides no credit from
    /// now on ([`LeaseWatch::retire`]); call [`Self::flush_and_stop`] next.
    pub fn retire(&self) {
        if let Some(watch) = &self.shared.owner {
            watch.retire();
        }
    }

    /// Starts the writer thread. `directory` names the accounts a batch
    /// touches (the ledger, held weakly: the ledger owns this writer).
    /// Calling it twice does nothing.
    pub fn start(&self, directory: Weak<dyn AccountDirectory>) {
        let Some(store) = self.store.lock().take() else {
            return;
        };
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("tollgate-store".into())
            .spawn(move || writer_loop(&shared, store, &directory))
            .expect("spawning the store writer thread");
        *self.thread.lock() = Some(handle);
    }

    /// Position of the newest entry handed to the writer.
    pub fn enqueued_position(&self) -> u64 {
        self.shared.enqueued.load(Ordering::Acquire)
    }

    /// Position of the newest entry known to be durable.
    pub fn committed_position(&self) -> u64 {
        self.shared.committed.load(Ordering::Acquire)
    }

    /// Whether this writer can never commit again (another process owns
    /// the store, or a cluster node's lease is gone).
    pub fn is_fenced(&self) -> bool {
        self.shared.is_fenced()
    }

    /// Blocks (a background thread, never a tokio worker) until the
    /// committed position reaches `target` ([`Self::enqueued_position`]
    /// read earlier), at most `timeout`; whether it did.
    pub fn wait_committed_blocking(&self, target: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.committed_position() >= target {
                return true;
            }
            if self.shared.is_fenced() || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Entries recorded and not yet committed.
    pub fn depth(&self) -> u64 {
        self.shared.depth(self.committed_position())
    }

    /// Back-pressure: call before a ledger change. Waits while more than
    /// `queue_max_entries` entries are un-persisted; fails after
    /// `ack_timeout`.
    pub async fn admit(&self) -> Result<(), StoreUnavailable> {
        let shared = &self.shared;
        if shared.is_fenced() {
            return Err(StoreUnavailable);
        }
        let max = shared.config.queue_max_entries as u64;
        if shared.depth(self.committed_position()) <= max {
            return Ok(());
        }
        let mut rx = shared.committed_tx.subscribe();
        let wait = rx.wait_for(|committed| shared.depth(*committed) <= max || shared.is_fenced());
        // (The watch guard must not outlive `rx`: reduce it to a bool.)
        let done = matches!(
            tokio::time::timeout(shared.config.ack_timeout, wait).await,
            Ok(Ok(_))
        );
        if shared.is_fenced() {
            return Err(StoreUnavailable);
        }
        if done {
            return Ok(());
        }
        shared
            .metrics
            .store_ack_timeouts
            .with_label_values(&["admit"])
            .inc();
        Err(StoreUnavailable)
    }

    /// Waits until everything recorded before this call is committed (group
    /// commit: every waiter of a batch wakes on its one commit). Fails after
    /// `ack_timeout`; the entries stay queued and are committed when the
    /// store recovers. Fails at once when this process is fenced (what it
    /// recorded will never be committed).
    pub async fn wait_durable(&self) -> Result<(), StoreUnavailable> {
        let shared = &self.shared;
        let target = shared.enqueued.load(Ordering::Acquire);
        if shared.committed.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let mut rx = shared.committed_tx.subscribe();
        let _waiting = WaiterGuard::new(shared);
        let wait = rx.wait_for(|committed| *committed >= target || shared.is_fenced());
        // (The watch guard must not outlive `rx`: reduce it to a bool.)
        let done = matches!(
            tokio::time::timeout(shared.config.ack_timeout, wait).await,
            Ok(Ok(_))
        );
        if shared.committed.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        if shared.is_fenced() {
            return Err(StoreUnavailable);
        }
        if done {
            return Ok(());
        }
        shared
            .metrics
            .store_ack_timeouts
            .with_label_values(&["durable"])
            .inc();
        Err(StoreUnavailable)
    }

    /// Refreshes the queue-depth and oldest-entry-age gauges (the writer
    /// does it after every commit; the server also once a second).
    pub fn refresh_gauges(&self) {
        self.shared.refresh_gauges();
    }

    /// Commits everything queued, then stops the thread and releases the
    /// store's ownership. A failing store is retried until `timeout`; past
    /// it, what is left is reported lost. Idempotent; a writer that was
    /// never started is started without a directory first, so its queue is
    /// not lost.
    pub fn flush_and_stop(&self, timeout: Duration) -> Result<(), FlushError> {
        if self.store.lock().is_some() {
            let none: Weak<dyn AccountDirectory> = Weak::<NoDirectory>::new();
            self.start(none);
        }
        {
            let mut q = self.shared.queue.lock();
            // Critical section: set the flag.
            if q.stop_deadline.is_none() {
                q.stop_deadline = Some(Instant::now() + timeout);
            }
        }
        self.shared.wake.notify_all();
        let handle = self.thread.lock().take();
        let result = match handle {
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(FlushError::StoreFailing {
                    unpersisted: self.depth(),
                })
            }),
            None => Ok(()),
        };
        // After the last commit: the next owner may start at once.
        if let Some(fence) = self.fence.lock().take() {
            if let Err(e) = fence.release() {
                tracing::error!(error = %e, "releasing the store's ownership");
            }
        }
        result
    }
}

impl Drop for WriteBehind {
    /// Best effort: a writer dropped without `flush_and_stop` still commits
    /// its queue (bounded by `ack_timeout` if the store fails).
    fn drop(&mut self) {
        let timeout = self.shared.config.ack_timeout;
        if let Err(e) = self.flush_and_stop(timeout) {
            tracing::error!(error = %e, "store writer dropped with entries not persisted");
        }
    }
}

/// A directory that knows no account (a writer flushed before `start`).
struct NoDirectory;

impl AccountDirectory for NoDirectory {
    fn account_meta(&self, _name: &str) -> Option<AccountMeta> {
        None
    }
}

impl EntrySink for WriteBehind {
    fn record(&self, entries: &[Entry]) {
        if entries.is_empty() {
            return;
        }
        let n = entries.len();
        let pending = Pending {
            enqueued_at: Instant::now(),
            entries: entries.to_vec(),
        };
        let shared = &self.shared;
        let max = shared.config.batch_max_entries;
        let mut q = shared.queue.lock();
        // Critical section: one push and one counter; no I/O, no allocation.
        // A fenced process queues nothing more, even before the writer
        // thread has stopped: it could never be committed.
        if q.stopped || shared.is_fenced() {
            drop(q);
            shared.metrics.store_entries_after_stop.inc_by(n as u64);
            if shared.owner.as_ref().is_some_and(|w| w.is_retired()) {
                // Settlements of sends still in flight when the hand-over
                // grace ended: the successor has their reservations in doubt.
                tracing::warn!(
                    entries = n,
                    "ledger entries recorded after the store was handed over; the successor has their reservations in doubt"
                );
            } else if shared.is_fenced() {
                // Logged once at the fencing; settlements of sends that were
                // in flight end up here.
                tracing::debug!(
                    entries = n,
                    "ledger entries of a fenced process are not persisted"
                );
            } else {
                tracing::error!(
                    entries = n,
                    "ledger entries recorded after the store writer stopped; they are not persisted"
                );
            }
            return;
        }
        let was_empty = q.calls.is_empty();
        q.calls.push_back(pending);
        q.len += n;
        let became_full = q.len >= max && q.len - n < max;
        shared.enqueued.fetch_add(n as u64, Ordering::AcqRel);
        drop(q);
        if was_empty || became_full {
            shared.wake.notify_one();
        }
    }
}

/// The writer thread: take a batch, commit it (retrying), advance the
/// watermark; exit once stopped and drained.
/// Requests waiting on one batch from which the next batch may be delayed
/// by `commit_delay` to gather more (see `writer_loop`).
const COMMIT_DELAY_MIN_WAITERS: usize = 4;

fn writer_loop(
    shared: &Shared,
    mut store: Box<dyn Store>,
    directory: &Weak<dyn AccountDirectory>,
) -> Result<(), FlushError> {
    let config = &shared.config;
    let mut committed = shared.committed.load(Ordering::Acquire);
    // Group commit under load: how many requests waited on the last batch,
    // and when it was committed.
    let mut last_waiters = 0usize;
    let mut last_commit_end = Instant::now();
    loop {
        let (entries, stop_deadline) = {
            let mut q = shared.queue.lock();
            loop {
                if shared.is_fenced() {
                    drop(q);
                    return Err(stop_fenced(shared, 0));
                }
                // Critical section (between waits): decide whether the batch
                // at the head of the queue closes now.
                match q.calls.front() {
                    None if q.stop_deadline.is_some() => {
                        q.stopped = true;
                        return Ok(());
                    }
                    None => shared.wake.wait(&mut q),
                    Some(front) => {
                        let deadline = front.enqueued_at + config.batch_age_max;
                        // A waiting request closes the batch at once, unless
                        // the last batch was shared by several: then the load
                        // is high, and waiting `commit_delay` after the last
                        // commit lets the next carry more for one commit's
                        // cost (PostgreSQL's commit_delay/commit_siblings).
                        let close_at = if shared.waiters.load(Ordering::Acquire) == 0 {
                            deadline
                        } else if last_waiters >= COMMIT_DELAY_MIN_WAITERS {
                            (last_commit_end + config.commit_delay).min(deadline)
                        } else {
                            last_commit_end
                        };
                        if q.len >= config.batch_max_entries
                            || q.stop_deadline.is_some()
                            || Instant::now() >= close_at
                        {
                            break;
                        }
                        shared.wake.wait_until(&mut q, close_at);
                    }
                }
            }
            last_waiters = shared.waiters.load(Ordering::Acquire);
            let mut entries: Vec<Entry> = Vec::with_capacity(q.len.min(config.batch_max_entries));
            let oldest = q.calls.front().map(|p| p.enqueued_at);
            while let Some(front) = q.calls.front() {
                if !entries.is_empty()
                    && entries.len() + front.entries.len() > config.batch_max_entries
                {
                    break;
                }
                let p = q.calls.pop_front().expect("front exists");
                entries.extend(p.entries);
            }
            q.len -= entries.len();
            q.in_flight_since = oldest;
            (entries, q.stop_deadline)
        };

        let accounts = touched_accounts(&entries, directory);
        let mut failures: u32 = 0;
        loop {
            let started = Instant::now();
            match store.commit(&entries, &accounts) {
                Ok(()) => {
                    last_commit_end = Instant::now();
                    shared
                        .metrics
                        .store_commit_latency
                        .observe(last_commit_end.duration_since(started).as_secs_f64());
                    break;
                }
                Err(StoreError::Fenced { .. } | StoreError::LeaseLost { .. }) => {
                    // Never retried: another process owns the store now
                    // (or, on a cluster node, its lease is gone).
                    shared.metrics.store_commit_errors.inc();
                    return Err(stop_fenced(shared, entries.len()));
                }
                Err(e) => {
                    failures += 1;
                    shared.metrics.store_commit_errors.inc();
                    shared.refresh_gauges();
                    tracing::error!(
                        error = %e,
                        attempt = failures,
                        entries = entries.len(),
                        "store commit failed; keeping the batch and retrying"
                    );
                    // A stop that arrived during the commit counts too.
                    let stop_deadline = stop_deadline.or(shared.queue.lock().stop_deadline);
                    let backoff = RETRY_BACKOFF_MIN
                        .saturating_mul(1 << (failures - 1).min(10))
                        .min(RETRY_BACKOFF_MAX);
                    match stop_deadline {
                        Some(d) if Instant::now() >= d => {
                            let mut q = shared.queue.lock();
                            q.stopped = true;
                            let unpersisted = (entries.len() + q.len) as u64;
                            tracing::error!(
                                unpersisted,
                                "giving up on the store at shutdown; entries are lost"
                            );
                            return Err(FlushError::StoreFailing { unpersisted });
                        }
                        Some(d) => std::thread::sleep(
                            backoff.min(d.saturating_duration_since(Instant::now())),
                        ),
                        None => std::thread::sleep(backoff),
                    }
                }
            }
        }
        if failures > 0 {
            tracing::warn!(
                attempts = failures + 1,
                "store commit succeeded after retries"
            );
        }
        committed += entries.len() as u64;
        // Clear the in-flight age before publishing the watermark: a waiter
        // woken by it must not see the committed batch as still pending.
        shared.queue.lock().in_flight_since = None;
        shared.committed.store(committed, Ordering::Release);
        shared.committed_tx.send_replace(committed);
        shared
            .metrics
            .store_batch_entries
            .observe(entries.len() as f64);
        shared
            .metrics
            .store_committed_entries
            .inc_by(entries.len() as u64);
        shared.refresh_gauges();
    }
}

/// The writer found this process fenced: drops the queue (it can never be
/// committed), counts and logs it, and wakes every waiter so it fails.
/// `in_flight`: entries of the batch whose commit was refused.
fn stop_fenced(shared: &Shared, in_flight: usize) -> FlushError {
    let unpersisted = {
        let mut q = shared.queue.lock();
        // Critical section: empty the queue, set the flags.
        let unpersisted = (in_flight + q.len) as u64;
        q.calls.clear();
        q.len = 0;
        q.in_flight_since = None;
        q.stopped = true;
        unpersisted
    };
    shared.commit_fenced.store(true, Ordering::Release);
    shared.metrics.store_entries_after_stop.inc_by(unpersisted);
    tracing::warn!(
        unpersisted,
        "the store writer stopped: this process is fenced, and its queued entries are not persisted (the store's owner has the reservations they settle in doubt)"
    );
    shared.committed_tx.send_modify(|_| {});
    shared.refresh_gauges();
    FlushError::Fenced { unpersisted }
}

/// Identity of every account the batch touches, from the directory (or a
/// placeholder when it is gone).
fn touched_accounts(entries: &[Entry], directory: &Weak<dyn AccountDirectory>) -> Vec<AccountMeta> {
    let names: HashSet<&str> = entries.iter().map(|e| e.account.as_str()).collect();
    let directory = directory.upgrade();
    names
        .into_iter()
        .map(|name| {
            directory
                .as_ref()
                .and_then(|d| d.account_meta(name))
                .unwrap_or_else(|| AccountMeta::unknown(name))
        })
        .collect()
}

#[cfg(test)]
mod tests;
