//! Write-behind persistence of the ledger (SPEC 6).
//!
//! The in-memory [`Ledger`] is authoritative for every decision; this module
//! makes its journal durable without putting a store round trip on the
//! request path. It owns the [`Store`] trait (the blocking persistence
//! backend: the embedded SQLite file ([`sqlite`]) or a PostgreSQL database
//! ([`pg`]), interchangeable without touching the ledger), the
//! [`WriteBehind`] writer (the ledger's [`EntrySink`](crate::ledger::EntrySink):
//! an in-memory queue drained by one dedicated thread in group-committed
//! batches) and the offline tools behind `tollgate ledger export|verify`.
//! It must never call into the ledger while the ledger calls it (the sink
//! only enqueues), never drop an entry, and never run SQL on a tokio worker.
//!
//! # What a store holds
//! - **entries**: the journal, append-only, one row per
//!   [`Entry`](crate::ledger::Entry), keyed by seq. This is the truth.
//! - **accounts**: name, parent, role, tariff class, and each bucket's
//!   `posted`/`reserved`. The balance columns are a *materialised sum* of the
//!   account's entries: each commit adds the batch's deltas (by the ledger's
//!   sign convention) to them in the same transaction that appends the
//!   entries, so after any crash `stored balance == replay(stored entries)`
//!   exactly — which is what `tollgate ledger verify` checks. They are never
//!   copied from the live ledger, whose state may already include entries of
//!   later batches. An account appears once its first entry is committed
//!   (accounts without entries come from the seed file on every start).
//! - **open reservations**: one row per reservation whose `reserve` entry is
//!   committed and whose resolution (`post`/`void`/`expire`) is not, kept in
//!   the same transaction, so start-up reads them without replaying the
//!   journal. Per-recipient shares are not journaled: a reservation comes
//!   back with one share of its total, in doubt (SPEC 1.3 step 8).
//!
//! # Failure modes
//! - Crash (`kill -9`, power loss in `durability: sync`): the store holds a
//!   prefix of the writer's queue, in whole batches; every change whose
//!   answer waited for durability is in it. Seqs of lost entries are reused
//!   after restart ([`Loaded::last_seq`] is the highest committed seq); seq
//!   gaps are normal (cross-account entries commit slightly out of order).
//! - Store errors: the writer keeps the batch and retries with backoff; the
//!   queue fills, callers get `store_unavailable` after `store.ack_timeout`,
//!   and everything recovers by itself when the store does.
//! - A second process: a store has one owner at a time ([`fence`]). `tollgate
//!   run` takes ownership before it loads anything and refuses to start,
//!   naming the owner, while a live process owns the store; every commit
//!   runs under the owner's fencing token, so a process that lost the
//!   store (paused past its lease, then taken over) can never commit again:
//!   its writer stops and it refuses credit. Offline readers (`tollgate
//!   ledger export|verify`) take no ownership and read beside the owner.

pub mod batch;
pub mod export;
pub mod fence;
pub mod pg;
pub mod sqlite;
pub mod verify;
pub mod writer;

use std::time::Duration;

use thiserror::Error;

use crate::ledger::{AccountView, Entry, Ledger, ReservationView, Role};

pub use pg::{PgSettings, PgStore};
pub use sqlite::SqliteStore;
pub use writer::{FlushError, StoreUnavailable, WriteBehind, WriterConfig};

/// An account's identity without its balances: what a store needs to create
/// the account row the first time one of its entries is committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountMeta {
    pub name: String,
    pub parent: Option<String>,
    pub role: Role,
    pub tariff_class: Option<String>,
}

impl AccountMeta {
    pub fn of(view: &AccountView) -> AccountMeta {
        AccountMeta {
            name: view.name.clone(),
            parent: view.parent.clone(),
            role: view.role,
            tariff_class: view.tariff_class.clone(),
        }
    }

    /// Used when the directory no longer knows an account (it cannot happen
    /// with the ledger, whose accounts are never removed; kept so a commit
    /// never fails for want of metadata).
    pub fn unknown(name: &str) -> AccountMeta {
        AccountMeta {
            name: name.to_string(),
            parent: None,
            role: Role::User,
            tariff_class: None,
        }
    }
}

