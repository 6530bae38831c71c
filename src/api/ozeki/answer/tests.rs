//! The answer reader on the Ozeki answer shapes, the fast path against
//! quick-xml, and the matching of reports to messages.

use quick_xml::events::Event;
use quick_xml::Reader;

use super::fast::parse_plain_xml;
use super::report::ReportBuilder;
use super::*;
use crate::api::ozeki::command::{OutgoingMessage, ResponseFormat};
use crate::api::ozeki::render::send_refusal;
use crate::error::ErrorCode;
use proptest::prelude::*;

fn msg(recipient: &str) -> OutgoingMessage {
    OutgoingMessage {
        recipient: recipient.into(),
        message_type: "SMS:TEXT".into(),
        text: "hi".into(),
    }
}

fn report(index: Option<usize>, recipient: Option<&str>, status_code: i64) -> AcceptReport {
    AcceptReport {
        index,
        recipient: recipient.map(str::to_string),
        status_code,
    }
}

const PROLOG: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\r\n\
    <!DOCTYPE smsapi PUBLIC \"-//OZEKI//DTD XML 1.0//EN\" \"http://www.ozekisms.com/DTD/smsapi.xml\">\r\n";

#[test]
fn spec_single_recipient_example() {
    let body = format!(
        "{PROLOG}<response><action>sendmessage</action><data>\
         <acceptreport><statuscode>0</statuscode><statusmessage>Message accepted for \
         delivery</statusmessage><messageid>ERFAV23D</messageid><recipient>+36201234567</recipient>\
         </acceptreport></data></response>"
    );
    assert_eq!(
        parse_send_answer(body.as_bytes()).unwrap(),
        vec![report(None, Some("+36201234567"), 0)]
    );
}

#[test]
fn multi_recipient_with_bom_whitespace_and_entities() {
    let body = format!(
        "\u{FEFF}\n  {PROLOG}<response>\n<action>sendmessage</action>\n<data>\n\
         <acceptreport>\n<statuscode> 0 </statuscode>\n<recipient>&#43;361</recipient>\n</acceptreport>\n\
         <!-- a comment -->\
         <acceptreport>\n<statuscode>-5</statuscode>\n<statusmessage>Bad &amp; sad</statusmessage>\n\
         <recipient><![CDATA[362]]></recipient>\n</acceptreport>\n\
         <AcceptReport><StatusCode>7</StatusCode><recipient/></AcceptReport>\n\
         </data>\n</response>\n"
    );
    assert_eq!(
        parse_send_answer(body.as_bytes()).unwrap(),
        vec![
            report(None, Some("+361"), 0),
            report(None, Some("362"), -5),
            report(None, None, 7)
        ]
    );
}

#[test]
fn batch_indexed_reports() {
    let body = format!(
        "{PROLOG}<response><action>sendmessage</action><data>\
         <acceptreport><statuscode0>0</statuscode0><messageid0>A</messageid0><recipient0>361</recipient0></acceptreport>\
         <acceptreport><statuscode1>3</statuscode1><recipient1>362</recipient1></acceptreport>\
         </data></response>"
    );
    assert_eq!(
        parse_send_answer(body.as_bytes()).unwrap(),
        vec![
            report(Some(0), Some("361"), 0),
            report(Some(1), Some("362"), 3)
        ]
    );
    // All indexed sets inside a single acceptreport are read too.
    let body = "<response><acceptreport><statuscode1>0</statuscode1><statuscode0>2</statuscode0>\
                <recipient0>a</recipient0></acceptreport></response>";
    assert_eq!(
        parse_send_answer(body.as_bytes()).unwrap(),
        vec![report(Some(0), Some("a"), 2), report(Some(1), None, 0)]
    );
}

#[test]
fn html_answer() {
    let body = "<html><body>\n\
        <p>Message accepted for delivery<br>\nStatus code: 0<br>\nMessage ID: ERFAV23D<br>\nRecipient: +36201234567<br></p>\n\
        <p>Message rejected<br>\nstatus code: 12<br>\nMessage ID: <br>\nRecipient: &#43;36301234567<br/></p>\n\
        </body></html>";
    assert_eq!(
        parse_send_answer(body.as_bytes()).unwrap(),
        vec![
            report(None, Some("+36201234567"), 0),
            report(None, Some("+36301234567"), 12)
        ]
    );
    let unpaired = "<p>Status code: 0<br>Status code: 0<br>Recipient: 1</p>";
    assert!(matches!(
        parse_send_answer(unpaired.as_bytes()),
        Err(AnswerError::Malformed(_))
    ));
    let bad = "<p>Status code: zero<br>Recipient: 1</p>";
    assert!(matches!(
        parse_send_answer(bad.as_bytes()),
        Err(AnswerError::Malformed(_))
    ));
}

