//! Idempotency keys (SPEC 3.4): an `Idempotency-Key` request header on
//! `sendmessage`, `addcredits`, `setcredits` and the SOAP transfer makes a
//! retry return the first answer without a second charge or credit.
//!
//! Owns the key table (in memory while a request runs, in SQLite for the
//! key's lifetime) and the rules below; the pingora glue in `proxy.rs`
//! extracts the key, computes the request's fingerprint, and writes the
//! answers. It never touches a balance.
//!
//! # Rules
//! - Keys are scoped per account (the `username` the request names): two
//!   accounts may use the same key. A key is 1 to [`KEY_MAX_BYTES`] visible
//!   ASCII characters; anything else is `invalid_request` (HTTP 400).
//! - The first request with a key is *claimed* before it runs. The claim is
//!   made durable (a `pending` row, committed with `synchronous=FULL`)
//!   **before** the request can change a balance or reach the gateway.
//! - When it ends, its answer (status, headers, body) is stored (`done`),
//!   unless nothing happened (see `service::Outcome::changed_nothing`: refused before any change,
//!   e.g. `auth_failed`, `rate_limited`, `insufficient_credit`), in which
//!   case the key is released and a retry runs afresh.
//! - A retry with the same fingerprint (a hash of method, path, query and
//!   body with secret values redacted, or of the SOAP call's arguments)
//!   gets the stored answer plus `Idempotent-Replayed: true`, after its
//!   credentials are checked again (an answer is never handed to a caller
//!   who could not have made the request).
//! - The same key with another fingerprint: HTTP **422** `invalid_request`.
//! - A retry while the first is still running **waits** for it (up to
//!   `idempotency.wait_ms`), then replays its answer; past the wait: HTTP
//!   **409** `replayed`.
//! - A `pending` row whose request is not running (the process crashed or
//!   the request was cancelled after it may have changed something): HTTP
//!   **409** `replayed`: its outcome is unknown (a send's reservation is in
//!   doubt for an operator); a second attempt never runs under that key.
//! - Keys live `idempotency.ttl_s` (at least 24 h, default 24 h) and are
//!   deleted by the sweep after; at most `idempotency.max_keys` are held
//!   (past it new keys get `store_unavailable`, HTTP 503).
//!
//! # Failure modes
//! - Crash after the claim and before the answer is stored: `pending`
//!   survives → 409 for the retry (never a second send or credit).
//! - Crash after the answer but before its row is committed: the same.
//! - The key file cannot be written: new keys are refused with
//!   `store_unavailable` before anything runs.
//!
//! # Cluster (`cluster:`, several nodes on one PostgreSQL store)
//! Opened with [`Idempotency::open_postgres_cluster`], the key table is
//! `idempotency_keys` in the store's database, shared by every node, and
//! the rules above hold across nodes, not only within one process:
//! - A claim is decided by PostgreSQL: `INSERT ... ON CONFLICT DO NOTHING`
//!   of the `pending` row, committed on its own (one round trip, on the
//!   shared key thread, never on a tokio worker) before the request runs.
//!   Two nodes claiming one key at once: one inserts, the other finds it.
//! - A retry finding the key `pending` with the same fingerprint cannot
//!   tell a request still running on another node from one whose node
//!   died, so it **waits**: the row is read again every [`SHARED_POLL`]
//!   until it is `done` (replayed), gone (released: claimed afresh) or
//!   `idempotency.wait_ms` passes: HTTP **409** `replayed`. A row left
//!   pending by a dead node (or by a cancelled request here) stays so
//!   until it expires: 409 after the wait, never a second run.
//! - The answer (`done`) and the release (the row deleted) are written to
//!   PostgreSQL in the order they happen on the same thread, each committed
//!   on its own; until a release is committed the row is pending and
//!   retries on every node wait, so none runs afresh early.
//! - `idempotency.max_keys` bounds the shared table: counted at start, at
//!   each sweep and when full, plus this node's claims since (every node
//!   sweeps expired rows).
//! - Only this mode pays the round trips: without `cluster:` the claim
//!   goes through the group-committed writer as before.
//!
//! Failure modes in cluster mode: PostgreSQL down or the session broken →
//! new keys (and retries that must read a row) get `store_unavailable`
//! (HTTP 503) before anything runs; an answer or a release that cannot be
//! written leaves the row pending → 409 for retries until it expires (fail
//! closed, logged). The key table never decides from this process's memory
//! alone, except that two requests with one key on the same node wait for
//! each other in memory first (as without `cluster:`).
//!
//! Storage: its own SQLite file (`idempotency.path`, default next to the
//! ledger store: `<store stem>.idempotency.db`), or, with a PostgreSQL
//! ledger store (`store.url`) and no `idempotency.path`, the table
//! `idempotency_keys` in the store's database ([`pg`]). Either is written by
//! one thread in group-committed batches, so the ledger's writer never
//! waits for it. Without a store the table lives in memory (tests, demos).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};

