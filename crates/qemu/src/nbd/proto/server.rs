//! The server's side of the wire format: parsing what a client sends and
//! encoding the server's answers.
//!
//! Like the client's half, these are pure functions over byte slices. Every
//! value a client sends is untrusted: lengths are checked against the bytes
//! that are really there before anything is allocated, strings against
//! [`MAX_STRING`].

use super::*;

/// Handshake flags this server sends in its greeting.
pub const SERVER_HANDSHAKE_FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
/// The largest option payload the server reads; a longer one ends the
/// connection (the largest legitimate ones, a few names, are far smaller).
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Command flag: fail `WRITE_ZEROES` fast if it would be slow (this server
/// does not offer it, so it refuses the flag).
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Size of an option request header (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// Encodes the server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&flags.to_be_bytes());
    out
}

/// Parses the client flags; unknown bits are refused, as the spec requires.
pub fn parse_client_flags(bytes: &[u8]) -> Result<u32> {
    let mut b = Bytes::new(bytes, "client flags");
    let flags = b.u32()?;
    b.finish()?;
    let known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    if flags & !known != 0 {
        return Err(Error::protocol(format!(
            "client sent unknown client flags {flags:#x}"
        )));
    }
    Ok(flags)
}

/// Parses an option request header into (option, payload length). The
/// length is not bounded here; the caller decides (see [`MAX_OPTION_DATA`]).
pub fn parse_option_header(bytes: &[u8]) -> Result<(u32, u32)> {
    let mut b = Bytes::new(bytes, "option header");
    let magic = b.u64()?;
    if magic != IHAVEOPT {
        return Err(Error::protocol(format!(
            "option does not start with IHAVEOPT but {magic:#018x}"
        )));
    }
    let option = b.u32()?;
    let length = b.u32()?;
    b.finish()?;
    Ok((option, length))
}

/// Reads a `u32`-length-prefixed string sent by the client.
fn client_string(b: &mut Bytes<'_>, what: &str) -> Result<String> {
    let len = b.u32()? as usize;
    if len > MAX_STRING {
        return Err(Error::protocol(format!(
            "{what} of {len} bytes exceeds {MAX_STRING}"
        )));
    }
    let bytes = b.take(len)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| Error::protocol(format!("{what} is not UTF-8")))
}

/// Checks a name as the client sent it in `NBD_OPT_EXPORT_NAME` (the whole
/// payload, no length prefix).
pub fn parse_export_name(data: &[u8]) -> Result<String> {
    if data.len() > MAX_STRING {
        return Err(Error::protocol(format!(
            "export name of {} bytes exceeds {MAX_STRING}",
            data.len()
        )));
    }
    String::from_utf8(data.to_vec()).map_err(|_| Error::protocol("export name is not UTF-8"))
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export asked for.
    pub export: String,
    /// The `NBD_INFO_*` types the client asks for.
    pub infos: Vec<u16>,
}

/// Parses the payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest> {
    let mut b = Bytes::new(data, "NBD_OPT_GO data");
    let export = client_string(&mut b, "export name")?;
    let count = usize::from(b.u16()?);
    // At most 65535 two-byte entries: bounded by the u16 count.
    let mut infos = Vec::with_capacity(count.min(b.rest.len() / 2));
    for _ in 0..count {
        infos.push(b.u16()?);
    }
    b.finish()?;
    Ok(InfoRequest { export, infos })
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export the contexts are for.
    pub export: String,
    /// The queries (context names, or `namespace:` prefixes when listing).
    pub queries: Vec<String>,
}

/// Parses the payload of the two metadata context options.
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest> {
    let mut b = Bytes::new(data, "metadata context request");
    let export = client_string(&mut b, "export name")?;
    let count = b.u32()? as usize;
    // Each query takes at least its 4-byte length: never allocate more.
    let mut queries = Vec::with_capacity(count.min(b.rest.len() / 4));
    for _ in 0..count {
        queries.push(client_string(&mut b, "metadata context query")?);
    }
    b.finish()?;
    Ok(MetaContextRequest { export, queries })
}

