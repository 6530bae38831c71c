//! Notifications tollgate sends on its own: low-balance webhooks.
//!
//! [`low_balance`] decides when an account crossed below its threshold;
//! [`webhook`] makes the signed body; the [`outbox`](crate::outbox)
//! delivers it (durable, retried until a 2xx or `outbox.give_up_after_s`).
//!
//! How a crossing is seen: every ledger entry passes through
//! [`TouchedSink`], which only notes the account's name (it runs with the
//! account locked, so it must not read the ledger). [`LowBalanceNotifier`]
//! wakes on that note, reads each touched account's available balance
//! (both buckets) and asks the watch. So every way money moves — a send's
//! reservation, `setcredits`, a transfer, the sweeper, an operator's post —
//! is covered by one hook, milliseconds after the change.

pub mod low_balance;
pub mod webhook;

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::notify::LowBalanceConfig;
use crate::ledger::{Entry, EntrySink, Ledger};
use crate::outbox::{NewItem, Outbox};
use low_balance::{Crossing, LowBalanceWatch};

/// Most touched accounts remembered between two wake-ups; past it the
/// notifier checks every account with a threshold on its next pass.
const TOUCHED_MAX: usize = 100_000;

/// Accounts whose balance changed since the notifier last looked.
#[derive(Default)]
pub struct Touched {
    accounts: Mutex<HashSet<String>>,
    overflowed: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

impl Touched {
    /// Notes the accounts of one batch of entries under one lock.
    fn note(&self, entries: &[Entry]) {
        let mut set = self.accounts.lock();
        for e in entries {
            if set.len() >= TOUCHED_MAX {
                self.overflowed
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                break;
            }
            if !set.contains(e.account.as_str()) {
                set.insert(e.account.clone());
            }
        }
        drop(set);
        self.wake.notify_one();
    }

    fn take(&self) -> (Vec<String>, bool) {
        let set = std::mem::take(&mut *self.accounts.lock());
        let overflowed = self
            .overflowed
            .swap(false, std::sync::atomic::Ordering::Relaxed);
        (set.into_iter().collect(), overflowed)
    }
}

/// Notes the accounts of every entry, then hands the batch on.
pub struct TouchedSink {
    pub touched: Arc<Touched>,
    pub next: Arc<dyn EntrySink>,
}

impl EntrySink for TouchedSink {
    fn record(&self, entries: &[Entry]) {
        self.touched.note(entries);
        self.next.record(entries);
    }
}

/// Watches balances and queues a signed webhook per crossing.
pub struct LowBalanceNotifier {
    config: LowBalanceConfig,
    watch: LowBalanceWatch,
    touched: Arc<Touched>,
}

/// An account's available balance across both buckets.
fn available(ledger: &Ledger, account: &str) -> Option<i64> {
    let view = ledger.account(account)?;
    let b = view.balances();
    Some(
        b.anytime
            .available_milli()
            .saturating_add(b.offpeak.available_milli()),
    )
}

impl LowBalanceNotifier {
    /// A notifier for `ledger` as it is now: accounts already below their
    /// threshold count as notified.
    pub fn new(config: LowBalanceConfig, ledger: &Ledger, touched: Arc<Touched>) -> Self {
        let balances: Vec<(String, i64)> = ledger
            .account_names()
            .into_iter()
            .filter_map(|name| available(ledger, &name).map(|a| (name, a)))
            .collect();
        let watch = LowBalanceWatch::starting_from(
            &config.thresholds,
            balances.iter().map(|(n, a)| (n.as_str(), *a)),
        );
        LowBalanceNotifier {
            config,
            watch,
            touched,
        }
    }

    /// The crossings among the accounts touched since the last pass.
    pub fn pass(&self, ledger: &Ledger) -> Vec<Crossing> {
        let (mut accounts, overflowed) = self.touched.take();
        if overflowed {
            accounts = ledger.account_names();
        }
        accounts
            .iter()
            .filter_map(|name| {
                let balance = available(ledger, name)?;
                self.watch.observe(&self.config.thresholds, name, balance)
            })
            .collect()
    }

    /// The outbox item of one crossing: its dedupe key names the account
    /// and the crossing's time, so a retried enqueue adds nothing.
    pub fn item(&self, crossing: &Crossing, at_unix_ms: i64) -> NewItem {
        let id = format!("low_balance:{}:{at_unix_ms}", crossing.account);
        let body = webhook::low_balance_body(crossing, &id, at_unix_ms);
        NewItem {
            kind: "low_balance",
            target: self.config.url.to_string(),
            method: "POST".to_string(),
            headers: vec![
                ("Content-Type".to_string(), "application/json".to_string()),
                (
                    webhook::EVENT_HEADER.to_string(),
                    webhook::LOW_BALANCE_EVENT.to_string(),
                ),
                (
                    webhook::SIGNATURE_HEADER.to_string(),
                    webhook::sign(&self.config.secret, &body),
                ),
            ],
            body,
            dedupe_key: id,
        }
    }

    /// Runs until `stop`: after each wake-up, one pass, and each crossing
    /// queued in the outbox. A crossing the outbox refuses (full,
    /// unavailable) is logged and counted, and its account re-armed so the
    /// next change tries again.
    pub async fn run(
        self: Arc<Self>,
        ledger: Arc<Ledger>,
        outbox: Arc<Outbox>,
        clock: Arc<dyn crate::clock::Clock>,
        metrics: Arc<crate::metrics::Metrics>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = self.touched.wake.notified() => {}
                _ = stop.changed() => return,
            }
            for crossing in self.pass(&ledger) {
                let item = self.item(&crossing, clock.now_unix_ms());
                match outbox.enqueue(item).await {
                    Ok(_) => {
                        tracing::info!(
                            account = %crossing.account,
                            available_milli = crossing.available_milli,
                            threshold_milli = crossing.threshold_milli,
                            "low balance: notification queued"
                        );
                        metrics
                            .low_balance_notifications
                            .with_label_values(&["queued"])
                            .inc()
                    }
                    Err(e) => {
                        tracing::warn!(account = %crossing.account, error = %e, "low-balance notification not queued");
                        metrics
                            .low_balance_notifications
                            .with_label_values(&["refused"])
                            .inc();
                        self.watch.rearm(&crossing.account);
                    }
                }
            }
        }
    }
}
