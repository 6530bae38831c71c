//! Credentials: argon2id hashes for local accounts and a bounded cache of
//! recently verified credentials (SPEC 5.3).
//!
//! Ozeki clients send the password on every request and one argon2id check
//! costs milliseconds, so a successful check is remembered as a BLAKE3 MAC of
//! (username, password) under a random per-process key. Only the first
//! request of a client pays for argon2. Each account's record carries a
//! generation number; changing a password or removing the account bumps or
//! drops it, which invalidates every cached entry for that account.
//!
//! Memory (issue 8: 10 M accounts): the argon2id PHC strings `accounts add`
//! makes (97 characters) are kept decoded, 48 bytes of salt and hash plus an
//! interned parameter prefix, and rebuilt only for an argon2 run. An
//! account's name (inline up to 24 bytes) and record are one 80-byte
//! allocation, and that allocation is the map's key, so a map slot is one
//! pointer. For decoded records the generation is the first 8 bytes of the
//! hash itself: every new password hash has a fresh salt, so it changes
//! with the password (and setting the very same hash again keeps cached
//! verifications, which still hold).
//!
//! Never stored or logged: a plain password. The cache holds MACs only, and
//! the key dies with the process.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use argon2::password_hash::{Output, PasswordHash, PasswordVerifier, SaltString};
use argon2::Argon2;
use compact_str::CompactString;
use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;
use rand::RngCore;

/// The result of checking a username and password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    Verified,
    UnknownAccount,
    WrongPassword,
}

/// An account's password hash (see the module docs for the compact form).
enum Record {
    /// `{prefix}{b64(salt)}${b64(hash)}`: argon2id with a 16-byte salt and a
    /// 32-byte hash, `prefix` an index into [`CredentialStore::prefixes`]
    /// (`$argon2id$v=19$m=19456,t=2,p=1$` for every hash of one build).
    Argon2id { prefix: u16, salt_hash: [u8; 48] },
    /// Any other PHC string, and every record with an expiry.
    Phc(Box<PhcRecord>),
}

struct PhcRecord {
    phc: Box<str>,
    generation: u64,
    /// Credentials adopted from the gateway (drop-in mode, SPEC 5.3) are
    /// trusted until then; past it the account counts as unknown here, so
    /// the gateway is asked again. `None`: a local account, no expiry.
    expires: Option<std::time::Instant>,
}

impl Record {
    fn current(&self) -> bool {
        match self {
            Record::Argon2id { .. } => true,
            Record::Phc(r) => r.expires.is_none_or(|at| std::time::Instant::now() < at),
        }
    }

    fn generation(&self) -> u64 {
        match self {
            Record::Argon2id { salt_hash, .. } => {
                u64::from_le_bytes(salt_hash[16..24].try_into().expect("8 bytes"))
            }
            Record::Phc(r) => r.generation,
        }
    }
}

/// One account's credentials (see the module docs).
struct Credential {
    account: CompactString,
    record: Record,
}

/// The credential map's key: the boxed credentials themselves, hashed and
/// compared by account name so that the map is searched with a `&str`.
struct CredentialKey(Box<Credential>);

impl Borrow<str> for CredentialKey {
    fn borrow(&self) -> &str {
        &self.0.account
    }
}

// Must hash exactly like the `str` it borrows as.
impl Hash for CredentialKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.account.as_str().hash(state);
    }
}

impl PartialEq for CredentialKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.account == other.0.account
    }
}

impl Eq for CredentialKey {}

/// Most distinct argon2 parameter prefixes kept compact; hashes with
/// further ones are kept as text.
const PREFIXES_MAX: usize = 64;

/// Coalesces concurrent work on one key (a MAC of credentials): one
/// caller at a time runs for a key, the others wait their turn and then
/// usually find its result cached. The gate of a key goes with its last
/// caller, so the map holds only keys being worked on.
#[derive(Default)]
pub struct SingleFlight {
    gates: DashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>,
}

