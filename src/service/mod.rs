//! The application layer: the state every front door shares, and the one
//! entry point that owns each request's whole decision.
//!
//! The proxy builds a [`Request`] (door, head, body, client address,
//! request id) and calls [`handle`]; the service parses it with the front
//! door's parser (`api/`), runs it through the idempotency wrapper, the
//! lockout and authentication, pricing, limits, the reservation, the
//! gateway ([`Gateway`](crate::upstream::Gateway)) and settlement, and
//! returns the [`Reply`] to write — never the other way round: nothing
//! here calls back into the proxy. Refusals are values rendered by
//! [`respond`]; outcomes are the closed [`Outcome`] set.
//!
//! Module map: `ozeki` (the Ozeki door and its credit actions), `send`
//! (`sendmessage`), `receive` (priced `receivemessage`), `forward` (the
//! gateway round trip), `boxis`, `soap` (the other doors), `dropin`
//! (authentication and drop-in adoption), `idempotent` (the key wrapper),
//! `respond` (every answer's shape), `outcome`.

pub mod boxis;
pub mod dlr;
pub mod dropin;
pub mod forward;
pub mod idempotent;
pub mod outcome;
pub mod ozeki;
pub mod receive;
pub mod respond;
pub mod send;
pub mod soap;

pub use outcome::Outcome;
pub use respond::{AccessLog, Refusal, Reply, Shape};

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::api::owned::Router;
use crate::auth::CredentialStore;
use crate::clock::Clock;
use crate::config::{Config, Durability, Mode};
use crate::error::ErrorCode;
use crate::idempotency::Idempotency;
use crate::ledger::{Entry, EntrySink, Ledger};
use crate::limits::{self, Limiter, LimitsConfig};
use crate::metrics::Metrics;
use crate::store::fence::NotOwner;
use crate::store::WriteBehind;
use crate::tariff::{Tariff, TariffError};
use crate::upstream::{Gateway, Upstream};

/// What a request runs with from start to end, swapped whole on reload
/// (SPEC 5.2): a request keeps the snapshot it started with.
///
/// Everything that hot-reloads lives here, in this one struct behind one
/// `ArcSwap`, so a request never sees the tariff of one reload with the
/// limits of another. The rate limits (SPEC 7) join as a field of their own
/// next to `tariff`, and [`App::reload_tariffs`] builds the next snapshot
/// from the previous one, carrying over whatever it does not reload (the
/// limiter *state* lives outside the snapshot so it survives reloads).
pub struct Snapshot {
    pub mode: Mode,
    pub tariff: Arc<Tariff>,
    /// The rates and rules of SPEC 7 (the `limits:` section of
    /// `tollgate.yaml`, re-read on every reload).
    pub limits: Arc<LimitsConfig>,
}

pub struct App {
    pub config: Config,
    /// The crate's one clock (`crate::clock`): the ledger, the limiter, the
    /// idempotency table, pricing and the sweeps all read it.
    pub clock: Arc<dyn Clock>,
    /// Which door a request goes to (`api::owned`), from the configured
    /// paths, normalised once.
    pub router: Router,
    pub ledger: Arc<Ledger>,
    pub credentials: Arc<CredentialStore>,
    pub snapshot: ArcSwap<Snapshot>,
    /// The gateway as tollgate's own keep-alive pool (its `peer` is what
    /// pingora's streamed path connects to).
    pub upstream: Arc<Upstream>,
    /// Where forwarded requests go: `upstream`, or a test's fake gateway.
    pub gateway: Arc<dyn Gateway>,
    pub metrics: Arc<Metrics>,
    /// The Boxis door's user keys and replay cache (seeded at startup).
    pub boxis: boxis::BoxisState,
    /// The write-behind store writer; `None` when `store.path` is unset
    /// (the ledger then lives in memory only). Set once at start-up.
    pub store: Option<Arc<WriteBehind>>,
    /// Limiter state (SPEC 7): outside the snapshot, so a reload changes
    /// rates without resetting what clients have used.
    pub limiter: Arc<Limiter>,
    /// `Idempotency-Key` table (SPEC 3.4): in memory until start-up opens
    /// its SQLite file (`server::build`).
    pub idempotency: Arc<Idempotency>,
    /// Drop-in authentication state: single flight and the negative cache
    /// of gateway verifications (SPEC 5.3).
    pub dropin: dropin::DropIn,
    /// Delivery reports (`dlr.enabled`), set once at start-up.
    pub dlr: Option<Arc<crate::dlr::Dlr>>,
    /// This node's part of a cluster (`cluster:`), set once at start-up:
    /// sends reserve from its grants, credit actions and balances go to
    /// the shared database (`crate::cluster::node`).
    pub cluster: Option<Arc<crate::cluster::node::ClusterNode>>,
    /// The durable outbox, opened at start-up when something sends through
    /// it (`dlr.enabled`, `notify.low_balance`).
    pub outbox: Option<Arc<crate::outbox::Outbox>>,
    /// Low-balance webhooks (`notify.low_balance`), set once at start-up.
    pub low_balance: Option<Arc<crate::notify::LowBalanceNotifier>>,
    /// Makes request ids unique across restarts: the start time prefixes a
    /// per-process counter.
    started_unix_ms: i64,
    next_request: AtomicU64,
    /// Serialises reloads, so two at once cannot swap in the older file
    /// last or interleave their metrics.
    reload_lock: parking_lot::Mutex<()>,
    /// A stand-in without the ledger (`handover.rs`): routes, streams and
    /// forwards what is not tollgate's while the store is not loaded, and
    /// fails closed on everything that is ([`Self::ownership`]).
    standby: bool,
    /// Set by the hand-over: this process decides no credit any more.
    retired: std::sync::atomic::AtomicBool,
}

