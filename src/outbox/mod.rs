//! A durable outbox: HTTP calls tollgate owes someone (a client's delivery
//! report URL today, low-balance webhooks later), made with retries until
//! the receiver answers 2xx, at most once after that.
//!
//! Owns the outbox table, its writer thread, the relay task and a small
//! key-value table (`outbox_state`) that producers use to keep their own
//! records **in the same transaction** as the items they enqueue (the
//! delivery-report module keeps its tokens and reports there). It never
//! touches a balance and knows nothing of what an item means: `kind` is a
//! label, the rest is a request.
//!
//! # Rules
//! - [`Outbox::commit`] returns only once its items (and state rows) are
//!   committed: a producer acknowledges its cause (answers a callback)
//!   after that, so a crash never loses an item whose cause was answered.
//! - Every item has a **dedupe key**: enqueueing a key the table already
//!   holds (pending, done or given up) adds nothing and says so. Keys of
//!   finished items are kept `outbox.done_retention_s`.
//! - The relay takes due items, calls them (`http://` only; a URL it
//!   cannot call is retried like any failure and given up in the end), and
//!   marks an item `done` after a 2xx — the item leaves the in-flight set
//!   only once that mark is committed, so the relay never sends a done
//!   item again. Anything else is retried with exponential backoff and
//!   full jitter (`outbox.retry_initial_ms` doubling up to
//!   `outbox.retry_max_ms`), until `outbox.give_up_after_s` after the
//!   item was enqueued: then it is `gave_up`, counted, and listed at
//!   `GET /admin/outbox?state=gave_up`.
//!
//! # Failure modes
//! - Crash (`kill -9`) after a receiver's 2xx and before the `done` mark
//!   is committed (one commit): the item is sent again after the restart.
//!   That window is why every call carries `X-Tollgate-Delivery-Id: <dedupe
//!   key>`: a receiver that must not see a report twice can drop repeats.
//!   After the mark is committed, never again.
//! - Crash with items pending: they are in the table and the relay of the
//!   next process sends them.
//! - The table cannot be written: `commit` fails, the producer refuses its
//!   cause (a callback gets 503 and the gateway retries it later).
//! - More than `outbox.max_pending` items pending: `commit` refuses new
//!   items (`OutboxError::Full`), so a dead receiver cannot grow the table
//!   without bound.
//!
//! Storage: with an SQLite ledger store, its own file next to it
//! (`outbox.path`, default `<store stem>.outbox.db`, synchronous=FULL);
//! with a PostgreSQL store and no `outbox.path`, the tables `outbox_items`
//! and `outbox_state` in the store's database (migration 3); without a
//! store, in memory (tests, demos: nothing survives the process).

mod http;
mod memory;
mod pg;
mod sqlite;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng;
use thiserror::Error;
use tokio::sync::{oneshot, Notify};

use crate::clock::Clock;
use crate::metrics::Metrics;

pub use crate::config::outbox::{FileOutbox, OutboxConfig};
pub use http::{call, CallError};

// ---------------------------------------------------------------------------
// Items
// ---------------------------------------------------------------------------

/// Most bytes of an item's target URL, headers and body together.
pub const ITEM_MAX_BYTES: usize = 64 * 1024;
/// Longest dedupe key.
pub const DEDUPE_KEY_MAX_BYTES: usize = 255;

/// A call to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewItem {
    /// What produced it (a metrics label: one of [`crate::metrics::OUTBOX_KINDS`]).
    pub kind: &'static str,
    /// `http://host[:port]/path?query`.
    pub target: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// One call per key, ever (within `outbox.done_retention_s`).
    pub dedupe_key: String,
}

impl NewItem {
    fn size(&self) -> usize {
        self.target.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
            + self.body.len()
    }
}

/// Where an item stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemState {
    Pending,
    Done,
    GaveUp,
}

impl ItemState {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemState::Pending => "pending",
            ItemState::Done => "done",
            ItemState::GaveUp => "gave_up",
        }
    }

    pub fn parse(text: &str) -> Option<ItemState> {
        match text {
            "pending" => Some(ItemState::Pending),
            "done" => Some(ItemState::Done),
            "gave_up" => Some(ItemState::GaveUp),
            _ => None,
        }
    }
}

