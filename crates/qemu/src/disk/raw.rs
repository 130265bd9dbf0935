//! Raw images and block devices, read and written directly.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use vbackup_core::source::{DiskReader, DiskSource, DiskTarget, DiskWriter, Extent, ExtentKind};

use super::lock::{self, ImageLock, Use};
use super::push_extent;
use crate::error::{Error, Result};

/// A raw disk image or block device; each reader opens its own `File`.
/// While it exists it holds QEMU's image locks of a reader that lets
/// nobody write (see [`super::lock`]).
#[derive(Debug)]
pub struct RawFileSource {
    path: PathBuf,
    size: u64,
    _lock: ImageLock,
}

impl RawFileSource {
    /// Opens `path` and measures it (seeking to the end, which also works
    /// for block devices). An image that another process holds open for
    /// writing (a running VM, `qemu-io`) is refused with [`Error::InUse`].
    pub fn open(path: &Path) -> Result<Self> {
        let measure = || -> Result<(File, u64)> {
            let mut file = File::open(path).map_err(|e| Error::io("opening", e))?;
            let size = file
                .seek(SeekFrom::End(0))
                .map_err(|e| Error::io("measuring", e))?;
            Ok((file, size))
        };
        let (file, size) = measure().map_err(|e| e.for_image(path))?;
        let lock = lock::lock(file, path, Use::Reading)?;
        Ok(RawFileSource {
            path: path.to_owned(),
            size,
            _lock: lock,
        })
    }
}

impl DiskSource for RawFileSource {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> &str {
        "raw"
    }

    fn open_reader(&self) -> io::Result<Box<dyn DiskReader>> {
        let file =
            File::open(&self.path).map_err(|e| Error::io("opening", e).for_image(&self.path))?;
        Ok(Box::new(RawReader {
            file,
            size: self.size,
        }))
    }
}

/// One open file reading a [`RawFileSource`].
struct RawReader {
    file: File,
    size: u64,
}

impl DiskReader for RawReader {
    fn extents(&mut self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        crate::nbd::check_range(self.size, offset, length, "extents query")?;
        sparse_extents(&self.file, offset, length)
    }

    /// `SEEK_DATA`/`SEEK_HOLE` from `offset`, stopping after
    /// `max_extents` extents: one pair of calls per data extent, none per
    /// chunk of a hole.
    fn extents_from(
        &mut self,
        offset: u64,
        length: u64,
        max_extents: usize,
    ) -> io::Result<Vec<Extent>> {
        crate::nbd::check_range(self.size, offset, length, "extents query")?;
        sparse_extents_max(&self.file, offset, length, max_extents)
    }

    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// Data and holes of `[offset, offset + length)` from `SEEK_DATA` /
/// `SEEK_HOLE`. Where the file system cannot tell, everything is data.
pub(crate) fn sparse_extents(file: &File, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
    sparse_extents_max(file, offset, length, usize::MAX)
}

/// [`sparse_extents`] of a prefix of the range: stops once `max_extents`
/// extents are collected.
fn sparse_extents_max(
    file: &File,
    offset: u64,
    length: u64,
    max_extents: usize,
) -> io::Result<Vec<Extent>> {
    let end = offset + length;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < max_extents {
        let data = match seek(file, pos, libc::SEEK_DATA) {
            Ok(Some(data)) => data.clamp(pos, end),
            Ok(None) => end,
            Err(e) if unsupported(&e) => {
                push_extent(&mut out, pos, end - pos, ExtentKind::Data);
                break;
            }
            Err(e) => return Err(e),
        };
        if data > pos {
            push_extent(&mut out, pos, data - pos, ExtentKind::Zero);
            pos = data;
            continue;
        }
        let hole = match seek(file, pos, libc::SEEK_HOLE) {
            // A hole at `pos` right after SEEK_DATA said data: a race with a
            // writer; count one more byte as data to make progress.
            Ok(Some(hole)) => hole.clamp(pos + 1, end),
            Ok(None) => end,
            Err(e) if unsupported(&e) => end,
            Err(e) => return Err(e),
        };
        push_extent(&mut out, pos, hole - pos, ExtentKind::Data);
        pos = hole;
    }
    Ok(out)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
    )
}

