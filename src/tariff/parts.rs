//! Message part counting (SPEC 4.1): how many SMS parts a text costs.
//!
//! Owns the GSM 03.38 alphabet tables and the split rules for GSM-7, UCS-2
//! (UTF-16), 8-bit binary and flat-priced message types. Everything here is a
//! pure function of its arguments and runs on every recipient of every send,
//! so it must never allocate (except for the [`MessageType::Other`] name),
//! never panic on any input, and never look at prices: that is `Tariff`'s job.
//!
//! Split rules: a message that fits one part uses the single-part capacity
//! (160 septets, 70 UTF-16 units, 140 octets). A longer one is cut into parts
//! of the split capacity (153 septets, `ucs2_split_units` UTF-16 units, 134
//! octets) by greedy filling, where an indivisible unit never straddles two
//! parts: a GSM-7 escape pair (extension-table character, 2 septets) or a
//! UTF-16 surrogate pair (2 units) that does not fit the room left in the
//! current part starts the next one. Empty text is one part.

use thiserror::Error;

/// GSM-7 capacity of a single-part message, in septets.
pub const GSM7_SINGLE_SEPTETS: u32 = 160;
/// GSM-7 capacity of each part of a concatenated message (the UDH takes 7).
pub const GSM7_SPLIT_SEPTETS: u32 = 153;
/// UCS-2 capacity of a single-part message, in UTF-16 code units.
pub const UCS2_SINGLE_UNITS: u32 = 70;
/// Default UCS-2 capacity per part when split (3GPP: 67; Ozeki's appendix
/// says 63, hence configurable).
pub const UCS2_SPLIT_UNITS_DEFAULT: u32 = 67;
/// 8-bit capacity of a single-part message, in octets.
pub const BINARY_SINGLE_OCTETS: u32 = 140;
/// 8-bit capacity of each part of a concatenated message.
pub const BINARY_SPLIT_OCTETS: u32 = 134;

/// The Ozeki `messagetype` of a send, reduced to what pricing needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// Empty, `SMS:TEXT`, `SMS:TEXT:CLASSn` and every other `SMS:TEXT…`
    /// variant that is not GSM7BIT/UCS2: GSM-7 when possible, else UCS-2.
    Text,
    /// `SMS:TEXT:GSM7BIT…`: GSM-7 only; other characters are an error.
    TextGsm7,
    /// `SMS:TEXT:UCS2…`: always UCS-2.
    TextUcs2,
    /// `SMS:BINARY`: the text is hex-encoded octets.
    Binary,
    /// Anything else (`SMS:WAPPUSH`, `SMS:BINARY:XML`, …), upper-cased:
    /// priced as the tariff's flat number of parts.
    Other(String),
}

impl MessageType {
    /// Classifies an Ozeki `messagetype` value, ignoring ASCII case and
    /// surrounding whitespace. Allocates only for [`MessageType::Other`].
    pub fn parse(s: &str) -> MessageType {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("SMS:TEXT") {
            return MessageType::Text;
        }
        if starts_with_ignore_case(s, "SMS:TEXT:GSM7BIT") {
            return MessageType::TextGsm7;
        }
        if starts_with_ignore_case(s, "SMS:TEXT:UCS2") {
            return MessageType::TextUcs2;
        }
        // Every other text variant (`:CLASSn`, flags tollgate does not
        // know, even a misspelling) is counted by its content: a flat part
        // would let a long text through for the price of one.
        if starts_with_ignore_case(s, "SMS:TEXT") {
            return MessageType::Text;
        }
        if s.eq_ignore_ascii_case("SMS:BINARY") {
            return MessageType::Binary;
        }
        MessageType::Other(s.to_ascii_uppercase())
    }
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// How the parts of a message were counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Gsm7,
    Ucs2,
    Binary,
    /// A flat number of parts from the tariff, content not inspected.
    Flat,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gsm7 => "gsm7",
            Encoding::Ucs2 => "ucs2",
            Encoding::Binary => "binary",
            Encoding::Flat => "flat",
        }
    }
}

