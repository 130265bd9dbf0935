//! `vbackup check`: is every snapshot restorable, and what else is in the
//! repository?
//!
//! The structure check reads every manifest and every distinct index once,
//! and compares the chunks they reference with a listing of the stored
//! chunks — no chunk is read. With `--read-data` (all chunks, a subset
//! `N/M`, or a percentage) chunks are also read, authenticated and
//! re-digested in parallel. Every problem is reported with every snapshot
//! and disk it breaks; things that are not damage (unreferenced objects,
//! temporary files, stale locks, interrupted prunes, damage markers) are
//! reported as notices.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use super::locks::list_locks;
use super::verify::{read_chunks, AffectedDisk, ChunkProblem, ProblemKind};
use crate::format::DiskRecord;
use crate::packs::{ChunkMap, Location};
use crate::repo::{
    INDEXES_PREFIX, PRUNE_PREFIX, QUARANTINE_PREFIX, SNAPSHOTS_PREFIX, TRASH_PREFIX,
};
use crate::{ChunkId, Error, Progress, Repository, Result, Snapshot};

/// Which chunks `check` reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReadData {
    /// None: structure only.
    None,
    /// Every stored chunk.
    All,
    /// Part `n` (1-based) of `m`: the chunks whose id's first four bytes
    /// (big-endian) modulo `m` equal `n - 1`. Running 1/M … M/M covers all.
    Subset {
        /// Which part, from 1.
        n: u32,
        /// How many parts.
        m: u32,
    },
    /// About this percentage of the chunks: those whose id's first eight
    /// bytes, as a fraction of 2^64, are below it. Chunk ids are keyed
    /// digests, so this is a deterministic, uniformly spread sample.
    Percent(f64),
}

impl ReadData {
    /// Whether chunk `id` is read.
    pub fn selects(&self, id: &ChunkId) -> bool {
        let word = |n: usize| {
            id.0[..n]
                .iter()
                .fold(0u64, |acc, b| acc << 8 | u64::from(*b))
        };
        match *self {
            ReadData::None => false,
            ReadData::All => true,
            ReadData::Subset { n, m } => word(4) % u64::from(m) == u64::from(n - 1),
            ReadData::Percent(p) => (word(8) as f64) < p / 100.0 * 18_446_744_073_709_551_616.0,
        }
    }
}

impl FromStr for ReadData {
    type Err = String;

    /// Parses `N/M` or `X%`.
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let bad = || format!("'{text}' is not a subset like 2/5 or 10%");
        if let Some(percent) = text.strip_suffix('%') {
            let p: f64 = percent.trim().parse().map_err(|_| bad())?;
            return match p {
                p if p > 0.0 && p <= 100.0 => Ok(ReadData::Percent(p)),
                _ => Err(format!(
                    "'{text}': the percentage must be above 0 and at most 100"
                )),
            };
        }
        let (n, m) = text.split_once('/').ok_or_else(bad)?;
        let n: u32 = n.trim().parse().map_err(|_| bad())?;
        let m: u32 = m.trim().parse().map_err(|_| bad())?;
        if n == 0 || m == 0 || n > m {
            return Err(format!("'{text}': N/M needs 1 <= N <= M"));
        }
        Ok(ReadData::Subset { n, m })
    }
}

/// How `check` runs.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Which chunks to read.
    pub read_data: ReadData,
    /// Reader threads.
    pub threads: usize,
    /// Overrides the stale limit of locks.
    pub stale_after: Option<Duration>,
}

/// Something worth knowing that is not damage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Notice {
    /// The object or thing concerned.
    pub object: String,
    /// What about it.
    pub note: String,
}

/// The outcome of a check.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    /// Snapshots examined.
    pub snapshots: usize,
    /// Distinct indexes read.
    pub indexes: usize,
    /// Chunks stored.
    pub chunks: u64,
    /// Chunk objects read and checked.
    pub chunks_checked: u64,
    /// Stored bytes read.
    pub bytes_checked: u64,
    /// Chunks stored but referenced by no snapshot (harmless; prune removes them).
    pub unreferenced_chunks: u64,
    /// Their stored bytes.
    pub unreferenced_bytes: u64,
    /// Indexes stored but referenced by no snapshot.
    pub unreferenced_indexes: u64,
    /// Damaged or missing objects.
    pub problems: Vec<ChunkProblem>,
    /// What the problems break.
    pub affected: Vec<AffectedDisk>,
    /// Things that are not damage.
    pub notices: Vec<Notice>,
    /// Snapshots that carry a damage marker written by `repair`.
    pub marked_damaged: Vec<String>,
    /// Objects that contradict the client's record of the repository
    /// (forgotten snapshots that are back, an older policy): filled by the
    /// caller from [`crate::client_state::rollback_findings`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rollback: Vec<Notice>,
}

