//! The key table behind [`super::Idempotency`]: what it holds for a
//! scope ([`Found`]), in memory or durable. A durable table (SQLite or
//! PostgreSQL, behind [`KeyTable`]) is written by one thread in
//! group-committed batches; a claim is answered only after its batch is
//! committed. It decides no answer: [`super::Idempotency`] turns what it
//! found into a [`super::Begin`].
//!
//! With `cluster:` the PostgreSQL table is shared by every node
//! ([`SharedKeys`]): one thread of its own runs each operation as its own
//! statement, committed when it returns (no batch, so no claim waits for
//! another's transaction and two nodes' claims never deadlock), and a
//! claim is decided by the primary key (`INSERT ... ON CONFLICT DO
//! NOTHING`), not by this process's memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::{Fingerprint, Scope, StoredAnswer};

/// What the table holds for a scope.
#[derive(Debug)]
pub(super) enum Found {
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

pub(super) enum Backend {
    /// SQLite or PostgreSQL, behind the key writer thread.
    Durable(DurableKeys),
    /// The PostgreSQL table every node of a cluster shares.
    Shared(SharedKeys),
    Memory(Mutex<MemoryKeys>),
}

impl Backend {
    pub(super) async fn begin(
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
            Backend::Shared(s) => s.claim(scope, fingerprint, now_ms, expires_ms, false).await,
        }
    }

    /// [`Self::begin`] again for a key found pending: reads the row first
    /// (one statement while it stays pending) and claims it only if it is
    /// gone or expired. Only the shared table calls it: elsewhere a
    /// pending row no request of this process holds is interrupted.
    pub(super) async fn poll(
        &self,
        scope: &Scope,
        fingerprint: Fingerprint,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<Found, String> {
        match self {
            Backend::Shared(s) => s.claim(scope, fingerprint, now_ms, expires_ms, true).await,
            _ => self.begin(scope, fingerprint, now_ms, expires_ms).await,
        }
    }

    /// Whether a pending row may belong to a request running on another
    /// node (then it is waited for, not answered `Interrupted`).
    pub(super) fn shared(&self) -> bool {
        matches!(self, Backend::Shared(_))
    }

    pub(super) fn complete(&self, scope: &Scope, fingerprint: Fingerprint, answer: StoredAnswer) {
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
            Backend::Shared(s) => {
                s.send(SharedOp::Complete {
                    scope: scope.clone(),
                    fingerprint,
                    answer,
                });
            }
        }
    }

    pub(super) fn release(&self, scope: &Scope, fingerprint: Fingerprint) {
        match self {
            Backend::Memory(m) => {
                m.lock().rows.remove(scope);
            }
            Backend::Durable(s) => {
                s.send(Op::Release {
                    scope: scope.clone(),
                });
            }
            Backend::Shared(s) => {
                s.send(SharedOp::Release {
                    scope: scope.clone(),
                    fingerprint,
                });
            }
        }
    }

    pub(super) fn sweep(&self, now_ms: i64) {
        match self {
            Backend::Memory(m) => m.lock().rows.retain(|_, r| r.expires_ms > now_ms),
            Backend::Durable(s) => {
                s.send(Op::Sweep { now_ms });
            }
            Backend::Shared(s) => {
                s.send(SharedOp::Sweep { now_ms });
            }
        }
    }
}

pub(super) struct MemoryRow {
    fingerprint: Fingerprint,
    /// `None` while pending.
    answer: Option<StoredAnswer>,
    expires_ms: i64,
}

