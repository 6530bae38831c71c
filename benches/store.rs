//! Durable throughput of the write-behind store (SPEC 6, issue 3).
//!
//! Motivation: with `durability: sync` every acknowledged change waits for
//! its commit, and a commit costs an fsync. Group commit must make the
//! ledger's durable throughput independent of the fsync rate: at 256
//! concurrent writers it must reach at least 10× the raw fsyncs per second
//! of the disk.
//!
//! What it measures (in-process: ledger + `WriteBehind` + `SqliteStore` in
//! `synchronous=FULL`, no HTTP):
//! - raw fsyncs/s of the disk: 64-byte write + `fdatasync` in place, and
//!   append + `fsync` (what a WAL commit does), on a temp file next to the
//!   database;
//! - acknowledged changes/s with 1, 16 and 256 concurrent writers, each a
//!   tokio task looping `admit` → `ledger.add` → `wait_durable`, on a
//!   2-worker runtime; plus the mean batch size (entries per commit).
//!
//! Run: `cargo bench --bench store` (release). `STORE_BENCH_SECS` sets the
//! seconds per measurement (default 3); `STORE_BENCH_DIR` the directory
//! (default: the system temp dir — make sure it is on the disk you mean).
//!
//! Last result (`cargo bench --bench store`, 2-core VM, temp dir on the
//! same virtio disk as the repository, 3 s per line):
//! ```text
//! disk:      7242 fdatasync/s (64 B in place),      4830 fsync/s (64 B append)
//! sync,   1 writers:      3815 acknowledged changes/s,    3815 commits/s,    1.0 entries/commit,   0.5x the fsync rate
//! sync,  16 writers:     29178 acknowledged changes/s,    3082 commits/s,    9.5 entries/commit,   4.0x the fsync rate
//! sync, 256 writers:    186373 acknowledged changes/s,    1430 commits/s,  130.4 entries/commit,  25.7x the fsync rate
//! ```
//! One writer pays a full WAL commit per change (~2 syncs); at 256 writers
//! ~130 changes share each commit and throughput is bound by SQLite's
//! per-row work, not by the disk: 25.7× the fsync rate (goal: ≥ 10×).

use std::io::{Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tollgate::config::Durability;
use tollgate::ledger::{Bucket, Clock, EntrySink, Ledger, LedgerConfig, Role, SystemClock};
use tollgate::metrics::Metrics;
use tollgate::store::{AccountDirectory, SqliteStore, WriteBehind, WriterConfig};

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("STORE_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).expect("STORE_BENCH_DIR must be a writable directory"),
        None => tempfile::tempdir().expect("temp dir"),
    }
}

fn seconds() -> Duration {
    let s: f64 = std::env::var("STORE_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(s)
}

/// Small writes + sync on one file for `duration`; returns syncs/s.
fn fsync_rate(dir: &std::path::Path, append: bool, duration: Duration) -> f64 {
    let path = dir.join(if append { "append.bin" } else { "inplace.bin" });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let buf = [0x5au8; 64];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < duration {
        if append {
            f.write_all(&buf).unwrap();
            f.sync_all().unwrap();
        } else {
            f.seek(SeekFrom::Start(0)).unwrap();
            f.write_all(&buf).unwrap();
            f.sync_data().unwrap();
        }
        n += 1;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

struct Run {
    writers: usize,
    acked_per_s: f64,
    mean_batch: f64,
    commits_per_s: f64,
}

fn durable_throughput(writers: usize, duration: Duration) -> Run {
    let dir = bench_dir();
    let metrics = Arc::new(Metrics::new());
    let store = SqliteStore::open(&dir.path().join("bench.db"), Durability::Sync).unwrap();
    let writer = Arc::new(WriteBehind::new(
        Box::new(store),
        WriterConfig::default(),
        metrics.clone(),
    ));
    let ledger = Arc::new(Ledger::new(
        LedgerConfig::default(),
        writer.clone() as Arc<dyn EntrySink>,
        Arc::new(SystemClock::new()) as Arc<dyn Clock>,
    ));
    let directory: Weak<dyn AccountDirectory> = Arc::downgrade(&ledger) as _;
    writer.start(directory);
    // One account per writer (up to 256): the realistic case of many
    // clients, and no lock contention in the ledger to muddy the numbers.
    let accounts: Vec<String> = (0..writers).map(|i| format!("acct{i:03}")).collect();
    for a in &accounts {
        ledger.open_account(a, None, Role::User, None).unwrap();
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let commits_before = metrics.store_batch_entries.get_sample_count();
    let started = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for account in accounts {
            let (ledger, writer, acked, stop) =
                (ledger.clone(), writer.clone(), acked.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    writer.admit().await.expect("admitted");
                    ledger
                        .add(&account, Bucket::Anytime, 1_000, None)
                        .expect("add");
                    writer.wait_durable().await.expect("durable");
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        tokio::time::sleep(duration).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let commits = metrics.store_batch_entries.get_sample_count() - commits_before;
    let entries = metrics.store_committed_entries.get();
    writer.flush_and_stop(Duration::from_secs(10)).unwrap();
    Run {
        writers,
        acked_per_s: acked.load(Ordering::Relaxed) as f64 / elapsed,
        mean_batch: entries as f64 / commits.max(1) as f64,
        commits_per_s: commits as f64 / elapsed,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs a smoke
    // version so the target stays compiled and working.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let duration = if smoke {
        Duration::from_millis(200)
    } else {
        seconds()
    };
    let dir = bench_dir();
    let inplace = fsync_rate(dir.path(), false, duration);
    let append = fsync_rate(dir.path(), true, duration);
    println!(
        "disk: {inplace:>9.0} fdatasync/s (64 B in place), {append:>9.0} fsync/s (64 B append)"
    );
    let fsync_ref = inplace.max(append);
    for writers in [1, 16, 256] {
        let r = durable_throughput(writers, duration);
        println!(
            "sync, {:>3} writers: {:>9.0} acknowledged changes/s, {:>7.0} commits/s, {:>6.1} entries/commit, {:>5.1}x the fsync rate",
            r.writers,
            r.acked_per_s,
            r.commits_per_s,
            r.mean_batch,
            r.acked_per_s / fsync_ref
        );
    }
}
