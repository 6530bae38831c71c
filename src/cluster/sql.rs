//! The grant protocol's statements on the PostgreSQL store (schema version
//! 4: `cluster_nodes`, `grants`, the accounts' `*_granted_milli`; version
//! 5: `boxis_authcodes`): node leases with their own fencing tokens, taking
//! (and topping up), returning and expiring grants, credit actions straight
//! in the database, the cluster-wide balance, and the cluster-wide Boxis
//! replay check. The group commit under a grant is the
//! store's (`store::pg::PgStore::open_under_lease`). Each function is what
//! the same-named method of [`super::model::Db`] specifies.
//!
//! Every function takes a blocking [`postgres::Client`] (the frequent
//! ones, a [`Session`] that prepares them once): call them from a
//! dedicated thread only, never from a tokio worker. Every statement but
//! [`register`] (a transaction, once per start) is one statement, so one
//! round trip and one transaction; leases are judged on the database's
//! clock (`now()`, the statement's start), never the node's.
//!
//! # Lock order
//! Every statement that locks rows locks them in one order, so that no two
//! of them (a take, a give-back, a sweep, a release, a registration, a
//! transfer, a node's group commit) can wait for each other in a cycle: the node's
//! `cluster_nodes` row, then `grants` rows, then `accounts` rows by name.
//! A deadlock is not only a failed statement: PostgreSQL finds it after
//! `deadlock_timeout` (1 s), and a group commit waiting that long holds its
//! node's lease row, so the lease renewal behind it times out and the node
//! loses its lease (`tests/cluster_nodes.rs` found this under load).
//!
//! # Failure modes
//! - The session breaks mid-statement: the outcome is unknown. A take whose
//!   answer is lost leaves credit in the node's grant that the node does
//!   not count (stranded, never spent twice) until [`release`] or expiry;
//!   a lost give-back keeps it in the grant likewise. Callers must treat an
//!   unknown take as "not granted" and an unknown give-back as "given".
//! - Two nodes race for the last credit: the account row's lock
//!   serialises the two `UPDATE … WHERE available >= $n`; the second sees
//!   the first's result and takes nothing.
//! - Several nodes sweep at once: `FOR UPDATE SKIP LOCKED` hands each dead
//!   node to one sweeper; a node committing holds its own row's lock, so
//!   it is never swept mid-commit.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use postgres::{Client, Statement};
use thiserror::Error;

use crate::ledger::{Bucket, Role};
use crate::store::pg::{register_node, NodeLease, PgSettings};
use crate::store::StoreError;

#[derive(Debug, Error)]
pub enum ClusterError {
    /// A live incarnation of this node id holds its lease.
    #[error(
        "node {name:?} is already running (pid {pid} on {host}, its lease expires in {expires_in_ms} ms); \
         stop it, or give this node another cluster.node_id"
    )]
    LeaseHeld {
        name: String,
        pid: i64,
        host: String,
        expires_in_ms: i64,
    },
    /// The token is not current, the lease expired on the database's
    /// clock, or it was released: nothing was written.
    #[error("fenced: node {node}'s lease (token {token}) expired or was replaced; register again")]
    Fenced { node: i32, token: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ClusterError {
    /// `lease` is no longer this node's (see [`ClusterError::Fenced`]).
    fn fenced(lease: NodeLease) -> ClusterError {
        ClusterError::Fenced {
            node: lease.node,
            token: lease.token,
        }
    }
}

/// What a take (or top-up) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Granted: the node's grant on the bucket is now `grant_milli`; the
    /// account has `available_milli` left to grant.
    Granted {
        grant_milli: i64,
        available_milli: i64,
    },
    /// Not that much available (or no such account: 0); nothing taken.
    Insufficient { available_milli: i64 },
}

/// An account's balance across the cluster, per bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterBalance {
    pub posted_milli: i64,
    pub reserved_milli: i64,
    pub granted_milli: i64,
}

impl ClusterBalance {
    /// The account's balance as a customer sees it: posted less what
    /// committed reservations hold (granted credit is still the account's).
    pub fn balance_milli(&self) -> i64 {
        self.posted_milli - self.reserved_milli
    }

    /// What no node holds: what the next grant or direct take may get.
    pub fn ungranted_milli(&self) -> i64 {
        self.posted_milli - self.reserved_milli - self.granted_milli
    }
}

fn pg(settings: &PgSettings) -> impl Fn(postgres::Error) -> StoreError + '_ {
    move |e| settings.error(&e)
}

/// The statements a node runs per request (a take per send in direct
/// mode, a balance per `getcredits`, a claim per Boxis authcode), which a
/// [`Session`] parses and plans once instead of on every call (measured:
/// parse and plan were about half of a direct take's time in PostgreSQL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frequent {
    Take,
    GiveBack,
    Balance,
    ClaimAuthcode,
}

