//! Report URL templates (pure): the keywords a template names, tollgate's
//! own callback URL asking the gateway for them, substituting the
//! gateway's values into the client's template, and rewriting the
//! `reporturl` parameter of a raw query string or form body.
//!
//! Keywords are `$` followed by letters, digits and `_`, matched as whole
//! words (`$messageidx` is not `$messageid`). Values are substituted as
//! the gateway sent them to tollgate — still percent-encoded, byte for
//! byte — so the client's URL reads exactly as if the gateway had filled
//! it in. Everything here is bounded: at most [`TEMPLATE_KEYWORDS_MAX`]
//! keywords from a template of at most [`TEMPLATE_MAX_BYTES`].

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::api::percent::decode_lenient;
use crate::config::dlr::is_keyword;

/// Longest client template tollgate keeps.
pub const TEMPLATE_MAX_BYTES: usize = 2048;
/// Most distinct keywords taken from one template.
pub const TEMPLATE_KEYWORDS_MAX: usize = 32;

/// The keywords of `template`, in order of first appearance, at most
/// [`TEMPLATE_KEYWORDS_MAX`].
pub fn template_keywords(template: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (start, end) in keyword_spans(template) {
        let kw = &template[start..end];
        if is_keyword(kw) && !out.iter().any(|k| k == kw) {
            out.push(kw.to_string());
            if out.len() == TEMPLATE_KEYWORDS_MAX {
                break;
            }
        }
    }
    out
}

/// Byte spans of every `$word` in `text`.
fn keyword_spans(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let mut j = i + 1;
            while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
                j += 1;
            }
            if j > i + 1 {
                spans.push((i, j));
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    spans
}

/// The query name a keyword travels under in tollgate's callback URL.
pub fn query_name(keyword: &str) -> &str {
    keyword.trim_start_matches('$')
}

/// `{public_url}/dlr/{token}?messageid=$messageid&…`: one pair per keyword.
pub fn callback_url(public_url: &str, token: &str, keywords: &[String]) -> String {
    let mut url = format!("{public_url}/dlr/{token}");
    for (i, kw) in keywords.iter().enumerate() {
        url.push(if i == 0 { '?' } else { '&' });
        url.push_str(query_name(kw));
        url.push('=');
        url.push_str(kw);
    }
    url
}

/// `template` with every keyword found in `values` (keyword → raw value)
/// replaced; unknown keywords stay as they are.
pub fn substitute(template: &str, values: &[(String, String)]) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut last = 0;
    for (start, end) in keyword_spans(template) {
        let kw = &template[start..end];
        if let Some((_, v)) = values.iter().find(|(k, _)| k == kw) {
            out.push_str(&template[last..start]);
            out.push_str(v);
            last = end;
        }
    }
    out.push_str(&template[last..]);
    out
}

/// Characters escaped in a rewritten `reporturl` value: everything but
/// unreserved characters.
const VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Whether a raw `name` (still percent-encoded) names `reporturl` the way
/// the parameter parser reads names (decoded, trimmed, lower-cased).
fn names_reporturl(raw_name: &[u8]) -> bool {
    let mut decoded = Vec::with_capacity(raw_name.len());
    decode_lenient(raw_name, true, &mut decoded);
    let text = String::from_utf8_lossy(&decoded).into_owned();
    crate::api::owned::fold(text) == "reporturl"
}

/// Replaces the value of every `reporturl` pair of a raw
/// `application/x-www-form-urlencoded` text (query or body) with
/// `new_value`; `None` when there is none.
pub fn rewrite_reporturl(raw: &[u8], new_value: &str) -> Option<Vec<u8>> {
    let encoded = utf8_percent_encode(new_value, VALUE).to_string();
    let mut out = Vec::with_capacity(raw.len() + encoded.len());
    let mut found = false;
    for (i, pair) in raw.split(|b| *b == b'&').enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        let name = pair.split(|b| *b == b'=').next().unwrap_or(pair);
        if names_reporturl(name) {
            found = true;
            out.extend_from_slice(name);
            out.push(b'=');
            out.extend_from_slice(encoded.as_bytes());
        } else {
            out.extend_from_slice(pair);
        }
    }
    found.then_some(out)
}

