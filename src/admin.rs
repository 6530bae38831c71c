//! The admin listener (default `127.0.0.1:9601`): health, metrics and the
//! operator API (SPEC 8, 9).
//!
//! `/healthz`, `/readyz` and `/metrics` are open (bind the listener to
//! loopback); everything under `/admin/` needs `Authorization: Bearer
//! TOKEN`, compared in constant time. With no token configured the
//! `/admin/` endpoints answer 403. Never echoes a token or a password.
//!
//! Readiness: `/readyz` answers 200 only while this process serves credit
//! (`handover.rs`): `not ready: starting` while a successor waits for its
//! store, `not ready: handing_over` once an old process got SIGQUIT.
//! While serving it checks what can change later: that this process
//! still owns its store (`not ready: fenced: …` once another process took
//! it over; `not ready: lease lapsed: …` while its lease cannot be
//! renewed), and the gateway: a TCP connect to the upstream address with
//! a short timeout. The probe's
//! result is cached for [`PROBE_CACHE`] so a scrape storm cannot become a
//! connect storm against the gateway; a probe in flight blocks only the
//! admin request that started it, never the proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::{Response, StatusCode};
use parking_lot::Mutex;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::handover::{Readiness, Slot};
use crate::ledger::{ReservationId, ReservationState, ReservationView};
use crate::money::format_credits;
use crate::redact::redacted_url;
use crate::service::App;
use crate::tariff::{Quote, QuoteRequest};
use crate::tls::{CertReload, CertStore};

/// How long one upstream probe result is trusted.
pub const PROBE_CACHE: Duration = Duration::from_secs(1);
/// Longest a readiness probe waits for the gateway's TCP handshake (or the
/// configured connect timeout, if shorter).
pub const PROBE_TIMEOUT_MAX: Duration = Duration::from_millis(500);

pub struct AdminApp {
    /// The app, late-bound (`handover.rs`).
    pub slot: Arc<Slot>,
    probe: UpstreamProbe,
    /// The TLS listener's certificate, reloaded with the tariffs.
    certs: Option<Arc<CertStore>>,
}

/// Whether the gateway accepts TCP connections, cached for [`PROBE_CACHE`].
struct UpstreamProbe {
    address: SocketAddr,
    timeout: Duration,
    /// When the last probe finished and what it found (`Err`: why not).
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl UpstreamProbe {
    /// Probes at most once per [`PROBE_CACHE`]; two admin requests that
    /// find the cache stale at once may both probe (harmless).
    async fn check(&self) -> Result<(), String> {
        if let Some((at, result)) = &*self.last.lock() {
            if at.elapsed() < PROBE_CACHE {
                return result.clone();
            }
        }
        let result =
            match tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(self.address))
                .await
            {
                Ok(Ok(_stream)) => Ok(()),
                Ok(Err(e)) => Err(format!("upstream {} unreachable: {e}", self.address)),
                Err(_) => Err(format!(
                    "upstream {} unreachable: no TCP handshake within {} ms",
                    self.address,
                    self.timeout.as_millis()
                )),
            };
        *self.last.lock() = Some((Instant::now(), result.clone()));
        result
    }
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<Vec<u8>> {
    let body = serde_json::to_vec_pretty(&value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .header("Content-Length", body.len())
        .body(body)
        .expect("static response parts are valid")
}

fn text_response(status: StatusCode, content_type: &str, body: String) -> Response<Vec<u8>> {
    let body = body.into_bytes();
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .header("Content-Length", body.len())
        .body(body)
        .expect("static response parts are valid")
}

fn error(status: StatusCode, message: &str) -> Response<Vec<u8>> {
    json_response(status, json!({ "error": message }))
}

pub fn reservation_json(r: &ReservationView) -> serde_json::Value {
    json!({
        "id": r.id.0,
        "account": r.account,
        "state": r.state.as_str(),
        "total": format_credits(r.total_milli),
        "anytime": format_credits(r.anytime_milli),
        "offpeak": format_credits(r.offpeak_milli),
        "reference": r.reference,
        "tariff_version": r.tariff_version,
        "created_unix_ms": r.created_unix_ms,
        "in_doubt_since_unix_ms": r.in_doubt_since_unix_ms,
    })
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// Why a request for `/admin/*` is not let in.
enum Denied {
    /// No `admin.token` configured: the operator API is switched off.
    Disabled,
    WrongToken,
}

impl AdminApp {
    pub fn new(app: Arc<App>) -> Self {
        Self::with_slot(Slot::serving(app))
    }

    pub fn with_slot(slot: Arc<Slot>) -> Self {
        let app = slot.current();
        let probe = UpstreamProbe {
            address: app.config.upstream.address,
            timeout: app.config.upstream.connect_timeout.min(PROBE_TIMEOUT_MAX),
            last: Mutex::new(None),
        };
        AdminApp {
            slot,
            probe,
            certs: None,
        }
    }

    /// `POST /admin/reload` reloads `certs` too, as `SIGHUP` does.
    pub fn with_certs(mut self, certs: Option<Arc<CertStore>>) -> Self {
        self.certs = certs;
        self
    }

    /// The app now: the real one once bound.
    fn app(&self) -> Arc<App> {
        self.slot.current()
    }

    fn authorize(&self, session: &ServerSession) -> Result<(), Denied> {
        let Some(token) = &self.app().config.admin.token else {
            return Err(Denied::Disabled);
        };
        let presented = session
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
            Ok(())
        } else {
            Err(Denied::WrongToken)
        }
    }

    /// Ready when the application is built (it is, or this listener would
    /// not be open), this process owns its store (not `fenced`, lease
    /// renewed) and the gateway accepts connections.
    async fn ready(&self) -> Response<Vec<u8>> {
        let readiness = self.slot.readiness();
        if readiness != Readiness::Serving {
            return text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {}\n", readiness.as_str()),
            );
        }
        if let Err(reason) = self.app().ownership() {
            return text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {reason}\n"),
            );
        }
        let probe = self.probe.check().await;
        self.app().metrics.upstream_up.set(probe.is_ok() as i64);
        match probe {
            Ok(()) => text_response(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(reason) => text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {reason}\n"),
            ),
        }
    }

