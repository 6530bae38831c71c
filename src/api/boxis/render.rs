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

/// An error answer: `resulttxt` is `error: ` and the symbolic code.
pub fn error(return_type: ReturnType, code: ErrorCode, now_s: i64) -> String {
    let name = code.name();
    match return_type {
        ReturnType::Xml => format!(
            "{XML_PROLOG}<return><result>0</result><resulttxt>error: {name}</resulttxt>\
             <timestamp>{now_s}</timestamp></return>\n"
        ),
        ReturnType::Json => {
            format!("{{\"result\":\"0\",\"resulttxt\":\"error: {name}\",\"timestamp\":{now_s}}}")
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
            error(ReturnType::Xml, ErrorCode::Replayed, 7),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<return><result>0</result><resulttxt>error: replayed</resulttxt><timestamp>7</timestamp></return>\n"
        );
        assert_eq!(
            error(ReturnType::Json, ErrorCode::TimestampOutOfWindow, 7),
            "{\"result\":\"0\",\"resulttxt\":\"error: timestamp_out_of_window\",\"timestamp\":7}"
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
            let v: serde_json::Value =
                serde_json::from_str(&error(ReturnType::Json, code, 1)).unwrap();
            assert_eq!(v["resulttxt"], format!("error: {}", code.name()));
        }
    }
}
