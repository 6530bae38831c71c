//! The credit calculator: message parts × per-destination prices (SPEC 4).
//!
//! Owns `conf/tariffs.yaml` (parsing and validation), recipient number
//! normalisation, longest-prefix pricing, off-peak windows and the fast-mode
//! multiplier. Everything is plain synchronous Rust and pure once loaded: a
//! [`Tariff`] is immutable, shared behind the config snapshot (`ArcSwap`) and
//! replaced whole on reload. It never touches balances (that is the ledger)
//! and never uses floating point for money.
//!
//! # `conf/tariffs.yaml`
//!
//! ```yaml
//! default_country_code: "36"   # optional; replaces the national prefix
//! national_prefix: "06"        # optional, default "0": the trunk prefix
//! default_price: 1             # required: credits per part for unmatched numbers
//! prices:                      # optional: E.164 prefix -> credits per part
//!   "36": 1
//!   "3620": 0.8
//!   "44": 2.5
//! prefixes_file: prefixes.csv  # optional, relative to this file's directory
//! classes:                     # optional per-account tariff classes
//!   wholesale: { default_price: 0.5, prices: { "36": 0.4 } }
//! offpeak:                     # optional
//!   timezone: Europe/Budapest  # IANA name
//!   windows:
//!     - { days: [mon, tue, wed, thu, fri], from: "20:00", to: "08:00" }
//!     - { days: [sat, sun], from: "00:00", to: "24:00" }
//! fast_multiplier: 1.5         # optional, default 1.5 (Boxis fast mode)
//! fast_rounding: up_to_credit  # optional: up_to_credit (default) | up_to_milli
//! max_parts: 10                # optional, 1..=255; longer messages are refused
//! receive_price: 0             # optional, default 0: credits per received message
//! message_type_parts:          # optional: flat parts of non-text types, default 1
//!   "SMS:WAPPUSH": 1
//! ucs2_split_units: 67         # optional, 2..=67, default 67 (Ozeki's appendix: 63)
//! ```
//!
//! Rules:
//! - Unknown keys are errors; every error names the file, the key and what
//!   would be valid.
//! - Amounts (`default_price`, prices, `receive_price`, `fast_multiplier`)
//!   are decimal text or YAML numbers with at most 3 decimals, read through
//!   `money::parse_credits`; prices are 0..=1 000 000 credits. A YAML number
//!   is re-rendered from its shortest exact text, so a literal with more than
//!   15 significant digits should be quoted to be checked digit by digit.
//! - Prefixes are 1 to 15 digits; each prefix may be priced once across
//!   `prices` and `prefixes_file` (a second price is an error, not an
//!   override). Prefix keys may be quoted or plain numbers.
//! - `prefixes_file` holds one `prefix,price` (or `prefix;price`) pair a
//!   line; blank lines and `#` comments are skipped, and a first line
//!   `prefix,price` is a header.
//! - A class has optional `default_price`, `prices` and `prefixes_file`. A
//!   number sent by an account of class C is priced by the first of: the
//!   longest prefix in C's table; the longest prefix in the base table; C's
//!   `default_price`; the base `default_price`. So a class lowers (or
//!   raises) only what it lists, and a destination priced in the base table
//!   never falls to a cheap class default. An unknown class name is priced
//!   as no class (base table only); use [`Tariff::has_class`] to validate
//!   account configuration.
//! - Off-peak windows are wall-clock times in `timezone` (so they follow
//!   DST): `from` is inclusive and `to` exclusive, `HH:MM`, `to` may be
//!   `24:00`. `from` later than `to` crosses midnight: the window opens on
//!   each listed day at `from` and closes the next day at `to`. `days` are
//!   `mon`..`sun` (or full names). Inside any window sends draw from the
//!   off-peak bucket first (SPEC 3.2).
//! - `message_type_parts` keys are non-text Ozeki types (case-insensitive). A
//!   type without its own entry inherits from its parent (`SMS:WAPPUSH:SI`
//!   uses `SMS:WAPPUSH`), else 1 part.
//! - Fast mode price = price × `fast_multiplier`, rounded up to a whole
//!   credit (`up_to_credit`) or to a milli-credit (`up_to_milli`).
//!
//! Recipient normalisation: whitespace, `-`, `(`, `)`, `.` and `/` are
//! dropped; a leading `+` or `00` marks an international number; otherwise a
//! leading `national_prefix` (default `0`; Hungary dials `06`) is replaced
//! by `default_country_code`, and any other number starting with `0` is an
//! error (as is a national number without `default_country_code`); numbers
//! starting with 1-9 are taken as international already. The result must be
//! 1 to 15 digits not starting with 0, with at least one digit after the
//! `+`, `00` or national prefix.

