//! The overlay of a writable export: where a served snapshot's writes go.
//!
//! `vbackup serve --writable --overlay FILE` lets a guest (or any NBD
//! client) write to a disk served from a snapshot. The repository is never
//! written: the writes land in a local sparse file, and reads see them over
//! the snapshot. `vbackup serve --commit-overlay FILE` later turns what was
//! written into a new snapshot, so what a recovered VM wrote is never lost.
//!
//! File format, version 1 (all integers little-endian; see
//! `docs/formats.md`, "Overlay files"):
//!
//! ```text
//! 0      16  magic "vbackup-overlay\n"
//! 16      4  version (1)
//! 20      4  block size (4096)
//! 24      8  virtual size of the disk
//! 32      8  offset of the bitmap (4096)
//! 40      8  offset of the data (a MiB multiple past the bitmap)
//! 48      4  length N of the origin (JSON)
//! 52      N  origin: {"repository", "snapshot", "disk", "created"}
//! 4064   32  BLAKE3 of bytes 0..4064
//! 4096       bitmap: bit b (byte b/8, bit b%8) set = block b was written
//! data       block b at data offset + b * block size; unwritten blocks
//!            are never written (holes)
//! ```
//!
//! Why a bitmap and not the file's own holes: a copy (`cp`, `rsync -S`)
//! may turn blocks of zeros that the guest *wrote* into holes, and those
//! must still read as written zeros, not as the snapshot's bytes. The
//! bitmap is held in memory as 4 KiB pages, only those with a bit set (a
//! page covers 128 MiB of disk), so memory follows what was written, not
//! the disk's size.
//!
//! Durability follows NBD's: a write is durable after a flush (or a write
//! with FUA). A flush makes the data durable, then writes the changed
//! bitmap pages and makes them durable, so a crash never leaves a block
//! marked written whose data did not reach the disk.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::reader::SnapshotDiskReader;
use crate::{Error, Repository, Result};

/// The 16 bytes an overlay file starts with.
pub const OVERLAY_MAGIC: &[u8; 16] = b"vbackup-overlay\n";
/// The overlay format version this build reads and writes.
pub const OVERLAY_VERSION: u32 = 1;
/// Bytes of one overlay block: the unit of the bitmap.
pub const OVERLAY_BLOCK: u32 = 4096;
/// Bytes of the header.
const HEADER_LEN: usize = 4096;
/// Where the header's checksum is.
const CHECKSUM_AT: usize = HEADER_LEN - 32;
/// Bytes of one bitmap page (and blocks it covers: 8 per byte).
const PAGE: usize = 4096;
const BLOCKS_PER_PAGE: u64 = (PAGE * 8) as u64;
/// Data starts on a MiB boundary.
const DATA_ALIGN: u64 = 1 << 20;
/// The largest origin record.
const MAX_ORIGIN: usize = CHECKSUM_AT - 52;

/// Which disk of which snapshot an overlay belongs to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OverlayOrigin {
    /// The repository's id (its config's `id`).
    pub repository: String,
    /// The snapshot's full id.
    pub snapshot: String,
    /// The disk's name in the snapshot.
    pub disk: String,
    /// When the overlay was created (RFC 3339).
    pub created: String,
}

impl OverlayOrigin {
    /// The origin of an overlay created now over `disk` of `snapshot`.
    pub fn now(repo: &Repository, snapshot: &str, disk: &str) -> Self {
        Self {
            repository: repo.config().id.clone(),
            snapshot: snapshot.to_string(),
            disk: disk.to_string(),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }
}

/// An overlay file's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayHeader {
    /// Format version.
    pub version: u32,
    /// Block size of the bitmap.
    pub block_size: u32,
    /// Size of the disk.
    pub virtual_size: u64,
    /// Where the bitmap starts.
    pub bitmap_offset: u64,
    /// Where the data starts.
    pub data_offset: u64,
    /// What it belongs to.
    pub origin: OverlayOrigin,
}

impl OverlayHeader {
    fn new(virtual_size: u64, origin: OverlayOrigin) -> Self {
        let blocks = virtual_size.div_ceil(u64::from(OVERLAY_BLOCK));
        let bitmap_len = blocks.div_ceil(8).div_ceil(PAGE as u64) * PAGE as u64;
        let data_offset = (HEADER_LEN as u64 + bitmap_len).div_ceil(DATA_ALIGN) * DATA_ALIGN;
        Self {
            version: OVERLAY_VERSION,
            block_size: OVERLAY_BLOCK,
            virtual_size,
            bitmap_offset: HEADER_LEN as u64,
            data_offset,
            origin,
        }
    }

