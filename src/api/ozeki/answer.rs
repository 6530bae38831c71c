//! Reads the gateway's answer to a `sendmessage` (SPEC 1.3 step 8) so each
//! message's reservation can be posted or voided.
//!
//! Owns the tolerant parsing of both answer shapes (XML `<acceptreport>`s and
//! the HTML `Status code:` lines) and the matching of reports to the
//! messages tollgate priced. It must never guess: anything it cannot read
//! with certainty is an error or an unmatched message, which the caller
//! treats as *in doubt* (kept reserved), never as accepted or rejected.
//!
//! XML is read with quick-xml without DTD processing: the DOCTYPE line is
//! skipped, only the five predefined entities and character references are
//! expanded, and an unknown entity makes the answer malformed.

use std::collections::{BTreeMap, HashMap, VecDeque};

use quick_xml::events::Event;
use quick_xml::Reader;
use thiserror::Error;

use super::command::OutgoingMessage;

/// Largest answer body parsed; a larger one is in doubt as a whole.
pub const ANSWER_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Deepest element nesting accepted (Ozeki's answers are 4 levels deep).
const MAX_DEPTH: usize = 32;
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

/// Which report field an element carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    StatusCode,
    Recipient,
}

/// Splits an element name like `statuscode12` into its field and index.
/// Case-insensitive; names of other elements give `None`.
fn field_of(name: &[u8]) -> Option<(Field, Option<usize>)> {
    for (prefix, field) in [
        (&b"statuscode"[..], Field::StatusCode),
        (b"recipient", Field::Recipient),
    ] {
        if name.len() >= prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(prefix) {
            let suffix = &name[prefix.len()..];
            if suffix.is_empty() {
                return Some((field, None));
            }
            return parse_suffix(suffix).map(|i| (field, Some(i)));
        }
    }
    None
}

/// A canonical decimal index suffix (`0`, `12`, not `012`).
fn parse_suffix(suffix: &[u8]) -> Option<usize> {
    let canonical = !suffix.is_empty()
        && suffix.len() <= 9
        && suffix.iter().all(u8::is_ascii_digit)
        && (suffix == b"0" || suffix[0] != b'0');
    if !canonical {
        return None;
    }
    std::str::from_utf8(suffix).ok()?.parse().ok()
}

fn is_acceptreport(name: &[u8]) -> bool {
    const NAME: &[u8] = b"acceptreport";
    name.len() >= NAME.len()
        && name[..NAME.len()].eq_ignore_ascii_case(NAME)
        && parse_suffix(&name[NAME.len()..]).is_some() == (name.len() > NAME.len())
}

/// Fields gathered for one index inside one `<acceptreport>`.
#[derive(Default)]
struct Partial {
    status_code: Option<i64>,
    recipient: Option<String>,
}

/// The `<acceptreport>` being read: one partial per index, since a batch
/// answer may carry several suffixed sets in one report element.
#[derive(Default)]
struct OpenReport {
    depth: usize,
    by_index: BTreeMap<Option<usize>, Partial>,
}

/// The field element whose text is being collected.
struct Capture {
    field: Field,
    index: Option<usize>,
    text: String,
}

fn parse_xml(body: &[u8]) -> Result<Vec<AcceptReport>, AnswerError> {
    // Nearly every answer is plain: elements without attributes, text
    // without entities. Those are read by a direct scan (several times
    // cheaper than quick-xml); anything else, and anything the scan finds
    // wrong, goes to quick-xml, whose verdict (and error) stands.
    if let Some(reports) = parse_plain_xml(body) {
        return Ok(reports);
    }
    let mut reader = Reader::from_reader(body);
    let mut builder = ReportBuilder::default();
    loop {
        let event = reader.read_event().map_err(malformed)?;
        match event {
            Event::Start(e) => builder.start(e.local_name().as_ref())?,
            Event::Empty(e) => builder.empty(e.local_name().as_ref())?,
            Event::Text(t) => {
                if builder.capturing() {
                    builder.text(&t.unescape().map_err(malformed)?);
                }
            }
            Event::CData(t) => {
                if builder.capturing() {
                    builder.text(&t.decode().map_err(malformed)?);
                }
            }
            Event::End(_) => builder.end()?,
            Event::Eof => break,
            // The DOCTYPE is skipped, never interpreted; comments, PIs and
            // the declaration carry nothing we need.
            Event::DocType(_) | Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
        }
    }
    builder.finish()
}

