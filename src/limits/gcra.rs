//! GCRA (the generic cell rate algorithm) over a map of keys: one
//! `AtomicU64` per key holding its *theoretical arrival time* (TAT) in
//! nanoseconds of the limiter's monotonic clock, updated by a CAS loop.
//!
//! A rate of `r` units per second with a burst of `b` units gives each unit
//! an emission interval `T = 1 s / r` and a tolerance `τ = b·T`. A request
//! of `n` units at time `t` is allowed when `max(TAT, t) + n·T − t ≤ τ`, and
//! then moves the TAT there. When refused it changes nothing, and can be
//! allowed again after `max(TAT, t) + n·T − τ − t` (the `Retry-After`).
//!
//! Properties this module relies on:
//! - a key whose TAT is not after now is indistinguishable from a key never
//!   seen: evicting it loses nothing. [`KeyedGcra::evict_idle`] removes
//!   exactly those, so eviction never hands a client a fresh burst early;
//! - a request larger than the whole burst (`n·T > τ`) could never pass, so
//!   it is allowed from an idle key and leaves a *debt* (the TAT runs ahead
//!   of now by `n·T`): the key is refused until the debt is paid. A
//!   20 000-recipient batch is thus possible, and pays for itself in time.
//!
//! Concurrency: the map's shard lock is held (shared) only for the CAS loop
//! of one key; inserting a new key takes the shard's write lock once. The
//! clock is passed in (`now_ns`), so tests drive time by hand.
//!
//! Memory: bounded by `max_keys`. When the table is full, a new key is first
//! made room for by evicting idle keys (at most once per
//! [`INLINE_SWEEP_EVERY_NS`]); if every key is still active, the new key is
//! decided as a fresh one and *not remembered* (counted in `untracked`): a
//! flood of distinct keys can then get one burst each, which is what a
//! fresh key gets anyway, but cannot grow memory.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

pub use crate::clock::NANOS_PER_S;

/// Shortest time between two inline sweeps of a full table: a full table
/// of active keys must not turn every new key into a full scan.
pub const INLINE_SWEEP_EVERY_NS: u64 = 100_000_000;

pub use crate::config::limits::Rate;

/// What one check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Limited { retry_after_ns: u64 },
}

impl Verdict {
    pub fn is_allowed(self) -> bool {
        self == Verdict::Allowed
    }
}

/// `Retry-After` in whole seconds: rounded up, at least 1 (a 0 would invite
/// an immediate retry that is refused again).
pub fn retry_after_s(retry_after_ns: u64) -> u64 {
    retry_after_ns.div_ceil(NANOS_PER_S).max(1)
}

/// The pure GCRA step: the verdict for `cost` units at `now_ns` against a
/// stored TAT (0 = never seen), and the TAT to store if allowed.
pub fn decide(stored_tat_ns: u64, cost: u64, rate: Rate, now_ns: u64) -> (Verdict, u64) {
    let increment = cost.saturating_mul(rate.interval_ns);
    let tat = stored_tat_ns.max(now_ns);
    let new_tat = tat.saturating_add(increment);
    if new_tat - now_ns <= rate.tolerance_ns {
        return (Verdict::Allowed, new_tat);
    }
    if increment > rate.tolerance_ns {
        // Larger than the burst: only from an idle key, leaving a debt.
        if stored_tat_ns <= now_ns {
            return (Verdict::Allowed, new_tat);
        }
        return (
            Verdict::Limited {
                retry_after_ns: stored_tat_ns - now_ns,
            },
            stored_tat_ns,
        );
    }
    (
        Verdict::Limited {
            retry_after_ns: new_tat - now_ns - rate.tolerance_ns,
        },
        stored_tat_ns,
    )
}

/// Applies [`decide`] to one cell atomically.
pub fn apply(cell: &AtomicU64, cost: u64, rate: Rate, now_ns: u64) -> Verdict {
    let mut current = cell.load(Ordering::Acquire);
    loop {
        let (verdict, new_tat) = decide(current, cost, rate, now_ns);
        if !verdict.is_allowed() {
            return verdict;
        }
        match cell.compare_exchange_weak(current, new_tat, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return verdict,
            Err(actual) => current = actual,
        }
    }
}

/// Gives back `cost` units taken by an allowed check (the request was
/// refused later for another reason, so it used nothing).
pub fn refund(cell: &AtomicU64, cost: u64, rate: Rate) {
    let increment = cost.saturating_mul(rate.interval_ns);
    let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
        Some(tat.saturating_sub(increment))
    });
}

