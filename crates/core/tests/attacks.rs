//! Regression tests named after the attacks of issue 10 ("encryption that
//! storage cannot switch off, and data that a backup host cannot destroy"):
//! each plays the attacker against the engine, as the storage, a backup
//! token without the passphrase, or a host with the passphrase.
//! docs/security.md says who may do what and which test pins which
//! guarantee.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{backup, backup_disk, check_all, new_repo, new_repo_with, restore, MemDisk, CHUNK};
use vbackup_core::format::{plain_json_object, Config, DiskIndex, ObjectKind};
use vbackup_core::packs::{write_pack_indexes, ChunkMap, Location, PackWriter};
use vbackup_core::{
    plan_at, prune, Error, ErrorClass, OpenOptions, Progress, PruneOptions, Repository, Snapshot,
};
use vbackup_storage::{Backend, MemoryBackend, ObjectInfo, Result as StorageResult};

const PACK: u32 = 1 << 20;

/// `chunks` chunks of incompressible bytes that differ per `seed`.
fn noise(chunks: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut data = vec![0u8; chunks * CHUNK as usize];
    for word in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
    data
}

fn read_config(backend: &MemoryBackend) -> Config {
    serde_json::from_slice(&backend.get("config").unwrap()[8..]).unwrap()
}

fn write_config(backend: &MemoryBackend, config: &Config) {
    backend.corrupt(
        "config",
        plain_json_object(ObjectKind::Config, config).unwrap(),
    );
}

fn open_with(backend: &Arc<MemoryBackend>, options: &OpenOptions) -> Result<Repository, Error> {
    Repository::open_with(backend.clone(), options, || Ok(Some("pw".into())))
}

fn prune_now(repo: &Repository) -> vbackup_core::PruneReport {
    let options = PruneOptions {
        threads: 2,
        grace: std::time::Duration::ZERO,
        ..PruneOptions::default()
    };
    prune(repo, &options, &Progress::new()).unwrap()
}

fn chunk_ids(repo: &Repository, snapshot: &Snapshot) -> Vec<vbackup_core::ChunkId> {
    let index = repo.read_index(&snapshot.manifest.disks[0].index).unwrap();
    index.ids().copied().collect()
}

// ---- 1. Encryption downgrade -------------------------------------------

#[test]
fn attack_encryption_downgrade_is_refused_while_key_files_exist() {
    let (backend, _repo) = new_repo();
    let mut config = read_config(&backend);
    config.cipher = vbackup_core::crypto::CipherKind::None;
    config.mac.clear();
    write_config(&backend, &config);
    let allow = OpenOptions {
        allow_unencrypted: true,
        ..OpenOptions::default()
    };
    let error = open_with(&backend, &allow).unwrap_err();
    assert_eq!(error.class(), ErrorClass::Integrity, "{error}");
    assert!(error.to_string().contains("key file"), "{error}");
}

#[test]
fn attack_encryption_downgrade_with_the_keys_deleted_is_refused_by_a_given_passphrase_or_the_local_record(
) {
    let (backend, _repo) = new_repo();
    let state = tempfile::tempdir().unwrap();
    let recorded = OpenOptions {
        state_dir: Some(state.path().to_path_buf()),
        ..OpenOptions::default()
    };
    open_with(&backend, &recorded).unwrap();
    let mut config = read_config(&backend);
    config.cipher = vbackup_core::crypto::CipherKind::None;
    config.mac.clear();
    write_config(&backend, &config);
    for key in backend.list("keys/").unwrap() {
        backend.delete(&key.key).unwrap();
    }
    // The client that saw it encrypted refuses, even when told to allow
    // unencrypted repositories.
    let error = open_with(
        &backend,
        &OpenOptions {
            allow_unencrypted: true,
            ..recorded.clone()
        },
    )
    .unwrap_err();
    assert_eq!(error.class(), ErrorClass::Integrity, "{error}");
    assert!(error.to_string().contains("encrypted before"), "{error}");
    // A client with a passphrase in its environment refuses.
    let given = OpenOptions {
        allow_unencrypted: true,
        passphrase_given: true,
        state_dir: None,
    };
    let error = open_with(&backend, &given).unwrap_err();
    assert!(
        error.to_string().contains("passphrase was given"),
        "{error}"
    );
    // A fresh client without any of those signs still needs the explicit choice.
    let error = open_with(&backend, &OpenOptions::default()).unwrap_err();
    assert_eq!(error.class(), ErrorClass::Usage, "{error}");
    assert!(error.to_string().contains("--allow-unencrypted"), "{error}");
}

