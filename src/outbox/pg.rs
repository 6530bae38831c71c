//! The outbox tables in the PostgreSQL store's database (`outbox_items`,
//! `outbox_state`, created by the store's migration 3): the same rows and
//! rules as the SQLite outbox file, behind the same writer thread.
//!
//! Owns one session, used by the outbox writer thread only. A batch is one
//! transaction. Failure modes: the server is down or the session broke →
//! the batch fails as a whole (producers refuse their causes; finishes are
//! retried by the relay), and the next batch reconnects.

use super::{
    headers_from_json, headers_json, Finish, Item, ItemState, KindStats, NewItem, OutboxTable,
    OutboxTx,
};
use crate::store::pg::{describe, session_broken, PgSettings, PgUrl, TableSession};

pub(super) struct PgTable {
    session: TableSession,
}

impl PgTable {
    pub(super) fn open(settings: &PgSettings) -> Result<PgTable, String> {
        let session = TableSession::open(settings, "outbox", 3, "the outbox tables are missing")?;
        Ok(PgTable { session })
    }
}

impl OutboxTable for PgTable {
    fn transaction(
        &mut self,
        ops: &mut dyn FnMut(&mut dyn OutboxTx) -> Result<(), String>,
    ) -> Result<(), String> {
        let url = self.session.settings().url.clone();
        let client = self.session.client()?;
        let mut broken = false;
        let result = (|| {
            let mut tx = client
                .transaction()
                .map_err(|e| url.redact(&describe(&e)))?;
            let mut t = PgTx {
                tx: &mut tx,
                broken: &mut broken,
                url: &url,
            };
            ops(&mut t)?;
            tx.commit().map_err(|e| url.redact(&describe(&e)))
        })();
        if result.is_err() {
            self.session.forget_if(broken);
        }
        result
    }
}

struct PgTx<'a, 'b> {
    tx: &'a mut postgres::Transaction<'b>,
    broken: &'a mut bool,
    url: &'a PgUrl,
}

impl PgTx<'_, '_> {
    fn fail(&mut self, e: postgres::Error) -> String {
        if session_broken(&e) {
            *self.broken = true;
        }
        self.url.redact(&describe(&e))
    }
}

const ITEM_COLUMNS: &str = "id, kind, target, method, headers, body, dedupe_key, state, attempts,
    created_unix_ms, next_attempt_unix_ms, last_error";

fn item_from_row(r: &postgres::Row) -> Item {
    let headers: String = r.get(4);
    let state: String = r.get(7);
    Item {
        id: r.get(0),
        kind: r.get(1),
        target: r.get(2),
        method: r.get(3),
        headers: headers_from_json(&headers),
        body: r.get(5),
        dedupe_key: r.get(6),
        state: ItemState::parse(&state).unwrap_or(ItemState::GaveUp),
        attempts: r.get::<_, i32>(8).max(0) as u32,
        created_unix_ms: r.get(9),
        next_attempt_unix_ms: r.get(10),
        last_error: r.get(11),
    }
}

impl OutboxTx for PgTx<'_, '_> {
    fn find_key(&mut self, key: &str) -> Result<Option<(i64, ItemState)>, String> {
        let row = self.tx.query_opt(
            "SELECT id, state FROM outbox_items WHERE dedupe_key = $1",
            &[&key],
        );
        let row = row.map_err(|e| self.fail(e))?;
        Ok(row.map(|r| {
            let state: String = r.get(1);
            (
                r.get(0),
                ItemState::parse(&state).unwrap_or(ItemState::GaveUp),
            )
        }))
    }

