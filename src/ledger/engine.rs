//! The [`Ledger`]: accounts, reservations and the operations that move
//! credit between them.
//!
//! Owns the account map, the reservation map, the seq counter and the
//! running total of posted credit. Every operation validates first, then
//! changes balances and records its entries inside one critical section of
//! the touched account(s), so a failed operation changes nothing. It must
//! never block on I/O, never hold a guard of the account map while locking
//! an account, and never lock two accounts except in name order.
//!
//! Costs: every operation is O(1) in the number of accounts except the
//! sweeps ([`Ledger::expire_due`], [`Ledger::resolve_in_doubt_older_than`])
//! and listings, which iterate the reservation map (only unresolved
//! reservations live there: in-flight sends plus in-doubt ones), and
//! [`Ledger::account_names`], which walks every account.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use compact_str::CompactString;
use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;
use parking_lot::Mutex;

use super::reservation::Held;
use super::reservation::Reservation;
use super::{
    AccountBalances, AccountView, Applied, Bucket, BucketBalance, BucketPreference, Clock, Entry,
    EntryKind, EntrySink, LedgerConfig, LedgerError, Overdraft, ReservationId, ReservationState,
    ReservationView, Role, Settlement, TransferOutcome, ACCOUNT_NAME_MAX_CHARS,
};

/// One account's mutable state. Kept small (40 bytes): at 10 M accounts
/// every byte here costs 10 MB.
#[derive(Debug)]
struct AccountState {
    /// Parent, tariff class and role, interned together: the common account
    /// (a user with neither parent nor class) has `None`, no allocation, and
    /// the sub-accounts of one parent in one class share one `Profile`.
    profile: Option<Arc<Profile>>,
    anytime: BucketBalance,
    offpeak: BucketBalance,
}

/// An account's parent, tariff class and role (see
/// [`AccountState::profile`]). Both names are interned ([`Ledger::names`]).
#[derive(Debug, PartialEq, Eq, Hash)]
struct Profile {
    parent: Option<Arc<str>>,
    tariff_class: Option<Arc<str>>,
    role: Role,
}

impl AccountState {
    fn parent(&self) -> Option<&Arc<str>> {
        self.profile.as_ref().and_then(|p| p.parent.as_ref())
    }

    fn tariff_class(&self) -> Option<&Arc<str>> {
        self.profile.as_ref().and_then(|p| p.tariff_class.as_ref())
    }

    fn role(&self) -> Role {
        self.profile.as_ref().map_or(Role::User, |p| p.role)
    }

    fn balances(&self) -> AccountBalances {
        AccountBalances {
            anytime: self.anytime,
            offpeak: self.offpeak,
        }
    }

    fn bucket(&self, bucket: Bucket) -> BucketBalance {
        match bucket {
            Bucket::Anytime => self.anytime,
            Bucket::OffPeak => self.offpeak,
        }
    }

    fn bucket_mut(&mut self, bucket: Bucket) -> &mut BucketBalance {
        match bucket {
            Bucket::Anytime => &mut self.anytime,
            Bucket::OffPeak => &mut self.offpeak,
        }
    }

    fn posted_sum_milli(&self) -> i64 {
        self.anytime
            .posted_milli
            .wrapping_add(self.offpeak.posted_milli)
    }

    fn view(&self, name: &str) -> AccountView {
        AccountView {
            name: name.to_string(),
            parent: self.parent().map(|p| p.to_string()),
            role: self.role(),
            tariff_class: self.tariff_class().map(|t| t.to_string()),
            anytime: self.anytime,
            offpeak: self.offpeak,
        }
    }
}

/// One account: its name and its locked state, in one allocation of 88
/// bytes with the `Arc` counts (names of up to 24 bytes are stored inline;
/// longer ones take a second allocation). Shared as `Arc<Account>`: a caller
/// clones it out of the map and drops the map's shard guard before locking
/// the account.
#[derive(Debug)]
pub(super) struct Account {
    pub(super) name: CompactString,
    state: Mutex<AccountState>,
}

/// The account an unresolved reservation holds credit of.
#[derive(Debug, Clone)]
pub(super) enum Holder {
    /// The account itself: resolving the reservation needs no map lookup.
    Account(Arc<Account>),
    /// Only a name: a reservation restored for an account the ledger did
    /// not have (yet); looked up by name when resolved.
    Named(Box<str>),
}

impl Holder {
    pub(super) fn name(&self) -> &str {
        match self {
            Holder::Account(account) => &account.name,
            Holder::Named(name) => name,
        }
    }
}

/// The account map's key: the account itself, hashed and compared by name
/// so that the map is searched with a `&str`. The name exists once per
/// account and a map slot is one pointer (issue 8: an `Arc<str>` key with
/// an `Arc<Mutex<…>>` value cost ~40 bytes more per account at 10 M).
#[derive(Debug, Clone)]
struct AccountKey(Arc<Account>);

impl Borrow<str> for AccountKey {
    fn borrow(&self) -> &str {
        &self.0.name
    }
}

// Must hash exactly like the `str` it borrows as.
impl Hash for AccountKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.name.as_str().hash(state);
    }
}

impl PartialEq for AccountKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for AccountKey {}

/// A stored account in the ledger's own form, for [`Ledger::restore_ready`]
/// (start-up, issue 8): built straight from borrowed store columns, so a
/// restored account costs one allocation and no intermediate `String`s.
#[derive(Debug)]
pub struct ReadyAccount {
    /// Not shared yet: its state is set without locking.
    account: Arc<Account>,
    /// What the ledger interns into the account's `Profile`; `None` for a
    /// user with neither parent nor class (most accounts).
    profile: Option<Box<ProfileNames>>,
    /// `posted` of both buckets, for the ledger's running total.
    posted_milli: i64,
}

/// A [`Profile`] before interning.
#[derive(Debug)]
struct ProfileNames {
    parent: Option<Box<str>>,
    tariff_class: Option<Box<str>>,
    role: Role,
}

impl ReadyAccount {
    pub fn new(
        name: &str,
        parent: Option<&str>,
        role: Role,
        tariff_class: Option<&str>,
        anytime: BucketBalance,
        offpeak: BucketBalance,
    ) -> ReadyAccount {
        let profile =
            (parent.is_some() || tariff_class.is_some() || role != Role::User).then(|| {
                Box::new(ProfileNames {
                    parent: parent.map(Box::from),
                    tariff_class: tariff_class.map(Box::from),
                    role,
                })
            });
        let state = AccountState {
            profile: None,
            anytime,
            offpeak,
        };
        ReadyAccount {
            posted_milli: state.posted_sum_milli(),
            account: Arc::new(Account {
                name: CompactString::from(name),
                state: Mutex::new(state),
            }),
            profile,
        }
    }

    pub fn name(&self) -> &str {
        &self.account.name
    }

    /// The same account with other balances: a cluster node restores
    /// every account's identity but only what it may spend itself (its
    /// own open reservations; its grants start empty).
    pub fn with_balances(mut self, anytime: BucketBalance, offpeak: BucketBalance) -> ReadyAccount {
        let st = Arc::get_mut(&mut self.account)
            .expect("a ready account is not shared")
            .state
            .get_mut();
        st.anytime = anytime;
        st.offpeak = offpeak;
        self.posted_milli = st.posted_sum_milli();
        self
    }
}

