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

pub mod gen;
pub mod parts;
pub mod prefix;

pub use parts::{parts_for, CalcError, Encoding, MessageType, PartCount, PartRules};
pub use prefix::{PrefixMatch, PrefixTable, PrefixTableBuilder};

use crate::ledger::BucketPreference;
use crate::money::{format_credits, parse_credits, MILLI_PER_CREDIT};
use chrono::{Datelike, Timelike};
use chrono_tz::Tz;
use prefix::PrefixError;
use serde::Deserialize;
use serde_yaml::{Mapping, Value};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Highest price per part (or per received message) a tariff may set, in
/// milli-credits: anything above is a typo, and the bound keeps
/// `price × parts` far from overflow.
pub const PRICE_MAX_MILLI: i64 = 1_000_000 * MILLI_PER_CREDIT;

/// Highest `max_parts`: a concatenated SMS numbers its parts in one octet.
pub const MAX_PARTS_LIMIT: u32 = 255;

/// Boxis fast mode costs 1.5× by default (SPEC 2.1).
const FAST_MULTIPLIER_DEFAULT_MILLI: i64 = 1500;

/// Highest accepted `fast_multiplier`, in thousandths.
const FAST_MULTIPLIER_MAX_MILLI: i64 = 100 * MILLI_PER_CREDIT;

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

#[derive(Debug)]
struct OffPeak {
    timezone: Tz,
    windows: Vec<OffPeakWindow>,
}

/// One off-peak window in local wall-clock time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OffPeakWindow {
    /// Bit 0 = Monday … bit 6 = Sunday: the days the window opens on.
    days: u8,
    /// Seconds after local midnight, inclusive.
    from_s: u32,
    /// Seconds after local midnight, exclusive; `to_s < from_s` = the window
    /// closes the next day.
    to_s: u32,
}

impl OffPeakWindow {
    /// `weekday`: 0 = Monday; `second`: seconds after local midnight.
    fn contains(&self, weekday: u32, second: u32) -> bool {
        let opens_on = |day: u32| self.days & (1 << day) != 0;
        if self.from_s < self.to_s {
            opens_on(weekday) && (self.from_s..self.to_s).contains(&second)
        } else {
            (opens_on(weekday) && second >= self.from_s)
                || (opens_on((weekday + 6) % 7) && second < self.to_s)
        }
    }
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

// ---------------------------------------------------------------------------
// File structs: what serde accepts. Scalars that carry amounts are kept as
// `Value` so validation can read them as decimal text and name the key.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TariffFile {
    default_country_code: Option<Value>,
    national_prefix: Option<Value>,
    default_price: Option<Value>,
    #[serde(default)]
    prices: Mapping,
    prefixes_file: Option<String>,
    #[serde(default)]
    classes: Mapping,
    offpeak: Option<OffPeakFile>,
    fast_multiplier: Option<Value>,
    fast_rounding: Option<String>,
    max_parts: Option<Value>,
    receive_price: Option<Value>,
    #[serde(default)]
    message_type_parts: Mapping,
    ucs2_split_units: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassFile {
    default_price: Option<Value>,
    #[serde(default)]
    prices: Mapping,
    prefixes_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OffPeakFile {
    timezone: String,
    windows: Vec<WindowFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowFile {
    days: Vec<String>,
    from: String,
    to: String,
}

/// Turns file structs into a [`Tariff`], hashing every byte it reads.
struct Validator<'a> {
    origin: &'a Path,
    hasher: blake3::Hasher,
    prefix_files: Vec<PathBuf>,
}

/// The text of a scalar (string or number), for reading as decimal.
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A short description of a YAML value for error messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".into(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("{n}"),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(_) => "a tagged value".into(),
    }
}

/// `base."key"`: how errors name a map entry.
fn entry_key(base: &str, key: &Value) -> String {
    match scalar_text(key) {
        Some(k) => format!("{base}.{k:?}"),
        None => format!("{base}.<{}>", describe(key)),
    }
}

