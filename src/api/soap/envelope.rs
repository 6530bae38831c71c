//! SOAP 1.1 and 1.2 request envelopes, parsed defensively (SPEC 7).
//!
//! Owns the structural reading of client XML: the `Envelope` (its namespace
//! tells the SOAP version), an optional `Header` (whose blocks are skipped
//! unless they demand `mustUnderstand`), and a `Body` holding exactly one
//! operation element whose children are simple-content parameters. What the
//! operation and parameters *mean* is [`super::call`]'s business.
//!
//! Hostile input is bounded and inert:
//! - the text must be UTF-8 (an XML declaration naming another encoding is
//!   refused, not transcoded);
//! - a `DOCTYPE` is refused outright, so no DTD is ever read and no entity
//!   can be declared; references other than the five predefined entities and
//!   character references are errors, never expanded;
//! - processing instructions (other than the XML declaration) are refused,
//!   as SOAP requires;
//! - nesting depth and element count are capped by [`EnvelopeLimits`]; the
//!   byte size is capped before this parser sees the body.
//!
//! Errors may quote element names (escaped and truncated by the renderer),
//! never parameter values: passwords travel here.

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;
use thiserror::Error;

/// Namespace of a SOAP 1.1 envelope.
pub const SOAP11_ENV_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// Namespace of a SOAP 1.2 envelope.
pub const SOAP12_ENV_NS: &str = "http://www.w3.org/2003/05/soap-envelope";
/// `xsi:nil` lives here.
pub const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";
/// Longest name quoted in an error.
const NAME_ECHO_MAX: usize = 64;

/// The SOAP version of an envelope (and of the answer to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SoapVersion {
    V11,
    V12,
}

impl SoapVersion {
    pub fn envelope_ns(self) -> &'static str {
        match self {
            SoapVersion::V11 => SOAP11_ENV_NS,
            SoapVersion::V12 => SOAP12_ENV_NS,
        }
    }

    /// `Content-Type` of messages of this version (SOAP 1.1: `text/xml`,
    /// SOAP 1.2: `application/soap+xml`).
    pub fn content_type(self) -> &'static str {
        match self {
            SoapVersion::V11 => "text/xml; charset=utf-8",
            SoapVersion::V12 => "application/soap+xml; charset=utf-8",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SoapVersion::V11 => "1.1",
            SoapVersion::V12 => "1.2",
        }
    }
}

/// Bounds on the shape of an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeLimits {
    /// Deepest element nesting; the Envelope is depth 1, a parameter depth
    /// 4. Header blocks (WS-Security and the like) need a few more.
    pub max_depth: usize,
    /// Most elements in the whole document.
    pub max_elements: usize,
}

impl Default for EnvelopeLimits {
    fn default() -> Self {
        EnvelopeLimits {
            max_depth: 32,
            max_elements: 512,
        }
    }
}

/// A structurally valid request envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub version: SoapVersion,
    /// Namespace of the operation element (`None`: no namespace).
    pub operation_ns: Option<String>,
    /// Local name of the Body's one element.
    pub operation: String,
    /// The operation's child elements in order, by local name, with their
    /// text content. Children marked `xsi:nil="true"` are left out.
    pub params: Vec<(String, String)>,
}

impl Envelope {
    /// The text of parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request is not a usable SOAP envelope. Each maps to a SOAP Fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EnvelopeError {
    #[error("the request is not valid UTF-8")]
    NotUtf8,
    #[error("encoding {0:?} is not supported; send UTF-8")]
    UnsupportedEncoding(String),
    #[error("the request is not well-formed XML: {0}")]
    Malformed(String),
    #[error("a DOCTYPE is not allowed in a SOAP message")]
    Dtd,
    #[error("processing instructions are not allowed in a SOAP message")]
    ProcessingInstruction,
    #[error("elements nest deeper than {0} levels")]
    TooDeep(usize),
    #[error("more than {0} elements")]
    TooManyElements(usize),
    /// The root is not an `Envelope` in the SOAP 1.1 or 1.2 namespace.
    #[error("the root element is not a SOAP 1.1 or SOAP 1.2 Envelope")]
    VersionMismatch,
    #[error("header block {0:?} must be understood, and is not")]
    MustUnderstand(String),
    #[error("the Envelope has no Body")]
    MissingBody,
    #[error("the Body must contain exactly one element")]
    BodyNotOneElement,
    #[error("parameter {0:?} must have simple content")]
    ComplexParam(String),
    #[error("parameter {0:?} is given more than once")]
    DuplicateParam(String),
    #[error("unexpected {0}")]
    Unexpected(String),
}

