//! Garbage collection, locks and the stored policy over the in-memory
//! backend, with the interleavings of backups and prunes made
//! deterministic: leases written by hand, a hook that runs inside a backup,
//! objects written again between phases.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{backup, backup_disk, check_all, disk_data, new_repo, restore, MemDisk};
use vbackup_core::format::lifecycle::{
    GroupBy, KeepRules, LockFile, LockKind, PruneList, PruneListHeader, PruneListKind,
};
use vbackup_core::format::ObjectKind;
use vbackup_core::{
    forget, prune, Error, ErrorClass, ForgetOptions, Lease, LeaseTiming, Progress, PruneOptions,
    PruneReport, ReadData, Repository, Snapshot,
};
use vbackup_storage::{Backend, ErrorKind, MemoryBackend, ObjectInfo, StorageError};

fn prune_with(repo: &Repository, grace: Duration) -> vbackup_core::Result<PruneReport> {
    let options = PruneOptions {
        grace,
        threads: 3,
        ..PruneOptions::default()
    };
    prune(repo, &options, &Progress::new())
}

fn prune_now(repo: &Repository) -> PruneReport {
    prune_with(repo, Duration::ZERO).unwrap()
}

fn forget_keep_last(repo: &Repository, n: u32) -> vbackup_core::ForgetReport {
    let options = ForgetOptions {
        keep: Some(KeepRules {
            last: Some(n),
            ..KeepRules::default()
        }),
        ..ForgetOptions::default()
    };
    forget(repo, &options).unwrap()
}

fn count(backend: &MemoryBackend, prefix: &str) -> usize {
    backend.list(prefix).unwrap().len()
}

/// Three snapshots of VM a (each changing half the disk of the previous)
/// and one of VM b.
fn history(repo: &Repository) -> (Vec<Vec<u8>>, Vec<Snapshot>) {
    let mut datas = Vec::new();
    let mut snapshots = Vec::new();
    let mut data = disk_data(8, 1);
    for round in 0..3u32 {
        let half = data.len() / 2;
        data[..half].copy_from_slice(&disk_data(4, 100 + round));
        snapshots.push(backup(repo, "a", &data));
        datas.push(data.clone());
    }
    let other = disk_data(6, 7);
    snapshots.push(backup(repo, "b", &other));
    datas.push(other);
    (datas, snapshots)
}

#[test]
fn forget_then_prune_frees_exactly_the_unreferenced_data() {
    let (backend, repo) = new_repo();
    let (datas, snapshots) = history(&repo);
    assert_eq!(count(&backend, "chunks/"), 4 * 3 + 4 + 6);
    let forgotten = forget_keep_last(&repo, 1);
    assert_eq!((forgotten.kept, forgotten.removed), (2, 2));
    let report = prune_now(&repo);
    // Snapshots 0 and 1 of VM a each had 4 chunks of their own.
    assert_eq!(report.deleted_chunks, 8, "{report:?}");
    assert_eq!(report.deleted_indexes, 2);
    assert!(report.freed_bytes > 0);
    assert_eq!(report.referenced_chunks, 8 + 6);
    assert_eq!(report.swept_lists.len(), 1);
    for i in [2, 3] {
        assert_eq!(restore(&repo, &snapshots[i]).unwrap(), datas[i]);
    }
    assert!(check_all(&repo).is_clean());
    for prefix in ["prune/", "locks/", "trash/"] {
        assert_eq!(count(&backend, prefix), 0, "{prefix} left behind");
    }
    let again = prune_now(&repo);
    assert_eq!((again.marked_chunks, again.deleted_chunks), (0, 0));
}

