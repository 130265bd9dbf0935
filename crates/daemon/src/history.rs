//! The job history and the scheduler's memory, in SQLite.
//!
//! One database, `history.sqlite` in the daemon's state folder (WAL, so a
//! reader such as `vbackup jobs history` never blocks a run being
//! recorded). Its schema version is SQLite's `user_version`; this build
//! writes version 1 and refuses a newer one. Described in
//! `docs/daemon.md`.
//!
//! - `jobs`: per job, when the daemon first saw it and the scheduled time
//!   of the newest run it started for the schedule. The next run is
//!   computed from that, which is what makes missed runs catch up exactly
//!   once after downtime or sleep.
//! - `runs`: every run, from start to end: trigger, attempt, times, VM and
//!   disks, type and fallback reasons, bytes read, new and stored, result,
//!   error and snapshot. A run still `running` when the daemon starts was
//!   cut off by a crash or a kill and is recorded as `interrupted`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = 1;

/// The database's file name inside the state folder.
pub const FILE_NAME: &str = "history.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    first_seen TEXT NOT NULL,
    last_scheduled TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    kind TEXT NOT NULL,
    vm TEXT,
    repository TEXT NOT NULL,
    trigger TEXT NOT NULL,
    scheduled_for TEXT,
    attempt INTEGER NOT NULL,
    started TEXT NOT NULL,
    ended TEXT,
    status TEXT NOT NULL,
    error TEXT,
    summary TEXT,
    snapshot TEXT,
    backup_type TEXT,
    fallback_reasons TEXT,
    disks TEXT,
    bytes_read INTEGER,
    bytes_new INTEGER,
    bytes_stored INTEGER,
    seconds REAL
);
CREATE INDEX IF NOT EXISTS runs_by_job ON runs (job, id);
CREATE INDEX IF NOT EXISTS runs_by_vm ON runs (vm, id);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status);
";

/// How a run ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Still running.
    Running,
    /// Done, and its result recorded (a snapshot, a clean verify).
    Succeeded,
    /// Failed; `error` says why.
    Failed,
    /// Cut off: the daemon was killed or crashed while it ran.
    Interrupted,
    /// Cancelled on request or by its timeout.
    Cancelled,
}

impl Status {
    /// The word stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Interrupted => "interrupted",
            Status::Cancelled => "cancelled",
        }
    }

    fn parse(text: &str) -> Status {
        match text {
            "running" => Status::Running,
            "succeeded" => Status::Succeeded,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            _ => Status::Interrupted,
        }
    }
}

/// What a run is when it starts.
#[derive(Debug, Clone)]
pub struct NewRun<'a> {
    /// The job's name (`backup/web1`, `verify/local`, `prune/local`).
    pub job: &'a str,
    /// `backup`, `verify` or `prune`.
    pub kind: &'a str,
    /// The VM, for backups.
    pub vm: Option<&'a str>,
    /// The repository's name in the configuration file.
    pub repository: &'a str,
    /// Why it runs: `schedule`, `catch-up`, `manual`, `retry`, `rpo`.
    pub trigger: &'a str,
    /// The scheduled time it stands for, if it was scheduled.
    pub scheduled_for: Option<DateTime<Utc>>,
    /// 1 for the first attempt, 2 for the first retry, ...
    pub attempt: u32,
    /// When it started.
    pub started: DateTime<Utc>,
}

/// What a run did, recorded when it ends.
#[derive(Debug, Clone, Default)]
pub struct Finished {
    /// How it ended.
    pub status: Option<Status>,
    /// Why it failed.
    pub error: Option<String>,
    /// What it did, in a line (warnings, what a prune removed).
    pub summary: Option<String>,
    /// The snapshot a backup recorded.
    pub snapshot: Option<String>,
    /// The backup's type (full, incremental, differential).
    pub backup_type: Option<String>,
    /// Why disks were read in full although an incremental was possible.
    pub fallback_reasons: Vec<String>,
    /// The disks backed up.
    pub disks: Vec<String>,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes of new data.
    pub bytes_new: u64,
    /// Bytes stored (compressed, encrypted).
    pub bytes_stored: u64,
}