pub(super) struct MemoryKeys {
    pub(super) rows: HashMap<Scope, MemoryRow>,
    pub(super) max_keys: usize,
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

pub(super) enum Op {
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
pub(super) struct DurableKeys {
    tx: Mutex<std_mpsc::Sender<Op>>,
    /// The writer's row count as of its last committed batch, published
    /// for [`super::Idempotency::keys_held`].
    pub(super) rows: Arc<AtomicUsize>,
}

/// A stored key row, as either table holds it.
pub(super) struct KeyRow {
    pub(super) fingerprint: Vec<u8>,
    pub(super) state: String,
    pub(super) status: Option<u16>,
    /// JSON `[[name, value], ...]`.
    pub(super) headers: Option<String>,
    pub(super) body: Option<Vec<u8>>,
    pub(super) expires_unix_ms: i64,
}

/// The statements of one key transaction, on SQLite or PostgreSQL.
pub(super) trait KeyTx {
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
pub(super) trait KeyTable: Send {
    fn count(&mut self) -> Result<usize, String>;
    fn transaction(
        &mut self,
        ops: &mut dyn FnMut(&mut dyn KeyTx) -> Result<(), String>,
    ) -> Result<(), String>;
}

/// Most operations committed in one transaction.
const BATCH_MAX_OPS: usize = 512;

impl DurableKeys {
    /// Starts the writer thread over `table`.
    pub(super) fn start(
        mut table: Box<dyn KeyTable>,
        max_keys: usize,
    ) -> Result<DurableKeys, String> {
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
    pub(super) fn send(&self, op: Op) -> bool {
        self.tx.lock().send(op).is_ok()
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
            return Ok(row.found());
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

impl KeyRow {
    /// What a live row holds.
    fn found(self) -> Found {
        let mut stored = [0u8; 32];
        if self.fingerprint.len() == 32 {
            stored.copy_from_slice(&self.fingerprint);
        }
        match (self.state.as_str(), self.status) {
            ("done", Some(status)) => Found::Done {
                fingerprint: stored,
                answer: StoredAnswer {
                    status,
                    headers: self
                        .headers
                        .and_then(|h| serde_json::from_str(&h).ok())
                        .unwrap_or_default(),
                    body: self.body.unwrap_or_default(),
                },
            },
            _ => Found::Pending {
                fingerprint: stored,
            },
        }
    }
}

// ---------------------------------------------------------------------------
// The table every node of a cluster shares (PostgreSQL): one statement per
// operation, each committed on its own.
// ---------------------------------------------------------------------------

/// The statements on the shared table, each committed when it returns
/// (autocommit). Used by the shared key thread only.
pub(super) trait SharedTable: Send {
    /// Rows in the table (every node's).
    fn count(&mut self) -> Result<usize, String>;
    /// Inserts a pending row unless the scope has one: true if inserted.
    fn insert_pending(
        &mut self,
        scope: &Scope,
        fingerprint: &Fingerprint,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<bool, String>;
    fn find(&mut self, scope: &Scope) -> Result<Option<KeyRow>, String>;
    /// Deletes the scope's row if it expired by `now_ms`.
    fn delete_if_expired(&mut self, scope: &Scope, now_ms: i64) -> Result<usize, String>;
    /// Stores the answer in the scope's pending row with `fingerprint`;
    /// false if there is none (the row was swept and taken since).
    fn complete(
        &mut self,
        scope: &Scope,
        fingerprint: &Fingerprint,
        answer: &StoredAnswer,
        headers: &str,
    ) -> Result<bool, String>;
    /// Deletes the scope's pending row with `fingerprint`.
    fn release(&mut self, scope: &Scope, fingerprint: &Fingerprint) -> Result<usize, String>;
    fn delete_expired(&mut self, now_ms: i64) -> Result<usize, String>;
}

pub(super) enum SharedOp {
    Claim {
        scope: Scope,
        fingerprint: Fingerprint,
        now_ms: i64,
        expires_ms: i64,
        /// Read the row before trying to insert one (a poll of a key
        /// found pending).
        look_first: bool,
        reply: oneshot::Sender<Result<Found, String>>,
    },
    /// Touches only the pending row with the claim's fingerprint.
    Complete {
        scope: Scope,
        fingerprint: Fingerprint,
        answer: StoredAnswer,
    },
    Release {
        scope: Scope,
        fingerprint: Fingerprint,
    },
    Sweep {
        now_ms: i64,
    },
    Flush(oneshot::Sender<()>),
}

/// The handle on the shared table: its thread's queue.
pub(super) struct SharedKeys {
    tx: Mutex<std_mpsc::Sender<SharedOp>>,
    /// Rows in the table as last counted (at start, at each sweep, when
    /// full), plus this node's claims since, less its releases: every
    /// node's keys count against `max_keys`, approximately between sweeps.
    pub(super) rows: Arc<AtomicUsize>,
}

/// Most attempts of one claim: the row can vanish between the insert that
/// found it and the read (released, swept), and be claimed again by another
/// node between the read and the next insert; each round is a real race.
const CLAIM_ROUNDS: usize = 4;

impl SharedKeys {
    /// Starts the shared key thread over `table`.
    pub(super) fn start(
        mut table: Box<dyn SharedTable>,
        max_keys: usize,
    ) -> Result<SharedKeys, String> {
        let rows = Arc::new(AtomicUsize::new(table.count()?));
        let (tx, rx) = std_mpsc::channel();
        let mut worker = SharedWorker {
            table,
            max_keys,
            rows: rows.clone(),
        };
        std::thread::Builder::new()
            .name("tollgate-idempotency-shared".into())
            .spawn(move || {
                while let Ok(op) = rx.recv() {
                    worker.run(op);
                }
            })
            .map_err(|e| format!("starting the shared key thread: {e}"))?;
        Ok(SharedKeys {
            tx: Mutex::new(tx),
            rows,
        })
    }

    /// Queues an operation; false if the thread is gone.
    pub(super) fn send(&self, op: SharedOp) -> bool {
        self.tx.lock().send(op).is_ok()
    }

    async fn claim(
        &self,
        scope: &Scope,
        fingerprint: Fingerprint,
        now_ms: i64,
        expires_ms: i64,
        look_first: bool,
    ) -> Result<Found, String> {
        let (tx, rx) = oneshot::channel();
        if !self.send(SharedOp::Claim {
            scope: scope.clone(),
            fingerprint,
            now_ms,
            expires_ms,
            look_first,
            reply: tx,
        }) {
            return Err("the shared key thread has stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| Err("the shared key thread has stopped".into()))
    }
}

struct SharedWorker {
    table: Box<dyn SharedTable>,
    max_keys: usize,
    rows: Arc<AtomicUsize>,
}

impl SharedWorker {
    fn run(&mut self, op: SharedOp) {
        match op {
            SharedOp::Claim {
                scope,
                fingerprint,
                now_ms,
                expires_ms,
                look_first,
                reply,
            } => {
                let found = self.claim(&scope, fingerprint, now_ms, expires_ms, look_first);
                if let Err(e) = &found {
                    tracing::error!(error = %e, "idempotency key claim failed");
                }
                // A request that went away before it could run leaves its
                // row pending (409 for retries), as a dropped claim does.
                let _ = reply.send(found);
            }
            SharedOp::Complete {
                scope,
                fingerprint,
                answer,
            } => {
                let headers =
                    serde_json::to_string(&answer.headers).unwrap_or_else(|_| "[]".into());
                match self.table.complete(&scope, &fingerprint, &answer, &headers) {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!(
                        account = %scope.0,
                        "an idempotency key's row was gone when its answer was stored"
                    ),
                    // The row stays pending: retries get 409, never a
                    // second run.
                    Err(e) => tracing::error!(error = %e, "storing an idempotency answer failed"),
                }
            }
            SharedOp::Release { scope, fingerprint } => {
                match self.table.release(&scope, &fingerprint) {
                    Ok(n) => self.forget(n),
                    // The row stays pending: retries get 409 until it
                    // expires, never a run of their own while it may be
                    // held (fail closed).
                    Err(e) => tracing::error!(error = %e, "releasing an idempotency key failed"),
                }
            }
            SharedOp::Sweep { now_ms } => {
                let swept = self
                    .table
                    .delete_expired(now_ms)
                    .and_then(|_| self.table.count());
                match swept {
                    Ok(n) => self.rows.store(n, Ordering::Relaxed),
                    Err(e) => tracing::error!(error = %e, "idempotency key sweep failed"),
                }
            }
            SharedOp::Flush(done) => {
                let _ = done.send(());
            }
        }
    }

    fn forget(&self, n: usize) {
        let _ = self
            .rows
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                Some(r.saturating_sub(n))
            });
    }

    fn claim(
        &mut self,
        scope: &Scope,
        fingerprint: Fingerprint,
        now_ms: i64,
        expires_ms: i64,
        look_first: bool,
    ) -> Result<Found, String> {
        let mut look = look_first;
        for _ in 0..CLAIM_ROUNDS {
            // A full table still answers the keys it holds.
            if look || self.rows.load(Ordering::Relaxed) >= self.max_keys {
                match self.table.find(scope)? {
                    Some(row) if row.expires_unix_ms > now_ms => return Ok(row.found()),
                    Some(_) => {
                        let n = self.table.delete_if_expired(scope, now_ms)?;
                        self.forget(n);
                    }
                    None => {}
                }
            }
            look = true;
            if self.rows.load(Ordering::Relaxed) >= self.max_keys {
                self.table.delete_expired(now_ms)?;
                self.rows.store(self.table.count()?, Ordering::Relaxed);
                if self.rows.load(Ordering::Relaxed) >= self.max_keys {
                    return Ok(Found::Full);
                }
            }
            if self
                .table
                .insert_pending(scope, &fingerprint, now_ms, expires_ms)?
            {
                self.rows.fetch_add(1, Ordering::Relaxed);
                return Ok(Found::Inserted);
            }
        }
        Err("the key changed hands too often to be claimed; retry".into())
    }
}