#[test]
fn a_dry_run_changes_nothing_and_tells_what_a_run_would_do() {
    let (backend, repo) = new_repo();
    history(&repo);
    let dry = ForgetOptions {
        keep: Some(KeepRules {
            last: Some(1),
            ..KeepRules::default()
        }),
        group_by: Some("host".parse::<GroupBy>().unwrap()),
        dry_run: true,
        ..ForgetOptions::default()
    };
    let plan = forget(&repo, &dry).unwrap();
    assert_eq!((plan.kept, plan.removed), (1, 3), "one group: host");
    assert_eq!(count(&backend, "snapshots/"), 4);
    forget_keep_last(&repo, 1);
    let before = backend.list("").unwrap();
    let options = PruneOptions {
        grace: Duration::ZERO,
        dry_run: true,
        ..PruneOptions::default()
    };
    let report = prune(&repo, &options, &Progress::new()).unwrap();
    assert_eq!((report.deleted_chunks, report.marked_chunks), (8, 8));
    assert_eq!(backend.list("").unwrap(), before);
}

#[test]
fn the_grace_period_separates_marking_from_deleting() {
    let (backend, repo) = new_repo();
    history(&repo);
    forget_keep_last(&repo, 1);
    let grace = Duration::from_millis(300);
    let first = prune_with(&repo, grace).unwrap();
    assert_eq!((first.marked_chunks, first.deleted_chunks), (8, 0));
    assert!(
        first.deferred[0].reason.contains("grace period"),
        "{first:?}"
    );
    let second = prune_with(&repo, grace).unwrap();
    assert_eq!(
        second.marked_chunks, 0,
        "already marked items are not marked twice"
    );
    assert_eq!(second.waiting_items, 8 + 2);
    std::thread::sleep(grace);
    let third = prune_with(&repo, grace).unwrap();
    assert_eq!(third.deleted_chunks, 8);
    assert_eq!(count(&backend, "prune/"), 0);
}

#[test]
fn a_backup_that_started_before_marking_holds_the_sweep_back() {
    let (_, repo) = new_repo();
    history(&repo);
    forget_keep_last(&repo, 1);
    let lease = Lease::start(&repo, LockKind::Backup, LeaseTiming::default()).unwrap();
    let held = prune_now(&repo);
    assert_eq!(held.deleted_chunks, 0);
    let list = held.pending_list.clone().unwrap();
    assert!(
        held.deferred[0].reason.contains("running backup"),
        "{held:?}"
    );
    // The backup loads the list (as a real one does at its start) and says so.
    lease.set_pending_seen(vec![list]).unwrap();
    assert_eq!(prune_now(&repo).deleted_chunks, 8);
    lease.release().unwrap();
}

#[test]
fn stale_leases_are_ignored_reported_and_unlocked() {
    let (backend, repo) = new_repo();
    history(&repo);
    forget_keep_last(&repo, 1);
    let stale = LockFile {
        version: 1,
        kind: LockKind::Backup,
        host: "crashed-host".into(),
        pid: 4242,
        started: "2020-01-01T00:00:00Z".into(),
        refreshed: "2020-01-01T00:00:00Z".into(),
        stale_after_secs: 600,
        domain: None,
        process_start: None,
        pending_seen: vec![],
    };
    let key = format!("locks/{}", "0".repeat(32));
    repo.put_sealed_json(ObjectKind::Lock, &key, &stale)
        .unwrap();
    backend.set_modified(&key, std::time::UNIX_EPOCH);
    let report = prune_now(&repo);
    assert_eq!(report.deleted_chunks, 8);
    assert!(report.stale_locks[0].contains("crashed-host"), "{report:?}");
    let notices = check_all(&repo).notices;
    assert!(notices
        .iter()
        .any(|n| n.object == key && n.note.contains("stale")));
    let removed = vbackup_core::unlock(&repo, &[], true).unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(count(&backend, "locks/"), 0);
}

