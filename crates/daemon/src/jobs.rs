//! The jobs a configuration file defines, and running one of them through
//! the library.
//!
//! A VM section with a schedule is the job `backup/VM`; `[verify.REPO]` is
//! `verify/REPO`; `[prune.REPO]` is `prune/REPO` (each VM's `keep` rules
//! for its snapshots in that repository, then garbage collection). VMs
//! without a schedule are still jobs, run on demand only.

use vbackup_core::format::lifecycle::GroupBy;
use vbackup_core::{CheckOptions, Emptying, ForgetOptions, Progress, PruneOptions, Repository};
use vbackup_open::{Purpose, RepositoryOptions};
use vbackup_vm::job::BackupJob;
use vbackup_vm::Requested;

use crate::config::Config;
use crate::history::{Finished, Status};
use crate::schedule::Schedule;
use crate::{Error, Result};

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    /// Back up a VM.
    Backup {
        /// The VM's name.
        vm: String,
    },
    /// Verify a repository.
    Verify,
    /// Apply retention and collect garbage in a repository.
    Prune,
}

impl JobKind {
    /// `backup`, `verify` or `prune`.
    pub fn word(&self) -> &'static str {
        match self {
            JobKind::Backup { .. } => "backup",
            JobKind::Verify => "verify",
            JobKind::Prune => "prune",
        }
    }
}

/// One job of the configuration.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// `backup/VM`, `verify/REPO` or `prune/REPO`.
    pub name: String,
    /// What it does.
    pub kind: JobKind,
    /// The repository's name in the configuration file.
    pub repository: String,
    /// When it runs; `None`: on demand only.
    pub schedule: Option<Schedule>,
}

impl JobSpec {
    /// The VM, for backups.
    pub fn vm(&self) -> Option<&str> {
        match &self.kind {
            JobKind::Backup { vm } => Some(vm),
            _ => None,
        }
    }
}

/// The jobs `config` defines, in a stable order (backups, verifies,
/// prunes; by name).
pub fn jobs(config: &Config) -> Vec<JobSpec> {
    let mut jobs = Vec::new();
    for (vm, section) in &config.vm {
        if let Some(repository) = config.vm_repository(vm) {
            jobs.push(JobSpec {
                name: format!("backup/{vm}"),
                kind: JobKind::Backup { vm: vm.clone() },
                repository: repository.to_string(),
                schedule: section.schedule.clone(),
            });
        }
    }
    for (repository, section) in &config.verify {
        jobs.push(JobSpec {
            name: format!("verify/{repository}"),
            kind: JobKind::Verify,
            repository: repository.clone(),
            schedule: Some(section.schedule.clone()),
        });
    }
    for (repository, section) in &config.prune {
        jobs.push(JobSpec {
            name: format!("prune/{repository}"),
            kind: JobKind::Prune,
            repository: repository.clone(),
            schedule: Some(section.schedule.clone()),
        });
    }
    jobs
}

/// The job `name` of `config`: its full name, or a VM's name for its
/// backup.
pub fn find<'a>(jobs: &'a [JobSpec], name: &str) -> Option<&'a JobSpec> {
    jobs.iter()
        .find(|j| j.name == name)
        .or_else(|| jobs.iter().find(|j| j.vm() == Some(name)))
}

/// The options of repository `name`, with the daemon's defaults: the
/// metadata cache and client state under the daemon's state folder unless
/// the section names a cache folder.
pub fn repository_options(config: &Config, name: &str) -> Result<RepositoryOptions> {
    let section = config.repository(name).ok_or_else(|| {
        Error::Invalid(format!(
            "no [repository.{name}] section in the configuration file"
        ))
    })?;
    let mut options = section.clone();
    if options.cache_dir.is_none() {
        options.cache_dir = Some(config.daemon.state.join("cache"));
    }
    Ok(options)
}

/// Opens repository `name` for `purpose`, with the passphrase from its
/// `password-file` (a daemon has no terminal to ask on).
pub fn open_repository(config: &Config, name: &str, purpose: Purpose) -> Result<Repository> {
    let options = repository_options(config, name)?;
    let given = options.password_file.is_some();
    Ok(vbackup_open::open(&options, purpose, given, || {
        options.passphrase()
    })?)
}

/// Runs `job` to its end and says what it did; `progress` is shared with
/// the API (live progress) and carries the cancel flag. A backup is of
/// type `requested` (the scheduler decides patterns from the history).
pub fn execute(
    config: &Config,
    job: &JobSpec,
    requested: Requested,
    progress: &Progress,
) -> Finished {
    let result = match &job.kind {
        JobKind::Backup { vm } => backup(config, job, vm, requested, progress),
        JobKind::Verify => verify(config, job, progress),
        JobKind::Prune => prune(config, job, progress),
    };
    match result {
        Ok(finished) => finished,
        Err(error) => Finished {
            status: Some(match progress.is_cancelled() {
                true => Status::Cancelled,
                false => Status::Failed,
            }),
            error: Some(error.to_string()),
            ..Finished::default()
        },
    }
}

