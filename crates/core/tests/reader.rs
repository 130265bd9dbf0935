//! Issue 13: the snapshot disk reader (random access through the chunk
//! cache, read-ahead, holes from the index) and the overlay of a writable
//! export (writes never reach the repository; committing them makes a
//! snapshot that restores to what was written).

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{disk_data, new_repo_with, restore, MemDisk, CHUNK};
use proptest::prelude::*;
use vbackup_core::overlay::{Overlay, OverlayOrigin};
use vbackup_core::reader::{chunk_locations, ChunkCache, ReaderOptions, SnapshotDiskReader};
use vbackup_core::{Progress, Repository, Snapshot};
use vbackup_storage::{Backend, MemoryBackend};

/// A disk of 10 chunks: data in chunks 0-2, 5 and 9 (9 ends short), holes
/// elsewhere.
fn sample() -> Vec<u8> {
    let mut data = disk_data(10, 7);
    for hole in [3usize, 4, 6, 7, 8] {
        data[hole * CHUNK as usize..(hole + 1) * CHUNK as usize].fill(0);
    }
    data.truncate(9 * CHUNK as usize + 1000);
    data
}

fn backed_up(pack: Option<u32>) -> (Arc<MemoryBackend>, Arc<Repository>, Snapshot, Vec<u8>) {
    let (backend, repo) = new_repo_with(pack);
    let data = sample();
    let snapshot = common::backup_disk(&repo, "vm", MemDisk::with_holes(data.clone())).unwrap();
    (backend, Arc::new(repo), snapshot, data)
}

fn reader(
    repo: &Arc<Repository>,
    snapshot: &Snapshot,
    options: ReaderOptions,
) -> SnapshotDiskReader {
    let map = chunk_locations(repo).unwrap();
    let cache = ChunkCache::new(4 * u64::from(CHUNK));
    SnapshotDiskReader::open(
        Arc::clone(repo),
        map,
        &snapshot.manifest.disks[0],
        cache,
        options,
    )
    .unwrap()
}

/// Every object of the backend with its bytes.
fn objects(backend: &MemoryBackend) -> Vec<(String, Vec<u8>)> {
    let mut keys: Vec<String> = backend
        .list("")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    keys.sort();
    keys.into_iter()
        .map(|k| {
            let bytes = backend.get(&k).unwrap();
            (k, bytes)
        })
        .collect()
}

#[test]
fn reads_anywhere_equal_the_backed_up_disk_in_loose_and_packed_repositories() {
    for pack in [None, Some(1 << 20)] {
        let (_, repo, snapshot, data) = backed_up(pack);
        let reader = reader(&repo, &snapshot, ReaderOptions::default());
        assert_eq!(reader.size(), data.len() as u64);
        let mut whole = vec![0xffu8; data.len()];
        reader.read_at(0, &mut whole).unwrap();
        assert!(whole == data, "the whole disk, read at once");
        for (offset, length) in [
            (0, 1),
            (CHUNK as u64 - 3, 10),
            (5 * CHUNK as u64 + 17, 3 * CHUNK as usize),
            (data.len() as u64 - 1, 1),
        ] {
            let mut buf = vec![0xffu8; length];
            reader.read_at(offset, &mut buf).unwrap();
            assert!(
                buf[..] == data[offset as usize..offset as usize + length],
                "{length} bytes at {offset}"
            );
        }
        let past = reader
            .read_at(data.len() as u64 - 1, &mut [0u8; 2])
            .unwrap_err();
        assert!(past.to_string().contains("past the end"), "{past}");
    }
}

