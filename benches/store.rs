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
//! (default: the system temp dir — make sure it is on the disk you mean);
//! `TOLLGATE_TEST_PG` another PostgreSQL server than 127.0.0.1:5432 (it is
//! started if it is down, as in the tests).
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
//!
//! PostgreSQL beside SQLite (issue 14): the same loop with the writer on a
//! `PgStore` (a fresh database on the local PostgreSQL 15 at
//! 127.0.0.1:5432, created and dropped by the run; `synchronous_commit =
//! on`, the server's default `fsync`), one line per backend and writer
//! count, plus PostgreSQL statements per commit (the writer sends one
//! statement per batch, whatever its size). Last result (`cargo bench
//! --bench store`, same VM, 2 cores shared with other builds at load ≈ 5,
//! so the disk managed only ~400 syncs/s that day; compare the lines with
//! each other, not with the ones above):
//! ```text
//! disk:       396 fdatasync/s (64 B in place),       428 fsync/s (64 B append)
//! sqlite   sync,   1 writers:       747 acknowledged changes/s,     747 commits/s,    1.0 entries/commit,   1.7x the fsync rate
//! postgres sync,   1 writers:       466 acknowledged changes/s,     466 commits/s,    1.0 entries/commit,   1.1x the fsync rate, 1.00 statements/commit, 0.62x sqlite
//! sqlite   sync,  16 writers:      5552 acknowledged changes/s,     355 commits/s,   15.7 entries/commit,  13.0x the fsync rate
//! postgres sync,  16 writers:      4733 acknowledged changes/s,     307 commits/s,   15.4 entries/commit,  11.1x the fsync rate, 1.00 statements/commit, 0.85x sqlite
//! sqlite   sync, 256 writers:     39614 acknowledged changes/s,     276 commits/s,  143.4 entries/commit,  92.6x the fsync rate
//! postgres sync, 256 writers:     22171 acknowledged changes/s,     165 commits/s,  134.6 entries/commit,  51.8x the fsync rate, 1.00 statements/commit, 0.56x sqlite
//! ```
//! PostgreSQL pays a loopback round trip and the server's WAL flush per
//! commit, and its per-row work runs in another process competing for the
//! same 2 cores: ~1.3 ms of server time for a 135-entry batch with ~100
//! account upserts (measured in psql without the flush). Dropping the
//! foreign key from entries to nodes cut the append cost per row from
//! 13.6 µs to 3.8 µs; a generic plan saves ~10% more.

use std::io::{Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tollgate::config::Durability;
use tollgate::ledger::{Bucket, Clock, EntrySink, Ledger, LedgerConfig, Role, SystemClock};
use tollgate::metrics::Metrics;
use tollgate::store::{
    AccountDirectory, PgSettings, PgStore, SqliteStore, Store, WriteBehind, WriterConfig,
};

/// The local PostgreSQL and a database of its own (created, dropped).
#[path = "../src/store/pg/testing.rs"]
mod pg_testing;

/// Which store the writer commits to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

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
    /// PostgreSQL statements per commit (0 for SQLite).
    statements_per_commit: f64,
}

fn durable_throughput(backend: Backend, writers: usize, duration: Duration) -> Run {
    let dir = bench_dir();
    let metrics = Arc::new(Metrics::new());
    // Created outside the runtime (the PostgreSQL client blocks), dropped
    // after the writer has stopped.
    let db = (backend == Backend::Postgres).then(|| pg_testing::TestDb::create("bench"));
    let store: Box<dyn Store> = match &db {
        None => {
            Box::new(SqliteStore::open(&dir.path().join("bench.db"), Durability::Sync).unwrap())
        }
        Some(db) => {
            let settings = PgSettings::new(tollgate::store::pg::PgUrl::parse(&db.url()).unwrap());
            Box::new(
                PgStore::open(&settings, Durability::Sync, "bench", 0)
                    .unwrap()
                    .with_metrics(metrics.clone()),
            )
        }
    };
    let writer = Arc::new(WriteBehind::new(
        store,
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
    let all_commits = metrics.store_batch_entries.get_sample_count();
    let run = Run {
        writers,
        acked_per_s: acked.load(Ordering::Relaxed) as f64 / elapsed,
        mean_batch: entries as f64 / commits.max(1) as f64,
        commits_per_s: commits as f64 / elapsed,
        statements_per_commit: metrics.store_pg_statements.get() as f64 / all_commits.max(1) as f64,
    };
    drop(writer);
    drop(ledger);
    drop(db);
    run
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
        let sqlite = durable_throughput(Backend::Sqlite, writers, duration);
        for (backend, r) in [
            (Backend::Sqlite, &sqlite),
            (
                Backend::Postgres,
                &durable_throughput(Backend::Postgres, writers, duration),
            ),
        ] {
            let extra = match backend {
                Backend::Sqlite => String::new(),
                Backend::Postgres => format!(
                    ", {:.2} statements/commit, {:.2}x sqlite",
                    r.statements_per_commit,
                    r.acked_per_s / sqlite.acked_per_s
                ),
            };
            println!(
                "{:<8} sync, {:>3} writers: {:>9.0} acknowledged changes/s, {:>7.0} commits/s, {:>6.1} entries/commit, {:>5.1}x the fsync rate{extra}",
                backend.name(),
                r.writers,
                r.acked_per_s,
                r.commits_per_s,
                r.mean_batch,
                r.acked_per_s / fsync_ref
            );
        }
    }
}