impl From<AccountView> for ReadyAccount {
    fn from(view: AccountView) -> ReadyAccount {
        ReadyAccount::new(
            &view.name,
            view.parent.as_deref(),
            view.role,
            view.tariff_class.as_deref(),
            view.anytime,
            view.offpeak,
        )
    }
}

/// Fields shared by every entry of one operation.
struct Journal<'a> {
    reservation_id: Option<u64>,
    reference: Option<&'a str>,
    tariff_version: Option<&'a str>,
    at_unix_ms: i64,
}

/// One entry to be, before it has a seq.
#[derive(Clone, Copy)]
struct Leg<'a> {
    kind: EntryKind,
    account: &'a str,
    bucket: Bucket,
    amount_milli: i64,
}

/// The authoritative in-memory ledger. Share it as `Arc<Ledger>`; every
/// method takes `&self` and is safe to call from any thread.
pub struct Ledger {
    config: LedgerConfig,
    /// Every account, found by name. Entries are never removed, so a cloned
    /// `Arc<Account>` stays the account's one lock for the process lifetime.
    accounts: DashMap<AccountKey, ()>,
    /// Unresolved reservations by id. Inserted, state-changed and removed
    /// only while the owning account's lock is held; removal is the
    /// exactly-once resolution.
    reservations: DashMap<u64, Reservation>,
    /// Next entry seq; taken while the touched accounts are locked.
    next_seq: AtomicU64,
    /// Sum of `posted` over all accounts and buckets, kept up to date under
    /// the account locks so metrics need not walk 10 M accounts. Wraps on
    /// i64 overflow (beyond 9.2e15 credits).
    total_posted_milli: AtomicI64,
    /// Intern pool for tariff class and parent names: a handful of distinct
    /// ones serve millions of accounts. Never shrinks.
    names: Mutex<HashSet<Arc<str>>>,
    /// Intern pool for profiles; never shrinks (accounts are never
    /// removed), and holds one entry per distinct (parent, class, role).
    profiles: Mutex<HashSet<Arc<Profile>>>,
    sink: Arc<dyn EntrySink>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("config", &self.config)
            .field("accounts", &self.accounts.len())
            .field("reservations", &self.reservations.len())
            .field("next_seq", &self.next_seq.load(Ordering::Relaxed))
            .finish()
    }
}

fn validate_account_name(name: &str) -> Result<(), LedgerError> {
    let ok = !name.is_empty()
        && name.chars().count() <= ACCOUNT_NAME_MAX_CHARS
        && !name.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(LedgerError::InvalidAccountName(name.to_string()))
    }
}

/// Available balance with overflow reported instead of saturated.
fn available(b: BucketBalance) -> Result<i64, LedgerError> {
    b.posted_milli
        .checked_sub(b.reserved_milli)
        .ok_or(LedgerError::Overflow)
}

impl Ledger {
    pub fn new(config: LedgerConfig, sink: Arc<dyn EntrySink>, clock: Arc<dyn Clock>) -> Ledger {
        Ledger::with_capacity(config, sink, clock, 0)
    }

    /// A ledger whose account map is sized for `accounts` up front: a
    /// start-up restoring millions of accounts then never rehashes the map
    /// while it grows.
    pub fn with_capacity(
        config: LedgerConfig,
        sink: Arc<dyn EntrySink>,
        clock: Arc<dyn Clock>,
        accounts: usize,
    ) -> Ledger {
        Ledger {
            config,
            accounts: DashMap::with_capacity(accounts),
            reservations: DashMap::new(),
            next_seq: AtomicU64::new(1),
            total_posted_milli: AtomicI64::new(0),
            names: Mutex::new(HashSet::new()),
            profiles: Mutex::new(HashSet::new()),
            sink,
            clock,
        }
    }

    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    // ----- accounts -------------------------------------------------------

    /// Creates an empty account. `parent`, if given, must exist. Records no
    /// entry (accounts come from configuration, not from the journal).
    pub fn open_account(
        &self,
        name: &str,
        parent: Option<&str>,
        role: Role,
        tariff_class: Option<&str>,
    ) -> Result<(), LedgerError> {
        validate_account_name(name)?;
        if let Some(p) = parent {
            self.cell(p)?;
        }
        let state = AccountState {
            profile: self.intern_profile(parent, tariff_class, role),
            anytime: BucketBalance::default(),
            offpeak: BucketBalance::default(),
        };
        let account = AccountKey(Arc::new(Account {
            name: CompactString::from(name),
            state: Mutex::new(state),
        }));
        // Short guard: one shard write lock for the insert; no account lock.
        match self.accounts.entry(account) {
            MapEntry::Occupied(_) => Err(LedgerError::AccountExists(name.to_string())),
            MapEntry::Vacant(slot) => {
                slot.insert(());
                Ok(())
            }
        }
    }

    /// Creates an account that starts with `opening_milli` in `bucket`, as
    /// one operation: the account becomes visible with its balance (its
    /// lock is held from before it is inserted until the opening `add`
    /// entry is recorded), so nobody sees it empty, and a retry finds it
    /// open *with* the balance — the opening can never be skipped or
    /// applied twice. `opening_milli` must not be negative; 0 records no
    /// entry (like [`Self::open_account`]).
    #[allow(clippy::too_many_arguments)]
    pub fn open_account_with_balance(
        &self,
        name: &str,
        parent: Option<&str>,
        role: Role,
        tariff_class: Option<&str>,
        bucket: Bucket,
        opening_milli: i64,
        reference: Option<&str>,
    ) -> Result<(), LedgerError> {
        validate_account_name(name)?;
        if opening_milli < 0 {
            return Err(LedgerError::InvalidAmount(
                "an opening balance cannot be negative".into(),
            ));
        }
        if let Some(p) = parent {
            self.cell(p)?;
        }
        let opened = BucketBalance::default().checked_apply(opening_milli, 0)?;
        let balances = AccountState {
            profile: self.intern_profile(parent, tariff_class, role),
            anytime: BucketBalance::default(),
            offpeak: BucketBalance::default(),
        };
        let account = Arc::new(Account {
            name: CompactString::from(name),
            state: Mutex::new(balances),
        });
        // The account's lock first, then the shard's (one insert): anyone
        // who finds the account waits for its opening balance.
        let mut st = account.state.lock();
        match self.accounts.entry(AccountKey(account.clone())) {
            MapEntry::Occupied(_) => return Err(LedgerError::AccountExists(name.to_string())),
            MapEntry::Vacant(slot) => {
                slot.insert(());
            }
        }
        if opening_milli != 0 {
            self.apply_posted(
                &mut st,
                &account.name,
                bucket,
                opened,
                opening_milli,
                EntryKind::Add,
                reference,
            );
        }
        Ok(())
    }

    /// Startup load from the store: creates or overwrites the account with
    /// exactly `view`, records no entry. The parent need not exist (yet).
    pub fn restore_account(&self, view: AccountView) {
        self.restore_ready([ReadyAccount::from(view)]);
    }

    /// [`Ledger::restore_account`] for many accounts (start-up restores
    /// millions, from several threads at once): one update of the running
    /// total per call.
    pub fn restore_ready(&self, accounts: impl IntoIterator<Item = ReadyAccount>) {
        let delta = accounts
            .into_iter()
            .fold(0i64, |sum, a| sum.wrapping_add(self.restore_one(a)));
        self.total_posted_milli.fetch_add(delta, Ordering::Relaxed);
    }

