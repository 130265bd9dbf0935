//! Engine tests over the in-memory backend and in-memory disks: round trips,
//! dedup, damage detection and the errors users see. (Tests against real
//! qemu processes and the local backend live in the cli crate.)

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::io;
use std::sync::Arc;

use vbackup_core::crypto::kdf::KdfParams;
use vbackup_core::crypto::CipherKind;
use vbackup_core::{
    BackupDisk, BackupOptions, DiskReader, DiskSource, Error, Extent, InitOptions, Progress,
    Repository,
};
use vbackup_storage::{Backend, MemoryBackend};
// Disks whose 4 KiB all-zero blocks are holes (`MemDisk::with_holes`).
use vbackup_testkit::memory::{MemDisk, MemTarget};

const CHUNK: u32 = 64 << 10;

fn options(cipher: CipherKind) -> InitOptions {
    InitOptions {
        chunk_size: CHUNK,
        cipher,
        kdf: KdfParams {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        },
        ..InitOptions::default()
    }
}

/// A disk with text-like data, a long hole, a duplicated block and an odd tail.
fn sample_disk(seed: u32) -> Vec<u8> {
    let size = 40 * CHUNK as usize + 1234;
    let mut data = vec![0u8; size];
    for (i, byte) in data.iter_mut().enumerate().take(12 * CHUNK as usize) {
        *byte = (((i as u32).wrapping_mul(2_654_435_761) ^ seed) >> 24) as u8;
    }
    let (a, b) = (2 * CHUNK as usize, 30 * CHUNK as usize);
    let copy = data[a..a + CHUNK as usize].to_vec();
    data[b..b + CHUNK as usize].copy_from_slice(&copy);
    data[size - 100..].fill(7);
    data
}

fn new_repo(cipher: CipherKind) -> (Arc<MemoryBackend>, Repository) {
    let backend = Arc::new(MemoryBackend::new());
    let repo = Repository::init(backend.clone(), Some("pw"), &options(cipher)).unwrap();
    (backend, repo)
}

fn backup(repo: &Repository, disks: &[(&str, &Vec<u8>)]) -> vbackup_core::Snapshot {
    let disks: Vec<BackupDisk> = disks
        .iter()
        .map(|(name, data)| BackupDisk {
            name: name.to_string(),
            source_label: format!("mem:{name}"),
            source: Box::new(MemDisk::with_holes((*data).clone())),
            base: None,
        })
        .collect();
    let options = BackupOptions {
        vm: "vm1".into(),
        tags: vec![],
        host: None,
        threads: 3,
        skip_unchanged: true,
    };
    vbackup_core::backup(repo, &disks, &options, &Progress::new()).unwrap()
}

fn restore(repo: &Repository, snapshot: &vbackup_core::Snapshot, disk: usize) -> Vec<u8> {
    let record = &snapshot.manifest.disks[disk];
    let target = MemTarget::new(record.virtual_size as usize);
    vbackup_core::restore_disk(repo, record, &target, 3, &Progress::new()).unwrap();
    let data = target.contents();
    let mut streamed = Vec::new();
    vbackup_core::restore_disk_to_writer(repo, record, &mut streamed, 2, &Progress::new()).unwrap();
    assert_eq!(streamed, data, "streamed and positional restores agree");
    data
}

#[test]
fn backup_restores_byte_identical_for_every_cipher() {
    for cipher in [
        CipherKind::Aes256Gcm,
        CipherKind::ChaCha20Poly1305,
        CipherKind::None,
    ] {
        let (_, repo) = new_repo(cipher);
        let disk = sample_disk(1);
        let snapshot = backup(&repo, &[("vda", &disk)]);
        assert_eq!(restore(&repo, &snapshot, 0), disk, "{cipher:?}");
        let stats = &snapshot.manifest.stats;
        assert_eq!(
            stats.chunks_hole,
            40 - 12 - 1 + 1 - 1,
            "holes are not stored"
        );
        assert_eq!(
            stats.chunks_reused, 1,
            "the duplicated chunk is stored once"
        );
    }
}

#[test]
fn unchanged_second_backup_stores_nothing_and_clones_share_chunks() {
    let (_, repo) = new_repo(CipherKind::Aes256Gcm);
    let disk = sample_disk(2);
    let first = backup(&repo, &[("vda", &disk)]);
    let second = backup(&repo, &[("vda", &disk), ("clone", &disk)]);
    assert!(first.manifest.stats.chunks_new > 0);
    assert_eq!(second.manifest.stats.chunks_new, 0);
    assert_eq!(second.manifest.stats.bytes_stored, 0);
    assert_eq!(restore(&repo, &second, 1), disk);
    let snapshots = repo.list_snapshots().unwrap();
    assert_eq!(snapshots.len(), 2);
    assert_eq!(
        repo.find_snapshot("latest", Some("vm1")).unwrap().id,
        second.id
    );
    assert_eq!(
        repo.find_snapshot(&first.id[..12], None).unwrap().id,
        first.id
    );
    assert!(matches!(
        repo.find_snapshot("latest", Some("other")),
        Err(Error::SnapshotSelection(_))
    ));
}

