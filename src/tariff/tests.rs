//! Tests of `Tariff`: loading, validation errors, normalisation, pricing,
//! classes, off-peak windows and big generated tables.

use super::offpeak::{parse_clock, weekday_index};
use super::*;
use crate::money::{format_credits, parse_credits};
use proptest::prelude::*;
use std::collections::HashMap;

const ORIGIN: &str = "conf/tariffs.yaml";

const BASE: &str = r#"
default_country_code: "36"
national_prefix: "06"
default_price: 1
prices:
  "36": 1
  "3620": 0.8
  "362012": "0.7"
  44: 2.5
  "1": 3
classes:
  wholesale: { default_price: 0.5, prices: { "36": 0.4, "49": 0.9 } }
  nodefault: { prices: { "44": 2 } }
offpeak:
  timezone: Europe/Budapest
  windows:
    - { days: [mon, tue, wed, thu, fri], from: "20:00", to: "08:00" }
    - { days: [sat, sun], from: "00:00", to: "24:00" }
fast_multiplier: 1.5
fast_rounding: up_to_credit
max_parts: 10
receive_price: 0.25
message_type_parts: { "SMS:WAPPUSH": 2, "sms:binary:xml": 3 }
ucs2_split_units: 67
"#;

fn tariff(yaml: &str) -> Tariff {
    Tariff::from_yaml(yaml, Path::new(ORIGIN)).unwrap()
}

fn error(yaml: &str) -> String {
    Tariff::from_yaml(yaml, Path::new(ORIGIN))
        .unwrap_err()
        .to_string()
}

fn req<'a>(recipient: &'a str) -> QuoteRequest<'a> {
    QuoteRequest {
        recipient,
        text: "hello",
        message_type: "",
        class: None,
        at_unix_ms: 1_736_967_599_000, // Wed 2025-01-15 19:59:59 Budapest: peak
    }
}

#[test]
fn sample_file_in_conf_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/tariffs.yaml");
    let t = Tariff::load(&path).unwrap();
    assert_eq!(t.version().len(), 16);
    assert!(t.prefix_count() > 0);
    assert!(t.has_class("wholesale"));
}

#[test]
fn quote_prices_parts_times_longest_prefix() {
    let t = tariff(BASE);
    let q = t
        .quote(&QuoteRequest {
            text: &"a".repeat(161),
            ..req("+36 20 123 4567")
        })
        .unwrap();
    assert_eq!(
        q,
        Quote {
            encoding: Encoding::Gsm7,
            parts: 2,
            units: 161,
            normalised: "36201234567".into(),
            matched_prefix: Some("362012".into()),
            price_per_part_milli: 700,
            bucket: BucketPreference::AnytimeOnly,
            total_milli: 1400,
        }
    );
    let q = t.quote(&req("+36 30 123 4567")).unwrap();
    assert_eq!(
        (q.matched_prefix.as_deref(), q.total_milli),
        (Some("36"), 1000)
    );
    let q = t.quote(&req("+36 20 999 4567")).unwrap();
    assert_eq!(
        (q.matched_prefix.as_deref(), q.total_milli),
        (Some("3620"), 800)
    );
    let q = t.quote(&req("+44 7700 900123")).unwrap();
    assert_eq!(
        (q.matched_prefix.as_deref(), q.total_milli),
        (Some("44"), 2500)
    );
}

#[test]
fn national_and_international_forms_price_the_same() {
    let t = tariff(BASE);
    let forms = [
        "06201234567",
        "+36201234567",
        "0036201234567",
        "36201234567",
        "+36 (20) 123-4567",
        "06-20/123.45.67",
        " 0036 20 1234567\t",
    ];
    for form in forms {
        let q = t.quote(&req(form)).unwrap();
        assert_eq!(q.normalised, "36201234567", "{form}");
        assert_eq!(q.matched_prefix.as_deref(), Some("362012"), "{form}");
        assert_eq!(q.total_milli, 700, "{form}");
    }
}

