//! Hot reload of the tariff snapshot (SPEC 5.2): on a change of the tariff
//! file, one of its prefixes files or the configuration file (for its
//! `limits:`), and on `SIGHUP`. The same triggers (a change of `tls.cert`
//! or `tls.key`, and `SIGHUP`) reload the TLS listener's certificate
//! ([`CertStore::reload`]: swapped whole or refused whole, never half), and
//! each reload repeats the warning of `upstream.insecure_skip_verify`. (`POST
//! /admin/reload` is the third trigger, in `admin.rs`.) Every trigger calls
//! the one [`App::reload_tariffs`], which validates the files, swaps the
//! snapshot in one `ArcSwap` store, and on an invalid file logs the file,
//! line and key, counts `tollgate_tariff_reloads_total{result="error"}` and
//! keeps the previous snapshot.
//!
//! Owns the [`Reloader`] background service and must never touch a request:
//! requests load the snapshot once when they start and keep it, so a swap
//! never changes the price of a request in flight and never fails one.
//!
//! # Why it is a pingora background service started first
//! pingora 0.9.1 handles `SIGTERM`, `SIGINT` and `SIGQUIT` only; the default
//! action of `SIGHUP` ends the process. The reloader installs its tokio
//! `SIGHUP` handler and only then reports ready, and `server.rs` makes the
//! proxy and admin listeners depend on it: by the time a port accepts, a
//! `SIGHUP` reloads instead of killing. Before that — loading the
//! configuration and restoring the store can take seconds with millions of
//! accounts — [`catch_early_sighup`], called first thing by `tollgate run`,
//! turns a `SIGHUP` into a flag, and the reloader runs the reload it asked
//! for as soon as it is up.
//!
//! # Watching
//! The *directories* of the tariff file and of every prefixes file are
//! watched (inotify on Linux), not the files: an editor or a deploy tool
//! that writes a temporary file and renames it over the original replaces
//! the inode, which a watch on the file itself would lose. Events for other
//! files in those directories (the SQLite store, its WAL) are dropped in the
//! watcher's own thread. Events are debounced: a reload starts once the
//! files have been quiet for [`DEBOUNCE`] (at most [`DEBOUNCE_MAX`] after
//! the first event), so a file written in several chunks is normally read
//! once it is whole. A half-written file that is invalid is rejected and
//! the next write event reloads again; but a writer that pauses longer than
//! the debounce mid-file can have a truncated file loaded if what was
//! written so far happens to be a valid tariff. Writing a temporary file
//! and renaming it over the original (what most editors and deploy tools
//! do) is atomic and has no such window. After every reload the watched set
//! follows the prefixes files of the tariff in force (and at least every
//! few seconds, for reloads by the admin API).
//!
//! Failure modes: if the watcher cannot be created (e.g. the inotify limit
//! is reached) or a directory cannot be watched, an error is logged and
//! `SIGHUP` and `POST /admin/reload` still work. Symlinked files are
//! watched by the path configured, not the link target.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::services::ServiceReadyNotifier;
use tokio::sync::mpsc;

use crate::handover::Slot;
use crate::service::App;
use crate::tariff::TariffError;
use crate::tls::{CertReload, CertStore};

/// Quiet time after the last file event before a reload starts.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Longest a stream of file events can delay a reload.
pub const DEBOUNCE_MAX: Duration = Duration::from_secs(1);
/// How often the watched set is brought up to date with the tariff in
/// force when no reload of the reloader's own did it.
const WATCH_REFRESH: Duration = Duration::from_secs(5);

/// What asked for a reload, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    FileChange,
    Sighup,
    /// A `SIGHUP` that arrived while tollgate was starting.
    SighupDuringStartup,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::FileChange => "file_change",
            Trigger::Sighup => "sighup",
            Trigger::SighupDuringStartup => "sighup_during_startup",
        }
    }
}

/// Raised by a `SIGHUP` from [`catch_early_sighup`] on.
static EARLY_SIGHUP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// From now on a `SIGHUP` no longer ends the process: until the reloader
/// is up it only raises a flag, and the reloader reloads once for it.
pub fn catch_early_sighup() {
    let flag = EARLY_SIGHUP.get_or_init(|| Arc::new(AtomicBool::new(false)));
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGHUP, flag.clone()) {
        tracing::warn!(error = %e, "cannot catch SIGHUP during start-up");
    }
}

/// Whether a `SIGHUP` arrived since [`catch_early_sighup`]; clears it.
fn take_early_sighup() -> bool {
    EARLY_SIGHUP
        .get()
        .is_some_and(|flag| flag.swap(false, Ordering::SeqCst))
}

/// The background service that reloads on file changes and `SIGHUP`.
pub struct Reloader {
    /// The app, late-bound (`handover.rs`): the stand-in's snapshot is
    /// reloaded until the real app is bound, the real one's after.
    slot: Arc<Slot>,
    /// The TLS listener's certificate, if there is a TLS listener.
    certs: Option<Arc<CertStore>>,
}

