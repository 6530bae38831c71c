//! The grant protocol as a pure, executable model: the database side
//! ([`Db`], one method per SQL statement of [`super::sql`]) and the node
//! side ([`Node`], what a node keeps in memory), with no I/O and one clock.
//!
//! It is the specification the SQL implements and the property tests (at
//! the bottom of this file) run random interleavings of grant, top-up,
//! reserve, settle (post + void), commit, return, lease renewal, lost
//! answers, clock steps, expiry and node death against it, checking after
//! every step:
//! - **available never below zero**: `posted − reserved − granted ≥ 0` for
//!   every account, every grant ≥ 0, `granted = Σ grants`;
//! - **credit conserved**: `posted = initial + credit actions − committed
//!   posts`, and the money a node may still spend is covered by its grant
//!   on the database (`grant ≥ free + pending reserves − pending voids`);
//! - **a dead node's committed reservations stay reserved**: `reserved` is
//!   exactly the sum of the open reservations whose `reserve` committed,
//!   dead nodes' included, after any expiry;
//! - **fencing**: a node reserves only while its lease is valid on the
//!   database's clock, and no commit is accepted after its lease expired.
//!
//! One bucket per account: the two buckets are independent rows of the same
//! arithmetic (the SQL carries both).

use std::collections::{BTreeMap, VecDeque};

/// A node's number (`nodes.id` in the store).
pub type NodeId = u32;

/// An account's stored balances and how much of it is granted out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DbAccount {
    pub posted_milli: i64,
    pub reserved_milli: i64,
    /// `Σ grants` of the account: kept on the account row so that taking a
    /// grant is one conditional `UPDATE` of one row.
    pub granted_milli: i64,
}

impl DbAccount {
    /// What is neither reserved nor held by a node: what the next grant
    /// (or a direct reservation) may take.
    pub fn available_milli(&self) -> i64 {
        self.posted_milli - self.reserved_milli - self.granted_milli
    }
}

/// A node's lease row (`cluster_nodes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub token: u64,
    pub renewed_at_ms: i64,
    pub expires_at_ms: i64,
    pub released: bool,
}

impl Lease {
    fn valid(&self, token: u64, now_ms: i64) -> bool {
        self.token == token && !self.released && now_ms < self.expires_at_ms
    }
}

/// One journal entry of a node's batch, as far as the grant protocol is
/// concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// `reserve`: moves `amount` from the node's grant into `reserved`.
    Reserve {
        id: u64,
        account: String,
        amount_milli: i64,
    },
    /// `post`: the spent part leaves `posted` and `reserved`.
    Post {
        id: u64,
        account: String,
        amount_milli: i64,
    },
    /// `void`/`expire`: the unspent part goes from `reserved` back into the
    /// node's grant (the node's memory already counts it as free).
    Void {
        id: u64,
        account: String,
        amount_milli: i64,
    },
}

/// Why the database refused a statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The token is not the node's current one, or its lease expired on the
    /// database's clock, or it was released: nothing was written.
    Fenced,
    /// Not that much available (a take, a credit deduction).
    Insufficient { available_milli: i64 },
    /// Another live incarnation of the node holds the lease.
    LeaseHeld,
    /// The batch would take a grant below zero: a node bug; the whole
    /// statement fails (`CHECK (amount_milli >= 0)`).
    GrantOverdrawn,
}

/// The database: accounts, grants, leases, open reservations.
#[derive(Clone, Debug, Default)]
pub struct Db {
    pub now_ms: i64,
    pub accounts: BTreeMap<String, DbAccount>,
    pub grants: BTreeMap<(String, NodeId), i64>,
    pub leases: BTreeMap<NodeId, Lease>,
    /// Reservations whose `reserve` committed and whose resolution did not:
    /// id → (account, node, amount).
    pub open: BTreeMap<u64, (String, NodeId, i64)>,
    next_token: u64,
    /// Credit put in and taken out by credit actions, and posted: for the
    /// conservation check.
    pub credited_milli: i64,
    pub posted_out_milli: i64,
}

impl Db {
    fn account(&mut self, name: &str) -> &mut DbAccount {
        self.accounts.entry(name.to_string()).or_default()
    }

