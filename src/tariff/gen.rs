//! Deterministic synthetic prefix tables for tests, benchmarks and load
//! testing (`examples/gen_prefixes.rs`). Never used to price real traffic.
//!
//! The shape imitates a carrier rate deck: prefixes hang under real-looking
//! country codes, are 3 to 9 digits long, overlap (a short prefix and longer
//! ones under it), and carry prices of 0.001 to 50 credits.

use crate::money::format_credits;
use std::collections::HashSet;
use std::fmt::Write;

/// Country codes to grow prefixes from (a representative mix of 1-, 2- and
/// 3-digit codes).
const COUNTRY_CODES: &[&str] = &[
    "1", "7", "20", "27", "30", "31", "32", "33", "34", "36", "39", "40", "41", "43", "44", "45",
    "46", "47", "48", "49", "51", "52", "54", "55", "61", "62", "63", "65", "66", "81", "82", "84",
    "86", "90", "91", "92", "98", "212", "234", "254", "351", "353", "358", "380", "385", "386",
    "420", "421", "852", "880", "966", "971", "972",
];

/// SplitMix64: tiny, fast, and stable across dependency upgrades (so a seed
/// names the same table forever).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` unique `prefix,price` lines after a `prefix,price` header, the same
/// for the same `(n, seed)`.
pub fn generate_prefix_table(n: usize, seed: u64) -> String {
    let mut rng = SplitMix64(seed);
    let mut seen: HashSet<String> = HashSet::with_capacity(n);
    let mut out = String::with_capacity(16 + n * 16);
    out.push_str("prefix,price\n");
    let mut prefix = String::with_capacity(16);
    while seen.len() < n {
        let cc = COUNTRY_CODES[rng.below(COUNTRY_CODES.len() as u64) as usize];
        let len = 3 + rng.below(7) as usize; // 3..=9 digits
        prefix.clear();
        prefix.push_str(cc);
        while prefix.len() < len {
            prefix.push((b'0' + rng.below(10) as u8) as char);
        }
        if seen.contains(prefix.as_str()) {
            continue;
        }
        seen.insert(prefix.clone());
        let price_milli = 1 + rng.below(50_000) as i64;
        let _ = writeln!(out, "{prefix},{}", format_credits(price_milli));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_unique() {
        let a = generate_prefix_table(1000, 7);
        assert_eq!(a, generate_prefix_table(1000, 7));
        assert_ne!(a, generate_prefix_table(1000, 8));
        let lines: Vec<&str> = a.lines().collect();
        assert_eq!(lines[0], "prefix,price");
        assert_eq!(lines.len(), 1001);
        let prefixes: HashSet<&str> = lines[1..]
            .iter()
            .map(|l| l.split_once(',').unwrap().0)
            .collect();
        assert_eq!(prefixes.len(), 1000);
        assert_eq!(generate_prefix_table(0, 1), "prefix,price\n");
    }
}
