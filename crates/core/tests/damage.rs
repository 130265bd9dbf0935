//! Damaged repositories made by hand — a missing chunk, a corrupted chunk,
//! a truncated index, a missing snapshot object — and what `check` says
//! about them, what `repair` does, and how the next backup heals them.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use common::{backup, backup_disk, disk_data, new_repo, restore, MemDisk};
use vbackup_core::{
    check, repair, CheckOptions, CheckReport, ProblemKind, Progress, ReadData, RepairOptions,
    RepairReport, Repository, Snapshot,
};
use vbackup_storage::Backend;

fn check_with(repo: &Repository, read_data: ReadData) -> CheckReport {
    let options = CheckOptions {
        read_data,
        threads: 2,
        stale_after: None,
    };
    check(repo, &options, &Progress::new()).unwrap()
}

fn repair_all(repo: &Repository) -> RepairReport {
    let options = RepairOptions {
        read_data: ReadData::All,
        threads: 2,
        index: true,
        dry_run: false,
    };
    repair(repo, &options, &Progress::new()).unwrap()
}

/// Two snapshots of VM `web` that share all but the first chunk.
fn two_snapshots(repo: &Repository) -> (Vec<u8>, Snapshot, Snapshot) {
    let data = disk_data(6, 5);
    let mut older = data.clone();
    older[..common::CHUNK as usize].copy_from_slice(&disk_data(1, 77));
    let first = backup(repo, "web", &older);
    let second = backup(repo, "web", &data);
    (data, first, second)
}

fn chunk_key(repo: &Repository, snapshot: &Snapshot, i: usize) -> String {
    let index = repo.read_index(&snapshot.manifest.disks[0].index).unwrap();
    Repository::chunk_key(&index.get(i as u64).unwrap())
}

fn affected_ids(report: &CheckReport) -> Vec<&str> {
    report.affected_snapshots().into_iter().collect()
}

fn sorted(mut ids: Vec<&str>) -> Vec<&str> {
    ids.sort();
    ids
}

/// After damage: the next backup of the VM heals, check is clean, and a
/// second repair clears the markers.
fn heal(repo: &Repository, data: &[u8], marked: &[&str]) {
    backup(repo, "web", data);
    let report = check_with(repo, ReadData::All);
    assert!(report.is_clean(), "{report:?}");
    assert!(report
        .notices
        .iter()
        .any(|n| n.note.contains("whole again")));
    let repaired = repair_all(repo);
    assert_eq!(repaired.cleared, sorted(marked.to_vec()));
    assert!(vbackup_core::marked_snapshots(repo).unwrap().is_empty());
}

#[test]
fn a_missing_chunk_is_named_with_every_snapshot_it_breaks_and_healed_by_the_next_backup() {
    let (backend, repo) = new_repo();
    let (data, first, second) = two_snapshots(&repo);
    let shared = chunk_key(&repo, &second, 3);
    backend.delete(&shared).unwrap();
    let report = check_with(&repo, ReadData::None);
    assert_eq!(report.problems.len(), 1);
    assert_eq!(report.problems[0].object, shared);
    assert_eq!(report.problems[0].kind, ProblemKind::MissingChunk);
    assert_eq!(affected_ids(&report), sorted(vec![&first.id, &second.id]));
    assert!(report
        .affected
        .iter()
        .all(|a| a.disk == "vda" && a.objects == vec![shared.clone()]));
    let repaired = repair_all(&repo);
    assert_eq!(repaired.marked, sorted(vec![&first.id, &second.id]));
    let marker = vbackup_core::read_marker(&repo, &first.id).unwrap();
    assert_eq!(marker.disks[0].chunks, vec![shared.clone()]);
    assert!(restore(&repo, &second).is_err());
    heal(&repo, &data, &[&first.id, &second.id]);
    assert_eq!(restore(&repo, &second).unwrap(), data);
}

#[test]
fn a_corrupted_chunk_is_found_by_reading_moved_to_quarantine_and_healed() {
    let (backend, repo) = new_repo();
    let (data, first, second) = two_snapshots(&repo);
    let key = chunk_key(&repo, &second, 4);
    let mut bytes = backend.get(&key).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    backend.corrupt(&key, bytes);
    assert!(
        check_with(&repo, ReadData::None).is_clean(),
        "structure only reads no chunk"
    );
    let report = check_with(&repo, ReadData::All);
    assert_eq!(report.problems[0].kind, ProblemKind::DamagedChunk);
    assert!(
        report.problems[0].problem.contains("authentication"),
        "{report:?}"
    );
    assert_eq!(affected_ids(&report), sorted(vec![&first.id, &second.id]));
    let repaired = repair_all(&repo);
    assert_eq!(repaired.quarantined, vec![key.clone()]);
    assert!(backend.stat(&key).unwrap().is_none());
    assert!(backend
        .stat(&format!("quarantine/{key}"))
        .unwrap()
        .is_some());
    heal(&repo, &data, &[&first.id, &second.id]);
    assert_eq!(
        restore(&repo, &first).unwrap()[common::CHUNK as usize..],
        data[common::CHUNK as usize..]
    );
}

