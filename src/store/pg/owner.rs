//! The PostgreSQL side of store ownership ([`OwnerBackend`], see
//! [`crate::store::fence`]): one dedicated session, used only by the fence
//! keeper's thread (and once at start-up).
//!
//! - **Liveness lock**: the session advisory lock
//!   `pg_try_advisory_lock(OWNER_LOCK_KEY)` on this session. The server
//!   frees it when the session ends, however it ends: the process is
//!   killed (its socket closes), the connection breaks, the server
//!   restarts. Advisory locks are per database, so every store (database)
//!   has its own.
//! - **Claim**: `SELECT … FROM store_owner WHERE id = 1 FOR UPDATE`, then
//!   [`decide`](crate::store::fence::decide) and `UPDATE … SET token =
//!   token + 1`, in one transaction: two claimants serialise on the row.
//! - **Renew**: `UPDATE store_owner SET renewed_unix_ms = $1 … WHERE token
//!   = $3`; 0 rows: fenced. Each commit of the store runs the same token
//!   check in its own statement (see [`super::PgStore`]).
//!
//! # Failure modes
//! - The session dies while this process owns the store (PostgreSQL
//!   restarted, the connection was killed): the server has freed the lock.
//!   Nothing reconnects behind the fence's back while the lock was held:
//!   [`OwnerBackend::lock_lost`] reports it, the fence takes the lock again
//!   on a new session at its next renewal, and meanwhile renewals fail (and
//!   are counted). Between the server's restart and that renewal, a new
//!   `tollgate run` would find the lock free and the record saying "held",
//!   read that as a crashed owner and take over: this process is then
//!   fenced (safe, and the new owner serves).
//! - The server is slow or hung: every statement runs under a statement
//!   timeout of half the lease at most, so a renewal fails and is retried
//!   before the lease could run out behind it.

use std::time::Duration;

use postgres::Client;

use super::{describe, session_broken, PgSettings};
use crate::store::fence::{Claimed, FencingToken, OwnerBackend, OwnerRecord};
use crate::store::StoreError;

/// Key of the session advisory lock of a store's owner (`tollgat` in
/// ASCII, then 0).
pub const OWNER_LOCK_KEY: i64 = 0x746f_6c6c_6761_7400;

const SELECT_OWNER: &str =
    "SELECT token, pid, host, started_unix_ms, renewed_unix_ms, holds_lock, released
    FROM store_owner WHERE id = 1";

pub struct PgOwner {
    settings: PgSettings,
    statement_timeout: Duration,
    client: Option<Client>,
    /// This session holds the advisory lock.
    locked: bool,
    /// The session that held the lock ended; reported once by `lock_lost`.
    lost: bool,
}

impl std::fmt::Debug for PgOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOwner")
            .field("url", &self.settings.url)
            .field("locked", &self.locked)
            .finish()
    }
}

impl PgOwner {
    /// Opens the keeper's session; statements on it time out after half
    /// the lease (or `store.statement_timeout_ms`, if shorter).
    pub fn connect(settings: &PgSettings, lease: Duration) -> Result<PgOwner, StoreError> {
        let statement_timeout = settings
            .statement_timeout
            .min(lease / 2)
            .max(Duration::from_millis(100));
        let client = settings.connect("owner", Some(statement_timeout))?;
        Ok(PgOwner {
            settings: settings.clone(),
            statement_timeout,
            client: Some(client),
            locked: false,
            lost: false,
        })
    }

    /// The error of a statement; a session that cannot be used any more is
    /// dropped (and with it the lock it held, see `forget_closed`).
    fn err(&mut self, e: postgres::Error) -> StoreError {
        if session_broken(&e) {
            self.client = None;
            self.forget_closed();
        }
        StoreError::Postgres(self.settings.url.redact(&describe(&e)))
    }

    /// Notices a session that ended: if it held the lock, the lock is gone.
    fn forget_closed(&mut self) {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() && self.locked {
            self.locked = false;
            self.lost = true;
        }
    }