mod file;
pub mod gen;
mod offpeak;
pub mod parts;
pub mod prefix;

pub use parts::{parts_for, CalcError, Encoding, MessageType, PartCount, PartRules};
pub use prefix::{PrefixMatch, PrefixTable, PrefixTableBuilder};

use crate::ledger::BucketPreference;
use crate::money::MILLI_PER_CREDIT;
use chrono::{Datelike, Timelike};
use file::{TariffFile, Validator};
use offpeak::OffPeak;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Highest price per part (or per received message) a tariff may set, in
/// milli-credits: anything above is a typo, and the bound keeps
/// `price × parts` far from overflow.
pub const PRICE_MAX_MILLI: i64 = 1_000_000 * MILLI_PER_CREDIT;

/// Highest `max_parts`: a concatenated SMS numbers its parts in one octet.
pub const MAX_PARTS_LIMIT: u32 = 255;

/// A tariff file that cannot be loaded. The previous tariff stays in force.
#[derive(Debug, Error)]
pub enum TariffError {
    #[error("{}: cannot read: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", file.display())]
    Yaml {
        file: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{}: {key}: {problem}", file.display())]
    Invalid {
        file: PathBuf,
        key: String,
        problem: String,
    },
    /// A bad line of a `prefixes_file`.
    #[error("{}:{line}: {problem}", file.display())]
    PrefixLine {
        file: PathBuf,
        line: usize,
        problem: String,
    },
}

/// How a fast-mode price is rounded after the multiplier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastRounding {
    /// Up to a whole credit (Boxis: "rounded up to a whole credit").
    UpToCredit,
    /// Up to a milli-credit (the smallest amount).
    UpToMilli,
}

/// One send to one recipient, as the proxy sees it.
#[derive(Debug, Clone, Copy)]
pub struct QuoteRequest<'a> {
    pub recipient: &'a str,
    pub text: &'a str,
    /// Ozeki `messagetype`, raw (`""` is plain text).
    pub message_type: &'a str,
    /// The account's tariff class, if any.
    pub class: Option<&'a str>,
    /// When the send happens, for off-peak windows.
    pub at_unix_ms: i64,
}

/// What one send to one recipient costs, and which bucket pays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub encoding: Encoding,
    pub parts: u32,
    pub units: u32,
    /// The recipient as priced: international digits, no `+`.
    pub normalised: String,
    /// The prefix that priced it; `None` when a default price applied.
    pub matched_prefix: Option<String>,
    pub price_per_part_milli: i64,
    pub bucket: BucketPreference,
    /// `parts × price_per_part_milli`.
    pub total_milli: i64,
}

/// Where a price per part came from (see the class rule in the module
/// comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriceSource {
    ClassPrefix,
    BasePrefix,
    ClassDefault,
    BaseDefault,
}

/// The price per part of one normalised number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriceMatch<'n> {
    /// The matched prefix, a slice of the number; `None` for defaults.
    pub matched_prefix: Option<&'n str>,
    pub price_per_part_milli: i64,
    pub source: PriceSource,
}

/// A validated, immutable tariff.
#[derive(Debug)]
pub struct Tariff {
    /// blake3 of the YAML and every prefixes file, 16 hex chars; recorded
    /// on ledger entries so every charge can be traced to its price list.
    version: String,
    /// Digits replacing `national_prefix`; `None` = national numbers are
    /// refused.
    default_country_code: Option<String>,
    /// The trunk prefix that marks a national number: `0` in most of
    /// Europe, `06` in Hungary.
    national_prefix: String,
    prices: PrefixTable,
    default_price_milli: i64,
    classes: HashMap<String, TariffClass>,
    offpeak: Option<OffPeak>,
    /// Thousandths: 1500 = ×1.5, so fast prices stay integer arithmetic.
    fast_multiplier_milli: i64,
    fast_rounding: FastRounding,
    max_parts: Option<u32>,
    receive_price_milli: i64,
    /// Upper-cased Ozeki type → flat parts, for [`MessageType::Other`].
    message_type_parts: HashMap<String, u32>,
    part_rules: PartRules,
    /// Every `prefixes_file` read, resolved: the hot-reload watcher must
    /// watch them as well as the YAML.
    prefix_files: Vec<PathBuf>,
}

