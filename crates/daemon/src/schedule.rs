//! When jobs run: calendar expressions, systemd-like or cron.
//!
//! Accepted, as in the configuration file's `schedule = "..."`:
//!
//! - shortcuts: `minutely`, `hourly`, `daily`, `weekly` (Monday 00:00),
//!   `monthly`, `yearly`;
//! - systemd-like events `[WEEKDAYS] [TIME]`: `daily 02:30`, `Mon..Fri 22:00`,
//!   `Sat,Sun 03:15`, `*:0/15` (every 15 minutes), `hourly`, `02:00`,
//!   `*:*:0/10` (every 10 seconds, for tests); a component is `*`, a number,
//!   a list `a,b`, a range `a..b` and/or a step `/n`;
//! - cron expressions of 5 to 7 fields (`30 2 * * *`, `0 */6 * * *`).
//!
//! The evaluation (month lengths, weekdays, daylight-saving changes in the
//! host's time zone) is the maintained `croner` crate's: systemd-like
//! events are translated into its patterns, which keeps our own part to a
//! small, fully tested translation.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Local, Utc};
use croner::Cron;

/// A parsed calendar expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// The expression as written.
    text: String,
    /// Its cron pattern (seconds first).
    cron: Cron,
}

impl Schedule {
    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first scheduled time strictly after `time` (in the host's time
    /// zone), or `None` when the expression never matches again.
    pub fn next_after(&self, time: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = time.with_timezone(&Local);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The last scheduled time at or before `time`, if any: a daemon that
    /// was down (or a host that slept) over several scheduled times catches
    /// up once, for the newest of them.
    pub fn latest_at_or_before(&self, time: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = time.with_timezone(&Local);
        self.cron
            .find_previous_occurrence(&local, true)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Schedule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let pattern = to_cron(text.trim())?;
        let cron = Cron::from_str(&pattern)
            .map_err(|e| format!("schedule '{text}': {e} (as the cron pattern '{pattern}')"))?;
        Ok(Self {
            text: text.trim().to_string(),
            cron,
        })
    }
}

impl<'de> serde::Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Schedule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

/// The cron pattern (six fields: seconds first) of `text`.
fn to_cron(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("the schedule is empty".into());
    }
    if let Some(pattern) = shortcut(text) {
        return Ok(pattern.to_string());
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() >= 5 && words.iter().all(|w| is_cron_field(w)) {
        return Ok(text.to_string());
    }
    systemd_event(text, &words)
}

/// The pattern of a shortcut name.
fn shortcut(text: &str) -> Option<&'static str> {
    Some(match text.to_ascii_lowercase().as_str() {
        "minutely" => "0 * * * * *",
        "hourly" => "0 0 * * * *",
        "daily" => "0 0 0 * * *",
        "weekly" => "0 0 0 * * 1",
        "monthly" => "0 0 0 1 * *",
        "yearly" | "annually" => "0 0 0 1 1 *",
        _ => return None,
    })
}

/// Whether `word` can be a cron field (digits, `*`, `,-/`, names, `L#W?`).
fn is_cron_field(word: &str) -> bool {
    word.chars()
        .all(|c| c.is_ascii_alphanumeric() || "*,-/#?".contains(c))
        && !word.contains(':')
}

/// Translates a systemd-like event: optional weekdays, an optional
/// `daily`/`weekly`-style word, and an optional time.
fn systemd_event(text: &str, words: &[&str]) -> Result<String, String> {
    let invalid = |why: &str| format!("schedule '{text}': {why}");
    let mut weekdays = "*".to_string();
    let mut time = None;
    for word in words {
        if word.contains(':') {
            if time.is_some() {
                return Err(invalid("two times of day"));
            }
            time = Some(*word);
        } else if let Some(days) = weekday_list(word) {
            weekdays = days;
        } else if !matches!(
            word.to_ascii_lowercase().as_str(),
            "daily" | "every" | "day"
        ) {
            return Err(invalid(&format!(
                "'{word}' is neither a weekday (Mon..Sun), a time (HH:MM) nor a shortcut (hourly, daily, weekly, monthly); a cron expression has 5 fields"
            )));
        }
    }
    let (hours, minutes, seconds) = match time {
        Some(time) => time_fields(time).map_err(|why| invalid(&why))?,
        None => ("0".into(), "0".into(), "0".into()),
    };
    Ok(format!("{seconds} {minutes} {hours} * * {weekdays}"))
}

/// `Mon..Fri`, `Sat,Sun`, `mon` as a cron weekday field (0 = Sunday).
fn weekday_list(word: &str) -> Option<String> {
    let parts: Option<Vec<String>> = word
        .split(',')
        .map(|part| match part.split_once("..") {
            Some((a, b)) => Some(format!("{}-{}", weekday(a)?, weekday(b)?)),
            None => weekday(part).map(|d| d.to_string()),
        })
        .collect();
    parts.map(|p| p.join(","))
}

/// The cron number of a weekday name (three letters or more of it; 0 =
/// Sunday).
fn weekday(name: &str) -> Option<u8> {
    const DAYS: [&str; 7] = [
        "sunday",
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
    ];
    let lower = name.to_ascii_lowercase();
    if lower.len() < 3 {
        return None;
    }
    DAYS.iter()
        .position(|day| day.starts_with(&lower))
        .and_then(|i| u8::try_from(i).ok())
}

/// `HH:MM` or `HH:MM:SS` as cron hour, minute and second fields.
fn time_fields(time: &str) -> Result<(String, String, String), String> {
    let parts: Vec<&str> = time.split(':').collect();
    let (h, m, s) = match parts.as_slice() {
        [h, m] => (*h, *m, "0"),
        [h, m, s] => (*h, *m, *s),
        _ => return Err(format!("'{time}' is not a time of day (HH:MM or HH:MM:SS)")),
    };
    Ok((
        component(h, 23, "hour")?,
        component(m, 59, "minute")?,
        component(s, 59, "second")?,
    ))
}

/// One time component (`*`, `5`, `1,3`, `8..18`, `0/15`, `*/10`) as a cron
/// field whose values are at most `max`.
fn component(text: &str, max: u8, what: &str) -> Result<String, String> {
    let bad = || format!("'{text}' is not a valid {what} (0..{max}, *, a,b, a..b or /step)");
    let parts: Result<Vec<String>, String> = text
        .split(',')
        .map(|part| {
            let (range, step) = match part.split_once('/') {
                Some((range, step)) => (range, Some(number(step, max).ok_or_else(bad)?)),
                None => (part, None),
            };
            let range = match range {
                "*" => "*".to_string(),
                r => match r.split_once("..") {
                    Some((a, b)) => {
                        let (a, b) = (
                            number(a, max).ok_or_else(bad)?,
                            number(b, max).ok_or_else(bad)?,
                        );
                        if a > b {
                            return Err(bad());
                        }
                        format!("{a}-{b}")
                    }
                    // "0/15" starts at 0 and repeats to the end.
                    None => match (number(r, max), step) {
                        (Some(a), Some(_)) => format!("{a}-{max}"),
                        (Some(a), None) => a.to_string(),
                        (None, _) => return Err(bad()),
                    },
                },
            };
            Ok(match step {
                Some(0) => return Err(bad()),
                Some(step) => format!("{range}/{step}"),
                None => range,
            })
        })
        .collect();
    Ok(parts?.join(","))
}

/// A number from 0 to `max`.
fn number(text: &str, max: u8) -> Option<u8> {
    text.parse::<u8>().ok().filter(|n| *n <= max)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use chrono::{Datelike, TimeZone, Timelike, Weekday};

    /// A local wall-clock time, as UTC.
    fn local(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Local
            .with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .unwrap()
            .with_timezone(&Utc)
    }

    fn next_local(schedule: &str, after: DateTime<Utc>) -> DateTime<Local> {
        let s: Schedule = schedule.parse().unwrap();
        s.next_after(after).unwrap().with_timezone(&Local)
    }

    #[test]
    fn every_documented_kind_translates_to_the_cron_pattern_it_means() {
        for (text, pattern) in [
            ("hourly", "0 0 * * * *"),
            ("daily", "0 0 0 * * *"),
            ("weekly", "0 0 0 * * 1"),
            ("daily 02:30", "0 30 2 * * *"),
            ("Mon..Fri 22:00", "0 0 22 * * 1-5"),
            ("Sat,Sun 03:15", "0 15 3 * * 6,0"),
            ("*:0/15", "0 0-59/15 * * * *"),
            ("*:*:0/10", "0-59/10 * * * * *"),
            ("02:00", "0 0 2 * * *"),
            ("8..18:00", "0 0 8-18 * * *"),
            ("30 2 * * *", "30 2 * * *"),
            ("0 */6 * * *", "0 */6 * * *"),
        ] {
            assert_eq!(to_cron(text).unwrap(), pattern, "{text}");
            text.parse::<Schedule>().unwrap();
        }
    }

    #[test]
    fn next_runs_fall_where_the_expression_says() {
        // 2026-12-01 is a Tuesday.
        let now = local(2026, 12, 1, 10, 7);
        let hourly = next_local("hourly", now);
        assert_eq!((hourly.hour(), hourly.minute()), (11, 0));
        let daily = next_local("daily 02:30", now);
        assert_eq!((daily.day(), daily.hour(), daily.minute()), (2, 2, 30));
        let weekday = next_local("Mon..Fri 22:00", local(2026, 12, 4, 23, 0));
        assert_eq!((weekday.weekday(), weekday.hour()), (Weekday::Mon, 22));
        let quarter = next_local("*:0/15", now);
        assert_eq!(quarter.minute(), 15);
        let cron = next_local("30 2 * * *", now);
        assert_eq!((cron.hour(), cron.minute()), (2, 30));
        let weekly = next_local("weekly", now);
        assert_eq!((weekly.weekday(), weekly.hour()), (Weekday::Mon, 0));
    }

    #[test]
    fn the_latest_missed_time_is_the_one_caught_up() {
        let s: Schedule = "hourly".parse().unwrap();
        let latest = s.latest_at_or_before(local(2026, 12, 1, 18, 20)).unwrap();
        assert_eq!(latest, local(2026, 12, 1, 18, 0));
        let exact = s.latest_at_or_before(local(2026, 12, 1, 18, 0)).unwrap();
        assert_eq!(exact, local(2026, 12, 1, 18, 0));
    }

    #[test]
    fn typos_are_refused_with_what_is_accepted() {
        for (bad, why) in [
            ("dialy", "neither a weekday"),
            ("daily 25:00", "not a valid hour"),
            ("*:0/0", "not a valid minute"),
            ("Mon..Fri 22:00 23:00", "two times"),
            ("", "empty"),
            ("12:3:4:5", "not a time of day"),
            ("5..3:00", "not a valid hour"),
            ("61 * * * *", "cron pattern"),
        ] {
            let error = bad.parse::<Schedule>().unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }
}
