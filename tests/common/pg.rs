//! PostgreSQL for the integration tests: a database of its own per test on
//! the local server (started if it is down, never skipped: see
//! `src/store/pg/testing.rs`, shared with the unit tests), and a private
//! throw-away server for the tests that restart PostgreSQL (restarting the
//! shared one would break every other test running in parallel).

#[path = "../../src/store/pg/testing.rs"]
mod shared;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::is_root;
#[allow(unused_imports)]
pub use shared::*;
use tollgate::ledger::Entry;
use tollgate::store::{PgSettings, PgStore, Store};

/// The `store:` section of a tollgate on `url`, plus `extra` keys.
pub fn store_yaml(url: &str, extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    format!("store: {{ url: '{url}'{extra} }}\n")
}

pub fn settings(url: &str) -> PgSettings {
    PgSettings::new(tollgate::store::pg::PgUrl::parse(url).unwrap())
}

/// Every stored entry, read over a snapshot (beside a running owner).
pub fn stored_entries(url: &str) -> Vec<Entry> {
    let mut store = PgStore::open_snapshot(&settings(url)).unwrap();
    let mut out = Vec::new();
    store
        .for_each_entry(&mut |e| {
            out.push(e);
            Ok(())
        })
        .unwrap();
    out
}

/// A private PostgreSQL server in a temp dir on a free loopback port,
/// stopped (immediately) on drop. Runs as user `postgres` when the tests
/// run as root (PostgreSQL refuses to run as root).
pub struct PrivateServer {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort();
    let bin = versions
        .pop()
        .map(|v| v.join("bin"))
        .unwrap_or_else(|| panic!("no PostgreSQL server under /usr/lib/postgresql"));
    assert!(
        bin.join("initdb").exists(),
        "no initdb in {}",
        bin.display()
    );
    bin
}

impl PrivateServer {
    pub fn start() -> PrivateServer {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = PrivateServer {
            port,
            dir,
            bin: pg_bin(),
        };
        if is_root() {
            let out = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(server.dir.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        let out = server.run(
            "initdb",
            &[
                "-D",
                &server.data().display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        assert!(out.status.success(), "initdb: {out:?}");
        server.pg_ctl_start();
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(tool);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    fn pg_ctl_start(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {out:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let mut config: postgres::Config = self.url("postgres").parse().unwrap();
            config.connect_timeout(Duration::from_secs(1));
            if config.connect(postgres::NoTls).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the private PostgreSQL on port {} never answered",
            self.port
        );
    }

    /// `postgres://postgres@127.0.0.1:PORT/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Stops the server (`-m fast`: sessions are ended, as in a restart).
    pub fn stop(&self) {
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
        assert!(out.status.success(), "pg_ctl stop: {out:?}");
    }

    pub fn start_again(&self) {
        self.pg_ctl_start();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}
