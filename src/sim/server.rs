//! HTTP handling: the hyper service, Ozeki API actions and the `/sim/`
//! control endpoints.
//!
//! Order of work for an API request: read the whole body → count and record
//! it → take an armed fault → apply latency → apply the fault or answer the
//! action. Control endpoints (`/sim/…`) are never recorded, delayed or
//! faulted.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, SERVER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::params::{split_recipients, Params};
use super::render::{self, AcceptReport, Echo};
use super::state::{FaultMode, RequestRecord, SimState};

/// The `Server` header the real gateway sends.
pub const SERVER_HEADER: &str = "OzekiNG/3.0.1 Microsoft-HTTPAPI/1.0";
/// How long the `hang` fault holds a request.
pub const HANG: Duration = Duration::from_secs(60);
/// Paths on which the Ozeki API is served (and everything below them).
pub use super::params::API_PATHS;
/// Upper bound on `messagecount` (Ozeki batches are at most 20 000).
const MAX_BATCH: usize = 100_000;

/// Ozeki-style error codes of the simulator's `<errorcode>`.
pub mod errcode {
    pub const AUTH_FAILED: u32 = 1;
    pub const ACCESS_DENIED: u32 = 2;
    pub const UNKNOWN_USER: u32 = 3;
    pub const INVALID_VALUE: u32 = 4;
    pub const NO_RECIPIENT: u32 = 5;
    pub const NO_ACTION: u32 = 6;
}

/// Error type of the service; returning one makes hyper drop the connection.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Response body type.
pub type Body = Full<Bytes>;

const XML: &str = "application/xml";
const HTML: &str = "text/html";
const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(SERVER, HeaderValue::from_static(SERVER_HEADER));
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    respond(status, JSON, value.to_string())
}

/// Who sent a request, for the log.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub conn: u64,
    pub remote: SocketAddr,
}

/// The hyper service function: one call per request.
pub async fn handle(
    req: Request<Incoming>,
    state: Arc<SimState>,
    conn: ConnInfo,
) -> Result<Response<Body>, BoxError> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let path = parts.uri.path();
    if path == "/sim" || path.starts_with("/sim/") {
        return Ok(control(
            &state,
            &parts.method,
            path,
            parts.uri.query(),
            &body,
        ));
    }
    let resp = api(&state, parts, body, conn).await;
    if state.verbose {
        match &resp {
            Ok(r) => tracing::info!(conn = conn.conn, status = r.status().as_u16(), "answered"),
            Err(e) => tracing::info!(conn = conn.conn, error = %e, "dropped connection"),
        }
    }
    resp
}

/// The parameters of an API request: the query, then the body — as
/// `multipart/form-data` fields when it says so (PHP's curl sends arrays of
/// fields that way), and as a form whatever else its `Content-Type` claims.
/// Ozeki's documentation shows plain GETs and HTML-form POSTs and says
/// nothing of content types; clients omit or mislabel them, and nothing
/// says the gateway checks, so the simulator reads every body (it must
/// never be stricter than the gateway). A multipart body that cannot be
/// split is read as a form.
async fn api_params(headers: &http::HeaderMap, query: &str, body: &Bytes) -> Params {
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    if let Some(boundary) = content_type.and_then(|ct| multer::parse_boundary(ct).ok()) {
        if let Some(fields) = multipart_fields(body, boundary).await {
            return Params::with_fields(query.as_bytes(), fields);
        }
    }
    Params::parse(query.as_bytes(), Some(&body[..]))
}

async fn multipart_fields(body: &Bytes, boundary: String) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut multipart = multer::Multipart::with_reader(&body[..], boundary);
    let mut fields = Vec::new();
    while let Some(field) = multipart.next_field().await.ok()? {
        let name = field.name().unwrap_or("").as_bytes().to_vec();
        let value = field.bytes().await.ok()?.to_vec();
        fields.push((name, value));
    }
    Some(fields)
}

