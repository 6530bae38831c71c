//! The XML answer shape, read in full: the direct scan ([`super::fast`])
//! first, then quick-xml for whatever it declines.
//!
//! XML is read with quick-xml without DTD processing: the DOCTYPE line is
//! skipped, only the five predefined entities and character references are
//! expanded, and an unknown entity makes the answer malformed.

use quick_xml::events::Event;
use quick_xml::Reader;

use super::fast::parse_plain_xml;
use super::report::ReportBuilder;
use super::{malformed, AcceptReport, AnswerError};

pub(super) fn parse_xml(body: &[u8]) -> Result<Vec<AcceptReport>, AnswerError> {
    // Nearly every answer is plain: elements without attributes, text
    // without entities. Those are read by a direct scan (several times
    // cheaper than quick-xml); anything else, and anything the scan finds
    // wrong, goes to quick-xml, whose verdict (and error) stands.
    if let Some(reports) = parse_plain_xml(body) {
        return Ok(reports);
    }
    let mut reader = Reader::from_reader(body);
    let mut builder = ReportBuilder::default();
    loop {
        let event = reader.read_event().map_err(malformed)?;
        match event {
            Event::Start(e) => builder.start(e.local_name().as_ref())?,
            Event::Empty(e) => builder.empty(e.local_name().as_ref())?,
            Event::Text(t) => {
                if builder.capturing() {
                    builder.text(&t.unescape().map_err(malformed)?);
                }
            }
            Event::CData(t) => {
                if builder.capturing() {
                    builder.text(&t.decode().map_err(malformed)?);
                }
            }
            Event::End(_) => builder.end()?,
            Event::Eof => break,
            // The DOCTYPE is skipped, never interpreted; comments, PIs and
            // the declaration carry nothing we need.
            Event::DocType(_) | Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
        }
    }
    builder.finish()
}
