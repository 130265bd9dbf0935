//! `vbackup_core::source` implementations: where backups read disks from
//! and restores write them to.
//!
//! Raw images and block devices are read and written directly (no process,
//! sparseness from `SEEK_DATA`/`SEEK_HOLE`); every other format goes
//! through a private `qemu-nbd` and our NBD client (sparseness from
//! `base:allocation`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use vbackup_core::source::{DiskSource, DiskTarget, Extent, ExtentKind};

use crate::error::{Error, Result};
use crate::img;
use crate::qemu_nbd::{QemuNbd, QemuNbdOptions};

mod export;
mod lock;
mod nbd;
mod raw;

pub use export::{NbdExportOptions, NbdExportSource};
pub use nbd::{NbdSource, NbdTarget};
pub use raw::{RawFileSource, RawFileTarget};

/// Connections `qemu-nbd` accepts at once unless told otherwise: one per
/// worker thread.
pub const DEFAULT_CONNECTIONS: u32 = 8;

/// How to open a disk image for backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenDiskOptions {
    /// The image format; `None` detects it with `qemu-img info`.
    pub format: Option<String>,
    /// How many readers may be open at once (`qemu-nbd --shared`).
    pub connections: u32,
    /// Run `qemu-img check` first (for formats that have metadata): qemu
    /// reads a truncated image's missing clusters as zeroes without any
    /// error, so only a check keeps such an image from being backed up as
    /// if it were fine.
    pub check: bool,
    /// Start `qemu-nbd` (and run the check) only when the first reader is
    /// opened, so a disk the backup skips costs nothing. Errors about the
    /// image then come from `open_reader` instead of from opening.
    pub lazy: bool,
    /// A persistent dirty bitmap of the image (qcow2) to serve with the
    /// data (`qemu-nbd --bitmap`): readers then answer
    /// [`DiskReader::changed`](vbackup_core::source::DiskReader::changed)
    /// from it. A bitmap the image does not have, or an inconsistent one,
    /// is an error, never "nothing changed".
    pub bitmap: Option<String>,
}

impl Default for OpenDiskOptions {
    fn default() -> Self {
        OpenDiskOptions {
            format: None,
            connections: DEFAULT_CONNECTIONS,
            check: true,
            lazy: false,
            bitmap: None,
        }
    }
}

/// Opens a disk image for backup, detecting its format unless given:
/// `raw` is read directly, anything else through `qemu-nbd --read-only`.
///
/// A missing, truncated or corrupt image is an error naming the path and
/// carrying qemu's reason (non-raw images are checked with `qemu-img check`
/// first; see [`OpenDiskOptions::check`]).
pub fn open_disk(path: &Path, format: Option<&str>) -> Result<Box<dyn DiskSource>> {
    let opts = OpenDiskOptions {
        format: format.map(str::to_owned),
        ..OpenDiskOptions::default()
    };
    open_disk_with(path, &opts)
}

/// [`open_disk`] with all options.
pub fn open_disk_with(path: &Path, opts: &OpenDiskOptions) -> Result<Box<dyn DiskSource>> {
    let info = match opts.format.as_deref() {
        Some("raw") => None,
        _ => Some(img::image_info(path)?),
    };
    open_inspected(path, opts, info)
}

/// [`open_disk_with`] for an image the caller just inspected with
/// [`img::image_info`], saving a second `qemu-img info` run.
pub fn open_disk_inspected(
    path: &Path,
    opts: &OpenDiskOptions,
    info: img::ImageInfo,
) -> Result<Box<dyn DiskSource>> {
    open_inspected(path, opts, Some(info))
}

