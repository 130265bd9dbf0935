//! Repositories that store chunks in packs: the layout, restores through
//! ranged reads, orphan packs recovered from their trailers, damage, and
//! the exclusive prune that deletes and repacks packs.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{backup, check_all, new_repo_with, restore, MemDisk, CHUNK};
use vbackup_core::crypto::CipherKind;
use vbackup_core::packs::{PACKS_PREFIX, PACK_INDEXES_PREFIX};
use vbackup_core::{
    prune, Error, InitOptions, Progress, PruneOptions, PruneReport, ReadData, Repository, Snapshot,
};
use vbackup_storage::{Backend, MemoryBackend};

const PACK: u32 = 1 << 20;

fn packed_repo() -> (Arc<MemoryBackend>, Repository) {
    new_repo_with(Some(PACK))
}

/// `chunks` chunks of incompressible bytes that differ per `seed`.
fn disk_data(chunks: usize, seed: u32) -> Vec<u8> {
    let mut state = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut data = vec![0u8; chunks * CHUNK as usize];
    for word in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
    data
}

fn reopen(backend: &Arc<MemoryBackend>) -> Repository {
    Repository::open(backend.clone(), || Ok(Some("pw".to_string()))).unwrap()
}

fn keys(backend: &MemoryBackend, prefix: &str) -> Vec<String> {
    backend
        .list(prefix)
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

fn prune_now(repo: &Repository) -> PruneReport {
    let options = PruneOptions {
        threads: 3,
        ..PruneOptions::default()
    };
    prune(repo, &options, &Progress::new()).unwrap()
}

fn forget_snapshot(backend: &MemoryBackend, snapshot: &Snapshot) {
    backend
        .delete(&format!("snapshots/{}", snapshot.id))
        .unwrap();
}

fn stored_bytes(backend: &MemoryBackend) -> u64 {
    backend
        .list(PACKS_PREFIX)
        .unwrap()
        .iter()
        .map(|o| o.size)
        .sum()
}

/// `data` with chunks `range` replaced by other content.
fn changed(data: &[u8], range: std::ops::Range<usize>, seed: u32) -> Vec<u8> {
    let mut out = data.to_vec();
    let other = disk_data(range.len(), seed);
    let c = CHUNK as usize;
    out[range.start * c..range.end * c].copy_from_slice(&other);
    out
}

#[test]
fn chunks_go_into_a_few_packs_and_restore_through_ranged_reads() {
    let (backend, repo) = packed_repo();
    assert_eq!(repo.config().version, 3);
    assert_eq!(repo.config().pack_size, PACK);
    let data = disk_data(48, 1);
    let first = backup(&repo, "vm", &data);
    assert!(keys(&backend, "chunks/").is_empty(), "no loose chunks");
    let packs = keys(&backend, PACKS_PREFIX);
    // 48 chunks of 64 KiB, about 3 MiB: three or four packs of 1 MiB, not 48 objects.
    assert!((3..=4).contains(&packs.len()), "{packs:?}");
    assert_eq!(keys(&backend, PACK_INDEXES_PREFIX).len(), 1);
    assert_eq!(restore(&repo, &first).unwrap(), data);

    let second_data = changed(&data, 10..12, 7);
    let second = backup(&repo, "vm", &second_data);
    assert_eq!(second.manifest.stats.chunks_new, 2);
    assert_eq!(keys(&backend, PACKS_PREFIX).len(), packs.len() + 1);
    assert_eq!(keys(&backend, PACK_INDEXES_PREFIX).len(), 2);
    let repo = reopen(&backend);
    assert_eq!(restore(&repo, &first).unwrap(), data);
    assert_eq!(restore(&repo, &second).unwrap(), second_data);
    let report = check_all(&repo);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.chunks_checked, 50);
}

#[test]
fn the_pack_size_is_authenticated_and_unpacked_repositories_stay_version_1() {
    let (backend, _repo) = packed_repo();
    let config = backend.get("config").unwrap();
    let tampered = String::from_utf8(config)
        .unwrap()
        .replace("\"pack-size\": 1048576", "\"pack-size\": 2097152")
        .into_bytes();
    backend.corrupt("config", tampered);
    let error = Repository::open(backend.clone(), || Ok(Some("pw".to_string()))).unwrap_err();
    assert!(error.to_string().contains("authentication code"), "{error}");

    let loose = Repository::init(
        Arc::new(MemoryBackend::new()),
        None,
        &InitOptions {
            cipher: CipherKind::None,
            pack_size: Some(0),
            ..InitOptions::default()
        },
    )
    .unwrap();
    assert_eq!(loose.config().version, 3);
    assert!(!loose.config().packs());
    let bad = InitOptions {
        pack_size: Some(1000),
        ..InitOptions::default()
    };
    let error = Repository::init(Arc::new(MemoryBackend::new()), Some("pw"), &bad).unwrap_err();
    assert!(error.to_string().contains("pack size"), "{error}");
}

