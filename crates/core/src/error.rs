//! The one error type of vbackup's core.
//!
//! Rules: every public function of this crate returns [`Error`]; each variant
//! names the object, disk or snapshot concerned and, where one exists, what
//! the user can do about it. Lower-level errors (storage, I/O, codecs) are
//! wrapped with that context, never passed through bare.

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
    /// vbackup itself went wrong (a broken invariant, not the user's input
    /// nor the storage): worth a bug report.
    #[error("internal error: {0}")]
    Internal(String),
    /// The operation was cancelled by the user (Ctrl-C, SIGTERM).
    #[error("interrupted; nothing was recorded for the unfinished operation")]
    Interrupted,
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
            Error::Storage(_)
            | Error::Source { .. }
            | Error::Target { .. }
            | Error::Conflict(_)
            | Error::Internal(_) => ErrorClass::Runtime,
        }
    }

    /// Shorthand for a [`Error::Corrupt`].
    pub(crate) fn corrupt(key: &str, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}
