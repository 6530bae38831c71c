//! Resident memory per account and start-up time with millions of accounts
//! (issue 8).
//!
//! Motivation: the ledger and the credential store keep every account in
//! memory; an operator with 10 million accounts must fit them in a small VM
//! (target: under 256 bytes resident per account at 10 M, credentials
//! included) and restart quickly (target: under 10 s to start with 10 M
//! accounts in the store).
//!
//! What it measures, each case in a fresh child process of this binary so
//! one case's heap does not inflate the next:
//! - `accounts N`: builds, in process, a ledger with N accounts (names like
//!   `user00001234`, an any-time balance, no parent or tariff class — the
//!   common case) and a `CredentialStore` entry per account (a distinct
//!   argon2id PHC string of the real length each), both maps sized for N
//!   up front as start-up sizes them, and reads `VmRSS` from
//!   `/proc/self/status` before, after the ledger and after the credentials.
//! - `startup N`: the real start-up path (`server::open_store` +
//!   `server::build_app_with_store`: SQLite open, open reservations and last
//!   seq, then the accounts read and restored by one thread per core, writer
//!   start) over a store holding N accounts, timed (wall and CPU: the
//!   machine is shared), plus the resident memory afterwards. The store is
//!   generated once through `SqliteStore::commit` (one `add` entry per
//!   account) and cached under `target/bench-memory/` so reruns are fast.
//!   Credentials are not part of the store (they come from the seed file),
//!   so they are not in this time.
//!
//! Run: `cargo bench --bench memory` (or `make bench-memory`).
//! `MEMORY_BENCH_ACCOUNTS` (default `1000000,10000000`) sets the account
//! counts of the memory cases, `MEMORY_BENCH_STARTUP` (default `10000000`;
//! `0` skips) the store size of the start-up case. Results are printed and
//! written to `target/bench-memory/results.md`.
//!
//! Results (`cargo bench --bench memory`, 2-core 23 GB VM shared with other
//! benchmarks; B = bytes of RSS per account; the start-up time varies
//! ±20 % run to run with the other tenants of the machine):
//! ```text
//!                          1 M accounts         10 M accounts        start-up, 10 M
//!                          ledger + cred = B    ledger + cred = B    (load + restore)
//! before (b004c06)         213 + 291 = 504      202 + 269 = 471      55.8 s (39.0 + 16.8)
//! d8901df, glibc malloc    183 + 151 = 334      170 + 138 = 308      16.2 s (5.6 + 10.5)
//! 2f2bf0f + mimalloc 3     149 + 140 = 289      154 + 124 = 278      14.8 s (7.8 + 7.0)
//! after (mimalloc 3)        99 + 117 = 216      111 + 113 = 224      3.5-4.4 s (CPU 6.5-8.4 s)
//! target                                                   < 256     < 10 s
//! ```
//! Both targets are met. The first round (d8901df) interned an account's
//! parent and tariff class, kept argon2id hashes decoded (48 bytes) and
//! replaced a sorted read of the accounts by unsorted scans. This round
//! (found by sizing each allocation against the measured RSS deltas, and
//! `perf record -e cpu-clock` on the start-up case):
//! - one allocation per account and a one-pointer map slot: the account
//!   (name inline up to 24 bytes via `compact_str`, lock, 40-byte state;
//!   role interned with parent and class) is the map's key, hashed and
//!   compared by name, instead of an `Arc<str>` key plus an
//!   `Arc<Mutex<…>>` value: 88 bytes + ~15 B of slot at the map's 60 %
//!   load, was 32 + 80 + ~42;
//! - credentials the same way: name and record in one 80-byte box that is
//!   the key (was a `Box<str>` key, a boxed record and a 24-byte slot);
//! - start-up: no `Vec` of 10 M `AccountView`s (its growth and page faults
//!   were most of the old "load"): each of one thread per core opens its
//!   own connection, scans its own rowid range, builds accounts straight
//!   from borrowed columns (`ReadyAccount`, no `String`s) and inserts them;
//!   maps sized once from `MAX(rowid)`. What is left is cache misses in
//!   the account map (~35 %), page zeroing of fresh heap (~25 %) and
//!   SQLite (~30 %). A reader thread feeding restore threads was tried:
//!   more CPU, from cross-core traffic.
//! - the warm-up read of the store now streams through a small buffer: a
//!   file-sized `Vec` freed just before the timed part left 1 GB of
//!   faulted-in heap for start-up to reuse (RSS before 1071 MiB), which
//!   flattered both its time and its RSS.
//!
//! Allocator note: mimalloc 3 (the `mimalloc` crate's default) serves an
//! aligned request whose size is not a power of two from one size class up
//! when it takes a fresh page, which for bulk allocations is nearly always:
//! 80 bytes with 8-byte alignment costs 96, 96 costs 112 (measured: 10 M
//! boxes). The account is sized to 88 bytes so it lands in 96 either way;
//! the 80-byte credential costs 96 here and would cost 80 under mimalloc
//! 2 (`features = ["v2"]`) or glibc, i.e. ~208 B/account in total.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use tollgate::auth::CredentialStore;
use tollgate::config::{Config, Durability};
use tollgate::ledger::{
    AccountView, Bucket, BucketBalance, Entry, EntryKind, Ledger, LedgerConfig, NullSink, Role,
    SystemClock,
};
use tollgate::metrics::Metrics;
use tollgate::store::{AccountMeta, SqliteStore, Store};

