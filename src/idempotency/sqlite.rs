//! The SQLite key file (`idempotency.path`): the key table in a file of
//! its own, WAL with `synchronous=FULL`, so a claim is durable when its
//! batch commits. Used by the key writer thread only.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::store::sqlite::open_side_file;

use super::table::{KeyRow, KeyTable, KeyTx};
use super::{Fingerprint, Scope, StoredAnswer};

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

/// The SQLite key file.
pub(super) struct SqliteTable {
    conn: Connection,
}

impl SqliteTable {
    pub(super) fn open(path: &Path) -> Result<SqliteTable, String> {
        let conn = open_side_file(path, SCHEMA)?;
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