#[test]
fn unknown_destinations_pay_the_default() {
    let t = tariff(BASE);
    let q = t.quote(&req("+49 30 1234567")).unwrap();
    assert_eq!(q.matched_prefix, None);
    assert_eq!(q.price_per_part_milli, 1000);
    assert_eq!(q.total_milli, 1000);
    assert_eq!(t.default_price_milli(None), 1000);
}

#[test]
fn invalid_numbers_are_refused() {
    let t = tariff(BASE);
    let bad = [
        "",
        "+",
        "0",
        "00",
        "abc",
        "+36 20 123 456x",
        "1234567890123456",
        "+1234567890123456",
        "06123456789012345",
        "+0036201234567",
        "000036201234567",
        "36+201234567",
        "++36201234567",
        "+36201234567,+36301234567",
    ];
    for number in bad {
        assert!(
            matches!(t.normalise(number), Err(CalcError::InvalidNumber(_))),
            "{number:?}"
        );
        assert!(t.quote(&req(number)).is_err(), "{number:?}");
    }
    assert_eq!(t.normalise("123456789012345").unwrap(), "123456789012345");
    assert_eq!(t.normalise("+1").unwrap(), "1");
    // 14 national digits + country code = 16 digits: too long.
    assert!(t.normalise("0612345678901234").is_err());
    assert_eq!(t.normalise("061234567890123").unwrap(), "361234567890123");
    // Starts with 0 but not with the national prefix 06.
    assert!(t.normalise("0201234567").is_err());
    assert!(t.normalise("06").is_err());
    // The default national prefix is a single 0.
    let uk = tariff("default_country_code: 44\ndefault_price: 1\n");
    assert_eq!(uk.normalise("07700 900123").unwrap(), "447700900123");
    assert_eq!(uk.normalise("+44 7700 900123").unwrap(), "447700900123");
    assert!(uk.normalise("0").is_err());
    // Without a default country code, national numbers cannot be priced.
    let t = tariff("default_price: 1\n");
    assert_eq!(
        t.normalise("06201234567"),
        Err(CalcError::InvalidNumber("06201234567".into()))
    );
    assert_eq!(t.normalise("+36201234567").unwrap(), "36201234567");
}

#[test]
fn class_rule_is_class_prefix_then_base_prefix_then_defaults() {
    let t = tariff(BASE);
    let price = |n: &'static str, class| {
        let m = t.price_per_part(n, class);
        (m.matched_prefix, m.price_per_part_milli, m.source)
    };
    let w = Some("wholesale");
    // Class prefix beats a longer base prefix.
    assert_eq!(
        price("36201234567", w),
        (Some("36"), 400, PriceSource::ClassPrefix)
    );
    assert_eq!(
        price("491234567", w),
        (Some("49"), 900, PriceSource::ClassPrefix)
    );
    // Base prefix beats the class default.
    assert_eq!(
        price("447700900123", w),
        (Some("44"), 2500, PriceSource::BasePrefix)
    );
    // Class default beats the base default.
    assert_eq!(
        price("33123456789", w),
        (None, 500, PriceSource::ClassDefault)
    );
    // A class without a default falls to the base default.
    let n = Some("nodefault");
    assert_eq!(
        price("447700900123", n),
        (Some("44"), 2000, PriceSource::ClassPrefix)
    );
    assert_eq!(
        price("33123456789", n),
        (None, 1000, PriceSource::BaseDefault)
    );
    assert_eq!(
        price("36301234567", n),
        (Some("36"), 1000, PriceSource::BasePrefix)
    );
    // Unknown class = no class.
    let u = Some("nosuchclass");
    assert!(!t.has_class("nosuchclass"));
    assert_eq!(price("36201234567", u), price("36201234567", None));
    assert_eq!(
        price("33123456789", u),
        (None, 1000, PriceSource::BaseDefault)
    );
    assert_eq!(t.default_price_milli(w), 500);
    assert_eq!(t.default_price_milli(n), 1000);
    assert_eq!(t.default_price_milli(u), 1000);
    let q = t
        .quote(&QuoteRequest {
            class: w,
            ..req("06201234567")
        })
        .unwrap();
    assert_eq!(
        (q.matched_prefix.as_deref(), q.total_milli),
        (Some("36"), 400)
    );
}