/// A backup of `vm`.
fn backup(
    config: &Config,
    job: &JobSpec,
    vm: &str,
    requested: Requested,
    progress: &Progress,
) -> Result<Finished> {
    let section = config
        .vm
        .get(vm)
        .ok_or_else(|| Error::Invalid(format!("no [vm.{vm}] section in the configuration file")))?;
    let repo = open_repository(config, &job.repository, Purpose::Use)?;
    let options = repository_options(config, &job.repository)?;
    let request = BackupJob {
        vm: vm.to_string(),
        source: section.source.clone(),
        requested,
        threads: vbackup_open::io_threads(&repo, options.threads),
        skip_unchanged: true,
    };
    let outcome = vbackup_vm::job::backup(&repo, &request, progress)?;
    let manifest = &outcome.snapshot.manifest;
    let mut finished = Finished {
        status: Some(Status::Succeeded),
        snapshot: Some(outcome.snapshot.id.clone()),
        backup_type: Some(format!("{:?}", manifest.backup_type).to_lowercase()),
        fallback_reasons: manifest
            .disks
            .iter()
            .filter_map(|d| Some(format!("{}: {}", d.name, d.fallback_reason.as_ref()?)))
            .collect(),
        disks: manifest.disks.iter().map(|d| d.name.clone()).collect(),
        bytes_read: manifest.stats.bytes_read,
        bytes_new: manifest.stats.bytes_new,
        bytes_stored: manifest.stats.bytes_stored,
        ..Finished::default()
    };
    if !outcome.warnings.is_empty() {
        finished.summary = Some(format!("warnings: {}", outcome.warnings.join("; ")));
    }
    Ok(finished)
}

/// A verification of the job's repository.
fn verify(config: &Config, job: &JobSpec, progress: &Progress) -> Result<Finished> {
    let section = config
        .verify
        .get(&job.repository)
        .ok_or_else(|| Error::Invalid(format!("no [verify.{}] section", job.repository)))?;
    let repo = open_repository(config, &job.repository, Purpose::Judge)?;
    let options = repository_options(config, &job.repository)?;
    let report = vbackup_core::check(
        &repo,
        &CheckOptions {
            read_data: section.read_data_subset,
            threads: vbackup_open::io_threads(&repo, options.threads),
            stale_after: None,
        },
        progress,
    )?;
    let clean = report.is_clean();
    Ok(Finished {
        summary: Some(format!(
            "checked {} snapshot(s); {} problem(s)",
            report.snapshots,
            report.problems.len()
        )),
        status: Some(match clean {
            true => Status::Succeeded,
            false => Status::Failed,
        }),
        error: (!clean).then(|| {
            format!(
                "verify found {} damaged or missing object(s); run `vbackup check` for the list and `vbackup repair` to mark them",
                report.problems.len()
            )
        }),
        ..Finished::default()
    })
}

/// Retention for each VM with `keep` rules in the job's repository, then
/// garbage collection.
fn prune(config: &Config, job: &JobSpec, progress: &Progress) -> Result<Finished> {
    let section = config
        .prune
        .get(&job.repository)
        .ok_or_else(|| Error::Invalid(format!("no [prune.{}] section", job.repository)))?;
    let repo = open_repository(config, &job.repository, Purpose::Use)?;
    let options = repository_options(config, &job.repository)?;
    let mut removed = 0usize;
    for (vm, vm_section) in &config.vm {
        let (Some(keep), Some(repository)) = (&vm_section.keep, config.vm_repository(vm)) else {
            continue;
        };
        if repository != job.repository {
            continue;
        }
        let report = vbackup_open::state::forget(
            &options,
            &repo,
            &ForgetOptions {
                keep: Some(keep.clone()),
                group_by: Some(GroupBy::default()),
                dry_run: false,
                newest_policy_seen: 0,
                ids: Vec::new(),
                vm: Some(vm.clone()),
                emptying: Emptying::Refuse,
            },
        )?;
        removed += report
            .groups
            .iter()
            .flat_map(|g| &g.decisions)
            .filter(|d| !d.keep)
            .count();
    }
    let defaults = PruneOptions::default();
    let report = vbackup_core::prune(
        &repo,
        &PruneOptions {
            grace: section.grace.unwrap_or(defaults.grace),
            ..defaults
        },
        progress,
    )?;
    Ok(Finished {
        status: Some(Status::Succeeded),
        summary: Some(format!(
            "forgot {removed} snapshot(s); deleted {} chunk(s) and {} index(es), {} bytes freed",
            report.deleted_chunks, report.deleted_indexes, report.freed_bytes
        )),
        ..Finished::default()
    })
}
