//! The crate's one notion of "now", injected through `App` so that every
//! time-based rule can be driven by a test: ledger entry timestamps and
//! reservation ages, pricing (off-peak windows), rate limits and lockouts,
//! idempotency-key expiry, the in-doubt timer, store leases.
//!
//! Two readings, because they answer different questions:
//! - [`Clock::now_unix_ms`], the wall clock: what time it is (timestamps,
//!   tariff windows, ages compared across restarts). It may step, in either
//!   direction; it must never be used to order events (entries are ordered
//!   by seq).
//! - [`Clock::monotonic_ns`], a monotonic count that never goes back: how
//!   much time passed (limiter cells, lockout windows). It starts at one
//!   second, so a limiter's "0 = never seen" is always idle.
//!
//! Nothing here sleeps or schedules; waiting stays with tokio.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Nanoseconds in a second (the monotonic reading starts here).
pub const NANOS_PER_S: u64 = 1_000_000_000;

/// A source of "now".
pub trait Clock: Send + Sync {
    /// Wall-clock time in Unix milliseconds.
    fn now_unix_ms(&self) -> i64;
    /// Monotonic nanoseconds since this clock was made, plus one second.
    fn monotonic_ns(&self) -> u64;
}

/// The operating system's clocks.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    pub fn new() -> SystemClock {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            // A clock set before 1970: report negative time rather than panic.
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
        }
    }

    fn monotonic_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(NANOS_PER_S)
    }
}

/// A clock that only moves when told to (tests, simulations). Advancing
/// moves both readings; [`ManualClock::set`] steps the wall clock alone,
/// as an operator or NTP would.
#[derive(Debug)]
pub struct ManualClock {
    wall_ms: AtomicI64,
    mono_ns: AtomicU64,
}

impl ManualClock {
    pub fn new(now_unix_ms: i64) -> ManualClock {
        ManualClock {
            wall_ms: AtomicI64::new(now_unix_ms),
            mono_ns: AtomicU64::new(NANOS_PER_S),
        }
    }

    /// Steps the wall clock (the monotonic reading does not move).
    pub fn set(&self, now_unix_ms: i64) {
        self.wall_ms.store(now_unix_ms, Ordering::SeqCst);
    }

    /// Lets `delta_ms` pass (a negative delta steps the wall clock back
    /// and leaves the monotonic reading where it is).
    pub fn advance(&self, delta_ms: i64) {
        self.wall_ms.fetch_add(delta_ms, Ordering::SeqCst);
        if let Ok(ms) = u64::try_from(delta_ms) {
            self.mono_ns
                .fetch_add(ms.saturating_mul(1_000_000), Ordering::SeqCst);
        }
    }

    /// Lets `delta_ns` pass (the wall clock moves by whole milliseconds).
    pub fn advance_ns(&self, delta_ns: u64) {
        let before = self.mono_ns.fetch_add(delta_ns, Ordering::SeqCst);
        let whole_ms = (before + delta_ns) / 1_000_000 - before / 1_000_000;
        self.wall_ms.fetch_add(
            i64::try_from(whole_ms).unwrap_or(i64::MAX),
            Ordering::SeqCst,
        );
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new(0)
    }
}

impl Clock for ManualClock {
    fn now_unix_ms(&self) -> i64 {
        self.wall_ms.load(Ordering::SeqCst)
    }

    fn monotonic_ns(&self) -> u64 {
        self.mono_ns.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let c = ManualClock::new(1_000);
        assert_eq!((c.now_unix_ms(), c.monotonic_ns()), (1_000, NANOS_PER_S));
        c.advance(250);
        assert_eq!(c.now_unix_ms(), 1_250);
        assert_eq!(c.monotonic_ns(), NANOS_PER_S + 250_000_000);
        c.advance_ns(1_500_000);
        assert_eq!(c.now_unix_ms(), 1_251);
        c.advance_ns(500_000);
        assert_eq!(c.now_unix_ms(), 1_252, "whole milliseconds accumulate");
        c.set(10);
        c.advance(-5);
        assert_eq!(c.now_unix_ms(), 5);
        assert_eq!(
            c.monotonic_ns(),
            NANOS_PER_S + 252_000_000,
            "never backwards"
        );
    }

    #[test]
    fn the_system_clock_is_now_and_monotonic() {
        let c = SystemClock::new();
        let a = c.monotonic_ns();
        let b = c.monotonic_ns();
        assert!(a >= NANOS_PER_S && b >= a);
        assert!(c.now_unix_ms() > 1_700_000_000_000);
    }
}
