//! Shared counters a front end polls to draw progress, and the cancel flag.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Progress of a long operation; updated by workers, read by the front end.
#[derive(Debug, Default)]
pub struct Progress {
    total: AtomicU64,
    done: AtomicU64,
    stored: AtomicU64,
    cancelled: AtomicBool,
}

impl Progress {
    /// A fresh progress record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds to the amount of work (bytes) expected.
    pub fn add_total(&self, bytes: u64) {
        self.total.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Records finished work (bytes of disk processed).
    pub fn add_done(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Records bytes written to the repository.
    pub fn add_stored(&self, bytes: u64) {
        self.stored.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Work expected, in bytes.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Work done, in bytes.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Bytes written to the repository so far.
    pub fn stored(&self) -> u64 {
        self.stored.load(Ordering::Relaxed)
    }

    /// Asks the running operation to stop as soon as possible.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Whether [`Progress::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
}
