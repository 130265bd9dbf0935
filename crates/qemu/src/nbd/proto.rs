//! NBD wire format: constants and pure encode / parse functions.
//!
//! Everything here works on byte slices and never touches a socket, so it can
//! be unit-tested, property-tested and fuzzed. Every value that comes from the
//! server is checked here: magics, lengths against what the message type
//! allows, strings against the protocol's 4096-byte limit. Numbers follow the
//! NBD protocol specification (`doc/proto.md` of the NBD project); all
//! integers are big-endian.

use crate::error::{Error, Result};

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle negotiation magic, which we do not speak.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk (never negotiated by this client).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flag: the server speaks fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: we speak fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set by a conforming server.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the export is a rotational medium.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported.
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections see each other's flushed writes.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` is supported.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option: enter transmission with the old, error-less handshake.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Option: abort the handshake.
pub const NBD_OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Option: start TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const NBD_OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts for block status.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Option: use extended headers.
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: accepted / end of list.
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: one piece of export information.
pub const NBD_REP_INFO: u32 = 3;
/// Option reply: one selected metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit set in every option error reply.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: unknown option.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// Option error: forbidden by policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// Option error: invalid option.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// Option error: not supported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
/// Option error: TLS required.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// Option error: unknown export.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// Option error: server shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// Option error: the client must request block size constraints.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
/// Option error: request or reply too big.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;
/// Option error: extended headers required.
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = NBD_REP_FLAG_ERROR | 10;

/// Info type: export size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Info type: canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Info type: export description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Info type: block size constraints.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const NBD_CMD_READ: u16 = 0;
/// Command: write.
pub const NBD_CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const NBD_CMD_DISC: u16 = 2;
/// Command: flush.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const NBD_CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: `WRITE_ZEROES` must not punch a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: do not fragment a read reply.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one extent per context in block status.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply flag: last chunk of the reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: end of reply, no payload.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: zeroes at an offset.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status descriptors.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit set in every error chunk type.
pub const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Chunk type: error.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_ERROR_BIT | 1;
/// Chunk type: error at an offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT | 2;