#[test]
fn a_chunk_written_again_after_marking_is_kept() {
    let (backend, repo) = new_repo();
    history(&repo);
    forget_keep_last(&repo, 1);
    let grace = Duration::from_millis(200);
    let marked = prune_with(&repo, grace).unwrap();
    let list = marked.pending_list.unwrap();
    let content = PruneList::decode(
        &list,
        &repo.get_sealed(ObjectKind::PruneList, &list).unwrap(),
    )
    .unwrap();
    std::thread::sleep(grace);
    // A backup that saw the list stores one of its chunks again.
    let key = Repository::chunk_key(&content.chunks[3]);
    let bytes = backend.get(&key).unwrap();
    backend.put(&key, &bytes).unwrap();
    let swept = prune_with(&repo, grace).unwrap();
    assert_eq!(
        (swept.deleted_chunks, swept.kept_rewritten),
        (7, 1),
        "{swept:?}"
    );
    assert!(backend.stat(&key).unwrap().is_some());
    assert_eq!(count(&backend, "trash/"), 0);
}

#[test]
fn pending_chunks_are_uploaded_again_and_their_index_is_not_reused() {
    let (_, repo) = new_repo();
    let data = disk_data(6, 3);
    let disk = |data: &[u8]| MemDisk {
        identity: Some("inode-7-mtime-1".into()),
        ..MemDisk::new(data.to_vec())
    };
    let first = backup_disk(&repo, "a", disk(&data)).unwrap();
    repo.backend()
        .delete(&format!("snapshots/{}", first.id))
        .unwrap();
    let marked = prune_with(&repo, Duration::from_secs(3600)).unwrap();
    assert_eq!(marked.marked_chunks, 6);
    let second = backup_disk(&repo, "a", disk(&data)).unwrap();
    assert_eq!(
        second.manifest.stats.chunks_new, 6,
        "pending chunks are stored again"
    );
    let third = backup_disk(&repo, "a", disk(&data)).unwrap();
    let stats = &third.manifest.stats;
    assert_eq!(
        stats.disks_unchanged, 0,
        "an index with pending chunks is not reused"
    );
    assert!(stats.bytes_read > 0);
    let swept = prune_now(&repo);
    assert_eq!(swept.deleted_chunks, 0);
    assert_eq!(
        swept.kept_referenced,
        6 + 1,
        "chunks and index referenced again"
    );
    assert_eq!(restore(&repo, &third).unwrap(), data);
    assert!(check_all(&repo).is_clean());
}

/// A sweep deletes a chunk that a running backup already counted as stored
/// (as if the backup's lease had been judged stale): the backup finds the
/// chunk in the deletion log before writing its snapshot and stores it
/// again from the source.
#[test]
fn a_chunk_deleted_under_a_running_backup_is_stored_again_from_the_source() {
    let (backend, repo) = new_repo();
    let data = disk_data(5, 9);
    let first = backup(&repo, "a", &data);
    let index = repo.read_index(&first.manifest.disks[0].index).unwrap();
    let victim = index.get(2).unwrap();
    let sweeper = Repository::open(backend.clone(), || Ok(Some("pw".into()))).unwrap();
    let disk = MemDisk::new(data.clone());
    *disk.hook.lock().unwrap() = Some(Box::new(move || {
        let log = PruneList {
            kind: PruneListKind::Deleting,
            header: PruneListHeader {
                created: "2026-01-01T00:00:00Z".into(),
                host: "other".into(),
                sources: vec![],
            },
            chunks: vec![victim],
            indexes: vec![],
        };
        let key = "prune/deleting-20260101T000000Z-00000000";
        sweeper
            .put_sealed(ObjectKind::PruneList, key, &log.encode().unwrap())
            .unwrap();
        sweeper
            .backend()
            .delete(&Repository::chunk_key(&victim))
            .unwrap();
    }));
    let second = backup_disk(&repo, "a", disk).unwrap();
    assert!(backend
        .stat(&Repository::chunk_key(&victim))
        .unwrap()
        .is_some());
    assert_eq!(restore(&repo, &second).unwrap(), data);
    assert_eq!(
        restore(&repo, &first).unwrap(),
        data,
        "the older snapshot healed too"
    );
}