    /// The session, reconnected if it ended — but never while the lock is
    /// believed held: the fence must first learn it lost the lock.
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        self.forget_closed();
        if self.lost {
            return Err(StoreError::Unavailable(
                "the session holding the store's lock ended (PostgreSQL restarted or the \
                 connection broke); the lock is taken again at the next renewal"
                    .into(),
            ));
        }
        if self.client.is_none() {
            let client = self
                .settings
                .connect("owner", Some(self.statement_timeout))?;
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// The owner record as stored.
    pub fn owner_record(&mut self) -> Result<OwnerRecord, StoreError> {
        let client = self.client()?;
        let row = client.query_one(SELECT_OWNER, &[]);
        let row = row.map_err(|e| self.err(e))?;
        Ok(owner_from_row(&row))
    }
}

/// Reads the owner record over `client`.
pub(super) fn read_owner(client: &mut impl postgres::GenericClient) -> Option<OwnerRecord> {
    client
        .query_one(SELECT_OWNER, &[])
        .ok()
        .map(|r| owner_from_row(&r))
}

fn owner_from_row(r: &postgres::Row) -> OwnerRecord {
    OwnerRecord {
        token: FencingToken(r.get::<_, i64>(0).max(0) as u64),
        pid: r.get::<_, i64>(1).clamp(0, u32::MAX.into()) as u32,
        host: r.get(2),
        started_unix_ms: r.get(3),
        renewed_unix_ms: r.get(4),
        holds_lock: r.get(5),
        released: r.get(6),
    }
}

/// The claim's transaction (see [`OwnerBackend::claim`]).
fn claim_in(
    client: &mut Client,
    choose: &mut dyn FnMut(&OwnerRecord) -> Option<OwnerRecord>,
) -> Result<Claimed, postgres::Error> {
    let mut tx = client.transaction()?;
    let row = tx.query_one(&format!("{SELECT_OWNER} FOR UPDATE"), &[])?;
    let previous = owner_from_row(&row);
    let Some(mut owner) = choose(&previous) else {
        tx.rollback()?;
        return Ok(Claimed {
            previous,
            owner: None,
        });
    };
    let token: i64 = tx
        .query_one(
            "UPDATE store_owner SET token = token + 1, pid = $1, host = $2,
                started_unix_ms = $3, renewed_unix_ms = $4, holds_lock = $5, released = false
             WHERE id = 1 RETURNING token",
            &[
                &i64::from(owner.pid),
                &owner.host,
                &owner.started_unix_ms,
                &owner.renewed_unix_ms,
                &owner.holds_lock,
            ],
        )?
        .get(0);
    tx.commit()?;
    owner.token = FencingToken(token.max(0) as u64);
    Ok(Claimed {
        previous,
        owner: Some(owner),
    })
}

fn token_to_sql(token: FencingToken) -> i64 {
    token.0 as i64
}

impl OwnerBackend for PgOwner {
    fn try_lock(&mut self) -> Result<bool, StoreError> {
        self.forget_closed();
        // A new session: the old one's lock is gone with it.
        self.lost = false;
        if self.locked {
            // Advisory locks count: never take it twice on one session.
            return Ok(true);
        }
        let client = self.client()?;
        let got = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&OWNER_LOCK_KEY])
            .map(|r| r.get::<_, bool>(0));
        let got = got.map_err(|e| self.err(e))?;
        self.locked = got;
        Ok(got)
    }

    fn unlock(&mut self) {
        self.forget_closed();
        self.lost = false;
        if !self.locked {
            return;
        }
        self.locked = false;
        if let Some(client) = self.client.as_mut() {
            if let Err(e) = client.query_one("SELECT pg_advisory_unlock($1)", &[&OWNER_LOCK_KEY]) {
                // Closing the session frees it for sure.
                tracing::warn!(error = %self.settings.url.redact(&describe(&e)), "unlocking the store's advisory lock; closing its session");
                self.client = None;
            }
        }
    }

    fn lock_lost(&mut self) -> bool {
        self.forget_closed();
        std::mem::take(&mut self.lost)
    }

    fn claim(
        &mut self,
        choose: &mut dyn FnMut(&OwnerRecord) -> Option<OwnerRecord>,
    ) -> Result<Claimed, StoreError> {
        let client = self.client()?;
        let claimed = claim_in(client, choose);
        claimed.map_err(|e| self.err(e))
    }

    fn renew(
        &mut self,
        token: FencingToken,
        now_unix_ms: i64,
        holds_lock: bool,
    ) -> Result<(), StoreError> {
        let client = self.client()?;
        let changed = client.execute(
            "UPDATE store_owner SET renewed_unix_ms = $1, holds_lock = $2 WHERE id = 1 AND token = $3",
            &[&now_unix_ms, &holds_lock, &token_to_sql(token)],
        );
        match changed {
            Ok(1) => Ok(()),
            Ok(_) => Err(StoreError::Fenced {
                owner: read_owner(client).map(Box::new),
            }),
            Err(e) => Err(self.err(e)),
        }
    }

    fn release(&mut self, token: FencingToken, now_unix_ms: i64) -> Result<(), StoreError> {
        // 0 rows: another process owns it already; nothing to give up.
        let client = self.client()?;
        let done = client.execute(
            "UPDATE store_owner SET released = true, holds_lock = false, renewed_unix_ms = $1
             WHERE id = 1 AND token = $2",
            &[&now_unix_ms, &token_to_sql(token)],
        );
        done.map(|_| ()).map_err(|e| self.err(e))
    }
}
