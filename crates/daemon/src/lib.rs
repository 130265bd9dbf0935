//! vbackup's scheduler daemon, as a library.
//!
//! - [`config`]: the configuration file every front end reads (named
//!   repositories and VMs for the CLI; schedules, retention, verify and
//!   prune jobs for the daemon).
//! - [`schedule`]: calendar expressions (systemd-like and cron).
//!
//! The daemon calls the engine as a library (`vbackup-open`,
//! `vbackup-vm`, `vbackup-core`), never the `vbackup` binary.
#![deny(missing_docs)]

pub mod config;
mod error;
pub mod schedule;

pub use error::{Error, Result};
