//! What an accept report is: [`ReportBuilder`] turns a stream of XML
//! events (start, empty, text, end) into [`AcceptReport`]s, with the
//! element names it recognises (`acceptreport`, `statuscode`, `recipient`,
//! optionally index-suffixed) and the bounds it enforces (nesting depth,
//! one value per field). Both XML readers feed it.

use std::collections::BTreeMap;

use super::{malformed, AcceptReport, AnswerError};

/// Deepest element nesting accepted (Ozeki's answers are 4 levels deep).
const MAX_DEPTH: usize = 32;

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

/// Turns a stream of XML events into accept reports; shared by both ways
/// of reading an answer so they cannot disagree on what a report is.
#[derive(Default)]
pub(super) struct ReportBuilder {
    reports: Vec<AcceptReport>,
    depth: usize,
    open: Option<OpenReport>,
    capture: Option<Capture>,
}

impl ReportBuilder {
    pub(super) fn capturing(&self) -> bool {
        self.capture.is_some()
    }

    pub(super) fn start(&mut self, name: &[u8]) -> Result<(), AnswerError> {
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

    pub(super) fn empty(&mut self, name: &[u8]) -> Result<(), AnswerError> {
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

    pub(super) fn text(&mut self, text: &str) {
        if let Some(c) = self.capture.as_mut() {
            c.text.push_str(text);
        }
    }

    pub(super) fn end(&mut self) -> Result<(), AnswerError> {
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

    pub(super) fn finish(self) -> Result<Vec<AcceptReport>, AnswerError> {
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