    async fn metrics(&self) -> Response<Vec<u8>> {
        let up = self.probe.check().await.is_ok();
        let app = self.app();
        let m = &app.metrics;
        m.upstream_up.set(up as i64);
        // The stand-in of a successor has no ledger: the gauges keep what
        // they last said until the real one is bound.
        if !app.is_standby() {
            m.observe_ledger(&app.ledger, &app.config.metrics.balance_accounts);
        }
        text_response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            m.render(),
        )
    }

    fn account(&self, name: &str) -> Response<Vec<u8>> {
        match self.app().ledger.account(name) {
            Some(v) => json_response(
                StatusCode::OK,
                json!({
                    "name": v.name,
                    "parent": v.parent,
                    "role": v.role.as_str(),
                    "tariff_class": v.tariff_class,
                    "anytime": { "available": format_credits(v.anytime.available_milli()), "posted": format_credits(v.anytime.posted_milli), "reserved": format_credits(v.anytime.reserved_milli) },
                    "offpeak": { "available": format_credits(v.offpeak.available_milli()), "posted": format_credits(v.offpeak.posted_milli), "reserved": format_credits(v.offpeak.reserved_milli) },
                }),
            ),
            None => error(StatusCode::NOT_FOUND, "unknown account"),
        }
    }

    fn reservations(&self, query: &str) -> Response<Vec<u8>> {
        let state = match query_param(query, "state").as_deref() {
            Some("in_doubt") => Some(ReservationState::InDoubt),
            Some("open") => Some(ReservationState::Open),
            Some("delivery") => Some(ReservationState::Delivery),
            None | Some("") | Some("all") => None,
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "state must be open, in_doubt, delivery or all",
                )
            }
        };
        let list: Vec<_> = self
            .app()
            .ledger
            .reservations(state)
            .iter()
            .map(reservation_json)
            .collect();
        json_response(StatusCode::OK, json!({ "reservations": list }))
    }

    /// An operator's decision on an in-doubt reservation: post its whole
    /// total, or void it. Open reservations belong to a request still in
    /// flight (or to the TTL sweep) and are refused, so an operator cannot
    /// race a settlement. Like every acknowledged change it waits for the
    /// store (back-pressure before, durability after, SPEC 6).
    async fn resolve(&self, id: &str, how: &str) -> Response<Vec<u8>> {
        let Ok(id) = id.parse::<u64>() else {
            return error(StatusCode::BAD_REQUEST, "reservation id must be a number");
        };
        let id = ReservationId(id);
        if how != "post" && how != "void" {
            return error(StatusCode::NOT_FOUND, "use /post or /void");
        }
        let Some(r) = self.app().ledger.reservation(id) else {
            // Ids are entry sequence numbers: one below the next was issued.
            return if id.0 < self.app().ledger.next_seq() {
                error(
                    StatusCode::CONFLICT,
                    "the reservation is already resolved (a reservation resolves at most once)",
                )
            } else {
                error(StatusCode::NOT_FOUND, "no such reservation")
            };
        };
        if r.state == ReservationState::Delivery {
            return error(
                StatusCode::CONFLICT,
                "the reservation is a delivery hold (charge_on: delivery); its delivery report or dlr.timeout_s resolves it",
            );
        }
        if r.state != ReservationState::InDoubt {
            return error(
                StatusCode::CONFLICT,
                "the reservation is open (its request is in flight); only in-doubt reservations can be resolved",
            );
        }
        if self.app().admit_change().await.is_err() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable: the store is behind; nothing was changed, try again",
            );
        }
        let result = if how == "post" {
            self.app().ledger.settle(id, r.total_milli, Some("admin"))
        } else {
            self.app().ledger.void(id)
        };
        match result {
            Ok(s) => {
                if self.app().change_durable().await.is_err() {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "store_unavailable: resolved in memory but not yet durable; it is committed when the store recovers",
                    );
                }
                tracing::info!(
                    target: "tollgate::admin",
                    reservation_id = id.0,
                    account = %r.account,
                    how,
                    posted_milli = s.posted_milli,
                    voided_milli = s.voided_milli,
                    "in-doubt reservation resolved by an operator"
                );
                json_response(
                    StatusCode::OK,
                    json!({ "id": id.0, "account": r.account, "posted": format_credits(s.posted_milli), "voided": format_credits(s.voided_milli) }),
                )
            }
            Err(e) => error(StatusCode::CONFLICT, &e.to_string()),
        }
    }

    async fn reload(&self) -> Response<Vec<u8>> {
        let app = self.app();
        let before = app.snapshot.load().tariff.version().to_string();
        let certs = self.certs.clone();
        // File I/O and parsing (100 000+ prefixes) stay off the admin
        // runtime's only thread.
        let reloaded = match tokio::task::spawn_blocking(move || {
            crate::reload::reload_all(&app, certs.as_deref())
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("reload failed: {e}"),
                )
            }
        };
        let tls = reloaded.certificate.map(|c| match c {
            CertReload::Unchanged => json!({ "result": "unchanged" }),
            CertReload::Swapped { serial } => json!({ "result": "swapped", "serial": serial }),
            CertReload::Refused(e) => json!({ "result": "refused", "error": e.to_string() }),
        });
        match reloaded.tariff {
            Ok(version) => json_response(
                StatusCode::OK,
                json!({ "tariff_version": version, "changed": version != before, "tls_certificate": tls }),
            ),
            Err(e) => json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({ "error": e.to_string(), "tariff_version": before, "tls_certificate": tls }),
            ),
        }
    }

    fn quote(&self, query: &str) -> Response<Vec<u8>> {
        let recipient = query_param(query, "recipient").unwrap_or_default();
        let text = query_param(query, "text").unwrap_or_default();
        let message_type = query_param(query, "messagetype").unwrap_or_else(|| "SMS:TEXT".into());
        let class = query_param(query, "class");
        let snapshot = self.app().snapshot.load();
        let quote = snapshot.tariff.quote(&QuoteRequest {
            recipient: &recipient,
            text: &text,
            message_type: &message_type,
            class: class.as_deref(),
            at_unix_ms: self.app().clock.now_unix_ms(),
        });
        match quote {
            Ok(q) => json_response(
                StatusCode::OK,
                serde_json::Value::Object(
                    quote_fields(&q, snapshot.tariff.version())
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                ),
            ),
            Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        }
    }
}