/// One recorded run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Run {
    /// Its id (cancel and look it up by it).
    pub id: i64,
    /// The job.
    pub job: String,
    /// `backup`, `verify` or `prune`.
    pub kind: String,
    /// The VM, for backups.
    pub vm: Option<String>,
    /// The repository's name.
    pub repository: String,
    /// Why it ran.
    pub trigger: String,
    /// The scheduled time it stood for.
    pub scheduled_for: Option<String>,
    /// Which attempt.
    pub attempt: u32,
    /// Start (RFC 3339, UTC).
    pub started: String,
    /// End, once it ended.
    pub ended: Option<String>,
    /// How it ended.
    pub status: Status,
    /// Why it failed.
    pub error: Option<String>,
    /// What it did, in a line.
    pub summary: Option<String>,
    /// The snapshot a backup recorded.
    pub snapshot: Option<String>,
    /// The backup's type.
    pub backup_type: Option<String>,
    /// Why disks were read in full.
    pub fallback_reasons: Vec<String>,
    /// The disks.
    pub disks: Vec<String>,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes of new data.
    pub bytes_new: u64,
    /// Bytes stored.
    pub bytes_stored: u64,
    /// Wall time, once it ended.
    pub seconds: Option<f64>,
}

impl Run {
    /// Bytes read per second, once it ended.
    pub fn read_speed(&self) -> Option<f64> {
        self.seconds
            .filter(|s| *s > 0.0)
            .map(|s| self.bytes_read as f64 / s)
    }
}

/// Which runs to list.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only this job's.
    pub job: Option<String>,
    /// Only this VM's.
    pub vm: Option<String>,
    /// Only runs with this status.
    pub status: Option<Status>,
    /// At most this many, newest first (0: 100).
    pub limit: usize,
}

/// The scheduler's memory of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    /// When the daemon first saw the job: a new job's first run is its
    /// first scheduled time after this.
    pub first_seen: DateTime<Utc>,
    /// The scheduled time of the newest run started for the schedule.
    pub last_scheduled: Option<DateTime<Utc>>,
}

/// The open database.
pub struct History {
    connection: Mutex<Connection>,
    file: PathBuf,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").field("file", &self.file).finish()
    }
}

impl History {
    /// Opens (or creates) the history in the state folder `dir`, which is
    /// created 0700.
    pub fn open(dir: &Path) -> Result<Self> {
        create_private_dir(dir)?;
        let file = dir.join(FILE_NAME);
        let failed = |e: rusqlite::Error| Error::History {
            file: file.clone(),
            message: e.to_string(),
        };
        let connection = Connection::open(&file).map_err(failed)?;
        connection
            .busy_timeout(std::time::Duration::from_secs(10))
            .map_err(failed)?;
        let version: i64 = connection
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(failed)?;
        if version > SCHEMA_VERSION {
            return Err(Error::History {
                file: file.clone(),
                message: format!(
                    "its schema version is {version}, newer than this vbackup's ({SCHEMA_VERSION}); run the newer vbackup"
                ),
            });
        }
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(failed)?;
        connection.execute_batch(SCHEMA).map_err(failed)?;
        connection
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(failed)?;
        Ok(Self {
            connection: Mutex::new(connection),
            file,
        })
    }

    /// The database file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Runs `work` on the connection, with errors naming the file.
    fn with<T>(&self, work: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let connection = self
            .connection
            .lock()
            .map_err(|_| Error::Invalid("the history's lock was poisoned by a panic".into()))?;
        work(&connection).map_err(|e| Error::History {
            file: self.file.clone(),
            message: e.to_string(),
        })
    }