#[test]
fn garbage_and_broken_answers() {
    type Expect = fn(&AnswerError) -> bool;
    let cases: &[(&[u8], Expect)] = &[
        (b"", |e| *e == AnswerError::NotXml),
        (b"Internal Server Error", |e| *e == AnswerError::NotXml),
        (b"\xff\xfe\x00<", |e| *e == AnswerError::NotXml),
        (b"<?xml version=\"1.0\"?><response><data></data></response>", |e| *e == AnswerError::NoReports),
        (b"<response><acceptreport><statuscode>0</statuscode>", |e| matches!(e, AnswerError::Malformed(_))),
        (b"<response><acceptreport><statuscode>x</statuscode></acceptreport></response>", |e| matches!(e, AnswerError::Malformed(_))),
        (b"<response><acceptreport><statuscode></statuscode></acceptreport></response>", |e| matches!(e, AnswerError::Malformed(_))),
        (b"<response><acceptreport><recipient>1</recipient></acceptreport></response>", |e| matches!(e, AnswerError::Malformed(_))),
        (b"<response><acceptreport><statuscode>0</statuscode><statuscode>1</statuscode></acceptreport></response>", |e| matches!(e, AnswerError::Malformed(_))),
        (b"<response><acceptreport><statuscode>0</statuscode></acceptreportx></response>", |e| matches!(e, AnswerError::Malformed(_))),
        (b"<response><acceptreport><statuscode>&xxe;</statuscode></acceptreport></response>", |e| matches!(e, AnswerError::Malformed(_))),
    ];
    for (body, ok) in cases {
        let got = parse_send_answer(body);
        assert!(
            got.as_ref().is_err_and(ok),
            "{:?} → {got:?}",
            String::from_utf8_lossy(body)
        );
    }
    let too_big = vec![b' '; ANSWER_MAX_BYTES + 1];
    assert_eq!(parse_send_answer(&too_big), Err(AnswerError::TooLarge));
}

#[test]
fn doctype_with_internal_subset_is_not_expanded() {
    let body = b"<?xml version=\"1.0\"?>\n<!DOCTYPE response [<!ENTITY z \"0\">]>\n\
        <response><acceptreport><statuscode>&z;</statuscode><recipient>1</recipient></acceptreport></response>";
    assert!(matches!(
        parse_send_answer(body),
        Err(AnswerError::Malformed(_))
    ));
}

#[test]
fn match_by_recipient_exact_then_digits() {
    let m = [
        msg("+36201234567"),
        msg("36301234567"),
        msg("0036401234567"),
        msg("+3650"),
    ];
    let r = [
        report(None, Some("36201234567"), 0),
        report(None, Some("+36301234567"), 4),
        report(None, Some("+36401234567"), 0),
        report(None, Some("+999"), 0),
    ];
    assert_eq!(
        match_reports(&m, false, &r),
        vec![Some(true), Some(false), Some(true), None]
    );
}

#[test]
fn duplicated_recipients_pair_in_order() {
    let m = [msg("+361"), msg("+362"), msg("+361"), msg("+361")];
    let r = [
        report(None, Some("+361"), 0),
        report(None, Some("361"), 9),
        report(None, Some("+362"), 0),
    ];
    assert_eq!(
        match_reports(&m, false, &r),
        vec![Some(true), Some(true), Some(false), None]
    );
    // Exact matches are taken before digit-only ones, whatever the order.
    let m = [msg("361"), msg("+361")];
    let r = [report(None, Some("+361"), 1), report(None, Some("361"), 0)];
    assert_eq!(match_reports(&m, false, &r), vec![Some(true), Some(false)]);
}

#[test]
fn missing_reports_are_none() {
    let m = [msg("1"), msg("2"), msg("3")];
    assert_eq!(
        match_reports(&m, false, &[report(None, Some("2"), 0)]),
        vec![None, Some(true), None]
    );
    assert_eq!(
        match_reports(&m, false, &[report(None, None, 0)]),
        vec![None, None, None]
    );
    assert_eq!(match_reports(&m, true, &[]), vec![None, None, None]);
}