#[test]
fn prune_refuses_unreadable_snapshots_and_indexes_until_repair() {
    let (backend, repo) = new_repo();
    let (_, snapshots) = history(&repo);
    let manifest = format!("snapshots/{}", snapshots[0].id);
    let mut bytes = backend.get(&manifest).unwrap();
    bytes[20] ^= 1;
    backend.corrupt(&manifest, bytes);
    let err = prune_with(&repo, Duration::ZERO).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Integrity);
    assert!(err.to_string().contains("repair"), "{err}");
    let index = snapshots[3].manifest.disks[0].index.clone();
    backend.delete(&index).unwrap();
    let err = prune_with(&repo, Duration::ZERO).unwrap_err();
    assert!(matches!(err, Error::Refused(_)), "{err}");
    let repaired = vbackup_core::repair(&repo, &repair_options(), &Progress::new()).unwrap();
    assert_eq!(repaired.quarantined, vec![manifest.clone()]);
    assert_eq!(repaired.marked, vec![snapshots[3].id.clone()]);
    assert!(backend
        .stat(&format!("quarantine/{manifest}"))
        .unwrap()
        .is_some());
    let report = prune_now(&repo);
    assert!(report.deleted_chunks >= 4, "{report:?}");
    assert_eq!(
        vbackup_core::marked_snapshots(&repo).unwrap(),
        vec![snapshots[3].id.clone()]
    );
}

fn repair_options() -> vbackup_core::RepairOptions {
    vbackup_core::RepairOptions {
        read_data: ReadData::All,
        threads: 2,
        index: true,
        dry_run: false,
    }
}

#[test]
fn exclusive_locks_exclude_each_other_and_name_the_holder() {
    let (_, repo) = new_repo();
    history(&repo);
    let held = Lease::exclusive(&repo, LockKind::Prune, LeaseTiming::default()).unwrap();
    let err = prune_with(&repo, Duration::ZERO).unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("prune lock") && text.contains(&format!("pid {}", std::process::id())),
        "{text}"
    );
    let err = vbackup_core::repair(&repo, &repair_options(), &Progress::new()).unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    // A backup never waits: its lease is not exclusive.
    backup(&repo, "a", &disk_data(2, 50));
    held.release().unwrap();
    prune_now(&repo);
    assert!(vbackup_core::list_locks(&repo, None).unwrap().is_empty());
}

/// Forgets all but the newest snapshot, marks with a long grace and writes
/// the deletion log of the resulting pending list, as a sweep does first;
/// returns the list's content.
fn forget_mark_and_start_sweep(repo: &Repository) -> PruneList {
    forget_keep_last(repo, 1);
    let marked = prune_with(repo, Duration::from_secs(3600)).unwrap();
    let list = marked.pending_list.unwrap();
    let content = PruneList::decode(
        &list,
        &repo.get_sealed(ObjectKind::PruneList, &list).unwrap(),
    )
    .unwrap();
    let mut log = content.clone();
    log.kind = PruneListKind::Deleting;
    repo.put_sealed(
        ObjectKind::PruneList,
        "prune/deleting-20260101T000000Z-00000001",
        &log.encode().unwrap(),
    )
    .unwrap();
    content
}

#[test]
fn an_interrupted_sweep_is_finished_by_the_next_prune() {
    let (backend, repo) = new_repo();
    let (datas, snapshots) = history(&repo);
    // What a sweep killed half-way leaves: a deletion log, objects moved to
    // the trash, some deleted.
    let content = forget_mark_and_start_sweep(&repo);
    for (i, id) in content.chunks.iter().enumerate().take(5) {
        let key = Repository::chunk_key(id);
        match i % 2 {
            0 => backend.rename(&key, &format!("trash/{key}")).unwrap(),
            _ => backend.delete(&key).unwrap(),
        }
    }
    let report = check_all(&repo);
    assert!(report.is_clean(), "{report:?}");
    assert!(report
        .notices
        .iter()
        .any(|n| n.object.starts_with("trash/")));
    let swept = prune_now(&repo);
    assert_eq!(swept.trash_restored, 3);
    assert_eq!(swept.deleted_chunks, 8 - 2, "{swept:?}");
    for prefix in ["prune/", "trash/"] {
        assert_eq!(count(&backend, prefix), 0, "{prefix}");
    }
    for i in [2, 3] {
        assert_eq!(restore(&repo, &snapshots[i]).unwrap(), datas[i]);
    }
}

