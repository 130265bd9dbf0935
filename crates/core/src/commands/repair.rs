//! `vbackup repair`: make a damaged repository usable again without losing
//! more.
//!
//! Repair runs a full check (reading the data unless told otherwise), then:
//! moves damaged chunks, indexes and manifests to `quarantine/` (they are
//! kept, not deleted); writes a sealed damage marker `damaged/<snapshot>`
//! for every snapshot that cannot be restored completely (the snapshot is
//! kept: its other disks and chunks still restore, and it heals); removes
//! the markers of snapshots that are whole again; puts back what an
//! interrupted prune left in `trash/`; and removes old temporary files.
//!
//! Damaged chunks inside packs cannot be moved alone: they are taken out of
//! the pack indexes instead (the pack keeps their bytes until a prune
//! repacks it), which needs no rename.
//!
//! On storage without atomic rename (plain S3) objects are put back by copy
//! (they are named by their content), but damaged objects are not moved:
//! when there are some, repair refuses after its check, before it changes
//! anything (see ARCHITECTURE.md, "Check and repair").
//!
//! Healing: a chunk that is missing (or was moved to quarantine) is not in
//! the repository's listing, so the next backup of a VM whose disk still
//! holds that data stores it again under the same name — and every older
//! snapshot that needs it is whole again. Index objects are named by a
//! digest of their content, so the next backup of an unchanged disk writes
//! a missing index back byte for byte.
//!
//! `--index` also puts back quarantined indexes that open correctly under
//! their name, and says for every other missing index why it cannot be
//! rebuilt from the repository (chunks do not record where they belong)
//! and which backup would rebuild it.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::check::{check, CheckOptions, CheckReport, Notice, ReadData};
use super::locks::{Lease, LeaseTiming};
use super::verify::{AffectedDisk, ProblemKind};
use crate::format::lifecycle::{
    check_version, DamageMarker, DamagedDisk, LockKind, LIFECYCLE_VERSION,
};
use crate::format::{open_object_owned, ObjectKind};
use crate::repo::{DAMAGED_PREFIX, INDEXES_PREFIX, QUARANTINE_PREFIX, SNAPSHOTS_PREFIX};
use crate::{ChunkId, Error, Progress, Repository, Result};

/// Temporary files older than this are removed by repair (a write in
/// progress renames its file within seconds).
const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

/// How `repair` runs.
#[derive(Debug, Clone)]
pub struct RepairOptions {
    /// Which chunks to read to find damage (default: all).
    pub read_data: ReadData,
    /// Reader threads.
    pub threads: usize,
    /// Also try to put back missing indexes, and explain the others.
    pub index: bool,
    /// Report what would be done, change nothing.
    pub dry_run: bool,
}

/// What repair found and did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RepairReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// The check repair acted on.
    pub check: CheckReport,
    /// Damaged objects moved to `quarantine/`.
    pub quarantined: Vec<String>,
    /// Damaged chunks in packs taken out of the pack indexes
    /// (`packs/… (chunk …)`): their bytes stay until a prune repacks them.
    pub dropped_from_packs: Vec<String>,
    /// Snapshots marked damaged (new or updated markers).
    pub marked: Vec<String>,
    /// Snapshots whose marker was still right.
    pub still_marked: Vec<String>,
    /// Markers removed: the snapshot is whole again or gone.
    pub cleared: Vec<String>,
    /// Objects put back from `trash/`.
    pub restored_from_trash: u64,
    /// Indexes put back from `quarantine/` (with `--index`).
    pub restored_indexes: Vec<String>,
    /// Old temporary files removed.
    pub leftovers_removed: u64,
    /// Why missing indexes cannot be rebuilt, and what would (with `--index`).
    pub index_notes: Vec<Notice>,
}

/// Repairs the repository; see the module documentation.
pub fn repair(
    repo: &Repository,
    options: &RepairOptions,
    progress: &Progress,
) -> Result<RepairReport> {
    let lock = match options.dry_run {
        true => None,
        false => Some(Lease::exclusive(
            repo,
            LockKind::Repair,
            LeaseTiming::default(),
        )?),
    };
    let mut report = RepairReport {
        dry_run: options.dry_run,
        ..Default::default()
    };
    if !options.dry_run {
        report.restored_from_trash = super::prune::restore_trash(repo)?;
        if options.index {
            report.restored_indexes = restore_quarantined_indexes(repo)?;
        }
    }
    let check_options = CheckOptions {
        read_data: options.read_data,
        threads: options.threads,
        stale_after: None,
    };
    report.check = check(repo, &check_options, progress)?;
    if !options.dry_run {
        refuse_without_rename(repo, &report)?;
    }
    quarantine(repo, options.dry_run, &mut report)?;
    drop_packed(repo, options.dry_run, &mut report)?;
    update_markers(repo, options.dry_run, &mut report)?;
    report.leftovers_removed = remove_leftovers(repo, options.dry_run)?;
    if options.index {
        report.index_notes = index_notes(&report.check);
    }
    if let Some(lock) = lock {
        lock.release()?;
    }
    Ok(report)
}