#[test]
fn a_truncated_index_breaks_its_snapshot_and_the_next_backup_writes_it_again() {
    let (backend, repo) = new_repo();
    let data = disk_data(4, 8);
    let disk = || MemDisk {
        identity: Some("same-file".into()),
        ..MemDisk::new(data.clone())
    };
    let snapshot = backup_disk(&repo, "web", disk()).unwrap();
    let index = snapshot.manifest.disks[0].index.clone();
    let bytes = backend.get(&index).unwrap();
    backend.corrupt(&index, bytes[..bytes.len() / 2].to_vec());
    let report = check_with(&repo, ReadData::None);
    assert_eq!(report.problems[0].object, index);
    assert_eq!(report.problems[0].kind, ProblemKind::DamagedIndex);
    assert_eq!(report.affected[0].snapshot, snapshot.id);
    assert_eq!(report.affected[0].bad_bytes, data.len() as u64);
    let repaired = repair_all(&repo);
    assert_eq!(repaired.quarantined, vec![index.clone()]);
    assert!(
        repaired.index_notes[0].note.contains("cannot be rebuilt"),
        "{repaired:?}"
    );
    assert_eq!(repaired.marked, vec![snapshot.id.clone()]);
    // The source is unchanged, but its previous index is unreadable: the
    // backup reads the disk and writes the identical index.
    let next = backup_disk(&repo, "web", disk()).unwrap();
    assert_eq!(next.manifest.disks[0].index, index);
    assert_eq!(next.manifest.stats.disks_unchanged, 0);
    assert_eq!(restore(&repo, &snapshot).unwrap(), data);
    let report = check_with(&repo, ReadData::All);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(repair_all(&repo).cleared, vec![snapshot.id.clone()]);
}

#[test]
fn a_missing_snapshot_object_is_named_through_the_snapshot_that_refers_to_it() {
    let (backend, repo) = new_repo();
    let data = disk_data(3, 9);
    let disk = || MemDisk {
        identity: Some("same-file".into()),
        ..MemDisk::new(data.clone())
    };
    let first = backup_disk(&repo, "web", disk()).unwrap();
    let second = backup_disk(&repo, "web", disk()).unwrap();
    assert_eq!(
        second.manifest.disks[0].unchanged_since.as_deref(),
        Some(first.id.as_str())
    );
    let lost = backup(&repo, "db", &disk_data(2, 10));
    backend.delete(&format!("snapshots/{}", first.id)).unwrap();
    backend.delete(&format!("snapshots/{}", lost.id)).unwrap();
    let report = check_with(&repo, ReadData::All);
    assert!(
        report.is_clean(),
        "the remaining snapshots restore: {report:?}"
    );
    let notice = report
        .notices
        .iter()
        .find(|n| n.object == format!("snapshots/{}", first.id))
        .unwrap();
    assert!(
        notice.note.contains(second.short_id()) && notice.note.contains("'web'"),
        "{notice:?}"
    );
    assert_eq!(
        (report.unreferenced_chunks, report.unreferenced_indexes),
        (2, 1)
    );
    assert_eq!(restore(&repo, &second).unwrap(), data);
}

#[test]
fn repair_dry_run_changes_nothing() {
    let (backend, repo) = new_repo();
    let (_, _, second) = two_snapshots(&repo);
    backend.delete(&chunk_key(&repo, &second, 2)).unwrap();
    let before = backend.list("").unwrap();
    let options = RepairOptions {
        read_data: ReadData::Percent(50.0),
        threads: 2,
        index: false,
        dry_run: true,
    };
    let report = repair(&repo, &options, &Progress::new()).unwrap();
    assert_eq!(report.marked.len(), 2);
    assert_eq!(backend.list("").unwrap(), before);
}

#[test]
fn read_data_subsets_partition_the_chunks() {
    let (_, repo) = new_repo();
    two_snapshots(&repo);
    let total = check_with(&repo, ReadData::All).chunks_checked;
    let parts: u64 = (1..=3)
        .map(|n| check_with(&repo, ReadData::Subset { n, m: 3 }).chunks_checked)
        .sum();
    assert_eq!(parts, total);
    assert!("0/3".parse::<ReadData>().is_err() && "4/3".parse::<ReadData>().is_err());
    assert_eq!("10%".parse::<ReadData>().unwrap(), ReadData::Percent(10.0));
    assert_eq!(
        check_with(&repo, ReadData::Percent(100.0)).chunks_checked,
        total
    );
}