#[test]
fn an_unencrypted_repository_opens_by_explicit_choice_and_is_remembered() {
    let backend = Arc::new(MemoryBackend::new());
    let state = tempfile::tempdir().unwrap();
    let options = vbackup_core::InitOptions {
        cipher: vbackup_core::crypto::CipherKind::None,
        chunk_size: CHUNK,
        state_dir: Some(state.path().to_path_buf()),
        ..vbackup_core::InitOptions::default()
    };
    Repository::init(backend.clone(), None, &options).unwrap();
    let remembered = OpenOptions {
        state_dir: Some(state.path().to_path_buf()),
        ..OpenOptions::default()
    };
    open_with(&backend, &remembered).unwrap();
    assert!(open_with(&backend, &OpenOptions::default()).is_err());
}

// ---- 8. Unauthenticated config fields ------------------------------------

#[test]
fn attack_pack_size_added_to_a_version_1_config_is_refused() {
    let (backend, _repo) = new_repo();
    let original = read_config(&backend);
    assert_eq!(original.version, 3);
    assert_eq!(original.pack_size, 0);
    // As a version 1 config, whose MAC does not cover the pack size.
    let mut config = original.clone();
    config.version = 1;
    config.pack_size = 1 << 20;
    write_config(&backend, &config);
    let error = open_with(&backend, &OpenOptions::default()).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("version 1 repository has no packs"),
        "{error}"
    );
    // In version 3 the MAC covers it.
    let mut config = original;
    config.pack_size = 1 << 20;
    write_config(&backend, &config);
    let error = open_with(&backend, &OpenOptions::default()).unwrap_err();
    assert_eq!(
        error.class(),
        vbackup_core::ErrorClass::Integrity,
        "{error}"
    );
}

#[test]
fn attack_huge_pack_size_is_refused_before_anything_is_allocated() {
    let (backend, _repo) = new_repo_with(Some(PACK));
    let mut config = read_config(&backend);
    config.pack_size = u32::MAX;
    write_config(&backend, &config);
    let error = open_with(&backend, &OpenOptions::default()).unwrap_err();
    assert!(
        error.to_string().contains("pack size 4294967295"),
        "{error}"
    );
    for (field, value) in [
        ("chunk-size", serde_json::json!(3)),
        ("compression-level", serde_json::json!(99)),
        ("id", serde_json::json!("../../x")),
    ] {
        let (backend, _repo) = new_repo();
        let mut json: serde_json::Value =
            serde_json::from_slice(&backend.get("config").unwrap()[8..]).unwrap();
        json[field] = value;
        backend.corrupt(
            "config",
            plain_json_object(ObjectKind::Config, &json).unwrap(),
        );
        assert!(
            open_with(&backend, &OpenOptions::default()).is_err(),
            "{field}"
        );
    }
    // A field no version defines is not silently ignored.
    let (backend, _repo) = new_repo();
    let mut json: serde_json::Value =
        serde_json::from_slice(&backend.get("config").unwrap()[8..]).unwrap();
    json["compression"] = serde_json::json!("none");
    backend.corrupt(
        "config",
        plain_json_object(ObjectKind::Config, &json).unwrap(),
    );
    assert!(open_with(&backend, &OpenOptions::default()).is_err());
}

// ---- 2. Loose junk shadowing packed chunks ----------------------------------

#[test]
fn attack_junk_loose_copies_of_packed_chunks_are_ignored_and_pruned_not_the_packs() {
    let (backend, repo) = new_repo_with(Some(PACK));
    let data = noise(24, 1);
    let snapshot = backup(&repo, "vm", &data);
    let ids = chunk_ids(&repo, &snapshot);
    // A backup token uploads a short junk loose object for every packed chunk.
    for id in &ids {
        backend.put(&Repository::chunk_key(id), b"junk").unwrap();
    }
    let report = check_all(&repo);
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(
        report.notices.iter().any(|n| n
            .note
            .contains("loose chunk object(s) in a repository with packs")),
        "{:?}",
        report.notices
    );
    assert_eq!(restore(&repo, &snapshot).unwrap(), data);
    let pruned = prune_now(&repo);
    assert_eq!(pruned.stray_loose_deleted, ids.len() as u64);
    assert_eq!(pruned.deleted_packs, 0);
    assert!(backend.list("chunks/").unwrap().is_empty());
    assert_eq!(restore(&repo, &snapshot).unwrap(), data);
    assert!(check_all(&repo).is_clean());
}

#[test]
fn a_repository_with_packs_refuses_loose_chunk_writes() {
    let (_backend, repo) = new_repo_with(Some(PACK));
    let data = vec![7u8; CHUNK as usize];
    let id = repo.crypto().chunk_id(&data);
    let encoded = repo.encode_chunk(&id, &data).unwrap();
    assert!(repo.put_chunk(&id, &encoded).is_err());
}