impl App {
    pub fn new(
        config: Config,
        ledger: Arc<Ledger>,
        credentials: Arc<CredentialStore>,
        tariff: Tariff,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        metrics.set_tariff_version(tariff.version(), clock.now_unix_ms() / 1000);
        let upstream = Arc::new(Upstream::new(&config.upstream));
        let gateway: Arc<dyn Gateway> = upstream.clone();
        let boxis = boxis::BoxisState::new(&config.boxis);
        let snapshot = ArcSwap::from_pointee(Snapshot {
            mode: config.mode,
            tariff: Arc::new(tariff),
            limits: Arc::new(config.limits.clone()),
        });
        let limiter = Arc::new(Limiter::with_clock(
            config.limits.max_keys_per_rule,
            metrics.clone(),
            clock.clone(),
        ));
        let idempotency = Arc::new(
            Idempotency::open(
                &crate::idempotency::IdempotencyConfig {
                    path: None,
                    ..config.idempotency.clone()
                },
                clock.clone(),
            )
            .expect("an in-memory key table always opens"),
        );
        let dropin = dropin::DropIn::new(&config.auth);
        let router = Router::new(
            &config.ozeki.paths,
            &config.boxis.path,
            &config.soap.path,
            &config.ozeki.blocked_paths,
        );
        App {
            router,
            limiter,
            idempotency,
            dropin,
            config,
            ledger,
            credentials,
            snapshot,
            upstream,
            gateway,
            metrics,
            boxis,
            started_unix_ms: clock.now_unix_ms(),
            clock,
            next_request: AtomicU64::new(1),
            reload_lock: parking_lot::Mutex::new(()),
            store: None,
            dlr: None,
            cluster: None,
            outbox: None,
            low_balance: None,
            standby: false,
            retired: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The stand-in of a process that does not hold the ledger yet: the
    /// configuration, tariff, routing, limiter and gateway of `config`, an
    /// empty ledger that no store backs, and no credential. It never
    /// decides credit: [`Self::ownership`] is `Err(Starting)` for good.
    pub fn standby(
        config: Config,
        tariff: Tariff,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let ledger = Arc::new(Ledger::new(
            crate::ledger::LedgerConfig {
                overdraft: config.overdraft,
                reservation_ttl_ms: config.settle.reservation_ttl.as_millis() as i64,
            },
            Arc::new(crate::ledger::NullSink),
            clock.clone(),
        ));
        let credentials = Arc::new(CredentialStore::with_capacity(1, 0));
        let mut app = App::new(config, ledger, credentials, tariff, metrics, clock);
        app.standby = true;
        app
    }

    /// Whether this is a stand-in without the ledger ([`Self::standby`]).
    pub fn is_standby(&self) -> bool {
        self.standby
    }

    /// The hand-over to a successor (`handover.rs`): from now on this
    /// process decides no credit ([`Self::ownership`] is `HandedOver`).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        if let Some(w) = &self.store {
            w.retire();
        }
    }

