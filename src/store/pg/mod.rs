//! The PostgreSQL [`Store`] (`store.url`): the same store interface as the
//! embedded SQLite one, with the ledger living in a PostgreSQL database.
//!
//! Owns the store's SQL (schema and migrations in [`schema`], the owner's
//! session in [`owner`]) and its connections. Every connection is a
//! blocking [`postgres::Client`] used by one dedicated OS thread: the
//! writer's, the fence keeper's, the idempotency key writer's, start-up's
//! and the offline tools'. It must never be used from an async task (the
//! client runs its own small runtime and would panic inside tokio's).
//!
//! # A commit is one statement
//! [`Store::commit`] sends **one** SQL statement per batch, whatever its
//! size: the entries go in as arrays (`unnest`), the folded per-account
//! deltas (see [`super::batch`]) and the open-reservation changes the
//! same way, in data-modifying CTEs of one `INSERT … WITH`. A single
//! statement is a single transaction (all of the batch or none) and a
//! single round trip. Inside it:
//! - the owner's fencing token is checked and the lease renewed
//!   (`UPDATE store_owner … WHERE token = $2`); when no row matches,
//!   nothing else is written and the commit fails with
//!   [`StoreError::Fenced`]. The row lock taken by that `UPDATE` is held
//!   until the statement commits, so no takeover can commit in between;
//! - when the previous attempt failed, the statement first checks whether
//!   that attempt committed after all (its first seq is present): then it
//!   writes nothing and succeeds, so a retried batch is never applied
//!   twice (the error may have come after the server committed, e.g. the
//!   connection broke before the answer arrived).
//!
//! `durability: sync` commits with `synchronous_commit = on` (the
//! server's WAL is flushed before the answer); `async` with `off` (a
//! server crash may lose the last commits, never corrupt them).
//!
//! # Failure modes
//! - PostgreSQL down at start-up: opening fails with the server's error
//!   (the URL's password redacted) and `tollgate run` exits non-zero.
//! - PostgreSQL restarted, or the connection broken, while running: the
//!   commit fails, the writer keeps the batch and retries with backoff
//!   (its queue back-pressures meanwhile); each attempt reconnects if the
//!   session ended, so everything recovers by itself once the server
//!   answers again, and the retry rule above keeps it exactly-once.
//! - A hung server: statements time out (`store.statement_timeout_ms`,
//!   enforced by the server: lock waits, slow I/O) and TCP gives up on a
//!   peer that stops acknowledging (`tcp_user_timeout`, keepalives). A
//!   server process frozen while its host's TCP stack still answers is
//!   not detected by either: the writer then waits with it, and answers
//!   fail with `store_unavailable` after `store.ack_timeout_ms` as for any
//!   slow store.

pub mod owner;
pub mod schema;
mod table;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls, Statement};

pub use crate::config::postgres::{PgSettings, PgUrl};
pub use owner::PgOwner;
pub use table::TableSession;

use super::batch::Folded;
use super::fence::{Claimant, CommitGuard, Fence, OwnerRecord};
use super::{AccountMeta, Loaded, Store, StoreError};
use crate::config::Durability;
use crate::ledger::{
    AccountView, Bucket, BucketBalance, Clock, Entry, EntryKind, ReadyAccount, ReservationId,
    ReservationState, ReservationView, Role,
};
use crate::metrics::Metrics;

/// Sessions on the store's database (the settings themselves are
/// configuration: `config::postgres`).
impl PgSettings {
    /// Opens one session for `role` (its `application_name` is `tollgate
    /// <role>`), with `statement_timeout` (`None`: unlimited, for the
    /// offline readers' long scans).
    pub fn connect(
        &self,
        role: &str,
        statement_timeout: Option<Duration>,
    ) -> Result<Client, StoreError> {
        let mut config = self.url.config().clone();
        config
            .connect_timeout(self.connect_timeout)
            .application_name(&format!("tollgate {role}"))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3);
        if let Some(t) = statement_timeout {
            // A peer that stops acknowledging (host gone, network cut).
            config.tcp_user_timeout(t.max(Duration::from_secs(1)) * 2);
        }
        let mut client = config.connect(NoTls).map_err(|e| {
            StoreError::Postgres(self.url.redact(&format!(
                "connecting to {}: {}",
                self.url,
                describe(&e)
            )))
        })?;
        let ms = statement_timeout.map_or(0, |t| t.as_millis().max(1));
        client
            .batch_execute(&format!(
                "SET statement_timeout = {ms}; SET lock_timeout = {ms}"
            ))
            .map_err(|e| self.error(&e))?;
        Ok(client)
    }

    pub(crate) fn error(&self, e: &postgres::Error) -> StoreError {
        StoreError::Postgres(self.url.redact(&describe(e)))
    }
}

