//! Secrets out of log lines (SPEC 5.3): Ozeki passes the password in the
//! query string, Boxis an authcode. Every URL or form that reaches a log
//! line, or is stored (idempotency fingerprints), goes through here first.
//! Names and other values are kept byte for byte, so a line still says
//! what the request was.

/// Parameter names whose values never reach a log: Ozeki passes the
/// password in the query string, Boxis an authcode (SPEC 5.3). Matched
/// case-insensitively; any name containing "pass" counts.
const SECRET_PARAMS: [&str; 5] = ["authcode", "token", "apikey", "api_key", "secret"];

fn is_secret_param(name: &str) -> bool {
    let decoded = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    let lower = decoded.to_ascii_lowercase();
    lower.contains("pass") || SECRET_PARAMS.contains(&lower.as_str())
}

/// Longest URL an access line repeats; a batch GET can carry thousands of
/// recipients.
const URL_LOG_MAX_BYTES: usize = 2048;

/// `path?query` for a log line, with the value of every secret parameter
/// replaced by `***` (names and other values kept byte for byte), cut at
/// [`URL_LOG_MAX_BYTES`].
pub fn redacted_url(path: &str, query: Option<&str>) -> String {
    let mut out = redact_query(path, query);
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

pub fn redact_query(path: &str, query: Option<&str>) -> String {
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
            Some((name, _)) if is_secret_param(name) => {
                out.push_str(name);
                out.push_str("=***");
            }
            _ => out.push_str(pair),
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
                Some("action=sendmessage&UserName=john&PassWord=s%26cret&recipient=%2B36&authcode=abc&passwd")
            ),
            "/api?action=sendmessage&UserName=john&PassWord=***&recipient=%2B36&authcode=***&passwd"
        );
        assert_eq!(redacted_url("/api", None), "/api");
        assert_eq!(
            redacted_url("/x", Some("p%61ssword=x&a=b")),
            "/x?p%61ssword=***&a=b"
        );
        let long = format!("password=secret&recipient={}", "é".repeat(3000));
        let logged = redacted_url("/api", Some(&long));
        assert!(logged.starts_with("/api?password=***&recipient="));
        assert!(logged.ends_with(&format!(
            "...({} bytes)",
            "/api?password=***&recipient=".len() + 6000
        )));
        assert!(!logged.contains("secret"));
    }
}
