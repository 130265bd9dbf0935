//! The scheduler on a simulated clock, with real backups of real qcow2
//! images into a real repository: on-time runs, missed runs caught up
//! once across a restart, a clock jump, conflicts on one VM, retries of a
//! failing source, and a prune applying a VM's retention.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Local, TimeZone, Utc};
use vbackup_core::InitOptions;
use vbackup_daemon::config::Config;
use vbackup_daemon::history::{RunFilter, Status};
use vbackup_daemon::scheduler::{Daemon, ManualClock};
use vbackup_open::{Purpose, RepositoryOptions};
use vbackup_testkit::util::{s, tool};

/// A local wall-clock time on 2026-12-DAY, as UTC.
fn local(day: u32, hour: u32, minute: u32) -> DateTime<Utc> {
    Local
        .with_ymd_and_hms(2026, 12, day, hour, minute, 0)
        .single()
        .unwrap()
        .with_timezone(&Utc)
}

/// A folder with a repository, its passphrase file, a qcow2 image with
/// data, and a configuration file using them.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(extra: &str) -> Self {
        let setup = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        let pw = setup.path("pw");
        std::fs::write(&pw, "daemon test\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let image = setup.path("web1.qcow2");
        tool(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", s(&image), "8M"],
        );
        tool(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 7 0 1M", s(&image)],
        );
        let options = RepositoryOptions {
            cache_dir: Some(setup.path("state/cache")),
            ..RepositoryOptions::new(s(&setup.path("repo")))
        };
        let init = InitOptions {
            kdf: vbackup_core::crypto::kdf::KdfParams {
                memory_kib: 1024,
                iterations: 1,
                parallelism: 1,
            },
            ..InitOptions::default()
        };
        vbackup_open::init(&options, Some("daemon test"), &init).unwrap();
        std::fs::write(
            setup.path("vbackup.toml"),
            format!(
                r#"
[daemon]
state = "state"
socket = "daemon.sock"
retries = 1
retry-delay = "10m"

[repository.local]
location = "repo"
password-file = "pw"

[vm.web1]
disks = ["web1.qcow2"]
repository = "local"
schedule = "hourly"
keep = {{ last = 2 }}

[prune.local]
schedule = "daily 04:00"
{extra}"#
            ),
        )
        .unwrap();
        setup
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self) -> Config {
        Config::load(&self.path("vbackup.toml")).unwrap()
    }

    fn daemon(&self, clock: &Arc<ManualClock>) -> Daemon {
        Daemon::new(self.config(), clock.clone()).unwrap()
    }

    /// The snapshots of the repository.
    fn snapshots(&self) -> usize {
        let config = self.config();
        let repo = vbackup_daemon::jobs::open_repository(&config, "local", Purpose::Use).unwrap();
        repo.list_snapshots().unwrap().len()
    }
}

fn runs(daemon: &Daemon, job: &str) -> Vec<vbackup_daemon::history::Run> {
    daemon
        .history()
        .runs(&RunFilter {
            job: Some(job.into()),
            ..RunFilter::default()
        })
        .unwrap()
}

#[test]
fn scheduled_runs_happen_on_time_and_missed_ones_are_caught_up_exactly_once() {
    let setup = Setup::new("");
    let clock = Arc::new(ManualClock::new(local(1, 10, 30)));
    let daemon = setup.daemon(&clock);
    assert!(
        daemon.tick().unwrap().started.is_empty(),
        "nothing due before 11:00"
    );

    clock.set(local(1, 11, 0) + chrono::Duration::seconds(5));
    assert_eq!(daemon.tick().unwrap().started.len(), 1);
    daemon.wait_idle().unwrap();
    let first = runs(&daemon, "backup/web1");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].status, Status::Succeeded, "{:?}", first[0]);
    assert_eq!(first[0].trigger, "schedule");
    assert!(first[0].snapshot.is_some());
    assert!(
        daemon.tick().unwrap().started.is_empty(),
        "one run per scheduled time"
    );

    // The daemon is stopped across the runs of 12:00, 13:00 and 14:00.
    drop(daemon);
    clock.set(local(1, 14, 20));
    let daemon = setup.daemon(&clock);
    assert_eq!(daemon.tick().unwrap().started.len(), 1, "one catch-up");
    daemon.wait_idle().unwrap();
    assert!(daemon.tick().unwrap().started.is_empty(), "and only one");
    let caught_up = &runs(&daemon, "backup/web1")[0];
    assert_eq!(caught_up.trigger, "catch-up");
    assert_eq!(caught_up.status, Status::Succeeded, "{caught_up:?}");
    assert_eq!(
        caught_up.scheduled_for.as_deref(),
        Some(
            local(1, 14, 0)
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .as_str()
        )
    );

    // The host sleeps eight hours: one run, not eight.
    clock.set(local(1, 22, 40));
    assert_eq!(daemon.tick().unwrap().started.len(), 1);
    daemon.wait_idle().unwrap();
    assert!(daemon.tick().unwrap().started.is_empty());
    assert_eq!(runs(&daemon, "backup/web1").len(), 3);
    assert_eq!(setup.snapshots(), 3);
}

