//! The one error type of this crate.
//!
//! Rules:
//! - Every public function returns [`Error`]; it says what failed and carries
//!   the words of whoever refused (the NBD server's message, qemu's stderr),
//!   because a user can only act on qemu's own reason ("Could not open ...:
//!   Image is not in qcow2 format").
//! - The `Display` text of each variant is complete on its own: nothing is
//!   hidden behind `source()`, so a message printed with or without its cause
//!   chain reads the same and nothing is printed twice.
//! - [`Error`] converts into [`std::io::Error`] with a fitting
//!   [`std::io::ErrorKind`], so it travels through `vbackup_core`'s
//!   `io::Result` traits without losing its text nor its class: it goes in
//!   a [`vbackup_core::Classified`], so the engine's error reports
//!   [`Error::class`] (an image in use stays a runtime failure, a missing
//!   image the user's mistake, a damaged image damaged data).

use std::io;
use std::path::{Path, PathBuf};

use vbackup_core::{Classified, ErrorClass};

use crate::nbd::proto;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to an NBD server or running qemu.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error, with what we were doing when it happened.
    #[error("{context}: {error}")]
    Io {
        /// What was being done, e.g. "reading NBD reply header".
        context: String,
        /// The underlying error.
        error: io::Error,
    },
    /// The NBD server broke the protocol; the connection is unusable.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// The NBD server refused an option during the handshake.
    #[error("NBD server refused {option}{}: {reply}{}", export_suffix(.export), message_suffix(.message))]
    OptionRejected {
        /// The option, e.g. `NBD_OPT_GO`.
        option: String,
        /// The export name the option was about, if any.
        export: Option<String>,
        /// The reply, e.g. `NBD_REP_ERR_UNKNOWN (export not available)`.
        reply: String,
        /// The server's human-readable message (may be empty).
        message: String,
    },
    /// The NBD server failed a command.
    #[error("NBD {command} failed: {}{}", proto::errno_name(*.errno), message_suffix(.message))]
    Server {
        /// The command, e.g. `NBD_CMD_READ`.
        command: &'static str,
        /// The NBD error value (`NBD_EIO`, ...).
        errno: u32,
        /// The server's human-readable message (may be empty).
        message: String,
    },
    /// The server does not offer what was asked for.
    #[error("NBD server does not support {0}")]
    Unsupported(&'static str),
    /// The request makes no sense (a format, bitmap or block node name, a
    /// socket path too long, a device too small, a read-only export): the
    /// user's to fix. A misuse by vbackup's own code is [`Error::Internal`].
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A program could not be started at all.
    #[error("could not run {program}: {error} (is QEMU installed?)")]
    Spawn {
        /// The program, e.g. `qemu-img`.
        program: String,
        /// Why it could not be started.
        error: io::Error,
    },
    /// A program ran and failed; `stderr` is its own explanation.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line, for the user to reproduce.
        command: String,
        /// How it ended, e.g. `exit status: 1`.
        status: String,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
    /// `qemu-img check` found the image damaged (corruption, not merely
    /// leaked clusters); `report` is its own account.
    #[error("`{command}` found the image damaged: {report}")]
    Damaged {
        /// The command line, for the user to reproduce.
        command: String,
        /// What qemu-img printed (details and verdict), trimmed.
        report: String,
    },
    /// vbackup used this crate wrongly (a broken invariant, not the
    /// user's request): worth a bug report.
    #[error("internal error: {0}")]
    Internal(String),
    /// A program's output could not be understood.
    #[error("unexpected output from `{command}`: {reason}")]
    BadOutput {
        /// The command line.
        command: String,
        /// What was wrong with the output.
        reason: String,
    },
    /// `qemu-nbd` did not come up.
    #[error("qemu-nbd could not serve {}: {reason}", .path.display())]
    QemuNbd {
        /// The image it was asked to serve.
        path: PathBuf,
        /// Why: qemu-nbd's stderr, or a timeout.
        reason: String,
    },
    /// A disk image could not be opened or created.
    #[error("disk image {}: {error}", .path.display())]
    Image {
        /// The image path.
        path: PathBuf,
        /// What went wrong.
        error: Box<Error>,
    },
    /// QEMU refused a QMP command; `desc` is QEMU's own explanation.
    #[error("QMP command '{command}' failed: {desc}{}", class_suffix(.class))]
    Qmp {
        /// The command, e.g. `transaction`.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `DeviceNotFound`.
        class: String,
        /// QEMU's description of the error.
        desc: String,
    },
    /// The guest agent refused a command; `desc` is its explanation.
    #[error("guest agent command '{command}' failed: {desc}{}", class_suffix(.class))]
    GuestAgent {
        /// The command, e.g. `guest-fsfreeze-freeze`.
        command: String,
        /// The agent's error class, e.g. `CommandNotFound`.
        class: String,
        /// The agent's description of the error.
        desc: String,
    },
    /// QEMU's monitor or the guest agent sent something that is not a
    /// valid reply; the connection is not used any more.
    #[error("unexpected message from {peer}: {reason}")]
    BadReply {
        /// Who sent it: `QEMU (QMP)` or `the guest agent`.
        peer: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// An NBD export does not offer the dirty bitmap that says what changed.
    #[error("NBD export '{export}' does not offer dirty bitmap '{bitmap}' (metadata context qemu:dirty-bitmap:{bitmap}); without it nothing tells which blocks changed")]
    MissingBitmap {
        /// The export name.
        export: String,
        /// The bitmap name.
        bitmap: String,
    },
    /// Another process uses the image in a way that conflicts with ours
    /// (QEMU's image locks say so, or qemu refused to get them).
    #[error("disk image {} is in use: {holder}; {advice}", .path.display())]
    InUse {
        /// The image or block device.
        path: PathBuf,
        /// Who holds it, as far as can be told.
        holder: String,
        /// What the user can do.
        advice: String,
    },
    /// The image does not exist: `error` is how that showed (qemu-img's
    /// own words, which name the path), kept apart from other failures
    /// because it is the user's to fix.
    #[error("{error}")]
    NotFound {
        /// The failure, as the tool reported it.
        error: Box<Error>,
    },
    /// Something failed for one disk of a running VM.
    #[error("disk {disk}: {error}")]
    Disk {
        /// The disk: device name, else node name.
        disk: String,
        /// What went wrong.
        error: Box<Error>,
    },
}

fn class_suffix(class: &str) -> String {
    if class.is_empty() || class == "GenericError" {
        String::new()
    } else {
        format!(" ({class})")
    }
}

fn export_suffix(export: &Option<String>) -> String {
    match export {
        Some(name) => format!(" for export '{name}'"),
        None => String::new(),
    }
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>, error: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            error,
        }
    }

    /// Builds a [`Error::Protocol`].
    pub(crate) fn protocol(what: impl Into<String>) -> Self {
        Error::Protocol(what.into())
    }

    /// Attaches the disk (of a running VM) this error is about.
    pub(crate) fn for_disk(self, disk: impl Into<String>) -> Self {
        Error::Disk {
            disk: disk.into(),
            error: Box::new(self),
        }
    }

    /// Attaches the image path this error is about.
    pub(crate) fn for_image(self, path: impl Into<PathBuf>) -> Self {
        if matches!(self, Error::InUse { .. } | Error::NotFound { .. }) {
            return self;
        }
        Error::Image {
            path: path.into(),
            error: Box::new(self),
        }
    }

    /// This error as [`Error::NotFound`] if `path` does not exist (what
    /// qemu-img's failure to open it then means), else as it is.
    pub(crate) fn missing_if_absent(self, path: &Path) -> Self {
        let absent = matches!(path.try_exists(), Ok(false));
        if absent && !matches!(self, Error::InUse { .. } | Error::NotFound { .. }) {
            Error::NotFound {
                error: Box::new(self),
            }
        } else {
            self
        }
    }

    /// A qemu tool's refusal to get an image lock as [`Error::InUse`],
    /// whose advice the user can follow, instead of qemu's raw words;
    /// `reading` for a backup's tools, else for a restore's. Any other
    /// error is returned as it is.
    pub(crate) fn in_use_if_locked(self, path: &Path, reading: bool) -> Self {
        if self.is_lock_refusal() {
            Error::in_use(path, reading)
        } else {
            self
        }
    }

    /// Whether qemu-img or qemu-nbd failed to get an image lock ("Failed
    /// to get shared \"write\" lock").
    fn is_lock_refusal(&self) -> bool {
        let text = match self {
            Error::Command { stderr, .. } => stderr,
            Error::QemuNbd { reason, .. } => reason,
            Error::Image { error, .. } => return error.is_lock_refusal(),
            _ => return false,
        };
        text.contains("Failed to get shared \"")
            || text.contains("Failed to get \"")
            || text.contains("Is another process using the image")
    }

    /// [`Error::InUse`] for `path`: `reading` for a backup (another
    /// process writes the image), else for a restore (another process
    /// uses the image that would be overwritten).
    pub(crate) fn in_use(path: &Path, reading: bool) -> Self {
        let (holder, advice) = if reading {
            (
                "another process holds it open for writing (a running VM, qemu-io, qemu-nbd)",
                "an offline backup would copy a disk that changes while it is read. \
                 Shut the VM down first, or back up the running VM through its QMP socket: \
                 vbackup backup --vm NAME --qmp /path/to/qmp.sock",
            )
        } else {
            (
                "another process has it open (a VM, qemu-img, qemu-nbd)",
                "restoring over it would corrupt what that process sees; stop it first",
            )
        };
        Error::InUse {
            path: path.to_owned(),
            holder: holder.to_string(),
            advice: advice.to_string(),
        }
    }

    /// The [`io::ErrorKind`] that best describes this error.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::Io { error, .. } | Error::Spawn { error, .. } => error.kind(),
            Error::Protocol(_) | Error::BadOutput { .. } => io::ErrorKind::InvalidData,
            Error::Server { errno, .. } => errno_kind(*errno),
            Error::Unsupported(_) => io::ErrorKind::Unsupported,
            Error::InvalidRequest(_) => io::ErrorKind::InvalidInput,
            Error::BadReply { .. } => io::ErrorKind::InvalidData,
            Error::MissingBitmap { .. } => io::ErrorKind::NotFound,
            Error::InUse { .. } => io::ErrorKind::ResourceBusy,
            Error::Damaged { .. } => io::ErrorKind::InvalidData,
            Error::Internal(_) => io::ErrorKind::Other,
            Error::OptionRejected { .. }
            | Error::Command { .. }
            | Error::QemuNbd { .. }
            | Error::Qmp { .. }
            | Error::GuestAgent { .. } => io::ErrorKind::Other,
            Error::NotFound { .. } => io::ErrorKind::NotFound,
            Error::Image { error, .. } | Error::Disk { error, .. } => error.kind(),
        }
    }

    /// Whose fault this is, in the engine's terms: a request that makes no
    /// sense or an image that does not exist is the user's
    /// ([`ErrorClass::Usage`]); a damaged image is damaged data
    /// ([`ErrorClass::Integrity`]); a misuse of this crate is vbackup's
    /// ([`ErrorClass::Internal`]); everything else, an image in use
    /// included, is a runtime failure.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidRequest(_) | Error::NotFound { .. } => ErrorClass::Usage,
            Error::Damaged { .. } => ErrorClass::Integrity,
            Error::Internal(_) => ErrorClass::Internal,
            Error::Image { error, .. } if error.is_missing_file() => ErrorClass::Usage,
            Error::Image { error, .. } | Error::Disk { error, .. } => error.class(),
            _ => ErrorClass::Runtime,
        }
    }

    /// Whether this is a file (or the folder it is to be made in) that
    /// does not exist.
    fn is_missing_file(&self) -> bool {
        match self {
            Error::Io { error, .. } => error.kind() == io::ErrorKind::NotFound,
            Error::Image { error, .. } => error.is_missing_file(),
            Error::NotFound { .. } => true,
            _ => false,
        }
    }
}

