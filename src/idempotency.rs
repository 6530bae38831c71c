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
//! Storage: its own SQLite file (`idempotency.path`, default next to the
//! ledger store: `<store stem>.idempotency.db`), or, with a PostgreSQL
//! ledger store (`store.url`) and no `idempotency.path`, the table
//! `idempotency_keys` in the store's database ([`pg`]). Either is written by
//! one thread in group-committed batches, so the ledger's writer never
//! waits for it. Without a store the table lives in memory (tests, demos).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Deserialize;
use tokio::sync::{oneshot, watch};

use crate::clock::Clock;
use crate::config::ConfigError;

mod pg;

/// The request header (matched case-insensitively, as all HTTP names).
pub const HEADER: &str = "idempotency-key";
/// The header a replayed answer carries.
pub const REPLAYED_HEADER: &str = "Idempotent-Replayed";
/// Longest accepted key.
pub const KEY_MAX_BYTES: usize = 255;
/// Shortest accepted `idempotency.ttl_s` (SPEC 3.4: keys live ≥ 24 h).
pub const TTL_MIN_S: u64 = 86_400;

/// A hash identifying "the same request".
pub type Fingerprint = [u8; 32];

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIdempotency {
    #[serde(default = "default_ttl_s")]
    ttl_s: u64,
    #[serde(default = "default_max_keys")]
    max_keys: usize,
    #[serde(default = "default_wait_ms")]
    wait_ms: u64,
    #[serde(default)]
    path: Option<String>,
}

impl Default for FileIdempotency {
    fn default() -> Self {
        FileIdempotency {
            ttl_s: default_ttl_s(),
            max_keys: default_max_keys(),
            wait_ms: default_wait_ms(),
            path: None,
        }
    }
}

fn default_ttl_s() -> u64 {
    TTL_MIN_S
}
fn default_max_keys() -> usize {
    1_000_000
}
fn default_wait_ms() -> u64 {
    35_000
}

#[derive(Debug, Clone)]
pub struct IdempotencyConfig {
    pub ttl: Duration,
    pub max_keys: usize,
    /// How long a retry waits for the first request with its key.
    pub wait: Duration,
    /// The key file; `None` → in memory (when there is no ledger store).
    pub path: Option<PathBuf>,
}

impl IdempotencyConfig {
    /// `store_path` is the ledger store's (`store.path`): the key file
    /// defaults to its sibling `<stem>.idempotency.db`.
    pub fn from_file(
        file: &Path,
        f: FileIdempotency,
        store_path: Option<&Path>,
    ) -> Result<IdempotencyConfig, ConfigError> {
        if !(TTL_MIN_S..=30 * 86_400).contains(&f.ttl_s) {
            return Err(ConfigError::new(
                file,
                "idempotency.ttl_s",
                format!("must be {TTL_MIN_S} (24 h, SPEC 3.4) to 2592000 seconds"),
            ));
        }
        if !(1..=100_000_000).contains(&f.max_keys) {
            return Err(ConfigError::new(
                file,
                "idempotency.max_keys",
                "must be 1 to 100000000",
            ));
        }
        if !(100..=600_000).contains(&f.wait_ms) {
            return Err(ConfigError::new(
                file,
                "idempotency.wait_ms",
                "must be 100 to 600000 ms",
            ));
        }
        let path = match (f.path, store_path) {
            (Some(p), _) => Some(crate::config::resolve_relative(file, &p)),
            (None, Some(store)) => Some(sibling_path(store)),
            (None, None) => None,
        };
        Ok(IdempotencyConfig {
            ttl: Duration::from_secs(f.ttl_s),
            max_keys: f.max_keys,
            wait: Duration::from_millis(f.wait_ms),
            path,
        })
    }
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig::from_file(Path::new("(defaults)"), FileIdempotency::default(), None)
            .expect("the default idempotency settings are valid")
    }
}

