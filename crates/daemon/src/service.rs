//! The daemon's main loop: the scheduler ticking once a second, the API
//! on its socket, a reload on request (SIGHUP) and a clean stop (SIGTERM).

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::history::{Run, Status};
use crate::notify::Event;
use crate::scheduler::{Clock, Daemon, SystemClock};
use crate::Result;

/// How often the scheduler looks at the clock.
const TICK: Duration = Duration::from_secs(1);

/// Flags a front end sets from signals.
#[derive(Debug, Clone, Default)]
pub struct Signals {
    /// Stop: cancel the runs in progress, record them, and return.
    pub stop: Arc<AtomicBool>,
    /// Read the configuration file again.
    pub reload: Arc<AtomicBool>,
}

/// Runs the daemon on the configuration file `path` until `signals.stop`
/// is set; `log` receives one line per event (runs started and ended,
/// reloads, refused configurations).
pub fn run(path: &Path, signals: &Signals, log: &(dyn Fn(&str) + Sync)) -> Result<()> {
    let config = Config::load(path)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let daemon = Arc::new(Daemon::new(config.clone(), clock)?);
    let _api = crate::api::serve_unix(daemon.clone(), &config.daemon.socket)?;
    let _listener = match &config.daemon.listen {
        Some(listen) => Some(crate::api::serve_tcp(daemon.clone(), listen)?),
        None => None,
    };
    log(&format!(
        "started: {} job(s), history in {}, API on {}{}",
        daemon.jobs().len(),
        daemon.history().file().display(),
        config.daemon.socket.display(),
        config
            .daemon
            .listen
            .as_deref()
            .map(|l| format!(", metrics and reads on http://{l}"))
            .unwrap_or_default()
    ));
    let mut breached = HashSet::new();
    let mut ticks: u64 = 0;
    while !signals.stop.load(Ordering::SeqCst) {
        if signals.reload.swap(false, Ordering::SeqCst) {
            reload(&daemon, path, log);
        }
        let notify = daemon.config().notify;
        match daemon.tick() {
            Ok(report) => {
                for (id, job, trigger) in &report.started {
                    log(&format!("run {id} of {job} started ({})", trigger.as_str()));
                }
                for run in &report.ended {
                    log(&ended_line(run));
                    crate::notify::send(&notify, Event::for_run(run), delivery_log());
                }
            }
            Err(error) => log(&format!("error: {error}")),
        }
        if ticks.is_multiple_of(RPO_EVERY) {
            notify_breaches(&daemon, &notify, &mut breached, log);
        }
        ticks += 1;
        std::thread::sleep(TICK);
    }
    log("stopping: cancelling the runs in progress");
    daemon.cancel_all();
    daemon.wait_idle()?;
    log("stopped");
    Ok(())
}

/// Every how many ticks RPO breaches are looked for.
const RPO_EVERY: u64 = 10;

/// Where failed notification deliveries are reported (the daemon's log).
fn delivery_log() -> impl Fn(String) + Send + 'static {
    |line| eprintln!("vbackup daemon: {line}")
}

/// Notifies the VMs newly past their RPO (once per breach).
fn notify_breaches(
    daemon: &Daemon,
    notify: &crate::notify::NotifySection,
    breached: &mut HashSet<String>,
    log: &dyn Fn(&str),
) {
    let Ok(jobs) = daemon.status() else {
        return;
    };
    for job in jobs {
        let (Some(vm), Some(rpo)) = (&job.vm, &job.rpo) else {
            continue;
        };
        if !rpo.breached {
            breached.remove(&job.name);
        } else if breached.insert(job.name.clone()) {
            let event = Event::rpo_breach(&job.name, vm, rpo.age_seconds, rpo.rpo_seconds);
            log(&event.text);
            crate::notify::send(notify, event, delivery_log());
        }
    }
}

/// Reads the configuration again; a broken one is refused and the one in
/// force kept.
fn reload(daemon: &Daemon, path: &Path, log: &dyn Fn(&str)) {
    match Config::load(path).and_then(|config| daemon.reload(config)) {
        Ok(()) => log(&format!(
            "reloaded {}: {} job(s)",
            path.display(),
            daemon.jobs().len()
        )),
        Err(error) => log(&format!(
            "reload refused, the configuration in force stays: {error}"
        )),
    }
}

/// The log line of an ended run.
fn ended_line(run: &Run) -> String {
    let seconds = run.seconds.unwrap_or(0.0);
    match run.status {
        Status::Succeeded => format!(
            "run {} of {} succeeded in {seconds:.1} s{}{}",
            run.id,
            run.job,
            run.snapshot
                .as_deref()
                .map(|s| format!(": snapshot {}", &s[..s.len().min(8)]))
                .unwrap_or_default(),
            run.summary
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default()
        ),
        status => format!(
            "run {} of {} {} after {seconds:.1} s: {}",
            run.id,
            run.job,
            status.as_str(),
            run.error.as_deref().unwrap_or("no reason recorded")
        ),
    }
}
