//! QEMU's image locks, so vbackup neither reads a disk that a VM is
//! writing nor overwrites one that something uses.
//!
//! QEMU (2.10 and later: the VM, qemu-img, qemu-nbd, qemu-io,
//! qemu-storage-daemon) announces how it uses an image with open file
//! description (OFD) byte-range locks on the image file itself. For each
//! permission bit `i` of its block layer (0 consistent read, 1 write, 2
//! write-unchanged, 3 resize) a shared lock on byte `100 + i` says "I hold
//! this permission" and a shared lock on byte `200 + i` says "I let nobody
//! else hold it". Before it takes a permission, a QEMU process tests the
//! other side's byte for a conflicting lock; that is how `qemu-img` refuses
//! an image that a running VM has open.
//!
//! vbackup plays by the same rules. A raw image being backed up gets the
//! locks of a consistent reader that shares neither writing nor resizing,
//! then the bytes of writers are tested: a process that writes the image
//! (a VM, `qemu-io`) is found, and one that starts later is refused by
//! QEMU itself. Both sides take their locks before they test the other's,
//! so two that start at once cannot both miss each other. A restore target
//! gets a writer's locks that share nothing.
//!
//! Locks are advisory: a program that takes none (`dd`) is not seen. A file
//! system without OFD locks is used without them, as QEMU does.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// First byte of the "holds permission `i`" locks.
const PERM_BASE: i64 = 100;
/// First byte of the "shares no permission `i`" locks.
const SHARED_BASE: i64 = 200;
/// The permission bits QEMU locks (`BLK_PERM_ALL`).
const PERMISSIONS: i64 = 4;
/// `BLK_PERM_CONSISTENT_READ`.
const CONSISTENT_READ: i64 = 0;
/// `BLK_PERM_WRITE`.
const WRITE: i64 = 1;
/// `BLK_PERM_RESIZE`.
const RESIZE: i64 = 3;

/// Image locks held on an open file (none where the file system has no
/// OFD locks); dropping it closes the file, which releases them.
#[derive(Debug)]
pub struct ImageLock {
    _file: File,
}

/// How QEMU sees a user of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// Reads the image and lets nobody write or resize it: a backup.
    Reading,
    /// Writes the image and shares nothing: a restore.
    Writing,
}

impl Use {
    /// The bytes this use locks.
    fn bytes(self) -> Vec<i64> {
        match self {
            Use::Reading => vec![
                PERM_BASE + CONSISTENT_READ,
                SHARED_BASE + WRITE,
                SHARED_BASE + RESIZE,
            ],
            Use::Writing => std::iter::once(PERM_BASE + WRITE)
                .chain((0..PERMISSIONS).map(|i| SHARED_BASE + i))
                .collect(),
        }
    }

    /// The other processes' bytes that conflict with this use: writers and
    /// resizers for a reader; anyone using the image at all for a writer.
    fn conflicts(self) -> Vec<(i64, i64)> {
        match self {
            Use::Reading => vec![(PERM_BASE + WRITE, 1), (PERM_BASE + RESIZE, 1)],
            Use::Writing => vec![(PERM_BASE, PERMISSIONS), (SHARED_BASE, PERMISSIONS)],
        }
    }
}

/// Takes the image locks of `usage` on `file` (opened from `path`) and
/// refuses with [`Error::InUse`] if another process's locks conflict.
pub(crate) fn lock(file: File, path: &Path, usage: Use) -> Result<ImageLock> {
    for byte in usage.bytes() {
        match set_shared_lock(&file, byte) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => return Ok(ImageLock { _file: file }),
            Err(e) => return Err(Error::io("locking the image", e).for_image(path)),
        }
    }
    check(&file, path, usage)?;
    Ok(ImageLock { _file: file })
}

/// Refuses with [`Error::InUse`] an image that another process uses in a
/// way that conflicts with `usage`, without taking any lock (for images
/// that qemu-img or qemu-nbd then open with QEMU's own locks).
pub(crate) fn check_path(path: &Path, usage: Use) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io("opening", e).for_image(path))?;
    check(&file, path, usage)
}

fn check(file: &File, path: &Path, usage: Use) -> Result<()> {
    for (start, len) in usage.conflicts() {
        match conflicting_lock(file, start, len) {
            Ok(false) => {}
            Ok(true) => return Err(Error::in_use(path, usage == Use::Reading)),
            Err(e) if unsupported(&e) => return Ok(()),
            Err(e) => return Err(Error::io("testing the image's locks", e).for_image(path)),
        }
    }
    Ok(())
}

/// Errors that mean "this file system has no OFD locks".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP)
    )
}

fn byte_range(kind: libc::c_int, start: i64, len: i64) -> libc::flock {
    libc::flock {
        // F_RDLCK, F_WRLCK and F_UNLCK are 0, 1 and 2: they fit a c_short.
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        // OFD locks require 0.
        l_pid: 0,
    }
}

/// A shared OFD lock on one byte; fails at once (never waits) if another
/// process holds an exclusive lock there, which QEMU never takes.
fn set_shared_lock(file: &File, byte: i64) -> io::Result<()> {
    let mut lock = byte_range(libc::F_RDLCK, byte, 1);
    fcntl_lock(file, libc::F_OFD_SETLK, &mut lock)
}

/// Whether another open file description holds a lock on
/// `[start, start + len)` (an exclusive lock would conflict with any).
fn conflicting_lock(file: &File, start: i64, len: i64) -> io::Result<bool> {
    let mut lock = byte_range(libc::F_WRLCK, start, len);
    fcntl_lock(file, libc::F_OFD_GETLK, &mut lock)?;
    Ok(libc::c_int::from(lock.l_type) != libc::F_UNLCK)
}

#[allow(unsafe_code)]
fn fcntl_lock(file: &File, command: libc::c_int, lock: &mut libc::flock) -> io::Result<()> {
    // SAFETY: fcntl(2) with F_OFD_SETLK / F_OFD_GETLK reads (and for GETLK
    // writes) one `struct flock`, which `lock` points to and which lives
    // for the whole call; the fd stays open because `file` is borrowed.
    let result = unsafe { libc::fcntl(file.as_raw_fd(), command, lock as *mut libc::flock) };
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        (dir, path)
    }

    fn open(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn readers_share_but_a_writer_excludes_them() {
        let (_dir, path) = image();
        let first = lock(open(&path), &path, Use::Reading).unwrap();
        let second = lock(open(&path), &path, Use::Reading).unwrap();
        let err = lock(open(&path), &path, Use::Writing).unwrap_err();
        assert!(matches!(err, Error::InUse { .. }), "{err}");
        drop((first, second));
        let writer = lock(open(&path), &path, Use::Writing).unwrap();
        let err = check_path(&path, Use::Reading).unwrap_err();
        assert!(err.to_string().contains("--qmp"), "{err}");
        drop(writer);
        check_path(&path, Use::Reading).unwrap();
    }
}
