//! `vbackup verify`: read every chunk, authenticate it, re-digest it, and say
//! which snapshots and disks any damage breaks.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::format::DiskIndex;
use crate::{ChunkId, Progress, Repository, Result, Snapshot};

/// A chunk that is missing or fails its checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChunkProblem {
    /// The chunk's object name (or index / snapshot object for metadata).
    pub object: String,
    /// What is wrong.
    pub problem: String,
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
    /// How many of its chunks are damaged or missing (0 when its index
    /// itself is unreadable).
    pub bad_chunks: u64,
    /// Bytes of the disk that cannot be restored.
    pub bad_bytes: u64,
}

/// The outcome of a verification.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyReport {
    /// Snapshots examined.
    pub snapshots: usize,
    /// Chunk objects read and checked.
    pub chunks_checked: u64,
    /// Stored bytes read.
    pub bytes_checked: u64,
    /// Chunks stored but referenced by no snapshot (harmless; prune removes them).
    pub unreferenced_chunks: u64,
    /// Damaged or missing objects.
    pub problems: Vec<ChunkProblem>,
    /// What the problems break.
    pub affected: Vec<AffectedDisk>,
}

impl VerifyReport {
    /// True when nothing is damaged.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.affected.is_empty()
    }
}

/// The indexes of all snapshots, keyed by (snapshot position, disk position).
type Indexes = HashMap<(usize, usize), DiskIndex>;

/// Verifies every snapshot, index and chunk with `threads` readers.
pub fn verify(repo: &Repository, threads: usize, progress: &Progress) -> Result<VerifyReport> {
    let (snapshots, broken_manifests) = repo.list_snapshots_checked()?;
    let mut report = VerifyReport {
        snapshots: snapshots.len(),
        ..Default::default()
    };
    for error in broken_manifests {
        report.problems.push(ChunkProblem {
            object: object_of(&error),
            problem: error.to_string(),
        });
    }
    let indexes = load_indexes(repo, &snapshots, &mut report);
    let referenced: HashSet<ChunkId> = indexes
        .values()
        .flat_map(|i| i.chunks.iter().flatten().copied())
        .collect();
    let stored = repo.list_chunks()?;
    report.unreferenced_chunks = stored.keys().filter(|id| !referenced.contains(id)).count() as u64;
    let mut bad: HashSet<ChunkId> = HashSet::new();
    for id in referenced.iter().filter(|id| !stored.contains_key(id)) {
        bad.insert(*id);
        report.problems.push(ChunkProblem {
            object: Repository::chunk_key(id),
            problem: "missing".to_string(),
        });
    }
    for problem in check_chunks(repo, &stored, threads, progress, &mut report)? {
        if let Some(id) = problem
            .object
            .rsplit('/')
            .next()
            .and_then(ChunkId::from_hex)
        {
            bad.insert(id);
        }
        report.problems.push(problem);
    }
    report
        .affected
        .extend(affected_disks(&snapshots, &indexes, &bad));
    report.problems.sort_by(|a, b| a.object.cmp(&b.object));
    Ok(report)
}

/// The object an error is about, for the report.
fn object_of(error: &crate::Error) -> String {
    match error {
        crate::Error::Corrupt { key, .. } => key.clone(),
        crate::Error::Storage(e) => e.key().to_string(),
        other => other.to_string(),
    }
}

fn load_indexes(repo: &Repository, snapshots: &[Snapshot], report: &mut VerifyReport) -> Indexes {
    let mut indexes = HashMap::new();
    for (s, snapshot) in snapshots.iter().enumerate() {
        for (d, disk) in snapshot.manifest.disks.iter().enumerate() {
            match repo.read_index(&disk.index) {
                Ok(index) => {
                    indexes.insert((s, d), index);
                }
                Err(error) => {
                    report.problems.push(ChunkProblem {
                        object: disk.index.clone(),
                        problem: error.to_string(),
                    });
                    report.affected.push(AffectedDisk {
                        snapshot: snapshot.id.clone(),
                        vm: snapshot.manifest.vm.clone(),
                        time: snapshot.manifest.time.clone(),
                        disk: disk.name.clone(),
                        bad_chunks: 0,
                        bad_bytes: disk.virtual_size,
                    });
                }
            }
        }
    }
    indexes
}

/// Reads every stored chunk in parallel and returns those that fail.
fn check_chunks(
    repo: &Repository,
    stored: &HashMap<ChunkId, u64>,
    threads: usize,
    progress: &Progress,
    report: &mut VerifyReport,
) -> Result<Vec<ChunkProblem>> {
    let ids: Vec<(&ChunkId, &u64)> = stored.iter().collect();
    progress.add_total(ids.iter().map(|(_, size)| **size).sum());
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let problems = Mutex::new(Vec::new());
    super::run_workers(threads, || {
        while let Some((id, size)) = ids.get(next.fetch_add(1, Ordering::Relaxed)) {
            if progress.is_cancelled() {
                return Err(crate::Error::Interrupted);
            }
            if let Err(error) = repo.read_chunk(id) {
                let problem = ChunkProblem {
                    object: Repository::chunk_key(id),
                    problem: error.to_string(),
                };
                problems
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(problem);
            }
            bytes.fetch_add(**size, Ordering::Relaxed);
            progress.add_done(**size);
        }
        Ok(())
    })?;
    report.chunks_checked = ids.len() as u64;
    report.bytes_checked = bytes.into_inner();
    Ok(problems.into_inner().unwrap_or_else(|p| p.into_inner()))
}

fn affected_disks(
    snapshots: &[Snapshot],
    indexes: &Indexes,
    bad: &HashSet<ChunkId>,
) -> Vec<AffectedDisk> {
    let mut affected = Vec::new();
    for ((s, d), index) in indexes {
        let mut bad_chunks = 0;
        let mut bad_bytes = 0;
        for (i, chunk) in index.chunks.iter().enumerate() {
            if chunk.is_some_and(|id| bad.contains(&id)) {
                bad_chunks += 1;
                bad_bytes += index.chunk_range(i as u64).1 as u64;
            }
        }
        if bad_chunks > 0 {
            let snapshot = &snapshots[*s];
            affected.push(AffectedDisk {
                snapshot: snapshot.id.clone(),
                vm: snapshot.manifest.vm.clone(),
                time: snapshot.manifest.time.clone(),
                disk: snapshot.manifest.disks[*d].name.clone(),
                bad_chunks,
                bad_bytes,
            });
        }
    }
    affected.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.disk.cmp(&b.disk)));
    affected
}