/// Logs (at start and at every reload) that the gateway's certificate is
/// not verified, if `upstream.insecure_skip_verify` says so, and sets the
/// gauge that shows it.
pub fn warn_if_upstream_unverified(app: &App) {
    let insecure = app
        .config
        .upstream
        .tls
        .as_ref()
        .is_some_and(|t| t.insecure_skip_verify);
    app.metrics
        .upstream_tls_insecure_skip_verify
        .set(i64::from(insecure));
    if insecure {
        tracing::warn!(
            upstream = %app.config.upstream.address,
            "upstream.insecure_skip_verify is on: the gateway's TLS certificate is NOT verified; \
             anyone on the path can impersonate the gateway"
        );
    }
}

/// What one reload did: the tariff (with the limits and the mode) and, with
/// a TLS listener, the certificate pair. Each outcome is also logged and
/// counted where it is made.
pub struct Reloaded {
    pub tariff: Result<String, TariffError>,
    pub certificate: Option<CertReload>,
}

/// One reload of everything a reload covers — the tariff, the TLS
/// certificate pair, the warning that the gateway's certificate is not
/// verified — for the reloader (file change, `SIGHUP`) and `POST
/// /admin/reload` alike. Blocking (file I/O, parsing 100 000+ prefixes):
/// run it off the async threads.
pub fn reload_all(app: &App, certs: Option<&CertStore>) -> Reloaded {
    let tariff = app.reload_tariffs();
    let certificate = certs.map(CertStore::reload);
    warn_if_upstream_unverified(app);
    Reloaded {
        tariff,
        certificate,
    }
}

impl Reloader {
    pub fn new(app: Arc<App>) -> Self {
        Self::with_slot(Slot::serving(app))
    }

    pub fn with_slot(slot: Arc<Slot>) -> Self {
        Reloader { slot, certs: None }
    }

    /// Reloads `certs` too (on a change of its files and on `SIGHUP`).
    pub fn with_certs(mut self, certs: Option<Arc<CertStore>>) -> Self {
        self.certs = certs;
        self
    }

    /// The files whose change means a reload, as absolute paths: the
    /// tariff file, the prefixes files of the tariff in force, and the
    /// configuration file (its `limits:` section reloads with the tariff).
    fn wanted_files(&self) -> HashSet<PathBuf> {
        let app = self.slot.current();
        let snapshot = app.snapshot.load();
        let config = &app.config;
        [config.tariffs_path.as_path(), config.source.as_path()]
            .into_iter()
            .chain(snapshot.tariff.prefix_files().iter().map(PathBuf::as_path))
            .chain(self.certs.iter().flat_map(|c| c.files()))
            .filter(|p| !p.as_os_str().is_empty())
            .map(absolute)
            .collect()
    }

    /// Runs one reload off the async runtime (100 000+ prefixes take tens of
    /// milliseconds) and logs what asked for it.
    async fn reload(&self, trigger: Trigger) {
        tracing::info!(trigger = trigger.as_str(), "tariff reload requested");
        let app = self.slot.current();
        let certs = self.certs.clone();
        // Outcomes are logged and counted where they are made.
        if let Err(e) =
            tokio::task::spawn_blocking(move || reload_all(&app, certs.as_deref())).await
        {
            tracing::error!(error = %e, "reload task failed");
        }
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot handle SIGHUP; reload with POST /admin/reload");
                None
            }
        };
        let (tx, mut events) = mpsc::unbounded_channel();
        let mut watch = FileWatch::new(tx);
        watch.follow(self.wanted_files());
        ready.notify_ready();
        // From here tokio's handler sees every SIGHUP; one that came while
        // starting is served now.
        if take_early_sighup() {
            self.reload(Trigger::SighupDuringStartup).await;
        }

        // A reload by `POST /admin/reload` may bring new prefixes files:
        // the watched set catches up within this period.
        let mut refresh = tokio::time::interval(WATCH_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let trigger = tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = next_signal(&mut hangup) => Trigger::Sighup,
                Some(()) = events.recv() => {
                    debounce(&mut events).await;
                    Trigger::FileChange
                }
                _ = refresh.tick() => {
                    watch.follow(self.wanted_files());
                    continue;
                }
            };
            self.reload(trigger).await;
            watch.follow(self.wanted_files());
        }
    }
}

