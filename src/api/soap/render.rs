//! SOAP answers of the 2sms service (SPEC 2.2): the two operation responses
//! and SOAP Faults, each in the version of the request.
//!
//! Shapes follow the ASMX original (document/literal, the response element
//! in the service namespace, unprefixed children). Decimals are written with
//! up to 3 decimals and no trailing zeros; `…Result` is an `xs:boolean`;
//! `Code` is `0` or the numeric code of `crate::error`. Every piece of text
//! is escaped, and characters XML 1.0 cannot carry are replaced by U+FFFD.

use super::call::{OperationName, SERVICE_NS};
use super::envelope::{SoapVersion, SOAP12_ENV_NS};
use crate::money::format_credits;

/// An account's available balances, per bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balances {
    pub anytime_milli: i64,
    pub offpeak_milli: i64,
}

/// The answer to `GetBalance`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalanceAnswer {
    pub ok: bool,
    /// `None` when the caller may not see it (it did not authenticate):
    /// the elements are left out, never filled with a wrong number.
    pub balances: Option<Balances>,
    pub result_text: String,
    /// 0 on success, else the error code.
    pub code: u16,
}

/// The answer to `SubAccountGiveCredit`: both accounts' available balances
/// after the transfer (or as they stand, when it failed). A balance the
/// caller may not see (no authentication, not its sub-account) is `None`
/// and left out of the answer — never answered as 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GiveCreditAnswer {
    pub ok: bool,
    pub parent: Option<Balances>,
    pub sub: Option<Balances>,
    pub result_text: String,
    pub code: u16,
}

/// What kind of SOAP Fault to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The envelope is not one of the versions served.
    VersionMismatch,
    /// A header block demanded understanding.
    MustUnderstand,
    /// The message is wrong (1.1 `Client`, 1.2 `Sender`).
    Client,
    /// tollgate failed (1.1 `Server`, 1.2 `Receiver`).
    Server,
}

impl FaultKind {
    /// The fault code's local name in `version`.
    pub fn code(self, version: SoapVersion) -> &'static str {
        match (self, version) {
            (FaultKind::VersionMismatch, _) => "VersionMismatch",
            (FaultKind::MustUnderstand, _) => "MustUnderstand",
            (FaultKind::Client, SoapVersion::V11) => "Client",
            (FaultKind::Client, SoapVersion::V12) => "Sender",
            (FaultKind::Server, SoapVersion::V11) => "Server",
            (FaultKind::Server, SoapVersion::V12) => "Receiver",
        }
    }
}

fn open_envelope(out: &mut String, version: SoapVersion) {
    out.push_str("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<soap:Envelope xmlns:soap=\"");
    out.push_str(version.envelope_ns());
    out.push_str(
        "\" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" \
         xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\">",
    );
}

fn response(version: SoapVersion, op: OperationName, fields: &[(String, String)]) -> String {
    let mut out = String::with_capacity(512);
    open_envelope(&mut out, version);
    out.push_str("<soap:Body><");
    out.push_str(op.as_str());
    out.push_str("Response xmlns=\"");
    out.push_str(SERVICE_NS);
    out.push_str("\">");
    for (name, value) in fields {
        element(&mut out, name, value);
    }
    out.push_str("</");
    out.push_str(op.as_str());
    out.push_str("Response></soap:Body></soap:Envelope>\n");
    out
}

fn boolean(b: bool) -> String {
    if b { "true" } else { "false" }.to_string()
}

/// The elements `{prefix}AnyTimeBalance` and `{prefix}OffPeakBalance`, if
/// the balances are known.
fn balance_fields(fields: &mut Vec<(String, String)>, prefix: &str, b: Option<Balances>) {
    if let Some(b) = b {
        fields.push((
            format!("{prefix}AnyTimeBalance"),
            format_credits(b.anytime_milli),
        ));
        fields.push((
            format!("{prefix}OffPeakBalance"),
            format_credits(b.offpeak_milli),
        ));
    }
}

/// The `GetBalanceResponse` envelope.
pub fn balance_response(version: SoapVersion, a: &BalanceAnswer) -> String {
    let mut fields = vec![("GetBalanceResult".to_string(), boolean(a.ok))];
    balance_fields(&mut fields, "", a.balances);
    fields.push(("ResultText".into(), a.result_text.clone()));
    fields.push(("Code".into(), a.code.to_string()));
    response(version, OperationName::GetBalance, &fields)
}

/// The `SubAccountGiveCreditResponse` envelope.
pub fn give_credit_response(version: SoapVersion, a: &GiveCreditAnswer) -> String {
    let mut fields = vec![("SubAccountGiveCreditResult".to_string(), boolean(a.ok))];
    balance_fields(&mut fields, "Parent", a.parent);
    balance_fields(&mut fields, "Sub", a.sub);
    fields.push(("ResultText".into(), a.result_text.clone()));
    fields.push(("Code".into(), a.code.to_string()));
    response(version, OperationName::SubAccountGiveCredit, &fields)
}

