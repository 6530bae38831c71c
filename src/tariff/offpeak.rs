//! Off-peak windows (SPEC 3.2): the `offpeak:` section of
//! `conf/tariffs.yaml` (a time zone and weekly windows in its wall-clock
//! time, validated into [`OffPeak`]) and the test whether an instant falls
//! inside one, which [`super::Tariff::bucket_preference`] asks. Pure: the
//! caller passes the time.

use super::file::Validator;
use super::TariffError;
use chrono_tz::Tz;
use serde::Deserialize;

#[derive(Debug)]
pub(super) struct OffPeak {
    pub(super) timezone: Tz,
    pub(super) windows: Vec<OffPeakWindow>,
}

/// One off-peak window in local wall-clock time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OffPeakWindow {
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
    pub(super) fn contains(&self, weekday: u32, second: u32) -> bool {
        let opens_on = |day: u32| self.days & (1 << day) != 0;
        if self.from_s < self.to_s {
            opens_on(weekday) && (self.from_s..self.to_s).contains(&second)
        } else {
            (opens_on(weekday) && second >= self.from_s)
                || (opens_on((weekday + 6) % 7) && second < self.to_s)
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OffPeakFile {
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

impl Validator<'_> {
    pub(super) fn offpeak(&self, file: &OffPeakFile) -> Result<OffPeak, TariffError> {
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

/// `mon`/`monday` … (any case) → 0 = Monday … 6 = Sunday.
pub(super) fn weekday_index(day: &str) -> Option<u32> {
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
pub(super) fn parse_clock(text: &str, allow_24: bool) -> Option<u32> {
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