    /// The header's bytes.
    fn encode(&self) -> Result<[u8; HEADER_LEN]> {
        let origin = serde_json::to_vec(&self.origin)
            .map_err(|e| Error::internal(format!("encoding an overlay origin: {e}")))?;
        if origin.len() > MAX_ORIGIN {
            return Err(Error::InvalidInput(format!(
                "the overlay's origin record is {} bytes, over {MAX_ORIGIN} (a disk name that long?)",
                origin.len()
            )));
        }
        let mut out = [0u8; HEADER_LEN];
        out[..16].copy_from_slice(OVERLAY_MAGIC);
        out[16..20].copy_from_slice(&self.version.to_le_bytes());
        out[20..24].copy_from_slice(&self.block_size.to_le_bytes());
        out[24..32].copy_from_slice(&self.virtual_size.to_le_bytes());
        out[32..40].copy_from_slice(&self.bitmap_offset.to_le_bytes());
        out[40..48].copy_from_slice(&self.data_offset.to_le_bytes());
        out[48..52].copy_from_slice(&(origin.len() as u32).to_le_bytes());
        out[52..52 + origin.len()].copy_from_slice(&origin);
        let sum = blake3::hash(&out[..CHECKSUM_AT]);
        out[CHECKSUM_AT..].copy_from_slice(sum.as_bytes());
        Ok(out)
    }

    /// Parses and checks a header; `path` names the file in errors. Every
    /// field is range-checked: an overlay is a local file, but it may have
    /// been damaged or be something else altogether.
    pub fn decode(path: &str, bytes: &[u8]) -> Result<Self> {
        let bad = |reason: &str| Error::corrupt(path, format!("is not a usable overlay: {reason}"));
        if bytes.len() < HEADER_LEN || &bytes[..16] != OVERLAY_MAGIC {
            return Err(bad("it does not start with the overlay magic"));
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(16);
        if version != OVERLAY_VERSION {
            return Err(Error::UnsupportedVersion {
                what: format!("overlay {path}"),
                found: version,
                supported: OVERLAY_VERSION,
            });
        }
        if blake3::hash(&bytes[..CHECKSUM_AT]).as_bytes() != &bytes[CHECKSUM_AT..HEADER_LEN] {
            return Err(bad("its header checksum does not match"));
        }
        let origin_len = u32_at(48) as usize;
        if origin_len > MAX_ORIGIN {
            return Err(bad("its origin record is too long"));
        }
        let origin: OverlayOrigin = serde_json::from_slice(&bytes[52..52 + origin_len])
            .map_err(|e| bad(&format!("its origin record does not parse: {e}")))?;
        let header = Self::new(u64_at(24), origin);
        let stored = (u32_at(20), u64_at(32), u64_at(40));
        if stored != (header.block_size, header.bitmap_offset, header.data_offset) {
            return Err(bad("its block size or layout is not what version 1 writes"));
        }
        Ok(header)
    }

    /// Reads the header of the overlay file at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(local("opening the overlay", path))?;
        let mut bytes = vec![0u8; HEADER_LEN];
        read_full_at(&file, &mut bytes, 0).map_err(local("reading the overlay", path))?;
        Self::decode(&path.display().to_string(), &bytes)
    }
}

/// Reads as much of `buf` as the file holds at `offset`, zeros past its
/// end (an overlay's data region is sparse and may end early).
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// An error constructor for a local file operation.
fn local<'a>(what: &'static str, path: &'a Path) -> impl Fn(io::Error) -> Error + 'a {
    move |source| Error::LocalFile {
        what: what.to_string(),
        path: path.display().to_string(),
        source,
    }
}

/// The bitmap in memory: pages with a bit set, and those changed since
/// the last flush.
#[derive(Default)]
struct Bitmap {
    pages: BTreeMap<u64, Box<[u8]>>,
    dirty: BTreeSet<u64>,
}

