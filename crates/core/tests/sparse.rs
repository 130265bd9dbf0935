//! Issue 12: sparse disks cost in proportion to their data, not their
//! virtual size. In-memory disks of 1 TiB and more (a few regions of
//! data, the rest holes) count the queries the engine makes; restores go
//! to a target that records what is written.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{new_repo, CHUNK};
use vbackup_core::format::DiskIndex;
use vbackup_core::{
    BackupDisk, BackupOptions, DiskReader, DiskSource, DiskTarget, DiskWriter, Extent, ExtentKind,
    Progress, Repository, Snapshot,
};

const TIB: u64 = 1 << 40;

/// Queries a backup made of its source.
#[derive(Default)]
struct Calls {
    /// `extents` and `extents_from` calls.
    extents: AtomicU64,
    /// `changed` and `changed_ranges` calls.
    changes: AtomicU64,
    /// Bytes read.
    read: AtomicU64,
}

/// A disk of `size` bytes holding `regions` (offset → bytes), zeros
/// elsewhere; with `dirty`, it tracks changes and reports those ranges.
#[derive(Clone)]
struct SparseDisk {
    size: u64,
    regions: Arc<BTreeMap<u64, Vec<u8>>>,
    dirty: Option<Arc<Vec<(u64, u64)>>>,
    calls: Arc<Calls>,
}

impl SparseDisk {
    fn new(size: u64, regions: BTreeMap<u64, Vec<u8>>) -> Self {
        Self {
            size,
            regions: Arc::new(regions),
            dirty: None,
            calls: Arc::default(),
        }
    }

    /// The disk's bytes at `offset`.
    fn bytes(&self, offset: u64, length: usize) -> Vec<u8> {
        let mut out = vec![0u8; length];
        let end = offset + length as u64;
        for (start, data) in self.regions.range(..end) {
            let stop = start + data.len() as u64;
            if stop <= offset {
                continue;
            }
            let (from, to) = ((*start).max(offset), stop.min(end));
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
        }
        out
    }
}

impl DiskSource for SparseDisk {
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn format(&self) -> &str {
        "qcow2"
    }
    fn open_reader(&self) -> io::Result<Box<dyn DiskReader>> {
        Ok(Box::new(self.clone()))
    }
}

impl DiskReader for SparseDisk {
    fn extents(&mut self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        self.calls.extents.fetch_add(1, Ordering::Relaxed);
        let end = offset + length;
        let mut out = Vec::new();
        let mut pos = offset;
        let mut push = |from: u64, to: u64, kind| {
            if to > from {
                out.push(Extent {
                    offset: from,
                    length: to - from,
                    kind,
                });
            }
        };
        for (start, data) in self.regions.range(..end) {
            let stop = (start + data.len() as u64).min(end);
            if stop <= pos {
                continue;
            }
            let start = (*start).max(pos);
            push(pos, start, ExtentKind::Zero);
            push(start, stop, ExtentKind::Data);
            pos = stop;
        }
        push(pos, end, ExtentKind::Zero);
        Ok(out)
    }
    fn extents_from(&mut self, offset: u64, length: u64, _max: usize) -> io::Result<Vec<Extent>> {
        self.extents(offset, length)
    }
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.calls
            .read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        buf.copy_from_slice(&self.bytes(offset, buf.len()));
        Ok(())
    }
    fn changed(&mut self, offset: u64, length: u64) -> io::Result<Option<bool>> {
        let ranges = self.changed_ranges(offset, length, 1)?;
        Ok(ranges.map(|r| !r.is_empty()))
    }
    fn changed_ranges(
        &mut self,
        offset: u64,
        length: u64,
        _granule: u64,
    ) -> io::Result<Option<Vec<(u64, u64)>>> {
        let Some(dirty) = &self.dirty else {
            return Ok(None);
        };
        self.calls.changes.fetch_add(1, Ordering::Relaxed);
        let end = offset + length;
        Ok(Some(
            dirty
                .iter()
                .filter(|(s, e)| *e > offset && *s < end)
                .map(|(s, e)| ((*s).max(offset), (*e).min(end)))
                .collect(),
        ))
    }
}

/// A target that keeps what is written (offset → bytes) and the zeroed
/// ranges.
#[derive(Clone, Default)]
struct RecordingTarget {
    writes: Arc<Mutex<BTreeMap<u64, Vec<u8>>>>,
    zeroed: Arc<Mutex<Vec<(u64, u64)>>>,
    needs_zeroing: bool,
}

