//! Several real tollgate nodes on one PostgreSQL ledger, nginx (Debian's
//! package, with the deployed `deploy/cluster/nginx.conf.tmpl`) in front of
//! them, a TCP proxy that can stop forwarding (a node cut off from
//! PostgreSQL), many clients and a watcher of the shared balances, for
//! `tests/cluster_nodes.rs`.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;

/// One price-1 destination of [`TARIFFS`] (`36`, not `3620`).
pub const RECIPIENT: &str = "%2B36301234567";

/// A user account of the test, with credit for `credits` sends to
/// [`RECIPIENT`].
#[derive(Clone)]
pub struct Account {
    pub name: String,
    pub password: String,
    pub credits: i64,
}

impl Account {
    pub fn new(name: &str, credits: i64) -> Account {
        Account {
            name: name.to_string(),
            password: format!("{name}-pw"),
            credits,
        }
    }
}

/// `accounts.yaml`: the default admin plus `accounts`.
pub fn accounts_yaml(accounts: &[Account]) -> String {
    let mut yaml = format!(
        "accounts:\n- {{ name: admin, role: admin, password_hash: '{}', anytime: 1000 }}\n",
        password_hash("abc123")
    );
    for a in accounts {
        yaml.push_str(&format!(
            "- {{ name: {}, role: user, password_hash: '{}', anytime: {} }}\n",
            a.name,
            password_hash(&a.password),
            a.credits
        ));
    }
    yaml
}

/// An `ozeki-sim` that knows every account (the gateway checks them too)
/// and accepts every send.
pub fn sim_for(accounts: &[Account]) -> Sim {
    let users: Vec<String> = accounts
        .iter()
        .map(|a| format!("{}:{}:100000000", a.name, a.password))
        .collect();
    let mut args = vec!["--no-record"];
    for u in &users {
        args.extend(["--user", u.as_str()]);
    }
    Sim::start(&args)
}

/// The cluster timings of the tests: a lease of 2 s renewed every 0.5 s,
/// grants valid 4 s (≥ lease + statement timeout), idle after 0.4 s.
pub const LEASE_MS: u64 = 2000;
pub const GRANT_TTL_MS: u64 = 4000;

/// A node of the cluster on `store_url` in front of `sim`.
pub struct Node {
    pub id: String,
    pub tg: Tollgate,
    pub restarts: u32,
}

/// The `extra_yaml` of a cluster node `id` on `store_url`, with the test
/// timings above (`durability: sync`, as a node requires).
pub fn node_yaml(store_url: &str, id: &str) -> String {
    format!(
        "{}durability: sync\n\
         cluster: {{ node_id: {id}, lease_ms: {LEASE_MS}, lease_renew_ms: 500, \
         lease_margin_ms: 500, grant_ttl_ms: {GRANT_TTL_MS}, grant_idle_ms: 400 }}\n",
        pg::store_yaml(store_url, "statement_timeout_ms: 2000")
    )
}

impl Node {
    pub fn start(sim: &Sim, store_url: &str, id: &str, accounts: &[Account]) -> Node {
        let tg = Tollgate::start(
            sim.addr,
            TollgateOptions {
                extra_yaml: node_yaml(store_url, id),
                accounts: accounts_yaml(accounts),
                ..Default::default()
            },
        );
        Node {
            id: id.to_string(),
            tg,
            restarts: 0,
        }
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        self.tg.kill();
    }

    /// Starts the binary again (what a supervisor does), waiting until it
    /// listens (after its predecessor's lease, if it crashed holding one).
    pub fn restart(&mut self) {
        self.tg.kill();
        self.tg.spawn();
        self.restarts += 1;
    }

    /// Restarts the node if its process has exited (a node whose lease is
    /// lost for good exits with status 75 for its supervisor); returns the
    /// exit status it found.
    pub fn supervise(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.tg.try_wait()?;
        self.restart();
        Some(status)
    }
}

/// nginx as the cluster's load balancer, with the deployed template.
pub struct Nginx {
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    _proc: Proc,
}

