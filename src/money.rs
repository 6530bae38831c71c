//! Money as fixed-point integers: 1 credit = 1000 milli-credits.
//!
//! Owns the only conversions between decimal text and milli-credits. Nothing
//! in a money path may use floating point; these functions never round — more
//! precision than a milli-credit is an error, not an approximation.

use thiserror::Error;

/// Milli-credits per credit.
pub const MILLI_PER_CREDIT: i64 = 1000;

/// Longest decimal amount accepted, so a hostile client cannot make us parse
/// megabytes of digits.
pub const AMOUNT_TEXT_MAX_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AmountError {
    #[error("amount is empty")]
    Empty,
    #[error("amount is longer than {AMOUNT_TEXT_MAX_LEN} characters")]
    TooLong,
    #[error("amount {0:?} is not a decimal number")]
    NotANumber(String),
    #[error("amount {0:?} has more than 3 decimals")]
    TooPrecise(String),
    #[error("amount {0:?} is out of range")]
    OutOfRange(String),
    #[error("amount {0:?} must be a whole number here")]
    NotAnInteger(String),
}

/// Parses decimal credit text (`2.5`, `-10`, `0.125`, `+3`) into milli-credits.
pub fn parse_credits(text: &str) -> Result<i64, AmountError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(AmountError::Empty);
    }
    if t.len() > AMOUNT_TEXT_MAX_LEN {
        return Err(AmountError::TooLong);
    }
    let (negative, digits) = match t.as_bytes()[0] {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let (whole, frac) = match digits.split_once('.') {
        Some((w, f)) => (w, f),
        None => (digits, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty())
        || !all_digits(whole)
        || !all_digits(frac)
        || (digits.contains('.') && frac.is_empty() && whole.is_empty())
    {
        return Err(AmountError::NotANumber(t.to_string()));
    }
    if frac.len() > 3 {
        return Err(AmountError::TooPrecise(t.to_string()));
    }
    let range = || AmountError::OutOfRange(t.to_string());
    let whole_v: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| range())?
    };
    let mut frac_v: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| range())?
    };
    for _ in frac.len()..3 {
        frac_v *= 10;
    }
    let magnitude = whole_v
        .checked_mul(MILLI_PER_CREDIT)
        .and_then(|v| v.checked_add(frac_v))
        .ok_or_else(range)?;
    Ok(if negative { -magnitude } else { magnitude })
}

/// Parses an amount that must be a whole number of credits (Ozeki's
/// `addcredits`/`setcredits`).
pub fn parse_whole_credits(text: &str) -> Result<i64, AmountError> {
    let milli = parse_credits(text)?;
    if milli % MILLI_PER_CREDIT != 0 {
        return Err(AmountError::NotAnInteger(text.trim().to_string()));
    }
    Ok(milli)
}

/// Renders milli-credits as decimal credits with up to 3 decimals and no
/// trailing zeros: 744000 → `744`, 2500 → `2.5`, -125 → `-0.125`.
pub fn format_credits(milli: i64) -> String {
    let sign = if milli < 0 { "-" } else { "" };
    let abs = milli.unsigned_abs();
    let whole = abs / MILLI_PER_CREDIT as u64;
    let frac = abs % MILLI_PER_CREDIT as u64;
    if frac == 0 {
        return format!("{sign}{whole}");
    }
    let mut f = format!("{frac:03}");
    while f.ends_with('0') {
        f.pop();
    }
    format!("{sign}{whole}.{f}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_spec_examples() {
        assert_eq!(parse_credits("2.5"), Ok(2500));
        assert_eq!(parse_credits("-10"), Ok(-10_000));
        assert_eq!(parse_credits("0.125"), Ok(125));
        assert_eq!(parse_credits(".5"), Ok(500));
        assert_eq!(parse_credits("7."), Ok(7000));
        assert_eq!(parse_credits("+3"), Ok(3000));
        assert!(matches!(
            parse_credits("0.1234"),
            Err(AmountError::TooPrecise(_))
        ));
        assert!(matches!(
            parse_credits("1e3"),
            Err(AmountError::NotANumber(_))
        ));
        assert!(matches!(
            parse_credits("."),
            Err(AmountError::NotANumber(_))
        ));
        assert!(matches!(
            parse_credits("-"),
            Err(AmountError::NotANumber(_))
        ));
        assert!(matches!(parse_credits(""), Err(AmountError::Empty)));
        assert!(matches!(
            parse_credits("99999999999999999999"),
            Err(AmountError::OutOfRange(_))
        ));
        assert!(matches!(
            parse_whole_credits("1.5"),
            Err(AmountError::NotAnInteger(_))
        ));
        assert_eq!(parse_whole_credits("-4"), Ok(-4000));
    }

    #[test]
    fn formats_without_trailing_zeros() {
        assert_eq!(format_credits(744_000), "744");
        assert_eq!(format_credits(2500), "2.5");
        assert_eq!(format_credits(-125), "-0.125");
        assert_eq!(format_credits(0), "0");
        assert_eq!(format_credits(1010), "1.01");
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(m in -1_000_000_000_000i64..1_000_000_000_000i64) {
            prop_assert_eq!(parse_credits(&format_credits(m)), Ok(m));
        }

        #[test]
        fn parse_never_panics(s in ".{0,40}") {
            let _ = parse_credits(&s);
        }
    }
}