#[test]
fn forget_uses_the_stored_policy_and_refuses_without_rules() {
    let (_, repo) = new_repo();
    history(&repo);
    let err = forget(&repo, &ForgetOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no policy stored"), "{err}");
    assert!(vbackup_core::set_policy(&repo, KeepRules::default(), GroupBy::default(), 0).is_err());
    let keep = KeepRules {
        last: Some(2),
        ..KeepRules::default()
    };
    vbackup_core::set_policy(&repo, keep.clone(), GroupBy::default(), 0).unwrap();
    let stored = vbackup_core::read_policy(&repo).unwrap().unwrap();
    assert_eq!(stored.keep, keep);
    let report = forget(&repo, &ForgetOptions::default()).unwrap();
    assert!(report.from_policy);
    assert_eq!((report.kept, report.removed), (3, 1));
    assert!(vbackup_core::clear_policy(&repo).unwrap());
    assert!(vbackup_core::read_policy(&repo).unwrap().is_none());
}

#[test]
fn a_lease_is_refreshed_by_its_thread_and_removed_at_the_end() {
    let (backend, repo) = new_repo();
    let timing = LeaseTiming {
        refresh: Duration::from_millis(20),
        stale_after: Duration::from_secs(5),
    };
    let lease = Lease::start(&repo, LockKind::Backup, timing).unwrap();
    let key = format!("locks/{}", lease.id());
    let first = vbackup_core::read_lock(&repo, lease.id()).unwrap();
    std::thread::sleep(Duration::from_millis(120));
    let later = vbackup_core::read_lock(&repo, lease.id()).unwrap();
    assert!(later.refreshed > first.refreshed, "{first:?} {later:?}");
    assert_eq!(later.pid, std::process::id());
    lease.check_fresh().unwrap();
    drop(lease);
    assert!(backend.stat(&key).unwrap().is_none());
}

/// The in-memory backend without `rename`, like plain S3: prune runs with
/// the repository to itself.
/// Chunk deletions fail once the count (of all deletions) is used up, as
/// if the storage went away mid-sweep.
struct NoRename(Arc<MemoryBackend>, AtomicUsize);

impl Backend for NoRename {
    fn location(&self) -> String {
        "memory-without-rename".into()
    }
    fn put(&self, key: &str, data: &[u8]) -> vbackup_storage::Result<()> {
        self.0.put(key, data)
    }
    fn get(&self, key: &str) -> vbackup_storage::Result<Vec<u8>> {
        self.0.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, length: u64) -> vbackup_storage::Result<Vec<u8>> {
        self.0.get_range(key, offset, length)
    }
    fn list(&self, prefix: &str) -> vbackup_storage::Result<Vec<ObjectInfo>> {
        self.0.list(prefix)
    }
    fn stat(&self, key: &str) -> vbackup_storage::Result<Option<ObjectInfo>> {
        self.0.stat(key)
    }
    fn delete(&self, key: &str) -> vbackup_storage::Result<()> {
        let allowed = self
            .1
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if key.starts_with("chunks/") && !allowed {
            return Err(StorageError::new(ErrorKind::Other, key, "storage gone"));
        }
        self.0.delete(key)
    }
}

/// The same repository opened through [`NoRename`].
fn without_rename(backend: &Arc<MemoryBackend>) -> Repository {
    failing_after(backend, usize::MAX)
}

/// Like [`without_rename`], but chunk deletions fail after `deletes`
/// deletions.
fn failing_after(backend: &Arc<MemoryBackend>, deletes: usize) -> Repository {
    let wrapped = Arc::new(NoRename(backend.clone(), AtomicUsize::new(deletes)));
    Repository::open(wrapped, || Ok(Some("pw".into()))).unwrap()
}

fn keys(backend: &MemoryBackend, prefix: &str) -> BTreeSet<String> {
    backend
        .list(prefix)
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

/// The chunk and index names the snapshots in the repository reference.
fn referenced(repo: &Repository) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for object in repo.backend().list("snapshots/").unwrap() {
        let snapshot = repo
            .read_snapshot(&object.key["snapshots/".len()..])
            .unwrap();
        for disk in &snapshot.manifest.disks {
            names.insert(disk.index.clone());
            let index = repo.read_index(&disk.index).unwrap();
            names.extend(index.ids().map(Repository::chunk_key));
        }
    }
    names
}

fn stale_lock(kind: LockKind) -> LockFile {
    LockFile {
        version: 1,
        kind,
        host: "crashed-host".into(),
        pid: 4242,
        started: "2020-01-01T00:00:00Z".into(),
        refreshed: "2020-01-01T00:00:00Z".into(),
        stale_after_secs: 600,
        domain: None,
        process_start: None,
        pending_seen: vec![],
    }
}

#[test]
fn without_rename_prune_deletes_exactly_the_unreferenced_objects_at_once() {
    let (backend, repo) = new_repo();
    let (datas, snapshots) = history(&repo);
    forget_keep_last(&repo, 1);
    let repo = without_rename(&backend);
    let keep = referenced(&repo);
    let stored: BTreeSet<String> = keys(&backend, "chunks/")
        .into_iter()
        .chain(keys(&backend, "indexes/"))
        .collect();

    let before = backend.list("").unwrap();
    let dry = PruneOptions {
        dry_run: true,
        ..PruneOptions::default()
    };
    let plan = prune(&repo, &dry, &Progress::new()).unwrap();
    assert!(plan.exclusive);
    assert_eq!(
        (plan.deleted_chunks, plan.deleted_indexes),
        (8, 2),
        "{plan:?}"
    );
    assert_eq!(
        backend.list("").unwrap(),
        before,
        "a dry run changes nothing"
    );

    // The default grace period does not hold anything back: no backup can
    // run meanwhile.
    let report = prune(&repo, &PruneOptions::default(), &Progress::new()).unwrap();
    assert!(report.exclusive);
    assert_eq!((report.marked_chunks, report.deleted_chunks), (8, 8));
    assert_eq!(report.deleted_indexes, 2);
    assert_eq!(report.freed_bytes, plan.freed_bytes);
    assert_eq!(report.referenced_chunks, 8 + 6);
    assert!(report.pending_list.is_none() && report.swept_lists.is_empty());
    let left: BTreeSet<String> = keys(&backend, "chunks/")
        .into_iter()
        .chain(keys(&backend, "indexes/"))
        .collect();
    assert_eq!(left, keep, "exactly the referenced objects stay");
    assert_eq!(stored.difference(&left).count(), 10);
    for prefix in ["prune/", "locks/", "trash/"] {
        assert_eq!(count(&backend, prefix), 0, "{prefix} left behind");
    }
    for i in [2, 3] {
        assert_eq!(restore(&repo, &snapshots[i]).unwrap(), datas[i]);
    }
    assert!(check_all(&repo).is_clean());
    let again = prune(&repo, &PruneOptions::default(), &Progress::new()).unwrap();
    assert_eq!((again.marked_chunks, again.deleted_chunks), (0, 0));
}

#[test]
fn without_rename_a_running_backup_or_another_prune_makes_prune_refuse() {
    let (backend, repo) = new_repo();
    history(&repo);
    forget_keep_last(&repo, 1);
    let repo = without_rename(&backend);
    let chunks = keys(&backend, "chunks/");

    let lease = Lease::start(&repo, LockKind::Backup, LeaseTiming::default()).unwrap();
    let err = prune_with(&repo, Duration::ZERO).unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("1 backup(s) are running")
            && text.contains(&lease.id()[..8])
            && text.contains("to itself"),
        "{text}"
    );
    assert_eq!(keys(&backend, "chunks/"), chunks, "nothing deleted");
    let locks: Vec<String> = keys(&backend, "locks/").into_iter().collect();
    assert_eq!(
        locks,
        vec![format!("locks/{}", lease.id())],
        "its lock removed"
    );

    // A short --stale-after does not make a running backup look stale (the
    // sleep makes the lease older than the override).
    let hasty = PruneOptions {
        stale_after: Some(Duration::ZERO),
        ..PruneOptions::default()
    };
    std::thread::sleep(Duration::from_millis(1100));
    let err = prune(&repo, &hasty, &Progress::new()).unwrap_err();
    assert!(err.to_string().contains("1 backup(s) are running"), "{err}");
    lease.release().unwrap();

    let held = Lease::exclusive(&repo, LockKind::Prune, LeaseTiming::default()).unwrap();
    let err = prune_with(&repo, Duration::ZERO).unwrap_err();
    assert!(err.to_string().contains("prune lock"), "{err}");
    held.release().unwrap();

    assert_eq!(prune_now(&repo).deleted_chunks, 8);
}

