//! `application/x-www-form-urlencoded` bodies of the Boxis API, decoded to
//! raw bytes per field.
//!
//! Unlike the Ozeki door, one field (`content`) is in a charset that another
//! field (`encoding`) names, so this layer stops at bytes: names are decoded
//! as UTF-8, values are percent-decoded to bytes and left to
//! [`super::command`] to interpret. Percent-encoding is strict (a `%` not
//! followed by two hex digits is an error) and `+` is a space.
//!
//! It must never put a value into an error (`authcode` travels here), and it
//! bounds the number of fields and the length of each so a hostile body
//! cannot make it allocate without limit. A field given twice is an error:
//! PHP would silently keep the last one, and an authenticated request must
//! not mean two things.

use thiserror::Error;

use crate::api::percent::decode_strict;

/// Longest field name accepted, in bytes. Boxis' longest is
/// `recipients_count`.
pub const FIELD_NAME_MAX_LEN: usize = 64;
/// Longest field name echoed back in an error.
const NAME_ECHO_MAX: usize = 32;

/// Bounds applied while parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormLimits {
    /// Most fields accepted. A Boxis request has at most 12.
    pub max_fields: usize,
    /// Longest decoded value, in bytes.
    pub max_value_len: usize,
}

impl Default for FormLimits {
    fn default() -> Self {
        FormLimits {
            max_fields: 64,
            max_value_len: 64 * 1024,
        }
    }
}

/// Why a form body could not be read. Messages name fields, never values.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormError {
    #[error("too many fields")]
    TooManyFields,
    #[error("a field name is too long")]
    NameTooLong,
    #[error("malformed percent-encoding")]
    BadPercentEncoding,
    #[error("a field name is not valid UTF-8")]
    NameNotUtf8,
    #[error("value of field {name:?} is too long")]
    ValueTooLong { name: String },
    #[error("field {name:?} is given more than once")]
    DuplicateField { name: String },
    #[error(transparent)]
    Multipart(#[from] crate::api::multipart::MultipartError),
}

/// Decoded form fields in arrival order; names are case-sensitive, as PHP
/// reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form {
    fields: Vec<(String, Vec<u8>)>,
}

impl Form {
    /// The raw (percent-decoded) bytes of field `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Every `(name, value)` pair in arrival order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        self.fields.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

impl FromIterator<(String, Vec<u8>)> for Form {
    /// Builds a form from already decoded fields (tests, other transports).
    fn from_iter<I: IntoIterator<Item = (String, Vec<u8>)>>(iter: I) -> Self {
        Form {
            fields: iter.into_iter().collect(),
        }
    }
}

/// Parses a form body: `&`-separated `name=value` pairs; a pair without `=`
/// has an empty value; empty pairs and pairs with an empty name are skipped.
pub fn parse_form(body: &[u8], limits: &FormLimits) -> Result<Form, FormError> {
    let mut fields: Vec<(String, Vec<u8>)> = Vec::new();
    for raw in body.split(|&b| b == b'&') {
        let (raw_name, raw_value) = match raw.iter().position(|&b| b == b'=') {
            Some(i) => (&raw[..i], &raw[i + 1..]),
            None => (raw, &raw[raw.len()..]),
        };
        if raw_name.is_empty() {
            continue;
        }
        if fields.len() == limits.max_fields {
            return Err(FormError::TooManyFields);
        }
        let name = percent_decode(raw_name, FIELD_NAME_MAX_LEN).map_err(|e| match e {
            DecodeError::TooLong => FormError::NameTooLong,
            DecodeError::BadPercent => FormError::BadPercentEncoding,
        })?;
        let name = String::from_utf8(name).map_err(|_| FormError::NameNotUtf8)?;
        let value = percent_decode(raw_value, limits.max_value_len).map_err(|e| match e {
            DecodeError::TooLong => FormError::ValueTooLong { name: echo(&name) },
            DecodeError::BadPercent => FormError::BadPercentEncoding,
        })?;
        if fields.iter().any(|(n, _)| *n == name) {
            return Err(FormError::DuplicateField { name: echo(&name) });
        }
        fields.push((name, value));
    }
    Ok(Form { fields })
}

/// Parses a `multipart/form-data` body (what PHP's curl sends for an array
/// of fields) by the same rules as [`parse_form`]: bounded, names UTF-8,
/// a field given twice is an error.
pub fn parse_multipart_form(
    body: &[u8],
    boundary: &str,
    limits: &FormLimits,
) -> Result<Form, FormError> {
    let parts = crate::api::multipart::parse(body, boundary, limits.max_fields)?;
    let mut fields: Vec<(String, Vec<u8>)> = Vec::with_capacity(parts.len());
    for part in parts {
        if part.name.is_empty() {
            continue;
        }
        if part.name.len() > FIELD_NAME_MAX_LEN {
            return Err(FormError::NameTooLong);
        }
        let name = String::from_utf8(part.name).map_err(|_| FormError::NameNotUtf8)?;
        if part.value.len() > limits.max_value_len {
            return Err(FormError::ValueTooLong { name: echo(&name) });
        }
        if fields.iter().any(|(n, _)| *n == name) {
            return Err(FormError::DuplicateField { name: echo(&name) });
        }
        fields.push((name, part.value.to_vec()));
    }
    Ok(Form { fields })
}

/// A field name as it may appear in an error: at most [`NAME_ECHO_MAX`]
/// characters, control characters replaced.
fn echo(name: &str) -> String {
    name.chars()
        .take(NAME_ECHO_MAX)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

enum DecodeError {
    TooLong,
    BadPercent,
}

/// Percent-decodes `raw` (`+` is a space) into at most `max_len` bytes.
fn percent_decode(raw: &[u8], max_len: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    decode_strict(raw, &mut out).map_err(|_| DecodeError::BadPercent)?;
    if out.len() > max_len {
        return Err(DecodeError::TooLong);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Form, FormError> {
        parse_form(body.as_bytes(), &FormLimits::default())
    }

    #[test]
    fn decodes_plus_percent_and_keeps_raw_bytes() {
        let f = parse("content=a+b%2Bc%F5&username=john%40example.com&flag&=x&&").unwrap();
        assert_eq!(f.get("content"), Some(&b"a b+c\xf5"[..]));
        assert_eq!(f.get("username"), Some(&b"john@example.com"[..]));
        assert_eq!(f.get("flag"), Some(&b""[..]));
        assert_eq!(f.len(), 3);
        assert_eq!(f.get("Content"), None, "names are case-sensitive");
    }

    #[test]
    fn refuses_bad_percent_duplicates_and_oversize() {
        assert_eq!(parse("a=%4"), Err(FormError::BadPercentEncoding));
        assert_eq!(parse("a=%zz"), Err(FormError::BadPercentEncoding));
        assert_eq!(
            parse("a=1&a=2"),
            Err(FormError::DuplicateField { name: "a".into() })
        );
        assert_eq!(parse("%ff=1"), Err(FormError::NameNotUtf8));
        let long_name = format!("{}=1", "n".repeat(FIELD_NAME_MAX_LEN + 1));
        assert_eq!(parse(&long_name), Err(FormError::NameTooLong));
        let small = FormLimits {
            max_fields: 2,
            max_value_len: 3,
        };
        assert_eq!(
            parse_form(b"a=1&b=2&c=3", &small),
            Err(FormError::TooManyFields)
        );
        assert_eq!(
            parse_form(b"secret=abcd", &small),
            Err(FormError::ValueTooLong {
                name: "secret".into()
            })
        );
        // Errors never carry values.
        let e = parse_form(b"secret=hunter2hunter2", &small).unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
    }
}