impl CheckReport {
    /// True when nothing is damaged.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.affected.is_empty()
    }

    /// The ids of the snapshots with an affected disk.
    pub fn affected_snapshots(&self) -> BTreeSet<&str> {
        self.affected.iter().map(|a| a.snapshot.as_str()).collect()
    }
}

/// What reading one index told.
enum IndexState {
    Missing,
    Damaged(String),
    /// Of a newer format than this build reads: not checked, and never
    /// damage (a `repair` of an older build must not quarantine it).
    Newer(String),
    Read {
        virtual_size: u64,
        chunk_size: u32,
        data_chunks: u64,
    },
}

/// Checks the repository; see the module documentation.
pub fn check(
    repo: &Repository,
    options: &CheckOptions,
    progress: &Progress,
) -> Result<CheckReport> {
    let (snapshots, broken) = repo.list_snapshots_checked()?;
    let mut report = CheckReport {
        snapshots: snapshots.len(),
        ..Default::default()
    };
    for error in broken {
        if let Error::UnsupportedVersion { what, .. } = &error {
            report.notices.push(Notice {
                object: what.clone(),
                note: format!("not checked: {error}"),
            });
            continue;
        }
        report.problems.push(ChunkProblem {
            object: object_of(&error),
            problem: error.to_string(),
            kind: ProblemKind::DamagedSnapshot,
            packed_chunk: None,
        });
    }
    let map = repo.chunk_map()?;
    let stored = map.sizes();
    let stored_indexes: HashMap<String, u64> = repo
        .backend()
        .list(INDEXES_PREFIX)?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    report.chunks = stored.len() as u64;
    let mut referenced = HashSet::new();
    let states = read_indexes(repo, &snapshots, &stored_indexes, &mut referenced, progress)?;
    report.indexes = states.len();
    index_problems(&snapshots, &states, &mut report);
    let mut bad: HashMap<ChunkId, String> = HashMap::new();
    for id in referenced.iter().filter(|id| !stored.contains_key(id)) {
        bad.insert(*id, "missing".to_string());
    }
    read_data(
        repo,
        options,
        &map,
        &referenced,
        progress,
        &mut report,
        &mut bad,
    )?;
    for (id, problem) in &bad {
        report.problems.push(ChunkProblem {
            object: map.object_of(id),
            problem: problem.clone(),
            kind: match stored.contains_key(id) {
                true => ProblemKind::DamagedChunk,
                false => ProblemKind::MissingChunk,
            },
            packed_chunk: matches!(map.chunks.get(id), Some(Location::Packed { .. }))
                .then(|| id.to_hex()),
        });
    }
    chunk_damage(repo, &map, &snapshots, &states, &bad, &mut report)?;
    pack_notices(&map, &mut report);
    count_unreferenced(&stored, &referenced, &stored_indexes, &states, &mut report);
    notices(repo, options, &snapshots, &mut report)?;
    report.problems.sort_by(|a, b| a.object.cmp(&b.object));
    report
        .affected
        .sort_by(|a, b| (&a.time, &a.snapshot, &a.disk).cmp(&(&b.time, &b.snapshot, &b.disk)));
    Ok(report)
}

/// The object an error is about, for the report.
pub(crate) fn object_of(error: &Error) -> String {
    match error {
        Error::Corrupt { key, .. } => key.clone(),
        Error::Storage(e) => e.key().to_string(),
        other => other.to_string(),
    }
}

