//! Zero-downtime upgrade: the listening sockets and the ledger go from the
//! running process (the *old* one) to a new one (the *successor*) with
//! exactly one process deciding credit at every instant, and no client
//! request refused.
//!
//! # How pingora moves the sockets (pingora 0.9.1, `server/mod.rs`,
//! `server/transfer_fd`, `docs/user_guide/graceful.md`)
//! The successor is started with `--upgrade`: its `Server::bootstrap`
//! listens on `upgrade.sock` and blocks (up to ~6 s) until it receives the
//! listening file descriptors. The old process sends them when it gets
//! SIGQUIT, keeps accepting on them for a fixed 5 s (both processes accept
//! on the same sockets meanwhile), then stops accepting, drops its idle
//! keep-alive connections, and lets the requests it holds run for
//! `shutdown_grace_s` before its runtimes stop.
//!
//! # What tollgate adds: the ledger
//! - **The successor listens before it owns the store.** Its proxy and
//!   admin listeners serve through a [`Slot`]: a stand-in [`App`] without a
//!   ledger ([`App::standby`]: routing, streaming, forwarding, nothing
//!   that reads or moves credit) until the real one is bound. A request
//!   that needs the ledger (see [`service::needs_ledger`]) *waits* for the
//!   bind, at most `upgrade.wait_max_ms`, then is refused
//!   `store_unavailable` in its door's shape ([`service::unavailable`]).
//!   Everything else is served at once.
//! - **The old process, on SIGQUIT** ([`UpgradeSignals`]), moves to
//!   `handing_over`: it starts no new credit decision; credit requests that
//!   still reach it (its keep-alive connections, and the new connections it
//!   accepts in pingora's 5 s) are relayed to the successor over the unix
//!   socket `<upgrade.sock>.relay` ([`relay`]), where they are served like
//!   the successor's own (waiting for its bind). Its credit requests in
//!   flight get `upgrade.handover_grace_ms` to finish; then it retires
//!   (decides nothing more), flushes its store writer and releases the
//!   store ([`hand_over`]).
//! - **The successor** polls the store's fence until the release lets it
//!   in (bounded by `upgrade.takeover_max_ms`), restores the ledger, and
//!   binds it into the slot: from then on it serves credit.
//!
//! A send still at the gateway when the grace ends keeps its reservation,
//! committed before it was forwarded: the successor restores it in doubt
//! (resolved by an operator or `settle.in_doubt_policy`), never voided,
//! never lost. Its settlement in the old process is not persisted.
//!
//! # One owner at every instant
//! Ownership is the store's fence (`store/fence.rs`): the successor cannot
//! acquire it while the old process holds it (lock held, lease fresh), and
//! the old one releases it only after its last commit. In-process, the old
//! process stops deciding *before* the release ([`App::retire`], then
//! `flush_and_stop`, which releases), and the successor starts deciding
//! only *after* its acquire and restore ([`Slot::bind`]). So at every
//! instant at most one process decides credit, and the one that does owns
//! the store; in between, nobody decides and credit requests wait.

pub mod frame;
pub mod relay;
pub mod start;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use parking_lot::{Condvar, Mutex};
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::sync::watch;

use crate::config::UpgradeConfig;
use crate::service::{self, App, Reply, Request};

/// What `/readyz` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// The store is not loaded yet (a successor waiting for its fence).
    Starting,
    /// This process decides credit.
    Serving,
    /// SIGQUIT: the store goes to the successor; credit is relayed.
    HandingOver,
}

impl Readiness {
    pub fn as_str(self) -> &'static str {
        match self {
            Readiness::Starting => "starting",
            Readiness::Serving => "serving",
            Readiness::HandingOver => "handing_over",
        }
    }
}

/// The late-bound application of a process: a stand-in until the ledger is
/// loaded, the real [`App`] while serving, and the gate the hand-over
/// closes (see the module docs).
pub struct Slot {
    front: Arc<App>,
    app: ArcSwapOption<App>,
    gate: Mutex<Gate>,
    drained: Condvar,
    state: watch::Sender<Readiness>,
    upgrade: UpgradeConfig,
    /// The hand-over thread, joined before the process exits.
    handover: Mutex<Option<std::thread::JoinHandle<Result<(), String>>>>,
}

