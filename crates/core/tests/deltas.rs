//! Issue 12, scattered small writes: a changed chunk of which the dirty
//! bitmap says only small parts changed is stored as a delta on the base
//! snapshot's full chunk. Over in-memory disks that track changes by byte
//! range: what is read and stored, that every snapshot restores on its
//! own, that a delta on a delta keeps the depth at 1, that a large change
//! falls back to a full chunk, and that check and prune keep the bases.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{check_all, disk_data, new_repo_with, MemDisk, MemTarget, CHUNK};
use vbackup_core::format::DELTA_INDEX_VERSION;
use vbackup_core::{
    BackupDisk, BackupOptions, BaseIndex, DiskReader, DiskSource, Extent, ForgetOptions, Progress,
    PruneOptions, Repository, Snapshot,
};

/// A disk that reports `dirty` byte ranges as changed and counts the
/// bytes read.
#[derive(Clone)]
struct Tracked {
    disk: MemDisk,
    dirty: Arc<Vec<(u64, u64)>>,
    read: Arc<AtomicU64>,
}

impl DiskSource for Tracked {
    fn virtual_size(&self) -> u64 {
        self.disk.virtual_size()
    }
    fn format(&self) -> &str {
        "qcow2"
    }
    fn open_reader(&self) -> io::Result<Box<dyn DiskReader>> {
        Ok(Box::new(self.clone()))
    }
}

impl DiskReader for Tracked {
    fn extents(&mut self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        self.disk.extents(offset, length)
    }
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.disk.read_exact_at(buf, offset)
    }
    fn changed(&mut self, offset: u64, length: u64) -> io::Result<Option<bool>> {
        let end = offset + length;
        Ok(Some(
            self.dirty.iter().any(|(s, e)| *s < end && *e > offset),
        ))
    }
    fn changed_ranges(
        &mut self,
        offset: u64,
        length: u64,
        _granule: u64,
    ) -> io::Result<Option<Vec<(u64, u64)>>> {
        let end = offset + length;
        let inside = self.dirty.iter().filter(|(s, e)| *s < end && *e > offset);
        Ok(Some(
            inside
                .map(|(s, e)| ((*s).max(offset), (*e).min(end)))
                .collect(),
        ))
    }
}

const CHUNKS: usize = 16;

/// Backs up `data` (a full backup without `base`), reporting `dirty`.
fn backup(
    repo: &Repository,
    data: &[u8],
    dirty: Vec<(u64, u64)>,
    base: Option<&Snapshot>,
) -> (Snapshot, u64) {
    let read = Arc::new(AtomicU64::new(0));
    let source = Tracked {
        disk: MemDisk::new(data.to_vec()),
        dirty: Arc::new(dirty),
        read: read.clone(),
    };
    let base = base.map(|b| BaseIndex {
        snapshot: b.id.clone(),
        index: repo.read_index(&b.manifest.disks[0].index).unwrap(),
    });
    let disks = [BackupDisk {
        name: "vda".into(),
        source_label: "mem".into(),
        source: Box::new(source),
        base,
    }];
    let options = BackupOptions {
        vm: "vm".into(),
        tags: vec![],
        host: Some("h".into()),
        threads: 2,
        skip_unchanged: false,
    };
    let snapshot = vbackup_core::backup(repo, &disks, &options, &Progress::new()).unwrap();
    (snapshot, read.load(Ordering::Relaxed))
}

fn restore(repo: &Repository, snapshot: &Snapshot) -> Vec<u8> {
    let record = &snapshot.manifest.disks[0];
    let target = MemTarget::new(record.virtual_size as usize);
    vbackup_core::restore_disk(repo, record, &target, 2, &Progress::new()).unwrap();
    target.contents()
}

fn stream(repo: &Repository, snapshot: &Snapshot) -> Vec<u8> {
    let mut out = Vec::new();
    let record = &snapshot.manifest.disks[0];
    vbackup_core::restore_disk_to_writer(repo, record, &mut out, 2, &Progress::new()).unwrap();
    out
}

/// Writes `len` bytes of `fill` at each offset of `at` into `data`; the
/// written ranges.
fn write(data: &mut [u8], at: &[u64], len: u64, fill: u8) -> Vec<(u64, u64)> {
    for a in at {
        data[*a as usize..(*a + len) as usize].fill(fill);
    }
    at.iter().map(|a| (*a, a + len)).collect()
}

