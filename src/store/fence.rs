//! Store ownership: exactly one process owns a store at a time (SPEC 6,
//! "One owner per store"), whatever the backend.
//!
//! Without it two `tollgate run` over one store would each keep their own
//! in-memory ledger and both spend the same credit. Ownership has three
//! parts:
//! - **Liveness lock**: an exclusive lock the operating system (or the
//!   database server) frees when its holder dies. SQLite: an OS lock on the
//!   file `<store.path>.lock`. PostgreSQL: a session advisory lock
//!   (`pg_try_advisory_lock`) on the keeper's connection. It lets the next
//!   owner start at once after a crash, with no stale lock to clean up.
//! - **Owner record and fencing token**: one row in the store
//!   (`store_owner`) naming the owner (pid, host, start time, last
//!   renewal) under a token every new owner increments and nobody reuses.
//!   Every commit checks the token inside its own transaction (see
//!   [`CommitGuard`]); a process whose token is no longer the stored one
//!   cannot commit: it is **fenced**.
//! - **Lease**: the owner renews the record every `lease / 3` from a
//!   dedicated thread ([`FenceKeeper`]). A lock holder whose record was not
//!   renewed for `store.lease_s` is paused or hung; a new process takes the
//!   store over *without* the lock by bumping the token, and picks the lock
//!   up once the old holder lets it go.
//!
//! This module owns the rule of who may own a store now ([`decide`]), the
//! owner's handle ([`Fence`]), the thread that renews it ([`FenceKeeper`])
//! and the in-process view the request path checks ([`LeaseWatch`]). A
//! backend provides the lock and the record through [`OwnerBackend`] and
//! checks the token in its commits. This module never runs SQL itself, and
//! nothing here runs on a tokio worker.
//!
//! # Failure modes
//! - **Crash** (`kill -9`, OOM, power loss): the kernel frees the lock. The
//!   record says its owner held the lock, so the next `tollgate run` takes
//!   the store at once without waiting for the lease.
//! - **Pause** (SIGSTOP, a frozen VM, a process stuck in the kernel): the
//!   lock stays held. After the lease a new process takes over. When the old
//!   one resumes it refuses credit at once (its own view of the lease has
//!   lapsed: [`LeaseWatch::check`]). Its next renewal or commit finds the
//!   token changed: it is fenced for good, lets go of the lock, and never
//!   commits again.
//! - **A store that cannot be written** (busy, failing disk): renewals fail
//!   and are counted. After 4/5 of the lease without a renewal the owner
//!   refuses credit until one succeeds. After the whole lease another
//!   process may take over.
//! - **Clocks**: leases compare wall-clock times written by processes on one
//!   host. If the clock steps forward by more than the lease, a second
//!   `tollgate run` can take over a live owner. That owner is then fenced:
//!   this is safe, but the store is unavailable until the second process
//!   serves. A step backwards only delays a takeover. The owner's own view
//!   uses both the monotonic and the wall clock, whichever says older.
//! - **Two starters at once**: claims are transactions. The lock holder
//!   always wins. The other sees a fresh lease and refuses, or, if its
//!   takeover committed first, the lock holder sees a fresh lease it does
//!   not hold and refuses (letting go of the lock).
//!
//! # PostgreSQL
//! The same [`OwnerBackend`] over one dedicated session: `try_lock` is
//! `pg_try_advisory_lock(key)` (the server frees it when the session
//! dies); `claim` is `SELECT … FROM store_owner FOR UPDATE`, [`decide`],
//! and `UPDATE … SET token = token + 1`; `renew` is `UPDATE store_owner SET
//! renewed_unix_ms = $1 WHERE token = $2` (0 rows: fenced). Each commit
//! runs the same token check in its own transaction. A server-side lock
//! can be lost while its holder lives (the server restarts, the session
//! breaks): the backend reports it ([`OwnerBackend::lock_lost`]) and the
//! owner takes the lock again at its next renewal.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use thiserror::Error;

use super::StoreError;
use crate::ledger::Clock;
use crate::metrics::Metrics;

