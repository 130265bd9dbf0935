//! `vbackup daemon` and `vbackup jobs`: parsing and printing around
//! `vbackup_daemon`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use vbackup_daemon::api::{RunRequest, RunStarted};
use vbackup_daemon::client::Client;
use vbackup_daemon::config::{Config, SYSTEM_CONFIG};
use vbackup_daemon::history::Run;
use vbackup_daemon::scheduler::JobStatus;

use crate::commands::Context;
use crate::ui::human_bytes;

/// `vbackup daemon`.
#[derive(Debug, Args)]
pub struct DaemonArgs {}

/// `vbackup jobs`.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// The daemon's API socket (default: `socket` of the configuration
    /// file's [daemon] section, else /run/vbackup.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: JobsCommand,
}

/// `vbackup jobs ...`.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Every job: schedule, next run, last result.
    List,
    /// Run a job now (`backup/web1`, or just `web1`; `verify/REPO`, `prune/REPO`).
    Run {
        /// The job.
        name: String,
    },
    /// Runs in progress with their progress, and jobs whose last run failed.
    Status,
    /// Past runs, newest first.
    History {
        /// Only this VM's runs.
        #[arg(long)]
        vm: Option<String>,
        /// Only this job's runs.
        #[arg(long)]
        job: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Cancel a running run.
    Cancel {
        /// The run's id (`jobs status` shows it).
        id: i64,
    },
}

/// The configuration file the daemon and `jobs` read: `--config`, else
/// /etc/vbackup/vbackup.toml.
fn config_path(ctx: &Context) -> PathBuf {
    ctx.global
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(SYSTEM_CONFIG))
}

/// `vbackup daemon`: runs until SIGTERM or SIGINT; SIGHUP reloads.
pub fn daemon(ctx: &Context, _args: &DaemonArgs) -> Result<()> {
    let signals = vbackup_daemon::service::Signals {
        stop: ctx.signal.clone(),
        reload: crate::ui::install_reload_flag(),
    };
    let path = config_path(ctx);
    let quiet = ctx.global.quiet;
    vbackup_daemon::service::run(&path, &signals, &|line| {
        if !quiet {
            eprintln!("vbackup daemon: {line}");
        }
    })?;
    Ok(())
}

/// `vbackup jobs ...`.
pub fn jobs(ctx: &Context, args: &JobsArgs) -> Result<()> {
    let socket = match &args.socket {
        Some(socket) => socket.clone(),
        None => Config::load(&config_path(ctx))?.daemon.socket,
    };
    let client = Client::new(&socket);
    match &args.command {
        JobsCommand::List => list(ctx, &client.get::<Vec<JobStatus>>("/api/v1/jobs")?),
        JobsCommand::Status => status(ctx, &client.get::<Vec<JobStatus>>("/api/v1/jobs")?),
        JobsCommand::Run { name } => {
            let started: RunStarted =
                client.post("/api/v1/runs", &RunRequest { job: name.clone() })?;
            if !ctx.json(&started)? {
                match started.run {
                    Some(id) => ctx.say(format!("started run {id} of {name}")),
                    None => ctx.say(format!(
                        "{name} waits for its VM, its repository or the daemon's limits; it starts as soon as it may"
                    )),
                }
            }
            Ok(())
        }
        JobsCommand::History { vm, job, limit } => {
            let mut query = format!("/api/v1/runs?limit={limit}");
            for (key, value) in [("vm", vm), ("job", job)] {
                if let Some(value) = value {
                    query.push_str(&format!("&{key}={}", encode(value)));
                }
            }
            history(ctx, &client.get::<Vec<Run>>(&query)?)
        }
        JobsCommand::Cancel { id } => {
            let answer: serde_json::Value =
                client.post(&format!("/api/v1/runs/{id}/cancel"), &serde_json::json!({}))?;
            if !ctx.json(&answer)? {
                ctx.say(format!("run {id} is being cancelled"));
            }
            Ok(())
        }
    }
}

