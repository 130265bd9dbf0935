//! Storage backends for vbackup repositories.
//!
//! A repository is a set of immutable, named objects (`config`, `keys/…`,
//! `chunks/…`, `indexes/…`, `snapshots/…`). Everything above this crate sees
//! them only through the [`Backend`] trait, so the local filesystem, S3-style
//! object stores and vbackup's own server are interchangeable. Backends know
//! nothing about encryption or formats: they move opaque bytes.
//!
//! Object names are `/`-separated relative paths made of ASCII letters,
//! digits, `-`, `_` and `.`; [`validate_key`] enforces that so no backend can
//! be tricked into writing outside its root.
#![deny(missing_docs)]

mod cache;
mod error;
mod local;
mod memory;
mod retry;

pub use cache::{CachedBackend, CACHED_PREFIXES};
pub use error::{ErrorKind, StorageError};
pub use local::LocalBackend;
pub use memory::MemoryBackend;
pub use retry::{RetryBackend, RetryPolicy};

use std::time::SystemTime;

/// Result type of every backend operation.
pub type Result<T> = std::result::Result<T, StorageError>;

/// The name, size and modification time of one stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Full object name, e.g. `chunks/ab/ab12…`.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// When the object was last written (by `put`), by the storage's clock;
    /// `None` when the backend cannot tell. A `rename` keeps it. Garbage
    /// collection relies on it to see that a chunk was written again after
    /// it was marked for deletion.
    pub modified: Option<SystemTime>,
    /// Who wrote the object, when the storage records it: the backup
    /// server names the token (`LABEL (token ID)`) that wrote a lease,
    /// snapshot, prune list, policy or quarantined object. `None` for
    /// every other backend and object.
    pub writer: Option<String>,
}

impl ObjectInfo {
    /// An object description without a modification time.
    pub fn new(key: impl Into<String>, size: u64) -> Self {
        Self {
            key: key.into(),
            size,
            modified: None,
            writer: None,
        }
    }
}

/// A place that stores a repository's objects.
///
/// Objects are written once and never modified: [`Backend::put`] is atomic (a
/// reader sees the whole object or nothing, also after a crash) and a
/// repository never rewrites an existing name with different content.
pub trait Backend: Send + Sync {
    /// A human-readable location for messages, e.g. `/srv/backup`.
    fn location(&self) -> String;
    /// Stores `data` under `key` atomically and durably.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Reads a whole object.
    fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// Reads `length` bytes of an object starting at `offset`.
    fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Vec<u8>>;
    /// Lists every object whose name starts with `prefix` (a folder such as
    /// `chunks/`), in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// Calls `visit` with every object whose name starts with `prefix`, in
    /// no particular order, without holding the whole listing in memory
    /// where the backend can (a million chunk names take ~130 MB as a
    /// `Vec<ObjectInfo>`). The default calls [`Backend::list`].
    fn list_each(&self, prefix: &str, visit: &mut dyn FnMut(ObjectInfo)) -> Result<()> {
        self.list(prefix)?.into_iter().for_each(visit);
        Ok(())
    }
    /// Returns the object's size, or `None` when it does not exist.
    fn stat(&self, key: &str) -> Result<Option<ObjectInfo>>;
    /// Removes an object; removing a missing object is not an error.
    fn delete(&self, key: &str) -> Result<()>;

    /// Moves the object `from` to the name `to` atomically, replacing any
    /// object named `to` and keeping the modification time: at every moment
    /// the object exists under exactly one of the two names, and a `put` of
    /// `from` that happens after the move creates a new object that the move
    /// does not touch. Garbage collection builds its safety on this (see
    /// ARCHITECTURE.md). The move need not be durable: after a crash the
    /// object may be found under either name.
    ///
    /// Backends that cannot offer this (plain S3 has no rename) keep the
    /// default, which refuses with [`ErrorKind::Unsupported`], and report
    /// `false` from [`Backend::can_rename`]: `prune` then runs with the
    /// repository to itself, and `repair` refuses to quarantine.
    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let _ = to;
        Err(StorageError::new(
            ErrorKind::Unsupported,
            from,
            format!(
                "the backend at {} cannot move objects atomically",
                self.location()
            ),
        ))
    }

    /// Whether [`Backend::rename`] works as documented. Backends that
    /// implement `rename` return true; the default is false. Garbage
    /// collection asks this before it starts, to choose between the
    /// concurrent sweep and the exclusive one (see ARCHITECTURE.md).
    fn can_rename(&self) -> bool {
        false
    }

    /// Of `keys`, the ones the backend may not hold, so that a writer can
    /// skip sending objects that are already there (the backup server's
    /// chunk-presence query: an incremental sends only new chunks, even
    /// when another client stored some of them a moment ago). A backend
    /// that cannot answer more cheaply than storing the object again
    /// returns every key, which is the default.
    fn missing(&self, keys: &[String]) -> Result<Vec<String>> {
        Ok(keys.to_vec())
    }

    /// How many requests the backend serves well at once; callers run at
    /// least this many workers against it. Remote stores want many
    /// requests in flight to hide latency; 0 (the default) means no
    /// preference beyond the machine's cores.
    fn concurrency(&self) -> usize {
        0
    }

    /// The largest object the backend accepts, if it has a limit (the
    /// backup server's); `init` refuses pack sizes that would exceed it.
    fn max_object_size(&self) -> Option<u64> {
        None
    }

    /// Things in the storage that are not objects, such as temporary files
    /// left by interrupted writes (`check` reports them). Their names are
    /// not valid object names. The default has none.
    fn leftovers(&self) -> Result<Vec<ObjectInfo>> {
        Ok(Vec::new())
    }

    /// Removes one of the [`Backend::leftovers`]; the default does nothing.
    fn remove_leftover(&self, name: &str) -> Result<()> {
        let _ = name;
        Ok(())
    }
}

/// Checks that `key` is a safe object name (see the crate docs).
pub fn validate_key(key: &str) -> Result<()> {
    let bad_part = |p: &str| p.is_empty() || p == "." || p == ".." || p.starts_with('.');
    let bad_char = |c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if key.is_empty() || key.split('/').any(bad_part) || key.chars().any(bad_char) {
        return Err(StorageError::new(
            ErrorKind::InvalidKey,
            key,
            "object names are relative paths of letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_could_escape_the_root_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            ".tmp",
            "a/.hidden",
            "a b",
            "a\\b",
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["config", "keys/0a1b", "chunks/ab/ab12", "snapshots/x-y_z.1"] {
            assert!(validate_key(good).is_ok(), "{good:?} refused");
        }
    }
}