    /// Restores one account and returns how much it moved the total posted
    /// credit, for the caller to add.
    fn restore_one(&self, ready: ReadyAccount) -> i64 {
        let ReadyAccount {
            mut account,
            profile,
            posted_milli,
        } = ready;
        if let Some(names) = profile {
            let profile = self.intern_profile(
                names.parent.as_deref(),
                names.tariff_class.as_deref(),
                names.role,
            );
            let unshared = Arc::get_mut(&mut account).expect("a ready account is not shared");
            unshared.state.get_mut().profile = profile;
        }
        // Short guard: one shard write lock for the insert or lookup,
        // dropped before the existing account (if any) is locked.
        let (existing, fresh) = match self.accounts.entry(AccountKey(account)) {
            MapEntry::Vacant(slot) => {
                slot.insert(());
                return posted_milli;
            }
            MapEntry::Occupied(slot) => (slot.key().0.clone(), slot.into_key()),
        };
        let state = Arc::into_inner(fresh.0)
            .expect("a key that was not inserted is not shared")
            .state
            .into_inner();
        let mut st = existing.state.lock();
        // Critical section: swap the state.
        let delta = posted_milli.wrapping_sub(st.posted_sum_milli());
        *st = state;
        delta
    }

    /// Startup load from the store: the reservation comes back in doubt
    /// (SPEC 6: open at a crash → in doubt), since `in_doubt_since` if the
    /// view has it, else since now. Moves no balance — the restored
    /// balances already include its reserved amounts — and records no
    /// entry. Negative amounts are read as 0; shares that do not sum to the
    /// total are replaced by one share of the whole total. Also keeps the
    /// seq counter past the id, so no later entry reuses it.
    pub fn restore_reservation(&self, view: ReservationView) {
        let account = match self.cell(&view.account) {
            Ok(account) => Holder::Account(account),
            Err(_) => Holder::Named(view.account.into_boxed_str()),
        };
        let anytime_milli = view.anytime_milli.max(0);
        let offpeak_milli = view.offpeak_milli.max(0).min(i64::MAX - anytime_milli);
        let total = anytime_milli + offpeak_milli;
        let shares_ok = !view.shares_milli.is_empty()
            && view.shares_milli.iter().all(|s| *s >= 0)
            && view
                .shares_milli
                .iter()
                .try_fold(0i64, |acc, s| acc.checked_add(*s))
                == Some(total);
        let shares_milli: Box<[i64]> = if shares_ok {
            view.shares_milli.into_boxed_slice()
        } else {
            Box::new([total])
        };
        let now = self.clock.now_unix_ms();
        self.reservations.insert(
            view.id.0,
            Reservation {
                account,
                state: ReservationState::InDoubt,
                anytime_milli,
                offpeak_milli,
                shares_milli,
                reference: view.reference.map(String::into_boxed_str),
                tariff_version: view.tariff_version.map(String::into_boxed_str),
                created_unix_ms: view.created_unix_ms,
                in_doubt_since_unix_ms: Some(view.in_doubt_since_unix_ms.unwrap_or(now)),
            },
        );
        self.next_seq
            .fetch_max(view.id.0.saturating_add(1), Ordering::Relaxed);
    }

    /// Startup: continue numbering after the store's last seq. Never moves
    /// the counter backwards.
    pub fn set_next_seq(&self, next: u64) {
        self.next_seq.fetch_max(next, Ordering::Relaxed);
    }