#[test]
fn two_runs_of_one_vm_never_overlap_and_a_prune_waits_its_turn() {
    let setup = Setup::new("");
    let clock = Arc::new(ManualClock::new(local(2, 9, 30)));
    let daemon = setup.daemon(&clock);
    let first = daemon.run_now("web1").unwrap();
    assert!(first.is_some(), "started at once");
    assert_eq!(
        daemon.run_now("backup/web1").unwrap(),
        None,
        "waits for the first"
    );
    assert_eq!(
        daemon.run_now("prune/local").unwrap(),
        None,
        "waits for the backup"
    );
    daemon.wait_idle().unwrap();
    // The second backup and the prune conflict too: one at a time.
    let started = daemon.tick().unwrap().started;
    assert_eq!(started.len(), 1, "{started:?}");
    daemon.wait_idle().unwrap();
    assert_eq!(daemon.tick().unwrap().started.len(), 1);
    daemon.wait_idle().unwrap();
    assert!(!daemon.busy());
    let backups = runs(&daemon, "backup/web1");
    assert_eq!(backups.len(), 2);
    assert!(
        backups.iter().all(|r| r.status == Status::Succeeded),
        "{backups:?}"
    );
    let prune = &runs(&daemon, "prune/local")[0];
    assert_eq!(prune.status, Status::Succeeded, "{prune:?}");
    // Runs never overlapped: each started after the one before ended.
    let mut all = daemon.history().runs(&RunFilter::default()).unwrap();
    all.reverse();
    for pair in all.windows(2) {
        assert!(
            pair[1].started >= pair[0].ended.clone().unwrap(),
            "{pair:?}"
        );
    }
    assert_eq!(
        daemon.run_now("nope").unwrap_err().to_string(),
        "no job 'nope' in the configuration; the jobs are: backup/web1, prune/local"
    );
}

#[test]
fn a_failing_source_is_retried_then_reported() {
    let setup = Setup::new(
        r#"
[vm.gone]
disks = ["missing.qcow2"]
repository = "local"
"#,
    );
    let clock = Arc::new(ManualClock::new(local(3, 9, 0)));
    let daemon = setup.daemon(&clock);
    daemon.run_now("gone").unwrap().unwrap();
    daemon.wait_idle().unwrap();
    assert!(
        daemon.tick().unwrap().started.is_empty(),
        "the retry waits its delay"
    );
    clock.advance(chrono::Duration::minutes(10));
    assert_eq!(daemon.tick().unwrap().started.len(), 1, "one retry");
    daemon.wait_idle().unwrap();
    clock.advance(chrono::Duration::minutes(45));
    daemon.tick().unwrap();
    daemon.wait_idle().unwrap();
    let gone = runs(&daemon, "backup/gone");
    assert_eq!(gone.len(), 2, "retries = 1: no more");
    assert!(gone.iter().all(|r| r.status == Status::Failed));
    assert_eq!((gone[0].attempt, gone[0].trigger.as_str()), (2, "retry"));
    assert!(
        gone[0].error.as_deref().unwrap().contains("missing.qcow2"),
        "{:?}",
        gone[0].error
    );
}