/// The binary's allocator: resident memory depends on it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CASE_ENV: &str = "TOLLGATE_MEMORY_CASE";
const BALANCE_MILLI: i64 = 1_000_000;
/// Accounts per generated store commit.
const GENERATE_BATCH: usize = 100_000;

fn account_name(i: usize) -> String {
    format!("user{i:08}")
}

/// Resident set size of this process, in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS in /proc/self/status")
}

/// CPU time (user + system) of this process so far, in seconds: the
/// machine is shared, so wall time alone says little about a change.
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the parenthesised command name; utime and stime are the
    // 12th and 13th of them, in clock ticks (100 a second on Linux).
    let rest = stat.rsplit_once(')').expect("stat format").1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    ticks as f64 / 100.0
}

fn counts(var: &str, default: &str) -> Vec<usize> {
    std::env::var(var)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .filter_map(|s| s.trim().replace('_', "").parse().ok())
        .filter(|&n| n > 0)
        .collect()
}

fn target_dir() -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = base.join("bench-memory");
    std::fs::create_dir_all(&dir).expect("create target/bench-memory");
    dir
}

fn main() {
    if let Ok(case) = std::env::var(CASE_ENV) {
        let (kind, n) = case.split_once(':').expect("CASE is kind:N");
        let n: usize = n.parse().expect("N");
        match kind {
            "accounts" => case_accounts(n),
            "startup" => case_startup(n),
            other => panic!("unknown case {other}"),
        }
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // useful either: with no `--bench`, run the smallest case as a smoke test.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let (accounts, startup) = if smoke {
        (vec![10_000], vec![10_000])
    } else {
        (
            counts("MEMORY_BENCH_ACCOUNTS", "1000000,10000000"),
            counts("MEMORY_BENCH_STARTUP", "10000000"),
        )
    };
    let mut report = String::new();
    report.push_str(
        "| case | accounts | RSS before | RSS after | ledger B/acct | credentials B/acct | total B/acct | time |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for n in accounts {
        report.push_str(&run_child(&format!("accounts:{n}")));
    }
    for n in startup {
        let store = generated_store(n);
        report.push_str(&run_child_with(
            &format!("startup:{n}"),
            &[("TOLLGATE_MEMORY_STORE", store.as_os_str())],
        ));
    }
    println!("\n{report}");
    if !smoke {
        let path = target_dir().join("results.md");
        std::fs::write(&path, &report).expect("write results");
        println!("written to {}", path.display());
    }
}

fn run_child(case: &str) -> String {
    run_child_with(case, &[])
}

