//! Prometheus metrics, from the history and the scheduler, rendered at
//! each scrape (`GET /metrics` on the daemon's `listen` address).
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `vbackup_job_last_success_timestamp_seconds` | job | end of the newest successful run |
//! | `vbackup_job_last_run_duration_seconds` | job | wall time of the newest run |
//! | `vbackup_job_last_run_success` | job | 1 when the newest run succeeded, else 0 |
//! | `vbackup_job_runs_total` | job, status | runs recorded, by how they ended |
//! | `vbackup_job_bytes_read_total`, `_new_total`, `_stored_total` | job | bytes over all runs |
//! | `vbackup_job_running` | job | 1 while a run is in progress |
//! | `vbackup_job_read_bytes_per_second`, `_stored_bytes_per_second` | job | measured speeds over the newest successful runs |
//! | `vbackup_vm_rpo_seconds`, `vbackup_vm_backup_age_seconds`, `vbackup_vm_rpo_breached` | vm | recovery point against its objective |
//!
//! Built with the `prometheus-client` crate; its text encoder writes the
//! OpenMetrics exposition format, which Prometheus scrapes.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::scheduler::Daemon;
use crate::{Error, Result};

/// Label sets: `[("job", name)]` and the like.
type Labels = Vec<(String, String)>;

/// A float gauge family.
type FloatGauges = Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>;

/// The metrics text of `daemon` now.
pub fn render(daemon: &Daemon) -> Result<String> {
    let mut registry = Registry::with_prefix("vbackup");
    let last_success = FloatGauges::default();
    let duration = FloatGauges::default();
    let last_ok = Family::<Labels, Gauge>::default();
    let running = Family::<Labels, Gauge>::default();
    let (read_speed, store_speed) = (FloatGauges::default(), FloatGauges::default());
    let runs = Family::<Labels, Counter>::default();
    let (read, new, stored) = (
        Family::<Labels, Counter>::default(),
        Family::<Labels, Counter>::default(),
        Family::<Labels, Counter>::default(),
    );
    let (rpo, age, breached) = (
        Family::<Labels, Gauge>::default(),
        Family::<Labels, Gauge>::default(),
        Family::<Labels, Gauge>::default(),
    );
    for status in daemon.status()? {
        let job = vec![("job".to_string(), status.name.clone())];
        if let Some(end) = status
            .last_success
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        {
            last_success
                .get_or_create(&job)
                .set(end.timestamp_millis() as f64 / 1000.0);
        }
        if let Some(last) = &status.last_run {
            if let Some(seconds) = last.seconds {
                duration.get_or_create(&job).set(seconds);
            }
            let ok = last.status == crate::history::Status::Succeeded;
            last_ok.get_or_create(&job).set(i64::from(ok));
        }
        running
            .get_or_create(&job)
            .set(i64::from(status.running.is_some()));
        if let Some(speeds) = &status.speeds {
            read_speed
                .get_or_create(&job)
                .set(speeds.read_bytes_per_second);
            store_speed
                .get_or_create(&job)
                .set(speeds.stored_bytes_per_second);
        }
        if let (Some(vm), Some(state)) = (&status.vm, &status.rpo) {
            let vm = vec![("vm".to_string(), vm.clone())];
            rpo.get_or_create(&vm).set(gauge(state.rpo_seconds));
            age.get_or_create(&vm).set(gauge(state.age_seconds));
            breached.get_or_create(&vm).set(i64::from(state.breached));
        }
    }
    for total in daemon.history().totals()? {
        let job = vec![("job".to_string(), total.job.clone())];
        for (status, count) in &total.runs {
            let labels = vec![
                ("job".to_string(), total.job.clone()),
                ("status".to_string(), status.clone()),
            ];
            runs.get_or_create(&labels).inc_by(*count);
        }
        read.get_or_create(&job).inc_by(total.bytes_read);
        new.get_or_create(&job).inc_by(total.bytes_new);
        stored.get_or_create(&job).inc_by(total.bytes_stored);
    }
    registry.register(
        "job_last_success_timestamp_seconds",
        "End of the newest successful run (Unix time)",
        last_success,
    );
    registry.register(
        "job_last_run_duration_seconds",
        "Wall time of the newest run",
        duration,
    );
    registry.register(
        "job_last_run_success",
        "1 when the newest run succeeded",
        last_ok,
    );
    registry.register("job_running", "1 while a run is in progress", running);
    registry.register(
        "job_read_bytes_per_second",
        "Measured read speed over the newest successful runs",
        read_speed,
    );
    registry.register(
        "job_stored_bytes_per_second",
        "Measured storing speed over the newest successful runs",
        store_speed,
    );
    registry.register("job_runs", "Runs recorded, by how they ended", runs);
    registry.register("job_bytes_read", "Bytes read from sources", read);
    registry.register("job_bytes_new", "Bytes of new data", new);
    registry.register("job_bytes_stored", "Bytes stored in the repository", stored);
    registry.register("vm_rpo_seconds", "The VM's recovery point objective", rpo);
    registry.register(
        "vm_backup_age_seconds",
        "Age of the VM's newest good backup",
        age,
    );
    registry.register(
        "vm_rpo_breached",
        "1 when the newest good backup is older than the RPO",
        breached,
    );
    let mut text = String::new();
    encode(&mut text, &registry)
        .map_err(|e| Error::Invalid(format!("encoding the metrics: {e}")))?;
    Ok(text)
}

/// A count as a gauge value.
fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