    /// Records every run still marked running as interrupted, ended at
    /// `now`: at start, those were cut off by a crash or a kill.
    pub fn mark_interrupted(&self, now: DateTime<Utc>) -> Result<usize> {
        self.with(|c| {
            c.execute(
                "UPDATE runs SET status = 'interrupted', ended = ?1,
                     error = COALESCE(error, 'the daemon stopped while it ran (killed, crashed or the host went down)')
                 WHERE status = 'running'",
                params![time(now)],
            )
        })
    }

    /// The scheduler's memory of `job`, entered as first seen at `now`
    /// when it is new.
    pub fn job_state(&self, job: &str, now: DateTime<Utc>) -> Result<JobState> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO jobs (name, first_seen) VALUES (?1, ?2)",
                params![job, time(now)],
            )?;
            c.query_row(
                "SELECT first_seen, last_scheduled FROM jobs WHERE name = ?1",
                params![job],
                |row| {
                    let first: String = row.get(0)?;
                    let last: Option<String> = row.get(1)?;
                    Ok(JobState {
                        first_seen: parse_time(&first).unwrap_or(now),
                        last_scheduled: last.as_deref().and_then(parse_time),
                    })
                },
            )
        })
    }

    /// Records that the run for `job`'s scheduled time `at` has started.
    pub fn set_last_scheduled(&self, job: &str, at: DateTime<Utc>) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET last_scheduled = ?2 WHERE name = ?1",
                params![job, time(at)],
            )
            .map(drop)
        })
    }

    /// Records a run's start; returns its id.
    pub fn start_run(&self, run: &NewRun<'_>) -> Result<i64> {
        self.with(|c| {
            c.execute(
                "INSERT INTO runs (job, kind, vm, repository, trigger, scheduled_for, attempt, started, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'running')",
                params![
                    run.job,
                    run.kind,
                    run.vm,
                    run.repository,
                    run.trigger,
                    run.scheduled_for.map(time),
                    run.attempt,
                    time(run.started)
                ],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    /// Records how run `id` ended, at `now`.
    pub fn finish_run(&self, id: i64, now: DateTime<Utc>, finished: &Finished) -> Result<()> {
        let status = finished.status.unwrap_or(Status::Succeeded);
        let reasons = serde_json::to_string(&finished.fallback_reasons).unwrap_or_default();
        let disks = serde_json::to_string(&finished.disks).unwrap_or_default();
        self.with(|c| {
            let started: String =
                c.query_row("SELECT started FROM runs WHERE id = ?1", params![id], |r| r.get(0))?;
            let seconds = parse_time(&started)
                .map(|s| (now - s).num_milliseconds().max(0) as f64 / 1000.0);
            c.execute(
                "UPDATE runs SET ended = ?2, status = ?3, error = ?4, snapshot = ?5, backup_type = ?6,
                     fallback_reasons = ?7, disks = ?8, bytes_read = ?9, bytes_new = ?10,
                     bytes_stored = ?11, seconds = ?12, summary = ?13
                 WHERE id = ?1",
                params![
                    id,
                    time(now),
                    status.as_str(),
                    finished.error,
                    finished.snapshot,
                    finished.backup_type,
                    reasons,
                    disks,
                    to_i64(finished.bytes_read),
                    to_i64(finished.bytes_new),
                    to_i64(finished.bytes_stored),
                    seconds,
                    finished.summary
                ],
            )
            .map(drop)
        })
    }

    /// Runs matching `filter`, newest first.
    pub fn runs(&self, filter: &RunFilter) -> Result<Vec<Run>> {
        let limit = match filter.limit {
            0 => 100,
            n => n,
        };
        self.with(|c| {
            let mut statement = c.prepare(
                "SELECT id, job, kind, vm, repository, trigger, scheduled_for, attempt, started, ended,
                        status, error, snapshot, backup_type, fallback_reasons, disks, bytes_read,
                        bytes_new, bytes_stored, seconds, summary
                 FROM runs
                 WHERE (?1 IS NULL OR job = ?1) AND (?2 IS NULL OR vm = ?2) AND (?3 IS NULL OR status = ?3)
                 ORDER BY id DESC LIMIT ?4",
            )?;
            let rows = statement.query_map(
                params![
                    filter.job,
                    filter.vm,
                    filter.status.map(Status::as_str),
                    to_i64(limit as u64)
                ],
                row_to_run,
            )?;
            rows.collect()
        })
    }

    /// Run `id`, if recorded.
    pub fn run(&self, id: i64) -> Result<Option<Run>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, job, kind, vm, repository, trigger, scheduled_for, attempt, started, ended,
                        status, error, snapshot, backup_type, fallback_reasons, disks, bytes_read,
                        bytes_new, bytes_stored, seconds, summary
                 FROM runs WHERE id = ?1",
                params![id],
                row_to_run,
            )
            .optional()
        })
    }

    /// When the newest successful run of `job` whose backup type is one of
    /// `types` started.
    pub fn last_success_of_type(&self, job: &str, types: &[&str]) -> Result<Option<DateTime<Utc>>> {
        let started: Option<String> = self.with(|c| {
            let mut best: Option<String> = None;
            for kind in types {
                let found: Option<String> = c
                    .query_row(
                        "SELECT started FROM runs WHERE job = ?1 AND status = 'succeeded' AND backup_type = ?2
                         ORDER BY id DESC LIMIT 1",
                        params![job, kind],
                        |row| row.get(0),
                    )
                    .optional()?;
                best = match (best, found) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
            Ok(best)
        })?;
        Ok(started.as_deref().and_then(parse_time))
    }

    /// The newest successful run of `job`.
    pub fn last_success(&self, job: &str) -> Result<Option<Run>> {
        Ok(self
            .runs(&RunFilter {
                job: Some(job.to_string()),
                status: Some(Status::Succeeded),
                limit: 1,
                ..RunFilter::default()
            })?
            .pop())
    }
}

