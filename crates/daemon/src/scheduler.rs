//! Deciding what runs when, and running it.
//!
//! Each job's next run is computed from the scheduled time of its last
//! run (the history's `jobs` table), never from "now": after the daemon
//! was down, or the host slept, across any number of scheduled times, the
//! job is due once, for the newest of them ("catch-up"), and a clock that
//! jumps eight hours forward gives one run, not eight. A job that cannot
//! start (its VM or repository is busy, the host's or the repository's
//! limit is reached) stays due and starts when it can: a prune waits its
//! turn. Failed runs are retried with a doubling delay; a run longer than
//! the timeout is cancelled.
//!
//! Time comes from a [`Clock`], so tests run simulated days in seconds
//! with real backups.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use vbackup_core::Progress;

use crate::config::Config;
use crate::history::{History, NewRun, Status};
use crate::jobs::{self, JobKind, JobSpec};
use crate::{Error, Result};

/// Where the daemon's time comes from.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told: simulated days in seconds.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    /// A clock showing `time`.
    pub fn new(time: DateTime<Utc>) -> Self {
        Self(Mutex::new(time))
    }

    /// Moves the clock to `time` (forward or back).
    pub fn set(&self, time: DateTime<Utc>) {
        if let Ok(mut now) = self.0.lock() {
            *now = time;
        }
    }

    /// Moves the clock forward by `duration`.
    pub fn advance(&self, duration: chrono::Duration) {
        if let Ok(mut now) = self.0.lock() {
            *now += duration;
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        self.0.lock().map_or_else(|_| Utc::now(), |now| *now)
    }
}

/// Why a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// Its scheduled time came.
    Schedule,
    /// Scheduled times passed while the daemon was down or the host slept:
    /// one run for all of them.
    CatchUp,
    /// Asked for (`vbackup jobs run`).
    Manual,
    /// A failed run, tried again.
    Retry,
    /// The VM's newest good backup is older than its `rpo`: run early.
    Rpo,
}

impl Trigger {
    /// The word recorded in the history.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::CatchUp => "catch-up",
            Trigger::Manual => "manual",
            Trigger::Retry => "retry",
            Trigger::Rpo => "rpo",
        }
    }
}

/// A run that is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The scheduled time it stands for (the newest one passed).
    pub scheduled_for: DateTime<Utc>,
    /// Schedule or catch-up.
    pub trigger: Trigger,
}

/// How late a scheduled run may start and still count as on time rather
/// than caught up.
const ON_TIME: chrono::Duration = chrono::Duration::minutes(1);

/// Whether `job` is due at `now`, given the scheduled time of its last run
/// (or, for a job never run, when the daemon first saw it).
pub fn due(job: &JobSpec, last: DateTime<Utc>, now: DateTime<Utc>) -> Option<Due> {
    let schedule = job.schedule.as_ref()?;
    let next = schedule.next_after(last)?;
    if next > now {
        return None;
    }
    let newest = schedule.latest_at_or_before(now).unwrap_or(next).max(next);
    let trigger = match newest > next || now - newest > ON_TIME {
        true => Trigger::CatchUp,
        false => Trigger::Schedule,
    };
    Some(Due {
        scheduled_for: newest,
        trigger,
    })
}

/// A run waiting to start: asked for, or a retry whose time has come.
#[derive(Debug, Clone)]
struct Waiting {
    job: String,
    trigger: Trigger,
    attempt: u32,
    scheduled_for: Option<DateTime<Utc>>,
    not_before: DateTime<Utc>,
}