/// Encodes one option reply: header and payload.
pub fn encode_option_reply(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
    // Payloads are built by the server from bounded names; saturate anyway.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + payload.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Truncates `s` to at most `max` bytes, at a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The payload of an `NBD_REP_SERVER` reply: a name and its description.
pub fn encode_server_entry(name: &str, description: &str) -> Vec<u8> {
    let name = truncate_str(name, MAX_STRING);
    let description = truncate_str(description, MAX_STRING);
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    // Cannot truncate: at most MAX_STRING.
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
    out
}

/// The payload of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn encode_info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..12].copy_from_slice(&flags.to_be_bytes());
    out
}

/// The payload of `NBD_REP_INFO` carrying a string (`NBD_INFO_NAME`,
/// `NBD_INFO_DESCRIPTION`).
pub fn encode_info_string(info: u16, text: &str) -> Vec<u8> {
    let text = truncate_str(text, MAX_STRING);
    [&info.to_be_bytes()[..], text.as_bytes()].concat()
}

/// The payload of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(c: &BlockSizeConstraints) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&c.minimum.to_be_bytes());
    out[6..10].copy_from_slice(&c.preferred.to_be_bytes());
    out[10..14].copy_from_slice(&c.maximum.to_be_bytes());
    out
}

/// The payload of `NBD_REP_META_CONTEXT`: id and name.
pub fn encode_meta_context(id: u32, name: &str) -> Vec<u8> {
    [&id.to_be_bytes()[..], name.as_bytes()].concat()
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and the 124 zero bytes
/// unless the client asked to omit them.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// Parses a request header, checking its magic.
pub fn parse_request(bytes: &[u8]) -> Result<Request> {
    let mut b = Bytes::new(bytes, "request header");
    let magic = b.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(Error::protocol(format!("bad request magic {magic:#010x}")));
    }
    let request = Request {
        flags: b.u16()?,
        command: b.u16()?,
        cookie: b.u64()?,
        offset: b.u64()?,
        length: b.u32()?,
    };
    b.finish()?;
    Ok(request)
}