/// A SOAP Fault in `version`: 1.1 `faultcode`/`faultstring`, 1.2
/// `Code/Value` and `Reason/Text`. A 1.2 `VersionMismatch` also lists the
/// supported envelopes in an `Upgrade` header. `reason` must not carry
/// secrets.
pub fn fault(version: SoapVersion, kind: FaultKind, reason: &str) -> String {
    let mut out = String::with_capacity(512 + reason.len());
    open_envelope(&mut out, version);
    match version {
        SoapVersion::V11 => {
            out.push_str("<soap:Body><soap:Fault><faultcode>soap:");
            out.push_str(kind.code(version));
            out.push_str("</faultcode>");
            element(&mut out, "faultstring", reason);
            out.push_str("</soap:Fault></soap:Body>");
        }
        SoapVersion::V12 => {
            if kind == FaultKind::VersionMismatch {
                out.push_str("<soap:Header><soap:Upgrade>");
                out.push_str("<soap:SupportedEnvelope qname=\"v12:Envelope\" xmlns:v12=\"");
                out.push_str(SOAP12_ENV_NS);
                out.push_str("\"/><soap:SupportedEnvelope qname=\"v11:Envelope\" xmlns:v11=\"");
                out.push_str(super::envelope::SOAP11_ENV_NS);
                out.push_str("\"/></soap:Upgrade></soap:Header>");
            }
            out.push_str("<soap:Body><soap:Fault><soap:Code><soap:Value>soap:");
            out.push_str(kind.code(version));
            out.push_str("</soap:Value></soap:Code><soap:Reason><soap:Text xml:lang=\"en\">");
            push_escaped(&mut out, reason);
            out.push_str("</soap:Text></soap:Reason></soap:Fault></soap:Body>");
        }
    }
    out.push_str("</soap:Envelope>\n");
    out
}

/// `<name>escaped text</name>`.
fn element(out: &mut String, name: &str, text: &str) {
    out.push('<');
    out.push_str(name);
    out.push('>');
    push_escaped(out, text);
    out.push_str("</");
    out.push_str(name);
    out.push('>');
}

/// Escapes `&`, `<`, `>` and replaces characters XML 1.0 cannot carry.
pub fn push_escaped(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\t' | '\n' => out.push(c),
            // A literal CR would be normalised away by the client's parser.
            '\r' => out.push_str("&#13;"),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::envelope::{parse_envelope, EnvelopeLimits};
    use super::*;

    #[test]
    fn responses_parse_back_with_their_values() {
        let a = GiveCreditAnswer {
            ok: true,
            parent: Some(Balances {
                anytime_milli: 7_500,
                offpeak_milli: 0,
            }),
            sub: Some(Balances {
                anytime_milli: 2_500,
                offpeak_milli: -125,
            }),
            result_text: "P & <S>\u{1}".into(),
            code: 0,
        };
        for version in [SoapVersion::V11, SoapVersion::V12] {
            let text = give_credit_response(version, &a);
            let e = parse_envelope(text.as_bytes(), &EnvelopeLimits::default()).unwrap();
            assert_eq!(e.version, version);
            assert_eq!(e.operation, "SubAccountGiveCreditResponse");
            assert_eq!(e.operation_ns.as_deref(), Some(SERVICE_NS));
            assert_eq!(e.param("SubAccountGiveCreditResult"), Some("true"));
            assert_eq!(e.param("ParentAnyTimeBalance"), Some("7.5"));
            assert_eq!(e.param("SubOffPeakBalance"), Some("-0.125"));
            assert_eq!(e.param("ResultText"), Some("P & <S>\u{FFFD}"));
            assert_eq!(e.param("Code"), Some("0"));
        }
        let b = balance_response(
            SoapVersion::V11,
            &BalanceAnswer {
                ok: false,
                balances: None,
                result_text: "Authentication failed".into(),
                code: 1003,
            },
        );
        assert!(b.contains("<GetBalanceResult>false</GetBalanceResult>"));
        assert!(b.contains("<Code>1003</Code>"));
        assert!(
            !b.contains("Balance>0<"),
            "an unknown balance is left out: {b}"
        );
    }

    #[test]
    fn faults_have_the_version_specific_shape() {
        let f = fault(SoapVersion::V11, FaultKind::Client, "bad <xml>");
        assert!(f.contains("<faultcode>soap:Client</faultcode>"));
        assert!(f.contains("<faultstring>bad &lt;xml&gt;</faultstring>"));
        assert!(f.contains("http://schemas.xmlsoap.org/soap/envelope/"));
        let f = fault(SoapVersion::V12, FaultKind::Client, "bad");
        assert!(f.contains("<soap:Value>soap:Sender</soap:Value>"));
        assert!(f.contains("<soap:Reason><soap:Text xml:lang=\"en\">bad</soap:Text></soap:Reason>"));
        let f = fault(SoapVersion::V12, FaultKind::VersionMismatch, "v");
        assert!(f.contains("<soap:Upgrade>"));
        assert!(f.contains("soap:VersionMismatch"));
        // Well-formed: quick-xml reads it to the end.
        let mut r = quick_xml::Reader::from_str(&f);
        loop {
            match r.read_event().unwrap() {
                quick_xml::events::Event::Eof => break,
                _ => continue,
            }
        }
    }
}