    fn insert(&mut self, item: &NewItem, now_ms: i64) -> Result<i64, String> {
        let row = self.tx.query_one(
            "INSERT INTO outbox_items (kind, target, method, headers, body, dedupe_key, state,
                attempts, created_unix_ms, next_attempt_unix_ms)
             VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7) RETURNING id",
            &[
                &item.kind,
                &item.target,
                &item.method,
                &headers_json(&item.headers),
                &item.body,
                &item.dedupe_key,
                &now_ms,
            ],
        );
        row.map(|r| r.get(0)).map_err(|e| self.fail(e))
    }

    fn finish(&mut self, id: i64, attempts: u32, how: &Finish, now_ms: i64) -> Result<(), String> {
        let (state, next, finished, error): (&str, i64, Option<i64>, Option<&str>) = match how {
            Finish::Done => ("done", now_ms, Some(now_ms), None),
            Finish::Retry {
                next_unix_ms,
                error,
            } => ("pending", *next_unix_ms, None, Some(error.as_str())),
            Finish::GaveUp { error } => ("gave_up", now_ms, Some(now_ms), Some(error.as_str())),
        };
        let attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
        let done = self.tx.execute(
            "UPDATE outbox_items SET state = $2, attempts = $3, next_attempt_unix_ms = $4,
                finished_unix_ms = $5, last_error = COALESCE($6, last_error)
             WHERE id = $1 AND state = 'pending'",
            &[&id, &state, &attempts, &next, &finished, &error],
        );
        done.map(|_| ()).map_err(|e| self.fail(e))
    }

    fn put_state(&mut self, ns: &str, key: &str, value: &[u8]) -> Result<(), String> {
        let done = self.tx.execute(
            "INSERT INTO outbox_state (namespace, key, value) VALUES ($1, $2, $3)
             ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value",
            &[&ns, &key, &value],
        );
        done.map(|_| ()).map_err(|e| self.fail(e))
    }

    fn delete_state(&mut self, ns: &str, key: &str) -> Result<(), String> {
        let done = self.tx.execute(
            "DELETE FROM outbox_state WHERE namespace = $1 AND key = $2",
            &[&ns, &key],
        );
        done.map(|_| ()).map_err(|e| self.fail(e))
    }

    fn due(&mut self, now_ms: i64, limit: usize) -> Result<Vec<Item>, String> {
        let rows = self.tx.query(
            &format!(
                "SELECT {ITEM_COLUMNS} FROM outbox_items
                 WHERE state = 'pending' AND next_attempt_unix_ms <= $1
                 ORDER BY next_attempt_unix_ms, id LIMIT $2"
            ),
            &[&now_ms, &(limit as i64)],
        );
        let rows = rows.map_err(|e| self.fail(e))?;
        Ok(rows.iter().map(item_from_row).collect())
    }

    fn list(&mut self, state: ItemState, limit: usize) -> Result<Vec<Item>, String> {
        let rows = self.tx.query(
            &format!(
                "SELECT {ITEM_COLUMNS} FROM outbox_items WHERE state = $1 ORDER BY id LIMIT $2"
            ),
            &[&state.as_str(), &(limit as i64)],
        );
        let rows = rows.map_err(|e| self.fail(e))?;
        Ok(rows.iter().map(item_from_row).collect())
    }

    fn stats(&mut self) -> Result<Vec<(String, KindStats)>, String> {
        let rows = self.tx.query(
            "SELECT kind,
                SUM(CASE WHEN state = 'pending' THEN 1 ELSE 0 END)::BIGINT,
                MIN(CASE WHEN state = 'pending' THEN created_unix_ms END),
                SUM(CASE WHEN state = 'gave_up' THEN 1 ELSE 0 END)::BIGINT
             FROM outbox_items GROUP BY kind",
            &[],
        );
        let rows = rows.map_err(|e| self.fail(e))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    KindStats {
                        pending: r.get::<_, i64>(1).max(0) as u64,
                        oldest_created_unix_ms: r.get(2),
                        given_up: r.get::<_, i64>(3).max(0) as u64,
                    },
                )
            })
            .collect())
    }

    fn state_rows(&mut self, ns: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        let rows = self.tx.query(
            "SELECT key, value FROM outbox_state WHERE namespace = $1 ORDER BY key",
            &[&ns],
        );
        let rows = rows.map_err(|e| self.fail(e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn purge_finished(&mut self, before_ms: i64) -> Result<usize, String> {
        let n = self.tx.execute(
            "DELETE FROM outbox_items WHERE state = 'done' AND finished_unix_ms < $1",
            &[&before_ms],
        );
        n.map(|n| n as usize).map_err(|e| self.fail(e))
    }

    fn pending_count(&mut self) -> Result<u64, String> {
        let n = self.tx.query_one(
            "SELECT count(*) FROM outbox_items WHERE state = 'pending'",
            &[],
        );
        let n: i64 = n.map_err(|e| self.fail(e))?.get(0);
        Ok(n.max(0) as u64)
    }
}