impl Nginx {
    pub fn start(nodes: &[SocketAddr]) -> Nginx {
        ensure_installed(&[("nginx", "-v", "nginx")]);
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let servers: String = nodes
            .iter()
            .map(|n| format!("        server {n} max_fails=1 fail_timeout=2s;\n"))
            .collect();
        let user = if is_root() { "user root;" } else { "" };
        let config = include_str!("../../deploy/cluster/nginx.conf.tmpl")
            .lines()
            .map(|l| {
                if l == "@SERVERS@" {
                    servers.clone()
                } else {
                    format!("{l}\n")
                }
            })
            .collect::<String>()
            .replace("@DIR@", &dir.path().display().to_string())
            .replace("@LISTEN@", &addr.to_string())
            .replace("@USER@", user);
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let nginx = Nginx {
            addr,
            dir,
            _proc: Proc { child, log: None },
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {addr}: {}",
                nginx.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

/// A TCP proxy to `target` that can stop forwarding without closing
/// anything: to the node behind it, PostgreSQL stops answering while every
/// connection stays up (the kernel still acknowledges), as when a network
/// path or a middlebox goes silent.
pub struct Blackhole {
    pub addr: SocketAddr,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Blackhole {
    pub fn start(target: SocketAddr) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let paused = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (paused.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let (p, s) = (p.clone(), s.clone());
                    std::thread::spawn(move || pump(from, to, &p, &s));
                }
            }
        });
        Blackhole { addr, paused, stop }
    }

    /// Stops forwarding (both ways); connections stay open.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, paused: &AtomicBool, stop: &AtomicBool) {
    use std::io::{Read, Write};
    from.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// What the clients saw, shared between their threads.
#[derive(Default)]
pub struct Tally {
    /// Sends answered accepted, per account.
    pub accepted: Mutex<HashMap<String, u64>>,
    /// When each target's last accepted send was answered.
    pub last_accepted: Mutex<HashMap<String, Instant>>,
    pub insufficient: AtomicU64,
    /// Every other answer, by a short description (status and error code).
    pub other: Mutex<HashMap<String, u64>>,
}

impl Tally {
    pub fn accepted(&self, account: &str) -> u64 {
        self.accepted
            .lock()
            .unwrap()
            .get(account)
            .copied()
            .unwrap_or(0)
    }

    pub fn total_accepted(&self) -> u64 {
        self.accepted.lock().unwrap().values().sum()
    }

    pub fn others(&self) -> HashMap<String, u64> {
        self.other.lock().unwrap().clone()
    }
}

/// `clients` threads sending, each over its own keep-alive connection to
/// one of the targets (base URLs; client `c` to target `c mod n`, so a
/// node that hangs holds up only its own clients), one recipient a send,
/// every account in turn, until stopped.
pub struct Load {
    pub tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(targets: Vec<String>, accounts: &[Account], clients: usize) -> Load {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let accounts: Arc<Vec<Account>> = Arc::new(accounts.to_vec());
        let targets = Arc::new(targets);
        let threads = (0..clients)
            .map(|c| {
                let (tally, stop) = (tally.clone(), stop.clone());
                let (accounts, targets) = (accounts.clone(), targets.clone());
                std::thread::spawn(move || {
                    let http = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(30))
                        .build()
                        .unwrap();
                    let mut i = c;
                    while !stop.load(Ordering::Relaxed) {
                        let a = &accounts[i % accounts.len()];
                        let target = &targets[c % targets.len()];
                        i += 1;
                        let url = format!(
                            "{target}/api?action=sendmessage&username={}&password={}\
                             &recipient={RECIPIENT}&messagedata=hi",
                            a.name, a.password
                        );
                        tally.record(&a.name, target, http.get(&url).send());
                    }
                })
            })
            .collect();
        Load {
            tally,
            stop,
            threads,
        }
    }

    pub fn stop(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.tally
    }
}