/// The damaged (not missing) objects the check found: what repair moves
/// to `quarantine/`.
fn damaged_objects(report: &RepairReport) -> impl Iterator<Item = &str> {
    report
        .check
        .problems
        .iter()
        .filter(|p| {
            p.packed_chunk.is_none()
                && matches!(
                    p.kind,
                    ProblemKind::DamagedChunk
                        | ProblemKind::DamagedIndex
                        | ProblemKind::DamagedSnapshot
                )
        })
        .map(|p| p.object.as_str())
}

/// Takes damaged chunks stored in packs out of the pack indexes (see
/// [`crate::packs::drop_damaged_blobs`]); no rename is needed.
fn drop_packed(repo: &Repository, dry_run: bool, report: &mut RepairReport) -> Result<()> {
    let damaged: HashSet<ChunkId> = report
        .check
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::DamagedChunk)
        .filter_map(|p| p.packed_chunk.as_deref().and_then(ChunkId::from_hex))
        .collect();
    if damaged.is_empty() {
        return Ok(());
    }
    let map = repo.chunk_map()?;
    report.dropped_from_packs = crate::packs::drop_damaged_blobs(repo, &map, &damaged, dry_run)?;
    Ok(())
}

/// Refuses, before anything is written, a repair that would have to move
/// damaged objects on storage that cannot rename atomically (plain S3):
/// moving them by copy and delete while backups run could delete a good
/// copy a backup has just stored under the same name.
fn refuse_without_rename(repo: &Repository, report: &RepairReport) -> Result<()> {
    if repo.backend().can_rename() {
        return Ok(());
    }
    let damaged: Vec<&str> = damaged_objects(report)
        .filter(|o| !movable_by_copy(o))
        .collect();
    if damaged.is_empty() {
        return Ok(());
    }
    let shown = damaged
        .iter()
        .take(10)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    let more = match damaged.len() {
        n if n > 10 => format!(" and {} more", n - 10),
        _ => String::new(),
    };
    Err(Error::Refused(format!(
        "repair would move {} damaged object(s) to quarantine/ ({shown}{more}), but the storage at {} cannot move objects atomically; nothing was changed. Delete those objects with your storage's own tools while no backup runs (the next backup of each affected VM stores missing chunks again), then run `vbackup repair` again to mark what stays damaged; `vbackup repair --dry-run` shows the full plan",
        damaged.len(),
        repo.backend().location()
    )))
}

/// Whether a damaged object may be moved by copy and delete on storage
/// without atomic rename: snapshot manifests have random names that one
/// backup writes once, so no backup can store a good copy under the same
/// name between the copy and the delete.
fn movable_by_copy(object: &str) -> bool {
    object.starts_with(SNAPSHOTS_PREFIX)
}

/// Moves damaged (not missing) objects to `quarantine/`.
fn quarantine(repo: &Repository, dry_run: bool, report: &mut RepairReport) -> Result<()> {
    let damaged: Vec<String> = damaged_objects(report).map(str::to_string).collect();
    for object in damaged {
        if repo.backend().stat(&object)?.is_none() {
            continue;
        }
        if !dry_run {
            move_to_quarantine(repo, &object)?;
        }
        report.quarantined.push(object);
    }
    Ok(())
}

/// Renames `object` into `quarantine/`, or, where the storage cannot
/// rename and the object allows it ([`movable_by_copy`]), copies it there
/// and deletes it.
fn move_to_quarantine(repo: &Repository, object: &str) -> Result<()> {
    let backend = repo.backend();
    let target = format!("{QUARANTINE_PREFIX}{object}");
    if backend.can_rename() || !movable_by_copy(object) {
        return Ok(backend.rename(object, &target)?);
    }
    let bytes = backend.get(object)?;
    backend.put(&target, &bytes)?;
    Ok(backend.delete(object)?)
}

/// Writes markers for affected snapshots, removes those of healed ones.
fn update_markers(repo: &Repository, dry_run: bool, report: &mut RepairReport) -> Result<()> {
    let mut by_snapshot: BTreeMap<&str, Vec<&AffectedDisk>> = BTreeMap::new();
    for disk in &report.check.affected {
        by_snapshot
            .entry(disk.snapshot.as_str())
            .or_default()
            .push(disk);
    }
    let existing = marked_snapshots(repo)?;
    for (id, disks) in &by_snapshot {
        let marker = marker_for(id, disks);
        let current = read_marker(repo, id).ok();
        if current.as_ref().is_some_and(|c| c.disks == marker.disks) {
            report.still_marked.push(id.to_string());
            continue;
        }
        if !dry_run {
            repo.put_sealed_json(ObjectKind::DamageMarker, &marker_key(id), &marker)?;
        }
        report.marked.push(id.to_string());
    }
    for id in existing
        .iter()
        .filter(|id| !by_snapshot.contains_key(id.as_str()))
    {
        if !dry_run {
            repo.backend().delete(&marker_key(id))?;
        }
        report.cleared.push(id.clone());
    }
    Ok(())
}