/// The owner's fencing token: incremented by every new owner, never reused.
/// Every commit runs under it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl std::fmt::Display for FencingToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Who wants to own a store: this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimant {
    pub pid: u32,
    pub host: String,
    pub started_unix_ms: i64,
}

impl Claimant {
    /// This process, starting now.
    pub fn this_process(now_unix_ms: i64) -> Claimant {
        Claimant {
            pid: std::process::id(),
            host: host_name(),
            started_unix_ms: now_unix_ms,
        }
    }
}

/// The owner record (`store_owner`) as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerRecord {
    pub token: FencingToken,
    pub pid: u32,
    pub host: String,
    pub started_unix_ms: i64,
    /// Wall-clock time of the last renewal (by the keeper or a commit).
    pub renewed_unix_ms: i64,
    /// Whether the owner holds the liveness lock. A lock that is free while
    /// the record says it is held means its holder died; an owner that took
    /// over from a paused process does not hold it yet.
    pub holds_lock: bool,
    /// The owner gave the store up (clean shutdown), or nobody owned it yet.
    pub released: bool,
}

impl OwnerRecord {
    /// How long ago the lease was renewed (negative if the clock stepped
    /// back since).
    pub fn lease_age_ms(&self, now_unix_ms: i64) -> i64 {
        now_unix_ms.saturating_sub(self.renewed_unix_ms)
    }
}

impl std::fmt::Display for OwnerRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on host {}, started {}",
            self.pid,
            self.host,
            utc(self.started_unix_ms)
        )
    }
}

/// `2025-01-02 03:04:05 UTC`.
pub fn utc(unix_ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(unix_ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| format!("{unix_ms} ms after 1970 UTC"))
}

/// This machine's name, for the owner record and the messages naming it.
pub fn host_name() -> String {
    for path in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(text) = std::fs::read_to_string(path) {
            let name = text.trim();
            if !name.is_empty() {
                return name.to_string();
            }
        }
    }
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Why a claimant may own the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnReason {
    /// Released at a clean shutdown, or never owned.
    Free,
    /// The record's owner held the lock and the lock is free: it died.
    HolderDied,
    /// The owner did not renew its lease in time: paused or hung.
    LeaseExpired,
}

/// What [`decide`] chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Own(OwnReason),
    /// A live owner has it.
    Refuse,
}

/// Who may own the store now. `holding_lock`: the claimant got the
/// liveness lock; `current`: the stored record, read in the transaction
/// that will write the claim.
pub fn decide(
    holding_lock: bool,
    current: &OwnerRecord,
    now_unix_ms: i64,
    lease: Duration,
) -> Decision {
    if current.released {
        return Decision::Own(OwnReason::Free);
    }
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let stale = current.lease_age_ms(now_unix_ms) > lease_ms;
    match (holding_lock, current.holds_lock, stale) {
        (true, true, _) => Decision::Own(OwnReason::HolderDied),
        (_, _, true) => Decision::Own(OwnReason::LeaseExpired),
        // A fresh lease: either the lock holder is alive, or the owner took
        // over from a paused holder and has not picked the lock up yet.
        (_, _, false) => Decision::Refuse,
    }
}

/// What a claim found and wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    /// The record before the claim.
    pub previous: OwnerRecord,
    /// The record written (with the new token); `None`: refused.
    pub owner: Option<OwnerRecord>,
}

/// What a backend provides so that one process at a time owns its store.
/// Used by the fence keeper's thread (and once at start-up), never by a
/// request.
pub trait OwnerBackend: Send {
    /// Tries to take the liveness lock without waiting; `Ok(false)` when
    /// another process holds it.
    fn try_lock(&mut self) -> Result<bool, StoreError>;

    /// Lets go of the liveness lock (fenced, or released).
    fn unlock(&mut self);

    /// Whether the liveness lock was lost without [`Self::unlock`]: a lock
    /// the database server holds for a session that ended (PostgreSQL
    /// restarted, the connection broke). The fence then takes it again at
    /// its next renewal. An OS lock lives as long as the process: never.
    fn lock_lost(&mut self) -> bool {
        false
    }