/// A stored item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: i64,
    pub kind: String,
    pub target: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub dedupe_key: String,
    pub state: ItemState,
    pub attempts: u32,
    pub created_unix_ms: i64,
    pub next_attempt_unix_ms: i64,
    /// Why the last attempt failed (status or error; never a body).
    pub last_error: Option<String>,
}

/// What enqueueing an item did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    New(i64),
    /// The dedupe key was already there (in this state): nothing added.
    Duplicate(i64, ItemState),
}

/// One change of a [`Outbox::commit`]: all of them commit together.
#[derive(Debug, Clone)]
pub enum Change {
    Enqueue(NewItem),
    /// A producer's own record in `outbox_state` (namespace, key, value).
    Put(String, String, Vec<u8>),
    Delete(String, String),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OutboxError {
    #[error("outbox unavailable: {0}")]
    Unavailable(String),
    #[error("the outbox holds outbox.max_pending items")]
    Full,
    #[error("an outbox item is too large or malformed: {0}")]
    Invalid(String),
}

/// Pending items of one kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindStats {
    pub pending: u64,
    pub oldest_created_unix_ms: Option<i64>,
    pub given_up: u64,
}

/// How an attempt ended, for the writer.
#[derive(Debug, Clone)]
enum Finish {
    Done,
    Retry { next_unix_ms: i64, error: String },
    GaveUp { error: String },
}

// ---------------------------------------------------------------------------
// Tables (SQLite, PostgreSQL, memory), used by the writer thread only
// ---------------------------------------------------------------------------

/// The statements of one outbox transaction.
trait OutboxTx {
    fn find_key(&mut self, key: &str) -> Result<Option<(i64, ItemState)>, String>;
    fn insert(&mut self, item: &NewItem, now_ms: i64) -> Result<i64, String>;
    fn finish(&mut self, id: i64, attempts: u32, how: &Finish, now_ms: i64) -> Result<(), String>;
    fn put_state(&mut self, ns: &str, key: &str, value: &[u8]) -> Result<(), String>;
    fn delete_state(&mut self, ns: &str, key: &str) -> Result<(), String>;
    fn due(&mut self, now_ms: i64, limit: usize) -> Result<Vec<Item>, String>;
    fn list(&mut self, state: ItemState, limit: usize) -> Result<Vec<Item>, String>;
    fn stats(&mut self) -> Result<Vec<(String, KindStats)>, String>;
    fn state_rows(&mut self, ns: &str) -> Result<Vec<(String, Vec<u8>)>, String>;
    fn purge_finished(&mut self, before_ms: i64) -> Result<usize, String>;
    fn pending_count(&mut self) -> Result<u64, String>;
}

/// A durable (or memory) outbox table: runs one batch in one
/// transaction, committed before it returns `Ok`.
trait OutboxTable: Send {
    fn transaction(
        &mut self,
        ops: &mut dyn FnMut(&mut dyn OutboxTx) -> Result<(), String>,
    ) -> Result<(), String>;
}

fn headers_json(headers: &[(String, String)]) -> String {
    serde_json::to_string(headers).unwrap_or_else(|_| "[]".into())
}