#[test]
fn fast_price_rounds_as_configured() {
    let t = tariff(BASE);
    assert_eq!(t.fast_price(1000), 2000); // 1.5 → 2 credits
    assert_eq!(t.fast_price(2000), 3000);
    assert_eq!(t.fast_price(800), 2000); // 1.2 → 2
    assert_eq!(t.fast_price(0), 0);
    assert_eq!(t.fast_price(4000), 6000);
    let milli = tariff("default_price: 1\nfast_multiplier: 1.25\nfast_rounding: up_to_milli\n");
    assert_eq!(milli.fast_price(1000), 1250);
    assert_eq!(milli.fast_price(333), 417); // 416.25 → 417
    assert_eq!(milli.fast_price(i64::MAX), i64::MAX);
    let default = tariff("default_price: 1\n");
    assert_eq!(default.fast_price(1000), 2000);
    assert_eq!(default.fast_price(3000), 5000); // 4.5 → 5
}

#[test]
fn max_parts_refuses_long_messages() {
    let t = tariff(BASE);
    assert_eq!(t.max_parts(), Some(10));
    let ten = "a".repeat(153 * 10);
    assert_eq!(
        t.quote(&QuoteRequest {
            text: &ten,
            ..req("+3630")
        })
        .unwrap()
        .parts,
        10
    );
    let eleven = "a".repeat(153 * 10 + 1);
    assert_eq!(
        t.quote(&QuoteRequest {
            text: &eleven,
            ..req("+3630")
        }),
        Err(CalcError::TooManyParts { parts: 11, max: 10 })
    );
    assert_eq!(tariff("default_price: 1\n").max_parts(), None);
    assert_eq!(
        tariff("default_price: 1\n")
            .count_parts(&eleven, "")
            .unwrap()
            .parts,
        11
    );
}

#[test]
fn message_types_use_flat_parts_and_errors() {
    let t = tariff(BASE);
    let parts = |kind: &str| {
        t.count_parts("whatever", kind)
            .map(|c| (c.encoding, c.parts))
    };
    assert_eq!(parts("SMS:WAPPUSH"), Ok((Encoding::Flat, 2)));
    assert_eq!(parts("sms:wappush:si"), Ok((Encoding::Flat, 2)));
    assert_eq!(parts("SMS:BINARY:XML"), Ok((Encoding::Flat, 3)));
    assert_eq!(parts("SMS:VCARD"), Ok((Encoding::Flat, 1)));
    assert_eq!(parts("SMS:TEXT:UCS2"), Ok((Encoding::Ucs2, 1)));
    // An unknown text variant is counted by its content, never flat: a
    // long text must not pass for one part.
    let long = "a".repeat(400);
    for kind in ["SMS:TEXT:FLASH", "sms:text:class0:flash", "SMS:TEXTX"] {
        let c = t.count_parts(&long, kind).unwrap();
        assert_eq!((c.encoding, c.parts), (Encoding::Gsm7, 3), "{kind}");
        let c = t.count_parts(&"ő".repeat(100), kind).unwrap();
        assert_eq!((c.encoding, c.parts), (Encoding::Ucs2, 2), "{kind}");
    }
    assert_eq!(parts("SMS:BINARY"), Err(CalcError::InvalidHex));
    assert_eq!(
        t.count_parts("ő", "SMS:TEXT:GSM7BIT"),
        Err(CalcError::NotGsm7 { character: 'ő' })
    );
    assert_eq!(t.receive_price_milli(), 250);
    assert_eq!(
        t.part_rules(),
        PartRules {
            ucs2_split_units: 67
        }
    );
    let t63 = tariff("default_price: 1\nucs2_split_units: 63\n");
    assert_eq!(t63.count_parts(&"ж".repeat(127), "").unwrap().parts, 3);
}