    /// In one transaction: reads the owner record and hands it to
    /// `choose`. When `choose` returns a record, writes it with the token
    /// one above the stored one, and returns it with that token.
    fn claim(
        &mut self,
        choose: &mut dyn FnMut(&OwnerRecord) -> Option<OwnerRecord>,
    ) -> Result<Claimed, StoreError>;

    /// Renews the lease of the owner with `token`.
    /// [`StoreError::Fenced`] when `token` is no longer the owner's.
    fn renew(
        &mut self,
        token: FencingToken,
        now_unix_ms: i64,
        holds_lock: bool,
    ) -> Result<(), StoreError>;

    /// Marks the record released if `token` still owns it.
    fn release(&mut self, token: FencingToken, now_unix_ms: i64) -> Result<(), StoreError>;
}

/// Why this process may not serve credit now.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum NotOwner {
    /// Another process took the store over; this one commits nothing more.
    #[error("fenced: {}", fenced_message(.by.as_ref()))]
    Fenced { by: Option<OwnerRecord> },
    /// The lease could not be renewed lately, so another process may take
    /// the store over any moment; refused until a renewal succeeds.
    #[error("lease lapsed: the store lease was last renewed {age_ms} ms ago; credit is refused until it is renewed")]
    LeaseLapsed { age_ms: u64 },
    /// This process is handing the store over to its successor (SIGQUIT):
    /// it decides no credit any more, flushes and releases the store.
    #[error("handed over: this process gave the store to its successor (upgrade); it decides no credit any more")]
    HandedOver,
    /// A process that does not hold the ledger (a successor still waiting
    /// for the store, see `handover.rs`).
    #[error("starting: this process does not own the store yet")]
    Starting,
}

/// The text of [`StoreError::Fenced`] and [`NotOwner::Fenced`].
pub fn fenced_message(by: Option<&OwnerRecord>) -> String {
    match by {
        Some(owner) => format!(
            "another process took this store over ({owner}, token {}); this process commits nothing more and refuses credit, stop it",
            owner.token
        ),
        None => "another process took this store over; this process commits nothing more and refuses credit, stop it".into(),
    }
}

/// The text of [`StoreError::Owned`]: who owns the store and what to do.
pub fn owned_message(owner: &OwnerRecord, lease_age_ms: i64, lease: Duration) -> String {
    format!(
        "the store is owned by another tollgate: {owner}, lease renewed {:.1} s ago (token {}). \
         Stop that process before starting another on this store; to upgrade without downtime, \
         use the upgrade procedure instead of a second `tollgate run`; if that process is hung, \
         it is fenced once its lease (store.lease_s: {} s) expires, and a `tollgate run` started \
         after that takes over",
        lease_age_ms.max(0) as f64 / 1000.0,
        owner.token,
        lease.as_secs()
    )
}

/// How an owner learns it may still act: the time of its last successful
/// renewal and whether it was fenced. Shared by the keeper, the writer
/// (whose commits renew too) and the request path (`App::ensure_owner`).
pub struct LeaseWatch {
    lease: Duration,
    clock: Arc<dyn Clock>,
    epoch: Instant,
    /// When the last successful renewal started, in ms since `epoch`
    /// (monotonic: SIGSTOP cannot hide from it).
    renewed_mono_ms: AtomicU64,
    /// The same moment on the wall clock (a suspended VM's monotonic clock
    /// may stop; its wall clock catches up).
    renewed_wall_ms: AtomicI64,
    fenced: AtomicBool,
    /// Set once by the hand-over, before the last flush and the release:
    /// from then on this process decides nothing (see `handover.rs`).
    retired: AtomicBool,
    fenced_by: Mutex<Option<OwnerRecord>>,
    /// Run once when the process is found fenced (wake the writer, set the
    /// gauge, log).
    on_fenced: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
}