fn small_writes_are_stored_as_deltas_of_depth_1(pack_size: Option<u32>) {
    let (_, repo) = new_repo_with(pack_size);
    let chunk = u64::from(CHUNK);
    let mut data = disk_data(CHUNKS, 3);
    let (full, _) = backup(&repo, &data, vec![], None);
    let original = data.clone();

    // 4 KiB in chunks 1 and 5, 8 KiB in chunk 9.
    let mut dirty = write(&mut data, &[chunk + 4096, 5 * chunk], 4096, 0xa1);
    dirty.extend(write(&mut data, &[9 * chunk + 100], 8192, 0xa2));
    let (first, read) = backup(&repo, &data, dirty, Some(&full));
    assert_eq!(read, 4 * 4096, "only the changed bytes are read");
    let index = repo.read_index(&first.manifest.disks[0].index).unwrap();
    assert_eq!(index.version(), DELTA_INDEX_VERSION);
    let full_index = repo.read_index(&full.manifest.disks[0].index).unwrap();
    let bases: Vec<(u64, _)> = [1, 5, 9].map(|c| (c, full_index.get(c).unwrap())).to_vec();
    assert_eq!(index.deltas(), &bases[..]);
    assert!(first.manifest.stats.bytes_stored < 4 * 4096 + 3 * 1024);
    let after_first = data.clone();

    // Chunk 1 again elsewhere (the delta is merged, on the same base),
    // chunk 3 anew, and chunk 5 over more than a quarter: a full chunk.
    let mut dirty = write(&mut data, &[chunk + 20_000, 3 * chunk], 4096, 0xb1);
    dirty.extend(write(&mut data, &[5 * chunk], chunk / 2, 0xb2));
    let (second, read) = backup(&repo, &data, dirty, Some(&first));
    assert_eq!(read, 2 * 4096 + chunk, "chunk 1 reads only its new range");
    let index = repo.read_index(&second.manifest.disks[0].index).unwrap();
    let expected: Vec<(u64, _)> = [1, 3, 9].map(|c| (c, full_index.get(c).unwrap())).to_vec();
    assert_eq!(
        index.deltas(),
        &expected[..],
        "depth 1: always the full base"
    );

    for (snapshot, wanted) in [(&full, &original), (&first, &after_first), (&second, &data)] {
        assert_eq!(&restore(&repo, snapshot), wanted);
        assert_eq!(&stream(&repo, snapshot), wanted);
    }
    assert!(check_all(&repo).is_clean());

    // Without the full snapshot the deltas' bases stay: prune keeps them.
    let forget = ForgetOptions {
        ids: vec![full.id.clone(), first.id.clone()],
        ..ForgetOptions::default()
    };
    vbackup_core::forget(&repo, &forget).unwrap();
    let prune = PruneOptions {
        grace: Duration::ZERO,
        threads: 2,
        ..PruneOptions::default()
    };
    for _ in 0..2 {
        vbackup_core::prune(&repo, &prune, &Progress::new()).unwrap();
    }
    assert_eq!(restore(&repo, &second), data);
    assert!(check_all(&repo).is_clean());
}

#[test]
fn small_writes_are_stored_as_deltas_of_depth_1_loose() {
    small_writes_are_stored_as_deltas_of_depth_1(None);
}

#[test]
fn small_writes_are_stored_as_deltas_of_depth_1_in_packs() {
    small_writes_are_stored_as_deltas_of_depth_1(Some(1 << 20));
}

#[test]
fn a_damaged_base_is_reported_for_the_snapshots_of_its_deltas() {
    let (backend, repo) = new_repo_with(None);
    let chunk = u64::from(CHUNK);
    let mut data = disk_data(CHUNKS, 4);
    let (full, _) = backup(&repo, &data, vec![], None);
    let dirty = write(&mut data, &[2 * chunk + 512], 1024, 0xc1);
    let (incremental, _) = backup(&repo, &data, dirty, Some(&full));
    let index = repo
        .read_index(&incremental.manifest.disks[0].index)
        .unwrap();
    let (_, base) = index.deltas()[0];
    use vbackup_storage::Backend;
    let key = Repository::chunk_key(&base);
    let mut bytes = backend.get(&key).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    backend.put(&key, &bytes).unwrap();
    let report = check_all(&repo);
    let mut affected: Vec<&str> = report
        .affected
        .iter()
        .map(|a| a.snapshot.as_str())
        .collect();
    affected.sort_unstable();
    let mut expected = vec![full.id.as_str(), incremental.id.as_str()];
    expected.sort_unstable();
    assert_eq!(affected, expected, "{:?}", report.affected);
    let record = &incremental.manifest.disks[0];
    let target = MemTarget::new(record.virtual_size as usize);
    let err = vbackup_core::restore_disk(&repo, record, &target, 2, &Progress::new()).unwrap_err();
    assert!(err.to_string().contains(&key), "{err}");
}