/// `value` for a URL query (letters, digits and `-._~/` kept).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn list(ctx: &Context, jobs: &[JobStatus]) -> Result<()> {
    if !ctx.text_wanted(&jobs)? {
        return Ok(());
    }
    println!(
        "{:<24}  {:<16}  {:<25}  {:<10}  LAST RUN",
        "JOB", "SCHEDULE", "NEXT RUN", "RESULT"
    );
    for job in jobs {
        let last = job.last_run.as_ref();
        println!(
            "{:<24}  {:<16}  {:<25}  {:<10}  {}",
            job.name,
            job.schedule.as_deref().unwrap_or("on demand"),
            job.next_run.as_deref().map_or("-".to_string(), short_time),
            match &job.running {
                Some(_) => "running",
                None => last.map_or("-", |r| r.status.as_str()),
            },
            last.map_or("never".to_string(), |r| short_time(&r.started)),
        );
    }
    Ok(())
}

fn status(ctx: &Context, jobs: &[JobStatus]) -> Result<()> {
    if !ctx.text_wanted(&jobs)? {
        return Ok(());
    }
    let failed: Vec<&JobStatus> = jobs
        .iter()
        .filter(|j| {
            j.running.is_none()
                && j.last_run.as_ref().is_some_and(|r| {
                    !matches!(r.status, vbackup_daemon::history::Status::Succeeded)
                })
        })
        .collect();
    for job in &failed {
        if let Some(run) = &job.last_run {
            println!(
                "PROBLEM  {}: run {} {} at {}: {}",
                job.name,
                run.id,
                run.status.as_str(),
                short_time(run.ended.as_deref().unwrap_or(&run.started)),
                run.error.as_deref().unwrap_or("no reason recorded")
            );
        }
    }
    let breached: Vec<&JobStatus> = jobs
        .iter()
        .filter(|j| j.rpo.as_ref().is_some_and(|r| r.breached))
        .collect();
    for job in &breached {
        if let Some(rpo) = &job.rpo {
            println!(
                "PROBLEM  {}: the newest good backup is {} old, past its RPO of {}",
                job.name,
                human_duration(rpo.age_seconds),
                human_duration(rpo.rpo_seconds)
            );
        }
    }
    let mut running = 0;
    for job in jobs {
        if let Some(progress) = &job.running {
            running += 1;
            let percent = match progress.total_bytes {
                0 => String::from("planning"),
                total => format!("{:.0}%", progress.done_bytes as f64 * 100.0 / total as f64),
            };
            println!(
                "RUNNING  {}: run {} since {}, {} of {} ({percent})",
                job.name,
                progress.run,
                short_time(&progress.started),
                human_bytes(progress.done_bytes),
                human_bytes(progress.total_bytes)
            );
        }
    }
    if failed.is_empty() && breached.is_empty() && running == 0 {
        println!("no job running, no problem ({} job(s))", jobs.len());
    }
    Ok(())
}

fn history(ctx: &Context, runs: &[Run]) -> Result<()> {
    if !ctx.text_wanted(&runs)? {
        return Ok(());
    }
    println!(
        "{:>5}  {:<20}  {:<20}  {:<9}  {:<11}  {:>9}  {:>9}  SNAPSHOT / ERROR",
        "RUN", "JOB", "STARTED", "TRIGGER", "RESULT", "SECONDS", "READ"
    );
    for run in runs {
        println!(
            "{:>5}  {:<20}  {:<20}  {:<9}  {:<11}  {:>9}  {:>9}  {}",
            run.id,
            run.job,
            short_time(&run.started),
            run.trigger,
            run.status.as_str(),
            run.seconds.map_or("-".into(), |s| format!("{s:.1}")),
            human_bytes(run.bytes_read),
            run.error
                .as_deref()
                .or(run.snapshot.as_deref().map(|s| &s[..s.len().min(8)]))
                .unwrap_or("")
        );
    }
    Ok(())
}

/// Seconds as `3h 20m`, `45m`, `12s`.
fn human_duration(seconds: u64) -> String {
    let (h, m, s) = (seconds / 3600, seconds % 3600 / 60, seconds % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, m) => format!("{m}m"),
        (h, 0) => format!("{h}h"),
        (h, m) => format!("{h}h {m}m"),
    }
}

/// An RFC 3339 time to the second, without the zone suffix's noise.
fn short_time(time: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(time).map_or_else(
        |_| time.to_string(),
        |t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        },
    )
}
