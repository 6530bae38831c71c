//! The simulator's own query-string / form-body parser.
//!
//! Deliberately independent of tollgate's `crate::api` parsers: the simulator
//! is a test double and must not share their bugs. Rules, as Ozeki NG applies
//! them:
//!
//! * pairs are separated by `&`, names from values by the first `=`;
//! * `+` is a space, `%XX` a byte; a malformed `%` escape is kept literally;
//! * names are matched case-insensitively (stored lower-cased), and the
//!   misspelt legacy `recepient…` is an alias of `recipient…` (also indexed:
//!   `recepient0`);
//! * values are decoded as UTF-8, or with the charset named by `_charset_`
//!   (e.g. `windows-1252`, `iso-8859-2`); undecodable bytes never fail, they
//!   become U+FFFD.

use encoding_rs::Encoding;

/// Parsed, decoded request parameters (query first, then body).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// Parses a raw query string and an optional form body, in that order.
    /// When a name occurs more than once, [`Params::get`] returns the first.
    pub fn parse(query: &[u8], body: Option<&[u8]>) -> Params {
        let mut raw: Vec<(Vec<u8>, Vec<u8>)> = split_pairs(query).collect();
        if let Some(body) = body {
            raw.extend(split_pairs(body));
        }
        // `_charset_` decides how every value is decoded, so it is found
        // first.
        Params::decode(raw)
    }

    /// Like [`Params::parse`] for a `multipart/form-data` body: the query's
    /// pairs, then the body's fields (names and values as sent, not
    /// percent-encoded).
    pub fn with_fields(query: &[u8], fields: Vec<(Vec<u8>, Vec<u8>)>) -> Params {
        let mut raw: Vec<(Vec<u8>, Vec<u8>)> = split_pairs(query).collect();
        raw.extend(fields);
        Params::decode(raw)
    }

    fn decode(raw: Vec<(Vec<u8>, Vec<u8>)>) -> Params {
        let encoding = raw
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(b"_charset_"))
            .and_then(|(_, v)| Encoding::for_label(v.trim_ascii()));
        let pairs = raw
            .into_iter()
            .map(|(n, v)| {
                (
                    normalise_name(&decode_text(&n, encoding)),
                    decode_text(&v, encoding),
                )
            })
            .collect();
        Params { pairs }
    }

    /// First value of `name` (case-insensitive; `recepient` aliases apply).
    pub fn get(&self, name: &str) -> Option<&str> {
        let name = normalise_name(name);
        self.pairs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The trimmed, non-empty value of `name`.
    pub fn get_nonempty(&self, name: &str) -> Option<&str> {
        self.get(name).map(str::trim).filter(|v| !v.is_empty())
    }

    /// The action, lower-cased (`sendMessage` → `sendmessage`).
    pub fn action(&self) -> Option<String> {
        self.get_nonempty("action").map(|a| a.to_ascii_lowercase())
    }

    /// All decoded pairs, names lower-cased, in arrival order.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }
}

/// The API paths the simulator serves, as the real gateway registers them.
pub const API_PATHS: [&str; 3] = ["/api", "/httpapi", "/ozeki"];

/// Whether a request path reaches the API. The real gateway runs on
/// HTTP.sys (its `Server` header says `Microsoft-HTTPAPI`), which matches a
/// request against its registered URL prefixes on the *converted* URL —
/// escapes decoded, dot segments resolved, compared case-insensitively —
/// and hands the prefix's handler everything below it. So do we, leniently
/// (the simulator must never be stricter than the gateway): escapes are
/// decoded twice, `\` is a `/`, repeated slashes collapse, trailing dots and
/// spaces of a segment are dropped (Windows names), and `/api/anything` is
/// the API.
pub fn is_api_path(raw: &str) -> bool {
    let once = percent_decode_path(raw.as_bytes());
    let twice = percent_decode_path(&once);
    let decoded = String::from_utf8_lossy(&twice).replace('\\', "/");
    let mut stack: Vec<String> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            ".." => {
                stack.pop();
            }
            s => {
                let s = s.trim_end_matches(['.', ' ']);
                if !s.is_empty() {
                    stack.push(s.to_lowercase());
                }
            }
        }
    }
    stack
        .first()
        .is_some_and(|first| API_PATHS.iter().any(|p| p[1..] == **first))
}

/// Percent-decoding for a path: like [`percent_decode`] but `+` stays.
fn percent_decode_path(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' {
            if let (Some(h), Some(l)) = (
                input.get(i + 1).and_then(|&h| hex(h)),
                input.get(i + 2).and_then(|&l| hex(l)),
            ) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    out
}

/// Splits a recipient list on `,` and `;`, trimming blanks and dropping
/// empty entries.
pub fn split_recipients(list: &str) -> impl Iterator<Item = &str> {
    list.split([',', ';'])
        .map(str::trim)
        .filter(|r| !r.is_empty())
}

/// Lower-cases a name and maps the `recepient` misspelling to `recipient`.
fn normalise_name(name: &str) -> String {
    let lower = name.trim().to_ascii_lowercase();
    match lower.strip_prefix("recepient") {
        Some(rest) => format!("recipient{rest}"),
        None => lower,
    }
}