use crate::clock::Clock;
use sqlite::SqliteTable;
use table::{Backend, DurableKeys, Found, MemoryKeys, Op, SharedKeys, SharedOp};

mod pg;
mod sqlite;
mod table;
#[cfg(test)]
mod tests;

/// The `idempotency:` configuration (it lives in `config`).
pub use crate::config::idempotency::{IdempotencyConfig, TTL_MIN_S};

/// The request header (matched case-insensitively, as all HTTP names).
pub const HEADER: &str = "idempotency-key";
/// The header a replayed answer carries.
pub const REPLAYED_HEADER: &str = "Idempotent-Replayed";
/// Longest accepted key.
pub const KEY_MAX_BYTES: usize = 255;

/// A hash identifying "the same request".
pub type Fingerprint = [u8; 32];

// ---------------------------------------------------------------------------
// Request side helpers
// ---------------------------------------------------------------------------

/// Whether a header value is a usable key: 1 to 255 visible ASCII bytes.
pub fn valid_key(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= KEY_MAX_BYTES
        && value.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// A fingerprint of `parts`, each length-prefixed so boundaries cannot be
/// moved.
pub fn fingerprint(parts: &[&[u8]]) -> Fingerprint {
    let mut h = blake3::Hasher::new();
    h.update(b"tollgate-idempotency-v1");
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    *h.finalize().as_bytes()
}

/// An answer as first sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    /// Headers worth replaying (framing and per-hop ones left out).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Response headers not stored: framing is recomputed, per-hop ones are
/// not the message's, and the date is the replay's.
const NOT_STORED: [&str; 6] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "date",
    "idempotent-replayed",
];

pub fn should_store_header(name: &str) -> bool {
    !NOT_STORED.iter().any(|h| name.eq_ignore_ascii_case(h))
}

// ---------------------------------------------------------------------------
// The key table
// ---------------------------------------------------------------------------

/// What the first step for a keyed request found.
#[derive(Debug)]
pub enum Begin {
    /// The first request with this key: run it, then [`Claim::complete`]
    /// or [`Claim::release`].
    Fresh(Claim),
    /// Done before with the same request: answer this.
    Replay(StoredAnswer),
    /// Used before (or now) with a different request.
    Mismatch,
    /// Claimed by a request that is not running and never finished: its
    /// outcome is unknown.
    Interrupted,
    /// The first request is still running after `idempotency.wait`.
    InProgress,
    /// `idempotency.max_keys` keys are held.
    Full,
    /// The key file could not be read or written.
    Unavailable,
}

type Scope = (String, String);

/// A request running under a key.
struct InFlight {
    fingerprint: Fingerprint,
    /// Changes (closes) when the claim ends.
    done: watch::Receiver<()>,
}

/// The right to run the first request with a key. Dropped without
/// `complete` or `release` (cancelled, panicked): the key stays claimed
/// and answers `Interrupted`, because the request may have changed
/// something.
pub struct Claim {
    inner: Arc<Inner>,
    scope: Scope,
    fingerprint: Fingerprint,
    finished: bool,
    _done: watch::Sender<()>,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is client data, but not a secret; the account is logged
        // elsewhere too.
        f.debug_struct("Claim")
            .field("account", &self.scope.0)
            .finish()
    }
}

impl Claim {
    /// Binds the key to `answer` for the rest of its life.
    pub fn complete(mut self, answer: StoredAnswer) {
        self.inner
            .backend
            .complete(&self.scope, self.fingerprint, answer);
        self.finish();
    }

    /// Forgets the key: the request changed nothing.
    pub fn release(mut self) {
        self.inner.backend.release(&self.scope, self.fingerprint);
        self.finish();
    }

    fn finish(&mut self) {
        self.finished = true;
        // Removed before the sender drops, so woken waiters find the key
        // free and read the row.
        self.inner.in_flight.remove(&self.scope);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.finished {
            tracing::warn!(
                account = %self.scope.0,
                "a request holding an idempotency key ended without an answer; \
                 retries with its key get 409 (outcome unknown)"
            );
            self.inner.in_flight.remove(&self.scope);
        }
    }
}

