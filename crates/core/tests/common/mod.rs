//! Helpers shared by the lifecycle tests: repositories over the in-memory
//! backend, backups of in-memory disks and restores into memory (the disks
//! and targets themselves are the test kit's).

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used, dead_code)]

use std::sync::Arc;

use vbackup_core::crypto::kdf::KdfParams;
use vbackup_core::crypto::CipherKind;
use vbackup_core::{BackupDisk, BackupOptions, InitOptions, Progress, Repository, Snapshot};
use vbackup_storage::MemoryBackend;
pub use vbackup_testkit::memory::{MemDisk, MemTarget};

/// The chunk size of test repositories.
pub const CHUNK: u32 = 64 << 10;

/// A new encrypted repository over a fresh in-memory backend.
pub fn new_repo() -> (Arc<MemoryBackend>, Repository) {
    new_repo_with(None)
}

/// [`new_repo`] with a pack size (`None`: the default for the backend,
/// which for the in-memory one is one object per chunk).
pub fn new_repo_with(pack_size: Option<u32>) -> (Arc<MemoryBackend>, Repository) {
    let backend = Arc::new(MemoryBackend::new());
    let options = InitOptions {
        chunk_size: CHUNK,
        cipher: CipherKind::Aes256Gcm,
        kdf: KdfParams {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        },
        pack_size,
        ..InitOptions::default()
    };
    let repo = Repository::init(backend.clone(), Some("pw"), &options).unwrap();
    (backend, repo)
}

/// A check that reads every chunk.
pub fn check_all(repo: &Repository) -> vbackup_core::CheckReport {
    let options = vbackup_core::CheckOptions {
        read_data: vbackup_core::ReadData::All,
        threads: 2,
        stale_after: None,
    };
    vbackup_core::check(repo, &options, &Progress::new()).unwrap()
}

/// `chunks` chunks of data that differ per `seed` (no holes).
pub fn disk_data(chunks: usize, seed: u32) -> Vec<u8> {
    let mut data = vec![0u8; chunks * CHUNK as usize];
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = (((i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(0x9e37_79b9)) >> 24)
            as u8
            | 1;
    }
    data
}

/// Backs up one disk named `vda` of `vm`.
pub fn backup_disk(repo: &Repository, vm: &str, disk: MemDisk) -> vbackup_core::Result<Snapshot> {
    let disks = [BackupDisk {
        name: "vda".into(),
        source_label: format!("mem:{vm}"),
        base: None,
        source: Box::new(disk),
    }];
    let options = BackupOptions {
        vm: vm.into(),
        tags: vec![],
        host: Some("test-host".into()),
        threads: 2,
        skip_unchanged: true,
    };
    vbackup_core::backup(repo, &disks, &options, &Progress::new())
}

/// Backs up `data` as `vm`'s disk.
pub fn backup(repo: &Repository, vm: &str, data: &[u8]) -> Snapshot {
    backup_disk(repo, vm, MemDisk::new(data.to_vec())).unwrap()
}

/// Restores disk 0 of `snapshot`.
pub fn restore(repo: &Repository, snapshot: &Snapshot) -> vbackup_core::Result<Vec<u8>> {
    let record = &snapshot.manifest.disks[0];
    let target = MemTarget::new(record.virtual_size as usize);
    vbackup_core::restore_disk(repo, record, &target, 2, &Progress::new())?;
    Ok(target.contents())
}