// Off-peak: Mon–Fri 20:00→08:00 next day, Sat+Sun all day, Europe/Budapest
// (UTC+1 in winter, UTC+2 in summer). Timestamps are UTC, computed offline.
#[test]
fn offpeak_windows_cross_midnight_and_respect_weekdays() {
    let t = tariff(BASE);
    let at = |ms| t.bucket_preference(ms);
    use BucketPreference::{AnytimeOnly as Peak, OffPeakFirst as Off};
    // Wed 2025-01-15 19:59:59 local (18:59:59Z): peak; 20:00:00: off-peak.
    assert_eq!(at(1_736_967_599_000), Peak);
    assert_eq!(at(1_736_967_600_000), Off);
    // Thu 07:59:59.999 local: still the Wednesday window; 08:00: peak.
    assert_eq!(at(1_737_010_799_999), Off);
    assert_eq!(at(1_737_010_800_000), Peak);
    // Fri 20:00 local, Sat noon, Sun 23:59:59 local: off-peak.
    assert_eq!(at(1_737_140_400_000), Off);
    assert_eq!(at(1_737_201_600_000), Off);
    assert_eq!(at(1_737_327_599_000), Off);
    // Mon 00:00 local: the weekend window ended at Sunday 24:00 and Sunday
    // does not open the weekday window: peak until Monday 20:00.
    assert_eq!(at(1_737_327_600_000), Peak);
    assert_eq!(at(1_737_356_399_000), Peak);
    // Summer (UTC+2): Wed 2025-07-16 07:59:59 local = 05:59:59Z off-peak,
    // 08:00 local = 06:00Z peak; 19:59:59 local peak, 20:00 local off-peak.
    assert_eq!(at(1_752_645_599_000), Off);
    assert_eq!(at(1_752_645_600_000), Peak);
    assert_eq!(at(1_752_688_799_000), Peak);
    assert_eq!(at(1_752_688_800_000), Off);
    // The quote carries the preference.
    let q = t
        .quote(&QuoteRequest {
            at_unix_ms: 1_736_967_600_000,
            ..req("+3630")
        })
        .unwrap();
    assert_eq!(q.bucket, Off);
    // Without off-peak windows, always peak; absurd timestamps too.
    assert_eq!(
        tariff("default_price: 1\n").bucket_preference(1_737_201_600_000),
        Peak
    );
    assert_eq!(t.bucket_preference(i64::MAX), Peak);
    assert_eq!(t.bucket_preference(i64::MIN), Peak);
}

#[test]
fn offpeak_windows_follow_dst_changes() {
    // Sundays 01:00–04:00 local, on both 2025 DST change days.
    let t = tariff(
        "default_price: 1\noffpeak:\n  timezone: Europe/Budapest\n  windows:\n    - { days: [sun], from: \"01:00\", to: \"04:00\" }\n",
    );
    let at = |ms| t.bucket_preference(ms);
    use BucketPreference::{AnytimeOnly as Peak, OffPeakFirst as Off};
    // 2025-03-30: clocks jump 02:00 CET → 03:00 CEST at 01:00Z; the window
    // is 2 real hours: 00:00Z (01:00 CET) to 02:00Z (04:00 CEST).
    assert_eq!(at(1_743_292_799_000), Peak); // 00:59:59 CET
    assert_eq!(at(1_743_292_800_000), Off); // 01:00:00 CET
    assert_eq!(at(1_743_296_399_000), Off); // 01:59:59 CET
    assert_eq!(at(1_743_296_400_000), Off); // 03:00:00 CEST
    assert_eq!(at(1_743_299_999_000), Off); // 03:59:59 CEST
    assert_eq!(at(1_743_300_000_000), Peak); // 04:00:00 CEST
                                             // 2025-10-26: clocks fall back 03:00 CEST → 02:00 CET at 01:00Z; the
                                             // window is 4 real hours: 23:00Z Sat (01:00 CEST) to 03:00Z (04:00 CET).
    assert_eq!(at(1_761_433_199_000), Peak); // 00:59:59 CEST
    assert_eq!(at(1_761_433_200_000), Off); // 01:00:00 CEST
    assert_eq!(at(1_761_442_200_000), Off); // 02:30 CET, the second one
    assert_eq!(at(1_761_447_599_000), Off); // 03:59:59 CET
    assert_eq!(at(1_761_447_600_000), Peak); // 04:00:00 CET
}

