//! The idempotency key table in the PostgreSQL store's database
//! (`idempotency_keys`, created by the store's migrations): the same rows
//! and rules as the SQLite key file, behind the same writer thread.
//!
//! Owns one session, used by the key writer thread only (never by a tokio
//! task). A batch is one transaction. Failure modes: the server is down or
//! the session broke → the batch fails as a whole (claims are refused with
//! `store_unavailable` before their request runs; answers not stored leave
//! their keys pending → 409, never a second charge), and the next batch
//! reconnects.
//!
//! With `cluster:` the same session serves the shared key thread instead
//! ([`SharedTable`]): one statement per operation, committed on its own;
//! a failed statement fails its operation only (a claim → `store_unavailable`
//! before its request runs; an answer or a release not stored → the key
//! stays pending → 409), and the next statement reconnects.

use postgres::{Client, GenericClient};

use super::table::{KeyRow, KeyTable, KeyTx, SharedTable};
use super::{Fingerprint, Scope, StoredAnswer};
use crate::store::pg::{describe, PgSettings, TableSession};

pub(super) struct PgTable {
    session: TableSession,
}

impl PgTable {
    pub(super) fn open(settings: &PgSettings) -> Result<PgTable, String> {
        let session =
            TableSession::open(settings, "keys", 2, "the idempotency key table is missing")?;
        Ok(PgTable { session })
    }
}

impl KeyTable for PgTable {
    fn count(&mut self) -> Result<usize, String> {
        let client = self.session.client()?;
        let n = client.query_one("SELECT count(*) FROM idempotency_keys", &[]);
        let n: i64 = n.map_err(|e| self.session.failed(&e))?.get(0);
        Ok(n.max(0) as usize)
    }

    fn transaction(
        &mut self,
        ops: &mut dyn FnMut(&mut dyn KeyTx) -> Result<(), String>,
    ) -> Result<(), String> {
        let url = self.session.settings().url.clone();
        let client = self.session.client()?;
        let mut broken: Option<postgres::Error> = None;
        let result = (|| {
            let mut tx = client
                .transaction()
                .map_err(|e| url.redact(&describe(&e)))?;
            let mut keys = PgTx {
                tx: &mut tx,
                broken: &mut broken,
                url: &url,
            };
            ops(&mut keys)?;
            tx.commit().map_err(|e| url.redact(&describe(&e)))
        })();
        if let (Err(_), Some(e)) = (&result, &broken) {
            self.session.failed(e);
        }
        if result.is_err() {
            self.session.forget_if(false);
        }
        result
    }
}

struct PgTx<'a, C: GenericClient> {
    /// A transaction (the writer's batches) or the session itself
    /// (autocommit: the shared table).
    tx: &'a mut C,
    /// The first error, kept so the table can tell whether the session
    /// survived it.
    broken: &'a mut Option<postgres::Error>,
    url: &'a crate::store::pg::PgUrl,
}

impl<C: GenericClient> PgTx<'_, C> {
    fn fail(&mut self, e: postgres::Error) -> String {
        let text = self.url.redact(&describe(&e));
        self.broken.get_or_insert(e);
        text
    }
}

impl<C: GenericClient> KeyTx for PgTx<'_, C> {
    fn find(&mut self, scope: &Scope) -> Result<Option<KeyRow>, String> {
        let row = self.tx.query_opt(
            "SELECT fingerprint, state, status, headers, body, expires_unix_ms
             FROM idempotency_keys WHERE account = $1 AND key = $2",
            &[&scope.0, &scope.1],
        );
        let row = row.map_err(|e| self.fail(e))?;
        Ok(row.map(|r| KeyRow {
            fingerprint: r.get(0),
            state: r.get(1),
            status: r
                .get::<_, Option<i32>>(2)
                .and_then(|s| u16::try_from(s).ok()),
            headers: r.get(3),
            body: r.get(4),
            expires_unix_ms: r.get(5),
        }))
    }

    fn insert_pending(
        &mut self,
        scope: &Scope,
        fingerprint: &Fingerprint,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<(), String> {
        let done = self.tx.execute(
            "INSERT INTO idempotency_keys
             (account, key, fingerprint, state, created_unix_ms, expires_unix_ms)
             VALUES ($1, $2, $3, 'pending', $4, $5)",
            &[&scope.0, &scope.1, &&fingerprint[..], &now_ms, &expires_ms],
        );
        done.map(|_| ()).map_err(|e| self.fail(e))
    }

    fn complete(
        &mut self,
        scope: &Scope,
        answer: &StoredAnswer,
        headers: &str,
    ) -> Result<(), String> {
        let done = self.tx.execute(
            "UPDATE idempotency_keys SET state = 'done', status = $3, headers = $4, body = $5
             WHERE account = $1 AND key = $2",
            &[
                &scope.0,
                &scope.1,
                &i32::from(answer.status),
                &headers,
                &answer.body,
            ],
        );
        done.map(|_| ()).map_err(|e| self.fail(e))
    }

    fn delete(&mut self, scope: &Scope) -> Result<usize, String> {
        let n = self.tx.execute(
            "DELETE FROM idempotency_keys WHERE account = $1 AND key = $2",
            &[&scope.0, &scope.1],
        );
        n.map(|n| n as usize).map_err(|e| self.fail(e))
    }

    fn delete_expired(&mut self, now_ms: i64) -> Result<usize, String> {
        let n = self.tx.execute(
            "DELETE FROM idempotency_keys WHERE expires_unix_ms <= $1",
            &[&now_ms],
        );
        n.map(|n| n as usize).map_err(|e| self.fail(e))
    }
}

