//! Percent-decoding, the two ways the front doors need it: **strict** for
//! the parameters tollgate acts on (a `%` not followed by two hex digits is
//! an error, so tollgate never prices a request the gateway might read
//! differently) and **lenient** for the checks that must be at least as
//! inclusive as the gateway (`api::owned`: a malformed escape is kept, as
//! lenient servers keep it). Both decode into a caller's buffer, which is
//! cleared first, so a loop over many values allocates once.

/// A `%` not followed by two hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadPercent;

/// Decodes `+` (a space) and `%XX` into `out`; [`BadPercent`] on a
/// malformed escape.
pub fn decode_strict(raw: &[u8], out: &mut Vec<u8>) -> Result<(), BadPercent> {
    out.clear();
    out.reserve(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => match escaped(raw, i) {
                Some(b) => {
                    out.push(b);
                    i += 2;
                }
                None => return Err(BadPercent),
            },
            b => out.push(b),
        }
        i += 1;
    }
    Ok(())
}

/// Decodes `%XX` (and `+` as a space when `plus_is_space`) into `out`; a
/// malformed escape is kept as it is.
pub fn decode_lenient(raw: &[u8], plus_is_space: bool, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'%' => {
                if let Some(b) = escaped(raw, i) {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
}

/// The byte of the escape `%XX` at `raw[at]`, if it is one.
fn escaped(raw: &[u8], at: usize) -> Option<u8> {
    let hi = hex_digit(*raw.get(at + 1)?)?;
    let lo = hex_digit(*raw.get(at + 2)?)?;
    Some(hi << 4 | lo)
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strict_and_lenient_agree_on_well_formed_input() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        decode_strict(b"a+b%20c%2B%c3%a9", &mut a).unwrap();
        decode_lenient(b"a+b%20c%2B%c3%a9", true, &mut b);
        assert_eq!(a, "a b c+é".as_bytes());
        assert_eq!(a, b);
        assert_eq!(decode_strict(b"100%", &mut a), Err(BadPercent));
        assert_eq!(decode_strict(b"%zz", &mut a), Err(BadPercent));
        decode_lenient(b"100%&%zz%4", false, &mut b);
        assert_eq!(b, b"100%&%zz%4");
        decode_lenient(b"a+b", false, &mut b);
        assert_eq!(b, b"a+b");
    }

    proptest! {
        #[test]
        fn lenient_decodes_whatever_strict_accepts(raw in prop::collection::vec(any::<u8>(), 0..64)) {
            let (mut strict, mut lenient) = (Vec::new(), Vec::new());
            decode_lenient(&raw, true, &mut lenient);
            if decode_strict(&raw, &mut strict).is_ok() {
                prop_assert_eq!(strict, lenient);
            }
        }
    }
}