/// `dir/tollgate.db` → `dir/tollgate.idempotency.db`.
fn sibling_path(store: &Path) -> PathBuf {
    let stem = store
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tollgate".into());
    store.with_file_name(format!("{stem}.idempotency.db"))
}

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
        self.inner.backend.complete(&self.scope, answer);
        self.finish();
    }

    /// Forgets the key: the request changed nothing.
    pub fn release(mut self) {
        self.inner.backend.release(&self.scope);
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
                        finished: false,
                        _done: tx,
                    };
                    return self.claimed(claim, fingerprint).await;
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
    /// records it as pending if it is new.
    async fn claimed(&self, mut claim: Claim, fingerprint: Fingerprint) -> Begin {
        let now = self.inner.clock.now_unix_ms();
        let found = self
            .inner
            .backend
            .begin(&claim.scope, fingerprint, now, now + self.inner.ttl_ms)
            .await;
        let outcome = match found {
            Ok(Found::Inserted) => return Begin::Fresh(claim),
            Ok(Found::Done {
                fingerprint: stored,
                answer,
            }) if stored == fingerprint => Begin::Replay(answer),
            Ok(Found::Done { .. }) => Begin::Mismatch,
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
        }
    }

    /// [`Self::flush`] for a thread outside the async runtime (shutdown:
    /// the answers already sent are recorded before the process exits).
    pub fn flush_blocking(&self) {
        if let Backend::Durable(s) = &self.inner.backend {
            let (tx, rx) = oneshot::channel();
            if s.send(Op::Flush(tx)) {
                let _ = rx.blocking_recv();
            }
        }
    }

    /// Waits until every change sent to the key file so far is committed
    /// (tests, shutdown).
    pub async fn flush(&self) {
        if let Backend::Durable(s) = &self.inner.backend {
            let (tx, rx) = oneshot::channel();
            if s.send(Op::Flush(tx)) {
                let _ = rx.await;
            }
        }
    }
}

/// What the table holds for a scope.
#[derive(Debug)]
enum Found {
    Inserted,
    Done {
        fingerprint: Fingerprint,
        answer: StoredAnswer,
    },
    Pending {
        fingerprint: Fingerprint,
    },
    Full,
}

enum Backend {
    /// SQLite or PostgreSQL, behind the key writer thread.
    Durable(DurableKeys),
    Memory(Mutex<MemoryKeys>),
}