impl Frequent {
    const ALL: [Frequent; 4] = [
        Frequent::Take,
        Frequent::GiveBack,
        Frequent::Balance,
        Frequent::ClaimAuthcode,
    ];

    fn sql(self) -> &'static str {
        match self {
            Frequent::Take => TAKE,
            Frequent::GiveBack => GIVE_BACK,
            Frequent::Balance => BALANCE,
            Frequent::ClaimAuthcode => CLAIM_AUTHCODE,
        }
    }
}

/// Where a [`Frequent`] statement runs: a plain [`Client`] prepares it on
/// every call (tests, the offline commands); a [`Session`] once.
pub trait Prepare {
    fn client(&mut self) -> &mut Client;
    fn statement(&mut self, which: Frequent) -> Result<Statement, postgres::Error>;
}

impl Prepare for Client {
    fn client(&mut self) -> &mut Client {
        self
    }

    fn statement(&mut self, which: Frequent) -> Result<Statement, postgres::Error> {
        self.prepare(which.sql())
    }
}

/// A node's session: a [`Client`] (every function of this module takes
/// it, through `Deref`) and its [`Frequent`] statements, prepared on
/// first use. A statement belongs to its connection: a session that
/// broke is dropped whole and made again.
pub struct Session {
    client: Client,
    prepared: [Option<Statement>; Frequent::ALL.len()],
}

impl Session {
    pub fn new(client: Client) -> Session {
        Session {
            client,
            prepared: Default::default(),
        }
    }
}

impl Prepare for Session {
    fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    fn statement(&mut self, which: Frequent) -> Result<Statement, postgres::Error> {
        let slot = &mut self.prepared[which as usize];
        if let Some(statement) = slot {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(which.sql())?;
        Ok(slot.insert(statement).clone())
    }
}

impl Deref for Session {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Registers this incarnation of node `name`: its id in `nodes` (created
/// the first time), a new fencing token and a lease of `lease` on the
/// database's clock. Refused with [`ClusterError::LeaseHeld`] while a
/// previous incarnation's lease is valid and not released; what an expired
/// or released incarnation still held in grants comes back to the
/// accounts in the same transaction (its committed reservations stay).
pub fn register(
    client: &mut Client,
    settings: &PgSettings,
    name: &str,
    lease: Duration,
    now_unix_ms: i64,
) -> Result<NodeLease, ClusterError> {
    let err = pg(settings);
    let node = register_node(client, settings, name, now_unix_ms)?;
    let host = crate::store::fence::Claimant::this_process(now_unix_ms).host;
    let pid = i64::from(std::process::id());
    let mut tx = client.transaction().map_err(&err)?;
    tx.execute(
        "INSERT INTO cluster_nodes
             (node, token, pid, host, started_at, renewed_at, expires_at, released)
         VALUES ($1, 0, 0, '', now(), now(), 'epoch', true)
         ON CONFLICT (node) DO NOTHING",
        &[&node],
    )
    .map_err(&err)?;
    let row = tx
        .query_one(
            "SELECT pid, host, NOT released AND expires_at > now(),
                    (EXTRACT(EPOCH FROM (expires_at - now())) * 1000)::bigint
             FROM cluster_nodes WHERE node = $1 FOR UPDATE",
            &[&node],
        )
        .map_err(&err)?;
    if row.get::<_, bool>(2) {
        let held = ClusterError::LeaseHeld {
            name: name.to_string(),
            pid: row.get(0),
            host: row.get(1),
            expires_in_ms: row.get::<_, Option<i64>>(3).unwrap_or(0),
        };
        tx.rollback().map_err(&err)?;
        return Err(held);
    }
    tx.execute(RETURN_ALL, &[&node]).map_err(&err)?;
    let token: i64 = tx
        .query_one(
            "UPDATE cluster_nodes SET token = token + 1, pid = $2, host = $3,
                 started_at = now(), renewed_at = now(),
                 expires_at = now() + $4::bigint * interval '1 millisecond', released = false,
                 last_commit_at = NULL
             WHERE node = $1 RETURNING token",
            &[&node, &pid, &host, &millis(lease)],
        )
        .map_err(&err)?
        .get(0);
    tx.commit().map_err(&err)?;
    Ok(NodeLease { node, token })
}

/// The CTEs after a statement's `gone` (the grant rows it deleted, as
/// `account, bucket, amount_milli`) that give that credit back to the
/// accounts, which they lock in name order first (see "Lock order"):
/// a node's registration, its release and the sweep of dead nodes.
macro_rules! grants_back {
    () => {
        "sums AS (
             SELECT account,
                    COALESCE(sum(amount_milli) FILTER (WHERE bucket = 'anytime'), 0) AS anytime,
                    COALESCE(sum(amount_milli) FILTER (WHERE bucket = 'offpeak'), 0) AS offpeak
             FROM gone GROUP BY account
         ), locked AS (
             SELECT FROM accounts WHERE name IN (SELECT account FROM sums)
             ORDER BY name FOR UPDATE
         ), accounts_back AS (
             UPDATE accounts a SET anytime_granted_milli = a.anytime_granted_milli - s.anytime,
                                   offpeak_granted_milli = a.offpeak_granted_milli - s.offpeak
             FROM sums s WHERE a.name = s.account AND (SELECT count(*) FROM locked) >= 0
             RETURNING 1
         )
         "
    };
}

/// Every grant of node `$1` back to its accounts (one statement).
const RETURN_ALL: &str = concat!(
    "WITH gone AS (
         DELETE FROM grants WHERE node = $1 RETURNING account, bucket, amount_milli
     ), ",
    grants_back!(),
    "SELECT COALESCE((SELECT sum(amount_milli) FROM gone), 0)::bigint"
);

/// Extends a valid lease by `lease` from the database's `now()`. An
/// expired lease cannot be renewed: [`ClusterError::Fenced`].
pub fn renew(
    client: &mut Client,
    settings: &PgSettings,
    lease: NodeLease,
    duration: Duration,
) -> Result<(), ClusterError> {
    let n = client
        .execute(
            "UPDATE cluster_nodes
             SET renewed_at = now(), expires_at = now() + $3::bigint * interval '1 millisecond'
             WHERE node = $1 AND token = $2 AND NOT released AND expires_at > now()",
            &[&lease.node, &lease.token, &millis(duration)],
        )
        .map_err(pg(settings))?;
    if n == 1 {
        Ok(())
    } else {
        Err(ClusterError::fenced(lease))
    }
}

/// A clean shutdown (after the writer flushed): every grant back, the
/// lease released, in one statement. Returns how much came back.
pub fn release(
    client: &mut Client,
    settings: &PgSettings,
    lease: NodeLease,
) -> Result<i64, ClusterError> {
    let row = client
        .query_one(
            concat!(
                "WITH me AS (
                     UPDATE cluster_nodes SET released = true, expires_at = now()
                     WHERE node = $1 AND token = $2 AND NOT released
                     RETURNING node
                 ), gone AS (
                     DELETE FROM grants WHERE node = $1 AND EXISTS (SELECT FROM me)
                     RETURNING account, bucket, amount_milli
                 ), ",
                grants_back!(),
                "SELECT EXISTS (SELECT FROM me),
                        COALESCE((SELECT sum(amount_milli) FROM gone), 0)::bigint"
            ),
            &[&lease.node, &lease.token],
        )
        .map_err(pg(settings))?;
    if !row.get::<_, bool>(0) {
        return Err(ClusterError::fenced(lease));
    }
    Ok(row.get(1))
}