#[test]
fn orphan_packs_are_read_from_their_trailers_reused_and_indexed_by_prune() {
    let (backend, repo) = packed_repo();
    let data = disk_data(40, 2);
    let snapshot = backup(&repo, "vm", &data);
    // As if the backup had been killed before writing its pack index (its
    // snapshot, in that case, would not exist; here it shows the packs
    // are still readable).
    for key in keys(&backend, PACK_INDEXES_PREFIX) {
        backend.delete(&key).unwrap();
    }
    let repo = reopen(&backend);
    assert_eq!(restore(&repo, &snapshot).unwrap(), data);
    let report = check_all(&repo);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(
        report
            .notices
            .iter()
            .any(|n| n.note.contains("named by no pack index")),
        "{:?}",
        report.notices
    );
    let again = backup(&repo, "vm2", &data);
    assert_eq!(
        again.manifest.stats.chunks_new, 0,
        "the orphans' chunks are reused"
    );

    let pruned = prune_now(&repo);
    assert_eq!(pruned.deleted_packs, 0);
    assert_eq!(pruned.pack_indexes_written, 1);
    let map = repo.chunk_map().unwrap();
    assert!(
        map.packs.iter().all(|p| p.indexed),
        "prune indexed the orphans"
    );
    assert_eq!(restore(&repo, &snapshot).unwrap(), data);
}

#[test]
fn a_damaged_pack_index_falls_back_to_the_trailers() {
    let (backend, repo) = packed_repo();
    let data = disk_data(20, 3);
    let snapshot = backup(&repo, "vm", &data);
    let index = keys(&backend, PACK_INDEXES_PREFIX).remove(0);
    let mut bytes = backend.get(&index).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    backend.corrupt(&index, bytes);
    let repo = reopen(&backend);
    assert_eq!(restore(&repo, &snapshot).unwrap(), data);
    let report = check_all(&repo);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(
        report.notices.iter().any(|n| n.object == index),
        "{:?}",
        report.notices
    );
    // Prune writes the index again (here under the same name: same content).
    assert_eq!(prune_now(&repo).pack_indexes_written, 1);
    assert!(check_all(&repo).notices.iter().all(|n| n.object != index));
    assert_eq!(restore(&reopen(&backend), &snapshot).unwrap(), data);
}

#[test]
fn a_damaged_blob_is_named_by_pack_and_chunk_and_nothing_wrong_is_restored() {
    let (backend, repo) = packed_repo();
    let data = disk_data(20, 4);
    let snapshot = backup(&repo, "vm", &data);
    let pack = keys(&backend, PACKS_PREFIX).remove(0);
    let mut bytes = backend.get(&pack).unwrap();
    bytes[100] ^= 0x55;
    backend.corrupt(&pack, bytes);
    let error = restore(&repo, &snapshot).unwrap_err();
    assert!(matches!(error, Error::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains(&pack), "{error}");
    let report = check_all(&repo);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].object.starts_with(&pack));
    assert_eq!(report.affected.len(), 1);
    assert_eq!(report.affected[0].bad_chunks, 1);
}

#[test]
fn a_truncated_pack_fails_the_chunks_it_held_by_name() {
    let (backend, repo) = packed_repo();
    let data = disk_data(20, 5);
    let snapshot = backup(&repo, "vm", &data);
    let pack = keys(&backend, PACKS_PREFIX).remove(0);
    let bytes = backend.get(&pack).unwrap();
    backend.corrupt(&pack, bytes[..bytes.len() / 2].to_vec());
    let error = restore(&repo, &snapshot).unwrap_err();
    assert!(error.to_string().contains(&pack), "{error}");
    let report = check_all(&repo);
    assert!(!report.problems.is_empty());
    assert!(report.problems.iter().all(|p| p.object.starts_with(&pack)));
}