/// One message of a `sendmessage` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    pub index: Option<usize>,
    pub recipient: String,
    pub messagetype: String,
    pub messagedata: String,
}

/// Expands a `sendmessage` request into one entry per recipient: the batch
/// form (`messagecount=N`, `recipientI`…) or the plain recipient list.
pub fn collect_messages(p: &Params) -> Vec<OutMessage> {
    let default_type = p.get_nonempty("messagetype").unwrap_or("SMS:TEXT");
    let default_data = p.get("messagedata").unwrap_or("");
    let count = p
        .get_nonempty("messagecount")
        .and_then(|c| c.parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_BATCH);
    let mut out = Vec::new();
    if count > 0 {
        for i in 0..count {
            let Some(list) = p.get(&format!("recipient{i}")) else {
                continue;
            };
            let mtype = p
                .get_nonempty(&format!("messagetype{i}"))
                .unwrap_or(default_type);
            let mdata = p.get(&format!("messagedata{i}")).unwrap_or(default_data);
            out.extend(split_recipients(list).map(|r| OutMessage {
                index: Some(i),
                recipient: r.to_string(),
                messagetype: mtype.to_string(),
                messagedata: mdata.to_string(),
            }));
        }
    }
    if out.is_empty() {
        if let Some(list) = p.get("recipient") {
            out.extend(split_recipients(list).map(|r| OutMessage {
                index: None,
                recipient: r.to_string(),
                messagetype: default_type.to_string(),
                messagedata: default_data.to_string(),
            }));
        }
    }
    out
}

async fn api(
    state: &Arc<SimState>,
    parts: http::request::Parts,
    body: Bytes,
    conn: ConnInfo,
) -> Result<Response<Body>, BoxError> {
    state.counters.requests.fetch_add(1, Ordering::Relaxed);
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    // The API paths read the query and the body; any other path still
    // takes an `action` from its query (more lenient than the gateway is
    // known to be, never less).
    let api_path = super::params::is_api_path(path);
    let params = if api_path {
        api_params(&parts.headers, query, &body).await
    } else {
        Params::parse(query.as_bytes(), None)
    };
    let action = params.action();
    let is_api = api_path || action.is_some();
    let messages = match action.as_deref() {
        Some("sendmessage") => collect_messages(&params),
        _ => Vec::new(),
    };
    let fault = state.take_fault();
    if fault.is_some() {
        state.counters.faults.fetch_add(1, Ordering::Relaxed);
    }
    if state.verbose {
        tracing::info!(
            conn = conn.conn,
            method = %parts.method,
            path,
            action = action.as_deref().unwrap_or(""),
            body_len = body.len(),
            fault = ?fault,
            "request"
        );
    }
    if state.record {
        state.record(RequestRecord {
            seq: state.next_seq(),
            conn: conn.conn,
            remote: conn.remote.to_string(),
            method: parts.method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            body: body.clone(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            action: action.clone(),
            recipients: messages.len(),
            fault,
        });
    }

    let latency = state.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match fault {
        None => {}
        Some(FaultMode::Reset) => return Err("ozeki-sim: simulated connection reset".into()),
        Some(FaultMode::Http500) => {
            return Ok(respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                HTML,
                render::http_error_html(500, "Internal Server Error"),
            ))
        }
        Some(FaultMode::Http503) => {
            return Ok(respond(
                StatusCode::SERVICE_UNAVAILABLE,
                HTML,
                render::http_error_html(503, "Service Unavailable"),
            ))
        }
        Some(FaultMode::Garbage) => return Ok(respond(StatusCode::OK, XML, "<<garbage")),
        Some(FaultMode::Hang) => tokio::time::sleep(HANG).await,
        Some(FaultMode::Delay(d)) => tokio::time::sleep(d).await,
    }

    if !is_api {
        return Ok(respond(
            StatusCode::NOT_FOUND,
            TEXT,
            format!("ozeki-sim: 404 not found: {} {}\n", parts.method, path),
        ));
    }
    let Some(action) = action else {
        return Ok(respond(
            StatusCode::OK,
            XML,
            render::error_xml("", "Missing action parameter", errcode::NO_ACTION),
        ));
    };
    let Some(user) = state.authenticate(params.get("username"), params.get("password")) else {
        return Ok(respond(
            StatusCode::OK,
            XML,
            render::error_xml(
                &action,
                "Invalid username or password",
                errcode::AUTH_FAILED,
            ),
        ));
    };
    let resp = match action.as_str() {
        "sendmessage" => {
            let (resp, accepted) = sendmessage(state, &params, messages);
            if let Some(template) = params.get_nonempty("reporturl") {
                let calls = super::dlr::plan(&state.dlr, template, &accepted);
                if !calls.is_empty() {
                    let deliver = super::dlr::deliver(state.clone(), calls);
                    if state.dlr.early.load(Ordering::Relaxed) {
                        // Reports before the send's answer.
                        deliver.await;
                    } else {
                        tokio::spawn(deliver);
                    }
                }
            }
            resp
        }
        "getcredits" | "setcredits" | "addcredits" => credits(state, &params, &action, &user),
        "receivemessage" => {
            let limit = params
                .get_nonempty("limit")
                .and_then(|l| l.parse::<usize>().ok());
            respond(
                StatusCode::OK,
                XML,
                render::receive_xml(&state.take_inbox(limit)),
            )
        }
        _ => {
            let hash = blake3::hash(&body).to_hex();
            let echo = Echo {
                method: parts.method.as_str(),
                path,
                query,
                query_len: query.len(),
                body_len: body.len(),
                body_blake3: hash.as_str(),
            };
            respond(StatusCode::OK, XML, render::generic_xml(&action, &echo))
        }
    };
    Ok(resp)
}

