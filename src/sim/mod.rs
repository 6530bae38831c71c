//! `ozeki-sim`: an Ozeki NG HTTP API simulator for demos, integration tests
//! and benchmarks.
//!
//! It is a test double, deliberately independent of tollgate's own parsers
//! (`crate::api`): [`params`] is its own small form parser, [`render`] writes
//! Ozeki's answer shapes, [`state`] holds users, balances, the inbox, armed
//! faults and the request log, and [`server`] is the hyper service with the
//! API actions and the `/sim/` control endpoints.
//!
//! Entry points: [`serve`] runs on an already bound listener (inside an
//! existing tokio runtime); [`run`] builds a multi-threaded runtime, binds,
//! prints `ozeki-sim listening on ADDR` and serves forever.

pub mod dlr;
pub mod params;
pub mod render;
pub mod server;
pub mod state;

use std::io::Write;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub use state::{FaultMode, SimState, User};

/// Default listen address (the real gateway uses 9501).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9502";

/// Simulator settings (the CLI maps onto these one-to-one).
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Users and their starting balances.
    pub users: Vec<User>,
    /// Recipients whose number (leading `+` ignored) starts with one of these
    /// are rejected with status code 11.
    pub reject_prefixes: Vec<String>,
    /// Latency added to every API request (changeable via `/sim/latency`).
    pub latency_ms: u64,
    /// Keep the `/sim/requests` log (off with `--no-record`).
    pub record: bool,
    /// Log every request through `tracing`.
    pub verbose: bool,
    /// Tokio worker threads used by [`run`].
    pub threads: usize,
}

impl SimConfig {
    /// The built-in users: `admin:abc123:1000:admin` and `john:secret1:744`.
    pub fn default_users() -> Vec<User> {
        vec![
            User {
                name: "admin".into(),
                password: "abc123".into(),
                balance: 1000,
                admin: true,
            },
            User {
                name: "john".into(),
                password: "secret1".into(),
                balance: 744,
                admin: false,
            },
        ]
    }

    /// Adds or replaces (by name) a user.
    pub fn upsert_user(&mut self, user: User) {
        match self.users.iter_mut().find(|u| u.name == user.name) {
            Some(slot) => *slot = user,
            None => self.users.push(user),
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            users: SimConfig::default_users(),
            reject_prefixes: Vec::new(),
            latency_ms: 0,
            record: true,
            verbose: false,
            threads: 2,
        }
    }
}

/// Serves the simulator on `listener` until the process ends.
pub async fn serve(listener: TcpListener, config: SimConfig) -> std::io::Result<()> {
    let state = Arc::new(SimState::new(
        config.users,
        config.reject_prefixes,
        config.latency_ms,
        config.record,
        config.verbose,
    ));
    serve_state(listener, state).await
}

/// Like [`serve`], with state the caller keeps a handle on (in-process tests
/// can inspect counters or arm faults directly).
pub async fn serve_state(listener: TcpListener, state: Arc<SimState>) -> std::io::Result<()> {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and similar: back off, keep serving.
                tracing::warn!(error = %e, "ozeki-sim: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let conn = server::ConnInfo {
                conn: state.next_conn(),
                remote,
            };
            let verbose = state.verbose;
            let svc = service_fn(move |req| server::handle(req, state.clone(), conn));
            let result = http1::Builder::new()
                .keep_alive(true)
                // HTTP.sys (the real gateway's server) writes `Server:`, not `server:`.
                .title_case_headers(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            if let Err(e) = result {
                if verbose {
                    tracing::info!(conn = conn.conn, error = %e, "connection ended with error");
                }
            }
        });
    }
}

/// Builds a multi-threaded runtime with `config.threads` workers, binds
/// `listen_addr`, prints `ozeki-sim listening on ADDR` (the bound address) to
/// stdout and serves forever.
pub fn run(config: SimConfig, listen_addr: &str) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen_addr).await?;
        let addr = listener.local_addr()?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "ozeki-sim listening on {addr}")?;
            out.flush()?;
        }
        serve(listener, config).await
    })
}