/// A quote's fields, named and worded the same in the admin API's JSON and
/// in `tollgate quote`'s lines: amounts in credits, the bucket preference
/// as `anytime` or `offpeak_first`, `matched_prefix` null when the default
/// price applied.
pub fn quote_fields(q: &Quote, tariff_version: &str) -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("tariff_version", json!(tariff_version)),
        ("normalised", json!(q.normalised)),
        ("matched_prefix", json!(q.matched_prefix)),
        ("encoding", json!(q.encoding.as_str())),
        ("parts", json!(q.parts)),
        ("units", json!(q.units)),
        (
            "price_per_part",
            json!(format_credits(q.price_per_part_milli)),
        ),
        ("bucket", json!(q.bucket.as_str())),
        ("total", json!(format_credits(q.total_milli))),
    ]
}

impl AdminApp {
    /// `GET /admin/outbox?state=gave_up|pending|done&limit=N`: outbox items
    /// (targets and errors; bodies are not shown).
    async fn outbox(&self, query: &str) -> Response<Vec<u8>> {
        let app = self.app();
        let Some(outbox) = &app.outbox else {
            return error(
                StatusCode::NOT_FOUND,
                "no outbox: neither dlr.enabled nor notify.low_balance is set",
            );
        };
        let state = match query_param(query, "state").as_deref() {
            None | Some("") => crate::outbox::ItemState::GaveUp,
            Some(s) => match crate::outbox::ItemState::parse(s) {
                Some(st) => st,
                None => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "state must be pending, done or gave_up",
                    )
                }
            },
        };
        let limit = query_param(query, "limit")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(100)
            .clamp(1, 1000);
        match outbox.list(state, limit).await {
            Ok(items) => json_response(
                StatusCode::OK,
                json!({
                    "state": state.as_str(),
                    "items": items.iter().map(|i| json!({
                        "id": i.id,
                        "kind": i.kind,
                        "target": i.target,
                        "attempts": i.attempts,
                        "created_unix_ms": i.created_unix_ms,
                        "next_attempt_unix_ms": i.next_attempt_unix_ms,
                        "last_error": i.last_error,
                    })).collect::<Vec<_>>(),
                }),
            ),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    /// Every admin request gets an access line like the proxy's (target
    /// `tollgate::access`, `front_door=admin`): who asked what, and what
    /// came of it. The bearer token is a header and never logged; message
    /// text in a quote's query shows only its length.
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let started = Instant::now();
        let answer = self.route(session).await;
        let req = session.req_header();
        tracing::info!(
            target: "tollgate::access",
            front_door = "admin",
            status = answer.status().as_u16(),
            latency_us = started.elapsed().as_micros() as u64,
            method = req.method.as_str(),
            url = %redacted_url(
                req.uri.path(),
                req.uri.query(),
                self.app().config.log.message_text
            ),
            client = session.client_addr().map(|a| a.to_string()).as_deref(),
        );
        answer
    }
}