/// `raw` with `reporturl=<new_value>` appended.
pub fn append_reporturl(raw: &[u8], new_value: &str) -> Vec<u8> {
    let encoded = utf8_percent_encode(new_value, VALUE).to_string();
    let mut out = raw.to_vec();
    if !out.is_empty() && !out.ends_with(b"&") {
        out.push(b'&');
    }
    out.extend_from_slice(b"reporturl=");
    out.extend_from_slice(encoded.as_bytes());
    out
}

/// Splits a raw query into (raw name, raw value) pairs, bounded.
pub fn raw_pairs(query: &str, max_pairs: usize) -> Option<Vec<(&str, &str)>> {
    let mut out = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if out.len() == max_pairs {
            return None;
        }
        out.push(pair.split_once('=').unwrap_or((pair, "")));
    }
    Some(out)
}

/// A raw value decoded for reading (recipient, status, message id).
pub fn decode_value(raw: &str) -> String {
    let mut out = Vec::with_capacity(raw.len());
    decode_lenient(raw.as_bytes(), true, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keywords_are_whole_words_in_order() {
        assert_eq!(
            template_keywords("http://c/r?id=$messageid&to=$recipient&x=$messageid&$ &y=$a_1"),
            vec!["$messageid", "$recipient", "$a_1"]
        );
    }

    #[test]
    fn substitution_is_exact_and_leaves_unknown_keywords() {
        let values = vec![
            ("$messageid".to_string(), "abc%20d".to_string()),
            ("$recipient".to_string(), "%2B3620".to_string()),
        ];
        assert_eq!(
            substitute(
                "http://c/r?id=$messageid&to=$recipient&z=$messageidx&q=$other",
                &values
            ),
            "http://c/r?id=abc%20d&to=%2B3620&z=$messageidx&q=$other"
        );
    }

    #[test]
    fn the_callback_asks_for_each_keyword() {
        assert_eq!(
            callback_url(
                "http://t:9",
                "tok",
                &["$messageid".into(), "$deliverystatus".into()]
            ),
            "http://t:9/dlr/tok?messageid=$messageid&deliverystatus=$deliverystatus"
        );
    }

    #[test]
    fn reporturl_is_rewritten_wherever_it_is_spelt() {
        let raw = b"action=sendmessage&ReportURL=http%3A%2F%2Fc%2Fr&messagedata=hi";
        let out = rewrite_reporturl(raw, "http://t/dlr/x?a=$b").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "action=sendmessage&ReportURL=http%3A%2F%2Ft%2Fdlr%2Fx%3Fa%3D%24b&messagedata=hi"
        );
        assert!(rewrite_reporturl(b"a=1&reporturlx=2", "u").is_none());
        let out = rewrite_reporturl(b"report%75rl=1", "u").unwrap();
        assert_eq!(out, b"report%75rl=u");
        assert_eq!(append_reporturl(b"a=1", "u"), b"a=1&reporturl=u");
        assert_eq!(append_reporturl(b"", "u"), b"reporturl=u");
    }

    proptest! {
        #[test]
        fn substitution_never_panics_and_without_values_is_identity(t in "\\PC{0,200}") {
            prop_assert_eq!(substitute(&t, &[]), t.clone());
            let kws = template_keywords(&t);
            prop_assert!(kws.len() <= TEMPLATE_KEYWORDS_MAX);
            prop_assert!(kws.iter().all(|k| is_keyword(k)));
        }

        #[test]
        fn a_rewritten_reporturl_decodes_to_the_new_value(
            prefix in "[a-z]{1,8}=[a-z0-9]{0,8}",
            value in "\\PC{0,80}",
        ) {
            let raw = format!("{prefix}&reporturl=old");
            let out = rewrite_reporturl(raw.as_bytes(), &value).unwrap();
            let text = String::from_utf8(out).unwrap();
            let params = crate::api::ozeki::params::parse_params(
                Some(text.as_bytes()), None, &Default::default(),
            ).unwrap();
            prop_assert_eq!(params.get("reporturl"), Some(value.as_str()));
        }
    }
}