/// Whether the session is unusable after `e`: anything but a statement's
/// own error (a FATAL from the server, a broken or closed connection). A
/// statement error (a constraint, a timeout) leaves the session usable.
pub fn session_broken(e: &postgres::Error) -> bool {
    match e.as_db_error() {
        Some(db) => db.severity() != "ERROR",
        None => true,
    }
}

/// A client error as text: the server's message (severity, SQLSTATE,
/// detail) or the client's own, with its causes. Callers redact it.
pub fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(detail) = db.detail() {
            text.push_str("; ");
            text.push_str(detail);
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The commit of one batch, in one statement (see the module docs).
/// Parameters: `$1` now (the lease renewal), `$2` the owner's token (NULL:
/// no ownership), `$3` whether the previous attempt failed, `$4` the
/// batch's first seq, `$5` the writing node; then the entries' columns
/// (`$6`…`$14`), the account deltas (`$15`…`$22`), the reservations opened
/// (`$23`…`$29`) and those resolved (`$30`).
const COMMIT: &str = "
WITH owner AS (
    UPDATE store_owner SET renewed_unix_ms = $1::bigint
    WHERE id = 1 AND token = $2::bigint
    RETURNING token
), go AS (
    SELECT WHERE ($2::bigint IS NULL OR EXISTS (SELECT FROM owner))
        AND NOT ($3::boolean AND EXISTS (SELECT FROM entries WHERE seq = $4::bigint))
), appended AS (
    INSERT INTO entries
        (seq, node, kind, account, bucket, amount_milli, reservation_id, reference,
         tariff_version, at_unix_ms)
    SELECT e.seq, $5::integer, e.kind, e.account, e.bucket, e.amount_milli, e.reservation_id,
           e.reference, e.tariff_version, e.at_unix_ms
    FROM unnest($6::bigint[], $7::text[], $8::text[], $9::text[], $10::bigint[], $11::bigint[],
                $12::text[], $13::text[], $14::bigint[])
         AS e(seq, kind, account, bucket, amount_milli, reservation_id, reference,
              tariff_version, at_unix_ms)
    WHERE EXISTS (SELECT FROM go)
    RETURNING 1
), balances AS (
    INSERT INTO accounts AS a
        (name, parent, role, tariff_class, anytime_posted_milli, anytime_reserved_milli,
         offpeak_posted_milli, offpeak_reserved_milli)
    SELECT * FROM unnest($15::text[], $16::text[], $17::text[], $18::text[], $19::bigint[],
                         $20::bigint[], $21::bigint[], $22::bigint[])
    WHERE EXISTS (SELECT FROM go)
    ON CONFLICT (name) DO UPDATE SET
        anytime_posted_milli   = a.anytime_posted_milli   + excluded.anytime_posted_milli,
        anytime_reserved_milli = a.anytime_reserved_milli + excluded.anytime_reserved_milli,
        offpeak_posted_milli   = a.offpeak_posted_milli   + excluded.offpeak_posted_milli,
        offpeak_reserved_milli = a.offpeak_reserved_milli + excluded.offpeak_reserved_milli
    RETURNING 1
), opened AS (
    INSERT INTO open_reservations AS r
        (id, node, account, anytime_milli, offpeak_milli, reference, tariff_version,
         created_unix_ms)
    SELECT o.id, $5::integer, o.account, o.anytime_milli, o.offpeak_milli, o.reference,
           o.tariff_version, o.created_unix_ms
    FROM unnest($23::bigint[], $24::text[], $25::bigint[], $26::bigint[], $27::text[],
                $28::text[], $29::bigint[])
         AS o(id, account, anytime_milli, offpeak_milli, reference, tariff_version,
              created_unix_ms)
    WHERE EXISTS (SELECT FROM go)
    ON CONFLICT (id) DO UPDATE SET
        anytime_milli = r.anytime_milli + excluded.anytime_milli,
        offpeak_milli = r.offpeak_milli + excluded.offpeak_milli
    RETURNING 1
), resolved AS (
    DELETE FROM open_reservations
    WHERE id = ANY($30::bigint[]) AND EXISTS (SELECT FROM go)
    RETURNING 1
)
SELECT EXISTS (SELECT FROM owner), EXISTS (SELECT FROM go), (SELECT count(*) FROM appended)";

/// The commit of one batch of a cluster node (`cluster:`), in one
/// statement: [`COMMIT`]'s journal, balance and reservation writes, but
/// under the node's lease instead of the single owner's: `$2` is the
/// node's own fencing token and the lease must not have expired at the
/// database's `now()` (`cluster_nodes`, see `crate::cluster`). The row
/// lock its `UPDATE` takes is held until the statement commits, so no
/// expiry sweep or new registration of the node can come in between. It
/// also moves what the batch reserved out of the node's grants and what it
/// voided back in (`$31`, `$32`: each delta account's granted change, per
/// bucket; `$33`…`$35`: the grants' changes); a grant that would go below
/// zero fails the whole statement (`CHECK`: a reserve without its grant
/// row included), and so does a grant row deleted between the statement's
/// snapshot and its update (the last column's cast error: it cannot happen
/// while `cluster.grant_ttl_ms` exceeds the lease by more than the
/// statement timeout, and fails closed if it does). A void whose grant row
/// is gone (a reservation of an earlier incarnation) creates it. `$1` (the
/// node's clock) is only echoed back.
const COMMIT_UNDER_GRANT: &str = "
WITH lease AS (
    UPDATE cluster_nodes SET last_commit_at = now()
    WHERE node = $5::integer AND token = $2::bigint AND NOT released AND expires_at > now()
    RETURNING token
), go AS (
    SELECT WHERE EXISTS (SELECT FROM lease)
        AND NOT ($3::boolean AND EXISTS (SELECT FROM entries WHERE seq = $4::bigint))
), appended AS (
    INSERT INTO entries
        (seq, node, kind, account, bucket, amount_milli, reservation_id, reference,
         tariff_version, at_unix_ms)
    SELECT e.seq, $5::integer, e.kind, e.account, e.bucket, e.amount_milli, e.reservation_id,
           e.reference, e.tariff_version, e.at_unix_ms
    FROM unnest($6::bigint[], $7::text[], $8::text[], $9::text[], $10::bigint[], $11::bigint[],
                $12::text[], $13::text[], $14::bigint[])
         AS e(seq, kind, account, bucket, amount_milli, reservation_id, reference,
              tariff_version, at_unix_ms)
    WHERE EXISTS (SELECT FROM go)
    RETURNING 1
), balances AS (
    INSERT INTO accounts AS a
        (name, parent, role, tariff_class, anytime_posted_milli, anytime_reserved_milli,
         offpeak_posted_milli, offpeak_reserved_milli, anytime_granted_milli,
         offpeak_granted_milli)
    SELECT * FROM unnest($15::text[], $16::text[], $17::text[], $18::text[], $19::bigint[],
                         $20::bigint[], $21::bigint[], $22::bigint[], $31::bigint[],
                         $32::bigint[])
    WHERE EXISTS (SELECT FROM go)
    ON CONFLICT (name) DO UPDATE SET
        anytime_posted_milli   = a.anytime_posted_milli   + excluded.anytime_posted_milli,
        anytime_reserved_milli = a.anytime_reserved_milli + excluded.anytime_reserved_milli,
        offpeak_posted_milli   = a.offpeak_posted_milli   + excluded.offpeak_posted_milli,
        offpeak_reserved_milli = a.offpeak_reserved_milli + excluded.offpeak_reserved_milli,
        anytime_granted_milli  = a.anytime_granted_milli  + excluded.anytime_granted_milli,
        offpeak_granted_milli  = a.offpeak_granted_milli  + excluded.offpeak_granted_milli
    RETURNING 1
), moved AS (
    UPDATE grants g SET amount_milli = g.amount_milli + m.delta
    FROM unnest($33::text[], $34::text[], $35::bigint[]) AS m(account, bucket, delta)
    WHERE g.account = m.account AND g.node = $5::integer AND g.bucket = m.bucket
        AND EXISTS (SELECT FROM go)
    RETURNING 1
), created AS (
    INSERT INTO grants (account, node, bucket, amount_milli, taken_at)
    SELECT m.account, $5::integer, m.bucket, m.delta, now()
    FROM unnest($33::text[], $34::text[], $35::bigint[]) AS m(account, bucket, delta)
    WHERE EXISTS (SELECT FROM go) AND NOT EXISTS (
        SELECT FROM grants g
        WHERE g.account = m.account AND g.node = $5::integer AND g.bucket = m.bucket)
    RETURNING 1
), opened AS (
    INSERT INTO open_reservations AS r
        (id, node, account, anytime_milli, offpeak_milli, reference, tariff_version,
         created_unix_ms)
    SELECT o.id, $5::integer, o.account, o.anytime_milli, o.offpeak_milli, o.reference,
           o.tariff_version, o.created_unix_ms
    FROM unnest($23::bigint[], $24::text[], $25::bigint[], $26::bigint[], $27::text[],
                $28::text[], $29::bigint[])
         AS o(id, account, anytime_milli, offpeak_milli, reference, tariff_version,
              created_unix_ms)
    WHERE EXISTS (SELECT FROM go)
    ON CONFLICT (id) DO UPDATE SET
        anytime_milli = r.anytime_milli + excluded.anytime_milli,
        offpeak_milli = r.offpeak_milli + excluded.offpeak_milli
    RETURNING 1
), resolved AS (
    DELETE FROM open_reservations
    WHERE id = ANY($30::bigint[]) AND EXISTS (SELECT FROM go)
    RETURNING 1
)
SELECT EXISTS (SELECT FROM lease), EXISTS (SELECT FROM go), (SELECT count(*) FROM appended),
       $1::bigint,
       CASE WHEN EXISTS (SELECT FROM go)
                 AND (SELECT count(*) FROM moved) + (SELECT count(*) FROM created)
                     <> COALESCE(cardinality($33::text[]), 0)
            -- Not a constant (the planner would fold one whatever the branch).
            THEN ('a grant row vanished under this commit; rows moved: '
                  || (SELECT count(*) FROM moved))::integer END";

/// A cluster node's lease (`cluster_nodes`): its id and current fencing
/// token, which every commit of its store checks (see
/// [`COMMIT_UNDER_GRANT`] and `crate::cluster::sql`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeLease {
    pub node: i32,
    pub token: i64,
}