/// A job's measured speeds: averages over its newest successful runs
/// that moved data, for the recovery models (RTO, RPO, cost).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Speeds {
    /// Runs averaged.
    pub runs: u32,
    /// Bytes read from the source per second.
    pub read_bytes_per_second: f64,
    /// Bytes stored in the repository per second.
    pub stored_bytes_per_second: f64,
    /// Average wall time of a run, in seconds.
    pub seconds_per_run: f64,
}

/// How many of a job's newest successful runs its speeds average.
pub const SPEED_RUNS: usize = 10;

/// Totals over a job's recorded runs, for metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobTotals {
    /// The job.
    pub job: String,
    /// Its VM, for backups.
    pub vm: Option<String>,
    /// Runs by status word.
    pub runs: Vec<(String, u64)>,
    /// Bytes read over all runs.
    pub bytes_read: u64,
    /// Bytes of new data over all runs.
    pub bytes_new: u64,
    /// Bytes stored over all runs.
    pub bytes_stored: u64,
}

impl History {
    /// The measured speeds of `job` over its newest successful runs that
    /// took time and read data; `None` before there is one.
    pub fn speeds(&self, job: &str) -> Result<Option<Speeds>> {
        let runs = self.runs(&RunFilter {
            job: Some(job.to_string()),
            status: Some(Status::Succeeded),
            limit: SPEED_RUNS * 4,
            ..RunFilter::default()
        })?;
        let timed: Vec<(&Run, f64)> = runs
            .iter()
            .filter_map(|r| Some((r, r.seconds.filter(|s| *s > 0.0)?)))
            .filter(|(r, _)| r.bytes_read > 0)
            .take(SPEED_RUNS)
            .collect();
        if timed.is_empty() {
            return Ok(None);
        }
        let seconds: f64 = timed.iter().map(|(_, s)| s).sum();
        let read: u64 = timed.iter().map(|(r, _)| r.bytes_read).sum();
        let stored: u64 = timed.iter().map(|(r, _)| r.bytes_stored).sum();
        Ok(Some(Speeds {
            runs: u32::try_from(timed.len()).unwrap_or(u32::MAX),
            read_bytes_per_second: read as f64 / seconds,
            stored_bytes_per_second: stored as f64 / seconds,
            seconds_per_run: seconds / timed.len() as f64,
        }))
    }

