//! Request parameters of the Ozeki HTTP API (SPEC 1.1): query string and
//! `application/x-www-form-urlencoded` body, merged into one ordered list.
//!
//! Owns percent-decoding, `+` as space, the `_charset_` convention, name
//! case-folding and the legacy `recepient` alias. It must never put a
//! parameter *value* into an error (passwords travel here), and it bounds the
//! number of parameters and the length of each one so a hostile request
//! cannot make it allocate without limit.
//!
//! Percent-encoding is strict: a `%` not followed by two hex digits is an
//! error ([`ParamError::BadPercentEncoding`]), not a literal `%`. A request
//! tollgate cannot decode must not be forwarded either: it might be a
//! `sendmessage` that tollgate cannot price.

use std::borrow::Cow;

use encoding_rs::{Encoding, UTF_8};
use thiserror::Error;

use crate::api::multipart::Field;
use crate::api::owned::fold;
use crate::api::percent::{decode_strict, BadPercent};

/// Bounds applied while parsing, before anything else looks at a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLimits {
    /// Most `name=value` pairs accepted (query and body together). The
    /// default fits a batch of 20 000 messages with about 4 pairs each.
    pub max_params: usize,
    /// Longest decoded value, in bytes of UTF-8 (names: [`NAME_MAX_LEN`]).
    pub max_value_len: usize,
}

impl Default for ParamLimits {
    fn default() -> Self {
        ParamLimits {
            max_params: 100_000,
            max_value_len: 64 * 1024,
        }
    }
}

/// Why a request's parameters could not be read. Messages name parameters,
/// never their values.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParamError {
    #[error("too many parameters")]
    TooManyParams,
    #[error("a parameter name is too long")]
    NameTooLong,
    #[error("value of parameter {name:?} is too long")]
    ValueTooLong { name: String },
    #[error("malformed percent-encoding")]
    BadPercentEncoding,
    /// The `_charset_` label, sanitised (ASCII only, at most 40 characters).
    #[error("unknown charset {0:?}")]
    BadCharset(String),
    #[error("value of parameter {name:?} is not valid UTF-8")]
    NotUtf8 { name: String },
    #[error("value of parameter {name:?} is not valid {charset}")]
    NotInCharset { name: String, charset: &'static str },
    #[error(transparent)]
    Multipart(#[from] crate::api::multipart::MultipartError),
}

/// Decoded request parameters in arrival order (query pairs, then body
/// pairs). Names are folded ([`fold`]: trimmed of white space and control
/// characters, lower-cased, as the gateway compares them); `recepient…` is stored as
/// `recipient…`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// The first value of `name` (which must be given in lower case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every `(name, value)` pair in arrival order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.pairs.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of pairs, duplicates included.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

impl FromIterator<(String, String)> for Params {
    /// Builds parameters from already decoded pairs, applying the same name
    /// folding as [`parse_params`] (for tests and other front doors).
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let pairs = iter
            .into_iter()
            .map(|(n, v)| (canonical_name(fold(n)), v))
            .collect();
        Params { pairs }
    }
}

/// The name of the charset parameter HTML forms send.
const CHARSET_PARAM: &[u8] = b"_charset_";
/// Longest `_charset_` label echoed back in [`ParamError::BadCharset`].
const CHARSET_LABEL_ECHO_MAX: usize = 40;
/// Longest decoded parameter name accepted. Ozeki's longest is
/// `messagedata19999`; the margin is for whatever other clients send.
pub const NAME_MAX_LEN: usize = 1024;
/// Longest parameter name echoed back in an error.
const NAME_ECHO_MAX: usize = 64;