impl Bitmap {
    fn is_set(&self, block: u64) -> bool {
        let (page, bit) = (block / BLOCKS_PER_PAGE, block % BLOCKS_PER_PAGE);
        self.pages
            .get(&page)
            .is_some_and(|p| p[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
    }

    fn set(&mut self, block: u64) {
        let (page, bit) = (block / BLOCKS_PER_PAGE, block % BLOCKS_PER_PAGE);
        let bytes = self
            .pages
            .entry(page)
            .or_insert_with(|| vec![0u8; PAGE].into_boxed_slice());
        bytes[(bit / 8) as usize] |= 1 << (bit % 8);
        self.dirty.insert(page);
    }
}

/// A disk served from a snapshot with its writes kept in an overlay file.
/// Shared by every connection (`&self`); writes are serialised, reads are
/// not.
pub struct Overlay {
    path: PathBuf,
    file: File,
    header: OverlayHeader,
    base: Arc<SnapshotDiskReader>,
    bitmap: Mutex<Bitmap>,
    /// Held by a write for its whole duration: a partial block is read,
    /// merged and written back without another write in between.
    writing: Mutex<()>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("path", &self.path)
            .field("origin", &self.header.origin)
            .finish()
    }
}

impl Overlay {
    /// Opens the overlay at `path` over `base`, creating it (0600) when it
    /// does not exist. An existing overlay must belong to `origin`'s
    /// repository, snapshot and disk: serving it again goes on where it
    /// stopped.
    pub fn open_or_create(
        path: &Path,
        base: Arc<SnapshotDiskReader>,
        origin: OverlayOrigin,
    ) -> Result<Self> {
        match path
            .try_exists()
            .map_err(local("looking for the overlay", path))?
        {
            true => {
                let overlay = Self::open(path, base)?;
                let found = &overlay.header.origin;
                if (&found.repository, &found.snapshot, &found.disk)
                    != (&origin.repository, &origin.snapshot, &origin.disk)
                {
                    return Err(Error::InvalidInput(format!(
                        "overlay {} belongs to disk '{}' of snapshot {} (repository {}), not to disk '{}' of snapshot {}; give another --overlay path",
                        path.display(),
                        found.disk,
                        found.snapshot,
                        found.repository,
                        origin.disk,
                        origin.snapshot
                    )));
                }
                Ok(overlay)
            }
            false => Self::create(path, base, origin),
        }
    }

    fn create(path: &Path, base: Arc<SnapshotDiskReader>, origin: OverlayOrigin) -> Result<Self> {
        let header = OverlayHeader::new(base.size(), origin);
        let bytes = header.encode()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(local("creating the overlay", path))?;
        file.write_all_at(&bytes, 0)
            .and_then(|()| file.sync_all())
            .map_err(local("writing the overlay", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            header,
            base,
            bitmap: Mutex::new(Bitmap::default()),
            writing: Mutex::new(()),
        })
    }

    /// Opens an existing overlay over `base`, which must be its disk (same
    /// name and size).
    pub fn open(path: &Path, base: Arc<SnapshotDiskReader>) -> Result<Self> {
        let header = OverlayHeader::read(path)?;
        if header.virtual_size != base.size() || header.origin.disk != base.name() {
            return Err(Error::InvalidInput(format!(
                "overlay {} is for disk '{}' of {} bytes, not for disk '{}' of {} bytes",
                path.display(),
                header.origin.disk,
                header.virtual_size,
                base.name(),
                base.size()
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(local("opening the overlay", path))?;
        let bitmap = load_bitmap(&file, &header).map_err(local("reading the overlay", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            header,
            base,
            bitmap: Mutex::new(bitmap),
            writing: Mutex::new(()),
        })
    }

    /// The overlay's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its header.
    pub fn header(&self) -> &OverlayHeader {
        &self.header
    }

    /// The snapshot disk it lies over.
    pub fn base(&self) -> &Arc<SnapshotDiskReader> {
        &self.base
    }

    /// Size of the disk.
    pub fn size(&self) -> u64 {
        self.header.virtual_size
    }

    fn bitmap(&self) -> MutexGuard<'_, Bitmap> {
        self.bitmap.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<u64> {
        offset
            .checked_add(length)
            .filter(|end| *end <= self.size())
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{length} bytes at {offset} go past the end of disk '{}' ({} bytes)",
                    self.header.origin.disk,
                    self.size()
                ))
            })
    }