#[test]
fn prune_deletes_dead_packs_repacks_wasteful_ones_and_merges_small_ones() {
    let (backend, repo) = packed_repo();
    let data = disk_data(48, 6);
    let old = backup(&repo, "vm", &data);
    // Half the disk rewritten: the first snapshot's packs hold half waste
    // once it is forgotten.
    let newer = changed(&data, 0..24, 60);
    let kept = backup(&repo, "vm", &newer);
    let gone = backup(&repo, "other", &disk_data(16, 61));
    // Three small incrementals: three small packs.
    let mut latest = newer.clone();
    let mut small = Vec::new();
    for seed in 0..3 {
        latest = changed(&latest, 40 + seed..41 + seed, 70 + seed as u32);
        small.push((backup(&repo, "vm", &latest), latest.clone()));
    }
    forget_snapshot(&backend, &old);
    forget_snapshot(&backend, &gone);
    let before = stored_bytes(&backend);
    let packs_before = keys(&backend, PACKS_PREFIX).len();

    let report = prune_now(&repo);
    assert!(report.exclusive);
    assert!(report.deleted_packs >= 1, "{report:?}");
    assert!(report.repacked_packs >= 3, "{report:?}");
    assert!(report.written_packs >= 1, "{report:?}");
    assert_eq!(report.pack_indexes_written, 1);
    // Most of the 40 unreferenced chunks go; one in a pack that is otherwise
    // live (under 20% waste) may stay until more of its pack is waste.
    assert!(report.deleted_chunks >= 36, "{report:?}");
    assert!(stored_bytes(&backend) < before, "space was freed");
    assert!(keys(&backend, PACKS_PREFIX).len() < packs_before);
    assert_eq!(keys(&backend, PACK_INDEXES_PREFIX).len(), 1);
    assert!(keys(&backend, "locks/").is_empty());

    let repo = reopen(&backend);
    assert_eq!(restore(&repo, &kept).unwrap(), newer);
    for (snapshot, data) in &small {
        assert_eq!(&restore(&repo, snapshot).unwrap(), data);
    }
    let checked = check_all(&repo);
    assert!(checked.problems.is_empty(), "{:?}", checked.problems);
    assert_eq!(checked.unreferenced_chunks + report.deleted_chunks, 40);

    // Nothing left to do: a second prune changes nothing.
    let again = prune_now(&repo);
    assert_eq!(
        (
            again.deleted_packs,
            again.repacked_packs,
            again.pack_indexes_written
        ),
        (0, 0, 0),
        "{again:?}"
    );
}

#[test]
fn prune_keeps_a_pack_whose_live_chunk_is_damaged() {
    let (backend, repo) = packed_repo();
    let data = disk_data(32, 8);
    let old = backup(&repo, "vm", &data);
    let newer = changed(&data, 0..20, 80);
    let kept = backup(&repo, "vm", &newer);
    forget_snapshot(&backend, &old);
    // Damage a blob the kept snapshot needs, in a pack that is mostly waste.
    let map = repo.chunk_map().unwrap();
    let index = repo.read_index(&kept.manifest.disks[0].index).unwrap();
    let live = index.get(31).unwrap();
    let (pack, offset) = match map.chunks[&live] {
        vbackup_core::packs::Location::Packed { pack, offset, .. } => (pack, offset),
        other => panic!("{other:?}"),
    };
    let key = vbackup_core::packs::pack_key(&map.packs[pack as usize].digest);
    let mut bytes = backend.get(&key).unwrap();
    bytes[offset as usize + 40] ^= 1;
    backend.corrupt(&key, bytes);

    let report = prune_now(&repo);
    assert_eq!(report.packs_kept_damaged.len(), 1, "{report:?}");
    assert!(report.packs_kept_damaged[0].starts_with(&key));
    assert!(
        backend.stat(&key).unwrap().is_some(),
        "the damaged pack stays"
    );
    let checked = check_all(&repo);
    assert_eq!(checked.problems.len(), 1, "{:?}", checked.problems);
}

#[test]
fn repair_takes_a_damaged_packed_chunk_out_and_the_next_backup_heals_the_snapshot() {
    let (backend, repo) = packed_repo();
    let data = disk_data(20, 9);
    let snapshot = backup(&repo, "vm", &data);
    let pack = keys(&backend, PACKS_PREFIX).remove(0);
    let mut bytes = backend.get(&pack).unwrap();
    bytes[200] ^= 0x10;
    backend.corrupt(&pack, bytes);

    let options = vbackup_core::RepairOptions {
        read_data: ReadData::All,
        threads: 2,
        index: false,
        dry_run: false,
    };
    let report = vbackup_core::repair(&repo, &options, &Progress::new()).unwrap();
    assert_eq!(report.dropped_from_packs.len(), 1, "{report:?}");
    assert!(report.dropped_from_packs[0].starts_with(&pack));
    assert!(report.quarantined.is_empty(), "{report:?}");
    assert_eq!(report.marked, vec![snapshot.id.clone()]);
    // The chunk now counts as missing, not damaged; the next backup of the
    // same disk stores it again and the old snapshot is whole.
    let checked = check_all(&repo);
    assert_eq!(checked.problems.len(), 1);
    assert_eq!(
        checked.problems[0].kind,
        vbackup_core::ProblemKind::MissingChunk
    );
    let healed = backup(&repo, "vm", &data);
    assert_eq!(healed.manifest.stats.chunks_new, 1);
    assert_eq!(restore(&repo, &snapshot).unwrap(), data);
    let report = vbackup_core::repair(&repo, &options, &Progress::new()).unwrap();
    assert_eq!(report.cleared, vec![snapshot.id.clone()]);
    assert!(check_all(&repo).problems.is_empty());
}

