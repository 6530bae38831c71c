//! The delivery-report listener (`dlr.listen`, path `/dlr/<token>`): the
//! gateway calls it with the values of the keywords tollgate asked for.
//!
//! Reads only the request line and headers (a `GET`, as the gateway calls
//! a URL template; a `POST` is read the same way, its body ignored);
//! refuses with `413` a request target longer than
//! `dlr.callback_max_bytes` or a body announced larger, `404` anything
//! but `/dlr/<token>`, `405` other methods. Never logs the token.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::protocols::http::ServerSession;

use super::Dlr;

/// The callback listener's app. `dlr` gives the watcher of the process
/// that serves credit now: `None` while a successor is still taking the
/// store over (the callback is then refused 503, and the gateway retries).
pub struct CallbackApp {
    pub dlr: Box<dyn Fn() -> Option<Arc<Dlr>> + Send + Sync>,
}

/// The listener of `dlr.listen`. The gateway calls each report on a new
/// connection, so what a connection costs is paid per report: pingora's
/// default 64 KiB L4 read buffer, allocated and zeroed for every accepted
/// connection, was the largest single cost of a callback (callgrind, about
/// 68 000 instructions of ~240 000 per report). The HTTP/1 reader has its
/// own header buffer, so reads go straight to the socket; the write side
/// keeps pingora's default (header and body leave in one segment).
pub fn listener(addr: &str) -> ListenerConfig {
    ListenerConfig::tcp(addr).l4_buffer(L4BufferSettings::default().read(0))
}

fn text(status: u16, body: &str) -> Response<Vec<u8>> {
    let body = body.as_bytes().to_vec();
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("Content-Type", "text/plain")
        .header("Content-Length", body.len())
        .body(body)
        .expect("static response parts are valid")
}

#[async_trait]
impl ServeHttp for CallbackApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let Some(dlr) = (self.dlr)() else {
            return text(503, "not serving yet\n");
        };
        let max = dlr.config.callback_max_bytes;
        let head = session.req_header();
        let target_len = head.uri.path().len() + head.uri.query().map_or(0, str::len);
        let announced = head
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if target_len > max || announced > max {
            dlr.metrics
                .dlr_refused
                .with_label_values(&["too_large"])
                .inc();
            return text(413, "callback too large\n");
        }
        let method = head.method.as_str().to_string();
        let path = head.uri.path().to_string();
        let query = head.uri.query().unwrap_or("").to_string();
        let Some(token) = path.strip_prefix("/dlr/").filter(|t| !t.contains('/')) else {
            return text(404, "not found\n");
        };
        if method != "GET" && method != "POST" {
            return text(405, "method not allowed\n");
        }
        let answer = dlr.report(token, &query).await;
        text(answer.status, answer.text)
    }
}
