//! Regressions for the attacks of issue 10 on locks, leases, junk objects
//! and rollback: each test is named after the attack it pins, plays it
//! over the in-memory backend, and checks that it now fails.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{backup, check_all, disk_data, new_repo, new_repo_with};
use vbackup_core::client_state::{rollback_findings, ClientState};
use vbackup_core::format::lifecycle::{GroupBy, KeepRules, LockFile, LockKind};
use vbackup_core::format::ObjectKind;
use vbackup_core::{
    forget, prune, Error, ForgetOptions, Lease, LeaseTiming, Progress, PruneOptions, ReadData,
    Repository,
};
use vbackup_storage::{Backend, MemoryBackend, ObjectInfo};

fn prune_now(repo: &Repository) -> vbackup_core::Result<vbackup_core::PruneReport> {
    let options = PruneOptions {
        grace: Duration::ZERO,
        threads: 2,
        ..PruneOptions::default()
    };
    prune(repo, &options, &Progress::new())
}

fn keep_last(n: u32) -> ForgetOptions {
    ForgetOptions {
        keep: Some(KeepRules {
            last: Some(n),
            ..KeepRules::default()
        }),
        ..ForgetOptions::default()
    }
}

/// Two snapshots of VM a, the first of which `forget --keep-last 1` drops.
fn two_snapshots(repo: &Repository) -> Vec<vbackup_core::Snapshot> {
    vec![
        backup(repo, "a", &disk_data(4, 1)),
        backup(repo, "a", &disk_data(4, 2)),
    ]
}

/// A lock sealed with the repository's key, as a key holder with only a
/// backup token could write it: it claims to be an exclusive prune that
/// never goes stale and was refreshed far in the future.
fn forged_lock(repo: &Repository, backend: &MemoryBackend, written: SystemTime) -> String {
    let lock = LockFile {
        version: 1,
        kind: LockKind::PruneExclusive,
        host: "attacker".into(),
        pid: 1,
        started: "2999-01-01T00:00:00Z".into(),
        refreshed: "2999-01-01T00:00:00Z".into(),
        stale_after_secs: u64::MAX,
        domain: None,
        process_start: None,
        pending_seen: vec![],
    };
    let key = format!("locks/{}", "f".repeat(32));
    repo.put_sealed_json(ObjectKind::Lock, &key, &lock).unwrap();
    assert!(backend.set_modified(&key, written));
    key
}

fn ago(secs: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(secs)
}

#[test]
fn attack_forged_lock_with_huge_limit_and_future_refresh_blocks_only_until_the_cap() {
    let (backend, repo) = new_repo_with(Some(1 << 20));
    two_snapshots(&repo);
    // Written just now: it counts, like any prune's lock, and the refusal
    // names the object and when the storage says it was written.
    let key = forged_lock(&repo, &backend, SystemTime::now());
    let err = common::backup_disk(&repo, "a", common::MemDisk::new(disk_data(2, 9)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("object '{key}' (last written ")) && err.contains("vbackup unlock"),
        "{err}"
    );
    // Written longer ago than any vbackup lock may claim: stale, whatever
    // it claims about its limit and refresh time.
    assert!(backend.set_modified(&key, ago(vbackup_core::MAX_STALE_AFTER.as_secs() + 5)));
    let locks = vbackup_core::list_locks(&repo, None).unwrap();
    let stale = locks[0].stale.clone().unwrap_or_default();
    assert!(
        stale.contains("limit 600 s") && stale.contains("claims"),
        "{stale}"
    );
    backup(&repo, "a", &disk_data(2, 9));
    forget(&repo, &keep_last(1)).unwrap();
    let report = prune_now(&repo).unwrap();
    assert!(report.exclusive && report.deleted_chunks > 0, "{report:?}");
    let removed = vbackup_core::unlock(&repo, &[], true).unwrap();
    assert_eq!(removed.len(), 1);
    assert!(backend.list("locks/").unwrap().is_empty());
}

#[test]
fn attack_forged_lock_with_modification_time_in_the_future_is_not_fresh() {
    let (backend, repo) = new_repo();
    two_snapshots(&repo);
    let key = forged_lock(
        &repo,
        &backend,
        SystemTime::now() + Duration::from_secs(86_400),
    );
    let locks = vbackup_core::list_locks(&repo, None).unwrap();
    let stale = locks[0].stale.clone().unwrap_or_default();
    assert!(stale.contains("in the future"), "{stale}");
    // Backups and the concurrent prune (which also refuses live exclusive
    // locks) run; unlock --stale-only removes it.
    backup(&repo, "a", &disk_data(2, 9));
    forget(&repo, &keep_last(1)).unwrap();
    assert!(prune_now(&repo).unwrap().deleted_chunks > 0);
    let removed = vbackup_core::unlock(&repo, &[], true).unwrap();
    assert_eq!(removed.iter().map(|l| l.key()).collect::<Vec<_>>(), [key]);
}