/// The state and the credit requests this process is deciding now.
struct Gate {
    state: Readiness,
    in_flight: usize,
}

/// Where a credit request goes now.
pub enum Entered {
    /// Decide it here; the guard counts it for the hand-over.
    Local(Arc<App>, InFlight),
    /// This process is handing over: to the successor.
    Relay,
    /// Not loaded yet: wait.
    Starting,
}

/// A credit request this process is deciding; the hand-over waits for
/// every one of them (bounded by the grace).
pub struct InFlight {
    slot: Arc<Slot>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut gate = self.slot.gate.lock();
        gate.in_flight -= 1;
        if gate.in_flight == 0 {
            self.slot.drained.notify_all();
        }
    }
}

impl Slot {
    /// A process that serves `app` from the start (a plain `tollgate run`,
    /// tests).
    pub fn serving(app: Arc<App>) -> Arc<Slot> {
        let upgrade = app.config.upgrade.clone();
        Arc::new(Slot {
            front: app.clone(),
            app: ArcSwapOption::from(Some(app)),
            gate: Mutex::new(Gate {
                state: Readiness::Serving,
                in_flight: 0,
            }),
            drained: Condvar::new(),
            state: watch::Sender::new(Readiness::Serving),
            upgrade,
            handover: Mutex::new(None),
        })
    }

    /// A successor that does not own its store yet: `front` (a stand-in,
    /// [`App::standby`]) answers what needs no ledger.
    pub fn starting(front: Arc<App>) -> Arc<Slot> {
        let upgrade = front.config.upgrade.clone();
        Arc::new(Slot {
            front,
            app: ArcSwapOption::empty(),
            gate: Mutex::new(Gate {
                state: Readiness::Starting,
                in_flight: 0,
            }),
            drained: Condvar::new(),
            state: watch::Sender::new(Readiness::Starting),
            upgrade,
            handover: Mutex::new(None),
        })
    }

    /// The app to route, stream, forward and count with: the real one once
    /// bound, the stand-in before.
    pub fn current(&self) -> Arc<App> {
        self.app.load_full().unwrap_or_else(|| self.front.clone())
    }

    /// The real app, once bound.
    pub fn bound(&self) -> Option<Arc<App>> {
        self.app.load_full()
    }

    pub fn readiness(&self) -> Readiness {
        self.gate.lock().state
    }

    pub fn upgrade(&self) -> &UpgradeConfig {
        &self.upgrade
    }

    /// Watches the state (the relay server stops listening at the
    /// hand-over).
    pub fn watch(&self) -> watch::Receiver<Readiness> {
        self.state.subscribe()
    }

    /// The successor owns the store and restored the ledger: from now on
    /// `app` decides credit. `false` (nothing bound) if this process was
    /// told to hand over meanwhile: the caller gives the store back.
    pub fn bind(&self, app: Arc<App>) -> bool {
        let mut gate = self.gate.lock();
        if gate.state != Readiness::Starting {
            return false;
        }
        // Bound before the state says so: whoever enters `Serving` finds it.
        self.app.store(Some(app));
        gate.state = Readiness::Serving;
        drop(gate);
        self.state.send_replace(Readiness::Serving);
        true
    }

    /// Where a credit request goes now (see [`Entered`]).
    pub fn enter(self: &Arc<Self>) -> Entered {
        let mut gate = self.gate.lock();
        match gate.state {
            Readiness::Serving => {
                let app = self.app.load_full().expect("bound while serving");
                gate.in_flight += 1;
                Entered::Local(app, InFlight { slot: self.clone() })
            }
            Readiness::HandingOver => Entered::Relay,
            Readiness::Starting => Entered::Starting,
        }
    }

    /// Waits until the state is no longer `Starting`, at most until
    /// `deadline`; `false` past it.
    pub async fn wait_started(&self, deadline: tokio::time::Instant) -> bool {
        let mut rx = self.state.subscribe();
        let wait = rx.wait_for(|s| *s != Readiness::Starting);
        // (The watch guard must not outlive `rx`: reduce it to a bool.)
        let started = matches!(tokio::time::timeout_at(deadline, wait).await, Ok(Ok(_)));
        started
    }

