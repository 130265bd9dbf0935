//! Disks behind a private `qemu-nbd`: any format qemu reads or writes.

use std::any::Any;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vbackup_core::source::{DiskReader, DiskSource, DiskTarget, DiskWriter, Extent, ExtentKind};

use super::lock::{self, Use};
use super::raw::PRIVATE_FILE_MODE;
use super::{push_extent, Slot, Slots};
use crate::error::{Error, Result};
use crate::img;
use crate::nbd::proto::{NBD_STATE_DIRTY, NBD_STATE_ZERO};
use crate::nbd::{dirty_bitmap_context, ConnectOptions, NbdClient, BASE_ALLOCATION};
use crate::qemu_nbd::{QemuNbd, QemuNbdOptions};

/// A disk image served read-only by `qemu-nbd`; each reader is its own NBD
/// connection. With a bitmap (`qemu-nbd --bitmap`), readers answer
/// [`DiskReader::changed`] from it.
#[derive(Debug)]
pub struct NbdSource {
    server: Arc<QemuNbd>,
    size: u64,
    slots: Slots,
}

impl NbdSource {
    /// Serves `path` (of `format`) read-only to up to `connections` readers.
    pub fn open(path: &Path, format: &str, connections: u32) -> Result<Self> {
        let opts = QemuNbdOptions {
            format: Some(format.to_owned()),
            read_only: true,
            shared: connections,
            ..QemuNbdOptions::new(path)
        };
        Self::from_server(QemuNbd::start(&opts)?, connections)
    }

    /// Wraps a running server that accepts `connections` clients. If it
    /// serves a bitmap, the bitmap's metadata context must be offered.
    pub fn from_server(server: QemuNbd, connections: u32) -> Result<Self> {
        let size = ExportSpec::of_server(&server)
            .connect()
            .map_err(|e| e.for_image(server.image_path()))?
            .client
            .size();
        Ok(NbdSource {
            server: Arc::new(server),
            size,
            slots: Slots::new(connections),
        })
    }

    /// The qemu-nbd process behind this source.
    pub fn server(&self) -> &QemuNbd {
        &self.server
    }
}

impl DiskSource for NbdSource {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> &str {
        self.server.format()
    }

    fn open_reader(&self) -> io::Result<Box<dyn DiskReader>> {
        let slot = self.slots.take()?;
        let connection = ExportSpec::of_server(&self.server).connect()?;
        let keep: Arc<dyn Any + Send + Sync> = Arc::clone(&self.server) as _;
        Ok(Box::new(ExportReader::new(connection, slot, Some(keep))))
    }
}

/// Where to find an NBD export and which bitmap to read from it.
#[derive(Debug, Clone)]
pub(crate) struct ExportSpec<'a> {
    pub(crate) socket: &'a Path,
    pub(crate) export: &'a str,
    pub(crate) bitmap: Option<&'a str>,
}

/// A negotiated connection and the ids of its metadata contexts.
pub(crate) struct Connection {
    pub(crate) client: NbdClient,
    allocation: Option<u32>,
    dirty: Option<u32>,
}

impl<'a> ExportSpec<'a> {
    fn of_server(server: &'a QemuNbd) -> Self {
        ExportSpec {
            socket: server.socket_path(),
            export: "",
            bitmap: server.bitmap(),
        }
    }

    /// Connects, selecting `base:allocation` and the bitmap's context. A
    /// bitmap the server does not offer is an error: reading "nothing
    /// changed" from a missing bitmap would silently lose data.
    pub(crate) fn connect(&self) -> Result<Connection> {
        let mut meta_contexts = vec![BASE_ALLOCATION.to_owned()];
        meta_contexts.extend(self.bitmap.map(dirty_bitmap_context));
        let opts = ConnectOptions {
            export_name: self.export.to_owned(),
            meta_contexts,
            ..ConnectOptions::default()
        };
        let client = NbdClient::connect_unix(self.socket, &opts)?;
        let dirty = match self.bitmap {
            None => None,
            Some(name) => Some(client.context_id(&dirty_bitmap_context(name)).ok_or_else(
                || Error::MissingBitmap {
                    export: self.export.to_owned(),
                    bitmap: name.to_owned(),
                },
            )?),
        };
        Ok(Connection {
            allocation: client.context_id(BASE_ALLOCATION),
            dirty,
            client,
        })
    }
}

/// One NBD connection reading an export: data, holes from
/// `base:allocation`, changes from a dirty bitmap.
pub(crate) struct ExportReader {
    client: NbdClient,
    /// The `base:allocation` context id, if the server offers it.
    allocation: Option<u32>,
    /// The dirty bitmap's context id, when reading one.
    dirty: Option<u32>,
    /// The dirty ranges of the last window of the bitmap asked for.
    dirty_window: Option<DirtyWindow>,
    _slot: Slot,
    /// Keeps whatever serves the export (a qemu-nbd) alive.
    _keep: Option<Arc<dyn Any + Send + Sync>>,
}

