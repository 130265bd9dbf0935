//! The error type of the daemon's library.

use std::path::PathBuf;

use vbackup_core::ErrorClass;

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A failure of the daemon or of a job it ran.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file cannot be read or is not valid.
    #[error("the configuration file {}: {message}", file.display())]
    Config {
        /// The file.
        file: PathBuf,
        /// What is wrong, with the line when the parser knows it.
        message: String,
    },
    /// The job history (SQLite) cannot be opened, read or written.
    #[error("the job history {}: {message}", file.display())]
    History {
        /// The database file.
        file: PathBuf,
        /// What failed.
        message: String,
    },
    /// A job's backup failed.
    #[error(transparent)]
    Vm(#[from] vbackup_vm::Error),
    /// A job's repository operation failed.
    #[error(transparent)]
    Core(#[from] vbackup_core::Error),
    /// The request does not make sense (an unknown job, a run that is not
    /// running).
    #[error("{0}")]
    Invalid(String),
    /// The daemon's own files or sockets failed.
    #[error("{context}: {source}")]
    Io {
        /// What the daemon was doing.
        context: String,
        /// The system's error.
        source: std::io::Error,
    },
}

impl Error {
    /// Whose fault this is, with the class of the engine's or the VM job's
    /// error carried.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Config { .. } | Error::Invalid(_) => ErrorClass::Usage,
            Error::History { .. } | Error::Io { .. } => ErrorClass::Runtime,
            Error::Vm(e) => e.class(),
            Error::Core(e) => e.class(),
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