impl Validator<'_> {
    fn hash(&mut self, bytes: &[u8]) {
        // Length-prefixed, so (yaml, csv) pairs cannot collide by moving
        // bytes between them.
        self.hasher.update(&(bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
    }

    fn invalid(&self, key: impl Into<String>, problem: impl fmt::Display) -> TariffError {
        TariffError::Invalid {
            file: self.origin.to_path_buf(),
            key: key.into(),
            problem: problem.to_string(),
        }
    }

    fn build(mut self, file: TariffFile) -> Result<Tariff, TariffError> {
        let default_country_code = match &file.default_country_code {
            None => None,
            Some(v) => {
                let cc = scalar_text(v).unwrap_or_default();
                if cc.is_empty()
                    || cc.len() > 3
                    || cc.starts_with('0')
                    || !cc.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(self.invalid(
                        "default_country_code",
                        format!("{} is not a country calling code; expected 1 to 3 digits not starting with 0, e.g. \"36\"", describe(v)),
                    ));
                }
                Some(cc)
            }
        };
        let national_prefix = match &file.national_prefix {
            None => "0".to_string(),
            Some(v) => {
                let np = scalar_text(v).unwrap_or_default();
                let ok = (1..=3).contains(&np.len())
                    && np.starts_with('0')
                    && !np.starts_with("00")
                    && np.bytes().all(|b| b.is_ascii_digit());
                if !ok {
                    return Err(self.invalid(
                        "national_prefix",
                        format!(
                            "{} is not a trunk prefix; expected 1 to 3 digits starting with a single 0, e.g. \"0\" or \"06\" (quoted)",
                            describe(v)
                        ),
                    ));
                }
                if default_country_code.is_none() {
                    return Err(self.invalid(
                        "national_prefix",
                        "needs default_country_code, the digits that replace it",
                    ));
                }
                np
            }
        };
        let default_price_milli = match &file.default_price {
            Some(v) => self.price("default_price", v)?,
            None => {
                return Err(self.invalid(
                    "default_price",
                    "missing; set the credits per part for numbers no prefix matches, e.g. `default_price: 1`",
                ))
            }
        };
        let prices = self.prefix_table("", &file.prices, file.prefixes_file.as_deref())?;

        let mut classes = HashMap::new();
        for (name_value, class_value) in &file.classes {
            let key = entry_key("classes", name_value);
            let name = scalar_text(name_value).unwrap_or_default();
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
            if !name_ok {
                return Err(self.invalid(
                    key,
                    "class name must be 1 to 64 letters, digits, '_', '-' or '.'",
                ));
            }
            let class: ClassFile =
                serde_yaml::from_value(class_value.clone()).map_err(|e| self.invalid(&key, e))?;
            let default_price_milli = match &class.default_price {
                Some(v) => Some(self.price(&format!("{key}.default_price"), v)?),
                None => None,
            };
            let prices = self.prefix_table(
                &format!("{key}."),
                &class.prices,
                class.prefixes_file.as_deref(),
            )?;
            classes.insert(
                name,
                TariffClass {
                    prices,
                    default_price_milli,
                },
            );
        }

        let offpeak = match &file.offpeak {
            Some(o) => Some(self.offpeak(o)?),
            None => None,
        };

        let fast_multiplier_milli = match &file.fast_multiplier {
            None => FAST_MULTIPLIER_DEFAULT_MILLI,
            Some(v) => {
                let m = self.decimal("fast_multiplier", v)?;
                if !(1..=FAST_MULTIPLIER_MAX_MILLI).contains(&m) {
                    return Err(self.invalid(
                        "fast_multiplier",
                        "must be more than 0 and at most 100, e.g. 1.5",
                    ));
                }
                m
            }
        };
        let fast_rounding = match file.fast_rounding.as_deref() {
            None | Some("up_to_credit") => FastRounding::UpToCredit,
            Some("up_to_milli") => FastRounding::UpToMilli,
            Some(other) => {
                return Err(self.invalid(
                    "fast_rounding",
                    format!(
                        "{other:?} is not a rounding rule; expected up_to_credit or up_to_milli"
                    ),
                ))
            }
        };
        let max_parts = match &file.max_parts {
            None => None,
            Some(v) => Some(self.count("max_parts", v, 1, MAX_PARTS_LIMIT)?),
        };
        let receive_price_milli = match &file.receive_price {
            None => 0,
            Some(v) => self.price("receive_price", v)?,
        };

        let mut message_type_parts = HashMap::new();
        for (type_value, parts_value) in &file.message_type_parts {
            let key = entry_key("message_type_parts", type_value);
            let name = scalar_text(type_value).unwrap_or_default();
            let upper = match MessageType::parse(&name) {
                MessageType::Other(upper) if !name.trim().is_empty() => upper,
                _ => {
                    return Err(self.invalid(
                        key,
                        "only non-text types take flat parts (e.g. SMS:WAPPUSH, SMS:BINARY:XML); SMS:TEXT… and SMS:BINARY are counted from their content",
                    ))
                }
            };
            let parts = self.count(&key, parts_value, 1, max_parts.unwrap_or(MAX_PARTS_LIMIT))?;
            if message_type_parts.insert(upper, parts).is_some() {
                return Err(self.invalid(key, "listed twice (keys are case-insensitive)"));
            }
        }

        let ucs2_split_units = match &file.ucs2_split_units {
            None => parts::UCS2_SPLIT_UNITS_DEFAULT,
            Some(v) => self.count("ucs2_split_units", v, 2, parts::UCS2_SPLIT_UNITS_DEFAULT)?,
        };

        let hash = self.hasher.finalize().to_hex();
        Ok(Tariff {
            version: hash.as_str()[..16].to_string(),
            default_country_code,
            national_prefix,
            prices,
            default_price_milli,
            classes,
            offpeak,
            fast_multiplier_milli,
            fast_rounding,
            max_parts,
            receive_price_milli,
            message_type_parts,
            part_rules: PartRules { ucs2_split_units },
            prefix_files: self.prefix_files,
        })
    }

    /// Decimal text or number, at most 3 decimals, in thousandths.
    fn decimal(&self, key: &str, v: &Value) -> Result<i64, TariffError> {
        let text = scalar_text(v).ok_or_else(|| {
            self.invalid(
                key,
                format!(
                    "expected a decimal number such as 0.8 or \"2.5\", found {}",
                    describe(v)
                ),
            )
        })?;
        parse_credits(&text).map_err(|e| {
            self.invalid(
                key,
                format!("{e}; expected a decimal number with at most 3 decimals, such as 0.8"),
            )
        })
    }

    /// A price in credits: 0..=1 000 000, at most 3 decimals.
    fn price(&self, key: &str, v: &Value) -> Result<i64, TariffError> {
        let milli = self.decimal(key, v)?;
        if !(0..=PRICE_MAX_MILLI).contains(&milli) {
            return Err(self.invalid(
                key,
                format!(
                    "{} credits is out of range; expected 0 to {}",
                    format_credits(milli),
                    format_credits(PRICE_MAX_MILLI)
                ),
            ));
        }
        Ok(milli)
    }

    /// A whole number in `min..=max`.
    fn count(&self, key: &str, v: &Value, min: u32, max: u32) -> Result<u32, TariffError> {
        scalar_text(v)
            .and_then(|t| t.trim().parse::<u32>().ok())
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| {
                self.invalid(
                    key,
                    format!(
                        "{} is not valid; expected a whole number from {min} to {max}",
                        describe(v)
                    ),
                )
            })
    }

    /// Builds one price table from a `prices` mapping and an optional
    /// prefixes file. `key_base` is `""` or `classes."name".`.
    fn prefix_table(
        &mut self,
        key_base: &str,
        prices: &Mapping,
        prefixes_file: Option<&str>,
    ) -> Result<PrefixTable, TariffError> {
        let mut builder = PrefixTableBuilder::new();
        if let Some(name) = prefixes_file {
            let key = format!("{key_base}prefixes_file");
            let path = self.origin.parent().unwrap_or(Path::new("")).join(name);
            let bytes = std::fs::read(&path)
                .map_err(|e| self.invalid(&key, format!("cannot read {}: {e}", path.display())))?;
            self.hash(&bytes);
            self.prefix_files.push(path.clone());
            let text = std::str::from_utf8(&bytes).map_err(|e| {
                self.invalid(&key, format!("{} is not UTF-8 text: {e}", path.display()))
            })?;
            load_prefix_lines(&mut builder, text, &path)?;
        }
        let map_key = format!("{key_base}prices");
        for (prefix_value, price_value) in prices {
            let key = entry_key(&map_key, prefix_value);
            let price = self.price(&key, price_value)?;
            let prefix = scalar_text(prefix_value).unwrap_or_default();
            match builder.insert(&prefix, price) {
                Ok(()) => {}
                Err(PrefixError::NotDigits) => {
                    return Err(self.invalid(
                        key,
                        "prefix must be digits only, 1 to 15 of them, in international form without '+' (e.g. \"3620\")",
                    ))
                }
                Err(PrefixError::Duplicate { previous_milli }) => {
                    return Err(self.invalid(
                        key,
                        format!(
                            "prefix is already priced at {} (in {map_key} or the prefixes file); price each prefix once",
                            format_credits(previous_milli)
                        ),
                    ))
                }
            }
        }
        Ok(builder.build())
    }

    fn offpeak(&self, file: &OffPeakFile) -> Result<OffPeak, TariffError> {
        let timezone: Tz = file.timezone.parse().map_err(|_| {
            self.invalid(
                "offpeak.timezone",
                format!(
                    "{:?} is not an IANA time zone; expected a name like Europe/Budapest or UTC",
                    file.timezone
                ),
            )
        })?;
        if file.windows.is_empty() {
            return Err(self.invalid(
                "offpeak.windows",
                "list at least one window, e.g. { days: [sat, sun], from: \"00:00\", to: \"24:00\" }",
            ));
        }
        let mut windows = Vec::with_capacity(file.windows.len());
        for (i, w) in file.windows.iter().enumerate() {
            let key = format!("offpeak.windows[{i}]");
            if w.days.is_empty() {
                return Err(self.invalid(
                    format!("{key}.days"),
                    "list at least one day (mon, tue, wed, thu, fri, sat, sun)",
                ));
            }
            let mut days = 0u8;
            for (j, day) in w.days.iter().enumerate() {
                let bit = weekday_index(day).ok_or_else(|| {
                    self.invalid(
                        format!("{key}.days[{j}]"),
                        format!(
                            "{day:?} is not a day; expected mon, tue, wed, thu, fri, sat or sun"
                        ),
                    )
                })?;
                days |= 1 << bit;
            }
            let from_s = parse_clock(&w.from, false).ok_or_else(|| {
                self.invalid(
                    format!("{key}.from"),
                    format!(
                        "{:?} is not a time; expected HH:MM from 00:00 to 23:59",
                        w.from
                    ),
                )
            })?;
            let to_s = parse_clock(&w.to, true).ok_or_else(|| {
                self.invalid(
                    format!("{key}.to"),
                    format!(
                        "{:?} is not a time; expected HH:MM from 00:00 to 24:00",
                        w.to
                    ),
                )
            })?;
            if from_s == to_s {
                return Err(self.invalid(
                    key,
                    "from and to are equal; use from: \"00:00\", to: \"24:00\" for a whole day",
                ));
            }
            windows.push(OffPeakWindow { days, from_s, to_s });
        }
        Ok(OffPeak { timezone, windows })
    }
}

