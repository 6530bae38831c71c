//! Typed Boxis requests (SPEC 2.1): which answer format, who claims to call
//! (the authcode fields, checked later by the service layer), and what they
//! ask for.
//!
//! Everything a client sends is validated here, before any credential or
//! balance is looked at: unknown actions, a `section` other than `sms`, a
//! non-numeric timestamp, a bad `recipients_count`, an unknown `encoding`
//! or `content` that is not valid in it are all `invalid_request`. The
//! `content` bytes are decoded with exactly the charset `encoding` names
//! (`UTF-8`, `ISO-8859-2` or `Windows-1252`, case-sensitive as Boxis
//! documents); without `encoding` they are UTF-8, as in the first version of
//! the Boxis documentation. Reasons name fields, never their values.

use std::fmt;

use encoding_rs::{Encoding, ISO_8859_2, UTF_8, WINDOWS_1252};

use super::form::Form;
use crate::error::ErrorCode;

/// The only API version Boxis documents.
pub const API_VERSION: &str = "1.0";
/// Most recipients one `calculateCredits` may price: keeps the product far
/// from overflow and rejects typos.
pub const RECIPIENTS_COUNT_MAX: u32 = 1_000_000;
/// Longest `username` (an e-mail address is at most 254 characters).
pub const USERNAME_MAX_LEN: usize = 254;
/// Longest `authcode` accepted (an md5 is 32 hex digits).
pub const AUTHCODE_MAX_LEN: usize = 64;
/// Longest `timestamp`: Unix seconds fit in 19 digits.
const TIMESTAMP_MAX_LEN: usize = 19;

/// The answer format (`returntype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReturnType {
    #[default]
    Xml,
    Json,
}

/// The charsets `encoding` may name (case-sensitive, as Boxis documents).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentEncoding {
    Utf8,
    Iso8859_2,
    Windows1252,
}

impl ContentEncoding {
    pub const ALL: [ContentEncoding; 3] = [
        ContentEncoding::Utf8,
        ContentEncoding::Iso8859_2,
        ContentEncoding::Windows1252,
    ];

    /// The label as Boxis spells it.
    pub fn label(self) -> &'static str {
        match self {
            ContentEncoding::Utf8 => "UTF-8",
            ContentEncoding::Iso8859_2 => "ISO-8859-2",
            ContentEncoding::Windows1252 => "Windows-1252",
        }
    }

    /// Exact, case-sensitive match of a label.
    pub fn parse(label: &[u8]) -> Option<ContentEncoding> {
        ContentEncoding::ALL
            .into_iter()
            .find(|e| e.label().as_bytes() == label)
    }

    fn encoding(self) -> &'static Encoding {
        match self {
            ContentEncoding::Utf8 => UTF_8,
            ContentEncoding::Iso8859_2 => ISO_8859_2,
            ContentEncoding::Windows1252 => WINDOWS_1252,
        }
    }

    /// Decodes `bytes` without replacement characters; `None` if they are
    /// not valid in this charset (only possible for UTF-8: every byte maps
    /// to a character in the two single-byte charsets).
    pub fn decode(self, bytes: &[u8]) -> Option<String> {
        self.encoding()
            .decode_without_bom_handling_and_without_replacement(bytes)
            .map(|c| c.into_owned())
    }
}

/// The authcode fields. `authcode` is checked by the service layer:
/// lowercase hex `md5(timestamp_text + user_key)`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The timestamp exactly as sent: the authcode is computed over it.
    pub timestamp_text: String,
    pub timestamp_s: i64,
    /// An account name or an account's e-mail address.
    pub username: String,
    pub authcode: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("timestamp_s", &self.timestamp_s)
            .field("username", &self.username)
            .field("authcode", &"<redacted>")
            .finish()
    }
}

/// `calculateCredits`: what sending `content` to `recipients_count`
/// recipients would cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalculateCredits {
    pub recipients_count: u32,
    /// Decoded with `encoding`.
    pub content: String,
    pub encoding: ContentEncoding,
    /// Priced at the tariff's fast-mode multiplier.
    pub fast: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    CalculateCredits(CalculateCredits),
    /// The caller's available any-time balance.
    GetCreditLimit,
}