    /// Re-reads and validates the tariff file and swaps it into the
    /// snapshot (SPEC 5.2), keeping the mode; returns the version now in
    /// force. An invalid file changes nothing: the previous tariff stays,
    /// the error is logged and counted. Requests in flight keep the
    /// snapshot they loaded. Blocks on file I/O and parsing: call it off
    /// the request path.
    pub fn reload_tariffs(&self) -> Result<String, TariffError> {
        let _serialised = self.reload_lock.lock();
        let tariff = match Tariff::load(&self.config.tariffs_path) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "tariff reload rejected; the previous tariff stays in force");
                self.metrics.record_reload(false);
                return Err(e);
            }
        };
        let version = tariff.version().to_string();
        let previous = self.snapshot.load_full();
        let (mode, limits) = match self.reload_config(&previous) {
            Ok(parts) => parts,
            Err(e) => {
                tracing::error!(error = %e, "limits reload rejected; the previous snapshot stays in force");
                self.metrics.record_reload(false);
                return Err(TariffError::Invalid {
                    file: e.file.into(),
                    key: e.key,
                    problem: e.problem,
                });
            }
        };
        if mode != previous.mode {
            tracing::warn!(previous = ?previous.mode, mode = ?mode, "mode changed by reload");
        }
        self.snapshot.store(Arc::new(Snapshot {
            mode,
            tariff: Arc::new(tariff),
            limits,
        }));
        self.metrics
            .set_tariff_version(&version, self.clock.now_unix_ms() / 1000);
        self.metrics.record_reload(true);
        tracing::info!(
            previous = previous.tariff.version(),
            version = %version,
            "tariff reloaded"
        );
        Ok(version)
    }

    /// Re-reads the hot-reloadable parts of the configuration file: `mode`
    /// (SPEC 5.1a) and `limits:`. A file that cannot be read keeps both in
    /// force (with a warning); a file that is invalid fails the reload.
    /// Everything else in the file (listeners, store, …) needs a restart.
    fn reload_config(
        &self,
        previous: &Snapshot,
    ) -> Result<(Mode, Arc<LimitsConfig>), crate::config::ConfigError> {
        if !self.config.source.is_file() {
            tracing::warn!(
                file = %self.config.source.display(),
                "configuration file not found; the mode and limits in force stay"
            );
            return Ok((previous.mode, previous.limits.clone()));
        }
        let config = Config::load(&self.config.source)?;
        if config.limits == *previous.limits {
            return Ok((config.mode, previous.limits.clone()));
        }
        tracing::info!("limits reloaded");
        Ok((config.mode, Arc::new(config.limits)))
    }

    /// Evicts idle limiter keys, expired drop-in refusals and (at most once
    /// a minute) expired idempotency keys. The sweeper calls it every
    /// second.
    pub fn sweep_protection(&self) {
        self.limiter.sweep();
        self.dropin.sweep();
        self.idempotency.sweep();
    }

    /// Whether this process owns its store now (SPEC 6, one owner per
    /// store): `Err` once another process took the store over (fenced), or
    /// while the ownership lease could not be renewed lately. Always `Ok`
    /// without a store.
    pub fn ownership(&self) -> Result<(), NotOwner> {
        if self.standby {
            return Err(NotOwner::Starting);
        }
        if self.retired.load(Ordering::Acquire) {
            return Err(NotOwner::HandedOver);
        }
        match &self.store {
            Some(w) => w.ensure_owner(),
            None => Ok(()),
        }
    }

    /// Fail closed (SPEC 1.4a): every answer that reads or moves credit
    /// calls this first (directly, or through [`Self::admit_change`]). A
    /// process that does not own its store has a stale ledger and can
    /// commit nothing, so it answers `store_unavailable`.
    pub fn ensure_owner(&self) -> Result<(), ErrorCode> {
        self.ownership().map_err(|_| ErrorCode::StoreUnavailable)
    }

    /// [`Idempotency::begin`] for a process that owns its store: the key
    /// file belongs to the store's owner, so a process that does not own
    /// the store never claims a key in it (it answers `Unavailable`).
    pub async fn begin_idempotent(
        &self,
        account: &str,
        key: &str,
        fingerprint: crate::idempotency::Fingerprint,
    ) -> crate::idempotency::Begin {
        if self.ensure_owner().is_err() {
            return crate::idempotency::Begin::Unavailable;
        }
        self.idempotency.begin(account, key, fingerprint).await
    }

    /// Back-pressure (SPEC 6): call before a ledger change a client asked
    /// for. Refuses at once when this process does not own its store
    /// ([`Self::ensure_owner`]). Waits while the store's queue is over
    /// `store.queue_max_entries`; past `store.ack_timeout` the change must
    /// be refused with `store_unavailable` (nothing has changed yet).
    pub async fn admit_change(&self) -> Result<(), ErrorCode> {
        self.ensure_owner()?;
        match &self.store {
            Some(w) => w.admit().await.map_err(|_| ErrorCode::StoreUnavailable),
            None => Ok(()),
        }
    }

    /// Call after a ledger change and before the answer that acknowledges
    /// it (or before forwarding a send). With `durability: sync` it waits
    /// until everything recorded so far is committed — one group commit
    /// serves every request waiting at the same time. With `async`, or
    /// without a store, it returns at once. `Err(StoreUnavailable)` after
    /// `store.ack_timeout`: the change is made in memory and stays queued
    /// (it is committed if the store recovers), but it is not acknowledged.
    /// Also `Err` at once when this process was fenced (the change will
    /// never be committed) or, with `async`, does not own its store now.
    pub async fn change_durable(&self) -> Result<(), ErrorCode> {
        match (&self.store, self.config.durability) {
            (Some(w), Durability::Sync) => w
                .wait_durable()
                .await
                .map_err(|_| ErrorCode::StoreUnavailable),
            (Some(_), Durability::Async) => self.ensure_owner(),
            (None, _) => Ok(()),
        }
    }

    /// SPEC 7's per-(IP, username) lockout, checked before any credential
    /// check on every front door: `Err` while the pair is locked (in shadow
    /// mode the limiter only logs).
    pub fn check_auth_lockout(
        &self,
        snapshot: &Snapshot,
        ip: Option<IpAddr>,
        username: &str,
    ) -> Result<(), limits::Refusal> {
        let shadow = snapshot.mode == Mode::Shadow;
        self.limiter
            .check_lockout(&snapshot.limits, ip, username, shadow)
    }

    /// Feeds a credential check's verdict to the lockout: a failure counts
    /// towards it, a success resets it.
    pub fn record_auth(
        &self,
        snapshot: &Snapshot,
        ip: Option<IpAddr>,
        username: &str,
        verified: bool,
    ) {
        if verified {
            self.limiter.auth_succeeded(ip, username);
        } else {
            self.limiter.auth_failed(&snapshot.limits, ip, username);
        }
    }

    /// Bounds on the Ozeki door's parameters. The body limit already bounds
    /// memory; a tighter per-value limit would make tollgate visible by
    /// refusing requests it does not own.
    pub fn ozeki_param_limits(&self) -> crate::api::ozeki::ParamLimits {
        crate::api::ozeki::ParamLimits {
            max_value_len: self.config.ozeki.body_limit_bytes,
            ..Default::default()
        }
    }

    /// A reference for ledger entries and logs: unique, short, and free of
    /// client data.
    pub fn new_request_id(&self) -> String {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n:x}", self.started_unix_ms)
    }
}

