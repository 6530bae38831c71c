//! The SQLite outbox file (`outbox.path`): WAL, `synchronous=FULL`, one
//! connection, used by the outbox writer thread only.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::store::sqlite::open_side_file;

use super::{
    headers_from_json, headers_json, Finish, Item, ItemState, KindStats, NewItem, OutboxTable,
    OutboxTx,
};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox_items (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    kind                 TEXT    NOT NULL,
    target               TEXT    NOT NULL,
    method               TEXT    NOT NULL,
    headers              TEXT    NOT NULL,   -- JSON [[name, value], ...]
    body                 BLOB    NOT NULL,
    dedupe_key           TEXT    NOT NULL UNIQUE,
    state                TEXT    NOT NULL,   -- pending | done | gave_up
    attempts             INTEGER NOT NULL DEFAULT 0,
    created_unix_ms      INTEGER NOT NULL,
    next_attempt_unix_ms INTEGER NOT NULL,
    finished_unix_ms     INTEGER,
    last_error           TEXT
);
CREATE INDEX IF NOT EXISTS outbox_items_due ON outbox_items (state, next_attempt_unix_ms);
CREATE TABLE IF NOT EXISTS outbox_state (
    namespace TEXT NOT NULL,
    key       TEXT NOT NULL,
    value     BLOB NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
";

pub(super) struct SqliteTable {
    conn: Connection,
}

impl SqliteTable {
    pub(super) fn open(path: &Path) -> Result<SqliteTable, String> {
        let conn = open_side_file(path, SCHEMA)?;
        Ok(SqliteTable { conn })
    }
}

impl OutboxTable for SqliteTable {
    fn transaction(
        &mut self,
        ops: &mut dyn FnMut(&mut dyn OutboxTx) -> Result<(), String>,
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

const ITEM_COLUMNS: &str = "id, kind, target, method, headers, body, dedupe_key, state, attempts,
    created_unix_ms, next_attempt_unix_ms, last_error";

fn item_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Item> {
    let headers: String = r.get(4)?;
    let state: String = r.get(7)?;
    Ok(Item {
        id: r.get(0)?,
        kind: r.get(1)?,
        target: r.get(2)?,
        method: r.get(3)?,
        headers: headers_from_json(&headers),
        body: r.get(5)?,
        dedupe_key: r.get(6)?,
        state: ItemState::parse(&state).unwrap_or(ItemState::GaveUp),
        attempts: r.get::<_, i64>(8)?.clamp(0, u32::MAX.into()) as u32,
        created_unix_ms: r.get(9)?,
        next_attempt_unix_ms: r.get(10)?,
        last_error: r.get(11)?,
    })
}

fn err(e: rusqlite::Error) -> String {
    e.to_string()
}

impl OutboxTx for SqliteTx<'_> {
    fn find_key(&mut self, key: &str) -> Result<Option<(i64, ItemState)>, String> {
        self.0
            .prepare_cached("SELECT id, state FROM outbox_items WHERE dedupe_key = ?1")
            .and_then(|mut s| {
                s.query_row([key], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
            })
            .optional()
            .map(|o| o.map(|(id, s)| (id, ItemState::parse(&s).unwrap_or(ItemState::GaveUp))))
            .map_err(err)
    }

    fn insert(&mut self, item: &NewItem, now_ms: i64) -> Result<i64, String> {
        self.0
            .prepare_cached(
                "INSERT INTO outbox_items (kind, target, method, headers, body, dedupe_key, state,
                    attempts, created_unix_ms, next_attempt_unix_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', 0, ?7, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    item.kind,
                    item.target,
                    item.method,
                    headers_json(&item.headers),
                    item.body,
                    item.dedupe_key,
                    now_ms
                ])
            })
            .map_err(err)?;
        Ok(self.0.last_insert_rowid())
    }

    fn finish(&mut self, id: i64, attempts: u32, how: &Finish, now_ms: i64) -> Result<(), String> {
        let (state, next, finished, error) = match how {
            Finish::Done => ("done", now_ms, Some(now_ms), None),
            Finish::Retry {
                next_unix_ms,
                error,
            } => ("pending", *next_unix_ms, None, Some(error.as_str())),
            Finish::GaveUp { error } => ("gave_up", now_ms, Some(now_ms), Some(error.as_str())),
        };
        // Only a pending item moves: a finish can never revive a done one.
        self.0
            .prepare_cached(
                "UPDATE outbox_items SET state = ?2, attempts = ?3, next_attempt_unix_ms = ?4,
                    finished_unix_ms = ?5, last_error = COALESCE(?6, last_error)
                 WHERE id = ?1 AND state = 'pending'",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id,
                    state,
                    i64::from(attempts),
                    next,
                    finished,
                    error
                ])
            })
            .map(|_| ())
            .map_err(err)
    }

    fn put_state(&mut self, ns: &str, key: &str, value: &[u8]) -> Result<(), String> {
        self.0
            .prepare_cached(
                "INSERT INTO outbox_state (namespace, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut s| s.execute(params![ns, key, value]))
            .map(|_| ())
            .map_err(err)
    }

    fn delete_state(&mut self, ns: &str, key: &str) -> Result<(), String> {
        self.0
            .prepare_cached("DELETE FROM outbox_state WHERE namespace = ?1 AND key = ?2")
            .and_then(|mut s| s.execute(params![ns, key]))
            .map(|_| ())
            .map_err(err)
    }

    fn due(&mut self, now_ms: i64, limit: usize) -> Result<Vec<Item>, String> {
        let mut stmt = self
            .0
            .prepare_cached(&format!(
                "SELECT {ITEM_COLUMNS} FROM outbox_items
                 WHERE state = 'pending' AND next_attempt_unix_ms <= ?1
                 ORDER BY next_attempt_unix_ms, id LIMIT ?2"
            ))
            .map_err(err)?;
        let rows = stmt
            .query_map(params![now_ms, limit as i64], item_from_row)
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    fn list(&mut self, state: ItemState, limit: usize) -> Result<Vec<Item>, String> {
        let mut stmt = self
            .0
            .prepare_cached(&format!(
                "SELECT {ITEM_COLUMNS} FROM outbox_items WHERE state = ?1 ORDER BY id LIMIT ?2"
            ))
            .map_err(err)?;
        let rows = stmt
            .query_map(params![state.as_str(), limit as i64], item_from_row)
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    fn stats(&mut self) -> Result<Vec<(String, KindStats)>, String> {
        let mut stmt = self
            .0
            .prepare_cached(
                "SELECT kind,
                    SUM(CASE WHEN state = 'pending' THEN 1 ELSE 0 END),
                    MIN(CASE WHEN state = 'pending' THEN created_unix_ms END),
                    SUM(CASE WHEN state = 'gave_up' THEN 1 ELSE 0 END)
                 FROM outbox_items GROUP BY kind",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    KindStats {
                        pending: r.get::<_, i64>(1)?.max(0) as u64,
                        oldest_created_unix_ms: r.get(2)?,
                        given_up: r.get::<_, i64>(3)?.max(0) as u64,
                    },
                ))
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    fn state_rows(&mut self, ns: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        let mut stmt = self
            .0
            .prepare_cached("SELECT key, value FROM outbox_state WHERE namespace = ?1 ORDER BY key")
            .map_err(err)?;
        let rows = stmt
            .query_map([ns], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    fn purge_finished(&mut self, before_ms: i64) -> Result<usize, String> {
        self.0
            .execute(
                "DELETE FROM outbox_items WHERE state = 'done' AND finished_unix_ms < ?1",
                [before_ms],
            )
            .map_err(err)
    }

    fn pending_count(&mut self) -> Result<u64, String> {
        self.0
            .query_row(
                "SELECT COUNT(*) FROM outbox_items WHERE state = 'pending'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(err)
    }
}
