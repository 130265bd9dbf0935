//! The one error type of the storage layer.

use std::fmt;
use std::io;

/// What kind of failure a backend reports; callers decide on retries and
/// messages from this, not from the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object does not exist.
    NotFound,
    /// The backend refused access (permissions, credentials).
    PermissionDenied,
    /// The storage is full (ENOSPC, quota).
    NoSpace,
    /// An object name was not a safe relative path.
    InvalidKey,
    /// A failure that may go away when retried (timeouts, connection resets).
    Transient,
    /// The backend does not support the operation.
    Unsupported,
    /// Any other failure; retrying will not help.
    Other,
}

/// A failed backend operation, with the object it concerned.
#[derive(Debug)]
pub struct StorageError {
    kind: ErrorKind,
    key: String,
    message: String,
    source: Option<io::Error>,
}

impl StorageError {
    /// Creates an error about `key` with a message a user can act on.
    pub fn new(kind: ErrorKind, key: &str, message: impl Into<String>) -> Self {
        Self {
            kind,
            key: key.to_string(),
            message: message.into(),
            source: None,
        }
    }

    /// Wraps an I/O error about `key`, classifying it by its OS error.
    pub fn from_io(key: &str, what: &str, err: io::Error) -> Self {
        let kind = classify_io(&err);
        let message = match kind {
            ErrorKind::NoSpace => format!("{what}: no space left on the repository's device"),
            _ => what.to_string(),
        };
        Self {
            kind,
            key: key.to_string(),
            message,
            source: Some(err),
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The object the failure concerns.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The same error, noting that it persisted through `attempts` tries.
    pub fn after_attempts(mut self, attempts: u32) -> Self {
        self.message = format!("{} (gave up after {attempts} attempts)", self.message);
        self
    }

    /// The same error, no longer worth retrying (for example a listing that
    /// failed halfway, whose repeat would report objects twice).
    pub fn permanent(mut self) -> Self {
        self.kind = ErrorKind::Other;
        self
    }

    /// True when the error may go away when the operation is repeated.
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    /// True when the object was not found.
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }
}

fn classify_io(err: &io::Error) -> ErrorKind {
    match err.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        io::ErrorKind::TimedOut | io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => {
            ErrorKind::Transient
        }
        _ if err.raw_os_error() == Some(libc::ENOSPC)
            || err.raw_os_error() == Some(libc::EDQUOT) =>
        {
            ErrorKind::NoSpace
        }
        _ => ErrorKind::Other,
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        // An error about the repository as a whole concerns no object.
        if !self.key.is_empty() {
            write!(f, " (object '{}')", self.key)?;
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}