fn open_inspected(
    path: &Path,
    opts: &OpenDiskOptions,
    info: Option<img::ImageInfo>,
) -> Result<Box<dyn DiskSource>> {
    // Before qemu-img and qemu-nbd, which would refuse with qemu's words.
    check_not_in_use(path)?;
    // Taken before anything is read, so a change during the backup shows
    // up as a different fingerprint next time.
    let identity = file_identity(path);
    let format = match (&opts.format, &info) {
        (Some(f), _) => {
            img::check_format(f).map_err(|e| e.for_image(path))?;
            f.clone()
        }
        (None, Some(info)) => info.format.clone(),
        (None, None) => "raw".to_string(),
    };
    if let Some(bitmap) = &opts.bitmap {
        check_bitmap(path, info.as_ref(), bitmap)?;
    }
    let Some(info) = info.filter(|_| format != "raw") else {
        let inner = Box::new(RawFileSource::open(path)?);
        return Ok(Box::new(Fingerprinted { inner, identity }));
    };
    // With a backing file, the content also depends on other files.
    let identity = identity.filter(|_| info.backing_file.is_none());
    let inner = Box::new(LazyNbdSource {
        path: path.to_owned(),
        format,
        size: info.virtual_size,
        connections: opts.connections,
        check: opts.check,
        bitmap: opts.bitmap.clone(),
        source: Mutex::new(None),
    });
    if !opts.lazy {
        inner.started()?;
    }
    Ok(Box::new(Fingerprinted { inner, identity }))
}

/// Refuses with [`Error::InUse`] an image that another process holds open
/// for writing, as QEMU's image locks tell (a running VM, `qemu-io`): a
/// running VM is backed up through its QMP socket, never as an offline
/// image. An image that cannot be opened passes, for qemu-img to explain.
pub fn check_not_in_use(path: &Path) -> Result<()> {
    match std::fs::File::open(path) {
        Ok(_) => lock::check_path(path, lock::Use::Reading),
        Err(_) => Ok(()),
    }
}

/// Refuses a bitmap that `qemu-img info` does not list, or lists as
/// inconsistent, before any process is started.
fn check_bitmap(path: &Path, info: Option<&img::ImageInfo>, bitmap: &str) -> Result<()> {
    img::check_bitmap_name(bitmap).map_err(|e| e.for_image(path))?;
    let found = info.and_then(|i| i.bitmap(bitmap));
    let problem = match found {
        None => "the image has no such persistent dirty bitmap",
        Some(b) if !b.is_consistent() => {
            "it is inconsistent (flag in-use: the image was not closed cleanly while it was recording)"
        }
        Some(_) => return Ok(()),
    };
    Err(
        Error::InvalidRequest(format!("cannot read dirty bitmap '{bitmap}': {problem}"))
            .for_image(path),
    )
}

/// An [`NbdSource`] started on the first read: a disk that the backup
/// skips (unchanged since the last snapshot) costs neither a
/// `qemu-img check` nor a `qemu-nbd` process.
struct LazyNbdSource {
    path: PathBuf,
    format: String,
    size: u64,
    connections: u32,
    check: bool,
    bitmap: Option<String>,
    source: Mutex<Option<Arc<NbdSource>>>,
}

impl LazyNbdSource {
    fn started(&self) -> Result<Arc<NbdSource>> {
        let mut slot = self.source.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(source) = slot.as_ref() {
            return Ok(Arc::clone(source));
        }
        if self.check {
            img::check(&self.path, &self.format)?;
        }
        let opts = QemuNbdOptions {
            format: Some(self.format.clone()),
            read_only: true,
            shared: self.connections,
            bitmap: self.bitmap.clone(),
            ..QemuNbdOptions::new(&self.path)
        };
        let server = QemuNbd::start(&opts)?;
        let source = Arc::new(NbdSource::from_server(server, self.connections)?);
        if source.virtual_size() != self.size {
            return Err(Error::InvalidRequest(format!(
                "{}: qemu-img reported {} bytes but qemu-nbd serves {}; was the image changed?",
                self.path.display(),
                self.size,
                source.virtual_size()
            )));
        }
        *slot = Some(Arc::clone(&source));
        Ok(source)
    }
}

impl DiskSource for LazyNbdSource {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> &str {
        &self.format
    }

    fn open_reader(&self) -> std::io::Result<Box<dyn vbackup_core::source::DiskReader>> {
        self.started()?.open_reader()
    }
}

