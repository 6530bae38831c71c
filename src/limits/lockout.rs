//! Authentication-failure lockout (SPEC 7): `failures` failed checks for
//! one key (a source IP and a username) within `window` lock that key for
//! `lock`. A locked key is refused before any password check runs, so a
//! guesser pays nothing in argon2 time and the gateway (drop-in mode) sees
//! nothing.
//!
//! The window is fixed and starts at the first failure; a success forgets
//! the key. State is a small struct per key behind the map's shard lock
//! (failures are rare, so the write lock is not on a hot path; the hot path
//! for good clients is one shared-lock lookup that misses). The clock is
//! passed in.
//!
//! Memory: bounded by `max_keys`. A full table first forgets expired keys,
//! then keys that are counting but not locked (their attacker gets a fresh
//! count); if it is full of *locked* keys, new keys are not remembered
//! (counted in `untracked`).

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

pub use crate::config::limits::LockoutPolicy;

#[derive(Debug, Clone, Copy)]
struct State {
    window_start_ns: u64,
    failures: u32,
    /// 0 = not locked.
    locked_until_ns: u64,
    /// When the state stops mattering (end of the lock or the window).
    forget_at_ns: u64,
}

pub struct Lockout<K> {
    states: DashMap<K, State>,
    max_keys: usize,
    untracked: AtomicU64,
}

impl<K: Eq + Hash + Clone> Lockout<K> {
    pub fn new(max_keys: usize) -> Self {
        Lockout {
            states: DashMap::new(),
            max_keys: max_keys.max(1),
            untracked: AtomicU64::new(0),
        }
    }

    /// How long `key` stays locked, if it is locked at `now_ns`.
    pub fn locked_for(&self, key: &K, now_ns: u64) -> Option<u64> {
        let state = self.states.get(key)?;
        (state.locked_until_ns > now_ns).then(|| state.locked_until_ns - now_ns)
    }

    /// Counts a failure; returns how long the key is now locked for, if
    /// this failure locked it.
    pub fn record_failure(&self, key: &K, policy: LockoutPolicy, now_ns: u64) -> Option<u64> {
        if !self.states.contains_key(key) && self.states.len() >= self.max_keys {
            self.make_room(now_ns);
            if self.states.len() >= self.max_keys {
                self.untracked.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        // Short critical section: one key's state under its shard's lock.
        let mut state = self.states.entry(key.clone()).or_insert(State {
            window_start_ns: now_ns,
            failures: 0,
            locked_until_ns: 0,
            forget_at_ns: 0,
        });
        if state.locked_until_ns > now_ns {
            return None; // already locked (a check raced the lock)
        }
        if now_ns.saturating_sub(state.window_start_ns) >= policy.window_ns
            || state.locked_until_ns != 0
        {
            // A new window: the old one ended, or a lock just expired.
            state.window_start_ns = now_ns;
            state.failures = 0;
            state.locked_until_ns = 0;
        }
        state.failures = state.failures.saturating_add(1);
        if state.failures >= policy.failures.max(1) {
            state.locked_until_ns = now_ns.saturating_add(policy.lock_ns).max(1);
            state.failures = 0;
            state.forget_at_ns = state.locked_until_ns;
            Some(policy.lock_ns)
        } else {
            state.forget_at_ns = state.window_start_ns.saturating_add(policy.window_ns);
            None
        }
    }

    /// A successful check forgets the key's failures (never a lock: a
    /// locked key is refused before it can succeed).
    pub fn record_success(&self, key: &K, now_ns: u64) {
        self.states
            .remove_if(key, |_, s| s.locked_until_ns <= now_ns);
    }

    /// Forgets every key whose window and lock are over; returns how many.
    pub fn evict_expired(&self, now_ns: u64) -> usize {
        let before = self.states.len();
        self.states.retain(|_, s| s.forget_at_ns > now_ns);
        let after = self.states.len();
        if self.states.capacity() > 4 * after + 1024 {
            self.states.shrink_to_fit();
        }
        before.saturating_sub(after)
    }

    fn make_room(&self, now_ns: u64) {
        self.evict_expired(now_ns);
        if self.states.len() >= self.max_keys {
            self.states.retain(|_, s| s.locked_until_ns > now_ns);
        }
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    pub fn untracked(&self) -> u64 {
        self.untracked.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const POLICY: LockoutPolicy = LockoutPolicy {
        failures: 3,
        window_ns: 60 * S,
        lock_ns: 300 * S,
    };

    #[test]
    fn n_failures_in_the_window_lock_for_the_lock_time() {
        let l = Lockout::new(100);
        assert_eq!(l.record_failure(&"k", POLICY, 0), None);
        assert_eq!(l.record_failure(&"k", POLICY, 10 * S), None);
        assert_eq!(l.locked_for(&"k", 10 * S), None);
        assert_eq!(l.record_failure(&"k", POLICY, 20 * S), Some(300 * S));
        assert_eq!(l.locked_for(&"k", 20 * S), Some(300 * S));
        assert_eq!(l.locked_for(&"k", 319 * S), Some(S));
        assert_eq!(l.locked_for(&"k", 320 * S), None);
        // Other keys are not affected.
        assert_eq!(l.locked_for(&"other", 20 * S), None);
        // After the lock, a fresh count.
        assert_eq!(l.record_failure(&"k", POLICY, 321 * S), None);
        assert_eq!(l.record_failure(&"k", POLICY, 322 * S), None);
        assert_eq!(l.record_failure(&"k", POLICY, 323 * S), Some(300 * S));
    }

    #[test]
    fn failures_spread_over_more_than_the_window_do_not_lock() {
        let l = Lockout::new(100);
        // 0 s and 40 s share a window (2 failures), 80 s starts a new one.
        for i in 0..10 {
            assert_eq!(l.record_failure(&"k", POLICY, i * 40 * S), None, "{i}");
        }
        assert_eq!(l.locked_for(&"k", 400 * S), None);
    }

    #[test]
    fn success_forgets_failures() {
        let l = Lockout::new(100);
        l.record_failure(&"k", POLICY, 0);
        l.record_failure(&"k", POLICY, 0);
        l.record_success(&"k", 0);
        assert_eq!(l.record_failure(&"k", POLICY, 0), None);
        assert!(l.len() == 1);
    }

    #[test]
    fn expired_keys_are_evicted_and_memory_is_bounded() {
        let l = Lockout::new(10);
        for k in 0..10u32 {
            l.record_failure(&k, POLICY, 0);
        }
        for _ in 0..3 {
            l.record_failure(&0u32, POLICY, 0);
        }
        assert!(l.locked_for(&0, 0).is_some());
        // Full: counting keys make room for a new one, the locked one stays.
        l.record_failure(&99u32, POLICY, S);
        assert!(l.len() <= 10);
        assert!(l.locked_for(&0, S).is_some());
        let before = l.len();
        assert_eq!(l.evict_expired(61 * S), before - 1, "only the lock remains");
        assert_eq!(l.len(), 1);
        assert_eq!(l.evict_expired(400 * S), 1);
        assert!(l.is_empty());
    }
}
