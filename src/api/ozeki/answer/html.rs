//! The HTML answer shape (`Status code:` and `Recipient:` lines), read
//! tolerantly: tags are line breaks, a few entities are expanded.

use super::{malformed, AcceptReport, AnswerError};

/// The HTML shape: tags are line breaks; the i-th `Status code:` line pairs
/// with the i-th `Recipient:` line. If there are recipient lines but not as
/// many as status lines, the pairing is unknowable: malformed.
pub(super) fn parse_html(body: &[u8]) -> Result<Vec<AcceptReport>, AnswerError> {
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