#[test]
fn a_backup_refuses_while_a_prune_has_the_repository_to_itself_and_leaves_nothing() {
    let (backend, repo) = new_repo();
    history(&repo);
    let repo = without_rename(&backend);
    let (lock, _) = Lease::stop_the_world(&repo, LeaseTiming::default(), None).unwrap();
    let before = keys(&backend, "");
    let err = backup_disk(&repo, "a", MemDisk::new(disk_data(3, 77))).unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("needs the repository to itself")
            && text.contains("retry when it ends")
            && text.contains(&format!("pid {}", std::process::id())),
        "{text}"
    );
    assert_eq!(keys(&backend, ""), before, "the backup left nothing");
    // A second exclusive prune is refused too.
    let err = prune_now_err(&repo);
    assert!(err.contains("prune-exclusive lock"), "{err}");
    lock.release().unwrap();
    backup(&repo, "a", &disk_data(3, 77));
}

fn prune_now_err(repo: &Repository) -> String {
    prune_with(repo, Duration::ZERO).unwrap_err().to_string()
}

#[test]
fn stale_locks_neither_stop_an_exclusive_prune_nor_the_backups_after_it() {
    let (backend, repo) = new_repo();
    history(&repo);
    forget_keep_last(&repo, 1);
    let repo = without_rename(&backend);
    for (i, kind) in [LockKind::Backup, LockKind::PruneExclusive]
        .into_iter()
        .enumerate()
    {
        let key = format!("locks/{}{i}", "0".repeat(31));
        repo.put_sealed_json(ObjectKind::Lock, &key, &stale_lock(kind))
            .unwrap();
        backend.set_modified(&key, std::time::UNIX_EPOCH);
    }
    let report = prune_now(&repo);
    assert_eq!(report.deleted_chunks, 8);
    assert_eq!(report.stale_locks.len(), 2, "{report:?}");
    assert!(
        report.stale_locks[1].contains("prune-exclusive lock"),
        "{report:?}"
    );
    backup(&repo, "a", &disk_data(3, 78));
    assert_eq!(vbackup_core::unlock(&repo, &[], true).unwrap().len(), 2);
}