/// One GCRA cell per key, bounded in number.
pub struct KeyedGcra<K> {
    cells: DashMap<K, AtomicU64>,
    max_keys: usize,
    /// New keys decided without being remembered because the table was
    /// full of active keys.
    untracked: AtomicU64,
    /// When the last inline sweep of a full table ran (limiter clock).
    last_inline_sweep_ns: AtomicU64,
}

impl<K: Eq + Hash + Clone> KeyedGcra<K> {
    pub fn new(max_keys: usize) -> Self {
        KeyedGcra {
            cells: DashMap::new(),
            max_keys: max_keys.max(1),
            untracked: AtomicU64::new(0),
            last_inline_sweep_ns: AtomicU64::new(0),
        }
    }

    /// Decides `cost` units for `key` at `now_ns`; an allowed request
    /// consumes them, a refused one changes nothing.
    pub fn check(&self, key: &K, cost: u64, rate: Rate, now_ns: u64) -> Verdict {
        if let Some(cell) = self.cells.get(key) {
            return apply(&cell, cost, rate, now_ns);
        }
        // A key never seen (or evicted while idle) starts from TAT 0.
        let (verdict, new_tat) = decide(0, cost, rate, now_ns);
        if !verdict.is_allowed() {
            return verdict;
        }
        if self.cells.len() >= self.max_keys && !self.make_room(now_ns) {
            self.untracked.fetch_add(1, Ordering::Relaxed);
            return verdict;
        }
        match self.cells.entry(key.clone()) {
            dashmap::Entry::Occupied(e) => apply(e.get(), cost, rate, now_ns),
            dashmap::Entry::Vacant(v) => {
                v.insert(AtomicU64::new(new_tat));
                verdict
            }
        }
    }

    /// Gives back what an allowed check took.
    pub fn refund(&self, key: &K, cost: u64, rate: Rate) {
        if let Some(cell) = self.cells.get(key) {
            refund(&cell, cost, rate);
        }
    }

    /// Evicts idle keys if the last inline sweep is old enough; whether
    /// there is room now.
    fn make_room(&self, now_ns: u64) -> bool {
        let last = self.last_inline_sweep_ns.load(Ordering::Relaxed);
        if now_ns.saturating_sub(last) >= INLINE_SWEEP_EVERY_NS
            && self
                .last_inline_sweep_ns
                .compare_exchange(last, now_ns.max(1), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.evict_idle(now_ns);
        }
        self.cells.len() < self.max_keys
    }

