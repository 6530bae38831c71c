//! Ledger hot path: `reserve` + `settle` (what every `sendmessage` costs the
//! ledger), under contention.
//!
//! Motivation: the design bets that a `DashMap` of per-account
//! `parking_lot::Mutex`es beats one global `Mutex<HashMap>` when many
//! accounts send at once, and costs little when everybody hammers one
//! account. Scenarios, each with 2 threads (the target machine class):
//! - `ledger/1_account`: both threads reserve+settle on one account;
//! - `ledger/10k_accounts`: each op picks one of 10 000 accounts;
//! - `mutex_hashmap/*`: the same two scenarios on a global
//!   `Mutex<HashMap<String, (posted, reserved)>>` with a reservation map,
//!   the naive baseline.
//!
//! The ledger runs with a `NullSink`: the cost of building entries is
//! included, the store's queue is not.
//!
//! Run: `cargo bench --bench ledger`. The time is wall time per
//! reserve+settle pair, both threads together (so 2 threads × 1 pair each
//! in 2 × that time).
//!
//! Last result (2-core VM, quiet, release, criterion medians [95 % CI]):
//! ```text
//! ledger/1_account            585 ns  [565 – 605]   1.71 M pairs/s
//! mutex_hashmap/1_account     159 ns  [151 – 167]   6.31 M pairs/s
//! ledger/10k_accounts         459 ns  [443 – 476]   2.18 M pairs/s
//! mutex_hashmap/10k_accounts  271 ns  [250 – 297]   3.69 M pairs/s
//! ```
//! The bet does not pay off at 2 threads: the naive global mutex is 3.7×
//! faster on one account and 1.7× on 10 000. Contention is not the cost;
//! the ledger's per-operation work is (it builds and records journal
//! entries with owned strings, keeps a reservation map entry with its
//! shares, and takes two map lookups per operation), which the baseline
//! does not do. Spreading over 10 000 accounts helps the ledger (−22 %)
//! and hurts the baseline (cache misses). End to end this is ~1 µs of a
//! `sendmessage`'s ~90 µs of proxy CPU (see benches/e2e/), so it is not
//! where the time goes; cheaper entries (interned account names, a
//! borrowed reference) are the lever if it ever is.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use parking_lot::Mutex;
use tollgate::ledger::{
    Bucket, BucketPreference, Ledger, LedgerConfig, NullSink, Role, SystemClock,
};

const THREADS: u64 = 2;
const MANY_ACCOUNTS: usize = 10_000;
const PRICE_MILLI: i64 = 1_000;

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("acct{i:05}")).collect()
}

fn ledger_with(names: &[String]) -> Arc<Ledger> {
    let ledger = Arc::new(Ledger::new(
        LedgerConfig::default(),
        Arc::new(NullSink),
        Arc::new(SystemClock::new()),
    ));
    for n in names {
        ledger.open_account(n, None, Role::User, None).unwrap();
        ledger.add(n, Bucket::Anytime, i64::MAX / 4, None).unwrap();
    }
    ledger
}

/// Runs `iters` operations split over `THREADS` threads; returns wall time.
fn run_threads(iters: u64, op: impl Fn(u64, u64) + Sync) -> Duration {
    let per_thread = iters.div_ceil(THREADS);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let op = &op;
            s.spawn(move || {
                for i in 0..per_thread {
                    op(t, i);
                }
            });
        }
    });
    start.elapsed()
}

/// Account name → (posted, reserved).
type Accounts = HashMap<String, (i64, i64)>;
/// Reservation id → (account, amount).
type Reservations = HashMap<u64, (String, i64)>;

/// The naive design: one lock around everything.
struct GlobalMutexLedger {
    inner: Mutex<(Accounts, Reservations, u64)>,
}

impl GlobalMutexLedger {
    fn new(names: &[String]) -> Self {
        let accounts = names
            .iter()
            .map(|n| (n.clone(), (i64::MAX / 4, 0)))
            .collect();
        GlobalMutexLedger {
            inner: Mutex::new((accounts, HashMap::new(), 0)),
        }
    }

    fn reserve(&self, name: &str, amount: i64) -> Option<u64> {
        let mut g = self.inner.lock();
        let (accounts, reservations, next) = &mut *g;
        let acc = accounts.get_mut(name)?;
        if acc.0 - acc.1 < amount {
            return None;
        }
        acc.1 += amount;
        *next += 1;
        reservations.insert(*next, (name.to_string(), amount));
        Some(*next)
    }

    fn settle(&self, id: u64) {
        let mut g = self.inner.lock();
        let (accounts, reservations, _) = &mut *g;
        let (name, amount) = reservations.remove(&id).unwrap();
        let acc = accounts.get_mut(&name).unwrap();
        acc.0 -= amount;
        acc.1 -= amount;
    }
}

fn pick(names: &[String], t: u64, i: u64) -> &str {
    // A cheap spread so the two threads rarely collide.
    let k = (i.wrapping_mul(2_654_435_761).wrapping_add(t * 7_919)) as usize % names.len();
    &names[k]
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("reserve_settle_2_threads");
    group.throughput(Throughput::Elements(1));
    for (label, n) in [("1_account", 1usize), ("10k_accounts", MANY_ACCOUNTS)] {
        let names = names(n);
        let ledger = ledger_with(&names);
        group.bench_function(format!("ledger/{label}"), |b| {
            b.iter_custom(|iters| {
                run_threads(iters, |t, i| {
                    let name = pick(&names, t, i);
                    let id = ledger
                        .reserve(
                            name,
                            &[PRICE_MILLI],
                            BucketPreference::AnytimeOnly,
                            Some("bench"),
                            None,
                        )
                        .unwrap();
                    ledger.settle(id, PRICE_MILLI, None).unwrap();
                })
            })
        });
        let baseline = GlobalMutexLedger::new(&names);
        group.bench_function(format!("mutex_hashmap/{label}"), |b| {
            b.iter_custom(|iters| {
                run_threads(iters, |t, i| {
                    let id = baseline.reserve(pick(&names, t, i), PRICE_MILLI).unwrap();
                    baseline.settle(id);
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
