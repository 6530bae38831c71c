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
//! Never stored or logged: a plain password. The cache holds MACs only, and
//! the key dies with the process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;
use dashmap::DashMap;
use rand::RngCore;

/// The result of checking a username and password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    Verified,
    UnknownAccount,
    WrongPassword,
}

struct Record {
    phc: String,
    generation: u64,
}

pub struct CredentialStore {
    records: DashMap<String, Arc<Record>>,
    /// MAC(username, password) → generation of the record it was verified
    /// against. A hit counts only while that generation is current.
    verified: DashMap<[u8; 32], (Arc<str>, u64)>,
    mac_key: [u8; 32],
    /// One gate per credentials being verified right now (single flight).
    in_flight: DashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>,
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
        let mut mac_key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut mac_key);
        CredentialStore {
            records: DashMap::new(),
            verified: DashMap::new(),
            mac_key,
            in_flight: DashMap::new(),
            cache_max_entries: cache_max_entries.max(1),
            next_generation: AtomicU64::new(1),
            argon2_runs: AtomicU64::new(0),
            dummy_phc: crate::config::accounts::hash_password("tollgate-dummy-password"),
        }
    }

    /// Sets (or replaces) an account's argon2id hash; cached verifications
    /// of the old password stop counting at once.
    pub fn set(&self, account: &str, phc: &str) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.records.insert(
            account.to_string(),
            Arc::new(Record {
                phc: phc.to_string(),
                generation,
            }),
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
        let current = self.records.get(&*account).map(|r| r.generation);
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
        let record = self.records.get(username).map(|r| r.clone());
        let Some(record) = record else {
            let _ = verify_phc(&self.dummy_phc, password);
            return AuthOutcome::UnknownAccount;
        };
        if !verify_phc(&record.phc, password) {
            return AuthOutcome::WrongPassword;
        }
        if self.verified.len() >= self.cache_max_entries {
            self.evict_some();
        }
        self.verified.insert(
            self.mac(username, password),
            (Arc::from(username), record.generation),
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
        let gate = self
            .in_flight
            .entry(mac)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        let outcome = {
            let _turn = gate.lock().await;
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
        };
        // The last one out removes the gate (the map holds one reference).
        self.in_flight
            .remove_if(&mac, |_, g| Arc::strong_count(g) <= 2);
        outcome
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
