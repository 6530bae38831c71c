//! `multipart/form-data` request bodies (RFC 7578): what PHP's curl sends
//! when a client passes its fields as an array, and what HTML forms send
//! with `enctype="multipart/form-data"`. Splits a body that is already read
//! whole into its fields (name and value bytes, no further decoding).
//!
//! Strict and bounded: the boundary must be declared (RFC 2046: 1 to 70
//! characters), every part needs a `Content-Disposition: form-data` with a
//! `name`, the closing delimiter must be present, and the number of fields
//! and of header lines per part is capped. Anything else is a
//! [`MultipartError`] — a body tollgate cannot read is refused, never
//! guessed at (it might be a send). Errors name what is wrong, never a
//! value (passwords travel here).

use thiserror::Error;

/// Most header lines in one part (`Content-Disposition`, `Content-Type`,
/// and a few the client may add).
const MAX_PART_HEADERS: usize = 16;
/// Longest header line of a part.
const MAX_HEADER_LINE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MultipartError {
    #[error("multipart body without a boundary parameter in Content-Type")]
    NoBoundary,
    #[error("multipart boundary must be 1 to 70 characters")]
    BadBoundary,
    #[error("multipart body does not start with its boundary")]
    NoFirstBoundary,
    #[error("multipart body ends before its closing boundary")]
    Unterminated,
    #[error("a multipart part has malformed headers")]
    BadPartHeaders,
    #[error("a multipart part has no Content-Disposition: form-data name")]
    NoFieldName,
    #[error("too many multipart fields")]
    TooManyFields,
}

/// One field: its name and value, as bytes (the charset is applied by the
/// caller, like for a form body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: Vec<u8>,
    pub value: &'a [u8],
}

/// Whether a `Content-Type` value is `multipart/form-data`.
pub fn is_multipart(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("multipart/form-data")
}

/// The `boundary` parameter of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Result<String, MultipartError> {
    for param in content_type.split(';').skip(1) {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if !name.trim().eq_ignore_ascii_case("boundary") {
            continue;
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        if value.is_empty() || value.len() > 70 || !value.is_ascii() {
            return Err(MultipartError::BadBoundary);
        }
        return Ok(value.to_string());
    }
    Err(MultipartError::NoBoundary)
}

/// Splits `body` into its fields, at most `max_fields`.
pub fn parse<'a>(
    body: &'a [u8],
    boundary: &str,
    max_fields: usize,
) -> Result<Vec<Field<'a>>, MultipartError> {
    let dash_boundary = format!("--{boundary}");
    let delimiter = format!("\r\n--{boundary}");
    // The first boundary may follow a preamble, itself ended by CRLF.
    let mut rest = if body.starts_with(dash_boundary.as_bytes()) {
        &body[dash_boundary.len()..]
    } else {
        let at = find(body, delimiter.as_bytes()).ok_or(MultipartError::NoFirstBoundary)?;
        &body[at + delimiter.len()..]
    };
    let mut fields = Vec::new();
    loop {
        // After a boundary: `--` closes the body, CRLF opens a part
        // (transport padding — spaces and tabs — may come first).
        let padded = rest
            .iter()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count();
        rest = &rest[padded..];
        if rest.starts_with(b"--") {
            return Ok(fields);
        }
        rest = rest
            .strip_prefix(b"\r\n")
            .ok_or(MultipartError::Unterminated)?;
        if fields.len() == max_fields {
            return Err(MultipartError::TooManyFields);
        }
        let header_end = find(rest, b"\r\n\r\n").ok_or(MultipartError::BadPartHeaders)?;
        let name = field_name(&rest[..header_end])?;
        rest = &rest[header_end + 4..];
        let end = find(rest, delimiter.as_bytes()).ok_or(MultipartError::Unterminated)?;
        fields.push(Field {
            name,
            value: &rest[..end],
        });
        rest = &rest[end + delimiter.len()..];
    }
}

/// The `name` of a part's `Content-Disposition: form-data` header.
fn field_name(headers: &[u8]) -> Result<Vec<u8>, MultipartError> {
    let mut name = None;
    for (i, line) in headers.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if i == MAX_PART_HEADERS || line.len() > MAX_HEADER_LINE {
            return Err(MultipartError::BadPartHeaders);
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(MultipartError::BadPartHeaders);
        };
        if !line[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(b"content-disposition")
        {
            continue;
        }
        let value = &line[colon + 1..];
        let mut params = value.split(|&b| b == b';');
        if !params
            .next()
            .is_some_and(|kind| kind.trim_ascii().eq_ignore_ascii_case(b"form-data"))
        {
            return Err(MultipartError::NoFieldName);
        }
        for param in params {
            let param = param.trim_ascii();
            let Some(eq) = param.iter().position(|&b| b == b'=') else {
                continue;
            };
            if param[..eq].trim_ascii().eq_ignore_ascii_case(b"name") {
                name = Some(unquote(param[eq + 1..].trim_ascii()));
            }
        }
    }
    name.ok_or(MultipartError::NoFieldName)
}

