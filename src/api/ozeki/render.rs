//! Answers tollgate makes itself on the Ozeki front door, shaped exactly like
//! the gateway's (SPEC 1.2 and 1.3 step 5) so existing clients parse them.
//!
//! Pure string building: no HTTP types. Every piece of client text is
//! escaped; characters XML 1.0 cannot carry at all (most C0 controls) are
//! replaced by U+FFFD so a client's parser never chokes on our answer.
//! Lines end with `\n`, the last one included.

use std::fmt::Write as _;

use super::command::{OutgoingMessage, ResponseFormat};
use crate::error::ErrorCode;
use crate::money::format_credits;

/// Prolog of every XML answer for the send and credit actions.
pub const XML_PROLOG: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
<!DOCTYPE smsapi PUBLIC \"-//OZEKI//DTD XML 1.0//EN\" \"http://www.ozekisms.com/DTD/smsapi.xml\">\n";

/// `Content-Type` of an answer in `format`.
pub fn content_type(format: ResponseFormat) -> &'static str {
    match format {
        ResponseFormat::Xml => "application/xml",
        ResponseFormat::Html => "text/html; charset=utf-8",
    }
}

/// The answer to `getcredits`/`setcredits`/`addcredits`: the account's
/// balance after the action. `action_echo` is the (configurable) action name
/// to echo, lower case.
pub fn credits_answer(action_echo: &str, username: &str, balance_milli: i64) -> String {
    let mut out = String::with_capacity(XML_PROLOG.len() + 160 + username.len());
    out.push_str(XML_PROLOG);
    out.push_str("<response>\n");
    element(&mut out, "action", action_echo);
    out.push_str("<data>\n<account>\n");
    element(&mut out, "username", username);
    element(&mut out, "balance", &format_credits(balance_milli));
    out.push_str("</account>\n</data>\n</response>\n");
    out
}

/// An error answer for any Ozeki action (HTTP 200, as the gateway does).
/// `message` is shown to the client; it must not carry secrets.
pub fn error_answer(action: &str, code: ErrorCode, message: &str) -> String {
    let mut out = String::with_capacity(XML_PROLOG.len() + 160 + message.len());
    out.push_str(XML_PROLOG);
    out.push_str("<response>\n");
    element(&mut out, "action", action);
    out.push_str("<data>\n");
    element(&mut out, "errormessage", message);
    element(&mut out, "errorcode", &code.code().to_string());
    out.push_str("</data>\n</response>\n");
    out
}

/// A `sendmessage` refused before it reached the gateway (for instance
/// insufficient credit): one report per message, all with status `code`.
/// Batch requests get index-suffixed elements (`statuscode0`), as the
/// gateway's batch answers do.
pub fn send_refusal(
    messages: &[OutgoingMessage],
    batch: bool,
    format: ResponseFormat,
    code: ErrorCode,
    message: &str,
) -> String {
    match format {
        ResponseFormat::Xml => send_refusal_xml(messages, batch, code.code(), message),
        ResponseFormat::Html => send_refusal_html(messages, code.code(), message),
    }
}

fn send_refusal_xml(messages: &[OutgoingMessage], batch: bool, code: u16, message: &str) -> String {
    let per_message: usize = messages
        .iter()
        .map(|m| 200 + message.len() + m.recipient.len() + m.message_type.len() + m.text.len())
        .sum();
    let mut out = String::with_capacity(XML_PROLOG.len() + 64 + per_message);
    out.push_str(XML_PROLOG);
    out.push_str("<response>\n");
    element(&mut out, "action", "sendmessage");
    out.push_str("<data>\n");
    let code = code.to_string();
    let mut suffix = String::new();
    for (i, m) in messages.iter().enumerate() {
        suffix.clear();
        if batch {
            let _ = write!(suffix, "{i}");
        }
        out.push_str("<acceptreport>\n");
        indexed_element(&mut out, "statuscode", &suffix, &code);
        indexed_element(&mut out, "statusmessage", &suffix, message);
        indexed_element(&mut out, "messageid", &suffix, "");
        indexed_element(&mut out, "recipient", &suffix, &m.recipient);
        indexed_element(&mut out, "messagetype", &suffix, &m.message_type);
        indexed_element(&mut out, "messagedata", &suffix, &m.text);
        out.push_str("</acceptreport>\n");
    }
    out.push_str("</data>\n</response>\n");
    out
}

fn send_refusal_html(messages: &[OutgoingMessage], code: u16, message: &str) -> String {
    let mut out = String::with_capacity(32 + messages.len() * (80 + message.len() + 20));
    out.push_str("<html>\n<body>\n");
    for m in messages {
        out.push_str("<p>");
        escape_into(&mut out, message, Markup::Html);
        let _ = write!(
            out,
            "<br>\nStatus code: {code}<br>\nMessage ID: <br>\nRecipient: "
        );
        escape_into(&mut out, &m.recipient, Markup::Html);
        out.push_str("<br></p>\n");
    }
    out.push_str("</body>\n</html>\n");
    out
}

/// `<name>text</name>\n`
fn element(out: &mut String, name: &str, text: &str) {
    indexed_element(out, name, "", text);
}

