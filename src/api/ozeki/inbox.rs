//! Reads the gateway's answer to a `receivemessage` far enough to count the
//! messages it hands out, so receive pricing (SPEC 4.2) can charge each one.
//!
//! Owns only counting: it never changes the answer (the client gets the
//! gateway's bytes unchanged) and never looks inside a message. Like
//! [`super::answer`] it must never guess upwards: a body it cannot read with
//! certainty is an error, which the caller relays uncharged (and counts),
//! never a number of messages.
//!
//! The XML is read with quick-xml without DTD processing: the DOCTYPE line
//! is skipped, entities are never expanded (message texts are not read at
//! all), end tags must match their start tags, and the size and the nesting
//! depth are bounded.

use quick_xml::events::Event;
use quick_xml::Reader;
use thiserror::Error;

use super::answer::ANSWER_MAX_BYTES;
use super::params::Params;
use crate::api::owned::fold;

/// Deepest element nesting accepted (Ozeki's inbox answers are 4 deep).
const MAX_DEPTH: usize = 32;
/// The action whose answers are counted here.
pub use crate::api::owned::RECEIVE_ACTION;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InboxError {
    #[error("answer is not Ozeki XML")]
    NotXml,
    #[error("malformed answer: {0}")]
    Malformed(String),
    #[error("answer larger than {ANSWER_MAX_BYTES} bytes")]
    TooLarge,
}

fn malformed(detail: impl std::fmt::Display) -> InboxError {
    InboxError::Malformed(super::answer::bounded_detail(detail))
}

/// Whether any `action` value of the request is `receivemessage` (any
/// case). Every value counts, not only the first: the gateway might act on
/// another one than tollgate reads, so `action=x&action=receivemessage`
/// must not fetch messages uncharged.
pub fn names_receive(params: &Params) -> bool {
    params
        .iter()
        .any(|(n, v)| n == "action" && fold(v.to_string()) == RECEIVE_ACTION)
}

/// Whether the request's `action` values disagree (a receive among them is
/// then refused: tollgate cannot know which one the gateway runs).
pub fn has_conflicting_actions(params: &Params) -> bool {
    let mut actions = params
        .iter()
        .filter(|(n, _)| *n == "action")
        .map(|(_, v)| fold(v.to_string()));
    match actions.next() {
        Some(first) => actions.any(|a| a != first),
        None => false,
    }
}

