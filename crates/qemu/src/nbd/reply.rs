//! Receiving the reply to the one request in flight: a simple reply or a
//! series of structured chunks, each checked against the request.
//!
//! A server error ([`Error::Server`]) is returned only after the whole reply
//! was consumed, so the connection stays usable; any other error means the
//! stream can no longer be trusted.

use std::collections::BTreeMap;
use std::io::Read;

use super::proto::*;
use super::wire;
use crate::error::{Error, Result};

/// What the caller expects back, and where to put it.
pub(crate) enum Expect<'a> {
    /// Success or failure, no payload (write, flush, trim, write zeroes).
    Status,
    /// Exactly `buf.len()` bytes of data, the request's length.
    Data(&'a mut [u8]),
    /// One block status chunk per negotiated context; `wanted`'s
    /// descriptors go to `out`.
    BlockStatus {
        /// The context id asked about.
        wanted: u32,
        /// All negotiated context ids.
        negotiated: &'a [u32],
        /// Receives the descriptors of `wanted`.
        out: &'a mut Vec<Descriptor>,
    },
}

/// Reads and checks the complete reply to `req`.
pub(crate) fn receive<R: Read>(
    r: &mut R,
    req: &Request,
    structured: bool,
    expect: Expect<'_>,
) -> Result<()> {
    let magic: [u8; 4] = wire::read_array(r, "a reply header")?;
    match parse_reply_magic(magic)? {
        ReplyKind::Simple => receive_simple(r, req, structured, expect),
        ReplyKind::Structured if structured => receive_chunks(r, req, expect),
        ReplyKind::Structured => Err(Error::protocol(
            "structured reply chunk although structured replies were not negotiated",
        )),
    }
}

fn check_cookie(cookie: u64, req: &Request) -> Result<()> {
    if cookie == req.cookie {
        Ok(())
    } else {
        Err(Error::protocol(format!(
            "reply for cookie {cookie:#x} while only {:#x} ({}) is in flight",
            req.cookie,
            command_name(req.command)
        )))
    }
}

fn server_error(req: &Request, errno: u32, message: String) -> Error {
    Error::Server {
        command: command_name(req.command),
        errno,
        message,
    }
}

fn receive_simple<R: Read>(
    r: &mut R,
    req: &Request,
    structured: bool,
    expect: Expect<'_>,
) -> Result<()> {
    let rest: [u8; SIMPLE_REPLY_REST_LEN] = wire::read_array(r, "a simple reply")?;
    let reply = parse_simple_reply(&rest)?;
    check_cookie(reply.cookie, req)?;
    if structured && req.command == NBD_CMD_READ {
        return Err(Error::protocol(
            "simple reply to NBD_CMD_READ although structured replies were negotiated",
        ));
    }
    if reply.error != 0 {
        return Err(server_error(req, reply.error, String::new()));
    }
    match expect {
        Expect::Status => Ok(()),
        Expect::Data(buf) => wire::read_exact(r, buf, "read data"),
        Expect::BlockStatus { .. } => Err(Error::protocol(
            "simple success reply to NBD_CMD_BLOCK_STATUS, which needs a structured reply",
        )),
    }
}

fn receive_chunks<R: Read>(r: &mut R, req: &Request, expect: Expect<'_>) -> Result<()> {
    let mut state = Chunks::new(req, expect);
    loop {
        let rest: [u8; CHUNK_HEADER_REST_LEN] = wire::read_array(r, "a structured reply header")?;
        let header = parse_chunk_header(&rest)?;
        state.handle(r, &header)?;
        if header.done() {
            return state.finish();
        }
        let magic: [u8; 4] = wire::read_array(r, "a reply header")?;
        if parse_reply_magic(magic)? != ReplyKind::Structured {
            return Err(Error::protocol(
                "simple reply in the middle of a structured reply",
            ));
        }
    }
}