/// A quoted-string's content (backslash escapes removed), or a token as is.
fn unquote(raw: &[u8]) -> Vec<u8> {
    let Some(inner) = raw.strip_prefix(b"\"").and_then(|r| r.strip_suffix(b"\"")) else {
        return raw.to_vec();
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut escaped = false;
    for &b in inner {
        if escaped || b != b'\\' {
            out.push(b);
            escaped = false;
        } else {
            escaped = true;
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A body as curl builds it (`curl -F a=1 -F b=2`).
    fn body(boundary: &str, fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                )
                .as_bytes(),
            );
        }
        out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        out
    }

    #[test]
    fn reads_the_fields_curl_sends() {
        let b = body(
            "------------------------d74496d66958873e",
            &[
                ("action", "sendmessage"),
                ("recipient", "+3620"),
                ("messagedata", "a\r\nb"),
            ],
        );
        let fields = parse(&b, "------------------------d74496d66958873e", 10).unwrap();
        let got: Vec<(&[u8], &[u8])> = fields.iter().map(|f| (&f.name[..], f.value)).collect();
        assert_eq!(
            got,
            vec![
                (&b"action"[..], &b"sendmessage"[..]),
                (b"recipient", b"+3620"),
                (b"messagedata", b"a\r\nb")
            ]
        );
    }

    #[test]
    fn boundary_from_the_content_type() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc").unwrap(),
            "abc"
        );
        assert_eq!(
            boundary("Multipart/Form-Data; charset=x; BOUNDARY=\"a b\"").unwrap(),
            "a b"
        );
        assert_eq!(
            boundary("multipart/form-data"),
            Err(MultipartError::NoBoundary)
        );
        assert_eq!(
            boundary(&format!("multipart/form-data; boundary={}", "x".repeat(71))),
            Err(MultipartError::BadBoundary)
        );
        assert!(is_multipart("multipart/form-data; boundary=x"));
        assert!(!is_multipart("multipart/mixed"));
    }

    #[test]
    fn preamble_padding_and_quoted_names() {
        let b = b"preamble\r\n--xy  \r\nContent-Type: text/plain\r\ncontent-disposition: form-data; filename=\"f\"; name=\"a\\\"b\"\r\n\r\nv\r\n--xy--";
        let fields = parse(b, "xy", 10).unwrap();
        assert_eq!(
            fields,
            vec![Field {
                name: b"a\"b".to_vec(),
                value: b"v"
            }]
        );
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let good = body("xy", &[("a", "1")]);
        assert_eq!(
            parse(b"nothing here", "xy", 10),
            Err(MultipartError::NoFirstBoundary)
        );
        assert_eq!(
            parse(&good[..good.len() - 8], "xy", 10),
            Err(MultipartError::Unterminated)
        );
        assert_eq!(
            parse(b"--xy\r\nContent-Type: x\r\n\r\nv\r\n--xy--", "xy", 10),
            Err(MultipartError::NoFieldName)
        );
        assert_eq!(
            parse(b"--xy\r\nno colon\r\n\r\nv\r\n--xy--", "xy", 10),
            Err(MultipartError::BadPartHeaders)
        );
        let many = body("xy", &[("a", "1"), ("b", "2"), ("c", "3")]);
        assert_eq!(parse(&many, "xy", 2), Err(MultipartError::TooManyFields));
    }

    proptest! {
        #[test]
        fn round_trips_and_never_panics(
            fields in prop::collection::vec(("[a-z_]{1,8}", "[ -~\r\n]{0,20}"), 0..6),
            junk in prop::collection::vec(any::<u8>(), 0..200),
            cut in any::<prop::sample::Index>(),
        ) {
            let refs: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let b = body("B0undary", &refs);
            let parsed = parse(&b, "B0undary", 100).unwrap();
            prop_assert_eq!(parsed.len(), fields.len());
            for (f, (n, v)) in parsed.iter().zip(&fields) {
                prop_assert_eq!(&f.name[..], n.as_bytes());
                prop_assert_eq!(f.value, v.as_bytes());
            }
            // Truncated or random input: an error or fields, never a panic.
            let _ = parse(&b[..cut.index(b.len() + 1)], "B0undary", 100);
            let _ = parse(&junk, "B0undary", 100);
        }
    }
}