impl SingleFlight {
    /// Runs `work` when it is this caller's turn for `key`.
    pub async fn run<T, F, W>(&self, key: [u8; 32], work: W) -> T
    where
        W: FnOnce() -> F,
        F: std::future::Future<Output = T>,
    {
        let gate = self
            .gates
            .entry(key)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        let out = {
            let _turn = gate.lock().await;
            work().await
        };
        // The last one out removes the gate (the map holds one reference,
        // this caller another).
        self.gates.remove_if(&key, |_, g| Arc::strong_count(g) <= 2);
        out
    }

    /// No work in progress.
    pub fn is_empty(&self) -> bool {
        self.gates.is_empty()
    }
}

pub struct CredentialStore {
    /// Every account's credentials, found by name (see [`CredentialKey`]).
    /// A slot is one pointer: at the map's usual 45-85 % load that costs
    /// far less than a name and a record inline.
    records: DashMap<CredentialKey, ()>,
    /// Interned `$argon2id$v=…$m=…,t=…,p=…$` prefixes of compact records.
    prefixes: parking_lot::Mutex<Vec<Box<str>>>,
    /// MAC(username, password) → generation of the record it was verified
    /// against. A hit counts only while that generation is current.
    verified: DashMap<[u8; 32], (Arc<str>, u64)>,
    mac_key: [u8; 32],
    /// One gate per credentials being verified right now (single flight).
    in_flight: SingleFlight,
    cache_max_entries: usize,
    next_generation: AtomicU64,
    /// argon2 verifications run so far (exported as a metric).
    argon2_runs: AtomicU64,
    /// Verifying unknown users against this keeps their timing equal to a
    /// wrong password, so response times do not reveal which names exist.
    dummy_phc: String,
}

impl CredentialStore {
    pub fn new(cache_max_entries: usize) -> Self {
        CredentialStore::with_capacity(cache_max_entries, 0)
    }