    /// Registers an incarnation of `node`: a new token and lease. Refused
    /// while a previous incarnation's lease is valid and not released;
    /// whatever an expired or released incarnation still held is returned
    /// to its accounts in the same statement (its committed reservations
    /// stay reserved).
    pub fn register(&mut self, node: NodeId, lease_ms: i64) -> Result<u64, Refused> {
        if let Some(l) = self.leases.get(&node) {
            if !l.released && self.now_ms < l.expires_at_ms {
                return Err(Refused::LeaseHeld);
            }
        }
        self.return_all(node);
        self.next_token += 1;
        let token = self.next_token;
        self.leases.insert(
            node,
            Lease {
                token,
                renewed_at_ms: self.now_ms,
                expires_at_ms: self.now_ms + lease_ms,
                released: false,
            },
        );
        Ok(token)
    }

    /// Extends a valid lease; an expired one cannot be renewed (the node
    /// must register again, as a new incarnation).
    pub fn renew(&mut self, node: NodeId, token: u64, lease_ms: i64) -> Result<(), Refused> {
        let now = self.now_ms;
        match self.leases.get_mut(&node) {
            Some(l) if l.valid(token, now) => {
                l.renewed_at_ms = now;
                l.expires_at_ms = now + lease_ms;
                Ok(())
            }
            _ => Err(Refused::Fenced),
        }
    }

    /// A clean shutdown: every grant back, the lease released.
    pub fn release(&mut self, node: NodeId, token: u64) -> Result<(), Refused> {
        match self.leases.get(&node) {
            Some(l) if l.token == token && !l.released => {}
            _ => return Err(Refused::Fenced),
        }
        self.return_all(node);
        if let Some(l) = self.leases.get_mut(&node) {
            l.released = true;
        }
        Ok(())
    }

    fn return_all(&mut self, node: NodeId) {
        let held: Vec<(String, i64)> = self
            .grants
            .iter()
            .filter(|((_, n), _)| *n == node)
            .map(|((a, _), g)| (a.clone(), *g))
            .collect();
        for (account, g) in held {
            self.account(&account).granted_milli -= g;
            self.grants.remove(&(account, node));
        }
    }

    /// Takes (or tops up) a grant of exactly `amount` when that much is
    /// available cluster-wide: `UPDATE accounts … WHERE available >= $n`.
    pub fn take(
        &mut self,
        node: NodeId,
        token: u64,
        account: &str,
        amount_milli: i64,
    ) -> Result<(), Refused> {
        let now = self.now_ms;
        if !self.leases.get(&node).is_some_and(|l| l.valid(token, now)) {
            return Err(Refused::Fenced);
        }
        let a = self.account(account);
        if amount_milli <= 0 || a.available_milli() < amount_milli {
            return Err(Refused::Insufficient {
                available_milli: a.available_milli(),
            });
        }
        a.granted_milli += amount_milli;
        *self.grants.entry((account.to_string(), node)).or_default() += amount_milli;
        Ok(())
    }

    /// Gives `amount` of a grant back (idle, shrinking): `UPDATE grants …
    /// WHERE amount_milli >= $n`; refused when the grant holds less (the
    /// node keeps it). Needs the token, not a valid lease: returning is
    /// always safe.
    pub fn give_back(
        &mut self,
        node: NodeId,
        token: u64,
        account: &str,
        amount_milli: i64,
    ) -> Result<(), Refused> {
        if self.leases.get(&node).map(|l| l.token) != Some(token) {
            return Err(Refused::Fenced);
        }
        let key = (account.to_string(), node);
        let held = self.grants.get(&key).copied().unwrap_or(0);
        if amount_milli <= 0 || held < amount_milli {
            return Err(Refused::Insufficient {
                available_milli: held,
            });
        }
        self.grants.insert(key, held - amount_milli);
        self.account(account).granted_milli -= amount_milli;
        Ok(())
    }

    /// Returns the grants of every node whose lease is not valid and whose
    /// last renewal is older than `grant_ttl_ms` (`≥` the lease, so such a
    /// node can no longer commit). Returns how much came back.
    pub fn expire(&mut self, grant_ttl_ms: i64) -> i64 {
        let now = self.now_ms;
        let dead: Vec<NodeId> = self
            .leases
            .iter()
            .filter(|(_, l)| now >= l.renewed_at_ms + grant_ttl_ms && now >= l.expires_at_ms)
            .map(|(n, _)| *n)
            .collect();
        let mut back = 0;
        for node in dead {
            back += self
                .grants
                .iter()
                .filter(|((_, n), _)| *n == node)
                .map(|(_, g)| *g)
                .sum::<i64>();
            self.return_all(node);
        }
        back
    }

