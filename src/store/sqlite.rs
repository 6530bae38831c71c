//! The embedded SQLite [`Store`]: one file under `store.path`, WAL mode,
//! `synchronous=FULL` with `durability: sync` (a commit survives power
//! loss) and `NORMAL` with `durability: async` (survives a process crash;
//! the last commits may be lost on power loss).
//!
//! Owns the schema and its version. One connection, used by one thread (the
//! writer) or by an offline tool; readers such as `tollgate ledger export`
//! may open their own connection while tollgate runs
//! ([`SqliteStore::open_snapshot`]: one read transaction, so WAL gives them
//! one consistent snapshot without blocking the writer), and so does
//! start-up, one per restoring thread, before the writer starts. Readers
//! take no ownership. It must never be used from an async task.
//!
//! Ownership ([`super::fence`]): `tollgate run` opens the store with
//! [`SqliteStore::open_owned`], which takes an OS lock on `<path>.lock`
//! ([`SqliteOwner`]) and a new fencing token in `store_owner`; every commit
//! of that store checks the token in its own `BEGIN IMMEDIATE` transaction
//! (and renews the lease with the same `UPDATE`), so a commit by a process
//! that lost the store writes nothing and fails with
//! [`StoreError::Fenced`].
//!
//! Schema (version 2):
//! - `schema_version(version)` — one row.
//! - `entries(seq PK, kind, account, bucket, amount_milli, reservation_id,
//!   reference, tariff_version, at_unix_ms)` — the journal.
//! - `accounts(name PK, parent, role, tariff_class, {anytime,offpeak}_
//!   {posted,reserved}_milli)` — the balances as the sum of the committed
//!   entries (see the `store` module docs).
//! - `open_reservations(id PK, account, anytime_milli, offpeak_milli,
//!   reference, tariff_version, created_unix_ms)`.
//! - `store_owner(id = 1, token, pid, host, started_unix_ms,
//!   renewed_unix_ms, holds_lock, released)` — one row: who owns the store
//!   and under which fencing token (see [`super::fence`]). Added by version
//!   2; a version-1 store is migrated in place when `tollgate run` opens
//!   it, and the offline readers ([`SqliteStore::open_existing`]) read both
//!   versions without migrating.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};

use super::batch::Folded;
use super::fence::{
    Claimant, Claimed, CommitGuard, Fence, FencingToken, OwnerBackend, OwnerRecord,
};
use super::{AccountMeta, Loaded, Store, StoreError};
use crate::config::Durability;
use crate::ledger::{
    AccountView, Bucket, BucketBalance, Clock, Entry, EntryKind, ReadyAccount, ReservationId,
    ReservationState, ReservationView, Role,
};

/// The schema this build writes (it reads every version from 1 up).
pub const SCHEMA_VERSION: i64 = 2;