    /// Totals per job over the whole history.
    pub fn totals(&self) -> Result<Vec<JobTotals>> {
        self.with(|c| {
            let mut by_status = c.prepare(
                "SELECT job, vm, status, COUNT(*), COALESCE(SUM(bytes_read), 0),
                        COALESCE(SUM(bytes_new), 0), COALESCE(SUM(bytes_stored), 0)
                 FROM runs GROUP BY job, status ORDER BY job",
            )?;
            let rows = by_status.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, Option<String>>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, i64>(4)?,
                    row.get::<_, i64>(5)?,
                    row.get::<_, i64>(6)?,
                ))
            })?;
            let mut totals: Vec<JobTotals> = Vec::new();
            for row in rows {
                let (job, vm, status, count, read, new, stored) = row?;
                let n = |v: i64| u64::try_from(v).unwrap_or(0);
                if totals.last().is_none_or(|t| t.job != job) {
                    totals.push(JobTotals {
                        job,
                        vm,
                        ..JobTotals::default()
                    });
                }
                if let Some(total) = totals.last_mut() {
                    total.runs.push((status, n(count)));
                    total.bytes_read += n(read);
                    total.bytes_new += n(new);
                    total.bytes_stored += n(stored);
                }
            }
            Ok(totals)
        })
    }
}

/// Decodes one `runs` row.
fn row_to_run(row: &rusqlite::Row<'_>) -> rusqlite::Result<Run> {
    let list = |text: Option<String>| -> Vec<String> {
        text.and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    };
    let count = |n: Option<i64>| n.map_or(0, |n| u64::try_from(n).unwrap_or(0));
    let status: String = row.get(10)?;
    Ok(Run {
        id: row.get(0)?,
        job: row.get(1)?,
        kind: row.get(2)?,
        vm: row.get(3)?,
        repository: row.get(4)?,
        trigger: row.get(5)?,
        scheduled_for: row.get(6)?,
        attempt: row.get(7)?,
        started: row.get(8)?,
        ended: row.get(9)?,
        status: Status::parse(&status),
        error: row.get(11)?,
        snapshot: row.get(12)?,
        backup_type: row.get(13)?,
        fallback_reasons: list(row.get(14)?),
        disks: list(row.get(15)?),
        bytes_read: count(row.get(16)?),
        bytes_new: count(row.get(17)?),
        bytes_stored: count(row.get(18)?),
        seconds: row.get(19)?,
        summary: row.get(20)?,
    })
}

