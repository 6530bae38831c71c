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

fn have(binary: &str) -> bool {
    Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs Debian's `prometheus` package (prometheus + promtool) when
/// either binary is missing; panics with the reason if it cannot.
pub fn ensure_prometheus() {
    if have("prometheus") && have("promtool") {
        return;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let apt = |args: &[&str]| {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.args(["-n", "apt-get"]);
            c
        };
        // Another test binary may be installing the same package.
        cmd.args(["-o", "DPkg::Lock::Timeout=300"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run_bounded(&mut cmd, Duration::from_secs(600))
    };
    let install = ["install", "-y", "-q", "prometheus"];
    let (mut ok, mut log) = apt(&install);
    if !ok {
        let (_, update_log) = apt(&["update", "-q"]);
        let (ok2, log2) = apt(&install);
        ok = ok2;
        log = format!("{log}\n--- apt-get update ---\n{update_log}\n--- retry ---\n{log2}");
    }
    assert!(
        ok && have("prometheus") && have("promtool"),
        "this test needs Prometheus and promtool and could not install them \
         (`apt-get install -y prometheus`{}). Install Debian's `prometheus` \
         package, which provides `prometheus` and `promtool`, and run the test \
         again. apt said:\n{log}",
        if root { "" } else { " via sudo" }
    );
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