/// Parses the query string and the form body into [`Params`].
///
/// Both use `application/x-www-form-urlencoded` syntax: `&`-separated pairs,
/// `+` for space, percent-encoding; a pair without `=` has an empty value and
/// empty pairs are skipped. Values (and names) are decoded as UTF-8 unless a
/// `_charset_` pair, anywhere in either part, names another encoding known to
/// `encoding_rs`; the first `_charset_` wins and an empty one means UTF-8.
pub fn parse_params(
    query: Option<&[u8]>,
    form_body: Option<&[u8]>,
    limits: &ParamLimits,
) -> Result<Params, ParamError> {
    let parts = [query.unwrap_or_default(), form_body.unwrap_or_default()];
    let encoding = find_charset(&parts)?;

    // One pass over the bytes to size the vector; capped so a flood of `&`
    // does not reserve more than the limit allows.
    let estimate: usize = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| p.iter().filter(|&&b| b == b'&').count() + 1)
        .sum();
    let mut pairs = Vec::with_capacity(estimate.min(limits.max_params));
    let mut scratch = Vec::new();

    for part in parts {
        for raw in part.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
            if pairs.len() == limits.max_params {
                return Err(ParamError::TooManyParams);
            }
            let (raw_name, raw_value) = split_pair(raw);
            let name = decode_text(raw_name, encoding, NAME_MAX_LEN, &mut scratch)
                .map_err(|e| e.for_name(None))?;
            let name = canonical_name(fold(name));
            let value = decode_text(raw_value, encoding, limits.max_value_len, &mut scratch)
                .map_err(|e| e.for_name(Some(&name)))?;
            pairs.push((name, value));
        }
    }
    Ok(Params { pairs })
}

/// Like [`parse_params`] for a `multipart/form-data` body: the query's
/// pairs, then the body's fields (their names and values are bytes, not
/// percent-encoded). `_charset_` is looked for in the query, then among
/// the fields.
pub fn parse_params_and_fields(
    query: Option<&[u8]>,
    fields: &[Field<'_>],
    limits: &ParamLimits,
) -> Result<Params, ParamError> {
    let query_params = parse_params(query, None, limits)?;
    let mut encoding = find_charset(&[query.unwrap_or_default()])?;
    if query_params.get("_charset_").is_none() {
        if let Some(field) = fields
            .iter()
            .find(|f| f.name.trim_ascii().eq_ignore_ascii_case(CHARSET_PARAM))
        {
            encoding = charset_for_label(field.value.trim_ascii())?;
        }
    }
    if query_params.len() + fields.len() > limits.max_params {
        return Err(ParamError::TooManyParams);
    }
    let mut pairs = query_params.pairs;
    pairs.reserve(fields.len());
    for field in fields {
        let name =
            decode_bytes(&field.name, encoding, NAME_MAX_LEN).map_err(|e| e.for_name(None))?;
        let name = canonical_name(fold(name));
        let value = decode_bytes(field.value, encoding, limits.max_value_len)
            .map_err(|e| e.for_name(Some(&name)))?;
        pairs.push((name, value));
    }
    Ok(Params { pairs })
}

/// Best-effort, allocation-light look at the `action` parameter of a request
/// whose parameters could not be parsed, so its error answer can still echo
/// the action. Lowercased; `None` if absent or not decodable.
pub fn sniff_action(query: Option<&[u8]>, form_body: Option<&[u8]>) -> Option<String> {
    const ACTION_MAX_LEN: usize = 64;
    let mut scratch = Vec::new();
    for part in [query.unwrap_or_default(), form_body.unwrap_or_default()] {
        for raw in part.split(|&b| b == b'&') {
            let (name, value) = split_pair(raw);
            if name.eq_ignore_ascii_case(b"action") {
                let mut action = decode_text(value, UTF_8, ACTION_MAX_LEN, &mut scratch).ok()?;
                action.make_ascii_lowercase();
                return Some(action.trim().to_string());
            }
        }
    }
    None
}

/// Splits `name=value` at the first `=`.
fn split_pair(raw: &[u8]) -> (&[u8], &[u8]) {
    match raw.iter().position(|&b| b == b'=') {
        Some(i) => (&raw[..i], &raw[i + 1..]),
        None => (raw, &[]),
    }
}

/// Maps the legacy misspelling `recepient` (and `recepientN`) to
/// `recipient…`. `name` is already lowercase.
fn canonical_name(name: String) -> String {
    match name.strip_prefix("recepient") {
        Some(rest) if rest.is_empty() || rest.bytes().all(|b| b.is_ascii_digit()) => {
            format!("recipient{rest}")
        }
        _ => name,
    }
}

/// Finds the first `_charset_` pair in the raw bytes and resolves its label.
fn find_charset(parts: &[&[u8]]) -> Result<&'static Encoding, ParamError> {
    let mut scratch = Vec::new();
    for part in parts {
        for raw in part.split(|&b| b == b'&') {
            let (raw_name, raw_value) = split_pair(raw);
            // Fast path: the literal name; otherwise only names containing an
            // escape can decode to `_charset_`.
            let is_charset = raw_name.eq_ignore_ascii_case(CHARSET_PARAM)
                || (raw_name.len() <= CHARSET_PARAM.len() * 3
                    && raw_name.contains(&b'%')
                    && decode_strict(raw_name, &mut scratch).is_ok()
                    && scratch.eq_ignore_ascii_case(CHARSET_PARAM));
            if !is_charset {
                continue;
            }
            decode_strict(raw_value, &mut scratch)?;
            return charset_for_label(scratch.trim_ascii());
        }
    }
    Ok(UTF_8)
}