/// A run in progress.
struct Running {
    job: JobSpec,
    started: DateTime<Utc>,
    progress: Arc<Progress>,
    thread: Option<JoinHandle<()>>,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct JobStatus {
    /// Its name.
    pub name: String,
    /// `backup`, `verify` or `prune`.
    pub kind: String,
    /// The VM, for backups.
    pub vm: Option<String>,
    /// The repository.
    pub repository: String,
    /// Its schedule, as written.
    pub schedule: Option<String>,
    /// When it runs next (RFC 3339), if scheduled.
    pub next_run: Option<String>,
    /// Its newest run.
    pub last_run: Option<crate::history::Run>,
    /// Its newest successful run's end.
    pub last_success: Option<String>,
    /// The run in progress, if any.
    pub running: Option<RunProgress>,
    /// For a VM with an `rpo`: how old its newest good backup is.
    pub rpo: Option<RpoState>,
    /// Measured speeds over its newest successful runs.
    #[schema(value_type = Option<crate::history::Speeds>)]
    pub speeds: Option<crate::history::Speeds>,
}

/// A VM's recovery point against its objective.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct RpoState {
    /// The objective, in seconds.
    pub rpo_seconds: u64,
    /// The age of the newest good backup, in seconds.
    pub age_seconds: u64,
    /// Whether the age is past the objective.
    pub breached: bool,
}

/// A running job's progress.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct RunProgress {
    /// The run's id.
    pub run: i64,
    /// When it started.
    pub started: String,
    /// Bytes to read (known once the job has planned).
    pub total_bytes: u64,
    /// Bytes read so far.
    pub done_bytes: u64,
}

/// The configuration and the jobs it defines, replaced whole on reload.
#[derive(Debug)]
struct Settings {
    config: Config,
    jobs: Vec<JobSpec>,
}

/// What a tick did.
#[derive(Debug, Default)]
pub struct TickReport {
    /// The runs started: id, job, why.
    pub started: Vec<(i64, String, Trigger)>,
    /// The runs that ended since the previous tick.
    pub ended: Vec<crate::history::Run>,
}

/// The scheduler: the configuration, the history, the clock, and the runs
/// in progress.
pub struct Daemon {
    settings: std::sync::RwLock<Arc<Settings>>,
    history: Arc<History>,
    clock: Arc<dyn Clock>,
    running: Mutex<HashMap<i64, Running>>,
    waiting: Mutex<VecDeque<Waiting>>,
    /// When each job last got a run for its RPO: at most one per period.
    rpo_fired: Mutex<HashMap<String, DateTime<Utc>>>,
    /// The repositories' usage and snapshots, kept for a while.
    views: crate::views::Views,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("jobs", &self.settings().jobs.len())
            .field("history", &self.history)
            .finish()
    }
}

impl Daemon {
    /// Starts the scheduler on `config`'s state folder: the history is
    /// opened and runs cut off by an earlier crash are recorded as
    /// interrupted.
    pub fn new(config: Config, clock: Arc<dyn Clock>) -> Result<Self> {
        let history = Arc::new(History::open(&config.daemon.state)?);
        history.mark_interrupted(clock.now())?;
        let jobs = jobs::jobs(&config);
        let now = clock.now();
        for job in &jobs {
            history.job_state(&job.name, now)?;
        }
        Ok(Self {
            settings: std::sync::RwLock::new(Arc::new(Settings { config, jobs })),
            history,
            clock,
            running: Mutex::new(HashMap::new()),
            waiting: Mutex::new(VecDeque::new()),
            rpo_fired: Mutex::new(HashMap::new()),
            views: crate::views::Views::default(),
        })
    }