#[test]
fn weekday_names_and_clock_parsing() {
    assert_eq!(weekday_index("mon"), Some(0));
    assert_eq!(weekday_index("Sunday"), Some(6));
    assert_eq!(weekday_index("THU"), Some(3));
    assert_eq!(weekday_index("mo"), None);
    assert_eq!(weekday_index("mond"), None);
    assert_eq!(parse_clock("00:00", false), Some(0));
    assert_eq!(parse_clock("23:59", false), Some(86_340));
    assert_eq!(parse_clock("24:00", true), Some(86_400));
    assert_eq!(parse_clock("24:00", false), None);
    assert_eq!(parse_clock("24:01", true), None);
    assert_eq!(parse_clock("8:00", false), None);
    assert_eq!(parse_clock("08:60", false), None);
    assert_eq!(parse_clock("0800", false), None);
}

#[test]
fn errors_name_file_key_and_what_is_valid() {
    let cases: &[(&str, &str)] = &[
        (
            "default_price: 1\nprices: { \"36x\": 1 }\n",
            "conf/tariffs.yaml: prices.\"36x\": prefix must be digits only",
        ),
        (
            "default_price: 1\nprices: { \"+36\": 1 }\n",
            "conf/tariffs.yaml: prices.\"+36\": prefix must be digits only",
        ),
        (
            "default_price: 1\nprices: { \"36\": 0.0001 }\n",
            "conf/tariffs.yaml: prices.\"36\": amount \"0.0001\" has more than 3 decimals",
        ),
        (
            "default_price: 1\nprices: { \"36\": -1 }\n",
            "conf/tariffs.yaml: prices.\"36\": -1 credits is out of range; expected 0 to 1000000",
        ),
        (
            "default_price: 1\nprices: { \"36\": 1, 36: 2 }\n",
            "conf/tariffs.yaml: prices.\"36\": prefix is already priced at 1",
        ),
        (
            "default_price: 1\nprices: { \"36\": [1] }\n",
            "conf/tariffs.yaml: prices.\"36\": expected a decimal number",
        ),
        ("prices: {}\n", "conf/tariffs.yaml: default_price: missing"),
        (
            "default_price: 1\nbogus: 1\n",
            "conf/tariffs.yaml: unknown field `bogus`, expected one of",
        ),
        (
            "default_price: 1\ndefault_country_code: \"36\"\nnational_prefix: 6\n",
            "conf/tariffs.yaml: national_prefix: 6 is not a trunk prefix; expected 1 to 3 digits starting with a single 0",
        ),
        (
            "default_price: 1\nnational_prefix: \"06\"\n",
            "conf/tariffs.yaml: national_prefix: needs default_country_code",
        ),
        (
            "default_price: 1\ndefault_country_code: \"036\"\n",
            "conf/tariffs.yaml: default_country_code: \"036\" is not a country calling code",
        ),
        (
            "default_price: 1\nclasses: { gold: { default_pryce: 1 } }\n",
            "conf/tariffs.yaml: classes.\"gold\": unknown field `default_pryce`, expected one of `default_price`, `prices`, `prefixes_file`",
        ),
        (
            "default_price: 1\nclasses: { gold: { prices: { \"4x\": 1 } } }\n",
            "conf/tariffs.yaml: classes.\"gold\".prices.\"4x\": prefix must be digits only",
        ),
        (
            "default_price: 1\nclasses: { \"g old\": {} }\n",
            "conf/tariffs.yaml: classes.\"g old\": class name must be",
        ),
        (
            "default_price: 1\noffpeak: { timezone: Europe/Budapset, windows: [] }\n",
            "conf/tariffs.yaml: offpeak.timezone: \"Europe/Budapset\" is not an IANA time zone",
        ),
        (
            "default_price: 1\noffpeak: { timezone: UTC, windows: [] }\n",
            "conf/tariffs.yaml: offpeak.windows: list at least one window",
        ),
        (
            "default_price: 1\noffpeak: { timezone: UTC, windows: [{ days: [mon, funday], from: \"20:00\", to: \"08:00\" }] }\n",
            "conf/tariffs.yaml: offpeak.windows[0].days[1]: \"funday\" is not a day; expected mon, tue",
        ),
        (
            "default_price: 1\noffpeak: { timezone: UTC, windows: [{ days: [mon], from: \"25:00\", to: \"08:00\" }] }\n",
            "conf/tariffs.yaml: offpeak.windows[0].from: \"25:00\" is not a time; expected HH:MM",
        ),
        (
            "default_price: 1\noffpeak: { timezone: UTC, windows: [{ days: [mon], from: \"08:00\", to: \"08:00\" }] }\n",
            "conf/tariffs.yaml: offpeak.windows[0]: from and to are equal",
        ),
        (
            "default_price: 1\noffpeak: { timezone: UTC, windows: [{ days: [mon], from: \"08:00\", till: \"09:00\" }] }\n",
            "conf/tariffs.yaml: offpeak.windows[0]: unknown field `till`, expected one of `days`, `from`, `to`",
        ),
        (
            "default_price: 1\nfast_rounding: nearest\n",
            "conf/tariffs.yaml: fast_rounding: \"nearest\" is not a rounding rule; expected up_to_credit or up_to_milli",
        ),
        (
            "default_price: 1\nfast_multiplier: 0\n",
            "conf/tariffs.yaml: fast_multiplier: must be more than 0",
        ),
        (
            "default_price: 1\nmax_parts: 0\n",
            "conf/tariffs.yaml: max_parts: 0 is not valid; expected a whole number from 1 to 255",
        ),
        (
            "default_price: 1\nucs2_split_units: 70\n",
            "conf/tariffs.yaml: ucs2_split_units: 70 is not valid; expected a whole number from 2 to 67",
        ),
        (
            "default_price: 1\nmessage_type_parts: { \"SMS:TEXT\": 2 }\n",
            "conf/tariffs.yaml: message_type_parts.\"SMS:TEXT\": only non-text types take flat parts",
        ),
        (
            "default_price: 1\nmessage_type_parts: { \"sms:text:flash\": 1 }\n",
            "conf/tariffs.yaml: message_type_parts.\"sms:text:flash\": only non-text types take flat parts",
        ),
        (
            "default_price: 1\nmax_parts: 4\nmessage_type_parts: { \"SMS:WAPPUSH\": 5 }\n",
            "conf/tariffs.yaml: message_type_parts.\"SMS:WAPPUSH\": 5 is not valid; expected a whole number from 1 to 4",
        ),
        (
            "default_price: 1\nmessage_type_parts: { \"SMS:WAPPUSH\": 1, \"sms:wappush\": 2 }\n",
            "conf/tariffs.yaml: message_type_parts.\"sms:wappush\": listed twice",
        ),
        (
            "default_price: 1\nprefixes_file: nonexistent.csv\n",
            "conf/tariffs.yaml: prefixes_file: cannot read conf/nonexistent.csv",
        ),
        ("default_price: [\n", "conf/tariffs.yaml: "),
        ("", "conf/tariffs.yaml: "),
        ("- 1\n", "conf/tariffs.yaml: "),
    ];
    for (yaml, expected) in cases {
        let got = error(yaml);
        assert!(
            got.starts_with(expected),
            "for {yaml:?}\n got: {got}\nwant: {expected}…"
        );
    }
}

