//! The handshake phase: fixed newstyle negotiation, structured replies,
//! metadata contexts, and `NBD_OPT_GO`.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use super::proto::{self, *};
use super::wire;
use super::{ConnectOptions, ExportInfo, TransmissionFlags};
use crate::error::{Error, Result};

/// The most metadata contexts we accept from one `NBD_OPT_SET_META_CONTEXT`.
const MAX_CONTEXTS: usize = 256;
/// The most replies we accept to one option before calling the server broken.
const MAX_REPLIES_PER_OPTION: usize = 1024;

/// What the handshake agreed on.
pub(crate) struct Negotiated {
    pub(crate) export: ExportInfo,
    pub(crate) contexts: BTreeMap<String, u32>,
}

/// One option reply with its (bounded) payload.
struct OptionReply {
    reply_type: u32,
    payload: Vec<u8>,
}

impl OptionReply {
    fn is_error(&self) -> bool {
        self.reply_type & NBD_REP_FLAG_ERROR != 0
    }
}

/// Runs the whole handshake and leaves the stream in transmission phase.
pub(crate) fn negotiate<S: Read + Write>(io: &mut S, opts: &ConnectOptions) -> Result<Negotiated> {
    let handshake_flags = greet(io)?;
    let no_zeroes = handshake_flags & NBD_FLAG_NO_ZEROES != 0;
    let structured = opts.structured_replies && negotiate_structured(io)?;
    let contexts = if structured && !opts.meta_contexts.is_empty() {
        set_meta_contexts(io, &opts.export_name, &opts.meta_contexts)?
    } else {
        BTreeMap::new()
    };
    let (size, flags, block_size) = go(io, &opts.export_name, no_zeroes)?;
    let export = ExportInfo {
        name: opts.export_name.clone(),
        size,
        flags: TransmissionFlags(flags),
        block_size,
        structured_replies: structured,
    };
    Ok(Negotiated { export, contexts })
}

/// Greets the server and aborts the handshake cleanly: proves a server is
/// listening and speaking NBD without occupying it.
pub(crate) fn probe<S: Read + Write>(io: &mut S) -> Result<()> {
    greet(io)?;
    send_option(io, NBD_OPT_ABORT, &[])?;
    // The spec lets servers close without replying to NBD_OPT_ABORT.
    let _ = read_reply(io, NBD_OPT_ABORT);
    Ok(())
}

/// Reads the greeting and answers with our client flags.
fn greet<S: Read + Write>(io: &mut S) -> Result<u16> {
    let greeting: [u8; GREETING_LEN] = wire::read_array(io, "the greeting")?;
    let flags = parse_greeting(&greeting)?;
    wire::write_all(io, &client_flags(flags).to_be_bytes(), "client flags")?;
    Ok(flags)
}

fn send_option<W: Write>(io: &mut W, option: u32, data: &[u8]) -> Result<()> {
    let bytes = encode_option(option, data)?;
    wire::write_all(io, &bytes, &option_name(option))
}

fn read_reply<R: Read>(io: &mut R, option: u32) -> Result<OptionReply> {
    let what = format!("the reply to {}", option_name(option));
    let header: [u8; OPTION_REPLY_HEADER_LEN] = wire::read_array(io, &what)?;
    let header = parse_option_reply_header(&header, option)?;
    let payload = wire::read_vec(io, header.length, &what)?;
    Ok(OptionReply {
        reply_type: header.reply_type,
        payload,
    })
}

/// The error for an option the server refused, with its message.
fn rejection(option: u32, export: Option<&str>, reply: &OptionReply) -> Error {
    Error::OptionRejected {
        option: option_name(option),
        export: export.map(str::to_owned),
        reply: reply_type_name(reply.reply_type),
        message: sanitize(&reply.payload),
    }
}

fn unexpected(option: u32, reply: &OptionReply) -> Error {
    Error::protocol(format!(
        "unexpected {} in reply to {}",
        reply_type_name(reply.reply_type),
        option_name(option)
    ))
}

fn expect_empty(option: u32, reply: &OptionReply) -> Result<()> {
    if reply.payload.is_empty() {
        Ok(())
    } else {
        Err(Error::protocol(format!(
            "NBD_REP_ACK to {} carries {} bytes of data",
            option_name(option),
            reply.payload.len()
        )))
    }
}