    /// The configuration and jobs in force.
    fn settings(&self) -> Arc<Settings> {
        match self.settings.read() {
            Ok(settings) => settings.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Config {
        self.settings().config.clone()
    }

    /// Replaces the configuration (SIGHUP): new jobs are entered as first
    /// seen now, removed ones are no longer scheduled; runs in progress go
    /// on. The state folder and the socket stay those of the start.
    pub fn reload(&self, mut config: Config) -> Result<()> {
        let old = self.settings();
        config.daemon.state = old.config.daemon.state.clone();
        config.daemon.socket = old.config.daemon.socket.clone();
        let jobs = jobs::jobs(&config);
        let now = self.clock.now();
        for job in &jobs {
            self.history.job_state(&job.name, now)?;
        }
        let mut settings = self
            .settings
            .write()
            .map_err(|_| Error::Invalid("the scheduler's lock was poisoned by a panic".into()))?;
        *settings = Arc::new(Settings { config, jobs });
        Ok(())
    }

    /// The history.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Every repository's usage and damage, as the dashboard shows them.
    pub fn repositories(&self) -> Vec<crate::views::RepositoryView> {
        self.views.repositories(&self.settings().config)
    }

    /// The snapshots of `vm`, newest first.
    pub fn snapshots(&self, vm: &str) -> Result<Vec<crate::views::SnapshotView>> {
        self.views.snapshots(&self.settings().config, vm)
    }

    /// The jobs in force.
    pub fn jobs(&self) -> Vec<JobSpec> {
        self.settings().jobs.clone()
    }

    /// Starts what is due now and may start: scheduled and caught-up runs,
    /// then waiting ones (asked for, retries); cancels runs past the
    /// timeout; reaps finished ones. Says what started and what ended.
    pub fn tick(&self) -> Result<TickReport> {
        let ended = self.reap()?;
        self.enforce_timeout();
        let now = self.clock.now();
        let settings = self.settings();
        let mut started = Vec::new();
        for job in &settings.jobs {
            let state = self.history.job_state(&job.name, now)?;
            let last = state.last_scheduled.unwrap_or(state.first_seen);
            let Some(due) = due(job, last, now) else {
                continue;
            };
            if !self.may_start(job) {
                continue;
            }
            self.history
                .set_last_scheduled(&job.name, due.scheduled_for)?;
            let id = self.start(job, due.trigger, 1, Some(due.scheduled_for))?;
            started.push((id, job.name.clone(), due.trigger));
        }
        started.extend(self.start_waiting(now)?);
        for job in &settings.jobs {
            if self.rpo_due(&settings.config, job, now)? && self.may_start(job) {
                self.rpo_lock()?.insert(job.name.clone(), now);
                let id = self.start(job, Trigger::Rpo, 1, None)?;
                started.push((id, job.name.clone(), Trigger::Rpo));
            }
        }
        Ok(TickReport { started, ended })
    }

    /// How old a VM's newest good backup is: since the end of its job's
    /// last successful run, else since the daemon first saw the job.
    fn backup_age(&self, job: &JobSpec, now: DateTime<Utc>) -> Result<chrono::Duration> {
        let newest = self
            .history
            .last_success(&job.name)?
            .and_then(|run| run.ended)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc));
        let since = match newest {
            Some(t) => t,
            None => self.history.job_state(&job.name, now)?.first_seen,
        };
        Ok(now - since)
    }

    /// Whether `job` is a backup past its RPO that has not had its early
    /// run for this period, and is neither running nor waiting.
    fn rpo_due(&self, config: &Config, job: &JobSpec, now: DateTime<Utc>) -> Result<bool> {
        let Some(rpo) = job
            .vm()
            .and_then(|vm| config.vm.get(vm)?.rpo)
            .and_then(|rpo| chrono::Duration::from_std(rpo).ok())
        else {
            return Ok(false);
        };
        if self.backup_age(job, now)? <= rpo {
            return Ok(false);
        }
        let fired_recently = self
            .rpo_lock()?
            .get(&job.name)
            .is_some_and(|fired| now - *fired <= rpo);
        let busy = self
            .running_lock()?
            .values()
            .any(|r| r.job.name == job.name)
            || self.waiting_lock()?.iter().any(|w| w.job == job.name);
        Ok(!fired_recently && !busy)
    }

    /// The RPO state of `job`: its age and whether it is past its RPO.
    fn rpo_state(
        &self,
        config: &Config,
        job: &JobSpec,
        now: DateTime<Utc>,
    ) -> Result<Option<RpoState>> {
        let Some(rpo) = job.vm().and_then(|vm| config.vm.get(vm)?.rpo) else {
            return Ok(None);
        };
        let age = self.backup_age(job, now)?;
        let seconds = u64::try_from(age.num_seconds()).unwrap_or(0);
        Ok(Some(RpoState {
            rpo_seconds: rpo.as_secs(),
            age_seconds: seconds,
            breached: seconds > rpo.as_secs(),
        }))
    }

    fn rpo_lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, DateTime<Utc>>>> {
        self.rpo_fired
            .lock()
            .map_err(|_| Error::Invalid("the scheduler's lock was poisoned by a panic".into()))
    }

