//! Renders the simulator's answers in Ozeki NG's exact shapes.
//!
//! XML answers start with the XML declaration and a DOCTYPE line that depends
//! on the action (`smsapi` for send and credit actions, `response` for
//! `receivemessage`, none for `reporting`), then one element per line. HTML
//! answers (`responseformat=html`) mimic Ozeki's plain per-recipient blocks.

use std::borrow::Cow;
use std::fmt::Write;

/// The XML declaration every XML answer starts with.
pub const XML_DECL: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;
/// DOCTYPE of send and credit answers.
pub const DOCTYPE_SMSAPI: &str = r#"<!DOCTYPE smsapi PUBLIC "-//OZEKI//DTD XML 1.0//EN" "http://www.ozekisms.com/DTD/smsapi.xml">"#;
/// DOCTYPE of `receivemessage` answers.
pub const DOCTYPE_RESPONSE: &str = r#"<!DOCTYPE response PUBLIC "-//OZEKI//DTD XML 1.0//EN" "http://www.ozekisms.com/DTD/response.xml">"#;

/// Status text of an accepted message.
pub const ACCEPTED: &str = "Message accepted for delivery";
/// Status text of a rejected recipient.
pub const INVALID_RECIPIENT: &str = "Invalid recipient";

/// Which DOCTYPE line an answer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doctype {
    Smsapi,
    Response,
    None,
}

impl Doctype {
    /// The DOCTYPE Ozeki uses for `action` (lower-cased).
    pub fn for_action(action: &str) -> Doctype {
        match action {
            "receivemessage" => Doctype::Response,
            "reporting" => Doctype::None,
            _ => Doctype::Smsapi,
        }
    }
}

/// Escapes XML/HTML text content and attribute values.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.contains(['&', '<', '>', '"', '\'']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// One recipient's outcome of a `sendmessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptReport {
    /// Message index in a batch (`messagecount=N`); `None` for plain sends.
    pub index: Option<usize>,
    pub statuscode: u32,
    pub statusmessage: &'static str,
    /// Empty when rejected.
    pub messageid: String,
    pub recipient: String,
    pub messagetype: String,
    pub messagedata: String,
}

/// One message waiting in the simulated inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    pub messageid: String,
    pub originator: String,
    pub recipient: String,
    pub messagetype: String,
    pub messagedata: String,
    pub senttime: String,
    pub receivedtime: String,
}

fn prolog(out: &mut String, doctype: Doctype) {
    out.push_str(XML_DECL);
    out.push('\n');
    match doctype {
        Doctype::Smsapi => {
            out.push_str(DOCTYPE_SMSAPI);
            out.push('\n');
        }
        Doctype::Response => {
            out.push_str(DOCTYPE_RESPONSE);
            out.push('\n');
        }
        Doctype::None => {}
    }
}

fn element(out: &mut String, name: &str, suffix: &str, text: &str) {
    let _ = writeln!(out, "<{name}{suffix}>{}</{name}{suffix}>", escape(text));
}

fn open(out: &mut String, doctype: Doctype, action: &str) {
    prolog(out, doctype);
    out.push_str("<response>\n");
    element(out, "action", "", action);
    out.push_str("<data>\n");
}

fn close(out: &mut String) {
    out.push_str("</data>\n</response>\n");
}

/// The XML `sendmessage` answer: one `<acceptreport>` per recipient, with
/// index-suffixed element names for batch reports.
pub fn send_xml(reports: &[AcceptReport]) -> String {
    let mut out = String::with_capacity(512 + reports.len() * 300);
    open(&mut out, Doctype::Smsapi, "sendmessage");
    let mut suffix = String::new();
    for r in reports {
        suffix.clear();
        if let Some(i) = r.index {
            let _ = write!(suffix, "{i}");
        }
        out.push_str("<acceptreport>\n");
        let _ = writeln!(
            out,
            "<statuscode{suffix}>{}</statuscode{suffix}>",
            r.statuscode
        );
        element(&mut out, "statusmessage", &suffix, r.statusmessage);
        element(&mut out, "messageid", &suffix, &r.messageid);
        element(&mut out, "recipient", &suffix, &r.recipient);
        element(&mut out, "messagetype", &suffix, &r.messagetype);
        element(&mut out, "messagedata", &suffix, &r.messagedata);
        out.push_str("</acceptreport>\n");
    }
    close(&mut out);
    out
}