/// The state of one structured reply being received.
struct Chunks<'a, 'r> {
    req: &'r Request,
    expect: Expect<'a>,
    coverage: Coverage,
    error: Option<ErrorChunk>,
    seen_contexts: Vec<u32>,
    count: usize,
}

impl<'a, 'r> Chunks<'a, 'r> {
    fn new(req: &'r Request, expect: Expect<'a>) -> Self {
        Chunks {
            req,
            expect,
            coverage: Coverage::default(),
            error: None,
            seen_contexts: Vec::new(),
            count: 0,
        }
    }

    fn handle<R: Read>(&mut self, r: &mut R, header: &ChunkHeader) -> Result<()> {
        self.check_header(header)?;
        match header.chunk_type {
            NBD_REPLY_TYPE_NONE => self.none_chunk(header),
            NBD_REPLY_TYPE_OFFSET_DATA => self.data_chunk(r, header),
            NBD_REPLY_TYPE_OFFSET_HOLE => self.hole_chunk(r, header),
            NBD_REPLY_TYPE_BLOCK_STATUS => self.status_chunk(r, header),
            t if t & NBD_REPLY_TYPE_ERROR_BIT != 0 => self.error_chunk(r, header),
            _ => Err(self.unexpected(header)),
        }
    }

    fn check_header(&mut self, header: &ChunkHeader) -> Result<()> {
        check_cookie(header.cookie, self.req)?;
        self.count += 1;
        if self.count > MAX_CHUNKS_PER_REPLY {
            return Err(Error::protocol(format!(
                "more than {MAX_CHUNKS_PER_REPLY} chunks in one reply"
            )));
        }
        match chunk_payload_limit(header.chunk_type) {
            Some(limit) if header.length > limit => Err(Error::protocol(format!(
                "{} of {} bytes exceeds the {limit}-byte limit",
                chunk_type_name(header.chunk_type),
                header.length
            ))),
            _ => Ok(()),
        }
    }

    fn unexpected(&self, header: &ChunkHeader) -> Error {
        Error::protocol(format!(
            "unexpected {} in reply to {}",
            chunk_type_name(header.chunk_type),
            command_name(self.req.command)
        ))
    }

    fn bad_length(&self, header: &ChunkHeader) -> Error {
        Error::protocol(format!(
            "{} with invalid payload length {}",
            chunk_type_name(header.chunk_type),
            header.length
        ))
    }

    fn none_chunk(&self, header: &ChunkHeader) -> Result<()> {
        if header.length != 0 {
            return Err(self.bad_length(header));
        }
        if !header.done() {
            return Err(Error::protocol(
                "NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE",
            ));
        }
        Ok(())
    }

    /// Checks that `[offset, offset + len)` lies in the request and overlaps
    /// no earlier content chunk; returns its start relative to the request.
    fn claim(&mut self, offset: u64, len: u64) -> Result<usize> {
        let start = offset.checked_sub(self.req.offset);
        let end = start.and_then(|s| s.checked_add(len));
        let (start, end) = match (start, end) {
            (Some(s), Some(e)) if e <= u64::from(self.req.length) => (s, e),
            _ => {
                return Err(Error::protocol(format!(
                    "content chunk at offset {offset} length {len} lies outside the request \
                     (offset {}, length {})",
                    self.req.offset, self.req.length
                )))
            }
        };
        if !self.coverage.insert(start, end) {
            return Err(Error::protocol(format!(
                "content chunk at offset {offset} length {len} overlaps an earlier chunk"
            )));
        }
        // Bounded by the request length, a u32.
        Ok(start as usize)
    }

    fn data_chunk<R: Read>(&mut self, r: &mut R, header: &ChunkHeader) -> Result<()> {
        if !matches!(self.expect, Expect::Data(_)) {
            return Err(self.unexpected(header));
        }
        if header.length < 9 {
            return Err(self.bad_length(header));
        }
        let offset = u64::from_be_bytes(wire::read_array(r, "a data chunk offset")?);
        let len = header.length - 8;
        let start = self.claim(offset, u64::from(len))?;
        let Expect::Data(buf) = &mut self.expect else {
            return Err(self.unexpected(header));
        };
        wire::read_exact(r, &mut buf[start..start + len as usize], "read data")
    }