const SCHEMA_V1: &str = "
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE entries (
    seq            INTEGER PRIMARY KEY,
    kind           TEXT    NOT NULL,
    account        TEXT    NOT NULL,
    bucket         TEXT    NOT NULL,
    amount_milli   INTEGER NOT NULL,
    reservation_id INTEGER,
    reference      TEXT,
    tariff_version TEXT,
    at_unix_ms     INTEGER NOT NULL
);
CREATE TABLE accounts (
    name                   TEXT PRIMARY KEY,
    parent                 TEXT,
    role                   TEXT    NOT NULL,
    tariff_class           TEXT,
    anytime_posted_milli   INTEGER NOT NULL DEFAULT 0,
    anytime_reserved_milli INTEGER NOT NULL DEFAULT 0,
    offpeak_posted_milli   INTEGER NOT NULL DEFAULT 0,
    offpeak_reserved_milli INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE open_reservations (
    id              INTEGER PRIMARY KEY,
    account         TEXT    NOT NULL,
    anytime_milli   INTEGER NOT NULL,
    offpeak_milli   INTEGER NOT NULL,
    reference       TEXT,
    tariff_version  TEXT,
    created_unix_ms INTEGER NOT NULL
);
";

/// Version 1 → 2: the owner record. The row starts released with token 0
/// ("never owned"), so the first owner's token is 1.
const MIGRATE_V1_V2: &str = "
CREATE TABLE store_owner (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    token           INTEGER NOT NULL,
    pid             INTEGER NOT NULL,
    host            TEXT    NOT NULL,
    started_unix_ms INTEGER NOT NULL,
    renewed_unix_ms INTEGER NOT NULL,
    holds_lock      INTEGER NOT NULL,
    released        INTEGER NOT NULL
);
INSERT INTO store_owner
    (id, token, pid, host, started_unix_ms, renewed_unix_ms, holds_lock, released)
    VALUES (1, 0, 0, '', 0, 0, 0, 1);
UPDATE schema_version SET version = 2;
";

const INSERT_ENTRY: &str = "INSERT INTO entries
    (seq, kind, account, bucket, amount_milli, reservation_id, reference, tariff_version, at_unix_ms)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

const UPSERT_ACCOUNT: &str = "INSERT INTO accounts
    (name, parent, role, tariff_class,
     anytime_posted_milli, anytime_reserved_milli, offpeak_posted_milli, offpeak_reserved_milli)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
    ON CONFLICT(name) DO UPDATE SET
     anytime_posted_milli   = anytime_posted_milli   + excluded.anytime_posted_milli,
     anytime_reserved_milli = anytime_reserved_milli + excluded.anytime_reserved_milli,
     offpeak_posted_milli   = offpeak_posted_milli   + excluded.offpeak_posted_milli,
     offpeak_reserved_milli = offpeak_reserved_milli + excluded.offpeak_reserved_milli";

const UPSERT_RESERVATION: &str = "INSERT INTO open_reservations
    (id, account, anytime_milli, offpeak_milli, reference, tariff_version, created_unix_ms)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
    ON CONFLICT(id) DO UPDATE SET
     anytime_milli = anytime_milli + excluded.anytime_milli,
     offpeak_milli = offpeak_milli + excluded.offpeak_milli";

const DELETE_RESERVATION: &str = "DELETE FROM open_reservations WHERE id = ?1";

const SELECT_ACCOUNTS: &str = "SELECT name, parent, role, tariff_class,
    anytime_posted_milli, anytime_reserved_milli, offpeak_posted_milli, offpeak_reserved_milli
    FROM accounts ORDER BY parent IS NOT NULL, name";

/// [`Store::load`]'s read of the accounts: one scan in table order.
/// [`SELECT_ACCOUNTS`]'s `ORDER BY` makes SQLite sort every row first, which
/// took most of a 10 M-account start-up; parents are put before children
/// in memory instead.
const SELECT_ACCOUNTS_FOR_LOAD: &str = "SELECT name, parent, role, tariff_class,
    anytime_posted_milli, anytime_reserved_milli, offpeak_posted_milli, offpeak_reserved_milli
    FROM accounts";

/// Start-up's read of one part of the accounts (SPEC 6, issue 8: 10 M
/// accounts in under 10 s): a range of rowids, one scan of that part of the
/// table, so that several threads each read and restore their own part.
const SELECT_ACCOUNTS_PART: &str = "SELECT name, parent, role, tariff_class,
    anytime_posted_milli, anytime_reserved_milli, offpeak_posted_milli, offpeak_reserved_milli
    FROM accounts WHERE rowid >= ?1 AND rowid < ?2";

/// Most accounts [`SqliteStore::account_count_hint`] reports, so a store
/// with odd rowids cannot make start-up reserve absurd amounts of memory.
pub const ACCOUNT_COUNT_HINT_MAX: usize = 1 << 28;

/// How long a statement waits for another connection's lock (an export
/// checkpointing, a second process) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct SqliteStore {
    conn: Connection,
    /// Set when a commit failed: the next commit first checks whether the
    /// failed attempt reached disk anyway (its first seq is present), so a
    /// retry never applies a batch's deltas twice.
    last_commit_failed: bool,
    /// The owner's token, checked inside every commit; `None` for a store
    /// opened without ownership (offline tools, tests, benchmarks).
    owner: Option<CommitGuard>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.conn.path())
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating it and its directory if needed) the store tollgate
    /// runs with.
    pub fn open(path: &Path, durability: Durability) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("creating store directory {}: {e}", dir.display()),
                    )
                })?;
            }
        }
        let conn = Connection::open(path)?;
        let synchronous = match durability {
            Durability::Sync => "FULL",
            Durability::Async => "NORMAL",
        };
        Self::configure(&conn, synchronous)?;
        let mut store = SqliteStore {
            conn,
            last_commit_failed: false,
            owner: None,
        };
        store.migrate()?;
        Ok(store)
    }

    /// Opens the store tollgate runs with (as [`Self::open`]) and takes
    /// ownership of it before anything is read: the liveness lock on
    /// `<path>.lock` and a new fencing token, which every commit of the
    /// returned store checks. Fails with [`StoreError::Owned`] when a live
    /// process owns it. Start the returned fence's keeper at once (it
    /// renews the lease).
    pub fn open_owned(
        path: &Path,
        durability: Durability,
        lease: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<(SqliteStore, Fence), StoreError> {
        let mut store = Self::open(path, durability)?;
        let backend = SqliteOwner::open(path, lease)?;
        let me = Claimant::this_process(clock.now_unix_ms());
        let fence = Fence::acquire(Box::new(backend), &me, lease, clock)?;
        store.owner = Some(fence.commit_guard());
        Ok((store, fence))
    }

    /// Opens an existing store for the offline tools; never creates one.
    pub fn open_existing(path: &Path) -> Result<SqliteStore, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.display().to_string()));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let store = SqliteStore {
            conn,
            last_commit_failed: false,
            owner: None,
        };
        match schema_version(&store.conn)? {
            // Readers need no owner record: version 1 reads as well.
            Some(1..=SCHEMA_VERSION) => Ok(store),
            Some(found) if found > SCHEMA_VERSION => Err(StoreError::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            }),
            Some(found) => Err(StoreError::Corrupt(format!(
                "unknown schema version {found}"
            ))),
            None => Err(StoreError::Corrupt(format!(
                "{} is not a tollgate store (no schema_version table)",
                path.display()
            ))),
        }
    }

    /// [`Self::open_existing`] inside one read transaction, for `tollgate
    /// ledger export|verify` beside a running owner: every read sees the
    /// same snapshot (WAL), however many commits the owner makes meanwhile,
    /// and the reader never blocks the writer. It takes no ownership and
    /// never writes. While it reads, checkpoints cannot pass its snapshot,
    /// so the `-wal` file grows until it is done.
    pub fn open_snapshot(path: &Path) -> Result<SqliteStore, StoreError> {
        let store = Self::open_existing(path)?;
        // A deferred transaction takes its snapshot at its first read.
        store.conn.execute_batch("BEGIN DEFERRED")?;
        store
            .conn
            .query_row("SELECT COUNT(*) FROM schema_version", [], |r| {
                r.get::<_, i64>(0)
            })?;
        Ok(store)
    }

    fn configure(conn: &Connection, synchronous: &str) -> Result<(), StoreError> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!(
                "could not switch the journal to WAL mode (got {mode})"
            )));
        }
        conn.execute_batch(&format!(
            "PRAGMA synchronous={synchronous}; PRAGMA foreign_keys=OFF;"
        ))?;
        Ok(())
    }

    /// Creates the schema, or migrates an older one in place. The version
    /// is read inside the migrating transaction (`BEGIN IMMEDIATE`), so two
    /// processes opening a new store at once cannot both create it.
    fn migrate(&mut self) -> Result<(), StoreError> {
        if schema_version(&self.conn)? == Some(SCHEMA_VERSION) {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        match schema_version(&tx)? {
            None => {
                tx.execute_batch(SCHEMA_V1)?;
                tx.execute("INSERT INTO schema_version (version) VALUES (1)", [])?;
                tx.execute_batch(MIGRATE_V1_V2)?;
            }
            Some(1) => {
                tx.execute_batch(MIGRATE_V1_V2)?;
                tracing::info!("store schema migrated from version 1 to 2 (owner record)");
            }
            Some(SCHEMA_VERSION) => {}
            Some(found) if found > SCHEMA_VERSION => {
                return Err(StoreError::SchemaTooNew {
                    found,
                    supported: SCHEMA_VERSION,
                })
            }
            Some(found) => {
                return Err(StoreError::Corrupt(format!(
                    "unknown schema version {found}"
                )))
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The raw connection, for tests that tamper with a store.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The store's owner record (any schema-2 store).
    pub fn owner_record(&self) -> Result<OwnerRecord, StoreError> {
        read_owner(&self.conn)
    }

    fn commit_inner(
        &mut self,
        entries: &[Entry],
        accounts: &[AccountMeta],
    ) -> Result<(), StoreError> {
        if let Some(guard) = &self.owner {
            guard.precheck()?;
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if self.last_commit_failed {
            let present: Option<i64> = tx
                .query_row(
                    "SELECT seq FROM entries WHERE seq = ?1",
                    [seq_to_sql(entries[0].seq)],
                    |r| r.get(0),
                )
                .optional()?;
            if present.is_some() {
                // The failed attempt committed after all (under this
                // owner's token: it was checked in that transaction);
                // batches are atomic, so all of it is there.
                return Ok(());
            }
        }
        // Under the owner's token: this transaction holds the write lock, so
        // no takeover can commit between the check and the COMMIT. The check
        // renews the lease too.
        let renewed = match &self.owner {
            Some(guard) => {
                let started = Instant::now();
                let now = guard.now_unix_ms();
                // Cached: one statement per commit, parsed once (callgrind:
                // preparing it was a tenth of a small batch's cost).
                let changed = tx
                    .prepare_cached(RENEW_OWNER)?
                    .execute(params![now, token_to_sql(guard.token)])?;
                if changed != 1 {
                    let owner = read_owner(&tx).ok();
                    guard.fenced(owner.clone());
                    // Dropping `tx` rolls back: nothing of the batch is written.
                    return Err(StoreError::Fenced {
                        owner: owner.map(Box::new),
                    });
                }
                Some((guard, started, now))
            }
            None => None,
        };

        // Fold the batch in memory first: per-account deltas and the net
        // effect on open reservations (see `batch`).
        let folded = Folded::of(entries, accounts);
        {
            let mut insert = tx.prepare_cached(INSERT_ENTRY)?;
            for e in entries {
                insert.execute(params![
                    seq_to_sql(e.seq),
                    e.kind.as_str(),
                    e.account,
                    e.bucket.as_str(),
                    e.amount_milli,
                    e.reservation_id.map(seq_to_sql),
                    e.reference,
                    e.tariff_version,
                    e.at_unix_ms,
                ])?;
            }
            let mut upsert = tx.prepare_cached(UPSERT_ACCOUNT)?;
            for d in &folded.deltas {
                upsert.execute(params![
                    d.account,
                    d.meta.parent,
                    d.meta.role.as_str(),
                    d.meta.tariff_class,
                    d.anytime_posted_milli,
                    d.anytime_reserved_milli,
                    d.offpeak_posted_milli,
                    d.offpeak_reserved_milli,
                ])?;
            }
            let mut open = tx.prepare_cached(UPSERT_RESERVATION)?;
            for o in &folded.opened {
                open.execute(params![
                    seq_to_sql(o.id),
                    o.entry.account,
                    o.anytime_milli,
                    o.offpeak_milli,
                    o.entry.reference,
                    o.entry.tariff_version,
                    o.entry.at_unix_ms,
                ])?;
            }
            let mut delete = tx.prepare_cached(DELETE_RESERVATION)?;
            for id in &folded.resolved {
                delete.execute([seq_to_sql(*id)])?;
            }
        }
        tx.commit()?;
        if let Some((guard, started, now)) = renewed {
            guard.renewed(started, now);
        }
        Ok(())
    }
}

/// Renews the lease of the owner with token `?2` (0 rows: fenced).
const RENEW_OWNER: &str = "UPDATE store_owner SET renewed_unix_ms = ?1 WHERE id = 1 AND token = ?2";

fn token_to_sql(token: FencingToken) -> i64 {
    token.0 as i64
}

fn read_owner(conn: &Connection) -> Result<OwnerRecord, StoreError> {
    conn.query_row(
        "SELECT token, pid, host, started_unix_ms, renewed_unix_ms, holds_lock, released
         FROM store_owner WHERE id = 1",
        [],
        |r| {
            Ok(OwnerRecord {
                token: FencingToken(r.get::<_, i64>(0)?.max(0) as u64),
                pid: r.get::<_, i64>(1)?.clamp(0, u32::MAX.into()) as u32,
                host: r.get(2)?,
                started_unix_ms: r.get(3)?,
                renewed_unix_ms: r.get(4)?,
                holds_lock: r.get(5)?,
                released: r.get(6)?,
            })
        },
    )
    .optional()?
    .ok_or_else(|| StoreError::Corrupt("the store_owner row is missing".into()))
}

/// The lock file beside a store: `<store.path>.lock`.
pub fn lock_path(store_path: &Path) -> PathBuf {
    let mut name = store_path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// The SQLite side of store ownership ([`OwnerBackend`]): an exclusive OS
/// lock on `<store.path>.lock` (`flock`; the kernel frees it when the
/// process dies, however it dies) and a connection of its own for claims
/// and renewals, used by the fence keeper's thread (the writer has its
/// own). The lock file is never deleted: deleting it while a process holds
/// it would let a second process lock a new file of the same name (the
/// token check still stops the old owner's commits). The store must be on
/// a local file system: OS locks over network file systems are unreliable.
pub struct SqliteOwner {
    conn: Connection,
    lock: File,
    lock_path: PathBuf,
}

impl std::fmt::Debug for SqliteOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteOwner")
            .field("lock_path", &self.lock_path)
            .finish()
    }
}

impl SqliteOwner {
    /// Opens the lock file (creating it) and a connection to the store
    /// (which must exist, with schema 2). Claims are committed with
    /// `synchronous=FULL`, so a token is never handed out twice.
    pub fn open(store_path: &Path, lease: Duration) -> Result<SqliteOwner, StoreError> {
        let lock_path = lock_path(store_path);
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("opening the store's lock file {}: {e}", lock_path.display()),
                )
            })?;
        let conn = Connection::open_with_flags(
            store_path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // A renewal stuck behind another connection's write lock fails
        // within half a lease and is retried, rather than waiting past it.
        conn.busy_timeout((lease / 2).clamp(Duration::from_millis(10), BUSY_TIMEOUT))?;
        conn.execute_batch("PRAGMA synchronous=FULL;")?;
        Ok(SqliteOwner {
            conn,
            lock,
            lock_path,
        })
    }
}

impl OwnerBackend for SqliteOwner {
    fn try_lock(&mut self) -> Result<bool, StoreError> {
        match self.lock.try_lock() {
            Ok(()) => Ok(true),
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(e)) => Err(std::io::Error::new(
                e.kind(),
                format!("locking {}: {e}", self.lock_path.display()),
            )
            .into()),
        }
    }

    fn unlock(&mut self) {
        if let Err(e) = self.lock.unlock() {
            tracing::warn!(error = %e, path = %self.lock_path.display(), "unlocking the store's lock file");
        }
    }

    fn claim(
        &mut self,
        choose: &mut dyn FnMut(&OwnerRecord) -> Option<OwnerRecord>,
    ) -> Result<Claimed, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let previous = read_owner(&tx)?;
        let Some(mut owner) = choose(&previous) else {
            return Ok(Claimed {
                previous,
                owner: None,
            });
        };
        owner.token = FencingToken(previous.token.0 + 1);
        tx.execute(
            "UPDATE store_owner SET token = ?1, pid = ?2, host = ?3, started_unix_ms = ?4,
                renewed_unix_ms = ?5, holds_lock = ?6, released = 0
             WHERE id = 1",
            params![
                token_to_sql(owner.token),
                owner.pid,
                owner.host,
                owner.started_unix_ms,
                owner.renewed_unix_ms,
                owner.holds_lock,
            ],
        )?;
        tx.commit()?;
        Ok(Claimed {
            previous,
            owner: Some(owner),
        })
    }

    fn renew(
        &mut self,
        token: FencingToken,
        now_unix_ms: i64,
        holds_lock: bool,
    ) -> Result<(), StoreError> {
        let changed = self.conn.execute(
            "UPDATE store_owner SET renewed_unix_ms = ?1, holds_lock = ?2 WHERE id = 1 AND token = ?3",
            params![now_unix_ms, holds_lock, token_to_sql(token)],
        )?;
        if changed == 1 {
            return Ok(());
        }
        Err(StoreError::Fenced {
            owner: read_owner(&self.conn).ok().map(Box::new),
        })
    }

    fn release(&mut self, token: FencingToken, now_unix_ms: i64) -> Result<(), StoreError> {
        // 0 rows: another process owns it already; nothing to give up.
        self.conn.execute(
            "UPDATE store_owner SET released = 1, holds_lock = 0, renewed_unix_ms = ?1
             WHERE id = 1 AND token = ?2",
            params![now_unix_ms, token_to_sql(token)],
        )?;
        Ok(())
    }
}