/// The statement of [`take`].
const TAKE: &str = "WITH live AS (
                 SELECT FROM cluster_nodes
                 WHERE node = $1 AND token = $2 AND NOT released AND expires_at > now()
             ), mine AS (
                 -- The grant row first, then the account's: the order every
                 -- statement on both takes (see Lock order in the module docs).
                 SELECT FROM grants WHERE account = $3 AND node = $1 AND bucket = $4::text
                 FOR UPDATE
             ), acc AS (
                 UPDATE accounts SET
                     anytime_granted_milli = anytime_granted_milli
                         + CASE WHEN $4::text = 'anytime' THEN $5::bigint ELSE 0 END,
                     offpeak_granted_milli = offpeak_granted_milli
                         + CASE WHEN $4::text = 'offpeak' THEN $5::bigint ELSE 0 END
                 WHERE name = $3 AND $5::bigint > 0 AND EXISTS (SELECT FROM live)
                   AND (SELECT count(*) FROM mine) >= 0
                   AND CASE WHEN $4::text = 'anytime'
                            THEN anytime_posted_milli - anytime_reserved_milli - anytime_granted_milli
                            ELSE offpeak_posted_milli - offpeak_reserved_milli - offpeak_granted_milli
                       END >= $5::bigint
                 RETURNING CASE WHEN $4::text = 'anytime'
                                THEN anytime_posted_milli - anytime_reserved_milli - anytime_granted_milli
                                ELSE offpeak_posted_milli - offpeak_reserved_milli - offpeak_granted_milli
                           END AS left_milli
             ), g AS (
                 INSERT INTO grants AS g (account, node, bucket, amount_milli, taken_at)
                 SELECT $3, $1, $4::text, $5::bigint, now() WHERE EXISTS (SELECT FROM acc)
                 ON CONFLICT (account, node, bucket) DO UPDATE
                     SET amount_milli = g.amount_milli + excluded.amount_milli, taken_at = now()
                 RETURNING amount_milli
             )
             SELECT EXISTS (SELECT FROM live), (SELECT left_milli FROM acc),
                    (SELECT amount_milli FROM g),
                    (SELECT CASE WHEN $4::text = 'anytime'
                                 THEN anytime_posted_milli - anytime_reserved_milli - anytime_granted_milli
                                 ELSE offpeak_posted_milli - offpeak_reserved_milli - offpeak_granted_milli
                            END FROM accounts WHERE name = $3)";

