//! Fuzzes the `multipart/form-data` parser: any body and boundary, never a
//! panic; every field lies inside the body and the field count respects the
//! limit.
//!
//! Input layout: boundary `\n` body.
//!
//! Run: `cargo +nightly fuzz run multipart`
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::api::multipart::parse;

fuzz_target!(|data: &[u8]| {
    let (boundary, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&data[..0], data),
    };
    let Ok(boundary) = std::str::from_utf8(boundary) else {
        return;
    };
    if boundary.is_empty() || boundary.len() > 70 {
        return;
    }
    if let Ok(fields) = parse(body, boundary, 16) {
        assert!(fields.len() <= 16);
        let range = body.as_ptr_range();
        for f in &fields {
            let r = f.value.as_ptr_range();
            assert!(r.start >= range.start && r.end <= range.end);
        }
    }
});