/// Reads `prefix,price` lines into `builder`. Errors name `path` and the
/// 1-based line.
fn load_prefix_lines(
    builder: &mut PrefixTableBuilder,
    text: &str,
    path: &Path,
) -> Result<(), TariffError> {
    let bad = |line: usize, problem: String| TariffError::PrefixLine {
        file: path.to_path_buf(),
        line,
        problem,
    };
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let mut seen_data = false;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((prefix, price)) = line.split_once([',', ';']) else {
            return Err(bad(
                line_no,
                format!("{line:?} is not `prefix,price`, e.g. `3620,0.8`"),
            ));
        };
        let (prefix, price) = (prefix.trim(), price.trim());
        if !seen_data && prefix.eq_ignore_ascii_case("prefix") {
            seen_data = true;
            continue;
        }
        seen_data = true;
        let price_milli = parse_credits(price).map_err(|e| {
            bad(
                line_no,
                format!("price: {e}; expected credits with at most 3 decimals, e.g. 0.8"),
            )
        })?;
        if !(0..=PRICE_MAX_MILLI).contains(&price_milli) {
            return Err(bad(
                line_no,
                format!(
                    "price {price} is out of range; expected 0 to {}",
                    format_credits(PRICE_MAX_MILLI)
                ),
            ));
        }
        match builder.insert(prefix, price_milli) {
            Ok(()) => {}
            Err(PrefixError::NotDigits) => {
                return Err(bad(
                    line_no,
                    format!("prefix {prefix:?} must be 1 to 15 digits, international form without '+'"),
                ))
            }
            Err(PrefixError::Duplicate { previous_milli }) => {
                return Err(bad(
                    line_no,
                    format!(
                        "prefix {prefix:?} is already priced at {} on an earlier line; price each prefix once",
                        format_credits(previous_milli)
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// `mon`/`monday` … (any case) → 0 = Monday … 6 = Sunday.
fn weekday_index(day: &str) -> Option<u32> {
    const DAYS: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let day = day.trim().to_ascii_lowercase();
    DAYS.iter()
        .position(|full| day == *full || (day.len() == 3 && full.starts_with(day.as_str())))
        .map(|i| i as u32)
}

/// `HH:MM` → seconds after midnight; `24:00` only when `allow_24`.
fn parse_clock(text: &str, allow_24: bool) -> Option<u32> {
    let (h, m) = text.trim().split_once(':')?;
    if h.len() != 2 || m.len() != 2 || !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    match (h, m) {
        (24, 0) if allow_24 => Some(24 * 3600),
        (0..=23, 0..=59) => Some(h * 3600 + m * 60),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
