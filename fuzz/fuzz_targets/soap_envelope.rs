//! Fuzzes the SOAP front door's envelope parser: `parse_envelope` on
//! arbitrary bytes (default and tight limits), then `call_from_envelope`.
//! Also round-trips text through the renderer: a response carrying an
//! arbitrary `ResultText` (the input, read as lossy UTF-8) must parse back,
//! with our own parser, to exactly that text (with the characters XML cannot
//! carry replaced by U+FFFD).
//!
//! Run: `cargo +nightly fuzz run soap_envelope` (or `RUSTC_BOOTSTRAP=1
//! cargo fuzz run soap_envelope` on a stable toolchain).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::api::soap::{
    call_from_envelope, fault, give_credit_response, parse_envelope, Call, CallError,
    EnvelopeLimits, FaultKind, GiveCreditAnswer, SoapVersion, SERVICE_NS,
};

fn xml_safe(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\t' | '\n' | '\r' => c,
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => '\u{FFFD}',
            c => c,
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let tight = EnvelopeLimits {
        max_depth: 4,
        max_elements: 8,
    };
    if let Ok(e) = parse_envelope(data, &tight) {
        assert!(e.params.len() <= tight.max_elements);
    }

    if let Ok(envelope) = parse_envelope(data, &EnvelopeLimits::default()) {
        assert!(envelope.params.len() <= EnvelopeLimits::default().max_elements);
        match call_from_envelope(&envelope) {
            Ok(Call::SubAccountGiveCredit {
                anytime_milli,
                offpeak_milli,
                ..
            }) => {
                // Amounts were read exactly: they format back to decimals
                // that parse to the same milli-credits.
                for m in [anytime_milli, offpeak_milli] {
                    let text = tollgate::money::format_credits(m);
                    assert_eq!(tollgate::money::parse_credits(&text), Ok(m));
                }
            }
            Ok(Call::GetBalance { credentials }) => {
                assert!(!credentials.username.is_empty());
            }
            Err(CallError::UnknownOperation(_)) => {
                assert!(
                    envelope.operation_ns.as_deref() != Some(SERVICE_NS)
                        || !["GetBalance", "SubAccountGiveCredit"]
                            .contains(&envelope.operation.as_str())
                );
            }
            Err(CallError::InvalidParams { .. }) => {}
        }
    }

    let text = String::from_utf8_lossy(data);
    let expected = xml_safe(&text);
    for version in [SoapVersion::V11, SoapVersion::V12] {
        let answer = GiveCreditAnswer {
            ok: data.len() % 2 == 0,
            parent_anytime_milli: data.len() as i64,
            parent_offpeak_milli: -(data.len() as i64),
            sub_anytime_milli: 0,
            sub_offpeak_milli: i64::MAX,
            result_text: text.to_string(),
            code: 1001,
        };
        let rendered = give_credit_response(version, &answer);
        let back = parse_envelope(rendered.as_bytes(), &EnvelopeLimits::default())
            .expect("own response must parse");
        assert_eq!(back.version, version);
        assert_eq!(back.param("ResultText").unwrap_or(""), expected);
    }
    let rendered = fault(SoapVersion::V11, FaultKind::Client, &text);
    let back = parse_envelope(rendered.as_bytes(), &EnvelopeLimits::default())
        .expect("own fault must parse");
    assert_eq!(back.param("faultstring").unwrap_or(""), expected);
});