impl ExportReader {
    pub(crate) fn new(
        connection: Connection,
        slot: Slot,
        keep: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Self {
        ExportReader {
            client: connection.client,
            allocation: connection.allocation,
            dirty: connection.dirty,
            dirty_window: None,
            _slot: slot,
            _keep: keep,
        }
    }
}

/// How much of a dirty bitmap one query fetches. A backup asks about
/// every chunk in turn; one block-status round trip per GiB instead of one
/// per chunk saves ~50 ms on a 4 GiB disk, and the answer (at most one
/// range per bitmap granule that changed) stays small.
const DIRTY_WINDOW: u64 = 1 << 30;

/// The dirty ranges of `[start, end)` of an exported bitmap, which does
/// not change while it is exported (a stopped image, or a live backup's
/// frozen bitmap).
struct DirtyWindow {
    start: u64,
    end: u64,
    /// Dirty `(offset, end)` ranges, sorted, not overlapping.
    dirty: Vec<(u64, u64)>,
}

impl DirtyWindow {
    fn covers(&self, offset: u64, length: u64) -> bool {
        offset >= self.start && offset + length <= self.end
    }

    fn any_dirty(&self, offset: u64, length: u64) -> bool {
        let end = offset + length;
        let first = self.dirty.partition_point(|(_, e)| *e <= offset);
        self.dirty.get(first).is_some_and(|(s, _)| *s < end)
    }
}

/// `base:allocation` flags → extent kind: only "reads as zeroes" may be
/// skipped; a hole without `NBD_STATE_ZERO` has unknown content.
fn allocation_kind(flags: u32) -> ExtentKind {
    if flags & NBD_STATE_ZERO != 0 {
        ExtentKind::Zero
    } else {
        ExtentKind::Data
    }
}

impl DiskReader for ExportReader {
    fn extents(&mut self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let mut out = Vec::new();
        let Some(context) = self.allocation else {
            push_extent(&mut out, offset, length, ExtentKind::Data);
            return Ok(out);
        };
        if length > 0 {
            self.client.for_each_extent(context, offset, length, |e| {
                push_extent(&mut out, e.offset, e.length, allocation_kind(e.flags));
                Ok(())
            })?;
        }
        Ok(out)
    }

    /// One block status request per 2 GiB (qemu describes a long hole in
    /// a few extents), stopping after the reply that brings the count to
    /// `max_extents`.
    fn extents_from(
        &mut self,
        offset: u64,
        length: u64,
        max_extents: usize,
    ) -> io::Result<Vec<Extent>> {
        let mut out = Vec::new();
        let Some(context) = self.allocation else {
            push_extent(&mut out, offset, length, ExtentKind::Data);
            return Ok(out);
        };
        if length > 0 {
            self.client
                .for_each_extent_while(context, offset, length, |e| {
                    push_extent(&mut out, e.offset, e.length, allocation_kind(e.flags));
                    Ok(out.len() < max_extents)
                })?;
        }
        Ok(out)
    }

    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Ok(self.client.read_at(buf, offset)?)
    }

    /// Whether any extent of the bitmap in the range is dirty, answered
    /// from a window of [`DIRTY_WINDOW`] bytes fetched at once.
    fn changed(&mut self, offset: u64, length: u64) -> io::Result<Option<bool>> {
        let Some(context) = self.dirty else {
            return Ok(None);
        };
        if length == 0 {
            return Ok(Some(false));
        }
        if !self
            .dirty_window
            .as_ref()
            .is_some_and(|w| w.covers(offset, length))
        {
            let window_end = self
                .client
                .size()
                .min(offset.saturating_add(DIRTY_WINDOW))
                .max(offset + length);
            let mut dirty: Vec<(u64, u64)> = Vec::new();
            self.client
                .for_each_extent(context, offset, window_end - offset, |e| {
                    if e.flags & NBD_STATE_DIRTY != 0 {
                        match dirty.last_mut() {
                            Some(last) if last.1 == e.offset => last.1 = e.end(),
                            _ => dirty.push((e.offset, e.end())),
                        }
                    }
                    Ok(())
                })?;
            self.dirty_window = Some(DirtyWindow {
                start: offset,
                end: window_end,
                dirty,
            });
        }
        Ok(self
            .dirty_window
            .as_ref()
            .map(|w| w.any_dirty(offset, length)))
    }

    /// The dirty ranges of the whole range from the bitmap, one block
    /// status request per 2 GiB.
    fn changed_ranges(
        &mut self,
        offset: u64,
        length: u64,
        _granule: u64,
    ) -> io::Result<Option<Vec<(u64, u64)>>> {
        let Some(context) = self.dirty else {
            return Ok(None);
        };
        let mut dirty: Vec<(u64, u64)> = Vec::new();
        if length > 0 {
            self.client.for_each_extent(context, offset, length, |e| {
                if e.flags & NBD_STATE_DIRTY != 0 {
                    match dirty.last_mut() {
                        Some(last) if last.1 == e.offset => last.1 = e.end(),
                        _ => dirty.push((e.offset, e.end())),
                    }
                }
                Ok(())
            })?;
        }
        Ok(Some(dirty))
    }
}

