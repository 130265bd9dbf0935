//! The error type of VM backup jobs.

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A failed VM backup job: the engine's or QEMU's error, with the disk or
/// step it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The repository or engine failed.
    #[error(transparent)]
    Core(#[from] vbackup_core::Error),
    /// QEMU (qemu-img, qemu-nbd, QMP) refused or failed.
    #[error("{context}: {source}")]
    Qemu {
        /// What vbackup was doing.
        context: String,
        /// QEMU's error.
        source: vbackup_qemu::Error,
    },
    /// The request does not make sense.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Wraps a QEMU error with what was being done.
    pub fn qemu(context: impl Into<String>) -> impl FnOnce(vbackup_qemu::Error) -> Self {
        let context = context.into();
        move |source| Error::Qemu { context, source }
    }
}