/// `lseek(fd, offset, whence)`; `None` for `ENXIO` (no data / hole at or
/// after `offset`).
#[allow(unsafe_code)]
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek(2) takes an fd we own (kept open by `file` for the
    // duration of the call) and plain integers; no memory is shared.
    let result = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if result >= 0 {
        // Non-negative, so it fits a u64.
        return Ok(Some(result as u64));
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(error)
    }
}

/// A raw image file (sparse: unwritten ranges stay holes) or a block
/// device, written with positional writes. Until it is finished (or
/// dropped) it holds QEMU's image locks of a writer that shares nothing,
/// and a block device is held open exclusively (`O_EXCL`), so no VM starts
/// on a half-written disk and nothing mounts it meanwhile.
#[derive(Debug)]
pub struct RawFileTarget {
    path: PathBuf,
    /// A block device: it may hold old data, so holes are zeroed.
    is_device: bool,
    lock: std::sync::Mutex<Option<ImageLock>>,
}

impl RawFileTarget {
    /// Creates (or truncates) `path` as a sparse file of `size` bytes,
    /// readable by its owner only (mode 0600). A block device is used as
    /// it is, if it is large enough. An image or device that another
    /// process uses (a VM, a mounted file system, LVM, md) is refused with
    /// [`Error::InUse`] and left untouched.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let is_device = path
            .metadata()
            .is_ok_and(|m| m.file_type().is_block_device());
        let lock = if is_device {
            claim_device(path, size)?
        } else {
            create_file(path, size)?
        };
        Ok(RawFileTarget {
            path: path.to_owned(),
            is_device,
            lock: std::sync::Mutex::new(Some(lock)),
        })
    }
}

/// Opens the block device exclusively, locks it and checks its size.
fn claim_device(path: &Path, size: u64) -> Result<ImageLock> {
    let mut file = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Err(device_busy(path)),
        Err(e) => return Err(Error::io("opening", e).for_image(path)),
    };
    let have = file
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io("measuring", e).for_image(path))?;
    if have < size {
        return Err(Error::InvalidRequest(format!(
            "block device holds {have} bytes, {size} needed"
        ))
        .for_image(path));
    }
    lock::lock(file, path, Use::Writing)
}

/// Creates or truncates the file, mode 0600, once no other process is
/// found to use it; never through a symbolic link (one planted in a
/// shared folder would redirect the restore onto another file).
fn create_file(path: &Path, size: u64) -> Result<ImageLock> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::io("creating", e).for_image(path))?;
    let prepare = |file: &File| -> io::Result<()> {
        // An existing file keeps its mode through `open`: set it.
        file.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
        file.set_len(0)?;
        file.set_len(size)
    };
    let checked = file.try_clone().map_err(|e| Error::io("creating", e));
    let lock = lock::lock(checked.map_err(|e| e.for_image(path))?, path, Use::Writing)?;
    prepare(&file).map_err(|e| Error::io("preparing", e).for_image(path))?;
    Ok(lock)
}

/// Mode of restored images: their owner's alone, like the repository.
pub(crate) const PRIVATE_FILE_MODE: u32 = 0o600;

/// [`Error::InUse`] for a block device that refused an exclusive open,
/// naming its mount point or the devices built on it when they are known.
fn device_busy(path: &Path) -> Error {
    let holder = device_users(path).unwrap_or_else(|| {
        "it is mounted, or held by a device mapper or RAID device, or open exclusively by another program".to_string()
    });
    Error::InUse {
        path: path.to_owned(),
        holder,
        advice: "vbackup never writes onto a device in use, even with --force: unmount it or stop what holds it first".to_string(),
    }
}