#[test]
fn batch_matches_by_index_with_recipient_fallback() {
    let m = [msg("+361"), msg("+361"), msg("363"), msg("364")];
    let r = [
        report(Some(1), Some("361"), 0),
        report(Some(0), None, 5),
        report(None, Some("363"), 0),
        report(Some(9), Some("364"), 0), // out of range: ignored
    ];
    assert_eq!(
        match_reports(&m, true, &r),
        vec![Some(false), Some(true), Some(true), None]
    );
    // Contradictions make the message in doubt.
    let r = [
        report(Some(0), None, 0),
        report(Some(0), None, 1),
        report(Some(1), Some("999"), 0),
    ];
    assert_eq!(match_reports(&m, true, &r), vec![None, None, None, None]);
    // Non-batch requests ignore indices and use recipients.
    let r = [report(Some(3), Some("363"), 0)];
    assert_eq!(
        match_reports(&m, false, &r),
        vec![None, None, Some(true), None]
    );
}

#[test]
fn large_batch_matches_quickly() {
    let m: Vec<_> = (0..20_000).map(|i| msg(&format!("+36{i}"))).collect();
    let r: Vec<_> = (0..20_000)
        .rev()
        .map(|i| report(None, Some(&format!("36{i}")), i % 2))
        .collect();
    let out = match_reports(&m, false, &r);
    assert!(out.iter().enumerate().all(|(i, o)| *o == Some(i % 2 == 0)));
}

/// quick-xml alone, bypassing the direct scan.
fn full_parse(body: &[u8]) -> Option<Vec<AcceptReport>> {
    let mut reader = Reader::from_reader(body);
    let mut builder = ReportBuilder::default();
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) => builder.start(e.local_name().as_ref()).ok()?,
            Event::Empty(e) => builder.empty(e.local_name().as_ref()).ok()?,
            Event::Text(t) => builder.text(&t.unescape().ok()?),
            Event::CData(t) => builder.text(&t.decode().ok()?),
            Event::End(_) => builder.end().ok()?,
            Event::Eof => break,
            _ => {}
        }
    }
    builder.finish().ok()
}

fn recipient_strategy() -> impl Strategy<Value = String> {
    prop_oneof!["\\+?[0-9]{3,15}", "[a-zA-Z0-9 <>&\"'+.-]{1,20}"]
        .prop_filter("not blank", |s: &String| !s.trim().is_empty())
        .prop_map(|s| s.trim().to_string())
}