/// Counts every ledger entry into the credit metrics, then hands the batch
/// on (to the store, when there is one).
pub struct MetricsSink {
    pub metrics: Arc<Metrics>,
    pub next: Arc<dyn EntrySink>,
}

impl EntrySink for MetricsSink {
    fn record(&self, entries: &[Entry]) {
        for e in entries {
            self.metrics
                .credits_milli
                .with_label_values(&[
                    e.kind.as_str(),
                    e.bucket.as_str(),
                    crate::metrics::credit_direction(e.kind, e.amount_milli),
                ])
                .inc_by(e.amount_milli.unsigned_abs());
        }
        self.next.record(entries);
    }
}

// ---------------------------------------------------------------------------
// The request path
// ---------------------------------------------------------------------------

/// Which front door a request came to (`api::owned::Router` decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    Ozeki,
    Boxis,
    Soap,
}

impl Door {
    /// The `front_door` label of metrics and the access line.
    pub fn label(self) -> &'static str {
        match self {
            Door::Ozeki => "ozeki",
            Door::Boxis => "boxis",
            Door::Soap => "soap",
        }
    }
}

/// One request, read whole, as the service sees it.
pub struct Request<'a> {
    pub door: Door,
    /// Method, path, query and headers as the client sent them (forwarded
    /// with their original case and order).
    pub head: &'a pingora::http::RequestHeader,
    pub body: bytes::Bytes,
    pub client_ip: Option<IpAddr>,
    /// Unique, short, free of client data: the reference of the ledger's
    /// entries and of the access line.
    pub request_id: String,
    /// A per-address limit admission refused the request with (answered
    /// in the door's shape).
    pub limited: Option<limits::Refusal>,
    /// Ozeki parameters already read from the query of a request without
    /// a body (see [`intake`]).
    pub params: Option<crate::api::ozeki::params::Params>,
}