/// Encodes a simple reply header (read data follows separately).
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Encodes a structured reply chunk header.
pub fn encode_chunk_header(flags: u16, chunk_type: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// The chunk flags: [`NBD_REPLY_FLAG_DONE`] on the last chunk.
fn done_flag(done: bool) -> u16 {
    if done {
        NBD_REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk with `message` (cut to
/// [`MAX_STRING`] bytes).
pub fn push_error_chunk(out: &mut Vec<u8>, cookie: u64, errno: u32, message: &str, done: bool) {
    let message = truncate_str(message, MAX_STRING);
    // Cannot truncate: at most MAX_STRING.
    let len = 6 + message.len() as u32;
    out.extend_from_slice(&encode_chunk_header(
        done_flag(done),
        NBD_REPLY_TYPE_ERROR,
        cookie,
        len,
    ));
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn push_hole_chunk(out: &mut Vec<u8>, cookie: u64, offset: u64, size: u32, done: bool) {
    out.extend_from_slice(&encode_chunk_header(
        done_flag(done),
        NBD_REPLY_TYPE_OFFSET_HOLE,
        cookie,
        12,
    ));
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
}

/// Appends the header and offset of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk
/// of `size` data bytes; the caller appends the data.
pub fn push_data_chunk_header(out: &mut Vec<u8>, cookie: u64, offset: u64, size: u32, done: bool) {
    out.extend_from_slice(&encode_chunk_header(
        done_flag(done),
        NBD_REPLY_TYPE_OFFSET_DATA,
        cookie,
        size.saturating_add(8),
    ));
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one context.
pub fn push_block_status_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    context: u32,
    descriptors: &[Descriptor],
    done: bool,
) {
    let len = u32::try_from(4 + 8 * descriptors.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&encode_chunk_header(
        done_flag(done),
        NBD_REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len,
    ));
    out.extend_from_slice(&context.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.length.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn request_round_trips_through_the_clients_encoder() {
        let r = Request {
            flags: NBD_CMD_FLAG_FUA,
            command: NBD_CMD_WRITE,
            cookie: 77,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(parse_request(&encode_request(&r)).unwrap(), r);
        let mut bad = encode_request(&r);
        bad[0] ^= 1;
        assert!(parse_request(&bad).is_err());
    }

    #[test]
    fn greeting_is_what_the_client_accepts() {
        let flags = parse_greeting(&encode_greeting(SERVER_HANDSHAKE_FLAGS)).unwrap();
        assert_eq!(flags, SERVER_HANDSHAKE_FLAGS);
        assert_eq!(
            parse_client_flags(&client_flags(flags).to_be_bytes()).unwrap(),
            3
        );
        assert!(parse_client_flags(&4u32.to_be_bytes()).is_err());
    }

    #[test]
    fn go_and_meta_context_requests_round_trip_the_clients_encoders() {
        let go = parse_info_request(&encode_go("disk0").unwrap()).unwrap();
        assert_eq!(go.export, "disk0");
        assert!(go.infos.is_empty());
        let q = vec!["base:allocation".to_owned(), "base:".to_owned()];
        let m = parse_meta_context_request(&encode_meta_context_query("d", &q).unwrap()).unwrap();
        assert_eq!(m.export, "d");
        assert_eq!(m.queries, q);
    }

    #[test]
    fn info_payloads_parse_with_the_clients_parser() {
        assert_eq!(
            parse_info(&encode_info_export(1 << 30, 0x1ff)).unwrap(),
            Info::Export {
                size: 1 << 30,
                flags: 0x1ff
            }
        );
        let c = BlockSizeConstraints {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        };
        assert_eq!(
            parse_info(&encode_info_block_size(&c)).unwrap(),
            Info::BlockSize(c)
        );
        let (id, name) = parse_meta_context(&encode_meta_context(3, "base:allocation")).unwrap();
        assert_eq!((id, name.as_str()), (3, "base:allocation"));
    }

    #[test]
    fn error_chunk_parses_and_long_messages_are_cut_at_a_char_boundary() {
        let long = "é".repeat(3000);
        let mut out = Vec::new();
        push_error_chunk(&mut out, 9, NBD_EIO, &long, true);
        let header = parse_chunk_header(&out[4..20]).unwrap();
        assert!(header.done());
        let chunk = parse_error_chunk(header.chunk_type, &out[20..]).unwrap();
        assert_eq!(chunk.errno, NBD_EIO);
        assert_eq!(chunk.message.len(), 4096);
        assert_eq!(header.length as usize, out.len() - 20);
    }

    #[test]
    fn block_status_chunk_parses_with_the_clients_parser() {
        let d = [
            Descriptor {
                length: 4096,
                flags: 0,
            },
            Descriptor {
                length: 8192,
                flags: NBD_STATE_HOLE | NBD_STATE_ZERO,
            },
        ];
        let mut out = Vec::new();
        push_block_status_chunk(&mut out, 1, 5, &d, true);
        let (ctx, parsed) = parse_block_status_chunk(&out[20..], 12288).unwrap();
        assert_eq!((ctx, parsed), (5, d.to_vec()));
    }

    proptest! {
        #[test]
        fn client_payload_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_info_request(&data);
            let _ = parse_meta_context_request(&data);
            let _ = parse_option_header(&data);
            let _ = parse_request(&data);
            let _ = parse_client_flags(&data);
            let _ = parse_export_name(&data);
        }

        #[test]
        fn huge_counts_do_not_allocate(count in any::<u32>()) {
            let mut data = 0u32.to_be_bytes().to_vec();
            data.extend_from_slice(&count.to_be_bytes());
            let r = parse_meta_context_request(&data);
            prop_assert_eq!(r.is_ok(), count == 0);
        }
    }
}