    /// One group commit of `node`: refused whole when the lease is not
    /// valid at the database's `now`, or when a grant would go below zero.
    pub fn commit(&mut self, node: NodeId, token: u64, batch: &[Change]) -> Result<(), Refused> {
        let now = self.now_ms;
        if !self.leases.get(&node).is_some_and(|l| l.valid(token, now)) {
            return Err(Refused::Fenced);
        }
        // All or nothing: apply to a copy.
        let mut next = self.clone();
        for c in batch {
            match c {
                Change::Reserve {
                    id,
                    account,
                    amount_milli,
                } => {
                    let a = next.account(account);
                    a.reserved_milli += amount_milli;
                    a.granted_milli -= amount_milli;
                    *next.grants.entry((account.clone(), node)).or_default() -= amount_milli;
                    next.open
                        .insert(*id, (account.clone(), node, *amount_milli));
                }
                Change::Post {
                    id,
                    account,
                    amount_milli,
                } => {
                    let a = next.account(account);
                    a.posted_milli -= amount_milli;
                    a.reserved_milli -= amount_milli;
                    next.posted_out_milli += amount_milli;
                    if let Some(o) = next.open.get_mut(id) {
                        o.2 -= amount_milli;
                    }
                }
                Change::Void {
                    id,
                    account,
                    amount_milli,
                } => {
                    let a = next.account(account);
                    a.reserved_milli -= amount_milli;
                    a.granted_milli += amount_milli;
                    *next.grants.entry((account.clone(), node)).or_default() += amount_milli;
                    if let Some(o) = next.open.get_mut(id) {
                        o.2 -= amount_milli;
                    }
                }
            }
        }
        next.open.retain(|_, o| o.2 != 0);
        if next.grants.values().any(|g| *g < 0) {
            return Err(Refused::GrantOverdrawn);
        }
        *self = next;
        Ok(())
    }

    /// A credit action (addcredits, a deduction, a transfer leg) straight
    /// in the database; a deduction only from what is available.
    pub fn credit(&mut self, account: &str, delta_milli: i64) -> Result<(), Refused> {
        let a = self.account(account);
        if a.available_milli() + delta_milli < 0 {
            return Err(Refused::Insufficient {
                available_milli: a.available_milli(),
            });
        }
        a.posted_milli += delta_milli;
        self.credited_milli += delta_milli;
        Ok(())
    }
}

/// A reservation a node holds in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub account: String,
    pub amount_milli: i64,
}

/// What a node keeps in memory for the protocol.
#[derive(Clone, Debug)]
pub struct Node {
    pub id: NodeId,
    pub token: u64,
    /// Per account: what the node may still reserve (its grant less what it
    /// reserved, plus what it voided). The in-memory ledger's `available`.
    pub free: BTreeMap<String, i64>,
    /// Entries not yet committed, in order.
    pub pending: VecDeque<Change>,
    pub reservations: BTreeMap<u64, Held>,
    /// The node stops reserving at this time: its last confirmed renewal's
    /// start plus the lease, less the margin. The database's expiry is
    /// later by at least the margin.
    pub spend_until_ms: i64,
}

impl Node {
    /// A new incarnation (registers; refused while another one lives).
    pub fn start(db: &mut Db, id: NodeId, lease_ms: i64, margin_ms: i64) -> Result<Node, Refused> {
        let started = db.now_ms;
        let token = db.register(id, lease_ms)?;
        Ok(Node {
            id,
            token,
            free: BTreeMap::new(),
            pending: VecDeque::new(),
            reservations: BTreeMap::new(),
            spend_until_ms: started + lease_ms - margin_ms,
        })
    }

    pub fn free_milli(&self, account: &str) -> i64 {
        self.free.get(account).copied().unwrap_or(0)
    }

    pub fn renew(&mut self, db: &mut Db, lease_ms: i64, margin_ms: i64) -> Result<(), Refused> {
        // Measured from before the statement: the database's `now()` is
        // later, so its expiry is later than the node believes.
        let sent = db.now_ms;
        db.renew(self.id, self.token, lease_ms)?;
        self.spend_until_ms = sent + lease_ms - margin_ms;
        Ok(())
    }