/// Reads every distinct index once and collects the chunks they reference.
fn read_indexes(
    repo: &Repository,
    snapshots: &[Snapshot],
    stored_indexes: &HashMap<String, u64>,
    referenced: &mut HashSet<ChunkId>,
    progress: &Progress,
) -> Result<HashMap<String, IndexState>> {
    let mut states = HashMap::new();
    for disk in snapshots.iter().flat_map(|s| &s.manifest.disks) {
        if states.contains_key(&disk.index) {
            continue;
        }
        if progress.is_cancelled() {
            return Err(Error::Interrupted);
        }
        let state = match repo.read_index(&disk.index) {
            Ok(index) => {
                referenced.extend(index.ids());
                IndexState::Read {
                    virtual_size: index.virtual_size,
                    chunk_size: index.chunk_size,
                    data_chunks: index.data_chunks(),
                }
            }
            Err(Error::Storage(e)) if e.is_not_found() => IndexState::Missing,
            Err(e @ Error::Storage(_)) if stored_indexes.contains_key(&disk.index) => {
                return Err(e)
            }
            Err(e @ Error::UnsupportedVersion { .. }) => IndexState::Newer(e.to_string()),
            Err(e) => IndexState::Damaged(e.to_string()),
        };
        states.insert(disk.index.clone(), state);
    }
    Ok(states)
}

/// Problems and affected disks caused by indexes.
fn index_problems(
    snapshots: &[Snapshot],
    states: &HashMap<String, IndexState>,
    report: &mut CheckReport,
) {
    let mut reported = HashSet::new();
    for snapshot in snapshots {
        for disk in &snapshot.manifest.disks {
            let Some(state) = states.get(&disk.index) else {
                continue;
            };
            if let IndexState::Newer(reason) = state {
                if reported.insert(disk.index.clone()) {
                    report.notices.push(Notice {
                        object: disk.index.clone(),
                        note: format!("not checked: {reason}"),
                    });
                }
                continue;
            }
            let Some((kind, problem)) = index_problem(disk, state) else {
                continue;
            };
            if kind != ProblemKind::IndexMismatch && !reported.insert(disk.index.clone()) {
                report.affected.push(affected(
                    snapshot,
                    disk,
                    0,
                    disk.virtual_size,
                    vec![disk.index.clone()],
                ));
                continue;
            }
            report.problems.push(ChunkProblem {
                object: disk.index.clone(),
                problem,
                kind,
                packed_chunk: None,
            });
            report.affected.push(affected(
                snapshot,
                disk,
                0,
                disk.virtual_size,
                vec![disk.index.clone()],
            ));
        }
    }
}

fn index_problem(disk: &DiskRecord, state: &IndexState) -> Option<(ProblemKind, String)> {
    match state {
        IndexState::Missing => Some((ProblemKind::MissingIndex, "missing".to_string())),
        IndexState::Damaged(reason) => Some((ProblemKind::DamagedIndex, reason.clone())),
        IndexState::Newer(_) => None,
        IndexState::Read {
            virtual_size,
            chunk_size,
            data_chunks,
        } => {
            let same = *virtual_size == disk.virtual_size
                && *chunk_size == disk.chunk_size
                && *data_chunks == disk.data_chunks;
            (!same).then(|| {
                (
                    ProblemKind::IndexMismatch,
                    format!(
                        "does not match disk '{}' (index: {virtual_size} bytes, {chunk_size}-byte chunks, {data_chunks} data chunks; record: {}, {}, {})",
                        disk.name, disk.virtual_size, disk.chunk_size, disk.data_chunks
                    ),
                )
            })
        }
    }
}

fn affected(
    snapshot: &Snapshot,
    disk: &DiskRecord,
    bad_chunks: u64,
    bad_bytes: u64,
    objects: Vec<String>,
) -> AffectedDisk {
    AffectedDisk {
        snapshot: snapshot.id.clone(),
        vm: snapshot.manifest.vm.clone(),
        time: snapshot.manifest.time.clone(),
        disk: disk.name.clone(),
        index: disk.index.clone(),
        bad_chunks,
        bad_bytes,
        objects,
    }
}