const SELECT_ACCOUNTS: &str = "SELECT name, parent, role, tariff_class,
    anytime_posted_milli, anytime_reserved_milli, offpeak_posted_milli, offpeak_reserved_milli
    FROM accounts";

const SELECT_ENTRIES: &str = "SELECT seq, kind, account, bucket, amount_milli, reservation_id,
    reference, tariff_version, at_unix_ms FROM entries ORDER BY seq";

/// What a store connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// The writer (`tollgate run`, tests, benchmarks): commits.
    Writer { node: i32 },
    /// Inside one `REPEATABLE READ READ ONLY` transaction: reads only.
    Snapshot,
}

pub struct PgStore {
    settings: PgSettings,
    /// `None` after the session ended; the next commit reconnects.
    client: Option<Client>,
    /// [`COMMIT`] prepared on `client`.
    commit: Option<Statement>,
    purpose: Purpose,
    durability: Durability,
    /// Set when a commit failed: the next one first checks whether it
    /// committed after all (see the module docs).
    last_commit_failed: bool,
    /// The owner's token, checked inside every commit; `None` for a store
    /// opened without ownership (tests, benchmarks, readers).
    owner: Option<CommitGuard>,
    /// Statements and reconnections, when the process exports metrics.
    metrics: Option<Arc<Metrics>>,
    /// A cluster node's lease: commits run [`COMMIT_UNDER_GRANT`] under it
    /// (instead of [`COMMIT`] and the single owner's token).
    lease: Option<NodeLease>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.settings.url)
            .field("purpose", &self.purpose)
            .finish()
    }
}