fn run_child_with(case: &str, env: &[(&str, &std::ffi::OsStr)]) -> String {
    eprintln!("== {case}");
    let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
    cmd.env(CASE_ENV, case);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run case");
    std::io::stderr().write_all(&out.stderr).ok();
    assert!(out.status.success(), "case {case} failed");
    String::from_utf8(out.stdout).expect("utf-8")
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn per(b: u64, n: usize) -> String {
    format!("{:.1}", b as f64 / n as f64)
}

/// A distinct argon2id PHC string per account, of the real length: the
/// 16-byte salt of one real hash replaced by one made of the account number
/// (hashing 10 M passwords for real would take hours).
fn phc_for(template: &str, i: usize) -> String {
    let (head, hash) = template.rsplit_once('$').expect("PHC hash");
    let (params, _salt) = head.rsplit_once('$').expect("PHC salt");
    let mut salt = [0x5au8; 16];
    salt[..8].copy_from_slice(&(i as u64).to_le_bytes());
    let salt = argon2::password_hash::SaltString::encode_b64(&salt).expect("salt");
    format!("{params}${}${hash}", salt.as_str())
}

fn case_accounts(n: usize) {
    let template = tollgate::config::accounts::hash_password("bench-password");
    let before = rss_bytes();
    let started = Instant::now();
    // Both maps sized up front, as start-up sizes them (from the store's
    // account count and the seed file's length).
    let ledger = Arc::new(Ledger::with_capacity(
        LedgerConfig::default(),
        Arc::new(NullSink),
        Arc::new(SystemClock::new()),
        n,
    ));
    for i in 0..n {
        ledger.restore_account(AccountView {
            name: account_name(i),
            parent: None,
            role: Role::User,
            tariff_class: None,
            anytime: BucketBalance {
                posted_milli: BALANCE_MILLI,
                reserved_milli: 0,
            },
            offpeak: BucketBalance::default(),
        });
    }
    let after_ledger = rss_bytes();
    let credentials = CredentialStore::with_capacity(100_000, n);
    for i in 0..n {
        credentials.set(&account_name(i), &phc_for(&template, i));
    }
    let after = rss_bytes();
    let elapsed = started.elapsed();
    assert_eq!(ledger.len(), n);
    assert_eq!(credentials.len(), n);
    // Still usable: one lookup each, so nothing is optimised away.
    assert!(ledger.account(&account_name(n / 2)).is_some());
    assert!(credentials.contains(&account_name(n / 2)));
    println!(
        "| accounts | {n} | {} | {} | {} | {} | {} | {:.1} s |",
        mib(before),
        mib(after),
        per(after_ledger - before, n),
        per(after - after_ledger, n),
        per(after - before, n),
        elapsed.as_secs_f64()
    );
}

/// The cached store with `n` accounts, generated on first use.
fn generated_store(n: usize) -> PathBuf {
    let path = target_dir().join(format!("accounts-{n}.db"));
    let done = path.with_extension("db.done");
    if done.exists() {
        return path;
    }
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    eprintln!("generating {} (once; cached)", path.display());
    let started = Instant::now();
    let mut store = SqliteStore::open(&path, Durability::Async).expect("open store");
    let now_ms = tollgate::clock::Clock::now_unix_ms(&tollgate::clock::SystemClock::new());
    let mut seq = 1u64;
    for chunk_start in (0..n).step_by(GENERATE_BATCH) {
        let end = (chunk_start + GENERATE_BATCH).min(n);
        let mut entries = Vec::with_capacity(end - chunk_start);
        let mut metas = Vec::with_capacity(end - chunk_start);
        for i in chunk_start..end {
            let name = account_name(i);
            entries.push(Entry {
                seq,
                kind: EntryKind::Add,
                account: name.clone(),
                bucket: Bucket::Anytime,
                amount_milli: BALANCE_MILLI,
                reservation_id: None,
                reference: Some("seed".into()),
                tariff_version: None,
                at_unix_ms: now_ms,
            });
            metas.push(AccountMeta {
                name,
                parent: None,
                role: Role::User,
                tariff_class: None,
            });
            seq += 1;
        }
        store.commit(&entries, &metas).expect("commit");
    }
    drop(store);
    std::fs::write(&done, b"").expect("mark store done");
    eprintln!(
        "generated {n} accounts in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    path
}

fn case_startup(n: usize) {
    let store = PathBuf::from(std::env::var_os("TOLLGATE_MEMORY_STORE").expect("store path"));
    // A private copy: start-up may checkpoint the WAL or write to the file.
    let dir = tempfile::tempdir_in(target_dir()).expect("temp dir");
    let db = dir.path().join("tollgate.db");
    std::fs::copy(&store, &db).expect("copy store");
    std::fs::write(
        dir.path().join("tariffs.yaml"),
        "default_country_code: \"36\"\ndefault_price: 1\nprices:\n  \"36\": 1\n",
    )
    .unwrap();
    let config_path = dir.path().join("tollgate.yaml");
    std::fs::write(
        &config_path,
        "listen: 127.0.0.1:0\n\
         upstream: { address: 127.0.0.1:9 }\n\
         tariffs: tariffs.yaml\n\
         durability: sync\n\
         store: { path: tollgate.db }\n",
    )
    .unwrap();
    let config = Config::load(&config_path).expect("config");
    // Read the file once so the time is not a cold-cache disk read;
    // through a small buffer, so the heap does not keep a file-sized block
    // for the start-up to reuse (it would hide page faults and RSS).
    let _ = std::fs::File::open(&db).and_then(|mut f| std::io::copy(&mut f, &mut std::io::sink()));
    let before = rss_bytes();
    let cpu_before = cpu_s();
    let started = Instant::now();
    let metrics = Arc::new(Metrics::new());
    let clock: Arc<dyn tollgate::clock::Clock> = Arc::new(tollgate::clock::SystemClock::new());
    let opened =
        tollgate::server::open_store(&config, &metrics, clock.clone()).expect("open store");
    let loaded_at = started.elapsed();
    let app =
        tollgate::server::build_app_with_store(config, metrics, opened, clock).expect("build");
    let elapsed = started.elapsed();
    let cpu = cpu_s() - cpu_before;
    let after = rss_bytes();
    assert_eq!(app.ledger.len(), n);
    eprintln!(
        "startup {n}: open {:.2} s, read + restore {:.2} s, CPU {cpu:.1} s",
        loaded_at.as_secs_f64(),
        (elapsed - loaded_at).as_secs_f64()
    );
    println!(
        "| startup (open {:.1} s + read/restore {:.1} s; CPU {cpu:.1} s) | {n} | {} | {} | {} | – | {} | {:.1} s |",
        loaded_at.as_secs_f64(),
        (elapsed - loaded_at).as_secs_f64(),
        mib(before),
        mib(after),
        per(after - before, n),
        per(after - before, n),
        elapsed.as_secs_f64()
    );
    if let Some(store) = &app.store {
        let _ = store.flush_and_stop(std::time::Duration::from_secs(10));
    }
}
