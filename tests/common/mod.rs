//! Test harness: start the real `ozeki-sim` and `tollgate` binaries on
//! loopback ports and talk to them over TCP.
//!
//! Every process is killed when its handle drops, so a failing test leaves
//! nothing running.
#![allow(dead_code)]

pub mod cluster;
pub mod pg;
pub mod promtool;
pub mod tls_receiver;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: Option<PathBuf>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Sim {
    pub addr: SocketAddr,
    _proc: Proc,
}

impl Sim {
    pub fn start(extra: &[&str]) -> Sim {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ozeki-sim"))
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ozeki-sim");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read ozeki-sim address");
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("unexpected ozeki-sim banner {line:?}"));
        Sim {
            addr,
            _proc: Proc { child, log: None },
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Every API request the simulator received, as JSON.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        let v: serde_json::Value = client()
            .get(self.url("/sim/requests"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        v.as_array().cloned().unwrap_or_default()
    }

    pub fn sendmessage_count(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r["action"].as_str() == Some("sendmessage"))
            .count()
    }

    pub fn reset(&self) {
        client().post(self.url("/sim/reset")).send().unwrap();
    }

    pub fn fault(&self, mode: &str, count: u32) {
        let r = client()
            .post(self.url(&format!("/sim/fault?mode={mode}&count={count}")))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "setting fault {mode}");
    }
}

/// A free loopback port (bound and released; a tiny race we accept in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn password_hash(pw: &str) -> String {
    static CACHE: OnceLock<std::sync::Mutex<std::collections::HashMap<String, String>>> =
        OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    cache
        .lock()
        .unwrap()
        .entry(pw.to_string())
        .or_insert_with(|| tollgate::config::accounts::hash_password(pw))
        .clone()
}

pub const TARIFFS: &str = r#"
default_country_code: "36"
default_price: 1
prices:
  "36": 1
  "3620": 2
  "44": 3
"#;

/// Accounts every test starts with: admin/abc123 (admin, 1000),
/// john/secret1 (user, 744), poor/poor1 (user, 0).
pub fn default_accounts() -> String {
    format!(
        "accounts:\n\
         - {{ name: admin, role: admin, password_hash: '{}', anytime: 1000 }}\n\
         - {{ name: john, role: user, password_hash: '{}', anytime: 744 }}\n\
         - {{ name: poor, role: user, password_hash: '{}' }}\n",
        password_hash("abc123"),
        password_hash("secret1"),
        password_hash("poor1"),
    )
}

/// `extra_yaml` for a tollgate with an SQLite store in its temp dir.
pub const STORE_YAML: &str = "store: { path: tollgate.db }\n";

pub struct TollgateOptions {
    pub extra_yaml: String,
    pub tariffs: String,
    pub accounts: String,
}

impl Default for TollgateOptions {
    fn default() -> Self {
        TollgateOptions {
            extra_yaml: String::new(),
            tariffs: TARIFFS.to_string(),
            accounts: default_accounts(),
        }
    }
}

/// An `ozeki-sim` started with `sim_args` and a tollgate in front of it with
/// the default accounts and tariffs plus `extra_yaml` in its config.
pub fn start_pair(sim_args: &[&str], extra_yaml: &str) -> (Sim, Tollgate) {
    let sim = Sim::start(sim_args);
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: extra_yaml.to_string(),
            ..Default::default()
        },
    );
    (sim, tg)
}

pub struct Tollgate {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl Tollgate {
    pub fn start(upstream: SocketAddr, opts: TollgateOptions) -> Tollgate {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let admin_port = free_port();
        std::fs::write(dir.path().join("tariffs.yaml"), &opts.tariffs).unwrap();
        std::fs::write(dir.path().join("accounts.yaml"), &opts.accounts).unwrap();
        let config = format!(
            "listen: 127.0.0.1:{port}\n\
             threads: 2\n\
             shutdown_grace_s: 0\n\
             upstream: {{ address: {upstream}, read_timeout_ms: 10000 }}\n\
             admin: {{ listen: 127.0.0.1:{admin_port}, token: {ADMIN_TOKEN} }}\n\
             tariffs: tariffs.yaml\n\
             accounts: accounts.yaml\n\
             {}\n",
            opts.extra_yaml
        );
        std::fs::write(dir.path().join("tollgate.yaml"), config).unwrap();
        let mut t = Tollgate {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            admin: format!("127.0.0.1:{admin_port}").parse().unwrap(),
            dir,
            proc: None,
        };
        t.spawn();
        t
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("tollgate.yaml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tollgate.log")
    }