/// The next `SIGHUP`; never resolves without a handler.
async fn next_signal(hangup: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hangup {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits until no event came for [`DEBOUNCE`], or [`DEBOUNCE_MAX`] passed.
async fn debounce(events: &mut mpsc::UnboundedReceiver<()>) {
    let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
    loop {
        let quiet_until = (tokio::time::Instant::now() + DEBOUNCE).min(deadline);
        match tokio::time::timeout_at(quiet_until, events.recv()).await {
            Ok(Some(())) if tokio::time::Instant::now() < deadline => continue,
            _ => return,
        }
    }
}

/// `path` made absolute against the working directory (not resolved
/// through symlinks: the configured name is what gets replaced).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The directory watches and the files that matter in them.
struct FileWatch {
    /// `None` if no watcher could be created.
    watcher: Option<RecommendedWatcher>,
    /// Files whose events are passed on; shared with the watcher's thread,
    /// which filters (a busy store file in the same directory must not wake
    /// the reloader).
    files: Arc<Mutex<HashSet<PathBuf>>>,
    /// Directories watched now.
    dirs: HashSet<PathBuf>,
}

impl FileWatch {
    fn new(tx: mpsc::UnboundedSender<()>) -> FileWatch {
        let files: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
        let filter = files.clone();
        let handler = move |result: notify::Result<notify::Event>| {
            let relevant = match &result {
                // A lost event (queue overflow) may have been ours.
                Err(_) => true,
                Ok(event) => {
                    is_change(&event.kind) && {
                        let files = filter.lock();
                        event.need_rescan() || event.paths.iter().any(|p| files.contains(p))
                    }
                }
            };
            if relevant {
                // The receiver is gone only at shutdown.
                let _ = tx.send(());
            }
        };
        let watcher = match notify::recommended_watcher(handler) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(error = %e, "cannot watch tariff files; reload with SIGHUP or POST /admin/reload");
                None
            }
        };
        FileWatch {
            watcher,
            files,
            dirs: HashSet::new(),
        }
    }

    /// Watches the directories of `files` (and only those), and passes on
    /// events for `files`.
    fn follow(&mut self, files: HashSet<PathBuf>) {
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        let dirs: HashSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        for gone in self.dirs.difference(&dirs) {
            if let Err(e) = watcher.unwatch(gone) {
                tracing::debug!(dir = %gone.display(), error = %e, "unwatching a directory");
            }
        }
        let mut watched = HashSet::new();
        for dir in &dirs {
            if self.dirs.contains(dir) {
                watched.insert(dir.clone());
                continue;
            }
            match watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "watching for tariff changes");
                    watched.insert(dir.clone());
                }
                Err(e) => tracing::error!(
                    dir = %dir.display(),
                    error = %e,
                    "cannot watch a tariff directory; reload with SIGHUP or POST /admin/reload"
                ),
            }
        }
        self.dirs = watched;
        *self.files.lock() = files;
    }
}

/// Whether an event may have changed a file's content or replaced it:
/// everything but reads, opens and read-only closes.
fn is_change(kind: &EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};

    #[test]
    fn reads_do_not_count_as_changes() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
        assert!(is_change(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
        assert!(is_change(&EventKind::Remove(
            notify::event::RemoveKind::File
        )));
    }

    #[tokio::test]
    async fn debounce_waits_for_quiet_but_not_forever() {
        // Real time (tokio's test clock needs a feature that would rebuild
        // pingora for tests), so the bounds are loose.
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Events every 20 ms for 3 s: the reload still starts after ~1 s.
        // On a loaded machine the feeder itself may be held up for longer
        // than DEBOUNCE; then that gap is a real quiet period and an early
        // return is right, so the sends' times are kept to tell.
        let sent = Arc::new(Mutex::new(Vec::new()));
        let times = sent.clone();
        let feeder = tokio::spawn(async move {
            for _ in 0..150 {
                times.lock().push(std::time::Instant::now());
                if tx.send(()).is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let started = std::time::Instant::now();
        debounce(&mut rx).await;
        let returned = std::time::Instant::now();
        let waited = returned - started;
        feeder.abort();
        // The longest quiet spell the debouncer saw before it returned.
        let mut seen: Vec<std::time::Instant> = vec![started];
        seen.extend(sent.lock().iter().filter(|t| **t <= returned));
        seen.push(returned);
        let quiet = seen
            .windows(2)
            .map(|w| w[1].saturating_duration_since(w[0]))
            .max()
            .unwrap_or_default();
        assert!(
            waited < DEBOUNCE_MAX + Duration::from_millis(900)
                && (waited >= DEBOUNCE_MAX || quiet >= DEBOUNCE),
            "{waited:?} (longest gap between events {quiet:?})"
        );

        // A single event: reload after DEBOUNCE of quiet.
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        tx.send(()).unwrap();
        let started = std::time::Instant::now();
        debounce(&mut rx).await;
        let waited = started.elapsed();
        assert!(
            waited >= DEBOUNCE && waited < DEBOUNCE + Duration::from_millis(900),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn a_rename_over_the_file_is_seen_and_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let target = absolute(&dir.path().join("tariffs.yaml"));
        std::fs::write(&target, "a").unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut watch = FileWatch::new(tx);
        watch.follow(HashSet::from([target.clone()]));

        // Another file in the same directory: nothing.
        std::fs::write(dir.path().join("tollgate.db"), "x").unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(quiet.is_err(), "an unrelated file woke the reloader");

        // Write a temporary file and rename it over the target.
        let tmp = dir.path().join(".tariffs.yaml.tmp");
        std::fs::write(&tmp, "b").unwrap();
        std::fs::rename(&tmp, &target).unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(seen.ok().flatten(), Some(()));
        while rx.try_recv().is_ok() {}

        // An in-place write of the replaced file is seen too (the directory
        // watch survives the inode change).
        std::fs::write(&target, "c").unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(seen.ok().flatten(), Some(()));
    }
}