    /// SIGQUIT: no new credit decision here from now on. Returns the state
    /// it left.
    pub fn begin_handover(&self) -> Readiness {
        let mut gate = self.gate.lock();
        let was = gate.state;
        gate.state = Readiness::HandingOver;
        drop(gate);
        self.state.send_replace(Readiness::HandingOver);
        was
    }

    /// Waits for the hand-over thread, if SIGQUIT started one: the process
    /// must not exit while it flushes. Its result.
    pub fn join_handover(&self) -> Option<Result<(), String>> {
        let handle = self.handover.lock().take()?;
        Some(
            handle
                .join()
                .unwrap_or_else(|_| Err("the hand-over thread panicked".into())),
        )
    }

    /// Waits until no credit request is being decided here, at most
    /// `grace`; returns how many still are.
    pub fn drain(&self, grace: Duration) -> usize {
        let deadline = Instant::now() + grace;
        let mut gate = self.gate.lock();
        while gate.in_flight > 0 {
            if self.drained.wait_until(&mut gate, deadline).timed_out() {
                break;
            }
        }
        gate.in_flight
    }
}

/// Serves one request through the slot: at once if it needs no ledger or
/// this process decides credit; relayed to the successor while handing
/// over; after the bind while starting (bounded, then `store_unavailable`).
pub async fn serve(slot: &Arc<Slot>, req: Request<'_>) -> Reply {
    let deadline = tokio::time::Instant::now() + slot.upgrade.wait_max;
    let mut checked = false;
    loop {
        match slot.enter() {
            Entered::Local(app, _in_flight) => return service::handle(&app, req).await,
            _ if !checked && !service::needs_ledger(&slot.current(), &req) => {
                return service::handle(&slot.current(), req).await
            }
            Entered::Relay => return relay::relay(slot, req, deadline).await,
            Entered::Starting => {
                checked = true;
                if !slot.wait_started(deadline).await {
                    tracing::warn!(
                        wait_max_ms = slot.upgrade.wait_max.as_millis() as u64,
                        "the store was not loaded within upgrade.wait_max_ms; a credit request is refused"
                    );
                    return service::unavailable(&slot.current(), req).await;
                }
            }
        }
    }
}

/// Serves a request the old process relayed: like [`serve`], but never
/// relayed again (`None`: this process is handing over itself; the old
/// one tries again, the request untouched).
pub async fn serve_relayed(slot: &Arc<Slot>, req: Request<'_>, wait: Duration) -> Option<Reply> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match slot.enter() {
            Entered::Local(app, _in_flight) => return Some(service::handle(&app, req).await),
            Entered::Relay => return None,
            Entered::Starting => {
                if !slot.wait_started(deadline).await {
                    return Some(service::unavailable(&slot.current(), req).await);
                }
            }
        }
    }
}

/// The old process's side of an upgrade, after SIGQUIT moved the slot to
/// `handing_over`: lets the credit requests in flight finish (bounded by
/// `upgrade.handover_grace_ms`), retires, flushes the key table and the
/// store writer, and releases the store. Runs on its own thread (the
/// flush blocks). Returns the flush's error, if any.
///
/// One owner at every instant (see the module docs), enforced here: the
/// order is `retire` (this process decides nothing from now on) → the last
/// commit → the release (inside `flush_and_stop`, after the commit). The
/// successor's acquire succeeds only after the release, and it decides
/// only after its bind. Nothing here may be reordered.
pub fn hand_over(slot: &Slot) -> Result<(), String> {
    let started = Instant::now();
    let grace = slot.upgrade.handover_grace;
    let left = slot.drain(grace);
    let Some(app) = slot.bound() else {
        // Told to hand over before it served: nothing to give; the
        // takeover thread gives the store back if it gets it.
        return Ok(());
    };
    if left > 0 {
        tracing::warn!(
            in_flight = left,
            grace_ms = grace.as_millis() as u64,
            "credit requests still in flight at the end of the hand-over grace; sends among them stay reserved and the successor has them in doubt"
        );
    }
    app.retire();
    app.idempotency.flush_blocking();
    let result = match &app.store {
        Some(writer) => writer
            .flush_and_stop(crate::server::SHUTDOWN_FLUSH_TIMEOUT)
            .map_err(|e| e.to_string()),
        None => Ok(()),
    };
    match &result {
        Ok(()) => tracing::info!(
            drained_in_ms = started.elapsed().as_millis() as u64,
            "store flushed and released for the successor"
        ),
        Err(e) => tracing::error!(error = %e, "the hand-over could not flush the store"),
    }
    result
}