/// The tariff-configurable knobs of part counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartRules {
    /// UTF-16 units per part of a split UCS-2 message: 67 by 3GPP, 63 in
    /// Ozeki's appendix. Values below 2 are treated as 2 (a surrogate pair
    /// must fit a part).
    pub ucs2_split_units: u32,
}

impl Default for PartRules {
    fn default() -> Self {
        PartRules {
            ucs2_split_units: UCS2_SPLIT_UNITS_DEFAULT,
        }
    }
}

/// The result of counting: what a message costs before prices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartCount {
    pub encoding: Encoding,
    /// Always at least 1.
    pub parts: u32,
    /// Content size in the encoding's unit: septets (escape pairs count 2),
    /// UTF-16 code units, or octets; 0 for [`Encoding::Flat`]. Saturates at
    /// `u32::MAX`.
    pub units: u32,
}

/// Why a message cannot be priced. Every variant is the client's fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CalcError {
    #[error("character {character:?} (U+{:04X}) is not in the GSM 03.38 alphabet", *character as u32)]
    NotGsm7 { character: char },
    #[error("binary message data is not an even number of hex digits")]
    InvalidHex,
    #[error("message needs {parts} parts, more than the maximum of {max}")]
    TooManyParts { parts: u32, max: u32 },
    #[error("recipient {0:?} is not a valid phone number (1 to 15 digits after normalisation)")]
    InvalidNumber(String),
    #[error("message price overflows")]
    PriceOverflow,
}

/// Counts the parts of `text` sent as `kind`. `flat_parts` is the tariff's
/// part count for [`MessageType::Other`] (raised to 1 if 0).
pub fn parts_for(
    text: &str,
    kind: &MessageType,
    rules: &PartRules,
    flat_parts: u32,
) -> Result<PartCount, CalcError> {
    match kind {
        MessageType::Text => Ok(match gsm7_count(text) {
            Ok(count) => count,
            Err(_) => ucs2_count(text, rules),
        }),
        MessageType::TextGsm7 => {
            gsm7_count(text).map_err(|character| CalcError::NotGsm7 { character })
        }
        MessageType::TextUcs2 => Ok(ucs2_count(text, rules)),
        MessageType::Binary => binary_count(text),
        MessageType::Other(_) => Ok(PartCount {
            encoding: Encoding::Flat,
            parts: flat_parts.max(1),
            units: 0,
        }),
    }
}

/// Septets per character for U+0000..=U+00FF: 0 = not in GSM 03.38, 1 =
/// default alphabet, 2 = extension table (escape + character).
const LATIN1_SEPTETS: [u8; 256] = build_latin1_table();

const fn build_latin1_table() -> [u8; 256] {
    let mut t = [0u8; 256];
    // Printable ASCII is in the default alphabet except the backtick and the
    // extension-table characters below.
    let mut c = 0x20;
    while c < 0x7F {
        t[c] = 1;
        c += 1;
    }
    t[b'`' as usize] = 0;
    t[b'\n' as usize] = 1;
    t[b'\r' as usize] = 1;
    // Extension table: form feed ^ { } \ [ ~ ] | (and € outside Latin-1).
    let ext = [0x0C, b'^', b'{', b'}', b'\\', b'[', b'~', b']', b'|'];
    let mut i = 0;
    while i < ext.len() {
        t[ext[i] as usize] = 2;
        i += 1;
    }
    // Latin-1 letters and signs of the default alphabet:
    // £ ¥ è é ù ì ò Ç Ø ø Å å Æ æ ß É ¤ ¡ Ä Ö Ñ Ü § ¿ ä ö ñ ü à
    let latin = [
        0xA3, 0xA5, 0xE8, 0xE9, 0xF9, 0xEC, 0xF2, 0xC7, 0xD8, 0xF8, 0xC5, 0xE5, 0xC6, 0xE6, 0xDF,
        0xC9, 0xA4, 0xA1, 0xC4, 0xD6, 0xD1, 0xDC, 0xA7, 0xBF, 0xE4, 0xF6, 0xF1, 0xFC, 0xE0,
    ];
    let mut i = 0;
    while i < latin.len() {
        t[latin[i]] = 1;
        i += 1;
    }
    t
}