    fn hole_chunk<R: Read>(&mut self, r: &mut R, header: &ChunkHeader) -> Result<()> {
        if !matches!(self.expect, Expect::Data(_)) {
            return Err(self.unexpected(header));
        }
        if header.length != 12 {
            return Err(self.bad_length(header));
        }
        let payload: [u8; 12] = wire::read_array(r, "a hole chunk")?;
        let (offset, len) = parse_hole_chunk(&payload)?;
        let start = self.claim(offset, u64::from(len))?;
        if let Expect::Data(buf) = &mut self.expect {
            buf[start..start + len as usize].fill(0);
        }
        Ok(())
    }

    fn status_chunk<R: Read>(&mut self, r: &mut R, header: &ChunkHeader) -> Result<()> {
        let Expect::BlockStatus {
            wanted,
            negotiated,
            out,
        } = &mut self.expect
        else {
            return Err(self.unexpected(header));
        };
        let payload = wire::read_vec(r, header.length, "a block status chunk")?;
        let (context, descriptors) = parse_block_status_chunk(&payload, self.req.length)?;
        if !negotiated.contains(&context) {
            return Err(Error::protocol(format!(
                "block status for context id {context}, which was not negotiated"
            )));
        }
        if self.seen_contexts.contains(&context) {
            return Err(Error::protocol(format!(
                "second block status chunk for context id {context}"
            )));
        }
        self.seen_contexts.push(context);
        if context == *wanted {
            **out = descriptors;
        }
        Ok(())
    }

    fn error_chunk<R: Read>(&mut self, r: &mut R, header: &ChunkHeader) -> Result<()> {
        if header.length < 6 {
            return Err(self.bad_length(header));
        }
        let payload = wire::read_vec(r, header.length, "an error chunk")?;
        let error = parse_error_chunk(header.chunk_type, &payload)?;
        if let Some(offset) = error.offset {
            let inside = offset
                .checked_sub(self.req.offset)
                .is_some_and(|rel| rel < u64::from(self.req.length));
            if !inside {
                return Err(Error::protocol(format!(
                    "error offset {offset} lies outside the request"
                )));
            }
        }
        self.error.get_or_insert(error);
        Ok(())
    }

    fn finish(self) -> Result<()> {
        if let Some(e) = self.error {
            return Err(server_error(self.req, e.errno, e.message));
        }
        match self.expect {
            Expect::Status => Ok(()),
            Expect::Data(_) if self.coverage.total() != u64::from(self.req.length) => {
                Err(Error::protocol(format!(
                    "reply to NBD_CMD_READ covered {} of {} bytes",
                    self.coverage.total(),
                    self.req.length
                )))
            }
            Expect::Data(_) => Ok(()),
            Expect::BlockStatus { negotiated, .. } => {
                match negotiated.iter().find(|c| !self.seen_contexts.contains(c)) {
                    Some(missing) => Err(Error::protocol(format!(
                        "block status reply lacks context id {missing}"
                    ))),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Disjoint byte ranges received so far in one reply.
#[derive(Debug, Default)]
pub(crate) struct Coverage {
    /// start → end, non-overlapping.
    ranges: BTreeMap<u64, u64>,
    total: u64,
}

impl Coverage {
    /// Adds `[start, end)`; `false` (and no change) if it overlaps a range
    /// already present or is empty.
    pub(crate) fn insert(&mut self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        // Ranges are disjoint and sorted, so only the last one starting
        // before `end` can overlap.
        if let Some((_, &prev_end)) = self.ranges.range(..end).next_back() {
            if prev_end > start {
                return false;
            }
        }
        self.ranges.insert(start, end);
        self.total += end - start;
        true
    }

    /// Bytes covered.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }
}
