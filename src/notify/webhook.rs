//! Signed webhooks: the body tollgate POSTs and the signature a receiver
//! checks.
//!
//! The signature is an HMAC-SHA256 (RFC 2104) under the configured secret
//! of `"<t>.<body>"`, sent as `X-Tollgate-Signature: t=<unix seconds>,
//! v1=<lowercase hex>`, the scheme Stripe and GitHub receivers already
//! know. A receiver recomputes it over the raw body, compares in constant
//! time, and refuses a `t` too far from its own clock (replays).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::money::format_credits;
use crate::notify::low_balance::Crossing;

pub const SIGNATURE_HEADER: &str = "X-Tollgate-Signature";
pub const EVENT_HEADER: &str = "X-Tollgate-Event";
/// The delivery's id: the same on every retry of one notification, so a
/// receiver can drop a duplicate (a retry after a success whose answer was
/// lost).
pub const DELIVERY_HEADER: &str = "X-Tollgate-Delivery";

pub const LOW_BALANCE_EVENT: &str = "low_balance";

fn mac(secret: &[u8], timestamp_s: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `X-Tollgate-Signature` value for `body` sent at `timestamp_s`.
pub fn sign(secret: &[u8], timestamp_s: i64, body: &[u8]) -> String {
    let tag = mac(secret, timestamp_s, body).finalize().into_bytes();
    format!("t={timestamp_s},v1={}", hex::encode(tag))
}

/// What a receiver does: `header` is a valid signature of `body` under
/// `secret`, made within `tolerance_s` of `now_s`.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now_s: i64, tolerance_s: i64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for field in header.split(',') {
        match field.trim().split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => v1 = hex::decode(value).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    if (now_s - t).abs() > tolerance_s {
        return false;
    }
    mac(secret, t, body).verify_slice(&v1).is_ok()
}

/// The JSON body of a low-balance notification. Amounts are credits as
/// decimal strings (the ledger's integers, never floats).
pub fn low_balance_body(crossing: &Crossing, delivery_id: &str, at_unix_ms: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "event": LOW_BALANCE_EVENT,
        "id": delivery_id,
        "account": crossing.account,
        "available": format_credits(crossing.available_milli),
        "threshold": format_credits(crossing.threshold_milli),
        "at_unix_ms": at_unix_ms,
    }))
    .expect("a JSON object serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_and_nothing_else_does() {
        let body = br#"{"event":"low_balance"}"#;
        let sig = sign(b"0123456789abcdef", 1_700_000_000, body);
        assert!(sig.starts_with("t=1700000000,v1="), "{sig}");
        assert!(verify(b"0123456789abcdef", &sig, body, 1_700_000_010, 300));
        assert!(
            !verify(b"0123456789abcdeX", &sig, body, 1_700_000_010, 300),
            "wrong secret"
        );
        assert!(
            !verify(b"0123456789abcdef", &sig, b"{}", 1_700_000_010, 300),
            "other body"
        );
        assert!(
            !verify(b"0123456789abcdef", &sig, body, 1_700_001_000, 300),
            "too old"
        );
        assert!(!verify(b"0123456789abcdef", "t=x,v1=zz", body, 0, 300));
        assert!(!verify(b"0123456789abcdef", "", body, 0, 300));
    }

    /// RFC 4231 test case 2 (key "Jefe"), through the same MAC: the
    /// signature is standard HMAC-SHA256, so any receiver's library agrees.
    #[test]
    fn it_is_standard_hmac_sha256() {
        let mut m = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(m.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_body_says_who_and_how_much_in_credits() {
        let body = low_balance_body(
            &Crossing {
                account: "john".into(),
                available_milli: 9_500,
                threshold_milli: 10_000,
            },
            "lb-1",
            42,
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["account"], "john");
        assert_eq!(v["available"], "9.5");
        assert_eq!(v["threshold"], "10");
        assert_eq!(v["id"], "lb-1");
    }
}