    /// Takes a grant; `answer_lost`: the statement committed but the answer
    /// never arrived, so the node does not count it (stranded until the
    /// node's grants are returned or expire: never spent twice).
    pub fn take(
        &mut self,
        db: &mut Db,
        account: &str,
        amount_milli: i64,
        answer_lost: bool,
    ) -> Result<(), Refused> {
        db.take(self.id, self.token, account, amount_milli)?;
        if !answer_lost {
            *self.free.entry(account.to_string()).or_default() += amount_milli;
        }
        Ok(())
    }

    /// Gives back up to `amount` of what is free, less what uncommitted
    /// voids put back into `free`: that part is not in the database's grant
    /// yet, and a batch committing an earlier reserve before the void would
    /// find the grant short (the property test found exactly this). Taken
    /// out of `free` before the statement runs (so it cannot be reserved
    /// meanwhile) and put back only when the database refused.
    pub fn give_back(&mut self, db: &mut Db, account: &str, amount_milli: i64) -> i64 {
        let n = amount_milli.min(self.returnable_milli(account));
        if n <= 0 {
            return 0;
        }
        *self.free.entry(account.to_string()).or_default() -= n;
        match db.give_back(self.id, self.token, account, n) {
            Ok(()) => n,
            Err(_) => {
                *self.free.entry(account.to_string()).or_default() += n;
                0
            }
        }
    }

    /// What may be given back now: `free` less the pending voids of the
    /// account (each batch is a prefix of the pending entries, so a void
    /// counts only once every reserve before it has committed).
    pub fn returnable_milli(&self, account: &str) -> i64 {
        let voided: i64 = self
            .pending
            .iter()
            .map(|c| match c {
                Change::Void {
                    account: a,
                    amount_milli,
                    ..
                } if a == account => *amount_milli,
                _ => 0,
            })
            .sum();
        (self.free_milli(account) - voided).max(0)
    }

    /// Decides a reservation from memory alone.
    pub fn reserve(&mut self, now_ms: i64, id: u64, account: &str, amount_milli: i64) -> bool {
        if now_ms >= self.spend_until_ms || amount_milli < 0 {
            return false;
        }
        let free = self.free.entry(account.to_string()).or_default();
        if *free < amount_milli {
            return false;
        }
        *free -= amount_milli;
        self.pending.push_back(Change::Reserve {
            id,
            account: account.to_string(),
            amount_milli,
        });
        self.reservations.insert(
            id,
            Held {
                account: account.to_string(),
                amount_milli,
            },
        );
        true
    }

    /// Settles a reservation: `spent` posted, the rest voided (back to free).
    pub fn settle(&mut self, id: u64, spent_milli: i64) -> bool {
        let Some(held) = self.reservations.remove(&id) else {
            return false;
        };
        let spent = spent_milli.clamp(0, held.amount_milli);
        if spent > 0 {
            self.pending.push_back(Change::Post {
                id,
                account: held.account.clone(),
                amount_milli: spent,
            });
        }
        let rest = held.amount_milli - spent;
        if rest > 0 {
            self.pending.push_back(Change::Void {
                id,
                account: held.account.clone(),
                amount_milli: rest,
            });
            *self.free.entry(held.account).or_default() += rest;
        }
        true
    }

    /// Commits the first `n` pending entries as one batch.
    pub fn commit(&mut self, db: &mut Db, n: usize) -> Result<usize, Refused> {
        let n = n.min(self.pending.len());
        if n == 0 {
            return Ok(0);
        }
        let batch: Vec<Change> = self.pending.iter().take(n).cloned().collect();
        db.commit(self.id, self.token, &batch)?;
        self.pending.drain(..n);
        Ok(n)
    }