fn sendmessage(
    state: &SimState,
    p: &Params,
    messages: Vec<OutMessage>,
) -> (Response<Body>, Vec<super::dlr::Accepted>) {
    state.counters.sendmessage.fetch_add(1, Ordering::Relaxed);
    if messages.is_empty() {
        let resp = respond(
            StatusCode::OK,
            XML,
            render::error_xml(
                "sendmessage",
                "No recipient specified",
                errcode::NO_RECIPIENT,
            ),
        );
        return (resp, Vec::new());
    }
    let mut accepted = 0;
    let reports: Vec<AcceptReport> = messages
        .into_iter()
        .map(|m| {
            let rejected = state.is_rejected(&m.recipient);
            if !rejected {
                accepted += 1;
            }
            AcceptReport {
                index: m.index,
                statuscode: if rejected { 11 } else { 0 },
                statusmessage: if rejected {
                    render::INVALID_RECIPIENT
                } else {
                    render::ACCEPTED
                },
                messageid: if rejected {
                    String::new()
                } else {
                    state.next_message_id()
                },
                recipient: m.recipient,
                messagetype: m.messagetype,
                messagedata: m.messagedata,
            }
        })
        .collect();
    let c = &state.counters;
    c.messages_accepted.fetch_add(accepted, Ordering::Relaxed);
    c.messages_rejected
        .fetch_add(reports.len() as u64 - accepted, Ordering::Relaxed);
    let html = p
        .get_nonempty("responseformat")
        .is_some_and(|f| f.eq_ignore_ascii_case("html"));
    let originator = p.get("originator").unwrap_or("").to_string();
    let for_reports = reports
        .iter()
        .filter(|r| r.statuscode == 0)
        .map(|r| super::dlr::Accepted {
            message_id: r.messageid.clone(),
            recipient: r.recipient.clone(),
            originator: originator.clone(),
            messagedata: r.messagedata.clone(),
        })
        .collect();
    let resp = if html {
        respond(StatusCode::OK, HTML, render::send_html(&reports))
    } else {
        respond(StatusCode::OK, XML, render::send_xml(&reports))
    };
    (resp, for_reports)
}