    /// A store whose account map is sized for `accounts` up front, so
    /// loading millions of credentials never rehashes it (a grown map also
    /// leaves its smaller predecessors' memory with the allocator).
    pub fn with_capacity(cache_max_entries: usize, accounts: usize) -> Self {
        let mut mac_key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut mac_key);
        CredentialStore {
            records: DashMap::with_capacity(accounts),
            prefixes: parking_lot::Mutex::new(Vec::new()),
            verified: DashMap::new(),
            mac_key,
            in_flight: SingleFlight::default(),
            cache_max_entries: cache_max_entries.max(1),
            next_generation: AtomicU64::new(1),
            argon2_runs: AtomicU64::new(0),
            dummy_phc: crate::config::accounts::hash_password("tollgate-dummy-password"),
        }
    }

    /// Sets (or replaces) an account's argon2id hash; cached verifications
    /// of the old password stop counting at once.
    pub fn set(&self, account: &str, phc: &str) {
        self.insert_record(account, phc, None);
    }

    /// Sets an account's hash that counts only until `expires` (drop-in
    /// adoption: the gateway is asked again after it).
    pub fn set_expiring(&self, account: &str, phc: &str, expires: std::time::Instant) {
        self.insert_record(account, phc, Some(expires));
    }

    fn insert_record(&self, account: &str, phc: &str, expires: Option<std::time::Instant>) {
        let compact = match expires {
            None => self.compact(phc),
            Some(_) => None,
        };
        let record = compact.unwrap_or_else(|| {
            Record::Phc(Box::new(PhcRecord {
                phc: phc.into(),
                generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
                expires,
            }))
        });
        let key = CredentialKey(Box::new(Credential {
            account: CompactString::from(account),
            record,
        }));
        // Short guard: one shard write lock. A replaced entry's key is
        // replaced too: the name and the record are one allocation.
        match self.records.entry(key) {
            MapEntry::Occupied(slot) => {
                slot.replace_entry(());
            }
            MapEntry::Vacant(slot) => {
                slot.insert(());
            }
        }
    }

    /// Runs `f` on an account's record under a short shard read guard.
    fn with_record<R>(&self, account: &str, f: impl FnOnce(&Record) -> R) -> Option<R> {
        self.records.get(account).map(|g| f(&g.key().0.record))
    }

    /// The compact form of `phc`, if it has one that rebuilds to exactly
    /// the same text.
    fn compact(&self, phc: &str) -> Option<Record> {
        let parsed = PasswordHash::new(phc).ok()?;
        if parsed.algorithm.as_str() != "argon2id" {
            return None;
        }
        let (salt, hash) = (parsed.salt?, parsed.hash?);
        let mut salt_hash = [0u8; 48];
        if salt.decode_b64(&mut salt_hash[..16]).ok()?.len() != 16 || hash.len() != 32 {
            return None;
        }
        salt_hash[16..].copy_from_slice(hash.as_bytes());
        let tail = salt.as_str().len() + 1 + hash.b64_len();
        let prefix_text = phc.get(..phc.len().checked_sub(tail)?)?;
        let prefix = {
            // Critical section: a scan of a handful of prefixes.
            let mut prefixes = self.prefixes.lock();
            match prefixes.iter().position(|p| &**p == prefix_text) {
                Some(i) => i,
                None if prefixes.len() < PREFIXES_MAX => {
                    prefixes.push(prefix_text.into());
                    prefixes.len() - 1
                }
                None => return None,
            }
        };
        let record = Record::Argon2id {
            prefix: u16::try_from(prefix).ok()?,
            salt_hash,
        };
        (self.phc_text(&record).as_deref() == Some(phc)).then_some(record)
    }

    /// The PHC string of a record (for an argon2 run).
    fn phc_text(&self, record: &Record) -> Option<String> {
        match record {
            Record::Argon2id { prefix, salt_hash } => {
                let salt = SaltString::encode_b64(&salt_hash[..16]).ok()?;
                let hash = Output::new(&salt_hash[16..]).ok()?;
                let mut buf = [0u8; 64];
                let hash = hash.b64_encode(&mut buf).ok()?;
                let prefixes = self.prefixes.lock();
                let prefix = prefixes.get(usize::from(*prefix))?;
                Some(format!("{prefix}{}${hash}", salt.as_str()))
            }
            Record::Phc(r) => Some(r.phc.to_string()),
        }
    }

    /// Remembers credentials as verified against the account's current
    /// record without an argon2 run: for credentials the caller has just
    /// verified another way (the gateway, in drop-in mode) and hashed into
    /// that record.
    pub fn remember(&self, username: &str, password: &str) {
        let Some(generation) = self.with_record(username, Record::generation) else {
            return;
        };
        if self.verified.len() >= self.cache_max_entries {
            self.evict_some();
        }
        self.verified.insert(
            self.mac(username, password),
            (Arc::from(username), generation),
        );
    }

    pub fn remove(&self, account: &str) {
        self.records.remove(account);
    }

    pub fn contains(&self, account: &str) -> bool {
        self.records.contains_key(account)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// How many argon2 verifications ran (cache misses).
    pub fn argon2_runs(&self) -> u64 {
        self.argon2_runs.load(Ordering::Relaxed)
    }

    fn mac(&self, username: &str, password: &str) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.mac_key);
        h.update(&(username.len() as u64).to_le_bytes());
        h.update(username.as_bytes());
        h.update(password.as_bytes());
        *h.finalize().as_bytes()
    }

    /// The fast path: `Some(Verified)` if these exact credentials were
    /// verified against the current password; `None` means "ask argon2".
    pub fn check_cached(&self, username: &str, password: &str) -> Option<AuthOutcome> {
        let mac = self.mac(username, password);
        let (account, generation) = {
            // Short guard: copied out before touching `records`.
            let hit = self.verified.get(&mac)?;
            (hit.0.clone(), hit.1)
        };
        let current = self
            .with_record(&account, |r| r.current().then(|| r.generation()))
            .flatten();
        if current == Some(generation) && &*account == username {
            Some(AuthOutcome::Verified)
        } else {
            self.verified.remove(&mac);
            None
        }
    }

    /// The slow path: one argon2id verification (milliseconds of CPU; call it
    /// off the async threads). Remembers a success.
    pub fn verify_slow(&self, username: &str, password: &str) -> AuthOutcome {
        self.argon2_runs.fetch_add(1, Ordering::Relaxed);
        // Short guard: the text and generation are copied out before the
        // argon2 run (milliseconds).
        let record = self
            .with_record(username, |r| {
                if !r.current() {
                    return None;
                }
                Some((self.phc_text(r)?, r.generation()))
            })
            .flatten();
        let Some((phc, generation)) = record else {
            let _ = verify_phc(&self.dummy_phc, password);
            return AuthOutcome::UnknownAccount;
        };
        if !verify_phc(&phc, password) {
            return AuthOutcome::WrongPassword;
        }
        if self.verified.len() >= self.cache_max_entries {
            self.evict_some();
        }
        self.verified.insert(
            self.mac(username, password),
            (Arc::from(username), generation),
        );
        AuthOutcome::Verified
    }

    /// Cached check, else argon2 on the blocking pool.
    ///
    /// Concurrent checks of the same credentials are coalesced: a client
    /// that opens 64 connections at once pays for one argon2 run, the rest
    /// wait for it and then hit the cache. Wrong passwords are not cached,
    /// so each waiter re-runs argon2 after the first fails; that keeps a
    /// guessing attacker paying full price per guess.
    pub async fn verify(self: &Arc<Self>, username: &str, password: &str) -> AuthOutcome {
        if let Some(outcome) = self.check_cached(username, password) {
            return outcome;
        }
        let mac = self.mac(username, password);
        self.in_flight
            .run(mac, || async {
                // Whoever held the gate before may have settled it.
                match self.check_cached(username, password) {
                    Some(outcome) => outcome,
                    None => {
                        let me = Arc::clone(self);
                        let (u, p) = (username.to_string(), password.to_string());
                        tokio::task::spawn_blocking(move || me.verify_slow(&u, &p))
                            .await
                            .unwrap_or(AuthOutcome::WrongPassword)
                    }
                }
            })
            .await
    }

    /// Keeps the cache bounded: drops about an eighth of it. Which entries go
    /// is arbitrary (DashMap order); an evicted client pays argon2 once more.
    fn evict_some(&self) {
        let drop_n = (self.cache_max_entries / 8).max(1);
        let victims: Vec<[u8; 32]> = self
            .verified
            .iter()
            .take(drop_n)
            .map(|e| *e.key())
            .collect();
        for k in victims {
            self.verified.remove(&k);
        }
    }

    #[cfg(test)]
    fn cached_len(&self) -> usize {
        self.verified.len()
    }
}