impl DiskTarget for RecordingTarget {
    fn open_writer(&self) -> io::Result<Box<dyn DiskWriter>> {
        Ok(Box::new(self.clone()))
    }
    fn finish(&self) -> io::Result<()> {
        Ok(())
    }
    fn holes_need_zeroing(&self) -> bool {
        self.needs_zeroing
    }
}

impl DiskWriter for RecordingTarget {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writes.lock().unwrap().insert(offset, buf.to_vec());
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, length: u64) -> io::Result<()> {
        self.zeroed.lock().unwrap().push((offset, length));
        Ok(())
    }
}

/// Data in `places` places of the disk, each `len` bytes of a pattern
/// with a 4 KiB zero block in its middle; none aligned to a chunk.
fn scattered(size: u64, places: u64, len: usize) -> BTreeMap<u64, Vec<u8>> {
    (0..places)
        .map(|k| {
            let mut data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 1).collect();
            let mid = len / 2 / 4096 * 4096;
            data[mid..mid + 4096].fill(0);
            (k * (size / places) + 12_288, data)
        })
        .collect()
}

fn backup(
    repo: &Repository,
    source: SparseDisk,
    base: Option<vbackup_core::BaseIndex>,
) -> Snapshot {
    let disks = [BackupDisk {
        name: "vda".into(),
        source_label: "mem".into(),
        source: Box::new(source),
        base,
    }];
    let options = BackupOptions {
        vm: "vm".into(),
        tags: vec![],
        host: None,
        threads: 2,
        skip_unchanged: false,
    };
    vbackup_core::backup(repo, &disks, &options, &Progress::new()).unwrap()
}

/// The recorded writes equal the disk's data regions, byte for byte,
/// with the zero blocks inside chunks left out.
fn assert_restores(target: &RecordingTarget, disk: &SparseDisk) {
    let writes = target.writes.lock().unwrap();
    let written: u64 = writes.values().map(|w| w.len() as u64).sum();
    let data: u64 = disk.regions.values().map(|d| d.len() as u64 - 4096).sum();
    for (offset, bytes) in writes.iter() {
        assert!(*bytes == disk.bytes(*offset, bytes.len()), "at {offset}");
    }
    // Written in 4 KiB blocks: at most one partial block at each end of a
    // region is rounded up.
    assert!(written >= data, "{written} < {data}");
    assert!(
        written <= data + disk.regions.len() as u64 * 2 * 4096,
        "{written} bytes written for {data} bytes of data"
    );
    for (offset, data) in disk.regions.iter() {
        let mid = offset + (data.len() / 2 / 4096 * 4096) as u64;
        let covered = writes
            .range(..=mid)
            .next_back()
            .is_some_and(|(o, w)| mid < o + w.len() as u64);
        assert!(!covered, "the zero block at {mid} is left a hole");
    }
}

#[test]
fn issue12_a_sparse_tib_disk_backs_up_and_restores_in_proportion_to_its_data() {
    let (_, repo) = new_repo();
    let disk = SparseDisk::new(TIB, scattered(TIB, 64, 100_000));
    let snapshot = backup(&repo, disk.clone(), None);
    let chunks = TIB / u64::from(CHUNK);
    let stats = &snapshot.manifest.stats;
    // 64 regions of 100,000 bytes at 12 KiB into a 64 KiB chunk: 2 chunks each.
    assert_eq!(snapshot.manifest.disks[0].data_chunks, 128);
    assert_eq!(stats.chunks_hole, chunks - 128);
    assert_eq!(disk.calls.read.load(Ordering::Relaxed), 64 * 100_000);
    let queries = disk.calls.extents.load(Ordering::Relaxed);
    // One query per 64 GiB window, none per chunk (16 Mi chunks here).
    assert!(queries <= 16, "{queries} extent queries");

    let key = &snapshot.manifest.disks[0].index;
    let stored = repo.backend().get(key).unwrap();
    assert!(stored.len() < 16 << 10, "index of {} bytes", stored.len());
    let index = repo.read_index(key).unwrap();
    assert_eq!(index.version(), vbackup_core::format::INDEX_VERSION);
    assert_eq!(
        index.hole_runs().count(),
        64,
        "the first region is in chunk 0"
    );

    let target = RecordingTarget::default();
    let restored = vbackup_core::restore_disk(
        &repo,
        &snapshot.manifest.disks[0],
        &target,
        2,
        &Progress::new(),
    )
    .unwrap();
    assert_eq!(restored.chunks_read, 128);
    assert_restores(&target, &disk);
    assert!(target.zeroed.lock().unwrap().is_empty());
}

