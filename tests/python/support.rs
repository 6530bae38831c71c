//! Shared by the integration tests that drive real third-party clients
//! written in Python (`tests/python/*.py`): make sure `python3` and the
//! client packages are there, installing them from PyPI if need be, and run
//! a script. Never skips: a missing interpreter or a package that cannot be
//! installed fails the test with a message saying what to install.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// Each `(module, pip package)` must import; missing ones are installed
/// with `python3 -m pip install --quiet`.
pub fn ensure_python_packages(packages: &[(&str, &str)]) {
    let version = Command::new("python3").arg("--version").output();
    match version {
        Ok(o) if o.status.success() => {}
        _ => panic!(
            "python3 is required for the Python client tests; install it \
             (Debian: apt-get install python3 python3-pip)"
        ),
    }
    let imports = |module: &str| {
        Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    for (module, package) in packages {
        if imports(module) {
            continue;
        }
        let out = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", package])
            .output()
            .expect("run python3 -m pip");
        assert!(
            out.status.success() && imports(module),
            "Python package {package} is required and could not be installed \
             (python3 -m pip install {package}):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Path of a script in `tests/python/`.
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("python")
        .join(name)
}

/// Runs `python3 tests/python/NAME ARGS…` and fails the test, showing its
/// output, unless it exits 0.
pub fn run_script(name: &str, args: &[String]) -> Output {
    let out = Command::new("python3")
        .arg(script(name))
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{name} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