#[test]
fn attack_junk_lease_does_not_hold_the_sweep_back() {
    let (backend, repo) = new_repo();
    two_snapshots(&repo);
    forget(&repo, &keep_last(1)).unwrap();
    // Bytes that do not authenticate, uploaded just now (and again at
    // every prune: it would not matter).
    let junk = format!("locks/{}", "0".repeat(32));
    backend.put(&junk, b"not a lock, just bytes").unwrap();
    // A real lease copied to another name does not authenticate either
    // (the name is authenticated data).
    let real = Lease::start(&repo, LockKind::Backup, LeaseTiming::default()).unwrap();
    let copied = format!("locks/{}", "1".repeat(32));
    let bytes = backend.get(&format!("locks/{}", real.id())).unwrap();
    backend.put(&copied, &bytes).unwrap();
    real.release().unwrap();
    let report = prune_now(&repo).unwrap();
    assert!(report.deferred.is_empty(), "{report:?}");
    assert_eq!(report.deleted_chunks, 4, "{report:?}");
    for lock in vbackup_core::list_locks(&repo, None).unwrap() {
        let stale = lock.stale.clone().unwrap_or_default();
        assert!(stale.contains("does not authenticate"), "{lock:?}");
    }
    let removed = vbackup_core::unlock(&repo, &[], true).unwrap();
    assert_eq!(removed.len(), 2);
    assert!(backend.list("locks/").unwrap().is_empty());
}

#[test]
fn attack_junk_lease_does_not_stop_the_exclusive_prune() {
    let (backend, repo) = new_repo_with(Some(1 << 20));
    two_snapshots(&repo);
    forget(&repo, &keep_last(1)).unwrap();
    backend
        .put(&format!("locks/{}", "0".repeat(32)), b"junk")
        .unwrap();
    let report = prune_now(&repo).unwrap();
    assert!(report.exclusive && report.deleted_chunks > 0, "{report:?}");
}

#[test]
fn a_lease_of_a_newer_version_still_counts() {
    let (backend, repo) = new_repo();
    two_snapshots(&repo);
    forget(&repo, &keep_last(1)).unwrap();
    let newer = serde_json::json!({ "version": 99, "kind": "something-new" });
    let key = format!("locks/{}", "2".repeat(32));
    repo.put_sealed_json(ObjectKind::Lock, &key, &newer)
        .unwrap();
    let report = prune_now(&repo).unwrap();
    assert_eq!(report.deleted_chunks, 0, "it holds the sweep back");
    assert!(vbackup_core::list_locks(&repo, None).unwrap()[0].is_live());
    assert!(backend.set_modified(&key, ago(601)));
    assert_eq!(prune_now(&repo).unwrap().deleted_chunks, 4);
}

/// Junk under `snapshots/` stops prune (it cannot know what the object
/// protects); the refusal names it and one `repair` clears it.
fn junk_snapshot_is_cleared_by_one_repair(backend: &Arc<MemoryBackend>, repo: &Repository) {
    two_snapshots(repo);
    forget(repo, &keep_last(1)).unwrap();
    let junk = format!("snapshots/{}", "9".repeat(32));
    backend.put(&junk, b"junk").unwrap();
    let err = prune_now(repo).unwrap_err();
    assert!(matches!(err, Error::Refused(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("object '{junk}' (last written "))
            && text.contains("`vbackup repair`"),
        "{text}"
    );
    let options = vbackup_core::RepairOptions {
        read_data: ReadData::None,
        threads: 2,
        index: false,
        dry_run: false,
    };
    let repaired = vbackup_core::repair(repo, &options, &Progress::new()).unwrap();
    assert_eq!(repaired.quarantined, vec![junk.clone()]);
    assert!(backend
        .stat(&format!("quarantine/{junk}"))
        .unwrap()
        .is_some());
    assert!(prune_now(repo).unwrap().deleted_chunks > 0);
}

#[test]
fn attack_junk_snapshot_object_blocks_prune_until_one_repair() {
    let (backend, repo) = new_repo();
    junk_snapshot_is_cleared_by_one_repair(&backend, &repo);
}

#[test]
fn attack_junk_snapshot_object_on_storage_without_rename_is_cleared_by_one_repair() {
    let (backend, _) = new_repo();
    let wrapped = Arc::new(NoRename(backend.clone()));
    let repo = Repository::open(wrapped, || Ok(Some("pw".into()))).unwrap();
    junk_snapshot_is_cleared_by_one_repair(&backend, &repo);
}

/// The in-memory backend without atomic rename, like plain S3.
struct NoRename(Arc<MemoryBackend>);

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
        self.0.delete(key)
    }
}