/// "mounted on /mnt/x" or "used by dm-3", from `/proc/self/mountinfo` and
/// the device's `holders` folder in sysfs.
fn device_users(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = path.metadata().ok()?.rdev();
    let (major, minor) = (
        ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff),
        (rdev & 0xff) | ((rdev >> 12) & !0xff),
    );
    let id = format!("{major}:{minor}");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounts: Vec<&str> = mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.get(2) == Some(&id.as_str())).then(|| fields.get(4).copied())?
        })
        .collect();
    if !mounts.is_empty() {
        return Some(format!("it is mounted on {}", mounts.join(", ")));
    }
    let holders: Vec<String> = std::fs::read_dir(format!("/sys/dev/block/{id}/holders"))
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    (!holders.is_empty()).then(|| format!("it is used by {}", holders.join(", ")))
}

impl DiskTarget for RawFileTarget {
    fn open_writer(&self) -> io::Result<Box<dyn DiskWriter>> {
        let file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| Error::io("opening", e).for_image(&self.path))?;
        Ok(Box::new(RawWriter {
            file,
            is_device: self.is_device,
            unsynced: None,
        }))
    }

    fn holes_need_zeroing(&self) -> bool {
        self.is_device
    }

    /// Syncs the file and its directory entry, then releases the locks:
    /// the disk is complete.
    fn finish(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Directories cannot be fsynced on every file system; best effort.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        drop(self.lock.lock().unwrap_or_else(|p| p.into_inner()).take());
        Ok(())
    }
}

/// One open file writing a [`RawFileTarget`].
struct RawWriter {
    file: File,
    is_device: bool,
    /// The span `(start, end)` written since writeback was last started:
    /// a restore writes a chunk as several runs (its zero blocks left
    /// out), and one writeback request per chunk, not per run, keeps the
    /// kernel from splitting the writes into many small ones.
    unsynced: Option<(u64, u64)>,
}

/// How much written data is gathered before its writeback is started.
const WRITEBACK_SPAN: u64 = 4 << 20;

impl RawWriter {
    /// Starts writeback of the gathered span.
    fn start_pending_writeback(&mut self) {
        if let Some((start, end)) = self.unsynced.take() {
            start_writeback(&self.file, start, end - start);
        }
    }
}

impl DiskWriter for RawWriter {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        let end = offset + buf.len() as u64;
        self.unsynced = match self.unsynced {
            // Forward, within one span: gathered.
            Some((start, last)) if offset >= last && end - start <= WRITEBACK_SPAN => {
                Some((start, end))
            }
            _ => {
                self.start_pending_writeback();
                Some((offset, end))
            }
        };
        if self
            .unsynced
            .is_some_and(|(start, end)| end - start >= WRITEBACK_SPAN)
        {
            self.start_pending_writeback();
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.unsynced = None;
        self.file.sync_data()
    }

    /// On a block device, the kernel's write-zeroes (`BLKZEROOUT`: offloaded
    /// or unmapped where the device can, written otherwise); elsewhere, or
    /// if the device refuses, zeros written.
    fn write_zeroes(&mut self, offset: u64, length: u64) -> io::Result<()> {
        if self.is_device && zero_out(&self.file, offset, length).is_ok() {
            return Ok(());
        }
        vbackup_core::source::write_zero_bytes(self, offset, length)
    }
}

/// `ioctl(BLKZEROOUT)` on `length` bytes at `offset` of a block device.
#[allow(unsafe_code)]
fn zero_out(file: &File, offset: u64, length: u64) -> io::Result<()> {
    /// `_IO(0x12, 127)` from linux/fs.h.
    const BLKZEROOUT: libc::c_ulong = 0x127f;
    let range: [u64; 2] = [offset, length];
    // SAFETY: BLKZEROOUT reads two u64 (start, length) from the pointer,
    // which points at `range`, alive for the call; the descriptor is
    // `file`'s, open for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to start writing `len` bytes at `offset` to disk now,
/// without waiting. Disk writes then overlap with fetching and decoding the
/// next chunks, and the fsync at the end of a restore finds little left to
/// do. A hint only: errors are ignored (the final fsync reports real ones).
#[allow(unsafe_code)]
fn start_writeback(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return;
    };
    // SAFETY: sync_file_range(2) takes a file descriptor that `file` keeps
    // open for the duration of the call and plain integers; it touches no
    // memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}