/// The HTML `sendmessage` answer (`responseformat=html`).
pub fn send_html(reports: &[AcceptReport]) -> String {
    let mut out = String::with_capacity(128 + reports.len() * 160);
    out.push_str("<html><head><title>Ozeki NG SMS Gateway</title></head><body>\n");
    for r in reports {
        let _ = write!(
            out,
            "<p>{}<br>\nStatus code: {}<br>\nMessage ID: {}<br>\nRecipient: {}<br></p>\n",
            escape(r.statusmessage),
            r.statuscode,
            escape(&r.messageid),
            escape(&r.recipient),
        );
    }
    out.push_str("</body></html>\n");
    out
}

/// The credit actions' answer (SPEC 1.2).
pub fn credits_xml(action: &str, username: &str, balance: i64) -> String {
    let mut out = String::with_capacity(400);
    open(&mut out, Doctype::Smsapi, action);
    out.push_str("<account>\n");
    element(&mut out, "username", "", username);
    let _ = writeln!(out, "<balance>{balance}</balance>");
    out.push_str("</account>\n");
    close(&mut out);
    out
}

/// An error answer (HTTP 200) in the DOCTYPE style of `action`.
pub fn error_xml(action: &str, message: &str, code: u32) -> String {
    let mut out = String::with_capacity(400);
    open(&mut out, Doctype::for_action(action), action);
    element(&mut out, "errormessage", "", message);
    let _ = writeln!(out, "<errorcode>{code}</errorcode>");
    close(&mut out);
    out
}

/// The `receivemessage` answer listing `messages`.
pub fn receive_xml(messages: &[InboxMessage]) -> String {
    let mut out = String::with_capacity(400 + messages.len() * 400);
    open(&mut out, Doctype::Response, "receivemessage");
    for m in messages {
        out.push_str("<message>\n");
        element(&mut out, "messageid", "", &m.messageid);
        element(&mut out, "originator", "", &m.originator);
        element(&mut out, "recipient", "", &m.recipient);
        element(&mut out, "messagetype", "", &m.messagetype);
        element(&mut out, "messagedata", "", &m.messagedata);
        element(&mut out, "senttime", "", &m.senttime);
        element(&mut out, "receivedtime", "", &m.receivedtime);
        out.push_str("</message>\n");
    }
    close(&mut out);
    out
}

/// What the generic answer echoes about the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echo<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// Raw query string (still percent-encoded).
    pub query: &'a str,
    pub query_len: usize,
    pub body_len: usize,
    /// Hex BLAKE3 of the raw body.
    pub body_blake3: &'a str,
}

/// The answer to every action the simulator does not model (`reporting`,
/// user handling, unknown actions): it echoes the raw request so tests can
/// check that a proxy forwarded it byte-exactly.
pub fn generic_xml(action: &str, echo: &Echo<'_>) -> String {
    let mut out = String::with_capacity(600 + echo.query.len());
    open(&mut out, Doctype::for_action(action), action);
    out.push_str("<echo>\n");
    element(&mut out, "method", "", echo.method);
    element(&mut out, "path", "", echo.path);
    element(&mut out, "query", "", echo.query);
    let _ = writeln!(out, "<querylength>{}</querylength>", echo.query_len);
    let _ = writeln!(out, "<bodylength>{}</bodylength>", echo.body_len);
    element(&mut out, "bodyblake3", "", echo.body_blake3);
    out.push_str("</echo>\n");
    close(&mut out);
    out
}