/// What start-up restores into the ledger.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Every stored account with its balances (parents before children).
    pub accounts: Vec<AccountView>,
    /// Reservations open at the last stop or crash; restored in doubt.
    pub open_reservations: Vec<ReservationView>,
    /// Highest committed seq (0 for an empty store); the ledger continues at
    /// `last_seq + 1`.
    pub last_seq: u64,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(
        "store schema version {found} is newer than this tollgate supports ({supported}); \
         run a newer tollgate or restore a backup"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("store file {0} does not exist; check store.path (tollgate run creates it)")]
    Missing(String),
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// A PostgreSQL error, as text with the URL's password redacted.
    #[error("postgres: {0}")]
    Postgres(String),
    /// The PostgreSQL database named by `store.url` holds no store yet.
    #[error(
        "{0} holds no tollgate store yet (`tollgate run` creates its tables); check store.url"
    )]
    NoSchema(String),
    /// A backend that is down (fakes in tests, a network store).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Another live process owns the store: start-up refuses (see
    /// [`fence`]).
    #[error("{}", fence::owned_message(.owner, *.lease_age_ms, *.lease))]
    Owned {
        owner: Box<fence::OwnerRecord>,
        /// How long ago the owner last renewed its lease.
        lease_age_ms: i64,
        lease: Duration,
    },
    /// This process's fencing token is no longer the owner's: another
    /// process took the store over, and nothing was committed.
    #[error("fenced: {}", fence::fenced_message(.owner.as_deref()))]
    Fenced {
        /// The new owner, when it could be read.
        owner: Option<Box<fence::OwnerRecord>>,
    },
    /// A cluster node's commit found its lease expired on the database's
    /// clock, or replaced by a new incarnation of the node: nothing was
    /// committed (see `crate::cluster`). Treated as [`StoreError::Fenced`]:
    /// the writer stops and the process refuses credit.
    #[error(
        "fenced: this cluster node's lease (node {node}, token {token}) expired on the database \
         or was replaced by a new incarnation; this process commits nothing more and refuses \
         credit, restart it"
    )]
    LeaseLost { node: i32, token: i64 },
}

/// A blocking persistence backend. Used only by the writer thread and at
/// start-up / by the offline tools, never on a request path.
///
/// Contract for implementations:
/// - [`commit`](Store::commit) is one transaction: all of the batch or none.
///   It appends the entries, adds their deltas to the touched accounts'
///   stored balances (creating an account row from `accounts` the first
///   time), and maintains the open reservations. Entries arrive in queue
///   order: per account that is seq order, across accounts it is not.
/// - After a failed `commit` the writer retries the *same* batch; an
///   implementation must make that retry a no-op if the failed attempt did
///   commit after all (e.g. an error reported after `COMMIT` reached disk).
/// - A store opened under ownership checks the owner's fencing token inside
///   the commit's transaction and fails with [`StoreError::Fenced`],
///   writing nothing, when another process owns the store now; the writer
///   never retries that.
pub trait Store: Send {
    /// Balances, open reservations and the last seq, for start-up.
    fn load(&mut self) -> Result<Loaded, StoreError>;

    /// Durably commits one batch; `accounts` describes every account the
    /// entries touch (only needed for accounts new to the store).
    fn commit(&mut self, entries: &[Entry], accounts: &[AccountMeta]) -> Result<(), StoreError>;

    /// Visits every entry in seq order (export, verify); returns how many.
    /// Stops at the visitor's first error.
    fn for_each_entry(
        &mut self,
        visit: &mut dyn FnMut(Entry) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError>;

    /// The stored balance rows (what `verify` compares the replay with).
    fn stored_balances(&mut self) -> Result<Vec<AccountView>, StoreError>;
}

/// Where the writer looks up an account's identity when a batch touches it.
/// Implemented by the ledger; the writer holds it weakly (the ledger owns
/// the writer through its sink, so a strong reference would be a cycle).
pub trait AccountDirectory: Send + Sync {
    fn account_meta(&self, name: &str) -> Option<AccountMeta>;
}

impl AccountDirectory for Ledger {
    fn account_meta(&self, name: &str) -> Option<AccountMeta> {
        self.account(name).map(|v| AccountMeta::of(&v))
    }
}
