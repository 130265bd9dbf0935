//! The transmission phase: one request at a time, each reply checked.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use super::proto::{self, *};
use super::reply::{self, Expect};
use super::wire::{self, BufStream};
use super::{check_range, BlockStatusExtent, ConnectOptions, ExportInfo, Stream};
use crate::error::{Error, Result};

/// The largest block status request (a power of two, so it keeps any
/// minimum block size alignment).
const MAX_STATUS_REQUEST: u32 = 1 << 31;
/// The largest trim / write-zeroes request when the server gives no maximum.
const MAX_ZERO_REQUEST: u32 = 1 << 30;
/// The most extents [`NbdClient::block_status_range`] collects.
pub const MAX_RANGE_EXTENTS: usize = 1 << 23;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ready,
    /// A reply could not be trusted; the stream may be out of sync.
    Broken,
    /// `NBD_CMD_DISC` was sent.
    Closed,
}

/// A connection to one NBD export, in transmission phase.
///
/// Not thread-safe by design: each worker opens its own connection.
/// Dropping the client sends `NBD_CMD_DISC` unless the connection broke.
#[derive(Debug)]
pub struct NbdClient<S: Read + Write = Stream> {
    io: BufStream<S>,
    export: ExportInfo,
    contexts: BTreeMap<String, u32>,
    context_ids: Vec<u32>,
    next_cookie: u64,
    max_io: u32,
    state: State,
}

impl<S: Read + Write> NbdClient<S> {
    /// Runs the handshake over an already connected stream.
    pub fn handshake(stream: S, opts: &ConnectOptions) -> Result<Self> {
        let mut io = BufStream::new(stream);
        let (export, contexts) = super::negotiate(&mut io, opts)?;
        Ok(Self::from_parts(io, export, contexts))
    }

    /// A client in transmission phase with the given negotiated state.
    pub(crate) fn from_parts(
        io: BufStream<S>,
        export: ExportInfo,
        contexts: BTreeMap<String, u32>,
    ) -> Self {
        let server_max = export.block_size.map_or(u32::MAX, |b| b.maximum);
        NbdClient {
            io,
            max_io: server_max.min(DEFAULT_MAX_IO),
            context_ids: contexts.values().copied().collect(),
            contexts,
            export,
            next_cookie: 1,
            state: State::Ready,
        }
    }

    /// What the server told us about the export.
    pub fn export(&self) -> &ExportInfo {
        &self.export
    }

    /// The export size in bytes.
    pub fn size(&self) -> u64 {
        self.export.size
    }

    /// Negotiated metadata contexts: name → id for block status.
    pub fn meta_contexts(&self) -> &BTreeMap<String, u32> {
        &self.contexts
    }

