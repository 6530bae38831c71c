//! Fuzzes the Ozeki front door's request parsing: `parse_params` on an
//! arbitrary query and body, then `classify`, then (for sends) renders the
//! refusal and reads it back, which must give one report per message.
//!
//! Input layout: everything before the first `\n` is the query string, the
//! rest the form body (no `\n`: query only).
//!
//! Run: `cargo +nightly fuzz run ozeki_params`
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::api::ozeki::{
    classify, match_reports, parse_params, parse_send_answer, send_refusal, sniff_action, Command,
    ParamLimits, NAME_MAX_LEN,
};
use tollgate::error::ErrorCode;

fuzz_target!(|data: &[u8]| {
    let (query, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let _ = sniff_action(Some(query), body);

    // Small limits exercise the limit paths; default ones the full parse.
    let small = ParamLimits {
        max_params: 8,
        max_value_len: 16,
    };
    if let Ok(params) = parse_params(Some(query), body, &small) {
        assert!(params.len() <= small.max_params);
        for (name, value) in params.iter() {
            assert!(name.len() <= NAME_MAX_LEN);
            assert!(value.len() <= small.max_value_len);
        }
    }

    let Ok(params) = parse_params(Some(query), body, &ParamLimits::default()) else {
        return;
    };
    for (name, _) in params.iter() {
        assert!(!name.bytes().any(|b| b.is_ascii_uppercase()));
    }
    match classify(&params) {
        Ok(Command::SendMessage(send)) => {
            assert!(!send.messages.is_empty());
            let code = ErrorCode::InsufficientCredit;
            let refusal = send_refusal(
                &send.messages,
                send.batch,
                send.format,
                code,
                code.message(),
            );
            let reports = parse_send_answer(refusal.as_bytes()).expect("own refusal must parse");
            assert_eq!(reports.len(), send.messages.len());
            let outcomes = match_reports(&send.messages, send.batch, &reports);
            assert_eq!(outcomes.len(), send.messages.len());
        }
        Ok(_) => {}
        Err(e) => assert!(!e.action.bytes().any(|b| b.is_ascii_uppercase())),
    }
});
