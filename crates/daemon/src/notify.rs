//! Notifications: a webhook on failures, RPO breaches and (if asked)
//! successes.
//!
//! ```toml
//! [notify]
//! webhook = "https://hooks.slack.com/services/..."   # or any URL taking JSON
//! on = ["failure", "rpo"]                             # add "success" for every run
//! ```
//!
//! The body is one JSON object whose `text` field is a sentence a person
//! reads (what Slack's and Mattermost's incoming webhooks show), with the
//! event, the job, the VM and the run alongside for programs. Delivery
//! happens on a thread of its own with a 10 s timeout, so a slow receiver
//! never holds up the scheduler; a failed delivery is logged.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::history::Run;

/// `[notify]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NotifySection {
    /// The URL that receives a JSON POST per event.
    #[serde(default)]
    pub webhook: Option<String>,
    /// The events sent.
    #[serde(default = "default_events")]
    pub on: Vec<EventKind>,
}

fn default_events() -> Vec<EventKind> {
    vec![EventKind::Failure, EventKind::Rpo]
}

/// What is notified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A run failed, was cancelled or was interrupted.
    Failure,
    /// A VM's newest good backup became older than its RPO.
    Rpo,
    /// A run succeeded.
    Success,
}

/// One notification.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Event {
    /// What happened, for a person.
    pub text: String,
    /// `failure`, `rpo` or `success`.
    pub event: EventKind,
    /// The job.
    pub job: String,
    /// The VM, for backups.
    pub vm: Option<String>,
    /// The run, for run events.
    pub run: Option<Run>,
    /// The host the daemon runs on.
    pub host: String,
}

impl Event {
    /// The event for an ended run, if it is one that is notified.
    pub fn for_run(run: &Run) -> Event {
        let failed = run.status != crate::history::Status::Succeeded;
        let text = match failed {
            true => format!(
                "vbackup on {}: {} run {} {}: {}",
                host(),
                run.job,
                run.id,
                run.status.as_str(),
                run.error.as_deref().unwrap_or("no reason recorded")
            ),
            false => format!(
                "vbackup on {}: {} run {} succeeded in {:.0} s{}",
                host(),
                run.job,
                run.id,
                run.seconds.unwrap_or(0.0),
                run.snapshot
                    .as_deref()
                    .map(|s| format!(", snapshot {}", &s[..s.len().min(8)]))
                    .unwrap_or_default()
            ),
        };
        Event {
            text,
            event: match failed {
                true => EventKind::Failure,
                false => EventKind::Success,
            },
            job: run.job.clone(),
            vm: run.vm.clone(),
            run: Some(run.clone()),
            host: host(),
        }
    }

    /// The event for a VM whose newest good backup is `age_seconds` old,
    /// past its RPO.
    pub fn rpo_breach(job: &str, vm: &str, age_seconds: u64, rpo_seconds: u64) -> Event {
        Event {
            text: format!(
                "vbackup on {}: VM '{vm}' has no good backup for {} (its RPO is {})",
                host(),
                humantime::format_duration(Duration::from_secs(age_seconds)),
                humantime::format_duration(Duration::from_secs(rpo_seconds))
            ),
            event: EventKind::Rpo,
            job: job.to_string(),
            vm: Some(vm.to_string()),
            run: None,
            host: host(),
        }
    }
}

/// This machine's name.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Sends `event` if `section` asks for its kind, on a thread of its own;
/// `log` hears of failed deliveries.
pub fn send(section: &NotifySection, event: Event, log: impl Fn(String) + Send + 'static) {
    let Some(url) = section.webhook.clone() else {
        return;
    };
    if !section.on.contains(&event.event) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("notify".into())
        .spawn(move || {
            if let Err(error) = post(&url, &event) {
                log(format!("notification to {url} failed: {error}"));
            }
        });
    if let Err(error) = spawned {
        eprintln!("vbackup daemon: cannot start a notification thread: {error}");
    }
}

/// POSTs `event` as JSON to `url`.
fn post(url: &str, event: &Event) -> std::result::Result<(), String> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let body = serde_json::to_string(event).map_err(|e| e.to_string())?;
    agent
        .post(url)
        .set("Content-Type", "application/json")
        .send_string(&body)
        .map(drop)
        .map_err(|e| e.to_string())
}