/// The stored schema version; `None` when the file holds no tollgate
/// schema (a new store).
fn schema_version(conn: &Connection) -> Result<Option<i64>, StoreError> {
    let has_table: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version')",
        [],
        |r| r.get(0),
    )?;
    if !has_table {
        return Ok(None);
    }
    Ok(
        conn.query_row("SELECT MAX(version) FROM schema_version", [], |r| {
            r.get::<_, Option<i64>>(0)
        })?,
    )
}

/// Seqs and reservation ids are below 2^63 (the ledger counts from 1).
fn seq_to_sql(seq: u64) -> i64 {
    seq as i64
}

fn corrupt(what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("unknown {what} {value:?}").into(),
    )
}

fn role_from_row(row: &Row<'_>) -> rusqlite::Result<Role> {
    // Borrowed, not a `String` per row: start-up reads millions of these.
    let role = row.get_ref(2)?.as_str().unwrap_or("");
    Role::parse(role).ok_or_else(|| corrupt("role", role))
}

fn account_from_row(row: &Row<'_>) -> rusqlite::Result<AccountView> {
    let role = role_from_row(row)?;
    Ok(AccountView {
        name: row.get(0)?,
        parent: row.get(1)?,
        role,
        tariff_class: row.get(3)?,
        anytime: BucketBalance {
            posted_milli: row.get(4)?,
            reserved_milli: row.get(5)?,
        },
        offpeak: BucketBalance {
            posted_milli: row.get(6)?,
            reserved_milli: row.get(7)?,
        },
    })
}