impl PgTable {
    /// Runs `op` on the session itself (each statement commits on its
    /// own); a failure that broke the session drops it.
    fn autocommit<T>(
        &mut self,
        op: impl FnOnce(&mut PgTx<'_, Client>) -> Result<T, String>,
    ) -> Result<T, String> {
        let url = self.session.settings().url.clone();
        let mut broken: Option<postgres::Error> = None;
        let client = self.session.client()?;
        let result = op(&mut PgTx {
            tx: client,
            broken: &mut broken,
            url: &url,
        });
        if let Some(e) = &broken {
            self.session.failed(e);
        }
        result
    }
}

impl SharedTable for PgTable {
    fn count(&mut self) -> Result<usize, String> {
        KeyTable::count(self)
    }

    fn insert_pending(
        &mut self,
        scope: &Scope,
        fingerprint: &Fingerprint,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<bool, String> {
        self.autocommit(|t| {
            // The primary key decides between nodes: a concurrent insert of
            // the same key waits for the other's commit, then does nothing.
            let n = t.tx.execute(
                "INSERT INTO idempotency_keys
                 (account, key, fingerprint, state, created_unix_ms, expires_unix_ms)
                 VALUES ($1, $2, $3, 'pending', $4, $5)
                 ON CONFLICT (account, key) DO NOTHING",
                &[&scope.0, &scope.1, &&fingerprint[..], &now_ms, &expires_ms],
            );
            n.map(|n| n == 1).map_err(|e| t.fail(e))
        })
    }

    fn find(&mut self, scope: &Scope) -> Result<Option<KeyRow>, String> {
        self.autocommit(|t| t.find(scope))
    }

    fn delete_if_expired(&mut self, scope: &Scope, now_ms: i64) -> Result<usize, String> {
        self.autocommit(|t| {
            let n = t.tx.execute(
                "DELETE FROM idempotency_keys
                 WHERE account = $1 AND key = $2 AND expires_unix_ms <= $3",
                &[&scope.0, &scope.1, &now_ms],
            );
            n.map(|n| n as usize).map_err(|e| t.fail(e))
        })
    }

    fn complete(
        &mut self,
        scope: &Scope,
        fingerprint: &Fingerprint,
        answer: &StoredAnswer,
        headers: &str,
    ) -> Result<bool, String> {
        self.autocommit(|t| {
            let n = t.tx.execute(
                "UPDATE idempotency_keys SET state = 'done', status = $4, headers = $5, body = $6
                 WHERE account = $1 AND key = $2 AND fingerprint = $3 AND state = 'pending'",
                &[
                    &scope.0,
                    &scope.1,
                    &&fingerprint[..],
                    &i32::from(answer.status),
                    &headers,
                    &answer.body,
                ],
            );
            n.map(|n| n == 1).map_err(|e| t.fail(e))
        })
    }

    fn release(&mut self, scope: &Scope, fingerprint: &Fingerprint) -> Result<usize, String> {
        self.autocommit(|t| {
            let n = t.tx.execute(
                "DELETE FROM idempotency_keys
                 WHERE account = $1 AND key = $2 AND fingerprint = $3 AND state = 'pending'",
                &[&scope.0, &scope.1, &&fingerprint[..]],
            );
            n.map(|n| n as usize).map_err(|e| t.fail(e))
        })
    }

    fn delete_expired(&mut self, now_ms: i64) -> Result<usize, String> {
        self.autocommit(|t| t.delete_expired(now_ms))
    }
}
