//! The `vbackup` command: parses arguments, opens the repository, runs one
//! command and maps its outcome to a documented exit code.
#![deny(missing_docs)]

mod args;
mod commands;
mod daemon;
mod docs;
mod lifecycle;
mod quickstart;
mod recover;
mod serve;
mod server;
mod ui;

use std::process::ExitCode;

use vbackup_core::ErrorClass;

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
/// Exit code: vbackup itself failed (a bug; EX_SOFTWARE of sysexits.h).
pub const EXIT_INTERNAL: u8 = 70;
/// Exit code: interrupted.
pub const EXIT_INTERRUPTED: u8 = 130;
/// Exit code: the reader of stdout or stderr went away (a shell reports
/// 128 + SIGPIPE the same way).
pub const EXIT_BROKEN_PIPE: u8 = 141;

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
    quiet_on_closed_output();
    let cli = args::parse();
    let repository = cli.global.repo.clone();
    match commands::run(cli) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(error) => {
            let text = naming_repository(chain(&error), &error, repository.as_deref());
            eprintln!("vbackup: error: {text}");
            let code = exit_code(&error);
            if let Some(hint) = hint(code) {
                eprintln!("vbackup: {hint}");
            }
            ExitCode::from(code)
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

/// Whether a storage backend's failure is in the error's chain (also
/// inside a VM job's error).
fn is_storage_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        let core = cause
            .downcast_ref::<vbackup_core::Error>()
            .or_else(|| match cause.downcast_ref::<vbackup_vm::Error>() {
                Some(vbackup_vm::Error::Core(core)) => Some(core),
                _ => None,
            });
        cause.is::<vbackup_storage::StorageError>()
            || matches!(core, Some(vbackup_core::Error::Storage(_)))
    })
}

/// The class of one link of an error chain, if it is one of vbackup's
/// errors: the engine's, a VM job's, QEMU's, the daemon's (its
/// configuration file), or an I/O error carrying one of them
/// ([`vbackup_core::Classified`]).
fn link_class(cause: &(dyn std::error::Error + 'static)) -> Option<ErrorClass> {
    if let Some(core) = cause.downcast_ref::<vbackup_core::Error>() {
        return Some(core.class());
    }
    if let Some(daemon) = cause.downcast_ref::<vbackup_daemon::Error>() {
        return Some(daemon.class());
    }
    if let Some(vm) = cause.downcast_ref::<vbackup_vm::Error>() {
        return Some(vm.class());
    }
    if let Some(qemu) = cause.downcast_ref::<vbackup_qemu::Error>() {
        return Some(qemu.class());
    }
    let io = cause.downcast_ref::<std::io::Error>()?;
    vbackup_core::Classified::find(io).map(vbackup_core::Classified::class)
}

/// Lets a closed pipe on stdout or stderr end vbackup quietly, as it
/// ends any Unix tool (`vbackup snapshots | head -1`), with exit code
/// [`EXIT_BROKEN_PIPE`] instead of a panic message from `println!`.
/// (SIGPIPE stays ignored: network writes of the S3 and server code use
/// `writev`, which would raise it for a peer that went away.) Nothing is
/// lost: a backup stopped this way records nothing, like one stopped by
/// Ctrl-C.
fn quiet_on_closed_output() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        let printing = message.starts_with("failed printing to stdout")
            || message.starts_with("failed printing to stderr");
        if printing && message.contains("Broken pipe") {
            std::process::exit(i32::from(EXIT_BROKEN_PIPE));
        }
        default(info);
    }));
}

/// The exit code of a failed command: its own ([`ExitError`]), else the
/// one of the class of the outermost of vbackup's errors in its chain,
/// else [`EXIT_FAILURE`].
fn exit_code(error: &anyhow::Error) -> u8 {
    if let Some(exit) = error.downcast_ref::<ExitError>() {
        return exit.code;
    }
    error
        .chain()
        .find_map(link_class)
        .map_or(EXIT_FAILURE, class_exit_code)
}

/// What to do about a failure with exit `code`, where the error itself
/// cannot say it (the libraries give no hints).
fn hint(code: u8) -> Option<&'static str> {
    (code == EXIT_INTERNAL).then_some(
        "this is a bug in vbackup, not a mistake of yours; please report it with the command line and the message above",
    )
}