impl Backend {
    async fn begin(
        &self,
        scope: &Scope,
        fingerprint: Fingerprint,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<Found, String> {
        match self {
            Backend::Memory(m) => Ok(m.lock().begin(scope, fingerprint, now_ms, expires_ms)),
            Backend::Durable(s) => {
                let (tx, rx) = oneshot::channel();
                if !s.send(Op::Begin {
                    scope: scope.clone(),
                    fingerprint,
                    now_ms,
                    expires_ms,
                    reply: tx,
                }) {
                    return Err("the key writer has stopped".into());
                }
                rx.await
                    .unwrap_or_else(|_| Err("the key writer has stopped".into()))
            }
        }
    }

    fn complete(&self, scope: &Scope, answer: StoredAnswer) {
        match self {
            Backend::Memory(m) => {
                if let Some(row) = m.lock().rows.get_mut(scope) {
                    row.answer = Some(answer);
                }
            }
            Backend::Durable(s) => {
                s.send(Op::Complete {
                    scope: scope.clone(),
                    answer,
                });
            }
        }
    }

    fn release(&self, scope: &Scope) {
        match self {
            Backend::Memory(m) => {
                m.lock().rows.remove(scope);
            }
            Backend::Durable(s) => {
                s.send(Op::Release {
                    scope: scope.clone(),
                });
            }
        }
    }

    fn sweep(&self, now_ms: i64) {
        match self {
            Backend::Memory(m) => m.lock().rows.retain(|_, r| r.expires_ms > now_ms),
            Backend::Durable(s) => {
                s.send(Op::Sweep { now_ms });
            }
        }
    }
}

struct MemoryRow {
    fingerprint: Fingerprint,
    /// `None` while pending.
    answer: Option<StoredAnswer>,
    expires_ms: i64,
}

struct MemoryKeys {
    rows: HashMap<Scope, MemoryRow>,
    max_keys: usize,
}

impl MemoryKeys {
    fn begin(
        &mut self,
        scope: &Scope,
        fingerprint: Fingerprint,
        now_ms: i64,
        expires_ms: i64,
    ) -> Found {
        if let Some(row) = self.rows.get(scope).filter(|r| r.expires_ms > now_ms) {
            return match &row.answer {
                Some(a) => Found::Done {
                    fingerprint: row.fingerprint,
                    answer: a.clone(),
                },
                None => Found::Pending {
                    fingerprint: row.fingerprint,
                },
            };
        }
        if self.rows.len() >= self.max_keys {
            self.rows.retain(|_, r| r.expires_ms > now_ms);
            if self.rows.len() >= self.max_keys {
                return Found::Full;
            }
        }
        self.rows.insert(
            scope.clone(),
            MemoryRow {
                fingerprint,
                answer: None,
                expires_ms,
            },
        );
        Found::Inserted
    }
}

// ---------------------------------------------------------------------------
// Durable key tables (SQLite, PostgreSQL): one writer thread, group commit.
// ---------------------------------------------------------------------------

enum Op {
    Begin {
        scope: Scope,
        fingerprint: Fingerprint,
        now_ms: i64,
        expires_ms: i64,
        reply: oneshot::Sender<Result<Found, String>>,
    },
    Complete {
        scope: Scope,
        answer: StoredAnswer,
    },
    Release {
        scope: Scope,
    },
    Sweep {
        now_ms: i64,
    },
    Flush(oneshot::Sender<()>),
}

/// The handle on a durable key table: its writer thread's queue.
struct DurableKeys {
    tx: Mutex<std_mpsc::Sender<Op>>,
    /// The writer's row count as of its last committed batch, published
    /// for [`Idempotency::keys_held`].
    rows: Arc<AtomicUsize>,
}

/// A stored key row, as either table holds it.
struct KeyRow {
    fingerprint: Vec<u8>,
    state: String,
    status: Option<u16>,
    /// JSON `[[name, value], ...]`.
    headers: Option<String>,
    body: Option<Vec<u8>>,
    expires_unix_ms: i64,
}

/// The statements of one key transaction, on SQLite or PostgreSQL.
trait KeyTx {
    fn find(&mut self, scope: &Scope) -> Result<Option<KeyRow>, String>;
    fn insert_pending(
        &mut self,
        scope: &Scope,
        fingerprint: &Fingerprint,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<(), String>;
    fn complete(
        &mut self,
        scope: &Scope,
        answer: &StoredAnswer,
        headers: &str,
    ) -> Result<(), String>;
    fn delete(&mut self, scope: &Scope) -> Result<usize, String>;
    fn delete_expired(&mut self, now_ms: i64) -> Result<usize, String>;
}

/// A durable key table: runs a batch of operations in one transaction,
/// committed before it returns `Ok`. Used by the key writer thread only.
trait KeyTable: Send {
    fn count(&mut self) -> Result<usize, String>;
    fn transaction(
        &mut self,
        ops: &mut dyn FnMut(&mut dyn KeyTx) -> Result<(), String>,
    ) -> Result<(), String>;
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS idempotency_keys (
    account         TEXT    NOT NULL,
    key             TEXT    NOT NULL,
    fingerprint     BLOB    NOT NULL,
    state           TEXT    NOT NULL,   -- pending | done
    status          INTEGER,
    headers         TEXT,               -- JSON [[name, value], ...]
    body            BLOB,
    created_unix_ms INTEGER NOT NULL,
    expires_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (account, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_keys_expiry ON idempotency_keys (expires_unix_ms);
";

/// Most operations committed in one transaction.
const BATCH_MAX_OPS: usize = 512;

impl DurableKeys {
    /// Starts the writer thread over `table`.
    fn start(mut table: Box<dyn KeyTable>, max_keys: usize) -> Result<DurableKeys, String> {
        let rows = table.count()?;
        let (tx, rx) = std_mpsc::channel();
        let published = Arc::new(AtomicUsize::new(rows));
        let mut writer = KeyWriter {
            table,
            rows,
            max_keys,
            published: published.clone(),
        };
        std::thread::Builder::new()
            .name("tollgate-idempotency".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| format!("starting the key writer: {e}"))?;
        Ok(DurableKeys {
            tx: Mutex::new(tx),
            rows: published,
        })
    }

    /// Queues an operation; false if the writer thread is gone.
    fn send(&self, op: Op) -> bool {
        self.tx.lock().send(op).is_ok()
    }
}

/// The SQLite key file.
struct SqliteTable {
    conn: Connection,
}

impl SqliteTable {
    fn open(path: &Path) -> Result<SqliteTable, String> {
        let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        }
        let conn = Connection::open(path).map_err(|e| fail(&e))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| fail(&e))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| fail(&e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(fail(&format!("could not switch to WAL (got {mode})")));
        }
        conn.execute_batch("PRAGMA synchronous=FULL;")
            .and_then(|_| conn.execute_batch(SCHEMA))
            .map_err(|e| fail(&e))?;
        Ok(SqliteTable { conn })
    }
}

impl KeyTable for SqliteTable {
    fn count(&mut self) -> Result<usize, String> {
        let rows: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM idempotency_keys", [], |r| r.get(0))
            .map_err(|e| e.to_string())?;
        Ok(rows.max(0) as usize)
    }

