//! The admin listener (default `127.0.0.1:9601`): health, metrics and the
//! operator API (SPEC 8, 9).
//!
//! `/healthz`, `/readyz` and `/metrics` are open (bind the listener to
//! loopback); everything under `/admin/` needs `Authorization: Bearer
//! TOKEN`, compared in constant time. With no token configured the
//! `/admin/` endpoints answer 403. Never echoes a token or a password.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::ledger::{ReservationId, ReservationState, ReservationView};
use crate::money::format_credits;
use crate::service::{now_unix_ms, App};
use crate::tariff::QuoteRequest;

pub struct AdminApp {
    pub app: Arc<App>,
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
        "state": match r.state { ReservationState::Open => "open", ReservationState::InDoubt => "in_doubt" },
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

impl AdminApp {
    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(token) = &self.app.config.admin.token else {
            return false;
        };
        let presented = session
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        presented.as_bytes().ct_eq(token.as_bytes()).into()
    }

    fn metrics(&self) -> Response<Vec<u8>> {
        let m = &self.app.metrics;
        let reservations = self.app.ledger.reservations(None);
        let in_doubt = reservations
            .iter()
            .filter(|r| r.state == ReservationState::InDoubt)
            .count();
        m.reservations_open
            .set((reservations.len() - in_doubt) as i64);
        m.reservations_in_doubt.set(in_doubt as i64);
        m.accounts.set(self.app.ledger.len() as i64);
        text_response(StatusCode::OK, "text/plain; version=0.0.4", m.render())
    }

    fn account(&self, name: &str) -> Response<Vec<u8>> {
        match self.app.ledger.account(name) {
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

    fn resolve(&self, id: &str, how: &str) -> Response<Vec<u8>> {
        let Ok(id) = id.parse::<u64>() else {
            return error(StatusCode::BAD_REQUEST, "reservation id must be a number");
        };
        let id = ReservationId(id);
        let result = match how {
            "post" => match self.app.ledger.reservation(id) {
                Some(r) => self.app.ledger.settle(id, r.total_milli, Some("admin")),
                None => return error(StatusCode::NOT_FOUND, "no such open reservation"),
            },
            "void" => self.app.ledger.void(id),
            _ => return error(StatusCode::NOT_FOUND, "use /post or /void"),
        };
        match result {
            Ok(s) => json_response(
                StatusCode::OK,
                json!({ "id": id.0, "posted": format_credits(s.posted_milli), "voided": format_credits(s.voided_milli) }),
            ),
            Err(e) => error(StatusCode::CONFLICT, &e.to_string()),
        }
    }

    fn quote(&self, query: &str) -> Response<Vec<u8>> {
        let recipient = query_param(query, "recipient").unwrap_or_default();
        let text = query_param(query, "text").unwrap_or_default();
        let message_type = query_param(query, "messagetype").unwrap_or_else(|| "SMS:TEXT".into());
        let class = query_param(query, "class");
        let snapshot = self.app.snapshot.load();
        let quote = snapshot.tariff.quote(&QuoteRequest {
            recipient: &recipient,
            text: &text,
            message_type: &message_type,
            class: class.as_deref(),
            at_unix_ms: now_unix_ms(),
        });
        match quote {
            Ok(q) => json_response(
                StatusCode::OK,
                json!({
                    "encoding": q.encoding.as_str(),
                    "parts": q.parts,
                    "units": q.units,
                    "normalised": q.normalised,
                    "matched_prefix": q.matched_prefix,
                    "price_per_part": format_credits(q.price_per_part_milli),
                    "bucket": match q.bucket { crate::ledger::BucketPreference::AnytimeOnly => "anytime", crate::ledger::BucketPreference::OffPeakFirst => "offpeak_first" },
                    "total": format_credits(q.total_milli),
                    "tariff_version": snapshot.tariff.version(),
                }),
            ),
            Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => {
                return text_response(StatusCode::OK, "text/plain", "ok\n".into())
            }
            ("GET", "/readyz") => {
                return text_response(StatusCode::OK, "text/plain", "ready\n".into())
            }
            ("GET", "/metrics") => return self.metrics(),
            _ => {}
        }
        if !path.starts_with("/admin/") {
            return error(StatusCode::NOT_FOUND, "not found");
        }
        if !self.authorized(session) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        }
        let segments: Vec<&str> = path.trim_start_matches("/admin/").split('/').collect();
        match (method.as_str(), segments.as_slice()) {
            ("GET", ["accounts", name]) => self.account(name),
            ("GET", ["reservations"]) => {
                let state = match query_param(&query, "state").as_deref() {
                    Some("in_doubt") => Some(ReservationState::InDoubt),
                    Some("open") => Some(ReservationState::Open),
                    None | Some("") | Some("all") => None,
                    Some(_) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "state must be open, in_doubt or all",
                        )
                    }
                };
                let list: Vec<_> = self
                    .app
                    .ledger
                    .reservations(state)
                    .iter()
                    .map(reservation_json)
                    .collect();
                json_response(StatusCode::OK, json!({ "reservations": list }))
            }
            ("POST", ["reservations", id, how]) => self.resolve(id, how),
            ("GET", ["quote"]) => self.quote(&query),
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }
}
