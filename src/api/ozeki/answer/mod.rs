//! Reads the gateway's answer to a `sendmessage` (SPEC 1.3 step 8) so each
//! message's reservation can be posted or voided.
//!
//! Owns the tolerant parsing of both answer shapes (XML `<acceptreport>`s and
//! the HTML `Status code:` lines) and the matching of reports to the
//! messages tollgate priced. It must never guess: anything it cannot read
//! with certainty is an error or an unmatched message, which the caller
//! treats as *in doubt* (kept reserved), never as accepted or rejected.
//!
//! Layout: this file dispatches on the answer's shape. `xml` reads the XML
//! shape (without DTD processing): `fast`, a direct scan of plain answers,
//! first, quick-xml for the rest; both feed `report`, which says what a
//! report is. `html` reads the HTML shape; `matching` pairs reports with
//! the messages sent.

use thiserror::Error;

use html::parse_html;
use xml::parse_xml;

mod fast;
mod html;
mod matching;
mod report;
#[cfg(test)]
mod tests;
mod xml;

pub use matching::match_reports;

/// Largest answer body parsed; a larger one is in doubt as a whole.
pub const ANSWER_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Longest error detail, so a hostile body cannot bloat logs.
const DETAIL_MAX_LEN: usize = 160;

/// The gateway's verdict on one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptReport {
    /// From an index-suffixed element (`statuscode3` → 3), batch answers only.
    pub index: Option<usize>,
    pub recipient: Option<String>,
    /// 0 is accepted; anything else rejected.
    pub status_code: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AnswerError {
    #[error("answer is neither Ozeki XML nor HTML")]
    NotXml,
    #[error("malformed answer: {0}")]
    Malformed(String),
    #[error("answer larger than {ANSWER_MAX_BYTES} bytes")]
    TooLarge,
    #[error("answer carries no accept report")]
    NoReports,
}

fn malformed(detail: impl std::fmt::Display) -> AnswerError {
    AnswerError::Malformed(bounded_detail(detail))
}

/// An error detail cut to `DETAIL_MAX_LEN` bytes on a character boundary:
/// details quote gateway output, which must not bloat logs.
pub(crate) fn bounded_detail(detail: impl std::fmt::Display) -> String {
    let mut text = detail.to_string();
    if text.len() > DETAIL_MAX_LEN {
        let mut end = DETAIL_MAX_LEN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Parses a `sendmessage` answer body into its accept reports, in document
/// order (per report, index order for suffixed elements).
pub fn parse_send_answer(body: &[u8]) -> Result<Vec<AcceptReport>, AnswerError> {
    if body.len() > ANSWER_MAX_BYTES {
        return Err(AnswerError::TooLarge);
    }
    let start = body
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(body)
        .trim_ascii_start();
    let is_html = || contains(body, b"Status code:");
    if looks_like_xml(start) {
        match parse_xml(body) {
            // XHTML declared as XML: read it as the HTML shape.
            Err(AnswerError::NoReports) if is_html() => parse_html(body),
            other => other,
        }
    } else if is_html() {
        parse_html(body)
    } else {
        Err(AnswerError::NotXml)
    }
}

fn looks_like_xml(start: &[u8]) -> bool {
    const XML_STARTS: [&[u8]; 4] = [
        b"<?xml",
        b"<response",
        b"<!DOCTYPE smsapi",
        b"<!DOCTYPE response",
    ];
    XML_STARTS.iter().any(|p| {
        start
            .get(..p.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(p))
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
