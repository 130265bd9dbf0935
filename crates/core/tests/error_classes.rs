//! Regression tests of issue 11 ("error classes that tell the truth"):
//! through the engine's real paths, an internal failure is `Internal`, a
//! disk source's error keeps the class it was given, and a damaged key
//! file is damage, not bad usage.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::io;
use std::sync::Arc;

use common::{backup_disk, new_repo, MemDisk};
use vbackup_core::format::{plain_json_object, KeyFile, ObjectKind};
use vbackup_core::{
    BackupDisk, BackupOptions, Classified, DiskReader, DiskSource, Error, ErrorClass, Extent,
    ExtentKind, OpenOptions, Progress, Repository,
};
use vbackup_storage::{Backend, MemoryBackend};

/// How a [`FailingDisk`]'s reads fail.
#[derive(Clone, Copy)]
enum Failure {
    /// The reader panics (a bug in a source).
    Panic,
    /// The reader reports an error of this class (as qemu's do).
    Classed(ErrorClass),
    /// The reader reports a plain I/O error.
    Plain,
}

/// A one-chunk disk whose every read fails.
#[derive(Clone, Copy)]
struct FailingDisk(Failure);

impl DiskSource for FailingDisk {
    fn virtual_size(&self) -> u64 {
        u64::from(common::CHUNK)
    }
    fn format(&self) -> &str {
        "raw"
    }
    fn open_reader(&self) -> io::Result<Box<dyn DiskReader>> {
        Ok(Box::new(*self))
    }
}

impl DiskReader for FailingDisk {
    fn extents(&mut self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            offset,
            length,
            kind: ExtentKind::Data,
        }])
    }
    fn read_exact_at(&mut self, _buf: &mut [u8], _offset: u64) -> io::Result<()> {
        match self.0 {
            Failure::Panic => panic!("a bug in the disk reader"),
            Failure::Classed(class) => Err(Classified::io(
                io::ErrorKind::Other,
                class,
                "disk image /vm/web1.qcow2: the source's own words",
            )),
            Failure::Plain => Err(io::Error::other("the disk is on fire")),
        }
    }
}

fn back_up(repo: &Repository, failure: Failure) -> Error {
    let disks = [BackupDisk {
        name: "vda".into(),
        source_label: "mem:web1".into(),
        base: None,
        source: Box::new(FailingDisk(failure)),
    }];
    let options = BackupOptions {
        vm: "web1".into(),
        tags: vec![],
        host: Some("test-host".into()),
        threads: 2,
        skip_unchanged: false,
    };
    vbackup_core::backup(repo, &disks, &options, &Progress::new()).unwrap_err()
}

#[test]
fn issue11_a_panicking_backup_worker_is_an_internal_error_not_bad_usage() {
    let (_backend, repo) = new_repo();
    let error = back_up(&repo, Failure::Panic);
    assert_eq!(error.class(), ErrorClass::Internal, "{error}");
    assert!(error.to_string().starts_with("internal error:"), "{error}");
    // The repository is fine afterwards: the next backup works.
    backup_disk(&repo, "web1", MemDisk::new(common::disk_data(2, 1))).unwrap();
}

#[test]
fn issue11_a_source_error_keeps_the_class_it_was_given() {
    let (_backend, repo) = new_repo();
    for class in [
        ErrorClass::Usage,
        ErrorClass::Integrity,
        ErrorClass::Internal,
        ErrorClass::Runtime,
    ] {
        let error = back_up(&repo, Failure::Classed(class));
        assert!(matches!(error, Error::Source { .. }), "{error}");
        assert_eq!(error.class(), class, "{error}");
        let text = error.to_string();
        assert!(text.contains("the source's own words"), "{text}");
    }
    let error = back_up(&repo, Failure::Plain);
    assert_eq!(error.class(), ErrorClass::Runtime, "{error}");
}

#[test]
fn issue11_a_key_file_whose_kdf_parameters_argon2_refuses_is_damage() {
    let (backend, _repo) = new_repo();
    let key = backend.list("keys/").unwrap().remove(0).key;
    let bytes = backend.get(&key).unwrap();
    let mut file: KeyFile = serde_json::from_slice(&bytes[8..]).unwrap();
    file.kdf.parallelism = 0;
    backend.corrupt(&key, plain_json_object(ObjectKind::Key, &file).unwrap());
    let error = open(&backend).unwrap_err();
    assert_eq!(error.class(), ErrorClass::Integrity, "{error}");
    assert!(error.to_string().contains(&key), "{error}");
}

fn open(backend: &Arc<MemoryBackend>) -> Result<Repository, Error> {
    Repository::open_with(backend.clone(), &OpenOptions::default(), || {
        Ok(Some("pw".into()))
    })
}
