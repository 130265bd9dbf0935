//! In-memory disks and restore targets: the engine's
//! [`DiskSource`]/[`DiskTarget`] without files or processes, so vbackup-core's
//! integration tests run fast and deterministically. Special-purpose
//! sources (failing reads, dirty tracking) wrap a [`MemDisk`] in the test
//! that needs them.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use vbackup_core::{DiskReader, DiskSource, DiskTarget, DiskWriter, Extent, ExtentKind};

/// The block size at which [`MemDisk::with_holes`] reports all-zero data
/// as holes.
pub const HOLE_BLOCK: u64 = 4096;

/// Something to run once, the first time a disk is read (a test's way to
/// act in the middle of a backup, e.g. a concurrent prune).
pub type Hook = Arc<Mutex<Option<Box<dyn FnOnce() + Send>>>>;

/// A disk in memory, raw format. Its clones share the data and the hook.
#[derive(Clone)]
pub struct MemDisk {
    /// The disk's bytes (its virtual size is their length).
    pub data: Arc<Vec<u8>>,
    /// What [`DiskSource::identity`] reports (a fingerprint of an
    /// unchanged source lets a backup skip reading it).
    pub identity: Option<String>,
    /// Run on the first read, then cleared.
    pub hook: Hook,
    /// Whether 4 KiB all-zero blocks are reported as holes
    /// ([`ExtentKind::Zero`]); otherwise everything is data.
    pub zero_holes: bool,
}

impl MemDisk {
    /// A disk of `data`, all of it reported as data, no identity, no hook.
    pub fn new(data: Vec<u8>) -> Self {
        Self {
            data: Arc::new(data),
            identity: None,
            hook: Arc::new(Mutex::new(None)),
            zero_holes: false,
        }
    }

    /// A disk of `data` that reports its 4 KiB all-zero blocks as holes,
    /// as a sparse image would.
    pub fn with_holes(data: Vec<u8>) -> Self {
        Self {
            zero_holes: true,
            ..Self::new(data)
        }
    }

    /// The bytes at `offset..offset + len`, or an error past the end.
    fn range(&self, offset: u64, len: u64) -> io::Result<&[u8]> {
        let end = offset.checked_add(len);
        match end {
            Some(end) if end <= self.data.len() as u64 => {
                Ok(&self.data[offset as usize..end as usize])
            }
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "reading {len} bytes at {offset} of a {}-byte disk",
                    self.data.len()
                ),
            )),
        }
    }

    /// The extents of `offset..offset + length` in 4 KiB blocks, runs of
    /// the same kind merged.
    fn sparse_extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < offset + length {
            let end = ((pos / HOLE_BLOCK + 1) * HOLE_BLOCK).min(offset + length);
            let zero = self.range(pos, end - pos)?.iter().all(|b| *b == 0);
            let kind = if zero {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            };
            match out.last_mut() {
                Some(last) if last.kind == kind => last.length += end - pos,
                _ => out.push(Extent {
                    offset: pos,
                    length: end - pos,
                    kind,
                }),
            }
            pos = end;
        }
        Ok(out)
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
        if self.zero_holes {
            return self.sparse_extents(offset, length);
        }
        Ok(vec![Extent {
            offset,
            length,
            kind: ExtentKind::Data,
        }])
    }
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let hook = self
            .hook
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(hook) = hook {
            hook();
        }
        buf.copy_from_slice(self.range(offset, buf.len() as u64)?);
        Ok(())
    }
}

/// A restore target in memory of a fixed size. Its clones (the writers)
/// share the bytes.
#[derive(Clone, Debug)]
pub struct MemTarget(Arc<Mutex<Vec<u8>>>);

impl MemTarget {
    /// A target of `len` zero bytes.
    pub fn new(len: usize) -> Self {
        Self(Arc::new(Mutex::new(vec![0u8; len])))
    }

    /// What has been written so far (zeros elsewhere).
    pub fn contents(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

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
        let mut data = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|end| *end <= data.len() as u64)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "writing {} bytes at {offset} of a {}-byte target",
                        buf.len(),
                        data.len()
                    ),
                )
            })?;
        data[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn with_holes_reports_zero_blocks_as_holes_and_merges_runs() {
        let mut data = vec![0u8; 4 * HOLE_BLOCK as usize];
        data[HOLE_BLOCK as usize] = 1;
        data[2 * HOLE_BLOCK as usize + 5] = 1;
        let mut disk = MemDisk::with_holes(data.clone());
        let kinds: Vec<(u64, u64, ExtentKind)> = disk
            .extents(0, 4 * HOLE_BLOCK)
            .unwrap()
            .iter()
            .map(|e| (e.offset, e.length, e.kind))
            .collect();
        let block = HOLE_BLOCK;
        assert_eq!(
            kinds,
            vec![
                (0, block, ExtentKind::Zero),
                (block, 2 * block, ExtentKind::Data),
                (3 * block, block, ExtentKind::Zero),
            ]
        );
        let mut plain = MemDisk::new(data);
        assert_eq!(plain.extents(0, 4 * block).unwrap().len(), 1);
    }

    #[test]
    fn reads_and_writes_past_the_end_are_errors_not_panics() {
        let mut disk = MemDisk::new(vec![7u8; 10]);
        let mut buf = [0u8; 4];
        disk.read_exact_at(&mut buf, 6).unwrap();
        assert_eq!(buf, [7u8; 4]);
        assert!(disk.read_exact_at(&mut buf, 7).is_err());
        let target = MemTarget::new(10);
        let mut writer = target.clone();
        writer.write_all_at(&[1, 2], 8).unwrap();
        assert!(writer.write_all_at(&[1, 2], 9).is_err());
        assert_eq!(&target.contents()[8..], &[1, 2]);
    }

    #[test]
    fn the_hook_runs_once_on_the_first_read() {
        let runs = Arc::new(Mutex::new(0));
        let disk = MemDisk::new(vec![0u8; 8]);
        let counter = runs.clone();
        *disk.hook.lock().unwrap() = Some(Box::new(move || *counter.lock().unwrap() += 1));
        let mut reader = disk.clone();
        let mut buf = [0u8; 2];
        reader.read_exact_at(&mut buf, 0).unwrap();
        reader.read_exact_at(&mut buf, 2).unwrap();
        disk.open_reader()
            .unwrap()
            .read_exact_at(&mut buf, 4)
            .unwrap();
        assert_eq!(*runs.lock().unwrap(), 1);
    }
}
