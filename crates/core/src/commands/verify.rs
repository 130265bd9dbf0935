//! Reading and authenticating chunks in parallel, and the report types that
//! say which snapshots and disks any damage breaks. `vbackup verify` is
//! `vbackup check --read-data`: [`verify`] is kept as that alias.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use super::check::{check, CheckOptions, CheckReport, ReadData};
use crate::packs::{plan_reads, read_unit, sort_by_location, ChunkMap, Location};
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
    /// For a chunk stored in a pack: the chunk's id (the object is the pack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packed_chunk: Option<String>,
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

/// Reads, authenticates and re-digests the chunks of `map` that `select`
/// picks, with `threads` readers. Chunks in packs are read in pack order,
/// neighbouring blobs with one ranged request.
pub(crate) fn read_chunks(
    repo: &Repository,
    map: &ChunkMap,
    select: &(dyn Fn(&ChunkId) -> bool + Sync),
    threads: usize,
    progress: &Progress,
) -> Result<ReadOutcome> {
    let mut wanted: Vec<(Location, ChunkId)> = map
        .chunks
        .iter()
        .filter(|(id, _)| select(id))
        .map(|(id, location)| (*location, *id))
        .collect();
    sort_by_location(map, &mut wanted);
    progress.add_total(wanted.iter().map(|(l, _)| l.stored_size()).sum());
    let config = repo.config();
    let span = u64::from(config.pack_size.max(MIN_READ_SPAN)) + u64::from(config.chunk_size);
    let chunks = wanted.len() as u64;
    let (units, _) = plan_reads(map, wanted, span);
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let failed = Mutex::new(Vec::new());
    super::run_workers(threads, || {
        while let Some(unit) = units.get(next.fetch_add(1, Ordering::Relaxed)) {
            if progress.is_cancelled() {
                return Err(Error::Interrupted);
            }
            read_unit(repo, map, unit, &mut |location, id, read| {
                if let Err(error) = read {
                    failed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((*id, error));
                }
                bytes.fetch_add(location.stored_size(), Ordering::Relaxed);
                progress.add_done(location.stored_size());
                Ok(())
            })?;
        }
        Ok(())
    })?;
    Ok(ReadOutcome {
        chunks,
        bytes: bytes.into_inner(),
        failed: failed.into_inner().unwrap_or_else(|p| p.into_inner()),
    })
}

/// Range size for reading loose chunks' repositories (unused there) and
/// the least for packed ones.
const MIN_READ_SPAN: u32 = 1 << 20;