impl Action {
    /// A bounded label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Action::CalculateCredits(_) => "calculatecredits",
            Action::GetCreditLimit => "getcreditlimit",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoxisRequest {
    pub return_type: ReturnType,
    pub credentials: Credentials,
    pub action: Action,
}

/// A request that cannot be served, with the format to answer it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub return_type: ReturnType,
    pub code: ErrorCode,
    /// For logs: what is wrong, naming fields, never values.
    pub reason: String,
}

/// The answer format a form asks for; XML unless `returntype` is `json`
/// (ASCII case-insensitive). Used for every answer, errors included.
pub fn return_type_of(form: &Form) -> ReturnType {
    match form.get("returntype") {
        Some(v) if v.eq_ignore_ascii_case(b"json") => ReturnType::Json,
        _ => ReturnType::Xml,
    }
}

/// Validates a form into a typed request.
pub fn classify(form: &Form) -> Result<BoxisRequest, RequestError> {
    let return_type = return_type_of(form);
    let invalid = |reason: String| RequestError {
        return_type,
        code: ErrorCode::InvalidRequest,
        reason,
    };
    match form.get("returntype") {
        None => {}
        Some(v) if v.eq_ignore_ascii_case(b"xml") || v.eq_ignore_ascii_case(b"json") => {}
        Some(_) => return Err(invalid("returntype must be xml or json".into())),
    }
    if let Some(v) = form.get("version") {
        if v != API_VERSION.as_bytes() {
            return Err(invalid(format!("version must be {API_VERSION}")));
        }
    }
    let text = |name: &str, max_len: usize| -> Result<String, RequestError> {
        let raw = form
            .get(name)
            .ok_or_else(|| invalid(format!("{name} is missing")))?;
        if raw.is_empty() {
            return Err(invalid(format!("{name} is empty")));
        }
        if raw.len() > max_len {
            return Err(invalid(format!("{name} is too long")));
        }
        String::from_utf8(raw.to_vec()).map_err(|_| invalid(format!("{name} is not UTF-8")))
    };

    let section = text("section", 16)?;
    if section != "sms" {
        return Err(invalid("section must be sms".into()));
    }
    let action_name = text("action", 32)?;
    let timestamp_text = text("timestamp", TIMESTAMP_MAX_LEN)?;
    if !timestamp_text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("timestamp must be Unix seconds".into()));
    }
    let timestamp_s: i64 = timestamp_text
        .parse()
        .map_err(|_| invalid("timestamp is out of range".into()))?;
    let credentials = Credentials {
        timestamp_text,
        timestamp_s,
        username: text("username", USERNAME_MAX_LEN)?,
        authcode: text("authcode", AUTHCODE_MAX_LEN)?,
    };

    let action = if action_name.eq_ignore_ascii_case("calculateCredits") {
        Action::CalculateCredits(calculate_credits(form).map_err(invalid)?)
    } else if action_name.eq_ignore_ascii_case("getCreditLimit") {
        Action::GetCreditLimit
    } else {
        return Err(invalid(
            "action must be calculateCredits or getCreditLimit".into(),
        ));
    };
    Ok(BoxisRequest {
        return_type,
        credentials,
        action,
    })
}