/// Counts the messages of a `receivemessage` answer: the `<message>`
/// elements directly under `<response><data>`. An Ozeki error answer
/// (`<data><errormessage>…`) and an empty inbox count 0. Empty
/// `<message/>` elements carry nothing and are not counted.
pub fn count_messages(body: &[u8]) -> Result<u32, InboxError> {
    if body.len() > ANSWER_MAX_BYTES {
        return Err(InboxError::TooLarge);
    }
    let start = body
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(body)
        .trim_ascii_start();
    const XML_STARTS: [&[u8]; 3] = [b"<?xml", b"<!DOCTYPE", b"<response"];
    let is_xml = XML_STARTS.iter().any(|p| {
        start
            .get(..p.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(p))
    });
    if !is_xml {
        return Err(InboxError::NotXml);
    }

    let mut reader = Reader::from_reader(body);
    // Names of the open elements, lower-cased, outermost first.
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut count: u32 = 0;
    let mut saw_response = false;
    loop {
        match reader.read_event().map_err(malformed)? {
            Event::Start(e) => {
                if path.len() >= MAX_DEPTH {
                    return Err(malformed("nesting too deep"));
                }
                let name = e.local_name().as_ref().to_ascii_lowercase();
                if path.is_empty() {
                    if name != b"response" || saw_response {
                        return Err(malformed("the root element is not one <response>"));
                    }
                    saw_response = true;
                }
                path.push(name);
            }
            Event::Empty(_) => {
                if path.is_empty() {
                    return Err(malformed("the root element is not <response>"));
                }
            }
            Event::End(_) => {
                // quick-xml has checked that the end tag matches.
                let name = path.pop().ok_or_else(|| malformed("unbalanced end tag"))?;
                if name == b"message"
                    && path.len() == 2
                    && path[0] == b"response"
                    && path[1] == b"data"
                {
                    count = count
                        .checked_add(1)
                        .ok_or_else(|| malformed("too many messages"))?;
                }
            }
            Event::Text(t) => {
                if path.is_empty() && !t.iter().all(u8::is_ascii_whitespace) {
                    return Err(malformed("text outside the root element"));
                }
            }
            Event::CData(_) => {
                if path.is_empty() {
                    return Err(malformed("text outside the root element"));
                }
            }
            Event::Eof => break,
            // The DOCTYPE is skipped, never interpreted; comments, PIs and
            // the declaration carry nothing we count.
            Event::DocType(_) | Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
        }
    }
    if !path.is_empty() {
        return Err(malformed("the answer ends inside an element"));
    }
    if !saw_response {
        return Err(malformed("no <response> element"));
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ozeki::params::{parse_params, ParamLimits};

    const PROLOG: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE response PUBLIC \"-//OZEKI//DTD XML 1.0//EN\" \"http://www.ozekisms.com/DTD/response.xml\">\n";

    fn message(id: u32, text: &str) -> String {
        format!(
            "<message>\n<messageid>ID{id}</messageid>\n<originator>+36301234567</originator>\n<recipient>+36201112222</recipient>\n<messagetype>SMS:TEXT</messagetype>\n<messagedata>{text}</messagedata>\n<senttime>2024-01-01 10:00:00</senttime>\n<receivedtime>2024-01-01 10:00:01</receivedtime>\n</message>\n"
        )
    }

    fn answer(messages: &[String]) -> String {
        format!(
            "{PROLOG}<response>\n<action>receivemessage</action>\n<data>\n{}</data>\n</response>\n",
            messages.concat()
        )
    }

    #[test]
    fn counts_the_messages_under_response_data() {
        assert_eq!(count_messages(answer(&[]).as_bytes()), Ok(0));
        let three: Vec<String> = (0..3).map(|i| message(i, "hi")).collect();
        assert_eq!(count_messages(answer(&three).as_bytes()), Ok(3));
        // The simulator's exact shape (render::receive_xml), with escapes.
        let sim = crate::sim::render::receive_xml(&[crate::sim::render::InboxMessage {
            messageid: "A".into(),
            originator: "+1".into(),
            recipient: "+2".into(),
            messagetype: "SMS:TEXT".into(),
            messagedata: "a <b> & \"c\"".into(),
            senttime: "t".into(),
            receivedtime: "t".into(),
        }]);
        assert_eq!(count_messages(sim.as_bytes()), Ok(1));
        // Case, a BOM, no prolog, CDATA and comments do not matter.
        let odd = "\u{FEFF}<Response><DATA><!-- x --><Message><MessageData><![CDATA[<message>]]></MessageData></Message><message></message></DATA></Response>";
        assert_eq!(count_messages(odd.as_bytes()), Ok(2));
    }

    #[test]
    fn only_top_level_messages_count() {
        // A <message> nested deeper, or outside <data>, is not a message.
        let body = format!(
            "{PROLOG}<response><action>receivemessage</action><message></message><data><message><message></message></message><other><message></message></other><message/></data></response>"
        );
        assert_eq!(count_messages(body.as_bytes()), Ok(1));
    }

    #[test]
    fn error_answers_count_zero() {
        let body = format!(
            "{PROLOG}<response>\n<action>receivemessage</action>\n<data>\n<errormessage>Invalid username or password</errormessage>\n<errorcode>1</errorcode>\n</data>\n</response>\n"
        );
        assert_eq!(count_messages(body.as_bytes()), Ok(0));
    }

    #[test]
    fn unreadable_answers_are_errors_never_counts() {
        let three: Vec<String> = (0..3).map(|i| message(i, "hi")).collect();
        let full = answer(&three);
        // Cut anywhere inside the document: an error, never a smaller count.
        let close = full.rfind("</response>").unwrap();
        for cut in (0..close).step_by(7) {
            let head = &full.as_bytes()[..cut];
            assert!(count_messages(head).is_err(), "cut at {cut}");
        }
        for bad in [
            "Status code: 0",
            "<html><body>1 message</body></html>",
            "<?xml version=\"1.0\"?><response><data><message></data></response>",
            "<?xml version=\"1.0\"?><response><data></data></response><response></response>",
            "<?xml version=\"1.0\"?><other><data><message></message></data></other>",
            "<?xml version=\"1.0\"?><response><data></data></response>trailing",
            "",
        ] {
            assert!(count_messages(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let deep = format!(
            "<response>{}{}</response>",
            "<a>".repeat(40),
            "</a>".repeat(40)
        );
        assert_eq!(
            count_messages(deep.as_bytes()),
            Err(InboxError::Malformed("nesting too deep".into()))
        );
        let big = vec![b' '; ANSWER_MAX_BYTES + 1];
        assert_eq!(count_messages(&big), Err(InboxError::TooLarge));
    }

    #[test]
    fn entities_and_dtds_are_never_expanded() {
        // An internal subset declaring an entity is skipped, not applied: a
        // "billion laughs" costs nothing and the count is of real elements.
        let body = "<?xml version=\"1.0\"?>\n<!DOCTYPE response [<!ENTITY a \"<message></message>\"><!ENTITY b \"&a;&a;&a;&a;\">]>\n<response><data><message><messagedata>&b;&b;</messagedata></message></data></response>";
        assert_eq!(count_messages(body.as_bytes()), Ok(1));
    }

    proptest::proptest! {
        #[test]
        fn counts_what_was_rendered(texts in proptest::collection::vec(".{0,40}", 0..20)) {
            let messages: Vec<_> = texts
                .iter()
                .map(|t| crate::sim::render::InboxMessage {
                    messageid: "A".into(),
                    originator: "+1".into(),
                    recipient: "+2".into(),
                    messagetype: "SMS:TEXT".into(),
                    messagedata: t.clone(),
                    senttime: "t".into(),
                    receivedtime: "t".into(),
                })
                .collect();
            let body = crate::sim::render::receive_xml(&messages);
            proptest::prop_assert_eq!(count_messages(body.as_bytes()), Ok(texts.len() as u32));
        }

        #[test]
        fn never_panics(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = count_messages(&tail);
            let mut body = b"<response><data><message>".to_vec();
            body.extend_from_slice(&tail);
            let _ = count_messages(&body);
        }
    }

    #[test]
    fn receive_is_seen_in_any_action_value() {
        let p = |q: &str| parse_params(Some(q.as_bytes()), None, &ParamLimits::default()).unwrap();
        assert!(names_receive(&p("action=receivemessage")));
        assert!(names_receive(&p("Action=ReceiveMessage")));
        assert!(names_receive(&p("action=getversion&action=receivemessage")));
        assert!(!names_receive(&p("action=sendmessage")));
        assert!(!has_conflicting_actions(&p(
            "action=receivemessage&ACTION=receiveMessage"
        )));
        assert!(has_conflicting_actions(&p(
            "action=getversion&action=receivemessage"
        )));
    }
}