impl AdminApp {
    async fn route(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => {
                return text_response(StatusCode::OK, "text/plain", "ok\n".into())
            }
            ("GET", "/readyz") => return self.ready().await,
            ("GET", "/metrics") => return self.metrics().await,
            _ => {}
        }
        if !path.starts_with("/admin/") {
            return error(StatusCode::NOT_FOUND, "not found");
        }
        match self.authorize(session) {
            Ok(()) => {}
            Err(Denied::Disabled) => {
                return error(
                    StatusCode::FORBIDDEN,
                    "the admin API is disabled: set admin.token in the configuration",
                )
            }
            Err(Denied::WrongToken) => {
                return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")
            }
        }
        let readiness = self.slot.readiness();
        if readiness != Readiness::Serving {
            // No ledger yet, or it is going to the successor: nothing to
            // read or change here.
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "{}: the ledger is not served by this process now",
                    readiness.as_str()
                ),
            );
        }
        let segments: Vec<&str> = path.trim_start_matches("/admin/").split('/').collect();
        match (method.as_str(), segments.as_slice()) {
            ("GET", ["accounts", name]) => self.account(name),
            ("GET", ["reservations"]) => self.reservations(&query),
            ("POST", ["reservations", id, how]) => self.resolve(id, how).await,
            ("POST", ["reload"]) => self.reload().await,
            ("GET", ["quote"]) => self.quote(&query),
            ("GET", ["outbox"]) => self.outbox(&query).await,
            (
                _,
                ["accounts", _]
                | ["reservations"]
                | ["reservations", _, _]
                | ["reload"]
                | ["quote"]
                | ["outbox"],
            ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }
}