/// Serves one request (see the module docs).
pub async fn handle(app: &App, req: Request<'_>) -> Reply {
    serve(app, req, false).await
}

/// The answer of a process that cannot decide credit now: a successor
/// whose store did not load within `upgrade.wait_max_ms`, or an old
/// process that could not reach its successor (`handover.rs`). Each door
/// reads the request as [`handle`] does and refuses it `store_unavailable`
/// in its own shape before any credential is checked; nothing moves.
pub async fn unavailable(app: &App, req: Request<'_>) -> Reply {
    serve(app, req, true).await
}

/// Whether answering `req` needs the ledger: every Boxis and SOAP
/// operation (a SOAP `GET` is the WSDL or the help page: no), and an Ozeki
/// credit action, send or priced `receivemessage`. A request that is only
/// forwarded, answered for its form (malformed, unknown action) or refused
/// by a per-address limit does not: a process without the ledger answers
/// it (`handover.rs`), so traffic that is not tollgate's never waits.
pub fn needs_ledger(app: &App, req: &Request<'_>) -> bool {
    match req.door {
        Door::Boxis => true,
        Door::Soap => !req.head.method.as_str().eq_ignore_ascii_case("GET"),
        Door::Ozeki if req.limited.is_some() => false,
        Door::Ozeki => {
            let params = match &req.params {
                Some(p) => p.clone(),
                None => match ozeki_params(app, req) {
                    Ok(p) => p,
                    Err(_) => return false,
                },
            };
            ozeki::needs_ledger(&app.snapshot.load(), &params)
        }
    }
}

async fn serve(app: &App, mut req: Request<'_>, unavailable: bool) -> Reply {
    let snapshot = app.snapshot.load_full();
    match req.door {
        Door::Ozeki => {
            let params = match req.params.take() {
                Some(p) => Ok(p),
                None => ozeki_params(app, &req),
            };
            match params {
                Ok(params) if unavailable => ozeki::unavailable(&req, &params),
                Ok(params) => ozeki::handle(app, &snapshot, &req, params).await,
                Err(e) => {
                    // Malformed encoding: refused, never forwarded — the
                    // gateway might read it differently than we did.
                    let query = req.head.uri.query().map(str::as_bytes);
                    let action =
                        crate::api::ozeki::sniff_action(query, Some(&req.body)).unwrap_or_default();
                    respond::refuse(Shape::Ozeki { action: &action }, Refusal::invalid(e))
                        .for_action(action_label(&action))
                }
            }
        }
        Door::Boxis => {
            let header = |name| req.head.headers.get(name).and_then(|v| v.to_str().ok());
            let boxis_req = boxis::BoxisHttpRequest {
                client_ip: req.client_ip,
                method: req.head.method.as_str(),
                content_type: header(http::header::CONTENT_TYPE),
                body: &req.body,
            };
            let now_s = app.clock.now_unix_ms().div_euclid(1000);
            if unavailable {
                boxis::unavailable(app, &boxis_req, now_s)
            } else {
                boxis::handle(app, &boxis_req, now_s).await
            }
        }
        Door::Soap => {
            let header = |name: &str| req.head.headers.get(name).and_then(|v| v.to_str().ok());
            let soap_req = soap::SoapHttpRequest {
                request: &req,
                client_ip: req.client_ip,
                method: req.head.method.as_str(),
                query: req.head.uri.query(),
                host: header("host"),
                content_type: header("content-type"),
                soap_action: header("soapaction"),
                body: &req.body,
            };
            if unavailable {
                soap::unavailable(app, &soap_req).await
            } else {
                soap::handle(app, &soap_req).await
            }
        }
    }
}