/// `<nameSUFFIX>text</nameSUFFIX>\n`
fn indexed_element(out: &mut String, name: &str, suffix: &str, text: &str) {
    let _ = write!(out, "<{name}{suffix}>");
    escape_into(out, text, Markup::Xml);
    let _ = writeln!(out, "</{name}{suffix}>");
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Markup {
    Xml,
    Html,
}

/// Appends `text` escaped for element content.
fn escape_into(out: &mut String, text: &str, markup: Markup) {
    let mut rest = text;
    while let Some(pos) = rest.find(|c: char| needs_escape(c, markup)) {
        out.push_str(&rest[..pos]);
        let c = rest[pos..].chars().next().unwrap_or_default();
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            _ => out.push('\u{FFFD}'),
        }
        rest = &rest[pos + c.len_utf8()..];
    }
    out.push_str(rest);
}

fn needs_escape(c: char, markup: Markup) -> bool {
    match c {
        '&' | '<' | '>' => true,
        '"' => markup == Markup::Html,
        '\t' | '\n' | '\r' => false,
        c => c < ' ' || c == '\u{FFFE}' || c == '\u{FFFF}',
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(recipient: &str, text: &str) -> OutgoingMessage {
        OutgoingMessage {
            recipient: recipient.into(),
            message_type: "SMS:TEXT".into(),
            text: text.into(),
        }
    }

    #[test]
    fn credits_answer_matches_the_spec_example() {
        assert_eq!(
            credits_answer("getcredits", "john", 744_000),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <!DOCTYPE smsapi PUBLIC \"-//OZEKI//DTD XML 1.0//EN\" \"http://www.ozekisms.com/DTD/smsapi.xml\">\n\
             <response>\n\
             <action>getcredits</action>\n\
             <data>\n\
             <account>\n\
             <username>john</username>\n\
             <balance>744</balance>\n\
             </account>\n\
             </data>\n\
             </response>\n"
        );
    }

    #[test]
    fn credits_answer_fractions_and_escaping() {
        let a = credits_answer("addcredits", "<b&b>", -2_500);
        assert!(a.contains("<action>addcredits</action>\n"));
        assert!(a.contains("<username>&lt;b&amp;b&gt;</username>\n"));
        assert!(a.contains("<balance>-2.5</balance>\n"));
    }

    #[test]
    fn error_answer_full_text() {
        assert_eq!(
            error_answer("setcredits", ErrorCode::Forbidden, "Not permitted <for> you & me"),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <!DOCTYPE smsapi PUBLIC \"-//OZEKI//DTD XML 1.0//EN\" \"http://www.ozekisms.com/DTD/smsapi.xml\">\n\
             <response>\n\
             <action>setcredits</action>\n\
             <data>\n\
             <errormessage>Not permitted &lt;for&gt; you &amp; me</errormessage>\n\
             <errorcode>1004</errorcode>\n\
             </data>\n\
             </response>\n"
        );
    }

    #[test]
    fn send_refusal_xml_full_text() {
        let m = [
            msg("+36201234567", "Hi <you>"),
            msg("+36301234567", "x\u{1}y"),
        ];
        let code = ErrorCode::InsufficientCredit;
        assert_eq!(
            send_refusal(&m, false, ResponseFormat::Xml, code, code.message()),
            format!(
                "{XML_PROLOG}<response>\n<action>sendmessage</action>\n<data>\n\
                 <acceptreport>\n<statuscode>1001</statuscode>\n<statusmessage>Insufficient credit</statusmessage>\n\
                 <messageid></messageid>\n<recipient>+36201234567</recipient>\n<messagetype>SMS:TEXT</messagetype>\n\
                 <messagedata>Hi &lt;you&gt;</messagedata>\n</acceptreport>\n\
                 <acceptreport>\n<statuscode>1001</statuscode>\n<statusmessage>Insufficient credit</statusmessage>\n\
                 <messageid></messageid>\n<recipient>+36301234567</recipient>\n<messagetype>SMS:TEXT</messagetype>\n\
                 <messagedata>x\u{FFFD}y</messagedata>\n</acceptreport>\n\
                 </data>\n</response>\n"
            )
        );
    }

    #[test]
    fn send_refusal_batch_is_indexed() {
        let m = [msg("1", "a"), msg("2", "b")];
        let out = send_refusal(
            &m,
            true,
            ResponseFormat::Xml,
            ErrorCode::RateLimited,
            "slow down",
        );
        for want in [
            "<statuscode0>1002</statuscode0>\n",
            "<statusmessage0>slow down</statusmessage0>\n",
            "<messageid0></messageid0>\n",
            "<recipient0>1</recipient0>\n",
            "<messagetype0>SMS:TEXT</messagetype0>\n",
            "<messagedata0>a</messagedata0>\n",
            "<recipient1>2</recipient1>\n",
            "<messagedata1>b</messagedata1>\n",
        ] {
            assert!(out.contains(want), "{want} missing in {out}");
        }
        assert_eq!(out.matches("<acceptreport>").count(), 2);
    }

    #[test]
    fn send_refusal_html_shape() {
        let m = [msg("+36201234567", "")];
        assert_eq!(
            send_refusal(&m, false, ResponseFormat::Html, ErrorCode::InsufficientCredit, "No \"credit\""),
            "<html>\n<body>\n<p>No &quot;credit&quot;<br>\nStatus code: 1001<br>\nMessage ID: <br>\n\
             Recipient: +36201234567<br></p>\n</body>\n</html>\n"
        );
    }
}