/// Splits `a=1&b=2` into raw (still percent-encoded) name/value pairs and
/// percent-decodes each side. Empty segments (`a=1&&b=2`) are skipped.
fn split_pairs(input: &[u8]) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> + '_ {
    input
        .split(|&b| b == b'&')
        .filter(|seg| !seg.is_empty())
        .map(|seg| match seg.iter().position(|&b| b == b'=') {
            Some(eq) => (percent_decode(&seg[..eq]), percent_decode(&seg[eq + 1..])),
            None => (percent_decode(seg), Vec::new()),
        })
}

/// Decodes `+` to a space and `%XX` to the byte XX. A `%` not followed by two
/// hex digits is kept as is.
pub fn percent_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                input.get(i + 1).and_then(|&h| hex(h)),
                input.get(i + 2).and_then(|&l| hex(l)),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes bytes with the given charset (UTF-8 when none), lossily.
fn decode_text(bytes: &[u8], encoding: Option<&'static Encoding>) -> String {
    match encoding {
        Some(enc) if enc != encoding_rs::UTF_8 => {
            enc.decode_without_bom_handling(bytes).0.into_owned()
        }
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plus_and_percent_decoding() {
        let p = Params::parse(b"messagedata=Hello+w%C3%B6rld%21&x=100%25", None);
        assert_eq!(p.get("messagedata"), Some("Hello wörld!"));
        assert_eq!(p.get("x"), Some("100%"));
    }

    #[test]
    fn malformed_escapes_are_kept() {
        assert_eq!(percent_decode(b"a%zzb%4"), b"a%zzb%4");
        assert_eq!(percent_decode(b"%"), b"%");
        assert_eq!(percent_decode(b"%41%4a%4A"), b"AJJ");
    }

    #[test]
    fn names_are_case_insensitive_and_recepient_is_an_alias() {
        let p = Params::parse(b"Action=sendMessage&RECEPIENT=%2B361&messageData=hi", None);
        assert_eq!(p.action().as_deref(), Some("sendmessage"));
        assert_eq!(p.get("recipient"), Some("+361"));
        assert_eq!(p.get("Recipient"), Some("+361"));
        assert_eq!(p.get("MESSAGEDATA"), Some("hi"));
        let p = Params::parse(b"recepient0=1&Recepient1=2", None);
        assert_eq!(p.get("recipient0"), Some("1"));
        assert_eq!(p.get("recipient1"), Some("2"));
    }

    #[test]
    fn query_then_body_first_wins() {
        let p = Params::parse(b"action=sendmessage&a=q", Some(b"a=b&username=john"));
        assert_eq!(p.get("a"), Some("q"));
        assert_eq!(p.get("username"), Some("john"));
        assert_eq!(p.pairs().len(), 4);
    }

    #[test]
    fn empty_segments_and_valueless_names() {
        let p = Params::parse(b"&&a&b=&=c", None);
        assert_eq!(p.get("a"), Some(""));
        assert_eq!(p.get("b"), Some(""));
        assert_eq!(p.get_nonempty("b"), None);
        assert_eq!(p.get(""), Some("c"));
        assert_eq!(p.get("missing"), None);
    }

    #[test]
    fn charset_windows_1252_and_iso_8859_2() {
        // 0xE9 is é in windows-1252; 0xF5 is ő in iso-8859-2.
        let p = Params::parse(b"_charset_=windows-1252&messagedata=caf%E9", None);
        assert_eq!(p.get("messagedata"), Some("café"));
        let p = Params::parse(b"messagedata=%F5&_charset_=ISO-8859-2", None);
        assert_eq!(p.get("messagedata"), Some("ő"));
    }

    #[test]
    fn invalid_utf8_is_lossy_not_fatal() {
        let p = Params::parse(b"messagedata=caf%E9%FF", None);
        assert_eq!(p.get("messagedata"), Some("caf\u{FFFD}\u{FFFD}"));
        // Unknown charsets fall back to UTF-8.
        let p = Params::parse(b"_charset_=klingon&m=%C3%A9", None);
        assert_eq!(p.get("m"), Some("é"));
    }

    #[test]
    fn api_paths_are_matched_the_way_http_sys_matches_them() {
        for p in [
            "/api",
            "/API/",
            "//api",
            "/./api",
            "/x/../api",
            "/%61pi",
            "/api/send",
            "/HttpApi",
            "/ozeki.",
            "/%2561pi",
            "\\api",
        ] {
            assert!(is_api_path(p), "{p}");
        }
        for p in ["/", "/apix", "/x/api", "/api/../x", "/sim"] {
            assert!(!is_api_path(p), "{p}");
        }
    }

    #[test]
    fn recipients_split_on_comma_and_semicolon() {
        let r: Vec<_> = split_recipients(" +361, 362;;363 ,").collect();
        assert_eq!(r, ["+361", "362", "363"]);
        assert_eq!(split_recipients("").count(), 0);
    }
}
