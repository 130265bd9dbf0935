//! A disk read from an NBD export that someone else serves: a running
//! QEMU's or qemu-storage-daemon's point-in-time view (see
//! [`crate::live`]), or any NBD server on a unix socket.
//!
//! Why separate from [`super::NbdSource`]: that one owns its `qemu-nbd`
//! process; here the server belongs to someone else, so this source only
//! knows a socket, an export name and the bitmap to read.

use std::io;
use std::path::{Path, PathBuf};

use vbackup_core::source::{DiskReader, DiskSource};

use super::nbd::{ExportReader, ExportSpec};
use super::{Slots, DEFAULT_CONNECTIONS};
use crate::error::Result;

/// How to read an existing NBD export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdExportOptions {
    /// The export name.
    pub export: String,
    /// A dirty bitmap the export offers as `qemu:dirty-bitmap:NAME`;
    /// readers then answer [`DiskReader::changed`] from it. Opening fails
    /// if the export does not offer it.
    pub bitmap: Option<String>,
    /// The format to record for the disk (the VM's image format; the
    /// export itself is always raw bytes).
    pub format: String,
    /// How many readers may be open at once.
    pub connections: u32,
}

impl NbdExportOptions {
    /// Export `export`, no bitmap, format `raw`, [`DEFAULT_CONNECTIONS`].
    pub fn new(export: impl Into<String>) -> Self {
        NbdExportOptions {
            export: export.into(),
            bitmap: None,
            format: "raw".into(),
            connections: DEFAULT_CONNECTIONS,
        }
    }
}

/// A [`DiskSource`] over an NBD export on a unix socket; each reader is
/// its own connection, at most `connections` at once.
#[derive(Debug)]
pub struct NbdExportSource {
    socket: PathBuf,
    options: NbdExportOptions,
    size: u64,
    slots: Slots,
}

impl NbdExportSource {
    /// Connects once to learn the size and to check that the bitmap's
    /// metadata context is offered.
    pub fn open(socket: &Path, options: NbdExportOptions) -> Result<Self> {
        let mut source = NbdExportSource {
            socket: socket.to_owned(),
            slots: Slots::new(options.connections),
            options,
            size: 0,
        };
        source.size = source.spec().connect()?.client.size();
        Ok(source)
    }

    /// A source whose size is already known (from a probe by
    /// [`NbdExportSource::open`]); connects only when readers open.
    pub(crate) fn with_size(socket: &Path, options: NbdExportOptions, size: u64) -> Self {
        NbdExportSource {
            socket: socket.to_owned(),
            slots: Slots::new(options.connections),
            options,
            size,
        }
    }

    fn spec(&self) -> ExportSpec<'_> {
        ExportSpec {
            socket: &self.socket,
            export: &self.options.export,
            bitmap: self.options.bitmap.as_deref(),
        }
    }

    /// The socket of the NBD server.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The export name.
    pub fn export_name(&self) -> &str {
        &self.options.export
    }

    /// The dirty bitmap read for `changed()`, if any.
    pub fn bitmap(&self) -> Option<&str> {
        self.options.bitmap.as_deref()
    }
}

impl DiskSource for NbdExportSource {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> &str {
        &self.options.format
    }

    fn open_reader(&self) -> io::Result<Box<dyn DiskReader>> {
        let slot = self.slots.take()?;
        let connection = self.spec().connect()?;
        Ok(Box::new(ExportReader::new(connection, slot, None)))
    }
}