/// What a concurrent prune elsewhere left (a pending list, a deletion log,
/// objects in `trash/`, e.g. in a repository copied to S3) is put back or
/// removed, so later backups load nothing.
#[test]
fn an_exclusive_prune_cleans_up_what_a_concurrent_prune_left() {
    let (backend, repo) = new_repo();
    let (datas, snapshots) = history(&repo);
    let content = forget_mark_and_start_sweep(&repo);
    // One referenced chunk sits in the trash, as a sweep killed between
    // its rename and its move back would leave it.
    let kept = Repository::chunk_key(
        &repo
            .read_index(&snapshots[2].manifest.disks[0].index)
            .unwrap()
            .get(0)
            .unwrap(),
    );
    backend.rename(&kept, &format!("trash/{kept}")).unwrap();
    let trashed = Repository::chunk_key(&content.chunks[0]);
    backend
        .rename(&trashed, &format!("trash/{trashed}"))
        .unwrap();

    let repo = without_rename(&backend);
    let report = prune_now(&repo);
    assert_eq!((report.trash_restored, report.lists_removed), (2, 2));
    assert_eq!(report.deleted_chunks, 8, "{report:?}");
    for prefix in ["prune/", "trash/", "locks/"] {
        assert_eq!(count(&backend, prefix), 0, "{prefix}");
    }
    assert!(backend.stat(&kept).unwrap().is_some());
    for i in [2, 3] {
        assert_eq!(restore(&repo, &snapshots[i]).unwrap(), datas[i]);
    }
    assert!(check_all(&repo).is_clean());
}

