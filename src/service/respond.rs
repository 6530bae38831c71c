//! Every answer the service gives, in one place: a [`Reply`] is what the
//! proxy writes, byte for byte; a [`Refusal`] is a value (an error code, a
//! text, an HTTP status, a `Retry-After`), rendered into each door's shape
//! by [`refuse`] — Ozeki XML (or one refusing report per message of a
//! send), Boxis XML/JSON, a SOAP Fault or a SOAP operation failure of the
//! client's version, or plain text. (linkerd2-proxy's `errors/respond.rs`
//! is the model: code deciding *that* a request is refused never builds an
//! answer itself.)
//!
//! Every locally made answer carries the gateway's `Server` header and an
//! exact `Content-Length`, so a client cannot tell who answered. This
//! module decides nothing and touches no balance.

use std::time::Duration;

use bytes::Bytes;
use pingora::http::ResponseHeader;

use crate::api::boxis::{render as boxis_render, ReturnType};
use crate::api::ozeki::command::{ResponseFormat, SendMessage};
use crate::api::ozeki::render as ozeki_render;
use crate::api::soap::{
    balance_response, fault, give_credit_response, BalanceAnswer, Balances, FaultKind,
    GiveCreditAnswer, OperationName, SoapVersion,
};
use crate::error::ErrorCode;
use crate::ledger::AccountView;
use crate::limits;
use crate::service::Outcome;

/// The `Server` header of the gateway we stand in for (SPEC 1.5); local
/// answers carry it so a client cannot tell who answered.
pub const SERVER_HEADER: &str = "OzekiNG/3.0.1 Microsoft-HTTPAPI/1.0";

pub const CONTENT_TYPE_XML: &str = "application/xml";
pub const CONTENT_TYPE_HTML: &str = "text/html";
pub const CONTENT_TYPE_TEXT: &str = "text/plain";

/// HTTP status of every SOAP Fault (ASMX answers both versions so).
pub const SOAP_FAULT_STATUS: u16 = 500;

/// What the access line and the metrics say about a request, beyond its
/// outcome. Absent values are left out of the line rather than faked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessLog {
    /// The action's label (a closed set: see `service::action_label`).
    pub action: &'static str,
    /// The account the client named (logged, never a metric label).
    pub account: Option<String>,
    /// What the request cost, or would have cost when it was refused.
    pub cost_milli: Option<i64>,
    /// A send's reservation, so a log line joins the ledger's entries.
    pub reservation_id: Option<u64>,
    pub upstream_status: Option<u16>,
    pub upstream_latency: Option<Duration>,
}

/// The answer to one request, as the proxy writes it.
#[derive(Debug)]
pub struct Reply {
    pub header: Box<ResponseHeader>,
    pub body: Bytes,
    pub outcome: Outcome,
    /// Close the connection after this answer.
    pub close: bool,
    pub log: AccessLog,
}

impl Reply {
    /// A locally made answer: the gateway's `Server`, the type, the length.
    pub fn local(
        status: u16,
        content_type: &str,
        body: impl Into<Bytes>,
        outcome: Outcome,
    ) -> Reply {
        let body = body.into();
        let mut header = ResponseHeader::build(status, Some(5)).expect("a valid status");
        let fields = [("Server", SERVER_HEADER), ("Content-Type", content_type)];
        for (name, value) in fields {
            header
                .insert_header(name, value)
                .expect("static header values are valid");
        }
        header
            .insert_header("Content-Length", body.len().to_string())
            .expect("a number is a valid header value");
        Reply {
            header: Box::new(header),
            body,
            outcome,
            close: false,
            log: AccessLog::default(),
        }
    }

    /// Adds (or replaces) a header. Values tollgate makes are always
    /// valid; an invalid one (a bug) is dropped with a warning.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        if let Err(e) = self.header.insert_header(name, value.into()) {
            tracing::warn!(header = name, error = %e, "an answer header was not valid");
        }
        self
    }

    /// The same answer with `action` as its access-line label.
    pub fn for_action(mut self, action: &'static str) -> Reply {
        self.log.action = action;
        self
    }

    pub fn status(&self) -> u16 {
        self.header.status.as_u16()
    }
}