fn credits(
    state: &SimState,
    p: &Params,
    action: &str,
    caller: &super::state::User,
) -> Response<Body> {
    let err =
        |msg: &str, code: u32| respond(StatusCode::OK, XML, render::error_xml(action, msg, code));
    let target = p.get_nonempty("useraccount").unwrap_or(&caller.name);
    if (action != "getcredits" || target != caller.name) && !caller.admin {
        return err("Access denied", errcode::ACCESS_DENIED);
    }
    let change: Option<Box<dyn FnOnce(i64) -> i64>> = match action {
        "setcredits" => match p.get_nonempty("newbalance") {
            None => None,
            Some(v) => match v.parse::<i64>() {
                Ok(n) => Some(Box::new(move |_| n)),
                Err(_) => return err("Invalid newbalance value", errcode::INVALID_VALUE),
            },
        },
        "addcredits" => match p.get_nonempty("add").map(str::parse::<i64>) {
            Some(Ok(n)) => Some(Box::new(move |b: i64| b.saturating_add(n))),
            _ => return err("Invalid add value", errcode::INVALID_VALUE),
        },
        _ => None,
    };
    let balance = state.with_user(target, |u| {
        if let Some(f) = change {
            u.balance = f(u.balance);
        }
        u.balance
    });
    match balance {
        Some(b) => respond(StatusCode::OK, XML, render::credits_xml(action, target, b)),
        None => err("Unknown user account", errcode::UNKNOWN_USER),
    }
}

/// The `/sim/…` control endpoints.
fn control(
    state: &SimState,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Response<Body> {
    let p = Params::parse(query.unwrap_or("").as_bytes(), Some(body));
    match control_action(state, method, path, &p) {
        Ok(resp) => resp,
        Err(message) => json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": message }),
        ),
    }
}

