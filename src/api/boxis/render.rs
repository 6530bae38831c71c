//! Boxis answers (SPEC 2.1), byte for byte the documented shapes:
//!
//! ```text
//! <?xml version="1.0" encoding="UTF-8"?>
//! <return><result>1</result><resulttxt>success</resulttxt><params><credit>4</credit></params><timestamp>NOW</timestamp></return>
//! <return><result>0</result><resulttxt>error: NAME</resulttxt><timestamp>NOW</timestamp></return>
//! {"result":"1","resulttxt":"success","params":{"credit":4},"timestamp":NOW}
//! {"result":"0","resulttxt":"error: NAME","timestamp":NOW}
//! ```
//!
//! `NAME` is the symbolic error code (`error: timestamp_out_of_window`), so
//! a client can branch on it; no other text goes into an answer. Credits are
//! rendered with up to 3 decimals and no trailing zeros, as a JSON number
//! (no floating point involved). No client text is ever echoed, so nothing
//! here needs escaping.

use super::command::ReturnType;
use crate::error::ErrorCode;
use crate::money::format_credits;

/// First line of every XML answer.
pub const XML_PROLOG: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";

/// `Content-Type` of an answer.
pub fn content_type(return_type: ReturnType) -> &'static str {
    match return_type {
        ReturnType::Xml => "text/xml; charset=UTF-8",
        ReturnType::Json => "application/json",
    }
}

/// A success answer carrying `credit` (milli-credits) and the server's time.
pub fn success(return_type: ReturnType, credit_milli: i64, now_s: i64) -> String {
    let credit = format_credits(credit_milli);
    match return_type {
        ReturnType::Xml => format!(
            "{XML_PROLOG}<return><result>1</result><resulttxt>success</resulttxt>\
             <params><credit>{credit}</credit></params><timestamp>{now_s}</timestamp></return>\n"
        ),
        ReturnType::Json => format!(
            "{{\"result\":\"1\",\"resulttxt\":\"success\",\"params\":{{\"credit\":{credit}}},\
             \"timestamp\":{now_s}}}"
        ),
    }
}

/// An error answer: `resulttxt` is `error: ` and the symbolic code, then
/// for `invalid_request` what is wrong (`detail`: it names the field, never
/// a value). A timestamp out of the window also says `timestamperror`,
/// which the vendor's sample client checks before it resynchronises to the
/// `timestamp` of the answer.
pub fn error(return_type: ReturnType, code: ErrorCode, detail: Option<&str>, now_s: i64) -> String {
    let name = code.name();
    let text = match detail {
        Some(d) if code == ErrorCode::InvalidRequest => format!("error: {name}: {d}"),
        _ => format!("error: {name}"),
    };
    let timestamp_error = code == ErrorCode::TimestampOutOfWindow;
    match return_type {
        ReturnType::Xml => {
            let mut escaped = String::with_capacity(text.len());
            for c in text.chars() {
                match c {
                    '<' => escaped.push_str("&lt;"),
                    '>' => escaped.push_str("&gt;"),
                    '&' => escaped.push_str("&amp;"),
                    c if c.is_control() => escaped.push('?'),
                    c => escaped.push(c),
                }
            }
            let marker = if timestamp_error {
                "<timestamperror>1</timestamperror>"
            } else {
                ""
            };
            format!(
                "{XML_PROLOG}<return><result>0</result><resulttxt>{escaped}</resulttxt>\
                 {marker}<timestamp>{now_s}</timestamp></return>\n"
            )
        }
        ReturnType::Json => {
            let text = serde_json::Value::String(text);
            let marker = if timestamp_error {
                ",\"timestamperror\":1"
            } else {
                ""
            };
            format!("{{\"result\":\"0\",\"resulttxt\":{text}{marker},\"timestamp\":{now_s}}}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_the_spec() {
        assert_eq!(
            success(ReturnType::Xml, 4000, 1336558351),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<return><result>1</result><resulttxt>success</resulttxt><params><credit>4</credit></params><timestamp>1336558351</timestamp></return>\n"
        );
        assert_eq!(
            success(ReturnType::Json, 4000, 1335777400),
            "{\"result\":\"1\",\"resulttxt\":\"success\",\"params\":{\"credit\":4},\"timestamp\":1335777400}"
        );
        assert_eq!(
            error(ReturnType::Xml, ErrorCode::Replayed, None, 7),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<return><result>0</result><resulttxt>error: replayed</resulttxt><timestamp>7</timestamp></return>\n"
        );
        assert_eq!(
            error(ReturnType::Json, ErrorCode::TimestampOutOfWindow, None, 7),
            "{\"result\":\"0\",\"resulttxt\":\"error: timestamp_out_of_window\",\"timestamperror\":1,\"timestamp\":7}"
        );
        assert_eq!(
            error(ReturnType::Xml, ErrorCode::TimestampOutOfWindow, None, 7),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<return><result>0</result><resulttxt>error: timestamp_out_of_window</resulttxt><timestamperror>1</timestamperror><timestamp>7</timestamp></return>\n"
        );
    }

    #[test]
    fn invalid_requests_say_which_field_is_wrong() {
        let detail = Some("field \"a<b\" is given more than once");
        let json = error(ReturnType::Json, ErrorCode::InvalidRequest, detail, 7);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v["resulttxt"],
            "error: invalid_request: field \"a<b\" is given more than once"
        );
        let xml = error(ReturnType::Xml, ErrorCode::InvalidRequest, detail, 7);
        assert!(xml.contains("<resulttxt>error: invalid_request: field \"a&lt;b\" is given more than once</resulttxt>"), "{xml}");
        // Other codes keep their bare name, which clients branch on.
        let auth = error(ReturnType::Json, ErrorCode::AuthFailed, Some("authcode"), 7);
        assert!(
            auth.contains("\"resulttxt\":\"error: auth_failed\""),
            "{auth}"
        );
    }

    #[test]
    fn json_is_valid_with_fractional_and_negative_credit() {
        for (milli, expect) in [(2500, "2.5"), (-125, "-0.125"), (0, "0"), (1010, "1.01")] {
            let text = success(ReturnType::Json, milli, 1);
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(v["result"].is_string());
            assert!(v["params"]["credit"].is_number());
            assert_eq!(v["params"]["credit"].to_string(), expect);
        }
        for code in ErrorCode::ALL {
            let v: serde_json::Value = serde_json::from_str(&error(
                ReturnType::Json,
                code,
                Some("field \"x\" is wrong"),
                1,
            ))
            .unwrap();
            let expected = match code {
                ErrorCode::InvalidRequest => {
                    "error: invalid_request: field \"x\" is wrong".to_string()
                }
                _ => format!("error: {}", code.name()),
            };
            assert_eq!(v["resulttxt"], expected);
        }
    }
}