/// `base:allocation` flag: the extent is a hole (unallocated).
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:*` flag: the extent is dirty (changed since the
/// bitmap started recording).
pub const NBD_STATE_DIRTY: u32 = 1 << 0;

/// Error value: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// Error value: input/output error.
pub const NBD_EIO: u32 = 5;
/// Error value: out of memory.
pub const NBD_ENOMEM: u32 = 12;
/// Error value: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// Error value: no space left.
pub const NBD_ENOSPC: u32 = 28;
/// Error value: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Error value: not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// Error value: server shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// The longest string the protocol allows (export names, messages).
pub const MAX_STRING: usize = 4096;
/// The largest option reply payload we accept (all known ones are far smaller).
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// The largest non-data, non-block-status chunk payload we accept.
pub const MAX_SMALL_CHUNK: u32 = 64 * 1024;
/// The most descriptors we accept in one block status chunk (qemu sends at
/// most 2^17).
pub const MAX_BLOCK_STATUS_EXTENTS: u32 = 1 << 17;
/// The largest block status chunk payload we accept.
pub const MAX_BLOCK_STATUS_CHUNK: u32 = 4 + 8 * MAX_BLOCK_STATUS_EXTENTS;
/// The largest read or write sent when the server gives no maximum: the
/// protocol's interoperable bound of 2^25 bytes.
pub const DEFAULT_MAX_IO: u32 = 32 * 1024 * 1024;
/// The most chunks accepted in one structured reply.
pub const MAX_CHUNKS_PER_REPLY: usize = 1 << 17;
/// Size of the server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Size of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply after its 4-byte magic.
pub const SIMPLE_REPLY_REST_LEN: usize = 12;
/// Size of a structured chunk header after its 4-byte magic.
pub const CHUNK_HEADER_REST_LEN: usize = 16;

/// A cursor over bytes received from the server; every read is checked.
struct Bytes<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Bytes<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Bytes { rest: bytes, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(Error::protocol(format!(
                "{} too short: needed {n} more bytes, have {}",
                self.what,
                self.rest.len()
            )));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn finish(self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(Error::protocol(format!(
                "{} has {} unexpected trailing bytes",
                self.what,
                self.rest.len()
            )))
        }
    }
}

/// Turns server-supplied bytes into printable text: invalid UTF-8 and
/// control characters (terminal escapes) are replaced.
pub fn sanitize(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// Parses the server greeting and returns its handshake flags.
///
/// Rejects oldstyle servers and servers without fixed newstyle (we need
/// option replies to report errors).
pub fn parse_greeting(bytes: &[u8]) -> Result<u16> {
    let mut b = Bytes::new(bytes, "server greeting");
    if b.u64()? != NBDMAGIC {
        return Err(Error::protocol(
            "server greeting does not start with NBDMAGIC: not an NBD server",
        ));
    }
    match b.u64()? {
        IHAVEOPT => {}
        CLISERV_MAGIC => {
            return Err(Error::protocol(
                "server uses the obsolete oldstyle negotiation",
            ))
        }
        other => {
            return Err(Error::protocol(format!(
                "unknown negotiation magic {other:#018x}"
            )))
        }
    }
    let flags = b.u16()?;
    b.finish()?;
    if flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::protocol(
            "server does not support fixed newstyle negotiation",
        ));
    }
    Ok(flags)
}

/// The client flags answering the given handshake flags.
pub fn client_flags(handshake_flags: u16) -> u32 {
    let mut flags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if handshake_flags & NBD_FLAG_NO_ZEROES != 0 {
        flags |= NBD_FLAG_C_NO_ZEROES;
    }
    flags
}

/// Encodes one option request.
pub fn encode_option(option: u32, data: &[u8]) -> Result<Vec<u8>> {
    let len = u32::try_from(data.len())
        .map_err(|_| Error::InvalidRequest("NBD option data too long".into()))?;
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Ok(out)
}

fn push_string(out: &mut Vec<u8>, s: &str, what: &str) -> Result<()> {
    if s.len() > MAX_STRING || s.contains('\0') {
        return Err(Error::InvalidRequest(format!(
            "{what} must be at most {MAX_STRING} bytes without NUL"
        )));
    }
    // Cannot truncate: checked against MAX_STRING above.
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Encodes the data of `NBD_OPT_GO` / `NBD_OPT_INFO` (no information requests).
pub fn encode_go(export: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    push_string(&mut out, export, "export name")?;
    out.extend_from_slice(&0u16.to_be_bytes());
    Ok(out)
}

/// Encodes the data of `NBD_OPT_SET_META_CONTEXT` / `NBD_OPT_LIST_META_CONTEXT`.
pub fn encode_meta_context_query(export: &str, queries: &[String]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    push_string(&mut out, export, "export name")?;
    let count = u32::try_from(queries.len())
        .map_err(|_| Error::InvalidRequest("too many metadata contexts".into()))?;
    out.extend_from_slice(&count.to_be_bytes());
    for q in queries {
        push_string(&mut out, q, "metadata context name")?;
    }
    Ok(out)
}

/// The fixed part of one option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this replies to.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply_type: u32,
    /// Payload length (checked against [`MAX_OPTION_REPLY`]).
    pub length: u32,
}

/// Parses and checks an option reply header for the option we sent.
pub fn parse_option_reply_header(bytes: &[u8], sent: u32) -> Result<OptionReplyHeader> {
    let mut b = Bytes::new(bytes, "option reply header");
    let magic = b.u64()?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(Error::protocol(format!(
            "bad option reply magic {magic:#018x}"
        )));
    }
    let header = OptionReplyHeader {
        option: b.u32()?,
        reply_type: b.u32()?,
        length: b.u32()?,
    };
    b.finish()?;
    if header.option != sent {
        return Err(Error::protocol(format!(
            "reply to {} while {} was sent",
            option_name(header.option),
            option_name(sent)
        )));
    }
    if header.length > MAX_OPTION_REPLY {
        return Err(Error::protocol(format!(
            "{} reply of {} bytes exceeds the {MAX_OPTION_REPLY}-byte limit",
            option_name(sent),
            header.length
        )));
    }
    Ok(header)
}

/// Block size constraints advertised by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizeConstraints {
    /// Smallest addressable unit (power of two, at most 64 KiB).
    pub minimum: u32,
    /// Efficient I/O size (power of two).
    pub preferred: u32,
    /// Largest request the server accepts.
    pub maximum: u32,
}

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: export size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize(BlockSizeConstraints),
    /// Any other information type (ignored, as the spec requires).
    Other(u16),
}

/// Parses one `NBD_REP_INFO` payload, checking its length and values.
pub fn parse_info(payload: &[u8]) -> Result<Info> {
    let mut b = Bytes::new(payload, "NBD_REP_INFO");
    match b.u16()? {
        NBD_INFO_EXPORT => {
            let size = b.u64()?;
            let flags = b.u16()?;
            b.finish()?;
            check_export(size, flags)?;
            Ok(Info::Export { size, flags })
        }
        NBD_INFO_BLOCK_SIZE => {
            let c = BlockSizeConstraints {
                minimum: b.u32()?,
                preferred: b.u32()?,
                maximum: b.u32()?,
            };
            b.finish()?;
            check_block_size(&c)?;
            Ok(Info::BlockSize(c))
        }
        other => Ok(Info::Other(other)),
    }
}

/// Checks export size and transmission flags from the server.
pub fn check_export(size: u64, flags: u16) -> Result<()> {
    if size > i64::MAX as u64 {
        return Err(Error::protocol(format!(
            "export size {size} is not a valid disk size"
        )));
    }
    if flags & NBD_FLAG_HAS_FLAGS == 0 {
        return Err(Error::protocol(
            "transmission flags lack NBD_FLAG_HAS_FLAGS",
        ));
    }
    Ok(())
}

fn check_block_size(c: &BlockSizeConstraints) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::protocol(format!(
            "invalid block size constraints {c:?}: {why}"
        )))
    };
    if !c.minimum.is_power_of_two() || c.minimum > 65536 {
        return bad("minimum must be a power of two up to 64 KiB");
    }
    if !c.preferred.is_power_of_two() || c.preferred < c.minimum {
        return bad("preferred must be a power of two at least the minimum");
    }
    if c.maximum != u32::MAX && (c.maximum < c.minimum || c.maximum & (c.minimum - 1) != 0) {
        return bad("maximum must be a multiple of the minimum");
    }
    Ok(())
}

/// Parses one `NBD_REP_META_CONTEXT` payload into (id, name).
pub fn parse_meta_context(payload: &[u8]) -> Result<(u32, String)> {
    let mut b = Bytes::new(payload, "NBD_REP_META_CONTEXT");
    let id = b.u32()?;
    let name = b.rest;
    if name.is_empty() || name.len() > MAX_STRING {
        return Err(Error::protocol(format!(
            "metadata context name of {} bytes (must be 1 to {MAX_STRING})",
            name.len()
        )));
    }
    let name = std::str::from_utf8(name)
        .map_err(|_| Error::protocol("metadata context name is not UTF-8"))?;
    if !name.contains(':') {
        return Err(Error::protocol(format!(
            "metadata context name {:?} lacks a namespace",
            sanitize(name.as_bytes())
        )));
    }
    Ok((id, name.to_owned()))
}

/// Parses the reply to `NBD_OPT_EXPORT_NAME`: size, flags, and the 124 zero
/// bytes unless `no_zeroes` was negotiated (their content is ignored).
pub fn parse_export_name_reply(bytes: &[u8]) -> Result<(u64, u16)> {
    let mut b = Bytes::new(bytes, "NBD_OPT_EXPORT_NAME reply");
    let size = b.u64()?;
    let flags = b.u16()?;
    check_export(size, flags)?;
    Ok((size, flags))
}

/// One request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub command: u16,
    /// Identifies the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

/// Encodes a request header (the write payload follows separately).
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&r.flags.to_be_bytes());
    out[6..8].copy_from_slice(&r.command.to_be_bytes());
    out[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&r.offset.to_be_bytes());
    out[24..28].copy_from_slice(&r.length.to_be_bytes());
    out
}

/// Which kind of reply a 4-byte magic announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A simple reply; [`SIMPLE_REPLY_REST_LEN`] more header bytes follow.
    Simple,
    /// A structured chunk; [`CHUNK_HEADER_REST_LEN`] more header bytes follow.
    Structured,
}

/// Identifies a reply by its magic.
pub fn parse_reply_magic(magic: [u8; 4]) -> Result<ReplyKind> {
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyKind::Structured),
        EXTENDED_REPLY_MAGIC => Err(Error::protocol(
            "extended reply header, which was not negotiated",
        )),
        other => Err(Error::protocol(format!("bad reply magic {other:#010x}"))),
    }
}

/// The rest of a simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0 on success, else an `NBD_E*` value.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

/// Parses the 12 bytes after a simple reply magic.
pub fn parse_simple_reply(bytes: &[u8]) -> Result<SimpleReply> {
    let mut b = Bytes::new(bytes, "simple reply");
    let reply = SimpleReply {
        error: b.u32()?,
        cookie: b.u64()?,
    };
    b.finish()?;
    Ok(reply)
}

/// The rest of a structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*` (unknown bits are ignored, as the spec requires).
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub chunk_type: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Payload length.
    pub length: u32,
}