#[test]
fn plaintext_never_reaches_the_backend_when_encrypted() {
    let (backend, repo) = new_repo(CipherKind::Aes256Gcm);
    let mut disk = vec![0u8; 4 * CHUNK as usize];
    let marker = b"TOP-SECRET-MARKER-0123456789";
    for i in 0..disk.len() / 4096 {
        disk[i * 4096..i * 4096 + marker.len()].copy_from_slice(marker);
    }
    let snapshot = backup(&repo, &[("secret-disk", &disk)]);
    for object in backend.list("").unwrap() {
        let bytes = backend.get(&object.key).unwrap();
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker),
            "plaintext in {}",
            object.key
        );
        assert!(
            !bytes.windows(11).any(|w| w == b"secret-disk"),
            "disk name in {}",
            object.key
        );
    }
    assert_eq!(restore(&repo, &snapshot, 0), disk);
}

#[test]
fn wrong_passphrase_is_named_and_writes_nothing() {
    let (backend, _) = new_repo(CipherKind::Aes256Gcm);
    let before = backend.list("").unwrap();
    let err = Repository::open(backend.clone(), || Ok(Some("wrong".into()))).unwrap_err();
    assert!(
        matches!(err, Error::WrongPassphrase { keys: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("wrong passphrase"));
    assert_eq!(backend.list("").unwrap(), before);
    let err = Repository::open(backend, || Ok(None)).unwrap_err();
    assert!(matches!(err, Error::PassphraseRequired { .. }), "{err}");
}

#[test]
fn added_keys_open_the_repository_and_the_last_key_stays() {
    let (backend, repo) = new_repo(CipherKind::Aes256Gcm);
    let kdf = KdfParams {
        memory_kib: 1024,
        iterations: 1,
        parallelism: 1,
    };
    let second = repo.add_key("second", kdf).unwrap();
    let reopened = Repository::open(backend.clone(), || Ok(Some("second".into()))).unwrap();
    assert_eq!(reopened.list_keys().unwrap().len(), 2);
    assert!(
        reopened.remove_key(&second[..6]).is_err(),
        "the key in use cannot be removed"
    );
    let first = repo
        .list_keys()
        .unwrap()
        .into_iter()
        .find(|k| k.current)
        .unwrap();
    reopened.remove_key(&first.id).unwrap();
    assert!(Repository::open(backend.clone(), || Ok(Some("pw".into()))).is_err());
    assert!(Repository::open(backend, || Ok(Some("second".into()))).is_ok());
}

#[test]
fn missing_config_and_newer_versions_are_refused_by_name() {
    let empty = Arc::new(MemoryBackend::new());
    let err = Repository::open(empty, || Ok(None)).unwrap_err();
    assert!(matches!(err, Error::NotARepository { .. }), "{err}");

    let (backend, _) = new_repo(CipherKind::None);
    let mut config = backend.get("config").unwrap();
    let text = String::from_utf8(config.split_off(8))
        .unwrap()
        .replace("\"version\": 3", "\"version\": 7");
    config.extend_from_slice(text.as_bytes());
    backend.corrupt("config", config);
    let err = Repository::open(backend, || Ok(None)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedVersion {
                found: 7,
                supported: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade vbackup"));
}

#[test]
fn damaged_and_missing_chunks_are_named_with_what_they_break() {
    let (backend, repo) = new_repo(CipherKind::Aes256Gcm);
    let disk = sample_disk(3);
    let first = backup(&repo, &[("vda", &disk)]);
    let mut other = sample_disk(3);
    other[0] ^= 1;
    let second = backup(&repo, &[("vdb", &other)]);
    assert!(vbackup_core::verify(&repo, 2, &Progress::new())
        .unwrap()
        .is_clean());

    // Chunk 1 is shared by both snapshots; damage it, and delete chunk 0 of the first.
    let index = repo.read_index(&first.manifest.disks[0].index).unwrap();
    let shared = index.get(1).unwrap();
    let key = Repository::chunk_key(&shared);
    let mut bytes = backend.get(&key).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    backend.corrupt(&key, bytes);
    backend
        .delete(&Repository::chunk_key(&index.get(0).unwrap()))
        .unwrap();

    let report = vbackup_core::verify(&repo, 2, &Progress::new()).unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert!(report
        .problems
        .iter()
        .any(|p| p.object == key && p.problem.contains("authentication failed")));
    assert!(report.problems.iter().any(|p| p.problem == "missing"));
    let first_hit = report
        .affected
        .iter()
        .find(|a| a.snapshot == first.id)
        .unwrap();
    assert_eq!((first_hit.disk.as_str(), first_hit.bad_chunks), ("vda", 2));
    let second_hit = report
        .affected
        .iter()
        .find(|a| a.snapshot == second.id)
        .unwrap();
    assert_eq!(
        (second_hit.disk.as_str(), second_hit.bad_chunks),
        ("vdb", 1)
    );

    let record = &second.manifest.disks[0];
    let target = MemTarget::new(record.virtual_size as usize);
    let err = vbackup_core::restore_disk(&repo, record, &target, 2, &Progress::new()).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
}

#[test]
fn a_failing_source_records_no_snapshot_and_the_retry_reuses_chunks() {
    struct Failing(MemDisk);
    impl DiskSource for Failing {
        fn virtual_size(&self) -> u64 {
            self.0.virtual_size()
        }
        fn format(&self) -> &str {
            "raw"
        }
        fn open_reader(&self) -> io::Result<Box<dyn DiskReader>> {
            Ok(Box::new(FailingReader(self.0.clone())))
        }
    }
    struct FailingReader(MemDisk);
    impl DiskReader for FailingReader {
        fn extents(&mut self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
            self.0.extents(offset, length)
        }
        fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            if offset >= 8 * u64::from(CHUNK) {
                return Err(io::Error::other("I/O error on the source"));
            }
            self.0.read_exact_at(buf, offset)
        }
    }
    let (_, repo) = new_repo(CipherKind::Aes256Gcm);
    let disk = sample_disk(4);
    let source = Box::new(Failing(MemDisk::with_holes(disk.clone())));
    let disks = [BackupDisk {
        name: "vda".into(),
        source_label: "x".into(),
        source,
        base: None,
    }];
    let options = BackupOptions {
        vm: "vm1".into(),
        tags: vec![],
        host: None,
        threads: 1,
        skip_unchanged: true,
    };
    let err = vbackup_core::backup(&repo, &disks, &options, &Progress::new()).unwrap_err();
    assert!(err.to_string().contains("reading disk 'vda'"), "{err}");
    assert!(repo.list_snapshots().unwrap().is_empty());
    let stored_before = repo.list_chunks().unwrap().len();
    assert!(stored_before > 0);
    let retry = backup(&repo, &[("vda", &disk)]);
    assert_eq!(
        retry.manifest.stats.chunks_reused as usize,
        stored_before + 1
    );
    assert_eq!(restore(&repo, &retry, 0), disk);
}

#[test]
fn an_unchanged_source_is_not_read_again_and_a_changed_one_is() {
    struct Fingerprinted(MemDisk, &'static str);
    impl DiskSource for Fingerprinted {
        fn virtual_size(&self) -> u64 {
            self.0.virtual_size()
        }
        fn format(&self) -> &str {
            "raw"
        }
        fn open_reader(&self) -> io::Result<Box<dyn DiskReader>> {
            self.0.open_reader()
        }
        fn identity(&self) -> Option<String> {
            Some(self.1.to_string())
        }
    }
    let (_, repo) = new_repo(CipherKind::Aes256Gcm);
    let disk = sample_disk(5);
    let run = |identity: &'static str, skip_unchanged: bool| {
        let source = Box::new(Fingerprinted(MemDisk::with_holes(disk.clone()), identity));
        let disks = [BackupDisk {
            name: "vda".into(),
            source_label: "x".into(),
            source,
            base: None,
        }];
        let options = BackupOptions {
            vm: "vm1".into(),
            tags: vec![],
            host: None,
            threads: 2,
            skip_unchanged,
        };
        vbackup_core::backup(&repo, &disks, &options, &Progress::new()).unwrap()
    };
    let first = run("inode-1-mtime-1", true);
    assert!(first.manifest.stats.bytes_read > 0);
    let second = run("inode-1-mtime-1", true);
    assert_eq!(second.manifest.stats.bytes_read, 0);
    assert_eq!(second.manifest.stats.disks_unchanged, 1);
    assert_eq!(
        second.manifest.disks[0].unchanged_since.as_deref(),
        Some(first.id.as_str())
    );
    assert_eq!(
        second.manifest.disks[0].index,
        first.manifest.disks[0].index
    );
    assert_eq!(restore(&repo, &second, 0), disk);
    let forced = run("inode-1-mtime-1", false);
    assert!(forced.manifest.stats.bytes_read > 0);
    let changed = run("inode-1-mtime-2", true);
    assert!(changed.manifest.stats.bytes_read > 0);
    assert_eq!(changed.manifest.stats.disks_unchanged, 0);
}

/// A disk whose reader reports which chunks changed, like a dirty bitmap.
struct Tracked {
    disk: MemDisk,
    dirty: Arc<Vec<bool>>,
    reads: Arc<std::sync::atomic::AtomicU64>,
}

impl DiskSource for Tracked {
    fn virtual_size(&self) -> u64 {
        self.disk.virtual_size()
    }
    fn format(&self) -> &str {
        "qcow2"
    }
    fn open_reader(&self) -> io::Result<Box<dyn DiskReader>> {
        Ok(Box::new(Tracked {
            disk: self.disk.clone(),
            dirty: self.dirty.clone(),
            reads: self.reads.clone(),
        }))
    }
}

impl DiskReader for Tracked {
    fn extents(&mut self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        self.disk.extents(offset, length)
    }
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.disk.read_exact_at(buf, offset)
    }
    fn changed(&mut self, offset: u64, _length: u64) -> io::Result<Option<bool>> {
        Ok(Some(self.dirty[(offset / u64::from(CHUNK)) as usize]))
    }
}

#[test]
fn changed_block_tracking_reads_only_dirty_chunks_and_restores_the_whole_disk() {
    let (_, repo) = new_repo(CipherKind::Aes256Gcm);
    let original = sample_disk(6);
    let full = backup(&repo, &[("vda", &original)]);
    let base_index = repo.read_index(&full.manifest.disks[0].index).unwrap();

    let mut changed = original.clone();
    changed[5 * CHUNK as usize + 17] ^= 0xff; // chunk 5
    changed[20 * CHUNK as usize..21 * CHUNK as usize].fill(3); // chunk 20, a hole before
    let mut dirty = vec![false; base_index.count() as usize];
    dirty[5] = true;
    dirty[20] = true;
    let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let source = Tracked {
        disk: MemDisk::with_holes(changed.clone()),
        dirty: Arc::new(dirty),
        reads: reads.clone(),
    };
    let disks = [BackupDisk {
        name: "vda".into(),
        source_label: "x".into(),
        source: Box::new(source),
        base: Some(vbackup_core::BaseIndex {
            snapshot: full.id.clone(),
            index: base_index.clone(),
        }),
    }];
    let options = BackupOptions {
        vm: "vm1".into(),
        tags: vec![],
        host: None,
        threads: 2,
        skip_unchanged: true,
    };
    let incremental = vbackup_core::backup(&repo, &disks, &options, &Progress::new()).unwrap();
    assert_eq!(
        reads.load(std::sync::atomic::Ordering::Relaxed),
        2 * u64::from(CHUNK),
        "only the two dirty chunks are read"
    );
    let record = &incremental.manifest.disks[0];
    assert_eq!(record.read, vbackup_core::format::ReadScope::Changed);
    assert_eq!(record.base_snapshot.as_deref(), Some(full.id.as_str()));
    assert_eq!(
        incremental.manifest.stats.chunks_unchanged as usize,
        base_index.count() as usize - 2
    );
    assert_eq!(
        restore(&repo, &incremental, 0),
        changed,
        "the incremental restores on its own"
    );
    assert_eq!(restore(&repo, &full, 0), original);
}

#[test]
fn a_base_of_another_size_is_refused() {
    let (_, repo) = new_repo(CipherKind::Aes256Gcm);
    let original = sample_disk(7);
    let full = backup(&repo, &[("vda", &original)]);
    let base_index = repo.read_index(&full.manifest.disks[0].index).unwrap();
    let mut grown = original.clone();
    grown.extend_from_slice(&vec![0u8; CHUNK as usize]);
    let disks = [BackupDisk {
        name: "vda".into(),
        source_label: "x".into(),
        source: Box::new(MemDisk::with_holes(grown)),
        base: Some(vbackup_core::BaseIndex {
            snapshot: full.id.clone(),
            index: base_index,
        }),
    }];
    let options = BackupOptions {
        vm: "vm1".into(),
        tags: vec![],
        host: None,
        threads: 2,
        skip_unchanged: false,
    };
    let err = vbackup_core::backup(&repo, &disks, &options, &Progress::new()).unwrap_err();
    assert!(
        err.to_string().contains("different disk or chunk size"),
        "{err}"
    );
}