impl std::fmt::Debug for LeaseWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseWatch")
            .field("lease", &self.lease)
            .field("fenced", &self.is_fenced())
            .finish()
    }
}

impl LeaseWatch {
    /// A watch whose lease was renewed at `renewed` (`renewed_unix_ms` on
    /// the wall clock).
    pub fn new(
        lease: Duration,
        clock: Arc<dyn Clock>,
        renewed: Instant,
        renewed_unix_ms: i64,
    ) -> LeaseWatch {
        LeaseWatch {
            lease,
            clock,
            epoch: renewed,
            renewed_mono_ms: AtomicU64::new(0),
            renewed_wall_ms: AtomicI64::new(renewed_unix_ms),
            fenced: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            fenced_by: Mutex::new(None),
            on_fenced: Mutex::new(Vec::new()),
        }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// How long after a renewal the owner still acts on it: 4/5 of the
    /// lease, so it stops before anybody else may take over.
    pub fn validity(&self) -> Duration {
        self.lease * 4 / 5
    }

    /// A renewal that started at `started` (`at_unix_ms`) succeeded.
    pub fn renewed(&self, started: Instant, at_unix_ms: i64) {
        let mono = started.saturating_duration_since(self.epoch).as_millis() as u64;
        self.renewed_mono_ms.fetch_max(mono, Ordering::AcqRel);
        self.renewed_wall_ms.fetch_max(at_unix_ms, Ordering::AcqRel);
    }

    /// Whether this process may act as the owner now.
    pub fn check(&self) -> Result<(), NotOwner> {
        self.check_at(Instant::now(), self.clock.now_unix_ms())
    }

    /// [`Self::check`] at a given moment (tests).
    pub fn check_at(&self, now: Instant, now_unix_ms: i64) -> Result<(), NotOwner> {
        if self.is_fenced() {
            return Err(NotOwner::Fenced {
                by: self.fenced_by(),
            });
        }
        if self.retired.load(Ordering::Acquire) {
            return Err(NotOwner::HandedOver);
        }
        let mono_age = (now.saturating_duration_since(self.epoch).as_millis() as u64)
            .saturating_sub(self.renewed_mono_ms.load(Ordering::Acquire));
        let wall_age = now_unix_ms
            .saturating_sub(self.renewed_wall_ms.load(Ordering::Acquire))
            .max(0) as u64;
        let age_ms = mono_age.max(wall_age);
        if age_ms >= self.validity().as_millis() as u64 {
            return Err(NotOwner::LeaseLapsed { age_ms });
        }
        Ok(())
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// The hand-over to a successor: from now on [`Self::check`] fails
    /// with [`NotOwner::HandedOver`], so no request decides credit any
    /// more; the writer still commits what is queued (the last flush)
    /// before the store is released. For good.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// The owner that fenced this process, if known.
    pub fn fenced_by(&self) -> Option<OwnerRecord> {
        self.fenced_by.lock().clone()
    }

    /// Records that another process owns the store; runs the `on_fenced`
    /// hooks the first time. Returns whether this call was the first.
    pub fn mark_fenced(&self, by: Option<OwnerRecord>) -> bool {
        if by.is_some() {
            let mut known = self.fenced_by.lock();
            // Critical section: one assignment.
            if known.is_none() {
                *known = by;
            }
        }
        // The hooks' lock first, so a hook registered meanwhile runs too.
        let hooks = self.on_fenced.lock();
        if self.fenced.swap(true, Ordering::AcqRel) {
            return false;
        }
        for hook in hooks.iter() {
            hook();
        }
        true
    }

    /// Runs `hook` once when the process is found fenced (at once if it
    /// already is). Hooks must be quick and must not call back here.
    pub fn on_fenced(&self, hook: Box<dyn Fn() + Send + Sync>) {
        let mut hooks = self.on_fenced.lock();
        if self.is_fenced() {
            hook();
        }
        hooks.push(hook);
    }
}

/// What a store's commit needs to run under the owner's token.
#[derive(Clone)]
pub struct CommitGuard {
    pub token: FencingToken,
    watch: Arc<LeaseWatch>,
}

impl std::fmt::Debug for CommitGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitGuard")
            .field("token", &self.token)
            .finish()
    }
}

