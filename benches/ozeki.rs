//! Ozeki front-door parsing: the request (query/form → `Params` →
//! `Command`) and the gateway's `sendmessage` answer (accept reports →
//! per-message outcomes).
//!
//! Motivation: every intercepted request is parsed whole before a decision
//! (SPEC 1.1) and every forwarded send is settled from the gateway's answer
//! (SPEC 1.3 step 8), so both parsers sit on the request path of every
//! `sendmessage` next to the ledger. They must stay a small fraction of the
//! proxy's per-request CPU budget (tens of µs, see `benches/e2e/`).
//!
//! Scenarios:
//! - `request/getcredits_query`: the GET a balance check sends;
//! - `request/sendmessage_query`: a single-recipient GET send (the e2e
//!   benchmark's request), parse + classify;
//! - `request/sendmessage_form_100`: a POSTed form with 100 recipients,
//!   percent-encoded UTF-8 text;
//! - `request/sendmessage_batch_1000`: the batch form (`messagecount` +
//!   indexed parameters) with 1 000 messages;
//! - `acceptreport/xml_1`, `xml_100`, `batch_xml_1000`, `html_100`: the
//!   gateway's answers as `ozeki-sim` renders them, parsed and matched to
//!   the messages.
//!
//! Run: `cargo bench --bench ozeki`
//!
//! Last result (2-core VM, quiet, release, criterion medians):
//! ```text
//! request/getcredits_query            465 ns
//! request/sendmessage_query           1.33 µs   (the e2e benchmark's request)
//! request/sendmessage_form_100        23.4 µs   (0.23 µs per recipient)
//! request/sendmessage_batch_1000      747 µs    (0.75 µs per message)
//! acceptreport/xml_1                  2.14 µs
//! acceptreport/xml_100                102 µs    (1.0 µs per report)
//! acceptreport/batch_xml_1000         1.00 ms   (1.0 µs per report)
//! acceptreport/html_100               120 µs
//! ```
//! A one-recipient send costs ~3.5 µs of parsing (request + answer), about
//! 4 % of tollgate's CPU per `sendmessage` end to end.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use tollgate::api::ozeki::{
    classify, match_reports, parse_params, parse_send_answer, Command, OutgoingMessage, ParamLimits,
};
use tollgate::sim::render::{send_html, send_xml, AcceptReport, ACCEPTED};

/// (name, query, form body, expected parameter count)
type ParseCase<'a> = (&'a str, Option<&'a [u8]>, Option<&'a [u8]>, usize);

fn recipients(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("+3620{:07}", 1_000_000 + i))
        .collect()
}

fn bench_requests(c: &mut Criterion) {
    let limits = ParamLimits::default();
    let getcredits = b"action=getcredits&username=john&password=secret1".to_vec();
    let single = b"action=sendmessage&username=john&password=secret1&recipient=%2B36201234567&messagetype=SMS:TEXT&messagedata=Hello+world%2C+your+code+is+482913".to_vec();
    let mut form = String::from("action=sendmessage&username=john&password=secret1&recipient=");
    form.push_str(&recipients(100).join("%2C").replace('+', "%2B"));
    form.push_str("&messagetype=SMS:TEXT&messagedata=");
    form.push_str(
        "%C3%81rv%C3%ADzt%C5%B1r%C5%91+t%C3%BCk%C3%B6rf%C3%BAr%C3%B3g%C3%A9p+"
            .repeat(4)
            .as_str(),
    );
    let mut batch =
        String::from("action=sendmessage&username=john&password=secret1&messagecount=1000");
    for (i, r) in recipients(1000).iter().enumerate() {
        batch.push_str(&format!(
            "&recipient{i}={}&messagetype{i}=SMS:TEXT&messagedata{i}=Message+number+{i}",
            r.replace('+', "%2B")
        ));
    }

    let mut group = c.benchmark_group("request");
    let cases: [ParseCase; 4] = [
        ("getcredits_query", Some(&getcredits), None, 0),
        ("sendmessage_query", Some(&single), None, 1),
        ("sendmessage_form_100", None, Some(form.as_bytes()), 100),
        ("sendmessage_batch_1000", None, Some(batch.as_bytes()), 1000),
    ];
    for (name, query, body, expect) in cases {
        let len = query.map_or(0, <[u8]>::len) + body.map_or(0, <[u8]>::len);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let params = parse_params(black_box(query), black_box(body), &limits).unwrap();
                match classify(&params).unwrap() {
                    Command::SendMessage(s) => assert_eq!(s.messages.len(), expect),
                    Command::GetCredits { .. } => assert_eq!(expect, 0),
                    other => panic!("unexpected {other:?}"),
                }
            })
        });
    }
    group.finish();
}

fn reports(n: usize, batch: bool) -> (Vec<AcceptReport>, Vec<OutgoingMessage>) {
    let rs = recipients(n);
    let reports = rs
        .iter()
        .enumerate()
        .map(|(i, r)| AcceptReport {
            index: batch.then_some(i),
            statuscode: 0,
            statusmessage: ACCEPTED,
            messageid: format!("{:08}", 100_000 + i),
            recipient: r.clone(),
            messagetype: "SMS:TEXT".into(),
            messagedata: "Hello world, your code is 482913".into(),
        })
        .collect();
    let messages = rs
        .into_iter()
        .map(|recipient| OutgoingMessage {
            recipient,
            message_type: "SMS:TEXT".into(),
            text: "Hello world, your code is 482913".into(),
        })
        .collect();
    (reports, messages)
}

fn bench_answers(c: &mut Criterion) {
    let mut group = c.benchmark_group("acceptreport");
    for (name, n, batch, html) in [
        ("xml_1", 1usize, false, false),
        ("xml_100", 100, false, false),
        ("batch_xml_1000", 1000, true, false),
        ("html_100", 100, false, true),
    ] {
        let (reports, messages) = reports(n, batch);
        let body = if html {
            send_html(&reports)
        } else {
            send_xml(&reports)
        };
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let parsed = parse_send_answer(black_box(body.as_bytes())).unwrap();
                let outcomes = match_reports(&messages, batch, &parsed);
                assert!(outcomes.iter().all(|o| *o == Some(true)));
                outcomes
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_requests, bench_answers);
criterion_main!(benches);
