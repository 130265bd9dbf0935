//! Where disk data comes from and goes to.
//!
//! The engine never knows whether a disk is a raw file, a qcow2 image behind
//! `qemu-nbd`, or a running VM's point-in-time view: it sees a [`DiskSource`]
//! (for backup) or a [`DiskTarget`] (for restore). Each worker thread opens its
//! own reader or writer, so sources that allow several connections (NBD with
//! `--shared`, plain files) are read in parallel without locking.

use std::io;

/// What a region of a virtual disk holds, as far as the source knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated data that must be read.
    Data,
    /// A region that reads as zeros (a hole or an explicitly zeroed area):
    /// it is neither read nor stored.
    Zero,
}

/// One contiguous region of a virtual disk with a single [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset from the start of the virtual disk.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub length: u64,
    /// What the region holds.
    pub kind: ExtentKind,
}

impl Extent {
    /// The first byte after this extent.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// A virtual disk that can be read for backup.
pub trait DiskSource: Send + Sync {
    /// The size of the virtual disk in bytes, as the guest sees it.
    fn virtual_size(&self) -> u64;
    /// The image format the data came from (`raw`, `qcow2`, `vmdk`, ...),
    /// recorded in the snapshot so users know what they backed up.
    fn format(&self) -> &str;
    /// Opens an independent reader; each backup worker holds one.
    fn open_reader(&self) -> io::Result<Box<dyn DiskReader>>;
    /// A fingerprint that changes whenever the disk's content may have
    /// changed (for an image file: device, inode, size, mtime and ctime).
    /// When it equals the one recorded in the VM's previous snapshot, the
    /// backup reuses that snapshot's index without reading the disk, as
    /// restic and borg do for unchanged files. `None` (the default) means
    /// "always read".
    fn identity(&self) -> Option<String> {
        None
    }
}

/// A reader of one [`DiskSource`], owned by one worker thread.
pub trait DiskReader: Send {
    /// Describes `[offset, offset + length)` as extents, in order, covering
    /// the whole range without gaps. Sources that cannot tell report one
    /// `Data` extent.
    fn extents(&mut self, offset: u64, length: u64) -> io::Result<Vec<Extent>>;
    /// Describes a prefix of `[offset, offset + length)` for planning a
    /// backup over a long range: extents in order from `offset`, without
    /// gaps, covering at least one byte and at most `length`, stopping
    /// early once about `max_extents` are collected (so a fragmented range
    /// costs bounded memory). Sources should answer with few requests per
    /// many GiB of holes (one NBD block status request per 2 GiB, one
    /// `SEEK_DATA` per hole): a backup costs in proportion to the data,
    /// not the virtual size. The default describes the whole range with
    /// [`DiskReader::extents`].
    fn extents_from(
        &mut self,
        offset: u64,
        length: u64,
        max_extents: usize,
    ) -> io::Result<Vec<Extent>> {
        let _ = max_extents;
        self.extents(offset, length)
    }
    /// Fills `buf` with the bytes at `offset`; a short read is an error.
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// For sources that track changes (a QEMU dirty bitmap exported over
    /// NBD): whether any byte of `[offset, offset + length)` may have been
    /// written since the point the tracking started. `Ok(None)`, the
    /// default, means the source does not track changes and everything
    /// must be read.
    fn changed(&mut self, offset: u64, length: u64) -> io::Result<Option<bool>> {
        let _ = (offset, length);
        Ok(None)
    }
    /// [`DiskReader::changed`] over a long range at once: the parts of
    /// `[offset, offset + length)` that may have been written, as sorted,
    /// non-overlapping `(start, end)` byte ranges, or `Ok(None)` when the
    /// source does not track changes. A backup asks this once per window
    /// of many GiB instead of once per chunk. The default asks `changed`
    /// about each `granule` bytes (a chunk); sources that track changes
    /// should answer from one query.
    fn changed_ranges(
        &mut self,
        offset: u64,
        length: u64,
        granule: u64,
    ) -> io::Result<Option<Vec<(u64, u64)>>> {
        let end = offset + length;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let piece_end = end.min(pos + granule.max(1));
            match self.changed(pos, piece_end - pos)? {
                None => return Ok(None),
                Some(false) => {}
                Some(true) => match ranges.last_mut() {
                    Some(last) if last.1 == pos => last.1 = piece_end,
                    _ => ranges.push((pos, piece_end)),
                },
            }
            pos = piece_end;
        }
        Ok(Some(ranges))
    }
}

/// A virtual disk that restored data is written to.
pub trait DiskTarget: Send + Sync {
    /// Opens an independent writer; each restore worker holds one.
    fn open_writer(&self) -> io::Result<Box<dyn DiskWriter>>;
    /// Makes everything written durable and releases the target
    /// (for example stops the `qemu-nbd` process behind it).
    fn finish(&self) -> io::Result<()>;
    /// Whether the target may hold old data where the snapshot has holes
    /// (a block device, unlike a freshly created image), so a restore must
    /// write zeros there instead of skipping them.
    fn holes_need_zeroing(&self) -> bool {
        false
    }
    /// The smallest run of zeros inside a chunk worth leaving unwritten on
    /// a fresh target (one that reads zeros where nothing was written):
    /// its allocation unit, such as a qcow2 cluster. A restore never
    /// writes an aligned block of this many zero bytes there, so the
    /// restored image allocates no more than its source held. At least
    /// 4 KiB is used.
    fn hole_granularity(&self) -> usize {
        4096
    }
}

/// A writer of one [`DiskTarget`], owned by one worker thread.
pub trait DiskWriter: Send {
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes this writer's data durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Makes `length` bytes at `offset` read as zeros. The default writes
    /// zeros; targets with a cheaper way (a device's write-zeroes
    /// command) override it.
    fn write_zeroes(&mut self, offset: u64, length: u64) -> io::Result<()> {
        write_zero_bytes(self, offset, length)
    }
}

/// Writes `length` zero bytes at `offset` through `writer`, a MiB at a
/// time: the fallback of [`DiskWriter::write_zeroes`].
pub fn write_zero_bytes<W: DiskWriter + ?Sized>(
    writer: &mut W,
    offset: u64,
    length: u64,
) -> io::Result<()> {
    const PIECE: u64 = 1 << 20;
    let zeros = vec![0u8; PIECE.min(length) as usize];
    let mut done = 0;
    while done < length {
        let n = PIECE.min(length - done);
        writer.write_all_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}
