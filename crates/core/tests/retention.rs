//! Retention plans as snapshot tests: synthetic snapshot dates (daily
//! backups across a daylight-saving change, a leap day, several years) and
//! the plan `forget` makes for them, compared as text — which snapshot is
//! kept by which rule. Times are UTC, as snapshots store them.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use chrono::{DateTime, Duration, TimeZone, Utc};
use vbackup_core::format::lifecycle::{CalendarSpan, GroupBy, KeepRules};
use vbackup_core::format::{BackupStats, SnapshotManifest};
use vbackup_core::{plan, render_plan, Snapshot};

fn snap(n: usize, time: DateTime<Utc>, vm: &str, host: &str, tags: &[&str]) -> Snapshot {
    Snapshot {
        id: format!("{n:04}{}", "ab".repeat(30)),
        manifest: SnapshotManifest {
            version: 1,
            vm: vm.to_string(),
            host: host.to_string(),
            time: time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            disks: vec![],
            stats: BackupStats::default(),
            program_version: "test".to_string(),
            ..SnapshotManifest::default()
        },
    }
}

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
}

fn rules(f: impl FnOnce(&mut KeepRules)) -> KeepRules {
    let mut keep = KeepRules::default();
    f(&mut keep);
    keep
}

fn rendered(snapshots: &[Snapshot], keep: &KeepRules, group_by: &str) -> String {
    render_plan(&plan(snapshots, keep, group_by.parse::<GroupBy>().unwrap()).unwrap())
}

/// A backup every day at 01:30 Berlin time, 2026-03-25 to 2026-04-01.
/// Berlin leaves UTC+1 for UTC+2 at 02:00 on 2026-03-29, so the backups
/// run at 00:30 UTC up to the 29th and at 23:30 UTC the day before from the
/// 30th: eight local days map to seven UTC days, and the UTC day 2026-03-29
/// holds two backups (those of the local 29th and 30th). Daily buckets are
/// UTC days, so only the later of the two is kept as that day's.
fn berlin_daily_across_dst() -> Vec<Snapshot> {
    (0..8)
        .map(|i| {
            let local_day = utc(2026, 3, 25, 0, 0) + Duration::days(i);
            let offset = if local_day >= utc(2026, 3, 30, 0, 0) {
                2
            } else {
                1
            };
            let time = local_day + Duration::minutes(90) - Duration::hours(offset);
            snap(i as usize, time, "web1", "kvm-1", &[])
        })
        .collect()
}

#[test]
fn daily_buckets_are_utc_days_across_a_dst_change() {
    let snapshots = berlin_daily_across_dst();
    let keep = rules(|k| {
        k.daily = Some(5);
        k.last = Some(2);
    });
    assert_plan(
        &rendered(&snapshots, &keep, "vm"),
        r#"
vm=web1: keep 5, remove 3
  keep    2026-03-31 23:30:00  0007abab  last, daily
  keep    2026-03-30 23:30:00  0006abab  last, daily
  keep    2026-03-29 23:30:00  0005abab  daily
  remove  2026-03-29 00:30:00  0004abab
  keep    2026-03-28 00:30:00  0003abab  daily
  keep    2026-03-27 00:30:00  0002abab  daily
  remove  2026-03-26 00:30:00  0001abab
  remove  2026-03-25 00:30:00  0000abab
"#,
    );
}

/// Every 12 hours from 2024-02-26 (a Monday) to 2024-03-06: the ISO weeks
/// 9 and 10 of the leap year 2024, with its 29 February.
fn around_leap_day() -> Vec<Snapshot> {
    (0..20)
        .map(|i| {
            snap(
                i,
                utc(2024, 2, 26, 3, 0) + Duration::hours(12 * i as i64),
                "db",
                "kvm-2",
                &[],
            )
        })
        .collect()
}

