//! When an account's available balance crosses below its threshold.
//!
//! One notification per crossing: an account that fell below its
//! threshold is *fired* until its balance is back at or above it, which
//! re-arms it. The state is per account, in memory, bounded by the number
//! of accounts that have a threshold (every account when a default is
//! set: the ledger's own size). At start every account below its threshold
//! counts as already notified, so a restart never sends a crossing twice
//! (the price: a crossing in the instant before a crash, whose
//! notification was not yet queued, is not sent).

use dashmap::DashMap;

pub use crate::config::notify::Thresholds;

/// A crossing below a threshold: what the notification says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    pub account: String,
    pub available_milli: i64,
    pub threshold_milli: i64,
}

/// The fired/armed state of every account with a threshold.
#[derive(Debug, Default)]
pub struct LowBalanceWatch {
    /// Accounts below their threshold and already notified.
    fired: DashMap<String, ()>,
}

impl LowBalanceWatch {
    /// A watch whose accounts below their threshold at start (`balances`)
    /// count as notified.
    pub fn starting_from<'a>(
        thresholds: &Thresholds,
        balances: impl IntoIterator<Item = (&'a str, i64)>,
    ) -> Self {
        let watch = LowBalanceWatch::default();
        for (account, available) in balances {
            if thresholds.of(account).is_some_and(|t| available < t) {
                watch.fired.insert(account.to_string(), ());
            }
        }
        watch
    }

    /// The account's balance now: a crossing when it is below the
    /// threshold and was not notified since it last was at or above it.
    /// Two concurrent observations of one crossing yield one `Crossing`
    /// (the map's entry decides).
    pub fn observe(
        &self,
        thresholds: &Thresholds,
        account: &str,
        available_milli: i64,
    ) -> Option<Crossing> {
        let Some(threshold_milli) = thresholds.of(account) else {
            self.fired.remove(account);
            return None;
        };
        if available_milli >= threshold_milli {
            self.fired.remove(account);
            return None;
        }
        match self.fired.entry(account.to_string()) {
            dashmap::Entry::Occupied(_) => None,
            dashmap::Entry::Vacant(v) => {
                v.insert(());
                Some(Crossing {
                    account: account.to_string(),
                    available_milli,
                    threshold_milli,
                })
            }
        }
    }

    /// Forgets that `account` was notified: its next observation below the
    /// threshold is a crossing again (a notification that could not be
    /// queued is retried on the account's next change).
    pub fn rearm(&self, account: &str) {
        self.fired.remove(account);
    }

    /// Accounts currently below their threshold (notified).
    pub fn fired(&self) -> usize {
        self.fired.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn thresholds(default: Option<i64>) -> Thresholds {
        Thresholds {
            default_milli: default,
            accounts: HashMap::from([
                ("vip".to_string(), Some(50_000)),
                ("quiet".to_string(), None),
            ]),
        }
    }

    #[test]
    fn once_per_crossing_and_back_up_re_arms() {
        let t = thresholds(Some(10_000));
        let w = LowBalanceWatch::default();
        assert_eq!(w.observe(&t, "john", 12_000), None);
        let c = w.observe(&t, "john", 9_000).unwrap();
        assert_eq!((c.available_milli, c.threshold_milli), (9_000, 10_000));
        assert_eq!(w.observe(&t, "john", 5_000), None, "still below: no repeat");
        assert_eq!(
            w.observe(&t, "john", 10_000),
            None,
            "at the threshold re-arms"
        );
        assert!(w.observe(&t, "john", 9_999).is_some(), "a new crossing");
    }

    #[test]
    fn per_account_thresholds_override_the_default() {
        let t = thresholds(Some(10_000));
        let w = LowBalanceWatch::default();
        assert!(w.observe(&t, "vip", 40_000).is_some());
        assert_eq!(w.observe(&t, "quiet", 0), None, "turned off");
        assert_eq!(
            w.observe(&t, "x", 0),
            Some(Crossing {
                account: "x".into(),
                available_milli: 0,
                threshold_milli: 10_000
            })
        );
        let none = thresholds(None);
        assert_eq!(
            w.observe(&none, "y", -5),
            None,
            "no default: no notification"
        );
    }

    #[test]
    fn below_at_start_counts_as_notified() {
        let t = thresholds(Some(10_000));
        let w = LowBalanceWatch::starting_from(&t, [("john", 1_000), ("mary", 20_000)]);
        assert_eq!(w.observe(&t, "john", 500), None);
        assert!(w.observe(&t, "mary", 500).is_some());
        assert_eq!(w.fired(), 2);
    }

    proptest! {
        /// Over any walk of balances, the crossings notified are exactly the
        /// steps from at-or-above the threshold to below it (counting the
        /// start as at-or-above).
        #[test]
        fn notifications_are_exactly_the_downward_crossings(
            threshold in -1_000i64..1_000,
            walk in proptest::collection::vec(-2_000i64..2_000, 1..60),
        ) {
            let t = Thresholds { default_milli: Some(threshold), accounts: HashMap::new() };
            let w = LowBalanceWatch::default();
            let mut above = true;
            for balance in walk {
                let expected = above && balance < threshold;
                let got = w.observe(&t, "a", balance);
                prop_assert_eq!(got.is_some(), expected);
                above = balance >= threshold;
            }
        }
    }
}
