//! The `type` of a VM's scheduled backups: one type, or a pattern.
//!
//! ```toml
//! type = "auto"                                    # or full, incremental, differential
//! type = { full = "Sun", differential = "daily" }  # a pattern
//! ```
//!
//! A pattern makes the first run of each `full` period a full backup, the
//! first run of each `differential` period (that is not full) a
//! differential, and every other run an incremental. A period is `daily`,
//! `weekly` (from Monday), `monthly`, or weekdays (`Sun`, `Sat,Sun`,
//! `Mon..Fri`: each such day is a period). "First run" means: no
//! successful run of that type (or a fuller one) since the period began,
//! in the host's time zone, so a failed full is tried again at the next run
//! and a missed Sunday is not made up on Monday.

use chrono::{DateTime, Datelike, Local, NaiveTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use vbackup_vm::Requested;

/// The `type` setting.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "a backup type (auto, full, incremental, differential) or a pattern like { full = \"Sun\", differential = \"daily\" }"
)]
pub enum BackupTypeSetting {
    /// Always this type.
    Fixed(FixedType),
    /// Full and differential by period, incremental otherwise.
    Pattern(TypePattern),
}

impl Default for BackupTypeSetting {
    fn default() -> Self {
        BackupTypeSetting::Fixed(FixedType::Auto)
    }
}

/// One backup type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FixedType {
    /// Incremental when a valid base exists, else full.
    Auto,
    /// Always full.
    Full,
    /// Changes since the previous snapshot.
    Incremental,
    /// Changes since the last full.
    Differential,
}

impl From<FixedType> for Requested {
    fn from(kind: FixedType) -> Self {
        match kind {
            FixedType::Auto => Requested::Auto,
            FixedType::Full => Requested::Full,
            FixedType::Incremental => Requested::Incremental,
            FixedType::Differential => Requested::Differential,
        }
    }
}

/// `{ full = PERIOD, differential = PERIOD }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TypePattern {
    /// When the first run is a full backup.
    #[serde(default)]
    pub full: Option<Period>,
    /// When the first run is a differential.
    #[serde(default)]
    pub differential: Option<Period>,
}

/// A period of a type pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Period {
    /// Each day.
    Daily,
    /// Each week, from Monday.
    Weekly,
    /// Each month, from the 1st.
    Monthly,
    /// Each of these weekdays (0 = Sunday).
    Weekdays(Vec<u32>),
}

impl std::str::FromStr for Period {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "daily" => return Ok(Period::Daily),
            "weekly" => return Ok(Period::Weekly),
            "monthly" => return Ok(Period::Monthly),
            _ => {}
        }
        let mut days = Vec::new();
        for part in text.split(',') {
            match part.split_once("..") {
                Some((a, b)) => {
                    let (a, b) = (weekday(a, text)?, weekday(b, text)?);
                    let mut d = a;
                    loop {
                        days.push(d);
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
                None => days.push(weekday(part, text)?),
            }
        }
        Ok(Period::Weekdays(days))
    }
}

/// The number of a weekday name (0 = Sunday).
fn weekday(name: &str, whole: &str) -> Result<u32, String> {
    const DAYS: [&str; 7] = [
        "sunday",
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
    ];
    let lower = name.trim().to_ascii_lowercase();
    DAYS.iter()
        .position(|day| lower.len() >= 3 && day.starts_with(&lower))
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| {
            format!("'{whole}' is not a period: daily, weekly, monthly or weekdays like Sun or Mon..Fri")
        })
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Period {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        const NAMES: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
        let text = match self {
            Period::Daily => "daily".to_string(),
            Period::Weekly => "weekly".to_string(),
            Period::Monthly => "monthly".to_string(),
            Period::Weekdays(days) => days
                .iter()
                .filter_map(|d| NAMES.get(*d as usize).copied())
                .collect::<Vec<_>>()
                .join(","),
        };
        serializer.serialize_str(&text)
    }
}

