//! Several tollgate nodes on one PostgreSQL ledger, through credit grants.
//!
//! Owns the grant protocol ([`model`]: the executable specification and its
//! property tests), grant sizing ([`sizing`]) and the protocol's SQL
//! ([`sql`]: node leases with their own fencing tokens, taking, topping up,
//! returning and expiring grants, credit actions; the group commit under a
//! grant is the store's, `PgStore::open_under_lease`) and the node's lease
//! keeper ([`keeper`]: renewals, expiry sweeps, and whether the node may
//! spend now, a lock-free read). It
//! must never run SQL on a tokio worker (blocking `postgres::Client` on
//! dedicated threads only, as [`crate::store::pg`]), and never decide a
//! reservation that its grants do not cover.
//!
//! # The protocol (learned from RFC 4006 credit-control and Doorman leases)
//! PostgreSQL is the system of record. Each account row carries, per
//! bucket, `posted`, `reserved` (the sums of the committed journal, as on
//! one node) and `granted` (the sum of the `grants` rows of that account
//! and bucket). What the cluster may still hand out is
//! `available = posted − reserved − granted ≥ 0`.
//!
//! - **Lease.** A node registers in `cluster_nodes` (its own fencing token,
//!   bumped at each registration, and a lease expiring on the database's
//!   clock, `now()`). Registration is refused while a previous incarnation
//!   of the same node id holds a valid lease; it returns what an expired
//!   incarnation still held. A lease is renewed only while valid: once it
//!   expired, that token can never write again.
//! - **Grant.** A node takes a slice of an account with one conditional
//!   statement (`UPDATE accounts … WHERE available >= $n`): never more than
//!   is available cluster-wide. Top-ups are the same statement.
//! - **Reserve in memory.** The node's in-memory ledger decides each
//!   reservation from what it holds (`free` = grant less reserved, plus
//!   voided), with no round trip.
//! - **Commit under the grant.** Each group commit checks the node's token
//!   and that its lease has not expired at the database's `now()`, in the
//!   same statement; it moves what was reserved from the grant into
//!   `reserved`, voids back into the grant, and posts out of `posted` and
//!   `reserved`. A grant that would go below zero fails the statement
//!   (`CHECK`): a node bug, failed closed.
//! - **Return.** Idle or shrinking grants, and every grant at shutdown,
//!   come back with one conditional statement (`WHERE amount >= $n`).
//! - **Expiry.** The grants of a node whose lease expired and whose last
//!   renewal is older than the grant TTL (≥ the lease) come back in one
//!   statement any node may run (`FOR UPDATE SKIP LOCKED`); what its
//!   committed journal reserved stays reserved, in doubt, for the operator.
//! - **Direct mode.** An account whose available balance is below
//!   `direct_below_milli` is not sliced: the node takes exactly what the
//!   send needs (one round trip) and reserves it, so the last credits of an
//!   account are usable from any node.
//!
//! # Failure modes
//! - A node dies: its grants come back after the grant TTL; its committed
//!   reservations stay reserved (in doubt); its uncommitted entries are
//!   lost with it (with `durability: sync` nothing was forwarded for them).
//! - A node is cut off from PostgreSQL: it stops reserving at its last
//!   confirmed renewal's *start* plus the lease less the margin, before the
//!   database's expiry (measured from the renewal's `now()`, later); after
//!   it rejoins, its commits are refused (lease expired) and it must
//!   register again.
//! - A take's answer is lost: the node does not count the grant; it is
//!   stranded (never spent twice) until the node returns everything or its
//!   grants expire.

pub mod keeper;
pub mod model;
pub mod node;
pub mod sizing;
pub mod sql;
#[cfg(test)]
mod sql_tests;