impl CommitGuard {
    /// Fails with [`StoreError::Fenced`] without touching the store when
    /// this process already knows it is fenced.
    pub fn precheck(&self) -> Result<(), StoreError> {
        if self.watch.is_fenced() {
            return Err(StoreError::Fenced {
                owner: self.watch.fenced_by().map(Box::new),
            });
        }
        Ok(())
    }

    /// The wall-clock time a commit writes as its renewal.
    pub fn now_unix_ms(&self) -> i64 {
        self.watch.clock.now_unix_ms()
    }

    /// A commit whose token check started at `started` committed: it
    /// renewed the lease too.
    pub fn renewed(&self, started: Instant, at_unix_ms: i64) {
        self.watch.renewed(started, at_unix_ms);
    }

    /// A commit found the token changed.
    pub fn fenced(&self, by: Option<OwnerRecord>) {
        self.watch.mark_fenced(by);
    }
}

/// How the claimant came to own the store (for logs and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acquired {
    pub token: FencingToken,
    pub reason: OwnReason,
    pub previous: OwnerRecord,
    pub holds_lock: bool,
}

/// The owner's handle on its store: the backend's lock and record, the
/// token, and the watch the rest of the process reads.
pub struct Fence {
    backend: Box<dyn OwnerBackend>,
    token: FencingToken,
    holds_lock: bool,
    clock: Arc<dyn Clock>,
    watch: Arc<LeaseWatch>,
    acquired: Acquired,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("token", &self.token)
            .field("holds_lock", &self.holds_lock)
            .finish()
    }
}

