//! NBD, both sides: a synchronous client and a server.
//!
//! Why our own client: backup workers each hold one blocking connection and
//! issue one request at a time, so a small std-only client is all we need —
//! no async runtime, no C library. It speaks the fixed newstyle handshake,
//! structured replies, metadata contexts (`base:allocation` for sparseness,
//! later `qemu:dirty-bitmap:NAME` for incremental backups) and the usual
//! commands.
//!
//! For the client the server is not trusted: every reply is checked against
//! the request in flight (cookie, offsets, lengths, chunk types, context
//! ids), allocations are bounded by what we asked for, and a broken reply
//! poisons the connection instead of panicking. Parsing lives in [`proto`]
//! as pure functions over byte slices.
//!
//! The server ([`NbdServer`]) serves any [`ExportDisk`] (a backup being
//! restored or mounted, a disk in memory) to QEMU, `qemu-img`, the kernel
//! or our own client: fixed newstyle handshake with `NBD_OPT_GO`,
//! `NBD_OPT_LIST`, structured replies and `base:allocation`; reads with
//! hole chunks, writes, write zeroes, trim, flush, FUA, block status;
//! multi-connection, and several requests in flight per connection. Its
//! wire format is the other half of [`proto`], pure functions too. For the
//! server the client is not trusted — above all on TCP, where anyone who
//! reaches the port may connect: every length and range is checked before
//! use, allocations are bounded, and no client bytes can make it panic
//! (see the `server` module's notes; there is no TLS or authentication).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};

mod client;
mod handshake;
pub mod proto;
pub(crate) mod reply;
mod server;
mod stream;
#[cfg(test)]
mod tests;
pub(crate) mod wire;

pub use client::{NbdClient, MAX_RANGE_EXTENTS};
pub use proto::BlockSizeConstraints;
pub use server::{Allocation, ExportDisk, NbdServer, WORKERS_PER_CONNECTION};
pub use stream::Stream;

/// The metadata context describing allocation and zeroes.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The metadata context under which QEMU exposes dirty bitmap `name`
/// (flag [`proto::NBD_STATE_DIRTY`] marks changed extents).
pub fn dirty_bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

/// How to connect: which export and which metadata contexts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Export name (`qemu-nbd`'s default export is the empty name).
    pub export_name: String,
    /// Metadata contexts to select for block status, e.g.
    /// `base:allocation` or `qemu:dirty-bitmap:NAME`.
    pub meta_contexts: Vec<String>,
    /// Whether to ask for structured replies (needed for block status and
    /// sparse reads).
    pub structured_replies: bool,
    /// Read / write timeout of the socket; `None` waits forever.
    pub timeout: Option<Duration>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            export_name: String::new(),
            meta_contexts: vec![BASE_ALLOCATION.to_owned()],
            structured_replies: true,
            timeout: None,
        }
    }
}

/// Transmission flags of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    fn has(self, flag: u16) -> bool {
        self.0 & flag != 0
    }

    /// The export refuses writes.
    pub fn read_only(self) -> bool {
        self.has(proto::NBD_FLAG_READ_ONLY)
    }

    /// `NBD_CMD_FLUSH` is supported.
    pub fn can_flush(self) -> bool {
        self.has(proto::NBD_FLAG_SEND_FLUSH)
    }

    /// `NBD_CMD_TRIM` is supported.
    pub fn can_trim(self) -> bool {
        self.has(proto::NBD_FLAG_SEND_TRIM)
    }

    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub fn can_write_zeroes(self) -> bool {
        self.has(proto::NBD_FLAG_SEND_WRITE_ZEROES)
    }

    /// Flushes on one connection are visible on all others.
    pub fn can_multi_conn(self) -> bool {
        self.has(proto::NBD_FLAG_CAN_MULTI_CONN)
    }
}

/// What the handshake told us about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export name we asked for.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Block size constraints, if the server sent them.
    pub block_size: Option<BlockSizeConstraints>,
    /// Whether structured replies were negotiated.
    pub structured_replies: bool,
}

/// One extent reported by block status, in absolute disk offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatusExtent {
    /// Byte offset of the extent.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub length: u64,
    /// Flags as defined by the metadata context (for `base:allocation`:
    /// [`proto::NBD_STATE_HOLE`], [`proto::NBD_STATE_ZERO`]).
    pub flags: u32,
}

impl BlockStatusExtent {
    /// The first byte after this extent.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

impl NbdClient<Stream> {
    /// Connects to a server on a unix socket and runs the handshake.
    pub fn connect_unix(path: &Path, opts: &ConnectOptions) -> Result<Self> {
        Self::connect_stream(Stream::unix(path)?, opts)
    }

    /// Connects to `host:port` over TCP and runs the handshake.
    pub fn connect_tcp(address: &str, opts: &ConnectOptions) -> Result<Self> {
        Self::connect_stream(Stream::tcp(address)?, opts)
    }

    fn connect_stream(stream: Stream, opts: &ConnectOptions) -> Result<Self> {
        stream.set_timeout(opts.timeout)?;
        NbdClient::handshake(stream, opts)
    }
}

/// Checks that an NBD server answers on `path`, then leaves without
/// entering transmission (`NBD_OPT_ABORT`), so the probe takes no export.
pub fn probe_unix(path: &Path, timeout: Duration) -> Result<()> {
    let stream = Stream::unix(path)?;
    stream.set_timeout(Some(timeout))?;
    let mut io = wire::BufStream::new(stream);
    handshake::probe(&mut io)
}

pub(crate) fn negotiate<S: Read + Write>(
    io: &mut wire::BufStream<S>,
    opts: &ConnectOptions,
) -> Result<(ExportInfo, BTreeMap<String, u32>)> {
    let negotiated = handshake::negotiate(io, opts)?;
    Ok((negotiated.export, negotiated.contexts))
}

/// Checks a request range against the export size.
pub(crate) fn check_range(size: u64, offset: u64, length: u64, what: &str) -> Result<()> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::Internal(format!(
            "{what} of {length} bytes at offset {offset} goes past the end of the {size}-byte export"
        ))),
    }
}