/// Why a request is refused, and how to say it (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    /// The text shown to the client; never carries request data or secrets.
    pub text: String,
    /// The HTTP status; `None`: the door's usual one (200 for application
    /// errors, as the gateway and the vendors answer them; 500 for a SOAP
    /// Fault).
    pub status: Option<u16>,
    pub retry_after_s: Option<u64>,
    /// The outcome label; `None`: `Refused(code)`.
    pub outcome: Option<Outcome>,
}

impl Refusal {
    /// `code` with its usual client message.
    pub fn new(code: ErrorCode) -> Refusal {
        Refusal::with_text(code, code.message())
    }

    /// `code` with the text `text`.
    pub fn with_text(code: ErrorCode, text: impl Into<String>) -> Refusal {
        Refusal {
            code,
            text: text.into(),
            status: None,
            retry_after_s: None,
            outcome: None,
        }
    }

    /// `code` with the symbolic name as its text (what the Ozeki credit
    /// actions have always answered).
    pub fn named(code: ErrorCode) -> Refusal {
        Refusal::with_text(code, code.name())
    }

    /// `invalid_request` with a detail after the usual message.
    pub fn invalid(detail: impl std::fmt::Display) -> Refusal {
        let code = ErrorCode::InvalidRequest;
        Refusal::with_text(code, format!("{}: {detail}", code.message()))
    }

    /// A limit refused the request (SPEC 7): HTTP 429 with `Retry-After`.
    pub fn limited(limit: limits::Refusal) -> Refusal {
        Refusal {
            status: Some(429),
            retry_after_s: Some(limit.retry_after_s),
            ..Refusal::new(ErrorCode::RateLimited)
        }
    }

    pub fn status(mut self, status: u16) -> Refusal {
        self.status = Some(status);
        self
    }

    pub fn outcome(mut self, outcome: Outcome) -> Refusal {
        self.outcome = Some(outcome);
        self
    }

    pub fn text(mut self, text: impl Into<String>) -> Refusal {
        self.text = text.into();
        self
    }
}

impl From<ErrorCode> for Refusal {
    fn from(code: ErrorCode) -> Refusal {
        Refusal::new(code)
    }
}

/// The shape a door answers a refusal in.
#[derive(Debug, Clone, Copy)]
pub enum Shape<'a> {
    /// An Ozeki error answer (`<errormessage>`, `<errorcode>`) echoing
    /// `action`.
    Ozeki {
        action: &'a str,
    },
    /// A refused Ozeki send: one refusing report per message, in the
    /// send's response format.
    OzekiSend(&'a SendMessage),
    Boxis {
        return_type: ReturnType,
        now_s: i64,
    },
    /// A SOAP Fault of `version`.
    SoapFault {
        version: SoapVersion,
        kind: FaultKind,
    },
    /// A SOAP operation that ran and failed: `…Result` false, the code, and
    /// the balances the caller may see (left out otherwise, never zeros).
    SoapOperation {
        version: SoapVersion,
        operation: OperationName,
        parent: Option<&'a AccountView>,
        sub: Option<&'a AccountView>,
    },
    /// Plain text (requests that are no door's).
    Plain,
}