/// A regular file's fingerprint: device, inode, size, mtime and ctime in
/// nanoseconds. `None` for block devices (writes do not change their
/// times) and anything that cannot be inspected.
pub fn file_identity(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    meta.is_file().then(|| {
        format!(
            "file:{}:{}:{}:{}.{}:{}.{}",
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec()
        )
    })
}

/// A source with the fingerprint of the file it was opened from.
struct Fingerprinted {
    inner: Box<dyn DiskSource>,
    identity: Option<String>,
}

impl DiskSource for Fingerprinted {
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }

    fn format(&self) -> &str {
        self.inner.format()
    }

    fn open_reader(&self) -> std::io::Result<Box<dyn vbackup_core::source::DiskReader>> {
        self.inner.open_reader()
    }

    fn identity(&self) -> Option<String> {
        self.identity.clone()
    }
}

/// Creates a restore target of `format` and `size` bytes at `path`
/// (replacing any file there): `raw` is written directly as a sparse file,
/// anything else through `qemu-img create` and a writable `qemu-nbd`.
pub fn create_target(path: &Path, format: &str, size: u64) -> Result<Box<dyn DiskTarget>> {
    create_target_with(path, format, size, DEFAULT_CONNECTIONS)
}

/// [`create_target`] allowing up to `connections` writers at once.
pub fn create_target_with(
    path: &Path,
    format: &str,
    size: u64,
    connections: u32,
) -> Result<Box<dyn DiskTarget>> {
    img::check_format(format).map_err(|e| e.for_image(path))?;
    if format == "raw" {
        Ok(Box::new(RawFileTarget::create(path, size)?))
    } else {
        Ok(Box::new(NbdTarget::create(
            path,
            format,
            size,
            connections,
        )?))
    }
}

/// Appends an extent, merging it into the previous one when adjacent and
/// of the same kind.
pub(crate) fn push_extent(out: &mut Vec<Extent>, offset: u64, length: u64, kind: ExtentKind) {
    if length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.kind == kind && last.end() == offset {
            last.length += length;
            return;
        }
    }
    out.push(Extent {
        offset,
        length,
        kind,
    });
}

/// Counts open readers or writers against a connection limit.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    used: Arc<AtomicU32>,
    limit: u32,
}

/// One taken slot, given back on drop.
#[derive(Debug)]
pub(crate) struct Slot(Arc<AtomicU32>);

impl Slots {
    pub(crate) fn new(limit: u32) -> Self {
        Slots {
            used: Arc::new(AtomicU32::new(0)),
            limit: limit.max(1),
        }
    }

    /// Takes a slot. Fails instead of blocking: qemu-nbd would leave an
    /// extra connection hanging in its accept queue.
    pub(crate) fn take(&self) -> Result<Slot> {
        let limit = self.limit;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .map(|_| Slot(Arc::clone(&self.used)))
            .map_err(|_| {
                Error::Internal(format!(
                    "all {limit} connections to the NBD server are in use; open fewer readers or allow more connections"
                ))
            })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_extent_merges_adjacent_same_kind() {
        let mut v = Vec::new();
        push_extent(&mut v, 0, 10, ExtentKind::Data);
        push_extent(&mut v, 10, 5, ExtentKind::Data);
        push_extent(&mut v, 15, 0, ExtentKind::Zero);
        push_extent(&mut v, 15, 5, ExtentKind::Zero);
        push_extent(&mut v, 20, 5, ExtentKind::Zero);
        assert_eq!(
            v,
            vec![
                Extent {
                    offset: 0,
                    length: 15,
                    kind: ExtentKind::Data
                },
                Extent {
                    offset: 15,
                    length: 10,
                    kind: ExtentKind::Zero
                },
            ]
        );
    }

    #[test]
    fn slots_refuse_past_the_limit_and_come_back() {
        let slots = Slots::new(2);
        let a = slots.take().unwrap();
        let _b = slots.take().unwrap();
        let err = slots.take().unwrap_err().to_string();
        assert!(err.contains("all 2 connections"), "{err}");
        drop(a);
        assert!(slots.take().is_ok());
    }
}