fn errno_kind(errno: u32) -> io::ErrorKind {
    match errno {
        proto::NBD_EPERM => io::ErrorKind::PermissionDenied,
        proto::NBD_ENOMEM => io::ErrorKind::OutOfMemory,
        proto::NBD_EINVAL | proto::NBD_EOVERFLOW => io::ErrorKind::InvalidInput,
        proto::NBD_ENOTSUP => io::ErrorKind::Unsupported,
        _ => io::ErrorKind::Other,
    }
}

impl From<Error> for io::Error {
    fn from(error: Error) -> Self {
        Classified::io(error.kind(), error.class(), error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_error_names_command_errno_and_message() {
        let e = Error::Server {
            command: "NBD_CMD_READ",
            errno: proto::NBD_EIO,
            message: "disk on fire".into(),
        };
        assert_eq!(
            e.to_string(),
            "NBD NBD_CMD_READ failed: NBD_EIO (input/output error): disk on fire"
        );
    }

    #[test]
    fn option_rejected_names_export() {
        let e = Error::OptionRejected {
            option: "NBD_OPT_GO".into(),
            export: Some("nope".into()),
            reply: "NBD_REP_ERR_UNKNOWN (export not available)".into(),
            message: String::new(),
        };
        assert_eq!(
            e.to_string(),
            "NBD server refused NBD_OPT_GO for export 'nope': NBD_REP_ERR_UNKNOWN (export not available)"
        );
    }

    #[test]
    fn qmp_error_names_command_and_keeps_qemus_words() {
        let e = Error::Qmp {
            command: "transaction".into(),
            class: "GenericError".into(),
            desc: "Dirty bitmap 'b1' not found".into(),
        };
        assert_eq!(
            e.to_string(),
            "QMP command 'transaction' failed: Dirty bitmap 'b1' not found"
        );
        let e = Error::Qmp {
            command: "x".into(),
            class: "CommandNotFound".into(),
            desc: "The command x has not been found".into(),
        };
        assert!(e.to_string().ends_with("(CommandNotFound)"), "{e}");
        assert!(e
            .for_disk("drive0")
            .to_string()
            .starts_with("disk drive0: QMP"));
    }

    #[test]
    fn qemus_lock_refusals_become_in_use_with_advice_other_failures_stay() {
        let refusal = |stderr: &str| Error::Command {
            command: "qemu-img info x".into(),
            status: "exit status: 1".into(),
            stderr: stderr.into(),
        };
        let path = Path::new("/vm/web1.qcow2");
        let locked = refusal(
            "qemu-img: Could not open '/vm/web1.qcow2': Failed to get shared \"write\" lock\n\
             Is another process using the image [/vm/web1.qcow2]?",
        );
        let err = locked.for_image(path).in_use_if_locked(path, true);
        assert!(matches!(err, Error::InUse { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("/vm/web1.qcow2 is in use") && text.contains("--qmp"),
            "{text}"
        );
        assert!(!text.contains("Failed to get"), "{text}");
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy);
        let restore = refusal("Failed to get \"write\" lock").in_use_if_locked(path, false);
        assert!(
            restore.to_string().contains("restoring over it"),
            "{restore}"
        );
        let other = refusal("Image is not in qcow2 format").for_image(path);
        let kept = other.in_use_if_locked(path, true).to_string();
        assert!(kept.contains("Image is not in qcow2 format"), "{kept}");
    }

    #[test]
    fn converts_to_io_error_keeping_text_and_kind() {
        let e = Error::InvalidRequest("read past end".into());
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(io.to_string(), "invalid request: read past end");
    }

    fn missing_image(path: &str) -> Error {
        let gone = io::Error::from(io::ErrorKind::NotFound);
        Error::io("opening", gone).for_image(path)
    }

    /// Issue 11: qemu's errors were flattened into `io::Error`, and their
    /// class (whose fault it is) lost on the way to the exit code.
    #[test]
    fn issue11_classes_say_whose_fault_it_is() {
        let path = Path::new("/vm/web1.qcow2");
        assert_eq!(missing_image("/vm/gone.qcow2").class(), ErrorClass::Usage);
        assert_eq!(Error::in_use(path, true).class(), ErrorClass::Runtime);
        let damaged = Error::Damaged {
            command: "qemu-img check -f qcow2 /vm/web1.qcow2".into(),
            report: "2 errors were found on the image.".into(),
        };
        assert_eq!(damaged.for_image(path).class(), ErrorClass::Integrity);
        assert_eq!(
            Error::Internal("finish() called twice".into()).class(),
            ErrorClass::Internal
        );
        assert_eq!(
            Error::InvalidRequest("invalid image format name".into()).class(),
            ErrorClass::Usage
        );
        let denied = Error::io("opening", io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(denied.for_image(path).class(), ErrorClass::Runtime);
        let socket_gone = Error::io("connecting", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(socket_gone.class(), ErrorClass::Runtime);
        let qmp = Error::Qmp {
            command: "transaction".into(),
            class: "GenericError".into(),
            desc: "no".into(),
        };
        assert_eq!(qmp.for_disk("drive0").class(), ErrorClass::Runtime);
    }

    /// Issue 11: qemu-img's failure to open an image that does not exist
    /// ("Could not open ...: No such file or directory") is the user's
    /// mistake, with qemu's words kept; other failures stay as they are.
    #[test]
    fn issue11_a_failure_on_an_absent_image_is_not_found() {
        let failed = || Error::Command {
            command: "qemu-img info x".into(),
            status: "exit status: 1".into(),
            stderr: "Could not open 'x': No such file or directory".into(),
        };
        let absent = Path::new("/nonexistent-vbackup-test/gone.qcow2");
        let err = failed().for_image(absent).missing_if_absent(absent);
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        assert_eq!(err.class(), ErrorClass::Usage);
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let text = err.to_string();
        assert!(
            text.starts_with("disk image /nonexistent-vbackup-test/gone.qcow2: `qemu-img info x`"),
            "{text}"
        );
        assert_eq!(err.for_image(absent).to_string(), text, "not wrapped twice");
        let present = Path::new("/");
        let kept = failed().for_image(present).missing_if_absent(present);
        assert!(matches!(kept, Error::Image { .. }), "{kept}");
        assert_eq!(kept.class(), ErrorClass::Runtime);
    }

    /// Issue 11: the class survives the trip through the engine's
    /// `io::Result` traits, and the original error can be had back.
    #[test]
    fn issue11_class_survives_conversion_to_io_error() {
        let io: io::Error = missing_image("/vm/gone.qcow2").into();
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
        assert_eq!(Classified::class_of(&io), ErrorClass::Usage);
        let original = Classified::find(&io).and_then(|c| c.inner().downcast_ref::<Error>());
        assert!(matches!(original, Some(Error::Image { .. })), "{io}");
        let core = vbackup_core::Error::Source {
            disk: "vda".into(),
            source: Error::in_use(Path::new("/vm/a.qcow2"), true).into(),
        };
        assert_eq!(core.class(), ErrorClass::Runtime);
        assert!(core.to_string().contains("/vm/a.qcow2 is in use"), "{core}");
        let core = vbackup_core::Error::Target {
            disk: "vda".into(),
            source: Error::Internal("writer after finish".into()).into(),
        };
        assert_eq!(core.class(), ErrorClass::Internal);
    }
}
