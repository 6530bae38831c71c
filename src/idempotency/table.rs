//! The key table behind [`super::Idempotency`]: what it holds for a
//! scope ([`Found`]), in memory or durable. A durable table (SQLite or
//! PostgreSQL, behind [`KeyTable`]) is written by one thread in
//! group-committed batches; a claim is answered only after its batch is
//! committed. It decides no answer: [`super::Idempotency`] turns what it
//! found into a [`super::Begin`].

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
        }
    }

    pub(super) fn complete(&self, scope: &Scope, answer: StoredAnswer) {
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

    pub(super) fn release(&self, scope: &Scope) {
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

    pub(super) fn sweep(&self, now_ms: i64) {
        match self {
            Backend::Memory(m) => m.lock().rows.retain(|_, r| r.expires_ms > now_ms),
            Backend::Durable(s) => {
                s.send(Op::Sweep { now_ms });
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