impl Fence {
    /// Takes ownership of the backend's store for `me`, or fails with
    /// [`StoreError::Owned`] naming the live owner. Call it before
    /// anything is loaded from the store.
    pub fn acquire(
        mut backend: Box<dyn OwnerBackend>,
        me: &Claimant,
        lease: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Fence, StoreError> {
        let holds_lock = backend.try_lock()?;
        let started = Instant::now();
        let now = clock.now_unix_ms();
        let mut decision = Decision::Refuse;
        let claimed = backend.claim(&mut |current| {
            decision = decide(holds_lock, current, now, lease);
            match decision {
                Decision::Refuse => None,
                Decision::Own(_) => Some(OwnerRecord {
                    token: current.token,
                    pid: me.pid,
                    host: me.host.clone(),
                    started_unix_ms: me.started_unix_ms,
                    renewed_unix_ms: now,
                    holds_lock,
                    released: false,
                }),
            }
        });
        let claimed = match claimed {
            Ok(c) => c,
            Err(e) => {
                if holds_lock {
                    backend.unlock();
                }
                return Err(e);
            }
        };
        let (Some(owner), Decision::Own(reason)) = (claimed.owner, decision) else {
            if holds_lock {
                // The owner took over from a paused holder and will pick
                // the lock up: leave it free for it.
                backend.unlock();
            }
            let previous = claimed.previous;
            return Err(StoreError::Owned {
                lease_age_ms: previous.lease_age_ms(now),
                owner: Box::new(previous),
                lease,
            });
        };
        let previous = claimed.previous;
        match reason {
            OwnReason::Free => {}
            OwnReason::HolderDied => tracing::warn!(
                previous_pid = previous.pid,
                previous_host = %previous.host,
                previous_token = previous.token.0,
                "the store's previous owner exited without releasing it (crash or kill -9); taking it over"
            ),
            OwnReason::LeaseExpired => tracing::warn!(
                previous_pid = previous.pid,
                previous_host = %previous.host,
                previous_started = %utc(previous.started_unix_ms),
                previous_token = previous.token.0,
                lease_age_ms = previous.lease_age_ms(now),
                "the store's owner did not renew its lease (paused or hung): taking the store over; it is fenced and cannot commit when it resumes"
            ),
        }
        tracing::info!(
            token = owner.token.0,
            holds_lock,
            lease_s = lease.as_secs_f64(),
            "store ownership acquired"
        );
        let watch = Arc::new(LeaseWatch::new(lease, clock.clone(), started, now));
        Ok(Fence {
            backend,
            token: owner.token,
            holds_lock,
            clock,
            watch,
            acquired: Acquired {
                token: owner.token,
                reason,
                previous,
                holds_lock,
            },
        })
    }

    pub fn token(&self) -> FencingToken {
        self.token
    }

    pub fn acquired(&self) -> &Acquired {
        &self.acquired
    }

    pub fn watch(&self) -> &Arc<LeaseWatch> {
        &self.watch
    }

    /// What the store's commits check.
    pub fn commit_guard(&self) -> CommitGuard {
        CommitGuard {
            token: self.token,
            watch: self.watch.clone(),
        }
    }

    /// How often the keeper renews: a third of the lease.
    pub fn renew_interval(&self) -> Duration {
        self.watch.lease() / 3
    }

    /// Renews the lease (first picking the lock up if a takeover left it
    /// to the old holder). [`StoreError::Fenced`] when another process
    /// owns the store now; the caller then calls [`Self::fenced`].
    pub fn renew(&mut self) -> Result<(), StoreError> {
        if self.watch.is_fenced() {
            return Err(StoreError::Fenced {
                owner: self.watch.fenced_by().map(Box::new),
            });
        }
        if self.holds_lock && self.backend.lock_lost() {
            self.holds_lock = false;
            tracing::warn!(
                "the store's lock was lost with its database session (server restarted or \
                 connection broken); taking it again"
            );
        }
        if !self.holds_lock {
            match self.backend.try_lock() {
                Ok(true) => {
                    self.holds_lock = true;
                    tracing::info!(
                        "the old holder let go of the store's lock; this owner holds it now"
                    );
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not try the store's lock"),
            }
        }
        let started = Instant::now();
        let now = self.clock.now_unix_ms();
        self.backend.renew(self.token, now, self.holds_lock)?;
        self.watch.renewed(started, now);
        Ok(())
    }

    /// This process is fenced: records it and lets go of the lock, so the
    /// new owner can pick it up.
    pub fn fenced(&mut self, by: Option<OwnerRecord>) {
        self.watch.mark_fenced(by);
        self.let_go();
    }

    fn let_go(&mut self) {
        if self.holds_lock {
            self.backend.unlock();
            self.holds_lock = false;
        }
    }

    /// Gives the store up (clean shutdown, after the last commit): marks
    /// the record released and lets go of the lock. A fenced process only
    /// lets go.
    pub fn release(mut self) -> Result<(), StoreError> {
        let result = if self.watch.is_fenced() {
            Ok(())
        } else {
            let now = self.clock.now_unix_ms();
            self.backend.release(self.token, now)
        };
        self.let_go();
        result
    }
}

impl Drop for Fence {
    /// Dropped without [`Fence::release`] (a failed start-up, a panic): the
    /// lock is let go; the record still names this process as a lock
    /// holder, which the next owner reads as "it died".
    fn drop(&mut self) {
        self.let_go();
    }
}

/// The thread that renews the owner's lease every `lease / 3`, from the
/// moment ownership is acquired (start-up's load included) until release.
pub struct FenceKeeper {
    watch: Arc<LeaseWatch>,
    token: FencingToken,
    stop: Arc<AtomicBool>,
    wake: mpsc::Sender<()>,
    thread: Option<JoinHandle<Fence>>,
}

impl std::fmt::Debug for FenceKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FenceKeeper")
            .field("token", &self.token)
            .finish()
    }
}

/// Shortest wait between renewals after one failed.
const RENEW_RETRY_MIN: Duration = Duration::from_millis(10);