/// The direct scan of a plain answer: an optional declaration and DOCTYPE
/// (without an internal subset), then only start, end and empty-element
/// tags with plain names and no attributes, and text without `&`. `None`
/// for anything else, or for any error: the full parser decides those.
fn parse_plain_xml(body: &[u8]) -> Option<Vec<AcceptReport>> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let mut rest = body.trim_ascii_start();
    if rest.starts_with(b"<?xml") {
        let close = memchr::memmem::find(rest, b"?>")?;
        rest = rest[close + 2..].trim_ascii_start();
    }
    if rest.starts_with(b"<!DOCTYPE") {
        let close = memchr::memchr(b'>', rest)?;
        if memchr::memchr(b'[', &rest[..close]).is_some() {
            return None;
        }
        rest = &rest[close + 1..];
    }
    let plain_name = |n: &[u8]| {
        !n.is_empty()
            && n.iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    let mut builder = ReportBuilder::default();
    let mut open: Vec<&[u8]> = Vec::new();
    loop {
        let lt = memchr::memchr(b'<', rest).unwrap_or(rest.len());
        let (between, tail) = rest.split_at(lt);
        if builder.capturing() {
            if memchr::memchr(b'&', between).is_some() {
                return None;
            }
            builder.text(std::str::from_utf8(between).ok()?);
        } else if memchr::memchr(b'&', between).is_some() || !between.is_ascii() {
            // Outside fields only the full parser judges text.
            return None;
        }
        if tail.is_empty() {
            break;
        }
        let gt = memchr::memchr(b'>', tail)?;
        let tag = &tail[1..gt];
        rest = &tail[gt + 1..];
        if let Some(name) = tag.strip_prefix(b"/") {
            if open.pop() != Some(name) {
                return None;
            }
            builder.end().ok()?;
        } else if let Some(name) = tag.strip_suffix(b"/") {
            if !plain_name(name) {
                return None;
            }
            builder.empty(name).ok()?;
        } else {
            if !plain_name(tag) {
                return None;
            }
            open.push(tag);
            builder.start(tag).ok()?;
        }
    }
    if !open.is_empty() {
        return None;
    }
    builder.finish().ok()
}

/// Turns a stream of XML events into accept reports; shared by both ways
/// of reading an answer so they cannot disagree on what a report is.
#[derive(Default)]
struct ReportBuilder {
    reports: Vec<AcceptReport>,
    depth: usize,
    open: Option<OpenReport>,
    capture: Option<Capture>,
}

impl ReportBuilder {
    fn capturing(&self) -> bool {
        self.capture.is_some()
    }

    fn start(&mut self, name: &[u8]) -> Result<(), AnswerError> {
        if self.capture.is_some() {
            return Err(malformed("element inside a report field"));
        }
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(malformed("nesting too deep"));
        }
        if is_acceptreport(name) {
            if self.open.is_some() {
                return Err(malformed("nested acceptreport"));
            }
            self.open = Some(OpenReport {
                depth: self.depth,
                ..Default::default()
            });
        } else if self.open.is_some() {
            if let Some((field, index)) = field_of(name) {
                self.capture = Some(Capture {
                    field,
                    index,
                    text: String::new(),
                });
            }
        }
        Ok(())
    }

    fn empty(&mut self, name: &[u8]) -> Result<(), AnswerError> {
        if is_acceptreport(name) {
            return Err(malformed("empty acceptreport"));
        }
        if let (Some(report), Some((field, index))) = (self.open.as_mut(), field_of(name)) {
            store_field(
                report,
                Capture {
                    field,
                    index,
                    text: String::new(),
                },
            )?;
        }
        Ok(())
    }

    fn text(&mut self, text: &str) {
        if let Some(c) = self.capture.as_mut() {
            c.text.push_str(text);
        }
    }

    fn end(&mut self) -> Result<(), AnswerError> {
        if let Some(c) = self.capture.take() {
            let report = self
                .open
                .as_mut()
                .ok_or_else(|| malformed("field outside report"))?;
            store_field(report, c)?;
        } else if self.open.as_ref().is_some_and(|r| r.depth == self.depth) {
            let report = self.open.take().unwrap_or_default();
            finish_report(report, &mut self.reports)?;
        }
        self.depth = self.depth.saturating_sub(1);
        Ok(())
    }

    fn finish(self) -> Result<Vec<AcceptReport>, AnswerError> {
        if self.depth != 0 || self.open.is_some() {
            return Err(malformed("answer is truncated"));
        }
        if self.reports.is_empty() {
            return Err(AnswerError::NoReports);
        }
        Ok(self.reports)
    }
}

