//! vbackup's scheduler daemon, as a library.
//!
//! - [`config`]: the configuration file every front end reads (named
//!   repositories and VMs for the CLI; schedules, retention, verify and
//!   prune jobs for the daemon).
//! - [`schedule`]: calendar expressions (systemd-like and cron);
//!   [`backup_type`]: a VM's backup type or type pattern.
//! - [`history`]: every run and the scheduler's memory, in SQLite.
//! - [`jobs`]: the jobs a configuration defines, run through the library.
//! - [`api`]: the REST API on a unix socket (and reads on TCP);
//!   [`client`]: its client; [`metrics`]: Prometheus `/metrics`;
//!   [`notify`]: webhooks on failures and RPO breaches; [`views`]: the
//!   repositories' usage and snapshots for the dashboard.
//! - [`scheduler`]: what runs when (catch-up, limits, conflicts, retries,
//!   timeouts), on an injectable clock; [`service`]: the main loop.
//!
//! The daemon calls the engine as a library (`vbackup-open`,
//! `vbackup-vm`, `vbackup-core`), never the `vbackup` binary.
#![deny(missing_docs)]

pub mod api;
pub mod backup_type;
pub mod client;
pub mod config;
mod error;
pub mod history;
pub mod jobs;
pub mod metrics;
pub mod notify;
pub mod schedule;
pub mod scheduler;
pub mod service;
pub mod views;

pub use error::{Error, Result};