impl FenceKeeper {
    /// Starts renewing `fence`; sets the ownership gauges, and logs and
    /// counts the moment this process is found fenced.
    pub fn start(fence: Fence, metrics: Arc<Metrics>) -> FenceKeeper {
        let watch = fence.watch.clone();
        let token = fence.token;
        metrics.store_owner_token.set(token.0 as i64);
        metrics.store_fenced.set(0);
        let (wake, woken) = mpsc::channel();
        {
            let metrics = metrics.clone();
            let weak = Arc::downgrade(&watch);
            let wake = wake.clone();
            watch.on_fenced(Box::new(move || {
                metrics.store_fenced.set(1);
                let by = weak.upgrade().and_then(|w| w.fenced_by());
                tracing::error!(
                    token = token.0,
                    new_owner = %by.as_ref().map_or_else(|| "unknown".to_string(), |o| format!("{o}, token {}", o.token)),
                    "this process is fenced: another process took the store over; it commits nothing more and refuses credit. Stop this process"
                );
                let _ = wake.send(());
            }));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("tollgate-lease".into())
                .spawn(move || keep(fence, &woken, &stop, &metrics))
                .expect("spawning the store lease thread")
        };
        FenceKeeper {
            watch,
            token,
            stop,
            wake,
            thread: Some(thread),
        }
    }

    pub fn watch(&self) -> &Arc<LeaseWatch> {
        &self.watch
    }

    pub fn token(&self) -> FencingToken {
        self.token
    }

    fn stop_thread(&mut self) -> Option<Fence> {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.send(());
        let thread = self.thread.take()?;
        match thread.join() {
            Ok(fence) => Some(fence),
            Err(_) => {
                tracing::error!("the store lease thread panicked");
                None
            }
        }
    }

    /// Stops renewing and gives the store up. Call after the writer's last
    /// commit.
    pub fn release(mut self) -> Result<(), StoreError> {
        match self.stop_thread() {
            Some(fence) => {
                let fenced = fence.watch.is_fenced();
                fence.release()?;
                if !fenced {
                    tracing::info!(token = self.token.0, "store ownership released");
                }
                Ok(())
            }
            None => Err(StoreError::Unavailable(
                "the store lease thread panicked; the lock is freed when the process exits".into(),
            )),
        }
    }
}

impl Drop for FenceKeeper {
    /// Stops renewing and lets go of the lock, without marking the record
    /// released (see [`Fence`]'s `Drop`).
    fn drop(&mut self) {
        drop(self.stop_thread());
    }
}

