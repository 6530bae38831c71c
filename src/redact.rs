//! Secrets out of log lines (SPEC 5.3): Ozeki passes the password in the
//! query string, Boxis an authcode. Every URL or form that reaches a log
//! line, or is stored (idempotency fingerprints), goes through here first.
//! Names and other values are kept byte for byte, so a line still says
//! what the request was.
//!
//! Message text is personal data: a URL in a log line shows only its
//! length (`messagedata=[21 bytes]`) unless the operator set
//! `log.message_text: true`.

/// Parameter names whose values never reach a log: Ozeki passes the
/// password in the query string, Boxis an authcode (SPEC 5.3). Matched
/// case-insensitively; any name containing "pass" counts.
const SECRET_PARAMS: [&str; 5] = ["authcode", "token", "apikey", "api_key", "secret"];

fn is_secret_param(name: &str) -> bool {
    let decoded = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    let lower = decoded.to_ascii_lowercase();
    lower.contains("pass") || SECRET_PARAMS.contains(&lower.as_str())
}

/// Parameters that carry message text: Ozeki's `messagedata` (and the
/// batch form `messagedata0`, `messagedata1`, …), and the `text`,
/// `message` and `content` names other gateways' clients use.
fn is_text_param(name: &str) -> bool {
    let decoded = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    let lower = decoded.to_ascii_lowercase();
    let base = lower.trim_end_matches(|c: char| c.is_ascii_digit());
    matches!(base, "messagedata" | "text" | "message" | "content")
}

/// Longest URL an access line repeats; a batch GET can carry thousands of
/// recipients.
const URL_LOG_MAX_BYTES: usize = 2048;

/// `path?query` for a log line, with the value of every secret parameter
/// replaced by `***`, and message text by its length unless `message_text`
/// (names and other values kept byte for byte), cut at
/// [`URL_LOG_MAX_BYTES`].
pub fn redacted_url(path: &str, query: Option<&str>, message_text: bool) -> String {
    let mut out = rewrite_query(path, query, |name, value, out| {
        if is_secret_param(name) {
            out.push_str("***");
        } else if !message_text && is_text_param(name) {
            out.push_str(&format!("[{} bytes]", value.len()));
        } else {
            out.push_str(value);
        }
    });
    if out.len() > URL_LOG_MAX_BYTES {
        let total = out.len();
        let mut cut = URL_LOG_MAX_BYTES;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str(&format!("...({total} bytes)"));
    }
    out
}

/// `path?query` with the value of every secret parameter replaced by
/// `***`: what is stored (idempotency fingerprints) or repeated in full.
pub fn redact_query(path: &str, query: Option<&str>) -> String {
    rewrite_query(path, query, |name, value, out| {
        out.push_str(if is_secret_param(name) { "***" } else { value })
    })
}

/// `path?query` with each `name=value` pair's value written by `value`;
/// pairs without `=` are kept as they are.
fn rewrite_query(
    path: &str,
    query: Option<&str>,
    mut value: impl FnMut(&str, &str, &mut String),
) -> String {
    let Some(query) = query else {
        return path.to_string();
    };
    let mut out = String::with_capacity(path.len() + 1 + query.len());
    out.push_str(path);
    out.push('?');
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((name, v)) => {
                out.push_str(name);
                out.push('=');
                value(name, v, &mut out);
            }
            None => out.push_str(pair),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_urls_hide_secret_values_only() {
        assert_eq!(
            redacted_url(
                "/api",
                Some("action=sendmessage&UserName=john&PassWord=s%26cret&recipient=%2B36&authcode=abc&passwd"),
                false,
            ),
            "/api?action=sendmessage&UserName=john&PassWord=***&recipient=%2B36&authcode=***&passwd"
        );
        assert_eq!(redacted_url("/api", None, false), "/api");
        assert_eq!(
            redacted_url("/x", Some("p%61ssword=x&a=b"), false),
            "/x?p%61ssword=***&a=b"
        );
        let long = format!("password=secret&recipient={}", "é".repeat(3000));
        let logged = redacted_url("/api", Some(&long), false);
        assert!(logged.starts_with("/api?password=***&recipient="));
        assert!(logged.ends_with(&format!(
            "...({} bytes)",
            "/api?password=***&recipient=".len() + 6000
        )));
        assert!(!logged.contains("secret"));
    }

    #[test]
    fn message_text_shows_only_its_length_unless_the_operator_keeps_it() {
        let query = "action=sendmessage&recipient=%2B36&messagedata=Hello%20Anna&MessageData1=x&Text=hi&content=abc&password=pw";
        assert_eq!(
            redacted_url("/api", Some(query), false),
            "/api?action=sendmessage&recipient=%2B36&messagedata=[12 bytes]&MessageData1=[1 bytes]&Text=[2 bytes]&content=[3 bytes]&password=***"
        );
        assert_eq!(
            redacted_url("/api", Some(query), true),
            "/api?action=sendmessage&recipient=%2B36&messagedata=Hello%20Anna&MessageData1=x&Text=hi&content=abc&password=***"
        );
        // Secrets stay hidden either way; stored forms keep the text.
        assert_eq!(
            redact_query("", Some("messagedata=hi&pass=x")),
            "?messagedata=hi&pass=***"
        );
    }

    proptest::proptest! {
        #[test]
        fn no_secret_or_text_value_survives(
            base in proptest::sample::select(
                &["pass", "password", "authcode", "messagedata", "messagedata7", "text", "x"][..],
            ),
            case_mask in proptest::prelude::any::<u32>(),
            value in "[a-zA-Z0-9%]{1,20}",
        ) {
            // Names in any ASCII case, as HTTP servers fold them.
            let name: String = base
                .chars()
                .enumerate()
                .map(|(i, c)| if case_mask >> (i % 32) & 1 == 1 { c.to_ascii_uppercase() } else { c })
                .collect();
            let query = format!("{name}={value}Z");
            let logged = redacted_url("/api", Some(&query), false);
            if !name.eq_ignore_ascii_case("x") {
                let leaked = format!("{value}Z");
                proptest::prop_assert!(!logged.contains(&leaked), "{}", logged);
            }
        }
    }
}