/// Asks for structured replies; `false` if the server politely declines.
fn negotiate_structured<S: Read + Write>(io: &mut S) -> Result<bool> {
    send_option(io, NBD_OPT_STRUCTURED_REPLY, &[])?;
    let reply = read_reply(io, NBD_OPT_STRUCTURED_REPLY)?;
    match reply.reply_type {
        NBD_REP_ACK => expect_empty(NBD_OPT_STRUCTURED_REPLY, &reply).map(|()| true),
        NBD_REP_ERR_UNSUP | NBD_REP_ERR_POLICY | NBD_REP_ERR_INVALID | NBD_REP_ERR_PLATFORM => {
            Ok(false)
        }
        _ if reply.is_error() => Err(rejection(NBD_OPT_STRUCTURED_REPLY, None, &reply)),
        _ => Err(unexpected(NBD_OPT_STRUCTURED_REPLY, &reply)),
    }
}

/// Selects metadata contexts and returns the server's name → id map.
/// A server that does not know the option yields an empty map.
fn set_meta_contexts<S: Read + Write>(
    io: &mut S,
    export: &str,
    queries: &[String],
) -> Result<BTreeMap<String, u32>> {
    let option = NBD_OPT_SET_META_CONTEXT;
    send_option(io, option, &encode_meta_context_query(export, queries)?)?;
    let mut contexts = BTreeMap::new();
    for _ in 0..MAX_REPLIES_PER_OPTION {
        let reply = read_reply(io, option)?;
        match reply.reply_type {
            NBD_REP_META_CONTEXT => add_context(&mut contexts, &reply.payload)?,
            NBD_REP_ACK => return expect_empty(option, &reply).map(|()| contexts),
            NBD_REP_ERR_UNSUP => return Ok(BTreeMap::new()),
            _ if reply.is_error() => return Err(rejection(option, Some(export), &reply)),
            _ => return Err(unexpected(option, &reply)),
        }
    }
    Err(too_many_replies(option))
}

fn add_context(contexts: &mut BTreeMap<String, u32>, payload: &[u8]) -> Result<()> {
    let (id, name) = parse_meta_context(payload)?;
    if contexts.len() >= MAX_CONTEXTS {
        return Err(Error::protocol(format!(
            "more than {MAX_CONTEXTS} metadata contexts"
        )));
    }
    if contexts.contains_key(&name) || contexts.values().any(|&v| v == id) {
        return Err(Error::protocol(format!(
            "metadata context {name:?} (id {id}) repeats a name or id"
        )));
    }
    contexts.insert(name, id);
    Ok(())
}

fn too_many_replies(option: u32) -> Error {
    Error::protocol(format!(
        "more than {MAX_REPLIES_PER_OPTION} replies to {}",
        option_name(option)
    ))
}

type ExportParams = (u64, u16, Option<BlockSizeConstraints>);

/// Enters transmission with `NBD_OPT_GO`, falling back to
/// `NBD_OPT_EXPORT_NAME` for servers that do not know it.
fn go<S: Read + Write>(io: &mut S, export: &str, no_zeroes: bool) -> Result<ExportParams> {
    send_option(io, NBD_OPT_GO, &encode_go(export)?)?;
    let mut size_flags = None;
    let mut block_size = None;
    for _ in 0..MAX_REPLIES_PER_OPTION {
        let reply = read_reply(io, NBD_OPT_GO)?;
        match reply.reply_type {
            NBD_REP_INFO => match parse_info(&reply.payload)? {
                Info::Export { size, flags } => size_flags = Some((size, flags)),
                Info::BlockSize(c) => block_size = Some(c),
                Info::Other(_) => {}
            },
            NBD_REP_ACK => {
                expect_empty(NBD_OPT_GO, &reply)?;
                let (size, flags) = size_flags.ok_or_else(|| {
                    Error::protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
                })?;
                return Ok((size, flags, block_size));
            }
            NBD_REP_ERR_UNSUP => return export_name(io, export, no_zeroes),
            _ if reply.is_error() => return Err(rejection(NBD_OPT_GO, Some(export), &reply)),
            _ => return Err(unexpected(NBD_OPT_GO, &reply)),
        }
    }
    Err(too_many_replies(NBD_OPT_GO))
}

/// The pre-`NBD_OPT_GO` way into transmission: no error reporting (an
/// unknown export just closes the connection).
fn export_name<S: Read + Write>(io: &mut S, export: &str, no_zeroes: bool) -> Result<ExportParams> {
    send_option(io, NBD_OPT_EXPORT_NAME, export.as_bytes())?;
    let what = "the reply to NBD_OPT_EXPORT_NAME";
    let reply: [u8; 10] = wire::read_array(io, what)?;
    let (size, flags) = proto::parse_export_name_reply(&reply)?;
    if !no_zeroes {
        wire::skip(io, 124, what)?;
    }
    Ok((size, flags, None))
}