/// What the CLI does after a forget: record the removed snapshots.
fn record(state: &mut ClientState, report: &vbackup_core::ForgetReport) {
    for d in report.groups.iter().flat_map(|g| &g.decisions) {
        if !d.keep {
            state.record_forgotten(&d.snapshot, &d.vm, &d.time);
        }
    }
    if let Some(policy) = &report.policy {
        state.record_policy(policy);
    }
}

#[test]
fn attack_rollback_forgotten_manifest_put_back_is_reported() {
    let (backend, repo) = new_repo();
    let snapshots = two_snapshots(&repo);
    let key = format!("snapshots/{}", snapshots[0].id);
    let saved = backend.get(&key).unwrap();
    let mut state = ClientState::new(&repo.config().id);
    record(&mut state, &forget(&repo, &keep_last(1)).unwrap());
    assert!(rollback_findings(&repo, &state).unwrap().is_empty());
    // The storage puts the removed manifest back: it authenticates, and
    // the repository alone looks whole (its data is still there).
    backend.put(&key, &saved).unwrap();
    assert!(check_all(&repo).is_clean());
    let findings = rollback_findings(&repo, &state).unwrap();
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].object, key);
    let forgotten = &state.forgotten[&snapshots[0].id].forgotten;
    assert!(
        findings[0].note.contains(&snapshots[0].id)
            && findings[0].note.contains(forgotten.as_str())
            && findings[0].note.contains("removed by `vbackup forget`"),
        "{findings:?}"
    );
}

#[test]
fn attack_rollback_old_policy_put_back_is_refused() {
    let (backend, repo) = new_repo();
    two_snapshots(&repo);
    let keep = |n| KeepRules {
        last: Some(n),
        ..KeepRules::default()
    };
    let mut state = ClientState::new(&repo.config().id);
    let first = vbackup_core::set_policy(&repo, keep(1), GroupBy::default(), 0).unwrap();
    state.record_policy(&first);
    let old = backend.get("policy").unwrap();
    let second = vbackup_core::set_policy(
        &repo,
        keep(5),
        GroupBy::default(),
        state.newest_policy_revision(),
    )
    .unwrap();
    state.record_policy(&second);
    assert_eq!((first.revision, second.revision), (1, 2));
    // The storage puts the first (keep only 1) back over the second.
    backend.put("policy", &old).unwrap();
    let options = ForgetOptions {
        newest_policy_seen: state.newest_policy_revision(),
        ..ForgetOptions::default()
    };
    let err = forget(&repo, &options).unwrap_err();
    assert!(matches!(err, Error::Refused(_)), "{err}");
    assert!(err.to_string().contains("revision 1") && err.to_string().contains("revision 2"));
    assert_eq!(
        backend.list("snapshots/").unwrap().len(),
        2,
        "nothing removed"
    );
    let findings = rollback_findings(&repo, &state).unwrap();
    assert!(
        findings.iter().any(|f| f.object == "policy"),
        "{findings:?}"
    );
    // Setting the rules again goes past the rolled back revision.
    let third = vbackup_core::set_policy(
        &repo,
        keep(5),
        GroupBy::default(),
        state.newest_policy_revision(),
    )
    .unwrap();
    assert_eq!(third.revision, 3);
}

#[test]
fn policies_without_a_revision_still_load() {
    let (_, repo) = new_repo();
    let old = serde_json::json!({
        "version": 1,
        "updated": "2025-01-01T00:00:00Z",
        "host": "old",
        "keep": { "last": 3 },
        "group-by": "vm",
    });
    repo.put_sealed_json(ObjectKind::Policy, "policy", &old)
        .unwrap();
    let policy = vbackup_core::read_policy(&repo).unwrap().unwrap();
    assert_eq!(policy.revision, 0);
    let next = vbackup_core::set_policy(&repo, policy.keep, policy.group_by, 0).unwrap();
    assert_eq!(next.revision, 1);
}