#[test]
fn without_rename_repair_refuses_to_quarantine_before_changing_anything() {
    let (backend, repo) = new_repo();
    let (_, snapshots) = history(&repo);
    let index = repo
        .read_index(&snapshots[3].manifest.disks[0].index)
        .unwrap();
    let chunk = Repository::chunk_key(&index.get(1).unwrap());
    let mut bytes = backend.get(&chunk).unwrap();
    bytes[30] ^= 1;
    backend.corrupt(&chunk, bytes);
    let repo = without_rename(&backend);
    let before = backend.list("").unwrap();
    let err = vbackup_core::repair(&repo, &repair_options(), &Progress::new()).unwrap_err();
    assert!(matches!(err, Error::Refused(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&chunk) && text.contains("cannot move objects atomically"),
        "{text}"
    );
    assert_eq!(backend.list("").unwrap(), before, "nothing changed");
    let dry = vbackup_core::RepairOptions {
        dry_run: true,
        ..repair_options()
    };
    let plan = vbackup_core::repair(&repo, &dry, &Progress::new()).unwrap();
    assert_eq!(plan.quarantined, vec![chunk]);
    // Without damage to move, repair runs (it writes markers only).
    backend.delete(&plan.quarantined[0]).unwrap();
    let repaired = vbackup_core::repair(&repo, &repair_options(), &Progress::new()).unwrap();
    assert_eq!(repaired.marked, vec![snapshots[3].id.clone()]);
}

/// An exclusive prune that stops half-way (here: the storage fails after
/// three chunk deletions) leaves a consistent repository, no prune list,
/// and no lock; the next prune deletes the rest.
#[test]
fn an_exclusive_prune_stopped_half_way_leaves_a_consistent_repository() {
    let (backend, repo) = new_repo();
    let (datas, snapshots) = history(&repo);
    forget_keep_last(&repo, 1);
    let keep = referenced(&repo);
    let chunks_before = count(&backend, "chunks/");
    let broken = failing_after(&backend, 3);
    let options = PruneOptions {
        threads: 1,
        ..PruneOptions::default()
    };
    let err = prune(&broken, &options, &Progress::new()).unwrap_err();
    assert!(err.to_string().contains("storage gone"), "{err}");
    let deleted = chunks_before - count(&backend, "chunks/");
    assert!((1..8).contains(&deleted), "{deleted} chunks deleted");
    for prefix in ["prune/", "locks/", "trash/"] {
        assert_eq!(count(&backend, prefix), 0, "{prefix} left behind");
    }
    assert!(keep.iter().all(|k| backend.stat(k).unwrap().is_some()));
    let report = check_all(&repo);
    assert!(report.is_clean(), "{report:?}");
    let repo = without_rename(&backend);
    backup(&repo, "c", &disk_data(2, 90));
    let rest = prune_now(&repo);
    assert_eq!(rest.deleted_chunks as usize, 8 - deleted, "{rest:?}");
    for i in [2, 3] {
        assert_eq!(restore(&repo, &snapshots[i]).unwrap(), datas[i]);
    }
}