#[test]
fn the_prune_job_applies_each_vms_retention() {
    let setup = Setup::new("");
    let clock = Arc::new(ManualClock::new(local(4, 1, 0)));
    let daemon = setup.daemon(&clock);
    for _ in 0..4 {
        daemon.run_now("web1").unwrap().unwrap();
        daemon.wait_idle().unwrap();
        clock.advance(chrono::Duration::minutes(1));
    }
    assert_eq!(setup.snapshots(), 4);
    // At 04:00 the hourly backup catches up too; the prune waits for it.
    clock.set(local(4, 4, 0) + chrono::Duration::seconds(1));
    assert_eq!(daemon.tick().unwrap().started.len(), 1);
    daemon.wait_idle().unwrap();
    assert_eq!(setup.snapshots(), 5);
    assert_eq!(daemon.tick().unwrap().started.len(), 1);
    daemon.wait_idle().unwrap();
    let prune = &runs(&daemon, "prune/local")[0];
    assert_eq!(prune.status, Status::Succeeded, "{prune:?}");
    assert!(
        prune
            .summary
            .as_deref()
            .unwrap()
            .contains("forgot 3 snapshot(s)"),
        "{prune:?}"
    );
    assert_eq!(setup.snapshots(), 2, "keep = {{ last = 2 }}");
}

#[test]
fn a_vm_past_its_rpo_is_backed_up_early_once_per_period() {
    let setup = Setup::new(
        r#"
[vm.db]
disks = ["db.qcow2"]
repository = "local"
rpo = "2h"
"#,
    );
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            s(&setup.path("db.qcow2")),
            "4M",
        ],
    );
    let clock = Arc::new(ManualClock::new(local(5, 10, 0)));
    let daemon = setup.daemon(&clock);
    clock.set(local(5, 10, 50));
    assert!(
        !daemon
            .tick()
            .unwrap()
            .started
            .iter()
            .any(|(_, job, _)| job == "backup/db"),
        "within the RPO"
    );
    let status = daemon.status().unwrap();
    let db = status.iter().find(|j| j.name == "backup/db").unwrap();
    assert!(!db.rpo.as_ref().unwrap().breached);

    clock.set(local(5, 12, 1));
    let started = daemon.tick().unwrap().started;
    let early: Vec<_> = started
        .iter()
        .filter(|(_, job, _)| job == "backup/db")
        .collect();
    assert_eq!(early.len(), 1, "{started:?}");
    assert_eq!(early[0].2.as_str(), "rpo");
    daemon.wait_idle().unwrap();
    assert_eq!(runs(&daemon, "backup/db")[0].status, Status::Succeeded);
    let status = daemon.status().unwrap();
    let db = status.iter().find(|j| j.name == "backup/db").unwrap();
    assert!(!db.rpo.as_ref().unwrap().breached, "fresh again");

    clock.set(local(5, 13, 0));
    daemon.tick().unwrap();
    daemon.wait_idle().unwrap();
    assert_eq!(
        runs(&daemon, "backup/db").len(),
        1,
        "not before the next breach"
    );
    clock.set(local(5, 14, 30));
    daemon.tick().unwrap();
    daemon.wait_idle().unwrap();
    assert_eq!(runs(&daemon, "backup/db").len(), 2);
}

#[test]
fn a_type_pattern_makes_the_first_run_of_each_period_full() {
    let setup = Setup::new(
        r#"
[vm.db]
disks = ["db.qcow2"]
repository = "local"
type = { full = "daily" }
"#,
    );
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            s(&setup.path("db.qcow2")),
            "4M",
        ],
    );
    let clock = Arc::new(ManualClock::new(local(6, 9, 0)));
    let daemon = setup.daemon(&clock);
    let mut types = Vec::new();
    for (day, hour) in [(6, 9), (6, 10), (6, 11), (7, 9), (7, 10)] {
        clock.set(local(day, hour, 30));
        daemon.run_now("db").unwrap().unwrap();
        daemon.wait_idle().unwrap();
        let run = runs(&daemon, "backup/db").remove(0);
        assert_eq!(run.status, Status::Succeeded, "{run:?}");
        types.push(run.backup_type.unwrap());
    }
    assert_eq!(
        types,
        ["full", "incremental", "incremental", "full", "incremental"]
    );
}