#[test]
fn prune_keeps_the_good_copy_of_a_chunk_stored_twice_when_the_other_is_damaged() {
    let (backend, repo) = new_repo_with(Some(PACK));
    let data = noise(24, 2);
    let snapshot = backup(&repo, "vm", &data);
    let id = chunk_ids(&repo, &snapshot)[3];
    // A second copy of one chunk, in a pack of its own (as two concurrent
    // backups storing the same chunk would leave).
    let writer = PackWriter::new(&repo);
    let plain = data[3 * CHUNK as usize..4 * CHUNK as usize].to_vec();
    writer
        .add(&id, &repo.encode_chunk(&id, &plain).unwrap())
        .unwrap();
    write_pack_indexes(&repo, &writer.finish().unwrap()).unwrap();
    let map = ChunkMap::load(&repo).unwrap();
    assert_eq!(map.duplicates.len(), 1);
    // Damage the copy the map locates.
    let Some(Location::Packed { pack, offset, .. }) = map.chunks.get(&id).copied() else {
        panic!("not packed");
    };
    let key = vbackup_core::packs::pack_key(&map.packs[pack as usize].digest);
    let mut bytes = backend.get(&key).unwrap();
    bytes[offset as usize + 40] ^= 0xff;
    backend.corrupt(&key, bytes);
    let report = prune_now(&repo);
    assert_eq!(report.duplicates_settled, 1, "{report:?}");
    assert_eq!(restore(&repo, &snapshot).unwrap(), data);
    let check = check_all(&repo);
    assert!(check.is_clean(), "{:?}", check.problems);
}

// ---- 3. Poisoned reuse ----------------------------------------------------

/// Storage that, like the backup server for a backup token, keeps the
/// bytes of an object that exists when it is written again.
struct KeepsFirstBytes(Arc<MemoryBackend>);

impl Backend for KeepsFirstBytes {
    fn location(&self) -> String {
        self.0.location()
    }
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        match self.0.stat(key)? {
            Some(_) if key.starts_with("chunks/") => Ok(()),
            _ => self.0.put(key, data),
        }
    }
    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.0.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, length: u64) -> StorageResult<Vec<u8>> {
        self.0.get_range(key, offset, length)
    }
    fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectInfo>> {
        self.0.list(prefix)
    }
    fn stat(&self, key: &str) -> StorageResult<Option<ObjectInfo>> {
        self.0.stat(key)
    }
    fn delete(&self, key: &str) -> StorageResult<()> {
        self.0.delete(key)
    }
    fn can_rename(&self) -> bool {
        true
    }
    fn rename(&self, from: &str, to: &str) -> StorageResult<()> {
        self.0.rename(from, to)
    }
}

/// Backs up `data`, forgets that snapshot and prunes its chunks, then
/// uploads junk under their names as a backup token could.
fn poison(backend: &MemoryBackend, repo: &Repository, data: &[u8]) {
    let first = backup(repo, "vm", data);
    let ids = chunk_ids(repo, &first);
    backend.delete(&format!("snapshots/{}", first.id)).unwrap();
    prune_now(repo);
    prune_now(repo);
    for id in &ids {
        assert!(backend.stat(&Repository::chunk_key(id)).unwrap().is_none());
        backend.put(&Repository::chunk_key(id), b"junk").unwrap();
    }
}

#[test]
fn attack_poisoned_reuse_is_healed_where_storage_lets_the_backup_overwrite() {
    let (backend, repo) = new_repo();
    let data = noise(8, 3);
    poison(&backend, &repo, &data);
    let snapshot = backup(&repo, "vm", &data);
    assert_eq!(snapshot.manifest.stats.chunks_new, 8);
    assert_eq!(restore(&repo, &snapshot).unwrap(), data);
}

#[test]
fn attack_poisoned_reuse_fails_the_backup_loudly_where_storage_keeps_the_junk() {
    let (backend, repo) = new_repo();
    let data = noise(8, 4);
    poison(&backend, &repo, &data);
    let keeping: Arc<dyn Backend> = Arc::new(KeepsFirstBytes(backend.clone()));
    let repo = Repository::open(keeping, || Ok(Some("pw".into()))).unwrap();
    let error = backup_disk(&repo, "vm", MemDisk::new(data)).unwrap_err();
    assert_eq!(error.class(), ErrorClass::Integrity, "{error}");
    assert!(
        error.to_string().contains("does not authenticate"),
        "{error}"
    );
    assert!(error.to_string().contains("vbackup repair"), "{error}");
    assert!(backend.list("snapshots/").unwrap().is_empty());
}