/// Septets `c` costs in GSM-7, or 0 if it is not in GSM 03.38.
#[inline]
pub fn gsm7_septets(c: char) -> u32 {
    let code = c as u32;
    if code < 256 {
        return LATIN1_SEPTETS[code as usize] as u32;
    }
    match c {
        // Greek capitals of the default alphabet: Δ Φ Γ Λ Ω Π Ψ Σ Θ Ξ
        '\u{0394}' | '\u{03A6}' | '\u{0393}' | '\u{039B}' | '\u{03A9}' | '\u{03A0}'
        | '\u{03A8}' | '\u{03A3}' | '\u{0398}' | '\u{039E}' => 1,
        '€' => 2,
        _ => 0,
    }
}

/// Parts of a message of `total` units: one if it fits `single`, else
/// `split`-unit parts. `greedy` recounts with indivisible pairs and is only
/// called when the message has some (`has_pairs`) and needs splitting.
#[inline]
fn parts_of(
    total: u64,
    single: u32,
    split: u32,
    has_pairs: bool,
    greedy: impl FnOnce() -> u64,
) -> u64 {
    if total <= u64::from(single) {
        1
    } else if !has_pairs {
        total.div_ceil(u64::from(split))
    } else {
        greedy()
    }
}

/// Greedy filling of `split`-unit parts (`split` >= 2) with items of 0, 1 or
/// 2 units, where a 2-unit item that does not fit the room left opens the
/// next part. Branch-free, so mixed-width text does not mispredict; u64
/// counters, so no input can overflow them.
#[derive(Debug, Clone, Copy)]
struct Greedy {
    split: u64,
    parts: u64,
    used: u64,
}

impl Greedy {
    #[inline]
    fn new(split: u32) -> Self {
        debug_assert!(split >= 2);
        Greedy {
            split: u64::from(split),
            parts: 1,
            used: 0,
        }
    }

    #[inline]
    fn push(&mut self, cost: u64) {
        // An item never exceeds a whole part (cost <= 2 <= split), so
        // overflowing the room left always means "start the next part".
        let next = u64::from(self.used + cost > self.split);
        self.parts += next;
        self.used = self.used * (1 - next) + cost;
    }

    fn count(split: u32, costs: impl Iterator<Item = u64>) -> u64 {
        let mut g = Greedy::new(split);
        costs.for_each(|cost| g.push(cost));
        g.parts
    }
}

