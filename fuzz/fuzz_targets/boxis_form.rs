//! Fuzzes the Boxis front door's request parsing: `parse_form` on an
//! arbitrary body (with tight and default limits), then `classify`, then
//! renders every answer the request could get and checks that the XML is
//! well-formed and the JSON valid, with `result` a string and `credit` a
//! number.
//!
//! Run: `cargo +nightly fuzz run boxis_form` (or `RUSTC_BOOTSTRAP=1 cargo
//! fuzz run boxis_form` on a stable toolchain).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::api::boxis::{
    classify, parse_form, render, return_type_of, Action, FormLimits, ReturnType,
    FIELD_NAME_MAX_LEN, RECIPIENTS_COUNT_MAX,
};
use tollgate::error::ErrorCode;

fn check_answers(credit_milli: i64) {
    let xml = render::success(ReturnType::Xml, credit_milli, 1_700_000_000);
    let mut reader = quick_xml::Reader::from_str(&xml);
    loop {
        match reader.read_event().expect("own XML answer must be well-formed") {
            quick_xml::events::Event::Eof => break,
            _ => continue,
        }
    }
    let json = render::success(ReturnType::Json, credit_milli, 1_700_000_000);
    let v: serde_json::Value = serde_json::from_str(&json).expect("own JSON answer must parse");
    assert!(v["result"].is_string());
    assert!(v["params"]["credit"].is_number());
    for code in ErrorCode::ALL {
        let v: serde_json::Value =
            serde_json::from_str(&render::error(ReturnType::Json, code, Some("a \"field\" <x>"), 0)).unwrap();
        assert_eq!(v["result"], "0");
    }
}

fuzz_target!(|data: &[u8]| {
    let small = FormLimits {
        max_fields: 4,
        max_value_len: 8,
    };
    if let Ok(form) = parse_form(data, &small) {
        assert!(form.len() <= small.max_fields);
        for (name, value) in form.iter() {
            assert!(name.len() <= FIELD_NAME_MAX_LEN);
            assert!(value.len() <= small.max_value_len);
        }
    }

    let Ok(form) = parse_form(data, &FormLimits::default()) else {
        return;
    };
    // Names are unique.
    let mut names: Vec<&str> = form.iter().map(|(n, _)| n).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len());

    let return_type = return_type_of(&form);
    match classify(&form) {
        Ok(request) => {
            assert_eq!(request.return_type, return_type);
            assert!(request.credentials.timestamp_s >= 0);
            assert_eq!(
                request.credentials.timestamp_text.parse::<i64>().ok(),
                Some(request.credentials.timestamp_s)
            );
            assert!(format!("{:?}", request.credentials).contains("<redacted>"));
            if let Action::CalculateCredits(calc) = &request.action {
                assert!((1..=RECIPIENTS_COUNT_MAX).contains(&calc.recipients_count));
            }
            let credit = data.len() as i64 * 1234 - 500_000;
            check_answers(credit);
        }
        Err(e) => {
            assert_eq!(e.return_type, return_type);
            assert_eq!(e.code, ErrorCode::InvalidRequest);
        }
    }
});