/// [`account_from_row`] straight into the ledger's form, from borrowed
/// columns: no `String` per row (start-up reads millions).
fn ready_account_from_row(row: &Row<'_>) -> rusqlite::Result<ReadyAccount> {
    let text =
        |i: usize| -> rusqlite::Result<Option<&str>> { Ok(row.get_ref(i)?.as_str_or_null()?) };
    let name = text(0)?.ok_or_else(|| corrupt("account name", "NULL"))?;
    Ok(ReadyAccount::new(
        name,
        text(1)?,
        role_from_row(row)?,
        text(3)?,
        BucketBalance {
            posted_milli: row.get(4)?,
            reserved_milli: row.get(5)?,
        },
        BucketBalance {
            posted_milli: row.get(6)?,
            reserved_milli: row.get(7)?,
        },
    ))
}

fn entry_from_row(row: &Row<'_>) -> rusqlite::Result<Entry> {
    let kind: String = row.get(1)?;
    let bucket: String = row.get(3)?;
    Ok(Entry {
        seq: row.get::<_, i64>(0)? as u64,
        kind: EntryKind::parse(&kind).ok_or_else(|| corrupt("entry kind", &kind))?,
        account: row.get(2)?,
        bucket: Bucket::parse(&bucket).ok_or_else(|| corrupt("bucket", &bucket))?,
        amount_milli: row.get(4)?,
        reservation_id: row.get::<_, Option<i64>>(5)?.map(|v| v as u64),
        reference: row.get(6)?,
        tariff_version: row.get(7)?,
        at_unix_ms: row.get(8)?,
    })
}