/// Renders `refusal` in `shape`.
pub fn refuse(shape: Shape<'_>, refusal: Refusal) -> Reply {
    let code = refusal.code;
    let text = &refusal.text;
    let (status, content_type, body) = match shape {
        Shape::Ozeki { action } => (
            200,
            CONTENT_TYPE_XML,
            ozeki_render::error_answer(action, code, text),
        ),
        Shape::OzekiSend(send) => (
            200,
            match send.format {
                ResponseFormat::Html => CONTENT_TYPE_HTML,
                ResponseFormat::Xml => CONTENT_TYPE_XML,
            },
            ozeki_render::send_refusal(&send.messages, send.batch, send.format, code, text),
        ),
        Shape::Boxis { return_type, now_s } => {
            tracing::debug!(code = code.name(), reason = %text, "boxis request refused");
            (
                200,
                boxis_render::content_type(return_type),
                boxis_render::error(return_type, code, Some(text), now_s),
            )
        }
        Shape::SoapFault { version, kind } => (
            SOAP_FAULT_STATUS,
            version.content_type(),
            fault(version, kind, text),
        ),
        Shape::SoapOperation {
            version,
            operation,
            parent,
            sub,
        } => {
            let balances = |v: Option<&AccountView>| {
                v.map(|v| Balances {
                    anytime_milli: v.anytime.available_milli(),
                    offpeak_milli: v.offpeak.available_milli(),
                })
            };
            let body = match operation {
                OperationName::GetBalance => balance_response(
                    version,
                    &BalanceAnswer {
                        ok: false,
                        balances: balances(parent),
                        result_text: text.to_string(),
                        code: code.code(),
                    },
                ),
                OperationName::SubAccountGiveCredit => give_credit_response(
                    version,
                    &GiveCreditAnswer {
                        ok: false,
                        parent: balances(parent),
                        sub: balances(sub),
                        result_text: text.to_string(),
                        code: code.code(),
                    },
                ),
            };
            (200, version.content_type(), body)
        }
        Shape::Plain => (code_status(code), CONTENT_TYPE_TEXT, format!("{text}\n")),
    };
    let outcome = refusal.outcome.unwrap_or(Outcome::Refused(code));
    let mut reply = Reply::local(
        refusal.status.unwrap_or(status),
        content_type,
        body,
        outcome,
    );
    if let Some(s) = refusal.retry_after_s {
        reply = reply.with_header("Retry-After", s.to_string());
    }
    reply
}

/// The HTTP status a plain-text refusal carries.
fn code_status(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::RateLimited => 429,
        ErrorCode::AuthFailed => 401,
        ErrorCode::Forbidden => 403,
        ErrorCode::StoreUnavailable => 503,
        ErrorCode::UpstreamUnavailable => 502,
        _ => 400,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_carries_the_gateways_server_header_and_an_exact_length() {
        let shapes = [
            Shape::Ozeki {
                action: "getcredits",
            },
            Shape::Boxis {
                return_type: ReturnType::Json,
                now_s: 1,
            },
            Shape::SoapFault {
                version: SoapVersion::V12,
                kind: FaultKind::Client,
            },
            Shape::SoapOperation {
                version: SoapVersion::V11,
                operation: OperationName::GetBalance,
                parent: None,
                sub: None,
            },
            Shape::Plain,
        ];
        for shape in shapes {
            let r = refuse(shape, Refusal::new(ErrorCode::AuthFailed));
            let h = &r.header.headers;
            assert_eq!(h.get("server").unwrap(), SERVER_HEADER, "{shape:?}");
            assert_eq!(
                h.get("content-length").unwrap().to_str().unwrap(),
                r.body.len().to_string()
            );
            assert_eq!(r.outcome, Outcome::Refused(ErrorCode::AuthFailed));
        }
    }

    #[test]
    fn limits_refuse_with_429_and_retry_after() {
        let limit = limits::Refusal {
            rule: limits::Rule::SourceIp,
            retry_after_s: 7,
        };
        let r = refuse(
            Shape::Ozeki {
                action: "getcredits",
            },
            Refusal::limited(limit),
        );
        assert_eq!(r.status(), 429);
        assert_eq!(r.header.headers.get("retry-after").unwrap(), "7");
        assert_eq!(r.outcome, Outcome::Refused(ErrorCode::RateLimited));
        let fault = refuse(
            Shape::SoapFault {
                version: SoapVersion::V11,
                kind: FaultKind::Client,
            },
            Refusal::new(ErrorCode::InvalidRequest),
        );
        assert_eq!(fault.status(), 500);
        assert_eq!(
            refuse(Shape::Plain, Refusal::new(ErrorCode::StoreUnavailable)).status(),
            503
        );
    }
}