#[test]
fn attack_junk_raced_into_a_trashed_chunks_name_does_not_replace_it() {
    let (backend, repo) = new_repo();
    let data = noise(4, 5);
    let snapshot = backup(&repo, "vm", &data);
    let id = chunk_ids(&repo, &snapshot)[0];
    let key = Repository::chunk_key(&id);
    // An interrupted sweep left the chunk in the trash; a backup token
    // filled the free name with junk.
    backend.rename(&key, &format!("trash/{key}")).unwrap();
    backend.put(&key, b"junk").unwrap();
    prune_now(&repo);
    assert!(backend.list("trash/").unwrap().is_empty());
    assert_eq!(restore(&repo, &snapshot).unwrap(), data);
}

// ---- 4. Future-dated snapshots ---------------------------------------------

/// Three sealed manifests dated 2099 that copy `real`'s disk records but
/// point to an all-holes index, as a compromised host could write.
fn forge_future(repo: &Repository, real: &Snapshot, time: &str) -> Vec<String> {
    let record = &real.manifest.disks[0];
    let holes = DiskIndex::empty(record.virtual_size, record.chunk_size);
    let index = repo.write_index(&holes).unwrap();
    (0..3)
        .map(|_| {
            let mut manifest = real.manifest.clone();
            manifest.time = time.to_string();
            manifest.disks[0].index = index.clone();
            manifest.disks[0].data_chunks = 0;
            repo.write_snapshot(&manifest).unwrap()
        })
        .collect()
}

fn disk_with_identity(data: &[u8]) -> MemDisk {
    MemDisk {
        identity: Some("inode 12 mtime 34".into()),
        ..MemDisk::new(data.to_vec())
    }
}

#[test]
fn attack_future_dated_snapshots_are_never_counted_by_retention() {
    let (_backend, repo) = new_repo();
    let data = noise(4, 6);
    let real: Vec<Snapshot> = (0..3).map(|_| backup(&repo, "vm", &data)).collect();
    forge_future(&repo, &real[2], "2099-01-01T00:00:00.000Z");
    let snapshots = repo.list_snapshots().unwrap();
    let keep = vbackup_core::format::lifecycle::KeepRules {
        last: Some(3),
        within: Some("7d".parse().unwrap()),
        ..Default::default()
    };
    let groups = plan_at(&snapshots, &keep, Default::default(), chrono::Utc::now()).unwrap();
    let decisions = &groups[0].decisions;
    assert_eq!(decisions.len(), 6);
    assert!(decisions.iter().all(|d| d.keep), "{decisions:?}");
    for snapshot in &real {
        let d = decisions
            .iter()
            .find(|d| d.snapshot == snapshot.id)
            .unwrap();
        assert!(d.reasons.iter().any(|r| r == "last"), "{d:?}");
        assert!(d.reasons.iter().any(|r| r.starts_with("within")), "{d:?}");
    }
    let flagged = decisions
        .iter()
        .filter(|d| d.reasons == ["dated in the future (not counted)"])
        .count();
    assert_eq!(flagged, 3);
    let report = check_all(&repo);
    let future_notices = report
        .notices
        .iter()
        .filter(|n| n.note.contains("later than this host's clock allows"))
        .count();
    assert_eq!(future_notices, 3);
}

#[test]
fn attack_future_dated_snapshot_is_never_the_base_of_the_next_backup() {
    let (_backend, repo) = new_repo();
    let data = noise(4, 7);
    let real = backup_disk(&repo, "vm", disk_with_identity(&data)).unwrap();
    forge_future(&repo, &real, "2099-01-01T00:00:00.000Z");
    let next = backup_disk(&repo, "vm", disk_with_identity(&data)).unwrap();
    // The unchanged-file shortcut took the real snapshot, not a forgery.
    assert_eq!(
        next.manifest.disks[0].unchanged_since.as_deref(),
        Some(real.id.as_str())
    );
    assert_eq!(restore(&repo, &next).unwrap(), data);
}

#[test]
fn attack_forged_manifest_copying_the_source_fingerprint_makes_the_backup_read_the_disk() {
    let (_backend, repo) = new_repo();
    let data = noise(4, 8);
    let real = backup_disk(&repo, "vm", disk_with_identity(&data)).unwrap();
    // Dated now: the newest snapshot, claiming the same unchanged source.
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    forge_future(&repo, &real, &now);
    let next = backup_disk(&repo, "vm", disk_with_identity(&data)).unwrap();
    assert_eq!(next.manifest.disks[0].unchanged_since, None);
    assert_eq!(next.manifest.stats.disks_unchanged, 0);
    assert_eq!(restore(&repo, &next).unwrap(), data);
}