fn synchronous_commit(durability: Durability) -> &'static str {
    match durability {
        Durability::Sync => "on",
        Durability::Async => "off",
    }
}

impl PgStore {
    /// Opens the store tollgate runs with: connects, applies pending
    /// migrations (one transaction, under the migration lock) and
    /// registers `node` (the writing node's name). Without ownership: see
    /// [`Self::open_owned`] for `tollgate run`.
    pub fn open(
        settings: &PgSettings,
        durability: Durability,
        node: &str,
        now_unix_ms: i64,
    ) -> Result<PgStore, StoreError> {
        let mut client = settings.connect("writer", Some(settings.statement_timeout))?;
        schema::migrate(&mut client, settings, now_unix_ms)?;
        let node = register_node(&mut client, settings, node, now_unix_ms)?;
        let mut store = PgStore {
            settings: settings.clone(),
            client: Some(client),
            commit: None,
            purpose: Purpose::Writer { node },
            durability,
            last_commit_failed: false,
            owner: None,
            metrics: None,
            lease: None,
        };
        store.prepare_session()?;
        Ok(store)
    }

    /// [`Self::open`], then takes ownership of the store before anything
    /// is read: the owner's session and its advisory lock, and a new
    /// fencing token that every commit of the returned store checks. Fails
    /// with [`StoreError::Owned`] when a live process owns it. Start the
    /// returned fence's keeper at once (it renews the lease).
    pub fn open_owned(
        settings: &PgSettings,
        durability: Durability,
        lease: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<(PgStore, Fence), StoreError> {
        let me = Claimant::this_process(clock.now_unix_ms());
        let mut store = Self::open(settings, durability, &me.host, me.started_unix_ms)?;
        let backend = PgOwner::connect(settings, lease)?;
        let fence = Fence::acquire(Box::new(backend), &me, lease, clock)?;
        store.owner = Some(fence.commit_guard());
        Ok((store, fence))
    }

    /// The store of a cluster node (`cluster:`) on a schema already
    /// migrated: every commit runs under `lease` (the node's token, its
    /// lease unexpired on the database's clock) and moves reserved credit
    /// out of the node's grants. No single-owner fence: nodes share the
    /// store (see `crate::cluster`).
    pub fn open_under_lease(
        settings: &PgSettings,
        durability: Durability,
        lease: NodeLease,
    ) -> Result<PgStore, StoreError> {
        let client = settings.connect("writer", Some(settings.statement_timeout))?;
        let mut store = PgStore {
            settings: settings.clone(),
            client: Some(client),
            commit: None,
            purpose: Purpose::Writer { node: lease.node },
            durability,
            last_commit_failed: false,
            owner: None,
            metrics: None,
            lease: Some(lease),
        };
        store.prepare_session()?;
        Ok(store)
    }

    /// The store for `tollgate ledger export|verify` and start-up's read
    /// of the accounts: one `REPEATABLE READ READ ONLY` transaction, so
    /// every read sees the same snapshot however many commits the owner
    /// makes meanwhile. It takes no ownership, never writes, never creates
    /// or migrates the schema, and has no statement timeout.
    pub fn open_snapshot(settings: &PgSettings) -> Result<PgStore, StoreError> {
        let mut client = settings.connect("reader", None)?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .map_err(|e| settings.error(&e))?;
        let report = schema::report(&mut client, settings)?;
        report.check_supported()?;
        if report.current == 0 {
            return Err(StoreError::NoSchema(settings.url.redacted().to_string()));
        }
        Ok(PgStore {
            settings: settings.clone(),
            client: Some(client),
            commit: None,
            purpose: Purpose::Snapshot,
            durability: Durability::Sync,
            last_commit_failed: false,
            owner: None,
            metrics: None,
            lease: None,
        })
    }

    /// Counts this store's statements and reconnections in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> PgStore {
        self.metrics = Some(metrics);
        self
    }

