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

use postgres::Client;

use super::table::{KeyRow, KeyTable, KeyTx};
use super::{Fingerprint, Scope, StoredAnswer};
use crate::store::pg::{describe, schema, session_broken, PgSettings};

pub(super) struct PgTable {
    settings: PgSettings,
    /// `None` after the session ended; the next batch reconnects.
    client: Option<Client>,
}

impl PgTable {
    /// Connects and checks that the store's migrations created the table
    /// (`tollgate run` opens the ledger store, which migrates, first).
    pub(super) fn open(settings: &PgSettings) -> Result<PgTable, String> {
        let mut table = PgTable {
            settings: settings.clone(),
            client: None,
        };
        let settings = settings.clone();
        let client = table.client()?;
        let report = schema::report(client, &settings).map_err(|e| e.to_string())?;
        if report.current < 2 {
            return Err(format!(
                "{}: the idempotency key table is missing (schema version {}); start tollgate \
                 with this store.url once so that it migrates the store",
                settings.url, report.current
            ));
        }
        Ok(table)
    }

    fn client(&mut self) -> Result<&mut Client, String> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            let client = self
                .settings
                .connect("keys", Some(self.settings.statement_timeout))
                .map_err(|e| e.to_string())?;
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    fn failed(&mut self, e: &postgres::Error) -> String {
        if session_broken(e) {
            self.client = None;
        }
        self.settings.url.redact(&describe(e))
    }
}

impl KeyTable for PgTable {
    fn count(&mut self) -> Result<usize, String> {
        let client = self.client()?;
        let n = client.query_one("SELECT count(*) FROM idempotency_keys", &[]);
        let n: i64 = n.map_err(|e| self.failed(&e))?.get(0);
        Ok(n.max(0) as usize)
    }

    fn transaction(
        &mut self,
        ops: &mut dyn FnMut(&mut dyn KeyTx) -> Result<(), String>,
    ) -> Result<(), String> {
        let url = self.settings.url.clone();
        let client = self.client()?;
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
            self.failed(e);
        }
        if result.is_err() && self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        result
    }
}

struct PgTx<'a, 'b> {
    tx: &'a mut postgres::Transaction<'b>,
    /// The first error, kept so the table can tell whether the session
    /// survived it.
    broken: &'a mut Option<postgres::Error>,
    url: &'a crate::store::pg::PgUrl,
}

impl PgTx<'_, '_> {
    fn fail(&mut self, e: postgres::Error) -> String {
        let text = self.url.redact(&describe(&e));
        self.broken.get_or_insert(e);
        text
    }
}

impl KeyTx for PgTx<'_, '_> {
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