/// pingora's signals (SIGQUIT upgrade, SIGTERM graceful, SIGINT fast),
/// with SIGQUIT first starting the hand-over of the ledger ([`hand_over`]
/// on its own thread) before pingora sends the listening sockets.
pub struct UpgradeSignals {
    pub slot: Arc<Slot>,
}

#[async_trait]
impl ShutdownSignalWatch for UpgradeSignals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let mut quit = signal(SignalKind::quit()).expect("a SIGQUIT handler");
        let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("a SIGINT handler");
        tokio::select! {
            _ = quit.recv() => {
                let was = self.slot.begin_handover();
                tracing::info!(
                    was = was.as_str(),
                    "SIGQUIT: handing over to the successor (tollgate run --upgrade); credit requests are relayed to it"
                );
                let slot = self.slot.clone();
                let handle = std::thread::Builder::new()
                    .name("tollgate-handover".into())
                    .spawn(move || hand_over(&slot))
                    .expect("spawning the hand-over thread");
                *self.slot.handover.lock() = Some(handle);
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => ShutdownSignal::FastShutdown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::ledger::NullSink;

    fn app(dir: &std::path::Path) -> Arc<App> {
        std::fs::write(
            dir.join("tariffs.yaml"),
            "default_country_code: \"36\"\ndefault_price: 1\nprices:\n  \"36\": 1\n",
        )
        .unwrap();
        let path = dir.join("tollgate.yaml");
        std::fs::write(
            &path,
            "listen: 127.0.0.1:0\nupstream: { address: 127.0.0.1:9 }\ntariffs: tariffs.yaml\n",
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        Arc::new(crate::server::build_app(config, Arc::new(NullSink)).unwrap())
    }

    #[test]
    fn the_slot_decides_nothing_before_the_bind_and_nothing_new_after_the_hand_over() {
        let dir = tempfile::tempdir().unwrap();
        let real = app(dir.path());
        let front = {
            let c = real.config.clone();
            let tariff = crate::tariff::Tariff::load(&c.tariffs_path).unwrap();
            Arc::new(App::standby(
                c,
                tariff,
                real.metrics.clone(),
                real.clock.clone(),
            ))
        };
        assert!(front.ownership().is_err(), "a stand-in never owns");
        let slot = Slot::starting(front);
        assert_eq!(slot.readiness(), Readiness::Starting);
        assert!(matches!(slot.enter(), Entered::Starting));
        assert!(slot.current().is_standby());

        assert!(slot.bind(real.clone()));
        assert!(!slot.bind(real.clone()), "bound once");
        assert_eq!(slot.readiness(), Readiness::Serving);
        let Entered::Local(app, in_flight) = slot.enter() else {
            panic!("serving decides locally")
        };
        assert!(Arc::ptr_eq(&app, &real));

        assert_eq!(slot.begin_handover(), Readiness::Serving);
        assert!(matches!(slot.enter(), Entered::Relay), "no new decision");
        // The one in flight holds the drain until the grace ends...
        let started = Instant::now();
        assert_eq!(slot.drain(Duration::from_millis(50)), 1);
        assert!(started.elapsed() >= Duration::from_millis(50));
        // ...and releases it the moment it ends.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            drop(in_flight);
        });
        assert_eq!(slot.drain(Duration::from_secs(10)), 0);
        releaser.join().unwrap();

        // Retired: every decision is refused from now on.
        app.retire();
        assert_eq!(
            app.ownership(),
            Err(crate::store::fence::NotOwner::HandedOver)
        );
    }

    #[test]
    fn a_successor_told_to_hand_over_before_its_bind_binds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let real = app(dir.path());
        let slot = Slot::starting(real.clone());
        assert_eq!(slot.begin_handover(), Readiness::Starting);
        assert!(!slot.bind(real));
        assert!(slot.bound().is_none());
    }
}