/// The answer to a body over its door's limit, in the door's shape
/// (Ozeki: plain text, as before any parameter is read).
pub fn too_large(app: &App, door: Door, head: &pingora::http::RequestHeader) -> Reply {
    let content_type = head
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let mut reply = match door {
        Door::Boxis => boxis::too_large(&[], app.clock.now_unix_ms().div_euclid(1000)),
        Door::Soap => soap::too_large(content_type),
        Door::Ozeki => Reply::local(
            413,
            respond::CONTENT_TYPE_TEXT,
            bytes::Bytes::from_static(b"Request body too large\n"),
            Outcome::BodyTooLarge,
        ),
    };
    reply.close = true;
    reply
}

/// The Ozeki parameters of a request whose body was read: the query and
/// the body, whatever its `Content-Type` says (a `multipart/form-data`
/// body as its fields, anything else as a form), so that a send cannot
/// hide behind a content type.
fn ozeki_params(
    app: &App,
    req: &Request<'_>,
) -> Result<crate::api::ozeki::params::Params, crate::api::ozeki::ParamError> {
    use crate::api::multipart;
    use crate::api::ozeki::params::{parse_params, parse_params_and_fields};
    let limits = app.ozeki_param_limits();
    let query = req.head.uri.query().map(str::as_bytes);
    let content_type = req
        .head
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    match content_type {
        Some(ct) if !req.body.is_empty() && multipart::is_multipart(ct) => {
            let boundary = multipart::boundary(ct)?;
            let fields = multipart::parse(&req.body, &boundary, limits.max_params)?;
            parse_params_and_fields(query, &fields, &limits)
        }
        _ => parse_params(query, Some(&req.body), &limits),
    }
}

/// What to do with an Ozeki request before its body is read.
pub enum Intake {
    /// Not tollgate's: stream it to the gateway untouched (labelled with
    /// its action).
    Stream { action: &'static str },
    /// Read the body and [`handle`] it.
    Read,
    /// No body; its query, already read, is tollgate's to [`handle`].
    Parsed(crate::api::ozeki::params::Params),
}

/// Decides [`Intake`]: a request without a body whose query names no
/// owned action (nor a priced `receivemessage`) streams, unless admission
/// refused it; anything else is read and handled (a query that cannot be
/// read is refused by [`handle`]).
pub fn intake(
    app: &App,
    snapshot: &Snapshot,
    query: Option<&str>,
    has_body: bool,
    limited: bool,
) -> Intake {
    use crate::api::ozeki::command::{action_of, names_owned_action};
    if has_body {
        return Intake::Read;
    }
    let Ok(params) = crate::api::ozeki::params::parse_params(
        query.map(str::as_bytes),
        None,
        &app.ozeki_param_limits(),
    ) else {
        return Intake::Read;
    };
    let priced_receive = snapshot.tariff.receive_price_milli() > 0
        && crate::api::ozeki::inbox::names_receive(&params);
    if names_owned_action(&params) || priced_receive || limited {
        return Intake::Parsed(params);
    }
    Intake::Stream {
        action: action_label(&action_of(&params).unwrap_or_default()),
    }
}

/// What admission (SPEC 7) decided for a request, before anything is
/// parsed: the per-address place held while it runs, and a refusal by the
/// per-address concurrency or rate limit.
pub struct Admission {
    /// Released when the request ends.
    pub active: Option<crate::limits::ActiveGuard>,
    pub limited: Option<limits::Refusal>,
}

/// Per-address concurrency, then rate, for every request outside
/// `mode: passthrough` (in shadow mode the limiter only counts).
pub fn admit(app: &App, snapshot: &Snapshot, ip: Option<IpAddr>) -> Admission {
    let shadow = snapshot.mode == Mode::Shadow;
    let active = match app.limiter.enter_request(&snapshot.limits, ip, shadow) {
        Ok(guard) => guard,
        Err(refusal) => {
            return Admission {
                active: None,
                limited: Some(refusal),
            }
        }
    };
    let limited = app
        .limiter
        .check_source_ip(&snapshot.limits, ip, shadow)
        .err();
    Admission { active, limited }
}

/// Bounded label values: known Ozeki actions by name, anything else
/// `other` (an empty action stays empty: the access line shows `-`).
pub fn action_label(action: &str) -> &'static str {
    const KNOWN: [&str; 7] = [
        "getcredits",
        "setcredits",
        "addcredits",
        "sendmessage",
        "receivemessage",
        "reporting",
        "deletemessage",
    ];
    match KNOWN.iter().find(|k| **k == action) {
        Some(k) => k,
        None if action.is_empty() => "",
        None => "other",
    }
}

#[cfg(test)]
mod tests;