    pub fn settings(&self) -> &PgSettings {
        &self.settings
    }

    fn err(&self, e: &postgres::Error) -> StoreError {
        self.settings.error(e)
    }

    fn count_statements(&self, n: u64) {
        if let Some(m) = &self.metrics {
            m.store_pg_statements.inc_by(n);
        }
    }

    /// Session settings and the prepared commit, on a new writer session.
    fn prepare_session(&mut self) -> Result<(), StoreError> {
        let sync = synchronous_commit(self.durability);
        let client = self.client.as_mut().expect("a session to prepare");
        let prepared = client
            // The commit's plan does not depend on its arrays' contents:
            // plan it once per session, not per batch (measured ~10%).
            .batch_execute(&format!(
                "SET synchronous_commit = {sync}; SET plan_cache_mode = force_generic_plan"
            ))
            .and_then(|()| {
                client.prepare(if self.lease.is_some() {
                    COMMIT_UNDER_GRANT
                } else {
                    COMMIT
                })
            });
        match prepared {
            Ok(statement) => {
                self.commit = Some(statement);
                Ok(())
            }
            Err(e) => Err(self.failed(&e)),
        }
    }

    /// The error of a statement on the writer's session; a session that
    /// cannot be used any more is dropped, so the next use reconnects.
    fn failed(&mut self, e: &postgres::Error) -> StoreError {
        if session_broken(e) {
            self.client = None;
            self.commit = None;
        }
        self.err(e)
    }