impl Period {
    /// When the period holding `now` began, in the host's time zone; `None`
    /// when `now` is in no period (a weekday not listed).
    pub fn start(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = now.with_timezone(&Local);
        let date = local.date_naive();
        let day = match self {
            Period::Daily => date,
            Period::Weekly => {
                date - chrono::Days::new(u64::from(date.weekday().num_days_from_monday()))
            }
            Period::Monthly => date.with_day(1)?,
            Period::Weekdays(days) => {
                if !days.contains(&date.weekday().num_days_from_sunday()) {
                    return None;
                }
                date
            }
        };
        Local
            .from_local_datetime(&day.and_time(NaiveTime::MIN))
            .earliest()
            .map(|t| t.with_timezone(&Utc))
    }
}

impl BackupTypeSetting {
    /// The type of a run starting at `now`, given when the job's newest
    /// successful full and full-or-differential runs started.
    pub fn requested(
        &self,
        now: DateTime<Utc>,
        last_full: Option<DateTime<Utc>>,
        last_full_or_differential: Option<DateTime<Utc>>,
    ) -> Requested {
        let pattern = match self {
            BackupTypeSetting::Fixed(kind) => return (*kind).into(),
            BackupTypeSetting::Pattern(pattern) => pattern,
        };
        let due = |period: &Option<Period>, last: Option<DateTime<Utc>>| {
            period
                .as_ref()
                .and_then(|p| p.start(now))
                .is_some_and(|start| last.is_none_or(|t| t < start))
        };
        if due(&pattern.full, last_full) {
            Requested::Full
        } else if due(&pattern.differential, last_full_or_differential) {
            Requested::Differential
        } else {
            Requested::Incremental
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn local(d: u32, h: u32) -> DateTime<Utc> {
        // 2026-11-29 is a Sunday.
        Local
            .with_ymd_and_hms(2026, 11, d, h, 0, 0)
            .single()
            .unwrap()
            .with_timezone(&Utc)
    }

    fn pattern(text: &str) -> BackupTypeSetting {
        #[derive(Deserialize)]
        struct T {
            #[serde(rename = "type")]
            t: BackupTypeSetting,
        }
        toml::from_str::<T>(&format!("type = {text}")).unwrap().t
    }

    #[test]
    fn full_on_sunday_differential_daily_incremental_otherwise() {
        let t = pattern(r#"{ full = "Sun", differential = "daily" }"#);
        // Sunday: the first run is full, the next ones incremental.
        assert_eq!(t.requested(local(29, 1), None, None), Requested::Full);
        let full = Some(local(29, 1));
        assert_eq!(
            t.requested(local(29, 2), full, full),
            Requested::Incremental
        );
        // Monday: the first run is differential, then incremental.
        assert_eq!(
            t.requested(local(30, 1), full, full),
            Requested::Differential
        );
        let diff = Some(local(30, 1));
        assert_eq!(
            t.requested(local(30, 9), full, diff),
            Requested::Incremental
        );
        // A failed Sunday full is not made up on Monday: differential.
        assert_eq!(
            t.requested(local(30, 1), Some(local(22, 1)), Some(local(28, 1))),
            Requested::Differential
        );
    }

    #[test]
    fn periods_and_fixed_types_parse_and_bad_ones_are_named() {
        assert_eq!(
            pattern("\"auto\""),
            BackupTypeSetting::Fixed(FixedType::Auto)
        );
        assert_eq!(
            pattern("\"full\""),
            BackupTypeSetting::Fixed(FixedType::Full)
        );
        let weekly = pattern(r#"{ full = "weekly" }"#);
        assert_eq!(
            weekly.requested(local(30, 3), Some(local(29, 3)), None),
            Requested::Full
        );
        assert_eq!(
            weekly.requested(local(30, 3), Some(local(30, 1)), None),
            Requested::Incremental
        );
        assert_eq!(
            "Mon..Fri".parse::<Period>().unwrap(),
            Period::Weekdays(vec![1, 2, 3, 4, 5])
        );
        assert_eq!(
            "Fri..Mon".parse::<Period>().unwrap(),
            Period::Weekdays(vec![5, 6, 0, 1])
        );
        assert!("fortnightly".parse::<Period>().is_err());
        assert!(Period::Monthly.start(local(30, 3)).unwrap() <= local(30, 3));
    }
}