#[test]
fn yaml_numbers_and_strings_are_the_same_decimals() {
    let t = tariff(
        "default_price: \"0.125\"\nprices: { 36: 1.0, \"44\": 2.50, \"49\": \"3\", \"33\": 1e2 }\nreceive_price: 0.001\n",
    );
    assert_eq!(t.default_price_milli(None), 125);
    assert_eq!(t.price_per_part("361", None).price_per_part_milli, 1000);
    assert_eq!(t.price_per_part("441", None).price_per_part_milli, 2500);
    assert_eq!(t.price_per_part("491", None).price_per_part_milli, 3000);
    assert_eq!(t.price_per_part("331", None).price_per_part_milli, 100_000);
    assert_eq!(t.receive_price_milli(), 1);
    // Too precise even as a YAML float.
    assert!(error("default_price: 0.30000000000000004\n").contains("more than 3 decimals"));
    assert!(error("default_price: true\n").contains("default_price: expected a decimal number"));
}

#[test]
fn version_is_a_content_hash() {
    let a = tariff(BASE);
    let b = tariff(BASE);
    assert_eq!(a.version(), b.version());
    assert_eq!(a.version().len(), 16);
    assert!(a.version().bytes().all(|c| c.is_ascii_hexdigit()));
    let c = tariff(&BASE.replace("\"3620\": 0.8", "\"3620\": 0.9"));
    assert_ne!(a.version(), c.version());
}

