//! Fuzzes the reader of the gateway's `sendmessage` answer (XML accept
//! reports and the HTML `Status code:` shape) and the matching of its
//! reports to messages. Must never panic, whatever the gateway sends.
//!
//! Run: `cargo +nightly fuzz run acceptreport`
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::api::ozeki::{match_reports, parse_send_answer, OutgoingMessage};

fuzz_target!(|data: &[u8]| {
    let Ok(reports) = parse_send_answer(data) else {
        return;
    };
    assert!(!reports.is_empty());
    // Messages built from the reports' own recipients, plus one nobody
    // reported on.
    let mut messages: Vec<OutgoingMessage> = reports
        .iter()
        .filter_map(|r| r.recipient.clone())
        .map(|recipient| OutgoingMessage {
            recipient,
            message_type: "SMS:TEXT".into(),
            text: String::new(),
        })
        .collect();
    messages.push(OutgoingMessage {
        recipient: "+0".into(),
        message_type: "SMS:TEXT".into(),
        text: String::new(),
    });
    for batch in [false, true] {
        let outcomes = match_reports(&messages, batch, &reports);
        assert_eq!(outcomes.len(), messages.len());
    }
});