/// Pack indexes and trailers that could not be read. Not damage by
/// themselves: the packs of a damaged index are read from their trailers,
/// and chunks lost with a damaged trailer show as missing where used.
fn pack_notices(map: &ChunkMap, report: &mut CheckReport) {
    for problem in &map.problems {
        report.notices.push(Notice {
            object: object_of(problem),
            note: format!("pack metadata unreadable: {problem}"),
        });
    }
    if let Some(first) = map.stray_loose.first() {
        report.notices.push(Notice {
            object: first.key.clone(),
            note: format!(
                "{} loose chunk object(s) in a repository with packs: no vbackup writes them, readers ignore them (junk from a backup token, or leftovers); the next prune deletes them",
                map.stray_loose.len()
            ),
        });
    }
    if !map.duplicates.is_empty() {
        report.notices.push(Notice {
            object: crate::packs::PACKS_PREFIX.to_string(),
            note: format!(
                "{} chunk(s) stored in more than one pack (concurrent backups, or an interrupted repack); prune keeps one authenticated copy",
                map.duplicates.len()
            ),
        });
    }
    let orphans = map.packs.iter().filter(|p| !p.indexed).count();
    if orphans > 0 {
        report.notices.push(Notice {
            object: crate::packs::PACKS_PREFIX.to_string(),
            note: format!(
                "{orphans} pack(s) named by no pack index (a backup was stopped, or one is running); their chunks were read from their trailers, and the next prune indexes or removes them"
            ),
        });
    }
}

/// Reads the chunks the options select; failures go to `bad`.
fn read_data(
    repo: &Repository,
    options: &CheckOptions,
    map: &ChunkMap,
    referenced: &HashSet<ChunkId>,
    progress: &Progress,
    report: &mut CheckReport,
    bad: &mut HashMap<ChunkId, String>,
) -> Result<()> {
    if options.read_data == ReadData::None {
        return Ok(());
    }
    let select = |id: &ChunkId| options.read_data.selects(id);
    let outcome = read_chunks(repo, map, &select, options.threads, progress)?;
    report.chunks_checked = outcome.chunks;
    report.bytes_checked = outcome.bytes;
    for (id, error) in outcome.failed {
        let gone = matches!(&error, Error::Storage(e) if e.is_not_found());
        // An unreferenced chunk deleted by a prune since the listing is fine.
        if gone && !referenced.contains(&id) {
            continue;
        }
        let problem = if gone {
            "missing".to_string()
        } else {
            error.to_string()
        };
        bad.insert(id, problem);
    }
    Ok(())
}

/// Finds the disks that need a bad chunk, reading each index again.
fn chunk_damage(
    repo: &Repository,
    map: &ChunkMap,
    snapshots: &[Snapshot],
    states: &HashMap<String, IndexState>,
    bad: &HashMap<ChunkId, String>,
    report: &mut CheckReport,
) -> Result<()> {
    if bad.is_empty() {
        return Ok(());
    }
    let mut users: BTreeMap<&str, Vec<(&Snapshot, &DiskRecord)>> = BTreeMap::new();
    for snapshot in snapshots {
        for disk in &snapshot.manifest.disks {
            if matches!(states.get(&disk.index), Some(IndexState::Read { .. })) {
                users
                    .entry(disk.index.as_str())
                    .or_default()
                    .push((snapshot, disk));
            }
        }
    }
    for (key, disks) in users {
        let index = repo.read_index(key)?;
        let mut objects = Vec::new();
        let mut bad_bytes = 0;
        // A chunk is lost with its object, or with its delta's base.
        for (i, id) in index.data() {
            let base = index.base_of(*i).filter(|b| bad.contains_key(b));
            for lost in [Some(*id).filter(|id| bad.contains_key(id)), base]
                .iter()
                .flatten()
            {
                objects.push(map.object_of(lost));
            }
            if bad.contains_key(id) || base.is_some() {
                bad_bytes += index.chunk_range(*i).1 as u64;
            }
        }
        if objects.is_empty() {
            continue;
        }
        for (snapshot, disk) in disks {
            let count = objects.len() as u64;
            report
                .affected
                .push(affected(snapshot, disk, count, bad_bytes, dedup(&objects)));
        }
    }
    Ok(())
}

fn dedup(objects: &[String]) -> Vec<String> {
    let set: BTreeSet<&String> = objects.iter().collect();
    set.into_iter().cloned().collect()
}

fn count_unreferenced(
    stored: &HashMap<ChunkId, u64>,
    referenced: &HashSet<ChunkId>,
    stored_indexes: &HashMap<String, u64>,
    states: &HashMap<String, IndexState>,
    report: &mut CheckReport,
) {
    for (id, size) in stored {
        if !referenced.contains(id) {
            report.unreferenced_chunks += 1;
            report.unreferenced_bytes += size;
        }
    }
    report.unreferenced_indexes = stored_indexes
        .keys()
        .filter(|k| !states.contains_key(*k))
        .count() as u64;
    if report.unreferenced_chunks + report.unreferenced_indexes > 0 {
        report.notices.push(Notice {
            object: "chunks/, indexes/".to_string(),
            note: format!(
                "{} chunk(s) ({} bytes) and {} index(es) are referenced by no snapshot: left by forgotten snapshots, lost snapshot manifests or interrupted backups; prune removes them",
                report.unreferenced_chunks, report.unreferenced_bytes, report.unreferenced_indexes
            ),
        });
    }
}