#[test]
fn the_leap_day_is_a_day_of_its_own_and_february_a_month() {
    let snapshots = around_leap_day();
    let keep = rules(|k| {
        k.hourly = Some(3);
        k.daily = Some(4);
        k.weekly = Some(2);
        k.monthly = Some(3);
    });
    assert_plan(
        &rendered(&snapshots, &keep, "vm"),
        r#"
vm=db: keep 6, remove 14
  keep    2024-03-06 15:00:00  0019abab  hourly, daily, weekly, monthly
  keep    2024-03-06 03:00:00  0018abab  hourly
  keep    2024-03-05 15:00:00  0017abab  hourly, daily
  remove  2024-03-05 03:00:00  0016abab
  keep    2024-03-04 15:00:00  0015abab  daily
  remove  2024-03-04 03:00:00  0014abab
  keep    2024-03-03 15:00:00  0013abab  daily, weekly
  remove  2024-03-03 03:00:00  0012abab
  remove  2024-03-02 15:00:00  0011abab
  remove  2024-03-02 03:00:00  0010abab
  remove  2024-03-01 15:00:00  0009abab
  remove  2024-03-01 03:00:00  0008abab
  keep    2024-02-29 15:00:00  0007abab  monthly
  remove  2024-02-29 03:00:00  0006abab
  remove  2024-02-28 15:00:00  0005abab
  remove  2024-02-28 03:00:00  0004abab
  remove  2024-02-27 15:00:00  0003abab
  remove  2024-02-27 03:00:00  0002abab
  remove  2024-02-26 15:00:00  0001abab
  remove  2024-02-26 03:00:00  0000abab
"#,
    );
}

/// The first of every month at 02:00 for three years, plus a backup on
/// 2024-02-29 tagged `pre-upgrade`.
fn three_years_monthly() -> Vec<Snapshot> {
    let mut snapshots: Vec<Snapshot> = (0..36)
        .map(|i| {
            let (y, m) = (2023 + i / 12, 1 + (i % 12) as u32);
            snap(i as usize, utc(y, m, 1, 2, 0), "mail", "kvm-1", &[])
        })
        .collect();
    snapshots.push(snap(
        99,
        utc(2024, 2, 29, 12, 0),
        "mail",
        "kvm-1",
        &["pre-upgrade"],
    ));
    snapshots
}

#[test]
fn yearly_monthly_within_and_tags_combine() {
    let snapshots = three_years_monthly();
    let keep = rules(|k| {
        k.monthly = Some(4);
        k.yearly = Some(2);
        k.within = Some("2m".parse::<CalendarSpan>().unwrap());
        k.tags = vec!["pre-upgrade".to_string()];
    });
    assert_plan(
        &rendered(&snapshots, &keep, "vm"),
        r#"
vm=mail: keep 6, remove 31
  keep    2025-12-01 02:00:00  0035abab  monthly, yearly, within 2m
  keep    2025-11-01 02:00:00  0034abab  monthly, within 2m
  keep    2025-10-01 02:00:00  0033abab  monthly, within 2m
  keep    2025-09-01 02:00:00  0032abab  monthly
  remove  2025-08-01 02:00:00  0031abab
  remove  2025-07-01 02:00:00  0030abab
  remove  2025-06-01 02:00:00  0029abab
  remove  2025-05-01 02:00:00  0028abab
  remove  2025-04-01 02:00:00  0027abab
  remove  2025-03-01 02:00:00  0026abab
  remove  2025-02-01 02:00:00  0025abab
  remove  2025-01-01 02:00:00  0024abab
  keep    2024-12-01 02:00:00  0023abab  yearly
  remove  2024-11-01 02:00:00  0022abab
  remove  2024-10-01 02:00:00  0021abab
  remove  2024-09-01 02:00:00  0020abab
  remove  2024-08-01 02:00:00  0019abab
  remove  2024-07-01 02:00:00  0018abab
  remove  2024-06-01 02:00:00  0017abab
  remove  2024-05-01 02:00:00  0016abab
  remove  2024-04-01 02:00:00  0015abab
  remove  2024-03-01 02:00:00  0014abab
  keep    2024-02-29 12:00:00  0099abab  tag pre-upgrade
  remove  2024-02-01 02:00:00  0013abab
  remove  2024-01-01 02:00:00  0012abab
  remove  2023-12-01 02:00:00  0011abab
  remove  2023-11-01 02:00:00  0010abab
  remove  2023-10-01 02:00:00  0009abab
  remove  2023-09-01 02:00:00  0008abab
  remove  2023-08-01 02:00:00  0007abab
  remove  2023-07-01 02:00:00  0006abab
  remove  2023-06-01 02:00:00  0005abab
  remove  2023-05-01 02:00:00  0004abab
  remove  2023-04-01 02:00:00  0003abab
  remove  2023-03-01 02:00:00  0002abab
  remove  2023-02-01 02:00:00  0001abab
  remove  2023-01-01 02:00:00  0000abab
"#,
    );
}