fn store_field(report: &mut OpenReport, capture: Capture) -> Result<(), AnswerError> {
    let partial = report.by_index.entry(capture.index).or_default();
    let text = capture.text.trim();
    match capture.field {
        Field::StatusCode => {
            if partial.status_code.is_some() {
                return Err(malformed("duplicate statuscode in one report"));
            }
            let code = text
                .parse::<i64>()
                .map_err(|_| malformed("statuscode is not an integer"))?;
            partial.status_code = Some(code);
        }
        Field::Recipient => {
            if partial.recipient.is_some() {
                return Err(malformed("duplicate recipient in one report"));
            }
            partial.recipient = Some(text.to_string());
        }
    }
    Ok(())
}

fn finish_report(report: OpenReport, out: &mut Vec<AcceptReport>) -> Result<(), AnswerError> {
    if report.by_index.is_empty() {
        return Err(malformed("acceptreport without statuscode"));
    }
    for (index, partial) in report.by_index {
        let status_code = partial
            .status_code
            .ok_or_else(|| malformed("acceptreport without statuscode"))?;
        let recipient = partial.recipient.filter(|r| !r.is_empty());
        out.push(AcceptReport {
            index,
            recipient,
            status_code,
        });
    }
    Ok(())
}

/// The HTML shape: tags are line breaks; the i-th `Status code:` line pairs
/// with the i-th `Recipient:` line. If there are recipient lines but not as
/// many as status lines, the pairing is unknowable: malformed.
fn parse_html(body: &[u8]) -> Result<Vec<AcceptReport>, AnswerError> {
    let text = String::from_utf8_lossy(body);
    let mut lines = String::with_capacity(text.len());
    let mut in_tag = false;
    for c in text.chars() {
        match (in_tag, c) {
            (false, '<') => {
                in_tag = true;
                lines.push('\n');
            }
            (true, '>') => in_tag = false,
            (false, c) => lines.push(c),
            (true, _) => {}
        }
    }
    let mut codes = Vec::new();
    let mut recipients = Vec::new();
    for line in lines.lines() {
        let line = line.trim();
        if let Some(rest) = strip_prefix_ignore_case(line, "status code:") {
            let code = unescape_html(rest)
                .trim()
                .parse::<i64>()
                .map_err(|_| malformed("Status code is not an integer"))?;
            codes.push(code);
        } else if let Some(rest) = strip_prefix_ignore_case(line, "recipient:") {
            recipients.push(unescape_html(rest).trim().to_string());
        }
    }
    if codes.is_empty() {
        return Err(AnswerError::NoReports);
    }
    if !recipients.is_empty() && recipients.len() != codes.len() {
        return Err(malformed("Status code and Recipient lines do not pair up"));
    }
    let mut recipients = recipients.into_iter();
    Ok(codes
        .into_iter()
        .map(|status_code| AcceptReport {
            index: None,
            recipient: recipients.next().filter(|r| !r.is_empty()),
            status_code,
        })
        .collect())
}

fn strip_prefix_ignore_case<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    let head = line.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &line[prefix.len()..])
}