    /// The seq the next entry will get (for the store's bookkeeping).
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }

    pub fn account(&self, name: &str) -> Option<AccountView> {
        let account = self.cell(name).ok()?;
        let st = account.state.lock();
        // Critical section: copy the state.
        Some(st.view(&account.name))
    }

    /// One bucket's available balance, read under the account's lock
    /// without copying the account (`None`: no such account).
    pub fn available_milli(&self, name: &str, bucket: Bucket) -> Option<i64> {
        let account = self.cell(name).ok()?;
        let st = account.state.lock();
        Some(st.bucket(bucket).available_milli())
    }

    /// Every account name, in no particular order. Walks the whole map.
    pub fn account_names(&self) -> Vec<String> {
        self.accounts
            .iter()
            .map(|g| g.key().0.name.to_string())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// Sum of `posted` over all accounts and both buckets. O(1): a running
    /// total maintained under the account locks; a concurrent reader may see
    /// the total before or after any one operation, never halfway through a
    /// transfer (transfers do not change it).
    pub fn total_posted_milli(&self) -> i64 {
        self.total_posted_milli.load(Ordering::Relaxed)
    }

    // ----- single-bucket changes -----------------------------------------

    /// Adds `amount_milli` (negative deducts) to a bucket's posted and
    /// available balance. A deduction may not take available below 0 under
    /// either overdraft policy.
    pub fn add(
        &self,
        name: &str,
        bucket: Bucket,
        amount_milli: i64,
        reference: Option<&str>,
    ) -> Result<Applied, LedgerError> {
        let account = self.cell(name)?;
        let mut st = account.state.lock();
        // Critical section: validate, move one bucket, record one entry.
        let old = st.bucket(bucket);
        let new = old.checked_apply(amount_milli, 0)?;
        if amount_milli < 0 && available(new)? < 0 {
            return Err(LedgerError::InsufficientCredit {
                needed_milli: amount_milli.checked_neg().unwrap_or(i64::MAX),
                available_milli: available(old)?,
            });
        }
        Ok(self.apply_posted(
            &mut st,
            &account.name,
            bucket,
            new,
            amount_milli,
            EntryKind::Add,
            reference,
        ))
    }

    /// Sets a bucket's *available* balance (SPEC 1.2). Reserved credit is
    /// not settable: `posted = new + reserved`, so reservations in flight
    /// settle correctly afterwards. Journaled as a `set` entry of
    /// (new − old available).
    pub fn set(
        &self,
        name: &str,
        bucket: Bucket,
        new_available_milli: i64,
        reference: Option<&str>,
    ) -> Result<Applied, LedgerError> {
        if new_available_milli < 0 {
            return Err(LedgerError::InvalidAmount(format!(
                "a balance cannot be set below 0 (got {new_available_milli} milli-credits)"
            )));
        }
        let account = self.cell(name)?;
        let mut st = account.state.lock();
        // Critical section: compute the delta against the current available
        // balance, move one bucket, record one entry.
        let old = st.bucket(bucket);
        let amount_milli = new_available_milli
            .checked_sub(available(old)?)
            .ok_or(LedgerError::Overflow)?;
        let new = old.checked_apply(amount_milli, 0)?;
        Ok(self.apply_posted(
            &mut st,
            &account.name,
            bucket,
            new,
            amount_milli,
            EntryKind::Set,
            reference,
        ))
    }

    /// The common end of `add` and `set`: store a bucket whose `posted`
    /// moved by `amount_milli` and journal it as one entry. Called with the
    /// account lock held (the caller's critical section).
    #[allow(clippy::too_many_arguments)]
    fn apply_posted(
        &self,
        st: &mut AccountState,
        key: &str,
        bucket: Bucket,
        new: BucketBalance,
        amount_milli: i64,
        kind: EntryKind,
        reference: Option<&str>,
    ) -> Applied {
        let seq = self.take_seqs(1);
        *st.bucket_mut(bucket) = new;
        self.total_posted_milli
            .fetch_add(amount_milli, Ordering::Relaxed);
        let journal = self.journal(None, reference, None);
        self.record(
            seq,
            &journal,
            &[Leg {
                kind,
                account: key,
                bucket,
                amount_milli,
            }],
        );
        Applied { seq, balance: new }
    }

    // ----- cluster grants (`crate::cluster`) ------------------------------

    /// A cluster node's grant on `bucket` grew by `amount_milli` (taken in
    /// PostgreSQL by `cluster::sql::take` first). On a cluster node an
    /// account's `posted` is what the node may spend: its grant plus its
    /// own open reservations; so the grant moves `posted` and records no
    /// entry (the take is not a journal change of the account's credit).
    pub fn grant_in(
        &self,
        name: &str,
        bucket: Bucket,
        amount_milli: i64,
    ) -> Result<BucketBalance, LedgerError> {
        if amount_milli < 0 {
            return Err(LedgerError::InvalidAmount(
                "a grant cannot grow by a negative amount".into(),
            ));
        }
        let account = self.cell(name)?;
        let mut st = account.state.lock();
        // Critical section: move one bucket's posted.
        let new = st.bucket(bucket).checked_apply(amount_milli, 0)?;
        *st.bucket_mut(bucket) = new;
        self.total_posted_milli
            .fetch_add(amount_milli, Ordering::Relaxed);
        Ok(new)
    }

    /// Takes up to `max_milli` of `bucket`'s available balance out of
    /// `posted` (never below 0 available), so no reservation can use it
    /// while a cluster node gives it back; returns how much it took.
    /// Records no entry (see [`Self::grant_in`]).
    pub fn grant_out(
        &self,
        name: &str,
        bucket: Bucket,
        max_milli: i64,
    ) -> Result<i64, LedgerError> {
        let account = self.cell(name)?;
        let mut st = account.state.lock();
        // Critical section: move one bucket's posted.
        let old = st.bucket(bucket);
        let n = max_milli.min(available(old)?).max(0);
        if n > 0 {
            *st.bucket_mut(bucket) = old.checked_apply(-n, 0)?;
            self.total_posted_milli.fetch_sub(n, Ordering::Relaxed);
        }
        Ok(n)
    }

    /// Takes `n` consecutive seqs for entries written straight to the
    /// store, not through the ledger (a cluster node's credit actions,
    /// `cluster::sql::credit`), so no ledger entry reuses them. Returns the
    /// first.
    pub fn take_external_seqs(&self, n: usize) -> u64 {
        self.take_seqs(n)
    }

    // ----- reservations ---------------------------------------------------

    /// Reserves the sum of `shares_milli` (one price per recipient ×
    /// message), all-or-nothing across buckets: `OffPeakFirst` takes
    /// `offpeak` up to its available balance and the rest from `anytime`;
    /// `AnytimeOnly` takes only `anytime`. A total of 0 is allowed.
    ///
    /// Strict: every bucket touched must stay ≥ 0. Ozeki overdraft: also
    /// allowed while the payable balance (available `anytime`, plus
    /// available `offpeak` if it may pay) is > 0; the excess takes
    /// `anytime` below zero.
    pub fn reserve(
        &self,
        name: &str,
        shares_milli: &[i64],
        pref: BucketPreference,
        reference: Option<&str>,
        tariff_version: Option<&str>,
    ) -> Result<ReservationId, LedgerError> {
        let mut total_milli: i64 = 0;
        for &share in shares_milli {
            if share < 0 {
                return Err(LedgerError::InvalidAmount(format!(
                    "share {share} milli-credits is negative"
                )));
            }
            total_milli = total_milli
                .checked_add(share)
                .ok_or(LedgerError::Overflow)?;
        }
        let account = self.cell(name)?;
        let mut st = account.state.lock();
        // Critical section: decide the split, hold it in the buckets, insert
        // the reservation, record its entries.
        let now = self.clock.now_unix_ms();
        let offpeak_available = available(st.offpeak)?;
        let anytime_available = available(st.anytime)?;
        let (offpeak_milli, anytime_milli, payable_milli) = match pref {
            BucketPreference::AnytimeOnly => (0, total_milli, anytime_available),
            BucketPreference::OffPeakFirst => {
                let from_offpeak = total_milli.min(offpeak_available.max(0));
                (
                    from_offpeak,
                    total_milli - from_offpeak,
                    offpeak_available.max(0).saturating_add(anytime_available),
                )
            }
        };
        let strict_ok = anytime_milli == 0
            || anytime_available
                .checked_sub(anytime_milli)
                .is_some_and(|a| a >= 0);
        let allowed = strict_ok || (self.config.overdraft == Overdraft::Ozeki && payable_milli > 0);
        if !allowed {
            return Err(LedgerError::InsufficientCredit {
                needed_milli: total_milli,
                available_milli: payable_milli,
            });
        }
        let new_offpeak = st.offpeak.checked_apply(0, offpeak_milli)?;
        let new_anytime = st.anytime.checked_apply(0, anytime_milli)?;

        let mut legs = Vec::with_capacity(2);
        let leg = |bucket, amount_milli| Leg {
            kind: EntryKind::Reserve,
            account: &account.name,
            bucket,
            amount_milli,
        };
        if offpeak_milli != 0 {
            legs.push(leg(Bucket::OffPeak, offpeak_milli));
        }
        if anytime_milli != 0 || legs.is_empty() {
            legs.push(leg(Bucket::Anytime, anytime_milli));
        }
        let id = self.take_seqs(legs.len());
        st.offpeak = new_offpeak;
        st.anytime = new_anytime;
        self.reservations.insert(
            id,
            Reservation {
                account: Holder::Account(account.clone()),
                state: ReservationState::Open,
                anytime_milli,
                offpeak_milli,
                shares_milli: shares_milli.into(),
                reference: reference.map(Box::from),
                tariff_version: tariff_version.map(Box::from),
                created_unix_ms: now,
                in_doubt_since_unix_ms: None,
            },
        );
        let journal = Journal {
            reservation_id: Some(id),
            reference,
            tariff_version,
            at_unix_ms: now,
        };
        self.record(id, &journal, &legs);
        Ok(ReservationId(id))
    }

    /// Posts `post_milli` (0..=total; from the `offpeak` part first, then
    /// `anytime`) and voids the rest. Exactly once: a second resolution of
    /// any kind gets `UnknownReservation`. Works on open and in-doubt
    /// reservations alike (operator resolution). The entries carry
    /// `reference` (e.g. the gateway's message id) if given, else the
    /// reservation's own reference.
    pub fn settle(
        &self,
        id: ReservationId,
        post_milli: i64,
        reference: Option<&str>,
    ) -> Result<Settlement, LedgerError> {
        self.resolve(id, EntryKind::Void, reference, |_| Ok(Some(post_milli)))?
            .ok_or(LedgerError::UnknownReservation(id))
    }

    /// Posts the shares whose flag is true and voids the rest. `accepted`
    /// must have one flag per share.
    pub fn settle_shares(
        &self,
        id: ReservationId,
        accepted: &[bool],
        reference: Option<&str>,
    ) -> Result<Settlement, LedgerError> {
        self.resolve(id, EntryKind::Void, reference, |r| {
            if accepted.len() != r.shares_milli.len() {
                return Err(LedgerError::InvalidAmount(format!(
                    "{} acceptance flags for {} shares",
                    accepted.len(),
                    r.shares_milli.len()
                )));
            }
            // Cannot overflow: the shares summed to the total at reserve time.
            let post = r
                .shares_milli
                .iter()
                .zip(accepted)
                .filter(|(_, ok)| **ok)
                .map(|(s, _)| *s)
                .sum();
            Ok(Some(post))
        })?
        .ok_or(LedgerError::UnknownReservation(id))
    }

    /// `charge_on: delivery`: resolves the reservation on the gateway's
    /// answer without charging anything yet. `parts_milli` has one entry
    /// per share: empty for a share the gateway rejected (voided now), else
    /// the prices of its parts (summing to the share), each of which
    /// becomes its own **delivery hold**: a reservation in state
    /// [`ReservationState::Delivery`] (never expired by the TTL sweep,
    /// never taken by the in-doubt policy) whose reference is
    /// [`hold_reference`](super::hold_reference)`(id, share, part)`. Each
    /// hold is later posted ([`Ledger::post_whole`], delivered) or voided
    /// ([`Ledger::void`], failed), exactly once like any reservation.
    ///
    /// Journal, in one `record` call (one store transaction): `void` legs
    /// of the whole reservation (offpeak, anytime), then each hold's
    /// `reserve` legs (taking offpeak first, in share and part order, as a
    /// post would). Balances: `reserved` drops by the rejected shares only;
    /// `posted` does not move. Works on open and in-doubt reservations.
    pub fn hold_for_delivery(
        &self,
        id: ReservationId,
        parts_milli: &[Vec<i64>],
        reference: Option<&str>,
    ) -> Result<Held, LedgerError> {
        let account = self.reservation_account(id)?;
        let mut st = account.state.lock();
        // Critical section: re-find, validate, split the holds, move the
        // reserved amounts, swap the reservation for its holds, record.
        let (offpeak_milli, anytime_milli, own_reference, tariff_version) = {
            let r = self
                .reservations
                .get(&id.0)
                .ok_or(LedgerError::UnknownReservation(id))?;
            if parts_milli.len() != r.shares_milli.len() {
                return Err(LedgerError::InvalidAmount(format!(
                    "{} share holds for {} shares",
                    parts_milli.len(),
                    r.shares_milli.len()
                )));
            }
            for (parts, share) in parts_milli.iter().zip(r.shares_milli.iter()) {
                let sum = parts.iter().try_fold(0i64, |acc, p| {
                    (*p >= 0).then(|| acc.checked_add(*p)).flatten()
                });
                if !parts.is_empty() && sum != Some(*share) {
                    return Err(LedgerError::InvalidAmount(format!(
                        "part prices {parts:?} do not add up to the share {share}"
                    )));
                }
            }
            (
                r.offpeak_milli,
                r.anytime_milli,
                r.reference.clone(),
                r.tariff_version.clone(),
            )
        };
        // Each hold's (offpeak, anytime): offpeak first, like a post.
        let mut offpeak_left = offpeak_milli;
        let mut splits: Vec<(usize, u32, i64, i64)> = Vec::new();
        for (share, parts) in parts_milli.iter().enumerate() {
            for (p, price) in parts.iter().enumerate() {
                let off = (*price).min(offpeak_left);
                offpeak_left -= off;
                splits.push((share, p as u32 + 1, off, price - off));
            }
        }
        let held_offpeak: i64 = splits.iter().map(|s| s.2).sum();
        let held_anytime: i64 = splits.iter().map(|s| s.3).sum();
        if held_anytime > anytime_milli {
            return Err(LedgerError::InvalidAmount(
                "the holds exceed the reservation".into(),
            ));
        }
        let new_offpeak = st.offpeak.checked_apply(0, held_offpeak - offpeak_milli)?;
        let new_anytime = st.anytime.checked_apply(0, held_anytime - anytime_milli)?;
        let name: &str = &account.name;
        let leg = |kind, bucket, amount_milli| Leg {
            kind,
            account: name,
            bucket,
            amount_milli,
        };
        let mut release: Vec<Leg> = Vec::with_capacity(2);
        if offpeak_milli != 0 {
            release.push(leg(EntryKind::Void, Bucket::OffPeak, -offpeak_milli));
        }
        if anytime_milli != 0 || release.is_empty() {
            release.push(leg(EntryKind::Void, Bucket::Anytime, -anytime_milli));
        }
        let hold_legs: Vec<Vec<Leg>> = splits
            .iter()
            .map(|(_, _, off, any)| {
                let mut legs = Vec::with_capacity(2);
                if *off != 0 {
                    legs.push(leg(EntryKind::Reserve, Bucket::OffPeak, *off));
                }
                if *any != 0 || legs.is_empty() {
                    legs.push(leg(EntryKind::Reserve, Bucket::Anytime, *any));
                }
                legs
            })
            .collect();
        let n: usize = release.len() + hold_legs.iter().map(Vec::len).sum::<usize>();
        let removed = self.reservations.remove(&id.0);
        debug_assert!(
            removed.is_some(),
            "reservation {id} vanished under its lock"
        );
        let first = self.take_seqs(n);
        st.offpeak = new_offpeak;
        st.anytime = new_anytime;
        let now = self.clock.now_unix_ms();
        let own_reference = reference
            .map(str::to_string)
            .or(own_reference.map(String::from));
        let mut entries: Vec<Entry> = Vec::with_capacity(n);
        let mut push = |legs: &[Leg], rid: u64, reference: Option<String>| {
            for l in legs {
                entries.push(Entry {
                    seq: first + entries.len() as u64,
                    kind: l.kind,
                    account: l.account.to_string(),
                    bucket: l.bucket,
                    amount_milli: l.amount_milli,
                    reservation_id: Some(rid),
                    reference: reference.clone(),
                    tariff_version: tariff_version.as_deref().map(str::to_string),
                    at_unix_ms: now,
                });
            }
        };
        push(&release, id.0, own_reference);
        let mut holds: Vec<Vec<ReservationId>> = vec![Vec::new(); parts_milli.len()];
        let mut hold_seq = first + release.len() as u64;
        for ((share, part, off, any), legs) in splits.iter().zip(&hold_legs) {
            let hold = hold_seq;
            push(legs, hold, Some(super::hold_reference(id, *share, *part)));
            hold_seq += legs.len() as u64;
            self.reservations.insert(
                hold,
                Reservation {
                    account: Holder::Account(account.clone()),
                    state: ReservationState::Delivery,
                    anytime_milli: *any,
                    offpeak_milli: *off,
                    shares_milli: Box::new([off + any]),
                    reference: Some(super::hold_reference(id, *share, *part).into()),
                    tariff_version: tariff_version.clone(),
                    created_unix_ms: now,
                    in_doubt_since_unix_ms: None,
                },
            );
            holds[*share].push(ReservationId(hold));
        }
        let seq = first + n as u64 - 1;
        self.sink.record(&entries);
        Ok(Held {
            held_milli: held_offpeak + held_anytime,
            voided_milli: offpeak_milli + anytime_milli - held_offpeak - held_anytime,
            holds,
            seq,
        })
    }

    /// Posts the whole of a reservation (a delivery hold whose report said
    /// delivered, or its timeout default `charge`).
    pub fn post_whole(
        &self,
        id: ReservationId,
        reference: Option<&str>,
    ) -> Result<Settlement, LedgerError> {
        self.resolve(id, EntryKind::Void, reference, |r| {
            Ok(Some(r.total_milli()))
        })?
        .ok_or(LedgerError::UnknownReservation(id))
    }

    /// Start-up: a restored delivery hold (restored in doubt, like every
    /// open reservation) is waiting for its report again: back to
    /// [`ReservationState::Delivery`]. Records nothing.
    pub fn await_delivery(&self, id: ReservationId) -> Result<(), LedgerError> {
        let account = self.reservation_account(id)?;
        let _st = account.state.lock();
        // Critical section: flip the state, ordered with resolutions.
        let mut r = self
            .reservations
            .get_mut(&id.0)
            .ok_or(LedgerError::UnknownReservation(id))?;
        r.state = ReservationState::Delivery;
        r.in_doubt_since_unix_ms = None;
        Ok(())
    }

    /// Gives back a posted share of a resolved reservation (a delivery
    /// report said the message never arrived): `refund` entries of
    /// `offpeak_milli` and `anytime_milli` (each ≥ 0; zero legs skipped, a
    /// refund of 0 records one entry of 0 on `anytime`) move `posted` up on
    /// the bucket that paid; returns the last seq. The entries carry the reservation id and
    /// [`refund_reference`](super::refund_reference)`(share, parts)`.
    ///
    /// The ledger does not remember what each share posted: the caller
    /// (the delivery-report module) owns "at most once per share, never
    /// more than was posted", and `tollgate ledger verify` checks both from
    /// the journal.
    pub fn refund(
        &self,
        name: &str,
        reservation: ReservationId,
        share: usize,
        parts: Option<&[u32]>,
        offpeak_milli: i64,
        anytime_milli: i64,
    ) -> Result<u64, LedgerError> {
        if offpeak_milli < 0 || anytime_milli < 0 {
            return Err(LedgerError::InvalidAmount(format!(
                "a refund cannot be negative ({offpeak_milli}, {anytime_milli})"
            )));
        }
        let account = self.cell(name)?;
        let mut st = account.state.lock();
        // Critical section: move posted up on up to two buckets, record.
        let new_offpeak = st.offpeak.checked_apply(offpeak_milli, 0)?;
        let new_anytime = st.anytime.checked_apply(anytime_milli, 0)?;
        let total = offpeak_milli
            .checked_add(anytime_milli)
            .ok_or(LedgerError::Overflow)?;
        let mut legs: Vec<Leg> = [
            (Bucket::OffPeak, offpeak_milli),
            (Bucket::Anytime, anytime_milli),
        ]
        .into_iter()
        .filter(|(_, amount)| *amount != 0)
        .map(|(bucket, amount_milli)| Leg {
            kind: EntryKind::Refund,
            account: &account.name,
            bucket,
            amount_milli,
        })
        .collect();
        if legs.is_empty() {
            legs.push(Leg {
                kind: EntryKind::Refund,
                account: &account.name,
                bucket: Bucket::Anytime,
                amount_milli: 0,
            });
        }
        let first = self.take_seqs(legs.len());
        st.offpeak = new_offpeak;
        st.anytime = new_anytime;
        self.total_posted_milli.fetch_add(total, Ordering::Relaxed);
        let reference = super::refund_reference(share, parts);
        let journal = self.journal(Some(reservation.0), Some(&reference), None);
        Ok(self.record(first, &journal, &legs))
    }

    /// Returns the whole reservation to the account's available balance.
    pub fn void(&self, id: ReservationId) -> Result<Settlement, LedgerError> {
        self.resolve(id, EntryKind::Void, None, |_| Ok(Some(0)))?
            .ok_or(LedgerError::UnknownReservation(id))
    }

    /// Keeps the credit reserved and lists the reservation as in doubt: it
    /// is no longer expired by the TTL sweep and waits for an operator or
    /// the in-doubt policy. Idempotent (the first `since` is kept). Also
    /// takes a delivery hold whose watcher lost track of it. Records no
    /// entry.
    pub fn mark_in_doubt(&self, id: ReservationId) -> Result<(), LedgerError> {
        let account = self.reservation_account(id)?;
        let _st = account.state.lock();
        // Critical section: flip the state under the account lock so it is
        // ordered with every resolution of this reservation.
        let now = self.clock.now_unix_ms();
        let mut r = self
            .reservations
            .get_mut(&id.0)
            .ok_or(LedgerError::UnknownReservation(id))?;
        if matches!(r.state, ReservationState::Open | ReservationState::Delivery) {
            r.state = ReservationState::InDoubt;
            r.in_doubt_since_unix_ms = Some(now);
        }
        Ok(())
    }

    pub fn reservation(&self, id: ReservationId) -> Option<ReservationView> {
        self.reservations.get(&id.0).map(|r| r.view(id.0))
    }

    /// Unresolved reservations (all, or those in `state`), by id. Walks the
    /// reservation map, one shard read lock at a time; the listing is not a
    /// single snapshot.
    pub fn reservations(&self, state: Option<ReservationState>) -> Vec<ReservationView> {
        let mut views: Vec<ReservationView> = self
            .reservations
            .iter()
            .filter(|r| state.is_none_or(|s| r.state == s))
            .map(|r| r.view(*r.key()))
            .collect();
        views.sort_by_key(|v| v.id);
        views
    }

    /// Number of unresolved reservations.
    pub fn reservation_count(&self) -> usize {
        self.reservations.len()
    }

    /// Expires every open reservation older than `reservation_ttl_ms`
    /// (`expire` entries, credit returned). In-doubt reservations never
    /// expire. Cost: one walk of the reservation map, then one account lock
    /// per due reservation; a reservation settled meanwhile is skipped.
    pub fn expire_due(&self) -> Vec<ReservationId> {
        let now = self.clock.now_unix_ms();
        let ttl = self.config.reservation_ttl_ms;
        let is_due = move |r: &Reservation| {
            r.state == ReservationState::Open && now.saturating_sub(r.created_unix_ms) > ttl
        };
        // Collect first: no account is locked while walking the map.
        let due: Vec<u64> = self
            .reservations
            .iter()
            .filter(|r| is_due(r))
            .map(|r| *r.key())
            .collect();
        due.into_iter()
            .map(ReservationId)
            .filter(|id| {
                // Re-checked under the account lock: it may have been settled
                // or put in doubt since the walk.
                matches!(
                    self.resolve(*id, EntryKind::Expire, None, |r| Ok(is_due(r).then_some(0))),
                    Ok(Some(_))
                )
            })
            .collect()
    }

    /// The in-doubt policy sweep (`settle.in_doubt_after_s`,
    /// `settle.in_doubt_policy`): resolves every reservation in doubt for
    /// longer than `age_ms`, posting its whole total if `post`, else voiding
    /// it. Same cost as [`Ledger::expire_due`].
    pub fn resolve_in_doubt_older_than(
        &self,
        age_ms: i64,
        post: bool,
    ) -> Vec<(ReservationId, Settlement)> {
        let now = self.clock.now_unix_ms();
        let is_due = move |r: &Reservation| {
            r.state == ReservationState::InDoubt
                && now.saturating_sub(r.in_doubt_since_unix_ms.unwrap_or(r.created_unix_ms))
                    > age_ms
        };
        let due: Vec<u64> = self
            .reservations
            .iter()
            .filter(|r| is_due(r))
            .map(|r| *r.key())
            .collect();
        due.into_iter()
            .map(ReservationId)
            .filter_map(|id| {
                let decide =
                    |r: &Reservation| Ok(is_due(r).then(|| if post { r.total_milli() } else { 0 }));
                match self.resolve(id, EntryKind::Void, None, decide) {
                    Ok(Some(s)) => Some((id, s)),
                    _ => None,
                }
            })
            .collect()
    }

    // ----- transfers ------------------------------------------------------

    /// Moves credit from `parent` to its sub-account `child` (SPEC 2.2),
    /// both buckets at once; negative amounts move credit back. Fails as a
    /// whole if `child`'s parent is not `parent`, if both amounts are 0, or
    /// if any bucket that gives would end below 0 available. Records up to
    /// four `transfer` entries (zero legs skipped): parent anytime, child
    /// anytime, parent offpeak, child offpeak.
    pub fn transfer(
        &self,
        parent: &str,
        child: &str,
        anytime_milli: i64,
        offpeak_milli: i64,
        reference: Option<&str>,
    ) -> Result<TransferOutcome, LedgerError> {
        let not_a_subaccount = || LedgerError::NotASubaccount {
            parent: parent.to_string(),
            child: child.to_string(),
        };
        if parent == child {
            return Err(not_a_subaccount());
        }
        if anytime_milli == 0 && offpeak_milli == 0 {
            return Err(LedgerError::InvalidAmount(
                "a transfer must move a non-zero amount".to_string(),
            ));
        }
        let anytime_out = anytime_milli.checked_neg().ok_or(LedgerError::Overflow)?;
        let offpeak_out = offpeak_milli.checked_neg().ok_or(LedgerError::Overflow)?;
        let parent_account = self.cell(parent)?;
        let child_account = self.cell(child)?;
        // Name order, so two opposite transfers cannot deadlock.
        let (mut p, mut c) = if parent < child {
            let p = parent_account.state.lock();
            (p, child_account.state.lock())
        } else {
            let c = child_account.state.lock();
            (parent_account.state.lock(), c)
        };
        // Critical section (both accounts): check the relationship and all
        // four buckets, then move and record.
        if c.parent().map(|p| &**p) != Some(parent) {
            return Err(not_a_subaccount());
        }
        let moves = [
            (p.anytime, anytime_out),
            (c.anytime, anytime_milli),
            (p.offpeak, offpeak_out),
            (c.offpeak, offpeak_milli),
        ];
        let mut after = [BucketBalance::default(); 4];
        for (i, (old, delta)) in moves.into_iter().enumerate() {
            let new = old.checked_apply(delta, 0)?;
            if delta < 0 && available(new)? < 0 {
                return Err(LedgerError::InsufficientCredit {
                    needed_milli: delta.checked_neg().unwrap_or(i64::MAX),
                    available_milli: available(old)?,
                });
            }
            after[i] = new;
        }
        let (parent_name, child_name) = (&*parent_account.name, &*child_account.name);
        let accounts: [&str; 4] = [parent_name, child_name, parent_name, child_name];
        let buckets = [
            Bucket::Anytime,
            Bucket::Anytime,
            Bucket::OffPeak,
            Bucket::OffPeak,
        ];
        let legs: Vec<Leg> = (0..4)
            .filter(|&i| moves[i].1 != 0)
            .map(|i| Leg {
                kind: EntryKind::Transfer,
                account: accounts[i],
                bucket: buckets[i],
                amount_milli: moves[i].1,
            })
            .collect();
        let first = self.take_seqs(legs.len());
        [p.anytime, c.anytime, p.offpeak, c.offpeak] = after;
        let journal = self.journal(None, reference, None);
        let seq = self.record(first, &journal, &legs);
        Ok(TransferOutcome {
            parent: p.balances(),
            child: c.balances(),
            seq,
        })
    }

    // ----- internals ------------------------------------------------------

    /// Looks an account up. Short guard: the `Arc` is cloned out and the
    /// shard lock is dropped before the caller locks the account.
    fn cell(&self, name: &str) -> Result<Arc<Account>, LedgerError> {
        self.accounts
            .get(name)
            .map(|g| g.key().0.clone())
            .ok_or_else(|| LedgerError::UnknownAccount(name.to_string()))
    }

    /// The account that holds reservation `id`. Short guard on the
    /// reservation map. The answer stays right after the guard is dropped: a
    /// reservation never changes account and ids are never reused; whether
    /// it is still unresolved must be re-checked under the account lock.
    fn reservation_account(&self, id: ReservationId) -> Result<Arc<Account>, LedgerError> {
        let holder = self
            .reservations
            .get(&id.0)
            .map(|r| r.account.clone())
            .ok_or(LedgerError::UnknownReservation(id))?;
        match holder {
            Holder::Account(account) => Ok(account),
            Holder::Named(name) => self.cell(&name),
        }
    }

    /// The shared `Profile` for a (parent, tariff class, role); `None` for
    /// a user with neither parent nor class.
    fn intern_profile(
        &self,
        parent: Option<&str>,
        class: Option<&str>,
        role: Role,
    ) -> Option<Arc<Profile>> {
        if parent.is_none() && class.is_none() && role == Role::User {
            return None;
        }
        let profile = Profile {
            parent: parent.map(|p| self.intern_name(p)),
            tariff_class: class.map(|t| self.intern_name(t)),
            role,
        };
        // Critical section: one set lookup or insert.
        let mut pool = self.profiles.lock();
        if let Some(existing) = pool.get(&profile) {
            return Some(existing.clone());
        }
        let interned = Arc::new(profile);
        pool.insert(interned.clone());
        Some(interned)
    }

    fn intern_name(&self, name: &str) -> Arc<str> {
        // Critical section: one set lookup or insert.
        let mut pool = self.names.lock();
        if let Some(existing) = pool.get(name) {
            return existing.clone();
        }
        let interned: Arc<str> = Arc::from(name);
        pool.insert(interned.clone());
        interned
    }

    /// Resolves a reservation exactly once: under its account's lock,
    /// `decide` sees the reservation and returns how much to post
    /// (`Ok(None)`: leave it alone); then the buckets move, the reservation
    /// leaves the map and the entries are recorded: `post` legs (offpeak
    /// first), then `release` legs (`void` or `expire`).
    fn resolve(
        &self,
        id: ReservationId,
        release: EntryKind,
        reference: Option<&str>,
        decide: impl FnOnce(&Reservation) -> Result<Option<i64>, LedgerError>,
    ) -> Result<Option<Settlement>, LedgerError> {
        let account = self.reservation_account(id)?;
        let mut st = account.state.lock();
        // Critical section: re-find the reservation (it may have been
        // resolved since it was looked up), decide, move both buckets,
        // remove it, record.
        let (post_milli, offpeak_milli, anytime_milli, own_reference, tariff_version) = {
            let r = self
                .reservations
                .get(&id.0)
                .ok_or(LedgerError::UnknownReservation(id))?;
            let Some(post_milli) = decide(&r)? else {
                return Ok(None);
            };
            if !(0..=r.total_milli()).contains(&post_milli) {
                return Err(LedgerError::InvalidAmount(format!(
                    "cannot post {post_milli} milli-credits of a reservation of {}",
                    r.total_milli()
                )));
            }
            (
                post_milli,
                r.offpeak_milli,
                r.anytime_milli,
                r.reference.clone(),
                r.tariff_version.clone(),
            )
        };
        let post_offpeak = post_milli.min(offpeak_milli);
        let post_anytime = post_milli - post_offpeak;
        let release_offpeak = offpeak_milli - post_offpeak;
        let release_anytime = anytime_milli - post_anytime;
        let new_offpeak = st.offpeak.checked_apply(-post_offpeak, -offpeak_milli)?;
        let new_anytime = st.anytime.checked_apply(-post_anytime, -anytime_milli)?;

        let candidates = [
            (EntryKind::Post, Bucket::OffPeak, post_offpeak),
            (EntryKind::Post, Bucket::Anytime, post_anytime),
            (release, Bucket::OffPeak, release_offpeak),
            (release, Bucket::Anytime, release_anytime),
        ];
        let mut legs: Vec<Leg> = candidates
            .into_iter()
            .filter(|(_, _, amount)| *amount != 0)
            .map(|(kind, bucket, amount)| Leg {
                kind,
                account: &account.name,
                bucket,
                amount_milli: -amount,
            })
            .collect();
        if legs.is_empty() {
            legs.push(Leg {
                kind: release,
                account: &account.name,
                bucket: Bucket::Anytime,
                amount_milli: 0,
            });
        }
        let removed = self.reservations.remove(&id.0);
        debug_assert!(
            removed.is_some(),
            "reservation {id} vanished under its account lock"
        );
        let first = self.take_seqs(legs.len());
        st.offpeak = new_offpeak;
        st.anytime = new_anytime;
        self.total_posted_milli
            .fetch_sub(post_milli, Ordering::Relaxed);
        let journal = Journal {
            reservation_id: Some(id.0),
            reference: reference.or(own_reference.as_deref()),
            tariff_version: tariff_version.as_deref(),
            at_unix_ms: self.clock.now_unix_ms(),
        };
        let seq = self.record(first, &journal, &legs);
        Ok(Some(Settlement {
            posted_milli: post_milli,
            posted_offpeak_milli: post_offpeak,
            voided_milli: offpeak_milli + anytime_milli - post_milli,
            seq,
        }))
    }

    fn journal<'a>(
        &self,
        reservation_id: Option<u64>,
        reference: Option<&'a str>,
        tariff_version: Option<&'a str>,
    ) -> Journal<'a> {
        Journal {
            reservation_id,
            reference,
            tariff_version,
            at_unix_ms: self.clock.now_unix_ms(),
        }
    }

    /// Takes `n` consecutive seqs. Called with the touched accounts locked,
    /// so per account, seq order is the order of changes.
    fn take_seqs(&self, n: usize) -> u64 {
        self.next_seq.fetch_add(n as u64, Ordering::Relaxed)
    }

    /// Numbers `legs` from `first_seq`, hands them to the sink in one call
    /// and returns the last seq. Called with the touched accounts locked.
    fn record(&self, first_seq: u64, journal: &Journal<'_>, legs: &[Leg<'_>]) -> u64 {
        let entries: Vec<Entry> = legs
            .iter()
            .zip(first_seq..)
            .map(|(leg, seq)| Entry {
                seq,
                kind: leg.kind,
                account: leg.account.to_string(),
                bucket: leg.bucket,
                amount_milli: leg.amount_milli,
                reservation_id: journal.reservation_id,
                reference: journal.reference.map(str::to_string),
                tariff_version: journal.tariff_version.map(str::to_string),
                at_unix_ms: journal.at_unix_ms,
            })
            .collect();
        self.sink.record(&entries);
        first_seq + legs.len() as u64 - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_state_stays_small() {
        // 10 M accounts × (account + map slot) must stay well under 256
        // bytes each, credentials included. The account is one allocation
        // of 88 bytes (`Arc` counts, inline name, lock, state): a 96-byte
        // block even where the allocator adds alignment slack (mimalloc 3
        // rounds an 8-aligned 96 bytes up to a 112-byte block).
        assert_eq!(std::mem::size_of::<AccountState>(), 40);
        assert_eq!(std::mem::size_of::<Account>(), 72);
        // A map slot is one pointer.
        assert_eq!(std::mem::size_of::<AccountKey>(), 8);
    }

    #[test]
    fn account_names_are_validated() {
        let l = Ledger::new(
            LedgerConfig::default(),
            Arc::new(super::super::NullSink),
            Arc::new(super::super::SystemClock::new()),
        );
        assert!(matches!(
            l.open_account("", None, Role::User, None),
            Err(LedgerError::InvalidAccountName(_))
        ));
        assert!(matches!(
            l.open_account("a\nb", None, Role::User, None),
            Err(LedgerError::InvalidAccountName(_))
        ));
        let long: String = "é".repeat(ACCOUNT_NAME_MAX_CHARS);
        assert_eq!(l.open_account(&long, None, Role::User, None), Ok(()));
        let too_long: String = "x".repeat(ACCOUNT_NAME_MAX_CHARS + 1);
        assert!(matches!(
            l.open_account(&too_long, None, Role::User, None),
            Err(LedgerError::InvalidAccountName(_))
        ));
    }

    #[test]
    fn tariff_classes_and_parent_names_are_shared() {
        let l = Ledger::new(
            LedgerConfig::default(),
            Arc::new(super::super::NullSink),
            Arc::new(super::super::SystemClock::new()),
        );
        l.open_account("p", None, Role::Admin, Some("gold"))
            .unwrap();
        l.open_account("c1", Some("p"), Role::User, Some("gold"))
            .unwrap();
        l.open_account("c2", Some("p"), Role::User, Some("gold"))
            .unwrap();
        l.open_account("c3", Some("p"), Role::User, None).unwrap();
        let c1 = l.cell("c1").unwrap();
        let c2 = l.cell("c2").unwrap();
        let c3 = l.cell("c3").unwrap();
        let (a, b, c) = (c1.state.lock(), c2.state.lock(), c3.state.lock());
        assert!(Arc::ptr_eq(
            a.tariff_class().unwrap(),
            b.tariff_class().unwrap()
        ));
        assert_eq!(&**a.parent().unwrap(), "p");
        // One copy of the parent's name, whatever the children's classes.
        assert!(Arc::ptr_eq(a.parent().unwrap(), c.parent().unwrap()));
        // Same parent, class and role: one shared `Profile`; none for a
        // user with neither parent nor class.
        assert!(Arc::ptr_eq(
            a.profile.as_ref().unwrap(),
            b.profile.as_ref().unwrap()
        ));
        let p = l.cell("p").unwrap();
        assert!(p.state.lock().parent().is_none());
        assert_eq!(p.state.lock().role(), Role::Admin);
        l.open_account("u", None, Role::User, None).unwrap();
        assert!(l.cell("u").unwrap().state.lock().profile.is_none());
    }
}