#[test]
fn prefixes_file_loads_relative_to_the_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let csv = "\u{FEFF}prefix,price\n# comment\n\n3620,0.8\n 44 ; 2.5 \n";
    std::fs::write(dir.path().join("prefixes.csv"), csv).unwrap();
    let yaml = "default_price: 1\nprefixes_file: prefixes.csv\nprices: { \"36\": 1 }\n";
    let yaml_path = dir.path().join("tariffs.yaml");
    std::fs::write(&yaml_path, yaml).unwrap();
    let t = Tariff::load(&yaml_path).unwrap();
    assert_eq!(t.prefix_count(), 3);
    assert_eq!(t.prefix_files(), [dir.path().join("prefixes.csv")]);
    assert!(tariff(BASE).prefix_files().is_empty());
    assert_eq!(t.price_per_part("36201", None).price_per_part_milli, 800);
    assert_eq!(t.price_per_part("36301", None).price_per_part_milli, 1000);
    assert_eq!(t.price_per_part("4471", None).price_per_part_milli, 2500);
    let v1 = t.version().to_string();
    // Same YAML, different CSV: different version.
    std::fs::write(dir.path().join("prefixes.csv"), "3620,0.9\n").unwrap();
    let t2 = Tariff::load(&yaml_path).unwrap();
    assert_ne!(t2.version(), v1);
    assert_eq!(t2.price_per_part("36201", None).price_per_part_milli, 900);

    let csv_path = dir.path().join("prefixes.csv");
    let csv_err = |csv: &str| {
        std::fs::write(&csv_path, csv).unwrap();
        Tariff::load(&yaml_path).unwrap_err().to_string()
    };
    let at = |line: usize| format!("{}:{line}: ", csv_path.display());
    assert!(csv_err("3620,0.8\n36x,1\n")
        .starts_with(&format!("{}prefix \"36x\" must be 1 to 15 digits", at(2))));
    assert!(csv_err("3620\n").starts_with(&format!("{}\"3620\" is not `prefix,price`", at(1))));
    assert!(csv_err("3620,abc\n").starts_with(&format!(
        "{}price: amount \"abc\" is not a decimal number",
        at(1)
    )));
    assert!(csv_err("3620,1\n3620,2\n")
        .starts_with(&format!("{}prefix \"3620\" is already priced at 1", at(2))));
    // A header is only a header on the first line.
    assert!(csv_err("3620,1\nprefix,price\n").starts_with(&at(2)));
    // Both the file and the YAML price "36".
    let e = csv_err("36,2\n");
    assert!(
        e.contains("tariffs.yaml: prices.\"36\": prefix is already priced at 2"),
        "{e}"
    );
    // Unreadable / non-UTF-8.
    let e = csv_err("36\u{0}");
    assert!(e.contains("is not `prefix,price`"), "{e}");
    std::fs::write(&csv_path, [0xFFu8, 0xFE, 0x00]).unwrap();
    let e = Tariff::load(&yaml_path).unwrap_err().to_string();
    assert!(
        e.contains("prefixes_file: ") && e.contains("is not UTF-8"),
        "{e}"
    );
}

#[test]
fn class_prefixes_file_is_supported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gold.csv"), "36,0.3\n").unwrap();
    let yaml = "default_price: 1\nclasses:\n  gold: { prefixes_file: gold.csv }\n";
    let t = Tariff::from_yaml(yaml, &dir.path().join("tariffs.yaml")).unwrap();
    assert_eq!(
        t.price_per_part("3620", Some("gold")).price_per_part_milli,
        300
    );
    assert_eq!(t.price_per_part("3620", None).price_per_part_milli, 1000);
}