    /// Removes every key whose TAT is not after `now_ns` (lossless, see the
    /// module docs) and gives memory back when the table shrank a lot.
    /// Returns how many were removed. Takes each shard's write lock once.
    pub fn evict_idle(&self, now_ns: u64) -> usize {
        let before = self.cells.len();
        self.cells
            .retain(|_, cell| cell.load(Ordering::Acquire) > now_ns);
        let after = self.cells.len();
        if self.cells.capacity() > 4 * after + 1024 {
            self.cells.shrink_to_fit();
        }
        before.saturating_sub(after)
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Slots allocated (for the memory bound: each is about
    /// `size_of::<(K, AtomicU64)>() + 1` bytes).
    pub fn capacity(&self) -> usize {
        self.cells.capacity()
    }

    pub fn untracked(&self) -> u64 {
        self.untracked.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NANOS_PER_S;

    #[test]
    fn burst_then_steady_rate() {
        // 2 per second, burst 4.
        let rate = Rate::new(2.0, 4);
        assert_eq!(rate.interval_ns, S / 2);
        let g = KeyedGcra::new(10);
        let t0 = 10 * S;
        for _ in 0..4 {
            assert_eq!(g.check(&"k", 1, rate, t0), Verdict::Allowed);
        }
        assert_eq!(
            g.check(&"k", 1, rate, t0),
            Verdict::Limited {
                retry_after_ns: S / 2
            }
        );
        // A refused request changes nothing: the same answer again.
        assert_eq!(
            g.check(&"k", 1, rate, t0),
            Verdict::Limited {
                retry_after_ns: S / 2
            }
        );
        // Then exactly one every 500 ms.
        for i in 1..=10 {
            let t = t0 + i * S / 2;
            assert!(g.check(&"k", 1, rate, t).is_allowed(), "tick {i}");
            assert!(!g.check(&"k", 1, rate, t).is_allowed(), "tick {i}");
        }
        // Other keys are independent.
        assert!(g.check(&"other", 4, rate, t0).is_allowed());
    }

    #[test]
    fn costs_are_weighted_and_retry_after_rounds_up() {
        // 10 parts per second, burst 20.
        let rate = Rate::new(10.0, 20);
        let g = KeyedGcra::new(10);
        assert!(g.check(&1u8, 15, rate, 0).is_allowed());
        // 15 used; 6 more would need 100 ms of credit.
        let v = g.check(&1u8, 6, rate, 0);
        assert_eq!(
            v,
            Verdict::Limited {
                retry_after_ns: S / 10
            }
        );
        assert_eq!(retry_after_s(S / 10), 1);
        assert_eq!(retry_after_s(S), 1);
        assert_eq!(retry_after_s(S + 1), 2);
        assert_eq!(retry_after_s(0), 1);
        assert!(g.check(&1u8, 6, rate, S / 10).is_allowed());
        // Far in the future the key is idle again: a full burst.
        assert!(g.check(&1u8, 20, rate, 100 * S).is_allowed());
        assert!(!g.check(&1u8, 1, rate, 100 * S).is_allowed());
    }

    #[test]
    fn oversized_requests_pass_when_idle_and_leave_a_debt() {
        let rate = Rate::new(10.0, 20);
        let g = KeyedGcra::new(10);
        // 100 parts > burst 20: allowed from idle, 10 s of debt.
        assert!(g.check(&"bulk", 100, rate, 5 * S).is_allowed());
        assert_eq!(
            g.check(&"bulk", 1, rate, 5 * S),
            Verdict::Limited {
                retry_after_ns: 8 * S + S / 10
            }
        );
        // Another oversized one waits for the whole debt.
        assert_eq!(
            g.check(&"bulk", 100, rate, 6 * S),
            Verdict::Limited {
                retry_after_ns: 9 * S
            }
        );
        assert!(g.check(&"bulk", 100, rate, 15 * S).is_allowed());
    }

    #[test]
    fn refund_gives_back_what_was_taken() {
        let rate = Rate::new(1.0, 2);
        let g = KeyedGcra::new(10);
        assert!(g.check(&"k", 2, rate, 0).is_allowed());
        assert!(!g.check(&"k", 1, rate, 0).is_allowed());
        g.refund(&"k", 2, rate);
        assert!(g.check(&"k", 2, rate, 0).is_allowed());
    }

    #[test]
    fn idle_keys_are_evicted_losslessly() {
        let rate = Rate::new(1.0, 3);
        let g = KeyedGcra::new(100);
        for k in 0..50u32 {
            assert!(g.check(&k, 1, rate, 0).is_allowed());
        }
        assert!(g.check(&7, 2, rate, 0).is_allowed()); // key 7 exhausted until 3 s
        assert_eq!(g.evict_idle(0), 0, "all active");
        // After 1 s every key but 7 is idle.
        assert_eq!(g.evict_idle(S), 49);
        assert_eq!(g.len(), 1);
        // Key 7 kept its state: still exhausted at 1 s (1 unit free).
        assert!(g.check(&7, 1, rate, S).is_allowed());
        assert!(!g.check(&7, 1, rate, S).is_allowed());
        assert_eq!(g.evict_idle(10 * S), 1);
        assert!(g.is_empty());
    }

    #[test]
    fn a_full_table_makes_room_or_decides_without_remembering() {
        let rate = Rate::new(1.0, 1);
        let g = KeyedGcra::new(4);
        for k in 0..4u32 {
            assert!(g.check(&k, 1, rate, 0).is_allowed());
        }
        // Full of active keys: the new key is allowed, not stored.
        assert!(g.check(&99, 1, rate, 0).is_allowed());
        assert_eq!((g.len(), g.untracked()), (4, 1));
        // Later the old keys are idle: an inline sweep makes room.
        assert!(g.check(&100, 1, rate, 2 * S).is_allowed());
        assert_eq!(g.len(), 1);
        assert!(!g.check(&100, 1, rate, 2 * S).is_allowed());
    }

    #[test]
    fn concurrent_checks_never_allow_more_than_the_burst() {
        let rate = Rate::new(1.0, 1000);
        let g = std::sync::Arc::new(KeyedGcra::new(10));
        let allowed = std::sync::Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (g, allowed) = (g.clone(), allowed.clone());
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        if g.check(&"k", 1, rate, 0).is_allowed() {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(allowed.load(Ordering::Relaxed), 1000);
    }
}