impl SqliteStore {
    /// Visits every stored account, accounts without a parent first (the
    /// order of [`Loaded::accounts`]), in one scan of the table; the
    /// sub-accounts are held back until the scan ends. Stops at the
    /// visitor's first error.
    fn for_each_account(
        &mut self,
        visit: &mut dyn FnMut(AccountView) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut children = Vec::new();
        let mut stmt = self.conn.prepare(SELECT_ACCOUNTS_FOR_LOAD)?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let account = account_from_row(row)?;
            if account.parent.is_some() {
                children.push(account);
            } else {
                visit(account)?;
            }
        }
        children.into_iter().try_for_each(visit)
    }

    /// Visits the accounts of part `part` of `parts` (`part < parts`; the
    /// parts are disjoint and together hold every account), in no
    /// particular order, in the ledger's form built from borrowed columns:
    /// no `String` per row. For start-up, where each of several threads
    /// reads and restores one part. Stops at the visitor's first error.
    pub fn for_each_ready_account(
        &mut self,
        part: usize,
        parts: usize,
        visit: &mut dyn FnMut(ReadyAccount) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let parts = parts.max(1);
        let max_rowid: i64 =
            self.conn
                .query_row("SELECT COALESCE(MAX(rowid), 0) FROM accounts", [], |r| {
                    r.get(0)
                })?;
        // Part k starts at 1 + max·k/parts; the first and last parts are
        // open-ended, so odd rowids (≤ 0) are read too.
        let start = |k: usize| -> i64 {
            match k {
                0 => i64::MIN,
                k if k >= parts => i64::MAX,
                k => 1 + (i128::from(max_rowid) * k as i128 / parts as i128) as i64,
            }
        };
        let mut stmt = self.conn.prepare(SELECT_ACCOUNTS_PART)?;
        let mut rows = stmt.query([start(part), start(part + 1)])?;
        while let Some(row) = rows.next()? {
            visit(ready_account_from_row(row)?)?;
        }
        Ok(())
    }

    /// What [`Store::load`] returns but the accounts (left empty): the open
    /// reservations and the last seq. Start-up reads the accounts with
    /// [`SqliteStore::for_each_ready_account`].
    pub fn load_without_accounts(&mut self) -> Result<Loaded, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, account, anytime_milli, offpeak_milli, reference, tariff_version, created_unix_ms
             FROM open_reservations ORDER BY id",
        )?;
        let open_reservations = stmt
            .query_map([], |row| {
                let anytime_milli: i64 = row.get(2)?;
                let offpeak_milli: i64 = row.get(3)?;
                let total_milli = anytime_milli.saturating_add(offpeak_milli);
                Ok(ReservationView {
                    id: ReservationId(row.get::<_, i64>(0)? as u64),
                    account: row.get(1)?,
                    state: ReservationState::Open,
                    anytime_milli,
                    offpeak_milli,
                    total_milli,
                    shares_milli: vec![total_milli],
                    reference: row.get(4)?,
                    tariff_version: row.get(5)?,
                    created_unix_ms: row.get(6)?,
                    in_doubt_since_unix_ms: None,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let last_seq: i64 =
            self.conn
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM entries", [], |r| {
                    r.get(0)
                })?;
        Ok(Loaded {
            accounts: Vec::new(),
            open_reservations,
            last_seq: last_seq.max(0) as u64,
        })
    }

    /// About how many accounts the store holds, in O(log n) (`COUNT(*)`
    /// scans an index: 0.6 s at 10 M): account rows are never deleted, so
    /// the highest rowid, capped at [`ACCOUNT_COUNT_HINT_MAX`]. For sizing
    /// maps at start-up.
    pub fn account_count_hint(&self) -> Result<usize, StoreError> {
        let max: Option<i64> = self
            .conn
            .query_row("SELECT MAX(rowid) FROM accounts", [], |r| r.get(0))?;
        Ok(usize::try_from(max.unwrap_or(0))
            .unwrap_or(0)
            .min(ACCOUNT_COUNT_HINT_MAX))
    }
}