/// Takes (or tops up) `amount_milli` of `account`'s `bucket` into the
/// node's grant, only when that much is ungranted cluster-wide: one
/// conditional `UPDATE` of the account row, under a valid lease.
pub fn take(
    client: &mut impl Prepare,
    settings: &PgSettings,
    lease: NodeLease,
    account: &str,
    bucket: Bucket,
    amount_milli: i64,
) -> Result<Take, ClusterError> {
    let params: &[&(dyn postgres::types::ToSql + Sync)] = &[
        &lease.node,
        &lease.token,
        &account,
        &bucket.as_str(),
        &amount_milli,
    ];
    let statement = client.statement(Frequent::Take).map_err(pg(settings))?;
    let row = match client.client().query_one(&statement, params) {
        // PostgreSQL rolled the statement back, so it may run once more.
        Err(e) if e.code() == Some(&postgres::error::SqlState::T_R_DEADLOCK_DETECTED) => {
            tracing::warn!(
                account,
                "cluster: a take was a deadlock's victim; running it again"
            );
            client.client().query_one(&statement, params)
        }
        other => other,
    }
    .map_err(pg(settings))?;
    if !row.get::<_, bool>(0) {
        return Err(ClusterError::fenced(lease));
    }
    match (row.get::<_, Option<i64>>(1), row.get::<_, Option<i64>>(2)) {
        (Some(left), Some(grant)) => Ok(Take::Granted {
            grant_milli: grant,
            available_milli: left,
        }),
        _ => Ok(Take::Insufficient {
            available_milli: row.get::<_, Option<i64>>(3).unwrap_or(0).max(0),
        }),
    }
}

/// The statement of [`give_back`].
const GIVE_BACK: &str = "WITH mine AS (
         SELECT FROM cluster_nodes WHERE node = $1 AND token = $2
     ), g AS (
         UPDATE grants SET amount_milli = amount_milli - $5::bigint
         WHERE account = $3 AND node = $1 AND bucket = $4::text
           AND $5::bigint > 0 AND amount_milli >= $5::bigint
           AND EXISTS (SELECT FROM mine)
         RETURNING amount_milli
     ), acc AS (
         UPDATE accounts SET
             anytime_granted_milli = anytime_granted_milli
                 - CASE WHEN $4::text = 'anytime' THEN $5::bigint ELSE 0 END,
             offpeak_granted_milli = offpeak_granted_milli
                 - CASE WHEN $4::text = 'offpeak' THEN $5::bigint ELSE 0 END
         WHERE name = $3 AND EXISTS (SELECT FROM g)
         RETURNING 1
     )
     SELECT EXISTS (SELECT FROM mine), EXISTS (SELECT FROM g)";

/// Gives `amount_milli` of the node's grant back (idle, shrinking), only
/// when the grant holds that much; the token must be current (the lease
/// need not be valid: giving back is always safe). Returns whether it did.
pub fn give_back(
    client: &mut impl Prepare,
    settings: &PgSettings,
    lease: NodeLease,
    account: &str,
    bucket: Bucket,
    amount_milli: i64,
) -> Result<bool, ClusterError> {
    let statement = client.statement(Frequent::GiveBack).map_err(pg(settings))?;
    let row = client
        .client()
        .query_one(
            &statement,
            &[
                &lease.node,
                &lease.token,
                &account,
                &bucket.as_str(),
                &amount_milli,
            ],
        )
        .map_err(pg(settings))?;
    if !row.get::<_, bool>(0) {
        return Err(ClusterError::fenced(lease));
    }
    Ok(row.get(1))
}

/// What one expiry sweep returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    pub nodes: i64,
    pub grants: i64,
    pub returned_milli: i64,
}

/// Returns the grants of every node whose lease expired and whose last
/// renewal is older than `grant_ttl` (≥ the lease), in one statement any
/// node may run at any time: `FOR UPDATE SKIP LOCKED` gives each dead node
/// to one sweeper. What the dead node's committed journal reserved stays
/// reserved (in doubt, for the operator).
pub fn expire(
    client: &mut Client,
    settings: &PgSettings,
    grant_ttl: Duration,
) -> Result<Expired, ClusterError> {
    let row = client
        .query_one(
            concat!(
                "WITH dead AS (
                     SELECT node FROM cluster_nodes n
                     WHERE expires_at <= now()
                       AND renewed_at + $1::bigint * interval '1 millisecond' <= now()
                       AND EXISTS (SELECT FROM grants g WHERE g.node = n.node)
                     FOR UPDATE SKIP LOCKED
                 ), gone AS (
                     DELETE FROM grants WHERE node IN (SELECT node FROM dead)
                     RETURNING account, bucket, amount_milli
                 ), ",
                grants_back!(),
                "SELECT (SELECT count(*) FROM dead), (SELECT count(*) FROM gone),
                        COALESCE((SELECT sum(amount_milli) FROM gone), 0)::bigint"
            ),
            &[&millis(grant_ttl)],
        )
        .map_err(pg(settings))?;
    Ok(Expired {
        nodes: row.get(0),
        grants: row.get(1),
        returned_milli: row.get(2),
    })
}