/// Performs one control request; `Err` is a 400 with that message.
fn control_action(
    state: &SimState,
    method: &Method,
    path: &str,
    p: &Params,
) -> Result<Response<Body>, String> {
    let num = |name: &str| -> Result<Option<u64>, String> {
        p.get_nonempty(name)
            .map(|v| v.parse::<u64>())
            .transpose()
            .map_err(|_| format!("{name} must be a non-negative integer"))
    };
    let ok = || json(StatusCode::OK, &serde_json::json!({"ok": true}));
    let post = *method == Method::POST;
    Ok(match (path, post) {
        ("/sim/requests", false) => json(StatusCode::OK, &state.requests_json()),
        ("/sim/stats", false) => json(StatusCode::OK, &state.stats_json()),
        ("/sim/health", false) => ok(),
        ("/sim/reset", true) => {
            state.reset();
            ok()
        }
        ("/sim/fault", true) => {
            let count = num("count")?.unwrap_or(1);
            let mode = FaultMode::parse(p.get("mode").unwrap_or(""), num("ms")?)?;
            state.arm_fault(mode, count);
            ok()
        }
        ("/sim/latency", true) => {
            let ms = num("ms")?.ok_or("ms=N is required")?;
            state.set_latency_ms(ms);
            ok()
        }
        ("/sim/dlr", false) => json(StatusCode::OK, &state.dlr.calls_json()),
        ("/sim/dlr", true) => {
            if p.get_nonempty("reset").is_some() {
                state.dlr.reset();
            } else {
                let outcome = p.get_nonempty("outcome").unwrap_or("delivered").to_string();
                state.dlr.add_rule(super::dlr::DlrRule {
                    prefix: p.get("prefix").unwrap_or("").to_string(),
                    outcome,
                    delay_ms: num("delay_ms")?.unwrap_or(0),
                    duplicates: u32::try_from(num("duplicates")?.unwrap_or(0).min(100))
                        .unwrap_or(0),
                    parts: u32::try_from(num("parts")?.unwrap_or(0).min(16)).unwrap_or(0),
                });
            }
            ok()
        }
        ("/sim/dlr/hold", true) => {
            let on = p.get_nonempty("on").ok_or("on=1 or on=0 is required")?;
            state.dlr.hold(on == "1" || on == "true");
            ok()
        }
        ("/sim/dlr/mode", true) => {
            let flag = |n: &str| p.get_nonempty(n).is_some_and(|v| v == "1" || v == "true");
            state.dlr.reverse.store(flag("reverse"), Ordering::Relaxed);
            state.dlr.early.store(flag("early"), Ordering::Relaxed);
            ok()
        }
        ("/sim/inbox", true) => {
            let count = num("count")?.unwrap_or(1);
            state.add_inbox(
                usize::try_from(count).unwrap_or(usize::MAX).min(1_000_000),
                p.get_nonempty("recipient"),
                p.get("messagedata"),
            );
            ok()
        }
        ("/sim/requests" | "/sim/stats" | "/sim/health", true)
        | ("/sim/reset" | "/sim/fault" | "/sim/latency" | "/sim/inbox", false) => json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": format!("{method} not allowed on {path}")}),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("no such control endpoint: {method} {path}")}),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_recipient_list() {
        let p = Params::parse(b"recipient=%2B361,362;363&messagedata=hi", None);
        let m = collect_messages(&p);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].recipient, "+361");
        assert_eq!(m[2].messagetype, "SMS:TEXT");
        assert!(m.iter().all(|m| m.index.is_none() && m.messagedata == "hi"));
    }

    #[test]
    fn batch_messages_carry_indexes() {
        let p = Params::parse(
            b"messagecount=3&recipient0=1&messagedata0=a&recipient1=2,3&messagetype1=SMS:FLASH&messagedata1=b&recipient2=4",
            None,
        );
        let m = collect_messages(&p);
        let got: Vec<_> = m
            .iter()
            .map(|m| {
                (
                    m.index,
                    m.recipient.as_str(),
                    m.messagetype.as_str(),
                    m.messagedata.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (Some(0), "1", "SMS:TEXT", "a"),
                (Some(1), "2", "SMS:FLASH", "b"),
                (Some(1), "3", "SMS:FLASH", "b"),
                (Some(2), "4", "SMS:TEXT", ""),
            ]
        );
    }

    #[test]
    fn no_recipients() {
        assert!(collect_messages(&Params::parse(b"messagedata=x", None)).is_empty());
        assert!(collect_messages(&Params::parse(b"recipient=,;", None)).is_empty());
    }

    #[tokio::test]
    async fn every_body_is_read_whatever_its_content_type() {
        let body = Bytes::from_static(b"action=sendmessage&recipient=1");
        for ct in [
            None,
            Some("application/x-www-form-urlencoded; charset=utf-8"),
            Some("text/plain"),
            Some("application/json"),
            Some("multipart/form-data; boundary=not-there"),
        ] {
            let mut h = http::HeaderMap::new();
            if let Some(ct) = ct {
                h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            }
            let p = api_params(&h, "", &body).await;
            assert_eq!(p.action().as_deref(), Some("sendmessage"), "{ct:?}");
        }
        let mut h = http::HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=XY"),
        );
        let body = Bytes::from_static(
            b"--XY\r\nContent-Disposition: form-data; name=\"Action\"\r\n\r\nsendMessage\r\n\
              --XY\r\nContent-Disposition: form-data; name=\"recipient\"\r\n\r\n+361\r\n--XY--\r\n",
        );
        let p = api_params(&h, "username=john", &body).await;
        assert_eq!(p.action().as_deref(), Some("sendmessage"));
        assert_eq!(p.get("recipient"), Some("+361"));
        assert_eq!(p.get("username"), Some("john"));
    }
}