#[test]
fn regions_come_from_the_index_holes_as_holes() {
    let (_, repo, snapshot, data) = backed_up(None);
    let reader = reader(&repo, &snapshot, ReaderOptions::default());
    let c = u64::from(CHUNK);
    let regions: Vec<(u64, u64, bool)> = reader
        .regions(0, u64::MAX, 100)
        .iter()
        .map(|r| (r.offset, r.length, r.data))
        .collect();
    let end = data.len() as u64;
    assert_eq!(
        regions,
        vec![
            (0, 3 * c, true),
            (3 * c, 2 * c, false),
            (5 * c, c, true),
            (6 * c, 3 * c, false),
            (9 * c, end - 9 * c, true)
        ]
    );
    let limited = reader.regions(c, 6 * c, 2);
    assert_eq!(limited.len(), 2);
    assert_eq!(
        (limited[0].offset, limited[0].length, limited[0].data),
        (c, 2 * c, true)
    );
    assert_eq!(
        reader.cache().stats().misses,
        0,
        "no chunk was read to answer"
    );
}

#[test]
fn sequential_reads_find_read_ahead_chunks_in_the_cache() {
    let (_, repo, snapshot, _) = backed_up(None);
    let options = ReaderOptions {
        readahead: 2,
        prefetch_threads: 1,
    };
    let reader = reader(&repo, &snapshot, options);
    let mut buf = vec![0u8; 4096];
    reader.read_at(0, &mut buf).unwrap();
    reader.read_at(4096, &mut buf).unwrap(); // continues: chunks 1 and 2 are queued
                                             // Wait for the prefetch thread (bounded: it has two chunks to fetch).
    for _ in 0..500 {
        if reader.cache().stats().chunks >= 3 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let before = reader.cache().stats();
    assert_eq!(before.chunks, 3, "chunks 0, 1 and 2 are held");
    reader.read_at(u64::from(CHUNK), &mut buf).unwrap();
    reader.read_at(2 * u64::from(CHUNK), &mut buf).unwrap();
    let after = reader.cache().stats();
    assert_eq!(
        after.misses, before.misses,
        "chunks 1 and 2 came from the cache"
    );
}

#[test]
fn a_damaged_chunk_is_an_error_naming_it_never_data() {
    let (backend, repo, snapshot, _) = backed_up(None);
    let chunk = backend
        .list("chunks/")
        .unwrap()
        .into_iter()
        .next()
        .unwrap()
        .key;
    let mut bytes = backend.get(&chunk).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    backend.corrupt(&chunk, bytes);
    let reader = reader(
        &repo,
        &snapshot,
        ReaderOptions {
            readahead: 0,
            prefetch_threads: 0,
        },
    );
    let mut buf = vec![0u8; reader.size() as usize];
    let err = reader.read_at(0, &mut buf).unwrap_err();
    assert_eq!(err.class(), vbackup_core::ErrorClass::Integrity, "{err}");
    assert!(err.to_string().contains("chunks/"), "{err}");
}

fn origin(repo: &Repository, snapshot: &Snapshot) -> OverlayOrigin {
    OverlayOrigin {
        repository: repo.config().id.clone(),
        snapshot: snapshot.id.clone(),
        disk: "vda".into(),
        created: "2026-12-02T00:00:00Z".into(),
    }
}

#[test]
fn overlay_writes_stay_local_survive_a_reopen_and_commit_to_a_snapshot() {
    let (backend, repo, snapshot, data) = backed_up(Some(1 << 20));
    let before = objects(&backend);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vda.overlay");
    let base = Arc::new(reader(&repo, &snapshot, ReaderOptions::default()));
    let mut expected = data.clone();
    let writes: [(u64, Vec<u8>); 4] = [
        (10, vec![0xaa; 100]),                        // inside one block
        (u64::from(CHUNK) - 5, vec![0xbb; 9000]),     // across a chunk boundary
        (4 * u64::from(CHUNK) + 4096, vec![0; 8192]), // zeros into a hole
        (9 * u64::from(CHUNK) + 990, vec![0xcc; 10]), // the disk's last bytes
    ];
    {
        let overlay =
            Overlay::open_or_create(&path, Arc::clone(&base), origin(&repo, &snapshot)).unwrap();
        for (at, bytes) in &writes {
            overlay.write_at(*at, bytes).unwrap();
            expected[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
        }
        overlay.write_zeroes(2 * u64::from(CHUNK), 3).unwrap();
        expected[2 * CHUNK as usize..2 * CHUNK as usize + 3].fill(0);
        let mut seen = vec![0u8; data.len()];
        overlay.read_at(0, &mut seen).unwrap();
        assert!(seen == expected, "reads see the writes over the snapshot");
        overlay.flush().unwrap();
        let err = overlay.write_at(data.len() as u64, &[1]).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
    }
    assert!(
        objects(&backend) == before,
        "the repository is byte for byte unchanged"
    );

    let overlay = Arc::new(
        Overlay::open_or_create(&path, Arc::clone(&base), origin(&repo, &snapshot)).unwrap(),
    );
    let mut seen = vec![0u8; data.len()];
    overlay.read_at(0, &mut seen).unwrap();
    assert!(seen == expected, "the writes survive closing and reopening");
    assert!(!overlay.written().is_empty());

    let committed = vbackup_core::overlay::commit(
        &repo,
        &snapshot,
        &[Arc::clone(&overlay)],
        2,
        &Progress::new(),
    )
    .unwrap();
    assert_ne!(committed.id, snapshot.id);
    assert!(committed.manifest.tags.iter().any(|t| t == "overlay"));
    assert!(
        restore(&repo, &committed).unwrap() == expected,
        "the committed snapshot restores to what was written"
    );
    assert!(
        restore(&repo, &snapshot).unwrap() == data,
        "the served snapshot is as it was"
    );
    let read = committed.manifest.stats.bytes_read;
    assert!(
        read <= 4 * u64::from(CHUNK),
        "only the changed chunks were read ({read} bytes)"
    );
    let report = common::check_all(&repo);
    assert!(report.is_clean(), "{:?}", report.problems);
}

#[test]
fn an_overlay_of_another_snapshot_or_disk_is_refused() {
    let (_, repo, snapshot, _) = backed_up(None);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o");
    let base = Arc::new(reader(&repo, &snapshot, ReaderOptions::default()));
    Overlay::open_or_create(&path, Arc::clone(&base), origin(&repo, &snapshot)).unwrap();
    let mut other = origin(&repo, &snapshot);
    other.snapshot = "f".repeat(64);
    let err = Overlay::open_or_create(&path, Arc::clone(&base), other).unwrap_err();
    assert!(err.to_string().contains("belongs to"), "{err}");
    std::fs::write(&path, b"not an overlay").unwrap();
    let err = Overlay::open_or_create(&path, base, origin(&repo, &snapshot)).unwrap_err();
    assert_eq!(err.class(), vbackup_core::ErrorClass::Integrity, "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Any sequence of writes through the overlay reads back like the same
    /// writes applied to a plain copy of the disk.
    #[test]
    fn overlay_reads_match_a_plain_copy(writes in proptest::collection::vec((0u64..(9 * CHUNK as u64 + 1000), 1usize..20_000, any::<u8>()), 1..12)) {
        let (_, repo, snapshot, data) = backed_up(None);
        let dir = tempfile::tempdir().unwrap();
        let base = Arc::new(reader(&repo, &snapshot, ReaderOptions::default()));
        let overlay = Overlay::open_or_create(&dir.path().join("o"), base, origin(&repo, &snapshot)).unwrap();
        let mut expected = data.clone();
        for (at, len, byte) in writes {
            let len = len.min(expected.len() - at as usize);
            overlay.write_at(at, &vec![byte; len]).unwrap();
            expected[at as usize..at as usize + len].fill(byte);
        }
        let mut seen = vec![0u8; data.len()];
        overlay.read_at(0, &mut seen).unwrap();
        prop_assert!(seen == expected);
    }
}
