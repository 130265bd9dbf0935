//! Helpers shared by the lifecycle tests: in-memory disks (optionally with
//! a fingerprint and a hook run on the first read), an in-memory restore
//! target, and repositories over the in-memory backend.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used, dead_code)]

use std::io;
use std::sync::{Arc, Mutex};

use vbackup_core::crypto::kdf::KdfParams;
use vbackup_core::crypto::CipherKind;
use vbackup_core::{
    BackupDisk, BackupOptions, DiskReader, DiskSource, DiskTarget, DiskWriter, Extent, ExtentKind,
    InitOptions, Progress, Repository, Snapshot,
};
use vbackup_storage::MemoryBackend;

/// The chunk size of test repositories.
pub const CHUNK: u32 = 64 << 10;

/// Something to run once, the first time a disk is read.
pub type Hook = Arc<Mutex<Option<Box<dyn FnOnce() + Send>>>>;

/// A disk in memory.
#[derive(Clone)]
pub struct MemDisk {
    pub data: Arc<Vec<u8>>,
    pub identity: Option<String>,
    pub hook: Hook,
}

impl MemDisk {
    pub fn new(data: Vec<u8>) -> Self {
        Self {
            data: Arc::new(data),
            identity: None,
            hook: Arc::new(Mutex::new(None)),
        }
    }
}

impl DiskSource for MemDisk {
    fn virtual_size(&self) -> u64 {
        self.data.len() as u64
    }
    fn format(&self) -> &str {
        "raw"
    }
    fn open_reader(&self) -> io::Result<Box<dyn DiskReader>> {
        Ok(Box::new(self.clone()))
    }
    fn identity(&self) -> Option<String> {
        self.identity.clone()
    }
}

impl DiskReader for MemDisk {
    fn extents(&mut self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            offset,
            length,
            kind: ExtentKind::Data,
        }])
    }
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

#[derive(Clone)]
pub struct MemTarget(pub Arc<Mutex<Vec<u8>>>);

impl DiskTarget for MemTarget {
    fn open_writer(&self) -> io::Result<Box<dyn DiskWriter>> {
        Ok(Box::new(self.clone()))
    }
    fn finish(&self) -> io::Result<()> {
        Ok(())
    }
}

impl DiskWriter for MemTarget {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.lock().unwrap()[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

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
    let target = MemTarget(Arc::new(Mutex::new(vec![
        0u8;
        record.virtual_size as usize
    ])));
    vbackup_core::restore_disk(repo, record, &target, 2, &Progress::new())?;
    let data = target.0.lock().unwrap().clone();
    Ok(data)
}