/// Everything that is not damage but worth reporting.
fn notices(
    repo: &Repository,
    options: &CheckOptions,
    snapshots: &[Snapshot],
    report: &mut CheckReport,
) -> Result<()> {
    let backend = repo.backend();
    let now = chrono::Utc::now();
    for snapshot in snapshots.iter().filter(|s| s.is_future_dated(now)) {
        report.notices.push(Notice {
            object: format!("{SNAPSHOTS_PREFIX}{}", snapshot.id),
            note: format!(
                "dated {}, later than this host's clock allows (forged, or written by a host with a wrong clock): never counted by retention rules nor used as a base; delete that object from the storage once you know it is forged",
                snapshot.manifest.time
            ),
        });
    }
    for leftover in backend.leftovers()? {
        report.notices.push(Notice {
            object: leftover.key,
            note: format!("temporary file ({} bytes) of an interrupted or running write; `vbackup repair` removes old ones", leftover.size),
        });
    }
    for lock in list_locks(repo, options.stale_after)? {
        let note = match &lock.stale {
            Some(reason) => format!(
                "stale ({reason}): {}; `vbackup unlock --stale-only` removes it",
                lock.describe()
            ),
            None => format!("live: {}", lock.describe()),
        };
        report.notices.push(Notice {
            object: lock.key(),
            note,
        });
    }
    for (prefix, note) in [
        (
            PRUNE_PREFIX,
            "prune list: objects marked for deletion, or the log of a running or interrupted sweep",
        ),
        (
            TRASH_PREFIX,
            "left by an interrupted prune sweep; the next prune or repair puts it back",
        ),
        (QUARANTINE_PREFIX, "damaged object moved aside by repair"),
    ] {
        for object in backend.list(prefix)? {
            report.notices.push(Notice {
                object: object.key,
                note: note.to_string(),
            });
        }
    }
    marker_notices(repo, snapshots, report)?;
    lost_snapshot_notices(snapshots, report);
    Ok(())
}

/// Damage markers: still damaged, whole again, or of a snapshot gone.
fn marker_notices(
    repo: &Repository,
    snapshots: &[Snapshot],
    report: &mut CheckReport,
) -> Result<()> {
    let affected: BTreeSet<String> = report
        .affected_snapshots()
        .into_iter()
        .map(str::to_string)
        .collect();
    let present: HashSet<&str> = snapshots.iter().map(|s| s.id.as_str()).collect();
    for id in super::repair::marked_snapshots(repo)? {
        let note = if !present.contains(id.as_str()) {
            Some("damage marker of a snapshot that no longer exists; `vbackup repair` removes it")
        } else if !affected.contains(&id) {
            Some("marked damaged by repair but whole again; `vbackup repair` clears the marker")
        } else {
            None
        };
        if let Some(note) = note {
            report.notices.push(Notice {
                object: format!("{}{id}", crate::repo::DAMAGED_PREFIX),
                note: note.to_string(),
            });
        }
        report.marked_damaged.push(id);
    }
    report.marked_damaged.sort();
    Ok(())
}

/// Snapshots named as the origin of an unchanged disk that no longer exist.
fn lost_snapshot_notices(snapshots: &[Snapshot], report: &mut CheckReport) {
    let present: HashSet<&str> = snapshots.iter().map(|s| s.id.as_str()).collect();
    let mut seen = HashSet::new();
    for snapshot in snapshots {
        for disk in &snapshot.manifest.disks {
            let Some(origin) = disk.unchanged_since.as_deref() else {
                continue;
            };
            if present.contains(origin) || !seen.insert(origin.to_string()) {
                continue;
            }
            report.notices.push(Notice {
                object: format!("{SNAPSHOTS_PREFIX}{origin}"),
                note: format!(
                    "no longer exists (forgotten, or lost): snapshot {} of VM '{}' was taken from the same unchanged disk '{}' and restores without it",
                    snapshot.short_id(),
                    snapshot.manifest.vm,
                    disk.name
                ),
            });
        }
    }
}