    /// Drops a session that ended, so the next use reconnects.
    fn forget_if_closed(&mut self) {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            self.commit = None;
        }
    }

    /// The writer's session, reconnected if it ended.
    fn writer_session(&mut self) -> Result<(&mut Client, &Statement), StoreError> {
        self.forget_if_closed();
        if self.client.is_none() {
            if self.purpose == Purpose::Snapshot {
                return Err(StoreError::Unavailable(
                    "the snapshot's session ended; open a new one".into(),
                ));
            }
            self.client = Some(
                self.settings
                    .connect("writer", Some(self.settings.statement_timeout))?,
            );
            if let Some(m) = &self.metrics {
                m.store_pg_reconnects.inc();
            }
            tracing::info!(store = %self.settings.url, "store session re-established");
        }
        if self.commit.is_none() {
            self.prepare_session()?;
        }
        match (self.client.as_mut(), self.commit.as_ref()) {
            (Some(c), Some(s)) => Ok((c, s)),
            _ => Err(StoreError::Unavailable("no store session".into())),
        }
    }

    /// A session for reads (the writer's or the snapshot's).
    fn read_session(&mut self) -> Result<&mut Client, StoreError> {
        if self.purpose != Purpose::Snapshot {
            self.writer_session()?;
        }
        self.client.as_mut().ok_or_else(|| {
            StoreError::Unavailable("the snapshot's session ended; open a new one".into())
        })
    }

    /// The owner record (tests and tools).
    pub fn owner_record(&mut self) -> Result<OwnerRecord, StoreError> {
        let client = self.read_session()?;
        owner::read_owner(client)
            .ok_or_else(|| StoreError::Corrupt("the store_owner row is missing".into()))
    }

    /// What [`Store::load`] returns but the accounts (left empty): the open
    /// reservations and the last seq.
    pub fn load_without_accounts(&mut self) -> Result<Loaded, StoreError> {
        // A cluster node loads its own reservations only (the others' are
        // theirs, or in doubt for the operator) and continues its own seq
        // range (`cluster::sql::node_seq_base`).
        let node = self.lease.map(|l| l.node);
        let (first, end) = match node {
            Some(n) => (
                crate::cluster::sql::node_seq_base(n) as i64,
                crate::cluster::sql::node_seq_base(n + 1) as i64,
            ),
            None => (0, i64::MAX),
        };
        let client = self.read_session()?;
        let rows = client.query(
            "SELECT id, account, anytime_milli, offpeak_milli, reference, tariff_version,
                    created_unix_ms
             FROM open_reservations WHERE $1::integer IS NULL OR node = $1 ORDER BY id",
            &[&node],
        );
        let last = client.query_one(
            "SELECT COALESCE(MAX(seq), $1::bigint) FROM entries WHERE seq >= $1 AND seq < $2",
            &[&first, &end],
        );
        let (rows, last) = match (rows, last) {
            (Ok(rows), Ok(last)) => (rows, last),
            (Err(e), _) | (_, Err(e)) => return Err(self.err(&e)),
        };
        self.count_statements(2);
        let open_reservations = rows
            .iter()
            .map(|row| {
                let anytime_milli: i64 = row.get(2);
                let offpeak_milli: i64 = row.get(3);
                let total_milli = anytime_milli.saturating_add(offpeak_milli);
                ReservationView {
                    id: ReservationId(row.get::<_, i64>(0).max(0) as u64),
                    account: row.get(1),
                    state: ReservationState::Open,
                    anytime_milli,
                    offpeak_milli,
                    total_milli,
                    shares_milli: vec![total_milli],
                    reference: row.get(4),
                    tariff_version: row.get(5),
                    created_unix_ms: row.get(6),
                    in_doubt_since_unix_ms: None,
                }
            })
            .collect();
        Ok(Loaded {
            accounts: Vec::new(),
            open_reservations,
            last_seq: last.get::<_, i64>(0).max(0) as u64,
        })
    }

    /// About how many accounts the store holds (the planner's estimate:
    /// no scan), for sizing maps at start-up.
    pub fn account_count_hint(&mut self) -> Result<usize, StoreError> {
        let client = self.read_session()?;
        let row = client.query_one(
            "SELECT GREATEST(reltuples, 0)::bigint FROM pg_class WHERE oid = 'accounts'::regclass",
            &[],
        );
        let n: i64 = row.map_err(|e| self.err(&e))?.get(0);
        Ok(usize::try_from(n)
            .unwrap_or(0)
            .min(super::sqlite::ACCOUNT_COUNT_HINT_MAX))
    }

    /// Visits every stored account in the ledger's form, in no particular
    /// order, streamed (memory does not grow with the table). For
    /// start-up's restore. Stops at the visitor's first error.
    pub fn for_each_ready_account(
        &mut self,
        visit: &mut dyn FnMut(ReadyAccount) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let settings = self.settings.clone();
        let client = self.read_session()?;
        let mut rows = client
            .query_raw(SELECT_ACCOUNTS, std::iter::empty::<i32>())
            .map_err(|e| settings.error(&e))?;
        let mut n = 0u64;
        while let Some(row) = rows.next().map_err(|e| settings.error(&e))? {
            let role = role_of(&row)?;
            visit(ReadyAccount::new(
                row.get(0),
                row.get(1),
                role,
                row.get(3),
                BucketBalance {
                    posted_milli: row.get(4),
                    reserved_milli: row.get(5),
                },
                BucketBalance {
                    posted_milli: row.get(6),
                    reserved_milli: row.get(7),
                },
            ))?;
            n += 1;
        }
        Ok(n)
    }

    fn commit_inner(
        &mut self,
        entries: &[Entry],
        accounts: &[AccountMeta],
    ) -> Result<(), StoreError> {
        if let Some(guard) = &self.owner {
            guard.precheck()?;
        }
        let Purpose::Writer { node } = self.purpose else {
            return Err(StoreError::Unavailable(
                "a snapshot reader cannot commit".into(),
            ));
        };
        let folded = Folded::of(entries, accounts);
        let seq: Vec<i64> = entries.iter().map(|e| seq_to_sql(e.seq)).collect();
        let kind: Vec<&str> = entries.iter().map(|e| e.kind.as_str()).collect();
        let account: Vec<&str> = entries.iter().map(|e| e.account.as_str()).collect();
        let bucket: Vec<&str> = entries.iter().map(|e| e.bucket.as_str()).collect();
        let amount: Vec<i64> = entries.iter().map(|e| e.amount_milli).collect();
        let rid: Vec<Option<i64>> = entries
            .iter()
            .map(|e| e.reservation_id.map(seq_to_sql))
            .collect();
        let reference: Vec<Option<&str>> = entries.iter().map(|e| e.reference.as_deref()).collect();
        let tariff: Vec<Option<&str>> = entries
            .iter()
            .map(|e| e.tariff_version.as_deref())
            .collect();
        let at: Vec<i64> = entries.iter().map(|e| e.at_unix_ms).collect();

        let d = &folded.deltas;
        let names: Vec<&str> = d.iter().map(|d| d.account).collect();
        let parents: Vec<Option<&str>> = d.iter().map(|d| d.meta.parent.as_deref()).collect();
        let roles: Vec<&str> = d.iter().map(|d| d.meta.role.as_str()).collect();
        let classes: Vec<Option<&str>> = d.iter().map(|d| d.meta.tariff_class.as_deref()).collect();
        let ap: Vec<i64> = d.iter().map(|d| d.anytime_posted_milli).collect();
        let ar: Vec<i64> = d.iter().map(|d| d.anytime_reserved_milli).collect();
        let op: Vec<i64> = d.iter().map(|d| d.offpeak_posted_milli).collect();
        let or: Vec<i64> = d.iter().map(|d| d.offpeak_reserved_milli).collect();

        let o = &folded.opened;
        let o_id: Vec<i64> = o.iter().map(|o| seq_to_sql(o.id)).collect();
        let o_account: Vec<&str> = o.iter().map(|o| o.entry.account.as_str()).collect();
        let o_anytime: Vec<i64> = o.iter().map(|o| o.anytime_milli).collect();
        let o_offpeak: Vec<i64> = o.iter().map(|o| o.offpeak_milli).collect();
        let o_reference: Vec<Option<&str>> =
            o.iter().map(|o| o.entry.reference.as_deref()).collect();
        let o_tariff: Vec<Option<&str>> = o
            .iter()
            .map(|o| o.entry.tariff_version.as_deref())
            .collect();
        let o_created: Vec<i64> = o.iter().map(|o| o.entry.at_unix_ms).collect();
        let resolved: Vec<i64> = folded.resolved.iter().map(|id| seq_to_sql(*id)).collect();

        // Under a cluster lease: what the batch moves between the grants
        // and `reserved`, per delta account and per grant row.
        let moves = if self.lease.is_some() {
            super::batch::grant_moves(entries)
        } else {
            Vec::new()
        };
        let granted = |bucket: Bucket| -> Vec<i64> {
            d.iter()
                .map(|d| {
                    moves
                        .iter()
                        .filter(|m| m.0 == d.account && m.1 == bucket)
                        .map(|m| m.2)
                        .sum()
                })
                .collect()
        };
        let (g_anytime, g_offpeak) = (granted(Bucket::Anytime), granted(Bucket::OffPeak));
        let m_account: Vec<&str> = moves.iter().map(|m| m.0).collect();
        let m_bucket: Vec<&str> = moves.iter().map(|m| m.1.as_str()).collect();
        let m_delta: Vec<i64> = moves.iter().map(|m| m.2).collect();

        let started = Instant::now();
        let (token, now) = match (&self.owner, &self.lease) {
            (_, Some(l)) => (Some(l.token), 0),
            (Some(g), None) => (Some(g.token.0 as i64), g.now_unix_ms()),
            (None, None) => (None, 0),
        };
        let lease = self.lease;
        let under_lease = lease.is_some();
        let retry = self.last_commit_failed;
        let first = seq[0];
        let (client, statement) = self.writer_session()?;
        let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = vec![
            &now,
            &token,
            &retry,
            &first,
            &node,
            &seq,
            &kind,
            &account,
            &bucket,
            &amount,
            &rid,
            &reference,
            &tariff,
            &at,
            &names,
            &parents,
            &roles,
            &classes,
            &ap,
            &ar,
            &op,
            &or,
            &o_id,
            &o_account,
            &o_anytime,
            &o_offpeak,
            &o_reference,
            &o_tariff,
            &o_created,
            &resolved,
        ];
        if under_lease {
            params.extend_from_slice(&[&g_anytime, &g_offpeak, &m_account, &m_bucket, &m_delta]);
        }
        let row = client.query_one(statement, &params);
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                self.count_statements(1);
                return Err(self.failed(&e));
            }
        };
        let owned: bool = row.get(0);
        let applied: bool = row.get(1);
        if let (Some(lease), false) = (lease, owned) {
            self.count_statements(1);
            return Err(StoreError::LeaseLost {
                node: lease.node,
                token: lease.token,
            });
        }
        if token.is_some() && !owned {
            let owner = owner::read_owner(client);
            self.count_statements(2);
            if let Some(guard) = &self.owner {
                guard.fenced(owner.clone());
            }
            return Err(StoreError::Fenced {
                owner: owner.map(Box::new),
            });
        }
        self.count_statements(1);
        if let Some(guard) = &self.owner {
            guard.renewed(started, now);
        }
        if !applied {
            // The failed attempt committed after all (under this owner's
            // token: it was checked in that statement); batches are atomic.
            tracing::info!(
                first_seq = first,
                entries = entries.len(),
                "a retried batch had been committed by its failed attempt; not applied twice"
            );
        }
        Ok(())
    }
}