    /// The id of a negotiated metadata context.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts.get(name).copied()
    }

    /// The largest single read or write sent; larger ones are split.
    pub fn max_io(&self) -> u32 {
        self.max_io
    }

    /// The underlying stream.
    pub fn stream(&self) -> &S {
        self.io.get_ref()
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size(), offset, buf.len() as u64, "read")?;
        let step = self.max_io as usize;
        for (i, piece) in buf.chunks_mut(step).enumerate() {
            let at = offset + (i * step) as u64;
            // A piece is at most max_io bytes, so it fits a u32.
            let len = piece.len() as u32;
            self.transact(NBD_CMD_READ, 0, at, len, None, Expect::Data(piece))?;
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_range(self.size(), offset, buf.len() as u64, "write")?;
        let step = self.max_io as usize;
        for (i, piece) in buf.chunks(step).enumerate() {
            let at = offset + (i * step) as u64;
            let len = piece.len() as u32;
            self.transact(NBD_CMD_WRITE, 0, at, len, Some(piece), Expect::Status)?;
        }
        Ok(())
    }

    /// Makes completed writes durable; a no-op if the server has no flush.
    pub fn flush(&mut self) -> Result<()> {
        if !self.export.flags.can_flush() {
            return Ok(());
        }
        self.transact(NBD_CMD_FLUSH, 0, 0, 0, None, Expect::Status)
    }

    /// Zeroes `[offset, offset + length)`; with `no_hole` the server must
    /// keep the range allocated.
    pub fn write_zeroes(&mut self, offset: u64, length: u64, no_hole: bool) -> Result<()> {
        if !self.export.flags.can_write_zeroes() {
            return Err(Error::Unsupported("NBD_CMD_WRITE_ZEROES"));
        }
        let flags = if no_hole { NBD_CMD_FLAG_NO_HOLE } else { 0 };
        self.zero_like(NBD_CMD_WRITE_ZEROES, flags, offset, length)
    }

    /// Tells the server `[offset, offset + length)` is no longer needed.
    pub fn trim(&mut self, offset: u64, length: u64) -> Result<()> {
        if !self.export.flags.can_trim() {
            return Err(Error::Unsupported("NBD_CMD_TRIM"));
        }
        self.zero_like(NBD_CMD_TRIM, 0, offset, length)
    }

    fn zero_like(&mut self, command: u16, flags: u16, offset: u64, length: u64) -> Result<()> {
        self.check_writable()?;
        check_range(self.size(), offset, length, command_name(command))?;
        let step = self
            .export
            .block_size
            .map_or(MAX_ZERO_REQUEST, |b| b.maximum);
        let step = u64::from(step.min(MAX_ZERO_REQUEST));
        let end = offset + length;
        let mut at = offset;
        while at < end {
            let len = (end - at).min(step);
            self.transact(command, flags, at, len as u32, None, Expect::Status)?;
            at += len;
        }
        Ok(())
    }

    /// One `NBD_CMD_BLOCK_STATUS` request for `context`: the extents the
    /// server chose to describe, starting at `offset` (possibly fewer than
    /// `length` bytes; never past the export end).
    pub fn block_status(
        &mut self,
        context: u32,
        offset: u64,
        length: u32,
    ) -> Result<Vec<BlockStatusExtent>> {
        if !self.export.structured_replies {
            return Err(Error::Unsupported(
                "block status without structured replies",
            ));
        }
        if !self.context_ids.contains(&context) {
            return Err(Error::Internal(format!(
                "metadata context id {context} was not negotiated"
            )));
        }
        if length == 0 {
            return Err(Error::Internal("block status of 0 bytes".into()));
        }
        check_range(self.size(), offset, u64::from(length), "block status")?;
        let negotiated = self.context_ids.clone();
        let mut descriptors = Vec::new();
        let expect = Expect::BlockStatus {
            wanted: context,
            negotiated: &negotiated,
            out: &mut descriptors,
        };
        self.transact(NBD_CMD_BLOCK_STATUS, 0, offset, length, None, expect)?;
        Ok(to_extents(&descriptors, offset, self.size()))
    }

    /// Calls `visit` for extents covering exactly `[offset, offset + length)`,
    /// in order, issuing as many block status requests as the server needs.
    pub fn for_each_extent(
        &mut self,
        context: u32,
        offset: u64,
        length: u64,
        mut visit: impl FnMut(BlockStatusExtent) -> Result<()>,
    ) -> Result<()> {
        self.for_each_extent_while(context, offset, length, |e| visit(e).map(|()| true))?;
        Ok(())
    }

    /// [`NbdClient::for_each_extent`] that stops after the first request
    /// whose extents made `visit` return false (the extents of that reply
    /// are all visited, so what was seen ends on a reply boundary);
    /// returns the end of what was visited. One request asks about up to
    /// 2 GiB, so long holes cost one round trip per 2 GiB.
    pub fn for_each_extent_while(
        &mut self,
        context: u32,
        offset: u64,
        length: u64,
        mut visit: impl FnMut(BlockStatusExtent) -> Result<bool>,
    ) -> Result<u64> {
        check_range(self.size(), offset, length, "block status")?;
        let end = offset + length;
        let mut pos = offset;
        let mut more = true;
        while pos < end && more {
            let len = (end - pos).min(u64::from(MAX_STATUS_REQUEST)) as u32;
            for extent in self.block_status(context, pos, len)? {
                let clamped = clamp_extent(extent, end);
                pos = clamped.end();
                more &= visit(clamped)?;
                if pos >= end {
                    break;
                }
            }
        }
        Ok(pos)
    }

    /// Extents covering exactly `[offset, offset + length)`, adjacent
    /// extents with equal flags merged. Fails past [`MAX_RANGE_EXTENTS`].
    pub fn block_status_range(
        &mut self,
        context: u32,
        offset: u64,
        length: u64,
    ) -> Result<Vec<BlockStatusExtent>> {
        let mut out: Vec<BlockStatusExtent> = Vec::new();
        self.for_each_extent(context, offset, length, |e| push_merged(&mut out, e))?;
        Ok(out)
    }

    /// Sends `NBD_CMD_DISC` and closes the connection.
    pub fn disconnect(mut self) -> Result<()> {
        self.close()
    }

    /// Sends `NBD_CMD_DISC` (once); later requests fail.
    pub fn close(&mut self) -> Result<()> {
        if self.state != State::Ready {
            return Ok(());
        }
        self.state = State::Closed;
        let req = self.next_request(NBD_CMD_DISC, 0, 0, 0);
        wire::write_all(&mut self.io, &encode_request(&req), "NBD_CMD_DISC")
    }

    fn check_writable(&self) -> Result<()> {
        if self.export.flags.read_only() {
            Err(Error::InvalidRequest(format!(
                "NBD export '{}' is read-only",
                self.export.name
            )))
        } else {
            Ok(())
        }
    }

    fn check_usable(&self) -> Result<()> {
        match self.state {
            State::Ready => Ok(()),
            State::Broken => Err(Error::protocol(
                "connection abandoned after an earlier invalid reply",
            )),
            State::Closed => Err(Error::Internal("NBD connection is closed".into())),
        }
    }

    fn next_request(&mut self, command: u16, flags: u16, offset: u64, length: u32) -> Request {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
    }

    /// Sends one request and receives its whole reply. Anything but a
    /// server-reported error leaves the connection unusable.
    fn transact(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
        expect: Expect<'_>,
    ) -> Result<()> {
        self.check_usable()?;
        let req = self.next_request(command, flags, offset, length);
        let result = self.send(&req, payload).and_then(|()| {
            reply::receive(&mut self.io, &req, self.export.structured_replies, expect)
        });
        if let Err(e) = &result {
            if !matches!(e, Error::Server { .. }) {
                self.state = State::Broken;
            }
        }
        result
    }

    fn send(&mut self, req: &Request, payload: Option<&[u8]>) -> Result<()> {
        let name = command_name(req.command);
        match payload {
            None => wire::write_all(&mut self.io, &encode_request(req), name),
            Some(data) => {
                let mut header = Vec::with_capacity(REQUEST_LEN + data.len().min(64 * 1024));
                header.extend_from_slice(&encode_request(req));
                // Small writes go out in one packet; large ones in two writes.
                if data.len() <= 64 * 1024 {
                    header.extend_from_slice(data);
                    wire::write_all(&mut self.io, &header, name)
                } else {
                    wire::write_all(&mut self.io, &header, name)?;
                    wire::write_all(&mut self.io, data, name)
                }
            }
        }
    }
}