#[derive(Debug)]
struct TariffClass {
    prices: PrefixTable,
    default_price_milli: Option<i64>,
}

impl Tariff {
    /// Parses and validates tariff YAML. `origin` is the file it came from:
    /// named in errors, and the base for a relative `prefixes_file`.
    pub fn from_yaml(text: &str, origin: &Path) -> Result<Tariff, TariffError> {
        let file: TariffFile = serde_yaml::from_str(text).map_err(|source| TariffError::Yaml {
            file: origin.to_path_buf(),
            source,
        })?;
        let mut v = Validator {
            origin,
            hasher: blake3::Hasher::new(),
            prefix_files: Vec::new(),
        };
        v.hash(text.as_bytes());
        v.build(file)
    }

    /// Reads and validates a tariff file.
    pub fn load(path: &Path) -> Result<Tariff, TariffError> {
        let text = std::fs::read_to_string(path).map_err(|source| TariffError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        Tariff::from_yaml(&text, path)
    }

    /// Content hash of this tariff (YAML and prefixes files), 16 hex chars.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Brings a recipient number to international digits (see the module
    /// comment), or [`CalcError::InvalidNumber`].
    pub fn normalise(&self, number: &str) -> Result<String, CalcError> {
        let invalid = || CalcError::InvalidNumber(number.chars().take(40).collect());
        let mut digits = String::with_capacity(16);
        let mut plus = false;
        for c in number.chars() {
            match c {
                '0'..='9' => {
                    // Room for "00" or a national 0 before 15 digits.
                    if digits.len() > prefix::PREFIX_DIGITS_MAX + 2 {
                        return Err(invalid());
                    }
                    digits.push(c);
                }
                '+' if digits.is_empty() && !plus => plus = true,
                '-' | '(' | ')' | '.' | '/' => {}
                c if c.is_whitespace() => {}
                _ => return Err(invalid()),
            }
        }
        let international = if plus {
            digits
        } else if let Some(rest) = digits.strip_prefix("00") {
            rest.to_string()
        } else if digits.starts_with('0') {
            let rest = digits.strip_prefix(self.national_prefix.as_str());
            match (&self.default_country_code, rest) {
                (Some(cc), Some(rest)) if !rest.is_empty() => format!("{cc}{rest}"),
                _ => return Err(invalid()),
            }
        } else {
            digits
        };
        if international.is_empty()
            || international.len() > prefix::PREFIX_DIGITS_MAX
            || international.starts_with('0')
        {
            return Err(invalid());
        }
        Ok(international)
    }

    /// Counts the parts of `text` sent as Ozeki `message_type`, with this
    /// tariff's split rules, flat parts and `max_parts`.
    pub fn count_parts(&self, text: &str, message_type: &str) -> Result<PartCount, CalcError> {
        let kind = MessageType::parse(message_type);
        let flat = match &kind {
            MessageType::Other(name) => self.flat_parts(name),
            _ => 1,
        };
        let count = parts_for(text, &kind, &self.part_rules, flat)?;
        match self.max_parts {
            Some(max) if count.parts > max => Err(CalcError::TooManyParts {
                parts: count.parts,
                max,
            }),
            _ => Ok(count),
        }
    }

    /// Flat parts of a non-text type (upper-cased): its own entry, else its
    /// nearest parent's (`A:B:C` → `A:B` → `A`), else 1.
    fn flat_parts(&self, name: &str) -> u32 {
        let mut key = name;
        loop {
            if let Some(&parts) = self.message_type_parts.get(key) {
                return parts;
            }
            match key.rfind(':') {
                Some(i) => key = &key[..i],
                None => return 1,
            }
        }
    }

    /// The price per part of a normalised number for an account of `class`
    /// (rule in the module comment). O(length of the number).
    pub fn price_per_part<'n>(&self, normalised: &'n str, class: Option<&str>) -> PriceMatch<'n> {
        let class = class.and_then(|name| self.classes.get(name));
        let found = |m: PrefixMatch, source| PriceMatch {
            matched_prefix: Some(&normalised[..m.prefix_len]),
            price_per_part_milli: m.price_per_part_milli,
            source,
        };
        if let Some(m) = class.and_then(|c| c.prices.lookup(normalised)) {
            return found(m, PriceSource::ClassPrefix);
        }
        if let Some(m) = self.prices.lookup(normalised) {
            return found(m, PriceSource::BasePrefix);
        }
        match class.and_then(|c| c.default_price_milli) {
            Some(price) => PriceMatch {
                matched_prefix: None,
                price_per_part_milli: price,
                source: PriceSource::ClassDefault,
            },
            None => PriceMatch {
                matched_prefix: None,
                price_per_part_milli: self.default_price_milli,
                source: PriceSource::BaseDefault,
            },
        }
    }

    /// Prices one send to one recipient.
    pub fn quote(&self, req: &QuoteRequest) -> Result<Quote, CalcError> {
        let normalised = self.normalise(req.recipient)?;
        let count = self.count_parts(req.text, req.message_type)?;
        let price = self.price_per_part(&normalised, req.class);
        let total_milli = price
            .price_per_part_milli
            .checked_mul(i64::from(count.parts))
            .ok_or(CalcError::PriceOverflow)?;
        let price_per_part_milli = price.price_per_part_milli;
        let matched_prefix = price.matched_prefix.map(str::to_string);
        Ok(Quote {
            encoding: count.encoding,
            parts: count.parts,
            units: count.units,
            normalised,
            matched_prefix,
            price_per_part_milli,
            bucket: self.bucket_preference(req.at_unix_ms),
            total_milli,
        })
    }

    /// [`BucketPreference::OffPeakFirst`] inside an off-peak window.
    pub fn bucket_preference(&self, at_unix_ms: i64) -> BucketPreference {
        let Some(offpeak) = &self.offpeak else {
            return BucketPreference::AnytimeOnly;
        };
        let Some(utc) = chrono::DateTime::from_timestamp_millis(at_unix_ms) else {
            return BucketPreference::AnytimeOnly;
        };
        let local = utc.with_timezone(&offpeak.timezone);
        let weekday = local.weekday().num_days_from_monday();
        let second = local.num_seconds_from_midnight();
        if offpeak.windows.iter().any(|w| w.contains(weekday, second)) {
            BucketPreference::OffPeakFirst
        } else {
            BucketPreference::AnytimeOnly
        }
    }

    pub fn part_rules(&self) -> PartRules {
        self.part_rules
    }

    /// Charged per message returned by `receivemessage`.
    pub fn receive_price_milli(&self) -> i64 {
        self.receive_price_milli
    }

    /// Price per part of unmatched numbers: the class's default if the class
    /// exists and sets one, else the base default.
    pub fn default_price_milli(&self, class: Option<&str>) -> i64 {
        class
            .and_then(|name| self.classes.get(name))
            .and_then(|c| c.default_price_milli)
            .unwrap_or(self.default_price_milli)
    }

    /// `price_milli × fast_multiplier`, rounded up by `fast_rounding`, in
    /// exact integer arithmetic (saturating at `i64::MAX`).
    pub fn fast_price(&self, price_milli: i64) -> i64 {
        let product = i128::from(price_milli) * i128::from(self.fast_multiplier_milli);
        // product is in millionths of a credit; round up to the step.
        let step: i128 = match self.fast_rounding {
            FastRounding::UpToCredit => 1_000_000,
            FastRounding::UpToMilli => 1_000,
        };
        let rounded = -((-product).div_euclid(step)) * step / 1_000;
        i64::try_from(rounded).unwrap_or(if rounded < 0 { i64::MIN } else { i64::MAX })
    }

    pub fn max_parts(&self) -> Option<u32> {
        self.max_parts
    }

    /// Whether `name` is a class of this tariff (unknown classes price as
    /// the base table).
    pub fn has_class(&self, name: &str) -> bool {
        self.classes.contains_key(name)
    }

    /// Priced prefixes in the base table.
    pub fn prefix_count(&self) -> usize {
        self.prices.len()
    }

    /// The prefixes files this tariff was built from (resolved paths), for
    /// the reload watcher: editing one changes the tariff as much as
    /// editing the YAML.
    pub fn prefix_files(&self) -> &[PathBuf] {
        &self.prefix_files
    }
}

#[cfg(test)]
mod tests;