#[test]
fn issue12_a_16_tib_incremental_asks_for_changes_per_window_not_per_chunk() {
    let (_, repo) = new_repo();
    let size = 16 * TIB;
    let disk = SparseDisk::new(size, scattered(size, 16, 70_000));
    let full = backup(&repo, disk.clone(), None);
    let base_index = repo.read_index(&full.manifest.disks[0].index).unwrap();
    assert_eq!(base_index.data_chunks(), 32);

    // Two regions rewritten (one moved by a chunk), one new.
    let mut regions = (*disk.regions).clone();
    let first = *regions.keys().next().unwrap();
    regions.get_mut(&first).unwrap()[10] = 0xee;
    let moved = *regions.keys().nth(5).unwrap();
    let data = regions.remove(&moved).unwrap();
    regions.insert(moved + u64::from(CHUNK), data);
    regions.insert(size - 5000, vec![9u8; 5000]);
    let dirty = vec![
        (first, first + 11),
        (moved, moved + 2 * u64::from(CHUNK) + 70_000),
        (size - 5000, size),
    ];
    let changed = SparseDisk {
        dirty: Some(Arc::new(dirty)),
        ..SparseDisk::new(size, regions)
    };
    let base = vbackup_core::BaseIndex {
        snapshot: full.id.clone(),
        index: base_index,
    };
    let incremental = backup(&repo, changed.clone(), Some(base));
    let record = &incremental.manifest.disks[0];
    assert_eq!(record.read, vbackup_core::format::ReadScope::Changed);
    let windows = size / (16 << 30);
    let changes = changed.calls.changes.load(Ordering::Relaxed);
    assert_eq!(changes, windows, "one bitmap query per 16 GiB window");
    let extents = changed.calls.extents.load(Ordering::Relaxed);
    // The chunk with 11 changed bytes is stored as a delta: its worker
    // reads those bytes and maps nothing.
    assert_eq!(extents, 4 + 1, "only changed chunks are mapped");
    assert_eq!(record.data_chunks, 33);
    let stats = &incremental.manifest.stats;
    let chunks = size / u64::from(CHUNK);
    assert_eq!(stats.chunks_unchanged, chunks - 1 - 4 - 1);

    let target = RecordingTarget::default();
    vbackup_core::restore_disk(&repo, record, &target, 2, &Progress::new()).unwrap();
    let writes = target.writes.lock().unwrap();
    for (offset, bytes) in writes.iter() {
        assert!(*bytes == changed.bytes(*offset, bytes.len()), "at {offset}");
    }
    let at = |o: u64| {
        writes
            .range(..=o)
            .next_back()
            .is_some_and(|(s, w)| o < s + w.len() as u64)
    };
    assert!(at(moved + u64::from(CHUNK) + 12_288) && !at(moved + 12_288));
    assert!(at(size - 1));
}

#[test]
fn issue12_targets_that_hold_old_data_get_their_holes_zeroed_in_runs() {
    let (_, repo) = new_repo();
    let size = TIB;
    let disk = SparseDisk::new(size, scattered(size, 4, 10_000));
    let snapshot = backup(&repo, disk.clone(), None);
    let target = RecordingTarget {
        needs_zeroing: true,
        ..RecordingTarget::default()
    };
    vbackup_core::restore_disk(
        &repo,
        &snapshot.manifest.disks[0],
        &target,
        2,
        &Progress::new(),
    )
    .unwrap();
    let zeroed = target.zeroed.lock().unwrap().clone();
    let writes = target.writes.lock().unwrap();
    let written: u64 = writes.values().map(|w| w.len() as u64).sum();
    assert_eq!(
        written,
        4 * u64::from(CHUNK),
        "whole chunks, zeros included"
    );
    let zeroed_bytes: u64 = zeroed.iter().map(|(_, n)| n).sum();
    assert_eq!(zeroed_bytes + written, size, "every hole is zeroed");
    let pieces = size / u64::from(CHUNK) / 256 + 5;
    assert!(
        zeroed.len() as u64 <= pieces,
        "{} zeroing requests",
        zeroed.len()
    );
}

