//! The one error type of vbackup's core.
//!
//! Rules: every public function of this crate returns [`Error`]; each variant
//! names the object, disk or snapshot concerned and, where one exists, what
//! the user can do about it. Lower-level errors (storage, I/O, codecs) are
//! wrapped with that context, never passed through bare.
//!
//! Classes: [`Error::class`] says whose fault an error is (the user's
//! input, the passphrase, damaged data, vbackup itself, or the world), and
//! front ends pick their exit code or status from it. A lower crate's
//! error that reaches the engine through the `io::Result` of
//! [`crate::DiskSource`] and [`crate::DiskTarget`] keeps its class: it
//! travels as a [`Classified`] inside the `io::Error` (see
//! [`Classified::io`]), and [`Error::Source`] and [`Error::Target`] report
//! that class. The hints (what to do) are the front ends' to add.

use std::fmt;
use std::io;

use vbackup_storage::StorageError;

/// Result type of the core crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend failed (missing object, full disk, permissions…).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The location holds no repository.
    #[error(
        "no vbackup repository at {location} (no 'config' object); create one with 'vbackup init'"
    )]
    NotARepository {
        /// Where we looked.
        location: String,
    },
    /// `init` found an existing repository.
    #[error("a repository already exists at {location}; refusing to overwrite it")]
    AlreadyInitialized {
        /// Where it is.
        location: String,
    },
    /// No key of the repository opens with the given passphrase.
    #[error(
        "wrong passphrase: none of the {keys} key(s) of the repository at {location} opens with it"
    )]
    WrongPassphrase {
        /// Repository location.
        location: String,
        /// How many keys were tried.
        keys: usize,
    },
    /// The repository is encrypted but no passphrase was given.
    #[error("the repository at {location} is encrypted: give its passphrase (VBACKUP_PASSWORD, VBACKUP_PASSWORD_FILE or the prompt)")]
    PassphraseRequired {
        /// Repository location.
        location: String,
    },
    /// A format version this build does not understand.
    #[error("{what} has format version {found}, but this vbackup supports up to version {supported}; upgrade vbackup to read it")]
    UnsupportedVersion {
        /// Which object.
        what: String,
        /// Version found.
        found: u32,
        /// Newest version supported.
        supported: u32,
    },
    /// An object failed authentication, decoding or its digest check.
    #[error("object '{key}' is damaged: {reason}")]
    Corrupt {
        /// The object's name.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading a source disk failed.
    #[error("reading disk '{disk}': {source}")]
    Source {
        /// Disk name.
        disk: String,
        /// The underlying error (qemu's reason where qemu is involved).
        source: io::Error,
    },
    /// Writing a restore target failed.
    #[error("writing restored disk '{disk}': {source}")]
    Target {
        /// Disk name.
        disk: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A local file vbackup keeps for itself (the overlay of a writable
    /// export) could not be read or written.
    #[error("{what} {path}: {source}")]
    LocalFile {
        /// What was being done ("writing the overlay").
        what: String,
        /// The file.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A snapshot specification matched nothing or too much.
    #[error("{0}")]
    SnapshotSelection(String),
    /// An argument or option was not acceptable.
    #[error("{0}")]
    InvalidInput(String),
    /// Another process holds a lock this operation needs, or this process
    /// lost its own lease (it was paused for longer than the lease allows).
    #[error("{0}")]
    Conflict(String),
    /// An operation refused to run because the repository is damaged in a
    /// way that would make it lose more data (e.g. prune with unreadable
    /// snapshots).
    #[error("{0}")]
    Refused(String),
    /// The storage presents the repository as unencrypted although there
    /// are signs it is not (key files, a passphrase given, a record of it
    /// encrypted): someone without the key rewrote its config.
    #[error("refusing the repository at {location}: {reason}")]
    Downgrade {
        /// Repository location.
        location: String,
        /// What gave the downgrade away.
        reason: String,
    },
    /// vbackup itself went wrong (a panicked worker, a failing random
    /// source or cipher, a thread that cannot start, a broken invariant),
    /// not the user's input nor the storage: worth a bug report.
    #[error("internal error: {0}")]
    Internal(String),
    /// The operation was cancelled by the user (Ctrl-C, SIGTERM).
    #[error("interrupted; nothing was recorded for the unfinished operation")]
    Interrupted,
}

/// Whether a read authenticated: `Ok(true)` when it did, `Ok(false)` when
/// the object is missing or damaged (not a copy to rely on), the error when
/// the storage itself failed.
pub(crate) fn authenticated(read: Result<()>) -> Result<bool> {
    match read {
        Ok(()) => Ok(true),
        Err(e) if e.is_not_found() || e.is_damage() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Coarse classes of [`Error`], used by front ends to pick exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Wrong or missing passphrase.
    Authentication,
    /// Missing repository, unsupported version, bad arguments.
    Usage,
    /// Damaged data was found.
    Integrity,
    /// The user interrupted.
    Interrupted,
    /// vbackup itself failed (a bug, or an environment that breaks what
    /// it relies on, such as the random source).
    Internal,
    /// Everything else (I/O, storage, sources).
    Runtime,
}

impl Error {
    /// The class of this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::WrongPassphrase { .. } | Error::PassphraseRequired { .. } => {
                ErrorClass::Authentication
            }
            Error::NotARepository { .. }
            | Error::AlreadyInitialized { .. }
            | Error::UnsupportedVersion { .. }
            | Error::SnapshotSelection(_)
            | Error::InvalidInput(_) => ErrorClass::Usage,
            Error::Corrupt { .. } | Error::Refused(_) | Error::Downgrade { .. } => {
                ErrorClass::Integrity
            }
            Error::Interrupted => ErrorClass::Interrupted,
            Error::Internal(_) => ErrorClass::Internal,
            Error::Source { source, .. } | Error::Target { source, .. } => {
                Classified::class_of(source)
            }
            Error::Storage(_) | Error::Conflict(_) | Error::LocalFile { .. } => ErrorClass::Runtime,
        }
    }

    /// Shorthand for an [`Error::Internal`].
    pub(crate) fn internal(what: impl Into<String>) -> Self {
        Error::Internal(what.into())
    }

    /// Whether the object read was not found (deleted since it was listed,
    /// or never there).
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, Error::Storage(e) if e.is_not_found())
    }

    /// Whether the object read is damaged or of a newer format, as opposed
    /// to the storage failing, which must stop the caller.
    pub(crate) fn is_damage(&self) -> bool {
        matches!(
            self,
            Error::Corrupt { .. } | Error::UnsupportedVersion { .. }
        )
    }

    /// Shorthand for a [`Error::Corrupt`].
    pub(crate) fn corrupt(key: &str, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// A lower crate's error (qemu's, a VM job's) carried inside an
/// [`io::Error`] with its [`ErrorClass`], so that it survives the
/// `io::Result` of the disk source and target traits.
///
/// It reads exactly as the error it carries: its `Display` is that error's
/// and its `source()` that error's source, so a printed cause chain is the
/// same with or without it. [`Classified::inner`] gives the original back
/// (downcast it to the lower crate's type).
#[derive(Debug)]
pub struct Classified {
    class: ErrorClass,
    error: Box<dyn std::error::Error + Send + Sync>,
}

impl Classified {
    /// An [`io::Error`] of `kind` carrying `error` and its `class`.
    pub fn io(
        kind: io::ErrorKind,
        class: ErrorClass,
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> io::Error {
        let error = error.into();
        io::Error::new(kind, Classified { class, error })
    }

    /// The class of an I/O error: the class it was given with
    /// [`Classified::io`], else [`ErrorClass::Runtime`] (a plain I/O
    /// failure of a file or device).
    pub fn class_of(error: &io::Error) -> ErrorClass {
        Self::find(error).map_or(ErrorClass::Runtime, |c| c.class)
    }

    /// The [`Classified`] inside `error`, if it carries one.
    pub fn find(error: &io::Error) -> Option<&Classified> {
        error.get_ref()?.downcast_ref::<Classified>()
    }

    /// The class given to the error.
    pub fn class(&self) -> ErrorClass {
        self.class
    }

    /// The original error.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.error
    }
}

impl fmt::Display for Classified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl std::error::Error for Classified {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(error: io::Error) -> Error {
        Error::Source {
            disk: "vda".to_string(),
            source: error,
        }
    }

    #[test]
    fn internal_errors_have_their_own_class() {
        let error = Error::internal("a worker thread panicked");
        assert_eq!(error.class(), ErrorClass::Internal);
        assert_eq!(
            error.to_string(),
            "internal error: a worker thread panicked"
        );
        assert_eq!(
            Error::InvalidInput("no disks".into()).class(),
            ErrorClass::Usage
        );
    }

    #[test]
    fn source_and_target_errors_keep_the_class_of_what_they_carry() {
        for class in [
            ErrorClass::Usage,
            ErrorClass::Integrity,
            ErrorClass::Internal,
            ErrorClass::Runtime,
        ] {
            let carried = Classified::io(io::ErrorKind::Other, class, "qemu said no");
            assert_eq!(source(carried).class(), class);
            let carried = Classified::io(io::ErrorKind::Other, class, "qemu said no");
            let target = Error::Target {
                disk: "vda".into(),
                source: carried,
            };
            assert_eq!(target.class(), class);
        }
        let plain = io::Error::new(io::ErrorKind::NotFound, "gone");
        assert_eq!(source(plain).class(), ErrorClass::Runtime);
        assert_eq!(source(io::Error::other("x")).class(), ErrorClass::Runtime);
    }

    #[test]
    fn classified_reads_as_the_error_it_carries() {
        let carried = Classified::io(
            io::ErrorKind::ResourceBusy,
            ErrorClass::Runtime,
            "disk image /vm/a.qcow2 is in use",
        );
        assert_eq!(carried.kind(), io::ErrorKind::ResourceBusy);
        assert_eq!(carried.to_string(), "disk image /vm/a.qcow2 is in use");
        let inner = Classified::find(&carried).map(|c| c.inner().to_string());
        assert_eq!(inner.as_deref(), Some("disk image /vm/a.qcow2 is in use"));
        assert_eq!(
            source(carried).to_string(),
            "reading disk 'vda': disk image /vm/a.qcow2 is in use"
        );
    }
}