/// Two VMs on two hosts, the same VM name on both hosts.
fn two_hosts() -> Vec<Snapshot> {
    let mut snapshots = Vec::new();
    for (n, (host, vm)) in [("kvm-1", "web"), ("kvm-2", "web"), ("kvm-1", "db")]
        .iter()
        .enumerate()
    {
        for day in 0..3 {
            let tags: &[&str] = if day == 0 { &["weekly"] } else { &[] };
            let time = utc(2025, 12, 29 + day as u32, n as u32, 0);
            snapshots.push(snap(n * 10 + day, time, vm, host, tags));
        }
    }
    snapshots
}

#[test]
fn grouping_by_host_and_vm_or_tags() {
    let snapshots = two_hosts();
    let keep = rules(|k| k.last = Some(1));
    let mut out = rendered(&snapshots, &keep, "vm");
    out += &rendered(&snapshots, &keep, "host,vm");
    out += &rendered(&snapshots, &keep, "tags");
    out += &rendered(&snapshots, &keep, "");
    assert_plan(
        &out,
        r#"
vm=db: keep 1, remove 2
  keep    2025-12-31 02:00:00  0022abab  last
  remove  2025-12-30 02:00:00  0021abab
  remove  2025-12-29 02:00:00  0020abab
vm=web: keep 1, remove 5
  keep    2025-12-31 01:00:00  0012abab  last
  remove  2025-12-31 00:00:00  0002abab
  remove  2025-12-30 01:00:00  0011abab
  remove  2025-12-30 00:00:00  0001abab
  remove  2025-12-29 01:00:00  0010abab
  remove  2025-12-29 00:00:00  0000abab
host=kvm-1 vm=db: keep 1, remove 2
  keep    2025-12-31 02:00:00  0022abab  last
  remove  2025-12-30 02:00:00  0021abab
  remove  2025-12-29 02:00:00  0020abab
host=kvm-1 vm=web: keep 1, remove 2
  keep    2025-12-31 00:00:00  0002abab  last
  remove  2025-12-30 00:00:00  0001abab
  remove  2025-12-29 00:00:00  0000abab
host=kvm-2 vm=web: keep 1, remove 2
  keep    2025-12-31 01:00:00  0012abab  last
  remove  2025-12-30 01:00:00  0011abab
  remove  2025-12-29 01:00:00  0010abab
tags=: keep 1, remove 5
  keep    2025-12-31 02:00:00  0022abab  last
  remove  2025-12-31 01:00:00  0012abab
  remove  2025-12-31 00:00:00  0002abab
  remove  2025-12-30 02:00:00  0021abab
  remove  2025-12-30 01:00:00  0011abab
  remove  2025-12-30 00:00:00  0001abab
tags=weekly: keep 1, remove 2
  keep    2025-12-29 02:00:00  0020abab  last
  remove  2025-12-29 01:00:00  0010abab
  remove  2025-12-29 00:00:00  0000abab
all: keep 1, remove 8
  keep    2025-12-31 02:00:00  0022abab  last
  remove  2025-12-31 01:00:00  0012abab
  remove  2025-12-31 00:00:00  0002abab
  remove  2025-12-30 02:00:00  0021abab
  remove  2025-12-30 01:00:00  0011abab
  remove  2025-12-30 00:00:00  0001abab
  remove  2025-12-29 02:00:00  0020abab
  remove  2025-12-29 01:00:00  0010abab
  remove  2025-12-29 00:00:00  0000abab
"#,
    );
}

#[test]
fn rules_that_keep_nothing_are_refused() {
    let snapshots = berlin_daily_across_dst();
    for keep in [KeepRules::default(), rules(|k| k.daily = Some(0))] {
        let err = plan(&snapshots, &keep, GroupBy::default()).unwrap_err();
        assert!(
            err.to_string().contains("would remove every snapshot"),
            "{err}"
        );
    }
}

/// Compares a plan with the expected text (which starts with a newline so
/// it can begin on its own line).
fn assert_plan(actual: &str, expected: &str) {
    let expected = expected.strip_prefix('\n').unwrap_or(expected);
    if actual != expected {
        panic!("plan differs.\n--- expected\n{expected}--- actual\n{actual}");
    }
}
