//! Notifications: a webhook and email on failures, RPO breaches and (if
//! asked) successes.
//!
//! ```toml
//! [notify]
//! webhook = "https://hooks.slack.com/services/..."   # or any URL taking JSON
//! on = ["failure", "rpo"]                             # add "success" for every run
//! email = { to = ["ops@example.com"], from = "vbackup@kvm-3.example.com", smtp = "smtp://localhost:25" }
//! # or sendmail = "/usr/sbin/sendmail" instead of smtp
//! ```
//!
//! The webhook's body is one JSON object whose `text` field is a sentence
//! a person reads (what Slack's and Mattermost's incoming webhooks show),
//! with the event, the job, the VM and the run alongside for programs.
//! Email goes through SMTP (`lettre`: `smtp://HOST:PORT` plain or with
//! `?tls=required` for STARTTLS, `smtps://` for TLS, credentials in the URL)
//! or the local sendmail. Delivery happens on a thread of its own with a
//! 10 s timeout, so a slow receiver never holds up the scheduler; a failed
//! delivery is logged.

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
    /// Email to send the same events to.
    #[serde(default)]
    pub email: Option<EmailSection>,
}

/// `[notify] email`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EmailSection {
    /// The recipients.
    pub to: Vec<String>,
    /// The sender.
    pub from: String,
    /// The SMTP server as a URL (`smtp://localhost:25`,
    /// `smtp://relay:587?tls=required`, `smtps://user:pass@relay:465`).
    #[serde(default)]
    pub smtp: Option<String>,
    /// The sendmail program, instead of SMTP.
    #[serde(default)]
    pub sendmail: Option<std::path::PathBuf>,
}

impl EmailSection {
    /// Refuses addresses that do not parse and a missing or double
    /// transport.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.to.is_empty() {
            return Err("[notify] email has no recipient (to = [...])".into());
        }
        for address in self.to.iter().chain([&self.from]) {
            address
                .parse::<lettre::message::Mailbox>()
                .map_err(|e| format!("[notify] email address '{address}': {e}"))?;
        }
        match (&self.smtp, &self.sendmail) {
            (Some(url), None) => lettre::SmtpTransport::from_url(url)
                .map(drop)
                .map_err(|e| format!("[notify] email smtp '{url}': {e}")),
            (None, Some(_)) => Ok(()),
            _ => Err(
                "[notify] email needs exactly one of smtp = \"URL\" and sendmail = \"PATH\"".into(),
            ),
        }
    }
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
    if !section.on.contains(&event.event) || (section.webhook.is_none() && section.email.is_none())
    {
        return;
    }
    let (webhook, email) = (section.webhook.clone(), section.email.clone());
    let spawned = std::thread::Builder::new()
        .name("notify".into())
        .spawn(move || {
            if let Some(url) = webhook {
                if let Err(error) = post(&url, &event) {
                    log(format!("notification to {url} failed: {error}"));
                }
            }
            if let Some(email) = email {
                if let Err(error) = mail(&email, &event) {
                    log(format!(
                        "email notification to {} failed: {error}",
                        email.to.join(", ")
                    ));
                }
            }
        });
    if let Err(error) = spawned {
        eprintln!("vbackup daemon: cannot start a notification thread: {error}");
    }
}

/// Mails `event` as configured in `email`.
fn mail(email: &EmailSection, event: &Event) -> std::result::Result<(), String> {
    use lettre::Transport as _;
    let subject = match &event.run {
        Some(run) => format!(
            "[vbackup] {} run {} {}",
            run.job,
            run.id,
            run.status.as_str()
        ),
        None => format!("[vbackup] {}: RPO breached", event.job),
    };
    let mut builder = lettre::Message::builder()
        .from(email.from.parse().map_err(|e| format!("{e}"))?)
        .subject(subject);
    for to in &email.to {
        builder = builder.to(to.parse().map_err(|e| format!("{e}"))?);
    }
    let details = event
        .run
        .as_ref()
        .and_then(|run| serde_json::to_string_pretty(run).ok())
        .unwrap_or_default();
    let message = builder
        .header(lettre::message::header::ContentType::TEXT_PLAIN)
        .body(format!("{}\n\n{details}\n", event.text))
        .map_err(|e| e.to_string())?;
    match (&email.smtp, &email.sendmail) {
        (Some(url), _) => lettre::SmtpTransport::from_url(url)
            .map_err(|e| e.to_string())?
            .timeout(Some(Duration::from_secs(10)))
            .build()
            .send(&message)
            .map(drop)
            .map_err(|e| e.to_string()),
        (None, Some(program)) => lettre::SendmailTransport::new_with_command(program)
            .send(&message)
            .map(drop)
            .map_err(|e| e.to_string()),
        (None, None) => Err("no transport".into()),
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