/// The kind of a credit action journaled by [`credit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreditKind {
    /// `addcredits`: `posted += amount` (a negative amount deducts, only
    /// from what no node holds).
    Add,
    /// `setcredits`: the account's balance (`posted − reserved`) becomes
    /// `amount`, when what nodes hold still fits under it.
    Set,
}

/// A credit action straight in the database, visible to every node's next
/// take: moves `posted` (never below what reservations and grants hold)
/// and appends its journal entry (`seq`, from the node's own seq range),
/// under a valid lease, in one short transaction that locks the account
/// row (credit actions are rare; the read-then-write stays exact under
/// concurrent takes and commits). Returns the journaled delta, or `None`
/// when refused for want of ungranted credit (nothing written). A
/// non-negative add creates a missing account row (as `role`).
#[allow(clippy::too_many_arguments)]
pub fn credit(
    client: &mut Client,
    settings: &PgSettings,
    lease: NodeLease,
    seq: u64,
    kind: CreditKind,
    account: &str,
    role: Role,
    bucket: Bucket,
    amount_milli: i64,
    reference: Option<&str>,
    at_unix_ms: i64,
) -> Result<Option<i64>, ClusterError> {
    let err = pg(settings);
    let (posted_col, reserved_col, granted_col) = bucket_columns(bucket);
    let mut tx = client.transaction().map_err(&err)?;
    hold_lease(&mut tx, lease, &err)?;
    if amount_milli >= 0 {
        tx.execute(
            "INSERT INTO accounts (name, role) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            &[&account, &role.as_str()],
        )
        .map_err(&err)?;
    }
    let row = tx
        .query_opt(
            &format!(
                "SELECT {posted_col} - {reserved_col}, {granted_col}
                 FROM accounts WHERE name = $1 FOR UPDATE"
            ),
            &[&account],
        )
        .map_err(&err)?;
    let Some(row) = row else {
        tx.rollback().map_err(&err)?;
        return Ok(None);
    };
    let (balance, granted): (i64, i64) = (row.get(0), row.get(1));
    let delta = match kind {
        CreditKind::Add => amount_milli,
        CreditKind::Set => amount_milli.saturating_sub(balance),
    };
    // Never below what committed reservations and the nodes' grants hold.
    if balance.saturating_add(delta) < granted {
        tx.rollback().map_err(&err)?;
        return Ok(None);
    }
    if delta != 0 {
        let kind = match kind {
            CreditKind::Add => "add",
            CreditKind::Set => "set",
        };
        tx.execute(
            &format!("UPDATE accounts SET {posted_col} = {posted_col} + $2 WHERE name = $1"),
            &[&account, &delta],
        )
        .map_err(&err)?;
        let entry = EntryRow {
            seq,
            kind,
            account,
            bucket,
            amount_milli: delta,
            reference,
            at_unix_ms,
        };
        insert_entry(&mut tx, lease, &entry, &err)?;
    }
    tx.commit().map_err(&err)?;
    Ok(Some(delta))
}

/// An account as `accounts.yaml` seeds it (`config::accounts`).
#[derive(Clone, Copy, Debug)]
pub struct Seed<'a> {
    pub name: &'a str,
    pub parent: Option<&'a str>,
    pub role: Role,
    pub tariff_class: Option<&'a str>,
    pub anytime_milli: i64,
    pub offpeak_milli: i64,
}

/// Seeds an account the cluster does not have yet, with its opening
/// balances and their `add` entries (reference `seed`, seqs `seq` and
/// `seq + 1` from the node's range), under a valid lease, in one short
/// transaction; every node of a cluster reads the same seed file and
/// starts at any time, so only the first creates it. An account that
/// exists keeps its balance and takes the seed's identity (parent, role,
/// tariff class: the file is their source; an account a credit action
/// created has none). Returns whether it created the account.
pub fn seed(
    client: &mut Client,
    settings: &PgSettings,
    lease: NodeLease,
    seq: u64,
    seed: &Seed<'_>,
    at_unix_ms: i64,
) -> Result<bool, ClusterError> {
    let err = pg(settings);
    let mut tx = client.transaction().map_err(&err)?;
    hold_lease(&mut tx, lease, &err)?;
    let created: bool = tx
        .query_one(
            "INSERT INTO accounts AS a (name, parent, role, tariff_class, anytime_posted_milli,
                                        offpeak_posted_milli)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (name) DO UPDATE
                 SET parent = excluded.parent, role = excluded.role,
                     tariff_class = excluded.tariff_class
             RETURNING xmax = 0",
            &[
                &seed.name,
                &seed.parent,
                &seed.role.as_str(),
                &seed.tariff_class,
                &seed.anytime_milli,
                &seed.offpeak_milli,
            ],
        )
        .map_err(&err)?
        .get(0);
    if created {
        let legs = [
            (Bucket::Anytime, seed.anytime_milli),
            (Bucket::OffPeak, seed.offpeak_milli),
        ];
        for (i, (bucket, amount_milli)) in legs.into_iter().enumerate() {
            if amount_milli == 0 {
                continue;
            }
            let entry = EntryRow {
                seq: seq + i as u64,
                kind: "add",
                account: seed.name,
                bucket,
                amount_milli,
                reference: Some("seed"),
                at_unix_ms,
            };
            insert_entry(&mut tx, lease, &entry, &err)?;
        }
    }
    tx.commit().map_err(&err)?;
    Ok(created)
}