fn headers_from_json(text: &str) -> Vec<(String, String)> {
    serde_json::from_str(text).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// The writer thread
// ---------------------------------------------------------------------------

type Reply<T> = oneshot::Sender<Result<T, OutboxError>>;

enum Op {
    Commit {
        changes: Vec<Change>,
        now_ms: i64,
        reply: Reply<Vec<Option<Enqueued>>>,
    },
    Finish {
        id: i64,
        attempts: u32,
        how: Finish,
        now_ms: i64,
        reply: Reply<()>,
    },
    Due {
        now_ms: i64,
        limit: usize,
        reply: Reply<Vec<Item>>,
    },
    List {
        state: ItemState,
        limit: usize,
        reply: Reply<Vec<Item>>,
    },
    Stats {
        reply: Reply<Vec<(String, KindStats)>>,
    },
    StateRows {
        ns: String,
        reply: Reply<Vec<(String, Vec<u8>)>>,
    },
    Purge {
        before_ms: i64,
    },
}

/// Most operations committed in one transaction.
const BATCH_MAX_OPS: usize = 512;

/// A reply to send once the batch's transaction has (or has not) committed.
type Answer = Box<dyn FnOnce(Result<(), OutboxError>) + Send>;

struct Writer {
    table: Box<dyn OutboxTable>,
    max_pending: usize,
    /// Pending items as of the last batch (kept in step with inserts and
    /// finishes), so a full outbox is refused without a count per commit.
    pending: u64,
}

impl Writer {
    fn run(&mut self, rx: std_mpsc::Receiver<Op>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH_MAX_OPS {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    fn commit(&mut self, mut batch: Vec<Op>) {
        // Replies are sent only after the transaction committed.
        let mut done: Vec<Answer> = Vec::new();
        let pending_before = self.pending;
        let (pending, max_pending) = (&mut self.pending, self.max_pending);
        let result = self.table.transaction(&mut |tx| {
            for op in batch.drain(..) {
                match op {
                    Op::Commit {
                        changes,
                        now_ms,
                        reply,
                    } => {
                        let outcome = apply_changes(tx, &changes, now_ms, pending, max_pending)?;
                        done.push(Box::new(move |r| {
                            let _ = reply.send(r.and(outcome));
                        }));
                    }
                    Op::Finish {
                        id,
                        attempts,
                        how,
                        now_ms,
                        reply,
                    } => {
                        tx.finish(id, attempts, &how, now_ms)?;
                        if !matches!(how, Finish::Retry { .. }) {
                            *pending = pending.saturating_sub(1);
                        }
                        done.push(Box::new(move |r| {
                            let _ = reply.send(r);
                        }));
                    }
                    Op::Due {
                        now_ms,
                        limit,
                        reply,
                    } => {
                        let items = tx.due(now_ms, limit)?;
                        done.push(Box::new(move |r| {
                            let _ = reply.send(r.map(|_| items));
                        }));
                    }
                    Op::List {
                        state,
                        limit,
                        reply,
                    } => {
                        let items = tx.list(state, limit)?;
                        done.push(Box::new(move |r| {
                            let _ = reply.send(r.map(|_| items));
                        }));
                    }
                    Op::Stats { reply } => {
                        let stats = tx.stats()?;
                        *pending = stats.iter().map(|(_, s)| s.pending).sum();
                        done.push(Box::new(move |r| {
                            let _ = reply.send(r.map(|_| stats));
                        }));
                    }
                    Op::StateRows { ns, reply } => {
                        let rows = tx.state_rows(&ns)?;
                        done.push(Box::new(move |r| {
                            let _ = reply.send(r.map(|_| rows));
                        }));
                    }
                    Op::Purge { before_ms } => {
                        tx.purge_finished(before_ms)?;
                    }
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                for reply in done {
                    reply(Ok(()));
                }
            }
            Err(e) => {
                self.pending = pending_before;
                tracing::error!(error = %e, "outbox batch failed");
                let err = OutboxError::Unavailable(e);
                for reply in done {
                    reply(Err(err.clone()));
                }
                // Operations the failed transaction did not reach.
                for op in batch {
                    fail_op(op, &err);
                }
            }
        }
    }
}

/// Applies one producer's changes; `Err` aborts the whole batch (a store
/// error), `Ok(Err)` refuses only this commit (full, invalid) — in which
/// case nothing of it was written.
fn apply_changes(
    tx: &mut dyn OutboxTx,
    changes: &[Change],
    now_ms: i64,
    pending: &mut u64,
    max_pending: usize,
) -> Result<Result<Vec<Option<Enqueued>>, OutboxError>, String> {
    // Validate first, so a refused commit writes nothing.
    let mut new_items = 0u64;
    let mut plan = Vec::with_capacity(changes.len());
    for c in changes {
        if let Change::Enqueue(item) = c {
            if item.size() > ITEM_MAX_BYTES
                || item.dedupe_key.is_empty()
                || item.dedupe_key.len() > DEDUPE_KEY_MAX_BYTES
            {
                return Ok(Err(OutboxError::Invalid(
                    "size or dedupe key out of bounds".into(),
                )));
            }
            let found = tx.find_key(&item.dedupe_key)?;
            if found.is_none() {
                new_items += 1;
            }
            plan.push(found);
        } else {
            plan.push(None);
        }
    }
    if new_items > 0 && pending.saturating_add(new_items) > max_pending as u64 {
        return Ok(Err(OutboxError::Full));
    }
    let mut out = Vec::with_capacity(changes.len());
    let mut seen_in_commit: Vec<(String, i64)> = Vec::new();
    for (c, found) in changes.iter().zip(plan) {
        match c {
            Change::Enqueue(item) => {
                if let Some((id, state)) = found {
                    out.push(Some(Enqueued::Duplicate(id, state)));
                } else if let Some((_, id)) =
                    seen_in_commit.iter().find(|(k, _)| *k == item.dedupe_key)
                {
                    out.push(Some(Enqueued::Duplicate(*id, ItemState::Pending)));
                } else {
                    let id = tx.insert(item, now_ms)?;
                    *pending += 1;
                    seen_in_commit.push((item.dedupe_key.clone(), id));
                    out.push(Some(Enqueued::New(id)));
                }
            }
            Change::Put(ns, key, value) => {
                tx.put_state(ns, key, value)?;
                out.push(None);
            }
            Change::Delete(ns, key) => {
                tx.delete_state(ns, key)?;
                out.push(None);
            }
        }
    }
    Ok(Ok(out))
}

fn fail_op(op: Op, err: &OutboxError) {
    match op {
        Op::Commit { reply, .. } => {
            let _ = reply.send(Err(err.clone()));
        }
        Op::Finish { reply, .. } => {
            let _ = reply.send(Err(err.clone()));
        }
        Op::Due { reply, .. } | Op::List { reply, .. } => {
            let _ = reply.send(Err(err.clone()));
        }
        Op::Stats { reply } => {
            let _ = reply.send(Err(err.clone()));
        }
        Op::StateRows { reply, .. } => {
            let _ = reply.send(Err(err.clone()));
        }
        Op::Purge { .. } => {}
    }
}

// ---------------------------------------------------------------------------
// The handle
// ---------------------------------------------------------------------------

/// The outbox of the process.
pub struct Outbox {
    tx: Mutex<std_mpsc::Sender<Op>>,
    config: OutboxConfig,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// Woken by every commit that added an item, so the relay calls it
    /// without waiting for its next poll.
    wake: Notify,
    /// Items being called now (by id): never taken twice at once, and
    /// only released after their finish is committed.
    in_flight: Mutex<HashSet<i64>>,
    /// Set when the relay is running (one per process).
    relaying: AtomicBool,
    /// Commits asked for ([`Self::commits`]).
    commits: AtomicU64,
    /// The connector of `https://` targets (`None`: refused, retried and
    /// given up like any failing call).
    tls: Option<crate::tls::RelayTls>,
}

impl Outbox {
    /// Opens the outbox file (or the in-memory table when `config.path` is
    /// `None`) and starts its writer thread.
    pub fn open(
        config: &OutboxConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Result<Outbox, String> {
        let table: Box<dyn OutboxTable> = match &config.path {
            Some(path) => Box::new(sqlite::SqliteTable::open(path)?),
            None => Box::new(memory::MemoryTable::default()),
        };
        Self::start(table, config, clock, metrics)
    }

    /// The outbox in the PostgreSQL store's database (its migrations
    /// created the tables).
    pub fn open_postgres(
        config: &OutboxConfig,
        store: &crate::store::pg::PgSettings,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Result<Outbox, String> {
        let table = pg::PgTable::open(store)?;
        Self::start(Box::new(table), config, clock, metrics)
    }

    fn start(
        table: Box<dyn OutboxTable>,
        config: &OutboxConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Result<Outbox, String> {
        // `https://` targets: a CA file that does not load refuses the
        // start; without one, a trust store that does not load only
        // refuses https targets (logged).
        let tls = match (
            &config.ca_file,
            crate::tls::RelayTls::new(config.ca_file.as_deref()),
        ) {
            (_, Ok(t)) => Some(t),
            (Some(_), Err(e)) => return Err(format!("outbox.ca_file: {e}")),
            (None, Err(e)) => {
                tracing::warn!(error = %e, "outbox: no TLS trust store; https:// targets will fail");
                None
            }
        };
        let (tx, rx) = std_mpsc::channel();
        let mut writer = Writer {
            table,
            max_pending: config.max_pending,
            pending: 0,
        };
        // The pending count, before anything is enqueued.
        writer.pending = {
            let mut n = 0;
            writer
                .table
                .transaction(&mut |t| {
                    n = t.pending_count()?;
                    Ok(())
                })
                .map_err(|e| format!("reading the outbox: {e}"))?;
            n
        };
        std::thread::Builder::new()
            .name("tollgate-outbox".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| format!("starting the outbox writer: {e}"))?;
        Ok(Outbox {
            tx: Mutex::new(tx),
            config: config.clone(),
            clock,
            metrics,
            wake: Notify::new(),
            in_flight: Mutex::new(HashSet::new()),
            relaying: AtomicBool::new(false),
            commits: AtomicU64::new(0),
            tls,
        })
    }

    pub fn config(&self) -> &OutboxConfig {
        &self.config
    }

    /// Commits asked for since the start ([`Self::commit`] and
    /// [`Self::commit_blocking`]): each one waits for its own transaction
    /// (or a share of the writer's batch), so producers keep it low per
    /// cause; tests hold them to their count.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, OutboxError> {
        let (reply, rx) = oneshot::channel();
        if self.tx.lock().send(make(reply)).is_err() {
            return Err(OutboxError::Unavailable(
                "the outbox writer has stopped".into(),
            ));
        }
        rx.await.unwrap_or_else(|_| {
            Err(OutboxError::Unavailable(
                "the outbox writer has stopped".into(),
            ))
        })
    }

    /// [`Self::ask`] from a thread outside the runtime (start-up).
    fn ask_blocking<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, OutboxError> {
        let (reply, rx) = oneshot::channel();
        if self.tx.lock().send(make(reply)).is_err() {
            return Err(OutboxError::Unavailable(
                "the outbox writer has stopped".into(),
            ));
        }
        rx.blocking_recv().unwrap_or_else(|_| {
            Err(OutboxError::Unavailable(
                "the outbox writer has stopped".into(),
            ))
        })
    }

    /// Commits `changes` in one transaction (see the module docs); one
    /// answer per change (`Some` for an enqueue).
    pub async fn commit(&self, changes: Vec<Change>) -> Result<Vec<Option<Enqueued>>, OutboxError> {
        let now_ms = self.clock.now_unix_ms();
        self.commits.fetch_add(1, Ordering::Relaxed);
        let adds = changes.iter().any(|c| matches!(c, Change::Enqueue(_)));
        let out = self
            .ask(|reply| Op::Commit {
                changes,
                now_ms,
                reply,
            })
            .await?;
        if adds {
            self.wake.notify_one();
        }
        Ok(out)
    }

    /// [`Self::commit`] from a thread outside the runtime (start-up).
    pub fn commit_blocking(
        &self,
        changes: Vec<Change>,
    ) -> Result<Vec<Option<Enqueued>>, OutboxError> {
        let now_ms = self.clock.now_unix_ms();
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.ask_blocking(|reply| Op::Commit {
            changes,
            now_ms,
            reply,
        })
    }

    /// Enqueues one item; durable when it returns.
    pub async fn enqueue(&self, item: NewItem) -> Result<Enqueued, OutboxError> {
        let out = self.commit(vec![Change::Enqueue(item)]).await?;
        Ok(out
            .into_iter()
            .next()
            .flatten()
            .expect("one enqueue, one answer"))
    }

    /// Items in `state`, oldest first, at most `limit` (the admin listing).
    pub async fn list(&self, state: ItemState, limit: usize) -> Result<Vec<Item>, OutboxError> {
        self.ask(|reply| Op::List {
            state,
            limit,
            reply,
        })
        .await
    }

    /// A producer's records in namespace `ns` (start-up).
    pub fn state_rows_blocking(&self, ns: &str) -> Result<Vec<(String, Vec<u8>)>, OutboxError> {
        self.ask_blocking(|reply| Op::StateRows {
            ns: ns.to_string(),
            reply,
        })
    }

    /// A producer's records in namespace `ns`.
    pub async fn state_rows(&self, ns: &str) -> Result<Vec<(String, Vec<u8>)>, OutboxError> {
        self.ask(|reply| Op::StateRows {
            ns: ns.to_string(),
            reply,
        })
        .await
    }

    /// Refreshes the outbox gauges and forgets finished items past their
    /// retention (the sweeper calls it every second).
    pub async fn refresh(&self) {
        let now = self.clock.now_unix_ms();
        if let Ok(stats) = self.ask(|reply| Op::Stats { reply }).await {
            let m = &self.metrics;
            for kind in crate::metrics::OUTBOX_KINDS {
                let s = stats
                    .iter()
                    .find(|(k, _)| k == kind)
                    .map(|(_, s)| s.clone())
                    .unwrap_or_default();
                m.outbox_pending
                    .with_label_values(&[kind])
                    .set(s.pending as i64);
                m.outbox_given_up
                    .with_label_values(&[kind])
                    .set(s.given_up as i64);
                let age_s = s
                    .oldest_created_unix_ms
                    .map_or(0, |t| (now - t).max(0) / 1000);
                m.outbox_oldest_age_seconds
                    .with_label_values(&[kind])
                    .set(age_s);
            }
        }
        let before_ms = now - self.config.done_retention.as_millis() as i64;
        let _ = self.tx.lock().send(Op::Purge { before_ms });
    }

    /// The wait before attempt `attempts + 1`: full jitter over an
    /// exponential ceiling.
    fn backoff(&self, attempts: u32) -> Duration {
        let initial = self.config.retry_initial.as_millis() as u64;
        let max = self.config.retry_max.as_millis() as u64;
        let ceiling = initial
            .saturating_mul(1u64 << attempts.saturating_sub(1).min(30))
            .min(max)
            .max(1);
        // Full jitter, but never below a tenth of the ceiling (no hot loop).
        let low = (ceiling / 10).max(1);
        Duration::from_millis(rand::thread_rng().gen_range(low..=ceiling))
    }

    /// Runs the relay until `stop` resolves. One relay per process.
    pub async fn relay(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        if self.relaying.swap(true, Ordering::SeqCst) {
            return;
        }
        let slots = Arc::new(tokio::sync::Semaphore::new(self.config.concurrency));
        let poll = Duration::from_millis(200);
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
            if *stop.borrow() {
                break;
            }
            let free = slots.available_permits();
            if free == 0 {
                continue;
            }
            let now = self.clock.now_unix_ms();
            let due = match self
                .ask(|reply| Op::Due {
                    now_ms: now,
                    limit: free + self.in_flight.lock().len(),
                    reply,
                })
                .await
            {
                Ok(items) => items,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay cannot read due items");
                    continue;
                }
            };
            for item in due {
                if !self.in_flight.lock().insert(item.id) {
                    continue;
                }
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    self.in_flight.lock().remove(&item.id);
                    break;
                };
                let me = self.clone();
                tokio::spawn(async move {
                    me.attempt(item).await;
                    drop(permit);
                });
            }
        }
        self.relaying.store(false, Ordering::SeqCst);
    }

    /// One call of `item`, and its finish committed before the item leaves
    /// the in-flight set.
    async fn attempt(&self, item: Item) {
        let result = http::call(&item, self.config.request_timeout, self.tls.as_ref()).await;
        let now = self.clock.now_unix_ms();
        let attempts = item.attempts.saturating_add(1);
        let kind = crate::metrics::OUTBOX_KINDS
            .iter()
            .copied()
            .find(|k| *k == item.kind)
            .unwrap_or("dlr_relay");
        let how = match result {
            Ok(()) => Finish::Done,
            Err(e) => {
                let error = e.to_string();
                let age = now.saturating_sub(item.created_unix_ms);
                if age >= self.config.give_up_after.as_millis() as i64 {
                    Finish::GaveUp { error }
                } else {
                    let wait = self.backoff(attempts).as_millis() as i64;
                    Finish::Retry {
                        next_unix_ms: now + wait,
                        error,
                    }
                }
            }
        };
        let result = match &how {
            Finish::Done => "delivered",
            Finish::Retry { .. } => "failed",
            Finish::GaveUp { .. } => "gave_up",
        };
        if let Finish::GaveUp { error } = &how {
            tracing::warn!(
                id = item.id,
                kind,
                attempts,
                error = %error,
                "outbox item given up (listed at /admin/outbox?state=gave_up)"
            );
        }
        self.metrics
            .outbox_attempts
            .with_label_values(&[kind, result])
            .inc();
        // Until the finish is committed the item stays in flight, so the
        // next poll cannot send it again.
        let mut backoff = Duration::from_millis(50);
        loop {
            let how = how.clone();
            match self
                .ask(|reply| Op::Finish {
                    id: item.id,
                    attempts,
                    how,
                    now_ms: now,
                    reply,
                })
                .await
            {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(id = item.id, error = %e, "outbox finish not committed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        self.in_flight.lock().remove(&item.id);
    }
}

#[cfg(test)]
mod tests;