impl ChunkHeader {
    /// Whether this is the last chunk of its reply.
    pub fn done(&self) -> bool {
        self.flags & NBD_REPLY_FLAG_DONE != 0
    }
}

/// Parses the 16 bytes after a structured reply magic.
pub fn parse_chunk_header(bytes: &[u8]) -> Result<ChunkHeader> {
    let mut b = Bytes::new(bytes, "structured reply header");
    let header = ChunkHeader {
        flags: b.u16()?,
        chunk_type: b.u16()?,
        cookie: b.u64()?,
        length: b.u32()?,
    };
    b.finish()?;
    Ok(header)
}

/// The most payload bytes we accept for a chunk of this type, or `None` for
/// a type that has no bound here (`OFFSET_DATA`, bounded by the request).
pub fn chunk_payload_limit(chunk_type: u16) -> Option<u32> {
    match chunk_type {
        NBD_REPLY_TYPE_OFFSET_DATA => None,
        NBD_REPLY_TYPE_BLOCK_STATUS => Some(MAX_BLOCK_STATUS_CHUNK),
        _ => Some(MAX_SMALL_CHUNK),
    }
}

/// A decoded error chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// The `NBD_E*` value (nonzero).
    pub errno: u32,
    /// The server's message, sanitized for display.
    pub message: String,
    /// For `NBD_REPLY_TYPE_ERROR_OFFSET`, where the error happened.
    pub offset: Option<u64>,
}