proptest! {
    #[test]
    fn refusal_round_trips(
        recipients in proptest::collection::vec(recipient_strategy(), 1..20),
        batch in any::<bool>(),
        html in any::<bool>(),
        code_index in 0..ErrorCode::ALL.len(),
        text in "\\PC{0,30}",
    ) {
        let code = ErrorCode::ALL[code_index];
        let messages: Vec<_> = recipients
            .iter()
            .map(|r| OutgoingMessage { recipient: r.clone(), message_type: "SMS:TEXT".into(), text: text.clone() })
            .collect();
        let format = if html { ResponseFormat::Html } else { ResponseFormat::Xml };
        let batch = batch && !html;
        let body = send_refusal(&messages, batch, format, code, code.message());
        let reports = parse_send_answer(body.as_bytes()).unwrap();
        prop_assert_eq!(reports.len(), messages.len());
        for (i, (r, m)) in reports.iter().zip(&messages).enumerate() {
            prop_assert_eq!(r.recipient.as_deref(), Some(m.recipient.as_str()));
            prop_assert_eq!(r.status_code, i64::from(code.code()));
            prop_assert_eq!(r.index, batch.then_some(i));
        }
        prop_assert!(match_reports(&messages, batch, &reports).iter().all(|o| *o == Some(false)));
    }

    #[test]
    fn never_panics_on_bytes(body in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse_send_answer(&body);
    }

    #[test]
    fn never_panics_on_xml_like_text(
        body in "(<\\??/?(response|acceptreport|statuscode[0-9]?|recipient[0-9]?|!DOCTYPE|!\\[CDATA\\[)>?|[0-9+ ]|&[a-z#0-9]*;?|Status code: |Recipient: |<br>){0,40}"
    ) {
        let _ = parse_send_answer(body.as_bytes());
        let _ = parse_send_answer(format!("<?xml version=\"1.0\"?>{body}").as_bytes());
    }

    /// Whatever the direct scan reads, quick-xml reads the same.
    #[test]
    fn plain_scan_agrees_with_quick_xml(
        body in "(<\\??/?(response|data|acceptreport[0-9]?|statuscode[0-9]?|recipient[0-9]?|messageid|!DOCTYPE smsapi)/?>|[0-9+ a-z\n]{0,6}|&amp;|<!\\[CDATA\\[x\\]\\]>|<a b=\"1\">){0,40}",
        decl in any::<bool>(),
    ) {
        let body = if decl { format!("<?xml version=\"1.0\"?>\n{body}") } else { body };
        if let Some(fast) = parse_plain_xml(body.as_bytes()) {
            prop_assert_eq!(Some(fast), full_parse(body.as_bytes()));
        }
    }

    /// Well-formed answers of varied shape: the scan reads them, and
    /// reads them as quick-xml does.
    #[test]
    fn plain_scan_agrees_on_well_formed_answers(
        reports in proptest::collection::vec(
            (proptest::option::of(0usize..30), "[+0-9]{0,8}", -3i64..4, any::<bool>(), "[ \n\t]{0,2}"),
            0..8),
        extra in proptest::option::of("[a-z]{1,8}"),
        doctype in any::<bool>(),
    ) {
        let mut body = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        if doctype {
            body.push_str("<!DOCTYPE smsapi PUBLIC \"-//OZEKI//DTD XML 1.0//EN\" \"x.xml\">\n");
        }
        body.push_str("<response><action>sendmessage</action><data>");
        for (index, recipient, code, upper, ws) in &reports {
            let suffix = index.map(|i| i.to_string()).unwrap_or_default();
            let (sc, rc) = if *upper { ("StatusCode", "Recipient") } else { ("statuscode", "recipient") };
            body.push_str(&format!(
                "<acceptreport>{ws}<{sc}{suffix}>{ws}{code}{ws}</{sc}{suffix}>{ws}<{rc}{suffix}>{recipient}</{rc}{suffix}>"
            ));
            if let Some(e) = &extra {
                body.push_str(&format!("<{e}>v</{e}><{e}/>"));
            }
            body.push_str("</acceptreport>");
        }
        body.push_str("</data></response>");
        let fast = parse_plain_xml(body.as_bytes());
        prop_assert_eq!(fast.clone(), full_parse(body.as_bytes()));
        if !reports.is_empty() && extra.as_deref() != Some("acceptreport") {
            prop_assert!(fast.is_some(), "{}", body);
        }
    }

    /// Real answers (every refusal shape, batches) take the direct scan.
    #[test]
    fn rendered_answers_take_the_direct_scan(
        recipients in proptest::collection::vec("\\+?[0-9]{3,15}", 1..20),
        batch in any::<bool>(),
    ) {
        let messages: Vec<_> = recipients
            .iter()
            .map(|r| OutgoingMessage { recipient: r.clone(), message_type: "SMS:TEXT".into(), text: "hi".into() })
            .collect();
        let code = ErrorCode::InsufficientCredit;
        let body = send_refusal(&messages, batch, ResponseFormat::Xml, code, code.message());
        let fast = parse_plain_xml(body.as_bytes());
        prop_assert!(fast.is_some());
        prop_assert_eq!(fast, full_parse(body.as_bytes()));
    }

    #[test]
    fn match_never_panics_and_has_one_entry_per_message(
        recipients in proptest::collection::vec("[+0-9]{0,4}", 0..10),
        reports in proptest::collection::vec(
            (proptest::option::of(0usize..12), proptest::option::of("[+0-9]{0,4}"), -2i64..3), 0..12),
        batch in any::<bool>(),
    ) {
        let messages: Vec<_> = recipients.iter().map(|r| msg(r)).collect();
        let reports: Vec<_> = reports
            .into_iter()
            .map(|(index, recipient, status_code)| AcceptReport { index, recipient, status_code })
            .collect();
        let out = match_reports(&messages, batch, &reports);
        prop_assert_eq!(out.len(), messages.len());
        // Every Some outcome is backed by at least one report.
        let matched = out.iter().filter(|o| o.is_some()).count();
        prop_assert!(matched <= reports.len());
    }
}