    /// Asks for a run of job `name` (or a VM's backup by the VM's name) as
    /// soon as it may start; returns the run's id when it started at once.
    pub fn run_now(&self, name: &str) -> Result<Option<i64>> {
        let settings = self.settings();
        let job = jobs::find(&settings.jobs, name)
            .ok_or_else(|| self.unknown_job(name))?
            .clone();
        self.waiting_lock()?.push_back(Waiting {
            job: job.name.clone(),
            trigger: Trigger::Manual,
            attempt: 1,
            scheduled_for: None,
            not_before: self.clock.now(),
        });
        let started = self.start_waiting(self.clock.now())?;
        Ok(started
            .iter()
            .find(|(_, name, _)| *name == job.name)
            .map(|(id, _, _)| *id))
    }

    /// Cancels run `id`; it ends as cancelled when its job notices.
    pub fn cancel(&self, id: i64) -> Result<()> {
        let running = self.running_lock()?;
        let run = running
            .get(&id)
            .ok_or_else(|| Error::Invalid(format!("run {id} is not running")))?;
        run.progress.cancel();
        Ok(())
    }

    /// Every job with its schedule, next run, last run and progress.
    pub fn status(&self) -> Result<Vec<JobStatus>> {
        let now = self.clock.now();
        let settings = self.settings();
        let rpo: Vec<Option<RpoState>> = settings
            .jobs
            .iter()
            .map(|job| self.rpo_state(&settings.config, job, now))
            .collect::<Result<_>>()?;
        let running = self.running_lock()?;
        settings
            .jobs
            .iter()
            .zip(rpo)
            .map(|(job, rpo)| {
                let state = self.history.job_state(&job.name, now)?;
                let last = state.last_scheduled.unwrap_or(state.first_seen);
                let next_run = job.schedule.as_ref().and_then(|s| s.next_after(last));
                let newest = self
                    .history
                    .runs(&crate::history::RunFilter {
                        job: Some(job.name.clone()),
                        limit: 1,
                        ..Default::default()
                    })?
                    .pop();
                let progress = running
                    .iter()
                    .filter(|(_, r)| r.thread.as_ref().is_some_and(|t| !t.is_finished()))
                    .find(|(_, r)| r.job.name == job.name)
                    .map(|(id, r)| RunProgress {
                        run: *id,
                        started: r.started.to_rfc3339(),
                        total_bytes: r.progress.total(),
                        done_bytes: r.progress.done(),
                    });
                Ok(JobStatus {
                    name: job.name.clone(),
                    kind: job.kind.word().to_string(),
                    vm: job.vm().map(str::to_string),
                    repository: job.repository.clone(),
                    schedule: job.schedule.as_ref().map(|s| s.to_string()),
                    next_run: next_run.map(|t| t.to_rfc3339()),
                    last_run: newest,
                    last_success: self.history.last_success(&job.name)?.and_then(|r| r.ended),
                    running: progress,
                    rpo,
                    speeds: self.history.speeds(&job.name)?,
                })
            })
            .collect()
    }

    /// Whether any run is in progress or waiting.
    pub fn busy(&self) -> bool {
        let running = self.running.lock().map_or(true, |r| !r.is_empty());
        let waiting = self.waiting.lock().map_or(true, |w| !w.is_empty());
        running || waiting
    }

    /// Waits for every run in progress to end, and records them.
    pub fn wait_idle(&self) -> Result<()> {
        loop {
            let threads: Vec<JoinHandle<()>> = self
                .running_lock()?
                .values_mut()
                .filter_map(|r| r.thread.take())
                .collect();
            if threads.is_empty() {
                break;
            }
            for thread in threads {
                let _ = thread.join();
            }
        }
        self.reap().map(drop)
    }

    /// Cancels every run in progress (the daemon is stopping).
    pub fn cancel_all(&self) {
        if let Ok(running) = self.running.lock() {
            for run in running.values() {
                run.progress.cancel();
            }
        }
    }

    fn unknown_job(&self, name: &str) -> Error {
        let settings = self.settings();
        let names: Vec<&str> = settings.jobs.iter().map(|j| j.name.as_str()).collect();
        Error::Invalid(format!(
            "no job '{name}' in the configuration; the jobs are: {}",
            names.join(", ")
        ))
    }