/// The node's id in `nodes`, registering it the first time.
pub(crate) fn register_node(
    client: &mut Client,
    settings: &PgSettings,
    name: &str,
    now_unix_ms: i64,
) -> Result<i32, StoreError> {
    let err = |e: postgres::Error| settings.error(&e);
    if let Some(row) = client
        .query_opt("SELECT id FROM nodes WHERE name = $1", &[&name])
        .map_err(err)?
    {
        return Ok(row.get(0));
    }
    client
        .execute(
            "INSERT INTO nodes (name, first_seen_unix_ms) VALUES ($1, $2)
             ON CONFLICT (name) DO NOTHING",
            &[&name, &now_unix_ms],
        )
        .map_err(err)?;
    Ok(client
        .query_one("SELECT id FROM nodes WHERE name = $1", &[&name])
        .map_err(err)?
        .get(0))
}

/// Seqs and reservation ids are below 2^63 (the ledger counts from 1).
fn seq_to_sql(seq: u64) -> i64 {
    seq as i64
}

fn role_of(row: &postgres::Row) -> Result<Role, StoreError> {
    let role: &str = row.get(2);
    Role::parse(role).ok_or_else(|| StoreError::Corrupt(format!("unknown role {role:?}")))
}

fn account_from_row(row: &postgres::Row) -> Result<AccountView, StoreError> {
    Ok(AccountView {
        name: row.get(0),
        parent: row.get(1),
        role: role_of(row)?,
        tariff_class: row.get(3),
        anytime: BucketBalance {
            posted_milli: row.get(4),
            reserved_milli: row.get(5),
        },
        offpeak: BucketBalance {
            posted_milli: row.get(6),
            reserved_milli: row.get(7),
        },
    })
}