/// The documented exit code of an error class.
fn class_exit_code(class: ErrorClass) -> u8 {
    match class {
        ErrorClass::Authentication => EXIT_AUTH,
        ErrorClass::Usage => EXIT_USAGE,
        ErrorClass::Integrity => EXIT_DAMAGE,
        ErrorClass::Interrupted => EXIT_INTERRUPTED,
        ErrorClass::Internal => EXIT_INTERNAL,
        ErrorClass::Runtime => EXIT_FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;

    use anyhow::Context;

    use super::*;

    fn in_use() -> vbackup_qemu::Error {
        vbackup_qemu::Error::InUse {
            path: PathBuf::from("/vm/web1.qcow2"),
            holder: "a running VM".into(),
            advice: "shut it down".into(),
        }
    }

    fn missing_image() -> vbackup_qemu::Error {
        vbackup_qemu::Error::Image {
            path: PathBuf::from("/vm/gone.qcow2"),
            error: Box::new(vbackup_qemu::Error::Io {
                context: "opening".into(),
                error: io::Error::from(io::ErrorKind::NotFound),
            }),
        }
    }

    fn source(error: vbackup_qemu::Error) -> vbackup_core::Error {
        vbackup_core::Error::Source {
            disk: "vda".into(),
            source: error.into(),
        }
    }

    /// Issue 11: internal failures exited 2, "bad usage".
    #[test]
    fn issue11_internal_errors_exit_70() {
        let panicked = vbackup_core::Error::Internal("a worker thread panicked".into());
        assert_eq!(exit_code(&anyhow::Error::new(panicked)), EXIT_INTERNAL);
        let wrapped = anyhow::Error::new(vbackup_vm::Error::from(source(
            vbackup_qemu::Error::Internal("writer after finish".into()),
        )));
        assert_eq!(exit_code(&wrapped), EXIT_INTERNAL);
        assert_eq!(EXIT_INTERNAL, 70);
        assert!(hint(EXIT_INTERNAL).is_some_and(|h| h.contains("bug")));
        assert_eq!(hint(EXIT_USAGE), None);
        assert_eq!(hint(EXIT_FAILURE), None);
    }

    /// Issue 11: QEMU's and VM jobs' errors all exited 1 whatever their
    /// cause; the code now follows the original class, across each crate
    /// boundary (qemu → core → vm → CLI).
    #[test]
    fn issue11_exit_code_follows_the_class_across_crates() {
        let qemu = anyhow::Error::new(missing_image());
        assert_eq!(exit_code(&qemu), EXIT_USAGE);
        let vm = vbackup_vm::Error::qemu("inspecting disk 'vda'")(missing_image());
        assert_eq!(exit_code(&anyhow::Error::new(vm)), EXIT_USAGE);
        let through_core = vbackup_vm::Error::from(source(missing_image()));
        let error = anyhow::Error::new(through_core).context("backing up web1");
        assert_eq!(exit_code(&error), EXIT_USAGE);
        let busy = vbackup_vm::Error::from(source(in_use()));
        assert_eq!(exit_code(&anyhow::Error::new(busy)), EXIT_FAILURE);
        let damaged = vbackup_qemu::Error::Damaged {
            command: "qemu-img check -f qcow2 /vm/web1.qcow2".into(),
            report: "2 errors were found on the image.".into(),
        };
        let damaged = vbackup_vm::Error::qemu("opening disk 'vda'")(damaged);
        assert_eq!(exit_code(&anyhow::Error::new(damaged)), EXIT_DAMAGE);
        let io: io::Error = missing_image().into();
        let io = anyhow::Error::new(io).context("creating the restore target");
        assert_eq!(exit_code(&io), EXIT_USAGE);
    }

    #[test]
    fn exit_codes_of_other_errors_are_unchanged() {
        let usage = vbackup_core::Error::InvalidInput("no disks to back up".into());
        assert_eq!(exit_code(&anyhow::Error::new(usage)), EXIT_USAGE);
        let plain = anyhow::Error::new(io::Error::other("disk on fire"));
        assert_eq!(exit_code(&plain), EXIT_FAILURE);
        let own = anyhow::Error::new(ExitError {
            code: EXIT_DAMAGE,
            message: "verify found damage".into(),
        });
        assert_eq!(exit_code(&own), EXIT_DAMAGE);
        let vm_invalid = vbackup_vm::Error::Invalid("the VM has no disk 'x'".into());
        assert_eq!(exit_code(&anyhow::Error::new(vm_invalid)), EXIT_USAGE);
        let interrupted = anyhow::Error::new(vbackup_core::Error::Interrupted);
        assert_eq!(exit_code(&interrupted), EXIT_INTERRUPTED);
        let wrong = vbackup_core::Error::WrongPassphrase {
            location: "/srv/vbackup".into(),
            keys: 1,
        };
        assert_eq!(exit_code(&anyhow::Error::new(wrong)), EXIT_AUTH);
        let missing: Result<(), io::Error> = Err(io::Error::from(io::ErrorKind::NotFound));
        let context = missing.context("reading the password file").unwrap_err();
        assert_eq!(exit_code(&context), EXIT_FAILURE);
    }

    #[test]
    fn storage_errors_name_the_repository_they_concern() {
        let storage = vbackup_storage::StorageError::new(
            vbackup_storage::ErrorKind::PermissionDenied,
            "config",
            "reading the object: the server refused it",
        );
        let error = anyhow::Error::new(vbackup_core::Error::Storage(storage));
        let url = "https://backup.example:8443/web1";
        assert_eq!(
            naming_repository(chain(&error), &error, Some(url)),
            format!(
                "repository {url}: reading the object: the server refused it (object 'config')"
            )
        );
        // Already named, or not a storage failure, or no repository: as it is.
        let named = error.context(format!("cannot create the repository at {url}"));
        let text = chain(&named);
        assert_eq!(naming_repository(text.clone(), &named, Some(url)), text);
        let usage = anyhow::Error::new(vbackup_core::Error::InvalidInput("no disks".into()));
        assert_eq!(
            naming_repository("no disks".into(), &usage, Some(url)),
            "no disks"
        );
        let io = anyhow::Error::new(io::Error::other("disk on fire"));
        assert_eq!(
            naming_repository("disk on fire".into(), &io, None),
            "disk on fire"
        );
    }
}
