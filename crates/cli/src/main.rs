//! The `vbackup` command: parses arguments, opens the repository, runs one
//! command and maps its outcome to a documented exit code.
#![deny(missing_docs)]

mod args;
mod commands;
mod docs;
mod lifecycle;
mod quickstart;
mod server;
mod synth;
mod ui;

use std::process::ExitCode;

use clap::FromArgMatches as _;
use vbackup_core::ErrorClass;

use args::Cli;

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: the operation failed.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: bad usage.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: damaged data.
pub const EXIT_DAMAGE: u8 = 3;
/// Exit code: wrong or missing passphrase.
pub const EXIT_AUTH: u8 = 4;
/// Exit code: interrupted.
pub const EXIT_INTERRUPTED: u8 = 130;

/// An error that carries its own exit code (for outcomes that are not core
/// errors, such as "verify found damage").
#[derive(Debug)]
pub struct ExitError {
    /// The exit code.
    pub code: u8,
    /// What to tell the user.
    pub message: String,
}

impl std::fmt::Display for ExitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitError {}

fn main() -> ExitCode {
    let cli = Cli::from_arg_matches(&args::command().get_matches())
        .unwrap_or_else(|e| e.format(&mut args::command()).exit());
    let repository = cli.global.repo.clone();
    match commands::run(cli) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(error) => {
            let text = naming_repository(chain(&error), &error, repository.as_deref());
            eprintln!("vbackup: error: {text}");
            ExitCode::from(exit_code(&error))
        }
    }
}

/// The error with its causes, `: `-separated, without repeating a message
/// that a wrapper already includes.
fn chain(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// The error text, prefixed with the repository's location when a
/// storage failure's text does not name it: "Not a directory" or "the
/// server refused" alone does not say which repository.
fn naming_repository(text: String, error: &anyhow::Error, repository: Option<&str>) -> String {
    match repository {
        Some(location) if is_storage_error(error) && !text.contains(location) => {
            format!("repository {location}: {text}")
        }
        _ => text,
    }
}

/// Whether a storage backend's failure is in the error's chain.
fn is_storage_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<vbackup_storage::StorageError>()
            || matches!(core_error(cause), Some(vbackup_core::Error::Storage(_)))
    })
}

/// The core error inside one link of an error chain (also when a VM job
/// error wraps it transparently).
fn core_error<'a>(cause: &'a (dyn std::error::Error + 'static)) -> Option<&'a vbackup_core::Error> {
    cause.downcast_ref::<vbackup_core::Error>().or_else(|| {
        match cause.downcast_ref::<vbackup_vm::Error>() {
            Some(vbackup_vm::Error::Core(core)) => Some(core),
            _ => None,
        }
    })
}

fn exit_code(error: &anyhow::Error) -> u8 {
    if let Some(exit) = error.downcast_ref::<ExitError>() {
        return exit.code;
    }
    let Some(core) = error.chain().find_map(core_error) else {
        return EXIT_FAILURE;
    };
    match core.class() {
        ErrorClass::Authentication => EXIT_AUTH,
        ErrorClass::Usage => EXIT_USAGE,
        ErrorClass::Integrity => EXIT_DAMAGE,
        ErrorClass::Interrupted => EXIT_INTERRUPTED,
        ErrorClass::Runtime => EXIT_FAILURE,
    }
}