/// An in-memory disk whose reads fail from chunk `fail_from` on.
#[derive(Clone)]
struct FailingDisk {
    disk: MemDisk,
    fail_from: u64,
}

impl vbackup_core::DiskSource for FailingDisk {
    fn virtual_size(&self) -> u64 {
        self.disk.virtual_size()
    }
    fn format(&self) -> &str {
        "raw"
    }
    fn open_reader(&self) -> std::io::Result<Box<dyn vbackup_core::DiskReader>> {
        Ok(Box::new(self.clone()))
    }
}

impl vbackup_core::DiskReader for FailingDisk {
    fn extents(&mut self, offset: u64, length: u64) -> std::io::Result<Vec<vbackup_core::Extent>> {
        self.disk.extents(offset, length)
    }
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset >= self.fail_from * u64::from(CHUNK) {
            return Err(std::io::Error::other("I/O error on the source"));
        }
        self.disk.read_exact_at(buf, offset)
    }
}

#[test]
fn a_failed_backup_indexes_the_packs_it_uploaded_and_the_retry_reuses_them() {
    let (backend, repo) = packed_repo();
    let data = disk_data(48, 10);
    let disks = [vbackup_core::BackupDisk {
        name: "vda".into(),
        source_label: "x".into(),
        source: Box::new(FailingDisk {
            disk: MemDisk::new(data.clone()),
            fail_from: 40,
        }),
        base: None,
    }];
    let options = vbackup_core::BackupOptions {
        vm: "vm".into(),
        tags: vec![],
        host: None,
        threads: 1,
        skip_unchanged: false,
    };
    let error = vbackup_core::backup(&repo, &disks, &options, &Progress::new()).unwrap_err();
    assert!(error.to_string().contains("reading disk 'vda'"), "{error}");
    assert!(keys(&backend, "snapshots/").is_empty());
    let uploaded = keys(&backend, PACKS_PREFIX).len();
    assert!(uploaded >= 2, "{uploaded} full packs before the failure");
    assert_eq!(keys(&backend, PACK_INDEXES_PREFIX).len(), 1);
    let map = repo.chunk_map().unwrap();
    assert!(map.packs.iter().all(|p| p.indexed));
    let stored = map.chunks.len() as u64;
    assert!((20..40).contains(&stored), "{stored}");

    let retry = backup(&repo, "vm", &data);
    assert_eq!(retry.manifest.stats.chunks_reused, stored);
    assert_eq!(retry.manifest.stats.chunks_new, 48 - stored);
    assert_eq!(restore(&repo, &retry).unwrap(), data);
}

#[test]
fn prune_refuses_pack_indexes_of_a_newer_format() {
    let (backend, repo) = packed_repo();
    backup(&repo, "vm", &disk_data(4, 11));
    let mut payload = 2u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&0u32.to_le_bytes());
    let key = format!("{PACK_INDEXES_PREFIX}{}", "ab".repeat(32));
    repo.put_sealed(vbackup_core::format::ObjectKind::PackIndex, &key, &payload)
        .unwrap();
    let options = PruneOptions {
        threads: 2,
        ..PruneOptions::default()
    };
    let error = prune(&repo, &options, &Progress::new()).unwrap_err();
    assert!(matches!(error, Error::Refused(_)), "{error}");
    assert!(error.to_string().contains("upgrade vbackup"), "{error}");
    assert!(backend.stat(&key).unwrap().is_some(), "nothing was deleted");
    assert!(keys(&backend, "locks/").is_empty());
}

#[test]
fn a_reader_whose_pack_was_repacked_meanwhile_finds_the_chunks_again() {
    let (backend, repo) = packed_repo();
    let data = disk_data(32, 12);
    let old = backup(&repo, "vm", &data);
    let newer = changed(&data, 0..20, 120);
    let kept = backup(&repo, "vm", &newer);
    // A restore that loaded the chunk map before a prune repacked.
    let stale_map = repo.chunk_map().unwrap();
    forget_snapshot(&backend, &old);
    let report = prune_now(&repo);
    assert!(
        report.repacked_packs + report.deleted_packs > 0,
        "{report:?}"
    );
    let index = repo.read_index(&kept.manifest.disks[0].index).unwrap();
    let wanted = index.data().iter().map(|(i, id)| (*i as usize, *id));
    let (units, missing) = vbackup_core::packs::plan_reads(&stale_map, wanted, u64::from(PACK));
    assert!(missing.is_empty());
    let mut restored = vec![0u8; newer.len()];
    for unit in &units {
        vbackup_core::packs::read_unit(&repo, &stale_map, unit, &mut |i, _, read| {
            let start = i * CHUNK as usize;
            restored[start..start + CHUNK as usize].copy_from_slice(&read?);
            Ok(())
        })
        .unwrap();
    }
    assert_eq!(restored, newer);
}