/// A failed parse, with the SOAP version of the envelope if it got that far
/// (the fault is answered in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeFailure {
    pub version: Option<SoapVersion>,
    pub error: EnvelopeError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    BeforeRoot,
    /// Directly inside the Envelope (depth 1).
    Envelope,
    /// Inside the Header (its blocks are skipped).
    Header,
    /// Directly inside the Body.
    Body,
    /// Directly inside the operation element.
    Operation,
    /// Inside one parameter element.
    Param,
    AfterRoot,
}

fn echo(name: &[u8]) -> String {
    String::from_utf8_lossy(name)
        .chars()
        .take(NAME_ECHO_MAX)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn malformed(e: impl std::fmt::Display) -> EnvelopeError {
    let text: String = e.to_string().chars().take(200).collect();
    EnvelopeError::Malformed(text)
}

fn is_xml_whitespace(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// XML 1.0 allows no control characters but tab, line feed and carriage
/// return, and neither U+FFFE nor U+FFFF (`Char`, XML 1.0 §2.2); quick-xml
/// does not check, so this does (the envelope is refused with a fault).
fn check_xml_chars(text: &str) -> Result<(), EnvelopeError> {
    let bad = text.chars().find(|&c| {
        (c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || c == '\u{FFFE}' || c == '\u{FFFF}'
    });
    match bad {
        Some(c) => Err(EnvelopeError::Malformed(format!(
            "character U+{:04X} is not allowed in XML",
            c as u32
        ))),
        None => Ok(()),
    }
}

/// Parses a request body into an [`Envelope`].
pub fn parse_envelope(body: &[u8], limits: &EnvelopeLimits) -> Result<Envelope, EnvelopeFailure> {
    let mut p = Parser {
        version: None,
        limits,
    };
    p.run(body).map_err(|error| EnvelopeFailure {
        version: p.version,
        error,
    })
}

struct Parser<'l> {
    version: Option<SoapVersion>,
    limits: &'l EnvelopeLimits,
}

impl Parser<'_> {
    fn run(&mut self, body: &[u8]) -> Result<Envelope, EnvelopeError> {
        let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
        let text = std::str::from_utf8(body).map_err(|_| EnvelopeError::NotUtf8)?;
        check_xml_chars(text)?;
        let mut reader = NsReader::from_str(text);
        {
            let config = reader.config_mut();
            config.expand_empty_elements = true;
            config.check_end_names = true;
            config.check_comments = true;
        }

        let mut stage = Stage::BeforeRoot;
        let mut depth = 0usize;
        let mut elements = 0usize;
        let mut header_seen = false;
        let mut body_seen = false;
        let mut operation: Option<(Option<String>, String)> = None;
        let mut params: Vec<(String, String)> = Vec::new();
        // The parameter being read: its name, text, and whether it is nil.
        let mut param: Option<(String, String, bool)> = None;
        // Depth at which skipped header content started.
        let mut header_depth = 0usize;

        loop {
            let (resolved, event) = reader.read_resolved_event().map_err(malformed)?;
            // Owned, so the reader is free again for attribute resolution.
            let ns: Option<String> = match &event {
                Event::Start(_) => namespace(&resolved)?.map(str::to_owned),
                _ => None,
            };
            let ns = ns.as_deref();
            match event {
                Event::Decl(decl) => {
                    if stage != Stage::BeforeRoot {
                        return Err(EnvelopeError::Unexpected("XML declaration".into()));
                    }
                    if let Some(enc) = decl.encoding() {
                        let enc = enc.map_err(malformed)?;
                        if !enc.eq_ignore_ascii_case(b"utf-8") {
                            return Err(EnvelopeError::UnsupportedEncoding(echo(&enc)));
                        }
                    }
                }
                Event::DocType(_) => return Err(EnvelopeError::Dtd),
                Event::PI(_) => return Err(EnvelopeError::ProcessingInstruction),
                Event::Comment(_) => {}
                Event::Start(start) => {
                    depth += 1;
                    elements += 1;
                    if depth > self.limits.max_depth {
                        return Err(EnvelopeError::TooDeep(self.limits.max_depth));
                    }
                    if elements > self.limits.max_elements {
                        return Err(EnvelopeError::TooManyElements(self.limits.max_elements));
                    }
                    let local_name = start.local_name();
                    let local = local_name.as_ref();
                    match stage {
                        Stage::BeforeRoot => {
                            self.version = match (local, ns) {
                                (b"Envelope", Some(SOAP11_ENV_NS)) => Some(SoapVersion::V11),
                                (b"Envelope", Some(SOAP12_ENV_NS)) => Some(SoapVersion::V12),
                                _ => return Err(EnvelopeError::VersionMismatch),
                            };
                            stage = Stage::Envelope;
                        }
                        Stage::Envelope => {
                            let env_ns = self.version.map(SoapVersion::envelope_ns);
                            if ns != env_ns {
                                return Err(EnvelopeError::Unexpected(format!(
                                    "element {:?} in the Envelope",
                                    echo(local)
                                )));
                            }
                            match local {
                                b"Header" if !header_seen && !body_seen => {
                                    header_seen = true;
                                    header_depth = depth;
                                    stage = Stage::Header;
                                }
                                b"Body" if !body_seen => {
                                    body_seen = true;
                                    stage = Stage::Body;
                                }
                                _ => {
                                    return Err(EnvelopeError::Unexpected(format!(
                                        "element {:?} in the Envelope",
                                        echo(local)
                                    )))
                                }
                            }
                        }
                        Stage::Header => {
                            if depth == header_depth + 1 {
                                self.check_header_block(&reader, &start)?;
                            }
                        }
                        Stage::Body => {
                            if operation.is_some() {
                                return Err(EnvelopeError::BodyNotOneElement);
                            }
                            operation = Some((ns.map(str::to_owned), echo(local)));
                            stage = Stage::Operation;
                        }
                        Stage::Operation => {
                            let op_ns = operation.as_ref().and_then(|(n, _)| n.as_deref());
                            if ns.is_some() && ns != op_ns {
                                return Err(EnvelopeError::Unexpected(format!(
                                    "parameter {:?} in a foreign namespace",
                                    echo(local)
                                )));
                            }
                            let name = echo(local);
                            if params.iter().any(|(n, _)| *n == name) {
                                return Err(EnvelopeError::DuplicateParam(name));
                            }
                            let nil = is_nil(&reader, &start)?;
                            param = Some((name, String::new(), nil));
                            stage = Stage::Param;
                        }
                        Stage::Param => {
                            let name = param.take().map(|p| p.0).unwrap_or_default();
                            return Err(EnvelopeError::ComplexParam(name));
                        }
                        Stage::AfterRoot => {
                            return Err(EnvelopeError::Unexpected(
                                "content after the Envelope".into(),
                            ))
                        }
                    }
                }
                Event::End(_) => {
                    depth = depth.saturating_sub(1);
                    stage = match stage {
                        Stage::Envelope => Stage::AfterRoot,
                        Stage::Header if depth < header_depth => Stage::Envelope,
                        Stage::Header => Stage::Header,
                        Stage::Body => {
                            if operation.is_none() {
                                return Err(EnvelopeError::BodyNotOneElement);
                            }
                            Stage::Envelope
                        }
                        Stage::Operation => Stage::Body,
                        Stage::Param => {
                            if let Some((name, value, nil)) = param.take() {
                                if !nil {
                                    params.push((name, value));
                                }
                            }
                            Stage::Operation
                        }
                        Stage::BeforeRoot | Stage::AfterRoot => {
                            return Err(EnvelopeError::Unexpected("end tag".into()))
                        }
                    };
                }
                Event::Text(t) => {
                    let text = t.unescape().map_err(malformed)?;
                    // `&#1;` is as illegal as the raw character.
                    check_xml_chars(&text)?;
                    match (&mut param, stage) {
                        (Some(p), Stage::Param) => p.1.push_str(&text),
                        (_, Stage::Header) => {}
                        _ if is_xml_whitespace(&text) => {}
                        _ => return Err(EnvelopeError::Unexpected("text content".into())),
                    }
                }
                Event::CData(c) => {
                    let text =
                        std::str::from_utf8(c.as_ref()).map_err(|_| EnvelopeError::NotUtf8)?;
                    match (&mut param, stage) {
                        (Some(p), Stage::Param) => p.1.push_str(text),
                        (_, Stage::Header) => {}
                        _ if is_xml_whitespace(text) => {}
                        _ => return Err(EnvelopeError::Unexpected("CDATA content".into())),
                    }
                }
                Event::Empty(_) => {
                    // expand_empty_elements turns these into Start + End.
                    return Err(EnvelopeError::Unexpected("empty element".into()));
                }
                Event::Eof => break,
            }
        }
        match stage {
            Stage::AfterRoot => {}
            Stage::BeforeRoot => return Err(malformed("no root element")),
            _ => return Err(malformed("unexpected end of document")),
        }
        let Some(version) = self.version else {
            return Err(EnvelopeError::VersionMismatch);
        };
        if !body_seen {
            return Err(EnvelopeError::MissingBody);
        }
        let (operation_ns, operation) = operation.ok_or(EnvelopeError::BodyNotOneElement)?;
        Ok(Envelope {
            version,
            operation_ns,
            operation,
            params,
        })
    }

    /// A header block with `mustUnderstand` true is a fault: tollgate
    /// understands no header blocks.
    fn check_header_block(
        &self,
        reader: &NsReader<&[u8]>,
        start: &BytesStart,
    ) -> Result<(), EnvelopeError> {
        let env_ns = self.version.map(SoapVersion::envelope_ns);
        for attr in start.attributes().with_checks(true) {
            let attr = attr.map_err(malformed)?;
            let (ns, local) = reader.resolve_attribute(attr.key);
            if local.as_ref() == b"mustUnderstand" && namespace(&ns)? == env_ns {
                let value = attr.unescape_value().map_err(malformed)?;
                if matches!(value.trim(), "1" | "true") {
                    return Err(EnvelopeError::MustUnderstand(echo(
                        start.local_name().as_ref(),
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Whether a parameter element carries `xsi:nil="true"`.
fn is_nil(reader: &NsReader<&[u8]>, start: &BytesStart) -> Result<bool, EnvelopeError> {
    for attr in start.attributes().with_checks(true) {
        let attr = attr.map_err(malformed)?;
        let (ns, local) = reader.resolve_attribute(attr.key);
        if local.as_ref() == b"nil" && namespace(&ns)? == Some(XSI_NS) {
            let value = attr.unescape_value().map_err(malformed)?;
            return Ok(matches!(value.trim(), "1" | "true"));
        }
    }
    Ok(false)
}

/// The namespace of a resolved name as text; an undeclared prefix is an
/// error.
fn namespace<'a>(ns: &'a ResolveResult) -> Result<Option<&'a str>, EnvelopeError> {
    match ns {
        ResolveResult::Unbound => Ok(None),
        ResolveResult::Bound(n) => std::str::from_utf8(n.as_ref())
            .map(Some)
            .map_err(|_| EnvelopeError::NotUtf8),
        ResolveResult::Unknown(prefix) => Err(malformed(format!(
            "undeclared namespace prefix {:?}",
            echo(prefix)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "http://www.2sms.com/WebServices/2.2/Simple/";

    fn parse(text: &str) -> Result<Envelope, EnvelopeFailure> {
        parse_envelope(text.as_bytes(), &EnvelopeLimits::default())
    }

    fn soap11(body: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<soap:Envelope xmlns:soap=\"{SOAP11_ENV_NS}\" \
             xmlns:xsi=\"{XSI_NS}\"><soap:Body>{body}</soap:Body></soap:Envelope>"
        )
    }

    #[test]
    fn reads_both_versions_and_parameters() {
        let e = parse(&soap11(&format!(
            "<GetBalance xmlns=\"{NS}\"><Username>a&amp;b</Username>\
             <Password><![CDATA[p<w]]>&#x21;</Password><Code xsi:nil=\"true\"/></GetBalance>"
        )))
        .unwrap();
        assert_eq!(e.version, SoapVersion::V11);
        assert_eq!(e.operation, "GetBalance");
        assert_eq!(e.operation_ns.as_deref(), Some(NS));
        assert_eq!(e.param("Username"), Some("a&b"));
        assert_eq!(e.param("Password"), Some("p<w!"));
        assert_eq!(e.param("Code"), None);

        let text = format!(
            "<env:Envelope xmlns:env=\"{SOAP12_ENV_NS}\"><env:Header><x:Trace xmlns:x=\"urn:x\">\
             <x:Deep>1</x:Deep></x:Trace></env:Header><env:Body>\
             <t:GetBalance xmlns:t=\"{NS}\"><t:Username>u</t:Username><Password>p</Password>\
             </t:GetBalance></env:Body></env:Envelope>"
        );
        let e = parse(&text).unwrap();
        assert_eq!(e.version, SoapVersion::V12);
        assert_eq!(e.params.len(), 2);
    }

    fn error_of(text: &str) -> EnvelopeError {
        parse(text).unwrap_err().error
    }

    #[test]
    fn refuses_dtds_entities_and_pis() {
        let bomb = "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\">\
                    <!ENTITY lol2 \"&lol;&lol;&lol;\">]><lolz>&lol2;</lolz>";
        assert_eq!(error_of(bomb), EnvelopeError::Dtd);
        let xxe = soap11(&format!(
            "<GetBalance xmlns=\"{NS}\"><Username>&xxe;</Username></GetBalance>"
        ));
        assert!(matches!(error_of(&xxe), EnvelopeError::Malformed(_)));
        let pi = soap11("<?evil x?>");
        assert_eq!(error_of(&pi), EnvelopeError::ProcessingInstruction);
        let latin = "<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><a/>";
        assert!(matches!(
            error_of(latin),
            EnvelopeError::UnsupportedEncoding(_)
        ));
        assert_eq!(
            parse_envelope(b"<a>\xff</a>", &EnvelopeLimits::default())
                .unwrap_err()
                .error,
            EnvelopeError::NotUtf8
        );
    }

    #[test]
    fn refuses_control_characters_raw_or_referenced() {
        for bad in ["jo\u{1}hn", "x\u{0}", "&#1;", "&#x1F;", "\u{FFFF}"] {
            let text = soap11(&format!(
                "<GetBalance xmlns=\"{NS}\"><Username>{bad}</Username></GetBalance>"
            ));
            assert!(
                matches!(error_of(&text), EnvelopeError::Malformed(ref m) if m.contains("not allowed")),
                "{bad:?}: {:?}",
                error_of(&text)
            );
        }
        let fine = soap11(&format!(
            "<GetBalance xmlns=\"{NS}\"><Username>a\tb\r\nc&#9;</Username></GetBalance>"
        ));
        assert!(parse(&fine).is_ok());
    }

    #[test]
    fn refuses_bad_structure_with_the_version_known_so_far() {
        assert_eq!(
            error_of("<Envelope xmlns=\"urn:other\"/>"),
            EnvelopeError::VersionMismatch
        );
        assert!(matches!(error_of("not xml"), EnvelopeError::Unexpected(_)));
        assert!(matches!(error_of(""), EnvelopeError::Malformed(_)));
        let f = parse(&format!(
            "<s:Envelope xmlns:s=\"{SOAP12_ENV_NS}\"></s:Envelope>"
        ))
        .unwrap_err();
        assert_eq!(f.version, Some(SoapVersion::V12));
        assert_eq!(f.error, EnvelopeError::MissingBody);
        assert_eq!(error_of(&soap11("")), EnvelopeError::BodyNotOneElement);
        assert_eq!(
            error_of(&soap11("<a xmlns=\"urn:a\"/><b xmlns=\"urn:a\"/>")),
            EnvelopeError::BodyNotOneElement
        );
        assert_eq!(
            error_of(&soap11("<a xmlns=\"urn:a\"><p><q/></p></a>")),
            EnvelopeError::ComplexParam("p".into())
        );
        assert_eq!(
            error_of(&soap11("<a xmlns=\"urn:a\"><p/><p/></a>")),
            EnvelopeError::DuplicateParam("p".into())
        );
        assert!(matches!(
            error_of(&soap11("<a xmlns=\"urn:a\">text<p/></a>")),
            EnvelopeError::Unexpected(_)
        ));
        assert!(matches!(
            error_of(&soap11("<a xmlns=\"urn:a\"><p></a>")),
            EnvelopeError::Malformed(_)
        ));
        assert!(matches!(
            error_of(&soap11("<x:a/>")),
            EnvelopeError::Malformed(_)
        ));
        let must = format!(
            "<s:Envelope xmlns:s=\"{SOAP11_ENV_NS}\"><s:Header><h:Sec xmlns:h=\"urn:h\" \
             s:mustUnderstand=\"1\"/></s:Header><s:Body><a/></s:Body></s:Envelope>"
        );
        assert_eq!(error_of(&must), EnvelopeError::MustUnderstand("Sec".into()));
        let after = format!("{}<extra/>", soap11("<a/>"));
        assert!(matches!(
            error_of(&after),
            EnvelopeError::Unexpected(_) | EnvelopeError::Malformed(_)
        ));
    }

    #[test]
    fn bounds_depth_and_element_count() {
        let deep = format!(
            "{}{}{}",
            "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Header>",
            "<a>".repeat(100),
            "</a>".repeat(100)
        );
        assert_eq!(error_of(&deep), EnvelopeError::TooDeep(32));
        let many = soap11(&format!("<a xmlns=\"urn:a\">{}</a>", "<p/>".repeat(600)));
        assert!(matches!(
            error_of(&many),
            EnvelopeError::TooManyElements(512) | EnvelopeError::DuplicateParam(_)
        ));
        let many_unique = soap11(&format!(
            "<a xmlns=\"urn:a\">{}</a>",
            (0..600).map(|i| format!("<p{i}/>")).collect::<String>()
        ));
        assert_eq!(error_of(&many_unique), EnvelopeError::TooManyElements(512));
    }
}