struct Inner {
    in_flight: DashMap<Scope, InFlight>,
    backend: Backend,
    ttl_ms: i64,
    wait: Duration,
    clock: Arc<dyn Clock>,
    last_sweep_ms: std::sync::atomic::AtomicI64,
}

/// Shortest time between two sweeps of the key table.
pub const SWEEP_EVERY_MS: i64 = 60_000;

/// How often a key pending on the table a cluster shares is read again
/// while a retry waits for it.
pub const SHARED_POLL: Duration = Duration::from_millis(25);

/// The key table of the process.
pub struct Idempotency {
    inner: Arc<Inner>,
}

impl Idempotency {
    /// Opens the key file (or an in-memory table when `cfg.path` is
    /// `None`). Rows left `pending` by the last run answer `Interrupted`.
    /// Keys expire by `clock`'s wall time.
    pub fn open(cfg: &IdempotencyConfig, clock: Arc<dyn Clock>) -> Result<Idempotency, String> {
        Self::open_with_clock(cfg, clock)
    }

    /// The key table in the PostgreSQL store's database (a ledger store on
    /// `store.url` without `idempotency.path`). Rows left `pending` by the
    /// last run answer `Interrupted`. Keys expire by `clock`'s wall time.
    pub fn open_postgres(
        cfg: &IdempotencyConfig,
        store: &crate::store::pg::PgSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Idempotency, String> {
        let table = pg::PgTable::open(store)?;
        let backend = Backend::Durable(DurableKeys::start(Box::new(table), cfg.max_keys)?);
        Ok(Self::with_backend(backend, cfg, clock))
    }

    /// [`Self::open_postgres`] for a node of a cluster (`cluster:`): the
    /// table is shared by every node on the store's database, so a claim
    /// is decided by PostgreSQL, committed before its request runs, and a
    /// key pending there is waited for as if it ran here (see "Cluster"
    /// in the module docs). Call it off the async runtime (it connects).
    pub fn open_postgres_cluster(
        cfg: &IdempotencyConfig,
        store: &crate::store::pg::PgSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Idempotency, String> {
        let table = pg::PgTable::open(store)?;
        let backend = Backend::Shared(SharedKeys::start(Box::new(table), cfg.max_keys)?);
        Ok(Self::with_backend(backend, cfg, clock))
    }

    fn with_backend(
        backend: Backend,
        cfg: &IdempotencyConfig,
        clock: Arc<dyn Clock>,
    ) -> Idempotency {
        Idempotency {
            inner: Arc::new(Inner {
                in_flight: DashMap::new(),
                backend,
                ttl_ms: cfg.ttl.as_millis() as i64,
                wait: cfg.wait,
                clock,
                last_sweep_ms: std::sync::atomic::AtomicI64::new(0),
            }),
        }
    }

    pub fn open_with_clock(
        cfg: &IdempotencyConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Idempotency, String> {
        let backend = match &cfg.path {
            Some(path) => Backend::Durable(DurableKeys::start(
                Box::new(SqliteTable::open(path)?),
                cfg.max_keys,
            )?),
            None => Backend::Memory(Mutex::new(MemoryKeys {
                rows: HashMap::new(),
                max_keys: cfg.max_keys,
            })),
        };
        Ok(Self::with_backend(backend, cfg, clock))
    }

    /// The first step for a request with `key` from `account` (see the
    /// module docs for what each answer means).
    pub async fn begin(&self, account: &str, key: &str, fingerprint: Fingerprint) -> Begin {
        let scope: Scope = (account.to_string(), key.to_string());
        let deadline = tokio::time::Instant::now() + self.inner.wait;
        loop {
            // Short critical section: the scope's entry, no await inside.
            let waiting = match self.inner.in_flight.entry(scope.clone()) {
                dashmap::Entry::Occupied(e) => {
                    if e.get().fingerprint != fingerprint {
                        return Begin::Mismatch;
                    }
                    Some(e.get().done.clone())
                }
                dashmap::Entry::Vacant(v) => {
                    let (tx, rx) = watch::channel(());
                    v.insert(InFlight {
                        fingerprint,
                        done: rx,
                    });
                    let claim = Claim {
                        inner: self.inner.clone(),
                        scope: scope.clone(),
                        fingerprint,
                        finished: false,
                        _done: tx,
                    };
                    return self.claimed(claim, fingerprint, deadline).await;
                }
            };
            if let Some(mut done) = waiting {
                // Resolves when the claim's sender drops.
                if tokio::time::timeout_at(deadline, done.changed())
                    .await
                    .is_err()
                {
                    return Begin::InProgress;
                }
            }
        }
    }

    /// Holding the in-memory claim: looks the key up in the table and
    /// records it as pending if it is new. On the table a cluster shares,
    /// a key pending with the same request may be running on another
    /// node: it is read again every [`SHARED_POLL`] until it is answered
    /// (replayed), released (claimed afresh) or `deadline` passes.
    async fn claimed(
        &self,
        mut claim: Claim,
        fingerprint: Fingerprint,
        deadline: tokio::time::Instant,
    ) -> Begin {
        let backend = &self.inner.backend;
        let now = self.inner.clock.now_unix_ms();
        let mut found = backend
            .begin(&claim.scope, fingerprint, now, now + self.inner.ttl_ms)
            .await;
        let outcome = loop {
            break match found {
                Ok(Found::Inserted) => return Begin::Fresh(claim),
                Ok(Found::Done {
                    fingerprint: stored,
                    answer,
                }) if stored == fingerprint => Begin::Replay(answer),
                Ok(Found::Done { .. }) => Begin::Mismatch,
                Ok(Found::Pending {
                    fingerprint: stored,
                }) if stored == fingerprint && backend.shared() => {
                    if tokio::time::Instant::now() + SHARED_POLL > deadline {
                        Begin::InProgress
                    } else {
                        tokio::time::sleep(SHARED_POLL).await;
                        let now = self.inner.clock.now_unix_ms();
                        found = backend
                            .poll(&claim.scope, fingerprint, now, now + self.inner.ttl_ms)
                            .await;
                        continue;
                    }
                }
                Ok(Found::Pending {
                    fingerprint: stored,
                }) if stored == fingerprint => Begin::Interrupted,
                Ok(Found::Pending { .. }) => Begin::Mismatch,
                Ok(Found::Full) => Begin::Full,
                Err(e) => {
                    tracing::error!(error = %e, "idempotency key table unavailable");
                    Begin::Unavailable
                }
            };
        };
        // Not ours to run: free the in-memory entry, leave the row alone.
        claim.finish();
        outcome
    }

    /// Deletes expired keys; does nothing if the last sweep was less than
    /// [`SWEEP_EVERY_MS`] ago (the sweeper calls it every second).
    pub fn sweep(&self) {
        let now = self.inner.clock.now_unix_ms();
        let last = self
            .inner
            .last_sweep_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) < SWEEP_EVERY_MS {
            return;
        }
        self.inner
            .last_sweep_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
        self.inner.backend.sweep(now);
    }

    /// Requests running under a key now.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.len()
    }

    /// Keys the table holds (pending or answered), what counts against
    /// `idempotency.max_keys`; expired keys count until the next sweep
    /// (at most [`SWEEP_EVERY_MS`] late). For the metrics sweeper: the
    /// file-backed table reads a count its writer thread keeps anyway (a
    /// committed batch later than the rows), the in-memory one takes its
    /// lock for a `len`; a request never pays for it.
    pub fn keys_held(&self) -> usize {
        match &self.inner.backend {
            Backend::Memory(m) => m.lock().rows.len(),
            Backend::Durable(s) => s.rows.load(Ordering::Relaxed),
            Backend::Shared(s) => s.rows.load(Ordering::Relaxed),
        }
    }

    /// [`Self::flush`] for a thread outside the async runtime (shutdown:
    /// the answers already sent are recorded before the process exits).
    pub fn flush_blocking(&self) {
        if let Some(rx) = self.send_flush() {
            let _ = rx.blocking_recv();
        }
    }

    /// Waits until every change sent to the key file so far is committed
    /// (tests, shutdown).
    pub async fn flush(&self) {
        if let Some(rx) = self.send_flush() {
            let _ = rx.await;
        }
    }

    /// Queues a flush behind every change sent so far; `None` if there is
    /// nothing to wait for (in memory, or the writer is gone).
    fn send_flush(&self) -> Option<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        let sent = match &self.inner.backend {
            Backend::Memory(_) => false,
            Backend::Durable(s) => s.send(Op::Flush(tx)),
            Backend::Shared(s) => s.send(SharedOp::Flush(tx)),
        };
        sent.then_some(rx)
    }
}