    /// What this node's memory says its grant on `account` is on the
    /// database once every pending entry is committed: free, plus pending
    /// reserves, less pending voids.
    pub fn expected_grant_milli(&self, account: &str) -> i64 {
        let mut g = self.free_milli(account);
        for c in &self.pending {
            match c {
                Change::Reserve {
                    account: a,
                    amount_milli,
                    ..
                } if a == account => g += amount_milli,
                Change::Void {
                    account: a,
                    amount_milli,
                    ..
                } if a == account => g -= amount_milli,
                _ => {}
            }
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LEASE_MS: i64 = 1_000;
    const MARGIN_MS: i64 = 200;
    const GRANT_TTL_MS: i64 = 1_500;
    const NODES: u32 = 3;
    const ACCOUNTS: [&str; 2] = ["a", "b"];

    #[derive(Clone, Debug)]
    enum Op {
        Take {
            node: u32,
            account: usize,
            amount: i64,
            lost: bool,
        },
        Reserve {
            node: u32,
            account: usize,
            amount: i64,
        },
        Settle {
            node: u32,
            pick: usize,
            spent_percent: i64,
        },
        Commit {
            node: u32,
            n: usize,
        },
        GiveBack {
            node: u32,
            account: usize,
            amount: i64,
        },
        Renew {
            node: u32,
        },
        Tick {
            ms: i64,
        },
        Expire,
        Die {
            node: u32,
        },
        Start {
            node: u32,
        },
        Release {
            node: u32,
        },
        Credit {
            account: usize,
            delta: i64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let node = 0..NODES;
        let account = 0..ACCOUNTS.len();
        prop_oneof![
            4 => (node.clone(), account.clone(), 1i64..4_000, proptest::bool::weighted(0.1))
                .prop_map(|(node, account, amount, lost)| Op::Take { node, account, amount, lost }),
            8 => (node.clone(), account.clone(), 0i64..1_500)
                .prop_map(|(node, account, amount)| Op::Reserve { node, account, amount }),
            6 => (node.clone(), any::<usize>(), 0i64..=100)
                .prop_map(|(node, pick, spent_percent)| Op::Settle { node, pick, spent_percent }),
            5 => (node.clone(), 1usize..6).prop_map(|(node, n)| Op::Commit { node, n }),
            2 => (node.clone(), account.clone(), 1i64..3_000)
                .prop_map(|(node, account, amount)| Op::GiveBack { node, account, amount }),
            4 => node.clone().prop_map(|node| Op::Renew { node }),
            4 => (1i64..600).prop_map(|ms| Op::Tick { ms }),
            2 => Just(Op::Expire),
            1 => node.clone().prop_map(|node| Op::Die { node }),
            2 => node.clone().prop_map(|node| Op::Start { node }),
            1 => node.clone().prop_map(|node| Op::Release { node }),
            1 => (account, -3_000i64..5_000).prop_map(|(account, delta)| Op::Credit { account, delta }),
        ]
    }

    struct World {
        db: Db,
        nodes: BTreeMap<NodeId, Node>,
        next_id: u64,
        initial_milli: i64,
    }

    impl World {
        fn new() -> World {
            let mut db = Db::default();
            for a in ACCOUNTS {
                db.accounts.insert(
                    a.to_string(),
                    DbAccount {
                        posted_milli: 10_000,
                        ..DbAccount::default()
                    },
                );
            }
            let mut nodes = BTreeMap::new();
            for id in 0..NODES {
                nodes.insert(id, Node::start(&mut db, id, LEASE_MS, MARGIN_MS).unwrap());
            }
            World {
                db,
                nodes,
                next_id: 1,
                initial_milli: 10_000 * ACCOUNTS.len() as i64,
            }
        }

        fn apply(&mut self, op: &Op) {
            let db = &mut self.db;
            match *op {
                Op::Take {
                    node,
                    account,
                    amount,
                    lost,
                } => {
                    if let Some(n) = self.nodes.get_mut(&node) {
                        let _ = n.take(db, ACCOUNTS[account], amount, lost);
                    }
                }
                Op::Reserve {
                    node,
                    account,
                    amount,
                } => {
                    if let Some(n) = self.nodes.get_mut(&node) {
                        let id = self.next_id;
                        self.next_id += 1;
                        if n.reserve(db.now_ms, id, ACCOUNTS[account], amount) {
                            // Decided from memory: the lease is valid on the
                            // database's clock at that moment.
                            let lease = db.leases[&node];
                            assert!(lease.valid(n.token, db.now_ms), "reserved on a dead lease");
                        }
                    }
                }
                Op::Settle {
                    node,
                    pick,
                    spent_percent,
                } => {
                    if let Some(n) = self.nodes.get_mut(&node) {
                        let ids: Vec<u64> = n.reservations.keys().copied().collect();
                        if !ids.is_empty() {
                            let id = ids[pick % ids.len()];
                            let amount = n.reservations[&id].amount_milli;
                            assert!(n.settle(id, amount * spent_percent / 100));
                        }
                    }
                }
                Op::Commit { node, n: k } => {
                    if let Some(n) = self.nodes.get_mut(&node) {
                        let lease = db.leases[&node];
                        match n.commit(db, k) {
                            Ok(_) => {}
                            Err(Refused::Fenced) => {
                                assert!(!lease.valid(n.token, db.now_ms));
                                // A fenced node stops: it is as good as dead
                                // (its uncommitted entries are lost with it).
                                self.nodes.remove(&node);
                            }
                            Err(e) => panic!("a live node's commit refused: {e:?}"),
                        }
                    }
                }
                Op::GiveBack {
                    node,
                    account,
                    amount,
                } => {
                    if let Some(n) = self.nodes.get_mut(&node) {
                        n.give_back(db, ACCOUNTS[account], amount);
                    }
                }
                Op::Renew { node } => {
                    if let Some(n) = self.nodes.get_mut(&node) {
                        let _ = n.renew(db, LEASE_MS, MARGIN_MS);
                    }
                }
                Op::Tick { ms } => db.now_ms += ms,
                Op::Expire => {
                    db.expire(GRANT_TTL_MS);
                }
                Op::Die { node } => {
                    self.nodes.remove(&node);
                }
                Op::Start { node } => {
                    if let std::collections::btree_map::Entry::Vacant(e) = self.nodes.entry(node) {
                        if let Ok(n) = Node::start(db, node, LEASE_MS, MARGIN_MS) {
                            e.insert(n);
                        }
                    }
                }
                Op::Release { node } => {
                    if let Some(n) = self.nodes.get(&node) {
                        if n.pending.is_empty() && n.reservations.is_empty() {
                            db.release(node, n.token).unwrap();
                            self.nodes.remove(&node);
                        }
                    }
                }
                Op::Credit { account, delta } => {
                    let _ = db.credit(ACCOUNTS[account], delta);
                }
            }
        }

        fn check(&self) {
            let db = &self.db;
            for (name, a) in &db.accounts {
                assert!(
                    a.available_milli() >= 0,
                    "{name} available below zero: {a:?}"
                );
                assert!(
                    a.reserved_milli >= 0 && a.granted_milli >= 0,
                    "{name}: {a:?}"
                );
                let granted: i64 = db
                    .grants
                    .iter()
                    .filter(|((acc, _), _)| acc == name)
                    .map(|(_, g)| *g)
                    .sum();
                assert_eq!(granted, a.granted_milli, "{name}: granted = Σ grants");
                // Reserved is exactly what committed reservations hold, the
                // dead nodes' included (in doubt for the operator).
                let open: i64 = db
                    .open
                    .values()
                    .filter(|(acc, _, _)| acc == name)
                    .map(|(_, _, x)| *x)
                    .sum();
                assert_eq!(open, a.reserved_milli, "{name}: reserved = Σ open");
            }
            assert!(db.grants.values().all(|g| *g >= 0));
            // Conservation: nothing appears or vanishes.
            let posted: i64 = db.accounts.values().map(|a| a.posted_milli).sum();
            assert_eq!(
                posted,
                self.initial_milli + db.credited_milli - db.posted_out_milli
            );
            // A live node never believes it holds more than the database
            // says it does (a lost take answer makes it believe less).
            for n in self.nodes.values() {
                for a in ACCOUNTS {
                    assert!(n.free_milli(a) >= 0);
                    let held = db.grants.get(&(a.to_string(), n.id)).copied().unwrap_or(0);
                    let lease = db.leases[&n.id];
                    if lease.token == n.token && db.now_ms < lease.expires_at_ms {
                        assert!(
                            held >= n.expected_grant_milli(a),
                            "node {} on {a}: db grant {held} < memory {}",
                            n.id,
                            n.expected_grant_milli(a)
                        );
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_interleavings_keep_every_invariant(ops in proptest::collection::vec(op(), 1..200)) {
            let mut w = World::new();
            w.check();
            for op in &ops {
                w.apply(op);
                w.check();
            }
            // Every live node commits what it has and the clock runs out:
            // all grants come back, only committed reservations stay.
            for n in w.nodes.values_mut() {
                let k = n.pending.len();
                if n.commit(&mut w.db, k).is_err() {
                    n.pending.clear();
                }
            }
            w.db.now_ms += GRANT_TTL_MS + LEASE_MS;
            w.db.expire(GRANT_TTL_MS);
            w.nodes.clear();
            w.check();
            prop_assert!(w.db.grants.values().all(|g| *g == 0));
            for a in w.db.accounts.values() {
                prop_assert_eq!(a.granted_milli, 0);
            }
        }
    }

    #[test]
    fn two_nodes_race_for_the_last_credit_and_one_gets_it() {
        let mut db = Db::default();
        db.credit("a", 1_000).unwrap();
        let mut n1 = Node::start(&mut db, 1, LEASE_MS, MARGIN_MS).unwrap();
        let mut n2 = Node::start(&mut db, 2, LEASE_MS, MARGIN_MS).unwrap();
        assert!(n1.take(&mut db, "a", 1_000, false).is_ok());
        assert_eq!(
            n2.take(&mut db, "a", 1_000, false),
            Err(Refused::Insufficient { available_milli: 0 })
        );
        assert!(n1.reserve(db.now_ms, 1, "a", 1_000));
        assert!(!n2.reserve(db.now_ms, 2, "a", 1_000));
    }

    #[test]
    fn a_give_back_never_returns_what_an_uncommitted_void_freed() {
        // Found by the property test: give back everything free while a
        // reserve and its void are pending, then commit the reserve alone.
        let mut db = Db::default();
        db.credit("a", 1_000).unwrap();
        let mut n = Node::start(&mut db, 1, LEASE_MS, MARGIN_MS).unwrap();
        n.take(&mut db, "a", 923, false).unwrap();
        assert!(n.reserve(db.now_ms, 1, "a", 2));
        assert!(n.settle(1, 1));
        assert_eq!(n.free_milli("a"), 922);
        assert_eq!(n.give_back(&mut db, "a", 922), 921);
        assert_eq!(n.commit(&mut db, 1), Ok(1));
        assert_eq!(n.commit(&mut db, 2), Ok(2));
        assert_eq!(db.grants[&("a".to_string(), 1)], n.free_milli("a"));
    }

    #[test]
    fn a_cut_off_node_stops_before_its_lease_expires_and_cannot_commit_after() {
        let mut db = Db::default();
        db.credit("a", 5_000).unwrap();
        let mut n = Node::start(&mut db, 1, LEASE_MS, MARGIN_MS).unwrap();
        n.take(&mut db, "a", 5_000, false).unwrap();
        db.now_ms += LEASE_MS - MARGIN_MS;
        // No renewal got through: the node stops spending at its margin.
        assert!(!n.reserve(db.now_ms, 1, "a", 100));
        db.now_ms -= 1;
        assert!(n.reserve(db.now_ms, 1, "a", 100));
        db.now_ms += MARGIN_MS + 1;
        assert_eq!(n.commit(&mut db, 1), Err(Refused::Fenced));
        assert_eq!(n.renew(&mut db, LEASE_MS, MARGIN_MS), Err(Refused::Fenced));
        db.now_ms += GRANT_TTL_MS;
        assert_eq!(db.expire(GRANT_TTL_MS), 5_000);
        assert_eq!(db.accounts["a"].available_milli(), 5_000);
    }

    #[test]
    fn a_dead_nodes_committed_reservations_stay_reserved_after_its_grants_expire() {
        let mut db = Db::default();
        db.credit("a", 5_000).unwrap();
        let mut n = Node::start(&mut db, 1, LEASE_MS, MARGIN_MS).unwrap();
        n.take(&mut db, "a", 3_000, false).unwrap();
        assert!(n.reserve(db.now_ms, 1, "a", 1_000));
        n.commit(&mut db, 1).unwrap();
        assert!(n.reserve(db.now_ms, 2, "a", 500)); // never committed
        drop(n);
        // A new incarnation cannot register while the old lease is valid.
        assert_eq!(
            Node::start(&mut db, 1, LEASE_MS, MARGIN_MS).err(),
            Some(Refused::LeaseHeld)
        );
        db.now_ms += GRANT_TTL_MS;
        assert_eq!(db.expire(GRANT_TTL_MS), 2_000);
        let a = db.accounts["a"];
        assert_eq!((a.reserved_milli, a.granted_milli), (1_000, 0));
        assert_eq!(a.available_milli(), 4_000);
    }
}