/// Expands the few entities that can appear in a recipient or code.
fn unescape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let decoded = rest.find(';').filter(|&end| end <= 10).and_then(|end| {
            let c = match &rest[1..end] {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some(' '),
                e => e
                    .strip_prefix("#x")
                    .or_else(|| e.strip_prefix("#X"))
                    .map(|h| u32::from_str_radix(h, 16))
                    .or_else(|| e.strip_prefix('#').map(str::parse))
                    .and_then(Result::ok)
                    .and_then(char::from_u32),
            }?;
            Some((c, end + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Per message: `Some(true)` accepted (status 0), `Some(false)` rejected,
/// `None` no usable report (the caller keeps that reservation in doubt).
///
/// Non-batch: reports are matched by recipient, exactly first, then by
/// digits only (`+3620…` = `003620…` = `3620…`); each report and each
/// message is used once, in order, so duplicated recipients pair up in
/// order. Batch: by index; a report without index falls back to its
/// recipient. A message with contradicting reports (same index, different
/// outcomes, or an index whose recipient is not that message's) gets `None`.
pub fn match_reports(
    messages: &[OutgoingMessage],
    batch: bool,
    reports: &[AcceptReport],
) -> Vec<Option<bool>> {
    let mut slots = vec![Slot::Free; messages.len()];
    let mut by_recipient = Vec::with_capacity(reports.len());
    for report in reports {
        let accepted = report.status_code == 0;
        match (batch, report.index) {
            (true, Some(i)) if i < messages.len() => {
                let consistent = report.recipient.as_deref().is_none_or(|r| {
                    r == messages[i].recipient
                        || normalise(r)
                            .is_some_and(|n| Some(n) == normalise(&messages[i].recipient))
                });
                slots[i] = match (slots[i], consistent) {
                    (Slot::Free, true) => Slot::Set(accepted),
                    (Slot::Set(prev), true) if prev == accepted => Slot::Set(prev),
                    _ => Slot::Conflict,
                };
            }
            (true, Some(_)) => {} // an index we never sent: ignored
            _ => {
                if let Some(r) = report.recipient.as_deref() {
                    by_recipient.push((r, accepted));
                }
            }
        }
    }
    match_by_recipient(messages, &mut slots, &by_recipient);
    slots
        .into_iter()
        .map(|s| match s {
            Slot::Set(accepted) => Some(accepted),
            Slot::Free | Slot::Conflict => None,
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    Set(bool),
    Conflict,
}

/// Assigns recipient-keyed reports to free slots: an exact pass, then a
/// digits-only pass for the leftovers. Queues keep this O(messages + reports)
/// for 20 000-recipient answers.
fn match_by_recipient(messages: &[OutgoingMessage], slots: &mut [Slot], reports: &[(&str, bool)]) {
    if reports.is_empty() {
        return;
    }
    let mut exact: HashMap<&str, VecDeque<usize>> = HashMap::new();
    let mut digits: HashMap<String, VecDeque<usize>> = HashMap::new();
    for (i, m) in messages.iter().enumerate() {
        if slots[i] == Slot::Free {
            exact.entry(m.recipient.as_str()).or_default().push_back(i);
            if let Some(n) = normalise(&m.recipient) {
                digits.entry(n).or_default().push_back(i);
            }
        }
    }
    let take = |queue: Option<&mut VecDeque<usize>>, slots: &[Slot]| {
        let queue = queue?;
        while let Some(i) = queue.pop_front() {
            if slots[i] == Slot::Free {
                return Some(i);
            }
        }
        None
    };
    let mut leftovers = Vec::new();
    for &(recipient, accepted) in reports {
        match take(exact.get_mut(recipient), slots) {
            Some(i) => slots[i] = Slot::Set(accepted),
            None => leftovers.push((recipient, accepted)),
        }
    }
    for (recipient, accepted) in leftovers {
        let Some(key) = normalise(recipient) else {
            continue;
        };
        if let Some(i) = take(digits.get_mut(&key), slots) {
            slots[i] = Slot::Set(accepted);
        }
    }
}

/// Digits only, without an international `00` prefix; `None` if no digit.
fn normalise(recipient: &str) -> Option<String> {
    let digits: String = recipient.chars().filter(char::is_ascii_digit).collect();
    let digits = match digits.strip_prefix("00") {
        Some(rest) if recipient.trim_start().starts_with("00") => rest.to_string(),
        _ => digits,
    };
    (!digits.is_empty()).then_some(digits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ozeki::command::ResponseFormat;
    use crate::api::ozeki::render::send_refusal;
    use crate::error::ErrorCode;
    use proptest::prelude::*;

    fn msg(recipient: &str) -> OutgoingMessage {
        OutgoingMessage {
            recipient: recipient.into(),
            message_type: "SMS:TEXT".into(),
            text: "hi".into(),
        }
    }

    fn report(index: Option<usize>, recipient: Option<&str>, status_code: i64) -> AcceptReport {
        AcceptReport {
            index,
            recipient: recipient.map(str::to_string),
            status_code,
        }
    }

    const PROLOG: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\r\n\
        <!DOCTYPE smsapi PUBLIC \"-//OZEKI//DTD XML 1.0//EN\" \"http://www.ozekisms.com/DTD/smsapi.xml\">\r\n";

    #[test]
    fn spec_single_recipient_example() {
        let body = format!(
            "{PROLOG}<response><action>sendmessage</action><data>\
             <acceptreport><statuscode>0</statuscode><statusmessage>Message accepted for \
             delivery</statusmessage><messageid>ERFAV23D</messageid><recipient>+36201234567</recipient>\
             </acceptreport></data></response>"
        );
        assert_eq!(
            parse_send_answer(body.as_bytes()).unwrap(),
            vec![report(None, Some("+36201234567"), 0)]
        );
    }

    #[test]
    fn multi_recipient_with_bom_whitespace_and_entities() {
        let body = format!(
            "\u{FEFF}\n  {PROLOG}<response>\n<action>sendmessage</action>\n<data>\n\
             <acceptreport>\n<statuscode> 0 </statuscode>\n<recipient>&#43;361</recipient>\n</acceptreport>\n\
             <!-- a comment -->\
             <acceptreport>\n<statuscode>-5</statuscode>\n<statusmessage>Bad &amp; sad</statusmessage>\n\
             <recipient><![CDATA[362]]></recipient>\n</acceptreport>\n\
             <AcceptReport><StatusCode>7</StatusCode><recipient/></AcceptReport>\n\
             </data>\n</response>\n"
        );
        assert_eq!(
            parse_send_answer(body.as_bytes()).unwrap(),
            vec![
                report(None, Some("+361"), 0),
                report(None, Some("362"), -5),
                report(None, None, 7)
            ]
        );
    }

    #[test]
    fn batch_indexed_reports() {
        let body = format!(
            "{PROLOG}<response><action>sendmessage</action><data>\
             <acceptreport><statuscode0>0</statuscode0><messageid0>A</messageid0><recipient0>361</recipient0></acceptreport>\
             <acceptreport><statuscode1>3</statuscode1><recipient1>362</recipient1></acceptreport>\
             </data></response>"
        );
        assert_eq!(
            parse_send_answer(body.as_bytes()).unwrap(),
            vec![
                report(Some(0), Some("361"), 0),
                report(Some(1), Some("362"), 3)
            ]
        );
        // All indexed sets inside a single acceptreport are read too.
        let body =
            "<response><acceptreport><statuscode1>0</statuscode1><statuscode0>2</statuscode0>\
                    <recipient0>a</recipient0></acceptreport></response>";
        assert_eq!(
            parse_send_answer(body.as_bytes()).unwrap(),
            vec![report(Some(0), Some("a"), 2), report(Some(1), None, 0)]
        );
    }

    #[test]
    fn html_answer() {
        let body = "<html><body>\n\
            <p>Message accepted for delivery<br>\nStatus code: 0<br>\nMessage ID: ERFAV23D<br>\nRecipient: +36201234567<br></p>\n\
            <p>Message rejected<br>\nstatus code: 12<br>\nMessage ID: <br>\nRecipient: &#43;36301234567<br/></p>\n\
            </body></html>";
        assert_eq!(
            parse_send_answer(body.as_bytes()).unwrap(),
            vec![
                report(None, Some("+36201234567"), 0),
                report(None, Some("+36301234567"), 12)
            ]
        );
        let unpaired = "<p>Status code: 0<br>Status code: 0<br>Recipient: 1</p>";
        assert!(matches!(
            parse_send_answer(unpaired.as_bytes()),
            Err(AnswerError::Malformed(_))
        ));
        let bad = "<p>Status code: zero<br>Recipient: 1</p>";
        assert!(matches!(
            parse_send_answer(bad.as_bytes()),
            Err(AnswerError::Malformed(_))
        ));
    }

    #[test]
    fn garbage_and_broken_answers() {
        type Expect = fn(&AnswerError) -> bool;
        let cases: &[(&[u8], Expect)] = &[
            (b"", |e| *e == AnswerError::NotXml),
            (b"Internal Server Error", |e| *e == AnswerError::NotXml),
            (b"\xff\xfe\x00<", |e| *e == AnswerError::NotXml),
            (b"<?xml version=\"1.0\"?><response><data></data></response>", |e| *e == AnswerError::NoReports),
            (b"<response><acceptreport><statuscode>0</statuscode>", |e| matches!(e, AnswerError::Malformed(_))),
            (b"<response><acceptreport><statuscode>x</statuscode></acceptreport></response>", |e| matches!(e, AnswerError::Malformed(_))),
            (b"<response><acceptreport><statuscode></statuscode></acceptreport></response>", |e| matches!(e, AnswerError::Malformed(_))),
            (b"<response><acceptreport><recipient>1</recipient></acceptreport></response>", |e| matches!(e, AnswerError::Malformed(_))),
            (b"<response><acceptreport><statuscode>0</statuscode><statuscode>1</statuscode></acceptreport></response>", |e| matches!(e, AnswerError::Malformed(_))),
            (b"<response><acceptreport><statuscode>0</statuscode></acceptreportx></response>", |e| matches!(e, AnswerError::Malformed(_))),
            (b"<response><acceptreport><statuscode>&xxe;</statuscode></acceptreport></response>", |e| matches!(e, AnswerError::Malformed(_))),
        ];
        for (body, ok) in cases {
            let got = parse_send_answer(body);
            assert!(
                got.as_ref().is_err_and(ok),
                "{:?} → {got:?}",
                String::from_utf8_lossy(body)
            );
        }
        let too_big = vec![b' '; ANSWER_MAX_BYTES + 1];
        assert_eq!(parse_send_answer(&too_big), Err(AnswerError::TooLarge));
    }

    #[test]
    fn doctype_with_internal_subset_is_not_expanded() {
        let body = b"<?xml version=\"1.0\"?>\n<!DOCTYPE response [<!ENTITY z \"0\">]>\n\
            <response><acceptreport><statuscode>&z;</statuscode><recipient>1</recipient></acceptreport></response>";
        assert!(matches!(
            parse_send_answer(body),
            Err(AnswerError::Malformed(_))
        ));
    }

    #[test]
    fn match_by_recipient_exact_then_digits() {
        let m = [
            msg("+36201234567"),
            msg("36301234567"),
            msg("0036401234567"),
            msg("+3650"),
        ];
        let r = [
            report(None, Some("36201234567"), 0),
            report(None, Some("+36301234567"), 4),
            report(None, Some("+36401234567"), 0),
            report(None, Some("+999"), 0),
        ];
        assert_eq!(
            match_reports(&m, false, &r),
            vec![Some(true), Some(false), Some(true), None]
        );
    }

    #[test]
    fn duplicated_recipients_pair_in_order() {
        let m = [msg("+361"), msg("+362"), msg("+361"), msg("+361")];
        let r = [
            report(None, Some("+361"), 0),
            report(None, Some("361"), 9),
            report(None, Some("+362"), 0),
        ];
        assert_eq!(
            match_reports(&m, false, &r),
            vec![Some(true), Some(true), Some(false), None]
        );
        // Exact matches are taken before digit-only ones, whatever the order.
        let m = [msg("361"), msg("+361")];
        let r = [report(None, Some("+361"), 1), report(None, Some("361"), 0)];
        assert_eq!(match_reports(&m, false, &r), vec![Some(true), Some(false)]);
    }

    #[test]
    fn missing_reports_are_none() {
        let m = [msg("1"), msg("2"), msg("3")];
        assert_eq!(
            match_reports(&m, false, &[report(None, Some("2"), 0)]),
            vec![None, Some(true), None]
        );
        assert_eq!(
            match_reports(&m, false, &[report(None, None, 0)]),
            vec![None, None, None]
        );
        assert_eq!(match_reports(&m, true, &[]), vec![None, None, None]);
    }

    #[test]
    fn batch_matches_by_index_with_recipient_fallback() {
        let m = [msg("+361"), msg("+361"), msg("363"), msg("364")];
        let r = [
            report(Some(1), Some("361"), 0),
            report(Some(0), None, 5),
            report(None, Some("363"), 0),
            report(Some(9), Some("364"), 0), // out of range: ignored
        ];
        assert_eq!(
            match_reports(&m, true, &r),
            vec![Some(false), Some(true), Some(true), None]
        );
        // Contradictions make the message in doubt.
        let r = [
            report(Some(0), None, 0),
            report(Some(0), None, 1),
            report(Some(1), Some("999"), 0),
        ];
        assert_eq!(match_reports(&m, true, &r), vec![None, None, None, None]);
        // Non-batch requests ignore indices and use recipients.
        let r = [report(Some(3), Some("363"), 0)];
        assert_eq!(
            match_reports(&m, false, &r),
            vec![None, None, Some(true), None]
        );
    }

    #[test]
    fn large_batch_matches_quickly() {
        let m: Vec<_> = (0..20_000).map(|i| msg(&format!("+36{i}"))).collect();
        let r: Vec<_> = (0..20_000)
            .rev()
            .map(|i| report(None, Some(&format!("36{i}")), i % 2))
            .collect();
        let out = match_reports(&m, false, &r);
        assert!(out.iter().enumerate().all(|(i, o)| *o == Some(i % 2 == 0)));
    }

    /// quick-xml alone, bypassing the direct scan.
    fn full_parse(body: &[u8]) -> Option<Vec<AcceptReport>> {
        let mut reader = Reader::from_reader(body);
        let mut builder = ReportBuilder::default();
        loop {
            match reader.read_event().ok()? {
                Event::Start(e) => builder.start(e.local_name().as_ref()).ok()?,
                Event::Empty(e) => builder.empty(e.local_name().as_ref()).ok()?,
                Event::Text(t) => builder.text(&t.unescape().ok()?),
                Event::CData(t) => builder.text(&t.decode().ok()?),
                Event::End(_) => builder.end().ok()?,
                Event::Eof => break,
                _ => {}
            }
        }
        builder.finish().ok()
    }

    fn recipient_strategy() -> impl Strategy<Value = String> {
        prop_oneof!["\\+?[0-9]{3,15}", "[a-zA-Z0-9 <>&\"'+.-]{1,20}"]
            .prop_filter("not blank", |s: &String| !s.trim().is_empty())
            .prop_map(|s| s.trim().to_string())
    }

    proptest! {
        #[test]
        fn refusal_round_trips(
            recipients in proptest::collection::vec(recipient_strategy(), 1..20),
            batch in any::<bool>(),
            html in any::<bool>(),
            code_index in 0..ErrorCode::ALL.len(),
            text in "\\PC{0,30}",
        ) {
            let code = ErrorCode::ALL[code_index];
            let messages: Vec<_> = recipients
                .iter()
                .map(|r| OutgoingMessage { recipient: r.clone(), message_type: "SMS:TEXT".into(), text: text.clone() })
                .collect();
            let format = if html { ResponseFormat::Html } else { ResponseFormat::Xml };
            let batch = batch && !html;
            let body = send_refusal(&messages, batch, format, code, code.message());
            let reports = parse_send_answer(body.as_bytes()).unwrap();
            prop_assert_eq!(reports.len(), messages.len());
            for (i, (r, m)) in reports.iter().zip(&messages).enumerate() {
                prop_assert_eq!(r.recipient.as_deref(), Some(m.recipient.as_str()));
                prop_assert_eq!(r.status_code, i64::from(code.code()));
                prop_assert_eq!(r.index, batch.then_some(i));
            }
            prop_assert!(match_reports(&messages, batch, &reports).iter().all(|o| *o == Some(false)));
        }

        #[test]
        fn never_panics_on_bytes(body in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_send_answer(&body);
        }

        #[test]
        fn never_panics_on_xml_like_text(
            body in "(<\\??/?(response|acceptreport|statuscode[0-9]?|recipient[0-9]?|!DOCTYPE|!\\[CDATA\\[)>?|[0-9+ ]|&[a-z#0-9]*;?|Status code: |Recipient: |<br>){0,40}"
        ) {
            let _ = parse_send_answer(body.as_bytes());
            let _ = parse_send_answer(format!("<?xml version=\"1.0\"?>{body}").as_bytes());
        }

        /// Whatever the direct scan reads, quick-xml reads the same.
        #[test]
        fn plain_scan_agrees_with_quick_xml(
            body in "(<\\??/?(response|data|acceptreport[0-9]?|statuscode[0-9]?|recipient[0-9]?|messageid|!DOCTYPE smsapi)/?>|[0-9+ a-z\n]{0,6}|&amp;|<!\\[CDATA\\[x\\]\\]>|<a b=\"1\">){0,40}",
            decl in any::<bool>(),
        ) {
            let body = if decl { format!("<?xml version=\"1.0\"?>\n{body}") } else { body };
            if let Some(fast) = parse_plain_xml(body.as_bytes()) {
                prop_assert_eq!(Some(fast), full_parse(body.as_bytes()));
            }
        }

        /// Well-formed answers of varied shape: the scan reads them, and
        /// reads them as quick-xml does.
        #[test]
        fn plain_scan_agrees_on_well_formed_answers(
            reports in proptest::collection::vec(
                (proptest::option::of(0usize..30), "[+0-9]{0,8}", -3i64..4, any::<bool>(), "[ \n\t]{0,2}"),
                0..8),
            extra in proptest::option::of("[a-z]{1,8}"),
            doctype in any::<bool>(),
        ) {
            let mut body = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
            if doctype {
                body.push_str("<!DOCTYPE smsapi PUBLIC \"-//OZEKI//DTD XML 1.0//EN\" \"x.xml\">\n");
            }
            body.push_str("<response><action>sendmessage</action><data>");
            for (index, recipient, code, upper, ws) in &reports {
                let suffix = index.map(|i| i.to_string()).unwrap_or_default();
                let (sc, rc) = if *upper { ("StatusCode", "Recipient") } else { ("statuscode", "recipient") };
                body.push_str(&format!(
                    "<acceptreport>{ws}<{sc}{suffix}>{ws}{code}{ws}</{sc}{suffix}>{ws}<{rc}{suffix}>{recipient}</{rc}{suffix}>"
                ));
                if let Some(e) = &extra {
                    body.push_str(&format!("<{e}>v</{e}><{e}/>"));
                }
                body.push_str("</acceptreport>");
            }
            body.push_str("</data></response>");
            let fast = parse_plain_xml(body.as_bytes());
            prop_assert_eq!(fast.clone(), full_parse(body.as_bytes()));
            if !reports.is_empty() && extra.as_deref() != Some("acceptreport") {
                prop_assert!(fast.is_some(), "{}", body);
            }
        }

        /// Real answers (every refusal shape, batches) take the direct scan.
        #[test]
        fn rendered_answers_take_the_direct_scan(
            recipients in proptest::collection::vec("\\+?[0-9]{3,15}", 1..20),
            batch in any::<bool>(),
        ) {
            let messages: Vec<_> = recipients
                .iter()
                .map(|r| OutgoingMessage { recipient: r.clone(), message_type: "SMS:TEXT".into(), text: "hi".into() })
                .collect();
            let code = ErrorCode::InsufficientCredit;
            let body = send_refusal(&messages, batch, ResponseFormat::Xml, code, code.message());
            let fast = parse_plain_xml(body.as_bytes());
            prop_assert!(fast.is_some());
            prop_assert_eq!(fast, full_parse(body.as_bytes()));
        }

        #[test]
        fn match_never_panics_and_has_one_entry_per_message(
            recipients in proptest::collection::vec("[+0-9]{0,4}", 0..10),
            reports in proptest::collection::vec(
                (proptest::option::of(0usize..12), proptest::option::of("[+0-9]{0,4}"), -2i64..3), 0..12),
            batch in any::<bool>(),
        ) {
            let messages: Vec<_> = recipients.iter().map(|r| msg(r)).collect();
            let reports: Vec<_> = reports
                .into_iter()
                .map(|(index, recipient, status_code)| AcceptReport { index, recipient, status_code })
                .collect();
            let out = match_reports(&messages, batch, &reports);
            prop_assert_eq!(out.len(), messages.len());
            // Every Some outcome is backed by at least one report.
            let matched = out.iter().filter(|o| o.is_some()).count();
            prop_assert!(matched <= reports.len());
        }
    }
}
