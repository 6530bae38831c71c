//! The successor's start (`tollgate run --upgrade`): a stand-in app and
//! the relay socket at once, the store when the old process lets it go.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{relay, Slot};
use crate::config::Config;
use crate::ledger::Clock;
use crate::metrics::Metrics;
use crate::server::{build_app_with_store, open_store, StartError};
use crate::service::App;
use crate::tariff::Tariff;

/// Pause between two attempts at the store's fence.
const FENCE_POLL: Duration = Duration::from_millis(5);

/// Builds the successor's slot (a stand-in until the store is loaded),
/// binds and serves the relay socket, and starts the thread that takes
/// the store over. Returns before the store is owned: the listeners open
/// meanwhile.
pub fn successor(
    config: &Config,
    metrics: &Arc<Metrics>,
    clock: &Arc<dyn Clock>,
) -> Result<Arc<Slot>, StartError> {
    // A bad tariff file stops the successor before it takes anything over.
    let tariff =
        Tariff::load(&config.tariffs_path).map_err(|e| StartError::Tariff(e.to_string()))?;
    let front = Arc::new(App::standby(
        config.clone(),
        tariff,
        metrics.clone(),
        clock.clone(),
    ));
    let slot = Slot::starting(front);
    let path = config.upgrade.relay_sock();
    let listener = relay::bind(&path).map_err(|e| {
        StartError::Upgrade(format!(
            "cannot bind the relay socket {}: {e}",
            path.display()
        ))
    })?;
    {
        let slot = slot.clone();
        std::thread::Builder::new()
            .name("tollgate-relay".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("tollgate-relay")
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "the relay runtime cannot start");
                        return;
                    }
                };
                // Kept running after the relay stops listening: answers
                // still in flight, and gateway connections this runtime
                // opened for the shared pool, live on it.
                runtime.block_on(async move {
                    relay::serve(listener, slot).await;
                    std::future::pending::<()>().await
                });
            })
            .map_err(|e| StartError::Upgrade(format!("cannot start the relay thread: {e}")))?;
    }
    tracing::info!(relay = %path.display(), "successor: relaying socket bound; waiting for the old process to hand the store over");
    {
        let (config, metrics, clock, slot) =
            (config.clone(), metrics.clone(), clock.clone(), slot.clone());
        std::thread::Builder::new()
            .name("tollgate-takeover".into())
            .spawn(move || {
                if let Err(e) = take_over(config, metrics, clock, &slot) {
                    tracing::error!(error = %e, "the successor could not take the store over; exiting");
                    eprintln!("tollgate: {e}");
                    std::process::exit(1);
                }
            })
            .map_err(|e| StartError::Upgrade(format!("cannot start the takeover thread: {e}")))?;
    }
    Ok(slot)
}

/// Polls the store's fence until the old process released it (or died,
/// or its lease expired), then restores the ledger and binds it. Blocking:
/// runs on its own thread (never inside a runtime: the PostgreSQL client
/// blocks on one of its own).
fn take_over(
    config: Config,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    slot: &Slot,
) -> Result<(), StartError> {
    let started = Instant::now();
    let deadline = started + config.upgrade.takeover_max;
    let mut attempts = 0u64;
    let opened = loop {
        attempts += 1;
        match open_store(&config, &metrics, clock.clone()) {
            Ok(opened) => break opened,
            Err(StartError::StoreOwned { .. }) if Instant::now() < deadline => {
                std::thread::sleep(FENCE_POLL);
            }
            Err(StartError::StoreOwned { path, problem }) => {
                return Err(StartError::Upgrade(format!(
                    "the store {path} was not released within upgrade.takeover_max_ms ({} ms): {problem}",
                    config.upgrade.takeover_max.as_millis()
                )))
            }
            Err(e) => return Err(e),
        }
    };
    let acquired = started.elapsed();
    let front = slot.current();
    let mut app = build_app_with_store(config, metrics, opened, clock)?;
    // What the stand-in already holds carries on: limiter state, the
    // gateway pool, and a snapshot a SIGHUP may have reloaded meanwhile.
    app.limiter = front.limiter.clone();
    app.upstream = front.upstream.clone();
    app.gateway = front.gateway.clone();
    app.snapshot.store(front.snapshot.load_full());
    let app = Arc::new(app);
    if !slot.bind(app.clone()) {
        // SIGQUIT before the bind: this process hands over too; give the
        // store back untouched.
        tracing::warn!("told to hand over before serving; releasing the store again");
        app.retire();
        if let Some(w) = &app.store {
            w.flush_and_stop(crate::server::SHUTDOWN_FLUSH_TIMEOUT)
                .map_err(|e| StartError::Upgrade(e.to_string()))?;
        }
        return Ok(());
    }
    write_pid_file(&app.config.upgrade.pid_file);
    tracing::info!(
        fence_attempts = attempts,
        acquired_after_ms = acquired.as_millis() as u64,
        serving_after_ms = started.elapsed().as_millis() as u64,
        accounts = app.ledger.len(),
        "successor: store taken over and ledger restored; serving credit"
    );
    Ok(())
}

/// Writes this process's pid to `upgrade.pid_file` (atomically: a
/// temporary file renamed over it) once it serves credit, so that
/// `kill -HUP "$(cat PID_FILE)"` (the systemd unit's reload) and the
/// upgrade recipe reach the process that serves now, also after an
/// upgrade replaced the one systemd started.
pub fn write_pid_file(path: &std::path::Path) {
    let tmp = path.with_extension("pid.tmp");
    let result = std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        tracing::warn!(pid_file = %path.display(), error = %e, "cannot write the pid file");
    }
}

/// Removes `upgrade.pid_file` at exit if it still names this process (a
/// successor has written its own by then).
pub fn remove_pid_file(path: &std::path::Path) {
    let ours = std::fs::read_to_string(path)
        .is_ok_and(|text| text.trim() == std::process::id().to_string());
    if ours {
        let _ = std::fs::remove_file(path);
    }
}