impl Store for SqliteStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        let mut accounts = Vec::new();
        self.for_each_account(&mut |account| {
            accounts.push(account);
            Ok(())
        })?;
        Ok(Loaded {
            accounts,
            ..self.load_without_accounts()?
        })
    }

    fn commit(&mut self, entries: &[Entry], accounts: &[AccountMeta]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let result = self.commit_inner(entries, accounts);
        self.last_commit_failed = result.is_err();
        result
    }

    fn for_each_entry(
        &mut self,
        visit: &mut dyn FnMut(Entry) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, kind, account, bucket, amount_milli, reservation_id, reference, tariff_version, at_unix_ms
             FROM entries ORDER BY seq",
        )?;
        let mut rows = stmt.query([])?;
        let mut n = 0u64;
        while let Some(row) = rows.next()? {
            visit(entry_from_row(row)?)?;
            n += 1;
        }
        Ok(n)
    }

    fn stored_balances(&mut self) -> Result<Vec<AccountView>, StoreError> {
        let mut stmt = self.conn.prepare(SELECT_ACCOUNTS)?;
        let rows = stmt
            .query_map([], account_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

/// Opens a file of tollgate's own beside the store (the idempotency keys,
/// the outbox), creating its directory, in WAL mode with
/// `synchronous=FULL`, and applies `schema` (idempotent `CREATE … IF NOT
/// EXISTS`). Errors name the file.
pub fn open_side_file(path: &Path, schema: &str) -> Result<Connection, String> {
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
    }
    let conn = Connection::open(path).map_err(|e| fail(&e))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| fail(&e))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(|e| fail(&e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(fail(&format!("could not switch to WAL (got {mode})")));
    }
    conn.execute_batch("PRAGMA synchronous=FULL;")
        .and_then(|_| conn.execute_batch(schema))
        .map_err(|e| fail(&e))?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{replay, ManualClock};
    use crate::store::fence::OwnReason;

    fn entry(
        seq: u64,
        kind: EntryKind,
        account: &str,
        amount_milli: i64,
        rid: Option<u64>,
    ) -> Entry {
        Entry {
            reference: Some(format!("r{seq}")),
            at_unix_ms: 1_700_000_000_000 + seq as i64,
            ..Entry::for_test(seq, kind, account, amount_milli, rid)
        }
    }

    fn meta(name: &str) -> AccountMeta {
        AccountMeta {
            name: name.into(),
            parent: None,
            role: Role::User,
            tariff_class: Some("gold".into()),
        }
    }

    fn all_entries(store: &mut SqliteStore) -> Vec<Entry> {
        let mut out = Vec::new();
        store
            .for_each_entry(&mut |e| {
                out.push(e);
                Ok(())
            })
            .unwrap();
        out
    }

    #[test]
    fn every_field_of_every_entry_survives_a_commit() {
        // Batches of several sizes, every optional field both set and not.
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("t.db"), Durability::Async).unwrap();
        let mut seq = 0u64;
        let mut expected = Vec::new();
        for size in [1, 31, 32, 71] {
            let batch: Vec<Entry> = (0..size)
                .map(|i| {
                    seq += 1;
                    let mut e = entry(
                        seq,
                        EntryKind::Add,
                        &format!("acct{}", i % 5),
                        i as i64 + 1,
                        None,
                    );
                    e.bucket = if i % 2 == 0 {
                        Bucket::Anytime
                    } else {
                        Bucket::OffPeak
                    };
                    e.reference = (i % 3 != 0).then(|| format!("ref-{seq}"));
                    e.tariff_version = (i % 4 == 0).then(|| format!("v{i}"));
                    e
                })
                .collect();
            let metas: Vec<_> = (0..5).map(|i| meta(&format!("acct{i}"))).collect();
            s.commit(&batch, &metas).unwrap();
            expected.extend(batch);
        }
        assert_eq!(all_entries(&mut s), expected);
    }

    #[test]
    fn creates_schema_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/t.db");
        let mut s = SqliteStore::open(&path, Durability::Sync).unwrap();
        assert_eq!(schema_version(&s.conn).unwrap(), Some(SCHEMA_VERSION));
        let mode: String = s
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = s
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL in sync mode");
        assert_eq!(s.load().unwrap(), Loaded::default());
        drop(s);
        let s = SqliteStore::open(&path, Durability::Async).unwrap();
        let sync: i64 = s
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 1, "NORMAL in async mode");
        drop(s);
        SqliteStore::open_existing(&path).unwrap();
    }

    #[test]
    fn a_version_1_store_is_read_as_is_and_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA_V1).unwrap();
        conn.execute("INSERT INTO schema_version (version) VALUES (1)", [])
            .unwrap();
        drop(conn);
        // Written the way a version-1 tollgate did: entries and balances.
        let mut v1 = SqliteStore {
            conn: Connection::open(&path).unwrap(),
            last_commit_failed: false,
            owner: None,
        };
        let batch = vec![
            entry(1, EntryKind::Add, "a", 5_000, None),
            entry(2, EntryKind::Reserve, "a", 1_000, Some(2)),
        ];
        v1.commit(&batch, &[meta("a")]).unwrap();
        drop(v1);

        // The offline readers read it without migrating it.
        let mut reader = SqliteStore::open_existing(&path).unwrap();
        assert_eq!(schema_version(&reader.conn).unwrap(), Some(1));
        assert_eq!(all_entries(&mut reader), batch);
        drop(reader);

        // `tollgate run` migrates it in place, keeping every row.
        let mut s = SqliteStore::open(&path, Durability::Sync).unwrap();
        assert_eq!(schema_version(&s.conn).unwrap(), Some(2));
        assert_eq!(all_entries(&mut s), batch);
        let loaded = s.load().unwrap();
        assert_eq!(loaded.last_seq, 2);
        assert_eq!(loaded.open_reservations.len(), 1);
        let report = crate::store::verify::verify(&mut s).unwrap();
        assert!(report.is_ok(crate::ledger::Overdraft::Strict), "{report}");
        let (token, released): (i64, bool) = s
            .conn
            .query_row(
                "SELECT token, released FROM store_owner WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((token, released), (0, true), "never owned yet");
        drop(s);
        // Opening again is a no-op, and readers read version 2 too.
        SqliteStore::open(&path, Durability::Sync).unwrap();
        let mut reader = SqliteStore::open_existing(&path).unwrap();
        assert_eq!(all_entries(&mut reader).len(), 2);
    }

    const LEASE: Duration = Duration::from_secs(5);

    fn owned(path: &Path, clock: &Arc<ManualClock>) -> Result<(SqliteStore, Fence), StoreError> {
        SqliteStore::open_owned(
            path,
            Durability::Sync,
            LEASE,
            clock.clone() as Arc<dyn Clock>,
        )
    }

    #[test]
    fn a_second_owner_is_refused_while_the_lease_is_fresh() {
        // Each open holds its own lock file descriptor, so two owners in one
        // process contend for the lock as two processes would.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let (_a, fence_a) = owned(&path, &clock).unwrap();
        assert_eq!(fence_a.token(), FencingToken(1));
        assert_eq!(fence_a.acquired().reason, OwnReason::Free);
        assert!(fence_a.acquired().holds_lock);
        assert!(lock_path(&path).exists());

        clock.advance(5_000); // exactly the lease: not yet stale
        match owned(&path, &clock) {
            Err(StoreError::Owned {
                owner,
                lease_age_ms,
                ..
            }) => {
                assert_eq!(owner.pid, std::process::id());
                assert_eq!(owner.token, FencingToken(1));
                assert_eq!(lease_age_ms, 5_000);
                let text = StoreError::Owned {
                    owner,
                    lease_age_ms,
                    lease: LEASE,
                }
                .to_string();
                assert!(
                    text.contains(&format!("pid {}", std::process::id())),
                    "{text}"
                );
            }
            other => panic!("expected Owned, got {other:?}"),
        }
        // The refused claim changed nothing.
        let record = SqliteStore::open_existing(&path)
            .unwrap()
            .owner_record()
            .unwrap();
        assert_eq!(record.token, FencingToken(1));
    }

    #[test]
    fn a_stale_lease_is_taken_over_and_the_old_owner_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let (mut a, mut fence_a) = owned(&path, &clock).unwrap();
        a.commit(&[entry(1, EntryKind::Add, "a", 1_000, None)], &[meta("a")])
            .unwrap();

        // A is paused: its lease is not renewed for longer than the lease.
        clock.advance(5_001);
        let (mut b, fence_b) = owned(&path, &clock).unwrap();
        assert_eq!(fence_b.token(), FencingToken(2));
        assert_eq!(fence_b.acquired().reason, OwnReason::LeaseExpired);
        assert!(!fence_b.acquired().holds_lock, "A still holds the lock");
        assert_eq!(fence_b.acquired().previous.token, FencingToken(1));

        // A resumes: a commit under its stale token fails and writes nothing.
        let stale = [
            entry(2, EntryKind::Add, "a", 7_000, None),
            entry(3, EntryKind::Reserve, "a", 500, Some(3)),
        ];
        match a.commit(&stale, &[meta("a")]) {
            Err(StoreError::Fenced { owner: Some(owner) }) => {
                assert_eq!(owner.token, FencingToken(2));
            }
            other => panic!("expected Fenced, got {other:?}"),
        }
        assert!(fence_a.watch().is_fenced());
        let mut reader = SqliteStore::open_existing(&path).unwrap();
        assert_eq!(all_entries(&mut reader).len(), 1);
        assert_eq!(
            reader.stored_balances().unwrap()[0].anytime.posted_milli,
            1_000
        );
        assert!(reader.load().unwrap().open_reservations.is_empty());
        // Every later attempt fails too, without touching the store.
        assert!(matches!(
            a.commit(&stale, &[meta("a")]),
            Err(StoreError::Fenced { .. })
        ));
        assert!(matches!(fence_a.renew(), Err(StoreError::Fenced { .. })));

        // B commits under its token; A lets go of the lock and B picks it up.
        b.commit(&[entry(2, EntryKind::Add, "a", 2_000, None)], &[meta("a")])
            .unwrap();
        fence_a.fenced(None);
        let mut fence_b = fence_b;
        fence_b.renew().unwrap();
        let record = reader.owner_record().unwrap();
        assert_eq!((record.token, record.holds_lock), (FencingToken(2), true));
        assert_eq!(all_entries(&mut reader).len(), 2);
        let report = crate::store::verify::verify(&mut reader).unwrap();
        assert!(report.is_ok(crate::ledger::Overdraft::Strict), "{report}");
    }

    #[test]
    fn a_dead_holder_frees_the_store_at_once_and_a_release_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let (a, fence_a) = owned(&path, &clock).unwrap();
        // Dropped without a release: as if killed (the lock is freed, the
        // record still says "held").
        drop((a, fence_a));
        clock.advance(10); // the lease is fresh
        let (b, fence_b) = owned(&path, &clock).unwrap();
        assert_eq!(fence_b.acquired().reason, OwnReason::HolderDied);
        assert_eq!(fence_b.token(), FencingToken(2));
        drop(b);
        // A clean release: the next owner finds the store free.
        fence_b.release().unwrap();
        let record = SqliteStore::open_existing(&path)
            .unwrap()
            .owner_record()
            .unwrap();
        assert!(record.released && !record.holds_lock);
        let (_c, fence_c) = owned(&path, &clock).unwrap();
        assert_eq!(fence_c.acquired().reason, OwnReason::Free);
        assert_eq!(fence_c.token(), FencingToken(3));
    }

    #[test]
    fn the_owner_that_took_over_keeps_the_store_from_a_process_with_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let (_a, fence_a) = owned(&path, &clock).unwrap();
        clock.advance(6_000);
        let (_b, _fence_b) = owned(&path, &clock).unwrap();
        // A goes away; the lock is free before B picked it up.
        drop(fence_a);
        clock.advance(100);
        assert!(matches!(
            owned(&path, &clock),
            Err(StoreError::Owned { .. })
        ));
        // The refused process let go of the lock again.
        let mut probe = SqliteOwner::open(&path, LEASE).unwrap();
        assert!(probe.try_lock().unwrap());
    }

    #[test]
    fn a_snapshot_reader_sees_one_consistent_state_while_the_owner_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let (mut owner, _fence) = owned(&path, &clock).unwrap();
        owner
            .commit(&[entry(1, EntryKind::Add, "a", 1_000, None)], &[meta("a")])
            .unwrap();
        let mut reader = SqliteStore::open_snapshot(&path).unwrap();
        // The owner commits between the reader's entry scan and its balance
        // read: the reader still sees the state of its first read.
        let entries = all_entries(&mut reader);
        owner
            .commit(&[entry(2, EntryKind::Add, "a", 2_000, None)], &[meta("a")])
            .unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(
            reader.stored_balances().unwrap()[0].anytime.posted_milli,
            1_000
        );
        let report = crate::store::verify::verify(&mut reader).unwrap();
        assert!(report.is_ok(crate::ledger::Overdraft::Strict), "{report}");
        assert_eq!(report.entries, 1);
        // A new snapshot sees the later commit.
        let mut later = SqliteStore::open_snapshot(&path).unwrap();
        assert_eq!(all_entries(&mut later).len(), 2);
    }

    #[test]
    fn refuses_newer_schema_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let s = SqliteStore::open(&path, Durability::Sync).unwrap();
        s.conn
            .execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        drop(s);
        assert!(matches!(
            SqliteStore::open(&path, Durability::Sync),
            Err(StoreError::SchemaTooNew { found: 99, .. })
        ));
        assert!(matches!(
            SqliteStore::open_existing(&path),
            Err(StoreError::SchemaTooNew { found: 99, .. })
        ));
        assert!(matches!(
            SqliteStore::open_existing(&dir.path().join("nope.db")),
            Err(StoreError::Missing(_))
        ));
    }

    #[test]
    fn balances_are_the_sum_of_committed_entries() {
        use EntryKind::*;
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("t.db"), Durability::Sync).unwrap();
        // Cross-account entries out of seq order, a reservation opened in one
        // batch and resolved in the next, one opened and resolved in a batch.
        let b1 = vec![
            entry(2, Add, "b", 5_000, None),
            entry(1, Add, "a", 10_000, None),
            entry(3, Reserve, "a", 3_000, Some(3)),
            entry(4, Reserve, "b", 1_000, Some(4)),
            entry(5, Void, "b", -1_000, Some(4)),
        ];
        s.commit(&b1, &[meta("a"), meta("b")]).unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.last_seq, 5);
        assert_eq!(loaded.open_reservations.len(), 1);
        let r = &loaded.open_reservations[0];
        assert_eq!((r.id, r.account.as_str()), (ReservationId(3), "a"));
        assert_eq!((r.anytime_milli, r.total_milli), (3_000, 3_000));
        assert_eq!(r.shares_milli, vec![3_000]);
        assert_eq!(r.reference.as_deref(), Some("r3"));
        // Start-up reads accounts in table order, not name order.
        let a = loaded.accounts.iter().find(|a| a.name == "a").unwrap();
        assert_eq!(a.tariff_class.as_deref(), Some("gold"));
        assert_eq!(
            a.anytime,
            BucketBalance {
                posted_milli: 10_000,
                reserved_milli: 3_000
            }
        );

        // An account the batch does not describe still gets a row.
        let b2 = vec![
            entry(6, Post, "a", -2_000, Some(3)),
            entry(7, Void, "a", -1_000, Some(3)),
            entry(8, Set, "c", 700, None),
        ];
        s.commit(&b2, &[meta("a")]).unwrap();
        let loaded = s.load().unwrap();
        assert!(loaded.open_reservations.is_empty());
        assert_eq!(loaded.last_seq, 8);
        let entries = all_entries(&mut s);
        assert_eq!(
            entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=8).collect::<Vec<_>>(),
            "seq order, whatever the commit order"
        );
        assert_eq!(entries[0], b1[1]);
        let replayed = replay(&entries);
        for acct in s.stored_balances().unwrap() {
            for b in Bucket::ALL {
                let want = replayed
                    .get(&(acct.name.clone(), b))
                    .copied()
                    .unwrap_or_default();
                assert_eq!(acct.bucket(b), want, "{} {b}", acct.name);
            }
        }
        let c = loaded.accounts.iter().find(|a| a.name == "c").unwrap();
        assert_eq!(c.role, Role::User);
    }

    #[test]
    fn a_retried_batch_that_did_commit_is_not_applied_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("t.db"), Durability::Sync).unwrap();
        let batch = vec![entry(1, EntryKind::Add, "a", 1_000, None)];
        s.commit(&batch, &[meta("a")]).unwrap();
        // Pretend the commit reported an error although it reached disk.
        s.last_commit_failed = true;
        s.commit(&batch, &[meta("a")]).unwrap();
        assert_eq!(all_entries(&mut s).len(), 1);
        assert_eq!(s.stored_balances().unwrap()[0].anytime.posted_milli, 1_000);
        // Without the flag, a duplicate seq is an error, not a silent skip.
        assert!(s.commit(&batch, &[meta("a")]).is_err());
        assert_eq!(s.stored_balances().unwrap()[0].anytime.posted_milli, 1_000);
    }

    #[test]
    fn parts_of_the_accounts_are_disjoint_and_cover_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("t.db"), Durability::Sync).unwrap();
        let names: Vec<String> = (0..25).map(|i| format!("acct{i:02}")).collect();
        let entries: Vec<Entry> = names
            .iter()
            .zip(1..)
            .map(|(n, seq)| entry(seq, EntryKind::Add, n, seq as i64, None))
            .collect();
        let metas: Vec<AccountMeta> = names.iter().map(|n| meta(n)).collect();
        s.commit(&entries, &metas).unwrap();
        // A row with an odd rowid is read too.
        s.conn
            .execute(
                "INSERT INTO accounts (rowid, name, role) VALUES (-5, 'odd', 'admin')",
                [],
            )
            .unwrap();
        assert_eq!(s.account_count_hint().unwrap(), 25);
        for parts in [1, 2, 3, 7, 40] {
            let mut seen = Vec::new();
            for part in 0..parts {
                s.for_each_ready_account(part, parts, &mut |a| {
                    seen.push(a.name().to_string());
                    Ok(())
                })
                .unwrap();
            }
            seen.sort();
            let mut want: Vec<String> = names.clone();
            want.push("odd".into());
            want.sort();
            assert_eq!(seen, want, "{parts} parts");
        }
        // What the ledger gets from a part is what `load` reads.
        let ledger = crate::ledger::Ledger::new(
            Default::default(),
            std::sync::Arc::new(crate::ledger::NullSink),
            std::sync::Arc::new(crate::ledger::SystemClock::new()),
        );
        s.for_each_ready_account(0, 1, &mut |a| {
            ledger.restore_ready([a]);
            Ok(())
        })
        .unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.accounts.len(), 26);
        for a in &loaded.accounts {
            assert_eq!(ledger.account(&a.name).as_ref(), Some(a));
        }
        assert_eq!(
            s.load_without_accounts().unwrap(),
            Loaded {
                accounts: Vec::new(),
                ..loaded
            }
        );
    }

    #[test]
    fn loads_parents_before_children() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("t.db"), Durability::Sync).unwrap();
        let child = AccountMeta {
            parent: Some("zz-parent".into()),
            ..meta("aa-child")
        };
        s.commit(
            &[
                entry(1, EntryKind::Add, "aa-child", 1, None),
                entry(2, EntryKind::Add, "zz-parent", 1, None),
            ],
            &[child, meta("zz-parent")],
        )
        .unwrap();
        let names: Vec<String> = s
            .load()
            .unwrap()
            .accounts
            .into_iter()
            .map(|a| a.name)
            .collect();
        assert_eq!(names, vec!["zz-parent", "aa-child"]);
    }
}
