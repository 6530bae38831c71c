//! Prometheus's own tools for the tests of `dashboards/`: Debian's
//! `prometheus` package (the `prometheus` server and `promtool`), installed
//! when missing, and a bounded way to run them.
//!
//! A test that needs them calls [`ensure_prometheus`] first: it installs the
//! package or fails with the reason and what to do, it never skips. Test
//! binaries run in parallel, so two may install at once: apt waits for the
//! other's dpkg lock instead of failing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `relative` inside the repository.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Runs `cmd` to completion within `limit`; (success, stdout + stderr).
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> (bool, String) {
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(out_file.reopen().unwrap())
        .stderr(out_file.reopen().unwrap())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot start {cmd:?}: {e}")),
    };
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(out_file.path()).unwrap_or_default();
    match status {
        Some(s) => (s.success(), output),
        None => (false, format!("{output}\n(killed after {limit:?})")),
    }
}

/// Installs Debian's `prometheus` package (prometheus + promtool) when
/// either binary is missing; panics with the reason if it cannot.
pub fn ensure_prometheus() {
    super::ensure_installed(&[
        ("prometheus", "--version", "prometheus"),
        ("promtool", "--version", "prometheus"),
    ]);
}

/// `promtool ARGS...` run from the repository root; (success, output).
pub fn promtool(args: &[&str]) -> (bool, String) {
    ensure_prometheus();
    run_bounded(
        Command::new("promtool")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR")),
        Duration::from_secs(60),
    )
}