    fn transaction(
        &mut self,
        ops: &mut dyn FnMut(&mut dyn KeyTx) -> Result<(), String>,
    ) -> Result<(), String> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| e.to_string())?;
        ops(&mut SqliteTx(&tx))?;
        tx.commit().map_err(|e| e.to_string())
    }
}

struct SqliteTx<'a>(&'a rusqlite::Transaction<'a>);

impl KeyTx for SqliteTx<'_> {
    fn find(&mut self, scope: &Scope) -> Result<Option<KeyRow>, String> {
        self.0
            .query_row(
                "SELECT fingerprint, state, status, headers, body, expires_unix_ms
                 FROM idempotency_keys WHERE account = ?1 AND key = ?2",
                params![scope.0, scope.1],
                |r| {
                    Ok(KeyRow {
                        fingerprint: r.get(0)?,
                        state: r.get(1)?,
                        status: r.get(2)?,
                        headers: r.get(3)?,
                        body: r.get(4)?,
                        expires_unix_ms: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(|e| e.to_string())
    }

    fn insert_pending(
        &mut self,
        scope: &Scope,
        fingerprint: &Fingerprint,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<(), String> {
        self.0
            .execute(
                "INSERT INTO idempotency_keys
                 (account, key, fingerprint, state, created_unix_ms, expires_unix_ms)
                 VALUES (?1, ?2, ?3, 'pending', ?4, ?5)",
                params![scope.0, scope.1, &fingerprint[..], now_ms, expires_ms],
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn complete(
        &mut self,
        scope: &Scope,
        answer: &StoredAnswer,
        headers: &str,
    ) -> Result<(), String> {
        self.0
            .execute(
                "UPDATE idempotency_keys SET state = 'done', status = ?3, headers = ?4, body = ?5
                 WHERE account = ?1 AND key = ?2",
                params![scope.0, scope.1, answer.status, headers, answer.body],
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn delete(&mut self, scope: &Scope) -> Result<usize, String> {
        self.0
            .execute(
                "DELETE FROM idempotency_keys WHERE account = ?1 AND key = ?2",
                params![scope.0, scope.1],
            )
            .map_err(|e| e.to_string())
    }

    fn delete_expired(&mut self, now_ms: i64) -> Result<usize, String> {
        self.0
            .execute(
                "DELETE FROM idempotency_keys WHERE expires_unix_ms <= ?1",
                [now_ms],
            )
            .map_err(|e| e.to_string())
    }
}

struct KeyWriter {
    table: Box<dyn KeyTable>,
    /// Rows in the table (kept in step with inserts and deletes).
    rows: usize,
    max_keys: usize,
    /// Where `rows` is published after each batch (metrics only).
    published: Arc<AtomicUsize>,
}

impl KeyWriter {
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

    /// One transaction for the batch; replies after the commit, so a
    /// `Fresh` claim is durable before its request runs.
    fn commit(&mut self, mut batch: Vec<Op>) {
        let rows_before = self.rows;
        let mut replies: Vec<(oneshot::Sender<Result<Found, String>>, Found)> = Vec::new();
        let mut flushes = Vec::new();
        let (rows, max_keys) = (&mut self.rows, self.max_keys);
        let result = self.table.transaction(&mut |tx| {
            for op in batch.drain(..) {
                match op {
                    Op::Begin {
                        scope,
                        fingerprint,
                        now_ms,
                        expires_ms,
                        reply,
                    } => {
                        let found =
                            begin_row(tx, &scope, fingerprint, now_ms, expires_ms, rows, max_keys)?;
                        replies.push((reply, found));
                    }
                    Op::Complete { scope, answer } => {
                        let headers =
                            serde_json::to_string(&answer.headers).unwrap_or_else(|_| "[]".into());
                        tx.complete(&scope, &answer, &headers)?;
                    }
                    Op::Release { scope } => {
                        let n = tx.delete(&scope)?;
                        *rows = rows.saturating_sub(n);
                    }
                    Op::Sweep { now_ms } => {
                        let n = tx.delete_expired(now_ms)?;
                        *rows = rows.saturating_sub(n);
                    }
                    Op::Flush(done) => flushes.push(done),
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                for (reply, found) in replies {
                    let _ = reply.send(Ok(found));
                }
            }
            Err(e) => {
                // Nothing of the batch is committed: every claim fails
                // (its request is refused before running), and completions
                // are lost (their keys stay pending → 409, never a double
                // charge).
                self.rows = rows_before;
                tracing::error!(error = %e, "idempotency key batch failed");
                for (reply, _) in replies {
                    let _ = reply.send(Err(e.clone()));
                }
                // Operations the failed transaction did not reach: claims
                // are refused too; flushes are answered.
                for op in batch {
                    match op {
                        Op::Begin { reply, .. } => {
                            let _ = reply.send(Err(e.clone()));
                        }
                        Op::Flush(done) => flushes.push(done),
                        _ => {}
                    }
                }
            }
        }
        self.published.store(self.rows, Ordering::Relaxed);
        for f in flushes {
            let _ = f.send(());
        }
    }
}

fn begin_row(
    tx: &mut dyn KeyTx,
    scope: &Scope,
    fingerprint: Fingerprint,
    now_ms: i64,
    expires_ms: i64,
    rows: &mut usize,
    max_keys: usize,
) -> Result<Found, String> {
    if let Some(row) = tx.find(scope)? {
        if row.expires_unix_ms > now_ms {
            let mut stored = [0u8; 32];
            if row.fingerprint.len() == 32 {
                stored.copy_from_slice(&row.fingerprint);
            }
            return Ok(match (row.state.as_str(), row.status) {
                ("done", Some(status)) => Found::Done {
                    fingerprint: stored,
                    answer: StoredAnswer {
                        status,
                        headers: row
                            .headers
                            .and_then(|h| serde_json::from_str(&h).ok())
                            .unwrap_or_default(),
                        body: row.body.unwrap_or_default(),
                    },
                },
                _ => Found::Pending {
                    fingerprint: stored,
                },
            });
        }
        // Expired but not swept yet: gone.
        tx.delete(scope)?;
        *rows = rows.saturating_sub(1);
    }
    if *rows >= max_keys {
        let n = tx.delete_expired(now_ms)?;
        *rows = rows.saturating_sub(n);
        if *rows >= max_keys {
            return Ok(Found::Full);
        }
    }
    tx.insert_pending(scope, &fingerprint, now_ms, expires_ms)?;
    *rows += 1;
    Ok(Found::Inserted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    const DAY_MS: i64 = 86_400_000;

    fn answer(body: &str) -> StoredAnswer {
        StoredAnswer {
            status: 200,
            headers: vec![("Content-Type".into(), "application/xml".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// Where a test's key table lives.
    #[derive(Clone)]
    enum Table {
        Memory,
        Sqlite(PathBuf),
        Postgres(Box<crate::store::pg::PgSettings>),
    }

    impl Table {
        fn is_some(&self) -> bool {
            !matches!(self, Table::Memory)
        }
    }

    /// A PostgreSQL store's database, migrated (as `tollgate run` does).
    fn postgres(db: &crate::store::pg::testing::TestDb) -> Table {
        let settings =
            crate::store::pg::PgSettings::new(crate::store::pg::PgUrl::parse(&db.url()).unwrap());
        drop(
            crate::store::PgStore::open(&settings, crate::config::Durability::Sync, "test", 0)
                .unwrap(),
        );
        Table::Postgres(Box::new(settings))
    }

    fn open(table: Table, clock: Arc<ManualClock>) -> Idempotency {
        let cfg = IdempotencyConfig {
            path: match &table {
                Table::Sqlite(p) => Some(p.clone()),
                _ => None,
            },
            max_keys: 3,
            wait: Duration::from_millis(300),
            ..IdempotencyConfig::default()
        };
        let clock: Arc<dyn Clock> = clock;
        match &table {
            Table::Postgres(settings) => {
                // The PostgreSQL client must not run on a tokio worker.
                let (cfg, settings) = (cfg.clone(), (**settings).clone());
                std::thread::spawn(move || Idempotency::open_postgres(&cfg, &settings, clock))
                    .join()
                    .unwrap()
                    .unwrap()
            }
            _ => Idempotency::open_with_clock(&cfg, clock).unwrap(),
        }
    }

    async fn scenario(path: Table) {
        let clock = Arc::new(ManualClock::new(1_000));
        let t = open(path.clone(), clock.clone());
        let fp = fingerprint(&[b"GET", b"/api", b"a=1"]);
        let other = fingerprint(&[b"GET", b"/api", b"a=2"]);

        let Begin::Fresh(claim) = t.begin("john", "k1", fp).await else {
            panic!("fresh")
        };
        // While it runs: another request with the key waits; a different
        // request is refused at once.
        assert!(matches!(
            t.begin("john", "k1", other).await,
            Begin::Mismatch
        ));
        assert!(matches!(t.begin("john", "k1", fp).await, Begin::InProgress));
        claim.complete(answer("first"));
        t.flush().await;
        match t.begin("john", "k1", fp).await {
            Begin::Replay(a) => assert_eq!(a, answer("first")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            t.begin("john", "k1", other).await,
            Begin::Mismatch
        ));
        // Scoped per account.
        let Begin::Fresh(c) = t.begin("jane", "k1", other).await else {
            panic!("fresh for another account")
        };
        c.release();
        // Released: fresh again.
        let Begin::Fresh(c) = t.begin("jane", "k1", fp).await else {
            panic!("released key is free")
        };
        // Dropped without an answer: interrupted.
        drop(c);
        assert!(matches!(
            t.begin("jane", "k1", fp).await,
            Begin::Interrupted
        ));
        // Bounded: john/k1 and jane/k1 held; one more fits, then full.
        let Begin::Fresh(c) = t.begin("x", "k", fp).await else {
            panic!()
        };
        c.complete(answer("x"));
        assert!(matches!(t.begin("y", "k", fp).await, Begin::Full));
        // After the TTL every key is gone.
        clock.advance(DAY_MS);
        t.sweep();
        let Begin::Fresh(c) = t.begin("john", "k1", other).await else {
            panic!("expired key is free")
        };
        c.complete(answer("second"));
        t.flush().await;
        drop(t);

        if path.is_some() {
            // Survives a restart.
            let t = open(path, clock.clone());
            match t.begin("john", "k1", other).await {
                Begin::Replay(a) => assert_eq!(a, answer("second")),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn keys_in_memory() {
        scenario(Table::Memory).await;
    }

    #[tokio::test]
    async fn keys_in_sqlite_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        scenario(Table::Sqlite(dir.path().join("keys.db"))).await;
    }

    /// `test` on a runtime of its own: the PostgreSQL database is created
    /// and dropped outside it (the blocking client must not run on it).
    fn on_runtime(test: impl std::future::Future<Output = ()>) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(test);
    }

    #[test]
    fn keys_in_postgres_survive_a_restart() {
        let db = crate::store::pg::testing::TestDb::create("idem_scenario");
        on_runtime(scenario(postgres(&db)));
    }

    #[test]
    fn keys_held_in_postgres() {
        let db = crate::store::pg::testing::TestDb::create("idem_held");
        on_runtime(keys_held_follows_the_table(postgres(&db)));
    }

    /// `keys_held` counts what `max_keys` counts: claimed and answered
    /// keys, not released ones, until the sweep drops expired ones.
    async fn keys_held_follows_the_table(path: Table) {
        let clock = Arc::new(ManualClock::new(1_000));
        let t = open(path.clone(), clock.clone());
        assert_eq!(t.keys_held(), 0);
        let fp = fingerprint(&[b"x"]);
        let Begin::Fresh(answered) = t.begin("a", "k1", fp).await else {
            panic!()
        };
        let Begin::Fresh(pending) = t.begin("a", "k2", fp).await else {
            panic!()
        };
        let Begin::Fresh(released) = t.begin("b", "k1", fp).await else {
            panic!()
        };
        t.flush().await;
        assert_eq!(t.keys_held(), 3, "claims count at once");
        answered.complete(answer("a"));
        released.release();
        t.flush().await;
        assert_eq!(t.keys_held(), 2, "the released key is gone");
        // A pending key stays held while its request runs.
        drop(pending);
        if path.is_some() {
            drop(t);
            let t = open(path.clone(), clock.clone());
            assert_eq!(t.keys_held(), 2, "counted from the file at start");
            clock.advance(DAY_MS);
            t.sweep();
            t.flush().await;
            assert_eq!(t.keys_held(), 0, "expired keys swept");
        } else {
            clock.advance(DAY_MS);
            assert_eq!(t.keys_held(), 2, "expired keys count until the sweep");
            t.sweep();
            assert_eq!(t.keys_held(), 0, "expired keys swept");
        }
    }

    #[tokio::test]
    async fn keys_held_in_memory() {
        keys_held_follows_the_table(Table::Memory).await;
    }

    #[tokio::test]
    async fn keys_held_in_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        keys_held_follows_the_table(Table::Sqlite(dir.path().join("keys.db"))).await;
    }

    #[tokio::test]
    async fn a_waiting_retry_gets_the_first_answer() {
        let clock = Arc::new(ManualClock::new(1_000));
        let t = Arc::new(open(Table::Memory, clock));
        let fp = fingerprint(&[b"x"]);
        let Begin::Fresh(claim) = t.begin("a", "k", fp).await else {
            panic!()
        };
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.begin("a", "k", fp).await })
        };
        tokio::task::yield_now().await;
        claim.complete(answer("once"));
        match waiter.await.unwrap() {
            Begin::Replay(a) => assert_eq!(a.body, b"once"),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn keys_and_fingerprints() {
        assert!(valid_key(b"3f2a-uuid"));
        assert!(!valid_key(b""));
        assert!(!valid_key(b"has space"));
        assert!(!valid_key(&[b'a'; 256]));
        assert!(valid_key(&[b'a'; 255]));
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
        assert_eq!(
            sibling_path(Path::new("/var/lib/tollgate.db")),
            Path::new("/var/lib/tollgate.idempotency.db")
        );
    }
}