/// Constant-time argon2 verification of `password` against a PHC string.
pub fn verify_phc(phc: &str, password: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::accounts::hash_password;

    #[test]
    fn verifies_caches_and_invalidates_on_password_change() {
        let store = CredentialStore::new(100);
        store.set("john", &hash_password("secret1"));
        assert_eq!(store.check_cached("john", "secret1"), None);
        assert_eq!(store.verify_slow("john", "secret1"), AuthOutcome::Verified);
        assert_eq!(
            store.check_cached("john", "secret1"),
            Some(AuthOutcome::Verified)
        );
        assert_eq!(
            store.verify_slow("john", "wrong"),
            AuthOutcome::WrongPassword
        );
        assert_eq!(store.check_cached("john", "wrong"), None);

        store.set("john", &hash_password("secret2"));
        assert_eq!(store.check_cached("john", "secret1"), None);
        assert_eq!(
            store.verify_slow("john", "secret1"),
            AuthOutcome::WrongPassword
        );
        assert_eq!(store.verify_slow("john", "secret2"), AuthOutcome::Verified);

        store.remove("john");
        assert_eq!(store.check_cached("john", "secret2"), None);
        assert_eq!(
            store.verify_slow("john", "secret2"),
            AuthOutcome::UnknownAccount
        );
    }

    #[test]
    fn expiring_records_count_as_unknown_after_their_time() {
        let store = CredentialStore::new(100);
        let now = std::time::Instant::now();
        store.set_expiring(
            "adopted",
            &hash_password("pw"),
            now + std::time::Duration::from_secs(60),
        );
        store.remember("adopted", "pw");
        assert_eq!(
            store.check_cached("adopted", "pw"),
            Some(AuthOutcome::Verified)
        );
        assert_eq!(store.argon2_runs(), 0);
        store.set_expiring("adopted", &hash_password("pw"), now);
        assert_eq!(store.check_cached("adopted", "pw"), None);
        assert_eq!(
            store.verify_slow("adopted", "pw"),
            AuthOutcome::UnknownAccount
        );
    }

    #[test]
    fn argon2id_hashes_are_kept_compact_and_rebuilt_exactly() {
        use argon2::password_hash::PasswordHasher;
        assert_eq!(std::mem::size_of::<Record>(), 56);
        assert_eq!(std::mem::size_of::<Credential>(), 80);
        assert_eq!(std::mem::size_of::<CredentialKey>(), 8);
        let store = CredentialStore::new(100);
        let phc = hash_password("secret1");
        store.set("john", &phc);
        store
            .with_record("john", |r| {
                assert!(matches!(r, Record::Argon2id { prefix: 0, .. }));
                assert_eq!(store.phc_text(r).as_deref(), Some(phc.as_str()));
            })
            .unwrap();
        assert_eq!(store.verify_slow("john", "secret1"), AuthOutcome::Verified);
        // Other parameters get their own prefix.
        let params = argon2::Params::new(1024, 1, 1, None).unwrap();
        let cheap = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(b"pw", &SaltString::generate(&mut rand::rngs::OsRng))
            .unwrap()
            .to_string();
        store.set("cheap", &cheap);
        assert!(store
            .with_record("cheap", |r| matches!(r, Record::Argon2id { prefix: 1, .. }))
            .unwrap());
        assert_eq!(store.verify_slow("cheap", "pw"), AuthOutcome::Verified);
        assert_eq!(store.verify_slow("cheap", "px"), AuthOutcome::WrongPassword);
        // Anything else is kept as given.
        store.set("odd", "not a phc string");
        assert!(store
            .with_record("odd", |r| matches!(r, Record::Phc(_)))
            .unwrap());
        assert_eq!(store.verify_slow("odd", "x"), AuthOutcome::WrongPassword);
        // A new hash of the same password is a new generation.
        let before = store.with_record("john", Record::generation).unwrap();
        store.set("john", &hash_password("secret1"));
        assert_ne!(store.with_record("john", Record::generation), Some(before));
    }

    #[test]
    fn username_and_password_boundary_is_unambiguous() {
        let store = CredentialStore::new(100);
        store.set("ab", &hash_password("c"));
        store.set("a", &hash_password("bc"));
        assert_eq!(store.verify_slow("ab", "c"), AuthOutcome::Verified);
        assert_eq!(store.check_cached("a", "bc"), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_checks_of_the_same_credentials_share_one_argon2_run() {
        let store = Arc::new(CredentialStore::new(100));
        store.set("john", &hash_password("secret1"));
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let s = store.clone();
                tokio::spawn(async move { s.verify("john", "secret1").await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), AuthOutcome::Verified);
        }
        assert!(store.in_flight.is_empty(), "gates are cleaned up");
        assert_eq!(store.argon2_runs(), 1);
    }

    #[test]
    fn cache_stays_bounded() {
        let store = CredentialStore::new(8);
        // Cheap hashes would be nicer, but argon2 default params keep the
        // test honest about what is cached; 20 verifications stay fast.
        let phc = hash_password("pw");
        for i in 0..20 {
            store.set(&format!("u{i}"), &phc);
            assert_eq!(
                store.verify_slow(&format!("u{i}"), "pw"),
                AuthOutcome::Verified
            );
            assert!(store.cached_len() <= 8);
        }
    }
}
