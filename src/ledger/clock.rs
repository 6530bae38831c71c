//! Wall-clock time for entry timestamps and reservation ages.
//!
//! Owns nothing but the notion of "now" in Unix milliseconds, injected so
//! expiry and in-doubt sweeps can be tested without sleeping. It must never
//! be used for ordering: entry order is the seq, not the timestamp (the
//! system clock may step backwards).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of "now".
pub trait Clock: Send + Sync {
    fn now_unix_ms(&self) -> i64;
}

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            // A clock set before 1970: report negative time rather than panic.
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
        }
    }
}

/// A clock that only moves when told to (tests, simulations).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(now_unix_ms: i64) -> ManualClock {
        ManualClock(AtomicI64::new(now_unix_ms))
    }

    pub fn set(&self, now_unix_ms: i64) {
        self.0.store(now_unix_ms, Ordering::SeqCst);
    }

    pub fn advance(&self, delta_ms: i64) {
        self.0.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(1_000);
        assert_eq!(c.now_unix_ms(), 1_000);
        c.advance(500);
        assert_eq!(c.now_unix_ms(), 1_500);
        c.set(42);
        assert_eq!(c.now_unix_ms(), 42);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now_unix_ms() > 1_577_836_800_000);
    }
}
