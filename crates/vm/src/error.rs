//! The error type of VM backup jobs.
//!
//! Each error keeps the class of the engine's or QEMU's error it carries
//! ([`Error::class`]), so a front end's exit code or status tells the same
//! story whichever crate refused.

use vbackup_core::ErrorClass;

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

    /// The VM's backup lock could not be taken: another vbackup holds it,
    /// or its file cannot be created.
    #[error("{0}")]
    Lock(String),
    /// A restore failed, with what happened to its target.
    #[error("{context}: {source}")]
    Restore {
        /// The disk, the target, and what was done about it.
        context: String,
        /// The engine's error.
        source: vbackup_core::Error,
    },
    /// A file of the restore (the target folder, the VM definition) could
    /// not be written.
    #[error("{context}: {source}")]
    Io {
        /// What vbackup was doing.
        context: String,
        /// The system's error.
        source: std::io::Error,
    },
}

impl Error {
    /// Wraps a QEMU error with what was being done.
    pub fn qemu(context: impl Into<String>) -> impl FnOnce(vbackup_qemu::Error) -> Self {
        let context = context.into();
        move |source| Error::Qemu { context, source }
    }

    /// Whose fault this is: the class of the engine's or QEMU's error
    /// carried, [`ErrorClass::Usage`] for a request that makes no sense,
    /// [`ErrorClass::Runtime`] for a lock held elsewhere.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Core(error) => error.class(),
            Error::Qemu { source, .. } => source.class(),
            Error::Invalid(_) => ErrorClass::Usage,
            Error::Lock(_) | Error::Io { .. } => ErrorClass::Runtime,
            Error::Restore { source, .. } => source.class(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;

    use super::*;

    fn qemu(source: vbackup_qemu::Error) -> Error {
        Error::qemu("inspecting disk 'vda'")(source)
    }

    /// Issue 11: a VM job's error reported "failure" whatever QEMU or the
    /// engine said; it now keeps their class.
    #[test]
    fn issue11_vm_errors_keep_the_class_of_what_they_carry() {
        let in_use = vbackup_qemu::Error::InUse {
            path: PathBuf::from("/vm/a.qcow2"),
            holder: "a running VM".into(),
            advice: "shut it down".into(),
        };
        assert_eq!(qemu(in_use).class(), ErrorClass::Runtime);
        let invalid = vbackup_qemu::Error::InvalidRequest("invalid image format name".into());
        assert_eq!(qemu(invalid).class(), ErrorClass::Usage);
        let core = vbackup_core::Error::Internal("a worker thread panicked".into());
        assert_eq!(Error::from(core).class(), ErrorClass::Internal);
        let source = vbackup_core::Error::Source {
            disk: "vda".into(),
            source: vbackup_qemu::Error::Internal("slot".into()).into(),
        };
        assert_eq!(Error::from(source).class(), ErrorClass::Internal);
        let plain = vbackup_core::Error::Source {
            disk: "vda".into(),
            source: io::Error::other("read failed"),
        };
        assert_eq!(Error::from(plain).class(), ErrorClass::Runtime);
        assert_eq!(
            Error::Invalid("no disk 'x'".into()).class(),
            ErrorClass::Usage
        );
        assert_eq!(Error::Lock("held".into()).class(), ErrorClass::Runtime);
    }
}
