//! `conf/tariffs.yaml` read into a [`Tariff`]: the file structs serde
//! accepts (unknown keys rejected) and their validation, by the rules in
//! the [module comment](super). Every error names the file, the key and
//! what would be valid; every byte read (the YAML and each
//! `prefixes_file`) goes into the tariff's version hash. Runs on load and
//! reload only, never on a request.

use super::offpeak::OffPeakFile;
use super::prefix::PrefixError;
use super::{
    parts, FastRounding, MessageType, PartRules, PrefixTable, PrefixTableBuilder, Tariff,
    TariffClass, TariffError, MAX_PARTS_LIMIT, PRICE_MAX_MILLI,
};
use crate::money::{format_credits, parse_credits, MILLI_PER_CREDIT};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Boxis fast mode costs 1.5× by default (SPEC 2.1).
const FAST_MULTIPLIER_DEFAULT_MILLI: i64 = 1500;

/// Highest accepted `fast_multiplier`, in thousandths.
const FAST_MULTIPLIER_MAX_MILLI: i64 = 100 * MILLI_PER_CREDIT;

// ---------------------------------------------------------------------------
// File structs: what serde accepts. Scalars that carry amounts are kept as
// `Value` so validation can read them as decimal text and name the key.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TariffFile {
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

/// Turns file structs into a [`Tariff`], hashing every byte it reads.
pub(super) struct Validator<'a> {
    pub(super) origin: &'a Path,
    pub(super) hasher: blake3::Hasher,
    pub(super) prefix_files: Vec<PathBuf>,
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
    pub(super) fn hash(&mut self, bytes: &[u8]) {
        // Length-prefixed, so (yaml, csv) pairs cannot collide by moving
        // bytes between them.
        self.hasher.update(&(bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
    }

    pub(super) fn invalid(
        &self,
        key: impl Into<String>,
        problem: impl fmt::Display,
    ) -> TariffError {
        TariffError::Invalid {
            file: self.origin.to_path_buf(),
            key: key.into(),
            problem: problem.to_string(),
        }
    }

    pub(super) fn build(mut self, file: TariffFile) -> Result<Tariff, TariffError> {
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