/// Why a cluster-wide transfer was refused (nothing written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferRefused {
    /// `child`'s row is missing or its parent is not `parent`.
    NotASubaccount,
    /// The giving side has less than that ungranted (what its committed
    /// reservations and the nodes' grants hold cannot move).
    Insufficient { available_milli: i64 },
}

/// A transfer between a parent and its sub-account, straight in the
/// database under a valid lease: `amounts_milli` (anytime, offpeak) from
/// `parent` to `child` (negative: back), both rows locked in name order in
/// one short transaction, so both buckets move or neither; the giver never
/// below what reservations and grants hold. Up to four `transfer` entries
/// (from `seq` on, from the node's range: per bucket, parent leg first;
/// zero legs skipped), as the ledger journals them.
#[allow(clippy::too_many_arguments)]
pub fn transfer(
    client: &mut Client,
    settings: &PgSettings,
    lease: NodeLease,
    seq: u64,
    parent: &str,
    child: &str,
    amounts_milli: [i64; 2],
    reference: Option<&str>,
    at_unix_ms: i64,
) -> Result<Result<(), TransferRefused>, ClusterError> {
    let err = pg(settings);
    if parent == child || amounts_milli == [0, 0] {
        return Ok(Err(TransferRefused::NotASubaccount));
    }
    let mut tx = client.transaction().map_err(&err)?;
    hold_lease(&mut tx, lease, &err)?;
    // Name order, so two opposite transfers cannot deadlock.
    let rows = tx
        .query(
            "SELECT name, parent,
                    anytime_posted_milli - anytime_reserved_milli - anytime_granted_milli,
                    offpeak_posted_milli - offpeak_reserved_milli - offpeak_granted_milli
             FROM accounts WHERE name = $1 OR name = $2 ORDER BY name FOR UPDATE",
            &[&parent, &child],
        )
        .map_err(&err)?;
    let find = |name: &str| rows.iter().find(|r| r.get::<_, &str>(0) == name);
    let (Some(p), Some(c)) = (find(parent), find(child)) else {
        tx.rollback().map_err(&err)?;
        return Ok(Err(TransferRefused::NotASubaccount));
    };
    if c.get::<_, Option<&str>>(1) != Some(parent) {
        tx.rollback().map_err(&err)?;
        return Ok(Err(TransferRefused::NotASubaccount));
    }
    for (i, amount_milli) in amounts_milli.into_iter().enumerate() {
        let giver_available: i64 = if amount_milli > 0 {
            p.get(2 + i)
        } else {
            c.get(2 + i)
        };
        if giver_available < amount_milli.saturating_abs() {
            tx.rollback().map_err(&err)?;
            return Ok(Err(TransferRefused::Insufficient {
                available_milli: giver_available.max(0),
            }));
        }
    }
    let mut next = seq;
    for (bucket, amount_milli) in Bucket::ALL.into_iter().zip(amounts_milli) {
        if amount_milli == 0 {
            continue;
        }
        let (posted_col, _, _) = bucket_columns(bucket);
        for (name, delta) in [(parent, -amount_milli), (child, amount_milli)] {
            tx.execute(
                &format!("UPDATE accounts SET {posted_col} = {posted_col} + $2 WHERE name = $1"),
                &[&name, &delta],
            )
            .map_err(&err)?;
            let entry = EntryRow {
                seq: next,
                kind: "transfer",
                account: name,
                bucket,
                amount_milli: delta,
                reference,
                at_unix_ms,
            };
            insert_entry(&mut tx, lease, &entry, &err)?;
            next += 1;
        }
    }
    tx.commit().map_err(&err)?;
    Ok(Ok(()))
}

/// The `accounts` columns of `bucket`'s posted, reserved and granted
/// balances.
fn bucket_columns(bucket: Bucket) -> (&'static str, &'static str, &'static str) {
    match bucket {
        Bucket::Anytime => (
            "anytime_posted_milli",
            "anytime_reserved_milli",
            "anytime_granted_milli",
        ),
        Bucket::OffPeak => (
            "offpeak_posted_milli",
            "offpeak_reserved_milli",
            "offpeak_granted_milli",
        ),
    }
}