/// Parses the payload of an error chunk (any type with bit 15 set).
pub fn parse_error_chunk(chunk_type: u16, payload: &[u8]) -> Result<ErrorChunk> {
    let mut b = Bytes::new(payload, "error chunk");
    let errno = b.u32()?;
    let message_len = usize::from(b.u16()?);
    if message_len > MAX_STRING {
        return Err(Error::protocol(format!(
            "error message of {message_len} bytes"
        )));
    }
    let message = sanitize(b.take(message_len)?);
    if errno == 0 {
        return Err(Error::protocol("error chunk with error value 0"));
    }
    let offset = match chunk_type {
        NBD_REPLY_TYPE_ERROR => None,
        NBD_REPLY_TYPE_ERROR_OFFSET => Some(b.u64()?),
        // Unknown error types: the rest is theirs to define.
        _ => {
            return Ok(ErrorChunk {
                errno,
                message,
                offset: None,
            })
        }
    };
    b.finish()?;
    Ok(ErrorChunk {
        errno,
        message,
        offset,
    })
}

/// Parses the payload of an `OFFSET_HOLE` chunk into (offset, size).
pub fn parse_hole_chunk(payload: &[u8]) -> Result<(u64, u32)> {
    let mut b = Bytes::new(payload, "NBD_REPLY_TYPE_OFFSET_HOLE chunk");
    let offset = b.u64()?;
    let size = b.u32()?;
    b.finish()?;
    if size == 0 {
        return Err(Error::protocol("hole chunk of size 0"));
    }
    Ok((offset, size))
}

/// One block status descriptor as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Extent length (nonzero).
    pub length: u32,
    /// Status flags, defined by the metadata context.
    pub flags: u32,
}

/// Parses a `BLOCK_STATUS` chunk into its context id and descriptors, and
/// checks the descriptors against the requested length: each is nonzero and
/// all but the last end before the requested length.
pub fn parse_block_status_chunk(payload: &[u8], requested: u32) -> Result<(u32, Vec<Descriptor>)> {
    if payload.len() < 12 || (payload.len() - 4) & 7 != 0 {
        return Err(Error::protocol(format!(
            "block status chunk of {} bytes (must be 4 + a positive multiple of 8)",
            payload.len()
        )));
    }
    let mut b = Bytes::new(payload, "block status chunk");
    let context = b.u32()?;
    let count = (payload.len() - 4) / 8;
    let mut descriptors = Vec::with_capacity(count);
    let mut covered = 0u64;
    for i in 0..count {
        if covered >= u64::from(requested) {
            return Err(Error::protocol(format!(
                "block status descriptor {i} starts past the requested {requested} bytes"
            )));
        }
        let d = Descriptor {
            length: b.u32()?,
            flags: b.u32()?,
        };
        if d.length == 0 {
            return Err(Error::protocol(format!(
                "block status descriptor {i} has length 0"
            )));
        }
        covered += u64::from(d.length);
        descriptors.push(d);
    }
    b.finish()?;
    Ok((context, descriptors))
}