/// A new image written through a writable `qemu-nbd`; each writer is its
/// own NBD connection.
#[derive(Debug)]
pub struct NbdTarget {
    server: Mutex<Option<QemuNbd>>,
    socket: PathBuf,
    path: PathBuf,
    slots: Slots,
}

impl NbdTarget {
    /// Creates an image of `format` and `size` bytes with `qemu-img create`
    /// (replacing any file at `path`) and serves it writable to up to
    /// `connections` writers, passing discards and zero writes through as
    /// holes. The image is its owner's alone (mode 0600); an existing file
    /// that another process uses (QEMU's image locks) is refused with
    /// [`Error::InUse`] and left untouched.
    pub fn create(path: &Path, format: &str, size: u64, connections: u32) -> Result<Self> {
        make_private_file(path)?;
        img::create(path, format, size)?;
        // qemu-img keeps an existing file's mode; set it again in case it
        // made a new one.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))
            .map_err(|e| Error::io("setting the image's mode", e).for_image(path))?;
        let opts = QemuNbdOptions {
            format: Some(format.to_owned()),
            read_only: false,
            shared: connections,
            unmap_zeroes: true,
            // `finish` fsyncs the image once qemu-nbd has closed it.
            unsafe_cache: true,
            ..QemuNbdOptions::new(path)
        };
        let server = QemuNbd::start(&opts)?;
        let served = server.connect().map_err(|e| e.for_image(path))?.size();
        if served < size {
            return Err(Error::InvalidRequest(format!(
                "qemu-nbd serves {served} bytes, less than the {size} bytes asked for"
            ))
            .for_image(path));
        }
        Ok(NbdTarget {
            socket: server.socket_path().to_owned(),
            server: Mutex::new(Some(server)),
            path: path.to_owned(),
            slots: Slots::new(connections),
        })
    }

    /// The image being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn take_server(&self) -> Option<QemuNbd> {
        match self.server.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }

    fn is_running(&self) -> bool {
        match self.server.lock() {
            Ok(guard) => guard.is_some(),
            Err(poisoned) => poisoned.into_inner().is_some(),
        }
    }
}

impl DiskTarget for NbdTarget {
    /// 64 KiB, qcow2's default cluster (and vmdk's grain): smaller zero
    /// runs inside a written cluster would be allocated anyway, and each
    /// run written is one NBD request.
    fn hole_granularity(&self) -> usize {
        64 << 10
    }

    fn open_writer(&self) -> io::Result<Box<dyn DiskWriter>> {
        if !self.is_running() {
            return Err(Error::Internal("the restore target is already finished".into()).into());
        }
        let slot = self.slots.take()?;
        let client = NbdClient::connect_unix(&self.socket, &Default::default())?;
        Ok(Box::new(NbdWriter {
            client,
            _slot: slot,
        }))
    }

    /// Flushes through a last connection, then stops qemu-nbd cleanly so
    /// the image is closed (qcow2 metadata written, dirty flag cleared),
    /// then fsyncs the image and its folder: qemu-nbd runs with
    /// `--cache=unsafe` (see [`QemuNbdOptions::unsafe_cache`]), so this
    /// one fsync is what makes the restore durable.
    fn finish(&self) -> io::Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let slot = self.slots.take().map_err(|_| {
            Error::Internal("finish() called while all writers are still open".into())
        })?;
        let Some(server) = self.take_server() else {
            return Ok(());
        };
        let result = server.connect().and_then(|mut client| {
            client.flush()?;
            client.disconnect()
        });
        drop(slot);
        let stopped = server.stop();
        result
            .and(stopped)
            .and_then(|()| sync_closed_image(&self.path))
            .map_err(|e| e.for_image(&self.path).into())
    }
}

/// One NBD connection writing a [`NbdTarget`].
struct NbdWriter {
    client: NbdClient,
    _slot: Slot,
}

impl DiskWriter for NbdWriter {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        Ok(self.client.write_at(buf, offset)?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(self.client.flush()?)
    }
}

/// Makes a closed image file and its directory entry durable.
fn sync_closed_image(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(|e| Error::io("syncing", e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Directories cannot be fsynced on every file system; best effort.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Creates `path` empty with mode 0600 for `qemu-img create` to fill, or,
/// if it exists, checks that no other process uses it and sets its mode;
/// a symbolic link is refused.
fn make_private_file(path: &Path) -> Result<()> {
    if path.exists() {
        lock::check_path(path, Use::Writing)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .and_then(|file| file.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE_MODE)))
        .map_err(|e| Error::io("creating", e).for_image(path))
}

#[cfg(test)]
mod tests {
    use super::DirtyWindow;

    #[test]
    fn ranges_touching_a_dirty_range_are_dirty() {
        let w = DirtyWindow {
            start: 0,
            end: 100,
            dirty: vec![(10, 20), (50, 60)],
        };
        assert!(!w.any_dirty(0, 10));
        assert!(w.any_dirty(0, 11));
        assert!(w.any_dirty(19, 1));
        assert!(!w.any_dirty(20, 30));
        assert!(w.any_dirty(20, 31));
        assert!(!w.any_dirty(60, 40));
        assert!(w.covers(0, 100) && !w.covers(50, 51));
    }
}