    /// Reads the disk as written: written blocks from the overlay, the
    /// rest from the snapshot.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = self.check_range(offset, buf.len() as u64)?;
        let block = u64::from(OVERLAY_BLOCK);
        let mut pos = offset;
        while pos < end {
            let written = self.bitmap().is_set(pos / block);
            // The run of blocks with the same state.
            let mut run_end = ((pos / block) + 1) * block;
            {
                let bitmap = self.bitmap();
                while run_end < end && bitmap.is_set(run_end / block) == written {
                    run_end += block;
                }
            }
            let run_end = run_end.min(end);
            let out = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            match written {
                true => read_full_at(&self.file, out, self.header.data_offset + pos)
                    .map_err(local("reading the overlay", &self.path))?,
                false => self.base.read_at(pos, out)?,
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the overlay (never the repository).
    /// Blocks only partly covered are completed from what the disk holds
    /// there first.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let end = self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let block = u64::from(OVERLAY_BLOCK);
        let (first, last) = (offset / block, (end - 1) / block);
        let aligned_start = first * block;
        let aligned_end = ((last + 1) * block).min(self.size());
        let write = |bytes: &[u8], at: u64| {
            self.file
                .write_all_at(bytes, self.header.data_offset + at)
                .map_err(local("writing the overlay", &self.path))
        };
        if aligned_start == offset && aligned_end == end {
            write(data, offset)?;
        } else {
            // Complete the edge blocks from the current content.
            let mut head = vec![0u8; (aligned_end - aligned_start) as usize];
            let edges = [
                (aligned_start, (aligned_start + block).min(aligned_end)),
                (last * block, aligned_end),
            ];
            for (from, to) in edges {
                self.read_at(
                    from,
                    &mut head[(from - aligned_start) as usize..(to - aligned_start) as usize],
                )?;
            }
            head[(offset - aligned_start) as usize..(end - aligned_start) as usize]
                .copy_from_slice(data);
            write(&head, aligned_start)?;
        }
        let mut bitmap = self.bitmap();
        (first..=last).for_each(|b| bitmap.set(b));
        Ok(())
    }

    /// Makes `length` bytes at `offset` read as zeros.
    pub fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.check_range(offset, length)?;
        const PIECE: u64 = 1 << 20;
        let zeros = vec![0u8; PIECE.min(length) as usize];
        let mut done = 0;
        while done < length {
            let n = PIECE.min(length - done);
            self.write_at(offset + done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Makes everything written so far durable: the data, then the bitmap
    /// pages that changed.
    pub fn flush(&self) -> Result<()> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        self.file
            .sync_data()
            .map_err(local("flushing the overlay", &self.path))?;
        let mut bitmap = self.bitmap();
        let dirty = std::mem::take(&mut bitmap.dirty);
        for page in &dirty {
            if let Some(bytes) = bitmap.pages.get(page) {
                let at = self.header.bitmap_offset + page * PAGE as u64;
                self.file
                    .write_all_at(bytes, at)
                    .map_err(local("writing the overlay's bitmap", &self.path))?;
            }
        }
        drop(bitmap);
        self.file
            .sync_data()
            .map_err(local("flushing the overlay", &self.path))
    }

    /// The written parts of the disk, as sorted `(start, end)` byte ranges
    /// (block-aligned, the last clipped to the disk's end).
    pub fn written(&self) -> Vec<(u64, u64)> {
        let bitmap = self.bitmap();
        let block = u64::from(OVERLAY_BLOCK);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (page, bytes) in &bitmap.pages {
            for (at, byte) in bytes.iter().enumerate().filter(|(_, b)| **b != 0) {
                for bit in (0..8).filter(|bit| byte & (1 << bit) != 0) {
                    let b = page * BLOCKS_PER_PAGE + at as u64 * 8 + bit;
                    let (start, end) = (b * block, ((b + 1) * block).min(self.size()));
                    match ranges.last_mut() {
                        Some(last) if last.1 == start => last.1 = end,
                        _ => ranges.push((start, end)),
                    }
                }
            }
        }
        ranges
    }
}

/// A disk of a served snapshot as a backup source: the snapshot's disk
/// with, when it has one, its overlay's writes on top. It tracks changes:
/// what the overlay wrote is what changed since the snapshot, so
/// committing reads only that and reuses the rest of the snapshot's index.
pub struct CommitSource {
    base: Arc<SnapshotDiskReader>,
    overlay: Option<Arc<Overlay>>,
    format: String,
}

impl CommitSource {
    /// The disk `base` with the writes of `overlay` (which must lie over
    /// the same disk).
    pub fn new(base: Arc<SnapshotDiskReader>, overlay: Option<Arc<Overlay>>, format: &str) -> Self {
        Self {
            base,
            overlay,
            format: format.to_string(),
        }
    }
}

impl crate::DiskSource for CommitSource {
    fn virtual_size(&self) -> u64 {
        self.base.size()
    }

    fn format(&self) -> &str {
        &self.format
    }

    fn open_reader(&self) -> io::Result<Box<dyn crate::DiskReader>> {
        Ok(Box::new(CommitReader {
            base: Arc::clone(&self.base),
            overlay: self.overlay.clone(),
            written: self
                .overlay
                .as_ref()
                .map(|o| o.written())
                .unwrap_or_default(),
        }))
    }
}

/// One worker's reader of a [`CommitSource`].
struct CommitReader {
    base: Arc<SnapshotDiskReader>,
    overlay: Option<Arc<Overlay>>,
    /// What the overlay wrote, read once.
    written: Vec<(u64, u64)>,
}

/// A core error as the `io::Error` a disk reader returns, its class kept.
fn as_io(error: Error) -> io::Error {
    let class = error.class();
    crate::Classified::io(io::ErrorKind::Other, class, error)
}

impl crate::DiskReader for CommitReader {
    fn extents(&mut self, offset: u64, length: u64) -> io::Result<Vec<crate::Extent>> {
        use crate::{Extent, ExtentKind};
        let end = offset + length;
        let mut data: Vec<(u64, u64)> = self
            .base
            .regions(offset, length, usize::MAX)
            .into_iter()
            .filter(|r| r.data)
            .map(|r| (r.offset, r.offset + r.length))
            .collect();
        data.extend(
            self.written
                .iter()
                .filter(|(s, e)| *s < end && *e > offset)
                .map(|(s, e)| ((*s).max(offset), (*e).min(end))),
        );
        data.sort_unstable();
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = offset;
        for (start, stop) in data {
            if stop <= pos {
                continue;
            }
            let start = start.max(pos);
            if start > pos {
                extents.push(Extent {
                    offset: pos,
                    length: start - pos,
                    kind: ExtentKind::Zero,
                });
            }
            match extents.last_mut() {
                Some(last) if last.kind == ExtentKind::Data && last.end() == start => {
                    last.length = stop - last.offset;
                }
                _ => extents.push(Extent {
                    offset: start,
                    length: stop - start,
                    kind: ExtentKind::Data,
                }),
            }
            pos = stop;
        }
        if pos < end {
            extents.push(Extent {
                offset: pos,
                length: end - pos,
                kind: ExtentKind::Zero,
            });
        }
        Ok(extents)
    }

    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.overlay {
            Some(overlay) => overlay.read_at(offset, buf),
            None => self.base.read_at(offset, buf),
        }
        .map_err(as_io)
    }

    fn changed(&mut self, offset: u64, length: u64) -> io::Result<Option<bool>> {
        let end = offset + length;
        Ok(Some(
            self.written.iter().any(|(s, e)| *s < end && *e > offset),
        ))
    }

    fn changed_ranges(
        &mut self,
        offset: u64,
        length: u64,
        _granule: u64,
    ) -> io::Result<Option<Vec<(u64, u64)>>> {
        let end = offset + length;
        Ok(Some(
            self.written
                .iter()
                .filter(|(s, e)| *s < end && *e > offset)
                .map(|(s, e)| ((*s).max(offset), (*e).min(end)))
                .collect(),
        ))
    }
}

/// Records `snapshot` with the writes of `overlays` as a new snapshot of
/// the same VM: every disk of the snapshot is in it, those with an overlay
/// as written, the others as they were. Only what the overlays wrote is
/// read and stored; the rest of each index is the snapshot's. The VM
/// definition is the snapshot's; the tags are the snapshot's plus
/// `overlay`. The overlays are left as they are (delete them once the new
/// snapshot is there).
pub fn commit(
    repo: &Arc<Repository>,
    snapshot: &crate::Snapshot,
    overlays: &[Arc<Overlay>],
    threads: usize,
    progress: &crate::Progress,
) -> Result<crate::Snapshot> {
    let map = crate::reader::chunk_locations(repo)?;
    let cache = crate::reader::ChunkCache::new(crate::reader::DEFAULT_CACHE_BYTES);
    for overlay in overlays {
        let origin = &overlay.header().origin;
        if origin.snapshot != snapshot.id || origin.repository != repo.config().id {
            return Err(Error::InvalidInput(format!(
                "overlay {} belongs to snapshot {} of repository {}, not to snapshot {} of this one",
                overlay.path().display(),
                origin.snapshot,
                origin.repository,
                snapshot.id
            )));
        }
    }
    let mut disks = Vec::new();
    for record in &snapshot.manifest.disks {
        let overlay = overlays
            .iter()
            .find(|o| o.header().origin.disk == record.name);
        let base = match overlay {
            Some(o) => Arc::clone(o.base()),
            None => Arc::new(SnapshotDiskReader::open(
                Arc::clone(repo),
                map.clone(),
                record,
                Arc::clone(&cache),
                crate::reader::ReaderOptions::default(),
            )?),
        };
        let index = base.index().clone();
        disks.push(crate::BackupDisk {
            name: record.name.clone(),
            source_label: record.source.clone(),
            source: Box::new(CommitSource::new(base, overlay.cloned(), &record.format)),
            base: Some(crate::BaseIndex {
                snapshot: snapshot.id.clone(),
                index,
            }),
        });
    }
    let mut tags = snapshot.manifest.tags.clone();
    if !tags.iter().any(|t| t == "overlay") {
        tags.push("overlay".to_string());
    }
    let options = crate::BackupOptions {
        vm: snapshot.manifest.vm.clone(),
        tags,
        host: None,
        threads,
        skip_unchanged: false,
    };
    let mut prepared = crate::backup_prepare(repo, &disks, &options, progress)?;
    let manifest = &mut prepared.manifest;
    manifest.backup_type = crate::format::BackupType::Incremental;
    manifest.definition = snapshot.manifest.definition.clone();
    manifest.consistency = snapshot.manifest.consistency.clone();
    manifest.consistency_note = Some(format!(
        "snapshot {} with the writes made to its export, committed from {} overlay(s)",
        snapshot.short_id(),
        overlays.len()
    ));
    prepared.commit(repo)
}

/// Reads the bitmap pages that have a bit set (the bitmap region is
/// sparse: untouched pages are holes and read as zeros).
fn load_bitmap(file: &File, header: &OverlayHeader) -> io::Result<Bitmap> {
    let mut bitmap = Bitmap::default();
    let len = header.data_offset - header.bitmap_offset;
    let file_len = file.metadata()?.len();
    let mut page = vec![0u8; PAGE];
    let mut at = 0;
    while at < len && header.bitmap_offset + at < file_len {
        read_full_at(file, &mut page, header.bitmap_offset + at)?;
        if page.iter().any(|b| *b != 0) {
            bitmap
                .pages
                .insert(at / PAGE as u64, page.clone().into_boxed_slice());
        }
        at += PAGE as u64;
    }
    Ok(bitmap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> OverlayOrigin {
        OverlayOrigin {
            repository: "r".repeat(32),
            snapshot: "s".repeat(64),
            disk: "vda.qcow2".into(),
            created: "2026-12-02T00:00:00Z".into(),
        }
    }

    #[test]
    fn a_header_round_trips_and_a_damaged_one_is_refused() {
        let header = OverlayHeader::new(1 << 40, origin());
        assert_eq!(header.data_offset % DATA_ALIGN, 0);
        assert!(header.data_offset >= HEADER_LEN as u64 + (1u64 << 40) / 4096 / 8);
        let bytes = header.encode().unwrap();
        assert_eq!(OverlayHeader::decode("o", &bytes).unwrap(), header);
        for at in [0usize, 17, 25, 60, 4070] {
            let mut bad = bytes;
            bad[at] ^= 1;
            let err = OverlayHeader::decode("o", &bad).unwrap_err();
            assert!(
                err.to_string().contains("overlay") || err.to_string().contains("version"),
                "{err}"
            );
        }
        assert!(OverlayHeader::decode("o", &bytes[..100]).is_err());
    }

    proptest::proptest! {
        /// Any bytes are refused or parsed, never a panic; a header made
        /// by damaging a good one in one byte is refused.
        #[test]
        fn arbitrary_headers_are_refused_not_trusted(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..5000),
            at in 0usize..CHECKSUM_AT,
            flip in 1u8..=255,
        ) {
            let _ = OverlayHeader::decode("o", &bytes);
            let mut good = OverlayHeader::new(1 << 30, origin()).encode().unwrap();
            good[at] ^= flip;
            proptest::prop_assert!(OverlayHeader::decode("o", &good).is_err());
        }
    }

    #[test]
    fn the_bitmap_sets_and_reads_bits_across_pages() {
        let mut bitmap = Bitmap::default();
        for b in [
            0,
            7,
            8,
            BLOCKS_PER_PAGE - 1,
            BLOCKS_PER_PAGE,
            5 * BLOCKS_PER_PAGE + 3,
        ] {
            assert!(!bitmap.is_set(b));
            bitmap.set(b);
            assert!(bitmap.is_set(b));
        }
        assert!(!bitmap.is_set(1) && !bitmap.is_set(BLOCKS_PER_PAGE + 1));
        assert_eq!(bitmap.pages.len(), 3);
    }
}