fn marker_for(id: &str, disks: &[&AffectedDisk]) -> DamageMarker {
    DamageMarker {
        version: LIFECYCLE_VERSION,
        snapshot: id.to_string(),
        vm: disks.first().map(|d| d.vm.clone()).unwrap_or_default(),
        marked: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        disks: disks
            .iter()
            .map(|d| DamagedDisk {
                disk: d.disk.clone(),
                index: d.index.clone(),
                problem: describe(d),
                chunks: d
                    .objects
                    .iter()
                    .filter(|o| **o != d.index)
                    .cloned()
                    .collect(),
            })
            .collect(),
    }
}

fn describe(disk: &AffectedDisk) -> String {
    match disk.bad_chunks {
        0 => format!("index {} is missing or damaged", disk.index),
        n => format!("{n} chunk(s) missing or damaged, {} bytes", disk.bad_bytes),
    }
}

fn marker_key(id: &str) -> String {
    format!("{DAMAGED_PREFIX}{id}")
}

/// The ids of the snapshots that carry a damage marker.
pub fn marked_snapshots(repo: &Repository) -> Result<Vec<String>> {
    let mut ids: Vec<String> = repo
        .backend()
        .list(DAMAGED_PREFIX)?
        .into_iter()
        .map(|o| o.key[DAMAGED_PREFIX.len()..].to_string())
        .collect();
    ids.sort();
    Ok(ids)
}

/// Reads the damage marker of snapshot `id`.
pub fn read_marker(repo: &Repository, id: &str) -> Result<DamageMarker> {
    let key = marker_key(id);
    let marker: DamageMarker = repo.get_sealed_json(ObjectKind::DamageMarker, &key)?;
    check_version(&key, marker.version)?;
    Ok(marker)
}

/// Removes temporary files older than [`LEFTOVER_AGE`].
fn remove_leftovers(repo: &Repository, dry_run: bool) -> Result<u64> {
    let now = SystemTime::now();
    let mut removed = 0;
    for leftover in repo.backend().leftovers()? {
        let old = leftover
            .modified
            .is_some_and(|m| now.duration_since(m).unwrap_or_default() > LEFTOVER_AGE);
        if old {
            if !dry_run {
                repo.backend().remove_leftover(&leftover.key)?;
            }
            removed += 1;
        }
    }
    Ok(removed)
}

/// Puts back quarantined indexes whose original name is free and that
/// open and decode under that name.
fn restore_quarantined_indexes(repo: &Repository) -> Result<Vec<String>> {
    let prefix = format!("{QUARANTINE_PREFIX}{INDEXES_PREFIX}");
    let mut restored = Vec::new();
    for object in repo.backend().list(&prefix)? {
        let original = &object.key[QUARANTINE_PREFIX.len()..];
        if repo.backend().stat(original)?.is_some() {
            continue;
        }
        let bytes = repo.backend().get(&object.key)?;
        let copy = (!repo.backend().can_rename()).then(|| bytes.clone());
        let opened = open_object_owned(repo.crypto(), ObjectKind::Index, original, bytes, 1 << 30)
            .and_then(|payload| crate::format::DiskIndex::decode(original, &payload));
        if opened.is_ok() {
            // Without rename, a copy: indexes are named by their content,
            // so any copy under the name is as good as another.
            match copy {
                None => repo.backend().rename(&object.key, original)?,
                Some(bytes) => {
                    repo.backend().put(original, &bytes)?;
                    repo.backend().delete(&object.key)?;
                }
            }
            restored.push(original.to_string());
        }
    }
    Ok(restored)
}

/// For each unreadable index: why it cannot be rebuilt and what rebuilds it.
fn index_notes(check: &CheckReport) -> Vec<Notice> {
    let mut notes = BTreeMap::new();
    for disk in check.affected.iter().filter(|d| d.bad_chunks == 0) {
        notes.entry(disk.index.clone()).or_insert_with(|| Notice {
            object: disk.index.clone(),
            note: format!(
                "cannot be rebuilt from the repository: chunk objects do not record which disk or offset they belong to. Index names are digests of their content, so the next backup of VM '{}' writes it back byte for byte if disk '{}' is unchanged since snapshot {}; otherwise that snapshot's disk stays damaged (marked, not deleted)",
                disk.vm,
                disk.disk,
                &disk.snapshot[..disk.snapshot.len().min(8)]
            ),
        });
    }
    notes.into_values().collect()
}