/// The keeper thread: renew every `lease / 3` until stopped or fenced;
/// returns the fence for its release.
fn keep(
    mut fence: Fence,
    woken: &mpsc::Receiver<()>,
    stop: &AtomicBool,
    metrics: &Metrics,
) -> Fence {
    let every = fence.renew_interval();
    let mut wait = every;
    loop {
        // Woken early by a stop or by a commit that found the token changed.
        let _ = woken.recv_timeout(wait);
        if stop.load(Ordering::Acquire) {
            return fence;
        }
        if fence.watch.is_fenced() {
            fence.let_go();
            return fence;
        }
        match fence.renew() {
            Ok(()) => wait = every,
            Err(StoreError::Fenced { owner }) => {
                fence.fenced(owner.map(|o| *o));
                return fence;
            }
            Err(e) => {
                metrics.store_lease_renewal_failures.inc();
                tracing::warn!(error = %e, "store lease renewal failed; retrying");
                wait = (every / 4).max(RENEW_RETRY_MIN);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::ManualClock;

    const LEASE: Duration = Duration::from_secs(5);

    fn record(renewed_unix_ms: i64, holds_lock: bool, released: bool) -> OwnerRecord {
        OwnerRecord {
            token: FencingToken(7),
            pid: 4242,
            host: "web-1".into(),
            started_unix_ms: 1_700_000_000_000,
            renewed_unix_ms,
            holds_lock,
            released,
        }
    }

    #[test]
    fn who_may_own_the_store() {
        use Decision::*;
        use OwnReason::*;
        let now = 1_000_000;
        let fresh = now - 1_000;
        let stale = now - 5_001;
        // Released (or never owned): free for anyone.
        assert_eq!(
            decide(true, &record(fresh, true, true), now, LEASE),
            Own(Free)
        );
        assert_eq!(
            decide(false, &record(fresh, true, true), now, LEASE),
            Own(Free)
        );
        // The lock is free while the record says it is held: the holder died,
        // whatever its lease says (a new owner starts at once after kill -9).
        assert_eq!(
            decide(true, &record(fresh, true, false), now, LEASE),
            Own(HolderDied)
        );
        assert_eq!(
            decide(true, &record(stale, true, false), now, LEASE),
            Own(HolderDied)
        );
        // The lock is held by someone else: a live owner, unless its lease
        // expired (paused or hung).
        assert_eq!(
            decide(false, &record(fresh, true, false), now, LEASE),
            Refuse
        );
        assert_eq!(
            decide(false, &record(stale, true, false), now, LEASE),
            Own(LeaseExpired)
        );
        // Exactly the lease old is not yet stale.
        assert_eq!(
            decide(false, &record(now - 5_000, true, false), now, LEASE),
            Refuse
        );
        // An owner that took over without the lock keeps the store while its
        // lease is fresh, even from a process that got the lock.
        assert_eq!(
            decide(true, &record(fresh, false, false), now, LEASE),
            Refuse
        );
        assert_eq!(
            decide(true, &record(stale, false, false), now, LEASE),
            Own(LeaseExpired)
        );
        // A clock that stepped back makes the lease look fresh, not stale.
        assert_eq!(
            decide(false, &record(now + 60_000, true, false), now, LEASE),
            Refuse
        );
    }

    #[test]
    fn the_watch_lapses_before_anyone_may_take_over() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let t0 = Instant::now();
        let watch = LeaseWatch::new(LEASE, clock.clone(), t0, 1_000_000);
        assert_eq!(watch.check_at(t0, 1_000_000), Ok(()));
        assert_eq!(watch.validity(), Duration::from_secs(4));
        // 3.9 s on both clocks: still valid.
        let later = t0 + Duration::from_millis(3_900);
        assert_eq!(watch.check_at(later, 1_003_900), Ok(()));
        // The monotonic clock says 4 s (a SIGSTOP the wall clock agrees with).
        let lapsed = t0 + Duration::from_secs(4);
        assert_eq!(
            watch.check_at(lapsed, 1_004_000),
            Err(NotOwner::LeaseLapsed { age_ms: 4_000 })
        );
        // The wall clock alone says 4.5 s (a suspended VM).
        assert_eq!(
            watch.check_at(later, 1_004_500),
            Err(NotOwner::LeaseLapsed { age_ms: 4_500 })
        );
        // A renewal makes it valid again; renewals never move it back.
        watch.renewed(lapsed, 1_004_000);
        watch.renewed(t0, 1_000_000);
        assert_eq!(watch.check_at(lapsed, 1_004_000), Ok(()));
        // Fenced is for good, and names the new owner.
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        watch.on_fenced(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        let by = record(1_004_000, false, false);
        assert!(watch.mark_fenced(Some(by.clone())));
        assert!(!watch.mark_fenced(None));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "hooks run once");
        let err = watch.check_at(lapsed, 1_004_000).unwrap_err();
        assert_eq!(err, NotOwner::Fenced { by: Some(by) });
        let text = err.to_string();
        assert!(text.starts_with("fenced: "), "{text}");
        assert!(text.contains("pid 4242 on host web-1"), "{text}");
    }

    #[test]
    fn the_refusal_names_the_owner_and_what_to_do() {
        let owner = record(1_700_000_000_000, true, false);
        let text = owned_message(&owner, 1_234, LEASE);
        for part in [
            "pid 4242 on host web-1",
            "started 2023-11-14 22:13:20 UTC",
            "lease renewed 1.2 s ago",
            "Stop that process",
            "upgrade procedure",
            "store.lease_s: 5 s",
        ] {
            assert!(text.contains(part), "{part:?} not in {text}");
        }
    }
}