#[inline]
fn saturate(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// GSM-7 count, or the first character outside GSM 03.38.
fn gsm7_count(text: &str) -> Result<PartCount, char> {
    // An extension character is the only 2-septet item, so total septets >
    // characters means escape pairs are present.
    let (total, parts) = if text.is_ascii() {
        // Hot path: a vectorisable scan, and a greedy walk only for long
        // texts with escapes.
        let bytes = text.as_bytes();
        let (escapes, outside) = scan_ascii(bytes);
        if outside > 0 {
            let bad = bytes.iter().find(|&&b| LATIN1_SEPTETS[b as usize] == 0);
            return Err(bad.map_or('\0', |&b| char::from(b)));
        }
        let total = bytes.len() as u64 + escapes;
        let has_pairs = escapes > 0;
        let parts = parts_of(
            total,
            GSM7_SINGLE_SEPTETS,
            GSM7_SPLIT_SEPTETS,
            has_pairs,
            || {
                let costs = bytes.iter().map(|&b| u64::from(LATIN1_SEPTETS[b as usize]));
                Greedy::count(GSM7_SPLIT_SEPTETS, costs)
            },
        );
        (total, parts)
    } else {
        // Decode once, filling greedily on the way.
        let mut total = 0u64;
        let mut greedy = Greedy::new(GSM7_SPLIT_SEPTETS);
        for c in text.chars() {
            let cost = u64::from(gsm7_septets(c));
            if cost == 0 {
                return Err(c);
            }
            total += cost;
            greedy.push(cost);
        }
        let parts = if total <= u64::from(GSM7_SINGLE_SEPTETS) {
            1
        } else {
            greedy.parts
        };
        (total, parts)
    };
    Ok(PartCount {
        encoding: Encoding::Gsm7,
        parts: saturate(parts),
        units: saturate(total),
    })
}

/// Counts, in ASCII bytes, the extension-table characters and the
/// characters outside GSM 03.38, with range comparisons only (no table
/// lookups) so the compiler vectorises the loop. Must agree with
/// `LATIN1_SEPTETS` on 0..128 (tested).
#[inline]
fn scan_ascii(bytes: &[u8]) -> (u64, u64) {
    let (mut escapes, mut outside) = (0u64, 0u64);
    // u8 lane counters cannot overflow within 255 bytes.
    for chunk in bytes.chunks(255) {
        let (mut e, mut o) = (0u8, 0u8);
        for &b in chunk {
            let ext = (b.wrapping_sub(b'[') < 4) | (b.wrapping_sub(b'{') < 4) | (b == 0x0C);
            let control = (b < 0x20) & (b != b'\n') & (b != b'\r') & (b != 0x0C);
            e += u8::from(ext);
            o += u8::from(control | (b == b'`') | (b == 0x7F));
        }
        escapes += u64::from(e);
        outside += u64::from(o);
    }
    (escapes, outside)
}

/// True for the first byte of a UTF-8 sequence (not a continuation byte).
#[inline]
fn is_char_start(b: u8) -> bool {
    (b as i8) >= -0x40
}

fn ucs2_count(text: &str, rules: &PartRules) -> PartCount {
    let split = rules.ucs2_split_units.max(2);
    // UTF-16 units straight from the UTF-8 bytes, no decoding: one per
    // character plus one per 4-byte sequence (lead byte 0xF0..), which is
    // exactly a surrogate pair.
    let bytes = text.as_bytes();
    let mut chars = 0u64;
    let mut astral = 0u64;
    for &b in bytes {
        chars += u64::from(is_char_start(b));
        astral += u64::from(b >= 0xF0);
    }
    let units = chars + astral;
    let parts = parts_of(units, UCS2_SINGLE_UNITS, split, astral > 0, || {
        // Continuation bytes cost 0 (a no-op push).
        let costs = bytes
            .iter()
            .map(|&b| u64::from(is_char_start(b)) + u64::from(b >= 0xF0));
        Greedy::count(split, costs)
    });
    PartCount {
        encoding: Encoding::Ucs2,
        parts: saturate(parts),
        units: saturate(units),
    }
}

/// Binary data is strict hex: an even number of `0-9a-fA-F`, nothing else.
fn binary_count(hex: &str) -> Result<PartCount, CalcError> {
    let bytes = hex.as_bytes();
    if !bytes.len().is_multiple_of(2) || !bytes.iter().all(u8::is_ascii_hexdigit) {
        return Err(CalcError::InvalidHex);
    }
    let octets = (bytes.len() / 2) as u64;
    let parts = if octets <= BINARY_SINGLE_OCTETS as u64 {
        1
    } else {
        octets.div_ceil(BINARY_SPLIT_OCTETS as u64)
    };
    Ok(PartCount {
        encoding: Encoding::Binary,
        parts: saturate(parts),
        units: saturate(octets),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn count(text: &str) -> PartCount {
        parts_for(text, &MessageType::Text, &PartRules::default(), 1).unwrap()
    }

    fn gsm(parts: u32, units: u32) -> PartCount {
        PartCount {
            encoding: Encoding::Gsm7,
            parts,
            units,
        }
    }

    fn ucs2(parts: u32, units: u32) -> PartCount {
        PartCount {
            encoding: Encoding::Ucs2,
            parts,
            units,
        }
    }

    fn a(n: usize) -> String {
        "a".repeat(n)
    }

    #[test]
    fn message_types_parse() {
        assert_eq!(MessageType::parse(""), MessageType::Text);
        assert_eq!(MessageType::parse("  "), MessageType::Text);
        assert_eq!(MessageType::parse("SMS:TEXT"), MessageType::Text);
        assert_eq!(MessageType::parse("sms:text"), MessageType::Text);
        assert_eq!(MessageType::parse("SMS:TEXT:CLASS0"), MessageType::Text);
        assert_eq!(MessageType::parse("sms:text:class1"), MessageType::Text);
        assert_eq!(
            MessageType::parse("SMS:TEXT:GSM7BIT"),
            MessageType::TextGsm7
        );
        assert_eq!(
            MessageType::parse("SMS:TEXT:GSM7BIT:CLASS0"),
            MessageType::TextGsm7
        );
        assert_eq!(MessageType::parse("Sms:Text:Ucs2"), MessageType::TextUcs2);
        assert_eq!(
            MessageType::parse("SMS:TEXT:UCS2:CLASS0"),
            MessageType::TextUcs2
        );
        assert_eq!(MessageType::parse("sms:binary"), MessageType::Binary);
        assert_eq!(
            MessageType::parse("SMS:BINARY:XML"),
            MessageType::Other("SMS:BINARY:XML".into())
        );
        assert_eq!(
            MessageType::parse("sms:wappush"),
            MessageType::Other("SMS:WAPPUSH".into())
        );
        // Unknown text variants are text, counted by content, never flat.
        for kind in [
            "SMS:TEXT:CLASS",
            "SMS:TEXTX",
            "sms:text:flash",
            "SMS:TEXT:CLASS0:FLASH",
            "SMS:TEXT:UTF8",
            " SMS:TEXT:GSM7 ",
        ] {
            assert_eq!(MessageType::parse(kind), MessageType::Text, "{kind}");
        }
    }

    #[test]
    fn encoding_names() {
        assert_eq!(Encoding::Gsm7.as_str(), "gsm7");
        assert_eq!(Encoding::Ucs2.as_str(), "ucs2");
        assert_eq!(Encoding::Binary.as_str(), "binary");
        assert_eq!(Encoding::Flat.as_str(), "flat");
    }

    #[test]
    fn gsm_alphabet_has_128_plus_10_characters() {
        let basic = (0..=0x10FFFFu32)
            .filter_map(char::from_u32)
            .filter(|&c| gsm7_septets(c) == 1)
            .count();
        let ext: Vec<char> = (0..=0x10FFFFu32)
            .filter_map(char::from_u32)
            .filter(|&c| gsm7_septets(c) == 2)
            .collect();
        // 128 code points minus the escape itself.
        assert_eq!(basic, 127);
        assert_eq!(
            ext,
            vec!['\u{0C}', '[', '\\', ']', '^', '{', '|', '}', '~', '€']
        );
        for c in "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./:;<=>?¡ÄÖÑÜ§¿äöñüà".chars()
        {
            assert_eq!(gsm7_septets(c), 1, "{c:?}");
        }
        for c in "`çÀ\u{1B}\t\u{0}ő".chars() {
            assert_eq!(gsm7_septets(c), 0, "{c:?}");
        }
    }

    #[test]
    fn ascii_scan_agrees_with_the_table() {
        for b in 0u8..128 {
            let (escapes, outside) = scan_ascii(&[b]);
            let expected = match LATIN1_SEPTETS[b as usize] {
                0 => (0, 1),
                1 => (0, 0),
                _ => (1, 0),
            };
            assert_eq!((escapes, outside), expected, "byte {b:#04x}");
        }
        let long = "a{`".repeat(300);
        assert_eq!(scan_ascii(long.as_bytes()), (300, 300));
    }

    #[test]
    fn empty_text_is_one_part() {
        assert_eq!(count(""), gsm(1, 0));
        let ucs = parts_for("", &MessageType::TextUcs2, &PartRules::default(), 1).unwrap();
        assert_eq!(ucs, ucs2(1, 0));
        let bin = parts_for("", &MessageType::Binary, &PartRules::default(), 1).unwrap();
        assert_eq!(bin.parts, 1);
        assert_eq!(bin.units, 0);
    }

    #[test]
    fn gsm7_boundaries() {
        assert_eq!(count(&a(1)), gsm(1, 1));
        assert_eq!(count(&a(160)), gsm(1, 160));
        assert_eq!(count(&a(161)), gsm(2, 161));
        assert_eq!(count(&a(306)), gsm(2, 306));
        assert_eq!(count(&a(307)), gsm(3, 307));
        for k in 2..=12u32 {
            let n = 153 * k as usize;
            assert_eq!(count(&a(n)), gsm(k, n as u32), "153 x {k}");
            assert_eq!(count(&a(n + 1)), gsm(k + 1, n as u32 + 1), "153 x {k} + 1");
        }
    }

    #[test]
    fn gsm7_escape_costs_two_septets() {
        // 158 + € (2) = 160: still one part.
        assert_eq!(count(&format!("{}€", a(158))), gsm(1, 160));
        // 159 + € = 161: split.
        assert_eq!(count(&format!("{}€", a(159))), gsm(2, 161));
        assert_eq!(count(&"{".repeat(80)), gsm(1, 160));
        assert_eq!(count(&"{".repeat(81)), gsm(2, 162));
        assert_eq!(count("\u{0C}"), gsm(1, 2));
    }

    #[test]
    fn gsm7_escape_pair_never_straddles_a_part() {
        // 152 + € + 152 = 306 septets = exactly 2 × 153, but the € would
        // straddle septets 153/154, so it opens part 2: 152 | 2+151 | 1.
        assert_eq!(count(&format!("{}€{}", a(152), a(152))), gsm(3, 306));
        // 151 + € fills part 1 exactly: no push-over.
        assert_eq!(count(&format!("{}€{}", a(151), a(153))), gsm(2, 306));
        // ~ would straddle parts 2 and 3: it opens part 3 (152 | 2+151 | 1
        // at the end), 4 parts where 459 / 153 would say 3.
        assert_eq!(count(&format!("{}~{}", a(305), a(151))), gsm(3, 458));
        assert_eq!(count(&format!("{}~{}", a(305), a(152))), gsm(4, 459));
        // ~ exactly at the start of part 3.
        assert_eq!(count(&format!("{}~{}", a(306), a(151))), gsm(3, 459));
    }

    #[test]
    fn ucs2_boundaries() {
        let zh = |n: usize| "ж".repeat(n);
        assert_eq!(count(&zh(70)), ucs2(1, 70));
        assert_eq!(count(&zh(71)), ucs2(2, 71));
        assert_eq!(count(&zh(134)), ucs2(2, 134));
        assert_eq!(count(&zh(135)), ucs2(3, 135));
        for k in 2..=10u32 {
            let n = 67 * k as usize;
            assert_eq!(count(&zh(n)), ucs2(k, n as u32));
            assert_eq!(count(&zh(n + 1)), ucs2(k + 1, n as u32 + 1));
        }
        // One non-GSM character turns the whole message UCS-2.
        assert_eq!(count(&format!("{}ő", a(69))), ucs2(1, 70));
        assert_eq!(count(&format!("{}ő", a(70))), ucs2(2, 71));
        // A backtick is not GSM either.
        assert_eq!(count("`"), ucs2(1, 1));
    }

    #[test]
    fn ucs2_split_is_configurable() {
        let rules = PartRules {
            ucs2_split_units: 63,
        };
        let zh = |n: usize| "ж".repeat(n);
        let c = |t: &str| parts_for(t, &MessageType::Text, &rules, 1).unwrap();
        assert_eq!(c(&zh(70)), ucs2(1, 70));
        assert_eq!(c(&zh(126)), ucs2(2, 126));
        assert_eq!(c(&zh(127)), ucs2(3, 127));
        // A nonsense split of 0 or 1 still fits surrogate pairs and ends.
        let tiny = PartRules {
            ucs2_split_units: 0,
        };
        let t = parts_for(&"😀".repeat(40), &MessageType::Text, &tiny, 1).unwrap();
        assert_eq!(t, ucs2(40, 80));
    }

    #[test]
    fn surrogate_pair_never_straddles_a_part() {
        // 35 emoji = 70 units: one part.
        assert_eq!(count(&"😀".repeat(35)), ucs2(1, 70));
        assert_eq!(count(&"😀".repeat(36)), ucs2(2, 72));
        // 66 units + emoji + 66 units = 134 = 2 × 67, but the emoji would
        // straddle units 67/68: 66 | 2+65 | 1.
        let t = format!("{}😀{}", "ж".repeat(66), "ж".repeat(66));
        assert_eq!(count(&t), ucs2(3, 134));
        // 65 + emoji fills part 1 exactly.
        let t = format!("{}😀{}", "ж".repeat(65), "ж".repeat(67));
        assert_eq!(count(&t), ucs2(2, 134));
    }

    #[test]
    fn forced_encodings() {
        let r = PartRules::default();
        let t = parts_for("hello", &MessageType::TextUcs2, &r, 1).unwrap();
        assert_eq!(t, ucs2(1, 5));
        let t = parts_for("hello€", &MessageType::TextGsm7, &r, 1).unwrap();
        assert_eq!(t, gsm(1, 7));
        assert_eq!(
            parts_for("hellő", &MessageType::TextGsm7, &r, 1),
            Err(CalcError::NotGsm7 { character: 'ő' })
        );
        assert_eq!(
            parts_for("a`b", &MessageType::TextGsm7, &r, 1),
            Err(CalcError::NotGsm7 { character: '`' })
        );
    }

    #[test]
    fn binary_boundaries() {
        let r = PartRules::default();
        let bin = |octets: usize| parts_for(&"0a".repeat(octets), &MessageType::Binary, &r, 1);
        let b = |parts, units| PartCount {
            encoding: Encoding::Binary,
            parts,
            units,
        };
        assert_eq!(bin(1), Ok(b(1, 1)));
        assert_eq!(bin(140), Ok(b(1, 140)));
        assert_eq!(bin(141), Ok(b(2, 141)));
        for k in 2..=8u32 {
            let n = 134 * k as usize;
            assert_eq!(bin(n), Ok(b(k, n as u32)));
            assert_eq!(bin(n + 1), Ok(b(k + 1, n as u32 + 1)));
        }
        assert_eq!(
            parts_for("DEADbeef", &MessageType::Binary, &r, 1),
            Ok(b(1, 4))
        );
        for bad in ["abc", "zz", "0x00", "de ad", "dé"] {
            assert_eq!(
                parts_for(bad, &MessageType::Binary, &r, 1),
                Err(CalcError::InvalidHex),
                "{bad}"
            );
        }
    }

    #[test]
    fn other_types_are_flat() {
        let r = PartRules::default();
        let kind = MessageType::parse("SMS:WAPPUSH");
        let t = parts_for(&a(1000), &kind, &r, 3).unwrap();
        assert_eq!(
            t,
            PartCount {
                encoding: Encoding::Flat,
                parts: 3,
                units: 0
            }
        );
        assert_eq!(parts_for("", &kind, &r, 0).unwrap().parts, 1);
    }

    /// Reference GSM-7 counter, written as plainly as possible.
    fn reference_gsm7_parts(text: &str) -> Option<u32> {
        let mut costs = Vec::new();
        for c in text.chars() {
            if "^{}\\[~]|€\u{0C}".contains(c) {
                costs.push(2);
            } else if "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà".contains(c) {
                costs.push(1);
            } else {
                return None;
            }
        }
        let total: u32 = costs.iter().sum();
        if total <= 160 {
            return Some(1);
        }
        let mut parts = vec![0u32];
        for cost in costs {
            if parts.last().unwrap() + cost > 153 {
                parts.push(0);
            }
            *parts.last_mut().unwrap() += cost;
        }
        Some(parts.len() as u32)
    }

    fn gsm_text() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec![
                'a', 'Z', '0', ' ', '@', 'é', 'Δ', '\n', '€', '{', '~', '\u{0C}',
            ]),
            0..700,
        )
        .prop_map(|v| v.into_iter().collect())
    }

    proptest! {
        #[test]
        fn gsm7_matches_reference(text in gsm_text()) {
            let got = count(&text);
            prop_assert_eq!(got.encoding, Encoding::Gsm7);
            prop_assert_eq!(Some(got.parts), reference_gsm7_parts(&text));
        }

        #[test]
        fn any_text_has_parts_and_never_panics(text in any::<String>(), split in 0u32..80) {
            let rules = PartRules { ucs2_split_units: split };
            for kind in [MessageType::Text, MessageType::TextGsm7, MessageType::TextUcs2, MessageType::Binary, MessageType::Other("X".into())] {
                if let Ok(c) = parts_for(&text, &kind, &rules, 0) {
                    prop_assert!(c.parts >= 1);
                    prop_assert!(c.parts <= c.units.max(1));
                }
            }
        }

        #[test]
        fn non_gsm_char_forces_ucs2(prefix in gsm_text(), c in any::<char>(), suffix in gsm_text()) {
            prop_assume!(gsm7_septets(c) == 0);
            let text = format!("{prefix}{c}{suffix}");
            let got = count(&text);
            prop_assert_eq!(got.encoding, Encoding::Ucs2);
            prop_assert_eq!(got.units as usize, text.encode_utf16().count());
            prop_assert!(got.parts >= 1);
        }

        #[test]
        fn ucs2_matches_reference(text in any::<String>(), split in 2u32..=67) {
            let rules = PartRules { ucs2_split_units: split };
            let got = parts_for(&text, &MessageType::TextUcs2, &rules, 1).unwrap();
            let units: Vec<u32> = text.chars().map(|c| c.len_utf16() as u32).collect();
            let total: u32 = units.iter().sum();
            let mut parts = vec![0u32];
            for cost in units {
                if *parts.last().unwrap() + cost > split {
                    parts.push(0);
                }
                *parts.last_mut().unwrap() += cost;
            }
            let expected = if total <= 70 { 1 } else { parts.len() as u32 };
            prop_assert_eq!(got.units, total);
            prop_assert_eq!(got.parts, expected);
        }

        #[test]
        fn ucs2_parts_hold_at_most_split_units(text in any::<String>(), split in 2u32..=67) {
            let rules = PartRules { ucs2_split_units: split };
            let got = parts_for(&text, &MessageType::TextUcs2, &rules, 1).unwrap();
            let units = got.units as u64;
            if units <= 70 {
                prop_assert_eq!(got.parts, 1);
            } else {
                // Greedy filling wastes at most one unit per part.
                prop_assert!(got.parts as u64 >= units.div_ceil(split as u64));
                prop_assert!(got.parts as u64 <= units.div_ceil(split as u64 - 1));
            }
        }
    }
}