/// Holds the node's lease row (shared) for the rest of `tx`, so no expiry
/// sweep can end it before the transaction commits; `Fenced` unless the
/// lease is live on the database's clock (the caller drops `tx`, which
/// rolls it back).
fn hold_lease(
    tx: &mut postgres::Transaction<'_>,
    lease: NodeLease,
    err: &impl Fn(postgres::Error) -> StoreError,
) -> Result<(), ClusterError> {
    let live = tx
        .query_opt(
            "SELECT FROM cluster_nodes
             WHERE node = $1 AND token = $2 AND NOT released AND expires_at > now()
             FOR SHARE",
            &[&lease.node, &lease.token],
        )
        .map_err(err)?;
    if live.is_some() {
        return Ok(());
    }
    Err(ClusterError::fenced(lease))
}

/// One journal entry a credit action or a transfer appends.
struct EntryRow<'a> {
    seq: u64,
    kind: &'a str,
    account: &'a str,
    bucket: Bucket,
    amount_milli: i64,
    reference: Option<&'a str>,
    at_unix_ms: i64,
}

fn insert_entry(
    tx: &mut postgres::Transaction<'_>,
    lease: NodeLease,
    e: &EntryRow<'_>,
    err: &impl Fn(postgres::Error) -> StoreError,
) -> Result<(), ClusterError> {
    tx.execute(
        "INSERT INTO entries (seq, node, kind, account, bucket, amount_milli, reference,
                              at_unix_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &(e.seq as i64),
            &lease.node,
            &e.kind,
            &e.account,
            &e.bucket.as_str(),
            &e.amount_milli,
            &e.reference,
            &e.at_unix_ms,
        ],
    )
    .map_err(err)?;
    Ok(())
}

/// The statement of [`balance`].
const BALANCE: &str = "SELECT anytime_posted_milli, anytime_reserved_milli, anytime_granted_milli,
        offpeak_posted_milli, offpeak_reserved_milli, offpeak_granted_milli
 FROM accounts WHERE name = $1";

/// `account`'s balances across the cluster, per bucket (`None`: no row).
pub fn balance(
    client: &mut impl Prepare,
    settings: &PgSettings,
    account: &str,
) -> Result<Option<[ClusterBalance; 2]>, ClusterError> {
    let statement = client.statement(Frequent::Balance).map_err(pg(settings))?;
    let row = client
        .client()
        .query_opt(&statement, &[&account])
        .map_err(pg(settings))?;
    Ok(row.map(|r| {
        [
            ClusterBalance {
                posted_milli: r.get(0),
                reserved_milli: r.get(1),
                granted_milli: r.get(2),
            },
            ClusterBalance {
                posted_milli: r.get(3),
                reserved_milli: r.get(4),
                granted_milli: r.get(5),
            },
        ]
    }))
}

/// The statement of [`claim_authcode`].
const CLAIM_AUTHCODE: &str = "INSERT INTO boxis_authcodes AS b (key, expires_at_s) VALUES ($1, $2)
 ON CONFLICT (key) DO UPDATE SET expires_at_s = excluded.expires_at_s
     WHERE b.expires_at_s <= $3
 RETURNING 1";

/// Claims a Boxis authcode's replay key (`service::boxis::ReplayCache::key`:
/// a hash of the account and the authcode, never the authcode) for the
/// whole cluster until `expires_at_s` (Unix seconds), in one statement.
/// `true`: no node had it, or only an expired claim (`expires_at_s <=
/// now_s`, which it replaces); `false`: another request (on any node) holds
/// it: a replay. Two nodes claiming one key at once are serialised by the
/// primary key: exactly one gets `true`. Needs no lease: it moves no money.
pub fn claim_authcode(
    client: &mut impl Prepare,
    settings: &PgSettings,
    key: &[u8; 16],
    expires_at_s: i64,
    now_s: i64,
) -> Result<bool, ClusterError> {
    let statement = client
        .statement(Frequent::ClaimAuthcode)
        .map_err(pg(settings))?;
    let row = client
        .client()
        .query_opt(&statement, &[&key.as_slice(), &expires_at_s, &now_s])
        .map_err(pg(settings))?;
    Ok(row.is_some())
}

/// Deletes the Boxis claims that expired before `before_s` (Unix seconds);
/// returns how many. Any node may run it at any time: a claim it deletes
/// is one [`claim_authcode`] would replace anyway.
pub fn expire_authcodes(
    client: &mut Client,
    settings: &PgSettings,
    before_s: i64,
) -> Result<u64, ClusterError> {
    let deleted = client
        .execute(
            "DELETE FROM boxis_authcodes WHERE expires_at_s < $1",
            &[&before_s],
        )
        .map_err(pg(settings))?;
    Ok(deleted)
}

