//! Signed webhooks: the body tollgate POSTs and the signature a receiver
//! checks.
//!
//! The signature is an HMAC-SHA256 (RFC 2104) of the raw body under the
//! configured secret, sent as `X-Tollgate-Signature: sha256=<lowercase
//! hex>` (the scheme of GitHub's `X-Hub-Signature-256`, which receivers'
//! libraries already check). A receiver recomputes it over the raw body
//! and compares in constant time. The body carries the notification's
//! `id` (also in `X-Tollgate-Delivery-Id`): a notification is retried
//! from the outbox until the receiver answers 2xx, so a receiver drops an
//! `id` it has already seen, which is also what defeats a replay; the
//! signature is made once, when the notification is queued, so it stays
//! valid over hours of retries.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::money::format_credits;
use crate::notify::low_balance::Crossing;

pub const SIGNATURE_HEADER: &str = "X-Tollgate-Signature";
pub const EVENT_HEADER: &str = "X-Tollgate-Event";

pub const LOW_BALANCE_EVENT: &str = "low_balance";

fn mac(secret: &[u8], body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    mac
}

/// The `X-Tollgate-Signature` value for `body`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(mac(secret, body).finalize().into_bytes())
    )
}

/// What a receiver does: `header` is a valid signature of `body` under
/// `secret` (compared in constant time).
pub fn verify(secret: &[u8], header: &str, body: &[u8]) -> bool {
    let Some(tag) = header
        .trim()
        .strip_prefix("sha256=")
        .and_then(|h| hex::decode(h).ok())
    else {
        return false;
    };
    mac(secret, body).verify_slice(&tag).is_ok()
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
        let sig = sign(b"0123456789abcdef", body);
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64, "{sig}");
        assert!(verify(b"0123456789abcdef", &sig, body));
        assert!(!verify(b"0123456789abcdeX", &sig, body), "wrong secret");
        assert!(!verify(b"0123456789abcdef", &sig, b"{}"), "other body");
        assert!(!verify(b"0123456789abcdef", "sha256=zz", body));
        assert!(!verify(b"0123456789abcdef", "", body));
        assert!(!verify(b"0123456789abcdef", &sig[7..], body), "no scheme");
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