fn calculate_credits(form: &Form) -> Result<CalculateCredits, String> {
    let count = form
        .get("recipients_count")
        .ok_or("recipients_count is missing")?;
    let recipients_count = std::str::from_utf8(count)
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 7 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|n| (1..=RECIPIENTS_COUNT_MAX).contains(n))
        .ok_or_else(|| {
            format!("recipients_count must be an integer from 1 to {RECIPIENTS_COUNT_MAX}")
        })?;
    let encoding = match form.get("encoding") {
        None => ContentEncoding::Utf8,
        Some(label) => ContentEncoding::parse(label)
            .ok_or("encoding must be one of UTF-8, ISO-8859-2, Windows-1252 (case-sensitive)")?,
    };
    // No content is no message: refused, never priced as an empty one (an
    // empty `content` is a message, of one part).
    let raw_content = form.get("content").ok_or("content is missing")?;
    let content = encoding
        .decode(raw_content)
        .ok_or_else(|| format!("content is not valid {}", encoding.label()))?;
    let fast = match form.get("fast") {
        None | Some(b"") | Some(b"0") => false,
        Some(b"1") => true,
        Some(v) if v.eq_ignore_ascii_case(b"false") => false,
        Some(v) if v.eq_ignore_ascii_case(b"true") => true,
        Some(_) => return Err("fast must be 0 or 1".into()),
    };
    Ok(CalculateCredits {
        recipients_count,
        content,
        encoding,
        fast,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &[u8])]) -> Form {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_vec()))
            .collect()
    }

    fn base(extra: &[(&'static str, &'static [u8])]) -> Form {
        let mut pairs: Vec<(&str, &[u8])> = vec![
            ("version", b"1.0"),
            ("timestamp", b"1336553826"),
            ("username", b"john@example.com"),
            ("authcode", b"0123456789abcdef0123456789abcdef"),
            ("section", b"sms"),
        ];
        pairs.extend_from_slice(extra);
        form(&pairs)
    }

    #[test]
    fn classifies_both_actions() {
        let r = classify(&base(&[
            ("action", b"calculateCredits"),
            ("returntype", b"json"),
            ("recipients_count", b"4"),
            ("content", b"\xe8"),
            ("encoding", b"ISO-8859-2"),
            ("fast", b"1"),
        ]))
        .unwrap();
        assert_eq!(r.return_type, ReturnType::Json);
        assert_eq!(r.credentials.timestamp_s, 1336553826);
        assert_eq!(
            r.action,
            Action::CalculateCredits(CalculateCredits {
                recipients_count: 4,
                content: "č".into(),
                encoding: ContentEncoding::Iso8859_2,
                fast: true,
            })
        );
        let r = classify(&base(&[("action", b"getCreditLimit")])).unwrap();
        assert_eq!(r.action, Action::GetCreditLimit);
        assert_eq!(r.return_type, ReturnType::Xml);
        assert!(!format!("{r:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn decodes_the_three_charsets_exactly() {
        assert_eq!(
            ContentEncoding::Windows1252.decode(b"\x80").as_deref(),
            Some("€")
        );
        assert_eq!(
            ContentEncoding::Iso8859_2.decode(b"\xf5").as_deref(),
            Some("ő")
        );
        assert_eq!(
            ContentEncoding::Utf8.decode("ő".as_bytes()).as_deref(),
            Some("ő")
        );
        assert_eq!(ContentEncoding::Utf8.decode(b"\x80"), None);
        assert_eq!(ContentEncoding::parse(b"utf-8"), None);
        assert_eq!(
            ContentEncoding::parse(b"Windows-1252"),
            Some(ContentEncoding::Windows1252)
        );
    }

    #[test]
    fn rejects_bad_fields_as_invalid_request() {
        let cases: Vec<Form> = vec![
            base(&[("action", b"sendSms")]),
            base(&[("action", b"getCreditLimit"), ("returntype", b"csv")]),
            form(&[
                ("version", b"2.0"),
                ("section", b"sms"),
                ("action", b"getCreditLimit"),
                ("timestamp", b"1"),
                ("username", b"a"),
                ("authcode", b"b"),
            ]),
            base(&[("action", b"calculateCredits")]),
            base(&[("action", b"calculateCredits"), ("recipients_count", b"0")]),
            base(&[("action", b"calculateCredits"), ("recipients_count", b"-1")]),
            base(&[
                ("action", b"calculateCredits"),
                ("recipients_count", b"1000001"),
            ]),
            base(&[
                ("action", b"calculateCredits"),
                ("recipients_count", b"1"),
                ("encoding", b"utf-8"),
            ]),
            base(&[
                ("action", b"calculateCredits"),
                ("recipients_count", b"1"),
                ("content", b"\xff"),
            ]),
            base(&[
                ("action", b"calculateCredits"),
                ("recipients_count", b"1"),
                ("fast", b"2"),
            ]),
            form(&[("section", b"sms"), ("action", b"getCreditLimit")]),
            form(&[
                ("section", b"mms"),
                ("action", b"getCreditLimit"),
                ("timestamp", b"1"),
                ("username", b"a"),
                ("authcode", b"b"),
            ]),
            form(&[
                ("section", b"sms"),
                ("action", b"getCreditLimit"),
                ("timestamp", b"-1"),
                ("username", b"a"),
                ("authcode", b"b"),
            ]),
        ];
        for f in cases {
            let e = classify(&f).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{f:?}");
        }
        let e = classify(&base(&[("action", b"x"), ("returntype", b"JSON")])).unwrap_err();
        assert_eq!(e.return_type, ReturnType::Json);
    }
}