#[test]
fn generated_200k_table_loads_and_prices_correctly() {
    let csv = gen::generate_prefix_table(200_000, 42);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("prefixes.csv"), &csv).unwrap();
    let yaml_path = dir.path().join("tariffs.yaml");
    std::fs::write(
        &yaml_path,
        "default_price: 0.5\nprefixes_file: prefixes.csv\n",
    )
    .unwrap();
    let t = Tariff::load(&yaml_path).unwrap();
    assert_eq!(t.prefix_count(), 200_000);

    let table: HashMap<&str, i64> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let (p, v) = l.split_once(',').unwrap();
            (p, parse_credits(v).unwrap())
        })
        .collect();
    // Every prefix, looked up as a number of its own, is an exact match.
    for (prefix, price) in table.iter().step_by(97) {
        let m = t.price_per_part(prefix, None);
        assert_eq!(m.matched_prefix, Some(*prefix));
        assert_eq!(m.price_per_part_milli, *price);
    }
    // Full numbers agree with a brute-force longest match.
    let mut seed = 7u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    let prefixes: Vec<&str> = table.keys().copied().collect();
    for _ in 0..5_000 {
        let base = prefixes[next() % prefixes.len()];
        let mut number = base.to_string();
        while number.len() < 11 {
            number.push((b'0' + (next() % 10) as u8) as char);
        }
        let expected = (1..=number.len())
            .rev()
            .find_map(|l| table.get(&number[..l]).map(|p| (l, *p)));
        let m = t.price_per_part(&number, None);
        let got = m.matched_prefix.map(|p| (p.len(), m.price_per_part_milli));
        assert_eq!(got, expected, "{number}");
        let q = t
            .quote(&QuoteRequest {
                recipient: &format!("+{number}"),
                ..req("")
            })
            .unwrap();
        assert_eq!(q.total_milli, expected.unwrap().1);
    }
    // An unmatched number pays the default.
    assert_eq!(
        t.price_per_part("999999999999", None).price_per_part_milli,
        500
    );
}

#[test]
fn tariff_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Tariff>();
    assert_send_sync::<TariffError>();
}

proptest! {
    #[test]
    fn normalise_and_quote_never_panic(number in any::<String>(), text in any::<String>(), kind in "(SMS:(TEXT|BINARY|WAPPUSH)(:[A-Z0-9]{0,8})?)?", at in any::<i64>()) {
        let t = tariff(BASE);
        if let Ok(n) = t.normalise(&number) {
            prop_assert!((1..=15).contains(&n.len()));
            prop_assert!(n.bytes().all(|b| b.is_ascii_digit()) && !n.starts_with('0'));
        }
        let q = t.quote(&QuoteRequest { recipient: &number, text: &text, message_type: &kind, class: Some("wholesale"), at_unix_ms: at });
        if let Ok(q) = q {
            prop_assert!(q.parts >= 1 && q.parts <= 10);
            prop_assert_eq!(q.total_milli, q.price_per_part_milli * i64::from(q.parts));
        }
    }

    #[test]
    fn normalised_numbers_are_fixed_points(digits in "[1-9][0-9]{0,14}") {
        let t = tariff(BASE);
        prop_assert_eq!(t.normalise(&digits).unwrap(), digits.clone());
        prop_assert_eq!(t.normalise(&format!("+{digits}")).unwrap(), digits.clone());
        prop_assert_eq!(t.normalise(&format!("00{digits}")).unwrap(), digits);
    }

    #[test]
    fn fast_price_rounds_up_to_the_step(price in 0i64..=PRICE_MAX_MILLI, multiplier in 1i64..=5000, credit in any::<bool>()) {
        let yaml = format!(
            "default_price: 1\nfast_multiplier: {}\nfast_rounding: {}\n",
            format_credits(multiplier),
            if credit { "up_to_credit" } else { "up_to_milli" }
        );
        let t = tariff(&yaml);
        let exact = i128::from(price) * i128::from(multiplier); // millionths
        let got = i128::from(t.fast_price(price)) * 1000;
        let step = if credit { 1_000_000 } else { 1_000 };
        prop_assert!(got >= exact && got < exact + step);
        prop_assert_eq!(got % step, 0);
    }
}