#[test]
fn issue12_version_1_indexes_of_old_repositories_still_restore_and_are_reused_by_name() {
    let (_, repo) = new_repo();
    let disk = SparseDisk::new(
        64 * u64::from(CHUNK),
        scattered(64 * u64::from(CHUNK), 3, 5000),
    );
    let snapshot = backup(&repo, disk.clone(), None);
    let record = &snapshot.manifest.disks[0];
    let index = repo.read_index(&record.index).unwrap();
    // What a repository written before index version 2 holds.
    let old = index.clone().in_version(1).unwrap();
    let old_key = repo.write_index(&old).unwrap();
    assert_ne!(old_key, record.index);
    let read = repo.read_index(&old_key).unwrap();
    assert_eq!(read.version(), 1);
    assert_eq!(read.data(), index.data());
    let mut old_record = record.clone();
    old_record.index = old_key.clone();
    let target = RecordingTarget::default();
    vbackup_core::restore_disk(&repo, &old_record, &target, 2, &Progress::new()).unwrap();
    assert_restores(&target, &disk);
    // Rewritten as it was read: the same object name.
    assert_eq!(repo.write_index(&read).unwrap(), old_key);
    assert_eq!(
        DiskIndex::decode(&old_key, &read.encode())
            .unwrap()
            .version(),
        1
    );
}

#[test]
fn issue12_an_index_of_a_newer_version_is_a_notice_for_check_not_damage_to_repair() {
    let (_, repo) = new_repo();
    let disk = SparseDisk::new(
        8 * u64::from(CHUNK),
        scattered(8 * u64::from(CHUNK), 2, 5000),
    );
    let snapshot = backup(&repo, disk, None);
    let key = &snapshot.manifest.disks[0].index;
    let mut payload = repo.read_index(key).unwrap().encode();
    payload[0] = 4;
    repo.put_sealed(vbackup_core::format::ObjectKind::Index, key, &payload)
        .unwrap();
    let options = vbackup_core::CheckOptions {
        read_data: vbackup_core::ReadData::None,
        threads: 1,
        stale_after: None,
    };
    let report = vbackup_core::check(&repo, &options, &Progress::new()).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(report.affected.is_empty());
    assert!(
        report
            .notices
            .iter()
            .any(|n| &n.object == key && n.note.contains("not checked")),
        "{:?}",
        report.notices
    );
}

/// An unencrypted repository (its config has no MAC, so a test can turn
/// it into an older format version) of `version`, opened again.
fn repository_of_version(version: u32, pack_size: Option<u32>) -> Repository {
    use vbackup_core::crypto::CipherKind;
    use vbackup_core::format::{plain_json_object, Config, ObjectKind};
    use vbackup_storage::Backend as _;
    let backend = Arc::new(vbackup_storage::MemoryBackend::new());
    let options = vbackup_core::InitOptions {
        chunk_size: CHUNK,
        cipher: CipherKind::None,
        pack_size,
        ..vbackup_core::InitOptions::default()
    };
    Repository::init(backend.clone(), None, &options).unwrap();
    let mut config: Config = serde_json::from_slice(&backend.get("config").unwrap()[8..]).unwrap();
    assert_eq!(config.version, vbackup_core::format::REPOSITORY_VERSION);
    config.version = version;
    backend.corrupt(
        "config",
        plain_json_object(ObjectKind::Config, &config).unwrap(),
    );
    let open = vbackup_core::OpenOptions {
        allow_unencrypted: true,
        ..vbackup_core::OpenOptions::default()
    };
    Repository::open_with(backend, &open, || Ok(None)).unwrap()
}

#[test]
fn issue12_repositories_older_builds_share_get_version_1_indexes_and_new_ones_version_2() {
    let disk = SparseDisk::new(
        64 * u64::from(CHUNK),
        scattered(64 * u64::from(CHUNK), 3, 5000),
    );
    for (version, pack_size, index_version) in [
        (1, Some(0), 1),
        (2, Some(1 << 20), 1),
        (3, Some(0), 2),
        (3, Some(1 << 20), 2),
    ] {
        let repo = repository_of_version(version, pack_size);
        let snapshot = backup(&repo, disk.clone(), None);
        let index = repo.read_index(&snapshot.manifest.disks[0].index).unwrap();
        assert_eq!(
            index.version(),
            index_version,
            "repository version {version}"
        );
        let target = RecordingTarget::default();
        vbackup_core::restore_disk(
            &repo,
            &snapshot.manifest.disks[0],
            &target,
            2,
            &Progress::new(),
        )
        .unwrap();
        assert_restores(&target, &disk);
    }
}