/// The grant `node` holds on `account`'s `bucket` (0: none).
pub fn grant_of(
    client: &mut Client,
    settings: &PgSettings,
    node: i32,
    account: &str,
    bucket: Bucket,
) -> Result<i64, ClusterError> {
    let row = client
        .query_opt(
            "SELECT amount_milli FROM grants WHERE account = $1 AND node = $2 AND bucket = $3",
            &[&account, &node, &bucket.as_str()],
        )
        .map_err(pg(settings))?;
    Ok(row.map_or(0, |r| r.get(0)))
}

/// A node as `tollgate cluster status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub node: i32,
    pub name: String,
    pub token: i64,
    pub pid: i64,
    pub host: String,
    /// Milliseconds until the lease expires (negative: expired).
    pub lease_left_ms: i64,
    pub released: bool,
    pub grants: i64,
    pub granted_milli: i64,
    /// Milliseconds since its last commit, if any.
    pub last_commit_age_ms: Option<i64>,
}

/// Every registered node with its lease and what it holds.
pub fn status(client: &mut Client, settings: &PgSettings) -> Result<Vec<NodeStatus>, ClusterError> {
    let rows = client
        .query(
            "SELECT c.node, n.name, c.token, c.pid, c.host,
                    (EXTRACT(EPOCH FROM (c.expires_at - now())) * 1000)::bigint,
                    c.released,
                    (SELECT count(*) FROM grants g WHERE g.node = c.node AND g.amount_milli > 0),
                    COALESCE((SELECT sum(amount_milli) FROM grants g WHERE g.node = c.node), 0)::bigint,
                    (EXTRACT(EPOCH FROM (now() - c.last_commit_at)) * 1000)::bigint
             FROM cluster_nodes c JOIN nodes n ON n.id = c.node
             ORDER BY c.node",
            &[],
        )
        .map_err(pg(settings))?;
    Ok(rows
        .iter()
        .map(|r| NodeStatus {
            node: r.get(0),
            name: r.get(1),
            token: r.get(2),
            pid: r.get(3),
            host: r.get(4),
            lease_left_ms: r.get::<_, Option<i64>>(5).unwrap_or(i64::MIN),
            released: r.get(6),
            grants: r.get(7),
            granted_milli: r.get(8),
            last_commit_age_ms: r.get(9),
        })
        .collect())
}

/// The first seq of node `node`'s range: each node numbers its entries
/// (and so its reservation ids) in a range of its own, `node × 2^40 + n`,
/// so nodes never collide in the shared journal. A node continues after
/// the highest seq stored in its range.
pub const NODE_SEQ_BITS: u32 = 40;

pub fn node_seq_base(node: i32) -> u64 {
    (node.max(0) as u64) << NODE_SEQ_BITS
}

/// The next seq for `node`: one past the highest stored in its range.
pub fn next_node_seq(
    client: &mut Client,
    settings: &PgSettings,
    node: i32,
) -> Result<u64, ClusterError> {
    let base = node_seq_base(node) as i64;
    let end = node_seq_base(node + 1) as i64;
    let row = client
        .query_one(
            "SELECT COALESCE(MAX(seq), $1::bigint - 1) + 1 FROM entries
             WHERE seq >= $1::bigint AND seq < $2::bigint",
            &[&base, &end],
        )
        .map_err(pg(settings))?;
    Ok(row.get::<_, i64>(0).max(base.max(1)) as u64)
}

/// `tollgate cluster status`: every registered node of the store at
/// `settings`, its lease, what it holds and when it last committed, as
/// text. Reads only (a plain session, no ownership, nothing written).
pub fn status_report(settings: &PgSettings) -> Result<String, ClusterError> {
    use std::fmt::Write as _;
    let mut client = settings.connect("status", Some(settings.statement_timeout))?;
    let schema = crate::store::pg::schema::report(&mut client, settings)?;
    if schema.current < 4 {
        return Ok(format!(
            "store {}: {schema}; no cluster tables yet (`tollgate run` applies migration 4)",
            settings.url
        ));
    }
    let nodes = status(&mut client, settings)?;
    let mut out = format!("store {}: {} node(s)\n", settings.url, nodes.len());
    for n in &nodes {
        let lease = if n.released {
            "released".to_string()
        } else if n.lease_left_ms > 0 {
            format!("lease valid for {:.1} s", n.lease_left_ms as f64 / 1000.0)
        } else {
            format!(
                "lease expired {:.1} s ago",
                n.lease_left_ms.saturating_neg() as f64 / 1000.0
            )
        };
        let commit = n.last_commit_age_ms.map_or_else(
            || "never committed".to_string(),
            |ms| format!("last commit {:.1} s ago", ms.max(0) as f64 / 1000.0),
        );
        let _ = writeln!(
            out,
            "  node {} {:?}: token {}, pid {} on {}, {lease}, {} grant(s) holding {} milli, {commit}",
            n.node, n.name, n.token, n.pid, n.host, n.grants, n.granted_milli
        );
    }
    Ok(out)
}