impl Tally {
    fn record(
        &self,
        account: &str,
        target: &str,
        answer: reqwest::Result<reqwest::blocking::Response>,
    ) {
        let (status, body) = match answer.and_then(|r| Ok((r.status().as_u16(), r.text()?))) {
            Ok(a) => a,
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else {
                    "transport"
                };
                *self.other.lock().unwrap().entry(kind.into()).or_default() += 1;
                // A node that is down refuses at once: do not spin on it.
                std::thread::sleep(Duration::from_millis(5));
                return;
            }
        };
        if status == 200 && body.contains("accepted") && !body.contains("rejected") {
            *self
                .accepted
                .lock()
                .unwrap()
                .entry(account.to_string())
                .or_default() += 1;
            self.last_accepted
                .lock()
                .unwrap()
                .insert(target.to_string(), Instant::now());
        } else if body.contains("nsufficient") {
            self.insufficient.fetch_add(1, Ordering::Relaxed);
            // Nothing to spend: do not spin on the account.
            std::thread::sleep(Duration::from_millis(5));
        } else {
            let code = xml_field(&body, "errorcode")
                .or_else(|| xml_field(&body, "statuscode"))
                .unwrap_or_else(|| body.chars().take(60).collect());
            *self
                .other
                .lock()
                .unwrap()
                .entry(format!("{status} {code}"))
                .or_default() += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// One account's row in the shared ledger.
#[derive(Debug, Clone, Copy, Default)]
pub struct Row {
    pub posted: i64,
    pub reserved: i64,
    pub granted: i64,
}

impl Row {
    /// What no node holds and no send has taken: never below zero.
    pub fn available(&self) -> i64 {
        self.posted - self.reserved - self.granted
    }
}

pub fn rows(
    client: &mut postgres::Client,
    accounts: &[Account],
) -> Result<HashMap<String, Row>, postgres::Error> {
    let names: Vec<String> = accounts.iter().map(|a| a.name.clone()).collect();
    Ok(client
        .query(
            "SELECT name, anytime_posted_milli, anytime_reserved_milli, anytime_granted_milli \
             FROM accounts WHERE name = ANY($1)",
            &[&names],
        )?
        .iter()
        .map(|r| {
            (
                r.get(0),
                Row {
                    posted: r.get(1),
                    reserved: r.get(2),
                    granted: r.get(3),
                },
            )
        })
        .collect())
}

/// Sum of the grants `node` (by name) holds in the shared database.
pub fn held_by(client: &mut postgres::Client, node: &str) -> Result<i64, postgres::Error> {
    Ok(client
        .query_one(
            "SELECT COALESCE(sum(g.amount_milli), 0)::bigint FROM grants g \
             JOIN nodes n ON n.id = g.node WHERE n.name = $1",
            &[&node],
        )?
        .get(0))
}

/// Reads the accounts' rows every few milliseconds while the test runs and
/// keeps the lowest available balance it saw for each (reconnecting when
/// the server is away).
pub struct Watcher {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(u64, HashMap<String, i64>)>,
}

impl Watcher {
    pub fn start(url: String, accounts: &[Account]) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let accounts = accounts.to_vec();
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut samples, mut lowest) = (0u64, HashMap::<String, i64>::new());
            let mut client = None;
            while !s.load(Ordering::Relaxed) {
                if client.is_none() {
                    client = pg::connect(&url).ok();
                }
                if let Some(c) = client.as_mut() {
                    match rows(c, &accounts) {
                        Ok(rows) => {
                            samples += 1;
                            for (name, row) in rows {
                                let low = lowest.entry(name).or_insert(i64::MAX);
                                *low = (*low).min(row.available());
                            }
                        }
                        Err(_) => client = None,
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (samples, lowest)
        });
        Watcher { stop, handle }
    }

    /// How many samples it took, and the lowest available balance of each
    /// account over them.
    pub fn stop(self) -> (u64, HashMap<String, i64>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// Polls `done` every 20 ms for up to `limit`; the time it took, or `None`.
pub fn within(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}