/// A time as stored: RFC 3339, UTC, milliseconds.
fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A stored time.
fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A byte count as SQLite's integer.
fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Creates `dir` (and its parents) with mode 0700 for the last part.
fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(Error::io(format!(
                "creating the state folder {}",
                dir.display()
            )))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
            Error::io(format!("making the state folder {} private", dir.display())),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use chrono::TimeZone;

    fn at(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, h, 0, 0).single().unwrap()
    }

    fn new_run(job: &str, started: DateTime<Utc>) -> NewRun<'_> {
        NewRun {
            job,
            kind: "backup",
            vm: Some("web1"),
            repository: "local",
            trigger: "schedule",
            scheduled_for: Some(started),
            attempt: 1,
            started,
        }
    }

    #[test]
    fn runs_are_recorded_from_start_to_end_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        let id = history.start_run(&new_run("backup/web1", at(1))).unwrap();
        assert_eq!(history.run(id).unwrap().unwrap().status, Status::Running);
        history
            .finish_run(
                id,
                at(2),
                &Finished {
                    snapshot: Some("abc".into()),
                    backup_type: Some("full".into()),
                    disks: vec!["vda".into()],
                    bytes_read: 7200,
                    ..Finished::default()
                },
            )
            .unwrap();
        drop(history);
        let history = History::open(dir.path()).unwrap();
        let run = history.last_success("backup/web1").unwrap().unwrap();
        assert_eq!(run.snapshot.as_deref(), Some("abc"));
        assert_eq!(run.disks, ["vda"]);
        assert_eq!(run.seconds, Some(3600.0));
        assert_eq!(run.read_speed(), Some(2.0));
    }

    #[test]
    fn a_run_cut_off_by_a_kill_is_recorded_as_interrupted_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        let id = history.start_run(&new_run("backup/web1", at(1))).unwrap();
        drop(history);
        let history = History::open(dir.path()).unwrap();
        assert_eq!(history.mark_interrupted(at(3)).unwrap(), 1);
        let run = history.run(id).unwrap().unwrap();
        assert_eq!(run.status, Status::Interrupted);
        assert!(run.error.unwrap().contains("stopped while it ran"));
        assert_eq!(history.mark_interrupted(at(4)).unwrap(), 0);
    }

    #[test]
    fn the_scheduler_memory_keeps_first_seen_and_the_last_scheduled_time() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        let first = history.job_state("backup/web1", at(1)).unwrap();
        assert_eq!((first.first_seen, first.last_scheduled), (at(1), None));
        history.set_last_scheduled("backup/web1", at(5)).unwrap();
        let later = history.job_state("backup/web1", at(9)).unwrap();
        assert_eq!(
            (later.first_seen, later.last_scheduled),
            (at(1), Some(at(5)))
        );
    }

    #[test]
    fn filters_pick_runs_by_vm_and_status() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        let a = history.start_run(&new_run("backup/web1", at(1))).unwrap();
        let mut other = new_run("backup/db", at(2));
        other.vm = Some("db");
        let b = history.start_run(&other).unwrap();
        history
            .finish_run(
                b,
                at(3),
                &Finished {
                    status: Some(Status::Failed),
                    error: Some("no disk".into()),
                    ..Finished::default()
                },
            )
            .unwrap();
        let by_vm = history
            .runs(&RunFilter {
                vm: Some("web1".into()),
                ..RunFilter::default()
            })
            .unwrap();
        assert_eq!(by_vm.iter().map(|r| r.id).collect::<Vec<_>>(), [a]);
        let failed = history
            .runs(&RunFilter {
                status: Some(Status::Failed),
                ..RunFilter::default()
            })
            .unwrap();
        assert_eq!(failed[0].error.as_deref(), Some("no disk"));
    }

    #[test]
    fn speeds_average_the_newest_successful_runs_that_moved_data() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        assert_eq!(history.speeds("backup/web1").unwrap(), None);
        for (hour, read, stored, status) in [
            (1, 3600, 360, Status::Succeeded),
            (3, 7200, 0, Status::Succeeded),
            (5, 99_999, 0, Status::Failed),
            (7, 0, 0, Status::Succeeded),
        ] {
            let id = history
                .start_run(&new_run("backup/web1", at(hour)))
                .unwrap();
            let finished = Finished {
                status: Some(status),
                bytes_read: read,
                bytes_stored: stored,
                ..Finished::default()
            };
            history.finish_run(id, at(hour + 1), &finished).unwrap();
        }
        let speeds = history.speeds("backup/web1").unwrap().unwrap();
        assert_eq!(
            speeds.runs, 2,
            "the failed run and the one that read nothing do not count"
        );
        assert_eq!(speeds.read_bytes_per_second, 10_800.0 / 7200.0);
        assert_eq!(speeds.stored_bytes_per_second, 360.0 / 7200.0);
        assert_eq!(speeds.seconds_per_run, 3600.0);
    }

    #[test]
    fn a_history_from_a_newer_vbackup_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(History::open(dir.path()).unwrap());
        let c = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let error = History::open(dir.path()).unwrap_err();
        assert!(error.to_string().contains("newer"), "{error}");
    }
}