impl<S: Read + Write> Drop for NbdClient<S> {
    fn drop(&mut self) {
        // Best effort: the server also copes with a plain close.
        let _ = self.close();
    }
}

/// Turns descriptors starting at `offset` into absolute extents, clamping
/// the last one to the export size.
fn to_extents(descriptors: &[proto::Descriptor], offset: u64, size: u64) -> Vec<BlockStatusExtent> {
    let mut pos = offset;
    let mut out = Vec::with_capacity(descriptors.len());
    for d in descriptors {
        if pos >= size {
            break;
        }
        let length = u64::from(d.length).min(size - pos);
        out.push(BlockStatusExtent {
            offset: pos,
            length,
            flags: d.flags,
        });
        pos += length;
    }
    out
}

fn clamp_extent(e: BlockStatusExtent, end: u64) -> BlockStatusExtent {
    BlockStatusExtent {
        length: e.end().min(end) - e.offset,
        ..e
    }
}

fn push_merged(out: &mut Vec<BlockStatusExtent>, e: BlockStatusExtent) -> Result<()> {
    if let Some(last) = out.last_mut() {
        if last.flags == e.flags && last.end() == e.offset {
            last.length += e.length;
            return Ok(());
        }
    }
    if out.len() >= MAX_RANGE_EXTENTS {
        return Err(Error::Internal(format!(
            "more than {MAX_RANGE_EXTENTS} extents in the range; query smaller ranges"
        )));
    }
    out.push(e);
    Ok(())
}
