//! Tests against the local PostgreSQL: each test gets a database of its own
//! (created on demand, dropped when the test ends), so PostgreSQL tests run
//! in parallel without seeing each other.
//!
//! PostgreSQL is expected at 127.0.0.1:5432 with trust authentication for
//! user `postgres` or `root` (`TOLLGATE_TEST_PG` overrides the server URL,
//! e.g. `postgres://me@127.0.0.1:5433`). If nothing answers there, the
//! helper starts the local cluster (`pg_ctlcluster`); if it still cannot
//! connect, the test **fails** with the reason, it is never skipped.
//!
//! Used by the crate's unit tests and, through `#[path]`, by the
//! integration tests (`tests/common/pg.rs`): it depends on `std` and the
//! `postgres` crate only.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The server URL without a database, e.g. `postgres://postgres@127.0.0.1:5432`.
pub fn server_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("TOLLGATE_TEST_PG") {
            return url.trim_end_matches('/').to_string();
        }
        ensure_running();
        for user in ["postgres", "root"] {
            let url = format!("postgres://{user}@127.0.0.1:5432");
            if connect(&format!("{url}/postgres")).is_ok() {
                return url;
            }
        }
        panic!(
            "PostgreSQL at 127.0.0.1:5432 accepts neither user postgres nor root \
             (trust authentication expected); set TOLLGATE_TEST_PG to a server URL"
        );
    })
}

/// A plain session on `url` (5 s to connect).
pub fn connect(url: &str) -> Result<postgres::Client, postgres::Error> {
    let mut config: postgres::Config = url.parse()?;
    config.connect_timeout(Duration::from_secs(5));
    config.connect(postgres::NoTls)
}

fn answers() -> bool {
    ["postgres", "root"]
        .iter()
        .any(|u| connect(&format!("postgres://{u}@127.0.0.1:5432/postgres")).is_ok())
}

/// Starts the local cluster if nothing answers at 127.0.0.1:5432, and
/// waits (up to 60 s) until it does. Panics, saying why, if it cannot.
pub fn ensure_running() {
    if answers() {
        return;
    }
    let versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let Some(version) = versions.iter().max() else {
        panic!(
            "PostgreSQL is not answering at 127.0.0.1:5432 and no cluster is installed \
             (/etc/postgresql is empty): apt-get install postgresql"
        );
    };
    let out = std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, "main", "start"])
        .output();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if answers() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "PostgreSQL is not answering at 127.0.0.1:5432, and `pg_ctlcluster \
         --skip-systemctl-redirect {version} main start` did not bring it up: {out:?}"
    );
}

/// A database of its own, dropped (with its connections) on drop.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    /// Creates `tg_<what>_<pid>_<n>_<time>`; `what` names the test.
    pub fn create(what: &str) -> TestDb {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let what: String = what
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(30)
            .collect();
        let name = format!("tg_{what}_{}_{n}_{nanos}", std::process::id());
        admin()
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
        TestDb { name }
    }

    /// `postgres://USER@127.0.0.1:5432/<name>`.
    pub fn url(&self) -> String {
        format!("{}/{}", server_url(), self.name)
    }

    /// A plain client on the database (for checks from the side).
    pub fn client(&self) -> postgres::Client {
        connect(&self.url()).unwrap_or_else(|e| panic!("connecting to {}: {e}", self.name))
    }

    /// Terminates every other session on the database (what a server
    /// restart does to them); returns how many.
    pub fn terminate_sessions(&self) -> i64 {
        admin()
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&self.name],
            )
            .map(|r| r.get(0))
            .unwrap_or(0)
    }

    /// Terminates the sessions whose `application_name` starts with
    /// `prefix` (one role of tollgate's connections); returns how many.
    pub fn terminate(&self, application_prefix: &str) -> i64 {
        terminate(&self.name, application_prefix)
    }
}

/// [`TestDb::terminate`] by database name (from another thread).
pub fn terminate(dbname: &str, application_prefix: &str) -> i64 {
    admin()
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name LIKE $2 || '%'",
            &[&dbname, &application_prefix],
        )
        .map(|r| r.get(0))
        .unwrap_or(0)
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut c) = connect(&format!("{}/postgres", server_url())) {
            let _ = c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ));
        }
    }
}

fn admin() -> postgres::Client {
    let url = format!("{}/postgres", server_url());
    connect(&url).unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}