/// Human-readable name of an `NBD_E*` value.
pub fn errno_name(errno: u32) -> String {
    let name = match errno {
        NBD_EPERM => "NBD_EPERM (operation not permitted)",
        NBD_EIO => "NBD_EIO (input/output error)",
        NBD_ENOMEM => "NBD_ENOMEM (out of memory)",
        NBD_EINVAL => "NBD_EINVAL (invalid argument)",
        NBD_ENOSPC => "NBD_ENOSPC (no space left on device)",
        NBD_EOVERFLOW => "NBD_EOVERFLOW (value too large)",
        NBD_ENOTSUP => "NBD_ENOTSUP (operation not supported)",
        NBD_ESHUTDOWN => "NBD_ESHUTDOWN (server is shutting down)",
        other => return format!("error {other}"),
    };
    name.to_owned()
}

/// Human-readable name of an option.
pub fn option_name(option: u32) -> String {
    let name = match option {
        NBD_OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        NBD_OPT_LIST => "NBD_OPT_LIST",
        NBD_OPT_STARTTLS => "NBD_OPT_STARTTLS",
        NBD_OPT_INFO => "NBD_OPT_INFO",
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        NBD_OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        other => return format!("option {other}"),
    };
    name.to_owned()
}

/// Human-readable name of an option reply type.
pub fn reply_type_name(reply: u32) -> String {
    let name = match reply {
        NBD_REP_ACK => "NBD_REP_ACK",
        NBD_REP_SERVER => "NBD_REP_SERVER",
        NBD_REP_INFO => "NBD_REP_INFO",
        NBD_REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        NBD_REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP (option not supported)",
        NBD_REP_ERR_POLICY => "NBD_REP_ERR_POLICY (forbidden by server policy)",
        NBD_REP_ERR_INVALID => "NBD_REP_ERR_INVALID (invalid option)",
        NBD_REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM (not supported on the server's platform)",
        NBD_REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD (TLS required)",
        NBD_REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (export not available)",
        NBD_REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN (server is shutting down)",
        NBD_REP_ERR_BLOCK_SIZE_REQD => {
            "NBD_REP_ERR_BLOCK_SIZE_REQD (block size negotiation required)"
        }
        NBD_REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG (request too big)",
        NBD_REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD (extended headers required)",
        other if other & NBD_REP_FLAG_ERROR != 0 => {
            return format!("error reply {}", other & !NBD_REP_FLAG_ERROR)
        }
        other => return format!("reply type {other}"),
    };
    name.to_owned()
}

/// Human-readable name of a command.
pub fn command_name(command: u16) -> &'static str {
    match command {
        NBD_CMD_READ => "NBD_CMD_READ",
        NBD_CMD_WRITE => "NBD_CMD_WRITE",
        NBD_CMD_DISC => "NBD_CMD_DISC",
        NBD_CMD_FLUSH => "NBD_CMD_FLUSH",
        NBD_CMD_TRIM => "NBD_CMD_TRIM",
        NBD_CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        NBD_CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "NBD command",
    }
}

/// Human-readable name of a chunk type.
pub fn chunk_type_name(chunk_type: u16) -> String {
    let name = match chunk_type {
        NBD_REPLY_TYPE_NONE => "NBD_REPLY_TYPE_NONE",
        NBD_REPLY_TYPE_OFFSET_DATA => "NBD_REPLY_TYPE_OFFSET_DATA",
        NBD_REPLY_TYPE_OFFSET_HOLE => "NBD_REPLY_TYPE_OFFSET_HOLE",
        NBD_REPLY_TYPE_BLOCK_STATUS => "NBD_REPLY_TYPE_BLOCK_STATUS",
        NBD_REPLY_TYPE_ERROR => "NBD_REPLY_TYPE_ERROR",
        NBD_REPLY_TYPE_ERROR_OFFSET => "NBD_REPLY_TYPE_ERROR_OFFSET",
        other => return format!("chunk type {other:#06x}"),
    };
    name.to_owned()
}

mod server;
pub use server::*;

#[cfg(test)]
mod tests;
