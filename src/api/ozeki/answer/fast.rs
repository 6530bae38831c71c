//! The fast path for XML answers: a direct scan of the plain shape nearly
//! every gateway answer has. It reads only what it is sure of and declines
//! (`None`) everything else, which quick-xml then reads; the property tests
//! check that the two agree.

use super::report::ReportBuilder;
use super::AcceptReport;

/// The direct scan of a plain answer: an optional declaration and DOCTYPE
/// (without an internal subset), then only start, end and empty-element
/// tags with plain names and no attributes, and text without `&`. `None`
/// for anything else, or for any error: the full parser decides those.
pub(super) fn parse_plain_xml(body: &[u8]) -> Option<Vec<AcceptReport>> {
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