    fn running_lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<i64, Running>>> {
        self.running
            .lock()
            .map_err(|_| Error::Invalid("the scheduler's lock was poisoned by a panic".into()))
    }

    fn waiting_lock(&self) -> Result<std::sync::MutexGuard<'_, VecDeque<Waiting>>> {
        self.waiting
            .lock()
            .map_err(|_| Error::Invalid("the scheduler's lock was poisoned by a panic".into()))
    }

    /// Starts the waiting runs whose time has come and that may start.
    fn start_waiting(&self, now: DateTime<Utc>) -> Result<Vec<(i64, String, Trigger)>> {
        let settings = self.settings();
        let candidates: Vec<Waiting> = self.waiting_lock()?.drain(..).collect();
        let mut keep = VecDeque::new();
        let mut started = Vec::new();
        for waiting in candidates {
            let job = jobs::find(&settings.jobs, &waiting.job).cloned();
            match job {
                Some(job) if waiting.not_before <= now && self.may_start(&job) => {
                    let id = self.start(
                        &job,
                        waiting.trigger,
                        waiting.attempt,
                        waiting.scheduled_for,
                    )?;
                    started.push((id, job.name.clone(), waiting.trigger));
                }
                Some(_) => keep.push_back(waiting),
                None => {}
            }
        }
        self.waiting_lock()?.extend(keep);
        Ok(started)
    }

    /// Whether `job` may start now: not already running; its VM not being
    /// backed up; no prune on its repository, and for a prune nothing else
    /// on it; the host's and the repository's limits not reached.
    fn may_start(&self, job: &JobSpec) -> bool {
        let Ok(running) = self.running.lock() else {
            return false;
        };
        let daemon = &self.settings().config.daemon;
        let on_repository = running
            .values()
            .filter(|r| r.job.repository == job.repository)
            .count();
        let conflict = running.values().any(|r| {
            r.job.name == job.name
                || (job.vm().is_some() && r.job.vm() == job.vm())
                || (r.job.repository == job.repository
                    && (r.job.kind == JobKind::Prune || job.kind == JobKind::Prune))
        });
        !conflict
            && running.len() < daemon.max_jobs
            && on_repository < daemon.max_jobs_per_repository
    }

    /// Records a run's start and starts its thread.
    fn start(
        &self,
        job: &JobSpec,
        trigger: Trigger,
        attempt: u32,
        scheduled_for: Option<DateTime<Utc>>,
    ) -> Result<i64> {
        let started = self.clock.now();
        let id = self.history.start_run(&NewRun {
            job: &job.name,
            kind: job.kind.word(),
            vm: job.vm(),
            repository: &job.repository,
            trigger: trigger.as_str(),
            scheduled_for,
            attempt,
            started,
        })?;
        let requested = self.backup_type(job, started)?;
        let progress = Arc::new(Progress::new());
        let thread = {
            let (config, spec, progress) = (
                self.settings().config.clone(),
                job.clone(),
                progress.clone(),
            );
            let (history, clock) = (self.history.clone(), self.clock.clone());
            std::thread::Builder::new()
                .name(format!("job {}", job.name))
                .spawn(move || {
                    let finished = jobs::execute(&config, &spec, requested, &progress);
                    // A failure to record is the history's, and shows as
                    // "interrupted" at the next start.
                    let _ = history.finish_run(id, clock.now(), &finished);
                })
                .map_err(Error::io(format!("starting a thread for {}", job.name)))?
        };
        self.running_lock()?.insert(
            id,
            Running {
                job: job.clone(),
                started,
                progress,
                thread: Some(thread),
            },
        );
        Ok(id)
    }

    /// The backup type of a run of `job` starting at `now`: the VM's
    /// `type`, or what its pattern says given the history.
    fn backup_type(&self, job: &JobSpec, now: DateTime<Utc>) -> Result<vbackup_vm::Requested> {
        let settings = self.settings();
        let Some(section) = job.vm().and_then(|vm| settings.config.vm.get(vm)) else {
            return Ok(vbackup_vm::Requested::Auto);
        };
        let full = self.history.last_success_of_type(&job.name, &["full"])?;
        let full_or_differential = self
            .history
            .last_success_of_type(&job.name, &["full", "differential"])?;
        Ok(section
            .backup_type
            .requested(now, full, full_or_differential))
    }

    /// Removes ended runs from the running set and returns them; schedules
    /// retries of failed ones.
    fn reap(&self) -> Result<Vec<crate::history::Run>> {
        let daemon = self.settings().config.daemon.clone();
        let mut records = Vec::new();
        let ended: Vec<(i64, JobSpec)> = {
            let mut running = self.running_lock()?;
            let done: Vec<i64> = running
                .iter()
                .filter(|(_, r)| r.thread.as_ref().is_none_or(JoinHandle::is_finished))
                .map(|(id, _)| *id)
                .collect();
            done.into_iter()
                .filter_map(|id| {
                    let run = running.remove(&id)?;
                    if let Some(thread) = run.thread {
                        let _ = thread.join();
                    }
                    Some((id, run.job))
                })
                .collect()
        };
        for (id, job) in ended {
            let Some(run) = self.history.run(id)? else {
                continue;
            };
            if run.status == Status::Failed && run.attempt <= daemon.retries {
                let delay = daemon.retry_delay * 2u32.saturating_pow(run.attempt - 1);
                let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(1));
                self.waiting_lock()?.push_back(Waiting {
                    job: job.name.clone(),
                    trigger: Trigger::Retry,
                    attempt: run.attempt + 1,
                    scheduled_for: run
                        .scheduled_for
                        .as_deref()
                        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                        .map(|t| t.with_timezone(&Utc)),
                    not_before: self.clock.now() + delay,
                });
            }
            records.push(run);
        }
        Ok(records)
    }

    /// Cancels the runs older than the timeout.
    fn enforce_timeout(&self) {
        let now = self.clock.now();
        let Ok(limit) = chrono::Duration::from_std(self.settings().config.daemon.timeout) else {
            return;
        };
        if let Ok(running) = self.running.lock() {
            for run in running.values() {
                if now - run.started > limit {
                    run.progress.cancel();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use chrono::{Local, TimeZone};

    fn local(d: u32, h: u32, m: u32) -> DateTime<Utc> {
        Local
            .with_ymd_and_hms(2026, 12, d, h, m, 0)
            .single()
            .unwrap()
            .with_timezone(&Utc)
    }

    fn hourly() -> JobSpec {
        JobSpec {
            name: "backup/web1".into(),
            kind: JobKind::Backup { vm: "web1".into() },
            repository: "local".into(),
            schedule: Some("hourly".parse().unwrap()),
        }
    }

    #[test]
    fn a_run_is_due_when_its_time_comes_and_not_before() {
        let job = hourly();
        let last = local(1, 10, 0);
        assert_eq!(due(&job, last, local(1, 10, 59)), None);
        let on_time = due(&job, last, local(1, 11, 0)).unwrap();
        assert_eq!(on_time.scheduled_for, local(1, 11, 0));
        assert_eq!(on_time.trigger, Trigger::Schedule);
    }

    #[test]
    fn three_missed_runs_are_caught_up_once_for_the_newest() {
        let job = hourly();
        let due = due(&job, local(1, 10, 0), local(1, 13, 30)).unwrap();
        assert_eq!(due.scheduled_for, local(1, 13, 0));
        assert_eq!(due.trigger, Trigger::CatchUp);
        // Once it started, the newest time is the last: nothing more due.
        assert_eq!(super::due(&job, due.scheduled_for, local(1, 13, 30)), None);
    }

    #[test]
    fn an_eight_hour_jump_gives_one_run() {
        let job = hourly();
        let due = due(&job, local(1, 10, 0), local(1, 18, 5)).unwrap();
        assert_eq!(due.scheduled_for, local(1, 18, 0));
        assert_eq!(due.trigger, Trigger::CatchUp);
    }

    #[test]
    fn an_unscheduled_job_is_never_due() {
        let job = JobSpec {
            schedule: None,
            ..hourly()
        };
        assert_eq!(due(&job, local(1, 10, 0), local(9, 10, 0)), None);
    }
}
