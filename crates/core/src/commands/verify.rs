//! Reading and authenticating chunks in parallel, and the report types that
//! say which snapshots and disks any damage breaks. `vbackup verify` is
//! `vbackup check --read-data`: [`verify`] is kept as that alias.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use super::check::{check, CheckOptions, CheckReport, ReadData};
use crate::{ChunkId, Error, Progress, Repository, Result};

/// What kind of damage a [`ChunkProblem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// A chunk a snapshot needs is not stored.
    MissingChunk,
    /// A stored chunk fails authentication, decoding or its digest check.
    DamagedChunk,
    /// An index a snapshot needs is not stored.
    MissingIndex,
    /// An index fails authentication or decoding.
    DamagedIndex,
    /// An index does not match the disk record that names it.
    IndexMismatch,
    /// A snapshot manifest cannot be read.
    DamagedSnapshot,
}

/// A chunk, index or snapshot object that is missing or fails its checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChunkProblem {
    /// The object's name (`chunks/…`, `indexes/…`, `snapshots/…`).
    pub object: String,
    /// What is wrong (`missing` for a missing chunk).
    pub problem: String,
    /// The kind of damage.
    pub kind: ProblemKind,
}

/// A disk of a snapshot that cannot be restored completely.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AffectedDisk {
    /// Snapshot id.
    pub snapshot: String,
    /// VM name.
    pub vm: String,
    /// Snapshot time.
    pub time: String,
    /// Disk name.
    pub disk: String,
    /// The disk's index object.
    pub index: String,
    /// How many of its chunks are damaged or missing (0 when its index
    /// itself is unreadable).
    pub bad_chunks: u64,
    /// Bytes of the disk that cannot be restored.
    pub bad_bytes: u64,
    /// The damaged or missing objects it needs (chunks, or its index).
    pub objects: Vec<String>,
}

/// The report of `vbackup verify` (the same as `check --read-data`).
pub type VerifyReport = CheckReport;

/// Verifies every snapshot, index and chunk with `threads` readers.
pub fn verify(repo: &Repository, threads: usize, progress: &Progress) -> Result<VerifyReport> {
    let options = CheckOptions {
        read_data: ReadData::All,
        threads,
        stale_after: None,
    };
    check(repo, &options, progress)
}

/// The outcome of reading chunks.
#[derive(Debug, Default)]
pub(crate) struct ReadOutcome {
    /// Chunks read.
    pub chunks: u64,
    /// Stored bytes read.
    pub bytes: u64,
    /// Chunks that failed, with the error.
    pub failed: Vec<(ChunkId, Error)>,
}

/// Reads, authenticates and re-digests the chunks of `stored` that
/// `select` picks, with `threads` readers.
pub(crate) fn read_chunks(
    repo: &Repository,
    stored: &HashMap<ChunkId, u64>,
    select: &(dyn Fn(&ChunkId) -> bool + Sync),
    threads: usize,
    progress: &Progress,
) -> Result<ReadOutcome> {
    let ids: Vec<(&ChunkId, &u64)> = stored.iter().filter(|(id, _)| select(id)).collect();
    progress.add_total(ids.iter().map(|(_, size)| **size).sum());
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let failed = Mutex::new(Vec::new());
    super::run_workers(threads, || {
        while let Some((id, size)) = ids.get(next.fetch_add(1, Ordering::Relaxed)) {
            if progress.is_cancelled() {
                return Err(Error::Interrupted);
            }
            if let Err(error) = repo.read_chunk(id) {
                failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((**id, error));
            }
            bytes.fetch_add(**size, Ordering::Relaxed);
            progress.add_done(**size);
        }
        Ok(())
    })?;
    Ok(ReadOutcome {
        chunks: ids.len() as u64,
        bytes: bytes.into_inner(),
        failed: failed.into_inner().unwrap_or_else(|p| p.into_inner()),
    })
}