/// The encoding a `_charset_` label names; an empty label means UTF-8.
fn charset_for_label(label: &[u8]) -> Result<&'static Encoding, ParamError> {
    if label.is_empty() {
        return Ok(UTF_8);
    }
    // Only charsets that read ASCII as ASCII: under any other (UTF-16,
    // ISO-2022-JP) the same bytes would spell a different `action` to a
    // reader that ignores `_charset_`.
    Encoding::for_label(label)
        .filter(|e| e.is_ascii_compatible())
        .ok_or_else(|| {
            ParamError::BadCharset(
                label
                    .iter()
                    .take(CHARSET_LABEL_ECHO_MAX)
                    .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
                    .collect(),
            )
        })
}

/// A decoding failure before the parameter name is known.
enum DecodeError {
    TooLong,
    BadPercent,
    NotUtf8,
    NotInCharset(&'static str),
}

impl DecodeError {
    /// Attaches the parameter name (`None`: the failure is in the name).
    fn for_name(self, name: Option<&str>) -> ParamError {
        let echo = || {
            let n = name.unwrap_or("");
            let mut end = n.len().min(NAME_ECHO_MAX);
            while !n.is_char_boundary(end) {
                end -= 1;
            }
            n[..end].to_string()
        };
        match (self, name) {
            (DecodeError::TooLong, None) => ParamError::NameTooLong,
            (DecodeError::TooLong, Some(_)) => ParamError::ValueTooLong { name: echo() },
            (DecodeError::BadPercent, _) => ParamError::BadPercentEncoding,
            (DecodeError::NotUtf8, _) => ParamError::NotUtf8 { name: echo() },
            (DecodeError::NotInCharset(charset), _) => ParamError::NotInCharset {
                name: echo(),
                charset,
            },
        }
    }
}

impl From<BadPercent> for DecodeError {
    fn from(_: BadPercent) -> Self {
        DecodeError::BadPercent
    }
}

impl From<BadPercent> for ParamError {
    fn from(_: BadPercent) -> Self {
        ParamError::BadPercentEncoding
    }
}

/// Percent-decodes one name or value and decodes the bytes with `encoding`.
/// `scratch` is reused between calls so only the returned `String` allocates.
fn decode_text(
    raw: &[u8],
    encoding: &'static Encoding,
    max_len: usize,
    scratch: &mut Vec<u8>,
) -> Result<String, DecodeError> {
    let needs_unescape = raw.iter().any(|&b| b == b'%' || b == b'+');
    let bytes: &[u8] = if needs_unescape {
        decode_strict(raw, scratch)?;
        scratch
    } else {
        raw
    };
    decode_bytes(bytes, encoding, max_len)
}

/// Decodes already unescaped bytes with `encoding`, at most `max_len`
/// bytes in and out.
fn decode_bytes(
    bytes: &[u8],
    encoding: &'static Encoding,
    max_len: usize,
) -> Result<String, DecodeError> {
    if bytes.len() > max_len {
        return Err(DecodeError::TooLong);
    }
    let text = if encoding == UTF_8 {
        std::str::from_utf8(bytes)
            .map_err(|_| DecodeError::NotUtf8)?
            .to_owned()
    } else {
        match encoding.decode_without_bom_handling_and_without_replacement(bytes) {
            Some(Cow::Borrowed(s)) => s.to_owned(),
            Some(Cow::Owned(s)) => s,
            None => return Err(DecodeError::NotInCharset(encoding.name())),
        }
    };
    // A single-byte charset can grow up to 3× in UTF-8.
    if text.len() > max_len {
        return Err(DecodeError::TooLong);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(query: &str) -> Result<Params, ParamError> {
        parse_params(Some(query.as_bytes()), None, &ParamLimits::default())
    }

    #[test]
    fn names_are_case_insensitive_and_first_value_wins() {
        let p = parse("Action=sendMessage&messageData=hi&MESSAGEDATA=second").unwrap();
        assert_eq!(p.get("action"), Some("sendMessage"));
        assert_eq!(p.get("messagedata"), Some("hi"));
        assert_eq!(p.len(), 3);
        assert_eq!(p.get("Action"), None, "lookups take lower-case names");
    }

    #[test]
    fn recepient_is_an_alias_of_recipient() {
        let p = parse("Recepient=%2B3620&recepient7=123&recepientx=no").unwrap();
        assert_eq!(p.get("recipient"), Some("+3620"));
        assert_eq!(p.get("recipient7"), Some("123"));
        assert_eq!(p.get("recepientx"), Some("no"));
        assert_eq!(p.get("recepient"), None);
    }

    #[test]
    fn query_comes_before_body() {
        let p = parse_params(
            Some(b"action=sendmessage&a=1"),
            Some(b"a=2&messagedata=x"),
            &ParamLimits::default(),
        )
        .unwrap();
        let all: Vec<_> = p.iter().collect();
        assert_eq!(
            all,
            vec![
                ("action", "sendmessage"),
                ("a", "1"),
                ("a", "2"),
                ("messagedata", "x")
            ]
        );
        assert_eq!(p.get("a"), Some("1"));
    }

    #[test]
    fn plus_and_percent_20_are_spaces() {
        let p = parse("messagedata=Hello+big%20world%2B1&x&=v&&y=").unwrap();
        assert_eq!(p.get("messagedata"), Some("Hello big world+1"));
        assert_eq!(p.get("x"), Some(""));
        assert_eq!(p.get(""), Some("v"));
        assert_eq!(p.get("y"), Some(""));
        assert_eq!(p.len(), 4, "empty pairs between && are skipped");
    }

    #[test]
    fn utf8_is_the_default() {
        let p = parse("messagedata=%C5%91%E2%82%AC").unwrap();
        assert_eq!(p.get("messagedata"), Some("ő€"));
    }

    #[test]
    fn charset_iso_8859_2_anywhere() {
        // ő is 0xF5 in ISO-8859-2 (and õ in Latin-1).
        let p = parse_params(
            Some(b"messagedata=Gy%F5r+%E1rv%EDzt%FBr%F5&action=sendmessage"),
            Some(b"_CHARSET_=iso-8859-2"),
            &ParamLimits::default(),
        )
        .unwrap();
        assert_eq!(p.get("messagedata"), Some("Győr árvíztűrő"));
        assert_eq!(p.get("_charset_"), Some("iso-8859-2"));
    }

    #[test]
    fn charset_windows_1252_euro() {
        let p = parse("_charset_=windows-1252&messagedata=%80+5").unwrap();
        assert_eq!(p.get("messagedata"), Some("€ 5"));
        // Raw non-ASCII bytes in the value are decoded the same way.
        let p = parse_params(
            Some(b"_charset_=windows-1252&messagedata=\x80"),
            None,
            &ParamLimits::default(),
        )
        .unwrap();
        assert_eq!(p.get("messagedata"), Some("€"));
    }

    #[test]
    fn charset_name_may_itself_be_encoded_and_empty_means_utf8() {
        let p = parse("%5Fcharset%5F=latin2&m=%F5").unwrap();
        assert_eq!(p.get("m"), Some("ő"));
        let p = parse("_charset_=&m=%C5%91").unwrap();
        assert_eq!(p.get("m"), Some("ő"));
        let p = parse("_charset_=UTF-8&m=%C5%91").unwrap();
        assert_eq!(p.get("m"), Some("ő"));
    }

    #[test]
    fn unknown_charset_is_an_error_naming_the_label_only() {
        assert_eq!(
            parse("password=secret&_charset_=klingon").unwrap_err(),
            ParamError::BadCharset("klingon".into())
        );
        let err = parse("_charset_=%00%FF%0Aevil").unwrap_err();
        assert_eq!(err, ParamError::BadCharset("???evil".into()));
    }

    #[test]
    fn bad_percent_encoding_is_an_error() {
        for q in ["m=%zz", "m=%4", "m=%", "m=%%41", "%g1=x"] {
            assert_eq!(parse(q).unwrap_err(), ParamError::BadPercentEncoding, "{q}");
        }
        assert_eq!(parse("m=%41%61").unwrap().get("m"), Some("Aa"));
    }

    #[test]
    fn invalid_utf8_names_the_parameter_not_the_value() {
        let err = parse("password=ab%FFcd").unwrap_err();
        assert_eq!(
            err,
            ParamError::NotUtf8 {
                name: "password".into()
            }
        );
        assert!(!err.to_string().contains("ab"));
        // In a non-UTF-8 multi-byte charset, undecodable bytes are an error too.
        let err = parse("_charset_=shift_jis&m=%81").unwrap_err();
        assert!(matches!(err, ParamError::NotInCharset { ref name, .. } if name == "m"));
    }

    #[test]
    fn limits_are_enforced() {
        let limits = ParamLimits {
            max_params: 3,
            max_value_len: 4,
        };
        assert!(parse_params(Some(b"a=1&b=2&c=3"), None, &limits).is_ok());
        assert_eq!(
            parse_params(Some(b"a=1&b=2"), Some(b"c=3&d=4"), &limits).unwrap_err(),
            ParamError::TooManyParams
        );
        assert_eq!(
            parse_params(Some(b"password=12345"), None, &limits).unwrap_err(),
            ParamError::ValueTooLong {
                name: "password".into()
            }
        );
        // Length is counted after decoding: %41 is one byte.
        assert!(parse_params(Some(b"a=%41%41%41%41"), None, &limits).is_ok());
        // ...and after charset conversion: 0x80 becomes 3 bytes of UTF-8.
        assert!(parse_params(Some(b"_charset_=cp1252&a=%80%80"), None, &limits).is_err());
        let long_name = format!("{}=1", "n".repeat(NAME_MAX_LEN + 1));
        assert_eq!(
            parse_params(Some(long_name.as_bytes()), None, &limits).unwrap_err(),
            ParamError::NameTooLong
        );
    }

    #[test]
    fn errors_never_contain_values() {
        let limits = ParamLimits {
            max_params: 10,
            max_value_len: 8,
        };
        for q in [
            "password=hunter2hunter2",
            "password=hunter2%FF",
            "password=hunter2%z",
        ] {
            let msg = parse_params(Some(q.as_bytes()), None, &limits)
                .unwrap_err()
                .to_string();
            assert!(!msg.contains("hunter2"), "{msg}");
        }
    }

    #[test]
    fn sniff_action_reads_raw_bytes() {
        assert_eq!(
            sniff_action(Some(b"x=%zz&Action=SendMessage"), None).as_deref(),
            Some("sendmessage")
        );
        assert_eq!(
            sniff_action(None, Some(b"ACTION=getCredits")).as_deref(),
            Some("getcredits")
        );
        assert_eq!(sniff_action(Some(b"a=b"), None), None);
    }

    #[test]
    fn from_iter_folds_names() {
        let p: Params = [("RECEPIENT".to_string(), "1".to_string())]
            .into_iter()
            .collect();
        assert_eq!(p.get("recipient"), Some("1"));
    }

    proptest! {
        #[test]
        fn never_panics_and_respects_limits(
            query in proptest::collection::vec(any::<u8>(), 0..200),
            body in proptest::collection::vec(any::<u8>(), 0..200),
            max_params in 0usize..20,
            max_value_len in 0usize..20,
        ) {
            let limits = ParamLimits { max_params, max_value_len };
            if let Ok(p) = parse_params(Some(&query), Some(&body), &limits) {
                prop_assert!(p.len() <= max_params);
                for (n, v) in p.iter() {
                    prop_assert!(n.len() <= NAME_MAX_LEN);
                    prop_assert!(v.len() <= max_value_len);
                }
            }
            let _ = sniff_action(Some(&query), Some(&body));
        }

        #[test]
        fn form_like_input_never_panics(s in "([a-zA-Z_%+=&0-9]|%[0-9A-Fa-f]{2}){0,80}") {
            let _ = parse_params(Some(s.as_bytes()), Some(s.as_bytes()), &ParamLimits::default());
        }

        #[test]
        fn encoded_values_round_trip(v in "\\PC{0,40}") {
            let enc: String = percent_encoding::utf8_percent_encode(
                &v, percent_encoding::NON_ALPHANUMERIC).to_string();
            let q = format!("k={enc}");
            let p = parse_params(Some(q.as_bytes()), None, &ParamLimits::default()).unwrap();
            prop_assert_eq!(p.get("k"), Some(v.as_str()));
        }
    }
}