/// Small HTML body for simulated HTTP errors.
pub fn http_error_html(status: u16, reason: &str) -> String {
    format!(
        "<html><head><title>{status} {reason}</title></head><body><h1>{status} {reason}</h1></body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(index: Option<usize>) -> AcceptReport {
        AcceptReport {
            index,
            statuscode: 0,
            statusmessage: ACCEPTED,
            messageid: "ERFAV23D".into(),
            recipient: "+36201234567".into(),
            messagetype: "SMS:TEXT".into(),
            messagedata: "Hello world".into(),
        }
    }

    #[test]
    fn escape_xml_text() {
        assert!(matches!(escape("plain"), Cow::Borrowed("plain")));
        assert_eq!(escape(r#"a<b>&"c'"#), "a&lt;b&gt;&amp;&quot;c&apos;");
    }

    #[test]
    fn send_xml_exact_shape() {
        let expected = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
<!DOCTYPE smsapi PUBLIC \"-//OZEKI//DTD XML 1.0//EN\" \"http://www.ozekisms.com/DTD/smsapi.xml\">\n\
<response>\n\
<action>sendmessage</action>\n\
<data>\n\
<acceptreport>\n\
<statuscode>0</statuscode>\n\
<statusmessage>Message accepted for delivery</statusmessage>\n\
<messageid>ERFAV23D</messageid>\n\
<recipient>+36201234567</recipient>\n\
<messagetype>SMS:TEXT</messagetype>\n\
<messagedata>Hello world</messagedata>\n\
</acceptreport>\n\
</data>\n\
</response>\n";
        assert_eq!(send_xml(&[report(None)]), expected);
    }

    #[test]
    fn send_xml_batch_suffixes_and_rejects() {
        let mut rejected = report(Some(1));
        rejected.statuscode = 11;
        rejected.statusmessage = INVALID_RECIPIENT;
        rejected.messageid.clear();
        rejected.messagedata = "a<b & c".into();
        let xml = send_xml(&[report(Some(0)), rejected]);
        assert!(xml.contains("<statuscode0>0</statuscode0>\n<statusmessage0>Message accepted for delivery</statusmessage0>\n<messageid0>ERFAV23D</messageid0>\n<recipient0>+36201234567</recipient0>\n<messagetype0>SMS:TEXT</messagetype0>\n<messagedata0>Hello world</messagedata0>\n"));
        assert!(xml.contains("<statuscode1>11</statuscode1>\n<statusmessage1>Invalid recipient</statusmessage1>\n<messageid1></messageid1>\n"));
        assert!(xml.contains("<messagedata1>a&lt;b &amp; c</messagedata1>"));
        assert_eq!(xml.matches("<acceptreport>").count(), 2);
    }

    #[test]
    fn send_html_exact_shape() {
        let mut rejected = report(None);
        rejected.statuscode = 11;
        rejected.statusmessage = INVALID_RECIPIENT;
        rejected.messageid.clear();
        rejected.recipient = "<99>".into();
        let html = send_html(&[report(None), rejected]);
        assert_eq!(
            html,
            "<html><head><title>Ozeki NG SMS Gateway</title></head><body>\n\
<p>Message accepted for delivery<br>\n\
Status code: 0<br>\n\
Message ID: ERFAV23D<br>\n\
Recipient: +36201234567<br></p>\n\
<p>Invalid recipient<br>\n\
Status code: 11<br>\n\
Message ID: <br>\n\
Recipient: &lt;99&gt;<br></p>\n\
</body></html>\n"
        );
    }

    #[test]
    fn credits_exact_shape() {
        assert_eq!(
            credits_xml("getcredits", "john", 744),
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
        assert!(credits_xml("addcredits", "x", -5).contains("<balance>-5</balance>"));
    }

    #[test]
    fn error_shape_follows_action_doctype() {
        let e = error_xml("getcredits", "Invalid username or password", 1);
        assert!(e.starts_with(&format!("{XML_DECL}\n{DOCTYPE_SMSAPI}\n<response>\n")));
        assert!(e.contains("<data>\n<errormessage>Invalid username or password</errormessage>\n<errorcode>1</errorcode>\n</data>"));
        assert!(error_xml("receivemessage", "x", 1).contains(DOCTYPE_RESPONSE));
        assert!(!error_xml("reporting", "x", 1).contains("DOCTYPE"));
    }

    #[test]
    fn receive_shape() {
        let m = InboxMessage {
            messageid: "AAAAAAAA".into(),
            originator: "+36301234567".into(),
            recipient: "+36201112222".into(),
            messagetype: "SMS:TEXT".into(),
            messagedata: "Hi & bye".into(),
            senttime: "2024-01-01 10:00:00".into(),
            receivedtime: "2024-01-01 10:00:01".into(),
        };
        let xml = receive_xml(&[m]);
        assert!(xml.starts_with(&format!("{XML_DECL}\n{DOCTYPE_RESPONSE}\n<response>\n<action>receivemessage</action>\n<data>\n<message>\n")));
        assert!(xml.contains("<originator>+36301234567</originator>\n"));
        assert!(xml.contains("<messagedata>Hi &amp; bye</messagedata>\n"));
        assert!(xml.ends_with("</message>\n</data>\n</response>\n"));
        assert!(receive_xml(&[]).ends_with("<data>\n</data>\n</response>\n"));
    }

    #[test]
    fn generic_echo_shape() {
        let echo = Echo {
            method: "POST",
            path: "/api",
            query: "action=reporting&a=<1>",
            query_len: 22,
            body_len: 5,
            body_blake3: "abc",
        };
        let xml = generic_xml("reporting", &echo);
        assert!(xml.starts_with(&format!(
            "{XML_DECL}\n<response>\n<action>reporting</action>\n<data>\n<echo>\n"
        )));
        assert!(xml.contains("<query>action=reporting&amp;a=&lt;1&gt;</query>\n<querylength>22</querylength>\n<bodylength>5</bodylength>\n"));
        assert!(generic_xml("adduser", &echo).contains(DOCTYPE_SMSAPI));
    }
}
