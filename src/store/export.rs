//! `tollgate ledger export`: every stored entry, in seq order, as CSV or
//! JSON lines. Owns the two formats; it only reads the store.
//!
//! Both formats carry the amount twice: `amount` as decimal credits (the
//! form every front door uses) and `amount_milli` as the exact integer.

use std::io::Write;

use super::{Store, StoreError};
use crate::ledger::Entry;
use crate::money::format_credits;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// RFC 4180 CSV with a header line.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

pub const CSV_HEADER: &str =
    "seq,kind,account,bucket,amount,amount_milli,reservation_id,reference,tariff_version,at_unix_ms";

/// Writes every entry of `store` to `out`; returns how many.
pub fn export(
    store: &mut dyn Store,
    format: ExportFormat,
    out: &mut dyn Write,
) -> Result<u64, StoreError> {
    if format == ExportFormat::Csv {
        writeln!(out, "{CSV_HEADER}")?;
    }
    let n = store.for_each_entry(&mut |e| {
        match format {
            ExportFormat::Csv => writeln!(out, "{}", csv_line(&e))?,
            ExportFormat::Jsonl => writeln!(out, "{}", json_line(&e))?,
        }
        Ok(())
    })?;
    out.flush()?;
    Ok(n)
}

/// Quotes a field when it holds a comma, quote or line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

pub fn csv_line(e: &Entry) -> String {
    format!(
        "{},{},{},{},{},{},{},{},{},{}",
        e.seq,
        e.kind,
        csv_field(&e.account),
        e.bucket,
        format_credits(e.amount_milli),
        e.amount_milli,
        e.reservation_id.map(|r| r.to_string()).unwrap_or_default(),
        csv_field(e.reference.as_deref().unwrap_or("")),
        csv_field(e.tariff_version.as_deref().unwrap_or("")),
        e.at_unix_ms
    )
}

/// One JSON line, fields in the CSV's order.
#[derive(serde::Serialize)]
struct JsonEntry<'a> {
    seq: u64,
    kind: &'static str,
    account: &'a str,
    bucket: &'static str,
    amount: String,
    amount_milli: i64,
    reservation_id: Option<u64>,
    reference: Option<&'a str>,
    tariff_version: Option<&'a str>,
    at_unix_ms: i64,
}

pub fn json_line(e: &Entry) -> String {
    serde_json::to_string(&JsonEntry {
        seq: e.seq,
        kind: e.kind.as_str(),
        account: &e.account,
        bucket: e.bucket.as_str(),
        amount: format_credits(e.amount_milli),
        amount_milli: e.amount_milli,
        reservation_id: e.reservation_id,
        reference: e.reference.as_deref(),
        tariff_version: e.tariff_version.as_deref(),
        at_unix_ms: e.at_unix_ms,
    })
    .expect("an entry serialises to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Bucket, EntryKind};

    fn entry() -> Entry {
        Entry {
            seq: 42,
            kind: EntryKind::Reserve,
            account: "acme, \"intl\"".into(),
            bucket: Bucket::OffPeak,
            amount_milli: -2_500,
            reservation_id: Some(42),
            reference: Some("line\nbreak".into()),
            tariff_version: None,
            at_unix_ms: 1_700_000_000_123,
        }
    }

    #[test]
    fn csv_quotes_only_what_needs_quoting() {
        assert_eq!(
            csv_line(&entry()),
            "42,reserve,\"acme, \"\"intl\"\"\",offpeak,-2.5,-2500,42,\"line\nbreak\",,1700000000123"
        );
        assert_eq!(CSV_HEADER.split(',').count(), 10);
    }

    #[test]
    fn json_lines_round_trip() {
        let v: serde_json::Value = serde_json::from_str(&json_line(&entry())).unwrap();
        assert_eq!(v["account"], "acme, \"intl\"");
        assert_eq!(v["amount"], "-2.5");
        assert_eq!(v["amount_milli"], -2500);
        assert_eq!(v["reservation_id"], 42);
        assert!(v["tariff_version"].is_null());
        assert!(json_line(&entry()).starts_with("{\"seq\":42,\"kind\":\"reserve\""));
    }
}