    /// Starts the binary and waits until both listeners accept.
    pub fn spawn(&mut self) {
        self.spawn_with_log("info");
    }

    /// [`Self::spawn`] with another `RUST_LOG` filter.
    pub fn spawn_with_log(&mut self, rust_log: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["run", "-c"])
            .arg(self.config_path())
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tollgate");
        self.proc = Some(Proc {
            child,
            log: Some(self.log_path()),
        });
        wait_for_port(self.addr, self);
        wait_for_port(self.admin, self);
    }

    pub fn kill(&mut self) {
        self.proc = None;
    }

    /// The exit status, if the process has exited on its own (`None`
    /// while it runs or after [`Self::kill`]).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.as_mut()?.child.try_wait().ok().flatten()
    }

    /// The running process's id.
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("tollgate is running").child.id()
    }

    /// Sends `signal` (e.g. "TERM", "INT", "KILL") and waits up to 30 s for
    /// the process to exit; returns its exit status.
    pub fn stop_with(&mut self, signal: &str) -> std::process::ExitStatus {
        let mut proc = self.proc.take().expect("tollgate is running");
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(proc.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = proc.child.try_wait().expect("wait for tollgate") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tollgate did not exit after SIG{signal}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `tollgate ARGS... -c <this config>` to completion (the CLI
    /// subcommands: `ledger verify`, `ledger export`, ...).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .arg("-c")
            .arg(self.config_path())
            .env("RUST_LOG", "warn")
            .output()
            .expect("run the tollgate CLI")
    }

    /// The SQLite store of a tollgate started with [`STORE_YAML`].
    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("tollgate.db")
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The value of one `/metrics` series, named with its whole label set,
    /// e.g. `tollgate_tariff_reloads_total{result="ok"}`; `None` if absent.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let text = get(&self.admin_url("/metrics")).1;
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// [`Self::metric`] for a series that must exist.
    pub fn metric_value(&self, series: &str) -> f64 {
        self.metric(series)
            .unwrap_or_else(|| panic!("no series {series} in /metrics"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn admin_get(&self, path: &str) -> serde_json::Value {
        client()
            .get(self.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    /// The any-time balance the Ozeki front door reports for `user`.
    pub fn balance(&self, user: &str, password: &str) -> String {
        let body = get(&self.url(&format!(
            "/api?action=getcredits&username={user}&password={password}"
        )))
        .1;
        xml_field(&body, "balance").unwrap_or_else(|| panic!("no balance in {body}"))
    }
}

/// Where every tollgate's log is copied when its test ends, so
/// `tests/secrets.rs` can search the logs of the whole suite for secrets.
pub fn suite_log_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("tollgate-logs")
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        // Stop first, so the copy holds the last lines.
        self.proc = None;
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = suite_log_dir();
        if std::fs::create_dir_all(&dir).is_ok() {
            let exe = std::env::current_exe()
                .ok()
                .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_default();
            let _ = std::fs::copy(
                self.log_path(),
                dir.join(format!("{exe}-{}-{n}.log", std::process::id())),
            );
        }
    }
}

fn wait_for_port(addr: SocketAddr, t: &Tollgate) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("tollgate did not listen on {addr}; log:\n{}", t.log());
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// GET → (status, body).
pub fn get(url: &str) -> (u16, String) {
    let r = client().get(url).send().unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

/// POST a form body → (status, headers, body).
pub fn post_form(url: &str, body: impl Into<Vec<u8>>) -> (u16, reqwest::header::HeaderMap, String) {
    let r = client()
        .post(url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(body.into())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().unwrap())
}

/// The text of the first `<name>…</name>` in `xml`.
pub fn xml_field(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&close)? + start;
    Some(xml[start..end].to_string())
}

pub fn xml_all(xml: &str, name: &str) -> Vec<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let s = &rest[i + open.len()..];
        let Some(j) = s.find(&close) else { break };
        out.push(s[..j].to_string());
        rest = &s[j + close.len()..];
    }
    out
}

pub fn read_to_string(path: &Path) -> String {
    let mut s = String::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    s
}

/// An answer read off a raw socket: status, header block (as text) and
/// body bytes.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawAnswer {
    /// The value of a header (case-insensitive name), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `request` as it is over a new connection to `addr` and reads one
/// answer (the request should say `Connection: close`). Any bytes: the
/// point is to send what a real client library would not.
pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawAnswer {
    use std::io::Write;
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).expect("write the request");
    read_answer(&mut s)
}

/// Reads one answer off `s`: up to the end of its body (by
/// `Content-Length`) or to the close. 1xx interim answers are skipped.
pub fn read_answer(s: &mut impl Read) -> RawAnswer {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n");
        if let Some(end) = head_end {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"));
            if (100..200).contains(&status) {
                buf.drain(..end + 4);
                continue;
            }
            let answer = RawAnswer {
                status,
                head,
                body: buf[end + 4..].to_vec(),
            };
            if let Some(len) = answer.header("content-length") {
                let len: usize = len.parse().unwrap();
                if answer.body.len() >= len {
                    return RawAnswer {
                        body: answer.body[..len].to_vec(),
                        ..answer
                    };
                }
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => {
                let end = buf
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .unwrap_or_else(|| panic!("connection closed before an answer: {buf:?}"));
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap();
                return RawAnswer {
                    status,
                    head,
                    body: buf[end + 4..].to_vec(),
                };
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The callback token tollgate put into the `reporturl` of the last
/// request `sim` received (`.../dlr/<32 hex>...`).
pub fn last_dlr_token(sim: &Sim) -> String {
    let query = sim.requests().last().unwrap()["query"]
        .as_str()
        .unwrap()
        .to_string();
    query.split("%2Fdlr%2F").nth(1).unwrap()[..32].to_string()
}

/// One HTTP request a test's receiver read (see [`read_request`]).
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Reads one request (line, headers, a `Content-Length` body up to 1 MiB)
/// from a test receiver's connection; `None` when it breaks off first.
pub fn read_request(stream: &mut impl Read) -> Option<Received> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    let mut words = line.split_whitespace();
    let (method, target) = (words.next()?.to_string(), words.next()?.to_string());
    let mut request = Received {
        method,
        target,
        headers,
        body: Vec::new(),
    };
    let len: usize = request
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    request.body = vec![0u8; len.min(1 << 20)];
    reader.read_exact(&mut request.body).ok()?;
    Some(request)
}

/// Polls `done` every 20 ms for up to 10 s; panics naming `what` if it
/// never holds (for effects that land just after an answer, such as the
/// metrics and access line of a request).
pub fn wait_until(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `tollgate check` on a minimal config (a plain listener, an upstream, the
/// test tariffs) followed by `extra_yaml`.
pub fn check_config(extra_yaml: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tollgate.yaml");
    std::fs::write(dir.path().join("tariffs.yaml"), TARIFFS).unwrap();
    std::fs::write(
        &cfg,
        format!("listen: 127.0.0.1:1\nupstream: {{ address: 127.0.0.1:2 }}\ntariffs: tariffs.yaml\n{extra_yaml}\n"),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "-c"])
        .arg(&cfg)
        .output()
        .unwrap()
}

/// Whether the tests run as root (else installs go through `sudo -n`, and
/// PostgreSQL and nginx are run as another user).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Whether `binary version_arg` runs and succeeds.
pub fn have(binary: &str, version_arg: &str) -> bool {
    Command::new(binary)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes sure each `(binary, version_arg, package)` of `wanted` runs:
/// Debian's packages are installed when one is missing (as root or by
/// `sudo -n`), else the test fails saying what to install. Never skips.
pub fn ensure_installed(wanted: &[(&str, &str, &str)]) {
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, arg, _)| !have(bin, arg))
        .map(|(_, _, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return;
    }
    let apt = |args: &[&str]| {
        let mut cmd = if is_root() {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.args(["-n", "apt-get"]);
            c
        };
        // Another test may be installing at the same time: wait for dpkg.
        cmd.args(["-o", "DPkg::Lock::Timeout=300"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        promtool::run_bounded(&mut cmd, Duration::from_secs(600))
    };
    let mut install = vec!["install", "-y", "-q"];
    install.extend(&missing);
    let (mut ok, mut log) = apt(&install);
    if !ok {
        let (_, update) = apt(&["update", "-q"]);
        let (ok2, log2) = apt(&install);
        ok = ok2;
        log = format!("{log}\n--- apt-get update ---\n{update}\n--- retry ---\n{log2}");
    }
    assert!(
        ok && wanted.iter().all(|(bin, arg, _)| have(bin, arg)),
        "these tests need {missing:?} and could not install them \
         (`apt-get install -y {}`); install them and run again. apt said:\n{log}",
        missing.join(" ")
    );
}
