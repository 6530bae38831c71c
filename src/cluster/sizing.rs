//! Grant sizing: how much of an account a node asks for, and when it tops
//! up, from the account's recent spend rate on this node. Pure integer
//! arithmetic on milli-credits and milliseconds; no clock of its own (the
//! caller passes the time).
//!
//! A grant covers `target_s` seconds of spend at the measured rate, within
//! `[min_milli, max_milli]`: a big grant costs fewer PostgreSQL round trips
//! (one take per `target_s` of traffic), a small one strands less credit on
//! a node that stops using the account (the rest of the cluster cannot
//! spend it until it is returned or expires). The node tops up when its
//! free part falls below `top_up_below_percent` of the grant it wants, so
//! the take runs ahead of need, off the request path.

/// The sizing knobs (`cluster.grant_*`, validated by `config::cluster`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizing {
    pub min_milli: i64,
    pub max_milli: i64,
    pub target_s: i64,
    pub top_up_below_percent: i64,
}

impl From<&crate::config::cluster::ClusterConfig> for Sizing {
    fn from(c: &crate::config::cluster::ClusterConfig) -> Sizing {
        Sizing {
            min_milli: c.grant_min_milli,
            max_milli: c.grant_max_milli,
            target_s: c.grant_target_s,
            top_up_below_percent: c.top_up_below_percent,
        }
    }
}

impl Sizing {
    /// The grant to hold for an account spending `rate_milli_per_s` here.
    pub fn want_milli(&self, rate_milli_per_s: i64) -> i64 {
        rate_milli_per_s
            .max(0)
            .saturating_mul(self.target_s.max(1))
            .clamp(self.min_milli, self.max_milli.max(self.min_milli))
    }

    /// Whether a node holding `free_milli` of a wanted `want_milli` should
    /// top up now.
    pub fn needs_top_up(&self, free_milli: i64, want_milli: i64) -> bool {
        // free / want < percent / 100, without division.
        (free_milli.max(0) as i128) * 100
            < (want_milli.max(0) as i128) * (self.top_up_below_percent as i128)
    }

    /// How much to take for a top-up: the wanted grant less what is still
    /// free, never more than `available_milli` (what the account has
    /// cluster-wide at the last look), and 0 when that is not worth a
    /// statement.
    pub fn top_up_milli(&self, free_milli: i64, want_milli: i64, available_milli: i64) -> i64 {
        let n = want_milli
            .saturating_sub(free_milli.max(0))
            .min(available_milli.max(0));
        if n <= 0 {
            0
        } else {
            n
        }
    }
}

/// An account's spend rate on this node: an exponentially weighted average
/// over windows of `WINDOW_MS`, in milli-credits per second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpendRate {
    window_start_ms: i64,
    window_milli: i64,
    rate_milli_per_s: i64,
}

impl SpendRate {
    pub const WINDOW_MS: i64 = 1_000;

    /// Counts `amount_milli` reserved at `now_ms`.
    pub fn record(&mut self, now_ms: i64, amount_milli: i64) {
        self.roll(now_ms);
        self.window_milli = self.window_milli.saturating_add(amount_milli.max(0));
    }

    /// The rate at `now_ms` (the last full windows, halving per idle one).
    pub fn rate_milli_per_s(&mut self, now_ms: i64) -> i64 {
        self.roll(now_ms);
        self.rate_milli_per_s.max(self.window_milli)
    }

    fn roll(&mut self, now_ms: i64) {
        if self.window_start_ms == 0 || now_ms < self.window_start_ms {
            self.window_start_ms = now_ms;
            return;
        }
        let windows = (now_ms - self.window_start_ms) / Self::WINDOW_MS;
        if windows == 0 {
            return;
        }
        // The closed window counts half, the history half; each further
        // idle window halves it again.
        let closed = self.window_milli.saturating_mul(1_000 / Self::WINDOW_MS);
        self.rate_milli_per_s = self.rate_milli_per_s / 2 + closed / 2;
        let idle = (windows - 1).min(62);
        self.rate_milli_per_s >>= idle;
        self.window_milli = 0;
        self.window_start_ms += windows * Self::WINDOW_MS;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Sizing = Sizing {
        min_milli: 1_000,
        max_milli: 100_000,
        target_s: 5,
        top_up_below_percent: 50,
    };

    #[test]
    fn a_grant_covers_the_target_seconds_within_the_bounds() {
        assert_eq!(S.want_milli(0), 1_000);
        assert_eq!(S.want_milli(2_000), 10_000);
        assert_eq!(S.want_milli(1_000_000), 100_000);
        assert!(S.needs_top_up(4_999, 10_000));
        assert!(!S.needs_top_up(5_000, 10_000));
        assert_eq!(S.top_up_milli(4_000, 10_000, 1_000_000), 6_000);
        assert_eq!(S.top_up_milli(4_000, 10_000, 2_500), 2_500);
        assert_eq!(S.top_up_milli(12_000, 10_000, 2_500), 0);
    }

    #[test]
    fn the_rate_follows_the_spend_and_decays_when_idle() {
        let mut r = SpendRate::default();
        for t in 0..5_000 {
            r.record(1 + t, 2); // 2 milli/ms = 2000 milli/s
        }
        let busy = r.rate_milli_per_s(5_001);
        assert!((1_500..=2_100).contains(&busy), "{busy}");
        let idle = r.rate_milli_per_s(15_001);
        assert!(idle < busy / 100, "{idle}");
    }

    proptest! {
        #[test]
        fn sizes_stay_within_bounds(
            rate in any::<i64>(),
            free in any::<i64>(),
            available in any::<i64>(),
        ) {
            let want = S.want_milli(rate);
            prop_assert!((S.min_milli..=S.max_milli).contains(&want));
            let n = S.top_up_milli(free, want, available);
            prop_assert!(n >= 0 && n <= want && n <= available.max(0));
        }

        #[test]
        fn the_rate_is_never_negative(steps in proptest::collection::vec((0i64..5_000, any::<i64>()), 1..50)) {
            let mut r = SpendRate::default();
            let mut now = 1i64;
            for (dt, amount) in steps {
                now += dt;
                r.record(now, amount);
                prop_assert!(r.rate_milli_per_s(now) >= 0);
            }
        }
    }
}