fn entry_from_row(row: &postgres::Row) -> Result<Entry, StoreError> {
    let kind: &str = row.get(1);
    let bucket: &str = row.get(3);
    Ok(Entry {
        seq: row.get::<_, i64>(0).max(0) as u64,
        kind: EntryKind::parse(kind)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown entry kind {kind:?}")))?,
        account: row.get(2),
        bucket: Bucket::parse(bucket)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown bucket {bucket:?}")))?,
        amount_milli: row.get(4),
        reservation_id: row.get::<_, Option<i64>>(5).map(|v| v.max(0) as u64),
        reference: row.get(6),
        tariff_version: row.get(7),
        at_unix_ms: row.get(8),
    })
}

impl Store for PgStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        let settings = self.settings.clone();
        let client = self.read_session()?;
        let rows = client
            .query(SELECT_ACCOUNTS, &[])
            .map_err(|e| settings.error(&e))?;
        // Parents before children (what `Loaded::accounts` promises).
        let mut accounts = Vec::with_capacity(rows.len());
        let mut children = Vec::new();
        for row in &rows {
            let account = account_from_row(row)?;
            if account.parent.is_some() {
                children.push(account);
            } else {
                accounts.push(account);
            }
        }
        accounts.append(&mut children);
        self.count_statements(1);
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
        let settings = self.settings.clone();
        let client = self.read_session()?;
        let mut rows = client
            .query_raw(SELECT_ENTRIES, std::iter::empty::<i32>())
            .map_err(|e| settings.error(&e))?;
        let mut n = 0u64;
        while let Some(row) = rows.next().map_err(|e| settings.error(&e))? {
            visit(entry_from_row(&row)?)?;
            n += 1;
        }
        Ok(n)
    }

    fn stored_balances(&mut self) -> Result<Vec<AccountView>, StoreError> {
        let settings = self.settings.clone();
        let client = self.read_session()?;
        let rows = client
            .query(
                &format!("{SELECT_ACCOUNTS} ORDER BY parent IS NOT NULL, name"),
                &[],
            )
            .map_err(|e| settings.error(&e))?;
        rows.iter().map(account_from_row).collect()
    }
}
